//! Max pooling over non-overlapping windows: [`TiledMaxPool`] replaces tract's `f32` max pooling
//! where the stride equals the window (2×2 windows, stride 2: the common CNN downsampling).
//!
//! tract 0.23 has a vectorized path for 2×2 windows at stride 1 only; at stride 2 it visits each
//! tap with bounds checks, one output value at a time. On the bundled cloud CNN at batch 32 that
//! pooling took 190 µs, the model's second cost after its convolutions (`edge-agent bench
//! --profile --batch 32`). Non-overlapping windows without padding need no bounds checks: each
//! output row is the maximum of `kh` input rows taken `kw` values at a time (channels first), or
//! of `kh × kw` channel vectors (channels last).
//!
//! The rewrite ([`rewrite`]) runs on the decluttered model and takes only the poolings it covers:
//! `f32`, two spatial axes with a batch axis, window = stride, no padding, no dilation, no index
//! output. The maximum is the same value whatever the order, so results equal tract's.

use tract_core::internal::*;
use tract_core::ops::cnn::{MaxPool, PaddingSpec};
use tract_core::ops::nn::DataFormat;

use crate::program::{IntoBuffer, OutputType, eval_allocating, floats};

/// Max pooling of `f32` over windows that tile the input (stride = window, no padding).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TiledMaxPool {
    /// Channels last (NHWC) or first (NCHW), for input and output alike.
    channels_last: bool,
    /// Window (and stride) height and width.
    window: [usize; 2],
}

/// One run's sizes: images and channels, and input and output height and width.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    images: usize,
    channels: usize,
    input_hw: [usize; 2],
    output_hw: [usize; 2],
}

impl TiledMaxPool {
    /// The operator for tract's `pool`, if it covers it.
    fn for_pool(pool: &MaxPool) -> Option<Self> {
        let spec = &pool.pool_spec;
        let channels_last = match spec.data_format {
            DataFormat::NCHW => false,
            DataFormat::NHWC => true,
            // Without a batch axis: rare in exported models, left to tract.
            DataFormat::CHW | DataFormat::HWC => return None,
        };
        let [kh, kw] = spec.kernel_shape[..] else {
            return None;
        };
        let unpadded = match &spec.padding {
            PaddingSpec::Valid => true,
            PaddingSpec::Explicit(before, after) => before.iter().chain(after).all(|&p| p == 0),
            PaddingSpec::ExplicitOnnxPool(before, after, ceil_mode) => {
                !ceil_mode && before.iter().chain(after).all(|&p| p == 0)
            }
            PaddingSpec::SameUpper | PaddingSpec::SameLower => false,
        };
        let tiled = spec.strides.as_deref() == Some(&[kh, kw][..]);
        let undilated = spec
            .dilations
            .as_ref()
            .is_none_or(|d| d.iter().all(|&d| d == 1));
        (unpadded && tiled && undilated && pool.with_index_outputs.is_none() && kh * kw > 0)
            .then_some(TiledMaxPool {
                channels_last,
                window: [kh, kw],
            })
    }

    /// The sizes of a run on an input of `shape`, or why the input does not fit.
    fn geometry(&self, shape: &[usize]) -> TractResult<Geometry> {
        let &[n, a, b, c] = shape else {
            bail!("TiledMaxPool takes a 4-D input, got shape {shape:?}");
        };
        let (channels, [h, w]) = if self.channels_last {
            (c, [a, b])
        } else {
            (a, [b, c])
        };
        let [kh, kw] = self.window;
        ensure!(
            h >= kh && w >= kw,
            "TiledMaxPool: a {h}x{w} input is smaller than the {kh}x{kw} window"
        );
        Ok(Geometry {
            images: n,
            channels,
            input_hw: [h, w],
            output_hw: [h / kh, w / kw],
        })
    }

    fn output_shape(&self, g: Geometry) -> TVec<usize> {
        let [oh, ow] = g.output_hw;
        if self.channels_last {
            tvec![g.images, oh, ow, g.channels]
        } else {
            tvec![g.images, g.channels, oh, ow]
        }
    }

    fn run(&self, x: &[f32], g: Geometry, out: &mut [f32]) {
        if x.is_empty() {
            // No images or no channels: nothing to pool, and no chunks to cut.
            return;
        }
        if self.channels_last {
            self.run_channels_last(x, g, out);
        } else {
            self.run_channels_first(x, g, out);
        }
    }

    /// Plane by plane: each output row is the maximum of `kh` input rows, `kw` values at a time.
    /// Rows and columns past the last whole window are left out, as tract does.
    fn run_channels_first(&self, x: &[f32], g: Geometry, out: &mut [f32]) {
        let ([kh, kw], [h, w], [oh, ow]) = (self.window, g.input_hw, g.output_hw);
        for (plane, pooled) in x.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
            for (oy, pooled_row) in pooled.chunks_exact_mut(ow).enumerate() {
                let rows = &plane[oy * kh * w..][..kh * w];
                if [kh, kw] == [2, 2] {
                    // The common case, spelled out so that it compiles to straight-line code.
                    let (upper, lower) = rows.split_at(w);
                    let pairs = upper.chunks_exact(2).zip(lower.chunks_exact(2));
                    for (o, (u, l)) in pooled_row.iter_mut().zip(pairs) {
                        *o = larger(larger(u[0], u[1]), larger(l[0], l[1]));
                    }
                    continue;
                }
                for (ky, row) in rows.chunks_exact(w).enumerate() {
                    for (o, window) in pooled_row.iter_mut().zip(row.chunks_exact(kw)) {
                        let m = window[1..].iter().fold(window[0], |m, &v| larger(m, v));
                        *o = if ky == 0 { m } else { larger(*o, m) };
                    }
                }
            }
        }
    }

    /// Pixel by pixel: each output pixel's channels are the maximum of the window's `kh × kw`
    /// channel vectors.
    fn run_channels_last(&self, x: &[f32], g: Geometry, out: &mut [f32]) {
        let ([kh, kw], [h, w], [oh, ow], c) = (self.window, g.input_hw, g.output_hw, g.channels);
        for (image, pooled) in x
            .chunks_exact(h * w * c)
            .zip(out.chunks_exact_mut(oh * ow * c))
        {
            for (p, o) in pooled.chunks_exact_mut(c).enumerate() {
                let (oy, ox) = (p / ow, p % ow);
                for ky in 0..kh {
                    for kx in 0..kw {
                        let pixel = ((oy * kh + ky) * w + ox * kw + kx) * c;
                        let v = &image[pixel..][..c];
                        if ky == 0 && kx == 0 {
                            o.copy_from_slice(v);
                        } else {
                            o.iter_mut().zip(v).for_each(|(o, &v)| *o = larger(*o, v));
                        }
                    }
                }
            }
        }
    }
}

/// The larger of `m` and `v`, as tract's pooling compares (a NaN `v` is passed over). Unlike
/// `f32::max`, a single compare-and-select, which vectorizes to one `max` instruction.
#[inline]
fn larger(m: f32, v: f32) -> f32 {
    if m < v { v } else { m }
}

impl Op for TiledMaxPool {
    fn name(&self) -> StaticName {
        "TiledMaxPool".into()
    }
    op_as_typed_op!();
}

impl EvalOp for TiledMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_allocating(self, &inputs)
    }
}

impl IntoBuffer for TiledMaxPool {
    fn output_for(&self, inputs: &[&Tensor]) -> TractResult<OutputType> {
        let x = inputs[0];
        ensure!(
            x.datum_type() == f32::datum_type(),
            "TiledMaxPool takes f32, got {:?}",
            x.datum_type()
        );
        Ok((
            f32::datum_type(),
            self.output_shape(self.geometry(x.shape())?),
        ))
    }

    fn eval_into(&self, inputs: &[&Tensor], out: &mut Tensor) -> TractResult<()> {
        let x = inputs[0];
        let g = self.geometry(x.shape())?;
        let mut view = out.try_as_plain_ram_mut()?;
        self.run(floats(x)?, g, view.as_slice_mut::<f32>()?);
        Ok(())
    }
}

impl TypedOp for TiledMaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0]
            .shape
            .as_concrete()
            .context("TiledMaxPool needs a fixed input shape")?;
        Ok(tvec!(f32::fact(self.output_shape(self.geometry(shape)?))))
    }
    as_op!();
}

/// Replaces the max poolings of `model` (decluttered) that [`TiledMaxPool`] covers. Returns how
/// many it replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    crate::tract::replace_nodes(model, |model, node| {
        let Some(op) = node.op_as::<MaxPool>().and_then(TiledMaxPool::for_pool) else {
            return Ok(None);
        };
        let [data] = node.inputs[..] else {
            return Ok(None);
        };
        let input = model.outlet_fact(data)?;
        let fits = input.datum_type == f32::datum_type()
            && input
                .shape
                .as_concrete()
                .is_some_and(|shape| op.geometry(shape).is_ok());
        Ok(fits.then_some(op))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::PoolSpec;

    /// A small deterministic pseudo-random sequence, with repeats (ties) and negatives.
    fn values(n: usize) -> Vec<f32> {
        let mut state = 2_654_435_761u32;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 41) as f32 / 4.0 - 5.0
            })
            .collect()
    }

    fn max_pool(format: DataFormat, window: [usize; 2], padding: PaddingSpec) -> MaxPool {
        MaxPool {
            pool_spec: PoolSpec {
                data_format: format,
                kernel_shape: tvec![window[0], window[1]],
                padding,
                dilations: None,
                strides: Some(tvec![window[0], window[1]]),
                input_channels: 0,
                output_channels: 0,
            },
            with_index_outputs: None,
        }
    }

    /// One pooling of an input of `[n, c, h, w]` (laid out as `format` says) as a model, run by
    /// tract as it is, and by [`TiledMaxPool`].
    fn compare(format: DataFormat, [n, channels, h, w]: [usize; 4], window: [usize; 2]) {
        let shape = if format == DataFormat::NHWC {
            [n, h, w, channels]
        } else {
            [n, channels, h, w]
        };
        let mut pool = max_pool(format, window, PaddingSpec::Valid);
        pool.pool_spec.input_channels = channels;
        pool.pool_spec.output_channels = channels;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let y = model.wire_node("pool", pool.clone(), &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let input = Tensor::from_shape(&shape, &values(shape.iter().product())).unwrap();
        let expected = model
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec!(input.clone().into_tvalue()))
            .unwrap()
            .remove(0);
        let op = TiledMaxPool::for_pool(&pool).expect("covered");
        let got = eval_allocating(&op, &[input.into_tvalue()])
            .unwrap()
            .remove(0);
        let what = format!("{format:?} {shape:?} by {window:?}");
        assert_eq!(got.shape(), expected.shape(), "{what}");
        assert_eq!(floats(&got).unwrap(), floats(&expected).unwrap(), "{what}");
    }

    #[test]
    fn matches_tract_for_both_layouts_and_uneven_sizes() {
        for format in [DataFormat::NCHW, DataFormat::NHWC] {
            // The bundled cloud CNN's pooling, one image and a batch.
            compare(format, [1, 64, 8, 8], [2, 2]);
            compare(format, [3, 64, 8, 8], [2, 2]);
            // Rows and columns past the last whole window.
            compare(format, [2, 5, 7, 9], [2, 2]);
            compare(format, [1, 3, 9, 10], [3, 3]);
            // Unequal windows, and a window as large as the input.
            compare(format, [2, 4, 6, 6], [2, 1]);
            compare(format, [1, 2, 5, 4], [1, 3]);
            compare(format, [1, 2, 4, 4], [4, 4]);
        }
    }

    #[test]
    fn the_bundled_cloud_model_pools_its_tiles_here() {
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
        let mut tiled = model.clone();
        assert_eq!(rewrite(&mut tiled).unwrap(), 1);
        let input = Tensor::from_shape(&[4, 64], &values(256)).unwrap();
        let run = |m: TypedModel| {
            m.into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap()
                .run(tvec!(input.clone().into_tvalue()))
                .unwrap()
                .remove(0)
        };
        let (expected, got) = (run(model), run(tiled));
        assert_eq!(floats(&got).unwrap(), floats(&expected).unwrap());
    }

    #[test]
    fn other_poolings_are_left_to_tract() {
        let nchw = DataFormat::NCHW;
        assert!(TiledMaxPool::for_pool(&max_pool(nchw, [2, 2], PaddingSpec::Valid)).is_some());
        let mut overlapping = max_pool(nchw, [3, 3], PaddingSpec::Valid);
        overlapping.pool_spec.strides = Some(tvec![2, 2]);
        assert!(TiledMaxPool::for_pool(&overlapping).is_none());
        let mut default_stride = max_pool(nchw, [2, 2], PaddingSpec::Valid);
        default_stride.pool_spec.strides = None;
        assert!(TiledMaxPool::for_pool(&default_stride).is_none());
        assert!(TiledMaxPool::for_pool(&max_pool(nchw, [2, 2], PaddingSpec::SameUpper)).is_none());
        let padded = PaddingSpec::Explicit(tvec![1, 0], tvec![0, 0]);
        assert!(TiledMaxPool::for_pool(&max_pool(nchw, [2, 2], padded)).is_none());
        let ceil = PaddingSpec::ExplicitOnnxPool(tvec![0, 0], tvec![0, 0], true);
        assert!(TiledMaxPool::for_pool(&max_pool(nchw, [2, 2], ceil)).is_none());
        let mut dilated = max_pool(nchw, [2, 2], PaddingSpec::Valid);
        dilated.pool_spec.dilations = Some(tvec![2, 2]);
        assert!(TiledMaxPool::for_pool(&dilated).is_none());
        let mut with_indices = max_pool(nchw, [2, 2], PaddingSpec::Valid);
        with_indices.with_index_outputs = Some(i64::datum_type());
        assert!(TiledMaxPool::for_pool(&with_indices).is_none());
        assert!(
            TiledMaxPool::for_pool(&max_pool(DataFormat::CHW, [2, 2], PaddingSpec::Valid))
                .is_none()
        );
    }

    #[test]
    fn a_wrong_input_is_an_error() {
        let op = TiledMaxPool::for_pool(&max_pool(DataFormat::NCHW, [2, 2], PaddingSpec::Valid))
            .unwrap();
        let run = |t: Tensor| {
            eval_allocating(&op, &[t.into_tvalue()])
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(run(Tensor::zero::<f32>(&[1, 2, 1, 6]).unwrap()).contains("smaller than"));
        assert!(run(Tensor::zero::<f32>(&[2, 6, 6]).unwrap()).contains("4-D"));
        assert!(run(Tensor::zero::<i32>(&[1, 2, 6, 6]).unwrap()).contains("f32"));
    }
}
