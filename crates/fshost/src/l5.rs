//! Level 5 crash survival: the module is linked into the host, so a module crash kills the
//! host; the mount survives anyway.
//!
//! fuser performs the FUSE INIT handshake inside `Session::new`. Right after it, the host
//! rforks (kept-image design): the rfork keeper and its parked standby are copies of a host
//! that has an initialized `/dev/fuse` connection, a formatted store and an empty request
//! loop. They hold the connection open, so the kernel never sees the daemon go away (no
//! `ENOTCONN`): **the keeper is the fd keeper**. When the serving host dies (SIGSEGV,
//! SIGKILL, or killed by the deadline watchdog below), the standby is released and
//! 1. answers with EIO the request its predecessor died in, if that request had already been
//!    resent once (a request that kills the host twice is poison: retry once, then EIO, as at
//!    level 4);
//! 2. writes `FUSE_NOTIFY_RESEND` to `/dev/fuse` (Linux ≥ 6.9): the kernel puts every request
//!    the dead host had read but not answered back in the queue;
//! 3. runs the request loop; its first request re-attaches the module to the store (the
//!    module's memory is the image's) and releases store locks the dead host held
//!    (`HostFs::call`).
//!
//! The original host process stays the parent: it keeps the signal thread (SIGTERM unmounts),
//! follows rfork's events, and enforces the per-request deadline, using the shared words
//! below. There is no undo log at level 5 (the paper's level 5 has no protection): a request
//! that dies half-way may leave its own partial effect, which its resend then completes;
//! acknowledged data lives in the shared store and is never lost.

use std::mem::ManuallyDrop;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sys::clock::monotonic_ns;
use sys::shm::SharedAtomics;

use crate::HostError;
use crate::fuse::HostFs;

/// Shared word: unique id of the request being served (0: none).
pub(crate) const INFLIGHT: usize = 0;
/// Shared word: when it started (CLOCK_MONOTONIC ns).
pub(crate) const INFLIGHT_SINCE: usize = 1;
/// Shared word: unique id (without the resend bit) of the request already resent once.
const RESENT_ONCE: usize = 2;
/// Shared word: pid of the original host process (the one to signal; it unmounts on SIGTERM).
pub(crate) const HOST_PID: usize = 3;
pub(crate) const WORDS: usize = 4;

/// The kernel sets this bit in the unique id of a resent request.
const FUSE_UNIQUE_RESEND: u64 = 1 << 63;
/// `enum fuse_notify_code`: FUSE_NOTIFY_RESEND.
const FUSE_NOTIFY_RESEND: i32 = 7;
const FUSE_FORGET: u32 = 2;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;

/// Serves `session` under rfork supervision until the file system is unmounted.
pub fn serve_supervised(
    session: fuser::Session<HostFs>,
    words: Arc<SharedAtomics>,
    deadline: Duration,
) -> Result<(), HostError> {
    // Only a worker may run (and so drop) the session: its drop unmounts.
    let session = ManuallyDrop::new(session);
    let cfg = rfork::Config {
        design: rfork::Design::KeptImage,
        policy: rfork::Policy {
            restart: rfork::RestartOn::OnCrash,
            intensity: rfork::Intensity {
                max_restarts: 200,
                within: Duration::from_secs(10),
            },
            backoff: None,
        },
        stop_timeout: Duration::from_millis(200),
        ..rfork::Config::default()
    };
    match rfork::rfork(&cfg).map_err(HostError::Supervisor)? {
        rfork::Forked::Child(worker) => {
            if worker.generation() > 1 {
                recover(&session, &words);
            }
            let session = ManuallyDrop::into_inner(session);
            let code = match session.run() {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("level-5 host: session ended with an error: {e}");
                    1
                }
            };
            std::process::exit(code)
        }
        rfork::Forked::Parent(sup) => follow(sup, &session, &words, deadline),
    }
}

/// In a restarted host, before serving.
fn recover(session: &fuser::Session<HostFs>, words: &SharedAtomics) {
    let fd = session.as_fd();
    let died_in = words.word(INFLIGHT).swap(0, Ordering::AcqRel);
    let base = died_in & !FUSE_UNIQUE_RESEND;
    if died_in != 0 && words.word(RESENT_ONCE).load(Ordering::Acquire) == base {
        // Second death in the same request: answer it, do not resend it again.
        words.word(RESENT_ONCE).store(0, Ordering::Release);
        let _ = rustix::io::write(fd, &out_header(16, -libc::EIO, died_in));
        tracing::error!(
            unique = died_in,
            "level-5 host: request failed twice; answered EIO"
        );
    } else if died_in != 0 {
        words.word(RESENT_ONCE).store(base, Ordering::Release);
    }
    let resend = out_header(16, FUSE_NOTIFY_RESEND, 0);
    match rustix::io::write(fd, &resend) {
        Ok(_) => tracing::warn!(
            generation = rfork::generation(),
            "level-5 host restarted; in-flight requests resent"
        ),
        Err(e) => tracing::error!(
            "FUSE_NOTIFY_RESEND failed ({e}): requests in flight at the crash stay unanswered \
             (needs Linux 6.9 or later)"
        ),
    }
}

/// A `struct fuse_out_header`.
fn out_header(len: u32, error: i32, unique: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..8].copy_from_slice(&error.to_ne_bytes());
    b[8..16].copy_from_slice(&unique.to_ne_bytes());
    b
}

/// The original host: follows the supervisor, kills a host stuck in one request past the
/// deadline, and after a give-up keeps the mount answering (EIO) until it is unmounted.
fn follow(
    mut sup: rfork::Supervised,
    session: &fuser::Session<HostFs>,
    words: &SharedAtomics,
    deadline: Duration,
) -> Result<(), HostError> {
    let deadline_ns = deadline.as_nanos() as u64;
    let mut worker = None;
    loop {
        let ev = sup
            .next_event(Some(Duration::from_millis(50)))
            .map_err(|e| HostError::Daemon(format!("following the level-5 host: {e}")))?;
        match ev.map(|e| e.kind) {
            Some(rfork::EventKind::Started) => worker = ev.map(|e| e.pid),
            Some(rfork::EventKind::Restarted) => {
                worker = ev.map(|e| e.pid);
                tracing::warn!(reason = %ev.map_or(rfork::Reason::None, |e| e.reason), "level-5 host died; standby took over");
            }
            Some(rfork::EventKind::Removed) => return Ok(()), // unmounted
            Some(rfork::EventKind::GaveUp) => {
                tracing::error!("level-5 host keeps dying; answering EIO until unmounted");
                drop(sup);
                serve_eio(session);
                return Ok(());
            }
            Some(rfork::EventKind::StandbyReady) => {}
            None if sup.events().is_closed() => return Ok(()),
            None => {}
        }
        let since = words.word(INFLIGHT_SINCE).load(Ordering::Relaxed);
        if words.word(INFLIGHT).load(Ordering::Acquire) != 0
            && monotonic_ns().saturating_sub(since) > deadline_ns
            && let Some(pid) = worker.take()
        {
            tracing::error!(
                pid = pid.as_raw(),
                ?deadline,
                "level-5 host stuck in one request; killing it"
            );
            let _ = sys::process::kill(pid, libc::SIGKILL);
        }
    }
}

/// Answers every request with EIO (never leaving one pending) until the kernel says the file
/// system is gone.
fn serve_eio(session: &fuser::Session<HostFs>) {
    let fd = session.as_fd();
    let mut buf = vec![0u8; 2 << 20];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(n) if n >= 40 => {
                let opcode = u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes"));
                let unique = u64::from_ne_bytes(buf[8..16].try_into().expect("8 bytes"));
                if !matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT) {
                    let _ = rustix::io::write(fd, &out_header(16, -libc::EIO, unique));
                }
            }
            Ok(_) | Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
            Err(_) => return, // ENODEV: unmounted
        }
    }
}
