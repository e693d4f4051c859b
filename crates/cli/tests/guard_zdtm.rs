//! zdtm-style tests of `kintsugi guard` / `kintsugi restore` with the real binary and real
//! seccomp, ptrace and userfaultfd. Each test program (C, in crates/guard/tests/progs,
//! compiled with `cc` at test time) checks its own invariants and prints PASS. Every case
//! runs under the guard for at least 4 checkpoint layers, is SIGKILLed, restored, and must
//! print PASS; then again with the guard killed too and `kintsugi restore DIR` rebuilding it.
//! Needs root (ptrace of a child in a new pid namespace, PTRACE_O_SUSPEND_SECCOMP).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KINTSUGI: &str = env!("CARGO_BIN_EXE_kintsugi");

/// This test's scratch directory (per process and test thread, so tests never share one).
fn work_dir() -> PathBuf {
    let t = std::thread::current()
        .name()
        .unwrap_or("main")
        .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let d = std::env::temp_dir().join(format!("kintsugi-guard-zdtm-{}-{t}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Created first in every test: on the way out (pass or panic) it SIGKILLs, by pid, every
/// guard and program a status.json under the test's directory names, and removes the directory.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let dir = work_dir();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.filter_map(|e| e.ok()) {
                if let Some(s) = status(&e.path()) {
                    for key in ["guard_pid", "app_pid"] {
                        // Only if the pid is still ours: its command line names this
                        // test's directory (the program lives there, the guard's images too).
                        let ours = |pid: i64| {
                            std::fs::read(format!("/proc/{pid}/cmdline"))
                                .map(|c| {
                                    String::from_utf8_lossy(&c)
                                        .contains(dir.to_str().unwrap_or("?"))
                                })
                                .unwrap_or(false)
                        };
                        if let Some(pid) = s[key].as_i64()
                            && pid > 0
                            && ours(pid)
                        {
                            kill(pid);
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Compiles a test program into the test's directory.
fn prog(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../guard/tests/progs/{name}.c"));
    let out = work_dir().join(name);
    if !out.exists() {
        let tmp = work_dir().join(format!(
            "{name}.{}.tmp",
            std::thread::current().name().unwrap_or("t").len()
        ));
        let st = Command::new("cc")
            .args(["-O1", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("cc (package gcc) must be installed");
        assert!(st.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Crash {
    /// SIGKILL the program; the guard restores it.
    App,
    /// SIGKILL the guard and the program; `kintsugi restore` rebuilds it.
    Both,
}

fn status(dir: &Path) -> Option<serde_json::Value> {
    let b = std::fs::read(dir.join("status.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

fn kill(pid: i64) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Waits for `child` with a deadline; kills it (by pid) if it overruns.
fn wait_deadline(child: &mut Child, secs: u64) -> i32 {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pid {} did not finish within {secs} s", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_all(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut s);
    }
    s
}

/// Runs one case; `during` runs while the program is guarded (e.g. a TCP client) and again
/// after the restore.
fn case(name: &str, args: &[&str], crash: Crash, during: Option<&(dyn Fn() -> bool + Sync)>) {
    let mut argv = vec![prog(name).to_string_lossy().into_owned()];
    argv.extend(args.iter().map(|a| a.to_string()));
    case_argv(name, &argv, crash, during);
}

/// Like [`case`] with a full command line.
fn case_argv(
    name: &str,
    argv: &[String],
    crash: Crash,
    during: Option<&(dyn Fn() -> bool + Sync)>,
) {
    run_case(name, argv, crash, during, 1);
}

/// A program that forks: the crash comes once a layer holds at least `procs` processes
/// (zombies included), and kills the whole tree.
fn case_tree(name: &str, args: &[&str], crash: Crash, procs: u64) {
    let mut argv = vec![prog(name).to_string_lossy().into_owned()];
    argv.extend(args.iter().map(|a| a.to_string()));
    run_case(name, &argv, crash, None, procs);
}

/// `pid` and every process below it (host pids), `pid` first.
fn tree_of(pid: i64) -> Vec<i64> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in rd.filter_map(|e| e.ok()) {
                let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(c.split_whitespace().filter_map(|x| x.parse::<i64>().ok()));
            }
        }
        i += 1;
    }
    out
}

/// SIGKILLs `app` and every process it forked: pid 1 first (which takes its namespace with
/// it), then each of the others by pid.
fn kill_tree(app: i64) {
    for pid in tree_of(app) {
        // The others may be gone with pid 1 already.
        let _ = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn run_case(
    name: &str,
    argv: &[String],
    crash: Crash,
    during: Option<&(dyn Fn() -> bool + Sync)>,
    procs: u64,
) {
    let dir = work_dir().join(format!("img-{name}-{crash:?}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut guard = Command::new(KINTSUGI)
        .args(["guard", "--epoch", "20ms", "--images"])
        .arg(&dir)
        .arg("--")
        .args(argv)
        .current_dir(work_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // At least 4 layers (the first full, then incrementals) before the crash.
    let t0 = Instant::now();
    let st = loop {
        if let Some(s) = status(&dir)
            && s["layers_written"].as_u64().unwrap_or(0) >= 4
            && s["processes"].as_u64().unwrap_or(0) >= procs
        {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{name}: no 4 layers with {procs} processes within 20 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(st["restorable"], true, "{name}: {st}");
    if let Some(f) = during {
        assert!(f(), "{name}: the program did not serve before the crash");
    }
    let app = st["app_pid"].as_i64().unwrap();
    match crash {
        Crash::App => {
            kill_tree(app);
            // The guard notices, restores, and keeps guarding.
            let t1 = Instant::now();
            while status(&dir).map(|s| s["restores"].as_u64() == Some(1)) != Some(true) {
                assert!(t1.elapsed() < Duration::from_secs(10), "{name}: no restore");
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(f) = during {
                assert!(f(), "{name}: the restored program did not serve");
            }
            let code = wait_deadline(&mut guard, 60);
            let out = read_all(&mut guard);
            assert!(
                out.contains("PASS"),
                "{name}: no PASS after restore, exit {code}, output:\n{out}"
            );
            assert_eq!(code, 0, "{name}");
            let s = status(&dir).unwrap();
            assert_ne!(
                s["app_pid"].as_i64().unwrap(),
                app,
                "{name}: a new process runs it"
            );
        }
        Crash::Both => {
            kill(guard.id() as i64);
            kill_tree(app);
            let _ = guard.wait();
            let before = read_all(&mut guard);
            assert!(
                !before.contains("PASS"),
                "{name}: finished before the crash"
            );
            let mut restore = Command::new(KINTSUGI)
                .args(["restore", "--epoch", "20ms"])
                .arg(&dir)
                .current_dir(work_dir())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            if let Some(f) = during {
                let t1 = Instant::now();
                while !f() {
                    assert!(
                        t1.elapsed() < Duration::from_secs(10),
                        "{name}: the restored program did not serve"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let code = wait_deadline(&mut restore, 60);
            let out = read_all(&mut restore);
            assert!(
                out.contains("PASS"),
                "{name}: no PASS after restore from disk, exit {code}, output:\n{out}"
            );
            assert_eq!(code, 0, "{name}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const N: &str = "150";

#[test]
fn counter_in_anon_memory() {
    let _cleanup = Cleanup;
    case("counter", &[N], Crash::App, None);
    case("counter", &[N], Crash::Both, None);
}

#[test]
fn big_sparse_anon_mapping() {
    let _cleanup = Cleanup;
    case("sparse", &[N], Crash::App, None);
    case("sparse", &[N], Crash::Both, None);
}

/// 64 MB written everywhere while the first capture (≥ 8 MB: copied after the program
/// resumes, completed by the next layer) is taken.
#[test]
fn big_memory_first_capture_copied_while_running() {
    let _cleanup = Cleanup;
    case("bigmem", &[N], Crash::App, None);
    case("bigmem", &[N], Crash::Both, None);
}

#[test]
fn file_written_and_read_at_offsets() {
    let _cleanup = Cleanup;
    let f = work_dir().join("fileoff.dat");
    case("fileoff", &[N, f.to_str().unwrap()], Crash::App, None);
    case("fileoff", &[N, f.to_str().unwrap()], Crash::Both, None);
}

#[test]
fn append_only_log_file() {
    let _cleanup = Cleanup;
    let f = work_dir().join("append.log");
    case("appendlog", &[N, f.to_str().unwrap()], Crash::App, None);
    case("appendlog", &[N, f.to_str().unwrap()], Crash::Both, None);
}

#[test]
fn shared_file_mapping() {
    let _cleanup = Cleanup;
    let f = work_dir().join("shared.map");
    case("sharedmap", &[N, f.to_str().unwrap()], Crash::App, None);
    case("sharedmap", &[N, f.to_str().unwrap()], Crash::Both, None);
}

#[test]
fn one_guard_per_image_directory() {
    let _cleanup = Cleanup;
    let bin = prog("counter");
    let dir = work_dir().join("img-lock");
    let _ = std::fs::remove_dir_all(&dir);
    let mut first = Command::new(KINTSUGI)
        .args(["guard", "--images"])
        .arg(&dir)
        .arg("--")
        .arg(&bin)
        .arg("100")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while status(&dir).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = Command::new(KINTSUGI)
        .args(["guard", "--images"])
        .arg(&dir)
        .arg("--")
        .arg(&bin)
        .arg("5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_ne!(second.status.code(), Some(0));
    assert!(err.contains("in use by another running guard"), "{err}");
    assert_eq!(wait_deadline(&mut first, 30), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn four_threads_each_with_own_state() {
    let _cleanup = Cleanup;
    case("threads", &[N], Crash::App, None);
    case("threads", &[N], Crash::Both, None);
}

/// A parent forks a writer and a reader connected by a pipe; the reader checks the counter
/// stream has no gap and no duplicate. The whole tree is killed mid-stream and rebuilt with
/// the same pids, the pipe (and its buffered bytes) shared again by the two children.
#[test]
fn pipe_between_two_processes_it_forked() {
    let _cleanup = Cleanup;
    case_tree("forkpipe", &[N], Crash::App, 3);
    case_tree("forkpipe", &[N], Crash::Both, 3);
}

/// A pipe whose writer exited (and was reaped) with bytes still in it: the reader restored
/// mid-stream gets the rest, then end-of-file (the write end comes back closed).
#[test]
fn pipe_whose_writer_exited() {
    let _cleanup = Cleanup;
    case_tree("pipeeof", &[N], Crash::App, 2);
    case_tree("pipeeof", &[N], Crash::Both, 2);
}

/// Parent and child each keep their own counter at the same addresses, and check their pids.
#[test]
fn parent_and_child_each_with_own_counter() {
    let _cleanup = Cleanup;
    case_tree("forkcount", &[N], Crash::App, 2);
    case_tree("forkcount", &[N], Crash::Both, 2);
}

/// A forked child with 3 threads of its own: the threads come back inside the restored child.
#[test]
fn child_process_with_threads() {
    let _cleanup = Cleanup;
    case_tree("forkthreads", &[N], Crash::App, 2);
    case_tree("forkthreads", &[N], Crash::Both, 2);
}

/// A child reaped before the checkpoint does not come back; zombies (one exited, one killed by
/// a signal) come back as zombies with the same wait status.
#[test]
fn children_that_exit_before_the_checkpoint() {
    let _cleanup = Cleanup;
    case_tree("forkzombie", &[N], Crash::App, 3);
    case_tree("forkzombie", &[N], Crash::Both, 3);
}

/// A shell running a pipeline in a loop (`echo $i | cat`): two children per iteration, one
/// of which execs, a SIGCHLD handler interrupting the shell's trapped calls, pipes shared over
/// fork. The loop must finish with the count right and no pipe end leaked (a trapped `close`
/// cut short by a signal would leave one open and deadlock the next `cat`).
#[test]
fn shell_pipeline_loop() {
    let _cleanup = Cleanup;
    let script = r#"b=$(ls -l /proc/self/fd | grep -c "r-x.*pipe"); i=0; while [ $i -lt 500 ]; do i=$((i+1)); echo $i | cat > /dev/null; done; a=$(ls -l /proc/self/fd | grep -c "r-x.*pipe"); if [ "$a" = "$b" ] && [ $i = 500 ]; then echo PASS; else echo "FAIL $i $b $a"; fi"#;
    // The no-op `:` names this test's directory in the shell's command line, so `Cleanup`
    // recognises the shell as ours.
    let script = format!(": {}; {script}", work_dir().display());
    let argv = ["/bin/sh".to_string(), "-c".to_string(), script];
    case_argv("shloop", &argv, Crash::App, None);
    case_argv("shloop", &argv, Crash::Both, None);
}

#[test]
fn program_that_execs_another() {
    let _cleanup = Cleanup;
    // The guarded command is a shell that execs the counter: the guard re-arms its tracker on
    // the new address space.
    let cmd = format!("exec {} {N}", prog("counter").display());
    let argv = ["/bin/sh".to_string(), "-c".to_string(), cmd];
    case_argv("exec", &argv, Crash::App, None);
    case_argv("exec", &argv, Crash::Both, None);
}

/// `--net`: the program gets its own network namespace with loopback up, before and after a
/// restore.
#[test]
fn own_network_namespace_survives_restore() {
    let _cleanup = Cleanup;
    let bin = prog("counter");
    let dir = work_dir().join("img-net");
    let _ = std::fs::remove_dir_all(&dir);
    let mut g = Command::new(KINTSUGI)
        .args(["guard", "--net", "--epoch", "20ms", "--images"])
        .arg(&dir)
        .arg("--")
        .arg(&bin)
        .arg(N)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let own_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let check = |pid: i64| {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
            own_ns,
            "a network namespace of its own"
        );
        let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
        let ifs: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(ifs, vec!["lo"], "{dev}");
        let fib = std::fs::read_to_string(format!("/proc/{pid}/net/fib_trie")).unwrap();
        assert!(fib.contains("127.0.0.1"), "loopback is up: {fib}");
    };
    let t0 = Instant::now();
    let st = loop {
        if let Some(s) = status(&dir)
            && s["layers_written"].as_u64().unwrap_or(0) >= 4
        {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    };
    let app = st["app_pid"].as_i64().unwrap();
    check(app);
    kill(app);
    let t1 = Instant::now();
    let new = loop {
        if let Some(s) = status(&dir)
            && s["restores"].as_u64() == Some(1)
            && s["app_pid"].as_i64() != Some(app)
        {
            break s["app_pid"].as_i64().unwrap();
        }
        assert!(t1.elapsed() < Duration::from_secs(10), "no restore");
        std::thread::sleep(Duration::from_millis(10));
    };
    check(new);
    assert_eq!(wait_deadline(&mut g, 60), 0);
    assert!(read_all(&mut g).contains("PASS"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM to the guard is passed on; pid 1 ignores it without a handler, so a second one ends
/// the program with SIGKILL and the guard exits instead of restoring it.
#[test]
fn termination_signals_stop_program_and_guard() {
    let _cleanup = Cleanup;
    let bin = prog("counter");
    let dir = work_dir().join("img-term");
    let _ = std::fs::remove_dir_all(&dir);
    let mut g = Command::new(KINTSUGI)
        .args(["guard", "--epoch", "20ms", "--images"])
        .arg(&dir)
        .arg("--")
        .arg(&bin)
        .arg("5000")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let st = loop {
        if let Some(s) = status(&dir)
            && s["layers_written"].as_u64().unwrap_or(0) >= 2
        {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    };
    let app = st["app_pid"].as_i64().unwrap();
    let term = |pid: u32| {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    };
    term(g.id());
    std::thread::sleep(Duration::from_millis(100));
    term(g.id());
    assert_eq!(wait_deadline(&mut g, 10), 128 + 15);
    assert!(
        !Path::new(&format!("/proc/{app}")).exists(),
        "the program is gone too"
    );
    let s = status(&dir).unwrap();
    assert!(
        s["state"].as_str().unwrap().contains("stopped by SIGTERM"),
        "{s}"
    );
    assert_eq!(s["restores"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn timers_and_signal_handler() {
    let _cleanup = Cleanup;
    case("timer", &[N], Crash::App, None);
    case("timer", &[N], Crash::Both, None);
}

#[test]
fn epoll_loop_over_timerfd_eventfd_pipe() {
    let _cleanup = Cleanup;
    case("epoll", &[N], Crash::App, None);
    case("epoll", &[N], Crash::Both, None);
}

#[test]
fn listening_tcp_socket_accepts_after_restore() {
    let _cleanup = Cleanup;
    let port = 40000 + (std::process::id() % 20000) as u16;
    let ping = move || {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(500),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"ping\n");
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r.starts_with("pong")
    };
    let p = port.to_string();
    case("tcplisten", &["250", &p], Crash::App, Some(&ping));
    case("tcplisten", &["250", &p], Crash::Both, Some(&ping));
}

#[test]
fn refuses_io_uring_and_reports_it_in_status() {
    let _cleanup = Cleanup;
    let bin = prog("refuse");
    let dir = work_dir().join("img-refuse");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(KINTSUGI)
        .args(["guard", "--epoch", "20ms", "--images"])
        .arg(&dir)
        .arg("--")
        .arg(&bin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("io_uring_setup refused errno 38"),
        "{stdout}"
    );
    assert!(stdout.contains("PASS"), "{stdout}");
    let st = Command::new(KINTSUGI)
        .args(["guard", "--status", "--images"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains("restorable     NO") && text.contains("io_uring"),
        "{text}"
    );
    assert!(text.contains("/dev/"), "device refusal named: {text}");
    assert_eq!(st.status.code(), Some(1));
    // Restoring a non-restorable image is refused up front.
    let r = Command::new(KINTSUGI)
        .arg("restore")
        .arg(&dir)
        .output()
        .unwrap();
    assert_ne!(r.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not restorable"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_image_is_rejected_naming_the_record() {
    let _cleanup = Cleanup;
    let bin = prog("counter");
    let dir = work_dir().join("img-corrupt");
    let _ = std::fs::remove_dir_all(&dir);
    let mut g = Command::new(KINTSUGI)
        .args(["guard", "--epoch", "20ms", "--images"])
        .arg(&dir)
        .arg("--")
        .arg(&bin)
        .arg("60")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(wait_deadline(&mut g, 30), 0);
    let mut layers: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    layers.sort();
    let top = layers.last().unwrap().clone();
    let mut b = std::fs::read(&top).unwrap();
    let n = b.len();
    b[n - 40] ^= 0xff;
    std::fs::write(&top, &b).unwrap();
    let r = Command::new(KINTSUGI)
        .arg("restore")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_ne!(r.status.code(), Some(0));
    assert!(
        err.contains("record")
            && err.contains("checksum")
            && err.contains(top.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
