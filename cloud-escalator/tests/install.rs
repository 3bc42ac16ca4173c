//! `cloud-escalator install` under a temporary `--root`, and its unit through `systemd-analyze`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn escalator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-escalator"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_under_a_root_puts_every_file_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("image");
    // The template is checked as `serve` would check it.
    let template = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/escalator.toml");
    let text = stdout(&escalator(&[
        "install",
        "--root",
        root.to_str().unwrap(),
        "--config",
        template,
    ]));
    assert!(
        text.contains("skip: create system user cascade (--root given)"),
        "{text}"
    );

    assert_eq!(mode(&root.join("usr/local/bin/cloud-escalator")), 0o755);
    assert_eq!(mode(&root.join("etc/cascade/escalator.toml")), 0o640);
    assert_eq!(mode(&root.join("var/lib/cascade/escalator")), 0o750);
    let unit = fs::read_to_string(root.join("etc/systemd/system/cloud-escalator.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/cloud-escalator serve --config /etc/cascade/escalator.toml",
        "StateDirectory=cascade/escalator",
        "ReadWritePaths=/var/lib/cascade/escalator",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=",
        "LimitNOFILE=65536",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line:?} missing from\n{unit}"
        );
    }
    // The template keeps the store in the state directory: nothing else is writable.
    assert_eq!(
        unit.lines()
            .filter(|l| l.starts_with("ReadWritePaths="))
            .count(),
        1,
        "{unit}"
    );
}

#[test]
fn install_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_cloud-escalator"))
        .parent()
        .unwrap();
    let unit = dir.path().join("cloud-escalator.service");
    fs::write(
        &unit,
        stdout(&escalator(&[
            "install",
            "--print-unit",
            "--bin-dir",
            bin_dir.to_str().unwrap(),
        ])),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.lines().any(|l| l.contains("cloud-escalator.service")),
        "{err}"
    );
}
