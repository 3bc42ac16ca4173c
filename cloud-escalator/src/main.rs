//! `cloud-escalator`: the cloud side of Cascade. A thin shell over the `cloud_escalator` library.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cascade_proto::envelope::DEFAULT_MAX_MESSAGE_BYTES;
use cascade_proto::examples::example;
use cascade_proto::{Limits, MessageKind};
use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};
use cloud_escalator::codec::{self, InputFormat};

/// The Cascade cloud escalator.
///
/// Edge agents answer most inputs themselves and escalate the ones they are unsure about over
/// MQTT; the escalator answers those with a larger model and manages the fleet.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read and write Cascade messages: postcard wire format ⇄ integration JSON.
    ///
    /// For connecting other MQTT systems to a fleet: decode a payload captured with
    /// `mosquitto_sub -N`, or encode a JSON message for `mosquitto_pub -s`.
    /// The formats are described in docs/protocol.md.
    #[command(subcommand)]
    Codec(CodecCommand),
}

#[derive(Subcommand)]
enum CodecCommand {
    /// Decode a message (postcard, hex or JSON) and print it as JSON.
    Decode {
        /// File to read; standard input when absent.
        file: Option<PathBuf>,
        /// Input encoding.
        #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
        format: InputFormat,
        /// Refuse messages larger than this many bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
        max_bytes: usize,
    },
    /// Encode a JSON message in the postcard wire format (raw bytes on standard output).
    Encode {
        /// JSON file to read; standard input when absent.
        file: Option<PathBuf>,
        /// Write hex text instead of raw bytes.
        #[arg(long)]
        hex: bool,
    },
    /// Print a valid example of a message kind as JSON (a template to edit).
    Example {
        /// Message kind.
        #[arg(value_parser = PossibleValuesParser::new(MessageKind::ALL.iter().map(|k| k.name())))]
        kind: String,
    },
    /// Explain a topic: which fleet, device and channel, and who publishes on it.
    Topic {
        /// A concrete topic, e.g. cascade/v1/acme/cam-01/escalate.
        topic: String,
    },
}

fn read_input(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match file {
        Some(path) => {
            bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        }
        None => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read standard input")?;
        }
    }
    Ok(bytes)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Codec(CodecCommand::Decode {
            file,
            format,
            max_bytes,
        }) => {
            let input = read_input(file.as_ref())?;
            let limits = Limits {
                max_message_bytes: max_bytes,
            };
            let message = codec::read_message(&input, format, &limits)?;
            writeln!(out, "{}", codec::to_pretty_json(&message))?;
        }
        Command::Codec(CodecCommand::Encode { file, hex }) => {
            let input = read_input(file.as_ref())?;
            let message = codec::read_message(&input, InputFormat::Json, &Limits::default())?;
            let wire = codec::to_wire(&message);
            if hex {
                writeln!(out, "{}", ::hex::encode(wire))?;
            } else {
                out.write_all(&wire)?;
            }
        }
        Command::Codec(CodecCommand::Example { kind }) => {
            // The value parser only admits known names.
            let kind = MessageKind::from_name(&kind).context("unknown message kind")?;
            writeln!(out, "{}", codec::to_pretty_json(&example(kind)))?;
        }
        Command::Codec(CodecCommand::Topic { topic }) => {
            writeln!(out, "{}", codec::explain_topic(&topic)?)?;
        }
    }
    out.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)] // the one place a CLI reports its failure
            {
                eprintln!("error: {err:#}");
            }
            // EX_DATAERR: the input was wrong, not the invocation.
            ExitCode::from(65)
        }
    }
}
