//! The agent's configuration: one TOML file, defaults for everything that can have one, checked by
//! [`AgentConfig::validate`] before anything starts. See docs/agent.md for the reference.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cascade_infer::BackendChoice;
use cascade_proto::escalation::{ConfidenceMetric, PrivacyMode};
use cascade_proto::ota::TargetSelector;
use cascade_proto::policy::{Budget, ClassThreshold, Overflow, Policy};
use cascade_proto::topic::{Segment, validate_segment};
use serde::Deserialize;

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys.
    #[error("{path}: {error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, key).
        error: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// `edge-agent run` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This device's id (a topic segment: 1-64 of `A-Z a-z 0-9 . _ -`).
    pub device: String,
    /// Fleet name.
    #[serde(default = "default_fleet")]
    pub fleet: String,
    /// Device group, for targeted policy and model updates.
    #[serde(default)]
    pub group: Option<String>,
    /// Where the escalation spool and processed inputs are kept.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The edge model.
    pub model: ModelConfig,
    /// The escalation policy until the cloud sends a signed one.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// How redacted escalations are made.
    #[serde(default)]
    pub redaction: RedactionConfig,
    /// The connection to the fleet's broker.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Telemetry and metrics.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Where results go.
    #[serde(default)]
    pub output: OutputConfig,
    /// Where inputs come from.
    #[serde(default)]
    pub sources: SourcesConfig,
    /// Public keys (hex) trusted to sign policy and model updates.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Over-the-air model updates (docs/ota.md).
    #[serde(default)]
    pub ota: crate::ota::OtaConfig,
    /// Seconds after start when the code pages only start-up used are given back to the kernel
    /// ([`crate::memory`]); 0 keeps them.
    #[serde(default = "default_release_startup_code_s")]
    pub release_startup_code_s: u64,
}

/// Upper bound of `release_startup_code_s`: start-up is long over by then.
pub const MAX_RELEASE_STARTUP_CODE_S: u64 = 3600;

fn default_release_startup_code_s() -> u64 {
    10
}

fn default_fleet() -> String {
    "default".into()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/cascade-agent")
}

/// The edge model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model file (its sidecar `<file>.toml` beside it).
    pub path: PathBuf,
    /// Engine: `auto`, `tract` or `tflite`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Inference worker threads.
    #[serde(default = "one")]
    pub threads: usize,
    /// After each input, the inference thread polls for the next one for this long (µs) before
    /// it sleeps. Back-to-back inputs then skip a thread wake-up (tens of µs on a VM), at the
    /// cost of at most this much CPU per input. 0 never spins (battery-powered devices); nor
    /// does a single-core device.
    #[serde(default = "default_spin_us")]
    pub spin_us: u64,
}

fn default_spin_us() -> u64 {
    DEFAULT_SPIN_US
}

/// The default [`ModelConfig::spin_us`].
pub const DEFAULT_SPIN_US: u64 = 50;

/// The longest [`ModelConfig::spin_us`] accepted: past a millisecond spinning only burns CPU.
pub const MAX_SPIN_US: u64 = 1_000;

fn default_backend() -> String {
    "auto".into()
}

fn one() -> usize {
    1
}

/// The starting escalation policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `max_prob`, `margin` or `entropy`.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Escalate below this confidence.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// Per-class thresholds: class index (as a string key) to threshold.
    #[serde(default)]
    pub class_thresholds: BTreeMap<String, f32>,
    /// Escalations per minute (sustained).
    #[serde(default = "default_per_minute")]
    pub per_minute: u32,
    /// Escalations allowed in a burst.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// `keep_edge` or `queue` when the budget is spent.
    #[serde(default = "default_overflow")]
    pub overflow: String,
    /// Most inputs held with `overflow = "queue"`.
    #[serde(default = "default_queue_max")]
    pub queue_max: u32,
    /// Share of confident inputs escalated anyway.
    #[serde(default)]
    pub audit_rate: f32,
    /// `raw`, `redacted` or `embedding`.
    #[serde(default = "default_privacy")]
    pub privacy: String,
}

fn default_metric() -> String {
    "max_prob".into()
}
fn default_threshold() -> f32 {
    0.6
}
fn default_per_minute() -> u32 {
    600
}
fn default_burst() -> u32 {
    60
}
fn default_overflow() -> String {
    "keep_edge".into()
}
fn default_queue_max() -> u32 {
    100
}
fn default_privacy() -> String {
    "raw".into()
}

impl Default for PolicyConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Redaction settings for `privacy = "redacted"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    /// Key of the keyed hash used for pseudonyms (keep it secret and the same fleet-wide).
    #[serde(default)]
    pub key: String,
    /// Metadata fields removed.
    #[serde(default)]
    pub drop_fields: Vec<String>,
    /// Metadata fields replaced by pseudonyms.
    #[serde(default)]
    pub pseudonymize_fields: Vec<String>,
    /// Average-pool image inputs by this factor.
    #[serde(default)]
    pub downscale: Option<u16>,
    /// Send tensors as 8-bit.
    #[serde(default = "yes")]
    pub quantize: bool,
}

fn yes() -> bool {
    true
}

/// The broker connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    #[serde(default = "default_url")]
    pub url: String,
    /// Client id (defaults to the device id).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Keep-alive interval, seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// CA certificate (PEM) for `mqtts://`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// MQTT 5 message expiry of escalations, seconds.
    #[serde(default = "default_expiry")]
    pub message_expiry_s: u32,
    /// How long to wait for a verdict before giving up on it, seconds.
    #[serde(default = "default_verdict_timeout")]
    pub verdict_timeout_s: u64,
    /// Republish an escalation whose verdict is this late, milliseconds.
    #[serde(default = "default_retry_after")]
    pub retry_after_ms: u64,
    /// Bound of the escalation spool, bytes.
    #[serde(default = "default_spool_bytes")]
    pub spool_max_bytes: u64,
    /// Flush every spool change to disk (survives power loss).
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Largest message accepted from the broker, bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// MQTT version: `"auto"` (5, falling back to 3.1.1 when the broker lacks 5), `"5"`, `"3.1.1"`.
    #[serde(default)]
    pub protocol: crate::mqtt::Protocol,
}

fn default_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_expiry() -> u32 {
    300
}
fn default_verdict_timeout() -> u64 {
    600
}
fn default_retry_after() -> u64 {
    15_000
}
fn default_spool_bytes() -> u64 {
    64 << 20
}
fn default_max_message() -> usize {
    1 << 20
}

impl Default for MqttConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Telemetry and metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Seconds between telemetry reports (and status refreshes).
    #[serde(default = "default_telemetry_interval")]
    pub interval_s: u64,
    /// Serve Prometheus metrics here (e.g. `127.0.0.1:9464`).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

fn default_telemetry_interval() -> u64 {
    60
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Where results go.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Append every result (and every updated result) here as one JSON object per line.
    #[serde(default)]
    pub jsonl: Option<PathBuf>,
}

/// Input sources; any combination.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// A directory watched for new `.npy`, `.png`, `.jpg` files.
    #[serde(default)]
    pub directory: Option<DirectorySource>,
    /// Standard input, one JSON object per line.
    #[serde(default)]
    pub stdin: bool,
    /// A topic on a local broker, for other programs on the device.
    #[serde(default)]
    pub mqtt: Option<LocalMqttSource>,
    /// A serial port (or named pipe) carrying firmware sensor frames.
    #[serde(default)]
    pub serial: Option<SerialSource>,
}

/// Sensor frames from the firmware over a serial line, windowed into the model's input.
///
/// Samples are concatenated (channels interleaved, as the firmware sends them) and every window of
/// as many values as the model's input holds becomes one input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSource {
    /// The device, e.g. `/dev/ttyACM0`, or a named pipe.
    pub path: PathBuf,
    /// Baud rate for a serial port; omit for a named pipe.
    #[serde(default)]
    pub baud: Option<u32>,
    /// Values from the start of one window to the start of the next; defaults to one window
    /// (no overlap). Smaller overlaps windows, larger skips values.
    #[serde(default)]
    pub hop: Option<usize>,
}

/// The watched directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySource {
    /// Directory to watch; processed files move to `processed/`, unreadable ones to `failed/`.
    pub path: PathBuf,
    /// Polling interval, milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    200
}

/// A local MQTT input topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalMqttSource {
    /// Local broker, `mqtt://host:port`.
    pub url: String,
    /// Topic carrying JSON inputs.
    pub topic: String,
    /// Topic results go back on.
    pub result_topic: String,
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let config: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked before starting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        validate_segment(Segment::Device, &self.device)
            .or_else(|e| invalid(format!("device: {e}")))?;
        validate_segment(Segment::Fleet, &self.fleet)
            .or_else(|e| invalid(format!("fleet: {e}")))?;
        if let Some(g) = &self.group {
            validate_segment(Segment::Group, g).or_else(|e| invalid(format!("group: {e}")))?;
        }
        if let Err(e) = self.model.backend.parse::<BackendChoice>() {
            return invalid(format!("model.backend: {e}"));
        }
        if self.model.threads == 0 {
            return invalid("model.threads must be at least 1".into());
        }
        if self.model.spin_us > MAX_SPIN_US {
            return invalid(format!(
                "model.spin_us = {} is over {MAX_SPIN_US} µs: spinning longer only burns CPU",
                self.model.spin_us
            ));
        }
        if self.release_startup_code_s > MAX_RELEASE_STARTUP_CODE_S {
            return invalid(format!(
                "release_startup_code_s = {} is over {MAX_RELEASE_STARTUP_CODE_S}: start-up is long over by then (0 turns it off)",
                self.release_startup_code_s
            ));
        }
        let policy = self.initial_policy()?;
        policy.validate().or_else(|e| invalid(e.to_string()))?;
        if policy.privacy == PrivacyMode::Redacted && self.redaction.key.len() < 16 {
            return invalid(
                "redaction.key must be at least 16 characters when privacy = \"redacted\"".into(),
            );
        }
        if !(self.mqtt.url.starts_with("mqtt://") || self.mqtt.url.starts_with("mqtts://")) {
            return invalid(format!(
                "mqtt.url {:?} must start with mqtt:// or mqtts://",
                self.mqtt.url
            ));
        }
        self.broker_address()?;
        if self.mqtt.client_cert.is_some() != self.mqtt.client_key.is_some() {
            return invalid("mqtt.client_cert and mqtt.client_key go together".into());
        }
        if self.mqtt.keep_alive_s < 5 {
            return invalid("mqtt.keep_alive_s must be at least 5".into());
        }
        if let Some(serial) = &self.sources.serial {
            if serial.hop == Some(0) {
                return invalid("sources.serial.hop must be at least 1".into());
            }
            if serial.baud == Some(0) {
                return invalid("sources.serial.baud must be at least 1".into());
            }
        }
        if self.telemetry.interval_s == 0 {
            return invalid("telemetry.interval_s must be at least 1".into());
        }
        for key in &self.trusted_keys {
            parse_key(key).map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// Host, port and whether TLS is used, from `mqtt.url`.
    pub fn broker_address(&self) -> Result<(String, u16, bool), ConfigError> {
        broker_address(&self.mqtt.url)
    }

    /// The policy in force until the cloud sends one.
    pub fn initial_policy(&self) -> Result<Policy, ConfigError> {
        let p = &self.policy;
        let invalid = |m: String| ConfigError::Invalid(m);
        let metric = match p.metric.as_str() {
            "max_prob" => ConfidenceMetric::MaxProb,
            "margin" => ConfidenceMetric::Margin,
            "entropy" => ConfidenceMetric::Entropy,
            other => {
                return Err(invalid(format!(
                    "policy.metric {other:?}: expected max_prob, margin or entropy"
                )));
            }
        };
        let overflow = match p.overflow.as_str() {
            "keep_edge" => Overflow::KeepEdge,
            "queue" => Overflow::Queue { max: p.queue_max },
            other => {
                return Err(invalid(format!(
                    "policy.overflow {other:?}: expected keep_edge or queue"
                )));
            }
        };
        let privacy = match p.privacy.as_str() {
            "raw" => PrivacyMode::Raw,
            "redacted" => PrivacyMode::Redacted,
            "embedding" => PrivacyMode::Embedding,
            other => {
                return Err(invalid(format!(
                    "policy.privacy {other:?}: expected raw, redacted or embedding"
                )));
            }
        };
        let class_thresholds = p
            .class_thresholds
            .iter()
            .map(|(class, &threshold)| {
                class
                    .parse()
                    .map(|class| ClassThreshold { class, threshold })
                    .map_err(|_| {
                        invalid(format!(
                            "policy.class_thresholds: {class:?} is not a class index"
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            sequence: 0,
            metric,
            threshold: p.threshold,
            class_thresholds,
            budget: Budget {
                per_minute: p.per_minute,
                burst: p.burst,
                overflow,
            },
            audit_rate: p.audit_rate,
            privacy,
            target: TargetSelector::All,
        })
    }
}

/// Parses `mqtt://host:port` / `mqtts://host:port`.
pub fn broker_address(url: &str) -> Result<(String, u16, bool), ConfigError> {
    let invalid = || {
        ConfigError::Invalid(format!(
            "broker url {url:?} is not mqtt://host:port or mqtts://host:port"
        ))
    };
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(invalid());
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| invalid())?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(invalid());
    }
    Ok((host.to_string(), port, tls))
}

/// Parses a 32-byte ed25519 public key written as 64 hex characters.
pub fn parse_key(hex_key: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_key.trim())
        .map_err(|e| format!("trusted key {hex_key:?} is not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("trusted key {hex_key:?} is not 32 bytes (64 hex characters)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
device = "cam-01"
[model]
path = "models/digits-edge.int8.tflite"
"#;

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c: AgentConfig = toml::from_str(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.fleet, "default");
        assert_eq!(c.release_startup_code_s, 10);
        assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1883");
        let p = c.initial_policy().unwrap();
        assert_eq!(p.threshold, 0.6);
        assert_eq!(p.budget.overflow, Overflow::KeepEdge);
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            ("device = \"cam 01\"", "device"),
            (
                "device = \"cam-01\"\nrelease_startup_code_s = 86400",
                "release_startup_code_s",
            ),
            ("[policy]\nthreshold = 1.5", "policy.threshold"),
            ("[policy]\nmetric = \"vibes\"", "policy.metric"),
            ("[policy]\nprivacy = \"redacted\"", "redaction.key"),
            ("[mqtt]\nurl = \"tcp://x:1\"", "mqtt.url"),
            ("[mqtt]\nclient_cert = \"c.pem\"", "client_key"),
        ];
        for (extra, expected) in cases {
            let text = if extra.starts_with("device") {
                format!("{extra}\n[model]\npath = \"m\"")
            } else {
                format!("{MINIMAL}\n{extra}")
            };
            let c: AgentConfig = toml::from_str(&text).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }

    #[test]
    fn spinning_is_bounded() {
        let c: AgentConfig = toml::from_str(MINIMAL).unwrap();
        assert_eq!(c.model.spin_us, DEFAULT_SPIN_US);
        let with = |spin: u64| {
            toml::from_str::<AgentConfig>(&format!("{MINIMAL}spin_us = {spin}\n")).unwrap()
        };
        with(0).validate().unwrap();
        with(MAX_SPIN_US).validate().unwrap();
        let err = with(MAX_SPIN_US + 1).validate().unwrap_err().to_string();
        assert!(err.contains("model.spin_us"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!("{MINIMAL}\n[mqtt]\nurll = \"mqtt://x\"");
        let err = toml::from_str::<AgentConfig>(&text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            broker_address("mqtt://h:1884").unwrap(),
            ("h".into(), 1884, false)
        );
        assert_eq!(
            broker_address("mqtts://h").unwrap(),
            ("h".into(), 8883, true)
        );
        assert!(broker_address("mqtt://:1").is_err());
    }
}
