//! The one trait every engine implements, what it says about a model, and how inputs are checked.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::error::InferError;
use crate::format::ModelFormat;
use crate::tensor::{DType, Tensor};

/// A dimension of a declared tensor shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size.
    Fixed(usize),
    /// A size chosen at run time (batch, sequence length); the name is the model's.
    Symbolic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// Affine quantization of an integer tensor: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantParams {
    /// Step between adjacent integers.
    pub scale: f32,
    /// Integer standing for 0.0.
    pub zero_point: i32,
}

/// A declared model input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Tensor name in the model file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<Dim>,
    /// Quantization, for quantized integer tensors.
    pub quantization: Option<QuantParams>,
}

impl TensorSpec {
    /// The shape as text, e.g. `[N, 64]`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        format!("[{}]", dims.join(", "))
    }

    /// Whether `shape` fits this spec (same rank, equal fixed dimensions).
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self.shape.iter().zip(shape).all(|(d, &n)| match d {
                Dim::Fixed(m) => *m == n,
                Dim::Symbolic(_) => true,
            })
    }

    /// The concrete shape with a free first dimension set to `batch`, when that is the only free
    /// dimension (or there is none).
    pub fn shape_with_batch(&self, batch: usize) -> Option<Vec<usize>> {
        self.shape
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Fixed(n) => Some(*n),
                Dim::Symbolic(_) if i == 0 => Some(batch),
                Dim::Symbolic(_) => None,
            })
            .collect()
    }

    /// The shape with every dimension known, if it has no symbolic one.
    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                Dim::Symbolic(_) => None,
            })
            .collect()
    }
}

/// What a loaded model is and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The file it was loaded from, or `<bytes>`.
    pub source: String,
    /// Its format.
    pub format: ModelFormat,
    /// The engine running it, e.g. `tract-onnx`.
    pub backend: &'static str,
    /// Inputs, in the order [`Model::run`] takes them.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in the order [`Model::run`] returns them.
    pub outputs: Vec<TensorSpec>,
}

impl ModelInfo {
    fn input_names(&self) -> String {
        let names: Vec<String> = self
            .inputs
            .iter()
            .map(|i| format!("{:?} {} {}", i.name, i.dtype, i.shape_text()))
            .collect();
        names.join(", ")
    }

    /// Checks inputs against the declared specs: count, element type, shape.
    pub fn check_inputs(&self, inputs: &[Tensor]) -> Result<(), InferError> {
        if inputs.len() != self.inputs.len() {
            return Err(InferError::InputCount {
                expected: self.inputs.len(),
                names: self.input_names(),
                got: inputs.len(),
            });
        }
        for (spec, tensor) in self.inputs.iter().zip(inputs) {
            if tensor.is_empty() {
                return Err(InferError::InputShape {
                    input: spec.name.clone(),
                    expected: format!("{} (a non-empty tensor)", spec.shape_text()),
                    got: tensor.shape().to_vec(),
                });
            }
            if spec.dtype != tensor.dtype() {
                let mut expected = spec.dtype.to_string();
                if let Some(q) = spec.quantization {
                    expected = format!(
                        "{expected} (quantized: real = {} * (q - {}))",
                        q.scale, q.zero_point
                    );
                }
                return Err(InferError::InputDType {
                    input: spec.name.clone(),
                    expected,
                    got: tensor.dtype().to_string(),
                });
            }
            if !spec.accepts_shape(tensor.shape()) {
                return Err(InferError::InputShape {
                    input: spec.name.clone(),
                    expected: spec.shape_text(),
                    got: tensor.shape().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Puts named inputs in the model's order. A single unnamed input is accepted for a
    /// single-input model.
    pub fn order_inputs(
        &self,
        named: Vec<(Option<String>, Tensor)>,
    ) -> Result<Vec<Tensor>, InferError> {
        if let [(None, _)] = named.as_slice() {
            if self.inputs.len() == 1 {
                return Ok(named.into_iter().map(|(_, t)| t).collect());
            }
            return Err(InferError::InputCount {
                expected: self.inputs.len(),
                names: self.input_names(),
                got: 1,
            });
        }
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        for (name, tensor) in named {
            let Some(name) = name else {
                return Err(InferError::Tensor(
                    "with several inputs, name each one: --input NAME=FILE.npy".into(),
                ));
            };
            if !self.inputs.iter().any(|s| s.name == name) {
                return Err(InferError::UnknownInput {
                    name,
                    known: self.input_names(),
                });
            }
            by_name.insert(name, tensor);
        }
        self.inputs
            .iter()
            .map(|spec| {
                by_name
                    .remove(&spec.name)
                    .ok_or_else(|| InferError::MissingInput {
                        name: spec.name.clone(),
                    })
            })
            .collect()
    }
}

/// A loaded model, ready to run. Implementations are thread-safe; one model may serve several
/// threads, each call running to completion on the calling thread (plus the model's own worker
/// threads when it was loaded with more than one).
pub trait Model: Send + Sync {
    /// What the model takes and returns.
    fn info(&self) -> &ModelInfo;

    /// Runs the model on inputs given in [`ModelInfo::inputs`] order.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError>;

    /// Runs the model `runs` times and reports the time spent in each operator, when the backend
    /// can (`None` otherwise).
    fn profile(&self, inputs: Vec<Tensor>, runs: usize) -> Option<Result<Vec<OpTime>, InferError>> {
        let _ = (inputs, runs);
        None
    }

    /// Whether the engine prepares (compiles) the model anew for each new input shape, so that
    /// callers with inputs of varying batch size should keep to a few sizes (see [`run_batch`]).
    fn compiles_per_shape(&self) -> bool {
        false
    }
}

/// `n` as a sum of powers of two, largest first: 27 gives 16, 8, 2, 1.
pub fn batch_runs(n: usize) -> Vec<usize> {
    let mut runs = batch_run_sizes(n);
    runs.retain(|size| n & size != 0);
    runs.reverse();
    runs
}

/// Every run size [`batch_runs`] gives for batches of up to `max` inputs, smallest first: the
/// powers of two up to `max` (20 gives 1, 2, 4, 8, 16). What a service compiles ahead of time.
pub fn batch_run_sizes(max: usize) -> Vec<usize> {
    (0..usize::BITS)
        .map(|bit| 1usize << bit)
        .take_while(|&size| size <= max)
        .collect()
}

/// Time spent in one node of a model, averaged over profiled runs.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// Node name.
    pub node: String,
    /// Operator.
    pub op: String,
    /// Mean time per run.
    pub mean: std::time::Duration,
}

/// Which engine runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The fastest engine that loads the model: the GPU engine for ONNX models in a build with
    /// feature `cuda` (falling back to CPU), else tract, then the TFLite interpreter (when built
    /// in).
    #[default]
    Auto,
    /// tract (ONNX through tract-onnx; TFLite through Cascade's frontend or tract-tflite).
    Tract,
    /// The TensorFlow Lite interpreter (feature `tflite`): bit-exact with TFLite, slower int8.
    Tflite,
    /// The GPU engine (feature `cuda`): ONNX float models on an NVIDIA GPU through cudarc. Runs
    /// the model on tract, with one log line saying why, when it cannot (no GPU, a build without
    /// `cuda`, an operator it does not cover, a TFLite model).
    Cuda,
}

impl BackendChoice {
    /// The name [`FromStr`] reads: `auto`, `tract`, `tflite` or `cuda`.
    pub const fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Tract => "tract",
            BackendChoice::Tflite => "tflite",
            BackendChoice::Cuda => "cuda",
        }
    }
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "tract" => Ok(BackendChoice::Tract),
            "tflite" => Ok(BackendChoice::Tflite),
            "cuda" => Ok(BackendChoice::Cuda),
            other => Err(format!(
                "unknown backend {other:?}: expected auto, tract, tflite or cuda"
            )),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Engine choice.
    pub backend: BackendChoice,
    /// Worker threads for one inference; 0 or 1 runs on the calling thread only.
    pub threads: usize,
    /// Concrete shapes for inputs whose declared shape has symbolic dimensions, by input name.
    /// Given, the model is compiled for them at load time; otherwise on first use of each shape.
    pub input_shapes: HashMap<String, Vec<usize>>,
    /// The batch size inputs will come with, for models whose only free dimension is the first:
    /// given, such a model is compiled for it at load time (so a model that cannot run fails at
    /// load, not at its first input), as if its shapes were in `input_shapes`.
    pub batch: Option<usize>,
}

/// Runs a batch of independent inputs (stacked along axis 0) and stacks the outputs the same way.
///
/// - A model whose batch dimension is fixed at 1 runs each item on its own.
/// - A model that compiles for each input shape ([`Model::compiles_per_shape`]), all of whose
///   inputs are batched along axis 0, runs the batch as power-of-two runs, largest first
///   ([`batch_runs`]: 27 runs as 16, 8, 2 and 1), so that batches of every size up to 2^k need
///   at most k + 1 compiled shapes. A service whose batch sizes vary would otherwise compile for
///   nearly every batch: the escalator's worker spent a quarter of its time compiling.
/// - Any other model runs the batch in one call.
pub fn run_batch(model: &dyn Model, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
    let info = model.info();
    let fixed_one = info
        .inputs
        .iter()
        .all(|s| s.shape.first() == Some(&Dim::Fixed(1)));
    let batch = inputs
        .first()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(1);
    let runs = if fixed_one {
        vec![1; batch]
    } else if model.compiles_per_shape() && inputs.iter().all(|t| t.shape().first() == Some(&batch))
    {
        // Only where every input is batched along axis 0: a model with other inputs (a
        // recurrent state laid out `[layers, N, ...]`, a scalar setting) runs as it is given.
        batch_runs(batch)
    } else {
        Vec::new()
    };
    if runs.len() <= 1 {
        return model.run(inputs);
    }
    if inputs.iter().any(|t| t.shape().first() != Some(&batch)) {
        return Err(InferError::Tensor(
            "every input of a batch must have the same first dimension".into(),
        ));
    }
    let mut per_output: Vec<Vec<Tensor>> = Vec::new();
    let mut start = 0;
    for rows in runs {
        let items = inputs
            .iter()
            .map(|t| crate::tensor::slice_rows(t, start..start + rows))
            .collect::<Vec<_>>();
        start += rows;
        let outputs = model.run(items)?;
        if per_output.is_empty() {
            per_output = outputs.iter().map(|_| Vec::new()).collect();
        }
        for (acc, out) in per_output.iter_mut().zip(outputs) {
            acc.push(out);
        }
    }
    per_output
        .into_iter()
        .map(|items| crate::tensor::concat_batch(&items))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ndarray::{ArrayD, IxDyn};

    use super::*;

    /// Doubles its input, row by row, and records the batch size of every call.
    struct Doubler {
        info: ModelInfo,
        per_shape: bool,
        calls: Mutex<Vec<usize>>,
    }

    impl Doubler {
        fn new(batch: Dim, per_shape: bool) -> Self {
            let spec = TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![batch, Dim::Fixed(2)],
                quantization: None,
            };
            Doubler {
                info: ModelInfo {
                    source: "<test>".into(),
                    format: ModelFormat::Onnx,
                    backend: "test",
                    inputs: vec![spec.clone()],
                    outputs: vec![spec],
                },
                per_shape,
                calls: Mutex::default(),
            }
        }
    }

    impl Model for Doubler {
        fn info(&self) -> &ModelInfo {
            &self.info
        }

        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
            // A second input, when given, is a setting (not checked here: the mock has one spec).
            self.calls.lock().unwrap().push(inputs[0].shape()[0]);
            Ok(vec![Tensor::F32(inputs[0].to_f32().mapv(|v| v * 2.0))])
        }

        fn compiles_per_shape(&self) -> bool {
            self.per_shape
        }
    }

    fn rows(n: usize) -> Tensor {
        Tensor::F32(ArrayD::from_shape_fn(IxDyn(&[n, 2]), |ix| {
            (ix[0] * 10 + ix[1]) as f32
        }))
    }

    #[test]
    fn batch_runs_are_powers_of_two_largest_first() {
        assert_eq!(batch_runs(27), [16, 8, 2, 1]);
        assert_eq!(batch_runs(32), [32]);
        assert_eq!(batch_runs(1), [1]);
        assert!(batch_runs(0).is_empty());
        assert_eq!(batch_run_sizes(20), [1, 2, 4, 8, 16]);
        assert_eq!(batch_run_sizes(32), [1, 2, 4, 8, 16, 32]);
        assert!(batch_run_sizes(0).is_empty());
    }

    #[test]
    fn a_model_compiling_per_shape_gets_the_batch_in_power_of_two_runs_stacked_in_order() {
        let model = Doubler::new(Dim::Symbolic("N".into()), true);
        let out = run_batch(&model, vec![rows(27)]).unwrap();
        assert_eq!(*model.calls.lock().unwrap(), [16, 8, 2, 1]);
        assert_eq!(out[0].to_f32(), rows(27).to_f32().mapv(|v| v * 2.0));
    }

    #[test]
    fn other_models_get_the_batch_in_one_call_and_fixed_batch_one_item_by_item() {
        let free = Doubler::new(Dim::Symbolic("N".into()), false);
        run_batch(&free, vec![rows(27)]).unwrap();
        assert_eq!(*free.calls.lock().unwrap(), [27]);

        // An input not batched along axis 0 (a scalar setting): the batch goes in one call.
        let with_setting = Doubler::new(Dim::Symbolic("N".into()), true);
        let setting = Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 16_000.0));
        run_batch(&with_setting, vec![rows(27), setting]).unwrap();
        assert_eq!(*with_setting.calls.lock().unwrap(), [27]);

        let one = Doubler::new(Dim::Fixed(1), true);
        let out = run_batch(&one, vec![rows(3)]).unwrap();
        assert_eq!(*one.calls.lock().unwrap(), [1, 1, 1]);
        assert_eq!(out[0].to_f32(), rows(3).to_f32().mapv(|v| v * 2.0));
    }
}
