//! TFLite models on tract: Cascade's own frontend first, stock tract-tflite as a fallback.

mod frontend;
mod rescale;

#[cfg(feature = "tflite")]
pub(crate) use frontend::describe;

use tract_core::internal::*;

use crate::error::{InferError, LoadError};
use crate::format::ModelFormat;
use crate::model::{LoadOptions, Model, ModelInfo, TensorSpec};
use crate::tensor::Tensor;
use crate::tract::{Plan, error_text, executor, guard, run_error, spec_from_fact};

/// A TFLite model compiled for tract.
#[derive(Debug)]
pub(crate) struct TfliteModel {
    info: ModelInfo,
    plan: Plan,
    input_types: Vec<DatumType>,
}

impl Model for TfliteModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
        self.info.check_inputs(&inputs)?;
        self.plan
            .run(inputs, &self.input_types)
            .map_err(|e| run_error(&self.info.source, e))
    }

    fn profile(
        &self,
        inputs: Vec<Tensor>,
        runs: usize,
    ) -> Option<Result<Vec<crate::model::OpTime>, InferError>> {
        if let Err(e) = self.info.check_inputs(&inputs) {
            return Some(Err(e));
        }
        Some(
            self.plan
                .profile(inputs, &self.input_types, runs)
                .map_err(|e| run_error(&self.info.source, e)),
        )
    }
}

const HINT: &str = "if the model uses an operator listed in docs/models.md as unsupported, export it without \
    that operator (e.g. with the TFLite converter's default ops only), or build with `--features tflite` and \
    use --backend tflite";

pub(crate) fn load(
    bytes: &[u8],
    source: &str,
    options: &LoadOptions,
) -> Result<TfliteModel, InferError> {
    let executor = executor(options.threads);
    // Cascade's frontend covers the operators stock tract-tflite lacks; try it first.
    let ours = guard("Cascade TFLite frontend", || Ok(frontend::translate(bytes)));
    let failure = match ours {
        Ok(Ok(translated)) => match Plan::compile(translated.model, &executor) {
            Ok(plan) => {
                let input_types = plan
                    .input_types()
                    .map_err(|e| load_failure(source, None, None, error_text(&e)))?;
                return Ok(TfliteModel {
                    info: ModelInfo {
                        source: source.to_string(),
                        format: ModelFormat::Tflite,
                        backend: "tract (Cascade TFLite frontend)",
                        inputs: translated.inputs,
                        outputs: translated.outputs,
                    },
                    plan,
                    input_types,
                });
            }
            Err(e) => (
                None,
                None,
                format!("compiling the translated graph failed: {}", error_text(&e)),
            ),
        },
        Ok(Err(e)) => (e.node, e.op, e.detail),
        Err(panic) => (None, None, error_text(&panic)),
    };
    tracing::debug!(model = source, error = %failure.2, "Cascade TFLite frontend failed; trying tract-tflite");
    let stock = guard("tract-tflite", || {
        use tract_core::prelude::Framework;
        let model = tract_tflite::tflite().model_for_read(&mut &bytes[..])?;
        let outputs = model.output_outlets()?.to_vec();
        let inputs = model.input_outlets()?.to_vec();
        let describe = |model: &TypedModel, outlets: &[OutletId]| -> TractResult<Vec<TensorSpec>> {
            outlets
                .iter()
                .map(|o| spec_from_fact(&model.nodes[o.node].name, model.outlet_fact(*o)?))
                .collect()
        };
        let in_specs = describe(&model, &inputs)?;
        let out_specs = describe(&model, &outputs)?;
        let plan = Plan::compile(model, &executor)?;
        Ok((plan, in_specs, out_specs))
    });
    match stock {
        Ok((plan, inputs, outputs)) => {
            let input_types = plan
                .input_types()
                .map_err(|e| load_failure(source, None, None, error_text(&e)))?;
            Ok(TfliteModel {
                info: ModelInfo {
                    source: source.to_string(),
                    format: ModelFormat::Tflite,
                    backend: "tract-tflite",
                    inputs,
                    outputs,
                },
                plan,
                input_types,
            })
        }
        // Report our frontend's error: it names the node and operator precisely.
        Err(_) => Err(load_failure(source, failure.0, failure.1, failure.2)),
    }
}

fn load_failure(
    source: &str,
    node: Option<String>,
    op: Option<String>,
    detail: String,
) -> InferError {
    InferError::Load(Box::new(LoadError {
        model: source.to_string(),
        format: ModelFormat::Tflite,
        backend: "tract",
        node,
        op,
        detail,
        hint: HINT.to_string(),
    }))
}
