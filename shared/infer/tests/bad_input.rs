//! Bad models and bad inputs get errors that say what is wrong, never a panic.

use std::path::{Path, PathBuf};

use cascade_infer::{InferError, LoadOptions, Model, Tensor, load_bytes, load_path};
use ndarray::ArrayD;
use proptest::prelude::*;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn load(name: &str) -> Box<dyn Model> {
    load_path(&models().join(name), &LoadOptions::default()).unwrap()
}

fn f32_tensor(shape: &[usize]) -> Tensor {
    Tensor::F32(ArrayD::zeros(shape))
}

#[test]
fn wrong_shape_names_the_input_and_the_expected_shape() {
    let err = load("digits-edge.int8.onnx")
        .run(vec![f32_tensor(&[1, 63])])
        .unwrap_err();
    assert!(matches!(err, InferError::InputShape { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("\"pixels\"") && text.contains("[N, 64]") && text.contains("[1, 63]"),
        "{text}"
    );
    let err = load("digits-edge.int8.tflite")
        .run(vec![f32_tensor(&[2, 64])])
        .unwrap_err();
    assert!(err.to_string().contains("[1, 64]"), "{err}");
}

#[test]
fn wrong_dtype_says_what_the_model_takes() {
    let err = load("digits-cloud.onnx")
        .run(vec![Tensor::I32(ArrayD::zeros(vec![1, 64]))])
        .unwrap_err();
    assert!(matches!(err, InferError::InputDType { .. }), "{err:?}");
    assert!(
        err.to_string().contains("must be float32, got int32"),
        "{err}"
    );
    let int8 = load_path(
        &models().join("testdata/digits-edge.int8io.tflite"),
        &LoadOptions::default(),
    )
    .unwrap();
    let err = int8.run(vec![f32_tensor(&[1, 64])]).unwrap_err();
    assert!(err.to_string().contains("int8 (quantized"), "{err}");
}

#[test]
fn empty_inputs_are_refused() {
    let err = load("digits-edge.f32.onnx")
        .run(vec![f32_tensor(&[0, 64])])
        .unwrap_err();
    assert!(err.to_string().contains("non-empty"), "{err}");
}

#[test]
fn wrong_input_count_lists_the_inputs() {
    let model = load("testdata/two-in-two-out.onnx");
    let err = model.run(vec![f32_tensor(&[2, 3])]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("takes 2 input(s)") && text.contains("\"a\"") && text.contains("\"b\""),
        "{text}"
    );
}

#[test]
fn unknown_and_missing_input_names_are_errors() {
    let model = load("testdata/two-in-two-out.onnx");
    let info = model.info();
    let err = info
        .order_inputs(vec![
            (Some("a".into()), f32_tensor(&[2, 3])),
            (Some("c".into()), f32_tensor(&[])),
        ])
        .unwrap_err();
    assert!(
        matches!(err, InferError::UnknownInput { ref name, .. } if name == "c"),
        "{err:?}"
    );
    let err = info
        .order_inputs(vec![(Some("a".into()), f32_tensor(&[2, 3]))])
        .unwrap_err();
    assert!(
        matches!(err, InferError::MissingInput { ref name } if name == "b"),
        "{err:?}"
    );
}

#[test]
fn truncated_models_fail_to_load_with_a_reason() {
    for name in ["digits-cloud.onnx", "digits-edge.int8.tflite"] {
        let bytes = std::fs::read(models().join(name)).unwrap();
        let half = &bytes[..bytes.len() / 2];
        let err = match load_bytes(half, name, &LoadOptions::default()) {
            Ok(_) => panic!("{name}: a truncated model loaded"),
            Err(e) => e,
        };
        assert!(matches!(err, InferError::Load(_)), "{name}: {err:?}");
        assert!(
            err.to_string().contains("corrupt or truncated"),
            "{name}: {err}"
        );
    }
}

#[test]
fn files_that_are_not_models_are_named_for_what_they_are() {
    let err = match load_path(
        &models().join("data/digits-test/labels.npy"),
        &LoadOptions::default(),
    ) {
        Ok(_) => panic!("a .npy file loaded as a model"),
        Err(e) => e,
    };
    assert!(matches!(err, InferError::UnknownFormat { .. }), "{err:?}");
    assert!(err.to_string().contains(".npy"), "{err}");
}

#[test]
fn unsupported_operators_are_named() {
    for (name, op) in [
        ("testdata/unsupported-op.onnx", "Frobnicate"),
        ("testdata/unsupported-op.tflite", "CUMSUM"),
    ] {
        let err = match load_path(&models().join(name), &LoadOptions::default()) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e,
        };
        let text = err.to_string();
        assert!(
            text.contains(op),
            "{name}: error does not name {op}: {text}"
        );
        assert!(
            text.contains("hint:"),
            "{name}: error gives no hint: {text}"
        );
    }
}

#[test]
fn the_missing_tflite_interpreter_is_explained() {
    let options = LoadOptions {
        backend: cascade_infer::BackendChoice::Tflite,
        ..LoadOptions::default()
    };
    // Without the feature there is no interpreter; with it, this model's per-channel weights are
    // refused (tests/interpreter.rs covers the backend itself).
    match load_path(&models().join("digits-edge.int8.tflite"), &options) {
        Ok(model) => panic!("loaded on {}", model.info().backend),
        Err(err) if cfg!(feature = "tflite") => {
            assert!(err.to_string().contains("per-channel"), "{err}");
        }
        Err(err) => assert!(err.to_string().contains("--features tflite"), "{err}"),
    }
}

#[test]
fn empty_npy_files_and_garbage_npy_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.npy");
    std::fs::write(&empty, b"").unwrap();
    let err = Tensor::read_npy(&empty).unwrap_err();
    assert!(err.to_string().contains("empty.npy"), "{err}");
    let zero_rows = dir.path().join("zero.npy");
    f32_tensor(&[0, 64]).write_npy(&zero_rows).unwrap();
    let t = Tensor::read_npy(&zero_rows).unwrap();
    assert!(load("digits-edge.f32.onnx").run(vec![t]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_never_panic_the_loader(mut bytes in proptest::collection::vec(any::<u8>(), 0..256), kind in 0u8..3) {
        // Steer some inputs past format detection so the backends see them too.
        match kind {
            0 if !bytes.is_empty() => bytes[0] = 0x08,
            1 if bytes.len() >= 8 => bytes[4..8].copy_from_slice(b"TFL3"),
            _ => {}
        }
        let _ = load_bytes(&bytes, "fuzz", &LoadOptions::default());
    }
}
