//! The netlink process-events connector (`NETLINK_CONNECTOR`, `CN_IDX_PROC`): one datagram per
//! fork, exec or exit anywhere on the machine, so a monitor can keep a task table and count fork
//! rates without scanning /proc. Needs CAP_NET_ADMIN.
//!
//! Wire layout (`include/uapi/linux/{netlink,connector,cn_proc}.h`): `nlmsghdr` (16 bytes),
//! `cn_msg` (20 bytes), then a `proc_event` whose `what` word is at byte 36 of the datagram and
//! whose per-kind data starts at byte 52. Everything is native-endian. Parsing is plain safe
//! code over a byte buffer; the socket calls go through rustix.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink};

use crate::process::Pid;

const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_CN_MCAST_IGNORE: u32 = 2;

const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// One process event, reduced to what a monitor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// A task was created: a process (`child_tid == child_tgid`) or a thread.
    Fork {
        parent_tgid: Pid,
        child_tid: Pid,
        child_tgid: Pid,
    },
    /// A task called execve.
    Exec { tid: Pid, tgid: Pid },
    /// A task ended.
    Exit { tid: Pid, tgid: Pid, exit_code: u32 },
    /// The kernel's acknowledgement of our subscription, or a kind we do not decode.
    Other,
}

/// A subscribed proc-connector socket. Non-blocking; poll it for readability.
#[derive(Debug)]
pub struct ProcConnector {
    fd: OwnedFd,
}

impl ProcConnector {
    /// Opens the socket, sets a receive buffer of `rcvbuf` bytes (forced past `rmem_max` when
    /// CAP_NET_ADMIN allows, since a burst of forks must not overflow it), and subscribes to
    /// fork and exit events, plus exec when `exec` is set (kernels ≥ 6.6 filter the rest in the
    /// kernel; older ones send everything and [`ProcEvent::Other`] absorbs it).
    pub fn open(rcvbuf: usize, exec: bool) -> io::Result<ProcConnector> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(netlink::CONNECTOR),
        )?;
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&fd, rcvbuf).is_err() {
            rustix::net::sockopt::set_socket_recv_buffer_size(&fd, rcvbuf)?;
        }
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, CN_IDX_PROC))?;
        let pc = ProcConnector { fd };
        let exec = if exec { PROC_EVENT_EXEC } else { 0 };
        pc.control(
            PROC_CN_MCAST_LISTEN,
            PROC_EVENT_FORK | PROC_EVENT_EXIT | exec,
        )?;
        Ok(pc)
    }

    fn control(&self, op: u32, mask: u32) -> io::Result<()> {
        // struct proc_input { u32 mcast_op; u32 event_type; }
        let payload_len = 8usize;
        let total = NLMSG_HDRLEN + CN_MSG_LEN + payload_len;
        let mut msg = Vec::with_capacity(total);
        msg.extend_from_slice(&(total as u32).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&(payload_len as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&op.to_ne_bytes());
        msg.extend_from_slice(&mask.to_ne_bytes());
        rustix::net::sendto(
            &self.fd,
            &msg,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        Ok(())
    }

    /// Receives one datagram into `buf` and decodes it. `Ok(None)` when nothing is queued.
    /// `Err` with `ENOBUFS` means the kernel dropped events because we fell behind: the caller
    /// should treat its task table as stale and rescan.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<ProcEvent>> {
        match rustix::net::recv(&self.fd, &mut *buf, RecvFlags::DONTWAIT) {
            Ok((n, _)) => Ok(Some(parse(&buf[..n.min(buf.len())]))),
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for ProcConnector {
    fn drop(&mut self) {
        // Unsubscribing lets the kernel stop building events once the last listener leaves;
        // closing the socket alone does that too on current kernels, so a failure is harmless.
        let _ = self.control(PROC_CN_MCAST_IGNORE, 0);
    }
}

impl AsFd for ProcConnector {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn word(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn pid_at(b: &[u8], off: usize) -> Option<Pid> {
    word(b, off).and_then(|w| Pid::from_raw(w as i32))
}

/// Decodes one proc-connector datagram. Short or unknown messages become [`ProcEvent::Other`].
pub fn parse(b: &[u8]) -> ProcEvent {
    const WHAT: usize = NLMSG_HDRLEN + CN_MSG_LEN;
    const DATA: usize = WHAT + 16;
    let decoded = (|| {
        let what = word(b, WHAT)?;
        Some(match what {
            PROC_EVENT_FORK => ProcEvent::Fork {
                parent_tgid: pid_at(b, DATA + 4)?,
                child_tid: pid_at(b, DATA + 8)?,
                child_tgid: pid_at(b, DATA + 12)?,
            },
            PROC_EVENT_EXEC => ProcEvent::Exec {
                tid: pid_at(b, DATA)?,
                tgid: pid_at(b, DATA + 4)?,
            },
            PROC_EVENT_EXIT => ProcEvent::Exit {
                tid: pid_at(b, DATA)?,
                tgid: pid_at(b, DATA + 4)?,
                exit_code: word(b, DATA + 8)?,
            },
            _ => ProcEvent::Other,
        })
    })();
    decoded.unwrap_or(ProcEvent::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(what: u32, data: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 36];
        b.extend_from_slice(&what.to_ne_bytes());
        b.extend_from_slice(&[0u8; 12]); // cpu + timestamp
        for w in data {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b
    }

    #[test]
    fn parses_fork_exit_and_rejects_short() {
        let f = datagram(PROC_EVENT_FORK, &[10, 10, 11, 11]);
        assert_eq!(
            parse(&f),
            ProcEvent::Fork {
                parent_tgid: Pid::from_raw(10).unwrap(),
                child_tid: Pid::from_raw(11).unwrap(),
                child_tgid: Pid::from_raw(11).unwrap()
            }
        );
        let e = datagram(PROC_EVENT_EXIT, &[12, 11, 9, 17, 10, 10]);
        assert!(matches!(parse(&e), ProcEvent::Exit { exit_code: 9, .. }));
        assert_eq!(parse(&f[..50]), ProcEvent::Other);
        assert_eq!(parse(&datagram(0x200, &[1, 2, 3, 4])), ProcEvent::Other);
    }

    #[test]
    fn live_socket_sees_our_own_fork() {
        let pc = ProcConnector::open(1 << 20, false)
            .expect("proc connector (needs root: CAP_NET_ADMIN)");
        let child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let child_pid = child.id() as i32;
        let mut child = child;
        child.wait().expect("wait");
        let mut buf = vec![0u8; 4096];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = false;
        while std::time::Instant::now() < deadline && !seen {
            crate::pidfd::wait_readable(pc.as_fd(), Some(std::time::Duration::from_millis(100)))
                .unwrap();
            while let Some(ev) = pc.recv(&mut buf).unwrap_or(None) {
                if let ProcEvent::Fork { child_tgid, .. } = ev {
                    seen |= child_tgid.as_raw() == child_pid;
                }
            }
        }
        assert!(seen, "no FORK event for our child {child_pid}");
    }
}
