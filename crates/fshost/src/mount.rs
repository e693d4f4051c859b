//! `kintsugi mount`, `umount` and `fsctl`: the logic behind the commands.
//!
//! `mount` daemonizes by default (double fork, new session, stdio to `--log` or /dev/null) and
//! returns once the file system answers, or with the daemon's error; `--foreground` serves in
//! the calling process until unmounted. Either way the FUSE connection belongs to the host
//! process: `kintsugi umount` (or `umount`) ends it, and the host exits when the kernel closes
//! the connection.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fsapi::Module;
use sys::process::Fork;

use crate::HostError;
use crate::backend::{Backend, Level, OnCrash, Stats};
use crate::fuse::{HostFs, STATUS_FILE, XATTR_FAULT, XATTR_FSCK, XATTR_SITE};
use crate::pm::Fault;
use crate::store::Store;
use crate::wire::OpClass;

/// Makes a module from its name and its options (`-o`, comma-separated, possibly empty). The
/// CLI passes the modules it links. The error is the whole message for the user: an unknown
/// module (naming the known ones) or a bad option (naming the right form).
pub type ModuleFactory = fn(name: &str, opts: &str) -> Result<Box<dyn Module>, String>;

/// The baseline file system's module name (no protection manager at all).
pub const PLAIN: &str = "fuser-plain";

/// Everything `kintsugi mount` takes.
#[derive(Debug, Clone)]
pub struct MountOpts {
    pub module: String,
    /// The module's own options (`kintsugi mount -o`), passed to the [`ModuleFactory`].
    pub module_opts: String,
    pub level: Level,
    /// Block store size in bytes.
    pub size: u64,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    /// Per-request deadline at level 4.
    pub deadline: Duration,
    pub on_crash: OnCrash,
    /// Level 4: contexts and the recovery rung (containment by default).
    pub contexts: crate::backend::ContextOpts,
    /// Daemon log file (default: none).
    pub log: Option<PathBuf>,
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Mount points, from /proc/self/mountinfo (octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let b = m.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\'
                    && i + 3 < b.len()
                    && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
                {
                    out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                    i += 4;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
        })
        .collect()
}

/// Whether `p` (made absolute) is a mount point.
pub fn is_mounted(p: &Path) -> bool {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let canon = std::fs::canonicalize(p).unwrap_or(abs.clone());
    mount_points().iter().any(|m| *m == abs || *m == canon)
}

fn check_mountpoint(p: &Path) -> Result<(), HostError> {
    if is_mounted(p) {
        return Err(HostError::Busy(path_str(p)));
    }
    match std::fs::metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(HostError::NoMountpoint(path_str(p)))
        }
        Err(e) => Err(HostError::Io {
            what: "stat",
            path: path_str(p),
            source: e,
        }),
        Ok(m) if !m.is_dir() => Err(HostError::NotADirectory(path_str(p))),
        Ok(_) => Ok(()),
    }
}

/// Mounts per `opts`. Returns when the file system is serving (daemon) or unmounted
/// (foreground).
pub fn mount(opts: &MountOpts, factory: ModuleFactory) -> Result<(), HostError> {
    check_mountpoint(&opts.mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(HostError::NoDevFuse);
    }
    let module = if opts.module == PLAIN {
        None
    } else {
        Some(factory(&opts.module, &opts.module_opts).map_err(HostError::Module)?)
    };
    if opts.foreground {
        return serve(opts, module, None);
    }
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| HostError::Daemon(format!("pipe: {e}")))?;
    match sys::process::fork().map_err(|e| HostError::Daemon(format!("fork: {e}")))? {
        Fork::Parent(child) => {
            drop(w);
            let _ = sys::process::wait_pid(child);
            // One line: the daemon's children (the module supervisor) may inherit the pipe, so
            // EOF can come late; the line is the answer.
            let mut msg = Vec::new();
            let mut f = std::fs::File::from(r);
            let mut b = [0u8; 512];
            while !msg.contains(&b'\n') {
                match f.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => msg.extend_from_slice(&b[..n]),
                }
            }
            let msg = String::from_utf8_lossy(&msg).into_owned();
            match msg.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if msg.is_empty() => Err(HostError::Daemon(
                    "it exited without a word (try --foreground to see why)".into(),
                )),
                None => Err(HostError::Daemon(msg.trim().to_string())),
            }
        }
        Fork::Child => {
            drop(r);
            let _ = rustix::process::setsid();
            match sys::process::fork() {
                Ok(Fork::Parent(_)) => sys::process::exit_now(0),
                Ok(Fork::Child) => {}
                Err(_) => sys::process::exit_now(1),
            }
            redirect_stdio(opts.log.as_deref());
            let code = match serve(opts, module, Some(w)) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e}");
                    1
                }
            };
            sys::process::exit_now(code)
        }
    }
}

fn redirect_stdio(log: Option<&Path>) {
    let null = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null");
    if let Ok(n) = &null {
        let _ = rustix::stdio::dup2_stdin(n);
    }
    let out = log
        .and_then(|p| {
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .or_else(|| null.ok());
    if let Some(o) = out {
        let _ = rustix::stdio::dup2_stdout(&o);
        let _ = rustix::stdio::dup2_stderr(&o);
    }
}

/// Reports to the waiting parent, once: the write end is closed after, so the parent's read
/// ends even though this process goes on serving.
fn tell(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let _ = rustix::io::write(&fd, msg.as_bytes());
    }
}

/// Builds the host and serves until unmounted. `ready` gets "ok" or the error text.
fn serve(
    opts: &MountOpts,
    module: Option<Box<dyn Module>>,
    mut ready: Option<OwnedFd>,
) -> Result<(), HostError> {
    let r = serve_inner(opts, module, &mut ready);
    if let Err(e) = &r {
        tell(&mut ready, &format!("{e}\n"));
    }
    r
}

/// `threads` FUSE reader threads: one per level-4 context, so that many requests run at once.
fn fuse_config(fsname: &str, threads: usize) -> fuser::Config {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(fsname.to_string()),
        fuser::MountOption::Subtype("kintsugi".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    // Root mounts serve every user (pjdfstest switches uids); others only themselves.
    cfg.acl = if rustix::process::geteuid().is_root() {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    cfg.n_threads = Some(threads.max(1));
    cfg.clone_fd = threads > 1;
    cfg
}

fn serve_inner(
    opts: &MountOpts,
    module: Option<Box<dyn Module>>,
    ready: &mut Option<OwnedFd>,
) -> Result<(), HostError> {
    let mp = &opts.mountpoint;
    // Before any thread exists (the module supervisor's included), so every thread inherits it.
    let set = block_stop_signals()?;
    let Some(module) = module else {
        let session = fuser::Session::new(crate::plain::PlainFs::new(), mp, &fuse_config(PLAIN, 1))
            .map_err(|e| HostError::Mount(path_str(mp), e))?;
        unmount_on_signals(mp, set);
        tell(ready, "ok\n");
        return session.run().map_err(|e| HostError::Mount(path_str(mp), e));
    };
    let name = module.name().to_string();
    let store = Store::create(opts.size)?;
    let stats = Arc::new(Stats::default());
    // Level 4 forks the module supervisor here, while this process still has one thread.
    let backend = match opts.level {
        Level::L5 => Backend::direct(module, store)?,
        level => Backend::remote(
            level,
            module,
            store,
            opts.deadline,
            opts.on_crash,
            opts.contexts,
            stats.clone(),
        )?,
    };
    let mut fs = HostFs::new(backend, name.clone(), stats);
    fs.mkfs().map_err(HostError::Mkfs)?;
    // Level 5: the host serves under rfork so the mount outlives a module crash (crate::l5).
    let l5_words = match opts.level {
        Level::L5 => {
            let w = Arc::new(
                sys::shm::SharedAtomics::new(crate::l5::WORDS)
                    .map_err(|e| HostError::Daemon(format!("level-5 shared words: {e}")))?,
            );
            fs.supervise_level5(w.clone());
            Some(w)
        }
        _ => None,
    };
    // One reader thread per context: the backend's reader gate (crate::gate) counts them.
    let threads = fs.reader_threads();
    unmount_on_signals(mp, set);
    let session = fuser::Session::new(fs, mp, &fuse_config(&name, threads))
        .map_err(|e| HostError::Mount(path_str(mp), e))?;
    tracing::info!(mountpoint = %mp.display(), module = %name, level = opts.level.number(), "serving");
    tell(ready, "ok\n");
    if let Some(words) = l5_words {
        return crate::l5::serve_supervised(session, words, opts.deadline);
    }
    session.run().map_err(|e| HostError::Mount(path_str(mp), e))
}

/// SIGTERM, SIGINT and SIGHUP unmount the file system (lazily if it is busy) instead of killing
/// the host and leaving a dead mount behind; the session loop then ends normally. The signals are
/// blocked in this thread before the FUSE threads start, so only the waiter thread takes them.
fn block_stop_signals() -> Result<nix::sys::signal::SigSet, HostError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| HostError::Daemon(format!("blocking signals: {e}")))?;
    Ok(set)
}

fn unmount_on_signals(mp: &Path, set: nix::sys::signal::SigSet) {
    let mp = mp.to_path_buf();
    let r = std::thread::Builder::new()
        .name("fs-signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!(?sig, mountpoint = %mp.display(), "unmounting on signal");
                if rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::empty()).is_err() {
                    let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
                }
            }
        })
        .map(drop);
    if let Err(e) = r {
        tracing::warn!(
            "no signal thread ({e}): SIGTERM will leave a dead mount; use kintsugi umount"
        );
    }
}

/// The host's counters (the hidden `.kintsugi-status` file in the mount's root).
pub fn status(mountpoint: &Path) -> Result<serde_json::Value, HostError> {
    let p = mountpoint.join(STATUS_FILE);
    // One read call: the file is direct I/O and every read renders the counters afresh, so
    // reading in pieces (as `fs::read` does past its 4 KiB size hint) could splice two
    // different snapshots. One FUSE read carries up to 128 KiB, far more than the JSON.
    let read_once = |p: &Path| -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut f = std::fs::File::open(p)?;
        let mut buf = vec![0u8; 128 << 10];
        let n = f.read(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    };
    let text = read_once(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => {
            HostError::NotOurs(path_str(mountpoint), STATUS_FILE)
        }
        _ => HostError::Io {
            what: "reading the status file",
            path: path_str(&p),
            source: e,
        },
    })?;
    serde_json::from_slice(&text).map_err(|_| HostError::NotOurs(path_str(mountpoint), STATUS_FILE))
}

/// Crashes the live module on demand: now (idle) or during the next request of `class`.
pub fn inject(mountpoint: &Path, fault: Fault, class: Option<OpClass>) -> Result<(), HostError> {
    status(mountpoint)?;
    let v = match class {
        None => fault.name().to_string(),
        Some(c) => format!("{}:{}", fault.name(), format!("{c:?}").to_lowercase()),
    };
    rustix::fs::setxattr(mountpoint, XATTR_FAULT, v.as_bytes(), rustix::fs::XattrFlags::empty()).map_err(|e| match e {
        rustix::io::Errno::OPNOTSUPP => HostError::Refused(
            path_str(mountpoint),
            "level 5 has no isolation, so only 'panic' during a request can be injected there; mount with --level 4"
                .into(),
        ),
        e => HostError::Io { what: "setting the fault attribute", path: path_str(mountpoint), source: e.into() },
    })
}

/// Runs the module's whole-structure check and the host's own (store header, lock table) on a
/// live mount, with every context quiesced. Returns the problems found (empty: clean).
pub fn fsck(mountpoint: &Path) -> Result<Vec<String>, HostError> {
    status(mountpoint)?;
    rustix::fs::setxattr(
        mountpoint,
        XATTR_FSCK,
        b"run",
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| HostError::Io {
        what: "running fsck (setting the fsck attribute)",
        path: path_str(mountpoint),
        source: e.into(),
    })?;
    let s = status(mountpoint)?;
    let problems = s["fsck"]["problems"]
        .as_array()
        .ok_or_else(|| HostError::NotOurs(path_str(mountpoint), XATTR_FSCK))?;
    Ok(problems
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect())
}

/// Arms fault site `site` (0: disarm) for requests of client `pid` (0: any client) on a live
/// level-4 mount; `seed` drives raw memory faults.
pub fn arm_site(mountpoint: &Path, site: u32, pid: u32, seed: u64) -> Result<(), HostError> {
    let v = format!("{site}:{pid}:{seed}");
    rustix::fs::setxattr(
        mountpoint,
        XATTR_SITE,
        v.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::OPNOTSUPP => HostError::Refused(
            path_str(mountpoint),
            "fault sites fire in module contexts; mount with --level 4".into(),
        ),
        e => HostError::Io {
            what: "setting the fault-site attribute",
            path: path_str(mountpoint),
            source: e.into(),
        },
    })
}

/// Unmounts and waits (up to 5 s) for the host process to exit.
pub fn umount(mountpoint: &Path) -> Result<(), HostError> {
    if !is_mounted(mountpoint) {
        return Err(HostError::NotMounted(path_str(mountpoint)));
    }
    let host = status(mountpoint)
        .ok()
        .and_then(|s| s["host_pid"].as_i64())
        .and_then(|p| sys::Pid::from_raw(p as i32));
    rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty()).map_err(
        |e| match e {
            rustix::io::Errno::BUSY => HostError::UmountBusy(path_str(mountpoint)),
            e => HostError::Io {
                what: "umount",
                path: path_str(mountpoint),
                source: e.into(),
            },
        },
    )?;
    if let Some(pid) = host {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5)
            && sys::process::kill(pid, 0).is_ok()
            && !is_zombie(pid)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

fn is_zombie(pid: sys::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
