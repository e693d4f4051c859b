//! `kintsugi guard [--epoch 50ms] [--images DIR] -- CMD ARGS…` and `kintsugi guard --status`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint interval, e.g. 50ms, 1s.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub epoch: Duration,
    /// Directory for the image layers and status.json.
    #[arg(long, default_value = "kintsugi-images")]
    pub images: PathBuf,
    /// Merge the layer chain into one full layer every N layers (in the background).
    #[arg(long, default_value_t = 16)]
    pub merge_every: u64,
    /// Stop restoring after this many automatic restores.
    #[arg(long, default_value_t = 20)]
    pub max_restores: u32,
    /// Give the program its own network namespace with only loopback (its ports are then not
    /// reachable from the host).
    #[arg(long)]
    pub net: bool,
    /// Print the status of the guard writing --images and exit.
    #[arg(long)]
    pub status: bool,
    /// Print --status as JSON.
    #[arg(long, requires = "status")]
    pub json: bool,
    /// The command and its arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Parses `50ms`, `2s`, `1.5s`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 50ms or 1s"))?;
    if v.is_nan() || v <= 0.0 {
        return Err(format!("{s:?}: the epoch must be positive"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

pub fn options(a: &Args) -> guard::guard::Options {
    guard::guard::Options {
        epoch: a.epoch,
        images: a.images.clone(),
        merge_every: a.merge_every.max(1),
        max_restores: a.max_restores,
        net: a.net,
        forward_signals: true,
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.status {
        let s = guard::guard::read_status(&a.images)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print_status(&s);
        }
        return Ok(ExitCode::from(if s.restorable { 0 } else { 1 }));
    }
    if a.command.is_empty() {
        anyhow::bail!(
            "no command given: use `kintsugi guard [--epoch 50ms] [--images DIR] -- CMD ARGS…`"
        );
    }
    let g = guard::guard::Guard::launch(options(&a), a.command.clone())
        .with_context(|| format!("starting {:?} under the guard", a.command))?;
    let code = g.run().context("guarding")?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn print_status(s: &guard::guard::Status) {
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let g = if alive(s.guard_pid) {
        "running"
    } else {
        "gone (restore with `kintsugi restore DIR`)"
    };
    println!("guard pid      {} ({g})", s.guard_pid);
    println!(
        "program        {:?} (pid {} on the host, 1 in its namespace)",
        s.argv, s.app_pid
    );
    println!("state          {}", s.state);
    println!("epoch          {} ms", s.epoch_ms);
    println!(
        "last layer     {} ({} layers written this run, last {} bytes)",
        s.last_layer, s.layers_written, s.last_layer_bytes
    );
    println!("last pause     {} µs", s.last_pause_us);
    println!(
        "processes      {} (pid 1 and the processes it forked)",
        s.processes
    );
    println!("trapped calls  {}", s.trapped_calls);
    println!("restores       {}", s.restores);
    if s.restorable {
        println!("restorable     yes");
    } else {
        println!("restorable     NO:");
        for r in &s.refusals {
            println!("  - {r}");
        }
    }
}
