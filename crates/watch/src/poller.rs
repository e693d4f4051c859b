//! The baseline: a plain /proc polling scanner, as an Orthros-style monitor would run it. Every
//! interval it walks /proc and every `/proc/<pid>/task`, opens and reads each task's `stat`
//! into a reused buffer and counts D-state tasks. This is the efficient raw form (no per-task
//! allocation beyond the path), so the comparison with the event-driven monitor is fair.

use std::ffi::CString;
use std::time::{Duration, Instant};

use rustix::fs::{Dir, Mode, OFlags, openat};

use crate::monitor::thread_cpu;
use crate::tasks::parse_stat;

/// One scan: (tasks seen, tasks in D state).
pub fn scan(buf: &mut [u8]) -> (usize, usize) {
    let (mut tasks, mut d) = (0, 0);
    let Ok(proc_fd) = rustix::fs::open(
        "/proc",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return (0, 0);
    };
    let Ok(mut procs) = Dir::read_from(&proc_fd) else {
        return (0, 0);
    };
    while let Some(Ok(e)) = procs.read() {
        let name = e.file_name().to_bytes();
        if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
            continue;
        }
        let mut task_path = name.to_vec();
        task_path.extend_from_slice(b"/task");
        let Ok(task_path) = CString::new(task_path) else {
            continue;
        };
        let Ok(task_fd) = openat(
            &proc_fd,
            task_path.as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        let Ok(mut threads) = Dir::read_from(&task_fd) else {
            continue;
        };
        while let Some(Ok(t)) = threads.read() {
            let tid = t.file_name().to_bytes();
            if tid.is_empty() || !tid.iter().all(u8::is_ascii_digit) {
                continue;
            }
            let mut stat = tid.to_vec();
            stat.extend_from_slice(b"/stat");
            let Ok(stat) = CString::new(stat) else {
                continue;
            };
            let Ok(fd) = openat(
                &task_fd,
                stat.as_c_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            if let Ok(n) = rustix::io::read(&fd, &mut *buf) {
                tasks += 1;
                if parse_stat(&buf[..n]).is_some_and(|s| s.state == b'D') {
                    d += 1;
                }
            }
        }
    }
    (tasks, d)
}

/// Result of a polling run.
#[derive(Debug, Clone, Copy, Default)]
pub struct PollStats {
    pub scans: u64,
    pub tasks: usize,
    pub cpu: Duration,
    pub wall: Duration,
}

impl PollStats {
    pub fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Scans every `interval` (absolute deadlines; an overrunning scan is followed at once by the
/// next) for `duration`, on the calling thread, and reports that thread's CPU use.
pub fn run(interval: Duration, duration: Duration) -> PollStats {
    let mut buf = vec![0u8; 1024];
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut st = PollStats::default();
    let mut next = start;
    while start.elapsed() < duration {
        let (t, _) = scan(&mut buf);
        st.tasks = t;
        st.scans += 1;
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    st.wall = start.elapsed();
    st.cpu = thread_cpu().saturating_sub(cpu0);
    st
}

#[cfg(test)]
mod tests {
    #[test]
    fn scan_counts_tasks() {
        let mut b = vec![0u8; 1024];
        let (t, _) = super::scan(&mut b);
        assert!(t > 1);
    }
}
