//! `edge-agent`: the device side of Cascade. A thin shell over the `edge_agent` library.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cascade_infer::{BackendChoice, LoadOptions, Metric};
use clap::{Args, Parser, Subcommand};
use edge_agent::bench::{BenchOptions, bench};
use edge_agent::config::{AgentConfig, ConfigError};
use edge_agent::eval::{EvalOptions, evaluate};
use edge_agent::infer_files::{InferRequest, infer};
use edge_agent::sensor::SensorStream;
use tokio_util::sync::CancellationToken;

/// The Cascade edge agent.
///
/// Runs a model on the device, answers the inputs it is sure about, and escalates the rest to
/// the cloud escalator over MQTT.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: classify inputs from the configured sources, escalate the uncertain ones to
    /// the cloud over MQTT, apply verdicts and policy updates. Stops cleanly on SIGTERM or Ctrl-C.
    ///
    /// The configuration is described in docs/agent.md. Exit status 64: invalid configuration.
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override the device id.
        #[arg(long, env = "CASCADE_DEVICE")]
        device: Option<String>,
        /// Override the broker, mqtt://host:port or mqtts://host:port.
        #[arg(long, env = "CASCADE_BROKER")]
        broker: Option<String>,
        /// Override the state directory (spool, processed inputs).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Run a model once on input files and write its outputs as .npy.
    ///
    /// Tensors are .npy in C order with the model's exact element type and shape (int8 in and out
    /// for fully quantized models; 0-d tensors allowed). Image models (with an [inputs.image]
    /// section in their metadata sidecar MODEL.toml) also take PNG or JPEG files.
    Infer {
        #[command(flatten)]
        engine: EngineArgs,
        /// An input: FILE for a single-input model, or NAME=FILE (repeat for several inputs).
        #[arg(long = "input", required = true)]
        inputs: Vec<String>,
        /// Output file, for a single-output model.
        #[arg(long, conflicts_with = "output_dir")]
        output: Option<PathBuf>,
        /// Directory for every output, written as DIR/<output name>.npy (characters outside
        /// [A-Za-z0-9._-] replaced by _).
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Measure a model's latency (p50/p90/p99), throughput and peak memory after warm-up.
    Bench {
        #[command(flatten)]
        engine: EngineArgs,
        /// Runs before measuring.
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        /// Measured runs.
        #[arg(long, default_value_t = 1000)]
        iterations: usize,
        /// Batch size for models with a free batch dimension.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Real inputs instead of synthetic ones: FILE or NAME=FILE, as for `infer`.
        #[arg(long = "input")]
        inputs: Vec<String>,
        /// Also time every operator and list the slowest.
        #[arg(long)]
        profile: bool,
        /// Measure the agent's own cost per input instead: run the whole agent (input channel,
        /// inference thread, policy, result delivery) and report end-to-end time per input minus
        /// the model's run.
        #[arg(long, conflicts_with_all = ["profile", "inputs", "batch"])]
        pipeline: bool,
        /// With --pipeline: the agent's `model.spin_us` (how long the inference thread polls
        /// for the next input before sleeping; 0 never spins).
        #[arg(long, default_value_t = edge_agent::config::DEFAULT_SPIN_US, requires = "pipeline")]
        spin_us: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Accuracy on a labelled set, and the confidence curve: for each threshold, the share of
    /// inputs escalated and the accuracy on the rest (and of the cascade, with --cloud-model).
    Eval {
        #[command(flatten)]
        engine: EngineArgs,
        /// Directory holding inputs.npy (one input per row) and labels.npy (integers).
        #[arg(long)]
        data: PathBuf,
        /// Cloud model: adds cloud-only and cascade (edge, then cloud below the threshold)
        /// accuracy.
        #[arg(long)]
        cloud_model: Option<PathBuf>,
        /// Confidence metric: max_prob, margin or entropy.
        #[arg(long, default_value = "max_prob")]
        metric: Metric,
        /// Threshold step of the curve.
        #[arg(long, default_value_t = 0.1)]
        step: f32,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the firmware → agent sensor link.
    #[command(subcommand)]
    Frames(FramesCommand),
    /// Install the agent as a hardened systemd service on this host (as root; try --dry-run).
    ///
    /// Steps: create the system user `cascade` unless it exists (useradd --system); create
    /// /etc/cascade and /var/lib/cascade/agent; copy this binary to BIN_DIR/edge-agent; write
    /// /etc/cascade/agent.toml from --config FILE or a template to edit, only if absent (an
    /// existing configuration is never overwritten); write /etc/systemd/system/edge-agent.service;
    /// systemctl daemon-reload; with --start, systemctl enable --now.
    ///
    /// The unit follows the configuration in force: its state directory, the watched input
    /// directory and results file are made writable, a serial source's port is allowed. Run it
    /// again after changing those, and after an upgrade (it replaces the binary and the unit).
    /// See docs/install.md.
    Install(edge_agent::install::InstallArgs),
    /// Join a fleet: make this device's key pair, have the fleet CA sign it with an enrollment
    /// token from an operator, and point the configuration at the result.
    ///
    /// The private key never leaves the device: only a certificate request is sent. Writes
    /// DIR/device.key (mode 0600), DIR/device.pem and DIR/ca.pem; with --config, sets `device`,
    /// `fleet`, `group` and the `[mqtt]` broker URL and TLS files in that file, keeping its
    /// comments. Nothing is written if the server refuses. See docs/fleet.md.
    Enroll {
        /// The escalator's fleet API, e.g. https://fleet.example.com.
        #[arg(long)]
        server: String,
        /// The enrollment token (`cloud-escalator fleet enrollment-token`).
        #[arg(long, env = "CASCADE_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: String,
        /// This device's id (1 to 64 of A-Z a-z 0-9 . _ -); the certificate will name it.
        #[arg(long)]
        device: String,
        /// Where the key and certificates go.
        #[arg(long, default_value = "/etc/cascade/identity")]
        dir: PathBuf,
        /// The agent configuration to update.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Allow plain http:// to another machine (the fleet CA could then be forged in transit).
        #[arg(long)]
        insecure: bool,
    },
}

#[derive(Args)]
struct EngineArgs {
    /// Model file (ONNX or TFLite; the format is read from the file, not its name).
    #[arg(long)]
    model: PathBuf,
    /// Engine: auto (fastest that loads the model), tract, tflite (needs a build with
    /// --features tflite), or cuda (the GPU engine, in a build with --features cuda; runs on CPU,
    /// saying why in one log line, where it cannot).
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Worker threads per inference.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

impl EngineArgs {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            backend: self.backend,
            threads: self.threads,
            ..LoadOptions::default()
        }
    }
}

#[derive(Subcommand)]
enum FramesCommand {
    /// Decode a sensor frame stream and print one JSON object per frame.
    ///
    /// Reads as bytes arrive, so it works on a live serial port as well as on a capture:
    /// `edge-agent frames decode /dev/ttyACM0`. Corrupt frames are printed as "dropped" events;
    /// totals (decoded, dropped, lost by sequence gaps) go to standard error at the end.
    Decode {
        /// File or serial device to read; standard input when absent.
        input: Option<PathBuf>,
    },
}

fn decode_frames(input: Option<PathBuf>) -> anyhow::Result<()> {
    let mut reader: Box<dyn Read> = match &input {
        Some(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut out = std::io::stdout().lock();
    let mut stream = SensorStream::new();
    let mut events = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read failed"),
        };
        stream.push(&buf[..n], &mut events);
        for event in events.drain(..) {
            serde_json::to_writer(&mut out, &event)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    let stats = stream.stats();
    #[allow(clippy::print_stderr)] // the summary of a CLI run, after the data on stdout
    {
        eprintln!(
            "frames: {} decoded, {} dropped (corrupt), {} lost (sequence gaps)",
            stats.frames, stats.dropped, stats.lost
        );
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Infer {
            engine,
            inputs,
            output,
            output_dir,
        } => {
            let written = infer(&InferRequest {
                model: engine.model.clone(),
                inputs,
                output,
                output_dir,
                options: engine.options(),
            })?;
            for path in written {
                tracing::info!(path = %path.display(), "output written");
            }
        }
        Command::Bench {
            engine,
            warmup,
            iterations,
            batch,
            inputs,
            profile,
            pipeline,
            spin_us,
            json,
        } => {
            let options = BenchOptions {
                model: engine.model.clone(),
                load: engine.options(),
                warmup,
                iterations,
                batch,
                inputs,
                profile,
            };
            if pipeline {
                let runtime = edge_agent::agent::runtime()?;
                let report = runtime.block_on(edge_agent::bench::pipeline(&options, spin_us))?;
                if json {
                    writeln!(out, "{}", serde_json::to_string(&report)?)?;
                } else {
                    writeln!(out, "{report}")?;
                }
                return Ok(());
            }
            let report = bench(&options)?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                writeln!(out, "{report}")?;
            }
        }
        Command::Eval {
            engine,
            data,
            cloud_model,
            metric,
            step,
            json,
        } => {
            let report = evaluate(&EvalOptions {
                model: engine.model.clone(),
                data,
                cloud_model,
                metric,
                step,
                load: engine.options(),
            })?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                write!(out, "{report}")?;
            }
        }
        Command::Frames(FramesCommand::Decode { input }) => decode_frames(input)?,
        Command::Install(args) => {
            edge_agent::install::run(&edge_agent::install::AGENT, &args, &mut out)?
        }
        Command::Enroll {
            server,
            token,
            device,
            dir,
            config,
            insecure,
        } => {
            let enrolled = edge_agent::enroll::enroll(&edge_agent::enroll::EnrollRequest {
                server: &server,
                token: &token,
                device: &device,
                dir: &dir,
                config: config.as_deref(),
                insecure,
            })?;
            writeln!(
                out,
                "enrolled {device} in fleet {}{}\nkey         {}\ncertificate {}\nfleet CA    {}\nbroker      {}",
                enrolled.fleet,
                enrolled
                    .group
                    .as_deref()
                    .map(|g| format!(", group {g}"))
                    .unwrap_or_default(),
                enrolled.key.display(),
                enrolled.certificate.display(),
                enrolled.ca.display(),
                enrolled
                    .broker
                    .as_deref()
                    .unwrap_or("(not given: set [mqtt] url)"),
            )?;
            if let Some(config) = config {
                writeln!(out, "updated     {}", config.display())?;
            }
        }
        Command::Run { .. } => unreachable!("handled in main"),
    }
    Ok(())
}

/// Loads the configuration and applies command-line overrides; `Err` is a usage error (exit 64).
fn agent_config(
    config: &std::path::Path,
    device: Option<String>,
    broker: Option<String>,
    state_dir: Option<PathBuf>,
) -> Result<AgentConfig, ConfigError> {
    let mut c = AgentConfig::load(config)?;
    if let Some(d) = device {
        c.device = d;
    }
    if let Some(b) = broker {
        c.mqtt.url = b;
    }
    if let Some(s) = state_dir {
        c.state_dir = s;
    }
    c.validate()?;
    Ok(c)
}

async fn run_agent(config: AgentConfig) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let shutdown = CancellationToken::new();
        let mut handle = edge_agent::agent::start(config.clone(), shutdown.clone()).await?;
        let restart = tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); false }
            _ = terminate.recv() => { tracing::info!("terminated"); false }
            // An OTA update was verified and activated: restart the pipeline on it. Inputs in
            // flight finish on the old model; the spool and the sources' state carry over.
            Ok(()) = handle.activated.changed() => {
                tracing::info!("model update activated; restarting on it");
                true
            }
        };
        if !handle.stop(std::time::Duration::from_secs(10)).await {
            tracing::warn!("some tasks did not stop within 10 s");
        }
        if !restart {
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Run { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    if let Command::Run {
        config,
        device,
        broker,
        state_dir,
    } = cli.command
    {
        let config = match agent_config(&config, device, broker, state_dir) {
            Ok(c) => c,
            Err(e) => {
                #[allow(clippy::print_stderr)]
                // configuration errors are reported before logging matters
                {
                    eprintln!("error: {e}");
                }
                return ExitCode::from(64);
            }
        };
        let runtime = match edge_agent::agent::runtime() {
            Ok(r) => r,
            Err(e) => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("error: cannot start the async runtime: {e}");
                }
                return ExitCode::FAILURE;
            }
        };
        return match runtime.block_on(run_agent(config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("error: {e:#}");
                }
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)] // the one place a CLI reports its failure
            {
                eprintln!("error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}
