//! The escalation policy an agent applies, as the cloud sends it (signed, like a manifest).

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::escalation::{ConfidenceMetric, PrivacyMode};
use crate::ota::TargetSelector;
use crate::signing::Signable;
use crate::validate::{MAX_LIST_LEN, ValidationError, check_len, check_range};

/// A threshold for one predicted class, overriding the default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassThreshold {
    /// Class index.
    pub class: u32,
    /// Escalate when confidence is under this, `0..=1`.
    pub threshold: f32,
}

/// What happens to an input that should be escalated when the budget is spent. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Keep the edge answer and count the input as an overflow.
    KeepEdge,
    /// Hold the input and escalate it when budget returns; beyond `max` held, keep the edge answer.
    Queue {
        /// Most inputs held.
        max: u32,
    },
}

/// Escalations allowed per minute (a token bucket), and what happens beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Sustained escalations per minute; 0 disables escalation.
    pub per_minute: u32,
    /// Bucket size: escalations allowed in a burst.
    pub burst: u32,
    /// Behaviour when the bucket is empty.
    pub overflow: Overflow,
}

/// An escalation policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Increases with every update; an agent ignores a policy not newer than the one it runs,
    /// so an old signed policy cannot be replayed.
    pub sequence: u64,
    /// How confidence is measured.
    pub metric: ConfidenceMetric,
    /// Escalate when confidence is under this, `0..=1`.
    pub threshold: f32,
    /// Per-class overrides of `threshold`.
    pub class_thresholds: Vec<ClassThreshold>,
    /// Rate limit on escalations.
    pub budget: Budget,
    /// Share of confident inputs escalated anyway for drift monitoring, `0..=1`.
    pub audit_rate: f32,
    /// What escalations may carry.
    pub privacy: PrivacyMode,
    /// Which devices it is for.
    pub target: TargetSelector,
}

/// The token bucket a [`Budget`] describes: `burst` tokens, refilled at `per_minute` per minute.
///
/// Time is passed in (milliseconds on any monotonic clock), so the bucket is pure and testable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    capacity: f64,
    per_ms: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`. A zero burst with a non-zero rate holds one token.
    pub fn new(per_minute: u32, burst: u32, now_ms: u64) -> Self {
        let capacity = if per_minute == 0 {
            0.0
        } else {
            f64::from(burst.max(1))
        };
        TokenBucket {
            capacity,
            per_ms: f64::from(per_minute) / 60_000.0,
            tokens: capacity,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes a token if one is available at `now_ms`.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whole tokens available at `now_ms`.
    pub fn available(&mut self, now_ms: u64) -> u32 {
        self.refill(now_ms);
        self.tokens as u32
    }
}

impl Signable for Policy {
    const DOMAIN: &'static str = "cascade/v1/policy";
}

impl Policy {
    /// Checks ranges: thresholds and audit rate in `0..=1`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_range("policy.threshold", self.threshold, 0.0, 1.0)?;
        check_range("policy.audit_rate", self.audit_rate, 0.0, 1.0)?;
        check_len(
            "policy.class_thresholds",
            self.class_thresholds.len(),
            MAX_LIST_LEN,
        )?;
        for ct in &self.class_thresholds {
            check_range("policy.class_thresholds.threshold", ct.threshold, 0.0, 1.0)?;
        }
        self.target.validate("policy.target")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(60, 3, 0);
        assert!(b.try_take(0) && b.try_take(0) && b.try_take(0));
        assert!(!b.try_take(0), "burst spent");
        assert!(!b.try_take(999), "one per second: not yet");
        assert!(b.try_take(1000));
        assert_eq!(b.available(10_000), 3, "refills up to the burst only");
    }

    #[test]
    fn zero_rate_never_allows() {
        let mut b = TokenBucket::new(0, 10, 0);
        assert!(!b.try_take(0) && !b.try_take(1_000_000));
    }

    #[test]
    fn time_going_backwards_does_not_refill() {
        let mut b = TokenBucket::new(60, 1, 5_000);
        assert!(b.try_take(5_000));
        assert!(!b.try_take(1_000));
        assert!(!b.try_take(5_500));
    }
}
