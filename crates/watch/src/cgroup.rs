//! Cgroups: finding the v1 `pids` and `memory` hierarchies (this machine is hybrid: those
//! controllers live on v1, cgroup2 at /sys/fs/cgroup/unified carries none), OOM notification
//! through v1 `cgroup.event_control` eventfds, pids-limit rejection counters, and killing
//! every process in a cgroup.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, eventfd};
use sys::Pid;

/// Where cgroup filesystems are mounted.
pub const ROOT: &str = "/sys/fs/cgroup";

/// The mount point of the v1 hierarchy carrying `controller`, from /proc/self/mountinfo.
pub fn v1_hierarchy(controller: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        if post.next()? != "cgroup" {
            return None;
        }
        let opts = post.nth(1)?;
        let mnt = pre.split_whitespace().nth(4)?;
        opts.split(',')
            .any(|o| o == controller)
            .then(|| PathBuf::from(mnt))
    })
}

/// The cgroup2 mount point (`/sys/fs/cgroup/unified` on hybrid systems).
pub fn v2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(pre.split_whitespace().nth(4)?))
    })
}

/// Every cgroup directory under `root` (the root itself excluded), depth-limited.
pub fn list(root: &Path, max_depth: usize) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, max: usize, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let p = e.path();
                out.push(p.clone());
                if depth < max {
                    walk(&p, depth + 1, max, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, 1, max_depth, &mut out);
    out
}

/// The cgroup path of `pid` in the v1 hierarchy of `controller`, as an absolute directory.
pub fn of_pid(pid: Pid, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let _id = f.next()?;
        let ctrls = f.next()?;
        let path = f.next()?;
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })?;
    Some(v1_hierarchy(controller)?.join(rel.trim_start_matches('/')))
}

/// `path` relative to the cgroup hierarchy it lives in (`/x/y`), for matching `allow` patterns.
pub fn relative(path: &Path) -> String {
    let s = path.to_string_lossy();
    let rest = s.strip_prefix(ROOT).unwrap_or(&s).trim_start_matches('/');
    // Drop the hierarchy directory (`pids`, `memory`, `unified`, …).
    match rest.split_once('/') {
        Some((_, r)) => format!("/{r}"),
        None => "/".to_string(),
    }
}

/// Reads the pids of a cgroup.
pub fn procs(cg: &Path) -> io::Result<Vec<Pid>> {
    let text = std::fs::read_to_string(cg.join("cgroup.procs"))?;
    Ok(text
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .filter_map(Pid::from_raw)
        .collect())
}

/// Errors of [`kill`].
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("refusing to kill {0}: it is the root of its hierarchy (every process would die)")]
    Root(PathBuf),
    #[error("refusing to kill {0}: the monitor itself runs in it")]
    Own(PathBuf),
    #[error("cannot kill cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {path} still has {left} processes after {rounds} SIGKILL rounds")]
    Stuck {
        path: PathBuf,
        left: usize,
        rounds: usize,
    },
}

/// Kills every process in `cg` and waits (bounded) until it is empty. Uses `cgroup.kill` where
/// the kernel offers it (v2); on v1 it sends SIGKILL to each pid, repeatedly, because a
/// runaway parent may fork between our read of `cgroup.procs` and its death. Returns the
/// number of kill signals sent (a pid that survives a round is signalled again).
pub fn kill(cg: &Path, deadline: Duration) -> Result<usize, KillError> {
    let io = |source| KillError::Io {
        path: cg.to_path_buf(),
        source,
    };
    if cg.parent().map(|p| p == Path::new(ROOT)).unwrap_or(true) || relative(cg) == "/" {
        return Err(KillError::Root(cg.to_path_buf()));
    }
    let me = Pid::this();
    let initial = procs(cg).map_err(io)?;
    if initial.contains(&me) {
        return Err(KillError::Own(cg.to_path_buf()));
    }
    let mut killed = 0;
    let kill_file = cg.join("cgroup.kill");
    if kill_file.exists() {
        std::fs::write(&kill_file, "1").map_err(io)?;
        killed = initial.len();
    }
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        let left = procs(cg).map_err(io)?;
        if left.is_empty() {
            return Ok(killed);
        }
        if start.elapsed() > deadline {
            return Err(KillError::Stuck {
                path: cg.to_path_buf(),
                left: left.len(),
                rounds,
            });
        }
        for p in left {
            if p != me && sys::process::kill(p, libc_sigkill()).is_ok() {
                killed += 1;
            }
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn libc_sigkill() -> i32 {
    sys::signal::parse("SIGKILL").expect("SIGKILL is a known signal")
}

/// An OOM notification on a v1 memory cgroup: an eventfd registered through
/// `cgroup.event_control`. It becomes readable when the cgroup hits OOM, and also when the
/// cgroup is removed (the kernel signals every registered eventfd as it tears them down).
#[derive(Debug)]
pub struct OomWatch {
    pub cgroup: PathBuf,
    efd: OwnedFd,
    oom_control: File,
    last_oom_kill: u64,
}

/// `memory.oom_control` contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OomControl {
    pub oom_kill_disable: bool,
    pub under_oom: bool,
    pub oom_kill: u64,
}

pub fn parse_oom_control(text: &str) -> OomControl {
    let mut o = OomControl::default();
    for l in text.lines() {
        let mut f = l.split_whitespace();
        match (f.next(), f.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some("oom_kill_disable"), Some(v)) => o.oom_kill_disable = v != 0,
            (Some("under_oom"), Some(v)) => o.under_oom = v != 0,
            (Some("oom_kill"), Some(v)) => o.oom_kill = v,
            _ => {}
        }
    }
    o
}

impl OomWatch {
    pub fn register(cg: &Path) -> io::Result<OomWatch> {
        let efd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let oom_control = File::open(cg.join("memory.oom_control"))?;
        let mut ctl = std::fs::OpenOptions::new()
            .write(true)
            .open(cg.join("cgroup.event_control"))?;
        ctl.write_all(format!("{} {}", efd.as_raw_fd(), oom_control.as_raw_fd()).as_bytes())?;
        let mut w = OomWatch {
            cgroup: cg.to_path_buf(),
            efd,
            oom_control,
            last_oom_kill: 0,
        };
        w.last_oom_kill = w.read().oom_kill;
        Ok(w)
    }

    pub fn read(&self) -> OomControl {
        let mut buf = [0u8; 256];
        let n = self.oom_control.read_at(&mut buf, 0).unwrap_or(0);
        parse_oom_control(std::str::from_utf8(&buf[..n]).unwrap_or(""))
    }

    /// Drains the eventfd. Returns the state and the number of OOM kills since the last call,
    /// or `None` when the cgroup is gone.
    pub fn on_ready(&mut self) -> Option<(OomControl, u64)> {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.efd, &mut b);
        if !self.cgroup.exists() {
            return None;
        }
        let o = self.read();
        let new = o.oom_kill.saturating_sub(self.last_oom_kill);
        self.last_oom_kill = o.oom_kill;
        Some((o, new))
    }
}

impl AsFd for OomWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

/// A v1 pids cgroup's rejection counter (`pids.events`: `max N`), kept open. v1 offers no
/// notification on it (measured: neither POLLPRI nor inotify fires), so the 1 s tick reads it.
#[derive(Debug)]
pub struct PidsWatch {
    pub cgroup: PathBuf,
    events: File,
    pub last_max: u64,
}

impl PidsWatch {
    pub fn open(cg: &Path) -> io::Result<PidsWatch> {
        let events = File::open(cg.join("pids.events"))?;
        let mut w = PidsWatch {
            cgroup: cg.to_path_buf(),
            events,
            last_max: 0,
        };
        w.last_max = w.read_max().unwrap_or(0);
        Ok(w)
    }

    fn read_max(&self) -> Option<u64> {
        let mut buf = [0u8; 64];
        let n = self.events.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("max ").and_then(|v| v.trim().parse().ok()))
    }

    /// New rejections since the last call; `None` when the cgroup is gone.
    pub fn poll(&mut self) -> Option<u64> {
        let m = self.read_max()?;
        let new = m.saturating_sub(self.last_max);
        self.last_max = m;
        Some(new)
    }
}

/// Reads a small file fully (cgroup and proc files).
pub fn read_file(path: &Path) -> io::Result<String> {
    let mut s = String::new();
    File::open(path)?.read_to_string(&mut s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchies_found() {
        let pids = v1_hierarchy("pids")
            .or_else(v2_root)
            .expect("some cgroup mount");
        assert!(pids.join("cgroup.procs").exists());
    }

    #[test]
    fn relative_paths() {
        assert_eq!(relative(Path::new("/sys/fs/cgroup/pids/a/b")), "/a/b");
        assert_eq!(relative(Path::new("/sys/fs/cgroup/pids")), "/");
    }

    #[test]
    fn oom_control_parses() {
        let o = parse_oom_control("oom_kill_disable 1\nunder_oom 1\noom_kill 3\n");
        assert_eq!(
            o,
            OomControl {
                oom_kill_disable: true,
                under_oom: true,
                oom_kill: 3
            }
        );
    }

    #[test]
    fn kill_refuses_roots() {
        assert!(matches!(
            kill(Path::new("/sys/fs/cgroup/pids"), Duration::from_millis(10)),
            Err(KillError::Root(_))
        ));
    }
}
