//! ONNX models on tract-onnx, made to load what exporters actually produce.
//!
//! Three things beyond calling tract-onnx:
//!
//! - **Shape specialization.** Inputs with symbolic dimensions (batch, sequence, image size) are
//!   compiled for the concrete shapes they arrive with, and the compiled plans are cached. tract
//!   optimizes much better with known shapes, and several exporters' graphs only type-check
//!   once shapes are known.
//! - **`If` folding** ([`if_fold`]): conditions that depend only on shapes, or on small integer
//!   configuration inputs (a sample rate), are evaluated at compile time and replaced by the
//!   branch taken. Such configuration inputs are part of the plan's cache key.
//! - **A relaxed retry.** When the first compile fails, it is retried ignoring the file's own
//!   intermediate `value_info` and output shapes/types, which some exporters get wrong.

mod if_fold;
mod qlinear;

use std::sync::{Arc, Mutex};

use tract_linalg::multithread::Executor;
use tract_onnx::pb::{self, ModelProto};
use tract_onnx::prelude::*;

use crate::error::{InferError, LoadError};
use crate::format::ModelFormat;
use crate::model::{Dim, LoadOptions, Model, ModelInfo, TensorSpec};
use crate::tensor::{DType, Tensor};
use crate::tract::{Plan, error_text, executor, guard, run_error};

/// How many compiled shape variants one model keeps: enough for every batch size `run_batch`
/// runs (powers of two) up to 2048, with room for a few other shapes.
const PLAN_CACHE: usize = 16;

/// What one compiled plan is for: concrete input shapes, and the values of configuration inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlanKey {
    shapes: Vec<Vec<usize>>,
    values: Vec<Option<i64>>,
}

/// An ONNX model on tract.
pub(crate) struct OnnxModel {
    info: ModelInfo,
    proto: ModelProto,
    input_types: Vec<DatumType>,
    /// Per input: whether its value (a scalar) selects `If` branches and so keys the plan.
    configuration: Vec<bool>,
    executor: Executor,
    plans: Mutex<Vec<(PlanKey, Arc<Plan>)>>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("info", &self.info)
            .finish()
    }
}

fn load_error(source: &str, detail: String, hint: &str) -> InferError {
    let (node, op) = node_and_op(&detail);
    InferError::Load(Box::new(LoadError {
        model: source.to_string(),
        format: ModelFormat::Onnx,
        backend: "tract-onnx",
        node,
        op,
        detail,
        hint: hint.to_string(),
    }))
}

/// Pulls `node #12 "name" OpType` out of tract's error context, when it names one.
fn node_and_op(detail: &str) -> (Option<String>, Option<String>) {
    let Some(at) = detail.find("node #") else {
        return (None, None);
    };
    let rest = &detail[at..];
    let mut quoted = rest.split('"');
    let (Some(_), Some(name), Some(after)) = (quoted.next(), quoted.next(), quoted.next()) else {
        return (None, None);
    };
    let op = after
        .split_whitespace()
        .next()
        .map(|s| s.trim_matches(|c: char| !c.is_alphanumeric()).to_string());
    (Some(name.to_string()), op.filter(|o| !o.is_empty()))
}

const HINT: &str = "check that the file is a complete ONNX model (opset 9 to 18 is best supported); \
    re-export with constant folding enabled, or try the other backend with --backend";

pub(crate) fn load(
    bytes: &[u8],
    source: &str,
    options: &LoadOptions,
) -> Result<OnnxModel, InferError> {
    let proto: ModelProto = onnx().proto_model_for_read(&mut &bytes[..]).map_err(|e| {
        load_error(
            source,
            format!(
                "not a valid ONNX protobuf (corrupt or truncated?): {}",
                error_text(&e)
            ),
            HINT,
        )
    })?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| load_error(source, "the model has no graph".into(), HINT))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let real_inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let inputs = real_inputs
        .iter()
        .map(|vi| spec_from_value_info(vi))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| load_error(source, e, HINT))?;
    let outputs = graph
        .output
        .iter()
        .map(spec_from_value_info)
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| load_error(source, e, HINT))?;
    let input_types = inputs.iter().map(|s| datum_type(s.dtype)).collect();
    let configuration = configuration_inputs(graph, &inputs);
    let model = OnnxModel {
        info: ModelInfo {
            source: source.to_string(),
            format: ModelFormat::Onnx,
            backend: "tract-onnx",
            inputs,
            outputs,
        },
        proto,
        input_types,
        configuration,
        executor: executor(options.threads),
        plans: Mutex::new(Vec::new()),
    };
    // Compile now when the shapes are known, so that a model that cannot run fails at load.
    let shapes: Option<Vec<Vec<usize>>> = model
        .info
        .inputs
        .iter()
        .map(|s| {
            options
                .input_shapes
                .get(&s.name)
                .cloned()
                .or_else(|| s.fixed_shape())
                .or_else(|| options.batch.and_then(|b| s.shape_with_batch(b)))
        })
        .collect();
    if let Some(shapes) = shapes
        && !model.configuration.iter().any(|c| *c)
    {
        let key = PlanKey {
            values: vec![None; shapes.len()],
            shapes,
        };
        let plan = model
            .compile(&key)
            .map_err(|e| load_error(source, e, HINT))?;
        model
            .plans
            .lock()
            .map_err(|_| load_error(source, "plan cache poisoned".into(), HINT))?
            .push((key, Arc::new(plan)));
    } else {
        tracing::debug!(
            model = source,
            "symbolic input shapes: compiling on first use of each shape"
        );
    }
    Ok(model)
}

impl OnnxModel {
    fn compile(&self, key: &PlanKey) -> Result<Plan, String> {
        let facts: Vec<InferenceFact> = key
            .shapes
            .iter()
            .zip(&key.values)
            .zip(&self.input_types)
            .map(|((shape, value), dt)| match value {
                Some(v) => {
                    let t = tensor0(*v)
                        .cast_to_dt(*dt)
                        .map(|t| t.into_owned().into_shape(shape));
                    match t {
                        Ok(Ok(t)) => InferenceFact::from(t),
                        _ => InferenceFact::dt_shape(*dt, shape.clone()),
                    }
                }
                None => InferenceFact::dt_shape(*dt, shape.clone()),
            })
            .collect();
        let (proto, folded) = guard("folding If nodes", || {
            if_fold::fold_constant_ifs(&self.proto, &facts)
        })
        .unwrap_or_else(|e| {
            tracing::debug!(error = %error_text(&e), "If folding skipped");
            (self.proto.clone(), 0)
        });
        if folded > 0 {
            tracing::debug!(model = %self.info.source, folded, "folded If nodes with constant conditions");
        }
        let attempt = |relaxed: bool| {
            guard("tract-onnx", || {
                let mut onnx = onnx()
                    .with_ignore_output_shapes(true)
                    .with_ignore_value_info(relaxed)
                    .with_ignore_output_types(relaxed);
                qlinear::register(&mut onnx);
                let mut model = onnx.model_for_proto_model(&proto)?;
                for (ix, fact) in facts.iter().enumerate() {
                    model.set_input_fact(ix, fact.clone())?;
                }
                let typed = model.into_typed()?;
                Plan::compile(typed, &self.executor)
            })
        };
        match attempt(false) {
            Ok(plan) => Ok(plan),
            Err(first) => {
                tracing::debug!(error = %error_text(&first), "retrying ONNX compile ignoring value_info");
                attempt(true).map_err(|_| error_text(&first))
            }
        }
    }

    fn key_for(&self, inputs: &[Tensor]) -> PlanKey {
        PlanKey {
            shapes: inputs.iter().map(|t| t.shape().to_vec()).collect(),
            values: inputs
                .iter()
                .zip(&self.configuration)
                .map(|(t, is_config)| if *is_config { scalar_value(t) } else { None })
                .collect(),
        }
    }

    fn plan_for(&self, key: PlanKey) -> Result<Arc<Plan>, InferError> {
        let poisoned = || InferError::Run {
            model: self.info.source.clone(),
            detail: "plan cache poisoned by an earlier panic".into(),
        };
        if let Some((_, plan)) = self
            .plans
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Ok(plan.clone());
        }
        tracing::debug!(model = %self.info.source, shapes = ?key.shapes, "compiling for new input shapes");
        let plan = Arc::new(self.compile(&key).map_err(|detail| InferError::Run {
            model: self.info.source.clone(),
            detail: format!("cannot compile for input shapes {:?}: {detail}", key.shapes),
        })?);
        let mut plans = self.plans.lock().map_err(|_| poisoned())?;
        if plans.len() >= PLAN_CACHE {
            plans.remove(0);
        }
        plans.push((key, plan.clone()));
        Ok(plan)
    }
}

impl Model for OnnxModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
        self.info.check_inputs(&inputs)?;
        let plan = self.plan_for(self.key_for(&inputs))?;
        plan.run(inputs, &self.input_types)
            .map_err(|e| run_error(&self.info.source, e))
    }

    /// tract compiles a plan for each concrete shape (cached, [`PLAN_CACHE`] of them).
    fn compiles_per_shape(&self) -> bool {
        self.info
            .inputs
            .iter()
            .any(|spec| spec.fixed_shape().is_none())
    }

    fn profile(
        &self,
        inputs: Vec<Tensor>,
        runs: usize,
    ) -> Option<Result<Vec<crate::model::OpTime>, InferError>> {
        let result = self.info.check_inputs(&inputs).and_then(|()| {
            let plan = self.plan_for(self.key_for(&inputs))?;
            plan.profile(inputs, &self.input_types, runs)
                .map_err(|e| run_error(&self.info.source, e))
        });
        Some(result)
    }
}

fn scalar_value(t: &Tensor) -> Option<i64> {
    if t.len() != 1 {
        return None;
    }
    match t {
        Tensor::I64(a) => a.iter().next().copied(),
        Tensor::I32(a) => a.iter().next().map(|v| i64::from(*v)),
        Tensor::Bool(a) => a.iter().next().map(|v| i64::from(*v)),
        _ => None,
    }
}

/// Inputs that are single integers or booleans and feed an `If` condition: their value is
/// configuration (a sample rate, a mode flag), so plans are specialized on it.
fn configuration_inputs(graph: &pb::GraphProto, inputs: &[TensorSpec]) -> Vec<bool> {
    let producer: std::collections::HashMap<&str, &pb::NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut reaches_condition = std::collections::HashSet::new();
    let mut stack: Vec<&str> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "If")
        .filter_map(|n| n.input.first().map(String::as_str))
        .collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(name) = stack.pop() {
        if !seen.insert(name) {
            continue;
        }
        reaches_condition.insert(name);
        if let Some(node) = producer.get(name) {
            stack.extend(node.input.iter().map(String::as_str));
        }
    }
    inputs
        .iter()
        .map(|spec| {
            let scalar = spec.shape.iter().all(|d| *d == Dim::Fixed(1)) && spec.shape.len() <= 1;
            let integral = matches!(spec.dtype, DType::I64 | DType::I32 | DType::Bool);
            scalar && integral && reaches_condition.contains(spec.name.as_str())
        })
        .collect()
}

fn datum_type(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => DatumType::F32,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::I16 => DatumType::I16,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::Bool => DatumType::Bool,
    }
}

/// Describes an ONNX graph input or output.
fn spec_from_value_info(vi: &pb::ValueInfoProto) -> Result<TensorSpec, String> {
    use pb::tensor_shape_proto::dimension::Value as DimValue;
    use pb::type_proto::Value;
    let Some(Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(format!(
            "{:?} is not a tensor (sequences and maps are not supported)",
            vi.name
        ));
    };
    // ONNX TensorProto.DataType codes.
    let dtype = match t.elem_type {
        1 | 10 | 11 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        other => {
            return Err(format!(
                "{:?} has unsupported element type code {other}",
                vi.name
            ));
        }
    };
    let shape = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .enumerate()
                .map(|(i, d)| match &d.value {
                    Some(DimValue::DimValue(n)) if *n > 0 => Dim::Fixed(*n as usize),
                    Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p.clone()),
                    _ => Dim::Symbolic(format!("d{i}")),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(TensorSpec {
        name: vi.name.clone(),
        dtype,
        shape,
        quantization: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    fn plans(model: &OnnxModel) -> Vec<Vec<Vec<usize>>> {
        let plans = model.plans.lock().unwrap();
        plans.iter().map(|(key, _)| key.shapes.clone()).collect()
    }

    #[test]
    fn a_known_batch_compiles_a_free_batch_dimension_at_load() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/digits-edge.int8.onnx"
        );
        let bytes = std::fs::read(path).unwrap();
        let lazy = load(&bytes, path, &LoadOptions::default()).unwrap();
        assert!(matches!(
            lazy.info.inputs[0].shape[..],
            [Dim::Symbolic(_), Dim::Fixed(64)]
        ));
        assert!(plans(&lazy).is_empty(), "compiled before any input");

        let options = LoadOptions {
            batch: Some(1),
            ..LoadOptions::default()
        };
        let eager = load(&bytes, path, &options).unwrap();
        assert_eq!(plans(&eager), [vec![vec![1, 64]]]);
        // A batch of one runs on that plan; another batch size still compiles on first use.
        let one = Tensor::F32(ndarray::ArrayD::zeros(vec![1, 64]));
        eager.run(vec![one]).unwrap();
        assert_eq!(plans(&eager).len(), 1);
        let three = Tensor::F32(ndarray::ArrayD::zeros(vec![3, 64]));
        eager.run(vec![three]).unwrap();
        assert_eq!(plans(&eager), [vec![vec![1, 64]], vec![vec![3, 64]]]);
    }

    #[test]
    fn only_a_free_first_dimension_takes_the_batch() {
        let spec = |shape: Vec<Dim>| TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape,
            quantization: None,
        };
        let n = || Dim::Symbolic("N".into());
        assert_eq!(
            spec(vec![n(), Dim::Fixed(64)]).shape_with_batch(4),
            Some(vec![4, 64])
        );
        assert_eq!(
            spec(vec![Dim::Fixed(2), Dim::Fixed(3)]).shape_with_batch(4),
            Some(vec![2, 3])
        );
        assert_eq!(spec(vec![n(), n()]).shape_with_batch(4), None);
    }

    #[test]
    fn finds_the_failing_node_in_tract_errors() {
        let (node, op) = node_and_op("Translating node #3 \"input\" Source ToTypedTranslator: bad");
        assert_eq!(node.as_deref(), Some("input"));
        assert_eq!(op.as_deref(), Some("Source"));
        assert_eq!(node_and_op("no node here"), (None, None));
    }
}
