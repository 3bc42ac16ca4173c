//! The GPU engine's lowering, checked on CPU: the reference executor (the kernels' meaning) on
//! the lowered graph must give tract's answers, for the bundled cloud models and for every
//! covered operator on random inputs.

use std::path::{Path, PathBuf};

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, type_proto,
};
use tract_onnx::prelude::*;

use super::graph::{Graph, lower};
use super::reference;
use crate::model::{BackendChoice, LoadOptions};
use crate::tensor::Tensor as CascadeTensor;

/// Largest difference allowed between the reference executor and tract. Both sum in f32, in
/// different orders (tract's kernels are blocked and vectorised).
const TOLERANCE: f32 = 1e-4;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Deterministic inputs in [-1, 1) (a 64-bit LCG: no dependency, same values everywhere).
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "output sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `proto` on tract and on the lowered graph's reference executor; returns the graph and
/// the largest difference over all outputs.
fn compare(proto: &ModelProto, batch: usize, seed: u64) -> (Graph, f32) {
    let graph = lower(proto).unwrap_or_else(|e| panic!("lowering failed: {e}"));
    let inputs: Vec<Vec<f32>> = graph
        .inputs
        .iter()
        .enumerate()
        .map(|(i, &id)| random(graph.values[id].len() * batch, seed + i as u64))
        .collect();
    let mut model = onnx()
        .model_for_proto_model(proto)
        .expect("tract parses the model");
    let mut feeds = TVec::new();
    for (i, &id) in graph.inputs.iter().enumerate() {
        let mut shape = vec![batch];
        shape.extend(&graph.values[id].shape);
        model = model
            .with_input_fact(i, f32::fact(&shape).into())
            .expect("input fact");
        feeds.push(
            tract_ndarray::ArrayD::from_shape_vec(shape, inputs[i].clone())
                .expect("shape")
                .into_tensor()
                .into_tvalue(),
        );
    }
    let expected = model
        .into_optimized()
        .expect("tract optimises the model")
        .into_runnable()
        .expect("runnable")
        .run(feeds)
        .expect("tract runs the model");
    let got = reference::run(&graph, batch, &inputs);
    let mut worst = 0.0f32;
    for (e, g) in expected.iter().zip(&got) {
        let e: Vec<f32> = e
            .to_plain_array_view::<f32>()
            .expect("f32 output")
            .iter()
            .copied()
            .collect();
        worst = worst.max(max_difference(&e, g));
    }
    (graph, worst)
}

// --- ONNX models built in code, one or a few operators each ---

fn dims(shape: &[i64]) -> Option<TypeProto> {
    let dim = shape
        .iter()
        .map(|&d| Dimension {
            value: Some(if d < 0 {
                dimension::Value::DimParam("N".into())
            } else {
                dimension::Value::DimValue(d)
            }),
            ..Default::default()
        })
        .collect();
    Some(TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: DataType::Float as i32,
            shape: Some(TensorShapeProto { dim }),
        })),
        ..Default::default()
    })
}

fn tensor(name: &str, shape: &[i64], values: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: shape.to_vec(),
        data_type: DataType::Float as i32,
        float_data: values,
        ..Default::default()
    }
}

fn ints_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: DataType::Int64 as i32,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: format!("{op}_{output}"),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn model(
    inputs: &[(&str, &[i64])],
    nodes: Vec<NodeProto>,
    initializer: Vec<TensorProto>,
    outputs: &[&str],
) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            name: "test".into(),
            node: nodes,
            initializer,
            input: inputs
                .iter()
                .map(|(name, shape)| ValueInfoProto {
                    name: name.to_string(),
                    r#type: dims(shape),
                    ..Default::default()
                })
                .collect(),
            output: outputs
                .iter()
                .map(|name| ValueInfoProto {
                    name: name.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn bundled_cloud_and_tail_models_lower_and_match_tract() {
    for (file, steps) in [
        ("models/digits-cloud.onnx", 11),
        ("models/digits-tail.onnx", 4),
    ] {
        let bytes = std::fs::read(repo(file)).expect("bundled model");
        let proto = onnx()
            .proto_model_for_read(&mut &bytes[..])
            .expect("parses");
        let (graph, worst) = compare(&proto, 7, 1);
        assert_eq!(graph.steps.len(), steps, "{file}: {:#?}", graph.steps);
        assert!(worst < TOLERANCE, "{file}: differs from tract by {worst}");
    }
}

#[test]
fn the_cloud_model_classifies_the_held_out_set_as_tract_does() {
    let bytes = std::fs::read(repo("models/digits-cloud.onnx")).expect("bundled model");
    let proto = onnx()
        .proto_model_for_read(&mut &bytes[..])
        .expect("parses");
    let graph = lower(&proto).expect("lowers");
    let inputs = CascadeTensor::read_npy(&repo("models/data/digits-test/inputs.npy")).unwrap();
    let batch = inputs.shape()[0];
    let pixels: Vec<f32> = inputs.to_f32().iter().copied().collect();
    let got = reference::run(&graph, batch, &[pixels]);
    let tract =
        crate::load_path(&repo("models/digits-cloud.onnx"), &LoadOptions::default()).unwrap();
    let expected = tract.run(vec![inputs]).unwrap();
    let expected: Vec<f32> = expected[0].to_f32().iter().copied().collect();
    assert!(max_difference(&expected, &got[0]) < TOLERANCE);
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    let same = expected
        .chunks(10)
        .zip(got[0].chunks(10))
        .all(|(e, g)| argmax(e) == argmax(g));
    assert!(same, "a held-out input got a different class");
}

#[test]
fn convolution_with_stride_padding_dilation_folded_batch_norm_and_relu() {
    let (c, m) = (3i64, 4i64);
    for (strides, pads, dilations) in [
        ([1, 1], [1, 1, 1, 1], [1, 1]),
        ([2, 1], [1, 0, 0, 2], [1, 1]),
        ([1, 2], [2, 2, 2, 2], [2, 2]),
    ] {
        let proto = model(
            &[("x", &[-1, c, 7, 6])],
            vec![
                node(
                    "Conv",
                    &["x", "w", "b"],
                    "conv",
                    vec![
                        ints("strides", &strides),
                        ints("pads", &pads),
                        ints("dilations", &dilations),
                    ],
                ),
                node(
                    "BatchNormalization",
                    &["conv", "g", "beta", "mean", "var"],
                    "bn",
                    vec![float("epsilon", 1e-3)],
                ),
                node("Relu", &["bn"], "y", vec![]),
            ],
            vec![
                tensor("w", &[m, c, 3, 3], random((m * c * 9) as usize, 10)),
                tensor("b", &[m], random(m as usize, 11)),
                tensor("g", &[m], random(m as usize, 12)),
                tensor("beta", &[m], random(m as usize, 13)),
                tensor("mean", &[m], random(m as usize, 14)),
                tensor(
                    "var",
                    &[m],
                    random(m as usize, 15)
                        .iter()
                        .map(|v| v.abs() + 0.5)
                        .collect(),
                ),
            ],
            &["y"],
        );
        let (graph, worst) = compare(&proto, 3, 2);
        // Folded: the batch norm adds no step of its own.
        assert_eq!(graph.steps.len(), 2, "{:#?}", graph.steps);
        assert!(
            worst < TOLERANCE,
            "strides {strides:?} pads {pads:?}: off by {worst}"
        );
    }
}

#[test]
fn batch_norm_on_a_shared_value_is_a_multiply_add_and_activations_add() {
    // The convolution's output is read twice, so the batch norm cannot be folded into it.
    let proto = model(
        &[("x", &[-1, 2, 5, 5])],
        vec![
            node(
                "Conv",
                &["x", "w"],
                "conv",
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node(
                "BatchNormalization",
                &["conv", "g", "beta", "mean", "var"],
                "bn",
                vec![],
            ),
            node("Add", &["bn", "conv"], "sum", vec![]),
            node("Sigmoid", &["sum"], "y", vec![]),
        ],
        vec![
            tensor("w", &[2, 2, 3, 3], random(36, 20)),
            tensor("g", &[2], vec![0.5, 2.0]),
            tensor("beta", &[2], vec![0.1, -0.2]),
            tensor("mean", &[2], vec![0.3, -0.1]),
            tensor("var", &[2], vec![1.5, 0.25]),
        ],
        &["y"],
    );
    let (graph, worst) = compare(&proto, 4, 3);
    assert_eq!(graph.steps.len(), 5, "{:#?}", graph.steps);
    assert!(worst < TOLERANCE, "off by {worst}");
}

#[test]
fn gemm_matmul_and_unary_functions() {
    let proto = model(
        &[("x", &[-1, 6])],
        vec![
            node(
                "Gemm",
                &["x", "b1", "c1"],
                "g",
                vec![int("transB", 1), float("alpha", 0.5), float("beta", 2.0)],
            ),
            node("Tanh", &["g"], "t", vec![]),
            node("Gemm", &["t", "b2"], "g2", vec![]),
            node("LeakyRelu", &["g2"], "l", vec![float("alpha", 0.2)]),
            node("Clip", &["l", "lo", "hi"], "c", vec![]),
            node("Reshape", &["c", "shape"], "r", vec![]),
            node("MatMul", &["r", "b3"], "y", vec![]),
        ],
        vec![
            tensor("b1", &[5, 6], random(30, 30)),
            tensor("c1", &[1, 5], random(5, 31)),
            tensor("b2", &[5, 8], random(40, 32)),
            tensor("lo", &[], vec![-0.3]),
            tensor("hi", &[], vec![0.4]),
            ints_tensor("shape", &[-1, 4, 2]),
            tensor("b3", &[2, 3], random(6, 33)),
        ],
        &["y"],
    );
    let (graph, worst) = compare(&proto, 5, 4);
    assert_eq!(graph.values[graph.outputs[0]].shape, vec![4, 3]);
    assert!(worst < TOLERANCE, "off by {worst}");
}

#[test]
fn pooling_of_every_kind() {
    let cases: Vec<(&str, Vec<AttributeProto>)> = vec![
        (
            "MaxPool",
            vec![
                ints("kernel_shape", &[3, 3]),
                ints("strides", &[2, 2]),
                ints("pads", &[1, 1, 1, 1]),
            ],
        ),
        (
            "MaxPool",
            vec![ints("kernel_shape", &[2, 3]), ints("strides", &[1, 2])],
        ),
        (
            "AveragePool",
            vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])],
        ),
        (
            "AveragePool",
            vec![
                ints("kernel_shape", &[3, 2]),
                ints("pads", &[1, 0, 1, 1]),
                int("count_include_pad", 1),
            ],
        ),
        ("GlobalAveragePool", vec![]),
        ("GlobalMaxPool", vec![]),
    ];
    for (op, attributes) in cases {
        let proto = model(
            &[("x", &[-1, 3, 7, 6])],
            vec![node(op, &["x"], "y", attributes.clone())],
            vec![],
            &["y"],
        );
        let (_, worst) = compare(&proto, 2, 5);
        assert!(worst < TOLERANCE, "{op} {attributes:?}: off by {worst}");
    }
}

#[test]
fn layout_operators_and_constants_on_either_side() {
    let proto = model(
        &[("a", &[-1, 2, 3, 4]), ("b", &[-1, 4, 3, 2])],
        vec![
            node("Transpose", &["b"], "bt", vec![ints("perm", &[0, 3, 2, 1])]),
            node("Concat", &["a", "bt"], "cat", vec![int("axis", 1)]),
            node("Sub", &["k", "cat"], "s", vec![]),
            node("Div", &["s", "d"], "q", vec![]),
            node("Mul", &["q", "cat"], "p", vec![]),
            node("Flatten", &["p"], "f", vec![]),
            node("Softmax", &["f"], "y", vec![]),
            node("Identity", &["cat"], "z", vec![]),
        ],
        vec![
            tensor("k", &[1, 1, 3, 1], vec![0.5, -1.0, 2.0]),
            tensor("d", &[4], vec![1.0, 2.0, -4.0, 8.0]),
        ],
        &["y", "z"],
    );
    let (graph, worst) = compare(&proto, 3, 6);
    assert_eq!(graph.values[graph.outputs[1]].shape, vec![4, 3, 4]);
    assert!(worst < TOLERANCE, "off by {worst}");
}

#[test]
fn an_uncovered_operator_is_named_with_its_node() {
    let proto = model(
        &[("x", &[-1, 4])],
        vec![node("Erf", &["x"], "y", vec![])],
        vec![],
        &["y"],
    );
    let e = lower(&proto).unwrap_err();
    assert_eq!((e.node.as_str(), e.op.as_str()), ("Erf_y", "Erf"));
    assert!(e.to_string().contains("not covered"), "{e}");

    let grouped = model(
        &[("x", &[-1, 4, 5, 5])],
        vec![node("Conv", &["x", "w"], "y", vec![int("group", 2)])],
        vec![tensor("w", &[4, 2, 3, 3], random(72, 40))],
        &["y"],
    );
    let e = lower(&grouped).unwrap_err();
    assert!(e.to_string().contains("group=2"), "{e}");

    // The batch must stay on axis 0.
    let moved = model(
        &[("x", &[-1, 4])],
        vec![node("Transpose", &["x"], "y", vec![])],
        vec![],
        &["y"],
    );
    assert!(lower(&moved).unwrap_err().why.contains("batch"));
}

#[test]
fn the_cuda_backend_falls_back_to_tract_and_answers_the_same() {
    let path = repo("models/digits-tail.onnx");
    let options = LoadOptions {
        backend: BackendChoice::Cuda,
        ..LoadOptions::default()
    };
    let model = crate::load_path(&path, &options).unwrap();
    // This machine has no GPU; with one (and `--features cuda`) the backend would be "cuda".
    if cfg!(not(feature = "cuda")) {
        assert_eq!(model.info().backend, "tract-onnx");
    }
    let x = CascadeTensor::from_f32(&[3, 16], random(48, 50)).unwrap();
    let got = model.run(vec![x.clone()]).unwrap();
    let tract = crate::load_path(&path, &LoadOptions::default()).unwrap();
    let expected = tract.run(vec![x]).unwrap();
    let (g, e): (Vec<f32>, Vec<f32>) = (
        got[0].to_f32().iter().copied().collect(),
        expected[0].to_f32().iter().copied().collect(),
    );
    assert!(max_difference(&g, &e) < TOLERANCE);
}
