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
        #[arg(value_parser = ["panic", "segv", "kill", "hang", "scribble"])]
        fault: String,
        /// Fire during the next such request instead of now.
        #[arg(long, value_parser = [
            "write", "rename", "readdir", "create", "unlink", "mkdir", "setattr", "read", "lookup", "any"
        ])]
        during: Option<String>,
    },
    /// Arm a compiled-in fault site of the module (level 4; `kintsugi fsctl M sites` lists
    /// them): it fires in every request of client PID (default: any client). 0 disarms.
    ArmSite {
        site: u32,
        #[arg(long, default_value_t = 0)]
        pid: u32,
        /// Seed for raw memory faults (which bit, which pointer).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List the module's fault sites (id, G-SWIFT kind, where).
    Sites {
        /// The module (the mount's module; smfs by default).
        #[arg(long, default_value = "smfs")]
        module: String,
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
        Action::ArmSite { site, pid, seed } => {
            fshost::mount::arm_site(mp, site, pid, seed)
                .with_context(|| format!("fsctl {} arm-site {site}", mp.display()))?;
        }
        Action::Sites { module } => {
            let sites = crate::cmd::mount::sites(&module)
                .with_context(|| format!("unknown module {module:?}: use smfs or snfs"))?;
            for s in sites {
                println!("{:>4}  {:<20} {}", s.id, s.kind.name(), s.what);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
