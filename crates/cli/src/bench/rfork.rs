//! `kintsugi bench rfork`: restart latency of both rfork designs, measured in one run beside a
//! bare `fork`+`_exit`+`waitpid` round trip and a fork+exec relaunch, at a small (1 MB) and a
//! large (256 MB of touched anonymous memory) process.
//!
//! Latency = a CLOCK_MONOTONIC stamp the dying child takes just before it SIGKILLs itself →
//! the stamp the restarted child takes first thing in its user code. Stamps travel through a
//! shared anonymous page (rfork designs) or the child's stdout and environment (fork+exec).
//! - kept_image: each generation waits until the next standby is parked before dying, so the
//!   restart it measures is the one the design promises (no fork on the path); the standby's
//!   own fork is paid off the path, between crashes.
//! - fork_exec: a small supervisor (this process before it grows) spawns `kintsugi
//!   __bench-child`, which must touch its N MB again before it is back to its rfork-time-like
//!   state: that rebuild is what a fork+exec restart costs a stateful program and what rfork
//!   saves, so it is inside the measured latency.
//! - bare_fork: the parent stamps before fork and after waitpid (the cost floor of a fork).

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use rfork::{Config, Design, Intensity, Policy, RestartOn};
use serde::Serialize;
use sys::clock::monotonic_ns;
use sys::process::Fork;
use sys::shm::SharedAtomics;

use super::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Crash→restart cycles per design and size.
    #[arg(long, default_value_t = 1000)]
    pub restarts: u32,
    /// Process sizes in MB of touched anonymous memory.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 256])]
    pub sizes: Vec<u32>,
    /// Print the JSON object only.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    name: &'static str,
    rss_mb: u32,
    #[serde(flatten)]
    s: Summary,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    restarts: u32,
    results: Vec<Row>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.restarts == 0 {
        bail!("--restarts must be at least 1");
    }
    sys::process::disable_core_dumps().context("cannot disable core dumps for the crash loop")?;
    let n = a.restarts as usize;
    let mut results = Vec::new();
    // fork+exec first, while this process is still small (a real exec supervisor is small).
    for &mb in &a.sizes {
        results.push(Row {
            name: "fork_exec",
            rss_mb: mb,
            s: Summary::from_ns(&fork_exec(n, mb)?),
        });
    }
    for &mb in &a.sizes {
        let ballast = touch(mb);
        results.push(Row {
            name: "bare_fork",
            rss_mb: mb,
            s: Summary::from_ns(&bare_fork(n)?),
        });
        for design in [Design::Monitor, Design::KeptImage] {
            results.push(Row {
                name: design.name(),
                rss_mb: mb,
                s: Summary::from_ns(&rfork_loop(design, n)?),
            });
        }
        drop(ballast);
    }
    let order = |name: &str| {
        ["monitor", "kept_image", "bare_fork", "fork_exec"]
            .iter()
            .position(|&x| x == name)
    };
    results.sort_by_key(|r| (r.rss_mb, order(r.name)));
    let report = Report {
        bench: "rfork",
        restarts: a.restarts,
        results,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Report) {
    println!(
        "rfork restart latency, {} crash→restart cycles each (µs)",
        r.restarts
    );
    println!(
        "{:<11} {:>7} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9}",
        "design", "rss_mb", "mean", "sd", "p50", "p99", "min", "max"
    );
    for row in &r.results {
        let s = row.s;
        println!(
            "{:<11} {:>7} {:>9.1} {:>8.1} {:>9.1} {:>9.1} {:>8.1} {:>9.1}",
            row.name, row.rss_mb, s.mean_us, s.sd_us, s.p50_us, s.p99_us, s.min_us, s.max_us
        );
    }
    for &mb in &r
        .results
        .iter()
        .map(|x| x.rss_mb)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let p50 = |name| {
            r.results
                .iter()
                .find(|x| x.rss_mb == mb && x.name == name)
                .map(|x| x.s.p50_us)
        };
        if let (Some(m), Some(k), Some(b)) = (p50("monitor"), p50("kept_image"), p50("bare_fork")) {
            println!(
                "{mb} MB: monitor/bare_fork p50 = {:.2}, kept_image/bare_fork = {:.2}, kept_image/monitor = {:.2}",
                m / b,
                k / b,
                k / m
            );
        }
    }
}

/// `mb` MB of anonymous memory, every page written (so it is resident and forks must copy
/// its page tables).
fn touch(mb: u32) -> Vec<u8> {
    let mut v = vec![0u8; mb as usize * 1024 * 1024];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
    v
}

fn bare_fork(n: usize) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = monotonic_ns();
        match sys::process::fork().context("fork")? {
            Fork::Child => sys::process::exit_now(0),
            Fork::Parent(pid) => {
                sys::process::wait_pid(pid).context("waitpid")?;
            }
        }
        out.push(monotonic_ns() - t0);
    }
    Ok(out)
}

/// Word 0: death stamp; words 1..=n: latency of generation k+1.
fn rfork_loop(design: Design, n: usize) -> anyhow::Result<Vec<u64>> {
    let shared = SharedAtomics::new(n + 1).context("shared page")?;
    let cfg = Config {
        design,
        policy: Policy {
            restart: RestartOn::OnCrash,
            intensity: Intensity::UNLIMITED,
            backoff: None,
        },
        ..Config::default()
    };
    let s = rfork::spawn(&cfg, |w| {
        let now = monotonic_ns();
        let g = w.generation() as usize;
        if g > 1 {
            shared.word(g - 1).store(
                now - shared.word(0).load(Ordering::Acquire),
                Ordering::Relaxed,
            );
        }
        if g > n {
            return 0;
        }
        if !w.wait_standby_ready(Duration::from_secs(30)) {
            return 3;
        }
        shared.word(0).store(monotonic_ns(), Ordering::Release);
        let _ = sys::process::raise(libc::SIGKILL);
        4
    })
    .context("rfork")?;
    let out = s.wait().context("waiting for the benchmark child")?;
    if out.keeper != sys::process::ExitStatus::Exited(0) || out.gave_up() {
        bail!("{} benchmark child ended badly: {:?}", design.name(), out);
    }
    Ok((1..=n)
        .map(|i| shared.word(i).load(Ordering::Relaxed))
        .collect())
}

/// A small supervisor relaunching `kintsugi __bench-child` with fork+exec.
fn fork_exec(n: usize, mb: u32) -> anyhow::Result<Vec<u64>> {
    let exe = std::env::current_exe().context("cannot find the kintsugi binary")?;
    let mut out = Vec::with_capacity(n);
    let mut death: Option<u64> = None;
    for _ in 0..=n {
        let mut cmd = Command::new(&exe);
        cmd.args(["__bench-child", "--rss-mb", &mb.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(d) = death {
            cmd.env("KINTSUGI_DEATH_NS", d.to_string());
        }
        let mut child = cmd.spawn().context("spawn bench child")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
        child.wait()?;
        let mut it = line.split_whitespace();
        let (lat, d) = (
            it.next().and_then(|x| x.parse::<u64>().ok()),
            it.next().and_then(|x| x.parse().ok()),
        );
        if death.is_some() {
            out.push(lat.context("bench child reported no latency")?);
        }
        death = Some(d.context("bench child reported no death stamp")?);
    }
    Ok(out)
}

/// The exec'd child of the fork+exec baseline.
#[derive(Debug, clap::Args)]
pub struct ChildArgs {
    #[arg(long)]
    rss_mb: u32,
}

pub fn child(a: ChildArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let ballast = touch(a.rss_mb);
    let now = monotonic_ns();
    let lat = std::env::var("KINTSUGI_DEATH_NS")
        .ok()
        .and_then(|d| d.parse::<u64>().ok())
        .map_or(0, |d| now - d);
    let mut out = std::io::stdout().lock();
    let death = monotonic_ns();
    writeln!(out, "{lat} {death}")?;
    out.flush()?;
    drop(ballast);
    let _ = sys::process::raise(libc::SIGKILL);
    Ok(ExitCode::from(4))
}
