//! Deadlock detection and breaking at level 4 (paper 001).
//!
//! **Reporting.** A context that cannot take a lock publishes "context i waits for lock-table
//! slot s" in its ring slot header (`Ring::set_lock_wait`, written by `HostPm::lock`) and clears
//! it when it gets the lock. Who holds each slot is already in the store's lock table (the
//! holder of a slot is `Owner(j + 1)` for context j).
//!
//! **Checking.** A host thread wakes every `interval`, snapshots the waits and, for each, the
//! holder of the slot waited for: that is the wait-for graph between contexts. A context waits
//! for at most one lock and a slot has at most one holder, so every node has at most one
//! outgoing edge and the cycles are disjoint ([`find_cycles`]). A cycle found in one snapshot
//! is confirmed by a second read: each member still waits with the same wait sequence number
//! (so it waited without a break between the two reads) and the same holders. A waiting
//! context cannot release anything (its locks are released only when its request ends), so
//! the holders of a cycle whose members all waited throughout cannot have changed: the
//! confirmed cycle is a real deadlock, never an artefact of a torn snapshot.
//!
//! **Breaking.** One member is the victim: its lock is *taken away* by rolling its request back.
//! It cannot simply be handed to the next waiter: with strict two-phase locking and an undo
//! log, the victim's uncommitted changes under that lock are still in place, so the other
//! request would read them (a dirty read), and the victim's later rollback would overwrite
//! whatever the other request committed meanwhile. So the checker sets the victim's flag and
//! wakes it; its `lock` returns `DEADLOCK_VICTIM`, which the module propagates like any error;
//! the host, seeing its own flag, rolls the request back with the undo log (restoring the data
//! and releasing every lock it held), waits until the lock the victim was waiting for is free
//! (its holder — the next member of the cycle — finishes now) plus a short random back-off
//! (so the two do not meet in the same place again at once), and runs the request again from
//! the start. The FUSE client sees nothing: no EIO, no module failure, no restart.
//!
//! **Victim choice: the youngest request** (latest first start; a re-executed request keeps
//! the start of its first attempt). The paper picks at random; youngest loses the least work
//! (it has run the shortest) and guarantees progress: the oldest request in the system is never
//! chosen, so every request eventually becomes the oldest and completes (no starvation, the
//! reasoning behind wait-die/wound-wait).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::ring::Ring;
use crate::store::{Owner, Store};

/// Default checker period. A deadlock costs at most this plus the victim's wake-up; the check
/// itself reads two words per context, so a shorter period costs nothing measurable either
/// (see `docs/fs.md`, "Deadlock detection").
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// A victim re-executed this many times for one request gets `EDEADLK` instead (a bound, never
/// expected to be reached: the youngest-victim rule lets the oldest request finish).
const MAX_REEXECUTIONS: u32 = 100;

/// Deadlock counters, part of `Stats` and of the status JSON.
#[derive(Debug, Default)]
pub struct DeadlockStats {
    /// Confirmed cycles.
    pub detected: AtomicU64,
    /// Victims rolled back (their locks taken away) and sent to run again.
    pub broken: AtomicU64,
    /// Requests that gave up on a lock wait without the checker (last-resort timeout).
    pub timeouts: AtomicU64,
    /// Last cycle: from its completion (the latest member's wait start) to its confirmation.
    pub last_detect_us: AtomicU64,
    /// Last cycle: from its confirmation to the victim's rollback done (locks free).
    pub last_break_us: AtomicU64,
    /// Checker rounds run.
    pub checks: AtomicU64,
}

impl DeadlockStats {
    /// Adds the counters to a status object.
    pub fn add_json(&self, j: &mut serde_json::Value) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        j["deadlocks_detected"] = l(&self.detected).into();
        j["deadlocks_broken"] = l(&self.broken).into();
        j["deadlock_timeouts"] = l(&self.timeouts).into();
        j["last_deadlock_detect_us"] = l(&self.last_detect_us).into();
        j["last_deadlock_break_us"] = l(&self.last_break_us).into();
        j["deadlock_checks"] = l(&self.checks).into();
    }
}

/// The wait-for graph's cycles. `waits_for[i]` is the context `i` waits for (`None`: not
/// waiting, or waiting for a lock no context holds). Every node has at most one outgoing
/// edge, so cycles are disjoint; each is returned once, starting at its smallest member.
pub fn find_cycles(waits_for: &[Option<usize>]) -> Vec<Vec<usize>> {
    let n = waits_for.len();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut state = vec![0u8; n];
    let mut cycles = Vec::new();
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        let mut path = Vec::new();
        let mut v = start;
        loop {
            state[v] = 1;
            path.push(v);
            match waits_for[v] {
                Some(w) if w < n && state[w] == 0 => v = w,
                Some(w) if w < n && state[w] == 1 => {
                    // Back on the current path: the part from w on is a cycle.
                    let at = path.iter().position(|&p| p == w).expect("w is on the path");
                    let mut c = path[at..].to_vec();
                    let min = (0..c.len()).min_by_key(|&k| c[k]).expect("non-empty");
                    c.rotate_left(min);
                    cycles.push(c);
                    break;
                }
                _ => break,
            }
        }
        for p in path {
            state[p] = 2;
        }
    }
    cycles
}

/// Per-context state the checker and the request path share (host memory).
#[derive(Debug)]
struct Shared {
    ring: Arc<Ring>,
    store: Arc<Store>,
    stats: Arc<crate::backend::Stats>,
    /// Monotonic µs when the context's current request first started (0: idle).
    started: Vec<AtomicU64>,
    /// Monotonic µs when the checker made the context a victim (0: not one).
    victim_at: Vec<AtomicU64>,
    /// The slot the victim was waiting for, plus one.
    victim_slot: Vec<AtomicU64>,
    interval: Duration,
    stop: AtomicBool,
}

/// The detector of one level-4 backend: its shared state and (unless disabled) its thread.
#[derive(Debug)]
pub struct Detector {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn now_us() -> u64 {
    sys::clock::monotonic_ns() / 1000
}

impl Detector {
    /// Starts the checker over `ring`'s contexts every `interval` (zero: no checker; lock waits
    /// then end only with the lock or the last-resort timeout).
    pub fn start(
        ring: Arc<Ring>,
        store: Arc<Store>,
        stats: Arc<crate::backend::Stats>,
        interval: Duration,
    ) -> std::io::Result<Detector> {
        let n = ring.slots();
        let shared = Arc::new(Shared {
            ring,
            store,
            stats,
            started: (0..n).map(|_| AtomicU64::new(0)).collect(),
            victim_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            victim_slot: (0..n).map(|_| AtomicU64::new(0)).collect(),
            interval,
            stop: AtomicBool::new(false),
        });
        let thread = if interval.is_zero() {
            None
        } else {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("fs-deadlock".into())
                    .spawn(move || {
                        while !s.stop.load(Ordering::Acquire) {
                            std::thread::sleep(s.interval);
                            check(&s);
                        }
                    })?,
            )
        };
        Ok(Detector { shared, thread })
    }

    /// The checker period (zero: off).
    pub fn interval(&self) -> Duration {
        self.shared.interval
    }

    /// A request starts in context `slot` (its first attempt).
    pub fn begin(&self, slot: usize) {
        self.shared.started[slot].store(now_us(), Ordering::Release);
    }

    /// The request in context `slot` is over.
    pub fn end(&self, slot: usize) {
        self.shared.started[slot].store(0, Ordering::Release);
        self.shared.ring.end_lock_wait(slot);
    }

    /// After an attempt of context `slot`'s request answered: `true` if the checker had made it
    /// a victim. The caller must then roll the request back (taking its locks away) and call
    /// [`Detector::victim_rolled_back`].
    /// `deadlock_err`: the attempt answered [`crate::pm::DEADLOCK_VICTIM`] (without the flag,
    /// that is the last-resort timeout, counted here).
    pub fn was_victim(&self, slot: usize, deadlock_err: bool) -> bool {
        let flagged = self.shared.ring.end_lock_wait(slot);
        let victim = flagged || self.shared.victim_at[slot].load(Ordering::Acquire) != 0;
        if deadlock_err && !victim {
            self.shared
                .stats
                .deadlock
                .timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
        victim
    }

    /// The victim's request in context `slot` is rolled back: counts the break, suspends the
    /// request until the lock it waited for is free (bounded) plus a short random back-off,
    /// and says whether to run it again (`false`: too many re-executions, answer `EDEADLK`).
    pub fn victim_rolled_back(&self, slot: usize, reexecutions: u32) -> bool {
        let s = &self.shared;
        let at = s.victim_at[slot].swap(0, Ordering::AcqRel);
        let waited = s.victim_slot[slot].swap(0, Ordering::AcqRel);
        let d = &s.stats.deadlock;
        d.broken.fetch_add(1, Ordering::Relaxed);
        if at != 0 {
            d.last_break_us
                .store(now_us().saturating_sub(at), Ordering::Relaxed);
        }
        if waited != 0 {
            let t = Instant::now();
            while s.store.lock_holder(waited as usize - 1).is_some()
                && t.elapsed() < Duration::from_millis(200)
            {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        // A random pause of up to 200 µs per re-execution so far: two requests that keep
        // meeting in the same cycle drift apart.
        let jitter = now_us().wrapping_mul(0x9e37_79b9) % 200;
        std::thread::sleep(Duration::from_micros(
            jitter * u64::from(reexecutions.clamp(1, 10)),
        ));
        reexecutions < MAX_REEXECUTIONS
    }

    /// The lock waits right now, for status: `[{context, lock_slot, holder_context, waited_ms}]`.
    pub fn waits_json(&self) -> serde_json::Value {
        let s = &self.shared;
        let now = now_us();
        let v: Vec<serde_json::Value> = (0..s.ring.slots())
            .filter_map(|i| {
                let (slot, _, since) = s.ring.lock_wait(i)?;
                let holder = holder_context(&s.store, slot, s.ring.slots());
                Some(serde_json::json!({
                    "context": i,
                    "lock_slot": slot,
                    "holder_context": holder,
                    "waited_ms": now.saturating_sub(since) / 1000,
                }))
            })
            .collect();
        v.into()
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The context holding lock-table slot `slot`, if a context holds it.
fn holder_context(store: &Store, slot: usize, n: usize) -> Option<usize> {
    match store.lock_holder(slot) {
        Some(Owner(o)) if o >= 1 && (o as usize) <= n => Some(o as usize - 1),
        _ => None,
    }
}

/// One snapshot of the wait-for graph: per context, (slot waited for, wait sequence, since)
/// and the context holding that slot.
type Snapshot = Vec<Option<((usize, u32, u64), Option<usize>)>>;

fn snapshot(s: &Shared) -> Snapshot {
    let n = s.ring.slots();
    (0..n)
        .map(|i| {
            let w = s.ring.lock_wait(i)?;
            let h = holder_context(&s.store, w.0, n).filter(|&h| h != i);
            Some((w, h))
        })
        .collect()
}

/// One round of the checker: find cycles, confirm them, break each.
fn check(s: &Shared) {
    s.stats.deadlock.checks.fetch_add(1, Ordering::Relaxed);
    let first = snapshot(s);
    let edges: Vec<Option<usize>> = first.iter().map(|w| w.and_then(|(_, h)| h)).collect();
    if edges.iter().all(Option::is_none) {
        return;
    }
    let cycles = find_cycles(&edges);
    if cycles.is_empty() {
        return;
    }
    let second = snapshot(s);
    for c in cycles {
        // Confirmed only if every member waited without a break between the two reads, for
        // the same slot held by the same context (see the module documentation).
        let same = c
            .iter()
            .all(|&i| first[i].is_some() && first[i] == second[i]);
        // A victim already chosen in this cycle is on its way out: do not choose another.
        let pending = c
            .iter()
            .any(|&i| s.victim_at[i].load(Ordering::Acquire) != 0);
        if !same || pending {
            continue;
        }
        let now = now_us();
        let formed = c
            .iter()
            .filter_map(|&i| first[i].map(|((_, _, since), _)| since))
            .max()
            .unwrap_or(now);
        // Youngest: latest first start (ties: the highest context, an arbitrary fixed choice).
        let victim = *c
            .iter()
            .max_by_key(|&&i| (s.started[i].load(Ordering::Acquire), i))
            .expect("a cycle has members");
        let waited = first[victim].map_or(0, |((slot, _, _), _)| slot as u64 + 1);
        let d = &s.stats.deadlock;
        d.detected.fetch_add(1, Ordering::Relaxed);
        d.last_detect_us
            .store(now.saturating_sub(formed), Ordering::Relaxed);
        tracing::info!(cycle = ?c, victim, "deadlock: breaking the cycle by rolling back the youngest request");
        s.victim_slot[victim].store(waited, Ordering::Release);
        s.victim_at[victim].store(now.max(1), Ordering::Release);
        s.ring.make_victim(victim);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Whether `v` lies on a cycle: following edges from `v` comes back to `v`.
    fn on_cycle(g: &[Option<usize>], v: usize) -> bool {
        let mut x = v;
        for _ in 0..g.len() {
            match g[x] {
                Some(w) if w < g.len() => x = w,
                _ => return false,
            }
            if x == v {
                return true;
            }
        }
        false
    }

    #[test]
    fn two_and_three_cycles_and_a_tail() {
        // 0 ⇄ 1; 2 → 3 → 4 → 2; 5 → 0 (a tail into a cycle); 6 idle; 7 → 7 cannot happen (a
        // context never waits for itself) but is still a cycle of one.
        let g = [
            Some(1),
            Some(0),
            Some(3),
            Some(4),
            Some(2),
            Some(0),
            None,
            Some(7),
        ];
        assert_eq!(find_cycles(&g), vec![vec![0, 1], vec![2, 3, 4], vec![7]]);
        assert!(find_cycles(&[None, Some(0), Some(1)]).is_empty());
    }

    proptest! {
        /// Random functional graphs (every node waits for at most one other): every node on a
        /// cycle is found in exactly one reported cycle, every reported cycle is a real one, and
        /// nothing off a cycle is reported.
        #[test]
        fn every_cycle_found_and_no_false_positive(
            g in proptest::collection::vec(proptest::option::of(0usize..12), 0..12)
        ) {
            let g: Vec<Option<usize>> = g.into_iter().map(|e| e.filter(|&w| w < 12)).collect();
            let cycles = find_cycles(&g);
            let mut seen = vec![0; g.len()];
            for c in &cycles {
                prop_assert!(!c.is_empty());
                for (k, &v) in c.iter().enumerate() {
                    seen[v] += 1;
                    prop_assert_eq!(g[v], Some(c[(k + 1) % c.len()]), "not an edge");
                }
            }
            for v in 0..g.len() {
                prop_assert_eq!(seen[v], usize::from(on_cycle(&g, v)), "node {}", v);
            }
        }
    }

    #[test]
    fn checker_breaks_a_two_context_cycle_in_the_lock_table() {
        let ring = Arc::new(Ring::create(3).unwrap());
        let store = Store::create(1 << 20).unwrap();
        let stats = Arc::new(crate::backend::Stats::default());
        let det = Detector::start(
            ring.clone(),
            store.clone(),
            stats.clone(),
            Duration::from_millis(5),
        )
        .unwrap();
        // Context 0 holds slot 10 and waits for 20; context 1 holds 20 and waits for 10;
        // context 2 waits for 10 too (a tail, not in the cycle). Context 1 started last.
        assert_eq!(store.try_lock(10, Owner(1)), Some(true));
        assert_eq!(store.try_lock(20, Owner(2)), Some(true));
        det.begin(0);
        det.begin(2);
        std::thread::sleep(Duration::from_millis(2));
        det.begin(1);
        ring.set_lock_wait(0, Some(20));
        ring.set_lock_wait(2, Some(10));
        ring.set_lock_wait(1, Some(10));
        let t = Instant::now();
        while ring.victim_word(1).load(Ordering::SeqCst) == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "no victim chosen");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ring.victim_word(0).load(Ordering::SeqCst), 0);
        assert_eq!(ring.victim_word(2).load(Ordering::SeqCst), 0);
        assert_eq!(stats.deadlock.detected.load(Ordering::SeqCst), 1);
        assert!(det.was_victim(1, true));
        // The host rolls the victim back: its locks go, the cycle is gone.
        store.release_all(Owner(2));
        // Context 0 gets slot 20 and finishes: slot 10 (the one the victim waited for) frees.
        ring.set_lock_wait(0, None);
        store.release_all(Owner(1));
        assert!(det.victim_rolled_back(1, 1));
        assert_eq!(stats.deadlock.broken.load(Ordering::SeqCst), 1);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            stats.deadlock.detected.load(Ordering::SeqCst),
            1,
            "no new cycle"
        );
    }

    #[test]
    fn a_chain_without_a_cycle_is_left_alone() {
        let ring = Arc::new(Ring::create(2).unwrap());
        let store = Store::create(1 << 20).unwrap();
        let stats = Arc::new(crate::backend::Stats::default());
        let _det = Detector::start(
            ring.clone(),
            store.clone(),
            stats.clone(),
            Duration::from_millis(2),
        )
        .unwrap();
        assert_eq!(store.try_lock(10, Owner(2)), Some(true));
        ring.set_lock_wait(0, Some(10));
        std::thread::sleep(Duration::from_millis(50));
        assert!(stats.deadlock.checks.load(Ordering::SeqCst) > 0);
        assert_eq!(stats.deadlock.detected.load(Ordering::SeqCst), 0);
        assert_eq!(ring.victim_word(0).load(Ordering::SeqCst), 0);
    }
}
