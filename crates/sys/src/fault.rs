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
