//! Integer kernels with exact requantization: TFLite's fixed-point arithmetic (the TFLite
//! frontend), or ONNX Runtime's `f32` scale rounded half to even ([`Requantization::Float`], for ONNX
//! `QLinearMatMul`).
//!
//! tract 0.23's int8 matrix products are correct but slow on the small shapes microcontroller-class
//! models are made of (a 640×128 int8 fully-connected layer took over a millisecond: measured with
//! `edge-agent bench --profile`), and they requantize with their own rounding. These kernels are
//! written for those shapes and reproduce the TFLite reference kernels bit for bit (or, with float
//! requantization, onnxruntime):
//!
//! - accumulation in `i32` of `(x - x_zero_point) * (w - w_zero_point)`, plus the `i32` bias;
//! - requantization by a fixed-point multiplier and shift (`QuantizeMultiplier`,
//!   `MultiplyByQuantizedMultiplier`: a rounding doubling high multiply, then a rounding right
//!   shift), per output channel;
//! - the output zero point, then the fused activation's clamp in the integer domain.
//!
//! [`QConv`] covers CONV_2D (one group) and DEPTHWISE_CONV_2D (one group per input channel, any
//! depth multiplier); [`QFullyConnected`] covers FULLY_CONNECTED; [`QAdd`] and [`QMul`] the
//! element-wise int8 ADD and MUL, inputs quantized alike or not; [`QAvgPool`] AVERAGE_POOL_2D.
//!
//! 8-bit activations are read in place; the products accumulate in `i32` blocks held in
//! registers: portable (vectorized by the compiler), or on x86-64 with AVX2 two depth rows per
//! `vpmaddwd` ([`madd`]), or with AVX-512 VNNI four per `vpdpbusd` ([`mod@vnni`]), chosen at run time.
//! One-group convolutions on those instructions take four output pixels at a time over an input
//! packed once ([`paired_conv`]). With AVX-512 ([`mod@avx512`]) the accumulators of VNNI and
//! depthwise layers with TFLite's requantization and 8-bit outputs are requantized a register
//! block at a time and leave as the output's bytes, as do ADD's; elsewhere requantization, clamp
//! and narrowing are one vectorized pass over a layer ([`Requantization`]).

use std::borrow::Cow;

use multiversion::multiversion;
use tract_core::internal::*;
use tract_core::ndarray::{ArrayD, IxDyn};

use crate::program::{IntoBuffer, OutputType, eval_allocating};

/// A real multiplier in TFLite's fixed-point form: `real ≈ multiplier * 2^(shift - 31)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Multiplier {
    multiplier: i32,
    shift: i32,
}

impl Multiplier {
    /// TFLite's `QuantizeMultiplier`.
    pub(crate) fn new(real: f64) -> Self {
        if real == 0.0 || !real.is_finite() {
            return Multiplier {
                multiplier: 0,
                shift: 0,
            };
        }
        // frexp: real = q * 2^shift with q in [0.5, 1).
        let mut shift = real.abs().log2().floor() as i32 + 1;
        let mut q = real / 2f64.powi(shift);
        if q.abs() >= 1.0 {
            q /= 2.0;
            shift += 1;
        }
        if q.abs() < 0.5 {
            q *= 2.0;
            shift -= 1;
        }
        let mut fixed = (q * (1i64 << 31) as f64).round() as i64;
        // Also for a (meaningless) negative scale, so that the multiplier is never `i32::MIN`.
        if fixed.abs() == 1i64 << 31 {
            fixed /= 2;
            shift += 1;
        }
        if shift < -31 {
            return Multiplier {
                multiplier: 0,
                shift: 0,
            };
        }
        Multiplier {
            multiplier: fixed as i32,
            shift,
        }
    }

    /// The shift as a left and a right shift, one of them 0. The left one is at most 31, where
    /// every way of shifting agrees (a larger one overflows anyway).
    fn shifts(self) -> (u32, u32) {
        (self.shift.clamp(0, 31) as u32, (-self.shift).max(0) as u32)
    }

    /// TFLite's `MultiplyByQuantizedMultiplier`.
    pub(crate) fn apply(self, x: i32) -> i32 {
        let (left, right) = self.shifts();
        rounding_divide_by_pot(
            rounding_doubling_high_mul(x.wrapping_shl(left), self.multiplier),
            right,
        )
    }
}

/// How accumulators become output integers, one entry per output channel: TFLite's fixed-point
/// multiplier, or ONNX Runtime's `f32` scale rounded half to even (`MlasRequantizeOutput`), each
/// bit-exact with its runtime.
///
/// Kept as plain arrays, not one enum per channel, so that [`Requantization::store_rows`] is a
/// straight loop the compiler vectorizes (`vpmuldq` for the 64-bit products, `vpsllvd` /
/// `vpsravd` for the per-channel shifts), fused with the clamp and the narrowing store; on
/// AVX-512 the same arithmetic is written with intrinsics ([`mod@avx512`]). Per channel and in
/// scalar `i64`, it had become a large share of a convolution model's time once the products
/// themselves were vectorized.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Requantization {
    /// TFLite: [`Multiplier::apply`] for each channel, split into its parts.
    FixedPoint {
        multiplier: Vec<i32>,
        left: Vec<u32>,
        right: Vec<u32>,
    },
    /// ONNX Runtime: `round_ties_even(acc as f32 * scale)`; the scales' bits, for `Hash`.
    Float(Vec<u32>),
}

/// The fewest entries [`Requantization`] holds: its per-channel values repeat (channel `i %
/// outputs`) up to a multiple of the channel count at least this long, so that a layer with few
/// channels is requantized many pixels per loop, not one short loop per pixel.
const REQUANTIZATION_TILE: usize = 64;

/// `values` repeated to a whole number of copies at least [`REQUANTIZATION_TILE`] long.
fn tiled<T: Copy>(values: Vec<T>) -> Vec<T> {
    let copies = REQUANTIZATION_TILE.div_ceil(values.len().max(1));
    values.repeat(copies)
}

impl Requantization {
    fn fixed_point(multipliers: impl Iterator<Item = Multiplier>) -> Self {
        let (mut multiplier, mut left, mut right) = (Vec::new(), Vec::new(), Vec::new());
        for m in multipliers {
            let (l, r) = m.shifts();
            multiplier.push(m.multiplier);
            left.push(l);
            right.push(r);
        }
        Requantization::FixedPoint {
            multiplier: tiled(multiplier),
            left: tiled(left),
            right: tiled(right),
        }
    }

    fn float(scales: impl Iterator<Item = f32>) -> Self {
        Requantization::Float(tiled(scales.map(f32::to_bits).collect()))
    }

    /// The fixed-point tables (multiplier, left shift, right shift), if TFLite's.
    fn tiles(&self) -> Option<(&[i32], &[u32], &[u32])> {
        match self {
            Requantization::FixedPoint {
                multiplier,
                left,
                right,
            } => Some((multiplier, left, right)),
            Requantization::Float(_) => None,
        }
    }

    /// Requantizes `acc` (whole rows of every channel: `acc.len()` a multiple of the channel
    /// count), adds `zero_point`, clamps to `min..=max` (within `T`'s range) and stores the
    /// results as `T` in `out`: one pass over a layer's accumulators, a tile at a time.
    fn store_rows<T: Narrow>(&self, acc: &[i32], out: &mut [T], zero_point: i32, range: [i32; 2]) {
        let Some(channels) = self.tiles() else {
            if let Requantization::Float(bits) = self {
                store_float(acc, out, bits, zero_point, range);
            }
            return;
        };
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: AVX-512F, BW and VL are available (checked just above).
            #[allow(unsafe_code)]
            unsafe {
                avx512::store_fixed_point(acc, out, channels, zero_point, range)
            };
            return;
        }
        store_fixed_point(acc, out, channels, zero_point, range)
    }
}

/// [`Requantization::store_rows`] with TFLite's fixed-point multipliers (per channel, tiled:
/// multiplier, left shift, right shift). Compiled for AVX2 and SSE4.1 too, chosen at run time:
/// the whole output of every convolution and fully-connected layer not requantized in registers
/// passes through here. (With AVX-512, [`avx512::store_fixed_point`] instead.)
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn store_fixed_point<T: Narrow>(
    acc: &[i32],
    out: &mut [T],
    (multiplier, left, right): (&[i32], &[u32], &[u32]),
    zero_point: i32,
    [min, max]: [i32; 2],
) {
    let tile = multiplier.len();
    if tile == 0 {
        return; // No channels, so no values.
    }
    for (acc, out) in acc.chunks(tile).zip(out.chunks_mut(tile)) {
        let channels = multiplier.iter().zip(left).zip(right);
        for ((o, &a), ((&m, &l), &r)) in out.iter_mut().zip(acc).zip(channels) {
            let y = rounding_divide_by_pot(rounding_doubling_high_mul(a.wrapping_shl(l), m), r);
            *o = T::narrow(y.wrapping_add(zero_point).clamp(min, max));
        }
    }
}

/// [`Requantization::store_rows`] with ONNX Runtime's `f32` scales (their bits, tiled), rounded
/// half to even.
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn store_float<T: Narrow>(
    acc: &[i32],
    out: &mut [T],
    bits: &[u32],
    zero_point: i32,
    [min, max]: [i32; 2],
) {
    if bits.is_empty() {
        return; // No channels, so no values.
    }
    for (acc, out) in acc.chunks(bits.len()).zip(out.chunks_mut(bits.len())) {
        for ((o, &a), &s) in out.iter_mut().zip(acc).zip(bits) {
            // Saturating cast: far out of range either way, and clamped just after.
            let y = ((a as f32) * f32::from_bits(s)).round_ties_even() as i32;
            *o = T::narrow(y.wrapping_add(zero_point).clamp(min, max));
        }
    }
}

/// gemmlowp's `SaturatingRoundingDoublingHighMul` without its one saturating case, `a == b ==
/// i32::MIN`, which cannot occur: [`Multiplier::new`] never makes `i32::MIN` (see there).
///
/// gemmlowp adds `2^30` to a non-negative product and `1 - 2^30` to a negative one, then divides
/// by `2^31` truncating toward zero. For a negative product that truncation is the floor of
/// `(ab + 1 - 2^30 + 2^31 - 1) / 2^31`, the same as the non-negative case's floor of
/// `(ab + 2^30) / 2^31`; so one branch-free arithmetic shift does both.
#[inline(always)]
fn rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    ((i64::from(a) * i64::from(b) + (1 << 30)) >> 31) as i32
}

/// gemmlowp's `RoundingDivideByPOT` (`exponent` in `0..32`): `x / 2^exponent`, ties away from zero.
#[inline(always)]
fn rounding_divide_by_pot(x: i32, exponent: u32) -> i32 {
    let mask = ((1u32 << exponent) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> exponent) + i32::from(remainder > threshold)
}

/// Integer output encoding: zero point, clamp (activation and type range), storage type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct IntOutput {
    pub zero_point: i32,
    pub min: i32,
    pub max: i32,
    pub dt: DatumType,
}

impl IntOutput {
    /// Clamps `values` and stores them as the output type into `out` (as many elements); with
    /// `requantization`, `values` are accumulators (whole rows of its channels), requantized and
    /// offset by the zero point in the same pass.
    fn store_into(
        &self,
        values: &[i32],
        out: &mut Tensor,
        requantization: Option<&Requantization>,
    ) -> TractResult<()> {
        ensure!(
            out.len() == values.len(),
            "{} values for an output of shape {:?}",
            values.len(),
            out.shape()
        );
        let mut view = out.try_as_plain_ram_mut()?;
        match self.dt {
            DatumType::I8 => self.write(values, view.as_slice_mut::<i8>()?, requantization),
            DatumType::U8 => self.write(values, view.as_slice_mut::<u8>()?, requantization),
            DatumType::I16 => self.write(values, view.as_slice_mut::<i16>()?, requantization),
            dt => bail!("unsupported integer output {dt:?}"),
        }
        Ok(())
    }

    /// The output of `channels`' layer from `kernel`, into `out`: given `requantized`, the kernel
    /// writes the output's bytes itself (and returns no accumulators); else it returns the
    /// accumulators, requantized and stored here.
    fn produce_into(
        &self,
        out: &mut Tensor,
        channels: &Channels,
        requantized: Option<&Requantized>,
        kernel: impl FnOnce(Option<(&mut [u8], &Requantized)>) -> TractResult<Vec<i32>>,
    ) -> TractResult<()> {
        let Some(requantized) = requantized else {
            let acc = kernel(None)?;
            return self.store_into(&acc, out, Some(&channels.requantization));
        };
        let mut view = out.try_as_plain_ram_mut()?;
        let bytes = match self.dt {
            DatumType::I8 => bytemuck_u8_mut(view.as_slice_mut::<i8>()?),
            DatumType::U8 => view.as_slice_mut::<u8>()?,
            dt => bail!("requantized in registers into 8-bit outputs only, not {dt:?}"),
        };
        let rest = kernel(Some((bytes, requantized)))?;
        ensure!(
            rest.is_empty(),
            "a kernel left accumulators besides its bytes"
        );
        Ok(())
    }

    /// [`IntOutput::store_into`] into a slice of the output type.
    fn write<T: Narrow>(
        &self,
        values: &[i32],
        out: &mut [T],
        requantization: Option<&Requantization>,
    ) {
        let range = [self.min, self.max];
        match requantization {
            Some(r) => r.store_rows(values, out, self.zero_point, range),
            None => narrow(values, out, range),
        }
    }
}

/// A new output tensor of `dt` and `shape`, zeroed. An integer one is aligned as the platform's
/// `malloc` aligns (16 bytes) rather than to tract's vector size: every kernel here loads and
/// stores unaligned, and an over-aligned allocation goes through `posix_memalign`, whose
/// splitting and freeing of the slack (`_int_memalign`, `unlink_chunk`, `malloc_consolidate` in
/// `perf`) took a tenth of the smallest models' time (2026-11-24). Besides Cascade's own
/// kernels, integer tensors reach tract's reshape, transpose, pad, concatenation, slicing and
/// casts, which read them element by element and need no alignment either. A float one (a
/// DEQUANTIZE's) may feed tract's float kernels, so it keeps tract's alignment.
pub(crate) fn output_tensor(dt: DatumType, shape: &[usize]) -> TractResult<Tensor> {
    if dt.is_float() {
        Tensor::zero_dt(dt, shape)
    } else {
        Tensor::zero_aligned_dt(dt, shape, 16)
    }
}

/// An integer storage type: its range, and a value already within it stored as it.
pub(crate) trait Narrow: Copy {
    const MIN: i32;
    const MAX: i32;
    fn narrow(value: i32) -> Self;
}

impl Narrow for i8 {
    const MIN: i32 = -128;
    const MAX: i32 = 127;
    #[inline(always)]
    fn narrow(value: i32) -> Self {
        value as i8
    }
}

impl Narrow for u8 {
    const MIN: i32 = 0;
    const MAX: i32 = 255;
    #[inline(always)]
    fn narrow(value: i32) -> Self {
        value as u8
    }
}

impl Narrow for i16 {
    const MIN: i32 = -32768;
    const MAX: i32 = 32767;
    #[inline(always)]
    fn narrow(value: i32) -> Self {
        value as i16
    }
}

/// `values` clamped to `min..=max` (within `T`'s range) into `out`. Compiled for AVX2 and SSE4.1
/// too, chosen at run time: the whole output of ADD and MUL passes through here.
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn narrow<T: Narrow>(values: &[i32], out: &mut [T], [min, max]: [i32; 2]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = T::narrow(v.clamp(min, max));
    }
}

/// The raw integer values of an i8 / u8 / i16 tensor, widened to i16.
fn widen(t: &Tensor) -> TractResult<Vec<i16>> {
    Ok(match t.datum_type().unquantized() {
        DatumType::I8 => t.as_bytes().iter().map(|&b| i16::from(b as i8)).collect(),
        DatumType::U8 => t.as_bytes().iter().map(|&b| i16::from(b)).collect(),
        DatumType::I16 => t
            .cast_to::<i16>()?
            .try_as_plain_ram()?
            .as_slice::<i16>()?
            .to_vec(),
        dt => bail!("expected an 8- or 16-bit integer tensor, got {dt:?}"),
    })
}

fn widen_i32(t: &Tensor) -> TractResult<Vec<i32>> {
    Ok(widen(t)?.into_iter().map(i32::from).collect())
}

/// `acc[o] += x * w[o]`: the loop the compiler vectorizes.
#[inline(always)]
fn axpy(acc: &mut [i32], x: i32, w: &[i32]) {
    for (a, &wv) in acc.iter_mut().zip(w) {
        *a += x * wv;
    }
}

/// Per-output-channel constants of an int8 convolution or fully-connected layer.
///
/// Weights are stored transposed, `[depth][outputs]` and widened to `i32`, so that one input
/// value updates every output's accumulator in one vectorized pass; on the per-row paths inputs
/// equal to their zero point (ReLU's zeros, padding) contribute nothing and are skipped. The same
/// weights are also laid out for the CPU's multiply-add instructions where it has them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Channels {
    /// `w[k][o]`, raw weight values.
    weights_t: Vec<i32>,
    /// The same weights as `i16` pairs of depth rows, `[(depth + 1) / 2][outputs][2]` (the last
    /// pair padded with 0): the layout of x86's `vpmaddwd`, which multiplies two inputs by their
    /// weights and adds both products in one instruction, for 8-bit inputs.
    weight_pairs: Vec<i16>,
    /// The weights as `i8` quadruples of depth rows, `[(depth + 3) / 4][outputs][4]` (the last
    /// padded with 0): the layout of AVX-512 VNNI's `vpdpbusd`, which multiplies four unsigned
    /// input bytes by four signed weights and adds all four products in one instruction. Built
    /// only on CPUs with it, for weights whose values fit `i8`, without zero points, and whole
    /// blocks of 8 outputs.
    weight_quads: Vec<i8>,
    /// `sum_k w[k][o]`: the inputs `vpdpbusd` reads are `x - x_zp + offset`, unsigned, and
    /// `offset * column_sums[o]` taken from the bias makes up for the offset.
    column_sums: Vec<i32>,
    /// [`Channels::bias_less`] each offset the kernels use: the quadruples' of int8 inputs, and
    /// of uint8 inputs, which is the input zero point (also the AVX-512 depthwise kernel's, which
    /// reads raw inputs). Computed once here rather than on every run:
    /// on the smallest models a layer's own allocations cost as much as its products, and a
    /// depthwise layer's sums over its taps took 3% of visual wake words.
    quad_biases: Vec<(i32, Vec<i32>)>,
    depth: usize,
    outputs: usize,
    x_zero_point: i32,
    /// The bias; with non-zero weight zero points also `-w_zp[o] * sum(x - x_zp)` at run time.
    bias: Vec<i32>,
    weight_zero_points: Option<Vec<i32>>,
    requantization: Requantization,
}

/// [`Channels::quad_offset`] for an input zero point.
fn quad_offset(x_zero_point: i32, dt: DatumType) -> i32 {
    match dt {
        DatumType::I8 => x_zero_point.saturating_add(128),
        DatumType::U8 => x_zero_point,
        _ => 0,
    }
}

/// The bias less `offset * column_sums[o]` (see [`Channels::bias_for`]); wrapping, as the
/// accumulators wrap alike and the true result fits.
fn quad_bias(bias: &[i32], column_sums: &[i32], offset: i32) -> Vec<i32> {
    (bias.iter().zip(column_sums))
        .map(|(&b, &s)| b.wrapping_sub(offset.wrapping_mul(s)))
        .collect()
}

impl Channels {
    /// `weights`: `[outputs, depth]` raw values; per-channel (or single) scales and zero points.
    pub(crate) fn new(
        weights: &Tensor,
        bias: Option<&Tensor>,
        x_zero_point: i32,
        x_scale: f32,
        w_scales: &[f32],
        w_zero_points: &[i32],
        y_scale: f32,
    ) -> TractResult<Self> {
        let outputs = weights.shape()[0];
        let raw = widen(weights)?;
        let depth = raw.len() / outputs.max(1);
        let pick = |v: &[f32], o: usize| if v.len() == 1 { v[0] } else { v[o] };
        let pick_zp = |o: usize| {
            if w_zero_points.len() == 1 {
                w_zero_points[0]
            } else {
                w_zero_points.get(o).copied().unwrap_or(0)
            }
        };
        let bias: Vec<i32> = match bias {
            Some(b) => b
                .cast_to::<i32>()?
                .try_as_plain_ram()?
                .as_slice::<i32>()?
                .to_vec(),
            None => vec![0; outputs],
        };
        ensure!(
            bias.len() == outputs,
            "bias has {} values for {outputs} outputs",
            bias.len()
        );
        let mut weights_t = vec![0i32; depth * outputs];
        for o in 0..outputs {
            for k in 0..depth {
                weights_t[k * outputs + o] = i32::from(raw[o * depth + k]);
            }
        }
        // Only AVX2 has the instruction that reads them: elsewhere they would be dead weight.
        let mut weight_pairs = Vec::new();
        if avx2() {
            weight_pairs = vec![0i16; depth.div_ceil(2) * outputs * 2];
            for o in 0..outputs {
                for k in 0..depth {
                    weight_pairs[((k / 2) * outputs + o) * 2 + k % 2] = raw[o * depth + k];
                }
            }
        }
        let fits_i8 = raw.iter().all(|&v| i8::try_from(v).is_ok());
        let no_weight_zero_points = (0..outputs).all(|o| pick_zp(o) == 0);
        // Wrapping: the accumulators wrap alike, and the true result fits.
        let column_sums: Vec<i32> = (0..outputs)
            .map(|o| {
                let column = raw[o * depth..(o + 1) * depth].iter();
                column.fold(0i32, |sum, &v| sum.wrapping_add(i32::from(v)))
            })
            .collect();
        let mut weight_quads = Vec::new();
        if vnni() && fits_i8 && no_weight_zero_points && outputs.is_multiple_of(8) {
            weight_quads = vec![0i8; depth.div_ceil(4) * outputs * 4];
            for o in 0..outputs {
                for k in 0..depth {
                    weight_quads[((k / 4) * outputs + o) * 4 + k % 4] = raw[o * depth + k] as i8;
                }
            }
        }
        let requantization = Requantization::fixed_point((0..outputs).map(|o| {
            Multiplier::new(f64::from(x_scale) * f64::from(pick(w_scales, o)) / f64::from(y_scale))
        }));
        let weight_zero_points = (0..outputs)
            .any(|o| pick_zp(o) != 0)
            .then(|| (0..outputs).map(pick_zp).collect());
        // int8 inputs' quadruple offset, and uint8 inputs', which is also the zero point.
        let mut offsets = vec![quad_offset(x_zero_point, DatumType::I8), x_zero_point];
        offsets.dedup();
        let quad_biases = offsets
            .into_iter()
            .map(|offset| (offset, quad_bias(&bias, &column_sums, offset)))
            .collect();
        Ok(Channels {
            weights_t,
            weight_pairs,
            weight_quads,
            column_sums,
            quad_biases,
            depth,
            outputs,
            x_zero_point,
            bias,
            weight_zero_points,
            requantization,
        })
    }

    /// The same channels requantized as ONNX Runtime does: by `x_scale * w_scale / y_scale`
    /// computed in `f32` in that order, rounded half to even.
    pub(crate) fn with_float_requantization(
        mut self,
        x_scale: f32,
        w_scales: &[f32],
        y_scale: f32,
    ) -> Self {
        let scale = |o: usize| {
            let w = if w_scales.len() == 1 {
                w_scales[0]
            } else {
                w_scales[o]
            };
            x_scale * w / y_scale
        };
        self.requantization = Requantization::float((0..self.outputs).map(scale));
        self
    }

    /// Accumulates `(x[k] - x_zp) * w[first + k][..]` into `acc` for every segment
    /// `(first, x)` of input values (a fully-connected row is one segment, a convolution's
    /// receptive field one per kernel tap); returns `sum(x - x_zp)` when the weights have zero
    /// points (otherwise unspecified: nothing reads it). `paired` is the same input as
    /// [`Channels::pair`] packs it, or empty where [`Channels::pairs_help`] says no.
    ///
    /// Outputs go in blocks of 32, 16 and 8 whose accumulators stay in registers across the whole
    /// depth: updating them in memory for every input value made the layers load-store bound.
    /// Given `paired` input (8-bit, on x86-64 with AVX2), the blocks take two depth rows per
    /// instruction ([`madd`]). Always inlined: the callers are compiled once per instruction set
    /// (`multiversion`), and a call would run this loop, their whole cost, on the baseline one.
    #[inline(always)]
    fn accumulate<T: Copy + Into<i32>>(
        &self,
        acc: &mut [i32],
        segments: &[(usize, &[T])],
        paired: &[(usize, &[i32])],
    ) -> i32 {
        let mut start = 0;
        #[cfg(not(target_arch = "x86_64"))]
        let _ = paired;
        #[cfg(target_arch = "x86_64")]
        if !paired.is_empty() && avx2() {
            start = self.outputs - self.outputs % 8;
            // SAFETY: AVX2 is available (checked just above).
            #[allow(unsafe_code)]
            unsafe {
                madd::accumulate(acc, start, paired, &self.weight_pairs, self.outputs)
            };
        }
        if start == 0 {
            while self.outputs - start >= 32 {
                self.accumulate_block::<32, T>(acc, start, segments);
                start += 32;
            }
            if self.outputs - start >= 16 {
                self.accumulate_block::<16, T>(acc, start, segments);
                start += 16;
            }
            if self.outputs - start >= 8 {
                self.accumulate_block::<8, T>(acc, start, segments);
                start += 8;
            }
        }
        // The last outputs (fewer than 8), and the sum that weight zero points need: int8 models
        // (zero weight zero points) whose outputs fill whole blocks skip this pass.
        let mut sum = 0;
        if start < self.outputs || self.weight_zero_points.is_some() {
            for &(first, x) in segments {
                for (k, &v) in x.iter().enumerate() {
                    let xs = v.into() - self.x_zero_point;
                    if xs != 0 && start < self.outputs {
                        let row = (first + k) * self.outputs;
                        axpy(
                            &mut acc[start..],
                            xs,
                            &self.weights_t[row + start..row + self.outputs],
                        );
                    }
                    sum += xs;
                }
            }
        }
        sum
    }

    /// [`Channels::accumulate`] for outputs `start..start + N`, held in registers.
    #[inline(always)]
    fn accumulate_block<const N: usize, T: Copy + Into<i32>>(
        &self,
        acc: &mut [i32],
        start: usize,
        segments: &[(usize, &[T])],
    ) {
        let mut block: [i32; N] = acc[start..start + N].try_into().expect("N outputs");
        for &(first, x) in segments {
            for (k, &v) in x.iter().enumerate() {
                let xs = v.into() - self.x_zero_point;
                if xs != 0 {
                    let row = (first + k) * self.outputs + start;
                    let w: &[i32; N] = self.weights_t[row..row + N].try_into().expect("N weights");
                    for (a, &wv) in block.iter_mut().zip(w) {
                        *a += xs * wv;
                    }
                }
            }
        }
        acc[start..start + N].copy_from_slice(&block);
    }

    /// Whether [`madd`] can take inputs of type `T` here: 8-bit values (minus an 8-bit zero point
    /// they fit the `i16` it multiplies), a whole block of outputs, AVX2 (weight pairs built).
    #[inline(always)]
    fn pairs_help<T>(&self) -> bool {
        size_of::<T>() == 1
            && self.x_zero_point.unsigned_abs() <= 255
            && self.outputs >= 8
            && !self.weight_pairs.is_empty()
    }

    /// Appends `x` (starting at an even depth row) as pairs of rows ([`Packing::Pairs`]).
    #[inline(always)]
    fn pair<T: Copy + Into<i32>>(&self, x: &[T], out: &mut Vec<i32>) {
        let first = out.len();
        // Written in place rather than through `extend`, whose loop is a function of its own
        // and so compiled for the baseline instruction set, not the caller's.
        out.resize(first + x.len().div_ceil(2), 0);
        Packing::Pairs.pack(x, self.x_zero_point, 0, &mut out[first..]);
    }

    /// How [`paired_conv`] can compute a one-group convolution with inputs of type `T`, if at
    /// all: every output on a packed path, and no weight zero points (whose correction needs each
    /// pixel's input sum). Quadruples where AVX-512 VNNI weights were built and `offset` (see
    /// [`Packing::Quads`]) keeps every input byte unsigned, as it does for an 8-bit zero point;
    /// else pairs.
    #[inline(always)]
    fn packing<T>(&self, offset: i32) -> Option<Packing> {
        if self.depth == 0 {
            return None;
        }
        if size_of::<T>() == 1 && !self.weight_quads.is_empty() && (0..=255).contains(&offset) {
            Some(Packing::Quads)
        } else if self.pairs_help::<T>()
            && self.outputs.is_multiple_of(8)
            && self.weight_zero_points.is_none()
        {
            Some(Packing::Pairs)
        } else {
            None
        }
    }

    /// [`Channels::packing`] for inputs of datum type `dt` (8-bit ones only).
    fn packing_for(&self, dt: DatumType, offset: i32) -> Option<Packing> {
        match dt {
            DatumType::I8 => self.packing::<i8>(offset),
            DatumType::U8 => self.packing::<u8>(offset),
            _ => None,
        }
    }

    /// What makes inputs of type `dt` unsigned bytes in quadruples ([`Packing::Quads`] holds
    /// `x - x_zp + offset`): `x + 128` for i8, `x` itself for u8; 0 for wider types, which never
    /// take them.
    fn quad_offset(&self, dt: DatumType) -> i32 {
        quad_offset(self.x_zero_point, dt)
    }

    /// The bias to start accumulating from with `packing`: for quadruples, less what their
    /// `offset` adds to every input (`offset * column_sums[o]`).
    fn bias_for(&self, packing: Packing, offset: i32) -> Cow<'_, [i32]> {
        match packing {
            Packing::Pairs => Cow::Borrowed(&self.bias),
            Packing::Quads => self.bias_less(offset),
        }
    }

    /// The bias less `offset * column_sums[o]`: what accumulating from inputs shifted by
    /// `offset` needs. Computed at load for the offsets the kernels use (`quad_biases`).
    fn bias_less(&self, offset: i32) -> Cow<'_, [i32]> {
        match self.quad_biases.iter().find(|(o, _)| *o == offset) {
            Some((_, bias)) => Cow::Borrowed(bias),
            None => Cow::Owned(quad_bias(&self.bias, &self.column_sums, offset)),
        }
    }

    /// Accumulates [`PIXELS`] pixels, or all that are `left` in the row where fewer, and returns
    /// how many: `target` takes their results, one row of `outputs` each; `segments`
    /// are `(first weight word, offset of the first pixel's words in input, words)`, and pixel
    /// `p` reads `p * step` further. Only with the packing [`Channels::packing`] chose.
    #[inline(always)]
    fn accumulate_pixels(
        &self,
        packing: Packing,
        target: Target,
        segments: &[(usize, usize, usize)],
        step: usize,
        input: &[i32],
        left: usize,
    ) -> usize {
        // The last pixels of a row go together too, rather than one at a time: each weight load
        // then serves two or three of them (the late layers of a vision model, 6 or 3 pixels
        // wide, have the most weights).
        match left {
            PIXELS.. => self.accumulate_block_of::<PIXELS>(packing, target, segments, step, input),
            3 => self.accumulate_block_of::<3>(packing, target, segments, step, input),
            2 => self.accumulate_block_of::<2>(packing, target, segments, step, input),
            _ => self.accumulate_block_of::<1>(packing, target, segments, step, input),
        }
        left.clamp(1, PIXELS)
    }

    /// [`madd::accumulate_pixels`] or [`vnni::accumulate_pixels`] for `P` pixels.
    #[inline(always)]
    fn accumulate_block_of<const P: usize>(
        &self,
        packing: Packing,
        target: Target,
        segments: &[(usize, usize, usize)],
        step: usize,
        input: &[i32],
    ) {
        #[cfg(target_arch = "x86_64")]
        match packing {
            // SAFETY: weight quadruples are built only where AVX-512 VNNI is available.
            #[allow(unsafe_code)]
            Packing::Quads => unsafe {
                return vnni::accumulate_pixels::<P>(
                    target,
                    segments,
                    step,
                    input,
                    &self.weight_quads,
                    self.outputs,
                );
            },
            // SAFETY: weight pairs are built only where AVX2 is available.
            #[allow(unsafe_code)]
            Packing::Pairs => unsafe {
                let Target::Accumulators(acc) = target else {
                    unreachable!("pairs leave accumulators")
                };
                return madd::accumulate_pixels::<P>(
                    acc,
                    segments,
                    step,
                    input,
                    &self.weight_pairs,
                    self.outputs,
                );
            },
        }
        #[allow(unreachable_code)]
        {
            let _ = (packing, target, segments, step, input);
            unreachable!("packed weights are built only on x86-64 with AVX2 or AVX-512 VNNI");
        }
    }

    /// Subtracts what the weight zero points, if any, added to a pixel's accumulators (its
    /// inputs summed to `sum_xs`, centered).
    #[inline(always)]
    fn correct_zero_points(&self, acc: &mut [i32], sum_xs: i32) {
        if let Some(wz) = &self.weight_zero_points {
            for (a, &z) in acc.iter_mut().zip(wz) {
                *a -= z * sum_xs;
            }
        }
    }
}

/// Two centered input values (each fits 16 bits) as one `i32`, the first in the low half: the
/// operand layout of `vpmaddwd`.
#[inline(always)]
fn pack_pair(a: i32, b: i32) -> i32 {
    i32::from(a as u16) | (i32::from(b as u16) << 16)
}

/// Where [`Channels::accumulate_pixels`] leaves its pixels' results.
// Read only by the x86-64 multiply-add modules; elsewhere no packed path exists.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Target<'a> {
    /// Their accumulators: rows of `outputs` that start out holding the bias.
    Accumulators(&'a mut [i32]),
    /// Their output bytes, rows of `outputs`, requantized a register block at a time: AVX-512
    /// VNNI quadruples only, so that no layer-sized accumulator buffer is written and read back.
    Bytes(&'a mut [u8], &'a Requantized<'a>),
}

impl<'a> Target<'a> {
    /// From row offset `at`: of `bytes` where given, else of `accumulators`.
    #[inline(always)]
    fn at(
        bytes: &'a mut Option<(&mut [u8], &Requantized)>,
        accumulators: &'a mut [i32],
        at: usize,
    ) -> Self {
        match bytes {
            Some((bytes, requantized)) => Target::Bytes(&mut bytes[at..], requantized),
            None => Target::Accumulators(&mut accumulators[at..]),
        }
    }
}

/// What [`Target::Bytes`] needs: the accumulators' start and the requantization.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Requantized<'a> {
    /// [`Channels::bias_for`] the quadruples.
    bias: Cow<'a, [i32]>,
    /// [`Requantization::FixedPoint`]'s multipliers, left and right shifts.
    tiles: (&'a [i32], &'a [u32], &'a [u32]),
    /// The output's zero point, minimum and maximum.
    output: [i32; 3],
}

impl<'a> Requantized<'a> {
    /// For `c`'s quadruples with `offset` into `output`, where its results can be requantized in
    /// registers: on AVX-512 VNNI, fixed-point requantization (TFLite's), 8-bit outputs.
    fn new(c: &'a Channels, offset: i32, output: &IntOutput) -> Option<Self> {
        let tiles = c.requantization.tiles()?;
        let bytes = matches!(output.dt, DatumType::I8 | DatumType::U8);
        (bytes && !c.weight_quads.is_empty()).then(|| Requantized {
            bias: c.bias_for(Packing::Quads, offset),
            tiles,
            output: [output.zero_point, output.min, output.max],
        })
    }
}

/// Quantized FULLY_CONNECTED: `[rows, depth]` in, `[rows, outputs]` out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct QFullyConnected {
    pub channels: Channels,
    pub output: IntOutput,
}

impl Op for QFullyConnected {
    fn name(&self) -> StaticName {
        "QFullyConnected".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QFullyConnected {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for QFullyConnected {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        let c = &self.channels;
        let len = inputs[0].len();
        ensure!(
            c.depth > 0 && len.is_multiple_of(c.depth),
            "input does not hold whole rows of {}",
            c.depth
        );
        Ok((self.output.dt, tvec![len / c.depth, c.outputs]))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let input = inputs[0];
        let c = &self.channels;
        let rows = out.shape()[0];
        // The raw values are read in place: this layer is often a whole model's only real work,
        // and on small models an extra copy of the input costs as much as the products.
        let bytes = input.as_bytes();
        let dt = input.datum_type().unquantized();
        let offset = c.quad_offset(dt);
        let quads = c.packing_for(dt, offset) == Some(Packing::Quads);
        let requantized = quads
            .then(|| Requantized::new(c, offset, &self.output))
            .flatten();
        self.output
            .produce_into(out, c, requantized.as_ref(), |to| {
                Ok(match dt {
                    DatumType::I8 => fully_connected(c, bytemuck_i8(bytes), rows, offset, to),
                    DatumType::U8 => fully_connected(c, bytes, rows, offset, to),
                    _ => fully_connected(c, &widen(input)?, rows, offset, to),
                })
            })
    }
}

/// `i8` values as their bytes.
fn bytemuck_u8_mut(values: &mut [i8]) -> &mut [u8] {
    bytemuck::cast_slice_mut(values)
}

/// Bytes as the `i8` values they hold.
fn bytemuck_i8(bytes: &[u8]) -> &[i8] {
    bytemuck::cast_slice(bytes)
}

/// The rows of a fully-connected layer, as accumulators: on AVX-512 VNNI quadruples where
/// [`Channels::packing`] allows (`offset` as for [`paired_conv`]), else per row with the inputs
/// that equal their zero point skipped. Given `bytes` (quadruples only, see [`IntOutput::produce`]),
/// the rows go there requantized instead, and no accumulators are returned. Compiled for AVX2 and
/// SSE4.1 too, chosen at run time.
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn fully_connected<T: Copy + Into<i32>>(
    c: &Channels,
    x: &[T],
    rows: usize,
    offset: i32,
    mut bytes: Option<(&mut [u8], &Requantized)>,
) -> Vec<i32> {
    if c.packing::<T>(offset) == Some(Packing::Quads) {
        let words = c.depth.div_ceil(4);
        let mut packed = vec![0i32; rows * words];
        for (row, words) in x.chunks_exact(c.depth).zip(packed.chunks_exact_mut(words)) {
            Packing::Quads.pack(row, c.x_zero_point, offset, words);
        }
        let mut out = match bytes {
            Some(_) => Vec::new(),
            None => c.bias_for(Packing::Quads, offset).repeat(rows),
        };
        let mut r = 0;
        while r < rows {
            let segments = [(0, r * words, words)];
            let target = Target::at(&mut bytes, &mut out, r * c.outputs);
            r += c.accumulate_pixels(Packing::Quads, target, &segments, words, &packed, rows - r);
        }
        return out;
    }
    assert!(
        bytes.is_none(),
        "requantized in registers on quadruples only"
    );
    let mut out = Vec::with_capacity(rows * c.outputs);
    let paired = c.pairs_help::<T>();
    let mut pairs = Vec::new();
    for r in 0..rows {
        out.extend_from_slice(&c.bias);
        let acc = &mut out[r * c.outputs..];
        let row = &x[r * c.depth..(r + 1) * c.depth];
        pairs.clear();
        if paired {
            c.pair(row, &mut pairs);
        }
        let packed = [(0, &pairs[..])];
        let sum = c.accumulate(acc, &[(0, row)], &packed[..usize::from(paired)]);
        c.correct_zero_points(acc, sum);
    }
    out
}

impl TypedOp for QFullyConnected {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].rank() == 2, "QFullyConnected takes [rows, depth]");
        Ok(tvec!(self.output.dt.fact([
            inputs[0].shape[0].clone(),
            self.channels.outputs.to_dim()
        ])))
    }
    as_op!();
}

/// Quantized NHWC convolution in groups. Weights are `[outputs, kh, kw, inputs / groups]`; output
/// channel `o` reads group `o / (outputs / groups)`, so depthwise with multiplier `m` is
/// `groups = inputs` and output channel `c * m + j`, as in TFLite.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct QConv {
    pub channels: Channels,
    pub output: IntOutput,
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// Padding before the first row and column (TFLite's SAME puts the extra one after).
    pub pad_before: [usize; 2],
    pub out_hw: [usize; 2],
    pub groups: usize,
    pub in_channels: usize,
}

impl QConv {
    /// Output size and leading padding for TFLite's SAME / VALID padding.
    pub(crate) fn geometry(
        input: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        same: bool,
    ) -> (usize, usize) {
        let effective = (kernel - 1) * dilation + 1;
        if same {
            let out = input.div_ceil(stride);
            let total = ((out - 1) * stride + effective).saturating_sub(input);
            (out, total / 2)
        } else {
            ((input.saturating_sub(effective)) / stride + 1, 0)
        }
    }

    /// The input's size with its padding, before and after: enough for every tap of every output
    /// pixel.
    fn padded_size(&self, h: usize, w: usize) -> (usize, usize) {
        let [oh, ow] = self.out_hw;
        let reach = |axis: usize, out: usize| {
            (out.max(1) - 1) * self.strides[axis]
                + (self.kernel[axis] - 1) * self.dilations[axis]
                + 1
        };
        (
            reach(0, oh).max(self.pad_before[0] + h),
            reach(1, ow).max(self.pad_before[1] + w),
        )
    }

    /// The input minus its zero point, in [`QConv::padded_size`] with the padding as 0 (a
    /// centered value that contributes nothing): every output pixel then reads every tap at a
    /// fixed offset, without bounds checks per tap.
    #[inline(always)]
    fn centered_padded<T: Copy + Into<i32>>(
        &self,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
    ) -> Vec<i32> {
        let zp = self.channels.x_zero_point;
        self.padded_with(x, [n, h, w], 0, |v| v.into() - zp)
    }

    /// `x` (NHWC) mapped value by value into [`QConv::padded_size`], the padding `fill`.
    #[inline(always)]
    fn padded_with<T: Copy, U: Copy>(
        &self,
        x: &[T],
        [n, h, w]: [usize; 3],
        fill: U,
        map: impl Fn(T) -> U,
    ) -> Vec<U> {
        let (hp, wp) = self.padded_size(h, w);
        let mut padded = vec![fill; n * hp * wp * self.in_channels];
        self.pad_into(x, [n, h, w], &mut padded, map);
        padded
    }

    /// [`QConv::padded_with`] into `padded`, whose padding is already filled.
    #[inline(always)]
    fn pad_into<T: Copy, U: Copy>(
        &self,
        x: &[T],
        [n, h, w]: [usize; 3],
        padded: &mut [U],
        map: impl Fn(T) -> U,
    ) {
        let (hp, wp) = self.padded_size(h, w);
        let [pad_y, pad_x] = self.pad_before;
        let ch = self.in_channels;
        assert_eq!(padded.len(), n * hp * wp * ch, "a padded image");
        for b in 0..n {
            for y in 0..h {
                let from = (b * h + y) * w * ch;
                let to = ((b * hp + y + pad_y) * wp + pad_x) * ch;
                for (p, &v) in padded[to..to + w * ch].iter_mut().zip(&x[from..]) {
                    *p = map(v);
                }
            }
        }
    }

    /// [`depthwise`] on AVX-512 ([`avx512::Depthwise`]): the input padded with its zero point
    /// as raw bytes (a quarter of the centered `i32` copy), and every register requantized and
    /// stored as the output's bytes (in `out`) once its taps are summed, so no accumulator goes
    /// to memory. False, with `out` untouched, where that does not apply: a CPU without AVX-512,
    /// other than 8-bit input and output, ONNX's float requantization, more than
    /// [`avx512::MAX_TAPS`] taps, or a zero point outside the input's type.
    #[cfg(target_arch = "x86_64")]
    fn depthwise_avx512(
        &self,
        input: &Tensor,
        [n, h, w]: [usize; 3],
        out: &mut Tensor,
    ) -> TractResult<bool> {
        let c = &self.channels;
        let Some(tiles) = c.requantization.tiles() else {
            return Ok(false);
        };
        let zp = c.x_zero_point;
        let (signed, padding) = match input.datum_type().unquantized() {
            DatumType::I8 => (true, i8::try_from(zp).ok().map(|v| v as u8)),
            DatumType::U8 => (false, u8::try_from(zp).ok()),
            _ => return Ok(false),
        };
        let output_bytes = matches!(self.output.dt, DatumType::I8 | DatumType::U8);
        let small = self.kernel[0] * self.kernel[1] <= avx512::MAX_TAPS;
        let (Some(padding), true, true, true) = (padding, output_bytes, small, avx512()) else {
            return Ok(false);
        };
        let ch = self.in_channels;
        let [kh, kw] = self.kernel;
        let [oh, ow] = self.out_hw;
        let [sy, sx] = self.strides;
        let [dy, dx] = self.dilations;
        let (hp, wp) = self.padded_size(h, w);
        let padded = self.padded_with(input.as_bytes(), [n, h, w], padding, |v| v);
        let taps: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| (ky * dy * wp + kx * dx) * ch))
            .collect();
        // Σ (x - zp)·w = Σ x·w - zp·Σ w: the zero point's share comes off the bias (computed at
        // load), as an offset's does for quadruples.
        let bias = c.bias_less(zp);
        let layer = avx512::Depthwise {
            padded: &padded,
            pixels: [n, oh, ow],
            steps: [hp * wp * ch, sy * wp * ch, sx * ch],
            taps: &taps,
            channels: ch,
            weights: &c.weights_t,
            bias: &bias,
            tiles,
            output: [self.output.zero_point, self.output.min, self.output.max],
        };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            #[allow(unsafe_code)]
            // SAFETY: AVX-512F, BW and VL are available (checked by `avx512()` above).
            unsafe {
                match (signed, self.output.dt) {
                    (true, DatumType::I8) => layer.run::<true, i8>(view.as_slice_mut()?),
                    (true, _) => layer.run::<true, u8>(view.as_slice_mut()?),
                    (false, DatumType::I8) => layer.run::<false, i8>(view.as_slice_mut()?),
                    (false, _) => layer.run::<false, u8>(view.as_slice_mut()?),
                }
            }
        }
        Ok(true)
    }

    /// The input as the bytes of [`Packing::Quads`] (`x - x_zero_point + offset`), in
    /// [`QConv::padded_size`] with the padding as centered zeros (`offset`).
    #[inline(always)]
    fn padded_bytes<T: Copy + Into<i32>>(
        &self,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
        offset: i32,
    ) -> Vec<u8> {
        self.padded_with(x, [n, h, w], offset as u8, self.quad_byte(offset))
    }

    /// An input value as its byte in [`Packing::Quads`], `x - x_zero_point + offset`.
    #[inline(always)]
    fn quad_byte<T: Copy + Into<i32>>(&self, offset: i32) -> impl Fn(T) -> u8 {
        let shift = offset - self.channels.x_zero_point;
        move |v| (v.into() + shift) as u8
    }

    /// [`QConv::padded_bytes`] as the words of [`Packing::Quads`], for a channel count that 4
    /// divides: since a quadruple's bytes are its inputs' own bytes mapped one by one (`x` itself
    /// for u8, `x ^ 0x80` for i8, see [`Channels::quad_offset`]), the image is written as bytes
    /// and read as words, with no packing pass. (Words are little-endian, as [`Packing::word`]
    /// makes them; quadruples exist only on x86-64.)
    #[inline(always)]
    fn padded_quads<T: Copy + Into<i32>>(
        &self,
        x: &[T],
        [n, h, w]: [usize; 3],
        offset: i32,
    ) -> Vec<i32> {
        assert!(
            self.in_channels.is_multiple_of(4),
            "whole quadruples per pixel"
        );
        let (hp, wp) = self.padded_size(h, w);
        let padding = Packing::Quads.word(&[0; 4], offset);
        let mut image = vec![padding; n * hp * wp * self.in_channels / 4];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut image);
        self.pad_into(x, [n, h, w], bytes, self.quad_byte(offset));
        image
    }

    /// The input position a kernel tap reads for an output position, if inside the input.
    #[inline]
    fn source(&self, axis: usize, out: usize, tap: usize, size: usize) -> Option<usize> {
        let at = (out * self.strides[axis] + tap * self.dilations[axis]) as isize
            - self.pad_before[axis] as isize;
        (at >= 0 && (at as usize) < size).then_some(at as usize)
    }
}

/// Depthwise with multiplier 1: every channel reads only itself, so one output pixel is, per
/// block of channels, a sum over the kernel taps of element-wise products. The input is centered
/// and padded once (padding as 0), so every pixel reads every tap at a fixed offset. Compiled for
/// AVX2 and SSE4.1 too, chosen at run time.
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn depthwise<T: Copy + Into<i32>>(conv: &QConv, x: &[T], n: usize, h: usize, w: usize) -> Vec<i32> {
    {
        let c = &conv.channels;
        let ch = conv.in_channels;
        let [kh, kw] = conv.kernel;
        let [oh, ow] = conv.out_hw;
        let [sy, sx] = conv.strides;
        let [dy, dx] = conv.dilations;
        if n * oh * ow * ch == 0 {
            return Vec::new();
        }
        let (hp, wp) = conv.padded_size(h, w);
        let padded = conv.centered_padded(x, n, h, w);
        // Each tap's offset from a pixel's first input; its weights are row `k` of `weights_t`.
        let taps: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| (ky * dy * wp + kx * dx) * ch))
            .collect();
        let mut out = vec![0i32; n * oh * ow * ch];
        let mut pixels = out.chunks_exact_mut(ch);
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let acc = pixels.next().expect("one row per output pixel");
                    let base = ((b * hp + oy * sy) * wp + ox * sx) * ch;
                    let mut start = 0;
                    while ch - start >= 32 {
                        depthwise_block::<32>(c, acc, start, &padded[base..], &taps);
                        start += 32;
                    }
                    if ch - start >= 16 {
                        depthwise_block::<16>(c, acc, start, &padded[base..], &taps);
                        start += 16;
                    }
                    if ch - start >= 8 {
                        depthwise_block::<8>(c, acc, start, &padded[base..], &taps);
                        start += 8;
                    }
                    for o in start..ch {
                        acc[o] = c.bias[o];
                        for (k, &tap) in taps.iter().enumerate() {
                            acc[o] += padded[base + tap + o] * c.weights_t[k * ch + o];
                        }
                    }
                }
            }
        }
        // Weight zero points are zero in int8 depthwise models (checked at load).
        out
    }
}

/// [`depthwise`] for channels `start..start + N` of one output pixel (bias included), held in
/// registers across the taps; `x` starts at the pixel's first input.
#[inline(always)]
fn depthwise_block<const N: usize>(
    c: &Channels,
    acc: &mut [i32],
    start: usize,
    x: &[i32],
    taps: &[usize],
) {
    let mut block: [i32; N] = c.bias[start..start + N].try_into().expect("N channels");
    for (k, &tap) in taps.iter().enumerate() {
        let xs: &[i32; N] = x[tap + start..tap + start + N]
            .try_into()
            .expect("N inputs");
        let row = k * c.outputs + start;
        let ws: &[i32; N] = c.weights_t[row..row + N].try_into().expect("N weights");
        for ((a, &v), &wv) in block.iter_mut().zip(xs).zip(ws) {
            *a += v * wv;
        }
    }
    acc[start..start + N].copy_from_slice(&block);
}

/// Any grouping: per output pixel, the receptive field of each group updates that group's output
/// channels. Compiled for AVX2 and SSE4.1 too, chosen at run time.
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn grouped<T: Copy + Into<i32>>(conv: &QConv, x: &[T], n: usize, h: usize, w: usize) -> Vec<i32> {
    {
        let this = conv;
        let c = &this.channels;
        let [kh, kw] = this.kernel;
        let [oh, ow] = this.out_hw;
        let per_group_in = this.in_channels / this.groups;
        let per_group_out = c.outputs / this.groups;
        let mut out = Vec::with_capacity(n * oh * ow * c.outputs);
        let mut acc = vec![0i32; c.outputs];
        let mut sums = vec![0i32; this.groups];
        // One group's receptive field as (depth offset, input values) per kernel tap, and the
        // same as (first pair, values) of the input packed once in pairs of channels.
        let mut segments: Vec<(usize, &[T])> = Vec::with_capacity(kh * kw);
        let mut paired: Vec<(usize, &[i32])> = Vec::with_capacity(kh * kw);
        let mut pairs = Vec::new();
        let pairable = this.groups == 1 && c.pairs_help::<T>();
        if pairable && this.in_channels.is_multiple_of(2) {
            pairs.reserve(x.len() / 2);
            c.pair(x, &mut pairs);
        }
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    acc.copy_from_slice(&c.bias);
                    sums.fill(0);
                    for (g, sum) in sums.iter_mut().enumerate() {
                        segments.clear();
                        paired.clear();
                        for ky in 0..kh {
                            let Some(iy) = this.source(0, oy, ky, h) else {
                                continue;
                            };
                            for kx in 0..kw {
                                let Some(ix) = this.source(1, ox, kx, w) else {
                                    continue;
                                };
                                let start =
                                    ((b * h + iy) * w + ix) * this.in_channels + g * per_group_in;
                                let tap = (ky * kw + kx) * per_group_in;
                                segments.push((tap, &x[start..start + per_group_in]));
                                if !pairs.is_empty() {
                                    let values = &pairs[start / 2..(start + per_group_in) / 2];
                                    paired.push((tap / 2, values));
                                }
                            }
                        }
                        if this.groups == 1 {
                            *sum = c.accumulate(&mut acc, &segments, &paired);
                            continue;
                        }
                        // Weights of group g live in columns `outs` of the shared rows.
                        let outs = g * per_group_out..(g + 1) * per_group_out;
                        for &(tap, values) in &segments {
                            for (k, &v) in values.iter().enumerate() {
                                let xs = v.into() - c.x_zero_point;
                                if xs != 0 {
                                    let row = (tap + k) * c.outputs;
                                    axpy(
                                        &mut acc[outs.clone()],
                                        xs,
                                        &c.weights_t[row + outs.start..row + outs.end],
                                    );
                                    *sum += xs;
                                }
                            }
                        }
                    }
                    if let Some(wz) = &c.weight_zero_points {
                        for (o, a) in acc.iter_mut().enumerate() {
                            *a -= wz[o] * sums[o / per_group_out];
                        }
                    }
                    out.extend_from_slice(&acc);
                }
            }
        }
        out
    }
}

/// How [`paired_conv`] packs centered 8-bit inputs into `i32` words for its multiply-add
/// instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packing {
    /// Two depth rows as `i16` halves ([`pack_pair`]), for AVX2's `vpmaddwd`.
    Pairs,
    /// Four depth rows as unsigned bytes `x - x_zp + offset` ([`Packing::word`]), for AVX-512
    /// VNNI's `vpdpbusd`.
    Quads,
}

impl Packing {
    /// Depth rows per word.
    fn width(self) -> usize {
        match self {
            Packing::Pairs => 2,
            Packing::Quads => 4,
        }
    }

    /// One word from up to [`Packing::width`] centered values (missing ones are 0, centered).
    #[inline(always)]
    fn word(self, values: &[i32], offset: i32) -> i32 {
        match self {
            Packing::Pairs => pack_pair(values[0], values.get(1).copied().unwrap_or(0)),
            Packing::Quads => {
                let byte = |i: usize| (values.get(i).copied().unwrap_or(0) + offset) as u8;
                i32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)])
            }
        }
    }

    /// `values` less `zero_point` (centered) packed into `out`, one word per
    /// [`Packing::width`] values.
    #[inline(always)]
    fn pack<T: Copy + Into<i32>>(
        self,
        values: &[T],
        zero_point: i32,
        offset: i32,
        out: &mut [i32],
    ) {
        let v = |x: T| x.into() - zero_point;
        let whole = values.chunks_exact(self.width());
        let tail = whole.remainder();
        match self {
            Packing::Pairs => {
                for (o, x) in out.iter_mut().zip(whole) {
                    *o = pack_pair(v(x[0]), v(x[1]));
                }
            }
            Packing::Quads => {
                for (o, x) in out.iter_mut().zip(whole) {
                    let byte = |i: usize| (v(x[i]) + offset) as u8;
                    *o = i32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)]);
                }
            }
        }
        if !tail.is_empty() {
            let mut centered = [0; 4];
            for (c, &x) in centered.iter_mut().zip(tail) {
                *c = v(x);
            }
            out[values.len() / self.width()] = self.word(&centered[..self.width()], offset);
        }
    }
}

/// How many output pixels [`paired_conv`] computes at once: each weight load then serves four
/// pixels, and their accumulators for 16 outputs (8 registers) fit AVX2's 16.
const PIXELS: usize = 4;

/// A one-group convolution on a packed path ([`Channels::packing`]), [`PIXELS`] output pixels at
/// a time: per pixel, the kernel did too little work for what it cost to set up (the early, wide
/// layers of a vision model have many pixels and few channels).
///
/// The input is centered and padded once (padding as centered zeros), so every pixel reads whole
/// taps, and packed into words. A channel count the packing's width divides is packed as the
/// image; another (an RGB first layer), where words would straddle taps, as one gathered
/// receptive field per output pixel ([`QConv::padded_bytes`] for quadruples,
/// [`QConv::centered_padded`] for pairs). `offset` makes quadruples' bytes unsigned
/// ([`Packing::Quads`]). Returns the accumulators; given `bytes` (quadruples only, see
/// [`IntOutput::produce`]), writes the requantized output there instead and returns none.
/// Compiled for AVX2 too, chosen at run time.
#[multiversion(targets("x86_64+avx2"))]
fn paired_conv<T: Copy + Into<i32>>(
    conv: &QConv,
    x: &[T],
    [n, h, w]: [usize; 3],
    packing: Packing,
    offset: i32,
    mut bytes: Option<(&mut [u8], &Requantized)>,
) -> Vec<i32> {
    {
        let c = &conv.channels;
        let cin = conv.in_channels;
        let [kh, kw] = conv.kernel;
        let [oh, ow] = conv.out_hw;
        let [sy, sx] = conv.strides;
        let [dy, dx] = conv.dilations;
        if n * oh * ow * c.outputs == 0 {
            return Vec::new();
        }
        // Every output pixel's accumulators start from the bias (or, with `bytes`, start from it
        // in registers).
        let mut out = match bytes {
            Some(_) => Vec::new(),
            None => c.bias_for(packing, offset).repeat(n * oh * ow),
        };
        let mut segments: Vec<(usize, usize, usize)> = Vec::with_capacity(kh * kw);
        let width = packing.width();
        let tapwise = cin.is_multiple_of(width);
        let per_tap = cin / width;
        let words = c.depth.div_ceil(width);
        let (hp, wp) = conv.padded_size(h, w);
        let packed = if tapwise && packing == Packing::Quads {
            conv.padded_quads(x, [n, h, w], offset)
        } else if tapwise {
            // Pairs: packed straight from the input, row by row, into an image whose padding
            // words hold centered zeros.
            let [pad_y, pad_x] = conv.pad_before;
            let padding = packing.word(&[0; 4][..width], offset);
            let mut image = vec![padding; n * hp * wp * per_tap];
            for b in 0..n {
                for y in 0..h {
                    let from = (b * h + y) * w * cin;
                    let to = ((b * hp + y + pad_y) * wp + pad_x) * per_tap;
                    let (row, words) = (&x[from..from + w * cin], &mut image[to..to + w * per_tap]);
                    packing.pack(row, c.x_zero_point, offset, words);
                }
            }
            image
        } else if packing == Packing::Quads {
            // A quadruple's bytes are the input's own bytes transformed (`x - x_zp + offset`), so
            // each pixel's receptive field is gathered as bytes, one run of `kw * cin` per kernel
            // row without dilation, from an image padded with centered zeros (`offset`), straight
            // into the words (little-endian, as `Packing::word` makes them).
            //
            // A run of at most 16 bytes (an RGB 3×3 kernel's is 9) is copied as one 16-byte block,
            // where a `memcpy` call per run had made the gathering cost more than the products.
            // A block's overrun is written over by the next run or field, and the last one's lands
            // in 16 bytes of slack; it may be left in a field's last word, past its depth, where
            // every weight is 0.
            let zero = offset as u8;
            let mut image = conv.padded_bytes(x, n, h, w, offset);
            image.resize(image.len() + 16, zero);
            let run = kw * cin;
            let blocks = dx == 1 && run <= 16;
            let field = words * 4;
            let mut gathered = vec![Packing::Quads.word(&[0; 4], offset); n * oh * ow * words + 4];
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut gathered);
            let mut at = 0;
            for b in 0..n {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ky in 0..kh {
                            let from = ((b * hp + oy * sy + ky * dy) * wp + ox * sx) * cin;
                            let to = at + ky * run;
                            if blocks {
                                let block: [u8; 16] =
                                    image[from..from + 16].try_into().expect("16 bytes");
                                bytes[to..to + 16].copy_from_slice(&block);
                            } else if dx == 1 {
                                bytes[to..to + run].copy_from_slice(&image[from..from + run]);
                            } else {
                                let to = bytes[to..to + run].chunks_exact_mut(cin);
                                for (kx, to) in to.enumerate() {
                                    to.copy_from_slice(&image[from + kx * dx * cin..][..cin]);
                                }
                            }
                        }
                        at += field;
                    }
                }
            }
            gathered
        } else {
            // Pairs of a channel count that 2 does not divide.
            let padded = conv.centered_padded(x, n, h, w);
            // Each output pixel's receptive field (one run of `kw * cin` values per kernel row
            // without dilation), packed.
            let run = (kw - 1) * dx + 1;
            let mut fields = vec![0i32; n * oh * ow * words];
            let mut field = vec![0i32; c.depth];
            let mut rows = fields.chunks_exact_mut(words);
            for b in 0..n {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ky in 0..kh {
                            let from = ((b * hp + oy * sy + ky * dy) * wp + ox * sx) * cin;
                            let row = &padded[from..from + run * cin];
                            let to = &mut field[ky * kw * cin..(ky + 1) * kw * cin];
                            if dx == 1 {
                                to.copy_from_slice(row);
                            } else {
                                for (kx, to) in to.chunks_exact_mut(cin).enumerate() {
                                    to.copy_from_slice(&row[kx * dx * cin..][..cin]);
                                }
                            }
                        }
                        let row = rows.next().expect("one row per output pixel");
                        packing.pack(&field, 0, offset, row);
                    }
                }
            }
            fields
        };
        for b in 0..n {
            for oy in 0..oh {
                let mut ox = 0;
                while ox < ow {
                    // Pixel (b, oy, ox)'s segments, and the distance to the next pixel's words.
                    segments.clear();
                    let step = if tapwise {
                        for ky in 0..kh {
                            let row = (b * hp + oy * sy + ky * dy) * wp;
                            if dx == 1 {
                                // A kernel row's taps are adjacent pixels: one segment. (Per tap,
                                // a layer of 16 channels had segments of 4 words, and their setup
                                // cost as much as their products.)
                                let at = (row + ox * sx) * per_tap;
                                segments.push((ky * kw * per_tap, at, kw * per_tap));
                                continue;
                            }
                            for kx in 0..kw {
                                let at = (row + ox * sx + kx * dx) * per_tap;
                                segments.push(((ky * kw + kx) * per_tap, at, per_tap));
                            }
                        }
                        sx * per_tap
                    } else {
                        segments.push((0, ((b * oh + oy) * ow + ox) * words, words));
                        words
                    };
                    let at = ((b * oh + oy) * ow + ox) * c.outputs;
                    let target = Target::at(&mut bytes, &mut out, at);
                    ox += c.accumulate_pixels(packing, target, &segments, step, &packed, ow - ox);
                }
            }
        }
        out
    }
}

impl Op for QConv {
    fn name(&self) -> StaticName {
        "QConv".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for QConv {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        let shape = inputs[0].shape();
        ensure!(
            shape.len() == 4 && shape[3] == self.in_channels,
            "QConv takes NHWC with {} channels, got {shape:?}",
            self.in_channels
        );
        let [oh, ow] = self.out_hw;
        Ok((
            self.output.dt,
            tvec![shape[0], oh, ow, self.channels.outputs],
        ))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let input = inputs[0];
        let &[n, h, w, _] = input.shape() else {
            bail!("QConv takes NHWC, got {:?}", input.shape());
        };
        let channel_wise = self.groups == self.in_channels
            && self.channels.outputs == self.in_channels
            && self.channels.weight_zero_points.is_none();
        #[cfg(target_arch = "x86_64")]
        if channel_wise && self.depthwise_avx512(input, [n, h, w], out)? {
            return Ok(());
        }
        let dt = input.datum_type().unquantized();
        let offset = self.channels.quad_offset(dt);
        let packing = (self.groups == 1)
            .then(|| self.channels.packing_for(dt, offset))
            .flatten();
        let quads = !channel_wise && packing == Some(Packing::Quads);
        let requantized = quads
            .then(|| Requantized::new(&self.channels, offset, &self.output))
            .flatten();
        // 8-bit values are read in place.
        let bytes = input.as_bytes();
        (self.output).produce_into(out, &self.channels, requantized.as_ref(), |to| {
            Ok(match (channel_wise, dt, packing) {
                (true, DatumType::I8, _) => depthwise(self, bytemuck_i8(bytes), n, h, w),
                (true, DatumType::U8, _) => depthwise(self, bytes, n, h, w),
                (true, _, _) => depthwise(self, &widen(input)?, n, h, w),
                (false, DatumType::I8, Some(packing)) => {
                    paired_conv(self, bytemuck_i8(bytes), [n, h, w], packing, offset, to)
                }
                (false, DatumType::U8, Some(packing)) => {
                    paired_conv(self, bytes, [n, h, w], packing, offset, to)
                }
                (false, DatumType::I8, None) => grouped(self, bytemuck_i8(bytes), n, h, w),
                (false, DatumType::U8, None) => grouped(self, bytes, n, h, w),
                (false, _, _) => grouped(self, &widen(input)?, n, h, w),
            })
        })
    }
}

/// The output fact of an NHWC op (`name`) from `input`: its batch, `out_hw`, `channels`.
fn nhwc_fact(
    dt: DatumType,
    input: &TypedFact,
    [oh, ow]: [usize; 2],
    channels: TDim,
    name: &str,
) -> TractResult<TVec<TypedFact>> {
    let s = &input.shape;
    ensure!(s.len() == 4, "{name} takes NHWC");
    Ok(tvec!(dt.fact([
        s[0].clone(),
        oh.to_dim(),
        ow.to_dim(),
        channels
    ])))
}

impl TypedOp for QConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let channels = self.channels.outputs.to_dim();
        nhwc_fact(self.output.dt, inputs[0], self.out_hw, channels, "QConv")
    }
    as_op!();
}

/// The quantization of one element-wise operand: zero point and scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Operand {
    pub zero_point: i32,
    pub scale: f32,
}

/// Broadcasts two raw operand tensors to a common shape (numpy rules), widened to i32.
fn broadcast_pair(a: &Tensor, b: &Tensor) -> TractResult<(ArrayD<i32>, ArrayD<i32>)> {
    let a = ArrayD::from_shape_vec(IxDyn(a.shape()), widen_i32(a)?)?;
    let b = ArrayD::from_shape_vec(IxDyn(b.shape()), widen_i32(b)?)?;
    let rank = a.ndim().max(b.ndim());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (sa, sb) = (pad(a.shape()), pad(b.shape()));
    let shape: Vec<usize> = sa.iter().zip(&sb).map(|(&x, &y)| x.max(y)).collect();
    let a = a
        .into_shape_with_order(sa)?
        .broadcast(IxDyn(&shape))
        .context("operands do not broadcast")?
        .to_owned();
    let b = b
        .into_shape_with_order(sb)?
        .broadcast(IxDyn(&shape))
        .context("operands do not broadcast")?
        .to_owned();
    Ok((a, b))
}

/// TFLite's int8 ADD (and SUB): both inputs rescaled to a shared fixed-point scale with a left
/// shift of 20 bits, added, and rescaled to the output.
///
/// Computed per element rather than looked up in 256-entry tables per input: the same multiplier
/// for every element makes the loop vectorize, where the lookups kept it scalar.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct QAdd {
    /// Each input's zero point and multiplier to the shared scale.
    a: (i32, Multiplier),
    b: (i32, Multiplier),
    out: Multiplier,
    subtract: bool,
    pub output: IntOutput,
}

/// The left shift TFLite's ADD gives its inputs before rescaling them to the shared scale.
const ADD_LEFT_SHIFT: i32 = 20;

impl QAdd {
    pub(crate) fn new(
        a: Operand,
        b: Operand,
        y_scale: f32,
        subtract: bool,
        output: IntOutput,
    ) -> Self {
        let twice_max = 2.0 * f64::from(a.scale.max(b.scale));
        let side = |op: Operand| {
            (
                op.zero_point,
                Multiplier::new(f64::from(op.scale) / twice_max),
            )
        };
        QAdd {
            a: side(a),
            b: side(b),
            out: Multiplier::new(
                twice_max / (f64::from(1u32 << ADD_LEFT_SHIFT) * f64::from(y_scale)),
            ),
            subtract,
            output,
        }
    }

    /// One output value from two input values, before the clamp.
    #[inline(always)]
    fn combine(&self, x: i32, y: i32) -> i32 {
        let x = self.a.1.apply((x - self.a.0) << ADD_LEFT_SHIFT);
        let y = self.b.1.apply((y - self.b.0) << ADD_LEFT_SHIFT);
        let sum = if self.subtract { x - y } else { x + y };
        self.out.apply(sum) + self.output.zero_point
    }
}

/// [`QAdd`] over two equally long runs of input values, clamped and stored as the output type.
/// Compiled for AVX-512, AVX2 and SSE4.1 too, chosen at run time. On a CPU with AVX-512, inputs of
/// the same shape take [`avx512::add`] instead (which comes back here for a last few values, and
/// for all of them where a zero point is beyond its reach).
#[multiversion(targets(
    "x86_64+avx2+avx512f+avx512bw+avx512vl",
    "x86_64+avx2",
    "x86_64+sse4.1"
))]
fn add<A: Copy + Into<i32>, B: Copy + Into<i32>, T: Narrow>(
    op: &QAdd,
    a: &[A],
    b: &[B],
    out: &mut [T],
) {
    let (min, max) = (op.output.min, op.output.max);
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = T::narrow(op.combine(x.into(), y.into()).clamp(min, max));
    }
}

impl QAdd {
    /// The sum (or difference) of `a` and `b`, of the same shape or broadcast, into `out` (as
    /// many values as the broadcast shape holds).
    fn write<T: Narrow>(&self, a: &Tensor, b: &Tensor, out: &mut [T]) -> TractResult<()> {
        if a.shape() != b.shape() {
            let (xa, xb) = broadcast_pair(a, b)?;
            let (xa, xb) = (xa.as_slice(), xb.as_slice());
            add(
                self,
                xa.context("broadcast operand")?,
                xb.context("broadcast operand")?,
                out,
            );
            return Ok(());
        }
        // The common case (residual connections): no broadcasting, straight over the bytes.
        let (xa, xb) = (a.as_bytes(), b.as_bytes());
        let signed = |t: &Tensor| t.datum_type().unquantized() == DatumType::I8;
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: AVX-512F, BW and VL are available (checked just above).
            #[allow(unsafe_code)]
            unsafe {
                match (signed(a), signed(b)) {
                    (true, true) => avx512::add::<true, true, T>(self, xa, xb, out),
                    (true, false) => avx512::add::<true, false, T>(self, xa, xb, out),
                    (false, true) => avx512::add::<false, true, T>(self, xa, xb, out),
                    (false, false) => avx512::add::<false, false, T>(self, xa, xb, out),
                }
            }
            return Ok(());
        }
        add_bytes(self, (xa, signed(a)), (xb, signed(b)), out);
        Ok(())
    }
}

/// [`add`] over two runs of 8-bit values, each signed or not.
fn add_bytes<T: Narrow>(op: &QAdd, (a, sa): (&[u8], bool), (b, sb): (&[u8], bool), out: &mut [T]) {
    match (sa, sb) {
        (true, true) => add(op, bytemuck_i8(a), bytemuck_i8(b), out),
        (true, false) => add(op, bytemuck_i8(a), b, out),
        (false, true) => add(op, a, bytemuck_i8(b), out),
        (false, false) => add(op, a, b, out),
    }
}

impl Op for QAdd {
    fn name(&self) -> StaticName {
        if self.subtract {
            "QSub".into()
        } else {
            "QAdd".into()
        }
    }
    op_as_typed_op!();
}

impl EvalOp for QAdd {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for QAdd {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        let (a, b) = (inputs[0], inputs[1]);
        ensure!(
            matches!(a.datum_type().unquantized(), DatumType::I8 | DatumType::U8)
                && matches!(b.datum_type().unquantized(), DatumType::I8 | DatumType::U8),
            "QAdd takes 8-bit inputs"
        );
        let shape = tract_core::broadcast::multi_broadcast(&[a.shape(), b.shape()])
            .context("operands do not broadcast")?;
        Ok((self.output.dt, shape))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let (a, b) = (inputs[0], inputs[1]);
        let mut view = out.try_as_plain_ram_mut()?;
        match self.output.dt {
            DatumType::I8 => self.write(a, b, view.as_slice_mut::<i8>()?),
            DatumType::U8 => self.write(a, b, view.as_slice_mut::<u8>()?),
            DatumType::I16 => self.write(a, b, view.as_slice_mut::<i16>()?),
            dt => bail!("unsupported integer output {dt:?}"),
        }
    }
}

impl TypedOp for QAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape =
            tract_core::broadcast::multi_broadcast(&[&*inputs[0].shape, &*inputs[1].shape])?;
        Ok(tvec!(self.output.dt.fact(shape)))
    }
    as_op!();
}

/// TFLite's 8-bit AVERAGE_POOL_2D, input and output encoded alike (as TFLite requires): per
/// channel, the sum of the window's stored values that lie inside the input, divided by their
/// count with ties away from zero (TFLite's reference integer kernel, bit for bit), clamped to
/// the fused activation's range.
///
/// Replaces pooling in `f32` (a cast, tract's sum pool and a rounding pass), which took a tenth
/// of keyword spotting's time for its one global average (2026-11-24, `--profile`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct QAvgPool {
    /// The input's height and width, which `out_hw` and `pad_before` were computed for.
    pub input_hw: [usize; 2],
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// Rows and columns of padding before the input (SAME), which windows do not count.
    pub pad_before: [usize; 2],
    pub out_hw: [usize; 2],
    pub output: IntOutput,
}

impl QAvgPool {
    /// The pooling of an `input_hw` input, its output size and padding derived as TFLite derives
    /// them (SAME or VALID).
    pub(crate) fn new(
        input_hw: [usize; 2],
        kernel: [usize; 2],
        strides: [usize; 2],
        same: bool,
        output: IntOutput,
    ) -> Self {
        let [(oh, pad_h), (ow, pad_w)] = [0, 1]
            .map(|axis| QConv::geometry(input_hw[axis], kernel[axis], strides[axis], 1, same));
        QAvgPool {
            input_hw,
            kernel,
            strides,
            pad_before: [pad_h, pad_w],
            out_hw: [oh, ow],
            output,
        }
    }

    /// The input rows (or columns) window `out` covers along `axis` of an input `size` long.
    fn window(&self, axis: usize, out: usize, size: usize) -> std::ops::Range<usize> {
        let start = out * self.strides[axis];
        let end = (start + self.kernel[axis]).saturating_sub(self.pad_before[axis]);
        start.saturating_sub(self.pad_before[axis]).min(size)..end.min(size)
    }

    fn pool<T: Copy + Into<i32> + Narrow>(&self, x: &[T], [n, h, w, c]: [usize; 4], out: &mut [T]) {
        let [oh, ow] = self.out_hw;
        if c == 0 {
            return; // No channels, so no values.
        }
        let mut sums = vec![0i32; c];
        let mut rows = out.chunks_exact_mut(c);
        for b in 0..n {
            for oy in 0..oh {
                let ys = self.window(0, oy, h);
                for ox in 0..ow {
                    let xs = self.window(1, ox, w);
                    sums.fill(0);
                    for y in ys.clone() {
                        let from = ((b * h + y) * w + xs.start) * c;
                        let pixels = &x[from..from + xs.len() * c];
                        for pixel in pixels.chunks_exact(c) {
                            for (s, &v) in sums.iter_mut().zip(pixel) {
                                *s += v.into();
                            }
                        }
                    }
                    let count = (ys.len() * xs.len()) as i32;
                    let row = rows.next().expect("one output row per pixel");
                    for (o, &sum) in row.iter_mut().zip(&sums) {
                        let average = rounded_average(sum, count);
                        *o = T::narrow(average.clamp(self.output.min, self.output.max));
                    }
                }
            }
        }
    }
}

/// `sum / count` with ties away from zero, as TFLite's integer AVERAGE_POOL_2D rounds: `(sum ±
/// count / 2) / count`, the division truncating. A window with nothing inside the input (only
/// possible with more padding than TFLite makes) averages to 0.
fn rounded_average(sum: i32, count: i32) -> i32 {
    if count == 0 {
        return 0;
    }
    let half = count / 2;
    if sum > 0 {
        (sum + half) / count
    } else {
        (sum - half) / count
    }
}

impl Op for QAvgPool {
    fn name(&self) -> StaticName {
        "QAvgPool".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QAvgPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for QAvgPool {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        let x = inputs[0];
        let &[n, h, w, c] = x.shape() else {
            bail!("QAvgPool takes NHWC, got {:?}", x.shape());
        };
        ensure!(
            [h, w] == self.input_hw,
            "QAvgPool was built for {:?} inputs, got {h}x{w}",
            self.input_hw
        );
        ensure!(
            x.datum_type().unquantized() == self.output.dt,
            "QAvgPool keeps its input type {:?}",
            self.output.dt
        );
        let [oh, ow] = self.out_hw;
        Ok((self.output.dt, tvec![n, oh, ow, c]))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let x = inputs[0];
        let &[n, h, w, c] = x.shape() else {
            bail!("QAvgPool takes NHWC, got {:?}", x.shape());
        };
        let mut view = out.try_as_plain_ram_mut()?;
        let bytes = x.as_bytes();
        match self.output.dt {
            DatumType::I8 => {
                self.pool(bytemuck_i8(bytes), [n, h, w, c], view.as_slice_mut::<i8>()?)
            }
            DatumType::U8 => self.pool(bytes, [n, h, w, c], view.as_slice_mut::<u8>()?),
            dt => bail!("QAvgPool takes 8-bit values, not {dt:?}"),
        }
        Ok(())
    }
}

impl TypedOp for QAvgPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let channels = inputs[0].shape.get(3).cloned().unwrap_or_default();
        nhwc_fact(self.output.dt, inputs[0], self.out_hw, channels, "QAvgPool")
    }
    as_op!();
}

/// TFLite's int8 MUL: `(x - zx) * (y - zy)` requantized by `sx * sy / s_out`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct QMul {
    a_zero_point: i32,
    b_zero_point: i32,
    multiplier: Multiplier,
    pub output: IntOutput,
}

impl QMul {
    pub(crate) fn new(a: Operand, b: Operand, y_scale: f32, output: IntOutput) -> Self {
        QMul {
            a_zero_point: a.zero_point,
            b_zero_point: b.zero_point,
            multiplier: Multiplier::new(
                f64::from(a.scale) * f64::from(b.scale) / f64::from(y_scale),
            ),
            output,
        }
    }
}

impl Op for QMul {
    fn name(&self) -> StaticName {
        "QMul".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for QMul {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        let shape = tract_core::broadcast::multi_broadcast(&[inputs[0].shape(), inputs[1].shape()])
            .context("operands do not broadcast")?;
        Ok((self.output.dt, shape))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let (a, b) = broadcast_pair(inputs[0], inputs[1])?;
        let values = a
            .iter()
            .zip(b.iter())
            .map(|(&x, &y)| {
                self.multiplier
                    .apply((x - self.a_zero_point) * (y - self.b_zero_point))
                    + self.output.zero_point
            })
            .collect::<Vec<_>>();
        self.output.store_into(&values, out, None)
    }
}

impl TypedOp for QMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape =
            tract_core::broadcast::multi_broadcast(&[&*inputs[0].shape, &*inputs[1].shape])?;
        Ok(tvec!(self.output.dt.fact(shape)))
    }
    as_op!();
}

/// Whether this CPU has AVX2 (checked once, then cached by the standard library).
#[inline(always)]
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has the AVX-512 foundation, byte/word and vector-length instructions (checked
/// once, then cached by the standard library).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Whether this CPU has AVX-512 VNNI (with the AVX-512 foundation and byte/word instructions it
/// needs), checked once, then cached by the standard library.
#[inline(always)]
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Requantization on AVX-512, 16 channels per register, written with intrinsics: compiled from
/// the portable loop, the narrowing store became `vpmovdb` to memory, which on this project's
/// AMD EPYC VM made the whole pass cost as much as a model's products (2026-11-24, `perf
/// annotate`); here values narrow in registers and are stored 64 bytes at a time.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Narrow;
    use std::arch::x86_64::*;

    /// [`super::store_fixed_point`] on AVX-512: the same arithmetic, bit for bit.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn store_fixed_point<T: Narrow>(
        acc: &[i32],
        out: &mut [T],
        (multiplier, left, right): (&[i32], &[u32], &[u32]),
        zero_point: i32,
        [min, max]: [i32; 2],
    ) {
        let tile = multiplier.len();
        if tile == 0 {
            return; // No channels, so no values.
        }
        let constants = Constants::new(zero_point, [min, max]);
        for (acc, out) in acc.chunks(tile).zip(out.chunks_mut(tile)) {
            let whole = acc.len() - acc.len() % 16;
            // Values `i..i + 16`, requantized.
            let requantized = |i: usize| {
                let load = |v: &[i32]| {
                    let lanes: &[i32; 16] = v[i..i + 16].try_into().expect("16 lanes");
                    // SAFETY: `lanes` is 16 readable i32, 64 bytes; unaligned load.
                    unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
                };
                let as_i32 = |v: &[u32]| {
                    let lanes: &[u32; 16] = v[i..i + 16].try_into().expect("16 lanes");
                    // SAFETY: as above.
                    unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
                };
                let (m, l, r) = (load(multiplier), as_i32(left), as_i32(right));
                requantize(load(acc), m, l, r, &constants)
            };
            let mut i = 0;
            while whole - i >= 64 {
                let y = [0, 16, 32, 48].map(|j| requantized(i + j));
                store_64::<T>(&mut out[i..i + 64], y);
                i += 64;
            }
            while i < whole {
                store_16::<T>(&mut out[i..i + 16], requantized(i));
                i += 16;
            }
            // The tile's last channels, fewer than 16 (only where it is not a multiple of 16).
            let rest = (&multiplier[whole..], &left[whole..], &right[whole..]);
            let (acc, out) = (&acc[whole..], &mut out[whole..]);
            super::store_fixed_point(acc, out, rest, zero_point, [min, max]);
        }
    }

    /// The output encoding's constants, one per lane.
    pub(super) struct Constants {
        zero_point: __m512i,
        min: __m512i,
        max: __m512i,
    }

    impl Constants {
        /// The output's zero point and clamp range.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(super) fn new(zero_point: i32, [min, max]: [i32; 2]) -> Self {
            Constants {
                zero_point: _mm512_set1_epi32(zero_point),
                min: _mm512_set1_epi32(min),
                max: _mm512_set1_epi32(max),
            }
        }
    }

    /// The lanes of channels `c..c + 16` that exist where a layer has `channels`.
    #[inline(always)]
    fn lanes(c: usize, channels: usize) -> (__mmask16, usize) {
        let len = (channels - c).min(16);
        (((1u32 << len) - 1) as __mmask16, len)
    }

    /// `len` (at most 16) `i32` of `values` from `at`, the other lanes 0.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn load_i32(values: &[i32], at: usize, (mask, len): (__mmask16, usize)) -> __m512i {
        let lanes = &values[at..at + len];
        // SAFETY: `lanes` is `len` readable i32, and `mask` selects the first `len` lanes only
        // (masked-off lanes are not read and cannot fault).
        #[allow(unsafe_code)]
        unsafe {
            _mm512_maskz_loadu_epi32(mask, lanes.as_ptr())
        }
    }

    /// A depthwise convolution with multiplier 1 over an 8-bit input padded with its own zero
    /// point, for [`Depthwise::run`].
    pub(super) struct Depthwise<'a> {
        /// The padded input's raw bytes.
        pub padded: &'a [u8],
        /// Output images, rows and columns.
        pub pixels: [usize; 3],
        /// How far apart in `padded` the first inputs of consecutive images, output rows and
        /// output columns are.
        pub steps: [usize; 3],
        /// The taps' offsets from a pixel's first input (at most [`MAX_TAPS`]).
        pub taps: &'a [usize],
        pub channels: usize,
        /// `[taps][channels]`.
        pub weights: &'a [i32],
        /// The bias, less `x_zp · Σ_k w[k][c]`: that makes up for the input's not being centered.
        pub bias: &'a [i32],
        /// [`super::Requantization::FixedPoint`]'s multipliers, left and right shifts.
        pub tiles: (&'a [i32], &'a [u32], &'a [u32]),
        /// The output's zero point, minimum and maximum.
        pub output: [i32; 3],
    }

    /// [`Depthwise::held`]: a block's taps and, in registers, its weights, bias (`start`),
    /// multipliers and left and right shifts.
    struct Held<const K: usize> {
        taps: [usize; K],
        w: [__m512i; K],
        start: __m512i,
        m: __m512i,
        l: __m512i,
        r: __m512i,
    }

    impl Depthwise<'_> {
        /// The layer, requantized in registers and stored as bytes in `out` (`[pixels][channels]`;
        /// the input sign-extended where `SIGNED`). Channels go 16 per register (the last block
        /// masked), and each block runs over every pixel with its weights, bias and multipliers
        /// held in registers.
        #[allow(unsafe_code)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        pub(super) unsafe fn run<const SIGNED: bool, T: Narrow>(&self, out: &mut [T]) {
            let (channels, taps) = (self.channels, self.taps);
            assert_eq!(size_of::<T>(), 1, "8-bit outputs");
            assert!(taps.len() <= MAX_TAPS, "at most {MAX_TAPS} taps");
            let pixels: usize = self.pixels.iter().product();
            assert_eq!(out.len(), pixels * channels, "one row per pixel");
            if pixels == 0 {
                return;
            }
            // Every tap of every pixel, all its channels, lies inside `padded`: checked once here,
            // for the last pixel and the furthest tap, so that the loads of `block` need no check
            // each.
            let last = (self.pixels.iter().zip(self.steps))
                .try_fold(0usize, |sum, (&count, step)| {
                    sum.checked_add((count - 1).checked_mul(step)?)
                });
            let furthest = taps.iter().copied().max().unwrap_or(0);
            let reach = last.and_then(|last| last.checked_add(furthest)?.checked_add(channels));
            assert!(
                reach.is_some_and(|reach| reach <= self.padded.len()),
                "every tap inside the padded input"
            );
            let [zero_point, min, max] = self.output;
            let constants = Constants::new(zero_point, [min, max]);
            if channels == 8 && taps.len() <= 9 {
                // SAFETY: as for `block` below.
                unsafe { self.pairs::<SIGNED, T>(&constants, out) };
                return;
            }
            for c in (0..channels).step_by(16) {
                // SAFETY: the taps lie inside `padded` (asserted above); AVX-512 as for `run`.
                unsafe {
                    if taps.len() <= 9 {
                        self.block::<9, SIGNED, T>(c, &constants, out);
                    } else {
                        self.block::<MAX_TAPS, SIGNED, T>(c, &constants, out);
                    }
                }
            }
        }

        /// What a block of channels `c..` (`lanes` of them) keeps in registers over every pixel:
        /// its taps' offsets, and its weights, bias and multipliers passed through `spread`. Taps
        /// beyond the layer's are offset 0 with weight 0.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        fn held<const K: usize>(
            &self,
            c: usize,
            lanes: (__mmask16, usize),
            spread: impl Fn(__m512i) -> __m512i,
        ) -> Held<K> {
            let mut taps = [0usize; K];
            let mut w = [_mm512_setzero_si512(); K];
            for (k, (&tap, (t, w))) in self
                .taps
                .iter()
                .zip(taps.iter_mut().zip(&mut w))
                .enumerate()
            {
                *t = tap + c;
                *w = spread(load_i32(self.weights, k * self.channels + c, lanes));
            }
            let (multiplier, left, right) = self.tiles;
            Held {
                taps,
                w,
                start: spread(load_i32(self.bias, c, lanes)),
                m: spread(load_i32(multiplier, c, lanes)),
                l: spread(load_i32(bytemuck_u32(left), c, lanes)),
                r: spread(load_i32(bytemuck_u32(right), c, lanes)),
            }
        }

        /// An 8-channel layer (a MobileNet's first depthwise one), two pixels per register: a
        /// pixel's channels in the low 8 lanes and the next pixel's in the high 8, where one
        /// pixel alone would leave half of every register idle. Up to 9 taps.
        ///
        /// # Safety
        /// As for [`Depthwise::block`].
        #[allow(unsafe_code)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn pairs<const SIGNED: bool, T: Narrow>(
            &self,
            constants: &Constants,
            out: &mut [T],
        ) {
            let half = lanes(0, 8);
            // Lanes 0..8 repeated in lanes 8..16 (128-bit blocks 0, 1, 0, 1).
            let both = |v: __m512i| _mm512_shuffle_i64x2::<0b01_00_01_00>(v, v);
            let Held {
                taps,
                w,
                start,
                m,
                l,
                r,
            } = self.held::<9>(0, half, both);
            let [images, rows, columns] = self.pixels;
            let [image, row, column] = self.steps;
            // The next pixel's outputs in `out`.
            let mut o = 0;
            for first in (0..images).flat_map(|b| (0..rows).map(move |y| b * image + y * row)) {
                let mut base = first;
                let mut left_in_row = columns;
                while left_in_row > 0 {
                    // Two pixels, or a row's odd last one alone.
                    let two = left_in_row >= 2;
                    let pixels = if two { 2 } else { 1 };
                    let out = &mut out[o..o + 8 * pixels];
                    // Opaque, for the reason `block` gives.
                    let at = std::hint::black_box(base);
                    let mut acc = start;
                    for (&tap, &w) in taps.iter().zip(&w) {
                        // SAFETY: the caller's promise: 8 bytes at `at + tap`, and at
                        // `at + column + tap` for a second pixel, lie in `padded`.
                        let x = unsafe {
                            let first = self.padded.as_ptr().add(at + tap);
                            let low = _mm_loadl_epi64(first.cast());
                            if two {
                                let second = _mm_loadl_epi64(first.add(column).cast());
                                _mm_unpacklo_epi64(low, second)
                            } else {
                                low
                            }
                        };
                        let x = if SIGNED {
                            _mm512_cvtepi8_epi32(x)
                        } else {
                            _mm512_cvtepu8_epi32(x)
                        };
                        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(x, w));
                    }
                    let y = narrow_bytes(requantize(acc, m, l, r, constants));
                    let mask = if two { u16::MAX } else { half.0 };
                    // SAFETY: `out` is as many writable bytes (`T` is one byte) as `mask` selects.
                    unsafe { _mm_mask_storeu_epi8(out.as_mut_ptr().cast(), mask, y) };
                    o += 8 * pixels;
                    base += pixels * column;
                    left_in_row -= pixels;
                }
            }
        }

        /// Channels `c..c + 16` of every pixel over `K` taps, the layer's and after them taps
        /// of weight 0 (so that a 3×3 kernel, the usual one, is unrolled whole).
        ///
        /// # Safety
        /// Every tap of every pixel lies inside `padded`, its channels included (as
        /// [`Depthwise::run`] asserts).
        #[allow(unsafe_code)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn block<const K: usize, const SIGNED: bool, T: Narrow>(
            &self,
            c: usize,
            constants: &Constants,
            out: &mut [T],
        ) {
            let channels = self.channels;
            let lanes = lanes(c, channels);
            let Held {
                taps,
                w,
                start,
                m,
                l,
                r,
            } = self.held::<K>(c, lanes, |v| v);
            let [images, rows, columns] = self.pixels;
            let [image, row, column] = self.steps;
            // Output rows of `out`, one per pixel, with each pixel's first input.
            let mut rows_out = out.chunks_exact_mut(channels);
            for first in (0..images).flat_map(|b| (0..rows).map(move |y| b * image + y * row)) {
                let mut base = first;
                for out in rows_out.by_ref().take(columns) {
                    // Opaque, so that the compiler adds the taps to it here rather than keep one
                    // pointer per tap and step each of them: those did not fit the registers,
                    // and stepping them in memory (18 read-modify-writes per pixel in `perf
                    // annotate`) cost more than the products.
                    let at = std::hint::black_box(base);
                    let mut acc = start;
                    for (&tap, &w) in taps.iter().zip(&w) {
                        // SAFETY: the caller's promise: `at + tap` and the `lanes` after it lie
                        // in `padded`.
                        let x = unsafe {
                            load_bytes::<SIGNED>(self.padded.as_ptr().add(at + tap), lanes)
                        };
                        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(x, w));
                    }
                    let y = narrow_bytes(requantize(acc, m, l, r, constants));
                    let to = &mut out[c..c + lanes.1];
                    // SAFETY: `to` is as many writable bytes (`T` is one byte) as `lanes` selects.
                    unsafe { _mm_mask_storeu_epi8(to.as_mut_ptr().cast(), lanes.0, y) };
                    base += column;
                }
            }
        }
    }

    /// The `lanes` bytes at `at` widened to `i32` (sign-extended where `SIGNED`), the other lanes
    /// 0: whole and half registers by plain loads, other counts masked.
    ///
    /// # Safety
    /// `at` and the bytes `lanes` counts after it are readable.
    #[allow(unsafe_code)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_bytes<const SIGNED: bool>(
        at: *const u8,
        (mask, len): (__mmask16, usize),
    ) -> __m512i {
        // SAFETY: the caller's promise; each load reads `len` bytes at most.
        let x = unsafe {
            match len {
                16 => _mm_loadu_si128(at.cast()),
                8 => _mm_loadl_epi64(at.cast()),
                _ => _mm_maskz_loadu_epi8(mask, at.cast()),
            }
        };
        if SIGNED {
            _mm512_cvtepi8_epi32(x)
        } else {
            _mm512_cvtepu8_epi32(x)
        }
    }

    /// The most kernel taps [`Depthwise`] takes (a 5×5 kernel), whose weights it holds in
    /// registers; larger kernels take the portable path.
    pub(super) const MAX_TAPS: usize = 25;

    /// Shift counts as the `i32` lanes the shift instructions read (all below 32).
    #[inline(always)]
    pub(super) fn bytemuck_u32(values: &[u32]) -> &[i32] {
        bytemuck::cast_slice(values)
    }

    /// 16 values within `0..=255` or `-128..=127`, as the 16 bytes of a register (two's
    /// complement for negative ones): by packing, not `vpmovdb`, whose store to memory is the
    /// slow instruction this module avoids.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn narrow_bytes(y: __m512i) -> __m128i {
        let y = _mm512_and_si512(y, _mm512_set1_epi32(0xFF));
        let words = _mm512_packus_epi32(y, y);
        // Each 128-bit lane now holds its four values' bytes in its first 32 bits (repeated).
        let bytes = _mm512_packus_epi16(words, words);
        let first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castsi512_si128(_mm512_permutexvar_epi32(first, bytes))
    }

    /// 16 accumulators requantized ([`super::Multiplier::apply`]), plus the zero point, clamped.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn requantize(
        acc: __m512i,
        multiplier: __m512i,
        left: __m512i,
        right: __m512i,
        c: &Constants,
    ) -> __m512i {
        let y = multiply(acc, multiplier, left, right);
        let y = _mm512_add_epi32(y, c.zero_point);
        _mm512_max_epi32(_mm512_min_epi32(y, c.max), c.min)
    }

    /// [`super::Multiplier::apply`] on 16 lanes, each with its own multiplier and shifts.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn multiply(x: __m512i, multiplier: __m512i, left: __m512i, right: __m512i) -> __m512i {
        let x = _mm512_sllv_epi32(x, left);
        // The rounding doubling high multiply, `(x·m + 2^30) >> 31`, on the even lanes and on the
        // odd ones (moved down) as 64-bit products; the even results are taken from their low
        // halves, the odd ones from their high halves, after a shift by one instead of 31.
        let nudge = _mm512_set1_epi64(1 << 30);
        let even = _mm512_add_epi64(_mm512_mul_epi32(x, multiplier), nudge);
        let odd = _mm512_mul_epi32(_mm512_srli_epi64(x, 32), _mm512_srli_epi64(multiplier, 32));
        let odd = _mm512_slli_epi64(_mm512_add_epi64(odd, nudge), 1);
        let high = _mm512_mask_blend_epi32(0xAAAA, _mm512_srai_epi64(even, 31), odd);
        // The rounding right shift: ties away from zero.
        let one = _mm512_set1_epi32(1);
        let mask = _mm512_sub_epi32(_mm512_sllv_epi32(one, right), one);
        let remainder = _mm512_and_si512(high, mask);
        let threshold = _mm512_add_epi32(_mm512_srai_epi32(mask, 1), _mm512_srli_epi32(high, 31));
        let shifted = _mm512_srav_epi32(high, right);
        let up = _mm512_cmpgt_epi32_mask(remainder, threshold);
        _mm512_mask_add_epi32(shifted, up, shifted, one)
    }

    /// One 8-bit input of [`super::QAdd`] brought to TFLite's shared scale,
    /// `multiplier.apply((x - zero_point) << 20)`, bit for bit in 11 instructions where the
    /// general [`multiply`] takes 21: the input is small enough for 32-bit products.
    struct Rescale {
        zero_point: __m512i,
        /// The multiplier `m` as `high · 2^11 + low`.
        high: __m512i,
        low: __m512i,
        /// `2^(right - 1)`, or 0 where the right shift is 0.
        half: __m512i,
        /// The right shift; and 31 to take the sign bit for the rounding, or 32 (which shifts
        /// it out) where there is no rounding.
        right: __m128i,
        sign: __m128i,
    }

    impl Rescale {
        /// `None` where the fast form might not be exact: a zero point beyond ±255 (within it,
        /// `|x - zero point|` stays below the 2^10 the form needs) or a multiplier that shifts
        /// left (never the case for ADD's inputs, whose multipliers are at most 0.5).
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn new(zero_point: i32, m: super::Multiplier) -> Option<Self> {
            let (left, right) = m.shifts();
            if zero_point.unsigned_abs() > 255 || left > 0 || m.multiplier < 0 {
                return None;
            }
            Some(Rescale {
                zero_point: _mm512_set1_epi32(zero_point),
                high: _mm512_set1_epi32(m.multiplier >> 11),
                low: _mm512_set1_epi32(m.multiplier & 0x7FF),
                half: _mm512_set1_epi32(if right > 0 { 1 << (right - 1) } else { 0 }),
                right: _mm_cvtsi32_si128(right as i32),
                sign: _mm_cvtsi32_si128(if right > 0 { 31 } else { 32 }),
            })
        }

        /// 16 inputs (as `i32`) rescaled.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn apply(&self, x: __m512i) -> __m512i {
            let d = _mm512_sub_epi32(x, self.zero_point);
            // The high multiply of `d · 2^20` by `m`, `(d · 2^20 · m + 2^30) >> 31`, is
            // `(d · m + 2^10) >> 11`; with `m` split, each product fits 32 bits (|d| < 2^10).
            let low = _mm512_add_epi32(_mm512_mullo_epi32(d, self.low), _mm512_set1_epi32(1 << 10));
            let t = _mm512_add_epi32(
                _mm512_mullo_epi32(d, self.high),
                _mm512_srai_epi32::<11>(low),
            );
            // gemmlowp's rounding right shift (ties away from zero) is `(t + 2^(r-1) - [t < 0])
            // >> r` for r ≥ 1; `t` is below 2^30, so the sum cannot overflow.
            let negative = _mm512_srl_epi32(t, self.sign);
            let t = _mm512_sub_epi32(_mm512_add_epi32(t, self.half), negative);
            _mm512_sra_epi32(t, self.right)
        }
    }

    /// [`super::QAdd`]'s constants in registers.
    struct Add {
        a: Rescale,
        b: Rescale,
        /// The output multiplier, its left and its right shift, in every lane.
        out: [__m512i; 3],
        constants: Constants,
        subtract: bool,
    }

    impl Add {
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn new(op: &super::QAdd) -> Option<Self> {
            let (left, right) = op.out.shifts();
            Some(Add {
                a: Rescale::new(op.a.0, op.a.1)?,
                b: Rescale::new(op.b.0, op.b.1)?,
                out: [op.out.multiplier, left as i32, right as i32].map(|v| _mm512_set1_epi32(v)),
                constants: Constants::new(op.output.zero_point, [op.output.min, op.output.max]),
                subtract: op.subtract,
            })
        }

        /// Outputs `at..at + 16` from the inputs' bytes (signed where `SA` / `SB`), within the
        /// output's range.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn sixteen<const SA: bool, const SB: bool>(
            &self,
            a: &[u8],
            b: &[u8],
            at: usize,
        ) -> __m512i {
            let load = |bytes: &[u8], signed: bool| {
                let lanes: &[u8; 16] = bytes[at..at + 16].try_into().expect("16 lanes");
                // SAFETY: `lanes` is 16 readable bytes; unaligned load.
                #[allow(unsafe_code)]
                let x = unsafe { _mm_loadu_si128(lanes.as_ptr().cast()) };
                if signed {
                    _mm512_cvtepi8_epi32(x)
                } else {
                    _mm512_cvtepu8_epi32(x)
                }
            };
            let (x, y) = (self.a.apply(load(a, SA)), self.b.apply(load(b, SB)));
            let sum = if self.subtract {
                _mm512_sub_epi32(x, y)
            } else {
                _mm512_add_epi32(x, y)
            };
            let [m, left, right] = self.out;
            requantize(sum, m, left, right, &self.constants)
        }
    }

    /// [`super::QAdd`] over two equally long runs of 8-bit values (signed where `SA` / `SB`),
    /// clamped and stored as the output type: [`super::QAdd::combine`] bit for bit, 16 values per
    /// register and stored 64 at a time, with no intermediate buffer.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn add<const SA: bool, const SB: bool, T: Narrow>(
        op: &super::QAdd,
        a: &[u8],
        b: &[u8],
        out: &mut [T],
    ) {
        assert!(a.len() == b.len() && b.len() == out.len(), "equally long");
        let mut whole = 0;
        if let Some(add) = Add::new(op) {
            whole = out.len() - out.len() % 16;
            let mut i = 0;
            while whole - i >= 64 {
                let mut y = [_mm512_setzero_si512(); 4];
                for (j, y) in y.iter_mut().enumerate() {
                    *y = add.sixteen::<SA, SB>(a, b, i + 16 * j);
                }
                store_64::<T>(&mut out[i..i + 64], y);
                i += 64;
            }
            while i < whole {
                store_16::<T>(&mut out[i..i + 16], add.sixteen::<SA, SB>(a, b, i));
                i += 16;
            }
        }
        // The last values, fewer than 16 (or all of them, where the zero points are out of reach
        // of the fast form).
        super::add_bytes(op, (&a[whole..], SA), (&b[whole..], SB), &mut out[whole..]);
    }

    /// 64 values already within `T`'s range (four registers), narrowed in registers and stored
    /// 64 bytes at a time. (A register narrowed and stored alone compiles to `vpmovdb` to memory,
    /// the slow instruction this module avoids.)
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn store_64<T: Narrow>(out: &mut [T], y: [__m512i; 4]) {
        assert_eq!(out.len(), 64, "64 outputs");
        let bytes: *mut __m512i = out.as_mut_ptr().cast();
        #[allow(unsafe_code)]
        // SAFETY: `out` is 64 writable `T` of `size_of::<T>()` bytes each, and the stores write
        // as many bytes (1 × 64 or 2 × 64); unaligned stores.
        unsafe {
            match size_of::<T>() {
                1 => {
                    let mut v = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(y[0]));
                    v = _mm512_inserti32x4::<1>(v, _mm512_cvtepi32_epi8(y[1]));
                    v = _mm512_inserti32x4::<2>(v, _mm512_cvtepi32_epi8(y[2]));
                    v = _mm512_inserti32x4::<3>(v, _mm512_cvtepi32_epi8(y[3]));
                    _mm512_storeu_si512(bytes, v);
                }
                2 => {
                    for (k, pair) in y.chunks_exact(2).enumerate() {
                        let low = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(pair[0]));
                        let v = _mm512_inserti64x4::<1>(low, _mm512_cvtepi32_epi16(pair[1]));
                        _mm512_storeu_si512(bytes.add(k), v);
                    }
                }
                _ => unreachable!("outputs are 8- or 16-bit"),
            }
        }
    }

    /// 16 values within the `i16` range, as the 16 words of a register: by packing, as
    /// [`narrow_bytes`] does.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn narrow_words(y: __m512i) -> __m256i {
        // Each 128-bit lane now holds its four values' words in its first 64 bits (repeated).
        let words = _mm512_packs_epi32(y, y);
        let first = _mm512_setr_epi64(0, 2, 4, 6, 0, 0, 0, 0);
        _mm512_castsi512_si256(_mm512_permutexvar_epi64(first, words))
    }

    /// 16 values already within `T`'s range, narrowed and stored.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn store_16<T: Narrow>(out: &mut [T], y: __m512i) {
        assert_eq!(out.len(), 16, "16 outputs");
        #[allow(unsafe_code)]
        // SAFETY: `out` is 16 writable `T` of `size_of::<T>()` bytes each, as many as each store
        // writes; unaligned stores.
        unsafe {
            match size_of::<T>() {
                1 => _mm_storeu_si128(out.as_mut_ptr().cast(), narrow_bytes(y)),
                2 => _mm256_storeu_si256(out.as_mut_ptr().cast(), narrow_words(y)),
                _ => unreachable!("outputs are 8- or 16-bit"),
            }
        }
    }
}

/// Integer multiply-adds on AVX-512 VNNI: `vpdpbusd` multiplies four unsigned input bytes by four
/// signed weight bytes and adds the four products into an `i32` lane, four depth rows per
/// instruction over 16 outputs, where AVX2's `vpmaddwd` takes two rows over 8 outputs. XNNPACK
/// (LiteRT's CPU kernels) uses it where the CPU has it; with AVX2 pairs alone, the MLPerf Tiny
/// convolution models took 2.5–3.8× LiteRT's time on such a CPU (2026-11-24).
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::Target;
    use super::avx512::{Constants, bytemuck_u32, load_i32, narrow_bytes, requantize};
    use std::arch::x86_64::*;

    /// Adds `sum_b x[b] * w[4q + b][o]` for `P` pixels (rows of `outputs`, a multiple of 8) and
    /// every packed input word `x` of quadruple `q` (segments as in
    /// [`super::Channels::accumulate_pixels`]) to their accumulators, or from the bias into
    /// requantized bytes ([`Target`]), in register blocks of 64, 32, 16 and 8 outputs; `weights`
    /// is [`super::Channels`]' `weight_quads`.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn accumulate_pixels<const P: usize>(
        mut acc: Target,
        segments: &[(usize, usize, usize)],
        step: usize,
        input: &[i32],
        weights: &[i8],
        outputs: usize,
    ) {
        let mut start = 0;
        while outputs - start >= 64 {
            block::<4, P, 16>(&mut acc, start, segments, step, input, weights, outputs);
            start += 64;
        }
        if outputs - start >= 32 {
            block::<2, P, 16>(&mut acc, start, segments, step, input, weights, outputs);
            start += 32;
        }
        if outputs - start >= 16 {
            block::<1, P, 16>(&mut acc, start, segments, step, input, weights, outputs);
            start += 16;
        }
        if outputs - start >= 8 {
            block::<1, P, 8>(&mut acc, start, segments, step, input, weights, outputs);
        }
    }

    /// Outputs `start..start + LANES * V` of `P` pixels, in `V * P` of the 32 registers: `LANES`
    /// is 16, or 8 (the low half of one register, masked) for a last block of 8 outputs.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn block<const V: usize, const P: usize, const LANES: usize>(
        target: &mut Target,
        start: usize,
        segments: &[(usize, usize, usize)],
        step: usize,
        input: &[i32],
        weights: &[i8],
        outputs: usize,
    ) {
        assert!(
            LANES == 16 || (LANES == 8 && V == 1),
            "whole or half registers"
        );
        // The lanes, and the weight bytes (four per lane), a block reads and writes.
        let lane_mask = ((1u32 << LANES) - 1) as __mmask16;
        let byte_mask = u64::MAX >> (64 - 4 * LANES);
        let mut sums = [[_mm512_setzero_si512(); V]; P];
        for (p, pixel) in sums.iter_mut().enumerate() {
            for (j, sum) in pixel.iter_mut().enumerate() {
                let (values, at) = match target {
                    Target::Accumulators(acc) => (&acc[..], p * outputs + start + 16 * j),
                    Target::Bytes(_, r) => (&r.bias[..], start + 16 * j),
                };
                *sum = load_i32(values, at, (lane_mask, LANES));
            }
        }
        let mut xs: [&[i32]; P] = [&[]; P];
        let mut w = [_mm512_setzero_si512(); V];
        for &(first, offset, len) in segments {
            for (p, x) in xs.iter_mut().enumerate() {
                *x = &input[offset + p * step..][..len];
            }
            for i in 0..len {
                let row = ((first + i) * outputs + start) * 4;
                let row = &weights[row..row + 64 * (V - 1) + 4 * LANES];
                for (j, w) in w.iter_mut().enumerate() {
                    let bytes = &row[64 * j..64 * j + 4 * LANES];
                    // SAFETY: `bytes` is `4 * LANES` readable bytes, all the mask selects;
                    // unaligned load.
                    *w = unsafe { _mm512_maskz_loadu_epi8(byte_mask, bytes.as_ptr()) };
                }
                for (pixel, x) in sums.iter_mut().zip(&xs) {
                    let x = _mm512_set1_epi32(x[i]);
                    for (sum, &w) in pixel.iter_mut().zip(&w) {
                        *sum = _mm512_dpbusd_epi32(*sum, x, w);
                    }
                }
            }
        }
        match target {
            Target::Accumulators(acc) => {
                for (p, pixel) in sums.iter().enumerate() {
                    for (j, sum) in pixel.iter().enumerate() {
                        let at = p * outputs + start + 16 * j;
                        let lanes = &mut acc[at..at + LANES];
                        // SAFETY: `lanes` is `LANES` writable i32, all the mask selects;
                        // unaligned store.
                        unsafe { _mm512_mask_storeu_epi32(lanes.as_mut_ptr(), lane_mask, *sum) };
                    }
                }
            }
            Target::Bytes(out, r) => {
                // Through a small buffer: requantizing the registers where they are would have
                // the compiler keep them in memory across the loop above (measured: spills).
                let mut lanes = [[0i32; 64]; P];
                for (pixel, lanes) in sums.iter().zip(&mut lanes) {
                    for (sum, lanes) in pixel.iter().zip(lanes.chunks_exact_mut(16)) {
                        // SAFETY: `lanes` is 16 writable i32; unaligned store.
                        unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), *sum) };
                    }
                }
                let [zero_point, min, max] = r.output;
                let constants = Constants::new(zero_point, [min, max]);
                let (multiplier, left, right) = r.tiles;
                for j in 0..V {
                    let (channel, mask) = (start + 16 * j, (lane_mask, LANES));
                    let m = load_i32(multiplier, channel, mask);
                    let l = load_i32(bytemuck_u32(left), channel, mask);
                    let r = load_i32(bytemuck_u32(right), channel, mask);
                    for (p, lanes) in lanes.iter().enumerate() {
                        let sum = load_i32(lanes, 16 * j, (u16::MAX, 16));
                        let y = narrow_bytes(requantize(sum, m, l, r, &constants));
                        let at = p * outputs + channel;
                        let to = &mut out[at..at + LANES];
                        // SAFETY: `to` is `LANES` writable bytes, all the mask selects.
                        unsafe { _mm_mask_storeu_epi8(to.as_mut_ptr().cast(), lane_mask, y) };
                    }
                }
            }
        }
    }
}

/// Integer multiply-adds on AVX2: `vpmaddwd` multiplies two pairs of `i16` and adds each pair's
/// products into an `i32` lane, two depth rows per instruction, where the portable loop's 32-bit
/// multiply (`vpmulld`) takes one row at twice the cost. Written with intrinsics because the
/// compiler does not find this instruction in the portable loop (checked in its output).
#[cfg(target_arch = "x86_64")]
mod madd {
    use std::arch::x86_64::*;

    /// Adds `x.lo * w[2p][o] + x.hi * w[2p + 1][o]` to `acc[o]` for `o < end` (a multiple of 8)
    /// and every packed input `x` of pair `p` (segments `(first pair, values)`), in register
    /// blocks of 32, 16 and 8 outputs; `weights` is [`super::Channels`]' `weight_pairs`.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn accumulate(
        acc: &mut [i32],
        end: usize,
        pairs: &[(usize, &[i32])],
        weights: &[i16],
        outputs: usize,
    ) {
        let mut start = 0;
        while end - start >= 32 {
            block::<4>(acc, start, pairs, weights, outputs);
            start += 32;
        }
        if end - start >= 16 {
            block::<2>(acc, start, pairs, weights, outputs);
            start += 16;
        }
        if end - start >= 8 {
            block::<1>(acc, start, pairs, weights, outputs);
        }
    }

    /// [`accumulate`] for `P` pixels at once (see [`super::Channels::accumulate_pixels`]), every
    /// output (a multiple of 8), in register blocks of 16 and 8 outputs: 16 outputs of 4 pixels
    /// are 8 accumulator registers, and each weight register serves every pixel.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn accumulate_pixels<const P: usize>(
        acc: &mut [i32],
        segments: &[(usize, usize, usize)],
        step: usize,
        input: &[i32],
        weights: &[i16],
        outputs: usize,
    ) {
        let mut start = 0;
        while outputs - start >= 16 {
            pixel_block::<2, P>(acc, start, segments, step, input, weights, outputs);
            start += 16;
        }
        if outputs - start >= 8 {
            pixel_block::<1, P>(acc, start, segments, step, input, weights, outputs);
        }
    }

    /// Outputs `start..start + 8 * V` of `P` pixels, in `V * P` registers.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    fn pixel_block<const V: usize, const P: usize>(
        acc: &mut [i32],
        start: usize,
        segments: &[(usize, usize, usize)],
        step: usize,
        input: &[i32],
        weights: &[i16],
        outputs: usize,
    ) {
        let mut sums = [[_mm256_setzero_si256(); V]; P];
        for (p, pixel) in sums.iter_mut().enumerate() {
            for (j, sum) in pixel.iter_mut().enumerate() {
                let at = p * outputs + start + 8 * j;
                let lanes: &[i32; 8] = acc[at..at + 8].try_into().expect("8 lanes");
                // SAFETY: `lanes` is 8 readable i32, 32 bytes; the load has no alignment need.
                *sum = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
            }
        }
        // Loops rather than `array::from_fn`, whose closures are not inlined here (they lack
        // this function's target feature) and cost a call per weight register.
        let mut xs: [&[i32]; P] = [&[]; P];
        let mut w = [_mm256_setzero_si256(); V];
        for &(first, offset, len) in segments {
            for (p, x) in xs.iter_mut().enumerate() {
                *x = &input[offset + p * step..][..len];
            }
            for i in 0..len {
                let row = ((first + i) * outputs + start) * 2;
                let row = &weights[row..row + 16 * V];
                for (j, w) in w.iter_mut().enumerate() {
                    let lanes: &[i16; 16] =
                        row[16 * j..16 * j + 16].try_into().expect("16 weights");
                    // SAFETY: `lanes` is 16 readable i16, 32 bytes; unaligned load.
                    *w = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
                }
                for (pixel, x) in sums.iter_mut().zip(&xs) {
                    let x = _mm256_set1_epi32(x[i]);
                    for (sum, &w) in pixel.iter_mut().zip(&w) {
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(x, w));
                    }
                }
            }
        }
        for (p, pixel) in sums.iter().enumerate() {
            for (j, sum) in pixel.iter().enumerate() {
                let at = p * outputs + start + 8 * j;
                let lanes: &mut [i32; 8] = (&mut acc[at..at + 8]).try_into().expect("8 lanes");
                // SAFETY: `lanes` is 8 writable i32, 32 bytes; unaligned store.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *sum) };
            }
        }
    }

    /// Outputs `start..start + 8 * V` in `V` registers.
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    fn block<const V: usize>(
        acc: &mut [i32],
        start: usize,
        pairs: &[(usize, &[i32])],
        weights: &[i16],
        outputs: usize,
    ) {
        let acc = &mut acc[start..start + 8 * V];
        let mut sums = [_mm256_setzero_si256(); V];
        for (j, sum) in sums.iter_mut().enumerate() {
            let lanes: &[i32; 8] = acc[8 * j..8 * j + 8].try_into().expect("8 lanes");
            // SAFETY: `lanes` is 8 readable i32, 32 bytes; the load has no alignment requirement.
            *sum = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
        }
        for &(first, values) in pairs {
            for (i, &x) in values.iter().enumerate() {
                // Both inputs at their zero point (ReLU's zeros, padding): nothing to add.
                if x == 0 {
                    continue;
                }
                let x = _mm256_set1_epi32(x);
                let row = ((first + i) * outputs + start) * 2;
                let row = &weights[row..row + 16 * V];
                for (j, sum) in sums.iter_mut().enumerate() {
                    let w: &[i16; 16] = row[16 * j..16 * j + 16].try_into().expect("16 weights");
                    // SAFETY: `w` is 16 readable i16, 32 bytes; unaligned load.
                    let w = unsafe { _mm256_loadu_si256(w.as_ptr().cast()) };
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(x, w));
                }
            }
        }
        for (j, sum) in sums.iter().enumerate() {
            let lanes: &mut [i32; 8] = (&mut acc[8 * j..8 * j + 8]).try_into().expect("8 lanes");
            // SAFETY: `lanes` is 8 writable i32, 32 bytes; unaligned store.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *sum) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `acc` requantized (or narrowed) and stored as `output` stores a layer's accumulators.
    fn stored(
        output: &IntOutput,
        acc: &[i32],
        shape: &[usize],
        requantization: Option<&Requantization>,
    ) -> Tensor {
        let mut out = output_tensor(output.dt, shape).unwrap();
        output.store_into(acc, &mut out, requantization).unwrap();
        out
    }

    #[test]
    fn multiplier_matches_tflite_examples() {
        // QuantizeMultiplier(0.5) = (2^30, 0); QuantizeMultiplier(0.25) = (2^30, -1).
        assert_eq!(
            Multiplier::new(0.5),
            Multiplier {
                multiplier: 1 << 30,
                shift: 0
            }
        );
        assert_eq!(
            Multiplier::new(0.25),
            Multiplier {
                multiplier: 1 << 30,
                shift: -1
            }
        );
        assert_eq!(
            Multiplier::new(3.0),
            Multiplier {
                multiplier: 3 << 29,
                shift: 2
            }
        );
        assert_eq!(
            Multiplier::new(0.0),
            Multiplier {
                multiplier: 0,
                shift: 0
            }
        );
    }

    #[test]
    fn apply_rounds_like_the_reference() {
        let half = Multiplier::new(0.5);
        // gemmlowp's rounding doubling multiply rounds exact halves up: 2.5 -> 3, -2.5 -> -2.
        assert_eq!(half.apply(5), 3);
        assert_eq!(half.apply(-5), -2);
        // A right shift rounds half away from zero: 7 * 0.25 = 1.75 -> 2, -6 * 0.25 = -1.5 -> -2.
        let quarter = Multiplier::new(0.25);
        assert_eq!(quarter.apply(7), 2);
        assert_eq!(quarter.apply(-6), -2);
        let m = Multiplier::new(0.001073099);
        for acc in [-100_000, -12_345, -1, 0, 1, 777, 123_456] {
            let expected = (f64::from(acc) * 0.001073099).round() as i32;
            assert!(
                (m.apply(acc) - expected).abs() <= 1,
                "{acc}: {} vs {expected}",
                m.apply(acc)
            );
        }
    }

    /// gemmlowp's `SaturatingRoundingDoublingHighMul` as written there: the sign-dependent nudge,
    /// then a division truncating toward zero.
    fn gemmlowp_high_mul(a: i32, b: i32) -> i32 {
        if a == i32::MIN && b == i32::MIN {
            return i32::MAX;
        }
        let ab = i64::from(a) * i64::from(b);
        let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
        ((ab + nudge) / (1i64 << 31)) as i32
    }

    #[test]
    fn the_branch_free_high_multiply_equals_gemmlowps() {
        let edges = [
            i32::MIN,
            i32::MIN + 1,
            -(1 << 30) - 1,
            -(1 << 30),
            -3,
            -1,
            0,
            1,
            3,
        ]
        .into_iter()
        .chain([1 << 30, (1 << 30) + 1, i32::MAX - 1, i32::MAX]);
        let mut cases: Vec<(i32, i32)> = Vec::new();
        for a in edges.clone() {
            // Multipliers are never i32::MIN (Multiplier::new), the one case not covered.
            for b in edges.clone().filter(|&b| b != i32::MIN) {
                cases.push((a, b));
            }
        }
        let a = full_range(4000, 11);
        let b = full_range(4000, 12)
            .into_iter()
            .map(|b| (b.unsigned_abs() >> 1).max(1 << 30) as i32);
        cases.extend(a.into_iter().zip(b));
        // Products that land exactly on a half (±1.5, ±2.5 in units of 2^31).
        cases.extend([(3 << 29, 2), (-(3 << 29), 2), (5 << 28, 4), (-(5 << 28), 4)]);
        for (a, b) in cases {
            assert_eq!(
                rounding_doubling_high_mul(a, b),
                gemmlowp_high_mul(a, b),
                "{a} * {b}"
            );
        }
        assert_eq!(Multiplier::new(-1.0 + 1e-12).multiplier, -(1 << 30));
    }

    #[test]
    fn the_rounding_shift_equals_gemmlowps_for_every_exponent() {
        // gemmlowp's RoundingDivideByPOT, computed in i64.
        let reference = |x: i32, exponent: u32| {
            let mask = (1i64 << exponent) - 1;
            let remainder = i64::from(x) & mask;
            let threshold = (mask >> 1) + i64::from(x < 0);
            (x >> exponent) + i32::from(remainder > threshold)
        };
        let xs = full_range(500, 13);
        for exponent in 0..32 {
            for &x in xs
                .iter()
                .chain(&[i32::MIN, -7, -6, -5, -1, 0, 1, 5, 6, 7, i32::MAX])
            {
                assert_eq!(
                    rounding_divide_by_pot(x, exponent),
                    reference(x, exponent),
                    "{x} / 2^{exponent}"
                );
            }
        }
    }

    #[test]
    fn per_channel_requantization_equals_each_channels_multiplier() {
        // Right shifts from 0 to 30, small ones (0.2, 0.1) where rounding is often a tie.
        let reals = [
            0.5,
            0.25,
            3.0,
            0.001073099,
            1e-9,
            0.0,
            0.75,
            2.0e-5,
            1.5,
            0.2,
            0.1,
        ];
        // 11 channels: a tile of 66 values (four registers and 2 left) that does not divide 200
        // rows; 20 channels: a tile of 80 (four registers, then one).
        for channels in [11, 20] {
            let multipliers: Vec<Multiplier> = (reals.iter().cycle().take(channels))
                .map(|&r| Multiplier::new(r))
                .collect();
            let requantization = Requantization::fixed_point(multipliers.iter().copied());
            // The last row holds the extremes.
            let mut accs = values(channels * 199, 5, -2_000_000, 2_000_000);
            let extremes = [
                i32::MIN,
                i32::MAX,
                -1,
                0,
                1,
                1 << 20,
                -(1 << 20),
                12_345_678,
                -7,
            ];
            accs.extend(extremes.iter().cycle().take(channels));
            let expected: Vec<i32> = accs
                .iter()
                .zip(multipliers.iter().cycle())
                .map(|(&acc, m)| m.apply(acc).wrapping_add(7))
                .collect();
            let mut wide = vec![0i16; accs.len()];
            let i16_range = [i32::from(i16::MIN), i32::from(i16::MAX)];
            requantization.store_rows(&accs, &mut wide, 7, i16_range);
            let clamp = |y: i32| y.clamp(i16_range[0], i16_range[1]) as i16;
            assert_eq!(wide, expected.iter().map(|&y| clamp(y)).collect::<Vec<_>>());
            // Narrowed and clamped in the same pass, as a fused ReLU6 would: 0..=100 in i8.
            let mut bytes = vec![0i8; accs.len()];
            requantization.store_rows(&accs, &mut bytes, 7, [0, 100]);
            let clamped: Vec<i8> = expected.iter().map(|&y| y.clamp(0, 100) as i8).collect();
            assert_eq!(bytes, clamped, "{channels} channels");
            assert!(clamped.contains(&0) && clamped.contains(&100));
            assert!(clamped.iter().any(|&y| y != 0 && y != 100));
            // The portable loop too, which `store_rows` passes over on a CPU with AVX-512.
            let tiles = requantization.tiles().expect("built fixed-point");
            let mut portable = vec![0i8; accs.len()];
            store_fixed_point(&accs, &mut portable, tiles, 7, [0, 100]);
            assert_eq!(portable, clamped, "{channels} channels, portable");
        }
    }

    #[test]
    fn same_padding_geometry_matches_tflite() {
        // 5 wide, kernel 3, stride 2, SAME: 3 outputs, total padding 2, one before.
        assert_eq!(QConv::geometry(5, 3, 2, 1, true), (3, 1));
        // 4 wide, kernel 3, stride 2, SAME: 2 outputs, total padding 1, none before.
        assert_eq!(QConv::geometry(4, 3, 2, 1, true), (2, 0));
        assert_eq!(QConv::geometry(5, 3, 1, 1, false), (3, 0));
    }

    /// `op` on one input tensor of `shape`; its output's bytes.
    fn eval_on<T: Datum + Copy>(op: &impl EvalOp, shape: &[usize], values: &[T]) -> Vec<u8> {
        let input = Tensor::from_shape(shape, values).unwrap();
        let out = op
            .eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()))
            .unwrap();
        out[0].as_bytes().to_vec()
    }

    /// Deterministic values in `lo..=hi`.
    fn values(n: usize, seed: u32, lo: i32, hi: i32) -> Vec<i32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                lo + (state >> 8) as i32 % (hi - lo + 1)
            })
            .collect()
    }

    /// `n` pseudo-random values over all of `i32` (xorshift).
    fn full_range(n: usize, seed: u32) -> Vec<i32> {
        let mut state = seed.max(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as i32
            })
            .collect()
    }

    /// The requantized, clamped output of one accumulator, as the kernels must compute it.
    fn reference_output(acc: i32, real_multiplier: f64, zero_point: i32) -> u8 {
        (Multiplier::new(real_multiplier).apply(acc) + zero_point).clamp(0, 255) as u8
    }

    // 59 outputs: register blocks of 32, 16 and 8, and 3 more; per-channel weight zero points;
    // inputs often at their zero point (skipped); u8 data.
    const OUTPUTS: usize = 59;
    const X_ZP: i32 = 7;

    fn wide_channels(depth: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>, Channels) {
        let w = values(OUTPUTS * depth, 1, 0, 255);
        let w_zps = values(OUTPUTS, 2, 100, 150);
        let bias = values(OUTPUTS, 3, -5000, 5000);
        let raw: Vec<u8> = w.iter().map(|&v| v as u8).collect();
        let weights = Tensor::from_shape(&[OUTPUTS, depth], &raw).unwrap();
        let channels = Channels::new(
            &weights,
            Some(&tensor1(&bias)),
            X_ZP,
            0.5,
            &[0.01],
            &w_zps,
            0.3,
        )
        .unwrap();
        (w, w_zps, bias, channels)
    }

    fn u8_output() -> IntOutput {
        IntOutput {
            zero_point: 120,
            min: 0,
            max: 255,
            dt: DatumType::U8,
        }
    }

    fn input(n: usize, seed: u32) -> Vec<u8> {
        values(n, seed, 0, 255)
            .into_iter()
            .enumerate()
            .map(|(i, v)| if i % 3 == 0 { X_ZP as u8 } else { v as u8 })
            .collect()
    }

    #[test]
    fn a_wide_fully_connected_layer_matches_the_direct_sum() {
        let (depth, rows) = (21, 3);
        let (w, w_zps, bias, channels) = wide_channels(depth);
        let op = QFullyConnected {
            channels,
            output: u8_output(),
        };
        let x = input(rows * depth, 4);
        let out = eval_on(&op, &[rows, depth], &x);
        // 16-bit inputs take the portable register blocks, 8-bit ones on AVX2 the paired
        // multiply-adds: both must give the same answer.
        let wide: Vec<i16> = x.iter().map(|&v| i16::from(v)).collect();
        assert_eq!(eval_on(&op, &[rows, depth], &wide), out);
        let expected: Vec<u8> = (0..rows * OUTPUTS)
            .map(|i| {
                let (r, o) = (i / OUTPUTS, i % OUTPUTS);
                let acc = bias[o]
                    + (0..depth)
                        .map(|k| {
                            (i32::from(x[r * depth + k]) - X_ZP) * (w[o * depth + k] - w_zps[o])
                        })
                        .sum::<i32>();
                reference_output(acc, 0.5 * 0.01 / 0.3, 120)
            })
            .collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn an_int8_fully_connected_layer_matches_the_direct_sum() {
        // 8-bit input, odd depth, weight zero points 0 as in int8 TFLite models (the sum pass is
        // skipped). 13 outputs (a block of 8 and 5 more) per row; 80 outputs over 5 rows and
        // depth 9 and 70 (quadruples with a partial last one, four rows at a time and one more)
        // where the CPU has AVX-512 VNNI, and 24 (a whole register and a half). Input zero points: ordinary and at both ends of the
        // 8-bit ranges (quadruple offsets 0 and 255), int8 and uint8.
        for (depth, outputs, rows) in [(9, 13, 2), (9, 80, 5), (70, 80, 5), (9, 24, 5)] {
            for (unsigned, x_zp) in [(false, -5), (true, 131), (false, -128), (true, 255)] {
                fully_connected_matches_the_direct_sum([depth, outputs, rows], unsigned, x_zp);
            }
        }
    }

    fn fully_connected_matches_the_direct_sum(
        [depth, outputs, rows]: [usize; 3],
        unsigned: bool,
        x_zp: i32,
    ) {
        let w = values(outputs * depth, 6, -128, 127);
        let bias = values(outputs, 7, -3000, 3000);
        let raw: Vec<i8> = w.iter().map(|&v| v as i8).collect();
        let weights = Tensor::from_shape(&[outputs, depth], &raw).unwrap();
        let channels = Channels::new(
            &weights,
            Some(&tensor1(&bias)),
            x_zp,
            0.5,
            &[0.01],
            &[0],
            0.3,
        )
        .unwrap();
        let offset = if unsigned { x_zp } else { x_zp + 128 };
        let quads = vnni() && outputs.is_multiple_of(8);
        assert_eq!(
            channels.packing::<u8>(offset) == Some(Packing::Quads),
            quads,
            "the packing this CPU should take"
        );
        let op = QFullyConnected {
            channels,
            output: IntOutput {
                zero_point: -3,
                min: -128,
                max: 127,
                dt: DatumType::I8,
            },
        };
        let (lo, hi) = if unsigned { (0, 255) } else { (-128, 127) };
        let x: Vec<i32> = values(rows * depth, 8, lo, hi)
            .into_iter()
            .enumerate()
            .map(|(i, v)| if i % 4 == 0 { x_zp } else { v })
            .collect();
        let out = if unsigned {
            let x: Vec<u8> = x.iter().map(|&v| v as u8).collect();
            eval_on(&op, &[rows, depth], &x)
        } else {
            let x: Vec<i8> = x.iter().map(|&v| v as i8).collect();
            eval_on(&op, &[rows, depth], &x)
        };
        let expected: Vec<u8> = (0..rows * outputs)
            .map(|i| {
                let (r, o) = (i / outputs, i % outputs);
                let acc = bias[o]
                    + (0..depth)
                        .map(|k| (x[r * depth + k] - x_zp) * w[o * depth + k])
                        .sum::<i32>();
                let y = Multiplier::new(0.5 * 0.01 / 0.3).apply(acc) - 3;
                y.clamp(-128, 127) as i8 as u8
            })
            .collect();
        assert_eq!(
            out, expected,
            "depth {depth}, {outputs} outputs, {rows} rows, unsigned {unsigned}, zero point {x_zp}"
        );
    }

    /// A 3x3 convolution with SAME padding (TFLite puts the odd row and column after) over
    /// `case`, in `groups` (1, or `cin` for depthwise).
    fn same_conv(channels: Channels, output: IntOutput, case: Geometry, groups: usize) -> QConv {
        same_conv_k(channels, output, case, groups, 3)
    }

    /// [`same_conv`] with a `k`×`k` kernel.
    fn same_conv_k(
        channels: Channels,
        output: IntOutput,
        case: Geometry,
        groups: usize,
        k: usize,
    ) -> QConv {
        let (oh, pad_y) = QConv::geometry(case.h, k, case.stride, case.dilation, true);
        let (ow, pad_x) = QConv::geometry(case.w, k, case.stride, case.dilation, true);
        QConv {
            channels,
            output,
            kernel: [k, k],
            strides: [case.stride; 2],
            dilations: [case.dilation; 2],
            pad_before: [pad_y, pad_x],
            out_hw: [oh, ow],
            groups,
            in_channels: case.cin,
        }
    }

    /// [`same_conv`]'s accumulators (bias included, not requantized) from the definition: NHWC
    /// `x` with zero point `x_zp`, weights `[outputs, kh, kw, cin / groups]` with a zero point
    /// per output (`w_zps`, empty for none), taps outside the input skipped.
    fn direct_conv(
        conv: &QConv,
        case: Geometry,
        (x, x_zp): (&[i32], i32),
        (w, w_zps): (&[i32], &[i32]),
        bias: &[i32],
    ) -> Vec<i32> {
        let Geometry {
            cin,
            stride,
            h,
            w: width,
            outputs,
            batch,
            dilation,
        } = case;
        let (per_group, outs_per_group) = (cin / conv.groups, outputs / conv.groups);
        let ([oh, ow], [pad_y, pad_x]) = (conv.out_hw, conv.pad_before);
        let [kh, kw] = conv.kernel;
        let mut accs = Vec::new();
        for (b, oy, ox) in
            (0..batch).flat_map(|b| (0..oh).flat_map(move |oy| (0..ow).map(move |ox| (b, oy, ox))))
        {
            for o in 0..outputs {
                let (mut acc, group) = (bias[o], o / outs_per_group);
                let w_zp = w_zps.get(o).copied().unwrap_or(0);
                for (ky, kx) in (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx))) {
                    let iy = (oy * stride + ky * dilation) as isize - pad_y as isize;
                    let ix = (ox * stride + kx * dilation) as isize - pad_x as isize;
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= width as isize {
                        continue;
                    }
                    let pixel = (b * h + iy as usize) * width + ix as usize;
                    for c in 0..per_group {
                        let xv = x[pixel * cin + group * per_group + c];
                        let wv = w[((o * kh + ky) * kw + kx) * per_group + c];
                        acc += (xv - x_zp) * (wv - w_zp);
                    }
                }
                accs.push(acc);
            }
        }
        accs
    }

    #[test]
    fn a_wide_convolution_matches_the_direct_sum() {
        // 3 input channels take the portable blocks, 4 the input packed in pairs of channels.
        for channels in [3, 4] {
            wide_convolution_matches_the_direct_sum(channels);
        }
    }

    fn wide_convolution_matches_the_direct_sum(cin: usize) {
        // Stride 1, weight zero points per output.
        let case = Geometry {
            cin,
            stride: 1,
            h: 5,
            w: 4,
            outputs: OUTPUTS,
            batch: 1,
            dilation: 1,
        };
        let (w, w_zps, bias, channels) = wide_channels(9 * cin);
        let conv = same_conv(channels, u8_output(), case, 1);
        let x = input(case.h * case.w * cin, 5);
        let out = eval_on(&conv, &[1, case.h, case.w, cin], &x);
        let x: Vec<i32> = x.iter().map(|&v| i32::from(v)).collect();
        let expected: Vec<u8> = direct_conv(&conv, case, (&x, X_ZP), (&w, &w_zps), &bias)
            .into_iter()
            .map(|acc| reference_output(acc, 0.5 * 0.01 / 0.3, 120))
            .collect();
        assert_eq!(out, expected, "{cin} input channels");
    }

    #[test]
    fn convolutions_four_pixels_at_a_time_match_the_direct_sum() {
        // 8-bit inputs, weights without zero points. Weights that fit int8 take quadruples where
        // the CPU has AVX-512 VNNI: 80 outputs (blocks of 64 and 16), 48, 24 and 8 (the last 8 a
        // masked half register). Weights beyond int8 (uint8 here), or a CPU without VNNI, take
        // the pixel-blocked pairs on AVX2: 40 outputs (blocks of 16, 16, 8), 8. Channel counts
        // that the packing width divides and that it does not, strides 1 and 2, SAME padding,
        // and output widths that leave pixels over after the blocks of four; int8 and uint8
        // inputs.
        let cases = [
            (3, 2, 9, 11, 40, 1, 1, true),
            (4, 1, 5, 7, 40, 1, 1, true),
            (6, 2, 8, 10, 40, 1, 1, true),
            (3, 1, 4, 6, 40, 1, 1, true),
            (3, 2, 9, 11, 8, 1, 1, true),
            (3, 2, 9, 11, 80, 1, 1, false),
            (4, 1, 5, 7, 80, 1, 1, false),
            (8, 2, 8, 10, 80, 1, 1, false),
            (6, 1, 6, 5, 48, 1, 1, false),
            (3, 2, 9, 11, 8, 1, 1, false),
            (4, 1, 5, 7, 24, 1, 1, false),
            (1, 2, 9, 11, 24, 1, 1, false),
            // Two images, dilation 2: tapwise and gathered, on either packing.
            (4, 1, 7, 9, 80, 2, 2, false),
            (3, 1, 7, 9, 80, 2, 2, false),
            (3, 1, 7, 9, 24, 2, 2, false),
            (3, 2, 8, 9, 40, 2, 2, true),
            (4, 1, 7, 9, 40, 2, 2, true),
        ];
        for (cin, stride, h, w, outputs, batch, dilation, uint8_weights) in cases {
            for unsigned in [false, true] {
                let conv = Geometry {
                    cin,
                    stride,
                    h,
                    w,
                    outputs,
                    batch,
                    dilation,
                };
                paired_convolution_matches_the_direct_sum(conv, unsigned, uint8_weights);
            }
        }
    }

    /// One convolution case: input channels, stride, input size, output channels, images,
    /// dilation.
    #[derive(Debug, Clone, Copy)]
    struct Geometry {
        cin: usize,
        stride: usize,
        h: usize,
        w: usize,
        outputs: usize,
        batch: usize,
        dilation: usize,
    }

    fn paired_convolution_matches_the_direct_sum(
        case: Geometry,
        unsigned: bool,
        uint8_weights: bool,
    ) {
        let output = IntOutput {
            zero_point: -4,
            min: -128,
            max: 127,
            dt: DatumType::I8,
        };
        let x_zp = if unsigned { 131 } else { -9 };
        paired_convolution_into(case, (unsigned, x_zp), uint8_weights, output);
    }

    #[test]
    fn gathered_receptive_fields_of_every_filler_length_match_the_direct_sum() {
        // Receptive fields gathered as bytes (channels that 4 does not divide): 1×1 kernels of 3
        // channels (each 16-byte block overruns several 4-byte fields), 2×2 of 3 (no filler
        // byte), 3×3 of 2 (two filler bytes) and of 5 (three, rows of 15 bytes).
        let output = IntOutput {
            zero_point: -4,
            min: -128,
            max: 127,
            dt: DatumType::I8,
        };
        for (cin, k) in [(3, 1), (3, 2), (2, 3), (5, 3)] {
            let case = Geometry {
                cin,
                stride: 1,
                h: 5,
                w: 7,
                outputs: 24,
                batch: 2,
                dilation: 1,
            };
            for input in [(false, -9), (true, 131)] {
                paired_convolution_with_kernel(case, k, input, false, output.clone());
            }
        }
    }

    #[test]
    fn quadruples_take_input_zero_points_at_both_ends() {
        // Offsets (`quad_offset`) 0 and 255: int8 zero points -128 and 127, uint8 0 and 255; the
        // image packed tapwise (4 channels) and gathered (3).
        let output = IntOutput {
            zero_point: -4,
            min: -128,
            max: 127,
            dt: DatumType::I8,
        };
        for cin in [4, 3] {
            let case = Geometry {
                cin,
                stride: 1,
                h: 6,
                w: 7,
                outputs: 24,
                batch: 1,
                dilation: 1,
            };
            for input in [(false, -128), (false, 127), (true, 0), (true, 255)] {
                paired_convolution_into(case, input, false, output.clone());
            }
        }
    }

    #[test]
    fn convolutions_into_16_bit_outputs_match_the_direct_sum() {
        // Not 8-bit outputs, so quadruples leave accumulators (24 outputs: a whole register and
        // a masked half) for the requantizing pass, as pairs do; a ReLU-like clamp.
        let output = IntOutput {
            zero_point: -4,
            min: -4,
            max: i32::from(i16::MAX),
            dt: DatumType::I16,
        };
        for (cin, outputs, uint8_weights) in [(4, 24, false), (3, 24, false), (4, 40, true)] {
            let case = Geometry {
                cin,
                stride: 2,
                h: 9,
                w: 11,
                outputs,
                batch: 1,
                dilation: 1,
            };
            for unsigned in [false, true] {
                let x_zp = if unsigned { 131 } else { -9 };
                paired_convolution_into(case, (unsigned, x_zp), uint8_weights, output.clone());
            }
        }
    }

    /// [`paired_convolution_matches_the_direct_sum`] with input zero point `x_zp` into `output`
    /// (8- or 16-bit).
    fn paired_convolution_into(
        case: Geometry,
        input: (bool, i32),
        uint8_weights: bool,
        output: IntOutput,
    ) {
        paired_convolution_with_kernel(case, 3, input, uint8_weights, output);
    }

    /// [`paired_convolution_into`] with a `k`×`k` kernel.
    fn paired_convolution_with_kernel(
        case: Geometry,
        k: usize,
        (unsigned, x_zp): (bool, i32),
        uint8_weights: bool,
        output: IntOutput,
    ) {
        let Geometry {
            cin,
            h,
            w,
            outputs: out_channels,
            batch,
            ..
        } = case;
        let depth = k * k * cin;
        let (lo, hi) = if uint8_weights { (0, 255) } else { (-128, 127) };
        let weights = values(out_channels * depth, 31, lo, hi);
        let bias = values(out_channels, 32, -3000, 3000);
        let raw = if uint8_weights {
            let raw: Vec<u8> = weights.iter().map(|&v| v as u8).collect();
            Tensor::from_shape(&[out_channels, depth], &raw).unwrap()
        } else {
            let raw: Vec<i8> = weights.iter().map(|&v| v as i8).collect();
            Tensor::from_shape(&[out_channels, depth], &raw).unwrap()
        };
        let channels =
            Channels::new(&raw, Some(&tensor1(&bias)), x_zp, 0.5, &[0.01], &[0], 0.3).unwrap();
        let offset = if unsigned { x_zp } else { x_zp + 128 };
        let expected_packing = if vnni() && !uint8_weights {
            Some(Packing::Quads)
        } else if avx2() {
            Some(Packing::Pairs)
        } else {
            None
        };
        assert_eq!(channels.packing::<u8>(offset), expected_packing);
        let (zero_point, min, max, dt) = (output.zero_point, output.min, output.max, output.dt);
        let conv = same_conv_k(channels, output, case, 1, k);
        let (lo, hi) = if unsigned { (0, 255) } else { (-128, 127) };
        let x: Vec<i32> = values(batch * h * w * cin, 33, lo, hi)
            .into_iter()
            .enumerate()
            .map(|(i, v)| if i % 5 == 0 { x_zp } else { v })
            .collect();
        let out = if unsigned {
            let x: Vec<u8> = x.iter().map(|&v| v as u8).collect();
            eval_on(&conv, &[batch, h, w, cin], &x)
        } else {
            let x: Vec<i8> = x.iter().map(|&v| v as i8).collect();
            eval_on(&conv, &[batch, h, w, cin], &x)
        };
        let expected: Vec<u8> = direct_conv(&conv, case, (&x, x_zp), (&weights, &[]), &bias)
            .into_iter()
            .flat_map(|acc| {
                let y = (Multiplier::new(0.5 * 0.01 / 0.3).apply(acc) + zero_point).clamp(min, max);
                match dt {
                    DatumType::I16 => (y as i16).to_le_bytes().to_vec(),
                    _ => vec![y as i8 as u8],
                }
            })
            .collect();
        assert_eq!(
            out, expected,
            "{case:?}, unsigned input: {unsigned}, {dt:?}"
        );
    }

    #[test]
    fn depthwise_convolutions_match_the_direct_sum() {
        // 3x3 kernels, stride 2, SAME padding, weights without zero points as in TFLite: 59
        // channels (portable blocks of 32, 16 and 8, then 3 more; on AVX-512 three registers and
        // 11 masked lanes), 8 (on AVX-512 two pixels per register, a row's odd last pixel alone;
        // once with two images), 24. A 5x5 kernel (25 taps in registers) and a 1x1 (one tap, the
        // rest of a 3x3 block weighing 0). Two images, twice.
        for (ch, k, batch) in [
            (59, 3, 1),
            (8, 3, 1),
            (8, 3, 2),
            (24, 3, 2),
            (20, 5, 1),
            (16, 1, 1),
        ] {
            depthwise_matches_the_direct_sum(ch, k, batch);
        }
    }

    fn depthwise_matches_the_direct_sum(ch: usize, k: usize, batch: usize) {
        let case = Geometry {
            cin: ch,
            stride: 2,
            h: 7,
            w: 6,
            outputs: ch,
            batch,
            dilation: 1,
        };
        let (h, w_) = (case.h, case.w);
        let w = values(ch * k * k, 21, 0, 255);
        let bias = values(ch, 22, -5000, 5000);
        let raw: Vec<u8> = w.iter().map(|&v| v as u8).collect();
        let weights = Tensor::from_shape(&[ch, k * k], &raw).unwrap();
        let channels = Channels::new(
            &weights,
            Some(&tensor1(&bias)),
            X_ZP,
            0.5,
            &[0.01],
            &[0],
            0.3,
        )
        .unwrap();
        let conv = same_conv_k(channels, u8_output(), case, ch, k);
        assert_eq!(conv.out_hw, [4, 3]);
        // The same bytes as uint8 and as int8 codes (values -128..=127), both read in place.
        let x = input(batch * h * w_ * ch, 23);
        let signed: Vec<i8> = x.iter().map(|&v| v as i8).collect();
        let expected = |x: Vec<i32>| -> Vec<u8> {
            direct_conv(&conv, case, (&x, X_ZP), (&w, &[]), &bias)
                .into_iter()
                .map(|acc| reference_output(acc, 0.5 * 0.01 / 0.3, 120))
                .collect()
        };
        let unsigned = eval_on(&conv, &[batch, h, w_, ch], &x);
        let what = format!("{ch} channels, {k}x{k}, {batch} images");
        assert_eq!(
            unsigned,
            expected(x.iter().map(|&v| i32::from(v)).collect()),
            "{what}"
        );
        let out = eval_on(&conv, &[batch, h, w_, ch], &signed);
        assert_eq!(
            out,
            expected(signed.iter().map(|&v| i32::from(v)).collect()),
            "{what}"
        );
        // The portable kernel too, which a CPU with AVX-512 passes over.
        let shape = [batch, 4, 3, ch];
        let requantization = Some(&conv.channels.requantization);
        let stored = |acc: Vec<i32>| stored(&conv.output, &acc, &shape, requantization);
        let portable = stored(depthwise(&conv, &x, batch, h, w_));
        assert_eq!(portable.as_bytes(), &unsigned[..], "{what}, portable");
        let portable = stored(depthwise(&conv, &signed, batch, h, w_));
        assert_eq!(portable.as_bytes(), &out[..], "{what}, portable");
    }

    #[test]
    fn depthwise_geometries_match_the_direct_sum() {
        // Kernels, stride, dilation, SAME or VALID, channels: dilation 2 with stride 1, VALID
        // padding, non-square kernels, 16 taps (held as 25 with 9 of weight 0), 17 channels (a
        // register and one masked lane).
        let cases = [
            ([3, 3], 1, 2, true, 24),
            ([3, 1], 1, 1, false, 16),
            ([1, 3], 2, 1, true, 8),
            ([4, 4], 1, 1, false, 20),
            ([2, 2], 2, 1, true, 17),
        ];
        for ([kh, kw], stride, dilation, same, ch) in cases {
            let (h, w) = (9, 8);
            let case = Geometry {
                cin: ch,
                stride,
                h,
                w,
                outputs: ch,
                batch: 1,
                dilation,
            };
            let weights = values(ch * kh * kw, 51, 0, 255);
            let bias = values(ch, 52, -5000, 5000);
            let raw: Vec<u8> = weights.iter().map(|&v| v as u8).collect();
            let tensor = Tensor::from_shape(&[ch, kh * kw], &raw).unwrap();
            let bias_t = tensor1(&bias);
            let channels =
                Channels::new(&tensor, Some(&bias_t), X_ZP, 0.5, &[0.01], &[0], 0.3).unwrap();
            let (oh, pad_y) = QConv::geometry(h, kh, stride, dilation, same);
            let (ow, pad_x) = QConv::geometry(w, kw, stride, dilation, same);
            let conv = QConv {
                channels,
                output: u8_output(),
                kernel: [kh, kw],
                strides: [stride; 2],
                dilations: [dilation; 2],
                pad_before: [pad_y, pad_x],
                out_hw: [oh, ow],
                groups: ch,
                in_channels: ch,
            };
            let x = input(h * w * ch, 53);
            let signed: Vec<i8> = x.iter().map(|&v| v as i8).collect();
            let what = format!("{kh}x{kw}, stride {stride}, dilation {dilation}, same {same}");
            let requantization = Some(&conv.channels.requantization);
            let shape = [1, oh, ow, ch];
            let unsigned: Vec<i32> = x.iter().map(|&v| i32::from(v)).collect();
            let expected = direct_conv(&conv, case, (&unsigned, X_ZP), (&weights, &[]), &bias);
            let expected: Vec<u8> = (expected.into_iter())
                .map(|acc| reference_output(acc, 0.5 * 0.01 / 0.3, 120))
                .collect();
            assert_eq!(eval_on(&conv, &[1, h, w, ch], &x), expected, "{what}");
            let portable = depthwise(&conv, &x, 1, h, w);
            let portable = stored(&conv.output, &portable, &shape, requantization);
            assert_eq!(portable.as_bytes(), &expected[..], "{what}, portable");
            let codes: Vec<i32> = signed.iter().map(|&v| i32::from(v)).collect();
            let expected = direct_conv(&conv, case, (&codes, X_ZP), (&weights, &[]), &bias);
            let expected: Vec<u8> = (expected.into_iter())
                .map(|acc| reference_output(acc, 0.5 * 0.01 / 0.3, 120))
                .collect();
            assert_eq!(
                eval_on(&conv, &[1, h, w, ch], &signed),
                expected,
                "{what}, int8"
            );
        }
    }

    #[test]
    fn int8_depthwise_convolutions_into_int8_outputs_match_the_direct_sum() {
        // Negative outputs through the narrowing, and input zero points at both ends of int8
        // (the padding bytes then -128 and 127); 24 channels, and 8 (on AVX-512 two pixels per
        // register).
        for ch in [24, 8] {
            int8_depthwise_into_int8_outputs(ch);
        }
    }

    fn int8_depthwise_into_int8_outputs(ch: usize) {
        let case = Geometry {
            cin: ch,
            stride: 1,
            h: 5,
            w: 6,
            outputs: ch,
            batch: 1,
            dilation: 1,
        };
        let w = values(ch * 9, 41, -128, 127);
        let bias = values(ch, 42, -5000, 5000);
        let raw: Vec<i8> = w.iter().map(|&v| v as i8).collect();
        let weights = Tensor::from_shape(&[ch, 9], &raw).unwrap();
        let output = IntOutput {
            zero_point: -5,
            min: -128,
            max: 127,
            dt: DatumType::I8,
        };
        for x_zp in [-128, 127, -3] {
            let bias_t = tensor1(&bias);
            let channels =
                Channels::new(&weights, Some(&bias_t), x_zp, 0.5, &[0.01], &[0], 0.3).unwrap();
            let conv = same_conv(channels, output.clone(), case, ch);
            let x = values(5 * 6 * ch, 43, -128, 127);
            let signed: Vec<i8> = x.iter().map(|&v| v as i8).collect();
            let expected: Vec<u8> = direct_conv(&conv, case, (&x, x_zp), (&w, &[]), &bias)
                .into_iter()
                .map(|acc| {
                    let y = Multiplier::new(0.5 * 0.01 / 0.3).apply(acc) - 5;
                    y.clamp(-128, 127) as i8 as u8
                })
                .collect();
            assert!(expected.iter().any(|&y| (y as i8) < 0), "negative outputs");
            let out = eval_on(&conv, &[1, 5, 6, ch], &signed);
            assert_eq!(out, expected, "input zero point {x_zp}");
            let acc = depthwise(&conv, &signed, 1, 5, 6);
            let requantization = Some(&conv.channels.requantization);
            let portable = stored(&conv.output, &acc, &[1, 5, 6, ch], requantization);
            assert_eq!(
                portable.as_bytes(),
                &expected[..],
                "input zero point {x_zp}, portable"
            );
        }
    }

    #[test]
    fn fully_connected_matches_a_float_computation() {
        // x: zero point -3, scale 0.5; w: scale 0.25 per tensor; y: scale 0.125, zero point 2.
        // The requantization multiplier is then exactly 1.
        let w = tensor2(&[[1i8, -2, 3], [4, 5, -6]]);
        let bias = tensor1(&[10i32, -20]);
        let channels = Channels::new(&w, Some(&bias), -3, 0.5, &[0.25], &[0], 0.125).unwrap();
        let op = QFullyConnected {
            channels,
            output: IntOutput {
                zero_point: 2,
                min: -128,
                max: 127,
                dt: DatumType::I8,
            },
        };
        let x = tensor2(&[[7i8, -3, 0]]);
        let out = op
            .eval(&EvalContext::out_of_plan(), tvec!(x.into_tvalue()))
            .unwrap();
        // x - zp = [10, 0, 3]: acc0 = 10 + 0 + 9 + 10 = 29, acc1 = 40 + 0 - 18 - 20 = 2; + zp 2.
        assert_eq!(out[0].clone().into_tensor(), tensor2(&[[31i8, 4]]));
    }

    #[test]
    fn add_rescales_differently_quantized_inputs() {
        let op = QAdd::new(
            Operand {
                zero_point: 0,
                scale: 0.5,
            },
            Operand {
                zero_point: 10,
                scale: 0.25,
            },
            0.5,
            false,
            IntOutput {
                zero_point: -1,
                min: -128,
                max: 127,
                dt: DatumType::I8,
            },
        );
        let a = tensor1(&[4i8, -6]);
        let b = tensor1(&[18i8]);
        let out = op
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(a.into_tvalue(), b.into_tvalue()),
            )
            .unwrap();
        // Reals: a = [2, -3], b = 2; sums 4 and -1 -> 8 - 1 = 7, -2 - 1 = -3.
        assert_eq!(out[0].clone().into_tensor(), tensor1(&[7i8, -3]));
    }

    #[test]
    fn add_of_every_code_is_within_a_step_of_the_real_sum_on_both_paths() {
        let (sa, za, sb, zb, sy, zy) = (0.05f32, -7, 0.03f32, 12, 0.08f32, 3);
        let output = IntOutput {
            zero_point: zy,
            min: -128,
            max: 127,
            dt: DatumType::I8,
        };
        let op = QAdd::new(
            Operand {
                zero_point: za,
                scale: sa,
            },
            Operand {
                zero_point: zb,
                scale: sb,
            },
            sy,
            false,
            output,
        );
        let a: Vec<i8> = (-128..=127).collect();
        let b: Vec<i8> = (0..256).map(|i| ((i * 37) % 256 - 128) as i8).collect();
        let same_shape = eval_pair(&op, tensor1(&a), tensor1(&b));
        for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
            let real = sa * (f32::from(x) - za as f32) + sb * (f32::from(y) - zb as f32);
            let expected = (real / sy + zy as f32).round().clamp(-128.0, 127.0);
            let got = f32::from(same_shape[i]);
            assert!(
                (got - expected).abs() <= 1.0,
                "{x} + {y}: {got} vs {expected}"
            );
            // The broadcasting path computes the same value.
            let one = eval_pair(&op, tensor1(&[x, x]), tensor1(&[y]));
            assert_eq!(one, vec![same_shape[i]; 2], "{x} + {y}");
        }
    }

    #[test]
    fn add_and_sub_of_every_signedness_and_output_type_equal_the_scalar_combination() {
        // 85 values: one 64-value store, one 16-value store and a tail of 5.
        let n = 85;
        let (xs, ys) = (values(n, 3, -128, 127), values(n, 8, -128, 127));
        let cases = [
            // (zero points and scales of a and b; output scale, zero point, clamp)
            (
                (-7, 0.05),
                (12, 0.03),
                (0.08, 3, [-128, 127]),
                DatumType::I8,
            ),
            ((10, 0.02), (-5, 0.01), (0.03, 128, [0, 255]), DatumType::U8),
            (
                (0, 0.5),
                (100, 0.004),
                (0.3, -20, [-20, 127]),
                DatumType::I8,
            ),
            (
                (3, 0.01),
                (-2, 0.01),
                (0.0005, 5, [-32768, 32767]),
                DatumType::I16,
            ),
            // Equal scales (neither input shifts right) and zero points at the ends of the types.
            (
                (255, 0.02),
                (-128, 0.02),
                (0.05, 0, [-128, 127]),
                DatumType::I8,
            ),
            // A zero point beyond the fast form's reach on AVX-512 (the portable path instead).
            (
                (300, 0.01),
                (0, 0.02),
                (0.04, 10, [-128, 127]),
                DatumType::I8,
            ),
            // An output scale so small that the output multiplier shifts left.
            ((1, 0.2), (-1, 0.3), (1e-7, 0, [-128, 127]), DatumType::I8),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for ((za, sa), (zb, sb), (sy, zy, [min, max]), dt) in cases {
            for subtract in [false, true] {
                let output = IntOutput {
                    zero_point: zy,
                    min,
                    max,
                    dt,
                };
                let (a, b) = (
                    Operand {
                        zero_point: za,
                        scale: sa,
                    },
                    Operand {
                        zero_point: zb,
                        scale: sb,
                    },
                );
                let op = QAdd::new(a, b, sy, subtract, output);
                for (signed_a, signed_b) in
                    [(true, true), (true, false), (false, true), (false, false)]
                {
                    let code = |v: i32, signed: bool| if signed { v } else { v + 128 };
                    let tensor = |v: &[i32], signed: bool| -> Tensor {
                        if signed {
                            tensor1(&v.iter().map(|&v| v as i8).collect::<Vec<_>>())
                        } else {
                            tensor1(&v.iter().map(|&v| (v + 128) as u8).collect::<Vec<_>>())
                        }
                    };
                    let expected: Vec<i32> = xs
                        .iter()
                        .zip(&ys)
                        .map(|(&x, &y)| {
                            op.combine(code(x, signed_a), code(y, signed_b))
                                .clamp(min, max)
                        })
                        .collect();
                    let out = op
                        .eval(
                            &EvalContext::out_of_plan(),
                            tvec!(
                                tensor(&xs, signed_a).into_tvalue(),
                                tensor(&ys, signed_b).into_tvalue()
                            ),
                        )
                        .unwrap();
                    let out = out[0].clone().into_tensor();
                    let got: Vec<i32> = match dt {
                        DatumType::I8 => {
                            out.as_bytes().iter().map(|&v| i32::from(v as i8)).collect()
                        }
                        DatumType::U8 => out.as_bytes().iter().map(|&v| i32::from(v)).collect(),
                        _ => out
                            .cast_to::<i32>()
                            .unwrap()
                            .try_as_plain_ram()
                            .unwrap()
                            .as_slice::<i32>()
                            .unwrap()
                            .to_vec(),
                    };
                    let case = format!("{dt:?} subtract {subtract} signed {signed_a} {signed_b}");
                    assert_eq!(got, expected, "{case}");
                    seen.extend(expected);
                }
            }
        }
        // The outputs cover the range, not only its clamped ends.
        assert!(seen.len() > 200, "{} distinct outputs", seen.len());
    }

    #[test]
    fn average_pooling_matches_the_rounded_mean_of_each_window() {
        // (input h, w, channels; kernel; strides; SAME; activation clamp), int8 and uint8.
        let cases = [
            (7, 6, 5, [3, 3], [2, 2], true, [-128, 127]),
            (7, 6, 5, [3, 2], [1, 2], false, [-128, 127]),
            (25, 5, 64, [25, 5], [25, 5], false, [-128, 127]),
            (4, 4, 3, [2, 2], [2, 2], true, [-20, 90]),
        ];
        for (h, w, c, kernel, strides, same, [min, max]) in cases {
            for unsigned in [false, true] {
                let offset = if unsigned { 128 } else { 0 };
                let output = IntOutput {
                    zero_point: 0,
                    min: min + offset,
                    max: max + offset,
                    dt: if unsigned {
                        DatumType::U8
                    } else {
                        DatumType::I8
                    },
                };
                let op = QAvgPool::new([h, w], kernel, strides, same, output);
                let ([oh, ow], [pad_h, pad_w]) = (op.out_hw, op.pad_before);
                let x = values(2 * h * w * c, (h * 31 + c) as u32, -128, 127);
                let input = if unsigned {
                    let x: Vec<u8> = x.iter().map(|&v| (v + 128) as u8).collect();
                    Tensor::from_shape(&[2, h, w, c], &x).unwrap()
                } else {
                    let x: Vec<i8> = x.iter().map(|&v| v as i8).collect();
                    Tensor::from_shape(&[2, h, w, c], &x).unwrap()
                };
                let out = op
                    .eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()))
                    .unwrap();
                assert_eq!(out[0].shape(), &[2, oh, ow, c]);
                let got = out[0].as_bytes();
                let (mut ties, mut clamped) = (0, 0);
                for (i, &g) in got.iter().enumerate() {
                    let (b, oy, ox, ch) = (i / (oh * ow * c), i / (ow * c) % oh, i / c % ow, i % c);
                    let (mut sum, mut count) = (0i64, 0i64);
                    for ky in 0..kernel[0] {
                        for kx in 0..kernel[1] {
                            let y = (oy * strides[0] + ky) as i64 - pad_h as i64;
                            let xx = (ox * strides[1] + kx) as i64 - pad_w as i64;
                            if (0..h as i64).contains(&y) && (0..w as i64).contains(&xx) {
                                let at = ((b * h + y as usize) * w + xx as usize) * c + ch;
                                sum += i64::from(x[at] + offset);
                                count += 1;
                            }
                        }
                    }
                    // The mean of the values as stored (TFLite's kernel ignores the zero point),
                    // ties away from zero.
                    let mean = sum as f64 / count as f64;
                    ties += usize::from(mean.fract().abs() == 0.5);
                    let expected = mean.round() as i32;
                    clamped += usize::from(expected < min + offset || expected > max + offset);
                    let expected = expected.clamp(min + offset, max + offset);
                    let g = if unsigned {
                        i32::from(g)
                    } else {
                        i32::from(g as i8)
                    };
                    assert_eq!(g, expected, "{h}x{w}x{c} {kernel:?} {strides:?} at {i}");
                }
                if kernel == [2, 2] {
                    assert!(ties > 0 && clamped > 0, "ties {ties}, clamped {clamped}");
                }
                // No channels: an empty output, not a panic; another input size: an error.
                let empty = Tensor::zero_dt(op.output.dt, &[1, h, w, 0]).unwrap();
                let out = op.eval(&EvalContext::out_of_plan(), tvec!(empty.into_tvalue()));
                assert_eq!(out.unwrap()[0].shape(), &[1, oh, ow, 0]);
                let other = Tensor::zero_dt(op.output.dt, &[1, h + 1, w, c]).unwrap();
                let error = op.eval(&EvalContext::out_of_plan(), tvec!(other.into_tvalue()));
                assert!(error.is_err(), "an input of another size");
            }
        }
    }

    fn eval_pair(op: &QAdd, a: Tensor, b: Tensor) -> Vec<i8> {
        let out = op
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(a.into_tvalue(), b.into_tvalue()),
            )
            .unwrap();
        out[0].as_bytes().iter().map(|&v| v as i8).collect()
    }
}
