//! Scheduling for the guard's notification thread: a trapped call waits for its answer, and
//! until the guard has received it a signal can cut the call short, so the thread that
//! receives notifications must run the moment one arrives.

use std::io;

/// Makes the calling thread real-time (`SCHED_FIFO`, the lowest real-time priority): it
/// preempts ordinary threads as soon as it wakes. Needs CAP_SYS_NICE (root); callers treat
/// failure as harmless. The thread must block between bursts of work (the kernel's real-time
/// throttling caps a runaway at 95 % of a CPU anyway).
pub fn make_thread_realtime() -> io::Result<()> {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: p is a valid sched_param; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_can_be_made_realtime_as_root() {
        let h = std::thread::spawn(|| {
            let r = make_thread_realtime();
            // SAFETY: pid 0 is the calling thread; sched_getscheduler takes an integer.
            let policy = unsafe { libc::sched_getscheduler(0) };
            (r.is_ok(), policy)
        });
        let (ok, policy) = h.join().unwrap();
        // SAFETY: geteuid takes nothing and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(ok);
            assert_eq!(policy, libc::SCHED_FIFO);
        } else {
            assert_eq!(ok, policy == libc::SCHED_FIFO);
        }
    }
}
