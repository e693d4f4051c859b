//! CLOCK_MONOTONIC stamps, in nanoseconds, cheap enough for hot paths (vDSO, no syscall).

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds on CLOCK_MONOTONIC. Comparable across processes on one machine, which is what
/// restart-latency measurement needs (the dying child stamps, the restarted child compares).
pub fn monotonic_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    // tv_sec and tv_nsec are never negative for CLOCK_MONOTONIC.
    (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
}
