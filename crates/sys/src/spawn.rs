//! Fast process spawning for supervisors: `clone(CLONE_VM | CLONE_VFORK)` + `execve`, the way
//! posix_spawn works, plus the two things posix_spawn cannot do: PR_SET_PDEATHSIG (the child
//! dies with its supervisor) and its own process group. `std::process::Command` falls back to a
//! full `fork()` (copying the parent's page tables) as soon as a `pre_exec` hook is needed for
//! the death signal; on a restart path that copy is pure waste.

use std::ffi::{CStr, CString};
use std::io;

use crate::Pid;

/// What to set up in the child between clone and exec.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Path of the program (already resolved; no PATH search here).
    pub path: CString,
    /// argv, argv[0] first.
    pub argv: Vec<CString>,
    /// The complete environment, `KEY=value`.
    pub envp: Vec<CString>,
    /// Put the child in a new process group of its own.
    pub new_process_group: bool,
    /// Signal the child gets when the spawning thread dies.
    pub parent_death_signal: Option<i32>,
}

struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    new_pgroup: bool,
    pdeathsig: i32,
    parent: libc::pid_t,
    old_mask: libc::sigset_t,
    err_fd: libc::c_int,
}

const STACK: usize = 64 * 1024;

/// Spawns `spec`. Returns once the child has exec'd (or failed to: then the exec error).
pub fn spawn(spec: &SpawnSpec) -> io::Result<Pid> {
    // Everything the child touches is prepared here, in the parent: the child may not allocate.
    let argv: Vec<*const libc::c_char> = spec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = spec
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let (err_rd, err_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let mut stack = vec![0u8; STACK];
    // SAFETY: sigset_t is a plain C bitmask; all-zero is a valid (empty) set, overwritten below.
    let old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut args = ChildArgs {
        path: spec.path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        new_pgroup: spec.new_process_group,
        pdeathsig: spec.parent_death_signal.unwrap_or(0),
        parent: Pid::this().as_raw(),
        old_mask,
        err_fd: std::os::fd::AsRawFd::as_raw_fd(&err_wr),
    };
    // SAFETY: all signals are blocked around clone so no handler of ours can run on the child's
    // stack in our shared address space before it has reset dispositions (child_main restores
    // the mask only after that). The child gets a stack it uses exclusively (16-byte aligned
    // top of a Vec we keep alive until clone returns: CLONE_VFORK suspends us until the child
    // has exec'd or exited), and a pointer to `args`, which also outlives that window. The
    // function it runs uses only raw syscalls on data prepared above.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut args.old_mask);
        let top = stack.as_mut_ptr().add(STACK) as usize & !15;
        let pid = libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        );
        let err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &args.old_mask, std::ptr::null_mut());
        if pid == -1 {
            return Err(err);
        }
        pid
    };
    drop(err_wr);
    drop(stack);
    // The child wrote its errno here iff exec failed (CLOEXEC closed the pipe on success).
    let mut buf = [0u8; 4];
    if let Ok(4) = rustix::io::read(&err_rd, &mut buf) {
        let pid = Pid::from_raw(pid).expect("clone returned a positive pid");
        let _ = crate::process::wait_pid(pid);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(Pid::from_raw(pid).expect("clone returned a positive pid"))
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's ChildArgs, alive while we run (CLONE_VFORK). Only raw
    // syscalls follow: libc wrappers that may set errno write into the suspended parent
    // thread's TLS, which the parent does not read before it resumes. Arguments to the
    // variadic syscall() are passed as c_long so no register carries garbage upper bits.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        // Handlers installed by the parent must not run here (shared memory); exec resets
        // them anyway, but signals are unblocked before exec.
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::syscall(
                libc::SYS_rt_sigaction,
                sig as libc::c_long,
                std::ptr::null::<libc::sigaction>(),
                &mut old as *mut libc::sigaction,
                8 as libc::c_long,
            ) == 0
                && old.sa_sigaction != libc::SIG_DFL
                && old.sa_sigaction != libc::SIG_IGN
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig as libc::c_long,
                    &dfl as *const libc::sigaction,
                    std::ptr::null_mut::<libc::sigaction>(),
                    8 as libc::c_long,
                );
            }
        }
        if a.new_pgroup {
            libc::syscall(libc::SYS_setpgid, 0 as libc::c_long, 0 as libc::c_long);
        }
        if a.pdeathsig != 0 {
            libc::syscall(
                libc::SYS_prctl,
                libc::PR_SET_PDEATHSIG as libc::c_long,
                a.pdeathsig as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
            );
            if libc::syscall(libc::SYS_getppid) != a.parent as libc::c_long {
                libc::syscall(libc::SYS_exit_group, 127 as libc::c_long);
            }
        }
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as libc::c_long,
            &a.old_mask as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            8 as libc::c_long,
        );
        let r = libc::syscall(libc::SYS_execve, a.path, a.argv, a.envp);
        // execve returned: report -r (the raw syscall returns -errno) and exit.
        let code: i32 = (-r) as i32;
        let bytes = code.to_ne_bytes();
        libc::syscall(
            libc::SYS_write,
            a.err_fd as libc::c_long,
            bytes.as_ptr(),
            4 as libc::c_long,
        );
        libc::syscall(libc::SYS_exit_group, 127 as libc::c_long);
        127
    }
}

/// Builds the `KEY=value` environment of the current process with `set` applied (replacing
/// keys of the same name) and `remove` dropped.
pub fn environment(set: &[(&str, &CStr)], remove: &[&str]) -> Vec<CString> {
    use std::os::unix::ffi::OsStrExt;
    let mut out: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.as_bytes();
            !set.iter().any(|(s, _)| s.as_bytes() == k) && !remove.iter().any(|r| r.as_bytes() == k)
        })
        .filter_map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            CString::new(b).ok()
        })
        .collect();
    for (k, v) in set {
        let mut b = k.as_bytes().to_vec();
        b.push(b'=');
        b.extend_from_slice(v.to_bytes());
        if let Ok(c) = CString::new(b) {
            out.push(c);
        }
    }
    out
}
