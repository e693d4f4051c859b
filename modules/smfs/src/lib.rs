//! SMFS: the paper's simple RAM-disk file system, as a kintsugi module.
//!
//! All of its state lives in the host's block store, reached through [`fsapi::Pm`]; the
//! [`Smfs`] value itself caches only the superblock geometry, re-read by `attach` in every
//! module generation. So a crash plus the host's undo-log rollback loses nothing acknowledged.
//!
//! On-"disk" layout (block size `bs` from the store, normally 4096):
//! - block 0: superblock (magic, version, geometry, free-inode count, allocation hint, crc32c);
//! - blocks 1..=itable_blocks: the inode table, 128-byte inodes, inode number = index + 1
//!   (so the root is 1, as FUSE wants); mode 0 marks a free inode;
//! - every other block is handed out by the host (`get_next_blk`): file data, directory
//!   blocks, and pointer blocks (4 direct pointers, one indirect, one double, one triple
//!   indirect; 0 is a hole, which is how sparse files work);
//! - a directory's data is an array of 272-byte entries (ino, kind, name length, name); ino 0
//!   is a free slot. An entry never straddles blocks (15 to a 4 KiB block, the rest unused),
//!   so a directory's size counts slots and its blocks are `slots / per_block` rounded up,
//!   not `size / bs`. `.` and `..` are not stored: a directory keeps its parent in `rdev`.
//!   Directories have no holes and never shrink (removing a name clears its slot). Link counts: a file's is the number of entries naming it; a
//!   directory's is 2 plus the number of its subdirectories (whose `rdev` names it).
//!
//! # Concurrency and the lock order
//!
//! Requests may run at the same time in different module processes over one store, and the
//! host keeps every lock a request takes until the request ends (strict two-phase locking:
//! [`Pm::unlock`] is deferred). So every request takes its locks in **one global order**,
//! and never a lock ranked below one it already holds (taken earlier in the same request,
//! even in a section that has "ended"):
//!
//! 1. `RENAME_LOCK` (rename only: keeps the ancestor relation stable);
//! 2. inode locks (`LockId(ino)`), in **ascending inode number**; an inode's lock covers its
//!    128-byte slot, its data, its pointer blocks and, for a directory, its entries;
//! 3. `SUPER_LOCK` last: the superblock's mutable fields (free-inode count, allocation hint).
//!
//! Every upcall runs inside one `Locks` set that enforces this: asking for a lock ranked
//! below the highest one held answers `ESTALE` instead of risking a deadlock (the kernel
//! retries a path operation that fails with `ESTALE` once, with revalidation). Operations
//! whose locks depend on what they read (a name's inode, `..`, a free inode to allocate)
//! first *peek* without locks to collect the inodes they will need, lock the whole set in
//! ascending order, then read again under the locks and use only what they read there; the
//! peek is a hint, never trusted, and a failed check during a peek is ignored (a torn
//! unlocked read is not a fault). `ESTALE` only happens if a concurrent request changed the name between the peek
//! and the locks *and* the new inode ranks below a lock already held. Readers (`lookup`,
//! `getattr`, `read`, `readdir`, `readlink`, `statfs`, `fsync`) take the locks of everything
//! they read, so they never see a half-written or uncommitted structure; `open` and `release`
//! take the inode's lock around their reference change, so unlink's "still open?" test is
//! stable. Blocks come from the
//! host's atomic allocator and need no lock of ours.
//!
//! Every write to host data is as narrow as the data changed: an inode write is its 128-byte
//! slot, a directory entry its 272-byte slot (clearing one, its 8-byte ino), a pointer its 8
//! bytes (or the run of pointers truncate zeroes), the superblock its 64 bytes. So the undo
//! ranges of concurrent requests never overlap.
//!
//! # Self-checks
//!
//! Whatever SMFS reads under its locks is checked cheaply before use: a used inode's mode,
//! size and block pointers (inside the store, never into the superblock or inode table), a
//! directory entry's ino, kind and name, pointer-block entries, the link count and kind of an
//! inode a name leads to, the superblock's magic, version, crc and counts. An inconsistency is
//! answered with `EUCLEAN` (a failed check, a module fault for the host), never a panic or a
//! wrong answer. `fsck` is the whole-structure check (`fsck.rs`).
//!
//! # Fault sites
//!
//! [`Pm::site`] tests select faulty variants of the code for issue 6's injection campaign
//! (G-SWIFT operators, plus points where the host corrupts module memory); the table with
//! what each one does is [`SITES`] (`sites.rs`). Unarmed, every test is false.
#![forbid(unsafe_code)]

use fsapi::{
    Attr, BlockNo, BlockType, Check, Ctx, DirEntry, Errno, Fh, FileKind, FsResult, FsckProblem,
    Ino, Layout, LockId, Module, Pm, RENAME_EXCHANGE, RENAME_NOREPLACE, SetAttr, Site, StatFs,
    TimeSet, Timespec,
};

mod commit;
mod fsck;
mod sites;

pub use sites::SITES;

const MAGIC: u64 = 0x534d_4653_0000_0001; // "SMFS" v1
const VERSION: u32 = 1;
const INODE_SIZE: usize = 128;
const NDIRECT: usize = 4;
const DIRENT_SIZE: usize = 272;
const NAME_MAX: usize = 255;
const LINK_MAX: u32 = 32_000;
/// A symlink target is shorter than this.
const SYMLINK_MAX: u64 = 4096;
/// Lock id for "the namespace is being renamed": keeps the ancestor relation stable. Ranked
/// first.
const RENAME_LOCK: LockId = LockId(u64::MAX);
/// Lock id for the superblock's mutable fields (inode allocation). Ranked last.
const SUPER_LOCK: LockId = LockId(u64::MAX - 1);
/// A lock could not be taken in order (a concurrent change between peek and lock).
const ESTALE: Errno = Errno(libc::ESTALE);

/// Block types (declared at allocation; levels 1–3 check write-backs against [`Smfs::layouts`]).
const T_SUPER: BlockType = BlockType(1);
const T_INODE: BlockType = BlockType(2);
const T_DIR: BlockType = BlockType(3);
const T_PTR: BlockType = BlockType(4);

/// The position of lock `l` in the global order (see the module documentation).
fn lock_rank(l: LockId) -> u64 {
    if l == RENAME_LOCK {
        0
    } else if l == SUPER_LOCK {
        u64::MAX
    } else {
        l.0
    }
}

/// The locks one request holds. Strict two-phase: nothing is released before the request
/// ends, so a lock is only ever taken if it ranks above every lock already held.
#[derive(Debug, Default)]
struct Locks {
    held: Vec<LockId>,
    top: Option<u64>,
}

impl Locks {
    fn holds(&self, l: LockId) -> bool {
        self.held.contains(&l)
    }

    /// Takes `l` (nothing if held already); `ESTALE` if it ranks below a held lock.
    fn lock(&mut self, pm: &mut dyn Pm, l: LockId) -> FsResult<()> {
        self.take(pm, l, true)
    }

    /// Takes `l`; with `in_order`, `ESTALE` if it ranks below a held lock.
    fn take(&mut self, pm: &mut dyn Pm, l: LockId, in_order: bool) -> FsResult<()> {
        if self.holds(l) {
            return Ok(());
        }
        let r = lock_rank(l);
        if in_order && self.top.is_some_and(|t| r < t) {
            return Err(ESTALE);
        }
        pm.lock(l)?;
        self.held.push(l);
        self.top = Some(self.top.map_or(r, |t| t.max(r)));
        Ok(())
    }

    /// Takes every lock of `ls`, in ascending rank.
    fn lock_all(&mut self, pm: &mut dyn Pm, mut ls: Vec<LockId>) -> FsResult<()> {
        // Site 69 leaves out the sort and the order check: a real lock-order bug (link takes
        // the file before the directory, lookup the directory before the file), which the
        // host's deadlock detection must then break.
        let in_order = !pm.site(69);
        if in_order {
            ls.sort_by_key(|l| lock_rank(*l));
            ls.dedup();
        }
        for l in ls {
            self.take(pm, l, in_order)?;
        }
        Ok(())
    }

    /// The highest inode whose lock is held (0: none).
    fn top_ino(&self) -> u64 {
        self.held
            .iter()
            .filter(|l| **l != RENAME_LOCK && **l != SUPER_LOCK)
            .map(|l| l.0)
            .max()
            .unwrap_or(0)
    }

    /// End of the request: says "done" for every lock (the host releases them now).
    fn release(self, pm: &mut dyn Pm) -> FsResult<()> {
        let mut r = Ok(());
        for l in self.held.into_iter().rev() {
            if let Err(e) = pm.unlock(l) {
                r = Err(e);
            }
        }
        r
    }
}

/// Runs one request's body with its lock set; every lock is released when it returns. (If
/// the module dies inside, the host releases them while rolling back.)
fn request<T>(
    pm: &mut dyn Pm,
    f: impl FnOnce(&mut dyn Pm, &mut Locks) -> FsResult<T>,
) -> FsResult<T> {
    let mut l = Locks::default();
    let r = f(pm, &mut l);
    let u = l.release(pm);
    match r {
        Ok(v) => u.map(|()| v),
        Err(e) => Err(e),
    }
}

/// The SMFS module. Holds only geometry read from the superblock.
#[derive(Debug, Default)]
pub struct Smfs {
    geo: Option<Geometry>,
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    bs: usize,
    ninodes: u64,
    itable_blocks: u64,
    nblocks: u64,
}

impl Geometry {
    /// May `b` be a data or pointer block (not the superblock or inode table, inside the
    /// store)?
    fn data_blk(&self, b: u64) -> bool {
        b > self.itable_blocks && b < self.nblocks
    }
    fn max_blocks(&self) -> u64 {
        let per = (self.bs / 8) as u64;
        NDIRECT as u64 + per + per * per + per * per * per
    }
    fn max_bytes(&self) -> u64 {
        self.max_blocks() * self.bs as u64
    }
    /// How many logical blocks `i`'s size spans. A directory packs whole entries into each
    /// block and leaves the tail unused (4096 / 272: 15 entries, 16 bytes spare), so its
    /// entry count, not its byte size, says how many blocks it has: from 256 entries on,
    /// `size / bs` falls a block short.
    fn size_blocks(&self, i: &Inode) -> u64 {
        if i.is_dir() {
            (i.size / DIRENT_SIZE as u64).div_ceil((self.bs / DIRENT_SIZE) as u64)
        } else {
            i.size.div_ceil(self.bs as u64)
        }
    }
}

/// Superblock fields.
#[derive(Debug, Clone, Copy)]
struct Super {
    ninodes: u64,
    itable_blocks: u64,
    free_inodes: u64,
    hint: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Inode {
    mode: u32,
    nlink: u32,
    uid: u32,
    gid: u32,
    size: u64,
    atime: Timespec,
    mtime: Timespec,
    ctime: Timespec,
    /// Device number; for a directory, its parent's inode number.
    rdev: u32,
    generation: u32,
    /// Data and pointer blocks allocated, for st_blocks.
    nblk: u32,
    /// 4 direct, then indirect, double and triple indirect.
    ptr: [u64; NDIRECT + 3],
}

fn get_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
impl Inode {
    fn decode(b: &[u8; INODE_SIZE]) -> Inode {
        let ts = |s: usize, n: usize| Timespec {
            sec: get_u64(b, s) as i64,
            nsec: get_u32(b, n),
        };
        let mut ptr = [0u64; NDIRECT + 3];
        for (i, p) in ptr.iter_mut().enumerate() {
            *p = get_u64(b, 72 + 8 * i);
        }
        Inode {
            mode: get_u32(b, 0),
            nlink: get_u32(b, 4),
            uid: get_u32(b, 8),
            gid: get_u32(b, 12),
            size: get_u64(b, 16),
            atime: ts(24, 32),
            mtime: ts(40, 36),
            ctime: ts(48, 56),
            rdev: get_u32(b, 60),
            generation: get_u32(b, 64),
            nblk: get_u32(b, 68),
            ptr,
        }
    }
    fn encode(&self) -> [u8; INODE_SIZE] {
        let mut b = [0u8; INODE_SIZE];
        put_u32(&mut b, 0, self.mode);
        put_u32(&mut b, 4, self.nlink);
        put_u32(&mut b, 8, self.uid);
        put_u32(&mut b, 12, self.gid);
        put_u64(&mut b, 16, self.size);
        put_u64(&mut b, 24, self.atime.sec as u64);
        put_u32(&mut b, 32, self.atime.nsec);
        put_u32(&mut b, 36, self.mtime.nsec);
        put_u64(&mut b, 40, self.mtime.sec as u64);
        put_u64(&mut b, 48, self.ctime.sec as u64);
        put_u32(&mut b, 56, self.ctime.nsec);
        put_u32(&mut b, 60, self.rdev);
        put_u32(&mut b, 64, self.generation);
        put_u32(&mut b, 68, self.nblk);
        for (i, p) in self.ptr.iter().enumerate() {
            put_u64(&mut b, 72 + 8 * i, *p);
        }
        b
    }
    fn kind(&self) -> FsResult<FileKind> {
        FileKind::from_mode(self.mode).ok_or(Errno::EUCLEAN)
    }
    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    fn attr(&self, ino: Ino) -> FsResult<Attr> {
        let kind = self.kind()?;
        Ok(Attr {
            ino,
            generation: u64::from(self.generation),
            size: self.size,
            blocks: u64::from(self.nblk) * 8,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            kind,
            perm: (self.mode & 0o7777) as u16,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: if kind == FileKind::Dir { 0 } else { self.rdev },
        })
    }
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(())
}

/// A directory slot found by name.
#[derive(Debug, Clone, Copy)]
struct Found {
    slot: u64,
    ino: Ino,
    kind: FileKind,
}

impl Smfs {
    pub fn new() -> Smfs {
        Smfs::default()
    }

    fn geo(&self) -> FsResult<Geometry> {
        self.geo.ok_or(Errno::EIO)
    }

    /// The superblock as stored, checked on its own (magic, version, crc, counts).
    fn decode_super(b: &[u8; 64]) -> FsResult<Super> {
        if get_u64(b, 0) != MAGIC || get_u32(b, 8) != VERSION {
            return Err(Errno::EUCLEAN);
        }
        if crc32c::crc32c(&b[..56]) != get_u32(b, 56) {
            return Err(Errno::EUCLEAN);
        }
        let s = Super {
            ninodes: get_u64(b, 16),
            itable_blocks: get_u64(b, 24),
            free_inodes: get_u64(b, 32),
            hint: get_u64(b, 40),
        };
        if s.free_inodes > s.ninodes || s.hint == 0 || s.hint > s.ninodes {
            return Err(Errno::EUCLEAN);
        }
        Ok(s)
    }

    /// Reads and checks the superblock (caller holds `SUPER_LOCK`, or no request runs).
    fn read_super(&self, pm: &mut dyn Pm) -> FsResult<Super> {
        let mut b = [0u8; 64];
        pm.bread(BlockNo(0), 0, &mut b)?;
        let s = Self::decode_super(&b)?;
        if let Some(g) = self.geo
            && (s.ninodes != g.ninodes
                || s.itable_blocks != g.itable_blocks
                || get_u32(&b, 12) as usize != g.bs)
        {
            return Err(Errno::EUCLEAN);
        }
        Ok(s)
    }

    fn write_super(pm: &mut dyn Pm, s: &Super) -> FsResult<()> {
        let mut b = [0u8; 64];
        put_u64(&mut b, 0, MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 12, pm.block_size() as u32);
        put_u64(&mut b, 16, s.ninodes);
        put_u64(&mut b, 24, s.itable_blocks);
        put_u64(&mut b, 32, s.free_inodes);
        put_u64(&mut b, 40, s.hint);
        let c = crc32c::crc32c(&b[..56]);
        put_u32(&mut b, 56, c);
        pm.bwrite(BlockNo(0), 0, &b)
    }

    fn iloc(&self, ino: Ino) -> FsResult<(BlockNo, usize)> {
        let g = self.geo()?;
        if ino.0 == 0 || ino.0 > g.ninodes {
            return Err(Errno::ENOENT);
        }
        let idx = ino.0 - 1;
        let per = (g.bs / INODE_SIZE) as u64;
        Ok((BlockNo(1 + idx / per), (idx % per) as usize * INODE_SIZE))
    }

    /// Takes the lock of inode `ino` (ENOENT for a number that cannot be an inode).
    fn lock_ino(&self, pm: &mut dyn Pm, l: &mut Locks, ino: Ino) -> FsResult<()> {
        self.iloc(ino)?;
        l.lock(pm, LockId(ino.0))
    }

    /// Takes the locks of every inode in `inos` (None: skipped), ascending.
    fn lock_inos(&self, pm: &mut dyn Pm, l: &mut Locks, inos: &[Option<Ino>]) -> FsResult<()> {
        let mut ids = Vec::with_capacity(inos.len());
        for ino in inos.iter().flatten() {
            self.iloc(*ino)?;
            ids.push(LockId(ino.0));
        }
        l.lock_all(pm, ids)
    }

    /// Cheap consistency checks of an inode as read (a free one is not checked).
    fn check_inode(&self, i: &Inode) -> FsResult<()> {
        if i.mode == 0 {
            return Ok(());
        }
        let g = self.geo()?;
        let kind = FileKind::from_mode(i.mode).ok_or(Errno::EUCLEAN)?;
        if i.size > g.max_bytes() || u64::from(i.nblk) > g.nblocks {
            return Err(Errno::EUCLEAN);
        }
        if i.ptr.iter().any(|p| *p != 0 && !g.data_blk(*p)) {
            return Err(Errno::EUCLEAN);
        }
        let bad = match kind {
            FileKind::Dir => {
                !i.size.is_multiple_of(DIRENT_SIZE as u64)
                    || i.size > u64::from(i.nblk) * g.bs as u64
                    || i.rdev == 0
                    || u64::from(i.rdev) > g.ninodes
            }
            FileKind::Symlink => i.size >= SYMLINK_MAX,
            _ => false,
        };
        if bad {
            return Err(Errno::EUCLEAN);
        }
        Ok(())
    }

    /// An inode slot, checked (free or not).
    fn iget_raw(&self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Inode> {
        let (b, off) = self.iloc(ino)?;
        let mut buf = [0u8; INODE_SIZE];
        pm.bread(b, off, &mut buf)?;
        let i = Inode::decode(&buf);
        self.check_inode(&i)?;
        Ok(i)
    }

    /// A live inode (ENOENT for a free one).
    fn iget(&self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Inode> {
        let i = self.iget_raw(pm, ino)?;
        if i.mode == 0 {
            return Err(Errno::ENOENT);
        }
        Ok(i)
    }

    /// The inode a directory entry of kind `kind` names: it must be live, linked and of that
    /// kind (a directory with at least its two links).
    fn iget_named(&self, pm: &mut dyn Pm, ino: Ino, kind: FileKind) -> FsResult<Inode> {
        let i = self.iget_raw(pm, ino)?;
        if i.mode == 0 || i.nlink == 0 || i.kind()? != kind || (i.is_dir() && i.nlink < 2) {
            return Err(Errno::EUCLEAN);
        }
        Ok(i)
    }

    fn iput(&self, pm: &mut dyn Pm, ino: Ino, i: &Inode) -> FsResult<()> {
        let (b, off) = if pm.site(44) {
            self.iloc(Ino(ino.0 + 1))?
        } else {
            self.iloc(ino)?
        };
        let mut rec = i.encode();
        if pm.site(67) {
            // Issue 5's "semantically invalid update": a block pointer beyond the store.
            let g = self.geo()?;
            put_u64(&mut rec, 72, g.nblocks + 7);
        }
        pm.bwrite(b, off, &rec)
    }

    /// Unlocked look at a live inode: a hint only (None if it does not look sane).
    fn peek_inode(&self, pm: &mut dyn Pm, ino: Ino) -> Option<Inode> {
        self.iget(pm, ino).ok()
    }

    /// Unlocked look at the inode `name` in `dir` names: a hint for the lock set.
    fn peek_child(&self, pm: &mut dyn Pm, dir: Ino, name: &[u8]) -> Option<Ino> {
        let mut d = self.peek_inode(pm, dir).filter(Inode::is_dir)?;
        self.dir_find(pm, &mut d, name)
            .ok()
            .flatten()
            .map(|f| f.ino)
    }

    /// Unlocked look for a free inode, from the allocation hint on: a hint for the lock set.
    fn peek_free(&self, pm: &mut dyn Pm) -> Option<Ino> {
        let g = self.geo().ok()?;
        let mut sb = [0u8; 64];
        pm.bread(BlockNo(0), 0, &mut sb).ok()?;
        let hint = get_u64(&sb, 40);
        let start = if (1..=g.ninodes).contains(&hint) {
            hint - 1
        } else {
            0
        };
        let per = (g.bs / INODE_SIZE) as u64;
        let mut buf = vec![0u8; g.bs];
        let mut loaded = u64::MAX;
        for k in 0..g.ninodes {
            let idx = (start + k) % g.ninodes;
            if idx / per != loaded {
                loaded = idx / per;
                pm.bread(BlockNo(1 + loaded), 0, &mut buf).ok()?;
            }
            if get_u32(&buf, (idx % per) as usize * INODE_SIZE) == 0 {
                return Some(Ino(idx + 1));
            }
        }
        None
    }

    /// Allocates an inode: `cand` (locked by the caller with the rest of its set) if it is
    /// still free, else the lowest free one above every held lock. Takes `SUPER_LOCK`.
    fn ialloc(
        &self,
        pm: &mut dyn Pm,
        l: &mut Locks,
        cand: Option<Ino>,
        mode: u32,
        ctx: &Ctx,
    ) -> FsResult<(Ino, Inode)> {
        let g = self.geo()?;
        let mut found = None;
        if let Some(c) = cand
            && l.holds(LockId(c.0))
        {
            let old = self.iget_raw(pm, c)?;
            if old.mode == 0 {
                found = Some((c, old));
            }
        }
        if found.is_none() {
            // The peeked inode was taken meanwhile: only inodes above every lock held can
            // still be locked in order.
            for k in l.top_ino() + 1..=g.ninodes {
                let ino = Ino(k);
                if self.iget_raw(pm, ino).is_ok_and(|i| i.mode == 0) {
                    self.lock_ino(pm, l, ino)?;
                    let old = self.iget_raw(pm, ino)?;
                    if old.mode == 0 {
                        found = Some((ino, old));
                        break;
                    }
                }
            }
        }
        l.lock(pm, SUPER_LOCK)?;
        let mut sb = self.read_super(pm)?;
        let Some((ino, old)) = found else {
            // Free inodes below the locks held (a concurrent change moved us past them):
            // let the kernel retry.
            return Err(if sb.free_inodes == 0 {
                Errno::ENOSPC
            } else {
                ESTALE
            });
        };
        if sb.free_inodes == 0 {
            return Err(Errno::EUCLEAN);
        }
        let now = pm.now();
        let i = if pm.site(10) {
            Inode {
                mode,
                nlink: 1,
                ..Inode::default()
            }
        } else {
            Inode {
                mode,
                nlink: if pm.site(39) { 0 } else { 1 },
                uid: ctx.uid,
                gid: ctx.gid,
                atime: now,
                mtime: now,
                ctime: now,
                generation: old.generation.wrapping_add(1),
                ..Inode::default()
            }
        };
        pm.site(59);
        self.iput(pm, ino, &i)?;
        sb.free_inodes -= 1;
        sb.hint = ino.0 % g.ninodes + 1;
        if !pm.site(4) {
            Self::write_super(pm, &sb)?;
        }
        Ok((ino, i))
    }

    /// Frees an inode and all its blocks (caller holds its lock). Takes `SUPER_LOCK`.
    fn ifree(&self, pm: &mut dyn Pm, l: &mut Locks, ino: Ino, mut i: Inode) -> FsResult<()> {
        if !pm.site(3) {
            self.trunc_blocks(pm, &mut i, 0)?;
        }
        let freed = Inode {
            generation: i.generation,
            ..Inode::default()
        };
        self.iput(pm, ino, &freed)?;
        l.lock(pm, SUPER_LOCK)?;
        let mut sb = self.read_super(pm)?;
        if sb.free_inodes >= sb.ninodes {
            return Err(Errno::EUCLEAN);
        }
        sb.free_inodes += 1;
        Self::write_super(pm, &sb)
    }

    /// Drops a name's link; frees the node when no name and no open file refer to it.
    fn drop_link(&self, pm: &mut dyn Pm, l: &mut Locks, ino: Ino, mut i: Inode) -> FsResult<()> {
        if !pm.site(17) {
            if pm.site(18) {
                i.nlink = i.nlink.saturating_sub(1);
            } else {
                i.nlink = i.nlink.saturating_sub(if i.is_dir() { i.nlink } else { 1 });
            }
        }
        i.ctime = pm.now();
        let last_link = if pm.site(34) {
            i.nlink <= 1
        } else {
            i.nlink == 0
        };
        if last_link && (pm.site(33) || pm.refs(ino) == 0) {
            self.ifree(pm, l, ino, i)
        } else {
            self.iput(pm, ino, &i)
        }
    }

    fn per_ptr(&self) -> FsResult<u64> {
        Ok((self.geo()?.bs / 8) as u64)
    }

    /// Entry `idx` of pointer block `b`, checked.
    fn read_ptr(&self, pm: &mut dyn Pm, b: u64, idx: u64) -> FsResult<u64> {
        let mut buf = [0u8; 8];
        pm.bread(BlockNo(b), idx as usize * 8, &mut buf)?;
        let p = u64::from_le_bytes(buf);
        if p != 0 && !self.geo()?.data_blk(p) {
            return Err(Errno::EUCLEAN);
        }
        Ok(p)
    }

    fn alloc_blk(pm: &mut dyn Pm, i: &mut Inode, ty: BlockType) -> FsResult<u64> {
        let b = pm.get_next_blk_typed(ty)?.0;
        if !pm.site(24) {
            i.nblk += 1;
        }
        Ok(b)
    }

    /// The block holding logical block `lbn` of `i`; allocates the path if `alloc`.
    /// `Ok(None)` is a hole.
    fn bmap(&self, pm: &mut dyn Pm, i: &mut Inode, lbn: u64, alloc: bool) -> FsResult<Option<u64>> {
        let per = self.per_ptr()?;
        let nd = NDIRECT as u64;
        let direct = if pm.site(53) { lbn <= nd } else { lbn < nd };
        let (root_idx, path): (usize, Vec<u64>) = if direct {
            (lbn as usize, vec![])
        } else if lbn - nd < per {
            (NDIRECT, vec![lbn - nd])
        } else if lbn - nd - per < per * per {
            let r = lbn - nd - per;
            (NDIRECT + 1, vec![r / per, r % per])
        } else if lbn - nd - per - per * per < per * per * per {
            let r = lbn - nd - per - per * per;
            (NDIRECT + 2, vec![r / (per * per), (r / per) % per, r % per])
        } else {
            return Err(Errno::EFBIG);
        };
        let data_ty = if i.is_dir() { T_DIR } else { BlockType::DATA };
        let depth = path.len();
        let mut cur = if pm.site(12) { 0 } else { i.ptr[root_idx] };
        if cur == 0 {
            if !alloc {
                return Ok(None);
            }
            cur = Self::alloc_blk(pm, i, if depth == 0 { data_ty } else { T_PTR })?;
            if !pm.site(19) {
                i.ptr[root_idx] = cur;
            }
        }
        pm.site(60);
        for (k, idx) in path.into_iter().enumerate() {
            let mut next = self.read_ptr(pm, cur, idx)?;
            if next == 0 {
                if !alloc {
                    return Ok(None);
                }
                let ty = if k + 1 == depth { data_ty } else { T_PTR };
                next = Self::alloc_blk(pm, i, ty)?;
                pm.bwrite(BlockNo(cur), idx as usize * 8, &next.to_le_bytes())?;
            }
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Frees blocks of the subtree rooted at `blk` (`level` 0 = data block) holding logical
    /// blocks `start..` relative to the subtree. Returns whether `blk` itself was freed.
    fn trunc_tree(
        &self,
        pm: &mut dyn Pm,
        i: &mut Inode,
        blk: u64,
        level: u32,
        start: u64,
    ) -> FsResult<bool> {
        if level > 0 {
            let g = self.geo()?;
            let per = self.per_ptr()?;
            let span = per.pow(level - 1);
            let mut buf = vec![0u8; g.bs];
            pm.bread(BlockNo(blk), 0, &mut buf)?;
            pm.site(63);
            // The run of pointers zeroed here: only those bytes are written back.
            let mut changed: Option<(usize, usize)> = None;
            for j in 0..per {
                if (j + 1) * span <= start {
                    continue;
                }
                let child = get_u64(&buf, j as usize * 8);
                if child != 0 && !g.data_blk(child) {
                    return Err(Errno::EUCLEAN);
                }
                if (child != 0 || pm.site(37))
                    && self.trunc_tree(pm, i, child, level - 1, start.saturating_sub(j * span))?
                {
                    put_u64(&mut buf, j as usize * 8, 0);
                    let j = j as usize;
                    changed = Some(changed.map_or((j, j), |(lo, _)| (lo, j)));
                }
            }
            if start > 0 {
                if let Some((lo, hi)) = changed {
                    pm.bwrite(BlockNo(blk), lo * 8, &buf[lo * 8..(hi + 1) * 8])?;
                }
                return Ok(false);
            }
        } else if start > 0 {
            return Ok(false);
        }
        if !pm.site(7) {
            pm.free_blk(BlockNo(blk))?;
        }
        i.nblk = i.nblk.saturating_sub(1);
        Ok(true)
    }

    /// Frees every data block at logical index `from` or beyond.
    fn trunc_blocks(&self, pm: &mut dyn Pm, i: &mut Inode, from: u64) -> FsResult<()> {
        let per = self.per_ptr()?;
        let nd = NDIRECT as u64;
        let roots = [
            (NDIRECT, 1u32, nd),
            (NDIRECT + 1, 2u32, nd + per),
            (NDIRECT + 2, 3u32, nd + per + per * per),
        ];
        for d in 0..NDIRECT {
            if (pm.site(35) || d as u64 >= from)
                && i.ptr[d] != 0
                && self.trunc_tree(pm, i, i.ptr[d], 0, 0)?
            {
                i.ptr[d] = 0;
            }
        }
        for (idx, level, base) in roots {
            let b = i.ptr[idx];
            if b != 0 && self.trunc_tree(pm, i, b, level, from.saturating_sub(base))? {
                i.ptr[idx] = 0;
            }
        }
        Ok(())
    }

    /// Sets the size, freeing blocks beyond it and zeroing the tail of the last kept block so
    /// a later extension reads zeros.
    fn set_size(&self, pm: &mut dyn Pm, i: &mut Inode, size: u64) -> FsResult<()> {
        let g = self.geo()?;
        let bs = g.bs as u64;
        if size > g.max_bytes() {
            return Err(Errno::EFBIG);
        }
        if !pm.site(28) && size < i.size {
            let from = if pm.site(29) {
                size / bs
            } else {
                size.div_ceil(bs)
            };
            self.trunc_blocks(pm, i, from)?;
            let tail = (size % bs) as usize;
            if tail != 0
                && let Some(b) = self.bmap(pm, i, size / bs, false)?
            {
                pm.bwrite(BlockNo(b), tail, &vec![0u8; bs as usize - tail])?;
            }
        }
        i.size = size;
        Ok(())
    }

    fn read_data(
        &self,
        pm: &mut dyn Pm,
        i: &mut Inode,
        offset: u64,
        size: usize,
    ) -> FsResult<Vec<u8>> {
        let bs = self.geo()?.bs as u64;
        if !pm.site(32) && offset >= i.size {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(i.size);
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let lbn = pos / bs;
            let boff = (pos % bs) as usize;
            let n = ((bs - boff as u64).min(end - pos)) as usize;
            let dst = (pos - offset) as usize;
            let l = if pm.site(42) { lbn + 1 } else { lbn };
            if let Some(b) = self.bmap(pm, i, l, false)? {
                pm.bread(BlockNo(b), boff, &mut out[dst..dst + n])?;
            }
            pos += n as u64;
        }
        Ok(out)
    }

    fn write_data(&self, pm: &mut dyn Pm, i: &mut Inode, offset: u64, data: &[u8]) -> FsResult<()> {
        let g = self.geo()?;
        let bs = g.bs as u64;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > g.max_bytes() {
            return Err(Errno::EFBIG);
        }
        pm.site(55);
        let mut pos = offset;
        let to_end = pm.site(52);
        while pos < end || (to_end && pos == end) {
            let lbn = pos / bs;
            let boff = (pos % bs) as usize;
            let n = ((bs - boff as u64).min(end - pos)) as usize;
            let b = self.bmap(pm, i, lbn, true)?.ok_or(Errno::EIO)?;
            let src = (pos - offset) as usize;
            let at = if pm.site(41) { boff + 1 } else { boff };
            pm.bwrite(BlockNo(b), at, &data[src..src + n])?;
            pos += n as u64;
        }
        if end > i.size && !pm.site(15) {
            i.size = end;
        }
        Ok(())
    }

    fn slots_per_block(&self) -> FsResult<u64> {
        Ok((self.geo()?.bs / DIRENT_SIZE) as u64)
    }

    fn nslots(&self, d: &Inode) -> FsResult<u64> {
        Ok(d.size / DIRENT_SIZE as u64)
    }

    /// Calls `f(slot, ino, kind, name)` for every used slot from `first` on, until it returns
    /// `Some`. Checks every used entry it passes.
    fn scan_dir<T>(
        &self,
        pm: &mut dyn Pm,
        d: &mut Inode,
        first: u64,
        mut f: impl FnMut(u64, Ino, FileKind, &[u8]) -> Option<T>,
    ) -> FsResult<Option<T>> {
        let g = self.geo()?;
        let spb = self.slots_per_block()?;
        let n = self.nslots(d)?;
        let mut buf = vec![0u8; g.bs];
        let mut loaded = if pm.site(11) { 0 } else { u64::MAX };
        let last = if pm.site(54) { n + 1 } else { n };
        for slot in first..last {
            let lbn = slot / spb;
            if lbn != loaded {
                // A directory has no holes.
                let b = self.bmap(pm, d, lbn, false)?.ok_or(Errno::EUCLEAN)?;
                pm.bread(BlockNo(b), 0, &mut buf)?;
                pm.site(56);
                loaded = lbn;
            }
            let o = (slot % spb) as usize * DIRENT_SIZE;
            let ino = get_u64(&buf, o);
            if ino == 0 {
                continue;
            }
            let len = buf[o + 9] as usize;
            let name = &buf[o + 10..o + 10 + len];
            let kind = kind_from_code(buf[o + 8]);
            if ino > g.ninodes || len == 0 || name.contains(&b'/') || name.contains(&0) {
                return Err(Errno::EUCLEAN);
            }
            let kind = kind.ok_or(Errno::EUCLEAN)?;
            if let Some(t) = f(slot, Ino(ino), kind, name) {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    fn dir_find(&self, pm: &mut dyn Pm, d: &mut Inode, name: &[u8]) -> FsResult<Option<Found>> {
        let first = if pm.site(45) { 1 } else { 0 };
        self.scan_dir(pm, d, first, |slot, ino, kind, n| {
            (n == name).then_some(Found { slot, ino, kind })
        })
    }

    fn write_slot(
        &self,
        pm: &mut dyn Pm,
        d: &mut Inode,
        slot: u64,
        ino: Ino,
        kind: FileKind,
        name: &[u8],
    ) -> FsResult<()> {
        let spb = self.slots_per_block()?;
        let mut e = [0u8; DIRENT_SIZE];
        put_u64(&mut e, 0, ino.0);
        e[8] = kind_code(kind);
        e[9] = name.len() as u8;
        e[10..10 + name.len()].copy_from_slice(name);
        let b = self.bmap(pm, d, slot / spb, true)?.ok_or(Errno::EIO)?;
        let at = (slot % spb) as usize * DIRENT_SIZE;
        let at = if pm.site(43) { at + 1 } else { at };
        pm.bwrite(BlockNo(b), at, &e)
    }

    fn clear_slot(&self, pm: &mut dyn Pm, d: &mut Inode, slot: u64) -> FsResult<()> {
        let spb = self.slots_per_block()?;
        let b = self.bmap(pm, d, slot / spb, false)?.ok_or(Errno::EUCLEAN)?;
        pm.bwrite(
            BlockNo(b),
            (slot % spb) as usize * DIRENT_SIZE,
            &0u64.to_le_bytes(),
        )
    }

    /// Adds `name → ino` to directory `d` (caller writes `d` back).
    fn dir_add(
        &self,
        pm: &mut dyn Pm,
        d: &mut Inode,
        name: &[u8],
        ino: Ino,
        kind: FileKind,
    ) -> FsResult<()> {
        if d.nlink == 0 {
            // A removed directory (kept while open) takes no new names: freed on its last
            // release, it would take them along. The kernel never asks (a removed directory
            // is dead to the VFS); a direct caller gets what Linux answers.
            return Err(Errno::ENOENT);
        }
        let spb = self.slots_per_block()?;
        let n = self.nslots(d)?;
        let bs = self.geo()?.bs;
        let mut free = None;
        let mut buf = vec![0u8; bs];
        let mut lbn = 0;
        while lbn * spb < n && free.is_none() {
            let b = self.bmap(pm, d, lbn, false)?.ok_or(Errno::EUCLEAN)?;
            pm.bread(BlockNo(b), 0, &mut buf)?;
            for k in 0..spb {
                let slot = lbn * spb + k;
                if slot < n && get_u64(&buf, k as usize * DIRENT_SIZE) == 0 {
                    free = Some(slot);
                    break;
                }
            }
            lbn += 1;
        }
        let slot = free.unwrap_or(n);
        self.write_slot(pm, d, slot, ino, kind, name)?;
        let appended = if pm.site(22) { slot != n } else { slot == n };
        if appended && !pm.site(20) {
            d.size = if pm.site(21) {
                n * DIRENT_SIZE as u64
            } else {
                (n + 1) * DIRENT_SIZE as u64
            };
        }
        let now = pm.now();
        d.mtime = now;
        d.ctime = now;
        Ok(())
    }

    fn dir_is_empty(&self, pm: &mut dyn Pm, d: &mut Inode) -> FsResult<bool> {
        Ok(self.scan_dir(pm, d, 0, |_, _, _, _| Some(()))?.is_none())
    }

    /// Only a regular file's data is written or truncated through the file API (a symlink's
    /// target is set once; a device's or fifo's data is not ours).
    fn check_regular(i: &Inode) -> FsResult<()> {
        match i.kind()? {
            FileKind::File => Ok(()),
            FileKind::Dir => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    fn dir(&self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Inode> {
        let d = self.iget(pm, ino)?;
        if !d.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok(d)
    }

    /// Creates a node of `mode` named `name` in `parent`; `fill` sets kind-specific fields.
    /// With `open`, also takes a node reference (create).
    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        open: bool,
        fill: impl FnOnce(&Self, &mut dyn Pm, Ino, &mut Inode) -> FsResult<()>,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let kind = FileKind::from_mode(mode).ok_or(Errno::EINVAL)?;
        request(pm, |pm, l| {
            let cand = self.peek_free(pm);
            self.lock_inos(pm, l, &[Some(parent), cand])?;
            let mut d = self.dir(pm, parent)?;
            if d.nlink == 0 {
                return Err(Errno::ENOENT);
            }
            if !pm.site(26) && self.dir_find(pm, &mut d, name)?.is_some() {
                return Err(Errno::EEXIST);
            }
            if kind == FileKind::Dir && d.nlink >= LINK_MAX {
                return Err(Errno::EMLINK);
            }
            let mut mode = mode;
            let mut c = if pm.site(13) { Ctx::default() } else { *ctx };
            if d.mode & libc::S_ISGID != 0 {
                c.gid = d.gid;
                if kind == FileKind::Dir {
                    mode |= libc::S_ISGID;
                }
            }
            let (ino, mut i) = self.ialloc(pm, l, cand, mode, &c)?;
            fill(self, pm, ino, &mut i)?;
            if kind == FileKind::Dir {
                i.nlink = if pm.site(38) { 1 } else { 2 };
                i.rdev = parent.0 as u32;
                d.nlink += 1;
            }
            let at = if pm.site(48) { parent } else { ino };
            self.iput(pm, at, &i)?;
            self.dir_add(pm, &mut d, name, ino, kind)?;
            if !pm.site(6) {
                self.iput(pm, parent, &d)?;
            }
            if open && !pm.site(9) {
                pm.vref(ino)?;
            }
            i.attr(ino)
        })
    }

    fn remove(&self, pm: &mut dyn Pm, parent: Ino, name: &[u8], want_dir: bool) -> FsResult<()> {
        check_name(name)?;
        request(pm, |pm, l| {
            let peek = self.peek_child(pm, parent, name);
            self.lock_inos(pm, l, &[Some(parent), peek])?;
            let mut d = self.dir(pm, parent)?;
            let f = self.dir_find(pm, &mut d, name)?.ok_or(Errno::ENOENT)?;
            self.lock_ino(pm, l, f.ino)?;
            let mut i = self.iget_named(pm, f.ino, f.kind)?;
            if want_dir {
                if !i.is_dir() {
                    return Err(Errno::ENOTDIR);
                }
                if !pm.site(27) && !self.dir_is_empty(pm, &mut i)? {
                    return Err(Errno::ENOTEMPTY);
                }
                if !pm.site(16) {
                    d.nlink = d.nlink.checked_sub(1).ok_or(Errno::EUCLEAN)?;
                }
            } else if i.is_dir() {
                return Err(Errno::EISDIR);
            }
            if !pm.site(2) {
                self.clear_slot(pm, &mut d, f.slot)?;
            }
            let now = pm.now();
            d.mtime = now;
            d.ctime = now;
            self.iput(pm, parent, &d)?;
            i.ctime = now;
            let victim = if pm.site(50) { parent } else { f.ino };
            self.drop_link(pm, l, victim, i)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn do_rename(
        &self,
        pm: &mut dyn Pm,
        l: &mut Locks,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let mut d1 = self.dir(pm, parent)?;
        let src = self.dir_find(pm, &mut d1, name)?.ok_or(Errno::ENOENT)?;
        let same_dir = parent == newparent;
        let mut d2 = if same_dir {
            d1
        } else {
            self.dir(pm, newparent)?
        };
        let dst = self.dir_find(pm, &mut d2, newname)?;
        self.lock_ino(pm, l, src.ino)?;
        if let Some(t) = dst {
            self.lock_ino(pm, l, t.ino)?;
        }
        let mut si = self.iget_named(pm, src.ino, src.kind)?;
        pm.site(62);
        let kind = src.kind;
        let now = pm.now();
        if let Some(t) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(Errno::EEXIST);
            }
            if t.ino == src.ino {
                return Ok(());
            }
            let mut ti = self.iget_named(pm, t.ino, t.kind)?;
            match (si.is_dir(), ti.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) => {
                    if !self.dir_is_empty(pm, &mut ti)? {
                        return Err(Errno::ENOTEMPTY);
                    }
                    d2.nlink = d2.nlink.checked_sub(1).ok_or(Errno::EUCLEAN)?;
                }
                (false, false) => {}
            }
            // Reuse the target's slot: the name never disappears, as rename(2) promises.
            let named = if pm.site(51) { t.ino } else { src.ino };
            self.write_slot(pm, &mut d2, t.slot, named, kind, newname)?;
            ti.ctime = now;
            self.drop_link(pm, l, t.ino, ti)?;
        } else {
            if si.is_dir() && d2.nlink >= LINK_MAX {
                return Err(Errno::EMLINK);
            }
            self.dir_add(pm, &mut d2, newname, src.ino, kind)?;
        }
        if same_dir {
            d1 = d2;
        }
        self.clear_slot(pm, &mut d1, src.slot)?;
        if si.is_dir() && (pm.site(36) || !same_dir) {
            if !pm.site(23) {
                si.rdev = newparent.0 as u32;
            }
            d1.nlink = d1.nlink.checked_sub(1).ok_or(Errno::EUCLEAN)?;
            d2.nlink += 1;
        }
        si.ctime = now;
        self.iput(pm, src.ino, &si)?;
        d1.mtime = now;
        d1.ctime = now;
        d2.mtime = now;
        d2.ctime = now;
        let first = if pm.site(47) { newparent } else { parent };
        self.iput(pm, first, &d1)?;
        if !same_dir {
            self.iput(pm, newparent, &d2)?;
        }
        Ok(())
    }
}

fn kind_code(k: FileKind) -> u8 {
    match k {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::Symlink => 3,
        FileKind::Fifo => 4,
        FileKind::CharDev => 5,
        FileKind::BlockDev => 6,
        FileKind::Socket => 7,
    }
}

fn kind_from_code(c: u8) -> Option<FileKind> {
    Some(match c {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        4 => FileKind::Fifo,
        5 => FileKind::CharDev,
        6 => FileKind::BlockDev,
        7 => FileKind::Socket,
        _ => return None,
    })
}

fn apply_time(t: TimeSet, now: Timespec) -> Timespec {
    match t {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    }
}

impl Module for Smfs {
    fn name(&self) -> &'static str {
        "smfs"
    }

    fn mkfs(&mut self, pm: &mut dyn Pm) -> FsResult<()> {
        let bs = pm.block_size();
        if bs < 1024 || !bs.is_multiple_of(INODE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let nblocks = pm.nblocks();
        let ninodes = (nblocks / 4).clamp(16, u64::from(u32::MAX) - 1);
        let itable_blocks = ninodes.div_ceil((bs / INODE_SIZE) as u64);
        if itable_blocks + 8 > nblocks {
            return Err(Errno::ENOSPC);
        }
        // The superblock and the inode table must sit at fixed places: a fresh store hands
        // out blocks lowest-first.
        for want in 0..=itable_blocks {
            let got = pm.get_next_blk_typed(if want == 0 { T_SUPER } else { T_INODE })?;
            if got.0 != want {
                return Err(Errno::EINVAL);
            }
        }
        Self::write_super(
            pm,
            &Super {
                ninodes,
                itable_blocks,
                free_inodes: ninodes,
                hint: 1,
            },
        )?;
        self.geo = Some(Geometry {
            bs,
            ninodes,
            itable_blocks,
            nblocks,
        });
        let root_ctx = Ctx {
            uid: 0,
            gid: 0,
            pid: 0,
        };
        request(pm, |pm, l| {
            self.lock_ino(pm, l, Ino::ROOT)?;
            let (ino, mut root) =
                self.ialloc(pm, l, Some(Ino::ROOT), libc::S_IFDIR | 0o755, &root_ctx)?;
            if ino != Ino::ROOT {
                return Err(Errno::EIO);
            }
            root.nlink = 2;
            root.rdev = Ino::ROOT.0 as u32;
            self.iput(pm, ino, &root)
        })
    }

    fn attach(&mut self, pm: &mut dyn Pm) -> FsResult<()> {
        // No lock (attach is not a request): the geometry never changes, and a superblock
        // torn by a concurrent allocation is read again.
        let mut b = [0u8; 64];
        let mut sb = Err(Errno::EUCLEAN);
        for _ in 0..3 {
            pm.bread(BlockNo(0), 0, &mut b)?;
            sb = Self::decode_super(&b);
            if sb.is_ok() {
                break;
            }
        }
        let sb = sb?;
        let bs = pm.block_size();
        if sb.itable_blocks != sb.ninodes.div_ceil((bs / INODE_SIZE) as u64)
            || sb.itable_blocks >= pm.nblocks()
            || get_u32(&b, 12) as usize != bs
        {
            return Err(Errno::EUCLEAN);
        }
        self.geo = Some(Geometry {
            bs,
            ninodes: sb.ninodes,
            itable_blocks: sb.itable_blocks,
            nblocks: pm.nblocks(),
        });
        Ok(())
    }

    fn lookup(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        request(pm, |pm, l| {
            let peek = match name {
                b"." => None,
                b".." => self.peek_inode(pm, parent).map(|d| Ino(u64::from(d.rdev))),
                _ => self.peek_child(pm, parent, name),
            };
            self.lock_inos(pm, l, &[Some(parent), peek])?;
            let mut d = self.dir(pm, parent)?;
            if d.nlink == 0 {
                return Err(Errno::ENOENT);
            }
            let (ino, kind) = match name {
                b"." => (parent, FileKind::Dir),
                b".." => (Ino(u64::from(d.rdev)), FileKind::Dir),
                _ => {
                    let f = self.dir_find(pm, &mut d, name)?.ok_or(Errno::ENOENT)?;
                    pm.site(61);
                    (f.ino, f.kind)
                }
            };
            self.lock_ino(pm, l, ino)?;
            self.iget_named(pm, ino, kind)?.attr(ino)
        })
    }

    fn getattr(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Attr> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            let i = self.iget(pm, ino)?;
            pm.site(57);
            i.attr(ino)
        })
    }

    fn setattr(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, ino: Ino, set: &SetAttr) -> FsResult<Attr> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            let mut i = self.iget(pm, ino)?;
            let now = if pm.site(14) {
                Timespec::default()
            } else {
                pm.now()
            };
            if let Some(size) = set.size {
                Self::check_regular(&i)?;
                self.set_size(pm, &mut i, size)?;
                if set.mtime.is_none() {
                    i.mtime = now;
                }
            }
            if let Some(m) = set.mode {
                i.mode = if pm.site(40) {
                    m & 0o7777
                } else {
                    (i.mode & libc::S_IFMT) | (m & 0o7777)
                };
            }
            if let Some(u) = set.uid {
                i.uid = u;
            }
            if let Some(g) = set.gid {
                i.gid = g;
            }
            if let Some(t) = set.atime {
                i.atime = apply_time(t, now);
            }
            if let Some(t) = set.mtime {
                i.mtime = apply_time(t, now);
            }
            i.ctime = set.ctime.unwrap_or(now);
            self.iput(pm, ino, &i)?;
            i.attr(ino)
        })
    }

    fn read(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        _fh: Fh,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            let mut i = self.iget(pm, ino)?;
            if i.is_dir() {
                return Err(Errno::EISDIR);
            }
            self.read_data(pm, &mut i, offset, size as usize)
        })
    }

    fn write(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        _fh: Fh,
        offset: u64,
        data: &[u8],
    ) -> FsResult<u32> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            let mut i = self.iget(pm, ino)?;
            Self::check_regular(&i)?;
            // Issue 5's detection-matrix probes (the host makes the access at these points).
            pm.site(65);
            pm.site(66);
            pm.site(68);
            self.write_data(pm, &mut i, offset, data)?;
            let now = pm.now();
            i.mtime = now;
            i.ctime = now;
            if !pm.site(1) {
                self.iput(pm, ino, &i)?;
            }
            Ok(data.len() as u32)
        })
    }

    fn create(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        _flags: i32,
    ) -> FsResult<(Attr, Fh)> {
        let mode = libc::S_IFREG | (mode & 0o7777 & !umask);
        let attr = self.make_node(pm, ctx, parent, name, mode, true, |_, _, _, _| Ok(()))?;
        Ok((attr, Fh(0)))
    }

    fn mknod(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let kind = FileKind::from_mode(mode).ok_or(Errno::EINVAL)?;
        if kind == FileKind::Dir || kind == FileKind::Symlink {
            return Err(Errno::EINVAL);
        }
        let mode = (mode & libc::S_IFMT) | (mode & 0o7777 & !umask);
        self.make_node(pm, ctx, parent, name, mode, false, |_, pm, _, i| {
            if !pm.site(25) {
                i.rdev = rdev;
            }
            Ok(())
        })
    }

    fn mkdir(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Attr> {
        let mode = libc::S_IFDIR | (mode & 0o7777 & !umask);
        self.make_node(pm, ctx, parent, name, mode, false, |_, _, _, _| Ok(()))
    }

    fn unlink(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.remove(pm, parent, name, false)
    }

    fn rmdir(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.remove(pm, parent, name, true)
    }

    fn rename(
        &mut self,
        pm: &mut dyn Pm,
        _ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        check_name(name)?;
        check_name(newname)?;
        if flags & RENAME_EXCHANGE != 0 || flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL);
        }
        request(pm, |pm, l| {
            l.lock(pm, RENAME_LOCK)?;
            let s = self.peek_child(pm, parent, name);
            let t = self.peek_child(pm, newparent, newname);
            self.lock_inos(pm, l, &[Some(parent), Some(newparent), s, t])?;
            self.do_rename(pm, l, parent, name, newparent, newname, flags)
        })
    }

    fn link(
        &mut self,
        pm: &mut dyn Pm,
        _ctx: &Ctx,
        ino: Ino,
        newparent: Ino,
        newname: &[u8],
    ) -> FsResult<Attr> {
        check_name(newname)?;
        request(pm, |pm, l| {
            self.lock_inos(pm, l, &[Some(ino), Some(newparent)])?;
            let mut i = self.iget(pm, ino)?;
            if i.is_dir() {
                return Err(Errno::EPERM);
            }
            if i.nlink == 0 {
                return Err(Errno::ENOENT);
            }
            if i.nlink >= LINK_MAX {
                return Err(Errno::EMLINK);
            }
            let mut d = self.dir(pm, newparent)?;
            if self.dir_find(pm, &mut d, newname)?.is_some() {
                return Err(Errno::EEXIST);
            }
            let named = if pm.site(49) { newparent } else { ino };
            self.dir_add(pm, &mut d, newname, named, i.kind()?)?;
            self.iput(pm, newparent, &d)?;
            i.nlink += 1;
            i.ctime = pm.now();
            if !pm.site(8) {
                self.iput(pm, ino, &i)?;
            }
            i.attr(ino)
        })
    }

    fn symlink(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Attr> {
        if target.is_empty() {
            return Err(Errno::ENOENT);
        }
        if target.len() as u64 >= SYMLINK_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        self.make_node(
            pm,
            ctx,
            parent,
            name,
            libc::S_IFLNK | 0o777,
            false,
            |me, pm, _, i| {
                let t = if pm.site(46) {
                    &target[..target.len() - 1]
                } else {
                    target
                };
                me.write_data(pm, i, 0, t)
            },
        )
    }

    fn readlink(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Vec<u8>> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            let mut i = self.iget(pm, ino)?;
            if i.kind()? != FileKind::Symlink {
                return Err(Errno::EINVAL);
            }
            let n = i.size as usize;
            self.read_data(pm, &mut i, 0, n)
        })
    }

    fn open(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, ino: Ino, _flags: i32) -> FsResult<Fh> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            self.iget(pm, ino)?;
            pm.vref(ino)?;
            Ok(Fh(0))
        })
    }

    fn release(&mut self, pm: &mut dyn Pm, ino: Ino, _fh: Fh) -> FsResult<()> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            let left = if pm.site(5) {
                pm.refs(ino)
            } else {
                pm.vrele(ino)?
            };
            let i = self.iget_raw(pm, ino)?;
            let free_it = if pm.site(31) {
                i.mode != 0 && i.nlink == 0
            } else {
                left == 0 && i.mode != 0 && i.nlink == 0
            };
            if !pm.site(30) && free_it {
                self.ifree(pm, l, ino, i)?;
            }
            Ok(())
        })
    }

    fn readdir(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<DirEntry>> {
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            let mut d = self.dir(pm, ino)?;
            let mut out = Vec::new();
            if offset == 0 {
                out.push(DirEntry {
                    ino,
                    offset: 1,
                    kind: FileKind::Dir,
                    name: b".".to_vec(),
                });
            }
            if offset <= 1 {
                out.push(DirEntry {
                    ino: Ino(u64::from(d.rdev)),
                    offset: 2,
                    kind: FileKind::Dir,
                    name: b"..".to_vec(),
                });
            }
            let first = offset.saturating_sub(2);
            self.scan_dir(pm, &mut d, first, |slot, ino, kind, name| {
                if out.len() >= max {
                    return Some(());
                }
                out.push(DirEntry {
                    ino,
                    offset: slot + 3,
                    kind,
                    name: name.to_vec(),
                });
                None
            })?;
            pm.site(58);
            Ok(out)
        })
    }

    fn statfs(&mut self, pm: &mut dyn Pm) -> FsResult<StatFs> {
        request(pm, |pm, l| {
            l.lock(pm, SUPER_LOCK)?;
            let sb = self.read_super(pm)?;
            let free = pm.free_blocks();
            Ok(StatFs {
                blocks: pm.nblocks(),
                bfree: free,
                bavail: free,
                files: sb.ninodes,
                ffree: sb.free_inodes,
                bsize: pm.block_size() as u32,
                namelen: NAME_MAX as u32,
            })
        })
    }

    fn fsync(&mut self, pm: &mut dyn Pm, ino: Ino, _fh: Fh, _datasync: bool) -> FsResult<()> {
        // A RAM disk: data is in the host's store as soon as a write returns.
        request(pm, |pm, l| {
            self.lock_ino(pm, l, ino)?;
            self.iget(pm, ino)?;
            pm.site(64);
            Ok(())
        })
    }

    fn flush(&mut self, _pm: &mut dyn Pm, _ino: Ino, _fh: Fh) -> FsResult<()> {
        Ok(())
    }

    fn sites(&self) -> &'static [Site] {
        SITES
    }

    fn fsck(&mut self, pm: &mut dyn Pm) -> FsResult<Vec<FsckProblem>> {
        self.check_all(pm)
    }

    /// What the protection manager checks on write-back at levels 1–3: the superblock, inode
    /// slots, directory entries and pointer blocks (file data is opaque).
    fn check_commit(&self, c: &dyn fsapi::CommitView) -> Result<(), String> {
        self.commit_check(c)
    }

    fn layouts(&self) -> Vec<Layout> {
        let Some(g) = self.geo else {
            return Vec::new();
        };
        let kinds = [
            libc::S_IFREG,
            libc::S_IFDIR,
            libc::S_IFLNK,
            libc::S_IFIFO,
            libc::S_IFCHR,
            libc::S_IFBLK,
            libc::S_IFSOCK,
        ]
        .map(u64::from)
        .to_vec();
        let data_or_dir = vec![BlockType::DATA, T_DIR];
        vec![
            Layout {
                ty: T_SUPER,
                name: "superblock",
                record: g.bs,
                live: None,
                checks: vec![
                    Check::OneOf {
                        field: "magic",
                        off: 0,
                        width: 8,
                        mask: u64::MAX,
                        values: vec![MAGIC],
                    },
                    Check::OneOf {
                        field: "version",
                        off: 8,
                        width: 4,
                        mask: u64::MAX,
                        values: vec![u64::from(VERSION)],
                    },
                    Check::Range {
                        field: "inodes",
                        off: 16,
                        width: 8,
                        min: g.ninodes,
                        max: g.ninodes,
                    },
                    Check::Range {
                        field: "free inodes",
                        off: 32,
                        width: 8,
                        min: 0,
                        max: g.ninodes,
                    },
                ],
            },
            Layout {
                ty: T_INODE,
                name: "inode",
                record: INODE_SIZE,
                live: Some((0, 4)),
                checks: vec![
                    Check::OneOf {
                        field: "mode kind",
                        off: 0,
                        width: 4,
                        mask: u64::from(libc::S_IFMT),
                        values: kinds,
                    },
                    Check::Range {
                        field: "nlink",
                        off: 4,
                        width: 4,
                        min: 0,
                        max: u64::from(LINK_MAX) + 2,
                    },
                    Check::Range {
                        field: "size",
                        off: 16,
                        width: 8,
                        min: 0,
                        max: g.max_bytes(),
                    },
                    Check::Range {
                        field: "blocks",
                        off: 68,
                        width: 4,
                        min: 0,
                        max: g.nblocks,
                    },
                    Check::BlockRefs {
                        field: "direct",
                        off: 72,
                        n: NDIRECT,
                        types: data_or_dir.clone(),
                    },
                    Check::BlockRefs {
                        field: "indirect",
                        off: 72 + 8 * NDIRECT,
                        n: 3,
                        types: vec![T_PTR],
                    },
                ],
            },
            Layout {
                ty: T_DIR,
                name: "directory entry",
                record: DIRENT_SIZE,
                live: Some((0, 8)),
                checks: vec![
                    Check::Range {
                        field: "ino",
                        off: 0,
                        width: 8,
                        min: 1,
                        max: g.ninodes,
                    },
                    Check::RecordRef {
                        field: "ino",
                        off: 0,
                        width: 8,
                        first_block: 1,
                        per_block: (g.bs / INODE_SIZE) as u64,
                        record: INODE_SIZE,
                        live: (0, 4),
                    },
                    Check::Range {
                        field: "kind",
                        off: 8,
                        width: 1,
                        min: 1,
                        max: 7,
                    },
                    Check::Name {
                        field: "name",
                        len_off: 9,
                        len_width: 1,
                        name_off: 10,
                        max: NAME_MAX,
                    },
                ],
            },
            Layout {
                ty: T_PTR,
                name: "pointer block",
                record: g.bs,
                live: None,
                checks: vec![Check::BlockRefs {
                    field: "pointer",
                    off: 0,
                    n: g.bs / 8,
                    types: vec![T_PTR, BlockType::DATA, T_DIR],
                }],
            },
        ]
    }
}

#[cfg(test)]
mod tests;
