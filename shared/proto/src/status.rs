//! What a device says about itself: a retained status (also its last will) and periodic telemetry.

use alloc::string::String;

use serde::{Deserialize, Serialize};

use crate::model::ModelRef;
use crate::validate::{ValidationError, check_identifier, check_text};

/// Whether a device is connected. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Connected and serving.
    Online,
    /// Gone: said on clean shutdown, or by the broker as the device's last will.
    Offline,
}

/// Running totals since the agent started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// Inputs classified.
    pub inputs: u64,
    /// Escalations sent.
    pub escalations: u64,
    /// Verdicts applied.
    pub verdicts: u64,
    /// Inputs that failed (bad input, inference error).
    pub errors: u64,
}

/// A device's retained status message. Its `Offline` form is registered as the MQTT last will.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStatus {
    /// Device id.
    pub device: String,
    /// Online or offline.
    pub presence: Presence,
    /// Agent version, e.g. `0.1.0`.
    pub agent_version: String,
    /// The active edge model, if one is loaded.
    pub model: Option<ModelRef>,
    /// Sequence number of the policy in force (0: the configured one).
    pub policy_sequence: u64,
    /// Totals since start.
    pub counters: Counters,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// Device wall clock, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl DeviceStatus {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        check_identifier("status.device", &self.device)?;
        check_text("status.agent_version", &self.agent_version)?;
        if let Some(model) = &self.model {
            model.validate("status.model.name")?;
        }
        Ok(())
    }
}

/// Activity over one reporting window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// Device id.
    pub device: String,
    /// End of the window, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Window length, milliseconds.
    pub window_ms: u32,
    /// Inputs classified in the window.
    pub inputs: u32,
    /// Escalations sent (all rules).
    pub escalations: u32,
    /// Of which audit samples.
    pub audits: u32,
    /// Inputs that wanted escalation but found the budget spent.
    pub budget_overflows: u32,
    /// Verdicts received.
    pub verdicts: u32,
    /// Verdicts that agreed with the edge answer.
    pub agreements: u32,
    /// Inputs that failed.
    pub errors: u32,
    /// Edge inference time, median, microseconds.
    pub inference_p50_us: u32,
    /// Edge inference time, 99th percentile, microseconds.
    pub inference_p99_us: u32,
    /// Inputs waiting at the end of the window.
    pub queue_depth: u32,
}

impl Telemetry {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        check_identifier("telemetry.device", &self.device)?;
        if self.audits > self.escalations || self.agreements > self.verdicts {
            return Err(ValidationError::Inconsistent {
                field: "telemetry",
                problem: "a part (audits, agreements) exceeds its whole (escalations, verdicts)",
            });
        }
        Ok(())
    }
}
