//! `kintsugi fsck`: check a live file system's structure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Check a mounted kintsugi file system: the module's whole on-store structure (superblock,
/// inodes, block pointers, directories, link counts, free counts) and the host's own data
/// (store header, lock table), with every request context quiesced. Exit 0 when clean, 1 with
/// the problems listed otherwise.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print {"clean": bool, "problems": [...]} instead of text.
    #[arg(long)]
    pub json: bool,
    pub mountpoint: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let problems = fshost::mount::fsck(&a.mountpoint)
        .with_context(|| format!("fsck {}", a.mountpoint.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "clean": problems.is_empty(), "problems": problems })
        );
    } else if problems.is_empty() {
        println!("{}: clean", a.mountpoint.display());
    } else {
        for p in &problems {
            println!("{}: {p}", a.mountpoint.display());
        }
        println!("{}: {} problem(s)", a.mountpoint.display(), problems.len());
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
