//! `kintsugi notify`: send sd_notify messages to `$NOTIFY_SOCKET`, like `systemd-notify`, so a
//! shell script supervised by `kintsugi run --watchdog` (or by systemd) can send heartbeats.

use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;

use anyhow::{Context, bail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Send READY=1.
    #[arg(long)]
    pub ready: bool,
    /// Send WATCHDOG=1 (a heartbeat).
    #[arg(long)]
    pub watchdog: bool,
    /// Further raw assignments, e.g. STATUS=warming-up or WATCHDOG=trigger.
    pub assignments: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut lines: Vec<String> = Vec::new();
    if a.ready {
        lines.push("READY=1".into());
    }
    if a.watchdog {
        lines.push("WATCHDOG=1".into());
    }
    for s in a.assignments {
        if !s.contains('=') {
            bail!("{s:?} is not an assignment like WATCHDOG=1");
        }
        lines.push(s);
    }
    if lines.is_empty() {
        bail!("nothing to send: give --ready, --watchdog or an assignment such as STATUS=ok");
    }
    let path = std::env::var_os("NOTIFY_SOCKET").context(
        "NOTIFY_SOCKET is not set: this process is not supervised by `kintsugi run` or systemd",
    )?;
    if path.as_encoded_bytes().first() == Some(&b'@') {
        bail!("abstract NOTIFY_SOCKET addresses are not supported; kintsugi run uses a path");
    }
    let sock = UnixDatagram::unbound().context("cannot create a datagram socket")?;
    sock.send_to(lines.join("\n").as_bytes(), &path)
        .with_context(|| format!("cannot send to NOTIFY_SOCKET {}", path.to_string_lossy()))?;
    Ok(ExitCode::SUCCESS)
}
