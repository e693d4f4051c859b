//! The kintsugi file-system host: file-system modules behind FUSE, at a protection level chosen
//! at mount time, surviving module crashes.
//!
//! - [`store`]: the host-owned block store (the module's "disk" and all other host data).
//! - [`pm`]: the protection manager a module calls ([`fsapi::Pm`]) and the undo log.
//! - [`wire`]: requests/replies and the dispatcher into a [`fsapi::Module`].
//! - [`ring`]: the shared-memory ring to a level-4 module process.
//! - [`backend`]: level 5 (direct calls) and level 4 (separate process, undo log, rfork
//!   supervision, per-request deadline, rollback + retry).
//! - [`fuse`]: the `fuser` front end, inode and open-file tables, the control xattrs.
//! - [`gate`]: at levels 1–4, as many FUSE threads reading as CPUs, more when a request is slow.
//! - [`mount`]: `kintsugi mount`/`umount`/`fsctl` logic (daemonizing, clear errors).
//! - [`plain`]: the minimal plain-`fuser` RAM file system used as the benchmark baseline.
//! - [`bench`]: `kintsugi bench fs`.
//!
//! See docs/fs.md for the design, the crash semantics and measured numbers.
#![forbid(unsafe_code)]

pub mod backend;
pub mod bench;
pub mod check;
pub mod deadlock;
pub mod fuse;
pub mod fuse_conv;
pub mod gate;
pub mod l5;
pub mod mount;
pub mod plain;
pub mod pm;
pub mod ring;
pub mod store;
pub mod wire;

pub use backend::{ContextOpts, Level, OnCrash, OnLocalError, Recovery};
pub use mount::{ModuleFactory, MountOpts};

/// What can go wrong mounting or controlling a file system.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("mountpoint {0} does not exist: create it first (mkdir -p {0})")]
    NoMountpoint(String),
    #[error("mountpoint {0} is not a directory: mount on an (empty) directory")]
    NotADirectory(String),
    #[error(
        "mountpoint {0} is busy: something is already mounted there (kintsugi umount {0} first)"
    )]
    Busy(String),
    #[error(
        "/dev/fuse is missing: load the fuse module (modprobe fuse) or give the container --device /dev/fuse"
    )]
    NoDevFuse,
    #[error("unknown module {0:?}: available modules are {1}")]
    UnknownModule(String, String),
    /// The module factory's own message (unknown module, bad `-o` option).
    #[error("{0}")]
    Module(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot create the shared-memory request ring")]
    Ring(#[source] std::io::Error),
    #[error("cannot start the module process under rfork")]
    Supervisor(#[source] rfork::Error),
    #[error("the module process did not start: {0}")]
    ModuleStart(String),
    #[error("the module could not format its store: {0}")]
    Mkfs(fsapi::Errno),
    #[error("mounting FUSE at {0} failed")]
    Mount(String, #[source] std::io::Error),
    #[error(
        "{0} is not a kintsugi mount (no {1} attribute): check the path with `mount | grep kintsugi`"
    )]
    NotOurs(String, &'static str),
    #[error("{0} is not mounted")]
    NotMounted(String),
    #[error("{0} is busy: a process still uses it (close its files, cd out), then retry")]
    UmountBusy(String),
    #[error("{what} failed on {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the mount daemon failed to start: {0}")]
    Daemon(String),
    #[error("fault injection refused by {0}: {1}")]
    Refused(String, String),
}
