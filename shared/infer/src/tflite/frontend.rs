//! Cascade's TFLite frontend: translates a `.tflite` flatbuffer into a tract-core graph.
//!
//! tract-tflite 0.23 misses operators that common exporters emit (QUANTIZE, DEQUANTIZE, PRELU,
//! MEAN on quantized data, int8 ADD whose inputs are quantized differently) and its operator
//! registry is private, so it cannot be extended from outside. This frontend reads the same
//! flatbuffer (through tract-tflite's generated schema) and builds the graph itself.
//!
//! Quantization is handled here, not by tract's quantized datum types: activations travel as
//! plain `i8`/`u8` tensors and the frontend remembers each one's scale and zero point.
//!
//! - CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED run on tract's int8 kernels (i32
//!   accumulation, per-channel weight scales, requantized outputs).
//! - QUANTIZE, DEQUANTIZE, requantization and fused activations are [`Rescale`] ops that round
//!   as the TFLite reference kernels do.
//! - Element-wise and reduction operators on quantized tensors (ADD with differently quantized
//!   inputs, SOFTMAX, MEAN, LOGISTIC, ...) decode their inputs, compute in `f32` and re-encode,
//!   which stays within one quantization step of the reference integer kernels.
//! - Float16 weights (DEQUANTIZE of a constant) are expanded to `f32` at load time.

use std::collections::HashMap;

use tract_core::internal::*;
use tract_core::ops::array::{Pad, PadMode, Slice, TypedConcat};
use tract_core::ops::cast::cast;
use tract_core::ops::change_axes::wire_with_rank_broadcast;
use tract_core::ops::cnn::{Conv, KernelFormat, MaxPool, PaddingSpec, PoolSpec, SumPool};
use tract_core::ops::einsum::EinSum;
use tract_core::ops::nn::{DataFormat, Reduce, Reducer};
use tract_tflite::tflite::{
    self as fb, ActivationFunctionType, BuiltinOperator, Padding, TensorType,
};

use super::rescale::{Affine, QSoftmax, Rescale};
use crate::model::{QuantParams, TensorSpec};
use crate::qkernels::{Channels, IntOutput, Operand, QAdd, QAvgPool, QConv, QFullyConnected, QMul};

/// Why a model could not be translated: which node (named by its first output tensor), which
/// operator, and what was wrong.
#[derive(Debug)]
pub(crate) struct FrontendError {
    pub node: Option<String>,
    pub op: Option<String>,
    pub detail: String,
}

/// A translated model and its described inputs and outputs.
pub(crate) struct Translated {
    pub model: TypedModel,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Translates TFLite flatbuffer bytes (the first subgraph).
pub(crate) fn translate(bytes: &[u8]) -> Result<Translated, FrontendError> {
    let fail = |detail: String| FrontendError {
        node: None,
        op: None,
        detail,
    };
    let root = fb::root_as_model(bytes).map_err(|e| {
        fail(format!(
            "not a valid TFLite flatbuffer (corrupt or truncated?): {e}"
        ))
    })?;
    let graphs = root
        .subgraphs()
        .ok_or_else(|| fail("the model has no subgraph".into()))?;
    if graphs.is_empty() {
        return Err(fail("the model has no subgraph".into()));
    }
    let graph = graphs.get(0);
    let mut frontend = Frontend {
        root,
        graph,
        target: TypedModel::default(),
        wires: HashMap::new(),
    };
    let inputs = frontend.wire_inputs().map_err(|e| fail(e.to_string()))?;
    let operators = graph
        .operators()
        .map(|o| o.iter().collect::<Vec<_>>())
        .unwrap_or_default();
    for op in operators {
        let name = frontend.op_name(&op);
        let code = frontend.opcode(&op);
        frontend
            .translate_op(&op, code, &name)
            .map_err(|e| FrontendError {
                node: Some(name.clone()),
                op: Some(
                    code.variant_name()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("builtin #{}", code.0)),
                ),
                detail: crate::tract::error_text(&e),
            })?;
    }
    let outputs = frontend.wire_outputs().map_err(|e| fail(e.to_string()))?;
    Ok(Translated {
        model: frontend.target,
        inputs,
        outputs,
    })
}

/// What an engine that runs the file itself (the TFLite interpreter) needs to know of it.
#[cfg_attr(not(feature = "tflite"), allow(dead_code))]
pub(crate) struct Declared {
    /// The first subgraph's inputs as the file declares them (names, element types, shapes,
    /// quantization), without translating any operator.
    pub inputs: Vec<TensorSpec>,
    /// Its outputs, likewise.
    pub outputs: Vec<TensorSpec>,
    /// The first FULLY_CONNECTED node (named by its output) with per-channel weight scales, if
    /// any. TFLite runtimes older than TF 2.14's read only the first scale of such weights and
    /// compute wrong results without an error, so an old interpreter must refuse the model.
    pub per_channel_fully_connected: Option<String>,
}

/// Reads what [`Declared`] holds from TFLite flatbuffer bytes.
#[cfg_attr(not(feature = "tflite"), allow(dead_code))]
pub(crate) fn describe(bytes: &[u8]) -> Result<Declared, String> {
    let root = fb::root_as_model(bytes)
        .map_err(|e| format!("not a valid TFLite flatbuffer (corrupt or truncated?): {e}"))?;
    let graph = root
        .subgraphs()
        .filter(|g| !g.is_empty())
        .ok_or("the model has no subgraph")?
        .get(0);
    let frontend = Frontend {
        root,
        graph,
        target: TypedModel::default(),
        wires: HashMap::new(),
    };
    let specs = |ixs: Vec<i32>| -> Result<Vec<TensorSpec>, String> {
        ixs.into_iter()
            .map(|ix| frontend.declared_spec(ix).map_err(|e| e.to_string()))
            .collect()
    };
    let inputs = graph
        .inputs()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let outputs = graph
        .outputs()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let per_channel_fully_connected = graph
        .operators()
        .into_iter()
        .flatten()
        .find(|op| {
            frontend.opcode(op) == BuiltinOperator::FULLY_CONNECTED
                && op
                    .inputs()
                    .and_then(|i| i.iter().nth(1))
                    .and_then(|w| frontend.tensor(w).ok())
                    .and_then(|w| w.quantization())
                    .and_then(|q| q.scale())
                    .is_some_and(|scales| scales.len() > 1)
        })
        .map(|op| frontend.op_name(&op));
    Ok(Declared {
        inputs: specs(inputs)?,
        outputs: specs(outputs)?,
        per_channel_fully_connected,
    })
}

/// Stride, dilation and padding of a convolution.
#[derive(Debug, Clone, Copy)]
struct ConvGeometry {
    same: bool,
    strides: [usize; 2],
    dilations: [usize; 2],
}

/// Scales, zero points and axis of a per-channel quantized constant.
type ChannelQuant = (Vec<f32>, Vec<i32>, usize);

struct Frontend<'m> {
    root: fb::Model<'m>,
    graph: fb::SubGraph<'m>,
    target: TypedModel,
    /// Wire carrying each TFLite tensor (by index) once it is computed or materialized.
    wires: HashMap<i32, OutletId>,
}

/// The storage type of a TFLite tensor type.
fn datum_type(t: TensorType) -> TractResult<DatumType> {
    Ok(match t {
        TensorType::FLOAT32 => DatumType::F32,
        TensorType::FLOAT16 => DatumType::F16,
        TensorType::INT8 => DatumType::I8,
        TensorType::UINT8 => DatumType::U8,
        TensorType::INT16 => DatumType::I16,
        TensorType::INT32 => DatumType::I32,
        TensorType::INT64 => DatumType::I64,
        TensorType::BOOL => DatumType::Bool,
        other => bail!(
            "unsupported tensor type {:?}",
            other.variant_name().unwrap_or("?")
        ),
    })
}

/// Builds a tensor from little-endian bytes.
fn tensor_from_bytes(dt: DatumType, shape: &[usize], bytes: &[u8]) -> TractResult<Tensor> {
    macro_rules! from_le {
        ($t:ty, $n:expr) => {{
            let values: Vec<$t> = bytes
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunks_exact yields $n bytes")))
                .collect();
            tract_ndarray::ArrayD::from_shape_vec(shape, values)?.into_tensor()
        }};
    }
    Ok(match dt {
        DatumType::F32 => from_le!(f32, 4),
        DatumType::F16 => {
            let values: Vec<f16> = bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            tract_ndarray::ArrayD::from_shape_vec(shape, values)?.into_tensor()
        }
        DatumType::I8 => {
            tract_ndarray::ArrayD::from_shape_vec(shape, bytes.iter().map(|&b| b as i8).collect())?
                .into_tensor()
        }
        DatumType::U8 => {
            tract_ndarray::ArrayD::from_shape_vec(shape, bytes.to_vec())?.into_tensor()
        }
        DatumType::I16 => from_le!(i16, 2),
        DatumType::I32 => from_le!(i32, 4),
        DatumType::I64 => from_le!(i64, 8),
        DatumType::Bool => {
            tract_ndarray::ArrayD::from_shape_vec(shape, bytes.iter().map(|&b| b != 0).collect())?
                .into_tensor()
        }
        other => bail!("cannot load constant of type {other:?}"),
    })
}

fn activation_bounds(act: ActivationFunctionType) -> TractResult<(f32, f32)> {
    Ok(match act {
        ActivationFunctionType::NONE => (f32::NEG_INFINITY, f32::INFINITY),
        ActivationFunctionType::RELU => (0.0, f32::INFINITY),
        ActivationFunctionType::RELU6 => (0.0, 6.0),
        ActivationFunctionType::RELU_N1_TO_1 => (-1.0, 1.0),
        other => bail!(
            "unsupported fused activation {:?}",
            other.variant_name().unwrap_or("?")
        ),
    })
}

fn padding_spec(p: Padding) -> TractResult<PaddingSpec> {
    Ok(match p {
        Padding::SAME => PaddingSpec::SameUpper,
        Padding::VALID => PaddingSpec::Valid,
        other => bail!("unsupported padding {other:?}"),
    })
}

/// Resolves a possibly negative axis.
fn axis(a: i64, rank: usize) -> TractResult<usize> {
    let resolved = if a < 0 { a + rank as i64 } else { a };
    ensure!(
        (0..rank as i64).contains(&resolved),
        "axis {a} out of range for rank {rank}"
    );
    Ok(resolved as usize)
}

impl<'m> Frontend<'m> {
    fn tensor(&self, ix: i32) -> TractResult<fb::Tensor<'m>> {
        let tensors = self.graph.tensors().context("subgraph has no tensors")?;
        ensure!(
            ix >= 0 && (ix as usize) < tensors.len(),
            "tensor index {ix} out of range"
        );
        Ok(tensors.get(ix as usize))
    }

    fn tensor_name(&self, ix: i32) -> String {
        self.tensor(ix)
            .ok()
            .and_then(|t| t.name().map(str::to_string))
            .unwrap_or_else(|| format!("tensor_{ix}"))
    }

    fn op_name(&self, op: &fb::Operator) -> String {
        op.outputs()
            .and_then(|o| o.iter().next())
            .map(|ix| self.tensor_name(ix))
            .unwrap_or_else(|| "unnamed".into())
    }

    fn opcode(&self, op: &fb::Operator) -> BuiltinOperator {
        let Some(code) = self
            .root
            .operator_codes()
            .filter(|c| (op.opcode_index() as usize) < c.len())
            .map(|c| c.get(op.opcode_index() as usize))
        else {
            return BuiltinOperator(-1);
        };
        // Codes above 127 live in `builtin_code`; `deprecated_builtin_code` holds a placeholder.
        if i32::from(code.deprecated_builtin_code())
            == BuiltinOperator::PLACEHOLDER_FOR_GREATER_OP_CODES.0
        {
            code.builtin_code()
        } else {
            BuiltinOperator(i32::from(code.deprecated_builtin_code()))
        }
    }

    fn dt(&self, ix: i32) -> TractResult<DatumType> {
        datum_type(self.tensor(ix)?.type_())
    }

    fn shape(&self, ix: i32) -> TractResult<Vec<usize>> {
        let t = self.tensor(ix)?;
        t.shape()
            .map(|s| {
                s.iter()
                    .map(|d| usize::try_from(d).context("negative dimension"))
                    .collect()
            })
            .unwrap_or_else(|| Ok(vec![]))
    }

    /// Per-tensor quantization of an activation (or a per-tensor quantized constant).
    fn q(&self, ix: i32) -> TractResult<Option<Affine>> {
        let t = self.tensor(ix)?;
        let Some(qp) = t.quantization() else {
            return Ok(None);
        };
        let (Some(scale), zp) = (qp.scale(), qp.zero_point()) else {
            return Ok(None);
        };
        if scale.is_empty() {
            return Ok(None);
        }
        let zero_point = zp.filter(|z| !z.is_empty()).map(|z| z.get(0)).unwrap_or(0);
        Ok(Some(Affine {
            scale: scale.get(0),
            zero_point: zero_point as i32,
        }))
    }

    /// Per-channel scales and zero points of a constant, and the quantized axis.
    fn q_channels(&self, ix: i32) -> TractResult<Option<ChannelQuant>> {
        let t = self.tensor(ix)?;
        let Some(qp) = t.quantization() else {
            return Ok(None);
        };
        let Some(scale) = qp.scale() else {
            return Ok(None);
        };
        let scales: Vec<f32> = scale.iter().collect();
        if scales.is_empty() {
            return Ok(None);
        }
        let zps: Vec<i32> = qp
            .zero_point()
            .map(|z| z.iter().map(|v| v as i32).collect())
            .filter(|z: &Vec<i32>| !z.is_empty())
            .unwrap_or_else(|| vec![0; scales.len()]);
        Ok(Some((
            scales,
            zps,
            usize::try_from(qp.quantized_dimension()).unwrap_or(0),
        )))
    }

    /// The constant value of a tensor stored in the file, if it has one.
    fn konst(&self, ix: i32) -> TractResult<Option<Tensor>> {
        let t = self.tensor(ix)?;
        let buffer_ix = t.buffer() as usize;
        if buffer_ix == 0 {
            return Ok(None);
        }
        let buffers = self.root.buffers().context("model has no buffers")?;
        ensure!(
            buffer_ix < buffers.len(),
            "buffer index {buffer_ix} out of range"
        );
        let Some(data) = buffers.get(buffer_ix).data() else {
            return Ok(None);
        };
        if data.is_empty() {
            return Ok(None);
        }
        let dt = self.dt(ix)?;
        let shape = self.shape(ix)?;
        let expected = shape.iter().product::<usize>() * dt.size_of();
        ensure!(
            data.len() == expected,
            "constant {:?} has {} bytes, its shape {shape:?} of {dt:?} needs {expected}",
            self.tensor_name(ix),
            data.len()
        );
        tensor_from_bytes(dt, &shape, data.bytes()).map(Some)
    }

    /// The constant value of a tensor: stored in the file, or computed from constants at load
    /// time (float16 weights expanded by a DEQUANTIZE, a SHAPE, ...).
    fn constant(&self, ix: i32) -> TractResult<Option<Tensor>> {
        if let Some(t) = self.konst(ix)? {
            return Ok(Some(t));
        }
        match self.wires.get(&ix) {
            Some(w) => Ok(self
                .target
                .outlet_fact(*w)?
                .konst
                .as_ref()
                .map(|t| (**t).clone())),
            None => Ok(None),
        }
    }

    /// Wires a tensor: a computed value, or its constant (materialized on first use).
    fn input(&mut self, ix: i32) -> TractResult<OutletId> {
        if let Some(w) = self.wires.get(&ix) {
            return Ok(*w);
        }
        let value = self.konst(ix)?.with_context(|| {
            format!(
                "tensor {:?} has neither a producer nor a constant value",
                self.tensor_name(ix)
            )
        })?;
        let name = self.target.unique_name(self.tensor_name(ix)).to_string();
        let wire = self.target.add_const(name, value)?;
        self.wires.insert(ix, wire);
        Ok(wire)
    }

    fn add_const(&mut self, name: &str, t: Tensor) -> TractResult<OutletId> {
        let name = self.target.unique_name(name).to_string();
        self.target.add_const(name, t)
    }

    fn node(
        &mut self,
        name: &str,
        op: impl Into<Box<dyn TypedOp>>,
        inputs: &[OutletId],
    ) -> TractResult<OutletId> {
        let name = self.target.unique_name(name).to_string();
        Ok(self.target.wire_node(name, op, inputs)?[0])
    }

    /// Tensor `ix` as the file declares it.
    fn declared_spec(&self, ix: i32) -> TractResult<TensorSpec> {
        let fact = self.dt(ix)?.fact(self.shape(ix)?);
        let mut spec = crate::tract::spec_from_fact(&self.tensor_name(ix), &fact)?;
        spec.quantization = self.quant_params(ix)?;
        Ok(spec)
    }

    fn quant_params(&self, ix: i32) -> TractResult<Option<QuantParams>> {
        Ok(self.q(ix)?.map(|q| QuantParams {
            scale: q.scale,
            zero_point: q.zero_point,
        }))
    }

    fn spec(&self, ix: i32, wire: OutletId) -> TractResult<TensorSpec> {
        let mut spec =
            crate::tract::spec_from_fact(&self.tensor_name(ix), self.target.outlet_fact(wire)?)?;
        spec.quantization = self.quant_params(ix)?;
        Ok(spec)
    }

    fn wire_inputs(&mut self) -> TractResult<Vec<TensorSpec>> {
        let inputs: Vec<i32> = self
            .graph
            .inputs()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let mut specs = Vec::new();
        for ix in inputs {
            let dt = self.dt(ix)?;
            let shape = self.shape(ix)?;
            let wire = self
                .target
                .add_source(self.tensor_name(ix), dt.fact(shape))?;
            self.wires.insert(ix, wire);
            specs.push(self.spec(ix, wire)?);
        }
        Ok(specs)
    }

    fn wire_outputs(&mut self) -> TractResult<Vec<TensorSpec>> {
        let outputs: Vec<i32> = self
            .graph
            .outputs()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let mut wires = Vec::new();
        let mut specs = Vec::new();
        for ix in outputs {
            let wire = self.input(ix)?;
            wires.push(wire);
            specs.push(self.spec(ix, wire)?);
        }
        self.target.select_output_outlets(&wires)?;
        Ok(specs)
    }

    /// `value` decoded to real numbers (`f32`), whatever its encoding.
    fn decode(&mut self, name: &str, value: OutletId, q: Option<Affine>) -> TractResult<OutletId> {
        let dt = self.target.outlet_fact(value)?.datum_type;
        match (dt, q) {
            (DatumType::F32, None) => Ok(value),
            (DatumType::F16, None) => {
                self.node(&format!("{name}.to_f32"), cast(DatumType::F32), &[value])
            }
            (_, q) => self.node(
                &format!("{name}.decode"),
                Rescale::new(q, None, DatumType::F32),
                &[value],
            ),
        }
    }

    /// Real numbers encoded as the output tensor `out` expects, with a real-valued clamp.
    fn encode(
        &mut self,
        name: &str,
        real: OutletId,
        out: i32,
        lo: f32,
        hi: f32,
    ) -> TractResult<OutletId> {
        let dt = self.dt(out)?;
        let q = self.q(out)?;
        if dt == DatumType::F32 && lo == f32::NEG_INFINITY && hi == f32::INFINITY {
            return Ok(real);
        }
        let to = if dt == DatumType::F32 { None } else { q };
        self.node(
            &format!("{name}.encode"),
            Rescale::new(None, to, dt).clamped(lo, hi),
            &[real],
        )
    }

    /// Applies a fused activation to a wire already encoded like tensor `out`.
    fn activation(
        &mut self,
        name: &str,
        wire: OutletId,
        out: i32,
        act: ActivationFunctionType,
    ) -> TractResult<OutletId> {
        let (lo, hi) = activation_bounds(act)?;
        if lo == f32::NEG_INFINITY && hi == f32::INFINITY {
            return Ok(wire);
        }
        let dt = self.dt(out)?;
        let q = if dt == DatumType::F32 {
            None
        } else {
            self.q(out)?
        };
        self.node(
            &format!("{name}.activation"),
            Rescale::new(q, q, dt).clamped(lo, hi),
            &[wire],
        )
    }

    fn op_inputs(op: &fb::Operator) -> Vec<i32> {
        op.inputs().map(|v| v.iter().collect()).unwrap_or_default()
    }

    fn op_outputs(op: &fb::Operator) -> Vec<i32> {
        op.outputs().map(|v| v.iter().collect()).unwrap_or_default()
    }

    fn translate_op(
        &mut self,
        op: &fb::Operator,
        code: BuiltinOperator,
        name: &str,
    ) -> TractResult<()> {
        let ins = Self::op_inputs(op);
        let outs = Self::op_outputs(op);
        ensure!(!outs.is_empty(), "operator has no outputs");
        let out = outs[0];
        let wire = match code {
            BuiltinOperator::QUANTIZE => {
                let x = self.input(ins[0])?;
                let from = if self.dt(ins[0])? == DatumType::F32 {
                    None
                } else {
                    self.q(ins[0])?
                };
                let to = self
                    .q(out)?
                    .context("QUANTIZE output has no quantization parameters")?;
                self.node(name, Rescale::new(from, Some(to), self.dt(out)?), &[x])?
            }
            BuiltinOperator::DEQUANTIZE => self.dequantize(name, ins[0])?,
            BuiltinOperator::CONV_2D => self.conv(op, name, &ins, out, false)?,
            BuiltinOperator::DEPTHWISE_CONV_2D => self.conv(op, name, &ins, out, true)?,
            BuiltinOperator::FULLY_CONNECTED => self.fully_connected(op, name, &ins, out)?,
            BuiltinOperator::ADD | BuiltinOperator::SUB | BuiltinOperator::MUL => {
                let act = match code {
                    BuiltinOperator::ADD => op
                        .builtin_options_as_add_options()
                        .map(|o| o.fused_activation_function()),
                    BuiltinOperator::SUB => op
                        .builtin_options_as_sub_options()
                        .map(|o| o.fused_activation_function()),
                    _ => op
                        .builtin_options_as_mul_options()
                        .map(|o| o.fused_activation_function()),
                }
                .unwrap_or(ActivationFunctionType::NONE);
                let mini = match code {
                    BuiltinOperator::ADD => tract_core::ops::math::add(),
                    BuiltinOperator::SUB => tract_core::ops::math::sub(),
                    _ => tract_core::ops::math::mul(),
                };
                self.binary(name, mini, ins[0], ins[1], out, act)?
            }
            BuiltinOperator::MAXIMUM | BuiltinOperator::MINIMUM => {
                let mini = if code == BuiltinOperator::MAXIMUM {
                    tract_core::ops::math::max()
                } else {
                    tract_core::ops::math::min()
                };
                self.binary(
                    name,
                    mini,
                    ins[0],
                    ins[1],
                    out,
                    ActivationFunctionType::NONE,
                )?
            }
            BuiltinOperator::AVERAGE_POOL_2D | BuiltinOperator::MAX_POOL_2D => {
                self.pool(op, name, ins[0], out, code == BuiltinOperator::MAX_POOL_2D)?
            }
            BuiltinOperator::RESHAPE => self.reshape(op, name, &ins, out)?,
            BuiltinOperator::SQUEEZE => self.squeeze(op, name, ins[0])?,
            BuiltinOperator::EXPAND_DIMS => {
                let x = self.input(ins[0])?;
                let rank = self.target.outlet_fact(x)?.rank();
                let a = self
                    .constant(ins[1])?
                    .context("EXPAND_DIMS needs a constant axis")?;
                let a = axis(a.cast_to_scalar::<i64>()?, rank + 1)?;
                self.node(name, AxisOp::Add(a), &[x])?
            }
            BuiltinOperator::TRANSPOSE => {
                let x = self.input(ins[0])?;
                let perm = self
                    .constant(ins[1])?
                    .context("TRANSPOSE needs a constant permutation")?;
                let perm: Vec<usize> = perm
                    .cast_to::<i64>()?
                    .try_as_plain_ram()?
                    .as_slice::<i64>()?
                    .iter()
                    .map(|&p| p as usize)
                    .collect();
                let mut wire = x;
                for (i, axis_op) in perm_to_ops(&perm).into_iter().enumerate() {
                    wire = self.node(&format!("{name}.{i}"), axis_op, &[wire])?;
                }
                wire
            }
            BuiltinOperator::SOFTMAX => self.softmax(op, name, ins[0], out)?,
            BuiltinOperator::LOGISTIC => {
                self.unary(name, tract_core::ops::nn::sigmoid(), ins[0], out)?
            }
            BuiltinOperator::TANH => {
                self.unary(name, tract_core::ops::math::tanh(), ins[0], out)?
            }
            BuiltinOperator::HARD_SWISH => {
                self.unary(name, tract_core::ops::nn::hard_swish(), ins[0], out)?
            }
            BuiltinOperator::RELU | BuiltinOperator::RELU6 | BuiltinOperator::RELU_N1_TO_1 => {
                let (lo, hi) = match code {
                    BuiltinOperator::RELU => (0.0, f32::INFINITY),
                    BuiltinOperator::RELU6 => (0.0, 6.0),
                    _ => (-1.0, 1.0),
                };
                let x = self.input(ins[0])?;
                let q_in = if self.dt(ins[0])? == DatumType::F32 {
                    None
                } else {
                    self.q(ins[0])?
                };
                let q_out = if self.dt(out)? == DatumType::F32 {
                    None
                } else {
                    self.q(out)?
                };
                self.node(
                    name,
                    Rescale::new(q_in, q_out, self.dt(out)?).clamped(lo, hi),
                    &[x],
                )?
            }
            BuiltinOperator::PRELU => self.prelu(name, ins[0], ins[1], out)?,
            BuiltinOperator::PAD | BuiltinOperator::PADV2 => self.pad(name, &ins)?,
            BuiltinOperator::CONCATENATION => self.concat(op, name, &ins, out)?,
            BuiltinOperator::MEAN | BuiltinOperator::SUM | BuiltinOperator::REDUCE_MAX => {
                self.reduce(op, code, name, &ins, out)?
            }
            BuiltinOperator::RESIZE_BILINEAR | BuiltinOperator::RESIZE_NEAREST_NEIGHBOR => {
                self.resize(op, code, name, &ins, out)?
            }
            BuiltinOperator::SHAPE => {
                let x = self.input(ins[0])?;
                let shape: Vec<i64> = self
                    .target
                    .outlet_fact(x)?
                    .shape
                    .iter()
                    .map(|d| Ok(d.to_i64()?))
                    .collect::<TractResult<_>>()?;
                let t = tensor1(&shape).cast_to_dt(self.dt(out)?)?.into_owned();
                self.add_const(name, t)?
            }
            BuiltinOperator::STRIDED_SLICE => self.strided_slice(op, name, &ins)?,
            BuiltinOperator::PACK => self.pack(op, name, &ins)?,
            BuiltinOperator::CAST => {
                let x = self.input(ins[0])?;
                self.node(name, cast(self.dt(out)?), &[x])?
            }
            other => bail!(
                "operator {} is not supported by Cascade's TFLite frontend",
                other.variant_name().unwrap_or("(custom or unknown)")
            ),
        };
        self.wires.insert(out, wire);
        Ok(())
    }

    /// SOFTMAX over the last axis as one [`QSoftmax`] op (float16 input cast to `f32` first).
    fn softmax(
        &mut self,
        op: &fb::Operator,
        name: &str,
        input: i32,
        out: i32,
    ) -> TractResult<OutletId> {
        let beta = op
            .builtin_options_as_softmax_options()
            .map(|o| o.beta())
            .unwrap_or(1.0);
        let mut x = self.input(input)?;
        let mut q = self
            .q(input)?
            .filter(|_| self.dt(input).ok() != Some(DatumType::F32));
        if self.target.outlet_fact(x)?.datum_type == DatumType::F16 {
            x = self.decode(name, x, None)?;
            q = None;
        }
        let out_dt = self.dt(out)?;
        let encodings = [DatumType::F32, DatumType::I8, DatumType::U8, DatumType::I16];
        ensure!(
            encodings.contains(&out_dt),
            "SOFTMAX output of type {out_dt:?} is not supported (f32, int8, uint8, int16 are)"
        );
        let to = if out_dt == DatumType::F32 {
            None
        } else {
            self.q(out)?
        };
        let op = QSoftmax {
            decode: Rescale::new(q, None, DatumType::F32),
            beta,
            encode: Rescale::new(None, to, out_dt),
        };
        self.node(name, op, &[x])
    }

    fn dequantize(&mut self, name: &str, ix: i32) -> TractResult<OutletId> {
        let q = self.q(ix)?;
        // Float16 or int8 weights: expand once, here, rather than on every run.
        if let Some(k) = self.konst(ix)? {
            let values = if k.datum_type() == DatumType::F16 {
                k.cast_to::<f32>()?.into_owned()
            } else {
                let per_channel = self.q_channels(ix)?;
                let real = k.cast_to::<f32>()?.into_owned();
                dequantize_const(real, per_channel)?
            };
            return self.add_const(name, values);
        }
        let x = self.input(ix)?;
        let dt = self.dt(ix)?;
        if dt == DatumType::F16 {
            return self.node(name, cast(DatumType::F32), &[x]);
        }
        self.node(name, Rescale::new(q, None, DatumType::F32), &[x])
    }

    fn unary(
        &mut self,
        name: &str,
        op: tract_core::ops::element_wise::ElementWiseOp,
        x: i32,
        out: i32,
    ) -> TractResult<OutletId> {
        let wire = self.input(x)?;
        let q = if self.dt(x)? == DatumType::F32 {
            None
        } else {
            self.q(x)?
        };
        let real = self.decode(name, wire, q)?;
        let y = self.node(&format!("{name}.f32"), op, &[real])?;
        self.encode(name, y, out, f32::NEG_INFINITY, f32::INFINITY)
    }

    fn binary(
        &mut self,
        name: &str,
        mini: tract_core::ops::binary::TypedBinOp,
        a: i32,
        b: i32,
        out: i32,
        act: ActivationFunctionType,
    ) -> TractResult<OutletId> {
        let (wa, wb) = (self.input(a)?, self.input(b)?);
        let out_dt = self.dt(out)?;
        let quantized =
            !matches!(out_dt, DatumType::F32 | DatumType::F16) && self.q(out)?.is_some();
        if !quantized {
            let y = wire_with_rank_broadcast(name, &mut self.target, mini, &[wa, wb])?[0];
            return self.activation(name, y, out, act);
        }
        let (qa, qb) = (self.q(a)?, self.q(b)?);
        let int_inputs = [a, b].iter().all(|&t| {
            matches!(
                self.dt(t),
                Ok(DatumType::I8 | DatumType::U8 | DatumType::I16)
            )
        });
        let (dt_a, dt_b) = (self.dt(a)?, self.dt(b)?);
        // The int8 ADD kernel takes both inputs of one 8-bit type.
        let same_8bit = dt_a == dt_b && matches!(dt_a, DatumType::I8 | DatumType::U8);
        if let (true, Some(qa), Some(qb), Some(qy)) = (int_inputs, qa, qb, self.q(out)?) {
            let operand = |q: Affine| Operand {
                zero_point: q.zero_point,
                scale: q.scale,
            };
            let output = self.int_output(out, act)?;
            let kind = mini.0.name();
            let y = match kind {
                "Add" | "Sub" if same_8bit => {
                    let subtract = kind == "Sub";
                    self.node(
                        name,
                        QAdd::new(operand(qa), operand(qb), qy.scale, subtract, output),
                        &[wa, wb],
                    )?
                }
                "Mul" => self.node(
                    name,
                    QMul::new(operand(qa), operand(qb), qy.scale, output),
                    &[wa, wb],
                )?,
                _ => self.float_binary(name, mini, wa, wb, Some(qa), Some(qb), out, act)?,
            };
            return Ok(y);
        }
        self.float_binary(name, mini, wa, wb, qa, qb, out, act)
    }

    /// A quantized binary operator computed on decoded values and re-encoded.
    #[allow(clippy::too_many_arguments)]
    fn float_binary(
        &mut self,
        name: &str,
        mini: tract_core::ops::binary::TypedBinOp,
        wa: OutletId,
        wb: OutletId,
        qa: Option<Affine>,
        qb: Option<Affine>,
        out: i32,
        act: ActivationFunctionType,
    ) -> TractResult<OutletId> {
        let ra = self.decode(&format!("{name}.a"), wa, qa)?;
        let rb = self.decode(&format!("{name}.b"), wb, qb)?;
        let y =
            wire_with_rank_broadcast(format!("{name}.f32"), &mut self.target, mini, &[ra, rb])?[0];
        let (lo, hi) = activation_bounds(act)?;
        self.encode(name, y, out, lo, hi)
    }

    fn conv(
        &mut self,
        op: &fb::Operator,
        name: &str,
        ins: &[i32],
        out: i32,
        depthwise: bool,
    ) -> TractResult<OutletId> {
        let x = self.input(ins[0])?;
        let x_fact = self.target.outlet_fact(x)?.clone();
        ensure!(
            x_fact.rank() == 4,
            "convolution input must be NHWC (rank 4), got rank {}",
            x_fact.rank()
        );
        let in_channels = x_fact.shape[3].to_usize()?;
        let kernel = self
            .constant(ins[1])?
            .context("convolution weights must be constant")?;
        let (padding, strides, dilations, act) = if depthwise {
            let o = op
                .builtin_options_as_depthwise_conv_2_doptions()
                .context("missing depthwise options")?;
            (
                o.padding(),
                [o.stride_h(), o.stride_w()],
                [o.dilation_h_factor(), o.dilation_w_factor()],
                o.fused_activation_function(),
            )
        } else {
            let o = op
                .builtin_options_as_conv_2_doptions()
                .context("missing conv options")?;
            (
                o.padding(),
                [o.stride_h(), o.stride_w()],
                [o.dilation_h_factor(), o.dilation_w_factor()],
                o.fused_activation_function(),
            )
        };
        let strides = [strides[0].max(1) as usize, strides[1].max(1) as usize];
        let dilations = [dilations[0].max(1) as usize, dilations[1].max(1) as usize];
        // Kernels as [outputs, kh, kw, inputs per group]. TFLite depthwise kernels are
        // [1, kh, kw, C*m] with output channel c*m + j reading input channel c: that is groups of
        // one input channel and m outputs, [C*m, kh, kw, 1].
        let (kernel, groups) = if depthwise {
            let s = kernel.shape().to_vec();
            ensure!(
                s.len() == 4 && s[0] == 1,
                "depthwise kernel must be [1, H, W, C*m], got {s:?}"
            );
            ensure!(
                in_channels > 0 && s[3] % in_channels == 0,
                "depthwise kernel has {} channels for {in_channels} inputs",
                s[3]
            );
            (kernel.permute_axes(&[3, 1, 2, 0])?, in_channels)
        } else {
            (kernel, 1)
        };
        let quantized = self.dt(ins[1])? != DatumType::F32 && self.dt(ins[0])? != DatumType::F32;
        if quantized {
            let geometry = ConvGeometry {
                same: padding == Padding::SAME,
                strides,
                dilations,
            };
            let y = self.qconv(name, ins, out, &kernel, groups, geometry, act)?;
            return Ok(y);
        }
        // Float: tract's convolution. Its grouped OHWI kernels are [outputs / groups, kh, kw,
        // inputs], so the depthwise [C*m, kh, kw, 1] becomes [m, kh, kw, C].
        let out_channels = kernel.shape()[0];
        let (kh, kw) = (kernel.shape()[1], kernel.shape()[2]);
        let kernel = if depthwise {
            let multiplier = out_channels / in_channels;
            kernel
                .into_shape(&[in_channels, multiplier, kh, kw])?
                .permute_axes(&[1, 2, 3, 0])?
                .cast_to::<f32>()?
                .into_owned()
        } else {
            kernel.cast_to::<f32>()?.into_owned()
        };
        let pool_spec = PoolSpec {
            data_format: DataFormat::NHWC,
            kernel_shape: tvec!(kh, kw),
            padding: padding_spec(padding)?,
            strides: Some(tvec!(strides[0], strides[1])),
            dilations: Some(tvec!(dilations[0], dilations[1])),
            input_channels: in_channels,
            output_channels: out_channels,
        };
        let bias = match ins.get(2).copied().filter(|&b| b >= 0) {
            Some(b) => self
                .constant(b)?
                .context("convolution bias must be constant")?
                .cast_to::<f32>()?
                .into_owned(),
            None => Tensor::zero::<f32>(&[out_channels])?,
        };
        let wk = self.add_const(&format!("{name}.kernel"), kernel)?;
        let wb = self.add_const(&format!("{name}.bias"), bias)?;
        let conv = Conv {
            pool_spec,
            kernel_fmt: KernelFormat::OHWI,
            group: groups,
            q_params: None,
        };
        let y = self.node(name, conv, &[x, wk, wb])?;
        self.activation(name, y, out, act)
    }

    /// The integer output of tensor `out`: zero point, storage type, and the clamp of its type
    /// range and of the fused activation (TFLite's `CalculateActivationRangeQuantized`).
    fn int_output(&self, out: i32, act: ActivationFunctionType) -> TractResult<IntOutput> {
        let dt = self.dt(out)?;
        let q = self
            .q(out)?
            .context("quantized output has no quantization parameters")?;
        let (type_min, type_max) = match dt {
            DatumType::I8 => (-128, 127),
            DatumType::U8 => (0, 255),
            DatumType::I16 => (-32768, 32767),
            other => bail!("unsupported quantized output type {other:?}"),
        };
        let (lo, hi) = activation_bounds(act)?;
        let encode = |v: f32| q.zero_point + (v / q.scale).round() as i32;
        let min = if lo.is_finite() {
            type_min.max(encode(lo))
        } else {
            type_min
        };
        let max = if hi.is_finite() {
            type_max.min(encode(hi))
        } else {
            type_max
        };
        Ok(IntOutput {
            zero_point: q.zero_point,
            min,
            max,
            dt,
        })
    }

    /// Per-output-channel constants of an int8 convolution or fully-connected layer.
    fn channels(
        &self,
        weights_ix: i32,
        weights: &Tensor,
        bias_ix: Option<i32>,
        x: i32,
        out: i32,
    ) -> TractResult<Channels> {
        let xq = self
            .q(x)?
            .context("quantized input has no quantization parameters")?;
        let yq = self
            .q(out)?
            .context("quantized output has no quantization parameters")?;
        let (scales, zero_points, _) = self
            .q_channels(weights_ix)?
            .context("quantized weights have no quantization parameters")?;
        let bias = match bias_ix {
            Some(b) => Some(self.constant(b)?.context("bias must be constant")?),
            None => None,
        };
        Channels::new(
            weights,
            bias.as_ref(),
            xq.zero_point,
            xq.scale,
            &scales,
            &zero_points,
            yq.scale,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn qconv(
        &mut self,
        name: &str,
        ins: &[i32],
        out: i32,
        kernel: &Tensor,
        groups: usize,
        geometry: ConvGeometry,
        act: ActivationFunctionType,
    ) -> TractResult<OutletId> {
        let x = self.input(ins[0])?;
        let shape: Vec<usize> = self
            .target
            .outlet_fact(x)?
            .shape
            .iter()
            .map(|d| Ok(d.to_usize()?))
            .collect::<TractResult<_>>()?;
        let (h, w, in_channels) = (shape[1], shape[2], shape[3]);
        let (kh, kw) = (kernel.shape()[1], kernel.shape()[2]);
        let rows = kernel.shape()[0];
        let depth: usize = kernel.shape()[1..].iter().product();
        let flat = kernel.clone().into_shape(&[rows, depth])?;
        let channels = self.channels(
            ins[1],
            &flat,
            ins.get(2).copied().filter(|&b| b >= 0),
            ins[0],
            out,
        )?;
        let ConvGeometry {
            same,
            strides,
            dilations,
        } = geometry;
        let (oh, pad_h) = QConv::geometry(h, kh, strides[0], dilations[0], same);
        let (ow, pad_w) = QConv::geometry(w, kw, strides[1], dilations[1], same);
        let declared = self.shape(out)?;
        ensure!(
            declared.len() == 4 && declared[1] == oh && declared[2] == ow,
            "computed output {oh}x{ow} does not match the declared {declared:?}"
        );
        let op = QConv {
            channels,
            output: self.int_output(out, act)?,
            kernel: [kh, kw],
            strides,
            dilations,
            pad_before: [pad_h, pad_w],
            out_hw: [oh, ow],
            groups,
            in_channels,
        };
        self.node(name, op, &[x])
    }

    fn fully_connected(
        &mut self,
        op: &fb::Operator,
        name: &str,
        ins: &[i32],
        out: i32,
    ) -> TractResult<OutletId> {
        let options = op.builtin_options_as_fully_connected_options();
        let act = options
            .map(|o| o.fused_activation_function())
            .unwrap_or(ActivationFunctionType::NONE);
        let keep_dims = options.map(|o| o.keep_num_dims()).unwrap_or(false);
        let x = self.input(ins[0])?;
        let weights = self
            .constant(ins[1])?
            .context("FULLY_CONNECTED weights must be constant")?;
        ensure!(
            weights.rank() == 2,
            "FULLY_CONNECTED weights must be [outputs, inputs]"
        );
        let (m, k) = (weights.shape()[0], weights.shape()[1]);
        let x_shape = self.target.outlet_fact(x)?.shape.to_tvec();
        let total: TDim = x_shape.iter().product();
        let n = total.clone() / k;
        let flat = self.node(
            &format!("{name}.flatten"),
            AxisOp::Reshape(0, x_shape.clone(), tvec!(n.clone(), k.to_dim())),
            &[x],
        )?;
        let quantized = self.dt(ins[1])? != DatumType::F32 && self.dt(ins[0])? != DatumType::F32;
        let bias_ix = ins.get(2).copied().filter(|&b| b >= 0);
        let y = if quantized {
            let channels = self.channels(ins[1], &weights, bias_ix, ins[0], out)?;
            let op = QFullyConnected {
                channels,
                output: self.int_output(out, act)?,
            };
            self.node(name, op, &[flat])?
        } else {
            let flat = self.decode(&format!("{name}.in"), flat, None)?;
            let wk = self.add_const(
                &format!("{name}.weights"),
                weights.cast_to::<f32>()?.into_owned(),
            )?;
            let axes = "BI,OI->BO".parse()?;
            let mut y = self.node(
                name,
                EinSum {
                    axes,
                    operating_dt: DatumType::F32,
                    q_params: None,
                },
                &[flat, wk],
            )?;
            if let Some(b) = bias_ix {
                let bias = self
                    .constant(b)?
                    .context("FULLY_CONNECTED bias must be constant")?
                    .cast_to::<f32>()?
                    .into_owned();
                let bias = bias.into_shape(&[1, m])?;
                let wb = self.add_const(&format!("{name}.bias"), bias)?;
                y = self.node(
                    &format!("{name}.add_bias"),
                    tract_core::ops::math::add(),
                    &[y, wb],
                )?;
            }
            self.activation(name, y, out, act)?
        };
        if keep_dims && x_shape.len() > 2 {
            let mut to = x_shape.clone();
            *to.last_mut().context("empty shape")? = m.to_dim();
            self.node(
                &format!("{name}.unflatten"),
                AxisOp::Reshape(0, tvec!(n, m.to_dim()), to),
                &[y],
            )
        } else {
            Ok(y)
        }
    }

    fn pool(
        &mut self,
        op: &fb::Operator,
        name: &str,
        x: i32,
        out: i32,
        max: bool,
    ) -> TractResult<OutletId> {
        let o = op
            .builtin_options_as_pool_2_doptions()
            .context("missing pool options")?;
        let wire = self.input(x)?;
        let channels = self.target.outlet_fact(wire)?.shape[3].to_usize()?;
        let pool_spec = PoolSpec {
            data_format: DataFormat::NHWC,
            kernel_shape: tvec!(o.filter_height() as usize, o.filter_width() as usize),
            padding: padding_spec(o.padding())?,
            strides: Some(tvec!(o.stride_h() as usize, o.stride_w() as usize)),
            dilations: None,
            input_channels: channels,
            output_channels: channels,
        };
        let dt = self.dt(x)?;
        // TFLite's integer kernel averages the stored values, so it needs the output encoded as
        // the input is (its `Prepare` checks equal zero points and scales within 1e-6).
        let (q_in, q_out) = (self.q(x)?, self.q(out)?);
        let alike = matches!((q_in, q_out), (Some(a), Some(b))
            if a.zero_point == b.zero_point && (a.scale - b.scale).abs() <= 1e-6);
        if !max && matches!(dt, DatumType::I8 | DatumType::U8) && self.dt(out)? == dt && alike {
            let fact = self.target.outlet_fact(wire)?;
            let size = |axis: usize| fact.shape[axis].to_usize().ok();
            if let (Some(h), Some(w)) = (size(1), size(2)) {
                let same = o.padding() == Padding::SAME;
                let kernel = [o.filter_height() as usize, o.filter_width() as usize];
                let strides = [o.stride_h() as usize, o.stride_w() as usize];
                ensure!(
                    kernel.iter().chain(&strides).all(|&v| v > 0),
                    "AVERAGE_POOL_2D {name}: kernel {kernel:?} and strides {strides:?} must be \
                     positive"
                );
                let output = self.int_output(out, o.fused_activation_function())?;
                let op = QAvgPool::new([h, w], kernel, strides, same, output);
                let [oh, ow] = op.out_hw;
                let declared = self.shape(out)?;
                ensure!(
                    declared.len() == 4 && declared[1] == oh && declared[2] == ow,
                    "AVERAGE_POOL_2D {name}: computed output {oh}x{ow} does not match the \
                     declared {declared:?}"
                );
                return self.node(name, op, &[wire]);
            }
        }
        // Pool raw integer values in f32 (exact below 2^24) and round back, as TFLite does.
        let values = if dt == DatumType::F32 {
            wire
        } else {
            self.node(&format!("{name}.as_f32"), cast(DatumType::F32), &[wire])?
        };
        let pooled = if max {
            self.node(
                name,
                MaxPool {
                    pool_spec,
                    with_index_outputs: None,
                },
                &[values],
            )?
        } else {
            self.node(
                name,
                SumPool {
                    pool_spec,
                    count_include_pad: false,
                    normalize: true,
                },
                &[values],
            )?
        };
        let pooled = if dt == DatumType::F32 {
            pooled
        } else {
            let raw = Affine {
                scale: 1.0,
                zero_point: 0,
            };
            self.node(
                &format!("{name}.round"),
                Rescale::new(None, Some(raw), self.dt(out)?),
                &[pooled],
            )?
        };
        self.activation(name, pooled, out, o.fused_activation_function())
    }

    fn reshape(
        &mut self,
        op: &fb::Operator,
        name: &str,
        ins: &[i32],
        out: i32,
    ) -> TractResult<OutletId> {
        let x = self.input(ins[0])?;
        let from = self.target.outlet_fact(x)?.shape.to_tvec();
        // The output tensor's declared shape is authoritative; the shape input or option agrees.
        let mut to: Vec<i64> = self.shape(out)?.iter().map(|&d| d as i64).collect();
        if to.is_empty() && from.iter().product::<TDim>() != 1.to_dim() {
            if let Some(shape_ix) = ins.get(1).copied().filter(|&i| i >= 0) {
                if let Some(s) = self.constant(shape_ix)? {
                    to = s
                        .cast_to::<i64>()?
                        .try_as_plain_ram()?
                        .as_slice::<i64>()?
                        .to_vec();
                }
            } else if let Some(o) = op
                .builtin_options_as_reshape_options()
                .and_then(|o| o.new_shape())
            {
                to = o.iter().map(i64::from).collect();
            }
        }
        let total: TDim = from.iter().product();
        let known: i64 = to.iter().filter(|&&d| d >= 0).product();
        let to: TVec<TDim> = to
            .iter()
            .map(|&d| {
                if d < 0 {
                    total.clone() / known.max(1) as usize
                } else {
                    (d as usize).to_dim()
                }
            })
            .collect();
        if from == to {
            return Ok(x);
        }
        self.node(name, AxisOp::Reshape(0, from, to), &[x])
    }

    fn squeeze(&mut self, op: &fb::Operator, name: &str, x: i32) -> TractResult<OutletId> {
        let wire = self.input(x)?;
        let shape = self.target.outlet_fact(wire)?.shape.to_tvec();
        let dims: Vec<i32> = op
            .builtin_options_as_squeeze_options()
            .and_then(|o| o.squeeze_dims())
            .map(|d| d.iter().collect())
            .unwrap_or_default();
        let mut axes: Vec<usize> = if dims.is_empty() {
            shape
                .iter()
                .enumerate()
                .filter(|(_, d)| d.is_one())
                .map(|(i, _)| i)
                .collect()
        } else {
            dims.iter()
                .map(|&d| axis(d.into(), shape.len()))
                .collect::<TractResult<_>>()?
        };
        axes.sort_unstable();
        let mut wire = wire;
        for a in axes.into_iter().rev() {
            wire = self.node(&format!("{name}.rm{a}"), AxisOp::Rm(a), &[wire])?;
        }
        Ok(wire)
    }

    fn prelu(&mut self, name: &str, x: i32, alpha: i32, out: i32) -> TractResult<OutletId> {
        let wx = self.input(x)?;
        let qx = if self.dt(x)? == DatumType::F32 {
            None
        } else {
            self.q(x)?
        };
        let real = self.decode(&format!("{name}.x"), wx, qx)?;
        let alpha_value = self
            .constant(alpha)?
            .context("PRELU alpha must be constant")?;
        let alpha_real = match self.dt(alpha)? {
            DatumType::F32 => alpha_value,
            DatumType::F16 => alpha_value.cast_to::<f32>()?.into_owned(),
            _ => dequantize_const(
                alpha_value.cast_to::<f32>()?.into_owned(),
                self.q_channels(alpha)?,
            )?,
        };
        let zero = self.add_const(&format!("{name}.zero"), tensor0(0f32))?;
        let wa = self.add_const(&format!("{name}.alpha"), alpha_real)?;
        let pos = wire_with_rank_broadcast(
            format!("{name}.pos"),
            &mut self.target,
            tract_core::ops::math::max(),
            &[real, zero],
        )?[0];
        let neg = wire_with_rank_broadcast(
            format!("{name}.neg"),
            &mut self.target,
            tract_core::ops::math::min(),
            &[real, zero],
        )?[0];
        let scaled = wire_with_rank_broadcast(
            format!("{name}.scaled"),
            &mut self.target,
            tract_core::ops::math::mul(),
            &[neg, wa],
        )?[0];
        let y = self.node(
            &format!("{name}.sum"),
            tract_core::ops::math::add(),
            &[pos, scaled],
        )?;
        self.encode(name, y, out, f32::NEG_INFINITY, f32::INFINITY)
    }

    fn pad(&mut self, name: &str, ins: &[i32]) -> TractResult<OutletId> {
        let x = self.input(ins[0])?;
        let dt = self.target.outlet_fact(x)?.datum_type;
        let paddings = self
            .constant(ins[1])?
            .context("PAD needs constant paddings")?;
        let paddings = paddings.cast_to::<i64>()?;
        let p = paddings.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
        let pads: Vec<(usize, usize)> = p
            .chunks(2)
            .map(|c| (c[0].max(0) as usize, c[1].max(0) as usize))
            .collect();
        // Zero, in the input's own encoding: the zero point for quantized tensors.
        let value = match ins.get(2).copied().filter(|&v| v >= 0) {
            Some(v) => self
                .constant(v)?
                .context("PADV2 needs a constant pad value")?,
            None => {
                let zp = self.q(ins[0])?.map_or(0, |q| q.zero_point);
                tensor0(zp).cast_to_dt(dt)?.into_owned()
            }
        };
        let value = value.cast_to_dt(dt)?.into_owned().into_shape(&[])?;
        self.node(
            name,
            Pad {
                pads,
                mode: PadMode::Constant(value.into_arc_tensor()),
            },
            &[x],
        )
    }

    fn concat(
        &mut self,
        op: &fb::Operator,
        name: &str,
        ins: &[i32],
        out: i32,
    ) -> TractResult<OutletId> {
        let options = op
            .builtin_options_as_concatenation_options()
            .context("missing concatenation options")?;
        let out_dt = self.dt(out)?;
        let out_q = if out_dt == DatumType::F32 {
            None
        } else {
            self.q(out)?
        };
        let mut wires = Vec::new();
        for (i, &ix) in ins.iter().enumerate() {
            let w = self.input(ix)?;
            let q = if self.dt(ix)? == DatumType::F32 {
                None
            } else {
                self.q(ix)?
            };
            // Inputs quantized differently from the output are re-encoded first.
            let w = if q != out_q || self.dt(ix)? != out_dt {
                self.node(
                    &format!("{name}.requant{i}"),
                    Rescale::new(q, out_q, out_dt),
                    &[w],
                )?
            } else {
                w
            };
            wires.push(w);
        }
        let rank = self.target.outlet_fact(wires[0])?.rank();
        let a = axis(options.axis().into(), rank)?;
        let y = self.node(name, TypedConcat::new(a), &wires)?;
        self.activation(name, y, out, options.fused_activation_function())
    }

    fn reduce(
        &mut self,
        op: &fb::Operator,
        code: BuiltinOperator,
        name: &str,
        ins: &[i32],
        out: i32,
    ) -> TractResult<OutletId> {
        let keep_dims = op
            .builtin_options_as_reducer_options()
            .map(|o| o.keep_dims())
            .unwrap_or(false);
        let x = self.input(ins[0])?;
        let q = if self.dt(ins[0])? == DatumType::F32 {
            None
        } else {
            self.q(ins[0])?
        };
        let real = self.decode(name, x, q)?;
        let shape = self.target.outlet_fact(real)?.shape.to_tvec();
        let axes_t = self
            .constant(ins[1])?
            .context("reduction needs constant axes")?;
        let mut axes: Vec<usize> = axes_t
            .cast_to::<i64>()?
            .try_as_plain_ram()?
            .as_slice::<i64>()?
            .iter()
            .map(|&a| axis(a, shape.len()))
            .collect::<TractResult<_>>()?;
        axes.sort_unstable();
        axes.dedup();
        let reducer = if code == BuiltinOperator::REDUCE_MAX {
            Reducer::Max
        } else {
            Reducer::Sum
        };
        let mut y = self.node(
            &format!("{name}.reduce"),
            Reduce {
                axes: axes.clone().into(),
                reducer,
            },
            &[real],
        )?;
        if code == BuiltinOperator::MEAN {
            let count: usize = axes
                .iter()
                .map(|&a| Ok(shape[a].to_usize()?))
                .product::<TractResult<usize>>()?;
            let inv =
                self.add_const(&format!("{name}.inv_count"), tensor0(1.0f32 / count as f32))?;
            y = wire_with_rank_broadcast(
                format!("{name}.mean"),
                &mut self.target,
                tract_core::ops::math::mul(),
                &[y, inv],
            )?[0];
        }
        if !keep_dims {
            for &a in axes.iter().rev() {
                y = self.node(&format!("{name}.rm{a}"), AxisOp::Rm(a), &[y])?;
            }
        }
        self.encode(name, y, out, f32::NEG_INFINITY, f32::INFINITY)
    }

    fn resize(
        &mut self,
        op: &fb::Operator,
        code: BuiltinOperator,
        name: &str,
        ins: &[i32],
        out: i32,
    ) -> TractResult<OutletId> {
        use tract_core::ops::nn::{CoordTransformer, Interpolator, Nearest, Resize};
        let x = self.input(ins[0])?;
        let q = if self.dt(ins[0])? == DatumType::F32 {
            None
        } else {
            self.q(ins[0])?
        };
        let real = self.decode(name, x, q)?;
        let shape = self.target.outlet_fact(real)?.shape.to_tvec();
        ensure!(shape.len() == 4, "resize expects NHWC");
        let size = self
            .constant(ins[1])?
            .context("resize needs a constant size")?;
        let size = size.cast_to::<i64>()?;
        let size = size.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
        ensure!(size.len() == 2, "resize size must name height and width");
        let (align, half) = if code == BuiltinOperator::RESIZE_BILINEAR {
            let o = op
                .builtin_options_as_resize_bilinear_options()
                .context("missing resize options")?;
            (o.align_corners(), o.half_pixel_centers())
        } else {
            let o = op
                .builtin_options_as_resize_nearest_neighbor_options()
                .context("missing resize options")?;
            (o.align_corners(), o.half_pixel_centers())
        };
        let (coord, interp, nearest) = match (code == BuiltinOperator::RESIZE_BILINEAR, align, half)
        {
            (true, true, _) => (
                CoordTransformer::AlignCorners,
                Interpolator::Linear,
                Nearest::Floor,
            ),
            (true, false, true) => (
                CoordTransformer::HalfPixel,
                Interpolator::Linear,
                Nearest::Floor,
            ),
            (true, false, false) => (
                CoordTransformer::Asymmetric,
                Interpolator::Linear,
                Nearest::Floor,
            ),
            (false, true, _) => (
                CoordTransformer::AlignCorners,
                Interpolator::Nearest,
                Nearest::RoundPreferCeil,
            ),
            (false, false, true) => (
                CoordTransformer::TfHalfPixelForNn,
                Interpolator::Nearest,
                Nearest::Floor,
            ),
            (false, false, false) => (
                CoordTransformer::Asymmetric,
                Interpolator::Nearest,
                Nearest::Floor,
            ),
        };
        let sizes = tensor1(&[
            shape[0].clone(),
            size[0].to_dim(),
            size[1].to_dim(),
            shape[3].clone(),
        ]);
        let sizes = self.add_const(&format!("{name}.sizes"), sizes)?;
        let resize = Resize {
            coord_transformer: coord,
            interpolator: interp,
            nearest,
            optional_scales_input: None,
            optional_sizes_input: Some(1),
        };
        let y = self.node(&format!("{name}.resize"), resize, &[real, sizes])?;
        self.encode(name, y, out, f32::NEG_INFINITY, f32::INFINITY)
    }

    fn strided_slice(
        &mut self,
        op: &fb::Operator,
        name: &str,
        ins: &[i32],
    ) -> TractResult<OutletId> {
        let o = op
            .builtin_options_as_strided_slice_options()
            .context("missing strided slice options")?;
        ensure!(
            o.ellipsis_mask() == 0 && o.new_axis_mask() == 0,
            "STRIDED_SLICE with ellipsis or new-axis masks is not supported"
        );
        let x = self.input(ins[0])?;
        let shape: Vec<usize> = self
            .target
            .outlet_fact(x)?
            .shape
            .iter()
            .map(|d| Ok(d.to_usize()?))
            .collect::<TractResult<_>>()?;
        let param = |t: Option<Tensor>, what: &str| -> TractResult<Vec<i64>> {
            let t = t.with_context(|| format!("STRIDED_SLICE needs constant {what}"))?;
            Ok(t.cast_to::<i64>()?
                .try_as_plain_ram()?
                .as_slice::<i64>()?
                .to_vec())
        };
        let begin = param(self.constant(ins[1])?, "begin")?;
        let end = param(self.constant(ins[2])?, "end")?;
        let strides = param(self.constant(ins[3])?, "strides")?;
        let mut wire = x;
        let mut removed = Vec::new();
        for (a, &dim) in shape.iter().enumerate().take(begin.len()) {
            let d = dim as i64;
            let stride = strides[a];
            ensure!(
                stride == 1,
                "STRIDED_SLICE with stride {stride} is not supported"
            );
            let clamp = |v: i64| {
                if v < 0 {
                    (v + d).clamp(0, d)
                } else {
                    v.clamp(0, d)
                }
            };
            let shrink = o.shrink_axis_mask() & (1 << a) != 0;
            let start = if o.begin_mask() & (1 << a) != 0 {
                0
            } else {
                clamp(begin[a])
            };
            let stop = if shrink {
                start + 1
            } else if o.end_mask() & (1 << a) != 0 {
                d
            } else {
                clamp(end[a])
            };
            if start != 0 || stop != d {
                let slice = Slice {
                    axis: a,
                    start: (start as usize).to_dim(),
                    end: (stop.max(start) as usize).to_dim(),
                };
                wire = self.node(&format!("{name}.slice{a}"), slice, &[wire])?;
            }
            if shrink {
                removed.push(a);
            }
        }
        for a in removed.into_iter().rev() {
            wire = self.node(&format!("{name}.rm{a}"), AxisOp::Rm(a), &[wire])?;
        }
        Ok(wire)
    }

    fn pack(&mut self, op: &fb::Operator, name: &str, ins: &[i32]) -> TractResult<OutletId> {
        let a = op
            .builtin_options_as_pack_options()
            .map(|o| o.axis())
            .unwrap_or(0);
        let mut wires = Vec::new();
        for (i, &ix) in ins.iter().enumerate() {
            let w = self.input(ix)?;
            let rank = self.target.outlet_fact(w)?.rank();
            let ax = axis(a.into(), rank + 1)?;
            wires.push(self.node(&format!("{name}.expand{i}"), AxisOp::Add(ax), &[w])?);
        }
        let rank = self.target.outlet_fact(wires[0])?.rank();
        let ax = axis(a.into(), rank)?;
        self.node(name, TypedConcat::new(ax), &wires)
    }
}

/// Applies per-tensor or per-channel dequantization to a constant already cast to `f32`.
fn dequantize_const(real: Tensor, q: Option<ChannelQuant>) -> TractResult<Tensor> {
    let Some((scales, zps, axis)) = q else {
        return Ok(real);
    };
    let mut a = real.into_plain_array::<f32>()?;
    if scales.len() == 1 {
        a.mapv_inplace(|v| (v - zps[0] as f32) * scales[0]);
    } else {
        ensure!(
            axis < a.ndim() && a.shape()[axis] == scales.len(),
            "per-channel scales do not match axis {axis}"
        );
        for (c, mut lane) in a.axis_iter_mut(tract_ndarray::Axis(axis)).enumerate() {
            let zp = zps.get(c).copied().unwrap_or(0) as f32;
            lane.mapv_inplace(|v| (v - zp) * scales[c]);
        }
    }
    Ok(a.into_tensor())
}
