//! Shared anonymous memory between a process and the children it forks afterwards.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// An array of `AtomicU64` in a `MAP_SHARED | MAP_ANONYMOUS` mapping: every process forked
/// after creation sees the same words. Used for heartbeats, restart requests and benchmark
/// stamps, where a syscall per update would cost more than the thing measured.
#[derive(Debug)]
pub struct SharedAtomics {
    ptr: NonNull<AtomicU64>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping holds only AtomicU64s, which are Sync; the pointer is valid until Drop
// and never handed out beyond `&self` borrows.
unsafe impl Send for SharedAtomics {}
// SAFETY: as above: shared access goes through atomics only.
unsafe impl Sync for SharedAtomics {}

impl SharedAtomics {
    /// Maps `len` zeroed words shared with future children.
    pub fn new(len: usize) -> io::Result<SharedAtomics> {
        let len = len.max(1);
        let bytes = (len * 8).next_multiple_of(4096);
        // SAFETY: a fresh anonymous mapping (null hint, no fd) aliases nothing we own; we check
        // the result before use.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                bytes,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
            )
        }?;
        let ptr = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedAtomics { ptr, len, bytes })
    }
    /// Number of words.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether there are no words (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Word `i`. Panics if `i` is out of range.
    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(
            i < self.len,
            "shared word {i} out of range (len {})",
            self.len
        );
        // SAFETY: i < len, the mapping is len*8 ≤ bytes long, page-aligned (so 8-aligned),
        // zero-initialised (a valid AtomicU64), and lives as long as &self.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }
}

impl Drop for SharedAtomics {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes describe exactly the mapping created in new(); no borrow of it can
        // outlive &self, so nothing refers to it after this point.
        let r = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.bytes) };
        debug_assert!(r.is_ok(), "munmap of shared words failed: {r:?}");
    }
}
