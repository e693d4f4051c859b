//! `kintsugi watch` through the real binary: the health table, config errors, and the JSON
//! event stream reporting a real fork bomb and the kill of its cgroup. Needs root.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kintsugi"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(watch::faults::unique(name))
}

/// Removes the listed files and directories on drop, so a failing test leaves no litter.
struct Cleanup(Vec<std::path::PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
        }
    }
}

/// Kills the monitor on drop, so a failing assertion leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SIGTERM first: `kintsugi run` then stops its child's process group itself, so no
        // grandchild outlives the test; SIGKILL if it does not exit in time.
        if let Some(pid) = sys::Pid::from_raw(self.0.id() as i32) {
            let _ = sys::process::kill(pid, 15);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines(child: &mut Child) -> Receiver<serde_json::Value> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let v: serde_json::Value =
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn once_prints_every_check() {
    let out = bin()
        .args(["watch", "--once"])
        .output()
        .expect("run kintsugi");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    for check in [
        "hung tasks",
        "blocked on driver",
        "fork storm",
        "memory",
        "heartbeats",
        "kernel log",
    ] {
        assert!(text.contains(check), "missing {check:?} in:\n{text}");
    }
    let out = bin()
        .args(["watch", "--once", "--json"])
        .output()
        .expect("run kintsugi");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON array");
    assert_eq!(v.as_array().map(|a| a.len()), Some(6), "{v}");
}

#[test]
fn bad_config_is_refused_with_the_key_and_the_file() {
    let cfg = tmp("kintsugi-watch-bad.toml");
    let _cleanup = Cleanup(vec![cfg.clone()]);
    std::fs::write(&cfg, "[fork]\nmax_per_second = 3\n").unwrap();
    let out = bin()
        .args(["watch", "--once", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let _ = std::fs::remove_file(&cfg);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("max_per_second") && err.contains(&*cfg.to_string_lossy()),
        "{err}"
    );
    let out = bin()
        .args(["watch", "--config", "/nonexistent/watch.toml"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("/nonexistent/watch.toml") && err.contains("--config"),
        "{err}"
    );
}

#[test]
fn printed_config_is_a_valid_config() {
    let out = bin()
        .args(["watch", "--print-config"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let cfg = tmp("kintsugi-watch-printed.toml");
    let _cleanup = Cleanup(vec![cfg.clone()]);
    std::fs::write(&cfg, &out.stdout).unwrap();
    let again = bin()
        .args(["watch", "--print-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&cfg);
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn json_stream_reports_a_fork_bomb_and_the_kill_of_its_cgroup() {
    let cfg = tmp("kintsugi-watch-cli.toml");
    let metrics = tmp("kintsugi-watch-cli.prom");
    let _cleanup = Cleanup(vec![cfg.clone(), metrics.clone()]);
    std::fs::write(
        &cfg,
        "[[action]]\non = [\"fork_storm\"]\nkind = \"kill_cgroup\"\nallow = [\"/kintsugi-watch-bomb-*\"]\n",
    )
    .unwrap();
    let child = bin()
        .args(["watch", "--json", "--duration", "30", "--config"])
        .arg(&cfg)
        .arg("--metrics")
        .arg(&metrics)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kintsugi watch");
    let mut mon = Running(child);
    let rx = lines(&mut mon.0);
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("started line");
    assert_eq!(first["type"], "started", "{first}");
    assert_eq!(
        first["degraded"],
        serde_json::json!([]),
        "run as root: {first}"
    );

    let bomb = watch::faults::ForkBomb::start(64, Duration::from_secs(20)).expect("fork bomb");
    let path = bomb.cgroup.path.to_string_lossy().to_string();
    let (mut detected, mut killed) = (false, false);
    let end = Instant::now() + Duration::from_secs(10);
    while !(detected && killed) {
        let left = end
            .checked_duration_since(Instant::now())
            .expect("detection and kill in time");
        let v = rx.recv_timeout(left).expect("more events");
        match v["type"].as_str() {
            Some("detection") if v["fault"] == "fork_storm" && v["cgroup"] == path => {
                detected = true
            }
            Some("action") if v["action"] == "kill_cgroup" && v["target"] == path => {
                assert_eq!(v["ok"], true, "{v}");
                killed = true;
            }
            _ => {}
        }
    }
    assert_eq!(bomb.current(), 0, "the bomb's cgroup is empty");
    let prom = std::fs::read_to_string(&metrics).expect("metrics file");
    assert!(!prom.contains("fault=\"fork_storm\"} 0"), "{prom}");
    assert!(
        prom.contains("action=\"kill_cgroup\",ok=\"true\"}"),
        "{prom}"
    );

    // SIGTERM stops it promptly and cleanly.
    sys::process::kill(sys::Pid::from_raw(mon.0.id() as i32).unwrap(), 15).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = mon.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "no exit 3 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(&cfg);
    let _ = std::fs::remove_file(&metrics);
}

#[test]
fn two_monitors_watch_each_other_and_report_a_frozen_peer() {
    let dir = tmp("kintsugi-watch-peers");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(vec![dir.clone()]);
    let beat = dir.join("a.beat");
    let a = bin()
        .args(["watch", "--json", "--duration", "30", "--beat-file"])
        .arg(&beat)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn monitor A");
    let a = Running(a);
    let t = Instant::now();
    while std::fs::metadata(&beat).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "monitor A never beat"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cfg = dir.join("b.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[heartbeat]]\nname = \"peer\"\npath = \"{}\"\ntimeout_ms = 1000\n",
            beat.display()
        ),
    )
    .unwrap();
    let b = bin()
        .args(["watch", "--json", "--duration", "30", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn monitor B");
    let mut b = Running(b);
    let rx = lines(&mut b.0);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).expect("B started")["type"],
        "started"
    );
    // A alive for 2 s: no loss may be reported.
    let end = Instant::now() + Duration::from_secs(2);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if let Ok(v) = rx.recv_timeout(left) {
            assert_ne!(
                v["fault"], "heartbeat",
                "a live peer was reported lost: {v}"
            );
        }
    }
    let a_pid = sys::Pid::from_raw(a.0.id() as i32).unwrap();
    sys::process::kill(a_pid, 19).unwrap(); // SIGSTOP: the peer hangs
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let left = end
            .checked_duration_since(Instant::now())
            .expect("peer loss reported in time");
        let v = rx.recv_timeout(left).expect("more events");
        if v["type"] == "detection" && v["fault"] == "heartbeat" {
            assert_eq!(v["subject"], "heartbeat peer", "{v}");
            break;
        }
    }
    sys::process::kill(a_pid, 18).unwrap(); // SIGCONT, so SIGTERM on drop can stop it
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lost_heartbeat_restarts_a_service_under_kintsugi_run() {
    let dir = tmp("kintsugi-watch-svc");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(vec![dir.clone()]);
    let beat = dir.join("beat");
    let gens = dir.join("generations");
    // Every generation beats ten times, 100 ms apart, then hangs: only a restart revives it.
    let script = format!(
        "echo $$ >> {g}; i=0; while [ $i -lt 10 ]; do echo $i-$$ > {b}; i=$((i+1)); sleep 0.1; done; \
         exec sleep 1000",
        g = gens.display(),
        b = beat.display()
    );
    let sup = bin()
        .args([
            "run",
            "--restart",
            "on-request",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kintsugi run");
    let sup = Running(sup);
    let t = Instant::now();
    while !beat.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the service never beat"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cfg = dir.join("watch.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[heartbeat]]\nname = \"svc\"\npath = \"{}\"\ntimeout_ms = 1000\n\n\
             [[action]]\non = [\"heartbeat\"]\nkind = \"restart\"\npid = {}\n",
            beat.display(),
            sup.0.id()
        ),
    )
    .unwrap();
    let child = bin()
        .args(["watch", "--json", "--duration", "30", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kintsugi watch");
    let mut mon = Running(child);
    let rx = lines(&mut mon.0);
    let (mut lost, mut restarted, mut recovered) = (false, false, false);
    let end = Instant::now() + Duration::from_secs(15);
    while !recovered {
        let left = end
            .checked_duration_since(Instant::now())
            .expect("loss, restart, recovery");
        let v = rx.recv_timeout(left).expect("more events");
        match v["type"].as_str() {
            Some("detection") if v["fault"] == "heartbeat" => lost = true,
            Some("action") if v["action"] == "restart" => {
                assert!(lost, "restart before the loss was reported: {v}");
                assert_eq!(v["ok"], true, "{v}");
                restarted = true;
            }
            Some("recovered") if v["fault"] == "heartbeat" && restarted => recovered = true,
            _ => {}
        }
    }
    let generations = std::fs::read_to_string(&gens)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        generations >= 2,
        "the supervisor did not start a new generation ({generations})"
    );
    drop(mon);
    drop(sup);
    let _ = std::fs::remove_dir_all(&dir);
}
