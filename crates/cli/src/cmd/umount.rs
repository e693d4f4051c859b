//! `kintsugi umount`: unmount a kintsugi file system and wait for its host to exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Unmount a file system mounted with `kintsugi mount`.
#[derive(Debug, clap::Args)]
pub struct Args {
    pub mountpoint: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    fshost::mount::umount(&a.mountpoint)
        .with_context(|| format!("umount {}", a.mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}
