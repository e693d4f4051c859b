//! The keeper: a process forked at rfork time that never runs user code, so its memory *is*
//! the rfork-time image. It supervises the worker through a pidfd (never SIGCHLD: the keeper
//! runs no user code, and the workers' signal dispositions stay exactly as they were at rfork
//! time) and produces each new generation:
//!
//! - **monitor design** (the paper's user level): fork a fresh worker from the keeper's image
//!   when the old one dies: one fork on the restart path;
//! - **kept-image design** (the paper's kernel level, in user space): a standby forked from the
//!   image in advance sits parked on a pipe; on death the keeper writes one word to that pipe
//!   and the standby runs: no fork on the restart path. The keeper forks the next standby right
//!   after the release, off the critical path.
//!
//! On the kept-image path a worker's death must also not wait for the kernel to tear down its
//! address space (milliseconds for hundreds of MB, all before the pidfd turns readable): each
//! standby clones an *mm anchor* (`sys::process::spawn_mm_anchor`) that shares its address
//! space, so the worker's exit only drops a reference. The keeper kills the anchor after the
//! next generation runs, which is where the teardown then happens. This is the user-space
//! counterpart of the paper's kernel rfork starting the kept image inside `do_exit`.
//!
//! The keeper exits when the worker is removed, when it gives up, when asked to shut down, or
//! when the rfork caller dies (it watches the caller's pidfd; PR_SET_PDEATHSIG would fire on the
//! death of the forking *thread*, not process). Workers and standbys carry PR_SET_PDEATHSIG =
//! SIGKILL against the single-threaded keeper, so no worker outlives its supervision.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use sys::Pid;
use sys::clock::monotonic_ns;
use sys::pidfd::PidFd;
use sys::process::{self, ExitStatus, Fork};
use sys::shm::SharedAtomics;

use crate::event::{Event, EventKind, Reason};
use crate::policy::{Decision, Ending, Governor};
use crate::worker::{
    EVENTS_DROPPED, GENERATION, HEARTBEAT, KEEPER_IDLE, RESTART_REQUESTED, STANDBY_PARKED,
};
use crate::{Config, Design};

/// Exit status of a keeper that failed internally (fork impossible, …) after reporting it.
pub(crate) const KEEPER_FAILED: i32 = 125;

/// Commands on the control pipe, one byte each.
pub(crate) const CMD_RESTART: u8 = b'R';
pub(crate) const CMD_SHUTDOWN: u8 = b'S';

pub(crate) struct Keeper {
    cfg: Config,
    me: Pid,
    parent: Option<PidFd>,
    events: OwnedFd,
    control: Option<OwnedFd>,
    shared: Arc<SharedAtomics>,
    governor: Governor,
    generation: u32,
    worker: Option<Running>,
    standby: Option<Standby>,
    /// Backoff: the next generation starts at this time, after `pending` ended.
    restart_at: Option<(u64, Ending)>,
    shutting_down: bool,
    /// Anchors of workers that have died: killed (and their address space freed) once the
    /// next generation is running.
    retired_anchors: Vec<PidFd>,
    /// Anchors already SIGKILLed whose teardown is still running; reaped when their pidfd
    /// turns readable, so the keeper never blocks on a teardown.
    dying_anchors: Vec<PidFd>,
}

struct Running {
    pidfd: PidFd,
    started_ns: u64,
    /// Set when the keeper itself ended the worker (watchdog, operator): the reason to report.
    forced: Option<Ending>,
    /// SIGTERM was sent; SIGKILL follows at this time.
    kill_at: Option<u64>,
    heartbeat_seen: u64,
    heartbeat_deadline: u64,
    /// The mm anchor keeping this worker's address space alive (kept-image design).
    anchor: Option<PidFd>,
}

struct Standby {
    pidfd: PidFd,
    /// Socket pair end: the standby writes its anchor's pid, the keeper writes the generation
    /// that releases it.
    release: OwnedFd,
}

/// What a freshly forked child must do once it has shed the keeper's resources.
enum Child {
    /// Run user code as this generation.
    Work(u32),
    /// Park on this pipe until released (kept-image standby).
    Park(OwnedFd),
}

/// Returned only inside a new worker process.
pub(crate) struct Becomes {
    pub(crate) generation: u32,
}

impl Keeper {
    pub(crate) fn new(
        cfg: Config,
        parent: Option<PidFd>,
        events: OwnedFd,
        control: OwnedFd,
        shared: Arc<SharedAtomics>,
    ) -> Keeper {
        Keeper {
            governor: Governor::new(cfg.policy),
            cfg,
            me: Pid::this(),
            parent,
            events,
            control: Some(control),
            shared,
            generation: 0,
            worker: None,
            standby: None,
            restart_at: None,
            shutting_down: false,
            retired_anchors: Vec::new(),
            dying_anchors: Vec::new(),
        }
    }

    /// Runs the keeper. Returns only in a child that is to become a worker; the keeper process
    /// itself ends inside (`exit_now`).
    pub(crate) fn run(mut self) -> Becomes {
        match self.run_inner() {
            Ok(child) => self.into_child(child),
            Err(e) => {
                tracing::error!(error = %e, "rfork keeper failed; giving up");
                let pid = self
                    .worker
                    .as_ref()
                    .map(|w| w.pidfd.pid())
                    .unwrap_or(self.me);
                self.emit(EventKind::GaveUp, Reason::None, pid);
                self.kill_all();
                process::exit_now(KEEPER_FAILED)
            }
        }
    }

    /// In a child: drop every keeper resource (fds), park if a standby, and return the
    /// generation to run as.
    fn into_child(self, child: Child) -> Becomes {
        // Shed every keeper fd *now*: a partially moved struct would only drop them at the end
        // of this function, and a parked standby (and the mm anchor it clones, which copies
        // its fd table) would then hold the event socket open forever.
        let Keeper {
            shared,
            me,
            events,
            control,
            parent,
            worker,
            standby,
            retired_anchors,
            dying_anchors,
            ..
        } = self;
        drop((
            events,
            control,
            parent,
            worker,
            standby,
            retired_anchors,
            dying_anchors,
        ));
        if process::set_parent_death_signal(libc::SIGKILL).is_err() || Pid::parent() != Some(me) {
            process::exit_now(0); // the keeper is already gone: nobody supervises us
        }
        let generation = match child {
            Child::Work(g) => g,
            Child::Park(release) => {
                // 0 tells the keeper there is no anchor (the restart then waits for teardown).
                let anchor = process::spawn_mm_anchor().map_or(0, Pid::as_raw);
                let _ = rustix::io::write(&release, &anchor.to_le_bytes());
                park(&shared, release)
            }
        };
        Becomes { generation }
    }

    fn run_inner(&mut self) -> io::Result<Child> {
        if let Some(c) = self.start_generation(None)? {
            return Ok(c);
        }
        loop {
            if let Some(c) = self.tick()? {
                return Ok(c);
            }
        }
    }

    /// Starts the next generation: fork (monitor, or kept-image without a standby) or release
    /// the standby, then report, then (kept-image) prepare the next standby.
    fn start_generation(&mut self, after: Option<Ending>) -> io::Result<Option<Child>> {
        let generation = self.generation + 1;
        self.shared.word(HEARTBEAT).store(0, Ordering::Relaxed);
        self.shared
            .word(RESTART_REQUESTED)
            .store(0, Ordering::Relaxed);
        self.shared
            .word(GENERATION)
            .store(u64::from(generation), Ordering::Release);
        let released = match self.standby.take() {
            Some(sb) => self.release(sb, generation),
            None => None,
        };
        let (pidfd, anchor) = match released {
            Some(r) => r,
            None => match self.fork_retrying()? {
                Fork::Child => return Ok(Some(Child::Work(generation))),
                Fork::Parent(pid) => (PidFd::open(pid)?, None),
            },
        };
        self.generation = generation;
        let pid = pidfd.pid();
        let now = monotonic_ns();
        self.worker = Some(Running {
            pidfd,
            started_ns: now,
            forced: None,
            kill_at: None,
            heartbeat_seen: 0,
            heartbeat_deadline: now + self.watchdog_ns(),
            anchor,
        });
        match after {
            None => self.emit(EventKind::Started, Reason::None, pid),
            Some(ending) => {
                // debug, not info: a crash-looping child must not be able to flood the log; the
                // parent gets every event and decides what to log.
                tracing::debug!(pid = pid.as_raw(), generation, reason = %ending, "rfork: worker restarted");
                self.emit(EventKind::Restarted, ending.into(), pid);
            }
        }
        if self.cfg.design == Design::KeptImage && self.standby.is_none() {
            return self.prepare_standby();
        }
        Ok(None)
    }

    /// Releases a parked standby as `generation`, returning it and its mm anchor; None if it is
    /// gone (then we fork instead).
    fn release(&mut self, sb: Standby, generation: u32) -> Option<(PidFd, Option<PidFd>)> {
        self.shared.word(STANDBY_PARKED).store(0, Ordering::Release);
        // The standby sends its anchor pid before it parks; this read only waits if the
        // standby is released within microseconds of its fork.
        let mut buf = [0u8; 4];
        let anchor = match rustix::io::read(&sb.release, &mut buf) {
            Ok(4) => Pid::from_raw(i32::from_le_bytes(buf)).and_then(|p| PidFd::open(p).ok()),
            _ => None,
        };
        match rustix::io::write(&sb.release, &generation.to_le_bytes()) {
            Ok(4) => Some((sb.pidfd, anchor)),
            _ => {
                if let Some(a) = anchor {
                    self.retired_anchors.push(a);
                }
                tracing::warn!(
                    pid = sb.pidfd.pid().as_raw(),
                    "rfork: standby vanished; forking instead"
                );
                let _ = sb.pidfd.send_signal(libc::SIGKILL);
                let _ = sb.pidfd.wait();
                None
            }
        }
    }

    fn prepare_standby(&mut self) -> io::Result<Option<Child>> {
        let (wr, rd) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?;
        match self.fork_retrying()? {
            Fork::Child => {
                drop(wr);
                Ok(Some(Child::Park(rd)))
            }
            Fork::Parent(pid) => {
                drop(rd);
                let pidfd = PidFd::open(pid)?;
                self.emit(EventKind::StandbyReady, Reason::None, pid);
                self.standby = Some(Standby { pidfd, release: wr });
                Ok(None)
            }
        }
    }

    /// fork, retrying transient EAGAIN/ENOMEM a few times (a fork storm elsewhere must not make
    /// us give up a restart at the first refusal).
    fn fork_retrying(&self) -> io::Result<Fork> {
        let mut delay = Duration::from_millis(1);
        for _ in 0..8 {
            match process::fork() {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOMEM)) => {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                r => return r,
            }
        }
        process::fork()
    }

    fn watchdog_ns(&self) -> u64 {
        self.cfg
            .watchdog
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(u64::MAX / 4)
    }

    /// One round: timers, then wait for the worker, the control pipe, the parent or a timer.
    fn tick(&mut self) -> io::Result<Option<Child>> {
        // The previous generation's address space is freed here, after its successor (and
        // the next standby) exist: the teardown is off the restart path.
        for a in self.retired_anchors.drain(..) {
            let _ = a.send_signal(libc::SIGKILL);
            self.dying_anchors.push(a);
        }
        let now = monotonic_ns();
        let mut wake_at = u64::MAX;
        if let Some(w) = self.worker.as_mut() {
            if let Some(at) = w.kill_at {
                if now >= at {
                    let _ = w.pidfd.send_signal(libc::SIGKILL);
                    w.kill_at = None;
                } else {
                    wake_at = wake_at.min(at);
                }
            }
            if self.cfg.watchdog.is_some() && w.forced.is_none() {
                let hb = self.shared.word(HEARTBEAT).load(Ordering::Relaxed);
                if hb != w.heartbeat_seen {
                    w.heartbeat_seen = hb;
                    w.heartbeat_deadline =
                        now + self.cfg.watchdog.map_or(0, |d| d.as_nanos() as u64);
                }
                if now >= w.heartbeat_deadline {
                    tracing::warn!(
                        pid = w.pidfd.pid().as_raw(),
                        "rfork: watchdog expired; killing worker"
                    );
                    w.forced = Some(Ending::Hung);
                    let _ = w.pidfd.send_signal(libc::SIGKILL);
                } else {
                    // Re-check the counter at the deadline, or sooner at a tenth of the period
                    // so a beat right before the deadline is not missed by much.
                    let step = self
                        .cfg
                        .watchdog
                        .map_or(0, |d| d.as_nanos() as u64 / 10)
                        .max(1_000_000);
                    wake_at = wake_at.min(w.heartbeat_deadline.min(now + step));
                }
            }
        }
        if self.worker.is_none()
            && let Some((at, ending)) = self.restart_at
        {
            if now >= at {
                self.restart_at = None;
                return self.start_generation(Some(ending));
            }
            wake_at = wake_at.min(at);
        }

        let timeout = sys::clock::timeout_until(wake_at, now);
        let (worker_ready, control_ready, parent_gone, anchors_done) = {
            let mut fds = Vec::with_capacity(3);
            let wi = self.worker.as_ref().map(|w| {
                fds.push(PollFd::new(&w.pidfd, PollFlags::IN));
                fds.len() - 1
            });
            let ci = self.control.as_ref().map(|c| {
                fds.push(PollFd::new(c, PollFlags::IN));
                fds.len() - 1
            });
            let pi = self.parent.as_ref().map(|p| {
                fds.push(PollFd::new(p, PollFlags::IN));
                fds.len() - 1
            });
            let first_anchor = fds.len();
            for a in &self.dying_anchors {
                fds.push(PollFd::new(a, PollFlags::IN));
            }
            // Ready for a fast restart: a standby is parked and no old address space is still
            // being torn down (workers can wait for this; see Worker::wait_standby_ready).
            let idle = self.standby.is_some() && self.dying_anchors.is_empty();
            self.shared
                .word(KEEPER_IDLE)
                .store(u64::from(idle), Ordering::Release);
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            self.shared.word(KEEPER_IDLE).store(0, Ordering::Release);
            let ready = |i: Option<usize>| i.is_some_and(|i| !fds[i].revents().is_empty());
            let anchors_done = fds[first_anchor..].iter().any(|f| !f.revents().is_empty());
            (ready(wi), ready(ci), ready(pi), anchors_done)
        };
        if anchors_done {
            self.dying_anchors
                .retain(|a| !matches!(a.try_wait(), Ok(Some(_))));
        }

        if parent_gone {
            tracing::debug!("rfork: caller exited; ending supervision");
            self.kill_all();
            process::exit_now(0);
        }
        if control_ready {
            self.read_control();
        }
        if worker_ready {
            return self.reap_worker();
        }
        Ok(None)
    }

    fn read_control(&mut self) {
        let Some(c) = self.control.as_ref() else {
            return;
        };
        let mut buf = [0u8; 16];
        let n = match rustix::io::read(c, &mut buf) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => return,
            Err(_) => 0,
        };
        if n == 0 {
            // The handle was dropped without shutdown, or detached: keep supervising.
            self.control = None;
            return;
        }
        for &cmd in &buf[..n] {
            match cmd {
                CMD_RESTART => self.terminate_worker(Ending::Operator),
                CMD_SHUTDOWN => {
                    self.shutting_down = true;
                    if self.worker.is_none() {
                        self.restart_at = None;
                    }
                    self.terminate_worker(Ending::Operator);
                }
                _ => {}
            }
        }
        if self.shutting_down && self.worker.is_none() {
            let pid = self.me;
            self.finish(EventKind::Removed, Reason::Operator, pid, None);
        }
    }

    /// SIGTERM now, SIGKILL after the stop timeout.
    fn terminate_worker(&mut self, why: Ending) {
        let stop = self.cfg.stop_timeout.as_nanos() as u64;
        if let Some(w) = self.worker.as_mut() {
            if w.forced.is_none() {
                w.forced = Some(why);
            }
            let _ = w.pidfd.send_signal(libc::SIGTERM);
            w.kill_at = Some(monotonic_ns() + stop);
        }
    }

    fn reap_worker(&mut self) -> io::Result<Option<Child>> {
        let Some(w) = self.worker.as_ref() else {
            return Ok(None);
        };
        let Some(status) = w.pidfd.try_wait()? else {
            return Ok(None);
        };
        let mut w = self.worker.take().expect("checked above");
        let now = monotonic_ns();
        if let Some(a) = w.anchor.take() {
            self.retired_anchors.push(a);
        }
        let pid = w.pidfd.pid();
        let requested = self
            .shared
            .word(RESTART_REQUESTED)
            .swap(0, Ordering::AcqRel)
            != 0;
        let ending = match (w.forced, requested) {
            (Some(f), _) => f,
            (None, true) => Ending::Requested,
            (None, false) => Ending::Status(status),
        };
        if self.shutting_down {
            self.finish(EventKind::Removed, ending.into(), pid, Some(status));
        }
        let lived = Duration::from_nanos(now.saturating_sub(w.started_ns));
        match self.governor.decide(ending, lived, now) {
            Decision::Restart { delay } if delay.is_zero() => self.start_generation(Some(ending)),
            Decision::Restart { delay } => {
                tracing::info!(pid = pid.as_raw(), reason = %ending, ?delay, "rfork: worker ended; restarting after backoff");
                self.restart_at = Some((now + delay.as_nanos() as u64, ending));
                Ok(None)
            }
            Decision::Remove => {
                tracing::debug!(pid = pid.as_raw(), reason = %ending, "rfork: worker removed");
                self.finish(EventKind::Removed, ending.into(), pid, Some(status))
            }
            Decision::GiveUp => {
                tracing::error!(
                    pid = pid.as_raw(),
                    reason = %ending,
                    max = self.cfg.policy.intensity.max_restarts,
                    within = ?self.cfg.policy.intensity.within,
                    "rfork: restart intensity exceeded; giving up"
                );
                self.finish(EventKind::GaveUp, ending.into(), pid, Some(status))
            }
        }
    }

    /// Last event, then exit: with the worker's shell code when it has one.
    fn finish(
        &mut self,
        kind: EventKind,
        reason: Reason,
        pid: Pid,
        status: Option<ExitStatus>,
    ) -> ! {
        self.kill_all();
        self.emit(kind, reason, pid);
        process::exit_now(status.map_or(0, ExitStatus::shell_code))
    }

    fn kill_all(&mut self) {
        let (worker, anchor) = match self.worker.take() {
            Some(w) => (Some(w.pidfd), w.anchor),
            None => (None, None),
        };
        let mut retired = std::mem::take(&mut self.retired_anchors);
        retired.append(&mut self.dying_anchors);
        // A parked standby has already sent its anchor's pid; collect it without blocking.
        let (standby, standby_anchor) = match self.standby.take() {
            Some(sb) => {
                let mut buf = [0u8; 4];
                let anchor = match rustix::net::recv(
                    &sb.release,
                    &mut buf,
                    rustix::net::RecvFlags::DONTWAIT,
                ) {
                    Ok((4, _)) => {
                        Pid::from_raw(i32::from_le_bytes(buf)).and_then(|p| PidFd::open(p).ok())
                    }
                    _ => None,
                };
                (Some(sb.pidfd), anchor)
            }
            None => (None, None),
        };
        for pidfd in [worker, anchor, standby, standby_anchor]
            .into_iter()
            .flatten()
            .chain(retired)
        {
            let _ = pidfd.send_signal(libc::SIGKILL);
            let _ = pidfd.wait();
        }
    }

    fn emit(&self, kind: EventKind, reason: Reason, pid: Pid) {
        let ev = Event {
            kind,
            reason,
            pid,
            generation: self.generation,
            restarts_in_window: self.governor.restarts_in_window(),
            at_ns: monotonic_ns(),
        };
        // Never block on the parent: a parent that does not read its events (it may rely on the
        // notify signal alone, as in the paper) must not stall supervision. An event that finds
        // the socket full is dropped and counted; only the last one (Removed, GaveUp) waits a
        // bounded time for room, because wait() reports it.
        let flags = rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT;
        let mut sent = rustix::net::send(&self.events, &ev.encode(), flags);
        if sent == Err(rustix::io::Errno::AGAIN)
            && matches!(kind, EventKind::Removed | EventKind::GaveUp)
        {
            let mut fds = [PollFd::new(&self.events, PollFlags::OUT)];
            let second = rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            if matches!(poll(&mut fds, Some(&second)), Ok(n) if n > 0) {
                sent = rustix::net::send(&self.events, &ev.encode(), flags);
            }
        }
        if sent == Err(rustix::io::Errno::AGAIN) {
            self.shared
                .word(EVENTS_DROPPED)
                .fetch_add(1, Ordering::Relaxed);
        }
        if kind != EventKind::StandbyReady
            && let (Some(sig), Some(parent)) = (self.cfg.notify_signal, self.parent.as_ref())
        {
            let _ = parent.send_signal(sig);
        }
    }
}

/// A standby's life before release: mark parked, block on the release pipe. EOF means the
/// keeper discarded us.
fn park(shared: &SharedAtomics, release: OwnedFd) -> u32 {
    shared
        .word(STANDBY_PARKED)
        .store(u64::from(Pid::this().as_raw() as u32), Ordering::Release);
    let mut buf = [0u8; 4];
    loop {
        match rustix::io::read(release.as_fd(), &mut buf) {
            Ok(4) => return u32::from_le_bytes(buf),
            Err(rustix::io::Errno::INTR) => continue,
            _ => process::exit_now(0),
        }
    }
}
