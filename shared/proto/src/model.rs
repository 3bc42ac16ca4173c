//! Model references: a name and a semantic version.

use alloc::string::String;
use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::validate::{ValidationError, check_identifier};

/// A model name and version, as carried by escalations, verdicts and manifests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Model name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// Model version.
    pub version: Version,
}

impl ModelRef {
    /// A reference to `name` at `version`.
    pub fn new(name: impl Into<String>, version: Version) -> Self {
        Self {
            name: name.into(),
            version,
        }
    }

    pub(crate) fn validate(&self, field: &'static str) -> Result<(), ValidationError> {
        check_identifier(field, &self.name)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// A semantic version `major.minor.patch`, ordered numerically.
///
/// OTA downgrade protection compares these, so they are numbers, not free text. JSON writes them
/// as `"1.2.3"`; postcard as three varints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Incompatible changes.
    pub major: u16,
    /// Compatible additions.
    pub minor: u16,
    /// Fixes and retrains.
    pub patch: u16,
}

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A version string that is not `major.minor.patch` with each part in `0..=65535`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version {0:?} is not of the form MAJOR.MINOR.PATCH (numbers up to 65535), e.g. 1.4.0")]
pub struct ParseVersionError(pub String);

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.into());
        let mut parts = s.split('.');
        let mut next = || -> Result<u16, ParseVersionError> {
            let part = parts.next().ok_or_else(err)?;
            // `u16::from_str` accepts a leading `+`; a version does not.
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            part.parse().map_err(|_| err())
        };
        let version = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(version)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            (self.major, self.minor, self.patch).serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let (major, minor, patch) = <(u16, u16, u16)>::deserialize(deserializer)?;
            Ok(Version::new(major, minor, patch))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_versions() {
        let v: Version = "1.20.3".parse().unwrap();
        assert_eq!(v, Version::new(1, 20, 3));
        assert_eq!(alloc::format!("{v}"), "1.20.3");
    }

    #[test]
    fn rejects_malformed_versions() {
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "1..3",
            "a.b.c",
            "+1.2.3",
            "1.2.70000",
            " 1.2.3",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn orders_numerically_not_lexically() {
        let v9: Version = "1.9.0".parse().unwrap();
        let v10: Version = "1.10.0".parse().unwrap();
        assert!(v9 < v10);
    }
}
