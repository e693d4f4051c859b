//! `kintsugi`: keep Linux applications alive through failures.
//!
//! One binary, one subcommand per rung of the recovery ladder (see ARCHITECTURE.md). Each
//! subcommand lives in its own module with a clap `Args` struct and a `run` function, so the
//! dispatch below is the only shared place; libraries do the work, this crate parses flags,
//! sets up logging and turns library errors into messages that name the fix.
#![forbid(unsafe_code)]

mod bench;
mod cmd;
mod demo;
mod logging;
mod snfs_plain;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kintsugi",
    version,
    about = "Keep Linux applications alive through failures."
)]
struct Cli {
    /// Log format for structured events on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every rung of the recovery ladder that exists, end to end, and say what happened.
    Demo(demo::Args),
    /// Supervise a command: restart it on failure, like `systemd-run -p Restart=on-failure`.
    Run(cmd::run::Args),
    /// Watch for kernel trouble (hung tasks and drivers, fork storms, memory exhaustion, lost
    /// heartbeats, oopses) and trigger recovery.
    Watch(cmd::watch::Args),
    /// Mount a file-system module behind FUSE at a protection level (survives module crashes).
    Mount(cmd::mount::Args),
    /// Serve a directory to SNFS clients (kintsugi mount --module snfs -o server=ADDR).
    #[command(name = "snfs-server")]
    SnfsServer(cmd::snfs_server::Args),
    /// Unmount a kintsugi file system.
    Umount(cmd::umount::Args),
    /// Inspect or crash a mounted file-system module (status, inject-fault, arm-site).
    Fsctl(cmd::fsctl::Args),
    /// Check a mounted file system's structure (module and host data); exit 1 on problems.
    Fsck(cmd::fsck::Args),
    /// Run a program under the guard: trapped state-changing syscalls, incremental checkpoints,
    /// automatic restore by syscall replay when it is killed.
    Guard(cmd::guard::Args),
    /// Rebuild a guarded program from its image directory and keep guarding it.
    Restore(cmd::restore::Args),
    /// Send sd_notify messages (READY=1, WATCHDOG=1) to $NOTIFY_SOCKET, like systemd-notify.
    Notify(cmd::notify::Args),
    /// Benchmarks: print a human table, or with --json the object the issue specifies.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// (internal) the guarded workload of `kintsugi bench guard`.
    #[command(name = "__guard-bench-child", hide = true)]
    GuardBenchChild(bench::guard::ChildArgs),
    /// (internal) one client process of `kintsugi bench inject`'s workload.
    #[command(name = "__inject-client", hide = true)]
    InjectClient(bench::inject::ClientArgs),
    /// (internal) the SNFS benchmark baseline: the server behind a bare fuser client, in the
    /// foreground until unmounted (or SIGTERM/SIGINT).
    #[command(name = "__snfs-plain", hide = true)]
    SnfsPlain(cmd::snfs_server::PlainArgs),
    /// (internal) the exec'd child of `kintsugi bench rfork`'s fork+exec baseline.
    #[command(name = "__bench-child", hide = true)]
    BenchChild(bench::rfork::ChildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.verbose);
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Watch(a) => cmd::watch::run(a),
        Command::Mount(a) => cmd::mount::run(a),
        Command::SnfsServer(a) => cmd::snfs_server::run(a),
        Command::SnfsPlain(a) => cmd::snfs_server::plain(a),
        Command::Umount(a) => cmd::umount::run(a),
        Command::Fsctl(a) => cmd::fsctl::run(a),
        Command::Fsck(a) => cmd::fsck::run(a),
        Command::Guard(a) => cmd::guard::run(a),
        Command::Restore(a) => cmd::restore::run(a),
        Command::Notify(a) => cmd::notify::run(a),
        Command::Bench(b) => bench::run(b),
        Command::GuardBenchChild(a) => bench::guard::child(a),
        Command::BenchChild(a) => bench::rfork::child(a),
        Command::InjectClient(a) => bench::inject::client(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One chain, printed once: "kintsugi: <what>: <why>: <root cause>".
            eprintln!("kintsugi: {err:#}");
            ExitCode::from(2)
        }
    }
}
