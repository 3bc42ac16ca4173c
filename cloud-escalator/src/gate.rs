//! The device gate: mutual TLS and per-device topic ACLs in front of the embedded broker.
//!
//! Devices connect to the gate with a client certificate signed by the fleet CA
//! ([`crate::pki::FleetCa`]); the handshake fails for an unknown or expired certificate. The
//! certificate's CN is the device id, and the gate confines the connection to the device's own
//! topics, `cascade/v1/{fleet}/{device}/…`:
//!
//! - the CONNECT's client id must be the device id (so no device can take over another's
//!   session), and its will topic, if any, must be under the device's prefix;
//! - every PUBLISH topic must be under the prefix; a PUBLISH with an empty topic (an MQTT 5
//!   topic-alias-only publish, whose real topic the gate would have to track) is refused;
//! - every SUBSCRIBE filter must be under the prefix: `cascade/v1/{fleet}/{device}/#` is fine,
//!   `cascade/v1/{fleet}/+/verdict` or `#` are not;
//! - a packet larger than [`GateLimits::max_packet`] is refused as soon as its header says so.
//!
//! A violation is logged (device, rule, topic), counted ([`GateStats`] and the
//! `cascade_gate_denied_total{rule}` metric), and closes the connection: an MQTT 5 client first
//! gets a DISCONNECT (reason 0x87 *Not authorized*; a refused CONNECT gets a CONNACK with a reason
//! instead), an MQTT 3.1.1 client is just disconnected (after a refusing CONNACK for a CONNECT).
//! Packets that pass are forwarded byte for byte to the broker's loopback listener; the broker's
//! packets go back to the device unparsed (only their framing is followed, so a DISCONNECT is
//! never written into the middle of one).
//!
//! Why hand-written: rumqttd 0.20, the embedded broker, authenticates at CONNECT at most (a user
//! name and password table or an `external_auth` callback) and has no hook on PUBLISH or
//! SUBSCRIBE. Its only topic confinement, the tenant feature, derives a tenant from the client
//! certificate and forces every topic under `/tenants/{tenant}/`, which does not fit Cascade's
//! scheme. So the gate frames the client's byte stream itself ([`PacketFilter`], pure and
//! I/O-free) and parses just the three packet types that carry topics: CONNECT, PUBLISH (only up to
//! its topic: payloads stream through without being buffered) and SUBSCRIBE. With Mosquitto the
//! broker does all of this itself ([`crate::mosquitto`]).
//!
//! The broker's plain listener must then be reachable from the gate (and the escalator) only: bind
//! it to loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cascade_proto::topic::{Segment, validate_segment};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pki::{FleetCa, PkiError};

/// The gate's TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The server certificate could not be issued.
    #[error("cannot issue the gate's server certificate: {0}")]
    Pki(#[from] PkiError),
    /// A PEM text from the CA does not parse (a bug, or a damaged ca.pem).
    #[error("cannot read the CA's PEM: {0} (check ca.pem in the CA directory)")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Tls(#[from] rustls::Error),
}

/// Bounds on the gate's connections.
#[derive(Debug, Clone)]
pub struct GateLimits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Largest MQTT packet (fixed header included) a device may send.
    pub max_packet: usize,
    /// Time for the TLS handshake and the CONNECT packet together.
    pub connect_timeout: Duration,
}

impl Default for GateLimits {
    fn default() -> Self {
        GateLimits {
            // The embedded broker's own limit is 10 010 connections, ten left for the cloud side.
            max_connections: 10_000,
            max_packet: crate::broker::MAX_PACKET,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The gate's counters, shared with whoever wants to read them (tests, a status page).
#[derive(Debug, Default)]
pub struct GateStats {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// TLS handshakes refused or timed out (unknown, expired or missing certificates).
    pub handshake_failures: AtomicU64,
    /// Certificates accepted by TLS whose CN is not a usable device id.
    pub bad_identities: AtomicU64,
    /// Devices whose CONNECT was forwarded to the broker.
    pub connected: AtomicU64,
    /// Connections closed for breaking a rule (see [`Rule`]).
    pub denied: AtomicU64,
    /// Connections being served now.
    pub active: AtomicU64,
}

impl GateStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A rustls server configuration for the gate: a server certificate for `names` issued by `ca`
/// now, and client certificates required and verified against `ca` alone (so a certificate from
/// another CA, an expired one, or none fails the handshake).
pub fn server_config(ca: &FleetCa, names: &[String]) -> Result<rustls::ServerConfig, GateError> {
    let (cert_pem, key_pem) = ca.issue_server(names)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.ca_pem().as_bytes()) {
        roots.add(cert.map_err(|e| GateError::Pem(e.to_string()))?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| GateError::Pem(e.to_string()))?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| GateError::Pem(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| GateError::Pem(e.to_string()))?
        .ok_or_else(|| GateError::Pem("no private key in the issued server key".into()))?;
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?)
}

/// The device id a client certificate names: its only CN, if that is a valid device id.
pub fn device_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?;
    if names.next().is_some() || validate_segment(Segment::Device, cn).is_err() {
        return None;
    }
    Some(cn.to_string())
}

/// Where the gate forwards devices: the embedded broker's plain listeners (loopback).
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    /// The MQTT 5 listener.
    pub v5: SocketAddr,
    /// The MQTT 3.1.1 listener, if the broker has one (rumqttd serves each version on its own
    /// port); without it, 3.1.1 devices are refused with "unacceptable protocol version".
    pub v311: Option<SocketAddr>,
}

/// Serves devices on `listener` (TLS with `tls`, which should come from [`server_config`]) and
/// forwards what they may send to the broker at `upstream` (the listener for the protocol version
/// each device's CONNECT asks for), until `shutdown`; then closes every connection and returns
/// once they are all closed.
pub async fn run(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    upstream: Upstream,
    fleet: String,
    limits: GateLimits,
    stats: Arc<GateStats>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        acceptor: TlsAcceptor::from(tls),
        upstream,
        fleet,
        limits,
        stats,
    });
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, upstream = %upstream.v5, upstream_v311 = ?upstream.v311, fleet = %shared.fleet, "device gate listening");
    }
    // Handshakes have a small budget of their own, and a connection takes one of the
    // `max_connections` slots only once its certificate holds: clients without a certificate
    // can hold at most HANDSHAKES sockets, each for at most `connect_timeout`, never a device's
    // slot.
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = handshakes.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // closed: never happens, the semaphore is ours
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, usually: wait a little instead of spinning.
                    tracing::warn!(error = %e, "gate cannot accept a connection");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        GateStats::bump(&shared.stats.accepted);
        metrics::counter!("cascade_gate_connections_total").increment(1);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            shared.stats.active.fetch_add(1, Ordering::Relaxed);
            serve(tcp, peer, &shared, &shutdown, permit).await;
            shared.stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Concurrent TLS handshakes at most.
const HANDSHAKES: usize = 256;

/// What every connection task needs.
struct Shared {
    /// Established device connections, `max_connections` at most.
    slots: Arc<Semaphore>,
    acceptor: TlsAcceptor,
    upstream: Upstream,
    fleet: String,
    limits: GateLimits,
    stats: Arc<GateStats>,
}

impl Shared {
    fn denied(&self, device: &str, peer: SocketAddr, violation: &Violation) {
        GateStats::bump(&self.stats.denied);
        metrics::counter!("cascade_gate_denied_total", "rule" => violation.rule.name())
            .increment(1);
        tracing::warn!(
            device,
            %peer,
            rule = violation.rule.name(),
            topic = %violation.detail,
            "gate refused a packet and closed the connection"
        );
    }
}

/// How long the gate waits for a refusal to be written and the TLS session closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer per direction. Small because it is per connection (10 000 devices: 80 MiB);
/// rustls already holds whole TLS records, so a small read costs only another call.
const BUFFER: usize = 4 * 1024;

/// Closes a TLS stream after writing `reply`, without waiting long on a peer that does not read.
async fn close<S: AsyncWrite + Unpin>(stream: &mut S, reply: Option<&[u8]>) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if let Some(reply) = reply {
            stream.write_all(reply).await?;
        }
        stream.shutdown().await
    })
    .await;
}

/// One device connection: handshake, CONNECT, then both directions until either side closes,
/// a rule is broken, or `shutdown`.
async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: &CancellationToken,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
) {
    // Nagle's algorithm against delayed ACKs costs ~40 ms per request/response exchange.
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + shared.limits.connect_timeout;
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        handshake = tokio::time::timeout_at(deadline, shared.acceptor.accept(tcp)) => handshake,
    };
    let mut tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            GateStats::bump(&shared.stats.handshake_failures);
            metrics::counter!("cascade_gate_handshake_failures_total").increment(1);
            tracing::warn!(%peer, error = %e, "gate refused a TLS handshake (unknown, expired or missing client certificate?)");
            return;
        }
        Err(_) => {
            GateStats::bump(&shared.stats.handshake_failures);
            metrics::counter!("cascade_gate_handshake_failures_total").increment(1);
            tracing::warn!(%peer, "gate: TLS handshake timed out");
            return;
        }
    };
    drop(handshake_permit);
    let Ok(_slot) = shared.slots.clone().try_acquire_owned() else {
        tracing::warn!(%peer, max = shared.limits.max_connections, "gate full: connection closed");
        close(&mut tls, None).await;
        return;
    };
    let device = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(device_id);
    let Some(device) = device else {
        GateStats::bump(&shared.stats.bad_identities);
        tracing::warn!(%peer, "gate: the client certificate's CN is not a device id; closed");
        close(&mut tls, None).await;
        return;
    };

    // Until the CONNECT passes, nothing reaches the broker.
    let mut filter = PacketFilter::new(&shared.fleet, &device, shared.limits.max_packet);
    let mut buf = vec![0u8; BUFFER];
    let mut out = Vec::new();
    while out.is_empty() {
        let read = tokio::select! {
            _ = shutdown.cancelled() => return close(&mut tls, None).await,
            read = tokio::time::timeout_at(deadline, tls.read(&mut buf)) => read,
        };
        let n = match read {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
            Err(_) => {
                tracing::warn!(device, %peer, "gate: no CONNECT in time; closed");
                return close(&mut tls, None).await;
            }
        };
        if let Err(violation) = filter.feed(&buf[..n], &mut out) {
            shared.denied(&device, peer, &violation);
            return close(&mut tls, filter.refusal(&violation).as_deref()).await;
        }
    }

    let upstream = match filter.protocol() {
        Some(Protocol::V311) => shared.upstream.v311,
        _ => Some(shared.upstream.v5),
    };
    let Some(upstream) = upstream else {
        tracing::warn!(device, %peer, "gate: an MQTT 3.1.1 device, and the broker has no 3.1.1 listener; refused");
        return close(&mut tls, Some(&[0x20, 0x02, 0x00, 0x01])).await;
    };
    let broker = match TcpStream::connect(upstream).await {
        Ok(broker) => broker,
        Err(e) => {
            tracing::error!(device, %upstream, error = %e, "gate cannot reach the broker");
            return close(&mut tls, filter.unavailable().as_deref()).await;
        }
    };
    let _ = broker.set_nodelay(true);
    let (mut broker_r, mut broker_w) = broker.into_split();
    if broker_w.write_all(&out).await.is_err() {
        return close(&mut tls, filter.unavailable().as_deref()).await;
    }
    out.clear();
    GateStats::bump(&shared.stats.connected);
    tracing::debug!(device, %peer, "gate: device connected");

    let (mut client_r, mut client_w) = tokio::io::split(tls);
    // Up tells down to stop, with what to say to the client, when it ends first.
    let (stop_tx, stop_rx) = oneshot::channel::<Option<Vec<u8>>>();
    // Down tells up when the broker closed.
    let broker_gone = CancellationToken::new();
    let up = async {
        let reply = loop {
            let read = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break None,
                _ = broker_gone.cancelled() => break None,
                read = client_r.read(&mut buf) => read,
            };
            let n = match read {
                Ok(0) | Err(_) => break None,
                Ok(n) => n,
            };
            if let Err(violation) = filter.feed(&buf[..n], &mut out) {
                shared.denied(&device, peer, &violation);
                break filter.refusal(&violation);
            }
            if !out.is_empty() {
                let written = tokio::select! {
                    _ = shutdown.cancelled() => break None,
                    written = broker_w.write_all(&out) => written,
                };
                if written.is_err() {
                    break None;
                }
                out.clear();
            }
        };
        // The broker sees the device leave. After a refusal (no DISCONNECT from the device) it
        // publishes the device's will, whose topic was checked at CONNECT: it shows as offline.
        let _ = broker_w.shutdown().await;
        let _ = stop_tx.send(reply);
    };
    let down = async {
        let mut stop_rx = stop_rx;
        let mut frames = Framer::default();
        let mut buf = vec![0u8; BUFFER];
        let reply = loop {
            let read = tokio::select! {
                biased;
                stop = &mut stop_rx => break stop.ok().flatten(),
                read = broker_r.read(&mut buf) => read,
            };
            let n = match read {
                Ok(0) | Err(_) => break None,
                Ok(n) => n,
            };
            frames.advance(&buf[..n]);
            let written = tokio::select! {
                _ = shutdown.cancelled() => break None,
                written = client_w.write_all(&buf[..n]) => written,
            };
            if written.is_err() {
                break None;
            }
        };
        // A refusal is written only between two of the broker's packets.
        let reply = reply.filter(|_| frames.at_boundary());
        close(&mut client_w, reply.as_deref()).await;
        broker_gone.cancel();
    };
    tokio::join!(up, down);
    tracing::debug!(device, %peer, "gate: device disconnected");
}

/// An MQTT protocol version, from the CONNECT's protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5 (level 5).
    V5,
}

/// The rule a client's packet broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The first packet is not a CONNECT.
    ConnectFirst,
    /// The CONNECT is not MQTT 3.1.1 or 5.
    ProtocolVersion,
    /// The CONNECT's client id is not the certificate's device id.
    ClientId,
    /// The will topic is outside the device's prefix.
    WillTopic,
    /// A PUBLISH topic is outside the device's prefix.
    PublishTopic,
    /// A PUBLISH has an empty topic (MQTT 5 topic alias only), which the gate cannot check.
    TopicAlias,
    /// A SUBSCRIBE filter reaches outside the device's prefix.
    SubscribeFilter,
    /// A second CONNECT on one connection.
    SecondConnect,
    /// A packet over the size limit.
    TooLarge,
    /// Bytes that are not MQTT.
    Malformed,
}

impl Rule {
    /// A short name for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Rule::ConnectFirst => "connect_first",
            Rule::ProtocolVersion => "protocol_version",
            Rule::ClientId => "client_id",
            Rule::WillTopic => "will_topic",
            Rule::PublishTopic => "publish_topic",
            Rule::TopicAlias => "topic_alias",
            Rule::SubscribeFilter => "subscribe_filter",
            Rule::SecondConnect => "second_connect",
            Rule::TooLarge => "too_large",
            Rule::Malformed => "malformed",
        }
    }
}

/// A refused packet: the rule and what broke it (a topic, a filter, a client id…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule broken.
    pub rule: Rule,
    /// The offending topic, filter or value, shortened for logs.
    pub detail: String,
}

impl Violation {
    fn new(rule: Rule, detail: &[u8]) -> Violation {
        // Topics may be 64 KiB of anything: keep logs readable.
        const MAX: usize = 200;
        let mut shown = String::from_utf8_lossy(&detail[..detail.len().min(MAX)]).into_owned();
        if detail.len() > MAX {
            shown.push('…');
        }
        Violation {
            rule,
            detail: shown,
        }
    }

    fn malformed(what: &str) -> Violation {
        Violation {
            rule: Rule::Malformed,
            detail: what.to_string(),
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.rule.name(), self.detail)
    }
}

/// A remaining-length varint's decoding so far.
#[derive(Debug, PartialEq, Eq)]
enum Varint {
    /// More bytes needed.
    Incomplete,
    /// A fifth byte would be needed: not MQTT.
    Malformed,
    /// The value and how many bytes it took.
    Done(usize, usize),
}

fn decode_varint(bytes: &[u8]) -> Varint {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Varint::Done(value, i + 1);
        }
    }
    if bytes.len() >= 4 {
        Varint::Malformed
    } else {
        Varint::Incomplete
    }
}

/// Where the filter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a fixed header (held: its bytes so far).
    Header,
    /// Holding a packet's first `need` bytes to inspect them.
    Inspect {
        kind: u8,
        header_len: usize,
        remaining: usize,
        need: usize,
    },
    /// Forwarding the `left` remaining bytes of an allowed packet as they come.
    Pass { left: usize },
    /// A rule was broken: nothing more passes.
    Denied,
}

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const SUBSCRIBE: u8 = 8;

/// The client → broker half of the gate, without I/O: takes the client's bytes as they arrive
/// (split anywhere) and returns those allowed to reach the broker, or the rule broken.
#[derive(Debug)]
pub struct PacketFilter {
    device: String,
    prefix: String,
    max_packet: usize,
    protocol: Option<Protocol>,
    connected: bool,
    state: State,
    held: Vec<u8>,
    violation: Option<Violation>,
}

impl PacketFilter {
    /// A filter for `device` of `fleet`: it may use `cascade/v1/{fleet}/{device}/…` only.
    pub fn new(fleet: &str, device: &str, max_packet: usize) -> PacketFilter {
        PacketFilter {
            device: device.to_string(),
            prefix: format!("cascade/v1/{fleet}/{device}/"),
            max_packet,
            protocol: None,
            connected: false,
            state: State::Header,
            held: Vec::new(),
            violation: None,
        }
    }

    /// The protocol the client's CONNECT asked for, once it passed.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// Takes the next bytes from the client and appends those allowed to reach the broker to
    /// `out` (a packet's bytes are held back until it is allowed). After a violation, every call
    /// returns it again.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Violation> {
        while !input.is_empty() {
            match self.state {
                State::Denied => break,
                State::Pass { left } => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        State::Header
                    } else {
                        State::Pass { left: left - n }
                    };
                }
                State::Header => {
                    self.held.push(input[0]);
                    input = &input[1..];
                    if self.held.len() < 2 {
                        continue;
                    }
                    match decode_varint(&self.held[1..]) {
                        Varint::Incomplete => {}
                        Varint::Malformed => {
                            self.deny(Violation::malformed("remaining length over 4 bytes"));
                        }
                        Varint::Done(remaining, len) => self.header(remaining, 1 + len, out),
                    }
                }
                State::Inspect { need, .. } => {
                    let n = (need - self.held.len()).min(input.len());
                    self.held.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.held.len() == need {
                        self.inspect(out);
                    }
                }
            }
        }
        match &self.violation {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }

    fn deny(&mut self, violation: Violation) {
        self.state = State::Denied;
        self.held.clear();
        self.violation = Some(violation);
    }

    /// A fixed header is complete: decide what to do with the packet.
    fn header(&mut self, remaining: usize, header_len: usize, out: &mut Vec<u8>) {
        let kind = self.held[0] >> 4;
        let total = header_len + remaining;
        if total > self.max_packet {
            return self.deny(Violation {
                rule: Rule::TooLarge,
                detail: format!("{total} bytes, over {}", self.max_packet),
            });
        }
        let inspect = |need| State::Inspect {
            kind,
            header_len,
            remaining,
            need: header_len + need,
        };
        self.state = match (self.connected, kind) {
            (_, 0) => return self.deny(Violation::malformed("packet type 0")),
            (false, CONNECT) => inspect(remaining),
            (false, _) => {
                return self.deny(Violation {
                    rule: Rule::ConnectFirst,
                    detail: format!("packet type {kind}"),
                });
            }
            (true, CONNECT) => return self.deny(Violation::new(Rule::SecondConnect, b"")),
            // First the topic length, then the topic; the payload streams through.
            (true, PUBLISH) if remaining < 2 => {
                return self.deny(Violation::malformed("PUBLISH without a topic"));
            }
            (true, PUBLISH) => inspect(2),
            (true, SUBSCRIBE) => inspect(remaining),
            (true, _) => {
                out.extend_from_slice(&self.held);
                self.held.clear();
                if remaining == 0 {
                    State::Header
                } else {
                    State::Pass { left: remaining }
                }
            }
        };
    }

    /// The held bytes are enough to judge the packet.
    fn inspect(&mut self, out: &mut Vec<u8>) {
        let State::Inspect {
            kind,
            header_len,
            remaining,
            need,
        } = self.state
        else {
            return;
        };
        let held = std::mem::take(&mut self.held);
        let body = &held[header_len..];
        let verdict = match kind {
            CONNECT => self.check_connect(body),
            SUBSCRIBE => self.check_subscribe(held[0] & 0x0f, body),
            _ => {
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                if body.len() == 2 && topic_len > 0 {
                    // Now the topic itself.
                    if 2 + topic_len > remaining {
                        Err(Violation::malformed("PUBLISH topic longer than the packet"))
                    } else {
                        self.held = held;
                        self.state = State::Inspect {
                            kind,
                            header_len,
                            remaining,
                            need: need + topic_len,
                        };
                        return;
                    }
                } else {
                    self.check_publish(&body[2..])
                }
            }
        };
        match verdict {
            Err(violation) => self.deny(violation),
            Ok(()) => {
                out.extend_from_slice(&held);
                let left = header_len + remaining - held.len();
                self.state = if left == 0 {
                    State::Header
                } else {
                    State::Pass { left }
                };
            }
        }
    }

    fn under_prefix(&self, topic: &[u8]) -> bool {
        topic.len() > self.prefix.len() && topic.starts_with(self.prefix.as_bytes())
    }

    fn check_publish(&self, topic: &[u8]) -> Result<(), Violation> {
        if topic.is_empty() {
            return Err(match self.protocol {
                Some(Protocol::V5) => Violation::new(Rule::TopicAlias, b"(empty topic)"),
                _ => Violation::new(Rule::PublishTopic, b"(empty topic)"),
            });
        }
        if !self.under_prefix(topic) || topic.iter().any(|&b| b == b'+' || b == b'#') {
            return Err(Violation::new(Rule::PublishTopic, topic));
        }
        Ok(())
    }

    fn check_connect(&mut self, body: &[u8]) -> Result<(), Violation> {
        let mut r = Reader(body);
        let name = r.string()?;
        let level = r.u8()?;
        self.protocol = match (name, level) {
            (b"MQTT", 4) => Some(Protocol::V311),
            (b"MQTT", 5) => Some(Protocol::V5),
            _ => {
                return Err(Violation {
                    rule: Rule::ProtocolVersion,
                    detail: format!("{} level {level}", String::from_utf8_lossy(name)),
                });
            }
        };
        let v5 = self.protocol == Some(Protocol::V5);
        let flags = r.u8()?;
        if flags & 0x01 != 0 {
            return Err(Violation::malformed("CONNECT reserved flag set"));
        }
        r.take(2)?; // keep-alive
        if v5 {
            let properties = r.varint()?;
            r.take(properties)?;
        }
        let client_id = r.string()?;
        if client_id != self.device.as_bytes() {
            let shown: &[u8] = if client_id.is_empty() {
                b"(empty client id)"
            } else {
                client_id
            };
            return Err(Violation::new(Rule::ClientId, shown));
        }
        if flags & 0x04 != 0 {
            if v5 {
                let properties = r.varint()?;
                r.take(properties)?;
            }
            let topic = r.string()?;
            if !self.under_prefix(topic) || topic.iter().any(|&b| b == b'+' || b == b'#') {
                return Err(Violation::new(Rule::WillTopic, topic));
            }
        }
        // User name and password are the broker's business; the certificate already said who
        // this is.
        self.connected = true;
        Ok(())
    }

    fn check_subscribe(&self, flags: u8, body: &[u8]) -> Result<(), Violation> {
        if flags != 0x02 {
            return Err(Violation::malformed("SUBSCRIBE flags are not 0010"));
        }
        let mut r = Reader(body);
        r.take(2)?; // packet id
        if self.protocol == Some(Protocol::V5) {
            let properties = r.varint()?;
            r.take(properties)?;
        }
        if r.0.is_empty() {
            return Err(Violation::malformed("SUBSCRIBE without a filter"));
        }
        while !r.0.is_empty() {
            let filter = r.string()?;
            r.u8()?; // options
            if !self.under_prefix(filter) {
                return Err(Violation::new(Rule::SubscribeFilter, filter));
            }
        }
        Ok(())
    }

    /// What to tell the client before closing, for `violation`: a refusing CONNACK if its CONNECT
    /// was refused, an MQTT 5 DISCONNECT with a reason code after, nothing for MQTT 3.1.1 (which
    /// has no DISCONNECT from the server) or for a client that never sent a CONNECT.
    pub fn refusal(&self, violation: &Violation) -> Option<Vec<u8>> {
        let v5 = self.protocol == Some(Protocol::V5);
        if !self.connected {
            return match (self.protocol, violation.rule) {
                (_, Rule::ConnectFirst) => None,
                // 3.1.1's "unacceptable protocol version"; an MQTT 5 client understands it too.
                (None, Rule::ProtocolVersion) => Some(vec![0x20, 0x02, 0x00, 0x01]),
                (None, _) => None,
                (Some(Protocol::V311), rule) => {
                    let code = match rule {
                        Rule::ClientId => 0x02,  // identifier rejected
                        Rule::WillTopic => 0x05, // not authorized
                        _ => return None,
                    };
                    Some(vec![0x20, 0x02, 0x00, code])
                }
                (Some(Protocol::V5), rule) => Some(vec![0x20, 0x03, 0x00, reason_code(rule), 0x00]),
            };
        }
        v5.then(|| vec![0xe0, 0x02, reason_code(violation.rule), 0x00])
    }

    /// What to tell the client when the broker cannot be reached after its CONNECT passed: a
    /// CONNACK "server unavailable".
    pub fn unavailable(&self) -> Option<Vec<u8>> {
        match self.protocol? {
            Protocol::V311 => Some(vec![0x20, 0x02, 0x00, 0x03]),
            Protocol::V5 => Some(vec![0x20, 0x03, 0x00, 0x88, 0x00]),
        }
    }
}

/// The MQTT 5 reason code (CONNACK or DISCONNECT) for a broken rule.
fn reason_code(rule: Rule) -> u8 {
    match rule {
        Rule::ClientId => 0x85,        // client identifier not valid
        Rule::TopicAlias => 0x94,      // topic alias invalid
        Rule::TooLarge => 0x95,        // packet too large
        Rule::Malformed => 0x81,       // malformed packet
        Rule::SecondConnect => 0x82,   // protocol error
        Rule::ProtocolVersion => 0x84, // unsupported protocol version
        Rule::ConnectFirst | Rule::WillTopic | Rule::PublishTopic | Rule::SubscribeFilter => 0x87, // not authorized
    }
}

/// Reads MQTT fields from a packet body; running out is a malformed packet.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Violation> {
        if n > self.0.len() {
            return Err(Violation::malformed("field longer than the packet"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Violation> {
        Ok(self.take(1)?[0])
    }

    fn string(&mut self) -> Result<&'a [u8], Violation> {
        let len = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        self.take(len)
    }

    fn varint(&mut self) -> Result<usize, Violation> {
        match decode_varint(self.0) {
            Varint::Done(value, len) => {
                self.0 = &self.0[len..];
                Ok(value)
            }
            _ => Err(Violation::malformed("bad property length")),
        }
    }
}

/// Follows the framing of the broker → client stream (fixed headers and lengths only), to know
/// whether a packet of the gate's own can be written between two of the broker's.
#[derive(Debug, Clone, Default)]
pub struct Framer {
    header: Vec<u8>,
    left: usize,
    lost: bool,
}

impl Framer {
    /// Takes the next bytes of the stream.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            if self.header.len() < 2 {
                continue;
            }
            match decode_varint(&self.header[1..]) {
                Varint::Incomplete => {}
                Varint::Malformed => self.lost = true,
                Varint::Done(remaining, _) => {
                    self.left = remaining;
                    self.header.clear();
                }
            }
        }
    }

    /// Whether the bytes so far end exactly at a packet boundary.
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.left == 0 && self.header.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = "acme";
    const DEVICE: &str = "dev-a";
    const MAX: usize = 1024;

    fn varint(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return out;
            }
        }
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        out.extend(varint(body.len()));
        out.extend_from_slice(body);
        out
    }

    fn connect(level: u8, client_id: &str, will: Option<&str>) -> Vec<u8> {
        let mut body = string(b"MQTT");
        body.push(level);
        body.push(0x02 | if will.is_some() { 0x04 | 0x08 } else { 0 }); // clean, will QoS 1
        body.extend([0, 60]);
        if level == 5 {
            body.extend([5, 0x11, 0, 0, 0x0e, 0x10]); // properties: session expiry 3600 s
        }
        body.extend(string(client_id.as_bytes()));
        if let Some(topic) = will {
            if level == 5 {
                body.push(0);
            }
            body.extend(string(topic.as_bytes()));
            body.extend(string(b"offline"));
        }
        packet(0x10, &body)
    }

    fn publish(level: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = string(topic.as_bytes());
        body.extend([0, 7]); // QoS 1 packet id
        if level == 5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        packet(0x32, &body)
    }

    fn subscribe(level: u8, filters: &[&str]) -> Vec<u8> {
        let mut body = vec![0, 9];
        if level == 5 {
            body.push(0);
        }
        for f in filters {
            body.extend(string(f.as_bytes()));
            body.push(1);
        }
        packet(0x82, &body)
    }

    fn own(channel: &str) -> String {
        format!("cascade/v1/{FLEET}/{DEVICE}/{channel}")
    }

    fn filter() -> PacketFilter {
        PacketFilter::new(FLEET, DEVICE, MAX)
    }

    /// Feeds `bytes` in pieces of `chunk` bytes; what passed, or the violation.
    fn feed_in(f: &mut PacketFilter, bytes: &[u8], chunk: usize) -> Result<Vec<u8>, Violation> {
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            f.feed(piece, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn allowed_sessions_pass_unchanged_at_any_split() {
        for level in [4u8, 5] {
            let mut stream = connect(level, DEVICE, Some(&own("status")));
            stream.extend(subscribe(
                level,
                &[&own("verdict"), &own("#"), &own("ota/+")],
            ));
            stream.extend(publish(level, &own("escalate"), &[7u8; 300]));
            stream.extend([0xc0, 0x00]); // PINGREQ
            stream.extend([0x40, 0x02, 0x00, 0x01]); // PUBACK
            stream.extend(packet(0xa2, &[[0, 3].as_slice(), &string(b"x/y")].concat())); // UNSUBSCRIBE
            stream.extend([0xe0, 0x00]); // DISCONNECT
            for chunk in [1, 2, 3, 7, 64, stream.len()] {
                let mut f = filter();
                let out = feed_in(&mut f, &stream, chunk).unwrap();
                assert_eq!(out, stream, "level {level}, chunk {chunk}");
                let expected = if level == 5 {
                    Protocol::V5
                } else {
                    Protocol::V311
                };
                assert_eq!(f.protocol(), Some(expected));
            }
        }
    }

    #[test]
    fn a_publish_payload_streams_without_waiting_for_the_whole_packet() {
        let mut f = filter();
        let mut out = Vec::new();
        f.feed(&connect(5, DEVICE, None), &mut out).unwrap();
        out.clear();
        let p = publish(5, &own("escalate"), &[1u8; 500]);
        // The header and topic, then half the payload: forwarded already.
        f.feed(&p[..300], &mut out).unwrap();
        assert_eq!(out, &p[..300]);
        f.feed(&p[300..], &mut out).unwrap();
        assert_eq!(out, p);
    }

    #[test]
    fn publishing_on_another_devices_topic_is_refused() {
        for level in [4u8, 5] {
            for topic in [
                "cascade/v1/acme/dev-b/escalate",
                "cascade/v1/acme/dev-a",
                "cascade/v1/acme/dev-a/",
                "cascade/v1/acme/dev-ab/status",
                "cascade/v1/other/dev-a/status",
                "cascade/v1/acme/dev-a/+",
                "elsewhere",
            ] {
                let mut f = filter();
                let mut stream = connect(level, DEVICE, None);
                let allowed = stream.len();
                stream.extend(publish(level, topic, b"x"));
                let mut out = Vec::new();
                let v = f.feed(&stream, &mut out).unwrap_err();
                assert_eq!(v.rule, Rule::PublishTopic, "{topic}");
                assert_eq!(v.detail, topic);
                assert_eq!(out, &stream[..allowed], "only the CONNECT passed");
                // Nothing passes afterwards.
                let mut more = Vec::new();
                assert!(f.feed(&[0xc0, 0x00], &mut more).is_err());
                assert!(more.is_empty());
                let reply = f.refusal(&v);
                if level == 5 {
                    assert_eq!(reply, Some(vec![0xe0, 0x02, 0x87, 0x00]));
                } else {
                    assert_eq!(reply, None);
                }
            }
        }
    }

    #[test]
    fn an_empty_publish_topic_is_refused() {
        let mut f = filter();
        let mut stream = connect(5, DEVICE, None);
        stream.extend(publish(5, "", b"x"));
        let v = feed_in(&mut f, &stream, 5).unwrap_err();
        assert_eq!(v.rule, Rule::TopicAlias);
        assert_eq!(f.refusal(&v), Some(vec![0xe0, 0x02, 0x94, 0x00]));
    }

    #[test]
    fn subscriptions_outside_the_device_are_refused() {
        for level in [4u8, 5] {
            for bad in [
                "cascade/v1/acme/+/verdict",
                "cascade/v1/acme/#",
                "#",
                "+/+/+/+/+",
                "$share/g/cascade/v1/acme/dev-a/verdict",
                "cascade/v1/acme/dev-a",
            ] {
                let mut f = filter();
                let mut stream = connect(level, DEVICE, None);
                stream.extend(subscribe(level, &[&own("verdict"), bad]));
                let v = feed_in(&mut f, &stream, 3).unwrap_err();
                assert_eq!(v.rule, Rule::SubscribeFilter, "{bad}");
                assert_eq!(v.detail, bad);
            }
        }
    }

    #[test]
    fn connect_rules() {
        for level in [4u8, 5] {
            let cases = [
                (connect(level, "dev-b", None), Rule::ClientId),
                (connect(level, "", None), Rule::ClientId),
                (
                    connect(level, DEVICE, Some("cascade/v1/acme/dev-b/status")),
                    Rule::WillTopic,
                ),
                (publish(level, &own("status"), b"x"), Rule::ConnectFirst),
            ];
            for (stream, rule) in cases {
                let mut f = filter();
                let mut out = Vec::new();
                let v = f.feed(&stream, &mut out).unwrap_err();
                assert_eq!(v.rule, rule);
                assert!(out.is_empty(), "nothing reaches the broker");
                let reply = f.refusal(&v);
                match (level, rule) {
                    (_, Rule::ConnectFirst) => assert_eq!(reply, None),
                    (4, Rule::ClientId) => assert_eq!(reply, Some(vec![0x20, 2, 0, 0x02])),
                    (4, _) => assert_eq!(reply, Some(vec![0x20, 2, 0, 0x05])),
                    (_, Rule::ClientId) => assert_eq!(reply, Some(vec![0x20, 3, 0, 0x85, 0])),
                    (_, _) => assert_eq!(reply, Some(vec![0x20, 3, 0, 0x87, 0])),
                }
            }
        }
        // MQTT 3.1 (MQIsdp, level 3) and unknown levels.
        let mut old = string(b"MQIsdp");
        old.extend([3, 0x02, 0, 60]);
        old.extend(string(DEVICE.as_bytes()));
        let mut f = filter();
        let v = feed_in(&mut f, &packet(0x10, &old), 4).unwrap_err();
        assert_eq!(v.rule, Rule::ProtocolVersion);
        assert_eq!(f.refusal(&v), Some(vec![0x20, 2, 0, 1]));
        let mut f = filter();
        let v = feed_in(&mut f, &connect(6, DEVICE, None), 4).unwrap_err();
        assert_eq!(v.rule, Rule::ProtocolVersion);
        // A second CONNECT.
        let mut f = filter();
        let mut stream = connect(5, DEVICE, None);
        stream.extend(connect(5, DEVICE, None));
        let v = feed_in(&mut f, &stream, 100).unwrap_err();
        assert_eq!(v.rule, Rule::SecondConnect);
    }

    #[test]
    fn oversized_packets_are_refused_from_their_header() {
        let mut f = filter();
        let mut out = Vec::new();
        f.feed(&connect(5, DEVICE, None), &mut out).unwrap();
        // A PUBLISH announcing 1 MiB: refused on its header, before any of its body.
        let mut header = vec![0x30];
        header.extend(varint(1 << 20));
        let v = f.feed(&header, &mut out).unwrap_err();
        assert_eq!(v.rule, Rule::TooLarge);
        assert_eq!(f.refusal(&v), Some(vec![0xe0, 0x02, 0x95, 0x00]));
        // Exactly at the limit passes.
        let mut f = filter();
        let mut out = Vec::new();
        f.feed(&connect(4, DEVICE, None), &mut out).unwrap();
        let topic = own("escalate");
        let overhead = 1 + 2 + 2 + topic.len() + 2; // header (2-byte length), topic, packet id
        let p = publish(4, &topic, &vec![0u8; MAX - overhead]);
        assert_eq!(p.len(), MAX);
        f.feed(&p, &mut out).unwrap();
        let p = publish(4, &topic, &vec![0u8; MAX - overhead + 1]);
        assert_eq!(f.feed(&p, &mut out).unwrap_err().rule, Rule::TooLarge);
    }

    #[test]
    fn malformed_streams_are_refused() {
        // A remaining length with a fifth byte.
        let mut f = filter();
        let v = feed_in(&mut f, &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01], 1).unwrap_err();
        assert_eq!(v.rule, Rule::Malformed);
        // A CONNECT whose client id runs past the packet.
        let mut body = string(b"MQTT");
        body.extend([4, 0x02, 0, 60, 0, 50]);
        body.extend(b"dev-a");
        let mut f = filter();
        assert_eq!(
            feed_in(&mut f, &packet(0x10, &body), 2).unwrap_err().rule,
            Rule::Malformed
        );
        // A PUBLISH whose topic length runs past the packet.
        let mut f = filter();
        let mut stream = connect(4, DEVICE, None);
        stream.extend(packet(0x30, &[0, 40, b'c']));
        assert_eq!(
            feed_in(&mut f, &stream, 3).unwrap_err().rule,
            Rule::Malformed
        );
        // Packet type 0, SUBSCRIBE with wrong flags, SUBSCRIBE with no filter.
        for bad in [
            vec![0x00, 0x00],
            packet(
                0x80,
                &[[0, 1].as_slice(), &string(own("x").as_bytes()), &[1]].concat(),
            ),
            packet(0x82, &[0, 1]),
        ] {
            let mut f = filter();
            let mut stream = connect(4, DEVICE, None);
            stream.extend(bad);
            assert_eq!(
                feed_in(&mut f, &stream, 1).unwrap_err().rule,
                Rule::Malformed
            );
        }
    }

    #[test]
    fn a_packet_split_across_reads_is_held_until_judged() {
        let mut f = filter();
        let mut out = Vec::new();
        f.feed(&connect(4, DEVICE, None), &mut out).unwrap();
        out.clear();
        let s = subscribe(4, &[&own("verdict")]);
        f.feed(&s[..s.len() - 1], &mut out).unwrap();
        assert!(out.is_empty(), "a SUBSCRIBE is held until complete");
        f.feed(&s[s.len() - 1..], &mut out).unwrap();
        assert_eq!(out, s);
        // The same with a bad filter: nothing of it ever passes.
        let mut out = Vec::new();
        let s = subscribe(4, &["#"]);
        f.feed(&s[..s.len() - 1], &mut out).unwrap();
        assert!(f.feed(&s[s.len() - 1..], &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn the_framer_knows_packet_boundaries() {
        let mut framer = Framer::default();
        assert!(framer.at_boundary());
        let p = publish(5, &own("verdict"), &[0u8; 200]);
        framer.advance(&p[..1]);
        assert!(!framer.at_boundary());
        framer.advance(&p[1..100]);
        assert!(!framer.at_boundary());
        framer.advance(&p[100..]);
        assert!(framer.at_boundary());
        framer.advance(&[0xd0, 0x00, 0x90]); // PINGRESP, then half a SUBACK
        assert!(!framer.at_boundary());
        framer.advance(&[0x03, 0, 1, 0]);
        assert!(framer.at_boundary());
        framer.advance(&[0x30, 0xff, 0xff, 0xff, 0xff]);
        assert!(!framer.at_boundary(), "lost after a malformed length");
    }

    #[test]
    fn varints() {
        assert_eq!(decode_varint(&[0x00]), Varint::Done(0, 1));
        assert_eq!(decode_varint(&[0x7f]), Varint::Done(127, 1));
        assert_eq!(decode_varint(&[0x80, 0x01]), Varint::Done(128, 2));
        assert_eq!(
            decode_varint(&[0xff, 0xff, 0xff, 0x7f]),
            Varint::Done(268_435_455, 4)
        );
        assert_eq!(decode_varint(&[0x80]), Varint::Incomplete);
        assert_eq!(decode_varint(&[0x80, 0x80, 0x80, 0x80]), Varint::Malformed);
        assert_eq!(varint(321), vec![0xc1, 0x02]);
    }

    #[test]
    fn long_details_are_shortened() {
        let v = Violation::new(Rule::PublishTopic, &[b'a'; 1000]);
        assert!(v.detail.chars().count() <= 201, "{}", v.detail.len());
        assert!(v.detail.ends_with('…'));
        let v = Violation::new(Rule::PublishTopic, b"short");
        assert_eq!(v.detail, "short");
    }
}
