//! ONNX to the GPU engine's graph: the model as a list of steps over buffers whose shapes are
//! known per sample, with the batch on axis 0.
//!
//! Lowering is pure (no device, no I/O), so CI checks it on CPU through the reference executor
//! in `reference.rs`: the steps mean exactly what the CUDA kernels compute.
//!
//! What it covers is the common CNN/MLP set: Conv (2-D, group 1), Gemm, MatMul with constant
//! weights, Add/Sub/Mul/Div (two activations of one shape, or an activation and a constant),
//! Relu/LeakyRelu/Clip/Sigmoid/Tanh, BatchNormalization (folded into the convolution before it
//! when it is that convolution's only reader), MaxPool/AveragePool and their global forms,
//! Softmax, Reshape/Flatten/Identity/Dropout (views, no copy), Transpose and Concat. Anything
//! else is [`Unsupported`], naming the node and operator, and the model runs on CPU.

use std::collections::HashMap;

use tract_onnx::data_resolver::FopenDataResolver;
use tract_onnx::pb::{self, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;

/// Index of a value (an ONNX tensor that flows between steps) in [`Graph::values`].
pub(crate) type ValueId = usize;
/// Index of a constant in [`Graph::weights`].
pub(crate) type WeightId = usize;

/// Why a model cannot run on the GPU engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unsupported {
    /// The node, or the input or output, that is not covered.
    pub node: String,
    /// Its operator (`input` or `output` for graph boundaries).
    pub op: String,
    /// What exactly is not covered.
    pub why: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "operator {} at node {:?}: {}",
            self.op, self.node, self.why
        )
    }
}

/// A tensor flowing through the graph.
#[derive(Debug, Clone)]
pub(crate) struct Value {
    /// The ONNX name.
    pub name: String,
    /// Shape of one sample (the batch dimension left out).
    pub shape: Vec<usize>,
    /// The buffer holding it: views (Reshape, Flatten) share their input's buffer.
    pub buffer: usize,
}

impl Value {
    /// Elements per sample.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Elementwise functions of one input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum UnaryOp {
    Relu,
    LeakyRelu(f32),
    Clip(f32, f32),
    Sigmoid,
    Tanh,
}

impl UnaryOp {
    /// (code, a, b) as the kernel takes them.
    pub fn kernel_args(self) -> (i32, f32, f32) {
        match self {
            UnaryOp::Relu => (0, 0.0, 0.0),
            UnaryOp::Sigmoid => (1, 0.0, 0.0),
            UnaryOp::Clip(lo, hi) => (2, lo, hi),
            UnaryOp::Tanh => (3, 0.0, 0.0),
            UnaryOp::LeakyRelu(a) => (4, a, 0.0),
        }
    }
}

/// Elementwise functions of two inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    /// The kernel's operation code.
    pub fn code(self) -> i32 {
        match self {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
        }
    }
}

/// The second operand of a binary step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operand {
    /// Another value of the same per-sample shape.
    Value(ValueId),
    /// A constant already broadcast to one sample's shape (the same for every sample).
    Weight(WeightId),
}

/// A 2-D convolution (NCHW), run as im2col and one GEMM per sample.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conv {
    pub x: ValueId,
    pub out: ValueId,
    /// `[M, C, KH, KW]`, row-major: one row of `C*KH*KW` per output channel.
    pub weight: WeightId,
    /// `[M]`.
    pub bias: Option<WeightId>,
    /// Input channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub m: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    /// Top and left padding (bottom and right only shape the output).
    pub pad: (usize, usize),
    pub dilation: (usize, usize),
    pub oh: usize,
    pub ow: usize,
}

impl Conv {
    /// Rows of the im2col matrix: `C*KH*KW`.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per channel: `OH*OW`.
    pub fn positions(&self) -> usize {
        self.oh * self.ow
    }
}

/// Max or average pooling over windows of an NCHW tensor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pool {
    pub x: ValueId,
    pub out: ValueId,
    /// Average instead of max.
    pub average: bool,
    /// Average pooling counts padding cells in the divisor.
    pub count_include_pad: bool,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub pad: (usize, usize),
    pub oh: usize,
    pub ow: usize,
}

/// One step of the graph, in execution order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// `out[r, :] = x[r, :] · weight + bias` for every row `r` (`rows` rows per sample).
    MatMul {
        x: ValueId,
        out: ValueId,
        /// `[k, n]`, row-major.
        weight: WeightId,
        /// `[n]`.
        bias: Option<WeightId>,
        rows: usize,
        k: usize,
        n: usize,
    },
    Conv(Conv),
    Pool(Pool),
    Unary {
        x: ValueId,
        out: ValueId,
        op: UnaryOp,
    },
    Binary {
        a: ValueId,
        b: Operand,
        out: ValueId,
        op: BinaryOp,
        /// Computes `b op a` (a constant on the left of Sub or Div).
        reversed: bool,
    },
    /// Softmax over each run of `cols` consecutive elements.
    Softmax {
        x: ValueId,
        out: ValueId,
        cols: usize,
    },
    /// Permutes one sample's axes: `out` axis `i` is `x` axis `perm[i]`.
    Transpose {
        x: ValueId,
        out: ValueId,
        perm: Vec<usize>,
    },
    /// Joins values along one axis; `outer` blocks per sample, each part's block is
    /// `len(part) / outer` elements.
    Concat {
        parts: Vec<ValueId>,
        out: ValueId,
        outer: usize,
    },
}

/// A model lowered for the GPU engine.
#[derive(Debug, Clone)]
pub(crate) struct Graph {
    /// Graph inputs, in the model's order.
    pub inputs: Vec<ValueId>,
    /// Graph outputs, in the model's order.
    pub outputs: Vec<ValueId>,
    pub values: Vec<Value>,
    /// Number of distinct buffers (values that are views share one).
    pub buffers: usize,
    /// Constants, uploaded once.
    pub weights: Vec<Vec<f32>>,
    pub steps: Vec<Step>,
}

impl Graph {
    /// Elements per sample of each buffer (the largest value it holds).
    pub fn buffer_lens(&self) -> Vec<usize> {
        let mut lens = vec![0; self.buffers];
        for v in &self.values {
            lens[v.buffer] = lens[v.buffer].max(v.len());
        }
        lens
    }
}

/// Lowers a parsed ONNX model.
pub(crate) fn lower(proto: &ModelProto) -> Result<Graph, Unsupported> {
    let graph = proto.graph.as_ref().ok_or_else(|| Unsupported {
        node: "<model>".into(),
        op: "graph".into(),
        why: "the model has no graph".into(),
    })?;
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(13, |o| o.version);
    let mut lowering = Lowering {
        opset,
        uses: HashMap::new(),
        constants: HashMap::new(),
        names: HashMap::new(),
        graph: Graph {
            inputs: Vec::new(),
            outputs: Vec::new(),
            values: Vec::new(),
            buffers: 0,
            weights: Vec::new(),
            steps: Vec::new(),
        },
    };
    for t in &graph.initializer {
        let value = constant(t).map_err(|why| Unsupported {
            node: t.name.clone(),
            op: "initializer".into(),
            why,
        })?;
        lowering.constants.insert(t.name.clone(), value);
    }
    for node in &graph.node {
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            *lowering.uses.entry(input.clone()).or_default() += 1;
        }
    }
    for output in &graph.output {
        *lowering.uses.entry(output.name.clone()).or_default() += 1;
    }
    for input in &graph.input {
        if lowering.constants.contains_key(&input.name) {
            continue;
        }
        let id = lowering.graph_input(input)?;
        lowering.graph.inputs.push(id);
    }
    for node in &graph.node {
        lowering.node(node)?;
    }
    for output in &graph.output {
        let id = *lowering
            .names
            .get(&output.name)
            .ok_or_else(|| Unsupported {
                node: output.name.clone(),
                op: "output".into(),
                why: "the output is a constant or is not computed by a covered operator".into(),
            })?;
        lowering.graph.outputs.push(id);
    }
    Ok(lowering.graph)
}

/// A constant: shape and values as `f32`.
#[derive(Debug, Clone)]
struct Constant {
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl Constant {
    fn as_ints(&self) -> Vec<i64> {
        self.values.iter().map(|&v| v as i64).collect()
    }
}

fn constant(t: &TensorProto) -> Result<Constant, String> {
    let tensor = tract_onnx::tensor::load_tensor(&FopenDataResolver, t, None)
        .map_err(|e| format!("cannot read the constant: {e}"))?;
    let shape = tensor.shape().to_vec();
    let values = tensor
        .cast_to::<f32>()
        .map_err(|e| {
            format!(
                "constant of type {:?} is not numeric: {e}",
                tensor.datum_type()
            )
        })?
        .to_plain_array_view::<f32>()
        .map_err(|e| e.to_string())?
        .iter()
        .copied()
        .collect();
    Ok(Constant { shape, values })
}

struct Lowering {
    opset: i64,
    /// How many nodes (and graph outputs) read each name.
    uses: HashMap<String, usize>,
    constants: HashMap<String, Constant>,
    /// ONNX names of computed values.
    names: HashMap<String, ValueId>,
    graph: Graph,
}

impl Lowering {
    fn graph_input(&mut self, input: &pb::ValueInfoProto) -> Result<ValueId, Unsupported> {
        let fail = |why: String| Unsupported {
            node: input.name.clone(),
            op: "input".into(),
            why,
        };
        let tensor = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => t,
            _ => return Err(fail("the input is not a tensor".into())),
        };
        if tensor.elem_type != pb::tensor_proto::DataType::Float as i32 {
            return Err(fail("the GPU engine takes float32 inputs only".into()));
        }
        let dims = tensor
            .shape
            .as_ref()
            .map(|s| s.dim.as_slice())
            .unwrap_or(&[]);
        if dims.is_empty() {
            return Err(fail("the input has no batch dimension".into()));
        }
        let mut shape = Vec::new();
        for d in &dims[1..] {
            match d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => {
                    shape.push(n as usize)
                }
                _ => {
                    return Err(fail(
                        "only the first (batch) dimension may be free; fix the others when \
                         exporting"
                            .into(),
                    ));
                }
            }
        }
        Ok(self.new_value(&input.name, shape))
    }

    fn new_value(&mut self, name: &str, shape: Vec<usize>) -> ValueId {
        let buffer = self.graph.buffers;
        self.graph.buffers += 1;
        self.push_value(name, shape, buffer)
    }

    fn push_value(&mut self, name: &str, shape: Vec<usize>, buffer: usize) -> ValueId {
        let id = self.graph.values.len();
        self.graph.values.push(Value {
            name: name.to_string(),
            shape,
            buffer,
        });
        self.names.insert(name.to_string(), id);
        id
    }

    fn weight(&mut self, values: Vec<f32>) -> WeightId {
        self.graph.weights.push(values);
        self.graph.weights.len() - 1
    }

    /// Lowers one node, or says why it cannot be.
    fn node(&mut self, node: &NodeProto) -> Result<(), Unsupported> {
        self.lower_node(node).map_err(|why| Unsupported {
            node: node.name.clone(),
            op: node.op_type.clone(),
            why,
        })
    }

    fn lower_node(&mut self, node: &NodeProto) -> Result<(), String> {
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(format!("operator domain {:?} is not covered", node.domain));
        }
        let out = node.output.first().ok_or("the node has no output")?;
        if node.output.iter().skip(1).any(|o| !o.is_empty()) && node.op_type != "Dropout" {
            return Err("only the first output of a node is covered".into());
        }
        match node.op_type.as_str() {
            "Constant" => {
                let t: &TensorProto = attr(node.get_attr("value"))?;
                let c = constant(t)?;
                self.constants.insert(out.clone(), c);
            }
            "Relu" | "Sigmoid" | "Tanh" | "LeakyRelu" | "Clip" => self.unary(node, out)?,
            "Identity" | "Dropout" => {
                let v = self.graph.values[self.activation(node, 0)?].clone();
                self.push_value(out, v.shape, v.buffer);
            }
            "Reshape" => {
                let v = self.graph.values[self.activation(node, 0)?].clone();
                let target = self
                    .constant_input(node, 1)
                    .ok_or("the target shape must be a constant")?
                    .as_ints();
                let shape = reshape(&v.shape, &target)?;
                self.push_value(out, shape, v.buffer);
            }
            "Flatten" => {
                let v = self.graph.values[self.activation(node, 0)?].clone();
                let axis = attr(node.get_attr_opt::<i64>("axis"))?.unwrap_or(1);
                if axis_in(axis, v.shape.len() + 1) != Some(1) {
                    return Err("only Flatten at axis 1 keeps the batch apart".into());
                }
                self.push_value(out, vec![v.len()], v.buffer);
            }
            "Transpose" => self.transpose(node, out)?,
            "Gemm" => self.gemm(node, self.activation(node, 0)?)?,
            "MatMul" => self.matmul(node, out)?,
            "Add" | "Sub" | "Mul" | "Div" => self.binary(node, out)?,
            "Conv" => self.conv(node, self.activation(node, 0)?)?,
            "BatchNormalization" => self.batch_norm(node, self.activation(node, 0)?)?,
            "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" => {
                self.pool(node, self.activation(node, 0)?)?
            }
            "Softmax" => self.softmax(node, out)?,
            "Concat" => self.concat(node, out)?,
            other => return Err(format!("{other} is not covered by the GPU engine")),
        }
        Ok(())
    }

    /// Input `i` of `node`, which must be computed from the model's inputs.
    fn activation(&self, node: &NodeProto, i: usize) -> Result<ValueId, String> {
        let name = node
            .input
            .get(i)
            .ok_or_else(|| format!("input {i} is missing"))?;
        self.names.get(name).copied().ok_or_else(|| {
            format!("input {name:?} must be computed from the model's inputs, not a constant")
        })
    }

    /// Input `i` of `node`, when it is a constant.
    fn constant_input(&self, node: &NodeProto, i: usize) -> Option<&Constant> {
        node.input
            .get(i)
            .filter(|n| !n.is_empty())
            .and_then(|n| self.constants.get(n))
    }

    fn unary(&mut self, node: &NodeProto, out: &str) -> Result<(), String> {
        let x = self.activation(node, 0)?;
        let op = match node.op_type.as_str() {
            "Relu" => UnaryOp::Relu,
            "Sigmoid" => UnaryOp::Sigmoid,
            "Tanh" => UnaryOp::Tanh,
            "LeakyRelu" => {
                UnaryOp::LeakyRelu(attr(node.get_attr_opt::<f32>("alpha"))?.unwrap_or(0.01))
            }
            _ => {
                // Clip: bounds are attributes before opset 11, optional constant inputs after.
                let (lo, hi) = if self.opset < 11 {
                    (
                        attr(node.get_attr_opt::<f32>("min"))?,
                        attr(node.get_attr_opt::<f32>("max"))?,
                    )
                } else {
                    let bound = |i: usize| -> Result<Option<f32>, String> {
                        match node.input.get(i).filter(|n| !n.is_empty()) {
                            None => Ok(None),
                            Some(_) => self
                                .constant_input(node, i)
                                .and_then(|c| c.values.first().copied())
                                .map(Some)
                                .ok_or_else(|| "Clip bounds must be constants".into()),
                        }
                    };
                    (bound(1)?, bound(2)?)
                };
                UnaryOp::Clip(lo.unwrap_or(f32::NEG_INFINITY), hi.unwrap_or(f32::INFINITY))
            }
        };
        let shape = self.graph.values[x].shape.clone();
        let out = self.new_value(out, shape);
        self.graph.steps.push(Step::Unary { x, out, op });
        Ok(())
    }

    fn transpose(&mut self, node: &NodeProto, out: &str) -> Result<(), String> {
        let x = self.activation(node, 0)?;
        let shape = self.graph.values[x].shape.clone();
        let perm = attr(node.get_attr_opt_vec::<i64>("perm"))?
            .ok_or("a Transpose without perm moves the batch axis")?;
        if perm.len() != shape.len() + 1 || perm[0] != 0 {
            return Err("the permutation must keep the batch on axis 0".into());
        }
        let perm: Vec<usize> = perm[1..].iter().map(|&p| (p - 1) as usize).collect();
        let mut seen = vec![false; shape.len()];
        for &p in &perm {
            if p >= shape.len() || std::mem::replace(&mut seen[p], true) {
                return Err("perm is not a permutation".into());
            }
        }
        let out_shape = perm.iter().map(|&p| shape[p]).collect();
        let out = self.new_value(out, out_shape);
        self.graph.steps.push(Step::Transpose { x, out, perm });
        Ok(())
    }

    fn matmul(&mut self, node: &NodeProto, out: &str) -> Result<(), String> {
        let x = self.activation(node, 0)?;
        let b = self
            .constant_input(node, 1)
            .ok_or("the second operand must be a constant weight matrix")?
            .clone();
        let [k, n] = b.shape[..] else {
            return Err("the weight matrix must be 2-D".into());
        };
        let shape = self.graph.values[x].shape.clone();
        if shape.last() != Some(&k) {
            return Err(format!("inner dimensions differ: {shape:?} · [{k}, {n}]"));
        }
        let rows = shape[..shape.len() - 1].iter().product();
        let weight = self.weight(b.values);
        let mut out_shape = shape;
        *out_shape.last_mut().expect("checked above") = n;
        let out = self.new_value(out, out_shape);
        self.graph.steps.push(Step::MatMul {
            x,
            out,
            weight,
            bias: None,
            rows,
            k,
            n,
        });
        Ok(())
    }

    fn binary(&mut self, node: &NodeProto, out: &str) -> Result<(), String> {
        let op = match node.op_type.as_str() {
            "Add" => BinaryOp::Add,
            "Sub" => BinaryOp::Sub,
            "Mul" => BinaryOp::Mul,
            _ => BinaryOp::Div,
        };
        let computed = |i: usize| node.input.get(i).and_then(|n| self.names.get(n)).copied();
        let (a, b, reversed) = match (computed(0), computed(1)) {
            (Some(a), Some(b)) => {
                if self.graph.values[a].shape != self.graph.values[b].shape {
                    return Err("two activations must have the same shape".into());
                }
                (a, Operand::Value(b), false)
            }
            (Some(a), None) => {
                let c = self
                    .constant_input(node, 1)
                    .ok_or("input 1 is not known")?
                    .clone();
                (a, self.broadcast_weight(a, &c)?, false)
            }
            (None, Some(b)) => {
                let c = self
                    .constant_input(node, 0)
                    .ok_or("input 0 is not known")?
                    .clone();
                (b, self.broadcast_weight(b, &c)?, true)
            }
            (None, None) => return Err("both operands are constants".into()),
        };
        // a + c and a * c commute; only Sub and Div need the order.
        let reversed = reversed && matches!(op, BinaryOp::Sub | BinaryOp::Div);
        let shape = self.graph.values[a].shape.clone();
        let out = self.new_value(out, shape);
        self.graph.steps.push(Step::Binary {
            a,
            b,
            out,
            op,
            reversed,
        });
        Ok(())
    }

    fn softmax(&mut self, node: &NodeProto, out: &str) -> Result<(), String> {
        let x = self.activation(node, 0)?;
        let shape = self.graph.values[x].shape.clone();
        let rank = shape.len() + 1;
        let default = if self.opset < 13 { 1 } else { -1 };
        let axis = axis_in(
            attr(node.get_attr_opt::<i64>("axis"))?.unwrap_or(default),
            rank,
        )
        .filter(|&a| a >= 1)
        .ok_or("softmax over the batch axis is not covered")?;
        let cols = if self.opset < 13 {
            // Before opset 13 Softmax flattens everything from `axis` into one row.
            shape[axis - 1..].iter().product()
        } else if axis == rank - 1 {
            shape[shape.len() - 1]
        } else {
            return Err("only softmax over the last axis is covered".into());
        };
        let out = self.new_value(out, shape);
        self.graph.steps.push(Step::Softmax { x, out, cols });
        Ok(())
    }

    fn concat(&mut self, node: &NodeProto, out: &str) -> Result<(), String> {
        let parts = (0..node.input.len())
            .map(|i| self.activation(node, i))
            .collect::<Result<Vec<_>, _>>()?;
        let first = self.graph.values[parts[0]].shape.clone();
        let axis = axis_in(attr(node.get_attr::<i64>("axis"))?, first.len() + 1)
            .filter(|&a| a >= 1)
            .ok_or("concatenation along the batch axis is not covered")?
            - 1;
        let mut shape = first.clone();
        shape[axis] = 0;
        for &p in &parts {
            let s = &self.graph.values[p].shape;
            let same_elsewhere = s.len() == first.len()
                && s.iter()
                    .zip(&first)
                    .enumerate()
                    .all(|(i, (a, b))| i == axis || a == b);
            if !same_elsewhere {
                return Err("inputs differ outside the concatenation axis".into());
            }
            shape[axis] += s[axis];
        }
        let outer = first[..axis].iter().product();
        let out = self.new_value(out, shape);
        self.graph.steps.push(Step::Concat { parts, out, outer });
        Ok(())
    }

    /// A constant broadcast (numpy rules) to one sample of `x`: it must not vary with the batch.
    fn broadcast_weight(&mut self, x: ValueId, c: &Constant) -> Result<Operand, String> {
        let shape = self.graph.values[x].shape.clone();
        let full_rank = shape.len() + 1;
        if c.shape.len() > full_rank {
            return Err(format!(
                "constant of shape {:?} has more axes than the input",
                c.shape
            ));
        }
        let mut cshape = c.shape.clone();
        if cshape.len() == full_rank {
            if cshape[0] != 1 {
                return Err("a constant that varies along the batch is not covered".into());
            }
            cshape.remove(0);
        }
        let values = broadcast(&c.values, &cshape, &shape).ok_or_else(|| {
            format!(
                "constant of shape {:?} does not broadcast to {shape:?}",
                c.shape
            )
        })?;
        Ok(Operand::Weight(self.weight(values)))
    }

    fn gemm(&mut self, node: &NodeProto, x: ValueId) -> Result<(), String> {
        let scalar = |name: &str| attr(node.get_attr_opt::<f32>(name)).map(|v| v.unwrap_or(1.0));
        let flag = |name: &str| attr(node.get_attr_opt::<i64>(name)).map(|v| v.unwrap_or(0) != 0);
        let (alpha, beta) = (scalar("alpha")?, scalar("beta")?);
        if flag("transA")? {
            return Err("transA=1 would transpose the batch into the rows".into());
        }
        let shape = &self.graph.values[x].shape;
        if shape.len() != 1 {
            return Err(format!(
                "Gemm takes a 2-D input, got per-sample shape {shape:?}"
            ));
        }
        let k = shape[0];
        let b = node
            .input
            .get(1)
            .and_then(|n| self.constants.get(n))
            .ok_or("the weight matrix B must be a constant")?
            .clone();
        if b.shape.len() != 2 {
            return Err("B must be 2-D".into());
        }
        let trans_b = flag("transB")?;
        let (bk, n) = if trans_b {
            (b.shape[1], b.shape[0])
        } else {
            (b.shape[0], b.shape[1])
        };
        if bk != k {
            return Err(format!("inner dimensions differ: [N, {k}] · {:?}", b.shape));
        }
        // Stored as [k, n] with alpha applied, so the step is one plain GEMM.
        let mut w = vec![0.0; k * n];
        for i in 0..k {
            for j in 0..n {
                let v = if trans_b {
                    b.values[j * k + i]
                } else {
                    b.values[i * n + j]
                };
                w[i * n + j] = alpha * v;
            }
        }
        let weight = self.weight(w);
        let bias = match node.input.get(2).filter(|n| !n.is_empty()) {
            None => None,
            Some(name) => {
                let c = self
                    .constants
                    .get(name)
                    .ok_or("C must be a constant")?
                    .clone();
                let mut cshape = c.shape.clone();
                if cshape.len() == 2 {
                    if cshape[0] != 1 {
                        return Err("a C that varies along the batch is not covered".into());
                    }
                    cshape.remove(0);
                }
                let values = broadcast(&c.values, &cshape, &[n]).ok_or_else(|| {
                    format!("C of shape {:?} does not broadcast to [{n}]", c.shape)
                })?;
                Some(self.weight(values.into_iter().map(|v| beta * v).collect()))
            }
        };
        let out_name = &node.output[0];
        let out = self.new_value(out_name, vec![n]);
        self.graph.steps.push(Step::MatMul {
            x,
            out,
            weight,
            bias,
            rows: 1,
            k,
            n,
        });
        Ok(())
    }

    fn conv(&mut self, node: &NodeProto, x: ValueId) -> Result<(), String> {
        let shape = self.graph.values[x].shape.clone();
        let [c, h, w] = shape[..] else {
            return Err(format!(
                "only 2-D convolution (NCHW) is covered, got per-sample shape {shape:?}"
            ));
        };
        let weight = node
            .input
            .get(1)
            .and_then(|n| self.constants.get(n))
            .ok_or("the weights must be a constant")?
            .clone();
        let [m, wc, kh, kw] = weight.shape[..] else {
            return Err(format!(
                "weights of shape {:?} are not [M, C, KH, KW]",
                weight.shape
            ));
        };
        let group = ints(node, "group")?.map_or(1, |g| g[0]);
        if group != 1 {
            return Err(format!(
                "grouped convolution (group={group}) is not covered"
            ));
        }
        if wc != c {
            return Err(format!("weights take {wc} channels, the input has {c}"));
        }
        let geometry = window(node, (h, w), (kh, kw))?;
        let bias = match node.input.get(2).filter(|n| !n.is_empty()) {
            None => None,
            Some(name) => {
                let b = self
                    .constants
                    .get(name)
                    .ok_or("the bias must be a constant")?
                    .clone();
                if b.values.len() != m {
                    return Err(format!(
                        "bias has {} values for {m} channels",
                        b.values.len()
                    ));
                }
                Some(self.weight(b.values))
            }
        };
        let weight = self.weight(weight.values);
        let out = self.new_value(&node.output[0], vec![m, geometry.out.0, geometry.out.1]);
        self.graph.steps.push(Step::Conv(Conv {
            x,
            out,
            weight,
            bias,
            c,
            h,
            w,
            m,
            kh,
            kw,
            stride: geometry.stride,
            pad: geometry.pad,
            dilation: geometry.dilation,
            oh: geometry.out.0,
            ow: geometry.out.1,
        }));
        Ok(())
    }

    fn batch_norm(&mut self, node: &NodeProto, x: ValueId) -> Result<(), String> {
        let shape = self.graph.values[x].shape.clone();
        let channels = *shape
            .first()
            .ok_or("BatchNormalization needs a channel axis")?;
        let param = |i: usize| -> Result<Vec<f32>, String> {
            let c = node
                .input
                .get(i)
                .and_then(|n| self.constants.get(n))
                .ok_or("the statistics must be constants")?;
            if c.values.len() != channels {
                return Err(format!("{} values for {channels} channels", c.values.len()));
            }
            Ok(c.values.clone())
        };
        let (gamma, beta, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
        let eps = attr(node.get_attr_opt::<f32>("epsilon"))?.unwrap_or(1e-5);
        let scale: Vec<f32> = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| g / (v + eps).sqrt())
            .collect();
        let shift: Vec<f32> = beta
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        let out_name = &node.output[0];
        // Folded: the convolution that is this node's only input source gets scaled weights.
        let input_name = &self.graph.values[x].name;
        let only_reader = self.uses.get(input_name) == Some(&1);
        if let (true, Some(Step::Conv(conv))) = (only_reader, self.graph.steps.last_mut())
            && conv.out == x
        {
            let per_channel = conv.k();
            let (weight, bias) = (conv.weight, conv.bias);
            for (ch, s) in scale.iter().enumerate() {
                for v in &mut self.graph.weights[weight][ch * per_channel..(ch + 1) * per_channel] {
                    *v *= s;
                }
            }
            let folded: Vec<f32> = (0..channels)
                .map(|ch| bias.map_or(0.0, |b| self.graph.weights[b][ch]) * scale[ch] + shift[ch])
                .collect();
            let bias = self.weight(folded);
            if let Some(Step::Conv(conv)) = self.graph.steps.last_mut() {
                conv.bias = Some(bias);
            }
            self.names.insert(out_name.clone(), x);
            self.graph.values[x].name = out_name.clone();
            return Ok(());
        }
        // Otherwise a per-channel multiply and add.
        let per_channel: usize = shape[1..].iter().product();
        let expand = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .flat_map(|&s| std::iter::repeat_n(s, per_channel))
                .collect()
        };
        let scale = self.weight(expand(&scale));
        let shift = self.weight(expand(&shift));
        let scaled = self.new_value(&format!("{out_name}/scaled"), shape.clone());
        self.graph.steps.push(Step::Binary {
            a: x,
            b: Operand::Weight(scale),
            out: scaled,
            op: BinaryOp::Mul,
            reversed: false,
        });
        let out = self.new_value(out_name, shape);
        self.graph.steps.push(Step::Binary {
            a: scaled,
            b: Operand::Weight(shift),
            out,
            op: BinaryOp::Add,
            reversed: false,
        });
        Ok(())
    }

    fn pool(&mut self, node: &NodeProto, x: ValueId) -> Result<(), String> {
        let shape = self.graph.values[x].shape.clone();
        let [c, h, w] = shape[..] else {
            return Err(format!(
                "only 2-D pooling (NCHW) is covered, got per-sample shape {shape:?}"
            ));
        };
        let global = node.op_type.starts_with("Global");
        let average = node.op_type.contains("Average");
        let (kernel, geometry) = if global {
            (
                (h, w),
                Window {
                    stride: (1, 1),
                    pad: (0, 0),
                    dilation: (1, 1),
                    out: (1, 1),
                },
            )
        } else {
            let k = ints(node, "kernel_shape")?.ok_or("kernel_shape is required")?;
            let [kh, kw] = k[..] else {
                return Err("kernel_shape must have two values".into());
            };
            if ints(node, "ceil_mode")?.is_some_and(|v| v[0] != 0) {
                return Err("ceil_mode=1 is not covered".into());
            }
            if node.output.len() > 1 && !node.output[1].is_empty() {
                return Err("MaxPool's indices output is not covered".into());
            }
            ((kh, kw), window(node, (h, w), (kh, kw))?)
        };
        if geometry.dilation != (1, 1) {
            return Err("dilated pooling is not covered".into());
        }
        let count_include_pad = ints(node, "count_include_pad")?.is_some_and(|v| v[0] != 0);
        let out = self.new_value(&node.output[0], vec![c, geometry.out.0, geometry.out.1]);
        self.graph.steps.push(Step::Pool(Pool {
            x,
            out,
            average,
            count_include_pad,
            c,
            h,
            w,
            kh: kernel.0,
            kw: kernel.1,
            stride: geometry.stride,
            pad: geometry.pad,
            oh: geometry.out.0,
            ow: geometry.out.1,
        }));
        Ok(())
    }
}

/// An attribute read by tract's ONNX helpers, its error as text.
fn attr<T>(read: TractResult<T>) -> Result<T, String> {
    read.map_err(|e| format!("{e:#}"))
}

/// A possibly negative ONNX axis of a tensor of `rank` (batch included), when it is in range.
fn axis_in(axis: i64, rank: usize) -> Option<usize> {
    let rank = rank as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    (0..rank).contains(&axis).then_some(axis as usize)
}

/// An integer attribute (scalar or list) as `usize`s.
fn ints(node: &NodeProto, name: &str) -> Result<Option<Vec<usize>>, String> {
    let attr = match node.attribute.iter().find(|a| a.name == name) {
        None => return Ok(None),
        Some(a) => a,
    };
    let values: Vec<i64> = if attr.ints.is_empty() {
        vec![attr.i]
    } else {
        attr.ints.clone()
    };
    if values.iter().any(|&v| v < 0) {
        return Err(format!("attribute {name} has a negative value: {values:?}"));
    }
    Ok(Some(values.into_iter().map(|v| v as usize).collect()))
}

/// Where a sliding window goes: strides, top-left padding, dilation, and the output size.
struct Window {
    stride: (usize, usize),
    pad: (usize, usize),
    dilation: (usize, usize),
    out: (usize, usize),
}

fn window(
    node: &NodeProto,
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
) -> Result<Window, String> {
    let pair = |name: &str, default: usize| -> Result<(usize, usize), String> {
        match ints(node, name)? {
            None => Ok((default, default)),
            Some(v) if v.len() == 2 => Ok((v[0], v[1])),
            Some(v) => Err(format!("{name} {v:?} is not 2-D")),
        }
    };
    let stride = pair("strides", 1)?;
    let dilation = pair("dilations", 1)?;
    if stride.0 == 0 || stride.1 == 0 || dilation.0 == 0 || dilation.1 == 0 {
        return Err("strides and dilations must be positive".into());
    }
    let span = (dilation.0 * (kh - 1) + 1, dilation.1 * (kw - 1) + 1);
    let auto_pad =
        attr(node.get_attr_opt::<String>("auto_pad"))?.unwrap_or_else(|| "NOTSET".into());
    let pads = match auto_pad.as_str() {
        "NOTSET" => match ints(node, "pads")? {
            None => [0; 4],
            Some(p) if p.len() == 4 => [p[0], p[1], p[2], p[3]],
            Some(p) => return Err(format!("pads {p:?} is not 2-D")),
        },
        "VALID" => [0; 4],
        "SAME_UPPER" | "SAME_LOWER" => {
            let total = |size: usize, stride: usize, span: usize| {
                let out = size.div_ceil(stride);
                ((out - 1) * stride + span).saturating_sub(size)
            };
            let (th, tw) = (total(h, stride.0, span.0), total(w, stride.1, span.1));
            if auto_pad == "SAME_UPPER" {
                [th / 2, tw / 2, th - th / 2, tw - tw / 2]
            } else {
                [th - th / 2, tw - tw / 2, th / 2, tw / 2]
            }
        }
        other => return Err(format!("auto_pad {other:?} is not covered")),
    };
    let (ph, pw) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
    if ph < span.0 || pw < span.1 {
        return Err(format!(
            "the window ({kh}x{kw}) is larger than the padded input ({ph}x{pw})"
        ));
    }
    Ok(Window {
        stride,
        pad: (pads[0], pads[1]),
        dilation,
        out: ((ph - span.0) / stride.0 + 1, (pw - span.1) / stride.1 + 1),
    })
}

/// ONNX Reshape of one sample: the target's first entry must keep the batch (`0` or `-1`).
fn reshape(shape: &[usize], target: &[i64]) -> Result<Vec<usize>, String> {
    match target.first() {
        Some(0) | Some(-1) => {}
        _ => {
            return Err(format!(
                "target shape {target:?} does not keep the batch on axis 0"
            ));
        }
    }
    let len: usize = shape.iter().product();
    let mut out = Vec::new();
    let mut free = None;
    for (i, &t) in target.iter().enumerate().skip(1) {
        match t {
            0 => out.push(*shape.get(i - 1).ok_or("0 copies an axis the input lacks")?),
            -1 if free.is_none() => {
                free = Some(out.len());
                out.push(1);
            }
            t if t > 0 => out.push(t as usize),
            _ => return Err(format!("target shape {target:?} is not valid")),
        }
    }
    let known: usize = out.iter().product();
    if target[0] == -1 && free.is_some() {
        return Err(format!("target shape {target:?} has two free dimensions"));
    }
    if let Some(i) = free {
        if known == 0 || !len.is_multiple_of(known) {
            return Err(format!("cannot reshape {shape:?} to {target:?}"));
        }
        out[i] = len / known;
    } else if known != len {
        return Err(format!(
            "cannot reshape one sample of {shape:?} to {target:?}"
        ));
    }
    Ok(out)
}

/// Numpy broadcasting of `values` (of `from` shape) to `to`; `None` when it does not fit.
pub(crate) fn broadcast(values: &[f32], from: &[usize], to: &[usize]) -> Option<Vec<f32>> {
    if from.len() > to.len() {
        return None;
    }
    let offset = to.len() - from.len();
    let mut strides = vec![0usize; to.len()];
    let mut stride = 1;
    for i in (0..from.len()).rev() {
        let (f, t) = (from[i], to[i + offset]);
        if f != t && f != 1 {
            return None;
        }
        strides[i + offset] = if f == 1 { 0 } else { stride };
        stride *= f;
    }
    let total: usize = to.iter().product();
    let mut out = Vec::with_capacity(total);
    for flat in 0..total {
        let (mut rest, mut src) = (flat, 0);
        for axis in (0..to.len()).rev() {
            src += (rest % to[axis]) * strides[axis];
            rest /= to[axis];
        }
        out.push(values[src]);
    }
    Some(out)
}

/// Row-major strides of a shape.
pub(crate) fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_keeps_the_batch_and_resolves_free_and_copied_axes() {
        assert_eq!(reshape(&[64], &[-1, 8, 8, 1]).unwrap(), vec![8, 8, 1]);
        assert_eq!(reshape(&[4, 4, 64], &[-1, 1024]).unwrap(), vec![1024]);
        assert_eq!(reshape(&[3, 4], &[0, -1]).unwrap(), vec![12]);
        assert_eq!(reshape(&[3, 4], &[0, 0, 2, 2]).unwrap(), vec![3, 2, 2]);
        assert!(reshape(&[3, 4], &[12, 1]).unwrap_err().contains("batch"));
        assert!(reshape(&[3, 4], &[-1, 5]).is_err());
        assert!(
            reshape(&[3, 4], &[-1, -1])
                .unwrap_err()
                .contains("two free")
        );
    }

    #[test]
    fn broadcast_follows_numpy_rules() {
        // A per-channel bias [C, 1, 1] over [C, H, W].
        let b = broadcast(&[1.0, 2.0], &[2, 1, 1], &[2, 2, 2]).unwrap();
        assert_eq!(b, vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
        // A row [W] over [H, W].
        assert_eq!(
            broadcast(&[1.0, 2.0], &[2], &[2, 2]).unwrap(),
            vec![1.0, 2.0, 1.0, 2.0]
        );
        assert_eq!(broadcast(&[5.0], &[], &[3]).unwrap(), vec![5.0; 3]);
        assert!(broadcast(&[1.0, 2.0, 3.0], &[3], &[2, 2]).is_none());
    }
}
