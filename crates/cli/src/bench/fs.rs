//! `kintsugi bench fs`: copy64k and compile on tmpfs, the plain-fuser baseline, SMFS at every
//! level, and SNFS at every level beside its bare-client baseline, all mounted at once with the
//! timed work interleaved. The work is in `fshost::bench`; this prints it.

use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// 64 KiB copies per file system.
    #[arg(long, default_value_t = 2000)]
    pub copy_reps: usize,
    /// Full builds (5 compiles + link) per file system.
    #[arg(long, default_value_t = 5)]
    pub compile_reps: usize,
    /// Level-4 module crashes (SIGKILL during a write) to time recovery on, human output only.
    #[arg(long, default_value_t = 20)]
    pub crashes: usize,
    /// Pin the benchmark and the file systems it mounts to this CPU ("none": let the scheduler
    /// place them; numbers then vary run to run on a 2-vCPU VM).
    #[arg(long, default_value = "0")]
    pub cpu: String,
    /// Run only these file systems (comma-separated `fs` names: tmpfs, fuser_plain, smfs,
    /// smfs_restart_only, snfs_plain, snfs, snfs_restart_only).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print the JSON object only.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the kintsugi binary to mount with")?;
    let cpu = match a.cpu.as_str() {
        "none" => None,
        c => Some(
            c.parse::<usize>()
                .context("--cpu takes a CPU number or \"none\"")?,
        ),
    };
    if let Some(bad) = a
        .only
        .iter()
        .find(|o| !fshost::bench::SYSTEMS.iter().any(|(fs, _)| fs == o))
    {
        let mut names: Vec<&str> = Vec::new();
        for (fs, _) in fshost::bench::SYSTEMS {
            if !names.contains(&fs) {
                names.push(fs);
            }
        }
        anyhow::bail!(
            "--only: unknown file system {bad:?}; the file systems are {}",
            names.join(", ")
        );
    }
    let opts = fshost::bench::Opts {
        cpu,
        copy_reps: a.copy_reps.max(1),
        compile_reps: a.compile_reps.max(1),
        exe,
        only: a.only,
    };
    let json = a.json;
    let crashes = if json { 0 } else { a.crashes };
    let (rows, extras) = fshost::bench::run_with_recovery(&opts, crashes, |what| {
        if !json {
            eprintln!("bench fs: {what} …");
        }
    })
    .context("bench fs")?;
    if json {
        println!("{}", serde_json::json!({ "bench": "fs", "results": rows }));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18} {:>5} {:<8} {:>12} {:>12} {:>9}",
        "fs", "level", "workload", "median_us", "p99_us", "vs L5"
    );
    for r in &rows {
        println!(
            "{:<18} {:>5} {:<8} {:>12.1} {:>12.1} {:>9}",
            r.fs,
            r.level.map_or("-".into(), |l| l.to_string()),
            r.workload,
            r.median_us,
            r.p99_us,
            r.ratio_to_level5.map_or("-".into(), |x| format!("{x:.2}x"))
        );
    }
    println!(
        "\nper technique (each level adds one to the level below it; \"vs L5\" is the module's own level 5):"
    );
    for c in fshost::bench::technique_costs(&rows) {
        println!(
            "  {:<5} {:<8} {:>+10.1} us  {:>+7.1}% of L5   {}",
            c.module,
            c.workload,
            c.extra_us,
            c.of_level5 * 100.0,
            c.technique
        );
    }
    println!();
    for m in fshost::bench::MODULES {
        for w in ["copy64k", "compile"] {
            if let Some(r) = rows
                .iter()
                .find(|r| r.fs == m && r.level == Some(1) && r.workload == w)
            {
                println!(
                    "paper's comparison, {m} {w}: L1/L5 = {}",
                    r.ratio_to_level5.map_or("-".into(), |x| format!("{x:.2}x"))
                );
            }
        }
    }
    println!(
        "\nper request: a request that does nothing (close(dup(fd)), one FLUSH), median; what a level adds to it is the module boundary:"
    );
    for (fs, level, us) in &extras.null_request {
        println!(
            "  {:<18} {:>5} {:>8.1} us",
            fs,
            level.map_or("-".into(), |l| l.to_string()),
            us
        );
    }
    if let Some(r) = extras.recovery {
        println!(
            "level-4 recovery (module SIGKILLed mid-write -> rolled back -> restarted -> write answered): median {:.0} us, p99 {:.0} us over {} crashes",
            r.median_us, r.p99_us, r.crashes
        );
    }
    Ok(ExitCode::SUCCESS)
}
