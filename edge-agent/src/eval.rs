//! `edge-agent eval`: accuracy on a labelled set, and the confidence curve.

use std::fmt;
use std::path::{Path, PathBuf};

use cascade_infer::evaluation::{CurvePoint, Prediction, accuracy, confidence_curve, thresholds};
use cascade_infer::metadata::Metadata;
use cascade_infer::{InferError, LoadOptions, Metric, Model, Tensor, load_path, run_batch};
use serde::Serialize;

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Edge model.
    pub model: PathBuf,
    /// Directory with `inputs.npy` and `labels.npy`.
    pub data: PathBuf,
    /// Cloud model, for the cascade's accuracy.
    pub cloud_model: Option<PathBuf>,
    /// Confidence metric.
    pub metric: Metric,
    /// Threshold step of the curve.
    pub step: f32,
    /// Engine options.
    pub load: LoadOptions,
}

/// What an evaluation found.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Edge model file.
    pub model: String,
    /// Cloud model file, if any.
    pub cloud_model: Option<String>,
    /// Labelled inputs evaluated.
    pub samples: usize,
    /// Confidence metric.
    pub metric: String,
    /// Edge-only accuracy.
    pub edge_accuracy: f64,
    /// Cloud-only accuracy.
    pub cloud_accuracy: Option<f64>,
    /// Per threshold: escalated share, accuracy on what the edge keeps, cascade accuracy.
    pub curve: Vec<CurvePointReport>,
}

/// A serializable [`CurvePoint`].
#[derive(Debug, Clone, Serialize)]
pub struct CurvePointReport {
    /// Threshold.
    pub threshold: f32,
    /// Share escalated.
    pub escalated: f64,
    /// Edge accuracy on kept inputs.
    pub kept_accuracy: Option<f64>,
    /// Cascade accuracy.
    pub cascade_accuracy: Option<f64>,
}

impl From<CurvePoint> for CurvePointReport {
    fn from(p: CurvePoint) -> Self {
        CurvePointReport {
            threshold: p.threshold,
            escalated: p.escalated,
            kept_accuracy: p.kept_accuracy,
            cascade_accuracy: p.cascade_accuracy,
        }
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0))
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "edge model   {} ({} samples)", self.model, self.samples)?;
        writeln!(f, "edge-only accuracy    {}", pct(Some(self.edge_accuracy)))?;
        if let Some(cloud) = &self.cloud_model {
            writeln!(f, "cloud model  {cloud}")?;
            writeln!(f, "cloud-only accuracy   {}", pct(self.cloud_accuracy))?;
        }
        writeln!(
            f,
            "\nconfidence ({}) curve: inputs under the threshold are escalated",
            self.metric
        )?;
        write!(f, "threshold  escalated  edge acc. on kept")?;
        if self.cloud_model.is_some() {
            write!(f, "  cascade acc.")?;
        }
        writeln!(f)?;
        for p in &self.curve {
            write!(
                f,
                "{:>9.2}  {:>9}  {:>17}",
                p.threshold,
                pct(Some(p.escalated)),
                pct(p.kept_accuracy)
            )?;
            if self.cloud_model.is_some() {
                write!(f, "  {:>12}", pct(p.cascade_accuracy))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn labels(path: &Path) -> Result<Vec<usize>, InferError> {
    let bad = |detail: String| InferError::Npy {
        path: path.to_owned(),
        detail,
    };
    let values: Vec<i64> = match Tensor::read_npy(path)? {
        Tensor::I64(a) => a.iter().copied().collect(),
        Tensor::I32(a) => a.iter().map(|&v| i64::from(v)).collect(),
        Tensor::U8(a) => a.iter().map(|&v| i64::from(v)).collect(),
        Tensor::I8(a) => a.iter().map(|&v| i64::from(v)).collect(),
        other => {
            return Err(bad(format!(
                "labels must be integers, got {}",
                other.dtype()
            )));
        }
    };
    values
        .into_iter()
        .map(|v| usize::try_from(v).map_err(|_| bad(format!("negative label {v}"))))
        .collect()
}

/// The per-input probability vectors of a classifier over a batch.
fn probabilities(
    model: &dyn Model,
    model_path: &Path,
    inputs: &Tensor,
) -> Result<Vec<Vec<f32>>, InferError> {
    let info = model.info();
    let meta = Metadata::for_model(model_path).ok();
    let scores_ix = match &meta {
        Some(m) => m.scores_index(info).ok_or_else(|| InferError::Metadata {
            path: Metadata::sidecar_path(model_path),
            detail: format!(
                "scores output {:?} is not an output of the model",
                m.outputs.scores
            ),
        })?,
        None if info.outputs.len() == 1 => 0,
        None => {
            return Err(InferError::Metadata {
                path: Metadata::sidecar_path(model_path),
                detail:
                    "the model has several outputs and no sidecar saying which holds the scores"
                        .into(),
            });
        }
    };
    let outputs = run_batch(model, vec![inputs.clone()])?;
    let scores = outputs[scores_ix].to_f32();
    let n = inputs.shape().first().copied().unwrap_or(1);
    let per = scores.len() / n.max(1);
    let flat: Vec<f32> = scores.iter().copied().collect();
    Ok(flat
        .chunks(per.max(1))
        .map(|row| match &meta {
            Some(m) => m.probabilities(row),
            None => row.to_vec(),
        })
        .collect())
}

/// Evaluates the edge model (and the cloud model) on the labelled set.
pub fn evaluate(options: &EvalOptions) -> Result<EvalReport, InferError> {
    let inputs = Tensor::read_npy(&options.data.join("inputs.npy"))?;
    let labels = labels(&options.data.join("labels.npy"))?;
    if inputs.shape().first() != Some(&labels.len()) {
        return Err(InferError::Tensor(format!(
            "{} inputs but {} labels in {}",
            inputs.shape().first().unwrap_or(&0),
            labels.len(),
            options.data.display()
        )));
    }
    let edge = load_path(&options.model, &options.load)?;
    let edge_probs = probabilities(edge.as_ref(), &options.model, &inputs)?;
    let predictions: Vec<Prediction> = edge_probs
        .iter()
        .map(|p| {
            Prediction::from_probabilities(p, options.metric).unwrap_or(Prediction {
                class: usize::MAX,
                confidence: 0.0,
            })
        })
        .collect();
    let edge_classes: Vec<usize> = predictions.iter().map(|p| p.class).collect();
    let cloud_classes = match &options.cloud_model {
        Some(path) => {
            let cloud = load_path(path, &options.load)?;
            let probs = probabilities(cloud.as_ref(), path, &inputs)?;
            Some(
                probs
                    .iter()
                    .map(|p| {
                        Prediction::from_probabilities(p, options.metric)
                            .map_or(usize::MAX, |c| c.class)
                    })
                    .collect::<Vec<_>>(),
            )
        }
        None => None,
    };
    let curve = confidence_curve(
        &predictions,
        &labels,
        cloud_classes.as_deref(),
        &thresholds(options.step),
    );
    Ok(EvalReport {
        model: options.model.display().to_string(),
        cloud_model: options
            .cloud_model
            .as_ref()
            .map(|p| p.display().to_string()),
        samples: labels.len(),
        metric: options.metric.name().into(),
        edge_accuracy: accuracy(&edge_classes, &labels),
        cloud_accuracy: cloud_classes.as_ref().map(|c| accuracy(c, &labels)),
        curve: curve.into_iter().map(Into::into).collect(),
    })
}
