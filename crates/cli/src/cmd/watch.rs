//! `kintsugi watch`: the kernel-fault monitor in the foreground (`--json` for JSON lines),
//! `--once` for a health table, `--demo` for the demo rung. The work is in the `watch` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use watch::event::{Event, Metrics, write_atomic};
use watch::{Config, Monitor, RunOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Thresholds and actions (TOML; see docs/watch.md). Without it the defaults apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print every event (detection, action, recovery, summary) as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print the current health as a table (or a JSON array with --json) and exit: 0 when
    /// healthy, 1 when a check fails.
    #[arg(long)]
    pub once: bool,
    /// Stop after this many seconds (default: until SIGINT or SIGTERM).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Seconds between live summary lines; 0 turns them off.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub summary_every: u64,
    /// Keep counters of every detection and action in this file (Prometheus text format,
    /// replaced atomically).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Write this monitor's own heartbeat here (overrides `beat_file`), so that a second
    /// `kintsugi watch` can watch this one.
    #[arg(long, value_name = "FILE")]
    pub beat_file: Option<PathBuf>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Run the demo rung: a fork bomb and a frozen heartbeat, detected and acted on (~4 s).
    #[arg(long)]
    pub demo: bool,
}

fn load(args: &Args) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(b) = &args.beat_file {
        cfg.beat_file = Some(b.clone());
    }
    Ok(cfg)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.demo {
        crate::demo::watch::run(&mut |s| println!("{s}"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = load(&args)?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(ExitCode::SUCCESS);
    }
    if args.once {
        return once(&cfg, args.json);
    }
    let stop =
        watch::monitor::stop_on_signals().context("cannot install SIGINT/SIGTERM handlers")?;
    let mut monitor = Monitor::new(cfg).context("cannot start the monitor")?;
    let opts = RunOptions {
        until: args
            .duration
            .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0))),
        summary_every: (args.summary_every > 0).then(|| Duration::from_secs(args.summary_every)),
    };
    let mut metrics = Metrics::default();
    let mut metrics_error = false;
    let json = args.json;
    let metrics_path = args.metrics.clone();
    monitor.run(&stop, &opts, &mut |ev| {
        // Counters first, so a reader that sees an event line also finds it counted.
        let before = metrics.clone();
        metrics.count(ev);
        if let Some(p) = &metrics_path
            && (metrics != before || matches!(ev, Event::Started { .. }))
            && let Err(e) = write_atomic(p, &metrics.to_prometheus())
            && !metrics_error
        {
            metrics_error = true;
            tracing::warn!(path = %p.display(), error = %e, "cannot write the metrics file");
        }
        if json {
            println!("{}", ev.to_json());
        } else {
            println!("{}", human(ev));
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn human(ev: &Event) -> String {
    match ev {
        Event::Started {
            sources, degraded, ..
        } => {
            let mut s = format!("watching: {}", sources.join(", "));
            for d in degraded {
                s.push_str(&format!("\n  degraded: {d}"));
            }
            s
        }
        Event::Detection { detection: d, .. } => {
            format!(
                "DETECT  {:<11} {} [{}]: {}",
                d.fault, d.subject, d.source, d.detail
            )
        }
        Event::Recovered { fault, subject, .. } => format!("RECOVER {fault:<11} {subject}"),
        Event::Action { action: a, .. } => format!(
            "ACTION  {:<11} {} {} -> {}: {}",
            a.action,
            if a.ok { "ok" } else { "FAILED" },
            a.subject,
            a.target,
            a.detail
        ),
        Event::Summary { summary: s, .. } => format!(
            "summary: {} tasks, {} in D, {} hung | {} forks/s | MemAvailable {:.1}% | PSI io {:.2} \
             mem {:.2} | {} detections, {} actions",
            s.tasks,
            s.d_state,
            s.hung,
            s.forks_per_sec,
            s.mem_available_pct,
            s.psi_io_avg10,
            s.psi_memory_avg10,
            s.detections,
            s.actions
        ),
    }
}

fn once(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let rows = watch::health::snapshot(cfg);
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"check": r.check, "ok": r.ok, "detail": r.detail}))
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        println!("{:<18} {:<6} DETAIL", "CHECK", "STATUS");
        for r in &rows {
            println!(
                "{:<18} {:<6} {}",
                r.check,
                if r.ok { "ok" } else { "FAULT" },
                r.detail
            );
        }
    }
    Ok(if rows.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
