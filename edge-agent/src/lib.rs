//! The Cascade edge agent, as a library the `edge-agent` binary and tests drive.
//!
//! The agent runs a model on the device, answers what it is sure of, and escalates the rest to the
//! cloud escalator over MQTT. This crate grows into that daemon; today it holds the sensor link
//! decoder and the model tools.
//!
//! # Module map
//!
//! - [`sensor`]: decodes the firmware → agent frame stream (cascade-proto frames) into owned
//!   readings, counting dropped and lost frames.
//! - [`infer_files`]: `edge-agent infer`, one inference on `.npy` (or image) files.
//! - [`bench`]: `edge-agent bench`, latency percentiles, throughput and peak memory.
//! - [`eval`]: `edge-agent eval`, accuracy and the confidence curve on a labelled set.

pub mod bench;
pub mod eval;
pub mod infer_files;
pub mod sensor;
