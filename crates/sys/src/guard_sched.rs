//! Scheduling for the guard's notification thread. A trapped call waits for the guard's
//! answer, and until the guard has received it a signal can cut the call short (EINTR without
//! running it, for a handler without `SA_RESTART`). The notification thread is real-time so
//! it receives every notification the moment it arrives, whatever else runs.

use std::io;

/// The calling thread's id (`gettid`).
pub fn current_tid() -> i32 {
    // SAFETY: gettid takes nothing and cannot fail.
    unsafe { libc::gettid() }
}

/// Makes the calling thread real-time (see [`set_realtime`]).
pub fn make_thread_realtime() -> io::Result<()> {
    set_realtime(current_tid(), true)
}

/// Makes thread `tid` real-time (`SCHED_FIFO`, the lowest real-time priority: it preempts
/// ordinary threads as soon as it wakes) or ordinary again. Needs CAP_SYS_NICE (root). The
/// thread must block between bursts of work (the kernel's real-time throttling caps a runaway
/// at 95 % of a CPU anyway).
pub fn set_realtime(tid: i32, on: bool) -> io::Result<()> {
    let (policy, prio) = if on {
        (libc::SCHED_FIFO, 1)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let p = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: p is a valid sched_param; tid is a thread id (the kernel checks it).
    let r = unsafe { libc::sched_setscheduler(tid, policy, &p) };
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
    fn a_thread_is_made_realtime_and_back() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(current_tid()).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        // SAFETY: sched_getscheduler takes an integer.
        let policy = || unsafe { libc::sched_getscheduler(tid) };
        // SAFETY: geteuid takes nothing and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let r = set_realtime(tid, true);
        if root {
            r.unwrap();
            assert_eq!(policy(), libc::SCHED_FIFO);
            set_realtime(tid, false).unwrap();
            assert_eq!(policy(), libc::SCHED_OTHER);
        } else {
            assert!(r.is_err());
        }
        done_tx.send(()).unwrap();
        h.join().unwrap();
    }
}
