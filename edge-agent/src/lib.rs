//! The Cascade edge agent, as a library the `edge-agent` binary and tests drive.
//!
//! The agent runs a model on the device, answers what it is sure of, and escalates the rest to the
//! cloud escalator over MQTT. This crate grows into that daemon; today it holds the sensor link
//! decoder that turns firmware frames into readings.
//!
//! # Module map
//!
//! - [`sensor`]: decodes the firmware → agent frame stream (cascade-proto frames) into owned
//!   readings, counting dropped and lost frames.

pub mod sensor;
