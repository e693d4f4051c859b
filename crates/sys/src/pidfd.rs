//! pidfds: race-free handles on processes, pollable for exit.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::process::{PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal};

use crate::process::{ExitStatus, Pid};

/// An owned pidfd. Becomes readable (POLLIN) when the process ends; signals sent through it
/// can never hit a recycled pid.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: Pid,
}

impl PidFd {
    /// `pidfd_open(pid)`. Race-free for our own unreaped children.
    pub fn open(pid: Pid) -> io::Result<PidFd> {
        let fd = pidfd_open(pid.to_rustix(), PidfdFlags::empty())?;
        Ok(PidFd { fd, pid })
    }
    /// The pid this handle names.
    pub fn pid(&self) -> Pid {
        self.pid
    }
    /// Sends `sig` to the process (never to a recycled pid).
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        let sig = Signal::from_named_raw(sig)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a named signal"))?;
        pidfd_send_signal(&self.fd, sig).map_err(io::Error::from)
    }
    /// Reaps the process if it has ended (it must be our child); `Ok(None)` while it runs.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        let st = rustix::process::waitid(
            WaitId::PidFd(self.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        )?;
        Ok(st.and_then(|s| {
            if let Some(sig) = s.terminating_signal() {
                Some(ExitStatus::Signaled {
                    signal: sig,
                    core: s.dumped(),
                })
            } else {
                s.exit_status().map(ExitStatus::Exited)
            }
        }))
    }
    /// Blocks until the process ends and reaps it.
    pub fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            crate::pidfd::wait_readable(self.fd.as_fd(), None)?;
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
        }
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Polls one fd for readability; `timeout` None waits forever. Returns whether it is readable.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<std::time::Duration>) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let ts = timeout.map(|t| Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
