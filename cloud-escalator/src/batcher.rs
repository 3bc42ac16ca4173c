//! The dynamic batcher: groups escalations per model into batches. Pure: time is passed in.
//!
//! A model's queue is released as a batch when it holds `max_batch` items, or when its oldest item
//! has waited `max_delay`. The batcher holds at most `capacity` items across all models; beyond
//! that, [`Batcher::push`] hands the item back (the caller rejects it as overloaded: backpressure).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest an item waits for others.
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

    /// Batches due at `now`: full ones first, then those whose oldest item has waited long enough.
    pub fn ready(&mut self, now: Instant) -> Vec<Batch<T>> {
        let mut out = Vec::new();
        let max = self.limits.max_batch;
        let delay = self.limits.max_delay;
        for (model, queue) in &mut self.queues {
            loop {
                let due = queue.len() >= max
                    || queue
                        .front()
                        .is_some_and(|(_, t)| now.duration_since(*t) >= delay);
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

    /// When the next batch falls due by waiting, if anything is queued.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queues
            .values()
            .filter_map(|q| q.front().map(|(_, t)| *t + self.limits.max_delay))
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
        let batches = b.ready(t0);
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
        assert!(b.ready(t0 + Duration::from_micros(499)).is_empty());
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_micros(500)));
        let batches = b.ready(t0 + Duration::from_micros(500));
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].items.len(), 2);
        assert!(b.is_empty() && b.next_deadline().is_none());
    }

    #[test]
    fn models_have_their_own_queues() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(2, 1_000_000, 100));
        b.push("cloud", 1, t0).unwrap();
        b.push("tail", 2, t0).unwrap();
        b.push("cloud", 3, t0).unwrap();
        let batches = b.ready(t0);
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
        b.ready(t0 + Duration::from_millis(1));
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
