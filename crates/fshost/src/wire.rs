//! Requests and replies between host and module, and the one function that turns a request
//! into upcalls. Level 5 calls [`execute`] directly; level 4 encodes the [`Request`] into a ring
//! slot and the module process calls [`execute`] on its side.

use fsapi::{Attr, Ctx, DirEntry, Errno, Fh, Ino, Module, Pm, SetAttr, StatFs};
use serde::{Deserialize, Serialize};

/// One upcall with its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Mkfs,
    /// The module's whole-structure check; answered `Data` (problems, one per line).
    Fsck,
    Lookup {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Getattr {
        ino: Ino,
    },
    Setattr {
        ino: Ino,
        set: SetAttr,
    },
    Read {
        ino: Ino,
        fh: Fh,
        offset: u64,
        size: u32,
    },
    Write {
        ino: Ino,
        fh: Fh,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Create {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Mknod {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    Mkdir {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    },
    Unlink {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Rmdir {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Rename {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        newparent: Ino,
        #[serde(with = "serde_bytes")]
        newname: Vec<u8>,
        flags: u32,
    },
    Link {
        ino: Ino,
        newparent: Ino,
        #[serde(with = "serde_bytes")]
        newname: Vec<u8>,
    },
    Symlink {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    Readlink {
        ino: Ino,
    },
    Open {
        ino: Ino,
        flags: i32,
    },
    Release {
        ino: Ino,
        fh: Fh,
    },
    Readdir {
        ino: Ino,
        offset: u64,
        max: u32,
    },
    Statfs,
    Fsync {
        ino: Ino,
        fh: Fh,
        datasync: bool,
    },
    Flush {
        ino: Ino,
        fh: Fh,
    },
}

/// Operation classes a fault can be armed for (`kintsugi fsctl … --during write`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpClass {
    Any,
    Write,
    Rename,
    Readdir,
    Create,
    Unlink,
    Mkdir,
    Setattr,
    Read,
    Lookup,
}

impl OpClass {
    pub fn parse(s: &str) -> Option<OpClass> {
        Some(match s {
            "any" => OpClass::Any,
            "write" => OpClass::Write,
            "rename" => OpClass::Rename,
            "readdir" => OpClass::Readdir,
            "create" => OpClass::Create,
            "unlink" => OpClass::Unlink,
            "mkdir" => OpClass::Mkdir,
            "setattr" => OpClass::Setattr,
            "read" => OpClass::Read,
            "lookup" => OpClass::Lookup,
            _ => return None,
        })
    }
    pub fn matches(self, op: &Op) -> bool {
        match self {
            OpClass::Any => !matches!(op, Op::Mkfs | Op::Fsck),
            OpClass::Write => matches!(op, Op::Write { .. }),
            OpClass::Rename => matches!(op, Op::Rename { .. }),
            OpClass::Readdir => matches!(op, Op::Readdir { .. }),
            OpClass::Create => matches!(op, Op::Create { .. } | Op::Mknod { .. }),
            OpClass::Unlink => matches!(op, Op::Unlink { .. } | Op::Rmdir { .. }),
            OpClass::Mkdir => matches!(op, Op::Mkdir { .. }),
            OpClass::Setattr => matches!(op, Op::Setattr { .. }),
            OpClass::Read => matches!(op, Op::Read { .. }),
            OpClass::Lookup => matches!(op, Op::Lookup { .. }),
        }
    }
}

impl Op {
    /// Whether the op cannot change host data, so a failure in it never needs a rollback to be
    /// retried (every op is safe to retry after a rollback anyway; this is for reporting).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Op::Lookup { .. }
                | Op::Getattr { .. }
                | Op::Read { .. }
                | Op::Readlink { .. }
                | Op::Readdir { .. }
                | Op::Statfs
                | Op::Fsync { .. }
                | Op::Flush { .. }
                | Op::Fsck
        )
    }

    /// The node whose data the request is about (the directory for namespace ops), for the
    /// "repeated local errors on the same data" rule of containment.
    pub fn data_key(&self) -> Option<Ino> {
        match self {
            Op::Mkfs | Op::Fsck | Op::Statfs => None,
            Op::Lookup { parent, .. }
            | Op::Create { parent, .. }
            | Op::Mknod { parent, .. }
            | Op::Mkdir { parent, .. }
            | Op::Unlink { parent, .. }
            | Op::Rmdir { parent, .. }
            | Op::Rename { parent, .. }
            | Op::Symlink { parent, .. } => Some(*parent),
            Op::Getattr { ino }
            | Op::Setattr { ino, .. }
            | Op::Read { ino, .. }
            | Op::Write { ino, .. }
            | Op::Link { ino, .. }
            | Op::Readlink { ino }
            | Op::Open { ino, .. }
            | Op::Release { ino, .. }
            | Op::Readdir { ino, .. }
            | Op::Fsync { ino, .. }
            | Op::Flush { ino, .. } => Some(*ino),
        }
    }
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Mkfs => "mkfs",
            Op::Fsck => "fsck",
            Op::Lookup { .. } => "lookup",
            Op::Getattr { .. } => "getattr",
            Op::Setattr { .. } => "setattr",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Create { .. } => "create",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Symlink { .. } => "symlink",
            Op::Readlink { .. } => "readlink",
            Op::Open { .. } => "open",
            Op::Release { .. } => "release",
            Op::Readdir { .. } => "readdir",
            Op::Statfs => "statfs",
            Op::Fsync { .. } => "fsync",
            Op::Flush { .. } => "flush",
        }
    }
}

/// A request: who asks, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub ctx: Ctx,
    pub op: Op,
}

/// What a request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Attr(Attr),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Written(u32),
    Created(Attr, Fh),
    Opened(Fh),
    Entries(Vec<DirEntry>),
    StatFs(StatFs),
    Err(Errno),
}

/// Runs one request against the module. The module must be attached (or `op` is `Mkfs`).
pub fn execute(m: &mut dyn Module, pm: &mut dyn Pm, req: Request) -> Reply {
    let ctx = &req.ctx;
    let r = match req.op {
        Op::Mkfs => m.mkfs(pm).map(|()| Reply::Ok),
        Op::Fsck => m.fsck(pm).map(|p| Reply::Data(p.join("\n").into_bytes())),
        Op::Lookup { parent, name } => m.lookup(pm, ctx, parent, &name).map(Reply::Attr),
        Op::Getattr { ino } => m.getattr(pm, ino).map(Reply::Attr),
        Op::Setattr { ino, set } => m.setattr(pm, ctx, ino, &set).map(Reply::Attr),
        Op::Read {
            ino,
            fh,
            offset,
            size,
        } => m.read(pm, ino, fh, offset, size).map(Reply::Data),
        Op::Write {
            ino,
            fh,
            offset,
            data,
        } => m.write(pm, ino, fh, offset, &data).map(Reply::Written),
        Op::Create {
            parent,
            name,
            mode,
            umask,
            flags,
        } => m
            .create(pm, ctx, parent, &name, mode, umask, flags)
            .map(|(a, fh)| Reply::Created(a, fh)),
        Op::Mknod {
            parent,
            name,
            mode,
            umask,
            rdev,
        } => m
            .mknod(pm, ctx, parent, &name, mode, umask, rdev)
            .map(Reply::Attr),
        Op::Mkdir {
            parent,
            name,
            mode,
            umask,
        } => m
            .mkdir(pm, ctx, parent, &name, mode, umask)
            .map(Reply::Attr),
        Op::Unlink { parent, name } => m.unlink(pm, ctx, parent, &name).map(|()| Reply::Ok),
        Op::Rmdir { parent, name } => m.rmdir(pm, ctx, parent, &name).map(|()| Reply::Ok),
        Op::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
        } => m
            .rename(pm, ctx, parent, &name, newparent, &newname, flags)
            .map(|()| Reply::Ok),
        Op::Link {
            ino,
            newparent,
            newname,
        } => m.link(pm, ctx, ino, newparent, &newname).map(Reply::Attr),
        Op::Symlink {
            parent,
            name,
            target,
        } => m.symlink(pm, ctx, parent, &name, &target).map(Reply::Attr),
        Op::Readlink { ino } => m.readlink(pm, ino).map(Reply::Data),
        Op::Open { ino, flags } => m.open(pm, ctx, ino, flags).map(Reply::Opened),
        Op::Release { ino, fh } => m.release(pm, ino, fh).map(|()| Reply::Ok),
        Op::Readdir { ino, offset, max } => {
            m.readdir(pm, ino, offset, max as usize).map(Reply::Entries)
        }
        Op::Statfs => m.statfs(pm).map(Reply::StatFs),
        Op::Fsync { ino, fh, datasync } => m.fsync(pm, ino, fh, datasync).map(|()| Reply::Ok),
        Op::Flush { ino, fh } => m.flush(pm, ino, fh).map(|()| Reply::Ok),
    };
    r.unwrap_or_else(Reply::Err)
}
