//! MQTT connection settings shared by every Cascade client: TCP_NODELAY, keep-alive, rustls TLS
//! (CA plus optional client certificate), and a reconnect backoff.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.display().to_string(),
        error,
    })
}

/// A rustls client configuration trusting `ca`, presenting `client` (certificate and key PEM files)
/// when given.
pub fn tls_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = read(ca)?;
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| TlsError::Pem(format!("{}: {e}", ca.display())))?;
        roots.add(cert)?;
        found += 1;
    }
    if found == 0 {
        return Err(TlsError::Pem(format!(
            "{}: no certificate found",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        Some((cert, key)) => {
            let cert_pem = read(cert)?;
            let chain = rustls_pemfile::certs(&mut &cert_pem[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem(format!("{}: {e}", cert.display())))?;
            let key_pem = read(key)?;
            let key = rustls_pemfile::private_key(&mut &key_pem[..])
                .map_err(|e| TlsError::Pem(format!("{}: {e}", key.display())))?
                .ok_or_else(|| TlsError::Pem(format!("{}: no private key found", key.display())))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// QoS 1 publishes in flight (sent, not yet acknowledged) per client, by default.
pub const DEFAULT_INFLIGHT: u16 = 128;

/// MQTT 5 options with Cascade's defaults: TCP_NODELAY (Nagle's algorithm costs ~40 ms per
/// request/response round trip), the given keep-alive, a persistent session (so the broker queues
/// QoS 1 messages while the client is away), and TLS when `tls` is given.
pub fn mqtt_options(
    client_id: &str,
    host: &str,
    port: u16,
    keep_alive: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_packet: usize,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(keep_alive);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    let max = u32::try_from(max_packet).unwrap_or(u32::MAX);
    options.set_max_packet_size(Some(max));
    // rumqttc preallocates a slot per possible in-flight publish; unbounded, that is the broker's
    // receive maximum (65535) slots, 13 MiB per client (measured: agent RSS 27 MiB → 13 MiB).
    options.set_outgoing_inflight_upper_limit(DEFAULT_INFLIGHT);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(10);
    options.set_network_options(network);
    if let Some(config) = tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    options
}

/// Exponential reconnect backoff with jitter: 100 ms doubling to 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The next delay (the previous one doubled, capped at 5 s, with up to 25% jitter).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        base + base.mul_f32(fastrand::f32() * 0.25)
    }

    /// Back to the shortest delay after a successful connection.
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_resets() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
        for _ in 0..10 {
            b.next_delay();
        }
        let capped = b.next_delay();
        assert!(capped >= Duration::from_secs(5) && capped <= Duration::from_millis(6250));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn a_missing_or_empty_ca_is_a_clear_error() {
        let err = tls_config(Path::new("/nonexistent/ca.pem"), None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        assert!(
            tls_config(&empty, None)
                .unwrap_err()
                .to_string()
                .contains("no certificate")
        );
    }
}
