//! The fleet's HTTP API (JSON) and the web console, served with axum.
//!
//! Every `/api/v1` route needs `Authorization: Bearer <token>`: read-only tokens read, admin
//! tokens also write, and every write is recorded in the audit log with the token's name. The
//! console (`/`) is a static page that asks for a token and calls the same API. `/healthz` is
//! open. Enrollment (`POST /api/v1/enroll`) takes an enrollment token instead.
//!
//! Handlers run database calls on blocking threads; the server stops on the shutdown token.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use cascade_proto::model::Version;
use cascade_proto::ota::TargetSelector;
use cascade_proto::signing::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::db::{Db, DbError};
use super::now_ms;
use super::store::{self, Caller, DeviceFilter, Role};
use crate::registry::{Entry, Registry, RegistryError};

/// The console page (dependency-free HTML, CSS and JavaScript; see `console/README.md`).
const CONSOLE: &str = include_str!("../../console/index.html");

/// What the API serves from.
pub struct ApiState {
    /// The fleet store.
    pub db: Arc<Mutex<Db>>,
    /// The model registry, for models and rollouts.
    pub registry: Option<Registry>,
    /// The key rollout changes are signed with.
    pub signing_key: Option<Arc<SigningKey>>,
    /// The hard-example store file, for recent escalations and exports.
    pub examples: Option<PathBuf>,
    /// The fleet name.
    pub fleet: String,
    /// An online device silent this long is stale.
    pub stale_after_ms: u64,
    /// Enrollment, when a fleet CA is configured.
    pub enrollment: Option<Arc<dyn Enroller>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("fleet", &self.fleet)
            .finish_non_exhaustive()
    }
}

/// Signs device certificates for enrollment (the fleet CA).
pub trait Enroller: Send + Sync {
    /// Signs `csr_pem` for `device`; returns the certificate PEM.
    fn sign(&self, device: &str, csr_pem: &str) -> Result<String, String>;
    /// The CA certificate devices trust (PEM).
    fn ca_pem(&self) -> String;
    /// The broker URL devices are told to use.
    fn broker_url(&self) -> Option<String>;
}

/// An API error: a status and a message telling the caller what to do.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(m: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, m.into())
    }
    fn not_found(m: impl Into<String>) -> Self {
        ApiError(StatusCode::NOT_FOUND, m.into())
    }
    fn unavailable(m: impl Into<String>) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, m.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        tracing::error!(error = %e, "fleet store");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("fleet store unavailable ({e}); retry later"),
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Exists(_) => StatusCode::CONFLICT,
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

type Shared = Arc<ApiState>;
type ApiResult<T> = Result<T, ApiError>;

/// Runs `f` with the database on a blocking thread.
async fn with_db<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&mut Db) -> Result<T, DbError> + Send + 'static,
) -> ApiResult<T> {
    let db = state.db.clone();
    tokio::task::spawn_blocking(move || {
        f(&mut db.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(ApiError::from)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_owned())
}

/// The caller, if its token is valid and allows `need`.
async fn authorize(state: &Shared, headers: &HeaderMap, need: Role) -> ApiResult<Caller> {
    let token = bearer(headers).ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send `Authorization: Bearer <token>` (an admin creates one with `cloud-escalator fleet token create`; the first with `cloud-escalator bootstrap-token` on the escalator's host)".into(),
        )
    })?;
    let caller = with_db(state, move |db| store::authenticate(db, &token))
        .await?
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "unknown or revoked token".into()))?;
    if need == Role::Admin && caller.role != Role::Admin {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} is read-only; this needs an admin token",
                caller.name
            ),
        ));
    }
    Ok(caller)
}

/// Runs a database change and its audit record in one transaction: both happen or neither.
async fn audited<T: Send + 'static>(
    state: &Shared,
    caller: &Caller,
    action: &str,
    target: &str,
    detail: serde_json::Value,
    change: impl FnOnce(&mut Db) -> Result<T, DbError> + Send + 'static,
) -> ApiResult<T> {
    let (actor, action, target) = (caller.name.clone(), action.to_owned(), target.to_owned());
    tracing::info!(actor = %actor, action = %action, target = %target, "fleet change");
    with_db(state, move |db| {
        db.transaction(|tx| {
            let value = change(tx)?;
            store::audit(tx, &actor, &action, &target, &detail.to_string(), now_ms())?;
            Ok(value)
        })
    })
    .await
}

/// Records a change made outside the database (the model registry). The change is done and
/// cannot be undone, so a failed record is logged rather than reported as a failed request (a
/// retry would repeat the change).
async fn audit_done(
    state: &Shared,
    caller: &Caller,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    let (actor, action_name, target_name) =
        (caller.name.clone(), action.to_owned(), target.to_owned());
    tracing::info!(actor = %actor, action, target, "fleet change");
    let detail_text = detail.to_string();
    if let Err(e) = with_db(state, move |db| {
        store::audit(
            db,
            &actor,
            &action_name,
            &target_name,
            &detail_text,
            now_ms(),
        )
    })
    .await
    {
        tracing::error!(action, target, detail = %detail, error = ?e, "audit record not written");
    }
}

/// Runs registry file work (reads, signing, deltas) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// The router: API, console and health check.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/summary", get(summary))
        .route("/api/v1/devices", get(list_devices))
        .route(
            "/api/v1/devices/{id}",
            get(show_device).patch(update_device),
        )
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route(
            "/api/v1/rollouts/{model}/{version}/{action}",
            post(rollout_action),
        )
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/examples/export", get(export_examples))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/tokens", post(create_token))
        .route("/api/v1/tokens/{name}", patch(revoke_token))
        .route("/api/v1/enrollment-tokens", post(create_enrollment_token))
        .route("/api/v1/enroll", post(enroll))
        .with_state(Arc::new(state))
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, shutdown: CancellationToken) {
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "fleet API and console listening");
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "fleet API stopped");
    }
}

async fn console() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(CONSOLE))
}

/// A device with the view-only `stale` flag.
#[derive(Serialize)]
struct DeviceView {
    #[serde(flatten)]
    device: store::Device,
    stale: bool,
}

fn view(state: &ApiState, device: store::Device, now: u64) -> DeviceView {
    let stale = device.reported.presence == "online"
        && now.saturating_sub(device.reported.last_seen_ms) > state.stale_after_ms;
    DeviceView { device, stale }
}

async fn summary(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &headers, Role::ReadOnly).await?;
    let counts = with_db(&state, store::presence_counts).await?;
    Ok(Json(
        json!({ "fleet": state.fleet, "devices": counts, "now_ms": now_ms() }),
    ))
}

async fn list_devices(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(filter): Query<DeviceFilter>,
) -> ApiResult<Json<Vec<DeviceView>>> {
    authorize(&state, &headers, Role::ReadOnly).await?;
    if filter.label.as_deref().is_some_and(|l| !l.contains('=')) {
        return Err(ApiError::bad_request("label: expected KEY=VALUE"));
    }
    let devices = with_db(&state, move |db| store::list_devices(db, &filter)).await?;
    let now = now_ms();
    Ok(Json(
        devices.into_iter().map(|d| view(&state, d, now)).collect(),
    ))
}

async fn show_device(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &headers, Role::ReadOnly).await?;
    let lookup = id.clone();
    let device = with_db(&state, move |db| store::get_device(db, &lookup))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id:?}")))?;
    let recent = match state.examples.clone() {
        Some(path) => tokio::task::spawn_blocking(move || {
            crate::store::Store::open(&path).and_then(|s| s.recent(&id, 20))
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "hard-example store not readable");
            Vec::new()
        }),
        None => Vec::new(),
    };
    Ok(Json(
        json!({ "device": view(&state, device, now_ms()), "recent_escalations": recent }),
    ))
}

/// `PATCH /api/v1/devices/{id}`: `{"group": "field" | null, "labels": {"k": "v"}}`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DeviceUpdate {
    #[serde(default, with = "double_option")]
    group: Option<Option<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// Tells "absent" (leave as is) from `null` (clear).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(v: &Option<Option<String>>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
}

async fn update_device(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(update): Json<DeviceUpdate>,
) -> ApiResult<Json<DeviceView>> {
    let caller = authorize(&state, &headers, Role::Admin).await?;
    cascade_proto::topic::validate_segment(cascade_proto::topic::Segment::Device, &id)
        .map_err(|e| ApiError::bad_request(format!("device id: {e}")))?;
    if let Some(Some(g)) = &update.group {
        cascade_proto::topic::validate_segment(cascade_proto::topic::Segment::Group, g)
            .map_err(|e| ApiError::bad_request(format!("group: {e}")))?;
    }
    if let Some(labels) = &update.labels
        && (labels.len() > 64
            || labels
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 256))
    {
        return Err(ApiError::bad_request(
            "labels: at most 64, keys 1 to 64 bytes, values up to 256 bytes",
        ));
    }
    let detail = serde_json::to_value(&update).unwrap_or_default();
    let (lookup, group, labels) = (id.clone(), update.group, update.labels);
    let device = audited(&state, &caller, "device.update", &id, detail, move |db| {
        store::set_device(
            db,
            &lookup,
            group.as_ref().map(|g| g.as_deref()),
            labels.as_ref(),
            now_ms(),
        )
    })
    .await?;
    Ok(Json(view(&state, device, now_ms())))
}

fn registry(state: &ApiState) -> ApiResult<&Registry> {
    state.registry.as_ref().ok_or_else(|| {
        ApiError::unavailable(
            "no model registry: set [ota] registry in the escalator's configuration",
        )
    })
}

fn signing_key(state: &ApiState) -> ApiResult<Arc<SigningKey>> {
    state.signing_key.clone().ok_or_else(|| {
        ApiError::unavailable(
            "no signing key: set [ota] signing_key in the escalator's configuration to change rollouts from the API",
        )
    })
}

/// A model version and how its rollout is going.
#[derive(Debug, Serialize)]
struct Rollout {
    model: String,
    version: String,
    target: String,
    paused: bool,
    issued_at_ms: u64,
    size_bytes: u64,
    delta_bytes: Option<u64>,
    /// Devices running this model (any version) that the target includes.
    targeted: u64,
    /// Devices running this version.
    running: u64,
    /// Devices whose last OTA report for this version is in each state.
    states: BTreeMap<String, u64>,
}

fn describe_target(target: &TargetSelector) -> String {
    match target {
        TargetSelector::All => "all".into(),
        TargetSelector::Group { group } => format!("group:{group}"),
        TargetSelector::Devices { devices } => format!("devices:{}", devices.join(",")),
        TargetSelector::Canary {
            group,
            basis_points,
            ..
        } => {
            let percent = f64::from(*basis_points) / 100.0;
            match group {
                Some(g) => format!("canary:{percent}@{g}"),
                None => format!("canary:{percent}"),
            }
        }
    }
}

async fn rollouts(state: &Shared) -> ApiResult<Vec<Rollout>> {
    let registry = registry(state)?.clone();
    let entries = blocking(move || {
        let entries = registry.list()?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let m = &e.manifest.content.model;
                let paused = registry.is_paused(&m.name, m.version);
                (e, paused)
            })
            .collect::<Vec<_>>())
    })
    .await?;
    let mut names: Vec<String> = entries
        .iter()
        .map(|(e, _)| e.manifest.content.model.name.clone())
        .collect();
    names.dedup();
    let devices = with_db(state, move |db| {
        names
            .iter()
            .map(|n| store::rollout_views(db, n).map(|v| (n.clone(), v)))
            .collect::<Result<BTreeMap<_, _>, _>>()
    })
    .await?;
    Ok(entries
        .iter()
        .map(|(e, paused): &(Entry, bool)| {
            let m = &e.manifest.content;
            let (name, version) = (m.model.name.as_str(), m.model.version.to_string());
            let tag = m.model.to_string();
            let mut states = BTreeMap::new();
            let (mut targeted, mut running) = (0, 0);
            for d in devices.get(name).into_iter().flatten() {
                if d.model.as_deref() == Some(name) {
                    // The registry's group: the agent matches its own configured group, which
                    // enrollment sets to the same (docs/fleet.md).
                    if m.target.matches(&d.id, d.group.as_deref()) {
                        targeted += 1;
                    }
                    if d.model_version.as_deref() == Some(version.as_str()) {
                        running += 1;
                    }
                }
                if d.ota_model.as_deref() == Some(tag.as_str())
                    && let Some(s) = &d.ota_state
                {
                    *states.entry(s.clone()).or_insert(0) += 1;
                }
            }
            Rollout {
                model: name.into(),
                version,
                target: describe_target(&m.target),
                paused: *paused,
                issued_at_ms: m.issued_at_ms,
                size_bytes: m.full.size,
                delta_bytes: m.delta.as_ref().map(|d| d.artifact.size),
                targeted,
                running,
                states,
            }
        })
        .collect())
}

async fn list_models(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<Rollout>>> {
    authorize(&state, &headers, Role::ReadOnly).await?;
    rollouts(&state).await.map(Json)
}

async fn list_rollouts(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<Rollout>>> {
    list_models(State(state), headers).await
}

/// `POST /api/v1/rollouts`: `{"model": "digits-edge", "version": "1.2.0", "target": "canary:5"}`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NewRollout {
    model: String,
    version: String,
    target: String,
}

fn parse_version(text: &str) -> ApiResult<Version> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("version {text:?}: expected MAJOR.MINOR.PATCH")))
}

async fn create_rollout(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<NewRollout>,
) -> ApiResult<Json<serde_json::Value>> {
    let caller = authorize(&state, &headers, Role::Admin).await?;
    let version = parse_version(&req.version)?;
    let target = crate::registry::parse_target(&req.target, &req.model)?;
    let key = signing_key(&state)?;
    let registry = registry(&state)?.clone();
    let model = req.model.clone();
    let signed = blocking(move || Ok(registry.rollout(&model, version, target, &key)?)).await?;
    let target = describe_target(&signed.content.target);
    audit_done(
        &state,
        &caller,
        "rollout.create",
        &signed.content.model.to_string(),
        serde_json::to_value(&req).unwrap_or_default(),
    )
    .await;
    Ok(Json(
        json!({ "model": req.model, "version": req.version, "target": target }),
    ))
}

/// `POST /api/v1/rollouts/{model}/{version}/{advance|pause|resume|rollback}`; advance takes an
/// optional `{"percent": 50}` (default: double the canary share; a non-canary target becomes
/// `all`).
async fn rollout_action(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((model, version, action)): Path<(String, String, String)>,
    body: Option<Json<serde_json::Value>>,
) -> ApiResult<Json<serde_json::Value>> {
    let caller = authorize(&state, &headers, Role::Admin).await?;
    let v = parse_version(&version)?;
    let registry = registry(&state)?.clone();
    let key = signing_key(&state)?;
    let target_name = format!("{model}@{version}");
    let percent = body
        .as_ref()
        .and_then(|b| b.get("percent"))
        .and_then(|p| p.as_f64());
    let action_name = action.clone();
    let result = blocking(move || {
        Ok(match action_name.as_str() {
            "advance" => {
                let entry = registry.get(&model, v)?;
                let next = advance(&entry.manifest.content.target, percent)?;
                let signed = registry.rollout(&model, v, next, &key)?;
                json!({ "target": describe_target(&signed.content.target) })
            }
            "pause" => {
                registry.pause(&model, v)?;
                json!({ "paused": true })
            }
            "resume" => {
                registry.resume(&model, v)?;
                json!({ "paused": false })
            }
            "rollback" => {
                let signed = registry.roll_back(&model, v, &key)?;
                json!({ "paused": true, "replacement": signed.content.model.version.to_string(), "target": describe_target(&signed.content.target) })
            }
            other => {
                return Err(ApiError::not_found(format!(
                    "no rollout action {other:?}: advance, pause, resume or rollback"
                )));
            }
        })
    })
    .await?;
    audit_done(
        &state,
        &caller,
        &format!("rollout.{action}"),
        &target_name,
        result.clone(),
    )
    .await;
    Ok(Json(result))
}

/// The next step of a rollout: `percent` if given, else double a canary's share.
fn advance(target: &TargetSelector, percent: Option<f64>) -> ApiResult<TargetSelector> {
    let to_bp = |p: f64| -> ApiResult<u16> {
        if (0.0..=100.0).contains(&p) {
            Ok((p * 100.0).round() as u16)
        } else {
            Err(ApiError::bad_request(format!(
                "percent {p} outside 0..=100"
            )))
        }
    };
    Ok(match target {
        TargetSelector::Canary {
            group,
            basis_points,
            salt,
        } => {
            let bp = match percent {
                Some(p) => to_bp(p)?,
                None => basis_points.saturating_mul(2).clamp(1, 10_000),
            };
            if bp < *basis_points {
                return Err(ApiError::bad_request(
                    "a rollout step cannot shrink the share; pause or roll back instead",
                ));
            }
            if bp >= 10_000 {
                match group {
                    Some(g) => TargetSelector::Group { group: g.clone() },
                    None => TargetSelector::All,
                }
            } else {
                TargetSelector::Canary {
                    group: group.clone(),
                    basis_points: bp,
                    salt: *salt,
                }
            }
        }
        TargetSelector::All => return Err(ApiError::bad_request("already targets every device")),
        _ => TargetSelector::All,
    })
}

/// `GET /api/v1/stats?minutes=60`.
#[derive(Debug, Deserialize)]
struct StatsQuery {
    minutes: Option<u64>,
}

async fn stats(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<StatsQuery>,
) -> ApiResult<Json<Vec<store::SeriesPoint>>> {
    authorize(&state, &headers, Role::ReadOnly).await?;
    let since = now_ms().saturating_sub(q.minutes.unwrap_or(60).min(60 * 24 * 31) * 60_000);
    with_db(&state, move |db| store::series(db, since))
        .await
        .map(Json)
}

/// `GET /api/v1/examples/export?model=NAME[&disagreements=true]`: a tar of `inputs.npy` and
/// `labels.npy` (the cloud's answers) for retraining.
#[derive(Debug, Deserialize)]
struct ExportQuery {
    model: String,
    #[serde(default)]
    disagreements: bool,
}

async fn export_examples(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<ExportQuery>,
) -> ApiResult<Response> {
    authorize(&state, &headers, Role::ReadOnly).await?;
    let path = state
        .examples
        .clone()
        .ok_or_else(|| ApiError::unavailable("no hard-example store file configured"))?;
    let tar = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = crate::store::Store::open(&path).map_err(|e| e.to_string())?;
        let n = store
            .export(&q.model, dir.path(), q.disagreements)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        let mut builder = tar::Builder::new(Vec::new());
        for name in ["inputs.npy", "labels.npy"] {
            builder
                .append_path_with_name(dir.path().join(name), name)
                .map_err(|e| e.to_string())?;
        }
        builder.into_inner().map(Some).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("export failed: {e}"),
        )
    })?
    .ok_or_else(|| ApiError::not_found("no hard examples for this model (and filter)"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"hard-examples.tar\"",
            ),
        ],
        tar,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
}

async fn audit_log(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<store::AuditRecord>>> {
    authorize(&state, &headers, Role::ReadOnly).await?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    with_db(&state, move |db| store::audit_log(db, limit))
        .await
        .map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

async fn create_token(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<NewToken>,
) -> ApiResult<Json<serde_json::Value>> {
    let caller = authorize(&state, &headers, Role::Admin).await?;
    let role = Role::parse(&req.role)
        .ok_or_else(|| ApiError::bad_request(format!("role {:?}: admin or read_only", req.role)))?;
    if req.name.is_empty() || req.name.len() > 64 {
        return Err(ApiError::bad_request("name: 1 to 64 bytes"));
    }
    let name = req.name.clone();
    let token = audited(
        &state,
        &caller,
        "token.create",
        &req.name,
        json!({ "role": role.name() }),
        move |db| store::create_token(db, &name, role, now_ms()),
    )
    .await?;
    Ok(Json(
        json!({ "name": req.name, "role": role.name(), "token": token }),
    ))
}

/// `PATCH /api/v1/tokens/{name}` with `{"revoked": true}`.
async fn revoke_token(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> ApiResult<Json<serde_json::Value>> {
    let caller = authorize(&state, &headers, Role::Admin).await?;
    if body.get("revoked") != Some(&serde_json::Value::Bool(true)) {
        return Err(ApiError::bad_request("send {\"revoked\": true}"));
    }
    let lookup = name.clone();
    let n = audited(
        &state,
        &caller,
        "token.revoke",
        &name,
        json!({}),
        move |db| store::revoke_tokens(db, &lookup, now_ms()),
    )
    .await?;
    Ok(Json(json!({ "name": name, "revoked": n })))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollmentToken {
    #[serde(default)]
    group: Option<String>,
    #[serde(default = "one")]
    uses: u32,
    #[serde(default = "day")]
    valid_s: u64,
}

fn one() -> u32 {
    1
}
fn day() -> u64 {
    86_400
}

async fn create_enrollment_token(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<NewEnrollmentToken>,
) -> ApiResult<Json<serde_json::Value>> {
    let caller = authorize(&state, &headers, Role::Admin).await?;
    if let Some(g) = &req.group {
        cascade_proto::topic::validate_segment(cascade_proto::topic::Segment::Group, g)
            .map_err(|e| ApiError::bad_request(format!("group: {e}")))?;
    }
    if req.uses == 0 {
        return Err(ApiError::bad_request("uses must be at least 1"));
    }
    let now = now_ms();
    let expires = now + req.valid_s.min(365 * 86_400) * 1000;
    let (group, uses, by) = (req.group.clone(), req.uses, caller.name.clone());
    let token = audited(
        &state,
        &caller,
        "enrollment_token.create",
        req.group.as_deref().unwrap_or("-"),
        serde_json::to_value(&req).unwrap_or_default(),
        move |db| store::create_enrollment_token(db, group.as_deref(), uses, expires, &by, now),
    )
    .await?;
    Ok(Json(
        json!({ "token": token, "expires_ms": expires, "uses": req.uses, "group": req.group }),
    ))
}

/// `POST /api/v1/enroll` with `Authorization: Bearer <enrollment token>` and
/// `{"device": "cam-01", "csr": "-----BEGIN CERTIFICATE REQUEST-----…"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    device: String,
    csr: String,
}

async fn enroll(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<EnrollRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let enroller = state.enrollment.clone().ok_or_else(|| {
        ApiError::unavailable(
            "enrollment is off: the escalator needs an [identity] section (ca_dir) beside [management]",
        )
    })?;
    cascade_proto::topic::validate_segment(cascade_proto::topic::Segment::Device, &req.device)
        .map_err(|e| ApiError::bad_request(format!("device id: {e}")))?;
    let token = bearer(&headers).ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing enrollment token (Authorization: Bearer enr_…)".into(),
        )
    })?;
    // Sign first: a bad request must not spend the token. The certificate is returned only if
    // the token holds and the id is new (checked and recorded in one transaction below).
    let (device, csr, signer) = (req.device.clone(), req.csr, enroller.clone());
    let certificate = tokio::task::spawn_blocking(move || signer.sign(&device, &csr))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::bad_request(format!("certificate request refused: {e}")))?;
    let caller = Caller {
        name: format!("enrollment:{}", req.device),
        role: Role::ReadOnly,
    };
    let id = req.device.clone();
    let outcome = audited(
        &state,
        &caller,
        "device.enroll",
        &req.device,
        json!({}),
        move |db| store::enroll_device(db, &token, &id, now_ms()),
    )
    .await?;
    let group = match outcome {
        Ok(group) => group,
        Err(store::EnrollRefusal::Token) => {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "enrollment token unknown, expired or used up: ask an operator for a new one"
                    .into(),
            ));
        }
        Err(store::EnrollRefusal::Exists) => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "device {:?} is already registered: enroll under a new id (an existing id is never handed out again)",
                    req.device
                ),
            ));
        }
    };
    Ok(Json(json!({
        "device": req.device,
        "fleet": state.fleet,
        "group": group,
        "certificate": certificate,
        "ca": enroller.ca_pem(),
        "broker": enroller.broker_url(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_doubles_a_canary_and_ends_at_all() {
        let canary = |bp| TargetSelector::Canary {
            group: None,
            basis_points: bp,
            salt: 9,
        };
        assert_eq!(advance(&canary(500), None).unwrap(), canary(1000));
        assert_eq!(advance(&canary(500), Some(50.0)).unwrap(), canary(5000));
        assert_eq!(advance(&canary(6000), None).unwrap(), TargetSelector::All);
        assert!(advance(&canary(5000), Some(10.0)).is_err(), "never shrinks");
        assert!(advance(&canary(5000), Some(150.0)).is_err());
        assert!(advance(&TargetSelector::All, None).is_err());
        let grouped = TargetSelector::Canary {
            group: Some("field".into()),
            basis_points: 5000,
            salt: 1,
        };
        assert_eq!(
            advance(&grouped, Some(100.0)).unwrap(),
            TargetSelector::Group {
                group: "field".into()
            }
        );
        assert_eq!(describe_target(&canary(1250)), "canary:12.5");
    }

    #[test]
    fn a_patch_tells_absent_from_null() {
        let u: DeviceUpdate = serde_json::from_str(r#"{"group": null}"#).unwrap();
        assert_eq!(u.group, Some(None));
        let u: DeviceUpdate = serde_json::from_str(r#"{"labels": {"a": "b"}}"#).unwrap();
        assert_eq!(u.group, None);
        assert!(serde_json::from_str::<DeviceUpdate>(r#"{"grp": "x"}"#).is_err());
    }
}
