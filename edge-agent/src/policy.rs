//! The escalation policy: which inputs go to the cloud. Pure: time and randomness are passed in.
//!
//! An input is escalated when its confidence is under the threshold (the predicted class's own
//! threshold if it has one), or when it is picked by the random audit sample of confident inputs.
//! Escalations spend tokens from a budget; without a token, a low-confidence input either keeps the
//! edge answer (counted as an overflow) or waits in a bounded queue until budget returns. Audit
//! samples never wait: they are skipped when the budget is spent.

use cascade_infer::Metric;
use cascade_proto::escalation::{ConfidenceMetric, PolicyRule};
use cascade_proto::policy::{Overflow, Policy, TokenBucket};

/// What to do with one input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Answer from the edge.
    Keep,
    /// Send it to the cloud, citing `rule`.
    Escalate(PolicyRule),
    /// It should go to the cloud but the budget is spent: keep the edge answer.
    Overflow,
    /// It should go to the cloud but the budget is spent: hold it until a token frees up.
    Hold(PolicyRule),
}

/// The metric the protocol names, as the engine computes it.
pub fn metric(m: ConfidenceMetric) -> Metric {
    match m {
        ConfidenceMetric::MaxProb => Metric::MaxProb,
        ConfidenceMetric::Margin => Metric::Margin,
        ConfidenceMetric::Entropy => Metric::Entropy,
    }
}

/// A policy in force, with its budget's state.
#[derive(Debug, Clone)]
pub struct PolicyState {
    policy: Policy,
    bucket: TokenBucket,
    held: u32,
}

impl PolicyState {
    /// Starts enforcing `policy` at `now_ms`.
    pub fn new(policy: Policy, now_ms: u64) -> Self {
        let bucket = TokenBucket::new(policy.budget.per_minute, policy.budget.burst, now_ms);
        PolicyState {
            policy,
            bucket,
            held: 0,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy if `update` is newer; returns whether it was applied. The budget
    /// restarts full under the new rates.
    pub fn replace(&mut self, update: Policy, now_ms: u64) -> bool {
        if update.sequence <= self.policy.sequence {
            return false;
        }
        *self = PolicyState::new(update, now_ms);
        true
    }

    /// Decides for an input whose class probabilities are `probabilities`. `audit_draw` is a
    /// uniform random number in `0..1`.
    pub fn decide(&mut self, probabilities: &[f32], now_ms: u64, audit_draw: f32) -> Decision {
        let p = &self.policy;
        let confidence = metric(p.metric).of(probabilities);
        let class = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        let rule = match p.class_thresholds.iter().find(|t| t.class == class) {
            Some(t) if confidence < t.threshold => Some(PolicyRule::ClassThreshold {
                class,
                threshold: t.threshold,
            }),
            Some(_) => None,
            None if confidence < p.threshold => Some(PolicyRule::LowConfidence {
                threshold: p.threshold,
            }),
            None => None,
        };
        match rule {
            Some(rule) if self.bucket.try_take(now_ms) => Decision::Escalate(rule),
            Some(rule) => match p.budget.overflow {
                Overflow::Queue { max } if self.held < max => {
                    self.held += 1;
                    Decision::Hold(rule)
                }
                _ => Decision::Overflow,
            },
            None if audit_draw < p.audit_rate && self.bucket.try_take(now_ms) => {
                Decision::Escalate(PolicyRule::Audit)
            }
            None => Decision::Keep,
        }
    }

    /// Whether a held input may now be escalated (takes a token if so).
    pub fn release_held(&mut self, now_ms: u64) -> bool {
        if self.held > 0 && self.bucket.try_take(now_ms) {
            self.held -= 1;
            true
        } else {
            false
        }
    }

    /// Inputs currently held.
    pub fn held(&self) -> u32 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::escalation::PrivacyMode;
    use cascade_proto::ota::TargetSelector;
    use cascade_proto::policy::{Budget, ClassThreshold};

    fn policy(threshold: f32, per_minute: u32, burst: u32, overflow: Overflow) -> Policy {
        Policy {
            sequence: 1,
            metric: ConfidenceMetric::MaxProb,
            threshold,
            class_thresholds: vec![],
            budget: Budget {
                per_minute,
                burst,
                overflow,
            },
            audit_rate: 0.0,
            privacy: PrivacyMode::Raw,
            target: TargetSelector::All,
        }
    }

    const SURE: [f32; 3] = [0.9, 0.05, 0.05];
    const UNSURE: [f32; 3] = [0.4, 0.35, 0.25];

    #[test]
    fn escalates_low_confidence_only() {
        let mut s = PolicyState::new(policy(0.6, 600, 10, Overflow::KeepEdge), 0);
        assert_eq!(s.decide(&SURE, 0, 0.5), Decision::Keep);
        assert_eq!(
            s.decide(&UNSURE, 0, 0.5),
            Decision::Escalate(PolicyRule::LowConfidence { threshold: 0.6 })
        );
    }

    #[test]
    fn class_thresholds_override_the_default() {
        let mut p = policy(0.6, 600, 10, Overflow::KeepEdge);
        p.class_thresholds = vec![ClassThreshold {
            class: 0,
            threshold: 0.95,
        }];
        let mut s = PolicyState::new(p, 0);
        assert_eq!(
            s.decide(&SURE, 0, 0.5),
            Decision::Escalate(PolicyRule::ClassThreshold {
                class: 0,
                threshold: 0.95
            })
        );
        // Class 1 has no override: the default threshold applies.
        assert_eq!(s.decide(&[0.05, 0.9, 0.05], 0, 0.5), Decision::Keep);
    }

    #[test]
    fn a_spent_budget_keeps_the_edge_answer_or_holds() {
        let mut keep = PolicyState::new(policy(0.6, 60, 1, Overflow::KeepEdge), 0);
        assert!(matches!(
            keep.decide(&UNSURE, 0, 0.5),
            Decision::Escalate(_)
        ));
        assert_eq!(keep.decide(&UNSURE, 10, 0.5), Decision::Overflow);

        let mut queue = PolicyState::new(policy(0.6, 60, 1, Overflow::Queue { max: 1 }), 0);
        assert!(matches!(
            queue.decide(&UNSURE, 0, 0.5),
            Decision::Escalate(_)
        ));
        assert!(matches!(queue.decide(&UNSURE, 10, 0.5), Decision::Hold(_)));
        assert_eq!(
            queue.decide(&UNSURE, 20, 0.5),
            Decision::Overflow,
            "queue full"
        );
        assert!(!queue.release_held(500), "no token yet");
        assert!(queue.release_held(1_020), "a token a second");
        assert_eq!(queue.held(), 0);
    }

    #[test]
    fn audits_sample_confident_inputs_within_budget() {
        let mut p = policy(0.6, 600, 1, Overflow::KeepEdge);
        p.audit_rate = 0.1;
        let mut s = PolicyState::new(p, 0);
        assert_eq!(
            s.decide(&SURE, 0, 0.5),
            Decision::Keep,
            "draw above the rate"
        );
        assert_eq!(
            s.decide(&SURE, 0, 0.05),
            Decision::Escalate(PolicyRule::Audit)
        );
        assert_eq!(
            s.decide(&SURE, 0, 0.05),
            Decision::Keep,
            "no budget: audit skipped"
        );
    }

    #[test]
    fn only_newer_policies_replace() {
        let mut s = PolicyState::new(policy(0.6, 600, 1, Overflow::KeepEdge), 0);
        let mut older = policy(0.1, 600, 1, Overflow::KeepEdge);
        older.sequence = 1;
        assert!(!s.replace(older, 0));
        let mut newer = policy(0.1, 600, 1, Overflow::KeepEdge);
        newer.sequence = 2;
        assert!(s.replace(newer, 0));
        assert_eq!(s.decide(&UNSURE, 0, 0.5), Decision::Keep);
    }
}
