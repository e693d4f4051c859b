//! One epoch's checkpoint: stop the program (ptrace seize + interrupt), commit the log
//! against /proc, take the pages written since the last epoch (uffd-wp async +
//! PAGEMAP_SCAN, registering new mappings as they appear), registers, fd table; resume.
//! Writing the layer to disk happens after the program runs again.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sys::Pid;
use sys::pidfd::PidFd;
use sys::ptrace::{self, Stopped, Tracee};
use sys::uffd::{PageMap, Scan, WpTracker};

use crate::image::{Layer, PageRuns, StateRecord};
use crate::log::Log;
use crate::model::{ProcState, ThreadState, Vma, VmaKind};
use crate::procfs;
use crate::procfs::FdObj;
use crate::{Error, Result};

/// Fixed facts about the guarded program.
#[derive(Debug, Clone)]
pub struct Program {
    pub argv: Vec<String>,
    /// The guard's stdio at launch `(fd, dev, ino)`: passed through on restore.
    pub inherited: Vec<(i32, u64, u64)>,
    /// Runs in its own network namespace.
    pub net: bool,
}

/// The guard's handle on one incarnation of the program (launched or restored): pid 1 of its
/// namespace and every process it forked.
#[derive(Debug)]
pub struct Incarnation {
    /// Pid 1 of the program's namespace (host pid): when it dies, the namespace dies.
    pub pid: Pid,
    pub pidfd: PidFd,
    /// Per process of the tree (host pid), what the tracker knows; pid 1 included.
    procs: BTreeMap<i32, Proc>,
}

/// Dirty tracking and cached facts of one process of the tree.
#[derive(Debug)]
pub(crate) struct Proc {
    pid: Pid,
    pidfd: PidFd,
    tracker: Option<WpTracker>,
    pagemap: Option<PageMap>,
    /// Mappings as of the last checkpoint, with their base layer.
    known: Vec<Vma>,
    insn: Option<u64>,
    brk: u64,
    /// Clear-child-tid address per thread (host tid).
    clear_tids: std::collections::HashMap<Pid, u64>,
    /// Ranges of the last checkpoint to copy after the program resumes.
    late: Vec<(u64, usize)>,
    /// Pid inside the program's namespace.
    nspid: i32,
}

/// The kernel's "restart this call" result (not visible to programs).
const ERESTARTSYS: i64 = 512;

/// Whole-mapping captures at least this big are copied after the program resumes.
const LATE_COPY_MIN: usize = 8 << 20;

/// What one checkpoint cost.
#[derive(Debug, Clone, Copy)]
pub struct EpochStats {
    pub pause: Duration,
    pub page_bytes: u64,
}

/// One stopped process of the tree.
struct StoppedProc {
    pid: Pid,
    /// Its parent (host pid); None for pid 1.
    parent: Option<Pid>,
    /// Every thread, the leader first.
    threads: Vec<Tracee<Stopped>>,
}

/// The whole tree, stopped: live processes (parents before children) and zombies
/// `(pid, parent, wait status)`.
#[derive(Default)]
struct StoppedTree {
    procs: Vec<StoppedProc>,
    zombies: Vec<(Pid, Pid, i32)>,
}

impl StoppedTree {
    fn resume(self) -> std::io::Result<()> {
        let mut res = Ok(());
        // Children first, and in each process the leader last, so nothing runs before every
        // thread of its process is free.
        for p in self.procs.into_iter().rev() {
            for t in p.threads.into_iter().rev() {
                let r = t.detach();
                if res.is_ok() {
                    res = r.map(|_| ());
                }
            }
        }
        res
    }
}

fn gone(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ESRCH) || ptrace::ended(e).is_some()
}

/// Seizes and stops every thread of `pid` (leader first), re-listing until no new thread
/// appeared (a running thread may create one while we stop the others).
fn stop_threads(pid: Pid) -> std::io::Result<Vec<Tracee<Stopped>>> {
    let opts = ptrace::O_TRACESYSGOOD | ptrace::O_SUSPEND_SECCOMP;
    let stop =
        |tid: Pid| -> std::io::Result<Tracee<Stopped>> { ptrace::seize(tid, opts)?.interrupt() };
    let mut stopped: Vec<Tracee<Stopped>> = vec![stop(pid)?];
    loop {
        let new: Vec<Pid> = procfs::tasks(pid)
            .into_iter()
            .filter(|t| !stopped.iter().any(|s| s.pid() == *t))
            .collect();
        if new.is_empty() {
            return Ok(stopped);
        }
        for tid in new {
            match stop(tid) {
                Ok(t) => stopped.push(t),
                // The thread exited meanwhile.
                Err(e) if gone(&e) => {}
                Err(e) => {
                    for t in stopped.into_iter().rev() {
                        let _ = t.detach();
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// [`stop_threads`] for a child that may be exiting right now: ptrace refuses (EPERM) a
/// process that is on its way out, so that is retried briefly until it is a zombie or gone
/// (reported as ESRCH) or can be stopped after all.
fn stop_exiting_aware(pid: Pid) -> std::io::Result<Vec<Tracee<Stopped>>> {
    for _ in 0..50 {
        match stop_threads(pid) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => match procfs::run_state(pid) {
                None | Some(('Z' | 'X', _)) => {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Some(_) => std::thread::sleep(Duration::from_micros(200)),
            },
            r => return r,
        }
    }
    stop_threads(pid)
}

/// Children of `pid` made by any of its threads (host pids).
fn children(pid: Pid, threads: &[Tracee<Stopped>]) -> Vec<Pid> {
    let mut out = Vec::new();
    for t in threads {
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{}/children", t.pid()))
            .unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse().ok())
                .filter_map(Pid::from_raw),
        );
    }
    out
}

impl Proc {
    fn new(pid: Pid, nspid: i32) -> Result<Proc> {
        let pidfd =
            PidFd::open(pid).map_err(|e| Error::sys("pidfd_open of a program process", e))?;
        Ok(Proc {
            pid,
            pidfd,
            tracker: None,
            pagemap: None,
            known: Vec::new(),
            insn: None,
            brk: 0,
            clear_tids: Default::default(),
            late: Vec::new(),
            nspid,
        })
    }

    /// A restored process whose tracker is already armed over `known`.
    pub(crate) fn restored(
        pid: Pid,
        nspid: i32,
        tracker: Option<WpTracker>,
        known: Vec<Vma>,
        brk: u64,
    ) -> Result<Proc> {
        let mut p = Proc::new(pid, nspid)?;
        if tracker.is_some() {
            p.pagemap = Some(
                PageMap::open(pid)
                    .map_err(|e| Error::sys("opening the restored program's pagemap", e))?,
            );
        }
        p.tracker = tracker;
        p.known = known;
        p.brk = brk;
        Ok(p)
    }
}

impl Incarnation {
    /// A freshly launched program: nothing tracked yet, the first checkpoint is full.
    pub fn launched(pid: Pid) -> Result<Incarnation> {
        let pidfd = PidFd::open(pid).map_err(|e| Error::sys("pidfd_open of the program", e))?;
        Ok(Incarnation {
            pid,
            pidfd,
            procs: BTreeMap::new(),
        })
    }

    /// A restored program tree whose trackers are already armed (state of the layer restored).
    pub(crate) fn restored(pid: Pid, pidfd: PidFd, procs: Vec<Proc>) -> Incarnation {
        Incarnation {
            pid,
            pidfd,
            procs: procs.into_iter().map(|p| (p.pid.as_raw(), p)).collect(),
        }
    }

    /// Copies the ranges the last checkpoint left for after the resume into `layer` (the
    /// program runs meanwhile; see `LATE_COPY_MIN`). A range that vanished is skipped: its
    /// mapping changed and the next layer captures it anew.
    pub fn copy_late(&mut self, layer: &mut Layer) {
        for p in self.procs.values_mut() {
            let late = std::mem::take(&mut p.late);
            let mut pages = Vec::new();
            for group in late.chunks(256) {
                match sys::remote_mem::read_runs(p.pid, group) {
                    Ok(bufs) => pages.extend(group.iter().map(|r| r.0).zip(bufs)),
                    Err(_) => {
                        for &(a, l) in group {
                            let mut b = vec![0u8; l];
                            if sys::remote_mem::read(p.pid, a, &mut b).is_ok() {
                                pages.push((a, b));
                            }
                        }
                    }
                }
            }
            layer.add_pages(p.nspid, pages);
        }
    }

    /// Forgets what was captured: the next checkpoint captures every mapping in full.
    pub fn force_full(&mut self) {
        for p in self.procs.values_mut() {
            p.known.clear();
        }
    }

    /// Takes checkpoint `seq`. The whole process tree is stopped for the duration of this call.
    pub fn checkpoint(
        &mut self,
        prog: &Program,
        log: &Mutex<Log>,
        seq: u64,
    ) -> Result<(Layer, EpochStats)> {
        let t0 = Instant::now();
        let mut tree = self.stop_tree()?;
        let t1 = t0.elapsed();
        let res = self.stopped_checkpoint(&mut tree, prog, log, seq);
        let t2 = t0.elapsed();
        let resumed = tree.resume();
        let pause = t0.elapsed();
        tracing::debug!(target: "guard", "epoch {seq}: stop {t1:?}, capture {:?}, resume {:?}", t2 - t1, pause - t2);
        let layer = res?;
        resumed.map_err(|e| Error::sys("resuming the program", e))?;
        let page_bytes = layer.page_bytes();
        Ok((layer, EpochStats { pause, page_bytes }))
    }

    /// Stops pid 1, then its children, theirs… (re-reading each newly stopped process's
    /// children, so a process forked while we were stopping its parent is found: a stopped
    /// process forks no more). Zombies are noted, not stopped.
    fn stop_tree(&mut self) -> Result<StoppedTree> {
        let mut tree = StoppedTree::default();
        let root = stop_threads(self.pid).map_err(|e| Error::sys("stopping the program", e))?;
        tree.procs.push(StoppedProc {
            pid: self.pid,
            parent: None,
            threads: root,
        });
        let mut from = 0;
        while from < tree.procs.len() {
            let upto = tree.procs.len();
            let mut found: Vec<(Pid, Pid)> = Vec::new();
            for p in &tree.procs[from..upto] {
                for c in children(p.pid, &p.threads) {
                    if !found.iter().any(|f| f.0 == c) {
                        found.push((c, p.pid));
                    }
                }
            }
            from = upto;
            for (c, parent) in found {
                if tree.procs.iter().any(|p| p.pid == c) || tree.zombies.iter().any(|z| z.0 == c) {
                    continue;
                }
                match procfs::run_state(c) {
                    None => continue,
                    Some(('Z', code)) => {
                        tree.zombies.push((c, parent, code));
                        continue;
                    }
                    Some(_) => {}
                }
                match stop_exiting_aware(c) {
                    Ok(threads) => tree.procs.push(StoppedProc {
                        pid: c,
                        parent: Some(parent),
                        threads,
                    }),
                    Err(e) if gone(&e) => {
                        // It exited meanwhile: a zombie now, unless it was reaped already.
                        if let Some(('Z', code)) = procfs::run_state(c) {
                            tree.zombies.push((c, parent, code));
                        }
                    }
                    Err(e) => {
                        let _ = tree.resume();
                        return Err(Error::sys(
                            format!("stopping child process {c} of the program"),
                            e,
                        ));
                    }
                }
            }
        }
        Ok(tree)
    }

    fn stopped_checkpoint(
        &mut self,
        tree: &mut StoppedTree,
        prog: &Program,
        log: &Mutex<Log>,
        seq: u64,
    ) -> Result<Layer> {
        let mut lg = log.lock().unwrap_or_else(|p| p.into_inner());
        let alive: Vec<i32> = tree.procs.iter().map(|p| p.pid.as_raw()).collect();
        self.procs.retain(|k, _| alive.contains(k));
        lg.retain_processes(&alive);
        for p in &tree.procs {
            for t in &p.threads {
                lg.tgids.insert(t.pid().as_raw(), p.pid.as_raw());
            }
        }
        let mut tids = std::mem::take(&mut lg.exec_seen);
        let exec_seen = lg.processes_of(&mut tids, &alive);
        let mut tids = std::mem::take(&mut lg.brk_changed);
        let brk_changed = lg.processes_of(&mut tids, &alive);
        let nspid = |pid: Pid| procfs::ns_tid(pid, pid).unwrap_or(1);
        let mut refusals = lg.refusals.clone();
        let mut states: Vec<ProcState> = Vec::new();
        let mut fds: Vec<(Pid, Vec<FdObj>)> = Vec::new();
        let mut peeked: Vec<u64> = Vec::new();
        let mut layer = Layer {
            seq,
            full: false,
            state: StateRecord {
                state: ProcState::default(),
                log: Vec::new(),
                log_dropped: 0,
            },
            pages: Vec::new(),
            tree_pages: Vec::new(),
        };
        let mut incomplete = false;
        // Host pid → pid inside the namespace, and (pgrp, session, exit signal) in host pids.
        let mut host_ns: HashMap<i32, i32> = HashMap::new();
        let mut groups: Vec<(i32, i32, i32)> = Vec::new();
        for sp in tree.procs.iter_mut() {
            let key = sp.pid.as_raw();
            if let std::collections::btree_map::Entry::Vacant(e) = self.procs.entry(key) {
                e.insert(Proc::new(sp.pid, nspid(sp.pid))?);
            }
            let p = self.procs.get_mut(&key).expect("inserted above");
            let ppid = sp.parent.map(nspid).unwrap_or(0);
            if let Some(parent) = sp.parent
                && sys::guard_fd::same_mm(sp.pid, parent).unwrap_or(false)
            {
                refusals.push(format!(
                    "process {} shares its parent's memory (a vfork or CLONE_VM child before its exec)",
                    p.nspid
                ));
            }
            let changed = (exec_seen.contains(&key), brk_changed.contains(&key));
            let (mut st, pages, pfds, prefusals) =
                p.capture(&mut sp.threads, prog, &mut lg, seq, &mut peeked, changed)?;
            st.ppid = ppid;
            host_ns.insert(key, p.nspid);
            groups.push(procfs::tree_fields(sp.pid).unwrap_or((0, 0, libc::SIGCHLD)));
            incomplete |= !p.late.is_empty();
            refusals.extend(prefusals);
            layer.add_pages(p.nspid, pages);
            fds.push((sp.pid, pfds));
            states.push(st);
        }
        assign_descs(&mut fds);
        self.mark_closed_peers(&mut fds);
        let all: Vec<crate::model::Fd> = fds
            .iter()
            .flat_map(|(_, v)| v.iter().map(|f| f.0.clone()))
            .collect();
        refusals.extend(procfs::pipe_refusals(&all));
        for (st, (_, v)) in states.iter_mut().zip(fds) {
            st.fds = v.into_iter().map(|f| f.0).collect();
        }
        // Groups and sessions led from inside the tree, as its pids; 0 for the guard's own.
        for (st, &(pgrp, sid, exit_signal)) in states.iter_mut().zip(&groups) {
            st.pgid = host_ns.get(&pgrp).copied().unwrap_or(0);
            st.sid = host_ns.get(&sid).copied().unwrap_or(0);
            st.exit_signal = exit_signal;
        }
        for &(z, parent, code) in &tree.zombies {
            states.push(ProcState {
                argv: prog.argv.clone(),
                nspid: nspid(z),
                ppid: nspid(parent),
                zombie: Some(code),
                ..Default::default()
            });
        }
        let mut it = states.into_iter();
        let mut root = it.next().expect("pid 1 is stopped");
        root.procs = it.collect();
        root.refusals = refusals;
        root.incomplete = incomplete;
        lg.rebaseline.clear();
        let (entries, dropped) = lg.take_delta();
        layer.state = StateRecord {
            state: root,
            log: entries,
            log_dropped: dropped,
        };
        Ok(layer)
    }
}

impl Incarnation {
    /// A pipe end whose other end no process of the tree holds: if nobody holds it (the
    /// writers all exited, say), it is marked `peer_closed` and rebuilt so; otherwise it stays
    /// unmarked and the layer is refused (see `procfs::pipe_refusals`).
    fn mark_closed_peers(&self, fds: &mut [(Pid, Vec<FdObj>)]) {
        let all: Vec<crate::model::Fd> = fds
            .iter()
            .flat_map(|(_, v)| v.iter().map(|f| f.0.clone()))
            .collect();
        let lonely = procfs::one_ended_pipes(&all);
        if lonely.is_empty() {
            return;
        }
        for (pid, v) in fds.iter_mut() {
            let Some(p) = self.procs.get(&pid.as_raw()) else {
                continue;
            };
            for (f, _, _) in v.iter_mut() {
                let fd = f.fd;
                if let crate::model::FdKind::Pipe {
                    inode,
                    write_end,
                    peer_closed,
                    ..
                } = &mut f.kind
                    && lonely.contains(&(*inode, *write_end))
                {
                    *peer_closed = sys::guard_fd::pidfd_getfd(p.pidfd.as_fd(), fd)
                        .and_then(|c| sys::guard_fd::pipe_peer_closed(c.as_fd(), *write_end))
                        .unwrap_or(false);
                }
            }
        }
    }
}

/// Numbers the open file descriptions of the tree: fds naming the same object (dev, ino) are
/// compared with `kcmp(KCMP_FILE)`, and those that are one description (dup, fork) share a
/// number.
fn assign_descs(all: &mut [(Pid, Vec<FdObj>)]) {
    let mut next = 1u64;
    // (dev, ino) → the descriptions seen on it: (process, fd, number).
    type Reps = Vec<(Pid, i32, u64)>;
    let mut seen: HashMap<(u64, u64), Reps> = HashMap::new();
    for (pid, fds) in all.iter_mut() {
        for (f, dev, ino) in fds.iter_mut() {
            let reps = seen.entry((*dev, *ino)).or_default();
            let found = reps
                .iter()
                .find(|(p, n, _)| sys::guard_fd::same_file(*p, *n, *pid, f.fd).unwrap_or(false))
                .map(|r| r.2);
            f.desc = match found {
                Some(d) => d,
                None => {
                    let d = next;
                    next += 1;
                    reps.push((*pid, f.fd, d));
                    d
                }
            };
        }
    }
}

impl Proc {
    fn inject(&mut self, t: &mut Tracee<Stopped>, nr: i64, args: [u64; 6]) -> Result<i64> {
        let insn = match self.insn {
            Some(i) => i,
            None => {
                let i = sys::remote_mem::find_syscall_insn(self.pid)
                    .map_err(|e| Error::sys("finding a syscall instruction", e))?;
                self.insn = Some(i);
                i
            }
        };
        // While registers are borrowed, a guard that dies must take the program with it
        // (a new guard restores it from disk) rather than let it run on foreign registers.
        // Detaching clears the option again.
        t.set_options(ptrace::O_TRACESYSGOOD | ptrace::O_SUSPEND_SECCOMP | ptrace::O_EXITKILL)
            .map_err(|e| Error::sys("setting ptrace options", e))?;
        t.inject_syscall(insn, nr, args)
            .map_err(|e| Error::sys("injecting a syscall", e))
    }

    /// Runs syscall `nr` in thread `t` with an output buffer of `len` bytes below the red zone
    /// of its stack (whose bytes are put back); `args` gets the buffer's address. Returns the
    /// call's result and what it wrote there.
    fn inject_out(
        &mut self,
        t: &mut Tracee<Stopped>,
        nr: i64,
        args: impl Fn(u64) -> [u64; 6],
        len: usize,
    ) -> Result<(i64, Vec<u8>)> {
        let regs = t.regs().map_err(|e| Error::sys("reading registers", e))?;
        let slot = (regs.rsp - 512 - len as u64) & !15;
        let mem = sys::remote_mem::MemFile::open(self.pid)
            .map_err(|e| Error::sys("opening /proc/PID/mem", e))?;
        let mut saved = vec![0u8; len];
        mem.read_exact_at(slot, &mut saved)
            .map_err(|e| Error::sys("reading the stack", e))?;
        let r = self.inject(t, nr, args(slot));
        let mut got = vec![0u8; len];
        let read = mem.read_exact_at(slot, &mut got);
        let put = mem.write_all_at(slot, &saved);
        t.restore_regs(&regs)
            .map_err(|e| Error::sys("restoring registers after injection", e))?;
        let r = r?;
        read.and(put)
            .map_err(|e| Error::sys("reading an injected call's result", e))?;
        Ok((r, got))
    }

    /// Creates the userfaultfd inside the process (only it can: the fd binds to its mm),
    /// takes a copy, and closes the process's own so its fd table stays as it was.
    fn arm_tracker(&mut self, t: &mut Tracee<Stopped>) -> Result<()> {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = self.inject(t, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
        if fd < 0 {
            return Err(Error::sys(
                "userfaultfd() in the program",
                std::io::Error::from_raw_os_error(-fd as i32),
            ));
        }
        let ours = sys::guard_fd::pidfd_getfd(self.pidfd.as_fd(), fd as i32);
        self.inject(t, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        let ours = ours.map_err(|e| Error::sys("pidfd_getfd of the program's userfaultfd", e))?;
        self.tracker = Some(
            WpTracker::new(ours)
                .map_err(|e| Error::sys("UFFDIO_API with WP_ASYNC (needs Linux 6.7+)", e))?,
        );
        self.pagemap =
            Some(PageMap::open(self.pid).map_err(|e| Error::sys("opening /proc/PID/pagemap", e))?);
        self.known.clear();
        Ok(())
    }

    /// Per-thread state that only the thread itself can report: its clear-child-tid address
    /// (`prctl(PR_GET_TID_ADDRESS)`, injected). Cached: it is set once per thread.
    fn clear_tid(&mut self, t: &mut Tracee<Stopped>) -> Result<u64> {
        if let Some(&a) = self.clear_tids.get(&t.pid()) {
            return Ok(a);
        }
        let (r, got) = self.inject_out(
            t,
            libc::SYS_prctl,
            |slot| [libc::PR_GET_TID_ADDRESS as u64, slot, 0, 0, 0, 0],
            8,
        )?;
        if r < 0 {
            return Err(Error::sys(
                "prctl(PR_GET_TID_ADDRESS) in the program",
                std::io::Error::from_raw_os_error(-r as i32),
            ));
        }
        let a = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
        self.clear_tids.insert(t.pid(), a);
        Ok(a)
    }

    /// The handlers of signals `caught`, asked of the process itself (`rt_sigaction(sig,
    /// NULL, &old)`, injected): for a process the log has not followed from its start (a
    /// forked child inherits its parent's handlers as they were at the fork).
    fn read_sigactions(
        &mut self,
        t: &mut Tracee<Stopped>,
        caught: u64,
    ) -> Result<std::collections::BTreeMap<i32, crate::model::SigAction>> {
        let mut out = std::collections::BTreeMap::new();
        for sig in 1..=64i32 {
            if caught & (1u64 << (sig - 1)) == 0 {
                continue;
            }
            let (r, b) = self.inject_out(
                t,
                libc::SYS_rt_sigaction,
                |slot| [sig as u64, 0, slot, 8, 0, 0],
                32,
            )?;
            if r < 0 {
                continue;
            }
            let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            if w(0) > 1 {
                out.insert(
                    sig,
                    crate::model::SigAction {
                        handler: w(0),
                        flags: w(1),
                        restorer: w(2),
                        mask: w(3),
                    },
                );
            }
        }
        Ok(out)
    }

    /// The alternate signal stack of thread `t`, asked of it (`sigaltstack(NULL, &old)`).
    fn read_altstack(&mut self, t: &mut Tracee<Stopped>) -> Result<Option<(u64, i32, u64)>> {
        let (r, b) = self.inject_out(t, libc::SYS_sigaltstack, |slot| [0, slot, 0, 0, 0, 0], 24)?;
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let flags = w(1) as i32;
        Ok((r == 0 && flags & libc::SS_DISABLE == 0 && w(2) != 0).then(|| (w(0), flags, w(2))))
    }

    /// Captures one stopped process: state, pages, fds (with the objects they name).
    fn capture(
        &mut self,
        threads: &mut [Tracee<Stopped>],
        prog: &Program,
        lg: &mut Log,
        seq: u64,
        peeked: &mut Vec<u64>,
        (exec_seen, brk_changed): (bool, bool),
    ) -> Result<(ProcState, PageRuns, Vec<FdObj>, Vec<String>)> {
        let pid = self.pid;
        let key = pid.as_raw();
        let lt = Instant::now();
        let mut lap: Vec<(&str, Duration)> = Vec::new();
        let sys_err = |what: &'static str| move |e: std::io::Error| Error::sys(what, e);
        let (caught, ignored, umask, _threads) =
            procfs::status(pid).map_err(sys_err("reading /proc/PID/status"))?;
        let mut refusals = Vec::new();
        // Registers of every thread before any injection (an injection consumes the kernel's
        // own restart of an interrupted call).
        let mut saved = Vec::with_capacity(threads.len());
        for t in threads.iter_mut() {
            let r = t.regs().map_err(sys_err("reading registers"))?;
            // A trapped call interrupted while waiting for our answer re-executes, signal or
            // not (see `log::restart_after_checkpoint`).
            if -(r.rax as i64) == ERESTARTSYS
                && crate::log::restart_after_checkpoint(r.orig_rax as i64)
            {
                tracing::trace!(target: "guard", "thread {} restarts trapped call {}", t.pid(), r.orig_rax);
                t.restore_regs(&r)
                    .map_err(sys_err("restarting an interrupted trapped call"))?;
            }
            saved.push(r);
        }
        let (leader, _) = threads.split_first_mut().expect("the leader is stopped");
        if exec_seen {
            self.tracker = None;
            self.insn = None;
            self.clear_tids.clear();
        }
        if self.tracker.is_none() || brk_changed || self.brk == 0 {
            if self.tracker.is_none() {
                self.arm_tracker(leader)?;
            }
            self.brk = self.inject(leader, libc::SYS_brk, [0; 6])? as u64;
            leader
                .restore_regs(&saved[0])
                .map_err(sys_err("restoring registers after injection"))?;
        }
        // A process the log has not followed from its start: ask it for its handlers and
        // alternate stacks (what it inherited over fork).
        if !lg.committed_sigactions.contains_key(&key) {
            let got = self.read_sigactions(leader, caught)?;
            lg.sigactions.remove(&key);
            lg.committed_sigactions.insert(key, got);
            for t in threads.iter_mut() {
                let tid = t.pid().as_raw();
                if let std::collections::btree_map::Entry::Vacant(e) = lg.altstacks.entry(tid)
                    && let Some(a) = self.read_altstack(t)?
                {
                    e.insert(a);
                }
            }
        }
        let mut thread_states = Vec::with_capacity(threads.len());
        for (t, regs) in threads.iter_mut().zip(&saved) {
            let tid = t.pid();
            let clear_tid = self.clear_tid(t)?;
            thread_states.push(ThreadState {
                tid: procfs::ns_tid(pid, tid).unwrap_or(1),
                regs: regs_to_words(&ptrace::restart_fixup(regs, true)),
                xstate: t.xstate().map_err(sys_err("reading FPU state"))?,
                sigmask: t.sigmask().map_err(sys_err("reading the signal mask"))?,
                rseq: t.rseq().map_err(sys_err("reading the rseq registration"))?,
                altstack: lg.altstacks.get(&tid.as_raw()).copied(),
                robust: ptrace::robust_list(tid).ok().filter(|r| r.0 != 0),
                clear_tid,
                pending: procfs::pending(pid, tid).0,
            });
        }
        lap.push(("registers", lt.elapsed()));
        let tracker = self.tracker.as_ref().expect("armed above");
        let pagemap = self.pagemap.as_ref().expect("armed with the tracker");
        let mut vmas = procfs::maps(pid).map_err(sys_err("reading /proc/PID/maps"))?;
        let mut ranges: Vec<(u64, usize)> = Vec::new();
        let mut untracked: Vec<u64> = Vec::new();
        let mut rebase_ranges: Vec<(u64, usize)> = Vec::new();
        let first_capture = self.known.is_empty();
        let overlaps = |v: &Vma, r: &[(u64, u64)]| r.iter().any(|&(a, b)| a < v.end && v.start < b);
        for v in &mut vmas {
            let prev = self
                .known
                .iter()
                .find(|k| k.start == v.start && k.end == v.end && k.kind == v.kind);
            let mut rebase = prev.is_none() || overlaps(v, &lg.rebaseline);
            if !procfs::trackable(v) {
                v.base_seq = seq;
                continue;
            }
            let mut runs = Vec::new();
            if !rebase {
                match pagemap
                    .take_written(v.start, v.end)
                    .map_err(sys_err("PAGEMAP_SCAN"))?
                {
                    Scan::Runs(r) => runs = r,
                    Scan::NotTracked => rebase = true,
                }
            }
            let mut late_ok = false;
            if rebase {
                runs = match v.kind {
                    VmaKind::PrivateFile { .. } => pagemap.populated_anon(v.start, v.end),
                    _ => pagemap.populated(v.start, v.end),
                }
                .map_err(sys_err("PAGEMAP_SCAN"))?;
                let len = v.end - v.start;
                if let Err(e) = tracker
                    .register(v.start, len)
                    .and_then(|_| tracker.write_protect(v.start, len))
                {
                    // Untrackable mapping: it is captured whole at every epoch instead.
                    tracing::debug!(target: "guard", "cannot write-protect {:#x}-{:#x} {}: {e}", v.start, v.end, v.label);
                    untracked.push(v.start);
                } else {
                    late_ok = true;
                }
                v.base_seq = seq;
            } else {
                v.base_seq = prev.map(|p| p.base_seq).unwrap_or(seq);
            }
            let dst = if late_ok {
                &mut rebase_ranges
            } else {
                &mut ranges
            };
            dst.extend(runs.iter().map(|&(a, b)| (a, (b - a) as usize)));
        }
        // Mappings captured whole are write-protected now: if they are big, copy them after
        // the program resumes. What it writes meanwhile is reported written and lands in the
        // next layer, so this layer is only restorable together with the next one.
        // Only for a first capture (launch, exec, after a failed write): were it allowed every
        // epoch, a program that re-captures a big mapping each time (a growing heap) would
        // never reach a restorable layer again.
        self.late.clear();
        let rebase_bytes: usize = rebase_ranges.iter().map(|r| r.1).sum();
        if first_capture && rebase_bytes >= LATE_COPY_MIN {
            self.late = rebase_ranges;
        } else {
            ranges.extend(rebase_ranges);
        }
        lap.push(("dirty scan", lt.elapsed()));
        let bufs = sys::remote_mem::read_runs(pid, &ranges)
            .map_err(sys_err("reading the program's memory"))?;
        let pages: Vec<(u64, Vec<u8>)> = ranges.iter().map(|r| r.0).zip(bufs).collect();
        lap.push(("page copy", lt.elapsed()));
        let (fds, fd_refusals) = procfs::fds_of(
            pid,
            self.pidfd.as_fd(),
            &prog.inherited,
            &lg.sockets,
            peeked,
        )
        .map_err(sys_err("reading the fd table"))?;
        refusals.extend(fd_refusals);
        lap.push(("fd table", lt.elapsed()));
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "/".into());
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut mm = procfs::mm_layout(pid).map_err(sys_err("reading /proc/PID/stat"))?;
        mm.brk = self.brk;
        let sigactions = lg.commit_sigactions(key, caught, ignored);
        let state = ProcState {
            argv: prog.argv.clone(),
            exe,
            cwd,
            umask,
            vmas: vmas.clone(),
            fds: Vec::new(),
            sigactions,
            ignored,
            itimers: lg
                .itimers
                .get(&key)
                .map(|m| m.values().copied().collect())
                .unwrap_or_default(),
            mm,
            threads: thread_states,
            refusals: Vec::new(),
            net: prog.net,
            incomplete: false,
            pending: procfs::pending(pid, pid).1,
            rlimits: procfs::rlimits(pid).map_err(sys_err("reading /proc/PID/limits"))?,
            nspid: self.nspid,
            ppid: 0,
            procs: Vec::new(),
            zombie: None,
            // Filled in for the whole tree by the caller.
            pgid: 0,
            sid: 0,
            exit_signal: libc::SIGCHLD,
        };
        self.known = vmas
            .into_iter()
            .filter(|v| !untracked.contains(&v.start))
            .collect();
        tracing::trace!(target: "guard", "epoch {seq} pid {pid} phases (cumulative) {lap:?}");
        Ok((state, pages, fds, refusals))
    }
}

/// `user_regs_struct` → 27 words (the kernel's order).
pub fn regs_to_words(r: &ptrace::Regs) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// 27 words → `user_regs_struct`, over a template (the current registers).
pub fn words_to_regs(w: &[u64], mut r: ptrace::Regs) -> Result<ptrace::Regs> {
    if w.len() != 27 {
        return Err(Error::Image(format!(
            "thread registers hold {} words, expected 27",
            w.len()
        )));
    }
    r.r15 = w[0];
    r.r14 = w[1];
    r.r13 = w[2];
    r.r12 = w[3];
    r.rbp = w[4];
    r.rbx = w[5];
    r.r11 = w[6];
    r.r10 = w[7];
    r.r9 = w[8];
    r.r8 = w[9];
    r.rax = w[10];
    r.rcx = w[11];
    r.rdx = w[12];
    r.rsi = w[13];
    r.rdi = w[14];
    r.orig_rax = w[15];
    r.rip = w[16];
    r.cs = w[17];
    r.eflags = w[18];
    r.rsp = w[19];
    r.ss = w[20];
    r.fs_base = w[21];
    r.gs_base = w[22];
    r.ds = w[23];
    r.es = w[24];
    r.fs = w[25];
    r.gs = w[26];
    Ok(r)
}
