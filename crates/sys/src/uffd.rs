//! Dirty-page tracking of another process without soft-dirty: userfaultfd write-protect in
//! async mode (the kernel resolves write faults itself and marks the page written) plus the
//! `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap`, which lists written pages and re-protects them
//! atomically (Linux 6.7+).
//!
//! The userfaultfd must be created *by* the tracked process (it binds to the creator's mm); a
//! tracer injects `userfaultfd()`, takes the fd with `pidfd_getfd`, and drives it from outside.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::process::Pid;

const fn iowr(ty: u64, nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (ty << 8) | nr
}

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = iowr(0xAA, 0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, 24);
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_UNPOPULATED`: never-touched pages are tracked too.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

const PAGEMAP_SCAN: u64 = iowr(b'f' as u64, 16, 96);
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> io::Result<i64> {
    // SAFETY: callers pass the #[repr(C)] struct whose size the request number encodes; it
    // lives for the whole call.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i64::from(r))
    }
}

/// A userfaultfd (taken from the tracked process) in write-protect-async mode.
#[derive(Debug)]
pub struct WpTracker {
    fd: OwnedFd,
}

impl WpTracker {
    /// Performs the API handshake with WP_ASYNC | WP_UNPOPULATED on a fresh userfaultfd.
    pub fn new(fd: OwnedFd) -> io::Result<WpTracker> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
        Ok(WpTracker { fd })
    }
    /// Registers `[start, start+len)` (whole VMAs) for write-protect tracking.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut r).map(|_| ())
    }
    /// Write-protects `[start, start+len)`: the baseline after which writes are tracked.
    pub fn write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut w).map(|_| ())
    }
}

/// `/proc/PID/pagemap`, for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct PageMap {
    file: File,
}

/// Outcome of a scan of one range.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// The page runs `[start, end)` that matched.
    Runs(Vec<(u64, u64)>),
    /// Part of the range is not registered for async write-protect (a mapping replaced since
    /// it was registered): the caller must treat the whole range as new.
    NotTracked,
}

impl PageMap {
    /// Opens `/proc/PID/pagemap`.
    pub fn open(pid: Pid) -> io::Result<PageMap> {
        Ok(PageMap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// Pages written since the last scan in `[start, end)`, re-write-protecting them in the
    /// same step (no write can slip between "read the list" and "protect again").
    pub fn take_written(&self, start: u64, end: u64) -> io::Result<Scan> {
        let flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
        match self.scan(start, end, flags, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN) {
            Ok(r) => Ok(Scan::Runs(r)),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(Scan::NotTracked),
            Err(e) => Err(e),
        }
    }

    /// Pages that hold data (present in RAM or swapped out) in `[start, end)`; never-touched
    /// pages of a sparse mapping are skipped. Call it *before* write-protecting a range: the
    /// markers WP_UNPOPULATED leaves on empty pages count as "swapped".
    pub fn populated(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let any = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        self.scan(start, end, 0, 0, any, any)
    }

    /// Like [`PageMap::populated`] but only pages that are not backed by the file any more
    /// (copied on write): what a private file mapping holds beyond its file.
    pub fn populated_anon(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let any = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        self.scan_full(
            start,
            end,
            0,
            PAGE_IS_FILE,
            PAGE_IS_FILE,
            any,
            any | PAGE_IS_FILE,
        )
    }

    fn scan(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        mask: u64,
        anyof: u64,
        ret: u64,
    ) -> io::Result<Vec<(u64, u64)>> {
        self.scan_full(start, end, flags, 0, mask, anyof, ret)
    }

    #[allow(clippy::too_many_arguments)]
    fn scan_full(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        inverted: u64,
        mask: u64,
        anyof: u64,
        ret: u64,
    ) -> io::Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut vec = vec![PageRegion::default(); 512];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: at,
                end,
                vec: vec.as_mut_ptr() as u64,
                vec_len: vec.len() as u64,
                category_inverted: inverted,
                category_mask: mask,
                category_anyof_mask: anyof,
                return_mask: ret,
                ..Default::default()
            };
            let n = ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN, &mut arg)? as usize;
            for r in &vec[..n.min(vec.len())] {
                match out.last_mut() {
                    Some(last) if last.1 == r.start => last.1 = r.end,
                    _ => out.push((r.start, r.end)),
                }
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tracks our own memory (the kernel does not care who drives the uffd).
    #[test]
    fn written_pages_are_reported_once() {
        // SAFETY: userfaultfd takes flags only.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(raw >= 0, "userfaultfd: {}", io::Error::last_os_error());
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) };
        let t = WpTracker::new(fd).unwrap();
        let len = 64 * 4096usize;
        // SAFETY: anonymous private mapping of len bytes; unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p as u64;
        let pm = PageMap::open(Pid::this()).unwrap();
        // SAFETY: page 1 lies inside the mapping created above.
        unsafe { *(p as *mut u8).add(4096) = 1 };
        assert_eq!(
            pm.populated(a, a + len as u64).unwrap(),
            vec![(a + 4096, a + 2 * 4096)]
        );
        t.register(a, len as u64).unwrap();
        t.write_protect(a, len as u64).unwrap();
        assert_eq!(
            pm.take_written(a, a + len as u64).unwrap(),
            Scan::Runs(vec![])
        );
        for i in [3usize, 4, 10] {
            // SAFETY: page i lies inside the mapping created above.
            unsafe { *(p as *mut u8).add(i * 4096 + 7) = 1 };
        }
        let expect = vec![(a + 3 * 4096, a + 5 * 4096), (a + 10 * 4096, a + 11 * 4096)];
        assert_eq!(
            pm.take_written(a, a + len as u64).unwrap(),
            Scan::Runs(expect)
        );
        assert_eq!(
            pm.take_written(a, a + len as u64).unwrap(),
            Scan::Runs(vec![]),
            "re-protected"
        );
        // SAFETY: unmapping the mapping created above; nothing references it any more.
        unsafe { libc::munmap(p, len) };
    }
}
