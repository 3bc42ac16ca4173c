//! The Cascade edge agent, as a library the `edge-agent` binary and tests drive.
//!
//! The agent runs a model on the device, answers what it is sure of, and escalates the rest to the
//! cloud escalator over MQTT, durably. `edge-agent run` is [`agent::start`] over a config file;
//! the model tools (`infer`, `bench`, `eval`) share the engine.
//!
//! # Module map
//!
//! The daemon:
//! - [`config`]: the TOML configuration, with defaults and validation.
//! - [`agent`]: starts the tasks below and owns their shutdown.
//! - [`sources`]: inputs from a watched directory, stdin JSON lines, a local MQTT topic, a serial
//!   sensor link.
//! - [`input`]: input items, JSON inputs, and the results the agent publishes.
//! - [`policy`]: which inputs are escalated (confidence, class thresholds, budget, audits). Pure.
//! - [`privacy`]: what an escalation may carry (raw, redacted, embedding). Pure.
//! - [`spool`]: the durable store-and-forward queue of escalations.
//! - [`link`]: the MQTT connection to the fleet broker (escalations out; verdicts, policy in).
//! - [`connection`]: MQTT and TLS settings shared by every client.
//! - [`enroll`]: the device's key pair and certificate request for the fleet CA.
//! - [`delta`]: binary deltas between model versions (zstd with the old file as prefix). Pure.
//! - [`mqtt`]: one MQTT session, version 5 or 3.1.1 (falling back when the broker lacks 5).
//! - [`ota`]: over-the-air model updates: signed manifests, resumable chunked download, atomic
//!   switch.
//! - [`stats`]: counters and telemetry windows.
//! - [`sensor`]: decodes the firmware → agent frame stream into readings and model-input windows.
//! - [`memory`]: gives back the code pages only start-up used, once the agent is running.
//!
//! The tools:
//! - [`infer_files`]: `edge-agent infer`, one inference on `.npy` (or image) files.
//! - [`bench`]: `edge-agent bench`, latency percentiles, throughput and peak memory.
//! - [`eval`]: `edge-agent eval`, accuracy and the confidence curve on a labelled set.
//! - [`install`]: `edge-agent install` / `cloud-escalator install`: files and a hardened unit.

pub mod agent;
pub mod bench;
pub mod config;
pub mod connection;
pub mod delta;
pub mod enroll;
pub mod eval;
pub mod infer_files;
pub mod input;
pub mod install;
pub mod link;
pub mod memory;
pub mod mqtt;
pub mod ota;
pub mod policy;
pub mod privacy;
pub mod sensor;
pub mod sources;
pub mod spool;
pub mod stats;
