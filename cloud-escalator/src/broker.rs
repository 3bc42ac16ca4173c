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
}

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    /// Where it listens (MQTT 5).
    pub listen: SocketAddr,
}

/// The largest MQTT packet the embedded broker accepts: the protocol's 1 MiB message limit plus
/// headroom for topic and properties.
pub const MAX_PACKET: usize = (1 << 20) + 4096;

/// Starts rumqttd with one MQTT 5 listener on `listen` and waits until it accepts connections.
pub fn start(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
    let server = ServerSettings {
        name: "v5".into(),
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
            max_outgoing_packet_count: 500,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v5: Some(HashMap::from([("v5".to_string(), server)])),
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
        .map_err(|_| BrokerError::NotListening(listen))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(listen).is_ok() {
            tracing::info!(%listen, "embedded broker listening (MQTT 5)");
            return Ok(EmbeddedBroker { listen });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(listen))
}

/// A port on 127.0.0.1 that was free a moment ago (rumqttd cannot report the port it bound to 0).
pub fn free_local_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}
