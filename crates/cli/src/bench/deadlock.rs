//! `kintsugi bench deadlock`: deadlock detection on a level-4 SMFS mount (paper 001).
//!
//! - latency: per checker interval, the `fs_deadlock` workload (SMFS fault site 69 armed: one
//!   thread links `a/f` into `bJ/nI` and unlinks it, two `stat` expired hard links `bJ/gK`) runs
//!   for `--seconds`; the status gives the mean time from a cycle's completion to its
//!   detection and from detection to the victim rolled back;
//! - cost: copy64k (a 64 KiB copy in 8 KiB blocks) with detection off and on, pinned to one
//!   CPU with the mounts, median and p99 per copy.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checker intervals (ms) to measure detection latency at.
    #[arg(long, value_delimiter = ',', default_value = "5,20,50,100")]
    pub intervals: Vec<u64>,
    /// Seconds of deadlocking workload per interval.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// 64 KiB copies per configuration for the checker's cost.
    #[arg(long, default_value_t = 2000)]
    pub copy_reps: usize,
    /// Print the JSON object only.
    #[arg(long)]
    pub json: bool,
}

/// A level-4 SMFS mount made by this binary; unmounted on drop.
struct Mounted {
    exe: PathBuf,
    dir: PathBuf,
}

impl Mounted {
    fn new(exe: &Path, tag: &str, interval_ms: u64) -> anyhow::Result<Mounted> {
        let dir = std::env::temp_dir().join(format!(
            "kintsugi-bench-dl-{}-{tag}-{interval_ms}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let out = Command::new(exe)
            .args([
                "mount", "--module", "smfs", "--level", "4", "--size", "256M",
            ])
            .args(["--deadlock-interval-ms", &interval_ms.to_string()])
            .arg(&dir)
            .output()
            .context("running kintsugi mount")?;
        if !out.status.success() {
            bail!("mount: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Mounted {
            exe: exe.to_path_buf(),
            dir,
        })
    }

    fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(fshost::mount::status(&self.dir)?)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = fshost::mount::arm_site(&self.dir, 0, 0, 0);
        let ok = Command::new(&self.exe)
            .arg("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

const DIRS: usize = 12;
const NAMES: usize = 200;

/// Runs the deadlocking workload for `secs` on `m`; returns the status afterwards.
fn latency(m: &Mounted, secs: u64) -> anyhow::Result<serde_json::Value> {
    let d = &m.dir;
    std::fs::create_dir(d.join("a"))?;
    std::fs::write(d.join("a/f"), b"x")?;
    for j in 0..DIRS {
        std::fs::create_dir(d.join(format!("b{j}")))?;
        for k in 0..NAMES {
            std::fs::hard_link(d.join("a/f"), d.join(format!("b{j}/g{k}")))?;
        }
    }
    fshost::mount::arm_site(d, 69, 0, 0)?;
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let (stop, d) = (stop.clone(), d.clone());
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    if w == 0 {
                        let n = d.join(format!("b{}/n{i}", i % DIRS));
                        std::fs::hard_link(d.join("a/f"), &n)?;
                        std::fs::remove_file(&n)?;
                    } else {
                        let k = 2 * i + w - 1;
                        std::fs::metadata(d.join(format!(
                            "b{}/g{}",
                            (k / NAMES) % DIRS,
                            k % NAMES
                        )))?;
                    }
                    i += 1;
                }
                Ok(i as u64)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))?
            .context("workload request failed")?;
    }
    fshost::mount::arm_site(d, 0, 0, 0)?;
    m.status()
}

fn copy_once(src: &Path, dst: &Path) -> std::io::Result<f64> {
    let t = Instant::now();
    let mut i = std::fs::File::open(src)?;
    let mut o = std::fs::File::create(dst)?;
    let mut buf = [0u8; 8192];
    loop {
        let n = i.read(&mut buf)?;
        if n == 0 {
            break;
        }
        o.write_all(&buf[..n])?;
    }
    drop(o);
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// copy64k on `m`: (median, p99) µs.
fn copy64k(m: &Mounted, reps: usize) -> anyhow::Result<(f64, f64)> {
    let src = m.dir.join("copy-src");
    let data: Vec<u8> = (0..64 << 10).map(|i: usize| (i * 31 % 251) as u8).collect();
    std::fs::write(&src, &data)?;
    let dst = m.dir.join("copy-dst");
    for _ in 0..reps / 20 + 1 {
        copy_once(&src, &dst)?;
    }
    let mut v = (0..reps)
        .map(|_| copy_once(&src, &dst))
        .collect::<std::io::Result<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok((v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)]))
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the kintsugi binary")?;
    let mut lat = Vec::new();
    for &iv in a.intervals.iter().filter(|&&iv| iv > 0) {
        if !a.json {
            eprintln!("bench deadlock: latency at a {iv} ms interval …");
        }
        let m = Mounted::new(&exe, "lat", iv)?;
        let s = latency(&m, a.seconds.max(1))?;
        let g = |k: &str| s[k].as_u64().unwrap_or(0);
        lat.push(serde_json::json!({
            "interval_ms": iv,
            "deadlocks_detected": g("deadlocks_detected"),
            "deadlocks_broken": g("deadlocks_broken"),
            "mean_detect_us": g("mean_deadlock_detect_us"),
            "mean_break_us": g("mean_deadlock_break_us"),
            "timeouts": g("deadlock_timeouts"),
            "module_failures": g("module_failures"),
            "eio": g("eio"),
        }));
    }
    // Pinned to CPU 0 (inherited by the mount daemons and module contexts), as `bench fs`.
    let mut set = rustix::thread::CpuSet::new();
    set.set(0);
    rustix::thread::sched_setaffinity(None, &set).context("pinning to CPU 0")?;
    let mut cost = Vec::new();
    for iv in [0u64, 50, 5] {
        if !a.json {
            eprintln!("bench deadlock: copy64k with a {iv} ms interval …");
        }
        let m = Mounted::new(&exe, "cost", iv)?;
        let (median, p99) = copy64k(&m, a.copy_reps.max(1))?;
        cost.push(serde_json::json!({
            "interval_ms": iv,
            "copy64k_median_us": (median * 10.0).round() / 10.0,
            "copy64k_p99_us": (p99 * 10.0).round() / 10.0,
        }));
    }
    let j = serde_json::json!({ "bench": "deadlock", "latency": lat, "cost": cost });
    if a.json {
        println!("{j}");
    } else {
        println!(
            "{:>11} {:>9} {:>9} {:>15} {:>14}",
            "interval_ms", "detected", "broken", "mean_detect_us", "mean_break_us"
        );
        // serde_json values ignore width: print them as numbers.
        let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        for r in &lat {
            println!(
                "{:>11} {:>9} {:>9} {:>15} {:>14}",
                u(&r["interval_ms"]),
                u(&r["deadlocks_detected"]),
                u(&r["deadlocks_broken"]),
                u(&r["mean_detect_us"]),
                u(&r["mean_break_us"])
            );
        }
        println!(
            "\n{:>11} {:>18} {:>15}",
            "interval_ms", "copy64k_median_us", "copy64k_p99_us"
        );
        for r in &cost {
            println!(
                "{:>11} {:>18.1} {:>15.1}",
                u(&r["interval_ms"]),
                f(&r["copy64k_median_us"]),
                f(&r["copy64k_p99_us"])
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
