//! Device enrollment: the device's key pair and its certificate signing request (CSR).
//!
//! `edge-agent enroll` makes a fresh key pair on the device, sends only the CSR to the fleet's
//! enrollment endpoint with a one-time token, and gets back a client certificate signed by the
//! fleet CA (`cloud_escalator::pki::FleetCa::sign_device`). The private key never leaves the
//! device. The CA decides what the certificate says (its CN is the device id the request names,
//! which the fleet accepts only if no device has it yet), so the CSR is only a proof that the
//! device holds the key.

use std::path::{Path, PathBuf};

use cascade_proto::topic::{Segment, TopicError, validate_segment};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};
use serde::Deserialize;

/// Enrollment could not be done.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The device id cannot be a topic level (so cannot be a certificate identity either).
    #[error("device id {device:?} is not usable: {error} (use 1 to 64 of A-Z a-z 0-9 . _ -)")]
    Device {
        /// The id given.
        device: String,
        /// What is wrong with it.
        error: TopicError,
    },
    /// The key pair or the request could not be made.
    #[error("cannot make the device key or certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    /// The enrollment server could not be reached. Retrying may help.
    #[error("{url}: {error} (check --server: the escalator's fleet API address)")]
    Http {
        /// The URL.
        url: String,
        /// The error.
        error: String,
    },
    /// The server refused (bad, expired or used-up token, bad device id, enrollment off).
    #[error("enrollment refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// A file could not be written or read.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The server's address is plain HTTP on a network: the CA certificate it returns could be
    /// anyone's.
    #[error(
        "{0} is plain HTTP: a machine in between could hand this device its own CA; use https:// (or --insecure on a network you trust)"
    )]
    Insecure(String),
    /// The agent configuration could not be updated.
    #[error("{path}: {problem}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// What to enroll, and where to.
#[derive(Debug, Clone)]
pub struct EnrollRequest<'a> {
    /// The escalator's fleet API, e.g. `https://fleet.example.com`.
    pub server: &'a str,
    /// The enrollment token an operator created (`cloud-escalator fleet enrollment-token`).
    pub token: &'a str,
    /// This device's id.
    pub device: &'a str,
    /// Where the key, certificate and CA go (e.g. `/etc/cascade/identity`).
    pub dir: &'a Path,
    /// An agent configuration to point at them (device, fleet, group, `[mqtt]` TLS settings).
    pub config: Option<&'a Path>,
    /// Allow `http://` to a host other than this one.
    pub insecure: bool,
}

/// Whether `server` may be used: https, or http to this machine, or anything when `insecure`.
fn check_transport(server: &str, insecure: bool) -> Result<(), EnrollError> {
    let Some(rest) = server.strip_prefix("http://") else {
        return Ok(());
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let local = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local || insecure {
        Ok(())
    } else {
        Err(EnrollError::Insecure(server.to_owned()))
    }
}

/// The outcome of an enrollment.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolled {
    /// The fleet joined.
    pub fleet: String,
    /// The group, if the token named one.
    pub group: Option<String>,
    /// The broker the fleet told the device to use.
    pub broker: Option<String>,
    /// The private key file (mode 0600).
    pub key: PathBuf,
    /// The certificate file.
    pub certificate: PathBuf,
    /// The fleet CA file.
    pub ca: PathBuf,
}

#[derive(Deserialize)]
struct Response {
    fleet: String,
    group: Option<String>,
    certificate: String,
    ca: String,
    broker: Option<String>,
}

/// Enrolls this device: makes a key pair, has the fleet CA sign it, writes the key, the
/// certificate and the CA into `dir`, and (with `config`) points the agent's configuration at
/// them. Nothing is written unless the server signed.
pub fn enroll(request: &EnrollRequest<'_>) -> Result<Enrolled, EnrollError> {
    check_transport(request.server, request.insecure)?;
    let (key, csr) = device_csr(request.device)?;
    let url = format!("{}/api/v1/enroll", request.server.trim_end_matches('/'));
    let http = |e: ureq::Error| EnrollError::Http {
        url: url.clone(),
        error: e.to_string(),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let mut response = agent
        .post(&url)
        .header("Authorization", &format!("Bearer {}", request.token))
        .send_json(serde_json::json!({ "device": request.device, "csr": csr }))
        .map_err(http)?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_vec().map_err(http)?;
    if status != 200 {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(EnrollError::Refused { status, message });
    }
    let response: Response = serde_json::from_slice(&body).map_err(|e| EnrollError::Http {
        url: url.clone(),
        error: format!("unexpected answer: {e}"),
    })?;
    let enrolled = Enrolled {
        fleet: response.fleet,
        group: response.group,
        broker: response.broker,
        key: request.dir.join("device.key"),
        certificate: request.dir.join("device.pem"),
        ca: request.dir.join("ca.pem"),
    };
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| EnrollError::Io { path, error }
    };
    std::fs::create_dir_all(request.dir).map_err(io(request.dir))?;
    write_private(&enrolled.key, key.as_bytes()).map_err(io(&enrolled.key))?;
    crate::ota::write_file_atomically(&enrolled.certificate, response.certificate.as_bytes())
        .map_err(io(&enrolled.certificate))?;
    crate::ota::write_file_atomically(&enrolled.ca, response.ca.as_bytes())
        .map_err(io(&enrolled.ca))?;
    if let Some(config) = request.config {
        update_config(config, request.device, &enrolled)?;
    }
    Ok(enrolled)
}

/// Writes a secret: a new file created with mode 0600 (never readable by others, even briefly),
/// flushed, renamed into place. When root writes it and the agent's `cascade` group exists, the
/// group may read it (0640), so the service, which runs as `cascade`, can load its key.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    // A leftover from an interrupted run could have any mode: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if file.metadata()?.uid() == 0
        && let Some(gid) = group_id("cascade")
    {
        std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640))?;
    }
    std::fs::rename(&tmp, path)
}

/// The id of a group, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next()? == name).then_some(())?;
            fields.nth(1)?.parse().ok()
        })
}

/// Points an agent configuration at the enrollment: `device`, `fleet`, `group`, and in `[mqtt]`
/// the broker URL (when the fleet gave one), `ca`, `client_cert`, `client_key`. Comments and
/// everything else are kept.
pub fn update_config(path: &Path, device: &str, enrolled: &Enrolled) -> Result<(), EnrollError> {
    let config_error = |problem: String| EnrollError::Config {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|error| EnrollError::Io {
        path: path.to_owned(),
        error,
    })?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| config_error(e.to_string()))?;
    doc["device"] = toml_edit::value(device);
    doc["fleet"] = toml_edit::value(enrolled.fleet.as_str());
    match &enrolled.group {
        Some(g) => doc["group"] = toml_edit::value(g.as_str()),
        None => {
            doc.remove("group");
        }
    }
    if !doc.contains_table("mqtt") {
        doc["mqtt"] = toml_edit::table();
    }
    let mqtt = doc["mqtt"]
        .as_table_mut()
        .ok_or_else(|| config_error("`mqtt` is not a table".into()))?;
    if let Some(broker) = &enrolled.broker {
        mqtt["url"] = toml_edit::value(broker.as_str());
    }
    let path_value = |p: &Path| toml_edit::value(p.display().to_string());
    mqtt["ca"] = path_value(&enrolled.ca);
    mqtt["client_cert"] = path_value(&enrolled.certificate);
    mqtt["client_key"] = path_value(&enrolled.key);
    // The installer made the configuration readable by the service only (root:cascade 0640):
    // the rewritten file keeps the original's owner and mode.
    let io = |error| EnrollError::Io {
        path: path.to_owned(),
        error,
    };
    let original = std::fs::metadata(path).map_err(io)?;
    crate::ota::write_file_atomically(path, doc.to_string().as_bytes()).map_err(io)?;
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(original.mode() & 0o7777),
        )
        .map_err(io)?;
        if std::fs::metadata(path).map_err(io)?.uid() == 0 {
            std::os::unix::fs::chown(path, Some(original.uid()), Some(original.gid()))
                .map_err(io)?;
        }
    }
    Ok(())
}

/// A new ECDSA P-256 key pair for `device` and a CSR for it, both PEM: `(private key, CSR)`.
///
/// The CSR asks for subject CN = `device` and the TLS client-authentication key usage; keep the
/// key file private (mode 0600) beside the certificate the CA returns.
pub fn device_csr(device: &str) -> Result<(String, String), EnrollError> {
    validate_segment(Segment::Device, device).map_err(|error| EnrollError::Device {
        device: device.to_string(),
        error,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, device);
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_key_and_a_csr_in_pem() {
        let (key, csr) = device_csr("cam-01").unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        assert!(
            csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{csr}"
        );
        // A fresh key each time.
        let (other, _) = device_csr("cam-01").unwrap();
        assert_ne!(key, other);
    }

    #[test]
    fn the_configuration_points_at_the_enrollment_and_keeps_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "# my device\ndevice = \"old\"\ngroup = \"x\"\n\n[model]\npath = \"m.onnx\" # keep\n\n[mqtt]\nurl = \"mqtt://a:1883\"\nfsync = true\n",
        )
        .unwrap();
        let enrolled = Enrolled {
            fleet: "acme".into(),
            group: None,
            broker: Some("mqtts://fleet.example.com:8883".into()),
            key: "/etc/cascade/identity/device.key".into(),
            certificate: "/etc/cascade/identity/device.pem".into(),
            ca: "/etc/cascade/identity/ca.pem".into(),
        };
        update_config(&path, "cam-07", &enrolled).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("# my device") && text.contains("# keep"),
            "{text}"
        );
        let value: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(value["device"].as_str(), Some("cam-07"));
        assert_eq!(value["fleet"].as_str(), Some("acme"));
        assert!(value.get("group").is_none(), "the token named no group");
        let mqtt = value["mqtt"].as_table().unwrap();
        assert_eq!(mqtt["url"].as_str(), Some("mqtts://fleet.example.com:8883"));
        assert_eq!(
            mqtt["client_key"].as_str(),
            Some("/etc/cascade/identity/device.key")
        );
        assert_eq!(mqtt["fsync"].as_bool(), Some(true));
        let missing = update_config(&dir.path().join("none.toml"), "cam-07", &enrolled);
        assert!(matches!(missing, Err(EnrollError::Io { .. })));
    }

    #[test]
    fn a_refusing_or_absent_server_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("identity");
        let request = EnrollRequest {
            server: "http://127.0.0.1:9",
            token: "enr_x",
            device: "cam-07",
            dir: &identity,
            config: None,
            insecure: false,
        };
        assert!(matches!(enroll(&request), Err(EnrollError::Http { .. })));
        assert!(!identity.exists());
    }

    #[test]
    fn plain_http_only_to_this_machine() {
        for ok in [
            "https://fleet.example.com",
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:80",
        ] {
            assert!(check_transport(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://fleet.example.com",
            "http://10.0.0.5:8080",
            "http://localhost.evil.com",
        ] {
            assert!(
                matches!(check_transport(bad, false), Err(EnrollError::Insecure(_))),
                "{bad}"
            );
            assert!(check_transport(bad, true).is_ok());
        }
    }

    #[test]
    fn keys_are_private_even_over_a_leftover() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("device.key");
        // A stale temporary file readable by everyone.
        std::fs::write(key.with_extension("tmp"), "old").unwrap();
        std::fs::set_permissions(
            key.with_extension("tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        write_private(&key, b"secret").unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert!(mode == 0o600 || mode == 0o640, "{mode:o}");
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
    }

    #[test]
    fn refuses_device_ids_that_are_not_topic_levels() {
        for bad in ["", "a/b", "cam+", "#", "cam 01"] {
            let err = device_csr(bad).unwrap_err();
            assert!(matches!(err, EnrollError::Device { .. }), "{bad}: {err}");
        }
    }
}
