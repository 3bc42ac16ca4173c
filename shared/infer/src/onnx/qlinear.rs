//! ONNX `QLinearMatMul` with constant weights on Cascade's integer fully-connected kernel.
//!
//! tract-onnx lowers `QLinearMatMul` to a quantized `EinSum`, whose int8 matrix product is slow on
//! the small shapes edge models are made of: the bundled int8 edge MLP took 35 µs against 4 µs for
//! the same layers in TFLite form, which run on [`QFullyConnected`]. When the weights, scales and
//! zero points are initializers, the node becomes a [`QFullyConnected`] that requantizes as ONNX
//! Runtime does (an `f32` scale `a_scale * b_scale / y_scale`, rounded half to even), so outputs
//! stay bit-exact with onnxruntime. Anything else (weights computed at run time, a node inside a
//! subgraph whose weights live outside
//! it) keeps tract's own translation.

use tract_hir::internal::*;
use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::NodeProto;

use crate::qkernels::{Channels, IntOutput, QFullyConnected};

/// Makes `onnx` translate `QLinearMatMul` nodes with constant weights to [`QFullyConnected`].
pub(crate) fn register(onnx: &mut Onnx) {
    onnx.op_register.insert("QLinearMatMul", build);
}

fn build(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // The graph the node is in (tract pushes each graph it parses); a subgraph's initializers are
    // its own, which keeps this conservative for nodes inside `If` or `Loop` bodies.
    let initializers = ctx
        .parent_graphs
        .last()
        .copied()
        .or(ctx.model.graph.as_ref())
        .map(|g| &g.initializer[..])
        .unwrap_or_default();
    // Everything but the activation (input 0): scales, zero points and the weights.
    let constant = node.input.len() == 8
        && node.input[1..]
            .iter()
            .all(|name| initializers.iter().any(|t| &t.name == name));
    if constant {
        return Ok((expand(ConstQLinearMatMul), vec![]));
    }
    let stock = tract_onnx::onnx()
        .op_register
        .0
        .get("QLinearMatMul")
        .copied()
        .context("tract-onnx has no QLinearMatMul")?;
    stock(ctx, node)
}

/// `QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp)` with inputs 1 to 7 constant.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ConstQLinearMatMul;

impl Expansion for ConstQLinearMatMul {
    fn name(&self) -> StaticName {
        "QLinearMatMul (Cascade int8 kernel)".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 8)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &inputs[2].datum_type)?;
        s.equals(&inputs[3].datum_type, &inputs[5].datum_type)?;
        s.equals(&outputs[0].datum_type, &inputs[7].datum_type)?;
        s.given_2(&inputs[0].shape, &inputs[3].shape, move |s, a, b| {
            if b.len() != 2 {
                bail!("QLinearMatMul weights of rank {} (expected 2)", b.len());
            }
            let mut y: TVec<TDim> = a.iter().cloned().collect();
            match y.last_mut() {
                Some(last) => *last = b[1].clone(),
                None => bail!("QLinearMatMul on a scalar"),
            }
            s.equals(&outputs[0].shape, y)
        })
    }

    fn wire(
        &self,
        prefix: &str,
        target: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |i: usize| -> TractResult<Arc<Tensor>> {
            target
                .outlet_fact(inputs[i])?
                .konst
                .clone()
                .with_context(|| format!("QLinearMatMul input {i} is not constant"))
        };
        let floats = |i: usize| values::<f32>(&*konst(i)?);
        let ints = |i: usize| values::<i32>(&*konst(i)?);
        let single = |v: Vec<f32>, what: &str| -> TractResult<f32> {
            ensure!(v.len() == 1, "QLinearMatMul {what} must be one value");
            Ok(v[0])
        };
        let (a_scale, y_scale) = (
            single(floats(1)?, "a_scale")?,
            single(floats(6)?, "y_scale")?,
        );
        let a_zero_point = ints(2)?;
        let y_zero_point = ints(7)?;
        ensure!(
            a_zero_point.len() == 1 && y_zero_point.len() == 1,
            "QLinearMatMul a_zero_point and y_zero_point must be one value"
        );
        let (b_scales, b_zero_points) = (floats(4)?, ints(5)?);
        let weights = konst(3)?;
        ensure!(weights.rank() == 2, "QLinearMatMul weights must be [K, N]");
        let (depth, outputs) = (weights.shape()[0], weights.shape()[1]);
        for (what, n) in [
            ("b_scale", b_scales.len()),
            ("b_zero_point", b_zero_points.len()),
        ] {
            ensure!(
                n == 1 || n == outputs,
                "QLinearMatMul {what} has {n} values for {outputs} columns"
            );
        }
        // The kernel takes [outputs, depth].
        let transposed = weights.clone().into_tensor().permute_axes(&[1, 0])?;
        let channels = Channels::new(
            &transposed,
            None,
            a_zero_point[0],
            a_scale,
            &b_scales,
            &b_zero_points,
            y_scale,
        )?
        .with_float_requantization(a_scale, &b_scales, y_scale);
        let dt = target.outlet_fact(inputs[7])?.datum_type;
        let (min, max) = match dt {
            DatumType::I8 => (i32::from(i8::MIN), i32::from(i8::MAX)),
            DatumType::U8 => (0, i32::from(u8::MAX)),
            other => bail!("QLinearMatMul output of type {other:?}"),
        };
        let op = QFullyConnected {
            channels,
            output: IntOutput {
                zero_point: y_zero_point[0],
                min,
                max,
                dt,
            },
        };
        // The kernel takes [rows, depth]: fold leading axes into rows, and unfold them after.
        let shape = target.outlet_fact(inputs[0])?.shape.to_tvec();
        ensure!(
            shape.last() == Some(&depth.to_dim()),
            "QLinearMatMul input's last axis is not the weights' {depth} rows"
        );
        let rows: TDim = shape[..shape.len() - 1].iter().product();
        let flat = target.wire_node(
            format!("{prefix}.rows"),
            AxisOp::Reshape(0, shape.clone(), tvec!(rows.clone(), depth.to_dim())),
            &[inputs[0]],
        )?;
        let y = target.wire_node(prefix, op, &flat)?;
        let mut unfolded = shape;
        *unfolded.last_mut().expect("rank checked above") = outputs.to_dim();
        target.wire_node(
            format!("{prefix}.unfold"),
            AxisOp::Reshape(0, tvec!(rows, outputs.to_dim()), unfolded),
            &y,
        )
    }
}

/// A constant's values converted to `T`, in order.
fn values<T: Datum + Copy>(t: &Tensor) -> TractResult<Vec<T>> {
    Ok(t.cast_to::<T>()?
        .try_as_plain_ram()?
        .as_slice::<T>()?
        .to_vec())
}
