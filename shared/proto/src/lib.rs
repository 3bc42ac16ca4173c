//! The Cascade wire protocol, shared by the edge agent, the cloud escalator and the firmware.
//!
//! This crate only describes and checks bytes: it does no I/O, spawns nothing and never panics on
//! input. It is `no_std`; the `alloc` feature (on by default) adds the heap-backed message types and
//! their codecs, `std` adds `std::error::Error` impls. Without `alloc` the crate still gives the
//! sensor frame codec and topic parsing, which is what firmware without an allocator needs.
//!
//! # Module map
//!
//! - [`topic`]: the MQTT topic scheme, `cascade/v1/{fleet}/{device}/{channel}`, and its filters.
//! - [`frame`]: sensor frames from firmware to an agent over a byte stream (postcard + CRC + COBS).
//! - [`envelope`] *(alloc)*: the one envelope every MQTT payload travels in, its postcard (wire) and
//!   JSON (integration) codecs, size limits and typed decode errors.
//! - [`escalation`] *(alloc)*: escalation requests, verdicts and rejections.
//! - [`status`] *(alloc)*: device status and telemetry.
//! - [`ota`] *(alloc)*: model manifests, chunk requests, chunks and update status.
//! - [`policy`] *(alloc)*: escalation policy updates.
//! - [`signing`] *(alloc)*: ed25519 signatures over a canonical byte form, with key ids for rotation.
//! - [`model`] *(alloc)*: model references and versions.
//! - [`validate`] *(alloc)*: the checks every decoded message passes.
//! - [`examples`] *(alloc)*: one valid example of every message kind (docs, CLI, tests).
//!
//! # Stability
//!
//! The postcard encoding of protocol version [`envelope::PROTOCOL_VERSION`] is promised stable:
//! golden byte vectors in `tests/golden.rs` fail if it drifts. Enums are append-only; any other
//! change to a message's shape needs a new protocol version. See `docs/protocol.md`.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod frame;
pub mod topic;

#[cfg(feature = "alloc")]
mod bytes;
#[cfg(feature = "alloc")]
pub mod envelope;
#[cfg(feature = "alloc")]
pub mod escalation;
#[cfg(feature = "alloc")]
pub mod examples;
#[cfg(feature = "alloc")]
pub mod model;
#[cfg(feature = "alloc")]
pub mod ota;
#[cfg(feature = "alloc")]
pub mod policy;
#[cfg(feature = "alloc")]
pub mod signing;
#[cfg(feature = "alloc")]
pub mod status;
#[cfg(feature = "alloc")]
pub mod validate;

#[cfg(feature = "alloc")]
pub use envelope::{
    DecodeError, Limits, Message, MessageKind, PROTOCOL_VERSION, decode, decode_json, encode,
    encode_json,
};
