//! `kintsugi mount`/`umount`/`fsctl` through the real binary: every level serves a real
//! workload, and bad input gets a clear error. Needs root and /dev/fuse.

mod fs_common;

use fs_common::*;

fn stderr_of(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn workload(m: &Mount) {
    std::fs::create_dir(m.path("d")).unwrap();
    let big = pattern(3, 3 << 20);
    write_acked(&m.path("d/big"), &big);
    assert_eq!(std::fs::read(m.path("d/big")).unwrap(), big);
    std::os::unix::fs::symlink("d/big", m.path("sym")).unwrap();
    assert_eq!(
        std::fs::read_link(m.path("sym")).unwrap().to_str(),
        Some("d/big")
    );
    std::fs::hard_link(m.path("d/big"), m.path("hard")).unwrap();
    std::fs::rename(m.path("hard"), m.path("hard2")).unwrap();
    assert_eq!(std::fs::metadata(m.path("hard2")).unwrap().len(), 3 << 20);
    // Sparse: a write far out allocates one block, reads of the hole are zeros.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.path("sparse"))
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"x", 100 << 20).unwrap();
    drop(f);
    let md = std::fs::metadata(m.path("sparse")).unwrap();
    assert!(std::os::unix::fs::MetadataExt::blocks(&md) <= 64);
    assert_eq!(md.len(), (100 << 20) + 1);
    std::fs::remove_file(m.path("sparse")).unwrap();
    std::fs::remove_file(m.path("d/big")).unwrap();
    std::fs::remove_file(m.path("hard2")).unwrap();
    assert!(std::fs::remove_dir(m.path("d")).is_ok());
}

#[test]
fn every_level_serves_a_workload() {
    for level in [5, 4, 3, 2, 1] {
        let m = Mount::new(level, &[]);
        workload(&m);
        let s = m.status();
        assert_eq!(s["level"].as_u64(), Some(u64::from(level)));
        assert_eq!(s["module_failures"].as_u64(), Some(0), "{s}");
    }
}

#[test]
fn clear_errors_for_bad_input() {
    let missing = std::env::temp_dir().join(format!("kintsugi-no-such-dir-{}", std::process::id()));
    let e = stderr_of(&["mount", "--level", "4", missing.to_str().unwrap()]);
    assert!(e.contains("does not exist") && e.contains("mkdir"), "{e}");
    let d = fresh_dir("bad");
    let ds = d.to_str().unwrap();
    for bad in ["0", "7"] {
        let e = stderr_of(&["mount", "--level", bad, ds]);
        assert!(
            e.contains("does not exist") && e.contains("1 (most protected) to 5"),
            "{e}"
        );
    }
    let e = stderr_of(&["mount", "--size", "100K", ds]);
    assert!(e.contains("too small"), "{e}");
    let e = stderr_of(&["mount", "--module", "nosuch", ds]);
    assert!(e.contains("unknown module"), "{e}");
    let e = stderr_of(&["umount", ds]);
    assert!(e.contains("not mounted"), "{e}");
    let e = stderr_of(&["fsctl", ds, "status"]);
    assert!(e.contains("not a kintsugi mount"), "{e}");
    let _ = std::fs::remove_dir(&d);
    // Busy: a second mount on a live one.
    let m = Mount::new(4, &[]);
    let e = stderr_of(&["mount", "--level", "4", m.dir.to_str().unwrap()]);
    assert!(e.contains("busy"), "{e}");
    // Busy for umount: a process has its cwd inside.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .current_dir(&m.dir)
        .spawn()
        .unwrap();
    let e = stderr_of(&["umount", m.dir.to_str().unwrap()]);
    assert!(e.contains("busy"), "{e}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn umount_ends_the_host_and_module_processes() {
    let m = Mount::new(4, &[]);
    let s = m.status();
    let host = s["host_pid"].as_i64().unwrap() as i32;
    let module = s["module_pid"].as_i64().unwrap() as i32;
    drop(m);
    let gone = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    };
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(5) && !(gone(host) && gone(module)) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone(host), "host {host} still running after umount");
    assert!(gone(module), "module {module} still running after umount");
}

/// SIGTERM to the host unmounts cleanly instead of leaving a dead (ENOTCONN) mount behind.
#[test]
fn sigterm_to_the_host_unmounts_cleanly() {
    for level in [5, 4] {
        let m = Mount::new(level, &[]);
        write_acked(&m.path("f"), b"x");
        let host = m.status()["host_pid"].as_i64().unwrap() as i32;
        assert_eq!(kill_cmd(host, "TERM"), 0);
        let mounted = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(m.dir.to_str().unwrap())
        };
        let t = std::time::Instant::now();
        while mounted() && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            !mounted(),
            "level {level}: still mounted 5 s after SIGTERM to the host"
        );
        assert!(
            std::fs::read_dir(&m.dir).is_ok(),
            "level {level}: the directory is left unusable"
        );
    }
}

/// `kill -SIG pid` through the kill(1) command (tests stay free of unsafe).
fn kill_cmd(pid: i32, sig: &str) -> i32 {
    std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_or(-1, |s| s.code().unwrap_or(-1))
}

/// No /dev/fuse (a private mount namespace with an empty /dev): a clear error naming the fix.
#[test]
fn missing_dev_fuse_is_a_clear_error() {
    let d = fresh_dir("nofuse");
    let script = format!(
        "mount -t tmpfs none /dev && exec {} mount --level 4 {}",
        env!("CARGO_BIN_EXE_kintsugi"),
        d.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare (util-linux)");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mount without /dev/fuse succeeded");
    assert!(
        e.contains("/dev/fuse is missing") && e.contains("modprobe fuse"),
        "{e}"
    );
    let _ = std::fs::remove_dir(&d);
}
