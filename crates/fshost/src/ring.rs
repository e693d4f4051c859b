//! The shared-memory request ring between the host and a level-4 module process.
//!
//! One memfd region, mapped by the host before it rforks the module contexts, so every
//! generation shares it. Context `i` (a module worker process) serves only slot `i`; its slot
//! header, buffer and undo log are contiguous, which makes them one protectable range (its
//! *local* data) and every other slot *foreign* to it:
//!
//! ```text
//! [header: fault-site words][slot 0 header|buffer|undo log 0][slot 1 …]…
//! ```
//!
//! A slot moves FREE → REQUEST (host) → RUNNING (module claims it) → REPLY (module) → FREE
//! (host). If the module process dies, the host's supervisor thread moves a RUNNING slot to
//! DEAD; the host then rolls the slot's undo log back. A REQUEST nobody claimed yet simply
//! waits for the next module generation. Waiting is a short spin (the reply usually comes
//! within microseconds; each round yields the CPU) and then a shared futex, so an idle module
//! costs no CPU.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sys::fs_ring::{SharedRegion, futex_wait, futex_wake};

use crate::pm::UndoLog;

/// Most contexts (module worker processes, one request slot each) a ring can have.
pub const MAX_SLOTS: usize = 8;
/// Payload bytes per slot: a 1 MiB read or write plus its header.
pub const SLOT_BUF: usize = (1 << 20) + (64 << 10);
const SLOT_HDR: usize = 4096;
const SLOT_SIZE: usize = SLOT_HDR + SLOT_BUF;
/// Undo log bytes per slot (sparse: only what a request logs is ever touched).
pub const UNDO_CAP: usize = 16 << 20;
const HDR: usize = 4096;
/// Fault-injection campaign words: the armed site, the client pid it fires for (0 = any),
/// activations, and a seed for raw memory faults.
const H_SITE: usize = 0;
const H_SITE_PID: usize = 4;
const H_SITE_HITS: usize = 8;
const H_SITE_SEED: usize = 16;

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
/// 1 while the slot's worker sleeps on it.
const S_WORKER_SLEEPS: usize = 20;
/// The context's global-write flag (set by its fault handler, cleared by the host per request).
const S_GFLAG: usize = 24;
/// Set when the context wrote another context's local data (it is the culprit).
const S_ILLEGAL: usize = 28;
/// A fault to run while idle.
const S_IDLE_FAULT: usize = 32;
/// u64: the address of the fault that ended the context's last process (its SIGSEGV handler
/// publishes it), 0 if none; cleared per request.
const S_FAULT_ADDR: usize = 64;
/// Levels 1–3: the protection manager rejected the request's write-back (a semantically
/// invalid update); the reason is at `S_VIOLATION`.
const S_REJECT: usize = 72;
const S_VIOLATION: usize = 128;
const VIOLATION_MAX: usize = 256;

/// Deadlock detection words (`deadlock.rs`), well after the words above: the lock-table slot
/// the context waits for, plus one (0: not waiting), written by the context in
/// [`crate::pm::HostPm`]'s `lock` and cleared by the host when the request ends; a sequence
/// number bumped by every new wait (so the checker can tell one long wait from two short
/// ones); the victim flag (set by the checker, the waiting context sleeps on it); and when the
/// wait began (µs, CLOCK_MONOTONIC, which every process of the host shares).
const S_DL_WAIT: usize = 256;
const S_DL_SEQ: usize = 260;
const S_DL_VICTIM: usize = 264;
const S_DL_SINCE: usize = 272;

/// How long to poll before sleeping on the futex, when there is a second CPU to poll on.
/// Polling yields the CPU each round: on this 2-core machine the client, the host and the
/// module all want a core per request, and a pure spin starves whichever of them is runnable
/// on the same core.
const SPIN: Duration = Duration::from_micros(40);

/// The poll time for this process: [`SPIN`], or none at all when it may run on one CPU only
/// (`taskset`, a cpuset, `kintsugi bench fs --cpu`). On one CPU the other side of the ring
/// cannot make progress while we poll, so each yield is only an extra pair of context
/// switches between processes: measured with everything on CPU 0, a level-1 SNFS
/// open+close took 85–95 µs polling and 55–75 µs sleeping at once (`docs/fs.md`). Computed
/// once per process; contexts inherit it with their affinity.
fn spin() -> Duration {
    static S: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *S.get_or_init(|| match std::thread::available_parallelism() {
        Ok(n) if n.get() == 1 => Duration::ZERO,
        _ => SPIN,
    })
}

/// The ring.
#[derive(Debug)]
pub struct Ring {
    region: SharedRegion,
    slots: usize,
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
    /// A ring for `slots` contexts (1..=[`MAX_SLOTS`]).
    pub fn create(slots: usize) -> std::io::Result<Ring> {
        let slots = slots.clamp(1, MAX_SLOTS);
        let size = HDR + slots * (SLOT_SIZE.next_multiple_of(4096) + UNDO_CAP);
        Ok(Ring {
            region: SharedRegion::create("kintsugi-ring", size)?,
            slots,
        })
    }

    /// Number of slots (= contexts).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Slot `i`'s own memory: its header, buffer and undo log, contiguous. This is context
    /// `i`'s local data (offset, length in the region).
    fn local(i: usize) -> (usize, usize) {
        let len = SLOT_SIZE.next_multiple_of(4096) + UNDO_CAP;
        (HDR + i * len, len)
    }

    fn slot_off(i: usize) -> usize {
        Self::local(i).0
    }

    pub fn state(&self, i: usize) -> &AtomicU32 {
        self.region.atomic_u32(Self::slot_off(i) + S_STATE)
    }

    fn word(&self, i: usize, w: usize) -> &AtomicU32 {
        self.region.atomic_u32(Self::slot_off(i) + w)
    }

    /// Slot `i`'s undo log.
    pub fn undo(&self, i: usize) -> UndoLog<'_> {
        let base = Self::slot_off(i) + SLOT_SIZE.next_multiple_of(4096);
        UndoLog::new(&self.region, base, UNDO_CAP)
    }

    /// Context `i`'s global-write flag: set if its current (or last) request wrote global data.
    pub fn global_flag(&self, i: usize) -> bool {
        self.word(i, S_GFLAG).load(Ordering::SeqCst) != 0
    }

    /// Whether context `i` wrote another context's local data.
    pub fn illegal_write(&self, i: usize) -> bool {
        self.word(i, S_ILLEGAL).load(Ordering::SeqCst) != 0
    }

    /// The pid that claimed slot `i` last.
    pub fn claimer(&self, i: usize) -> u32 {
        self.word(i, S_PID).load(Ordering::SeqCst)
    }

    /// Arms fault site `site` (0 disarms) for requests of client `pid` (0: any client).
    pub fn arm_site(&self, site: u32, pid: u32, seed: u64) {
        self.region.atomic_u32(H_SITE).store(0, Ordering::SeqCst);
        self.region
            .atomic_u32(H_SITE_PID)
            .store(pid, Ordering::SeqCst);
        self.region
            .atomic_u64(H_SITE_SEED)
            .store(seed, Ordering::SeqCst);
        // Disarming keeps the count, so it can be read afterwards.
        if site != 0 {
            self.region
                .atomic_u64(H_SITE_HITS)
                .store(0, Ordering::SeqCst);
        }
        self.region.atomic_u32(H_SITE).store(site, Ordering::SeqCst);
    }

    /// The armed site, its client filter and seed, and the activations so far.
    pub fn site(&self) -> (u32, u32, u64, &AtomicU64) {
        (
            self.region.atomic_u32(H_SITE).load(Ordering::Acquire),
            self.region.atomic_u32(H_SITE_PID).load(Ordering::Acquire),
            self.region.atomic_u64(H_SITE_SEED).load(Ordering::Acquire),
            self.region.atomic_u64(H_SITE_HITS),
        )
    }

    /// Wakes whoever sleeps on slot `i`'s state word (the worker for a request, the host for
    /// a reply). Both re-check the state, so waking one too many is harmless.
    fn wake(&self, i: usize, sleeper: usize) {
        if self.word(i, sleeper).load(Ordering::SeqCst) != 0 {
            let _ = futex_wake(self.state(i), u32::MAX);
        }
    }

    /// Asks context `i` to run `fault` while idle (between requests).
    pub fn post_idle_fault(&self, i: usize, code: u32) {
        self.word(i, S_IDLE_FAULT).store(code, Ordering::Release);
        let _ = futex_wake(self.state(i), u32::MAX);
    }

    /// Host side: posts `req` in slot `i` and waits for the reply bytes. `deadline` bounds
    /// the wait; then `kill_worker` is called once and the host waits up to `grace` more for the
    /// supervisor to confirm the death. `slow` is called once if the wait outlasts
    /// [`crate::gate::SLOW`] (the reader gate lets another FUSE thread read).
    // Eight arguments: the two callbacks are the host's hooks (kill, gate), kept as closures so
    // the ring knows neither the supervisor nor the gate.
    #[allow(clippy::too_many_arguments)]
    pub fn roundtrip(
        &self,
        i: usize,
        req: &[u8],
        fault: u32,
        deadline: Duration,
        grace: Duration,
        mut kill_worker: impl FnMut(),
        mut slow: impl FnMut(),
    ) -> Result<Vec<u8>, Failure> {
        assert!(
            req.len() <= SLOT_BUF,
            "request of {} bytes exceeds the ring slot",
            req.len()
        );
        let off = Self::slot_off(i);
        self.region.write(off + SLOT_HDR, req);
        self.word(i, S_LEN)
            .store(req.len() as u32, Ordering::Relaxed);
        self.word(i, S_FAULT).store(fault, Ordering::Relaxed);
        // A new request in this context: its global-write flag starts clear.
        self.word(i, S_GFLAG).store(0, Ordering::SeqCst);
        self.word(i, S_REJECT).store(0, Ordering::SeqCst);
        self.word(i, S_ILLEGAL).store(0, Ordering::SeqCst);
        self.fault_addr_word(i).store(0, Ordering::SeqCst);
        let state = self.state(i);
        state.store(REQUEST, Ordering::SeqCst);
        self.wake(i, S_WORKER_SLEEPS);
        let start = Instant::now();
        let mut killed_at: Option<Instant> = None;
        let mut was_slow = false;
        loop {
            let s = state.load(Ordering::Acquire);
            match s {
                REPLY => {
                    let n = (self.word(i, S_LEN).load(Ordering::Acquire) as usize).min(SLOT_BUF);
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
            if elapsed < spin() {
                std::thread::yield_now();
                continue;
            }
            match killed_at {
                None if elapsed >= deadline => {
                    tracing::warn!(
                        ?deadline,
                        slot = i,
                        "module context missed its request deadline; killing it"
                    );
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
            // The first nap ends at gate::SLOW (never shorter: see there why a short futex
            // timeout is expensive here), the rest every 20 ms to re-check the deadline.
            let mut nap = Duration::from_millis(20);
            if !was_slow {
                match crate::gate::SLOW.checked_sub(elapsed) {
                    Some(left) if !left.is_zero() => nap = nap.min(left),
                    _ => {
                        was_slow = true;
                        slow();
                    }
                }
            }
            let sleeps = self.word(i, S_HOST_SLEEPS);
            sleeps.store(1, Ordering::SeqCst);
            let _ = futex_wait(state, s, Some(nap));
            sleeps.store(0, Ordering::SeqCst);
        }
    }

    /// Supervisor side: module process `dead` died. The slots it was running become DEAD (and
    /// their waiter wakes); slots a newer generation already runs are left alone. With `all`
    /// (no module will ever come back), every RUNNING slot and unclaimed REQUEST too.
    pub fn mark_dead(&self, dead: Option<u32>, all: bool) {
        for i in 0..self.slots {
            let st = self.state(i);
            let claimer = self.claimer(i);
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
                let _ = futex_wake(st, u32::MAX);
            }
        }
    }

    /// Context side: context `i` now waits for lock-table slot `slot` (`None`: it stopped
    /// waiting, with or without the lock).
    pub fn set_lock_wait(&self, i: usize, slot: Option<usize>) {
        match slot {
            Some(s) => {
                self.region
                    .atomic_u64(Self::slot_off(i) + S_DL_SINCE)
                    .store(sys::clock::monotonic_ns() / 1000, Ordering::Release);
                self.word(i, S_DL_SEQ).fetch_add(1, Ordering::AcqRel);
                self.word(i, S_DL_WAIT)
                    .store(s as u32 + 1, Ordering::SeqCst);
            }
            None => self.word(i, S_DL_WAIT).store(0, Ordering::SeqCst),
        }
    }

    /// Host side: the lock-table slot context `i` waits for, the wait's sequence number and
    /// when it began (µs, monotonic).
    pub fn lock_wait(&self, i: usize) -> Option<(usize, u32, u64)> {
        let w = self.word(i, S_DL_WAIT).load(Ordering::SeqCst);
        let seq = self.word(i, S_DL_SEQ).load(Ordering::SeqCst);
        let since = self
            .region
            .atomic_u64(Self::slot_off(i) + S_DL_SINCE)
            .load(Ordering::Acquire);
        (w != 0).then(|| ((w - 1) as usize, seq, since))
    }

    /// Context `i`'s victim flag: the checker sets it (and wakes the context) to make the
    /// context's `lock` give up; the context sleeps on it between lock attempts.
    pub fn victim_word(&self, i: usize) -> &AtomicU32 {
        self.word(i, S_DL_VICTIM)
    }

    /// Host side: tells context `i` to give up its lock wait.
    pub fn make_victim(&self, i: usize) {
        self.word(i, S_DL_VICTIM).store(1, Ordering::SeqCst);
        let _ = futex_wake(self.word(i, S_DL_VICTIM), u32::MAX);
    }

    /// Host side, at the end of each attempt of a request: clears context `i`'s wait and
    /// victim words; returns whether it had been made a victim.
    pub fn end_lock_wait(&self, i: usize) -> bool {
        self.word(i, S_DL_WAIT).store(0, Ordering::SeqCst);
        self.word(i, S_DL_VICTIM).swap(0, Ordering::SeqCst) != 0
    }

    /// Context `i`'s protection ranges in this process: its own local data stays writable;
    /// every other context's local data is foreign. `(addr, len)` pairs.
    pub fn foreign_ranges(&self, i: usize) -> Vec<(usize, usize)> {
        (0..self.slots)
            .filter(|&j| j != i)
            .map(|j| {
                let (o, l) = Self::local(j);
                (self.region.addr() + o, l)
            })
            .collect()
    }

    /// Where context `i`'s fault handler publishes the address of a fatal fault.
    pub fn fault_addr_word(&self, i: usize) -> &AtomicU64 {
        self.region.atomic_u64(Self::slot_off(i) + S_FAULT_ADDR)
    }

    /// Why context `i`'s last process was let die by its handler (`sys::wtrap::ILLEGAL_*`),
    /// 0 if not for an illegal access.
    pub fn illegal_kind(&self, i: usize) -> u32 {
        self.word(i, S_ILLEGAL).load(Ordering::SeqCst)
    }

    /// Module side (levels 1–3): the write-back of the current request was rejected.
    pub fn set_violation(&self, i: usize, why: &str) {
        let mut b = [0u8; VIOLATION_MAX];
        let n = why.len().min(VIOLATION_MAX - 2);
        b[0..2].copy_from_slice(&(n as u16).to_le_bytes());
        b[2..2 + n].copy_from_slice(&why.as_bytes()[..n]);
        self.region.write(Self::slot_off(i) + S_VIOLATION, &b);
        self.word(i, S_REJECT).store(1, Ordering::SeqCst);
    }

    /// Host side: the rejection reason of context `i`'s last request, if its write-back was
    /// rejected.
    pub fn violation(&self, i: usize) -> Option<String> {
        if self.word(i, S_REJECT).load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut b = [0u8; VIOLATION_MAX];
        self.region.read(Self::slot_off(i) + S_VIOLATION, &mut b);
        let n = usize::from(u16::from_le_bytes([b[0], b[1]])).min(VIOLATION_MAX - 2);
        Some(String::from_utf8_lossy(&b[2..2 + n]).into_owned())
    }

    /// Context `i`'s global-write flag and culprit words (they live as long as the ring).
    pub fn trap_words(&self, i: usize) -> (&AtomicU32, &AtomicU32) {
        (self.word(i, S_GFLAG), self.word(i, S_ILLEGAL))
    }

    /// Module side: context `i` waits for work in its own slot and serves it forever with
    /// `serve(fault, request)`; `after` runs once each reply is out (re-protection).
    pub fn serve(
        &self,
        i: usize,
        mut serve: impl FnMut(u32, &[u8]) -> Vec<u8>,
        mut idle_fault: impl FnMut(u32),
        mut after: impl FnMut(),
    ) -> ! {
        let me = sys::Pid::this().as_raw() as u32;
        let off = Self::slot_off(i);
        let st = self.state(i);
        let mut buf = Vec::new();
        loop {
            let f = self.word(i, S_IDLE_FAULT).swap(0, Ordering::AcqRel);
            if f != 0 {
                idle_fault(f);
            }
            if st.load(Ordering::Acquire) == REQUEST {
                // Name the claimer before claiming: a RUNNING slot always carries the pid of
                // the process running it, so a late death report for an older generation can
                // never be pinned on a request the new generation is serving.
                self.word(i, S_PID).store(me, Ordering::SeqCst);
                if st
                    .compare_exchange(REQUEST, RUNNING, Ordering::SeqCst, Ordering::Acquire)
                    .is_ok()
                {
                    let n = (self.word(i, S_LEN).load(Ordering::Acquire) as usize).min(SLOT_BUF);
                    buf.resize(n, 0);
                    self.region.read(off + SLOT_HDR, &mut buf);
                    let fault = self.word(i, S_FAULT).load(Ordering::Relaxed);
                    let reply = serve(fault, &buf);
                    let n = reply.len().min(SLOT_BUF);
                    self.region.write(off + SLOT_HDR, &reply[..n]);
                    self.word(i, S_LEN).store(n as u32, Ordering::Release);
                    // Only if still ours: the host may have given up on us after a deadline.
                    if st
                        .compare_exchange(RUNNING, REPLY, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        self.wake(i, S_HOST_SLEEPS);
                    }
                    after();
                    continue;
                }
            }
            let t = Instant::now();
            while t.elapsed() < spin() && st.load(Ordering::Acquire) != REQUEST {
                std::thread::yield_now();
            }
            let sleeps = self.word(i, S_WORKER_SLEEPS);
            sleeps.store(1, Ordering::SeqCst);
            let cur = st.load(Ordering::SeqCst);
            if cur != REQUEST && self.word(i, S_IDLE_FAULT).load(Ordering::SeqCst) == 0 {
                let _ = futex_wait(st, cur, Some(Duration::from_secs(1)));
            }
            sleeps.store(0, Ordering::SeqCst);
        }
    }
}

impl crate::pm::SiteWords for Ring {
    fn site(&self) -> (u32, u32, u64, &AtomicU64) {
        Ring::site(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_death_report_fails_only_the_dead_processs_slots() {
        let r = Ring::create(2).unwrap();
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
        let r = std::sync::Arc::new(Ring::create(2).unwrap());
        let s = r.clone();
        std::thread::spawn(move || {
            s.serve(
                0,
                |fault, req| {
                    if fault == 9 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    req.iter().rev().copied().collect()
                },
                |_| {},
                || {},
            )
        });
        let out = r.roundtrip(
            0,
            b"abc",
            0,
            Duration::from_secs(5),
            Duration::from_secs(1),
            || {},
            || {},
        );
        assert_eq!(out.unwrap(), b"cba");
        // A request over its deadline: the kill callback runs, and with no supervisor to confirm
        // a death the host takes the slot back after the grace period and reports a hang.
        let mut killed = false;
        let mut slow = false;
        let out = r.roundtrip(
            0,
            b"x",
            9,
            Duration::from_millis(50),
            Duration::from_millis(50),
            || killed = true,
            || slow = true,
        );
        assert!(killed);
        assert!(slow, "a wait past gate::SLOW reports itself");
        assert_eq!(out, Err(Failure::Hung));
    }
}
