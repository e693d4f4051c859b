//! `kintsugi mount`: mount a file-system module at a protection level.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

/// Mount a file-system module behind FUSE, at a protection level. Daemonizes unless
/// --foreground; stop it with `kintsugi umount MOUNTPOINT`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Module to mount: smfs (the RAM-disk module), snfs (the network file system client;
    /// needs -o server=HOST:PORT), or fuser-plain (the bare-FUSE baseline).
    #[arg(long, default_value = "smfs")]
    pub module: String,
    /// The module's options, comma-separated like mount(8) -o: snfs takes server=HOST:PORT;
    /// smfs takes none.
    #[arg(short = 'o', long = "options", default_value = "")]
    pub options: String,
    /// Protection level: 5 = linked into the host (no protection); 4 = own processes, shared-memory
    /// ring, undo log, deadlock detection, restart on crash; 3 = 4 + duplication and semantic
    /// checks of every write-back; 2 = 3 + shared memory read-only outside the protection
    /// manager; 1 = 3 + shared memory unmapped outside it.
    #[arg(long, default_value_t = 4)]
    pub level: u8,
    /// Block store size, e.g. 256M, 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// Serve in this process until unmounted, logging to stderr.
    #[arg(long)]
    pub foreground: bool,
    /// Level 4: a request the module has not answered within this many ms is a hang: the
    /// module is killed and restarted.
    #[arg(long, default_value_t = 2000)]
    pub deadline_ms: u64,
    /// Level 4: what a request whose module crashed gets: retry (once, on the restarted module,
    /// after rollback) or eio.
    #[arg(long, default_value = "retry", value_parser = ["retry", "eio"])]
    pub on_crash: String,
    /// Level 4: module contexts (worker processes), i.e. requests served at once (1-8).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub contexts: u8,
    /// Level 4: the recovery rung for a module fault. contain = abort only the faulting
    /// request's context when it wrote no global data (else escalate to restart); restart =
    /// roll back, restart the module, retry once; none = the first fault ends the file system.
    #[arg(long, default_value = "contain", value_parser = ["contain", "restart", "none"])]
    pub recovery: String,
    /// Level 4 with --recovery contain: a contained fault answers its request EIO, and with
    /// kill-client also kills the client process (its process group if it has its own).
    #[arg(long, default_value = "eio", value_parser = ["eio", "kill-client"])]
    pub on_local_error: String,
    /// Level 4: deadlock checker period in ms (0: off). Every period the host builds the
    /// wait-for graph between contexts; a cycle is broken by rolling back its youngest request
    /// (its locks are taken away) and running that request again, invisibly to the client.
    #[arg(long, default_value_t = 50)]
    pub deadlock_interval_ms: u64,
    /// Daemon log file (default: discard).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Where to mount (an existing directory).
    pub mountpoint: PathBuf,
}

/// Parses "256M", "1G", "4096", "64K".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("size {s:?}: unknown suffix {c:?}; use K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("size {s:?} is not a number of bytes like 256M"))
}

/// The modules this binary links (the mount's module factory).
pub fn modules(name: &str, opts: &str) -> Result<Box<dyn fsapi::Module>, String> {
    match name {
        "smfs" if opts.trim().is_empty() => Ok(Box::new(smfs::Smfs::new())),
        "smfs" => Err(format!(
            "smfs takes no options (got -o {opts:?}): leave out -o"
        )),
        "snfs" => Ok(Box::new(snfs::Snfs::from_opts(opts)?)),
        _ => Err(format!(
            "unknown module {name:?}: available modules are smfs, snfs, {}",
            fshost::mount::PLAIN
        )),
    }
}

/// The fault sites a module compiles in, by module name (no instance, so no options needed).
pub fn sites(name: &str) -> Option<&'static [fsapi::Site]> {
    match name {
        "smfs" => Some(smfs::SITES),
        "snfs" => Some(snfs::SITES),
        _ => None,
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let level = fshost::Level::from_number(a.level).map_err(anyhow::Error::msg)?;
    let opts = fshost::MountOpts {
        module: a.module,
        module_opts: a.options,
        level,
        size: a.size,
        mountpoint: a.mountpoint.clone(),
        foreground: a.foreground,
        deadline: Duration::from_millis(a.deadline_ms.max(1)),
        on_crash: if a.on_crash == "eio" {
            fshost::OnCrash::Eio
        } else {
            fshost::OnCrash::Retry
        },
        contexts: fshost::ContextOpts {
            contexts: usize::from(a.contexts),
            recovery: fshost::Recovery::parse(&a.recovery).unwrap_or(fshost::Recovery::Contain),
            on_local_error: if a.on_local_error == "kill-client" {
                fshost::OnLocalError::KillClient
            } else {
                fshost::OnLocalError::Eio
            },
            deadlock_interval: Duration::from_millis(a.deadlock_interval_ms),
            ..fshost::ContextOpts::default()
        },
        log: a.log,
    };
    fshost::mount::mount(&opts, modules)
        .with_context(|| format!("mount {}", a.mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}
