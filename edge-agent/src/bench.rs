//! `edge-agent bench`: latency percentiles, throughput and peak memory of one model.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cascade_infer::{DType, Dim, InferError, LoadOptions, Tensor, TensorSpec, load_path};
use ndarray::ArrayD;
use serde::Serialize;

use crate::infer_files::{InferFilesError, read_inputs};

/// How to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Model file.
    pub model: PathBuf,
    /// Engine options (backend, threads).
    pub load: LoadOptions,
    /// Runs before measuring.
    pub warmup: usize,
    /// Measured runs.
    pub iterations: usize,
    /// Size of free batch dimensions (the first dimension when it is symbolic).
    pub batch: usize,
    /// Real inputs (`FILE` or `NAME=FILE`) instead of synthetic ones.
    pub inputs: Vec<String>,
    /// Also time each operator (slowest first), when the backend can.
    pub profile: bool,
}

/// Mean time of one operator per run.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    /// Node name.
    pub node: String,
    /// Operator.
    pub op: String,
    /// Mean time per run, microseconds.
    pub mean_us: f64,
}

/// What a benchmark measured. Latencies are per call (one batch).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Model file.
    pub model: String,
    /// Engine that ran it.
    pub backend: String,
    /// Worker threads.
    pub threads: usize,
    /// Inputs per call.
    pub batch: usize,
    /// Measured calls.
    pub iterations: usize,
    /// Time to load and compile, milliseconds.
    pub load_ms: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 90th percentile latency, microseconds.
    pub p90_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Mean latency, microseconds.
    pub mean_us: f64,
    /// Inputs per second (batch / mean latency).
    pub throughput: f64,
    /// Peak resident memory of the process, KiB (Linux `VmHWM`).
    pub peak_rss_kib: Option<u64>,
    /// Per-operator times, slowest first (with `--profile`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<OpReport>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model       {}", self.model)?;
        writeln!(
            f,
            "backend     {} ({} thread(s), batch {})",
            self.backend, self.threads, self.batch
        )?;
        writeln!(f, "load        {:.1} ms", self.load_ms)?;
        writeln!(
            f,
            "latency     p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  mean {:.1} us ({} runs)",
            self.p50_us, self.p90_us, self.p99_us, self.mean_us, self.iterations
        )?;
        writeln!(f, "throughput  {:.0} inputs/s", self.throughput)?;
        match self.peak_rss_kib {
            Some(kib) => write!(f, "peak RSS    {:.1} MiB", kib as f64 / 1024.0)?,
            None => write!(f, "peak RSS    unavailable")?,
        }
        if !self.ops.is_empty() {
            write!(f, "\n\nslowest operators (mean per run):")?;
            for op in self.ops.iter().take(15) {
                write!(f, "\n  {:>10.1} us  {:<24} {}", op.mean_us, op.op, op.node)?;
            }
        }
        Ok(())
    }
}

/// A deterministic input for `spec`: free dimensions become `batch` (first) or 1.
pub fn synthetic_input(spec: &TensorSpec, batch: usize) -> Result<Tensor, InferError> {
    let shape: Vec<usize> = spec
        .shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbolic(_) if i == 0 => batch,
            Dim::Symbolic(_) => 1,
        })
        .collect();
    let n: usize = shape.iter().product();
    // A cheap deterministic pseudo-random sequence: the benchmark must not depend on input data
    // paths that a constant input would short-circuit.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let bad = |e: ndarray::ShapeError| InferError::Tensor(e.to_string());
    Ok(match spec.dtype {
        DType::F32 => Tensor::F32(
            ArrayD::from_shape_vec(
                shape,
                (0..n).map(|_| (next() % 1000) as f32 / 1000.0).collect(),
            )
            .map_err(bad)?,
        ),
        DType::I8 => Tensor::I8(
            ArrayD::from_shape_vec(shape, (0..n).map(|_| next() as i8).collect()).map_err(bad)?,
        ),
        DType::U8 => Tensor::U8(
            ArrayD::from_shape_vec(shape, (0..n).map(|_| next() as u8).collect()).map_err(bad)?,
        ),
        DType::I16 => Tensor::I16(
            ArrayD::from_shape_vec(shape, (0..n).map(|_| next() as i16).collect()).map_err(bad)?,
        ),
        DType::I32 => Tensor::I32(ArrayD::from_shape_vec(shape, vec![0; n]).map_err(bad)?),
        DType::I64 => Tensor::I64(ArrayD::from_shape_vec(shape, vec![0; n]).map_err(bad)?),
        DType::Bool => Tensor::Bool(ArrayD::from_shape_vec(shape, vec![false; n]).map_err(bad)?),
    })
}

/// Peak resident set size of this process, from `/proc/self/status`.
pub fn peak_rss_kib() -> Option<u64> {
    crate::memory::status_kib("VmHWM").ok()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let ix = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[ix.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// Loads the model, warms it up and measures `iterations` calls on the given or synthetic inputs.
pub fn bench(options: &BenchOptions) -> Result<BenchReport, InferFilesError> {
    let started = Instant::now();
    let model = load_path(&options.model, &options.load)?;
    let info = model.info().clone();
    let inputs = if options.inputs.is_empty() {
        info.inputs
            .iter()
            .map(|s| synthetic_input(s, options.batch))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        read_inputs(model.as_ref(), &options.model, &options.inputs)?
    };
    // The first run compiles shape-specialized plans; count it as loading.
    model.run(inputs.clone())?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    for _ in 0..options.warmup {
        model.run(inputs.clone())?;
    }
    let iterations = options.iterations.max(1);
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        // Cloning the inputs is outside the timed region: peers time only the call.
        let call = inputs.clone();
        let t = Instant::now();
        let out = model.run(call)?;
        times.push(t.elapsed());
        drop(out);
    }
    times.sort();
    let ops = if options.profile {
        match model.profile(inputs.clone(), iterations.min(200)) {
            Some(result) => result?
                .into_iter()
                .map(|t| OpReport {
                    node: t.node,
                    op: t.op,
                    mean_us: t.mean.as_secs_f64() * 1e6,
                })
                .collect(),
            None => Vec::new(),
        }
    } else {
        Vec::new()
    };
    let mean = times.iter().sum::<Duration>().as_secs_f64() / times.len() as f64;
    let batch = inputs
        .first()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(1)
        .max(1);
    Ok(BenchReport {
        model: options.model.display().to_string(),
        backend: info.backend.to_string(),
        threads: options.load.threads.max(1),
        batch,
        iterations,
        load_ms,
        p50_us: percentile(&times, 0.50),
        p90_us: percentile(&times, 0.90),
        p99_us: percentile(&times, 0.99),
        mean_us: mean * 1e6,
        throughput: batch as f64 / mean,
        peak_rss_kib: peak_rss_kib(),
        ops,
    })
}

/// What `bench --pipeline` measured: the agent's own cost per input, beside the model's.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// Model file.
    pub model: String,
    /// Inputs measured.
    pub iterations: usize,
    /// The inference thread's polling window (`model.spin_us`).
    pub spin_us: u64,
    /// Input handed to the agent → its result delivered, p50, microseconds.
    pub end_to_end_p50_us: f64,
    /// The model's run inside that, p50, microseconds.
    pub model_p50_us: f64,
    /// End to end minus the model's run, per input: p50, microseconds.
    pub overhead_p50_us: f64,
    /// The same, p99.
    pub overhead_p99_us: f64,
    /// Peak resident memory of the process, KiB.
    pub peak_rss_kib: Option<u64>,
}

impl fmt::Display for PipelineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "model       {} ({} inputs, spin_us = {})",
            self.model, self.iterations, self.spin_us
        )?;
        writeln!(
            f,
            "per input   end to end p50 {:.1} us, of which the model {:.1} us",
            self.end_to_end_p50_us, self.model_p50_us
        )?;
        write!(
            f,
            "overhead    p50 {:.1} us  p99 {:.1} us (goal: p50 <= 50 us)",
            self.overhead_p50_us, self.overhead_p99_us
        )
    }
}

/// Runs the whole agent in this process (input channel, inference thread, policy, result
/// delivery; no escalations, no broker) and measures, one input at a time, what it adds to the
/// model's own time.
/// `spin_us` is the agent's `model.spin_us`.
pub async fn pipeline(options: &BenchOptions, spin_us: u64) -> anyhow::Result<PipelineReport> {
    let state = tempfile::tempdir()?;
    // A broker address nobody listens on: the agent retries in the background, as offline
    // devices do; nothing is escalated (threshold 0, no audit sample).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config: crate::config::AgentConfig = toml::from_str(&format!(
        r#"
device = "bench"
state_dir = {state:?}
[model]
path = {model:?}
backend = "{backend}"
threads = {threads}
spin_us = {spin_us}
[policy]
threshold = 0.0
audit_rate = 0.0
[mqtt]
url = "mqtt://127.0.0.1:{port}"
fsync = false
[telemetry]
interval_s = 3600
"#,
        state = state.path(),
        model = options.model,
        backend = options.load.backend.name(),
        threads = options.load.threads.max(1),
    ))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut agent = crate::agent::start(config, shutdown.clone()).await?;
    let mut results = agent
        .take_results()
        .ok_or_else(|| anyhow::anyhow!("results already taken"))?;
    let inputs = agent
        .model
        .inputs
        .iter()
        .map(|s| synthetic_input(s, 1))
        .collect::<Result<Vec<_>, _>>()?;
    let iterations = options.iterations.max(1);
    let (mut total, mut model, mut overhead) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..options.warmup + iterations {
        let item = crate::input::InputItem::new(i.to_string(), inputs.clone());
        let started = Instant::now();
        agent.inputs.send(item).await?;
        let event = results
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("the agent stopped"))?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            event.stage == crate::input::Stage::Edge,
            "input {i}: {:?} {:?}",
            event.stage,
            event.detail
        );
        if i >= options.warmup {
            let ran = Duration::from_micros(event.latency_us.unwrap_or(0));
            total.push(elapsed);
            model.push(ran);
            overhead.push(elapsed.saturating_sub(ran));
        }
    }
    agent.stop(Duration::from_secs(5)).await;
    for v in [&mut total, &mut model, &mut overhead] {
        v.sort();
    }
    Ok(PipelineReport {
        model: options.model.display().to_string(),
        iterations,
        spin_us,
        end_to_end_p50_us: percentile(&total, 0.5),
        model_p50_us: percentile(&model, 0.5),
        overhead_p50_us: percentile(&overhead, 0.5),
        overhead_p99_us: percentile(&overhead, 0.99),
        peak_rss_kib: peak_rss_kib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_inputs_fill_free_dimensions() {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(64)],
            quantization: None,
        };
        let t = synthetic_input(&spec, 8).unwrap();
        assert_eq!(t.shape(), &[8, 64]);
        let values = t.as_f32().unwrap();
        assert!(values.iter().any(|&v| v != values[[0, 0]]), "inputs vary");
    }

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let times: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&times, 0.5), 51.0);
        assert_eq!(percentile(&times, 0.99), 99.0);
    }
}
