//! Fleet management: the device registry, its HTTP API and web console, enrollment.
//!
//! ```text
//!  broker ──status, telemetry, ota/status──▶ ingester (one task: MQTT session, Tracker)
//!                                                 │ changed rows, every flush_ms
//!  escalation service ──verdict latencies──▶      ▼
//!                                          fleet store (SQLite or PostgreSQL)
//!                                                 ▲
//!  operators, console, CLI ──HTTP (axum)──▶ api ──┘  (+ model registry for rollouts,
//!                                                      hard-example store for escalations)
//! ```
//!
//! - [`db`]: the database interface (SQLite and PostgreSQL) and the schema migrations.
//! - [`tracker`]: folds device messages into rows. Pure.
//! - [`store`]: the fleet's tables: devices, activity per minute, tokens, audit.
//! - [`ingest`]: the MQTT task that feeds the tracker and writes its rows.
//! - [`api`]: the HTTP API, bearer tokens and the audit of every write; serves the console.
//! - [`enrollment`]: signs enrolled devices' certificates with the fleet CA.
//! - [`client`]: the operators' CLI (`cloud-escalator fleet …`) over the API.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub mod api;
pub mod client;
pub mod db;
pub mod enrollment;
pub mod ingest;
pub mod store;
#[doc(hidden)]
pub mod test_postgres;
pub mod tracker;

/// `[management]` in the escalator's configuration: the registry, its API and console.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The fleet store: a SQLite file path (`sqlite:PATH` also accepted) or a PostgreSQL URL
    /// (`postgres://USER@HOST:PORT/DB`).
    #[serde(default = "default_store")]
    pub store: String,
    /// Where the HTTP API and the console listen.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// This replica's name in the activity series (default: the broker client id).
    #[serde(default)]
    pub replica: Option<String>,
    /// Devices the registry tracks at most; messages from further devices are counted and
    /// dropped (bounds memory under a flood of made-up ids).
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// How often changed rows are written, milliseconds.
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    /// An online device not heard from for this long is shown as stale, seconds.
    #[serde(default = "default_stale_after_s")]
    pub stale_after_s: u64,
}

/// `[identity]` in the escalator's configuration: the fleet CA, enrollment, and the device gate
/// (mutual TLS and per-device topic ACLs in front of the embedded broker; [`crate::gate`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The fleet CA's directory (`ca.pem`, `ca.key`; created on first start).
    pub ca_dir: PathBuf,
    /// How long device certificates are valid, days.
    #[serde(default = "default_cert_days")]
    pub cert_days: u32,
    /// Where devices connect with their certificates (TLS; embedded broker only). Without it, the
    /// CA only signs enrollments (for an external broker such as Mosquitto, docs/fleet.md).
    #[serde(default)]
    pub gate_listen: Option<SocketAddr>,
    /// Host names (or IP addresses) in the gate's server certificate: what devices put in their
    /// `mqtts://` URL.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// The broker URL enrolled devices are told to use (e.g. `mqtts://fleet.example.com:8883`);
    /// default: the gate, `mqtts://{first server name}:{gate port}`.
    #[serde(default)]
    pub device_broker_url: Option<String>,
}

fn default_server_names() -> Vec<String> {
    vec!["localhost".into()]
}

impl IdentityConfig {
    /// Checks values before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert_days == 0 {
            return Err("identity.cert_days must be at least 1".into());
        }
        if self.server_names.is_empty() {
            return Err("identity.server_names must name the gate's host".into());
        }
        Ok(())
    }
}

fn default_store() -> String {
    "/var/lib/cascade-escalator/fleet.db".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_devices() -> usize {
    100_000
}
fn default_flush_ms() -> u64 {
    1000
}
fn default_stale_after_s() -> u64 {
    120
}
fn default_cert_days() -> u32 {
    365
}

impl Default for FleetConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

impl FleetConfig {
    /// Checks values before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.store.trim().is_empty() {
            return Err(
                "management.store is empty: give a SQLite path or a postgres:// URL".into(),
            );
        }
        if self.max_devices == 0 || self.flush_ms == 0 {
            return Err("management.max_devices and management.flush_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
