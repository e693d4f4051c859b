//! Demo rung "restart": rfork's two designs, the watchdog, the intensity limit, and `kintsugi
//! run` supervising an external program. About two seconds.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, ensure};
use rfork::{Config, Design, EventKind, Intensity, Policy, Reason, RestartOn};
use sys::clock::monotonic_ns;
use sys::shm::SharedAtomics;

pub fn run(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    say("== restart: rfork, a fork whose child comes back after a crash ==");
    for design in [Design::Monitor, Design::KeptImage] {
        crash_and_restart(design, say)?;
    }
    watchdog(say)?;
    intensity(say)?;
    external(say)?;
    Ok(())
}

/// A child that counts in memory, crashes with a real SIGSEGV at 3, and must come back with
/// the counter it had at rfork time (0), not the one it crashed with.
fn crash_and_restart(design: Design, say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    // Shared words: 0 = death stamp, 1 = counter seen by generation 2 at start, 2 = latency.
    let shared = SharedAtomics::new(3)?;
    let mut counter = 0u64; // the state at rfork time
    let cfg = Config {
        design,
        policy: Policy {
            restart: RestartOn::OnCrash,
            intensity: Intensity::default(),
            backoff: None,
        },
        ..Config::default()
    };
    let mut s = rfork::spawn(&cfg, |w| {
        let now = monotonic_ns();
        if w.generation() == 2 {
            shared.word(1).store(counter, Ordering::Relaxed);
            shared.word(2).store(
                now - shared.word(0).load(Ordering::Acquire),
                Ordering::Relaxed,
            );
            return 0;
        }
        while counter < 3 {
            counter += 1;
        }
        w.wait_standby_ready(Duration::from_secs(5));
        shared.word(0).store(monotonic_ns(), Ordering::Release);
        sys::fault::segv()
    })
    .context("rfork")?;
    let mut restarted = None;
    while let Some(e) = s.next_event(Some(Duration::from_secs(10)))? {
        match e.kind {
            EventKind::Started => say(&format!(
                "  [{}] worker {} started; it counts to 3 in memory, then writes through a null pointer",
                design.name(),
                e.pid
            )),
            EventKind::Restarted => {
                restarted = Some(e.reason);
                say(&format!(
                    "  [{}] the worker was {} -> the keeper started generation {} as pid {}",
                    design.name(),
                    e.reason,
                    e.generation,
                    e.pid
                ));
            }
            EventKind::Removed => say(&format!(
                "  [{}] generation {} exited normally ({}): removed, as rfork promises",
                design.name(),
                e.generation,
                e.reason
            )),
            _ => {}
        }
    }
    let out = s.wait()?;
    ensure!(
        restarted == Some(Reason::Signaled(libc::SIGSEGV)),
        "{}: the crash did not cause a restart",
        design.name()
    );
    ensure!(
        out.keeper == sys::process::ExitStatus::Exited(0),
        "{}: supervision ended badly: {out:?}",
        design.name()
    );
    let seen = shared.word(1).load(Ordering::Relaxed);
    ensure!(
        seen == 0,
        "{}: the restarted child saw counter {seen}, not its rfork-time 0",
        design.name()
    );
    let how = match design {
        Design::Monitor => "forked anew from the keeper's rfork-time image",
        Design::KeptImage => {
            "a standby forked in advance and parked, released on death (no fork on the restart path)"
        }
    };
    say(&format!(
        "  [{}] restarted child saw counter = 0 (its rfork-time state) {:.0} µs after the crash; {how}",
        design.name(),
        shared.word(2).load(Ordering::Relaxed) as f64 / 1000.0
    ));
    Ok(())
}

fn watchdog(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let cfg = Config {
        watchdog: Some(Duration::from_millis(150)),
        ..Config::default()
    };
    let mut s = rfork::spawn(&cfg, |w| {
        if w.generation() == 1 {
            w.heartbeat();
            loop {
                std::thread::sleep(Duration::from_secs(1)); // hangs: no more heartbeats
            }
        }
        0
    })?;
    let mut hung = false;
    while let Some(e) = s.next_event(Some(Duration::from_secs(10)))? {
        hung |= e.kind == EventKind::Restarted && e.reason == Reason::Hung;
    }
    s.wait()?;
    ensure!(hung, "the hung worker was not restarted by the watchdog");
    say(
        "  [watchdog] a worker stopped sending heartbeats; after 150 ms the keeper killed it and started a fresh one",
    );
    Ok(())
}

fn intensity(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let cfg = Config {
        policy: Policy {
            restart: RestartOn::OnFailure,
            intensity: Intensity {
                max_restarts: 3,
                within: Duration::from_secs(10),
            },
            backoff: None,
        },
        ..Config::default()
    };
    let s = rfork::spawn(&cfg, |_| sys::fault::segv())?;
    let out = s.wait()?;
    ensure!(
        out.gave_up(),
        "a crash loop did not hit the intensity limit"
    );
    say(
        "  [intensity] a child that crashes at once, every time: 3 restarts in 10 s allowed, then the keeper gave up and said so",
    );
    Ok(())
}

fn external(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let script = r#"[ "$KINTSUGI_GENERATION" -ge 3 ] && exit 0; kill -SEGV $$"#;
    let out = std::process::Command::new(&exe)
        .args([
            "--log-format",
            "json",
            "run",
            "--max-restarts",
            "5",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()?;
    let restarts = String::from_utf8_lossy(&out.stderr)
        .matches("\"event\":\"restarted\"")
        .count();
    ensure!(
        out.status.success() && restarts == 2,
        "kintsugi run did not restart the crashing script twice: {out:?}"
    );
    say(
        "  [kintsugi run] `sh -c 'kill -SEGV $$'` supervised with fork+exec: crashed twice, restarted twice, third run exited 0",
    );
    Ok(())
}
