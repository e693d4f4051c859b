//! Test helpers shared across kintsugi's crates: bounded waiting, and proof that a test left no
//! process behind (no zombies, no strays).
#![forbid(unsafe_code)]

pub mod netns;

use std::path::Path;
use std::time::{Duration, Instant};

use sys::Pid;

/// Polls `cond` every millisecond until it holds or `timeout` passes. Returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether `pid` names a process that exists and is not a zombie.
pub fn is_alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Whether `pid` is gone entirely (not even a zombie).
pub fn is_gone(pid: Pid) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Asserts every pid in `pids` disappears (reaped, not a zombie) within `timeout`.
pub fn assert_all_gone(pids: &[Pid], timeout: Duration) {
    let ok = wait_until(timeout, || pids.iter().all(|&p| is_gone(p)));
    let left: Vec<_> = pids
        .iter()
        .filter(|&&p| !is_gone(p))
        .map(|p| (p.as_raw(), state(*p)))
        .collect();
    assert!(ok, "processes left behind (pid, state): {left:?}");
}

/// Asserts the calling process has no children at all (no zombie it forgot to reap, no stray).
pub fn assert_no_children(timeout: Duration) {
    let ok = wait_until(timeout, || {
        sys::process::children_of(Pid::this())
            .map(|c| c.is_empty())
            .unwrap_or(false)
    });
    let left = sys::process::children_of(Pid::this()).unwrap_or_default();
    let states: Vec<_> = left.iter().map(|p| (p.as_raw(), state(*p))).collect();
    assert!(
        ok,
        "test process still has children (pid, state): {states:?}"
    );
}

fn state(pid: Pid) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().next().unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "gone".into())
}

/// Runs `f` on a thread and panics if it does not finish within `limit`: a hung supervisor
/// must fail its test, not stall the suite.
pub fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("test step did not finish within {limit:?}"))
}

/// Asserts that no orphan (re-parented to init or a subreaper that is not us) is running this
/// test binary: forked helpers of ours (keepers, standbys, mm anchors) that outlived their
/// supervisor would show up exactly like that.
pub fn assert_no_orphans_of_this_exe(timeout: Duration) {
    let me = std::fs::read_link("/proc/self/exe").expect("/proc/self/exe");
    let orphans = || -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == me))
            .filter(|&pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                    s.lines()
                        .any(|l| l.starts_with("PPid:") && l.split_whitespace().nth(1) == Some("1"))
                        && !s
                            .lines()
                            .any(|l| l.starts_with("State:") && l.contains('Z'))
                })
            })
            .collect()
    };
    let ok = wait_until(timeout, || orphans().is_empty());
    assert!(
        ok,
        "orphaned processes of this test binary are still running: {:?}",
        orphans()
    );
}
