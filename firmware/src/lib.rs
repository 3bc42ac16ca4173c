//! Firmware logic for a Cascade sensor node: a microcontroller samples an accelerometer and
//! streams windows of samples to an edge agent over a UART.
//!
//! `no_std`, no allocator, generic over embedded-hal 1.0 (`I2c`, `DelayNs`) and embedded-io
//! (`Write`), so the same code runs on a board (see `firmware/board`) and in host tests against
//! mocks and simulated sensors.
//!
//! - [`lis3dh`]: the LIS3DH accelerometer driver (register map and start-up per its datasheet).
//! - [`sampler`]: I/O-free timing and windowing: sample slots, the window, a 64-bit clock.
//! - [`transmit`]: frames (cascade-proto's postcard + CRC-32C + COBS) onto a byte stream.
//! - [`node`]: the three together, with retries and `Fault` frames instead of hangs.
//!
//! The frame format is `cascade_proto::frame`; docs/firmware.md has the wiring and the build.
#![cfg_attr(not(test), no_std)]

pub mod lis3dh;
pub mod node;
pub mod sampler;
pub mod transmit;

pub use node::{Node, NodeConfig, NodeError, Step};
