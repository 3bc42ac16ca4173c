//! A broker that speaks only MQTT 3.1.1 (rumqttd with a v4 listener alone): the agent and the
//! escalator, both on `protocol = "auto"`, try MQTT 5, fall back, and escalations are answered.
//! Pinned to MQTT 5, an agent never connects there.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use cascade_e2e::fixtures::{agent_toml, digits, escalator_toml, eventually, init_logs};
use edge_agent::config::AgentConfig;
use edge_agent::input::{InputItem, Stage};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_escalator_fall_back_to_mqtt_311_and_escalations_are_answered() {
    init_logs();
    let port = free_port();
    let (v5, v311) =
        cloud_escalator::broker::start_with(None, Some(([127, 0, 0, 1], port).into())).unwrap();
    assert_eq!((v5, v311.map(|a| a.port())), (None, Some(port)));
    let url = format!("mqtt://127.0.0.1:{port}");
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();

    let escalator = cloud_escalator::service::start(
        toml::from_str(&escalator_toml(
            &url,
            "escalator-311",
            &state.path().join("examples.db"),
        ))
        .unwrap(),
        shutdown.child_token(),
    )
    .await
    .expect("escalator starts");
    let config: AgentConfig =
        toml::from_str(&agent_toml("old-broker", &url, &state.path().join("agent"))).unwrap();
    assert_eq!(config.mqtt.protocol, edge_agent::mqtt::Protocol::Auto);
    let mut agent = edge_agent::agent::start(config, shutdown.child_token())
        .await
        .expect("agent starts");
    let mut results = agent.take_results().unwrap();

    for (i, t) in digits(10).into_iter().enumerate() {
        agent
            .inputs
            .send(InputItem::new(format!("digit-{i}"), vec![t]))
            .await
            .unwrap();
    }
    let mut cloud = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cloud < 10 {
        let event = tokio::time::timeout_at(deadline, results.recv())
            .await
            .expect("every escalation answered within 60 s over MQTT 3.1.1")
            .expect("agent running");
        if event.stage == Stage::Cloud {
            cloud += 1;
        }
    }
    assert_eq!(agent.stats.verdicts.load(Relaxed), 10);
    assert_eq!(escalator.stats.answered.load(Relaxed), 10);

    // The same broker, an agent that insists on MQTT 5: it never gets a session.
    let pinned = agent_toml("pinned", &url, &state.path().join("pinned"))
        .replace("[mqtt]\n", "[mqtt]\nprotocol = \"5\"\n");
    let config: AgentConfig = toml::from_str(&pinned).unwrap();
    assert_eq!(config.mqtt.protocol, edge_agent::mqtt::Protocol::V5);
    let pinned = edge_agent::agent::start(config, shutdown.child_token())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || pinned
            .stats
            .disconnects
            .load(Relaxed)
            >= 2)
        .await,
        "an MQTT 5-only agent keeps failing to connect"
    );

    assert!(pinned.stop(Duration::from_secs(5)).await);
    assert!(agent.stop(Duration::from_secs(5)).await);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}
