//! The graph run on an NVIDIA GPU through cudarc: cuBLAS for matrix products and convolutions
//! (im2col, then one strided-batched GEMM), NVRTC-compiled kernels for everything else.
//!
//! cudarc loads libcuda, libcublas and libnvrtc at run time (feature `dynamic-loading`), so a
//! build with `cuda` still starts on a machine without them: [`CudaModel::new`] checks that the
//! libraries load and a device answers before touching anything else, and the caller runs the
//! model on CPU otherwise.
//!
//! Weights are uploaded once. Activations live in device buffers allocated per batch-size
//! bucket (the next power of two), so a batcher that sends batches of 1 to `max_batch` allocates
//! at most `log2(max_batch) + 1` sets. Inputs and outputs cross through pinned host buffers. One
//! CUDA stream per loaded model; concurrent callers take turns on it.

// cudarc's kernel launches, GEMMs and pinned allocations are `unsafe` (the library cannot check
// a kernel's arguments); each use says why it holds.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::graph::{Graph, Operand, Step, row_major_strides};
use crate::error::InferError;
use crate::model::{Model, ModelInfo};
use crate::tensor::Tensor;

/// The kernels; each one's meaning is the matching arm of `reference.rs`.
const KERNELS: &str = r#"
// NVRTC compiles without the C library headers, so <math.h>'s INFINITY is not there.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

extern "C" __global__ void unary(const float* x, float* y, unsigned n, int op, float a, float b) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    switch (op) {
        case 0: v = fmaxf(v, 0.0f); break;
        case 1: v = 1.0f / (1.0f + expf(-v)); break;
        case 2: v = fminf(fmaxf(v, a), b); break;
        case 3: v = tanhf(v); break;
        case 4: v = v >= 0.0f ? v : a * v; break;
    }
    y[i] = v;
}

// y = a op b, b read at i % period (period = n for a value, one sample for a constant).
extern "C" __global__ void binary(const float* a, const float* b, float* y, unsigned n,
                                  unsigned period, int op, int reversed) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float l = a[i], r = b[i % period];
    if (reversed) { float t = l; l = r; r = t; }
    float v;
    switch (op) {
        case 0: v = l + r; break;
        case 1: v = l - r; break;
        case 2: v = l * r; break;
        default: v = l / r; break;
    }
    y[i] = v;
}

// Bias of a matrix product's rows (bias[i % n]) or of a convolution's channels
// (bias[(i / positions) % channels]), added in place.
extern "C" __global__ void add_bias(float* y, const float* bias, unsigned n, unsigned positions,
                                   unsigned channels) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] += bias[(i / positions) % channels];
}

// One column matrix [C*KH*KW, OH*OW] per sample.
extern "C" __global__ void im2col(const float* x, float* col, unsigned total, unsigned c,
                                  unsigned h, unsigned w, unsigned kh, unsigned kw,
                                  unsigned sh, unsigned sw, unsigned ph, unsigned pw,
                                  unsigned dh, unsigned dw, unsigned oh, unsigned ow) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    unsigned positions = oh * ow, k = c * kh * kw;
    unsigned p = i % positions, row = (i / positions) % k, s = i / (positions * k);
    unsigned ch = row / (kh * kw), r = (row / kw) % kh, q = row % kw;
    int iy = (int)((p / ow) * sh + r * dh) - (int)ph;
    int ix = (int)((p % ow) * sw + q * dw) - (int)pw;
    float v = 0.0f;
    if (iy >= 0 && ix >= 0 && iy < (int)h && ix < (int)w)
        v = x[((s * c + ch) * h + iy) * w + ix];
    col[i] = v;
}

extern "C" __global__ void pool(const float* x, float* y, unsigned total, unsigned h, unsigned w,
                                unsigned kh, unsigned kw, unsigned sh, unsigned sw, unsigned ph,
                                unsigned pw, unsigned oh, unsigned ow, int average,
                                int count_include_pad) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    unsigned ox = i % ow, oy = (i / ow) % oh, plane = i / (ow * oh);
    float best = -INFINITY, sum = 0.0f;
    unsigned count = 0;
    for (unsigned r = 0; r < kh; r++) {
        for (unsigned q = 0; q < kw; q++) {
            int iy = (int)(oy * sh + r) - (int)ph, ix = (int)(ox * sw + q) - (int)pw;
            if (iy < 0 || ix < 0 || iy >= (int)h || ix >= (int)w) {
                if (count_include_pad) count++;
                continue;
            }
            float v = x[(plane * h + iy) * w + ix];
            best = fmaxf(best, v);
            sum += v;
            count++;
        }
    }
    y[i] = average ? sum / (float)count : best;
}

// One thread per row: the rows are short (class scores).
extern "C" __global__ void softmax(const float* x, float* y, unsigned rows, unsigned cols) {
    unsigned row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float* in = x + (size_t)row * cols;
    float* out = y + (size_t)row * cols;
    float m = -INFINITY;
    for (unsigned j = 0; j < cols; j++) m = fmaxf(m, in[j]);
    float sum = 0.0f;
    for (unsigned j = 0; j < cols; j++) { float e = expf(in[j] - m); out[j] = e; sum += e; }
    for (unsigned j = 0; j < cols; j++) out[j] /= sum;
}

// meta = [rank, out_shape[rank], in_stride_of_out_axis[rank]], per sample.
extern "C" __global__ void transpose(const float* x, float* y, unsigned n, unsigned per,
                                     const unsigned* meta) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned rank = meta[0], rest = i % per, src = 0;
    for (int axis = (int)rank - 1; axis >= 0; axis--) {
        unsigned d = meta[1 + axis];
        src += (rest % d) * meta[1 + rank + axis];
        rest /= d;
    }
    y[i] = x[(i / per) * per + src];
}

// Copies blocks of `block` elements from x to y, spaced `stride` apart, from `offset`.
extern "C" __global__ void copy_blocks(const float* x, float* y, unsigned n, unsigned block,
                                       unsigned stride, unsigned offset) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[(i / block) * stride + offset + i % block] = x[i];
}
"#;

/// Why the GPU engine could not start or run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CudaError {
    #[error("{0} could not be loaded (is the NVIDIA driver installed and LD_LIBRARY_PATH set?)")]
    Library(&'static str),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(#[from] cudarc::nvrtc::CompileError),
    #[error("{0} is too large for the GPU engine's 32-bit indexing; use a smaller max_batch")]
    TooLarge(String),
}

struct Kernels {
    unary: CudaFunction,
    binary: CudaFunction,
    add_bias: CudaFunction,
    im2col: CudaFunction,
    pool: CudaFunction,
    softmax: CudaFunction,
    transpose: CudaFunction,
    copy_blocks: CudaFunction,
}

/// Device buffers for batches up to `capacity` samples.
struct Activations {
    /// One per graph buffer; taken out while a step writes it.
    buffers: Vec<Option<CudaSlice<f32>>>,
    im2col: Option<CudaSlice<f32>>,
    /// Pinned staging for each graph input and output.
    inputs: Vec<PinnedHostSlice<f32>>,
    outputs: Vec<PinnedHostSlice<f32>>,
}

struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    weights: Vec<CudaSlice<f32>>,
    /// Per Transpose step (by step index): its index metadata.
    transposes: HashMap<usize, CudaSlice<u32>>,
    /// By batch capacity.
    activations: HashMap<usize, Activations>,
}

/// A model on the GPU.
pub(crate) struct CudaModel {
    info: ModelInfo,
    graph: Graph,
    device: Mutex<Device>,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn u32_of(n: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| CudaError::TooLarge(what.to_string()))
}

impl CudaModel {
    /// Opens GPU 0, compiles the kernels and uploads the weights.
    pub(crate) fn new(graph: Graph, mut info: ModelInfo) -> Result<Self, CudaError> {
        // SAFETY: these only try to dlopen the libraries (running their initialisers, as any
        // use of CUDA would); cudarc would panic on first use instead if one were missing.
        unsafe {
            if !cudarc::driver::sys::is_culib_present() {
                return Err(CudaError::Library("libcuda (the NVIDIA driver)"));
            }
            if !cudarc::cublas::sys::is_culib_present() {
                return Err(CudaError::Library("libcublas"));
            }
            if !cudarc::nvrtc::sys::is_culib_present() {
                return Err(CudaError::Library("libnvrtc"));
            }
        }
        let ctx = CudaContext::new(0)?;
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let module = ctx.load_module(cudarc::nvrtc::compile_ptx(KERNELS)?)?;
        let kernels = Kernels {
            unary: module.load_function("unary")?,
            binary: module.load_function("binary")?,
            add_bias: module.load_function("add_bias")?,
            im2col: module.load_function("im2col")?,
            pool: module.load_function("pool")?,
            softmax: module.load_function("softmax")?,
            transpose: module.load_function("transpose")?,
            copy_blocks: module.load_function("copy_blocks")?,
        };
        let weights = graph
            .weights
            .iter()
            .map(|w| stream.clone_htod(w))
            .collect::<Result<Vec<_>, _>>()?;
        let mut transposes = HashMap::new();
        for (i, step) in graph.steps.iter().enumerate() {
            if let Step::Transpose { x, out, perm } = step {
                let strides = row_major_strides(&graph.values[*x].shape);
                let out_shape = &graph.values[*out].shape;
                let mut meta = vec![u32_of(out_shape.len(), "rank")?];
                for &d in out_shape {
                    meta.push(u32_of(d, "a dimension")?);
                }
                for &p in perm {
                    meta.push(u32_of(strides[p], "a stride")?);
                }
                transposes.insert(i, stream.clone_htod(&meta)?);
            }
        }
        tracing::info!(
            model = %info.source,
            gpu = %ctx.name().unwrap_or_default(),
            weights = graph.weights.iter().map(Vec::len).sum::<usize>(),
            steps = graph.steps.len(),
            "model on the GPU"
        );
        info.backend = "cuda";
        Ok(CudaModel {
            info,
            graph,
            device: Mutex::new(Device {
                ctx,
                stream,
                blas,
                kernels,
                weights,
                transposes,
                activations: HashMap::new(),
            }),
        })
    }

    fn run_error(&self, detail: impl std::fmt::Display) -> InferError {
        InferError::Run {
            model: self.info.source.clone(),
            detail: format!("GPU: {detail}"),
        }
    }

    fn run_batch(
        &self,
        device: &mut Device,
        batch: usize,
        inputs: &[&[f32]],
    ) -> Result<Vec<Vec<f32>>, CudaError> {
        let capacity = batch.next_power_of_two();
        if !device.activations.contains_key(&capacity) {
            let acts = allocate(&self.graph, device, capacity)?;
            device.activations.insert(capacity, acts);
        }
        let Device {
            stream,
            blas,
            kernels,
            weights,
            transposes,
            activations,
            ..
        } = device;
        let on = Launcher {
            stream,
            blas,
            kernels,
            weights,
            transposes,
        };
        let acts = activations.get_mut(&capacity).expect("allocated above");
        let result = self.execute(&on, acts, batch, inputs);
        if result.is_err() {
            // A failed launch or copy may leave the buffers half written; start afresh.
            activations.remove(&capacity);
        }
        result
    }

    fn execute(
        &self,
        on: &Launcher<'_>,
        acts: &mut Activations,
        batch: usize,
        inputs: &[&[f32]],
    ) -> Result<Vec<Vec<f32>>, CudaError> {
        let graph = &self.graph;
        for ((&id, data), staging) in graph.inputs.iter().zip(inputs).zip(&mut acts.inputs) {
            let staged = &mut staging.as_mut_slice()?[..data.len()];
            staged.copy_from_slice(data);
            let buffer = acts.buffers[graph.values[id].buffer]
                .as_mut()
                .expect("buffers are put back after every step");
            // Only this batch's samples, not the whole bucket.
            on.stream
                .memcpy_htod(&*staged, &mut buffer.slice_mut(..data.len()))?;
        }
        for (index, step) in graph.steps.iter().enumerate() {
            let out_buffer = graph.values[step_output(step)].buffer;
            let mut out = acts.buffers[out_buffer]
                .take()
                .expect("every step writes a buffer of its own");
            let result = on.step(
                graph,
                index,
                step,
                batch,
                &acts.buffers,
                &mut out,
                acts.im2col.as_mut(),
            );
            acts.buffers[out_buffer] = Some(out);
            result?;
        }
        let mut lens = Vec::with_capacity(graph.outputs.len());
        for (&id, staging) in graph.outputs.iter().zip(&mut acts.outputs) {
            let len = graph.values[id].len() * batch;
            let buffer = acts.buffers[graph.values[id].buffer]
                .as_ref()
                .expect("buffers are put back after every step");
            on.stream
                .memcpy_dtoh(&buffer.slice(..len), &mut staging.as_mut_slice()?[..len])?;
            lens.push(len);
        }
        on.stream.synchronize()?;
        acts.outputs
            .iter()
            .zip(lens)
            .map(|(staging, len)| Ok(staging.as_slice()?[..len].to_vec()))
            .collect()
    }
}

/// What a step needs from the device besides the activations.
struct Launcher<'a> {
    stream: &'a Arc<CudaStream>,
    blas: &'a CudaBlas,
    kernels: &'a Kernels,
    weights: &'a [CudaSlice<f32>],
    transposes: &'a HashMap<usize, CudaSlice<u32>>,
}

/// Largest im2col matrix kept on the device, in elements (64 MiB): a convolution over a large
/// batch is run in chunks of samples that fit.
const IM2COL_ELEMENTS: usize = 16 << 20;

/// Samples per im2col chunk for a convolution whose matrix is `k_p` elements per sample.
fn im2col_chunk(k_p: usize, capacity: usize) -> usize {
    (IM2COL_ELEMENTS / k_p.max(1)).clamp(1, capacity)
}

impl Launcher<'_> {
    /// Enqueues one step. `allocate` checked that every buffer of the bucket has fewer than
    /// `i32::MAX` elements, so no size or index below overflows the kernels' 32-bit arithmetic
    /// or cuBLAS's `int`s.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        graph: &Graph,
        index: usize,
        step: &Step,
        batch: usize,
        buffers: &[Option<CudaSlice<f32>>],
        out: &mut CudaSlice<f32>,
        im2col: Option<&mut CudaSlice<f32>>,
    ) -> Result<(), CudaError> {
        let read = |id: usize| {
            buffers[graph.values[id].buffer]
                .as_ref()
                .expect("a step never reads the buffer it writes")
        };
        let n = (graph.values[step_output(step)].len() * batch) as u32;
        let cfg = LaunchConfig::for_num_elems(n);
        let (stream, kernels, weights) = (self.stream, self.kernels, self.weights);
        // SAFETY (every launch and GEMM below): the arguments match the kernel signatures in
        // KERNELS in number, order and type, and every buffer holds at least `batch` samples of
        // the sizes the lowering derived, which bound every index the kernels compute.
        match step {
            Step::MatMul {
                x,
                weight,
                bias,
                rows,
                k,
                n: cols,
                ..
            } => {
                // Row-major y = x · w is column-major yᵀ = wᵀ · xᵀ: w first, no transposes.
                let gemm = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_N,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: *cols as i32,
                    n: (batch * rows) as i32,
                    k: *k as i32,
                    alpha: 1.0f32,
                    lda: *cols as i32,
                    ldb: *k as i32,
                    beta: 0.0f32,
                    ldc: *cols as i32,
                };
                unsafe { self.blas.gemm(gemm, &weights[*weight], read(*x), out)? };
                if let Some(b) = bias {
                    let cols = *cols as u32;
                    let mut launch = stream.launch_builder(&kernels.add_bias);
                    launch
                        .arg(&mut *out)
                        .arg(&weights[*b])
                        .arg(&n)
                        .arg(&1u32)
                        .arg(&cols);
                    unsafe { launch.launch(cfg)? };
                }
            }
            Step::Conv(c) => {
                let col = im2col.expect("allocated when the graph has a convolution");
                let (k, p) = (c.k(), c.positions());
                let chunk = im2col_chunk(k * p, batch);
                let dims = [
                    c.c,
                    c.h,
                    c.w,
                    c.kh,
                    c.kw,
                    c.stride.0,
                    c.stride.1,
                    c.pad.0,
                    c.pad.1,
                    c.dilation.0,
                    c.dilation.1,
                    c.oh,
                    c.ow,
                ]
                .map(|d| d as u32);
                let x = read(c.x);
                let per_in = c.c * c.h * c.w;
                let mut start = 0;
                while start < batch {
                    let samples = chunk.min(batch - start);
                    let total = (k * p * samples) as u32;
                    let input = x.slice(start * per_in..(start + samples) * per_in);
                    let mut launch = stream.launch_builder(&kernels.im2col);
                    launch.arg(&input).arg(&mut *col).arg(&total);
                    for d in &dims {
                        launch.arg(d);
                    }
                    unsafe { launch.launch(LaunchConfig::for_num_elems(total))? };
                    // Per sample, row-major out[M×P] = W[M×K] · col[K×P] is column-major
                    // outᵀ = colᵀ · Wᵀ: col first; W is shared by every sample (stride 0).
                    let gemm = StridedBatchedConfig {
                        gemm: GemmConfig {
                            transa: cublasOperation_t::CUBLAS_OP_N,
                            transb: cublasOperation_t::CUBLAS_OP_N,
                            m: p as i32,
                            n: c.m as i32,
                            k: k as i32,
                            alpha: 1.0f32,
                            lda: p as i32,
                            ldb: k as i32,
                            beta: 0.0f32,
                            ldc: p as i32,
                        },
                        batch_size: samples as i32,
                        stride_a: (k * p) as i64,
                        stride_b: 0,
                        stride_c: (c.m * p) as i64,
                    };
                    let mut target = out.slice_mut(start * c.m * p..(start + samples) * c.m * p);
                    unsafe {
                        self.blas.gemm_strided_batched(
                            gemm,
                            &*col,
                            &weights[c.weight],
                            &mut target,
                        )?
                    };
                    start += samples;
                }
                if let Some(b) = c.bias {
                    let (p, m) = (p as u32, c.m as u32);
                    let mut launch = stream.launch_builder(&kernels.add_bias);
                    launch
                        .arg(&mut *out)
                        .arg(&weights[b])
                        .arg(&n)
                        .arg(&p)
                        .arg(&m);
                    unsafe { launch.launch(cfg)? };
                }
            }
            Step::Pool(p) => {
                let dims = [
                    p.h, p.w, p.kh, p.kw, p.stride.0, p.stride.1, p.pad.0, p.pad.1, p.oh, p.ow,
                ]
                .map(|d| d as u32);
                let (average, include) = (i32::from(p.average), i32::from(p.count_include_pad));
                let mut launch = stream.launch_builder(&kernels.pool);
                launch.arg(read(p.x)).arg(&mut *out).arg(&n);
                for d in &dims {
                    launch.arg(d);
                }
                launch.arg(&average).arg(&include);
                unsafe { launch.launch(cfg)? };
            }
            Step::Unary { x, op, .. } => {
                let (code, a, b) = op.kernel_args();
                let mut launch = stream.launch_builder(&kernels.unary);
                launch
                    .arg(read(*x))
                    .arg(&mut *out)
                    .arg(&n)
                    .arg(&code)
                    .arg(&a)
                    .arg(&b);
                unsafe { launch.launch(cfg)? };
            }
            Step::Binary {
                a, b, op, reversed, ..
            } => {
                let (other, period) = match b {
                    Operand::Value(v) => (read(*v), n),
                    Operand::Weight(w) => (&weights[*w], graph.values[*a].len() as u32),
                };
                let (code, reversed) = (op.code(), i32::from(*reversed));
                let mut launch = stream.launch_builder(&kernels.binary);
                launch
                    .arg(read(*a))
                    .arg(other)
                    .arg(&mut *out)
                    .arg(&n)
                    .arg(&period)
                    .arg(&code)
                    .arg(&reversed);
                unsafe { launch.launch(cfg)? };
            }
            Step::Softmax { x, cols, .. } => {
                let cols = *cols as u32;
                let rows = n / cols;
                let mut launch = stream.launch_builder(&kernels.softmax);
                launch.arg(read(*x)).arg(&mut *out).arg(&rows).arg(&cols);
                unsafe { launch.launch(LaunchConfig::for_num_elems(rows))? };
            }
            Step::Transpose { x, .. } => {
                let per = graph.values[*x].len() as u32;
                let meta = &self.transposes[&index];
                let mut launch = stream.launch_builder(&kernels.transpose);
                launch
                    .arg(read(*x))
                    .arg(&mut *out)
                    .arg(&n)
                    .arg(&per)
                    .arg(meta);
                unsafe { launch.launch(cfg)? };
            }
            Step::Concat {
                parts,
                out: out_id,
                outer,
            } => {
                let stride = (graph.values[*out_id].len() / outer) as u32;
                let mut offset = 0u32;
                for &part in parts {
                    let len = (graph.values[part].len() * batch) as u32;
                    let block = (graph.values[part].len() / outer) as u32;
                    let mut launch = stream.launch_builder(&kernels.copy_blocks);
                    launch
                        .arg(read(part))
                        .arg(&mut *out)
                        .arg(&len)
                        .arg(&block)
                        .arg(&stride)
                        .arg(&offset);
                    unsafe { launch.launch(LaunchConfig::for_num_elems(len))? };
                    offset += block;
                }
            }
        }
        Ok(())
    }
}

fn step_output(step: &Step) -> usize {
    match step {
        Step::MatMul { out, .. }
        | Step::Unary { out, .. }
        | Step::Binary { out, .. }
        | Step::Softmax { out, .. }
        | Step::Transpose { out, .. }
        | Step::Concat { out, .. } => *out,
        Step::Conv(c) => c.out,
        Step::Pool(p) => p.out,
    }
}

fn allocate(graph: &Graph, device: &Device, capacity: usize) -> Result<Activations, CudaError> {
    // The kernels index with 32-bit integers and cuBLAS takes `int` sizes.
    let fits = |elements: usize| elements < i32::MAX as usize;
    let lens = graph.buffer_lens();
    if let Some(v) = graph.values.iter().find(|v| !fits(v.len() * capacity)) {
        return Err(CudaError::TooLarge(format!(
            "{:?} at batch {capacity}",
            v.name
        )));
    }
    let im2col_len = graph
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Conv(c) => {
                let k_p = c.k() * c.positions();
                Some(k_p * im2col_chunk(k_p, capacity))
            }
            _ => None,
        })
        .max();
    if im2col_len.is_some_and(|len| !fits(len)) {
        return Err(CudaError::TooLarge("a convolution's im2col matrix".into()));
    }
    let stream = &device.stream;
    let buffers = lens
        .into_iter()
        .map(|len| stream.alloc_zeros::<f32>(len * capacity).map(Some))
        .collect::<Result<Vec<_>, _>>()?;
    let im2col = match im2col_len {
        None => None,
        Some(len) => Some(stream.alloc_zeros::<f32>(len)?),
    };
    let pinned = |id: usize, flags: u32| {
        // SAFETY: the staging buffers are written before they are read (inputs by the host,
        // outputs by the device copy), and only as far as written.
        unsafe {
            device
                .ctx
                .alloc_pinned_with_flags::<f32>(graph.values[id].len() * capacity, flags)
        }
    };
    let inputs = graph
        .inputs
        .iter()
        .map(|&id| pinned(id, cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = graph
        .outputs
        .iter()
        .map(|&id| pinned(id, 0))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::debug!(capacity, "GPU buffers allocated");
    Ok(Activations {
        buffers,
        im2col,
        inputs,
        outputs,
    })
}

impl Model for CudaModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
        self.info.check_inputs(&inputs)?;
        let batch = inputs
            .first()
            .map_or(1, |t| t.shape().first().copied().unwrap_or(1));
        let mut data = Vec::with_capacity(inputs.len());
        for (tensor, &id) in inputs.iter().zip(&self.graph.inputs) {
            let value = &self.graph.values[id];
            let shape = tensor.shape();
            if shape.first() != Some(&batch) || shape[1..] != value.shape[..] {
                return Err(InferError::InputShape {
                    input: value.name.clone(),
                    expected: format!(
                        "[{batch}, {}]",
                        value
                            .shape
                            .iter()
                            .map(usize::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    got: shape.to_vec(),
                });
            }
            let array = tensor.as_f32().ok_or_else(|| InferError::InputDType {
                input: value.name.clone(),
                expected: "f32".into(),
                got: tensor.dtype().to_string(),
            })?;
            data.push(
                array
                    .as_standard_layout()
                    .into_owned()
                    .into_raw_vec_and_offset()
                    .0,
            );
        }
        if batch == 0 {
            return Err(self.run_error("an empty batch"));
        }
        let slices: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let results = {
            let mut device = self
                .device
                .lock()
                .map_err(|_| self.run_error("an earlier run panicked"))?;
            self.run_batch(&mut device, batch, &slices)
                .map_err(|e| self.run_error(e))?
        };
        results
            .into_iter()
            .zip(&self.graph.outputs)
            .map(|(values, &id)| {
                let mut shape = vec![batch];
                shape.extend(&self.graph.values[id].shape);
                Tensor::from_f32(&shape, values)
            })
            .collect()
    }
}
