//! `kintsugi bench run`: restart latency of `kintsugi run` against runit's `runsv` and
//! daemontools' `supervise`, restarting the same crashing program, in one run.
//!
//! The program (`crasher.c`, compiled here with `cc`) appends `now - death` to a file at
//! start, lives for the given time, stamps CLOCK_MONOTONIC into a file, and writes through a
//! null pointer (a real SIGSEGV). Latency = that stamp → the next instance's first stamp.
//!
//! Throttles, set as low as each allows: runsv waits 1 s before restarting a service that ran
//! for less than 1 s, supervise sleeps 1 s when a service exits within 1 s of its start; neither
//! has a setting to lower that. So the comparison uses children that live 1.1 s, where neither
//! throttles. `kintsugi run` has no throttle (only the restart-intensity limit and optional
//! backoff, both off here), so it gets a second row with an immediate crash loop.
//! Service directories (and the crasher's stamp files, for every supervisor alike) live on disk
//! by default, under $TMPDIR or /tmp, as runit's /etc/sv and daemontools' /service do in real
//! deployments: runsv and supervise write status files on every restart. `--tmpfs` puts them
//! on /dev/shm instead, the incumbents' best case.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;

use super::stats::Summary;

const CRASHER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <stdint.h>
static uint64_t now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec; }
int main(int argc, char **argv) {
    uint64_t start = now();
    char p[4096]; unsigned long long death = 0;
    snprintf(p, sizeof p, "%s/death", argv[1]);
    FILE *f = fopen(p, "r");
    if (f) { if (fscanf(f, "%llu", &death) != 1) death = 0; fclose(f); }
    if (death) { snprintf(p, sizeof p, "%s/lat", argv[1]); f = fopen(p, "a"); fprintf(f, "%llu\n", (unsigned long long)(start - death)); fclose(f); }
    long ms = atol(argv[2]);
    struct timespec d = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&d, 0);
    snprintf(p, sizeof p, "%s/death.tmp", argv[1]);
    f = fopen(p, "w"); 
    char q[4096]; snprintf(q, sizeof q, "%s/death", argv[1]);
    fprintf(f, "%llu\n", (unsigned long long)now()); fclose(f); rename(p, q);
    *(volatile int *)0 = 1;
    return 0;
}
"#;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Restarts measured per supervisor.
    #[arg(long, default_value_t = 20)]
    pub restarts: u32,
    /// How long each child lives before it crashes, in ms (≥ 1000 avoids runsv/supervise's
    /// one-second throttle).
    #[arg(long, default_value_t = 1100)]
    pub lifetime_ms: u64,
    /// Put the service directories on tmpfs (/dev/shm) instead of disk.
    #[arg(long)]
    pub tmpfs: bool,
    /// Print the JSON object only.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    name: &'static str,
    lifetime_ms: u64,
    throttle: &'static str,
    #[serde(flatten)]
    s: Summary,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    restarts: u32,
    service_dirs: &'static str,
    results: Vec<Row>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    ensure!(a.restarts >= 1, "--restarts must be at least 1");
    ensure_tools()?;
    let base = if a.tmpfs {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let work = base.join(format!("kintsugi-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let result = measure(&a, &work);
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "restart latency of the same crashing program under three supervisors, {} restarts each, service dirs on {} (µs)",
            a.restarts, report.service_dirs
        );
        println!(
            "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9}  throttle",
            "supervisor", "life_ms", "mean", "p50", "p99", "max"
        );
        for r in &report.results {
            println!(
                "{:<24} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {}",
                r.name, r.lifetime_ms, r.s.mean_us, r.s.p50_us, r.s.p99_us, r.s.max_us, r.throttle
            );
        }
        let p50 = |n| {
            report
                .results
                .iter()
                .find(|r| r.name == n && r.lifetime_ms == a.lifetime_ms)
                .map(|r| r.s.p50_us)
        };
        if let (Some(k), Some(r), Some(d)) = (p50("kintsugi_run"), p50("runsv"), p50("supervise")) {
            println!(
                "kintsugi run p50 / best of runsv, supervise p50 = {:.2}",
                k / r.min(d)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(a: &Args, work: &Path) -> anyhow::Result<Report> {
    let crasher = work.join("crasher");
    std::fs::write(work.join("crasher.c"), CRASHER)?;
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&crasher)
        .arg(work.join("crasher.c"))
        .status()
        .context("cc")?;
    ensure!(st.success(), "compiling the crasher with cc failed");
    let kintsugi = std::env::current_exe()?;
    let n = a.restarts as usize;
    let life = a.lifetime_ms.to_string();
    let mut results = Vec::new();
    let throttle_none = "none (intensity limit off)";
    let throttle_1s = "waits 1 s if the child lived < 1 s (fixed)";
    type MakeCommand<'a> = &'a dyn Fn(&Path) -> Command;
    let runs: [(&str, u64, &str, MakeCommand<'_>); 4] = [
        ("kintsugi_run", a.lifetime_ms, throttle_none, &|d: &Path| {
            let mut c = Command::new(&kintsugi);
            c.args([
                "run",
                "--restart",
                "always",
                "--max-restarts",
                "unlimited",
                "--",
            ])
            .arg(&crasher)
            .arg(d)
            .arg(&life);
            c
        }),
        ("runsv", a.lifetime_ms, throttle_1s, &|d: &Path| {
            let mut c = Command::new("runsv");
            c.arg(service_dir(d, &crasher, &life));
            c
        }),
        ("supervise", a.lifetime_ms, throttle_1s, &|d: &Path| {
            let mut c = Command::new("supervise");
            c.arg(service_dir(d, &crasher, &life));
            c
        }),
        ("kintsugi_run_crashloop", 0, throttle_none, &|d: &Path| {
            let mut c = Command::new(&kintsugi);
            c.args([
                "run",
                "--restart",
                "always",
                "--max-restarts",
                "unlimited",
                "--",
            ])
            .arg(&crasher)
            .arg(d)
            .arg("0");
            c
        }),
    ];
    for (name, lifetime, throttle, make) in runs {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        let lat = supervise_until(
            make(&dir),
            &dir,
            &crasher,
            n,
            Duration::from_millis(lifetime + 2500) * (n as u32 + 2),
        )
        .with_context(|| format!("measuring {name}"))?;
        results.push(Row {
            name,
            lifetime_ms: lifetime,
            throttle,
            s: Summary::from_ns(&lat),
        });
    }
    let service_dirs = if a.tmpfs { "tmpfs" } else { "disk" };
    Ok(Report {
        bench: "run",
        restarts: a.restarts,
        service_dirs,
        results,
    })
}

/// A runit/daemontools service directory whose `run` execs the crasher.
fn service_dir(d: &Path, crasher: &Path, life: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let s = d.join("service");
    let _ = std::fs::create_dir_all(&s);
    let run = s.join("run");
    let _ = std::fs::write(
        &run,
        format!(
            "#!/bin/sh\nexec {} {} {}\n",
            crasher.display(),
            d.display(),
            life
        ),
    );
    let _ = std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755));
    s
}

/// Starts the supervisor in its own process group, waits for `n` latencies, then kills the
/// group and every crasher instance that is still around.
fn supervise_until(
    mut cmd: Command,
    dir: &Path,
    crasher: &Path,
    n: usize,
    limit: Duration,
) -> anyhow::Result<Vec<u64>> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().context("starting the supervisor")?;
    let pgid = sys::Pid::from_raw(child.id() as i32).context("pid")?;
    let t0 = Instant::now();
    let lat_file = dir.join("lat");
    let read = || -> Vec<u64> {
        std::fs::read_to_string(&lat_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    while read().len() < n && t0.elapsed() < limit {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("the supervisor exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = sys::process::kill_group(pgid, libc::SIGKILL);
    let _ = child.wait();
    kill_instances_of(crasher);
    let lat = read();
    ensure!(
        lat.len() >= n,
        "only {} of {n} restarts happened within {limit:?}",
        lat.len()
    );
    Ok(lat.into_iter().take(n).collect())
}

/// Kills any process still running `exe` (a supervisor may put its child in another group).
fn kill_instances_of(exe: &Path) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe)
            && let Some(p) = sys::Pid::from_raw(pid)
        {
            let _ = sys::process::kill(p, libc::SIGKILL);
        }
    }
}

/// runsv (runit), supervise (daemontools) and cc, installed with apt-get when missing.
fn ensure_tools() -> anyhow::Result<()> {
    let have = |b: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()))
            || ["/usr/bin", "/usr/sbin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(b).is_file())
    };
    let missing: Vec<&str> = [
        ("runsv", "runit"),
        ("supervise", "daemontools"),
        ("cc", "gcc"),
    ]
    .iter()
    .filter(|(b, _)| !have(b))
    .map(|&(_, p)| p)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "kintsugi bench run: installing {} with apt-get",
        missing.join(" ")
    );
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .envs(env)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .envs(env)
            .status()
            .is_ok_and(|s| s.success());
    ensure!(
        ok,
        "could not install {missing:?}: run `apt-get install {}` as root and retry",
        missing.join(" ")
    );
    Ok(())
}
