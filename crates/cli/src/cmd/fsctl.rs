//! `kintsugi fsctl`: look at and crash a live file-system module.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Control a mounted kintsugi file system.
#[derive(Debug, clap::Args)]
pub struct Args {
    pub mountpoint: PathBuf,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Print the host's counters (module pid, restarts, rollbacks, …) as JSON.
    Status,
    /// Crash the module: now (idle), or during the next request of a kind.
    InjectFault {
        #[arg(value_parser = ["panic", "segv", "kill", "hang"])]
        fault: String,
        /// Fire during the next such request instead of now.
        #[arg(long, value_parser = [
            "write", "rename", "readdir", "create", "unlink", "mkdir", "setattr", "read", "lookup", "any"
        ])]
        during: Option<String>,
    },
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mp = &a.mountpoint;
    match a.action {
        Action::Status => {
            let s = fshost::mount::status(mp).with_context(|| format!("fsctl {}", mp.display()))?;
            println!("{s}");
        }
        Action::InjectFault { fault, during } => {
            let f = fshost::pm::Fault::parse(&fault).context("unknown fault")?;
            let class = during.as_deref().and_then(fshost::wire::OpClass::parse);
            fshost::mount::inject(mp, f, class)
                .with_context(|| format!("fsctl {} inject-fault {fault}", mp.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
