//! The sensor node: the LIS3DH, a window of samples and a transmitter, put together.
//!
//! The board's main loop owns the clock and calls [`Node::sample`] at every slot of a
//! [`Schedule`](crate::sampler::Schedule). Each call does a bounded amount of work: at most
//! `attempts` reads, each of at most `ready_polls` status polls, then at most one frame. A sensor
//! that stops answering costs a few retries and a `Fault` frame, never a hang.

use cascade_proto::frame::{FaultCode, Hello, Unit};
use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use crate::lis3dh::{self, Config, DataRate, Lis3dh, Range};
use crate::sampler::Window;
use crate::transmit::{Transmitter, TxError};

/// The firmware's name and version, sent in `Hello`.
pub const FIRMWARE: &str = concat!("cascade-firmware ", env!("CARGO_PKG_VERSION"));

/// How the node samples and how hard it tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConfig {
    /// Sensor rate and range.
    pub sensor: Config,
    /// Reads tried per sample (or start-ups per [`Node::start`]) before a `Fault` frame; at
    /// least 1.
    pub attempts: u8,
    /// Pause between attempts, microseconds.
    pub retry_us: u32,
    /// STATUS_REG polls per read before giving up on a sample as not ready; at least 1.
    pub ready_polls: u8,
    /// Pause between polls, microseconds.
    pub poll_us: u32,
}

impl Default for NodeConfig {
    /// 50 Hz, ±4 g: enough for human motion (most of its energy is below 20 Hz) with headroom
    /// for shakes and taps.
    fn default() -> Self {
        NodeConfig {
            sensor: Config {
                rate: DataRate::Hz50,
                range: Range::G4,
            },
            attempts: 3,
            retry_us: 1_000,
            ready_polls: 4,
            poll_us: 500,
        }
    }
}

/// What one call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The sample went into the window.
    Sampled,
    /// The sample completed the window, which went out as this `Samples` frame.
    Sent {
        /// Its sequence number.
        seq: u32,
    },
    /// The sample could not be read; the partial window was dropped and this `Fault` frame sent.
    Faulted {
        /// Its sequence number.
        seq: u32,
        /// Why.
        code: FaultCode,
    },
}

/// Why the node could not start or send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeError<E> {
    /// The sensor did not start after every attempt; a `Fault` frame said so. Try again later.
    Sensor(FaultCode),
    /// The frame could not be written.
    Tx(TxError<E>),
}

impl<E> From<TxError<E>> for NodeError<E> {
    fn from(e: TxError<E>) -> Self {
        NodeError::Tx(e)
    }
}

/// A sensor node sending windows of `N` samples.
#[derive(Debug)]
pub struct Node<I2C, W, const N: usize> {
    sensor: Lis3dh<I2C>,
    tx: Transmitter<W>,
    window: Window<N>,
    config: NodeConfig,
}

impl<I2C: I2c, W: embedded_io::Write, const N: usize> Node<I2C, W, N> {
    /// A node for the LIS3DH at `address` on `i2c`, sending to `port`. Nothing happens until
    /// [`Node::start`].
    pub fn new(i2c: I2C, address: u8, port: W, config: NodeConfig) -> Self {
        Node {
            sensor: Lis3dh::new(i2c, address),
            tx: Transmitter::new(port),
            window: Window::new(),
            config,
        }
    }

    /// Gives the bus and the port back.
    pub fn release(self) -> (I2C, W) {
        (self.sensor.release(), self.tx.release())
    }

    /// Starts the sensor (retrying) and announces it with `Hello`. On failure a `Fault` frame
    /// goes out and the caller decides when to try again.
    pub fn start(
        &mut self,
        t_us: u64,
        delay: &mut impl DelayNs,
    ) -> Result<(), NodeError<W::Error>> {
        self.window.clear();
        let attempts = self.config.attempts.max(1);
        let mut last = FaultCode::BusError;
        for attempt in 0..attempts {
            if attempt > 0 {
                delay.delay_us(self.config.retry_us);
            }
            match self.sensor.start(self.config.sensor, delay) {
                Ok(()) => {
                    let sensor = self.config.sensor;
                    self.tx.hello(Hello {
                        firmware: FIRMWARE,
                        sensor: "LIS3DH",
                        rate_hz: sensor.rate.hz(),
                        channels: 3,
                        scale: sensor.range.g_per_count(),
                        unit: Unit::StandardGravity,
                    })?;
                    return Ok(());
                }
                // Another part will not turn into an LIS3DH by asking again.
                Err(lis3dh::Error::WrongDevice(_)) => {
                    last = FaultCode::WrongDevice;
                    self.tx.fault(t_us, last, attempt + 1)?;
                    return Err(NodeError::Sensor(last));
                }
                Err(e) => last = fault_code(&e),
            }
        }
        self.tx.fault(t_us, last, attempts)?;
        Err(NodeError::Sensor(last))
    }

    /// Takes the sample for slot `t_us`; sends the window when it fills.
    pub fn sample(
        &mut self,
        t_us: u64,
        delay: &mut impl DelayNs,
    ) -> Result<Step, TxError<W::Error>> {
        let attempts = self.config.attempts.max(1);
        let mut last = FaultCode::BusError;
        for attempt in 0..attempts {
            if attempt > 0 {
                delay.delay_us(self.config.retry_us);
            }
            match self.sensor.read_when_ready(
                self.config.ready_polls.max(1),
                self.config.poll_us,
                delay,
            ) {
                Ok(counts) => {
                    if !self.window.push(t_us, counts) {
                        return Ok(Step::Sampled);
                    }
                    let scale = self.config.sensor.range.g_per_count();
                    let sent =
                        self.tx
                            .samples(self.window.start_us(), 3, scale, self.window.bytes());
                    self.window.clear();
                    return sent.map(|seq| Step::Sent { seq });
                }
                Err(e) => last = fault_code(&e),
            }
        }
        self.fault(t_us, last, attempts)
    }

    /// The loop slept through sample slots before `t_us`: the window would have a hole, so it is
    /// dropped and an `Overrun` fault (no read attempted) tells the receiver not to join data
    /// across it.
    pub fn missed(&mut self, t_us: u64) -> Result<Step, TxError<W::Error>> {
        self.fault(t_us, FaultCode::Overrun, 0)
    }

    fn fault(
        &mut self,
        t_us: u64,
        code: FaultCode,
        attempts: u8,
    ) -> Result<Step, TxError<W::Error>> {
        self.window.clear();
        let seq = self.tx.fault(t_us, code, attempts)?;
        Ok(Step::Faulted { seq, code })
    }
}

/// The wire's name for a driver error.
pub fn fault_code<E: embedded_hal::i2c::Error>(error: &lis3dh::Error<E>) -> FaultCode {
    match error {
        e if e.is_nack() => FaultCode::BusNack,
        lis3dh::Error::Bus(_) => FaultCode::BusError,
        lis3dh::Error::WrongDevice(_) => FaultCode::WrongDevice,
        lis3dh::Error::NotReady => FaultCode::Timeout,
    }
}
