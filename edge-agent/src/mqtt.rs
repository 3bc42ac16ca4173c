//! One MQTT connection that speaks MQTT 5 where the broker does, and MQTT 3.1.1 where it does not.
//!
//! rumqttc has a separate client per protocol version with its own types. [`Session`] holds one of
//! the two and offers what Cascade's clients need from either: publish (with MQTT 5 properties,
//! dropped on 3.1.1), subscribe, disconnect, and a [`poll`](Session::poll) that maps both event
//! streams onto [`SessionEvent`].
//!
//! In [`Protocol::Auto`] the session starts with MQTT 5. While it has never been connected, a
//! connection that fails at the MQTT level (the broker refuses the protocol version, or closes
//! the connection after reading a CONNECT it does not understand) makes it try the other version
//! next; a TCP or TLS failure does not, since it says nothing about the protocol. Once a version
//! has connected the session stays with it.
//!
//! What MQTT 3.1.1 costs Cascade: no response topic, correlation data or message expiry on
//! escalations (the escalator answers on the device's verdict topic and matches by escalation id,
//! so nothing is lost but interoperability with generic MQTT 5 responders), and no shared
//! subscriptions for escalator replicas.

use std::io;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::Deserialize;

/// Which MQTT version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    /// MQTT 5, falling back to 3.1.1 when the broker does not speak 5.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// MQTT 5 only.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1 only.
    #[serde(rename = "3.1.1")]
    V311,
}

/// The protocol versions, as named in logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 5.
    V5,
    /// MQTT 3.1.1.
    V311,
}

impl MqttVersion {
    /// `5` or `3.1.1`.
    pub fn name(self) -> &'static str {
        match self {
            MqttVersion::V5 => "5",
            MqttVersion::V311 => "3.1.1",
        }
    }
}

/// The session's own registration of a last will (retained, QoS 1).
#[derive(Debug, Clone)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A message received on a subscribed topic, with what is needed to answer and acknowledge it.
#[derive(Debug)]
pub struct Incoming {
    /// Its topic.
    pub topic: Bytes,
    /// Its payload.
    pub payload: Bytes,
    /// MQTT 5 response topic, when the sender set one.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, when the sender set it.
    pub correlation: Option<Bytes>,
    /// MQTT 5 message expiry, seconds left, when the sender set one.
    pub expiry_s: Option<u32>,
    /// Acknowledges the message, for sessions with manual acknowledgements.
    pub ack: Ack,
}

/// What [`Session::poll`] saw.
#[derive(Debug)]
pub enum SessionEvent {
    /// The broker accepted the connection.
    Connected {
        /// Whether the broker kept a session (and so the subscriptions) for this client.
        session_present: bool,
        /// The version spoken.
        version: MqttVersion,
    },
    /// A message on a subscribed topic.
    Message(Incoming),
    /// Our DISCONNECT went out.
    Disconnected,
    /// The connection failed or was lost; poll again (after a backoff) to reconnect.
    Lost(String),
    /// Anything else (acknowledgements, pings).
    Other,
}

/// What acknowledges one received message ([`Session::try_ack`]).
#[derive(Debug, Clone)]
pub struct Ack(AckInner);

#[derive(Debug, Clone)]
enum AckInner {
    V5(Box<v5::mqttbytes::v5::Publish>),
    V311(Box<rumqttc::Publish>),
}

enum Connection {
    V5(v5::AsyncClient, Box<v5::EventLoop>),
    V311(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
}

/// An MQTT connection of either version. One task owns it.
pub struct Session {
    protocol: Protocol,
    v5: v5::MqttOptions,
    v311: rumqttc::MqttOptions,
    network: rumqttc::NetworkOptions,
    capacity: usize,
    connection: Connection,
    connected_once: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("protocol", &self.protocol)
            .field("version", &self.version())
            .field("connected_once", &self.connected_once)
            .finish()
    }
}

impl Session {
    /// A session from MQTT 5 options (address, TLS, keep-alive, session expiry, network options);
    /// the 3.1.1 options are derived from them. `will` is registered with either version.
    /// `capacity` bounds the client's request queue.
    pub fn new(
        protocol: Protocol,
        mut v5_options: v5::MqttOptions,
        will: Option<Will>,
        capacity: usize,
    ) -> Self {
        let network = v5_options.network_options();
        let (host, port) = v5_options.broker_address();
        let mut v311 = rumqttc::MqttOptions::new(v5_options.client_id(), host, port);
        v311.set_keep_alive(v5_options.keep_alive());
        v311.set_clean_session(v5_options.clean_start());
        let max = v5_options.max_packet_size().map_or(1 << 20, |m| m as usize);
        v311.set_max_packet_size(max, max);
        v311.set_transport(v5_options.transport());
        v311.set_manual_acks(v5_options.manual_acks());
        v311.set_inflight(
            v5_options
                .get_outgoing_inflight_upper_limit()
                .unwrap_or(crate::connection::DEFAULT_INFLIGHT),
        );
        v311.set_request_channel_capacity(v5_options.request_channel_capacity());
        if let Some(will) = will {
            v5_options.set_last_will(v5::mqttbytes::v5::LastWill::new(
                will.topic.clone(),
                will.payload.clone(),
                v5::mqttbytes::QoS::AtLeastOnce,
                true,
                None,
            ));
            v311.set_last_will(rumqttc::LastWill::new(
                will.topic,
                will.payload,
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
        }
        if let Some(login) = v5_options.credentials() {
            v311.set_credentials(login.username, login.password);
        }
        let first = match protocol {
            Protocol::V311 => MqttVersion::V311,
            Protocol::Auto | Protocol::V5 => MqttVersion::V5,
        };
        let connection = connect(first, &v5_options, &v311, &network, capacity);
        Session {
            protocol,
            v5: v5_options,
            v311,
            network,
            capacity,
            connection,
            connected_once: false,
        }
    }

    /// The version this session speaks (or is trying).
    pub fn version(&self) -> MqttVersion {
        match self.connection {
            Connection::V5(..) => MqttVersion::V5,
            Connection::V311(..) => MqttVersion::V311,
        }
    }

    /// Waits for the next event; reconnects on the poll after a [`SessionEvent::Lost`].
    pub async fn poll(&mut self) -> SessionEvent {
        let (event, protocol_level_failure) = match &mut self.connection {
            Connection::V5(_, eventloop) => match eventloop.poll().await {
                Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::ConnAck(ack))) => (
                    SessionEvent::Connected {
                        session_present: ack.session_present,
                        version: MqttVersion::V5,
                    },
                    false,
                ),
                Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p))) => {
                    let properties = p.properties.clone().unwrap_or_default();
                    (
                        SessionEvent::Message(Incoming {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            response_topic: properties.response_topic,
                            correlation: properties.correlation_data,
                            expiry_s: properties.message_expiry_interval,
                            ack: Ack(AckInner::V5(Box::new(p))),
                        }),
                        false,
                    )
                }
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                    (SessionEvent::Disconnected, false)
                }
                Ok(_) => (SessionEvent::Other, false),
                Err(e) => {
                    let protocol_level = v5_failure_is_protocol_level(&e);
                    (SessionEvent::Lost(e.to_string()), protocol_level)
                }
            },
            Connection::V311(_, eventloop) => match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => (
                    SessionEvent::Connected {
                        session_present: ack.session_present,
                        version: MqttVersion::V311,
                    },
                    false,
                ),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => (
                    SessionEvent::Message(Incoming {
                        topic: Bytes::from(p.topic.clone().into_bytes()),
                        payload: p.payload.clone(),
                        response_topic: None,
                        correlation: None,
                        expiry_s: None,
                        ack: Ack(AckInner::V311(Box::new(p))),
                    }),
                    false,
                ),
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                    (SessionEvent::Disconnected, false)
                }
                Ok(_) => (SessionEvent::Other, false),
                Err(e) => {
                    let protocol_level = v311_failure_is_protocol_level(&e);
                    (SessionEvent::Lost(e.to_string()), protocol_level)
                }
            },
        };
        match &event {
            SessionEvent::Connected { version, .. } => {
                if !self.connected_once
                    && self.protocol == Protocol::Auto
                    && *version == MqttVersion::V311
                {
                    tracing::warn!(
                        "the broker does not speak MQTT 5; using MQTT 3.1.1 (escalations carry no \
                         response topic, correlation data or expiry)"
                    );
                }
                self.connected_once = true;
            }
            SessionEvent::Lost(reason)
                if protocol_level_failure
                    && !self.connected_once
                    && self.protocol == Protocol::Auto =>
            {
                let next = match self.version() {
                    MqttVersion::V5 => MqttVersion::V311,
                    MqttVersion::V311 => MqttVersion::V5,
                };
                tracing::info!(
                    error = %reason,
                    tried = self.version().name(),
                    next = next.name(),
                    "broker refused the connection at the MQTT level; trying the other protocol version"
                );
                self.connection = connect(next, &self.v5, &self.v311, &self.network, self.capacity);
            }
            _ => {}
        }
        event
    }

    /// Queues a QoS 1 publish; `properties` are sent on MQTT 5 and dropped on 3.1.1. False when the
    /// client's request queue is full (try again after polling).
    pub fn try_publish(
        &self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        properties: Option<&PublishProperties>,
    ) -> bool {
        match &self.connection {
            Connection::V5(client, _) => match properties {
                Some(p) => client.try_publish_with_properties(
                    topic.to_owned(),
                    v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                    p.clone(),
                ),
                None => client.try_publish(
                    topic.to_owned(),
                    v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                ),
            }
            .is_ok(),
            Connection::V311(client, _) => client
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .is_ok(),
        }
    }

    /// Queues a QoS 1 subscription.
    pub fn try_subscribe(&self, filter: &str) -> bool {
        match &self.connection {
            Connection::V5(client, _) => client
                .try_subscribe(filter.to_owned(), v5::mqttbytes::QoS::AtLeastOnce)
                .is_ok(),
            Connection::V311(client, _) => client
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .is_ok(),
        }
    }

    /// Queues a subscription at QoS 0: for state that is republished anyway (retained statuses),
    /// where a lost message costs nothing. The embedded broker (rumqttd 0.20) delivers at most 100
    /// retained messages to a new QoS 1 subscription (its in-flight window) and drops the rest;
    /// at QoS 0 it delivers them all.
    pub fn try_subscribe_at_most_once(&self, filter: &str) -> bool {
        match &self.connection {
            Connection::V5(client, _) => client
                .try_subscribe(filter.to_owned(), v5::mqttbytes::QoS::AtMostOnce)
                .is_ok(),
            Connection::V311(client, _) => client
                .try_subscribe(filter, rumqttc::QoS::AtMostOnce)
                .is_ok(),
        }
    }

    /// Sends DISCONNECT and waits up to `grace` for it to go out (a clean stop: the broker does
    /// not publish the last will).
    pub async fn disconnect(&mut self, grace: std::time::Duration) {
        self.try_disconnect();
        let _ = tokio::time::timeout(grace, async {
            while !matches!(
                self.poll().await,
                SessionEvent::Disconnected | SessionEvent::Lost(_)
            ) {}
        })
        .await;
    }

    /// Queues the acknowledgement of a received message (sessions with manual acknowledgements).
    pub fn try_ack(&self, ack: &Ack) -> bool {
        match (&self.connection, &ack.0) {
            (Connection::V5(client, _), AckInner::V5(p)) => client.try_ack(p).is_ok(),
            (Connection::V311(client, _), AckInner::V311(p)) => client.try_ack(p).is_ok(),
            // A message from before a protocol switch: that connection, and its packet ids,
            // are gone; the broker redelivers.
            _ => false,
        }
    }

    /// Queues a DISCONNECT.
    pub fn try_disconnect(&self) {
        let _ = match &self.connection {
            Connection::V5(client, _) => client.try_disconnect().is_ok(),
            Connection::V311(client, _) => client.try_disconnect().is_ok(),
        };
    }
}

/// A client and event loop for `version`; nothing connects until the event loop is polled.
fn connect(
    version: MqttVersion,
    v5_options: &v5::MqttOptions,
    v311: &rumqttc::MqttOptions,
    network: &rumqttc::NetworkOptions,
    capacity: usize,
) -> Connection {
    match version {
        MqttVersion::V5 => {
            let (client, eventloop) = v5::AsyncClient::new(v5_options.clone(), capacity);
            Connection::V5(client, Box::new(eventloop))
        }
        MqttVersion::V311 => {
            let (client, mut eventloop) = rumqttc::AsyncClient::new(v311.clone(), capacity);
            // 3.1.1 keeps network options (TCP_NODELAY, timeouts) on the event loop.
            eventloop.set_network_options(network.clone());
            Connection::V311(client, Box::new(eventloop))
        }
    }
}

/// Failures that happen only after TCP (and TLS) are up, when the broker answered our CONNECT:
/// it refused the protocol version, sent something that is not a CONNACK we can read, or hung up.
fn v5_failure_is_protocol_level(e: &v5::ConnectionError) -> bool {
    use v5::mqttbytes::v5::ConnectReturnCode as Code;
    match e {
        v5::ConnectionError::ConnectionRefused(
            Code::RefusedProtocolVersion | Code::UnsupportedProtocolVersion | Code::ProtocolError,
        ) => true,
        v5::ConnectionError::MqttState(_) | v5::ConnectionError::NotConnAck(_) => true,
        v5::ConnectionError::Io(e) => closed_by_peer(e),
        _ => false,
    }
}

fn v311_failure_is_protocol_level(e: &rumqttc::ConnectionError) -> bool {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::RefusedProtocolVersion,
        ) => true,
        rumqttc::ConnectionError::MqttState(_) | rumqttc::ConnectionError::NotConnAck(_) => true,
        rumqttc::ConnectionError::Io(e) => closed_by_peer(e),
        _ => false,
    }
}

fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
