//! `cloud-escalator demo`: the whole system on one machine (part of the binary: it prints).
//!
//! Starts the embedded broker and the escalation service, starts several edge agents in this
//! process (each with its own spool and MQTT connection, exactly as `edge-agent run` would), streams
//! the bundled held-out set through them, and prints a live summary and a final table. The same
//! edge model and threshold are also evaluated offline, so the cascade figures can be checked
//! against `edge-agent eval`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cascade_infer::evaluation::{Prediction, accuracy, confidence_curve};
use cascade_infer::metadata::Metadata;
use cascade_infer::{LoadOptions, Metric, Tensor, load_path, run_batch};
use edge_agent::agent::AgentHandle;
use edge_agent::config::AgentConfig;
use edge_agent::input::{InputItem, ResultEvent, Stage};
use ndarray::Axis;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use cloud_escalator::config::{EscalatorConfig, RouteConfig};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Edge agents to start.
    pub agents: usize,
    /// Escalation threshold (max-probability).
    pub threshold: f32,
    /// `raw`, `redacted` or `embedding`.
    pub privacy: String,
    /// Edge model.
    pub edge_model: PathBuf,
    /// Cloud model.
    pub cloud_model: PathBuf,
    /// Tail model (embedding mode).
    pub tail_model: PathBuf,
    /// Directory with inputs.npy and labels.npy.
    pub data: PathBuf,
    /// Passes over the data.
    pub rounds: usize,
    /// Port of the embedded broker (a free one when absent).
    pub port: Option<u16>,
    /// Keep the system running after the summary (until Ctrl-C), for trying it by hand.
    pub stay: bool,
}

/// What the demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// Inputs classified.
    pub inputs: usize,
    /// Inputs escalated.
    pub escalated: usize,
    /// Verdicts received.
    pub verdicts: usize,
    /// Edge-only accuracy.
    pub edge_accuracy: f64,
    /// Cascade accuracy (cloud verdict for escalated inputs, edge answer otherwise).
    pub cascade_accuracy: f64,
    /// Cloud-only accuracy.
    pub cloud_accuracy: f64,
    /// Escalation rate and cascade accuracy that `edge-agent eval` reports at this threshold.
    pub eval_escalated: f64,
    /// See `eval_escalated`.
    pub eval_cascade_accuracy: f64,
    /// Escalation bytes sent per input.
    pub bytes_per_input: f64,
    /// Escalation bytes per escalation.
    pub bytes_per_escalation: f64,
    /// Verdict round trip p50, milliseconds.
    pub latency_p50_ms: f64,
    /// Verdict round trip p99, milliseconds.
    pub latency_p99_ms: f64,
    /// Inputs per second over the run.
    pub inputs_per_s: f64,
    /// Mean batch size at the escalator.
    pub mean_batch: f64,
}

fn labels(path: &std::path::Path) -> anyhow::Result<Vec<usize>> {
    Ok(match Tensor::read_npy(path)? {
        Tensor::I64(a) => a.iter().map(|&v| v as usize).collect(),
        Tensor::I32(a) => a.iter().map(|&v| v as usize).collect(),
        other => anyhow::bail!("labels must be integers, got {}", other.dtype()),
    })
}

/// Probabilities of a classifier over every row of `inputs`, as its sidecar defines them.
fn probabilities(path: &std::path::Path, inputs: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    let model = load_path(path, &LoadOptions::default())?;
    let meta = Metadata::for_model(path)?;
    let ix = meta.scores_index(model.info()).unwrap_or(0);
    let outputs = run_batch(model.as_ref(), vec![inputs.clone()])?;
    let scores = outputs[ix].to_f32();
    let n = inputs.shape()[0];
    let flat: Vec<f32> = scores.iter().copied().collect();
    Ok(flat
        .chunks(flat.len() / n)
        .map(|r| meta.probabilities(r))
        .collect())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn agent_config(
    options: &DemoOptions,
    index: usize,
    broker: &str,
    state: &std::path::Path,
) -> anyhow::Result<AgentConfig> {
    let text = format!(
        r#"
device = "demo-{index:02}"
fleet = "demo"
state_dir = {state:?}
trusted_keys = []

[model]
path = {model:?}

[policy]
metric = "max_prob"
threshold = {threshold}
per_minute = 1000000
burst = 100000
privacy = {privacy:?}

[redaction]
key = "demo-redaction-key-not-secret"
pseudonymize_fields = ["user"]
quantize = true

[mqtt]
url = {broker:?}
fsync = false
retry_after_ms = 5000

[telemetry]
interval_s = 1

# Other programs can send inputs as JSON and read the results: see docs/mqtt.md.
[sources.mqtt]
url = {broker:?}
topic = "demo/demo-{index:02}/input"
result_topic = "demo/demo-{index:02}/result"
"#,
        state = state.join(format!("agent-{index}")),
        model = options.edge_model,
        threshold = options.threshold,
        privacy = options.privacy,
    );
    let config: AgentConfig = toml::from_str(&text)?;
    config.validate()?;
    Ok(config)
}

/// Runs the demo, printing progress to `out`.
pub async fn run(options: DemoOptions, out: &mut (dyn Write + Send)) -> anyhow::Result<DemoReport> {
    let inputs = Tensor::read_npy(&options.data.join("inputs.npy"))?;
    let labels = labels(&options.data.join("labels.npy"))?;
    let rows = inputs
        .as_f32()
        .ok_or_else(|| anyhow::anyhow!("inputs.npy must be float32"))?
        .clone();
    anyhow::ensure!(
        rows.shape()[0] == labels.len(),
        "inputs and labels differ in count"
    );
    let state = tempfile::tempdir()?;
    let port = match options.port {
        Some(p) => p,
        None => cloud_escalator::broker::free_local_port()?,
    };
    let broker = format!("mqtt://127.0.0.1:{port}");
    writeln!(
        out,
        "Cascade demo: embedded broker on 127.0.0.1:{port}, escalator, {} edge agents",
        options.agents
    )?;
    writeln!(
        out,
        "edge model  {}\ncloud model {}\nthreshold   {} (max_prob), privacy {}\n",
        options.edge_model.display(),
        options.cloud_model.display(),
        options.threshold,
        options.privacy
    )?;

    let shutdown = CancellationToken::new();
    let mut config: EscalatorConfig = toml::from_str("routes = []")?;
    config.fleet = "demo".into();
    config.broker.listen = ([127, 0, 0, 1], port).into();
    config.store.path = state.path().join("hard-examples.db");
    config.routes = vec![RouteConfig {
        edge_model: Metadata::for_model(&options.edge_model)?.name,
        cloud_model: options.cloud_model.clone(),
        tail_model: Some(options.tail_model.clone()),
        threads: 1,
        backend: "auto".into(),
    }];
    // The fleet console, on a free port, with an admin token for this run.
    let management = cloud_escalator::fleet::FleetConfig {
        store: state.path().join("fleet.db").display().to_string(),
        listen: ([127, 0, 0, 1], 0).into(),
        ..Default::default()
    };
    let fleet_store = management.store.clone();
    config.management = Some(management);
    let escalator = cloud_escalator::service::start(config, shutdown.child_token()).await?;
    if let Some(api) = escalator.fleet_api {
        use cloud_escalator::fleet::{db::Db, now_ms, store};
        let mut db = Db::open(&fleet_store)?;
        let token = store::create_token(&mut db, "demo", store::Role::Admin, now_ms())?;
        writeln!(out, "fleet console http://{api}/  (token {token})\n")?;
    }

    let mut agents: Vec<AgentHandle> = Vec::new();
    let (merged_tx, mut merged) = mpsc::channel::<ResultEvent>(8192);
    for i in 0..options.agents.max(1) {
        let mut agent = edge_agent::agent::start(
            agent_config(&options, i, &broker, state.path())?,
            shutdown.child_token(),
        )
        .await?;
        let mut results = agent.take_results().expect("results not taken yet");
        let tx = merged_tx.clone();
        tokio::spawn(async move {
            while let Some(r) = results.recv().await {
                if tx.send(r).await.is_err() {
                    return;
                }
            }
        });
        agents.push(agent);
    }
    drop(merged_tx);

    // Stream the held-out set, round-robin over the agents.
    let total = rows.shape()[0] * options.rounds.max(1);
    let senders: Vec<mpsc::Sender<InputItem>> = agents.iter().map(|a| a.inputs.clone()).collect();
    let feeder_rows = rows.clone();
    let feeder = tokio::spawn(async move {
        for n in 0..total {
            let row = feeder_rows
                .index_axis(Axis(0), n % feeder_rows.shape()[0])
                .to_owned()
                .insert_axis(Axis(0));
            let mut item = InputItem::new(n.to_string(), vec![Tensor::F32(row.into_dyn())]);
            item.fields = [("user".to_string(), format!("operator-{}", n % 7))].into();
            if senders[n % senders.len()].send(item).await.is_err() {
                return;
            }
        }
    });

    let started = Instant::now();
    let mut edge: HashMap<usize, ResultEvent> = HashMap::new();
    let mut cloud: HashMap<usize, ResultEvent> = HashMap::new();
    let mut escalated = 0usize;
    let mut last_print = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let waiting = edge.len() < total || cloud.len() < escalated;
        if !waiting || Instant::now() > deadline {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), merged.recv()).await {
            Ok(Some(r)) => {
                let Ok(n) = r.input.parse::<usize>() else {
                    continue;
                };
                match r.stage {
                    Stage::Edge => {
                        if r.escalation.is_some() {
                            escalated += 1;
                        }
                        edge.insert(n, r);
                    }
                    Stage::Cloud => {
                        cloud.insert(n, r);
                    }
                    Stage::Rejected | Stage::Dropped | Stage::Error => {
                        writeln!(
                            out,
                            "  ! input {n}: {:?} {}",
                            r.stage,
                            r.detail.unwrap_or_default()
                        )?;
                        if r.stage != Stage::Error {
                            escalated = escalated.saturating_sub(1);
                        }
                    }
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
        if last_print.elapsed() >= Duration::from_millis(500) {
            last_print = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            let right = edge
                .iter()
                .filter(|(n, r)| r.class == Some(labels[**n % labels.len()] as u32))
                .count();
            writeln!(
                out,
                "  {:>6.1} s  {:>5}/{total} inputs  {:>7.0} inputs/s  escalated {:>5.1}%  verdicts {:>4}/{escalated}  edge acc. so far {:>5.1}%",
                secs,
                edge.len(),
                edge.len() as f64 / secs.max(1e-9),
                100.0 * escalated as f64 / edge.len().max(1) as f64,
                cloud.len(),
                100.0 * right as f64 / edge.len().max(1) as f64,
            )?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    feeder.abort();
    anyhow::ensure!(
        edge.len() == total,
        "only {} of {total} inputs were answered within 120 s",
        edge.len()
    );
    anyhow::ensure!(
        cloud.len() >= escalated,
        "only {} of {escalated} verdicts arrived within 120 s",
        cloud.len()
    );

    // Accuracy, from the results the agents published.
    let truth: Vec<usize> = (0..total).map(|n| labels[n % labels.len()]).collect();
    let edge_classes: Vec<usize> = (0..total)
        .map(|n| edge[&n].class.unwrap_or(u32::MAX) as usize)
        .collect();
    let cascade: Vec<usize> = (0..total)
        .map(|n| {
            cloud
                .get(&n)
                .and_then(|c| c.class)
                .or(edge[&n].class)
                .unwrap_or(u32::MAX) as usize
        })
        .collect();
    let cloud_probs = probabilities(&options.cloud_model, &inputs)?;
    let cloud_classes: Vec<usize> = (0..total)
        .map(|n| {
            Prediction::from_probabilities(&cloud_probs[n % labels.len()], Metric::MaxProb)
                .map_or(usize::MAX, |p| p.class)
        })
        .collect();
    // What `edge-agent eval` says for this model and threshold, computed the same way.
    let edge_probs = probabilities(&options.edge_model, &inputs)?;
    let predictions: Vec<Prediction> = edge_probs
        .iter()
        .map(|p| Prediction::from_probabilities(p, Metric::MaxProb).expect("non-empty"))
        .collect();
    let cloud_once: Vec<usize> = cloud_classes[..labels.len()].to_vec();
    let curve = confidence_curve(
        &predictions,
        &labels,
        Some(&cloud_once),
        &[options.threshold],
    );
    let mut latencies: Vec<f64> = cloud
        .values()
        .filter_map(|r| r.latency_us)
        .map(|us| us as f64 / 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let bytes: u64 = agents
        .iter()
        .map(|a| a.stats.escalation_bytes.load(Ordering::Relaxed))
        .sum();
    let esc_sent: u64 = agents
        .iter()
        .map(|a| a.stats.escalations.load(Ordering::Relaxed))
        .sum();
    let batches = escalator.stats.batches.load(Ordering::Relaxed).max(1);
    let batched = escalator.stats.batched.load(Ordering::Relaxed);
    let report = DemoReport {
        inputs: total,
        escalated,
        verdicts: cloud.len(),
        edge_accuracy: accuracy(&edge_classes, &truth),
        cascade_accuracy: accuracy(&cascade, &truth),
        cloud_accuracy: accuracy(&cloud_classes, &truth),
        eval_escalated: curve[0].escalated,
        eval_cascade_accuracy: curve[0].cascade_accuracy.unwrap_or(0.0),
        bytes_per_input: bytes as f64 / total as f64,
        bytes_per_escalation: bytes as f64 / esc_sent.max(1) as f64,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
        inputs_per_s: total as f64 / elapsed,
        mean_batch: batched as f64 / batches as f64,
    };
    print_table(&options, &report, out)?;
    if options.stay {
        writeln!(
            out,
            "\nStill running (Ctrl-C to stop): broker mqtt://127.0.0.1:{port}; send JSON inputs to \
             demo/demo-00/input and read results on demo/demo-00/result (docs/mqtt.md has a \
             Python example)."
        )?;
        out.flush()?;
        tokio::signal::ctrl_c().await?;
    }

    for agent in agents {
        agent.stop(Duration::from_secs(5)).await;
    }
    escalator.stop(Duration::from_secs(5)).await;
    shutdown.cancel();
    Ok(report)
}

fn print_table(
    options: &DemoOptions,
    r: &DemoReport,
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    let pct = |v: f64| format!("{:.1}%", v * 100.0);
    writeln!(out)?;
    writeln!(out, "  ┌──────────────────────────────────┬──────────────┐")?;
    for (k, v) in [
        ("inputs", r.inputs.to_string()),
        ("inputs/s", format!("{:.0}", r.inputs_per_s)),
        (
            "escalated",
            format!(
                "{} ({})",
                r.escalated,
                pct(r.escalated as f64 / r.inputs as f64)
            ),
        ),
        ("edge-only accuracy", pct(r.edge_accuracy)),
        ("cascade accuracy", pct(r.cascade_accuracy)),
        ("cloud-only accuracy", pct(r.cloud_accuracy)),
        ("bytes sent per input", format!("{:.1}", r.bytes_per_input)),
        (
            "bytes per escalation",
            format!("{:.0}", r.bytes_per_escalation),
        ),
        ("verdict latency p50", format!("{:.2} ms", r.latency_p50_ms)),
        ("verdict latency p99", format!("{:.2} ms", r.latency_p99_ms)),
        ("mean escalator batch", format!("{:.1}", r.mean_batch)),
    ] {
        writeln!(out, "  │ {k:<32} │ {v:>12} │")?;
    }
    writeln!(out, "  └──────────────────────────────────┴──────────────┘")?;
    writeln!(
        out,
        "  edge-agent eval at this threshold: escalated {}, cascade accuracy {}",
        pct(r.eval_escalated),
        pct(r.eval_cascade_accuracy)
    )?;
    if options.privacy == "embedding" {
        writeln!(
            out,
            "  (eval's cascade uses the cloud model; embedding escalations are answered by the tail model)"
        )?;
    }
    Ok(())
}
