//! Taking a copy of another process's file descriptor (`pidfd_getfd`, 5.6+).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Duplicates fd number `target_fd` of the process behind `pidfd` into the caller (close-on-exec).
/// Needs ptrace-attach rights over that process (we are its parent and root).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes integers only and returns a new fd we then own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this fd for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// What the guard needs to rebuild a socket, read from a copy of the program's fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockInfo {
    /// AF_* family.
    pub domain: i32,
    /// SOCK_STREAM, SOCK_DGRAM, …
    pub sock_type: i32,
    /// Whether `listen` was called on it.
    pub listening: bool,
    /// Local address for IP sockets.
    pub local: Option<std::net::SocketAddr>,
}

/// Family, type, listening state and local address of a socket fd (ours, e.g. from
/// [`pidfd_getfd`]). Much cheaper than scanning /proc/net/tcp, whose cost grows with the
/// kernel's hash tables, not with the program's sockets.
pub fn socket_info(fd: BorrowedFd<'_>) -> io::Result<SockInfo> {
    use rustix::net::sockopt;
    let domain = i32::from(sockopt::socket_domain(fd)?.as_raw());
    let sock_type = sockopt::socket_type(fd)?.as_raw() as i32;
    let listening = sockopt::socket_acceptconn(fd).unwrap_or(false);
    let local = if domain == libc::AF_INET || domain == libc::AF_INET6 {
        let a = rustix::net::getsockname(fd)?;
        if domain == libc::AF_INET {
            std::net::SocketAddrV4::try_from(a)
                .ok()
                .map(std::net::SocketAddr::V4)
        } else {
            std::net::SocketAddrV6::try_from(a)
                .ok()
                .map(std::net::SocketAddr::V6)
        }
    } else {
        None
    };
    Ok(SockInfo {
        domain,
        sock_type,
        listening,
        local,
    })
}

/// Takes an exclusive, non-blocking `flock` on `file`: `Ok(false)` if another process holds
/// it. The lock lives as long as the file stays open.
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    use rustix::fs::{FlockOperation, flock};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
