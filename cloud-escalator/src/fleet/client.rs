//! `cloud-escalator fleet …`: the operators' command line over the fleet API, with table output
//! for people and `--json` for scripts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where the API is and who is asking.
#[derive(Debug, Args)]
pub struct Connection {
    /// The escalator's fleet API, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "CASCADE_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// An API token (`fleet token create`; the first one: `cloud-escalator bootstrap-token` on the
    /// escalator's host).
    #[arg(long, env = "CASCADE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Fleet commands over the API.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// List devices, with filters.
    Devices {
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Only `online` or `offline` devices.
        #[arg(long)]
        presence: Option<String>,
        /// Only devices running this model.
        #[arg(long)]
        model: Option<String>,
        /// Only ids containing this.
        #[arg(long)]
        q: Option<String>,
        /// Only devices with this label (KEY=VALUE).
        #[arg(long)]
        label: Option<String>,
    },
    /// One device: versions, metrics, recent escalations.
    Device {
        /// Device id.
        id: String,
    },
    /// Set a device's group and labels (admin).
    Set {
        /// Device id.
        id: String,
        /// New group.
        #[arg(long, conflicts_with = "no_group")]
        group: Option<String>,
        /// Remove the device from its group.
        #[arg(long)]
        no_group: bool,
        /// Labels, replacing the current ones (KEY=VALUE, repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Model versions and their rollouts with progress.
    Rollouts,
    /// Change a rollout (admin).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Escalation rate and verdict latency per minute.
    Stats {
        /// How far back.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
    },
    /// The audit log, newest first.
    Audit {
        /// How many records.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Download the hard examples of a model (a tar of inputs.npy and labels.npy).
    Export {
        /// Edge model name.
        #[arg(long)]
        model: String,
        /// Only escalations where the edge and the cloud disagreed.
        #[arg(long)]
        disagreements: bool,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// API tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Create an enrollment token for new devices (admin); see docs/fleet.md.
    EnrollmentToken {
        /// Devices enrolled with it join this group.
        #[arg(long)]
        group: Option<String>,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Valid for this many seconds.
        #[arg(long, default_value_t = 86_400)]
        valid_s: u64,
    },
}

/// Rollout changes.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Offer a published version to a target: all, group:NAME, devices:A,B or canary:PERCENT[@GROUP].
    #[command(disable_version_flag = true)]
    Create {
        /// Model name.
        model: String,
        /// Version.
        version: String,
        /// Target.
        target: String,
    },
    /// Widen a canary (double its share, or to --percent; 100 means everyone).
    #[command(disable_version_flag = true)]
    Advance {
        /// Model name.
        model: String,
        /// Version.
        version: String,
        /// The new share.
        #[arg(long)]
        percent: Option<f64>,
    },
    /// Stop offering the version.
    #[command(disable_version_flag = true)]
    Pause {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// Offer a paused version again.
    #[command(disable_version_flag = true)]
    Resume {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// Pause the version and republish the previous one above it for the same devices.
    #[command(disable_version_flag = true)]
    Rollback {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
}

/// Token management.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once.
    Create {
        /// A name for the audit log (a person or a system).
        #[arg(long)]
        name: String,
        /// `admin` or `read_only`.
        #[arg(long, default_value = "read_only")]
        role: String,
    },
    /// Revoke every token with this name.
    Revoke {
        /// The name.
        name: String,
    },
}

/// The API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the exchange failed.
    #[error(
        "{url}: {error} (is the escalator running with a [management] section, and --server right?)"
    )]
    Http {
        /// The URL.
        url: String,
        /// The error.
        error: String,
    },
    /// The API answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// Writing the output file failed.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

/// A client of the fleet API.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8080`).
    pub fn new(server: &str, token: Option<String>) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            base: server.trim_end_matches('/').to_owned(),
            token,
            agent,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Vec<u8>, ClientError> {
        let url = format!("{}/api/v1{path}", self.base);
        let http = |e: ureq::Error| ClientError::Http {
            url: url.clone(),
            error: e.to_string(),
        };
        let auth = format!("Bearer {}", self.token.as_deref().unwrap_or(""));
        let mut response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("POST", b) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b.cloned().unwrap_or(json!({}))),
            ("PATCH", b) => self
                .agent
                .patch(&url)
                .header("Authorization", &auth)
                .send_json(b.cloned().unwrap_or(json!({}))),
            _ => return Err(ClientError::Usage(format!("method {method}"))),
        }
        .map_err(http)?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(http)?;
        if status >= 400 {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api { status, message });
        }
        Ok(bytes)
    }

    /// A JSON call.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let bytes = self.call(method, path, body)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Http {
            url: path.into(),
            error: format!("not JSON: {e}"),
        })
    }
}

fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Percent-encodes a query value or path segment.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs a command; returns what to print.
pub fn run(conn: &Connection, command: &FleetCommand) -> Result<String, ClientError> {
    let client = Client::new(&conn.server, conn.token.clone());
    let (value, table): (Value, fn(&Value) -> String) = match command {
        FleetCommand::Devices {
            group,
            presence,
            model,
            q,
            label,
        } => (
            client.json(
                "GET",
                &format!(
                    "/devices{}",
                    query(&[
                        ("group", group),
                        ("presence", presence),
                        ("model", model),
                        ("q", q),
                        ("label", label)
                    ])
                ),
                None,
            )?,
            devices_table,
        ),
        FleetCommand::Device { id } => (
            client.json("GET", &format!("/devices/{}", encode(id)), None)?,
            device_text,
        ),
        FleetCommand::Set {
            id,
            group,
            no_group,
            labels,
        } => {
            let mut body = serde_json::Map::new();
            if *no_group {
                body.insert("group".into(), Value::Null);
            } else if let Some(g) = group {
                body.insert("group".into(), json!(g));
            }
            if !labels.is_empty() {
                let mut map = serde_json::Map::new();
                for l in labels {
                    let (k, v) = l.split_once('=').ok_or_else(|| {
                        ClientError::Usage(format!("--label {l:?}: expected KEY=VALUE"))
                    })?;
                    map.insert(k.into(), json!(v));
                }
                body.insert("labels".into(), Value::Object(map));
            }
            if body.is_empty() {
                return Err(ClientError::Usage(
                    "nothing to set: give --group, --no-group or --label".into(),
                ));
            }
            (
                client.json(
                    "PATCH",
                    &format!("/devices/{}", encode(id)),
                    Some(&Value::Object(body)),
                )?,
                |v| devices_table(&json!([v])),
            )
        }
        FleetCommand::Rollouts => (client.json("GET", "/rollouts", None)?, rollouts_table),
        FleetCommand::Rollout(r) => {
            let (path, body) = match r {
                RolloutCommand::Create {
                    model,
                    version,
                    target,
                } => (
                    "/rollouts".to_owned(),
                    json!({"model": model, "version": version, "target": target}),
                ),
                RolloutCommand::Advance {
                    model,
                    version,
                    percent,
                } => (
                    format!("/rollouts/{}/{}/advance", encode(model), encode(version)),
                    percent.map_or(json!({}), |p| json!({ "percent": p })),
                ),
                RolloutCommand::Pause { model, version } => (
                    format!("/rollouts/{}/{}/pause", encode(model), encode(version)),
                    json!({}),
                ),
                RolloutCommand::Resume { model, version } => (
                    format!("/rollouts/{}/{}/resume", encode(model), encode(version)),
                    json!({}),
                ),
                RolloutCommand::Rollback { model, version } => (
                    format!("/rollouts/{}/{}/rollback", encode(model), encode(version)),
                    json!({}),
                ),
            };
            (client.json("POST", &path, Some(&body))?, key_values)
        }
        FleetCommand::Stats { minutes } => (
            client.json("GET", &format!("/stats?minutes={minutes}"), None)?,
            stats_table,
        ),
        FleetCommand::Audit { limit } => (
            client.json("GET", &format!("/audit?limit={limit}"), None)?,
            audit_table,
        ),
        FleetCommand::Export {
            model,
            disagreements,
            out,
        } => {
            let bytes = client.call(
                "GET",
                &format!(
                    "/examples/export?model={}&disagreements={disagreements}",
                    encode(model)
                ),
                None,
            )?;
            std::fs::write(out, &bytes).map_err(|error| ClientError::Io {
                path: out.clone(),
                error,
            })?;
            return Ok(format!("wrote {} ({} bytes)\n", out.display(), bytes.len()));
        }
        FleetCommand::Token(TokenCommand::Create { name, role }) => (
            client.json(
                "POST",
                "/tokens",
                Some(&json!({"name": name, "role": role})),
            )?,
            key_values,
        ),
        FleetCommand::Token(TokenCommand::Revoke { name }) => (
            client.json(
                "PATCH",
                &format!("/tokens/{}", encode(name)),
                Some(&json!({"revoked": true})),
            )?,
            key_values,
        ),
        FleetCommand::EnrollmentToken {
            group,
            uses,
            valid_s,
        } => (
            client.json(
                "POST",
                "/enrollment-tokens",
                Some(&json!({"group": group, "uses": uses, "valid_s": valid_s})),
            )?,
            key_values,
        ),
    };
    Ok(if conn.json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )
    } else {
        table(&value)
    })
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        // Devices report some of these strings: no terminal control sequences from the field.
        Some(Value::String(s)) => s.chars().filter(|c| !c.is_control()).collect(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(other) => other.to_string(),
    }
}

fn percent(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64)
        .map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
}

/// Aligns rows under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn devices_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let status = if d["stale"] == json!(true) {
                "stale".into()
            } else {
                cell(d.get("presence"))
            };
            vec![
                cell(d.get("id")),
                status,
                cell(d.get("group")),
                format!("{} {}", cell(d.get("model")), cell(d.get("model_version"))),
                cell(d.get("agent_version")),
                percent(d.get("escalation_rate")),
                percent(d.get("agreement")),
                cell(d.get("ota_state")),
            ]
        })
        .collect();
    table(
        &[
            "DEVICE", "STATUS", "GROUP", "MODEL", "AGENT", "ESC.RATE", "AGREE", "OTA",
        ],
        &rows,
    )
}

fn device_text(v: &Value) -> String {
    let d = &v["device"];
    let mut out = String::new();
    if let Some(map) = d.as_object() {
        for (k, value) in map {
            out.push_str(&format!("{k:<18} {}\n", cell(Some(value))));
        }
    }
    let recent: Vec<Vec<String>> = v["recent_escalations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                cell(e.get("id")),
                cell(e.get("rule")),
                cell(e.get("edge_class")),
                cell(e.get("cloud_class")),
                cell(e.get("cloud_model")),
            ]
        })
        .collect();
    out.push_str("\nrecent escalations\n");
    out.push_str(&table(
        &["ID", "RULE", "EDGE", "CLOUD", "CLOUD MODEL"],
        &recent,
    ));
    out
}

fn rollouts_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let states = r["states"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, n)| format!("{k}:{n}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            vec![
                cell(r.get("model")),
                cell(r.get("version")),
                if r["paused"] == json!(true) {
                    format!("paused ({})", cell(r.get("target")))
                } else {
                    cell(r.get("target"))
                },
                cell(r.get("targeted")),
                cell(r.get("running")),
                states,
            ]
        })
        .collect();
    table(
        &[
            "MODEL", "VERSION", "TARGET", "TARGETED", "RUNNING", "PROGRESS",
        ],
        &rows,
    )
}

fn stats_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                cell(p.get("minute_ms")),
                cell(p.get("inputs")),
                cell(p.get("escalations")),
                percent(p.get("escalation_rate")),
                cell(p.get("answered")),
                cell(p.get("latency_p50_us")),
                cell(p.get("latency_p99_us")),
            ]
        })
        .collect();
    table(
        &[
            "MINUTE_MS",
            "INPUTS",
            "ESCALATIONS",
            "RATE",
            "ANSWERED",
            "P50_US",
            "P99_US",
        ],
        &rows,
    )
}

fn audit_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            vec![
                cell(a.get("at_ms")),
                cell(a.get("actor")),
                cell(a.get("action")),
                cell(a.get("target")),
            ]
        })
        .collect();
    table(&["AT_MS", "ACTOR", "ACTION", "TARGET"], &rows)
}

fn key_values(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}\n", cell(Some(v))))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    #[command(version, propagate_version = true)]
    struct Cli {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: FleetCommand,
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let cli = Cli::parse_from([
            "fleet",
            "--token",
            "t",
            "rollout",
            "advance",
            "m",
            "1.2.0",
            "--percent",
            "50",
        ]);
        assert!(matches!(
            cli.command,
            FleetCommand::Rollout(RolloutCommand::Advance { percent: Some(p), .. }) if p == 50.0
        ));
    }

    #[test]
    fn tables_align_and_show_missing_values() {
        let out = devices_table(&json!([
            {"id": "cam-1", "presence": "online", "stale": false, "group": null, "model": "digits", "model_version": "1.0.0", "agent_version": "0.1.0", "escalation_rate": 0.125, "agreement": null, "ota_state": null},
            {"id": "camera-22", "presence": "online", "stale": true},
        ]));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("DEVICE     STATUS"));
        assert!(
            lines[1].starts_with("cam-1      online  -      digits 1.0.0  0.1.0  12.5%"),
            "{out}"
        );
        assert!(lines[2].contains("stale"));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            query(&[("q", &Some("a b&c".into())), ("group", &None)]),
            "?q=a%20b%26c"
        );
        assert_eq!(query(&[("group", &None)]), "");
    }
}
