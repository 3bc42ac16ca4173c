//! ONNX `QLinearMatMul`: Cascade's integer kernel when the weights are constant, tract's own
//! translation otherwise, both exactly as onnxruntime computes them. The cases
//! (`models/testdata/qlinear/`, made by models/generate.py) have uint8 activations, int8 weights
//! with per-column scales and zero points, a rank-3 input, and 10 of 30 results on rounding ties,
//! which ONNX Runtime rounds half to even.

use std::path::{Path, PathBuf};

use cascade_infer::{LoadOptions, Model, Tensor, load_path};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn npy(relative: &str) -> Tensor {
    Tensor::read_npy(&models().join(relative)).unwrap_or_else(|e| panic!("{e}"))
}

fn load(relative: &str) -> Box<dyn Model> {
    load_path(&models().join(relative), &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// The operators a model runs, from one profiled run.
fn operators(model: &dyn Model, inputs: Vec<Tensor>) -> Vec<String> {
    let times = model
        .profile(inputs, 1)
        .expect("tract models profile")
        .unwrap();
    times.into_iter().map(|t| t.op).collect()
}

#[test]
fn constant_weights_run_on_the_integer_kernel_exactly_as_onnxruntime() {
    let model = load("testdata/qlinear/const-weights.onnx");
    let a = npy("testdata/qlinear/a.npy");
    let outputs = model.run(vec![a.clone()]).unwrap();
    assert_eq!(outputs, vec![npy("testdata/qlinear/y.npy")]);
    let ops = operators(model.as_ref(), vec![a]);
    assert!(ops.iter().any(|op| op == "QFullyConnected"), "{ops:?}");
}

#[test]
fn weights_given_as_an_input_keep_tracts_translation_and_the_same_answers() {
    let model = load("testdata/qlinear/input-weights.onnx");
    let inputs = vec![npy("testdata/qlinear/a.npy"), npy("testdata/qlinear/b.npy")];
    let outputs = model.run(inputs.clone()).unwrap();
    assert_eq!(outputs, vec![npy("testdata/qlinear/y.npy")]);
    let ops = operators(model.as_ref(), inputs);
    assert!(!ops.iter().any(|op| op == "QFullyConnected"), "{ops:?}");
}

#[test]
fn the_bundled_int8_edge_model_runs_its_matrix_products_on_the_integer_kernel() {
    let model = load("digits-edge.int8.onnx");
    let x = Tensor::from_f32(&[1, 64], vec![0.5; 64]).unwrap();
    let ops = operators(model.as_ref(), vec![x]);
    assert_eq!(
        ops.iter().filter(|op| *op == "QFullyConnected").count(),
        2,
        "{ops:?}"
    );
    assert!(!ops.iter().any(|op| op.contains("MatMul")), "{ops:?}");
}
