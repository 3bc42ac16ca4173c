//! The metadata sidecar that travels with a model file: `model.onnx` has `model.onnx.toml`.
//!
//! A model file says what tensors it takes; the sidecar says what they *mean*: the labels, how
//! raw data (or an image) becomes the input tensor, which output holds the class scores and
//! whether they are probabilities or logits, and which output is the embedding.
//!
//! ```toml
//! name = "digits-edge"
//! version = "1.0.0"
//! task = "classification"
//! labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
//!
//! [[inputs]]
//! name = "pixels"
//! dtype = "float32"
//! shape = [-1, 64]          # -1: any batch size
//! layout = "flat"
//! [inputs.image]             # optional: PNG/JPEG to this input
//! width = 8
//! height = 8
//! channels = 1
//! scale = 0.003921569       # tensor = pixel * scale + offset
//!
//! [outputs]
//! scores = "probabilities"
//! scores_kind = "probabilities"   # or "logits": softmax is applied
//! embedding = "embedding"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::InferError;
use crate::model::ModelInfo;

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// One label per input from `labels`.
    Classification,
    /// Maps an embedding to labels (the cloud tail model).
    EmbeddingClassification,
}

/// Whether a scores output is already a probability distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoresKind {
    /// Non-negative, summing to 1.
    #[default]
    Probabilities,
    /// Unnormalized: softmax is applied before confidence is judged.
    Logits,
}

/// Integer encoding of a quantized input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    /// `real = scale * (q - zero_point)`.
    pub scale: f32,
    /// The integer standing for 0.0.
    pub zero_point: i32,
}

/// How an image file becomes an input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePrep {
    /// Width the image is resized to.
    pub width: u32,
    /// Height the image is resized to.
    pub height: u32,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: u8,
    /// `tensor = pixel * scale + offset`, pixel in `0..=255`.
    #[serde(default = "one")]
    pub scale: f32,
    /// See `scale`.
    #[serde(default)]
    pub offset: f32,
    /// Use `255 - pixel` (dark ink on light paper to the model's light-on-dark).
    #[serde(default)]
    pub invert: bool,
}

fn one() -> f32 {
    1.0
}

/// One model input, as the sidecar describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputMeta {
    /// Tensor name in the model file.
    pub name: String,
    /// numpy element type name (`float32`, `int8`, ...).
    pub dtype: String,
    /// Shape; `-1` for a free dimension.
    pub shape: Vec<i64>,
    /// `flat`, `NHWC` or `NCHW`.
    #[serde(default)]
    pub layout: Option<String>,
    /// Integer encoding, for quantized inputs.
    #[serde(default)]
    pub quantization: Option<Quantization>,
    /// Image preprocessing, for inputs that accept PNG/JPEG.
    #[serde(default)]
    pub image: Option<ImagePrep>,
}

/// Which outputs play which role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRoles {
    /// Output holding class scores.
    pub scores: String,
    /// Probabilities or logits.
    #[serde(default)]
    pub scores_kind: ScoresKind,
    /// Output holding the embedding (penultimate layer), when the model exposes one.
    #[serde(default)]
    pub embedding: Option<String>,
}

/// A model's metadata sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Model name (1-64 of `A-Z a-z 0-9 . _ -`).
    pub name: String,
    /// Semantic version `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// What the model does.
    pub task: Task,
    /// Class labels, by class index.
    pub labels: Vec<String>,
    /// Free text: data, training, accuracy.
    #[serde(default)]
    pub description: Option<String>,
    /// Inputs.
    pub inputs: Vec<InputMeta>,
    /// Output roles.
    pub outputs: OutputRoles,
}

impl Metadata {
    /// The sidecar path for a model file: the file name with `.toml` appended.
    pub fn sidecar_path(model: &Path) -> PathBuf {
        let mut name = model.as_os_str().to_owned();
        name.push(".toml");
        PathBuf::from(name)
    }

    /// Reads and validates the sidecar of `model`.
    pub fn for_model(model: &Path) -> Result<Self, InferError> {
        Self::load(&Self::sidecar_path(model))
    }

    /// Reads and validates a sidecar file.
    pub fn load(path: &Path) -> Result<Self, InferError> {
        let text = std::fs::read_to_string(path).map_err(|source| InferError::Io {
            path: path.to_owned(),
            error: source,
        })?;
        Self::parse(&text).map_err(|detail| InferError::Metadata {
            path: path.to_owned(),
            detail,
        })
    }

    /// Parses and validates sidecar text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let meta: Metadata = toml::from_str(text).map_err(|e| e.to_string())?;
        meta.validate()?;
        Ok(meta)
    }

    /// Checks the sidecar on its own.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(format!(
                "name {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                self.name
            ));
        }
        let parts: Vec<&str> = self.version.split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.parse::<u16>().is_err()) {
            return Err(format!(
                "version {:?} must be MAJOR.MINOR.PATCH",
                self.version
            ));
        }
        if self.labels.is_empty() {
            return Err("labels must not be empty".into());
        }
        if self.inputs.is_empty() {
            return Err("at least one input must be described".into());
        }
        for input in &self.inputs {
            if let Some(img) = &input.image {
                if !matches!(img.channels, 1 | 3) {
                    return Err(format!(
                        "input {:?}: image channels must be 1 or 3",
                        input.name
                    ));
                }
                if img.width == 0 || img.height == 0 {
                    return Err(format!(
                        "input {:?}: image size must be positive",
                        input.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the sidecar against the model it describes: input and output names exist.
    pub fn check_against(&self, info: &ModelInfo) -> Result<(), String> {
        for input in &self.inputs {
            if !info.inputs.iter().any(|i| i.name == input.name) {
                return Err(format!(
                    "input {:?} is not an input of the model",
                    input.name
                ));
            }
        }
        let outputs: Vec<&str> = info.outputs.iter().map(|o| o.name.as_str()).collect();
        if !outputs.contains(&self.outputs.scores.as_str()) {
            return Err(format!(
                "scores output {:?} is not among the model outputs {outputs:?}",
                self.outputs.scores
            ));
        }
        if let Some(e) = &self.outputs.embedding
            && !outputs.contains(&e.as_str())
        {
            return Err(format!(
                "embedding output {e:?} is not among the model outputs {outputs:?}"
            ));
        }
        Ok(())
    }

    /// Index of the scores output in `info.outputs`.
    pub fn scores_index(&self, info: &ModelInfo) -> Option<usize> {
        info.outputs
            .iter()
            .position(|o| o.name == self.outputs.scores)
    }

    /// Index of the embedding output in `info.outputs`.
    pub fn embedding_index(&self, info: &ModelInfo) -> Option<usize> {
        let name = self.outputs.embedding.as_ref()?;
        info.outputs.iter().position(|o| &o.name == name)
    }

    /// Turns a scores vector into probabilities (softmax for logits).
    pub fn probabilities(&self, scores: &[f32]) -> Vec<f32> {
        match self.outputs.scores_kind {
            ScoresKind::Probabilities => scores.to_vec(),
            ScoresKind::Logits => crate::confidence::softmax(scores),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "digits-edge"
version = "1.0.0"
task = "classification"
labels = ["0", "1"]

[[inputs]]
name = "pixels"
dtype = "float32"
shape = [-1, 64]
[inputs.image]
width = 8
height = 8
channels = 1
scale = 0.0039

[outputs]
scores = "probabilities"
scores_kind = "logits"
"#;

    #[test]
    fn parses_a_sidecar() {
        let m = Metadata::parse(GOOD).unwrap();
        assert_eq!(m.inputs[0].image.as_ref().unwrap().width, 8);
        assert_eq!(m.outputs.scores_kind, ScoresKind::Logits);
        let p = m.probabilities(&[0.0, 0.0]);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn rejects_bad_sidecars_with_the_reason() {
        let bad_version = GOOD.replace("1.0.0", "1.0");
        assert!(
            Metadata::parse(&bad_version)
                .unwrap_err()
                .contains("MAJOR.MINOR.PATCH")
        );
        let bad_channels = GOOD.replace("channels = 1", "channels = 2");
        assert!(
            Metadata::parse(&bad_channels)
                .unwrap_err()
                .contains("channels")
        );
        let unknown = GOOD.replace(
            "task = \"classification\"",
            "task = \"classification\"\ncolour = 3",
        );
        assert!(Metadata::parse(&unknown).unwrap_err().contains("colour"));
    }

    #[test]
    fn sidecar_path_appends_toml() {
        assert_eq!(
            Metadata::sidecar_path(Path::new("m/edge.onnx")),
            PathBuf::from("m/edge.onnx.toml")
        );
    }
}
