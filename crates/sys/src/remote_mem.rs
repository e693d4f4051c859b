//! Another process's memory: `process_vm_readv` for bulk reads, `/proc/PID/mem` for writes
//! (it may write into read-only private pages, which a restorer needs), and locating a
//! `syscall` instruction to inject syscalls from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::process::Pid;

/// Reads `buf.len()` bytes at `addr` of `pid` with `process_vm_readv`. Short reads (a range
/// crossing into unmapped memory) are errors.
pub fn read(pid: Pid, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    in_chunks(buf.len(), |done, chunk| {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: chunk,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: chunk,
        };
        // SAFETY: local points at `chunk` writable bytes of buf; remote is only an address in
        // the other process, which the kernel checks.
        unsafe { libc::process_vm_readv(pid.as_raw(), &local, 1, &remote, 1, 0) }
    })
}

/// Runs one transfer call per chunk of at most 1 GiB (process_vm_readv/writev move at most
/// ~2 GiB per call) until `len` bytes are done; `call(done, chunk)` returns the syscall result.
/// A call that moves nothing means the remote range is not mapped.
fn in_chunks(len: usize, mut call: impl FnMut(usize, usize) -> isize) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let chunk = (len - done).min(1 << 30);
        let r = call(done, chunk);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "remote range not mapped",
            ));
        }
        done += r as usize;
    }
    Ok(())
}

/// Reads many `(addr, len)` ranges of `pid` into one buffer, in order, using up to 512
/// iovecs per call.
pub fn read_ranges(pid: Pid, ranges: &[(u64, usize)], out: &mut Vec<u8>) -> io::Result<()> {
    let total: usize = ranges.iter().map(|r| r.1).sum();
    let base = out.len();
    out.resize(base + total, 0);
    let mut off = base;
    for group in ranges.chunks(512) {
        let glen: usize = group.iter().map(|r| r.1).sum();
        let remote: Vec<libc::iovec> = group
            .iter()
            .map(|&(a, l)| libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: l,
            })
            .collect();
        let local = libc::iovec {
            iov_base: out[off..].as_mut_ptr().cast(),
            iov_len: glen,
        };
        // SAFETY: local covers `glen` writable bytes of out (resized above); remote iovecs
        // are addresses in the other process, checked by the kernel.
        let r = unsafe {
            libc::process_vm_readv(
                pid.as_raw(),
                &local,
                1,
                remote.as_ptr(),
                remote.len() as u64,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r as usize != glen {
            // A partial read means a range vanished: fall back range by range to name it.
            let mut o = off;
            for &(a, l) in group {
                read(pid, a, &mut out[o..o + l])?;
                o += l;
            }
        }
        off += glen;
    }
    Ok(())
}

/// Writes `data` at `addr` of `pid` with `process_vm_writev` (the mapping must be writable;
/// several times faster than /proc/PID/mem, which bounces every page through a kernel buffer).
pub fn write(pid: Pid, addr: u64, data: &[u8]) -> io::Result<()> {
    in_chunks(data.len(), |done, chunk| {
        let local = libc::iovec {
            iov_base: data[done..].as_ptr() as *mut libc::c_void,
            iov_len: chunk,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: chunk,
        };
        // SAFETY: local covers `chunk` readable bytes of data (the kernel only reads it);
        // remote is an address in the other process, checked by the kernel.
        unsafe { libc::process_vm_writev(pid.as_raw(), &local, 1, &remote, 1, 0) }
    })
}

/// `/proc/PID/mem`, opened read-write.
#[derive(Debug)]
pub struct MemFile {
    file: File,
}

impl MemFile {
    /// Opens `/proc/PID/mem` (needs ptrace rights over `pid`).
    pub fn open(pid: Pid) -> io::Result<MemFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(MemFile { file })
    }
    /// Writes `data` at `addr`, even into read-only private mappings (FOLL_FORCE).
    pub fn write_all_at(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, addr)
    }
    /// Reads into `buf` from `addr`.
    pub fn read_exact_at(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }
}

/// Finds a `syscall` instruction (0f 05) inside the `[vdso]` of `pid`, to inject syscalls from.
pub fn find_syscall_insn(pid: Pid) -> io::Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    for line in maps.lines() {
        if !line.ends_with("[vdso]") {
            continue;
        }
        let range = line.split_whitespace().next().unwrap_or("");
        let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
        let start = u64::from_str_radix(a, 16).map_err(io::Error::other)?;
        let end = u64::from_str_radix(b, 16).map_err(io::Error::other)?;
        let mut buf = vec![0u8; (end - start) as usize];
        MemFile::open(pid)?.read_exact_at(start, &mut buf)?;
        if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(start + i as u64);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no syscall instruction in the vDSO of {pid}"),
    ))
}

/// Reads each `(addr, len)` range of `pid` into its own buffer (no zero-fill, no extra copy),
/// up to 512 ranges per `process_vm_readv`. A range that vanished is an error naming it.
pub fn read_runs(pid: Pid, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = ranges.iter().map(|r| Vec::with_capacity(r.1)).collect();
    for (gi, group) in ranges.chunks(512).enumerate() {
        let bufs = &mut out[gi * 512..gi * 512 + group.len()];
        let local: Vec<libc::iovec> = bufs
            .iter_mut()
            .zip(group)
            .map(|(b, r)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: r.1,
            })
            .collect();
        let remote: Vec<libc::iovec> = group
            .iter()
            .map(|&(a, l)| libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: l,
            })
            .collect();
        let want: usize = group.iter().map(|r| r.1).sum();
        // SAFETY: each local iovec points at the spare capacity (exactly r.1 bytes, reserved
        // above) of its own Vec; remote iovecs are addresses in the other process, checked by
        // the kernel.
        let r = unsafe {
            libc::process_vm_readv(
                pid.as_raw(),
                local.as_ptr(),
                local.len() as u64,
                remote.as_ptr(),
                remote.len() as u64,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r as usize != want {
            // Partial: name the first range that did not arrive whole. Nothing is set_len'd.
            let mut left = r as usize;
            let mut bad = group[group.len() - 1];
            for &(a, l) in group {
                if left < l {
                    bad = (a, l);
                    break;
                }
                left -= l;
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "remote range {:#x}+{:#x} of {pid} is not mapped",
                    bad.0, bad.1
                ),
            ));
        }
        for (b, r) in bufs.iter_mut().zip(group) {
            // SAFETY: the kernel filled all r.1 bytes of this buffer (the total matched `want`,
            // and process_vm_readv fills local iovecs in order).
            unsafe { b.set_len(r.1) };
        }
    }
    Ok(out)
}
