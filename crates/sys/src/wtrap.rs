//! The global-write trap of process-local error containment (seed 000, issue 6).
//!
//! A file-system *context* (one module worker process serving one request at a time) runs with
//! the host's global data mapped read-only. Its first write to a global page faults; the
//! SIGSEGV handler here sets the context's **global-write flag** (a word in shared memory the
//! host reads after a failure), makes that one page writable and returns, so the write
//! re-executes and the request goes on. At the end of the request [`reprotect`] puts every
//! opened page back to read-only. A write into another context's *local* data (its request
//! buffer or undo log) is illegal: the handler marks this context as the culprit and lets the
//! write fault again with the default action, which kills it. Any other fault is not ours and
//! ends the process as it would have without the trap.
//!
//! Why a signal handler and per-process `mprotect` rather than userfaultfd write-protection:
//! the decision must be made synchronously in the faulting context (xv6's page-fault handler),
//! and a uffd needs a second thread to resolve faults; per-process page protection on a shared
//! mapping is exactly xv6's per-process page table (see ARCHITECTURE.md, "containment").
//!
//! Everything the handler touches is a static atomic, and it calls only `mprotect` and
//! `sigaction` (both async-signal-safe), so it is safe to run at any instruction.

use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

const MAX_RANGES: usize = 8;
/// Pages a single request may open before [`reprotect`] falls back to re-protecting whole
/// ranges (a request that writes more than 16 MiB of distinct global pages).
const MAX_OPEN: usize = 4096;
const PAGE: usize = 4096;
/// A first write opens this much around the faulting page (aligned, clipped to its range):
/// sequential writes (file data in consecutive blocks) then fault once per 64 KiB, not per page.
const WINDOW: usize = 16 * PAGE;

static GLOBAL_START: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
static GLOBAL_END: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
static FOREIGN_START: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
static FOREIGN_END: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
static FLAG: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());
static ILLEGAL: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());
static OPENED: [AtomicUsize; MAX_OPEN] = [const { AtomicUsize::new(0) }; MAX_OPEN];
static N_OPENED: AtomicUsize = AtomicUsize::new(0);
static FAULT_ADDR: AtomicUsize = AtomicUsize::new(0);
/// Level 1/2 shared-memory protection: the block store outside protection-manager code.
static SHARED_START: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
static SHARED_END: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
/// Where the address of a fault that ends the process is published for the host.
static REPORT: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());

/// Values of the `illegal` word: why the handler let the process die.
pub const ILLEGAL_FOREIGN_WRITE: u32 = 1;
/// An access to shared memory outside protection-manager code (levels 1 and 2).
pub const ILLEGAL_SHARED_ACCESS: u32 = 2;

/// A range of this process's address space: `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: usize,
    pub len: usize,
}

fn in_ranges(starts: &[AtomicUsize], ends: &[AtomicUsize], addr: usize) -> bool {
    starts.iter().zip(ends).any(|(s, e)| {
        let s = s.load(Ordering::Relaxed);
        let e = e.load(Ordering::Relaxed);
        s != 0 && addr >= s && addr < e
    })
}

/// The registered range containing `addr`, as `(start, end)`.
fn range_of(starts: &[AtomicUsize], ends: &[AtomicUsize], addr: usize) -> Option<(usize, usize)> {
    starts.iter().zip(ends).find_map(|(s, e)| {
        let s = s.load(Ordering::Relaxed);
        let e = e.load(Ordering::Relaxed);
        (s != 0 && addr >= s && addr < e).then_some((s, e))
    })
}

fn set_default(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument; sigaction is
    // async-signal-safe. Restoring the default lets the re-executed access end the process.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; si_addr is defined
    // for SIGSEGV and SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    FAULT_ADDR.store(addr, Ordering::Relaxed);
    if sig == libc::SIGSEGV
        && let Some((lo, hi)) = range_of(&GLOBAL_START, &GLOBAL_END, addr)
    {
        let page = (addr & !(WINDOW - 1)).max(lo);
        let end = (page + WINDOW).min(hi);
        // SAFETY: `[page, end)` lies inside a range registered by `install`, which is a live
        // shared mapping of this process; making it writable changes no Rust-visible object,
        // only the permission the MMU enforces.
        let ok = unsafe {
            libc::mprotect(
                page as *mut libc::c_void,
                end - page,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } == 0;
        if ok {
            let flag = FLAG.load(Ordering::Relaxed);
            if !flag.is_null() {
                // SAFETY: FLAG points into a shared mapping registered by `install` that stays
                // mapped for the life of the process (the caller promises it).
                unsafe { (*flag).store(1, Ordering::SeqCst) };
            }
            let mut p = page;
            while p < end {
                let n = N_OPENED.fetch_add(1, Ordering::Relaxed);
                if n < MAX_OPEN {
                    OPENED[n].store(p, Ordering::Relaxed);
                }
                p += PAGE;
            }
            return;
        }
    } else if in_ranges(&SHARED_START, &SHARED_END, addr) {
        mark_illegal(ILLEGAL_SHARED_ACCESS);
    } else if in_ranges(&FOREIGN_START, &FOREIGN_END, addr) {
        mark_illegal(ILLEGAL_FOREIGN_WRITE);
    }
    let report = REPORT.load(Ordering::Relaxed);
    if !report.is_null() {
        // SAFETY: REPORT points into a shared mapping registered by `report_faults` that stays
        // mapped for the life of the process (the caller promises it).
        unsafe { (*report).store(addr as u64, Ordering::SeqCst) };
    }
    // Not a first write to global data: the default action ends the process when the faulting
    // instruction re-executes.
    set_default(sig);
}

fn mark_illegal(why: u32) {
    let illegal = ILLEGAL.load(Ordering::Relaxed);
    if !illegal.is_null() {
        // SAFETY: ILLEGAL points into a shared mapping registered by `install` or
        // `protect_shared` that stays mapped for the life of the process.
        unsafe { (*illegal).store(why, Ordering::SeqCst) };
    }
}

fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with our extern "C" handler, SA_SIGINFO and an empty mask is
    // valid. The handler only touches atomics and calls async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut()) != 0
            || libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Publishes the address of any SIGSEGV/SIGBUS that ends this process in `*report` (the host
/// names it in the module's error report). `report` must stay mapped for the process's life.
pub fn report_faults(report: &'static AtomicU64) -> io::Result<()> {
    REPORT.store(std::ptr::from_ref(report).cast_mut(), Ordering::SeqCst);
    install_handler()
}

/// Levels 1 and 2: the caller has made `shared` unmapped-equivalent (`PROT_NONE`) or
/// read-only for this process outside protection-manager code; a fault inside it is the
/// module's illegal access: `*illegal` gets [`ILLEGAL_SHARED_ACCESS`], the address goes to the
/// report word (see [`report_faults`]) and the process dies of the signal.
pub fn protect_shared(shared: &[Range], illegal: &'static AtomicU32) -> io::Result<()> {
    if shared.len() > MAX_RANGES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many protected ranges",
        ));
    }
    ILLEGAL.store(std::ptr::from_ref(illegal).cast_mut(), Ordering::SeqCst);
    for (i, r) in shared.iter().enumerate() {
        SHARED_START[i].store(r.start, Ordering::SeqCst);
        SHARED_END[i].store(r.start + r.len, Ordering::SeqCst);
    }
    install_handler()
}

/// Write-protects `globals` (read-only; first writes set `*flag` and open the page) and
/// `foreign` (read-only; a write sets `*illegal` and kills the process) and installs the
/// handler. Call once per context process, before it serves requests.
///
/// `flag` and `illegal` must point into memory that stays mapped for the life of the process
/// (the shared request ring); the ranges must be page-aligned parts of live shared mappings.
pub fn install(
    globals: &[Range],
    foreign: &[Range],
    flag: &'static AtomicU32,
    illegal: &'static AtomicU32,
) -> io::Result<()> {
    if globals.len() > MAX_RANGES || foreign.len() > MAX_RANGES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many protected ranges",
        ));
    }
    for r in globals.iter().chain(foreign) {
        if r.start % PAGE != 0 || r.len % PAGE != 0 || r.start == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "protected ranges must be non-null and page-aligned",
            ));
        }
    }
    FLAG.store(std::ptr::from_ref(flag).cast_mut(), Ordering::SeqCst);
    ILLEGAL.store(std::ptr::from_ref(illegal).cast_mut(), Ordering::SeqCst);
    for (i, r) in globals.iter().enumerate() {
        GLOBAL_START[i].store(r.start, Ordering::SeqCst);
        GLOBAL_END[i].store(r.start + r.len, Ordering::SeqCst);
    }
    for (i, r) in foreign.iter().enumerate() {
        FOREIGN_START[i].store(r.start, Ordering::SeqCst);
        FOREIGN_END[i].store(r.start + r.len, Ordering::SeqCst);
    }
    install_handler()?;
    for r in globals.iter().chain(foreign) {
        protect(r.start, r.len)?;
    }
    Ok(())
}

fn protect(start: usize, len: usize) -> io::Result<()> {
    // SAFETY: callers pass page-aligned ranges of live shared mappings registered by
    // `install`; dropping write permission invalidates no Rust reference (the region is only
    // accessed through copies and atomics, and a write re-enters through the handler).
    if unsafe { libc::mprotect(start as *mut libc::c_void, len, libc::PROT_READ) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// End of a request: every global page opened since the last call is read-only again.
/// Contiguous pages go back in one `mprotect`. Returns how many pages were opened.
pub fn reprotect() -> io::Result<usize> {
    let n = N_OPENED.swap(0, Ordering::SeqCst);
    if n == 0 {
        return Ok(0);
    }
    if n > MAX_OPEN {
        for i in 0..MAX_RANGES {
            let s = GLOBAL_START[i].load(Ordering::Relaxed);
            if s != 0 {
                protect(s, GLOBAL_END[i].load(Ordering::Relaxed) - s)?;
            }
        }
        return Ok(n);
    }
    let mut pages: Vec<usize> = OPENED[..n]
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let mut i = 0;
    while i < pages.len() {
        let start = pages[i];
        let mut end = start + PAGE;
        while i + 1 < pages.len() && pages[i + 1] == end {
            i += 1;
            end += PAGE;
        }
        protect(start, end - start)?;
        i += 1;
    }
    Ok(n)
}

/// The address of the last fault the handler saw (for the module's error report).
pub fn last_fault_addr() -> usize {
    FAULT_ADDR.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs_ring::SharedRegion;

    // One process, one install: the handler is process-wide, so everything runs in a forked
    // child and the parent checks its exit status.
    #[test]
    fn first_global_write_sets_the_flag_and_continues_foreign_write_kills() {
        let region = Box::leak(Box::new(
            SharedRegion::create("wtrap-test", 4 * PAGE).unwrap(),
        ));
        let child = crate::process::fork().unwrap();
        if child == crate::process::Fork::Child {
            let _ = crate::process::disable_core_dumps();
            let base = region.addr();
            let flag = region.atomic_u32(0);
            let illegal = region.atomic_u32(4);
            let r = install(
                &[Range {
                    start: base + PAGE,
                    len: 2 * PAGE,
                }],
                &[Range {
                    start: base + 3 * PAGE,
                    len: PAGE,
                }],
                flag,
                illegal,
            );
            if r.is_err() {
                crate::process::exit_now(10);
            }
            // A read of a protected page is fine and sets nothing.
            let mut b = [0u8; 1];
            region.read(PAGE, &mut b);
            if flag.load(Ordering::SeqCst) != 0 {
                crate::process::exit_now(11);
            }
            region.write(PAGE + 8, b"hello");
            if flag.load(Ordering::SeqCst) != 1 || reprotect().ok() != Some(2) {
                crate::process::exit_now(12);
            }
            flag.store(0, Ordering::SeqCst);
            // Protected again: the next write faults and sets the flag again.
            region.write(PAGE + 16, b"again");
            if flag.load(Ordering::SeqCst) != 1 {
                crate::process::exit_now(13);
            }
            // Illegal: dies of SIGSEGV with the culprit mark set.
            region.write(3 * PAGE, b"x");
            crate::process::exit_now(14);
        }
        let crate::process::Fork::Parent(pid) = child else {
            unreachable!()
        };
        let st = crate::process::wait_pid(pid).unwrap();
        assert!(
            matches!(
                st,
                crate::process::ExitStatus::Signaled {
                    signal: libc::SIGSEGV,
                    ..
                }
            ),
            "child status {st:?}"
        );
        assert_eq!(region.atomic_u32(4).load(Ordering::SeqCst), 1);
        let mut b = [0u8; 5];
        region.read(PAGE + 8, &mut b);
        assert_eq!(&b, b"hello");
    }
}
