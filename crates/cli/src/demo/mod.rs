//! `kintsugi demo`: every rung of the recovery ladder that exists, end to end, in plain words.
//!
//! The ladder is contain → roll back → restart → restore → migrate; detection (watch) feeds
//! it. Each rung is its own module with `pub fn run(say: &mut dyn FnMut(&str)) ->
//! anyhow::Result<()>`: it sets up a real fault, lets the mechanism recover, checks the result,
//! and narrates. The demo runs them in ladder order, stops at the first failure, and exits
//! non-zero if any rung failed.

use std::process::ExitCode;
use std::time::Instant;

pub mod contain;
pub mod fs;
pub mod guard;
pub mod rfork;
pub mod watch;

#[derive(Debug, clap::Args)]
pub struct Args {}

type Rung = fn(&mut dyn FnMut(&str)) -> anyhow::Result<()>;

/// In ladder order: (name, what it shows, entry point).
const RUNGS: &[(&str, &str, Rung)] = &[
    (
        "contain",
        "a fault in one client's request context is contained to it; a global one escalates",
        contain::run,
    ),
    (
        "roll back",
        "a file-system module crashes mid-request; the host rolls back, restarts it, keeps every byte",
        fs::run,
    ),
    (
        "restart",
        "rfork and kintsugi run bring crashed processes back",
        rfork::run,
    ),
    (
        "restore",
        "a guarded program is SIGKILLed; the guard rebuilds it from its checkpoint by syscall replay",
        guard::run,
    ),
    (
        "detect",
        "kintsugi watch sees kernel trouble from outside and acts",
        watch::run,
    ),
];

pub fn run(_a: Args) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let mut say = |line: &str| println!("{:>6.2}s  {line}", t0.elapsed().as_secs_f64());
    println!("kintsugi demo: the recovery ladder, rung by rung, with real faults.\n");
    let mut passed = Vec::new();
    for &(name, what, rung) in RUNGS {
        let t = Instant::now();
        if let Err(e) = rung(&mut say) {
            println!("\nFAILED at rung '{name}' ({what}): {e:#}");
            return Ok(ExitCode::FAILURE);
        }
        say(&format!(
            "rung '{name}' passed in {:.1}s\n",
            t.elapsed().as_secs_f64()
        ));
        passed.push(name);
    }
    println!("all {} rungs passed: {}", passed.len(), passed.join(" → "));
    Ok(ExitCode::SUCCESS)
}
