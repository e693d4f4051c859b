//! Reading a stopped process's state from /proc: mappings, fds (with fdinfo), signal bits,
//! umask, memory-layout fields, sockets. The trapped-call log says *what changed*; /proc is
//! the authority on *whether it happened* (commit on success).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;

use sys::Pid;

use crate::model::{Fd, FdKind, MmLayout, Vma, VmaKind};

/// Parses `/proc/PID/maps` into mappings (base_seq 0; the caller sets it).
pub fn maps(pid: Pid) -> io::Result<Vec<Vma>> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(text.lines().filter_map(parse_maps_line).collect())
}

/// One line of /proc/PID/maps. `None` for `[vsyscall]` (fixed, not part of the mm).
pub fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode: u64 = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (a, b) = range.split_once('-')?;
    let start = u64::from_str_radix(a, 16).ok()?;
    let end = u64::from_str_radix(b, 16).ok()?;
    if perms.len() < 4 {
        return None;
    }
    let mut prot = 0u32;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ as u32;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE as u32;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC as u32;
    }
    let shared = perms[3] == b's';
    let kind = match path.as_str() {
        "[vsyscall]" => return None,
        "[vdso]" => VmaKind::Vdso,
        "[vvar]" | "[vvar_vclock]" => VmaKind::Vvar,
        p if inode != 0 && p.starts_with('/') => {
            let deleted = p.ends_with(" (deleted)");
            if shared && (deleted || p.starts_with("/dev/zero") || p.starts_with("/SYSV")) {
                VmaKind::SharedAnon
            } else if shared {
                VmaKind::SharedFile {
                    path: p.to_string(),
                    offset,
                }
            } else if deleted {
                VmaKind::Anon
            } else {
                VmaKind::PrivateFile {
                    path: p.to_string(),
                    offset,
                }
            }
        }
        _ if shared => VmaKind::SharedAnon,
        _ => VmaKind::Anon,
    };
    Some(Vma {
        start,
        end,
        prot,
        kind,
        label: path,
        base_seq: 0,
    })
}

/// Pending standard signals `(thread SigPnd, process ShdPnd)` of thread `tid` of `pid`.
/// Real-time signals (32+) are left out: their queued siginfo cannot be re-created.
pub fn pending(pid: Pid, tid: Pid) -> (u64, u64) {
    let t = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    let hex = |k| {
        field(&t, k)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    let std_mask = (1u64 << 31) - 1;
    (hex("SigPnd:") & std_mask, hex("ShdPnd:") & std_mask)
}

/// Resource limits `(resource, soft, hard)` in RLIMIT_* order; "unlimited" is `u64::MAX`.
pub fn rlimits(pid: Pid) -> io::Result<Vec<(i32, u64, u64)>> {
    let t = fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let val = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Ok(t.lines()
        .skip(1)
        .enumerate()
        .filter_map(|(i, l)| {
            let cols: Vec<&str> = l.get(26..)?.split_whitespace().collect();
            Some((i as i32, val(cols.first()?)?, val(cols.get(1)?)?))
        })
        .collect())
}

/// Thread ids of `pid` (host namespace), the leader first.
pub fn tasks(pid: Pid) -> Vec<Pid> {
    let mut v: Vec<Pid> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|s| s.parse().ok())
                        .and_then(Pid::from_raw)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|t| (*t != pid, t.as_raw()));
    v
}

/// A thread's id inside the program's pid namespace (last field of `NSpid`).
pub fn ns_tid(pid: Pid, tid: Pid) -> Option<i32> {
    let t = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    field(&t, "NSpid:")?.split_whitespace().last()?.parse().ok()
}

/// Whether a mapping's writes are tracked by the uffd-wp tracker.
pub fn trackable(v: &Vma) -> bool {
    matches!(
        v.kind,
        VmaKind::Anon | VmaKind::PrivateFile { .. } | VmaKind::SharedAnon
    )
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// `(SigCgt, SigIgn, Umask, thread count)` from /proc/PID/status.
pub fn status(pid: Pid) -> io::Result<(u64, u64, u32, u32)> {
    let t = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = |k| {
        field(&t, k)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    let umask = field(&t, "Umask:")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0o022);
    let threads = field(&t, "Threads:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    Ok((hex("SigCgt:"), hex("SigIgn:"), umask, threads))
}

/// Memory-layout fields from /proc/PID/stat and the auxiliary vector; `brk` is left 0.
pub fn mm_layout(pid: Pid) -> io::Result<MmLayout> {
    let t = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = t.rsplit_once(") ").map(|x| x.1).unwrap_or("");
    // rest starts at field 3 (state); field N is rest[N-3].
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let g = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let raw = fs::read(format!("/proc/{pid}/auxv"))?;
    let auxv = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(MmLayout {
        start_code: g(26),
        end_code: g(27),
        start_stack: g(28),
        start_data: g(45),
        end_data: g(46),
        start_brk: g(47),
        brk: 0,
        arg_start: g(48),
        arg_end: g(49),
        env_start: g(50),
        env_end: g(51),
        auxv,
    })
}

/// What the guard knows about sockets from the log, by socket inode.
#[derive(Debug, Default, Clone)]
pub struct SocketLog {
    pub backlog: HashMap<u64, i32>,
    pub sockopts: HashMap<u64, Vec<crate::model::SockOpt>>,
}

/// Devices a program may hold open and still be restored (their state is trivial).
pub const RESTORABLE_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];

/// The fd table. `inherited` holds `(fd, dev, ino)` of the guard's own stdio at launch: an
/// fd of the program that still names the same object is passed through on restore.
/// Returns the fds and the reasons some cannot be restored.
pub fn fds(
    pid: Pid,
    pidfd: std::os::fd::BorrowedFd<'_>,
    inherited: &[(i32, u64, u64)],
    socklog: &SocketLog,
) -> io::Result<(Vec<Fd>, Vec<String>)> {
    let (fds, mut refusals) = fds_of(pid, pidfd, inherited, socklog, &mut Vec::new())?;
    let fds: Vec<Fd> = fds.into_iter().map(|f| f.0).collect();
    refusals.extend(pipe_refusals(&fds));
    Ok((fds, refusals))
}

/// An fd with the object it names `(dev, ino)`.
pub type FdObj = (Fd, u64, u64);

/// One process's fd table, each fd with the `(dev, ino)` it names (to find the descriptions
/// shared across a process tree). `peeked` holds the pipes whose buffered bytes were already
/// read (from another process's read end). Pipes are not checked for their peer here: see
/// [`pipe_refusals`] over the whole tree.
pub fn fds_of(
    pid: Pid,
    pidfd: std::os::fd::BorrowedFd<'_>,
    inherited: &[(i32, u64, u64)],
    socklog: &SocketLog,
    peeked: &mut Vec<u64>,
) -> io::Result<(Vec<FdObj>, Vec<String>)> {
    let mut out = Vec::new();
    let mut refusals = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    let mut nums: Vec<i32> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    nums.sort_unstable();
    for n in nums {
        let Ok(link) = fs::read_link(format!("{dir}/{n}")) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")) else {
            continue;
        };
        let flags = field(&info, "flags:")
            .and_then(|v| i32::from_str_radix(v, 8).ok())
            .unwrap_or(0);
        let pos: u64 = field(&info, "pos:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let meta = fs::metadata(format!("{dir}/{n}")).ok();
        let (dev, ino) = meta.as_ref().map(|m| (m.dev(), m.ino())).unwrap_or((0, 0));
        if inherited
            .iter()
            .any(|&(f, d, i)| f == n && d == dev && i == ino)
        {
            out.push((
                Fd {
                    fd: n,
                    flags,
                    kind: FdKind::Inherited,
                    desc: 0,
                },
                dev,
                ino,
            ));
            continue;
        }
        let kind = if let Some(rest) = link.strip_prefix("pipe:[") {
            let inode = rest.trim_end_matches(']').parse().unwrap_or(0);
            let write_end = flags & libc::O_ACCMODE == libc::O_WRONLY;
            let (mut data, mut capacity) = (Vec::new(), 0);
            if !write_end && !peeked.contains(&inode) {
                peeked.push(inode);
                use std::os::fd::AsFd;
                let got = sys::guard_fd::pidfd_getfd(pidfd, n)
                    .and_then(|c| sys::guard_fd::pipe_peek(c.as_fd()));
                match got {
                    Ok((d, c)) => (data, capacity) = (d, c as u64),
                    Err(e) => {
                        refusals.push(format!(
                            "fd {n}: {link}: cannot read its buffered bytes: {e}"
                        ));
                        continue;
                    }
                }
            }
            FdKind::Pipe {
                inode,
                write_end,
                data,
                capacity,
                peer_closed: false,
            }
        } else if let Some(rest) = link.strip_prefix("socket:[") {
            let inode: u64 = rest.trim_end_matches(']').parse().unwrap_or(0);
            let info = sys::guard_fd::pidfd_getfd(pidfd, n).and_then(|c| {
                use std::os::fd::AsFd;
                sys::guard_fd::socket_info(c.as_fd())
            });
            let ip = |a: &std::net::SocketAddr| -> (bool, [u8; 16], u16) {
                match a {
                    std::net::SocketAddr::V4(v) => {
                        let mut b = [0u8; 16];
                        b[..4].copy_from_slice(&v.ip().octets());
                        (false, b, v.port())
                    }
                    std::net::SocketAddr::V6(v) => (true, v.ip().octets(), v.port()),
                }
            };
            match info {
                Ok(si) if si.sock_type == libc::SOCK_STREAM && si.local.is_some() => {
                    let (v6, addr, port) = ip(&si.local.expect("checked"));
                    if si.listening {
                        FdKind::TcpListen {
                            v6,
                            addr,
                            port,
                            backlog: socklog.backlog.get(&inode).copied().unwrap_or(128),
                            sockopts: socklog.sockopts.get(&inode).cloned().unwrap_or_default(),
                        }
                    } else {
                        FdKind::TcpOther { v6 }
                    }
                }
                Ok(si) if si.sock_type == libc::SOCK_DGRAM && si.local.is_some() => {
                    let (v6, addr, port) = ip(&si.local.expect("checked"));
                    FdKind::Udp { v6, addr, port }
                }
                Ok(si) => {
                    refusals.push(format!(
                        "fd {n}: {link}: socket family {} type {} is not restorable yet (TCP and UDP are)",
                        si.domain, si.sock_type
                    ));
                    continue;
                }
                Err(e) => {
                    refusals.push(format!("fd {n}: {link}: cannot inspect the socket: {e}"));
                    continue;
                }
            }
        } else if link == "anon_inode:[eventfd]" {
            let count = field(&info, "eventfd-count:")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0);
            FdKind::EventFd { count }
        } else if link == "anon_inode:[eventpoll]" {
            let entries = info
                .lines()
                .filter_map(|l| {
                    let l = l.strip_prefix("tfd:")?;
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let tfd = w.first()?.parse().ok()?;
                    let ev = u32::from_str_radix(
                        w.get(w.iter().position(|x| *x == "events:")? + 1)?,
                        16,
                    )
                    .ok()?;
                    let data =
                        u64::from_str_radix(w.get(w.iter().position(|x| *x == "data:")? + 1)?, 16)
                            .ok()?;
                    Some((tfd, ev, data))
                })
                .collect();
            FdKind::Epoll { entries }
        } else if link == "anon_inode:[timerfd]" {
            let clock = field(&info, "clockid:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(libc::CLOCK_MONOTONIC);
            let ts = |k: &str| -> u64 {
                let v = field(&info, k).unwrap_or("(0, 0)");
                let nums: Vec<u64> = v
                    .trim_matches(|c| c == '(' || c == ')')
                    .split(',')
                    .map(|x| x.trim().parse().unwrap_or(0))
                    .collect();
                nums.first().copied().unwrap_or(0) * 1_000_000_000
                    + nums.get(1).copied().unwrap_or(0)
            };
            FdKind::TimerFd {
                clock,
                value_ns: ts("it_value:"),
                interval_ns: ts("it_interval:"),
            }
        } else if link == "anon_inode:[signalfd]" {
            let mask = field(&info, "sigmask:")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0);
            FdKind::SignalFd { mask }
        } else if link.starts_with('/') && !link.ends_with(" (deleted)") {
            let Some(m) = meta else { continue };
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_dir() {
                FdKind::Dir { path: link }
            } else if ft.is_file() {
                let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
                FdKind::File {
                    path: link,
                    pos,
                    size: m.len(),
                    writable,
                }
            } else if ft.is_fifo() {
                // Reopening a FIFO blocks until its peer opens it: the restorer would hang.
                refusals.push(format!(
                    "fd {n}: FIFO {link} (named pipes are not restorable yet)"
                ));
                continue;
            } else if ft.is_char_device()
                && (RESTORABLE_DEVICES.contains(&link.as_str()) || link.starts_with("/dev/pts/"))
            {
                FdKind::File {
                    path: link,
                    pos: 0,
                    size: 0,
                    writable: false,
                }
            } else {
                refusals.push(format!("fd {n}: device {link} (only null, zero, random, urandom and tty are restorable)"));
                continue;
            }
        } else {
            let what = if link.contains("io_uring") {
                "io_uring instance"
            } else if link.contains("userfaultfd") {
                "userfaultfd of the program's own"
            } else if link.ends_with(" (deleted)") {
                "file deleted while open (its contents are not in the image)"
            } else {
                "kernel object of a kind the guard cannot rebuild"
            };
            refusals.push(format!("fd {n}: {link}: {what}"));
            continue;
        };
        out.push((
            Fd {
                fd: n,
                flags,
                kind,
                desc: 0,
            },
            dev,
            ino,
        ));
    }
    Ok((out, refusals))
}

/// Pipes of which only one end is held by the program (any process of its tree): `(inode,
/// which end it holds)`.
pub fn one_ended_pipes(all: &[Fd]) -> Vec<(u64, bool)> {
    let pipes: Vec<(u64, bool)> = all
        .iter()
        .filter_map(|f| match f.kind {
            FdKind::Pipe {
                inode, write_end, ..
            } => Some((inode, write_end)),
            _ => None,
        })
        .collect();
    let mut out: Vec<(u64, bool)> = pipes
        .iter()
        .filter(|&&(inode, we)| !pipes.iter().any(|&(i, w)| i == inode && w != we))
        .copied()
        .collect();
    out.dedup();
    out
}

/// A pipe can only be rebuilt when its other end is held by the program (any process of its
/// tree) or by nobody: the reasons for those whose peer is elsewhere.
pub fn pipe_refusals(all: &[Fd]) -> Vec<String> {
    let mut refusals = Vec::new();
    let closed = |inode: u64| {
        all.iter().any(
            |f| matches!(f.kind, FdKind::Pipe { inode: i, peer_closed: true, .. } if i == inode),
        )
    };
    for (inode, _) in one_ended_pipes(all) {
        if !closed(inode) {
            let why = format!(
                "pipe:[{inode}] has only one end in the program (its peer is a process outside the guarded tree)"
            );
            if !refusals.contains(&why) {
                refusals.push(why);
            }
        }
    }
    refusals
}

/// `(process group, session, exit signal)` of a process from /proc/PID/stat (host pids).
pub fn tree_fields(pid: Pid) -> Option<(i32, i32, i32)> {
    let t = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = t.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3: pgrp is field 5, session 6, exit_signal 38.
    let g = |n: usize| f.get(n - 3).and_then(|v| v.parse().ok());
    Some((g(5)?, g(6)?, g(38)?))
}

/// `(state letter, wait status)` of a process from /proc/PID/stat: the status (field 52,
/// `exit_code`) is what its parent's `wait` will report once it is a zombie (`Z`).
pub fn run_state(pid: Pid) -> Option<(char, i32)> {
    let t = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = t.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    // rest starts at field 3; field 52 is rest[49].
    let code = f.get(49).and_then(|c| c.parse().ok()).unwrap_or(0);
    Some((state, code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let v = parse_maps_line("7f00a000-7f00c000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(
            (v.start, v.end, v.prot, v.kind),
            (0x7f00a000, 0x7f00c000, 3, VmaKind::Anon)
        );
        let v = parse_maps_line("55d0-56d0 r-xp 00002000 fe:01 1234 /usr/bin/cat").unwrap();
        assert_eq!(
            v.kind,
            VmaKind::PrivateFile {
                path: "/usr/bin/cat".into(),
                offset: 0x2000
            }
        );
        let v = parse_maps_line("1000-2000 rw-s 00000000 00:01 99 /dev/zero (deleted)").unwrap();
        assert_eq!(v.kind, VmaKind::SharedAnon);
        let v = parse_maps_line("1000-2000 rw-s 00001000 fe:01 99 /tmp/x y").unwrap();
        assert_eq!(
            v.kind,
            VmaKind::SharedFile {
                path: "/tmp/x y".into(),
                offset: 0x1000
            }
        );
        assert_eq!(
            parse_maps_line("1000-3000 r-xp 00000000 00:00 0 [vdso]")
                .unwrap()
                .kind,
            VmaKind::Vdso
        );
        assert!(
            parse_maps_line("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]")
                .is_none()
        );
    }

    #[test]
    fn own_process_state_reads() {
        let me = Pid::this();
        let v = maps(me).unwrap();
        assert!(v.iter().any(|m| m.kind == VmaKind::Vdso));
        let (_, _, umask, threads) = status(me).unwrap();
        assert!(umask <= 0o777 && threads >= 1);
        let mm = mm_layout(me).unwrap();
        let (pgrp, sid, sig) = tree_fields(me).unwrap();
        // 0 is a real answer: a process whose group or session leader lives outside its pid
        // namespace reads 0 there (CI runs the tests that way), so only negatives are wrong.
        assert!(pgrp >= 0 && sid >= 0, "pgrp {pgrp} sid {sid}");
        assert_eq!(sig, libc::SIGCHLD, "started by fork/exec");
        assert!(matches!(run_state(me).unwrap().0, 'R' | 'S'));
        let lim = rlimits(me).unwrap();
        assert_eq!(lim.len(), 16);
        assert_eq!(
            lim[libc::RLIMIT_NOFILE as usize].0,
            libc::RLIMIT_NOFILE as i32
        );
        assert!(lim[libc::RLIMIT_NOFILE as usize].1 > 0);
        assert!(mm.start_code < mm.end_code && !mm.auxv.is_empty());
        let pidfd = sys::pidfd::PidFd::open(me).unwrap();
        use std::os::fd::AsFd;
        let (fds, _) = fds(me, pidfd.as_fd(), &[], &SocketLog::default()).unwrap();
        assert!(!fds.is_empty());
    }
}
