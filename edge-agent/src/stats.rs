//! Counters the agent keeps: totals for status and metrics, a window for telemetry.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cascade_proto::status::{Counters, Telemetry};

/// The agent's counters. Shared by its tasks; every field is a running total.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequence of the signed policy in force (0: the configured one).
    pub policy_sequence: AtomicU64,
    /// Inputs classified.
    pub inputs: AtomicU64,
    /// Inputs that failed (unreadable, wrong shape, inference error).
    pub errors: AtomicU64,
    /// Escalations sent.
    pub escalations: AtomicU64,
    /// Of which audit samples.
    pub audits: AtomicU64,
    /// Inputs that wanted escalation but found the budget spent.
    pub overflows: AtomicU64,
    /// Verdicts applied.
    pub verdicts: AtomicU64,
    /// Verdicts agreeing with the edge.
    pub agreements: AtomicU64,
    /// Verdicts received twice (ignored).
    pub duplicate_verdicts: AtomicU64,
    /// Verdicts for escalations this agent does not know (logged, dropped).
    pub unknown_verdicts: AtomicU64,
    /// Escalations refused by the cloud.
    pub rejections: AtomicU64,
    /// Escalations dropped from the spool (full, expired, corrupt).
    pub dropped: AtomicU64,
    /// Escalation bytes sent.
    pub escalation_bytes: AtomicU64,
    /// Broker connection losses.
    pub disconnects: AtomicU64,
    /// Messages from the broker that did not decode or verify.
    pub bad_messages: AtomicU64,
    /// Sensor frames dropped (corrupt, too long) or lost (sequence gaps) on the serial link.
    pub bad_frames: AtomicU64,
    /// Entries in the spool.
    pub spooled: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    latencies_us: Vec<u32>,
    start: Counters,
    start_audits: u64,
    start_overflows: u64,
    start_agreements: u64,
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// Records an edge inference time.
    pub fn record_latency(&self, us: u64) {
        if let Ok(mut w) = self.window.lock() {
            // Bounded: a telemetry window keeps at most 100k samples.
            if w.latencies_us.len() < 100_000 {
                w.latencies_us.push(us.min(u64::from(u32::MAX)) as u32);
            }
        }
    }

    /// Totals for the device status.
    pub fn counters(&self) -> Counters {
        Counters {
            inputs: self.inputs.load(Ordering::Relaxed),
            escalations: self.escalations.load(Ordering::Relaxed),
            verdicts: self.verdicts.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    /// Telemetry since the previous call; starts a new window.
    pub fn telemetry(
        &self,
        device: &str,
        at_ms: u64,
        window_ms: u32,
        queue_depth: u32,
    ) -> Telemetry {
        let now = self.counters();
        let audits = self.audits.load(Ordering::Relaxed);
        let overflows = self.overflows.load(Ordering::Relaxed);
        let agreements = self.agreements.load(Ordering::Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut lat = std::mem::take(&mut w.latencies_us);
        lat.sort_unstable();
        let pick = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let delta = |a: u64, b: u64| u32::try_from(a.saturating_sub(b)).unwrap_or(u32::MAX);
        let escalations = delta(now.escalations, w.start.escalations);
        let verdicts = delta(now.verdicts, w.start.verdicts);
        let t = Telemetry {
            device: device.to_string(),
            at_ms,
            window_ms,
            inputs: delta(now.inputs, w.start.inputs),
            escalations,
            audits: delta(audits, w.start_audits).min(escalations),
            budget_overflows: delta(overflows, w.start_overflows),
            verdicts,
            agreements: delta(agreements, w.start_agreements).min(verdicts),
            errors: delta(now.errors, w.start.errors),
            inference_p50_us: pick(0.5),
            inference_p99_us: pick(0.99),
            queue_depth,
        };
        w.start = now;
        w.start_audits = audits;
        w.start_overflows = overflows;
        w.start_agreements = agreements;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_reports_the_window_then_restarts() {
        let s = Stats::default();
        for us in [100, 200, 300, 400] {
            s.record_latency(us);
            bump(&s.inputs);
        }
        bump(&s.escalations);
        bump(&s.audits);
        let t = s.telemetry("d", 1, 1000, 0);
        assert_eq!((t.inputs, t.escalations, t.audits), (4, 1, 1));
        assert_eq!(t.inference_p50_us, 300);
        let t = s.telemetry("d", 2, 1000, 0);
        assert_eq!((t.inputs, t.escalations, t.inference_p50_us), (0, 0, 0));
    }
}
