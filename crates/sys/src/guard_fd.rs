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

/// The bytes buffered in a pipe, read without consuming them (`tee` into a private pipe),
/// and the pipe's capacity. `read_end` is our copy of the program's read end.
pub fn pipe_peek(read_end: BorrowedFd<'_>) -> io::Result<(Vec<u8>, usize)> {
    // SAFETY: fcntl with F_GETPIPE_SZ takes no pointer.
    let cap = unsafe { libc::fcntl(read_end.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(io::Error::last_os_error());
    }
    let (r, w) = crate::ns::pipe_cloexec()?;
    // SAFETY: as above; growing our private pipe to hold everything the program's can.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, cap) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tee takes two fds, a length and flags; no memory of ours is touched.
    let n = unsafe {
        libc::tee(
            read_end.as_raw_fd(),
            w.as_raw_fd(),
            cap as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok((Vec::new(), cap as usize));
        }
        return Err(e);
    }
    let mut data = vec![0u8; n as usize];
    let mut got = 0usize;
    while got < data.len() {
        // SAFETY: reads into the unfilled tail of `data`.
        let k = unsafe {
            libc::read(
                r.as_raw_fd(),
                data[got..].as_mut_ptr().cast(),
                data.len() - got,
            )
        };
        if k <= 0 {
            return Err(io::Error::last_os_error());
        }
        got += k as usize;
    }
    Ok((data, cap as usize))
}

/// Puts `data` back into a pipe through our copy of its write end, first giving the pipe at
/// least `capacity` bytes of room.
pub fn pipe_fill(write_end: BorrowedFd<'_>, data: &[u8], capacity: usize) -> io::Result<()> {
    if capacity > 0 {
        // SAFETY: fcntl F_SETPIPE_SZ takes an integer.
        let r = unsafe {
            libc::fcntl(
                write_end.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                capacity as libc::c_int,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut done = 0usize;
    while done < data.len() {
        // SAFETY: writes from the unsent tail of `data`.
        let k = unsafe {
            libc::write(
                write_end.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
            )
        };
        if k <= 0 {
            return Err(io::Error::last_os_error());
        }
        done += k as usize;
    }
    Ok(())
}

const KCMP_FILE: i32 = 0;
const KCMP_VM: i32 = 1;

fn kcmp(pid1: crate::Pid, pid2: crate::Pid, kind: i32, a: u64, b: u64) -> io::Result<i64> {
    // SAFETY: kcmp takes integers only and reads nothing from our memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1.as_raw(),
            pid2.as_raw(),
            kind,
            a as libc::c_ulong,
            b as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i64)
}

/// Whether fd `fd1` of `pid1` and fd `fd2` of `pid2` are the same open file description
/// (`kcmp(KCMP_FILE)`: what fork and dup share). Needs ptrace-read rights over both.
pub fn same_file(pid1: crate::Pid, fd1: i32, pid2: crate::Pid, fd2: i32) -> io::Result<bool> {
    Ok(kcmp(pid1, pid2, KCMP_FILE, fd1 as u64, fd2 as u64)? == 0)
}

/// Whether two processes share one address space (`kcmp(KCMP_VM)`: a vfork child before
/// its exec, or a `CLONE_VM` child).
pub fn same_mm(pid1: crate::Pid, pid2: crate::Pid) -> io::Result<bool> {
    Ok(kcmp(pid1, pid2, KCMP_VM, 0, 0)? == 0)
}

/// Whether every other end of a pipe is closed: no writer is left for a read end (POLLHUP),
/// no reader for a write end (POLLERR). `end` is a copy of one end (see [`pidfd_getfd`]).
pub fn pipe_peer_closed(end: BorrowedFd<'_>, write_end: bool) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: end.as_raw_fd(),
        events: if write_end {
            libc::POLLOUT
        } else {
            libc::POLLIN
        },
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let bit = if write_end {
        libc::POLLERR
    } else {
        libc::POLLHUP
    };
    Ok(p.revents & bit != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kcmp_tells_shared_descriptions_and_address_spaces_apart() {
        let me = crate::Pid::this();
        let a = std::fs::File::open("/proc/self/stat").unwrap();
        let dup = a.try_clone().unwrap();
        let other = std::fs::File::open("/proc/self/stat").unwrap();
        let (a, dup, other) = (a.as_raw_fd(), dup.as_raw_fd(), other.as_raw_fd());
        assert!(
            same_file(me, a, me, dup).unwrap(),
            "dup shares the description"
        );
        assert!(
            !same_file(me, a, me, other).unwrap(),
            "a second open does not"
        );
        assert!(same_mm(me, me).unwrap());
        assert!(same_file(me, a, me, 9999).is_err(), "no such fd");
    }

    #[test]
    fn pipe_peer_closed_sees_the_other_end_go() {
        let (r, w) = crate::ns::pipe_cloexec().unwrap();
        use std::os::fd::AsFd;
        assert!(!pipe_peer_closed(r.as_fd(), false).unwrap());
        assert!(!pipe_peer_closed(w.as_fd(), true).unwrap());
        let w2 = w.try_clone().unwrap();
        drop(w);
        assert!(
            !pipe_peer_closed(r.as_fd(), false).unwrap(),
            "a copy still writes"
        );
        drop(w2);
        assert!(pipe_peer_closed(r.as_fd(), false).unwrap());
        let (r, w) = crate::ns::pipe_cloexec().unwrap();
        drop(r);
        assert!(pipe_peer_closed(w.as_fd(), true).unwrap());
    }
}
