//! The graph's steps computed on CPU with plain loops: the specification the CUDA kernels
//! follow, and what CI checks the lowering with against tract (no GPU needed).

use super::graph::{BinaryOp, Graph, Operand, Step, UnaryOp, row_major_strides};

/// Runs `graph` on a batch: `inputs[i]` holds `batch` samples of graph input `i`.
pub(crate) fn run(graph: &Graph, batch: usize, inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut buffers: Vec<Vec<f32>> = graph
        .buffer_lens()
        .into_iter()
        .map(|len| vec![0.0; len * batch])
        .collect();
    for (&id, data) in graph.inputs.iter().zip(inputs) {
        let buffer = graph.values[id].buffer;
        buffers[buffer][..data.len()].copy_from_slice(data);
    }
    let buf = |id: usize| graph.values[id].buffer;
    for step in &graph.steps {
        match step {
            Step::MatMul {
                x,
                out,
                weight,
                bias,
                rows,
                k,
                n,
            } => {
                let w = &graph.weights[*weight];
                let mut y = vec![0.0; batch * rows * n];
                let xs = &buffers[buf(*x)];
                for r in 0..batch * rows {
                    for j in 0..*n {
                        let mut acc = bias.map_or(0.0, |b| graph.weights[b][j]);
                        for i in 0..*k {
                            acc += xs[r * k + i] * w[i * n + j];
                        }
                        y[r * n + j] = acc;
                    }
                }
                buffers[buf(*out)][..y.len()].copy_from_slice(&y);
            }
            Step::Conv(c) => {
                let w = &graph.weights[c.weight];
                let xs = &buffers[buf(c.x)];
                let mut y = vec![0.0; batch * c.m * c.positions()];
                for s in 0..batch {
                    for m in 0..c.m {
                        for oy in 0..c.oh {
                            for ox in 0..c.ow {
                                let mut acc = c.bias.map_or(0.0, |b| graph.weights[b][m]);
                                for ch in 0..c.c {
                                    for r in 0..c.kh {
                                        for q in 0..c.kw {
                                            let iy = (oy * c.stride.0 + r * c.dilation.0) as isize
                                                - c.pad.0 as isize;
                                            let ix = (ox * c.stride.1 + q * c.dilation.1) as isize
                                                - c.pad.1 as isize;
                                            if iy < 0
                                                || ix < 0
                                                || iy >= c.h as isize
                                                || ix >= c.w as isize
                                            {
                                                continue;
                                            }
                                            let xi = ((s * c.c + ch) * c.h + iy as usize) * c.w
                                                + ix as usize;
                                            let wi = ((m * c.c + ch) * c.kh + r) * c.kw + q;
                                            acc += xs[xi] * w[wi];
                                        }
                                    }
                                }
                                y[((s * c.m + m) * c.oh + oy) * c.ow + ox] = acc;
                            }
                        }
                    }
                }
                buffers[buf(c.out)][..y.len()].copy_from_slice(&y);
            }
            Step::Pool(p) => {
                let xs = &buffers[buf(p.x)];
                let mut y = vec![0.0; batch * p.c * p.oh * p.ow];
                for plane in 0..batch * p.c {
                    for oy in 0..p.oh {
                        for ox in 0..p.ow {
                            let (mut best, mut sum, mut count) = (f32::NEG_INFINITY, 0.0, 0);
                            for r in 0..p.kh {
                                for q in 0..p.kw {
                                    let iy = (oy * p.stride.0 + r) as isize - p.pad.0 as isize;
                                    let ix = (ox * p.stride.1 + q) as isize - p.pad.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= p.h as isize || ix >= p.w as isize
                                    {
                                        if p.count_include_pad {
                                            count += 1;
                                        }
                                        continue;
                                    }
                                    let v = xs[(plane * p.h + iy as usize) * p.w + ix as usize];
                                    best = best.max(v);
                                    sum += v;
                                    count += 1;
                                }
                            }
                            y[(plane * p.oh + oy) * p.ow + ox] =
                                if p.average { sum / count as f32 } else { best };
                        }
                    }
                }
                buffers[buf(p.out)][..y.len()].copy_from_slice(&y);
            }
            Step::Unary { x, out, op } => {
                let len = graph.values[*x].len() * batch;
                let y: Vec<f32> = buffers[buf(*x)][..len]
                    .iter()
                    .map(|&v| unary(*op, v))
                    .collect();
                buffers[buf(*out)][..len].copy_from_slice(&y);
            }
            Step::Binary {
                a,
                b,
                out,
                op,
                reversed,
            } => {
                let per = graph.values[*a].len();
                let xs = &buffers[buf(*a)];
                let y: Vec<f32> = (0..per * batch)
                    .map(|i| {
                        let other = match b {
                            Operand::Value(v) => buffers[buf(*v)][i],
                            Operand::Weight(w) => graph.weights[*w][i % per],
                        };
                        if *reversed {
                            binary(*op, other, xs[i])
                        } else {
                            binary(*op, xs[i], other)
                        }
                    })
                    .collect();
                buffers[buf(*out)][..y.len()].copy_from_slice(&y);
            }
            Step::Softmax { x, out, cols } => {
                let len = graph.values[*x].len() * batch;
                let mut y = buffers[buf(*x)][..len].to_vec();
                for row in y.chunks_mut(*cols) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    for v in row.iter_mut() {
                        *v /= sum;
                    }
                }
                buffers[buf(*out)][..len].copy_from_slice(&y);
            }
            Step::Transpose { x, out, perm } => {
                let shape = &graph.values[*x].shape;
                let out_shape = &graph.values[*out].shape;
                let per = graph.values[*x].len();
                let strides = row_major_strides(shape);
                let xs = &buffers[buf(*x)];
                let mut y = vec![0.0; per * batch];
                for (i, slot) in y.iter_mut().enumerate() {
                    let (s, mut rest) = (i / per, i % per);
                    let mut src = 0;
                    for axis in (0..out_shape.len()).rev() {
                        src += (rest % out_shape[axis]) * strides[perm[axis]];
                        rest /= out_shape[axis];
                    }
                    *slot = xs[s * per + src];
                }
                buffers[buf(*out)][..y.len()].copy_from_slice(&y);
            }
            Step::Concat { parts, out, outer } => {
                let total = graph.values[*out].len() / outer;
                let mut y = vec![0.0; graph.values[*out].len() * batch];
                let mut offset = 0;
                for &p in parts {
                    let block = graph.values[p].len() / outer;
                    let xs = &buffers[buf(p)];
                    for o in 0..batch * outer {
                        y[o * total + offset..o * total + offset + block]
                            .copy_from_slice(&xs[o * block..(o + 1) * block]);
                    }
                    offset += block;
                }
                buffers[buf(*out)][..y.len()].copy_from_slice(&y);
            }
        }
    }
    graph
        .outputs
        .iter()
        .map(|&id| buffers[buf(id)][..graph.values[id].len() * batch].to_vec())
        .collect()
}

/// The function itself; the CUDA kernel `unary` computes the same.
fn unary(op: UnaryOp, v: f32) -> f32 {
    match op {
        UnaryOp::Relu => v.max(0.0),
        UnaryOp::LeakyRelu(a) => {
            if v >= 0.0 {
                v
            } else {
                a * v
            }
        }
        UnaryOp::Clip(lo, hi) => v.max(lo).min(hi),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        UnaryOp::Tanh => v.tanh(),
    }
}

/// `a op b`; the CUDA kernel `binary` computes the same.
fn binary(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
    }
}
