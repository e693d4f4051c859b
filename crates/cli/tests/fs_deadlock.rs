//! Deadlock detection and breaking (paper 001) on a real level-4 SMFS mount with four module
//! contexts. Needs root and /dev/fuse.
//!
//! SMFS normally cannot deadlock (one global lock order). Fault site 69 leaves the order out:
//! `link` then locks the file before the directory and `lookup` the directory before the file.
//! The workload makes the two meet on one (file, directory) pair from separate client threads:
//! one thread links `a/f` into `bJ/nI` and unlinks it again, two threads `stat` other names of
//! the same file in the same directories (`bJ/gK`, hard links). The kernel does not serialize
//! these: a `stat` whose dentry has expired (entry TTL 1 s) revalidates it with a lookup and
//! holds no directory lock while doing so. (Two renames in opposite directions between two
//! directories, the textbook case, never reach the file system at once on Linux: the VFS
//! serializes cross-directory renames per super block with `s_vfs_rename_mutex`.)
//!
//! - detection on: every worker finishes its operations, the status counts broken deadlocks,
//!   no request failed, fsck is clean and every name is where it should be with the content
//!   intact;
//! - detection off: the same workload stalls for good — two contexts wait for each other's
//!   lock for seconds while nobody makes progress — and the test ends it by killing the host.

mod fs_common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fs_common::*;

/// Directories the links go into, and names of the file per directory (enough concurrent
/// link/unlink pairs for the lock-order site to deadlock within the test's time).
const DIRS: usize = 12;
const NAMES: usize = 200;
const CONTENT: &[u8] = b"the one file every name leads to\n";

fn n(s: &serde_json::Value, k: &str) -> u64 {
    s[k].as_u64()
        .unwrap_or_else(|| panic!("status has no {k}: {s}"))
}

/// Builds `a/f` and `bJ/gK` (hard links to it), then arms site 69 for every client.
fn setup(m: &Mount) {
    std::fs::create_dir(m.path("a")).unwrap();
    write_acked(&m.path("a/f"), CONTENT);
    for j in 0..DIRS {
        std::fs::create_dir(m.path(&format!("b{j}"))).unwrap();
        for k in 0..NAMES {
            std::fs::hard_link(m.path("a/f"), m.path(&format!("b{j}/g{k}"))).unwrap();
        }
    }
    arm(m, 69);
}

fn arm(m: &Mount, site: u32) {
    let s = site.to_string();
    let out = run(&["fsctl", m.dir.to_str().unwrap(), "arm-site", &s]);
    assert!(
        out.status.success(),
        "arm-site {site}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The workers: one linker, two statters. Each counts its operations; the first error is kept.
struct Workload {
    stop: Arc<AtomicBool>,
    done: Vec<Arc<AtomicU64>>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    finished: std::sync::mpsc::Receiver<()>,
    threads: usize,
}

impl Workload {
    fn start(dir: PathBuf) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, finished) = std::sync::mpsc::channel();
        let mut done = Vec::new();
        for w in 0..3 {
            let (stop, errors, tx, dir) = (stop.clone(), errors.clone(), tx.clone(), dir.clone());
            let count = Arc::new(AtomicU64::new(0));
            done.push(count.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let r = if w == 0 {
                        let name = dir.join(format!("b{}/n{i}", i % DIRS));
                        std::fs::hard_link(dir.join("a/f"), &name)
                            .and_then(|()| std::fs::remove_file(&name))
                    } else {
                        // The two statters interleave over every name, so each name is looked
                        // up again about once per pass, after its 1 s entry TTL expired.
                        let k = 2 * i + w - 1;
                        std::fs::metadata(dir.join(format!(
                            "b{}/g{}",
                            (k / NAMES) % DIRS,
                            k % NAMES
                        )))
                        .map(|_| ())
                    };
                    if let Err(e) = r {
                        if !stop.load(Ordering::Relaxed) {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("worker {w}, op {i}: {e}"));
                        }
                        break;
                    }
                    i += 1;
                    count.store(i as u64, Ordering::Relaxed);
                }
                let _ = tx.send(());
            });
        }
        Workload {
            stop,
            done,
            errors,
            finished,
            threads: 3,
        }
    }

    fn counts(&self) -> Vec<u64> {
        self.done
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops the workers and waits for them (bounded): `true` if all ended.
    fn stop(&self, within: Duration) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        let t = Instant::now();
        (0..self.threads).all(|_| {
            self.finished
                .recv_timeout(within.saturating_sub(t.elapsed()))
                .is_ok()
        })
    }
}

/// Kills the mount's host (stuck requests then fail with ENOTCONN) and lazily unmounts; `Mount`'s
/// own drop finishes the cleanup. Used whenever a test may leave requests stuck.
struct KillHost {
    pid: i32,
    dir: PathBuf,
    armed: bool,
}

impl Drop for KillHost {
    fn drop(&mut self) {
        if self.armed {
            // kill(1) rather than libc::kill: no `unsafe` outside crates/sys.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

#[test]
fn deadlocks_are_detected_and_broken_transparently() {
    detected_and_broken(4);
}

/// Level 1 (duplication and checks, shared memory unmapped): the same detection and breaking.
#[test]
fn deadlocks_are_broken_at_level_1() {
    detected_and_broken(1);
}

fn detected_and_broken(level: u8) {
    let m = Mount::new(level, &["--contexts", "4", "--deadlock-interval-ms", "20"]);
    let s = m.status();
    let mut guard = KillHost {
        pid: n(&s, "host_pid") as i32,
        dir: m.dir.clone(),
        armed: true,
    };
    setup(&m);
    let w = Workload::start(m.dir.clone());
    // Run until every worker did a fair amount of work and at least one deadlock was broken.
    let min_ops = 400;
    let t = Instant::now();
    let mut last = m.status();
    while t.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(250));
        last = m.status();
        let enough = w.counts().iter().all(|&c| c >= min_ops);
        if (enough && n(&last, "deadlocks_broken") > 0) || !w.errors.lock().unwrap().is_empty() {
            break;
        }
    }
    assert!(w.stop(Duration::from_secs(20)), "workers did not finish");
    let errors = w.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "requests failed: {errors:?}");
    let counts = w.counts();
    assert!(
        counts.iter().all(|&c| c >= min_ops),
        "workers stalled: {counts:?} after {:?}; status {last}",
        t.elapsed()
    );
    let s = m.status();
    assert!(n(&s, "site_hits") > 0, "site 69 never fired: {s}");
    assert!(n(&s, "deadlocks_broken") > 0, "no deadlock broken: {s}");
    assert!(
        n(&s, "deadlocks_detected") >= n(&s, "deadlocks_broken"),
        "{s}"
    );
    // Transparent: no module failure, no restart, no EIO, no last-resort timeout.
    assert_eq!(n(&s, "module_failures"), 0, "{s}");
    assert_eq!(n(&s, "restarts"), 0, "{s}");
    assert_eq!(n(&s, "eio"), 0, "{s}");
    assert_eq!(n(&s, "deadlock_timeouts"), 0, "{s}");
    arm(&m, 0);
    let out = run(&["fsck", "--json", m.dir.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fsck --json");
    assert!(out.status.success() && j["clean"] == true, "fsck: {j}");
    // Every name where it belongs, all leading to the one file, content intact.
    let f = std::fs::metadata(m.path("a/f")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(f.nlink(), 1 + (DIRS * NAMES) as u64, "link count");
    assert_eq!(std::fs::read(m.path("a/f")).unwrap(), CONTENT);
    for j in 0..DIRS {
        let mut names: Vec<String> = std::fs::read_dir(m.path(&format!("b{j}")))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = (0..NAMES).map(|k| format!("g{k}")).collect();
        want.sort();
        assert_eq!(names, want, "b{j} holds exactly its names");
        let g = std::fs::metadata(m.path(&format!("b{j}/g7"))).unwrap();
        assert_eq!(g.ino(), f.ino());
    }
    guard.armed = false;
}

#[test]
fn without_detection_the_same_workload_stalls() {
    // A long request deadline: only the deadlock, not the hang detector, may stop the
    // requests (the last-resort lock timeout is 30 s; the stall is shown well before).
    let m = Mount::new(
        4,
        &[
            "--contexts",
            "4",
            "--deadlock-interval-ms",
            "0",
            "--deadline-ms",
            "120000",
        ],
    );
    let s = m.status();
    assert_eq!(s["deadlock"]["interval_ms"], 0, "{s}");
    let _guard = KillHost {
        pid: n(&s, "host_pid") as i32,
        dir: m.dir.clone(),
        armed: true,
    };
    setup(&m);
    let w = Workload::start(m.dir.clone());
    // Wait for a stall: two contexts each waiting ≥ 2 s for a lock the other holds, and no
    // worker progressing meanwhile.
    let t = Instant::now();
    let mut stalled = None;
    while t.elapsed() < Duration::from_secs(90) && stalled.is_none() {
        let before = w.counts();
        std::thread::sleep(Duration::from_millis(500));
        let s = m.status();
        let waits = s["deadlock"]["lock_waits"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let long: Vec<&serde_json::Value> = waits
            .iter()
            .filter(|x| x["waited_ms"].as_u64().unwrap_or(0) >= 2000)
            .collect();
        // A cycle among the long waiters: i waits for j's lock and j for i's.
        let cycle = long.iter().any(|x| {
            long.iter()
                .any(|y| x["holder_context"] == y["context"] && y["holder_context"] == x["context"])
        });
        if cycle && w.counts() == before {
            stalled = Some(s);
        }
        assert!(w.errors.lock().unwrap().is_empty(), "{:?}", w.errors);
    }
    let s = stalled.expect("the workload never stalled without detection");
    assert_eq!(n(&s, "deadlocks_detected"), 0, "{s}");
    assert_eq!(n(&s, "deadlocks_broken"), 0, "{s}");
    // Still stuck a moment later: nobody made progress.
    let before = w.counts();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.counts(), before, "progress during the stall");
    // The guard kills the host: the stuck requests fail, the workers end.
    drop(_guard);
    assert!(
        w.stop(Duration::from_secs(20)),
        "workers still stuck after the host was killed"
    );
}
