//! Processes: pids, fork, exit, kill, wait statuses, and the prctl knobs supervisors need.

use std::fmt;
use std::io;

/// A process id in the caller's pid namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(i32);

impl Pid {
    /// Wraps a raw pid. Returns `None` for values that are not process ids (≤ 0).
    pub fn from_raw(raw: i32) -> Option<Pid> {
        (raw > 0).then_some(Pid(raw))
    }
    /// The raw value, for logs, files and other processes.
    pub fn as_raw(self) -> i32 {
        self.0
    }
    /// The calling process.
    pub fn this() -> Pid {
        Pid(rustix::process::getpid().as_raw_nonzero().get())
    }
    /// The calling process's parent (0 is never returned for a live process outside pid 1).
    pub fn parent() -> Option<Pid> {
        rustix::process::getppid().map(|p| Pid(p.as_raw_nonzero().get()))
    }
    pub(crate) fn to_rustix(self) -> rustix::process::Pid {
        rustix::process::Pid::from_raw(self.0).expect("Pid holds a positive value by construction")
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which side of a fork we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    Parent(Pid),
    Child,
}

/// `fork(2)`.
///
/// The child is a copy of the caller with one thread. Memory safety holds in the child (every
/// page is copied), but locks held by other threads at fork time stay held forever: in a
/// multi-threaded caller the child should stick to raw syscalls and memory it owns until it
/// execs or exits. glibc's malloc is reset by its own atfork handlers, so allocation is safe.
pub fn fork() -> io::Result<Fork> {
    // SAFETY: fork has no memory-safety preconditions: the child receives a private copy of the
    // address space, so no Rust reference can alias memory another thread mutates. The
    // liveness caveat (locks held by vanished threads) is documented on this function.
    let r = unsafe { libc::fork() };
    match r {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(Pid(pid))),
    }
}

/// `_exit(2)`: end the process now, without atexit handlers or stdio flushing. The right exit
/// for a forked child that must not run the parent's cleanup a second time.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers and touches no memory of ours.
    let r = unsafe { libc::kill(pid.as_raw(), sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sig` to every process in the process group `pgid`.
pub fn kill_group(pgid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: as for kill; a negative pid addresses the group.
    let r = unsafe { libc::kill(-pgid.as_raw(), sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sig` to the calling process (a real, kernel-delivered signal: SIGSEGV from here
/// is indistinguishable to a supervisor from a hardware fault).
pub fn raise(sig: i32) -> io::Result<()> {
    // SAFETY: raise takes an integer; the default action may end the process, which is the point.
    let r = unsafe { libc::raise(sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How a child ended, decoded from a wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal; `core` if it dumped core.
    Signaled { signal: i32, core: bool },
}

impl ExitStatus {
    /// Decodes a `waitpid` status word.
    pub fn from_wait_status(status: i32) -> Option<ExitStatus> {
        if libc::WIFEXITED(status) {
            Some(ExitStatus::Exited(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(ExitStatus::Signaled {
                signal: libc::WTERMSIG(status),
                core: libc::WCOREDUMP(status),
            })
        } else {
            None
        }
    }
    /// The shell's view: exit code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled { signal, .. } => 128 + signal,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(c) => write!(f, "exit status {c}"),
            ExitStatus::Signaled { signal, core } => {
                write!(f, "killed by {}", crate::signal::name(signal))?;
                if core {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// Blocks until `pid` (a child of ours) ends, and reaps it.
pub fn wait_pid(pid: Pid) -> io::Result<ExitStatus> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid, writable i32 for the duration of the call.
        let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if let Some(s) = ExitStatus::from_wait_status(status) {
            return Ok(s);
        }
    }
}

/// Reaps `pid` if it has ended; `Ok(None)` while it runs.
pub fn try_wait_pid(pid: Pid) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: status is a valid, writable i32 for the duration of the call.
    let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::WNOHANG) };
    match r {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        _ => Ok(ExitStatus::from_wait_status(status)),
    }
}

/// Reaps any one ended child without blocking: `(pid, status)`, or `None` when none has ended.
/// `ECHILD` (no children at all) is also `None`.
pub fn try_wait_any() -> io::Result<Option<(Pid, ExitStatus)>> {
    let mut status = 0;
    // SAFETY: status is a valid, writable i32 for the duration of the call.
    let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    match r {
        -1 => {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ECHILD) {
                Ok(None)
            } else {
                Err(e)
            }
        }
        0 => Ok(None),
        pid => Ok(ExitStatus::from_wait_status(status).map(|s| (Pid(pid), s))),
    }
}

/// `prctl(PR_SET_PDEATHSIG)`: the kernel sends `sig` to the caller when the *thread* that
/// forked it exits. Callers that fork from a single-threaded process get "when my parent dies".
pub fn set_parent_death_signal(sig: i32) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes an integer signal number and no pointers.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `prctl(PR_SET_CHILD_SUBREAPER)`: orphaned descendants are re-parented to the caller, so a
/// supervisor can reap (and account for) everything its service forks.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and no pointers.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets RLIMIT_CORE to 0 for the caller: crash tests and benchmarks must not write core files.
pub fn disable_core_dumps() -> io::Result<()> {
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: None,
        },
    )
    .or_else(|_| {
        rustix::process::setrlimit(
            rustix::process::Resource::Core,
            rustix::process::Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        )
    })
    .map_err(io::Error::from)
}

/// Makes the parent-death signal also apply to a command spawned through `std::process`:
/// the spawned program gets `sig` when the spawning thread exits.
pub fn command_parent_death_signal(cmd: &mut std::process::Command, sig: i32) {
    use std::os::unix::process::CommandExt;
    let parent = Pid::this();
    // SAFETY: the closure runs between fork and exec in the child; it makes only raw
    // async-signal-safe syscalls (prctl, getppid, kill) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect: then nobody would send sig.
            if libc::getppid() != parent.as_raw() {
                libc::kill(libc::getpid(), sig);
            }
            Ok(())
        });
    }
}

/// All pids that are direct children of `pid`, from /proc (threads' children included).
pub fn children_of(pid: Pid) -> io::Result<Vec<Pid>> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(dir)? {
        let task = task?;
        let path = task.path().join("children");
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse().ok())
                .filter_map(Pid::from_raw),
        );
    }
    Ok(out)
}

/// Sets the calling thread's name (`comm`, 15 bytes max, longer names are cut), so helper
/// processes such as an rfork keeper are recognisable in `ps`.
pub fn set_name(name: &str) -> io::Result<()> {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: buf is a NUL-terminated 16-byte buffer (at most 15 name bytes, zero-filled), the
    // size PR_SET_NAME reads; it lives for the duration of the call.
    let r = unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Stack size of an [`spawn_mm_anchor`] process: it runs one function that makes raw syscalls.
const ANCHOR_STACK: usize = 64 * 1024;

/// Clones an *mm anchor*: a process that shares the caller's address space (`CLONE_VM`), has
/// every signal blocked, and sleeps until SIGKILLed. While it lives, the caller's exit only
/// drops a reference on the address space instead of tearing it down, so the caller's death is
/// reported (pidfd readable, wait returns) without waiting for the kernel to free its page
/// tables: for a 256 MB process that teardown takes milliseconds. Whoever kills the anchor
/// later pays the teardown, off the critical path.
///
/// The anchor is created with `CLONE_PARENT`: it is a child of the caller's *parent*, which
/// must reap it, and never appears among the caller's own children (a program's `wait(-1)`
/// cannot see it). Returns the anchor's pid.
///
/// Costs: one 64 KiB stack mapping in the caller's address space, never unmapped (the anchor
/// may still be using it when the caller is gone).
pub fn spawn_mm_anchor() -> io::Result<Pid> {
    extern "C" fn anchor_main(expected_parent: *mut libc::c_void) -> libc::c_int {
        // Runs on its own stack in the shared address space, with the cloning thread's TLS
        // pointer: it must not touch TLS (errno) or memory, so raw syscalls whose failure needs
        // no errno are all it does. Signals are blocked (inherited mask), so pause() never
        // returns; SIGKILL (from the parent, or PR_SET_PDEATHSIG) ends it.
        // SAFETY: plain integer syscalls. Arguments are passed as c_long: syscall(2) is variadic
        // and the kernel reads full 64-bit registers, so 32-bit ints could carry garbage.
        unsafe {
            let pdeathsig: libc::c_long = libc::PR_SET_PDEATHSIG as libc::c_long;
            libc::syscall(
                libc::SYS_prctl,
                pdeathsig,
                libc::SIGKILL as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
            );
            // The parent may have died before prctl took effect: then nobody would kill us.
            if libc::syscall(libc::SYS_getppid) != expected_parent as libc::c_long {
                libc::syscall(libc::SYS_exit, 0 as libc::c_long);
            }
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }
    // SAFETY: a fresh private anonymous mapping aliases nothing; checked before use.
    let stack = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            ANCHOR_STACK,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
        )
    }?;
    // SAFETY: `all` and `old` are local sigset_t values initialised by sigfillset/written by
    // pthread_sigmask before use; blocking everything around clone means the anchor starts
    // with every signal blocked and can never run one of our handlers on its stack. The clone
    // call gets a valid function pointer, the top of a stack mapping it may use exclusively
    // (16-byte aligned: page-aligned base + 64 KiB), and no argument pointer. CLONE_VM
    // without CLONE_SETTLS shares our TLS pointer, which anchor_main never dereferences.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let top = stack.cast::<u8>().add(ANCHOR_STACK).cast::<libc::c_void>();
        // The anchor's parent is our parent (CLONE_PARENT); it checks that against this value.
        let parent = libc::getppid() as usize as *mut libc::c_void;
        let pid = libc::clone(
            anchor_main,
            top,
            libc::CLONE_VM | libc::CLONE_PARENT,
            parent,
        );
        let err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid == -1 {
            let _ = rustix::mm::munmap(stack, ANCHOR_STACK);
            return Err(err);
        }
        Ok(Pid(pid))
    }
}

/// The process group of `pid` (`getpgid(2)`), `None` if the process is gone.
pub fn pgid_of(pid: Pid) -> Option<Pid> {
    // SAFETY: getpgid takes a plain integer and touches no memory of ours.
    let g = unsafe { libc::getpgid(pid.as_raw()) };
    Pid::from_raw(g)
}
