//! A direct `f32` convolution for batches: [`DirectConv`] replaces tract's one-group, stride-1
//! `f32` convolutions on CPUs with AVX-512.
//!
//! tract runs a convolution as im2col and a matrix product. For one image it folds im2col into the
//! product (lazy im2col); for a batch it writes the im2col matrix out first, because its lazy
//! offset tables cover one image. On the bundled cloud CNN at batch 32 that write (557 µs) cost as
//! much as the product itself (558 µs), so a batch cost as much per input as one image did
//! (48.3 µs at batch 1, 50.1 µs per input at batch 32, `edge-agent bench --batch`), and the
//! escalator's batching saved no inference time. Here each output pixel's channels accumulate in
//! registers straight from the (zero-padded) input, four pixels and up to 64 channels at a time,
//! for one image or many alike.
//!
//! The rewrite ([`rewrite`]) runs on the decluttered model before tract's optimizer, takes only the
//! convolutions it covers (`f32`, one group, strides and dilations 1, constant kernel and bias,
//! fixed shapes) and leaves the rest to tract. Results differ from tract's by summation order
//! alone.

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat};
use tract_core::ops::nn::DataFormat;

use crate::program::{IntoBuffer, OutputType, eval_allocating, floats};

/// Output channels are computed in blocks of this many `f32` lanes (one AVX-512 register).
const LANES: usize = 16;

/// A one-group, stride-1 `f32` convolution with its kernel and bias built in.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DirectConv {
    /// Channels last (NHWC) or first (NCHW), for input and output alike.
    channels_last: bool,
    /// Kernel height and width.
    kernel_hw: [usize; 2],
    /// Zero rows and columns before and after the input.
    pad_before: [usize; 2],
    pad_after: [usize; 2],
    input_channels: usize,
    output_channels: usize,
    /// The kernel as `[ky][kx][input channel][output channel]`, output channels padded with
    /// zeros to a multiple of [`LANES`].
    weights: Vec<f32>,
    /// The bias, padded as the weights' output channels.
    bias: Vec<f32>,
}

impl Hash for DirectConv {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.channels_last.hash(state);
        self.kernel_hw.hash(state);
        self.pad_before.hash(state);
        self.pad_after.hash(state);
        self.input_channels.hash(state);
        self.output_channels.hash(state);
        self.weights.iter().for_each(|w| w.to_bits().hash(state));
        self.bias.iter().for_each(|b| b.to_bits().hash(state));
    }
}

impl Eq for DirectConv {}

/// The sizes of one run: images, and each image's height and width in and out.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    images: usize,
    input_hw: [usize; 2],
    output_hw: [usize; 2],
}

/// A 4-D shape's channel count and `[height, width]`, channels last or first.
fn split(channels_last: bool, shape: [usize; 4]) -> (usize, [usize; 2]) {
    let [_, a, b, c] = shape;
    if channels_last {
        (c, [a, b])
    } else {
        (a, [b, c])
    }
}

/// Where the values of an image live in a flat buffer: the distance between channels, rows and
/// columns.
#[derive(Debug, Clone, Copy)]
struct Strides {
    channel: usize,
    row: usize,
    column: usize,
}

impl DirectConv {
    /// The convolution `conv` with `kernel` (in `conv`'s kernel format) and `bias` (a scalar or
    /// one per output channel), or `None` where it is not one this operator covers.
    fn for_conv(
        conv: &Conv,
        input_shape: &[usize],
        kernel: &Tensor,
        bias: &Tensor,
    ) -> Option<DirectConv> {
        let spec = &conv.pool_spec;
        let channels_last = match spec.data_format {
            DataFormat::NHWC => true,
            DataFormat::NCHW => false,
            _ => return None,
        };
        let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
        let Ok(&shape) = <&[usize; 4]>::try_from(input_shape) else {
            return None;
        };
        if conv.q_params.is_some()
            || conv.group != 1
            || spec.kernel_shape.len() != 2
            || !ones(&spec.strides)
            || !ones(&spec.dilations)
            || kernel.datum_type() != f32::datum_type()
            || bias.datum_type() != f32::datum_type()
        {
            return None;
        }
        let [kh, kw] = [spec.kernel_shape[0], spec.kernel_shape[1]];
        let (ci, co) = (spec.input_channels, spec.output_channels);
        let (_, hw) = split(channels_last, shape);
        let padding = spec.computed_padding(&hw);
        let pad_before = [padding[0].pad_before, padding[1].pad_before];
        let pad_after = [padding[0].pad_after, padding[1].pad_after];
        let k = floats(kernel).ok()?;
        if k.len() != co * ci * kh * kw {
            return None;
        }
        let cop = co.next_multiple_of(LANES);
        let mut weights = vec![0f32; kh * kw * ci * cop];
        for o in 0..co {
            for i in 0..ci {
                for y in 0..kh {
                    for x in 0..kw {
                        let from = match conv.kernel_fmt {
                            KernelFormat::OIHW => ((o * ci + i) * kh + y) * kw + x,
                            KernelFormat::HWIO => ((y * kw + x) * ci + i) * co + o,
                            KernelFormat::OHWI => ((o * kh + y) * kw + x) * ci + i,
                        };
                        weights[((y * kw + x) * ci + i) * cop + o] = k[from];
                    }
                }
            }
        }
        let b = floats(bias).ok()?;
        let mut padded_bias = vec![0f32; cop];
        match b.len() {
            1 => padded_bias[..co].fill(b[0]),
            n if n == co => padded_bias[..co].copy_from_slice(b),
            _ => return None,
        }
        Some(DirectConv {
            channels_last,
            kernel_hw: [kh, kw],
            pad_before,
            pad_after,
            input_channels: ci,
            output_channels: co,
            weights,
            bias: padded_bias,
        })
    }

    /// The sizes of a run on an input of `shape`, checking its channels.
    fn geometry(&self, shape: &[usize]) -> TractResult<Geometry> {
        let Ok(&four) = <&[usize; 4]>::try_from(shape) else {
            bail!("DirectConv takes a 4-D input, got {shape:?}");
        };
        let (channels, hw) = split(self.channels_last, four);
        ensure!(
            channels == self.input_channels,
            "DirectConv was built for {} input channels, got {channels}",
            self.input_channels
        );
        ensure!(
            channels > 0 && hw.iter().all(|&d| d > 0),
            "DirectConv: the input {shape:?} is empty"
        );
        let [kh, kw] = self.kernel_hw;
        let out = [0, 1].map(|axis| {
            (hw[axis] + self.pad_before[axis] + self.pad_after[axis] + 1)
                .saturating_sub(self.kernel_hw[axis])
        });
        ensure!(
            out.iter().all(|&d| d > 0),
            "DirectConv: a {kh}x{kw} kernel does not fit a {hw:?} input"
        );
        Ok(Geometry {
            images: four[0],
            input_hw: hw,
            output_hw: out,
        })
    }

    fn output_shape(&self, g: Geometry) -> TVec<usize> {
        let [oh, ow] = g.output_hw;
        if self.channels_last {
            tvec![g.images, oh, ow, self.output_channels]
        } else {
            tvec![g.images, self.output_channels, oh, ow]
        }
    }

    /// Convolves the images of `x` into `out` (layouts as `channels_last`).
    fn run(&self, x: &[f32], g: Geometry, out: &mut [f32]) {
        self.run_with(x, g, out, true);
    }

    /// [`DirectConv::run`] on the portable path alone.
    #[cfg(test)]
    fn run_portable(&self, x: &[f32], g: Geometry, out: &mut [f32]) {
        self.run_with(x, g, out, false);
    }

    fn run_with(&self, x: &[f32], g: Geometry, out: &mut [f32], vectorized: bool) {
        let [h, w] = g.input_hw;
        let [oh, ow] = g.output_hw;
        let ci = self.input_channels;
        let (ph, pw) = (
            h + self.pad_before[0] + self.pad_after[0],
            w + self.pad_before[1] + self.pad_after[1],
        );
        let padded_strides = if self.channels_last {
            Strides {
                channel: 1,
                row: pw * ci,
                column: ci,
            }
        } else {
            Strides {
                channel: ph * pw,
                row: pw,
                column: 1,
            }
        };
        let cop = self.bias.len();
        let mut padded = vec![0f32; ph * pw * ci];
        let mut row = vec![0f32; ow * cop];
        let image_len = h * w * ci;
        let out_len = oh * ow * self.output_channels;
        for (image, out) in x
            .chunks_exact(image_len)
            .zip(out.chunks_exact_mut(out_len))
            .take(g.images)
        {
            self.pad(image, g.input_hw, &mut padded, padded_strides);
            for oy in 0..oh {
                self.output_row(&padded, padded_strides, oy, &mut row, vectorized);
                self.store_row(&row, oy, [oh, ow], out);
            }
        }
    }

    /// Copies one image into the zero borders of `padded`.
    fn pad(&self, image: &[f32], [h, w]: [usize; 2], padded: &mut [f32], s: Strides) {
        let ci = self.input_channels;
        let [top, left] = self.pad_before;
        for y in 0..h {
            if self.channels_last {
                let from = y * w * ci;
                let to = (y + top) * s.row + left * s.column;
                padded[to..to + w * ci].copy_from_slice(&image[from..from + w * ci]);
            } else {
                for c in 0..ci {
                    let from = (c * h + y) * w;
                    let to = c * s.channel + (y + top) * s.row + left;
                    padded[to..to + w].copy_from_slice(&image[from..from + w]);
                }
            }
        }
    }

    /// Output row `oy` as `[x][output channel]` (channels padded) into `row`.
    fn output_row(&self, padded: &[f32], s: Strides, oy: usize, row: &mut [f32], vectorized: bool) {
        #[cfg(target_arch = "x86_64")]
        if vectorized && avx512() {
            // SAFETY: AVX-512F is present (checked just above); every index stays inside
            // `padded`, `weights`, `bias` and `row`, whose lengths follow from the geometry.
            #[allow(unsafe_code)]
            unsafe {
                avx512::output_row(self, padded, s, oy, row)
            };
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = vectorized; // The portable path is the only one here.
        self.output_row_portable(padded, s, oy, row);
    }

    fn output_row_portable(&self, padded: &[f32], s: Strides, oy: usize, row: &mut [f32]) {
        let [kh, kw] = self.kernel_hw;
        let ci = self.input_channels;
        let cop = self.bias.len();
        for (ox, acc) in row.chunks_exact_mut(cop).enumerate() {
            acc.copy_from_slice(&self.bias);
            for ky in 0..kh {
                for kx in 0..kw {
                    for c in 0..ci {
                        let v = padded[c * s.channel + (oy + ky) * s.row + (ox + kx) * s.column];
                        let w = &self.weights[((ky * kw + kx) * ci + c) * cop..][..cop];
                        for (a, &w) in acc.iter_mut().zip(w) {
                            *a += v * w;
                        }
                    }
                }
            }
        }
    }

    /// Writes one output row (`[x][channel]`, channels padded) to its place in `out`.
    fn store_row(&self, row: &[f32], oy: usize, [oh, ow]: [usize; 2], out: &mut [f32]) {
        let co = self.output_channels;
        let cop = self.bias.len();
        if self.channels_last {
            let to = &mut out[oy * ow * co..][..ow * co];
            for (to, from) in to.chunks_exact_mut(co).zip(row.chunks_exact(cop)) {
                to.copy_from_slice(&from[..co]);
            }
        } else {
            for (o, plane) in out.chunks_exact_mut(oh * ow).enumerate() {
                for (ox, to) in plane[oy * ow..][..ow].iter_mut().enumerate() {
                    *to = row[ox * cop + o];
                }
            }
        }
    }
}

/// Whether this CPU has AVX-512F (checked once, then cached by the standard library).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether [`rewrite`] replaces convolutions on this CPU: only with AVX-512, where it was measured
/// faster than tract's; elsewhere tract's own kernels stay.
fn worth_it() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{DirectConv, LANES, Strides};

    /// Pixels per register block.
    const PIXELS: usize = 4;

    /// See [`DirectConv::output_row`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_row(
        conv: &DirectConv,
        padded: &[f32],
        s: Strides,
        oy: usize,
        row: &mut [f32],
    ) {
        let cop = conv.bias.len();
        let ow = row.len() / cop;
        let mut oc = 0;
        while oc < cop {
            let vectors = ((cop - oc) / LANES).min(4);
            let mut ox = 0;
            // SAFETY (all calls): the caller's guarantees; `ox + pixels <= ow`, `oc + 16 *
            // vectors <= cop`.
            unsafe {
                while ox + PIXELS <= ow {
                    match vectors {
                        4 => block::<PIXELS, 4>(conv, padded, s, oy, ox, oc, row),
                        3 => block::<PIXELS, 3>(conv, padded, s, oy, ox, oc, row),
                        2 => block::<PIXELS, 2>(conv, padded, s, oy, ox, oc, row),
                        _ => block::<PIXELS, 1>(conv, padded, s, oy, ox, oc, row),
                    }
                    ox += PIXELS;
                }
                while ox < ow {
                    match vectors {
                        4 => block::<1, 4>(conv, padded, s, oy, ox, oc, row),
                        3 => block::<1, 3>(conv, padded, s, oy, ox, oc, row),
                        2 => block::<1, 2>(conv, padded, s, oy, ox, oc, row),
                        _ => block::<1, 1>(conv, padded, s, oy, ox, oc, row),
                    }
                    ox += 1;
                }
            }
            oc += vectors * LANES;
        }
    }

    /// `P` output pixels from `ox` by `V` × 16 output channels from `oc`, accumulated in
    /// registers over every kernel tap and input channel, bias added, stored to `row`.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const P: usize, const V: usize>(
        conv: &DirectConv,
        padded: &[f32],
        s: Strides,
        oy: usize,
        ox: usize,
        oc: usize,
        row: &mut [f32],
    ) {
        let [kh, kw] = conv.kernel_hw;
        let ci = conv.input_channels;
        let cop = conv.bias.len();
        let x = padded.as_ptr();
        let w = conv.weights.as_ptr();
        // SAFETY: indices as promised by `output_row`'s caller.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; P];
            for ky in 0..kh {
                for kx in 0..kw {
                    let taps = w.add((ky * kw + kx) * ci * cop + oc);
                    let pixels = x.add((oy + ky) * s.row + (ox + kx) * s.column);
                    for c in 0..ci {
                        let mut weights = [_mm512_setzero_ps(); V];
                        for (v, wv) in weights.iter_mut().enumerate() {
                            *wv = _mm512_loadu_ps(taps.add(c * cop + v * LANES));
                        }
                        for (p, acc) in acc.iter_mut().enumerate() {
                            let value = _mm512_set1_ps(*pixels.add(c * s.channel + p * s.column));
                            for (a, wv) in acc.iter_mut().zip(&weights) {
                                *a = _mm512_fmadd_ps(value, *wv, *a);
                            }
                        }
                    }
                }
            }
            let bias = conv.bias.as_ptr().add(oc);
            let out = row.as_mut_ptr();
            for (p, acc) in acc.iter().enumerate() {
                for (v, a) in acc.iter().enumerate() {
                    let sum = _mm512_add_ps(*a, _mm512_loadu_ps(bias.add(v * LANES)));
                    _mm512_storeu_ps(out.add((ox + p) * cop + oc + v * LANES), sum);
                }
            }
        }
    }
}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "DirectConv".into()
    }
    op_as_typed_op!();
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for DirectConv {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        let x = inputs[0];
        ensure!(
            x.datum_type() == f32::datum_type(),
            "DirectConv takes f32, got {:?}",
            x.datum_type()
        );
        let g = self.geometry(x.shape())?;
        Ok((f32::datum_type(), self.output_shape(g)))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let x = inputs[0];
        let g = self.geometry(x.shape())?;
        let mut view = out.try_as_plain_ram_mut()?;
        self.run(floats(x)?, g, view.as_slice_mut::<f32>()?);
        Ok(())
    }
}

impl TypedOp for DirectConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0]
            .shape
            .as_concrete()
            .context("DirectConv needs a fixed input shape")?;
        Ok(tvec!(f32::fact(self.output_shape(self.geometry(shape)?))))
    }
    as_op!();
}

/// Replaces the convolutions of `model` (decluttered) that [`DirectConv`] covers, where it is
/// faster than tract's on this CPU. Returns how many it replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !worth_it() {
        return Ok(0);
    }
    crate::tract::replace_nodes(model, |model, node| {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let [data, kernel, bias] = node.inputs[..] else {
            return Ok(None);
        };
        let input = model.outlet_fact(data)?;
        let (Some(shape), Some(kernel), Some(bias)) = (
            input.shape.as_concrete(),
            model.outlet_fact(kernel)?.konst.clone(),
            model.outlet_fact(bias)?.konst.clone(),
        ) else {
            return Ok(None);
        };
        if input.datum_type != f32::datum_type() {
            return Ok(None);
        }
        // Fewer than 16 output channels would leave most of each register padding, where
        // tract's kernels do better; an input it cannot take (empty) is left to tract too.
        Ok(DirectConv::for_conv(conv, shape, &kernel, &bias)
            .filter(|op| op.output_channels >= LANES && op.geometry(shape).is_ok()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    /// A small deterministic pseudo-random sequence.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// One convolution as a model, run by tract as it is, and with [`DirectConv`] in its place.
    fn compare(
        format: DataFormat,
        kernel_fmt: KernelFormat,
        shape: [usize; 4],
        (co, [kh, kw]): (usize, [usize; 2]),
        padding: PaddingSpec,
    ) {
        let ci = if format == DataFormat::NHWC {
            shape[3]
        } else {
            shape[1]
        };
        let kernel_shape: Vec<usize> = match kernel_fmt {
            KernelFormat::OIHW => vec![co, ci, kh, kw],
            KernelFormat::HWIO => vec![kh, kw, ci, co],
            KernelFormat::OHWI => vec![co, kh, kw, ci],
        };
        let kernel = Tensor::from_shape(&kernel_shape, &values(co * ci * kh * kw, 1)).unwrap();
        let bias = Tensor::from_shape(&[co], &values(co, 2)).unwrap();
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: format,
                kernel_shape: tvec![kh, kw],
                padding,
                dilations: None,
                strides: None,
                input_channels: ci,
                output_channels: co,
            },
            kernel_fmt,
            group: 1,
            q_params: None,
        };
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let k = model.add_const("k", kernel).unwrap();
        let b = model.add_const("b", bias).unwrap();
        let y = model.wire_node("conv", conv, &[x, k, b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let input = Tensor::from_shape(&shape, &values(shape.iter().product(), 3)).unwrap();
        let expected = model
            .clone()
            .into_runnable()
            .unwrap()
            .run(tvec!(input.clone().into_tvalue()))
            .unwrap()
            .remove(0);
        let node = model.node(y[0].node);
        let op = DirectConv::for_conv(
            node.op_as::<Conv>().unwrap(),
            &shape,
            &model.outlet_fact(k).unwrap().konst.clone().unwrap(),
            &model.outlet_fact(b).unwrap().konst.clone().unwrap(),
        )
        .expect("covered");
        let got = eval_allocating(&op, &[input.clone().into_tvalue()])
            .unwrap()
            .remove(0);
        let what = format!("{format:?} {kernel_fmt:?} {shape:?} -> {co} by {kh}x{kw}");
        assert_eq!(got.shape(), expected.shape(), "{what}");
        let (got, expected) = (floats(&got).unwrap(), floats(&expected).unwrap());
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4 + 1e-4 * e.abs(),
                "{what}: element {i}: {g} against tract's {e}"
            );
        }
        // The portable path gives the same sums as the vectorized one, in the same order.
        let mut portable = vec![0f32; got.len()];
        let g = op.geometry(&shape).unwrap();
        op.run_portable(floats(&input).unwrap(), g, &mut portable);
        for (i, (p, e)) in portable.iter().zip(expected).enumerate() {
            assert!(
                (p - e).abs() <= 1e-4 + 1e-4 * e.abs(),
                "{what} (portable): element {i}: {p} against tract's {e}"
            );
        }
    }

    #[test]
    fn matches_tract_across_layouts_kernels_and_padding() {
        let same = PaddingSpec::SameUpper;
        // The bundled cloud CNN's two layers, one image and a batch.
        for n in [1, 3] {
            compare(
                DataFormat::NCHW,
                KernelFormat::OIHW,
                [n, 1, 8, 8],
                (32, [3, 3]),
                same.clone(),
            );
            compare(
                DataFormat::NCHW,
                KernelFormat::OIHW,
                [n, 32, 8, 8],
                (64, [3, 3]),
                same.clone(),
            );
        }
        // Channels last, the other kernel formats, output channels not a multiple of 16 (one
        // and two vector blocks, and a remainder of pixels), no padding and uneven padding.
        compare(
            DataFormat::NHWC,
            KernelFormat::HWIO,
            [2, 7, 9, 5],
            (20, [3, 3]),
            same.clone(),
        );
        compare(
            DataFormat::NHWC,
            KernelFormat::OHWI,
            [1, 5, 6, 3],
            (70, [1, 1]),
            PaddingSpec::Valid,
        );
        compare(
            DataFormat::NCHW,
            KernelFormat::OIHW,
            [2, 4, 6, 5],
            (3, [2, 3]),
            PaddingSpec::ExplicitOnnxPool(tvec![0, 2], tvec![1, 0], false),
        );
        compare(
            DataFormat::NHWC,
            KernelFormat::HWIO,
            [1, 5, 5, 2],
            (17, [5, 5]),
            PaddingSpec::Valid,
        );
    }

    #[test]
    fn the_bundled_cloud_model_runs_its_convolutions_directly_where_that_pays() {
        use tract_onnx::prelude::InferenceModelExt;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/digits-cloud.onnx"
        );
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .with_input_fact(0, f32::fact([4, 64]).into())
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap();
        let mut direct = model.clone();
        let replaced = rewrite(&mut direct).unwrap();
        assert_eq!(replaced, if worth_it() { 2 } else { 0 });
        let input = Tensor::from_shape(&[4, 64], &values(256, 4)).unwrap();
        let run = |m: TypedModel| {
            m.into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap()
                .run(tvec!(input.clone().into_tvalue()))
                .unwrap()
                .remove(0)
        };
        let (expected, got) = (run(model), run(direct));
        for (g, e) in floats(&got).unwrap().iter().zip(floats(&expected).unwrap()) {
            assert!((g - e).abs() <= 1e-5, "{g} against tract's {e}");
        }
    }

    /// A 3x3 NCHW convolution of 2 channels per group to 4, with its kernel and bias.
    fn small_conv(group: usize, strides: Option<TVec<usize>>) -> (Conv, Tensor, Tensor) {
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Valid,
                dilations: None,
                strides,
                input_channels: 2 * group,
                output_channels: 4,
            },
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        };
        let kernel = Tensor::from_shape(&[4, 2, 3, 3], &values(72, 1)).unwrap();
        let bias = Tensor::from_shape(&[4], &values(4, 2)).unwrap();
        (conv, kernel, bias)
    }

    #[test]
    fn other_convolutions_are_left_to_tract() {
        let (_, kernel, bias) = small_conv(1, None);
        let conv = |group, strides| small_conv(group, strides).0;
        let shape = [1, 2, 6, 6];
        assert!(DirectConv::for_conv(&conv(1, None), &shape, &kernel, &bias).is_some());
        assert!(
            DirectConv::for_conv(&conv(1, Some(tvec![2, 2])), &shape, &kernel, &bias).is_none()
        );
        assert!(DirectConv::for_conv(&conv(2, None), &shape, &kernel, &bias).is_none());
        let mut quantized = conv(1, None);
        quantized.q_params = Some(i8::datum_type());
        assert!(DirectConv::for_conv(&quantized, &shape, &kernel, &bias).is_none());
    }

    #[test]
    fn a_wrong_input_is_an_error() {
        let (conv, kernel, bias) = small_conv(1, None);
        let op = DirectConv::for_conv(&conv, &[1, 2, 6, 6], &kernel, &bias).unwrap();
        let run = |t: Tensor| {
            eval_allocating(&op, &[t.into_tvalue()])
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(run(Tensor::zero::<f32>(&[1, 3, 6, 6]).unwrap()).contains("input channels"));
        assert!(run(Tensor::zero::<f32>(&[1, 2, 2, 2]).unwrap()).contains("does not fit"));
        assert!(run(Tensor::zero::<f32>(&[2, 6, 6]).unwrap()).contains("4-D"));
        assert!(run(Tensor::zero::<f32>(&[1, 2, 0, 6]).unwrap()).contains("empty"));
        assert!(run(Tensor::zero::<i32>(&[1, 2, 6, 6]).unwrap()).contains("f32"));
    }
}
