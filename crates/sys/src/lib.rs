//! Syscall wrappers for kintsugi: the only crate allowed to contain `unsafe`.
//!
//! Every kernel object the project touches gets one owning type here ([`pidfd::PidFd`],
//! [`shm::SharedAtomics`], …) so the rest of the workspace can say `#![forbid(unsafe_code)]`.
//! Each `unsafe` block carries a `// SAFETY:` comment arguing why its preconditions hold.
//!
//! Layout: one module per kernel object or syscall family. Modules are owned by the feature that
//! introduced them (see ARCHITECTURE.md); a module never depends on a higher crate.
//!
//! Conventions:
//! - Pids are [`Pid`], never bare integers.
//! - Errors are [`std::io::Error`] carrying errno: callers add the "what and how to fix" context.
//! - Nothing here allocates between `fork` and `exec`/`_exit` unless the function says so.

pub mod clock;
pub mod fault;
pub mod fs_ring;
pub mod guard_fd;
pub mod guard_map;
pub mod guard_sched;
pub mod guard_sig;
pub mod netlink;
pub mod ns;
pub mod pidfd;
pub mod process;
pub mod ptrace;
pub mod remote_mem;
pub mod seccomp;
pub mod shm;
pub mod signal;
pub mod spawn;
pub mod uffd;
pub mod wtrap;

pub use process::Pid;
