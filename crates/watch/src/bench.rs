//! `kintsugi bench watch`: the CPU cost of the event-driven monitor, idle and under each fault,
//! beside a plain /proc polling scanner at 1 / 10 / 100 ms, all in one run with ~300 tasks on
//! the machine; and the detection latency of each fault, from its onset to the monitor's event.
//!
//! CPU is getrusage(RUSAGE_THREAD) of the thread doing the watching, as a percentage of one
//! core over the phase's wall time. Onsets are CLOCK_MONOTONIC stamps taken by the fault
//! harness; detections carry the monitor's stamp from the same clock.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::config::{self, ActionKind, Config};
use crate::event::{Event, FaultKind};
use crate::faults::{self, ForkBomb, FuseHang, HeartbeatWriter, MemoryHog, Sleepers};
use crate::monitor::{Monitor, RunOptions, RunStats};
use crate::poller;

/// Errors that stop the benchmark; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "cannot set up {what}: {source} (the benchmark needs root, cgroup v1 pids/memory and /dev/fuse)"
    )]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the monitor failed: {0}")]
    Monitor(#[from] crate::monitor::WatchError),
    #[error("the monitor thread panicked")]
    Panicked,
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Setup { what, source }
}

/// Phase lengths and the task count to run with.
#[derive(Debug, Clone)]
pub struct Options {
    pub idle: Duration,
    pub poll: Duration,
    pub fault_phase: Duration,
    pub target_tasks: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            idle: Duration::from_secs(10),
            poll: Duration::from_secs(5),
            fault_phase: Duration::from_secs(6),
            target_tasks: 300,
        }
    }
}

/// CPU cost of one mode under one load.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    /// `event`, `poll_1ms`, `poll_10ms`, `poll_100ms`.
    pub mode: &'static str,
    /// `idle`, or the fault running during the phase.
    pub load: &'static str,
    pub cpu_pct: f64,
    pub note: String,
}

/// Detection latency of one fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    /// `hung_driver`, `fork_storm`, `memory`, `heartbeat`, `hung_task`.
    pub fault: &'static str,
    /// `None`: not detected within the phase.
    pub ms: Option<f64>,
    pub source: String,
    /// Whether the configured action (if any) ran successfully.
    pub action: Option<bool>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub tasks: usize,
    pub cost: Vec<Cost>,
    pub latency: Vec<Latency>,
}

const HUNG_THRESHOLD_MS: u64 = 2000;
const MIN_BLOCKED: usize = 3;

fn config(beat: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.hung_task.threshold_ms = HUNG_THRESHOLD_MS;
    c.driver.min_blocked = MIN_BLOCKED;
    c.heartbeat.push(config::Heartbeat {
        name: "bench".into(),
        path: beat.to_path_buf(),
        timeout_ms: 1000,
    });
    c.action.push(config::Action {
        on: vec![FaultKind::ForkStorm, FaultKind::Memory],
        kind: ActionKind::KillCgroup,
        pid: None,
        pid_file: None,
        signal: "SIGHUP".into(),
        cgroup: None,
        allow: vec!["/kintsugi-watch-*".into()],
        command: vec![],
        timeout_ms: 10_000,
        cooldown_ms: 500,
    });
    c
}

/// Runs a monitor on its own thread for `dur` while `scenario` drives a fault on this thread
/// with the monitor's events. Returns the monitor's CPU use and the scenario's result.
fn phase<R>(
    cfg: &Config,
    dur: Duration,
    scenario: impl FnOnce(&Receiver<Event>) -> R,
) -> Result<(RunStats, R, Vec<Event>), BenchError> {
    let (tx, rx) = channel();
    let cfg = cfg.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::spawn(move || -> Result<RunStats, crate::monitor::WatchError> {
        let mut m = Monitor::new(cfg)?;
        let opts = RunOptions {
            until: Some(Instant::now() + dur),
            summary_every: None,
        };
        m.run(&stop2, &opts, &mut |e| {
            let _ = tx.send(e.clone());
        })
    });
    // Wait for the monitor to be listening before the fault starts.
    let mut early = Vec::new();
    if let Ok(e) = rx.recv_timeout(Duration::from_secs(10)) {
        early.push(e);
    }
    let r = scenario(&rx);
    let stats = handle.join().map_err(|_| BenchError::Panicked)??;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    early.extend(rx.try_iter());
    Ok((stats, r, early))
}

/// Waits for the first detection of `fault` satisfying `pred`; returns its mono_ns and source.
pub fn wait_detection(
    rx: &Receiver<Event>,
    fault: FaultKind,
    timeout: Duration,
    mut pred: impl FnMut(&crate::event::Detection) -> bool,
    seen: &mut Vec<Event>,
) -> Option<(u64, String)> {
    let end = Instant::now() + timeout;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let Ok(e) = rx.recv_timeout(left) else { break };
        seen.push(e.clone());
        if let Event::Detection {
            mono_ns, detection, ..
        } = &e
            && detection.fault == fault
            && pred(detection)
        {
            return Some((*mono_ns, detection.source.to_string()));
        }
    }
    None
}

fn action_ok(events: &[Event], fault: FaultKind) -> Option<bool> {
    let mut r = None;
    for e in events {
        if let Event::Action { action, .. } = e
            && action.fault == fault
        {
            r = Some(r.unwrap_or(false) || action.ok);
        }
    }
    r
}

fn ms(det: u64, onset: u64) -> f64 {
    (det as f64 - onset as f64) / 1e6
}

/// Runs the whole benchmark (about a minute with the default options).
pub fn run(opts: &Options, mut progress: impl FnMut(&str)) -> Result<Report, BenchError> {
    let tmp = std::env::temp_dir();
    let beat_path: PathBuf = tmp.join(faults::unique("kintsugi-watch-beat"));
    let mut report = Report::default();
    let have = faults::task_count();
    let _sleepers = Sleepers::spawn(opts.target_tasks.saturating_sub(have))
        .map_err(setup("the sleeping tasks"))?;
    report.tasks = faults::task_count();
    let cfg = config(&beat_path);
    let beat = HeartbeatWriter::start(&beat_path, Duration::from_millis(50))
        .map_err(setup("the heartbeat writer"))?;

    progress(&format!(
        "event monitor, idle, {} tasks, {:?}",
        report.tasks, opts.idle
    ));
    let (idle, (), _) = phase(&cfg, opts.idle, |_| {})?;
    report.cost.push(Cost {
        mode: "event",
        load: "idle",
        cpu_pct: idle.cpu_pct(),
        note: format!("{} wakeups", idle.wakeups),
    });

    for (mode, ms) in [("poll_1ms", 1), ("poll_10ms", 10), ("poll_100ms", 100)] {
        progress(&format!(
            "/proc polling scanner every {ms} ms, {:?}",
            opts.poll
        ));
        let st = poller::run(Duration::from_millis(ms), opts.poll);
        let wanted = opts.poll.as_millis() as u64 / ms;
        report.cost.push(Cost {
            mode,
            load: "idle",
            cpu_pct: st.cpu_pct(),
            note: format!(
                "{} scans of {} tasks ({} wanted)",
                st.scans, st.tasks, wanted
            ),
        });
    }

    // Heartbeat: the writer beats every 50 ms, then freezes; onset = last beat + timeout.
    progress("fault: heartbeat stops");
    let (st, lat, ev) = phase(&cfg, opts.fault_phase, |rx| {
        let mut seen = Vec::new();
        std::thread::sleep(Duration::from_millis(1200));
        let last = beat.stop();
        let onset = last + 1_000_000_000;
        let d = wait_detection(
            rx,
            FaultKind::Heartbeat,
            Duration::from_secs(4),
            |_| true,
            &mut seen,
        );
        (d.map(|(t, s)| (ms(t, onset), s)), seen)
    })?;
    drop(beat);
    let events: Vec<Event> = lat.1.into_iter().chain(ev).collect();
    report.cost.push(Cost {
        mode: "event",
        load: "heartbeat",
        cpu_pct: st.cpu_pct(),
        note: String::new(),
    });
    report.latency.push(Latency {
        fault: "heartbeat",
        ms: lat.0.as_ref().map(|l| l.0),
        source: lat.0.map(|l| l.1).unwrap_or_default(),
        action: action_ok(&events, FaultKind::Heartbeat),
    });
    let _ = std::fs::remove_file(&beat_path);
    // The heartbeat is gone for the remaining phases.
    let mut cfg = cfg;
    cfg.heartbeat.clear();

    progress("fault: fork bomb in a pids cgroup (pids.max 64)");
    let (st, lat, ev) = phase(&cfg, opts.fault_phase, |rx| {
        let mut seen = Vec::new();
        let bomb = ForkBomb::start(64, Duration::from_secs(5)).map_err(setup("the fork bomb"))?;
        let path = bomb.cgroup.path.clone();
        let d = wait_detection(
            rx,
            FaultKind::ForkStorm,
            Duration::from_secs(4),
            |d| d.cgroup.as_deref() == Some(&path),
            &mut seen,
        );
        // Let the kill action land before the bomb is torn down.
        std::thread::sleep(Duration::from_millis(300));
        seen.extend(rx.try_iter());
        let r = d.map(|(t, s)| (ms(t, bomb.started_ns), s));
        drop(bomb);
        Ok::<_, BenchError>((r, seen))
    })?;
    let (lat, seen) = lat?;
    let events: Vec<Event> = seen.into_iter().chain(ev).collect();
    report.cost.push(Cost {
        mode: "event",
        load: "fork_storm",
        cpu_pct: st.cpu_pct(),
        note: String::new(),
    });
    report.latency.push(Latency {
        fault: "fork_storm",
        ms: lat.as_ref().map(|l| l.0),
        source: lat.map(|l| l.1).unwrap_or_default(),
        action: action_ok(&events, FaultKind::ForkStorm),
    });

    progress("fault: memory hog in a 64 MiB memory cgroup");
    let (st, lat, ev) = phase(&cfg, opts.fault_phase, |rx| {
        let mut seen = Vec::new();
        let hog = MemoryHog::start(64 << 20, false, Duration::from_secs(5))
            .map_err(setup("the memory hog"))?;
        let path = hog.cgroup.path.clone();
        let d = wait_detection(
            rx,
            FaultKind::Memory,
            Duration::from_secs(4),
            |d| d.cgroup.as_deref() == Some(&path),
            &mut seen,
        );
        std::thread::sleep(Duration::from_millis(300));
        seen.extend(rx.try_iter());
        let r = d.map(|(t, s)| (ms(t, hog.started_ns), s));
        drop(hog);
        Ok::<_, BenchError>((r, seen))
    })?;
    let (lat, seen) = lat?;
    let events: Vec<Event> = seen.into_iter().chain(ev).collect();
    report.cost.push(Cost {
        mode: "event",
        load: "memory",
        cpu_pct: st.cpu_pct(),
        note: String::new(),
    });
    report.latency.push(Latency {
        fault: "memory",
        ms: lat.as_ref().map(|l| l.0),
        source: lat.map(|l| l.1).unwrap_or_default(),
        action: action_ok(&events, FaultKind::Memory),
    });

    progress("fault: FUSE daemon stops answering, readers pile up");
    let fuse_phase = opts
        .fault_phase
        .max(Duration::from_millis(HUNG_THRESHOLD_MS + 3000));
    let (st, lat, _) = phase(&cfg, fuse_phase, |rx| {
        let mut seen = Vec::new();
        let mut hang = FuseHang::mount(&tmp).map_err(setup("the FUSE mount"))?;
        let mut first_d = None;
        let mut pile_up = None;
        let t = Instant::now();
        // One reader every 100 ms up to MIN_BLOCKED + 2 (the first waits in S, the rest in D).
        while t.elapsed() < Duration::from_secs(3) && pile_up.is_none() {
            if hang.readers.len() < MIN_BLOCKED + 3 {
                hang.add_reader().map_err(setup("a FUSE reader"))?;
            }
            let until = Instant::now() + Duration::from_millis(100);
            while Instant::now() < until {
                let (b, same) = hang.blocked();
                let now = sys::clock::monotonic_ns();
                if b >= 1 && first_d.is_none() {
                    first_d = Some(now);
                }
                if same >= MIN_BLOCKED && pile_up.is_none() {
                    pile_up = Some(now);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let driver = wait_detection(
            rx,
            FaultKind::HungDriver,
            Duration::from_secs(3),
            |_| true,
            &mut seen,
        );
        let hung = wait_detection(
            rx,
            FaultKind::HungTask,
            Duration::from_millis(HUNG_THRESHOLD_MS + 2500),
            |d| d.source == "proc_stat",
            &mut seen,
        );
        drop(hang);
        Ok::<_, BenchError>((
            pile_up.zip(driver).map(|(o, (t, s))| (ms(t, o), s)),
            first_d
                .zip(hung)
                .map(|(o, (t, s))| (ms(t, o + HUNG_THRESHOLD_MS * 1_000_000), s)),
        ))
    })?;
    let (driver, hung) = lat?;
    report.cost.push(Cost {
        mode: "event",
        load: "hung_driver",
        cpu_pct: st.cpu_pct(),
        note: String::new(),
    });
    report.latency.push(Latency {
        fault: "hung_driver",
        ms: driver.as_ref().map(|l| l.0),
        source: driver.map(|l| l.1).unwrap_or_default(),
        action: None,
    });
    report.latency.push(Latency {
        fault: "hung_task",
        ms: hung.as_ref().map(|l| l.0),
        source: hung.map(|l| l.1).unwrap_or_default(),
        action: None,
    });
    Ok(report)
}

impl Report {
    /// The JSON object the issue specifies: `cost` has one entry per mode (the event monitor
    /// idle; the per-fault costs are in the human table), `latency` one per fault (`null` when
    /// a fault was not detected).
    pub fn to_json(&self) -> serde_json::Value {
        let cost: Vec<_> = self
            .cost
            .iter()
            .filter(|c| c.load == "idle")
            .map(|c| serde_json::json!({"mode": c.mode, "cpu_pct": round(c.cpu_pct, 3)}))
            .collect();
        let order = [
            "hung_driver",
            "fork_storm",
            "memory",
            "heartbeat",
            "hung_task",
        ];
        let latency: Vec<_> = order
            .iter()
            .filter_map(|f| self.latency.iter().find(|l| l.fault == *f))
            .map(|l| serde_json::json!({"fault": l.fault, "ms": l.ms.map(|m| round(m, 1))}))
            .collect();
        serde_json::json!({"bench": "watch", "cost": cost, "latency": latency})
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}
