//! Over-the-air model updates end to end, over a private Mosquitto: a version is published to the
//! registry, offered by the escalator, downloaded in verified chunks by the targeted agents, and
//! served after a restart; bad updates (downgrade, unknown key, corrupted bytes) are refused and
//! the running model stays.

use std::path::Path;
use std::time::Duration;

use cascade_e2e::Mosquitto;
use cascade_e2e::fixtures::{agent_toml, digits, escalator_toml, eventually, init_logs, model};
use cascade_proto::model::Version;
use cascade_proto::ota::OtaState;
use cascade_proto::signing::SigningKey;
use cloud_escalator::registry::{Registry, parse_target};
use cloud_escalator::service::EscalatorHandle;
use edge_agent::agent::AgentHandle;
use edge_agent::config::AgentConfig;
use edge_agent::input::{InputItem, Stage};
use tokio_util::sync::CancellationToken;

const CHUNK: u32 = 1024;

fn agent_config(device: &str, broker: &str, state: &Path, key: &SigningKey) -> AgentConfig {
    let text = format!(
        "trusted_keys = [\"{}\"]\n{}\n[ota]\ntimeout_ms = 1000\nmax_bad_chunks = 2\n",
        hex::encode(key.verifying_key().as_bytes()),
        agent_toml(device, broker, state)
    );
    toml::from_str(&text).unwrap()
}

async fn escalator(broker: &str, state: &Path, registry: &Path) -> EscalatorHandle {
    let text = format!(
        "{}\n[ota]\nregistry = {registry:?}\nrescan_ms = 200\n",
        escalator_toml(broker, "escalator-ota", &state.join("examples.db"))
    );
    cloud_escalator::service::start(toml::from_str(&text).unwrap(), CancellationToken::new())
        .await
        .expect("escalator starts")
}

async fn start(config: &AgentConfig) -> AgentHandle {
    edge_agent::agent::start(config.clone(), CancellationToken::new())
        .await
        .expect("agent starts")
}

fn state_of(escalator: &EscalatorHandle, device: &str) -> Option<OtaState> {
    escalator
        .ota
        .statuses()
        .get(device)
        .map(|s| s.state.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_rolls_out_to_a_canary_then_to_every_agent_which_serve_it() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let key = cloud_escalator::registry::keygen(&dir.path().join("fleet.key")).unwrap();
    let registry = Registry::open(&dir.path().join("registry")).unwrap();
    let escalator = escalator(&broker.url(), dir.path(), &dir.path().join("registry")).await;

    let configs: Vec<AgentConfig> = ["ota-a", "ota-b"]
        .iter()
        .map(|d| agent_config(d, &broker.url(), &dir.path().join(d), &key))
        .collect();
    let mut a = start(&configs[0]).await;
    let mut b = start(&configs[1]).await;
    assert_eq!(a.model_ref.version, Version::new(1, 0, 0));

    // The float edge model, published as digits-edge 2.0.0 for the canary device only.
    let v2 = Version::new(2, 0, 0);
    registry
        .publish(
            &model("digits-edge.f32.onnx"),
            "digits-edge",
            v2,
            parse_target("devices:ota-a", "digits-edge").unwrap(),
            &key,
            CHUNK,
        )
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), a.activated.changed())
        .await
        .expect("the canary activates the update within 30 s")
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || state_of(&escalator, "ota-a")
            == Some(OtaState::Activated))
        .await,
        "the escalator saw the canary report it: {:?}",
        state_of(&escalator, "ota-a")
    );
    assert!(b.activated.borrow().is_none(), "ota-b is not in the canary");

    // Restarted, the canary serves 2.0.0 (and answers inputs with it).
    assert!(a.stop(Duration::from_secs(5)).await);
    let mut a = start(&configs[0]).await;
    assert_eq!(a.model_ref.version, v2);
    let mut results = a.take_results().unwrap();
    a.inputs
        .send(InputItem::new("after-update", vec![digits(1).remove(0)]))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), results.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.stage, Stage::Edge);

    // The next step: everyone.
    registry
        .rollout(
            "digits-edge",
            v2,
            parse_target("all", "digits-edge").unwrap(),
            &key,
        )
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), b.activated.changed())
        .await
        .expect("the rest of the fleet activates the update")
        .unwrap();
    assert!(b.stop(Duration::from_secs(5)).await);
    let b = start(&configs[1]).await;
    assert_eq!(b.model_ref.version, v2);
    // The canary, already on 2.0.0, did not download it again.
    assert!(a.activated.borrow().is_none());

    assert!(a.stop(Duration::from_secs(5)).await);
    assert!(b.stop(Duration::from_secs(5)).await);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrades_unknown_keys_and_corrupted_bytes_are_refused_and_the_model_stays() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[1; 32]);
    let stranger = SigningKey::from_bytes(&[2; 32]);
    let registry = Registry::open(&dir.path().join("registry")).unwrap();
    let escalator = escalator(&broker.url(), dir.path(), &dir.path().join("registry")).await;
    let config = agent_config("ota-c", &broker.url(), &dir.path().join("agent"), &key);
    let agent = start(&config).await;
    let float_model = model("digits-edge.f32.onnx");

    let failed_with = |expected: &'static str| {
        let escalator = &escalator;
        move || {
            matches!(state_of(escalator, "ota-c"),
                Some(OtaState::Failed { reason }) if reason.contains(expected))
        }
    };

    // An older version (a replayed manifest would look the same): refused.
    registry
        .publish(
            &float_model,
            "digits-edge",
            Version::new(0, 9, 0),
            parse_target("all", "m").unwrap(),
            &key,
            CHUNK,
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), failed_with("downgrade refused")).await,
        "{:?}",
        state_of(&escalator, "ota-c")
    );

    // Signed by a key the device does not trust: refused.
    registry
        .publish(
            &float_model,
            "digits-edge",
            Version::new(3, 0, 0),
            parse_target("all", "m").unwrap(),
            &stranger,
            CHUNK,
        )
        .unwrap();
    assert!(
        eventually(
            Duration::from_secs(20),
            failed_with("not among the pinned fleet keys")
        )
        .await,
        "{:?}",
        state_of(&escalator, "ota-c")
    );

    // Properly signed, but the file changed after signing: every chunk's hash fails.
    registry
        .publish(
            &float_model,
            "digits-edge",
            Version::new(4, 0, 0),
            parse_target("all", "m").unwrap(),
            &key,
            CHUNK,
        )
        .unwrap();
    let stored = dir.path().join("registry/digits-edge/4.0.0/model");
    let mut bytes = std::fs::read(&stored).unwrap();
    for b in bytes.iter_mut().step_by(CHUNK as usize) {
        *b ^= 0xFF;
    }
    std::fs::write(&stored, bytes).unwrap();
    assert!(
        eventually(
            Duration::from_secs(30),
            failed_with("did not match the signed manifest")
        )
        .await,
        "{:?}",
        state_of(&escalator, "ota-c")
    );

    assert!(agent.activated.borrow().is_none(), "nothing was activated");
    assert!(
        !dir.path().join("agent/models/active.toml").exists(),
        "the running model stays"
    );
    assert!(agent.stop(Duration::from_secs(5)).await);
    let again = start(&config).await;
    assert_eq!(again.model_ref.version, Version::new(1, 0, 0));
    assert!(again.stop(Duration::from_secs(5)).await);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_escalates_far_more_is_rolled_back_within_its_health_window() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[3; 32]);
    let registry = Registry::open(&dir.path().join("registry")).unwrap();
    let escalator = escalator(&broker.url(), dir.path(), &dir.path().join("registry")).await;
    // A realistic policy (max-probability under 0.9, no audits): the bundled model escalates ~8%.
    let mut config = agent_config("ota-d", &broker.url(), &dir.path().join("agent"), &key);
    config.policy.threshold = 0.9;
    config.policy.audit_rate = 0.0;
    config.ota.health_min_inputs = 30;
    config.ota.health_window_s = 120;

    let feed = |agent: &AgentHandle, n: usize| {
        let inputs = agent.inputs.clone();
        async move {
            for (i, t) in digits(n).into_iter().enumerate() {
                inputs
                    .send(InputItem::new(format!("digit-{i}"), vec![t]))
                    .await
                    .unwrap();
            }
        }
    };
    let edge_results =
        |n: usize, mut rx: tokio::sync::mpsc::Receiver<edge_agent::input::ResultEvent>| async move {
            let mut seen = 0;
            while seen < n {
                let e = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                    .await
                    .expect("results in time")
                    .expect("agent running");
                if e.stage == Stage::Edge {
                    seen += 1;
                }
            }
            rx
        };

    // The running version's baseline: 60 inputs.
    let mut agent = start(&config).await;
    let rx = agent.take_results().unwrap();
    feed(&agent, 60).await;
    let _rx = edge_results(60, rx).await;
    let baseline = agent
        .stats
        .escalations
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        baseline <= 10,
        "the bundled model escalates few: {baseline} of 60"
    );

    // 2.0.0 gives the same answers with much less confidence (models/unsure.py).
    registry
        .publish(
            &model("testdata/digits-edge.unsure.onnx"),
            "digits-edge",
            Version::new(2, 0, 0),
            parse_target("all", "digits-edge").unwrap(),
            &key,
            CHUNK,
        )
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), agent.activated.changed())
        .await
        .expect("activated")
        .unwrap();
    assert!(agent.stop(Duration::from_secs(5)).await);
    let mut agent = start(&config).await;
    assert_eq!(agent.model_ref.version, Version::new(2, 0, 0));
    let rx = agent.take_results().unwrap();
    feed(&agent, 60).await;
    let _rx = edge_results(60, rx).await;
    tokio::time::timeout(Duration::from_secs(10), agent.activated.changed())
        .await
        .expect("the health watch rolls back within its window")
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            state_of(&escalator, "ota-d"),
            Some(OtaState::RolledBack { reason }) if reason.contains("escalation rate")
        ))
        .await,
        "{:?}",
        state_of(&escalator, "ota-d")
    );

    // Restarted: the previous version serves, and the still-retained 2.0.0 is not fetched again.
    assert!(agent.stop(Duration::from_secs(5)).await);
    let mut agent = start(&config).await;
    assert_eq!(agent.model_ref.version, Version::new(1, 0, 0));
    assert!(
        tokio::time::timeout(Duration::from_secs(3), agent.activated.changed())
            .await
            .is_err(),
        "a rolled-back version is not installed again"
    );
    assert!(agent.stop(Duration::from_secs(5)).await);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrained_version_travels_as_a_delta_from_the_running_one() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[4; 32]);
    let registry = Registry::open(&dir.path().join("registry")).unwrap();
    let escalator = escalator(&broker.url(), dir.path(), &dir.path().join("registry")).await;
    let config = agent_config("ota-e", &broker.url(), &dir.path().join("agent"), &key);
    let all = || parse_target("all", "digits-edge").unwrap();

    // 2.0.0 arrives whole (the device runs the bundled 1.0.0, which the registry never had).
    let mut agent = start(&config).await;
    registry
        .publish(
            &model("digits-edge.f32.onnx"),
            "digits-edge",
            Version::new(2, 0, 0),
            all(),
            &key,
            CHUNK,
        )
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), agent.activated.changed())
        .await
        .expect("2.0.0 activated")
        .unwrap();
    let full_chunks = escalator
        .ota
        .chunks
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(full_chunks, 6, "5217 bytes in 1 KiB chunks");
    assert!(agent.stop(Duration::from_secs(5)).await);

    // 2.1.0 changes only the last layer: the registry built a delta from 2.0.0, which the device
    // runs now, so only the delta travels; the rebuilt file must match the signed hash.
    let mut agent = start(&config).await;
    assert_eq!(agent.model_ref.version, Version::new(2, 0, 0));
    let signed = registry
        .publish(
            &model("testdata/digits-edge.unsure.onnx"),
            "digits-edge",
            Version::new(2, 1, 0),
            all(),
            &key,
            CHUNK,
        )
        .unwrap();
    let delta = signed.content.delta.expect("a delta from 2.0.0");
    tokio::time::timeout(Duration::from_secs(30), agent.activated.changed())
        .await
        .expect("2.1.0 activated")
        .unwrap();
    let delta_chunks = escalator
        .ota
        .chunks
        .load(std::sync::atomic::Ordering::Relaxed)
        - full_chunks;
    assert_eq!(delta_chunks, delta.artifact.chunk_count());
    assert!(delta_chunks < full_chunks);
    assert!(agent.stop(Duration::from_secs(5)).await);
    let agent = start(&config).await;
    assert_eq!(agent.model_ref.version, Version::new(2, 1, 0));
    assert_eq!(
        std::fs::read(dir.path().join("agent/models/digits-edge-2.1.0/model")).unwrap(),
        std::fs::read(model("testdata/digits-edge.unsure.onnx")).unwrap()
    );
    assert!(agent.stop(Duration::from_secs(5)).await);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_policy_update_reaches_the_agents_through_the_same_channel() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[6; 32]);
    let registry = Registry::open(&dir.path().join("registry")).unwrap();
    let escalator = escalator(&broker.url(), dir.path(), &dir.path().join("registry")).await;
    // The test configuration escalates everything (threshold 1, every input audited).
    let agent = start(&agent_config(
        "ota-f",
        &broker.url(),
        &dir.path().join("agent"),
        &key,
    ))
    .await;
    let mut policy =
        match cascade_proto::examples::example(cascade_proto::MessageKind::PolicyUpdate) {
            cascade_proto::Message::PolicyUpdate(p) => p.content,
            _ => unreachable!(),
        };
    policy.threshold = 0.0;
    policy.class_thresholds.clear();
    policy.audit_rate = 0.0;
    policy.target = parse_target("devices:ota-f", "m").unwrap();
    let signed = registry.publish_policy(policy, &key).unwrap();
    let in_force = || {
        agent
            .stats
            .policy_sequence
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(
        eventually(Duration::from_secs(20), || in_force()
            == signed.content.sequence)
        .await,
        "the policy is in force"
    );
    for (i, t) in digits(10).into_iter().enumerate() {
        agent
            .inputs
            .send(InputItem::new(format!("digit-{i}"), vec![t]))
            .await
            .unwrap();
    }
    let inputs = || {
        agent
            .stats
            .inputs
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(eventually(Duration::from_secs(10), || inputs() == 10).await);
    assert_eq!(
        agent
            .stats
            .escalations
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing is escalated under the new policy"
    );
    assert!(agent.stop(Duration::from_secs(5)).await);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}
