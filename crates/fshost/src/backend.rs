//! How the host reaches the module at each protection level.
//!
//! - Level 5 ([`Backend::Direct`]): the module is linked into the host and called directly with
//!   an unlogged protection manager. A panic is caught and answered EIO (safe Rust's only
//!   containment); a segfault or kill ends the host, and with it the mount.
//! - Level 4 ([`Backend::Remote`]): the module runs in its own processes, one per *context*
//!   (request slot), each supervised by rfork; requests go through the shared-memory [`Ring`],
//!   host-data changes through the undo log. What happens when a context faults is the
//!   [`Recovery`] rung: *contain* (issue 6: a context that wrote no global data is aborted
//!   alone, everyone else keeps being served), *restart* (issue 4: roll back, restart the
//!   module, retry once) or *none* (the stock baseline: the first fault ends the file system).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fsapi::{Errno, Module};

use crate::check::Layouts;
use crate::pm::{Access, Fault, HostPm, LocalSites, Probes, SiteCtx, WriteBackError};
use crate::ring::{Failure, Ring};
use crate::store::{Owner, Store};
use crate::wire::{Op, Reply, Request, execute};

/// Protection level (paper 001, Table 4): which techniques protect the host from the module.
///
/// | technique | L1 | L2 | L3 | L4 | L5 |
/// |---|---|---|---|---|---|
/// | shared-memory protection outside protection-manager code | unmapped | read-only | – | – | – |
/// | duplication + semantic checks | ✓ | ✓ | ✓ | – | – |
/// | separate address space (module contexts) | ✓ | ✓ | ✓ | ✓ | – |
/// | undo log | ✓ | ✓ | ✓ | ✓ | – |
/// | deadlock detection | ✓ | ✓ | ✓ | ✓ | – |
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Level {
    L1,
    L2,
    L3,
    L4,
    L5,
}

impl Level {
    pub fn number(self) -> u8 {
        match self {
            Level::L1 => 1,
            Level::L2 => 2,
            Level::L3 => 3,
            Level::L4 => 4,
            Level::L5 => 5,
        }
    }
    /// Parses 1 to 5.
    pub fn from_number(n: u8) -> Result<Level, String> {
        match n {
            1 => Ok(Level::L1),
            2 => Ok(Level::L2),
            3 => Ok(Level::L3),
            4 => Ok(Level::L4),
            5 => Ok(Level::L5),
            _ => Err(format!(
                "protection level {n} does not exist: levels are 1 (most protected) to 5 (none)"
            )),
        }
    }
    /// Levels 1–4 run the module in its own processes.
    pub fn separate(self) -> bool {
        self != Level::L5
    }
    /// Levels 1–3: the module works on copies, checked on write-back.
    pub fn duplication(self) -> bool {
        matches!(self, Level::L1 | Level::L2 | Level::L3)
    }
    /// How the module's processes may reach the shared block area.
    pub fn access(self) -> Access {
        match self {
            Level::L1 => Access::Unmapped,
            Level::L2 => Access::ReadOnly,
            _ => Access::Mapped,
        }
    }
    /// The techniques in force, for status and reports.
    pub fn techniques(self) -> Vec<&'static str> {
        let mut t = Vec::new();
        match self {
            Level::L1 => t.push("shared memory unmapped"),
            Level::L2 => t.push("shared memory read-only"),
            _ => {}
        }
        if self.duplication() {
            t.push("duplication + checks");
        }
        if self.separate() {
            t.extend(["separate address space", "undo log", "deadlock detection"]);
        }
        t
    }
}

/// What to do with a request whose module died under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OnCrash {
    /// Roll back and run it once more on the restarted module; EIO if that fails too.
    Retry,
    /// Roll back and answer EIO.
    Eio,
}

/// Counters shown by `kintsugi fsctl MOUNTPOINT status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub module_failures: AtomicU64,
    pub restarts: AtomicU64,
    pub rolled_back_entries: AtomicU64,
    pub retries: AtomicU64,
    pub eio: AtomicU64,
    /// Failure detected → retried request answered, last time (µs).
    pub last_recovery_us: AtomicU64,
    pub worker_pid: AtomicI32,
    pub gave_up: AtomicBool,
    /// Containment (issue 6): faults aborted in their context alone.
    pub contained: AtomicU64,
    /// Faults escalated to a module restart (global flag, failed verification, repeats).
    pub escalations: AtomicU64,
    pub repeat_escalations: AtomicU64,
    pub verify_failures: AtomicU64,
    /// Contexts aborted because they served the faulting client's process group.
    pub group_aborts: AtomicU64,
    pub killed_clients: AtomicU64,
    /// Issue 5's detections: write-backs the semantic checks rejected (levels 1–3), module
    /// accesses to protected shared memory (levels 1–2), accesses to host-private data (1–4).
    pub check_rejections: AtomicU64,
    pub shm_violations: AtomicU64,
    pub host_violations: AtomicU64,
    /// The last module error the host detected, in words (address, what it hit, the rule).
    pub last_error: Mutex<String>,
    /// Deadlock detection and breaking (`deadlock.rs`).
    pub deadlock: crate::deadlock::DeadlockStats,
}

impl Stats {
    pub fn json(&self, level: Level, module: &str) -> serde_json::Value {
        let mut j = self.json_base(level, module);
        self.deadlock.add_json(&mut j);
        j
    }

    fn json_base(&self, level: Level, module: &str) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "host_pid": sys::Pid::this().as_raw(),
            "module": module,
            "level": level.number(),
            "module_pid": self.worker_pid.load(Ordering::Relaxed),
            "requests": l(&self.requests),
            "module_failures": l(&self.module_failures),
            "restarts": l(&self.restarts),
            "rolled_back_entries": l(&self.rolled_back_entries),
            "retries": l(&self.retries),
            "eio": l(&self.eio),
            "last_recovery_us": l(&self.last_recovery_us),
            "gave_up": self.gave_up.load(Ordering::Relaxed),
            "contained": l(&self.contained),
            "escalations": l(&self.escalations),
            "repeat_escalations": l(&self.repeat_escalations),
            "verify_failures": l(&self.verify_failures),
            "group_aborts": l(&self.group_aborts),
            "killed_clients": l(&self.killed_clients),
            "techniques": level.techniques(),
            "check_rejections": l(&self.check_rejections),
            "shm_violations": l(&self.shm_violations),
            "host_violations": l(&self.host_violations),
            "last_error": *self.last_error.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}

/// Level 5 state: the module itself.
pub struct Direct {
    module: Box<dyn Module>,
    attached: bool,
    sites: LocalSites,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Direct({}, attached: {})",
            self.module.name(),
            self.attached
        )
    }
}

/// What the host does when a module context faults at level 4: the rungs of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Recovery {
    /// Process-local containment (issue 6): a fault in a context whose global-write flag is
    /// clear aborts that context only (its request gets EIO, its locks are released); a set
    /// flag, a failed verification or repeated local errors on the same data escalate to
    /// `Restart`.
    Contain,
    /// Every fault rolls the request back and restarts the module (all contexts), then the
    /// request is retried once (issue 4's rung).
    Restart,
    /// No recovery: the first fault ends the file system (every request EIO), as a kernel
    /// panic ends stock xv6. The campaign's baseline.
    None,
}

impl Recovery {
    pub fn parse(s: &str) -> Option<Recovery> {
        Some(match s {
            "contain" => Recovery::Contain,
            "restart" => Recovery::Restart,
            "none" => Recovery::None,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Recovery::Contain => "contain",
            Recovery::Restart => "restart",
            Recovery::None => "none",
        }
    }
}

/// What containment does to the client whose request faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OnLocalError {
    /// Its request gets EIO; the client lives on.
    Eio,
    /// The client process (and its process group, when it has its own) is killed, as the paper
    /// kills the faulting process.
    KillClient,
}

/// Level-4 tuning: contexts and the containment policy.
#[derive(Debug, Clone, Copy)]
pub struct ContextOpts {
    /// Module worker processes (concurrent requests), 1..=8.
    pub contexts: usize,
    pub recovery: Recovery,
    pub on_local_error: OnLocalError,
    /// This many local errors on the same data within `repeat_window` mean a latent global
    /// error: the last one escalates.
    pub repeat_limit: usize,
    pub repeat_window: Duration,
    /// Deadlock checker period (`deadlock.rs`); zero turns detection off.
    pub deadlock_interval: Duration,
}

impl Default for ContextOpts {
    fn default() -> ContextOpts {
        ContextOpts {
            contexts: 4,
            recovery: Recovery::Contain,
            on_local_error: OnLocalError::Eio,
            repeat_limit: 3,
            repeat_window: Duration::from_secs(10),
            deadlock_interval: crate::deadlock::DEFAULT_INTERVAL,
        }
    }
}

/// How the host ended a context on purpose, so its own caller knows what the death means.
const ABORT_NONE: u8 = 0;
/// Killed by a module restart another context escalated: roll back and retry.
const ABORT_COLLATERAL: u8 = 1;
/// Killed because it shares the faulting client's process group: roll back, EIO.
const ABORT_GROUP: u8 = 2;

/// Levels 1–4 state.
#[derive(Debug)]
pub struct Remote {
    level: Level,
    ring: Arc<Ring>,
    /// Free slots (contexts waiting for a request).
    pool: Mutex<Vec<usize>>,
    pool_cv: Condvar,
    deadline: Duration,
    on_crash: OnCrash,
    opts: ContextOpts,
    /// Worker pid per context.
    workers: Arc<Vec<AtomicI32>>,
    /// Client pid of the request each context runs (0: idle).
    clients: Vec<AtomicU32>,
    abort: Vec<AtomicU8>,
    /// Contexts to replace before their next request (a module restart found them idle).
    stale: Vec<AtomicBool>,
    /// Recent local errors per data key (containment's repeated-error rule).
    history: Mutex<HashMap<u64, VecDeque<Instant>>>,
    /// The deadlock checker and its per-context state.
    deadlock: crate::deadlock::Detector,
    /// The FUSE reader gate: a slow round trip lets another reader in.
    gate: Arc<crate::gate::Gate>,
    /// Keep the supervisors (and thus the module processes) alive; dropping them kills them.
    _supervisors: Vec<std::thread::JoinHandle<()>>,
}

/// The module, at some level, and the host's private data page (what issue 5's host-access
/// probe aims at; module processes unmap it).
#[derive(Debug)]
pub enum Backend {
    Direct(Mutex<Direct>, Arc<Store>, Arc<HostPage>),
    Remote(Box<Remote>, Arc<Store>, Arc<HostPage>),
}

/// A page of host-private ("kernel") data: the host's identity record. Never shared with the
/// module: module processes are forked from the host, so each unmaps its copy at start, and a
/// module that reaches for it faults, as a user process reaching for kernel memory does. At
/// level 5 the module runs inside the host and nothing stops it.
#[derive(Debug)]
pub struct HostPage(sys::fault::PrivatePage);

impl HostPage {
    fn new() -> Result<Arc<HostPage>, crate::HostError> {
        let mut rec = Vec::from(*b"kintsugi-host-data\0");
        rec.extend_from_slice(&sys::Pid::this().as_raw().to_le_bytes());
        sys::fault::PrivatePage::new(&rec)
            .map(|p| Arc::new(HostPage(p)))
            .map_err(|e| crate::HostError::ModuleStart(format!("host data page: {e}")))
    }
    fn addr(&self) -> usize {
        self.0.addr()
    }
    fn contains(&self, a: usize) -> bool {
        a >= self.addr() && a < self.addr() + sys::fault::PrivatePage::LEN
    }
}

const DIRECT_OWNER: Owner = Owner(255);

impl Backend {
    /// The FUSE reader gate: one reader thread per context at levels 1–4, gated to as many
    /// reading as CPUs; a single thread (and so no gating) at level 5, where requests run in
    /// the reader thread itself.
    pub fn gate(&self) -> Arc<crate::gate::Gate> {
        match self {
            Backend::Direct(..) => Arc::new(crate::gate::Gate::new(1)),
            Backend::Remote(r, ..) => r.gate.clone(),
        }
    }

    /// Level 5: the module runs in this process.
    pub fn direct(module: Box<dyn Module>, store: Arc<Store>) -> Result<Backend, crate::HostError> {
        Ok(Backend::Direct(
            Mutex::new(Direct {
                module,
                attached: false,
                sites: LocalSites::default(),
            }),
            store,
            HostPage::new()?,
        ))
    }

    /// Levels 1–4: rforks one supervised module process per context. Must be called while this
    /// process has one thread (before the FUSE session starts), as fork requires.
    pub fn remote(
        level: Level,
        module: Box<dyn Module>,
        store: Arc<Store>,
        deadline: Duration,
        on_crash: OnCrash,
        opts: ContextOpts,
        stats: Arc<Stats>,
    ) -> Result<Backend, crate::HostError> {
        let n = opts.contexts.clamp(1, crate::ring::MAX_SLOTS);
        let ring = Arc::new(Ring::create(n).map_err(crate::HostError::Ring)?);
        let workers: Arc<Vec<AtomicI32>> = Arc::new((0..n).map(|_| AtomicI32::new(0)).collect());
        let module: Arc<Mutex<Box<dyn Module>>> = Arc::new(Mutex::new(module));
        let page = HostPage::new()?;
        let mut sups = Vec::new();
        for i in 0..n {
            let sup = spawn_context(
                i,
                module.clone(),
                store.clone(),
                ring.clone(),
                opts,
                level,
                page.clone(),
            )?;
            sups.push(supervise(
                i,
                sup,
                ring.clone(),
                workers.clone(),
                stats.clone(),
            )?);
        }
        stats
            .worker_pid
            .store(workers[0].load(Ordering::Acquire), Ordering::Release);
        let deadlock = crate::deadlock::Detector::start(
            ring.clone(),
            store.clone(),
            stats.clone(),
            opts.deadlock_interval,
        )
        .map_err(|e| crate::HostError::ModuleStart(format!("deadlock checker: {e}")))?;
        Ok(Backend::Remote(
            Box::new(Remote {
                level,
                ring,
                pool: Mutex::new((0..n).rev().collect()),
                pool_cv: Condvar::new(),
                deadline,
                on_crash,
                opts: ContextOpts {
                    contexts: n,
                    ..opts
                },
                workers,
                clients: (0..n).map(|_| AtomicU32::new(0)).collect(),
                abort: (0..n).map(|_| AtomicU8::new(ABORT_NONE)).collect(),
                stale: (0..n).map(|_| AtomicBool::new(false)).collect(),
                history: Mutex::new(HashMap::new()),
                deadlock,
                gate: Arc::new(crate::gate::Gate::new(n)),
                _supervisors: sups,
            }),
            store,
            page,
        ))
    }

    pub fn store(&self) -> &Arc<Store> {
        match self {
            Backend::Direct(_, s, _) | Backend::Remote(_, s, _) => s,
        }
    }

    /// Runs one request, containing module failures as the level allows.
    pub fn call(&self, req: Request, fault: Option<Fault>, stats: &Stats) -> Reply {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        match self {
            Backend::Direct(d, store, page) => call_direct(d, store, page, req, fault, stats),
            Backend::Remote(r, store, page) => call_remote(r, store, page, req, fault, stats),
        }
    }

    /// Delivers a fault to the module between requests (level 4 only).
    pub fn idle_fault(&self, fault: Fault) -> Result<(), String> {
        match self {
            Backend::Direct(..) => Err("level 5 has no isolation: an idle fault would take the whole mount down; mount with --level 4, or arm it for a request with --during".into()),
            Backend::Remote(r, ..) => {
                // To the context the next request will go to (the pool is LIFO), so a hang
                // while idle is met by that request's deadline.
                let next = r
                    .pool
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last()
                    .copied()
                    .unwrap_or(0);
                r.ring.post_idle_fault(next, fault.code());
                Ok(())
            }
        }
    }

    /// Arms fault site `site` (0: disarm) for client `pid` (0: any) — issue 6's campaign.
    pub fn arm_site(&self, site: u32, pid: u32, seed: u64) -> Result<(), String> {
        match self {
            Backend::Direct(d, ..) => {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .sites
                    .arm(site, pid, seed);
                Ok(())
            }
            Backend::Remote(r, ..) => {
                r.ring.arm_site(site, pid, seed);
                Ok(())
            }
        }
    }

    /// Activations of the armed site so far.
    pub fn site_hits(&self) -> u64 {
        match self {
            Backend::Direct(d, ..) => {
                use crate::pm::SiteWords;
                let d = d.lock().unwrap_or_else(|p| p.into_inner());
                d.sites.site().3.load(Ordering::SeqCst)
            }
            Backend::Remote(r, ..) => r.ring.site().3.load(Ordering::SeqCst),
        }
    }

    /// Level 4: the deadlock checker's period and the lock waits now, for status.
    pub fn deadlock_status(&self) -> Option<serde_json::Value> {
        match self {
            Backend::Direct(..) => None,
            Backend::Remote(r, ..) => Some(serde_json::json!({
                "interval_ms": r.deadlock.interval().as_millis() as u64,
                "lock_waits": r.deadlock.waits_json(),
            })),
        }
    }

    /// Level-4 settings (contexts, recovery rung), for status.
    pub fn context_opts(&self) -> Option<ContextOpts> {
        match self {
            Backend::Direct(..) => None,
            Backend::Remote(r, ..) => Some(r.opts),
        }
    }

    /// The module's whole-structure check plus the host's own (store header, lock table), with
    /// every context quiesced. Returns the problems (empty: clean).
    pub fn fsck(&self, stats: &Stats) -> Vec<String> {
        let run = |req| match self.call(req, None, stats) {
            Reply::Data(d) => String::from_utf8_lossy(&d)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
            Reply::Err(e) => vec![format!("the module could not run its check: {e}")],
            other => vec![format!("unexpected fsck reply {other:?}")],
        };
        let req = Request {
            ctx: fsapi::Ctx::default(),
            op: Op::Fsck,
        };
        match self {
            Backend::Direct(_, store, _) => {
                let mut p = run(req);
                p.extend(store.verify_header());
                p
            }
            Backend::Remote(r, store, _) => {
                // Quiesce: hold every slot but the one fsck runs in.
                let held: Vec<usize> = (1..r.opts.contexts).map(|_| r.acquire()).collect();
                let mut p = run(req);
                p.extend(store.verify_header());
                p.extend(store.verify_locks(&[]));
                for s in held {
                    r.release(s);
                }
                p
            }
        }
    }

    /// Level 5, in a host process restarted from its rfork-time image: the module's memory is
    /// that of the image, so it must re-read its state from the store before the next request,
    /// and locks the dead process held in the shared store are released. Returns how many.
    pub fn reattach_after_restart(&self) -> usize {
        match self {
            Backend::Direct(d, store, _) => {
                d.lock().unwrap_or_else(|p| p.into_inner()).attached = false;
                store.release_all(DIRECT_OWNER)
            }
            Backend::Remote(..) => 0,
        }
    }

    pub fn level(&self) -> Level {
        match self {
            Backend::Direct(..) => Level::L5,
            Backend::Remote(r, ..) => r.level,
        }
    }
}

fn call_direct(
    d: &Mutex<Direct>,
    store: &Store,
    page: &HostPage,
    req: Request,
    fault: Option<Fault>,
    stats: &Stats,
) -> Reply {
    let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
    let d = &mut *d;
    let sites = d.module.sites();
    let mut pm = HostPm::new(store, None, DIRECT_OWNER, fault).with_sites(SiteCtx {
        words: &d.sites,
        sites,
        client_pid: req.ctx.pid,
        probes: Probes {
            shared: store.block_addr(0).unwrap_or(0),
            host: page.addr(),
        },
    });
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if !d.attached && req.op != Op::Mkfs {
            d.module.attach(&mut pm).map_err(|e| {
                tracing::error!(
                    module = d.module.name(),
                    "module cannot attach to its store: {e}"
                );
                Errno::EIO
            })?;
            d.attached = true;
        }
        let mkfs = req.op == Op::Mkfs;
        let reply = execute(&mut *d.module, &mut pm, req);
        pm.finish();
        if mkfs && reply == Reply::Ok {
            d.attached = true;
        }
        Ok(reply)
    }));
    // Strict two-phase locking at every level: a module's `unlock` only checks that it holds
    // the lock, and the host releases all of a request's locks here, when it ends. (This used
    // to warn about "leaked" locks, once per changing request, for what is the normal end.)
    store.release_all(DIRECT_OWNER);
    match r {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => Reply::Err(e),
        Err(_) => {
            // No undo log at level 5: whatever the module changed before panicking stays.
            stats.module_failures.fetch_add(1, Ordering::Relaxed);
            stats.eio.fetch_add(1, Ordering::Relaxed);
            tracing::error!("module panicked (level 5: no rollback); answering EIO");
            Reply::Err(Errno::EIO)
        }
    }
}

impl Remote {
    /// Takes a free context, waiting for one.
    fn acquire(&self) -> usize {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(i) = pool.pop() {
                return i;
            }
            pool = self.pool_cv.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn release(&self, i: usize) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(i);
        self.pool_cv.notify_one();
    }

    fn kill_context(&self, i: usize) {
        if let Some(pid) = sys::Pid::from_raw(self.workers[i].load(Ordering::Acquire)) {
            let _ = sys::process::kill(pid, libc::SIGKILL);
        }
    }

    /// Escalation: restart the module, i.e. every context. Requests other contexts are running
    /// die with them, are rolled back by their callers and retried. Idle contexts are marked
    /// stale and replaced just before their next request, so the escalated request's retry
    /// does not wait for four simultaneous respawns on two CPUs. (`except`, the faulting
    /// context, is already dead or was just killed: its replacement is a fresh image.)
    fn restart_module(&self, except: usize) {
        for j in (0..self.opts.contexts).filter(|&j| j != except) {
            if self.clients[j].load(Ordering::Acquire) != 0 {
                self.abort[j].store(ABORT_COLLATERAL, Ordering::Release);
                self.kill_context(j);
            } else {
                self.stale[j].store(true, Ordering::Release);
            }
        }
    }

    /// Containment's repeated-error rule: records a local error on `key` and says whether it
    /// is the `repeat_limit`-th within the window.
    fn repeated(&self, key: Option<fsapi::Ino>) -> bool {
        let Some(key) = key else { return false };
        let now = Instant::now();
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let q = h.entry(key.0).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.opts.repeat_window)
        {
            q.pop_front();
        }
        q.push_back(now);
        q.len() >= self.opts.repeat_limit.max(1)
    }

    /// Lock owners of the contexts running a request, other than `except`.
    fn live_owners(&self, except: usize) -> Vec<Owner> {
        (0..self.opts.contexts)
            .filter(|&j| j != except && self.clients[j].load(Ordering::Acquire) != 0)
            .map(|j| Owner(j as u64 + 1))
            .collect()
    }

    /// The global data that must stay writable (lock table) and the store header, checked
    /// after a local error. Other contexts may be mid-update of the free count, hence the
    /// slack in the header check (done by `verify_header` against the bitmap).
    fn verify(&self, store: &Store, except: usize) -> Vec<String> {
        let live = self.live_owners(except);
        let mut p = store.verify_locks(&live);
        if live.is_empty() {
            p.extend(store.verify_header());
        }
        p
    }

    /// A contained fault: aborts the other contexts running for the same client process group
    /// (they share the state the faulting context was changing) and applies the client policy.
    fn contain(&self, slot: usize, client: u32, stats: &Stats) {
        let Some(cpid) = sys::Pid::from_raw(client as i32) else {
            return;
        };
        let pgid = sys::process::pgid_of(cpid);
        let own = sys::process::pgid_of(sys::Pid::this());
        let separate_group = pgid.is_some_and(|g| g.as_raw() > 1 && Some(g) != own);
        if separate_group {
            for j in 0..self.opts.contexts {
                let c = self.clients[j].load(Ordering::Acquire);
                if j == slot || c == 0 {
                    continue;
                }
                let same = sys::Pid::from_raw(c as i32)
                    .and_then(sys::process::pgid_of)
                    .is_some_and(|g| Some(g) == pgid);
                if same {
                    self.abort[j].store(ABORT_GROUP, Ordering::Release);
                    self.kill_context(j);
                    stats.group_aborts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.opts.on_local_error == OnLocalError::KillClient {
            let r = match pgid {
                Some(g) if separate_group => sys::process::kill_group(g, libc::SIGKILL),
                _ => sys::process::kill(cpid, libc::SIGKILL),
            };
            if r.is_ok() {
                stats.killed_clients.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What went wrong with one attempt of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Ring(Failure),
    /// The module answered EUCLEAN: its own check found an inconsistency.
    Check,
}

fn call_remote(
    r: &Remote,
    store: &Store,
    page: &HostPage,
    req: Request,
    fault: Option<Fault>,
    stats: &Stats,
) -> Reply {
    let slot = r.acquire();
    r.clients[slot].store(req.ctx.pid.max(1), Ordering::Release);
    if r.stale[slot].swap(false, Ordering::AcqRel) {
        // Replaced now; should the old process claim the request before it dies, the death
        // is a collateral one and the request is retried.
        r.abort[slot].store(ABORT_COLLATERAL, Ordering::Release);
        r.kill_context(slot);
    }
    r.deadlock.begin(slot);
    let reply = run_in_context(r, store, page, slot, &req, fault, stats);
    r.deadlock.end(slot);
    r.clients[slot].store(0, Ordering::Release);
    r.abort[slot].store(ABORT_NONE, Ordering::Release);
    r.release(slot);
    reply
}

fn run_in_context(
    r: &Remote,
    store: &Store,
    page: &HostPage,
    slot: usize,
    req: &Request,
    fault: Option<Fault>,
    stats: &Stats,
) -> Reply {
    let owner = Owner(slot as u64 + 1);
    let bytes = match bincode::serialize(req) {
        Ok(b) => b,
        Err(_) => return Reply::Err(Errno::EINVAL),
    };
    if bytes.len() > crate::ring::SLOT_BUF {
        return Reply::Err(Errno::EINVAL);
    }
    let log = r.ring.undo(slot);
    let mut fault = fault;
    let mut failed_at: Option<Instant> = None;
    let mut retried = false;
    let mut collateral = 0;
    let mut reexecutions = 0;
    loop {
        if stats.gave_up.load(Ordering::Acquire) {
            stats.eio.fetch_add(1, Ordering::Relaxed);
            return Reply::Err(Errno::EIO);
        }
        let code = fault.take().map_or(0, Fault::code);
        let outcome = r.ring.roundtrip(
            slot,
            &bytes,
            code,
            r.deadline,
            Duration::from_secs(5),
            || r.kill_context(slot),
            || r.gate.slow(),
        );
        let fail = match outcome {
            Ok(out) => {
                let reply = bincode::deserialize::<Reply>(&out).unwrap_or(Reply::Err(Errno::EIO));
                // Deadlock victim (deadlock.rs): roll back, which takes its locks away, wait
                // until the cycle has drained, run again. Not a module failure.
                let dl_err = reply == Reply::Err(crate::pm::DEADLOCK_VICTIM);
                if r.deadlock.was_victim(slot, dl_err) {
                    let n = log.rollback(store, owner);
                    stats
                        .rolled_back_entries
                        .fetch_add(n as u64, Ordering::Relaxed);
                    reexecutions += 1;
                    if r.deadlock.victim_rolled_back(slot, reexecutions) {
                        continue;
                    }
                    return Reply::Err(crate::pm::DEADLOCK_VICTIM);
                }
                match reply {
                    Reply::Err(Errno::EUCLEAN) => Fail::Check,
                    Reply::Err(_) => {
                        // A refused request leaves no trace either (e.g. ENOSPC half-way).
                        let n = log.rollback(store, owner);
                        stats
                            .rolled_back_entries
                            .fetch_add(n as u64, Ordering::Relaxed);
                        return reply;
                    }
                    _ => {
                        log.commit(store, owner);
                        if let Some(t) = failed_at {
                            stats
                                .last_recovery_us
                                .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                        }
                        return reply;
                    }
                }
            }
            Err(f) => Fail::Ring(f),
        };
        failed_at.get_or_insert_with(Instant::now);
        note_detection(r, page, slot, fail, stats);
        let global = r.ring.global_flag(slot);
        let illegal = r.ring.illegal_write(slot);
        let n = log.rollback(store, owner);
        stats
            .rolled_back_entries
            .fetch_add(n as u64, Ordering::Relaxed);
        match r.abort[slot].swap(ABORT_NONE, Ordering::AcqRel) {
            ABORT_COLLATERAL if collateral < 3 => {
                collateral += 1;
                continue;
            }
            ABORT_GROUP => {
                stats.eio.fetch_add(1, Ordering::Relaxed);
                return Reply::Err(Errno::EIO);
            }
            _ => {}
        }
        stats.module_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            op = req.op.name(),
            ?fail,
            slot,
            global,
            illegal,
            rolled_back = n,
            "module context failed during a request"
        );
        if fail == Fail::Check {
            // The context is alive but its memory is suspect: end it (rfork replaces it).
            r.kill_context(slot);
        }
        let escalate = match r.opts.recovery {
            Recovery::None => {
                tracing::error!("recovery none: the file system is dead from now on");
                stats.gave_up.store(true, Ordering::Release);
                for j in 0..r.opts.contexts {
                    r.kill_context(j);
                }
                stats.eio.fetch_add(1, Ordering::Relaxed);
                return Reply::Err(Errno::EIO);
            }
            Recovery::Restart => true,
            Recovery::Contain => {
                let problems = if global {
                    Vec::new()
                } else {
                    r.verify(store, slot)
                };
                if !problems.is_empty() {
                    stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                    let repaired = store.repair_locks(&r.live_owners(slot));
                    tracing::error!(
                        ?problems,
                        repaired,
                        "verification after a local error failed; escalating"
                    );
                }
                let repeated = !global && problems.is_empty() && r.repeated(req.op.data_key());
                if repeated {
                    stats.repeat_escalations.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("repeated local errors on the same data; escalating");
                }
                global || !problems.is_empty() || repeated
            }
        };
        if !escalate {
            stats.contained.fetch_add(1, Ordering::Relaxed);
            r.contain(slot, req.ctx.pid, stats);
            stats.eio.fetch_add(1, Ordering::Relaxed);
            return Reply::Err(Errno::EIO);
        }
        stats.escalations.fetch_add(1, Ordering::Relaxed);
        r.restart_module(slot);
        if r.on_crash == OnCrash::Eio || retried {
            break;
        }
        retried = true;
        stats.retries.fetch_add(1, Ordering::Relaxed);
    }
    stats.eio.fetch_add(1, Ordering::Relaxed);
    Reply::Err(Errno::EIO)
}

/// Issue 5: names what the host detected when a context failed — a rejected write-back
/// (levels 1–3), an access to protected shared memory (levels 1–2) or to host data (1–4),
/// with the faulting address — and counts it.
fn note_detection(r: &Remote, page: &HostPage, slot: usize, fail: Fail, stats: &Stats) {
    let what = match fail {
        Fail::Check => match r.ring.violation(slot) {
            Some(why) => {
                stats.check_rejections.fetch_add(1, Ordering::Relaxed);
                format!("semantic check rejected the write-back: {why}")
            }
            None => "the module's own check failed (EUCLEAN)".to_string(),
        },
        Fail::Ring(f) => {
            let addr = r.ring.fault_addr_word(slot).load(Ordering::SeqCst) as usize;
            if r.ring.illegal_kind(slot) == sys::wtrap::ILLEGAL_SHARED_ACCESS {
                stats.shm_violations.fetch_add(1, Ordering::Relaxed);
                format!(
                    "illegal access to shared memory at {addr:#x} outside protection-manager code ({f:?})"
                )
            } else if addr != 0 && page.contains(addr) {
                stats.host_violations.fetch_add(1, Ordering::Relaxed);
                format!("illegal access to host data at {addr:#x} ({f:?})")
            } else if addr != 0 {
                format!("memory fault at {addr:#x} ({f:?})")
            } else {
                format!("{f:?}")
            }
        }
    };
    tracing::warn!(
        slot,
        level = r.level.number(),
        "module error detected: {what}"
    );
    *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = what;
}

/// Starts context `i`'s module process under rfork (kept-image design: a parked standby is
/// released on death, so replacing an aborted context costs no fork).
fn spawn_context(
    i: usize,
    module: Arc<Mutex<Box<dyn Module>>>,
    store: Arc<Store>,
    ring: Arc<Ring>,
    opts: ContextOpts,
    level: Level,
    page: Arc<HostPage>,
) -> Result<rfork::Supervised, crate::HostError> {
    let cfg = rfork::Config {
        design: rfork::Design::KeptImage,
        policy: rfork::Policy {
            restart: rfork::RestartOn::Always,
            intensity: rfork::Intensity {
                max_restarts: 200,
                within: Duration::from_secs(10),
            },
            backoff: None,
        },
        watchdog: None,
        notify_signal: None,
        stop_timeout: Duration::from_millis(200),
    };
    rfork::spawn(&cfg, move |_worker| {
        let _ = sys::process::set_name(&format!("kintsugi-fsctx{i}"));
        let _ = sys::process::set_parent_death_signal(libc::SIGKILL);
        // The host blocks its stop signals; the module must die of them like any process.
        let _ = sys::signal::unblock_all();
        // This process is a copy of the host: the module value is ours alone now.
        let mut module = module.lock().unwrap_or_else(|p| p.into_inner());
        let ring: &'static Ring = Box::leak(Box::new(ring.clone()));
        // Host data is not the module's to see (levels 1–4: a separate address space).
        if let Err(e) = page.0.unmap_in_child() {
            tracing::error!("context {i}: cannot unmap host data: {e}");
            return 70;
        }
        let contain = opts.recovery == Recovery::Contain;
        if let Err(e) = protect_context(i, &store, ring, level, contain) {
            tracing::error!("context {i}: cannot set up memory protection: {e}");
            return 70;
        }
        // The commit check is part of levels 1–3's semantic checks (Table 4: duplication +
        // checks); level 4 has none, as in the paper (Table 5: invalid updates go undetected
        // there). The stock baseline (`--recovery none`) has none either: the check is a
        // detector of the recovery ladder, and a detection there could only end the file
        // system.
        let checked = level.duplication() && opts.recovery != Recovery::None;
        let flags = ContextFlags { contain, checked };
        context_main(i, &mut **module, &store, ring, flags, level, page.addr())
    })
    .map_err(crate::HostError::Supervisor)
}

/// Sets up context `i`'s memory protection for `level`:
/// - every context reports the address of a fatal fault (the host names it);
/// - containment (`contain`): every other context's local data read-only (writes to it are
///   illegal), and at level 4 the store's global data read-only with the first write setting
///   the global-write flag (at levels 1–3 writes reach global data only through write-back,
///   which sets the flag itself);
/// - levels 1 and 2: the block area `PROT_NONE` or read-only; a module access that faults
///   there is reported as an illegal shared-memory access.
fn protect_context(
    i: usize,
    store: &Store,
    ring: &'static Ring,
    level: Level,
    contain: bool,
) -> std::io::Result<()> {
    sys::wtrap::report_faults(ring.fault_addr_word(i))?;
    if contain {
        install_trap(i, store, ring, level == Level::L4)?;
    }
    let (off, len) = store.block_area();
    match level.access() {
        Access::Mapped => return Ok(()),
        Access::ReadOnly => store.region().protect(off, len, true, false)?,
        Access::Unmapped => store.region().protect(off, len, false, false)?,
    }
    let shared = sys::wtrap::Range {
        start: store.region().addr() + off,
        len,
    };
    sys::wtrap::protect_shared(&[shared], ring.trap_words(i).1)
}

/// Maps the store's global data read-only for this context (first writes set its flag; only
/// with `globals`) and every other context's local data read-only (writes to it are illegal).
fn install_trap(
    i: usize,
    store: &Store,
    ring: &'static Ring,
    globals: bool,
) -> std::io::Result<()> {
    let base = store.region().addr();
    let ranges = store.protected_ranges();
    let globals: Vec<sys::wtrap::Range> = if !globals {
        Vec::new()
    } else {
        ranges
            .globals
            .iter()
            .map(|&(o, l)| sys::wtrap::Range {
                start: base + o,
                len: l,
            })
            .collect()
    };
    let foreign: Vec<sys::wtrap::Range> = ring
        .foreign_ranges(i)
        .into_iter()
        .map(|(start, len)| sys::wtrap::Range { start, len })
        .collect();
    let (flag, illegal) = ring.trap_words(i);
    sys::wtrap::install(&globals, &foreign, flag, illegal)
}

/// How a context treats its requests.
#[derive(Debug, Clone, Copy)]
struct ContextFlags {
    /// Containment: the global-write flag is kept (and at level 4 trapped).
    contain: bool,
    /// The module's commit check runs on every request that changed host data.
    checked: bool,
}

/// A module context: serve slot `i` forever.
fn context_main(
    i: usize,
    module: &mut dyn Module,
    store: &Store,
    ring: &'static Ring,
    flags: ContextFlags,
    level: Level,
    host_addr: usize,
) -> i32 {
    let contain = flags.contain;
    let mut attached = false;
    let mut layouts = Layouts::default();
    let sites = module.sites();
    let access = level.access();
    let probes = Probes {
        shared: store.block_addr(0).unwrap_or(0),
        // The host page's address, unmapped in this process: the probe faults there.
        host: host_addr,
    };
    let trap = contain && level == Level::L4;
    ring.serve(
        i,
        |fault, bytes| {
            let reply = match bincode::deserialize::<Request>(bytes) {
                Err(_) => Reply::Err(Errno::EIO),
                Ok(req) => {
                    let mkfs = req.op == Op::Mkfs;
                    if !attached && !mkfs {
                        let mut pm0 =
                            HostPm::new(store, None, Owner(i as u64 + 1), None).with_access(access);
                        attached = module.attach(&mut pm0).is_ok();
                        layouts = Layouts::new(module.layouts());
                    }
                    if !attached && !mkfs {
                        Reply::Err(Errno::EIO)
                    } else {
                        let mut pm = HostPm::new(
                            store,
                            Some(ring.undo(i)),
                            Owner(i as u64 + 1),
                            Fault::from_code(fault),
                        )
                        .with_access(access)
                        .with_sites(SiteCtx {
                            words: ring,
                            sites,
                            client_pid: req.ctx.pid,
                            probes,
                        })
                        .with_lock_waits(ring, i);
                        if level.duplication() && !mkfs {
                            pm = pm.with_duplication(&layouts);
                        }
                        if contain {
                            // Levels 1–3: write-back sets it; every level: `mark_global`.
                            pm = pm.with_global_flag(ring.trap_words(i).0);
                        }
                        let r = execute(module, &mut pm, req);
                        pm.finish();
                        let r = if matches!(r, Reply::Err(_)) {
                            r
                        } else {
                            let checked = if flags.checked && !mkfs {
                                pm.check_commit(module).map_err(|why| {
                                    WriteBackError::Rejected(format!("commit check: {why}"))
                                })
                            } else {
                                Ok(())
                            };
                            match checked.and_then(|()| pm.write_back()) {
                                Ok(_) => r,
                                Err(WriteBackError::Rejected(why)) => {
                                    ring.set_violation(i, &why);
                                    Reply::Err(Errno::EUCLEAN)
                                }
                                Err(WriteBackError::Errno(e)) => Reply::Err(e),
                            }
                        };
                        if mkfs && r == Reply::Ok {
                            attached = true;
                            layouts = Layouts::new(module.layouts());
                        }
                        r
                    }
                }
            };
            bincode::serialize(&reply).unwrap_or_default()
        },
        |code| {
            if let Some(f) = Fault::from_code(code) {
                f.fire();
            }
        },
        || {
            if trap && let Err(e) = sys::wtrap::reprotect() {
                // Without re-protection the next request's flag would lie: stop this context.
                tracing::error!("cannot re-protect global data: {e}");
                sys::process::exit_now(71);
            }
        },
    )
}

/// Follows context `i`'s supervisor events: records its pid, marks the request of a dead
/// context, and stops serving (EIO) if restarts come too fast.
fn supervise(
    i: usize,
    mut sup: rfork::Supervised,
    ring: Arc<Ring>,
    workers: Arc<Vec<AtomicI32>>,
    stats: Arc<Stats>,
) -> Result<std::thread::JoinHandle<()>, crate::HostError> {
    // Wait for the first worker so requests have somewhere to go and hang kills a real pid.
    loop {
        match sup.next_event(Some(Duration::from_secs(5))) {
            Ok(Some(ev)) if ev.kind == rfork::EventKind::Started => {
                workers[i].store(ev.pid.as_raw(), Ordering::Release);
                break;
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Err(crate::HostError::ModuleStart(
                    "no Started event within 5 s".into(),
                ));
            }
            Err(e) => return Err(crate::HostError::ModuleStart(e.to_string())),
        }
    }
    std::thread::Builder::new()
        .name(format!("fs-ctx{i}-sup"))
        .spawn(move || {
            loop {
                match sup.next_event(None) {
                    Ok(Some(ev)) => match ev.kind {
                        rfork::EventKind::Restarted => {
                            // The event names the successor; the one that died is the previous.
                            let dead = workers[i].swap(ev.pid.as_raw(), Ordering::AcqRel);
                            if i == 0 {
                                stats.worker_pid.store(ev.pid.as_raw(), Ordering::Release);
                            }
                            stats.restarts.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(context = i, reason = %ev.reason, dead, new_pid = ev.pid.as_raw(), "module context restarted");
                            ring.mark_dead(u32::try_from(dead).ok(), false);
                        }
                        rfork::EventKind::Started => workers[i].store(ev.pid.as_raw(), Ordering::Release),
                        rfork::EventKind::GaveUp | rfork::EventKind::Removed => {
                            tracing::error!(context = i, reason = %ev.reason, "module supervisor gave up; answering EIO from now on");
                            stats.gave_up.store(true, Ordering::Release);
                            ring.mark_dead(None, true);
                            break;
                        }
                        rfork::EventKind::StandbyReady => {}
                    },
                    Ok(None) | Err(_) => {
                        stats.gave_up.store(true, Ordering::Release);
                        ring.mark_dead(None, true);
                        break;
                    }
                }
            }
            // Keep `sup` alive until the host exits: dropping it kills the module tree.
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| crate::HostError::ModuleStart(e.to_string()))
}
