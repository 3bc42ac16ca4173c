//! A private Mosquitto broker for one test.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian and most distributions put the broker; `PATH` is searched too.
const CANDIDATES: &[&str] = &["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"];

/// A Mosquitto process listening on 127.0.0.1 at a free port; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
    dir: tempfile::TempDir,
}

/// Why a broker could not be started.
#[derive(Debug)]
pub enum MosquittoError {
    /// No `mosquitto` binary was found.
    NotInstalled,
    /// The broker did not start listening.
    Start(io::Error),
}

impl std::fmt::Display for MosquittoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MosquittoError::NotInstalled => f.write_str(
                "mosquitto is not installed: `apt-get install mosquitto` (the .ci/run script does this)",
            ),
            MosquittoError::Start(e) => write!(f, "mosquitto did not start: {e}"),
        }
    }
}

impl std::error::Error for MosquittoError {}

fn find_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("mosquitto"));
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
}

/// A port that was free a moment ago. Mosquitto cannot report the port it bound to 0, so there is
/// a window in which another process could take it; [`Mosquitto::start`] retries if so.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

impl Mosquitto {
    /// Starts a broker with `set_tcp_nodelay true` (Mosquitto's default adds ~44 ms per round trip).
    pub fn start() -> Result<Self, MosquittoError> {
        Self::start_with("")
    }

    /// Starts a broker with extra configuration lines appended.
    pub fn start_with(extra_config: &str) -> Result<Self, MosquittoError> {
        let binary = find_binary().ok_or(MosquittoError::NotInstalled)?;
        let mut last_error = io::Error::other("no attempt made");
        for _ in 0..5 {
            match Self::try_start(&binary, extra_config) {
                Ok(broker) => return Ok(broker),
                Err(e) => last_error = e,
            }
        }
        Err(MosquittoError::Start(last_error))
    }

    fn try_start(binary: &Path, extra_config: &str) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let config = dir.path().join("mosquitto.conf");
        // No persistence: a restarted broker has lost every session, the harshest case.
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 set_tcp_nodelay true\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n\
                 {extra_config}\n"
            ),
        )?;
        let mut broker = Mosquitto {
            child: None,
            port,
            binary: binary.to_owned(),
            dir,
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> io::Result<()> {
        // The broker's own log goes to a file (see `log`): tests that fail handshakes on purpose
        // would otherwise flood the test output.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!("exited with {status}")));
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "not listening after 5 s",
        ))
    }

    /// Kills the broker (like a crash: no session survives, nothing is flushed).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with every session lost.
    pub fn restart(&mut self) -> Result<(), MosquittoError> {
        self.kill();
        // The port may linger in TIME_WAIT for a moment; retry briefly.
        let mut last = io::Error::other("no attempt");
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(MosquittoError::Start(last))
    }

    /// What the broker logged (errors and warnings), for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// `mqtt://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
