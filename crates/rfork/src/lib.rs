//! Rebootable fork: a child that is restarted from its rfork-time state when it crashes or asks
//! to be restarted, and removed when it exits normally. The project's supervisor.
//!
//! ```no_run
//! use rfork::{Config, Design, Forked};
//! let cfg = Config { design: Design::KeptImage, ..Config::default() };
//! match rfork::rfork(&cfg).expect("rfork") {
//!     Forked::Parent(mut child) => {
//!         while let Some(ev) = child.next_event(None).expect("events") {
//!             println!("{:?} {} pid {}", ev.kind, ev.reason, ev.pid);
//!         }
//!     }
//!     Forked::Child(worker) => {
//!         // Runs again from here, with this memory, after every crash.
//!         worker.heartbeat();
//!         std::process::exit(0);
//!     }
//! }
//! ```
//!
//! # Overview
//! - [`rfork`] returns twice, like `fork`: [`Forked::Parent`] with a [`Supervised`] handle, and
//!   [`Forked::Child`] with a [`Worker`], in every generation of the child. [`spawn`] is the
//!   closure form.
//! - Two designs behind one API ([`Design`]): the **monitor** design forks each new worker on
//!   demand; the **kept-image** design keeps a forked, parked standby and releases it on death,
//!   so no fork sits on the restart path. See `keeper.rs` and ARCHITECTURE.md.
//! - [`policy`]: which endings restart ([`RestartOn`]), restart intensity ([`Intensity`]),
//!   exponential [`Backoff`], all decided by one pure [`Governor`] shared with `kintsugi run`.
//! - The parent learns of every start, restart, removal and give-up with its reason: an
//!   [`EventStream`] (a pollable fd; the 32-byte records are also the C ABI) and, optionally,
//!   a signal ([`Config::notify_signal`], the paper's behaviour).
//! - A hang watchdog: a worker that stops calling [`heartbeat`] for [`Config::watchdog`] is
//!   killed and restarted.
//! - [`command`]: the same policies for an external program (fork+exec), used by `kintsugi run`.
//!
//! # SIGCHLD
//! The paper's user-level rfork took SIGCHLD for itself. Here the supervisor is a separate
//! keeper process that watches the worker through a pidfd: neither the caller's nor the
//! worker's signal dispositions, masks or handlers are touched, so a program's own SIGCHLD
//! handling (in the parent and in the child) works unchanged. The caller sees the keeper as
//! its one child: it exits, with the worker's status, when the worker is removed.
#![forbid(unsafe_code)]

pub mod command;
pub mod event;
mod keeper;
pub mod policy;
mod worker;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use sys::Pid;
use sys::pidfd::PidFd;
use sys::process::{ExitStatus, Fork};
use sys::shm::SharedAtomics;

pub use event::{Event, EventKind, EventStream, Reason};
pub use policy::{Backoff, Decision, Ending, Governor, Intensity, Policy, RestartOn};
pub use worker::{Worker, generation, heartbeat, is_worker, request_restart};

/// How a new generation is produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Design {
    /// Fork a new worker from the kept rfork-time image when the old one dies.
    #[default]
    Monitor,
    /// Keep a pre-forked standby parked; release it when the worker dies.
    KeptImage,
}

impl Design {
    pub fn name(self) -> &'static str {
        match self {
            Design::Monitor => "monitor",
            Design::KeptImage => "kept_image",
        }
    }
}

/// Everything rfork needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub design: Design,
    pub policy: Policy,
    /// Kill and restart a worker that has not called `heartbeat()` for this long.
    pub watchdog: Option<Duration>,
    /// Signal sent to the caller on every restart, removal and give-up (None: events only).
    pub notify_signal: Option<i32>,
    /// Grace between SIGTERM and SIGKILL for operator restarts and shutdown.
    pub stop_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            design: Design::Monitor,
            policy: Policy::default(),
            watchdog: None,
            notify_signal: None,
            stop_timeout: Duration::from_secs(2),
        }
    }
}

impl Config {
    /// Rejects configurations that cannot mean anything.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if let Some(w) = self.watchdog
            && w < Duration::from_millis(1)
        {
            return bad(format!(
                "watchdog {w:?} is shorter than 1 ms: no worker could keep up"
            ));
        }
        if let Some(s) = self.notify_signal
            && (!(1..=64).contains(&s) || s == libc::SIGKILL || s == libc::SIGSTOP)
        {
            return bad(format!(
                "notify signal {s} cannot be caught; pick e.g. SIGUSR1"
            ));
        }
        let i = self.policy.intensity;
        if i.max_restarts != u32::MAX && i.within.is_zero() {
            return bad("restart intensity window is 0: give a duration, or no limit".into());
        }
        if let Some(b) = self.policy.backoff
            && (b.initial > b.max || b.factor == 0)
        {
            return bad(format!(
                "backoff initial {:?} > max {:?} or factor 0: delays would never grow sensibly",
                b.initial, b.max
            ));
        }
        Ok(())
    }
}

/// What can go wrong starting a supervised child.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid rfork configuration: {0}")]
    Config(String),
    #[error("cannot create the rfork control channel (pipe, socket pair or shared page)")]
    Channel(#[source] io::Error),
    #[error("fork failed: out of processes or memory? (check `ulimit -u` and the pids cgroup)")]
    Fork(#[source] io::Error),
    #[error("cannot open a pidfd for the keeper (needs Linux 5.3 or later)")]
    Pidfd(#[source] io::Error),
    #[error("talking to the rfork keeper failed")]
    Io(#[source] io::Error),
}

/// The two returns of [`rfork`].
#[derive(Debug)]
pub enum Forked {
    Parent(Supervised),
    Child(Worker),
}

/// Rebootable fork. Returns [`Forked::Parent`] in the caller and [`Forked::Child`] in the
/// child, as `fork` does; the child returns here again, from the same memory, after every
/// restart. fork's rules apply: in a multi-threaded caller the child has one thread.
pub fn rfork(cfg: &Config) -> Result<Forked, Error> {
    cfg.validate()?;
    let shared = Arc::new(SharedAtomics::new(worker::WORDS).map_err(Error::Channel)?);
    let (ev_parent, ev_keeper) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Error::Channel(e.into()))?;
    let (ctl_keeper, ctl_parent) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| Error::Channel(e.into()))?;
    let caller = Pid::this();
    match sys::process::fork().map_err(Error::Fork)? {
        Fork::Parent(keeper) => {
            drop((ev_keeper, ctl_keeper));
            let keeper = PidFd::open(keeper).map_err(Error::Pidfd)?;
            Ok(Forked::Parent(Supervised {
                keeper,
                events: EventStream::new(ev_parent),
                control: Some(ctl_parent),
                shared,
                worker: None,
                last: None,
                status: None,
                owner: caller,
            }))
        }
        Fork::Child => {
            drop((ev_parent, ctl_parent));
            let _ = sys::process::set_name("rfork-keeper");
            let parent = PidFd::open(caller).ok();
            if Pid::parent() != Some(caller) {
                sys::process::exit_now(0); // the caller died before we could watch it
            }
            let ctl = worker::Worker::install_in_keeper(shared.clone(), cfg.design);
            let becomes = keeper::Keeper::new(*cfg, parent, ev_keeper, ctl_keeper, shared).run();
            Ok(Forked::Child(Worker::for_child(ctl, becomes.generation)))
        }
    }
}

/// rfork with the child's code as a closure: it runs in every generation; its return value is
/// the exit status. A panic aborts the worker (SIGABRT), so it counts as a crash whatever the
/// panic strategy.
pub fn spawn<F>(cfg: &Config, f: F) -> Result<Supervised, Error>
where
    F: FnOnce(&Worker) -> i32,
{
    match rfork(cfg)? {
        Forked::Parent(s) => Ok(s),
        Forked::Child(w) => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&w)))
                .unwrap_or_else(|_| std::process::abort());
            std::process::exit(code)
        }
    }
}

/// How supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The last event (Removed or GaveUp), if the keeper got to report it.
    pub last: Option<Event>,
    /// The keeper's own exit status (the worker's shell code when it was removed).
    pub keeper: ExitStatus,
}

impl Outcome {
    /// Whether supervision stopped because restarts came too fast.
    pub fn gave_up(&self) -> bool {
        self.last.is_some_and(|e| e.kind == EventKind::GaveUp)
    }
}

/// The caller's handle on an rforked child. Dropping it without [`Supervised::wait`],
/// [`Supervised::shutdown`] or [`Supervised::detach`] kills the whole supervised tree: a
/// forgotten handle never leaves a stray worker behind.
#[derive(Debug)]
pub struct Supervised {
    keeper: PidFd,
    events: EventStream,
    control: Option<std::os::fd::OwnedFd>,
    shared: Arc<SharedAtomics>,
    worker: Option<Pid>,
    last: Option<Event>,
    status: Option<ExitStatus>,
    /// The process that created the handle. A later fork copies the handle into its child;
    /// only the owner may kill or reap the keeper.
    owner: Pid,
}

impl Supervised {
    /// The keeper process (the caller's direct child).
    pub fn keeper_pid(&self) -> Pid {
        self.keeper.pid()
    }

    /// The current worker, as of the last event read.
    pub fn worker_pid(&self) -> Option<Pid> {
        self.worker
    }

    /// The event fd, for an event loop (poll it; then call [`Supervised::next_event`]).
    pub fn events(&self) -> &EventStream {
        &self.events
    }

    /// Heartbeats counted for the current generation.
    pub fn heartbeats(&self) -> u64 {
        self.shared
            .word(worker::HEARTBEAT)
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Events the keeper had to drop because this handle did not read them fast enough (the
    /// socket was full). Supervision never waits for the reader; the final event (Removed,
    /// GaveUp) waits up to a second for room.
    pub fn dropped_events(&self) -> u64 {
        self.shared
            .word(worker::EVENTS_DROPPED)
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next event, waiting at most `timeout` (None: forever); `Ok(None)` on timeout or
    /// after the last event.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> io::Result<Option<Event>> {
        let ev = self.events.next(timeout)?;
        if let Some(e) = ev {
            match e.kind {
                EventKind::Started | EventKind::Restarted => self.worker = Some(e.pid),
                EventKind::Removed | EventKind::GaveUp => {
                    self.worker = None;
                    self.last = Some(e);
                }
                EventKind::StandbyReady => {}
            }
        }
        Ok(ev)
    }

    /// Restart the worker now (SIGTERM, SIGKILL after the stop timeout). The restart counts
    /// toward the intensity limit like any other.
    pub fn restart(&self) -> Result<(), Error> {
        self.command(keeper::CMD_RESTART)
    }

    fn command(&self, cmd: u8) -> Result<(), Error> {
        let c = self
            .control
            .as_ref()
            .ok_or_else(|| Error::Io(io::ErrorKind::BrokenPipe.into()))?;
        rustix::io::write(c, &[cmd])
            .map(drop)
            .map_err(|e| Error::Io(e.into()))
    }

    /// Stop supervising: terminate the worker (SIGTERM, then SIGKILL after the stop timeout),
    /// and wait for the keeper.
    pub fn shutdown(mut self) -> Result<Outcome, Error> {
        // The keeper may already have ended (EPIPE); waiting is all that is left then.
        let _ = self.command(keeper::CMD_SHUTDOWN);
        self.wait_inner()
    }

    /// Waits until supervision ends by itself (removal or give-up), reading every event.
    pub fn wait(mut self) -> Result<Outcome, Error> {
        self.wait_inner()
    }

    fn wait_inner(&mut self) -> Result<Outcome, Error> {
        while self.next_event(None).map_err(Error::Io)?.is_some() {}
        let keeper = self.keeper.wait().map_err(Error::Io)?;
        self.status = Some(keeper);
        Ok(Outcome {
            last: self.last,
            keeper,
        })
    }

    /// Leaves the child running unsupervised by this handle (the keeper goes on by itself and
    /// still ends with the caller). Returns the keeper's pid, which the caller must reap.
    pub fn detach(mut self) -> Pid {
        self.control = None;
        self.status = Some(ExitStatus::Exited(0));
        self.keeper.pid()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.status.is_none() && Pid::this() == self.owner {
            let _ = self.keeper.send_signal(libc::SIGKILL);
            let _ = self.keeper.wait();
        }
    }
}
