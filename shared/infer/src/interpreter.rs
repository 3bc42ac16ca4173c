//! TFLite models on the TensorFlow Lite interpreter itself (feature `tflite`).
//!
//! The `tflite` crate builds TensorFlow Lite's C++ runtime from the sources it vendors (a 2020
//! snapshot: it has DEPTH_TO_SPACE and resource variables, not CUMSUM) and runs the file with
//! TFLite's own kernels: on the int8 models we test, as LiteRT's reference kernels compute them
//! (within one step on one of them, as tract). It is much slower than tract on int8
//! (docs/models.md), so `auto` uses it only for a model tract cannot load, and `--backend tflite`
//! asks for it outright.
//!
//! Being older than today's converters, it misreads one thing they write without failing:
//! per-channel scales of FULLY_CONNECTED weights (TF 2.14+). Such models are refused by name.
//!
//! The interpreter is not safe for concurrent use, so one mutex guards it: a model shared by
//! several threads runs one input at a time. Tensor shapes are the file's own (this TFLite
//! version cannot resize inputs through the crate), so a batch larger than the file declares is
//! split by [`crate::run_batch`].

use std::sync::Mutex;

use tflite::ops::builtin::BuiltinOpResolver;
use tflite::{FlatBufferModel, Interpreter, InterpreterBuilder};

use crate::error::{InferError, LoadError};
use crate::format::ModelFormat;
use crate::model::{LoadOptions, Model, ModelInfo, TensorSpec};
use crate::tensor::{Tensor, from_ne_bytes, to_ne_bytes};

/// The backend's name in [`ModelInfo::backend`] and errors.
pub(crate) const BACKEND: &str = "tflite interpreter";

/// A TFLite model on the TFLite interpreter.
pub(crate) struct InterpreterModel {
    info: ModelInfo,
    interpreter: Mutex<Interpreter<'static, BuiltinOpResolver>>,
}

impl std::fmt::Debug for InterpreterModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterpreterModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Model for InterpreterModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
        self.info.check_inputs(&inputs)?;
        let run_failed = |detail: String| InferError::Run {
            model: self.info.source.clone(),
            detail,
        };
        // A panic while the lock was held cannot leave TFLite's tensors half-written in a way
        // the next run does not overwrite: every input is written in full before each invoke.
        let mut interpreter = self
            .interpreter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let input_ix = interpreter.inputs().to_vec();
        for ((ix, tensor), spec) in input_ix.iter().zip(&inputs).zip(&self.info.inputs) {
            let bytes = to_ne_bytes(tensor);
            let slot = interpreter.tensor_buffer_mut(*ix).ok_or_else(|| {
                run_failed(format!(
                    "the interpreter has no buffer for input {:?}",
                    spec.name
                ))
            })?;
            if slot.len() != bytes.len() {
                return Err(run_failed(format!(
                    "input {:?} takes {} bytes, got {}",
                    spec.name,
                    slot.len(),
                    bytes.len()
                )));
            }
            slot.copy_from_slice(&bytes);
        }
        interpreter
            .invoke()
            .map_err(|e| run_failed(format!("TFLite's Invoke failed: {e}")))?;
        let output_ix = interpreter.outputs().to_vec();
        output_ix
            .iter()
            .zip(&self.info.outputs)
            .map(|(ix, spec)| {
                let dims = interpreter
                    .tensor_info(*ix)
                    .map(|t| t.dims)
                    .ok_or_else(|| run_failed(format!("no output tensor {:?}", spec.name)))?;
                let bytes = interpreter
                    .tensor_buffer(*ix)
                    .ok_or_else(|| run_failed(format!("no buffer for output {:?}", spec.name)))?;
                from_ne_bytes(spec.dtype, &dims, bytes)
                    .map_err(|e| run_failed(format!("output {:?}: {e}", spec.name)))
            })
            .collect()
    }
}

/// Loads TFLite flatbuffer bytes into the interpreter.
pub(crate) fn load(
    bytes: &[u8],
    source: &str,
    options: &LoadOptions,
) -> Result<InterpreterModel, InferError> {
    let failed = |detail: String, hint: &str| {
        InferError::Load(Box::new(LoadError {
            model: source.to_string(),
            format: ModelFormat::Tflite,
            backend: BACKEND,
            node: None,
            op: None,
            detail,
            hint: hint.to_string(),
        }))
    };
    let declared = crate::tflite::describe(bytes)
        .map_err(|e| failed(e, "check that the file is a complete .tflite model"))?;
    if let Some(node) = declared.per_channel_fully_connected {
        return Err(InferError::Load(Box::new(LoadError {
            model: source.to_string(),
            format: ModelFormat::Tflite,
            backend: BACKEND,
            node: Some(node),
            op: Some("FULLY_CONNECTED".into()),
            detail: "its weights have per-channel scales (TF 2.14+ converters), which this \
                     TFLite version reads as one scale: it would compute wrong results"
                .into(),
            hint: "use --backend tract, or convert with per-tensor dense weights \
                   (_experimental_disable_per_channel_quantization_for_dense_layers)"
                .into(),
        })));
    }
    let (inputs, outputs) = (declared.inputs, declared.outputs);
    let model = FlatBufferModel::build_from_buffer(bytes.to_vec()).map_err(|e| {
        failed(
            format!("TFLite could not read the flatbuffer: {e}"),
            "check that the file is a complete .tflite model",
        )
    })?;
    let threads = i32::try_from(options.threads.max(1)).unwrap_or(i32::MAX);
    let interpreter = InterpreterBuilder::new(model, BuiltinOpResolver::default())
        .and_then(|builder| builder.build_with_threads(threads))
        .map_err(|e| {
            failed(
                format!(
                    "TFLite could not build an interpreter ({e}); usually an operator or operator \
                     version newer than this 2020 TFLite, which it names on stderr"
                ),
                "use --backend tract, which covers newer operators",
            )
        })?;
    check_declared(&interpreter, &inputs, &outputs).map_err(|e| {
        failed(
            e,
            "report this model: the file and the interpreter disagree",
        )
    })?;
    tracing::info!(
        model = source,
        backend = BACKEND,
        threads,
        "model loaded on the TFLite interpreter"
    );
    Ok(InterpreterModel {
        info: ModelInfo {
            source: source.to_string(),
            format: ModelFormat::Tflite,
            backend: BACKEND,
            inputs,
            outputs,
        },
        interpreter: Mutex::new(interpreter),
    })
}

/// Checks that the interpreter's inputs and outputs are the ones the file declares, so the
/// description [`ModelInfo`] gives is the one the interpreter runs.
fn check_declared(
    interpreter: &Interpreter<'static, BuiltinOpResolver>,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<(), String> {
    for (kind, indices, specs) in [
        ("input", interpreter.inputs(), inputs),
        ("output", interpreter.outputs(), outputs),
    ] {
        if indices.len() != specs.len() {
            return Err(format!(
                "the file declares {} {kind}s, the interpreter has {}",
                specs.len(),
                indices.len()
            ));
        }
        for (ix, spec) in indices.iter().zip(specs) {
            let info = interpreter
                .tensor_info(*ix)
                .ok_or_else(|| format!("the interpreter has no {kind} tensor {ix}"))?;
            if Some(info.dims.clone()) != spec.fixed_shape() {
                return Err(format!(
                    "{kind} {:?}: the file declares {}, the interpreter allocated {:?}",
                    spec.name,
                    spec.shape_text(),
                    info.dims
                ));
            }
        }
    }
    Ok(())
}
