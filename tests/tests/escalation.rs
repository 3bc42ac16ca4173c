//! Agent ⇄ broker ⇄ escalator, in one process, over a private Mosquitto: the broker dies for 30 s,
//! a minimal MQTT 5 responder stands in for the escalator, and the escalator meets bad input.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_e2e::Mosquitto;
use cascade_e2e::fixtures::{agent_toml, digits, escalator_toml, eventually, init_logs};
use cascade_proto::escalation::{
    ClassScore, Confidence, ConfidenceMetric, EdgeResult, EscalationRequest, Payload, PolicyRule,
    PrivacyMode, RejectReason, Tensor as WireTensor, Timings, Verdict,
};
use cascade_proto::model::{ModelRef, Version};
use cascade_proto::{Limits, Message, decode, encode};
use edge_agent::agent::AgentHandle;
use edge_agent::config::AgentConfig;
use edge_agent::input::{InputItem, ResultEvent, Stage};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::sync::atomic::Ordering::Relaxed;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Every result an agent publishes, collected as they come.
#[derive(Clone, Default)]
struct Results(Arc<Mutex<Vec<ResultEvent>>>);

impl Results {
    fn collect(agent: &mut AgentHandle) -> Self {
        let results = Results::default();
        let mut rx = agent.take_results().expect("results taken once");
        let sink = results.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                sink.0.lock().unwrap().push(event);
            }
        });
        results
    }

    fn count(&self, stage: Stage) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.stage == stage)
            .count()
    }

    /// How many results of `stage` each escalation id received.
    fn per_escalation(&self, stage: Stage) -> HashMap<Uuid, usize> {
        let mut counts = HashMap::new();
        for e in self.0.lock().unwrap().iter() {
            if e.stage == stage
                && let Some(id) = e.escalation
            {
                *counts.entry(id).or_default() += 1;
            }
        }
        counts
    }
}

async fn start_agent(
    device: &str,
    broker: &str,
    state: &std::path::Path,
    shutdown: &CancellationToken,
) -> AgentHandle {
    let config: AgentConfig = toml::from_str(&agent_toml(device, broker, state)).unwrap();
    edge_agent::agent::start(config, shutdown.child_token())
        .await
        .expect("agent starts")
}

async fn feed(agent: &AgentHandle, prefix: &str, inputs: Vec<cascade_infer::Tensor>) {
    for (i, t) in inputs.into_iter().enumerate() {
        agent
            .inputs
            .send(InputItem::new(format!("{prefix}-{i}"), vec![t]))
            .await
            .unwrap();
    }
}

/// A raw MQTT 5 client and a task driving its event loop, forwarding publishes.
fn raw_client(id: &str, port: u16) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Publish>) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_max_packet_size(Some(8 << 20));
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(options, 256);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (client, rx)
}

fn escalation(device: &str, model: &str, values: &[f32]) -> EscalationRequest {
    EscalationRequest {
        id: Uuid::new_v4(),
        device: device.into(),
        model: ModelRef::new(model, Version::new(1, 0, 0)),
        privacy: PrivacyMode::Raw,
        payload: Payload::Tensor(WireTensor::from_f32(vec![1, values.len() as u32], values)),
        edge: EdgeResult {
            top_k: vec![ClassScore {
                class: 3,
                score: 0.4,
            }],
            confidence: Confidence {
                metric: ConfidenceMetric::MaxProb,
                value: 0.4,
            },
            rule: PolicyRule::LowConfidence { threshold: 0.6 },
            inference_us: 10,
        },
        sent_at_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_broker_outage_loses_no_escalation_and_applies_each_verdict_once() {
    init_logs();
    let mut broker = Mosquitto::start().expect("mosquitto");
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let config = toml::from_str(&escalator_toml(
        &broker.url(),
        "escalator-outage",
        &state.path().join("examples.db"),
    ))
    .unwrap();
    let escalator = cloud_escalator::service::start(config, shutdown.child_token())
        .await
        .expect("escalator starts");
    let mut agent = start_agent(
        "outage",
        &broker.url(),
        &state.path().join("agent"),
        &shutdown,
    )
    .await;
    let results = Results::collect(&mut agent);
    let mut inputs = digits(60).into_iter();

    // Broker up.
    feed(&agent, "before", inputs.by_ref().take(20).collect()).await;
    assert!(
        eventually(Duration::from_secs(30), || results.count(Stage::Cloud)
            == 20)
        .await,
        "verdicts before the outage: {}",
        results.count(Stage::Cloud)
    );

    // The broker dies (SIGKILL, no persistence: every session is lost). Inputs keep coming; the
    // agent answers them at the edge and spools their escalations.
    broker.kill();
    feed(&agent, "during", inputs.by_ref().take(20).collect()).await;
    assert!(eventually(Duration::from_secs(10), || results.count(Stage::Edge) == 40).await);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        results.count(Stage::Cloud),
        20,
        "no verdict can arrive while the broker is down"
    );
    assert_eq!(
        agent.stats.spooled.load(Relaxed),
        20,
        "escalations wait in the spool"
    );

    // Back up, with no sessions: the agent must resubscribe (or it would never see another verdict)
    // and republish what it spooled; the escalator resubscribes too.
    broker.restart().expect("mosquitto restarts");
    feed(&agent, "after", inputs.by_ref().take(20).collect()).await;
    assert!(
        eventually(Duration::from_secs(60), || results.count(Stage::Cloud)
            == 60)
        .await,
        "verdicts after the outage: {}",
        results.count(Stage::Cloud)
    );
    // Let any late duplicate arrive before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let escalated = results.per_escalation(Stage::Edge);
    let applied = results.per_escalation(Stage::Cloud);
    assert_eq!(escalated.len(), 60, "every input was escalated once");
    assert_eq!(applied.len(), 60, "every escalation got its verdict");
    assert!(applied.values().all(|&n| n == 1), "a verdict applied twice");
    assert!(applied.keys().all(|id| escalated.contains_key(id)));
    assert_eq!(agent.stats.verdicts.load(Relaxed), 60);
    assert_eq!(agent.stats.unknown_verdicts.load(Relaxed), 0);
    assert_eq!(agent.stats.spooled.load(Relaxed), 0, "the spool drained");
    assert!(
        agent.stats.disconnects.load(Relaxed) >= 1,
        "the outage was seen"
    );
    // The escalator ran the model once per escalation, whatever was redelivered.
    assert_eq!(escalator.stats.answered.load(Relaxed), 60);
    assert!(
        eventually(Duration::from_secs(5), || escalator
            .stats
            .stored
            .load(Relaxed)
            == 60)
        .await,
        "one hard example per escalation"
    );

    assert!(agent.stop(Duration::from_secs(5)).await);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_mqtt5_service_can_answer_an_escalation_through_response_topic_and_correlation() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (responder, mut requests) = raw_client("responder", broker.port());
    responder
        .subscribe("cascade/v1/e2e/+/escalate", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut agent = start_agent(
        "mqtt5",
        &broker.url(),
        &state.path().join("agent"),
        &shutdown,
    )
    .await;
    let results = Results::collect(&mut agent);
    feed(&agent, "x", digits(3)).await;

    let limits = Limits::default();
    let mut answered = Vec::new();
    while answered.len() < 3 {
        let p = tokio::time::timeout(Duration::from_secs(20), requests.recv())
            .await
            .expect("escalations arrive")
            .unwrap();
        let props = p.properties.clone().expect("MQTT 5 properties");
        let Ok(Message::EscalationRequest(request)) = decode(&p.payload, &limits) else {
            panic!("an escalation request");
        };
        if answered.contains(&request.id) {
            continue; // a retry of one already answered
        }
        assert_eq!(
            props.response_topic.as_deref(),
            Some("cascade/v1/e2e/mqtt5/verdict")
        );
        assert_eq!(
            props.correlation_data.as_deref(),
            Some(&request.id.as_bytes()[..]),
            "correlation data is the escalation id"
        );
        assert_eq!(props.message_expiry_interval, Some(300));
        let verdict = encode(&Message::Verdict(Verdict {
            id: request.id,
            class: 7,
            label: Some("seven".into()),
            scores: vec![ClassScore {
                class: 7,
                score: 0.99,
            }],
            model: ModelRef::new("responder", Version::new(0, 1, 0)),
            timings: Timings::default(),
            batch_size: 1,
        }));
        let reply = PublishProperties {
            correlation_data: props.correlation_data.clone(),
            ..PublishProperties::default()
        };
        // Answer twice: the agent must apply it once.
        for _ in 0..2 {
            responder
                .publish_with_properties(
                    props.response_topic.clone().unwrap(),
                    QoS::AtLeastOnce,
                    false,
                    verdict.clone(),
                    reply.clone(),
                )
                .await
                .unwrap();
        }
        answered.push(request.id);
    }
    assert!(eventually(Duration::from_secs(10), || results.count(Stage::Cloud) == 3).await);

    // Garbage, an oversized message and a verdict for an escalation nobody sent, on the verdict
    // topic: each is counted and dropped, and the agent stays connected.
    let topic = "cascade/v1/e2e/mqtt5/verdict";
    let disconnects = agent.stats.disconnects.load(Relaxed);
    responder
        .publish(topic, QoS::AtLeastOnce, false, b"\xff\x00garbage".to_vec())
        .await
        .unwrap();
    responder
        .publish(topic, QoS::AtLeastOnce, false, vec![0u8; 2 << 20])
        .await
        .unwrap();
    let stranger = encode(&Message::Verdict(Verdict {
        id: Uuid::new_v4(),
        class: 1,
        label: None,
        scores: vec![],
        model: ModelRef::new("responder", Version::new(0, 1, 0)),
        timings: Timings::default(),
        batch_size: 1,
    }));
    responder
        .publish(topic, QoS::AtLeastOnce, false, stranger)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            agent.stats.unknown_verdicts.load(Relaxed) == 1
                && agent.stats.bad_messages.load(Relaxed) >= 1
        })
        .await,
        "bad messages {} unknown {}",
        agent.stats.bad_messages.load(Relaxed),
        agent.stats.unknown_verdicts.load(Relaxed)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cloud = results.per_escalation(Stage::Cloud);
    assert_eq!(cloud.len(), 3);
    assert!(cloud.values().all(|&n| n == 1), "a verdict applied twice");
    assert!(agent.stats.duplicate_verdicts.load(Relaxed) >= 3);
    assert_eq!(
        agent.stats.disconnects.load(Relaxed),
        disconnects,
        "bad messages do not cost the connection"
    );
    let edge_class = results
        .0
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.stage == Stage::Cloud)
        .and_then(|e| e.class);
    assert_eq!(edge_class, Some(7), "the responder's answer is applied");
    assert!(agent.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_escalator_rejects_bad_escalations_with_a_counted_reason_and_stays_up() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let mut config: cloud_escalator::config::EscalatorConfig = toml::from_str(&escalator_toml(
        &broker.url(),
        "escalator-rejects",
        &state.path().join("examples.db"),
    ))
    .unwrap();
    config.limits.max_message_bytes = 4096;
    config.limits.per_device_per_minute = 60;
    config.limits.per_device_burst = 5;
    let escalator = cloud_escalator::service::start(config, shutdown.child_token())
        .await
        .expect("escalator starts");
    let (client, mut replies) = raw_client("prober", broker.port());
    client
        .subscribe("cascade/v1/e2e/+/verdict", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publish = |device: &str, payload: Vec<u8>| {
        let client = client.clone();
        let topic = format!("cascade/v1/e2e/{device}/escalate");
        async move {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap()
        }
    };
    let pixels = digits(1)[0].to_f32().iter().copied().collect::<Vec<_>>();

    publish("garbage", b"\x01\x02 not postcard".to_vec()).await;
    publish(
        "wrong-kind",
        encode(&Message::Rejection(cascade_proto::escalation::Rejection {
            id: None,
            reason: RejectReason::Expired,
            detail: "not an escalation".into(),
        })),
    )
    .await;
    publish(
        "unknown",
        encode(&Message::EscalationRequest(escalation(
            "unknown",
            "no-such-model",
            &pixels,
        ))),
    )
    .await;
    publish(
        "huge",
        encode(&Message::EscalationRequest(escalation(
            "huge",
            "digits-edge",
            &vec![0.5; 4096],
        ))),
    )
    .await;
    for _ in 0..20 {
        publish(
            "flood",
            encode(&Message::EscalationRequest(escalation(
                "flood",
                "digits-edge",
                &pixels,
            ))),
        )
        .await;
    }
    let good = escalation("good", "digits-edge", &pixels);
    publish("good", encode(&Message::EscalationRequest(good.clone()))).await;

    // Every message gets an answer on its device's verdict topic: a verdict or a rejection.
    let limits = Limits::default();
    let mut by_device: HashMap<String, Vec<Message>> = HashMap::new();
    let mut n = 0;
    while n < 25 {
        let p = tokio::time::timeout(Duration::from_secs(20), replies.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of 25 answers: {by_device:?}"))
            .unwrap();
        let device = String::from_utf8_lossy(&p.topic)
            .split('/')
            .nth(3)
            .unwrap()
            .to_string();
        by_device
            .entry(device)
            .or_default()
            .push(decode(&p.payload, &limits).expect("answers decode"));
        n += 1;
    }
    let reason = |device: &str| match by_device[device].as_slice() {
        [Message::Rejection(r)] => r.reason,
        other => panic!("{device}: {other:?}"),
    };
    assert_eq!(reason("garbage"), RejectReason::Malformed);
    assert_eq!(reason("wrong-kind"), RejectReason::Malformed);
    assert_eq!(reason("unknown"), RejectReason::UnknownModel);
    assert_eq!(reason("huge"), RejectReason::TooLarge);
    let flood = &by_device["flood"];
    let limited = flood
        .iter()
        .filter(|m| matches!(m, Message::Rejection(r) if r.reason == RejectReason::RateLimited))
        .count();
    let verdicts = flood
        .iter()
        .filter(|m| matches!(m, Message::Verdict(_)))
        .count();
    assert_eq!(limited + verdicts, 20);
    assert!(
        (5..=7).contains(&verdicts),
        "the burst of 5 passes: {verdicts}"
    );
    match by_device["good"].as_slice() {
        [Message::Verdict(v)] => assert_eq!(v.id, good.id),
        other => panic!("the good escalation: {other:?}"),
    }

    let counted = escalator.stats.rejections();
    assert_eq!(counted.get("malformed"), Some(&2));
    assert_eq!(counted.get("unknown_model"), Some(&1));
    assert_eq!(counted.get("too_large"), Some(&1));
    assert_eq!(counted.get("rate_limited"), Some(&(limited as u64)));
    assert!(escalator.stop(Duration::from_secs(5)).await);
}
