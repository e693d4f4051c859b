//! `kintsugi bench guard`: (a) the ShadowBuddy syscall microbenchmark (getpid, open+close,
//! read, write, natively and under the guard); (b) checkpoint pause and layer size per epoch
//! for 10 MB, 100 MB and 1 GB of RSS at several dirty rates; (c) restore time for the same
//! sizes. The guarded program is this binary re-executed as `kintsugi __guard-bench-child`.
//!
//! Syscalls: a native and a guarded copy of the workload run side by side, pinned to the same
//! CPU, and take turns batch by batch (40 batches per kind each, after a warm-up batch); each
//! side's fastest batch's mean per call is reported. Only the two programs are pinned: the
//! guard's own threads float, as they do in real use.
//!
//! Pause = from PTRACE_SEIZE to PTRACE_DETACH of one epoch (the program is stopped for that
//! long); p50/p99 are over the incremental epochs (the first, full capture is reported apart
//! in the human table). Restore = load the layer chain from disk + rebuild a process by
//! syscall replay, until it runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Iterations per syscall kind (the paper uses 1,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    pub calls: u64,
    /// RSS sizes in MB.
    #[arg(long, value_delimiter = ',', default_values_t = [10u64, 100, 1024])]
    pub sizes: Vec<u64>,
    /// Dirty rates in MB/s.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 10, 100])]
    pub rates: Vec<u64>,
    /// Seconds of checkpointing per (size, rate).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Checkpoint interval in ms.
    #[arg(long, default_value_t = 50)]
    pub epoch_ms: u64,
    /// Directory for images (default: a fresh one under /var/tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// CPU both sides of the syscall microbenchmark are pinned to (default: the last CPU this
    /// process may use).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Print the JSON object only.
    #[arg(long)]
    pub json: bool,
}

/// `kintsugi __guard-bench-child …`: the guarded workload.
#[derive(Debug, clap::Args)]
pub struct ChildArgs {
    /// "syscalls CPU|-" (then "CALL N" lines on stdin), "dirty RSS_MB RATE_MB_S READY_FILE" or "counter N FILE".
    #[arg(trailing_var_arg = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Syscall {
    call: &'static str,
    native_ns: f64,
    guarded_ns: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Checkpoint {
    rss_mb: u64,
    dirty_mb_per_s: u64,
    pause_ms_p50: f64,
    pause_ms_p99: f64,
    layer_mb: f64,
}

#[derive(Debug, Serialize)]
struct Restore {
    rss_mb: u64,
    ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    syscalls: Vec<Syscall>,
    checkpoint: Vec<Checkpoint>,
    restore: Vec<Restore>,
}

const CALLS: [&str; 4] = ["getpid", "open_close", "read", "write"];

/// The workload side.
pub fn child(a: ChildArgs) -> anyhow::Result<ExitCode> {
    match a.args.first().map(String::as_str) {
        Some("syscalls") => {
            // Serves batches on request, so the bench can alternate native and guarded batches
            // side by side: reads "CALL N" lines from stdin, runs N calls, answers the mean ns
            // per call on stdout; ends at EOF. Pinned to CPU (or "-": not pinned) first.
            if let Some(cpu) = a.args.get(1).and_then(|c| c.parse::<usize>().ok()) {
                pin_to(cpu)?;
            }
            let mut zero = std::fs::File::open("/dev/zero")?;
            let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
            let mut out = std::io::stdout().lock();
            for line in std::io::stdin().lines() {
                let line = line?;
                let (call, n) = line.split_once(' ').context("CALL N")?;
                let n: u64 = n.trim().parse()?;
                let t = batch(call, n, &mut zero, &mut null)?;
                writeln!(out, "{:.3}", t.as_nanos() as f64 / n.max(1) as f64)?;
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Some("dirty") => {
            let rss: usize = a.args.get(1).context("rss")?.parse()?;
            let rate: usize = a.args.get(2).context("rate")?.parse()?;
            let ready = a.args.get(3).context("ready file")?;
            let mut mem = vec![1u8; rss << 20];
            std::fs::write(ready, b"ready")?;
            // Every 10 ms, dirty rate/100 MB worth of pages, walking through the buffer.
            let pages = mem.len() / 4096;
            let per_tick = ((rate << 20) / 4096 / 100).max(1);
            let mut at = 0usize;
            let mut v = 0u8;
            loop {
                v = v.wrapping_add(1);
                for _ in 0..per_tick {
                    mem[at * 4096] = v;
                    at = (at + 1) % pages;
                }
                std::hint::black_box(&mem);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Some("counter") => {
            // The demo's program: a counter in heap memory, appended to a log file every 20 ms.
            let n: u64 = a.args.get(1).context("counter N FILE")?.parse()?;
            let path = a.args.get(2).context("counter N FILE")?;
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            let mut count = Box::new(0u64);
            while *count < n {
                writeln!(log, "{}", *count)?;
                *count += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!(
            "usage: __guard-bench-child syscalls CPU|- | dirty RSS_MB RATE READY_FILE | counter N FILE"
        ),
    }
}

/// Runs `n` calls of one kind and times them. One loop per kind, so the loop holds nothing
/// but the call.
fn batch(
    call: &str,
    n: u64,
    zero: &mut std::fs::File,
    null: &mut std::fs::File,
) -> anyhow::Result<Duration> {
    let mut buf = [0u8; 1];
    let t0 = Instant::now();
    match call {
        // std::process::id() is getpid(2): glibc does not cache it.
        "getpid" => (0..n).for_each(|_| {
            std::hint::black_box(std::process::id());
        }),
        "open_close" => {
            for _ in 0..n {
                drop(std::hint::black_box(std::fs::File::open("/dev/null")?));
            }
        }
        "read" => {
            for _ in 0..n {
                std::io::Read::read(zero, &mut buf)?;
            }
        }
        "write" => {
            for _ in 0..n {
                null.write_all(&buf)?;
            }
        }
        _ => bail!("unknown call {call}"),
    }
    Ok(t0.elapsed())
}

/// Pins the calling process (and what it starts afterwards) to one CPU.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// One side of the syscall microbenchmark: a `__guard-bench-child syscalls` serving batches.
struct Side {
    child: std::process::Child,
    tx: Option<std::process::ChildStdin>,
    rx: std::io::BufReader<std::process::ChildStdout>,
}

impl Side {
    fn spawn(mut cmd: Command) -> anyhow::Result<Side> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let tx = child.stdin.take();
        let rx = std::io::BufReader::new(child.stdout.take().context("child stdout")?);
        Ok(Side { child, tx, rx })
    }

    /// Mean ns per call of one batch of `n` calls.
    fn batch(&mut self, call: &str, n: u64) -> anyhow::Result<f64> {
        let tx = self.tx.as_mut().context("side closed")?;
        writeln!(tx, "{call} {n}")?;
        tx.flush()?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.rx, &mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("batch answer {line:?}"))
    }

    fn finish(mut self, what: &str) -> anyhow::Result<()> {
        drop(self.tx.take());
        let st = self.child.wait()?;
        if !st.success() {
            bail!("{what} syscall run failed (exit {:?})", st.code());
        }
        Ok(())
    }
}

/// The CPU both sides of the syscall microbenchmark run on: the last one this process may
/// use (CPU 0 takes most interrupts).
fn bench_cpu(a: &Args) -> anyhow::Result<usize> {
    if let Some(c) = a.cpu {
        return Ok(c);
    }
    let set = rustix::thread::sched_getaffinity(None).context("sched_getaffinity")?;
    (0..rustix::thread::CpuSet::MAX_CPU)
        .rev()
        .find(|&c| set.is_set(c))
        .context("no CPU in this process's affinity mask")
}

/// The syscall microbenchmark, native and guarded side by side: both programs run at once
/// (each blocked between batches), pinned to the same CPU, and take turns batch by batch
/// (native first in even rounds, guarded first in odd ones), so load from elsewhere on the
/// machine and frequency drift fall on both alike. Each side's fastest batch is reported.
fn syscalls(a: &Args, exe: &Path, base: &Path) -> anyhow::Result<Vec<Syscall>> {
    let cpu = bench_cpu(a)?.to_string();
    let mut native = Command::new(exe);
    native.args(["__guard-bench-child", "syscalls", &cpu]);
    let mut native = Side::spawn(native)?;
    let imgs = base.join("syscalls");
    let mut guarded = Command::new(exe);
    guarded
        .args(["guard", "--epoch", "1s", "--images"])
        .arg(&imgs)
        .args(["--"])
        .arg(exe)
        .args(["__guard-bench-child", "syscalls", &cpu]);
    let mut guarded = Side::spawn(guarded)?;
    let batches = BATCHES;
    let per = (a.calls / batches).max(1);
    let mut out = Vec::new();
    for call in CALLS {
        // Warm-up, not counted: first touches, lazily built kernel state.
        native.batch(call, (per / 10).max(1))?;
        guarded.batch(call, (per / 10).max(1))?;
        let (mut nv, mut gv) = (f64::MAX, f64::MAX);
        for b in 0..batches {
            if b % 2 == 0 {
                nv = nv.min(native.batch(call, per)?);
                gv = gv.min(guarded.batch(call, per)?);
            } else {
                gv = gv.min(guarded.batch(call, per)?);
                nv = nv.min(native.batch(call, per)?);
            }
        }
        out.push(Syscall {
            call,
            native_ns: round1(nv),
            guarded_ns: round1(gv),
            ratio: round2(gv / nv),
        });
    }
    native.finish("native")?;
    guarded.finish("guarded")?;
    Ok(out)
}

/// Batches per syscall kind and side. Many short batches (25,000 getpid calls ≈ 3 ms, about a
/// time slice) rather than a few long ones: the fastest of them is then one nothing else on
/// this 2-CPU machine interrupted, for both sides alike.
const BATCHES: u64 = 40;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let base = a.dir.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "/var/tmp/kintsugi-bench-guard-{}",
            std::process::id()
        ))
    });
    std::fs::create_dir_all(&base)?;
    let result = measure(&a, &exe, &base);
    let _ = std::fs::remove_dir_all(&base);
    let report = result?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(a: &Args, exe: &Path, base: &Path) -> anyhow::Result<Report> {
    let syscalls = syscalls(a, exe, base)?;

    let mut checkpoint = Vec::new();
    let mut restore = Vec::new();
    for &rss in &a.sizes {
        for (ri, &rate) in a.rates.iter().enumerate() {
            let dir = base.join(format!("ckpt-{rss}-{rate}"));
            let ready = base.join(format!("ready-{rss}-{rate}"));
            let _ = std::fs::remove_file(&ready);
            let opts = guard::guard::Options {
                epoch: Duration::from_millis(a.epoch_ms),
                images: dir.clone(),
                merge_every: u64::MAX,
                max_restores: 0,
                net: false,
                forward_signals: false,
            };
            let argv = vec![
                exe.to_string_lossy().into_owned(),
                "__guard-bench-child".into(),
                "dirty".into(),
                rss.to_string(),
                rate.to_string(),
                ready.to_string_lossy().into_owned(),
            ];
            let mut g = guard::guard::Guard::launch(opts, argv)?;
            let pid = g.app_pid();
            let t0 = Instant::now();
            while !ready.exists() {
                if t0.elapsed() > Duration::from_secs(60) {
                    let _ = sys::process::kill(pid, libc::SIGKILL);
                    bail!("the {rss} MB workload did not get ready");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let epoch = Duration::from_millis(a.epoch_ms);
            // The first epoch captures everything (and writes it); the clock for the
            // incremental epochs starts after it, and there are at least 10 of them.
            let mut recs = vec![g.epoch()?];
            let want = ((a.seconds * 1000.0) as u64 / a.epoch_ms.max(1)).max(10) as usize;
            let mut next = Instant::now() + epoch;
            while recs.len() <= want {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next += epoch;
                recs.push(g.epoch()?);
            }
            let _ = sys::process::kill(pid, libc::SIGKILL);
            let _ = sys::process::wait_pid(pid);
            drop(g);
            let inc: Vec<_> = recs.iter().skip(1).collect();
            let mut pauses: Vec<f64> = inc.iter().map(|r| r.pause.as_secs_f64() * 1e3).collect();
            pauses.sort_by(f64::total_cmp);
            let layer_mb = inc.iter().map(|r| r.layer_bytes as f64).sum::<f64>()
                / inc.len().max(1) as f64
                / 1048576.0;
            if !a.json {
                eprintln!(
                    "  {rss} MB @ {rate} MB/s: first (full) capture paused {:.1} ms, {} epochs",
                    recs[0].pause.as_secs_f64() * 1e3,
                    recs.len()
                );
            }
            checkpoint.push(Checkpoint {
                rss_mb: rss,
                dirty_mb_per_s: rate,
                pause_ms_p50: round3(pct(&pauses, 0.5)),
                pause_ms_p99: round3(pct(&pauses, 0.99)),
                layer_mb: round3(layer_mb),
            });
            if ri == 0 {
                // Restore time: chain from disk → running process.
                let t = Instant::now();
                let r = guard::guard::restore_detached(&dir)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let _ = sys::process::kill(r.inc.pid, libc::SIGKILL);
                let _ = sys::process::wait_pid(r.inc.pid);
                restore.push(Restore {
                    rss_mb: rss,
                    ms: round1(ms),
                });
            }
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&ready);
        }
    }
    Ok(Report {
        bench: "guard",
        syscalls,
        checkpoint,
        restore,
    })
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}
fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn print_table(r: &Report) {
    println!("syscall microbenchmark (ns per call; paper: 7-52x when protected)");
    println!(
        "{:<12} {:>10} {:>12} {:>8}",
        "call", "native", "guarded", "ratio"
    );
    for s in &r.syscalls {
        println!(
            "{:<12} {:>10.1} {:>12.1} {:>7.2}x",
            s.call, s.native_ns, s.guarded_ns, s.ratio
        );
    }
    println!();
    println!("checkpoint per epoch (incremental epochs)");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10}",
        "rss MB", "dirty MB/s", "p50 ms", "p99 ms", "layer MB"
    );
    for c in &r.checkpoint {
        println!(
            "{:>8} {:>10} {:>10.3} {:>10.3} {:>10.3}",
            c.rss_mb, c.dirty_mb_per_s, c.pause_ms_p50, c.pause_ms_p99, c.layer_mb
        );
    }
    println!();
    println!("restore (image on disk -> running process)");
    println!("{:>8} {:>10}", "rss MB", "ms");
    for x in &r.restore {
        println!("{:>8} {:>10.1}", x.rss_mb, x.ms);
    }
}
