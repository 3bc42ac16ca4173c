//! Frames out over a byte stream: cascade-proto's sensor frame encoding (postcard, CRC-32C, COBS)
//! written to any `embedded_io::Write` (a UART, a USB CDC port, a host pipe in tests).

use cascade_proto::frame::{Fault, FaultCode, Frame, FrameError, Hello, Samples, encode};

/// Why a frame did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxError<E> {
    /// The frame does not fit the transmit buffer (a window too large for `N`).
    Encode(FrameError),
    /// The port refused the bytes.
    Port(E),
}

/// Writes frames to `port`, numbering `Samples` and `Fault` frames.
///
/// `N` bounds one encoded frame; 512 bytes hold 80 three-axis samples.
#[derive(Debug)]
pub struct Transmitter<W, const N: usize = 512> {
    port: W,
    buf: [u8; N],
    seq: u32,
}

impl<W: embedded_io::Write, const N: usize> Transmitter<W, N> {
    /// A transmitter whose first numbered frame is 0.
    pub fn new(port: W) -> Self {
        Transmitter {
            port,
            buf: [0; N],
            seq: 0,
        }
    }

    /// Gives the port back.
    pub fn release(self) -> W {
        self.port
    }

    /// The sequence number the next `Samples` or `Fault` frame gets.
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// Announces the firmware and its sensor (unnumbered).
    pub fn hello(&mut self, hello: Hello<'_>) -> Result<(), TxError<W::Error>> {
        self.send(&Frame::Hello(hello))
    }

    /// Sends a block of samples (`data`: little-endian `i16`, channels interleaved); returns its
    /// sequence number.
    pub fn samples(
        &mut self,
        t_us: u64,
        channels: u8,
        scale: f32,
        data: &[u8],
    ) -> Result<u32, TxError<W::Error>> {
        self.numbered(|seq| {
            Frame::Samples(Samples {
                seq,
                t_us,
                channels,
                scale,
                data,
            })
        })
    }

    /// Reports a failure instead of samples; returns its sequence number.
    pub fn fault(
        &mut self,
        t_us: u64,
        code: FaultCode,
        attempts: u8,
    ) -> Result<u32, TxError<W::Error>> {
        self.numbered(|seq| {
            Frame::Fault(Fault {
                seq,
                t_us,
                code,
                attempts,
            })
        })
    }

    /// The number is used up even when the write fails: the receiver then sees a gap and knows
    /// a frame is missing, instead of two different frames with the same number.
    fn numbered<'a>(
        &mut self,
        frame: impl FnOnce(u32) -> Frame<'a>,
    ) -> Result<u32, TxError<W::Error>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.send(&frame(seq)).map(|()| seq)
    }

    fn send(&mut self, frame: &Frame<'_>) -> Result<(), TxError<W::Error>> {
        let bytes = encode(frame, &mut self.buf).map_err(TxError::Encode)?;
        self.port.write_all(bytes).map_err(TxError::Port)?;
        self.port.flush().map_err(TxError::Port)
    }
}
