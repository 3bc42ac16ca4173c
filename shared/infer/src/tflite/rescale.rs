//! `Rescale`: TFLite's QUANTIZE / DEQUANTIZE / requantize as one tract op.
//!
//! Quantized activations travel through our tract graphs as plain `i8`/`u8` tensors; the
//! frontend keeps their scale and zero point. `Rescale` maps values from one affine encoding (or
//! from real numbers) to another (or to real numbers), optionally clamping the real value first
//! (fused activations), and rounds the way the TFLite reference kernels do: half away from zero.
//! tract's own quantize rounds ties to even, which would disagree with TFLite on exact halves.

use tract_core::internal::*;
use tract_core::ndarray::ArrayD;

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
        }
    }

    pub(crate) fn clamped(self, lo: f32, hi: f32) -> Self {
        Rescale { lo, hi, ..self }
    }

    fn real_of(&self, input: &Tensor) -> TractResult<ArrayD<f32>> {
        let view = |x: f32| match self.from {
            Some(q) => (x - q.zero_point as f32) * q.scale,
            None => x,
        };
        Ok(match input.datum_type().unquantized() {
            DatumType::F32 => input.to_plain_array_view::<f32>()?.mapv(view),
            DatumType::I8 => {
                let shape = input.shape().to_vec();
                let values = input
                    .as_bytes()
                    .iter()
                    .map(|&b| view(f32::from(b as i8)))
                    .collect();
                ArrayD::from_shape_vec(shape, values)?
            }
            DatumType::U8 => {
                let shape = input.shape().to_vec();
                let values = input
                    .as_bytes()
                    .iter()
                    .map(|&b| view(f32::from(b)))
                    .collect();
                ArrayD::from_shape_vec(shape, values)?
            }
            DatumType::I16 => input
                .cast_to::<i16>()?
                .to_plain_array_view::<i16>()?
                .mapv(|v| view(f32::from(v))),
            DatumType::I32 => input
                .cast_to::<i32>()?
                .to_plain_array_view::<i32>()?
                .mapv(|v| view(v as f32)),
            dt => bail!("Rescale: unsupported input type {dt:?}"),
        })
    }

    fn encode<T: Datum>(
        &self,
        real: &ArrayD<f32>,
        min: f32,
        max: f32,
        cast: impl Fn(f32) -> T,
    ) -> Tensor {
        let q = self.to.unwrap_or(Affine {
            scale: 1.0,
            zero_point: 0,
        });
        let (lo, hi) = (self.lo, self.hi);
        real.mapv(|x| {
            let x = x.clamp(lo, hi);
            let v = (x / q.scale).round() + q.zero_point as f32;
            cast(v.clamp(min, max))
        })
        .into_tensor()
    }
}

impl Op for Rescale {
    fn name(&self) -> StaticName {
        "Rescale".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} -> {:?} as {:?}, clamp {}..{}",
            self.from, self.to, self.out, self.lo, self.hi
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Rescale {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let real = self.real_of(&inputs[0])?;
        let out = match self.out {
            DatumType::F32 => {
                let (lo, hi) = (self.lo, self.hi);
                real.mapv(|x| x.clamp(lo, hi)).into_tensor()
            }
            DatumType::I8 => self.encode(&real, -128.0, 127.0, |v| v as i8),
            DatumType::U8 => self.encode(&real, 0.0, 255.0, |v| v as u8),
            DatumType::I16 => self.encode(&real, -32768.0, 32767.0, |v| v as i16),
            DatumType::I32 => self.encode(&real, -2_147_483_648.0, 2_147_483_520.0, |v| v as i32),
            dt => bail!("Rescale: unsupported output type {dt:?}"),
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Rescale {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.out.fact(inputs[0].shape.clone())))
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
}
