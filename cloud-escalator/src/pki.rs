//! The fleet's certificate authority: device identities for mutual TLS.
//!
//! Each fleet has one CA (an ECDSA P-256 key and a self-signed certificate, `ca.pem` and `ca.key`
//! in one directory). It signs
//!
//! - a client certificate per device ([`FleetCa::sign_device`]) from the CSR the device made
//!   (`edge_agent::enroll::device_csr`): the private key never leaves the device, and the
//!   certificate's CN is the device id the CA was told, whatever the CSR asked for. Brokers take
//!   that CN as the device's identity and confine it to `cascade/v1/{fleet}/{CN}/…`
//!   ([`crate::gate`] in front of the embedded broker, [`crate::mosquitto`] for Mosquitto);
//! - a server certificate for the TLS listener devices connect to ([`FleetCa::issue_server`]);
//! - client certificates for cloud services such as the escalator ([`FleetCa::issue_service`]),
//!   whose names can never be device ids, so no device can enroll under a service's identity.
//!
//! There is no revocation list yet: a device certificate is good until it expires, so keep device
//! validities short and re-enroll.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cascade_proto::topic::{Segment, TopicError, validate_segment};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};

/// File name of the CA certificate in the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a new fleet CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a device certificate is valid unless the caller says otherwise.
pub const DEFAULT_DEVICE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a server or service certificate is valid (issued again at each start).
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before they are issued, so a device whose clock is a little
/// behind still accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The CA certificate's common name; its organizational unit is the fleet.
const CA_COMMON_NAME: &str = "Cascade fleet CA";

/// A certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A CA file could not be read or written.
    #[error("cannot {action} {path}: {error}")]
    Io {
        /// `read`, `write`, `create`…
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// One of `ca.pem` and `ca.key` exists without the other.
    #[error(
        "{dir} holds only one of ca.pem and ca.key: restore the missing one from a backup, or move \
         both away to create a new CA (every device must then enroll again)"
    )]
    Incomplete {
        /// The CA directory.
        dir: PathBuf,
    },
    /// `ca.pem` or `ca.key` does not parse, or they do not belong together.
    #[error("{path}: {reason} (restore the CA files from a backup)")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA on disk was made for another fleet.
    #[error(
        "the CA in {dir} is fleet {found:?}'s, not {expected:?}'s: use that fleet's CA directory"
    )]
    OtherFleet {
        /// The CA directory.
        dir: PathBuf,
        /// The fleet in ca.pem.
        found: String,
        /// The fleet asked for.
        expected: String,
    },
    /// A fleet or device name cannot be an identity (it must be a topic level).
    #[error("{name:?} cannot be a {segment} name: {error} (use 1 to 64 of A-Z a-z 0-9 . _ -)")]
    Name {
        /// Fleet or device.
        segment: Segment,
        /// The name given.
        name: String,
        /// What is wrong with it.
        error: TopicError,
    },
    /// A service name could also be a device id, or cannot be a broker user name.
    #[error(
        "service name {0:?} must not be a valid device id and must not contain / + # or NUL, so no \
         device can ever hold the same identity (use e.g. \"escalator:FLEET\")"
    )]
    ServiceName(String),
    /// The certificate signing request does not parse or its signature is wrong.
    #[error(
        "the certificate signing request is not valid: {0} (make one with `edge-agent enroll`)"
    )]
    Csr(rcgen::Error),
    /// The validity period is empty.
    #[error("a certificate's validity must end after it starts")]
    Validity,
    /// rcgen could not make a key or a certificate.
    #[error("cannot make the certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// A fleet's certificate authority, loaded from (or created in) a directory.
#[derive(Debug)]
pub struct FleetCa {
    fleet: String,
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl FleetCa {
    /// Loads the CA of `fleet` from `dir` (`ca.pem`, `ca.key`), or creates a new one there if
    /// neither file exists (the directory mode 0700, the key mode 0600).
    ///
    /// Refuses a directory holding only one of the files, a key that does not match the
    /// certificate, and another fleet's CA, rather than silently making a new CA: every device
    /// certificate hangs on this one.
    pub fn open_or_create(dir: &Path, fleet: &str) -> Result<FleetCa, PkiError> {
        validate_segment(Segment::Fleet, fleet).map_err(|error| PkiError::Name {
            segment: Segment::Fleet,
            name: fleet.to_string(),
            error,
        })?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::open(dir, fleet),
            (false, false) => Self::create(dir, fleet),
            _ => Err(PkiError::Incomplete {
                dir: dir.to_path_buf(),
            }),
        }
    }

    fn open(dir: &Path, fleet: &str) -> Result<FleetCa, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|error| PkiError::Io {
                action: "read",
                path: path.to_path_buf(),
                error,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        if let Ok(meta) = fs::metadata(&key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %key_path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the fleet CA key is readable by other users; chmod 600 it");
        }
        let bad = |path: &Path, reason: String| PkiError::BadCa {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
        let der = first_cert_der(&cert_pem).ok_or_else(|| {
            bad(
                &cert_path,
                "no certificate in PEM (expected -----BEGIN CERTIFICATE-----)".into(),
            )
        })?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad(&cert_path, format!("not an X.509 certificate: {e}")))?;
        if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(bad(
                &key_path,
                format!("this key does not belong to {}", cert_path.display()),
            ));
        }
        let found = cert
            .subject()
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .unwrap_or_default()
            .to_string();
        if found != fleet {
            return Err(PkiError::OtherFleet {
                dir: dir.to_path_buf(),
                found,
                expected: fleet.to_string(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der.into(), key)
            .map_err(|e| bad(&cert_path, e.to_string()))?;
        Ok(FleetCa {
            fleet: fleet.to_string(),
            dir: dir.to_path_buf(),
            cert_pem,
            issuer,
        })
    }

    fn create(dir: &Path, fleet: &str) -> Result<FleetCa, PkiError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| PkiError::Io {
                action: "create",
                path: dir.to_path_buf(),
                error,
            })?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, CA_COMMON_NAME);
        name.push(DnType::OrganizationalUnitName, fleet);
        params.distinguished_name = name;
        // Signs device and server certificates directly, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(random_serial());
        let cert_pem = params.self_signed(&key)?.pem();
        // The key first: a crash in between leaves ca.key alone, which open_or_create refuses
        // (Incomplete) instead of making a second CA beside a lost one.
        write_private(
            &dir.join(CA_KEY_FILE),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_private(&dir.join(CA_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        tracing::info!(fleet, dir = %dir.display(), "created a new fleet CA");
        Ok(FleetCa {
            fleet: fleet.to_string(),
            dir: dir.to_path_buf(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The fleet this CA signs for.
    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    /// The directory holding `ca.pem` and `ca.key`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate, PEM: what devices and brokers trust.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a client certificate for `device`, valid from now (less a few minutes of clock
    /// skew) for `validity`, from a PEM CSR (`edge_agent::enroll::device_csr`).
    ///
    /// Only the CSR's public key is used (its signature proves the device holds the private key):
    /// the certificate's subject is CN = `device`, it is for TLS client authentication only, it is
    /// not a CA, and its serial is random.
    pub fn sign_device(
        &self,
        csr_pem: &str,
        device: &str,
        validity: Duration,
    ) -> Result<String, PkiError> {
        let now = SystemTime::now();
        self.sign_device_between(csr_pem, device, now - CLOCK_SKEW, now + validity)
    }

    /// [`sign_device`](Self::sign_device) with an explicit validity period, e.g. one in the past
    /// to test that expired certificates are refused.
    pub fn sign_device_between(
        &self,
        csr_pem: &str,
        device: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, PkiError> {
        validate_segment(Segment::Device, device).map_err(|error| PkiError::Name {
            segment: Segment::Device,
            name: device.to_string(),
            error,
        })?;
        if not_after <= not_before {
            return Err(PkiError::Validity);
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::Csr)?;
        let params = client_params(device, not_before, not_after);
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// A server certificate and its new key, PEM `(certificate, key)`, for the TLS listener
    /// devices connect to. `names` are its DNS names or IP addresses (what devices put in their
    /// broker URL); valid for [`SERVER_VALIDITY`].
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            names
                .first()
                .map(String::as_str)
                .unwrap_or("cascade broker"),
        );
        name.push(DnType::OrganizationalUnitName, self.fleet.as_str());
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + SERVER_VALIDITY).into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate and its new key, PEM `(certificate, key)`, for a cloud service (the
    /// escalator connecting to Mosquitto with mutual TLS). `name` becomes its CN, hence its
    /// broker user name, and must not be a valid device id (e.g. `escalator:acme`), so that no
    /// device can enroll under it and inherit the service's ACL. Valid for [`SERVER_VALIDITY`].
    pub fn issue_service(&self, name: &str) -> Result<(String, String), PkiError> {
        if validate_segment(Segment::Device, name).is_ok()
            || name.is_empty()
            || name.contains(['/', '+', '#', '\0'])
        {
            return Err(PkiError::ServiceName(name.to_string()));
        }
        let key = KeyPair::generate()?;
        let now = SystemTime::now();
        let params = client_params(name, now - CLOCK_SKEW, now + SERVER_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A TLS client certificate's parameters: CN = `name`, client authentication only, not a CA.
fn client_params(name: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = Vec::<SanType>::new();
    params
}

/// 128 random bits, positive, with no leading zero byte (RFC 5280: at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The OS random source failing is not something to go on without: serials must not repeat.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut bytes).expect("the OS random number generator failed");
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The DER of the first certificate in a PEM text.
pub(crate) fn first_cert_der(pem: &str) -> Option<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| c.as_ref().to_vec())
}

/// Writes `bytes` to `path` through a temporary file created with `mode`, then renames it, so a
/// reader never sees half a file and a key is never readable by others, even for a moment.
pub fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let io = |action, error| PkiError::Io {
        action,
        path: path.to_path_buf(),
        error,
    };
    // A leftover temporary file would keep its old mode: start afresh.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    file.write_all(bytes).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("write", e))?;
    fs::rename(&tmp, path).map_err(|e| io("write", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::ParsedExtension;

    fn csr(device: &str) -> (String, String) {
        edge_agent::enroll::device_csr(device).unwrap()
    }

    fn parse(pem: &str) -> Vec<u8> {
        first_cert_der(pem).unwrap()
    }

    #[test]
    fn the_ca_can_be_shared_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<FleetCa>();
    }

    #[test]
    fn creates_then_reopens_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = FleetCa::open_or_create(&ca_dir, "acme").unwrap();
        let key_mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let again = FleetCa::open_or_create(&ca_dir, "acme").unwrap();
        assert_eq!(ca.ca_pem(), again.ca_pem());
        // The reopened CA signs certificates that chain to the same ca.pem.
        let (_, request) = csr("cam-01");
        let cert = again
            .sign_device(&request, "cam-01", Duration::from_secs(60))
            .unwrap();
        let der = parse(&cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = parse(ca.ca_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
    }

    #[test]
    fn refuses_another_fleets_ca_and_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::open_or_create(dir.path(), "acme").unwrap();
        let err = FleetCa::open_or_create(dir.path(), "other").unwrap_err();
        assert!(matches!(err, PkiError::OtherFleet { .. }), "{err}");
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let err = FleetCa::open_or_create(dir.path(), "acme").unwrap_err();
        assert!(matches!(err, PkiError::Incomplete { .. }), "{err}");
    }

    #[test]
    fn refuses_a_key_that_is_not_the_certificates() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        FleetCa::open_or_create(a.path(), "acme").unwrap();
        FleetCa::open_or_create(b.path(), "acme").unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = FleetCa::open_or_create(a.path(), "acme").unwrap_err();
        assert!(matches!(err, PkiError::BadCa { .. }), "{err}");
    }

    #[test]
    fn device_certificates_name_the_device_whatever_the_csr_asks() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::open_or_create(dir.path(), "acme").unwrap();
        // A CSR asking for another identity, server use and CA rights.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "cam-02");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let request = params.serialize_request(&key).unwrap().pem().unwrap();
        let pem = ca
            .sign_device(&request, "cam-01", DEFAULT_DEVICE_VALIDITY)
            .unwrap();
        let der = parse(&pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, ["cam-01"]);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice(),
            "the CSR's key is certified"
        );
        let mut saw_eku = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    saw_eku = true;
                    assert!(eku.client_auth && !eku.server_auth && !eku.any);
                }
                ParsedExtension::SubjectAlternativeName(_) => panic!("no SAN was to be copied"),
                _ => {}
            }
        }
        assert!(saw_eku);
        // Random serials: the same key signed twice gets two serials.
        let pem2 = ca
            .sign_device(&request, "cam-01", DEFAULT_DEVICE_VALIDITY)
            .unwrap();
        let der2 = parse(&pem2);
        let (_, cert2) = x509_parser::parse_x509_certificate(&der2).unwrap();
        assert_ne!(cert.raw_serial(), cert2.raw_serial());
    }

    #[test]
    fn refuses_bad_device_names_bad_csrs_and_empty_validity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::open_or_create(dir.path(), "acme").unwrap();
        let (_, request) = csr("cam-01");
        for bad in ["", "a/b", "+", "#", "x y"] {
            let err = ca
                .sign_device(&request, bad, Duration::from_secs(60))
                .unwrap_err();
            assert!(matches!(err, PkiError::Name { .. }), "{bad}: {err}");
        }
        let err = ca
            .sign_device("not a csr", "cam-01", Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");
        // A CSR whose signature does not match its content.
        let tampered = {
            let der = rustls_pemfile::csr(&mut request.as_bytes())
                .unwrap()
                .unwrap();
            let mut bytes = der.as_ref().to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            pem_encode("CERTIFICATE REQUEST", &bytes)
        };
        let err = ca
            .sign_device(&tampered, "cam-01", Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");
        let now = SystemTime::now();
        let err = ca
            .sign_device_between(&request, "cam-01", now, now)
            .unwrap_err();
        assert!(matches!(err, PkiError::Validity), "{err}");
    }

    #[test]
    fn service_names_cannot_be_device_ids() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::open_or_create(dir.path(), "acme").unwrap();
        assert!(ca.issue_service("escalator:acme").is_ok());
        for bad in ["escalator", "cam-01", "a/b", "x+", ""] {
            let err = ca.issue_service(bad).unwrap_err();
            assert!(matches!(err, PkiError::ServiceName(_)), "{bad}: {err}");
        }
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut text = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    text.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    text.push('=');
                }
            }
        }
        let body: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            body.join("\n")
        )
    }
}
