//! Over-the-air model updates on the device: check the signed manifest, download the model in
//! verified chunks (resuming after a restart), smoke-test it, and switch to it atomically.
//!
//! ```text
//! <state_dir>/ota/download/manifest.json   the signed manifest being downloaded
//! <state_dir>/ota/download/model.part      chunks written at their offsets (delta.part: a delta's)
//! <state_dir>/ota/download/model.have      one byte per chunk: 1 once its bytes are on disk
//! <state_dir>/models/<name>-<version>/model (+ model.toml)   installed versions (kept)
//! <state_dir>/models/active.toml           which installed version serves; written last,
//!                                          atomically (tmp, fsync, rename, fsync dir)
//! ```
//!
//! The running model serves until the new one is verified and loaded once; the switch is the
//! rename of `active.toml`, so a crash at any point leaves either the old or the new pointer,
//! both to complete, verified files. On start the agent serves the active version if it loads,
//! else the configured model: never none.
//!
//! A manifest is refused (and the refusal reported on `ota/status`) when its signature does not
//! verify against `trusted_keys`, when it offers a version not above the running one (replayed
//! older manifests cannot downgrade a device), or when it is larger than `ota.max_model_bytes`.
//! A chunk whose hash differs from the manifest's is dropped and asked for again; after
//! `ota.max_bad_chunks` such chunks the update fails and the running model stays.
//!
//! After a switch, a health watch ([`judge`]) compares the new version's failed inferences and
//! escalation rate with bounds and with the previous version's rate; failing, it restores the
//! previous version, never installs the failing one again, and reports `rolled_back`.
//!
//! When the manifest carries a delta from the running version, the delta is downloaded instead
//! and applied to the running model's file ([`crate::delta`]); if the result does not match the
//! manifest's hash, the whole file is downloaded.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cascade_infer::metadata::Metadata;
use cascade_infer::{LoadOptions, Tensor, load_path};
use cascade_proto::model::ModelRef;
use cascade_proto::ota::{
    ArtifactInfo, ArtifactKind, Chunk, ChunkRequest, DeltaFormat, MAX_CHUNKS_PER_REQUEST, Manifest,
    OtaState, OtaStatus,
};
use cascade_proto::signing::{Keyring, Signed};
use cascade_proto::topic::Channel;
use cascade_proto::{Message, encode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::link::LinkCommand;
use crate::stats::{Stats, now_ms};

/// `[ota]` in the agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaConfig {
    /// Accept model updates (they also need `trusted_keys`).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Largest model accepted, bytes.
    #[serde(default = "default_max_model_bytes")]
    pub max_model_bytes: u64,
    /// Chunks requested ahead.
    #[serde(default = "default_window")]
    pub window: u16,
    /// Ask again for chunks that did not come within this, milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Chunks failing their hash before the update is abandoned.
    #[serde(default = "default_max_bad_chunks")]
    pub max_bad_chunks: u32,
    /// After switching to a new version, watch its health this long, seconds.
    #[serde(default = "default_health_window_s")]
    pub health_window_s: u64,
    /// Roll back when the new version escalates more than this many times the previous
    /// version's rate (measured over at least `health_min_inputs` inputs each).
    #[serde(default = "default_max_escalation_factor")]
    pub max_escalation_factor: f64,
    /// Inputs needed before the escalation rate is judged.
    #[serde(default = "default_health_min_inputs")]
    pub health_min_inputs: u64,
    /// Roll back after this many failed inferences within the window.
    #[serde(default = "default_max_errors")]
    pub max_errors: u64,
}

impl Default for OtaConfig {
    fn default() -> Self {
        OtaConfig {
            enabled: true,
            max_model_bytes: default_max_model_bytes(),
            window: default_window(),
            timeout_ms: default_timeout_ms(),
            max_bad_chunks: default_max_bad_chunks(),
            health_window_s: default_health_window_s(),
            max_escalation_factor: default_max_escalation_factor(),
            health_min_inputs: default_health_min_inputs(),
            max_errors: default_max_errors(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_max_model_bytes() -> u64 {
    256 << 20
}
fn default_window() -> u16 {
    16
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_max_bad_chunks() -> u32 {
    8
}
fn default_health_window_s() -> u64 {
    300
}
fn default_max_escalation_factor() -> f64 {
    2.0
}
fn default_health_min_inputs() -> u64 {
    50
}
fn default_max_errors() -> u64 {
    10
}

/// OTA traffic the link hands over.
#[derive(Debug)]
pub enum OtaInbound {
    /// A (retained) manifest on this device's `ota/manifest` topic, not yet verified.
    Manifest(Box<Signed<Manifest>>),
    /// A chunk on this device's `ota/chunk` topic.
    Chunk(Chunk),
}

/// Which installed version serves (`<state_dir>/models/active.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Active {
    /// The model file; its sidecar is beside it.
    pub path: PathBuf,
    /// `name@version`.
    pub model: String,
    /// What served before, restored on a rollback (`None`: the configured model).
    pub previous: Option<PathBuf>,
    /// Until when (Unix ms) the health watch may still roll this version back.
    #[serde(default)]
    pub probation_until_ms: Option<u64>,
    /// The previous version's escalation rate, when it had seen enough inputs to tell.
    #[serde(default)]
    pub baseline_escalation_rate: Option<f64>,
}

/// What the health watch concludes from the counters since the switch.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// Keep watching.
    Watching,
    /// Roll back, for this reason.
    Failing(String),
}

/// Judges a freshly activated version from its counters (pure).
pub fn judge(
    config: &OtaConfig,
    baseline_rate: Option<f64>,
    inputs: u64,
    escalations: u64,
    errors: u64,
) -> Health {
    if errors >= config.max_errors.max(1) {
        return Health::Failing(format!(
            "{errors} failed inferences within the health window (bound {})",
            config.max_errors
        ));
    }
    if let Some(baseline) = baseline_rate
        && inputs >= config.health_min_inputs.max(1)
    {
        let rate = escalations as f64 / inputs as f64;
        // A floor under the baseline: a model that escalated almost nothing may go to a few
        // percent without it being a regression worth a rollback.
        let bound = config.max_escalation_factor * baseline.max(0.02);
        if rate > bound {
            return Health::Failing(format!(
                "escalation rate {rate:.3} over bound {bound:.3} ({}× the previous version's {baseline:.3}) after {inputs} inputs",
                config.max_escalation_factor
            ));
        }
    }
    Health::Watching
}

fn active_path(state_dir: &Path) -> PathBuf {
    state_dir.join("models").join("active.toml")
}

/// The installed version the agent should serve, if an update was activated.
pub fn active_model(state_dir: &Path) -> Option<Active> {
    let text = fs::read_to_string(active_path(state_dir)).ok()?;
    match toml::from_str::<Active>(&text) {
        Ok(active) if active.path.exists() => Some(active),
        Ok(active) => {
            tracing::error!(path = %active.path.display(), "the active model file is missing; serving the configured model");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "models/active.toml is unreadable; serving the configured model");
            None
        }
    }
}

/// Why an update was given up.
#[derive(Debug, thiserror::Error)]
enum UpdateError {
    #[error("{0}")]
    Refused(String),
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UpdateError + 'a {
    move |error| UpdateError::Io {
        what,
        path: path.to_owned(),
        error,
    }
}

/// A download in progress.
struct Download {
    manifest: Signed<Manifest>,
    /// The full file, or a delta from the running version.
    kind: ArtifactKind,
    /// Size and chunk hashes of what is downloaded (`manifest.full` or the delta's).
    info: ArtifactInfo,
    part: fs::File,
    have: Vec<bool>,
    have_file: fs::File,
    /// Requested and not yet received.
    pending: BTreeSet<u32>,
    /// Written but not yet flushed to disk and marked in `have`.
    unsynced: Vec<u32>,
    bad_chunks: u32,
    last_progress: tokio::time::Instant,
}

impl Download {
    fn model(&self) -> &ModelRef {
        &self.manifest.content.model
    }

    fn received_bytes(&self) -> u64 {
        let info = &self.info;
        self.have
            .iter()
            .enumerate()
            .filter(|(_, h)| **h)
            .map(|(i, _)| info.chunk_len(i as u32).unwrap_or(0) as u64)
            .sum()
    }

    fn complete(&self) -> bool {
        self.unsynced.is_empty() && self.have.iter().all(|h| *h)
    }
}

/// The device side of OTA: one task, fed by the link.
pub struct Updater {
    device: String,
    group: Option<String>,
    keyring: Keyring,
    config: OtaConfig,
    load: LoadOptions,
    state_dir: PathBuf,
    /// What serves now.
    running: ModelRef,
    running_path: PathBuf,
    link: mpsc::Sender<LinkCommand>,
    download: Option<Download>,
    /// Versions that failed here; not tried again until a newer one.
    failed: HashSet<ModelRef>,
    /// Manifests already refused (by issue time), so a retained one is reported once.
    refused: HashSet<u64>,
    /// Versions whose delta did not rebuild the file: fetched whole instead.
    delta_failed: HashSet<ModelRef>,
    /// Set to the new model's path once one is activated (or the old one's on a rollback):
    /// the agent restarts on it.
    activated: watch::Sender<Option<PathBuf>>,
    stats: Arc<Stats>,
    /// The health watch over a version switched to recently.
    probation: Option<Probation>,
}

/// A version on probation, and the counters when the watch began.
#[derive(Debug, Clone)]
struct Probation {
    until_ms: u64,
    baseline: Option<f64>,
    inputs: u64,
    escalations: u64,
    errors: u64,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("device", &self.device)
            .field("running", &self.running)
            .finish()
    }
}

impl Updater {
    /// An updater for `device` (in `group`) running `running` from `running_path`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: String,
        group: Option<String>,
        keyring: Keyring,
        config: OtaConfig,
        load: LoadOptions,
        state_dir: PathBuf,
        running: ModelRef,
        running_path: PathBuf,
        link: mpsc::Sender<LinkCommand>,
        activated: watch::Sender<Option<PathBuf>>,
        stats: Arc<Stats>,
    ) -> Self {
        let failed = fs::read_to_string(state_dir.join("ota").join("rejected"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (name, version) = l.split_once('@')?;
                Some(ModelRef::new(name, version.parse().ok()?))
            })
            .collect();
        Updater {
            device,
            group,
            keyring,
            config,
            load,
            state_dir,
            running,
            running_path,
            link,
            download: None,
            failed,
            refused: HashSet::new(),
            delta_failed: HashSet::new(),
            activated,
            stats,
            probation: None,
        }
    }

    fn counters(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.stats.inputs.load(Relaxed),
            self.stats.escalations.load(Relaxed),
            self.stats.errors.load(Relaxed),
        )
    }

    /// Starts the health watch when the running version was switched to recently.
    fn begin_probation(&mut self) {
        let Some(active) = active_model(&self.state_dir) else {
            return;
        };
        let running = format!("{}@{}", self.running.name, self.running.version);
        match active.probation_until_ms {
            Some(until_ms) if active.model == running && until_ms > now_ms() => {
                let (inputs, escalations, errors) = self.counters();
                tracing::info!(model = %running, remaining_s = (until_ms - now_ms()) / 1000, "watching the new model's health");
                self.probation = Some(Probation {
                    until_ms,
                    baseline: active.baseline_escalation_rate,
                    inputs,
                    escalations,
                    errors,
                });
            }
            _ => {}
        }
    }

    async fn watch_health(&mut self) {
        let Some(p) = &self.probation else {
            return;
        };
        let (inputs, escalations, errors) = self.counters();
        match judge(
            &self.config,
            p.baseline,
            inputs - p.inputs,
            escalations - p.escalations,
            errors - p.errors,
        ) {
            Health::Failing(reason) => {
                self.probation = None;
                self.roll_back(reason).await;
            }
            Health::Watching if now_ms() >= p.until_ms => {
                self.probation = None;
                tracing::info!(model = %self.running, "the new model passed its health window");
                if let Some(mut active) = active_model(&self.state_dir) {
                    active.probation_until_ms = None;
                    if let Ok(text) = toml::to_string(&active) {
                        let _ = write_atomically(&active_path(&self.state_dir), text.as_bytes());
                    }
                }
            }
            Health::Watching => {}
        }
    }

    /// Goes back to the version that served before, never to try this one again.
    async fn roll_back(&mut self, reason: String) {
        let model = self.running.clone();
        let previous = active_model(&self.state_dir).and_then(|a| a.previous);
        let rejected = self.state_dir.join("ota").join("rejected");
        let persisted = fs::create_dir_all(self.state_dir.join("ota")).and_then(|()| {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&rejected)?;
            writeln!(f, "{}@{}", model.name, model.version)?;
            f.sync_all()
        });
        if let Err(e) = persisted {
            tracing::error!(error = %e, "cannot record the rejected version");
        }
        self.failed.insert(model.clone());
        // Back to the previous installed version, or (none) to the configured model.
        let switched = match previous.as_ref().filter(|p| p.exists()) {
            Some(path) => {
                let name = Metadata::for_model(path)
                    .map(|m| format!("{}@{}", m.name, m.version))
                    .unwrap_or_else(|_| path.display().to_string());
                let active = Active {
                    path: path.clone(),
                    model: name,
                    previous: None,
                    probation_until_ms: None,
                    baseline_escalation_rate: None,
                };
                toml::to_string(&active)
                    .map_err(|e| e.to_string())
                    .and_then(|t| {
                        write_atomically(&active_path(&self.state_dir), t.as_bytes())
                            .map_err(|e| e.to_string())
                    })
            }
            None => match fs::remove_file(active_path(&self.state_dir)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
        };
        if let Err(e) = switched {
            tracing::error!(error = %e, "rollback could not rewrite models/active.toml");
        }
        self.report(&model, OtaState::RolledBack { reason }).await;
        let back = previous.unwrap_or_else(|| self.running_path.clone());
        let _ = self.activated.send(Some(back));
    }

    fn download_dir(&self) -> PathBuf {
        self.state_dir.join("ota").join("download")
    }

    async fn report(&self, model: &ModelRef, state: OtaState) {
        match &state {
            OtaState::Failed { reason } | OtaState::RolledBack { reason } => {
                tracing::warn!(%model, %reason, "model update not installed");
            }
            other => tracing::info!(%model, state = ?other, "model update"),
        }
        let bytes = encode(&Message::OtaStatus(OtaStatus {
            device: self.device.clone(),
            model: model.clone(),
            state,
            at_ms: now_ms(),
        }));
        let _ = self
            .link
            .send(LinkCommand::Publish {
                channel: Channel::OtaStatus,
                bytes,
                retain: false,
            })
            .await;
    }

    /// Runs until `shutdown`, taking manifests and chunks from `inbound`.
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<OtaInbound>,
        shutdown: CancellationToken,
    ) {
        self.begin_probation();
        self.resume().await;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                message = inbound.recv() => match message {
                    Some(OtaInbound::Manifest(m)) => self.manifest(*m).await,
                    Some(OtaInbound::Chunk(c)) => self.chunk(c).await,
                    None => break,
                },
                _ = tick.tick() => self.timers().await,
            }
        }
        if let Some(d) = &mut self.download {
            // Keep what arrived for the next start.
            let _ = flush(d);
        }
    }

    /// Picks up a download a previous run left.
    async fn resume(&mut self) {
        let dir = self.download_dir();
        let Ok(text) = fs::read(dir.join("manifest.json")) else {
            return;
        };
        match serde_json::from_slice::<Signed<Manifest>>(&text) {
            Ok(signed) if signed.content.model.version > self.running.version => {
                tracing::info!(model = %signed.content.model, "resuming a model download");
                self.manifest(signed).await;
            }
            _ => {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }

    async fn manifest(&mut self, signed: Signed<Manifest>) {
        let issued = signed.content.issued_at_ms;
        let offered = signed.content.model.clone();
        let refuse = |reason: String| (offered.clone(), reason);
        let verdict: Result<(), (ModelRef, String)> = (|| {
            let manifest = signed
                .verify(&self.keyring)
                .map_err(|e| refuse(format!("manifest refused: {e}")))?;
            if !manifest.target.matches(&self.device, self.group.as_deref()) {
                return Err(refuse(String::new()));
            }
            if manifest.model.name != self.running.name {
                return Err(refuse(format!(
                    "manifest is for model {:?}; this device runs {:?}",
                    manifest.model.name, self.running.name
                )));
            }
            if manifest.model.version <= self.running.version {
                if manifest.model.version == self.running.version {
                    return Err(refuse(String::new()));
                }
                return Err(refuse(format!(
                    "downgrade refused: {} is older than the running {}",
                    manifest.model.version, self.running.version
                )));
            }
            if self.failed.contains(&manifest.model) {
                return Err(refuse(String::new()));
            }
            if manifest.full.size > self.config.max_model_bytes {
                return Err(refuse(format!(
                    "model of {} bytes exceeds ota.max_model_bytes = {}",
                    manifest.full.size, self.config.max_model_bytes
                )));
            }
            Ok(())
        })();
        match verdict {
            Err((_, reason)) if reason.is_empty() => {
                tracing::debug!(model = %offered, "manifest not for this device or nothing new");
            }
            Err((model, reason)) => {
                if self.refused.insert(issued) {
                    self.report(&model, OtaState::Failed { reason }).await;
                }
            }
            Ok(()) => {
                if self
                    .download
                    .as_ref()
                    .is_some_and(|d| d.model() == &offered)
                {
                    return; // Already downloading (a re-signed rollout step, or a resume).
                }
                match self.start_download(signed) {
                    Ok(d) => {
                        self.download = Some(d);
                        self.report(&offered, OtaState::Available).await;
                        self.request_more().await;
                    }
                    Err(e) => {
                        self.report(
                            &offered,
                            OtaState::Failed {
                                reason: e.to_string(),
                            },
                        )
                        .await;
                    }
                }
            }
        }
    }

    fn start_download(&self, signed: Signed<Manifest>) -> Result<Download, UpdateError> {
        let dir = self.download_dir();
        let manifest_path = dir.join("manifest.json");
        // A delta when the device runs its base version (and it did not fail before).
        let (kind, info, stem) = match &signed.content.delta {
            Some(d)
                if d.base == self.running.version
                    && d.format == DeltaFormat::ZstdPatch
                    && !self.delta_failed.contains(&signed.content.model) =>
            {
                (ArtifactKind::Delta, d.artifact.clone(), "delta")
            }
            _ => (ArtifactKind::Full, signed.content.full.clone(), "model"),
        };
        // The same version as a download left on disk: keep its chunks.
        let same = fs::read(&manifest_path)
            .ok()
            .and_then(|t| serde_json::from_slice::<Signed<Manifest>>(&t).ok())
            .is_some_and(|old| old.content == signed.content);
        if !same {
            let _ = fs::remove_dir_all(&dir);
        }
        fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let chunks = info.chunk_count() as usize;
        let part_path = dir.join(format!("{stem}.part"));
        // No part file (a crash after it was moved into place, before the switch): nothing
        // downloaded counts any more.
        let part_existed = part_path.exists();
        let part = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .map_err(io("cannot open", &part_path))?;
        part.set_len(info.size)
            .map_err(io("cannot size", &part_path))?;
        let have_path = dir.join(format!("{stem}.have"));
        let mut have_bytes = if part_existed {
            fs::read(&have_path).unwrap_or_default()
        } else {
            Vec::new()
        };
        have_bytes.resize(chunks, 0);
        let have_file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&have_path)
            .map_err(io("cannot open", &have_path))?;
        have_file
            .set_len(chunks as u64)
            .map_err(io("cannot size", &have_path))?;
        if !same {
            let json = serde_json::to_vec(&signed)
                .map_err(|e| UpdateError::Refused(format!("manifest cannot be stored: {e}")))?;
            write_atomically(&manifest_path, &json)?;
        }
        let have: Vec<bool> = have_bytes.iter().map(|b| *b == 1).collect();
        let resumed = have.iter().filter(|h| **h).count();
        if resumed > 0 {
            tracing::info!(
                chunks = resumed,
                of = chunks,
                "download resumes with chunks already on disk"
            );
        }
        Ok(Download {
            manifest: signed,
            kind,
            info,
            part,
            have,
            have_file,
            pending: BTreeSet::new(),
            unsynced: Vec::new(),
            bad_chunks: 0,
            last_progress: tokio::time::Instant::now(),
        })
    }

    /// Asks for missing chunks, up to the window, in contiguous runs.
    async fn request_more(&mut self) {
        let Some(d) = &mut self.download else {
            return;
        };
        let window = usize::from(self.config.window.max(1));
        let mut requests = Vec::new();
        let mut i = 0u32;
        let total = d.have.len() as u32;
        let wanted = |d: &Download, j: u32| {
            !d.have[j as usize] && !d.pending.contains(&j) && !d.unsynced.contains(&j)
        };
        while d.pending.len() < window && i < total {
            if !wanted(d, i) {
                i += 1;
                continue;
            }
            let first = i;
            while i < total
                && wanted(d, i)
                && d.pending.len() < window
                && (i - first) < u32::from(MAX_CHUNKS_PER_REQUEST)
            {
                d.pending.insert(i);
                i += 1;
            }
            requests.push(ChunkRequest {
                model: d.manifest.content.model.clone(),
                artifact: d.kind,
                first,
                count: (i - first) as u16,
            });
        }
        for request in requests {
            let bytes = encode(&Message::OtaChunkRequest(request));
            let _ = self
                .link
                .send(LinkCommand::Publish {
                    channel: Channel::OtaRequest,
                    bytes,
                    retain: false,
                })
                .await;
        }
    }

    async fn chunk(&mut self, chunk: Chunk) {
        let Some(d) = &mut self.download else {
            return;
        };
        if &chunk.model != d.model()
            || chunk.artifact != d.kind
            || d.have.get(chunk.index as usize).is_none_or(|h| *h)
            || d.unsynced.contains(&chunk.index)
        {
            return; // Not for this download, or a duplicate.
        }
        d.pending.remove(&chunk.index);
        d.last_progress = tokio::time::Instant::now();
        let info = &d.info;
        if !info.chunk_matches(chunk.index, &chunk.data) {
            d.bad_chunks += 1;
            tracing::warn!(model = %d.model(), index = chunk.index, "chunk does not match the signed manifest; asking again");
            if d.bad_chunks >= self.config.max_bad_chunks {
                let model = d.model().clone();
                let reason = format!(
                    "{} chunks did not match the signed manifest (corrupted or tampered with on the way)",
                    d.bad_chunks
                );
                self.abandon(&model, reason).await;
                return;
            }
            self.request_more().await;
            return;
        }
        let offset = u64::from(chunk.index) * u64::from(info.chunk_size);
        if let Err(e) = d.part.write_all_at(&chunk.data, offset) {
            let model = d.model().clone();
            self.abandon(&model, format!("cannot write the download: {e}"))
                .await;
            return;
        }
        d.unsynced.push(chunk.index);
        if d.unsynced.len() >= usize::from(self.config.window.max(1)) || d.pending.is_empty() {
            self.checkpoint().await;
        }
        self.request_more().await;
    }

    /// Makes written chunks durable and reports progress; finishes the download when complete.
    async fn checkpoint(&mut self) {
        let Some(d) = &mut self.download else {
            return;
        };
        if let Err(e) = flush(d) {
            let model = d.model().clone();
            self.abandon(&model, format!("cannot store the download: {e}"))
                .await;
            return;
        }
        let model = d.model().clone();
        let (received, total) = (d.received_bytes(), d.info.size);
        let complete = d.complete();
        self.report(
            &model,
            OtaState::Downloading {
                received_bytes: received,
                total_bytes: total,
            },
        )
        .await;
        if complete {
            self.install().await;
        }
    }

    async fn timers(&mut self) {
        self.watch_health().await;
        let Some(d) = &mut self.download else {
            return;
        };
        if !d.unsynced.is_empty() {
            self.checkpoint().await;
            return;
        }
        if !d.pending.is_empty()
            && d.last_progress.elapsed() >= Duration::from_millis(self.config.timeout_ms)
        {
            tracing::info!(model = %d.model(), missing = d.pending.len(), "chunks overdue; asking again");
            d.pending.clear();
            d.last_progress = tokio::time::Instant::now();
            self.request_more().await;
        }
    }

    async fn abandon(&mut self, model: &ModelRef, reason: String) {
        self.download = None;
        let _ = fs::remove_dir_all(self.download_dir());
        self.failed.insert(model.clone());
        self.report(model, OtaState::Failed { reason }).await;
    }

    /// Verifies the whole file, installs it beside the running model, smoke-tests it, and
    /// switches to it.
    async fn install(&mut self) {
        let Some(d) = self.download.take() else {
            return;
        };
        let model = d.model().clone();
        let signed = d.manifest.clone();
        let manifest = d.manifest.content.clone();
        let from_delta = d.kind == ArtifactKind::Delta;
        drop(d);
        let dir = self.download_dir();
        let target = self
            .state_dir
            .join("models")
            .join(format!("{}-{}", model.name, model.version));
        let load = self.load.clone();
        let previous = self.running_path.clone();
        let state_dir = self.state_dir.clone();
        let (inputs, escalations, _) = self.counters();
        let baseline = (inputs >= self.config.health_min_inputs.max(1))
            .then(|| escalations as f64 / inputs as f64);
        let probation_until_ms = now_ms() + self.config.health_window_s * 1000;
        let base = self.running_path.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            if from_delta {
                rebuild_from_delta(&dir, &base, &manifest)?;
            }
            install_files(&dir, &target, &manifest, &load)?;
            let model_path = target.join("model");
            let active = Active {
                path: model_path.clone(),
                model: format!("{}@{}", manifest.model.name, manifest.model.version),
                previous: Some(previous),
                probation_until_ms: Some(probation_until_ms),
                baseline_escalation_rate: baseline,
            };
            let text = toml::to_string(&active)
                .map_err(|e| UpdateError::Refused(format!("cannot write active.toml: {e}")))?;
            write_atomically(&active_path(&state_dir), text.as_bytes())?;
            let _ = fs::remove_dir_all(&dir);
            Ok::<_, UpdateError>(model_path)
        })
        .await;
        match outcome {
            Ok(Ok(path)) => {
                self.report(&model, OtaState::Verified).await;
                self.report(&model, OtaState::Activated).await;
                self.running = model;
                self.running_path = path.clone();
                let _ = self.activated.send(Some(path));
            }
            Ok(Err(e)) if from_delta => {
                // The whole file may still be fine: fetch it instead of the delta.
                tracing::warn!(%model, error = %e, "the delta did not rebuild the model; downloading it whole");
                self.delta_failed.insert(model.clone());
                match self.start_download(signed) {
                    Ok(d) => {
                        self.download = Some(d);
                        self.request_more().await;
                    }
                    Err(e) => self.abandon(&model, e.to_string()).await,
                }
            }
            Ok(Err(e)) => self.abandon(&model, e.to_string()).await,
            Err(e) => {
                self.abandon(&model, format!("install task failed: {e}"))
                    .await
            }
        }
    }
}

/// Flushes written chunks to disk, then marks them in `have` (and flushes that): a chunk is
/// marked only once its bytes are durable.
fn flush(d: &mut Download) -> std::io::Result<()> {
    if d.unsynced.is_empty() {
        return Ok(());
    }
    d.part.sync_data()?;
    for &i in &d.unsynced {
        d.have_file.write_all_at(&[1], u64::from(i))?;
        d.have[i as usize] = true;
    }
    d.have_file.sync_data()?;
    d.unsynced.clear();
    Ok(())
}

/// Applies the downloaded delta to the running model's file, writing `model.part` (checked
/// against the manifest's hash by [`install_files`]).
fn rebuild_from_delta(
    download: &Path,
    base: &Path,
    manifest: &Manifest,
) -> Result<(), UpdateError> {
    let delta_path = download.join("delta.part");
    let delta = fs::read(&delta_path).map_err(io("cannot read", &delta_path))?;
    let base_bytes = fs::read(base).map_err(io("cannot read the running model", base))?;
    let full = crate::delta::apply(&base_bytes, &delta, manifest.full.size)
        .map_err(|e| UpdateError::Refused(format!("the delta does not apply: {e}")))?;
    let part = download.join("model.part");
    fs::write(&part, full).map_err(io("cannot write", &part))
}

/// Checks the complete file against the manifest, moves it and its sidecar into `target`, and
/// loads and runs it once.
fn install_files(
    download: &Path,
    target: &Path,
    manifest: &Manifest,
    load: &LoadOptions,
) -> Result<(), UpdateError> {
    let part = download.join("model.part");
    let bytes = fs::read(&part).map_err(io("cannot read", &part))?;
    if <[u8; 32]>::from(Sha256::digest(&bytes)) != manifest.full.sha256 {
        return Err(UpdateError::Refused(
            "the assembled file's sha256 differs from the signed manifest".into(),
        ));
    }
    Metadata::parse(&manifest.sidecar)
        .map_err(|e| UpdateError::Refused(format!("the manifest's sidecar is invalid: {e}")))?;
    fs::create_dir_all(target).map_err(io("cannot create", target))?;
    let model_path = target.join("model");
    write_atomically(
        &Metadata::sidecar_path(&model_path),
        manifest.sidecar.as_bytes(),
    )?;
    fs::rename(&part, &model_path).map_err(io("cannot move", &part))?;
    sync_dir(target)?;
    if let Err(reason) = smoke_test(&model_path, load) {
        let _ = fs::remove_dir_all(target);
        return Err(UpdateError::Refused(format!("smoke test failed: {reason}")));
    }
    Ok(())
}

/// Loads the model, checks its sidecar against it, and runs it once on a synthetic input: the
/// outputs must be finite.
fn smoke_test(model_path: &Path, load: &LoadOptions) -> Result<(), String> {
    let model = load_path(model_path, load).map_err(|e| e.to_string())?;
    let meta = Metadata::for_model(model_path).map_err(|e| e.to_string())?;
    meta.check_against(model.info())?;
    let inputs: Vec<Tensor> = model
        .info()
        .inputs
        .iter()
        .map(|spec| crate::bench::synthetic_input(spec, 1))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let outputs = model.run(inputs).map_err(|e| e.to_string())?;
    if outputs
        .iter()
        .any(|o| o.to_f32().iter().any(|v| !v.is_finite()))
    {
        return Err("the model produced non-finite outputs".into());
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    write_file_atomically(path, bytes).map_err(io("cannot write", path))
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, never a mix:
/// a temporary file beside it, flushed, renamed over it, and the directory flushed. Creates the
/// directory if needed. The escalator's model registry writes the same way.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot flush directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::ota::{ArtifactInfo, TargetSelector};
    use cascade_proto::signing::SigningKey;
    use cascade_proto::{Limits, decode};

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    struct Rig {
        inbound: mpsc::Sender<OtaInbound>,
        link: mpsc::Receiver<LinkCommand>,
        activated: watch::Receiver<Option<PathBuf>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn rig(state_dir: &Path, key: &SigningKey) -> Rig {
        rig_with(state_dir, key, OtaConfig::default())
    }

    fn rig_with(state_dir: &Path, key: &SigningKey, config: OtaConfig) -> Rig {
        let (inbound, inbound_rx) = mpsc::channel(64);
        let (link_tx, link) = mpsc::channel(64);
        let (activated_tx, activated) = watch::channel(None);
        let mut keyring = Keyring::new();
        keyring.add(key.verifying_key());
        let updater = Updater::new(
            "dev-1".into(),
            None,
            keyring,
            config,
            LoadOptions::default(),
            state_dir.to_owned(),
            ModelRef::new("digits-edge", "1.0.0".parse().unwrap()),
            models().join("digits-edge.int8.tflite"),
            link_tx,
            activated_tx,
            Arc::new(Stats::default()),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(updater.run(inbound_rx, shutdown.clone()));
        Rig {
            inbound,
            link,
            activated,
            shutdown,
            task,
        }
    }

    /// The next chunk request the updater sends (statuses are skipped).
    async fn next_request(link: &mut mpsc::Receiver<LinkCommand>) -> ChunkRequest {
        loop {
            let command = tokio::time::timeout(Duration::from_secs(10), link.recv())
                .await
                .expect("a request in time")
                .expect("updater running");
            if let LinkCommand::Publish { bytes, .. } = command
                && let Ok(Message::OtaChunkRequest(r)) = decode(&bytes, &Limits::default())
            {
                return r;
            }
        }
    }

    fn signed_manifest(bytes: &[u8], key: &SigningKey) -> Signed<Manifest> {
        let sidecar = fs::read_to_string(models().join("digits-edge.f32.onnx.toml"))
            .unwrap()
            .replace("version = \"1.0.0\"", "version = \"2.0.0\"");
        Signed::sign(
            Manifest {
                model: ModelRef::new("digits-edge", "2.0.0".parse().unwrap()),
                full: ArtifactInfo::describe(bytes, 1024),
                delta: None,
                sidecar,
                target: TargetSelector::All,
                issued_at_ms: 1,
            },
            key,
        )
    }

    fn chunk(bytes: &[u8], index: u32) -> OtaInbound {
        let start = index as usize * 1024;
        OtaInbound::Chunk(Chunk {
            model: ModelRef::new("digits-edge", "2.0.0".parse().unwrap()),
            artifact: ArtifactKind::Full,
            index,
            data: bytes[start..(start + 1024).min(bytes.len())].to_vec(),
        })
    }

    #[test]
    fn the_health_watch_judges_errors_and_the_escalation_rate_against_the_baseline() {
        let config = OtaConfig::default(); // 2x, 50 inputs, 10 errors
        assert_eq!(
            judge(&config, Some(0.1), 49, 49, 0),
            Health::Watching,
            "too few inputs"
        );
        assert_eq!(
            judge(&config, Some(0.1), 100, 20, 0),
            Health::Watching,
            "exactly 2x"
        );
        let Health::Failing(reason) = judge(&config, Some(0.1), 100, 21, 0) else {
            panic!("over 2x the baseline");
        };
        assert!(
            reason.contains("escalation rate 0.210 over bound 0.200"),
            "{reason}"
        );
        // A near-zero baseline is floored at 2%: 3% is not a regression, 5% is.
        assert_eq!(judge(&config, Some(0.0), 100, 3, 0), Health::Watching);
        assert!(matches!(
            judge(&config, Some(0.0), 100, 5, 0),
            Health::Failing(_)
        ));
        // Without a baseline only errors count.
        assert_eq!(judge(&config, None, 1000, 1000, 9), Health::Watching);
        let Health::Failing(reason) = judge(&config, None, 1000, 0, 10) else {
            panic!("ten failed inferences");
        };
        assert!(reason.contains("10 failed inferences"), "{reason}");
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_without_fetching_stored_chunks_again() {
        let state = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        let bytes = fs::read(models().join("digits-edge.f32.onnx")).unwrap();
        let manifest = signed_manifest(&bytes, &key);
        assert_eq!(manifest.content.full.chunk_count(), 6);

        let mut first = rig(state.path(), &key);
        first
            .inbound
            .send(OtaInbound::Manifest(Box::new(manifest.clone())))
            .await
            .unwrap();
        let request = next_request(&mut first.link).await;
        assert_eq!((request.first, request.count), (0, 6));
        // Three chunks arrive, one of them corrupted on the way; then the agent stops.
        for i in [0, 1] {
            first.inbound.send(chunk(&bytes, i)).await.unwrap();
        }
        let mut bad = chunk(&bytes, 2);
        if let OtaInbound::Chunk(c) = &mut bad {
            c.data[0] ^= 1;
        }
        first.inbound.send(bad).await.unwrap();
        // The bad chunk is asked for again.
        let again = next_request(&mut first.link).await;
        assert_eq!((again.first, again.count), (2, 1));
        tokio::time::sleep(Duration::from_millis(500)).await;
        first.shutdown.cancel();
        first.task.await.unwrap();
        assert!(first.activated.borrow().is_none());

        // Restarted: only the chunks not on disk are requested, and the update completes.
        let mut second = rig(state.path(), &key);
        let resumed = next_request(&mut second.link).await;
        assert_eq!(
            (resumed.first, resumed.count),
            (2, 4),
            "chunks 0 and 1 were kept"
        );
        for i in 2..6 {
            second.inbound.send(chunk(&bytes, i)).await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(20), second.activated.changed())
            .await
            .expect("activated")
            .unwrap();
        let active = active_model(state.path()).expect("active.toml written");
        assert_eq!(active.model, "digits-edge@2.0.0");
        assert_eq!(fs::read(&active.path).unwrap(), bytes);
        assert!(
            Metadata::for_model(&active.path).is_ok(),
            "sidecar beside it"
        );
        second.shutdown.cancel();
        second.task.await.unwrap();
    }

    #[tokio::test]
    async fn chunks_lost_with_the_connection_are_asked_for_again() {
        let state = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        let bytes = fs::read(models().join("digits-edge.f32.onnx")).unwrap();
        let config = OtaConfig {
            timeout_ms: 300,
            ..OtaConfig::default()
        };
        let mut rig = rig_with(state.path(), &key, config);
        rig.inbound
            .send(OtaInbound::Manifest(Box::new(signed_manifest(
                &bytes, &key,
            ))))
            .await
            .unwrap();
        assert_eq!(next_request(&mut rig.link).await.count, 6);
        // The connection drops after four chunks: the last two never come.
        for i in 0..4 {
            rig.inbound.send(chunk(&bytes, i)).await.unwrap();
        }
        let again = next_request(&mut rig.link).await;
        assert_eq!(
            (again.first, again.count),
            (4, 2),
            "asked again after the timeout"
        );
        for i in 4..6 {
            rig.inbound.send(chunk(&bytes, i)).await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(20), rig.activated.changed())
            .await
            .expect("activated")
            .unwrap();
        rig.shutdown.cancel();
        rig.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_crash_between_installing_and_switching_serves_the_old_model_and_recovers() {
        let state = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        let bytes = fs::read(models().join("digits-edge.f32.onnx")).unwrap();
        let manifest = signed_manifest(&bytes, &key);
        // The state a kill leaves after the file was moved into place and before active.toml
        // was renamed: the download's manifest and a full `have`, no part file, no switch.
        let download = state.path().join("ota/download");
        fs::create_dir_all(&download).unwrap();
        fs::write(
            download.join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        fs::write(download.join("model.have"), [1u8; 6]).unwrap();
        let installed = state.path().join("models/digits-edge-2.0.0");
        fs::create_dir_all(&installed).unwrap();
        fs::write(installed.join("model"), &bytes).unwrap();
        assert!(active_model(state.path()).is_none(), "the old model serves");

        let mut rig = rig(state.path(), &key);
        let request = next_request(&mut rig.link).await;
        assert_eq!(
            (request.first, request.count),
            (0, 6),
            "nothing counts without the part file"
        );
        for i in 0..6 {
            rig.inbound.send(chunk(&bytes, i)).await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(20), rig.activated.changed())
            .await
            .expect("activated")
            .unwrap();
        assert_eq!(
            fs::read(active_model(state.path()).unwrap().path).unwrap(),
            bytes
        );
        rig.shutdown.cancel();
        rig.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_model_that_fails_its_smoke_test_is_not_activated() {
        let state = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        // Bytes that hash as the manifest says but are no model.
        let bytes = b"definitely not an ONNX or TFLite model".repeat(10);
        let mut rig = rig(state.path(), &key);
        rig.inbound
            .send(OtaInbound::Manifest(Box::new(signed_manifest(
                &bytes, &key,
            ))))
            .await
            .unwrap();
        let request = next_request(&mut rig.link).await;
        for i in request.first..request.first + u32::from(request.count) {
            rig.inbound.send(chunk(&bytes, i)).await.unwrap();
        }
        let failed = loop {
            let command = tokio::time::timeout(Duration::from_secs(10), rig.link.recv())
                .await
                .unwrap()
                .unwrap();
            if let LinkCommand::Publish { bytes, .. } = command
                && let Ok(Message::OtaStatus(s)) = decode(&bytes, &Limits::default())
                && let OtaState::Failed { reason } = s.state
            {
                break reason;
            }
        };
        assert!(failed.contains("smoke test failed"), "{failed}");
        assert!(active_model(state.path()).is_none());
        assert!(rig.activated.borrow().is_none());
        rig.shutdown.cancel();
        rig.task.await.unwrap();
    }
}
