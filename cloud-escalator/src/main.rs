//! `cloud-escalator`: the cloud side of Cascade. A thin shell over the `cloud_escalator` library.

mod demo;
mod install;
mod perf;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cascade_proto::envelope::DEFAULT_MAX_MESSAGE_BYTES;
use cascade_proto::examples::example;
use cascade_proto::{Limits, MessageKind};
use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};
use cloud_escalator::codec::{self, InputFormat};

/// The Cascade cloud escalator.
///
/// Edge agents answer most inputs themselves and escalate the ones they are unsure about over
/// MQTT; the escalator answers those with a larger model and manages the fleet.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole system on this machine: the embedded broker, the escalator and several edge
    /// agents; stream the bundled held-out set through them and print what happened.
    ///
    /// Run from the repository root (the default paths point into models/).
    Demo {
        /// Edge agents to start.
        #[arg(long, default_value_t = 4)]
        agents: usize,
        /// Escalate inputs whose max-probability is under this.
        #[arg(long, default_value_t = 0.9)]
        threshold: f32,
        /// What escalations carry: raw, redacted or embedding.
        #[arg(long, default_value = "raw")]
        privacy: String,
        /// Passes over the held-out set.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Edge model.
        #[arg(long, default_value = "models/digits-edge.int8.tflite")]
        edge_model: PathBuf,
        /// Cloud model.
        #[arg(long, default_value = "models/digits-cloud.onnx")]
        cloud_model: PathBuf,
        /// Tail model for embedding escalations.
        #[arg(long, default_value = "models/digits-tail.onnx")]
        tail_model: PathBuf,
        /// Port of the embedded broker (default: a free port).
        #[arg(long)]
        port: Option<u16>,
        /// Keep running after the summary, until Ctrl-C, so other MQTT clients can try the
        /// system (docs/mqtt.md has a Python example).
        #[arg(long)]
        stay: bool,
        /// Labelled data: inputs.npy and labels.npy.
        #[arg(long, default_value = "models/data/digits-test")]
        data: PathBuf,
    },
    /// Run the escalation service (and the embedded broker unless broker.url is set) until
    /// SIGTERM or Ctrl-C. See docs/mqtt.md and docs/escalator.md. Exit status 64: invalid
    /// configuration.
    Serve {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Measure the escalation path: round-trip latency, and throughput under load with batching.
    ///
    /// Prints one JSON object per measurement on standard output and a readable line on standard
    /// error. The scripts in bench/ run these beside their peers and print the ratios. Run from
    /// the repository root (the default paths point into models/).
    #[command(subcommand)]
    Perf(PerfCommand),
    /// The hard-example store: statistics and export for retraining.
    #[command(subcommand)]
    Examples(ExamplesCommand),
    /// Edge-model versions for over-the-air updates: signing keys, publishing, rollout steps.
    ///
    /// A running escalator with `[ota] registry = DIR` offers each device the newest version of
    /// its model whose target includes it (docs/ota.md).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Read and write Cascade messages: postcard wire format ⇄ integration JSON.
    ///
    /// For connecting other MQTT systems to a fleet: decode a payload captured with
    /// `mosquitto_sub -N`, or encode a JSON message for `mosquitto_pub -s`.
    /// The formats are described in docs/protocol.md.
    #[command(subcommand)]
    Codec(CodecCommand),
    /// Install the escalator as a hardened systemd service on this host (as root; try --dry-run).
    ///
    /// Steps: create the system user `cascade` unless it exists (useradd --system); create
    /// /etc/cascade and /var/lib/cascade/escalator; copy this binary to BIN_DIR/cloud-escalator;
    /// write /etc/cascade/escalator.toml from --config FILE or a template to edit, only if absent
    /// (an existing configuration is never overwritten); write
    /// /etc/systemd/system/cloud-escalator.service; systemctl daemon-reload; with --start,
    /// systemctl enable --now. The unit makes the store's directory and the OTA registry
    /// writable: run it again after changing those, and after an upgrade. See docs/install.md.
    Install(edge_agent::install::InstallArgs),
    /// Run the fleet from the command line: devices, rollouts, activity, audit, tokens, over the
    /// escalator's fleet API (its `[management] listen` address; docs/fleet.md).
    ///
    /// Give the API with --server (or CASCADE_SERVER) and a token with --token (or
    /// CASCADE_TOKEN). Tables by default, the API's JSON with --json.
    Fleet {
        #[command(flatten)]
        connection: cloud_escalator::fleet::client::Connection,
        #[command(subcommand)]
        command: cloud_escalator::fleet::client::FleetCommand,
    },
    /// Write a Mosquitto configuration that does what the embedded broker's device gate does:
    /// fleet-CA client certificates required, each device confined to its own topics.
    ///
    /// Writes into --out: mosquitto.conf, acl, ca.pem, server.pem and server.key (for
    /// --server-name), and escalator.pem / escalator.key, the escalator's client certificate (its
    /// [broker] client_cert / client_key) for the service listener. Uses (or creates) the fleet
    /// CA in --ca-dir, the same as [identity] ca_dir. See docs/fleet.md.
    MosquittoConfig {
        /// Fleet name.
        #[arg(long)]
        fleet: String,
        /// The fleet CA's directory.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Output directory (Mosquitto reads the files from here: give the final path).
        #[arg(long)]
        out: PathBuf,
        /// Host names devices connect to (repeatable).
        #[arg(long = "server-name", default_value = "localhost")]
        server_names: Vec<String>,
        /// The devices' TLS port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// The escalators' TLS port (keep it off the devices' network).
        #[arg(long, default_value_t = 8884)]
        service_port: u16,
    },
    /// Create the first admin token directly in the fleet store (on the escalator's host, before
    /// any token exists). Prints the token once; later tokens come from `fleet token create`.
    BootstrapToken {
        /// The fleet store: `[management] store` of the escalator's configuration (a SQLite path or a
        /// postgres:// URL).
        #[arg(long)]
        store: String,
        /// A name for the audit log.
        #[arg(long, default_value = "admin")]
        name: String,
        /// `admin` or `read_only`.
        #[arg(long, default_value = "admin")]
        role: String,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Create a fleet signing key (hex, readable by its owner only) and print its public half,
    /// which agents pin in `trusted_keys`. Never overwrites a file.
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Publish a model file (and its `<file>.toml` sidecar) as a new, immutable version.
    #[command(disable_version_flag = true)]
    Publish {
        /// The registry directory.
        #[arg(long, default_value = "registry")]
        registry: PathBuf,
        /// The model file.
        #[arg(long)]
        model: PathBuf,
        /// Model name (the name devices run; the sidecar is stamped with it).
        #[arg(long)]
        name: String,
        /// Version, MAJOR.MINOR.PATCH; devices only move to higher versions.
        #[arg(long)]
        version: String,
        /// Signing key from `models keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Which devices: all, group:NAME, devices:A,B,... or canary:PERCENT[@GROUP].
        #[arg(long, default_value = "canary:5")]
        target: String,
        /// Bytes per chunk on the wire.
        #[arg(long, default_value_t = cloud_escalator::registry::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
    },
    /// Widen (or narrow) a published version's target: the next rollout step, re-signed.
    #[command(disable_version_flag = true)]
    Rollout {
        /// The registry directory.
        #[arg(long, default_value = "registry")]
        registry: PathBuf,
        /// Model name.
        #[arg(long)]
        name: String,
        /// Version.
        #[arg(long)]
        version: String,
        /// Signing key.
        #[arg(long)]
        key: PathBuf,
        /// The new target (see `publish`).
        #[arg(long)]
        target: String,
    },
    /// List published versions.
    List {
        /// The registry directory.
        #[arg(long, default_value = "registry")]
        registry: PathBuf,
    },
    /// Sign and publish an escalation policy update (thresholds, budget, audits, privacy mode)
    /// from a JSON file holding a policy (`codec example policy_update` shows one under
    /// body.content); its sequence is set to one above the last. Served with the models.
    Policy {
        /// The registry directory.
        #[arg(long, default_value = "registry")]
        registry: PathBuf,
        /// The policy, JSON.
        #[arg(long)]
        file: PathBuf,
        /// Signing key.
        #[arg(long)]
        key: PathBuf,
    },
    /// Print a version's signed manifest as JSON.
    #[command(disable_version_flag = true)]
    Show {
        /// The registry directory.
        #[arg(long, default_value = "registry")]
        registry: PathBuf,
        /// Model name.
        #[arg(long)]
        name: String,
        /// Version.
        #[arg(long)]
        version: String,
    },
}

#[derive(Subcommand)]
enum PerfCommand {
    /// Simulated devices (one MQTT connection each) report to a running escalator with
    /// `[management]`; measures how long until all are registered and the fleet API's latency
    /// under that load. See bench/fleet.sh.
    Fleet {
        /// Broker the escalator uses.
        #[arg(long)]
        broker: String,
        /// Fleet the escalator serves.
        #[arg(long, default_value = "default")]
        fleet: String,
        /// Simulated devices.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// The fleet API.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// An API token.
        #[arg(long, env = "CASCADE_TOKEN", hide_env_values = true)]
        token: String,
        /// Telemetry interval of each device, milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Seconds to keep the load on once every device is registered.
        #[arg(long, default_value_t = 20)]
        hold_s: u64,
    },
    /// Simulated devices take a model update from a running escalator (`serve` with
    /// `[ota] registry`): bytes on the wire per device and total time. See bench/ota.sh.
    Ota {
        /// Broker the escalator uses.
        #[arg(long)]
        broker: String,
        /// Fleet the escalator serves.
        #[arg(long, default_value = "default")]
        fleet: String,
        /// Simulated devices.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// Model name the devices run (and the registry has a newer version of).
        #[arg(long)]
        model: String,
        /// Version the devices run.
        #[arg(long, default_value = "1.0.0")]
        from: String,
        /// Chunks each device keeps requested.
        #[arg(long, default_value_t = 16)]
        window: u16,
        /// Seconds before giving up.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
    /// One escalation at a time, agent → broker → escalator → agent, on a no-op model.
    RoundTrip {
        /// Broker URL (e.g. a Mosquitto to compare with); an embedded broker when absent.
        #[arg(long)]
        broker: Option<String>,
        /// Round trips measured.
        #[arg(long, default_value_t = 2000)]
        n: usize,
        /// Round trips before measuring.
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        /// The model at both ends.
        #[arg(long, default_value = "models/testdata/noop.onnx")]
        model: PathBuf,
        /// Do not flush the agent's spool to disk per escalation (devices flush by default).
        #[arg(long)]
        no_fsync: bool,
        /// Directory for the escalator's hard-example store (default: beside the agent's spool).
        /// Deployed, the escalator runs on another machine than the agent; a directory on another
        /// filesystem (e.g. /dev/shm) keeps its writes out of the agent's disk flushes, as there.
        #[arg(long)]
        escalator_store: Option<PathBuf>,
    },
    /// Open-loop load from simulated devices at increasing rates; stops after the first rate that
    /// misses the latency objective.
    Batching {
        /// Broker URL; an embedded broker when absent.
        #[arg(long)]
        broker: Option<String>,
        /// The escalator's largest batch (1: no batching).
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        /// Offered rates, escalations per second, comma-separated, ascending.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "100,200,400,800,1600,3200,6400"
        )]
        rates: Vec<f64>,
        /// Seconds at each rate.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Simulated devices.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Cloud model answering.
        #[arg(long, default_value = "models/digits-cloud.onnx")]
        cloud_model: PathBuf,
        /// Inputs (float32 .npy, one row per escalation, cycled).
        #[arg(long, default_value = "models/data/digits-test/inputs.npy")]
        inputs: PathBuf,
        /// Verdict latency objective for p95, milliseconds.
        #[arg(long, default_value_t = 50.0)]
        slo_ms: f64,
    },
}

#[derive(Subcommand)]
enum ExamplesCommand {
    /// Edge/cloud agreement per device and model.
    Stats {
        /// The store (SQLite file).
        #[arg(long)]
        store: PathBuf,
    },
    /// Write one edge model's examples as DIR/inputs.npy and DIR/labels.npy (the cloud's
    /// answers), the layout `edge-agent eval --data` reads.
    Export {
        /// The store (SQLite file).
        #[arg(long)]
        store: PathBuf,
        /// Edge model name.
        #[arg(long)]
        model: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Only examples where the cloud disagreed with the edge.
        #[arg(long)]
        disagreements_only: bool,
    },
}

#[derive(Subcommand)]
enum CodecCommand {
    /// Decode a message (postcard, hex or JSON) and print it as JSON.
    Decode {
        /// File to read; standard input when absent.
        file: Option<PathBuf>,
        /// Input encoding.
        #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
        format: InputFormat,
        /// Refuse messages larger than this many bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
        max_bytes: usize,
    },
    /// Encode a JSON message in the postcard wire format (raw bytes on standard output).
    Encode {
        /// JSON file to read; standard input when absent.
        file: Option<PathBuf>,
        /// Write hex text instead of raw bytes.
        #[arg(long)]
        hex: bool,
    },
    /// Print a valid example of a message kind as JSON (a template to edit).
    Example {
        /// Message kind.
        #[arg(value_parser = PossibleValuesParser::new(MessageKind::ALL.iter().map(|k| k.name())))]
        kind: String,
    },
    /// Explain a topic: which fleet, device and channel, and who publishes on it.
    Topic {
        /// A concrete topic, e.g. cascade/v1/acme/cam-01/escalate.
        topic: String,
    },
}

fn read_input(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match file {
        Some(path) => {
            bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        }
        None => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read standard input")?;
        }
    }
    Ok(bytes)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Codec(CodecCommand::Decode {
            file,
            format,
            max_bytes,
        }) => {
            let input = read_input(file.as_ref())?;
            let limits = Limits {
                max_message_bytes: max_bytes,
            };
            let message = codec::read_message(&input, format, &limits)?;
            writeln!(out, "{}", codec::to_pretty_json(&message))?;
        }
        Command::Codec(CodecCommand::Encode { file, hex }) => {
            let input = read_input(file.as_ref())?;
            let message = codec::read_message(&input, InputFormat::Json, &Limits::default())?;
            let wire = codec::to_wire(&message);
            if hex {
                writeln!(out, "{}", ::hex::encode(wire))?;
            } else {
                out.write_all(&wire)?;
            }
        }
        Command::Codec(CodecCommand::Example { kind }) => {
            // The value parser only admits known names.
            let kind = MessageKind::from_name(&kind).context("unknown message kind")?;
            writeln!(out, "{}", codec::to_pretty_json(&example(kind)))?;
        }
        Command::Codec(CodecCommand::Topic { topic }) => {
            writeln!(out, "{}", codec::explain_topic(&topic)?)?;
        }
        Command::Examples(ExamplesCommand::Stats { store }) => {
            let store = cloud_escalator::store::Store::open(&store)?;
            writeln!(
                out,
                "{:<34} {:<20} {:>11} {:>10}",
                "device", "model", "escalations", "agreement"
            )?;
            for a in store.agreement()? {
                let rate = a.agreements as f64 / a.escalations.max(1) as f64 * 100.0;
                writeln!(
                    out,
                    "{:<34} {:<20} {:>11} {:>9.1}%",
                    a.device, a.model, a.escalations, rate
                )?;
            }
        }
        Command::Examples(ExamplesCommand::Export {
            store,
            model,
            out: dir,
            disagreements_only,
        }) => {
            let store = cloud_escalator::store::Store::open(&store)?;
            let n = store.export(&model, &dir, disagreements_only)?;
            writeln!(out, "{n} examples written to {}", dir.display())?;
        }
        Command::Models(command) => models(command, &mut out)?,
        Command::Install(args) => edge_agent::install::run(&install::ESCALATOR, &args, &mut out)?,
        Command::Fleet {
            connection,
            command,
        } => {
            let text = cloud_escalator::fleet::client::run(&connection, &command)?;
            out.write_all(text.as_bytes())?;
        }
        Command::MosquittoConfig {
            fleet,
            ca_dir,
            out: dir,
            server_names,
            port,
            service_port,
        } => {
            use cloud_escalator::mosquitto::{
                MosquittoFiles, MosquittoListener, mosquitto_acl, mosquitto_conf,
            };
            let ca = cloud_escalator::pki::FleetCa::open_or_create(&ca_dir, &fleet)?;
            std::fs::create_dir_all(&dir)?;
            let service = format!("escalator:{fleet}");
            let (server_cert, server_key) = ca.issue_server(&server_names)?;
            let (service_cert, service_key) = ca.issue_service(&service)?;
            let files = MosquittoFiles {
                cafile: &dir.join("ca.pem"),
                certfile: &dir.join("server.pem"),
                keyfile: &dir.join("server.key"),
                acl_file: &dir.join("acl"),
            };
            let conf = mosquitto_conf(
                &fleet,
                &files,
                MosquittoListener { port, bind: None },
                Some(MosquittoListener {
                    port: service_port,
                    bind: None,
                }),
            )?;
            let written = [
                ("mosquitto.conf", conf),
                ("acl", mosquitto_acl(&fleet, &[&service])?),
                ("ca.pem", ca.ca_pem().to_owned()),
                ("server.pem", server_cert),
                ("server.key", server_key),
                ("escalator.pem", service_cert),
                ("escalator.key", service_key),
            ];
            for (name, text) in &written {
                let path = dir.join(name);
                // Keys are never readable by others, not even for a moment.
                let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
                cloud_escalator::pki::write_private(&path, text.as_bytes(), mode)?;
                writeln!(out, "wrote {}", path.display())?;
            }
            writeln!(
                out,
                "run: mosquitto -c {}\nescalator: [broker] url = \"mqtts://HOST:{service_port}\", ca = \"{}\", client_cert = \"{}\", client_key = \"{}\"",
                dir.join("mosquitto.conf").display(),
                dir.join("ca.pem").display(),
                dir.join("escalator.pem").display(),
                dir.join("escalator.key").display(),
            )?;
        }
        Command::BootstrapToken { store, name, role } => {
            use cloud_escalator::fleet::{db::Db, now_ms, store as fleet_store};
            let role = fleet_store::Role::parse(&role)
                .with_context(|| format!("role {role:?}: admin or read_only"))?;
            let mut db = Db::open(&store)?;
            let token = fleet_store::create_token(&mut db, &name, role, now_ms())?;
            fleet_store::audit(&mut db, "bootstrap", "token.create", &name, "{}", now_ms())?;
            writeln!(out, "{token}")?;
        }
        Command::Demo { .. } | Command::Serve { .. } | Command::Perf(_) => {
            unreachable!("handled in main")
        }
    }
    out.flush()?;
    Ok(())
}

fn models(command: ModelsCommand, out: &mut impl Write) -> anyhow::Result<()> {
    use cloud_escalator::registry::{Registry, key_id, keygen, load_key, parse_target};
    let version = |v: &str| {
        v.parse::<cascade_proto::model::Version>()
            .map_err(|e| anyhow::anyhow!("version {v:?}: {e}"))
    };
    match command {
        ModelsCommand::Keygen { out: path } => {
            let key = keygen(&path)?;
            writeln!(
                out,
                "secret key written to {} (keep it off devices)",
                path.display()
            )?;
            writeln!(
                out,
                "public key {} (id {}): add it to the agents' trusted_keys",
                ::hex::encode(key.verifying_key().as_bytes()),
                key_id(&key)
            )?;
        }
        ModelsCommand::Publish {
            registry,
            model,
            name,
            version: v,
            key,
            target,
            chunk_size,
        } => {
            let registry = Registry::open(&registry)?;
            let target = parse_target(&target, &name)?;
            let signed = registry.publish(
                &model,
                &name,
                version(&v)?,
                target,
                &load_key(&key)?,
                chunk_size,
            )?;
            let m = &signed.content;
            writeln!(
                out,
                "published {} ({} bytes, {} chunks, sha256 {}) for {:?}, signed by key {}",
                m.model,
                m.full.size,
                m.full.chunk_count(),
                ::hex::encode(m.full.sha256),
                m.target,
                signed.key_id
            )?;
        }
        ModelsCommand::Rollout {
            registry,
            name,
            version: v,
            key,
            target,
        } => {
            let registry = Registry::open(&registry)?;
            let target = parse_target(&target, &name)?;
            let signed = registry.rollout(&name, version(&v)?, target, &load_key(&key)?)?;
            writeln!(
                out,
                "{} now targets {:?}",
                signed.content.model, signed.content.target
            )?;
        }
        ModelsCommand::Policy {
            registry,
            file,
            key,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let policy: cascade_proto::policy::Policy = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a policy", file.display()))?;
            let signed = Registry::open(&registry)?.publish_policy(policy, &load_key(&key)?)?;
            writeln!(
                out,
                "policy update {} signed by key {} for {:?}",
                signed.content.sequence, signed.key_id, signed.content.target
            )?;
        }
        ModelsCommand::List { registry } => {
            let registry = Registry::open(&registry)?;
            writeln!(
                out,
                "{:<24} {:<10} {:>10} {:<18} target",
                "model", "version", "bytes", "key"
            )?;
            for e in registry.list()? {
                let m = &e.manifest.content;
                writeln!(
                    out,
                    "{:<24} {:<10} {:>10} {:<18} {:?}",
                    m.model.name,
                    m.model.version.to_string(),
                    m.full.size,
                    e.manifest.key_id.to_string(),
                    m.target
                )?;
            }
        }
        ModelsCommand::Show {
            registry,
            name,
            version: v,
        } => {
            let entry = Registry::open(&registry)?.get(&name, version(&v)?)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&entry.manifest)?)?;
        }
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn serve(config: cloud_escalator::config::EscalatorConfig) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = cloud_escalator::service::start(config, shutdown.clone()).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = terminate.recv() => tracing::info!("terminated"),
    }
    if !handle.stop(std::time::Duration::from_secs(10)).await {
        tracing::warn!("some tasks did not stop within 10 s");
    }
    Ok(())
}

async fn perf(command: PerfCommand) -> anyhow::Result<()> {
    let mut log = std::io::stderr();
    let mut out = std::io::stdout();
    match command {
        PerfCommand::RoundTrip {
            broker,
            n,
            warmup,
            model,
            no_fsync,
            escalator_store,
        } => {
            let options = perf::RoundTripOptions {
                broker,
                n,
                warmup,
                model,
                fsync: !no_fsync,
                escalator_store,
            };
            let r = perf::round_trip(options, &mut log).await?;
            writeln!(
                log,
                "cascade round trip: p50 {:.0} us, p99 {:.0} us, max {:.0} us, {} over 40 ms ({} bytes/escalation)",
                r.latency.p50_us,
                r.latency.p99_us,
                r.latency.max_us,
                r.latency.over_40ms,
                r.escalation_bytes
            )?;
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        }
        PerfCommand::Fleet {
            broker,
            fleet,
            devices,
            api,
            token,
            interval_ms,
            hold_s,
        } => {
            let options = perf::FleetLoadOptions {
                broker,
                fleet,
                devices,
                api,
                token,
                interval: std::time::Duration::from_millis(interval_ms.max(10)),
                hold: std::time::Duration::from_secs(hold_s),
            };
            let r = perf::fleet_load(options, &mut log).await?;
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        }
        PerfCommand::Ota {
            broker,
            fleet,
            devices,
            model,
            from,
            window,
            timeout_s,
        } => {
            let options = perf::OtaFleetOptions {
                broker,
                fleet,
                devices,
                model,
                from: from
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--from {from:?}: {e}"))?,
                window,
                timeout: std::time::Duration::from_secs(timeout_s),
            };
            let r = perf::ota_fleet(options, &mut log).await?;
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        }
        PerfCommand::Batching {
            broker,
            max_batch,
            rates,
            seconds,
            devices,
            cloud_model,
            inputs,
            slo_ms,
        } => {
            let options = perf::BatchingOptions {
                broker,
                max_batch,
                rates,
                seconds,
                devices,
                cloud_model,
                inputs,
                slo_ms,
            };
            for r in perf::batching(options, &mut log).await? {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            }
        }
    }
    Ok(())
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rumqttd logs every client disconnect as an error; keep it quiet unless asked.
    let level = match cli.command {
        Command::Serve { .. } => "info,rumqttd=off",
        _ => "warn,rumqttd=off",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    match cli.command {
        Command::Serve { config } => {
            let config = match cloud_escalator::config::EscalatorConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!("error: {e}");
                    }
                    return ExitCode::from(64);
                }
            };
            return report(runtime().and_then(|rt| rt.block_on(serve(config))));
        }
        Command::Demo {
            agents,
            threshold,
            privacy,
            rounds,
            edge_model,
            cloud_model,
            tail_model,
            data,
            port,
            stay,
        } => {
            let options = demo::DemoOptions {
                port,
                stay,
                agents,
                threshold,
                privacy,
                edge_model,
                cloud_model,
                tail_model,
                data,
                rounds,
            };
            return report(runtime().and_then(|rt| {
                rt.block_on(async {
                    let mut stdout = std::io::stdout();
                    demo::run(options, &mut stdout).await.map(|_| ())
                })
            }));
        }
        Command::Perf(command) => {
            return report(runtime().and_then(|rt| rt.block_on(perf(command))));
        }
        _ => {}
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)] // the one place a CLI reports its failure
            {
                eprintln!("error: {err:#}");
            }
            // EX_DATAERR: the input was wrong, not the invocation.
            ExitCode::from(65)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap checks the whole command tree (duplicate names, conflicting flags) only when asked.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
