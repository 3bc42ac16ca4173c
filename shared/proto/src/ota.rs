//! Over-the-air model updates: the signed manifest, chunk transfer, and the device's report.
//!
//! The escalator publishes a retained, signed [`Manifest`] per target device. The device checks the
//! signature, then pulls the artifact (the full model, or a delta against a version it already has)
//! chunk by chunk with [`ChunkRequest`]s; every [`Chunk`] is checked against the hash the manifest
//! lists for it, so a device never stores a byte the fleet key did not vouch for. Progress and
//! outcome go back as [`OtaStatus`].

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_with::serde_as;
use sha2::{Digest, Sha256};

use crate::bytes::{Blob, HexBytes};
use crate::model::{ModelRef, Version};
use crate::signing::Signable;
use crate::validate::{MAX_LIST_LEN, ValidationError, check_identifier, check_len, check_text};

/// Largest chunk: keeps every chunk message well under the default 1 MiB message limit.
pub const MAX_CHUNK_SIZE: u32 = 512 * 1024;
/// Largest model artifact a manifest may describe (2 GiB).
pub const MAX_ARTIFACT_SIZE: u64 = 2 << 30;
/// Largest metadata sidecar (JSON text) carried in a manifest.
pub const MAX_SIDECAR_LEN: usize = 64 * 1024;
/// Most chunks one request may ask for.
pub const MAX_CHUNKS_PER_REQUEST: u16 = 64;

/// A downloadable file: its size and hash, and the hash of each chunk.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactInfo {
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the whole file. Hex in JSON.
    #[serde_as(as = "HexBytes")]
    pub sha256: [u8; 32],
    /// Bytes per chunk; the last chunk may be shorter.
    pub chunk_size: u32,
    /// SHA-256 of each chunk, in order. Hex in JSON.
    #[serde_as(as = "Vec<HexBytes>")]
    pub chunk_sha256: Vec<[u8; 32]>,
}

impl ArtifactInfo {
    /// Describes `bytes` cut into chunks of `chunk_size` bytes.
    pub fn describe(bytes: &[u8], chunk_size: u32) -> Self {
        let step = usize::try_from(chunk_size.max(1)).unwrap_or(usize::MAX);
        ArtifactInfo {
            size: bytes.len() as u64,
            sha256: Sha256::digest(bytes).into(),
            chunk_size,
            chunk_sha256: bytes
                .chunks(step)
                .map(|c| Sha256::digest(c).into())
                .collect(),
        }
    }

    /// How many chunks the size and chunk size imply.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// Byte length of chunk `index`, `None` if out of range.
    pub fn chunk_len(&self, index: u32) -> Option<usize> {
        let start = u64::from(index) * u64::from(self.chunk_size);
        (start < self.size).then(|| {
            let len = (self.size - start).min(u64::from(self.chunk_size));
            len as usize
        })
    }

    /// Whether `data` is exactly chunk `index` as the manifest describes it.
    pub fn chunk_matches(&self, index: u32, data: &[u8]) -> bool {
        let expected = self.chunk_sha256.get(index as usize);
        self.chunk_len(index) == Some(data.len())
            && expected.is_some_and(|h| *h == <[u8; 32]>::from(Sha256::digest(data)))
    }

    fn validate(&self, field: &'static str) -> Result<(), ValidationError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(ValidationError::OutOfRange {
                field,
                value: self.chunk_size.into(),
                min: 1.0,
                max: MAX_CHUNK_SIZE.into(),
            });
        }
        if self.size > MAX_ARTIFACT_SIZE {
            return Err(ValidationError::OutOfRange {
                field,
                value: self.size as f64,
                min: 0.0,
                max: MAX_ARTIFACT_SIZE as f64,
            });
        }
        if self.chunk_sha256.len() as u64 != self.chunk_count() {
            return Err(ValidationError::Inconsistent {
                field,
                problem: "the number of chunk hashes does not match size / chunk_size",
            });
        }
        Ok(())
    }
}

/// Binary delta formats. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaFormat {
    /// zstd with the base file as dictionary (`zstd --patch-from` semantics).
    ZstdPatch,
}

/// A delta that rebuilds the new version from an older one the device already has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaInfo {
    /// The version the delta applies to.
    pub base: Version,
    /// How it is encoded.
    pub format: DeltaFormat,
    /// The delta file itself; the rebuilt model must match the manifest's full `sha256`.
    pub artifact: ArtifactInfo,
}

/// Which devices an update or policy is for. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSelector {
    /// Every device of the fleet.
    All,
    /// Devices in this group.
    Group {
        /// Group name.
        group: String,
    },
    /// These devices.
    Devices {
        /// Device ids.
        devices: Vec<String>,
    },
    /// A stable pseudo-random share of the fleet (or of one group), for canary rollouts.
    ///
    /// A device is in when `bucket(salt, device) < basis_points`, so raising `basis_points` with the
    /// same salt only ever adds devices: the 5% of a first step stay in at 50%.
    Canary {
        /// Restrict to this group; `None` for the whole fleet.
        group: Option<String>,
        /// Share in hundredths of a percent, `0..=10000`.
        basis_points: u16,
        /// Chosen per rollout so different rollouts pick different devices.
        salt: u32,
    },
}

impl TargetSelector {
    /// Whether the device `device`, member of `group`, is targeted.
    pub fn matches(&self, device: &str, group: Option<&str>) -> bool {
        match self {
            TargetSelector::All => true,
            TargetSelector::Group { group: g } => group == Some(g.as_str()),
            TargetSelector::Devices { devices } => devices.iter().any(|d| d == device),
            TargetSelector::Canary {
                group: g,
                basis_points,
                salt,
            } => {
                let in_group = g.as_deref().is_none_or(|g| group == Some(g));
                in_group && canary_bucket(*salt, device) < *basis_points
            }
        }
    }

    pub(crate) fn validate(&self, field: &'static str) -> Result<(), ValidationError> {
        match self {
            TargetSelector::All => Ok(()),
            TargetSelector::Group { group } => check_identifier(field, group),
            TargetSelector::Devices { devices } => {
                check_len(field, devices.len(), MAX_LIST_LEN)?;
                devices.iter().try_for_each(|d| check_identifier(field, d))
            }
            TargetSelector::Canary {
                group,
                basis_points,
                ..
            } => {
                if let Some(g) = group {
                    check_identifier(field, g)?;
                }
                if *basis_points > 10_000 {
                    return Err(ValidationError::OutOfRange {
                        field,
                        value: (*basis_points).into(),
                        min: 0.0,
                        max: 10_000.0,
                    });
                }
                Ok(())
            }
        }
    }
}

/// A device's canary bucket in `0..10000`: SHA-256 of the salt and id, reduced.
pub fn canary_bucket(salt: u32, device: &str) -> u16 {
    let mut h = Sha256::new();
    h.update(salt.to_le_bytes());
    h.update(device.as_bytes());
    let digest = h.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(head) % 10_000) as u16
}

/// What a signed OTA manifest says: this model version, these bytes, for these devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The model and version offered.
    pub model: ModelRef,
    /// The full model file.
    pub full: ArtifactInfo,
    /// A smaller delta from an older version, when one was built.
    pub delta: Option<DeltaInfo>,
    /// The model's metadata sidecar (JSON text: labels, input layout, output kind).
    pub sidecar: String,
    /// Which devices should install it.
    pub target: TargetSelector,
    /// When it was issued, milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
}

impl Signable for Manifest {
    const DOMAIN: &'static str = "cascade/v1/ota-manifest";
}

impl Manifest {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        self.model.validate("manifest.model.name")?;
        self.full.validate("manifest.full")?;
        if let Some(delta) = &self.delta {
            delta.artifact.validate("manifest.delta.artifact")?;
            if delta.base >= self.model.version {
                return Err(ValidationError::Inconsistent {
                    field: "manifest.delta.base",
                    problem: "a delta's base version must be older than the version it builds",
                });
            }
        }
        check_len("manifest.sidecar", self.sidecar.len(), MAX_SIDECAR_LEN)?;
        self.target.validate("manifest.target")
    }
}

/// Which file of a manifest a chunk belongs to. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// The full model.
    Full,
    /// The delta against [`DeltaInfo::base`].
    Delta,
}

/// A device asks for `count` chunks starting at `first`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    /// The model version being downloaded.
    pub model: ModelRef,
    /// Full file or delta.
    pub artifact: ArtifactKind,
    /// First chunk index.
    pub first: u32,
    /// How many chunks, `1..=64`.
    pub count: u16,
}

impl ChunkRequest {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        self.model.validate("chunk_request.model.name")?;
        if self.count == 0 || self.count > MAX_CHUNKS_PER_REQUEST {
            return Err(ValidationError::OutOfRange {
                field: "chunk_request.count",
                value: self.count.into(),
                min: 1.0,
                max: MAX_CHUNKS_PER_REQUEST.into(),
            });
        }
        Ok(())
    }
}

/// One chunk of an artifact.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// The model version it belongs to.
    pub model: ModelRef,
    /// Full file or delta.
    pub artifact: ArtifactKind,
    /// Chunk index.
    pub index: u32,
    /// The bytes; checked against the manifest's hash for this index. Base64 in JSON.
    #[serde_as(as = "Blob")]
    pub data: Vec<u8>,
}

impl Chunk {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        self.model.validate("chunk.model.name")?;
        check_len("chunk.data", self.data.len(), MAX_CHUNK_SIZE as usize)
    }
}

/// Where an update stands on a device. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtaState {
    /// A manifest for this device was seen and accepted.
    Available,
    /// Chunks are arriving.
    Downloading {
        /// Bytes stored so far.
        received_bytes: u64,
        /// Bytes in the artifact.
        total_bytes: u64,
    },
    /// The file is complete, its hash and signature hold, and the smoke test passed.
    Verified,
    /// The new model is serving.
    Activated,
    /// The new model was withdrawn and the previous one restored.
    RolledBack {
        /// Why (e.g. "escalation rate 0.41 over bound 0.20 within 300 s").
        reason: String,
    },
    /// The update was abandoned; the running model is unchanged.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A device reports an update's progress or outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaStatus {
    /// Device id.
    pub device: String,
    /// The model version concerned.
    pub model: ModelRef,
    /// Its state.
    pub state: OtaState,
    /// Device wall clock, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl OtaStatus {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        check_identifier("ota_status.device", &self.device)?;
        self.model.validate("ota_status.model.name")?;
        match &self.state {
            OtaState::RolledBack { reason } | OtaState::Failed { reason } => {
                check_text("ota_status.state.reason", reason)
            }
            OtaState::Downloading {
                received_bytes,
                total_bytes,
            } if received_bytes > total_bytes => Err(ValidationError::Inconsistent {
                field: "ota_status.state",
                problem: "received_bytes exceeds total_bytes",
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    #[test]
    fn describes_chunks_and_checks_them() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let info = ArtifactInfo::describe(&data, 1000);
        assert_eq!(info.chunk_count(), 3);
        assert_eq!(info.chunk_sha256.len(), 3);
        assert_eq!(info.chunk_len(2), Some(500));
        assert_eq!(info.chunk_len(3), None);
        assert!(info.chunk_matches(1, &data[1000..2000]));
        let mut bad = data[1000..2000].to_vec();
        bad[7] ^= 1;
        assert!(!info.chunk_matches(1, &bad));
        assert!(!info.chunk_matches(2, &data[2000..2499]), "short chunk");
        assert!(!info.chunk_matches(3, &[]), "index past the end");
    }

    #[test]
    fn canary_growth_keeps_earlier_devices() {
        let devices: Vec<String> = (0..2000).map(|i| format!("dev-{i}")).collect();
        let pick = |bp| {
            let sel = TargetSelector::Canary {
                group: None,
                basis_points: bp,
                salt: 42,
            };
            devices
                .iter()
                .filter(|d| sel.matches(d, None))
                .cloned()
                .collect::<Vec<_>>()
        };
        let (five, fifty, all) = (pick(500), pick(5000), pick(10_000));
        assert!(five.iter().all(|d| fifty.contains(d)));
        assert_eq!(all.len(), devices.len());
        // A 5% canary of 2000 devices lands near 100; the bound is loose on purpose.
        assert!((50..=150).contains(&five.len()), "5% picked {}", five.len());
        assert!(
            (850..=1150).contains(&fifty.len()),
            "50% picked {}",
            fifty.len()
        );
    }

    #[test]
    fn canary_respects_its_group() {
        let sel = TargetSelector::Canary {
            group: Some("lab".into()),
            basis_points: 10_000,
            salt: 1,
        };
        assert!(sel.matches("d1", Some("lab")));
        assert!(!sel.matches("d1", Some("field")));
        assert!(!sel.matches("d1", None));
    }

    #[test]
    fn selectors_match_groups_and_lists() {
        let group = TargetSelector::Group {
            group: "lab".into(),
        };
        assert!(group.matches("x", Some("lab")) && !group.matches("x", None));
        let list = TargetSelector::Devices {
            devices: vec!["a".into(), "b".into()],
        };
        assert!(list.matches("b", None) && !list.matches("c", None));
    }
}
