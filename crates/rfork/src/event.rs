//! Events the supervisor reports to the parent: one fixed-size record per event on a pipe.
//!
//! The channel is a `SOCK_SEQPACKET` socket pair: one `send(2)` is one record, message boundaries
//! are kept, and the keeper writes with `MSG_NOSIGNAL` so a parent that closed its end cannot
//! kill it with SIGPIPE (and the keeper never has to change a signal disposition that the
//! workers it forks would inherit). The record is 32 bytes and its layout
//! is part of the C ABI (`struct rfork_event` in `rfork.h`): a C parent can `read()` the fd.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `0x4b524656` ("VFRK" little-endian) |
//! | 4 | 1 | kind (`EventKind`) |
//! | 5 | 1 | reason (`ReasonCode`) |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | reason value: exit code or signal number |
//! | 12 | 4 | pid of the worker the event is about |
//! | 16 | 4 | generation (1 = first worker) |
//! | 20 | 4 | restarts inside the current intensity window |
//! | 24 | 8 | CLOCK_MONOTONIC ns when the supervisor saw it |

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use sys::Pid;
use sys::process::ExitStatus;

use crate::policy::Ending;

pub(crate) const MAGIC: u32 = 0x4b52_4656;
/// Size of one event record on the wire.
pub const EVENT_SIZE: usize = 32;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// The first worker is running.
    Started = 1,
    /// A worker ended and its successor (`pid`) is running.
    Restarted = 2,
    /// A worker ended and, by policy, was not restarted: the rforked child is gone.
    Removed = 3,
    /// Restarts exceeded the intensity limit: supervision stopped.
    GaveUp = 4,
    /// (kept-image design) a fresh standby is parked and ready.
    StandbyReady = 5,
}

/// Why it happened (the reason of the ending that caused a restart/removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None,
    Exited(i32),
    Signaled(i32),
    Requested,
    Hung,
    Operator,
}

impl From<Ending> for Reason {
    fn from(e: Ending) -> Reason {
        match e {
            Ending::Requested => Reason::Requested,
            Ending::Hung => Reason::Hung,
            Ending::Operator => Reason::Operator,
            Ending::Status(ExitStatus::Exited(c)) => Reason::Exited(c),
            Ending::Status(ExitStatus::Signaled { signal, .. }) => Reason::Signaled(signal),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Reason::None => f.write_str("-"),
            Reason::Exited(c) => write!(f, "exit status {c}"),
            Reason::Signaled(s) => write!(f, "killed by {}", sys::signal::name(s)),
            Reason::Requested => f.write_str("restart requested"),
            Reason::Hung => f.write_str("watchdog: no heartbeat"),
            Reason::Operator => f.write_str("operator restart"),
        }
    }
}

/// One supervisor event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub reason: Reason,
    /// The worker this is about: the new one for Started/Restarted/StandbyReady, the ended one
    /// for Removed/GaveUp.
    pub pid: Pid,
    pub generation: u32,
    pub restarts_in_window: u32,
    pub at_ns: u64,
}

impl Event {
    pub fn encode(&self) -> [u8; EVENT_SIZE] {
        let mut b = [0u8; EVENT_SIZE];
        let (code, value) = match self.reason {
            Reason::None => (0u8, 0i32),
            Reason::Exited(c) => (1, c),
            Reason::Signaled(s) => (2, s),
            Reason::Requested => (3, 0),
            Reason::Hung => (4, 0),
            Reason::Operator => (5, 0),
        };
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = code;
        b[8..12].copy_from_slice(&value.to_le_bytes());
        b[12..16].copy_from_slice(&self.pid.as_raw().to_le_bytes());
        b[16..20].copy_from_slice(&self.generation.to_le_bytes());
        b[20..24].copy_from_slice(&self.restarts_in_window.to_le_bytes());
        b[24..32].copy_from_slice(&self.at_ns.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; EVENT_SIZE]) -> Result<Event, DecodeError> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if u32_at(0) != MAGIC {
            return Err(DecodeError::Magic(u32_at(0)));
        }
        let kind = match b[4] {
            1 => EventKind::Started,
            2 => EventKind::Restarted,
            3 => EventKind::Removed,
            4 => EventKind::GaveUp,
            5 => EventKind::StandbyReady,
            k => return Err(DecodeError::Kind(k)),
        };
        let value = u32_at(8) as i32;
        let reason = match b[5] {
            0 => Reason::None,
            1 => Reason::Exited(value),
            2 => Reason::Signaled(value),
            3 => Reason::Requested,
            4 => Reason::Hung,
            5 => Reason::Operator,
            r => return Err(DecodeError::Reason(r)),
        };
        let pid = Pid::from_raw(u32_at(12) as i32).ok_or(DecodeError::Pid)?;
        Ok(Event {
            kind,
            reason,
            pid,
            generation: u32_at(16),
            restarts_in_window: u32_at(20),
            at_ns: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// A malformed event record (only possible if something other than the keeper wrote the pipe).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("bad event magic {0:#x}")]
    Magic(u32),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown event reason {0}")]
    Reason(u8),
    #[error("event names no valid pid")]
    Pid,
}

/// The read side of the event channel. Pollable (`AsFd`): readable when an event is waiting or
/// when the supervisor has ended (EOF after the last event).
#[derive(Debug)]
pub struct EventStream {
    fd: OwnedFd,
    eof: bool,
}

impl EventStream {
    pub(crate) fn new(fd: OwnedFd) -> EventStream {
        EventStream { fd, eof: false }
    }

    /// The next event, waiting at most `timeout` (None: forever). `Ok(None)` on timeout or once
    /// the supervisor has ended and every event was read.
    pub fn next(&mut self, timeout: Option<Duration>) -> io::Result<Option<Event>> {
        if self.eof {
            return Ok(None);
        }
        if !sys::pidfd::wait_readable(self.fd.as_fd(), timeout)? {
            return Ok(None);
        }
        let mut buf = [0u8; EVENT_SIZE];
        // A SOCK_SEQPACKET socket: one read is one whole record; 0 bytes is the end.
        let n = loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        match n {
            0 => {
                self.eof = true;
                Ok(None)
            }
            EVENT_SIZE => Event::decode(&buf)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            n => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("short event record: {n} bytes"),
            )),
        }
    }

    /// Whether the supervisor has closed the stream (it ended and every event was read).
    pub fn is_closed(&self) -> bool {
        self.eof
    }
}

impl AsFd for EventStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn encode_decode_round_trip(kind in 1u8..=5, reason in 0u8..=5, value: i32, pid in 1i32..i32::MAX,
                                    generation: u32, window: u32, at: u64) {
            let kind = match kind { 1 => EventKind::Started, 2 => EventKind::Restarted, 3 => EventKind::Removed,
                                    4 => EventKind::GaveUp, _ => EventKind::StandbyReady };
            let reason = match reason { 0 => Reason::None, 1 => Reason::Exited(value), 2 => Reason::Signaled(value),
                                        3 => Reason::Requested, 4 => Reason::Hung, _ => Reason::Operator };
            let e = Event { kind, reason, pid: Pid::from_raw(pid).unwrap(), generation, restarts_in_window: window, at_ns: at };
            proptest::prop_assert_eq!(Event::decode(&e.encode()), Ok(e));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform32(proptest::num::u8::ANY)) {
            let _ = Event::decode(&bytes);
        }
    }
}
