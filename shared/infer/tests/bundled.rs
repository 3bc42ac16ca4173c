//! The models Cascade ships: intact, described by valid sidecars, computing what onnxruntime and
//! TFLite's reference kernels compute, and as accurate on held-out data as models/README.md says.

use std::path::{Path, PathBuf};

use cascade_infer::evaluation::{Prediction, accuracy};
use cascade_infer::metadata::Metadata;
use cascade_infer::{LoadOptions, Metric, Model, Tensor, load_path, run_batch};
use sha2::{Digest, Sha256};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn load(name: &str) -> Box<dyn Model> {
    load_path(&models().join(name), &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn npy(relative: &str) -> Tensor {
    Tensor::read_npy(&models().join(relative)).unwrap_or_else(|e| panic!("{e}"))
}

fn test_set() -> (Tensor, Vec<usize>) {
    let labels = match npy("data/digits-test/labels.npy") {
        Tensor::I64(a) => a.iter().map(|&v| v as usize).collect(),
        other => panic!("labels are {}", other.dtype()),
    };
    (npy("data/digits-test/inputs.npy"), labels)
}

fn first_rows(t: &Tensor, n: usize) -> Tensor {
    let a = t.as_f32().expect("float inputs");
    Tensor::F32(a.slice(ndarray::s![..n, ..]).to_owned().into_dyn())
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, abs: f32, rel: f32) {
    assert_eq!(ours.shape(), reference.shape(), "{what}: shape");
    let (a, b) = (ours.to_f32(), reference.to_f32());
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        let tolerance = abs + rel * y.abs();
        assert!(
            (x - y).abs() <= tolerance,
            "{what}[{i}]: {x} vs reference {y} (tolerance {tolerance})"
        );
    }
}

#[test]
fn committed_files_match_the_manifest() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(models().join("manifest.toml")).unwrap()).unwrap();
    assert!(manifest.len() >= 10, "the manifest lists the bundled files");
    for (file, expected) in &manifest {
        let bytes = std::fs::read(models().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let digest = hex::encode(Sha256::digest(&bytes));
        assert_eq!(
            Some(digest.as_str()),
            expected.as_str(),
            "{file} differs from models/manifest.toml: regenerate with models/generate.py, or restore it"
        );
    }
}

#[test]
fn every_bundled_model_loads_with_a_consistent_sidecar() {
    for name in [
        "digits-edge.f32.onnx",
        "digits-edge.int8.onnx",
        "digits-edge.int8.tflite",
        "digits-cloud.onnx",
        "digits-tail.onnx",
    ] {
        let model = load(name);
        let meta = Metadata::for_model(&models().join(name)).unwrap_or_else(|e| panic!("{e}"));
        meta.check_against(model.info())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(meta.labels.len(), 10);
        // ONNX models take a free batch, which tract compiles for shape by shape; the TFLite
        // model's batch is fixed.
        assert_eq!(
            model.compiles_per_shape(),
            name.ends_with(".onnx"),
            "{name}: compiles per shape"
        );
    }
}

#[test]
fn onnx_models_match_onnxruntime() {
    let (inputs, _) = test_set();
    let x = first_rows(&inputs, 32);
    for name in [
        "digits-edge.f32.onnx",
        "digits-edge.int8.onnx",
        "digits-cloud.onnx",
    ] {
        let model = load(name);
        let outputs = model.run(vec![x.clone()]).unwrap();
        for (spec, ours) in model.info().outputs.iter().zip(&outputs) {
            let reference = npy(&format!("data/references/{name}.{}.npy", spec.name));
            assert_close(
                &format!("{name} {}", spec.name),
                ours,
                &reference,
                1e-4,
                1e-3,
            );
        }
    }
}

#[test]
fn int8_tflite_is_within_one_step_of_the_reference_kernels() {
    let (inputs, _) = test_set();
    let x = first_rows(&inputs, 32);
    let name = "digits-edge.int8.tflite";
    let model = load(name);
    let steps: toml::Table = toml::from_str(
        &std::fs::read_to_string(models().join("data/references/steps.toml")).unwrap(),
    )
    .unwrap();
    let outputs = run_batch(model.as_ref(), vec![x]).unwrap();
    for (spec, ours) in model.info().outputs.iter().zip(&outputs) {
        let file = format!("{name}.{}.npy", spec.name.replace(':', "_"));
        let step = steps[&file].as_float().unwrap() as f32;
        let reference = npy(&format!("data/references/{file}"));
        // One step, plus float rounding of the dequantized value.
        assert_close(
            &format!("{name} {}", spec.name),
            ours,
            &reference,
            step * 1.0001,
            0.0,
        );
    }
}

fn predictions(model: &dyn Model, path: &Path, inputs: &Tensor) -> Vec<usize> {
    let meta = Metadata::for_model(path).unwrap();
    let ix = meta.scores_index(model.info()).unwrap();
    let outputs = run_batch(model, vec![inputs.clone()]).unwrap();
    let scores = outputs[ix].to_f32();
    let per = scores.len() / inputs.shape()[0];
    let flat: Vec<f32> = scores.iter().copied().collect();
    flat.chunks(per)
        .map(|row| {
            Prediction::from_probabilities(&meta.probabilities(row), Metric::MaxProb)
                .unwrap()
                .class
        })
        .collect()
}

#[test]
fn held_out_accuracy_matches_models_readme() {
    let (inputs, labels) = test_set();
    let acc = |name: &str| {
        let model = load(name);
        accuracy(
            &predictions(model.as_ref(), &models().join(name), &inputs),
            &labels,
        )
    };
    let edge_f32 = acc("digits-edge.f32.onnx");
    let edge_int8 = acc("digits-edge.int8.onnx");
    let edge_tflite = acc("digits-edge.int8.tflite");
    let cloud = acc("digits-cloud.onnx");
    // models/README.md reports 96.9 / 96.9 / 96.7 / 98.9 %.
    assert!(edge_f32 >= 0.965, "edge f32 {edge_f32}");
    assert!(edge_int8 >= 0.965, "edge int8 ONNX {edge_int8}");
    assert!(edge_tflite >= 0.96, "edge int8 TFLite {edge_tflite}");
    assert!(cloud >= 0.985, "cloud {cloud}");
    assert!(cloud > edge_f32, "the cloud model is the more accurate one");
}

#[test]
fn tail_model_classifies_edge_embeddings() {
    let (inputs, labels) = test_set();
    let edge = load("digits-edge.int8.onnx");
    let meta = Metadata::for_model(&models().join("digits-edge.int8.onnx")).unwrap();
    let outputs = edge.run(vec![inputs]).unwrap();
    let embeddings = outputs[meta.embedding_index(edge.info()).unwrap()].clone();
    let tail_path = models().join("digits-tail.onnx");
    let tail = load("digits-tail.onnx");
    let acc = accuracy(
        &predictions(tail.as_ref(), &tail_path, &embeddings),
        &labels,
    );
    assert!(acc >= 0.96, "tail on int8 edge embeddings: {acc}");
}

#[test]
fn fully_int8_model_takes_and_returns_int8() {
    let model = load_path(
        &models().join("testdata/digits-edge.int8io.tflite"),
        &LoadOptions::default(),
    )
    .unwrap();
    let info = model.info();
    assert_eq!(info.inputs[0].dtype, cascade_infer::DType::I8);
    let q = info.inputs[0]
        .quantization
        .expect("int8 input carries its quantization");
    let (inputs, labels) = test_set();
    let x = inputs.as_f32().unwrap();
    let quantized =
        x.mapv(|v| ((v / q.scale).round() + q.zero_point as f32).clamp(-128.0, 127.0) as i8);
    let outputs = run_batch(model.as_ref(), vec![Tensor::I8(quantized)]).unwrap();
    let probs_ix = info
        .outputs
        .iter()
        .position(|o| o.shape.last() == Some(&cascade_infer::Dim::Fixed(10)))
        .unwrap();
    let Tensor::I8(scores) = &outputs[probs_ix] else {
        panic!("int8 output expected")
    };
    let predicted: Vec<usize> = scores
        .outer_iter()
        .map(|row| row.iter().enumerate().max_by_key(|(_, v)| **v).unwrap().0)
        .collect();
    let acc = accuracy(&predicted, &labels);
    assert!(acc >= 0.95, "int8-in, int8-out accuracy {acc}");
}

#[test]
fn motion_model_matches_onnxruntime_and_its_reported_accuracy() {
    let name = "motion-edge.onnx";
    let model = load(name);
    let meta = Metadata::for_model(&models().join(name)).unwrap();
    meta.check_against(model.info()).unwrap();
    assert_eq!(meta.labels, ["still", "walking", "shaking"]);

    let inputs = npy("data/motion-test/inputs.npy");
    let outputs = run_batch(model.as_ref(), vec![first_rows(&inputs, 32)]).unwrap();
    for (spec, ours) in model.info().outputs.iter().zip(&outputs) {
        let reference = npy(&format!("data/references/{name}.{}.npy", spec.name));
        assert_close(
            &format!("{name} {}", spec.name),
            ours,
            &reference,
            1e-4,
            1e-3,
        );
    }

    let labels: Vec<usize> = match npy("data/motion-test/labels.npy") {
        Tensor::I64(a) => a.iter().map(|&l| l as usize).collect(),
        other => panic!("labels are {}", other.dtype()),
    };
    let acc = accuracy(
        &predictions(model.as_ref(), &models().join(name), &inputs),
        &labels,
    );
    // The sidecar and models/README.md report 98.3 % on this synthetic split.
    assert!(acc >= 0.98, "motion {acc}");
}
