//! The model registry: published edge-model versions and their signed OTA manifests, on disk.
//!
//! ```text
//! <registry>/<name>/<version>/model           the model file, immutable once published
//! <registry>/<name>/<version>/manifest.json   Signed<Manifest>: sizes, hashes, sidecar, target
//! <registry>/<name>/<version>/delta            zstd delta from the previous version, when smaller
//! ```
//!
//! `cloud-escalator models publish` writes a version; `models rollout` re-signs its manifest for a
//! wider target (the next canary step). A running escalator rescans the registry and offers each
//! device the newest version of its model whose target includes it (docs/ota.md).
//! Writes go to a temporary file, are flushed and renamed, so a crash never leaves half a version.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cascade_infer::metadata::Metadata;
use cascade_proto::model::{ModelRef, Version};
use cascade_proto::ota::{
    ArtifactInfo, ArtifactKind, DeltaFormat, DeltaInfo, Manifest, TargetSelector,
};
use cascade_proto::policy::Policy;
use cascade_proto::signing::{KeyId, Signed, SigningKey};
use sha2::{Digest, Sha256};

/// Default chunk size: 64 KiB keeps each chunk message small next to the 1 MiB message limit
/// and a resumed download loses little.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// What went wrong in the registry. None of these is helped by retrying as is.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// File system trouble, with the path.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// Published versions are immutable; publish a new version instead.
    #[error("{0} is already published; versions are immutable, publish a higher version")]
    Exists(ModelRef),
    /// No such version.
    #[error("{0} is not in the registry (see `cloud-escalator models list`)")]
    NotFound(String),
    /// The model's sidecar is missing or invalid.
    #[error("sidecar {path}: {problem}")]
    Sidecar {
        /// The sidecar path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A stored manifest does not parse.
    #[error("{path}: corrupt manifest: {problem}")]
    Corrupt {
        /// The manifest path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The key file is unusable.
    #[error("signing key {path}: {problem}")]
    Key {
        /// The key path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A bad argument (target, chunk size, name).
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |error| RegistryError::Io {
        path: path.to_owned(),
        error,
    }
}

/// One published version, as listed.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The signed manifest.
    pub manifest: Signed<Manifest>,
    /// Where the model file is.
    pub model_path: PathBuf,
}

/// A registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// Opens (creating if needed) the registry at `dir`.
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Registry {
            dir: dir.to_owned(),
        })
    }

    fn version_dir(&self, name: &str, version: Version) -> PathBuf {
        self.dir.join(name).join(version.to_string())
    }

    /// Publishes `model` (with its sidecar `<model>.toml`) as `name` `version` for `target`,
    /// signed with `key`. The sidecar's name and version are set to the published ones.
    pub fn publish(
        &self,
        model: &Path,
        name: &str,
        version: Version,
        target: TargetSelector,
        key: &SigningKey,
        chunk_size: u32,
    ) -> Result<Signed<Manifest>, RegistryError> {
        // The name is checked (with the rest of the sidecar) before anything is written.
        let model_ref = ModelRef::new(name, version);
        if !(1..=cascade_proto::ota::MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(RegistryError::Invalid(format!(
                "chunk size {chunk_size} outside 1..={}",
                cascade_proto::ota::MAX_CHUNK_SIZE
            )));
        }
        if self
            .version_dir(name, version)
            .join("manifest.json")
            .exists()
        {
            return Err(RegistryError::Exists(model_ref));
        }
        let bytes = fs::read(model).map_err(io(model))?;
        let sidecar_path = Metadata::sidecar_path(model);
        let sidecar = fs::read_to_string(&sidecar_path).map_err(io(&sidecar_path))?;
        self.publish_bytes(&bytes, &sidecar, name, version, target, key, chunk_size)
            .map_err(|e| match e {
                RegistryError::Sidecar { problem, .. } => RegistryError::Sidecar {
                    path: sidecar_path,
                    problem,
                },
                e => e,
            })
    }

    /// Publishes a model given as bytes and sidecar text (see [`Registry::publish`]).
    #[allow(clippy::too_many_arguments)]
    pub fn publish_bytes(
        &self,
        bytes: &[u8],
        sidecar: &str,
        name: &str,
        version: Version,
        target: TargetSelector,
        key: &SigningKey,
        chunk_size: u32,
    ) -> Result<Signed<Manifest>, RegistryError> {
        let model_ref = ModelRef::new(name, version);
        let dir = self.version_dir(name, version);
        if dir.join("manifest.json").exists() {
            return Err(RegistryError::Exists(model_ref));
        }
        let sidecar =
            restamp_sidecar(sidecar, name, version).map_err(|problem| RegistryError::Sidecar {
                path: PathBuf::from("(sidecar)"),
                problem,
            })?;
        // A delta from the highest earlier version, when it saves at least a tenth.
        let delta = self.delta_from_previous(name, version, bytes)?;
        let manifest = Manifest {
            model: model_ref,
            full: ArtifactInfo::describe(bytes, chunk_size),
            delta: delta.as_ref().map(|(base, d)| DeltaInfo {
                base: *base,
                format: DeltaFormat::ZstdPatch,
                artifact: ArtifactInfo::describe(d, chunk_size),
            }),
            sidecar,
            target,
            issued_at_ms: now_ms(),
        };
        let signed = Signed::sign(manifest, key);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_atomically(&dir.join("model"), bytes)?;
        if let Some((_, d)) = &delta {
            write_atomically(&dir.join("delta"), d)?;
        }
        self.write_manifest(&dir, &signed)?;
        Ok(signed)
    }

    fn delta_from_previous(
        &self,
        name: &str,
        version: Version,
        bytes: &[u8],
    ) -> Result<Option<(Version, Vec<u8>)>, RegistryError> {
        let previous = match self.list() {
            Ok(entries) => entries.into_iter().rfind(|e| {
                e.manifest.content.model.name == name && e.manifest.content.model.version < version
            }),
            Err(_) => None,
        };
        let Some(previous) = previous else {
            return Ok(None);
        };
        let base = fs::read(&previous.model_path).map_err(io(&previous.model_path))?;
        let delta = edge_agent::delta::encode(&base, bytes).map_err(io(&previous.model_path))?;
        Ok((delta.len() < bytes.len() * 9 / 10)
            .then_some((previous.manifest.content.model.version, delta)))
    }

    /// Re-signs a published version's manifest for a new target (a rollout step).
    pub fn rollout(
        &self,
        name: &str,
        version: Version,
        target: TargetSelector,
        key: &SigningKey,
    ) -> Result<Signed<Manifest>, RegistryError> {
        let entry = self.get(name, version)?;
        let mut manifest = entry.manifest.content;
        manifest.target = target;
        manifest.issued_at_ms = now_ms().max(manifest.issued_at_ms + 1);
        let signed = Signed::sign(manifest, key);
        self.write_manifest(&self.version_dir(name, version), &signed)?;
        Ok(signed)
    }

    /// Stops offering a version: devices that have not installed it are offered the newest
    /// version before it instead (those that did keep it; see [`Registry::roll_back`]).
    pub fn pause(&self, name: &str, version: Version) -> Result<(), RegistryError> {
        self.get(name, version)?;
        let path = self.version_dir(name, version).join("paused");
        write_atomically(&path, b"paused by an operator\n")
    }

    /// Offers a paused version again.
    pub fn resume(&self, name: &str, version: Version) -> Result<(), RegistryError> {
        self.get(name, version)?;
        let path = self.version_dir(name, version).join("paused");
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Whether a version is paused.
    pub fn is_paused(&self, name: &str, version: Version) -> bool {
        self.version_dir(name, version).join("paused").exists()
    }

    /// Rolls a version back: pauses it and publishes the newest earlier, unpaused version's model
    /// again as a new version above every existing one, for the same devices. Devices never
    /// install an older version (a replayed manifest must not downgrade them), so going back means
    /// going forward to the old bytes. Returns the new version's manifest.
    pub fn roll_back(
        &self,
        name: &str,
        version: Version,
        key: &SigningKey,
    ) -> Result<Signed<Manifest>, RegistryError> {
        let bad = self.get(name, version)?;
        let versions: Vec<Entry> = self
            .list()?
            .into_iter()
            .filter(|e| e.manifest.content.model.name == name)
            .collect();
        let good = versions
            .iter()
            .rev()
            .find(|e| {
                let v = e.manifest.content.model.version;
                v < version && !self.is_paused(name, v)
            })
            .ok_or_else(|| {
                RegistryError::Invalid(format!(
                    "{name} {version} has no earlier unpaused version to roll back to; pause it instead"
                ))
            })?;
        let highest = versions
            .last()
            .map_or(version, |e| e.manifest.content.model.version);
        let next = Version::new(
            highest.major,
            highest.minor,
            highest.patch.checked_add(1).ok_or_else(|| {
                RegistryError::Invalid(format!("{highest}: no patch number left"))
            })?,
        );
        let bytes = fs::read(&good.model_path).map_err(io(&good.model_path))?;
        self.pause(name, version)?;
        self.publish_bytes(
            &bytes,
            &good.manifest.content.sidecar,
            name,
            next,
            bad.manifest.content.target.clone(),
            key,
            good.manifest.content.full.chunk_size,
        )
    }

    fn write_manifest(&self, dir: &Path, signed: &Signed<Manifest>) -> Result<(), RegistryError> {
        let json = serde_json::to_vec_pretty(signed).map_err(|e| RegistryError::Corrupt {
            path: dir.join("manifest.json"),
            problem: e.to_string(),
        })?;
        write_atomically(&dir.join("manifest.json"), &json)
    }

    /// One version.
    pub fn get(&self, name: &str, version: Version) -> Result<Entry, RegistryError> {
        let dir = self.version_dir(name, version);
        let path = dir.join("manifest.json");
        if !path.exists() {
            return Err(RegistryError::NotFound(format!("{name} {version}")));
        }
        let text = fs::read(&path).map_err(io(&path))?;
        let manifest = serde_json::from_slice(&text).map_err(|e| RegistryError::Corrupt {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        Ok(Entry {
            manifest,
            model_path: dir.join("model"),
        })
    }

    /// Every version, by name then version.
    pub fn list(&self) -> Result<Vec<Entry>, RegistryError> {
        let mut entries = Vec::new();
        for name in read_dir_names(&self.dir)? {
            for version in read_dir_names(&self.dir.join(&name))? {
                let Ok(version) = version.parse::<Version>() else {
                    continue;
                };
                match self.get(&name, version) {
                    Ok(entry) => entries.push(entry),
                    // A version being published (no manifest yet) is not listed.
                    Err(RegistryError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        entries.sort_by(|a, b| {
            (
                &a.manifest.content.model.name,
                a.manifest.content.model.version,
            )
                .cmp(&(
                    &b.manifest.content.model.name,
                    b.manifest.content.model.version,
                ))
        });
        Ok(entries)
    }

    /// The newest version of each model name that is not paused.
    pub fn latest(&self) -> Result<Vec<Entry>, RegistryError> {
        let mut latest: Vec<Entry> = Vec::new();
        for entry in self.list()? {
            let model = &entry.manifest.content.model;
            if self.is_paused(&model.name, model.version) {
                continue;
            }
            match latest.last_mut() {
                Some(last)
                    if last.manifest.content.model.name == entry.manifest.content.model.name =>
                {
                    *last = entry;
                }
                _ => latest.push(entry),
            }
        }
        Ok(latest)
    }

    /// Bytes of chunk `index` of a version's model file, or of its delta.
    pub fn chunk(
        &self,
        entry: &Entry,
        kind: ArtifactKind,
        index: u32,
    ) -> Result<Vec<u8>, RegistryError> {
        let (info, path) = match (kind, &entry.manifest.content.delta) {
            (ArtifactKind::Full, _) => (&entry.manifest.content.full, entry.model_path.clone()),
            (ArtifactKind::Delta, Some(d)) => {
                (&d.artifact, entry.model_path.with_file_name("delta"))
            }
            (ArtifactKind::Delta, None) => {
                return Err(RegistryError::Invalid(format!(
                    "{} has no delta",
                    entry.manifest.content.model
                )));
            }
        };
        let len = info
            .chunk_len(index)
            .ok_or_else(|| RegistryError::Invalid(format!("chunk {index} out of range")))?;
        let path = &path;
        let mut file = fs::File::open(path).map_err(io(path))?;
        file.seek(SeekFrom::Start(
            u64::from(index) * u64::from(info.chunk_size),
        ))
        .map_err(io(path))?;
        let mut data = vec![0; len];
        file.read_exact(&mut data).map_err(io(path))?;
        Ok(data)
    }
}

impl Registry {
    fn policies_dir(&self) -> PathBuf {
        // A model may not be named `.policies` (names start with a letter or digit).
        self.dir.join(".policies")
    }

    /// Signs `policy` as the next policy update (its sequence is set to one above the last) and
    /// stores it; a running escalator offers it to every device it targets.
    pub fn publish_policy(
        &self,
        mut policy: Policy,
        key: &SigningKey,
    ) -> Result<Signed<Policy>, RegistryError> {
        let dir = self.policies_dir();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        policy.sequence = self.latest_policy()?.map_or(1, |p| p.content.sequence + 1);
        let signed = Signed::sign(policy, key);
        // The checks devices apply (ranges, target), before anything is stored.
        let message = cascade_proto::Message::PolicyUpdate(signed.clone());
        cascade_proto::decode(
            &cascade_proto::encode(&message),
            &cascade_proto::Limits::default(),
        )
        .map_err(|e| RegistryError::Invalid(format!("policy refused: {e}")))?;
        let json = serde_json::to_vec_pretty(&signed)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        write_atomically(
            &dir.join(format!("{:020}.json", signed.content.sequence)),
            &json,
        )?;
        Ok(signed)
    }

    /// The newest policy update, if any.
    pub fn latest_policy(&self) -> Result<Option<Signed<Policy>>, RegistryError> {
        let dir = self.policies_dir();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(None);
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        let Some(path) = names.pop() else {
            return Ok(None);
        };
        let text = fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| RegistryError::Corrupt {
                path,
                problem: e.to_string(),
            })
    }
}

/// Sets `name` and `version` in a sidecar's TOML, keeping the rest; checks the result is a valid
/// sidecar.
fn restamp_sidecar(text: &str, name: &str, version: Version) -> Result<String, String> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    table.insert("name".into(), toml::Value::String(name.into()));
    table.insert("version".into(), toml::Value::String(version.to_string()));
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    Metadata::parse(&text)?;
    Ok(text)
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, RegistryError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        if entry.file_type().map_err(io(dir))?.is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    edge_agent::ota::write_file_atomically(path, bytes).map_err(io(path))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Parses a target: `all`, `group:NAME`, `devices:A,B,...`, or `canary:PERCENT[@GROUP]` (e.g.
/// `canary:5`, `canary:12.5@field`). Canary salts derive from the model name, so a later, wider
/// step of the same model keeps the devices of the earlier ones.
pub fn parse_target(text: &str, model: &str) -> Result<TargetSelector, RegistryError> {
    let bad = || {
        RegistryError::Invalid(format!(
            "target {text:?}: expected all, group:NAME, devices:A,B,... or canary:PERCENT[@GROUP]"
        ))
    };
    let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
    match kind {
        "all" if rest.is_empty() => Ok(TargetSelector::All),
        "group" if !rest.is_empty() => Ok(TargetSelector::Group { group: rest.into() }),
        "devices" if !rest.is_empty() => Ok(TargetSelector::Devices {
            devices: rest.split(',').map(str::to_owned).collect(),
        }),
        "canary" => {
            let (percent, group) = match rest.split_once('@') {
                Some((p, g)) => (p, Some(g.to_owned())),
                None => (rest, None),
            };
            let percent: f64 = percent.trim_end_matches('%').parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&percent) {
                return Err(bad());
            }
            let digest = Sha256::digest(model.as_bytes());
            let salt = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
            Ok(TargetSelector::Canary {
                group,
                basis_points: (percent * 100.0).round() as u16,
                salt,
            })
        }
        _ => Err(bad()),
    }
}

/// Writes a new signing key (hex, owner-only permissions) to `path`; returns its public half.
pub fn keygen(path: &Path) -> Result<SigningKey, RegistryError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| RegistryError::Key {
        path: path.to_owned(),
        problem: format!("no randomness: {e}"),
    })?;
    let key = SigningKey::from_bytes(&secret);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| RegistryError::Key {
        path: path.to_owned(),
        problem: format!("{e} (an existing key is never overwritten)"),
    })?;
    writeln!(file, "{}", hex::encode(secret)).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok(key)
}

/// Reads a signing key written by [`keygen`].
pub fn load_key(path: &Path) -> Result<SigningKey, RegistryError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| RegistryError::Key {
            path: path.to_owned(),
            problem: "expected 64 hex digits (a key from `cloud-escalator models keygen`)".into(),
        })?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// The id devices know a key by.
pub fn key_id(key: &SigningKey) -> KeyId {
    KeyId::of(&key.verifying_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    #[test]
    fn a_published_version_is_signed_immutable_and_served_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let key = keygen(&dir.path().join("k")).unwrap();
        let model = models().join("digits-edge.f32.onnx");
        let v2 = Version::new(2, 0, 0);
        let signed = registry
            .publish(&model, "digits-edge", v2, TargetSelector::All, &key, 1000)
            .unwrap();
        let mut keys = cascade_proto::signing::Keyring::new();
        keys.add(key.verifying_key());
        let manifest = signed.verify(&keys).unwrap();
        let bytes = fs::read(&model).unwrap();
        assert_eq!(manifest.full, ArtifactInfo::describe(&bytes, 1000));
        let sidecar = Metadata::parse(&manifest.sidecar).unwrap();
        assert_eq!(
            (sidecar.name.as_str(), sidecar.version.as_str()),
            ("digits-edge", "2.0.0")
        );

        assert!(matches!(
            registry.publish(&model, "digits-edge", v2, TargetSelector::All, &key, 1000),
            Err(RegistryError::Exists(_))
        ));
        let entry = registry.get("digits-edge", v2).unwrap();
        let rebuilt: Vec<u8> = (0..manifest.full.chunk_count() as u32)
            .flat_map(|i| registry.chunk(&entry, ArtifactKind::Full, i).unwrap())
            .collect();
        assert_eq!(rebuilt, bytes);
        assert!(registry.chunk(&entry, ArtifactKind::Full, 10_000).is_err());
        assert!(
            manifest.delta.is_none(),
            "the first version has nothing to diff against"
        );

        // A rollout step re-signs with the new target and a later issue time.
        let wider = registry
            .rollout(
                "digits-edge",
                v2,
                parse_target("canary:50", "digits-edge").unwrap(),
                &key,
            )
            .unwrap();
        assert!(wider.content.issued_at_ms > manifest.issued_at_ms);
        assert_eq!(registry.get("digits-edge", v2).unwrap().manifest, wider);
    }

    #[test]
    fn pausing_hides_a_version_and_rolling_back_republishes_the_previous_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let (v1, v2) = (Version::new(1, 0, 0), Version::new(1, 1, 0));
        let base = models().join("digits-edge.f32.onnx");
        let retrained = models().join("testdata/digits-edge.unsure.onnx");
        let canary = parse_target("canary:10", "digits-edge").unwrap();
        registry
            .publish(&base, "digits-edge", v1, TargetSelector::All, &key, 4096)
            .unwrap();
        // Nothing earlier to go back to.
        assert!(matches!(
            registry.roll_back("digits-edge", v1, &key),
            Err(RegistryError::Invalid(_))
        ));
        registry
            .publish(&retrained, "digits-edge", v2, canary.clone(), &key, 4096)
            .unwrap();
        let newest = |r: &Registry| r.latest().unwrap()[0].manifest.content.model.version;
        assert_eq!(newest(&registry), v2);
        registry.pause("digits-edge", v2).unwrap();
        assert!(registry.is_paused("digits-edge", v2));
        assert_eq!(newest(&registry), v1);
        registry.resume("digits-edge", v2).unwrap();
        assert_eq!(newest(&registry), v2);

        let back = registry.roll_back("digits-edge", v2, &key).unwrap();
        assert_eq!(back.content.model.version, Version::new(1, 1, 1));
        assert_eq!(back.content.target, canary, "the same devices");
        assert!(registry.is_paused("digits-edge", v2));
        assert_eq!(newest(&registry), Version::new(1, 1, 1));
        let entry = registry.get("digits-edge", Version::new(1, 1, 1)).unwrap();
        assert_eq!(
            fs::read(entry.model_path).unwrap(),
            fs::read(&base).unwrap()
        );
        assert!(matches!(
            registry.pause("digits-edge", Version::new(9, 0, 0)),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn a_retrained_version_carries_a_delta_from_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let (v1, v2) = (Version::new(1, 0, 0), Version::new(1, 1, 0));
        let base = models().join("digits-edge.f32.onnx");
        let retrained = models().join("testdata/digits-edge.unsure.onnx");
        registry
            .publish(&base, "digits-edge", v1, TargetSelector::All, &key, 1024)
            .unwrap();
        let signed = registry
            .publish(
                &retrained,
                "digits-edge",
                v2,
                TargetSelector::All,
                &key,
                1024,
            )
            .unwrap();
        let delta = signed.content.delta.clone().expect("a delta");
        assert_eq!(delta.base, v1);
        assert!(delta.artifact.size * 4 < signed.content.full.size);
        let entry = registry.get("digits-edge", v2).unwrap();
        let bytes: Vec<u8> = (0..delta.artifact.chunk_count() as u32)
            .flat_map(|i| registry.chunk(&entry, ArtifactKind::Delta, i).unwrap())
            .collect();
        let rebuilt = edge_agent::delta::apply(&fs::read(&base).unwrap(), &bytes, 1 << 20).unwrap();
        assert_eq!(rebuilt, fs::read(&retrained).unwrap());
    }

    #[test]
    fn latest_is_the_highest_version_of_each_model() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let model = models().join("digits-edge.f32.onnx");
        for v in [
            Version::new(1, 10, 0),
            Version::new(1, 9, 0),
            Version::new(1, 2, 3),
        ] {
            registry
                .publish(&model, "digits-edge", v, TargetSelector::All, &key, 4096)
                .unwrap();
        }
        let latest = registry.latest().unwrap();
        assert_eq!(latest.len(), 1);
        assert_eq!(
            latest[0].manifest.content.model.version,
            Version::new(1, 10, 0)
        );
        assert_eq!(registry.list().unwrap().len(), 3);
    }

    #[test]
    fn policies_are_numbered_in_order_and_the_newest_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        assert!(registry.latest_policy().unwrap().is_none());
        let example =
            match cascade_proto::examples::example(cascade_proto::MessageKind::PolicyUpdate) {
                cascade_proto::Message::PolicyUpdate(p) => p.content,
                _ => unreachable!(),
            };
        let first = registry.publish_policy(example.clone(), &key).unwrap();
        let second = registry.publish_policy(example, &key).unwrap();
        assert_eq!((first.content.sequence, second.content.sequence), (1, 2));
        assert_eq!(registry.latest_policy().unwrap().as_ref(), Some(&second));
        // Policies do not show up as models.
        assert!(registry.list().unwrap().is_empty());
        // A policy devices would refuse is refused here.
        let mut bad = second.content.clone();
        bad.threshold = 5.0;
        let e = registry.publish_policy(bad, &key).unwrap_err().to_string();
        assert!(e.contains("threshold"), "{e}");
        assert_eq!(
            registry.latest_policy().unwrap().unwrap().content.sequence,
            2
        );
    }

    #[test]
    fn targets_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!(parse_target("all", "m").unwrap(), TargetSelector::All);
        assert_eq!(
            parse_target("devices:a,b", "m").unwrap(),
            TargetSelector::Devices {
                devices: vec!["a".into(), "b".into()]
            }
        );
        let five = parse_target("canary:5%", "m").unwrap();
        let fifty = parse_target("canary:50@field", "m").unwrap();
        match (five, fifty) {
            (
                TargetSelector::Canary {
                    basis_points: 500,
                    salt: a,
                    group: None,
                },
                TargetSelector::Canary {
                    basis_points: 5000,
                    salt: b,
                    group: Some(g),
                },
            ) => assert_eq!((a, g.as_str()), (b, "field"), "one salt per model"),
            other => panic!("{other:?}"),
        }
        for bad in ["", "some", "group:", "canary:150", "canary:x"] {
            let e = parse_target(bad, "m").unwrap_err().to_string();
            assert!(e.contains("canary:PERCENT"), "{e}");
        }
    }

    #[test]
    fn keys_round_trip_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.key");
        let key = keygen(&path).unwrap();
        assert_eq!(load_key(&path).unwrap().to_bytes(), key.to_bytes());
        assert!(keygen(&path).is_err());
        fs::write(dir.path().join("bad.key"), "nope").unwrap();
        assert!(
            load_key(&dir.path().join("bad.key"))
                .unwrap_err()
                .to_string()
                .contains("64 hex digits")
        );
    }
}
