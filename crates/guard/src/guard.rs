//! The guard process: launch (or restore) the program, serve its trapped syscalls on a
//! thread, checkpoint every epoch on the main thread, merge layers in the background, and
//! restore automatically when the program is killed by a signal.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sys::Pid;
use sys::process::ExitStatus;
use sys::seccomp::{Listener, ListenerState, NotifyFilter};

use crate::checkpoint::{Incarnation, Program};
use crate::image;
use crate::log::{self, Log, Verdict};
use crate::{Error, Result};

/// Guard settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub epoch: Duration,
    pub images: PathBuf,
    /// Merge the chain into one full layer every this many layers.
    pub merge_every: u64,
    /// Give up restoring after this many restores (a program that keeps dying is not helped).
    pub max_restores: u32,
    /// Run the program in its own network namespace (loopback only).
    pub net: bool,
    /// Catch SIGINT/SIGTERM/SIGHUP (blocked in the calling thread and every thread started
    /// after it) and pass them on to the program instead of dying and leaving it unguarded.
    pub forward_signals: bool,
}

/// What `kintsugi guard --status` shows; written to `DIR/status.json` at every epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub guard_pid: i32,
    /// The program's pid as the host sees it (pid 1 inside its namespace).
    pub app_pid: i32,
    pub argv: Vec<String>,
    pub epoch_ms: u64,
    /// "running", "restoring", "exited N", "gave up: …".
    pub state: String,
    /// Newest layer written.
    pub last_layer: u64,
    pub layers_written: u64,
    pub restorable: bool,
    pub refusals: Vec<String>,
    pub restores: u32,
    pub trapped_calls: u64,
    pub last_pause_us: u64,
    pub last_layer_bytes: u64,
    /// Processes of the tree in the last layer (pid 1, its children…, zombies included).
    #[serde(default)]
    pub processes: u32,
}

/// Reads `DIR/status.json`.
pub fn read_status(dir: &Path) -> Result<Status> {
    let p = dir.join("status.json");
    let b = std::fs::read(&p).map_err(|e| {
        Error::sys(
            format!(
                "reading {} (is a guard running with --images {}?)",
                p.display(),
                dir.display()
            ),
            e,
        )
    })?;
    serde_json::from_slice(&b).map_err(|e| Error::Image(format!("{}: {e}", p.display())))
}

/// What one epoch cost.
#[derive(Debug, Clone, Copy)]
pub struct EpochRecord {
    pub seq: u64,
    /// How long the program was stopped.
    pub pause: Duration,
    /// Page bytes captured.
    pub page_bytes: u64,
    /// Size of the layer file written (0 if writing failed).
    pub layer_bytes: u64,
}

/// Restores the newest image in `dir` into a new process (pid 1 of a new pid namespace) with
/// the guard's filter installed, without guarding it further. For benchmarks and tools.
pub fn restore_detached(dir: &Path) -> Result<crate::restore::Restored> {
    let filter = NotifyFilter::new(&log::trapped_numbers())
        .map_err(|e| Error::sys("building the seccomp filter", e))?;
    crate::restore::restore(dir, &filter)
}

/// A running guard.
#[derive(Debug)]
pub struct Guard {
    opts: Options,
    prog: Program,
    filter: NotifyFilter,
    log: Arc<Mutex<Log>>,
    inc: Incarnation,
    server: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
    merger: Option<JoinHandle<()>>,
    next_seq: u64,
    /// The next layer must be written as full (nothing before it can be relied on).
    next_full: bool,
    status: Status,
    /// Exclusive lock on DIR/lock: one guard per image directory.
    _lock: std::fs::File,
    signals: Option<sys::guard_sig::SignalFd>,
    /// A termination signal arrived: the next exit ends the guard.
    stopping: Option<(i32, Instant)>,
}

/// The guard's fds a launched program inherits (everything not close-on-exec), as
/// `(fd, dev, ino)`: the program's fds that still name these objects are passed through on
/// restore instead of being rebuilt.
fn own_inherited() -> Vec<(i32, u64, u64)> {
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut v: Vec<(i32, u64, u64)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|fd| {
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(libc::O_CLOEXEC);
            flags & libc::O_CLOEXEC == 0
        })
        .filter_map(|fd| {
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .ok()
                .map(|m| (fd, m.dev(), m.ino()))
        })
        .collect();
    v.sort_unstable();
    v
}

fn resolve(cmd: &str) -> Result<String> {
    if cmd.contains('/') {
        return Ok(cmd.to_string());
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in path.split(':') {
        let p = Path::new(dir).join(cmd);
        if p.is_file() {
            return Ok(p.to_string_lossy().into_owned());
        }
    }
    Err(Error::Usage(format!("{cmd}: command not found in PATH")))
}

fn serve(listener: Arc<Listener>, log: Arc<Mutex<Log>>, stop: Arc<AtomicBool>) {
    // A trapped call can be cut short by a signal until we have received it: take it the
    // moment it arrives, ahead of the checkpoints, the layer writes and everything else on
    // the machine. Measured with a program closing pipes after fork under a SIGCHLD handler
    // without SA_RESTART (2000 iterations, 20 ms epochs): 4–13 closes failed with EINTR at
    // normal priority (also with only the busy periods boosted, or a short EEVDF slice), none
    // real-time. The price: a trapped call costs ≈2 µs more (the real-time wake-up does not
    // stay on the waker's CPU).
    if let Err(e) = sys::guard_sched::make_thread_realtime() {
        tracing::debug!(target: "guard", "notification thread stays at normal priority: {e}");
    }
    loop {
        match listener.wait(Duration::from_millis(100)) {
            Ok(ListenerState::Ready) => {
                let Ok(Some(n)) = listener.recv() else {
                    continue;
                };
                if log::answer_first(n.nr) && n.is_native_abi() {
                    let (tid, nr, args) = (n.pid, n.nr, n.args);
                    if let Err(e) = n.respond_continue() {
                        tracing::debug!(target: "guard", "answering a trapped call: {e}");
                    }
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    log::record_answered(&mut l, tid, nr, args);
                    continue;
                }
                let verdict = {
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    log::record(&mut l, &n)
                };
                let r = match verdict {
                    Verdict::Continue => n.respond_continue(),
                    Verdict::Refuse(errno) => n.respond_error(errno),
                };
                if let Err(e) = r {
                    tracing::debug!(target: "guard", "answering a trapped call: {e}");
                }
            }
            Ok(ListenerState::Gone) => return,
            Ok(ListenerState::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(target: "guard", "seccomp listener: {e}");
                return;
            }
        }
    }
}

fn start_server(listener: Listener, log: &Arc<Mutex<Log>>) -> (JoinHandle<()>, Arc<AtomicBool>) {
    let _ = listener.set_sync_wakeup();
    let stop = Arc::new(AtomicBool::new(false));
    let (l, lg, st) = (Arc::new(listener), log.clone(), stop.clone());
    let h = std::thread::Builder::new()
        .name("guard-notify".into())
        .spawn(move || serve(l, lg, st))
        .expect("spawning the notification thread");
    (h, stop)
}

impl Guard {
    /// Starts `argv` under the guard: pid 1 of a new pid + mount namespace, filter installed
    /// before exec.
    pub fn launch(opts: Options, argv: Vec<String>) -> Result<Guard> {
        if argv.is_empty() {
            return Err(Error::Usage(
                "no command given: kintsugi guard -- CMD ARGS…".into(),
            ));
        }
        let lock = lock_dir(&opts.images)?;
        prepare_dir(&opts.images)?;
        let path = resolve(&argv[0])?;
        let env: Vec<String> = std::env::vars_os()
            .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v.to_str()?)))
            .collect();
        let exec =
            sys::ns::ExecArgs::new(&path, &argv, &env).map_err(|e| Error::Usage(e.to_string()))?;
        let filter = NotifyFilter::new(&log::trapped_numbers())
            .map_err(|e| Error::sys("building the seccomp filter", e))?;
        let (r1, w1) = sys::ns::pipe_cloexec().map_err(|e| Error::sys("pipe", e))?;
        let (r2, w2) = sys::ns::pipe_cloexec().map_err(|e| Error::sys("pipe", e))?;
        use std::os::fd::AsRawFd;
        let (w1r, r2r) = (w1.as_raw_fd(), r2.as_raw_fd());
        let net = opts.net;
        let signals = block_signals(&opts)?;
        let flags = sys::ns::NEWPID | sys::ns::NEWNS | if net { sys::ns::NEWNET } else { 0 };
        let pid = match sys::ns::clone3_fork(flags, &[])
            .map_err(|e| Error::sys("clone3 into a new pid namespace", e))?
        {
            sys::process::Fork::Child => {
                let _ = sys::ns::make_mounts_private();
                let _ = sys::signal::unblock_all();
                let lo = if net {
                    sys::ns::loopback_up().is_ok()
                } else {
                    true
                };
                let l = if lo {
                    sys::seccomp::install_listener_filter(&filter).unwrap_or(-1)
                } else {
                    -1
                };
                sys::ns::raw_write(w1r, &l.to_ne_bytes());
                let mut b = [0u8; 1];
                if l < 0 || sys::ns::raw_read(r2r, &mut b) != 1 {
                    sys::process::exit_now(126);
                }
                let _ = exec.exec();
                sys::process::exit_now(127);
            }
            sys::process::Fork::Parent(pid) => pid,
        };
        drop((w1, r2));
        let inc = Incarnation::launched(pid)?;
        let mut b = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::from(r1);
            f.read_exact(&mut b)
                .map_err(|e| Error::sys("reading the listener fd from the program", e))?;
        }
        let raw = i32::from_ne_bytes(b);
        if raw < 0 {
            let _ = sys::process::wait_pid(pid);
            return Err(Error::Restore(
                "the program could not install the seccomp filter".into(),
            ));
        }
        let lfd = sys::guard_fd::pidfd_getfd(inc.pidfd.as_fd(), raw)
            .map_err(|e| Error::sys("pidfd_getfd of the listener", e))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let server = start_server(Listener::from_fd(lfd), &log);
        {
            use std::io::Write;
            let mut f = std::fs::File::from(w2);
            f.write_all(&[1])
                .map_err(|e| Error::sys("releasing the program", e))?;
        }
        let seq = image::list_layers(&opts.images)?
            .last()
            .copied()
            .unwrap_or(0)
            + 1;
        let status = Status {
            guard_pid: Pid::this().as_raw(),
            app_pid: pid.as_raw(),
            argv: argv.clone(),
            epoch_ms: opts.epoch.as_millis() as u64,
            state: "running".into(),
            restorable: true,
            ..Default::default()
        };
        tracing::info!(target: "guard", "guarding {:?} as pid {pid} (pid 1 in its namespace)", argv);
        Ok(Guard {
            opts,
            prog: Program {
                argv,
                inherited: own_inherited(),
                net,
            },
            filter,
            log,
            inc,
            server: Some(server),
            merger: None,
            next_seq: seq,
            next_full: true,
            status,
            _lock: lock,
            signals,
            stopping: None,
        })
    }

    /// Restores the program from `opts.images` (after both it and its guard died) and guards it.
    pub fn from_images(opts: Options) -> Result<Guard> {
        let filter = NotifyFilter::new(&log::trapped_numbers())
            .map_err(|e| Error::sys("building the seccomp filter", e))?;
        let lock = lock_dir(&opts.images)?;
        let signals = block_signals(&opts)?;
        let log = Arc::new(Mutex::new(Log::default()));
        let t0 = Instant::now();
        let r = crate::restore::restore(&opts.images, &filter)?;
        tracing::info!(target: "guard", "restored layer {} ({} KiB of pages) in {:?} as pid {}", r.seq, r.page_bytes / 1024, t0.elapsed(), r.inc.pid);
        Guard::adopt_log(&log, &r);
        let status = Status {
            guard_pid: Pid::this().as_raw(),
            app_pid: r.inc.pid.as_raw(),
            argv: r.state.argv.clone(),
            epoch_ms: opts.epoch.as_millis() as u64,
            state: "running".into(),
            last_layer: r.seq,
            restorable: true,
            restores: 1,
            ..Default::default()
        };
        let mut g = Guard {
            prog: Program {
                argv: r.state.argv.clone(),
                inherited: own_inherited(),
                net: r.state.net,
            },
            filter,
            log,
            inc: r.inc,
            server: None,
            merger: None,
            next_seq: r.seq + 1,
            next_full: false,
            status,
            opts,
            _lock: lock,
            signals,
            stopping: None,
        };
        g.server = Some(start_server(r.listener, &g.log));
        Ok(g)
    }

    /// Starts the log over for a restored tree: what the image says, keyed by the new host
    /// pids and tids.
    fn adopt_log(log: &Mutex<Log>, r: &crate::restore::Restored) {
        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
        let trapped = l.trapped;
        *l = Log::default();
        l.trapped = trapped;
        let st = &r.state;
        for p in std::iter::once(st).chain(st.procs.iter()) {
            let Some(host) = r.hosts.get(&p.ns_pid()) else {
                continue;
            };
            let host = host.as_raw();
            l.committed_sigactions
                .insert(host, p.sigactions.iter().copied().collect());
            if !p.itimers.is_empty() {
                l.itimers
                    .insert(host, p.itimers.iter().map(|t| (t.which, *t)).collect());
            }
        }
        l.altstacks = r.altstacks.clone();
        l.sockets = r.sockets.clone();
    }

    /// The program's pid (host namespace).
    pub fn app_pid(&self) -> Pid {
        self.inc.pid
    }

    /// Guards until the program exits on its own (returns its shell exit code) or cannot be
    /// restored any more.
    pub fn run(mut self) -> Result<i32> {
        self.write_status();
        let mut next = Instant::now() + self.opts.epoch;
        let mut failures = 0u64;
        loop {
            let now = Instant::now();
            let wait = next.saturating_duration_since(now);
            let ended = match &self.signals {
                None => {
                    sys::pidfd::wait_readable(self.inc.pidfd.as_fd(), Some(wait)).unwrap_or(false)
                }
                Some(sf) => {
                    let r = sys::guard_sig::wait_any(&[self.inc.pidfd.as_fd(), sf.as_fd()], wait)
                        .unwrap_or_else(|_| vec![false, false]);
                    if r[1] {
                        self.on_signal();
                    }
                    r[0]
                }
            };
            if let Some((_, since)) = self.stopping
                && since.elapsed() > Duration::from_secs(3)
            {
                // pid 1 of its namespace ignores signals it has no handler for: insist.
                let _ = sys::process::kill(self.inc.pid, libc::SIGKILL);
            }
            if ended {
                let st = self.inc.pidfd.try_wait().ok().flatten();
                if let Some(code) = self.on_exit(st)? {
                    return Ok(code);
                }
                next = Instant::now() + self.opts.epoch;
                continue;
            }
            if Instant::now() < next {
                continue;
            }
            next += self.opts.epoch;
            if next < Instant::now() {
                next = Instant::now() + self.opts.epoch;
            }
            match self.epoch() {
                Ok(_) => {
                    if failures > 0 {
                        failures = 0;
                        self.status.state = "running".into();
                    }
                }
                Err(e) if e.program_gone() => {
                    // It ended while we stopped it: the status went to ptrace's wait, or is
                    // still waiting for us as a zombie.
                    let st = e
                        .ended_status()
                        .or_else(|| self.inc.pidfd.try_wait().ok().flatten())
                        .unwrap_or(ExitStatus::Signaled {
                            signal: libc::SIGKILL,
                            core: false,
                        });
                    if let Some(code) = self.on_exit(Some(st))? {
                        return Ok(code);
                    }
                    next = Instant::now() + self.opts.epoch;
                }
                Err(e) => {
                    // Rate-limited: a program can make every epoch fail the same way.
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(100) {
                        tracing::warn!(target: "guard", "checkpoint failed ({failures} so far): {e}");
                    }
                    self.status.state = format!("running; checkpoints failing: {e}");
                    self.write_status();
                }
            }
        }
    }

    /// One checkpoint: stop, capture, resume, then write the layer.
    pub fn epoch(&mut self) -> Result<EpochRecord> {
        let seq = self.next_seq;
        let (mut layer, stats) = self.inc.checkpoint(&self.prog, &self.log, seq)?;
        self.inc.copy_late(&mut layer);
        layer.full = self.next_full;
        let refusals = layer.state.state.refusals.clone();
        self.status.processes = 1 + layer.state.state.procs.len() as u32;
        let mut rec = EpochRecord {
            seq,
            pause: stats.pause,
            page_bytes: stats.page_bytes,
            layer_bytes: 0,
        };
        match image::write_layer(&self.opts.images, &layer) {
            Ok(bytes) => {
                rec.layer_bytes = bytes;
                self.next_seq += 1;
                self.next_full = false;
                self.status.last_layer = seq;
                self.status.layers_written += 1;
                self.status.last_layer_bytes = bytes;
            }
            Err(e) => {
                // The chain now misses this epoch's pages: start over with a full layer.
                tracing::warn!(target: "guard", "writing layer {seq} to {}: {e}", self.opts.images.display());
                self.inc.force_full();
                self.next_full = true;
            }
        }
        self.status.last_pause_us = stats.pause.as_micros() as u64;
        self.status.restorable = refusals.is_empty();
        self.status.refusals = refusals;
        self.status.trapped_calls = self.log.lock().map(|l| l.trapped).unwrap_or(0);
        if self
            .status
            .layers_written
            .is_multiple_of(self.opts.merge_every)
        {
            self.start_merge();
        }
        self.write_status();
        Ok(rec)
    }

    fn start_merge(&mut self) {
        if let Some(h) = &self.merger
            && !h.is_finished()
        {
            return;
        }
        if let Some(h) = self.merger.take() {
            let _ = h.join();
        }
        let dir = self.opts.images.clone();
        self.merger = std::thread::Builder::new()
            .name("guard-merge".into())
            .spawn(move || {
                if let Err(e) = image::merge(&dir) {
                    tracing::warn!(target: "guard", "merging layers in {}: {e}", dir.display());
                }
            })
            .ok();
    }

    fn wait_merge(&mut self) {
        if let Some(h) = self.merger.take() {
            let _ = h.join();
        }
    }

    fn stop_server(&mut self) {
        if let Some((h, stop)) = self.server.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }

    /// The program ended. `Some(code)`: the guard is done; `None`: restored, keep guarding.
    /// SIGINT/SIGTERM/SIGHUP to the guard: pass it on to the program; a second one, or 3 s
    /// without an exit, ends it with SIGKILL. Either way the guard then exits, not restores.
    fn on_signal(&mut self) {
        let Some(sf) = &self.signals else { return };
        while let Ok(Some(sig)) = sf.try_read() {
            if self.stopping.is_some() {
                let _ = sys::process::kill(self.inc.pid, libc::SIGKILL);
            } else {
                tracing::info!(target: "guard", "{}: passing it on to the program and stopping", sys::signal::name(sig));
                self.stopping = Some((sig, Instant::now()));
                let _ = sys::process::kill(self.inc.pid, sig);
            }
        }
    }

    fn on_exit(&mut self, st: Option<ExitStatus>) -> Result<Option<i32>> {
        self.stop_server();
        let st = st.unwrap_or(ExitStatus::Signaled {
            signal: libc::SIGKILL,
            core: false,
        });
        if let Some((sig, _)) = self.stopping {
            self.status.state = format!("stopped by {} ({st})", sys::signal::name(sig));
            self.write_status();
            self.wait_merge();
            return Ok(Some(match st {
                ExitStatus::Exited(c) => c,
                ExitStatus::Signaled { .. } => 128 + sig,
            }));
        }
        match st {
            ExitStatus::Exited(code) => {
                self.status.state = format!("exited {code}");
                self.write_status();
                self.wait_merge();
                Ok(Some(code))
            }
            ExitStatus::Signaled { signal, .. } => {
                tracing::warn!(target: "guard", "program pid {} {st}; restoring", self.inc.pid);
                if self.status.restores >= self.opts.max_restores {
                    self.status.state = format!("gave up after {} restores", self.status.restores);
                    self.write_status();
                    return Ok(Some(128 + signal));
                }
                if !self.status.restorable {
                    self.status.state =
                        format!("{st}; not restorable: {}", self.status.refusals.join("; "));
                    self.write_status();
                    return Ok(Some(128 + signal));
                }
                self.status.state = "restoring".into();
                self.write_status();
                self.wait_merge();
                let t0 = Instant::now();
                let r = match crate::restore::restore(&self.opts.images, &self.filter) {
                    Ok(r) => r,
                    Err(e) => {
                        self.status.state = format!("restore failed: {e}");
                        self.write_status();
                        return Err(e);
                    }
                };
                tracing::info!(target: "guard", "restored layer {} in {:?} as pid {}", r.seq, t0.elapsed(), r.inc.pid);
                Guard::adopt_log(&self.log, &r);
                self.inc = r.inc;
                self.next_seq = r.seq + 1;
                self.next_full = false;
                self.server = Some(start_server(r.listener, &self.log));
                self.status.restores += 1;
                self.status.app_pid = self.inc.pid.as_raw();
                self.status.state = "running".into();
                self.write_status();
                Ok(None)
            }
        }
    }

    fn write_status(&self) {
        if let Ok(b) = serde_json::to_vec_pretty(&self.status) {
            // Advisory file: atomic (rename) but not fsynced every epoch.
            let tmp = self.opts.images.join(".status.json.tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(tmp, self.opts.images.join("status.json"));
            }
        }
    }
}

fn block_signals(opts: &Options) -> Result<Option<sys::guard_sig::SignalFd>> {
    if !opts.forward_signals {
        return Ok(None);
    }
    sys::guard_sig::SignalFd::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
        .map(Some)
        .map_err(|e| Error::sys("blocking SIGINT/SIGTERM/SIGHUP for forwarding", e))
}

/// Locks `dir` for this guard, so two guards never write one image directory.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::sys(format!("creating image directory {}", dir.display()), e))?;
    let p = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::sys(format!("opening {}", p.display()), e))?;
    if !sys::guard_fd::try_lock_exclusive(&f)
        .map_err(|e| Error::sys(format!("locking {}", p.display()), e))?
    {
        return Err(Error::Usage(format!(
            "{} is in use by another running guard (see `kintsugi guard --status --images {}`); stop it or use another directory",
            dir.display(),
            dir.display()
        )));
    }
    Ok(f)
}

fn prepare_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::sys(format!("creating image directory {}", dir.display()), e))?;
    // A previous run's layers describe another process: start a fresh chain.
    for s in image::list_layers(dir)? {
        let _ = std::fs::remove_file(dir.join(image::layer_name(s)));
    }
    Ok(())
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_server();
        self.wait_merge();
    }
}
