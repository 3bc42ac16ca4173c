//! `cloud-escalator install`: the escalator's part of the shared installer
//! ([`edge_agent::install`]): its configuration template and what its configuration needs from
//! the unit.

use std::path::Path;

use cloud_escalator::config::EscalatorConfig;
use edge_agent::install::{ConfigNeeds, Service};

/// The escalator's default configuration (`/etc/cascade/escalator.toml`).
const TEMPLATE: &str = include_str!("../dist/escalator.toml");

/// The cloud escalator as a systemd service.
pub const ESCALATOR: Service = Service {
    name: "cloud-escalator",
    description: "Cascade cloud escalator",
    config_name: "escalator.toml",
    state_name: "escalator",
    template: TEMPLATE,
    run_args: &["serve"],
    hostname_key: None,
    // The embedded broker holds one connection per device.
    limit_nofile: Some(65536),
    needs,
};

/// The directories the escalator writes to: the hard-example store's and the OTA registry.
fn needs(text: &str, check: bool) -> Result<ConfigNeeds, String> {
    let config: EscalatorConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    if check {
        config.validate().map_err(|e| e.to_string())?;
    }
    let mut needs = ConfigNeeds::default();
    // SQLite writes its journal beside the database: the directory must be writable.
    if config.store.path != Path::new(":memory:")
        && let Some(dir) = config.store.path.parent()
    {
        needs.read_write_paths.push(dir.to_owned());
    }
    if let Some(registry) = config.ota.registry {
        needs.read_write_paths.push(registry);
    }
    // The fleet store, when it is a SQLite file (a postgres:// URL needs nothing on disk).
    if let Some(management) = &config.management
        && !management.store.contains("://")
    {
        let path = Path::new(
            management
                .store
                .strip_prefix("sqlite:")
                .unwrap_or(&management.store),
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            needs.read_write_paths.push(dir.to_owned());
        }
    }
    // The fleet CA is created on first start.
    if let Some(identity) = config.identity {
        needs.read_write_paths.push(identity.ca_dir);
    }
    needs.read_write_paths.sort();
    needs.read_write_paths.dedup();
    Ok(needs)
}
