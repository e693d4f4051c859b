//! `kintsugi bench …`: benchmarks that print a human table, or exactly the JSON
//! object with `--json`. Each measures its baselines in the same run, so ratios are fair.

use std::process::ExitCode;

pub mod deadlock;
pub mod fs;
pub mod guard;
pub mod inject;
pub mod rfork;
pub mod run;
pub mod stats;
pub mod watch;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Deadlock detection at level 4: detection latency per checker interval, checker cost.
    Deadlock(deadlock::Args),
    /// File-system modules: copy64k and compile on tmpfs, plain fuser, and SMFS and SNFS at
    /// every level (all mounted at once, the work interleaved).
    Fs(fs::Args),
    /// Fault-injection campaign: compiled-in fault sites fired under a multi-client workload,
    /// with containment, restart-only and no recovery side by side.
    Inject(inject::Args),
    /// The guard: syscall overhead, checkpoint pause and layer size, restore time.
    Guard(guard::Args),
    /// rfork restart latency, both designs, beside bare fork and fork+exec.
    Rfork(rfork::Args),
    /// `kintsugi run` restart latency against runit's runsv and daemontools' supervise.
    Run(run::Args),
    /// kintsugi watch: monitor CPU cost beside /proc polling, and detection latency per fault.
    Watch(watch::Args),
}

pub fn run(b: Bench) -> anyhow::Result<ExitCode> {
    match b {
        Bench::Deadlock(a) => deadlock::run(a),
        Bench::Fs(a) => fs::run(a),
        Bench::Guard(a) => guard::run(a),
        Bench::Inject(a) => inject::run(a),
        Bench::Rfork(a) => rfork::run(a),
        Bench::Run(a) => run::run(a),
        Bench::Watch(a) => watch::run(a),
    }
}
