//! `kintsugi bench watch`: CPU cost of the event-driven monitor (idle and under each fault)
//! beside a /proc polling scanner at 1/10/100 ms, with ~300 tasks, and detection latency per
//! fault. The measurement is in `watch::bench`.

use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print only the JSON object of the issue.
    #[arg(long)]
    pub json: bool,
    /// Seconds the idle event monitor is measured.
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,
    /// Seconds each polling interval is measured.
    #[arg(long, default_value_t = 5.0)]
    pub poll_secs: f64,
    /// Tasks to have on the machine (sleeping processes are added up to this count).
    #[arg(long, default_value_t = 300)]
    pub tasks: usize,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let opts = watch::bench::Options {
        idle: Duration::from_secs_f64(a.idle_secs.max(1.0)),
        poll: Duration::from_secs_f64(a.poll_secs.max(1.0)),
        target_tasks: a.tasks,
        ..Default::default()
    };
    let report = watch::bench::run(&opts, |p| eprintln!("bench watch: {p}"))?;
    if a.json {
        println!("{}", report.to_json());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "kintsugi bench watch — {} tasks on the machine",
        report.tasks
    );
    println!();
    println!("{:<12} {:<12} {:>9}  note", "mode", "load", "cpu % core");
    for c in &report.cost {
        println!(
            "{:<12} {:<12} {:>9.3}  {}",
            c.mode, c.load, c.cpu_pct, c.note
        );
    }
    println!();
    println!(
        "{:<12} {:>10}  {:<24} action",
        "fault", "latency ms", "detected by"
    );
    for l in &report.latency {
        println!(
            "{:<12} {:>10}  {:<24} {}",
            l.fault,
            l.ms.map(|m| format!("{m:.1}"))
                .unwrap_or_else(|| "MISSED".into()),
            l.source,
            match l.action {
                Some(true) => "ran ok",
                Some(false) => "FAILED",
                None => "-",
            }
        );
    }
    println!();
    println!("{}", report.to_json());
    Ok(ExitCode::SUCCESS)
}
