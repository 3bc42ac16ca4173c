//! The MQTT topic scheme: `cascade/v1/{fleet}/{device}/{channel}`.
//!
//! Every device-scoped message lives under its device's prefix, so a broker ACL of
//! `cascade/v1/{fleet}/{device}/#` per device confines it to its own traffic. Escalators consume
//! `cascade/v1/{fleet}/+/escalate` through an MQTT 5 shared subscription
//! (`$share/{group}/cascade/v1/{fleet}/+/escalate`) so replicas split the load.
//!
//! Fleet, device and group names are 1 to 64 bytes of `A-Z a-z 0-9 . _ -`: no wildcards, no
//! separators, nothing a shell or a file system would mangle. Everything here works on borrowed
//! strings and needs no allocator; [`fmt::Display`] writes the topics.

use core::fmt;

/// First level of every Cascade topic.
pub const ROOT: &str = "cascade";
/// Second level: the topic scheme version.
pub const SCHEME: &str = "v1";
/// Longest fleet, device or group segment.
pub const MAX_SEGMENT_LEN: usize = 64;

/// What a topic under a device carries. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Device → cloud: escalation requests.
    Escalate,
    /// Cloud → device: verdicts and rejections.
    Verdict,
    /// Device → all, retained: presence and versions (also the last will).
    Status,
    /// Device → cloud: periodic activity.
    Telemetry,
    /// Cloud → device, retained: signed policy.
    Policy,
    /// Cloud → device, retained: signed OTA manifest.
    OtaManifest,
    /// Device → cloud: chunk requests.
    OtaRequest,
    /// Cloud → device: chunks.
    OtaChunk,
    /// Device → cloud: update progress.
    OtaStatus,
}

impl Channel {
    /// Every channel.
    pub const ALL: &'static [Channel] = &[
        Channel::Escalate,
        Channel::Verdict,
        Channel::Status,
        Channel::Telemetry,
        Channel::Policy,
        Channel::OtaManifest,
        Channel::OtaRequest,
        Channel::OtaChunk,
        Channel::OtaStatus,
    ];

    /// The topic levels after the device, e.g. `ota/chunk`.
    pub const fn path(self) -> &'static str {
        match self {
            Channel::Escalate => "escalate",
            Channel::Verdict => "verdict",
            Channel::Status => "status",
            Channel::Telemetry => "telemetry",
            Channel::Policy => "policy",
            Channel::OtaManifest => "ota/manifest",
            Channel::OtaRequest => "ota/request",
            Channel::OtaChunk => "ota/chunk",
            Channel::OtaStatus => "ota/status",
        }
    }

    /// The channel whose path is `path`.
    pub fn from_path(path: &str) -> Option<Channel> {
        Channel::ALL.iter().copied().find(|c| c.path() == path)
    }

    /// Whether devices publish on it (`true`) or the cloud does (`false`).
    pub const fn from_device(self) -> bool {
        matches!(
            self,
            Channel::Escalate
                | Channel::Status
                | Channel::Telemetry
                | Channel::OtaRequest
                | Channel::OtaStatus
        )
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// Which part of a topic an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// The fleet level.
    Fleet,
    /// The device level.
    Device,
    /// A shared-subscription group.
    Group,
    /// The channel levels.
    Channel,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Segment::Fleet => "fleet",
            Segment::Device => "device",
            Segment::Group => "group",
            Segment::Channel => "channel",
        })
    }
}

/// A topic or name that is not part of the scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Does not start with `cascade/v1/`.
    #[error(
        "topic is not a Cascade v1 topic (expected cascade/v1/{{fleet}}/{{device}}/{{channel}})"
    )]
    Foreign,
    /// Fewer levels than `cascade/v1/{fleet}/{device}/{channel}`.
    #[error("topic has too few levels (expected cascade/v1/{{fleet}}/{{device}}/{{channel}})")]
    TooShort,
    /// A segment is empty (e.g. `a//b`).
    #[error("the {0} segment is empty")]
    Empty(Segment),
    /// A segment exceeds [`MAX_SEGMENT_LEN`].
    #[error("the {segment} segment is {len} bytes, over the 64-byte limit")]
    TooLong {
        /// Which segment.
        segment: Segment,
        /// Its length.
        len: usize,
    },
    /// A segment contains `+` or `#`: a concrete topic never does.
    #[error("the {0} segment contains an MQTT wildcard (+ or #)")]
    Wildcard(Segment),
    /// A segment contains a byte outside `A-Z a-z 0-9 . _ -`.
    #[error("the {segment} segment contains {byte:#04x}, outside A-Z a-z 0-9 . _ -")]
    BadByte {
        /// Which segment.
        segment: Segment,
        /// The offending byte.
        byte: u8,
    },
    /// The levels after the device are not a known channel.
    #[error(
        "unknown channel (expected one of escalate, verdict, status, telemetry, policy, ota/manifest, ota/request, ota/chunk, ota/status)"
    )]
    UnknownChannel,
}

/// Whether `b` may appear in a fleet, device, group or model name.
pub(crate) const fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Checks a fleet, device or group name.
pub fn validate_segment(segment: Segment, value: &str) -> Result<(), TopicError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(TopicError::Empty(segment));
    }
    if bytes.len() > MAX_SEGMENT_LEN {
        return Err(TopicError::TooLong {
            segment,
            len: bytes.len(),
        });
    }
    if bytes.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(TopicError::Wildcard(segment));
    }
    match bytes.iter().find(|&&b| !is_name_byte(b)) {
        Some(&byte) => Err(TopicError::BadByte { segment, byte }),
        None => Ok(()),
    }
}

/// A concrete device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceTopic<'a> {
    /// Fleet name.
    pub fleet: &'a str,
    /// Device id.
    pub device: &'a str,
    /// Channel.
    pub channel: Channel,
}

impl<'a> DeviceTopic<'a> {
    /// A topic, after checking the names.
    pub fn new(fleet: &'a str, device: &'a str, channel: Channel) -> Result<Self, TopicError> {
        validate_segment(Segment::Fleet, fleet)?;
        validate_segment(Segment::Device, device)?;
        Ok(DeviceTopic {
            fleet,
            device,
            channel,
        })
    }

    /// Parses a concrete topic; wildcards, empty or oversized segments and unknown channels are errors.
    pub fn parse(topic: &'a str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_prefix(SCHEME))
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::Foreign)?;
        let mut levels = rest.splitn(3, '/');
        let fleet = levels.next().ok_or(TopicError::TooShort)?;
        let device = levels.next().ok_or(TopicError::TooShort)?;
        let channel = levels.next().ok_or(TopicError::TooShort)?;
        validate_segment(Segment::Fleet, fleet)?;
        validate_segment(Segment::Device, device)?;
        if channel.is_empty() {
            return Err(TopicError::Empty(Segment::Channel));
        }
        if channel.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::Wildcard(Segment::Channel));
        }
        let channel = Channel::from_path(channel).ok_or(TopicError::UnknownChannel)?;
        Ok(DeviceTopic {
            fleet,
            device,
            channel,
        })
    }
}

impl fmt::Display for DeviceTopic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ROOT}/{SCHEME}/{}/{}/{}",
            self.fleet, self.device, self.channel
        )
    }
}

/// A subscription filter over device topics, optionally as an MQTT 5 shared subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter<'a> {
    fleet: &'a str,
    /// `None`: every device (`+`).
    device: Option<&'a str>,
    /// `None`: every channel (`#`).
    channel: Option<Channel>,
    /// `Some(group)`: `$share/{group}/...`.
    share: Option<&'a str>,
}

impl<'a> Filter<'a> {
    /// One channel of every device in a fleet: `cascade/v1/{fleet}/+/{channel}`.
    pub fn channel(fleet: &'a str, channel: Channel) -> Result<Self, TopicError> {
        validate_segment(Segment::Fleet, fleet)?;
        Ok(Filter {
            fleet,
            device: None,
            channel: Some(channel),
            share: None,
        })
    }

    /// Everything of one device: `cascade/v1/{fleet}/{device}/#`.
    pub fn device(fleet: &'a str, device: &'a str) -> Result<Self, TopicError> {
        validate_segment(Segment::Fleet, fleet)?;
        validate_segment(Segment::Device, device)?;
        Ok(Filter {
            fleet,
            device: Some(device),
            channel: None,
            share: None,
        })
    }

    /// The same filter as an MQTT 5 shared subscription: `$share/{group}/...`.
    pub fn shared(self, group: &'a str) -> Result<Self, TopicError> {
        validate_segment(Segment::Group, group)?;
        Ok(Filter {
            share: Some(group),
            ..self
        })
    }

    /// Whether a concrete topic falls under this filter.
    pub fn matches(&self, topic: &DeviceTopic<'_>) -> bool {
        topic.fleet == self.fleet
            && self.device.is_none_or(|d| d == topic.device)
            && self.channel.is_none_or(|c| c == topic.channel)
    }
}

impl fmt::Display for Filter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(group) = self.share {
            write!(f, "$share/{group}/")?;
        }
        write!(
            f,
            "{ROOT}/{SCHEME}/{}/{}/",
            self.fleet,
            self.device.unwrap_or("+")
        )?;
        match self.channel {
            Some(channel) => write!(f, "{channel}"),
            None => f.write_str("#"),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate alloc;
    use super::*;
    use alloc::format;
    use alloc::string::ToString;

    #[test]
    fn builds_and_parses_every_channel() {
        for &channel in Channel::ALL {
            let topic = DeviceTopic::new("acme", "cam-01", channel).unwrap();
            let text = topic.to_string();
            assert_eq!(text, format!("cascade/v1/acme/cam-01/{}", channel.path()));
            assert_eq!(DeviceTopic::parse(&text).unwrap(), topic);
        }
    }

    #[test]
    fn rejects_wildcards_and_bad_segments() {
        let cases = [
            (
                "cascade/v1/acme/+/escalate",
                TopicError::Wildcard(Segment::Device),
            ),
            ("cascade/v1/#", TopicError::TooShort),
            (
                "cascade/v1/acme/cam/#",
                TopicError::Wildcard(Segment::Channel),
            ),
            (
                "cascade/v1/a+b/cam/escalate",
                TopicError::Wildcard(Segment::Fleet),
            ),
            (
                "cascade/v1//cam/escalate",
                TopicError::Empty(Segment::Fleet),
            ),
            (
                "cascade/v1/acme//escalate",
                TopicError::Empty(Segment::Device),
            ),
            ("cascade/v1/acme/cam/", TopicError::Empty(Segment::Channel)),
            ("cascade/v1/acme/cam", TopicError::TooShort),
            ("cascade/v2/acme/cam/escalate", TopicError::Foreign),
            ("other/v1/acme/cam/escalate", TopicError::Foreign),
            (
                "cascade/v1/acme/cam/escalate/extra",
                TopicError::UnknownChannel,
            ),
            ("cascade/v1/acme/cam/ota", TopicError::UnknownChannel),
            (
                "cascade/v1/ac me/cam/escalate",
                TopicError::BadByte {
                    segment: Segment::Fleet,
                    byte: b' ',
                },
            ),
            (
                "cascade/v1/acme/cam\0/escalate",
                TopicError::BadByte {
                    segment: Segment::Device,
                    byte: 0,
                },
            ),
        ];
        for (topic, expected) in cases {
            assert_eq!(DeviceTopic::parse(topic), Err(expected), "{topic}");
        }
    }

    #[test]
    fn rejects_oversized_segments() {
        let long = "d".repeat(65);
        let topic = format!("cascade/v1/acme/{long}/status");
        assert_eq!(
            DeviceTopic::parse(&topic),
            Err(TopicError::TooLong {
                segment: Segment::Device,
                len: 65
            })
        );
        let max = "d".repeat(64);
        assert!(DeviceTopic::parse(&format!("cascade/v1/acme/{max}/status")).is_ok());
    }

    #[test]
    fn writes_filters_and_shared_subscriptions() {
        let esc = Filter::channel("acme", Channel::Escalate).unwrap();
        assert_eq!(esc.to_string(), "cascade/v1/acme/+/escalate");
        assert_eq!(
            esc.shared("escalators").unwrap().to_string(),
            "$share/escalators/cascade/v1/acme/+/escalate"
        );
        let dev = Filter::device("acme", "cam-01").unwrap();
        assert_eq!(dev.to_string(), "cascade/v1/acme/cam-01/#");
        assert!(
            Filter::channel("acme", Channel::Escalate)
                .unwrap()
                .shared("a/b")
                .is_err()
        );
    }

    #[test]
    fn filters_match_the_topics_they_describe() {
        let t = DeviceTopic::new("acme", "cam-01", Channel::OtaChunk).unwrap();
        assert!(Filter::device("acme", "cam-01").unwrap().matches(&t));
        assert!(!Filter::device("acme", "cam-02").unwrap().matches(&t));
        assert!(
            Filter::channel("acme", Channel::OtaChunk)
                .unwrap()
                .matches(&t)
        );
        assert!(
            !Filter::channel("acme", Channel::Escalate)
                .unwrap()
                .matches(&t)
        );
        assert!(
            !Filter::channel("other", Channel::OtaChunk)
                .unwrap()
                .matches(&t)
        );
    }
}
