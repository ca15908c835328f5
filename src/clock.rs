//! The monotonic clock in microseconds, for timings on the forwarding path.
//!
//! `Instant::now()` and `elapsed()` go through std's checked `Timespec` arithmetic and a `u128` `Duration`: some 110
//! instructions per reading, read at least twice per transaction. A reading here is the clock call and a multiply.
//! It is the clock `Instant` uses (`CLOCK_MONOTONIC`), so [`instant`] turns a reading back into an `Instant`.

use std::time::{Duration, Instant};

/// Microseconds on the monotonic clock (from an arbitrary start, the same for the whole process).
#[inline]
pub fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` only writes the `timespec` it is given, which lives for the call; CLOCK_MONOTONIC
    // exists on every system pgweir runs on (and the reading would stay 0 rather than be undefined if it failed).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The `Instant` of a [`now_us`] reading.
pub fn instant(us: u64) -> Instant {
    static ANCHOR: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let &(at, at_us) = ANCHOR.get_or_init(|| (Instant::now(), now_us()));
    if us >= at_us {
        at + Duration::from_micros(us - at_us)
    } else {
        at.checked_sub(Duration::from_micros(at_us - us))
            .unwrap_or(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_follow_instant() {
        let before = Instant::now();
        let us = now_us();
        let after = Instant::now();
        let at = instant(us);
        // The anchor pairs two readings taken a moment apart: the conversion is exact to within that moment.
        let slack = Duration::from_millis(5);
        assert!(
            at + slack >= before && at <= after + slack,
            "{at:?} not in {before:?}..{after:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        let later = now_us();
        assert!(later - us >= 20_000, "{} µs", later - us);
        assert!(instant(later) > at);
        // A reading from before the anchor is taken converts too.
        assert!(instant(us - 1_000_000) < at);
    }
}
