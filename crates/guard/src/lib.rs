//! The guard (seeds 002 ShadowBuddy and 003 Orthros): run an unmodified program under a
//! seccomp filter that traps only its state-changing syscalls, keep a model of the kernel
//! state it holds ([`model::ProcState`], fed by the trapped calls and committed against
//! /proc at each checkpoint), take incremental checkpoints every epoch (uffd write-protect
//! async + PAGEMAP_SCAN, no soft-dirty needed) into a checksummed, kernel-independent image
//! ([`image`]), and rebuild the program after a crash by replaying syscalls into a fresh
//! process ([`restore`]).
//!
//! Entry points: [`guard::Guard::launch`] (`kintsugi guard -- CMD`),
//! [`guard::Guard::from_images`] (`kintsugi restore DIR`), [`guard::read_status`]
//! (`kintsugi guard --status`). See docs/guard.md for what is and is not restorable.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod guard;
pub mod image;
pub mod log;
pub mod model;
pub mod procfs;
pub mod restore;

use std::io;

/// Everything that can go wrong while guarding or restoring. Messages name the object and,
/// where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Sys { what: String, source: io::Error },
    #[error(transparent)]
    ImageFormat(#[from] image::ImageError),
    #[error("image content: {0}")]
    Image(String),
    #[error("restore failed: {0}")]
    Restore(String),
    #[error("the image is not restorable: {0} (see `kintsugi guard --status`)")]
    NotRestorable(String),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub(crate) fn sys(what: impl Into<String>, source: io::Error) -> Error {
        Error::Sys {
            what: what.into(),
            source,
        }
    }
    /// Whether the error means the program died under us (during a checkpoint).
    pub fn program_gone(&self) -> bool {
        matches!(self, Error::Sys { source, .. }
            if source.raw_os_error() == Some(libc::ESRCH) || sys::ptrace::ended(source).is_some())
    }
    /// How the program ended, when the error carries its wait status.
    pub fn ended_status(&self) -> Option<sys::process::ExitStatus> {
        match self {
            Error::Sys { source, .. } => sys::ptrace::ended(source),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
