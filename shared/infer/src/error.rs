//! What can go wrong loading or running a model, said so that the user knows what to do.

use std::path::PathBuf;

use crate::format::ModelFormat;

/// An error from the engine. None of them goes away by retrying the same call.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A `.npy` file is malformed or of an unsupported element type.
    #[error("{}: not a usable .npy file: {detail}", path.display())]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tensor could not be built.
    #[error("bad tensor: {0}")]
    Tensor(String),
    /// The bytes are neither ONNX nor TFLite.
    #[error(
        "{model}: not a model file ({detail}); Cascade loads ONNX (.onnx) and TensorFlow Lite (.tflite) models"
    )]
    UnknownFormat {
        /// The file, or `<bytes>`.
        model: String,
        /// What the bytes look like.
        detail: String,
    },
    /// A backend could not load the model.
    #[error(transparent)]
    Load(Box<LoadError>),
    /// The model takes a different number of inputs.
    #[error("model takes {expected} input(s) ({names}), {got} given")]
    InputCount {
        /// Inputs the model takes.
        expected: usize,
        /// Their names.
        names: String,
        /// Inputs given.
        got: usize,
    },
    /// An input name the model does not have.
    #[error("model has no input named {name:?}; its inputs are {known}")]
    UnknownInput {
        /// The name given.
        name: String,
        /// The model's inputs.
        known: String,
    },
    /// An input the model needs was not given.
    #[error("input {name:?} is missing")]
    MissingInput {
        /// The input's name.
        name: String,
    },
    /// An input of the wrong element type.
    #[error("input {input:?} must be {expected}, got {got}")]
    InputDType {
        /// The input's name.
        input: String,
        /// What the model takes.
        expected: String,
        /// What was given.
        got: String,
    },
    /// An input of the wrong shape.
    #[error("input {input:?} must have shape {expected}, got {got:?}")]
    InputShape {
        /// The input's name.
        input: String,
        /// What the model takes (symbolic dimensions by name).
        expected: String,
        /// What was given.
        got: Vec<usize>,
    },
    /// The model failed while running.
    #[error("{model}: inference failed: {detail}")]
    Run {
        /// The model (file or `<bytes>`).
        model: String,
        /// What went wrong.
        detail: String,
    },
    /// A model's metadata sidecar is missing or malformed.
    #[error("{}: bad model metadata: {detail}", path.display())]
    Metadata {
        /// The sidecar file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An image input could not be decoded or does not fit the model.
    #[error("{}: {detail}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Why a model could not be loaded: where, by which backend, and what to try.
#[derive(Debug, thiserror::Error)]
#[error("{model}: {backend} could not load this {format} model{}: {detail}\n  hint: {hint}",
    location(node.as_deref(), op.as_deref()))]
pub struct LoadError {
    /// The file, or `<bytes>`.
    pub model: String,
    /// Detected format.
    pub format: ModelFormat,
    /// Backend that failed (the last one tried, when several were).
    pub backend: &'static str,
    /// The node that failed, when known.
    pub node: Option<String>,
    /// Its operator, when known.
    pub op: Option<String>,
    /// What went wrong.
    pub detail: String,
    /// What to try.
    pub hint: String,
}

fn location(node: Option<&str>, op: Option<&str>) -> String {
    match (node, op) {
        (Some(n), Some(o)) => format!(" at node {n:?} (operator {o})"),
        (Some(n), None) => format!(" at node {n:?}"),
        (None, Some(o)) => format!(" (operator {o})"),
        (None, None) => String::new(),
    }
}
