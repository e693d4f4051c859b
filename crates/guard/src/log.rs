//! The kernel-state log: which syscalls are trapped, how each is classified, and what the
//! guard records from the trapped calls (arguments and pointed-to memory, read before the call
//! runs and re-validated with `NOTIF_ID_VALID`).
//!
//! Trapped calls are answered with CONTINUE: the kernel runs them. Their entries are
//! *pending* until the next checkpoint, when the guard, with the program stopped, checks in
//! /proc that the effect is there (an fd exists, a handler bit is set) and only then commits
//! them into the model: entries commit on success. Calls the guard cannot restore faithfully
//! (io_uring, the program's own userfaultfd, ptrace by the program, SysV shm) are refused with
//! an errno and the refusal is reported in `kintsugi guard --status`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sys::Pid;
use sys::seccomp::Notification;

use crate::model::{Class, ITimer, LogEntry, SigAction, SockOpt};
use crate::procfs::SocketLog;

/// Syscalls the filter traps: the state-changing ones the model follows (class "changes the
/// log"), plus those refused. Everything else runs untouched at native speed.
pub const TRAPPED: &[(i64, &str)] = &[
    (libc::SYS_open, "open"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_creat, "creat"),
    (libc::SYS_close, "close"),
    (libc::SYS_close_range, "close_range"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_pipe, "pipe"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_eventfd, "eventfd"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_epoll_create, "epoll_create"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_signalfd4, "signalfd4"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_setitimer, "setitimer"),
    (libc::SYS_alarm, "alarm"),
    (libc::SYS_chdir, "chdir"),
    (libc::SYS_fchdir, "fchdir"),
    (libc::SYS_umask, "umask"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_shmget, "shmget"),
    (libc::SYS_shmat, "shmat"),
];

/// Whether trapped call `nr`, found interrupted (`-ERESTARTSYS`) when a checkpoint stops its
/// thread, was interrupted while waiting for the guard's answer rather than in the kernel's own
/// work: these calls never block by themselves (unlike open of a FIFO or connect). The
/// checkpoint makes such a call re-execute whatever signal comes meanwhile; left to the kernel,
/// a signal with a handler lacking `SA_RESTART` that arrived during the stop would turn it into
/// EINTR without running it (a `close` that fails and leaves the fd open).
pub fn restart_after_checkpoint(nr: i64) -> bool {
    TRAPPED.iter().any(|t| t.0 == nr)
        && ![
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_creat,
            libc::SYS_connect,
        ]
        .contains(&nr)
}

/// Trapped calls whose log entry is informational only (the checkpoint reads their effect
/// from /proc: the fd table, cwd, umask). They are answered first and recorded after: a call
/// waiting for its answer can be cut short by a signal (see `restart_after_checkpoint`), so
/// every microsecond before the answer counts. Calls whose record the checkpoint relies on
/// (mmap's replaced ranges, brk, handlers, timers, exec, socket options) are recorded before
/// they are answered.
pub fn answer_first(nr: i64) -> bool {
    [
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_pipe,
        libc::SYS_pipe2,
        libc::SYS_socket,
        libc::SYS_bind,
        libc::SYS_connect,
        libc::SYS_eventfd,
        libc::SYS_eventfd2,
        libc::SYS_epoll_create,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_timerfd_create,
        libc::SYS_signalfd4,
        libc::SYS_umask,
        libc::SYS_chdir,
        libc::SYS_fchdir,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_creat,
    ]
    .contains(&nr)
}

/// Records a call answered already (see [`answer_first`]): its entry, with the path it named
/// read now (informational: the caller may have reused the buffer meanwhile).
pub fn record_answered(log: &mut Log, tid: u32, nr: i64, args: [u64; 6]) {
    log.trapped += 1;
    let detail = Pid::from_raw(tid as i32).and_then(|pid| match nr {
        libc::SYS_open | libc::SYS_creat | libc::SYS_chdir => read_cstr(pid, args[0]),
        libc::SYS_openat | libc::SYS_openat2 => read_cstr(pid, args[1]),
        _ => None,
    });
    if log.entries.len() < MAX_ENTRIES {
        log.entries.push(LogEntry {
            call: name_of(nr).to_string(),
            class: Class::ChangesLog,
            args,
            detail,
        });
    } else {
        log.dropped += 1;
    }
}

/// Trapped syscall numbers, for the filter.
pub fn trapped_numbers() -> Vec<i64> {
    TRAPPED.iter().map(|t| t.0).collect()
}

/// The paper's class of a syscall.
pub fn class_of(nr: i64) -> Class {
    if TRAPPED.iter().any(|t| t.0 == nr) {
        Class::ChangesLog
    } else if [
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_readv,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
    ]
    .contains(&nr)
    {
        Class::ResultsIntoMemory
    } else if [
        libc::SYS_write,
        libc::SYS_pwrite64,
        libc::SYS_writev,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
    ]
    .contains(&nr)
    {
        Class::DataIntoLog
    } else {
        Class::Ignored
    }
}

fn name_of(nr: i64) -> &'static str {
    TRAPPED
        .iter()
        .find(|t| t.0 == nr)
        .map(|t| t.1)
        .unwrap_or("?")
}

/// Most log entries kept per epoch (the count of the rest is kept).
const MAX_ENTRIES: usize = 4096;

/// The log between two checkpoints, written by the notification thread.
#[derive(Debug, Default)]
pub struct Log {
    /// Entries since the last checkpoint.
    pub entries: Vec<LogEntry>,
    pub dropped: u64,
    /// Total trapped calls.
    pub trapped: u64,
    /// Pending handler changes, by process (host pid) and signal.
    pub sigactions: BTreeMap<i32, BTreeMap<i32, SigAction>>,
    /// Committed handlers by process (host pid), carried across epochs. A process not in
    /// here has not been seen by a checkpoint yet: its handlers are read from it then.
    pub committed_sigactions: BTreeMap<i32, BTreeMap<i32, SigAction>>,
    /// Interval timers by process (host pid) and `which` (fork does not inherit them).
    pub itimers: BTreeMap<i32, BTreeMap<i32, ITimer>>,
    /// sigaltstack per thread (host tid).
    pub altstacks: BTreeMap<i32, (u64, i32, u64)>,
    pub sockets: SocketLog,
    /// Address ranges whose contents were replaced or discarded (mmap MAP_FIXED, madvise
    /// DONTNEED…): mappings overlapping them are captured in full at the next checkpoint.
    pub rebaseline: Vec<(u64, u64)>,
    /// Threads (host tid) that moved their process's brk: re-read it at the next checkpoint.
    /// Kept by thread, resolved to processes at the checkpoint (see [`Log::processes_of`]):
    /// looking the process up here would slow the answer to every trapped call.
    pub brk_changed: BTreeSet<i32>,
    /// Threads (host tid) that exec'd: their process's memory and tracker are new.
    pub exec_seen: BTreeSet<i32>,
    /// Thread → process (host ids), learnt at checkpoints and from /proc for new threads.
    pub tgids: HashMap<i32, i32>,
    /// Refused calls, for --status (deduplicated).
    pub refusals: Vec<String>,
}

fn read_cstr(pid: Pid, addr: u64) -> Option<String> {
    if addr == 0 {
        return None;
    }
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < 4096 {
        // Read up to the end of the page so an unmapped next page is never touched.
        let n = (4096 - (at % 4096)) as usize;
        let mut buf = vec![0u8; n];
        sys::remote_mem::read(pid, at, &mut buf).ok()?;
        if let Some(z) = buf.iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..z]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&buf);
        at += n as u64;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn read_words<const N: usize>(pid: Pid, addr: u64) -> Option<[u64; N]> {
    if addr == 0 {
        return None;
    }
    let mut buf = vec![0u8; N * 8];
    sys::remote_mem::read(pid, addr, &mut buf).ok()?;
    let mut w = [0u64; N];
    for (i, c) in buf.chunks_exact(8).enumerate() {
        w[i] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    Some(w)
}

fn socket_inode(pid: Pid, fd: u64) -> Option<u64> {
    let l = std::fs::read_link(format!("/proc/{pid}/fd/{}", fd as i32)).ok()?;
    l.to_str()?
        .strip_prefix("socket:[")?
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// What to answer a trapped call.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Refuse(i32),
}

/// The process (thread group) of thread `tid`, host ids; 0 when it is gone.
fn tgid_of(log: &mut Log, tid: i32) -> i32 {
    if let Some(&g) = log.tgids.get(&tid) {
        return g;
    }
    let g = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    if g != 0 {
        log.tgids.insert(tid, g);
    }
    g
}

/// Records one trapped call into `log` and says how to answer it. The notification is
/// answered by the caller; reads of the caller's memory happen here, before the answer.
pub fn record(log: &mut Log, n: &Notification<'_>) -> Verdict {
    log.trapped += 1;
    let pid = match Pid::from_raw(n.pid as i32) {
        Some(p) => p,
        None => return Verdict::Continue,
    };
    let tid = n.pid as i32;
    if !n.is_native_abi() {
        push_refusal(
            log,
            "a 32-bit (x32 or i386) syscall ABI was used: its calls are refused with ENOSYS".into(),
        );
        return Verdict::Refuse(libc::ENOSYS);
    }
    let a = n.args;
    let mut detail = None;
    let verdict = match n.nr {
        libc::SYS_open | libc::SYS_creat => {
            detail = read_cstr(pid, a[0]);
            Verdict::Continue
        }
        libc::SYS_openat | libc::SYS_openat2 => {
            detail = read_cstr(pid, a[1]);
            Verdict::Continue
        }
        libc::SYS_chdir => {
            detail = read_cstr(pid, a[0]);
            Verdict::Continue
        }
        libc::SYS_execve => {
            detail = read_cstr(pid, a[0]);
            log.exec_seen.insert(tid);
            Verdict::Continue
        }
        libc::SYS_execveat => {
            log.exec_seen.insert(tid);
            Verdict::Continue
        }
        libc::SYS_mmap => {
            if a[3] & libc::MAP_FIXED as u64 != 0 || a[3] & libc::MAP_FIXED_NOREPLACE as u64 != 0 {
                log.rebaseline.push((a[0], a[0].saturating_add(a[1])));
            }
            Verdict::Continue
        }
        libc::SYS_mremap => {
            log.rebaseline.push((a[0], a[0].saturating_add(a[1])));
            if a[3] & libc::MREMAP_FIXED as u64 != 0 {
                log.rebaseline.push((a[4], a[4].saturating_add(a[2])));
            }
            Verdict::Continue
        }
        libc::SYS_madvise => {
            let discards = [
                libc::MADV_DONTNEED,
                libc::MADV_FREE,
                libc::MADV_REMOVE,
                18, /* WIPEONFORK */
            ];
            if discards.contains(&(a[2] as i32)) {
                log.rebaseline.push((a[0], a[0].saturating_add(a[1])));
            }
            Verdict::Continue
        }
        libc::SYS_brk => {
            log.brk_changed.insert(tid);
            Verdict::Continue
        }
        libc::SYS_rt_sigaction => {
            if let Some(w) = read_words::<4>(pid, a[1]) {
                let sa = SigAction {
                    handler: w[0],
                    flags: w[1],
                    restorer: w[2],
                    mask: w[3],
                };
                // Rare calls: their process is looked up now.
                let tgid = tgid_of(log, tid);
                log.sigactions
                    .entry(tgid)
                    .or_default()
                    .insert(a[0] as i32, sa);
                detail = Some(format!("sig {} handler {:#x}", a[0], w[0]));
            }
            Verdict::Continue
        }
        libc::SYS_sigaltstack => {
            if let Some(w) = read_words::<3>(pid, a[0]) {
                log.altstacks
                    .insert(n.pid as i32, (w[0], w[1] as i32, w[2]));
            }
            Verdict::Continue
        }
        libc::SYS_setitimer => {
            if let Some(w) = read_words::<4>(pid, a[1]) {
                let us = |s: u64, u: u64| s.saturating_mul(1_000_000).saturating_add(u);
                let t = ITimer {
                    which: a[0] as i32,
                    interval_us: us(w[0], w[1]),
                    value_us: us(w[2], w[3]),
                };
                let tgid = tgid_of(log, tid);
                log.itimers.entry(tgid).or_default().insert(t.which, t);
            }
            Verdict::Continue
        }
        libc::SYS_alarm => {
            let t = ITimer {
                which: libc::ITIMER_REAL,
                interval_us: 0,
                value_us: a[0].saturating_mul(1_000_000),
            };
            let tgid = tgid_of(log, tid);
            log.itimers.entry(tgid).or_default().insert(t.which, t);
            Verdict::Continue
        }
        libc::SYS_listen => {
            if let Some(ino) = socket_inode(pid, a[0]) {
                log.sockets.backlog.insert(ino, a[1] as i32);
            }
            Verdict::Continue
        }
        libc::SYS_setsockopt => {
            if a[4] >= 4
                && let (Some(ino), Some(w)) = (socket_inode(pid, a[0]), read_words::<1>(pid, a[3]))
            {
                let o = SockOpt {
                    level: a[1] as i32,
                    name: a[2] as i32,
                    value: w[0] as u32 as i32,
                };
                let v = log.sockets.sockopts.entry(ino).or_default();
                v.retain(|x| !(x.level == o.level && x.name == o.name));
                v.push(o);
            }
            Verdict::Continue
        }
        libc::SYS_io_uring_setup => {
            push_refusal(
                log,
                "io_uring_setup refused (ENOSYS): an io_uring cannot be rebuilt by syscall replay"
                    .into(),
            );
            Verdict::Refuse(libc::ENOSYS)
        }
        libc::SYS_userfaultfd => {
            push_refusal(
                log,
                "userfaultfd refused (EPERM): the guard owns the program's dirty tracking".into(),
            );
            Verdict::Refuse(libc::EPERM)
        }
        libc::SYS_ptrace => {
            push_refusal(
                log,
                "ptrace refused (EPERM): the guard is the program's tracer".into(),
            );
            Verdict::Refuse(libc::EPERM)
        }
        libc::SYS_shmget | libc::SYS_shmat => {
            push_refusal(
                log,
                "SysV shared memory refused (ENOSYS): not restorable yet".into(),
            );
            Verdict::Refuse(libc::ENOSYS)
        }
        _ => Verdict::Continue,
    };
    if !n.still_valid() {
        // The caller is gone or was interrupted: what we read may be stale. The kernel restarts
        // an interrupted call, and it is trapped (and recorded) again then.
        return verdict;
    }
    if log.entries.len() < MAX_ENTRIES {
        log.entries.push(LogEntry {
            call: name_of(n.nr).to_string(),
            class: Class::ChangesLog,
            args: a,
            detail,
        });
    } else {
        log.dropped += 1;
    }
    verdict
}

fn push_refusal(log: &mut Log, why: String) {
    tracing::warn!(target: "guard", "{why}");
    if !log.refusals.contains(&why) && log.refusals.len() < 64 {
        log.refusals.push(why);
    }
}

impl Log {
    /// Commits process `pid`'s pending handler changes that /proc confirms
    /// (`SigCgt`/`SigIgn` bits agree) and returns its committed set.
    pub fn commit_sigactions(
        &mut self,
        pid: i32,
        caught: u64,
        ignored: u64,
    ) -> Vec<(i32, SigAction)> {
        let pending = self.sigactions.remove(&pid).unwrap_or_default();
        let committed = self.committed_sigactions.entry(pid).or_default();
        for (sig, sa) in pending {
            if !(1..=64).contains(&sig) {
                continue;
            }
            let bit = 1u64 << (sig - 1);
            let ok = match sa.handler {
                0 => caught & bit == 0 && ignored & bit == 0,
                1 => ignored & bit != 0,
                _ => caught & bit != 0,
            };
            if ok {
                if sa.handler > 1 {
                    committed.insert(sig, sa);
                } else {
                    committed.remove(&sig);
                }
            }
        }
        // A handler reset by exec or never confirmed must not survive.
        committed.retain(|&s, _| caught & (1u64 << (s - 1)) != 0);
        committed.iter().map(|(&s, &a)| (s, a)).collect()
    }

    /// The processes (host pids, among `alive`) of the threads in `tids`, emptying it. A
    /// thread that is gone (an exec by a non-leader thread changes its id) counts for every
    /// process: re-reading too much is safe, missing a change is not.
    pub fn processes_of(&mut self, tids: &mut BTreeSet<i32>, alive: &[i32]) -> BTreeSet<i32> {
        let mut out = BTreeSet::new();
        for tid in std::mem::take(tids) {
            match self.tgids.get(&tid) {
                Some(g) if alive.contains(g) => {
                    out.insert(*g);
                }
                _ => out.extend(alive.iter().copied()),
            }
        }
        out
    }

    /// Forgets what the log holds for processes that are gone (not in `alive`, host pids).
    pub fn retain_processes(&mut self, alive: &[i32]) {
        self.committed_sigactions.retain(|p, _| alive.contains(p));
        self.sigactions.retain(|p, _| alive.contains(p));
        self.itimers.retain(|p, _| alive.contains(p));
        self.tgids.retain(|_, g| alive.contains(g));
    }

    /// Takes the epoch's entries (the log delta of a layer).
    pub fn take_delta(&mut self) -> (Vec<LogEntry>, u64) {
        (
            std::mem::take(&mut self.entries),
            std::mem::replace(&mut self.dropped, 0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_of(libc::SYS_getpid), Class::Ignored);
        assert_eq!(class_of(libc::SYS_openat), Class::ChangesLog);
        assert_eq!(class_of(libc::SYS_read), Class::ResultsIntoMemory);
        assert_eq!(class_of(libc::SYS_write), Class::DataIntoLog);
        let f = sys::seccomp::NotifyFilter::new(&trapped_numbers()).unwrap();
        assert!(!f.traps(0xC000_003E, libc::SYS_getpid as u32));
        assert!(!f.traps(0xC000_003E, libc::SYS_read as u32));
        assert!(f.traps(0xC000_003E, libc::SYS_openat as u32));
        assert!(restart_after_checkpoint(libc::SYS_close));
        assert!(answer_first(libc::SYS_close) && !answer_first(libc::SYS_mmap));
        for nr in [
            libc::SYS_brk,
            libc::SYS_rt_sigaction,
            libc::SYS_execve,
            libc::SYS_io_uring_setup,
        ] {
            assert!(
                !answer_first(nr),
                "{nr}: the checkpoint needs its record first"
            );
        }
        assert!(
            !restart_after_checkpoint(libc::SYS_openat),
            "may block on a FIFO"
        );
        assert!(!restart_after_checkpoint(libc::SYS_read), "not trapped");
    }

    #[test]
    fn sigactions_commit_only_when_proc_agrees() {
        let mut l = Log::default();
        let sa = SigAction {
            handler: 0x1234,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        l.sigactions.entry(7).or_default().insert(libc::SIGALRM, sa);
        l.sigactions.entry(7).or_default().insert(libc::SIGUSR1, sa);
        let bit = |s: i32| 1u64 << (s - 1);
        // Only SIGALRM's handler took effect.
        let c = l.commit_sigactions(7, bit(libc::SIGALRM), 0);
        assert_eq!(c, vec![(libc::SIGALRM, sa)]);
        assert!(
            l.commit_sigactions(8, bit(libc::SIGALRM), 0).is_empty(),
            "another process's handlers are its own"
        );
        assert!(l.commit_sigactions(7, 0, 0).is_empty(), "reset by exec");
        l.retain_processes(&[8]);
        assert!(!l.committed_sigactions.contains_key(&7));
    }
}
