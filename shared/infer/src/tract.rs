//! What every tract-based backend shares: tensor conversion, compiled plans with their own thread
//! pool, and describing facts as [`TensorSpec`]s.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::prelude::Tensor as TractTensor;
use tract_linalg::multithread::Executor;

use crate::error::InferError;
use crate::model::{Dim, QuantParams, TensorSpec};
use crate::program::Program;
use crate::tensor::{DType, Tensor};

/// A compiled, runnable tract model.
#[derive(Debug)]
pub(crate) struct Plan {
    runnable: Arc<TypedRunnableModel>,
    /// The same graph as a straight-line program over preallocated buffers, where every node is
    /// one of Cascade's own operators (see [`Program`]); it runs instead of tract's plan.
    program: Option<Program>,
    /// Run states kept between calls.
    states: Idle<TypedSimpleState>,
}

/// Values kept between calls for reuse (run states, a program's buffers), one per concurrent
/// caller: making one allocates, and small models feel it.
#[derive(Debug)]
pub(crate) struct Idle<T>(std::sync::Mutex<Vec<T>>);

impl<T> Default for Idle<T> {
    fn default() -> Self {
        Idle(std::sync::Mutex::new(Vec::new()))
    }
}

impl<T> Idle<T> {
    /// An idle value, or a new one from `make`; a poisoned lock just means none is idle.
    pub(crate) fn take(&self, make: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
        match self.0.lock().ok().and_then(|mut idle| idle.pop()) {
            Some(value) => Ok(value),
            None => make(),
        }
    }

    /// Keeps `value` for the next caller.
    pub(crate) fn give_back(&self, value: T) {
        if let Ok(mut idle) = self.0.lock() {
            idle.push(value);
        }
    }
}

/// A plan's run state.
type TypedSimpleState = SimpleState<TypedFact, Box<dyn TypedOp>>;

/// The executor for `threads` worker threads (one pool per model, so models do not contend).
pub(crate) fn executor(threads: usize) -> Executor {
    if threads > 1 {
        Executor::multithread_with_name(threads, "cascade-infer")
    } else {
        Executor::SingleThread
    }
}

/// Replaces each node of `model` for which `replacement` gives an operator, wired to the node's
/// first input alone (constants such as kernels are built into the replacement). Returns how many
/// it replaced; what they leave unreachable stays until the model is compacted.
pub(crate) fn replace_nodes<O: TypedOp>(
    model: &mut TypedModel,
    mut replacement: impl FnMut(&TypedModel, &TypedNode) -> TractResult<Option<O>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(&data) = node.inputs.first() else {
            continue;
        };
        if let Some(op) = replacement(model, node)? {
            TypedModelPatch::replace_single_op(model, node, &[data], op)?.apply(model)?;
            replaced += 1;
        }
    }
    Ok(replaced)
}

impl Plan {
    /// Optimizes `model` and prepares it to run on `executor`.
    pub(crate) fn compile(model: TypedModel, executor: &Executor) -> TractResult<Self> {
        // `into_optimized`, with some operators replaced by Cascade's own between its two stages.
        let mut model = model;
        model.declutter()?;
        let direct = crate::direct_conv::rewrite(&mut model)?;
        let tiled = crate::tiled_pool::rewrite(&mut model)?;
        if direct + tiled > 0 {
            tracing::debug!(
                convolutions = direct,
                max_poolings = tiled,
                "operators replaced by Cascade's own"
            );
            // The replaced operators and their constants are left unreachable.
            model.compact()?;
        }
        model.optimize()?;
        let options = RunOptions {
            executor: Some(executor.clone()),
            ..RunOptions::default()
        };
        let runnable = model.into_runnable_with_options(&options)?;
        let program = Program::new(&runnable)
            .inspect_err(|why| tracing::debug!(why, "the model runs on tract's plan"))
            .ok();
        Ok(Plan {
            runnable,
            program,
            states: Idle::default(),
        })
    }

    /// Runs the plan; `inputs` are already checked against the model's specs.
    pub(crate) fn run(
        &self,
        inputs: Vec<Tensor>,
        input_types: &[DatumType],
    ) -> TractResult<Vec<Tensor>> {
        match &self.program {
            Some(program) => program.run(&inputs, None),
            None => self.run_on_tract(inputs, input_types),
        }
    }

    /// The program this plan runs instead of tract's, if the graph qualified for one.
    #[cfg(test)]
    pub(crate) fn program(&self) -> Option<&Program> {
        self.program.as_ref()
    }

    /// Runs the plan on tract's `SimpleState`, even where it has a program.
    pub(crate) fn run_on_tract(
        &self,
        inputs: Vec<Tensor>,
        input_types: &[DatumType],
    ) -> TractResult<Vec<Tensor>> {
        let inputs = inputs
            .into_iter()
            .zip(input_types)
            .map(|(t, dt)| to_tract(t, *dt).map(TValue::from))
            .collect::<TractResult<TVec<_>>>()?;
        let mut state = self.states.take(|| self.runnable.spawn())?;
        let outputs = state.run(inputs)?;
        self.states.give_back(state);
        outputs.into_iter().map(|v| from_tract(&v)).collect()
    }

    /// Runs the plan `runs` times timing every node; the slowest nodes first.
    pub(crate) fn profile(
        &self,
        inputs: Vec<Tensor>,
        input_types: &[DatumType],
        runs: usize,
    ) -> TractResult<Vec<crate::model::OpTime>> {
        use std::time::{Duration, Instant};
        let runs = runs.max(1);
        let mut totals: HashMap<usize, Duration> = HashMap::default();
        if let Some(program) = &self.program {
            let mut time = |node: usize, took: Duration| *totals.entry(node).or_default() += took;
            for _ in 0..runs {
                program.run(&inputs, Some(&mut time))?;
            }
            return Ok(self.slowest(totals, runs));
        }
        let inputs = inputs
            .into_iter()
            .zip(input_types)
            .map(|(t, dt)| to_tract(t, *dt).map(TValue::from))
            .collect::<TractResult<TVec<_>>>()?;
        let mut state = self.runnable.spawn()?;
        for _ in 0..runs {
            state.run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
                let started = Instant::now();
                let out = tract_core::plan::eval(ctx, op_state, node, input);
                *totals.entry(node.id).or_default() += started.elapsed();
                out
            })?;
        }
        Ok(self.slowest(totals, runs))
    }

    /// Each node's mean time over `runs` from its `totals`, the slowest first.
    fn slowest(
        &self,
        totals: HashMap<usize, std::time::Duration>,
        runs: usize,
    ) -> Vec<crate::model::OpTime> {
        let model = self.runnable.model();
        let mut times: Vec<crate::model::OpTime> = totals
            .into_iter()
            .map(|(id, total)| crate::model::OpTime {
                node: model.nodes[id].name.clone(),
                op: model.nodes[id].op().name().to_string(),
                mean: total / runs as u32,
            })
            .collect();
        times.sort_by_key(|t| std::cmp::Reverse(t.mean));
        times
    }

    /// The datum types the plan's inputs expect (quantized types included).
    pub(crate) fn input_types(&self) -> TractResult<Vec<DatumType>> {
        let model = self.runnable.model();
        model
            .input_outlets()?
            .iter()
            .map(|o| Ok(model.outlet_fact(*o)?.datum_type))
            .collect()
    }
}

/// Our tensor as a tract tensor of datum type `dt` (which may be a quantized flavour of the
/// tensor's element type: the bits are the same, tract only learns their meaning).
pub(crate) fn to_tract(t: Tensor, dt: DatumType) -> TractResult<TractTensor> {
    let tensor: TractTensor = match t {
        Tensor::F32(a) => a.into(),
        Tensor::I8(a) => a.into(),
        Tensor::U8(a) => a.into(),
        Tensor::I16(a) => a.into(),
        Tensor::I32(a) => a.into(),
        Tensor::I64(a) => a.into(),
        Tensor::Bool(a) => a.into(),
    };
    if tensor.datum_type() == dt {
        return Ok(tensor);
    }
    if dt.is_quantized() && dt.unquantized() == tensor.datum_type() {
        let mut tensor = tensor;
        // Re-label the values with their quantization without converting them.
        #[allow(unsafe_code)]
        // SAFETY: `dt.unquantized()` is the tensor's own type, so the storage (element size and
        // every bit pattern) is valid for `dt`; only the meaning tract attaches changes.
        unsafe {
            tensor.set_datum_type(dt)
        };
        return Ok(tensor);
    }
    bail!("expected {dt:?}, got {:?}", tensor.datum_type())
}

/// A tract tensor as ours; quantized values come back as their raw integers.
pub(crate) fn from_tract(t: &TractTensor) -> TractResult<Tensor> {
    let shape = t.shape().to_vec();
    let bytes = t.as_bytes();
    Ok(match t.datum_type().unquantized() {
        DatumType::F32 => Tensor::F32(t.to_plain_array_view::<f32>()?.to_owned()),
        DatumType::F16 => Tensor::F32(t.cast_to::<f32>()?.to_plain_array_view::<f32>()?.to_owned()),
        DatumType::F64 => Tensor::F32(t.cast_to::<f32>()?.to_plain_array_view::<f32>()?.to_owned()),
        DatumType::I8 => Tensor::I8(ndarray::ArrayD::from_shape_vec(
            shape,
            bytes.iter().map(|&b| b as i8).collect(),
        )?),
        DatumType::U8 => Tensor::U8(ndarray::ArrayD::from_shape_vec(shape, bytes.to_vec())?),
        DatumType::I16 => Tensor::I16(t.cast_to::<i16>()?.to_plain_array_view::<i16>()?.to_owned()),
        DatumType::I32 => Tensor::I32(t.cast_to::<i32>()?.to_plain_array_view::<i32>()?.to_owned()),
        DatumType::I64 => Tensor::I64(t.to_plain_array_view::<i64>()?.to_owned()),
        DatumType::Bool => Tensor::Bool(t.to_plain_array_view::<bool>()?.to_owned()),
        other => bail!("unsupported output element type {other:?}"),
    })
}

/// Our element type for a tract datum type.
pub(crate) fn dtype_of(dt: DatumType) -> TractResult<DType> {
    Ok(match dt.unquantized() {
        DatumType::F32 | DatumType::F16 | DatumType::F64 => DType::F32,
        DatumType::I8 => DType::I8,
        DatumType::U8 => DType::U8,
        DatumType::I16 => DType::I16,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::Bool => DType::Bool,
        other => bail!("unsupported element type {other:?}"),
    })
}

/// Describes a typed fact.
pub(crate) fn spec_from_fact(name: &str, fact: &TypedFact) -> TractResult<TensorSpec> {
    let shape = fact
        .shape
        .iter()
        .map(|d| match d.to_usize() {
            Ok(n) => Dim::Fixed(n),
            Err(_) => Dim::Symbolic(d.to_string()),
        })
        .collect();
    let quantization = fact.datum_type.qparams().map(|q| {
        let (zero_point, scale) = q.zp_scale();
        QuantParams { scale, zero_point }
    });
    Ok(TensorSpec {
        name: name.to_string(),
        dtype: dtype_of(fact.datum_type)?,
        shape,
        quantization,
    })
}

/// Runs `f`, turning a panic inside a third-party loader into an error: a malformed model must
/// not take the agent down.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            bail!("{what} panicked: {msg}")
        }
    }
}

/// Turns a tract error chain into one line per cause, innermost last.
pub(crate) fn error_text(e: &TractError) -> String {
    let causes: Vec<String> = e
        .chain()
        .map(|c| {
            c.to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .filter(|c| !c.is_empty())
        .collect();
    causes.join(": ")
}

/// Wraps a run failure.
pub(crate) fn run_error(model: &str, e: TractError) -> InferError {
    InferError::Run {
        model: model.to_string(),
        detail: error_text(&e),
    }
}
