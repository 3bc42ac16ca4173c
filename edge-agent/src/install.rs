//! `edge-agent install` and `cloud-escalator install`: put a Cascade service on a Linux host as a
//! hardened systemd service.
//!
//! An [`InstallSpec`] says what to install (binary, configuration, state directory, unit); a
//! [`Plan`] is the list of [`Step`]s that does it, computed from the spec without touching the
//! system, so `--dry-run` ([`Plan::describe`]) shows exactly what [`Plan::apply`] then does. The
//! unit file is [`unit_file`], also pure, so packages can ship the same text
//! (`edge-agent/dist/edge-agent.service` is checked against it).
//!
//! With a root directory (`--root DIR`, like `DESTDIR`), every path is written under it and the
//! steps that need root or a running systemd (creating the user, setting owners, `systemctl`) are
//! skipped and reported as skipped: that is how images are prepared and how the tests run.
//!
//! [`run`] is the whole command, shared by both binaries; a [`Service`] holds what differs
//! between them ([`AGENT`] is the edge agent's).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use cascade_proto::topic::{Segment, validate_segment};

use crate::config::AgentConfig;

/// An installation step that failed, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Installing into the running system needs root.
    #[error(
        "installing into the system needs root: run it with sudo, or give --root DIR to install \
         under a directory instead (no user, owners or systemctl then)"
    )]
    NotRoot,
    /// A file-system operation failed.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        /// What was being done ("create directory", "write", ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// A path that should be a directory is something else.
    #[error("{} exists and is not a directory: move it away and install again", .0.display())]
    NotADirectory(PathBuf),
    /// An external command (useradd, getent, systemctl) could not be started.
    #[error("cannot run {command}: {error} (is it installed and on PATH?)")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        error: io::Error,
    },
    /// An external command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said on standard error.
        stderr: String,
    },
    /// The service user or group is still unknown after creating it.
    #[error(
        "{kind} {name} does not exist (getent {kind} {name} finds nothing): create it, or check \
         /etc/nsswitch.conf"
    )]
    UnknownAccount {
        /// `passwd` or `group`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The configuration given with `--config` is not one the daemon would accept.
    #[error(
        "{}: {error}\nfix it, or give another with --config, and install again",
        path.display()
    )]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: String,
    },
    /// The installed configuration does not parse, so the unit cannot follow it.
    #[error(
        "{}: {error}\nthe unit's writable paths and devices come from it: fix it and install again",
        path.display()
    )]
    InstalledConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: String,
    },
    /// Writing the command's own output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |error| InstallError::Io {
        action,
        path: path.to_owned(),
        error,
    }
}

/// What to install: one service, its files and its unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallSpec {
    /// Service name: the binary's name and the unit's (`<service>.service`).
    pub service: String,
    /// The unit's `Description=`.
    pub description: String,
    /// The binary to copy (normally the running one).
    pub binary_source: PathBuf,
    /// Where the binary goes, e.g. `/usr/local/bin`.
    pub bin_dir: PathBuf,
    /// The configuration directory, `/etc/cascade`.
    pub config_dir: PathBuf,
    /// The configuration file's name in `config_dir`, e.g. `agent.toml`.
    pub config_name: String,
    /// The service's state directory, e.g. `/var/lib/cascade/agent`.
    pub state_dir: PathBuf,
    /// The system user the service runs as.
    pub user: String,
    /// Its group (also the configuration file's group, so the service can read it).
    pub group: String,
    /// Where the unit goes, `/etc/systemd/system`.
    pub unit_dir: PathBuf,
    /// Arguments after the binary in `ExecStart=`.
    pub exec_args: Vec<String>,
    /// Directories the service writes to besides its state directory (`ReadWritePaths=`).
    pub read_write_paths: Vec<PathBuf>,
    /// Device nodes the service opens (serial ports): `/dev` stays visible, restricted to these.
    pub devices: Vec<PathBuf>,
    /// The group owning serial ports (`dialout` on Debian, Ubuntu and Fedora), added to the
    /// service when it has devices.
    pub serial_group: String,
    /// `LimitNOFILE=`, for services holding many connections.
    pub limit_nofile: Option<u32>,
    /// The configuration to write when none exists; `None` leaves the configuration alone.
    pub config: Option<ConfigFile>,
}

/// A configuration file to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// The file's text.
    pub contents: String,
    /// Where it comes from, for the output ("the default template", a path).
    pub origin: String,
}

impl InstallSpec {
    /// The spec of a Cascade service with the standard layout: `/usr/local/bin`, `/etc/cascade`,
    /// `/var/lib/cascade/<state_name>`, user and group `cascade`, `/etc/systemd/system`, started
    /// as `<service> <run_args...> --config /etc/cascade/<config_name>`.
    pub fn standard(service: &Service, binary_source: PathBuf) -> Self {
        let config_dir = PathBuf::from("/etc/cascade");
        let config_path = config_dir.join(service.config_name);
        let mut exec_args: Vec<String> = service.run_args.iter().map(|a| a.to_string()).collect();
        exec_args.push("--config".into());
        exec_args.push(config_path.display().to_string());
        InstallSpec {
            service: service.name.into(),
            description: service.description.into(),
            binary_source,
            bin_dir: PathBuf::from("/usr/local/bin"),
            config_dir,
            config_name: service.config_name.into(),
            state_dir: Path::new("/var/lib/cascade").join(service.state_name),
            user: "cascade".into(),
            group: "cascade".into(),
            unit_dir: PathBuf::from("/etc/systemd/system"),
            exec_args,
            read_write_paths: Vec::new(),
            devices: Vec::new(),
            serial_group: "dialout".into(),
            limit_nofile: service.limit_nofile,
            config: None,
        }
    }

    /// The configuration file's path on the system.
    pub fn config_path(&self) -> PathBuf {
        self.config_dir.join(&self.config_name)
    }

    /// The installed binary's path on the system.
    pub fn binary_path(&self) -> PathBuf {
        self.bin_dir.join(&self.service)
    }

    /// The unit's file name, `<service>.service`.
    pub fn unit_name(&self) -> String {
        format!("{}.service", self.service)
    }

    /// Adds what a configuration needs from the unit: its state directory, the directories it
    /// writes to, its serial devices. Paths under the state directory need nothing more.
    pub fn apply_needs(&mut self, needs: ConfigNeeds) {
        if let Some(dir) = needs.state_dir {
            self.state_dir = absolute(dir);
        }
        for path in needs.read_write_paths {
            let path = absolute(path);
            if !path.starts_with(&self.state_dir) && !self.read_write_paths.contains(&path) {
                self.read_write_paths.push(path);
            }
        }
        for device in needs.devices {
            let device = absolute(device);
            if !self.devices.contains(&device) {
                self.devices.push(device);
            }
        }
    }
}

/// Relative paths in a configuration are relative to the daemon's working directory, which is `/`
/// under systemd.
fn absolute(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        Path::new("/").join(path)
    }
}

/// What a service's configuration asks of its unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigNeeds {
    /// The state directory, when the configuration sets one.
    pub state_dir: Option<PathBuf>,
    /// Directories written to (inputs moved, results appended, stores).
    pub read_write_paths: Vec<PathBuf>,
    /// Device nodes opened (serial ports).
    pub devices: Vec<PathBuf>,
}

/// What differs between the services [`run`] installs.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// Binary and unit name.
    pub name: &'static str,
    /// The unit's description.
    pub description: &'static str,
    /// Configuration file name in `/etc/cascade`.
    pub config_name: &'static str,
    /// State directory name in `/var/lib/cascade`.
    pub state_name: &'static str,
    /// The configuration installed when none is given or present.
    pub template: &'static str,
    /// Arguments that start the daemon, before `--config FILE`.
    pub run_args: &'static [&'static str],
    /// A key whose empty value (`key = ""` on a line of its own) in the template is replaced by
    /// the host name, when that is a valid id.
    pub hostname_key: Option<&'static str>,
    /// `LimitNOFILE=` of the unit.
    pub limit_nofile: Option<u32>,
    /// Reads a configuration's text: what it needs from the unit. With `check`, also validates
    /// it as the daemon would (for `--config FILE`, before installing it).
    pub needs: fn(text: &str, check: bool) -> Result<ConfigNeeds, String>,
}

/// The edge agent's default configuration (`/etc/cascade/agent.toml`), also the .deb's.
pub const AGENT_TEMPLATE: &str = include_str!("../dist/agent.toml");

/// The edge agent.
pub const AGENT: Service = Service {
    name: "edge-agent",
    description: "Cascade edge agent",
    config_name: "agent.toml",
    state_name: "agent",
    template: AGENT_TEMPLATE,
    run_args: &["run"],
    hostname_key: Some("device"),
    limit_nofile: None,
    needs: agent_needs,
};

/// What an agent configuration needs: its state directory, the watched input directory and the
/// results file's directory (written), and the serial port (opened).
pub fn agent_needs(text: &str, check: bool) -> Result<ConfigNeeds, String> {
    // Parsed without validation: the template's empty device id must not stop the unit from being
    // written (the daemon reports it when started).
    let config: AgentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    if check {
        config.validate().map_err(|e| e.to_string())?;
    }
    let mut needs = ConfigNeeds {
        state_dir: Some(config.state_dir.clone()),
        ..ConfigNeeds::default()
    };
    if let Some(dir) = &config.sources.directory {
        needs.read_write_paths.push(dir.path.clone());
    }
    if let Some(parent) = config.output.jsonl.as_deref().and_then(Path::parent) {
        needs.read_write_paths.push(parent.to_owned());
    }
    if let Some(serial) = &config.sources.serial {
        // A named pipe (no baud rate) outside /dev is an ordinary file: readable as it is.
        if serial.baud.is_some() || serial.path.starts_with("/dev") {
            needs.devices.push(serial.path.clone());
        }
    }
    Ok(needs)
}

/// Replaces `key = ""` (a line of its own) with `key = "<value>"`: the template's device id.
pub fn fill_key(template: &str, key: &str, value: &str) -> String {
    let empty = format!("{key} = \"\"");
    let mut out = String::with_capacity(template.len() + value.len());
    let mut done = false;
    for line in template.split_inclusive('\n') {
        if !done && line.trim_end() == empty {
            out.push_str(&format!("{key} = \"{value}\""));
            out.push_str(&line[line.trim_end().len()..]);
            done = true;
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Quotes one word for `ExecStart=` and path lists: systemd splits on spaces, and expands `%`
/// specifiers and `$` variables.
fn systemd_word(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty()
        && !escaped
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        return escaped;
    }
    let mut quoted = String::from("\"");
    for c in escaped.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

fn path_word(path: &Path) -> String {
    systemd_word(&path.display().to_string())
}

/// The device class of a serial port (`/dev/ttyACM0` → `char-ttyACM`, as named in
/// `/proc/devices`), so a port that is unplugged at start or renumbered stays allowed.
fn device_class(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    (stem.starts_with("tty") && stem.len() > 3 && stem.len() < name.len())
        .then(|| format!("char-{stem}"))
}

/// The systemd unit for a spec.
pub fn unit_file(spec: &InstallSpec) -> String {
    let mut u = String::new();
    let mut line = |s: &str| {
        u.push_str(s);
        u.push('\n');
    };
    line(&format!(
        "# Written by `{} install`, which rewrites it: put local changes in a drop-in",
        spec.service
    ));
    line(&format!(
        "# (`systemctl edit {}`), not here. docs/install.md explains each setting.",
        spec.service
    ));
    line("[Unit]");
    line(&format!("Description={}", spec.description));
    line("Documentation=https://github.com/cascade-edge/cascade/blob/main/docs/install.md");
    line("# The daemon reconnects by itself, but starting once the network is up spares a burst");
    line("# of failed connection attempts at boot.");
    line("Wants=network-online.target");
    line("After=network-online.target");
    line("# Stop restarting after 5 failures in 5 minutes: something needs a person.");
    line("StartLimitIntervalSec=300");
    line("StartLimitBurst=5");
    line("");
    line("[Service]");
    line("# exec: the start fails if the binary cannot be executed (simple would report success).");
    line("Type=exec");
    line(&format!("User={}", spec.user));
    line(&format!("Group={}", spec.group));
    let mut exec = path_word(&spec.binary_path());
    for arg in &spec.exec_args {
        exec.push(' ');
        exec.push_str(&systemd_word(arg));
    }
    line(&format!("ExecStart={exec}"));
    line("Restart=on-failure");
    line("RestartSec=2");
    line("# Exit status 64 is an invalid configuration: restarting cannot fix that.");
    line("RestartPreventExitStatus=64");
    line("# The daemon stops cleanly on SIGTERM: it gives its tasks 10 s to finish (the agent");
    line("# keeps unanswered escalations in its spool, the escalator answers queued batches).");
    line("KillSignal=SIGTERM");
    line("TimeoutStopSec=30");
    if let Ok(relative) = spec.state_dir.strip_prefix("/var/lib") {
        line(&format!(
            "# {}: created by systemd, owned by User=.",
            spec.state_dir.display()
        ));
        line(&format!("StateDirectory={}", path_word(relative)));
        line("StateDirectoryMode=0750");
    }
    if let Ok(relative) = spec.config_dir.strip_prefix("/etc") {
        line(&format!(
            "# {}: owned by root; the service reads its configuration, never writes it.",
            spec.config_dir.display()
        ));
        line(&format!("ConfigurationDirectory={}", path_word(relative)));
    }
    line("# Files the service creates are not readable by other users.");
    line("UMask=0027");
    if let Some(n) = spec.limit_nofile {
        line("# One descriptor per connected device (embedded broker), beyond the default 1024.");
        line(&format!("LimitNOFILE={n}"));
    }
    line("");
    line("# Hardening (systemd.exec(5)); `systemd-analyze security` rates it.");
    line("NoNewPrivileges=yes");
    line("# The whole file system is read-only except ReadWritePaths=.");
    line("ProtectSystem=strict");
    line(&format!("ReadWritePaths={}", path_word(&spec.state_dir)));
    if !spec.read_write_paths.is_empty() {
        line(
            "# From the configuration (inputs, results, stores). `-`: a missing one does not stop",
        );
        line("# the start; the daemon reports it.");
        let words: Vec<String> = spec
            .read_write_paths
            .iter()
            .map(|p| format!("-{}", path_word(p)))
            .collect();
        line(&format!("ReadWritePaths={}", words.join(" ")));
    }
    line("ProtectHome=yes");
    line("PrivateTmp=yes");
    if spec.devices.is_empty() {
        line("PrivateDevices=yes");
    } else {
        line("# The configured serial ports: /dev stays visible, but only these devices (and the");
        line(
            "# standard pseudo-devices) may be opened. The class rule keeps a port usable when it",
        );
        line("# is plugged in after the start or comes back under another number.");
        line("PrivateDevices=no");
        line("DevicePolicy=closed");
        for device in &spec.devices {
            line(&format!("DeviceAllow={} rw", path_word(device)));
            if let Some(class) = device_class(device) {
                line(&format!("DeviceAllow={class} rw"));
            }
        }
        line("# Serial ports belong to this group (mode 0660).");
        line(&format!("SupplementaryGroups={}", spec.serial_group));
    }
    line("ProtectKernelTunables=yes");
    line("ProtectKernelModules=yes");
    line("ProtectKernelLogs=yes");
    line("ProtectControlGroups=yes");
    line("ProtectHostname=yes");
    line("ProtectClock=yes");
    line("PrivateMounts=yes");
    line("ProtectProc=invisible");
    line("# MQTT over TCP; AF_UNIX for the journal.");
    line("RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6");
    line("RestrictNamespaces=yes");
    line("RestrictRealtime=yes");
    line("RestrictSUIDSGID=yes");
    line("LockPersonality=yes");
    line("# No JIT: the inference engines run ahead-of-time compiled kernels.");
    line("MemoryDenyWriteExecute=yes");
    line("SystemCallArchitectures=native");
    line("SystemCallFilter=@system-service");
    line("SystemCallFilter=~@privileged @resources");
    line("SystemCallErrorNumber=EPERM");
    line("# No capabilities at all: the daemons listen on ports above 1024 and own their files.");
    line("CapabilityBoundingSet=");
    line("AmbientCapabilities=");
    line("RemoveIPC=yes");
    line("");
    line("[Install]");
    line("WantedBy=multi-user.target");
    u
}

/// A user and group owning a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// User name.
    pub user: String,
    /// Group name.
    pub group: String,
}

impl Owner {
    fn root() -> Self {
        Owner {
            user: "root".into(),
            group: "root".into(),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.user, self.group)
    }
}

/// One thing the installation does. Paths are where the step writes (under the root directory
/// when one is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the system user (and its group) unless it exists.
    CreateUser {
        /// User name.
        user: String,
        /// Group name.
        group: String,
    },
    /// Create a directory unless it exists (an existing one is left as it is).
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Its owner (set only when installing into the system).
        owner: Owner,
        /// Its mode.
        mode: u32,
        /// Whether the owner is set (not under a root directory).
        chown: bool,
    },
    /// Copy the binary into place (atomically: a running copy keeps running).
    CopyBinary {
        /// The binary.
        from: PathBuf,
        /// Where it goes.
        to: PathBuf,
    },
    /// Write the configuration unless one exists; an existing one is never overwritten.
    WriteConfig {
        /// The file.
        path: PathBuf,
        /// Its text.
        contents: String,
        /// Where the text comes from.
        origin: String,
        /// Its owner (root and the service's group, so the service can read it).
        owner: Owner,
        /// Whether the owner is set.
        chown: bool,
    },
    /// Write the unit file (replacing an older one).
    WriteUnit {
        /// The file.
        path: PathBuf,
        /// Its text.
        contents: String,
    },
    /// Run `systemctl` with these arguments.
    Systemctl {
        /// The arguments.
        args: Vec<String>,
    },
    /// A step that is not done, and why.
    Skip {
        /// What would have been done.
        what: String,
        /// Why it is not.
        why: String,
    },
}

/// The file mode of configuration files: the service's group reads them; they may hold secrets.
pub const CONFIG_MODE: u32 = 0o640;
/// The file mode of the unit.
pub const UNIT_MODE: u32 = 0o644;
/// The file mode of the binary.
pub const BINARY_MODE: u32 = 0o755;
/// The mode of directories the service writes to.
pub const STATE_DIR_MODE: u32 = 0o750;

const USERADD: &str =
    "useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin";

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::CreateUser { user, group } => write!(
                f,
                "create system user {user} (group {group}) unless it exists: {USERADD}"
            ),
            Step::CreateDir {
                path,
                owner,
                mode,
                chown,
            } => {
                write!(f, "mkdir {} (mode {mode:04o}, ", path.display())?;
                if *chown {
                    write!(f, "owner {owner}")?;
                } else {
                    write!(f, "owner {owner} not set under --root")?;
                }
                write!(f, ") unless it exists")
            }
            Step::CopyBinary { from, to } => write!(
                f,
                "copy {} to {} (mode {BINARY_MODE:04o})",
                from.display(),
                to.display()
            ),
            Step::WriteConfig {
                path,
                origin,
                owner,
                chown,
                ..
            } => {
                write!(
                    f,
                    "write {} from {origin} (mode {CONFIG_MODE:04o}, owner {owner}",
                    path.display()
                )?;
                if !chown {
                    write!(f, " not set under --root")?;
                }
                write!(
                    f,
                    ") unless one exists (a configuration is never overwritten)"
                )
            }
            Step::WriteUnit { path, .. } => {
                write!(f, "write {} (mode {UNIT_MODE:04o})", path.display())
            }
            Step::Systemctl { args } => write!(f, "systemctl {}", args.join(" ")),
            Step::Skip { what, why } => write!(f, "skip: {what} ({why})"),
        }
    }
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The user was created.
    UserCreated,
    /// The user was already there.
    UserExists,
    /// The directory was created.
    DirCreated,
    /// The directory was already there and was left as it is.
    DirExists,
    /// The binary was copied.
    Copied,
    /// The binary being installed is the installed one.
    AlreadyInPlace,
    /// The file was written.
    Written,
    /// The file existed with the same contents.
    Unchanged,
    /// The configuration existed and was kept.
    Kept,
    /// The configuration existed and was kept, but the service's group (named) cannot read it.
    KeptUnreadable(String),
    /// The command ran.
    Ran,
    /// The step was skipped.
    Skipped,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Outcome::KeptUnreadable(group) = self {
            return write!(
                f,
                "exists, kept as it is; but group {group} cannot read it, so the service cannot \
                 start: chgrp {group} the file and chmod g+r it"
            );
        }
        f.write_str(match self {
            Outcome::UserCreated => "created",
            Outcome::UserExists => "exists",
            Outcome::DirCreated => "created",
            Outcome::DirExists => "exists, left as it is",
            Outcome::Copied => "copied",
            Outcome::AlreadyInPlace => "already in place (this is the installed binary)",
            Outcome::Written => "written",
            Outcome::Unchanged => "unchanged",
            Outcome::Kept | Outcome::KeptUnreadable(_) => "exists, kept as it is",
            Outcome::Ran => "done",
            Outcome::Skipped => "skipped",
        })
    }
}

/// Whether `systemctl` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Systemctl {
    /// Run it.
    Run,
    /// Do not, for this reason (`--no-systemctl`, not installed, systemd not running).
    Skip(String),
}

/// Whether the service is enabled and started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// No (`--start` not given).
    No,
    /// Yes: `systemctl enable --now`.
    Yes,
    /// Asked for, but not done, for this reason (e.g. the configuration does not validate).
    Blocked(String),
}

/// Where and how a plan is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// Install under this directory instead of `/`: no user, owners or systemctl.
    pub root: Option<PathBuf>,
    /// Whether systemctl runs.
    pub systemctl: Systemctl,
    /// Whether the service is started.
    pub start: Start,
}

/// The steps of an installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The root directory, when installing under one.
    pub root: Option<PathBuf>,
}

impl Plan {
    /// The steps that install `spec`. Pure: nothing on the system is looked at.
    pub fn new(spec: &InstallSpec, options: &InstallOptions) -> Plan {
        let root = options.root.clone();
        let at = |path: &Path| match &root {
            Some(r) => r.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_owned(),
        };
        let chown = root.is_none();
        let service_owner = Owner {
            user: spec.user.clone(),
            group: spec.group.clone(),
        };
        let mut steps = Vec::new();
        if chown {
            steps.push(Step::CreateUser {
                user: spec.user.clone(),
                group: spec.group.clone(),
            });
        } else {
            steps.push(Step::Skip {
                what: format!("create system user {}", spec.user),
                why: "--root given".into(),
            });
        }
        let mut dir = |path: &Path, owner: &Owner, mode: u32| {
            let step = Step::CreateDir {
                path: at(path),
                owner: owner.clone(),
                mode,
                chown,
            };
            if !steps.contains(&step) {
                steps.push(step);
            }
        };
        dir(&spec.bin_dir, &Owner::root(), 0o755);
        dir(&spec.config_dir, &Owner::root(), 0o755);
        if let Some(parent) = spec.state_dir.parent() {
            dir(parent, &Owner::root(), 0o755);
        }
        dir(&spec.state_dir, &service_owner, STATE_DIR_MODE);
        for path in &spec.read_write_paths {
            dir(path, &service_owner, STATE_DIR_MODE);
        }
        dir(&spec.unit_dir, &Owner::root(), 0o755);
        steps.push(Step::CopyBinary {
            from: spec.binary_source.clone(),
            to: at(&spec.binary_path()),
        });
        if let Some(config) = &spec.config {
            steps.push(Step::WriteConfig {
                path: at(&spec.config_path()),
                contents: config.contents.clone(),
                origin: config.origin.clone(),
                owner: Owner {
                    user: "root".into(),
                    group: spec.group.clone(),
                },
                chown,
            });
        }
        steps.push(Step::WriteUnit {
            path: at(&spec.unit_dir.join(spec.unit_name())),
            contents: unit_file(spec),
        });
        let systemctl = if root.is_some() {
            Systemctl::Skip("--root given".into())
        } else {
            options.systemctl.clone()
        };
        let enable = vec!["enable".into(), "--now".into(), spec.unit_name()];
        match &systemctl {
            Systemctl::Run => steps.push(Step::Systemctl {
                args: vec!["daemon-reload".into()],
            }),
            Systemctl::Skip(why) => steps.push(Step::Skip {
                what: "systemctl daemon-reload".into(),
                why: why.clone(),
            }),
        }
        let skip_enable = |why: &str| Step::Skip {
            what: format!("systemctl {}", enable.join(" ")),
            why: why.into(),
        };
        steps.push(match (&options.start, &systemctl) {
            (Start::No, _) => skip_enable("--start not given"),
            (Start::Blocked(why), _) => skip_enable(why),
            (Start::Yes, Systemctl::Skip(why)) => skip_enable(why),
            (Start::Yes, Systemctl::Run) => Step::Systemctl {
                args: enable.clone(),
            },
        });
        Plan { steps, root }
    }

    /// The steps as numbered lines, for `--dry-run`.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        if let Some(root) = &self.root {
            text.push_str(&format!(
                "Under {} (--root): no user is created, no owner is set, systemctl is not run.\n",
                root.display()
            ));
        }
        for (i, step) in self.steps.iter().enumerate() {
            text.push_str(&format!("{:>3}. {step}\n", i + 1));
        }
        text
    }

    /// Does the steps in order, calling `report` after each one. Stops at the first failure (the
    /// steps before it are done; running the installation again finishes it).
    pub fn apply(
        &self,
        mut report: impl FnMut(&Step, &Outcome) -> io::Result<()>,
    ) -> Result<(), InstallError> {
        if self.root.is_none() && !effective_uid_is_root() {
            return Err(InstallError::NotRoot);
        }
        for step in &self.steps {
            let outcome = apply_step(step)?;
            report(step, &outcome)?;
        }
        Ok(())
    }
}

fn effective_uid_is_root() -> bool {
    // Uid: real effective saved filesystem
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn apply_step(step: &Step) -> Result<Outcome, InstallError> {
    match step {
        Step::CreateUser { user, group } => create_user(user, group),
        Step::CreateDir {
            path,
            owner,
            mode,
            chown,
        } => {
            match fs::metadata(path) {
                Ok(m) if m.is_dir() => return Ok(Outcome::DirExists),
                Ok(_) => return Err(InstallError::NotADirectory(path.clone())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("inspect", path)(e)),
            }
            fs::create_dir_all(path).map_err(io_error("create directory", path))?;
            set_mode(path, *mode)?;
            if *chown {
                set_owner(path, owner)?;
            }
            Ok(Outcome::DirCreated)
        }
        Step::CopyBinary { from, to } => {
            if let (Ok(a), Ok(b)) = (fs::canonicalize(from), fs::canonicalize(to))
                && a == b
            {
                return Ok(Outcome::AlreadyInPlace);
            }
            let mut source = fs::File::open(from).map_err(io_error("open", from))?;
            write_atomically(to, BINARY_MODE, |file| {
                io::copy(&mut source, file).map(|_| ())
            })?;
            Ok(Outcome::Copied)
        }
        Step::WriteConfig {
            path,
            contents,
            owner,
            chown,
            ..
        } => {
            // create_new: never replace a configuration, even one appearing since the plan.
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(CONFIG_MODE)
                .open(path);
            let mut file = match file {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if *chown && !group_can_read(path, &owner.group)? {
                        return Ok(Outcome::KeptUnreadable(owner.group.clone()));
                    }
                    return Ok(Outcome::Kept);
                }
                Err(e) => return Err(io_error("create", path)(e)),
            };
            file.write_all(contents.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_error("write", path))?;
            // The umask may have taken bits away; the group must read it.
            set_mode(path, CONFIG_MODE)?;
            if *chown {
                set_owner(path, owner)?;
            }
            Ok(Outcome::Written)
        }
        Step::WriteUnit { path, contents } => {
            if fs::read(path).is_ok_and(|old| old == contents.as_bytes()) {
                return Ok(Outcome::Unchanged);
            }
            write_atomically(path, UNIT_MODE, |file| file.write_all(contents.as_bytes()))?;
            Ok(Outcome::Written)
        }
        Step::Systemctl { args } => {
            run_command("systemctl", args)?;
            Ok(Outcome::Ran)
        }
        Step::Skip { .. } => Ok(Outcome::Skipped),
    }
}

/// Writes a file through a temporary one in the same directory, renamed over the target: readers
/// see the old or the new file, and a running binary is not disturbed ("text file busy").
fn write_atomically(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".cascade-install")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    fill(tmp.as_file_mut())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_error("write", tmp.path()))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
        .map_err(io_error("set the mode of", tmp.path()))?;
    tmp.persist(path)
        .map_err(|e| io_error("replace", path)(e.error))?;
    Ok(())
}

/// Whether members of `group` can read the file (the service runs with that group).
fn group_can_read(path: &Path, group: &str) -> Result<bool, InstallError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(io_error("inspect", path))?;
    let mode = meta.mode();
    Ok(mode & 0o004 != 0 || (mode & 0o040 != 0 && meta.gid() == account_id("group", group)?))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), InstallError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_error("set the mode of", path))
}

fn set_owner(path: &Path, owner: &Owner) -> Result<(), InstallError> {
    let uid = account_id("passwd", &owner.user)?;
    let gid = account_id("group", &owner.group)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_error("set the owner of", path))
}

/// A user's or group's numeric id, through NSS (`getent`), so LDAP and other sources count.
fn account_id(kind: &'static str, name: &str) -> Result<u32, InstallError> {
    if name == "root" {
        return Ok(0);
    }
    lookup(kind, name)?.ok_or_else(|| InstallError::UnknownAccount {
        kind,
        name: name.into(),
    })
}

fn lookup(kind: &'static str, name: &str) -> Result<Option<u32>, InstallError> {
    let command = format!("getent {kind} {name}");
    let output = Command::new("getent")
        .args([kind, name])
        .output()
        .map_err(|error| InstallError::Spawn {
            command: command.clone(),
            error,
        })?;
    // getent exits with 2 when the key is not found.
    if output.status.code() == Some(2) {
        return Ok(None);
    }
    if !output.status.success() {
        return Err(InstallError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().into(),
        });
    }
    // name:password:id:...
    Ok(String::from_utf8_lossy(&output.stdout)
        .split(':')
        .nth(2)
        .and_then(|id| id.trim().parse().ok()))
}

fn create_user(user: &str, group: &str) -> Result<Outcome, InstallError> {
    if lookup("passwd", user)?.is_some() {
        return Ok(Outcome::UserExists);
    }
    let mut args: Vec<String> = USERADD
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect();
    if lookup("group", group)?.is_some() {
        args.extend(["--gid".into(), group.into()]);
    } else if group == user {
        args.push("--user-group".into());
    } else {
        run_command("groupadd", &["--system".into(), group.into()])?;
        args.extend(["--gid".into(), group.into()]);
    }
    args.push(user.into());
    run_command("useradd", &args)?;
    Ok(Outcome::UserCreated)
}

fn run_command(program: &str, args: &[String]) -> Result<(), InstallError> {
    let command = format!("{program} {}", args.join(" "));
    let output =
        Command::new(program)
            .args(args)
            .output()
            .map_err(|error| InstallError::Spawn {
                command: command.clone(),
                error,
            })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(InstallError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().into(),
        })
    }
}

/// `install`'s command line, the same for both services.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Print the steps and the unit file without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Install under DIR instead of / (like DESTDIR), e.g. into an image being built. No user is
    /// created, no owner is set and systemctl is not run; the output says so.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Install FILE as the configuration (/etc/cascade/agent.toml or escalator.toml), after
    /// checking it as the daemon would. Without it, a commented template to edit is installed.
    /// Either way, an existing configuration is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also enable the service and start it now (systemctl enable --now).
    #[arg(long, conflicts_with = "no_systemctl")]
    pub start: bool,
    /// Do not run systemctl (daemon-reload, enable). It is also skipped when systemd is not
    /// running, e.g. in a container.
    #[arg(long)]
    pub no_systemctl: bool,
    /// Where the binary goes; the unit's ExecStart points there.
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    pub bin_dir: PathBuf,
    /// Print the unit file for --config FILE (or the template) on standard output and stop.
    /// Packages ship its output (the agent's .deb: with --bin-dir /usr/bin).
    #[arg(long, conflicts_with_all = ["dry_run", "root", "start", "no_systemctl"])]
    pub print_unit: bool,
}

/// The whole `install` command: works out the spec from the arguments and the configuration
/// that will be in force, then prints the unit (`--print-unit`), describes the plan
/// (`--dry-run`) or applies it, writing progress and next steps to `out`.
pub fn run(service: &Service, args: &InstallArgs, out: &mut dyn Write) -> Result<(), InstallError> {
    let binary = std::env::current_exe().map_err(io_error("locate", Path::new("this binary")))?;
    let mut spec = InstallSpec::standard(service, binary);
    spec.bin_dir = absolute(args.bin_dir.clone());
    let root = match &args.root {
        Some(dir) => Some(std::path::absolute(dir).map_err(io_error("locate", dir))?),
        None => None,
    };
    let given = match &args.config {
        Some(path) => {
            let text = fs::read_to_string(path).map_err(io_error("read", path))?;
            (service.needs)(&text, true).map_err(|error| InstallError::Config {
                path: path.clone(),
                error: error.trim_end().to_owned(),
            })?;
            Some(ConfigFile {
                contents: text,
                origin: path.display().to_string(),
            })
        }
        None => None,
    };
    let template = || {
        let mut contents = service.template.to_string();
        // Under --root the host is not the one the image will run on.
        if let (Some(key), None) = (service.hostname_key, &root)
            && let Some(host) = hostname()
        {
            contents = fill_key(&contents, key, &host);
        }
        ConfigFile {
            contents,
            origin: "the default template".into(),
        }
    };
    let config = given.unwrap_or_else(template);

    if args.print_unit {
        let needs =
            (service.needs)(&config.contents, false).map_err(|error| InstallError::Config {
                path: PathBuf::from(&config.origin),
                error: error.trim_end().to_owned(),
            })?;
        spec.apply_needs(needs);
        out.write_all(unit_file(&spec).as_bytes())?;
        return Ok(());
    }

    // The unit follows the configuration the service will read: the existing one if there is
    // one (it is kept), else the one being installed.
    let installed = match &root {
        Some(root) => root.join(
            spec.config_path()
                .strip_prefix("/")
                .unwrap_or(Path::new("")),
        ),
        None => spec.config_path(),
    };
    let (in_force, in_force_path, existing) = match fs::read_to_string(&installed) {
        Ok(text) => {
            if args.config.is_some() {
                writeln!(
                    out,
                    "note: {} exists and is kept; --config {} is not installed (edit the \
                     existing file, or move it away and install again)",
                    installed.display(),
                    config.origin
                )?;
            }
            (text, installed.clone(), true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (
            config.contents.clone(),
            PathBuf::from(&config.origin),
            false,
        ),
        Err(e) => return Err(io_error("read", &installed)(e)),
    };
    let needs = (service.needs)(&in_force, false).map_err(|error| {
        let path = in_force_path.clone();
        let error = error.trim_end().to_owned();
        if existing {
            InstallError::InstalledConfig { path, error }
        } else {
            InstallError::Config { path, error }
        }
    })?;
    spec.apply_needs(needs);
    spec.config = Some(config);

    let then = format!(
        "edit {}, then systemctl enable --now {}",
        spec.config_path().display(),
        spec.unit_name()
    );
    let start = if !args.start {
        Start::No
    } else if !existing && args.config.is_none() {
        // The template names a model and a broker that are placeholders.
        Start::Blocked(format!("the configuration is the template: {then}"))
    } else {
        match (service.needs)(&in_force, true) {
            Ok(_) => Start::Yes,
            Err(e) => Start::Blocked(format!("the configuration is not ready: {e}; {then}")),
        }
    };
    let systemctl = if args.no_systemctl {
        Systemctl::Skip("--no-systemctl given".into())
    } else if !on_path("systemctl") {
        Systemctl::Skip("systemctl not found".into())
    } else if !Path::new("/run/systemd/system").is_dir() {
        Systemctl::Skip("systemd is not running here".into())
    } else {
        Systemctl::Run
    };
    let options = InstallOptions {
        root: root.clone(),
        systemctl,
        start,
    };
    let plan = Plan::new(&spec, &options);

    if args.dry_run {
        writeln!(
            out,
            "{} install would do this (dry run: nothing is changed):\n",
            spec.service
        )?;
        out.write_all(plan.describe().as_bytes())?;
        writeln!(out, "\nThe unit, {}:\n", spec.unit_name())?;
        out.write_all(unit_file(&spec).as_bytes())?;
        return Ok(());
    }
    let mut started = false;
    let mut config_written = false;
    plan.apply(|step, outcome| {
        started |= matches!(step, Step::Systemctl { args } if args[0] == "enable");
        config_written |= matches!(step, Step::WriteConfig { .. }) && *outcome == Outcome::Written;
        writeln!(out, "{step}: {outcome}")
    })?;
    writeln!(out)?;
    let unit = spec.unit_name();
    if config_written && args.config.is_none() {
        writeln!(
            out,
            "The configuration is the template: edit {} before starting the service.",
            spec.config_path().display()
        )?;
    }
    if root.is_none() {
        if started {
            writeln!(out, "Started. Status: systemctl status {unit}")?;
        } else {
            writeln!(out, "Start it: systemctl enable --now {unit}")?;
        }
        writeln!(
            out,
            "After an upgrade: systemctl restart {unit}. Logs: journalctl -u {unit} -f"
        )?;
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The host name, when it is a valid device id.
fn hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    validate_segment(Segment::Device, name).ok()?;
    Some(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstallSpec {
        let mut spec = InstallSpec::standard(&AGENT, PathBuf::from("/build/edge-agent"));
        spec.config = Some(ConfigFile {
            contents: AGENT_TEMPLATE.into(),
            origin: "the default template".into(),
        });
        spec
    }

    fn system() -> InstallOptions {
        InstallOptions {
            root: None,
            systemctl: Systemctl::Run,
            start: Start::Yes,
        }
    }

    #[test]
    fn plan_for_the_system_creates_the_user_and_runs_systemctl() {
        let plan = Plan::new(&spec(), &system());
        let s = &plan.steps;
        assert_eq!(
            s[0],
            Step::CreateUser {
                user: "cascade".into(),
                group: "cascade".into()
            }
        );
        let dirs: Vec<(&Path, u32, String)> = s
            .iter()
            .filter_map(|step| match step {
                Step::CreateDir {
                    path, owner, mode, ..
                } => Some((path.as_path(), *mode, owner.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(
            dirs,
            [
                (Path::new("/usr/local/bin"), 0o755, "root:root".into()),
                (Path::new("/etc/cascade"), 0o755, "root:root".into()),
                (Path::new("/var/lib/cascade"), 0o755, "root:root".into()),
                (
                    Path::new("/var/lib/cascade/agent"),
                    0o750,
                    "cascade:cascade".into()
                ),
                (Path::new("/etc/systemd/system"), 0o755, "root:root".into()),
            ]
        );
        assert!(s.contains(&Step::CopyBinary {
            from: "/build/edge-agent".into(),
            to: "/usr/local/bin/edge-agent".into()
        }));
        let config = Path::new("/etc/cascade/agent.toml");
        assert!(s.iter().any(|step| matches!(step,
            Step::WriteConfig { path, owner, chown: true, .. }
                if path == config && owner.to_string() == "root:cascade")));
        let unit = Path::new("/etc/systemd/system/edge-agent.service");
        assert!(s.iter().any(|step| matches!(step,
            Step::WriteUnit { path, .. } if path == unit)));
        let n = s.len();
        assert_eq!(
            s[n - 2],
            Step::Systemctl {
                args: vec!["daemon-reload".into()]
            }
        );
        assert_eq!(
            s[n - 1],
            Step::Systemctl {
                args: vec!["enable".into(), "--now".into(), "edge-agent.service".into()]
            }
        );
    }

    #[test]
    fn enable_only_with_start() {
        let mut options = system();
        options.start = Start::No;
        let plan = Plan::new(&spec(), &options);
        assert!(
            matches!(plan.steps.last(), Some(Step::Skip { why, .. }) if why == "--start not given")
        );
        options.start = Start::Blocked("device is empty".into());
        let plan = Plan::new(&spec(), &options);
        assert!(
            matches!(plan.steps.last(), Some(Step::Skip { why, .. }) if why == "device is empty")
        );
        options.start = Start::Yes;
        options.systemctl = Systemctl::Skip("--no-systemctl given".into());
        let plan = Plan::new(&spec(), &options);
        assert!(
            !plan
                .steps
                .iter()
                .any(|s| matches!(s, Step::Systemctl { .. }))
        );
        assert!(
            plan.describe()
                .contains("skip: systemctl enable --now edge-agent.service (--no-systemctl given)")
        );
    }

    #[test]
    fn plan_under_a_root_skips_what_needs_root_and_says_so() {
        let options = InstallOptions {
            root: Some("/tmp/img".into()),
            ..system()
        };
        let plan = Plan::new(&spec(), &options);
        assert!(
            !plan
                .steps
                .iter()
                .any(|s| matches!(s, Step::CreateUser { .. } | Step::Systemctl { .. }))
        );
        for step in &plan.steps {
            match step {
                Step::CreateDir { path, chown, .. } => {
                    assert!(path.starts_with("/tmp/img/"), "{path:?}");
                    assert!(!chown);
                }
                Step::WriteConfig { path, chown, .. } => {
                    assert_eq!(path, Path::new("/tmp/img/etc/cascade/agent.toml"));
                    assert!(!chown);
                }
                Step::WriteUnit { path, contents } => {
                    assert!(path.starts_with("/tmp/img/etc/systemd/system"));
                    // The unit names the system's paths, not the root's.
                    assert!(contents.contains(
                        "ExecStart=/usr/local/bin/edge-agent run --config /etc/cascade/agent.toml\n"
                    ));
                }
                _ => {}
            }
        }
        let text = plan.describe();
        assert!(text.contains("skip: create system user cascade (--root given)"));
        assert!(text.contains("skip: systemctl daemon-reload (--root given)"));
        assert!(text.contains("owner cascade:cascade not set under --root"));
        assert!(text.contains("unless one exists (a configuration is never overwritten)"));
    }

    #[test]
    fn the_unit_is_hardened() {
        let unit = unit_file(&spec());
        for line in [
            "Type=exec",
            "User=cascade",
            "Group=cascade",
            "ExecStart=/usr/local/bin/edge-agent run --config /etc/cascade/agent.toml",
            "Restart=on-failure",
            "RestartSec=2",
            "TimeoutStopSec=30",
            "KillSignal=SIGTERM",
            "StateDirectory=cascade/agent",
            "ConfigurationDirectory=cascade",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallArchitectures=native",
            "CapabilityBoundingSet=",
            "ReadWritePaths=/var/lib/cascade/agent",
            "WantedBy=multi-user.target",
        ] {
            assert!(
                unit.lines().any(|l| l == line),
                "{line:?} missing from\n{unit}"
            );
        }
        assert!(!unit.contains("DeviceAllow"));
        assert!(!unit.contains("SupplementaryGroups"));
    }

    #[test]
    fn a_serial_source_opens_dev_for_that_port_only() {
        let text = fill_key(AGENT_TEMPLATE, "device", "cam-07").replace(
            "# [sources.serial]",
            "[sources.serial]\npath = \"/dev/ttyACM0\"\nbaud = 115200\n# was:",
        );
        let needs = agent_needs(&text, true).unwrap();
        assert_eq!(needs.devices, [PathBuf::from("/dev/ttyACM0")]);
        let mut spec = spec();
        spec.apply_needs(needs);
        let unit = unit_file(&spec);
        for line in [
            "PrivateDevices=no",
            "DevicePolicy=closed",
            "DeviceAllow=/dev/ttyACM0 rw",
            "DeviceAllow=char-ttyACM rw",
            "SupplementaryGroups=dialout",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line:?} missing");
        }
        assert!(!unit.contains("PrivateDevices=yes"));
    }

    #[test]
    fn written_paths_from_the_configuration_become_read_write_paths() {
        let text = r#"
            device = "d"
            state_dir = "/srv/cascade"
            [model]
            path = "/opt/m.onnx"
            [sources.directory]
            path = "/var/spool/cascade/inbox"
            [output]
            jsonl = "/srv/cascade/results.jsonl"
        "#;
        let mut spec = spec();
        spec.apply_needs(agent_needs(text, true).unwrap());
        assert_eq!(spec.state_dir, Path::new("/srv/cascade"));
        // The results file is under the state directory: nothing more to allow.
        assert_eq!(
            spec.read_write_paths,
            [PathBuf::from("/var/spool/cascade/inbox")]
        );
        let unit = unit_file(&spec);
        assert!(unit.contains("\nReadWritePaths=/srv/cascade\n"));
        assert!(unit.contains("\nReadWritePaths=-/var/spool/cascade/inbox\n"));
        // Not under /var/lib: the directory is made by the installation, not by systemd.
        assert!(!unit.contains("StateDirectory="));
        let plan = Plan::new(&spec, &system());
        let inbox = Path::new("/var/spool/cascade/inbox");
        assert!(plan.steps.iter().any(|s| matches!(s,
            Step::CreateDir { path, mode: 0o750, .. } if path == inbox)));
    }

    #[test]
    fn the_template_is_a_valid_configuration_once_it_has_a_device_id() {
        let err = agent_needs(AGENT_TEMPLATE, true).unwrap_err();
        assert!(err.contains("device"), "{err}");
        let filled = fill_key(AGENT_TEMPLATE, "device", "cam-07");
        assert!(filled.contains("\ndevice = \"cam-07\"\n"));
        let needs = agent_needs(&filled, true).unwrap();
        assert_eq!(
            needs.state_dir,
            Some(PathBuf::from("/var/lib/cascade/agent"))
        );
        assert!(needs.read_write_paths.is_empty() && needs.devices.is_empty());
    }

    #[test]
    fn exec_start_words_are_quoted_for_systemd() {
        assert_eq!(
            systemd_word("/etc/cascade/agent.toml"),
            "/etc/cascade/agent.toml"
        );
        assert_eq!(systemd_word("/srv/my dir/a.toml"), "\"/srv/my dir/a.toml\"");
        assert_eq!(systemd_word("50%"), "50%%");
        assert_eq!(systemd_word("$HOME"), "$$HOME");
        assert_eq!(systemd_word(""), "\"\"");
        assert_eq!(
            device_class(Path::new("/dev/ttyUSB1")).as_deref(),
            Some("char-ttyUSB")
        );
        assert_eq!(device_class(Path::new("/dev/serial/by-id/usb-x")), None);
        assert_eq!(device_class(Path::new("/dev/tty")), None);
    }

    #[test]
    fn the_deb_ships_the_generated_unit() {
        let mut spec = InstallSpec::standard(&AGENT, PathBuf::from("edge-agent"));
        spec.bin_dir = PathBuf::from("/usr/bin");
        spec.apply_needs(agent_needs(AGENT_TEMPLATE, false).unwrap());
        assert_eq!(
            include_str!("../dist/edge-agent.service"),
            unit_file(&spec),
            "edge-agent/dist/edge-agent.service is stale; regenerate it from the repository root: \
             cargo run -p edge-agent -- install --print-unit --bin-dir /usr/bin \
             > edge-agent/dist/edge-agent.service"
        );
    }

    #[test]
    fn apply_under_a_root_never_overwrites_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("built");
        fs::write(&binary, b"#!/bin/sh\n").unwrap();
        let root = dir.path().join("root");
        let mut spec = InstallSpec::standard(&AGENT, binary);
        spec.config = Some(ConfigFile {
            contents: "first".into(),
            origin: "test".into(),
        });
        let options = InstallOptions {
            root: Some(root.clone()),
            systemctl: Systemctl::Run,
            start: Start::Yes,
        };
        let mut outcomes = Vec::new();
        Plan::new(&spec, &options)
            .apply(|_, o| {
                outcomes.push(o.clone());
                Ok(())
            })
            .unwrap();
        assert!(outcomes.contains(&Outcome::Written));
        let config = root.join("etc/cascade/agent.toml");
        assert_eq!(fs::read_to_string(&config).unwrap(), "first");
        spec.config.as_mut().unwrap().contents = "second".into();
        let mut outcomes = Vec::new();
        Plan::new(&spec, &options)
            .apply(|step, o| {
                outcomes.push((step.clone(), o.clone()));
                Ok(())
            })
            .unwrap();
        assert_eq!(fs::read_to_string(&config).unwrap(), "first");
        assert!(
            outcomes
                .iter()
                .any(|(s, o)| matches!(s, Step::WriteConfig { .. }) && *o == Outcome::Kept)
        );
        assert!(
            outcomes
                .iter()
                .any(|(s, o)| matches!(s, Step::WriteUnit { .. }) && *o == Outcome::Unchanged)
        );
    }
}
