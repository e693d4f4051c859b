//! Helpers for the file-system tests: a real `kintsugi mount` that is always unmounted.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kintsugi"))
}

/// A fresh, empty directory under the temp dir.
pub fn fresh_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "kintsugi-fs-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).expect("create test mountpoint");
    d
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run kintsugi")
}

/// A mounted kintsugi file system; unmounted (and its directory removed) on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn new(level: u8, extra: &[&str]) -> Mount {
        Mount::of_module("smfs", level, extra)
    }

    /// A mount of `module` (with `extra` arguments, e.g. `-o server=…`).
    pub fn of_module(module: &str, level: u8, extra: &[&str]) -> Mount {
        let dir = fresh_dir(&format!("{module}-l{level}"));
        let lv = level.to_string();
        let mut args = vec!["mount", "--module", module, "--level", &lv, "--size", "64M"];
        args.extend_from_slice(extra);
        let d = dir.to_str().expect("utf-8 temp path").to_string();
        args.push(&d);
        let out = run(&args);
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn status(&self) -> serde_json::Value {
        let out = run(&["fsctl", self.dir.to_str().unwrap(), "status"]);
        assert!(
            out.status.success(),
            "fsctl status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    pub fn inject(&self, fault: &str, during: Option<&str>) {
        let mut args = vec!["fsctl", self.dir.to_str().unwrap(), "inject-fault", fault];
        if let Some(d) = during {
            args.extend_from_slice(&["--during", d]);
        }
        let out = run(&args);
        assert!(
            out.status.success(),
            "inject {fault}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The mount answers (not ENOTCONN, not hung).
    pub fn assert_alive(&self) {
        let md = std::fs::metadata(&self.dir)
            .unwrap_or_else(|e| panic!("mount {} is dead: {e}", self.dir.display()));
        assert!(md.is_dir());
        std::fs::read_dir(&self.dir).expect("readdir on a live mount");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let d = self.dir.to_str().unwrap_or_default().to_string();
        let ok = run(&["umount", &d]).status.success();
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&d).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Writes a file the way a careful program does (write, fsync, close): once this returns, the
/// bytes are acknowledged.
pub fn write_acked(p: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub const SETTLE: Duration = Duration::from_millis(50);

/// A `kintsugi snfs-server` on loopback (any free port); killed by pid and reaped on drop.
pub struct SnfsServer {
    child: Option<std::process::Child>,
    pub addr: String,
}

impl SnfsServer {
    pub fn start(export: &Path, log: &Path) -> SnfsServer {
        use std::io::BufRead;
        let logf = std::fs::File::create(log).expect("server log");
        let mut child = bin()
            .args(["snfs-server", "--listen", "127.0.0.1:0", "--export"])
            .arg(export)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("start snfs-server");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut s = SnfsServer {
            child: Some(child),
            addr: String::new(),
        };
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        s.addr = line
            .trim()
            .strip_prefix("snfs-server listening on ")
            .unwrap_or_else(|| panic!("snfs-server did not start: {line:?}"))
            .to_string();
        s
    }
}

impl Drop for SnfsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
