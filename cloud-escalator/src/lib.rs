//! The Cascade cloud escalator, as a library the `cloud-escalator` binary and tests drive.
//!
//! It answers escalations from edge agents with a larger model, in dynamic batches, keeps the hard
//! examples, and (by default) runs the MQTT broker itself so one command runs everything.
//!
//! # Module map
//!
//! - [`config`]: the TOML configuration, with defaults and validation.
//! - [`service`]: the escalation service (consumer, validation, routing, batching, verdicts).
//! - [`batcher`]: the dynamic batcher. Pure.
//! - [`broker`]: the embedded MQTT 5 broker (rumqttd).
//! - [`gate`]: mutual TLS and per-device topic ACLs in front of the embedded broker.
//! - [`pki`]: the fleet CA: device, server and service certificates.
//! - [`mosquitto`]: the Mosquitto configuration and ACL file equivalent to the gate.
//! - [`store`]: the hard-example store (SQLite) and its `.npy` export.
//! - [`registry`]: published model versions and their signed OTA manifests, on disk.
//! - [`ota`]: serves OTA manifests and chunks to devices over MQTT.
//! - [`fleet`]: the device registry fed from MQTT, its HTTP API (tokens, audit), the web
//!   console, the operators' CLI and enrollment.
//! - [`codec`]: converts between the wire encoding (postcard) and integration JSON, for people
//!   connecting their own MQTT systems to a Cascade fleet.

pub mod batcher;
pub mod broker;
pub mod codec;
pub mod config;
pub mod fleet;
pub mod gate;
pub mod mosquitto;
pub mod ota;
pub mod pki;
pub mod registry;
pub mod service;
pub mod store;
