//! `edge-agent`: the device side of Cascade. A thin shell over the `edge_agent` library.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_agent::sensor::SensorStream;

/// The Cascade edge agent.
///
/// Runs a model on the device, answers the inputs it is sure about, and escalates the rest to
/// the cloud escalator over MQTT.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the firmware → agent sensor link.
    #[command(subcommand)]
    Frames(FramesCommand),
}

#[derive(Subcommand)]
enum FramesCommand {
    /// Decode a sensor frame stream and print one JSON object per frame.
    ///
    /// Reads as bytes arrive, so it works on a live serial port as well as on a capture:
    /// `edge-agent frames decode /dev/ttyACM0`. Corrupt frames are printed as "dropped" events;
    /// totals (decoded, dropped, lost by sequence gaps) go to standard error at the end.
    Decode {
        /// File or serial device to read; standard input when absent.
        input: Option<PathBuf>,
    },
}

fn decode_frames(input: Option<PathBuf>) -> anyhow::Result<()> {
    let mut reader: Box<dyn Read> = match &input {
        Some(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut out = std::io::stdout().lock();
    let mut stream = SensorStream::new();
    let mut events = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read failed"),
        };
        stream.push(&buf[..n], &mut events);
        for event in events.drain(..) {
            serde_json::to_writer(&mut out, &event)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    let stats = stream.stats();
    #[allow(clippy::print_stderr)] // the summary of a CLI run, after the data on stdout
    {
        eprintln!(
            "frames: {} decoded, {} dropped (corrupt), {} lost (sequence gaps)",
            stats.frames, stats.dropped, stats.lost
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Frames(FramesCommand::Decode { input }) => decode_frames(input),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)] // the one place a CLI reports its failure
            {
                eprintln!("error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}
