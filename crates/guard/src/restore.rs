//! Restore by syscall replay (the Orthros image): a fresh process, pid 1 of a new pid
//! namespace (clone3 `set_tid`), is driven through ptrace to issue the syscalls that rebuild
//! the recorded kernel state: unmap its own memory, re-map the vDSO where it was
//! (`ARCH_MAP_VDSO_64`), map every region, fill pages through /proc/PID/mem, set the
//! memory layout (`PR_SET_MM_MAP`), reopen files at their offsets, recreate sockets, pipes,
//! eventfds, timerfds, epoll sets, handlers, timers and rseq; then its registers, FPU state and
//! signal mask are loaded and it runs. It keeps the seccomp filter it installed before the
//! guard took over (suspended while the guard drives it), so guarding continues.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::Path;

use sys::Pid;
use sys::pidfd::PidFd;
use sys::ptrace::{self, Stopped, Tracee};
use sys::remote_mem::MemFile;
use sys::seccomp::{Listener, NotifyFilter};
use sys::uffd::WpTracker;

use crate::checkpoint::{Incarnation, Proc, words_to_regs};
use crate::image::{self, Chain};
use crate::model::{Fd, FdKind, ProcState, VmaKind};
use crate::procfs::SocketLog;
use crate::{Error, Result};

const SCRATCH_LEN: u64 = 8192;
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
const ARCH_MAP_VDSO_64: u64 = 0x2003;

/// A restored, running program.
#[derive(Debug)]
pub struct Restored {
    pub inc: Incarnation,
    pub listener: Listener,
    /// The layer it was restored from.
    pub seq: u64,
    pub state: ProcState,
    /// Socket facts re-keyed by the new sockets' inodes.
    pub sockets: SocketLog,
    /// sigaltstack per thread, by the new host tids.
    pub altstacks: std::collections::BTreeMap<i32, (u64, i32, u64)>,
    pub page_bytes: u64,
    /// Host pid of each process of the tree, by pid inside the namespace.
    pub hosts: BTreeMap<i32, Pid>,
}

struct Driver {
    t: Tracee<Stopped>,
    pid: Pid,
    insn: u64,
    mem: MemFile,
    scratch: u64,
}

impl Driver {
    fn sys(&mut self, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = self
            .t
            .inject_syscall(self.insn, nr, args)
            .map_err(|e| Error::sys("driving the restored process", e))?;
        if (-4095..0).contains(&r) {
            return Err(Error::Restore(format!(
                "{what}: {}",
                std::io::Error::from_raw_os_error(-r as i32)
            )));
        }
        Ok(r as u64)
    }
    /// Copies `bytes` into the scratch page's data area and returns their address there.
    fn data(&mut self, bytes: &[u8]) -> Result<u64> {
        if bytes.len() as u64 > SCRATCH_LEN - 64 {
            return Err(Error::Restore(format!(
                "argument of {} bytes does not fit the scratch page",
                bytes.len()
            )));
        }
        let at = self.scratch + 64;
        self.mem
            .write_all_at(at, bytes)
            .map_err(|e| Error::sys("writing the restorer's scratch page", e))?;
        Ok(at)
    }
    fn path(&mut self, p: &str) -> Result<u64> {
        let mut b = p.as_bytes().to_vec();
        b.push(0);
        self.data(&b)
    }
    /// Moves fd `tmp` to number `target` with the right close-on-exec bit.
    fn place(&mut self, tmp: u64, target: i32, cloexec: bool) -> Result<()> {
        if tmp as i32 == target {
            let fl = if cloexec { libc::FD_CLOEXEC as u64 } else { 0 };
            self.sys(
                "fcntl(F_SETFD)",
                libc::SYS_fcntl,
                [tmp, libc::F_SETFD as u64, fl, 0, 0, 0],
            )?;
            return Ok(());
        }
        let fl = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        self.sys("dup3", libc::SYS_dup3, [tmp, target as u64, fl, 0, 0, 0])?;
        self.sys("close", libc::SYS_close, [tmp, 0, 0, 0, 0, 0])?;
        Ok(())
    }
}

/// Restores the newest chain in `dir` into a new process tree. Refuses (before creating
/// anything) an image the guard marked non-restorable, and any damaged layer.
pub fn restore(dir: &Path, filter: &NotifyFilter) -> Result<Restored> {
    let t0 = std::time::Instant::now();
    let chain = image::load_chain(dir)?;
    tracing::debug!(target: "guard", "restore: loaded chain {}..{} ({} pages) in {:?}", chain.base, chain.top, chain.page_bytes() / 4096, t0.elapsed());
    if !chain.state.refusals.is_empty() {
        return Err(Error::NotRestorable(chain.state.refusals.join("; ")));
    }
    if chain.state.threads.is_empty() {
        return Err(Error::Image("no thread recorded".into()));
    }
    // Writable files go back to their size at the checkpoint: what the program appended after
    // it is appended again when it re-runs.
    for f in std::iter::once(&chain.state)
        .chain(chain.state.procs.iter())
        .flat_map(|p| p.fds.iter())
    {
        if let FdKind::File {
            path,
            size,
            writable: true,
            ..
        } = &f.kind
            && let Ok(m) = std::fs::metadata(path)
            && m.is_file()
            && m.len() > *size
        {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|fh| fh.set_len(*size))
                .map_err(|e| Error::sys("cutting a file back to its checkpointed size", e))?;
        }
    }
    let (stub, listener) = spawn_stub(filter, chain.state.net)?;
    tracing::debug!(target: "guard", "restore: new process at {:?}", t0.elapsed());
    let mut created = Vec::new();
    match drive_tree(stub, &chain, &mut created) {
        Ok((inc, sockets, altstacks, hosts)) => Ok(Restored {
            altstacks,
            inc,
            listener,
            seq: chain.top,
            page_bytes: chain.page_bytes(),
            state: chain.state,
            sockets,
            hosts,
        }),
        Err(e) => {
            // pid 1 takes its namespace with it; the others are reaped as our tracees.
            let _ = sys::process::kill(stub, libc::SIGKILL);
            let _ = sys::process::wait_pid(stub);
            for c in created {
                let _ = sys::process::kill(c, libc::SIGKILL);
                let _ = sys::process::wait_pid(c);
            }
            Err(e)
        }
    }
}

/// Starts the process to be rebuilt: pid 1 of a new pid + mount namespace, with the guard's
/// filter installed, parked in a read() until the guard seizes it.
fn spawn_stub(filter: &NotifyFilter, net: bool) -> Result<(Pid, Listener)> {
    let (r1, w1) = sys::ns::pipe_cloexec().map_err(|e| Error::sys("pipe", e))?;
    let (r2, w2) = sys::ns::pipe_cloexec().map_err(|e| Error::sys("pipe", e))?;
    use std::os::fd::AsRawFd;
    let (w1r, r2r) = (w1.as_raw_fd(), r2.as_raw_fd());
    let flags = sys::ns::NEWPID | sys::ns::NEWNS | if net { sys::ns::NEWNET } else { 0 };
    let forked = sys::ns::clone3_fork(flags, &[1]).or_else(|_| sys::ns::clone3_fork(flags, &[]));
    match forked.map_err(|e| Error::sys("clone3 into a new pid namespace", e))? {
        sys::process::Fork::Child => {
            let _ = sys::ns::make_mounts_private();
            let lo = if net {
                sys::ns::loopback_up().is_ok()
            } else {
                true
            };
            let l = if lo {
                sys::seccomp::install_listener_filter(filter).unwrap_or(-1)
            } else {
                -1
            };
            sys::ns::raw_write(w1r, &l.to_ne_bytes());
            let mut b = [0u8; 1];
            loop {
                if sys::ns::raw_read(r2r, &mut b) <= 0 {
                    sys::process::exit_now(111);
                }
            }
        }
        sys::process::Fork::Parent(pid) => {
            // The stub holds its own copy of the write end, so its read() never sees EOF.
            drop((w1, r2, w2));
            let pidfd = PidFd::open(pid).map_err(|e| Error::sys("pidfd_open", e))?;
            let raw = read_i32(&r1)?;
            if raw < 0 {
                let _ = sys::process::kill(pid, libc::SIGKILL);
                let _ = sys::process::wait_pid(pid);
                return Err(Error::Restore(
                    "the new process could not install the seccomp filter".into(),
                ));
            }
            let fd = sys::guard_fd::pidfd_getfd(pidfd.as_fd(), raw)
                .map_err(|e| Error::sys("pidfd_getfd of the listener", e))?;
            Ok((pid, Listener::from_fd(fd)))
        }
    }
}

fn read_i32(fd: &std::os::fd::OwnedFd) -> Result<i32> {
    use std::io::Read;
    let mut f = std::fs::File::from(fd.try_clone().map_err(|e| Error::sys("dup", e))?);
    let mut b = [0u8; 4];
    f.read_exact(&mut b)
        .map_err(|e| Error::sys("reading from the new process", e))?;
    Ok(i32::from_ne_bytes(b))
}

fn free_gap(chain: &Chain, stub_maps: &[crate::model::Vma]) -> u64 {
    let mut at = 0x10_0000u64;
    let st = &chain.state;
    loop {
        let end = at + SCRATCH_LEN;
        let clash = std::iter::once(st)
            .chain(st.procs.iter())
            .flat_map(|p| p.vmas.iter())
            .chain(stub_maps)
            .any(|v| v.start < end && at < v.end);
        if !clash {
            return at;
        }
        at += 0x10_0000;
    }
}

type Altstacks = std::collections::BTreeMap<i32, (u64, i32, u64)>;

/// Open file descriptions already rebuilt: description number → (pid inside the namespace,
/// fd there) of a process that holds it.
type Registry = HashMap<u64, (i32, i32)>;

/// The processes of the tree other than pid 1, each parent before its children.
fn tree_order(st: &ProcState) -> Result<Vec<&ProcState>> {
    let mut done = vec![1];
    let mut out = Vec::new();
    let mut left: Vec<&ProcState> = st.procs.iter().collect();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|p| {
            if done.contains(&p.ppid) {
                out.push(*p);
                done.push(p.ns_pid());
                false
            } else {
                true
            }
        });
        if left.len() == before {
            return Err(Error::Image(format!(
                "process {} has parent {}, which is not in the image",
                left[0].ns_pid(),
                left[0].ppid
            )));
        }
    }
    Ok(out)
}

/// Rebuilds the whole tree: pid 1 from the stub, every other process as a bare copy of the
/// stub made by its parent (clone3 `set_tid`, so it gets its recorded pid and parent), then
/// each process rebuilt in turn (descriptions shared between processes are created once and
/// installed in the others with `pidfd_getfd`), then all of them let go.
#[allow(clippy::type_complexity)]
fn drive_tree(
    pid: Pid,
    chain: &Chain,
    created: &mut Vec<Pid>,
) -> Result<(Incarnation, SocketLog, Altstacks, BTreeMap<i32, Pid>)> {
    let st = &chain.state;
    let t = ptrace::seize(
        pid,
        ptrace::O_TRACESYSGOOD | ptrace::O_EXITKILL | ptrace::O_SUSPEND_SECCOMP,
    )
    .map_err(|e| Error::sys("ptrace seize of the new process", e))?;
    let t = t
        .interrupt()
        .map_err(|e| Error::sys("stopping the new process", e))?;
    let insn = sys::remote_mem::find_syscall_insn(pid)
        .map_err(|e| Error::sys("finding a syscall instruction", e))?;
    let mem = MemFile::open(pid).map_err(|e| Error::sys("opening /proc/PID/mem", e))?;
    let stub_maps =
        crate::procfs::maps(pid).map_err(|e| Error::sys("reading the new process's maps", e))?;
    let scratch = free_gap(chain, &stub_maps);
    let mut d = Driver {
        t,
        pid,
        insn,
        mem,
        scratch,
    };

    // The stub inherited the guard's rseq registration: drop it before its memory goes.
    if let Some((p, l, s)) = d.t.rseq().map_err(|e| Error::sys("reading rseq", e))? {
        d.sys(
            "rseq unregister",
            libc::SYS_rseq,
            [p, u64::from(l), 1, u64::from(s), 0, 0],
        )?;
    }
    let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let fl = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    d.sys(
        "mmap scratch page",
        libc::SYS_mmap,
        [scratch, SCRATCH_LEN, prot, fl, u64::MAX, 0],
    )?;
    d.mem
        .write_all_at(scratch, &[0x0f, 0x05])
        .map_err(|e| Error::sys("writing the scratch page", e))?;
    d.insn = scratch;

    // Bare copies of the stub (scratch page included) for the other processes, each made
    // by its parent so parent/child links come back as they were.
    let mut drivers: Vec<(i32, Driver)> = vec![(1, d)];
    let mut hosts = BTreeMap::from([(1, pid)]);
    let mut zombie_parents = Vec::new();
    for p in tree_order(st)? {
        let parent = drivers.iter_mut().find(|d| d.0 == p.ppid).ok_or_else(|| {
            Error::Image(format!(
                "process {}: its parent {} exited (a zombie has no children)",
                p.ns_pid(),
                p.ppid
            ))
        })?;
        let child = fork_child(&mut parent.1, p.ns_pid(), p.exit_signal)?;
        created.push(child.pid);
        hosts.insert(p.ns_pid(), child.pid);
        match p.zombie {
            Some(status) => {
                end_as_zombie(child, status)?;
                // Its SIGCHLD was handled before the checkpoint: not again.
                zombie_parents.push(p.ppid);
            }
            None => drivers.push((p.ns_pid(), child)),
        }
    }
    join_groups(&mut drivers, st);
    let mut reg = Registry::new();
    let mut sockets = SocketLog::default();
    let mut altstacks = Altstacks::new();
    let mut built = Vec::new();
    for (nspid, d) in drivers {
        let pst = if nspid == 1 {
            st
        } else {
            st.procs
                .iter()
                .find(|p| p.ns_pid() == nspid)
                .expect("ordered from the image")
        };
        let mut b = build(d, pst, chain, &mut reg)?;
        b.drop_sigchld = zombie_parents.contains(&nspid);
        sockets
            .backlog
            .extend(b.sockets.backlog.iter().map(|(k, v)| (*k, *v)));
        sockets
            .sockopts
            .extend(b.sockets.sockopts.iter().map(|(k, v)| (*k, v.clone())));
        altstacks.extend(b.altstacks.iter().map(|(k, v)| (*k, *v)));
        built.push(b);
    }
    // Every process is rebuilt: let them go, children first, pid 1 last.
    let root_pidfd = PidFd::open(pid).map_err(|e| Error::sys("pidfd_open", e))?;
    let mut procs = Vec::new();
    for b in built.into_iter().rev() {
        procs.push(finish(b)?);
    }
    Ok((
        Incarnation::restored(pid, root_pidfd, procs),
        sockets,
        altstacks,
        hosts,
    ))
}

/// Sessions and process groups led from inside the tree come back: `setsid` for each
/// session leader, then `setpgid(0, 0)` for each group leader, then `setpgid(0, group)` for
/// the members (a group must exist before others join it). Groups and sessions from outside
/// the tree (0) are the restorer's, as they were the guard's at launch.
fn join_groups(drivers: &mut [(i32, Driver)], st: &ProcState) {
    let procs: Vec<&ProcState> = std::iter::once(st).chain(st.procs.iter()).collect();
    for pass in 0..3 {
        for (nspid, d) in drivers.iter_mut() {
            let Some(p) = procs.iter().find(|p| p.ns_pid() == *nspid) else {
                continue;
            };
            let me = *nspid;
            let r = match pass {
                0 if p.sid == me => d.sys("setsid", libc::SYS_setsid, [0; 6]).map(|_| ()),
                1 if p.pgid == me && p.sid != me => d
                    .sys("setpgid(0, 0)", libc::SYS_setpgid, [0; 6])
                    .map(|_| ()),
                2 if p.pgid != 0 && p.pgid != me => d
                    .sys(
                        &format!("setpgid(0, {})", p.pgid),
                        libc::SYS_setpgid,
                        [0, p.pgid as u64, 0, 0, 0, 0],
                    )
                    .map(|_| ()),
                _ => Ok(()),
            };
            // A group whose leader is gone cannot be made again: the process stays where it
            // is, which the program may notice only through group signals and job control.
            if let Err(e) = r {
                tracing::warn!(target: "guard", "process {me}: {e}");
            }
        }
    }
}

/// Children of `pid` (host pids).
fn children_now(pid: Pid) -> Vec<Pid> {
    sys::process::children_of(pid).unwrap_or_default()
}

/// Makes `parent` (a bare stub) fork a copy of itself with pid `nspid` inside the namespace
/// (clone3 `set_tid`) and its recorded exit signal, traced from its first instruction.
fn fork_child(parent: &mut Driver, nspid: i32, exit_signal: i32) -> Result<Driver> {
    let opts = ptrace::O_TRACESYSGOOD | ptrace::O_EXITKILL | ptrace::O_SUSPEND_SECCOMP;
    // TRACEFORK follows children that signal SIGCHLD, TRACECLONE the others.
    parent
        .t
        .set_options(opts | ptrace::O_TRACEFORK | ptrace::O_TRACECLONE)
        .map_err(|e| Error::sys("tracing forks", e))?;
    let before = children_now(parent.pid);
    // struct clone_args (v2, 88 bytes), then the set_tid array.
    let set_tid_at = parent.scratch + 64 + 88;
    let mut b = Vec::with_capacity(96);
    for w in [0, 0, 0, 0, exit_signal as u64, 0, 0, 0, set_tid_at, 1, 0] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.extend_from_slice(&(nspid as u64).to_le_bytes());
    let a = parent.data(&b)?;
    let got = parent.sys(
        &format!("clone3 process {nspid}"),
        libc::SYS_clone3,
        [a, 88, 0, 0, 0, 0],
    )?;
    parent
        .t
        .set_options(opts)
        .map_err(|e| Error::sys("tracing forks", e))?;
    if got as i32 != nspid {
        return Err(Error::Restore(format!(
            "process came back as pid {got}, not {nspid}"
        )));
    }
    let host = children_now(parent.pid)
        .into_iter()
        .find(|c| !before.contains(c))
        .ok_or_else(|| Error::Restore(format!("process {nspid} not found in /proc")))?;
    let mut t = ptrace::adopt_new_thread(host)
        .map_err(|e| Error::sys(format!("taking over new process {nspid}"), e))?;
    t.set_options(opts)
        .map_err(|e| Error::sys("setting options of a new process", e))?;
    let mem = MemFile::open(host).map_err(|e| Error::sys("opening /proc/PID/mem", e))?;
    Ok(Driver {
        t,
        pid: host,
        insn: parent.scratch,
        mem,
        scratch: parent.scratch,
    })
}

/// A child that was a zombie at the checkpoint: it ends again the way it ended (its wait
/// status), so its parent's `wait` finds the same thing.
fn end_as_zombie(mut d: Driver, status: i32) -> Result<()> {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // Default action, no core file, not blocked; then the signal.
        let a = d.data(&[0u8; 16])?;
        let _ = d.sys(
            "prlimit64(RLIMIT_CORE)",
            libc::SYS_prlimit64,
            [0, libc::RLIMIT_CORE as u64, a, 0, 0, 0],
        );
        let a = d.data(&[0u8; 32])?;
        d.sys(
            "rt_sigaction(SIG_DFL)",
            libc::SYS_rt_sigaction,
            [sig as u64, a, 0, 8, 0, 0],
        )?;
        d.t.set_sigmask(0)
            .map_err(|e| Error::sys("unblocking signals", e))?;
        sys::process::kill(d.pid, sig).map_err(|e| Error::sys("ending a zombie again", e))?;
        d.t.detach()
            .map_err(|e| Error::sys("ending a zombie again", e))?;
        return Ok(());
    }
    let code = libc::WEXITSTATUS(status);
    match d
        .t
        .inject_syscall(d.insn, libc::SYS_exit_group, [code as u64, 0, 0, 0, 0, 0])
    {
        Err(e) if ptrace::ended(&e).is_some() => Ok(()),
        Err(e) => Err(Error::sys("ending a zombie again", e)),
        Ok(r) => Err(Error::Restore(format!("exit_group returned {r}"))),
    }
}

/// Pieces of at most this many bytes are handed to the fill threads in turn.
const FILL_PIECE: usize = 4 << 20;
/// Below this many bytes one thread fills.
const FILL_PARALLEL_MIN: usize = 16 << 20;

/// Writes page runs into process `pid` (`process_vm_writev`). Most of the cost is the
/// process's page faults (allocating and zeroing each page before the copy), which run in the
/// writer's context: with more than one CPU, big images are written by several threads, each
/// taking every n-th 4 MiB piece.
fn fill(pid: Pid, runs: &[(u64, &[u8])]) -> Result<()> {
    let total: usize = runs.iter().map(|r| r.1.len()).sum();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    let write = |a: u64, bytes: &[u8]| {
        sys::remote_mem::write(pid, a, bytes)
            .map_err(|e| Error::sys(format!("filling memory at {a:#x}"), e))
    };
    if threads < 2 || total < FILL_PARALLEL_MIN {
        for &(a, bytes) in runs {
            write(a, bytes)?;
        }
        return Ok(());
    }
    let pieces: Vec<(u64, &[u8])> = runs
        .iter()
        .flat_map(|&(a, bytes)| {
            bytes
                .chunks(FILL_PIECE)
                .enumerate()
                .map(move |(i, c)| (a + (i * FILL_PIECE) as u64, c))
        })
        .collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (1..threads)
            .map(|k| {
                let pieces = &pieces;
                s.spawn(move || -> Result<()> {
                    for &(a, bytes) in pieces.iter().skip(k).step_by(threads) {
                        write(a, bytes)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut res = Ok(());
        for &(a, bytes) in pieces.iter().step_by(threads) {
            if let Err(e) = write(a, bytes) {
                res = Err(e);
                break;
            }
        }
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(Error::Restore("a fill thread panicked".into())));
            if res.is_ok() {
                res = r;
            }
        }
        res
    })
}

/// One process of the tree, rebuilt and still stopped.
struct Built {
    d: Driver,
    nspid: i32,
    /// Its other threads, stopped with their state loaded.
    threads: Vec<Tracee<Stopped>>,
    leader: crate::model::ThreadState,
    /// `(host tid, pending standard signals)`, the leader first.
    pending_threads: Vec<(Pid, u64)>,
    pending: u64,
    tracker: Option<WpTracker>,
    known: Vec<crate::model::Vma>,
    brk: u64,
    /// Temporary fds (pipe ends other processes took their copies from): closed last.
    held: Vec<u64>,
    /// The SIGCHLDs of zombies recreated under it are not passed on.
    drop_sigchld: bool,
    sockets: SocketLog,
    altstacks: Altstacks,
}

/// Rebuilds one process from its bare stub: memory, layout, fds, cwd, signals, limits,
/// threads. Leaves it stopped.
fn build(mut d: Driver, st: &ProcState, chain: &Chain, reg: &mut Registry) -> Result<Built> {
    let pid = d.pid;
    let nspid = st.ns_pid();
    if st.threads.is_empty() {
        return Err(Error::Image(format!("process {nspid}: no thread recorded")));
    }
    let pidfd = PidFd::open(pid).map_err(|e| Error::sys("pidfd_open", e))?;
    let scratch = d.scratch;
    let tree: Vec<&ProcState> = std::iter::once(&chain.state)
        .chain(chain.state.procs.iter())
        .collect();
    // An empty process: no fds but stdio, no memory but the scratch page.
    // Keep the fds the program inherited from its guard (the restorer's own, same numbers).
    let stub_fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| Error::sys("listing the new process's fds", e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    for n in &stub_fds {
        let inherited = st
            .fds
            .iter()
            .any(|f| f.fd == *n && f.kind == FdKind::Inherited);
        if !inherited {
            d.sys("close", libc::SYS_close, [*n as u64, 0, 0, 0, 0, 0])?;
        }
    }
    d.sys(
        "munmap below scratch",
        libc::SYS_munmap,
        [0, scratch, 0, 0, 0, 0],
    )?;
    let hi = scratch + SCRATCH_LEN;
    d.sys(
        "munmap above scratch",
        libc::SYS_munmap,
        [hi, TASK_SIZE - hi, 0, 0, 0, 0],
    )?;

    // ARCH_MAP_VDSO_64 takes the start of the whole [vvar][vvar_vclock][vdso] block.
    let vdso_block = st
        .vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar))
        .map(|v| v.start)
        .min();
    if let Some(at) = vdso_block {
        d.sys(
            "arch_prctl(ARCH_MAP_VDSO_64)",
            libc::SYS_arch_prctl,
            [ARCH_MAP_VDSO_64, at, 0, 0, 0, 0],
        )?;
        let now = crate::procfs::maps(pid).map_err(|e| Error::sys("reading maps", e))?;
        let want: Vec<u64> = st
            .vmas
            .iter()
            .filter(|v| v.kind == VmaKind::Vdso)
            .map(|v| v.start)
            .collect();
        let got: Vec<u64> = now
            .iter()
            .filter(|v| v.kind == VmaKind::Vdso)
            .map(|v| v.start)
            .collect();
        if want != got {
            return Err(Error::Restore(format!(
                "the vDSO landed at {got:x?}, the image needs {want:x?}: this kernel's vDSO layout differs (cross-kernel vDSO proxying is not implemented)"
            )));
        }
    }
    for v in &st.vmas {
        let len = v.end - v.start;
        // Private mappings are created writable so process_vm_writev can fill them; the
        // final protection is applied after the fill.
        let prot = if v.has_pages() {
            u64::from(v.prot | libc::PROT_WRITE as u32)
        } else {
            u64::from(v.prot)
        };
        match &v.kind {
            VmaKind::Anon | VmaKind::SharedAnon => {
                let share = if v.kind == VmaKind::Anon {
                    libc::MAP_PRIVATE
                } else {
                    libc::MAP_SHARED
                };
                let fl = (share | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
                d.sys(
                    &format!("mmap {:#x} {}", v.start, v.label),
                    libc::SYS_mmap,
                    [v.start, len, prot, fl, u64::MAX, 0],
                )?;
            }
            VmaKind::PrivateFile { path, offset } | VmaKind::SharedFile { path, offset } => {
                let shared = matches!(v.kind, VmaKind::SharedFile { .. });
                let acc = if shared && v.prot & libc::PROT_WRITE as u32 != 0 {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                };
                let pa = d.path(path)?;
                let what = format!("open {path} to map it");
                let fd = d.sys(
                    &what,
                    libc::SYS_openat,
                    [
                        libc::AT_FDCWD as u64,
                        pa,
                        (acc | libc::O_CLOEXEC) as u64,
                        0,
                        0,
                        0,
                    ],
                )?;
                let share = if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                let fl = (share | libc::MAP_FIXED) as u64;
                d.sys(
                    &format!("mmap {path} at {:#x}", v.start),
                    libc::SYS_mmap,
                    [v.start, len, prot, fl, fd, *offset],
                )?;
                d.sys("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
            }
            VmaKind::Vdso | VmaKind::Vvar => {}
        }
    }
    // Page contents, in runs, straight from the layer buffers.
    let tf = std::time::Instant::now();
    fill(pid, &chain.runs_of(nspid))?;
    for v in st
        .vmas
        .iter()
        .filter(|v| v.has_pages() && v.prot & libc::PROT_WRITE as u32 == 0)
    {
        d.sys(
            &format!("mprotect {:#x} {}", v.start, v.label),
            libc::SYS_mprotect,
            [v.start, v.end - v.start, u64::from(v.prot), 0, 0, 0],
        )?;
    }
    tracing::debug!(target: "guard", "restore: memory filled in {:?}", tf.elapsed());
    set_mm(&mut d, st)?;
    let mut held = Vec::new();
    let sockets = restore_fds(
        &mut d,
        &st.fds,
        &stub_fds,
        pidfd.as_fd(),
        (nspid, &tree),
        reg,
        &mut held,
    )?;
    let pa = d.path(&st.cwd)?;
    d.sys(
        &format!("chdir {}", st.cwd),
        libc::SYS_chdir,
        [pa, 0, 0, 0, 0, 0],
    )?;
    d.sys(
        "umask",
        libc::SYS_umask,
        [u64::from(st.umask), 0, 0, 0, 0, 0],
    )?;
    restore_signals(&mut d, st)?;
    for &(res, soft, hard) in &st.rlimits {
        let mut b = soft.to_le_bytes().to_vec();
        b.extend_from_slice(&hard.to_le_bytes());
        let a = d.data(&b)?;
        // Raising a hard limit above the restorer's needs CAP_SYS_RESOURCE: keep going.
        if let Err(e) = d.sys(
            "prlimit64",
            libc::SYS_prlimit64,
            [0, res as u64, a, 0, 0, 0],
        ) {
            tracing::warn!(target: "guard", "resource limit {res} not restored: {e}");
        }
    }
    let th = &st.threads[0];
    let (insn, scr) = (d.insn, d.scratch);
    thread_state(&mut d.t, &d.mem, insn, scr, th)?;
    // Arm dirty tracking of the rebuilt memory: the next layer is incremental over this one.
    tracing::debug!(target: "guard", "restore: kernel state replayed at {:?}", tf.elapsed());
    let uffd = d.sys(
        "userfaultfd",
        libc::SYS_userfaultfd,
        [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0, 0, 0, 0, 0],
    )?;
    let ours = sys::guard_fd::pidfd_getfd(pidfd.as_fd(), uffd as i32)
        .map_err(|e| Error::sys("pidfd_getfd", e))?;
    d.sys("close", libc::SYS_close, [uffd, 0, 0, 0, 0, 0])?;
    // Without WP_ASYNC (kernels before 6.7) the program still runs; it is just not
    // checkpointed further until a kernel that can track it.
    let tracker = match WpTracker::new(ours) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(target: "guard", "restored, but this kernel cannot track dirty pages (UFFDIO_API WP_ASYNC: {e}); no further checkpoints");
            None
        }
    };
    let mut known = Vec::new();
    if let Some(tracker) = &tracker {
        for v in st.vmas.iter().filter(|v| crate::procfs::trackable(v)) {
            let len = v.end - v.start;
            if tracker
                .register(v.start, len)
                .and_then(|_| tracker.write_protect(v.start, len))
                .is_ok()
            {
                known.push(v.clone());
            }
        }
    }
    // The other threads, each with its recorded tid (clone3 set_tid), started stopped.
    let mut threads = Vec::new();
    let mut altstacks = std::collections::BTreeMap::new();
    if let Some(a) = th.altstack {
        altstacks.insert(pid.as_raw(), a);
    }
    if st.threads.len() > 1 {
        let opts = ptrace::O_TRACESYSGOOD | ptrace::O_EXITKILL | ptrace::O_SUSPEND_SECCOMP;
        d.t.set_options(opts | ptrace::O_TRACECLONE)
            .map_err(|e| Error::sys("tracing clones", e))?;
        for ts in &st.threads[1..] {
            let before = crate::procfs::tasks(pid);
            let flags = (libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM) as u64;
            // struct clone_args (v2, 88 bytes), then the set_tid array.
            let set_tid_at = d.scratch + 64 + 88;
            let mut b = Vec::with_capacity(96);
            for w in [
                flags,
                0,
                0,
                0,
                0,
                d.scratch + 4096,
                2048,
                0,
                set_tid_at,
                1,
                0,
            ] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            b.extend_from_slice(&(ts.tid as u64).to_le_bytes());
            let a = d.data(&b)?;
            let got = d.sys(
                &format!("clone3 thread {}", ts.tid),
                libc::SYS_clone3,
                [a, 88, 0, 0, 0, 0],
            )?;
            if got as i32 != ts.tid {
                return Err(Error::Restore(format!(
                    "thread came back as tid {got}, not {}",
                    ts.tid
                )));
            }
            let host = crate::procfs::tasks(pid)
                .into_iter()
                .find(|t| !before.contains(t))
                .ok_or_else(|| Error::Restore(format!("thread {} not found in /proc", ts.tid)))?;
            let mut nt = ptrace::adopt_new_thread(host)
                .map_err(|e| Error::sys("taking over a new thread", e))?;
            nt.set_options(opts)
                .map_err(|e| Error::sys("setting thread options", e))?;
            thread_state(&mut nt, &d.mem, d.insn, d.scratch, ts)?;
            let cur = nt.regs().map_err(|e| Error::sys("reading registers", e))?;
            nt.set_xstate(&ts.xstate)
                .map_err(|e| Error::sys("loading FPU state", e))?;
            nt.set_regs(&words_to_regs(&ts.regs, cur)?)
                .map_err(|e| Error::sys("loading registers", e))?;
            nt.set_sigmask(ts.sigmask)
                .map_err(|e| Error::sys("loading the signal mask", e))?;
            if let Some(a) = ts.altstack {
                altstacks.insert(host.as_raw(), a);
            }
            threads.push(nt);
        }
        d.t.set_options(opts)
            .map_err(|e| Error::sys("tracing clones", e))?;
    }
    let mut pending_threads = vec![(pid, th.pending)];
    for (nt, ts) in threads.iter().zip(&st.threads[1..]) {
        pending_threads.push((nt.pid(), ts.pending));
    }
    Ok(Built {
        d,
        nspid,
        threads,
        leader: th.clone(),
        pending_threads,
        pending: st.pending,
        tracker,
        known,
        brk: st.mm.brk,
        held,
        drop_sigchld: false,
        sockets,
        altstacks,
    })
}

/// Lets a rebuilt process go: closes the temporary fds, leaves through its own vDSO, drops
/// the scratch page, loads the leader's registers and detaches every thread.
fn finish(b: Built) -> Result<Proc> {
    let Built {
        mut d,
        nspid,
        threads,
        leader: th,
        pending_threads,
        pending,
        tracker,
        known,
        brk,
        held,
        drop_sigchld,
        ..
    } = b;
    let pid = d.pid;
    let scratch = d.scratch;
    for h in held {
        d.sys("close", libc::SYS_close, [h, 0, 0, 0, 0, 0])?;
    }
    // Leave through the program's own vDSO, then drop the scratch page.
    d.insn = sys::remote_mem::find_syscall_insn(pid)
        .map_err(|e| Error::sys("finding a syscall instruction in the restored vDSO", e))?;
    d.sys(
        "munmap scratch",
        libc::SYS_munmap,
        [scratch, SCRATCH_LEN, 0, 0, 0, 0],
    )?;

    let cur = d.t.regs().map_err(|e| Error::sys("reading registers", e))?;
    let regs = words_to_regs(&th.regs, cur)?;
    d.t.set_xstate(&th.xstate)
        .map_err(|e| Error::sys("loading FPU state", e))?;
    d.t.set_regs(&regs)
        .map_err(|e| Error::sys("loading registers", e))?;
    d.t.set_sigmask(th.sigmask)
        .map_err(|e| Error::sys("loading the signal mask", e))?;
    d.t.set_options(ptrace::O_TRACESYSGOOD)
        .map_err(|e| Error::sys("re-enabling seccomp", e))?;
    tracing::debug!(target: "guard", "restore: process {nspid} ready");
    for mut nt in threads {
        nt.set_options(ptrace::O_TRACESYSGOOD)
            .map_err(|e| Error::sys("re-enabling seccomp", e))?;
        nt.detach()
            .map_err(|e| Error::sys("starting a restored thread", e))?;
    }
    // Signals seen while we drove it are passed on after the detach.
    let seen: Vec<i32> =
        d.t.take_pending_signals()
            .into_iter()
            .filter(|&s| !(drop_sigchld && s == libc::SIGCHLD))
            .collect();
    d.t.detach()
        .map_err(|e| Error::sys("starting the restored program", e))?;
    for sig in seen {
        let _ = sys::process::kill(pid, sig);
    }
    // Signals that were pending (blocked, mostly) are sent again, to the process or thread.
    let sigs = |mask: u64| {
        (1..=31).filter(move |s| {
            mask & (1u64 << (s - 1)) != 0 && *s != libc::SIGKILL && *s != libc::SIGSTOP
        })
    };
    for sig in sigs(pending) {
        let _ = sys::process::kill(pid, sig);
    }
    for (tid, mask) in pending_threads {
        for sig in sigs(mask) {
            let _ = ptrace::tgkill(pid, tid, sig);
        }
    }
    Proc::restored(pid, nspid, tracker, known, brk)
}

/// Per-thread kernel state a thread must set itself: alternate signal stack, rseq, robust
/// futex list, clear-child-tid address. Injected into `t` from the scratch page.
fn thread_state(
    t: &mut Tracee<Stopped>,
    mem: &MemFile,
    insn: u64,
    scratch: u64,
    th: &crate::model::ThreadState,
) -> Result<()> {
    let mut sys = |what: &str, nr: i64, args: [u64; 6]| -> Result<u64> {
        let r = t
            .inject_syscall(insn, nr, args)
            .map_err(|e| Error::sys("driving the restored process", e))?;
        if (-4095..0).contains(&r) {
            return Err(Error::Restore(format!(
                "{what} (thread {}): {}",
                th.tid,
                std::io::Error::from_raw_os_error(-r as i32)
            )));
        }
        Ok(r as u64)
    };
    if let Some((sp, flags, size)) = th.altstack {
        let mut b = sp.to_le_bytes().to_vec();
        b.extend_from_slice(&(flags as u64).to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        let a = scratch + 64;
        mem.write_all_at(a, &b)
            .map_err(|e| Error::sys("writing the scratch page", e))?;
        sys("sigaltstack", libc::SYS_sigaltstack, [a, 0, 0, 0, 0, 0])?;
    }
    if let Some((p, l, s)) = th.rseq {
        sys(
            "rseq register",
            libc::SYS_rseq,
            [p, u64::from(l), 0, u64::from(s), 0, 0],
        )?;
    }
    if let Some((head, len)) = th.robust {
        sys(
            "set_robust_list",
            libc::SYS_set_robust_list,
            [head, len, 0, 0, 0, 0],
        )?;
    }
    if th.clear_tid != 0 {
        sys(
            "set_tid_address",
            libc::SYS_set_tid_address,
            [th.clear_tid, 0, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

fn set_mm(d: &mut Driver, st: &ProcState) -> Result<()> {
    let m = &st.mm;
    let auxv: Vec<u8> = m.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut exe_fd = u32::MAX;
    if !st.exe.is_empty() {
        let pa = d.path(&st.exe)?;
        if let Ok(fd) = d.sys(
            "open exe",
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                pa,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        ) {
            exe_fd = fd as u32;
        }
    }
    let build = |exe: u32, auxv_at: u64| {
        let mut b = Vec::with_capacity(104);
        for w in [
            m.start_code,
            m.end_code,
            m.start_data,
            m.end_data,
            m.start_brk,
            m.brk,
            m.start_stack,
            m.arg_start,
            m.arg_end,
            m.env_start,
            m.env_end,
            auxv_at,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
        b.extend_from_slice(&exe.to_le_bytes());
        b
    };
    // Layout in scratch: [prctl_mm_map (104 bytes)][auxv].
    let base = d.scratch + 64;
    let mut bytes = build(exe_fd, base + 104);
    bytes.extend_from_slice(&auxv);
    d.data(&bytes)?;
    let args = [
        libc::PR_SET_MM as u64,
        libc::PR_SET_MM_MAP as u64,
        base,
        104,
        0,
        0,
    ];
    let r = d.sys("prctl(PR_SET_MM_MAP)", libc::SYS_prctl, args);
    if r.is_err() && exe_fd != u32::MAX {
        // Some kernels refuse the exe link change; the layout (brk above all) is what matters.
        tracing::warn!(target: "guard", "PR_SET_MM_MAP with the exe link failed; /proc/PID/exe will name the guard");
        let mut bytes = build(u32::MAX, base + 104);
        bytes.extend_from_slice(&auxv);
        d.data(&bytes)?;
        d.sys("prctl(PR_SET_MM_MAP)", libc::SYS_prctl, args)?;
    } else {
        r?;
    }
    if exe_fd != u32::MAX {
        d.sys("close", libc::SYS_close, [u64::from(exe_fd), 0, 0, 0, 0, 0])?;
    }
    Ok(())
}

/// Installs description `held` (fd `.1` of process `.0`, pids inside the namespace) as fd
/// `target` of the process `d` drives (pid `me`): a dup within one process, `pidfd_open` +
/// `pidfd_getfd` across processes (both give the same open file description, as fork did).
fn install(d: &mut Driver, me: i32, held: (i32, i32), target: i32, cloexec: bool) -> Result<()> {
    let (hp, hfd) = held;
    let tmp = if hp == me {
        d.sys(
            "fcntl(F_DUPFD)",
            libc::SYS_fcntl,
            [hfd as u64, libc::F_DUPFD as u64, 0, 0, 0, 0],
        )?
    } else {
        let pfd = d.sys(
            &format!("pidfd_open({hp})"),
            libc::SYS_pidfd_open,
            [hp as u64, 0, 0, 0, 0, 0],
        )?;
        let r = d.sys(
            &format!("pidfd_getfd(fd {hfd} of process {hp})"),
            libc::SYS_pidfd_getfd,
            [pfd, hfd as u64, 0, 0, 0, 0],
        );
        d.sys("close", libc::SYS_close, [pfd, 0, 0, 0, 0, 0])?;
        r?
    };
    d.place(tmp, target, cloexec)
}

/// Rebuilds one process's fd table. `tree` is `(this process's pid, every process's state)`;
/// descriptions shared with processes rebuilt earlier are installed from them (`reg`), the
/// rest are created and recorded in `reg`. Pipe ends this process does not hold itself stay
/// open at fds listed in `held` until every process is rebuilt.
fn restore_fds(
    d: &mut Driver,
    fds: &[Fd],
    stub_fds: &[i32],
    pidfd: std::os::fd::BorrowedFd<'_>,
    tree: (i32, &[&ProcState]),
    reg: &mut Registry,
    held: &mut Vec<u64>,
) -> Result<SocketLog> {
    let (me, tree) = tree;
    let high = fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) as u64 + 1;
    let cloexec = |f: &Fd| f.flags & libc::O_CLOEXEC != 0;
    let nb = |f: &Fd| f.flags & libc::O_NONBLOCK != 0;
    let mut done_pipes: Vec<u64> = Vec::new();
    let mut socklog = SocketLog::default();
    let mut sock_fds: Vec<(i32, i32, Vec<crate::model::SockOpt>)> = Vec::new();
    for f in fds {
        if f.desc != 0
            && f.kind != FdKind::Inherited
            && !matches!(f.kind, FdKind::Epoll { .. })
            && let Some(&h) = reg.get(&f.desc)
        {
            install(d, me, h, f.fd, cloexec(f))?;
            continue;
        }
        match &f.kind {
            FdKind::Epoll { .. } => {}
            FdKind::Inherited if stub_fds.contains(&f.fd) => {}
            FdKind::Inherited => {
                // The restorer does not have it (restored elsewhere): a harmless stand-in.
                let pa = d.path("/dev/null")?;
                let fd = d.sys(
                    "open /dev/null",
                    libc::SYS_openat,
                    [libc::AT_FDCWD as u64, pa, libc::O_RDWR as u64, 0, 0, 0],
                )?;
                d.place(fd, f.fd, cloexec(f))?;
            }
            FdKind::File { path, pos, .. } => {
                let pa = d.path(path)?;
                let flags =
                    f.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC);
                let fd = d.sys(
                    &format!("open {path}"),
                    libc::SYS_openat,
                    [libc::AT_FDCWD as u64, pa, flags as u64, 0, 0, 0],
                )?;
                d.place(fd, f.fd, cloexec(f))?;
                if *pos > 0 {
                    d.sys(
                        &format!("lseek {path}"),
                        libc::SYS_lseek,
                        [f.fd as u64, *pos, libc::SEEK_SET as u64, 0, 0, 0],
                    )?;
                }
            }
            FdKind::Dir { path } => {
                let pa = d.path(path)?;
                let flags = (f.flags & !libc::O_CLOEXEC) | libc::O_DIRECTORY;
                let fd = d.sys(
                    &format!("open directory {path}"),
                    libc::SYS_openat,
                    [libc::AT_FDCWD as u64, pa, flags as u64, 0, 0, 0],
                )?;
                d.place(fd, f.fd, cloexec(f))?;
            }
            FdKind::Pipe {
                inode, write_end, ..
            } if f.desc != 0 => {
                // A new pipe: both ends are created here; the end (or description) other
                // processes hold is taken from here by them.
                let ends: Vec<&Fd> = tree
                    .iter()
                    .flat_map(|p| p.fds.iter())
                    .filter(|g| matches!(g.kind, FdKind::Pipe { inode: i, .. } if i == *inode))
                    .collect();
                let a = d.data(&[0u8; 8])?;
                d.sys("pipe2", libc::SYS_pipe2, [a, 0, 0, 0, 0, 0])?;
                let mut b = [0u8; 8];
                d.mem
                    .read_exact_at(a, &mut b)
                    .map_err(|e| Error::sys("reading pipe fds", e))?;
                let r = u64::from(u32::from_le_bytes(b[..4].try_into().expect("4 bytes")));
                let w = u64::from(u32::from_le_bytes(b[4..].try_into().expect("4 bytes")));
                let mut moved = [0u64; 2];
                for (i, end) in [r, w].into_iter().enumerate() {
                    moved[i] = d.sys(
                        "fcntl(F_DUPFD)",
                        libc::SYS_fcntl,
                        [end, libc::F_DUPFD as u64, high, 0, 0, 0],
                    )?;
                    d.sys("close", libc::SYS_close, [end, 0, 0, 0, 0, 0])?;
                    held.push(moved[i]);
                    let we = i == 1;
                    let descs = ends.iter().filter(
                        |g| matches!(g.kind, FdKind::Pipe { write_end, .. } if write_end == we),
                    );
                    let mut flagged = false;
                    for g in descs {
                        if !flagged && nb(g) {
                            d.sys(
                                "fcntl(F_SETFL O_NONBLOCK)",
                                libc::SYS_fcntl,
                                [
                                    moved[i],
                                    libc::F_SETFL as u64,
                                    libc::O_NONBLOCK as u64,
                                    0,
                                    0,
                                    0,
                                ],
                            )?;
                        }
                        flagged = true;
                        reg.entry(g.desc).or_insert((me, moved[i] as i32));
                    }
                }
                // Bytes that were buffered in the pipe go back in, through our copy of its
                // write end.
                for e in &ends {
                    if let FdKind::Pipe { data, capacity, .. } = &e.kind
                        && !data.is_empty()
                    {
                        let copy = sys::guard_fd::pidfd_getfd(pidfd, moved[1] as i32)
                            .map_err(|e| Error::sys("pidfd_getfd of a rebuilt pipe", e))?;
                        sys::guard_fd::pipe_fill(copy.as_fd(), data, *capacity as usize)
                            .map_err(|e| Error::sys("refilling a pipe", e))?;
                    }
                }
                let mine = moved[usize::from(*write_end)];
                install(d, me, (me, mine as i32), f.fd, cloexec(f))?;
                continue;
            }
            FdKind::Pipe { inode, .. } => {
                if done_pipes.contains(inode) {
                    continue;
                }
                done_pipes.push(*inode);
                let ends: Vec<&Fd> = fds
                    .iter()
                    .filter(|g| matches!(g.kind, FdKind::Pipe { inode: i, .. } if i == *inode))
                    .collect();
                let a = d.data(&[0u8; 8])?;
                let fl = if nb(f) { libc::O_NONBLOCK } else { 0 };
                d.sys("pipe2", libc::SYS_pipe2, [a, fl as u64, 0, 0, 0, 0])?;
                let mut b = [0u8; 8];
                d.mem
                    .read_exact_at(a, &mut b)
                    .map_err(|e| Error::sys("reading pipe fds", e))?;
                let r = u64::from(u32::from_le_bytes(b[..4].try_into().expect("4 bytes")));
                let w = u64::from(u32::from_le_bytes(b[4..].try_into().expect("4 bytes")));
                // Move both ends out of the way of the target numbers first.
                let r2 = d.sys(
                    "fcntl(F_DUPFD)",
                    libc::SYS_fcntl,
                    [r, libc::F_DUPFD as u64, high, 0, 0, 0],
                )?;
                let w2 = d.sys(
                    "fcntl(F_DUPFD)",
                    libc::SYS_fcntl,
                    [w, libc::F_DUPFD as u64, high, 0, 0, 0],
                )?;
                d.sys("close", libc::SYS_close, [r, 0, 0, 0, 0, 0])?;
                d.sys("close", libc::SYS_close, [w, 0, 0, 0, 0, 0])?;
                for e in ends {
                    let we = matches!(
                        e.kind,
                        FdKind::Pipe {
                            write_end: true,
                            ..
                        }
                    );
                    let src = if we { w2 } else { r2 };
                    d.sys(
                        "dup3",
                        libc::SYS_dup3,
                        [
                            src,
                            e.fd as u64,
                            if cloexec(e) {
                                libc::O_CLOEXEC as u64
                            } else {
                                0
                            },
                            0,
                            0,
                            0,
                        ],
                    )?;
                }
                // Bytes that were buffered in the pipe go back in, through our copy of its
                // write end.
                for e in fds.iter() {
                    if let FdKind::Pipe {
                        inode: i,
                        data,
                        capacity,
                        ..
                    } = &e.kind
                        && i == inode
                        && !data.is_empty()
                    {
                        let copy = sys::guard_fd::pidfd_getfd(pidfd, w2 as i32)
                            .map_err(|e| Error::sys("pidfd_getfd of a rebuilt pipe", e))?;
                        sys::guard_fd::pipe_fill(copy.as_fd(), data, *capacity as usize)
                            .map_err(|e| Error::sys("refilling a pipe", e))?;
                    }
                }
                d.sys("close", libc::SYS_close, [r2, 0, 0, 0, 0, 0])?;
                d.sys("close", libc::SYS_close, [w2, 0, 0, 0, 0, 0])?;
            }
            FdKind::TcpListen {
                v6,
                addr,
                port,
                backlog,
                sockopts,
            } => {
                let fam = if *v6 { libc::AF_INET6 } else { libc::AF_INET };
                let ty = libc::SOCK_STREAM | if nb(f) { libc::SOCK_NONBLOCK } else { 0 };
                let s = d.sys(
                    "socket",
                    libc::SYS_socket,
                    [fam as u64, ty as u64, 0, 0, 0, 0],
                )?;
                d.place(s, f.fd, cloexec(f))?;
                let mut opts = vec![crate::model::SockOpt {
                    level: libc::SOL_SOCKET,
                    name: libc::SO_REUSEADDR,
                    value: 1,
                }];
                opts.extend(sockopts.iter().cloned());
                for o in &opts {
                    let a = d.data(&o.value.to_le_bytes())?;
                    d.sys(
                        "setsockopt",
                        libc::SYS_setsockopt,
                        [f.fd as u64, o.level as u64, o.name as u64, a, 4, 0],
                    )?;
                }
                let sa = sockaddr(*v6, addr, *port);
                let a = d.data(&sa)?;
                d.sys(
                    &format!("bind to port {port}"),
                    libc::SYS_bind,
                    [f.fd as u64, a, sa.len() as u64, 0, 0, 0],
                )?;
                d.sys(
                    "listen",
                    libc::SYS_listen,
                    [f.fd as u64, *backlog as u64, 0, 0, 0, 0],
                )?;
                sock_fds.push((f.fd, *backlog, sockopts.clone()));
            }
            FdKind::Udp { v6, addr, port } => {
                let fam = if *v6 { libc::AF_INET6 } else { libc::AF_INET };
                let ty = libc::SOCK_DGRAM | if nb(f) { libc::SOCK_NONBLOCK } else { 0 };
                let s = d.sys(
                    "socket",
                    libc::SYS_socket,
                    [fam as u64, ty as u64, 0, 0, 0, 0],
                )?;
                d.place(s, f.fd, cloexec(f))?;
                if *port != 0 {
                    let sa = sockaddr(*v6, addr, *port);
                    let a = d.data(&sa)?;
                    d.sys(
                        &format!("bind UDP port {port}"),
                        libc::SYS_bind,
                        [f.fd as u64, a, sa.len() as u64, 0, 0, 0],
                    )?;
                }
            }
            FdKind::TcpOther { v6 } => {
                let fam = if *v6 { libc::AF_INET6 } else { libc::AF_INET };
                let s = d.sys(
                    "socket",
                    libc::SYS_socket,
                    [fam as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0],
                )?;
                d.place(s, f.fd, cloexec(f))?;
            }
            FdKind::EventFd { count } => {
                let fl = f.flags & libc::O_NONBLOCK;
                let e = d.sys(
                    "eventfd2",
                    libc::SYS_eventfd2,
                    [*count, fl as u64, 0, 0, 0, 0],
                )?;
                d.place(e, f.fd, cloexec(f))?;
            }
            FdKind::TimerFd {
                clock,
                value_ns,
                interval_ns,
            } => {
                let fl = f.flags & libc::O_NONBLOCK;
                let t = d.sys(
                    "timerfd_create",
                    libc::SYS_timerfd_create,
                    [*clock as u64, fl as u64, 0, 0, 0, 0],
                )?;
                d.place(t, f.fd, cloexec(f))?;
                // A periodic timerfd that expired is re-armed only when read: /proc shows
                // it_value 0 then. Expire it at once; the program reads the pending tick.
                let value_ns = if *value_ns == 0 && *interval_ns > 0 {
                    1
                } else {
                    *value_ns
                };
                if value_ns > 0 {
                    let mut b = Vec::new();
                    for v in [
                        interval_ns / 1_000_000_000,
                        interval_ns % 1_000_000_000,
                        value_ns / 1_000_000_000,
                        value_ns % 1_000_000_000,
                    ] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                    let a = d.data(&b)?;
                    d.sys(
                        "timerfd_settime",
                        libc::SYS_timerfd_settime,
                        [f.fd as u64, 0, a, 0, 0, 0],
                    )?;
                }
            }
            FdKind::SignalFd { mask } => {
                let a = d.data(&mask.to_le_bytes())?;
                let fl = f.flags & libc::O_NONBLOCK;
                let s = d.sys(
                    "signalfd4",
                    libc::SYS_signalfd4,
                    [u64::MAX, a, 8, fl as u64, 0, 0],
                )?;
                d.place(s, f.fd, cloexec(f))?;
            }
        }
        if f.desc != 0 && !matches!(f.kind, FdKind::Epoll { .. } | FdKind::Inherited) {
            reg.entry(f.desc).or_insert((me, f.fd));
        }
    }
    for f in fds {
        if let FdKind::Epoll { entries } = &f.kind {
            if f.desc != 0
                && let Some(&h) = reg.get(&f.desc)
            {
                install(d, me, h, f.fd, cloexec(f))?;
                continue;
            }
            let e = d.sys("epoll_create1", libc::SYS_epoll_create1, [0, 0, 0, 0, 0, 0])?;
            d.place(e, f.fd, cloexec(f))?;
            if f.desc != 0 {
                reg.insert(f.desc, (me, f.fd));
            }
            for (tfd, events, data) in entries {
                let mut b = events.to_le_bytes().to_vec();
                b.extend_from_slice(&data.to_le_bytes());
                let a = d.data(&b)?;
                d.sys(
                    &format!("epoll_ctl add {tfd}"),
                    libc::SYS_epoll_ctl,
                    [
                        f.fd as u64,
                        libc::EPOLL_CTL_ADD as u64,
                        *tfd as u64,
                        a,
                        0,
                        0,
                    ],
                )?;
            }
        }
    }
    for n in 0..3 {
        if !fds.iter().any(|f| f.fd == n) {
            d.sys("close", libc::SYS_close, [n as u64, 0, 0, 0, 0, 0])?;
        }
    }
    // Re-key socket facts by the new sockets' inodes, for the next checkpoints.
    for (fd, backlog, opts) in sock_fds {
        if let Ok(l) = std::fs::read_link(format!("/proc/{}/fd/{fd}", d.pid))
            && let Some(ino) = l
                .to_str()
                .and_then(|s| s.strip_prefix("socket:["))
                .and_then(|s| s.trim_end_matches(']').parse().ok())
        {
            socklog.backlog.insert(ino, backlog);
            socklog.sockopts.insert(ino, opts);
        }
    }
    Ok(socklog)
}

/// `struct sockaddr_in` / `sockaddr_in6` bytes.
fn sockaddr(v6: bool, addr: &[u8; 16], port: u16) -> Vec<u8> {
    let fam = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let mut sa = Vec::with_capacity(28);
    sa.extend_from_slice(&(fam as u16).to_le_bytes());
    sa.extend_from_slice(&port.to_be_bytes());
    if v6 {
        sa.extend_from_slice(&[0u8; 4]);
        sa.extend_from_slice(addr);
        sa.extend_from_slice(&[0u8; 4]);
    } else {
        sa.extend_from_slice(&addr[..4]);
        sa.extend_from_slice(&[0u8; 8]);
    }
    sa
}

fn restore_signals(d: &mut Driver, st: &ProcState) -> Result<()> {
    let handlers: BTreeMap<i32, crate::model::SigAction> = st.sigactions.iter().copied().collect();
    for sig in 1..=64i32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let (h, fl, rs, mask) = match handlers.get(&sig) {
            Some(a) => (a.handler, a.flags, a.restorer, a.mask),
            None if st.ignored & (1u64 << (sig - 1)) != 0 => (1, 0, 0, 0),
            None => (0, 0, 0, 0),
        };
        let mut b = Vec::with_capacity(32);
        for w in [h, fl, rs, mask] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let a = d.data(&b)?;
        d.sys(
            &format!("rt_sigaction({sig})"),
            libc::SYS_rt_sigaction,
            [sig as u64, a, 0, 8, 0, 0],
        )?;
    }
    for t in &st.itimers {
        let value = if t.interval_us > 0 {
            t.interval_us
        } else {
            t.value_us
        };
        if value == 0 {
            continue;
        }
        let mut b = Vec::new();
        for v in [
            t.interval_us / 1_000_000,
            t.interval_us % 1_000_000,
            value / 1_000_000,
            value % 1_000_000,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let a = d.data(&b)?;
        d.sys(
            "setitimer",
            libc::SYS_setitimer,
            [t.which as u64, a, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}
