//! `kintsugi demo`: every rung of the recovery ladder that exists, end to end, in plain words.
//!
//! Each rung is its own module with `pub fn run(out: &mut Narrator) -> anyhow::Result<()>`;
//! the demo runs them in ladder order and stops at the first failure.

use std::process::ExitCode;

pub mod watch;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_a: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet built")
}
