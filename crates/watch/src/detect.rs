//! The detectors: one small type per fault class behind [`Detector`]. The monitor owns the
//! kernel event sources (kmsg, proc connector, PSI triggers, memcg eventfds, the 1 s sweep)
//! and hands each input to every detector; a detector keeps its own state and thresholds and
//! says what it concluded. None of them does I/O on the hot path except what it owns (the
//! heartbeat files, /proc/meminfo, pids counters), all on the timer.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sys::Pid;
use sys::netlink::ProcEvent;

use crate::cgroup::{self, OomControl, PidsWatch};
use crate::config;
use crate::event::{Detection, FaultKind};
use crate::kmsg::{Class, Record};
use crate::psi::Resource;
use crate::tasks::Sweep;

/// What detectors conclude from one input.
#[derive(Debug, Default)]
pub struct Out {
    pub detections: Vec<Detection>,
    pub recovered: Vec<(FaultKind, String)>,
    /// Ask the monitor for an extra sweep at this time (to confirm a pile-up quickly).
    pub sweep_at: Option<Instant>,
}

impl Out {
    fn sweep_at(&mut self, t: Instant) {
        self.sweep_at = Some(self.sweep_at.map_or(t, |s| s.min(t)));
    }
}

/// One line of health: for `--once` and the live summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub check: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// A fault detector. Every input method defaults to "not interested".
pub trait Detector: fmt::Debug + Send {
    fn name(&self) -> &'static str;
    /// A classified kernel log line.
    fn on_kmsg(&mut self, _class: &Class, _rec: &Record, _now: Instant, _out: &mut Out) {}
    /// A proc-connector event.
    fn on_proc(&mut self, _ev: &ProcEvent, _now: Instant, _out: &mut Out) {}
    /// A confirmed PSI trigger event with the stall time it measured.
    fn on_pressure(&mut self, _r: Resource, _stall_us: u64, _now: Instant, _out: &mut Out) {}
    /// A memcg OOM eventfd fired.
    fn on_oom(&mut self, _cg: &Path, _o: OomControl, _new_kills: u64, _out: &mut Out) {}
    /// A task sweep (the 1 s tick, or an extra sweep someone asked for).
    fn on_sweep(&mut self, _s: &Sweep, _now: Instant, _periodic: bool, _out: &mut Out) {}
    /// Called when the time returned by [`Detector::deadline`] has come.
    fn on_timer(&mut self, _now: Instant, _out: &mut Out) {}
    fn deadline(&self) -> Option<Instant> {
        None
    }
    fn status(&self) -> Status;
}

/// Reports a key at most once per `hold`.
#[derive(Debug)]
struct Latch {
    last: HashMap<String, Instant>,
    hold: Duration,
}

impl Latch {
    fn new(hold: Duration) -> Latch {
        Latch {
            last: HashMap::new(),
            hold,
        }
    }
    fn fire(&mut self, key: &str, now: Instant) -> bool {
        if self.last.len() > 4096 {
            let hold = self.hold;
            self.last.retain(|_, t| now.duration_since(*t) < hold);
        }
        match self.last.get(key) {
            Some(t) if now.duration_since(*t) < self.hold => false,
            _ => {
                self.last.insert(key.to_string(), now);
                true
            }
        }
    }
}

/// The top frames of a task's kernel stack, `a <- b <- c`, or "" when unreadable.
fn kernel_stack(tgid: Pid, tid: Pid) -> String {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/stack")) else {
        return String::new();
    };
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|f| f.split('+').next().unwrap_or(f))
        .take(6)
        .collect::<Vec<_>>()
        .join(" <- ")
}

fn comm_of(pid: Pid) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------

/// Hung tasks: D state with an unchanged timeslice count for the threshold (our own sweep, so
/// detection comes within one tick after the threshold instead of the kernel's 120–240 s), plus
/// the kernel's hung-task reports and its `hung_task_detect_count`.
#[derive(Debug)]
pub struct HungTasks {
    threshold: Duration,
    /// tid → (first seen in D with this pcount, pcount, comm, wchan, reported)
    tracked: HashMap<Pid, (Instant, u64, String, String, bool)>,
    hung_now: usize,
    detect_count: Option<File>,
    last_count: u64,
    kmsg_reports: u64,
    latch: Latch,
}

impl HungTasks {
    pub fn new(cfg: &config::HungTask) -> HungTasks {
        let detect_count = File::open("/proc/sys/kernel/hung_task_detect_count").ok();
        let mut h = HungTasks {
            threshold: Duration::from_millis(cfg.threshold_ms),
            tracked: HashMap::new(),
            hung_now: 0,
            detect_count,
            last_count: 0,
            kmsg_reports: 0,
            latch: Latch::new(Duration::from_secs(30)),
        };
        h.last_count = h.read_count().unwrap_or(0);
        h
    }
    fn read_count(&self) -> Option<u64> {
        let mut b = [0u8; 32];
        let n = self.detect_count.as_ref()?.read_at(&mut b, 0).ok()?;
        std::str::from_utf8(&b[..n]).ok()?.trim().parse().ok()
    }
    /// Tasks currently considered hung.
    pub fn hung_now(&self) -> usize {
        self.hung_now
    }
}

impl Detector for HungTasks {
    fn name(&self) -> &'static str {
        "hung_task"
    }

    fn on_kmsg(&mut self, class: &Class, rec: &Record, now: Instant, out: &mut Out) {
        if class.fault != FaultKind::HungTask {
            return;
        }
        self.kmsg_reports += 1;
        let subject = match class.pid {
            Some(p) => format!("pid {p}"),
            None => "kernel".into(),
        };
        if self
            .latch
            .fire(&format!("kmsg {subject} {}", class.what), now)
        {
            let mut d = Detection::new(FaultKind::HungTask, "kmsg", subject, rec.text.clone());
            d.pid = class.pid;
            out.detections.push(d);
        }
    }

    fn on_sweep(&mut self, s: &Sweep, now: Instant, periodic: bool, out: &mut Out) {
        let mut present = HashSet::new();
        for t in &s.dstate {
            present.insert(t.tid);
            let e = self
                .tracked
                .entry(t.tid)
                .or_insert_with(|| (now, t.pcount, t.comm.clone(), t.wchan.clone(), false));
            if e.1 != t.pcount {
                // It ran since the last sweep: a new wait, not a hang.
                if e.4 {
                    out.recovered
                        .push((FaultKind::HungTask, format!("pid {}", t.tid)));
                }
                *e = (now, t.pcount, t.comm.clone(), t.wchan.clone(), false);
            }
            if !e.4 && now.duration_since(e.0) < self.threshold {
                // Sweep again exactly when this task would cross the threshold.
                out.sweep_at(e.0 + self.threshold);
            }
            if !e.4 && now.duration_since(e.0) >= self.threshold {
                e.4 = true;
                out.detections.push(
                    Detection::new(
                        FaultKind::HungTask,
                        "proc_stat",
                        format!("pid {} ({})", t.tid, t.comm),
                        format!(
                            "D state in {} for {} ms without being scheduled (threshold {} ms)",
                            if t.wchan.is_empty() { "?" } else { &t.wchan },
                            now.duration_since(e.0).as_millis(),
                            self.threshold.as_millis()
                        ),
                    )
                    .with_pid(t.tid),
                );
            }
        }
        self.tracked.retain(|tid, e| {
            let keep = present.contains(tid);
            if !keep && e.4 {
                out.recovered
                    .push((FaultKind::HungTask, format!("pid {tid} ({})", e.2)));
            }
            keep
        });
        self.hung_now = self.tracked.values().filter(|e| e.4).count();
        if periodic && let Some(c) = self.read_count() {
            let new = c.saturating_sub(self.last_count);
            self.last_count = c;
            // The kernel stops printing after hung_task_warnings reports but keeps counting:
            // report what the log did not.
            if new > self.kmsg_reports {
                out.detections.push(Detection::new(
                    FaultKind::HungTask,
                    "hung_task_detect_count",
                    "kernel",
                    format!("kernel hung-task detector counted {new} new hung tasks"),
                ));
            }
            self.kmsg_reports = 0;
        }
    }

    fn status(&self) -> Status {
        let d = self.tracked.len();
        Status {
            check: "hung tasks",
            ok: self.hung_now == 0,
            detail: format!(
                "{} hung, {d} in D state (threshold {} ms)",
                self.hung_now,
                self.threshold.as_millis()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A driver that stopped answering: more and more tasks stuck in D state at one kernel wait
/// point (grouped by wchan). A group reaching `min_blocked` gets a confirming sweep 100 ms later,
/// and is reported when at least `min_blocked` of its tasks stayed stuck (not scheduled) across
/// the two sweeps. A PSI io stall event triggers an immediate sweep.
#[derive(Debug)]
pub struct BlockedGrowth {
    min_blocked: usize,
    /// tid → pcount at the previous sweep, for tasks in D.
    prev: HashMap<Pid, u64>,
    /// wchan → count at the previous sweep.
    prev_groups: HashMap<String, usize>,
    active: HashMap<String, usize>,
    last_psi_stall_us: u64,
    blocked_now: usize,
}

impl BlockedGrowth {
    pub fn new(cfg: &config::Driver) -> BlockedGrowth {
        BlockedGrowth {
            min_blocked: cfg.min_blocked,
            prev: HashMap::new(),
            prev_groups: HashMap::new(),
            active: HashMap::new(),
            last_psi_stall_us: 0,
            blocked_now: 0,
        }
    }
}

impl Detector for BlockedGrowth {
    fn name(&self) -> &'static str {
        "hung_driver"
    }

    fn on_pressure(&mut self, r: Resource, stall_us: u64, now: Instant, out: &mut Out) {
        if r == Resource::Io {
            self.last_psi_stall_us = stall_us;
            out.sweep_at(now);
        }
    }

    fn on_sweep(&mut self, s: &Sweep, now: Instant, _periodic: bool, out: &mut Out) {
        let mut groups: HashMap<String, (usize, usize, Vec<Pid>)> = HashMap::new();
        for t in &s.dstate {
            let g = groups.entry(t.wchan.clone()).or_default();
            g.0 += 1;
            if self.prev.get(&t.tid) == Some(&t.pcount) {
                g.1 += 1;
                g.2.push(t.tid);
            }
        }
        self.blocked_now = s.dstate.len();
        if s.dstate.iter().any(|t| !self.prev.contains_key(&t.tid)) {
            // A task entered D state since the last sweep: look again in 250 ms. A pile-up
            // grows one blocked task at a time, and its growth is what this detector reports;
            // tasks that stay blocked without company cost nothing extra.
            out.sweep_at(now + Duration::from_millis(250));
        }
        for (wchan, (total, stuck, tids)) in &groups {
            let before = self.prev_groups.get(wchan).copied().unwrap_or(0);
            if *stuck >= self.min_blocked {
                let grew = self.active.get(wchan).is_none_or(|&n| *total >= 2 * n);
                if grew {
                    let mut sample = tids.clone();
                    sample.sort_unstable();
                    sample.truncate(8);
                    let sample: Vec<i32> = sample.iter().map(|p| p.as_raw()).collect();
                    // The kernel stack of one waiter names the driver (slow path, once per
                    // report; needs CAP_SYS_ADMIN, so it may be missing).
                    let stack = sample
                        .first()
                        .and_then(|tid| s.dstate.iter().find(|t| t.tid.as_raw() == *tid))
                        .map(|t| kernel_stack(t.tgid, t.tid))
                        .unwrap_or_default();
                    out.detections.push(Detection::new(
                        FaultKind::HungDriver,
                        "proc_stat",
                        format!("wchan {}", if wchan.is_empty() { "?" } else { wchan }),
                        format!(
                            "{total} tasks blocked in D state at {wchan} ({stuck} not scheduled \
                             since the previous sweep; {before} before), e.g. pids {sample:?}; \
                             psi io stall {} ms/2 s; stack: {stack}",
                            self.last_psi_stall_us / 1000
                        ),
                    ));
                    self.active.insert(wchan.clone(), *total);
                }
            } else if *total >= self.min_blocked {
                out.sweep_at(now + Duration::from_millis(100));
            }
        }
        let mut gone = Vec::new();
        for (w, _) in self.active.iter() {
            if groups.get(w).is_none_or(|g| g.0 < self.min_blocked) {
                gone.push(w.clone());
            }
        }
        for w in gone {
            self.active.remove(&w);
            out.recovered
                .push((FaultKind::HungDriver, format!("wchan {w}")));
        }
        self.prev = s.dstate.iter().map(|t| (t.tid, t.pcount)).collect();
        self.prev_groups = groups.into_iter().map(|(k, v)| (k, v.0)).collect();
    }

    fn status(&self) -> Status {
        Status {
            check: "blocked on driver",
            ok: self.active.is_empty(),
            detail: if self.active.is_empty() {
                format!("{} tasks in D state, no pile-up", self.blocked_now)
            } else {
                format!("pile-up at {:?}", self.active.keys().collect::<Vec<_>>())
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Runaway process creation: fork rate (proc connector) machine-wide and per parent, and
/// forks rejected by a pids limit (kmsg, at once; `pids.events` on the tick).
#[derive(Debug)]
pub struct ForkStorm {
    max_total: u64,
    max_parent: u64,
    window_start: Instant,
    total: u64,
    per_parent: HashMap<Pid, u64>,
    last_rate: u64,
    pids_root: Option<PathBuf>,
    pids: HashMap<PathBuf, PidsWatch>,
    latch: Latch,
    ticks: u64,
}

impl ForkStorm {
    pub fn new(cfg: &config::Fork) -> ForkStorm {
        ForkStorm {
            max_total: cfg.max_per_sec.max(1),
            max_parent: cfg.max_per_sec_per_parent.max(1),
            window_start: Instant::now(),
            total: 0,
            per_parent: HashMap::new(),
            last_rate: 0,
            pids_root: cgroup::v1_hierarchy("pids"),
            pids: HashMap::new(),
            latch: Latch::new(Duration::from_secs(10)),
            ticks: 0,
        }
    }
    /// Forks in the last complete second.
    pub fn rate(&self) -> u64 {
        self.last_rate
    }
    fn pids_path(&self, rel: &str) -> Option<PathBuf> {
        Some(self.pids_root.as_ref()?.join(rel.trim_start_matches('/')))
    }
    /// Reads every watched pids cgroup's rejection counter; reports those that grew.
    fn poll_pids(&mut self, now: Instant, source: &'static str, out: &mut Out) {
        let mut found = Vec::new();
        for (p, w) in self.pids.iter_mut() {
            if let Some(new) = w.poll()
                && new > 0
            {
                found.push((p.clone(), new));
            }
        }
        for (p, new) in found {
            let rel = cgroup::relative(&p);
            if self.latch.fire(&format!("cgroup {rel}"), now) {
                out.detections.push(
                    Detection::new(
                        FaultKind::ForkStorm,
                        source,
                        format!("cgroup {rel}"),
                        format!("{new} forks rejected by pids.max since the last check"),
                    )
                    .with_cgroup(Some(p)),
                );
            }
        }
    }

    /// Re-lists the pids cgroups (on the tick, and when a new cgroup directory appears).
    pub fn rescan_pids(&mut self) {
        let Some(root) = self.pids_root.clone() else {
            return;
        };
        let now: HashSet<PathBuf> = cgroup::list(&root, 4).into_iter().collect();
        self.pids.retain(|p, _| now.contains(p));
        for p in now {
            if !self.pids.contains_key(&p)
                && let Ok(w) = PidsWatch::open(&p)
            {
                self.pids.insert(p, w);
            }
        }
    }
}

impl Detector for ForkStorm {
    fn name(&self) -> &'static str {
        "fork_storm"
    }

    fn on_proc(&mut self, ev: &ProcEvent, now: Instant, out: &mut Out) {
        let ProcEvent::Fork {
            parent_tgid,
            child_tid,
            child_tgid,
        } = *ev
        else {
            return;
        };
        if child_tid != child_tgid {
            return; // a thread, not a process
        }
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.last_rate = self.total;
            self.window_start = now;
            self.total = 0;
            self.per_parent.clear();
        }
        self.total += 1;
        let p = parent_tgid;
        let n = self.per_parent.entry(p).or_default();
        *n += 1;
        if *n == self.max_parent && self.latch.fire(&format!("parent {p}"), now) {
            let cg = cgroup::of_pid(p, "pids");
            out.detections.push(
                Detection::new(
                    FaultKind::ForkStorm,
                    "proc_connector",
                    format!("parent pid {p} ({})", comm_of(p)),
                    format!("{} forks by one parent within 1 s", self.max_parent),
                )
                .with_pid(p)
                .with_cgroup(cg),
            );
        }
        if self.total == self.max_total && self.latch.fire("system", now) {
            out.detections.push(Detection::new(
                FaultKind::ForkStorm,
                "proc_connector",
                "system",
                format!("{} forks machine-wide within 1 s", self.max_total),
            ));
        }
    }

    fn on_kmsg(&mut self, class: &Class, rec: &Record, now: Instant, out: &mut Out) {
        if class.what != "pids_rejected" {
            return;
        }
        let rel = class.cgroup.clone().unwrap_or_default();
        if rel.is_empty() {
            // The kernel prints the path with pr_cont; when another CPU prints in between, the
            // path lands in a record of its own. The counters say which cgroup it was.
            self.poll_pids(now, "kmsg+pids_events", out);
            return;
        }
        if self.latch.fire(&format!("cgroup {rel}"), now) {
            out.detections.push(
                Detection::new(
                    FaultKind::ForkStorm,
                    "kmsg",
                    format!("cgroup {rel}"),
                    &rec.text,
                )
                .with_cgroup(self.pids_path(&rel)),
            );
        }
    }

    fn on_sweep(&mut self, _s: &Sweep, now: Instant, periodic: bool, out: &mut Out) {
        if !periodic {
            return;
        }
        if now.duration_since(self.window_start) >= Duration::from_secs(2) {
            self.last_rate = 0;
        }
        self.ticks += 1;
        self.poll_pids(now, "pids_events", out);
    }

    fn status(&self) -> Status {
        Status {
            check: "fork storm",
            ok: self.last_rate < self.max_total,
            detail: format!(
                "{} forks/s (limit {}/s, {}/s per parent); {} pids cgroups watched",
                self.last_rate,
                self.max_total,
                self.max_parent,
                self.pids.len()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Memory exhaustion: memcg OOM eventfds (v1), the OOM killer's kmsg line, PSI memory stalls,
/// and MemAvailable under a floor.
#[derive(Debug)]
pub struct MemoryExhaustion {
    min_pct: f64,
    meminfo: Option<File>,
    avail_pct: f64,
    low: bool,
    memory_root: Option<PathBuf>,
    latch: Latch,
    oom_events: u64,
}

/// (MemAvailable, MemTotal) in kB from /proc/meminfo text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    Some((get("MemAvailable:")?, get("MemTotal:")?))
}

impl MemoryExhaustion {
    pub fn new(cfg: &config::Memory) -> MemoryExhaustion {
        MemoryExhaustion {
            min_pct: cfg.min_available_pct,
            meminfo: File::open("/proc/meminfo").ok(),
            avail_pct: 100.0,
            low: false,
            memory_root: cgroup::v1_hierarchy("memory"),
            latch: Latch::new(Duration::from_secs(5)),
            oom_events: 0,
        }
    }
    pub fn available_pct(&self) -> f64 {
        self.avail_pct
    }
}

impl Detector for MemoryExhaustion {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn on_oom(&mut self, cg: &Path, o: OomControl, new_kills: u64, out: &mut Out) {
        let rel = cgroup::relative(cg);
        let now = Instant::now();
        if new_kills == 0 && !o.under_oom {
            return;
        }
        self.oom_events += 1;
        if self.latch.fire(&format!("cgroup {rel}"), now) {
            let detail = if new_kills > 0 {
                format!("memory cgroup hit its limit: {new_kills} OOM kills")
            } else {
                "memory cgroup hit its limit and is under OOM (oom_kill_disable: tasks paused)"
                    .to_string()
            };
            out.detections.push(
                Detection::new(
                    FaultKind::Memory,
                    "memcg_eventfd",
                    format!("cgroup {rel}"),
                    detail,
                )
                .with_cgroup(Some(cg.to_path_buf())),
            );
        }
    }

    fn on_kmsg(&mut self, class: &Class, rec: &Record, now: Instant, out: &mut Out) {
        if class.what != "oom_kill" {
            return;
        }
        let rel = class.cgroup.clone().unwrap_or_else(|| "/".into());
        if self.latch.fire(&format!("cgroup {rel}"), now) {
            let cg = (rel != "/")
                .then(|| {
                    self.memory_root
                        .as_ref()
                        .map(|r| r.join(rel.trim_start_matches('/')))
                })
                .flatten();
            let mut d = Detection::new(
                FaultKind::Memory,
                "kmsg",
                format!("cgroup {rel}"),
                &rec.text,
            )
            .with_cgroup(cg);
            d.pid = class.pid;
            out.detections.push(d);
        }
    }

    fn on_pressure(&mut self, r: Resource, stall_us: u64, now: Instant, out: &mut Out) {
        if r == Resource::Memory && self.latch.fire("psi", now) {
            out.detections.push(Detection::new(
                FaultKind::Memory,
                "psi",
                "system",
                format!(
                    "tasks stalled on memory for {} ms within 2 s",
                    stall_us / 1000
                ),
            ));
        }
    }

    fn on_sweep(&mut self, _s: &Sweep, _now: Instant, periodic: bool, out: &mut Out) {
        if !periodic || self.min_pct <= 0.0 {
            return;
        }
        let mut b = [0u8; 2048];
        let Some(n) = self
            .meminfo
            .as_ref()
            .and_then(|f| f.read_at(&mut b, 0).ok())
        else {
            return;
        };
        let Some((avail, total)) = parse_meminfo(std::str::from_utf8(&b[..n]).unwrap_or("")) else {
            return;
        };
        self.avail_pct = 100.0 * avail as f64 / total.max(1) as f64;
        let low = self.avail_pct < self.min_pct;
        if low && !self.low {
            out.detections.push(Detection::new(
                FaultKind::Memory,
                "meminfo",
                "system",
                format!("MemAvailable {:.1}% < {:.1}%", self.avail_pct, self.min_pct),
            ));
        } else if !low && self.low {
            out.recovered.push((FaultKind::Memory, "system".into()));
        }
        self.low = low;
    }

    fn status(&self) -> Status {
        Status {
            check: "memory",
            ok: !self.low,
            detail: format!(
                "MemAvailable {:.1}% (floor {:.1}%); {} memcg OOM events",
                self.avail_pct, self.min_pct, self.oom_events
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Beat {
    cfg: config::Heartbeat,
    content: Option<Vec<u8>>,
    changed_at: Instant,
    next_check: Instant,
    lost: bool,
}

/// Heartbeat loss: a file a live service keeps changing. Checked four times per timeout, so
/// silence is reported at most a quarter-timeout (plus a check) after it passes the timeout,
/// and never before the silence really lasted the timeout.
#[derive(Debug)]
pub struct HeartbeatLoss {
    beats: Vec<Beat>,
}

fn read_beat(path: &Path) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    let mut b = vec![0u8; 4096];
    let n = f.read_at(&mut b, 0).ok()?;
    b.truncate(n);
    Some(b)
}

impl HeartbeatLoss {
    pub fn new(cfgs: &[config::Heartbeat]) -> HeartbeatLoss {
        let now = Instant::now();
        HeartbeatLoss {
            beats: cfgs
                .iter()
                .map(|c| Beat {
                    content: read_beat(&c.path),
                    cfg: c.clone(),
                    changed_at: now,
                    next_check: now,
                    lost: false,
                })
                .collect(),
        }
    }
}

impl Detector for HeartbeatLoss {
    fn name(&self) -> &'static str {
        "heartbeat"
    }

    fn deadline(&self) -> Option<Instant> {
        self.beats.iter().map(|b| b.next_check).min()
    }

    fn on_timer(&mut self, now: Instant, out: &mut Out) {
        for b in &mut self.beats {
            if now < b.next_check {
                continue;
            }
            let timeout = Duration::from_millis(b.cfg.timeout_ms);
            b.next_check = now + timeout / 4;
            let c = read_beat(&b.cfg.path);
            if c.is_some() && c != b.content {
                b.content = c;
                b.changed_at = now;
                if b.lost {
                    b.lost = false;
                    out.recovered
                        .push((FaultKind::Heartbeat, format!("heartbeat {}", b.cfg.name)));
                }
                continue;
            }
            let silent = now.duration_since(b.changed_at);
            if !b.lost && silent >= timeout {
                b.lost = true;
                out.detections.push(Detection::new(
                    FaultKind::Heartbeat,
                    "heartbeat",
                    format!("heartbeat {}", b.cfg.name),
                    format!(
                        "{} unchanged for {} ms (timeout {} ms){}",
                        b.cfg.path.display(),
                        silent.as_millis(),
                        b.cfg.timeout_ms,
                        if c.is_none() {
                            "; the file cannot be read"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
    }

    fn status(&self) -> Status {
        let lost: Vec<_> = self
            .beats
            .iter()
            .filter(|b| b.lost)
            .map(|b| &b.cfg.name)
            .collect();
        Status {
            check: "heartbeats",
            ok: lost.is_empty(),
            detail: if self.beats.is_empty() {
                "none configured".into()
            } else if lost.is_empty() {
                format!("{} alive", self.beats.len())
            } else {
                format!("lost: {lost:?}")
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Kernel oops, panic, BUG, soft/hard lockup, RCU and workqueue stalls, lockdep splats: the
/// kernel's own detectors, read from /dev/kmsg. Rate-limited per kind.
#[derive(Debug)]
pub struct KernelReports {
    latch: Latch,
    seen: u64,
    last: Option<String>,
}

impl KernelReports {
    pub fn new() -> KernelReports {
        KernelReports {
            latch: Latch::new(Duration::from_secs(1)),
            seen: 0,
            last: None,
        }
    }
}

impl Default for KernelReports {
    fn default() -> Self {
        Self::new()
    }
}

impl Detector for KernelReports {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn on_kmsg(&mut self, class: &Class, rec: &Record, now: Instant, out: &mut Out) {
        if class.fault != FaultKind::Kernel {
            return;
        }
        self.seen += 1;
        self.last = Some(rec.text.clone());
        if self.latch.fire(class.what, now) {
            out.detections.push(Detection::new(
                FaultKind::Kernel,
                "kmsg",
                format!("kernel {}", class.what),
                &rec.text,
            ));
        }
    }

    fn status(&self) -> Status {
        Status {
            check: "kernel log",
            ok: self.seen == 0,
            detail: match &self.last {
                None => "no oops/lockup/stall lines".into(),
                Some(l) => format!("{} fault lines, last: {l}", self.seen),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::DTask;

    fn dt(tid: i32, wchan: &str, pcount: u64) -> DTask {
        let tid = Pid::from_raw(tid).unwrap();
        DTask {
            tid,
            tgid: tid,
            comm: "cat".into(),
            wchan: wchan.into(),
            pcount,
        }
    }

    #[test]
    fn hung_task_needs_threshold_and_no_scheduling() {
        let mut h = HungTasks::new(&config::HungTask {
            enabled: true,
            threshold_ms: 2000,
        });
        let t0 = Instant::now();
        let mut out = Out::default();
        let s = Sweep {
            tasks: 10,
            dstate: vec![dt(5, "__folio_lock", 7)],
        };
        h.on_sweep(&s, t0, false, &mut out);
        h.on_sweep(&s, t0 + Duration::from_millis(1500), false, &mut out);
        assert!(out.detections.is_empty());
        // It ran once: the clock starts again.
        let s2 = Sweep {
            tasks: 10,
            dstate: vec![dt(5, "__folio_lock", 8)],
        };
        h.on_sweep(&s2, t0 + Duration::from_millis(2500), false, &mut out);
        assert!(out.detections.is_empty());
        h.on_sweep(&s2, t0 + Duration::from_millis(4600), false, &mut out);
        assert_eq!(out.detections.len(), 1);
        assert_eq!(out.detections[0].pid, Some(5));
        h.on_sweep(
            &Sweep::default(),
            t0 + Duration::from_secs(6),
            false,
            &mut out,
        );
        assert_eq!(out.recovered.len(), 1);
    }

    #[test]
    fn pile_up_is_confirmed_then_reported_once() {
        let mut g = BlockedGrowth::new(&config::Driver {
            enabled: true,
            min_blocked: 3,
            psi_io_stall_us: 0,
        });
        let t0 = Instant::now();
        let mut out = Out::default();
        let s = Sweep {
            tasks: 9,
            dstate: (1..=3).map(|i| dt(i, "__folio_lock", 1)).collect(),
        };
        g.on_sweep(&s, t0, true, &mut out);
        assert!(out.detections.is_empty());
        assert!(out.sweep_at.is_some(), "a confirming sweep is requested");
        g.on_sweep(&s, t0 + Duration::from_millis(200), false, &mut out);
        assert_eq!(out.detections.len(), 1);
        g.on_sweep(&s, t0 + Duration::from_secs(1), true, &mut out);
        assert_eq!(
            out.detections.len(),
            1,
            "no repeat while the group does not double"
        );
        // Different wait points do not add up.
        let mut g2 = BlockedGrowth::new(&config::Driver {
            enabled: true,
            min_blocked: 3,
            psi_io_stall_us: 0,
        });
        let mixed = Sweep {
            tasks: 9,
            dstate: vec![dt(1, "a", 1), dt(2, "b", 1), dt(3, "c", 1)],
        };
        let mut out2 = Out::default();
        g2.on_sweep(&mixed, t0, true, &mut out2);
        g2.on_sweep(&mixed, t0 + Duration::from_secs(1), true, &mut out2);
        assert!(out2.detections.is_empty());
    }

    #[test]
    fn fork_rate_per_parent() {
        let mut f = ForkStorm::new(&config::Fork {
            enabled: true,
            max_per_sec: 1000,
            max_per_sec_per_parent: 5,
        });
        let now = Instant::now();
        let mut out = Out::default();
        let p = sys::Pid::from_raw(1).unwrap();
        for i in 0..10 {
            let c = sys::Pid::from_raw(1000 + i).unwrap();
            f.on_proc(
                &ProcEvent::Fork {
                    parent_tgid: p,
                    child_tid: c,
                    child_tgid: c,
                },
                now,
                &mut out,
            );
        }
        assert_eq!(out.detections.len(), 1);
        assert_eq!(out.detections[0].pid, Some(1));
    }

    #[test]
    fn meminfo_parses() {
        assert_eq!(
            parse_meminfo("MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable: 40 kB\n"),
            Some((40, 100))
        );
    }
}
