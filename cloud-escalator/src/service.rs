//! The escalation service: consume escalations, batch them per model, answer each device.
//!
//! ```text
//!  broker ──$share/{group}/cascade/v1/{fleet}/+/escalate──▶ consumer (one task: MQTT client,
//!     ▲        validation, rate limits, dedupe, batcher)
//!     │                                          │ batches            ▲ results
//!     └── verdicts (QoS 1, response topic) ◀─────┤                    │
//!                                                ▼                    │
//!                                      model workers (blocking, one per model)
//!                                                │ examples
//!                                                ▼
//!                                      hard-example store (blocking task, SQLite)
//! ```
//!
//! Escalations are acknowledged to the broker only once answered (manual acks), so a replica that
//! dies leaves its unanswered escalations unacknowledged. Agents republish escalations whose
//! verdict is late, and this service answers a repeated id from its cache: at-least-once delivery,
//! applied exactly once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cascade_infer::metadata::Metadata;
use cascade_infer::wire::from_wire;
use cascade_infer::{Dim, LoadOptions, Model, Tensor, TensorSpec, load_path, run_batch};
use cascade_proto::escalation::{
    ClassScore, EscalationRequest, Payload, PolicyRule, Redaction, RejectReason, Rejection,
    Timings, Verdict,
};
use cascade_proto::model::{ModelRef, Version};
use cascade_proto::policy::TokenBucket;
use cascade_proto::topic::{Channel, DeviceTopic, Filter};
use cascade_proto::{DecodeError, Limits, Message, decode, encode};
use edge_agent::connection::{Backoff, mqtt_options, tls_config};
use edge_agent::mqtt::{Ack, Incoming, MqttVersion, Session, SessionEvent};
use ndarray::{ArrayD, Axis, IxDyn};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::batcher::{Batch, BatchLimits, Batcher};
use crate::config::{ConfigError, EscalatorConfig, RouteConfig};
use crate::store::{Example, Store};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A model did not load or lacks its sidecar.
    #[error(transparent)]
    Model(#[from] cascade_infer::InferError),
    /// The embedded broker did not start.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// The store did not open.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The OTA model registry could not be opened.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// TLS settings.
    #[error(transparent)]
    Tls(#[from] edge_agent::connection::TlsError),
    /// The fleet store did not open.
    #[error(transparent)]
    FleetStore(#[from] crate::fleet::db::DbError),
    /// The fleet API's address could not be bound.
    #[error(
        "fleet API: cannot listen on {addr}: {error} (is the port in use? set [management] listen)"
    )]
    FleetListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// A file the configuration names could not be used (signing key, fleet CA).
    #[error("{0}")]
    Setup(String),
}

/// Counters of the service, shared with its tasks (and the demo).
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Escalations received (duplicates included).
    pub received: AtomicU64,
    /// Verdicts published.
    pub answered: AtomicU64,
    /// Repeated escalation ids answered from the cache.
    pub duplicates: AtomicU64,
    /// Escalations that expired before their batch ran.
    pub expired: AtomicU64,
    /// Rejections sent, all reasons.
    pub rejected: AtomicU64,
    /// Batches run.
    pub batches: AtomicU64,
    /// Sum of batch sizes (mean = batched / batches).
    pub batched: AtomicU64,
    /// Examples written to the store.
    pub stored: AtomicU64,
    /// Examples dropped because the store fell behind (verdicts are never held up for it).
    pub store_dropped: AtomicU64,
    rejections: std::sync::Mutex<HashMap<&'static str, u64>>,
}

impl ServiceStats {
    /// Rejections by reason.
    pub fn rejections(&self) -> HashMap<&'static str, u64> {
        self.rejections
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    fn reject(&self, reason: RejectReason) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.rejections.lock() {
            *m.entry(reason.name()).or_default() += 1;
        }
        metrics::counter!("cascade_escalator_rejections_total", "reason" => reason.name())
            .increment(1);
    }
}

/// A running service.
#[derive(Debug)]
pub struct EscalatorHandle {
    /// Counters.
    pub stats: Arc<ServiceStats>,
    /// What the OTA server did (empty without `ota.registry`).
    pub ota: Arc<crate::ota::OtaStats>,
    /// Where the fleet API and console listen (with a `[management]` section).
    pub fleet_api: Option<std::net::SocketAddr>,
    /// What the device registry's ingester did.
    pub fleet: Arc<crate::fleet::ingest::IngestStats>,
    /// Where the device gate listens (with `[identity] gate_listen`).
    pub gate: Option<std::net::SocketAddr>,
    /// What the device gate did.
    pub gate_stats: Arc<crate::gate::GateStats>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl EscalatorHandle {
    /// Stops: queued batches are run and answered, then tasks end. Waits up to `grace`.
    pub async fn stop(self, grace: Duration) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// A model answering escalations.
#[derive(Clone)]
struct Served {
    key: String,
    model: Arc<dyn Model>,
    metadata: Metadata,
    model_ref: ModelRef,
    /// The input spec, batch dimension first.
    input: TensorSpec,
}

fn load_served(
    path: &std::path::Path,
    key: String,
    route: &RouteConfig,
) -> Result<Served, ServiceError> {
    let model: Arc<dyn Model> = Arc::from(load_path(
        path,
        &LoadOptions {
            threads: route.threads,
            // Validated with the config.
            backend: route.backend.parse().unwrap_or_default(),
            ..LoadOptions::default()
        },
    )?);
    let metadata = Metadata::for_model(path)?;
    metadata
        .check_against(model.info())
        .map_err(|detail| cascade_infer::InferError::Metadata {
            path: Metadata::sidecar_path(path),
            detail,
        })?;
    let input =
        model.info().inputs.first().cloned().ok_or_else(|| {
            ConfigError::Invalid(format!("{}: model without inputs", path.display()))
        })?;
    let model_ref = ModelRef::new(
        metadata.name.clone(),
        metadata.version.parse::<Version>().unwrap_or_default(),
    );
    Ok(Served {
        key,
        model,
        metadata,
        model_ref,
        input,
    })
}

/// One escalation waiting in the batcher.
struct Job {
    request: EscalationRequest,
    input: Tensor,
    reply_topic: String,
    correlation: Option<Bytes>,
    received: Instant,
    deadline: Option<Instant>,
    /// Arrival order, for acknowledging in order.
    seq: u64,
}

/// A batch's outcome, from a worker back to the consumer.
struct Done {
    /// The model (route key) that ran it.
    model: String,
    jobs: Vec<(Job, Instant)>,
    probabilities: Result<Vec<Vec<f32>>, String>,
    started: Instant,
    inference: Duration,
}

fn now_ms() -> u64 {
    edge_agent::stats::now_ms()
}

/// Shapes a decoded escalation tensor as one item of `spec` (batch of one), undoing a redaction's
/// downscaling by repeating pixels.
fn shape_input(
    mut t: Tensor,
    spec: &TensorSpec,
    redactions: &[Redaction],
) -> Result<Tensor, String> {
    if let Some(Redaction::Downscaled { factor }) = redactions
        .iter()
        .find(|r| matches!(r, Redaction::Downscaled { .. }))
    {
        t = upsample(&t.to_f32(), usize::from(*factor), spec)?;
    }
    let want: Vec<usize> = spec
        .shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbolic(_) if i == 0 => 1,
            Dim::Symbolic(_) => 0,
        })
        .collect();
    let elements: usize = t.len();
    let fixed: usize = want.iter().filter(|&&d| d > 0).product();
    if want.contains(&0) {
        // A free inner dimension: take the tensor's own shape, as long as the rank matches.
        if t.shape().len() == want.len() {
            return Ok(t);
        }
        return Err(format!(
            "input has shape {:?}; the model takes {}",
            t.shape(),
            spec.shape_text()
        ));
    }
    if elements != fixed {
        return Err(format!(
            "input has {elements} values; the model takes {} ({fixed})",
            spec.shape_text()
        ));
    }
    let values = t
        .to_f32()
        .into_shape_with_order(IxDyn(&want))
        .map_err(|e| e.to_string())?;
    Ok(match spec.dtype {
        cascade_infer::DType::F32 => Tensor::F32(values),
        other => {
            return Err(format!(
                "the cloud model takes {other} inputs; only float32 cloud models are supported"
            ));
        }
    })
}

/// Nearest-neighbour upsampling of an image redacted by `factor`, to the model's spatial size.
fn upsample(values: &ArrayD<f32>, factor: usize, spec: &TensorSpec) -> Result<Tensor, String> {
    let dims: Vec<usize> = spec
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbolic(_) => 1,
        })
        .collect();
    if values.ndim() != 4 || dims.len() != 4 {
        return Err("downscaled inputs must be rank-4 images".into());
    }
    // The spatial axes are those the downscale shrank: where the model's size is larger.
    let mut out = ArrayD::<f32>::zeros(IxDyn(&dims));
    for (index, v) in out.indexed_iter_mut() {
        let mut src = Vec::with_capacity(4);
        for axis in 0..4 {
            let i = index[axis];
            src.push(if dims[axis] > values.shape()[axis] {
                (i / factor).min(values.shape()[axis] - 1)
            } else {
                i.min(values.shape()[axis] - 1)
            });
        }
        *v = values[IxDyn(&src)];
    }
    Ok(Tensor::F32(out))
}

/// Prepares the model for every batch size [`run_batch`] will run up to `max_batch` (the powers
/// of two), before the first escalation: tract compiles a plan per input shape, and a batch of a
/// new size would otherwise wait for its compile (milliseconds; 5 ms each for the bundled cloud
/// model). A size that fails is left to fail, with its error, when a batch of it comes.
fn warm_up(served: &Served, max_batch: usize) {
    let inputs = &served.model.info().inputs;
    let one_f32_input = inputs.len() == 1 && inputs[0].dtype == cascade_infer::DType::F32;
    if !served.model.compiles_per_shape() || !one_f32_input {
        return;
    }
    let started = Instant::now();
    let mut sizes = Vec::new();
    for size in cascade_infer::batch_run_sizes(max_batch) {
        let Some(shape) = served.input.shape_with_batch(size) else {
            return;
        };
        let zeros = Tensor::F32(ArrayD::zeros(IxDyn(&shape)));
        if let Err(e) = run_batch(served.model.as_ref(), vec![zeros]) {
            tracing::warn!(model = %served.model_ref, batch = size, error = %e, "warm-up run failed");
            return;
        }
        sizes.push(size);
    }
    tracing::info!(
        model = %served.model_ref,
        batch_sizes = ?sizes,
        ms = started.elapsed().as_millis() as u64,
        "model prepared for its batch sizes"
    );
}

fn worker(
    served: Arc<Served>,
    max_batch: usize,
    mut batches: mpsc::Receiver<Batch<Job>>,
    done: mpsc::Sender<Done>,
) {
    warm_up(&served, max_batch);
    while let Some(batch) = batches.blocking_recv() {
        let started = Instant::now();
        let inputs: Vec<ArrayD<f32>> = batch.items.iter().map(|(j, _)| j.input.to_f32()).collect();
        let views: Vec<_> = inputs.iter().map(|a| a.view()).collect();
        let probabilities = ndarray::concatenate(Axis(0), &views)
            .map_err(|e| format!("inputs of one batch differ in shape: {e}"))
            .and_then(|stacked| {
                run_batch(served.model.as_ref(), vec![Tensor::F32(stacked)])
                    .map_err(|e| e.to_string())
            })
            .and_then(|outputs| {
                let ix = served
                    .metadata
                    .scores_index(served.model.info())
                    .unwrap_or(0);
                let scores = outputs.get(ix).ok_or("no scores output")?.to_f32();
                let n = batch.items.len();
                let per = scores.len() / n.max(1);
                let flat: Vec<f32> = scores.iter().copied().collect();
                Ok(flat
                    .chunks(per.max(1))
                    .map(|row| served.metadata.probabilities(row))
                    .collect())
            });
        let inference = started.elapsed();
        if done
            .blocking_send(Done {
                model: batch.model,
                jobs: batch.items,
                probabilities,
                started,
                inference,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Starts the service (and the embedded broker, unless `broker.url` is set).
pub async fn start(
    config: EscalatorConfig,
    shutdown: CancellationToken,
) -> Result<EscalatorHandle, ServiceError> {
    config.validate()?;
    let (host, port, tls) = match &config.broker.url {
        Some(url) => edge_agent::config::broker_address(url)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?,
        None => {
            let b = crate::broker::start(config.broker.listen, config.broker.listen_v311)?;
            (b.listen.ip().to_string(), b.listen.port(), false)
        }
    };
    let tls = match (tls, &config.broker.ca) {
        (true, Some(ca)) => Some(Arc::new(tls_config(
            ca,
            config
                .broker
                .client_cert
                .as_deref()
                .zip(config.broker.client_key.as_deref()),
        )?)),
        _ => None,
    };
    let tracker = TaskTracker::new();
    // Device identity: the fleet CA, and the gate devices connect through.
    let ca = match &config.identity {
        Some(identity) => Some(Arc::new(
            crate::pki::FleetCa::open_or_create(&identity.ca_dir, &config.fleet)
                .map_err(|e| ServiceError::Setup(e.to_string()))?,
        )),
        None => None,
    };
    let gate_stats = Arc::new(crate::gate::GateStats::default());
    let mut gate = None;
    if let (Some(identity), Some(ca)) = (&config.identity, &ca)
        && let Some(listen) = identity.gate_listen
    {
        let server = crate::gate::server_config(ca, &identity.server_names)
            .map_err(|e| ServiceError::Setup(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|error| {
                ServiceError::Setup(format!("device gate: cannot listen on {listen}: {error}"))
            })?;
        gate = listener.local_addr().ok();
        tracing::info!(addr = ?gate, "device gate (mutual TLS, per-device ACLs) listening");
        tracker.spawn(crate::gate::run(
            listener,
            Arc::new(server),
            // The embedded broker's own listeners (validated to be loopback).
            crate::gate::Upstream {
                v5: config.broker.listen,
                v311: config.broker.listen_v311,
            },
            config.fleet.clone(),
            crate::gate::GateLimits {
                max_packet: config.limits.max_message_bytes + 4096,
                ..Default::default()
            },
            gate_stats.clone(),
            shutdown.clone(),
        ));
    }
    // Models, per route.
    let mut routes: HashMap<String, (Arc<Served>, Option<Arc<Served>>)> = HashMap::new();
    for r in &config.routes {
        let cloud = Arc::new(load_served(
            &r.cloud_model,
            format!("{}/cloud", r.edge_model),
            r,
        )?);
        let tail = match &r.tail_model {
            Some(p) => Some(Arc::new(load_served(
                p,
                format!("{}/tail", r.edge_model),
                r,
            )?)),
            None => None,
        };
        tracing::info!(edge = %r.edge_model, cloud = %cloud.model_ref, tail = ?tail.as_ref().map(|t| t.model_ref.to_string()), "route");
        routes.insert(r.edge_model.clone(), (cloud, tail));
    }
    let store = Store::open(&config.store.path)?;
    if let Some(addr) = config.metrics_listen
        && let Err(e) = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
    {
        tracing::warn!(error = %e, %addr, "metrics endpoint not started");
    }

    let stats = Arc::new(ServiceStats::default());
    let (done_tx, done_rx) = mpsc::channel::<Done>(64);
    let mut workers: HashMap<String, mpsc::Sender<Batch<Job>>> = HashMap::new();
    for (cloud, tail) in routes.values() {
        for served in std::iter::once(cloud).chain(tail.iter()) {
            let (tx, rx) = mpsc::channel(8);
            workers.insert(served.key.clone(), tx);
            let (served, done) = (served.clone(), done_tx.clone());
            let max_batch = config.batching.max_batch;
            tracker.spawn_blocking(move || worker(served, max_batch, rx, done));
        }
    }
    let (store_tx, mut store_rx) = mpsc::channel::<Example>(1024);
    let store_stats = stats.clone();
    tracker.spawn_blocking(move || {
        // Whatever queued while the last group was written goes in the next one (a group
        // commit), and under load the thread waits a little for more (`store_wait`): commits stay
        // few and large. Idle, each example is written as it comes.
        let mut group = Vec::with_capacity(STORE_GROUP);
        let mut last_commit: Option<Instant> = None;
        let take_queued = |group: &mut Vec<Example>, rx: &mut mpsc::Receiver<Example>| {
            while group.len() < STORE_GROUP
                && let Ok(example) = rx.try_recv()
            {
                group.push(example);
            }
        };
        while let Some(example) = store_rx.blocking_recv() {
            group.push(example);
            take_queued(&mut group, &mut store_rx);
            if let Some(wait) = store_wait(group.len(), last_commit.map(|t| t.elapsed())) {
                std::thread::sleep(wait);
                take_queued(&mut group, &mut store_rx);
            }
            let result = store.insert_all(&group);
            last_commit = Some(Instant::now());
            match result {
                Ok(new) => {
                    store_stats.stored.fetch_add(new as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, examples = group.len(), "hard examples not stored")
                }
            }
            group.clear();
        }
    });

    let ota_stats = Arc::new(crate::ota::OtaStats::default());
    if let Some(dir) = &config.ota.registry {
        let registry = crate::registry::Registry::open(dir)?;
        let mut options = mqtt_options(
            &format!("{}-ota", config.broker.client_id),
            &host,
            port,
            Duration::from_secs(30),
            tls.clone(),
            crate::broker::MAX_PACKET,
        );
        options.set_clean_start(true);
        options.set_session_expiry_interval(None);
        // Each queued request holds a chunk (64 KiB by default), so the queue bounds the memory
        // chunks waiting for the broker take; devices ask again for what was not queued.
        let session = Session::new(config.broker.protocol, options, None, 128);
        tracker.spawn(crate::ota::run(
            registry,
            config.fleet.clone(),
            config.ota.clone(),
            session,
            ota_stats.clone(),
            shutdown.clone(),
        ));
    }

    let fleet_stats = Arc::new(crate::fleet::ingest::IngestStats::default());
    let (fleet_api, latencies) = match &config.management {
        Some(fleet) => {
            let (api, tx) = start_fleet(
                &config,
                fleet,
                ca.clone(),
                &host,
                port,
                tls.clone(),
                &tracker,
                fleet_stats.clone(),
                &shutdown,
            )
            .await?;
            (Some(api), Some(tx))
        }
        None => (None, None),
    };

    let mut options = mqtt_options(
        &config.broker.client_id,
        &host,
        port,
        Duration::from_secs(30),
        tls,
        crate::broker::MAX_PACKET,
    );
    // No session: a replica that disconnects leaves its share of escalations to the others.
    options.set_clean_start(true);
    options.set_session_expiry_interval(None);
    options.set_manual_acks(true);
    options.set_request_channel_capacity(4096);
    // Verdicts go out in bursts of whole batches.
    options.set_outgoing_inflight_upper_limit(1024);
    let session = Session::new(config.broker.protocol, options, None, 4096);
    let consumer = Consumer {
        acks: VecDeque::new(),
        done_seqs: Default::default(),
        next_seq: 0,
        fleet: config.fleet.clone(),
        filter: Filter::channel(&config.fleet, Channel::Escalate)
            .and_then(|f| f.shared(&config.broker.share_group))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?
            .to_string(),
        unshared_filter: Filter::channel(&config.fleet, Channel::Escalate)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?
            .to_string(),
        limits: Limits {
            max_message_bytes: config.limits.max_message_bytes,
        },
        per_device: (
            config.limits.per_device_per_minute,
            config.limits.per_device_burst,
        ),
        buckets: HashMap::new(),
        routes,
        workers,
        batcher: Batcher::new(BatchLimits {
            max_batch: config.batching.max_batch,
            max_delay: Duration::from_micros(config.batching.max_delay_us),
            capacity: config.batching.capacity,
        }),
        running: HashMap::new(),
        in_flight: HashMap::new(),
        answered: HashMap::new(),
        answered_order: VecDeque::new(),
        stats: stats.clone(),
        store: store_tx,
        latencies,
        session,
    };
    tracker.spawn(consumer.run(done_rx, shutdown.clone()));
    Ok(EscalatorHandle {
        stats,
        ota: ota_stats,
        fleet_api,
        fleet: fleet_stats,
        gate,
        gate_stats,
        tracker,
        shutdown,
    })
}

/// Starts the device registry's ingester and the fleet API; returns the API's address and the
/// sender for verdict latencies.
#[allow(clippy::too_many_arguments)]
async fn start_fleet(
    config: &EscalatorConfig,
    fleet: &crate::fleet::FleetConfig,
    ca: Option<Arc<crate::pki::FleetCa>>,
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    tracker: &TaskTracker,
    stats: Arc<crate::fleet::ingest::IngestStats>,
    shutdown: &CancellationToken,
) -> Result<(std::net::SocketAddr, mpsc::Sender<u32>), ServiceError> {
    use crate::fleet::{api, db::Db, ingest};
    let url = fleet.store.clone();
    let db = tokio::task::spawn_blocking(move || Db::open(&url))
        .await
        .map_err(|e| ServiceError::Setup(format!("fleet store: {e}")))??;
    tracing::info!(engine = db.engine(), "fleet store open");
    let db = Arc::new(std::sync::Mutex::new(db));
    let listener = tokio::net::TcpListener::bind(fleet.listen)
        .await
        .map_err(|error| ServiceError::FleetListen {
            addr: fleet.listen,
            error,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|error| ServiceError::FleetListen {
            addr: fleet.listen,
            error,
        })?;
    let registry = match &config.ota.registry {
        Some(dir) => Some(crate::registry::Registry::open(dir)?),
        None => None,
    };
    let signing_key = match &config.ota.signing_key {
        Some(path) => Some(Arc::new(crate::registry::load_key(path)?)),
        None => None,
    };
    let enrollment: Option<Arc<dyn api::Enroller>> = match (&config.identity, ca) {
        (Some(identity), Some(ca)) => Some(Arc::new(crate::fleet::enrollment::CaEnroller::new(
            ca, identity,
        ))),
        _ => None,
    };
    let examples =
        (config.store.path != std::path::Path::new(":memory:")).then(|| config.store.path.clone());
    let router = api::router(api::ApiState {
        db: db.clone(),
        registry,
        signing_key,
        examples,
        fleet: config.fleet.clone(),
        stale_after_ms: fleet.stale_after_s * 1000,
        enrollment,
    });
    tracker.spawn(api::serve(listener, router, shutdown.clone()));

    let mut options = mqtt_options(
        &format!("{}-fleet", config.broker.client_id),
        host,
        port,
        Duration::from_secs(30),
        tls,
        crate::broker::MAX_PACKET,
    );
    options.set_clean_start(true);
    options.set_session_expiry_interval(None);
    // Retained statuses of a whole fleet arrive at once on subscribing.
    let session = Session::new(config.broker.protocol, options, None, 1024);
    let (tx, rx) = mpsc::channel(4096);
    tracker.spawn(ingest::run(
        db,
        config.fleet.clone(),
        fleet
            .replica
            .clone()
            .unwrap_or_else(|| config.broker.client_id.clone()),
        fleet.max_devices,
        Duration::from_millis(fleet.flush_ms),
        session,
        rx,
        stats,
        shutdown.clone(),
    ));
    Ok((addr, tx))
}

/// Most hard examples written in one transaction.
const STORE_GROUP: usize = 256;

/// Least time from one commit of the hard-example store to the next while examples keep coming.
/// Each commit writes every index page its examples touched, and the `(device, model)` index puts
/// examples from many devices on as many pages: larger groups share them. Examples are stored
/// after their verdicts went out, so the wait delays no answer.
const STORE_COMMIT_INTERVAL: Duration = Duration::from_millis(10);

/// How long the store thread waits for more examples before it writes the `len` it holds, the
/// last commit having ended `since_last_commit` ago (`None`: never). Not at all when the group is
/// full or the store was idle for a commit interval; otherwise until that interval has passed.
fn store_wait(len: usize, since_last_commit: Option<Duration>) -> Option<Duration> {
    if len >= STORE_GROUP {
        return None;
    }
    STORE_COMMIT_INTERVAL
        .checked_sub(since_last_commit?)
        .filter(|wait| !wait.is_zero())
}

/// How many answered ids (and their verdicts) are remembered for duplicates.
const ANSWERED_MEMORY: usize = 20_000;

struct Consumer {
    /// Verdict latencies (µs) for the fleet's activity series, when the fleet registry runs.
    latencies: Option<mpsc::Sender<u32>>,
    /// PUBACKs must go out in the order the PUBLISHes came in (MQTT 4.6): received escalations
    /// wait here until every earlier one is done.
    acks: VecDeque<(u64, Ack)>,
    done_seqs: std::collections::HashSet<u64>,
    next_seq: u64,
    fleet: String,
    /// The shared subscription (MQTT 5).
    filter: String,
    /// The same without the share, for MQTT 3.1.1 brokers.
    unshared_filter: String,
    limits: Limits,
    per_device: (u32, u32),
    buckets: HashMap<String, TokenBucket>,
    routes: HashMap<String, (Arc<Served>, Option<Arc<Served>>)>,
    workers: HashMap<String, mpsc::Sender<Batch<Job>>>,
    batcher: Batcher<Job>,
    /// Batches handed to each model's worker and not yet answered; a model with none is idle.
    running: HashMap<String, usize>,
    /// Ids queued or running, to ignore repeats until answered.
    in_flight: HashMap<Uuid, ()>,
    /// Recent verdicts by id, answered again when an escalation is repeated.
    answered: HashMap<Uuid, (String, Option<Bytes>, Vec<u8>)>,
    answered_order: VecDeque<Uuid>,
    stats: Arc<ServiceStats>,
    store: mpsc::Sender<Example>,
    session: Session,
}

impl Consumer {
    async fn run(mut self, mut done: mpsc::Receiver<Done>, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut draining = false;
        loop {
            let running = &self.running;
            let deadline = self
                .batcher
                .next_deadline(|model| running.get(model).is_none_or(|&n| n == 0));
            let sleep = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    // Answer what is queued before leaving.
                    for batch in self.batcher.drain() {
                        self.dispatch(batch).await;
                    }
                }
                _ = sleep => self.release().await,
                Some(result) = done.recv() => {
                    self.answer(result);
                    // The model is free again: run what gathered meanwhile.
                    self.release().await;
                }
                event = self.session.poll() => match event {
                    SessionEvent::Connected { version, .. } => {
                        backoff.reset();
                        // Clean start: there is never a session to keep the subscription.
                        let filter = match version {
                            MqttVersion::V5 => self.filter.clone(),
                            MqttVersion::V311 => {
                                tracing::warn!(
                                    filter = %self.unshared_filter,
                                    "MQTT 3.1.1 has no shared subscriptions: a plain subscription; \
                                     run a single replica on this broker"
                                );
                                self.unshared_filter.clone()
                            }
                        };
                        tracing::info!(%filter, mqtt = version.name(), "escalator connected");
                        if !self.session.try_subscribe(&filter) {
                            tracing::error!("cannot subscribe: client queue full");
                        }
                    }
                    SessionEvent::Message(m) if !draining => self.receive(m).await,
                    SessionEvent::Message(_) | SessionEvent::Disconnected | SessionEvent::Other => {}
                    SessionEvent::Lost(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, "broker connection lost");
                        if draining {
                            break;
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
            if draining && self.in_flight.is_empty() {
                break;
            }
        }
        self.session.disconnect(Duration::from_millis(500)).await;
        tracing::info!("escalator stopped");
    }

    fn reply(&self, topic: &str, correlation: Option<Bytes>, bytes: Vec<u8>) {
        let properties = PublishProperties {
            correlation_data: correlation,
            content_type: Some("application/vnd.cascade.v1+postcard".into()),
            ..PublishProperties::default()
        };
        if !self
            .session
            .try_publish(topic, false, bytes, Some(&properties))
        {
            tracing::warn!(%topic, "reply not queued (client queue full)");
        }
    }

    fn reject(
        &mut self,
        topic: &str,
        correlation: Option<Bytes>,
        id: Option<Uuid>,
        reason: RejectReason,
        detail: String,
        seq: u64,
    ) {
        self.stats.reject(reason);
        tracing::info!(reason = reason.name(), %detail, "escalation rejected");
        let bytes = encode(&Message::Rejection(Rejection {
            id,
            reason,
            detail: detail.chars().take(1000).collect(),
        }));
        self.reply(topic, correlation, bytes);
        self.complete(seq);
    }

    /// Marks received message `seq` handled and acknowledges every handled one at the head of
    /// the arrival order.
    fn complete(&mut self, seq: u64) {
        self.done_seqs.insert(seq);
        while let Some((head, _)) = self.acks.front() {
            if !self.done_seqs.remove(head) {
                break;
            }
            if let Some((_, ack)) = self.acks.pop_front()
                && !self.session.try_ack(&ack)
            {
                tracing::warn!("acknowledgement not queued");
            }
        }
    }

    async fn receive(&mut self, p: Incoming) {
        let received = Instant::now();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.acks.push_back((seq, p.ack.clone()));
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cascade_escalator_escalations_total").increment(1);
        let topic_name = String::from_utf8_lossy(&p.topic).into_owned();
        let Ok(topic) = DeviceTopic::parse(&topic_name) else {
            tracing::warn!(topic = %topic_name, "escalation on a topic outside the scheme ignored");
            self.complete(seq);
            return;
        };
        let device = topic.device.to_string();
        let default_reply = DeviceTopic {
            fleet: &self.fleet,
            device: &device,
            channel: Channel::Verdict,
        }
        .to_string();
        // Answer on the requested response topic when it is this device's verdict topic.
        let reply_topic = p
            .response_topic
            .as_deref()
            .filter(|t| {
                DeviceTopic::parse(t)
                    .is_ok_and(|d| d.channel == Channel::Verdict && d.device == device)
            })
            .map_or(default_reply, str::to_string);
        let correlation = p.correlation.clone();
        metrics::counter!("cascade_escalator_device_escalations_total", "device" => device.clone())
            .increment(1);
        let request = match decode(&p.payload, &self.limits) {
            Ok(Message::EscalationRequest(r)) => r,
            Ok(other) => {
                let detail = format!("expected an escalation_request, got {}", other.kind());
                return self.reject(
                    &reply_topic,
                    correlation,
                    None,
                    RejectReason::Malformed,
                    detail,
                    seq,
                );
            }
            Err(e @ DecodeError::TooLarge { .. }) => {
                return self.reject(
                    &reply_topic,
                    correlation,
                    None,
                    RejectReason::TooLarge,
                    e.to_string(),
                    seq,
                );
            }
            Err(e) => {
                return self.reject(
                    &reply_topic,
                    correlation,
                    None,
                    RejectReason::Malformed,
                    e.to_string(),
                    seq,
                );
            }
        };
        let id = request.id;
        if let Some((topic, corr, bytes)) = self.answered.get(&id) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            let (topic, corr, bytes) = (topic.clone(), corr.clone(), bytes.clone());
            self.reply(&topic, corr, bytes);
            self.complete(seq);
            return;
        }
        if self.in_flight.contains_key(&id) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            self.complete(seq);
            return;
        }
        let (per_minute, burst) = self.per_device;
        if per_minute > 0 {
            let bucket = self
                .buckets
                .entry(device.clone())
                .or_insert_with(|| TokenBucket::new(per_minute, burst, now_ms()));
            if !bucket.try_take(now_ms()) {
                let detail = format!("device {device} exceeds {per_minute} escalations per minute");
                return self.reject(
                    &reply_topic,
                    correlation,
                    Some(id),
                    RejectReason::RateLimited,
                    detail,
                    seq,
                );
            }
        }
        let Some((cloud, tail)) = self.routes.get(&request.model.name) else {
            let detail = format!("no cloud model serves edge model {:?}", request.model.name);
            return self.reject(
                &reply_topic,
                correlation,
                Some(id),
                RejectReason::UnknownModel,
                detail,
                seq,
            );
        };
        let (served, wire, redactions) = match &request.payload {
            Payload::Tensor(t) => (cloud.clone(), Some(t), Vec::new()),
            Payload::Redacted(r) => (cloud.clone(), r.tensor.as_ref(), r.redactions.clone()),
            Payload::Embedding(t) => match tail {
                Some(tail) => (tail.clone(), Some(t), Vec::new()),
                None => {
                    let detail = format!(
                        "edge model {:?} has no tail model for embeddings",
                        request.model.name
                    );
                    return self.reject(
                        &reply_topic,
                        correlation,
                        Some(id),
                        RejectReason::PrivacyModeNotAccepted,
                        detail,
                        seq,
                    );
                }
            },
        };
        let input = wire
            .ok_or_else(|| "the redacted record carries no tensor".to_string())
            .and_then(|w| from_wire(w).map_err(|e| e.to_string()))
            .and_then(|t| shape_input(t, &served.input, &redactions));
        let input = match input {
            Ok(t) => t,
            Err(detail) => {
                return self.reject(
                    &reply_topic,
                    correlation,
                    Some(id),
                    RejectReason::Malformed,
                    detail,
                    seq,
                );
            }
        };
        let deadline = p
            .expiry_s
            .map(|s| received + Duration::from_secs(u64::from(s)));
        let job = Job {
            request,
            input,
            reply_topic,
            correlation,
            received,
            deadline,
            seq,
        };
        let key = served.key.clone();
        match self.batcher.push(&key, job, received) {
            Ok(()) => {
                self.in_flight.insert(id, ());
                metrics::gauge!("cascade_escalator_queued").set(self.batcher.len() as f64);
                self.release().await;
            }
            Err(job) => {
                let detail = "escalator queues are full; retry later".to_string();
                self.reject(
                    &job.reply_topic,
                    job.correlation.clone(),
                    Some(id),
                    RejectReason::Overloaded,
                    detail,
                    job.seq,
                );
            }
        }
    }

    /// Hands every batch that is due to its model's worker.
    async fn release(&mut self) {
        let running = &self.running;
        let due = self.batcher.ready(Instant::now(), |model| {
            running.get(model).is_none_or(|&n| n == 0)
        });
        for batch in due {
            self.dispatch(batch).await;
        }
    }

    async fn dispatch(&mut self, batch: Batch<Job>) {
        *self.running.entry(batch.model.clone()).or_default() += 1;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batched
            .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
        metrics::histogram!("cascade_escalator_batch_size").record(batch.items.len() as f64);
        let Some(worker) = self.workers.get(&batch.model) else {
            return;
        };
        if let Err(e) = worker.send(batch).await {
            tracing::error!("model worker stopped; batch lost: {}", e.0.model);
        }
    }

    fn answer(&mut self, done: Done) {
        let Done {
            model,
            jobs,
            probabilities,
            started,
            inference,
        } = done;
        if let Some(n) = self.running.get_mut(&model) {
            *n = n.saturating_sub(1);
        }
        let batch_size = jobs.len();
        metrics::histogram!("cascade_escalator_inference_seconds").record(inference.as_secs_f64());
        let probabilities = match probabilities {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, batch = batch_size, "batch failed");
                for (job, _) in jobs {
                    self.in_flight.remove(&job.request.id);
                    self.reject(
                        &job.reply_topic,
                        job.correlation.clone(),
                        Some(job.request.id),
                        RejectReason::Malformed,
                        e.clone(),
                        job.seq,
                    );
                }
                return;
            }
        };
        for ((job, queued_at), probs) in jobs.into_iter().zip(probabilities) {
            let id = job.request.id;
            self.in_flight.remove(&id);
            if job.deadline.is_some_and(|d| Instant::now() > d) {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("cascade_escalator_expired_total").increment(1);
                self.complete(job.seq);
                continue;
            }
            let served = match self.routes.get(&job.request.model.name) {
                Some((cloud, tail)) if matches!(job.request.payload, Payload::Embedding(_)) => {
                    tail.clone().unwrap_or_else(|| cloud.clone())
                }
                Some((cloud, _)) => cloud.clone(),
                None => continue,
            };
            let top = cascade_infer::confidence::top_k(&probs, 3);
            let (class, probability) = top.first().map_or((0, 0.0), |&(c, p)| (c as u32, p));
            let total = job.received.elapsed();
            let us = |d: Duration| d.as_micros().min(u128::from(u32::MAX)) as u32;
            let verdict = Verdict {
                id,
                class,
                label: served.metadata.labels.get(class as usize).cloned(),
                scores: top
                    .iter()
                    .map(|&(c, s)| ClassScore {
                        class: c as u32,
                        score: s,
                    })
                    .collect(),
                model: served.model_ref.clone(),
                timings: Timings {
                    queue_us: us(started.saturating_duration_since(queued_at)),
                    inference_us: us(inference),
                    total_us: us(total),
                },
                batch_size: batch_size.min(usize::from(u16::MAX)) as u16,
            };
            metrics::histogram!("cascade_escalator_queue_seconds")
                .record(started.saturating_duration_since(queued_at).as_secs_f64());
            metrics::histogram!("cascade_escalator_verdict_seconds").record(total.as_secs_f64());
            let bytes = encode(&Message::Verdict(verdict));
            self.reply(&job.reply_topic, job.correlation.clone(), bytes.clone());
            self.complete(job.seq);
            self.stats.answered.fetch_add(1, Ordering::Relaxed);
            if let Some(tx) = &self.latencies {
                // The series is a sample; a full channel drops one rather than wait.
                let _ = tx.try_send(us(total));
            }
            self.remember(id, job.reply_topic.clone(), job.correlation.clone(), bytes);
            let rule = match job.request.edge.rule {
                PolicyRule::LowConfidence { .. } => "low_confidence",
                PolicyRule::ClassThreshold { .. } => "class_threshold",
                PolicyRule::Audit => "audit",
                PolicyRule::Manual => "manual",
            };
            let example = Example {
                id: id.to_string(),
                device: job.request.device.clone(),
                model: job.request.model.name.clone(),
                model_version: job.request.model.version.to_string(),
                privacy: job.request.privacy.name().into(),
                input_npy: job.input.to_npy_bytes(),
                edge_class: job.request.edge.top_k.first().map_or(0, |c| c.class),
                edge_confidence: job.request.edge.confidence.value,
                rule: rule.into(),
                cloud_class: class,
                cloud_probability: probability,
                cloud_model: served.model_ref.to_string(),
                received_ms: now_ms(),
            };
            if self.store.try_send(example).is_err() {
                let dropped = self.stats.store_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                metrics::counter!("cascade_escalator_examples_dropped_total").increment(1);
                // One line per thousand, not one per example: under overload this would
                // otherwise be the loudest thing in the log.
                if dropped % 1000 == 1 {
                    tracing::warn!(
                        dropped_total = dropped,
                        "hard-example store is behind; examples dropped (verdicts unaffected)"
                    );
                }
            }
        }
    }

    fn remember(&mut self, id: Uuid, topic: String, correlation: Option<Bytes>, bytes: Vec<u8>) {
        self.answered.insert(id, (topic, correlation, bytes));
        self.answered_order.push_back(id);
        if self.answered_order.len() > ANSWERED_MEMORY
            && let Some(old) = self.answered_order.pop_front()
        {
            self.answered.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shape: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: "x".into(),
            dtype: cascade_infer::DType::F32,
            shape,
            quantization: None,
        }
    }

    #[test]
    fn the_store_waits_for_more_examples_only_while_they_keep_coming() {
        let ms = Duration::from_millis;
        // Never written, or idle for a commit interval or more: at once.
        assert_eq!(store_wait(1, None), None);
        assert_eq!(store_wait(1, Some(STORE_COMMIT_INTERVAL)), None);
        assert_eq!(store_wait(1, Some(ms(60_000))), None);
        // Within the interval after a commit: until it has passed.
        assert_eq!(store_wait(1, Some(ms(0))), Some(STORE_COMMIT_INTERVAL));
        assert_eq!(
            store_wait(7, Some(ms(4))),
            Some(STORE_COMMIT_INTERVAL - ms(4))
        );
        // A full group goes at once.
        assert_eq!(store_wait(STORE_GROUP, Some(ms(0))), None);
        assert_eq!(
            store_wait(STORE_GROUP - 1, Some(ms(0))),
            Some(STORE_COMMIT_INTERVAL)
        );
    }

    #[test]
    fn inputs_are_shaped_to_the_model() {
        let t = Tensor::F32(ArrayD::from_elem(vec![1, 64], 0.5));
        let s = spec(vec![Dim::Symbolic("N".into()), Dim::Fixed(64)]);
        assert_eq!(shape_input(t.clone(), &s, &[]).unwrap().shape(), &[1, 64]);
        let s8 = spec(vec![
            Dim::Fixed(1),
            Dim::Fixed(8),
            Dim::Fixed(8),
            Dim::Fixed(1),
        ]);
        assert_eq!(
            shape_input(t.clone(), &s8, &[]).unwrap().shape(),
            &[1, 8, 8, 1],
            "same count, reshaped"
        );
        let s63 = spec(vec![Dim::Symbolic("N".into()), Dim::Fixed(63)]);
        assert!(shape_input(t, &s63, &[]).unwrap_err().contains("64 values"));
    }

    #[test]
    fn downscaled_images_are_upsampled_back() {
        let small = Tensor::F32(
            ArrayD::from_shape_vec(vec![1, 2, 2, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
        );
        let s = spec(vec![
            Dim::Fixed(1),
            Dim::Fixed(4),
            Dim::Fixed(4),
            Dim::Fixed(1),
        ]);
        let big = shape_input(small, &s, &[Redaction::Downscaled { factor: 2 }]).unwrap();
        let a = big.as_f32().unwrap();
        assert_eq!(a[[0, 0, 1, 0]], 1.0);
        assert_eq!(a[[0, 3, 3, 0]], 4.0);
    }

    /// A model that records the batch size of every run, around a real one.
    struct Recording {
        inner: Arc<dyn Model>,
        per_shape: bool,
        runs: std::sync::Mutex<Vec<usize>>,
    }

    impl Model for Recording {
        fn info(&self) -> &cascade_infer::ModelInfo {
            self.inner.info()
        }

        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, cascade_infer::InferError> {
            self.runs.lock().unwrap().push(inputs[0].shape()[0]);
            self.inner.run(inputs)
        }

        fn compiles_per_shape(&self) -> bool {
            self.per_shape
        }
    }

    #[test]
    fn a_model_compiled_per_shape_is_warmed_up_for_each_power_of_two_batch() {
        let path = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/digits-cloud.onnx"
        ));
        let route = RouteConfig {
            edge_model: "digits-edge".into(),
            cloud_model: path.into(),
            tail_model: None,
            threads: 1,
            backend: "tract".into(),
        };
        let loaded = load_served(path, "cloud".into(), &route).unwrap();
        for (per_shape, max_batch, expected) in [
            (true, 20, vec![1, 2, 4, 8, 16]),
            (true, 1, vec![1]),
            (false, 20, vec![]),
        ] {
            let recording = Arc::new(Recording {
                inner: loaded.model.clone(),
                per_shape,
                runs: Default::default(),
            });
            let served = Served {
                model: recording.clone(),
                ..loaded.clone()
            };
            warm_up(&served, max_batch);
            assert_eq!(
                *recording.runs.lock().unwrap(),
                expected,
                "max_batch {max_batch}"
            );
        }
    }
}
