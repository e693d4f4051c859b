//! `kintsugi watch --once`: the machine's health now, from one short look (two samples half a
//! second apart, so "stuck" and "rate" mean something), as rows of a table.

use std::collections::HashMap;
use std::time::Duration;

use crate::cgroup;
use crate::config::Config;
use crate::detect::{Status, parse_meminfo};
use crate::event::FaultKind;
use crate::kmsg::{self, Kmsg};
use crate::psi::{self, Resource};
use crate::tasks::TaskTable;

fn forks_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("processes ")?.trim().parse().ok())
}

/// Takes the snapshot (about 0.5 s).
pub fn snapshot(cfg: &Config) -> Vec<Status> {
    let gap = Duration::from_millis(500);
    let mut table = TaskTable::new(cfg.max_tasks);
    let beats0: Vec<_> = cfg
        .heartbeat
        .iter()
        .map(|h| std::fs::read(&h.path).ok())
        .collect();
    let f0 = forks_total();
    let s0 = table.sweep();
    std::thread::sleep(gap);
    let s1 = table.sweep();
    let f1 = forks_total();
    let mut rows = Vec::new();

    let before: HashMap<sys::Pid, u64> = s0.dstate.iter().map(|t| (t.tid, t.pcount)).collect();
    let stuck: Vec<_> = s1
        .dstate
        .iter()
        .filter(|t| before.get(&t.tid) == Some(&t.pcount))
        .collect();
    let detect_count = std::fs::read_to_string("/proc/sys/kernel/hung_task_detect_count")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "n/a".into());
    rows.push(Status {
        check: "hung tasks",
        ok: stuck.is_empty(),
        detail: format!(
            "{} tasks, {} in D state, {} not scheduled for {} ms; kernel hung_task_detect_count {}",
            s1.tasks,
            s1.dstate.len(),
            stuck.len(),
            gap.as_millis(),
            detect_count
        ),
    });

    let mut groups: HashMap<&str, usize> = HashMap::new();
    for t in &stuck {
        *groups.entry(t.wchan.as_str()).or_default() += 1;
    }
    let worst = groups.iter().max_by_key(|(_, n)| **n);
    let io = psi::read(Resource::Io).unwrap_or_default();
    rows.push(Status {
        check: "blocked on driver",
        ok: worst.is_none_or(|(_, n)| *n < cfg.driver.min_blocked),
        detail: match worst {
            Some((w, n)) => format!("{n} stuck tasks at {w}; PSI io some avg10 {:.2}%", io.avg10),
            None => format!("no stuck tasks; PSI io some avg10 {:.2}%", io.avg10),
        },
    });

    let rate = match (f0, f1) {
        (Some(a), Some(b)) => (b.saturating_sub(a) as f64 / gap.as_secs_f64()) as u64,
        _ => 0,
    };
    let mut rejecting = Vec::new();
    if let Some(root) = cgroup::v1_hierarchy("pids") {
        for cg in cgroup::list(&root, 4) {
            let ev = std::fs::read_to_string(cg.join("pids.events")).unwrap_or_default();
            let max: u64 = ev
                .lines()
                .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
                .unwrap_or(0);
            if max > 0 {
                rejecting.push(format!("{} ({max} rejected)", cgroup::relative(&cg)));
            }
        }
    }
    rows.push(Status {
        check: "fork storm",
        ok: rate < cfg.fork.max_per_sec,
        detail: format!(
            "{rate} forks/s (limit {}/s); pids limits ever hit: {}",
            cfg.fork.max_per_sec,
            if rejecting.is_empty() {
                "none".to_string()
            } else {
                rejecting.join(", ")
            }
        ),
    });

    let (avail, total) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_meminfo(&s))
        .unwrap_or((0, 1));
    let pct = 100.0 * avail as f64 / total.max(1) as f64;
    let mem = psi::read(Resource::Memory).unwrap_or_default();
    let mut under_oom = Vec::new();
    if let Some(root) = cgroup::v1_hierarchy("memory") {
        for cg in cgroup::list(&root, 3) {
            let o = cgroup::parse_oom_control(
                &std::fs::read_to_string(cg.join("memory.oom_control")).unwrap_or_default(),
            );
            if o.under_oom {
                under_oom.push(cgroup::relative(&cg));
            }
        }
    }
    rows.push(Status {
        check: "memory",
        ok: pct >= cfg.memory.min_available_pct && under_oom.is_empty(),
        detail: format!(
            "MemAvailable {pct:.1}% of {} MiB; PSI memory some avg10 {:.2}%; cgroups under OOM: {}",
            total / 1024,
            mem.avg10,
            if under_oom.is_empty() {
                "none".to_string()
            } else {
                under_oom.join(", ")
            }
        ),
    });

    let beats1: Vec<_> = cfg
        .heartbeat
        .iter()
        .map(|h| std::fs::read(&h.path).ok())
        .collect();
    let silent: Vec<_> = cfg
        .heartbeat
        .iter()
        .zip(beats0.iter().zip(&beats1))
        .filter(|(_, (a, b))| a.is_none() || a == b)
        .map(|(h, _)| h.name.clone())
        .collect();
    rows.push(Status {
        check: "heartbeats",
        ok: silent.is_empty(),
        detail: if cfg.heartbeat.is_empty() {
            "none configured".into()
        } else if silent.is_empty() {
            format!("{} changing", cfg.heartbeat.len())
        } else {
            format!("no change in {} ms: {}", gap.as_millis(), silent.join(", "))
        },
    });

    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let mut last = None;
    let kmsg_ok = match Kmsg::open(true) {
        Ok(mut k) => {
            while let Ok(Some(r)) = k.next_record() {
                if r.facility != 0 && !cfg.kernel.accept_user_messages {
                    continue;
                }
                if let Some(c) = kmsg::classify(&r.text)
                    && matches!(c.fault, FaultKind::Kernel | FaultKind::HungTask)
                {
                    *counts.entry(c.what).or_default() += 1;
                    last = Some(r.text);
                }
            }
            true
        }
        Err(_) => false,
    };
    let mut list: Vec<_> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    list.sort();
    rows.push(Status {
        check: "kernel log",
        ok: counts.keys().all(|k| *k == "warning"),
        detail: if !kmsg_ok {
            "cannot read /dev/kmsg (run as root)".into()
        } else if list.is_empty() {
            "no oops/lockup/stall/hung-task lines since boot".into()
        } else {
            format!(
                "since boot: {}; last: {}",
                list.join(", "),
                last.unwrap_or_default()
            )
        },
    });
    rows
}
