//! How byte fields are written: raw bytes in postcard, text in JSON.
//!
//! postcard is not human readable, so binary fields cost their length plus a varint. serde_json is,
//! so the same fields become base64 (payloads) or lowercase hex (digests, keys, signatures), which is
//! what MQTT integrators expect to paste and compare.

use serde_with::{Bytes, IfIsHumanReadable, base64::Base64, hex::Hex};

/// Bulk data: tensor bytes, model chunks. Base64 in JSON.
pub(crate) type Blob = IfIsHumanReadable<Base64, Bytes>;

/// Digests, key ids and signatures. Hex in JSON.
pub(crate) type HexBytes = IfIsHumanReadable<Hex, Bytes>;
