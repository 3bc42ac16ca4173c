//! The embedded MQTT broker (rumqttd), so one command runs the whole system.
//!
//! rumqttd serves on its own threads and has no stop: the embedded broker lives as long as the
//! process. Deployments that need more (persistence across restarts, clustering, a separate
//! life cycle) point the escalator at an external broker instead.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing listens on the address after start-up.
    #[error("embedded broker did not start listening on {0} within 5 s (address in use?)")]
    NotListening(SocketAddr),
    /// The broker's thread could not be started.
    #[error("cannot start the embedded broker's thread: {0}")]
    Thread(std::io::Error),
}

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    /// Where it listens for MQTT 5.
    pub listen: SocketAddr,
    /// Where it listens for MQTT 3.1.1, if it does.
    pub listen_v311: Option<SocketAddr>,
}

/// The largest MQTT packet the embedded broker accepts: the protocol's 1 MiB message limit plus
/// headroom for topic and properties.
pub const MAX_PACKET: usize = (1 << 20) + 4096;

/// Starts rumqttd with an MQTT 5 listener on `listen` (and an MQTT 3.1.1 one on `listen_v311`)
/// and waits until they accept connections.
pub fn start(
    listen: SocketAddr,
    listen_v311: Option<SocketAddr>,
) -> Result<EmbeddedBroker, BrokerError> {
    start_with(Some(listen), listen_v311).map(|(_, listen_v311)| EmbeddedBroker {
        listen,
        listen_v311,
    })
}

/// Starts rumqttd with an MQTT 5 listener, an MQTT 3.1.1 listener, or both, and waits until each
/// accepts connections. Returns the addresses (as given).
pub fn start_with(
    v5: Option<SocketAddr>,
    v311: Option<SocketAddr>,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>), BrokerError> {
    let server = |name: &str, listen: SocketAddr| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PACKET,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            // Messages read per round for a QoS 0 subscription, retained ones included: a fleet's
            // retained statuses (one per connection at most) must fit in one read, or the rest
            // are dropped on subscribing. It also bounds what one round queues for a slow
            // QoS 0 subscriber.
            max_outgoing_packet_count: 10_010,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v5: v5.map(|a| HashMap::from([("v5".to_string(), server("v5", a))])),
        v4: v311.map(|a| HashMap::from([("v311".to_string(), server("v311", a))])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("cascade-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    for (listen, protocol) in [(v5, "MQTT 5"), (v311, "MQTT 3.1.1")] {
        if let Some(listen) = listen {
            wait_listening(listen)?;
            tracing::info!(%listen, protocol, "embedded broker listening");
        }
    }
    Ok((v5, v311))
}

/// Waits until `listen` accepts connections, then disables Nagle on it.
fn wait_listening(listen: SocketAddr) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(listen).is_ok() {
            match set_nodelay_on_listener(listen) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%listen, "embedded broker's listener not found; TCP_NODELAY not set (expect ~40 ms per round trip)")
                }
                Err(e) => {
                    tracing::warn!(%listen, error = %e, "TCP_NODELAY not set on the embedded broker (expect ~40 ms per round trip)")
                }
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(listen))
}

/// Sets TCP_NODELAY on rumqttd's listening socket, found among this process's descriptors.
///
/// rumqttd 0.20 does not set TCP_NODELAY on the connections it accepts, so Nagle's algorithm
/// meets delayed ACKs and every request/response exchange through it waits ~40 ms (measured:
/// `cloud-escalator perf round-trip`, p50 44 ms without this, see docs/escalator.md). It offers
/// no hook on its listener or its accepted sockets, but Linux copies TCP_NODELAY from a listening
/// socket to every socket it accepts, so setting it once on the listener covers every connection.
/// Returns whether the listener was found.
#[allow(unsafe_code)]
fn set_nodelay_on_listener(listen: SocketAddr) -> std::io::Result<bool> {
    use std::os::fd::{BorrowedFd, RawFd};
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the calls below, which query or set socket
        // options and fail harmlessly on anything that is not a socket. rumqttd's listener is
        // never closed; another descriptor closed meanwhile makes the calls fail, nothing worse.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let is_it = socket.is_listener().unwrap_or(false)
            && socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a == listen);
        if is_it {
            socket.set_tcp_nodelay(true)?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// A port on 127.0.0.1 that was free a moment ago (rumqttd cannot report the port it bound to 0).
pub fn free_local_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TCP_NODELAY setting of the broker's end of the connection whose client end is `client`
    /// (rumqttd runs in this process, so that socket is one of ours).
    #[allow(unsafe_code)]
    fn server_side_nodelay(client: &TcpStream) -> Option<bool> {
        use std::os::fd::{BorrowedFd, RawFd};
        let client_addr = client.local_addr().ok()?;
        for entry in std::fs::read_dir("/proc/self/fd").ok()? {
            let fd: RawFd = entry.ok()?.file_name().to_str()?.parse().ok()?;
            // SAFETY: as in set_nodelay_on_listener: borrowed only to read socket options.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = socket2::SockRef::from(&fd);
            if socket.peer_addr().ok().and_then(|a| a.as_socket()) == Some(client_addr) {
                return socket.tcp_nodelay().ok();
            }
        }
        None
    }

    /// Write system calls made by this thread (Linux task I/O accounting).
    fn writes_by_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io")
            .expect("counting writes needs /proc/thread-self/io (Linux task I/O accounting)");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// How many publishes the tests below queue while the client's event loop is not polled.
    const QUEUED: usize = 50;

    /// The write system calls an MQTT 5 client's event loop makes to send [`QUEUED`] publishes
    /// queued together. The event loop runs on this thread alone (a current-thread runtime); the
    /// broker's own threads are not counted.
    async fn v5_writes_for_queued_publishes(broker: SocketAddr) -> u64 {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let options = MqttOptions::new("writes-v5", "127.0.0.1", broker.port());
        let (client, mut eventloop) = AsyncClient::new(options, QUEUED);
        while !matches!(
            eventloop.poll().await,
            Ok(Event::Incoming(Packet::ConnAck(_)))
        ) {}
        let before = writes_by_this_thread();
        for i in 0..QUEUED {
            client
                .try_publish(
                    "cascade/writes",
                    QoS::AtLeastOnce,
                    false,
                    vec![i as u8; 100],
                )
                .unwrap();
        }
        let mut sent = 0;
        while sent < QUEUED {
            if let Event::Outgoing(rumqttc::Outgoing::Publish(_)) = eventloop.poll().await.unwrap()
            {
                sent += 1;
            }
        }
        writes_by_this_thread() - before
    }

    /// [`v5_writes_for_queued_publishes`] for an MQTT 3.1.1 client (rumqttc's other event loop).
    async fn v311_writes_for_queued_publishes(broker: SocketAddr) -> u64 {
        use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
        let options = MqttOptions::new("writes-v311", "127.0.0.1", broker.port());
        let (client, mut eventloop) = AsyncClient::new(options, QUEUED);
        while !matches!(
            eventloop.poll().await,
            Ok(Event::Incoming(Packet::ConnAck(_)))
        ) {}
        let before = writes_by_this_thread();
        for i in 0..QUEUED {
            client
                .try_publish(
                    "cascade/writes",
                    QoS::AtLeastOnce,
                    false,
                    vec![i as u8; 100],
                )
                .unwrap();
        }
        let mut sent = 0;
        while sent < QUEUED {
            if let Event::Outgoing(Outgoing::Publish(_)) = eventloop.poll().await.unwrap() {
                sent += 1;
            }
        }
        writes_by_this_thread() - before
    }

    /// The escalator answers a batch with a burst of verdicts and acknowledgements. Upstream
    /// rumqttc 0.25.1 writes (and so sends through the TCP stack) each request on its own; the
    /// patched copy in vendor/rumqttc writes what is queued in one go. One write is expected;
    /// two leave room for a flush the socket did not take whole.
    #[tokio::test]
    async fn requests_queued_together_leave_the_client_in_one_write() {
        let (v5, v311) = start_with(
            Some(([127, 0, 0, 1], free_local_port().unwrap()).into()),
            Some(([127, 0, 0, 1], free_local_port().unwrap()).into()),
        )
        .unwrap();
        let writes = tokio::time::timeout(Duration::from_secs(20), async {
            (
                v5_writes_for_queued_publishes(v5.unwrap()).await,
                v311_writes_for_queued_publishes(v311.unwrap()).await,
            )
        })
        .await
        .expect("publishes sent within 20 s");
        assert!(
            writes.0 <= 2 && writes.1 <= 2,
            "{QUEUED} queued publishes took {} writes on MQTT 5 and {} on 3.1.1; \
             is vendor/rumqttc's patch (CASCADE-PATCH.md) in use?",
            writes.0,
            writes.1
        );
    }

    #[test]
    fn connections_to_the_embedded_broker_have_nagle_disabled() {
        let port = free_local_port().unwrap();
        let broker = start(([127, 0, 0, 1], port).into(), None).unwrap();
        let client = TcpStream::connect(broker.listen).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = None;
        while seen.is_none() && Instant::now() < deadline {
            seen = server_side_nodelay(&client);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            seen,
            Some(true),
            "the broker's accepted socket must have TCP_NODELAY"
        );
    }
}
