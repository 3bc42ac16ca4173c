//! Fleet state in the [database](super::db): devices, activity per minute, API and enrollment
//! tokens, and the audit log. Blocking calls: the API and the ingester run them on blocking
//! threads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::db::{Db, DbError, Row, Value};
use super::tracker::{Minute, Reported};

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read and write (devices, rollouts, tokens).
    Admin,
    /// Read only.
    ReadOnly,
}

impl Role {
    /// Its stored name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read_only",
        }
    }

    /// Parses `admin` or `read_only` (`read-only`, `readonly` accepted).
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "read_only" | "read-only" | "readonly" => Some(Role::ReadOnly),
            _ => None,
        }
    }
}

/// The caller behind a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, as the audit log records it.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// A device as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    /// Device id.
    pub id: String,
    /// Operator-assigned group.
    pub group: Option<String>,
    /// Operator-assigned labels.
    pub labels: BTreeMap<String, String>,
    /// What the device reported.
    #[serde(flatten)]
    pub reported: Reported,
    /// Edge/cloud agreement over the verdicts seen, when there were any.
    pub agreement: Option<f64>,
}

/// Which devices to list.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeviceFilter {
    /// Only this group.
    pub group: Option<String>,
    /// Only `online` or `offline` devices.
    pub presence: Option<String>,
    /// Only devices running this model.
    pub model: Option<String>,
    /// Only devices whose id contains this.
    pub q: Option<String>,
    /// Only devices with this label, `key=value`.
    pub label: Option<String>,
    /// At most this many (default 1000).
    pub limit: Option<u32>,
    /// Skip this many (paging).
    pub offset: Option<u32>,
}

/// One minute of fleet activity, all replicas together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// Start of the minute, ms since the epoch.
    pub minute_ms: u64,
    /// Inputs devices reported.
    pub inputs: u64,
    /// Escalations devices reported.
    pub escalations: u64,
    /// Escalations per input.
    pub escalation_rate: Option<f64>,
    /// Verdicts devices reported.
    pub verdicts: u64,
    /// Of which the edge agreed.
    pub agreements: u64,
    /// Verdicts the escalators sent.
    pub answered: u64,
    /// Verdict latency, median µs (with several replicas: the answered-weighted mean of theirs).
    pub latency_p50_us: Option<u64>,
    /// Verdict latency, 99th percentile µs (with several replicas: the highest of theirs).
    pub latency_p99_us: Option<u64>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// The token name that did it.
    pub actor: String,
    /// What, e.g. `device.update`, `rollout.advance`.
    pub action: String,
    /// On what.
    pub target: String,
    /// JSON of the request.
    pub detail: String,
}

/// A minted secret: shown once, stored only as its SHA-256.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    format!("{prefix}_{}", hex::encode(bytes))
}

fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

const DEVICE_COLUMNS: &str = "id, grp, labels, presence, first_seen_ms, last_seen_ms, agent_version, model, model_version, policy_sequence, inputs, escalations, verdicts, errors, uptime_s, escalation_rate, inference_p50_us, inference_p99_us, queue_depth, verdicts_seen, agreements_seen, ota_model, ota_state, ota_detail, ota_at_ms";

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn reported_from(row: &Row, at: usize) -> Result<Reported, DbError> {
    Ok(Reported {
        presence: row.text(at)?,
        first_seen_ms: u(row.int(at + 1)?),
        last_seen_ms: u(row.int(at + 2)?),
        agent_version: row.opt_text(at + 3)?,
        model: row.opt_text(at + 4)?,
        model_version: row.opt_text(at + 5)?,
        policy_sequence: u(row.int(at + 6)?),
        inputs: u(row.int(at + 7)?),
        escalations: u(row.int(at + 8)?),
        verdicts: u(row.int(at + 9)?),
        errors: u(row.int(at + 10)?),
        uptime_s: u(row.int(at + 11)?),
        escalation_rate: match row.0.get(at + 12) {
            Some(Value::Null) => None,
            _ => Some(row.float(at + 12)?),
        },
        inference_p50_us: row.opt_int(at + 13)?.map(u),
        inference_p99_us: row.opt_int(at + 14)?.map(u),
        queue_depth: row.opt_int(at + 15)?.map(u),
        verdicts_seen: u(row.int(at + 16)?),
        agreements_seen: u(row.int(at + 17)?),
        ota_model: row.opt_text(at + 18)?,
        ota_state: row.opt_text(at + 19)?,
        ota_detail: row.opt_text(at + 20)?,
        ota_at_ms: row.opt_int(at + 21)?.map(u),
    })
}

fn device_from(row: &Row) -> Result<Device, DbError> {
    let reported = reported_from(row, 3)?;
    let agreement = (reported.verdicts_seen > 0)
        .then(|| reported.agreements_seen as f64 / reported.verdicts_seen as f64);
    Ok(Device {
        id: row.text(0)?,
        group: row.opt_text(1)?,
        labels: serde_json::from_str(&row.text(2)?).unwrap_or_default(),
        reported,
        agreement,
    })
}

/// Writes what devices reported; group and labels are left as the operator set them.
pub fn upsert_reported(db: &mut Db, rows: &[(String, Reported)]) -> Result<(), DbError> {
    db.transaction(|tx| {
        for (id, r) in rows {
            tx.execute(
                "INSERT INTO devices (id, presence, first_seen_ms, last_seen_ms, agent_version, model, model_version, policy_sequence, inputs, escalations, verdicts, errors, uptime_s, escalation_rate, inference_p50_us, inference_p99_us, queue_depth, verdicts_seen, agreements_seen, ota_model, ota_state, ota_detail, ota_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)
                 ON CONFLICT (id) DO UPDATE SET presence = excluded.presence, last_seen_ms = excluded.last_seen_ms,
                   agent_version = excluded.agent_version, model = excluded.model, model_version = excluded.model_version,
                   policy_sequence = excluded.policy_sequence, inputs = excluded.inputs, escalations = excluded.escalations,
                   verdicts = excluded.verdicts, errors = excluded.errors, uptime_s = excluded.uptime_s,
                   escalation_rate = excluded.escalation_rate, inference_p50_us = excluded.inference_p50_us,
                   inference_p99_us = excluded.inference_p99_us, queue_depth = excluded.queue_depth,
                   verdicts_seen = excluded.verdicts_seen, agreements_seen = excluded.agreements_seen,
                   ota_model = excluded.ota_model, ota_state = excluded.ota_state, ota_detail = excluded.ota_detail,
                   ota_at_ms = excluded.ota_at_ms",
                &[
                    id.as_str().into(),
                    r.presence.as_str().into(),
                    r.first_seen_ms.into(),
                    r.last_seen_ms.into(),
                    r.agent_version.clone().into(),
                    r.model.clone().into(),
                    r.model_version.clone().into(),
                    r.policy_sequence.into(),
                    r.inputs.into(),
                    r.escalations.into(),
                    r.verdicts.into(),
                    r.errors.into(),
                    r.uptime_s.into(),
                    r.escalation_rate.into(),
                    r.inference_p50_us.into(),
                    r.inference_p99_us.into(),
                    r.queue_depth.into(),
                    r.verdicts_seen.into(),
                    r.agreements_seen.into(),
                    r.ota_model.clone().into(),
                    r.ota_state.clone().into(),
                    r.ota_detail.clone().into(),
                    r.ota_at_ms.into(),
                ],
            )?;
        }
        Ok(())
    })
}

/// Every device's reported columns (to start the tracker where it was).
pub fn load_reported(db: &mut Db) -> Result<Vec<(String, Reported)>, DbError> {
    db.query(&format!("SELECT {DEVICE_COLUMNS} FROM devices"), &[])?
        .iter()
        .map(|row| Ok((row.text(0)?, reported_from(row, 3)?)))
        .collect()
}

/// Devices matching `filter`, by id.
pub fn list_devices(db: &mut Db, filter: &DeviceFilter) -> Result<Vec<Device>, DbError> {
    let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE 1 = 1");
    let mut params: Vec<Value> = Vec::new();
    let mut add = |sql: &mut String, clause: &str, value: Value| {
        params.push(value);
        sql.push_str(&clause.replace("$?", &format!("${}", params.len())));
    };
    if let Some(g) = &filter.group {
        add(&mut sql, " AND grp = $?", g.as_str().into());
    }
    if let Some(p) = &filter.presence {
        add(&mut sql, " AND presence = $?", p.as_str().into());
    }
    if let Some(m) = &filter.model {
        add(&mut sql, " AND model = $?", m.as_str().into());
    }
    if let Some(q) = &filter.q {
        // Both engines: `||` concatenates and LIKE is case-sensitive on TEXT with the default
        // collation in PostgreSQL; ids are matched as given.
        let escaped = q
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        add(
            &mut sql,
            " AND id LIKE $? ESCAPE '\\'",
            format!("%{escaped}%").into(),
        );
    }
    let (limit, offset) = (
        filter.limit.unwrap_or(1000).min(10_000) as usize,
        filter.offset.unwrap_or(0) as usize,
    );
    let label = filter
        .label
        .as_deref()
        .map(|l| l.split_once('=').unwrap_or((l, "")));
    if label.is_none() {
        // Paged in SQL; with a label filter (labels are one JSON column, matched here so both
        // engines agree) every matching row is read and paged below.
        add(&mut sql, " ORDER BY id LIMIT $?", (limit as i64).into());
        add(&mut sql, " OFFSET $?", (offset as i64).into());
    } else {
        sql.push_str(" ORDER BY id");
    }
    let mut devices = db
        .query(&sql, &params)?
        .iter()
        .map(device_from)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some((k, v)) = label {
        devices.retain(|d| d.labels.get(k).is_some_and(|x| x == v));
        devices = devices.into_iter().skip(offset).take(limit).collect();
    }
    Ok(devices)
}

/// What a rollout's progress needs of every device: id, group, model, version, OTA report.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutView {
    /// Device id.
    pub id: String,
    /// Operator-assigned group.
    pub group: Option<String>,
    /// Running model.
    pub model: Option<String>,
    /// Its version.
    pub model_version: Option<String>,
    /// The model version of the last OTA report (`name@version`).
    pub ota_model: Option<String>,
    /// Its state.
    pub ota_state: Option<String>,
}

/// Every device running `model` (or reporting OTA on it), without paging: rollout progress.
pub fn rollout_views(db: &mut Db, model: &str) -> Result<Vec<RolloutView>, DbError> {
    db.query(
        "SELECT id, grp, model, model_version, ota_model, ota_state FROM devices WHERE model = $1 OR ota_model LIKE $2",
        &[model.into(), format!("{model}@%").into()],
    )?
    .iter()
    .map(|r| {
        Ok(RolloutView {
            id: r.text(0)?,
            group: r.opt_text(1)?,
            model: r.opt_text(2)?,
            model_version: r.opt_text(3)?,
            ota_model: r.opt_text(4)?,
            ota_state: r.opt_text(5)?,
        })
    })
    .collect()
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// The token is unknown, expired or used up.
    Token,
    /// The device id is already registered: enrolling it again would hand its identity to
    /// whoever holds a token.
    Exists,
}

/// Registers a new device with an enrollment token, in one transaction: the id must be new, and
/// one use of the token is spent. Returns the group the token puts it in.
pub fn enroll_device(
    db: &mut Db,
    secret: &str,
    device: &str,
    now_ms: u64,
) -> Result<Result<Option<String>, EnrollRefusal>, DbError> {
    let hash = secret_hash(secret);
    db.transaction(|tx| {
        // The token first: without a valid one, nothing is said about which ids exist.
        let valid = tx.query(
            "SELECT grp FROM enrollment_tokens WHERE hash = $1 AND uses_left > 0 AND expires_ms > $2",
            &[hash.as_str().into(), now_ms.into()],
        )?;
        let Some(token) = valid.first() else {
            return Ok(Err(EnrollRefusal::Token));
        };
        let group = token.opt_text(0)?;
        if !tx
            .query("SELECT id FROM devices WHERE id = $1", &[device.into()])?
            .is_empty()
        {
            return Ok(Err(EnrollRefusal::Exists));
        }
        // The conditional update is the check that counts: two devices racing for the last use
        // cannot both win.
        let n = tx.execute(
            "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE hash = $1 AND uses_left > 0 AND expires_ms > $2",
            &[hash.as_str().into(), now_ms.into()],
        )?;
        if n == 0 {
            return Ok(Err(EnrollRefusal::Token));
        }
        // The primary key refuses a second enrollment of the same id racing this one.
        tx.execute(
            "INSERT INTO devices (id, grp, presence, first_seen_ms, last_seen_ms) VALUES ($1, $2, 'offline', $3, $3)",
            &[device.into(), group.clone().into(), now_ms.into()],
        )?;
        Ok(Ok(group))
    })
}

/// One device.
pub fn get_device(db: &mut Db, id: &str) -> Result<Option<Device>, DbError> {
    db.query(
        &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"),
        &[id.into()],
    )?
    .first()
    .map(device_from)
    .transpose()
}

/// Counts of devices by presence.
pub fn presence_counts(db: &mut Db) -> Result<BTreeMap<String, u64>, DbError> {
    db.query(
        "SELECT presence, CAST(COUNT(*) AS BIGINT) FROM devices GROUP BY presence",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, u(r.int(1)?))))
    .collect()
}

/// Sets a device's group and/or labels (a device not seen yet is registered, offline). Returns
/// the device.
pub fn set_device(
    db: &mut Db,
    id: &str,
    group: Option<Option<&str>>,
    labels: Option<&BTreeMap<String, String>>,
    now_ms: u64,
) -> Result<Device, DbError> {
    db.transaction(|tx| {
        tx.execute(
            "INSERT INTO devices (id, presence, first_seen_ms, last_seen_ms) VALUES ($1, 'offline', $2, $2)
             ON CONFLICT (id) DO NOTHING",
            &[id.into(), now_ms.into()],
        )?;
        if let Some(group) = group {
            tx.execute(
                "UPDATE devices SET grp = $1 WHERE id = $2",
                &[group.map(str::to_owned).into(), id.into()],
            )?;
        }
        if let Some(labels) = labels {
            let json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
            tx.execute(
                "UPDATE devices SET labels = $1 WHERE id = $2",
                &[json.into(), id.into()],
            )?;
        }
        Ok(())
    })?;
    get_device(db, id)?.ok_or(DbError::Type {
        column: 0,
        found: "no row",
        expected: "the device just written",
    })
}

/// Writes this replica's minutes (a minute written again is replaced: the tracker holds its
/// running totals).
pub fn write_minutes(db: &mut Db, replica: &str, minutes: &[(u64, Minute)]) -> Result<(), DbError> {
    db.transaction(|tx| {
        for (minute, m) in minutes {
            let max = m.latencies_us.iter().max().map(|&v| u64::from(v));
            tx.execute(
                "INSERT INTO series (minute, replica, inputs, escalations, verdicts, agreements, answered, latency_p50_us, latency_p99_us, latency_max_us)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (minute, replica) DO UPDATE SET inputs = excluded.inputs, escalations = excluded.escalations,
                   verdicts = excluded.verdicts, agreements = excluded.agreements, answered = excluded.answered,
                   latency_p50_us = excluded.latency_p50_us, latency_p99_us = excluded.latency_p99_us,
                   latency_max_us = excluded.latency_max_us",
                &[
                    (*minute).into(),
                    replica.into(),
                    m.inputs.into(),
                    m.escalations.into(),
                    m.verdicts.into(),
                    m.agreements.into(),
                    m.answered.into(),
                    m.latency_percentile(50.0).into(),
                    m.latency_percentile(99.0).into(),
                    max.into(),
                ],
            )?;
        }
        Ok(())
    })
}

/// Fleet activity per minute since `since_ms`, oldest first.
///
/// Each replica sees every device's telemetry, so device-reported counts are taken from one
/// replica (the largest); verdicts are answered by one replica each, so those add up.
pub fn series(db: &mut Db, since_ms: u64) -> Result<Vec<SeriesPoint>, DbError> {
    let rows = db.query(
        "SELECT minute, inputs, escalations, verdicts, agreements, answered, latency_p50_us, latency_p99_us
         FROM series WHERE minute >= $1 ORDER BY minute",
        &[since_ms.into()],
    )?;
    let mut points: Vec<SeriesPoint> = Vec::new();
    // Per minute: weighted p50 sum for the mean.
    let mut p50_weight: Vec<(u64, u64)> = Vec::new();
    for row in &rows {
        let minute = u(row.int(0)?);
        if points.last().is_none_or(|p| p.minute_ms != minute) {
            points.push(SeriesPoint {
                minute_ms: minute,
                inputs: 0,
                escalations: 0,
                escalation_rate: None,
                verdicts: 0,
                agreements: 0,
                answered: 0,
                latency_p50_us: None,
                latency_p99_us: None,
            });
            p50_weight.push((0, 0));
        }
        let p = points.last_mut().expect("pushed");
        let w = p50_weight.last_mut().expect("pushed");
        let inputs = u(row.int(1)?);
        if inputs >= p.inputs {
            p.inputs = inputs;
            p.escalations = u(row.int(2)?);
            p.verdicts = u(row.int(3)?);
            p.agreements = u(row.int(4)?);
        }
        let answered = u(row.int(5)?);
        p.answered += answered;
        if let Some(p50) = row.opt_int(6)? {
            w.0 += u(p50) * answered;
            w.1 += answered;
        }
        if let Some(p99) = row.opt_int(7)? {
            p.latency_p99_us = Some(p.latency_p99_us.unwrap_or(0).max(u(p99)));
        }
    }
    for (p, (sum, weight)) in points.iter_mut().zip(p50_weight) {
        p.latency_p50_us = (weight > 0).then(|| sum / weight);
        p.escalation_rate = (p.inputs > 0).then(|| p.escalations as f64 / p.inputs as f64);
    }
    Ok(points)
}

/// Creates an API token; returns the secret (shown once).
pub fn create_token(db: &mut Db, name: &str, role: Role, now_ms: u64) -> Result<String, DbError> {
    let secret = new_secret("cas");
    db.execute(
        "INSERT INTO api_tokens (hash, name, role, created_ms) VALUES ($1, $2, $3, $4)",
        &[
            secret_hash(&secret).into(),
            name.into(),
            role.name().into(),
            now_ms.into(),
        ],
    )?;
    Ok(secret)
}

/// Revokes every token named `name`; returns how many.
pub fn revoke_tokens(db: &mut Db, name: &str, now_ms: u64) -> Result<u64, DbError> {
    db.execute(
        "UPDATE api_tokens SET revoked_ms = $1 WHERE name = $2 AND revoked_ms IS NULL",
        &[now_ms.into(), name.into()],
    )
}

/// The caller a token belongs to, if it is valid.
pub fn authenticate(db: &mut Db, secret: &str) -> Result<Option<Caller>, DbError> {
    let rows = db.query(
        "SELECT name, role FROM api_tokens WHERE hash = $1 AND revoked_ms IS NULL",
        &[secret_hash(secret).into()],
    )?;
    Ok(rows.first().and_then(|r| {
        Some(Caller {
            name: r.text(0).ok()?,
            role: Role::parse(&r.text(1).ok()?)?,
        })
    }))
}

/// Creates an enrollment token good for `uses` enrollments until `expires_ms`; devices enrolled
/// with it join `group`.
pub fn create_enrollment_token(
    db: &mut Db,
    group: Option<&str>,
    uses: u32,
    expires_ms: u64,
    created_by: &str,
    now_ms: u64,
) -> Result<String, DbError> {
    let secret = new_secret("enr");
    db.execute(
        "INSERT INTO enrollment_tokens (hash, grp, created_by, created_ms, expires_ms, uses_left) VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            secret_hash(&secret).into(),
            group.map(str::to_owned).into(),
            created_by.into(),
            now_ms.into(),
            expires_ms.into(),
            i64::from(uses).into(),
        ],
    )?;
    Ok(secret)
}

/// Appends to the audit log.
pub fn audit(
    db: &mut Db,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
    now_ms: u64,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
        &[
            now_ms.into(),
            actor.into(),
            action.into(),
            target.into(),
            detail.into(),
        ],
    )
    .map(drop)
}

/// The newest `limit` audit records, newest first.
pub fn audit_log(db: &mut Db, limit: u32) -> Result<Vec<AuditRecord>, DbError> {
    db.query(
        "SELECT at_ms, actor, action, target, detail FROM audit ORDER BY at_ms DESC LIMIT $1",
        &[i64::from(limit).into()],
    )?
    .iter()
    .map(|r| {
        Ok(AuditRecord {
            at_ms: u(r.int(0)?),
            actor: r.text(1)?,
            action: r.text(2)?,
            target: r.text(3)?,
            detail: r.text(4)?,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::tracker::Reported;

    /// The same checks run on SQLite and on PostgreSQL ([`exercise`]).
    #[test]
    fn sqlite_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path().join("fleet.db").to_str().unwrap()).unwrap();
        exercise(&mut db);
    }

    #[test]
    fn postgres_store() {
        let Some(db) = crate::fleet::test_postgres::TestSchema::create() else {
            return;
        };
        let mut conn = Db::open(&db.url).unwrap();
        exercise(&mut conn);
        // Migrations apply once on PostgreSQL too.
        drop(conn);
        let mut conn = Db::open(&db.url).unwrap();
        assert_eq!(load_reported(&mut conn).unwrap().len(), 4);
    }

    fn reported(presence: &str, inputs: u64) -> Reported {
        Reported {
            presence: presence.into(),
            first_seen_ms: 10,
            last_seen_ms: 20,
            model: Some("digits".into()),
            inputs,
            escalation_rate: Some(0.25),
            verdicts_seen: 4,
            agreements_seen: 3,
            ..Reported::default()
        }
    }

    fn exercise(db: &mut Db) {
        upsert_reported(
            db,
            &[
                ("cam-1".into(), reported("online", 5)),
                ("cam-2".into(), reported("offline", 7)),
            ],
        )
        .unwrap();
        let labels = BTreeMap::from([("site".to_string(), "north".to_string())]);
        set_device(db, "cam-1", Some(Some("field")), Some(&labels), 30).unwrap();
        // A later report keeps the operator's group and labels.
        upsert_reported(db, &[("cam-1".into(), reported("online", 9))]).unwrap();
        let d = get_device(db, "cam-1").unwrap().unwrap();
        assert_eq!(d.group.as_deref(), Some("field"));
        assert_eq!(d.labels, labels);
        assert_eq!(d.reported.inputs, 9);
        assert_eq!(d.reported.first_seen_ms, 10);
        assert_eq!(d.agreement, Some(0.75));
        assert_eq!(d.reported.escalation_rate, Some(0.25));
        assert!(get_device(db, "nope").unwrap().is_none());

        let all = list_devices(db, &DeviceFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["cam-1", "cam-2"]
        );
        let online = list_devices(
            db,
            &DeviceFilter {
                presence: Some("online".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(online.len(), 1);
        let by_label = list_devices(
            db,
            &DeviceFilter {
                label: Some("site=north".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(by_label.len(), 1);
        let by_label_paged = list_devices(
            db,
            &DeviceFilter {
                label: Some("site=north".into()),
                limit: Some(1),
                offset: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(by_label_paged.is_empty(), "paging after the label filter");
        let by_case = list_devices(
            db,
            &DeviceFilter {
                q: Some("CAM".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(by_case.is_empty(), "case-sensitive on both engines");
        let by_q = list_devices(
            db,
            &DeviceFilter {
                q: Some("m-2".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(by_q[0].id, "cam-2");
        let wildcard = list_devices(
            db,
            &DeviceFilter {
                q: Some("%".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(wildcard.is_empty(), "% is matched literally");
        let counts = presence_counts(db).unwrap();
        assert_eq!((counts["online"], counts["offline"]), (1, 1));
        // Clearing the group.
        let d = set_device(db, "cam-1", Some(None), None, 40).unwrap();
        assert_eq!(d.group, None);
        assert_eq!(load_reported(db).unwrap().len(), 2);

        // Tokens.
        let admin = create_token(db, "ops", Role::Admin, 1).unwrap();
        let reader = create_token(db, "dash", Role::ReadOnly, 1).unwrap();
        assert_eq!(
            authenticate(db, &admin).unwrap(),
            Some(Caller {
                name: "ops".into(),
                role: Role::Admin
            })
        );
        assert_eq!(
            authenticate(db, &reader).unwrap().unwrap().role,
            Role::ReadOnly
        );
        assert_eq!(authenticate(db, "cas_wrong").unwrap(), None);
        assert_eq!(revoke_tokens(db, "dash", 2).unwrap(), 1);
        assert_eq!(authenticate(db, &reader).unwrap(), None);

        // Enrollment tokens: uses and expiry.
        let enr = create_enrollment_token(db, Some("field"), 2, 1_000, "ops", 1).unwrap();
        let field = Ok(Some("field".to_string()));
        assert_eq!(
            enroll_device(db, "enr_x", "cam-1", 5).unwrap(),
            Err(EnrollRefusal::Token)
        );
        assert_eq!(
            enroll_device(db, &enr, "cam-1", 5).unwrap(),
            Err(EnrollRefusal::Exists)
        );
        assert_eq!(
            enroll_device(db, &enr, "new-1", 5).unwrap(),
            field,
            "a refusal spends nothing"
        );
        assert_eq!(
            get_device(db, "new-1").unwrap().unwrap().group.as_deref(),
            Some("field")
        );
        assert_eq!(
            enroll_device(db, &enr, "new-2", 1_000).unwrap(),
            Err(EnrollRefusal::Token),
            "expired"
        );
        assert_eq!(enroll_device(db, &enr, "new-2", 6).unwrap(), field);
        assert_eq!(
            enroll_device(db, &enr, "new-3", 7).unwrap(),
            Err(EnrollRefusal::Token),
            "used up"
        );
        assert!(
            get_device(db, "new-3").unwrap().is_none(),
            "a refused enrollment registers nothing"
        );
        assert_eq!(rollout_views(db, "digits").unwrap().len(), 2);

        // Audit.
        audit(db, "ops", "device.update", "cam-1", "{}", 100).unwrap();
        audit(db, "ops", "rollout.advance", "digits@1.1.0", "{}", 200).unwrap();
        let log = audit_log(db, 10).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].action, "rollout.advance");

        // Series: two replicas, device counts once, verdicts added.
        let minute = |inputs, lat: Vec<u32>| Minute {
            answered: lat.len() as u64,
            inputs,
            escalations: inputs / 4,
            verdicts: 2,
            agreements: 1,
            latencies_us: lat,
        };
        write_minutes(db, "a", &[(60_000, minute(100, vec![100, 200, 300]))]).unwrap();
        write_minutes(db, "b", &[(60_000, minute(100, vec![500]))]).unwrap();
        // Rewriting a minute replaces it.
        write_minutes(
            db,
            "a",
            &[
                (60_000, minute(100, vec![100, 200, 300])),
                (120_000, minute(8, vec![])),
            ],
        )
        .unwrap();
        let s = series(db, 0).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].inputs, s[0].escalations, s[0].answered), (100, 25, 4));
        assert_eq!(s[0].escalation_rate, Some(0.25));
        assert_eq!(s[0].latency_p50_us, Some((200 * 3 + 500) / 4));
        assert_eq!(s[0].latency_p99_us, Some(500));
        assert_eq!((s[1].inputs, s[1].latency_p50_us), (8, None));
        assert_eq!(series(db, 120_000).unwrap().len(), 1);
    }
}
