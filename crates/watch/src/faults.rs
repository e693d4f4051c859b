//! Safe, bounded reproductions of each fault the monitor detects, for tests, the benchmark and
//! the demo (research/monitor.md §5). Every fault runs in processes we fork, confined to a
//! cgroup we create, with a deadline of its own; every handle cleans up on drop: kill by pid
//! or by the cgroup it created, reap, unmount, remove the cgroup.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, UNIX_EPOCH};

use sys::Pid;
use sys::process::Fork;

use crate::cgroup;

const SIGKILL: i32 = 9;
const SIGSTOP: i32 = 19;

fn mono() -> u64 {
    sys::clock::monotonic_ns()
}

/// Forks a child that runs `f` and exits with its result. The child gets SIGKILL when the
/// forking thread dies, so a crashed test leaves nothing behind.
pub fn spawn_child(f: impl FnOnce() -> i32) -> io::Result<Pid> {
    match sys::process::fork()? {
        Fork::Parent(pid) => Ok(pid),
        Fork::Child => {
            let _ = sys::process::set_parent_death_signal(SIGKILL);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            sys::process::exit_now(code)
        }
    }
}

/// Kills and reaps a child of ours.
pub fn kill_and_reap(pid: Pid) {
    let _ = sys::process::kill(pid, SIGKILL);
    let _ = sys::process::wait_pid(pid);
}

/// A cgroup we created in a v1 hierarchy (`pids`, `memory`). Drop kills what is left in it and
/// removes it.
#[derive(Debug)]
pub struct V1Cgroup {
    pub path: PathBuf,
}

impl V1Cgroup {
    /// Creates `<hierarchy of controller>/<name>`.
    pub fn create(controller: &str, name: &str) -> io::Result<V1Cgroup> {
        let root = cgroup::v1_hierarchy(controller).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no cgroup v1 hierarchy with the {controller} controller is mounted"),
            )
        })?;
        let path = root.join(name);
        std::fs::create_dir(&path)?;
        Ok(V1Cgroup { path })
    }
    pub fn set(&self, file: &str, value: &str) -> io::Result<()> {
        std::fs::write(self.path.join(file), value)
    }
    pub fn get(&self, file: &str) -> io::Result<String> {
        std::fs::read_to_string(self.path.join(file))
    }
    /// Moves the calling process into the cgroup (for use in a freshly forked child).
    pub fn enter(&self) -> io::Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), "0")
    }
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        let _ = cgroup::kill(&self.path, Duration::from_secs(3));
        // rmdir fails with EBUSY until the last killed task is fully gone (zombies of a
        // reaped parent are released asynchronously).
        let t = Instant::now();
        while std::fs::remove_dir(&self.path).is_err() && t.elapsed() < Duration::from_secs(3) {
            let _ = cgroup::kill(&self.path, Duration::from_millis(200));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A unique name for a test cgroup or mount directory.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------

/// A fork bomb in a pids-limited cgroup: every process forks in a loop until `pids.max` stops
/// it, backing off 1 ms on EAGAIN, until its deadline. The root is a child subreaper that reaps
/// everything at the end.
#[derive(Debug)]
pub struct ForkBomb {
    pub cgroup: V1Cgroup,
    pub pid: Pid,
    /// CLOCK_MONOTONIC ns when the bomb was started.
    pub started_ns: u64,
}

fn bomb_loop(deadline: u64) -> i32 {
    while mono() < deadline {
        match sys::process::fork() {
            Ok(Fork::Child) => continue,
            Ok(Fork::Parent(_)) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
        while let Ok(Some(_)) = sys::process::try_wait_any() {}
    }
    0
}

impl ForkBomb {
    pub fn start(max_pids: u32, lifetime: Duration) -> io::Result<ForkBomb> {
        let cg = V1Cgroup::create("pids", &unique("kintsugi-watch-bomb"))?;
        cg.set("pids.max", &max_pids.to_string())?;
        let started_ns = mono();
        let deadline = started_ns + lifetime.as_nanos() as u64;
        let cg_path = cg.path.clone();
        let pid = spawn_child(move || {
            if std::fs::write(cg_path.join("cgroup.procs"), "0").is_err() {
                return 3;
            }
            let _ = sys::process::set_child_subreaper();
            let me = Pid::this();
            let _ = bomb_loop(deadline);
            if Pid::this() == me {
                // The root reaps every descendant (they are re-parented to it), bounded.
                let until = mono() + 5_000_000_000;
                loop {
                    while let Ok(Some(_)) = sys::process::try_wait_any() {}
                    let left = sys::process::children_of(me).map(|c| c.len()).unwrap_or(0);
                    if left == 0 || mono() > until {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            0
        })?;
        Ok(ForkBomb {
            cgroup: cg,
            pid,
            started_ns,
        })
    }

    /// Processes in the cgroup now.
    pub fn current(&self) -> usize {
        cgroup::procs(&self.cgroup.path)
            .map(|p| p.len())
            .unwrap_or(0)
    }
}

impl Drop for ForkBomb {
    fn drop(&mut self) {
        let _ = cgroup::kill(&self.cgroup.path, Duration::from_secs(3));
        kill_and_reap(self.pid);
    }
}

// ---------------------------------------------------------------------------------------------

/// A process that allocates and touches memory in 4 MiB steps inside a memory-limited v1
/// cgroup until the kernel stops it (OOM kill, or with `oom_kill_disable` a stall under OOM)
/// or its deadline passes.
#[derive(Debug)]
pub struct MemoryHog {
    pub cgroup: V1Cgroup,
    pub pid: Pid,
    pub started_ns: u64,
    reaped: bool,
}

impl MemoryHog {
    pub fn start(limit_bytes: u64, oom_kill_disable: bool, lifetime: Duration) -> io::Result<Self> {
        let cg = V1Cgroup::create("memory", &unique("kintsugi-watch-hog"))?;
        cg.set("memory.limit_in_bytes", &limit_bytes.to_string())?;
        if oom_kill_disable {
            cg.set("memory.oom_control", "1")?;
        }
        let started_ns = mono();
        let deadline = started_ns + lifetime.as_nanos() as u64;
        let cg_path = cg.path.clone();
        let pid = spawn_child(move || {
            if std::fs::write(cg_path.join("cgroup.procs"), "0").is_err() {
                return 3;
            }
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            let cap = limit_bytes as usize * 4;
            while mono() < deadline {
                if hoard.len() * (4 << 20) < cap {
                    // Non-zero fill: every page is touched, so it is really charged.
                    hoard.push(vec![0xa5u8; 4 << 20]);
                } else {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            hoard.len() as i32
        })?;
        Ok(MemoryHog {
            cgroup: cg,
            pid,
            started_ns,
            reaped: false,
        })
    }

    /// Waits up to `timeout` for the hog to end (e.g. OOM-killed) and reaps it.
    pub fn wait(&mut self, timeout: Duration) -> Option<sys::process::ExitStatus> {
        let t = Instant::now();
        while !self.reaped {
            if let Ok(Some(st)) = sys::process::try_wait_pid(self.pid) {
                self.reaped = true;
                return Some(st);
            }
            if t.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for MemoryHog {
    fn drop(&mut self) {
        let _ = cgroup::kill(&self.cgroup.path, Duration::from_secs(3));
        // Once reaped, the pid may belong to someone else: never signal it again.
        if !self.reaped {
            kill_and_reap(self.pid);
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A heartbeat writer: a child that rewrites `<count> <monotonic ns>` into a file every
/// `period`. [`HeartbeatWriter::stop`] freezes it (SIGSTOP, like a hung service) and returns
/// the time of its last beat.
#[derive(Debug)]
pub struct HeartbeatWriter {
    pub path: PathBuf,
    pub pid: Pid,
}

impl HeartbeatWriter {
    pub fn start(path: &Path, period: Duration) -> io::Result<HeartbeatWriter> {
        std::fs::write(path, "0 0\n")?;
        let p = path.to_path_buf();
        let pid = spawn_child(move || {
            use std::os::unix::fs::FileExt;
            let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) else {
                return 3;
            };
            let mut n = 0u64;
            loop {
                n += 1;
                // Fixed width, so a pwrite at 0 always replaces the whole line.
                let line = format!("{n:012} {:020}\n", mono());
                if f.write_at(line.as_bytes(), 0).is_err() {
                    return 4;
                }
                std::thread::sleep(period);
            }
        })?;
        Ok(HeartbeatWriter {
            path: path.to_path_buf(),
            pid,
        })
    }

    /// Stops the writer and returns the CLOCK_MONOTONIC ns of its last beat.
    pub fn stop(&self) -> u64 {
        let _ = sys::process::kill(self.pid, SIGSTOP);
        // A beat in progress lands before the stop takes effect; read after a short settle.
        std::thread::sleep(Duration::from_millis(5));
        Self::last_beat(&self.path)
    }

    /// The monotonic stamp of the last beat written to `path`.
    pub fn last_beat(path: &Path) -> u64 {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for HeartbeatWriter {
    fn drop(&mut self) {
        kill_and_reap(self.pid);
    }
}

// ---------------------------------------------------------------------------------------------

/// Idle processes, so benchmarks run with a realistic task count.
#[derive(Debug, Default)]
pub struct Sleepers {
    pub pids: Vec<Pid>,
}

impl Sleepers {
    pub fn spawn(n: usize) -> io::Result<Sleepers> {
        let mut s = Sleepers::default();
        for _ in 0..n {
            s.pids.push(spawn_child(|| {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            })?);
        }
        Ok(s)
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        for &p in &self.pids {
            let _ = sys::process::kill(p, SIGKILL);
        }
        for &p in &self.pids {
            let _ = sys::process::wait_pid(p);
        }
    }
}

/// Tasks (threads included) on the machine now.
pub fn task_count() -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .map(|r| r.count())
                .unwrap_or(0)
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------

const TTL: Duration = Duration::from_secs(3600);

fn attr(ino: u64, dir: bool) -> fuser::FileAttr {
    fuser::FileAttr {
        ino: fuser::INodeNo(ino),
        size: if dir { 0 } else { 1 << 20 },
        blocks: if dir { 0 } else { 2048 },
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            fuser::FileType::Directory
        } else {
            fuser::FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

/// A FUSE filesystem with one file, `hang`, whose reads are never answered: the replies are
/// kept, not dropped (fuser answers a dropped reply with EIO).
#[derive(Debug, Default)]
struct HangFs {
    held: Mutex<Vec<fuser::ReplyData>>,
}

impl fuser::Filesystem for HangFs {
    fn lookup(
        &self,
        _req: &fuser::Request,
        parent: fuser::INodeNo,
        name: &OsStr,
        reply: fuser::ReplyEntry,
    ) {
        if parent == fuser::INodeNo::ROOT && name == "hang" {
            reply.entry(&TTL, &attr(2, false), fuser::Generation(0));
        } else {
            reply.error(fuser::Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        reply.attr(&TTL, &attr(ino.0, ino == fuser::INodeNo::ROOT));
    }

    fn read(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        _offset: u64,
        _size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        if let Ok(mut h) = self.held.lock() {
            h.push(reply);
        }
    }
}

/// A hung driver: a FUSE daemon (a forked child) that stops answering reads, and reader
/// processes that pile up behind it. The first reader waits for the daemon (interruptible, S);
/// each later one blocks uninterruptibly (D) on the page lock the first holds.
///
/// Drop kills the daemon, which aborts the connection: every waiter gets an error and exits;
/// then the readers are reaped and the mount is detached and removed.
#[derive(Debug)]
pub struct FuseHang {
    pub dir: PathBuf,
    pub daemon: Pid,
    pub readers: Vec<Pid>,
    /// The readers' pids cgroup (pids.max 64), so even a runaway test cannot spawn more.
    pub cgroup: V1Cgroup,
}

fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let d = dir.to_string_lossy();
    info.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(&*d))
}

impl FuseHang {
    /// Mounts the hanging filesystem on a fresh directory under `parent`.
    pub fn mount(parent: &Path) -> io::Result<FuseHang> {
        let cgroup = V1Cgroup::create("pids", &unique("kintsugi-watch-fuse"))?;
        cgroup.set("pids.max", "64")?;
        let dir = parent.join(unique("kintsugi-watch-fuse"));
        std::fs::create_dir_all(&dir)?;
        let d = dir.clone();
        let daemon = spawn_child(move || {
            let mut cfg = fuser::Config::default();
            cfg.mount_options = vec![
                fuser::MountOption::FSName("kintsugi-hang".into()),
                fuser::MountOption::Subtype("kintsugi-hang".into()),
            ];
            cfg.acl = fuser::SessionACL::All;
            match fuser::mount(HangFs::default(), &d, &cfg) {
                Ok(()) => 0,
                Err(_) => 5,
            }
        })?;
        let t = Instant::now();
        while !is_mounted(&dir) {
            if let Ok(Some(st)) = sys::process::try_wait_pid(daemon) {
                let _ = std::fs::remove_dir(&dir);
                return Err(io::Error::other(format!(
                    "the FUSE daemon could not mount {} ({st}): is /dev/fuse available?",
                    dir.display()
                )));
            }
            if t.elapsed() > Duration::from_secs(5) {
                kill_and_reap(daemon);
                let _ = rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH);
                let _ = std::fs::remove_dir(&dir);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "FUSE mount took > 5 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(FuseHang {
            dir,
            daemon,
            readers: Vec::new(),
            cgroup,
        })
    }

    /// Starts one more reader of `hang`; it blocks until the connection is aborted.
    pub fn add_reader(&mut self) -> io::Result<Pid> {
        let file = self.dir.join("hang");
        let procs = self.cgroup.path.join("cgroup.procs");
        let pid = spawn_child(move || {
            use std::io::Read;
            if std::fs::write(&procs, "0").is_err() {
                return 3;
            }
            let mut b = [0u8; 4096];
            match std::fs::File::open(&file).and_then(|mut f| f.read(&mut b)) {
                Ok(_) => 0,
                Err(_) => 1,
            }
        })?;
        self.readers.push(pid);
        Ok(pid)
    }

    /// Readers now in D state: (all of them, the largest group blocked at one kernel wait point).
    /// The first reader waits on the page it is reading, the later ones on that page's lock, so
    /// the pile-up the monitor reports (one wait point) is the second number.
    pub fn blocked(&self) -> (usize, usize) {
        let mut groups: std::collections::HashMap<String, usize> = Default::default();
        for p in &self.readers {
            let d = std::fs::read(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|b| crate::tasks::parse_stat(&b).map(|s| s.state == b'D'))
                .unwrap_or(false);
            if d {
                let w = std::fs::read_to_string(format!("/proc/{p}/wchan")).unwrap_or_default();
                *groups.entry(w).or_default() += 1;
            }
        }
        (
            groups.values().sum(),
            groups.values().copied().max().unwrap_or(0),
        )
    }

    /// Readers that have ended (zombies, reaped on drop).
    pub fn ended(&self) -> usize {
        self.readers
            .iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|b| crate::tasks::parse_stat(&b).map(|s| s.state == b'Z'))
                    .unwrap_or(true)
            })
            .count()
    }

    /// Kills the daemon (the "driver restart"): the kernel aborts the connection and every
    /// blocked reader gets an error. Idempotent.
    pub fn kill_daemon(&self) {
        let _ = sys::process::kill(self.daemon, SIGKILL);
    }
}

impl Drop for FuseHang {
    fn drop(&mut self) {
        kill_and_reap(self.daemon);
        for &r in &self.readers {
            kill_and_reap(r);
        }
        let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------

/// The demo rung: start a monitor, reproduce a fork bomb in a pids-limited cgroup and a stalled
/// heartbeat, and report each detection and action as it happens (about 3 s). Returns the
/// events seen, so callers can check that both faults were detected and the bomb was killed.
pub fn demo(mut say: impl FnMut(&str)) -> io::Result<Vec<crate::event::Event>> {
    use crate::config::{self, ActionKind};
    use crate::event::{Event, FaultKind};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let beat_path = std::env::temp_dir().join(unique("kintsugi-watch-demo-beat"));
    let writer = HeartbeatWriter::start(&beat_path, Duration::from_millis(50))?;
    let hook_marker = std::env::temp_dir().join(unique("kintsugi-watch-demo-hook"));
    let mut cfg = config::Config::default();
    cfg.heartbeat.push(config::Heartbeat {
        name: "demo-service".into(),
        path: beat_path.clone(),
        timeout_ms: 1000,
    });
    let base = config::Action {
        on: vec![FaultKind::ForkStorm],
        kind: ActionKind::KillCgroup,
        pid: None,
        pid_file: None,
        signal: "SIGHUP".into(),
        cgroup: None,
        allow: vec!["/kintsugi-watch-*".into()],
        command: vec![],
        timeout_ms: 5000,
        cooldown_ms: 1000,
    };
    cfg.action.push(base.clone());
    cfg.action.push(config::Action {
        on: vec![FaultKind::Heartbeat],
        kind: ActionKind::Hook,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo \"$KINTSUGI_SUBJECT\" > {}", hook_marker.display()),
        ],
        ..base
    });
    let (tx, rx) = std::sync::mpsc::channel::<Event>();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let monitor = std::thread::spawn(move || {
        let mut m = crate::Monitor::new(cfg).map_err(io::Error::other)?;
        let opts = crate::RunOptions {
            until: Some(Instant::now() + Duration::from_secs(8)),
            summary_every: None,
        };
        m.run(&stop2, &opts, &mut |e| {
            let _ = tx.send(e.clone());
        })
        .map_err(io::Error::other)
    });
    let mut seen = Vec::new();
    let show = |e: &Event, say: &mut dyn FnMut(&str)| match e {
        Event::Started { sources, .. } => {
            say(&format!("monitor up, listening on {}", sources.join(", ")))
        }
        Event::Detection { detection: d, .. } => say(&format!(
            "DETECTED {} ({}): {} — {}",
            d.fault, d.source, d.subject, d.detail
        )),
        Event::Action { action: a, .. } => say(&format!(
            "ACTION {} on {}: {} — {}",
            a.action,
            a.target,
            if a.ok { "ok" } else { "FAILED" },
            a.detail
        )),
        _ => {}
    };
    if let Ok(e) = rx.recv_timeout(Duration::from_secs(10)) {
        show(&e, &mut say);
        seen.push(e);
    }
    say("starting a fork bomb in a new pids cgroup limited to 64 tasks");
    let bomb = ForkBomb::start(64, Duration::from_secs(6))?;
    let until = Instant::now() + Duration::from_millis(1500);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Ok(e) = rx.recv_timeout(left) {
            show(&e, &mut say);
            seen.push(e);
        }
    }
    say(&format!(
        "bomb cgroup now holds {} processes",
        bomb.current()
    ));
    drop(bomb);
    say("freezing the heartbeat writer (SIGSTOP), as if the service hung");
    writer.stop();
    let until = Instant::now() + Duration::from_millis(1800);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Ok(e) = rx.recv_timeout(left) {
            show(&e, &mut say);
            seen.push(e);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = monitor.join();
    seen.extend(rx.try_iter());
    drop(writer);
    let _ = std::fs::remove_file(&beat_path);
    if let Ok(m) = std::fs::read_to_string(&hook_marker) {
        say(&format!("the heartbeat hook ran and wrote: {}", m.trim()));
        let _ = std::fs::remove_file(&hook_marker);
    }
    Ok(seen)
}
