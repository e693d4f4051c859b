//! Signals: names, dispositions, masks.

use std::io;

/// The conventional name of a signal number (`SIGSEGV`), or `SIG<n>` for unnamed ones.
pub fn name(sig: i32) -> String {
    let n = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("SIG{sig}"),
    };
    n.to_string()
}

/// Parses `SIGTERM`, `TERM`, `term` or `15`.
pub fn parse(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let up = s.to_ascii_uppercase();
    let full = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    (1..32).find(|&n| name(n) == full)
}

/// Sets `sig` to be ignored (SIG_IGN). A supervisor ignores SIGPIPE so a closed event reader
/// turns into EPIPE instead of killing it.
pub fn ignore(sig: i32) -> io::Result<()> {
    set_handler(sig, libc::SIG_IGN)
}

/// Restores the default disposition of `sig`.
pub fn default(sig: i32) -> io::Result<()> {
    set_handler(sig, libc::SIG_DFL)
}

fn set_handler(sig: i32, handler: libc::sighandler_t) -> io::Result<()> {
    // SAFETY: sigaction is zero-initialisable (a plain C struct); we fill the handler with
    // SIG_IGN or SIG_DFL, which are not function pointers we must keep alive, and pass valid
    // pointers to a local struct for the duration of the call.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Unblocks every signal for the calling thread (a freshly forked child must not inherit a
/// supervisor's blocked set).
pub fn unblock_all() -> io::Result<()> {
    // SAFETY: set is a local sigset_t initialised by sigemptyset before use; the old-set
    // pointer is null, which sigprocmask accepts.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
