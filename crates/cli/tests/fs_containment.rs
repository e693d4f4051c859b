//! Process-local error containment (issue 6): one test per branch of the host's decision, on a
//! real level-4 SMFS mount with four module contexts. Needs root and /dev/fuse.
//!
//! - a fault in a context that wrote no global data is contained: its request alone gets EIO,
//!   one context is replaced, nothing else restarts;
//! - a fault after a global write escalates: rollback, module restart, retry;
//! - a failed verification of the always-writable global data (the lock table) escalates;
//! - repeated local errors on the same data escalate;
//! - a contained context that held a lock does not deadlock anyone;
//! - `--on-local-error kill-client` kills the faulting client's process group.

mod fs_common;

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use fs_common::*;

fn n(s: &serde_json::Value, k: &str) -> u64 {
    s[k].as_u64()
        .unwrap_or_else(|| panic!("status has no {k}: {s}"))
}

fn read_direct(p: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

fn fsck_clean(m: &Mount) {
    let out = run(&["fsck", "--json", m.dir.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fsck --json");
    assert!(
        out.status.success() && j["clean"] == true,
        "fsck found problems: {j}"
    );
}

#[test]
fn local_fault_is_contained_to_its_request() {
    let m = Mount::new(4, &["--deadline-ms", "1000"]);
    let a = m.path("a");
    let data = pattern(1, 50_000);
    write_acked(&a, &data);
    let before = m.status();
    m.inject("segv", Some("read"));
    // O_DIRECT: the read goes to the file system as one request, no page-cache readahead
    // that the kernel would quietly retry.
    let e = read_direct(&a).expect_err("the faulting read must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let s = m.status();
    assert_eq!(n(&s, "contained"), 1, "{s}");
    assert_eq!(n(&s, "escalations"), 0, "{s}");
    // Only the faulting context was replaced; the module was not restarted.
    assert_eq!(n(&s, "restarts") - n(&before, "restarts"), 1, "{s}");
    // Everyone else (and the same client, next time) is served, with the data intact.
    assert!(std::fs::read(&a).unwrap() == data, "data changed");
    write_acked(&m.path("b"), b"after");
    fsck_clean(&m);
}

#[test]
fn global_fault_escalates_rolls_back_and_retries() {
    let m = Mount::new(4, &["--deadline-ms", "1000"]);
    let old = pattern(2, 30_000);
    write_acked(&m.path("old"), &old);
    m.inject("segv", Some("write"));
    let d = pattern(3, 70_000);
    std::fs::write(m.path("new"), &d).expect("an escalated write is retried after rollback");
    let s = m.status();
    assert_eq!(n(&s, "escalations"), 1, "{s}");
    assert_eq!(n(&s, "contained"), 0, "{s}");
    // The faulting context restarts now; idle ones are replaced before their next request.
    assert!(n(&s, "restarts") >= 1 && n(&s, "retries") == 1, "{s}");
    assert!(
        std::fs::read(m.path("new")).unwrap() == d,
        "retried write lost"
    );
    assert!(
        std::fs::read(m.path("old")).unwrap() == old,
        "old data changed"
    );
    fsck_clean(&m);
}

#[test]
fn failed_verification_escalates() {
    let m = Mount::new(4, &["--deadline-ms", "1000"]);
    let a = m.path("a");
    write_acked(&a, b"verify me");
    // A wild write into the lock table (never write-protected), then a crash in a read-only
    // request: the flag is clear, but the verification of writable globals fails.
    m.inject("scribble", Some("read"));
    assert_eq!(
        std::fs::read(&a).expect("escalated and retried"),
        b"verify me"
    );
    let s = m.status();
    assert_eq!(n(&s, "verify_failures"), 1, "{s}");
    assert_eq!(n(&s, "escalations"), 1, "{s}");
    assert_eq!(n(&s, "contained"), 0, "{s}");
    // The scribbled lock was repaired: nothing is left held.
    fsck_clean(&m);
}

#[test]
fn repeated_local_errors_on_the_same_data_escalate() {
    let m = Mount::new(4, &["--deadline-ms", "1000"]);
    for i in 0..3 {
        m.inject("segv", Some("lookup"));
        let e = std::fs::metadata(m.path(&format!("missing-{i}"))).unwrap_err();
        let want = if i < 2 { libc::EIO } else { libc::ENOENT };
        assert_eq!(e.raw_os_error(), Some(want), "lookup {i}: {e}");
    }
    let s = m.status();
    assert_eq!(n(&s, "contained"), 2, "{s}");
    assert_eq!(n(&s, "repeat_escalations"), 1, "{s}");
    assert_eq!(n(&s, "escalations"), 1, "{s}");
    fsck_clean(&m);
}

#[test]
fn a_contained_context_holding_a_lock_does_not_deadlock_others() {
    let m = Mount::new(4, &["--deadline-ms", "800"]);
    let d = m.path("dir");
    std::fs::create_dir(&d).unwrap();
    write_acked(&d.join("x"), b"x");
    // The readdir takes the directory's lock and then hangs holding it.
    m.inject("hang", Some("readdir"));
    let dir = d.clone();
    let reader = std::thread::spawn(move || {
        std::fs::read_dir(&dir).and_then(|r| r.collect::<Result<Vec<_>, _>>())
    });
    std::thread::sleep(Duration::from_millis(200));
    // A create in the same directory needs the same lock: it must go through once the hung
    // context is aborted (deadline) and its lock released through the registry.
    let t = Instant::now();
    let dir = d.clone();
    let creator = std::thread::spawn(move || write_acked(&dir.join("y"), b"y"));
    let created = testkit::wait_until(Duration::from_secs(10), || creator.is_finished());
    assert!(created, "create blocked behind a dead context's lock");
    creator.join().expect("create succeeded");
    assert!(t.elapsed() < Duration::from_secs(5));
    let r = reader.join().unwrap();
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    let s = m.status();
    assert_eq!(n(&s, "contained"), 1, "{s}");
    assert_eq!(n(&s, "escalations"), 0, "{s}");
    assert_eq!(std::fs::read(d.join("y")).unwrap(), b"y");
    fsck_clean(&m);
}

#[test]
fn kill_client_policy_kills_the_faulting_clients_group() {
    let m = Mount::new(
        4,
        &["--deadline-ms", "1000", "--on-local-error", "kill-client"],
    );
    let a = m.path("a");
    write_acked(&a, b"client data");
    m.inject("segv", Some("read"));
    // A client in its own process group: a background sleeper plus the reader.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("sleep 30 & echo $!; exec cat {}", a.display()))
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let sleeper = sys::Pid::from_raw(line.trim().parse().unwrap()).unwrap();
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "the client was killed: {st:?}"
    );
    assert!(
        testkit::wait_until(Duration::from_secs(5), || testkit::is_gone(sleeper)),
        "the client's process group was killed"
    );
    let s = m.status();
    assert_eq!(n(&s, "contained"), 1, "{s}");
    assert_eq!(n(&s, "killed_clients"), 1, "{s}");
    assert_eq!(std::fs::read(&a).unwrap(), b"client data");
}
