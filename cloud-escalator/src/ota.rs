//! Serves over-the-air model updates from the [registry](crate::registry) over MQTT.
//!
//! One task owns its own MQTT session (the escalation consumer's acknowledges manually and must
//! not wait behind chunk traffic). It learns devices and the model each runs from their retained
//! status, offers each device the newest registered version of that model as a retained, signed
//! manifest on `cascade/v1/{fleet}/{device}/ota/manifest`, answers chunk requests on
//! `.../ota/chunk`, and records what devices report on `.../ota/status`. The newest signed
//! policy update goes the same way, retained on each device's `.../policy`. Devices decide whether a
//! manifest's target includes them and whether to install it (docs/ota.md); this side only serves.
//! The registry is rescanned periodically, so `cloud-escalator models publish` and `models
//! rollout` take effect on a running escalator.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cascade_proto::model::ModelRef;
use cascade_proto::ota::{Chunk, ChunkRequest, MAX_CHUNKS_PER_REQUEST, OtaStatus};
use cascade_proto::topic::{Channel, DeviceTopic, Filter};
use cascade_proto::{Limits, Message, decode, encode};
use edge_agent::connection::Backoff;
use edge_agent::mqtt::{Session, SessionEvent};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::registry::{Entry, Registry};

/// `[ota]` in the escalator's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaConfig {
    /// The registry to serve (`cloud-escalator models publish --registry`); no OTA when absent.
    #[serde(default)]
    pub registry: Option<PathBuf>,
    /// How often the registry is rescanned, milliseconds.
    #[serde(default = "default_rescan_ms")]
    pub rescan_ms: u64,
    /// The signing key (`models keygen`) the fleet API signs rollout changes with; without it the
    /// API shows rollouts but cannot change them.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
}

fn default_rescan_ms() -> u64 {
    2000
}

/// What the OTA server did, for tests and metrics.
#[derive(Debug, Default)]
pub struct OtaStats {
    /// Manifests published (retained), all devices.
    pub manifests: AtomicU64,
    /// Chunks sent.
    pub chunks: AtomicU64,
    /// Chunk requests refused (unknown version, out of range).
    pub refused: AtomicU64,
    statuses: Mutex<HashMap<String, OtaStatus>>,
}

impl OtaStats {
    /// The last status each device reported.
    pub fn statuses(&self) -> HashMap<String, OtaStatus> {
        self.statuses.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

struct Server {
    registry: Registry,
    fleet: String,
    limits: Limits,
    /// Each known device's model name (if it reported one), from its status.
    devices: HashMap<String, Option<String>>,
    /// The newest signed policy update.
    policy: Option<cascade_proto::signing::Signed<cascade_proto::policy::Policy>>,
    /// The policy sequence each device was last offered.
    policy_offered: HashMap<String, u64>,
    /// Newest version per model name.
    latest: HashMap<String, Entry>,
    /// What each device was last offered (version and issue time), to publish only changes.
    offered: HashMap<String, (ModelRef, u64)>,
    stats: std::sync::Arc<OtaStats>,
}

impl Server {
    fn topic(&self, device: &str, channel: Channel) -> String {
        DeviceTopic {
            fleet: &self.fleet,
            device,
            channel,
        }
        .to_string()
    }

    fn rescan(&mut self) {
        match self.registry.latest_policy() {
            Ok(policy) => self.policy = policy,
            Err(e) => tracing::error!(error = %e, "cannot read the policy updates"),
        }
        match self.registry.latest() {
            Ok(entries) => {
                self.latest = entries
                    .into_iter()
                    .map(|e| (e.manifest.content.model.name.clone(), e))
                    .collect();
            }
            Err(e) => tracing::error!(error = %e, "cannot read the model registry"),
        }
    }

    /// Publishes the manifest each device should see, where it changed.
    fn offer(&mut self, session: &Session) {
        if let Some(policy) = &self.policy {
            let sequence = policy.content.sequence;
            for device in self.devices.keys() {
                if self.policy_offered.get(device) == Some(&sequence) {
                    continue;
                }
                let bytes = encode(&Message::PolicyUpdate(policy.clone()));
                if session.try_publish(&self.topic(device, Channel::Policy), true, bytes, None) {
                    tracing::info!(%device, sequence, "policy update offered");
                    self.policy_offered.insert(device.clone(), sequence);
                }
            }
        }
        for (device, model) in &self.devices {
            let Some(entry) = model.as_ref().and_then(|m| self.latest.get(m)) else {
                continue;
            };
            let m = &entry.manifest.content;
            let offer = (m.model.clone(), m.issued_at_ms);
            if self.offered.get(device) == Some(&offer) {
                continue;
            }
            let bytes = encode(&Message::OtaManifest(entry.manifest.clone()));
            if session.try_publish(&self.topic(device, Channel::OtaManifest), true, bytes, None) {
                tracing::info!(%device, model = %m.model, target = ?m.target, "update offered");
                self.stats.manifests.fetch_add(1, Ordering::Relaxed);
                self.offered.insert(device.clone(), offer);
            }
        }
    }

    fn serve(&mut self, session: &Session, device: &str, request: ChunkRequest) {
        // The version being offered is in memory since the last rescan; an older one (a device
        // finishing a download) is read from the registry.
        let cached = self
            .latest
            .get(&request.model.name)
            .filter(|e| e.manifest.content.model == request.model)
            .cloned();
        let entry = match cached.map_or_else(
            || {
                self.registry
                    .get(&request.model.name, request.model.version)
            },
            Ok,
        ) {
            Ok(entry) => entry,
            Err(e) => {
                self.refuse(device, &request, &e.to_string());
                return;
            }
        };
        let topic = self.topic(device, Channel::OtaChunk);
        let count = request.count.min(MAX_CHUNKS_PER_REQUEST);
        for index in request.first..request.first.saturating_add(u32::from(count)) {
            let data = match self.registry.chunk(&entry, request.artifact, index) {
                Ok(data) => data,
                Err(e) => {
                    self.refuse(device, &request, &e.to_string());
                    return;
                }
            };
            let bytes = encode(&Message::OtaChunk(Chunk {
                model: request.model.clone(),
                artifact: request.artifact,
                index,
                data,
            }));
            // A full client queue: the device asks again for what did not come.
            if !session.try_publish(&topic, false, bytes, None) {
                tracing::debug!(%device, index, "chunk not queued; the device will ask again");
                return;
            }
            self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn refuse(&self, device: &str, request: &ChunkRequest, why: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%device, model = %request.model, first = request.first, why, "chunk request refused");
    }

    fn incoming(&mut self, session: &Session, topic: &[u8], payload: &[u8]) {
        let topic = String::from_utf8_lossy(topic);
        let Ok(parsed) = DeviceTopic::parse(&topic) else {
            return;
        };
        let device = parsed.device.to_owned();
        match (parsed.channel, decode(payload, &self.limits)) {
            (Channel::Status, Ok(Message::DeviceStatus(status))) => {
                self.devices.insert(device, status.model.map(|m| m.name));
                self.offer(session);
            }
            (Channel::OtaRequest, Ok(Message::OtaChunkRequest(request))) => {
                self.serve(session, &device, request);
            }
            (Channel::OtaStatus, Ok(Message::OtaStatus(status))) => {
                tracing::info!(%device, model = %status.model, state = ?status.state, "device update status");
                if let Ok(mut statuses) = self.stats.statuses.lock() {
                    statuses.insert(device, status);
                }
            }
            (channel, Err(e)) => {
                tracing::warn!(%device, %channel, error = %e, "undecodable OTA traffic ignored");
            }
            _ => {}
        }
    }
}

/// Subscribes to `channels` of every device of `fleet`. Statuses at QoS 0: they are retained and
/// republished anyway, and the embedded broker gives a new QoS 1 subscription only 100 retained
/// messages (see `Session::try_subscribe_at_most_once`).
pub(crate) fn subscribe_device_channels(session: &Session, fleet: &str, channels: &[Channel]) {
    for &channel in channels {
        let Ok(filter) = Filter::channel(fleet, channel) else {
            continue;
        };
        let filter = filter.to_string();
        let queued = if channel == Channel::Status {
            session.try_subscribe_at_most_once(&filter)
        } else {
            session.try_subscribe(&filter)
        };
        if !queued {
            tracing::error!(%filter, "cannot subscribe: client queue full");
        }
    }
}

/// Runs the OTA server until `shutdown`.
pub async fn run(
    registry: Registry,
    fleet: String,
    config: OtaConfig,
    mut session: Session,
    stats: std::sync::Arc<OtaStats>,
    shutdown: CancellationToken,
) {
    let mut server = Server {
        registry,
        fleet,
        limits: Limits::default(),
        devices: HashMap::new(),
        latest: HashMap::new(),
        offered: HashMap::new(),
        policy: None,
        policy_offered: HashMap::new(),
        stats,
    };
    server.rescan();
    let mut rescan = tokio::time::interval(Duration::from_millis(config.rescan_ms.max(100)));
    let mut backoff = Backoff::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rescan.tick() => {
                server.rescan();
                server.offer(&session);
            }
            event = session.poll() => match event {
                SessionEvent::Connected { .. } => {
                    backoff.reset();
                    subscribe_device_channels(
                        &session,
                        &server.fleet,
                        &[Channel::Status, Channel::OtaRequest, Channel::OtaStatus],
                    );
                    // A new session: offer again (retained manifests survive, but a broker
                    // restarted without persistence lost them).
                    server.offered.clear();
                    server.policy_offered.clear();
                    server.offer(&session);
                }
                SessionEvent::Message(m) => {
                    server.incoming(&session, &m.topic, &m.payload);
                }
                SessionEvent::Lost(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, "OTA server lost the broker");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                SessionEvent::Disconnected | SessionEvent::Other => {}
            }
        }
    }
    session.disconnect(Duration::from_millis(500)).await;
}
