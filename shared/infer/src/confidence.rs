//! How sure a classifier is: softmax, top-k, and three confidence metrics in `0..=1`.

use std::fmt;
use std::str::FromStr;

/// A confidence metric over a probability vector. Every metric lies in `0..=1`, higher is surer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Metric {
    /// The top-1 probability.
    #[default]
    MaxProb,
    /// Top-1 minus top-2 probability.
    Margin,
    /// `1 - H(p) / ln K`: 1 for one-hot, 0 for uniform.
    Entropy,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 3] = [Metric::MaxProb, Metric::Margin, Metric::Entropy];

    /// The name used in config and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Metric::MaxProb => "max_prob",
            Metric::Margin => "margin",
            Metric::Entropy => "entropy",
        }
    }

    /// The metric's value for probabilities `p`.
    pub fn of(self, p: &[f32]) -> f32 {
        match self {
            Metric::MaxProb => top2(p).0,
            Metric::Margin => {
                let (a, b) = top2(p);
                (a - b).max(0.0)
            }
            Metric::Entropy => normalized_certainty(p),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown confidence metric {s:?}: expected max_prob, margin or entropy")
            })
    }
}

/// The best class of a score vector, with its confidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confidence {
    /// Index of the best class.
    pub class: usize,
    /// Its probability.
    pub probability: f32,
    /// The confidence under `metric`.
    pub value: f32,
    /// The metric.
    pub metric: Metric,
}

impl Confidence {
    /// Confidence of `probabilities` under `metric`; `None` for an empty vector.
    pub fn of(probabilities: &[f32], metric: Metric) -> Option<Self> {
        let (class, &probability) = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))?;
        Some(Confidence {
            class,
            probability,
            value: metric.of(probabilities),
            metric,
        })
    }
}

/// Numerically stable softmax. NaN logits count as `-inf` (probability 0).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let clean = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let max = logits
        .iter()
        .copied()
        .map(clean)
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let n = logits.len().max(1) as f32;
        return vec![1.0 / n; logits.len()];
    }
    let exps: Vec<f32> = logits.iter().map(|&x| (clean(x) - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The `k` best classes, best first, as `(class, score)`.
pub fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(k);
    ranked
}

fn top2(p: &[f32]) -> (f32, f32) {
    let mut best = (0.0f32, 0.0f32);
    for &x in p {
        let x = if x.is_nan() { 0.0 } else { x };
        if x > best.0 {
            best = (x, best.0);
        } else if x > best.1 {
            best.1 = x;
        }
    }
    (best.0.clamp(0.0, 1.0), best.1.clamp(0.0, 1.0))
}

fn normalized_certainty(p: &[f32]) -> f32 {
    if p.len() < 2 {
        return 1.0;
    }
    let clean: Vec<f32> = p
        .iter()
        .map(|&x| if x.is_finite() { x.max(0.0) } else { 0.0 })
        .collect();
    let sum: f32 = clean.iter().sum();
    if sum <= 0.0 {
        return 0.0;
    }
    let entropy: f32 = clean
        .iter()
        .map(|&x| x / sum)
        .filter(|&q| q > 0.0)
        .map(|q| -q * q.ln())
        .sum();
    (1.0 - entropy / (p.len() as f32).ln()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6 && p[2] == 0.0);
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0]);
    }

    #[test]
    fn metrics_agree_on_extremes() {
        let one_hot = [0.0, 1.0, 0.0, 0.0];
        let uniform = [0.25; 4];
        for m in Metric::ALL {
            assert!((m.of(&one_hot) - 1.0).abs() < 1e-6, "{m} on one-hot");
        }
        assert!((Metric::MaxProb.of(&uniform) - 0.25).abs() < 1e-6);
        assert_eq!(Metric::Margin.of(&uniform), 0.0);
        assert!(Metric::Entropy.of(&uniform).abs() < 1e-6);
    }

    #[test]
    fn margin_is_top1_minus_top2() {
        assert!((Metric::Margin.of(&[0.1, 0.6, 0.3]) - 0.3).abs() < 1e-6);
    }

    #[test]
    fn confidence_picks_the_best_class() {
        let c = Confidence::of(&[0.2, 0.7, 0.1], Metric::MaxProb).unwrap();
        assert_eq!(c.class, 1);
        assert!((c.value - 0.7).abs() < 1e-6);
        assert!(Confidence::of(&[], Metric::MaxProb).is_none());
    }

    #[test]
    fn top_k_orders_best_first() {
        assert_eq!(top_k(&[0.1, 0.5, 0.4], 2), vec![(1, 0.5), (2, 0.4)]);
    }

    #[test]
    fn nan_does_not_poison_metrics() {
        for m in Metric::ALL {
            let v = m.of(&[f32::NAN, 0.9, 0.1]);
            assert!(v.is_finite() && (0.0..=1.0).contains(&v), "{m}: {v}");
        }
    }
}
