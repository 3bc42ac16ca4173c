//! Accuracy and the confidence curve: what escalating below each threshold would cost and buy.
//!
//! Pure functions over per-input predictions, so the `eval` command, the escalator's demo and
//! tests compute the same figures.

use crate::confidence::{Confidence, Metric};

/// One input's prediction: best class and its confidence under some metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Predicted class.
    pub class: usize,
    /// Confidence in `0..=1`.
    pub confidence: f32,
}

impl Prediction {
    /// The prediction for a probability vector.
    pub fn from_probabilities(p: &[f32], metric: Metric) -> Option<Self> {
        Confidence::of(p, metric).map(|c| Prediction {
            class: c.class,
            confidence: c.value,
        })
    }
}

/// The curve at one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    /// Inputs with confidence below this are escalated.
    pub threshold: f32,
    /// Share of inputs escalated.
    pub escalated: f64,
    /// Accuracy of the edge on the inputs it keeps (`None` if it keeps none).
    pub kept_accuracy: Option<f64>,
    /// Accuracy of edge-then-cloud, when cloud predictions are given.
    pub cascade_accuracy: Option<f64>,
}

/// Share of predictions equal to their label.
pub fn accuracy(predictions: &[usize], labels: &[usize]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let right = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count();
    right as f64 / labels.len() as f64
}

/// The confidence curve of `edge` predictions at each threshold, and the cascade's accuracy when
/// `cloud` predictions (one per input) are given.
pub fn confidence_curve(
    edge: &[Prediction],
    labels: &[usize],
    cloud: Option<&[usize]>,
    thresholds: &[f32],
) -> Vec<CurvePoint> {
    let n = labels.len().max(1) as f64;
    thresholds
        .iter()
        .map(|&threshold| {
            let mut escalated = 0usize;
            let mut kept = 0usize;
            let mut kept_right = 0usize;
            let mut cascade_right = 0usize;
            for (i, (p, &label)) in edge.iter().zip(labels).enumerate() {
                if p.confidence < threshold {
                    escalated += 1;
                    if cloud.is_some_and(|c| c[i] == label) {
                        cascade_right += 1;
                    }
                } else {
                    kept += 1;
                    if p.class == label {
                        kept_right += 1;
                        cascade_right += 1;
                    }
                }
            }
            CurvePoint {
                threshold,
                escalated: escalated as f64 / n,
                kept_accuracy: (kept > 0).then(|| kept_right as f64 / kept as f64),
                cascade_accuracy: cloud.map(|_| cascade_right as f64 / n),
            }
        })
        .collect()
}

/// Thresholds `0.0, step, 2*step, ..., 1.0`.
pub fn thresholds(step: f32) -> Vec<f32> {
    let steps = (1.0 / step.max(1e-3)).round() as usize;
    (0..=steps).map(|i| (i as f32 * step).min(1.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(class: usize, confidence: f32) -> Prediction {
        Prediction { class, confidence }
    }

    #[test]
    fn curve_counts_escalations_and_cascade_accuracy() {
        let edge = [p(0, 0.9), p(1, 0.4), p(2, 0.2), p(0, 0.95)];
        let labels = [0, 2, 2, 1];
        let cloud = [0, 2, 2, 1];
        let curve = confidence_curve(&edge, &labels, Some(&cloud), &[0.0, 0.5, 1.0]);
        // Threshold 0: nothing escalated, edge right on 2 of 4.
        assert_eq!(curve[0].escalated, 0.0);
        assert_eq!(curve[0].kept_accuracy, Some(0.5));
        assert_eq!(curve[0].cascade_accuracy, Some(0.5));
        // Threshold 0.5: inputs 1 and 2 go to the cloud, which fixes input 1.
        assert_eq!(curve[1].escalated, 0.5);
        assert_eq!(curve[1].kept_accuracy, Some(0.5));
        assert_eq!(curve[1].cascade_accuracy, Some(0.75));
        // Threshold 1: everything escalated: cloud-only accuracy.
        assert_eq!(curve[2].escalated, 1.0);
        assert_eq!(curve[2].kept_accuracy, None);
        assert_eq!(curve[2].cascade_accuracy, Some(1.0));
    }

    #[test]
    fn thresholds_span_zero_to_one() {
        let t = thresholds(0.25);
        assert_eq!(t, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }
}
