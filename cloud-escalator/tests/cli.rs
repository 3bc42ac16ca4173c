//! The `cloud-escalator` binary, driven as a user would.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn escalator(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloud-escalator"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cloud-escalator starts");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn help_explains_the_commands() {
    let out = escalator(&["--help"], b"");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("codec"), "{text}");
    let out = escalator(&["codec", "--help"], b"");
    let text = String::from_utf8(out.stdout).unwrap();
    for sub in ["decode", "encode", "example", "topic"] {
        assert!(text.contains(sub), "codec --help lacks {sub}: {text}");
    }
}

#[test]
fn example_encode_decode_round_trips_across_processes() {
    let json = escalator(&["codec", "example", "ota_status"], b"").stdout;
    let wire = escalator(&["codec", "encode"], &json);
    assert!(
        wire.status.success(),
        "{}",
        String::from_utf8_lossy(&wire.stderr)
    );
    assert!(
        !wire.stdout.starts_with(b"{"),
        "encode writes postcard bytes"
    );
    let back = escalator(&["codec", "decode"], &wire.stdout);
    assert!(back.status.success());
    assert_eq!(back.stdout, json);
}

#[test]
fn garbage_is_reported_with_a_data_error_exit_code() {
    let out = escalator(&["codec", "decode"], &[1, 42, 0, 0]);
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unknown message kind code 42"), "{err}");
}

#[test]
fn oversized_input_respects_max_bytes() {
    let json = escalator(&["codec", "example", "verdict"], b"").stdout;
    let out = escalator(&["codec", "decode", "--max-bytes", "64"], &json);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("over the 64-byte limit")
    );
}

#[test]
fn unknown_example_kind_is_a_usage_error() {
    let out = escalator(&["codec", "example", "nope"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("escalation_request")
    );
}

#[test]
fn perf_round_trip_measures_with_the_store_where_it_is_told() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/testdata/noop.onnx");
    let store = tempfile::tempdir().unwrap();
    let args = |store: &str| {
        [
            "perf",
            "round-trip",
            "--n",
            "20",
            "--warmup",
            "2",
            "--model",
            model,
            "--escalator-store",
        ]
        .into_iter()
        .map(String::from)
        .chain([store.to_string()])
        .collect::<Vec<_>>()
    };
    let run = |store: &str| {
        let args = args(store);
        escalator(&args.iter().map(String::as_str).collect::<Vec<_>>(), b"")
    };
    let out = run(store.path().to_str().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["latency"]["p50_us"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(
        std::fs::read_dir(store.path()).unwrap().count(),
        0,
        "its store is removed after the run"
    );
    // The option is used: a store directory that does not exist fails the run.
    let missing = store.path().join("missing");
    let out = run(missing.to_str().unwrap());
    assert!(!out.status.success());
}
