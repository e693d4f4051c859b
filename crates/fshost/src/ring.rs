//! The shared-memory request ring between the host and a level-4 module process.
//!
//! One memfd region, mapped by the host before it rforks the module supervisor, so every
//! module generation shares it:
//!
//! ```text
//! [header: doorbell, idle fault][slot 0][slot 1]…[undo log 0][undo log 1]…
//! ```
//!
//! A slot moves FREE → REQUEST (host) → RUNNING (module claims it) → REPLY (module) → FREE
//! (host). If the module process dies, the host's supervisor thread moves a RUNNING slot to
//! DEAD; the host then rolls the slot's undo log back. A REQUEST nobody claimed yet simply
//! waits for the next module generation. Waiting is a short spin (the reply usually comes
//! within microseconds; each round yields the CPU) and then a shared futex, so an idle module
//! costs no CPU.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sys::fs_ring::{SharedRegion, futex_wait, futex_wake};

use crate::pm::UndoLog;

/// Request slots. The host serves FUSE with one thread today, so one is busy at a time; the
/// rest are room for concurrent requests (deadlock detection, issue 5).
pub const SLOTS: usize = 2;
/// Payload bytes per slot: a 1 MiB read or write plus its header.
pub const SLOT_BUF: usize = (1 << 20) + (64 << 10);
const SLOT_HDR: usize = 64;
const SLOT_SIZE: usize = SLOT_HDR + SLOT_BUF;
/// Undo log bytes per slot (sparse: only what a request logs is ever touched).
pub const UNDO_CAP: usize = 16 << 20;
const HDR: usize = 4096;
const H_DOORBELL: usize = 0;
const H_IDLE_FAULT: usize = 4;
/// 1 while the module sleeps on the doorbell: the host skips the wake syscall otherwise.
const H_MODULE_SLEEPS: usize = 8;

/// Slot states.
pub const FREE: u32 = 0;
pub const REQUEST: u32 = 1;
pub const RUNNING: u32 = 2;
pub const REPLY: u32 = 3;
pub const DEAD: u32 = 4;

const S_STATE: usize = 0;
const S_FAULT: usize = 4;
const S_LEN: usize = 8;
/// Pid of the module process that claimed the slot (written before the claim).
const S_PID: usize = 12;
/// 1 while the host sleeps on the slot's state word.
const S_HOST_SLEEPS: usize = 16;

/// How long to poll before sleeping on the futex. Polling yields the CPU each round: on this
/// 2-core machine the client, the host and the module all want a core per request, and a
/// pure spin starves whichever of them is runnable on the same core.
const SPIN: Duration = Duration::from_micros(40);

/// The ring.
#[derive(Debug)]
pub struct Ring {
    region: SharedRegion,
}

/// Why a round trip produced no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The module process died while it held the request.
    Died,
    /// It did not answer within the deadline and was killed.
    Hung,
}

impl Ring {
    pub fn create() -> std::io::Result<Ring> {
        let size = HDR + SLOTS * SLOT_SIZE.next_multiple_of(4096) + SLOTS * UNDO_CAP;
        Ok(Ring {
            region: SharedRegion::create("kintsugi-ring", size)?,
        })
    }

    fn slot_off(i: usize) -> usize {
        HDR + i * SLOT_SIZE.next_multiple_of(4096)
    }

    pub fn state(&self, i: usize) -> &AtomicU32 {
        self.region.atomic_u32(Self::slot_off(i) + S_STATE)
    }

    fn doorbell(&self) -> &AtomicU32 {
        self.region.atomic_u32(H_DOORBELL)
    }

    /// Slot `i`'s undo log.
    pub fn undo(&self, i: usize) -> UndoLog<'_> {
        let base = HDR + SLOTS * SLOT_SIZE.next_multiple_of(4096) + i * UNDO_CAP;
        UndoLog::new(&self.region, base, UNDO_CAP)
    }

    fn ring_doorbell(&self) {
        // SeqCst pairs with the sleeper's flag-then-wait (Dekker): either we see the flag and
        // wake it, or its futex_wait sees the new doorbell value and does not sleep.
        self.doorbell().fetch_add(1, Ordering::SeqCst);
        if self
            .region
            .atomic_u32(H_MODULE_SLEEPS)
            .load(Ordering::SeqCst)
            != 0
        {
            let _ = futex_wake(self.doorbell(), 1);
        }
    }

    /// Asks the module to run `fault` while idle (between requests).
    pub fn post_idle_fault(&self, code: u32) {
        self.region
            .atomic_u32(H_IDLE_FAULT)
            .store(code, Ordering::Release);
        self.ring_doorbell();
    }

    /// Host side: posts `req` in slot `i` and waits for the reply bytes. `deadline` bounds
    /// the wait; then `kill_worker` is called once and the host waits up to `grace` more for the
    /// supervisor to confirm the death.
    pub fn roundtrip(
        &self,
        i: usize,
        req: &[u8],
        fault: u32,
        deadline: Duration,
        grace: Duration,
        mut kill_worker: impl FnMut(),
    ) -> Result<Vec<u8>, Failure> {
        assert!(
            req.len() <= SLOT_BUF,
            "request of {} bytes exceeds the ring slot",
            req.len()
        );
        let off = Self::slot_off(i);
        self.region.write(off + SLOT_HDR, req);
        self.region
            .atomic_u32(off + S_LEN)
            .store(req.len() as u32, Ordering::Relaxed);
        self.region
            .atomic_u32(off + S_FAULT)
            .store(fault, Ordering::Relaxed);
        let state = self.state(i);
        state.store(REQUEST, Ordering::Release);
        self.ring_doorbell();
        let start = Instant::now();
        let mut killed_at: Option<Instant> = None;
        loop {
            let s = state.load(Ordering::Acquire);
            match s {
                REPLY => {
                    let n = (self.region.atomic_u32(off + S_LEN).load(Ordering::Acquire) as usize)
                        .min(SLOT_BUF);
                    let mut out = vec![0u8; n];
                    self.region.read(off + SLOT_HDR, &mut out);
                    state.store(FREE, Ordering::Release);
                    return Ok(out);
                }
                DEAD => {
                    state.store(FREE, Ordering::Release);
                    return Err(if killed_at.is_some() {
                        Failure::Hung
                    } else {
                        Failure::Died
                    });
                }
                _ => {}
            }
            let elapsed = start.elapsed();
            if elapsed < SPIN {
                std::thread::yield_now();
                continue;
            }
            match killed_at {
                None if elapsed >= deadline => {
                    tracing::warn!(?deadline, "module missed its request deadline; killing it");
                    kill_worker();
                    killed_at = Some(Instant::now());
                }
                Some(k) if k.elapsed() >= grace => {
                    // The supervisor never confirmed; claim the slot back so it cannot be
                    // answered late, and report the hang.
                    if state
                        .compare_exchange(s, FREE, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return Err(Failure::Hung);
                    }
                    continue;
                }
                _ => {}
            }
            let sleeps = self.region.atomic_u32(off + S_HOST_SLEEPS);
            sleeps.store(1, Ordering::SeqCst);
            let _ = futex_wait(state, s, Some(Duration::from_millis(20)));
            sleeps.store(0, Ordering::SeqCst);
        }
    }

    /// Supervisor side: module process `dead` died. The slots it was running become DEAD (and
    /// their waiter wakes); slots a newer generation already runs are left alone. With `all`
    /// (no module will ever come back), every RUNNING slot and unclaimed REQUEST too.
    pub fn mark_dead(&self, dead: Option<u32>, all: bool) {
        for i in 0..SLOTS {
            let st = self.state(i);
            let claimer = self
                .region
                .atomic_u32(Self::slot_off(i) + S_PID)
                .load(Ordering::SeqCst);
            let mine = all || dead.is_none_or(|d| d == claimer);
            let mut hit = mine
                && st
                    .compare_exchange(RUNNING, DEAD, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            if all && !hit {
                hit = st
                    .compare_exchange(REQUEST, DEAD, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            }
            if hit {
                let _ = futex_wake(st, 1);
            }
        }
    }

    /// Module side: waits for work and serves it forever with `serve(slot, fault, request)`.
    pub fn serve(
        &self,
        mut serve: impl FnMut(usize, u32, &[u8]) -> Vec<u8>,
        mut idle_fault: impl FnMut(u32),
    ) -> ! {
        let me = sys::Pid::this().as_raw() as u32;
        let mut buf = Vec::new();
        loop {
            let seen = self.doorbell().load(Ordering::Acquire);
            let f = self
                .region
                .atomic_u32(H_IDLE_FAULT)
                .swap(0, Ordering::AcqRel);
            if f != 0 {
                idle_fault(f);
            }
            let mut did = false;
            for i in 0..SLOTS {
                let st = self.state(i);
                let off = Self::slot_off(i);
                if st.load(Ordering::Acquire) != REQUEST {
                    continue;
                }
                // Name the claimer before claiming: a RUNNING slot always carries the pid of
                // the process running it, so a late death report for an older generation can
                // never be pinned on a request the new generation is serving.
                self.region
                    .atomic_u32(off + S_PID)
                    .store(me, Ordering::SeqCst);
                if st
                    .compare_exchange(REQUEST, RUNNING, Ordering::SeqCst, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                did = true;
                let n = (self.region.atomic_u32(off + S_LEN).load(Ordering::Acquire) as usize)
                    .min(SLOT_BUF);
                buf.resize(n, 0);
                self.region.read(off + SLOT_HDR, &mut buf);
                let fault = self
                    .region
                    .atomic_u32(off + S_FAULT)
                    .load(Ordering::Relaxed);
                let reply = serve(i, fault, &buf);
                let n = reply.len().min(SLOT_BUF);
                self.region.write(off + SLOT_HDR, &reply[..n]);
                self.region
                    .atomic_u32(off + S_LEN)
                    .store(n as u32, Ordering::Release);
                // Only if still ours: the host may have given up on us after a deadline.
                if st
                    .compare_exchange(RUNNING, REPLY, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                    && self
                        .region
                        .atomic_u32(off + S_HOST_SLEEPS)
                        .load(Ordering::SeqCst)
                        != 0
                {
                    let _ = futex_wake(st, 1);
                }
            }
            if did {
                continue;
            }
            let t = Instant::now();
            while t.elapsed() < SPIN && self.doorbell().load(Ordering::Acquire) == seen {
                std::thread::yield_now();
            }
            let sleeps = self.region.atomic_u32(H_MODULE_SLEEPS);
            sleeps.store(1, Ordering::SeqCst);
            if self.doorbell().load(Ordering::SeqCst) == seen {
                let _ = futex_wait(self.doorbell(), seen, Some(Duration::from_secs(1)));
            }
            sleeps.store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_death_report_fails_only_the_dead_processs_slots() {
        let r = Ring::create().unwrap();
        r.region
            .atomic_u32(Ring::slot_off(0) + S_PID)
            .store(100, Ordering::SeqCst);
        r.state(0).store(RUNNING, Ordering::SeqCst);
        r.region
            .atomic_u32(Ring::slot_off(1) + S_PID)
            .store(200, Ordering::SeqCst);
        r.state(1).store(REQUEST, Ordering::SeqCst);
        // A late report about an older generation (pid 50) touches nothing.
        r.mark_dead(Some(50), false);
        assert_eq!(r.state(0).load(Ordering::SeqCst), RUNNING);
        r.mark_dead(Some(100), false);
        assert_eq!(r.state(0).load(Ordering::SeqCst), DEAD);
        // An unclaimed request waits for the next generation…
        assert_eq!(r.state(1).load(Ordering::SeqCst), REQUEST);
        // …unless no generation will ever come.
        r.mark_dead(None, true);
        assert_eq!(r.state(1).load(Ordering::SeqCst), DEAD);
    }

    #[test]
    fn roundtrip_through_a_serving_thread_and_a_deadline() {
        let r = std::sync::Arc::new(Ring::create().unwrap());
        let s = r.clone();
        std::thread::spawn(move || {
            s.serve(
                |_, fault, req| {
                    if fault == 9 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    req.iter().rev().copied().collect()
                },
                |_| {},
            )
        });
        let out = r.roundtrip(
            0,
            b"abc",
            0,
            Duration::from_secs(5),
            Duration::from_secs(1),
            || {},
        );
        assert_eq!(out.unwrap(), b"cba");
        // A request over its deadline: the kill callback runs, and with no supervisor to confirm
        // a death the host takes the slot back after the grace period and reports a hang.
        let mut killed = false;
        let out = r.roundtrip(
            0,
            b"x",
            9,
            Duration::from_millis(50),
            Duration::from_millis(50),
            || killed = true,
        );
        assert!(killed);
        assert_eq!(out, Err(Failure::Hung));
    }
}
