//! Shared memory for the file-system host: a memfd-backed `MAP_SHARED` region that the host and
//! its module processes map at the same offsets, plus futex wait/wake on words inside it.
//!
//! The region is accessed by copying in and out (`read`/`write`) or through atomics: never
//! through `&[u8]`/`&mut [u8]` views, because another process may write the same bytes at any
//! time and a Rust reference would promise the compiler it cannot. Protocols built on top
//! (the request ring, the undo log) decide who may write which bytes when; a misbehaving peer
//! can only make us read garbage, which callers validate, never cause undefined behaviour here.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use rustix::fs::MemfdFlags;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::thread::futex;

/// A `MAP_SHARED` mapping of a memfd. Processes forked after creation share it; the fd can be
/// passed to others that map it themselves.
#[derive(Debug)]
pub struct SharedRegion {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: all access goes through bounds-checked copies (`ptr::copy` tolerates concurrent
// writers at the hardware level; values read are validated by callers) or through atomics.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; no method hands out a non-atomic reference into the mapping.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates a zero-filled region of `len` bytes (rounded up to pages), named `name` in
    /// /proc/PID/maps. Pages are allocated lazily, so a large, mostly unused region is cheap.
    pub fn create(name: &str, len: usize) -> io::Result<SharedRegion> {
        let len = len.max(1).next_multiple_of(4096);
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        // SAFETY: a fresh shared mapping of our own memfd with a null hint aliases nothing in
        // this process; the result is checked before use and unmapped only in Drop.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedRegion { ptr, len, fd })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: regions are at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping's address in this process (for page protection of parts of it).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The memfd, e.g. to pass to a process that did not inherit the mapping.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn check(&self, off: usize, n: usize) {
        let end = off.checked_add(n).expect("shared region range overflows");
        assert!(
            end <= self.len,
            "shared region access {off}+{n} beyond its {} bytes",
            self.len
        );
    }

    /// Copies `buf.len()` bytes at `off` out of the region. Panics if out of range.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        self.check(off, buf.len());
        // SAFETY: the range is inside the mapping (checked); buf is a distinct, writable Rust
        // buffer, so the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        }
    }

    /// Copies `data` into the region at `off`. Panics if out of range.
    pub fn write(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        // SAFETY: the range is inside the mapping (checked) and data is a distinct Rust
        // buffer; no Rust reference into the mapping exists that this write could invalidate.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        }
    }

    /// Copies bytes at `off` out through the memfd (`pread`), not through this process's
    /// mapping, so it works while the mapping is protected: level 1's protection manager
    /// reads shared memory this way (one syscall, no page-table change to undo).
    pub fn pread(&self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len());
        let mut done = 0;
        while done < buf.len() {
            let n = rustix::io::pread(&self.fd, &mut buf[done..], (off + done) as u64)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into the region at `off` through the memfd (`pwrite`): the protection
    /// manager's write path while the mapping is read-only or unmapped for the module.
    pub fn pwrite(&self, off: usize, data: &[u8]) -> io::Result<()> {
        self.check(off, data.len());
        let mut done = 0;
        while done < data.len() {
            done += rustix::io::pwrite(&self.fd, &data[done..], (off + done) as u64)?;
        }
        Ok(())
    }

    /// Sets this process's access to the page-aligned `[off, off + len)` of the mapping:
    /// `(false, false)` none, `(true, false)` read-only, `(true, true)` read-write. Access
    /// through [`SharedRegion::pread`]/[`SharedRegion::pwrite`] and other processes' mappings
    /// are not affected.
    pub fn protect(&self, off: usize, len: usize, read: bool, write: bool) -> io::Result<()> {
        self.check(off, len);
        if !off.is_multiple_of(4096) || !len.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "protected part of a shared region must be page-aligned",
            ));
        }
        let mut flags = rustix::mm::MprotectFlags::empty();
        if read {
            flags |= rustix::mm::MprotectFlags::READ;
        }
        if write {
            flags |= rustix::mm::MprotectFlags::WRITE;
        }
        // SAFETY: the range is a page-aligned part of our own live mapping (checked). No Rust
        // reference into it exists except atomics handed out by atomic_u32/u64, which callers
        // must not place in a range they protect (the store keeps its atomics outside the
        // block area it protects); a later access to a protected page raises SIGSEGV, which
        // is the point, rather than undefined behaviour in Rust's model.
        unsafe { rustix::mm::mprotect(self.ptr.as_ptr().add(off).cast(), len, flags)? };
        Ok(())
    }

    /// Sets `n` bytes at `off` to zero. Panics if out of range.
    pub fn zero(&self, off: usize, n: usize) {
        self.check(off, n);
        // SAFETY: the range is inside the mapping (checked).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), 0, n) }
    }

    /// The 32-bit atomic at `off` (must be 4-aligned). Panics if out of range or misaligned.
    pub fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4);
        assert!(
            off.is_multiple_of(4),
            "atomic u32 at unaligned offset {off}"
        );
        // SAFETY: in range and aligned (checked; the mapping is page-aligned); the memory is
        // initialised (zero-filled memfd) and any bit pattern is a valid AtomicU32; it lives
        // as long as &self.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// The 64-bit atomic at `off` (must be 8-aligned). Panics if out of range or misaligned.
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert!(
            off.is_multiple_of(8),
            "atomic u64 at unaligned offset {off}"
        );
        // SAFETY: as for atomic_u32, with 8-byte alignment.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping made in create(); every reference into it
        // borrows &self, so none outlives this call.
        let r = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert!(r.is_ok(), "munmap of shared region failed: {r:?}");
    }
}

/// Outcome of [`futex_wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Woken, or the word already differed from `expected`, or a signal interrupted us:
    /// callers re-check the word either way.
    Changed,
    /// The timeout passed.
    TimedOut,
}

/// Sleeps while `*word == expected`, at most `timeout`. Shared (not process-private) futex, so
/// it pairs with [`futex_wake`] from another process mapping the same memfd page.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<Wait> {
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    });
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Ok(()) => Ok(Wait::Changed),
        Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Ok(Wait::Changed),
        Err(rustix::io::Errno::TIMEDOUT) => Ok(Wait::TimedOut),
        Err(e) => Err(e.into()),
    }
}

/// Wakes up to `n` waiters on `word` (shared futex). Returns how many were woken.
pub fn futex_wake(word: &AtomicU32, n: u32) -> io::Result<usize> {
    Ok(futex::wake(word, futex::Flags::empty(), n)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn read_write_and_atomics_share_bytes() {
        let r = SharedRegion::create("t", 10_000).unwrap();
        assert_eq!(r.len(), 12_288);
        r.write(100, b"hello");
        let mut b = [0u8; 5];
        r.read(100, &mut b);
        assert_eq!(&b, b"hello");
        r.atomic_u64(8).store(7, Ordering::SeqCst);
        let mut w = [0u8; 8];
        r.read(8, &mut w);
        assert_eq!(u64::from_ne_bytes(w), 7);
        r.zero(100, 5);
        r.read(100, &mut b);
        assert_eq!(b, [0; 5]);
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn out_of_range_panics() {
        let r = SharedRegion::create("t", 4096).unwrap();
        r.write(4095, b"ab");
    }

    #[test]
    fn futex_times_out_and_sees_change() {
        let r = SharedRegion::create("t", 4096).unwrap();
        let w = r.atomic_u32(0);
        assert_eq!(
            futex_wait(w, 0, Some(Duration::from_millis(5))).unwrap(),
            Wait::TimedOut
        );
        w.store(1, Ordering::SeqCst);
        assert_eq!(
            futex_wait(w, 0, Some(Duration::from_millis(5))).unwrap(),
            Wait::Changed
        );
        assert_eq!(futex_wake(w, 1).unwrap(), 0);
    }
}
