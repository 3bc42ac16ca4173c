//! Driver for the ST LIS3DH 3-axis accelerometer over I2C.
//!
//! References, cited by section below:
//! - [DS] LIS3DH datasheet, DocID17530 (ST). Sections are cited by title ("Registers description,
//!   CTRL_REG1 (20h)"), which is stable across revisions where the section numbers are not.
//! - [AN] AN3308 "LIS3DH: MEMS digital output motion sensor", application note (ST).
//!
//! The driver takes the bus by value (so the type system says who owns it) and does only what the
//! sampler needs: check the part, configure rate, range and high-resolution mode, poll for data and
//! read one X/Y/Z sample. Every operation is a bounded number of bus transactions: nothing here
//! waits for the sensor without a limit.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{ErrorKind, I2c};

/// 7-bit I2C address with the SDO/SA0 pin tied low ([DS] "I2C operation": `0011000b`).
pub const ADDRESS_SA0_LOW: u8 = 0x18;
/// 7-bit I2C address with the SDO/SA0 pin tied high (`0011001b`).
pub const ADDRESS_SA0_HIGH: u8 = 0x19;

/// The fixed content of `WHO_AM_I` ([DS] "WHO_AM_I (0Fh)").
pub const DEVICE_ID: u8 = 0x33;

/// Register addresses ([DS] "Register mapping").
mod reg {
    pub const WHO_AM_I: u8 = 0x0F;
    pub const CTRL_REG1: u8 = 0x20;
    pub const CTRL_REG4: u8 = 0x23;
    pub const STATUS_REG: u8 = 0x27;
    pub const OUT_X_L: u8 = 0x28;
}

/// Setting the sub-address MSB makes a multi-byte read walk consecutive registers
/// ([DS] "I2C operation": "to read multiple bytes, it is necessary to assert the most significant bit of
/// the sub-address field").
const AUTO_INCREMENT: u8 = 0x80;

/// CTRL_REG1 bits 2..0: Zen, Yen, Xen ([DS] "CTRL_REG1 (20h)").
const XYZ_ENABLE: u8 = 0b111;
/// CTRL_REG4 bit 7: block data update, so the high and low bytes of one axis always belong to the
/// same sample ([DS] "CTRL_REG4 (23h)").
const BDU: u8 = 1 << 7;
/// CTRL_REG4 bit 3: high-resolution (12-bit) output.
const HR: u8 = 1 << 3;
/// STATUS_REG bit 3: a new X, Y and Z sample is available ([DS] "STATUS_REG (27h)").
const ZYXDA: u8 = 1 << 3;
/// STATUS_REG bit 7: a new sample overwrote one that was never read.
const ZYXOR: u8 = 1 << 7;

/// Boot time after power-up before registers can be written ([DS] "Electrical characteristics":
/// the boot procedure takes 5 ms).
const BOOT_MS: u32 = 5;

/// Output data rate, CTRL_REG1 ODR[3:0] ([DS] "CTRL_REG1 (20h)", table "Data rate
/// configuration").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRate {
    /// 1 Hz.
    Hz1,
    /// 10 Hz.
    Hz10,
    /// 25 Hz.
    Hz25,
    /// 50 Hz.
    Hz50,
    /// 100 Hz.
    Hz100,
    /// 200 Hz.
    Hz200,
    /// 400 Hz.
    Hz400,
}

impl DataRate {
    /// The ODR[3:0] code.
    const fn bits(self) -> u8 {
        match self {
            DataRate::Hz1 => 0b0001,
            DataRate::Hz10 => 0b0010,
            DataRate::Hz25 => 0b0011,
            DataRate::Hz50 => 0b0100,
            DataRate::Hz100 => 0b0101,
            DataRate::Hz200 => 0b0110,
            DataRate::Hz400 => 0b0111,
        }
    }

    /// Samples per second.
    pub const fn hz(self) -> u16 {
        match self {
            DataRate::Hz1 => 1,
            DataRate::Hz10 => 10,
            DataRate::Hz25 => 25,
            DataRate::Hz50 => 50,
            DataRate::Hz100 => 100,
            DataRate::Hz200 => 200,
            DataRate::Hz400 => 400,
        }
    }

    /// Microseconds between samples.
    pub const fn period_us(self) -> u32 {
        1_000_000 / self.hz() as u32
    }
}

/// Full-scale range, CTRL_REG4 FS[1:0] ([DS] "CTRL_REG4 (23h)").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// ±2 g.
    G2,
    /// ±4 g.
    G4,
    /// ±8 g.
    G8,
    /// ±16 g.
    G16,
}

impl Range {
    const fn bits(self) -> u8 {
        match self {
            Range::G2 => 0b00,
            Range::G4 => 0b01,
            Range::G8 => 0b10,
            Range::G16 => 0b11,
        }
    }

    /// Sensitivity of the 12-bit high-resolution output, in milli-g per count ([DS]
    /// "Mechanical characteristics", So in high-resolution mode: 1, 2, 4 and 12 mg/digit).
    pub const fn mg_per_count(self) -> u16 {
        match self {
            Range::G2 => 1,
            Range::G4 => 2,
            Range::G8 => 4,
            Range::G16 => 12,
        }
    }

    /// Standard gravity per count.
    pub fn g_per_count(self) -> f32 {
        f32::from(self.mg_per_count()) / 1000.0
    }
}

/// How to run the sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Output data rate.
    pub rate: DataRate,
    /// Full-scale range.
    pub range: Range,
}

impl Config {
    /// CTRL_REG1: the rate, normal (not low-power) mode, all three axes on.
    pub const fn ctrl_reg1(&self) -> u8 {
        (self.rate.bits() << 4) | XYZ_ENABLE
    }

    /// CTRL_REG4: block data update, the range, high-resolution mode.
    pub const fn ctrl_reg4(&self) -> u8 {
        BDU | (self.range.bits() << 4) | HR
    }

    /// Time from enabling high-resolution mode to valid data: 7/ODR ([DS] "Operating modes", table
    /// "Turn-on time for operating mode transition"), rounded up to whole milliseconds.
    pub const fn turn_on_ms(&self) -> u32 {
        7000u32.div_ceil(self.rate.hz() as u32)
    }
}

/// A driver error, generic over the bus error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus failed (NACK, arbitration loss, ...).
    Bus(E),
    /// `WHO_AM_I` held this instead of [`DEVICE_ID`]: another part, or the wrong address.
    WrongDevice(u8),
    /// The sensor reported no new sample within the allowed polls.
    NotReady,
}

impl<E: embedded_hal::i2c::Error> Error<E> {
    /// True when the sensor did not acknowledge: absent, unpowered or at another address.
    pub fn is_nack(&self) -> bool {
        matches!(self, Error::Bus(e) if matches!(e.kind(), ErrorKind::NoAcknowledge(_)))
    }
}

/// STATUS_REG, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// A new X/Y/Z sample is ready.
    pub ready: bool,
    /// A sample was overwritten before it was read.
    pub overrun: bool,
}

/// An LIS3DH on an I2C bus.
#[derive(Debug)]
pub struct Lis3dh<I2C> {
    i2c: I2C,
    address: u8,
    config: Option<Config>,
}

impl<I2C: I2c> Lis3dh<I2C> {
    /// A driver for the sensor at `address` ([`ADDRESS_SA0_LOW`] or [`ADDRESS_SA0_HIGH`]).
    /// Talks to nothing until [`Lis3dh::start`].
    pub fn new(i2c: I2C, address: u8) -> Self {
        Lis3dh {
            i2c,
            address,
            config: None,
        }
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// The configuration in effect, once started.
    pub fn config(&self) -> Option<Config> {
        self.config
    }

    /// Checks the part and configures it, following [AN] "Startup sequence": wait for boot,
    /// write CTRL_REG1 (rate, axes), then CTRL_REG4 (BDU, range, HR), then wait the turn-on time
    /// so the first sample read is valid.
    ///
    /// The registers this driver depends on are all written, so a restart of the microcontroller
    /// without a power cycle of the sensor starts from the same state.
    pub fn start(
        &mut self,
        config: Config,
        delay: &mut impl DelayNs,
    ) -> Result<(), Error<I2C::Error>> {
        self.config = None;
        delay.delay_ms(BOOT_MS);
        let id = self.read_register(reg::WHO_AM_I)?;
        if id != DEVICE_ID {
            return Err(Error::WrongDevice(id));
        }
        self.write_register(reg::CTRL_REG1, config.ctrl_reg1())?;
        self.write_register(reg::CTRL_REG4, config.ctrl_reg4())?;
        delay.delay_ms(config.turn_on_ms());
        self.config = Some(config);
        Ok(())
    }

    /// Reads STATUS_REG.
    pub fn status(&mut self) -> Result<Status, Error<I2C::Error>> {
        let status = self.read_register(reg::STATUS_REG)?;
        Ok(Status {
            ready: status & ZYXDA != 0,
            overrun: status & ZYXOR != 0,
        })
    }

    /// Reads one sample in counts (12-bit, sign-extended) with one 6-byte burst from OUT_X_L.
    ///
    /// The output registers hold left-justified two's complement ([DS] "OUT_X_L (28h),
    /// OUT_X_H (29h)"); in high-resolution mode the top 12 bits are the value, so an arithmetic
    /// shift right by 4 gives counts of [`Range::mg_per_count`].
    pub fn read_counts(&mut self) -> Result<[i16; 3], Error<I2C::Error>> {
        let mut raw = [0u8; 6];
        self.i2c
            .write_read(self.address, &[reg::OUT_X_L | AUTO_INCREMENT], &mut raw)
            .map_err(Error::Bus)?;
        Ok([
            i16::from_le_bytes([raw[0], raw[1]]) >> 4,
            i16::from_le_bytes([raw[2], raw[3]]) >> 4,
            i16::from_le_bytes([raw[4], raw[5]]) >> 4,
        ])
    }

    /// Polls STATUS_REG up to `polls` times, `poll_us` apart, then reads the sample.
    pub fn read_when_ready(
        &mut self,
        polls: u8,
        poll_us: u32,
        delay: &mut impl DelayNs,
    ) -> Result<[i16; 3], Error<I2C::Error>> {
        for attempt in 0..polls {
            if attempt > 0 {
                delay.delay_us(poll_us);
            }
            if self.status()?.ready {
                return self.read_counts();
            }
        }
        Err(Error::NotReady)
    }

    fn read_register(&mut self, register: u8) -> Result<u8, Error<I2C::Error>> {
        let mut value = [0u8];
        self.i2c
            .write_read(self.address, &[register], &mut value)
            .map_err(Error::Bus)?;
        Ok(value[0])
    }

    fn write_register(&mut self, register: u8, value: u8) -> Result<(), Error<I2C::Error>> {
        self.i2c
            .write(self.address, &[register, value])
            .map_err(Error::Bus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::NoAcknowledgeSource;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

    const A: u8 = ADDRESS_SA0_LOW;
    const CONFIG: Config = Config {
        rate: DataRate::Hz50,
        range: Range::G4,
    };

    #[test]
    fn register_values_follow_the_datasheet() {
        // ODR 50 Hz = 0100, Zen|Yen|Xen.
        assert_eq!(CONFIG.ctrl_reg1(), 0x47);
        // BDU, FS = 01 (±4 g), HR.
        assert_eq!(CONFIG.ctrl_reg4(), 0b1001_1000);
        assert_eq!(CONFIG.turn_on_ms(), 140);
        assert_eq!(DataRate::Hz400.period_us(), 2500);
    }

    #[test]
    fn start_checks_the_part_then_writes_ctrl_reg1_before_ctrl_reg4() {
        let expectations = [
            Transaction::write_read(A, vec![0x0F], vec![DEVICE_ID]),
            Transaction::write(A, vec![0x20, 0x47]),
            Transaction::write(A, vec![0x23, 0x98]),
        ];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Lis3dh::new(i2c.clone(), A);
        sensor.start(CONFIG, &mut NoopDelay).unwrap();
        assert_eq!(sensor.config(), Some(CONFIG));
        i2c.done();
    }

    #[test]
    fn another_part_is_refused_before_anything_is_written() {
        // 0x32 is the LIS331DLH's WHO_AM_I, a part with another register layout.
        let expectations = [Transaction::write_read(A, vec![0x0F], vec![0x32])];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Lis3dh::new(i2c.clone(), A);
        assert_eq!(
            sensor.start(CONFIG, &mut NoopDelay),
            Err(Error::WrongDevice(0x32))
        );
        assert_eq!(sensor.config(), None);
        i2c.done();
    }

    #[test]
    fn a_missing_sensor_is_a_nack() {
        let expectations = [Transaction::write_read(A, vec![0x0F], vec![0])
            .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address))];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Lis3dh::new(i2c.clone(), A);
        let error = sensor.start(CONFIG, &mut NoopDelay).unwrap_err();
        assert!(error.is_nack(), "{error:?}");
        i2c.done();
    }

    #[test]
    fn samples_are_read_in_one_auto_incrementing_burst_and_sign_extended() {
        // x = +1000 counts, y = -1 count, z = -2048 counts (the most negative 12-bit value),
        // left-justified in 16 bits and little-endian.
        let raw = |v: i16| ((v << 4) as u16).to_le_bytes();
        let bytes = [raw(1000), raw(-1), raw(-2048)].concat();
        let expectations = [
            Transaction::write_read(A, vec![0x27], vec![ZYXDA]),
            Transaction::write_read(A, vec![0xA8], bytes),
        ];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Lis3dh::new(i2c.clone(), A);
        let counts = sensor.read_when_ready(3, 100, &mut NoopDelay).unwrap();
        assert_eq!(counts, [1000, -1, -2048]);
        i2c.done();
    }

    #[test]
    fn polling_gives_up_after_the_allowed_polls() {
        let expectations = [
            Transaction::write_read(A, vec![0x27], vec![0]),
            Transaction::write_read(A, vec![0x27], vec![ZYXOR]),
        ];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Lis3dh::new(i2c.clone(), A);
        assert_eq!(
            sensor.read_when_ready(2, 100, &mut NoopDelay),
            Err(Error::NotReady)
        );
        i2c.done();
    }
}
