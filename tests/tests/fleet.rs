//! Fleet management end to end: simulated devices report over the embedded broker, the registry
//! follows them, and operators use the API and the CLI (tokens, roles, audit, rollouts).

use std::path::Path;
use std::time::Duration;

use cascade_e2e::devices::SimDevice;
use cascade_e2e::fixtures::{binary, init_logs, model};
use cascade_proto::model::{ModelRef, Version};
use cascade_proto::ota::{OtaState, TargetSelector};
use cloud_escalator::fleet::client::{Client, ClientError};
use cloud_escalator::fleet::db::Db;
use cloud_escalator::fleet::store::{Role, create_token};
use cloud_escalator::registry::{Registry, keygen, parse_target};
use cloud_escalator::service::EscalatorHandle;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const FLEET: &str = "e2e";

struct Fleet {
    escalator: EscalatorHandle,
    broker_port: u16,
    api: String,
    admin: String,
    reader: String,
    registry: Registry,
}

async fn start_fleet(dir: &Path, store: &str, max_devices: usize) -> Fleet {
    start_fleet_with(dir, store, max_devices, "", None).await
}

/// [`start_fleet`] with more configuration appended.
async fn start_fleet_with(
    dir: &Path,
    store: &str,
    max_devices: usize,
    extra: &str,
    running_broker: Option<u16>,
) -> Fleet {
    let broker_port = match running_broker {
        Some(port) => port,
        None => cloud_escalator::broker::free_local_port().unwrap(),
    };
    let broker = match running_broker {
        Some(port) => format!("url = \"mqtt://127.0.0.1:{port}\""),
        None => format!("listen = \"127.0.0.1:{broker_port}\""),
    };
    let key_path = dir.join("fleet.key");
    keygen(&key_path).unwrap();
    let registry = Registry::open(&dir.join("registry")).unwrap();
    let text = format!(
        r#"
fleet = "{FLEET}"
[broker]
{broker}
client_id = "escalator-fleet"
[[routes]]
edge_model = "digits-edge"
cloud_model = {cloud:?}
[store]
path = {examples:?}
[ota]
registry = {registry:?}
signing_key = {key_path:?}
rescan_ms = 200
[management]
store = {store:?}
listen = "127.0.0.1:0"
flush_ms = 100
max_devices = {max_devices}
{extra}
"#,
        cloud = model("digits-cloud.onnx"),
        examples = dir.join("examples.db"),
        registry = dir.join("registry"),
    );
    let escalator =
        cloud_escalator::service::start(toml::from_str(&text).unwrap(), CancellationToken::new())
            .await
            .expect("escalator starts");
    let api = format!(
        "http://{}",
        escalator.fleet_api.expect("the fleet API runs")
    );
    // The PostgreSQL client blocks: not on the test's async threads.
    let store = store.to_owned();
    let (admin, reader) = tokio::task::spawn_blocking(move || {
        let mut db = Db::open(&store).unwrap();
        (
            create_token(&mut db, "ops-ana", Role::Admin, 1).unwrap(),
            create_token(&mut db, "dashboard", Role::ReadOnly, 1).unwrap(),
        )
    })
    .await
    .unwrap();
    Fleet {
        escalator,
        broker_port,
        api,
        admin,
        reader,
        registry,
    }
}

/// Runs a blocking API call off the test's async threads.
async fn call(
    api: &str,
    token: Option<&str>,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let (api, token, path) = (api.to_owned(), token.map(str::to_owned), path.to_owned());
    tokio::task::spawn_blocking(move || Client::new(&api, token).json(method, &path, body.as_ref()))
        .await
        .unwrap()
}

async fn devices(f: &Fleet, query: &str) -> Vec<Value> {
    call(
        &f.api,
        Some(&f.reader),
        "GET",
        &format!("/devices{query}"),
        None,
    )
    .await
    .unwrap()
    .as_array()
    .unwrap()
    .clone()
}

async fn wait_for(what: &str, check: impl AsyncFnMut() -> bool) {
    wait_long(what, Duration::from_secs(30), check).await;
}

async fn wait_long(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..limit.as_millis() / 100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn status_of(e: &ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => *status,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_devices_and_steer_a_rollout_through_the_api_and_the_cli() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("fleet.db").display().to_string();
    let f = start_fleet(dir.path(), &store, 1000).await;
    let key = cloud_escalator::registry::load_key(&dir.path().join("fleet.key")).unwrap();
    f.registry
        .publish(
            &model("digits-edge.f32.onnx"),
            "digits-edge",
            Version::new(1, 0, 0),
            TargetSelector::All,
            &key,
            4096,
        )
        .unwrap();
    f.registry
        .publish(
            &model("testdata/digits-edge.unsure.onnx"),
            "digits-edge",
            Version::new(1, 1, 0),
            parse_target("canary:10", "digits-edge").unwrap(),
            &key,
            4096,
        )
        .unwrap();

    let mut sims = Vec::new();
    for i in 0..12 {
        let d = SimDevice::connect(FLEET, &format!("cam-{i:02}"), f.broker_port).await;
        d.telemetry(100, 10 + i, 8).await;
        sims.push(d);
    }
    sims[3]
        .ota(
            ModelRef::new("digits-edge", Version::new(1, 1, 0)),
            OtaState::Downloading {
                received_bytes: 4096,
                total_bytes: 20_000,
            },
        )
        .await;
    wait_for("12 devices online", async || {
        devices(&f, "?presence=online").await.len() == 12
    })
    .await;
    let d = &devices(&f, "?q=cam-03").await[0];
    assert_eq!(d["model"], "digits-edge");
    assert_eq!(d["model_version"], "1.0.0");
    assert_eq!(d["escalation_rate"], json!(0.13));
    assert_eq!(d["agreement"], json!(8.0 / 13.0));
    assert_eq!(d["ota_state"], "downloading");
    assert_eq!(d["stale"], false);

    // Authentication and roles.
    let e = call(&f.api, None, "GET", "/devices", None)
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 401);
    let e = call(&f.api, Some("cas_not-a-token"), "GET", "/devices", None)
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 401);
    let e = call(
        &f.api,
        Some(&f.reader),
        "PATCH",
        "/devices/cam-01",
        Some(json!({"group": "field"})),
    )
    .await
    .unwrap_err();
    assert_eq!(status_of(&e), 403);
    assert!(e.to_string().contains("read-only"), "{e}");

    // An admin groups and labels devices; the change is audited under the token's name.
    for id in ["cam-01", "cam-02"] {
        let d = call(
            &f.api,
            Some(&f.admin),
            "PATCH",
            &format!("/devices/{id}"),
            Some(json!({"group": "field", "labels": {"site": "north"}})),
        )
        .await
        .unwrap();
        assert_eq!(d["group"], "field");
    }
    let e = call(
        &f.api,
        Some(&f.admin),
        "PATCH",
        "/devices/cam-01",
        Some(json!({"group": "no/slashes"})),
    )
    .await
    .unwrap_err();
    assert_eq!(status_of(&e), 400);
    let field = devices(&f, "?group=field").await;
    assert_eq!(field.len(), 2);
    assert_eq!(devices(&f, "?label=site%3Dnorth").await.len(), 2);
    // New reports keep the operator's group.
    sims[1].telemetry(50, 5, 5).await;
    sims[1].status(150).await;
    wait_for("cam-01's new totals", async || {
        devices(&f, "?q=cam-01").await[0]["inputs"] == 150
    })
    .await;
    assert_eq!(devices(&f, "?q=cam-01").await[0]["group"], "field");

    // Rollouts: progress, advance, pause, roll back.
    let rollouts = call(&f.api, Some(&f.reader), "GET", "/rollouts", None)
        .await
        .unwrap();
    let v11 = rollouts
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == "1.1.0")
        .unwrap()
        .clone();
    assert_eq!(v11["target"], "canary:10");
    assert_eq!(v11["states"]["downloading"], 1);
    let v10 = rollouts
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == "1.0.0")
        .unwrap()
        .clone();
    assert_eq!(
        (v10["running"].clone(), v10["targeted"].clone()),
        (json!(12), json!(12))
    );
    let e = call(
        &f.api,
        Some(&f.reader),
        "POST",
        "/rollouts/digits-edge/1.1.0/advance",
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(status_of(&e), 403);
    let r = call(
        &f.api,
        Some(&f.admin),
        "POST",
        "/rollouts/digits-edge/1.1.0/advance",
        None,
    )
    .await
    .unwrap();
    assert_eq!(r["target"], "canary:20");
    let r = call(
        &f.api,
        Some(&f.admin),
        "POST",
        "/rollouts/digits-edge/1.1.0/advance",
        Some(json!({"percent": 100})),
    )
    .await
    .unwrap();
    assert_eq!(r["target"], "all");
    let manifest = f
        .registry
        .get("digits-edge", Version::new(1, 1, 0))
        .unwrap()
        .manifest;
    assert_eq!(
        manifest.content.target,
        TargetSelector::All,
        "re-signed in the registry"
    );
    call(
        &f.api,
        Some(&f.admin),
        "POST",
        "/rollouts/digits-edge/1.1.0/pause",
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        f.registry.latest().unwrap()[0]
            .manifest
            .content
            .model
            .version,
        Version::new(1, 0, 0)
    );
    let r = call(
        &f.api,
        Some(&f.admin),
        "POST",
        "/rollouts/digits-edge/1.1.0/rollback",
        None,
    )
    .await
    .unwrap();
    assert_eq!(r["replacement"], "1.1.1");
    let e = call(
        &f.api,
        Some(&f.admin),
        "POST",
        "/rollouts/digits-edge/9.9.9/advance",
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(status_of(&e), 404);

    let audit = call(&f.api, Some(&f.reader), "GET", "/audit", None)
        .await
        .unwrap();
    let actions: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actor"].as_str().unwrap().to_owned(),
                a["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for action in [
        "device.update",
        "rollout.advance",
        "rollout.pause",
        "rollout.rollback",
    ] {
        assert!(
            actions.contains(&("ops-ana".into(), action.into())),
            "{action} audited: {actions:?}"
        );
    }
    assert_eq!(
        actions.iter().filter(|(_, a)| a == "device.update").count(),
        2,
        "refused writes are not audited as done"
    );

    // Activity per minute, from the devices' telemetry.
    let stats = call(&f.api, Some(&f.reader), "GET", "/stats?minutes=5", None)
        .await
        .unwrap();
    let inputs: u64 = stats
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["inputs"].as_u64().unwrap())
        .sum();
    assert_eq!(inputs, 12 * 100 + 50);

    // A device that loses power: the broker publishes its last will.
    sims.remove(5).vanish();
    wait_for("cam-05 offline by its last will", async || {
        devices(&f, "?q=cam-05").await[0]["presence"] == "offline"
    })
    .await;

    // Hard examples: the device page lists recent escalations; export for retraining.
    {
        use cascade_infer::Tensor;
        use cloud_escalator::store::{Example, Store};
        let store = Store::open(&dir.path().join("examples.db")).unwrap();
        for (i, (edge, cloud)) in [(3u32, 3u32), (3, 8)].into_iter().enumerate() {
            store
                .insert(&Example {
                    id: format!("esc-{i}"),
                    device: "cam-02".into(),
                    model: "digits-edge".into(),
                    model_version: "1.0.0".into(),
                    privacy: "raw".into(),
                    input_npy: Tensor::F32(ndarray::ArrayD::from_elem(vec![1, 64], i as f32))
                        .to_npy_bytes(),
                    edge_class: edge,
                    edge_confidence: 0.4,
                    rule: "low_confidence".into(),
                    cloud_class: cloud,
                    cloud_probability: 0.9,
                    cloud_model: "digits-cloud@1.0.0".into(),
                    received_ms: 1_000 + i as u64,
                })
                .unwrap();
        }
    }
    let page = call(&f.api, Some(&f.reader), "GET", "/devices/cam-02", None)
        .await
        .unwrap();
    let recent = page["recent_escalations"].as_array().unwrap();
    assert_eq!(recent.len(), 2);
    assert_eq!(
        (
            recent[0]["edge_class"].clone(),
            recent[0]["cloud_class"].clone()
        ),
        (json!(3), json!(8)),
        "newest first"
    );
    let e = call(&f.api, Some(&f.reader), "GET", "/devices/nobody", None)
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 404);

    // The CLI over the same API.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(binary("cloud-escalator"))
            .args(["fleet", "--server", &f.api, "--token", &f.reader])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) =
        tokio::task::block_in_place(|| cli(&["devices", "--group", "field", "--json"]));
    assert_eq!(code, Some(0), "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2);
    let (code, out, _) = tokio::task::block_in_place(|| cli(&["devices"]));
    assert_eq!(code, Some(0));
    assert!(out.starts_with("DEVICE"), "{out}");
    assert_eq!(out.lines().count(), 13);
    assert!(
        out.lines()
            .any(|l| l.starts_with("cam-05") && l.contains("offline")),
        "{out}"
    );
    let (code, _, err) =
        tokio::task::block_in_place(|| cli(&["rollout", "pause", "digits-edge", "1.0.0"]));
    assert_ne!(code, Some(0));
    assert!(err.contains("403") && err.contains("read-only"), "{err}");

    assert!(
        f.escalator
            .fleet
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    );
    drop(sims);
    assert!(f.escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_report_and_the_registry_stays_bounded() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("fleet.db").display().to_string();
    // The devices connect and leave their retained statuses first; the escalator comes later and
    // must learn all of them from the broker (the embedded broker, started on its own here).
    let port = cloud_escalator::broker::free_local_port().unwrap();
    cloud_escalator::broker::start(([127, 0, 0, 1], port).into(), None).unwrap();
    let mut sims = Vec::new();
    for i in 0..1010 {
        sims.push(SimDevice::connect(FLEET, &format!("sim-{i:04}"), port).await);
    }
    wait_long(
        "1010 devices connected",
        Duration::from_secs(120),
        async || sims.iter().all(|d| d.connections() > 0),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Room for 1000: the 1001st device and later are counted and dropped.
    let f = start_fleet_with(dir.path(), &store, 1000, "", Some(port)).await;
    // Generous: 1 010 connections on a busy 2-core machine.
    let mut online = json!(null);
    for _ in 0..1800 {
        online = call(&f.api, Some(&f.reader), "GET", "/summary", None)
            .await
            .unwrap()["devices"]["online"]
            .clone();
        if online == 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = &f.escalator.fleet;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        online,
        1000,
        "registry: applied {} refused {} malformed {} flushes {} flush errors {}; devices connected {}, reconnected {}",
        load(&stats.applied),
        load(&stats.refused),
        load(&stats.malformed),
        load(&stats.flushes),
        load(&stats.flush_errors),
        sims.iter().filter(|d| d.connections() > 0).count(),
        sims.iter().filter(|d| d.connections() > 1).count(),
    );
    let started = std::time::Instant::now();
    let all = devices(&f, "?limit=5000").await;
    let listing = started.elapsed();
    assert_eq!(all.len(), 1000);
    assert!(
        f.escalator
            .fleet
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 10
    );
    // Paging.
    let page = devices(&f, "?limit=100&offset=950").await;
    assert_eq!(page.len(), 50);
    #[allow(clippy::print_stderr)]
    {
        eprintln!("listing 1000 devices took {listing:?}");
    }
    drop(sims);
    assert!(f.escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_runs_on_postgresql() {
    init_logs();
    let Some(schema) = cloud_escalator::fleet::test_postgres::TestSchema::create() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = start_fleet(dir.path(), &schema.url, 1000).await;
    let sims = [
        SimDevice::connect(FLEET, "pg-1", f.broker_port).await,
        SimDevice::connect(FLEET, "pg-2", f.broker_port).await,
    ];
    sims[0].telemetry(40, 4, 4).await;
    wait_for("2 devices in PostgreSQL", async || {
        devices(&f, "").await.len() == 2
    })
    .await;
    let d = call(
        &f.api,
        Some(&f.admin),
        "PATCH",
        "/devices/pg-1",
        Some(json!({"group": "lab"})),
    )
    .await
    .unwrap();
    assert_eq!(d["group"], "lab");
    assert_eq!(d["escalation_rate"], json!(0.1));
    let audit = call(&f.api, Some(&f.reader), "GET", "/audit", None)
        .await
        .unwrap();
    assert_eq!(audit[0]["action"], "device.update");
    drop(sims);
    assert!(f.escalator.stop(Duration::from_secs(5)).await);
}

/// Starts chromedriver on a free port; `None` (after saying so) when it is not installed,
/// outside CI.
fn chromedriver() -> Option<(std::process::Child, u16)> {
    let port = cloud_escalator::broker::free_local_port().unwrap();
    match std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => Some((child, port)),
        Err(e) if std::env::var_os("CI").is_none() => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "SKIPPED: chromedriver not runnable ({e}); apt-get install chromium chromium-driver"
                );
            }
            None
        }
        Err(e) => panic!("chromedriver is needed under CI: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_devices_and_advances_a_rollout_in_chromium() {
    use fantoccini::{ClientBuilder, Locator};
    init_logs();
    let Some((mut driver, driver_port)) = chromedriver() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("fleet.db").display().to_string();
    let f = start_fleet(dir.path(), &store, 1000).await;
    let key = cloud_escalator::registry::load_key(&dir.path().join("fleet.key")).unwrap();
    f.registry
        .publish(
            &model("digits-edge.f32.onnx"),
            "digits-edge",
            Version::new(1, 0, 0),
            TargetSelector::All,
            &key,
            4096,
        )
        .unwrap();
    f.registry
        .publish(
            &model("testdata/digits-edge.unsure.onnx"),
            "digits-edge",
            Version::new(1, 1, 0),
            parse_target("canary:5", "digits-edge").unwrap(),
            &key,
            4096,
        )
        .unwrap();
    let mut sims = Vec::new();
    for i in 0..6 {
        let d = SimDevice::connect(FLEET, &format!("lobby-{i}"), f.broker_port).await;
        d.telemetry(200, 20 + i, 15).await;
        sims.push(d);
    }
    wait_for("6 devices", async || devices(&f, "").await.len() == 6).await;

    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": "/usr/bin/chromium", "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]}),
    );
    let mut client = None;
    for _ in 0..50 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
        {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let browser = client.expect("chromedriver answers");
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console");
    std::fs::create_dir_all(&shots).unwrap();

    browser.goto(&f.api).await.unwrap();
    // First visit: the page asks for a token.
    let input = browser
        .wait()
        .for_element(Locator::Css("#token"))
        .await
        .unwrap();
    input.send_keys(&f.admin).await.unwrap();
    browser
        .find(Locator::Css("#save-token"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rows_shown = async || {
        browser
            .find_all(Locator::Css("#devices tr[data-device]"))
            .await
            .map(|rows| rows.len())
            .unwrap_or(0)
    };
    wait_for("6 rows in the device list", async || {
        rows_shown().await == 6
    })
    .await;
    let pill = browser
        .find(Locator::Css("tr[data-device='lobby-3'] [data-presence]"))
        .await
        .unwrap();
    assert_eq!(pill.text().await.unwrap(), "online");
    assert_eq!(
        browser
            .find(Locator::Css("#count-online"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "6"
    );
    std::fs::write(
        shots.join("devices.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    // Live status: a device that vanishes turns offline without a reload.
    sims.remove(3).vanish();
    wait_for("lobby-3 offline in the page", async || {
        match browser
            .find(Locator::Css("tr[data-device='lobby-3'] [data-presence]"))
            .await
        {
            Ok(e) => e.text().await.map(|t| t == "offline").unwrap_or(false),
            Err(_) => false,
        }
    })
    .await;

    // The device page.
    browser
        .find(Locator::LinkText("lobby-1"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let details = browser
        .wait()
        .for_element(Locator::Css("#device"))
        .await
        .unwrap();
    assert!(details.text().await.unwrap().contains("digits-edge 1.0.0"));

    // Rollouts: advance the canary from the page.
    browser
        .goto(&format!("{}/#/rollouts", f.api))
        .await
        .unwrap();
    let advance = browser
        .wait()
        .for_element(Locator::Css(
            "button[data-action='advance'][data-rollout='digits-edge@1.1.0']",
        ))
        .await
        .unwrap();
    advance.click().await.unwrap();
    wait_for("the page to show canary:10", async || {
        match browser
            .find(Locator::Css("tr[data-rollout='digits-edge@1.1.0'] .target"))
            .await
        {
            Ok(e) => e.text().await.map(|t| t == "canary:10").unwrap_or(false),
            Err(_) => false,
        }
    })
    .await;
    let target = f
        .registry
        .get("digits-edge", Version::new(1, 1, 0))
        .unwrap()
        .manifest
        .content
        .target;
    assert!(
        matches!(
            target,
            TargetSelector::Canary {
                basis_points: 1000,
                ..
            }
        ),
        "{target:?}"
    );
    std::fs::write(
        shots.join("rollouts.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    browser
        .goto(&format!("{}/#/activity", f.api))
        .await
        .unwrap();
    browser
        .wait()
        .for_element(Locator::Css("#chart-escalations polyline"))
        .await
        .unwrap();
    std::fs::write(
        shots.join("activity.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    let audit = call(&f.api, Some(&f.reader), "GET", "/audit", None)
        .await
        .unwrap();
    assert_eq!(audit[0]["action"], "rollout.advance");
    browser.close().await.unwrap();
    let _ = driver.kill();
    let _ = driver.wait();
    drop(sims);
    assert!(f.escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolls_with_a_token_and_reports_through_the_gate() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("fleet.db").display().to_string();
    let gate_port = cloud_escalator::broker::free_local_port().unwrap();
    let identity = format!(
        "[identity]\nca_dir = {:?}\ngate_listen = \"127.0.0.1:{gate_port}\"\ndevice_broker_url = \"mqtts://localhost:{gate_port}\"\n",
        dir.path().join("ca")
    );
    let f = start_fleet_with(dir.path(), &store, 1000, &identity, None).await;
    assert_eq!(f.escalator.gate.map(|a| a.port()), Some(gate_port));

    // An operator makes a one-time token for the lab group.
    let e = call(
        &f.api,
        Some(&f.reader),
        "POST",
        "/enrollment-tokens",
        Some(json!({"group": "lab"})),
    )
    .await
    .unwrap_err();
    assert_eq!(status_of(&e), 403);
    let token = call(
        &f.api,
        Some(&f.admin),
        "POST",
        "/enrollment-tokens",
        Some(json!({"group": "lab", "uses": 1})),
    )
    .await
    .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // The device: a configuration from the installer's template, then `edge-agent enroll`.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        cascade_e2e::fixtures::agent_toml("unset", "mqtt://127.0.0.1:1", &dir.path().join("agent")),
    )
    .unwrap();
    let identity_dir = dir.path().join("identity");
    let enroll = |token: &str| {
        std::process::Command::new(binary("edge-agent"))
            .args([
                "enroll", "--server", &f.api, "--token", token, "--device", "cam-new",
            ])
            .arg("--dir")
            .arg(&identity_dir)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| enroll(&token));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(identity_dir.join("device.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // The token was for one device.
    let again = tokio::task::block_in_place(|| enroll(&token));
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The enrolled agent connects through the gate with its certificate and shows up in the lab.
    let agent_config = edge_agent::config::AgentConfig::load(&config).unwrap();
    assert_eq!(agent_config.group.as_deref(), Some("lab"));
    let agent = edge_agent::agent::start(agent_config, CancellationToken::new())
        .await
        .expect("agent starts");
    wait_for("cam-new online through the gate", async || {
        devices(&f, "?group=lab")
            .await
            .first()
            .is_some_and(|d| d["id"] == "cam-new" && d["presence"] == "online")
    })
    .await;
    assert!(
        f.escalator
            .gate_stats
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let audit = call(&f.api, Some(&f.reader), "GET", "/audit", None)
        .await
        .unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "device.enroll" && a["target"] == "cam-new")
    );
    agent.stop(Duration::from_secs(5)).await;
    assert!(f.escalator.stop(Duration::from_secs(5)).await);
}
