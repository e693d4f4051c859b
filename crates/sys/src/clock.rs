//! CLOCK_MONOTONIC stamps, in nanoseconds, cheap enough for hot paths (vDSO, no syscall).

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds on CLOCK_MONOTONIC. Comparable across processes on one machine, which is what
/// restart-latency measurement needs (the dying child stamps, the restarted child compares).
pub fn monotonic_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    // tv_sec and tv_nsec are never negative for CLOCK_MONOTONIC.
    (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
}

/// The poll(2) timeout from `now_ns` until `deadline_ns` (both CLOCK_MONOTONIC), or `None`
/// (wait forever) when the deadline is `u64::MAX`. A deadline in the past gives zero.
pub fn timeout_until(deadline_ns: u64, now_ns: u64) -> Option<rustix::time::Timespec> {
    (deadline_ns != u64::MAX).then(|| {
        let ns = deadline_ns.saturating_sub(now_ns);
        rustix::time::Timespec {
            tv_sec: (ns / 1_000_000_000) as i64,
            tv_nsec: (ns % 1_000_000_000) as i64,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_until_splits_and_saturates() {
        assert!(timeout_until(u64::MAX, 5).is_none());
        let t = timeout_until(3_500_000_000, 1_000_000_000).expect("finite");
        assert_eq!((t.tv_sec, t.tv_nsec), (2, 500_000_000));
        let past = timeout_until(1, 10).expect("finite");
        assert_eq!((past.tv_sec, past.tv_nsec), (0, 0));
    }
}
