//! Bad input reaching a running agent: unreadable and wrongly shaped files, garbage on the serial
//! line, the wrong TLS CA. Each is logged and counted; the agent keeps running.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use cascade_e2e::Mosquitto;
use cascade_e2e::fixtures::{agent_toml, digits, eventually, init_logs};
use cascade_proto::frame::{Frame, Hello, Samples, Unit, encode};
use edge_agent::agent::AgentHandle;
use edge_agent::config::AgentConfig;
use edge_agent::input::{ResultEvent, Stage};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// A broker address nobody listens on: these agents never get a connection, and need none.
fn nowhere() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("mqtt://127.0.0.1:{port}")
}

async fn start(config: &str) -> (AgentHandle, tokio::sync::mpsc::Receiver<ResultEvent>) {
    let config: AgentConfig = toml::from_str(config).unwrap();
    let mut agent = edge_agent::agent::start(config, CancellationToken::new())
        .await
        .expect("agent starts");
    let results = agent.take_results().unwrap();
    (agent, results)
}

async fn next_result(results: &mut tokio::sync::mpsc::Receiver<ResultEvent>) -> ResultEvent {
    tokio::time::timeout(Duration::from_secs(20), results.recv())
        .await
        .expect("a result in time")
        .expect("the agent is running")
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_and_misshapen_files_are_set_aside_and_counted() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let inbox = state.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(inbox.join("a-garbage.npy"), b"\x93NUMPY this is not one").unwrap();
    cascade_infer::Tensor::from_f32(&[1, 10], vec![0.0; 10])
        .unwrap()
        .write_npy(&inbox.join("b-ten-values.npy"))
        .unwrap();
    std::fs::write(inbox.join("c-broken.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    digits(1)[0].write_npy(&inbox.join("d-good.npy")).unwrap();
    let config = format!(
        "{}\n[sources.directory]\npath = {inbox:?}\npoll_ms = 20\n",
        agent_toml("files", &nowhere(), &state.path().join("agent"))
    );
    let (agent, mut results) = start(&config).await;

    let good = next_result(&mut results).await;
    assert_eq!(good.input, "d-good.npy");
    assert_eq!(good.stage, Stage::Edge);
    assert!(
        eventually(Duration::from_secs(10), || count(&inbox.join("failed"))
            == 3)
        .await
    );
    assert_eq!(agent.stats.errors.load(Relaxed), 3);
    assert!(
        eventually(Duration::from_secs(10), || count(&inbox.join("processed"))
            == 1)
        .await
    );

    // Still running: a later good file is classified.
    digits(2)[1].write_npy(&inbox.join("e-later.npy")).unwrap();
    assert_eq!(next_result(&mut results).await.input, "e-later.npy");
    assert!(agent.stop(Duration::from_secs(5)).await);
}

/// One `Samples` frame of the given values, as the firmware would send it.
fn samples(seq: u32, values: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = values
        .iter()
        .flat_map(|v| ((v * 1000.0).round() as i16).to_le_bytes())
        .collect();
    let mut buf = [0u8; 1024];
    encode(
        &Frame::Samples(Samples {
            seq,
            t_us: u64::from(seq) * 1000,
            channels: 1,
            scale: 0.001,
            data: &data,
        }),
        &mut buf,
    )
    .unwrap()
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_serial_line_is_dropped_and_windows_resume() {
    init_logs();
    let (mut firmware, agent_end) = tokio_serial::SerialStream::pair().expect("a pseudo-terminal");
    let tty = tokio_serial::SerialPort::name(&agent_end).expect("the pty's name");
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[sources.serial]\npath = {tty:?}\nbaud = 115200\n",
        agent_toml("serial", &nowhere(), &state.path().join("agent"))
    );
    let (agent, mut results) = start(&config).await;
    // The pty's other end must stay open while the agent reads it.
    let _keep = agent_end;

    let pixels: Vec<f32> = digits(2)
        .iter()
        .flat_map(|t| t.to_f32().iter().copied().collect::<Vec<_>>())
        .collect();
    let mut hello = [0u8; 128];
    let hello = encode(
        &Frame::Hello(Hello {
            firmware: "cascade-firmware test",
            sensor: "AMG8833",
            rate_hz: 10,
            channels: 1,
            scale: 0.001,
            unit: Unit::Celsius,
        }),
        &mut hello,
    )
    .unwrap()
    .to_vec();
    let mut line = hello;
    // First window (64 values) in four frames, garbage, then the second window in four frames.
    for (seq, chunk) in pixels[..64].chunks(16).enumerate() {
        line.extend(samples(seq as u32, chunk));
    }
    line.extend_from_slice(b"\x13\x37 line noise \xff\xfe\x00");
    for (seq, chunk) in pixels[64..].chunks(16).enumerate() {
        line.extend(samples(4 + seq as u32, chunk));
    }
    firmware.write_all(&line).await.unwrap();
    firmware.flush().await.unwrap();

    let first = next_result(&mut results).await;
    let second = next_result(&mut results).await;
    assert_eq!((first.stage, second.stage), (Stage::Edge, Stage::Edge));
    assert_eq!(
        (first.input.as_str(), second.input.as_str()),
        ("serial-1", "serial-2")
    );
    assert!(
        agent.stats.bad_frames.load(Relaxed) >= 1,
        "the garbage is counted"
    );

    // Each window is classified as the file input with the same values would be.
    let model = cascade_infer::load_path(&cascade_e2e::fixtures::edge_model(), &Default::default())
        .unwrap();
    let direct = model.run(vec![digits(1)[0].clone()]).unwrap();
    let meta =
        cascade_infer::metadata::Metadata::for_model(&cascade_e2e::fixtures::edge_model()).unwrap();
    let scores: Vec<f32> = direct[meta.scores_index(model.info()).unwrap()]
        .to_f32()
        .iter()
        .copied()
        .collect();
    let probabilities = meta.probabilities(&scores);
    let expected = cascade_infer::confidence::top_k(&probabilities, 1)[0].0 as u32;
    assert_eq!(first.class, Some(expected));

    // A lost frame restarts the window instead of mixing data across the hole.
    let mut gap = Vec::new();
    for (i, chunk) in pixels[..64].chunks(16).enumerate() {
        let seq = if i == 0 { 8 } else { 9 + i as u32 }; // frame 9 never comes
        gap.extend(samples(seq, chunk));
    }
    let before = agent.stats.bad_frames.load(Relaxed);
    firmware.write_all(&gap).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || agent
            .stats
            .bad_frames
            .load(Relaxed)
            > before)
        .await
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), results.recv())
            .await
            .is_err(),
        "no window spans the lost frame"
    );
    assert!(agent.stop(Duration::from_secs(5)).await);
}

/// A CA, and a certificate it signed for `names`, as PEM (certificate, key).
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    fn issue(&self, names: &[&str]) -> (String, String) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_ca_is_refused_and_counted_and_mutual_tls_works() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let fleet = Pki::new("cascade test fleet CA");
    let stranger = Pki::new("somebody else's CA");
    let ca = write("ca.pem", &fleet.ca.pem());
    let wrong_ca = write("wrong-ca.pem", &stranger.ca.pem());
    let (server_cert, server_key) = fleet.issue(&["127.0.0.1", "localhost"]);
    let (device_cert, device_key) = fleet.issue(&["tls-good"]);
    let (server_cert, server_key) = (
        write("server.pem", &server_cert),
        write("server.key", &server_key),
    );
    let (device_cert, device_key) = (
        write("device.pem", &device_cert),
        write("device.key", &device_key),
    );
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A TLS listener that demands a client certificate from the fleet CA, beside the plain one.
    let broker = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\n\
         cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        ca.display(),
        server_cert.display(),
        server_key.display()
    ))
    .expect("mosquitto with TLS");
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let agent_with = |device: &str, extra: String| {
        agent_toml(device, &url, &dir.path().join(device))
            .replace("[mqtt]\n", &format!("[mqtt]\n{extra}"))
    };

    // Watch the retained statuses on the plain listener.
    let mut options = rumqttc::v5::MqttOptions::new("watcher", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (watcher, mut events) = rumqttc::v5::AsyncClient::new(options, 64);
    watcher
        .subscribe(
            "cascade/v1/e2e/+/status",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) =
                event
            {
                let device = String::from_utf8_lossy(&p.topic)
                    .split('/')
                    .nth(3)
                    .unwrap_or_default()
                    .to_string();
                let _ = seen_tx.send(device);
            }
        }
    });

    let (wrong, mut wrong_results) = start(&agent_with(
        "tls-wrong-ca",
        format!("ca = {wrong_ca:?}\nclient_cert = {device_cert:?}\nclient_key = {device_key:?}\n"),
    ))
    .await;
    let (anonymous, _) = start(&agent_with("tls-no-cert", format!("ca = {ca:?}\n"))).await;
    let (good, _) = start(&agent_with(
        "tls-good",
        format!("ca = {ca:?}\nclient_cert = {device_cert:?}\nclient_key = {device_key:?}\n"),
    ))
    .await;

    let device = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the good agent's status arrives")
        .unwrap();
    assert_eq!(
        device, "tls-good",
        "only the agent with the right CA and certificate connects"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            wrong.stats.disconnects.load(Relaxed) >= 2
                && anonymous.stats.disconnects.load(Relaxed) >= 2
        })
        .await,
        "failed handshakes are counted: wrong CA {}, no certificate {}",
        wrong.stats.disconnects.load(Relaxed),
        anonymous.stats.disconnects.load(Relaxed)
    );
    assert_eq!(good.stats.disconnects.load(Relaxed), 0);
    // The agent without a broker still answers at the edge.
    wrong
        .inputs
        .send(edge_agent::input::InputItem::new("offline", digits(1)))
        .await
        .unwrap();
    assert_eq!(next_result(&mut wrong_results).await.input, "offline");
    // Statuses keep coming (refreshed every interval), all of them from the good agent.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(device)) = tokio::time::timeout_at(watch_until, seen.recv()).await {
        assert_eq!(device, "tls-good", "a status from a refused agent");
    }
    for agent in [wrong, anonymous, good] {
        assert!(agent.stop(Duration::from_secs(5)).await);
    }
}
