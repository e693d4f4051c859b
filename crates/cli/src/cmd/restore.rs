//! `kintsugi restore DIR`: rebuild a guarded program from its image (after both it and its
//! guard were killed, or on another machine or kernel) and keep guarding it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image directory written by `kintsugi guard --images DIR`.
    pub dir: PathBuf,
    /// Checkpoint interval after the restore.
    #[arg(long, default_value = "50ms", value_parser = super::guard::parse_duration)]
    pub epoch: Duration,
    /// Merge the layer chain every N layers.
    #[arg(long, default_value_t = 16)]
    pub merge_every: u64,
    /// Stop restoring after this many automatic restores.
    #[arg(long, default_value_t = 20)]
    pub max_restores: u32,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let opts = guard::guard::Options {
        epoch: a.epoch,
        images: a.dir.clone(),
        merge_every: a.merge_every.max(1),
        max_restores: a.max_restores,
        net: false, // taken from the image
        forward_signals: true,
    };
    let g = guard::guard::Guard::from_images(opts)
        .with_context(|| format!("restoring from {}", a.dir.display()))?;
    let code = g.run().context("guarding the restored program")?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
