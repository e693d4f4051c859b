//! Real faults on demand, for fault matrices, demos and fault-injection campaigns. Each one is
//! what the hardware or kernel would do to a buggy program, not a signal sent by hand.

/// Writes to address 0: a real page fault that the kernel turns into SIGSEGV.
pub fn segv() -> ! {
    // SAFETY: not safe by design: this deliberately writes through a null pointer to make the
    // MMU fault. The write is volatile so it cannot be optimised away, and nothing after it runs:
    // the default SIGSEGV action ends the process. If a handler returns, we abort below.
    unsafe { std::ptr::write_volatile(std::ptr::null_mut::<u64>(), 0xdead) };
    std::process::abort()
}

/// Reads a mapped page that lies beyond the end of its (empty) file: the kernel raises a real
/// SIGBUS, as for a file truncated under a mapping.
pub fn bus() -> ! {
    let fd = rustix::fs::memfd_create("kintsugi-sigbus", rustix::fs::MemfdFlags::CLOEXEC)
        .unwrap_or_else(|_| std::process::abort());
    // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen address aliases
    // nothing; the file has size 0, so the page is past EOF by construction.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            4096,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::SHARED,
            &fd,
            0,
        )
    }
    .unwrap_or_else(|_| std::process::abort());
    // SAFETY: p is a valid, aligned, mapped address; the access is meant to fault (SIGBUS) and
    // std's SIGBUS handler (stack-overflow guard) restores the default action and returns, so
    // the faulting read re-executes and ends the process.
    unsafe { std::ptr::read_volatile(p.cast::<u8>()) };
    std::process::abort()
}

/// Executes an illegal instruction (`ud2`): SIGILL from the CPU.
pub fn ill() -> ! {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: ud2 is defined to raise #UD; the kernel delivers SIGILL and the default action
    // ends the process. No memory is touched.
    unsafe {
        std::arch::asm!("ud2", options(noreturn))
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = crate::process::raise(libc::SIGILL);
        std::process::abort()
    }
}

/// Integer division by zero in machine code: SIGFPE from the CPU (x86-64).
pub fn fpe() -> ! {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `div` by a zero register raises #DE, delivered as SIGFPE; the default action
    // ends the process. Only registers are involved.
    unsafe {
        std::arch::asm!(
            "xor ecx, ecx",
            "mov eax, 1",
            "xor edx, edx",
            "div ecx",
            options(noreturn)
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = crate::process::raise(libc::SIGFPE);
        std::process::abort()
    }
}

/// This process's `[heap]` mapping (the brk heap glibc's malloc serves small allocations from),
/// as `(start, end)`.
fn heap_range() -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[heap]"))?;
    let (range, _) = line.split_once(' ')?;
    let (a, b) = range.split_once('-')?;
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
    ))
}

/// A raw memory fault: flips one bit of this process's heap, chosen by `seed`. Whatever lives
/// there (a buffer, a length, an allocator header) is now wrong, as after a hardware bit flip
/// or a stray write. Returns the address, or `None` if the process has no brk heap.
pub fn flip_heap_bit(seed: u64) -> Option<usize> {
    let (start, end) = heap_range()?;
    let addr = start + (seed as usize % (end - start));
    let bit = (seed >> 32) as u8 % 8;
    // SAFETY: not sound by design — this deliberately corrupts live memory of this process to
    // emulate a fault; it is only ever called inside a disposable module context whose host
    // contains the consequences. The access itself is valid: `addr` lies inside the readable,
    // writable `[heap]` mapping read from /proc/self/maps just above, and a byte needs no
    // alignment. Volatile, so the compiler cannot drop or reorder it.
    unsafe {
        let p = addr as *mut u8;
        std::ptr::write_volatile(p, std::ptr::read_volatile(p) ^ (1 << bit));
    }
    Some(addr)
}

/// A raw memory fault: finds a word in this process's heap that holds a pointer into the heap
/// (the `seed`-th such word, wrapping) and corrupts it (flips bit 44, making it point far outside
/// any mapping), as a wild write would. The next use of that pointer faults or reads garbage.
/// Returns the address of the corrupted word, or `None` if no heap pointer was found.
pub fn corrupt_heap_pointer(seed: u64) -> Option<usize> {
    let (start, end) = heap_range()?;
    let words = (end - start) / 8;
    let first = seed as usize % words.max(1);
    for k in 0..words {
        let at = start + ((first + k) % words) * 8;
        // SAFETY: `at` is an 8-aligned address inside the readable `[heap]` mapping.
        let v = unsafe { std::ptr::read_volatile(at as *const usize) };
        if v >= start && v < end && v % 8 == 0 {
            // SAFETY: as in `flip_heap_bit`: deliberate corruption inside a disposable module
            // context; the write is to a valid, aligned, writable heap word.
            unsafe { std::ptr::write_volatile(at as *mut usize, v ^ (1 << 44)) };
            return Some(at);
        }
    }
    None
}

/// A stray read of one byte at `addr`, as a wild pointer in module code would do (issue 5's
/// detection matrix). Where `addr` is unmapped or protected for this process the MMU faults
/// (SIGSEGV), which is what the matrix checks for; where it is readable, the byte is returned.
///
/// The caller passes an address inside a mapping it knows of (the block store, the host's
/// private page): the probe's point is the *permission*, not a random address.
pub fn stray_read(addr: usize) -> u8 {
    // SAFETY: not safe by design, like `segv`: a deliberate access through a raw address that
    // may fault. It is volatile so it happens exactly once; when the page is readable, reading
    // a u8 from a live mapping of plain bytes observes no Rust object's invariants.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// A stray write at `addr` that stores the byte already there: the MMU checks the permission
/// (a protected page faults before anything changes), and where the write is allowed it
/// leaves no damage behind, so a matrix cell where the error is *not* detected needs no repair.
pub fn stray_write_same(addr: usize) {
    // SAFETY: as for `stray_read`; writing back the value just read changes no byte. A
    // concurrent writer of the same byte could be overwritten with its old value: callers aim
    // at bytes no one else writes during the probe (the store's superblock, the host page).
    unsafe {
        let p = addr as *mut u8;
        let v = std::ptr::read_volatile(p);
        std::ptr::write_volatile(p, v);
    }
}

/// A page of process-private memory (anonymous, `MAP_PRIVATE`) at a fixed address for the
/// life of the value: the file-system host keeps its own ("kernel") data there, and module
/// processes forked from the host unmap it ([`PrivatePage::unmap_in_child`]), so a module that
/// reaches for it faults as a user process reaching for kernel memory does.
#[derive(Debug)]
pub struct PrivatePage {
    addr: std::ptr::NonNull<u8>,
}

// SAFETY: the page is plain bytes accessed only through volatile copies by address; moving the
// owner between threads moves no thread-bound state.
unsafe impl Send for PrivatePage {}
// SAFETY: as above; no method hands out a reference into the page.
unsafe impl Sync for PrivatePage {}

impl PrivatePage {
    pub const LEN: usize = 4096;

    /// Maps a fresh zeroed page and writes `content` (at most a page) at its start.
    pub fn new(content: &[u8]) -> std::io::Result<PrivatePage> {
        // SAFETY: an anonymous private mapping with a null hint aliases nothing; checked below.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                Self::LEN,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )?
        };
        let addr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        let n = content.len().min(Self::LEN);
        // SAFETY: the page is ours, writable and LEN bytes long; content is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(content.as_ptr(), addr.as_ptr(), n) };
        Ok(PrivatePage { addr })
    }

    /// The page's address in this process.
    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// Copies the page's first `buf.len()` bytes out.
    pub fn read(&self, buf: &mut [u8]) {
        let n = buf.len().min(Self::LEN);
        // SAFETY: the page is mapped for the life of self; buf is distinct.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.as_ptr(), buf.as_mut_ptr(), n) };
    }

    /// In a process forked from the owner: removes the page from this address space, so any
    /// access to it faults. The owner's own page (another process) is untouched. The value
    /// must not be used in this process afterwards except for `addr` (its Drop then unmaps
    /// nothing: munmap of an unmapped range is harmless).
    pub fn unmap_in_child(&self) -> std::io::Result<()> {
        // SAFETY: the range is exactly our page; after this no access through it is made by
        // this crate in this process (the documented contract), so no reference dangles.
        unsafe { rustix::mm::munmap(self.addr.as_ptr().cast(), Self::LEN)? };
        Ok(())
    }
}

impl Drop for PrivatePage {
    fn drop(&mut self) {
        // SAFETY: our own page; nothing refers into it after drop.
        let _ = unsafe { rustix::mm::munmap(self.addr.as_ptr().cast(), Self::LEN) };
    }
}
