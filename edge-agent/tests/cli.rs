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
