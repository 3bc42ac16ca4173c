//! The dynamic batcher: groups escalations per model into batches. Pure: time and whether each
//! model is busy are passed in.
//!
//! A model's queue is released as a batch when it holds `max_batch` items. A partial batch is
//! released only while the model is idle, once its oldest item has waited `max_delay` (zero: at
//! once). So a lone request never waits for company when the model could run it now, and while
//! the model is busy requests pile up into the next, fuller batch: batches grow with load (as
//! Triton's dynamic batcher does with its default zero queue delay). The batcher holds at most
//! `capacity` items across all models; beyond that, [`Batcher::push`] hands the item back (the
//! caller rejects it as overloaded: backpressure).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest batch.
    pub max_batch: usize,
    /// How long a partial batch waits for others while its model is idle.
    pub max_delay: Duration,
    /// Most items queued across all models.
    pub capacity: usize,
}

/// Items of one model, released together.
#[derive(Debug, PartialEq)]
pub struct Batch<T> {
    /// The model (route) they are for.
    pub model: String,
    /// The items, oldest first, with when each was queued.
    pub items: Vec<(T, Instant)>,
}

/// Per-model queues. See the module documentation.
#[derive(Debug)]
pub struct Batcher<T> {
    limits: BatchLimits,
    queues: HashMap<String, VecDeque<(T, Instant)>>,
    len: usize,
}

impl<T> Batcher<T> {
    /// An empty batcher.
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits: BatchLimits {
                max_batch: limits.max_batch.max(1),
                ..limits
            },
            queues: HashMap::new(),
            len: 0,
        }
    }

    /// Queues `item` for `model`; gives it back when the batcher is full.
    pub fn push(&mut self, model: &str, item: T, now: Instant) -> Result<(), T> {
        if self.len >= self.limits.capacity {
            return Err(item);
        }
        self.queues
            .entry(model.to_string())
            .or_default()
            .push_back((item, now));
        self.len += 1;
        Ok(())
    }

    /// Batches due at `now`: every full batch, and a partial one for each model that is `idle`
    /// and whose oldest item has waited `max_delay`.
    pub fn ready(&mut self, now: Instant, idle: impl Fn(&str) -> bool) -> Vec<Batch<T>> {
        let mut out = Vec::new();
        let max = self.limits.max_batch;
        let delay = self.limits.max_delay;
        for (model, queue) in &mut self.queues {
            // At most one partial batch per call: it makes the model busy.
            let mut idle = idle(model);
            loop {
                let full = queue.len() >= max;
                let due = full
                    || idle
                        && queue
                            .front()
                            .is_some_and(|(_, t)| now.duration_since(*t) >= delay);
                idle = false;
                if !due {
                    break;
                }
                let n = queue.len().min(max);
                let items: Vec<_> = queue.drain(..n).collect();
                self.len -= items.len();
                out.push(Batch {
                    model: model.clone(),
                    items,
                });
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        out
    }

    /// When the next partial batch of an `idle` model falls due by waiting. (A busy model's queue
    /// is released when the model becomes idle, which the caller observes.)
    pub fn next_deadline(&self, idle: impl Fn(&str) -> bool) -> Option<Instant> {
        self.queues
            .iter()
            .filter(|(model, _)| idle(model))
            .filter_map(|(_, q)| q.front().map(|(_, t)| *t + self.limits.max_delay))
            .min()
    }

    /// Everything still queued, for a drain at shutdown.
    pub fn drain(&mut self) -> Vec<Batch<T>> {
        self.len = 0;
        self.queues
            .drain()
            .map(|(model, q)| Batch {
                model,
                items: q.into_iter().collect(),
            })
            .collect()
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_batch: usize, delay_us: u64, capacity: usize) -> BatchLimits {
        BatchLimits {
            max_batch,
            max_delay: Duration::from_micros(delay_us),
            capacity,
        }
    }

    #[test]
    fn a_full_queue_is_released_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(3, 1_000_000, 100));
        for i in 0..7 {
            b.push("m", i, t0).unwrap();
        }
        let batches = b.ready(t0, |_| true);
        let sizes: Vec<usize> = batches.iter().map(|b| b.items.len()).collect();
        assert_eq!(sizes, [3, 3], "two full batches; the seventh waits");
        assert_eq!(b.len(), 1);
        assert_eq!(batches[0].items[0].0, 0, "oldest first");
    }

    #[test]
    fn a_partial_batch_waits_for_the_delay() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(8, 500, 100));
        b.push("m", 1, t0).unwrap();
        b.push("m", 2, t0 + Duration::from_micros(100)).unwrap();
        assert!(
            b.ready(t0 + Duration::from_micros(499), |_| true)
                .is_empty()
        );
        assert_eq!(
            b.next_deadline(|_| true),
            Some(t0 + Duration::from_micros(500))
        );
        assert_eq!(
            b.next_deadline(|_| false),
            None,
            "a busy model has no deadline"
        );
        let batches = b.ready(t0 + Duration::from_micros(500), |_| true);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].items.len(), 2);
        assert!(b.is_empty() && b.next_deadline(|_| true).is_none());
    }

    #[test]
    fn a_busy_model_gathers_a_fuller_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(8, 0, 100));
        b.push("m", 1, t0).unwrap();
        let first = b.ready(t0, |_| true);
        assert_eq!(
            first.len(),
            1,
            "idle and no delay: a lone item runs at once"
        );
        assert_eq!(first[0].items.len(), 1);
        for i in 2..5 {
            b.push("m", i, t0).unwrap();
        }
        assert!(
            b.ready(t0 + Duration::from_millis(5), |_| false).is_empty(),
            "nothing partial is released while the model is busy"
        );
        let next = b.ready(t0 + Duration::from_millis(5), |_| true);
        assert_eq!(next.len(), 1, "one partial batch once idle");
        assert_eq!(next[0].items.len(), 3);
        for i in 0..9 {
            b.push("m", i, t0).unwrap();
        }
        let busy = b.ready(t0, |_| false);
        assert_eq!(busy.len(), 1, "a full batch is released even while busy");
        assert_eq!(busy[0].items.len(), 8);
    }

    #[test]
    fn models_have_their_own_queues() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(2, 1_000_000, 100));
        b.push("cloud", 1, t0).unwrap();
        b.push("tail", 2, t0).unwrap();
        b.push("cloud", 3, t0).unwrap();
        let batches = b.ready(t0, |_| true);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].model, "cloud");
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_full_batcher_pushes_back() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(10, 1000, 2));
        b.push("m", 1, t0).unwrap();
        b.push("m", 2, t0).unwrap();
        assert_eq!(b.push("m", 3, t0), Err(3));
        b.ready(t0 + Duration::from_millis(1), |_| true);
        assert!(b.push("m", 3, t0).is_ok(), "room again once a batch left");
    }

    #[test]
    fn drain_returns_everything() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(10, 1_000_000, 10));
        b.push("a", 1, t0).unwrap();
        b.push("b", 2, t0).unwrap();
        let mut drained: Vec<i32> = b
            .drain()
            .into_iter()
            .flat_map(|b| b.items)
            .map(|(i, _)| i)
            .collect();
        drained.sort();
        assert_eq!(drained, [1, 2]);
        assert!(b.is_empty());
    }
}
