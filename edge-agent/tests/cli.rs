//! The `edge-agent` binary, driven as a user would.

use std::io::Write;
use std::process::{Command, Stdio};

use cascade_proto::frame::{Frame, Hello, Samples, Unit, encode};

#[test]
fn frames_decode_prints_json_lines_and_a_summary() {
    let data: Vec<u8> = [100i16, 200, -300]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let frames = [
        Frame::Hello(Hello {
            firmware: "cascade-firmware 0.1.0",
            sensor: "LIS3DH",
            rate_hz: 50,
            channels: 3,
            scale: 0.01,
            unit: Unit::StandardGravity,
        }),
        Frame::Samples(Samples {
            seq: 0,
            t_us: 0,
            channels: 3,
            scale: 0.01,
            data: &data,
        }),
        Frame::Samples(Samples {
            seq: 2,
            t_us: 40_000,
            channels: 3,
            scale: 0.01,
            data: &data,
        }),
    ];
    let mut stream = b"\x13\x37garbage\x00".to_vec();
    for f in &frames {
        let mut buf = [0u8; 128];
        stream.extend_from_slice(encode(f, &mut buf).unwrap());
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["frames", "decode"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&stream).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());

    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["dropped", "hello", "samples", "samples"]);
    assert_eq!(lines[1]["sensor"], "LIS3DH");
    assert_eq!(lines[2]["values"], serde_json::json!([1.0, 2.0, -3.0]));
    let summary = String::from_utf8(out.stderr).unwrap();
    assert!(
        summary.contains("3 decoded, 1 dropped (corrupt), 1 lost"),
        "{summary}"
    );
}

#[test]
fn a_missing_input_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["frames", "decode", "/nonexistent/tty"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("cannot open /nonexistent/tty")
    );
}

mod model_tools {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    use cascade_infer::Tensor;
    use ndarray::ArrayD;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    fn agent(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(args)
            .output()
            .unwrap()
    }

    fn model(name: &str) -> String {
        models().join(name).display().to_string()
    }

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn infer_single_input_single_output() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("x.npy");
        Tensor::F32(ArrayD::from_elem(vec![3, 64], 0.5))
            .write_npy(&input)
            .unwrap();
        let output = dir.path().join("y.npy");
        let out = agent(&[
            "infer",
            "--model",
            &model("digits-cloud.onnx"),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let y = Tensor::read_npy(&output).unwrap();
        assert_eq!(y.shape(), &[3, 10]);
        let row_sum: f32 = y.as_f32().unwrap().index_axis(ndarray::Axis(0), 0).sum();
        assert!(
            (row_sum - 1.0).abs() < 1e-4,
            "probabilities sum to 1: {row_sum}"
        );
    }

    #[test]
    fn infer_named_inputs_0d_tensor_and_output_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.npy");
        let b = dir.path().join("b.npy");
        Tensor::F32(
            ArrayD::from_shape_vec(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap(),
        )
        .write_npy(&a)
        .unwrap();
        Tensor::F32(ArrayD::from_elem(vec![], 10.0))
            .write_npy(&b)
            .unwrap();
        let out_dir = dir.path().join("out");
        let out = agent(&[
            "infer",
            "--model",
            &model("testdata/two-in-two-out.onnx"),
            "--input",
            &format!("b={}", b.display()),
            "--input",
            &format!("a={}", a.display()),
            "--output-dir",
            out_dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let sum = Tensor::read_npy(&out_dir.join("sum_0.npy")).unwrap();
        let scaled = Tensor::read_npy(&out_dir.join("scaled_1.npy")).unwrap();
        assert_eq!(
            sum.as_f32().unwrap().as_slice().unwrap(),
            &[11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
        );
        assert_eq!(scaled.as_f32().unwrap()[[1, 2]], 60.0);
    }

    #[test]
    fn infer_int8_in_int8_out() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("q.npy");
        Tensor::I8(ArrayD::from_elem(vec![1, 64], -100))
            .write_npy(&input)
            .unwrap();
        let out_dir = dir.path().join("out");
        let out = agent(&[
            "infer",
            "--model",
            &model("testdata/digits-edge.int8io.tflite"),
            "--input",
            input.to_str().unwrap(),
            "--output-dir",
            out_dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let outputs: Vec<Tensor> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| Tensor::read_npy(&e.unwrap().path()).unwrap())
            .collect();
        assert_eq!(outputs.len(), 2);
        assert!(
            outputs.iter().all(|t| matches!(t, Tensor::I8(_))),
            "int8 outputs stay int8"
        );
    }

    #[test]
    fn infer_accepts_png_for_image_models() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("p.npy");
        let png = models().join("data/digits-test/sample-1-label-3.png");
        let out = agent(&[
            "infer",
            "--model",
            &model("digits-cloud.onnx"),
            "--input",
            png.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let p = Tensor::read_npy(&output).unwrap();
        let row = p
            .as_f32()
            .unwrap()
            .index_axis(ndarray::Axis(0), 0)
            .iter()
            .copied()
            .collect::<Vec<f32>>();
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(best, 3, "the PNG of a 3 is read as a 3: {row:?}");
    }

    #[test]
    fn infer_errors_exit_non_zero_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let wrong = dir.path().join("wrong.npy");
        Tensor::F32(ArrayD::zeros(vec![1, 63]))
            .write_npy(&wrong)
            .unwrap();
        let out_file = dir.path().join("o.npy");
        let cases: Vec<(Vec<String>, &str)> = vec![
            (
                vec![
                    "--model".into(),
                    model("digits-cloud.onnx"),
                    "--input".into(),
                    wrong.display().to_string(),
                    "--output".into(),
                    out_file.display().to_string(),
                ],
                "must have shape [N, 64], got [1, 63]",
            ),
            (
                vec![
                    "--model".into(),
                    model("digits-edge.f32.onnx"),
                    "--input".into(),
                    wrong.display().to_string(),
                    "--output".into(),
                    out_file.display().to_string(),
                ],
                "has 2 outputs",
            ),
            (
                vec![
                    "--model".into(),
                    model("testdata/two-in-two-out.onnx"),
                    "--input".into(),
                    format!("a={}", wrong.display()),
                    "--input".into(),
                    format!("c={}", wrong.display()),
                    "--output-dir".into(),
                    dir.path().display().to_string(),
                ],
                "no input named \"c\"",
            ),
            (
                vec![
                    "--model".into(),
                    model("digits-cloud.onnx"),
                    "--input".into(),
                    "/nonexistent.npy".into(),
                    "--output".into(),
                    out_file.display().to_string(),
                ],
                "/nonexistent.npy",
            ),
            (
                vec![
                    "--model".into(),
                    models()
                        .join("data/digits-test/labels.npy")
                        .display()
                        .to_string(),
                    "--input".into(),
                    wrong.display().to_string(),
                    "--output".into(),
                    out_file.display().to_string(),
                ],
                "not a model file",
            ),
        ];
        for (args, expected) in cases {
            let mut full = vec!["infer".to_string()];
            full.extend(args);
            let refs: Vec<&str> = full.iter().map(String::as_str).collect();
            let out = agent(&refs);
            assert!(!out.status.success(), "{full:?} succeeded");
            assert!(
                stderr(&out).contains(expected),
                "{full:?}: {}",
                stderr(&out)
            );
        }
    }

    #[test]
    fn bench_reports_latency_as_json() {
        let out = agent(&[
            "bench",
            "--model",
            &model("digits-edge.int8.tflite"),
            "--warmup",
            "5",
            "--iterations",
            "50",
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let p50 = report["p50_us"].as_f64().unwrap();
        let p99 = report["p99_us"].as_f64().unwrap();
        assert!(p50 > 0.0 && p99 >= p50, "{report}");
        assert_eq!(report["iterations"], 50);
        assert!(report["peak_rss_kib"].as_u64().unwrap() > 0);
    }

    #[test]
    fn pipeline_bench_runs_the_whole_agent_with_and_without_spinning() {
        for spin in ["0", "50"] {
            let out = agent(&[
                "bench",
                "--pipeline",
                "--spin-us",
                spin,
                "--model",
                &model("digits-edge.int8.tflite"),
                "--warmup",
                "5",
                "--iterations",
                "100",
                "--json",
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["spin_us"], spin.parse::<u64>().unwrap(), "{report}");
            assert_eq!(report["iterations"], 100);
            let total = report["end_to_end_p50_us"].as_f64().unwrap();
            let model = report["model_p50_us"].as_f64().unwrap();
            assert!(model > 0.0 && total >= model, "{report}");
        }
        // Spinning is bounded: the agent refuses a window that only burns CPU.
        let out = agent(&[
            "bench",
            "--pipeline",
            "--spin-us",
            "5000",
            "--model",
            &model("digits-edge.int8.tflite"),
        ]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("model.spin_us"), "{}", stderr(&out));
    }

    #[test]
    fn eval_reports_edge_cloud_and_cascade_accuracy() {
        let out = agent(&[
            "eval",
            "--model",
            &model("digits-edge.int8.onnx"),
            "--data",
            models().join("data/digits-test").to_str().unwrap(),
            "--cloud-model",
            &model("digits-cloud.onnx"),
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["samples"], 360);
        let edge = report["edge_accuracy"].as_f64().unwrap();
        let cloud = report["cloud_accuracy"].as_f64().unwrap();
        let curve = report["curve"].as_array().unwrap();
        assert_eq!(curve[0]["escalated"], 0.0);
        let at_zero = curve[0]["cascade_accuracy"].as_f64().unwrap();
        assert!(
            (at_zero - edge).abs() < 1e-9,
            "escalating nothing is edge-only"
        );
        let escalated: Vec<f64> = curve
            .iter()
            .map(|p| p["escalated"].as_f64().unwrap())
            .collect();
        assert!(
            escalated.windows(2).all(|w| w[0] <= w[1]),
            "a higher threshold escalates more: {escalated:?}"
        );
        let best = curve
            .iter()
            .map(|p| p["cascade_accuracy"].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!(
            best > edge && best <= cloud.max(edge) + 1e-9,
            "the cascade beats the edge: {best} vs {edge}, cloud {cloud}"
        );
    }
}
