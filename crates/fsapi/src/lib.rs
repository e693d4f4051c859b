//! What a kintsugi file-system module sees.
//!
//! A module (e.g. `smfs`) implements [`Module`]: the upcalls the host makes for each FUSE
//! request (lookup, getattr, read, write, rename, …). Everything the module keeps across
//! requests lives in **host data**, reached only through the protection-manager API [`Pm`]:
//! blocks of the host-owned block store (the paper's Bread/Bwrite/GetNextBlk), node
//! references (Vref/Vrele) and locks (lock/unlock, reported to the host). The module holds no
//! other state that matters, so the host can roll back a failed request (undo log) and restart
//! the module without losing acknowledged data.
//!
//! One module source serves every protection level: the host picks the [`Pm`] implementation
//! (direct calls at level 5, an undo-logging manager in a separate process at level 4, and the
//! checked and memory-protected ones of levels 1–3, which also check every write-back against
//! the module's [`Layout`]s). Nothing here is `cfg`-switched per level.
#![forbid(unsafe_code)]

pub mod mem;

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node number as the kernel sees it (FUSE nodeid). [`Ino::ROOT`] is the mount's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ino(pub u64);

impl Ino {
    pub const ROOT: Ino = Ino(1);
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ino {}", self.0)
    }
}

/// A block number in the host's block store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockNo(pub u64);

/// A module's own handle for an open file (the host keeps its own table and maps to this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Fh(pub u64);

/// A lock the module names; the host keeps the lock table (who holds what, who waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockId(pub u64);

/// An errno value returned to the kernel (positive, e.g. [`Errno::ENOENT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EMLINK: Errno = Errno(libc::EMLINK);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EUCLEAN: Errno = Errno(libc::EUCLEAN);
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

/// What every upcall returns.
pub type FsResult<T> = Result<T, Errno>;

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// The file kinds a module can store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

impl FileKind {
    /// The kind encoded in the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }
    /// The `S_IFMT` bits for this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::BlockDev => libc::S_IFBLK,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }
}

/// A node's attributes, as returned to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    /// Changes whenever a node number is reused, so the kernel never confuses two nodes.
    pub generation: u64,
    pub size: u64,
    /// 512-byte blocks actually allocated (sparse files have fewer).
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub kind: FileKind,
    /// Permission bits (07777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

/// A timestamp update in `setattr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    Now,
    At(Timespec),
}

/// The fields `setattr` changes (None: leave as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timespec>,
}

/// Who is asking (the client process behind a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// One directory entry returned by `readdir`. `offset` is the cookie of the *next* entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub ino: Ino,
    pub offset: u64,
    pub kind: FileKind,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
}

/// File-system statistics for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// `rename(2)` flags the module may honour.
pub const RENAME_NOREPLACE: u32 = 1;
/// `RENAME_EXCHANGE`.
pub const RENAME_EXCHANGE: u32 = 2;

/// The protection-manager API: the module's only path to host ("kernel") data.
///
/// Every method that changes host data may be undo-logged by the host, so a request that
/// fails half-way leaves no trace. Errors are errnos the module should pass up unchanged.
pub trait Pm {
    /// Bytes per block of the store.
    fn block_size(&self) -> usize;
    /// Blocks in the store.
    fn nblocks(&self) -> u64;
    /// Blocks not allocated.
    fn free_blocks(&self) -> u64;
    /// Bread: copies `buf.len()` bytes at `off` inside block `b` into `buf`.
    fn bread(&mut self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()>;
    /// Bwrite: copies `data` into block `b` at `off`.
    fn bwrite(&mut self, b: BlockNo, off: usize, data: &[u8]) -> FsResult<()>;
    /// GetNextBlk: allocates a zero-filled block (the lowest free one).
    fn get_next_blk(&mut self) -> FsResult<BlockNo>;
    /// Returns block `b` to the store.
    fn free_blk(&mut self, b: BlockNo) -> FsResult<()>;
    /// Vref: takes a reference on node `ino` (e.g. for an open file).
    fn vref(&mut self, ino: Ino) -> FsResult<()>;
    /// Vrele: drops one; returns the references left.
    fn vrele(&mut self, ino: Ino) -> FsResult<u32>;
    /// References held on `ino`.
    fn refs(&self, ino: Ino) -> u32;
    /// Takes lock `l`, waiting if another request holds it (the wait is reported to the host).
    fn lock(&mut self, l: LockId) -> FsResult<()>;
    /// Releases lock `l`.
    fn unlock(&mut self, l: LockId) -> FsResult<()>;
    /// The current time, for timestamps.
    fn now(&self) -> Timespec;
    /// Fault injection (issue 6): is fault site `id` (one of [`Module::sites`]) armed for this
    /// request? The host counts an activation each time it answers `true`. For a raw memory
    /// site ([`SiteKind::is_memory`]) the host corrupts the module's memory itself and answers
    /// `false`, so the module goes on with corrupted memory as a real bit flip would leave it.
    /// The default (unit tests, level 5 without a campaign) never fires.
    fn site(&mut self, _id: u32) -> bool {
        false
    }
    /// The request is about to change global state the host's store does not hold (a remote
    /// server's files, for a network file system). From here on a failure of the request is
    /// not process-local: containment escalates it (roll back, restart, retry — the module's
    /// own protocol must make the retry safe, e.g. SNFS's xids). Default: nothing to record.
    fn mark_global(&mut self) {}
    /// GetNextBlk for a block that will hold `ty` records (see [`Layout`]). At levels 1–3 the
    /// protection manager checks every write-back to a typed block against the module's layout
    /// for that type; the default (levels 4–5, unit tests) is a plain [`Pm::get_next_blk`].
    fn get_next_blk_typed(&mut self, ty: BlockType) -> FsResult<BlockNo> {
        let _ = ty;
        self.get_next_blk()
    }
}

/// What a block of host data holds, declared by the module when it allocates the block
/// ([`Pm::get_next_blk_typed`]). [`BlockType::DATA`] (file contents) is never checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockType(pub u8);

impl BlockType {
    /// File contents: opaque to the protection manager.
    pub const DATA: BlockType = BlockType(0);
}

/// One rule the protection manager enforces on a record of host data before writing it back
/// (duplication + semantic checks, levels 1–3). Integers are little-endian, unsigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The integer of `width` bytes at `off` lies in `min..=max` (sizes, counts, offsets).
    Range {
        field: &'static str,
        off: usize,
        width: usize,
        min: u64,
        max: u64,
    },
    /// `integer & mask` is one of `values` (kinds, magics, versions).
    OneOf {
        field: &'static str,
        off: usize,
        width: usize,
        mask: u64,
        values: Vec<u64>,
    },
    /// `n` consecutive u64 block numbers at `off`: each is 0 (none) or an allocated block of
    /// one of `types` inside the store, never the record's own block, no two the same, and
    /// following them through blocks that themselves hold block references never leads back
    /// to this block (no pointer loops).
    BlockRefs {
        field: &'static str,
        off: usize,
        n: usize,
        types: Vec<BlockType>,
    },
    /// A reference to another record (a directory entry's node number): the integer at `off`
    /// is 0 or names a record that is in use. Record `k` (numbered from 1) is the
    /// `(k - 1) % per_block`-th `record`-byte record of block `first_block + (k - 1) /
    /// per_block`; in use means its `live` integer is non-zero.
    RecordRef {
        field: &'static str,
        off: usize,
        width: usize,
        first_block: u64,
        per_block: u64,
        record: usize,
        live: (usize, usize),
    },
    /// A name: its length (`len_width` bytes at `len_off`) is 1..=`max`, and that many bytes
    /// at `name_off` contain neither NUL nor `/`.
    Name {
        field: &'static str,
        len_off: usize,
        len_width: usize,
        name_off: usize,
        max: usize,
    },
}

/// One request's change to host data, as the protection manager holds it when the request
/// ends and before the change becomes permanent ([`Module::check_commit`]): the
/// store as the request found it and as it would leave it, and what the request allocated,
/// freed, wrote and locked. Everything here is the host's record, not the module's word.
pub trait CommitView {
    fn block_size(&self) -> usize;
    fn nblocks(&self) -> u64;
    /// Bytes of block `b` before the request (a block it allocated reads as zeros).
    fn before(&self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()>;
    /// Bytes of block `b` as the request leaves it.
    fn after(&self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()>;
    /// Blocks whose bytes the request wrote, ascending (allocated ones included).
    fn written(&self) -> Vec<BlockNo>;
    /// Blocks the request allocated and still holds, ascending.
    fn allocated(&self) -> Vec<BlockNo>;
    /// Blocks allocated before the request that it freed, ascending.
    fn freed(&self) -> Vec<BlockNo>;
    /// Every lock the request took.
    fn locks(&self) -> Vec<LockId>;
    /// The open references to `ino` as the request leaves them ([`Pm::refs`]).
    fn refs(&self, ino: Ino) -> u32;
}

/// How the records in blocks of one [`BlockType`] look to the protection manager: the
/// knowledge of host data structures the paper's protection manager has of vnodes and bufs.
/// A module hands its layouts over once per generation ([`Module::layouts`], after `attach`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub ty: BlockType,
    /// For messages ("inode", "directory entry", …).
    pub name: &'static str,
    /// Bytes per record: a block is an array of `block_size / record` records.
    pub record: usize,
    /// `(off, width)` of the integer that says the record is in use; a record where it is 0
    /// is free and not checked. `None`: every record is checked.
    pub live: Option<(usize, usize)>,
    pub checks: Vec<Check>,
}

/// The kinds of software fault a site emulates: the G-SWIFT operators (Durães and Madeira's
/// field study of the most common real bugs), plus raw memory faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SiteKind {
    /// MFC: a function call is left out.
    MissingCall,
    /// MVIV: a variable is used without its initialization.
    MissingInit,
    /// MVAV: an assignment is left out.
    MissingAssign,
    /// MIFS: an `if` construct (and its body) is left out.
    MissingIf,
    /// MLAC/MLOC: one clause of an AND/OR condition is left out.
    MissingClause,
    /// WVAV: a wrong value is assigned.
    WrongValue,
    /// WAEP: wrong arithmetic in a call parameter.
    WrongArith,
    /// WPFV: the wrong variable is passed as a parameter.
    WrongVar,
    /// WLEC: a branch condition is wrong (inverted or off by one).
    WrongBranch,
    /// A bit flip somewhere in the module process's heap (done by the host with `sys`).
    BitFlip,
    /// A heap pointer in the module process corrupted (done by the host with `sys`).
    PointerCorruption,
    /// Issue 5's detection matrix, row 1: the module reads host memory shared with it (the
    /// block store) outside protection-manager code, as a stray pointer would.
    StrayRead,
    /// Row 2: the module writes shared host memory outside protection-manager code.
    StrayWrite,
    /// Row 3: a semantically invalid update of host data (a record breaking its layout's
    /// rules) written through the protection manager. The module's faulty variant does it.
    BadUpdate,
    /// Row 4: the module touches host ("kernel") data that is never shared with it.
    HostAccess,
}

impl SiteKind {
    /// Every campaign kind (issue 6), in report order; the matrix rows are [`SiteKind::MATRIX`].
    pub const ALL: [SiteKind; 11] = [
        SiteKind::MissingCall,
        SiteKind::MissingInit,
        SiteKind::MissingAssign,
        SiteKind::MissingIf,
        SiteKind::MissingClause,
        SiteKind::WrongValue,
        SiteKind::WrongArith,
        SiteKind::WrongVar,
        SiteKind::WrongBranch,
        SiteKind::BitFlip,
        SiteKind::PointerCorruption,
    ];
    /// The detection-matrix rows, in the paper's Table 5 order.
    pub const MATRIX: [SiteKind; 4] = [
        SiteKind::StrayRead,
        SiteKind::StrayWrite,
        SiteKind::BadUpdate,
        SiteKind::HostAccess,
    ];
    /// Short name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SiteKind::MissingCall => "missing-call",
            SiteKind::MissingInit => "missing-init",
            SiteKind::MissingAssign => "missing-assign",
            SiteKind::MissingIf => "missing-if",
            SiteKind::MissingClause => "missing-and-or",
            SiteKind::WrongValue => "wrong-value",
            SiteKind::WrongArith => "wrong-arith-param",
            SiteKind::WrongVar => "wrong-var-param",
            SiteKind::WrongBranch => "wrong-branch",
            SiteKind::BitFlip => "bit-flip",
            SiteKind::PointerCorruption => "pointer-corruption",
            SiteKind::StrayRead => "stray-read-shared",
            SiteKind::StrayWrite => "stray-write-shared",
            SiteKind::BadUpdate => "invalid-update",
            SiteKind::HostAccess => "host-data-access",
        }
    }
    /// Raw memory faults and stray accesses are carried out by the host's code at the site
    /// (in the module's process, with the module's protection state), not by a faulty code
    /// variant of the module.
    pub fn is_memory(self) -> bool {
        matches!(
            self,
            SiteKind::BitFlip
                | SiteKind::PointerCorruption
                | SiteKind::StrayRead
                | SiteKind::StrayWrite
                | SiteKind::HostAccess
        )
    }
    /// The error rows of issue 5's detection matrix (paper 001, Table 5), not part of issue
    /// 6's injection campaign.
    pub fn is_matrix_row(self) -> bool {
        matches!(
            self,
            SiteKind::StrayRead | SiteKind::StrayWrite | SiteKind::BadUpdate | SiteKind::HostAccess
        )
    }
}

/// One fault site compiled into a module: `pm.site(id)` at that point selects the faulty
/// variant of the code. The module lists its sites in [`Module::sites`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    pub id: u32,
    pub kind: SiteKind,
    /// Which upcall it sits in (lookup, write, …) and what the faulty variant does.
    pub what: &'static str,
}

/// One inconsistency found by [`Module::fsck`].
pub type FsckProblem = String;

/// The upcalls a file-system module implements. `pm` is the only way to host data.
///
/// `mkfs` runs once on an empty store; `attach` runs at the start of every module
/// generation (after a restart too) and must not assume anything about memory it had before.
///
/// Requests may run concurrently, each in its own module process (a *context*), over the same
/// store: a module takes [`Pm::lock`]s for everything it reads or changes. The host keeps
/// every lock until the request ends (strict two-phase locking, so an undo-log rollback never
/// overwrites another request's committed change); `unlock` only says the module is done with
/// it. Locks must therefore be taken in one global order across a whole request.
///
/// A module that finds its own structures inconsistent answers [`Errno::EUCLEAN`]: the host
/// treats that as a failed check (a module fault), never as an ordinary error.
pub trait Module: Send {
    /// The module's name, as given to `kintsugi mount --module`.
    fn name(&self) -> &'static str;
    /// Formats an empty store (all blocks free).
    fn mkfs(&mut self, pm: &mut dyn Pm) -> FsResult<()>;
    /// Validates and loads what it needs from a formatted store.
    fn attach(&mut self, pm: &mut dyn Pm) -> FsResult<()>;
    fn lookup(&mut self, pm: &mut dyn Pm, ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<Attr>;
    fn getattr(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Attr>;
    fn setattr(&mut self, pm: &mut dyn Pm, ctx: &Ctx, ino: Ino, set: &SetAttr) -> FsResult<Attr>;
    fn read(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        fh: Fh,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>>;
    fn write(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        fh: Fh,
        offset: u64,
        data: &[u8],
    ) -> FsResult<u32>;
    /// Creates and opens a regular file.
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(Attr, Fh)>;
    #[allow(clippy::too_many_arguments)]
    fn mknod(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Attr>;
    fn mkdir(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Attr>;
    fn unlink(&mut self, pm: &mut dyn Pm, ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<()>;
    fn rmdir(&mut self, pm: &mut dyn Pm, ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<()>;
    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()>;
    fn link(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        ino: Ino,
        newparent: Ino,
        newname: &[u8],
    ) -> FsResult<Attr>;
    fn symlink(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Attr>;
    fn readlink(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Vec<u8>>;
    fn open(&mut self, pm: &mut dyn Pm, ctx: &Ctx, ino: Ino, flags: i32) -> FsResult<Fh>;
    fn release(&mut self, pm: &mut dyn Pm, ino: Ino, fh: Fh) -> FsResult<()>;
    /// Entries from cookie `offset` on (0: from the start), as many as fit in `max` entries.
    fn readdir(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<DirEntry>>;
    fn statfs(&mut self, pm: &mut dyn Pm) -> FsResult<StatFs>;
    fn fsync(&mut self, pm: &mut dyn Pm, ino: Ino, fh: Fh, datasync: bool) -> FsResult<()>;
    fn flush(&mut self, pm: &mut dyn Pm, ino: Ino, fh: Fh) -> FsResult<()>;
    /// The fault sites compiled into this module (issue 6's injection campaign).
    fn sites(&self) -> &'static [Site] {
        &[]
    }
    /// Checks the whole on-store structure without changing it and lists every inconsistency
    /// (empty = clean). Runs with no other request in flight.
    fn fsck(&mut self, _pm: &mut dyn Pm) -> FsResult<Vec<FsckProblem>> {
        Ok(Vec::new())
    }
    /// Checks what one request changed before the change becomes permanent (levels 1–3, with
    /// the other semantic checks, when the request succeeded and changed host data): the
    /// structure the request touched must be consistent, as `fsck` would find it, with
    /// everything else unchanged. `Err` (what is wrong) rejects the write-back: nothing of the
    /// request is applied, and the host treats it as a failed check. An incremental `fsck` of
    /// what the request locked; the default checks nothing.
    fn check_commit(&self, _c: &dyn CommitView) -> Result<(), String> {
        Ok(())
    }
    /// The layouts of this module's typed blocks (levels 1–3 check write-backs against them).
    /// Called after `attach`, so they may depend on the geometry. Default: none (nothing
    /// typed is checked).
    fn layouts(&self) -> Vec<Layout> {
        Vec::new()
    }
}
