//! Cascade sensor node on an STM32F411 "Black Pill": samples an LIS3DH over I2C1 at 50 Hz and
//! streams windows of 32 samples to the edge agent over USART1 at 115200 baud.
//!
//! Wiring (docs/firmware.md): LIS3DH SCL → PB6, SDA → PB7, SDO/SA0 → GND (address 0x18),
//! VCC → 3V3, GND → GND, CS → 3V3 (selects I2C); USART1 TX → PA9 to the agent's RX.
//!
//! All the logic is in the `cascade-firmware` crate and tested on the host; this file only wires
//! the board's peripherals to it and runs the loop.
#![no_std]
#![no_main]

use cascade_firmware::lis3dh::ADDRESS_SA0_LOW;
use cascade_firmware::sampler::{Due, Schedule, WrappingClock};
use cascade_firmware::{Node, NodeConfig, Step};
use cortex_m::peripheral::DWT;
use cortex_m_rt::entry;
use embedded_hal::delay::DelayNs;
use panic_halt as _;
use stm32f4xx_hal::dwt::DwtExt;
use stm32f4xx_hal::i2c::{I2c, Mode};
use stm32f4xx_hal::pac;
use stm32f4xx_hal::prelude::*;
use stm32f4xx_hal::rcc::Config;

/// Samples per frame: 0.64 s at 50 Hz, 192 bytes of data, a 214-byte frame on the wire.
const FRAME_SAMPLES: usize = 32;
/// Consecutive failed samples (one second at 50 Hz) before the sensor is started again.
const RESTART_AFTER_FAULTS: u32 = 50;
/// The Black Pill's crystal, and the core clock the PLL makes from it.
const HSE_MHZ: u32 = 25;
const SYSCLK_MHZ: u32 = 100;

#[entry]
fn main() -> ! {
    let dp = pac::Peripherals::take().expect("peripherals are taken once, here");
    let cp = cortex_m::Peripherals::take().expect("core peripherals are taken once, here");
    let mut rcc = dp
        .RCC
        .freeze(Config::hse(HSE_MHZ.MHz()).sysclk(SYSCLK_MHZ.MHz()));
    // The cycle counter is the clock (100 MHz, extended past its 43 s wrap) and drives the delays.
    let dwt = cp.DWT.constrain(cp.DCB, &rcc.clocks);
    let mut delay = dwt.delay();
    let mut clock = WrappingClock::default();
    let mut now_us = move || clock.extend(DWT::cycle_count()) / u64::from(SYSCLK_MHZ);

    let gpioa = dp.GPIOA.split(&mut rcc);
    let gpiob = dp.GPIOB.split(&mut rcc);
    let i2c = I2c::new(
        dp.I2C1,
        (gpiob.pb6, gpiob.pb7),
        Mode::standard(400.kHz()),
        &mut rcc,
    );
    let uart = match dp.USART1.tx(gpioa.pa9, 115_200.bps(), &mut rcc) {
        Ok(tx) => tx,
        // 115200 baud from a 100 MHz APB2 clock is always valid; nothing to report it on anyway.
        Err(_) => panic!("USART1 configuration rejected"),
    };

    let config = NodeConfig::default();
    let mut node = Node::<_, _, FRAME_SAMPLES>::new(i2c, ADDRESS_SA0_LOW, uart, config);
    loop {
        start(&mut node, &mut now_us, &mut delay);
        let mut schedule = Schedule::new(now_us(), config.sensor.rate.period_us());
        let mut faults = 0;
        while faults < RESTART_AFTER_FAULTS {
            match schedule.poll(now_us()) {
                Due::NotYet { wait_us } => delay.delay_us(wait_us.min(1_000) as u32),
                Due::Now { t_us, missed } => {
                    if missed > 0 {
                        let _ = node.missed(t_us);
                    }
                    // A write error has nowhere to be reported but the line that failed; the
                    // receiver sees the sequence gap.
                    match node.sample(t_us, &mut delay) {
                        Ok(Step::Faulted { .. }) => faults += 1,
                        Ok(_) => faults = 0,
                        Err(_) => {}
                    }
                }
            }
        }
    }
}

/// Starts the sensor, once a second until it answers; each failure already sent a `Fault` frame.
fn start<I, W, const N: usize>(
    node: &mut Node<I, W, N>,
    now_us: &mut impl FnMut() -> u64,
    delay: &mut impl DelayNs,
) where
    I: embedded_hal::i2c::I2c,
    W: embedded_io::Write,
{
    while node.start(now_us(), delay).is_err() {
        delay.delay_ms(1_000);
    }
}
