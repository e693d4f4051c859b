//! The monitor: one thread, one epoll set over every kernel event source, one timer for the
//! work the kernel offers no event for (D-state sweep over kept-open stat fds, pids counters,
//! MemAvailable, heartbeats). Idle, it wakes once per tick.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use sys::netlink::{ProcConnector, ProcEvent};

use crate::action::Actions;
use crate::cgroup::{self, OomWatch};
use crate::config::Config;
use crate::detect::{
    BlockedGrowth, Detector, ForkStorm, HeartbeatLoss, HungTasks, KernelReports, MemoryExhaustion,
    Out, Status,
};
use crate::event::{Event, Metrics, Summary, now_ms};
use crate::kmsg::{self, Kmsg};
use crate::psi::{self, Resource, Trigger};
use crate::tasks::TaskTable;

/// Errors that stop the monitor.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot create the epoll set: {0}")]
    Epoll(std::io::Error),
    #[error("epoll_wait failed: {0}")]
    Wait(std::io::Error),
}

const TOKEN_KMSG: u64 = 1;
const TOKEN_PROC: u64 = 2;
const TOKEN_CGROUP_DIRS: u64 = 3;
/// Fork-rate detection tolerates this much extra latency; fork storms also arrive at once
/// through the pids controller's kmsg line.
const PROC_BATCH: Duration = Duration::from_millis(100);
const TOKEN_PSI: u64 = 100; // + index
const TOKEN_OOM: u64 = 1_000; // and up

/// How a run ends and what it reports besides events.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop at this time (benchmarks, tests); `None` runs until the stop flag is set.
    pub until: Option<Instant>,
    /// Emit a [`Event::Summary`] this often.
    pub summary_every: Option<Duration>,
}

/// CPU the monitor thread used during [`Monitor::run`] (getrusage RUSAGE_THREAD).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    pub cpu: Duration,
    pub wall: Duration,
    pub wakeups: u64,
}

impl RunStats {
    /// CPU as a percentage of one core.
    pub fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_THREAD) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// A stop flag set by SIGINT and SIGTERM (the monitor's epoll_wait returns EINTR on either, so
/// it stops at once rather than at the next tick).
pub fn stop_on_signals() -> std::io::Result<std::sync::Arc<AtomicBool>> {
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

/// The monitor. Build with [`Monitor::new`], then [`Monitor::run`] on the thread that owns it.
#[derive(Debug)]
pub struct Monitor {
    cfg: Config,
    epoll: OwnedFd,
    kmsg: Option<Kmsg>,
    proc: Option<ProcConnector>,
    psi: Vec<Trigger>,
    ooms: HashMap<u64, OomWatch>,
    oom_paths: HashSet<PathBuf>,
    next_oom_token: u64,
    memory_root: Option<PathBuf>,
    /// inotify on the v1 memory and pids hierarchies: a new cgroup gets its OOM eventfd and
    /// pids counter the moment it is created, not at the next tick.
    cgroup_dirs: Option<OwnedFd>,
    tasks: TaskTable,
    hung: HungTasks,
    driver: BlockedGrowth,
    fork: ForkStorm,
    memory: MemoryExhaustion,
    heartbeat: HeartbeatLoss,
    kernel: KernelReports,
    actions: Actions,
    metrics: Metrics,
    sources: Vec<String>,
    degraded: Vec<String>,
    last_tasks: usize,
    last_dstate: usize,
    beat: Option<(std::fs::File, u64)>,
    buf: Vec<u8>,
}

impl Monitor {
    /// Opens every event source the config asks for. A source that cannot be opened (no
    /// CAP_NET_ADMIN for the proc connector, no PSI, no v1 memory hierarchy) does not stop the
    /// monitor: it is listed in `degraded` with the reason, and the rest keeps working.
    pub fn new(cfg: Config) -> Result<Monitor, WatchError> {
        let ep =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| WatchError::Epoll(e.into()))?;
        let mut m = Monitor {
            hung: HungTasks::new(&cfg.hung_task),
            driver: BlockedGrowth::new(&cfg.driver),
            fork: ForkStorm::new(&cfg.fork),
            memory: MemoryExhaustion::new(&cfg.memory),
            heartbeat: HeartbeatLoss::new(&cfg.heartbeat),
            kernel: KernelReports::new(),
            actions: Actions::new(&cfg.action),
            tasks: TaskTable::new(cfg.max_tasks),
            epoll: ep,
            kmsg: None,
            proc: None,
            psi: Vec::new(),
            ooms: HashMap::new(),
            oom_paths: HashSet::new(),
            next_oom_token: TOKEN_OOM,
            memory_root: cgroup::v1_hierarchy("memory"),
            cgroup_dirs: None,
            metrics: Metrics::default(),
            sources: Vec::new(),
            degraded: Vec::new(),
            last_tasks: 0,
            last_dstate: 0,
            beat: None,
            buf: vec![0; 4096],
            cfg,
        };
        let watch_kmsg = m.cfg.kernel.enabled || m.cfg.hung_task.enabled || m.cfg.fork.enabled;
        if watch_kmsg {
            match Kmsg::open(false) {
                Ok(k) => {
                    m.add(&k, TOKEN_KMSG, epoll::EventFlags::IN);
                    m.kmsg = Some(k);
                    m.sources.push("kmsg".into());
                }
                Err(e) => m
                    .degraded
                    .push(format!("kmsg: {e} (needs read access to /dev/kmsg)")),
            }
        }
        match ProcConnector::open(8 << 20, false) {
            Ok(p) => {
                m.add(
                    &p,
                    TOKEN_PROC,
                    epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
                );
                m.proc = Some(p);
                m.sources.push("proc_connector".into());
            }
            Err(e) => m.degraded.push(format!(
                "proc_connector: {e} (needs CAP_NET_ADMIN; fork rates and task tracking fall \
                 back to the 1 s /proc rescan)"
            )),
        }
        let triggers = [
            (
                Resource::Io,
                m.cfg.driver.enabled,
                m.cfg.driver.psi_io_stall_us,
            ),
            (
                Resource::Memory,
                m.cfg.memory.enabled,
                m.cfg.memory.psi_stall_us,
            ),
        ];
        for (r, enabled, stall) in triggers {
            if !enabled || stall == 0 {
                continue;
            }
            match Trigger::open(r, stall) {
                Ok(t) => {
                    let tok = TOKEN_PSI + m.psi.len() as u64;
                    m.add(&t, tok, epoll::EventFlags::PRI);
                    m.sources.push(format!("psi:{}", r.path()));
                    m.psi.push(t);
                }
                Err(e) => m
                    .degraded
                    .push(format!("psi {}: {e} (boot with psi=1)", r.path())),
            }
        }
        if m.cfg.memory.enabled {
            if m.memory_root.is_some() {
                m.sources.push("memcg_eventfd".into());
            } else {
                m.degraded
                    .push("memcg OOM eventfds: no cgroup v1 memory hierarchy".into());
            }
        }
        use rustix::fs::inotify;
        match inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK) {
            Ok(fd) => {
                m.add(&fd, TOKEN_CGROUP_DIRS, epoll::EventFlags::IN);
                m.cgroup_dirs = Some(fd);
                m.sources.push("inotify:cgroup_dirs".into());
            }
            Err(e) => m.degraded.push(format!(
                "inotify on cgroup directories: {e} (new cgroups are found every 30 ticks)"
            )),
        }
        if let Some(p) = m.cfg.beat_file.clone() {
            match std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&p)
            {
                Ok(f) => m.beat = Some((f, 0)),
                Err(e) => m.degraded.push(format!(
                    "beat_file {}: {e} (another monitor cannot watch this one)",
                    p.display()
                )),
            }
        }
        m.sources.push(format!("timer:{}ms", m.cfg.tick_ms));
        m.rescan_cgroups();
        m.tasks.rescan();
        Ok(m)
    }

    fn add(&self, fd: &impl AsFd, token: u64, flags: epoll::EventFlags) {
        // Adding a fresh fd to our own epoll set only fails on resource exhaustion; the source
        // then stays silent and the tick still covers its fault class.
        if let Err(e) = epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token), flags) {
            tracing::warn!(token, error = %e, "cannot add an event source to epoll");
        }
    }

    fn watch_dirs(&self, dirs: &[PathBuf]) {
        use rustix::fs::inotify;
        let Some(fd) = &self.cgroup_dirs else { return };
        for d in dirs {
            // Idempotent for a directory already watched.
            let _ = inotify::add_watch(
                fd,
                d.as_path(),
                inotify::WatchFlags::CREATE | inotify::WatchFlags::ONLYDIR,
            );
        }
    }

    /// Finds new cgroups (OOM eventfds for memory cgroups, counters for pids cgroups) and
    /// watches their directories for more.
    fn rescan_cgroups(&mut self) {
        if self.cfg.fork.enabled {
            self.fork.rescan_pids();
            if let Some(root) = cgroup::v1_hierarchy("pids") {
                let mut dirs = cgroup::list(&root, 3);
                dirs.push(root);
                self.watch_dirs(&dirs);
            }
        }
        self.rescan_memcgs();
    }

    fn rescan_memcgs(&mut self) {
        let Some(root) = self.memory_root.clone() else {
            return;
        };
        if !self.cfg.memory.enabled {
            return;
        }
        let all = cgroup::list(&root, 3);
        let mut dirs = all.clone();
        dirs.push(root);
        self.watch_dirs(&dirs);
        for cg in all {
            if self.oom_paths.contains(&cg) || self.ooms.len() >= 512 {
                continue;
            }
            if let Ok(w) = OomWatch::register(&cg) {
                let tok = self.next_oom_token;
                self.next_oom_token += 1;
                self.add(&w, tok, epoll::EventFlags::IN);
                self.oom_paths.insert(cg);
                self.ooms.insert(tok, w);
            }
        }
    }

    /// Adds an in-process recovery action, e.g. restarting an rforked worker through its
    /// `rfork::Supervised` handle when its heartbeat stops. See [`Actions::add_callback`].
    pub fn add_callback_action(
        &mut self,
        name: &'static str,
        on: &[crate::event::FaultKind],
        cooldown: Duration,
        f: crate::action::Callback,
    ) {
        self.actions.add_callback(name, on, cooldown, f);
    }

    /// Kernel interfaces in use, and those that could not be opened (with the reason).
    pub fn sources(&self) -> (&[String], &[String]) {
        (&self.sources, &self.degraded)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// One status line per detector.
    pub fn status(&self) -> Vec<Status> {
        self.detectors_ref().iter().map(|d| d.status()).collect()
    }

    pub fn summary(&self) -> Summary {
        let io = self
            .psi
            .iter()
            .find(|t| t.resource == Resource::Io)
            .and_then(|t| t.current());
        let mem = self
            .psi
            .iter()
            .find(|t| t.resource == Resource::Memory)
            .and_then(|t| t.current());
        Summary {
            tasks: self.last_tasks,
            d_state: self.last_dstate,
            hung: self.hung.hung_now(),
            forks_per_sec: self.fork.rate(),
            mem_available_pct: (self.memory.available_pct() * 10.0).round() / 10.0,
            psi_io_avg10: io
                .or_else(|| psi::read(Resource::Io))
                .map(|p| p.avg10)
                .unwrap_or(0.0),
            psi_memory_avg10: mem
                .or_else(|| psi::read(Resource::Memory))
                .map(|p| p.avg10)
                .unwrap_or(0.0),
            detections: self.metrics.detections_total(),
            actions: self.metrics.actions_total(),
        }
    }

    fn detectors_ref(&self) -> Vec<&dyn Detector> {
        let mut v: Vec<&dyn Detector> = Vec::new();
        if self.cfg.hung_task.enabled {
            v.push(&self.hung);
        }
        if self.cfg.driver.enabled {
            v.push(&self.driver);
        }
        if self.cfg.fork.enabled {
            v.push(&self.fork);
        }
        if self.cfg.memory.enabled {
            v.push(&self.memory);
        }
        v.push(&self.heartbeat);
        if self.cfg.kernel.enabled {
            v.push(&self.kernel);
        }
        v
    }

    fn detectors(&mut self) -> Vec<&mut dyn Detector> {
        let mut v: Vec<&mut dyn Detector> = Vec::new();
        if self.cfg.hung_task.enabled {
            v.push(&mut self.hung);
        }
        if self.cfg.driver.enabled {
            v.push(&mut self.driver);
        }
        if self.cfg.fork.enabled {
            v.push(&mut self.fork);
        }
        if self.cfg.memory.enabled {
            v.push(&mut self.memory);
        }
        v.push(&mut self.heartbeat);
        if self.cfg.kernel.enabled {
            v.push(&mut self.kernel);
        }
        v
    }

    /// Runs until `stop` is set (check it from a signal handler: epoll_wait returns EINTR) or
    /// `opts.until` passes. Every event goes to `sink`.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        opts: &RunOptions,
        sink: &mut dyn FnMut(&Event),
    ) -> Result<RunStats, WatchError> {
        let started = Instant::now();
        let cpu0 = thread_cpu();
        let mut stats = RunStats::default();
        let mono = sys::clock::monotonic_ns;
        sink(&Event::Started {
            ts_ms: now_ms(),
            mono_ns: mono(),
            sources: self.sources.clone(),
            degraded: self.degraded.clone(),
        });
        let tick = Duration::from_millis(self.cfg.tick_ms);
        let mut next_tick = started;
        let mut sweep_at: Option<Instant> = None;
        // Proc-connector batching: after a drain the socket is re-armed PROC_BATCH later, so a
        // busy machine costs one wakeup per batch rather than one per fork.
        let mut proc_rearm_at: Option<Instant> = None;
        let beat_every = tick / 4;
        let mut next_beat = self.beat.as_ref().map(|_| started);
        let mut next_summary = opts.summary_every.map(|d| started + d);
        let mut events = Vec::with_capacity(64);
        let mut ticks = 0u64;
        let mut out = Out::default();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if opts.until.is_some_and(|u| now >= u) {
                break;
            }
            let mut deadline = next_tick;
            for d in [
                sweep_at,
                self.heartbeat.deadline(),
                next_summary,
                opts.until,
                proc_rearm_at,
                next_beat,
            ]
            .into_iter()
            .flatten()
            {
                deadline = deadline.min(d);
            }
            let wait = deadline.saturating_duration_since(now);
            let ts = rustix::time::Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&ts),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(WatchError::Wait(e.into())),
            }
            stats.wakeups += 1;
            let now = Instant::now();
            for ev in &events {
                match ev.data.u64() {
                    TOKEN_KMSG => self.drain_kmsg(now, &mut out),
                    TOKEN_PROC => {
                        self.drain_proc(now, &mut out);
                        proc_rearm_at = Some(now + PROC_BATCH);
                    }
                    TOKEN_CGROUP_DIRS => {
                        if let Some(fd) = &self.cgroup_dirs {
                            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
                            let mut r = rustix::fs::inotify::Reader::new(fd, &mut buf);
                            while r.next().is_ok() {}
                        }
                        self.rescan_cgroups();
                    }
                    t if (TOKEN_PSI..TOKEN_OOM).contains(&t) => {
                        let i = (t - TOKEN_PSI) as usize;
                        // Copy out of the packed epoll_event before borrowing.
                        let flags = { ev.flags };
                        if flags.intersects(epoll::EventFlags::ERR | epoll::EventFlags::HUP) {
                            // POLLERR: the kernel destroyed the trigger. Stop polling it (it
                            // would report the error on every wait) and keep the tick.
                            if let Some(p) = self.psi.get(i) {
                                let _ = epoll::delete(&self.epoll, p);
                                self.degraded
                                    .push(format!("psi {}: trigger destroyed", p.resource.path()));
                            }
                            continue;
                        }
                        if let Some(stall) = self.psi.get_mut(i).and_then(|p| p.confirm(now)) {
                            let r = self.psi[i].resource;
                            for d in self.detectors() {
                                d.on_pressure(r, stall, now, &mut out);
                            }
                        }
                    }
                    t => self.on_oom_ready(t, &mut out),
                }
            }
            if proc_rearm_at.is_some_and(|t| now >= t) {
                proc_rearm_at = None;
                // Events queued meanwhile make the fd ready at once after re-arming.
                if let Some(p) = &self.proc {
                    let flags = epoll::EventFlags::IN | epoll::EventFlags::ONESHOT;
                    let data = epoll::EventData::new_u64(TOKEN_PROC);
                    if let Err(e) = epoll::modify(&self.epoll, p, data, flags) {
                        tracing::warn!(error = %e, "cannot re-arm the proc connector");
                    }
                }
            }
            if let Some(b) = next_beat
                && now >= b
            {
                next_beat = Some(now + beat_every);
                self.write_beat();
            }
            let periodic = now >= next_tick;
            if periodic || sweep_at.is_some_and(|s| now >= s) {
                sweep_at = None;
                let s = self.tasks.sweep();
                self.last_tasks = s.tasks;
                self.last_dstate = s.dstate.len();
                for d in self.detectors() {
                    d.on_sweep(&s, now, periodic, &mut out);
                }
                if periodic {
                    ticks += 1;
                    // inotify reports new cgroups at once; the slow rescan is a safety net
                    // (and the only discovery when inotify is unavailable).
                    if self.cgroup_dirs.is_none() || ticks.is_multiple_of(30) {
                        self.rescan_cgroups();
                    }
                    next_tick += tick;
                    if next_tick <= now {
                        next_tick = now + tick;
                    }
                }
            }
            if self.heartbeat.deadline().is_some_and(|d| now >= d) {
                self.heartbeat.on_timer(now, &mut out);
            }
            if let Some(t) = out.sweep_at.take() {
                sweep_at = Some(sweep_at.map_or(t, |s: Instant| s.min(t)));
            }
            self.publish(&mut out, now, sink);
            if let Some(s) = next_summary
                && now >= s
            {
                next_summary = opts.summary_every.map(|d| now + d);
                sink(&Event::Summary {
                    ts_ms: now_ms(),
                    mono_ns: mono(),
                    summary: self.summary(),
                });
            }
        }
        stats.wall = started.elapsed();
        stats.cpu = thread_cpu().saturating_sub(cpu0);
        Ok(stats)
    }

    fn write_beat(&mut self) {
        use std::os::unix::fs::FileExt;
        if let Some((f, n)) = &mut self.beat {
            *n += 1;
            // Fixed width: each write replaces the whole previous value.
            let _ = f.write_at(format!("{n:020}\n").as_bytes(), 0);
        }
    }

    fn publish(&mut self, out: &mut Out, now: Instant, sink: &mut dyn FnMut(&Event)) {
        let mono = sys::clock::monotonic_ns;
        let mut records = Vec::new();
        for d in out.detections.drain(..) {
            let ev = Event::Detection {
                ts_ms: now_ms(),
                mono_ns: mono(),
                detection: d.clone(),
            };
            self.metrics.count(&ev);
            sink(&ev);
            self.actions.on_detection(&d, now, &mut records);
        }
        for (fault, subject) in out.recovered.drain(..) {
            sink(&Event::Recovered {
                ts_ms: now_ms(),
                mono_ns: mono(),
                fault,
                subject,
            });
        }
        self.actions.reap(now, &mut records);
        for a in records {
            let ev = Event::Action {
                ts_ms: now_ms(),
                mono_ns: mono(),
                action: a,
            };
            self.metrics.count(&ev);
            sink(&ev);
        }
    }

    fn drain_kmsg(&mut self, now: Instant, out: &mut Out) {
        let accept_user = self.cfg.kernel.accept_user_messages;
        // Bounded per wakeup, so a flood of kernel lines cannot starve the other sources.
        for _ in 0..256 {
            let rec = match self.kmsg.as_mut().map(|k| k.next_record()) {
                Some(Ok(Some(r))) => r,
                Some(Err(e)) => {
                    // A level-triggered fd that keeps failing would spin the loop: drop it.
                    tracing::warn!(error = %e, "reading /dev/kmsg failed; no longer watching it");
                    if let Some(k) = self.kmsg.take() {
                        let _ = epoll::delete(&self.epoll, &k);
                    }
                    self.degraded.push(format!("kmsg: read failed: {e}"));
                    return;
                }
                _ => return,
            };
            if rec.facility != 0 && !accept_user {
                continue;
            }
            if let Some(class) = kmsg::classify(&rec.text) {
                for d in self.detectors() {
                    d.on_kmsg(&class, &rec, now, out);
                }
            }
        }
    }

    fn drain_proc(&mut self, now: Instant, out: &mut Out) {
        for _ in 0..4096 {
            let ev = {
                let Some(pc) = self.proc.as_ref() else { return };
                match pc.recv(&mut self.buf) {
                    Ok(Some(ev)) => ev,
                    Ok(None) => return,
                    Err(e)
                        if e.raw_os_error() == Some(rustix::io::Errno::NOBUFS.raw_os_error()) =>
                    {
                        // The kernel dropped events: the task table may have missed tasks.
                        self.metrics.events_lost += 1;
                        self.tasks.mark_stale();
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "proc connector read failed");
                        return;
                    }
                }
            };
            match ev {
                ProcEvent::Fork {
                    child_tid,
                    child_tgid,
                    ..
                } => self.tasks.on_fork(child_tgid, child_tid),
                ProcEvent::Exit { tid, .. } => self.tasks.on_exit(tid),
                _ => {}
            }
            if self.cfg.fork.enabled {
                self.fork.on_proc(&ev, now, out);
            }
        }
    }

    fn on_oom_ready(&mut self, token: u64, out: &mut Out) {
        let Some(w) = self.ooms.get_mut(&token) else {
            return;
        };
        match w.on_ready() {
            Some((o, kills)) => {
                let cg = w.cgroup.clone();
                for d in self.detectors() {
                    d.on_oom(&cg, o, kills, out);
                }
            }
            None => {
                // The cgroup was removed: forget its eventfd.
                if let Some(w) = self.ooms.remove(&token) {
                    let _ = epoll::delete(&self.epoll, &w);
                    self.oom_paths.remove(&w.cgroup);
                }
            }
        }
    }
}
