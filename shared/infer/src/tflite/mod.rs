//! TFLite models on tract: Cascade's own frontend first, stock tract-tflite as a fallback.

mod frontend;
mod rescale;

pub(crate) use rescale::{QSoftmax, Rescale};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::POISON;

    /// The bundled int8 TFLite model: QUANTIZE, fully-connected layers, SOFTMAX, DEQUANTIZE.
    fn digits() -> TfliteModel {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/digits-edge.int8.tflite"
        );
        let bytes = std::fs::read(path).unwrap();
        load(&bytes, path, &LoadOptions::default()).unwrap()
    }

    /// Distinct images for the model's `[1, 64]` input: pixel values 0..=16, as the data set's.
    fn image(seed: usize) -> Vec<Tensor> {
        let pixels = (0..64).map(|i| ((i * 7 + seed * 13) % 17) as f32).collect();
        vec![Tensor::from_f32(&[1, 64], pixels).unwrap()]
    }

    fn bits(outputs: &[Tensor]) -> Vec<Vec<u8>> {
        outputs
            .iter()
            .map(|t| crate::tensor::as_ne_bytes(t).unwrap().to_vec())
            .collect()
    }

    #[test]
    fn an_int8_model_runs_as_a_program_bit_for_bit_with_tracts_plan() {
        let model = digits();
        assert!(model.plan.program().is_some(), "every node is Cascade's");
        // Alternating inputs: each run overwrites the buffers of the one before.
        for seed in [0, 1, 2, 1, 0, 3] {
            let ours = model.plan.run(image(seed), &model.input_types).unwrap();
            let tract = model
                .plan
                .run_on_tract(image(seed), &model.input_types)
                .unwrap();
            assert_eq!(bits(&ours), bits(&tract), "image {seed}");
        }
        // Some inputs must differ in outcome, or the comparison above says little.
        let a = model.plan.run(image(0), &model.input_types).unwrap();
        let b = model.plan.run(image(1), &model.input_types).unwrap();
        assert_ne!(bits(&a), bits(&b));
    }

    #[test]
    fn a_program_overwrites_whatever_its_buffers_held() {
        let model = digits();
        let program = model.plan.program().unwrap();
        let mut clean = program.allocate().unwrap();
        let mut poisoned = program.allocate().unwrap();
        for buffer in &mut poisoned {
            buffer.as_bytes_mut().fill(POISON);
        }
        let expected = program.run_in(&mut clean, &image(5), &mut None).unwrap();
        let got = program.run_in(&mut poisoned, &image(5), &mut None).unwrap();
        assert_eq!(bits(&got), bits(&expected));
    }

    #[test]
    fn a_program_refuses_an_input_of_another_type_or_shape() {
        let model = digits();
        let program = model.plan.program().unwrap();
        let ints = vec![Tensor::I32(ndarray::ArrayD::zeros(vec![1, 64]))];
        let error = program.run(&ints, None).unwrap_err();
        assert!(error.to_string().contains("int32"), "{error}");
        let wide = vec![Tensor::from_f32(&[1, 65], vec![0.0; 65]).unwrap()];
        let error = program.run(&wide, None).unwrap_err();
        assert!(error.to_string().contains("[1, 65]"), "{error}");
        assert!(program.run(&[], None).is_err());
        // Refusals leave the program usable.
        program.run(&image(0), None).unwrap();
    }

    #[test]
    fn concurrent_callers_each_get_their_own_buffers() {
        let model = digits();
        let expected: Vec<_> = (0..8)
            .map(|seed| {
                bits(
                    &model
                        .plan
                        .run_on_tract(image(seed), &model.input_types)
                        .unwrap(),
                )
            })
            .collect();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (model, expected) = (&model, &expected);
                scope.spawn(move || {
                    for round in 0..200 {
                        let seed = (thread + round) % 8;
                        let got = model.plan.run(image(seed), &model.input_types).unwrap();
                        assert_eq!(bits(&got), expected[seed], "thread {thread}, image {seed}");
                    }
                });
            }
        });
    }
}
