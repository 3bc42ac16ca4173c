//! Straight-line programs: an optimized tract graph made only of Cascade's own operators, run
//! step by step over output buffers allocated once.
//!
//! tract's `SimpleState` allocates every node's output on every run and hands values around in
//! reference-counted, small-vector-wrapped tensors. On the smallest int8 models that bookkeeping,
//! not the arithmetic, was most of the run: on the MLPerf Tiny anomaly detector, 10
//! fully-connected layers of 128 values, `perf` put tensor allocation and freeing, the plan's
//! loop, `SmallVec` and `Arc` drops and the input and output conversions at over half of the
//! time (2026-11-24). TFLite runs such models in an arena planned once, and so does a
//! [`Program`]: where every node of the graph is a model input, a reshape, or an operator that
//! implements [`IntoBuffer`], each node's output gets a tensor of its (fixed) type and shape when
//! a run state is made, and every run writes into the same tensors. Any other graph (float
//! models, tract's own operators, symbolic shapes) runs on tract's plan as before.
//!
//! Memory: a program keeps every intermediate value of a state, where tract frees each after
//! its last reader; for the models that qualify (a few hundred kilobytes of activations at most)
//! that is the price of allocating nothing per run.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::change_axes::IntoShape;
use tract_core::ops::source::TypedSource;

use crate::qkernels::{QAdd, QAvgPool, QConv, QFullyConnected, QMul, output_tensor};
use crate::tflite::{QSoftmax, Rescale};
use crate::tract::Idle;

/// An operator that writes its output into a tensor its caller owns: a [`Program`]'s buffer,
/// or a new tensor when tract runs it ([`eval_allocating`]).
pub(crate) trait IntoBuffer {
    /// The output's storage type and shape for these inputs, or an error naming what about the
    /// inputs does not fit the operator.
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType>;

    /// Computes the output into `out`, which has the type and shape [`IntoBuffer::output_for`]
    /// gives for `inputs`. Every element is written: a program's buffers hold the previous
    /// run's values.
    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()>;
}

/// An output's storage type and shape.
pub(crate) type OutputType = (DatumType, TVec<usize>);

/// The values of an `f32` tensor (an error for any other type).
pub(crate) fn floats(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// `op` on `inputs` into a new tensor: the `EvalOp::eval` of every [`IntoBuffer`] operator.
pub(crate) fn eval_allocating(
    op: &impl IntoBuffer,
    inputs: &[TValue],
) -> TractResult<TVec<TValue>> {
    let inputs: TVec<&Tensor> = inputs.iter().map(|v| &**v).collect();
    let (dt, shape) = op.output_for(&inputs)?;
    let mut out = output_tensor(dt, &shape)?;
    // In tests, garbage where the output goes: every operator test then also checks that
    // `eval_into` writes every element, as a program's reused buffers need.
    #[cfg(test)]
    out.as_bytes_mut().fill(POISON);
    op.eval_into(&inputs, &mut out)?;
    Ok(tvec!(out.into_tvalue()))
}

/// The byte tests fill outputs with before an operator writes them.
#[cfg(test)]
pub(crate) const POISON: u8 = 0xa5;

/// A step's operator, reached through its node: [`IntoBuffer`]'s two methods for the operator
/// type the program found there.
#[derive(Clone, Copy)]
struct Kernel {
    output_for: fn(&TypedNode, &[&Tensor]) -> TractResult<OutputType>,
    eval_into: fn(&TypedNode, &[&Tensor], &mut Tensor) -> TractResult<()>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kernel")
    }
}

impl Kernel {
    /// The kernel of operator type `K`.
    fn of<K: IntoBuffer + Op>() -> Kernel {
        fn op<K: Op>(node: &TypedNode) -> TractResult<&K> {
            node.op_as::<K>()
                .with_context(|| format!("program step {node} changed operator"))
        }
        Kernel {
            output_for: |node, inputs| op::<K>(node)?.output_for(inputs),
            eval_into: |node, inputs, out| op::<K>(node)?.eval_into(inputs, out),
        }
    }

    /// The kernel for `node`'s operator, if it is one a program runs.
    fn for_node(node: &TypedNode) -> Option<Kernel> {
        let op = node.op();
        let kernels: [(bool, fn() -> Kernel); 8] = [
            (op.is::<Rescale>(), Kernel::of::<Rescale>),
            (op.is::<QSoftmax>(), Kernel::of::<QSoftmax>),
            (op.is::<QFullyConnected>(), Kernel::of::<QFullyConnected>),
            (op.is::<QConv>(), Kernel::of::<QConv>),
            (op.is::<QAdd>(), Kernel::of::<QAdd>),
            (op.is::<QMul>(), Kernel::of::<QMul>),
            (op.is::<QAvgPool>(), Kernel::of::<QAvgPool>),
            (op.is::<IntoShape>(), Kernel::of::<IntoShape>),
        ];
        kernels
            .into_iter()
            .find(|(is, _)| *is)
            .map(|(_, kernel)| kernel())
    }
}

/// tract's reshape of contiguous values: the same bytes under the output's shape.
impl IntoBuffer for IntoShape {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        ensure!(
            inputs[0].len() == self.len,
            "a reshape of {} values given {}",
            self.len,
            inputs[0].len()
        );
        Ok((inputs[0].datum_type(), self.dims.clone()))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        out.as_bytes_mut().copy_from_slice(inputs[0].as_bytes());
        Ok(())
    }
}

/// One node of the program.
#[derive(Debug)]
struct Step {
    /// The node in the plan's model, whose operator runs.
    node: usize,
    kernel: Kernel,
    /// Buffers read, all of earlier steps or model inputs (so below `output`).
    inputs: TVec<usize>,
    /// The buffer written.
    output: usize,
}

/// A graph of Cascade's operators with fixed shapes, run over buffers allocated once per state.
#[derive(Debug)]
pub(crate) struct Program {
    /// The optimized model whose nodes' operators the steps run.
    runnable: Arc<TypedRunnableModel>,
    steps: Vec<Step>,
    /// The storage type and shape of each buffer, in evaluation order.
    buffers: Vec<OutputType>,
    /// The buffer holding each model input, in the model's input order.
    inputs: Vec<usize>,
    /// The buffer holding each model output, in the model's output order.
    outputs: Vec<usize>,
    /// Buffer sets of earlier runs.
    idle: Idle<Vec<Tensor>>,
}

impl Program {
    /// The program for `runnable`'s model, or why it has none (a node of another operator, a
    /// symbolic shape, ...), for the log.
    pub(crate) fn new(runnable: &Arc<TypedRunnableModel>) -> Result<Program, String> {
        let model = runnable.model();
        let order = model.eval_order().map_err(|e| e.to_string())?;
        let mut buffer_of = vec![usize::MAX; model.nodes.len()];
        let mut buffers = Vec::with_capacity(order.len());
        let mut steps = Vec::with_capacity(order.len());
        for &id in &order {
            let node = &model.nodes[id];
            let [output] = &node.outputs[..] else {
                return Err(format!("{node} has {} outputs", node.outputs.len()));
            };
            let fact = &output.fact;
            let shape = fact
                .shape
                .as_concrete()
                .filter(|_| fact.exotic_fact.is_none())
                .ok_or_else(|| format!("{node} has no fixed plain shape ({fact:?})"))?;
            let buffer = buffers.len();
            buffers.push((fact.datum_type, shape.into()));
            buffer_of[id] = buffer;
            if node.op_is::<TypedSource>() {
                continue;
            }
            let kernel =
                Kernel::for_node(node).ok_or_else(|| format!("{node} runs on tract only"))?;
            let inputs = node
                .inputs
                .iter()
                .map(|i| match buffer_of[i.node] {
                    b if i.slot == 0 && b < buffer => Ok(b),
                    _ => Err(format!("{node} reads {i:?}, not an earlier output")),
                })
                .collect::<Result<_, _>>()?;
            steps.push(Step {
                node: id,
                kernel,
                inputs,
                output: buffer,
            });
        }
        let buffers_of = |outlets: &[OutletId]| -> Result<Vec<usize>, String> {
            outlets
                .iter()
                .map(|o| match buffer_of.get(o.node) {
                    Some(&b) if o.slot == 0 && b != usize::MAX => Ok(b),
                    _ => Err(format!("model input or output {o:?} is not a node's value")),
                })
                .collect()
        };
        let inputs = buffers_of(model.input_outlets().map_err(|e| e.to_string())?)?;
        let outputs = buffers_of(model.output_outlets().map_err(|e| e.to_string())?)?;
        let program = Program {
            runnable: runnable.clone(),
            steps,
            buffers,
            inputs,
            outputs,
            idle: Idle::default(),
        };
        program.check_buffers()?;
        Ok(program)
    }

    /// Checks once that every step's operator, given its input buffers, computes an output of its
    /// buffer's type and shape: the buffers come from tract's facts, and the kernels write into
    /// them without checking on every run.
    fn check_buffers(&self) -> Result<(), String> {
        let buffers = self.allocate().map_err(|e| e.to_string())?;
        let model = self.runnable.model();
        for step in &self.steps {
            let node = &model.nodes[step.node];
            let inputs: TVec<&Tensor> = step.inputs.iter().map(|&b| &buffers[b]).collect();
            let (dt, shape) =
                (step.kernel.output_for)(node, &inputs).map_err(|e| format!("{node}: {e}"))?;
            let buffer = &buffers[step.output];
            if dt.unquantized() != buffer.datum_type().unquantized() || *shape != *buffer.shape() {
                return Err(format!(
                    "{node} computes {dt:?} {shape:?} where its fact says {:?} {:?}",
                    buffer.datum_type(),
                    buffer.shape()
                ));
            }
        }
        Ok(())
    }

    /// A new set of buffers, one per node output.
    pub(crate) fn allocate(&self) -> TractResult<Vec<Tensor>> {
        self.buffers
            .iter()
            .map(|(dt, shape)| output_tensor(*dt, shape))
            .collect()
    }

    /// Runs the program on `inputs` (already checked against the model's specs); `time` sees
    /// each step's node and how long it took, when profiling.
    pub(crate) fn run(
        &self,
        inputs: &[crate::tensor::Tensor],
        mut time: Option<&mut dyn FnMut(usize, std::time::Duration)>,
    ) -> TractResult<Vec<crate::tensor::Tensor>> {
        let mut buffers = self.idle.take(|| self.allocate())?;
        let result = self.run_in(&mut buffers, inputs, &mut time);
        // Even after an error: the buffers are whole, only their values stale.
        self.idle.give_back(buffers);
        result
    }

    /// Runs the program in `buffers` (from [`Program::allocate`]).
    pub(crate) fn run_in(
        &self,
        buffers: &mut [Tensor],
        inputs: &[crate::tensor::Tensor],
        time: &mut Option<&mut dyn FnMut(usize, std::time::Duration)>,
    ) -> TractResult<Vec<crate::tensor::Tensor>> {
        ensure!(
            inputs.len() == self.inputs.len(),
            "{} inputs for a model of {}",
            inputs.len(),
            self.inputs.len()
        );
        for (input, &b) in inputs.iter().zip(&self.inputs) {
            let buffer = &mut buffers[b];
            ensure!(
                input.shape() == buffer.shape()
                    && Some(input.dtype()) == crate::tract::dtype_of(buffer.datum_type()).ok(),
                "input of {} {:?} for a model input of {:?} {:?}",
                input.dtype(),
                input.shape(),
                buffer.datum_type(),
                buffer.shape()
            );
            match crate::tensor::as_ne_bytes(input) {
                Some(bytes) if bytes.len() == buffer.as_bytes().len() => {
                    buffer.as_bytes_mut().copy_from_slice(bytes)
                }
                _ => bail!(
                    "input of {} elements in memory unlike a {:?} tensor",
                    input.dtype(),
                    buffer.datum_type()
                ),
            }
        }
        let model = self.runnable.model();
        for step in &self.steps {
            let started = time.is_some().then(std::time::Instant::now);
            let (done, rest) = buffers.split_at_mut(step.output);
            let ins: TVec<&Tensor> = step.inputs.iter().map(|&b| &done[b]).collect();
            (step.kernel.eval_into)(&model.nodes[step.node], &ins, &mut rest[0])?;
            if let (Some(time), Some(started)) = (time.as_mut(), started) {
                time(step.node, started.elapsed());
            }
        }
        self.outputs
            .iter()
            .map(|&b| crate::tract::from_tract(&buffers[b]))
            .collect()
    }
}
