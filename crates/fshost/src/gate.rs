//! The reader gate: as many FUSE reader threads in `read` as there are CPUs to run them, more
//! only when a request is slow.
//!
//! Levels 1–4 serve with one FUSE reader thread per module context, so that several requests
//! can run at once (other clients, lock waits, the deadlock tests). Left alone, the kernel
//! hands each new request to the reader that has waited longest in `read`, never to the one
//! that just replied: that thread was preempted on its way back from `writev` (the client it
//! woke runs first) and later runs once more only to block in `read`. One process switch per
//! request, on the path where the module boundary already costs two (BENCHMARKS.md, "Where
//! SNFS's level-1 time goes": L1/L5 1.61× with four readers, 1.45× with one, interleaved).
//!
//! The gate keeps as many threads in `read` as the host may use CPUs (one, when pinned as
//! `kintsugi bench fs` pins it) and parks the others when they finish a request. The thread
//! that just replied is then the next reader, and the next request is usually already queued
//! when it gets there. More readers than CPUs cannot run requests faster; they are there for
//! requests that block, and come back when one does: a request whose module round trip
//! outlasts [`SLOW`] ([`Gate::slow`], called from the ring's wait) promotes a parked thread if
//! nobody is reading, so a request stuck on a lock, a slow server or a hung module holds up the
//! others by [`SLOW`] at most.
//!
//! Decision: readers = CPUs, not one. With a single reader on an unpinned 2-CPU machine, two
//! requests met in the module only when one was already slow, so the deadlock tests' lock
//! cycles never formed in 90 s: fast requests from different clients no longer overlapped,
//! which is a loss of parallelism wherever a second CPU could have served them.
//!
//! `fuser` owns the read loop (`Session::run` reads, dispatches, reads again), so the gate
//! sits at the edges of the callbacks: [`Gate::enter`] at the start of each one, and the
//! returned guard parks on drop, after the reply has gone out. A callback that does not enter
//! (fuser's defaults for operations the host does not implement) leaves its thread counted as
//! reading while it runs; those answer at once, so the count is off only for that instant. A
//! parked thread also goes back
//! to `read` after [`PARK_MAX`] on its own: an unmount ends the session by failing `read` with
//! `ENODEV`, which a parked thread would never see, and `Session::run` joins every thread.
//!
//! Decision: a mutex and a condvar rather than a lock-free word. The gate is taken twice per
//! request, uncontended (tens of ns, against the 7 µs a request costs at level 5), and
//! a condvar gives timed waits and wake-one for free.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// A module round trip longer than this lets another reader in. Well above a request's
/// usual time (tens of µs, an SNFS request with its server round trip included), well below
/// what a person notices.
///
/// Not shorter: the ring's wait arms this as its futex timeout on every request, and a timer
/// that expires before the next scheduler tick (4 ms at this kernel's HZ=250) has to
/// reprogram the local APIC timer, a VM exit on this machine, on every arm and cancel. With
/// 1 ms, SNFS copy64k at level 1 went from 1.41× to 1.72× level 5 (from 1.52× to 1.94× with
/// the gate off): the timer cost more than the gate saved (BENCHMARKS.md).
pub const SLOW: Duration = Duration::from_millis(5);

/// The longest a thread stays parked before it goes back to `read` regardless.
pub const PARK_MAX: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct State {
    /// Threads in (or on their way to) `read`.
    reading: usize,
    /// Threads parked after a request.
    parked: usize,
    /// Promotions granted and not yet taken by a parked thread.
    promoted: usize,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Gate {
    /// The reader threads it gates.
    threads: usize,
    /// How many of them may be in `read` at once, promotions aside.
    readers: usize,
    /// Whether the gate does anything (more threads than readers).
    on: bool,
    state: Mutex<State>,
    cv: Condvar,
}

/// A thread serving a request: dropping it (after the reply) sends the thread back to `read`
/// or parks it.
#[must_use = "the guard must live until the request has been answered"]
#[derive(Debug)]
pub struct Serving<'a>(&'a Gate);

impl Gate {
    /// A gate for `threads` reader threads, all of which start in `read`, letting as many
    /// read at once as this process may use CPUs.
    pub fn new(threads: usize) -> Gate {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Gate::with_readers(threads, cpus)
    }

    /// [`Gate::new`] with the number of concurrent readers given.
    pub fn with_readers(threads: usize, readers: usize) -> Gate {
        let readers = readers.max(1);
        Gate {
            threads,
            readers,
            on: threads > readers,
            state: Mutex::new(State {
                reading: threads,
                ..State::default()
            }),
            cv: Condvar::new(),
        }
    }

    /// The reader threads it was made for.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calling thread came out of `read` with a request.
    pub fn enter(&self) -> Serving<'_> {
        if self.on {
            let mut s = self.lock();
            s.reading = s.reading.saturating_sub(1);
        }
        Serving(self)
    }

    /// A request has been waiting for its module for [`SLOW`]: if nobody is reading, let a
    /// parked thread read.
    pub fn slow(&self) {
        if !self.on {
            return;
        }
        let mut s = self.lock();
        if s.reading == 0 && s.parked > s.promoted {
            s.promoted += 1;
            // Counted as reading now, so a second slow request does not promote another.
            s.reading += 1;
            self.cv.notify_one();
        }
    }

    fn leave(&self) {
        let mut s = self.lock();
        if s.reading < self.readers {
            s.reading += 1;
            return;
        }
        s.parked += 1;
        let (mut s, _) = self
            .cv
            .wait_timeout_while(s, PARK_MAX, |s| s.promoted == 0)
            .unwrap_or_else(|p| p.into_inner());
        s.parked -= 1;
        if s.promoted > 0 {
            // `slow` already counted this thread as reading.
            s.promoted -= 1;
        } else {
            s.reading += 1;
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize, usize) {
        let s = self.lock();
        (s.reading, s.parked, s.promoted)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        if self.0.on {
            self.0.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn one_reader_the_rest_park() {
        let g = Gate::with_readers(2, 1);
        let a = g.enter();
        let b = g.enter();
        assert_eq!(g.counts(), (0, 0, 0));
        drop(a); // nobody reading: back to read at once
        assert_eq!(g.counts(), (1, 0, 0));
        let t = Instant::now();
        drop(b); // someone reading: parks until PARK_MAX
        assert!(t.elapsed() >= PARK_MAX);
        assert_eq!(g.counts(), (2, 0, 0));
    }

    #[test]
    fn a_slow_request_promotes_one_parked_thread() {
        let g = Arc::new(Gate::with_readers(3, 1));
        let slow = g.enter();
        // Two threads finish quickly: the first goes back to read, the second parks.
        let g2 = g.clone();
        let parked = std::thread::spawn(move || {
            let a = g2.enter();
            let b = g2.enter();
            drop(a);
            let t = Instant::now();
            drop(b);
            t.elapsed()
        });
        // The reader takes the next request and is slow too; then the first one's wait expires.
        while g.counts().1 == 0 {
            std::thread::yield_now();
        }
        let reader = g.enter();
        assert_eq!(g.counts(), (0, 1, 0));
        g.slow();
        assert_eq!(g.counts().0, 1, "promoted thread counted as reading");
        g.slow(); // someone is reading now: no second promotion
        assert_eq!(g.counts().0, 1);
        let waited = parked.join().unwrap();
        assert!(waited < PARK_MAX, "woken by the promotion, not the timeout");
        assert_eq!(g.counts(), (1, 0, 0));
        drop(reader);
        drop(slow);
    }

    #[test]
    fn as_many_readers_as_cpus() {
        let g = Gate::with_readers(4, 2);
        let a = g.enter();
        let b = g.enter();
        let c = g.enter();
        drop(a); // one reading, two allowed: back to read
        assert_eq!(g.counts(), (2, 0, 0));
        let t = Instant::now();
        drop(b); // two reading: parks
        assert!(t.elapsed() >= PARK_MAX);
        drop(c);
        assert_eq!(g.counts().1, 0);
    }

    #[test]
    fn one_thread_never_parks() {
        let g = Gate::with_readers(1, 1);
        let a = g.enter();
        let t = Instant::now();
        drop(a);
        let b = g.enter();
        drop(b);
        assert!(t.elapsed() < PARK_MAX);
    }
}
