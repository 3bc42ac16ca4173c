//! The GPU engine (issue: a cudarc backend for the escalator and Jetson).
//!
//! A model is first lowered from ONNX to [`graph::Graph`], a list of steps (GEMM, convolution,
//! pooling, elementwise, softmax, transpose, concat) over buffers with per-sample shapes. The
//! lowering is pure and always built, so CI checks it on CPU with the reference executor in
//! `reference.rs` against tract. With feature `cuda`, `cuda.rs` runs the same steps on an
//! NVIDIA GPU through cudarc (cuBLAS and NVRTC kernels), loading the CUDA libraries at run time.
//!
//! [`load`] never fails for lack of a GPU: when the build has no `cuda` feature, when no GPU or
//! CUDA library is found, when the model is TFLite, or when an operator is not covered, it logs
//! one line saying which and returns the model on tract (CPU).

// Without `cuda`, outside tests only the lowering's verdict (covered or not) is used; the kernel
// parameters it derives are read by `cuda.rs`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod graph;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod reference;

use tract_onnx::prelude::*;

use crate::error::InferError;
use crate::format::ModelFormat;
use crate::model::{BackendChoice, LoadOptions, Model};

/// Loads a model for the GPU, or on CPU (with one log line saying why) when it cannot run there.
pub(crate) fn load(
    bytes: &[u8],
    source: &str,
    format: ModelFormat,
    options: &LoadOptions,
) -> Result<Box<dyn Model>, InferError> {
    let cpu_options = LoadOptions {
        backend: BackendChoice::Tract,
        ..options.clone()
    };
    // Loading on tract first validates the model and describes its inputs and outputs with the
    // same checks every backend uses.
    let cpu = crate::load_bytes(bytes, source, &cpu_options)?;
    if format != ModelFormat::Onnx {
        tracing::warn!(model = source, %format, "the GPU engine runs ONNX models only; this model runs on CPU (tract)");
        return Ok(cpu);
    }
    let proto = match onnx().proto_model_for_read(&mut &bytes[..]) {
        Ok(proto) => proto,
        Err(e) => {
            tracing::warn!(model = source, error = %e, "the GPU engine could not read the model; it runs on CPU (tract)");
            return Ok(cpu);
        }
    };
    let graph = match graph::lower(&proto) {
        Ok(graph) => graph,
        Err(unsupported) => {
            tracing::warn!(
                model = source,
                node = %unsupported.node,
                op = %unsupported.op,
                "the GPU engine does not cover {unsupported}; the whole model runs on CPU (tract)"
            );
            return Ok(cpu);
        }
    };
    on_device(graph, cpu, source)
}

#[cfg(feature = "cuda")]
fn on_device(
    graph: graph::Graph,
    cpu: Box<dyn Model>,
    source: &str,
) -> Result<Box<dyn Model>, InferError> {
    match cuda::CudaModel::new(graph, cpu.info().clone()) {
        Ok(model) => Ok(Box::new(model)),
        Err(e) => {
            tracing::warn!(model = source, error = %e, "the GPU engine could not start; the model runs on CPU (tract)");
            Ok(cpu)
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn on_device(
    _graph: graph::Graph,
    cpu: Box<dyn Model>,
    source: &str,
) -> Result<Box<dyn Model>, InferError> {
    tracing::warn!(
        model = source,
        "this build has no GPU engine (rebuild with `--features cuda`); the model runs on CPU (tract)"
    );
    Ok(cpu)
}

#[cfg(test)]
mod tests;
