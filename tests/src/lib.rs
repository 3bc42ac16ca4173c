//! Harness for Cascade's end-to-end tests: real brokers on free ports, real processes.
//!
//! Tests never assume a port is free or a broker is running: each starts what it needs through
//! this crate and the harness stops it on drop.

pub mod devices;
pub mod fixtures;
mod mosquitto;

pub use mosquitto::{Mosquitto, MosquittoError};
