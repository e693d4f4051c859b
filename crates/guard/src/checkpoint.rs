//! One epoch's checkpoint: stop the program (ptrace seize + interrupt), commit the log
//! against /proc, take the pages written since the last epoch (uffd-wp async +
//! PAGEMAP_SCAN, registering new mappings as they appear), registers, fd table; resume.
//! Writing the layer to disk happens after the program runs again.

use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sys::Pid;
use sys::pidfd::PidFd;
use sys::ptrace::{self, Stopped, Tracee};
use sys::uffd::{PageMap, Scan, WpTracker};

use crate::image::{Layer, StateRecord};
use crate::log::Log;
use crate::model::{ProcState, ThreadState, Vma, VmaKind};
use crate::procfs;
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

/// The guard's handle on one incarnation of the program (launched or restored).
#[derive(Debug)]
pub struct Incarnation {
    pub pid: Pid,
    pub pidfd: PidFd,
    tracker: Option<WpTracker>,
    pagemap: Option<PageMap>,
    /// Mappings as of the last checkpoint, with their base layer.
    known: Vec<Vma>,
    insn: Option<u64>,
    brk: u64,
    /// Clear-child-tid address per thread (host tid).
    clear_tids: std::collections::HashMap<Pid, u64>,
    /// Ranges of the last checkpoint to copy after the program resumed.
    late: Vec<(u64, usize)>,
}

/// Whole-mapping captures at least this big are copied after the program resumes.
const LATE_COPY_MIN: usize = 8 << 20;

/// What one checkpoint cost.
#[derive(Debug, Clone, Copy)]
pub struct EpochStats {
    pub pause: Duration,
    pub page_bytes: u64,
}

impl Incarnation {
    /// A freshly launched program: nothing tracked yet, the first checkpoint is full.
    pub fn launched(pid: Pid) -> Result<Incarnation> {
        let pidfd = PidFd::open(pid).map_err(|e| Error::sys("pidfd_open of the program", e))?;
        Ok(Incarnation {
            pid,
            pidfd,
            tracker: None,
            pagemap: None,
            known: Vec::new(),
            insn: None,
            brk: 0,
            clear_tids: Default::default(),
            late: Vec::new(),
        })
    }

    /// A restored program whose tracker is already armed over `known` (state of layer `seq`).
    pub(crate) fn restored(
        pid: Pid,
        pidfd: PidFd,
        tracker: Option<WpTracker>,
        known: Vec<Vma>,
        brk: u64,
    ) -> Result<Incarnation> {
        let pagemap = match tracker {
            Some(_) => Some(
                PageMap::open(pid)
                    .map_err(|e| Error::sys("opening the restored program's pagemap", e))?,
            ),
            None => None,
        };
        Ok(Incarnation {
            pid,
            pidfd,
            tracker,
            pagemap,
            known,
            insn: None,
            brk,
            clear_tids: Default::default(),
            late: Vec::new(),
        })
    }

    /// Copies the ranges the last checkpoint left for after the resume into `layer` (the
    /// program runs meanwhile; see `LATE_COPY_MIN`). A range that vanished is skipped: its
    /// mapping changed and the next layer captures it anew.
    pub fn copy_late(&mut self, layer: &mut Layer) {
        let late = std::mem::take(&mut self.late);
        for group in late.chunks(256) {
            match sys::remote_mem::read_runs(self.pid, group) {
                Ok(bufs) => layer.pages.extend(group.iter().map(|r| r.0).zip(bufs)),
                Err(_) => {
                    for &(a, l) in group {
                        let mut b = vec![0u8; l];
                        if sys::remote_mem::read(self.pid, a, &mut b).is_ok() {
                            layer.pages.push((a, b));
                        }
                    }
                }
            }
        }
    }

    /// Forgets what was captured: the next checkpoint captures every mapping in full.
    pub fn force_full(&mut self) {
        self.known.clear();
    }

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

    /// Creates the userfaultfd inside the program (only it can: the fd binds to its mm),
    /// takes a copy, and closes the program's own so its fd table stays as it was.
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

    /// Takes checkpoint `seq`. The program is stopped for the duration of this call.
    pub fn checkpoint(
        &mut self,
        prog: &Program,
        log: &Mutex<Log>,
        seq: u64,
    ) -> Result<(Layer, EpochStats)> {
        let t0 = Instant::now();
        let mut threads = self.stop_all()?;
        let t1 = t0.elapsed();
        let res = self.stopped_checkpoint(&mut threads, prog, log, seq);
        let t2 = t0.elapsed();
        let mut detach = Ok(());
        // Other threads first: the leader last, so nothing runs before every thread is free.
        for t in threads.into_iter().rev() {
            let r = t.detach();
            if detach.is_ok() {
                detach = r.map(|_| ());
            }
        }
        let pause = t0.elapsed();
        tracing::debug!(target: "guard", "epoch {seq}: stop {t1:?}, capture {:?}, resume {:?}", t2 - t1, pause - t2);
        let layer = res?;
        detach.map_err(|e| Error::sys("resuming the program", e))?;
        let page_bytes = layer.page_bytes();
        Ok((layer, EpochStats { pause, page_bytes }))
    }

    /// Seizes and stops every thread (leader first), re-listing until no new thread appeared
    /// (a running thread may create one while we stop the others).
    fn stop_all(&mut self) -> Result<Vec<Tracee<Stopped>>> {
        let opts = ptrace::O_TRACESYSGOOD | ptrace::O_SUSPEND_SECCOMP;
        let mut stopped: Vec<Tracee<Stopped>> = Vec::new();
        let stop = |tid: Pid| -> std::io::Result<Tracee<Stopped>> {
            ptrace::seize(tid, opts)?.interrupt()
        };
        match stop(self.pid) {
            Ok(t) => stopped.push(t),
            Err(e) => return Err(Error::sys("stopping the program", e)),
        }
        loop {
            let tids = procfs::tasks(self.pid);
            let new: Vec<Pid> = tids
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
                    Err(e)
                        if e.raw_os_error() == Some(libc::ESRCH) || ptrace::ended(&e).is_some() => {
                    }
                    Err(e) => {
                        for t in stopped.into_iter().rev() {
                            let _ = t.detach();
                        }
                        return Err(Error::sys("stopping a thread of the program", e));
                    }
                }
            }
        }
    }

    /// Per-thread state that only the thread itself can report: its clear-child-tid address
    /// (`prctl(PR_GET_TID_ADDRESS)`, injected; the result lands below the red zone of its
    /// stack, whose bytes are put back). Cached: it is set once per thread.
    fn clear_tid(&mut self, t: &mut Tracee<Stopped>) -> Result<u64> {
        if let Some(&a) = self.clear_tids.get(&t.pid()) {
            return Ok(a);
        }
        let regs = t.regs().map_err(|e| Error::sys("reading registers", e))?;
        let slot = (regs.rsp - 512) & !7;
        let mem = sys::remote_mem::MemFile::open(self.pid)
            .map_err(|e| Error::sys("opening /proc/PID/mem", e))?;
        let mut saved = [0u8; 8];
        mem.read_exact_at(slot, &mut saved)
            .map_err(|e| Error::sys("reading the stack", e))?;
        let r = self.inject(
            t,
            libc::SYS_prctl,
            [libc::PR_GET_TID_ADDRESS as u64, slot, 0, 0, 0, 0],
        );
        let mut got = [0u8; 8];
        let read = mem.read_exact_at(slot, &mut got);
        let put = mem.write_all_at(slot, &saved);
        t.restore_regs(&regs)
            .map_err(|e| Error::sys("restoring registers after injection", e))?;
        r?;
        read.and(put)
            .map_err(|e| Error::sys("reading the clear-child-tid address", e))?;
        let a = u64::from_le_bytes(got);
        self.clear_tids.insert(t.pid(), a);
        Ok(a)
    }

    fn stopped_checkpoint(
        &mut self,
        threads: &mut [Tracee<Stopped>],
        prog: &Program,
        log: &Mutex<Log>,
        seq: u64,
    ) -> Result<Layer> {
        let pid = self.pid;
        let lt = Instant::now();
        let mut lap: Vec<(&str, Duration)> = Vec::new();
        let mut lg = log.lock().unwrap_or_else(|p| p.into_inner());
        let sys_err = |what: &'static str| move |e: std::io::Error| Error::sys(what, e);
        let (caught, ignored, umask, _threads) =
            procfs::status(pid).map_err(sys_err("reading /proc/PID/status"))?;
        let mut refusals = lg.refusals.clone();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if !children.trim().is_empty() {
            refusals.push(format!(
                "child processes ({}): process trees are not restorable yet",
                children.trim()
            ));
        }
        let (leader, others) = threads.split_first_mut().expect("the leader is stopped");
        let t = leader;
        let regs = t.regs().map_err(sys_err("reading registers"))?;
        if lg.exec_seen {
            self.tracker = None;
            self.insn = None;
            self.clear_tids.clear();
        }
        if self.tracker.is_none() || lg.brk_changed || self.brk == 0 {
            if self.tracker.is_none() {
                self.arm_tracker(t)?;
            }
            self.brk = self.inject(t, libc::SYS_brk, [0; 6])? as u64;
            t.restore_regs(&regs)
                .map_err(sys_err("restoring registers after injection"))?;
        }
        let mut thread_states = Vec::with_capacity(1 + others.len());
        let leader_regs = regs;
        for t in std::iter::once(t).chain(others.iter_mut()) {
            let tid = t.pid();
            // Registers as they were before any injection (an injection consumes the
            // kernel's own restart of an interrupted call).
            let regs = if tid == pid {
                leader_regs
            } else {
                t.regs().map_err(sys_err("reading registers"))?
            };
            let clear_tid = self.clear_tid(t)?;
            thread_states.push(ThreadState {
                tid: procfs::ns_tid(pid, tid).unwrap_or(1),
                regs: regs_to_words(&ptrace::restart_fixup(&regs, true)),
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
        let (fds, fd_refusals) = procfs::fds(pid, self.pidfd.as_fd(), &prog.inherited, &lg.sockets)
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
        let sigactions = lg.commit_sigactions(caught, ignored);
        let state = ProcState {
            argv: prog.argv.clone(),
            exe,
            cwd,
            umask,
            vmas: vmas.clone(),
            fds,
            sigactions,
            ignored,
            itimers: lg.itimers.values().copied().collect(),
            mm,
            threads: thread_states,
            refusals,
            net: prog.net,
            incomplete: !self.late.is_empty(),
            pending: procfs::pending(pid, pid).1,
            rlimits: procfs::rlimits(pid).map_err(sys_err("reading /proc/PID/limits"))?,
        };
        lg.rebaseline.clear();
        lg.brk_changed = false;
        lg.exec_seen = false;
        let (entries, dropped) = lg.take_delta();
        drop(lg);
        self.known = vmas
            .into_iter()
            .filter(|v| !untracked.contains(&v.start))
            .collect();
        tracing::trace!(target: "guard", "epoch {seq} phases (cumulative) {lap:?}");
        Ok(Layer {
            seq,
            full: false,
            state: StateRecord {
                state,
                log: entries,
                log_dropped: dropped,
            },
            pages,
        })
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
