//! seccomp user notification: a filter that hands chosen syscalls to a supervisor, and the
//! supervisor's side of the protocol.
//!
//! The filter is built in the parent (allocation is fine there) and installed by the child
//! between fork and exec with [`install_listener_filter`], which allocates nothing. The
//! supervisor then receives [`Notification`]s from a [`Listener`]. A notification is an
//! obligation: the trapped thread sleeps until it is answered, so dropping one answers
//! "continue" instead of leaving the thread hanging.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;

/// One classic-BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const BpfInsn,
}

/// A compiled filter: x86-64 syscalls in `trapped` go to the listener, every other x86-64
/// syscall is allowed at native speed, and anything from another ABI (x32, i386 via int 0x80)
/// is trapped too so the supervisor can see, and refuse, what it cannot model.
#[derive(Debug, Clone)]
pub struct NotifyFilter {
    prog: Vec<BpfInsn>,
}

impl NotifyFilter {
    /// Builds the program. At most 250 syscalls (one conditional jump each, 8-bit offsets).
    pub fn new(trapped: &[i64]) -> io::Result<NotifyFilter> {
        let mut nrs: Vec<u32> = trapped.iter().map(|&n| n as u32).collect();
        nrs.sort_unstable();
        nrs.dedup();
        if nrs.len() > 250 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more than 250 trapped syscalls",
            ));
        }
        let ins = |code, jt, jf, k| BpfInsn { code, jt, jf, k };
        // [0] ld arch, [1] not x86_64 → notify, [2] ld nr, [3] x32 bit → notify, then a binary
        // decision tree over the sorted numbers, so an untrapped call costs ~log2(n)
        // comparisons, not n. Jumps are relative to the next instruction.
        let tree = decision_tree(&nrs);
        let mut prog = Vec::with_capacity(tree.len() + 5);
        let notify = 4 + tree.len(); // a final `ret notify` after the tree
        prog.push(ins(BPF_LD_W_ABS, 0, 0, 4)); // seccomp_data.arch
        prog.push(ins(
            BPF_JEQ_K,
            0,
            (notify - 2).min(255) as u8,
            AUDIT_ARCH_X86_64,
        ));
        prog.push(ins(BPF_LD_W_ABS, 0, 0, 0)); // seccomp_data.nr
        prog.push(ins(
            BPF_JGE_K,
            (notify - 4).min(255) as u8,
            0,
            X32_SYSCALL_BIT,
        ));
        if notify - 2 > 255 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "filter too long for 8-bit jumps",
            ));
        }
        prog.extend(tree);
        prog.push(ins(BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF));
        Ok(NotifyFilter { prog })
    }

    /// The instructions, for tests and for writing the program into another process.
    pub fn instructions(&self) -> &[BpfInsn] {
        &self.prog
    }

    /// Evaluates the filter in user space for one syscall: `true` when it would be trapped.
    /// Used by tests to check the program without installing it.
    pub fn traps(&self, arch: u32, nr: u32) -> bool {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = self.prog[pc];
            match i.code {
                BPF_LD_W_ABS => acc = if i.k == 4 { arch } else { nr },
                BPF_JEQ_K | BPF_JGE_K => {
                    let hit = if i.code == BPF_JEQ_K {
                        acc == i.k
                    } else {
                        acc >= i.k
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                _ => return i.k == SECCOMP_RET_USER_NOTIF,
            }
            pc += 1;
        }
    }
}

/// `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` (Linux 5.19): once the supervisor has received a
/// notification, the trapped thread waits for the answer killably only.
const FLAG_WAIT_KILLABLE_RECV: libc::c_ulong = 1 << 5;

/// Installs `filter` on the calling thread with `SECCOMP_FILTER_FLAG_NEW_LISTENER` and returns
/// the raw listener fd (close-on-exec, owned by the caller).
///
/// Also with `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` where the kernel has it: otherwise a
/// signal whose handler lacks `SA_RESTART`, arriving while the supervisor is answering, makes
/// the trapped call fail with EINTR *without running it* — a `close` that returns EINTR and
/// leaves the fd open, which no program retries (dash leaked pipe ends so, its SIGCHLD handler
/// interrupting the closes after fork). A thread waiting for an answer then stops for ptrace
/// only once it has it.
///
/// Async-signal-safe: allocates nothing, so a forked child of a threaded parent may call it.
pub fn install_listener_filter(filter: &NotifyFilter) -> io::Result<i32> {
    let prog = SockFprog {
        len: filter.prog.len() as u16,
        filter: filter.prog.as_ptr(),
    };
    let install = |flags: libc::c_ulong| {
        // SAFETY: prog points at a live, correctly laid-out sock_fprog whose filter array has
        // `len` instructions; the kernel copies it before returning.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const SockFprog,
            )
        };
        if r >= 0 {
            Ok(r as i32)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let both = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | FLAG_WAIT_KILLABLE_RECV;
    let attempt = || match install(both) {
        // A kernel before 5.19 does not know the flag.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            install(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)
        }
        r => r,
    };
    match attempt() {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            // Without CAP_SYS_ADMIN the kernel demands no_new_privs first.
            // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            attempt()
        }
        r => r,
    }
}

/// A self-contained block that returns ALLOW or USER_NOTIF for the syscall number in the
/// accumulator: a balanced tree of `jge` splits with short `jeq` runs at the leaves.
fn decision_tree(nrs: &[u32]) -> Vec<BpfInsn> {
    let ins = |code, jt, jf, k| BpfInsn { code, jt, jf, k };
    if nrs.len() <= 3 {
        let n = nrs.len();
        let mut v: Vec<BpfInsn> = nrs
            .iter()
            .enumerate()
            .map(|(i, &nr)| ins(BPF_JEQ_K, (n - i) as u8, 0, nr))
            .collect();
        v.push(ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
        v.push(ins(BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF));
        return v;
    }
    let mid = nrs.len() / 2;
    let left = decision_tree(&nrs[..mid]);
    let right = decision_tree(&nrs[mid..]);
    let mut v = Vec::with_capacity(1 + left.len() + right.len());
    // nr >= pivot: skip the left block.
    v.push(ins(BPF_JGE_K, left.len() as u8, 0, nrs[mid]));
    v.extend(left);
    v.extend(right);
    v
}

/// The supervisor's end of a notifying filter.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

/// What [`Listener::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerState {
    /// A notification is ready to receive.
    Ready,
    /// No process uses the filter any more: nothing will ever arrive.
    Gone,
    /// The timeout passed.
    Timeout,
}

impl Listener {
    /// Takes ownership of a listener fd (from [`install_listener_filter`] via pidfd_getfd).
    pub fn from_fd(fd: OwnedFd) -> Listener {
        Listener { fd }
    }

    /// Asks the kernel to wake the trapped thread on the CPU that answers (6.6+): cuts the
    /// round trip from ~11 µs to ~3 µs here. Best effort: older kernels say EINVAL.
    pub fn set_sync_wakeup(&self) -> io::Result<()> {
        // SAFETY: the ioctl takes a u64 flag by value; fd is a live listener.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Waits until a notification is ready, every user is gone, or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> io::Result<ListenerState> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(ListenerState::Timeout)
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(ListenerState::Timeout);
        }
        if pfd.revents & libc::POLLIN != 0 {
            Ok(ListenerState::Ready)
        } else {
            Ok(ListenerState::Gone)
        }
    }

    /// Receives one notification (blocks). `Ok(None)` when the trapped thread vanished between
    /// poll and receive (killed, or interrupted by a signal): nothing to answer then.
    pub fn recv(&self) -> io::Result<Option<Notification<'_>>> {
        // SAFETY: seccomp_notif is plain old data; all-zero is a valid value and the kernel
        // requires the buffer zeroed.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: n is a writable seccomp_notif of the size the ioctl number encodes.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(Notification {
            listener: self,
            id: n.id,
            pid: n.pid,
            nr: i64::from(n.data.nr),
            arch: n.data.arch,
            ip: n.data.instruction_pointer,
            args: n.data.args,
            answered: false,
        }))
    }

    fn send(&self, id: u64, val: i64, error: i32, flags: u32) -> io::Result<()> {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val,
            error,
            flags,
        };
        // SAFETY: resp is a valid seccomp_notif_resp for the duration of the call.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // ENOENT: the thread died or was interrupted; the kernel restarts or drops the call.
        if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(())
        } else {
            Err(e)
        }
    }

    fn id_valid(&self, id: u64) -> bool {
        let mut id = id;
        // SAFETY: the ioctl reads one u64 through the pointer.
        unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &mut id,
            ) == 0
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A trapped syscall waiting for its answer. Must be answered exactly once: the `respond_*`
/// methods consume it, and dropping it unanswered lets the call continue, so a supervisor
/// that bails out early never leaves a thread of the guarded program asleep forever.
#[derive(Debug)]
pub struct Notification<'l> {
    listener: &'l Listener,
    /// Kernel cookie for this notification.
    pub id: u64,
    /// Thread id of the caller, in the listener's pid namespace.
    pub pid: u32,
    /// Syscall number.
    pub nr: i64,
    /// AUDIT_ARCH_* of the call.
    pub arch: u32,
    /// Instruction pointer of the caller.
    pub ip: u64,
    /// Raw argument registers.
    pub args: [u64; 6],
    answered: bool,
}

impl Notification<'_> {
    /// `SECCOMP_IOCTL_NOTIF_ID_VALID`: the caller still waits for this answer. Check it after
    /// reading the caller's memory: if it is false, what was read may belong to another call.
    pub fn still_valid(&self) -> bool {
        self.listener.id_valid(self.id)
    }
    /// Whether the call came from the native x86-64 ABI.
    pub fn is_native_abi(&self) -> bool {
        self.arch == AUDIT_ARCH_X86_64 && (self.nr as u32) < X32_SYSCALL_BIT
    }
    /// Lets the kernel execute the call as if it had not been trapped
    /// (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`). Not a security boundary: the caller may have
    /// changed pointed-to memory since we read it. Fine for recording, which is our use.
    pub fn respond_continue(mut self) -> io::Result<()> {
        self.answered = true;
        self.listener
            .send(self.id, 0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32)
    }
    /// Fails the call with `errno` without executing it.
    pub fn respond_error(mut self, errno: i32) -> io::Result<()> {
        self.answered = true;
        self.listener.send(self.id, 0, -errno, 0)
    }
    /// Completes the call with return value `val` without executing it.
    pub fn respond_value(mut self, val: i64) -> io::Result<()> {
        self.answered = true;
        self.listener.send(self.id, val, 0, 0)
    }
}

impl Drop for Notification<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let _ =
                self.listener
                    .send(self.id, 0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32);
        }
    }
}

/// Wraps a raw fd returned by [`install_listener_filter`] in the caller's own process.
///
/// # Safety
/// `fd` must be an open fd that nothing else owns.
pub unsafe fn listener_from_raw(fd: i32) -> Listener {
    // SAFETY: the caller guarantees sole ownership of an open fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Listener { fd }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_traps_exactly_the_listed_calls() {
        let f = NotifyFilter::new(&[libc::SYS_openat, libc::SYS_close, libc::SYS_mmap]).unwrap();
        for nr in 0..450u32 {
            let listed =
                [libc::SYS_openat, libc::SYS_close, libc::SYS_mmap].contains(&i64::from(nr));
            assert_eq!(f.traps(AUDIT_ARCH_X86_64, nr), listed, "nr {nr}");
        }
        assert!(
            f.traps(AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 1),
            "x32 calls are trapped"
        );
        assert!(f.traps(0x4000_0003, 20), "i386 calls are trapped");
    }

    /// The kernel caches, per syscall number, "this filter allows it" when emulating the
    /// program with only arch and nr known reaches `ret ALLOW` (seccomp_cache_prepare): then an
    /// untrapped call runs no BPF at all. Only loads of `nr`/`arch`, `jeq`/`jge`/`jgt`/`jset`
    /// with constants and constant returns keep a path emulable. Measured here (getpid, docs/
    /// guard.md): cached ≈ +33 ns over native, the same filter with one `ld args[0]` in front
    /// ≈ +56 ns.
    #[test]
    fn filter_stays_cacheable_by_the_kernel() {
        // As many numbers as the guard traps, so the decision tree has inner nodes.
        let nrs: Vec<i64> = (0..42).map(|n| n * 7).collect();
        let f = NotifyFilter::new(&nrs).unwrap();
        for (pc, i) in f.instructions().iter().enumerate() {
            let ok = match i.code {
                BPF_LD_W_ABS => i.k == 0 || i.k == 4,
                BPF_JEQ_K | BPF_JGE_K | BPF_RET_K => true,
                _ => false,
            };
            assert!(
                ok,
                "instruction {pc} {i:?} defeats the kernel's action cache"
            );
        }
    }

    #[test]
    fn notification_round_trip_in_a_forked_child() {
        let f = NotifyFilter::new(&[libc::SYS_getppid]).unwrap();
        let mut fds = [0i32; 2];
        // SAFETY: fds is a writable [i32; 2].
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        match crate::process::fork().unwrap() {
            crate::process::Fork::Child => {
                let l = install_listener_filter(&f).unwrap_or(-1);
                let b = l.to_ne_bytes();
                // SAFETY: writes 4 bytes from a live buffer.
                unsafe { libc::write(fds[1], b.as_ptr().cast(), 4) };
                // SAFETY: getppid has no arguments; trapped, answered with 4242.
                let v = unsafe { libc::getppid() };
                crate::process::exit_now(if v == 4242 { 0 } else { 1 });
            }
            crate::process::Fork::Parent(pid) => {
                let mut b = [0u8; 4];
                // SAFETY: reads into a live 4-byte buffer.
                assert_eq!(unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 4) }, 4);
                let raw = i32::from_ne_bytes(b);
                assert!(raw >= 0);
                let pidfd = crate::pidfd::PidFd::open(pid).unwrap();
                let fd = crate::guard_fd::pidfd_getfd(pidfd.as_fd(), raw).unwrap();
                let l = Listener::from_fd(fd);
                let _ = l.set_sync_wakeup();
                assert_eq!(
                    l.wait(Duration::from_secs(5)).unwrap(),
                    ListenerState::Ready
                );
                let n = l.recv().unwrap().expect("notification");
                assert_eq!(n.nr, libc::SYS_getppid);
                assert!(n.still_valid());
                n.respond_value(4242).unwrap();
                assert_eq!(
                    crate::process::wait_pid(pid).unwrap(),
                    crate::process::ExitStatus::Exited(0)
                );
            }
        }
    }
}
