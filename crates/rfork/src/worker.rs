//! The worker's side: heartbeats, restart requests, and which generation this is.
//!
//! Worker and keeper share one page of atomics (created by the caller before rfork, so every
//! generation and the keeper see the same words). A heartbeat is one atomic increment: no
//! syscall, so a worker can beat in a hot loop.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sys::shm::SharedAtomics;

use crate::Design;

/// Word indices in the shared control page.
pub(crate) const HEARTBEAT: usize = 0;
pub(crate) const RESTART_REQUESTED: usize = 1;
pub(crate) const STANDBY_PARKED: usize = 2;
pub(crate) const GENERATION: usize = 3;
/// Set by the keeper while it waits with a standby parked and no teardown in flight.
pub(crate) const KEEPER_IDLE: usize = 4;
/// Events the keeper dropped because the parent's socket was full.
pub(crate) const EVENTS_DROPPED: usize = 5;
pub(crate) const WORDS: usize = 6;

/// What the current process knows about itself if it is an rfork worker. Set in the keeper
/// before it forks any worker, so every worker inherits it through fork without writing a
/// byte: on the monitor design's restart path, each page a fresh child writes is a
/// copy-on-write fault before its first user code. Read by [`heartbeat`] and
/// [`request_restart`].
static CURRENT: RwLock<Option<&'static Ctl>> = RwLock::new(None);

#[derive(Debug)]
pub(crate) struct Ctl {
    pub(crate) shared: Arc<SharedAtomics>,
    pub(crate) design: Design,
}

/// Handed to the rforked child: it is generation `generation()` of a supervised worker.
#[derive(Debug, Clone)]
pub struct Worker {
    ctl: &'static Ctl,
    generation: u32,
}

impl Worker {
    /// In the keeper, before any fork: the context every worker it forks will inherit. Leaked
    /// on purpose: it lives as long as the keeper's lineage of processes.
    pub(crate) fn install_in_keeper(shared: Arc<SharedAtomics>, design: Design) -> &'static Ctl {
        let ctl: &'static Ctl = Box::leak(Box::new(Ctl { shared, design }));
        // The keeper is single-threaded; a poisoned lock (a panic in the caller while holding
        // it) still holds a usable value.
        *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(ctl);
        ctl
    }

    /// In a freshly forked (or released) worker: no writes, see [`CURRENT`].
    pub(crate) fn for_child(ctl: &'static Ctl, generation: u32) -> Worker {
        Worker { ctl, generation }
    }

    /// 1 for the first worker, +1 per restart.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Tells the watchdog this worker is alive.
    pub fn heartbeat(&self) {
        self.ctl
            .shared
            .word(HEARTBEAT)
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ends this worker and asks for a restart from the rfork-time state. Runs `exit(3)`
    /// semantics (stdio flushed, atexit handlers run), like the paper's exit-value request.
    pub fn request_restart(&self) -> ! {
        request_restart_via(self.ctl, self.generation)
    }

    /// Kept-image design: whether the supervisor is ready for a fast restart: a fresh standby
    /// is parked (the next restart will not fork) and the previous generation's address space
    /// has been released. Always true for the monitor design.
    pub fn standby_ready(&self) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        self.ctl.design == Design::Monitor
            || (self.ctl.shared.word(STANDBY_PARKED).load(Acquire) != 0
                && self.ctl.shared.word(KEEPER_IDLE).load(Acquire) != 0)
    }

    /// Waits (spinning politely) until [`Worker::standby_ready`], at most `timeout`.
    pub fn wait_standby_ready(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while !self.standby_ready() {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }
}

fn request_restart_via(ctl: &Ctl, generation: u32) -> ! {
    ctl.shared.word(RESTART_REQUESTED).store(
        u64::from(generation.max(1)),
        std::sync::atomic::Ordering::Release,
    );
    std::process::exit(0)
}

fn current() -> Option<&'static Ctl> {
    *CURRENT.read().unwrap_or_else(|p| p.into_inner())
}

/// Whether the calling process is an rfork worker.
pub fn is_worker() -> bool {
    current().is_some()
}

/// Heartbeat for the calling worker (no-op outside a worker).
pub fn heartbeat() {
    if let Some(c) = current() {
        c.shared
            .word(HEARTBEAT)
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Ends the calling worker and asks for a restart. Outside an rfork worker there is nobody to
/// restart it: it exits with status 75 (EX_TEMPFAIL), which `kintsugi run --restart on-failure`
/// treats as a failure and restarts.
pub fn request_restart() -> ! {
    match current() {
        Some(c) => {
            let generation = c
                .shared
                .word(GENERATION)
                .load(std::sync::atomic::Ordering::Relaxed) as u32;
            request_restart_via(c, generation)
        }
        None => std::process::exit(75),
    }
}

/// The generation of the calling worker, 0 outside a worker.
pub fn generation() -> u32 {
    current()
        .map(|c| {
            c.shared
                .word(GENERATION)
                .load(std::sync::atomic::Ordering::Relaxed) as u32
        })
        .unwrap_or(0)
}
