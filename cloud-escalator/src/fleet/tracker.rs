//! What the fleet's MQTT traffic says about each device, folded into rows to store. Pure: the
//! ingester feeds it decoded messages and the receive time, and takes the changed rows to write.
//!
//! Each replica ingests every device message (the subscriptions are not shared) and writes whole
//! rows. Reported values (status, last telemetry window, OTA state) are the same on every replica;
//! the agreement counts (`verdicts_seen`, `agreements_seen`) are sums over the telemetry a replica
//! has seen, so a replica started later writes smaller sums until the rows converge on its own
//! (it starts from the stored row, so a restart does not lose them).

use std::collections::{BTreeMap, HashMap, HashSet};

use cascade_proto::Message;
use cascade_proto::ota::OtaState;
use cascade_proto::status::Presence;
use serde::Serialize;

/// What devices report about themselves (the columns the ingester owns; group and labels are the
/// operator's and are not here).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Reported {
    /// `online` or `offline`.
    pub presence: String,
    /// First message seen, ms since the epoch (receive time).
    pub first_seen_ms: u64,
    /// Last message seen.
    pub last_seen_ms: u64,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Active edge model.
    pub model: Option<String>,
    /// Its version.
    pub model_version: Option<String>,
    /// Policy sequence in force.
    pub policy_sequence: u64,
    /// Totals since the agent started.
    pub inputs: u64,
    /// See `inputs`.
    pub escalations: u64,
    /// See `inputs`.
    pub verdicts: u64,
    /// See `inputs`.
    pub errors: u64,
    /// Agent uptime.
    pub uptime_s: u64,
    /// Escalations per input in the last telemetry window.
    pub escalation_rate: Option<f64>,
    /// Edge inference time in the last window.
    pub inference_p50_us: Option<u64>,
    /// See `inference_p50_us`.
    pub inference_p99_us: Option<u64>,
    /// Inputs waiting at the end of the last window.
    pub queue_depth: Option<u64>,
    /// Verdicts seen in telemetry, for the agreement rate.
    pub verdicts_seen: u64,
    /// Of which the edge agreed.
    pub agreements_seen: u64,
    /// The model version of the last OTA report.
    pub ota_model: Option<String>,
    /// Its state (`available`, `downloading`, `verified`, `activated`, `rolled_back`, `failed`).
    pub ota_state: Option<String>,
    /// Progress or reason.
    pub ota_detail: Option<String>,
    /// When reported (device clock).
    pub ota_at_ms: Option<u64>,
}

/// One minute of fleet activity as this replica saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Minute {
    /// Inputs devices reported.
    pub inputs: u64,
    /// Escalations devices reported.
    pub escalations: u64,
    /// Verdicts devices reported.
    pub verdicts: u64,
    /// Of which the edge agreed.
    pub agreements: u64,
    /// Verdicts this replica sent.
    pub answered: u64,
    /// Their latencies (µs), or a sample of them beyond [`MAX_LATENCY_SAMPLES`].
    pub latencies_us: Vec<u32>,
}

impl Minute {
    /// Verdict latency percentile, µs (nearest rank), if anything was answered.
    pub fn latency_percentile(&self, p: f64) -> Option<u64> {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted
            .get(rank.clamp(1, sorted.len().max(1)) - 1)
            .map(|&v| v.into())
    }
}

/// At most this many latency samples are kept per minute; beyond it, the percentiles come from a
/// systematic sample (every other sample is dropped when the buffer fills, so later samples weigh
/// up to twice as much as earlier ones), which bounds memory under any load.
const MAX_LATENCY_SAMPLES: usize = 20_000;

/// Folds device messages into rows.
#[derive(Debug)]
pub struct Tracker {
    devices: HashMap<String, Reported>,
    dirty: HashSet<String>,
    minutes: BTreeMap<u64, Minute>,
    max_devices: usize,
    /// Messages from new devices refused because `max_devices` was reached.
    pub refused: u64,
}

/// What happened to one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The device's row changed.
    Changed,
    /// A message kind the registry does not track.
    Ignored,
    /// A new device over the registry's limit.
    Refused,
}

impl Tracker {
    /// An empty tracker for at most `max_devices` devices.
    pub fn new(max_devices: usize) -> Self {
        Tracker {
            devices: HashMap::new(),
            dirty: HashSet::new(),
            minutes: BTreeMap::new(),
            max_devices,
            refused: 0,
        }
    }

    /// Starts from stored rows (so totals continue after a restart).
    pub fn load(&mut self, rows: impl IntoIterator<Item = (String, Reported)>) {
        self.devices.extend(rows);
    }

    /// Devices known.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device is known.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Applies a message from `device` received at `now_ms`.
    pub fn apply(&mut self, device: &str, message: &Message, now_ms: u64) -> Applied {
        if !matches!(
            message,
            Message::DeviceStatus(_) | Message::Telemetry(_) | Message::OtaStatus(_)
        ) {
            return Applied::Ignored;
        }
        if !self.devices.contains_key(device) && self.devices.len() >= self.max_devices {
            self.refused += 1;
            return Applied::Refused;
        }
        let row = self
            .devices
            .entry(device.to_owned())
            .or_insert_with(|| Reported {
                presence: "online".into(),
                first_seen_ms: now_ms,
                ..Reported::default()
            });
        row.last_seen_ms = now_ms;
        match message {
            Message::DeviceStatus(s) => {
                row.presence = match s.presence {
                    Presence::Online => "online",
                    Presence::Offline => "offline",
                }
                .into();
                row.agent_version = Some(s.agent_version.clone());
                row.model = s.model.as_ref().map(|m| m.name.clone());
                row.model_version = s.model.as_ref().map(|m| m.version.to_string());
                row.policy_sequence = s.policy_sequence;
                row.inputs = s.counters.inputs;
                row.escalations = s.counters.escalations;
                row.verdicts = s.counters.verdicts;
                row.errors = s.counters.errors;
                row.uptime_s = s.uptime_s;
            }
            Message::Telemetry(t) => {
                // Telemetry only comes from a running agent (a retained offline status may
                // have been read first, e.g. after a restart).
                row.presence = "online".into();
                row.escalation_rate =
                    (t.inputs > 0).then(|| f64::from(t.escalations) / f64::from(t.inputs));
                row.inference_p50_us = Some(t.inference_p50_us.into());
                row.inference_p99_us = Some(t.inference_p99_us.into());
                row.queue_depth = Some(t.queue_depth.into());
                row.verdicts_seen += u64::from(t.verdicts);
                row.agreements_seen += u64::from(t.agreements);
                let minute = self.minutes.entry(minute_of(now_ms)).or_default();
                minute.inputs += u64::from(t.inputs);
                minute.escalations += u64::from(t.escalations);
                minute.verdicts += u64::from(t.verdicts);
                minute.agreements += u64::from(t.agreements);
            }
            Message::OtaStatus(o) => {
                let (state, detail) = match &o.state {
                    OtaState::Available => ("available", None),
                    OtaState::Downloading {
                        received_bytes,
                        total_bytes,
                    } => (
                        "downloading",
                        Some(format!("{received_bytes}/{total_bytes} bytes")),
                    ),
                    OtaState::Verified => ("verified", None),
                    OtaState::Activated => ("activated", None),
                    OtaState::RolledBack { reason } => ("rolled_back", Some(reason.clone())),
                    OtaState::Failed { reason } => ("failed", Some(reason.clone())),
                };
                row.ota_model = Some(o.model.to_string());
                row.ota_state = Some(state.into());
                row.ota_detail = detail;
                row.ota_at_ms = Some(o.at_ms);
            }
            _ => unreachable!("filtered above"),
        }
        self.dirty.insert(device.to_owned());
        Applied::Changed
    }

    /// Records one verdict this replica sent, `latency_us` after the escalation arrived.
    pub fn answered(&mut self, latency_us: u32, now_ms: u64) {
        let minute = self.minutes.entry(minute_of(now_ms)).or_default();
        minute.answered += 1;
        if minute.latencies_us.len() >= MAX_LATENCY_SAMPLES {
            let mut keep = false;
            minute.latencies_us.retain(|_| {
                keep = !keep;
                keep
            });
        }
        minute.latencies_us.push(latency_us);
    }

    /// The rows changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<(String, Reported)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|id| self.devices.get(&id).map(|r| (id, r.clone())))
            .collect()
    }

    /// The minutes to write: every minute still held. Minutes before `now_ms`'s are then
    /// forgotten (they are complete once written).
    pub fn take_minutes(&mut self, now_ms: u64) -> Vec<(u64, Minute)> {
        let current = minute_of(now_ms);
        let all: Vec<(u64, Minute)> = self.minutes.iter().map(|(m, v)| (*m, v.clone())).collect();
        self.minutes.retain(|m, _| *m >= current);
        all
    }
}

impl Tracker {
    /// Takes back minutes whose write failed, to be written with the next flush (a minute still
    /// held is newer than its taken copy and stays).
    pub fn restore_minutes(&mut self, minutes: Vec<(u64, Minute)>) {
        for (start, minute) in minutes {
            self.minutes.entry(start).or_insert(minute);
        }
    }
}

/// The minute (ms since the epoch, floored) holding `ms`.
pub fn minute_of(ms: u64) -> u64 {
    ms - ms % 60_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::model::{ModelRef, Version};
    use cascade_proto::ota::OtaStatus;
    use cascade_proto::status::{Counters, DeviceStatus, Telemetry};

    fn status(presence: Presence, inputs: u64) -> Message {
        Message::DeviceStatus(DeviceStatus {
            device: "cam-1".into(),
            presence,
            agent_version: "0.1.0".into(),
            model: Some(ModelRef::new("digits", Version::new(1, 2, 0))),
            policy_sequence: 3,
            counters: Counters {
                inputs,
                escalations: 2,
                verdicts: 1,
                errors: 0,
            },
            uptime_s: 9,
            at_ms: 1,
        })
    }

    fn telemetry(inputs: u32, escalations: u32, verdicts: u32, agreements: u32) -> Message {
        Message::Telemetry(Telemetry {
            device: "cam-1".into(),
            at_ms: 1,
            window_ms: 10_000,
            inputs,
            escalations,
            audits: 0,
            budget_overflows: 0,
            verdicts,
            agreements,
            errors: 0,
            inference_p50_us: 40,
            inference_p99_us: 90,
            queue_depth: 2,
        })
    }

    #[test]
    fn status_then_last_will() {
        let mut t = Tracker::new(10);
        assert_eq!(
            t.apply("cam-1", &status(Presence::Online, 5), 1_000),
            Applied::Changed
        );
        let rows = t.take_dirty();
        assert_eq!(rows.len(), 1);
        let r = &rows[0].1;
        assert_eq!(
            (r.presence.as_str(), r.inputs, r.first_seen_ms),
            ("online", 5, 1_000)
        );
        assert_eq!(r.model.as_deref(), Some("digits"));
        assert_eq!(r.model_version.as_deref(), Some("1.2.0"));
        assert!(t.take_dirty().is_empty(), "nothing changed since");
        t.apply("cam-1", &status(Presence::Offline, 5), 2_000);
        let r = &t.take_dirty()[0].1;
        assert_eq!(
            (r.presence.as_str(), r.first_seen_ms, r.last_seen_ms),
            ("offline", 1_000, 2_000)
        );
    }

    #[test]
    fn telemetry_sets_rates_and_fills_the_minute() {
        let mut t = Tracker::new(10);
        t.apply("cam-1", &telemetry(100, 10, 8, 6), 60_000 + 5);
        t.apply("cam-1", &telemetry(50, 0, 2, 2), 60_000 + 10_000);
        let r = &t.take_dirty()[0].1;
        assert_eq!(r.escalation_rate, Some(0.0));
        assert_eq!((r.verdicts_seen, r.agreements_seen), (10, 8));
        t.answered(300, 60_500);
        t.answered(100, 60_600);
        t.answered(200, 60_700);
        let minutes = t.take_minutes(60_000 + 20_000);
        assert_eq!(minutes.len(), 1);
        let (start, m) = &minutes[0];
        assert_eq!(*start, 60_000);
        assert_eq!(
            (m.inputs, m.escalations, m.verdicts, m.agreements),
            (150, 10, 10, 8)
        );
        assert_eq!(m.answered, 3);
        assert_eq!(m.latency_percentile(50.0), Some(200));
        assert_eq!(m.latency_percentile(99.0), Some(300));
        // The current minute stays (it is still filling); an earlier one is dropped once taken.
        let taken = t.take_minutes(130_000);
        assert_eq!(taken.len(), 1);
        assert!(t.take_minutes(130_000).is_empty());
        // A failed write gives them back.
        t.restore_minutes(taken);
        assert_eq!(t.take_minutes(130_000).len(), 1);
    }

    #[test]
    fn ota_reports_and_ignored_kinds() {
        let mut t = Tracker::new(10);
        let ota = Message::OtaStatus(OtaStatus {
            device: "cam-1".into(),
            model: ModelRef::new("digits", Version::new(1, 3, 0)),
            state: OtaState::Downloading {
                received_bytes: 10,
                total_bytes: 40,
            },
            at_ms: 7,
        });
        t.apply("cam-1", &ota, 1);
        let r = &t.take_dirty()[0].1;
        assert_eq!(r.ota_state.as_deref(), Some("downloading"));
        assert_eq!(r.ota_detail.as_deref(), Some("10/40 bytes"));
        assert_eq!(r.ota_model.as_deref(), Some("digits@1.3.0"));
        let other = Message::OtaChunkRequest(cascade_proto::ota::ChunkRequest {
            model: ModelRef::new("digits", Version::new(1, 3, 0)),
            artifact: cascade_proto::ota::ArtifactKind::Full,
            first: 0,
            count: 1,
        });
        assert_eq!(t.apply("cam-1", &other, 2), Applied::Ignored);
    }

    #[test]
    fn the_device_limit_holds() {
        let mut t = Tracker::new(1);
        assert_eq!(t.apply("a", &telemetry(1, 0, 0, 0), 1), Applied::Changed);
        assert_eq!(t.apply("b", &telemetry(1, 0, 0, 0), 1), Applied::Refused);
        assert_eq!(t.apply("a", &telemetry(1, 0, 0, 0), 2), Applied::Changed);
        assert_eq!((t.len(), t.refused), (1, 1));
    }

    #[test]
    fn latency_samples_are_bounded() {
        let mut t = Tracker::new(1);
        for i in 0..(MAX_LATENCY_SAMPLES as u32 * 3) {
            t.answered(i, 5);
        }
        let m = &t.take_minutes(5)[0].1;
        assert!(m.latencies_us.len() <= MAX_LATENCY_SAMPLES);
        assert_eq!(
            m.answered,
            MAX_LATENCY_SAMPLES as u64 * 3,
            "every verdict counted"
        );
        let p50 = m.latency_percentile(50.0).unwrap();
        // The sample still spans the range.
        assert!(p50 > 10_000 && p50 < 50_000, "{p50}");
    }
}
