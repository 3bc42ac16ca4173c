//! The registry's MQTT task: subscribes to every device's status, telemetry and OTA reports,
//! folds them into the [tracker](super::tracker), and writes the changed rows every `flush_ms`.
//!
//! It owns its MQTT session (plain subscriptions: every replica sees every device) and hands
//! database writes to a blocking thread, one flush at a time, so a slow database delays rows but
//! never the broker connection. If a flush fails the rows are kept and written with the next.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_proto::topic::{Channel, DeviceTopic};
use cascade_proto::{Limits, decode};
use edge_agent::connection::Backoff;
use edge_agent::mqtt::{Session, SessionEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::db::Db;
use super::tracker::{Applied, Tracker};
use super::{now_ms, store};

/// What the ingester did, for tests and metrics.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Device messages applied.
    pub applied: AtomicU64,
    /// Messages that did not decode.
    pub malformed: AtomicU64,
    /// Messages from devices over `max_devices`.
    pub refused: AtomicU64,
    /// Flushes written.
    pub flushes: AtomicU64,
    /// Flushes that failed (rows kept for the next).
    pub flush_errors: AtomicU64,
}

/// Runs until `shutdown`, then writes what is left.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    db: Arc<Mutex<Db>>,
    fleet: String,
    replica: String,
    max_devices: usize,
    flush_every: Duration,
    mut session: Session,
    mut latencies: mpsc::Receiver<u32>,
    stats: Arc<IngestStats>,
    shutdown: CancellationToken,
) {
    let mut tracker = Tracker::new(max_devices);
    let loaded = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            store::load_reported(&mut db.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
        })
        .await
    };
    match loaded {
        Ok(Ok(rows)) => {
            tracing::info!(devices = rows.len(), "device registry loaded");
            tracker.load(rows);
        }
        Ok(Err(e)) => tracing::error!(error = %e, "device registry not loaded; starting empty"),
        Err(e) => tracing::error!(error = %e, "device registry load panicked"),
    }
    let limits = Limits::default();
    let mut flush = tokio::time::interval(flush_every);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::default();
    let mut pending_rows = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(latency) = latencies.recv() => tracker.answered(latency, now_ms()),
            _ = flush.tick() => {
                write(&db, &replica, &mut tracker, &mut pending_rows, &stats).await;
            }
            event = session.poll() => match event {
                SessionEvent::Connected { .. } => {
                    backoff.reset();
                    crate::ota::subscribe_device_channels(
                        &session,
                        &fleet,
                        &[Channel::Status, Channel::Telemetry, Channel::OtaStatus],
                    );
                }
                SessionEvent::Message(m) => {
                    let Ok(topic_text) = std::str::from_utf8(&m.topic) else { continue };
                    let Ok(topic) = DeviceTopic::parse(topic_text) else { continue };
                    match decode(&m.payload, &limits) {
                        Ok(message) => match tracker.apply(topic.device, &message, now_ms()) {
                            Applied::Changed => { stats.applied.fetch_add(1, Ordering::Relaxed); }
                            Applied::Refused => {
                                stats.refused.fetch_add(1, Ordering::Relaxed);
                                metrics::counter!("cascade_fleet_refused_total").increment(1);
                                tracing::warn!(device = topic.device, max_devices, "device registry full; message dropped");
                            }
                            Applied::Ignored => {}
                        },
                        // An empty retained message clears a topic; not an error.
                        Err(_) if m.payload.is_empty() => {}
                        Err(e) => {
                            stats.malformed.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("cascade_fleet_malformed_total").increment(1);
                            tracing::warn!(topic = topic_text, error = %e, "malformed device report dropped");
                        }
                    }
                }
                SessionEvent::Lost(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, "device registry lost the broker");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                SessionEvent::Disconnected | SessionEvent::Other => {}
            }
        }
    }
    while let Ok(latency) = latencies.try_recv() {
        tracker.answered(latency, now_ms());
    }
    write(&db, &replica, &mut tracker, &mut pending_rows, &stats).await;
    session.disconnect(Duration::from_millis(500)).await;
}

/// Writes changed rows and the minutes; on failure keeps the rows for the next attempt.
async fn write(
    db: &Arc<Mutex<Db>>,
    replica: &str,
    tracker: &mut Tracker,
    pending: &mut Vec<(String, super::tracker::Reported)>,
    stats: &IngestStats,
) {
    let mut rows = std::mem::take(pending);
    // Newer rows replace older pending ones of the same device.
    let fresh = tracker.take_dirty();
    rows.retain(|(id, _)| !fresh.iter().any(|(f, _)| f == id));
    rows.extend(fresh);
    let minutes = tracker.take_minutes(now_ms());
    if rows.is_empty() && minutes.is_empty() {
        return;
    }
    let (db, replica) = (db.clone(), replica.to_owned());
    let result = tokio::task::spawn_blocking(move || {
        let mut db = db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = store::upsert_reported(&mut db, &rows)
            .and_then(|()| store::write_minutes(&mut db, &replica, &minutes));
        (result, rows, minutes)
    })
    .await;
    match result {
        Ok((Ok(()), _, _)) => {
            stats.flushes.fetch_add(1, Ordering::Relaxed);
        }
        Ok((Err(e), rows, minutes)) => {
            stats.flush_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, rows = rows.len(), "device registry not written; will retry");
            *pending = rows;
            tracker.restore_minutes(minutes);
        }
        Err(e) => tracing::error!(error = %e, "device registry write panicked"),
    }
}
