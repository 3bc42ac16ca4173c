//! The node against embedded-hal-mock transaction lists: register traffic in datasheet order,
//! retries and `Fault` frames on bus errors, window timing, and the exact bytes on the line.

use cascade_firmware::lis3dh::{ADDRESS_SA0_LOW, DEVICE_ID};
use cascade_firmware::node::FIRMWARE;
use cascade_firmware::sampler::{Due, Schedule};
use cascade_firmware::transmit::{Transmitter, TxError};
use cascade_firmware::{Node, NodeConfig, NodeError, Step};
use cascade_proto::frame::{Fault, FaultCode, Feed, Frame, FrameDecoder, Hello, Samples, Unit};
use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
use embedded_hal_mock::eh1::delay::NoopDelay;
use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

const A: u8 = ADDRESS_SA0_LOW;
const NACK: ErrorKind = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);

fn start_up() -> Vec<Transaction> {
    vec![
        Transaction::write_read(A, vec![0x0F], vec![DEVICE_ID]),
        Transaction::write(A, vec![0x20, 0x47]),
        Transaction::write(A, vec![0x23, 0x98]),
    ]
}

/// One ready sample: STATUS_REG says ZYXDA, then the 6-byte burst (left-justified counts).
fn sample(counts: [i16; 3]) -> Vec<Transaction> {
    let bytes: Vec<u8> = counts
        .iter()
        .flat_map(|&c| ((c << 4) as u16).to_le_bytes())
        .collect();
    vec![
        Transaction::write_read(A, vec![0x27], vec![0x08]),
        Transaction::write_read(A, vec![0xA8], bytes),
    ]
}

fn nacked_status() -> Transaction {
    Transaction::write_read(A, vec![0x27], vec![0]).with_error(NACK)
}

/// Every frame on the line, owned.
fn frames(line: &[u8]) -> Vec<String> {
    let mut decoder = FrameDecoder::<1024>::new();
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        match decoder.feed(rest) {
            Feed::Consumed => break,
            Feed::Frame { frame, rest: r } => {
                out.push(format!("{frame:?}"));
                rest = r;
            }
            Feed::Dropped { error, .. } => panic!("a bad frame on the line: {error}"),
        }
    }
    assert_eq!(decoder.stats().dropped, 0);
    out
}

#[test]
fn start_up_announces_the_sensor() {
    let mut i2c = Mock::new(&start_up());
    let mut node = Node::<_, _, 4>::new(i2c.clone(), A, Vec::new(), NodeConfig::default());
    node.start(0, &mut NoopDelay).unwrap();
    let (_, line) = node.release();
    let expected = Frame::Hello(Hello {
        firmware: FIRMWARE,
        sensor: "LIS3DH",
        rate_hz: 50,
        channels: 3,
        scale: 0.002,
        unit: Unit::StandardGravity,
    });
    assert_eq!(frames(&line), [format!("{expected:?}")]);
    i2c.done();
}

#[test]
fn a_full_window_goes_out_as_exactly_these_bytes() {
    let mut expectations = start_up();
    expectations.extend(sample([1000, -1, -2048]));
    expectations.extend(sample([0, 500, 2047]));
    let mut i2c = Mock::new(&expectations);
    let mut node = Node::<_, _, 2>::new(i2c.clone(), A, Vec::new(), NodeConfig::default());
    node.start(0, &mut NoopDelay).unwrap();
    assert_eq!(node.sample(20_000, &mut NoopDelay), Ok(Step::Sampled));
    assert_eq!(
        node.sample(40_000, &mut NoopDelay),
        Ok(Step::Sent { seq: 0 })
    );
    let (_, line) = node.release();

    // The frame built by hand from the documented format: postcard body, CRC-32C, COBS, 0x00.
    let mut body = vec![
        1,    // variant 1: Samples
        0,    // seq 0 (varint)
        0xA0, // t_us 20000 (varint 0xA0 0x9C 0x01)
        0x9C, 0x01, //
        3,    // channels
    ];
    body.extend(0.002f32.to_le_bytes()); // scale, g per count at ±4 g
    body.push(12); // data length (varint)
    for v in [1000i16, -1, -2048, 0, 500, 2047] {
        body.extend(v.to_le_bytes());
    }
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&body);
    body.extend(crc.to_le_bytes());
    let mut cobs = vec![0u8; body.len() + 2];
    let n = cobs::encode(&body, &mut cobs);
    cobs.truncate(n);
    cobs.push(0);

    let hello_len = line.iter().position(|&b| b == 0).unwrap() + 1;
    assert_eq!(&line[hello_len..], &cobs[..]);
    i2c.done();
}

#[test]
fn a_nack_is_retried_and_the_sample_kept() {
    let mut expectations = start_up();
    expectations.push(nacked_status());
    expectations.extend(sample([1, 2, 3]));
    let mut i2c = Mock::new(&expectations);
    let mut node = Node::<_, _, 4>::new(i2c.clone(), A, Vec::new(), NodeConfig::default());
    node.start(0, &mut NoopDelay).unwrap();
    assert_eq!(node.sample(0, &mut NoopDelay), Ok(Step::Sampled));
    i2c.done();
}

#[test]
fn a_sensor_that_keeps_failing_costs_three_attempts_and_a_fault_frame_then_windows_restart() {
    let mut expectations = start_up();
    expectations.extend(sample([1, 1, 1]));
    // Three failed attempts: NACK, a bus error, then a sensor that never says ready (4 polls).
    expectations.push(nacked_status());
    expectations.push(Transaction::write_read(A, vec![0x27], vec![0]).with_error(ErrorKind::Bus));
    expectations.extend((0..4).map(|_| Transaction::write_read(A, vec![0x27], vec![0])));
    // Recovered: a whole new window of two.
    expectations.extend(sample([2, 2, 2]));
    expectations.extend(sample([3, 3, 3]));
    let mut i2c = Mock::new(&expectations);
    let mut node = Node::<_, _, 2>::new(i2c.clone(), A, Vec::new(), NodeConfig::default());
    node.start(0, &mut NoopDelay).unwrap();
    assert_eq!(node.sample(0, &mut NoopDelay), Ok(Step::Sampled));
    assert_eq!(
        node.sample(20_000, &mut NoopDelay),
        Ok(Step::Faulted {
            seq: 0,
            code: FaultCode::Timeout
        })
    );
    assert_eq!(node.sample(40_000, &mut NoopDelay), Ok(Step::Sampled));
    assert_eq!(
        node.sample(60_000, &mut NoopDelay),
        Ok(Step::Sent { seq: 1 })
    );
    let (_, line) = node.release();
    let frames = frames(&line);
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(
        frames[1],
        format!(
            "{:?}",
            Frame::Fault(Fault {
                seq: 0,
                t_us: 20_000,
                code: FaultCode::Timeout,
                attempts: 3
            })
        )
    );
    // The sample from before the fault is not in the window after it.
    let data: Vec<u8> = [2i16, 2, 2, 3, 3, 3]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let expected = Frame::Samples(Samples {
        seq: 1,
        t_us: 40_000,
        channels: 3,
        scale: 0.002,
        data: &data,
    });
    assert_eq!(frames[2], format!("{expected:?}"));
    i2c.done();
}

#[test]
fn an_absent_sensor_fails_start_up_with_a_fault_frame() {
    let expectations: Vec<_> = (0..3)
        .map(|_| Transaction::write_read(A, vec![0x0F], vec![0]).with_error(NACK))
        .collect();
    let mut i2c = Mock::new(&expectations);
    let mut node = Node::<_, _, 2>::new(i2c.clone(), A, Vec::new(), NodeConfig::default());
    assert_eq!(
        node.start(7, &mut NoopDelay),
        Err(NodeError::Sensor(FaultCode::BusNack))
    );
    let (_, line) = node.release();
    let fault = Frame::Fault(Fault {
        seq: 0,
        t_us: 7,
        code: FaultCode::BusNack,
        attempts: 3,
    });
    assert_eq!(frames(&line), [format!("{fault:?}")]);
    i2c.done();
}

#[test]
fn the_wrong_part_is_not_retried() {
    let expectations = [Transaction::write_read(A, vec![0x0F], vec![0x68])];
    let mut i2c = Mock::new(&expectations);
    let mut node = Node::<_, _, 2>::new(i2c.clone(), A, Vec::new(), NodeConfig::default());
    assert_eq!(
        node.start(0, &mut NoopDelay),
        Err(NodeError::Sensor(FaultCode::WrongDevice))
    );
    i2c.done();
}

#[test]
fn windows_follow_the_schedule_and_a_late_loop_restarts_the_window() {
    const N: usize = 4;
    let mut expectations = start_up();
    for k in 0..(2 * N) as i16 {
        expectations.extend(sample([k, 0, 0]));
    }
    let mut i2c = Mock::new(&expectations);
    let mut node = Node::<_, _, N>::new(i2c.clone(), A, Vec::new(), NodeConfig::default());
    node.start(0, &mut NoopDelay).unwrap();

    // 50 Hz slots; the loop wakes every 7 ms, except once when it is 70 ms late (at 147 ms,
    // after the 80, 100 and 120 ms slots went by).
    let mut schedule = Schedule::new(0, 20_000);
    let mut now = 0u64;
    let mut steps = Vec::new();
    for wake in 0..100 {
        now += if wake == 10 { 77_000 } else { 7_000 };
        match schedule.poll(now) {
            Due::NotYet { .. } => {}
            Due::Now { t_us, missed: 0 } => steps.push((t_us, node.sample(t_us, &mut NoopDelay))),
            Due::Now { t_us, .. } => {
                steps.push((t_us, node.missed(t_us)));
                steps.push((t_us, node.sample(t_us, &mut NoopDelay)));
            }
        }
        if steps.len() == 2 * N + 1 {
            break;
        }
    }
    let sampled: Vec<u64> = steps
        .iter()
        .filter(|(_, s)| *s == Ok(Step::Sampled))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(sampled, [0, 20_000, 40_000, 140_000, 160_000, 180_000]);
    let sent: Vec<_> = steps
        .iter()
        .filter(|(_, s)| *s != Ok(Step::Sampled))
        .collect();
    assert_eq!(
        sent,
        [
            &(60_000, Ok(Step::Sent { seq: 0 })),
            &(
                140_000,
                Ok(Step::Faulted {
                    seq: 1,
                    code: FaultCode::Overrun
                })
            ),
            &(200_000, Ok(Step::Sent { seq: 2 })),
        ],
        "{steps:?}"
    );
    let (_, line) = node.release();
    let frames = frames(&line);
    // Each window is stamped with its first slot.
    assert!(frames[1].contains("t_us: 0,"), "{}", frames[1]);
    assert!(frames[3].contains("t_us: 140000,"), "{}", frames[3]);
    i2c.done();
}

/// A port that refuses every write.
struct BrokenPort;

impl embedded_io::ErrorType for BrokenPort {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::Write for BrokenPort {
    fn write(&mut self, _: &[u8]) -> Result<usize, Self::Error> {
        Err(embedded_io::ErrorKind::BrokenPipe)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[test]
fn a_refused_write_is_an_error_and_uses_up_its_sequence_number() {
    let mut expectations = start_up();
    expectations.extend(sample([1, 1, 1]));
    let mut i2c = Mock::new(&expectations);
    let mut node = Node::<_, _, 1>::new(i2c.clone(), A, BrokenPort, NodeConfig::default());
    assert!(matches!(
        node.start(0, &mut NoopDelay),
        Err(NodeError::Tx(TxError::Port(_)))
    ));
    assert_eq!(
        node.sample(0, &mut NoopDelay),
        Err(TxError::Port(embedded_io::ErrorKind::BrokenPipe))
    );
    i2c.done();

    let mut tx = Transmitter::<_, 64>::new(BrokenPort);
    assert!(tx.fault(0, FaultCode::Timeout, 1).is_err());
    assert_eq!(tx.next_seq(), 1, "the receiver will see the gap");
}
