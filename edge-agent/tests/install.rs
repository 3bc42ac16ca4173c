//! `edge-agent install`, applied under a temporary `--root` as a user would prepare an image.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
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
    let r = root.to_str().unwrap();

    let text = stdout(&agent(&["install", "--root", r]));
    assert!(
        text.contains("skip: create system user cascade (--root given)"),
        "{text}"
    );
    assert!(
        text.contains("skip: systemctl daemon-reload (--root given)"),
        "{text}"
    );

    let binary = root.join("usr/local/bin/edge-agent");
    assert_eq!(mode(&binary), 0o755);
    assert_eq!(
        fs::read(&binary).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_edge-agent")).unwrap()
    );
    let config = root.join("etc/cascade/agent.toml");
    assert_eq!(mode(&config), 0o640);
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        edge_agent::install::AGENT_TEMPLATE,
        "under --root the host name is not filled in: the image runs elsewhere"
    );
    assert_eq!(mode(&root.join("var/lib/cascade/agent")), 0o750);
    assert_eq!(mode(&root.join("etc/cascade")), 0o755);
    let unit = root.join("etc/systemd/system/edge-agent.service");
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(
        fs::read_to_string(&unit).unwrap(),
        stdout(&agent(&["install", "--print-unit"]))
    );

    // Again, with a configuration that reads a serial port: the existing configuration is kept,
    // and the unit still follows the existing one (no serial port).
    let edited = format!("{}# edited by hand\n", edge_agent::install::AGENT_TEMPLATE);
    fs::write(&config, &edited).unwrap();
    let serial = dir.path().join("serial.toml");
    fs::write(
        &serial,
        "device = \"cam-07\"\n[model]\npath = \"/opt/m.tflite\"\n\
         [sources.serial]\npath = \"/dev/ttyUSB0\"\nbaud = 115200\n",
    )
    .unwrap();
    let text = stdout(&agent(&[
        "install",
        "--root",
        r,
        "--config",
        serial.to_str().unwrap(),
    ]));
    assert!(text.contains("exists and is kept"), "{text}");
    assert!(text.contains("agent.toml from"), "{text}");
    assert!(text.contains(": exists, kept as it is"), "{text}");
    assert_eq!(fs::read_to_string(&config).unwrap(), edited);
    assert!(!fs::read_to_string(&unit).unwrap().contains("DeviceAllow"));

    // An installed configuration that does not parse stops the installation: the unit follows it.
    fs::write(&config, "device = \"cam-07\"\n").unwrap();
    let out = agent(&["install", "--root", r]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing field `model`") && err.contains("fix it"),
        "{err}"
    );

    // A fresh root takes the given configuration, and the unit allows its port.
    let fresh = dir.path().join("fresh");
    stdout(&agent(&[
        "install",
        "--root",
        fresh.to_str().unwrap(),
        "--config",
        serial.to_str().unwrap(),
    ]));
    assert_eq!(
        fs::read(fresh.join("etc/cascade/agent.toml")).unwrap(),
        fs::read(&serial).unwrap()
    );
    let unit = fs::read_to_string(fresh.join("etc/systemd/system/edge-agent.service")).unwrap();
    assert!(unit.contains("\nDeviceAllow=/dev/ttyUSB0 rw\n"), "{unit}");
    assert!(unit.contains("\nSupplementaryGroups=dialout\n"), "{unit}");
}

#[test]
fn install_dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("image");
    let text = stdout(&agent(&[
        "install",
        "--dry-run",
        "--root",
        root.to_str().unwrap(),
    ]));
    assert!(!root.exists());
    assert!(text.contains("dry run: nothing is changed"), "{text}");
    assert!(text.contains("write "), "{text}");
    assert!(text.contains("\nProtectSystem=strict\n"), "{text}");

    // A relative root is relative to the working directory; --start with the template is refused
    // (its model and broker are placeholders), saying why.
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["install", "--dry-run", "--start", "--root", "image"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains(&format!("mkdir {}/etc/cascade ", root.display())),
        "{text}"
    );
    assert!(
        text.contains(
            "skip: systemctl enable --now edge-agent.service (the configuration is the template: \
             edit /etc/cascade/agent.toml, then systemctl enable --now edge-agent.service)"
        ),
        "{text}"
    );
}

#[test]
fn install_refuses_a_configuration_the_agent_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    fs::write(&bad, "device = \"cam-07\"\nmodle = 1\n").unwrap();
    let root = dir.path().join("image");
    let out = agent(&[
        "install",
        "--root",
        root.to_str().unwrap(),
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("modle") && err.contains("--config"), "{err}");
    assert!(!root.exists());
}

/// `systemd-analyze verify` on the units, where the tool exists.
#[test]
fn install_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_edge-agent"))
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let serial = dir.path().join("serial.toml");
    fs::write(
        &serial,
        "device = \"cam-07\"\n[model]\npath = \"/opt/m.tflite\"\n\
         [sources.serial]\npath = \"/dev/ttyACM0\"\nbaud = 115200\n\
         [sources.directory]\npath = \"/srv/inbox\"\n",
    )
    .unwrap();
    for extra in [vec![], vec!["--config", serial.to_str().unwrap()]] {
        let mut args = vec!["install", "--print-unit", "--bin-dir", &bin_dir];
        args.extend(extra);
        let unit = dir.path().join("edge-agent.service");
        fs::write(&unit, stdout(&agent(&args))).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        // Unknown or malformed settings are only warnings: any line about the unit is a failure.
        assert!(
            !err.lines().any(|l| l.contains("edge-agent.service")),
            "{err}"
        );
    }
}
