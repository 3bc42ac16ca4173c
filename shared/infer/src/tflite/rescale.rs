//! `Rescale`: TFLite's QUANTIZE / DEQUANTIZE / requantize as one tract op, and [`QSoftmax`].
//!
//! Quantized activations travel through our tract graphs as plain `i8`/`u8` tensors; the
//! frontend keeps their scale and zero point. `Rescale` maps values from one affine encoding (or
//! from real numbers) to another (or to real numbers), optionally clamping the real value first
//! (fused activations), and rounds the way the TFLite reference kernels do: half away from zero.
//! tract's own quantize rounds ties to even, which would disagree with TFLite on exact halves.
//!
//! On small models these element-wise steps, not the matrix products, are most of the run time
//! (each is a node with its own output tensor), so a `Rescale` whose input is another `Rescale`
//! (or a [`QSoftmax`]) read by nothing else merges into it when tract optimizes the graph: one
//! pass applies both mappings per element, each still rounding and saturating as its own
//! operator would.

use crate::program::{IntoBuffer, OutputType, eval_allocating};
use crate::qkernels::Narrow;
use multiversion::multiversion;
use tract_core::internal::*;

/// An affine integer encoding: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Affine {
    pub scale: f32,
    pub zero_point: i32,
}

/// Maps every element from `from` to `to`; `None` means real numbers (`f32`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rescale {
    pub from: Option<Affine>,
    pub to: Option<Affine>,
    /// Storage type of the output: `F32` when `to` is `None`, else an integer type.
    pub out: DatumType,
    /// Real-valued clamp applied before encoding (fused RELU / RELU6), `-inf..inf` for none.
    pub lo: f32,
    pub hi: f32,
    /// A following `Rescale` merged into this one, applied to each element after this one.
    pub then: Option<Box<Rescale>>,
}

impl Eq for Rescale {}

impl Rescale {
    pub(crate) fn new(from: Option<Affine>, to: Option<Affine>, out: DatumType) -> Self {
        Rescale {
            from,
            to,
            out,
            lo: f32::NEG_INFINITY,
            hi: f32::INFINITY,
            then: None,
        }
    }

    pub(crate) fn clamped(self, lo: f32, hi: f32) -> Self {
        Rescale { lo, hi, ..self }
    }

    /// This mapping, then `next` on its results.
    pub(crate) fn followed_by(mut self, next: Rescale) -> Self {
        self.then = Some(Box::new(match self.then.take() {
            Some(then) => then.followed_by(next),
            None => next,
        }));
        self
    }

    /// The storage type of the last step's output.
    pub(crate) fn output_type(&self) -> DatumType {
        self.then.as_ref().map_or(self.out, |t| t.output_type())
    }

    /// One element through every step: `x` is an input value (an integer's value for integer
    /// inputs), the result the stored output value, which each step's saturation keeps exactly
    /// representable in its type.
    #[inline]
    fn apply(&self, x: f32) -> f32 {
        // A loop, not recursion, so that the whole chain inlines into the element loop.
        let mut step = self;
        let mut value = x;
        loop {
            value = step.step(value);
            match &step.then {
                Some(next) => step = next,
                None => return value,
            }
        }
    }

    /// This step alone on one element.
    #[inline(always)]
    fn step(&self, x: f32) -> f32 {
        let real = self.real(x);
        match self.out {
            DatumType::F32 => real,
            DatumType::I8 => self.encode(real, -128.0, 127.0),
            DatumType::U8 => self.encode(real, 0.0, 255.0),
            DatumType::I16 => self.encode(real, -32768.0, 32767.0),
            // The largest f32 below 2^31, so that the cast cannot overflow. Other types never
            // get here: `write` refuses them, and `declutter` does not merge them.
            _ => self.encode(real, -2_147_483_648.0, 2_147_483_520.0),
        }
    }

    /// Whether every step's output type is one `apply` encodes.
    fn encodings_supported(&self) -> bool {
        let supported = [
            DatumType::F32,
            DatumType::I8,
            DatumType::U8,
            DatumType::I16,
            DatumType::I32,
        ];
        supported.contains(&self.out) && self.then.as_ref().is_none_or(|t| t.encodings_supported())
    }

    /// An input element decoded to a real number and clamped. Without a branch (an identity
    /// encoding is scale 1, zero point 0, exact in `f32`), so that element loops vectorize.
    #[inline(always)]
    fn real(&self, x: f32) -> f32 {
        let (zero_point, scale) = self
            .from
            .map_or((0.0, 1.0), |q| (q.zero_point as f32, q.scale));
        ((x - zero_point) * scale).clamp(self.lo, self.hi)
    }

    /// A real number as the output encoding, saturated to `min..=max`.
    #[inline(always)]
    fn encode(&self, real: f32, min: f32, max: f32) -> f32 {
        let (zero_point, scale) = self
            .to
            .map_or((0.0, 1.0), |q| (q.zero_point as f32, q.scale));
        (round_half_away_from_zero(real / scale) + zero_point).clamp(min, max)
    }

    /// Maps every element of `input` into `out`, a tensor of [`Rescale::output_type`] with as
    /// many elements. One pass, no intermediate tensor.
    fn write(&self, input: &Tensor, out: &mut Tensor) -> TractResult<()> {
        // Generic rather than `dyn Iterator`: the loop must inline to vectorize on large tensors.
        fn fill<T: Datum + Copy>(
            out: &mut Tensor,
            values: impl Iterator<Item = f32>,
            store: impl Fn(f32) -> T,
        ) -> TractResult<()> {
            let mut view = out.try_as_plain_ram_mut()?;
            for (o, x) in view.as_slice_mut::<T>()?.iter_mut().zip(values) {
                *o = store(x);
            }
            Ok(())
        }
        /// Any chain, any output type: every step per element.
        fn every_step(
            op: &Rescale,
            out: &mut Tensor,
            values: impl Iterator<Item = f32>,
        ) -> TractResult<()> {
            match op.output_type() {
                DatumType::F32 => fill(out, values, |x| op.apply(x)),
                DatumType::I8 => fill(out, values, |x| op.apply(x) as i8),
                DatumType::U8 => fill(out, values, |x| op.apply(x) as u8),
                DatumType::I16 => fill(out, values, |x| op.apply(x) as i16),
                DatumType::I32 => fill(out, values, |x| op.apply(x) as i32),
                dt => bail!("Rescale: unsupported output type {dt:?}"),
            }
        }
        /// Picks the loop for the output type.
        fn by_output_type(
            op: &Rescale,
            out: &mut Tensor,
            values: impl Iterator<Item = f32>,
        ) -> TractResult<()> {
            if op.then.is_none() {
                // One step (the common case): its output type is fixed per loop, which leaves
                // the element loop without a branch, so it vectorizes.
                return match op.out {
                    DatumType::F32 => fill(out, values, |x| op.real(x)),
                    DatumType::I8 => {
                        fill(out, values, |x| op.encode(op.real(x), -128.0, 127.0) as i8)
                    }
                    DatumType::U8 => fill(out, values, |x| op.encode(op.real(x), 0.0, 255.0) as u8),
                    _ => every_step(op, out, values),
                };
            }
            every_step(op, out, values)
        }
        ensure!(
            input.len() == out.len(),
            "Rescale: {} input values for {} outputs",
            input.len(),
            out.len()
        );
        let to_8_bits = matches!(self.out, DatumType::I8 | DatumType::U8);
        if self.then.is_none() && input.datum_type() == DatumType::F32 && to_8_bits {
            let x = input.try_as_plain_ram()?;
            let x = x.as_slice::<f32>()?;
            let mut view = out.try_as_plain_ram_mut()?;
            if self.out == DatumType::I8 {
                quantize(self, x, view.as_slice_mut::<i8>()?);
            } else {
                quantize(self, x, view.as_slice_mut::<u8>()?);
            }
            return Ok(());
        }
        let bytes = input.as_bytes();
        match input.datum_type().unquantized() {
            DatumType::F32 => by_output_type(
                self,
                out,
                input.try_as_plain_ram()?.as_slice::<f32>()?.iter().copied(),
            ),
            DatumType::I8 => by_output_type(self, out, bytes.iter().map(|&b| f32::from(b as i8))),
            DatumType::U8 => by_output_type(self, out, bytes.iter().map(|&b| f32::from(b))),
            DatumType::I16 => by_output_type(
                self,
                out,
                bytes
                    .chunks_exact(2)
                    .map(|c| f32::from(i16::from_ne_bytes([c[0], c[1]]))),
            ),
            DatumType::I32 => by_output_type(
                self,
                out,
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as f32),
            ),
            dt => bail!("Rescale: unsupported input type {dt:?}"),
        }
    }

    /// `input` mapped into a new tensor.
    fn map(&self, input: &Tensor) -> TractResult<Tensor> {
        let mut out = crate::qkernels::output_tensor(self.output_type(), input.shape())?;
        self.write(input, &mut out)?;
        Ok(out)
    }
}

impl IntoBuffer for Rescale {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        Ok((self.output_type(), inputs[0].shape().into()))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        self.write(inputs[0], out)
    }
}

impl Op for Rescale {
    fn name(&self) -> StaticName {
        "Rescale".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut steps = vec![];
        let mut step = Some(self);
        while let Some(s) = step {
            steps.push(format!(
                "{:?} -> {:?} as {:?}, clamp {}..{}",
                s.from, s.to, s.out, s.lo, s.hi
            ));
            step = s.then.as_deref();
        }
        Ok(steps)
    }

    op_as_typed_op!();
}

impl EvalOp for Rescale {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl TypedOp for Rescale {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output_type().fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }

    /// Merges into the `Rescale` or [`QSoftmax`] before it, when this is that value's only reader.
    fn declutter(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TypedModelPatch>> {
        let Some(prec) = sole_producer(model, node)?.filter(|_| self.encodings_supported()) else {
            return Ok(None);
        };
        if let Some(first) = prec.op_as::<Rescale>().filter(|r| r.encodings_supported()) {
            let merged = first.clone().followed_by(self.clone());
            return TypedModelPatch::fuse_with_next(model, prec, merged).map(Some);
        }
        if let Some(softmax) = prec
            .op_as::<QSoftmax>()
            .filter(|s| s.encode.encodings_supported())
        {
            let merged = QSoftmax {
                encode: softmax.encode.clone().followed_by(self.clone()),
                ..softmax.clone()
            };
            return TypedModelPatch::fuse_with_next(model, prec, merged).map(Some);
        }
        Ok(None)
    }

    as_op!();
}

/// One step from real numbers to 8 bits (a model's input QUANTIZE: a whole image), exactly as
/// [`Rescale::encode`] computes it, as a plain slice loop compiled for AVX-512, AVX2 and SSE4.1
/// too and chosen at run time (AVX-512 took a 96×96×3 image in 8 µs against AVX2's 14 on this
/// project's AMD EPYC VM, 2026-11-24). The general loop of [`Rescale::write`] is compiled for the baseline
/// instruction set, where rounding and float-to-integer casts stay scalar: a 96×96×3 image took
/// 70 µs there, as long as a convolution layer. Here `trunc` is one instruction, and the value is
/// made finite and in range before the cast, so that no saturating conversion is needed.
#[multiversion(targets(
    "x86_64+avx2+avx512f+avx512bw+avx512vl",
    "x86_64+avx2",
    "x86_64+sse4.1"
))]
fn quantize<T: Narrow>(op: &Rescale, x: &[f32], out: &mut [T]) {
    let (zero_point, scale) = op.to.map_or((0.0, 1.0), |q| (q.zero_point as f32, q.scale));
    let (min, max) = (T::MIN as f32, T::MAX as f32);
    for (o, &v) in out.iter_mut().zip(x) {
        let scaled = op.real(v) / scale;
        let truncated = scaled.trunc();
        // Ties away from zero; NaN compares false and stays NaN.
        let away = if (scaled - truncated).abs() >= 0.5 {
            1f32.copysign(scaled)
        } else {
            0.0
        };
        let q = (truncated + away + zero_point).clamp(min, max);
        // NaN is stored as the zero point, as `round_half_away_from_zero` makes it.
        let q = if q.is_nan() {
            zero_point.clamp(min, max)
        } else {
            q
        };
        // SAFETY: `q` is finite and within `T`'s range, so within `i32`'s.
        #[allow(unsafe_code)]
        let q: i32 = unsafe { q.to_int_unchecked() };
        *o = T::narrow(q);
    }
}

/// `f32::round` (ties away from zero, as TFLite rounds) without its library call, which costs
/// more than the rest of a rescale. Beyond the `i32` range the value saturates, and every caller
/// clamps to a narrower range after. NaN becomes 0, so it is stored as the zero point (real 0).
#[inline(always)]
fn round_half_away_from_zero(x: f32) -> f32 {
    let truncated = x as i32 as f32;
    // Exact: below 2^23 the fraction of an f32 is representable, above it there is none.
    if (x - truncated).abs() >= 0.5 {
        truncated + x.signum()
    } else {
        truncated
    }
}

/// The node computing `node`'s only input, when `node` is the only reader of that value and the
/// value is not a model output: then the two may become one op.
fn sole_producer<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> TractResult<Option<&'m TypedNode>> {
    let [input] = node.inputs[..] else {
        return Ok(None);
    };
    let prec = model.node(input.node);
    let sole = prec.outputs.len() == 1
        && prec.outputs[0].successors.len() == 1
        && !model.output_outlets()?.contains(&input);
    Ok(sole.then_some(prec))
}

/// SOFTMAX over the last axis in one op: the input decoded to real numbers, `softmax(beta * x)`,
/// and the result encoded (TFLite's quantized softmax output, and any DEQUANTIZE merged after).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QSoftmax {
    /// To real numbers (`F32` output).
    pub decode: Rescale,
    pub beta: f32,
    /// From real numbers to the output.
    pub encode: Rescale,
}

impl Eq for QSoftmax {}

impl Op for QSoftmax {
    fn name(&self) -> StaticName {
        "QSoftmax".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for QSoftmax {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        Ok((self.encode.output_type(), inputs[0].shape().into()))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let input = inputs[0];
        let row = input.shape().last().copied().unwrap_or(1).max(1);
        let mut real = self.decode.map(input)?;
        {
            let mut view = real.try_as_plain_ram_mut()?;
            for values in view.as_slice_mut::<f32>()?.chunks_mut(row) {
                softmax(values, self.beta);
            }
        }
        self.encode.write(&real, out)
    }
}

/// `softmax(beta * x)` in place, in `f32` with the standard library's `exp`.
fn softmax(values: &mut [f32], beta: f32) {
    // As TFLite's float reference: `exp((x - max) * beta)`.
    let max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in values.iter_mut() {
        *v = ((*v - max) * beta).exp();
        sum += *v;
    }
    for v in values.iter_mut() {
        *v /= sum;
    }
}

impl TypedOp for QSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(
            self.encode.output_type().fact(inputs[0].shape.clone())
        ))
    }
    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(op: &Rescale, input: Tensor) -> Tensor {
        let out = op
            .eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()))
            .unwrap();
        out[0].clone().into_tensor()
    }

    #[test]
    fn quantizes_rounding_half_away_from_zero_and_saturating() {
        let op = Rescale::new(
            None,
            Some(Affine {
                scale: 0.5,
                zero_point: -1,
            }),
            DatumType::I8,
        );
        let out = run(&op, tensor1(&[0.25f32, -0.25, 0.75, 1000.0, -1000.0]));
        // 0.25/0.5 = 0.5 -> 1 (away from zero), -0.5 -> -1, 1.5 -> 2; then + zp, then saturate.
        assert_eq!(out, tensor1(&[0i8, -2, 1, 127, -128]));
    }

    #[test]
    fn the_vectorized_quantize_stores_what_every_step_computes() {
        let mut xs = TIES_AND_EDGES.to_vec();
        xs.extend([
            1e-40,
            8_388_607.5,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
        ]);
        // Ties and near-ties of the scale below, and a sweep of ordinary values.
        xs.extend((-600..600).map(|i| i as f32 * 0.0625 + 0.03125));
        for (out, zero_point) in [(DatumType::I8, -3), (DatumType::U8, 131)] {
            let op = Rescale::new(
                None,
                Some(Affine {
                    scale: 0.125,
                    zero_point,
                }),
                out,
            )
            .clamped(-20.0, 30.0);
            let got = run(&op, tensor1(&xs));
            let got = got.as_bytes();
            for (i, &x) in xs.iter().enumerate() {
                let expected = op.apply(x);
                let stored = if out == DatumType::I8 {
                    f32::from(got[i] as i8)
                } else {
                    f32::from(got[i])
                };
                assert_eq!(stored, expected, "{x} as {out:?}");
            }
        }
    }

    #[test]
    fn dequantizes() {
        let op = Rescale::new(
            Some(Affine {
                scale: 0.1,
                zero_point: 10,
            }),
            None,
            DatumType::F32,
        );
        let out = run(&op, tensor1(&[10u8, 20, 0]));
        let values = out.to_plain_array_view::<f32>().unwrap().to_owned();
        assert!(
            (values[0] - 0.0).abs() < 1e-6
                && (values[1] - 1.0).abs() < 1e-6
                && (values[2] + 1.0).abs() < 1e-6
        );
    }

    #[test]
    fn requantizes_between_encodings_with_a_clamp() {
        let from = Affine {
            scale: 0.5,
            zero_point: 0,
        };
        let to = Affine {
            scale: 0.25,
            zero_point: -128,
        };
        let op = Rescale::new(Some(from), Some(to), DatumType::I8).clamped(0.0, 6.0);
        let out = run(&op, tensor1(&[-4i8, 4, 100]));
        // -2.0 clamps to 0 -> -128; 2.0 -> 8 - 128 = -120; 50 clamps to 6 -> 24 - 128 = -104.
        assert_eq!(out, tensor1(&[-128i8, -120, -104]));
    }

    /// Exact halves either side of zero, signed zeros, and the largest `f32` below one half.
    const TIES_AND_EDGES: [f32; 10] = [
        0.0,
        -0.0,
        0.5,
        -0.5,
        1.5,
        -1.5,
        2.5,
        -2.5,
        0.49999997,
        -0.49999997,
    ];

    #[test]
    fn rounding_matches_the_standard_library_on_ties_and_edges() {
        let mut cases = TIES_AND_EDGES.to_vec();
        cases.extend([126.5, -128.5, 8388607.5, 8388608.0, 1e9, -1e9, 3e9, -3e9]);
        cases.extend((-2000..2000).map(|i| i as f32 * 0.25 + 0.125 * (i % 3) as f32));
        for x in cases {
            let expected = x.round().clamp(-2_147_483_648.0, 2_147_483_520.0);
            let got = round_half_away_from_zero(x).clamp(-2_147_483_648.0, 2_147_483_520.0);
            assert_eq!(got, expected, "rounding {x}");
        }
    }

    fn quantize() -> Rescale {
        Rescale::new(
            None,
            Some(Affine {
                scale: 0.5,
                zero_point: -1,
            }),
            DatumType::I8,
        )
    }

    fn dequantize() -> Rescale {
        Rescale::new(
            Some(Affine {
                scale: 0.5,
                zero_point: -1,
            }),
            None,
            DatumType::F32,
        )
    }

    #[test]
    fn a_chain_rounds_and_saturates_at_every_step() {
        let input = tensor1(&[0.25f32, -0.25, 0.74, 1000.0, -1000.0, 3.0]);
        let one_by_one = run(&dequantize(), run(&quantize(), input.clone()));
        let chained = run(&quantize().followed_by(dequantize()), input);
        // The i8 step saturates 1000 to 127 (64.0 decoded) and rounds 0.74 / 0.5 = 1.48 to 1 (0.5).
        assert_eq!(chained, tensor1(&[0.5f32, -0.5, 0.5, 64.0, -63.5, 3.0]));
        assert_eq!(chained, one_by_one);
    }

    /// `source -> quantize -> dequantize`, optimized as the engine does; the quantized value is
    /// also a model output when `expose_middle`.
    fn quantize_then_dequantize(expose_middle: bool) -> Arc<TypedRunnableModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([6])).unwrap();
        let q = model.wire_node("q", quantize(), &[x]).unwrap()[0];
        let y = model.wire_node("y", dequantize(), &[q]).unwrap()[0];
        let outputs = if expose_middle { vec![y, q] } else { vec![y] };
        model.select_output_outlets(&outputs).unwrap();
        model.into_optimized().unwrap().into_runnable().unwrap()
    }

    fn execute(plan: &Arc<TypedRunnableModel>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        plan.spawn()?.run(inputs)
    }

    fn rescale_nodes(plan: &TypedRunnableModel) -> usize {
        plan.model()
            .nodes
            .iter()
            .filter(|n| n.op_is::<Rescale>())
            .count()
    }

    #[test]
    fn optimizing_merges_a_rescale_into_the_one_before_it() {
        let input = tensor1(&[0.25f32, -0.25, 0.74, 1000.0, -1000.0, 3.0]);
        let plan = quantize_then_dequantize(false);
        assert_eq!(rescale_nodes(&plan), 1);
        let out = execute(&plan, tvec!(input.clone().into_tvalue())).unwrap();
        assert_eq!(
            out[0].clone().into_tensor(),
            run(&dequantize(), run(&quantize(), input))
        );
    }

    #[test]
    fn a_value_the_model_outputs_is_not_merged_away() {
        let input = tensor1(&[0.25f32, -0.25, 0.74, 1000.0, -1000.0, 3.0]);
        let plan = quantize_then_dequantize(true);
        assert_eq!(rescale_nodes(&plan), 2);
        let out = execute(&plan, tvec!(input.clone().into_tvalue())).unwrap();
        let q = run(&quantize(), input);
        assert_eq!(out[1].clone().into_tensor(), q);
        assert_eq!(out[0].clone().into_tensor(), run(&dequantize(), q));
    }

    #[test]
    fn quantized_softmax_decodes_normalizes_encodes_and_absorbs_a_dequantize() {
        let logits = Affine {
            scale: 0.25,
            zero_point: 3,
        };
        // TFLite's int8 softmax output encoding: scale 1/256, zero point -128.
        let probabilities = Affine {
            scale: 1.0 / 256.0,
            zero_point: -128,
        };
        let softmax = QSoftmax {
            decode: Rescale::new(Some(logits), None, DatumType::F32),
            beta: 1.0,
            encode: Rescale::new(None, Some(probabilities), DatumType::I8),
        };
        let input = tensor2(&[[3i8, 7, -5, 3], [0, 0, 0, 0]]);
        let expected: Vec<i8> = [[3i8, 7, -5, 3], [0, 0, 0, 0]]
            .iter()
            .flat_map(|row| {
                let real: Vec<f64> = row.iter().map(|&q| 0.25 * f64::from(q - 3)).collect();
                let sum: f64 = real.iter().map(|r| r.exp()).sum();
                real.into_iter().map(move |r| {
                    ((r.exp() / sum * 256.0).round() - 128.0).clamp(-128.0, 127.0) as i8
                })
            })
            .collect();
        let out = softmax
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(input.clone().into_tvalue()),
            )
            .unwrap();
        let got = out[0].clone().into_tensor();
        assert_eq!(
            got.as_bytes().iter().map(|&b| b as i8).collect::<Vec<_>>(),
            expected
        );

        let mut model = TypedModel::default();
        let x = model.add_source("x", i8::fact([2, 4])).unwrap();
        let p = model.wire_node("p", softmax, &[x]).unwrap()[0];
        let dequantize = Rescale::new(Some(probabilities), None, DatumType::F32);
        let y = model.wire_node("y", dequantize.clone(), &[p]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        assert_eq!(plan.model().nodes.len(), 2, "source and one QSoftmax");
        let out = execute(&plan, tvec!(input.into_tvalue())).unwrap();
        assert_eq!(out[0].clone().into_tensor(), run(&dequantize, got));
    }
}
