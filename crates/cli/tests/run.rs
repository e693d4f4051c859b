//! `kintsugi run` on the real binary: flags, errors, restart policies, watchdog, signals, and
//! proof that nothing is left running afterwards.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use sys::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_kintsugi");

fn run(args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", BIN, "--log-format", "json", "run"])
        .args(args);
    cmd.env("PATH", path_with_bin());
    cmd.output().expect("run kintsugi")
}

/// PATH with the kintsugi binary's directory first, so scripts can call `kintsugi notify`.
fn path_with_bin() -> String {
    let dir = PathBuf::from(BIN)
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    format!("{dir}:{}", std::env::var("PATH").unwrap_or_default())
}

/// The structured events (JSON lines with an "event" field) kintsugi logged.
fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("event").is_some())
        .collect()
}

fn kinds(out: &Output) -> Vec<String> {
    events(out)
        .iter()
        .map(|v| v["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kintsugi-run-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

#[test]
fn missing_command_is_127_with_a_clear_error() {
    let out = run(&["--", "definitely-not-a-command-xyz"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("command not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn non_executable_is_126() {
    let d = tmp("noexec");
    let f = d.join("script.sh");
    std::fs::write(&f, "#!/bin/sh\nexit 0\n").expect("write");
    let out = run(&["--", f.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not an executable"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_flags_and_senseless_policies_are_refused() {
    for (args, needle) in [
        (
            &["--restart", "sometimes", "--", "true"][..],
            "unknown policy",
        ),
        (&["--max-restarts", "0", "--", "true"][..], "never restart"),
        (&["--request-exit-code", "0", "--", "true"][..], "success"),
        (&["--within", "0s", "--", "true"][..], "--within 0"),
        (&["--within", "ten", "--", "true"][..], "not a duration"),
        (
            &["--backoff", "5s", "--backoff-max", "1s", "--", "true"][..],
            "longer than --backoff-max",
        ),
        (&["--watchdog", "1us", "--", "true"][..], "shorter than 1ms"),
        (&[][..], "required"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: want {needle:?} in {}",
            stderr(&out)
        );
    }
}

#[test]
fn clean_exit_is_not_restarted() {
    let out = run(&["--", "sh", "-c", "exit 0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(kinds(&out), ["started", "removed"]);
}

#[test]
fn crash_loop_hits_the_intensity_limit_and_reports_it() {
    let out = run(&[
        "--max-restarts",
        "3",
        "--within",
        "30s",
        "--",
        "sh",
        "-c",
        "kill -SEGV $$",
    ]);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGSEGV),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        kinds(&out),
        ["started", "restarted", "restarted", "restarted", "gave_up"]
    );
    let ev = events(&out);
    assert_eq!(ev[1]["reason"], "killed by SIGSEGV");
    assert_eq!(ev[4]["restarts_in_window"], 3);
}

#[test]
fn on_failure_restarts_until_success() {
    let d = tmp("onfailure");
    let script = format!(
        "n=$(cat {0}/n 2>/dev/null || echo 0); echo $((n+1)) > {0}/n; [ $n -ge 2 ]",
        d.display()
    );
    let out = run(&["--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        kinds(&out),
        ["started", "restarted", "restarted", "removed"]
    );
    assert_eq!(events(&out)[1]["reason"], "exit status 1");
}

#[test]
fn on_crash_does_not_restart_a_nonzero_exit() {
    let out = run(&["--restart", "on-crash", "--", "sh", "-c", "exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(kinds(&out), ["started", "removed"]);
}

#[test]
fn request_exit_code_restarts_under_on_request() {
    let script = r#"[ "$KINTSUGI_GENERATION" -ge 2 ] && exit 0; exit 75"#;
    let out = run(&["--restart", "on-request", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(kinds(&out), ["started", "restarted", "removed"]);
    assert_eq!(events(&out)[1]["reason"], "restart requested");
}

#[test]
fn backoff_spaces_restarts() {
    let t0 = std::time::Instant::now();
    let out = run(&[
        "--backoff",
        "100ms",
        "--max-restarts",
        "3",
        "--",
        "sh",
        "-c",
        "exit 1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // 100 + 200 + 400 ms of backoff at least.
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn watchdog_kills_a_silent_child_and_spares_one_that_beats() {
    let silent = r#"[ "$KINTSUGI_GENERATION" -ge 2 ] && exit 0; exec sleep 30"#;
    let out = run(&["--watchdog", "300ms", "--", "sh", "-c", silent]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(kinds(&out), ["started", "restarted", "removed"]);
    assert_eq!(events(&out)[1]["reason"], "watchdog: no heartbeat");

    let beating = "i=0; while [ $i -lt 20 ]; do kintsugi notify --watchdog || exit 9; sleep 0.05; i=$((i+1)); done";
    let out = run(&["--watchdog", "1s", "--", "sh", "-c", beating]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(kinds(&out), ["started", "removed"]);
}

#[test]
fn sighup_restarts_and_sigterm_stops_leaving_nothing_behind() {
    let d = tmp("signals");
    // Each generation records its pid and a background grandchild's pid.
    let script = format!(
        "sleep 60 & echo $! >> {0}/pids; echo $$ >> {0}/pids; wait",
        d.display()
    );
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "run",
            "--stop-timeout",
            "500ms",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let kpid = Pid::from_raw(child.id() as i32).expect("pid");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut next_event = || loop {
        let line = lines.next().expect("kintsugi ended early").expect("read");
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v.get("event").is_some()
        {
            return v;
        }
    };
    assert_eq!(next_event()["event"], "started");
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(d.join("pids")).is_ok_and(|s| s.lines().count() >= 2)
    }));
    sys::process::kill(kpid, libc::SIGHUP).expect("SIGHUP");
    let ev = next_event();
    assert_eq!(
        (ev["event"].as_str(), ev["reason"].as_str()),
        (Some("restarted"), Some("operator restart"))
    );
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(d.join("pids")).is_ok_and(|s| s.lines().count() >= 4)
    }));
    sys::process::kill(kpid, libc::SIGTERM).expect("SIGTERM");
    assert_eq!(next_event()["event"], "removed");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let pids: Vec<Pid> = std::fs::read_to_string(d.join("pids"))
        .expect("pids")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter_map(Pid::from_raw)
        .collect();
    assert_eq!(pids.len(), 4);
    // Every generation's shell and its background sleep are gone (killed with their group,
    // reaped by kintsugi as subreaper or by their parent).
    testkit::assert_all_gone(&pids, Duration::from_secs(5));
}

#[test]
fn notify_without_a_socket_says_why() {
    let out = Command::new(BIN)
        .args(["notify", "--ready"])
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOTIFY_SOCKET is not set"));
}

#[test]
fn a_crash_loop_cannot_flood_the_log() {
    let out = run(&[
        "--max-restarts",
        "150",
        "--within",
        "60s",
        "--",
        "sh",
        "-c",
        "kill -SEGV $$",
    ]);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGSEGV),
        "{}",
        stderr(&out)
    );
    let k = kinds(&out);
    let restarted = k.iter().filter(|e| *e == "restarted").count();
    assert!(
        restarted < 60,
        "{restarted} restart lines for 150 restarts: not rate-limited"
    );
    let ev = events(&out);
    assert_eq!(ev.last().expect("gave_up")["restarts_in_window"], 150);
}
