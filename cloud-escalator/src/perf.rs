//! `cloud-escalator perf`: measures the escalation path the way perf_analyzer measures Triton
//! (part of the binary: it prints). Two measurements:
//!
//! - `round-trip`: one escalation at a time from an edge agent (in this process, exactly as
//!   `edge-agent run` would run) through the broker to the escalator and back, on a no-op model:
//!   the latency Cascade itself adds to a round trip.
//! - `batching`: open-loop load from many simulated devices at a ladder of rates; per rate, the
//!   verdict latency p95 and what was answered. The highest rate answered in full within the p95
//!   objective is the service's throughput; run it with `--max-batch 1` for the unbatched peer.
//!
//! - `ota`: a fleet of simulated devices takes a model update from a running escalator: the
//!   bytes each receives against the model's size, and the time until all are done.
//!
//! Results are one JSON object per line on standard output (the bench/ scripts read them) after
//! a readable line on standard error.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cascade_infer::Tensor;
use cascade_infer::metadata::Metadata;
use cascade_proto::escalation::{
    ClassScore, Confidence, ConfidenceMetric, EdgeResult, EscalationRequest, Payload, PolicyRule,
    PrivacyMode,
};
use cascade_proto::model::{ModelRef, Version};
use cascade_proto::{Limits, Message, decode, encode};
use cloud_escalator::config::{EscalatorConfig, RouteConfig};
use edge_agent::config::AgentConfig;
use edge_agent::input::{InputItem, Stage};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Latency summary, microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
    /// Samples over 40 ms (the signature of Nagle's algorithm meeting delayed ACKs).
    pub over_40ms: usize,
}

impl Latency {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if samples.is_empty() {
                0.0
            } else {
                samples[((samples.len() - 1) as f64 * p).round() as usize]
            }
        };
        Latency {
            n: samples.len(),
            p50_us: at(0.50),
            p95_us: at(0.95),
            p99_us: at(0.99),
            max_us: at(1.0),
            over_40ms: samples.iter().filter(|&&s| s > 40_000.0).count(),
        }
    }
}

/// Where the broker is: an external URL, or an embedded one started for the run.
async fn broker(url: Option<String>) -> anyhow::Result<String> {
    Ok(match url {
        Some(u) => u,
        None => {
            let port = cloud_escalator::broker::free_local_port()?;
            cloud_escalator::broker::start(([127, 0, 0, 1], port).into(), None)?;
            format!("mqtt://127.0.0.1:{port}")
        }
    })
}

fn escalator_config(
    broker: &str,
    route: RouteConfig,
    max_batch: usize,
    store: PathBuf,
) -> anyhow::Result<EscalatorConfig> {
    let mut config: EscalatorConfig = toml::from_str("routes = []")?;
    config.fleet = "perf".into();
    config.broker.url = Some(broker.into());
    config.broker.client_id = format!("perf-escalator-{}", std::process::id());
    config.broker.share_group = format!("perf{}", std::process::id());
    config.routes = vec![route];
    config.batching.max_batch = max_batch;
    config.batching.max_delay_us = 0;
    config.batching.capacity = 100_000;
    config.limits.per_device_per_minute = 0;
    config.store.path = store;
    config.validate()?;
    Ok(config)
}

/// `perf round-trip` settings.
#[derive(Debug, Clone)]
pub struct RoundTripOptions {
    /// External broker; embedded when absent.
    pub broker: Option<String>,
    /// Measured round trips.
    pub n: usize,
    /// Round trips before measuring.
    pub warmup: usize,
    /// The no-op model (edge and cloud).
    pub model: PathBuf,
    /// Flush the agent's spool to disk on every escalation (the default for devices).
    pub fsync: bool,
    /// Directory for the escalator's store; beside the agent's state when absent.
    pub escalator_store: Option<PathBuf>,
}

/// `perf round-trip`: what it measured.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTripReport {
    /// `cascade`.
    pub system: &'static str,
    /// Spool flushed per escalation.
    pub fsync: bool,
    /// Bytes of one escalation on the wire.
    pub escalation_bytes: u64,
    /// Input handed to the agent → cloud result delivered by the agent.
    pub latency: Latency,
}

/// Runs `perf round-trip`.
pub async fn round_trip(
    options: RoundTripOptions,
    log: &mut (dyn Write + Send),
) -> anyhow::Result<RoundTripReport> {
    let url = broker(options.broker.clone()).await?;
    let state = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let name = Metadata::for_model(&options.model)?.name;
    let route = RouteConfig {
        edge_model: name,
        cloud_model: options.model.clone(),
        tail_model: None,
        threads: 1,
        backend: "auto".into(),
    };
    // A directory of our own inside the one given, so that runs never share a store.
    let store_dir = match &options.escalator_store {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir_in(state.path())?,
    };
    let escalator = cloud_escalator::service::start(
        escalator_config(&url, route, 32, store_dir.path().join("examples.db"))?,
        shutdown.child_token(),
    )
    .await?;
    let agent_config: AgentConfig = toml::from_str(&format!(
        r#"
device = "perf-agent"
fleet = "perf"
state_dir = {state:?}
[model]
path = {model:?}
[policy]
threshold = 1.0
audit_rate = 1.0
per_minute = 100000000
burst = 100000000
[mqtt]
url = "{url}"
fsync = {fsync}
[telemetry]
interval_s = 3600
"#,
        state = state.path().join("agent"),
        model = options.model,
        fsync = options.fsync,
    ))?;
    let mut agent = edge_agent::agent::start(agent_config, shutdown.child_token()).await?;
    let mut results = agent
        .take_results()
        .ok_or_else(|| anyhow::anyhow!("results already taken"))?;
    let input_len = agent.model.inputs.first().map_or(10, |s| {
        s.shape
            .iter()
            .map(|d| match d {
                cascade_infer::Dim::Fixed(n) => *n,
                cascade_infer::Dim::Symbolic(_) => 1,
            })
            .product()
    });
    writeln!(
        log,
        "round trip: agent → {url} → escalator → agent, no-op model, fsync={}",
        options.fsync
    )?;
    let mut samples = Vec::with_capacity(options.n);
    for i in 0..options.warmup + options.n {
        let values: Vec<f32> = (0..input_len).map(|_| fastrand::f32()).collect();
        let tensor = Tensor::from_f32(&[1, input_len], values)?;
        let id = i.to_string();
        let started = Instant::now();
        agent
            .inputs
            .send(InputItem::new(id.clone(), vec![tensor]))
            .await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), results.recv())
                .await
                .map_err(|_| anyhow::anyhow!("no verdict in 30 s for round trip {i}"))?
                .ok_or_else(|| anyhow::anyhow!("the agent stopped"))?;
            if event.input == id && event.stage == Stage::Cloud {
                break;
            }
            if event.input == id && matches!(event.stage, Stage::Rejected | Stage::Dropped) {
                anyhow::bail!("round trip {i}: {:?} {:?}", event.stage, event.detail);
            }
        }
        if i >= options.warmup {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let escalations = agent
        .stats
        .escalations
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(1);
    let bytes = agent
        .stats
        .escalation_bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        / escalations;
    agent.stop(Duration::from_secs(5)).await;
    escalator.stop(Duration::from_secs(5)).await;
    Ok(RoundTripReport {
        system: "cascade",
        fsync: options.fsync,
        escalation_bytes: bytes,
        latency: Latency::of(samples),
    })
}

/// `perf batching` settings.
#[derive(Debug, Clone)]
pub struct BatchingOptions {
    /// External broker; embedded when absent.
    pub broker: Option<String>,
    /// The escalator's largest batch.
    pub max_batch: usize,
    /// Offered loads, escalations per second.
    pub rates: Vec<f64>,
    /// Seconds at each rate.
    pub seconds: f64,
    /// Simulated devices (escalations round-robin over them).
    pub devices: usize,
    /// Edge model name the escalations carry, and the cloud model answering them.
    pub cloud_model: PathBuf,
    /// Inputs sent (rows of a float32 .npy).
    pub inputs: PathBuf,
    /// Latency objective: the ladder stops after the first rate whose p95 exceeds it (or that
    /// leaves escalations unanswered).
    pub slo_ms: f64,
}

/// `perf batching`: one offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct RateReport {
    /// The escalator's largest batch.
    pub max_batch: usize,
    /// Offered escalations per second.
    pub offered_per_s: f64,
    /// Verdicts per second over the run.
    pub answered_per_s: f64,
    /// Escalations sent.
    pub sent: usize,
    /// Of which answered.
    pub answered: usize,
    /// Mean batch size the escalator ran.
    pub mean_batch: f64,
    /// Verdict latency (publish → verdict received).
    pub latency: Latency,
    /// Everything answered, with p95 within the objective.
    pub meets_slo: bool,
}

fn request(device: usize, model: &str, row: &[f32]) -> (Uuid, Vec<u8>) {
    let id = edge_agent::agent::escalation_id();
    let request = EscalationRequest {
        id,
        device: format!("sim-{device:04}"),
        model: ModelRef::new(model, Version::new(1, 0, 0)),
        privacy: PrivacyMode::Raw,
        payload: Payload::Tensor(cascade_proto::escalation::Tensor::from_f32(
            vec![1, row.len() as u32],
            row,
        )),
        edge: EdgeResult {
            top_k: vec![ClassScore {
                class: 0,
                score: 0.5,
            }],
            confidence: Confidence {
                metric: ConfidenceMetric::MaxProb,
                value: 0.5,
            },
            rule: PolicyRule::LowConfidence { threshold: 0.9 },
            inference_us: 0,
        },
        sent_at_ms: 0,
    };
    (id, encode(&Message::EscalationRequest(request)))
}

/// Runs `perf batching`, one report per offered rate.
pub async fn batching(
    options: BatchingOptions,
    log: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<RateReport>> {
    let url = broker(options.broker.clone()).await?;
    let (host, port, _) = edge_agent::config::broker_address(&url)?;
    let state = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let route = RouteConfig {
        edge_model: "perf-edge".into(),
        cloud_model: options.cloud_model.clone(),
        tail_model: None,
        threads: 1,
        backend: "auto".into(),
    };
    let escalator = cloud_escalator::service::start(
        escalator_config(
            &url,
            route,
            options.max_batch,
            state.path().join("examples.db"),
        )?,
        shutdown.child_token(),
    )
    .await?;
    let inputs = Tensor::read_npy(&options.inputs)?.to_f32();
    let rows: Vec<Vec<f32>> = inputs
        .outer_iter()
        .map(|r| r.iter().copied().collect())
        .collect();
    anyhow::ensure!(
        !rows.is_empty(),
        "no inputs in {}",
        options.inputs.display()
    );

    // One client plays every device: it publishes escalations and reads every verdict.
    let mut mqtt = MqttOptions::new(format!("perf-load-{}", std::process::id()), host, port);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_max_packet_size(Some(1 << 20));
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    mqtt.set_network_options(network);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 100_000);
    client
        .subscribe("cascade/v1/perf/+/verdict", QoS::AtLeastOnce)
        .await?;
    let sent_at: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let (pending, done) = (sent_at.clone(), latencies.clone());
    let reader = tokio::spawn(async move {
        let limits = Limits::default();
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    if let Ok(Message::Verdict(v)) = decode(&p.payload, &limits)
                        && let Some(t) = pending.lock().map(|mut m| m.remove(&v.id)).ok().flatten()
                        && let Ok(mut l) = done.lock()
                    {
                        l.push(now.duration_since(t).as_secs_f64() * 1e6);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "load client disconnected");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut reports = Vec::new();
    let mut n = 0usize;
    for &rate in &options.rates {
        latencies.lock().map(|mut l| l.clear()).ok();
        sent_at.lock().map(|mut m| m.clear()).ok();
        let batches_before = escalator
            .stats
            .batches
            .load(std::sync::atomic::Ordering::Relaxed);
        let batched_before = escalator
            .stats
            .batched
            .load(std::sync::atomic::Ordering::Relaxed);
        let total = (rate * options.seconds).round() as usize;
        let started = Instant::now();
        for k in 0..total {
            // Open loop: each escalation leaves at its scheduled time, whatever the answers do.
            let due = started + Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
            let device = n % options.devices.max(1);
            let (id, bytes) = request(device, "perf-edge", &rows[n % rows.len()]);
            n += 1;
            sent_at
                .lock()
                .map(|mut m| m.insert(id, Instant::now()))
                .ok();
            client
                .publish(
                    format!("cascade/v1/perf/sim-{device:04}/escalate"),
                    QoS::AtLeastOnce,
                    false,
                    bytes,
                )
                .await?;
        }
        // Let the last answers arrive.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && sent_at.lock().map(|m| !m.is_empty()).unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let samples = latencies.lock().map(|l| l.clone()).unwrap_or_default();
        let batches = escalator
            .stats
            .batches
            .load(std::sync::atomic::Ordering::Relaxed)
            - batches_before;
        let batched = escalator
            .stats
            .batched
            .load(std::sync::atomic::Ordering::Relaxed)
            - batched_before;
        let report = RateReport {
            max_batch: options.max_batch,
            offered_per_s: rate,
            answered_per_s: samples.len() as f64 / elapsed,
            sent: total,
            answered: samples.len(),
            mean_batch: batched as f64 / batches.max(1) as f64,
            meets_slo: false,
            latency: Latency::of(samples),
        };
        let report = RateReport {
            meets_slo: report.answered == report.sent
                && report.latency.p95_us <= options.slo_ms * 1000.0,
            ..report
        };
        writeln!(
            log,
            "max_batch {:>3}  offered {:>7.0}/s  answered {:>6}/{:<6} p50 {:>8.1} ms  p95 {:>8.1} ms  mean batch {:>5.1}",
            report.max_batch,
            report.offered_per_s,
            report.answered,
            report.sent,
            report.latency.p50_us / 1000.0,
            report.latency.p95_us / 1000.0,
            report.mean_batch
        )?;
        let stop = !report.meets_slo;
        reports.push(report);
        if stop {
            break;
        }
    }
    reader.abort();
    escalator.stop(Duration::from_secs(5)).await;
    Ok(reports)
}

/// `perf ota` settings.
#[derive(Debug, Clone)]
pub struct OtaFleetOptions {
    /// Broker URL (the escalator serving the registry is already connected there).
    pub broker: String,
    /// Fleet name the escalator serves.
    pub fleet: String,
    /// Simulated devices.
    pub devices: usize,
    /// The model name the devices run (at version `from`), as published in the registry.
    pub model: String,
    /// The version the devices run.
    pub from: Version,
    /// Chunks each device keeps requested.
    pub window: u16,
    /// Give up after this long.
    pub timeout: Duration,
}

/// What `perf ota` measured.
#[derive(Debug, Serialize)]
pub struct OtaFleetReport {
    /// Devices that completed the update (all chunks verified, whole-file hash checked).
    pub updated: usize,
    /// Devices simulated.
    pub devices: usize,
    /// Model size, bytes.
    pub model_bytes: u64,
    /// MQTT bytes received per device for the update (manifest and chunks: fixed header, topic,
    /// packet id, payload), mean.
    pub wire_bytes_per_device: f64,
    /// `wire_bytes_per_device / model_bytes`.
    pub wire_ratio: f64,
    /// From the first status published to the last device done, seconds.
    pub seconds: f64,
}

/// MQTT 5 PUBLISH bytes on the wire for `topic` and `payload` at QoS 1 (no properties).
fn publish_wire_bytes(topic: &str, payload: usize) -> u64 {
    // Variable header: topic length (2) + topic + packet id (2) + properties length (1).
    let remaining = 2 + topic.len() + 2 + 1 + payload;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    (1 + length_bytes + remaining) as u64
}

/// Simulates `devices` devices running `model` at `from`: each announces itself with a retained
/// status, takes the manifest it is offered, downloads the full file in verified chunks and
/// checks the whole file's hash. Devices check the manifest's signature against nothing (they
/// are load, not the agent; the agent's checks are tested elsewhere).
pub async fn ota_fleet(
    options: OtaFleetOptions,
    log: &mut impl Write,
) -> anyhow::Result<OtaFleetReport> {
    use cascade_proto::ota::{ArtifactKind, ChunkRequest, Manifest};
    use cascade_proto::status::{Counters, DeviceStatus, Presence};
    use cascade_proto::topic::{Channel, DeviceTopic};
    use sha2::{Digest, Sha256};

    let (host, port, _) =
        edge_agent::config::broker_address(&options.broker).map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..options.devices {
        let o = options.clone();
        let host = host.clone();
        tasks.spawn(async move {
            let device = format!("sim-{i:04}");
            let topic = |channel| {
                DeviceTopic {
                    fleet: &o.fleet,
                    device: &device,
                    channel,
                }
                .to_string()
            };
            let mut mqtt = MqttOptions::new(
                format!("perf-ota-{}-{device}", std::process::id()),
                &host,
                port,
            );
            mqtt.set_keep_alive(Duration::from_secs(30));
            mqtt.set_max_packet_size(Some(2 << 20));
            mqtt.set_outgoing_inflight_upper_limit(64);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_tcp_nodelay(true);
            mqtt.set_network_options(network);
            let (client, mut eventloop) = AsyncClient::new(mqtt, 256);
            for channel in [Channel::OtaManifest, Channel::OtaChunk] {
                client.subscribe(topic(channel), QoS::AtLeastOnce).await?;
            }
            let status = DeviceStatus {
                device: device.clone(),
                presence: Presence::Online,
                agent_version: "perf".into(),
                model: Some(ModelRef::new(o.model.clone(), o.from)),
                policy_sequence: 0,
                counters: Counters::default(),
                uptime_s: 0,
                at_ms: 0,
            };
            client
                .publish(
                    topic(Channel::Status),
                    QoS::AtLeastOnce,
                    true,
                    encode(&Message::DeviceStatus(status)),
                )
                .await?;
            let limits = Limits {
                max_message_bytes: 2 << 20,
            };
            let mut manifest: Option<Manifest> = None;
            let mut data: Vec<u8> = Vec::new();
            let mut have: Vec<bool> = Vec::new();
            let mut requested: Vec<bool> = Vec::new();
            let (mut in_flight, mut wire) = (0u32, 0u64);
            let deadline = tokio::time::Instant::now() + o.timeout;
            loop {
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("{device}: not updated within {:?}", o.timeout);
                }
                // As the agent does: chunks that do not come within 2 s are asked for again (the
                // escalator drops chunks when its queue to the broker is full).
                let publish =
                    match tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await {
                        Ok(event) => match event? {
                            Event::Incoming(Packet::Publish(p)) => Some(p),
                            _ => continue,
                        },
                        Err(_) => {
                            requested.clone_from(&have);
                            in_flight = 0;
                            None
                        }
                    };
                if let Some(p) = publish {
                    let topic_name = String::from_utf8_lossy(&p.topic).into_owned();
                    wire += publish_wire_bytes(&topic_name, p.payload.len());
                    match decode(&p.payload, &limits)? {
                        Message::OtaManifest(signed) if manifest.is_none() => {
                            let m = signed.content;
                            data = vec![0; m.full.size as usize];
                            have = vec![false; m.full.chunk_count() as usize];
                            requested = have.clone();
                            manifest = Some(m);
                        }
                        Message::OtaChunk(c) => {
                            let Some(m) = &manifest else { continue };
                            anyhow::ensure!(
                                m.full.chunk_matches(c.index, &c.data),
                                "{device}: bad chunk {}",
                                c.index
                            );
                            if have[c.index as usize] {
                                continue; // A repeat of a chunk asked for again.
                            }
                            let start = c.index as usize * m.full.chunk_size as usize;
                            data[start..start + c.data.len()].copy_from_slice(&c.data);
                            have[c.index as usize] = true;
                            in_flight = in_flight.saturating_sub(1);
                        }
                        _ => continue,
                    }
                }
                let Some(m) = &manifest else { continue };
                if have.iter().all(|h| *h) {
                    anyhow::ensure!(
                        <[u8; 32]>::from(Sha256::digest(&data)) == m.full.sha256,
                        "{device}: file hash differs"
                    );
                    return Ok::<(u64, u64), anyhow::Error>((wire, m.full.size));
                }
                // Keep the window full, one request per missing chunk.
                let mut i = 0;
                while in_flight < u32::from(o.window) && i < requested.len() {
                    if !requested[i] {
                        let request = ChunkRequest {
                            model: m.model.clone(),
                            artifact: ArtifactKind::Full,
                            first: i as u32,
                            count: 1,
                        };
                        client
                            .publish(
                                topic(Channel::OtaRequest),
                                QoS::AtLeastOnce,
                                false,
                                encode(&Message::OtaChunkRequest(request)),
                            )
                            .await?;
                        requested[i] = true;
                        in_flight += 1;
                    }
                    i += 1;
                }
            }
        });
    }
    let mut wires = Vec::new();
    let mut model_bytes = 0;
    let mut failures = 0;
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok((w, size)) => {
                wires.push(w);
                model_bytes = size;
            }
            Err(e) => {
                failures += 1;
                writeln!(log, "{e:#}")?;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mean = wires.iter().sum::<u64>() as f64 / wires.len().max(1) as f64;
    writeln!(
        log,
        "{} of {} devices updated in {seconds:.1} s ({failures} failed)",
        wires.len(),
        options.devices
    )?;
    Ok(OtaFleetReport {
        updated: wires.len(),
        devices: options.devices,
        model_bytes,
        wire_bytes_per_device: mean,
        wire_ratio: mean / model_bytes.max(1) as f64,
        seconds,
    })
}

/// `perf fleet` settings.
#[derive(Debug, Clone)]
pub struct FleetLoadOptions {
    /// Broker URL the escalator's registry reads.
    pub broker: String,
    /// Fleet name.
    pub fleet: String,
    /// Simulated devices.
    pub devices: usize,
    /// The fleet API, e.g. `http://127.0.0.1:8080`.
    pub api: String,
    /// A read-only (or admin) API token.
    pub token: String,
    /// Telemetry interval of each device.
    pub interval: Duration,
    /// How long to keep the load on after every device is registered.
    pub hold: Duration,
}

/// What `perf fleet` measured.
#[derive(Debug, Serialize)]
pub struct FleetLoadReport {
    /// Devices simulated.
    pub devices: usize,
    /// Devices the registry listed online at the end.
    pub registered: u64,
    /// From the first connection to every device listed online, seconds.
    pub register_s: f64,
    /// Telemetry messages sent, all devices.
    pub telemetry: u64,
    /// `GET /api/v1/devices?limit=10000` (the whole fleet, as the console loads it) while the
    /// devices report.
    pub list_all: Latency,
    /// `GET /api/v1/summary` while the devices report.
    pub summary: Latency,
}

/// Simulates `devices` devices (one MQTT connection each, a retained status with a last will,
/// telemetry every `interval`) reporting to an escalator with `[management]`, and measures its
/// API under that load.
pub async fn fleet_load(
    options: FleetLoadOptions,
    log: &mut impl Write,
) -> anyhow::Result<FleetLoadReport> {
    use cascade_proto::status::{Counters, DeviceStatus, Presence, Telemetry};
    use cascade_proto::topic::{Channel, DeviceTopic};
    use rumqttc::v5::mqttbytes::v5::LastWill;
    use std::sync::atomic::{AtomicU64, Ordering};

    let (host, port, _) =
        edge_agent::config::broker_address(&options.broker).map_err(|e| anyhow::anyhow!("{e}"))?;
    let shutdown = CancellationToken::new();
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..options.devices {
        let (o, host, shutdown, sent) = (
            options.clone(),
            host.clone(),
            shutdown.clone(),
            sent.clone(),
        );
        tasks.spawn(async move {
            let device = format!("load-{i:05}");
            let topic = |channel| DeviceTopic { fleet: &o.fleet, device: &device, channel }.to_string();
            let status = |presence| {
                encode(&Message::DeviceStatus(DeviceStatus {
                    device: device.clone(),
                    presence,
                    agent_version: "0.1.0".into(),
                    model: Some(ModelRef::new("digits-edge", Version::new(1, 0, 0))),
                    policy_sequence: 0,
                    counters: Counters::default(),
                    uptime_s: 0,
                    at_ms: 0,
                }))
            };
            let mut mqtt = MqttOptions::new(device.clone(), host, port);
            mqtt.set_keep_alive(Duration::from_secs(30));
            mqtt.set_outgoing_inflight_upper_limit(16);
            mqtt.set_last_will(LastWill::new(topic(Channel::Status), status(Presence::Offline), QoS::AtLeastOnce, true, None));
            let (client, mut events) = AsyncClient::new(mqtt, 16);
            let _ = client
                .publish(topic(Channel::Status), QoS::AtLeastOnce, true, status(Presence::Online))
                .await;
            let mut tick = tokio::time::interval(o.interval);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let t = Telemetry {
                            device: device.clone(), at_ms: 0, window_ms: o.interval.as_millis() as u32,
                            inputs: 100, escalations: 7, audits: 1, budget_overflows: 0, verdicts: 7,
                            agreements: 6, errors: 0, inference_p50_us: 40, inference_p99_us: 90, queue_depth: 0,
                        };
                        if client.try_publish(topic(Channel::Telemetry), QoS::AtLeastOnce, false, encode(&Message::Telemetry(t))).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    event = events.poll() => if event.is_err() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            let _ = client.try_disconnect();
        });
    }
    let client = Arc::new(cloud_escalator::fleet::client::Client::new(
        &options.api,
        Some(options.token.clone()),
    ));
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            let value =
                tokio::task::spawn_blocking(move || client.json("GET", path, None)).await??;
            Ok::<_, anyhow::Error>((t.elapsed(), value))
        }
    };
    let (mut list, mut summary) = (Vec::new(), Vec::new());
    let mut register_s = None;
    let mut registered = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut hold_until = None;
    while Instant::now() < deadline && hold_until.is_none_or(|h| Instant::now() < h) {
        let (elapsed, s) = get("/summary").await?;
        summary.push(elapsed.as_secs_f64() * 1e6);
        registered = s["devices"]["online"].as_u64().unwrap_or(0);
        if register_s.is_none() && registered >= options.devices as u64 {
            register_s = Some(started.elapsed().as_secs_f64());
            hold_until = Some(Instant::now() + options.hold);
            writeln!(
                log,
                "all {} devices registered after {:.1} s; holding {:?}",
                options.devices,
                started.elapsed().as_secs_f64(),
                options.hold
            )?;
        }
        let (elapsed, _) = get("/devices?limit=10000").await?;
        list.push(elapsed.as_secs_f64() * 1e6);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    let report = FleetLoadReport {
        devices: options.devices,
        registered,
        register_s: register_s.unwrap_or(f64::NAN),
        telemetry: sent.load(Ordering::Relaxed),
        list_all: Latency::of(list),
        summary: Latency::of(summary),
    };
    writeln!(
        log,
        "{} devices, {} registered in {:.1} s; list all p50 {:.1} ms p99 {:.1} ms; summary p50 {:.1} ms",
        report.devices,
        report.registered,
        report.register_s,
        report.list_all.p50_us / 1e3,
        report.list_all.p99_us / 1e3,
        report.summary.p50_us / 1e3
    )?;
    Ok(report)
}
