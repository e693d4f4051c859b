//! The task table: one kept-open `/proc/<tgid>/task/<tid>/stat` fd per task, kept current by
//! proc-connector fork/exit events, so a sweep is one `pread` per task (about 1 µs) instead of
//! a directory walk plus open/read/close (3–16 µs, measured in research/monitor.md).

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;

use rustix::fs::{Mode, OFlags};
use sys::Pid;

/// The part of `/proc/…/stat` the monitor needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat<'a> {
    pub comm: &'a str,
    pub state: u8,
}

/// Parses a stat line. `comm` may hold spaces and parentheses, so the state is found after the
/// *last* `)`.
pub fn parse_stat(line: &[u8]) -> Option<Stat<'_>> {
    let open = line.iter().position(|&b| b == b'(')?;
    let close = line.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let comm = std::str::from_utf8(&line[open + 1..close]).unwrap_or("?");
    let state = *line.get(close + 2)?;
    Some(Stat { comm, state })
}

/// A task found in D state by a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DTask {
    pub tid: Pid,
    pub tgid: Pid,
    pub comm: String,
    /// Kernel symbol the task sleeps in (`/proc/…/wchan`), e.g. `__folio_lock`.
    pub wchan: String,
    /// Times the task ran on a CPU (`schedstat` field 3): unchanged means not scheduled since.
    pub pcount: u64,
}

/// Result of one sweep.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    pub tasks: usize,
    pub dstate: Vec<DTask>,
}

#[derive(Debug)]
struct Task {
    tgid: Pid,
    fd: OwnedFd,
}

/// Tasks tracked with kept-open stat fds.
#[derive(Debug)]
pub struct TaskTable {
    tasks: HashMap<Pid, Task>,
    /// Forked since the last sweep: opened at the next sweep if still alive, so short-lived
    /// tasks of a fork storm cost nothing but the event.
    pending: HashMap<Pid, Pid>,
    max_tasks: usize,
    /// Set on proc-connector overruns: the next sweep walks /proc again.
    stale: bool,
    buf: Vec<u8>,
}

fn open_ro(path: &str) -> Option<OwnedFd> {
    rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()
}

fn read_small(path: &str, buf: &mut Vec<u8>) -> Option<usize> {
    let fd = open_ro(path)?;
    buf.resize(512, 0);
    rustix::io::read(&fd, &mut buf[..]).ok()
}

impl TaskTable {
    pub fn new(max_tasks: usize) -> TaskTable {
        TaskTable {
            tasks: HashMap::new(),
            pending: HashMap::new(),
            max_tasks,
            stale: true,
            buf: vec![0; 1024],
        }
    }

    /// Number of tracked tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Marks the table stale (events were lost): the next sweep rescans /proc.
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    pub fn on_fork(&mut self, tgid: Pid, tid: Pid) {
        if self.pending.len() < self.max_tasks {
            self.pending.insert(tid, tgid);
        }
    }

    pub fn on_exit(&mut self, tid: Pid) {
        self.pending.remove(&tid);
        self.tasks.remove(&tid);
    }

    fn track(&mut self, tgid: Pid, tid: Pid) {
        if self.tasks.len() >= self.max_tasks || self.tasks.contains_key(&tid) {
            return;
        }
        if let Some(fd) = open_ro(&format!("/proc/{tgid}/task/{tid}/stat")) {
            self.tasks.insert(tid, Task { tgid, fd });
        }
    }

    /// Walks /proc and tracks every task; drops tasks that are gone.
    pub fn rescan(&mut self) {
        let mut seen = HashSet::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(tgid) = p
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
                .and_then(Pid::from_raw)
            else {
                continue;
            };
            let Ok(threads) = std::fs::read_dir(format!("/proc/{tgid}/task")) else {
                continue;
            };
            for t in threads.flatten() {
                if let Some(tid) = t
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                    .and_then(Pid::from_raw)
                {
                    seen.insert(tid);
                    self.track(tgid, tid);
                }
            }
        }
        self.tasks.retain(|tid, _| seen.contains(tid));
        self.pending.clear();
        self.stale = false;
    }

    /// Reads every tracked task's state; for D-state tasks also wchan and schedstat.
    pub fn sweep(&mut self) -> Sweep {
        if self.stale {
            self.rescan();
        }
        for (tid, tgid) in std::mem::take(&mut self.pending) {
            self.track(tgid, tid);
        }
        let mut out = Sweep::default();
        let mut gone = Vec::new();
        let mut dtids = Vec::new();
        for (&tid, task) in &self.tasks {
            match rustix::io::pread(&task.fd, &mut self.buf[..], 0) {
                Ok(n) if n > 0 => {
                    if let Some(st) = parse_stat(&self.buf[..n])
                        && st.state == b'D'
                    {
                        dtids.push((tid, task.tgid, st.comm.to_string()));
                    }
                }
                // ESRCH or an empty read: the task is gone and we missed its exit event.
                _ => gone.push(tid),
            }
        }
        for tid in gone {
            self.tasks.remove(&tid);
        }
        out.tasks = self.tasks.len();
        for (tid, tgid, comm) in dtids {
            let base = format!("/proc/{tgid}/task/{tid}");
            let mut buf = Vec::new();
            let wchan = read_small(&format!("{base}/wchan"), &mut buf)
                .map(|n| String::from_utf8_lossy(&buf[..n]).trim().to_string())
                .unwrap_or_default();
            let pcount = read_small(&format!("{base}/schedstat"), &mut buf)
                .and_then(|n| {
                    std::str::from_utf8(&buf[..n])
                        .ok()?
                        .split_whitespace()
                        .nth(2)?
                        .parse()
                        .ok()
                })
                .unwrap_or(0);
            out.dstate.push(DTask {
                tid,
                tgid,
                comm,
                wchan,
                pcount,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_comms() {
        let s = parse_stat(b"123 (a) b (c)) D 1 2 3").unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!(s.state, b'D');
        assert_eq!(parse_stat(b"1 (x) S 0").unwrap().state, b'S');
        assert!(parse_stat(b"1 (x)").is_none());
        assert!(parse_stat(b"garbage").is_none());
    }

    #[test]
    fn sweep_sees_this_process() {
        let mut t = TaskTable::new(100_000);
        let s = t.sweep();
        assert!(s.tasks > 1, "only {} tasks", s.tasks);
        assert!(t.tasks.contains_key(&Pid::this()));
    }

    proptest::proptest! {
        #[test]
        fn parse_stat_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse_stat(&b);
        }
    }
}
