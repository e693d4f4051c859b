//! `/dev/kmsg`: the kernel's own detectors (hung-task, soft/hard lockup, RCU stall, OOM killer,
//! pids controller) become events at no polling cost. One `read` returns one record:
//! `<prio>,<seq>,<ts_us>,<flags>;<text>\n` followed by optional ` KEY=value` lines.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::event::FaultKind;

/// One kernel log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// syslog facility: 0 for the kernel, 1 (user) for lines written into /dev/kmsg.
    pub facility: u8,
    pub level: u8,
    pub seq: u64,
    pub text: String,
}

/// Parses one record as read from /dev/kmsg.
pub fn parse_record(raw: &[u8]) -> Option<Record> {
    let s = std::str::from_utf8(raw).ok()?;
    let (head, rest) = s.split_once(';')?;
    let mut f = head.split(',');
    let prio: u32 = f.next()?.parse().ok()?;
    let seq: u64 = f.next()?.parse().ok()?;
    let text = rest.split('\n').next().unwrap_or("").to_string();
    Some(Record {
        facility: (prio >> 3) as u8,
        level: (prio & 7) as u8,
        seq,
        text,
    })
}

/// What a kernel line means for the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub fault: FaultKind,
    /// Short label: `hung_task_report`, `soft_lockup`, `oom_kill`, `pids_rejected`, …
    pub what: &'static str,
    pub pid: Option<i32>,
    /// A cgroup path relative to its hierarchy root, as the kernel printed it.
    pub cgroup: Option<String>,
}

/// Classifies a kernel log line; `None` for lines that are not faults.
pub fn classify(text: &str) -> Option<Class> {
    let c = |fault, what| {
        Some(Class {
            fault,
            what,
            pid: None,
            cgroup: None,
        })
    };
    if let Some(rest) = text.strip_prefix("INFO: task ")
        && text.contains(" blocked ")
    {
        // "INFO: task cat:8160 blocked for more than 10 seconds." or, with
        // CONFIG_DETECT_HUNG_TASK_BLOCKER, "... blocked on an rw-semaphore likely owned by ...".
        let who = rest.split_whitespace().next().unwrap_or("");
        let pid = who.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
        let what = if text.contains("likely owned by") {
            "hung_task_blocker"
        } else {
            "hung_task_report"
        };
        return Some(Class {
            fault: FaultKind::HungTask,
            what,
            pid,
            cgroup: None,
        });
    }
    if let Some(i) = text.find("fork rejected by pids controller") {
        let cg = text[i + "fork rejected by pids controller".len()..]
            .trim_start()
            .trim_start_matches("in")
            .trim()
            .to_string();
        return Some(Class {
            fault: FaultKind::ForkStorm,
            what: "pids_rejected",
            pid: None,
            cgroup: Some(cg),
        });
    }
    if let Some(rest) = text.strip_prefix("oom-kill:") {
        // oom-kill:constraint=CONSTRAINT_MEMCG,...,oom_memcg=/hog,task_memcg=/hog,task=x,pid=9,uid=0
        let field = |k: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(k).map(str::to_string))
        };
        return Some(Class {
            fault: FaultKind::Memory,
            what: "oom_kill",
            pid: field("pid=").and_then(|p| p.parse().ok()),
            cgroup: field("oom_memcg=").or_else(|| field("task_memcg=")),
        });
    }
    if text.contains("BUG: soft lockup") {
        return c(FaultKind::Kernel, "soft_lockup");
    }
    if text.contains("hard LOCKUP") {
        return c(FaultKind::Kernel, "hard_lockup");
    }
    if text.contains("detected stalls on CPUs") || text.contains("self-detected stall on CPU") {
        return c(FaultKind::Kernel, "rcu_stall");
    }
    if text.contains("BUG: workqueue lockup") {
        return c(FaultKind::Kernel, "workqueue_lockup");
    }
    if text.starts_with("Kernel panic") {
        return c(FaultKind::Kernel, "panic");
    }
    if text.starts_with("Oops:")
        || text.contains("BUG: unable to handle")
        || text.contains("kernel BUG at")
        || text.contains("general protection fault")
    {
        return c(FaultKind::Kernel, "oops");
    }
    if text.contains("possible circular locking dependency")
        || text.contains("possible recursive locking detected")
    {
        return c(FaultKind::Kernel, "lockdep");
    }
    if text.starts_with("WARNING: CPU:") {
        return c(FaultKind::Kernel, "warning");
    }
    None
}

/// A non-blocking reader positioned at the end of the log (only new lines matter to a monitor;
/// `--once` reads from the start instead).
#[derive(Debug)]
pub struct Kmsg {
    file: File,
    buf: Vec<u8>,
    /// Records the kernel overwrote before we read them.
    pub lost: u64,
}

impl Kmsg {
    pub const PATH: &'static str = "/dev/kmsg";

    pub fn open(from_start: bool) -> io::Result<Kmsg> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(PathBuf::from(Self::PATH))?;
        if !from_start {
            file.seek(SeekFrom::End(0))?;
        }
        Ok(Kmsg {
            file,
            buf: vec![0; 8192],
            lost: 0,
        })
    }

    /// The next record, or `None` when the log has nothing new.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        loop {
            match self.file.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    if let Some(r) = parse_record(&self.buf[..n]) {
                        return Ok(Some(r));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EPIPE: the ring buffer wrapped past our position; the next read resumes at
                // the oldest record still present.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PIPE.raw_os_error()) => {
                    self.lost += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Kmsg {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse() {
        let r =
            parse_record(b"6,339,5140900,-;INFO: task cat:8160 blocked\n SUBSYSTEM=x\n").unwrap();
        assert_eq!((r.facility, r.level, r.seq), (0, 6, 339));
        assert_eq!(r.text, "INFO: task cat:8160 blocked");
        let u = parse_record(b"12,5,1,-;hello").unwrap();
        assert_eq!(u.facility, 1);
        assert!(parse_record(b"no header").is_none());
    }

    #[test]
    fn kernel_lines_classify() {
        let h = classify("INFO: task cat:8160 blocked for more than 10 seconds.").unwrap();
        assert_eq!((h.fault, h.pid), (FaultKind::HungTask, Some(8160)));
        let b = classify(
            "INFO: task sh:1492 <writer> blocked on an rw-semaphore likely owned by task sh:1489",
        )
        .unwrap();
        assert_eq!(b.what, "hung_task_blocker");
        let p = classify("cgroup: fork rejected by pids controller in /bomb").unwrap();
        assert_eq!(
            (p.fault, p.cgroup.as_deref()),
            (FaultKind::ForkStorm, Some("/bomb"))
        );
        let o = classify(
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
             oom_memcg=/hog,task_memcg=/hog,task=python3,pid=4242,uid=0",
        )
        .unwrap();
        assert_eq!(
            (o.fault, o.pid, o.cgroup.as_deref()),
            (FaultKind::Memory, Some(4242), Some("/hog"))
        );
        assert_eq!(
            classify("watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [x:1]")
                .unwrap()
                .what,
            "soft_lockup"
        );
        assert_eq!(
            classify("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:")
                .unwrap()
                .what,
            "rcu_stall"
        );
        assert_eq!(classify("Oops: 0000 [#1] SMP").unwrap().what, "oops");
        assert_eq!(
            classify("Kernel panic - not syncing: x").unwrap().what,
            "panic"
        );
        assert!(classify("EXT4-fs (vda): mounted filesystem").is_none());
        assert!(classify("INFO: task list is short").is_none());
    }

    proptest::proptest! {
        #[test]
        fn classify_and_parse_never_panic(s in ".{0,120}") {
            let _ = classify(&s);
            let _ = parse_record(s.as_bytes());
        }
    }
}
