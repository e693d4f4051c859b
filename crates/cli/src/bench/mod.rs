//! `kintsugi bench …`: benchmarks that print a human table, or exactly the JSON
//! object with `--json`. Each measures its baselines in the same run, so ratios are fair.

use std::process::ExitCode;

pub mod rfork;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// rfork restart latency, both designs, beside bare fork and fork+exec.
    Rfork(rfork::Args),
}

pub fn run(b: Bench) -> anyhow::Result<ExitCode> {
    match b {
        Bench::Rfork(a) => rfork::run(a),
    }
}
