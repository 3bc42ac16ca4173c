//! What the end-to-end tests share: paths to the bundled models and test set, configurations, the
//! workspace's binaries, and waiting for a condition.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cascade_infer::Tensor;
use ndarray::Axis;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// A file under `models/`.
pub fn model(name: &str) -> PathBuf {
    root().join("models").join(name)
}

/// The bundled edge model (float32 ONNX; its sidecar names it `digits-edge`).
pub fn edge_model() -> PathBuf {
    model("digits-edge.f32.onnx")
}

/// The first `n` inputs of the bundled held-out set, each a `[1, 64]` tensor.
pub fn digits(n: usize) -> Vec<Tensor> {
    let all = Tensor::read_npy(&model("data/digits-test/inputs.npy")).expect("bundled inputs");
    let rows = all.as_f32().expect("float32 inputs");
    (0..n)
        .map(|i| {
            Tensor::F32(
                rows.index_axis(Axis(0), i % rows.shape()[0])
                    .to_owned()
                    .insert_axis(Axis(0)),
            )
        })
        .collect()
}

/// An agent configuration for `device` on `broker_url` that escalates every input (threshold 1.0
/// and a full audit sample), with a generous budget and quick retries, so tests see every path.
pub fn agent_toml(device: &str, broker_url: &str, state_dir: &Path) -> String {
    agent_toml_with_model(device, broker_url, state_dir, &edge_model())
}

/// [`agent_toml`] with another edge model.
pub fn agent_toml_with_model(
    device: &str,
    broker_url: &str,
    state_dir: &Path,
    model: &Path,
) -> String {
    format!(
        r#"
device = "{device}"
fleet = "e2e"
state_dir = {state:?}

[model]
path = {model:?}

[policy]
threshold = 1.0
audit_rate = 1.0
per_minute = 100000
burst = 10000

[mqtt]
url = "{broker_url}"
fsync = true
retry_after_ms = 2000
keep_alive_s = 5

[telemetry]
interval_s = 1
"#,
        state = state_dir,
    )
}

/// An escalator configuration on an external broker: the digits route, an SQLite store at `store`.
pub fn escalator_toml(broker_url: &str, client_id: &str, store: &Path) -> String {
    format!(
        r#"
fleet = "e2e"

[broker]
url = "{broker_url}"
client_id = "{client_id}"
share_group = "e2e"

[[routes]]
edge_model = "digits-edge"
cloud_model = {cloud:?}
tail_model = {tail:?}

[batching]
max_batch = 8
max_delay_us = 1000

[store]
path = {store:?}
"#,
        cloud = model("digits-cloud.onnx"),
        tail = model("digits-tail.onnx"),
    )
}

/// A binary of this workspace, built beside the test executable. `cargo test --workspace` builds
/// them; `cargo test -p cascade-e2e` alone may not, hence the message.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p {name}` first (`cargo test --workspace` builds it)",
        path.display()
    );
    path
}

/// Polls `done` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs of the code under test, shown for failing tests (`RUST_LOG` overrides the filter).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=off,rumqttc=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
