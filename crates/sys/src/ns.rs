//! Namespaces and `clone3`: starting a process as pid 1 of a fresh pid namespace (and mount
//! namespace), with an explicit pid via `set_tid` where the restorer needs one.

use std::io;

use crate::process::{Fork, Pid};

/// `CLONE_NEWPID`.
pub const NEWPID: u64 = libc::CLONE_NEWPID as u64;
/// `CLONE_NEWNS`.
pub const NEWNS: u64 = libc::CLONE_NEWNS as u64;
/// `CLONE_NEWNET`.
pub const NEWNET: u64 = libc::CLONE_NEWNET as u64;

/// `clone3` used like `fork` (no new stack: the child continues here on a copy of ours) with
/// namespace `flags` and optionally the pid(s) to take, innermost namespace first.
///
/// The same caveats as [`crate::process::fork`] apply in the child of a threaded parent:
/// no allocation, raw syscalls only, until exec or exit.
pub fn clone3_fork(flags: u64, set_tid: &[i32]) -> io::Result<Fork> {
    // SAFETY: clone_args is plain old data; all-zero is valid ("no extras").
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags;
    args.exit_signal = libc::SIGCHLD as u64;
    if !set_tid.is_empty() {
        args.set_tid = set_tid.as_ptr() as u64;
        args.set_tid_size = set_tid.len() as u64;
    }
    // SAFETY: args is a valid clone_args of the size passed; without CLONE_VM and without a
    // stack the child gets a private copy of our address space, like fork(2), so no Rust
    // reference is shared between the two.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match r {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(
            Pid::from_raw(pid as i32).expect("clone3 returned a positive pid"),
        )),
    }
}

/// Makes every mount in the caller's (new) mount namespace private, so mounts made inside
/// never propagate out. Allocation-free.
pub fn make_mounts_private() -> io::Result<()> {
    // SAFETY: static NUL-terminated strings; MS_REC|MS_PRIVATE changes propagation only.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raw `read(2)` for a forked child that must not allocate; returns bytes read or -errno.
pub fn raw_read(fd: i32, buf: &mut [u8]) -> isize {
    // SAFETY: buf is writable for its length.
    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        -(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as isize)
    } else {
        r
    }
}

/// Raw `write(2)` for a forked child that must not allocate.
pub fn raw_write(fd: i32, buf: &[u8]) -> isize {
    // SAFETY: buf is readable for its length.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
}

/// `execve` with prepared NUL-terminated arrays (built before forking). Returns only on failure.
pub fn raw_execve(
    path: &std::ffi::CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> io::Error {
    // SAFETY: the caller built argv/envp as NULL-terminated arrays of pointers to live
    // C strings (see `ExecArgs`).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Argument and environment arrays for [`raw_execve`], built before fork.
#[derive(Debug)]
pub struct ExecArgs {
    path: std::ffi::CString,
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl ExecArgs {
    /// `path` is the resolved program; `args` includes argv[0]; env is `KEY=VALUE` strings.
    pub fn new(path: &str, args: &[String], env: &[String]) -> io::Result<ExecArgs> {
        let c = |s: &str| {
            std::ffi::CString::new(s).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("NUL byte in {s:?}"))
            })
        };
        let path = c(path)?;
        let mut strings = Vec::new();
        let mut argv = Vec::new();
        for a in args {
            let s = c(a)?;
            argv.push(s.as_ptr());
            strings.push(s);
        }
        argv.push(std::ptr::null());
        let mut envp = Vec::new();
        for e in env {
            let s = c(e)?;
            envp.push(s.as_ptr());
            strings.push(s);
        }
        envp.push(std::ptr::null());
        Ok(ExecArgs {
            path,
            _strings: strings,
            argv,
            envp,
        })
    }
    /// Executes; returns only the error.
    pub fn exec(&self) -> io::Error {
        raw_execve(&self.path, &self.argv, &self.envp)
    }
}

/// A close-on-exec pipe `(read end, write end)`.
pub fn pipe_cloexec() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a writable [i32; 2], as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: pipe2 just created both fds; we take sole ownership of each.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Brings up `lo` in the caller's (new) network namespace, where it starts down.
/// Allocation-free, for a forked child before exec.
pub fn loopback_up() -> io::Result<()> {
    #[repr(C)]
    struct IfReqFlags {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }
    const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
    const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
    // SAFETY: socket takes integers only.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ifr = IfReqFlags {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    ifr.name[..2].copy_from_slice(b"lo");
    // SAFETY: ifr is a live 40-byte struct laid out like `struct ifreq` with ifr_flags; both
    // ioctls read/write only that.
    let r = unsafe {
        if libc::ioctl(s, SIOCGIFFLAGS, &mut ifr as *mut IfReqFlags) != 0 {
            -1
        } else {
            ifr.flags |= libc::IFF_UP as i16;
            libc::ioctl(s, SIOCSIFFLAGS, &ifr as *const IfReqFlags)
        }
    };
    let e = io::Error::last_os_error();
    // SAFETY: s is our socket; closed once.
    unsafe { libc::close(s) };
    if r == 0 { Ok(()) } else { Err(e) }
}
