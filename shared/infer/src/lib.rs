//! Cascade's inference engines: load a model file, describe it, run it.
//!
//! Both the edge agent and the cloud escalator run models through the one [`Model`] trait. A
//! model is loaded from a path or bytes; its format is detected from the bytes; the engine is
//! chosen by [`LoadOptions::backend`]. This crate does no networking and spawns no threads of its
//! own beyond a model's optional inference worker pool.
//!
//! # Module map
//!
//! - [`model`]: the [`Model`] trait, [`ModelInfo`] / [`TensorSpec`] descriptions, input checks,
//!   [`LoadOptions`], and [`run_batch`] for batches of independent inputs.
//! - [`tensor`]: the [`Tensor`] type the API speaks, with `.npy` reading and writing.
//! - [`format`]: format detection from file contents.
//! - [`confidence`]: softmax and the confidence metrics (max-probability, margin, entropy).
//! - [`evaluation`]: accuracy and the confidence curve (escalation rate vs. accuracy).
//! - [`metadata`]: the model metadata sidecar (labels, input spec, which output is what).
//! - [`image`]: PNG/JPEG inputs preprocessed as a sidecar says.
//! - [`wire`]: tensors to and from the protocol's wire form (`cascade_proto::escalation::Tensor`).
//! - `onnx` *(private)*: ONNX on tract-onnx, with shape specialization, `If` folding and a relaxed
//!   retry.
//! - `tflite` *(private)*: TFLite on tract through Cascade's own frontend (QUANTIZE, DEQUANTIZE,
//!   int8 with requantization, fp16 weights), falling back to stock tract-tflite.
//! - `qkernels` *(private)*: integer kernels (fully-connected, convolution, add, mul) with exact
//!   requantization, TFLite's fixed-point or ONNX's float, which both frontends put into tract.
//! - `direct_conv` *(private)*: a direct `f32` convolution with AVX-512 that replaces tract's
//!   im2col for one-group, stride-1 convolutions, so that batches cost less per input.
//! - `tiled_pool` *(private)*: `f32` max pooling over windows that tile the input (stride =
//!   window), replacing tract's tap-by-tap loop at strides other than 1.
//! - `program` *(private)*: graphs made only of Cascade's own operators, run over buffers
//!   allocated once instead of on tract's plan.
//! - `tract` *(private)*: what the tract backends share.
//! - `interpreter` *(private, feature `tflite`)*: TFLite models on the TensorFlow Lite
//!   interpreter itself (the `tflite` crate): the bit-exact fallback for models tract cannot load.
//! - `gpu` *(private)*: the GPU engine: ONNX lowered to GEMM/convolution/elementwise steps, run
//!   through cudarc with feature `cuda`, on CPU (tract) with one log line otherwise.

pub mod confidence;
pub mod error;
pub mod evaluation;
pub mod format;
pub mod image;
pub mod metadata;
pub mod model;
pub mod tensor;
pub mod wire;

mod direct_conv;
mod gpu;
#[cfg(feature = "tflite")]
mod interpreter;
mod onnx;
mod program;
mod qkernels;
mod tflite;
mod tiled_pool;
mod tract;

use std::path::Path;

pub use confidence::{Confidence, Metric, softmax};
pub use error::{InferError, LoadError};
pub use format::ModelFormat;
pub use model::{
    BackendChoice, Dim, LoadOptions, Model, ModelInfo, OpTime, QuantParams, TensorSpec,
    batch_run_sizes, batch_runs, run_batch,
};
pub use tensor::{DType, Tensor};

/// Loads a model file.
pub fn load_path(path: &Path, options: &LoadOptions) -> Result<Box<dyn Model>, InferError> {
    let bytes = std::fs::read(path).map_err(|source| InferError::Io {
        path: path.to_owned(),
        error: source,
    })?;
    load_bytes(&bytes, &path.display().to_string(), options)
}

/// Loads a model from bytes; `source` names it in errors and [`ModelInfo::source`].
pub fn load_bytes(
    bytes: &[u8],
    source: &str,
    options: &LoadOptions,
) -> Result<Box<dyn Model>, InferError> {
    let format = format::detect(bytes).map_err(|detail| InferError::UnknownFormat {
        model: source.to_string(),
        detail,
    })?;
    match options.backend {
        BackendChoice::Tflite => load_on_interpreter(bytes, source, format, options),
        BackendChoice::Cuda => gpu::load(bytes, source, format, options),
        // A build with the GPU engine tries it first for ONNX models.
        #[cfg(feature = "cuda")]
        BackendChoice::Auto if format == ModelFormat::Onnx => {
            gpu::load(bytes, source, format, options)
        }
        BackendChoice::Tract => load_on_tract(bytes, source, format, options),
        BackendChoice::Auto => match load_on_tract(bytes, source, format, options) {
            // A TFLite model tract cannot load may still run on TFLite's own interpreter; if not,
            // tract's error is the one to report (it names the node and operator).
            #[cfg(feature = "tflite")]
            Err(tract) if format == ModelFormat::Tflite => {
                tracing::warn!(model = source, error = %tract, "tract cannot load this model; trying the TFLite interpreter");
                load_on_interpreter(bytes, source, format, options).map_err(|fallback| {
                    tracing::warn!(model = source, error = %fallback, "the TFLite interpreter cannot load it either");
                    tract
                })
            }
            loaded => loaded,
        },
    }
}

fn load_on_tract(
    bytes: &[u8],
    source: &str,
    format: ModelFormat,
    options: &LoadOptions,
) -> Result<Box<dyn Model>, InferError> {
    let started = std::time::Instant::now();
    let model: Box<dyn Model> = match format {
        ModelFormat::Onnx => Box::new(onnx::load(bytes, source, options)?),
        ModelFormat::Tflite => Box::new(tflite::load(bytes, source, options)?),
    };
    tracing::info!(
        model = source,
        %format,
        backend = model.info().backend,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(model)
}

/// The TFLite interpreter, in a build with feature `tflite`; a clear error otherwise.
fn load_on_interpreter(
    bytes: &[u8],
    source: &str,
    format: ModelFormat,
    options: &LoadOptions,
) -> Result<Box<dyn Model>, InferError> {
    let refuse = |detail: &str, hint: &str| {
        Err(InferError::Load(Box::new(LoadError {
            model: source.to_string(),
            format,
            backend: "tflite",
            node: None,
            op: None,
            detail: detail.into(),
            hint: hint.into(),
        })))
    };
    if format != ModelFormat::Tflite {
        return refuse(
            "the TFLite interpreter runs only .tflite models",
            "use --backend tract (or auto) for ONNX models",
        );
    }
    #[cfg(feature = "tflite")]
    {
        let _ = refuse;
        Ok(Box::new(interpreter::load(bytes, source, options)?))
    }
    #[cfg(not(feature = "tflite"))]
    {
        let _ = (bytes, options);
        refuse(
            "this build has no TFLite interpreter",
            "rebuild with `--features tflite` (needs libclang-dev and clang), or use --backend tract",
        )
    }
}
