//! The TFLite interpreter backend (feature `tflite`): TFLite's own kernels, through the `tflite`
//! crate, against LiteRT's reference kernels and against tract.
//!
//! The runtime the crate vendors predates per-channel FULLY_CONNECTED weights, so the bundled
//! edge model (converted by TF 2.21, per-channel) is refused, and these tests use the same
//! weights converted with per-tensor scales (`models/testdata/digits-edge.int8.per-tensor.tflite`).
//!
//! ```sh
//! cargo test -p cascade-infer --features tflite --test interpreter
//! ```
#![cfg(feature = "tflite")]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cascade_infer::{BackendChoice, LoadOptions, Model, Tensor, load_bytes, load_path, run_batch};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn options(backend: BackendChoice) -> LoadOptions {
    LoadOptions {
        backend,
        ..LoadOptions::default()
    }
}

fn load(name: &str, backend: BackendChoice) -> Box<dyn Model> {
    load_path(&models().join(name), &options(backend)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn npy(relative: &str) -> Tensor {
    Tensor::read_npy(&models().join(relative)).unwrap_or_else(|e| panic!("{e}"))
}

fn held_out(n: usize) -> Tensor {
    let all = npy("data/digits-test/inputs.npy");
    let a = all.as_f32().expect("float inputs");
    Tensor::F32(a.slice(ndarray::s![..n, ..]).to_owned().into_dyn())
}

/// The error loading `result` gave, as text.
fn error_of(result: Result<Box<dyn Model>, cascade_infer::InferError>) -> String {
    match result {
        Ok(model) => panic!("loaded on {}", model.info().backend),
        Err(e) => e.to_string(),
    }
}

/// Largest element-wise difference, in units of `step`.
fn worst_steps(ours: &Tensor, reference: &Tensor, step: f32) -> f32 {
    assert_eq!(ours.shape(), reference.shape());
    ours.to_f32()
        .iter()
        .zip(reference.to_f32().iter())
        .map(|(a, b)| (a - b).abs() / step)
        .fold(0.0, f32::max)
}

/// The edge model with per-tensor weight scales.
const EDGE: &str = "testdata/digits-edge.int8.per-tensor.tflite";

#[test]
fn the_interpreter_describes_the_model_as_tract_does() {
    let name = EDGE;
    let interpreter = load(name, BackendChoice::Tflite);
    let tract = load(name, BackendChoice::Tract);
    assert!(
        interpreter.info().backend.starts_with("tflite"),
        "{}",
        interpreter.info().backend
    );
    assert!(tract.info().backend.starts_with("tract"));
    assert_eq!(interpreter.info().inputs, tract.info().inputs);
    assert_eq!(interpreter.info().outputs, tract.info().outputs);
}

#[test]
fn the_interpreter_is_within_one_step_of_the_reference_kernels_and_of_tract() {
    let name = EDGE;
    let interpreter = load(name, BackendChoice::Tflite);
    let tract = load(name, BackendChoice::Tract);
    let steps: toml::Table = toml::from_str(
        &std::fs::read_to_string(models().join("data/references/steps.toml")).unwrap(),
    )
    .unwrap();
    let x = held_out(32);
    // The file's batch is 1: run_batch splits the 32 rows.
    let ours = run_batch(interpreter.as_ref(), vec![x.clone()]).unwrap();
    let theirs = run_batch(tract.as_ref(), vec![x]).unwrap();
    for ((spec, ours), theirs) in interpreter.info().outputs.iter().zip(&ours).zip(&theirs) {
        let file = format!(
            "digits-edge.int8.per-tensor.tflite.{}.npy",
            spec.name.replace(':', "_")
        );
        let step = steps[&file].as_float().unwrap() as f32;
        let reference = npy(&format!("data/references/{file}"));
        // One step, plus float rounding of the dequantized value.
        let vs_reference = worst_steps(ours, &reference, step);
        assert!(
            vs_reference <= 1.0001,
            "{}: {vs_reference} steps from the reference kernels",
            spec.name
        );
        let vs_tract = worst_steps(ours, theirs, step);
        assert!(
            vs_tract <= 1.0001,
            "{}: {vs_tract} steps from tract",
            spec.name
        );
    }
}

#[test]
fn one_model_serves_several_threads_with_the_same_answers() {
    let model: Arc<dyn Model> = Arc::from(load(EDGE, BackendChoice::Tflite));
    let x = held_out(8);
    let expected = run_batch(model.as_ref(), vec![x.clone()]).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (model, x) = (Arc::clone(&model), x.clone());
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| run_batch(model.as_ref(), vec![x.clone()]).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for handle in handles {
        for outputs in handle.join().unwrap() {
            assert_eq!(outputs, expected);
        }
    }
}

#[test]
fn bad_inputs_and_files_are_named_not_panics() {
    let model = load(EDGE, BackendChoice::Tflite);
    let wrong_shape = Tensor::from_f32(&[1, 3], vec![0.0; 3]).unwrap();
    let err = model.run(vec![wrong_shape]).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");

    let bytes = std::fs::read(models().join(EDGE)).unwrap();
    let err = error_of(load_bytes(
        &bytes[..bytes.len() / 3],
        "truncated.tflite",
        &options(BackendChoice::Tflite),
    ));
    assert!(
        err.contains("truncated.tflite") && err.contains("tflite"),
        "{err}"
    );

    let onnx = std::fs::read(models().join("digits-edge.f32.onnx")).unwrap();
    let err = error_of(load_bytes(
        &onnx,
        "edge.onnx",
        &options(BackendChoice::Tflite),
    ));
    assert!(err.contains("only .tflite"), "{err}");

    // CUMSUM is newer than the interpreter's TFLite and unknown to tract: `auto` tries both and
    // reports tract's error, which names the operator.
    let err = error_of(load_path(
        &models().join("testdata/unsupported-op.tflite"),
        &LoadOptions::default(),
    ));
    assert!(err.contains("CUMSUM"), "{err}");
    let err = error_of(load_path(
        &models().join("testdata/unsupported-op.tflite"),
        &options(BackendChoice::Tflite),
    ));
    assert!(err.contains("could not build an interpreter"), "{err}");
}

#[test]
fn auto_falls_back_to_the_interpreter_for_a_model_tract_cannot_load() {
    let name = "testdata/depth-to-space.tflite";
    let err = error_of(load_path(
        &models().join(name),
        &options(BackendChoice::Tract),
    ));
    assert!(err.contains("DEPTH_TO_SPACE"), "{err}");

    let model = load(name, BackendChoice::Auto);
    assert!(
        model.info().backend.starts_with("tflite"),
        "{}",
        model.info().backend
    );
    // [1, 2, 2, 4] -> [1, 4, 4, 1]: each input pixel's 4 channels become a 2x2 block.
    let input: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let outputs = model
        .run(vec![
            Tensor::from_f32(&[1, 2, 2, 4], input.clone()).unwrap(),
        ])
        .unwrap();
    let got = outputs[0].as_f32().expect("float output");
    assert_eq!(got.shape(), &[1, 4, 4, 1]);
    for y in 0..4 {
        for x in 0..4 {
            let (h, w, dh, dw) = (y / 2, x / 2, y % 2, x % 2);
            let expected = input[(h * 2 + w) * 4 + dh * 2 + dw];
            assert_eq!(got[[0, y, x, 0]], expected, "output pixel ({y}, {x})");
        }
    }
}

#[test]
fn per_channel_fully_connected_weights_are_refused_not_miscomputed() {
    // This TFLite reads only the first scale of such weights: it loads the file and answers
    // wrongly (every input the same class), so Cascade refuses it by node and operator.
    let err = error_of(load_path(
        &models().join("digits-edge.int8.tflite"),
        &options(BackendChoice::Tflite),
    ));
    assert!(
        err.contains("FULLY_CONNECTED")
            && err.contains("per-channel")
            && err.contains("--backend tract"),
        "{err}"
    );
    // `auto` runs it on tract, as before.
    let model = load("digits-edge.int8.tflite", BackendChoice::Auto);
    assert!(
        model.info().backend.starts_with("tract"),
        "{}",
        model.info().backend
    );
}
