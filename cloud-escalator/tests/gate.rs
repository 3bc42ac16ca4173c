//! Device identity end to end: certificates from the fleet CA (CSR signing), the mTLS gate in
//! front of the embedded broker with real rumqttc clients, and the generated Mosquitto
//! configuration and ACL with a real Mosquitto.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use cloud_escalator::gate::{self, GateLimits, GateStats, Upstream};
use cloud_escalator::mosquitto::{
    MosquittoFiles, MosquittoListener, mosquitto_acl, mosquitto_conf,
};
use cloud_escalator::pki::{DEFAULT_DEVICE_VALIDITY, FleetCa};
use edge_agent::connection::{mqtt_options, tls_config};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use tokio_util::sync::CancellationToken;

const FLEET: &str = "acme";
const WAIT: Duration = Duration::from_secs(5);
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(1500);

fn topic(device: &str, channel: &str) -> String {
    format!("cascade/v1/{FLEET}/{device}/{channel}")
}

/// A fleet CA in a temporary directory, and the files of the identities it issued.
struct Pki {
    dir: tempfile::TempDir,
    ca: FleetCa,
}

/// A certificate and key on disk, and the CA that the client trusts.
#[derive(Clone)]
struct Identity {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::open_or_create(&dir.path().join("ca"), FLEET).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.ca_pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn write(&self, name: &str, cert: &str, key: &str) -> Identity {
        let cert_path = self.dir.path().join(format!("{name}.pem"));
        let key_path = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        Identity {
            ca: self.ca_file(),
            cert: cert_path,
            key: key_path,
        }
    }

    /// A device certificate as enrollment makes it: the device's CSR, signed by the CA.
    fn device(&self, device: &str) -> Identity {
        let (key, csr) = edge_agent::enroll::device_csr(device).unwrap();
        let cert = self
            .ca
            .sign_device(&csr, device, DEFAULT_DEVICE_VALIDITY)
            .unwrap();
        self.write(device, &cert, &key)
    }

    fn device_between(&self, device: &str, from: SystemTime, to: SystemTime) -> Identity {
        let (key, csr) = edge_agent::enroll::device_csr(device).unwrap();
        let cert = self.ca.sign_device_between(&csr, device, from, to).unwrap();
        self.write(&format!("{device}-dated"), &cert, &key)
    }
}

/// The embedded broker behind a gate on free loopback ports.
struct Gated {
    gate: SocketAddr,
    broker: SocketAddr,
    stats: Arc<GateStats>,
    shutdown: CancellationToken,
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn gated(pki: &Pki) -> Gated {
    gated_with(pki, GateLimits::default()).await
}

async fn gated_with(pki: &Pki, limits: GateLimits) -> Gated {
    let v5: SocketAddr = (
        [127, 0, 0, 1],
        cloud_escalator::broker::free_local_port().unwrap(),
    )
        .into();
    let v311: SocketAddr = (
        [127, 0, 0, 1],
        cloud_escalator::broker::free_local_port().unwrap(),
    )
        .into();
    cloud_escalator::broker::start_with(Some(v5), Some(v311)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate = listener.local_addr().unwrap();
    let tls = gate::server_config(&pki.ca, &["127.0.0.1".to_string()]).unwrap();
    let stats = Arc::new(GateStats::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(gate::run(
        listener,
        Arc::new(tls),
        Upstream {
            v5,
            v311: Some(v311),
        },
        FLEET.to_string(),
        limits,
        stats.clone(),
        shutdown.clone(),
    ));
    Gated {
        gate,
        broker: v5,
        stats,
        shutdown,
    }
}

fn tls_options(client_id: &str, addr: SocketAddr, id: &Identity) -> MqttOptions {
    let tls = tls_config(&id.ca, Some((&id.cert, &id.key))).unwrap();
    let mut options = mqtt_options(
        client_id,
        &addr.ip().to_string(),
        addr.port(),
        Duration::from_secs(30),
        Some(Arc::new(tls)),
        1 << 20,
    );
    options.set_clean_start(true);
    options
}

/// What a client's event loop (polled in the background) received, until it failed.
type Events = tokio::sync::mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>;

/// Connects, polls the event loop in the background (rumqttc sends nothing unless polled), and
/// waits for the CONNACK: the client and its events, or why the connection failed.
async fn connect(options: MqttOptions) -> Result<(AsyncClient, Events), ConnectionError> {
    let (client, mut event_loop) = AsyncClient::new(options, 64);
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match event_loop.poll().await {
                Ok(Event::Incoming(p)) => {
                    let _ = tx.send(Ok(p));
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Err(_) | Ok(None) => panic!("no CONNACK and no error within {WAIT:?}"),
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(Packet::ConnAck(_)))) => return Ok((client, events)),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Waits until `want` says yes, or panics after [`WAIT`] or on a connection error.
async fn until(events: &mut Events, what: &str, mut want: impl FnMut(&Packet) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) | Ok(None) => panic!("timed out waiting for {what}"),
            Ok(Some(Err(e))) => panic!("connection failed waiting for {what}: {e}"),
            Ok(Some(Ok(p))) if want(&p) => return,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Waits until the connection ends; the error it ended with.
async fn closed(events: &mut Events) -> ConnectionError {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Err(_) | Ok(None) => panic!("still connected after {WAIT:?}"),
            Ok(Some(Err(e))) => return e,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Polls for [`QUIET`]; panics if a message on `topic` arrives.
async fn never(events: &mut Events, topic: &str) {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return,
            Ok(None) => panic!("the watcher's event loop ended"),
            Ok(Some(Err(e))) => panic!("watcher lost its connection: {e}"),
            Ok(Some(Ok(Packet::Publish(p)))) => {
                assert_ne!(
                    p.topic.as_ref(),
                    topic.as_bytes(),
                    "a refused message arrived"
                );
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn is_publish_on(p: &Packet, topic: &str) -> bool {
    matches!(p, Packet::Publish(p) if p.topic.as_ref() == topic.as_bytes())
}

fn is_suback(p: &Packet) -> bool {
    matches!(p, Packet::SubAck(_))
}

fn not_authorized(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::NotAuthorized,
            ..
        })
    )
}

/// A plain client straight on the broker (as the escalator is), watching the whole fleet. Keep
/// the client: dropping it ends the event loop.
async fn watcher(broker: SocketAddr, id: &str) -> (AsyncClient, Events) {
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = connect(options).await.unwrap();
    client
        .subscribe(format!("cascade/v1/{FLEET}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut events, "the watcher's SUBACK", is_suback).await;
    (client, events)
}

#[tokio::test]
async fn a_device_uses_its_own_topics_and_is_disconnected_for_anothers() {
    let pki = Pki::new();
    let gated = gated(&pki).await;
    let (_watcher, mut watch) = watcher(gated.broker, "watcher-1").await;
    let a = pki.device("device-a");

    // Its own topics: subscribe, publish, receive.
    let (client, mut events) = connect(tls_options("device-a", gated.gate, &a))
        .await
        .unwrap();
    client
        .subscribe(topic("device-a", "verdict"), QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut events, "device-a's SUBACK", is_suback).await;
    client
        .publish(
            topic("device-a", "escalate"),
            QoS::AtLeastOnce,
            false,
            "mine",
        )
        .await
        .unwrap();
    until(&mut watch, "device-a's escalation", |p| {
        is_publish_on(p, &topic("device-a", "escalate"))
    })
    .await;
    // And the broker's packets reach it through the gate.
    let (cloud, _cloud_events) = connect({
        let mut o = MqttOptions::new("cloud", "127.0.0.1", gated.broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    })
    .await
    .unwrap();
    cloud
        .publish(
            topic("device-a", "verdict"),
            QoS::AtLeastOnce,
            false,
            "answer",
        )
        .await
        .unwrap();
    until(&mut events, "device-a's verdict", |p| {
        is_publish_on(p, &topic("device-a", "verdict"))
    })
    .await;

    // Another device's topic: disconnected with "not authorized", and the message goes nowhere.
    client
        .publish(
            topic("device-b", "escalate"),
            QoS::AtLeastOnce,
            false,
            "not mine",
        )
        .await
        .unwrap();
    let e = closed(&mut events).await;
    assert!(not_authorized(&e), "expected a DISCONNECT 0x87, got {e:?}");
    never(&mut watch, &topic("device-b", "escalate")).await;
    assert_eq!(gated.stats.denied.load(Ordering::Relaxed), 1);

    // Subscribing to every device's verdicts: disconnected too.
    let (client, mut events) = connect(tls_options("device-a", gated.gate, &a))
        .await
        .unwrap();
    client
        .subscribe(format!("cascade/v1/{FLEET}/+/verdict"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let e = closed(&mut events).await;
    assert!(not_authorized(&e), "expected a DISCONNECT 0x87, got {e:?}");
    assert_eq!(gated.stats.denied.load(Ordering::Relaxed), 2);

    // A client id other than the certificate's CN: the CONNECT is refused.
    let Err(e) = connect(tls_options("device-b", gated.gate, &a)).await else {
        panic!("device-a connected with device-b's client id");
    };
    assert!(
        matches!(
            e,
            ConnectionError::ConnectionRefused(ConnectReturnCode::ClientIdentifierNotValid)
        ),
        "{e:?}"
    );
    assert_eq!(gated.stats.denied.load(Ordering::Relaxed), 3);
    assert_eq!(gated.stats.handshake_failures.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn unknown_expired_and_missing_certificates_fail_the_handshake() {
    let pki = Pki::new();
    let gated = gated(&pki).await;

    // Control: a good certificate connects.
    let good = pki.device("device-a");
    drop(
        connect(tls_options("device-a", gated.gate, &good))
            .await
            .unwrap(),
    );

    // Signed by another CA (even for the same fleet and device id).
    let other = Pki::new();
    let mut stranger = other.device("device-a");
    stranger.ca = pki.ca_file(); // it trusts the right server
    assert!(
        connect(tls_options("device-a", gated.gate, &stranger))
            .await
            .is_err()
    );

    // Expired yesterday.
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let expired = pki.device_between("device-a", now - 2 * day, now - day);
    assert!(
        connect(tls_options("device-a", gated.gate, &expired))
            .await
            .is_err()
    );

    // Not valid yet.
    let early = pki.device_between("device-a", now + day, now + 2 * day);
    assert!(
        connect(tls_options("device-a", gated.gate, &early))
            .await
            .is_err()
    );

    // No certificate at all.
    let anonymous = tls_config(&pki.ca_file(), None).unwrap();
    let mut options = tls_options("device-a", gated.gate, &good);
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(anonymous)),
    ));
    assert!(connect(options).await.is_err());

    // The gate saw four failed handshakes and let none through.
    let deadline = tokio::time::Instant::now() + WAIT;
    while gated.stats.handshake_failures.load(Ordering::Relaxed) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshake failures not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gated.stats.handshake_failures.load(Ordering::Relaxed), 4);
    assert_eq!(gated.stats.connected.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn clients_without_certificates_cannot_take_devices_slots() {
    let pki = Pki::new();
    let gated = gated_with(
        &pki,
        GateLimits {
            max_connections: 1,
            ..GateLimits::default()
        },
    )
    .await;
    // Sockets that never start a handshake hold no device slot.
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(tokio::net::TcpStream::connect(gated.gate).await.unwrap());
    }
    let a = pki.device("device-a");
    let (client, _events) = connect(tls_options("device-a", gated.gate, &a))
        .await
        .expect("device-a gets the one slot");
    // The slot is taken: a second device is turned away after its handshake.
    let b = pki.device("device-b");
    assert!(
        connect(tls_options("device-b", gated.gate, &b))
            .await
            .is_err()
    );
    // Freed when device-a leaves.
    client.disconnect().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match connect(tls_options("device-b", gated.gate, &b)).await {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "slot not freed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(idle);
}

#[tokio::test]
async fn mqtt_311_devices_are_confined_too() {
    use rumqttc::{AsyncClient, Event, Packet, QoS, TlsConfiguration, Transport};

    let pki = Pki::new();
    let gated = gated(&pki).await;
    let (_watcher, mut watch) = watcher(gated.broker, "watcher-3").await;
    let a = pki.device("device-a");
    let tls = tls_config(&a.ca, Some((&a.cert, &a.key))).unwrap();
    let mut options = rumqttc::MqttOptions::new("device-a", "127.0.0.1", gated.gate.port());
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .publish(topic("device-a", "status"), QoS::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    // Allowed: the broker acknowledges it and the watcher gets it.
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await.unwrap() {
            Ok(Event::Incoming(Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("3.1.1 device lost its connection: {e}"),
        }
    }
    until(&mut watch, "the 3.1.1 device's status", |p| {
        is_publish_on(p, &topic("device-a", "status"))
    })
    .await;
    // Another device's topic: the connection is closed (3.1.1 has no DISCONNECT from a server).
    client
        .publish(
            topic("device-b", "status"),
            QoS::AtLeastOnce,
            false,
            "not mine",
        )
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await.unwrap() {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                panic!("the refused publish was acknowledged")
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    never(&mut watch, &topic("device-b", "status")).await;
    assert_eq!(gated.stats.denied.load(Ordering::Relaxed), 1);
}

/// A Mosquitto process, killed on drop.
struct MosquittoProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for MosquittoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MosquittoProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn mosquitto_binary() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn start_mosquitto(binary: &Path, conf: &Path, log: PathBuf, ports: [u16; 2]) -> MosquittoProcess {
    let child = Command::new(binary)
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut process = MosquittoProcess { child, log };
    let deadline = std::time::Instant::now() + WAIT;
    for port in ports {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("mosquitto exited with {status}:\n{}", process.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto not listening:\n{}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    process
}

#[tokio::test]
async fn the_generated_mosquitto_configuration_confines_devices() {
    let Some(binary) = mosquitto_binary() else {
        println!("skipped: mosquitto is not installed (apt-get install mosquitto)");
        return;
    };
    let pki = Pki::new();
    let (server_cert, server_key) = pki.ca.issue_server(&["127.0.0.1".to_string()]).unwrap();
    let server = pki.write("server", &server_cert, &server_key);
    let (service_cert, service_key) = pki.ca.issue_service("escalator:acme").unwrap();
    let service = pki.write("service", &service_cert, &service_key);
    let acl_file = pki.dir.path().join("acme.acl");
    std::fs::write(
        &acl_file,
        mosquitto_acl(FLEET, &["escalator:acme"]).unwrap(),
    )
    .unwrap();
    let device_port = cloud_escalator::broker::free_local_port().unwrap();
    let service_port = cloud_escalator::broker::free_local_port().unwrap();
    let conf = mosquitto_conf(
        FLEET,
        &MosquittoFiles {
            cafile: &pki.ca_file(),
            certfile: &server.cert,
            keyfile: &server.key,
            acl_file: &acl_file,
        },
        MosquittoListener {
            port: device_port,
            bind: Some("127.0.0.1"),
        },
        Some(MosquittoListener {
            port: service_port,
            bind: Some("127.0.0.1"),
        }),
    )
    .unwrap();
    let conf_file = pki.dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf_file,
        format!("{conf}\npersistence false\nlog_dest stderr\nlog_type all\n"),
    )
    .unwrap();
    let broker = start_mosquitto(
        &binary,
        &conf_file,
        pki.dir.path().join("mosquitto.log"),
        [device_port, service_port],
    );
    let device_addr: SocketAddr = ([127, 0, 0, 1], device_port).into();
    let service_addr: SocketAddr = ([127, 0, 0, 1], service_port).into();

    // The escalator: a shared subscription to every escalation, and status.
    let (escalator, mut escalator_events) =
        connect(tls_options("escalator-1", service_addr, &service))
            .await
            .unwrap_or_else(|e| panic!("escalator refused: {e}\n{}", broker.log()));
    escalator
        .subscribe(
            format!("$share/escalators/cascade/v1/{FLEET}/+/escalate"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    until(&mut escalator_events, "the escalator's SUBACK", is_suback).await;

    let a = pki.device("device-a");
    let b = pki.device("device-b");
    // Unknown and expired certificates are refused, as by the gate.
    let other = Pki::new();
    let mut stranger = other.device("device-a");
    stranger.ca = pki.ca_file();
    assert!(
        connect(tls_options("device-a", device_addr, &stranger))
            .await
            .is_err()
    );
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let expired = pki.device_between("device-a", now - 2 * day, now - day);
    assert!(
        connect(tls_options("device-a", device_addr, &expired))
            .await
            .is_err()
    );

    let (device_a, mut a_events) = connect(tls_options("device-a", device_addr, &a))
        .await
        .unwrap_or_else(|e| panic!("device-a refused: {e}\n{}", broker.log()));
    let (device_b, mut b_events) = connect(tls_options("device-b", device_addr, &b))
        .await
        .unwrap_or_else(|e| panic!("device-b refused: {e}\n{}", broker.log()));
    device_b
        .subscribe(topic("device-b", "verdict"), QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut b_events, "device-b's SUBACK", is_suback).await;

    // Control first: device-a's own escalation reaches the escalator.
    device_a
        .publish(
            topic("device-a", "escalate"),
            QoS::AtLeastOnce,
            false,
            "mine",
        )
        .await
        .unwrap();
    until(&mut escalator_events, "device-a's escalation", |p| {
        is_publish_on(p, &topic("device-a", "escalate"))
    })
    .await;

    // device-a on device-b's topics: Mosquitto drops both (and keeps the connection).
    device_a
        .publish(
            topic("device-b", "escalate"),
            QoS::AtLeastOnce,
            false,
            "not mine",
        )
        .await
        .unwrap();
    device_a
        .publish(
            topic("device-b", "verdict"),
            QoS::AtLeastOnce,
            false,
            "forged",
        )
        .await
        .unwrap();
    // MQTT 5 tells the publisher: PUBACK "not authorized".
    for _ in 0..2 {
        until(
            &mut a_events,
            "PUBACK not authorized",
            |p| matches!(p, Packet::PubAck(ack) if ack.reason == PubAckReason::NotAuthorized),
        )
        .await;
    }
    never(&mut escalator_events, &topic("device-b", "escalate")).await;
    never(&mut b_events, &topic("device-b", "verdict")).await;

    // Control after: device-b's own escalation arrives, and the escalator's verdict reaches it.
    device_b
        .publish(
            topic("device-b", "escalate"),
            QoS::AtLeastOnce,
            false,
            "b's own",
        )
        .await
        .unwrap();
    until(&mut escalator_events, "device-b's escalation", |p| {
        is_publish_on(p, &topic("device-b", "escalate"))
    })
    .await;
    escalator
        .publish(
            topic("device-b", "verdict"),
            QoS::AtLeastOnce,
            false,
            "answer",
        )
        .await
        .unwrap();
    until(&mut b_events, "the escalator's verdict to device-b", |p| {
        is_publish_on(p, &topic("device-b", "verdict"))
    })
    .await;

    // A device subscribing to every device's verdicts: Mosquitto 2.0 grants the wildcard
    // subscription but checks each message against the ACL on delivery, so it gets nothing of
    // another device's.
    let (spy, mut spy_events) = connect(tls_options("device-a", device_addr, &a))
        .await
        .unwrap();
    spy.subscribe(format!("cascade/v1/{FLEET}/+/verdict"), QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut spy_events, "the spy's SUBACK", is_suback).await;
    escalator
        .publish(
            topic("device-b", "verdict"),
            QoS::AtLeastOnce,
            false,
            "second",
        )
        .await
        .unwrap();
    until(&mut b_events, "the second verdict to device-b", |p| {
        is_publish_on(p, &topic("device-b", "verdict"))
    })
    .await;
    never(&mut spy_events, &topic("device-b", "verdict")).await;
}
