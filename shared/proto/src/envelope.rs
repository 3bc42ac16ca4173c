//! The envelope every MQTT payload travels in, and its two encodings.
//!
//! **Wire (postcard)**: `varint(version) || varint(kind) || postcard(body)`. Compact and fast; what
//! agents and escalators exchange.
//!
//! **Integration (JSON)**: `{"version": 1, "kind": "verdict", "body": {...}}` with the same types,
//! bytes as base64 and digests as hex. For MQTT systems that are not ours.
//!
//! Both decoders check the size limit before parsing, reject unknown versions and kinds with a
//! typed error, refuse trailing bytes, and run [`Message::validate`]; no input makes them panic
//! (fuzzed in `shared/proto/fuzz`).

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::escalation::{EscalationRequest, Rejection, Verdict};
use crate::ota::{Chunk, ChunkRequest, Manifest, OtaStatus};
use crate::policy::Policy;
use crate::signing::Signed;
use crate::status::{DeviceStatus, Telemetry};
use crate::topic::Channel;
use crate::validate::ValidationError;

/// The protocol version this build speaks. Bumped only for a change that is not an append to an
/// enum (see `docs/protocol.md`).
pub const PROTOCOL_VERSION: u16 = 1;

/// Default largest accepted message: 1 MiB, enough for a 224×224×3 `f32` image with room to spare.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Decoder limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted, in bytes (checked before any parsing).
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Declares the message list once: the [`Message`] enum, its [`MessageKind`] tags, their names, and
/// the per-kind JSON dispatch. The order is the wire order (postcard's variant index): append only.
macro_rules! messages {
    ($( $(#[$doc:meta])* $variant:ident($body:ty) => $name:literal, $channel:ident; )*) => {
        /// Every message of the protocol.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum Message {
            $( $(#[$doc])* $variant($body), )*
        }

        /// The kind of a [`Message`], as the envelope carries it. Its `code` is the wire tag.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum MessageKind {
            $( $(#[$doc])* $variant, )*
        }

        impl MessageKind {
            /// Every kind, in wire-code order.
            pub const ALL: &'static [MessageKind] = &[$(MessageKind::$variant,)*];

            /// The kind's name in JSON, logs and metrics, e.g. `escalation_request`.
            pub const fn name(self) -> &'static str {
                match self { $(MessageKind::$variant => $name,)* }
            }

            /// The topic channel messages of this kind are published on.
            pub const fn channel(self) -> Channel {
                match self { $(MessageKind::$variant => Channel::$channel,)* }
            }
        }

        impl Message {
            /// This message's kind.
            pub const fn kind(&self) -> MessageKind {
                match self { $(Message::$variant(_) => MessageKind::$variant,)* }
            }

            fn encode_json_body(&self, pretty: bool) -> Result<String, serde_json::Error> {
                match self {
                    $(Message::$variant(body) => {
                        let envelope = JsonEnvelopeOut { version: PROTOCOL_VERSION, kind: $name, body };
                        if pretty {
                            serde_json::to_string_pretty(&envelope)
                        } else {
                            serde_json::to_string(&envelope)
                        }
                    })*
                }
            }

            fn decode_json_body(
                kind: MessageKind,
                body: serde_json::Value,
            ) -> Result<Message, serde_json::Error> {
                match kind {
                    $(MessageKind::$variant => serde_json::from_value(body).map(Message::$variant),)*
                }
            }
        }

        $(
            impl From<$body> for Message {
                fn from(body: $body) -> Self {
                    Message::$variant(body)
                }
            }
        )*
    };
}

messages! {
    /// Device → cloud: an input the edge model was unsure about.
    EscalationRequest(EscalationRequest) => "escalation_request", Escalate;
    /// Cloud → device: the answer to an escalation.
    Verdict(Verdict) => "verdict", Verdict;
    /// Cloud → device: an escalation the cloud refused.
    Rejection(Rejection) => "rejection", Verdict;
    /// Device → all (retained, and the last will): presence and versions.
    DeviceStatus(DeviceStatus) => "device_status", Status;
    /// Device → cloud: activity over a window.
    Telemetry(Telemetry) => "telemetry", Telemetry;
    /// Cloud → device (retained): a signed model update offer.
    OtaManifest(Signed<Manifest>) => "ota_manifest", OtaManifest;
    /// Device → cloud: a request for artifact chunks.
    OtaChunkRequest(ChunkRequest) => "ota_chunk_request", OtaRequest;
    /// Cloud → device: one artifact chunk.
    OtaChunk(Chunk) => "ota_chunk", OtaChunk;
    /// Device → cloud: update progress and outcome.
    OtaStatus(OtaStatus) => "ota_status", OtaStatus;
    /// Cloud → device (retained): a signed escalation policy.
    PolicyUpdate(Signed<Policy>) => "policy_update", Policy;
}

impl MessageKind {
    /// The wire tag: the kind's position in the message list.
    pub fn code(self) -> u32 {
        // ALL is in declaration order, so the index is the discriminant; it is tiny.
        self as u32
    }

    /// The kind with this wire tag.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(code).ok()?).copied()
    }

    /// The kind with this JSON name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Message {
    /// Checks the protocol's rules beyond parsing (sizes, ranges, consistency).
    ///
    /// Signed bodies are checked for shape here; their signatures are checked by the receiver
    /// with its pinned keys ([`Signed::verify`]).
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Message::EscalationRequest(m) => m.validate(),
            Message::Verdict(m) => m.validate(),
            Message::Rejection(m) => m.validate(),
            Message::DeviceStatus(m) => m.validate(),
            Message::Telemetry(m) => m.validate(),
            Message::OtaManifest(m) => m.content.validate(),
            Message::OtaChunkRequest(m) => m.validate(),
            Message::OtaChunk(m) => m.validate(),
            Message::OtaStatus(m) => m.validate(),
            Message::PolicyUpdate(m) => m.content.validate(),
        }
    }
}

/// Why bytes could not be turned into a [`Message`]. Retrying the same bytes never helps.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Over the size limit; nothing was parsed.
    #[error(
        "message is {len} bytes, over the {max}-byte limit: send less, or raise the receiver's max_message_bytes"
    )]
    TooLarge {
        /// Message length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Written by a protocol version this build does not speak.
    #[error(
        "protocol version {found} is not supported (this build speaks {supported}): upgrade the older side"
    )]
    UnsupportedVersion {
        /// The version in the message.
        found: u64,
        /// The version this build speaks.
        supported: u16,
    },
    /// A wire tag no kind has (a newer sender, or garbage).
    #[error(
        "unknown message kind code {0}: the sender is newer than this build, or the payload is not Cascade's"
    )]
    UnknownKindCode(u32),
    /// A JSON kind name no kind has.
    #[error(
        "unknown message kind {0:?}: expected one of escalation_request, verdict, rejection, device_status, telemetry, ota_manifest, ota_chunk_request, ota_chunk, ota_status, policy_update"
    )]
    UnknownKindName(String),
    /// The bytes do not parse as the message kind they claim.
    #[error("malformed {}: {detail}", kind.map_or("envelope", MessageKind::name))]
    Malformed {
        /// The kind, if the header was readable.
        kind: Option<MessageKind>,
        /// What the parser reported.
        detail: String,
    },
    /// Bytes left after a complete message.
    #[error("{count} unexpected bytes after a complete {kind} message")]
    TrailingBytes {
        /// The kind.
        kind: MessageKind,
        /// How many bytes were left.
        count: usize,
    },
    /// The message parsed but breaks a protocol rule.
    #[error("invalid {kind}: {source}")]
    Invalid {
        /// The kind.
        kind: MessageKind,
        /// The rule broken.
        source: ValidationError,
    },
}

/// The envelope's header: readable without parsing the body (e.g. to route or count cheaply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Message kind.
    pub kind: MessageKind,
}

fn malformed(kind: Option<MessageKind>, err: impl ToString) -> DecodeError {
    DecodeError::Malformed {
        kind,
        detail: err.to_string(),
    }
}

fn check_size(len: usize, limits: &Limits) -> Result<(), DecodeError> {
    if len > limits.max_message_bytes {
        return Err(DecodeError::TooLarge {
            len,
            max: limits.max_message_bytes,
        });
    }
    Ok(())
}

fn check_version(found: u64) -> Result<(), DecodeError> {
    if found != u64::from(PROTOCOL_VERSION) {
        return Err(DecodeError::UnsupportedVersion {
            found,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// Encodes a message for the wire.
pub fn encode(message: &Message) -> Vec<u8> {
    // postcard fails only on sequences of unknown length; our types have none.
    postcard::to_allocvec(&(PROTOCOL_VERSION, message)).expect("messages serialize infallibly")
}

/// Reads a wire message's header: checks size, version and kind without parsing the body.
pub fn peek_header(bytes: &[u8], limits: &Limits) -> Result<Header, DecodeError> {
    check_size(bytes.len(), limits)?;
    // Read the version as u64 so that a too-large one is reported as unsupported, not malformed.
    let (version, rest) =
        postcard::take_from_bytes::<u64>(bytes).map_err(|e| malformed(None, e))?;
    check_version(version)?;
    let (code, _) = postcard::take_from_bytes::<u32>(rest).map_err(|e| malformed(None, e))?;
    let kind = MessageKind::from_code(code).ok_or(DecodeError::UnknownKindCode(code))?;
    Ok(Header {
        version: PROTOCOL_VERSION,
        kind,
    })
}

/// Decodes and validates a wire message.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
    let header = peek_header(bytes, limits)?;
    let kind = Some(header.kind);
    let (_, rest) = postcard::take_from_bytes::<u64>(bytes).map_err(|e| malformed(kind, e))?;
    let (message, trailing) =
        postcard::take_from_bytes::<Message>(rest).map_err(|e| malformed(kind, e))?;
    if !trailing.is_empty() {
        return Err(DecodeError::TrailingBytes {
            kind: header.kind,
            count: trailing.len(),
        });
    }
    message.validate().map_err(|source| DecodeError::Invalid {
        kind: header.kind,
        source,
    })?;
    Ok(message)
}

#[derive(Serialize)]
struct JsonEnvelopeOut<'a, T> {
    version: u16,
    kind: &'static str,
    body: &'a T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEnvelopeIn {
    version: u64,
    kind: String,
    body: serde_json::Value,
}

/// Encodes a message as integration JSON: `{"version":1,"kind":"...","body":{...}}`.
pub fn encode_json(message: &Message) -> String {
    // Our types serialize to JSON infallibly: no maps with non-string keys, and validated
    // messages hold no NaN (serde_json writes non-finite floats as null rather than failing).
    message
        .encode_json_body(false)
        .expect("messages serialize to JSON infallibly")
}

/// [`encode_json`], indented for people to read.
pub fn encode_json_pretty(message: &Message) -> String {
    message
        .encode_json_body(true)
        .expect("messages serialize to JSON infallibly")
}

/// Decodes and validates an integration JSON message.
pub fn decode_json(bytes: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
    check_size(bytes.len(), limits)?;
    let envelope: JsonEnvelopeIn = serde_json::from_slice(bytes).map_err(|e| malformed(None, e))?;
    check_version(envelope.version)?;
    let kind = MessageKind::from_name(&envelope.kind)
        .ok_or(DecodeError::UnknownKindName(envelope.kind))?;
    let message =
        Message::decode_json_body(kind, envelope.body).map_err(|e| malformed(Some(kind), e))?;
    message
        .validate()
        .map_err(|source| DecodeError::Invalid { kind, source })?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_codes_follow_declaration_order() {
        for (i, kind) in MessageKind::ALL.iter().enumerate() {
            assert_eq!(kind.code() as usize, i);
            assert_eq!(MessageKind::from_code(kind.code()), Some(*kind));
            assert_eq!(MessageKind::from_name(kind.name()), Some(*kind));
        }
        assert_eq!(MessageKind::from_code(MessageKind::ALL.len() as u32), None);
    }

    #[test]
    fn unknown_kind_error_lists_every_kind() {
        let text = DecodeError::UnknownKindName("x".into()).to_string();
        for kind in MessageKind::ALL {
            assert!(text.contains(kind.name()), "{kind} missing from: {text}");
        }
    }
}
