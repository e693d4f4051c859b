//! ptrace, as a typestate: a [`Tracee<Running>`] can only be interrupted or detached; only a
//! [`Tracee<Stopped>`] exposes registers, injected syscalls and options. Seize-based
//! (`PTRACE_SEIZE`), so stopping never sends a visible SIGSTOP.
//!
//! Injected syscalls run on a `syscall` instruction whose address the caller supplies
//! (found in the vDSO, or written into a scratch page) between two syscall-stops.

use std::io;
use std::marker::PhantomData;

use crate::process::Pid;

/// `PTRACE_O_SUSPEND_SECCOMP`: seccomp filters of the tracee are not applied while set.
pub const O_SUSPEND_SECCOMP: u32 = 1 << 21;
/// `PTRACE_O_TRACESYSGOOD`: syscall-stops report SIGTRAP|0x80.
pub const O_TRACESYSGOOD: u32 = libc::PTRACE_O_TRACESYSGOOD as u32;
/// `PTRACE_O_TRACECLONE`: threads the tracee creates are traced too, starting stopped.
pub const O_TRACECLONE: u32 = libc::PTRACE_O_TRACECLONE as u32;
/// `PTRACE_O_TRACEFORK`: processes the tracee forks (clone with `SIGCHLD` as exit signal,
/// fork, clone3) are traced too, starting stopped.
pub const O_TRACEFORK: u32 = libc::PTRACE_O_TRACEFORK as u32;
/// `PTRACE_O_EXITKILL`: the tracee is SIGKILLed if the tracer exits (restore in progress).
pub const O_EXITKILL: u32 = libc::PTRACE_O_EXITKILL as u32;

const PTRACE_EVENT_STOP: i32 = 128;

/// Kernel-internal "restart me" return values a stopped thread may show in rax.
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// General-purpose registers (`struct user_regs_struct`).
pub type Regs = libc::user_regs_struct;

/// Typestate: the tracee runs.
#[derive(Debug)]
pub struct Running;
/// Typestate: the tracee sits in a ptrace-stop and may be inspected.
#[derive(Debug)]
pub struct Stopped;

/// A seized thread.
#[derive(Debug)]
pub struct Tracee<S> {
    pid: Pid,
    /// Signals that arrived while we drove the thread; handed back when it resumes.
    pending: Vec<i32>,
    _s: PhantomData<S>,
}

/// The tracee ended while we waited on it (its wait status is consumed by that wait).
#[derive(Debug, Clone, Copy)]
pub struct TraceeEnded {
    pub pid: Pid,
    /// How it ended.
    pub status: crate::process::ExitStatus,
}

impl std::fmt::Display for TraceeEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "traced process {} ended ({}) while stopped",
            self.pid, self.status
        )
    }
}

impl std::error::Error for TraceeEnded {}

/// If `e` says the tracee ended under us, how it ended.
pub fn ended(e: &io::Error) -> Option<crate::process::ExitStatus> {
    e.get_ref()?.downcast_ref::<TraceeEnded>().map(|t| t.status)
}

fn gone(pid: Pid, status: i32) -> io::Error {
    match crate::process::ExitStatus::from_wait_status(status) {
        Some(status) => io::Error::other(TraceeEnded { pid, status }),
        None => io::Error::from_raw_os_error(libc::ESRCH),
    }
}

fn ptrace(req: libc::c_uint, pid: Pid, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every request used in this module passes either integers or a pointer to a
    // live, correctly sized buffer owned by the caller (see each call site).
    let r = unsafe { libc::ptrace(req, pid.as_raw(), addr, data) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error().unwrap_or(0) != 0 {
            return Err(e);
        }
    }
    Ok(r)
}

fn waitpid_all(pid: Pid) -> io::Result<i32> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid writable i32.
        let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::__WALL) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(status);
    }
}

/// Attaches to `pid` with `PTRACE_SEIZE` and `options`. The thread keeps running.
pub fn seize(pid: Pid, options: u32) -> io::Result<Tracee<Running>> {
    ptrace(libc::PTRACE_SEIZE, pid, 0, options as usize)?;
    Ok(Tracee {
        pid,
        pending: Vec::new(),
        _s: PhantomData,
    })
}

impl<S> Tracee<S> {
    /// The traced thread.
    pub fn pid(&self) -> Pid {
        self.pid
    }
}

/// Takes over a thread that was auto-attached (`O_TRACECLONE`) when a tracee created it: waits
/// for its initial stop.
pub fn adopt_new_thread(tid: Pid) -> io::Result<Tracee<Stopped>> {
    loop {
        let st = waitpid_all(tid)?;
        if !libc::WIFSTOPPED(st) {
            return Err(gone(tid, st));
        }
        if st >> 16 == PTRACE_EVENT_STOP || libc::WSTOPSIG(st) == libc::SIGSTOP {
            return Ok(Tracee {
                pid: tid,
                pending: Vec::new(),
                _s: PhantomData,
            });
        }
        ptrace(libc::PTRACE_CONT, tid, 0, 0)?;
    }
}

/// `tgkill(tgid, tid, sig)`: a signal for one thread.
pub fn tgkill(tgid: Pid, tid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: tgkill takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid.as_raw(), tid.as_raw(), sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `get_robust_list(tid)`: the thread's robust futex list `(head, len)` (futexes the kernel
/// releases when the thread dies).
pub fn robust_list(tid: Pid) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: head and len are valid writable words for the kernel to fill.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut u64,
        )
    };
    if r == 0 {
        Ok((head, len))
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Tracee<Running> {
    /// `PTRACE_INTERRUPT` and wait for the resulting stop. Signal-delivery-stops seen on the
    /// way are remembered and re-delivered on resume, so the program loses no signal.
    pub fn interrupt(mut self) -> io::Result<Tracee<Stopped>> {
        ptrace(libc::PTRACE_INTERRUPT, self.pid, 0, 0)?;
        loop {
            let st = waitpid_all(self.pid)?;
            if !libc::WIFSTOPPED(st) {
                return Err(gone(self.pid, st));
            }
            if st >> 16 == PTRACE_EVENT_STOP {
                return Ok(Tracee {
                    pid: self.pid,
                    pending: self.pending,
                    _s: PhantomData,
                });
            }
            let sig = libc::WSTOPSIG(st);
            if sig != libc::SIGTRAP && sig != (libc::SIGTRAP | 0x80) {
                self.pending.push(sig);
            }
            ptrace(libc::PTRACE_CONT, self.pid, 0, 0)?;
        }
    }
}

impl Tracee<Stopped> {
    /// Reads the general-purpose registers.
    pub fn regs(&self) -> io::Result<Regs> {
        // SAFETY: user_regs_struct is plain old data; zeroed is valid.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        ptrace(
            libc::PTRACE_GETREGS,
            self.pid,
            0,
            &mut r as *mut Regs as usize,
        )?;
        Ok(r)
    }
    /// Writes the general-purpose registers.
    pub fn set_regs(&mut self, r: &Regs) -> io::Result<()> {
        ptrace(libc::PTRACE_SETREGS, self.pid, 0, r as *const Regs as usize)?;
        Ok(())
    }
    /// The extended FPU/vector state (`NT_X86_XSTATE`), as the kernel's xsave bytes.
    pub fn xstate(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 16384];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // NT_X86_XSTATE = 0x202; the kernel shrinks iov_len to what it wrote.
        ptrace(
            libc::PTRACE_GETREGSET,
            self.pid,
            0x202,
            &mut iov as *mut libc::iovec as usize,
        )?;
        buf.truncate(iov.iov_len);
        Ok(buf)
    }
    /// Writes back state from [`Tracee::xstate`] (same CPU features required).
    pub fn set_xstate(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut buf = bytes.to_vec();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        ptrace(
            libc::PTRACE_SETREGSET,
            self.pid,
            0x202,
            &mut iov as *mut libc::iovec as usize,
        )?;
        Ok(())
    }
    /// The blocked-signal mask (`PTRACE_GETSIGMASK`).
    pub fn sigmask(&self) -> io::Result<u64> {
        let mut m: u64 = 0;
        ptrace(0x420a, self.pid, 8, &mut m as *mut u64 as usize)?;
        Ok(m)
    }
    /// Sets the blocked-signal mask (`PTRACE_SETSIGMASK`).
    pub fn set_sigmask(&mut self, m: u64) -> io::Result<()> {
        ptrace(0x420b, self.pid, 8, &m as *const u64 as usize)?;
        Ok(())
    }
    /// The thread's rseq registration: `(abi pointer, length, signature)`, or None.
    pub fn rseq(&self) -> io::Result<Option<(u64, u32, u32)>> {
        #[repr(C)]
        #[derive(Default)]
        struct RseqConf {
            ptr: u64,
            len: u32,
            sig: u32,
            flags: u32,
            pad: u32,
        }
        let mut c = RseqConf::default();
        ptrace(
            libc::PTRACE_GET_RSEQ_CONFIGURATION,
            self.pid,
            std::mem::size_of::<RseqConf>(),
            &mut c as *mut RseqConf as usize,
        )?;
        Ok((c.ptr != 0).then_some((c.ptr, c.len, c.sig)))
    }
    /// `PTRACE_SETOPTIONS`.
    pub fn set_options(&mut self, options: u32) -> io::Result<()> {
        ptrace(libc::PTRACE_SETOPTIONS, self.pid, 0, options as usize)?;
        Ok(())
    }

    /// Runs syscall `nr(args)` in the tracee from the `syscall` instruction at `insn`, and
    /// returns its raw result (negative errno on failure). Clobbers registers: the caller
    /// saves them first and puts them back with [`Tracee::restore_regs`].
    pub fn inject_syscall(&mut self, insn: u64, nr: i64, args: [u64; 6]) -> io::Result<i64> {
        let mut r = self.regs()?;
        r.rip = insn;
        r.rax = nr as u64;
        // orig_rax = -1: the kernel must not apply its syscall-restart fix-up to our rip.
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        self.set_regs(&r)?;
        // Two syscall-stops: entry, then exit with the result in rax.
        for _ in 0..2 {
            ptrace(libc::PTRACE_SYSCALL, self.pid, 0, 0)?;
            loop {
                let st = waitpid_all(self.pid)?;
                if !libc::WIFSTOPPED(st) {
                    return Err(gone(self.pid, st));
                }
                let sig = libc::WSTOPSIG(st);
                if sig == (libc::SIGTRAP | 0x80) {
                    break;
                }
                if st >> 16 == 0 && sig != libc::SIGTRAP {
                    self.pending.push(sig);
                }
                ptrace(libc::PTRACE_SYSCALL, self.pid, 0, 0)?;
            }
        }
        Ok(self.regs()?.rax as i64)
    }

    /// Puts back registers saved before injecting syscalls. If the thread had been stopped
    /// inside an interrupted syscall, does the kernel's restart fix-up ourselves (our
    /// injections consumed the kernel's chance to do it).
    pub fn restore_regs(&mut self, saved: &Regs) -> io::Result<()> {
        let r = restart_fixup(saved, false);
        self.set_regs(&r)
    }

    /// Signals that arrived while stopped and must be re-delivered.
    pub fn take_pending_signals(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.pending)
    }

    /// Resumes the thread and ends tracing. Signals held back while we drove it are queued
    /// on it again first (`tkill` while it is still stopped), so it takes them as soon as it
    /// runs, before anything else — as it would have without us. (Passing one to the detach
    /// itself is not reliable from an event stop, and sending them after the detach lands them
    /// at a random later point, e.g. inside a call waiting for the guard, which a handler
    /// without `SA_RESTART` then turns into EINTR.)
    pub fn detach(mut self) -> io::Result<Pid> {
        for s in std::mem::take(&mut self.pending) {
            // SAFETY: tkill takes integers only.
            let _ = unsafe { libc::syscall(libc::SYS_tkill, self.pid.as_raw(), s) };
        }
        ptrace(libc::PTRACE_DETACH, self.pid, 0, 0)?;
        Ok(self.pid)
    }
}

/// Turns the registers of a thread stopped inside an interrupted syscall into registers that
/// re-execute the call when resumed (rip back over `syscall`, rax = number). With
/// `fresh_process`, a `restart_syscall` continuation (which needs kernel state a new process
/// does not have) is replaced by the original call with its original arguments.
pub fn restart_fixup(r: &Regs, fresh_process: bool) -> Regs {
    let mut r = *r;
    let orig = r.orig_rax as i64;
    if orig >= 0 {
        let ax = -(r.rax as i64);
        match ax {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            ERESTART_RESTARTBLOCK => {
                r.rax = if fresh_process {
                    r.orig_rax
                } else {
                    libc::SYS_restart_syscall as u64
                };
                r.rip -= 2;
            }
            _ => {}
        }
        r.orig_rax = u64::MAX;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_fixup_re_executes_interrupted_calls() {
        // SAFETY: user_regs_struct is plain old data; zeroed is valid.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.orig_rax = libc::SYS_read as u64;
        r.rip = 0x1002;
        r.rax = (-ERESTARTSYS) as u64;
        let f = restart_fixup(&r, false);
        assert_eq!(
            (f.rax, f.rip, f.orig_rax),
            (libc::SYS_read as u64, 0x1000, u64::MAX)
        );
        r.orig_rax = libc::SYS_nanosleep as u64;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        assert_eq!(
            restart_fixup(&r, false).rax,
            libc::SYS_restart_syscall as u64
        );
        assert_eq!(
            restart_fixup(&r, true).rax,
            libc::SYS_nanosleep as u64,
            "a new process re-issues the call"
        );
        r.rax = 5; // completed call: untouched
        assert_eq!(restart_fixup(&r, true).rip, 0x1002);
    }

    #[test]
    fn seize_interrupt_inject_detach() {
        let mut fds = [0i32; 2];
        // SAFETY: fds is a writable [i32; 2].
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        match crate::process::fork().unwrap() {
            crate::process::Fork::Child => {
                let mut b = [0u8; 1];
                // SAFETY: blocks reading one byte into a live buffer; then exits with it.
                let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
                crate::process::exit_now(if n == 1 { i32::from(b[0]) } else { 99 });
            }
            crate::process::Fork::Parent(pid) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let t = seize(pid, O_TRACESYSGOOD | O_EXITKILL).unwrap();
                let mut t = t.interrupt().unwrap();
                let saved = t.regs().unwrap();
                assert_eq!(saved.orig_rax as i64, libc::SYS_read, "stopped inside read");
                let insn = crate::remote_mem::find_syscall_insn(pid).unwrap();
                let got = t.inject_syscall(insn, libc::SYS_getpid, [0; 6]).unwrap();
                assert_eq!(got, i64::from(pid.as_raw()));
                t.restore_regs(&saved).unwrap();
                t.detach().unwrap();
                // SAFETY: writes one byte from a live buffer.
                assert_eq!(unsafe { libc::write(fds[1], [7u8].as_ptr().cast(), 1) }, 1);
                assert_eq!(
                    crate::process::wait_pid(pid).unwrap(),
                    crate::process::ExitStatus::Exited(7)
                );
            }
        }
    }
}
