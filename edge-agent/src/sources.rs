//! Input sources. Each is one task feeding the agent's bounded input channel; a bad input is
//! logged and counted, never fatal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cascade_infer::image::{is_image_path, load_image};
use cascade_infer::metadata::Metadata;
use cascade_infer::{ModelInfo, Tensor};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{DirectorySource, LocalMqttSource, SerialSource, broker_address};
use crate::connection::{Backoff, mqtt_options};
use crate::input::{InputItem, ResultEvent, parse_json, tensor_for};
use crate::sensor::{SensorEvent, SensorStream, Windower};
use crate::stats::{Stats, bump};

/// What every source needs to turn bytes into model inputs.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// The model's inputs.
    pub model: Arc<ModelInfo>,
    /// The model's sidecar (image preprocessing).
    pub metadata: Option<Arc<Metadata>>,
    /// Where items go.
    pub inputs: mpsc::Sender<InputItem>,
    /// Counters (errors).
    pub stats: Arc<Stats>,
}

/// Reads JSON inputs from standard input until EOF or shutdown.
pub async fn stdin(ctx: SourceContext, shutdown: CancellationToken) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut n = 0u64;
    loop {
        let line = tokio::select! {
            _ = shutdown.cancelled() => return,
            line = lines.next_line() => line,
        };
        match line {
            Ok(Some(line)) if line.trim().is_empty() => {}
            Ok(Some(line)) => {
                n += 1;
                match parse_json(line.as_bytes(), &ctx.model, || format!("stdin-{n}")) {
                    Ok(item) => {
                        if ctx.inputs.send(item).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        bump(&ctx.stats.errors);
                        tracing::warn!(line = n, error = %e, "stdin input ignored");
                    }
                }
            }
            Ok(None) => {
                tracing::info!(lines = n, "standard input closed");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read standard input");
                return;
            }
        }
    }
}

/// Reads one file as the model's single input.
fn read_file(path: &Path, ctx: &SourceContext) -> Result<Tensor, String> {
    if is_image_path(path) {
        let meta = ctx
            .metadata
            .as_ref()
            .ok_or("image inputs need the model's sidecar")?;
        let input = meta
            .inputs
            .first()
            .ok_or("the sidecar describes no input")?;
        load_image(path, input).map_err(|e| e.to_string())
    } else {
        Tensor::read_npy(path).map_err(|e| e.to_string())
    }
}

fn move_into(path: &Path, dir: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let target = dir.join(name);
    match std::fs::create_dir_all(dir).and_then(|()| std::fs::rename(path, &target)) {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot move the input file");
            None
        }
    }
}

fn is_input_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    path.is_file() && matches!(ext.as_deref(), Some("npy" | "png" | "jpg" | "jpeg"))
}

fn input_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_input_file(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Watches a directory for new `.npy`, `.png` and `.jpg` files.
///
/// A new file moves to `processing/` when taken, to `processed/` once its result is published
/// and its escalation (if any) is in the spool, or to `failed/` if it cannot be read. Files still
/// in `processing/` when the agent stops or crashes are processed again at the next start: an
/// input is never lost, and is processed twice only if the agent died while it was in flight.
pub async fn directory(config: DirectorySource, ctx: SourceContext, shutdown: CancellationToken) {
    let processing = config.path.join("processing");
    let processed = config.path.join("processed");
    let failed = config.path.join("failed");
    let mut interval = tokio::time::interval(Duration::from_millis(config.poll_ms.max(10)));
    // One waiter per input in flight; dropping the set (shutdown) leaves those in processing/.
    let mut in_flight: tokio::task::JoinSet<(PathBuf, bool)> = tokio::task::JoinSet::new();
    let mut taken = match input_files(&processing) {
        Ok(files) => {
            if !files.is_empty() {
                tracing::info!(
                    count = files.len(),
                    "resuming inputs interrupted by the last stop"
                );
            }
            files
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(dir = %processing.display(), error = %e, "cannot list interrupted inputs");
            Vec::new()
        }
    };
    loop {
        for path in std::mem::take(&mut taken) {
            let id = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let tensor = read_file(&path, &ctx).and_then(|t| {
                ctx.model
                    .check_inputs(std::slice::from_ref(&t))
                    .map(|()| t)
                    .map_err(|e| e.to_string())
            });
            match tensor {
                Ok(tensor) => {
                    let (settled, done) = tokio::sync::oneshot::channel();
                    let mut item = InputItem::new(id, vec![tensor]);
                    item.settled = Some(settled);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        sent = ctx.inputs.send(item) => if sent.is_err() { return },
                    }
                    in_flight.spawn(async move { (path, done.await.is_ok()) });
                }
                Err(e) => {
                    bump(&ctx.stats.errors);
                    tracing::warn!(file = %path.display(), error = %e, "input file rejected; moved to failed/");
                    move_into(&path, &failed);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Ok((path, true)) = joined {
                    move_into(&path, &processed);
                }
            }
            _ = interval.tick() => match input_files(&config.path) {
                Ok(files) => {
                    taken = files
                        .iter()
                        .filter_map(|f| move_into(f, &processing))
                        .collect();
                }
                Err(e) => {
                    tracing::warn!(dir = %config.path.display(), error = %e, "input directory unreadable");
                }
            },
        }
    }
}

/// Takes JSON inputs from a topic on a local broker and publishes their results (edge answers and
/// later cloud verdicts) on the result topic.
pub async fn local_mqtt(
    config: LocalMqttSource,
    client_id: String,
    ctx: SourceContext,
    shutdown: CancellationToken,
) {
    let (host, port, _) = match broker_address(&config.url) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "local MQTT source disabled");
            return;
        }
    };
    let options = mqtt_options(
        &client_id,
        &host,
        port,
        Duration::from_secs(30),
        None,
        1 << 20,
    );
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (reply_tx, mut reply_rx) = mpsc::channel::<ResultEvent>(256);
    let mut backoff = Backoff::default();
    let mut n = 0u64;
    let mut first_session = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.try_disconnect();
                return;
            }
            Some(result) = reply_rx.recv() => {
                if let Ok(json) = serde_json::to_vec(&result)
                    && client.try_publish(config.result_topic.clone(), QoS::AtLeastOnce, false, json).is_err()
                {
                    tracing::warn!("local result dropped: client queue full");
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    if first_session || !ack.session_present {
                        let _ = client.try_subscribe(config.topic.clone(), QoS::AtLeastOnce);
                    }
                    first_session = false;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    n += 1;
                    match parse_json(&p.payload, &ctx.model, || format!("mqtt-{n}")) {
                        Ok(mut item) => {
                            item.reply = Some(reply_tx.clone());
                            if ctx.inputs.send(item).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            bump(&ctx.stats.errors);
                            tracing::warn!(error = %e, "local MQTT input ignored");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, "local broker connection lost");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Opens the sensor link: a serial port at `baud`, or (without a baud rate) a named pipe.
fn open_serial(
    config: &SerialSource,
) -> std::io::Result<Box<dyn tokio::io::AsyncRead + Unpin + Send>> {
    match config.baud {
        Some(baud) => {
            let port = tokio_serial::SerialStream::open(&tokio_serial::new(
                config.path.to_string_lossy(),
                baud,
            ))?;
            Ok(Box::new(port))
        }
        None => {
            let file = std::fs::File::open(&config.path)?;
            Ok(Box::new(tokio::fs::File::from_std(file)))
        }
    }
}

/// Reads firmware sensor frames from a serial port and feeds every full window of samples to the
/// model. Garbage and corrupt frames are dropped and counted (the decoder resynchronises at the
/// next frame); a lost link is reopened with backoff.
pub async fn serial(config: SerialSource, ctx: SourceContext, shutdown: CancellationToken) {
    let [spec] = ctx.model.inputs.as_slice() else {
        tracing::error!(
            inputs = ctx.model.inputs.len(),
            "the serial source needs a model with one input; source disabled"
        );
        return;
    };
    let window: usize = spec
        .shape
        .iter()
        .map(|d| match d {
            cascade_infer::Dim::Fixed(n) => *n,
            cascade_infer::Dim::Symbolic(_) => 1,
        })
        .product();
    let mut windows = Windower::new(window, config.hop.unwrap_or(window));
    let mut backoff = Backoff::default();
    let mut n = 0u64;
    let mut buf = vec![0u8; 4096];
    let mut events = Vec::new();
    loop {
        match open_serial(&config) {
            Ok(mut link) => {
                tracing::info!(path = %config.path.display(), window, "sensor link open");
                backoff.reset();
                windows.reset();
                let mut stream = SensorStream::new();
                loop {
                    let read = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        read = tokio::io::AsyncReadExt::read(&mut link, &mut buf) => read,
                    };
                    let len = match read {
                        Ok(0) => {
                            tracing::warn!(path = %config.path.display(), "sensor link closed; reopening");
                            break;
                        }
                        Ok(len) => len,
                        Err(e) => {
                            tracing::warn!(path = %config.path.display(), error = %e, "sensor link failed; reopening");
                            break;
                        }
                    };
                    stream.push(&buf[..len], &mut events);
                    for event in events.drain(..) {
                        match event {
                            SensorEvent::Samples { seq, values, .. } => {
                                if windows.push(seq, &values) {
                                    bump(&ctx.stats.bad_frames);
                                    tracing::warn!(seq, "sensor frames lost; window restarted");
                                }
                            }
                            SensorEvent::Dropped { reason } => {
                                bump(&ctx.stats.bad_frames);
                                tracing::warn!(%reason, "corrupt sensor frame dropped");
                            }
                            SensorEvent::Fault { seq, code, .. } => {
                                windows.interrupt(seq);
                                tracing::warn!(seq, code, "the firmware reports a sensor fault");
                            }
                            SensorEvent::Hello {
                                firmware,
                                sensor,
                                rate_hz,
                                channels,
                                ..
                            } => {
                                windows.reset();
                                tracing::info!(%firmware, %sensor, rate_hz, channels, "sensor announced");
                            }
                        }
                        while let Some(values) = windows.next_window() {
                            n += 1;
                            let values: Vec<f64> = values.into_iter().map(f64::from).collect();
                            match tensor_for(spec, &values) {
                                Ok(t) => {
                                    let item = InputItem::new(format!("serial-{n}"), vec![t]);
                                    tokio::select! {
                                        _ = shutdown.cancelled() => return,
                                        sent = ctx.inputs.send(item) => if sent.is_err() { return },
                                    }
                                }
                                Err(e) => {
                                    bump(&ctx.stats.errors);
                                    tracing::warn!(error = %e, "sensor window not usable as input");
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(path = %config.path.display(), error = %e, "cannot open the sensor link");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
