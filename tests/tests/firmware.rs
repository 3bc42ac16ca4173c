//! The firmware logic feeding a running agent over a pseudo-terminal: a simulated LIS3DH plays
//! recorded-style windows, the firmware node samples it and writes frames, the line adds garbage
//! and loses bytes, and the agent decodes, windows and classifies with the bundled motion model.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_e2e::fixtures::{agent_toml_with_model, init_logs, model};
use cascade_firmware::lis3dh::{ADDRESS_SA0_LOW, DEVICE_ID};
use cascade_firmware::{Node, NodeConfig, Step};
use cascade_infer::{LoadOptions, Tensor, load_path};
use edge_agent::config::AgentConfig;
use edge_agent::input::Stage;
use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, Operation};
use embedded_hal_mock::eh1::delay::NoopDelay;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Samples per model window (64 x 3 axes = the motion model's 192 values).
const WINDOW: usize = 64;
/// Samples per frame: two frames per model window.
const FRAME: usize = 32;

/// An LIS3DH on a simulated bus: WHO_AM_I, writable control registers, and a queue of
/// accelerations (in g) served from OUT_X_L..OUT_Z_H as 12-bit left-justified counts.
struct SimulatedLis3dh {
    registers: [u8; 0x40],
    pointer: u8,
    motion: VecDeque<[f32; 3]>,
}

impl SimulatedLis3dh {
    fn new(motion: impl IntoIterator<Item = [f32; 3]>) -> Self {
        let mut registers = [0; 0x40];
        registers[0x0F] = DEVICE_ID;
        SimulatedLis3dh {
            registers,
            pointer: 0,
            motion: motion.into_iter().collect(),
        }
    }

    fn g_per_count(&self) -> f32 {
        // CTRL_REG4 FS[1:0], high-resolution sensitivities.
        [0.001, 0.002, 0.004, 0.012][usize::from((self.registers[0x23] >> 4) & 0b11)]
    }
}

impl ErrorType for SimulatedLis3dh {
    type Error = ErrorKind;
}

impl I2c for SimulatedLis3dh {
    fn transaction(
        &mut self,
        address: u8,
        operations: &mut [Operation<'_>],
    ) -> Result<(), Self::Error> {
        if address != ADDRESS_SA0_LOW {
            return Err(ErrorKind::NoAcknowledge(
                embedded_hal::i2c::NoAcknowledgeSource::Address,
            ));
        }
        for operation in operations {
            match operation {
                Operation::Write(bytes) => {
                    self.pointer = bytes[0] & 0x7F;
                    for (i, &b) in bytes[1..].iter().enumerate() {
                        self.registers[usize::from(self.pointer) + i] = b;
                    }
                }
                Operation::Read(buf) if self.pointer == 0x28 => {
                    let sample = self.motion.pop_front().expect("read past the script");
                    let scale = self.g_per_count();
                    for (axis, g) in sample.iter().enumerate() {
                        let counts = (g / scale).round().clamp(-2048.0, 2047.0) as i16;
                        let bytes = (counts << 4).to_le_bytes();
                        buf[2 * axis] = bytes[0];
                        buf[2 * axis + 1] = bytes[1];
                    }
                }
                Operation::Read(buf) if self.pointer == 0x27 => {
                    // ZYXDA while the script has samples.
                    buf[0] = if self.motion.is_empty() { 0 } else { 0x08 };
                }
                Operation::Read(buf) => {
                    let start = usize::from(self.pointer);
                    buf.copy_from_slice(&self.registers[start..start + buf.len()]);
                }
            }
        }
        Ok(())
    }
}

/// The firmware's UART: bytes queue up until the test moves them onto the pseudo-terminal.
#[derive(Clone, Default)]
struct Uart(Arc<Mutex<Vec<u8>>>);

impl Uart {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = core::convert::Infallible;
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_frames_become_motion_classifications_despite_a_noisy_line() {
    init_logs();
    let motion_model = model("motion-edge.onnx");
    let inputs = Tensor::read_npy(&model("data/motion-test/inputs.npy")).unwrap();
    let labels: Vec<i64> = match Tensor::read_npy(&model("data/motion-test/labels.npy")).unwrap() {
        Tensor::I64(a) => a.iter().copied().collect(),
        other => panic!("labels are {}", other.dtype()),
    };
    // Two windows of each class, in the order still, walking, shaking.
    let chosen: Vec<usize> = (0..3)
        .flat_map(|class| {
            labels
                .iter()
                .enumerate()
                .filter(move |(_, l)| **l == class)
                .map(|(i, _)| i)
                .take(2)
        })
        .collect();
    let windows: Vec<Vec<f32>> = chosen
        .iter()
        .map(|&i| {
            let all = inputs.as_f32().unwrap();
            all.index_axis(ndarray::Axis(0), i)
                .iter()
                .copied()
                .collect()
        })
        .collect();

    // What the model says about each window when given it directly.
    let direct = load_path(&motion_model, &LoadOptions::default()).unwrap();
    let expected: Vec<u32> = windows
        .iter()
        .map(|w| {
            let out = direct
                .run(vec![Tensor::from_f32(&[1, 192], w.clone()).unwrap()])
                .unwrap();
            let scores: Vec<f32> = out[0].to_f32().iter().copied().collect();
            (0..3)
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                .unwrap() as u32
        })
        .collect();

    let (mut line, agent_end) = tokio_serial::SerialStream::pair().expect("a pseudo-terminal");
    let tty = tokio_serial::SerialPort::name(&agent_end).expect("the pty's name");
    let state = tempfile::tempdir().unwrap();
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "{}\n[sources.serial]\npath = {tty:?}\nbaud = 115200\n",
        agent_toml_with_model(
            "sensor-node",
            &format!("mqtt://{}", unused.local_addr().unwrap()),
            &state.path().join("agent"),
            &motion_model,
        )
    );
    drop(unused);
    let config: AgentConfig = toml::from_str(&config).unwrap();
    let mut agent = edge_agent::agent::start(config, CancellationToken::new())
        .await
        .expect("agent starts");
    let mut results = agent.take_results().unwrap();
    let _keep = agent_end;

    let script = windows.iter().flat_map(|w| {
        w.chunks_exact(3)
            .map(|s| [s[0], s[1], s[2]])
            .collect::<Vec<_>>()
    });
    let uart = Uart::default();
    let mut node = Node::<_, _, FRAME>::new(
        SimulatedLis3dh::new(script),
        ADDRESS_SA0_LOW,
        uart.clone(),
        NodeConfig::default(),
    );
    node.start(0, &mut NoopDelay).unwrap();
    let mut t_us = 0u64;
    let mut frames_sent = 0;
    for _ in 0..windows.len() * WINDOW {
        t_us += 20_000;
        match node.sample(t_us, &mut NoopDelay).unwrap() {
            Step::Sampled => continue,
            Step::Sent { .. } => frames_sent += 1,
            other => panic!("the simulated sensor never fails: {other:?}"),
        }
        // Move what the firmware wrote onto the line, damaging it on the way.
        let mut bytes = uart.take();
        match frames_sent {
            // Garbage between the first window and the second.
            2 => bytes.extend_from_slice(b"\x13\x37 line noise \xff\x00\x00"),
            // The second half of the third window loses three bytes.
            6 => drop(bytes.drain(40..43)),
            _ => {}
        }
        line.write_all(&bytes).await.unwrap();
    }
    line.flush().await.unwrap();

    // Windows 1, 2, 4, 5 and 6 arrive; window 3 lost a frame and is skipped, not half-filled.
    let mut received = Vec::new();
    while received.len() < 5 {
        let result = tokio::time::timeout(Duration::from_secs(20), results.recv())
            .await
            .expect("a result in time")
            .expect("the agent is running");
        assert_eq!(result.stage, Stage::Edge);
        received.push(result.class.expect("a class"));
    }
    let survivors: Vec<u32> = [0, 1, 3, 4, 5].iter().map(|&i| expected[i]).collect();
    assert_eq!(
        received, survivors,
        "agent classes vs the model on the same windows"
    );
    let correct = [0, 1, 3, 4, 5]
        .iter()
        .zip(&received)
        .filter(|&(&i, &class)| labels[chosen[i]] == i64::from(class))
        .count();
    assert!(
        correct >= 4,
        "{correct} of 5 windows classified as labelled"
    );
    assert!(
        agent.stats.bad_frames.load(Relaxed) >= 2,
        "the garbage and the damaged frame are counted"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), results.recv())
            .await
            .is_err(),
        "no window spans the lost frame"
    );
}
