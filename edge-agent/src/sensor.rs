//! Readings from a sensor link: firmware frames (postcard + CRC + COBS) turned into owned events.
//!
//! The byte-level work (framing, CRC, resynchronisation) is cascade-proto's [`FrameDecoder`]; this
//! module turns its borrowed frames into values that outlive the read buffer and serialize as JSON.

use cascade_proto::frame::{DecoderStats, FaultCode, Feed, Frame, FrameDecoder, Unit};
use serde::Serialize;

/// Something that came over the sensor link.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SensorEvent {
    /// The firmware (re)started and describes its sensor.
    Hello {
        /// Firmware name and version.
        firmware: String,
        /// Sensor part.
        sensor: String,
        /// Samples per second per channel.
        rate_hz: u16,
        /// Channels per sample.
        channels: u8,
        /// Physical value of one count.
        scale: f32,
        /// Unit after scaling.
        unit: &'static str,
    },
    /// A block of samples, scaled to physical units, interleaved by channel.
    Samples {
        /// Frame sequence number.
        seq: u32,
        /// Sensor time of the first sample, microseconds since boot.
        t_us: u64,
        /// Channels per sample.
        channels: u8,
        /// Values in physical units.
        values: Vec<f32>,
    },
    /// The firmware could not read its sensor.
    Fault {
        /// Frame sequence number.
        seq: u32,
        /// Sensor time, microseconds since boot.
        t_us: u64,
        /// What failed.
        code: &'static str,
        /// Attempts made.
        attempts: u8,
    },
    /// A frame was corrupt or too long and was dropped.
    Dropped {
        /// Why.
        reason: String,
    },
}

fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::StandardGravity => "g",
        Unit::DegreesPerSecond => "deg/s",
        Unit::Celsius => "degC",
        Unit::Raw => "counts",
    }
}

fn fault_name(code: FaultCode) -> &'static str {
    match code {
        FaultCode::BusNack => "bus_nack",
        FaultCode::BusError => "bus_error",
        FaultCode::Timeout => "timeout",
        FaultCode::Overrun => "overrun",
        FaultCode::WrongDevice => "wrong_device",
    }
}

impl From<Frame<'_>> for SensorEvent {
    fn from(frame: Frame<'_>) -> Self {
        match frame {
            Frame::Hello(h) => SensorEvent::Hello {
                firmware: h.firmware.into(),
                sensor: h.sensor.into(),
                rate_hz: h.rate_hz,
                channels: h.channels,
                scale: h.scale,
                unit: unit_name(h.unit),
            },
            Frame::Samples(s) => SensorEvent::Samples {
                seq: s.seq,
                t_us: s.t_us,
                channels: s.channels,
                values: s.scaled().collect(),
            },
            Frame::Fault(f) => SensorEvent::Fault {
                seq: f.seq,
                t_us: f.t_us,
                code: fault_name(f.code),
                attempts: f.attempts,
            },
        }
    }
}

/// Turns bytes from a sensor link, in reads of any size, into [`SensorEvent`]s.
#[derive(Debug, Default)]
pub struct SensorStream {
    decoder: FrameDecoder,
}

impl SensorStream {
    /// A stream with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes one read's bytes and appends the events they complete to `events`.
    pub fn push(&mut self, mut bytes: &[u8], events: &mut Vec<SensorEvent>) {
        loop {
            match self.decoder.feed(bytes) {
                Feed::Consumed => return,
                Feed::Frame { frame, rest } => {
                    events.push(frame.into());
                    bytes = rest;
                }
                Feed::Dropped { error, rest } => {
                    events.push(SensorEvent::Dropped {
                        reason: error.to_string(),
                    });
                    bytes = rest;
                }
            }
        }
    }

    /// Frames decoded, dropped and lost so far.
    pub fn stats(&self) -> DecoderStats {
        self.decoder.stats()
    }
}

/// Cuts a stream of sample values into model-input windows.
///
/// Values are appended frame by frame; a gap in frame sequence numbers (a lost or corrupt frame)
/// or a fault restarts the window, so no window mixes data from either side of a hole.
#[derive(Debug, Clone)]
pub struct Windower {
    window: usize,
    hop: usize,
    values: std::collections::VecDeque<f32>,
    /// Values still to skip when `hop` exceeds `window`.
    skip: usize,
    next_seq: Option<u32>,
}

impl Windower {
    /// Windows of `window` values, starting every `hop` values (both at least 1).
    pub fn new(window: usize, hop: usize) -> Self {
        Windower {
            window: window.max(1),
            hop: hop.max(1),
            values: std::collections::VecDeque::new(),
            skip: 0,
            next_seq: None,
        }
    }

    /// Adds the values of frame `seq`; returns `true` if frames were missing before it (the
    /// partial window was discarded).
    pub fn push(&mut self, seq: u32, values: &[f32]) -> bool {
        let gap = self.advance(seq);
        for &v in values {
            if self.skip > 0 {
                self.skip -= 1;
            } else {
                self.values.push_back(v);
            }
        }
        gap
    }

    /// Frame `seq` carried no samples (a fault): the window restarts after it.
    pub fn interrupt(&mut self, seq: u32) {
        self.advance(seq);
        self.restart();
    }

    /// Forgets the partial window and the sequence (a new link or a firmware restart).
    pub fn reset(&mut self) {
        self.restart();
        self.next_seq = None;
    }

    fn restart(&mut self) {
        self.values.clear();
        self.skip = 0;
    }

    fn advance(&mut self, seq: u32) -> bool {
        let gap = self.next_seq.is_some_and(|expected| expected != seq);
        if gap {
            self.restart();
        }
        self.next_seq = Some(seq.wrapping_add(1));
        gap
    }

    /// The next complete window, if one is buffered.
    pub fn next_window(&mut self) -> Option<Vec<f32>> {
        if self.values.len() < self.window {
            return None;
        }
        let window: Vec<f32> = self.values.iter().take(self.window).copied().collect();
        let drop = self.hop.min(self.values.len());
        self.values.drain(..drop);
        self.skip = self.hop - drop;
        Some(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::frame::{Samples, encode};

    fn wire(seqs: &[u32]) -> Vec<u8> {
        let data: Vec<u8> = [1000i16, -1000, 500]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = Vec::new();
        for &seq in seqs {
            let frame = Frame::Samples(Samples {
                seq,
                t_us: u64::from(seq) * 10_000,
                channels: 3,
                scale: 0.001,
                data: &data,
            });
            let mut buf = [0u8; 64];
            out.extend_from_slice(encode(&frame, &mut buf).unwrap());
        }
        out
    }

    #[test]
    fn decodes_scaled_samples_across_split_reads() {
        let bytes = wire(&[1, 2, 3]);
        let mut stream = SensorStream::new();
        let mut events = Vec::new();
        for read in bytes.chunks(5) {
            stream.push(read, &mut events);
        }
        assert_eq!(events.len(), 3);
        let SensorEvent::Samples { seq, values, .. } = &events[2] else {
            panic!("expected samples, got {:?}", events[2]);
        };
        assert_eq!(*seq, 3);
        assert_eq!(values, &[1.0, -1.0, 0.5]);
        assert_eq!(stream.stats().frames, 3);
    }

    #[test]
    fn windows_overlap_skip_and_restart_at_gaps() {
        let mut w = Windower::new(4, 2);
        assert!(!w.push(0, &[0.0, 1.0, 2.0]));
        assert_eq!(w.next_window(), None);
        assert!(!w.push(1, &[3.0, 4.0, 5.0]));
        assert_eq!(w.next_window(), Some(vec![0.0, 1.0, 2.0, 3.0]));
        assert_eq!(w.next_window(), Some(vec![2.0, 3.0, 4.0, 5.0]));
        assert_eq!(w.next_window(), None);
        // Frame 2 is missing: the partial window [4, 5] is not joined to frame 3's values.
        assert!(w.push(3, &[10.0, 11.0, 12.0]));
        assert_eq!(w.next_window(), None);
        assert!(!w.push(4, &[13.0]));
        assert_eq!(w.next_window(), Some(vec![10.0, 11.0, 12.0, 13.0]));

        let mut skipping = Windower::new(2, 5);
        skipping.push(0, &[0.0, 1.0, 2.0]);
        assert_eq!(skipping.next_window(), Some(vec![0.0, 1.0]));
        skipping.push(1, &[3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            skipping.next_window(),
            Some(vec![5.0, 6.0]),
            "3 and 4 skipped"
        );

        let mut faulty = Windower::new(2, 2);
        faulty.push(0, &[1.0]);
        faulty.interrupt(1);
        assert!(!faulty.push(2, &[2.0]), "a fault is not a gap");
        assert_eq!(faulty.next_window(), None, "but the window restarted");
    }

    #[test]
    fn reports_dropped_and_lost_frames() {
        let mut bytes = wire(&[1, 2, 3, 4]);
        let second_start = bytes.iter().position(|&b| b == 0).unwrap() + 1;
        bytes.drain(second_start + 2..second_start + 4); // lose two bytes of frame 2
        let mut stream = SensorStream::new();
        let mut events = Vec::new();
        stream.push(&bytes, &mut events);
        let dropped = events
            .iter()
            .filter(|e| matches!(e, SensorEvent::Dropped { .. }))
            .count();
        assert_eq!(dropped, 1, "{events:?}");
        assert_eq!(stream.stats().lost, 1);
        assert_eq!(stream.stats().frames, 3);
    }
}
