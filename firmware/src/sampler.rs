//! Timing and windowing, free of I/O: when the next sample is due, and the fixed window of
//! samples that becomes one frame.

/// Bytes per three-axis sample on the wire (three little-endian `i16`).
pub const SAMPLE_BYTES: usize = 6;

/// A fixed window of `N` three-axis samples, kept in wire order.
#[derive(Debug, Clone)]
pub struct Window<const N: usize> {
    samples: [[u8; SAMPLE_BYTES]; N],
    len: usize,
    start_us: u64,
}

impl<const N: usize> Default for Window<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Window<N> {
    /// An empty window.
    pub const fn new() -> Self {
        Window {
            samples: [[0; SAMPLE_BYTES]; N],
            len: 0,
            start_us: 0,
        }
    }

    /// Adds a sample taken at `t_us`; true when the window is now full.
    ///
    /// A full window must be taken out with [`Window::clear`] before the next push; pushing into
    /// a full one starts it over, so a caller that forgets loses a window, never memory safety.
    pub fn push(&mut self, t_us: u64, counts: [i16; 3]) -> bool {
        if self.len == N {
            self.clear();
        }
        if self.len == 0 {
            self.start_us = t_us;
        }
        let [x, y, z] = counts.map(i16::to_le_bytes);
        self.samples[self.len] = [x[0], x[1], y[0], y[1], z[0], z[1]];
        self.len += 1;
        self.len == N
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no samples are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Time of the first sample held.
    pub fn start_us(&self) -> u64 {
        self.start_us
    }

    /// The samples held, as frame data (x0 y0 z0 x1 ..., little-endian `i16`).
    pub fn bytes(&self) -> &[u8] {
        self.samples[..self.len].as_flattened()
    }

    /// Drops the samples held.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// What [`Schedule::poll`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Too early; the next sample is due in `wait_us`.
    NotYet {
        /// Microseconds to wait.
        wait_us: u64,
    },
    /// Take the sample for time `t_us` now. `missed` slots went by unsampled (the loop was late):
    /// the samples around the hole are not evenly spaced.
    Now {
        /// The nominal time of this sample.
        t_us: u64,
        /// Sample slots skipped before this one.
        missed: u32,
    },
}

/// Fixed-rate sample slots on a microsecond clock. Slots are nominal (`start + k * period`), so
/// a late loop iteration does not shift every later sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    period_us: u64,
    next_us: u64,
}

impl Schedule {
    /// Slots every `period_us` (at least 1), the first at `start_us`.
    pub fn new(start_us: u64, period_us: u32) -> Self {
        Schedule {
            period_us: u64::from(period_us.max(1)),
            next_us: start_us,
        }
    }

    /// Whether a slot is due at `now_us`. When several slots went by, the latest one is taken
    /// and the others are reported as missed.
    pub fn poll(&mut self, now_us: u64) -> Due {
        if now_us < self.next_us {
            return Due::NotYet {
                wait_us: self.next_us - now_us,
            };
        }
        let behind = (now_us - self.next_us) / self.period_us;
        let t_us = self.next_us + behind * self.period_us;
        self.next_us = t_us + self.period_us;
        Due::Now {
            t_us,
            missed: u32::try_from(behind).unwrap_or(u32::MAX),
        }
    }
}

/// Extends a wrapping 32-bit microsecond counter (a hardware timer) to 64 bits.
///
/// Correct as long as it is read at least once per wrap (71 minutes at 1 MHz); the sampling
/// loop reads it every few milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrappingClock {
    last: u32,
    high: u64,
}

impl WrappingClock {
    /// The 64-bit time for a fresh reading of the 32-bit counter.
    pub fn extend(&mut self, raw: u32) -> u64 {
        if raw < self.last {
            self.high += 1 << 32;
        }
        self.last = raw;
        self.high | u64::from(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_fills_in_order_and_remembers_its_first_time() {
        let mut window = Window::<3>::new();
        assert!(!window.push(1000, [1, -1, 256]));
        assert!(!window.push(2000, [2, 0, 0]));
        assert!(window.push(3000, [3, 0, i16::MIN]));
        assert_eq!(window.start_us(), 1000);
        assert_eq!(
            window.bytes(),
            [
                1, 0, 0xFF, 0xFF, 0, 1, //
                2, 0, 0, 0, 0, 0, //
                3, 0, 0, 0, 0x00, 0x80,
            ]
        );
        // A push into a full window starts the next one.
        assert!(!window.push(4000, [4, 4, 4]));
        assert_eq!((window.len(), window.start_us()), (1, 4000));
    }

    #[test]
    fn slots_keep_their_nominal_times_when_the_loop_is_late() {
        let mut schedule = Schedule::new(0, 20_000);
        assert_eq!(schedule.poll(0), Due::Now { t_us: 0, missed: 0 });
        assert_eq!(schedule.poll(5_000), Due::NotYet { wait_us: 15_000 });
        // 3 ms late: still the 20 ms slot, and the next is at 40 ms, not 43 ms.
        assert_eq!(
            schedule.poll(23_000),
            Due::Now {
                t_us: 20_000,
                missed: 0
            }
        );
        assert_eq!(schedule.poll(39_999), Due::NotYet { wait_us: 1 });
        // Asleep through the 40 and 60 ms slots.
        assert_eq!(
            schedule.poll(85_000),
            Due::Now {
                t_us: 80_000,
                missed: 2
            }
        );
        assert_eq!(schedule.poll(90_000), Due::NotYet { wait_us: 10_000 });
    }

    #[test]
    fn the_clock_carries_across_counter_wraps() {
        let mut clock = WrappingClock::default();
        assert_eq!(clock.extend(10), 10);
        assert_eq!(clock.extend(u32::MAX - 5), u64::from(u32::MAX) - 5);
        assert_eq!(clock.extend(4), (1 << 32) + 4);
        assert_eq!(clock.extend(4), (1 << 32) + 4);
        assert_eq!(clock.extend(3), (2 << 32) + 3);
    }
}
