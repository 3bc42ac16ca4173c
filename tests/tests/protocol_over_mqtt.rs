//! The wire protocol over a real Mosquitto broker: the topic scheme, MQTT 5 shared subscriptions
//! for escalator replicas, and the retained status that doubles as the last will.

use std::collections::BTreeMap;
use std::time::Duration;

use cascade_e2e::Mosquitto;
use cascade_proto::escalation::EscalationRequest;
use cascade_proto::examples::example;
use cascade_proto::status::{DeviceStatus, Presence};
use cascade_proto::topic::{Channel, DeviceTopic, Filter};
use cascade_proto::{Limits, Message, MessageKind, decode, encode};
use rumqttc::NetworkOptions;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const FLEET: &str = "acme";

fn options(id: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    options
}

/// What a client's event loop reports to the test.
#[derive(Debug)]
enum Seen {
    Subscribed,
    Publish { topic: String, payload: Vec<u8> },
}

/// Runs an event loop until the channel closes, forwarding subscriptions and publishes.
fn drive(mut eventloop: EventLoop, tx: mpsc::Sender<Seen>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let seen = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => Seen::Subscribed,
                Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish {
                    topic: String::from_utf8(p.topic.to_vec()).unwrap(),
                    payload: p.payload.to_vec(),
                },
                Ok(_) => continue,
                Err(e) => panic!("MQTT connection failed: {e}"),
            };
            if tx.send(seen).await.is_err() {
                return;
            }
        }
    })
}

async fn subscriber(
    id: &str,
    port: u16,
    filter: &str,
) -> (AsyncClient, mpsc::Receiver<Seen>, JoinHandle<()>) {
    let (client, eventloop) = AsyncClient::new(options(id, port), 64);
    let (tx, mut rx) = mpsc::channel(256);
    let task = drive(eventloop, tx);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let first = timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
    assert!(matches!(first, Some(Seen::Subscribed)), "{first:?}");
    (client, rx, task)
}

fn escalation(n: u128) -> EscalationRequest {
    let Message::EscalationRequest(mut e) = example(MessageKind::EscalationRequest) else {
        unreachable!()
    };
    e.id = uuid::Uuid::from_u128(n);
    e.device = format!("cam-{:02}", n % 4);
    e
}

#[tokio::test]
async fn shared_subscription_splits_escalations_between_replicas_exactly_once() {
    let broker = Mosquitto::start().unwrap();
    let filter = Filter::channel(FLEET, Channel::Escalate)
        .unwrap()
        .shared("escalators")
        .unwrap()
        .to_string();
    let (_a, mut rx_a, _ta) = subscriber("escalator-a", broker.port(), &filter).await;
    let (_b, mut rx_b, _tb) = subscriber("escalator-b", broker.port(), &filter).await;

    let (device, eventloop) = AsyncClient::new(options("devices", broker.port()), 64);
    let (tx, _rx) = mpsc::channel(256);
    let _td = drive(eventloop, tx);
    const N: u128 = 40;
    for n in 0..N {
        let esc = escalation(n);
        let topic = DeviceTopic::new(FLEET, &esc.device, Channel::Escalate)
            .unwrap()
            .to_string();
        device
            .publish(topic, QoS::AtLeastOnce, false, encode(&esc.into()))
            .await
            .unwrap();
    }

    let mut received: BTreeMap<uuid::Uuid, &str> = BTreeMap::new();
    let mut per_replica = [0usize; 2];
    while received.len() < N as usize {
        let (seen, replica) = timeout(Duration::from_secs(10), async {
            tokio::select! {
                s = rx_a.recv() => (s, 0),
                s = rx_b.recv() => (s, 1),
            }
        })
        .await
        .expect("every escalation arrives within 10 s");
        let Some(Seen::Publish { topic, payload }) = seen else {
            continue;
        };
        let topic = DeviceTopic::parse(&topic).unwrap();
        let Message::EscalationRequest(esc) = decode(&payload, &Limits::default()).unwrap() else {
            panic!("not an escalation");
        };
        assert_eq!(
            topic.device, esc.device,
            "the topic names the sending device"
        );
        assert_eq!(topic.channel, Channel::Escalate);
        let name = ["a", "b"][replica];
        assert!(
            received.insert(esc.id, name).is_none(),
            "escalation {} delivered twice",
            esc.id
        );
        per_replica[replica] += 1;
    }
    assert!(
        per_replica.iter().all(|&n| n > 0),
        "both replicas take a share: {per_replica:?}"
    );
    // Nothing more is in flight: no duplicate turns up late.
    let late = timeout(Duration::from_millis(300), async {
        tokio::select! { s = rx_a.recv() => s, s = rx_b.recv() => s }
    })
    .await;
    assert!(late.is_err(), "unexpected extra delivery: {late:?}");
}

fn status(presence: Presence) -> Vec<u8> {
    let Message::DeviceStatus(mut s) = example(MessageKind::DeviceStatus) else {
        unreachable!()
    };
    s.presence = presence;
    encode(&s.into())
}

async fn next_status(rx: &mut mpsc::Receiver<Seen>) -> DeviceStatus {
    loop {
        let seen = timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a status arrives")
            .expect("subscriber alive");
        if let Seen::Publish { payload, .. } = seen {
            match decode(&payload, &Limits::default()).unwrap() {
                Message::DeviceStatus(s) => return s,
                other => panic!("expected a status, got {}", other.kind()),
            }
        }
    }
}

#[tokio::test]
async fn retained_status_and_last_will_announce_an_unclean_disconnect() {
    let broker = Mosquitto::start().unwrap();
    let topic = DeviceTopic::new(FLEET, "cam-01", Channel::Status)
        .unwrap()
        .to_string();
    let watch = Filter::channel(FLEET, Channel::Status).unwrap().to_string();
    let (_w, mut watcher, _tw) = subscriber("dashboard", broker.port(), &watch).await;

    let mut opts = options("cam-01", broker.port());
    opts.set_last_will(LastWill::new(
        topic.clone(),
        status(Presence::Offline),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let (device, eventloop) = AsyncClient::new(opts, 16);
    let (tx, _rx) = mpsc::channel(16);
    let device_task = drive(eventloop, tx);
    device
        .publish(
            topic.clone(),
            QoS::AtLeastOnce,
            true,
            status(Presence::Online),
        )
        .await
        .unwrap();
    assert_eq!(next_status(&mut watcher).await.presence, Presence::Online);

    // Power loss: the connection dies without a DISCONNECT, so the broker sends the will.
    device_task.abort();
    let _ = device_task.await;
    drop(device);
    assert_eq!(next_status(&mut watcher).await.presence, Presence::Offline);

    // The will was retained: a dashboard that connects later learns the device is gone.
    let (_l, mut late, _tl) = subscriber("late-dashboard", broker.port(), &watch).await;
    let retained = next_status(&mut late).await;
    assert_eq!(retained.presence, Presence::Offline);
    assert_eq!(retained.device, "cam-01");
}
