//! Enrollment: the fleet API signs a device's certificate request with the fleet CA
//! ([`crate::pki`]) once an enrollment token is redeemed.

use std::time::Duration;

use super::IdentityConfig;
use super::api::Enroller;
use crate::pki::FleetCa;

/// The fleet CA as the API's [`Enroller`].
#[derive(Debug)]
pub struct CaEnroller {
    ca: std::sync::Arc<FleetCa>,
    validity: Duration,
    broker: Option<String>,
}

impl CaEnroller {
    /// The fleet CA (`FleetCa::open_or_create`) with the identity settings.
    pub fn new(ca: std::sync::Arc<FleetCa>, config: &IdentityConfig) -> CaEnroller {
        CaEnroller {
            ca,
            validity: Duration::from_secs(u64::from(config.cert_days) * 86_400),
            // Without an explicit URL, the gate's own address under its first server name.
            broker: config.device_broker_url.clone().or_else(|| {
                let port = config.gate_listen?.port();
                let host = config.server_names.first()?;
                Some(format!("mqtts://{host}:{port}"))
            }),
        }
    }
}

impl Enroller for CaEnroller {
    fn sign(&self, device: &str, csr_pem: &str) -> Result<String, String> {
        self.ca
            .sign_device(csr_pem, device, self.validity)
            .map_err(|e| e.to_string())
    }

    fn ca_pem(&self) -> String {
        self.ca.ca_pem().to_owned()
    }

    fn broker_url(&self) -> Option<String> {
        self.broker.clone()
    }
}
