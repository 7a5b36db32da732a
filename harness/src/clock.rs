//! The fake clock shared by every VM of a [`crate::Harness`].
//!
//! Tests must not depend on wall-clock time, so `proxy_get_current_time_nanoseconds`
//! and WASI `clock_time_get` read this clock, which only moves when a test says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where every fake clock starts: 2025-01-01T00:00:00Z, in ns since the Unix epoch.
pub const START_NANOS: u64 = 1_735_689_600 * 1_000_000_000;

/// A cheap-to-clone handle on a Harness's fake clock.
///
/// Exists so tests control time: [`Clock::advance`] moves every VM of the
/// Harness forward at once (tick timers are driven by `Plugin::advance_and_tick`).
#[derive(Debug, Clone)]
pub struct Clock {
    nanos: Arc<AtomicU64>,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            nanos: Arc::new(AtomicU64::new(START_NANOS)),
        }
    }
}

impl Clock {
    /// The current fake time.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.now_nanos())
    }

    /// The current fake time in ns since the Unix epoch (what the guest sees).
    pub fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::SeqCst)
    }

    /// Nanoseconds since the clock started, for WASI's monotonic clock.
    pub fn monotonic_nanos(&self) -> u64 {
        self.now_nanos().saturating_sub(START_NANOS)
    }

    /// Moves time forward by `d` (saturating). Does not fire ticks by itself.
    pub fn advance(&self, d: Duration) {
        let delta = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(delta))
            });
    }

    /// Moves time forward to `nanos` if that is later than now; never goes back.
    pub(crate) fn advance_to_nanos(&self, nanos: u64) {
        self.nanos.fetch_max(nanos, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_fixed_and_advances_for_every_clone() {
        let clock = Clock::default();
        let other = clock.clone();
        assert_eq!(clock.now_nanos(), START_NANOS);
        other.advance(Duration::from_millis(1500));
        assert_eq!(clock.now_nanos(), START_NANOS + 1_500_000_000);
        assert_eq!(clock.monotonic_nanos(), 1_500_000_000);
        clock.advance_to_nanos(START_NANOS);
        assert_eq!(clock.monotonic_nanos(), 1_500_000_000, "never goes back");
        assert_eq!(
            clock.now(),
            UNIX_EPOCH + Duration::from_nanos(START_NANOS + 1_500_000_000)
        );
    }
}
