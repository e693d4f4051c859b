//! The kernel-state model of a guarded process: what the kernel holds for it, in terms that
//! rebuild it by syscalls (paths, flags, addresses, numbers), never kernel structures. This
//! is what every image layer carries, so images are kernel-version independent.

use serde::{Deserialize, Serialize};

/// How a mapping is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// `mmap(MAP_PRIVATE|MAP_ANONYMOUS)`; contents from the image. `[heap]`, `[stack]` too.
    Anon,
    /// `mmap(MAP_SHARED|MAP_ANONYMOUS)`; contents from the image.
    SharedAnon,
    /// `mmap(path, offset, MAP_PRIVATE)`; pages the program changed come from the image.
    PrivateFile { path: String, offset: u64 },
    /// `mmap(path, offset, MAP_SHARED)`; contents live in the file.
    SharedFile { path: String, offset: u64 },
    /// The vDSO, re-mapped with `arch_prctl(ARCH_MAP_VDSO_64)` at the same address.
    Vdso,
    /// vvar pages: come with the vDSO.
    Vvar,
}

/// One mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub kind: VmaKind,
    /// Label from /proc (`[heap]`, `[stack]`, a path), for humans.
    pub label: String,
    /// Layer in which this mapping's contents were last captured in full; pages from older
    /// layers at these addresses belong to a previous mapping and are ignored.
    pub base_seq: u64,
}

impl Vma {
    /// Whether the image carries this mapping's pages.
    pub fn has_pages(&self) -> bool {
        matches!(
            self.kind,
            VmaKind::Anon | VmaKind::SharedAnon | VmaKind::PrivateFile { .. }
        )
    }
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// What an fd refers to, as the syscalls that recreate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// One of the guard's own stdio fds, passed through: the restorer's fd of the same number.
    Inherited,
    /// `openat(path, flags)` + `lseek(pos)`; a writable file is cut back to `size` on restore.
    File {
        path: String,
        pos: u64,
        size: u64,
        writable: bool,
    },
    /// `openat(path, O_DIRECTORY)`.
    Dir { path: String },
    /// One end of a pipe; the other end must be held by a process of the tree, or by none
    /// (recreated with `pipe2`).
    Pipe {
        inode: u64,
        write_end: bool,
        /// Bytes buffered in the pipe (read with `tee`, not consumed), on its first read end.
        #[serde(default)]
        data: Vec<u8>,
        /// The pipe's capacity (F_GETPIPE_SZ), with `data`.
        #[serde(default)]
        capacity: u64,
        /// No process holds the other end any more (a reader whose writers all exited, or
        /// the reverse): rebuilt with that end closed.
        #[serde(default)]
        peer_closed: bool,
    },
    /// A listening TCP socket: `socket`, `setsockopt`s, `bind`, `listen`.
    TcpListen {
        v6: bool,
        addr: [u8; 16],
        port: u16,
        backlog: i32,
        sockopts: Vec<SockOpt>,
    },
    /// A TCP socket that is not listening (connected, or never bound). Its connection does
    /// not survive (TCP repair is a later issue): it comes back as a fresh unconnected socket,
    /// which the program sees as a reset connection.
    TcpOther { v6: bool },
    /// A UDP socket: `socket` + `bind` (port 0: unbound). Queued datagrams are lost.
    Udp { v6: bool, addr: [u8; 16], port: u16 },
    /// `eventfd2(count, flags)`.
    EventFd { count: u64 },
    /// `epoll_create1` + `epoll_ctl(ADD)` per registration `(fd, events, data)`.
    Epoll { entries: Vec<(i32, u32, u64)> },
    /// `timerfd_create` + `timerfd_settime` (relative).
    TimerFd {
        clock: i32,
        value_ns: u64,
        interval_ns: u64,
    },
    /// `signalfd4(mask)`.
    SignalFd { mask: u64 },
}

/// An integer socket option set by the program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockOpt {
    pub level: i32,
    pub name: i32,
    pub value: i32,
}

/// One fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    /// open(2) flags from fdinfo (O_APPEND, O_NONBLOCK, O_CLOEXEC, access mode…).
    pub flags: i32,
    pub kind: FdKind,
    /// The open file description, numbered across the whole process tree: fds with the same
    /// number (dup'ed, or inherited over fork; `kcmp(KCMP_FILE)` says so) share one
    /// description (offset, flags) and are rebuilt as one. 0: unknown (older images).
    #[serde(default)]
    pub desc: u64,
}

/// `struct sigaction` as the kernel takes it (rt_sigaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// One interval timer (`setitimer`), microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ITimer {
    pub which: i32,
    pub interval_us: u64,
    pub value_us: u64,
}

/// The memory-layout fields of `prctl(PR_SET_MM_MAP)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmLayout {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

/// Per-thread CPU and signal state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    /// Thread id inside the program's pid namespace.
    pub tid: i32,
    /// `user_regs_struct` as 27 words, already turned into "re-execute the interrupted call".
    pub regs: Vec<u64>,
    /// NT_X86_XSTATE bytes.
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    /// rseq registration `(pointer, length, signature)`.
    pub rseq: Option<(u64, u32, u32)>,
    /// `sigaltstack` `(sp, flags, size)`.
    pub altstack: Option<(u64, i32, u64)>,
    /// Robust futex list `(head, len)` (`set_robust_list`).
    #[serde(default)]
    pub robust: Option<(u64, u64)>,
    /// Clear-child-tid address (`set_tid_address`): what pthread_join waits on.
    #[serde(default)]
    pub clear_tid: u64,
    /// Standard signals pending for this thread (SigPnd), re-sent after restore.
    #[serde(default)]
    pub pending: u64,
}

/// Everything the restorer needs besides page contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcState {
    /// The command line, for humans and `--status`.
    pub argv: Vec<String>,
    pub exe: String,
    pub cwd: String,
    pub umask: u32,
    pub vmas: Vec<Vma>,
    pub fds: Vec<Fd>,
    /// Handlers by signal number (only non-default ones).
    pub sigactions: Vec<(i32, SigAction)>,
    /// Signals set to SIG_IGN.
    pub ignored: u64,
    pub itimers: Vec<ITimer>,
    pub mm: MmLayout,
    /// Resource limits `(resource, soft, hard)` from /proc/PID/limits (setrlimit and prlimit
    /// are not trapped: /proc is read at every checkpoint).
    #[serde(default)]
    pub rlimits: Vec<(i32, u64, u64)>,
    /// Standard signals pending for the whole process (ShdPnd), re-sent after restore.
    #[serde(default)]
    pub pending: u64,
    pub threads: Vec<ThreadState>,
    /// Why this state cannot be restored faithfully (empty = restorable).
    pub refusals: Vec<String>,
    /// Some pages of this layer were copied after the program resumed: it is restorable only
    /// with the next layer on top (which holds every page written meanwhile).
    #[serde(default)]
    pub incomplete: bool,
    /// The program had its own network namespace (loopback only): restore makes a new one.
    #[serde(default)]
    pub net: bool,
    /// Pid inside the program's pid namespace (the program itself is 1; 0 in older images
    /// means 1).
    #[serde(default)]
    pub nspid: i32,
    /// The parent's pid inside the namespace (0 for pid 1).
    #[serde(default)]
    pub ppid: i32,
    /// Only in pid 1's state: every other process of the tree, each parent before its
    /// children. Their pages are stored per pid (see `image`).
    #[serde(default)]
    pub procs: Vec<ProcState>,
    /// A child that had exited and was not reaped yet (a zombie): its wait status
    /// (`exit_code` of /proc/PID/stat). Restore recreates it and lets it end the same way, so
    /// its parent's `wait` still finds it. Nothing else of a zombie is recorded.
    #[serde(default)]
    pub zombie: Option<i32>,
    /// Process group and session, as pids inside the namespace (0: one from outside the
    /// tree, i.e. the guard's, inherited at launch). Restore replays `setsid` / `setpgid`.
    #[serde(default)]
    pub pgid: i32,
    #[serde(default)]
    pub sid: i32,
    /// The signal its parent gets when it ends (SIGCHLD for fork; clone may choose another).
    #[serde(default = "sigchld")]
    pub exit_signal: i32,
}

fn sigchld() -> i32 {
    libc::SIGCHLD
}

impl Default for ProcState {
    fn default() -> ProcState {
        ProcState {
            argv: Vec::new(),
            exe: String::new(),
            cwd: String::new(),
            umask: 0,
            vmas: Vec::new(),
            fds: Vec::new(),
            sigactions: Vec::new(),
            ignored: 0,
            itimers: Vec::new(),
            mm: MmLayout::default(),
            rlimits: Vec::new(),
            pending: 0,
            threads: Vec::new(),
            refusals: Vec::new(),
            incomplete: false,
            net: false,
            nspid: 0,
            ppid: 0,
            procs: Vec::new(),
            zombie: None,
            pgid: 0,
            sid: 0,
            exit_signal: libc::SIGCHLD,
        }
    }
}

impl ProcState {
    /// Pid inside the namespace (1 for pid 1 of older images).
    pub fn ns_pid(&self) -> i32 {
        if self.nspid == 0 { 1 } else { self.nspid }
    }
}

/// The paper's syscall classes (ShadowBuddy §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Class {
    /// Reads kernel state only (getpid): never trapped.
    Ignored,
    /// Changes the kernel state the log models (mmap, open, sigaction…): trapped.
    ChangesLog,
    /// Writes results into memory (read, recv): not trapped, the dirty-page tracker captures it.
    ResultsIntoMemory,
    /// Sends data out (write, send): the output-commit issue traps these.
    DataIntoLog,
}

/// One committed log entry (the log delta a layer carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Syscall name.
    pub call: String,
    pub class: Class,
    /// Raw arguments.
    pub args: [u64; 6],
    /// A decoded pointer argument (a path, an address), when the call has one.
    pub detail: Option<String>,
}
