//! How the host reaches the module at each protection level.
//!
//! - Level 5 ([`Backend::Direct`]): the module is linked into the host and called directly with
//!   an unlogged protection manager. A panic is caught and answered EIO (safe Rust's only
//!   containment); a segfault or kill ends the host, and with it the mount.
//! - Level 4 ([`Backend::Remote`]): the module runs in its own process, supervised by rfork;
//!   requests go through the shared-memory [`Ring`], host-data changes through the undo log.
//!   When the module dies or misses its deadline, the host rolls the request back, the
//!   supervisor restarts the module, and the request is retried once on the new module
//!   (every request is safe to retry after a complete rollback); a second failure is EIO.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fsapi::{Errno, Module};

use crate::pm::{Fault, HostPm};
use crate::ring::Ring;
use crate::store::{Owner, Store};
use crate::wire::{Op, Reply, Request, execute};

/// Protection level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Level {
    L4,
    L5,
}

impl Level {
    pub fn number(self) -> u8 {
        match self {
            Level::L4 => 4,
            Level::L5 => 5,
        }
    }
    /// Parses 4 or 5; other levels are named as not built yet.
    pub fn from_number(n: u8) -> Result<Level, String> {
        match n {
            4 => Ok(Level::L4),
            5 => Ok(Level::L5),
            1..=3 => Err(format!(
                "protection level {n} is not available yet (levels 1-3 come with issue 5); use 4 or 5"
            )),
            _ => Err(format!(
                "protection level {n} does not exist: levels are 1 (most protected) to 5 (none); use 4 or 5"
            )),
        }
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
}

impl Stats {
    pub fn json(&self, level: Level, module: &str) -> serde_json::Value {
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
        })
    }
}

/// Level 5 state: the module itself.
pub struct Direct {
    module: Box<dyn Module>,
    attached: bool,
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

/// Level 4 state.
#[derive(Debug)]
pub struct Remote {
    ring: Arc<Ring>,
    call: Mutex<()>,
    deadline: Duration,
    on_crash: OnCrash,
    /// Keeps the supervisor (and thus the module processes) alive; dropping it kills them.
    _supervisor: std::thread::JoinHandle<()>,
}

/// The module, at some level.
#[derive(Debug)]
pub enum Backend {
    Direct(Mutex<Direct>, Arc<Store>),
    Remote(Remote, Arc<Store>),
}

const DIRECT_OWNER: Owner = Owner(255);

impl Backend {
    /// Level 5: the module runs in this process.
    pub fn direct(module: Box<dyn Module>, store: Arc<Store>) -> Backend {
        Backend::Direct(
            Mutex::new(Direct {
                module,
                attached: false,
            }),
            store,
        )
    }

    /// Level 4: rforks the module supervisor. Must be called while this process has one
    /// thread (before the FUSE session starts), as fork requires.
    pub fn remote(
        module: Box<dyn Module>,
        store: Arc<Store>,
        deadline: Duration,
        on_crash: OnCrash,
        stats: Arc<Stats>,
    ) -> Result<Backend, crate::HostError> {
        let ring = Arc::new(Ring::create().map_err(crate::HostError::Ring)?);
        let sup = spawn_module(module, store.clone(), ring.clone())?;
        let supervisor = supervise(sup, ring.clone(), stats.clone())?;
        Ok(Backend::Remote(
            Remote {
                ring,
                call: Mutex::new(()),
                deadline,
                on_crash,
                _supervisor: supervisor,
            },
            store,
        ))
    }

    pub fn store(&self) -> &Arc<Store> {
        match self {
            Backend::Direct(_, s) | Backend::Remote(_, s) => s,
        }
    }

    /// Runs one request, containing module failures as the level allows.
    pub fn call(&self, req: Request, fault: Option<Fault>, stats: &Stats) -> Reply {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        match self {
            Backend::Direct(d, store) => call_direct(d, store, req, fault, stats),
            Backend::Remote(r, store) => call_remote(r, store, req, fault, stats),
        }
    }

    /// Delivers a fault to the module between requests (level 4 only).
    pub fn idle_fault(&self, fault: Fault) -> Result<(), String> {
        match self {
            Backend::Direct(..) => Err("level 5 has no isolation: an idle fault would take the whole mount down; mount with --level 4, or arm it for a request with --during".into()),
            Backend::Remote(r, _) => {
                r.ring.post_idle_fault(fault.code());
                Ok(())
            }
        }
    }

    /// Level 5, in a host process restarted from its rfork-time image: the module's memory is
    /// that of the image, so it must re-read its state from the store before the next request,
    /// and locks the dead process held in the shared store are released. Returns how many.
    pub fn reattach_after_restart(&self) -> usize {
        match self {
            Backend::Direct(d, store) => {
                d.lock().unwrap_or_else(|p| p.into_inner()).attached = false;
                store.release_all(DIRECT_OWNER)
            }
            Backend::Remote(..) => 0,
        }
    }

    pub fn level(&self) -> Level {
        match self {
            Backend::Direct(..) => Level::L5,
            Backend::Remote(..) => Level::L4,
        }
    }
}

fn call_direct(
    d: &Mutex<Direct>,
    store: &Store,
    req: Request,
    fault: Option<Fault>,
    stats: &Stats,
) -> Reply {
    let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
    let d = &mut *d;
    let mut pm = HostPm::new(store, None, DIRECT_OWNER, fault);
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
    let leaked = store.release_all(DIRECT_OWNER);
    if leaked > 0 {
        tracing::warn!(leaked, "module returned holding locks; released them");
    }
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

fn call_remote(
    r: &Remote,
    store: &Store,
    req: Request,
    fault: Option<Fault>,
    stats: &Stats,
) -> Reply {
    let _one_at_a_time = r.call.lock().unwrap_or_else(|p| p.into_inner());
    let slot = 0;
    let owner = Owner(slot as u64 + 1);
    let bytes = match bincode::serialize(&req) {
        Ok(b) => b,
        Err(_) => return Reply::Err(Errno::EINVAL),
    };
    if bytes.len() > crate::ring::SLOT_BUF {
        return Reply::Err(Errno::EINVAL);
    }
    let log = r.ring.undo(slot);
    let mut fault = fault;
    let mut failed_at: Option<Instant> = None;
    for attempt in 0..2 {
        if stats.gave_up.load(Ordering::Acquire) {
            stats.eio.fetch_add(1, Ordering::Relaxed);
            return Reply::Err(Errno::EIO);
        }
        let code = fault.take().map_or(0, Fault::code);
        let kill = || {
            if let Some(pid) = sys::Pid::from_raw(stats.worker_pid.load(Ordering::Acquire)) {
                let _ = sys::process::kill(pid, libc::SIGKILL);
            }
        };
        match r
            .ring
            .roundtrip(slot, &bytes, code, r.deadline, Duration::from_secs(5), kill)
        {
            Ok(out) => {
                let reply = bincode::deserialize::<Reply>(&out).unwrap_or(Reply::Err(Errno::EIO));
                if matches!(reply, Reply::Err(_)) {
                    // A refused request leaves no trace either (e.g. ENOSPC half-way).
                    let n = log.rollback(store, owner);
                    stats
                        .rolled_back_entries
                        .fetch_add(n as u64, Ordering::Relaxed);
                } else {
                    log.clear();
                    let leaked = store.release_all(owner);
                    if leaked > 0 {
                        tracing::warn!(leaked, "module returned holding locks; released them");
                    }
                }
                if let Some(t) = failed_at {
                    stats
                        .last_recovery_us
                        .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                return reply;
            }
            Err(f) => {
                failed_at.get_or_insert_with(Instant::now);
                stats.module_failures.fetch_add(1, Ordering::Relaxed);
                let n = log.rollback(store, owner);
                stats
                    .rolled_back_entries
                    .fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(
                    op = req.op.name(),
                    ?f,
                    rolled_back = n,
                    attempt,
                    "module failed during a request; rolled back"
                );
                if r.on_crash == OnCrash::Eio || attempt == 1 {
                    break;
                }
                stats.retries.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    stats.eio.fetch_add(1, Ordering::Relaxed);
    Reply::Err(Errno::EIO)
}

/// Starts the module process under rfork. The one place that knows how module processes are
/// made: the worker serves the ring until it dies; rfork restarts it from the rfork-time image.
fn spawn_module(
    module: Box<dyn Module>,
    store: Arc<Store>,
    ring: Arc<Ring>,
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
    let mut module = Some(module);
    rfork::spawn(&cfg, move |_worker| {
        let _ = sys::process::set_name("kintsugi-fsmod");
        let _ = sys::process::set_parent_death_signal(libc::SIGKILL);
        // The host blocks its stop signals; the module must die of them like any process.
        let _ = sys::signal::unblock_all();
        let mut module = module
            .take()
            .expect("the worker closure runs once per process");
        worker_main(&mut *module, &store, &ring)
    })
    .map_err(crate::HostError::Supervisor)
}

/// The module process: serve requests from the ring forever.
fn worker_main(module: &mut dyn Module, store: &Store, ring: &Ring) -> i32 {
    let mut attached = false;
    ring.serve(
        |slot, fault, bytes| {
            let reply = match bincode::deserialize::<Request>(bytes) {
                Err(_) => Reply::Err(Errno::EIO),
                Ok(req) => {
                    let mut pm = HostPm::new(
                        store,
                        Some(ring.undo(slot)),
                        Owner(slot as u64 + 1),
                        Fault::from_code(fault),
                    );
                    let mkfs = req.op == Op::Mkfs;
                    if !attached && !mkfs {
                        attached = module.attach(&mut pm).is_ok();
                    }
                    if !attached && !mkfs {
                        Reply::Err(Errno::EIO)
                    } else {
                        let r = execute(module, &mut pm, req);
                        pm.finish();
                        if mkfs && r == Reply::Ok {
                            attached = true;
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
    )
}

/// Follows the supervisor's events: records the module pid, marks requests of a dead module,
/// and stops serving (EIO) if restarts come too fast.
fn supervise(
    mut sup: rfork::Supervised,
    ring: Arc<Ring>,
    stats: Arc<Stats>,
) -> Result<std::thread::JoinHandle<()>, crate::HostError> {
    // Wait for the first worker so requests have somewhere to go and hang kills a real pid.
    loop {
        match sup.next_event(Some(Duration::from_secs(5))) {
            Ok(Some(ev)) if ev.kind == rfork::EventKind::Started => {
                stats.worker_pid.store(ev.pid.as_raw(), Ordering::Release);
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
        .name("fs-supervisor".into())
        .spawn(move || {
            loop {
                match sup.next_event(None) {
                    Ok(Some(ev)) => match ev.kind {
                        rfork::EventKind::Restarted => {
                            // The event names the successor; the one that died is the previous.
                            let dead = stats.worker_pid.swap(ev.pid.as_raw(), Ordering::AcqRel);
                            stats.restarts.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(reason = %ev.reason, dead, new_pid = ev.pid.as_raw(), "module process restarted");
                            ring.mark_dead(u32::try_from(dead).ok(), false);
                        }
                        rfork::EventKind::Started => stats.worker_pid.store(ev.pid.as_raw(), Ordering::Release),
                        rfork::EventKind::GaveUp | rfork::EventKind::Removed => {
                            tracing::error!(reason = %ev.reason, "module supervisor gave up; answering EIO from now on");
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
