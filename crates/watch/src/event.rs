//! What the monitor reports: detections, actions and summaries as JSON lines, and the counters
//! behind them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The fault classes of the Orthros monitor, plus kernel oops/lockup reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A task in D state that has not been scheduled for longer than the threshold, or a kernel
    /// hung-task report.
    HungTask,
    /// More and more tasks blocked in the kernel at the same place (a driver that stopped
    /// answering), or an I/O stall reported by PSI.
    HungDriver,
    /// Runaway process creation: fork rate over the limit, or forks rejected by a pids limit.
    ForkStorm,
    /// Memory exhaustion: a cgroup OOM, the kernel OOM killer, memory pressure stalls, or
    /// available memory under the floor.
    Memory,
    /// A watched heartbeat stopped changing.
    Heartbeat,
    /// A kernel oops, panic, BUG, lockup or RCU stall line in the kernel log.
    Kernel,
}

impl FaultKind {
    /// Every kind, in report order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::HungTask,
        FaultKind::HungDriver,
        FaultKind::ForkStorm,
        FaultKind::Memory,
        FaultKind::Heartbeat,
        FaultKind::Kernel,
    ];

    /// The snake_case name used in JSON, config files and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::HungTask => "hung_task",
            FaultKind::HungDriver => "hung_driver",
            FaultKind::ForkStorm => "fork_storm",
            FaultKind::Memory => "memory",
            FaultKind::Heartbeat => "heartbeat",
            FaultKind::Kernel => "kernel",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One detected fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub fault: FaultKind,
    /// Which kernel interface reported it: `proc_stat`, `kmsg`, `proc_connector`, `psi`,
    /// `memcg_eventfd`, `pids_events`, `meminfo`, `heartbeat`, `hung_task_detect_count`.
    pub source: &'static str,
    /// What is faulty, for humans and for de-duplication: `pid 123 (cat)`, `cgroup /x`, …
    pub subject: String,
    /// Figures behind the decision.
    pub detail: String,
    /// The raw pid (JSON carries numbers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Absolute path of the cgroup directory the fault is confined to, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

impl Detection {
    pub fn new(
        fault: FaultKind,
        source: &'static str,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) -> Detection {
        Detection {
            fault,
            source,
            subject: subject.into(),
            detail: detail.into(),
            pid: None,
            cgroup: None,
        }
    }
    pub fn with_pid(mut self, pid: sys::Pid) -> Detection {
        self.pid = Some(pid.as_raw());
        self
    }
    pub fn with_cgroup(mut self, cg: Option<PathBuf>) -> Detection {
        self.cgroup = cg;
        self
    }
}

/// The result of one action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionRecord {
    /// `restart`, `kill_cgroup` or `hook`.
    pub action: &'static str,
    /// The fault that triggered it.
    pub fault: FaultKind,
    /// The detection's subject.
    pub subject: String,
    /// What was acted on: a pid, a cgroup path, a command.
    pub target: String,
    pub ok: bool,
    pub detail: String,
}

/// The live summary, also printed by `--once` style consumers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub tasks: usize,
    pub d_state: usize,
    pub hung: usize,
    pub forks_per_sec: u64,
    pub mem_available_pct: f64,
    pub psi_io_avg10: f64,
    pub psi_memory_avg10: f64,
    pub detections: u64,
    pub actions: u64,
}

/// One JSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The monitor is up; `sources` lists the kernel interfaces it listens on and `degraded`
    /// the ones it could not open (with the reason).
    Started {
        ts_ms: u64,
        mono_ns: u64,
        sources: Vec<String>,
        degraded: Vec<String>,
    },
    Detection {
        ts_ms: u64,
        /// CLOCK_MONOTONIC, comparable with stamps taken by other processes on this machine.
        mono_ns: u64,
        #[serde(flatten)]
        detection: Detection,
    },
    /// A fault that was reported is gone (e.g. the hung task was scheduled again).
    Recovered {
        ts_ms: u64,
        mono_ns: u64,
        fault: FaultKind,
        subject: String,
    },
    Action {
        ts_ms: u64,
        mono_ns: u64,
        #[serde(flatten)]
        action: ActionRecord,
    },
    Summary {
        ts_ms: u64,
        mono_ns: u64,
        #[serde(flatten)]
        summary: Summary,
    },
}

impl Event {
    /// The event as one JSON line (no trailing newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize: plain data, string keys")
    }
}

/// Wall-clock milliseconds since the epoch, for humans correlating with other logs.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters for every detection and action, exportable in the Prometheus text format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub detections: BTreeMap<FaultKind, u64>,
    /// (action, ok) → count.
    pub actions: BTreeMap<(&'static str, bool), u64>,
    /// Proc-connector overruns (events the kernel dropped because we fell behind).
    pub events_lost: u64,
}

impl Metrics {
    pub fn count(&mut self, ev: &Event) {
        match ev {
            Event::Detection { detection, .. } => {
                *self.detections.entry(detection.fault).or_default() += 1
            }
            Event::Action { action, .. } => {
                *self.actions.entry((action.action, action.ok)).or_default() += 1
            }
            _ => {}
        }
    }
    pub fn detections_total(&self) -> u64 {
        self.detections.values().sum()
    }
    pub fn actions_total(&self) -> u64 {
        self.actions.values().sum()
    }
    /// Prometheus text exposition (node_exporter textfile collector format).
    pub fn to_prometheus(&self) -> String {
        let mut s = String::new();
        s.push_str("# TYPE kintsugi_watch_detections_total counter\n");
        for k in FaultKind::ALL {
            let n = self.detections.get(&k).copied().unwrap_or(0);
            s.push_str(&format!(
                "kintsugi_watch_detections_total{{fault=\"{k}\"}} {n}\n"
            ));
        }
        s.push_str("# TYPE kintsugi_watch_actions_total counter\n");
        for ((a, ok), n) in &self.actions {
            s.push_str(&format!(
                "kintsugi_watch_actions_total{{action=\"{a}\",ok=\"{ok}\"}} {n}\n"
            ));
        }
        s.push_str("# TYPE kintsugi_watch_events_lost_total counter\n");
        s.push_str(&format!(
            "kintsugi_watch_events_lost_total {}\n",
            self.events_lost
        ));
        s
    }
}

/// Writes `text` to `path` without ever leaving a half-written file: a temporary file in the
/// same directory, fsync, rename.
pub fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_json_is_flat_and_counted() {
        let d = Detection::new(FaultKind::ForkStorm, "kmsg", "cgroup /x", "rejected")
            .with_cgroup(Some("/sys/fs/cgroup/pids/x".into()));
        let ev = Event::Detection {
            ts_ms: 1,
            mono_ns: 2,
            detection: d,
        };
        let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["type"], "detection");
        assert_eq!(v["fault"], "fork_storm");
        assert_eq!(v["cgroup"], "/sys/fs/cgroup/pids/x");
        assert!(v.get("pid").is_none());
        let mut m = Metrics::default();
        m.count(&ev);
        assert_eq!(m.detections_total(), 1);
        assert!(m.to_prometheus().contains("fault=\"fork_storm\"} 1"));
        let p = std::env::temp_dir().join(format!("kw-metrics-{}", std::process::id()));
        write_atomic(&p, &m.to_prometheus()).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), m.to_prometheus());
        std::fs::remove_file(&p).unwrap();
    }
}
