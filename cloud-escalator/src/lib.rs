//! The Cascade cloud escalator, as a library the `cloud-escalator` binary and tests drive.
//!
//! Today it holds the protocol tools operators and integrators use from the command line; the
//! escalation service, embedded broker and fleet API land here as they are built.
//!
//! # Module map
//!
//! - [`codec`]: converts between the wire encoding (postcard) and integration JSON, for people
//!   connecting their own MQTT systems to a Cascade fleet.

pub mod codec;
