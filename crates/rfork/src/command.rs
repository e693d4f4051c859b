//! Supervising an external program: fork+exec restarts under the same [`Policy`] as rfork.
//!
//! This is what `kintsugi run` drives. The supervisor is the calling process itself (no keeper:
//! an exec'd program has no rfork-time image to keep). What it adds over a plain restart loop,
//! because a demanding user of systemd, s6 or runit expects it:
//! - **Process groups**: each generation runs in its own process group; when it ends, the
//!   group is SIGKILLed so a crashed shell script leaves no strays. The supervisor is also a
//!   child subreaper, so double-forked descendants come back to it and are reaped.
//! - **sd_notify compatibility**: `NOTIFY_SOCKET` and `WATCHDOG_USEC` are set for the child, so a
//!   program written for systemd's watchdog (`sd_notify("WATCHDOG=1")`) works unchanged;
//!   `WATCHDOG=trigger` counts as a hang.
//! - **Signals**: SIGHUP restarts the child now (operator restart); SIGTERM/SIGINT stop it
//!   (SIGTERM to the group, SIGKILL after the stop timeout) and end supervision.
//! - **Restart requests**: the program exits with [`RunConfig::request_exit_code`] (75,
//!   EX_TEMPFAIL, by default), what `rfork::request_restart()` does outside an rfork worker.
//! - **Fast, leak-free spawning**: `sys::spawn` (vfork-style clone + exec) sets the process group
//!   and PR_SET_PDEATHSIG without copying the supervisor's page tables, so a SIGKILLed
//!   supervisor still takes its child with it.
//! - No start throttle: a crash loop restarts at fork+exec speed until the intensity limit,
//!   unlike runit/daemontools' hard-coded one restart per second (use [`crate::Backoff`]).

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use sys::Pid;
use sys::clock::monotonic_ns;
use sys::pidfd::PidFd;
use sys::process::{self, ExitStatus};

use crate::event::{Event, EventKind, Reason};
use crate::policy::{Decision, Ending, Governor, Policy};

/// How to supervise the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunConfig {
    pub policy: Policy,
    /// Restart a child that sent no `WATCHDOG=1` for this long (sd_notify protocol).
    pub watchdog: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    /// An exit with this status is a restart request (restarts under every policy).
    pub request_exit_code: Option<i32>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            policy: Policy::default(),
            watchdog: None,
            stop_timeout: Duration::from_secs(2),
            request_exit_code: Some(75),
        }
    }
}

/// What can go wrong supervising a command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command not found: {0:?} (not a path, and not in any PATH directory)")]
    NotFound(OsString),
    #[error("{0} is not an executable file (check its mode: chmod +x)")]
    NotExecutable(PathBuf),
    #[error("cannot start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up supervision ({what})")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The final result of supervising a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    /// Removed (by policy or stop signal) or GaveUp, with the reason.
    pub last: Event,
    /// The last child's own exit status.
    pub status: ExitStatus,
    /// How many generations ran.
    pub generations: u32,
    /// Whether supervision ended because SIGTERM/SIGINT asked it to.
    pub stopped: bool,
}

impl RunOutcome {
    /// The exit code `kintsugi run` should end with: the last child's, as a shell would report
    /// it; 0 after a requested stop whose child ended by that stop.
    pub fn exit_code(&self) -> i32 {
        if self.stopped {
            return 0;
        }
        self.status.shell_code()
    }
}

/// Finds `program` the way a shell does: a name with a slash is a path, anything else is
/// searched in PATH.
pub fn resolve(program: &OsString) -> Result<PathBuf, CommandError> {
    use std::os::unix::fs::PermissionsExt;
    let p = Path::new(program);
    let check = |path: PathBuf| -> Result<PathBuf, CommandError> {
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(path),
            Ok(_) => Err(CommandError::NotExecutable(path)),
            Err(_) => Err(CommandError::NotFound(program.clone())),
        }
    };
    if p.as_os_str().as_encoded_bytes().contains(&b'/') {
        return check(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut not_exec = None;
    for dir in std::env::split_paths(&path) {
        match check(dir.join(p)) {
            Ok(found) => return Ok(found),
            Err(CommandError::NotExecutable(f)) => not_exec = not_exec.or(Some(f)),
            Err(_) => {}
        }
    }
    Err(not_exec.map_or_else(
        || CommandError::NotFound(program.clone()),
        CommandError::NotExecutable,
    ))
}

/// The notify socket lives in a private directory removed on drop, even on error paths.
struct NotifySocket {
    sock: UnixDatagram,
    dir: PathBuf,
    path: PathBuf,
}

impl NotifySocket {
    fn bind() -> io::Result<NotifySocket> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("kintsugi-run-{}-{}", Pid::this(), monotonic_ns()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path)?;
        sock.set_nonblocking(true)?;
        Ok(NotifySocket { sock, dir, path })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A self-pipe fed by a signal handler (signal-hook writes one byte per delivery).
struct SignalPipe {
    rd: OwnedFd,
    id: signal_hook::SigId,
}

impl SignalPipe {
    fn new(sig: i32) -> io::Result<SignalPipe> {
        let (rd, wr) = std::os::unix::net::UnixStream::pair()?;
        rd.set_nonblocking(true)?;
        wr.set_nonblocking(true)?;
        let id = signal_hook::low_level::pipe::register(sig, wr)?;
        Ok(SignalPipe { rd: rd.into(), id })
    }
    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!(rustix::io::read(&self.rd, &mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        signal_hook::low_level::unregister(self.id);
    }
}

struct Child {
    pidfd: PidFd,
    started_ns: u64,
    forced: Option<Ending>,
    kill_at: Option<u64>,
    watchdog_deadline: Option<u64>,
}

/// Supervises one external command until it is removed, supervision gives up, or a stop
/// signal arrives. `on_event` sees every event (for logs).
pub fn supervise(
    program: &OsString,
    args: &[OsString],
    cfg: &RunConfig,
    mut on_event: impl FnMut(&Event),
) -> Result<RunOutcome, CommandError> {
    let path = resolve(program)?;
    let setup = |what| move |source| CommandError::Setup { what, source };
    process::set_child_subreaper().map_err(setup("PR_SET_CHILD_SUBREAPER"))?;
    let notify = NotifySocket::bind().map_err(setup("notify socket"))?;
    let hup = SignalPipe::new(libc::SIGHUP).map_err(setup("SIGHUP handler"))?;
    let term = SignalPipe::new(libc::SIGTERM).map_err(setup("SIGTERM handler"))?;
    let int = SignalPipe::new(libc::SIGINT).map_err(setup("SIGINT handler"))?;
    let chld = SignalPipe::new(libc::SIGCHLD).map_err(setup("SIGCHLD handler"))?;

    let mut governor = Governor::new(cfg.policy);
    let mut generation = 0u32;
    let mut restart_at: Option<(u64, Ending)> = None;
    let mut stopping = false;
    let watchdog_ns = cfg.watchdog.map(|d| d.as_nanos() as u64);
    let stop_ns = cfg.stop_timeout.as_nanos() as u64;

    // argv and the fixed part of the environment are built once; only the generation changes.
    let cstr = |b: &[u8]| {
        CString::new(b).map_err(|_| CommandError::Setup {
            what: "argument with a NUL byte",
            source: io::ErrorKind::InvalidInput.into(),
        })
    };
    let c_path = cstr(path.as_os_str().as_bytes())?;
    let argv = std::iter::once(program)
        .chain(args)
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let notify_path = cstr(notify.path.as_os_str().as_bytes())?;
    let watchdog_usec = cfg
        .watchdog
        .map(|w| CString::new(w.as_micros().to_string()).expect("digits"));
    let spawn = |generation: u32| -> Result<Child, CommandError> {
        let gen_str = CString::new(generation.to_string()).expect("digits");
        let mut set: Vec<(&str, &CStr)> = vec![
            ("NOTIFY_SOCKET", &notify_path),
            ("KINTSUGI_GENERATION", &gen_str),
        ];
        if let Some(w) = &watchdog_usec {
            set.push(("WATCHDOG_USEC", w));
        }
        let spec = sys::spawn::SpawnSpec {
            path: c_path.clone(),
            argv: argv.clone(),
            envp: sys::spawn::environment(&set, &["WATCHDOG_USEC", "WATCHDOG_PID"]),
            new_process_group: true,
            parent_death_signal: Some(libc::SIGKILL),
        };
        let pid = sys::spawn::spawn(&spec).map_err(|source| CommandError::Spawn {
            program: path.clone(),
            source,
        })?;
        let pidfd = PidFd::open(pid).map_err(setup("pidfd_open"))?;
        let now = monotonic_ns();
        Ok(Child {
            pidfd,
            started_ns: now,
            forced: None,
            kill_at: None,
            watchdog_deadline: watchdog_ns.map(|w| now + w),
        })
    };
    let event = |kind, reason, pid: Pid, generation, governor: &Governor| Event {
        kind,
        reason,
        pid,
        generation,
        restarts_in_window: governor.restarts_in_window(),
        at_ns: monotonic_ns(),
    };

    generation += 1;
    let mut child = Some(spawn(generation)?);
    on_event(&event(
        EventKind::Started,
        Reason::None,
        child.as_ref().expect("just set").pidfd.pid(),
        generation,
        &governor,
    ));

    loop {
        let now = monotonic_ns();
        let mut wake_at = u64::MAX;
        if let Some(c) = child.as_mut() {
            if let Some(at) = c.kill_at {
                if now >= at {
                    let _ = process::kill_group(c.pidfd.pid(), libc::SIGKILL);
                    c.kill_at = None;
                } else {
                    wake_at = wake_at.min(at);
                }
            }
            if let Some(d) = c.watchdog_deadline {
                if now >= d && c.forced.is_none() {
                    tracing::warn!(
                        pid = c.pidfd.pid().as_raw(),
                        "run: watchdog expired (no WATCHDOG=1); killing"
                    );
                    c.forced = Some(Ending::Hung);
                    c.watchdog_deadline = None;
                    let _ = process::kill_group(c.pidfd.pid(), libc::SIGKILL);
                } else if c.forced.is_none() {
                    wake_at = wake_at.min(d);
                }
            }
        } else if let Some((at, ending)) = restart_at {
            if now >= at {
                restart_at = None;
                generation += 1;
                let c = spawn(generation)?;
                on_event(&event(
                    EventKind::Restarted,
                    ending.into(),
                    c.pidfd.pid(),
                    generation,
                    &governor,
                ));
                child = Some(c);
                continue;
            }
            wake_at = wake_at.min(at);
        }

        let timeout = sys::clock::timeout_until(wake_at, now);
        let ready = {
            let notify_fd = notify.sock.as_fd();
            let mut fds = vec![
                PollFd::new(&hup.rd, PollFlags::IN),
                PollFd::new(&term.rd, PollFlags::IN),
                PollFd::new(&int.rd, PollFlags::IN),
                PollFd::new(&chld.rd, PollFlags::IN),
                PollFd::new(&notify_fd, PollFlags::IN),
            ];
            if let Some(c) = child.as_ref() {
                fds.push(PollFd::new(&c.pidfd, PollFlags::IN));
            }
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(CommandError::Setup {
                        what: "poll",
                        source: e.into(),
                    });
                }
            }
            fds.iter()
                .map(|f| !f.revents().is_empty())
                .collect::<Vec<_>>()
        };
        let now = monotonic_ns();

        if ready[0] {
            hup.drain();
            if let Some(c) = child.as_mut() {
                tracing::info!(
                    pid = c.pidfd.pid().as_raw(),
                    "run: SIGHUP: restarting the child"
                );
                c.forced.get_or_insert(Ending::Operator);
                let _ = process::kill_group(c.pidfd.pid(), libc::SIGTERM);
                c.kill_at.get_or_insert(now + stop_ns);
            }
        }
        if ready[1] || ready[2] {
            term.drain();
            int.drain();
            stopping = true;
            restart_at = None;
            match child.as_mut() {
                Some(c) => {
                    let _ = process::kill_group(c.pidfd.pid(), libc::SIGTERM);
                    c.kill_at.get_or_insert(now + stop_ns);
                }
                None => {
                    let pid = Pid::this();
                    let last = event(
                        EventKind::Removed,
                        Reason::Operator,
                        pid,
                        generation,
                        &governor,
                    );
                    on_event(&last);
                    return Ok(RunOutcome {
                        last,
                        status: ExitStatus::Exited(0),
                        generations: generation,
                        stopped: true,
                    });
                }
            }
        }
        if ready[3] {
            chld.drain();
            reap_orphans(child.as_ref().map(|c| c.pidfd.pid()));
        }
        if ready[4] {
            let mut buf = [0u8; 4096];
            while let Ok(n) = notify.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]);
                for line in msg.lines() {
                    if let Some(c) = child.as_mut() {
                        match line.trim() {
                            "WATCHDOG=1" => c.watchdog_deadline = watchdog_ns.map(|w| now + w),
                            "WATCHDOG=trigger" if c.forced.is_none() => {
                                c.forced = Some(Ending::Hung);
                                let _ = process::kill_group(c.pidfd.pid(), libc::SIGKILL);
                            }
                            "READY=1" => tracing::info!(
                                pid = c.pidfd.pid().as_raw(),
                                "run: child reports ready"
                            ),
                            _ => {}
                        }
                    }
                }
            }
        }
        let exited = match child.as_ref() {
            Some(c) if ready.get(5).copied().unwrap_or(false) => {
                c.pidfd.try_wait().map_err(setup("waitid"))?
            }
            _ => None,
        };
        let Some(status) = exited else { continue };
        let c = child.take().expect("exited implies a child");
        let pid = c.pidfd.pid();
        // Whatever the generation left behind in its group goes with it.
        let _ = process::kill_group(pid, libc::SIGKILL);
        reap_orphans(None);
        let ending = match (c.forced, status) {
            (Some(f), _) => f,
            (None, ExitStatus::Exited(code)) if Some(code) == cfg.request_exit_code => {
                Ending::Requested
            }
            (None, s) => Ending::Status(s),
        };
        if stopping {
            let last = event(
                EventKind::Removed,
                ending.into(),
                pid,
                generation,
                &governor,
            );
            on_event(&last);
            return Ok(RunOutcome {
                last,
                status,
                generations: generation,
                stopped: true,
            });
        }
        let lived = Duration::from_nanos(now.saturating_sub(c.started_ns));
        match governor.decide(ending, lived, now) {
            Decision::Restart { delay } => {
                if !delay.is_zero() {
                    tracing::info!(pid = pid.as_raw(), reason = %ending, ?delay, "run: restarting after backoff");
                }
                restart_at = Some((now + delay.as_nanos() as u64, ending));
            }
            d @ (Decision::Remove | Decision::GiveUp) => {
                let kind = if d == Decision::GiveUp {
                    EventKind::GaveUp
                } else {
                    EventKind::Removed
                };
                let last = event(kind, ending.into(), pid, generation, &governor);
                on_event(&last);
                return Ok(RunOutcome {
                    last,
                    status,
                    generations: generation,
                    stopped: false,
                });
            }
        }
    }
}

/// Reaps every ended child except `keep` (re-parented orphans of earlier generations).
fn reap_orphans(keep: Option<Pid>) {
    let Ok(children) = process::children_of(Pid::this()) else {
        return;
    };
    for pid in children.into_iter().filter(|p| Some(*p) != keep) {
        let _ = process::try_wait_pid(pid);
    }
}
