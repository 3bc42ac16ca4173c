//! Sensor frames from firmware to an agent over a byte stream (UART, USB CDC, a pipe).
//!
//! On the wire a frame is `COBS(postcard(frame) || crc32c_le(postcard(frame))) || 0x00`:
//!
//! - postcard keeps frames small and needs no allocator, so a microcontroller can write them;
//! - CRC-32C catches bytes corrupted on the line;
//! - COBS removes every `0x00` from the encoded body, so `0x00` marks frame ends and a reader that
//!   starts mid-stream, or loses bytes, resynchronises at the next `0x00`.
//!
//! [`FrameDecoder`] is the reading side: feed it whatever bytes arrive, get frames back, and learn
//! what was dropped (corrupt frames, overflows) and what went missing (gaps in sequence numbers).
//! Nothing here allocates.

use core::fmt;

use serde::{Deserialize, Serialize};

/// CRC-32C (Castagnoli): better error detection than CRC-32 on short frames, cheap in software.
pub const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Largest encoded frame (COBS overhead and the trailing zero included) a default decoder accepts.
pub const MAX_ENCODED_FRAME: usize = 1024;

/// Bytes an encoded frame needs for a postcard body of `body_len` bytes.
pub const fn encoded_len(body_len: usize) -> usize {
    let with_crc = body_len + 4;
    // COBS adds one byte per 254 and one leading code byte; then the 0x00 terminator.
    with_crc + with_crc / 254 + 1 + 1
}

/// Physical unit of sample values after scaling. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    /// Standard gravity (accelerometers).
    StandardGravity,
    /// Degrees per second (gyroscopes).
    DegreesPerSecond,
    /// Degrees Celsius.
    Celsius,
    /// Unscaled counts.
    Raw,
}

/// Sent once at start-up: who is talking, and how to read its samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hello<'a> {
    /// Firmware name and version, e.g. `cascade-firmware 0.1.0`.
    pub firmware: &'a str,
    /// Sensor part, e.g. `LIS3DH`.
    pub sensor: &'a str,
    /// Output data rate, samples per second per channel.
    pub rate_hz: u16,
    /// Channels per sample (3 for an accelerometer).
    pub channels: u8,
    /// Physical value of one count, in `unit`.
    pub scale: f32,
    /// Unit after scaling.
    pub unit: Unit,
}

/// A block of consecutive samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Samples<'a> {
    /// Frame sequence number; increments by one per `Samples` or `Fault` frame.
    pub seq: u32,
    /// Sensor time of the first sample, microseconds since boot.
    pub t_us: u64,
    /// Channels per sample; `data` is interleaved (x0 y0 z0 x1 y1 z1 ...).
    pub channels: u8,
    /// Physical value of one count.
    pub scale: f32,
    /// Samples as little-endian `i16`.
    #[serde(borrow)]
    pub data: &'a [u8],
}

impl<'a> Samples<'a> {
    /// Whole samples (each `channels` values) in the frame.
    pub fn sample_count(&self) -> usize {
        self.data.len() / 2 / usize::from(self.channels.max(1))
    }

    /// The raw counts, in order.
    pub fn values(&self) -> impl Iterator<Item = i16> + 'a {
        self.data
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
    }

    /// The values in physical units (`count * scale`).
    pub fn scaled(&self) -> impl Iterator<Item = f32> + 'a {
        let scale = self.scale;
        self.values().map(move |v| f32::from(v) * scale)
    }
}

/// What went wrong on the sensor side. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultCode {
    /// The sensor did not acknowledge its address or a byte.
    BusNack,
    /// Arbitration loss, bus error, or another bus-level failure.
    BusError,
    /// The sensor did not answer in time.
    Timeout,
    /// Samples were lost because the sensor's FIFO overran.
    Overrun,
    /// The device at the address is not the expected sensor (wrong WHO_AM_I).
    WrongDevice,
}

/// The firmware gave up on a read after retrying; sent instead of samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Frame sequence number (shared with `Samples`).
    pub seq: u32,
    /// Sensor time, microseconds since boot.
    pub t_us: u64,
    /// What failed.
    pub code: FaultCode,
    /// Attempts made before giving up.
    pub attempts: u8,
}

/// A frame on the sensor link. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// Start-up announcement.
    #[serde(borrow)]
    Hello(Hello<'a>),
    /// Sample block.
    #[serde(borrow)]
    Samples(Samples<'a>),
    /// Read failure.
    Fault(Fault),
}

impl Frame<'_> {
    /// The sequence number, for frames that carry one.
    pub fn seq(&self) -> Option<u32> {
        match self {
            Frame::Hello(_) => None,
            Frame::Samples(s) => Some(s.seq),
            Frame::Fault(f) => Some(f.seq),
        }
    }

    fn validate(&self) -> Result<(), FrameError> {
        match self {
            Frame::Samples(s) => {
                let stride = 2 * usize::from(s.channels);
                if s.channels == 0 || s.data.len() % stride != 0 || !s.scale.is_finite() {
                    return Err(FrameError::Invalid);
                }
                Ok(())
            }
            Frame::Hello(h) if h.channels == 0 || !h.scale.is_finite() => Err(FrameError::Invalid),
            Frame::Hello(_) | Frame::Fault(_) => Ok(()),
        }
    }
}

/// Why a frame could not be written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The output buffer is too small for the encoded frame.
    #[error("output buffer too small for the encoded frame")]
    BufferTooSmall,
    /// No frame end within the decoder's buffer: the bytes were discarded up to the next `0x00`.
    #[error("frame longer than the decoder buffer; discarded up to the next frame boundary")]
    Overflow,
    /// Not valid COBS (a lost or corrupted byte).
    #[error("frame is not valid COBS (bytes lost or corrupted on the line)")]
    Cobs,
    /// Shorter than a CRC.
    #[error("frame too short to hold a body and CRC")]
    TooShort,
    /// The CRC does not match (bytes corrupted on the line).
    #[error("frame CRC mismatch (bytes corrupted on the line)")]
    Crc,
    /// The CRC matched but the body is not a frame (a different protocol version?).
    #[error("frame body does not decode (firmware speaking another protocol version?)")]
    Malformed,
    /// The body decoded but is inconsistent (zero channels, ragged sample data, NaN scale).
    #[error("frame is inconsistent (zero channels, ragged sample data or non-finite scale)")]
    Invalid,
}

/// Writes `frame` into `buf` as `COBS(body || crc) || 0x00`; returns the bytes to send.
pub fn encode<'b>(frame: &Frame<'_>, buf: &'b mut [u8]) -> Result<&'b mut [u8], FrameError> {
    use postcard::ser_flavors::{Cobs, Slice, crc::CrcModifier};
    let cobs = Cobs::try_new(Slice::new(buf)).map_err(|_| FrameError::BufferTooSmall)?;
    postcard::serialize_with_flavor(frame, CrcModifier::new(cobs, CRC.digest()))
        .map_err(|_| FrameError::BufferTooSmall)
}

/// Decodes one frame from its COBS bytes (without the trailing `0x00`), in place.
pub fn decode_in_place(encoded: &mut [u8]) -> Result<Frame<'_>, FrameError> {
    let len = cobs::decode_in_place(encoded).map_err(|_| FrameError::Cobs)?;
    if len < 5 {
        return Err(FrameError::TooShort);
    }
    let (body, crc) = encoded[..len].split_at(len - 4);
    if CRC.checksum(body).to_le_bytes() != crc {
        return Err(FrameError::Crc);
    }
    let frame = match postcard::take_from_bytes::<Frame<'_>>(body) {
        Ok((frame, [])) => frame,
        _ => return Err(FrameError::Malformed),
    };
    frame.validate()?;
    Ok(frame)
}

/// What a decoder saw so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecoderStats {
    /// Frames decoded.
    pub frames: u64,
    /// Frames dropped as corrupt (COBS, CRC, body) or too long.
    pub dropped: u64,
    /// Frames that never arrived, judged from gaps in sequence numbers.
    pub lost: u64,
}

/// The result of feeding bytes to a [`FrameDecoder`].
#[derive(Debug)]
pub enum Feed<'d, 'i> {
    /// All input was consumed without completing a frame.
    Consumed,
    /// A frame; feed `rest` next.
    Frame {
        /// The frame, borrowing the decoder's buffer.
        frame: Frame<'d>,
        /// Input not yet consumed.
        rest: &'i [u8],
    },
    /// A frame was dropped; feed `rest` next.
    Dropped {
        /// Why.
        error: FrameError,
        /// Input not yet consumed.
        rest: &'i [u8],
    },
}

/// Reassembles frames from a byte stream, resynchronising after garbage or lost bytes.
///
/// `N` bounds the encoded frame length; longer runs without a `0x00` are dropped as
/// [`FrameError::Overflow`].
pub struct FrameDecoder<const N: usize = MAX_ENCODED_FRAME> {
    buf: [u8; N],
    len: usize,
    discarding: bool,
    last_seq: Option<u32>,
    stats: DecoderStats,
}

impl<const N: usize> Default for FrameDecoder<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Debug for FrameDecoder<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &self.len)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<const N: usize> FrameDecoder<N> {
    /// An empty decoder.
    pub const fn new() -> Self {
        FrameDecoder {
            buf: [0; N],
            len: 0,
            discarding: false,
            last_seq: None,
            stats: DecoderStats {
                frames: 0,
                dropped: 0,
                lost: 0,
            },
        }
    }

    /// Counts so far.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Consumes bytes up to the next complete frame or drop, and reports it.
    ///
    /// Call again with `rest` until it returns [`Feed::Consumed`].
    pub fn feed<'d, 'i>(&'d mut self, input: &'i [u8]) -> Feed<'d, 'i> {
        for (i, &byte) in input.iter().enumerate() {
            if byte != 0 {
                if self.discarding {
                    continue;
                }
                if self.len == N {
                    self.discarding = true;
                    continue;
                }
                self.buf[self.len] = byte;
                self.len += 1;
                continue;
            }
            let rest = &input[i + 1..];
            let len = core::mem::take(&mut self.len);
            if core::mem::take(&mut self.discarding) {
                self.stats.dropped += 1;
                return Feed::Dropped {
                    error: FrameError::Overflow,
                    rest,
                };
            }
            if len == 0 {
                // Back-to-back zeros: an idle line or a sender flushing. Not a frame.
                continue;
            }
            let Self {
                buf,
                last_seq,
                stats,
                ..
            } = self;
            return match decode_in_place(&mut buf[..len]) {
                Ok(frame) => {
                    stats.frames += 1;
                    stats.lost += track_sequence(last_seq, &frame);
                    Feed::Frame { frame, rest }
                }
                Err(error) => {
                    stats.dropped += 1;
                    Feed::Dropped { error, rest }
                }
            };
        }
        Feed::Consumed
    }
}

/// Updates the last sequence number; returns how many frames the gap says were lost.
fn track_sequence(last: &mut Option<u32>, frame: &Frame<'_>) -> u64 {
    if let Frame::Hello(_) = frame {
        // The firmware restarted: its counter starts again.
        *last = None;
        return 0;
    }
    let Some(seq) = frame.seq() else { return 0 };
    let lost = match *last {
        // A gap forward (modulo wrap-around) is loss; a jump backwards is a restart we missed.
        Some(prev) => {
            let gap = seq.wrapping_sub(prev).wrapping_sub(1);
            if gap < u32::MAX / 2 {
                u64::from(gap)
            } else {
                0
            }
        }
        None => 0,
    };
    *last = Some(seq);
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(seq: u32, data: &[u8]) -> Frame<'_> {
        Frame::Samples(Samples {
            seq,
            t_us: 1_000 * u64::from(seq),
            channels: 3,
            scale: 0.001,
            data,
        })
    }

    /// Encodes frames back to back into `out`; returns the length used.
    fn stream(frames: &[Frame<'_>], out: &mut [u8]) -> usize {
        let mut at = 0;
        for f in frames {
            let n = encode(f, &mut out[at..]).unwrap().len();
            at += n;
        }
        at
    }

    /// Feeds `input` in one go; collects sequence numbers of decoded frames and drop reasons.
    fn decode_all<const N: usize>(
        dec: &mut FrameDecoder<N>,
        mut input: &[u8],
        seqs: &mut [u32; 16],
        drops: &mut [Option<FrameError>; 16],
    ) -> (usize, usize) {
        let (mut nf, mut nd) = (0, 0);
        loop {
            match dec.feed(input) {
                Feed::Consumed => return (nf, nd),
                Feed::Frame { frame, rest } => {
                    seqs[nf] = frame.seq().unwrap_or(u32::MAX);
                    nf += 1;
                    input = rest;
                }
                Feed::Dropped { error, rest } => {
                    drops[nd] = Some(error);
                    nd += 1;
                    input = rest;
                }
            }
        }
    }

    #[test]
    fn round_trips_every_frame_kind() {
        let data = [1u8, 0, 2, 0, 3, 0, 0xff, 0x7f, 0, 0x80, 0, 0];
        let frames = [
            Frame::Hello(Hello {
                firmware: "cascade-firmware 0.1.0",
                sensor: "LIS3DH",
                rate_hz: 100,
                channels: 3,
                scale: 0.001,
                unit: Unit::StandardGravity,
            }),
            samples(7, &data),
            Frame::Fault(Fault {
                seq: 8,
                t_us: 9,
                code: FaultCode::BusNack,
                attempts: 3,
            }),
        ];
        for frame in &frames {
            let mut buf = [0u8; 128];
            let encoded = encode(frame, &mut buf).unwrap();
            assert_eq!(encoded.last(), Some(&0));
            assert!(
                !encoded[..encoded.len() - 1].contains(&0),
                "COBS leaves no zero"
            );
            let n = encoded.len() - 1;
            assert_eq!(decode_in_place(&mut encoded[..n]).unwrap(), *frame);
        }
    }

    #[test]
    fn samples_read_back_as_values() {
        let data = [1u8, 0, 0xff, 0xff, 0, 0x80];
        let Frame::Samples(s) = samples(0, &data) else {
            unreachable!()
        };
        let mut values = s.values();
        assert_eq!(values.next(), Some(1));
        assert_eq!(values.next(), Some(-1));
        assert_eq!(values.next(), Some(i16::MIN));
        assert_eq!(s.sample_count(), 1);
    }

    #[test]
    fn encoded_len_bounds_the_output() {
        let data = [0x55u8; 600];
        let frame = samples(1, &data);
        let mut buf = [0u8; 1024];
        let n = encode(&frame, &mut buf).unwrap().len();
        let body = postcard::to_slice(&frame, &mut [0u8; 1024]).unwrap().len();
        assert!(n <= encoded_len(body), "{n} > {}", encoded_len(body));
    }

    #[test]
    fn too_small_buffer_is_an_error() {
        let data = [0u8; 60];
        assert_eq!(
            encode(&samples(1, &data), &mut [0u8; 16]),
            Err(FrameError::BufferTooSmall)
        );
    }

    #[test]
    fn resynchronises_after_leading_garbage() {
        let data = [0u8; 6];
        let mut wire = [0u8; 256];
        let garbage = [0x13u8, 0x37, 0xaa, 0x00, 0x42];
        wire[..garbage.len()].copy_from_slice(&garbage);
        let n = garbage.len()
            + stream(
                &[samples(1, &data), samples(2, &data)],
                &mut wire[garbage.len()..],
            );
        let mut dec: FrameDecoder = FrameDecoder::new();
        let (mut seqs, mut drops) = ([0; 16], [None; 16]);
        let (nf, nd) = decode_all(&mut dec, &wire[..n], &mut seqs, &mut drops);
        // "13 37 aa 00" is one bad frame; "42" glues onto the first real frame, which is lost.
        assert_eq!((nf, nd), (1, 2), "{drops:?}");
        assert_eq!(seqs[0], 2);
        assert_eq!(dec.stats().dropped, 2);
    }

    #[test]
    fn a_corrupted_byte_drops_one_frame_and_counts_the_gap() {
        let data = [5u8; 12];
        let mut wire = [0u8; 256];
        let n = stream(
            &[samples(1, &data), samples(2, &data), samples(3, &data)],
            &mut wire,
        );
        let first_end = wire.iter().position(|&b| b == 0).unwrap();
        // Change one byte inside the second frame to another non-zero value.
        let at = first_end + 5;
        wire[at] = if wire[at] == 0x7f { 0x7e } else { 0x7f };
        let mut dec: FrameDecoder = FrameDecoder::new();
        let (mut seqs, mut drops) = ([0; 16], [None; 16]);
        let (nf, nd) = decode_all(&mut dec, &wire[..n], &mut seqs, &mut drops);
        assert_eq!((nf, nd), (2, 1));
        assert_eq!(&seqs[..2], &[1, 3]);
        assert!(matches!(drops[0], Some(FrameError::Crc | FrameError::Cobs)));
        assert_eq!(dec.stats().lost, 1);
    }

    #[test]
    fn overflow_discards_to_the_next_boundary() {
        let data = [9u8; 30];
        let mut wire = [0x11u8; 200];
        wire[99] = 0;
        let n = 100 + stream(&[samples(4, &data)], &mut wire[100..]);
        let mut dec: FrameDecoder<64> = FrameDecoder::new();
        let (mut seqs, mut drops) = ([0; 16], [None; 16]);
        let (nf, nd) = decode_all(&mut dec, &wire[..n], &mut seqs, &mut drops);
        assert_eq!((nf, nd), (1, 1));
        assert_eq!(drops[0], Some(FrameError::Overflow));
        assert_eq!(seqs[0], 4);
    }

    #[test]
    fn byte_at_a_time_feeding_gives_the_same_frames() {
        let data = [3u8; 18];
        let mut wire = [0u8; 256];
        let n = stream(&[samples(10, &data), samples(11, &data)], &mut wire);
        let mut dec: FrameDecoder = FrameDecoder::new();
        let mut seen = 0;
        for b in &wire[..n] {
            if let Feed::Frame { frame, .. } = dec.feed(core::slice::from_ref(b)) {
                assert_eq!(frame.seq(), Some(10 + seen));
                seen += 1;
            }
        }
        assert_eq!(seen, 2);
    }

    #[test]
    fn hello_resets_sequence_tracking() {
        let mut last = Some(100);
        let hello = Frame::Hello(Hello {
            firmware: "f",
            sensor: "s",
            rate_hz: 1,
            channels: 1,
            scale: 1.0,
            unit: Unit::Raw,
        });
        assert_eq!(track_sequence(&mut last, &hello), 0);
        assert_eq!(track_sequence(&mut last, &samples(0, &[])), 0);
        assert_eq!(track_sequence(&mut last, &samples(5, &[])), 4);
        assert_eq!(
            track_sequence(&mut last, &samples(2, &[])),
            0,
            "backwards: restart"
        );
    }

    #[test]
    fn inconsistent_frames_are_invalid() {
        let ragged = [1u8, 2, 3];
        let mut buf = [0u8; 64];
        let encoded = encode(&samples(1, &ragged), &mut buf).unwrap();
        let n = encoded.len() - 1;
        assert_eq!(decode_in_place(&mut encoded[..n]), Err(FrameError::Invalid));
    }
}
