//! The escalator's configuration: one TOML file with defaults, validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cascade_infer::BackendChoice;
use cascade_proto::topic::{Segment, validate_segment};
use serde::Deserialize;

/// A configuration that cannot be used.
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
        /// The parser's message.
        error: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// `cloud-escalator serve` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalatorConfig {
    /// Fleet served.
    #[serde(default = "default_fleet")]
    pub fleet: String,
    /// The broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Which cloud model answers which edge model.
    pub routes: Vec<RouteConfig>,
    /// Dynamic batching.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// Input limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Hard-example store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Prometheus metrics endpoint.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Over-the-air model updates (served when `ota.registry` is set).
    #[serde(default)]
    pub ota: crate::ota::OtaConfig,
    /// Fleet management (`[management]`): device registry, HTTP API and console; off without
    /// this section.
    #[serde(default)]
    pub management: Option<crate::fleet::FleetConfig>,
    /// Device identity (`[identity]`): the fleet CA, enrollment, the mutual-TLS device gate.
    #[serde(default)]
    pub identity: Option<crate::fleet::IdentityConfig>,
}

fn default_fleet() -> String {
    "default".into()
}

/// The broker: embedded (rumqttd in this process) or external.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Run an embedded broker listening here (MQTT 5). Ignored when `url` is set.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// An external broker instead, `mqtt://host:port` or `mqtts://host:port`.
    #[serde(default)]
    pub url: Option<String>,
    /// CA for `mqtts://`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key for `mqtts://` with mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// See `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// MQTT client id of this replica.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Shared-subscription group; replicas in one group split the escalations.
    #[serde(default = "default_group")]
    pub share_group: String,
    /// Also serve MQTT 3.1.1 clients on this address (embedded broker only).
    #[serde(default)]
    pub listen_v311: Option<SocketAddr>,
    /// MQTT version to speak to the broker: `"auto"` (5, falling back to 3.1.1), `"5"`, `"3.1.1"`.
    /// On 3.1.1 there are no shared subscriptions: run one replica.
    #[serde(default)]
    pub protocol: edge_agent::mqtt::Protocol,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}
fn default_client_id() -> String {
    "cascade-escalator".into()
}
fn default_group() -> String {
    "escalators".into()
}

impl Default for BrokerConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Models that answer escalations from one edge model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The edge model's name (from its sidecar), as escalations carry it.
    pub edge_model: String,
    /// The cloud model for `raw` and `redacted` escalations.
    pub cloud_model: PathBuf,
    /// The tail model for `embedding` escalations.
    #[serde(default)]
    pub tail_model: Option<PathBuf>,
    /// Inference threads per model.
    #[serde(default = "one")]
    pub threads: usize,
    /// Engine for both models: `auto`, `tract`, `tflite` or `cuda` (the GPU engine; on CPU,
    /// with one log line, where it cannot run).
    #[serde(default = "auto")]
    pub backend: String,
}

fn auto() -> String {
    BackendChoice::Auto.name().to_string()
}

fn one() -> usize {
    1
}

/// Dynamic batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Largest batch.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long a partial batch waits for more escalations while its model is idle,
    /// microseconds. 0 (the default) runs it at once; batches still grow while the model is busy.
    #[serde(default = "default_max_delay")]
    pub max_delay_us: u64,
    /// Most escalations queued; beyond, they are rejected as overloaded.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
}

fn default_max_batch() -> usize {
    32
}
fn default_max_delay() -> u64 {
    0
}
fn default_capacity() -> usize {
    4096
}

impl Default for BatchingConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Input limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest escalation, bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Escalations per minute one device may send (sustained); 0 for no limit.
    #[serde(default = "default_device_rate")]
    pub per_device_per_minute: u32,
    /// Burst one device may send.
    #[serde(default = "default_device_burst")]
    pub per_device_burst: u32,
}

fn default_max_message() -> usize {
    1 << 20
}
fn default_device_rate() -> u32 {
    6000
}
fn default_device_burst() -> u32 {
    600
}

impl Default for LimitsConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// The hard-example store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite file; `:memory:` keeps it in memory.
    #[serde(default = "default_store")]
    pub path: PathBuf,
}

fn default_store() -> PathBuf {
    PathBuf::from("/var/lib/cascade-escalator/hard-examples.db")
}

impl Default for StoreConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

impl EscalatorConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let config: EscalatorConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked before starting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        validate_segment(Segment::Fleet, &self.fleet)
            .or_else(|e| invalid(format!("fleet: {e}")))?;
        validate_segment(Segment::Group, &self.broker.share_group)
            .or_else(|e| invalid(format!("broker.share_group: {e}")))?;
        if self.routes.is_empty() {
            return invalid("at least one [[routes]] entry is needed".into());
        }
        for r in &self.routes {
            if r.threads == 0 {
                return invalid(format!(
                    "routes {:?}: threads must be at least 1",
                    r.edge_model
                ));
            }
            if let Err(e) = r.backend.parse::<BackendChoice>() {
                return invalid(format!("routes {:?}: backend: {e}", r.edge_model));
            }
        }
        if let Some(url) = &self.broker.url {
            edge_agent::config::broker_address(url)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if url.starts_with("mqtts://") && self.broker.ca.is_none() {
                return invalid("broker.url is mqtts:// but broker.ca is not set".into());
            }
        }
        if self.batching.max_batch == 0 || self.batching.capacity == 0 {
            return invalid("batching.max_batch and batching.capacity must be at least 1".into());
        }
        if self.limits.max_message_bytes < 1024 {
            return invalid("limits.max_message_bytes must be at least 1024".into());
        }
        if let Some(management) = &self.management {
            management.validate().or_else(invalid)?;
        }
        if let Some(identity) = &self.identity {
            identity.validate().or_else(invalid)?;
            if identity.gate_listen.is_some() {
                if self.broker.url.is_some() {
                    return invalid("identity.gate_listen guards the embedded broker; with broker.url, let that broker check certificates (docs/fleet.md)".into());
                }
                // Devices must not be able to go around the gate.
                let exposed = std::iter::once(self.broker.listen)
                    .chain(self.broker.listen_v311)
                    .find(|a| !a.ip().is_loopback());
                if let Some(addr) = exposed {
                    return invalid(format!(
                        "with identity.gate_listen, the embedded broker must listen on loopback only (broker.listen / listen_v311 = {addr}); devices connect to the gate"
                    ));
                }
            }
        }
        if self.ota.signing_key.is_some() && self.ota.registry.is_none() {
            return invalid("ota.signing_key is set but ota.registry is not".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[routes]]
edge_model = "digits-edge"
cloud_model = "models/digits-cloud.onnx"
"#;

    #[test]
    fn minimal_config_has_defaults() {
        let c: EscalatorConfig = toml::from_str(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.batching.max_batch, 32);
        assert_eq!(c.broker.share_group, "escalators");
        assert!(c.broker.url.is_none(), "embedded broker by default");
        assert_eq!(c.routes[0].backend, "auto");
    }

    #[test]
    fn bad_values_are_named() {
        for (extra, expected) in [
            ("[batching]\nmax_batch = 0", "max_batch"),
            ("[broker]\nshare_group = \"a/b\"", "share_group"),
            ("[broker]\nurl = \"mqtts://h:8883\"", "broker.ca"),
        ] {
            let c: EscalatorConfig = toml::from_str(&format!("{MINIMAL}\n{extra}")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
        let gpu: EscalatorConfig = toml::from_str(&format!("{MINIMAL}backend = \"gpu\"")).unwrap();
        let err = gpu.validate().unwrap_err().to_string();
        assert!(err.contains("backend") && err.contains("cuda"), "{err}");
        let cuda: EscalatorConfig =
            toml::from_str(&format!("{MINIMAL}backend = \"cuda\"")).unwrap();
        cuda.validate().unwrap();
        let none: EscalatorConfig = toml::from_str("routes = []").unwrap();
        assert!(none.validate().unwrap_err().to_string().contains("routes"));
    }
}
