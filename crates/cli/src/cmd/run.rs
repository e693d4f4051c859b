//! `kintsugi run`: supervise an external command.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet built")
}
