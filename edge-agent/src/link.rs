//! The link to the fleet's broker: one task owning the MQTT connection and the escalation spool.
//!
//! It publishes escalations (spooled first), status and telemetry; receives verdicts, rejections
//! and signed policy updates; resubscribes whenever the broker answers a connection without the
//! session (rumqttc does not, and a client that trusts it stops receiving verdicts silently); and
//! republishes every escalation still awaiting its verdict after a restart or a lost session.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cascade_proto::escalation::RejectReason;
use cascade_proto::policy::Policy;
use cascade_proto::signing::Keyring;
use cascade_proto::status::DeviceStatus;
use cascade_proto::topic::{Channel, DeviceTopic};
use cascade_proto::{Limits, Message, decode, encode};
use rumqttc::v5::MqttOptions;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connection::Backoff;
use crate::input::{ResultEvent, Settled, Stage, settle};
use crate::mqtt::{Protocol, Session, SessionEvent, Will};
use crate::ota::OtaInbound;
use crate::spool::{DropReason, Dropped, Header, Spool};
use crate::stats::{Stats, bump, now_ms};

/// What the rest of the agent asks the link to send.
#[derive(Debug)]
pub enum LinkCommand {
    /// An escalation: spool it, then publish it.
    Escalate {
        /// Escalation id.
        id: Uuid,
        /// What the agent needs when the verdict comes.
        header: Header,
        /// The encoded message.
        bytes: Vec<u8>,
        /// Signalled once the escalation is in the spool.
        settled: Option<Settled>,
    },
    /// Any other message on one of this device's channels.
    Publish {
        /// Channel.
        channel: Channel,
        /// Encoded message.
        bytes: Vec<u8>,
        /// Retained (status).
        retain: bool,
    },
}

/// Who the link speaks for, and how.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Fleet.
    pub fleet: String,
    /// Device id.
    pub device: String,
    /// Device group.
    pub group: Option<String>,
    /// MQTT options (address, TLS, keep-alive).
    pub options: MqttOptions,
    /// MQTT version: 5, 3.1.1, or 5 falling back to 3.1.1.
    pub protocol: Protocol,
    /// MQTT 5 message expiry of escalations, seconds.
    pub message_expiry_s: u32,
    /// How long an escalation may wait for its verdict.
    pub verdict_timeout: Duration,
    /// Republish an escalation whose verdict is this late (an escalator replica may have died).
    pub retry_after: Duration,
    /// The device's offline status, registered as its last will.
    pub offline_status: DeviceStatus,
    /// Largest accepted message.
    pub limits: Limits,
}

/// Where the link delivers what it receives.
#[derive(Debug, Clone)]
pub struct LinkOutputs {
    /// Cloud results (verdicts, rejections, drops).
    pub results: mpsc::Sender<ResultEvent>,
    /// Newer signed policies, verified.
    pub policies: watch::Sender<Option<Policy>>,
    /// OTA manifests and chunks, for the updater (none: updates off).
    pub ota: Option<mpsc::Sender<OtaInbound>>,
}

fn topic(settings: &LinkSettings, channel: Channel) -> String {
    // Names were validated at configuration.
    DeviceTopic {
        fleet: &settings.fleet,
        device: &settings.device,
        channel,
    }
    .to_string()
}

/// A message waiting to be handed to the MQTT client.
struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    properties: Option<PublishProperties>,
}

struct Link {
    settings: LinkSettings,
    spool: Spool,
    keyring: Keyring,
    outputs: LinkOutputs,
    stats: Arc<Stats>,
    current_policy: u64,
    outbox: std::collections::VecDeque<Outgoing>,
    /// When each awaited escalation was last handed to the client.
    last_sent: std::collections::HashMap<Uuid, std::time::Instant>,
}

impl Link {
    fn escalation_properties(&self, id: Uuid) -> PublishProperties {
        PublishProperties {
            message_expiry_interval: Some(self.settings.message_expiry_s),
            response_topic: Some(topic(&self.settings, Channel::Verdict)),
            correlation_data: Some(Bytes::copy_from_slice(id.as_bytes())),
            content_type: Some("application/vnd.cascade.v1+postcard".into()),
            ..PublishProperties::default()
        }
    }

    fn queue_escalation(&mut self, id: Uuid, bytes: Vec<u8>) {
        self.last_sent.insert(id, std::time::Instant::now());
        self.stats
            .escalation_bytes
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let properties = Some(self.escalation_properties(id));
        self.outbox.push_back(Outgoing {
            topic: topic(&self.settings, Channel::Escalate),
            payload: bytes,
            retain: false,
            properties,
        });
    }

    async fn report_dropped(&self, dropped: Vec<Dropped>) {
        for d in dropped {
            bump(&self.stats.dropped);
            metrics::counter!("cascade_agent_dropped_total").increment(1);
            let reason = match d.reason {
                DropReason::Full => "spool full: oldest escalation dropped",
                DropReason::Expired => "no verdict in time",
                DropReason::Corrupt => "spool record unreadable",
                DropReason::TooLarge => {
                    "larger than the whole spool (mqtt.spool_max_bytes): not sent"
                }
            };
            tracing::warn!(escalation = %d.entry.id, input = %d.entry.header.input, reason, "escalation dropped");
            let mut event = ResultEvent::new(d.entry.header.input.clone(), Stage::Dropped);
            event.escalation = Some(d.entry.id);
            event.detail = Some(reason.into());
            let _ = self.outputs.results.send(event).await;
        }
        self.sync_spool_gauge();
    }

    fn sync_spool_gauge(&self) {
        self.stats.spooled.store(
            self.spool.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        metrics::gauge!("cascade_agent_spool_entries").set(self.spool.len() as f64);
    }

    async fn command(&mut self, command: LinkCommand) {
        match command {
            LinkCommand::Escalate {
                id,
                header,
                bytes,
                settled,
            } => {
                match self.spool.push(id, header, &bytes) {
                    Ok(dropped) => {
                        settle(settled);
                        let refused = dropped.iter().any(|d| d.entry.id == id);
                        self.report_dropped(dropped).await;
                        if refused {
                            return;
                        }
                    }
                    Err(e) => {
                        // Not durable, but still worth sending: count it and go on.
                        bump(&self.stats.errors);
                        tracing::error!(error = %e, "cannot write the escalation spool; sending without it");
                    }
                }
                self.sync_spool_gauge();
                self.queue_escalation(id, bytes);
            }
            LinkCommand::Publish {
                channel,
                bytes,
                retain,
            } => self.outbox.push_back(Outgoing {
                topic: topic(&self.settings, channel),
                payload: bytes,
                retain,
                properties: None,
            }),
        }
    }

    /// Republishes escalations whose verdict is later than `retry_after`.
    fn retry_late(&mut self) {
        let late: Vec<Uuid> = self
            .spool
            .ids()
            .into_iter()
            .filter(|id| {
                self.last_sent
                    .get(id)
                    .is_none_or(|t| t.elapsed() >= self.settings.retry_after)
            })
            .collect();
        for id in late {
            match self.spool.read(&id) {
                Ok(Some(bytes)) => {
                    tracing::debug!(escalation = %id, "verdict late: republishing");
                    self.queue_escalation(id, bytes);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, escalation = %id, "cannot read the spool"),
            }
        }
        let spool = &self.spool;
        self.last_sent.retain(|id, _| spool.get(id).is_some());
    }

    fn replay(&mut self) {
        match self.spool.outstanding() {
            Ok(entries) => {
                if !entries.is_empty() {
                    tracing::info!(
                        count = entries.len(),
                        "republishing escalations awaiting their verdict"
                    );
                }
                for (id, bytes) in entries {
                    self.queue_escalation(id, bytes);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the escalation spool"),
        }
    }

    /// Hands queued messages to the client until its request queue is full.
    fn flush(&mut self, session: &Session) {
        while let Some(out) = self.outbox.pop_front() {
            let queued = session.try_publish(
                &out.topic,
                out.retain,
                out.payload.clone(),
                out.properties.as_ref(),
            );
            if !queued {
                // The client's queue is full: keep the message for the next turn.
                self.outbox.push_front(out);
                return;
            }
        }
    }

    async fn incoming(&mut self, topic_name: &str, payload: &[u8]) {
        let Ok(topic) = DeviceTopic::parse(topic_name) else {
            bump(&self.stats.bad_messages);
            tracing::warn!(
                topic = topic_name,
                "message on a topic outside the scheme ignored"
            );
            return;
        };
        let message = match decode(payload, &self.settings.limits) {
            Ok(m) => m,
            Err(e) => {
                bump(&self.stats.bad_messages);
                tracing::warn!(topic = topic_name, error = %e, "undecodable message ignored");
                return;
            }
        };
        match (topic.channel, message) {
            (Channel::Verdict, Message::Verdict(v)) => self.verdict(v).await,
            (Channel::Verdict, Message::Rejection(r)) => self.rejection(r).await,
            (Channel::Policy, Message::PolicyUpdate(signed)) => {
                match signed.verify(&self.keyring) {
                    Ok(policy)
                        if !policy
                            .target
                            .matches(&self.settings.device, self.settings.group.as_deref()) =>
                    {
                        tracing::debug!(
                            sequence = policy.sequence,
                            "policy update not for this device"
                        );
                    }
                    Ok(policy) if policy.sequence <= self.current_policy => {
                        tracing::info!(
                            sequence = policy.sequence,
                            current = self.current_policy,
                            "stale policy update ignored (replay protection)"
                        );
                    }
                    Ok(policy) => {
                        tracing::info!(sequence = policy.sequence, "signed policy update accepted");
                        self.current_policy = policy.sequence;
                        let _ = self.outputs.policies.send(Some(policy.clone()));
                    }
                    Err(e) => {
                        bump(&self.stats.bad_messages);
                        tracing::warn!(error = %e, "policy update refused");
                    }
                }
            }
            (Channel::OtaManifest, Message::OtaManifest(m)) => {
                if let Some(ota) = &self.outputs.ota {
                    let _ = ota.send(OtaInbound::Manifest(Box::new(m))).await;
                }
            }
            (Channel::OtaChunk, Message::OtaChunk(c)) => {
                // A full queue drops the chunk; the updater asks for it again.
                if let Some(ota) = &self.outputs.ota {
                    let _ = ota.try_send(OtaInbound::Chunk(c));
                }
            }
            (channel, m) => {
                tracing::debug!(%channel, kind = %m.kind(), "message not handled by this agent");
            }
        }
    }

    async fn verdict(&mut self, v: cascade_proto::escalation::Verdict) {
        if self.spool.is_applied(&v.id) {
            bump(&self.stats.duplicate_verdicts);
            tracing::debug!(escalation = %v.id, "duplicate verdict ignored");
            return;
        }
        let Some(entry) = self.spool.get(&v.id).cloned() else {
            bump(&self.stats.unknown_verdicts);
            tracing::warn!(escalation = %v.id, "verdict for an unknown escalation dropped");
            return;
        };
        if let Err(e) = self.spool.complete(v.id) {
            tracing::error!(error = %e, escalation = %v.id, "cannot record the applied verdict; not applying it now");
            return;
        }
        self.sync_spool_gauge();
        bump(&self.stats.verdicts);
        metrics::counter!("cascade_agent_verdicts_total").increment(1);
        let agrees = v.class == entry.header.edge_class;
        if agrees {
            bump(&self.stats.agreements);
        }
        let mut event = ResultEvent::new(entry.header.input.clone(), Stage::Cloud);
        event.class = Some(v.class);
        event.label = v.label.clone();
        event.probability = v.scores.first().map(|s| s.score);
        event.escalation = Some(v.id);
        event.latency_us = Some(now_ms().saturating_sub(entry.header.created_ms) * 1000);
        event.agrees = Some(agrees);
        let _ = self.outputs.results.send(event).await;
    }

    async fn rejection(&mut self, r: cascade_proto::escalation::Rejection) {
        bump(&self.stats.rejections);
        let Some(id) = r.id else {
            tracing::warn!(reason = r.reason.name(), detail = %r.detail, "rejection without an escalation id");
            return;
        };
        if r.reason.retryable() && r.reason != RejectReason::RateLimited {
            // Overloaded: keep it; it is republished on the next reconnect or restart.
            tracing::warn!(escalation = %id, reason = r.reason.name(), "escalation refused for now; kept for retry");
            return;
        }
        let Some(entry) = self.spool.get(&id).cloned() else {
            return;
        };
        if let Err(e) = self.spool.complete(id) {
            tracing::error!(error = %e, "cannot record the rejection");
            return;
        }
        self.sync_spool_gauge();
        tracing::warn!(escalation = %id, reason = r.reason.name(), detail = %r.detail, "escalation rejected; the edge answer stands");
        let mut event = ResultEvent::new(entry.header.input, Stage::Rejected);
        event.escalation = Some(id);
        event.detail = Some(format!("{}: {}", r.reason.name(), r.detail));
        let _ = self.outputs.results.send(event).await;
    }
}

/// Runs the link until `shutdown`; then publishes the offline status and disconnects.
pub async fn run(
    settings: LinkSettings,
    spool: Spool,
    keyring: Keyring,
    mut commands: mpsc::Receiver<LinkCommand>,
    outputs: LinkOutputs,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let offline = encode(&Message::DeviceStatus(settings.offline_status.clone()));
    let will = Will {
        topic: topic(&settings, Channel::Status),
        payload: offline.clone(),
    };
    let mut session = Session::new(settings.protocol, settings.options.clone(), Some(will), 256);
    let mut link = Link {
        settings,
        spool,
        keyring,
        outputs,
        stats,
        current_policy: 0,
        outbox: Default::default(),
        last_sent: Default::default(),
    };
    let mut subscriptions: Vec<String> = [Channel::Verdict, Channel::Policy]
        .map(|c| topic(&link.settings, c))
        .into();
    if link.outputs.ota.is_some() {
        subscriptions
            .extend([Channel::OtaManifest, Channel::OtaChunk].map(|c| topic(&link.settings, c)));
    }
    let mut backoff = Backoff::default();
    let mut first_session = true;
    let mut expiry = tokio::time::interval(Duration::from_secs(10));
    let mut retry =
        tokio::time::interval(link.settings.retry_after.max(Duration::from_millis(200)) / 2);
    let mut connected = false;
    loop {
        // Only once connected, and so after the subscriptions requested on connecting: the client
        // sends what it was handed before the connection ahead of them, and a verdict answering an
        // escalation sent that early would reach the broker before our subscription and be lost.
        if connected {
            link.flush(&session);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(command) = commands.recv(), if link.outbox.len() < 1024 => link.command(command).await,
            _ = retry.tick(), if connected => link.retry_late(),
            _ = expiry.tick() => {
                let cutoff = now_ms().saturating_sub(link.settings.verdict_timeout.as_millis() as u64);
                match link.spool.expire(cutoff) {
                    Ok(dropped) => link.report_dropped(dropped).await,
                    Err(e) => tracing::error!(error = %e, "cannot expire spool entries"),
                }
            }
            event = session.poll() => match event {
                SessionEvent::Connected { session_present, version } => {
                    backoff.reset();
                    connected = true;
                    tracing::info!(session_present, mqtt = version.name(), "connected to the broker");
                    // Resubscribe when the broker kept no session. Also on this process's first
                    // connection: some brokers (rumqttd) report a session for a client they never saw.
                    if first_session || !session_present {
                        for t in &subscriptions {
                            if !session.try_subscribe(t) {
                                tracing::error!(topic = %t, "cannot subscribe: client queue full");
                            }
                        }
                    }
                    // A new process or a session the broker lost: nothing in flight survived.
                    if first_session || !session_present {
                        link.replay();
                    }
                    first_session = false;
                }
                SessionEvent::Message(m) => {
                    let topic_name = String::from_utf8_lossy(&m.topic).into_owned();
                    link.incoming(&topic_name, &m.payload).await;
                }
                SessionEvent::Disconnected | SessionEvent::Other => {}
                SessionEvent::Lost(e) => {
                    connected = false;
                    bump(&link.stats.disconnects);
                    metrics::counter!("cascade_agent_disconnects_total").increment(1);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            },
        }
    }
    // What other tasks asked to send before the shutdown (an OTA status, say) still goes out,
    // ahead of the offline status and the disconnect.
    while let Ok(command) = commands.try_recv() {
        link.command(command).await;
    }
    link.flush(&session);
    // Leave cleanly: say we are offline (the will is only sent on an unclean loss) and disconnect.
    session.try_publish(&topic(&link.settings, Channel::Status), true, offline, None);
    session.disconnect(Duration::from_secs(2)).await;
    tracing::info!(
        spooled = link.spool.len(),
        "link stopped; spooled escalations are kept for the next start"
    );
}
