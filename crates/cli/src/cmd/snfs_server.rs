//! `kintsugi snfs-server`: export a directory to SNFS clients; and `__snfs-plain`, the bare
//! fuser client used as the SNFS benchmark baseline.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

/// Serve a directory to SNFS clients over TCP, one thread per connection, until SIGTERM or
/// SIGINT. Prints `snfs-server listening on ADDR` once bound.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 10.7.0.1:7049 or 127.0.0.1:0 (any free port; the line on
    /// stdout names it).
    #[arg(long)]
    pub listen: String,
    /// The directory to export (one file system: crossing a mount point answers EXDEV).
    #[arg(long)]
    pub export: PathBuf,
}

/// Calls `on_signal` on a thread of its own at the first SIGTERM or SIGINT.
fn on_stop_signal(on_signal: impl FnOnce(i32) + Send + 'static) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("cannot install SIGTERM/SIGINT handlers")?;
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                on_signal(sig);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut export = snfs::server::Export::new(&a.export)?;
    export
        .enter()
        .with_context(|| format!("cannot enter the export {}", a.export.display()))?;
    let export = Arc::new(export);
    let listener = TcpListener::bind(&a.listen).with_context(|| {
        format!(
            "cannot listen on {}: give a free HOST:PORT this host owns",
            a.listen
        )
    })?;
    let addr = listener.local_addr().context("listening address")?;
    on_stop_signal(move |sig| {
        tracing::info!(signal = sig, "snfs-server stopping");
        // Connections are threads with nothing buffered across calls: a reply is written
        // before the next request is read, so ending here loses no acknowledged work.
        std::process::exit(0);
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "snfs-server listening on {addr}")?;
    out.flush()?;
    drop(out);
    tracing::info!(%addr, export = %a.export.display(), "snfs-server serving");
    snfs::server::serve(export, listener).context("accepting connections")?;
    Ok(ExitCode::SUCCESS)
}

/// The SNFS benchmark baseline: mount the bare fuser client in the foreground.
#[derive(Debug, clap::Args)]
pub struct PlainArgs {
    /// The SNFS server, HOST:PORT.
    #[arg(long)]
    pub server: String,
    /// Where to mount (an existing directory); unmount it (or SIGTERM) to stop.
    pub mountpoint: PathBuf,
}

pub fn plain(a: PlainArgs) -> anyhow::Result<ExitCode> {
    let mp = a.mountpoint.clone();
    on_stop_signal(move |_| {
        // Unmounting ends the session loop below; a lazy unmount if something holds it.
        if rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::empty()).is_err() {
            let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
        }
    })?;
    crate::snfs_plain::serve(&a.server, &a.mountpoint)
        .with_context(|| format!("snfs-plain on {}", a.mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}
