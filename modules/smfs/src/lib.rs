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
//!   blocks, and pointer blocks (4 direct pointers, one indirect, one double, one triple indirect; 0 is a
//!   hole, which is how sparse files work);
//! - a directory's data is an array of 272-byte entries (ino, kind, name length, name); ino 0
//!   is a free slot. `.` and `..` are not stored: a directory keeps its parent in `rdev`.
//!
//! Locking: namespace operations take the parent directory's lock (and a file-system-wide
//! rename lock for rename) through the protection manager, so the host sees them and can
//! release them if the module dies mid-request.
#![forbid(unsafe_code)]

use fsapi::{
    Attr, BlockNo, Ctx, DirEntry, Errno, Fh, FileKind, FsResult, Ino, LockId, Module, Pm,
    RENAME_EXCHANGE, RENAME_NOREPLACE, SetAttr, StatFs, TimeSet, Timespec,
};

const MAGIC: u64 = 0x534d_4653_0000_0001; // "SMFS" v1
const VERSION: u32 = 1;
const INODE_SIZE: usize = 128;
const NDIRECT: usize = 4;
const DIRENT_SIZE: usize = 272;
const NAME_MAX: usize = 255;
const LINK_MAX: u32 = 32_000;
/// Lock id for "the namespace is being renamed": keeps the ancestor relation stable.
const RENAME_LOCK: LockId = LockId(u64::MAX);

/// The SMFS module. Holds only geometry read from the superblock.
#[derive(Debug, Default)]
pub struct Smfs {
    geo: Option<Geometry>,
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    bs: usize,
    ninodes: u64,
}

/// Superblock fields that change at run time.
#[derive(Debug, Clone, Copy)]
struct Super {
    ninodes: u64,
    itable_blocks: u64,
    free_inodes: u64,
    hint: u64,
}

#[derive(Debug, Clone, Copy, Default)]
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

/// Runs `f` holding lock `l`; the lock is released whatever `f` returns. (If the module dies
/// inside `f`, the host releases it while rolling back.)
fn locked<T>(
    pm: &mut dyn Pm,
    l: LockId,
    f: impl FnOnce(&mut dyn Pm) -> FsResult<T>,
) -> FsResult<T> {
    pm.lock(l)?;
    let r = f(pm);
    pm.unlock(l)?;
    r
}

/// A directory slot found by name.
#[derive(Debug, Clone, Copy)]
struct Found {
    slot: u64,
    ino: Ino,
}

impl Smfs {
    pub fn new() -> Smfs {
        Smfs::default()
    }

    fn geo(&self) -> FsResult<Geometry> {
        self.geo.ok_or(Errno::EIO)
    }

    fn read_super(pm: &mut dyn Pm) -> FsResult<Super> {
        let mut b = [0u8; 64];
        pm.bread(BlockNo(0), 0, &mut b)?;
        if get_u64(&b, 0) != MAGIC || get_u32(&b, 8) != VERSION {
            return Err(Errno::EUCLEAN);
        }
        if crc32c::crc32c(&b[..56]) != get_u32(&b, 56) {
            return Err(Errno::EUCLEAN);
        }
        Ok(Super {
            ninodes: get_u64(&b, 16),
            itable_blocks: get_u64(&b, 24),
            free_inodes: get_u64(&b, 32),
            hint: get_u64(&b, 40),
        })
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

    fn iget_raw(&self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Inode> {
        let (b, off) = self.iloc(ino)?;
        let mut buf = [0u8; INODE_SIZE];
        pm.bread(b, off, &mut buf)?;
        Ok(Inode::decode(&buf))
    }

    /// A live inode (ENOENT for a free one).
    fn iget(&self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Inode> {
        let i = self.iget_raw(pm, ino)?;
        if i.mode == 0 {
            return Err(Errno::ENOENT);
        }
        Ok(i)
    }

    fn iput(&self, pm: &mut dyn Pm, ino: Ino, i: &Inode) -> FsResult<()> {
        let (b, off) = self.iloc(ino)?;
        pm.bwrite(b, off, &i.encode())
    }

    fn ialloc(&self, pm: &mut dyn Pm, mode: u32, ctx: &Ctx) -> FsResult<(Ino, Inode)> {
        let mut sb = Self::read_super(pm)?;
        if sb.free_inodes == 0 {
            return Err(Errno::ENOSPC);
        }
        let n = sb.ninodes;
        for k in 0..n {
            let ino = Ino((sb.hint.saturating_sub(1) + k) % n + 1);
            let old = self.iget_raw(pm, ino)?;
            if old.mode != 0 {
                continue;
            }
            let now = pm.now();
            let i = Inode {
                mode,
                nlink: 1,
                uid: ctx.uid,
                gid: ctx.gid,
                atime: now,
                mtime: now,
                ctime: now,
                generation: old.generation.wrapping_add(1),
                ..Inode::default()
            };
            self.iput(pm, ino, &i)?;
            sb.free_inodes -= 1;
            sb.hint = ino.0 % n + 1;
            Self::write_super(pm, &sb)?;
            return Ok((ino, i));
        }
        Err(Errno::ENOSPC)
    }

    /// Frees an inode and all its blocks.
    fn ifree(&self, pm: &mut dyn Pm, ino: Ino, mut i: Inode) -> FsResult<()> {
        self.trunc_blocks(pm, &mut i, 0)?;
        let freed = Inode {
            generation: i.generation,
            ..Inode::default()
        };
        self.iput(pm, ino, &freed)?;
        let mut sb = Self::read_super(pm)?;
        sb.free_inodes += 1;
        Self::write_super(pm, &sb)
    }

    /// Drops a name's link; frees the node when no name and no open file refer to it.
    fn drop_link(&self, pm: &mut dyn Pm, ino: Ino, mut i: Inode) -> FsResult<()> {
        i.nlink = i.nlink.saturating_sub(if i.is_dir() { i.nlink } else { 1 });
        i.ctime = pm.now();
        if i.nlink == 0 && pm.refs(ino) == 0 {
            self.ifree(pm, ino, i)
        } else {
            self.iput(pm, ino, &i)
        }
    }

    /// Largest file, in blocks (4 KiB blocks: about 512 GiB).
    fn max_blocks(&self) -> FsResult<u64> {
        let per = self.per_ptr()?;
        Ok(NDIRECT as u64 + per + per * per + per * per * per)
    }

    fn per_ptr(&self) -> FsResult<u64> {
        Ok((self.geo()?.bs / 8) as u64)
    }

    fn read_ptr(pm: &mut dyn Pm, b: u64, idx: u64) -> FsResult<u64> {
        let mut buf = [0u8; 8];
        pm.bread(BlockNo(b), idx as usize * 8, &mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    fn alloc_blk(pm: &mut dyn Pm, i: &mut Inode) -> FsResult<u64> {
        let b = pm.get_next_blk()?.0;
        i.nblk += 1;
        Ok(b)
    }

    /// The block holding logical block `lbn` of `i`; allocates the path if `alloc`.
    /// `Ok(None)` is a hole.
    fn bmap(&self, pm: &mut dyn Pm, i: &mut Inode, lbn: u64, alloc: bool) -> FsResult<Option<u64>> {
        let per = self.per_ptr()?;
        let nd = NDIRECT as u64;
        let (root_idx, path): (usize, Vec<u64>) = if lbn < nd {
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
        let mut cur = i.ptr[root_idx];
        if cur == 0 {
            if !alloc {
                return Ok(None);
            }
            cur = Self::alloc_blk(pm, i)?;
            i.ptr[root_idx] = cur;
        }
        for idx in path {
            let mut next = Self::read_ptr(pm, cur, idx)?;
            if next == 0 {
                if !alloc {
                    return Ok(None);
                }
                next = Self::alloc_blk(pm, i)?;
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
            let per = self.per_ptr()?;
            let span = per.pow(level - 1);
            let bs = self.geo()?.bs;
            let mut buf = vec![0u8; bs];
            pm.bread(BlockNo(blk), 0, &mut buf)?;
            let mut changed = false;
            for j in 0..per {
                if (j + 1) * span <= start {
                    continue;
                }
                let child = get_u64(&buf, j as usize * 8);
                if child != 0
                    && self.trunc_tree(pm, i, child, level - 1, start.saturating_sub(j * span))?
                {
                    put_u64(&mut buf, j as usize * 8, 0);
                    changed = true;
                }
            }
            if start > 0 {
                if changed {
                    pm.bwrite(BlockNo(blk), 0, &buf)?;
                }
                return Ok(false);
            }
        } else if start > 0 {
            return Ok(false);
        }
        pm.free_blk(BlockNo(blk))?;
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
            if d as u64 >= from && i.ptr[d] != 0 && self.trunc_tree(pm, i, i.ptr[d], 0, 0)? {
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
        let bs = self.geo()?.bs as u64;
        let max = self.max_blocks()? * bs;
        if size > max {
            return Err(Errno::EFBIG);
        }
        if size < i.size {
            self.trunc_blocks(pm, i, size.div_ceil(bs))?;
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
        if offset >= i.size {
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
            if let Some(b) = self.bmap(pm, i, lbn, false)? {
                pm.bread(BlockNo(b), boff, &mut out[dst..dst + n])?;
            }
            pos += n as u64;
        }
        Ok(out)
    }

    fn write_data(&self, pm: &mut dyn Pm, i: &mut Inode, offset: u64, data: &[u8]) -> FsResult<()> {
        let bs = self.geo()?.bs as u64;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        let max = self.max_blocks()? * bs;
        if end > max {
            return Err(Errno::EFBIG);
        }
        let mut pos = offset;
        while pos < end {
            let lbn = pos / bs;
            let boff = (pos % bs) as usize;
            let n = ((bs - boff as u64).min(end - pos)) as usize;
            let b = self.bmap(pm, i, lbn, true)?.ok_or(Errno::EIO)?;
            let src = (pos - offset) as usize;
            pm.bwrite(BlockNo(b), boff, &data[src..src + n])?;
            pos += n as u64;
        }
        if end > i.size {
            i.size = end;
        }
        Ok(())
    }

    fn slots_per_block(&self) -> FsResult<u64> {
        Ok((self.geo()?.bs / DIRENT_SIZE) as u64)
    }

    fn nslots(&self, d: &Inode) -> u64 {
        d.size / DIRENT_SIZE as u64
    }

    /// Calls `f(slot, ino, kind, name)` for every used slot from `first` on, until it returns
    /// `Some`.
    fn scan_dir<T>(
        &self,
        pm: &mut dyn Pm,
        d: &mut Inode,
        first: u64,
        mut f: impl FnMut(u64, Ino, u8, &[u8]) -> Option<T>,
    ) -> FsResult<Option<T>> {
        let spb = self.slots_per_block()?;
        let n = self.nslots(d);
        let bs = self.geo()?.bs;
        let mut buf = vec![0u8; bs];
        let mut loaded = u64::MAX;
        for slot in first..n {
            let lbn = slot / spb;
            if lbn != loaded {
                match self.bmap(pm, d, lbn, false)? {
                    Some(b) => pm.bread(BlockNo(b), 0, &mut buf)?,
                    None => buf.fill(0),
                }
                loaded = lbn;
            }
            let o = (slot % spb) as usize * DIRENT_SIZE;
            let ino = get_u64(&buf, o);
            if ino == 0 {
                continue;
            }
            let len = (buf[o + 9] as usize).min(NAME_MAX);
            if let Some(t) = f(slot, Ino(ino), buf[o + 8], &buf[o + 10..o + 10 + len]) {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    fn dir_find(&self, pm: &mut dyn Pm, d: &mut Inode, name: &[u8]) -> FsResult<Option<Found>> {
        self.scan_dir(pm, d, 0, |slot, ino, _, n| {
            (n == name).then_some(Found { slot, ino })
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
        pm.bwrite(BlockNo(b), (slot % spb) as usize * DIRENT_SIZE, &e)
    }

    fn clear_slot(&self, pm: &mut dyn Pm, d: &mut Inode, slot: u64) -> FsResult<()> {
        let spb = self.slots_per_block()?;
        let b = self.bmap(pm, d, slot / spb, false)?.ok_or(Errno::EIO)?;
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
        let spb = self.slots_per_block()?;
        let n = self.nslots(d);
        let bs = self.geo()?.bs;
        let mut free = None;
        let mut buf = vec![0u8; bs];
        let mut lbn = 0;
        while lbn * spb < n && free.is_none() {
            match self.bmap(pm, d, lbn, false)? {
                Some(b) => pm.bread(BlockNo(b), 0, &mut buf)?,
                None => buf.fill(0),
            }
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
        if slot == n {
            d.size = (n + 1) * DIRENT_SIZE as u64;
        }
        let now = pm.now();
        d.mtime = now;
        d.ctime = now;
        Ok(())
    }

    fn dir_is_empty(&self, pm: &mut dyn Pm, d: &mut Inode) -> FsResult<bool> {
        Ok(self.scan_dir(pm, d, 0, |_, _, _, _| Some(()))?.is_none())
    }

    fn dir(&self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Inode> {
        let d = self.iget(pm, ino)?;
        if !d.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok(d)
    }

    /// Creates a node of `mode` named `name` in `parent`; `fill` sets kind-specific fields.
    fn make_node(
        &self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        fill: impl FnOnce(&Self, &mut dyn Pm, Ino, &mut Inode) -> FsResult<()>,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let kind = FileKind::from_mode(mode).ok_or(Errno::EINVAL)?;
        locked(pm, LockId(parent.0), |pm| {
            let mut d = self.dir(pm, parent)?;
            if d.nlink == 0 {
                return Err(Errno::ENOENT);
            }
            if self.dir_find(pm, &mut d, name)?.is_some() {
                return Err(Errno::EEXIST);
            }
            if kind == FileKind::Dir && d.nlink >= LINK_MAX {
                return Err(Errno::EMLINK);
            }
            let mut mode = mode;
            let mut c = *ctx;
            if d.mode & libc::S_ISGID != 0 {
                c.gid = d.gid;
                if kind == FileKind::Dir {
                    mode |= libc::S_ISGID;
                }
            }
            let (ino, mut i) = self.ialloc(pm, mode, &c)?;
            fill(self, pm, ino, &mut i)?;
            if kind == FileKind::Dir {
                i.nlink = 2;
                i.rdev = parent.0 as u32;
                d.nlink += 1;
            }
            self.iput(pm, ino, &i)?;
            self.dir_add(pm, &mut d, name, ino, kind)?;
            self.iput(pm, parent, &d)?;
            i.attr(ino)
        })
    }

    fn remove(&self, pm: &mut dyn Pm, parent: Ino, name: &[u8], want_dir: bool) -> FsResult<()> {
        check_name(name)?;
        locked(pm, LockId(parent.0), |pm| {
            let mut d = self.dir(pm, parent)?;
            let f = self.dir_find(pm, &mut d, name)?.ok_or(Errno::ENOENT)?;
            let mut i = self.iget(pm, f.ino)?;
            if want_dir {
                if !i.is_dir() {
                    return Err(Errno::ENOTDIR);
                }
                if !self.dir_is_empty(pm, &mut i)? {
                    return Err(Errno::ENOTEMPTY);
                }
                d.nlink -= 1;
            } else if i.is_dir() {
                return Err(Errno::EISDIR);
            }
            self.clear_slot(pm, &mut d, f.slot)?;
            let now = pm.now();
            d.mtime = now;
            d.ctime = now;
            self.iput(pm, parent, &d)?;
            i.ctime = now;
            self.drop_link(pm, f.ino, i)
        })
    }

    fn do_rename(
        &self,
        pm: &mut dyn Pm,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        if flags & RENAME_EXCHANGE != 0 || flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL);
        }
        let mut d1 = self.dir(pm, parent)?;
        let src = self.dir_find(pm, &mut d1, name)?.ok_or(Errno::ENOENT)?;
        let mut si = self.iget(pm, src.ino)?;
        let kind = si.kind()?;
        let same_dir = parent == newparent;
        let mut d2 = if same_dir {
            d1
        } else {
            self.dir(pm, newparent)?
        };
        let dst = self.dir_find(pm, &mut d2, newname)?;
        let now = pm.now();
        if let Some(t) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(Errno::EEXIST);
            }
            if t.ino == src.ino {
                return Ok(());
            }
            let mut ti = self.iget(pm, t.ino)?;
            match (si.is_dir(), ti.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) => {
                    if !self.dir_is_empty(pm, &mut ti)? {
                        return Err(Errno::ENOTEMPTY);
                    }
                    d2.nlink -= 1;
                }
                (false, false) => {}
            }
            // Reuse the target's slot: the name never disappears, as rename(2) promises.
            self.write_slot(pm, &mut d2, t.slot, src.ino, kind, newname)?;
            ti.ctime = now;
            self.drop_link(pm, t.ino, ti)?;
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
        if si.is_dir() && !same_dir {
            si.rdev = newparent.0 as u32;
            d1.nlink -= 1;
            d2.nlink += 1;
        }
        si.ctime = now;
        self.iput(pm, src.ino, &si)?;
        d1.mtime = now;
        d1.ctime = now;
        d2.mtime = now;
        d2.ctime = now;
        if same_dir {
            self.iput(pm, parent, &d1)?;
        } else {
            self.iput(pm, parent, &d1)?;
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

fn kind_from_code(c: u8) -> FileKind {
    match c {
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        4 => FileKind::Fifo,
        5 => FileKind::CharDev,
        6 => FileKind::BlockDev,
        7 => FileKind::Socket,
        _ => FileKind::File,
    }
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
            let got = pm.get_next_blk()?;
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
        self.geo = Some(Geometry { bs, ninodes });
        let root_ctx = Ctx {
            uid: 0,
            gid: 0,
            pid: 0,
        };
        let (ino, mut root) = self.ialloc(pm, libc::S_IFDIR | 0o755, &root_ctx)?;
        if ino != Ino::ROOT {
            return Err(Errno::EIO);
        }
        root.nlink = 2;
        root.rdev = Ino::ROOT.0 as u32;
        self.iput(pm, ino, &root)
    }

    fn attach(&mut self, pm: &mut dyn Pm) -> FsResult<()> {
        let sb = Self::read_super(pm)?;
        let bs = pm.block_size();
        if sb.itable_blocks != sb.ninodes.div_ceil((bs / INODE_SIZE) as u64)
            || sb.itable_blocks >= pm.nblocks()
        {
            return Err(Errno::EUCLEAN);
        }
        self.geo = Some(Geometry {
            bs,
            ninodes: sb.ninodes,
        });
        Ok(())
    }

    fn lookup(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut d = self.dir(pm, parent)?;
        let ino = match name {
            b"." => parent,
            b".." => Ino(u64::from(d.rdev)),
            _ => self.dir_find(pm, &mut d, name)?.ok_or(Errno::ENOENT)?.ino,
        };
        self.iget(pm, ino)?.attr(ino)
    }

    fn getattr(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Attr> {
        self.iget(pm, ino)?.attr(ino)
    }

    fn setattr(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, ino: Ino, set: &SetAttr) -> FsResult<Attr> {
        locked(pm, LockId(ino.0), |pm| {
            let mut i = self.iget(pm, ino)?;
            let now = pm.now();
            if let Some(size) = set.size {
                if i.is_dir() {
                    return Err(Errno::EISDIR);
                }
                self.set_size(pm, &mut i, size)?;
                if set.mtime.is_none() {
                    i.mtime = now;
                }
            }
            if let Some(m) = set.mode {
                i.mode = (i.mode & libc::S_IFMT) | (m & 0o7777);
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
        let mut i = self.iget(pm, ino)?;
        if i.is_dir() {
            return Err(Errno::EISDIR);
        }
        self.read_data(pm, &mut i, offset, size as usize)
    }

    fn write(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        _fh: Fh,
        offset: u64,
        data: &[u8],
    ) -> FsResult<u32> {
        locked(pm, LockId(ino.0), |pm| {
            let mut i = self.iget(pm, ino)?;
            if i.is_dir() {
                return Err(Errno::EISDIR);
            }
            self.write_data(pm, &mut i, offset, data)?;
            let now = pm.now();
            i.mtime = now;
            i.ctime = now;
            self.iput(pm, ino, &i)?;
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
        let attr = self.make_node(pm, ctx, parent, name, mode, |_, _, _, _| Ok(()))?;
        pm.vref(attr.ino)?;
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
        self.make_node(pm, ctx, parent, name, mode, |_, _, _, i| {
            i.rdev = rdev;
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
        self.make_node(pm, ctx, parent, name, mode, |_, _, _, _| Ok(()))
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
        locked(pm, RENAME_LOCK, |pm| {
            self.do_rename(pm, parent, name, newparent, newname, flags)
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
        locked(pm, LockId(newparent.0), |pm| {
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
            self.dir_add(pm, &mut d, newname, ino, i.kind()?)?;
            self.iput(pm, newparent, &d)?;
            i.nlink += 1;
            i.ctime = pm.now();
            self.iput(pm, ino, &i)?;
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
        if target.len() >= 4096 {
            return Err(Errno::ENAMETOOLONG);
        }
        self.make_node(
            pm,
            ctx,
            parent,
            name,
            libc::S_IFLNK | 0o777,
            |me, pm, _, i| me.write_data(pm, i, 0, target),
        )
    }

    fn readlink(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Vec<u8>> {
        let mut i = self.iget(pm, ino)?;
        if i.kind()? != FileKind::Symlink {
            return Err(Errno::EINVAL);
        }
        let n = i.size as usize;
        self.read_data(pm, &mut i, 0, n)
    }

    fn open(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, ino: Ino, _flags: i32) -> FsResult<Fh> {
        self.iget(pm, ino)?;
        pm.vref(ino)?;
        Ok(Fh(0))
    }

    fn release(&mut self, pm: &mut dyn Pm, ino: Ino, _fh: Fh) -> FsResult<()> {
        let left = pm.vrele(ino)?;
        let i = self.iget_raw(pm, ino)?;
        if left == 0 && i.mode != 0 && i.nlink == 0 {
            self.ifree(pm, ino, i)?;
        }
        Ok(())
    }

    fn readdir(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<DirEntry>> {
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
                kind: kind_from_code(kind),
                name: name.to_vec(),
            });
            None
        })?;
        Ok(out)
    }

    fn statfs(&mut self, pm: &mut dyn Pm) -> FsResult<StatFs> {
        let sb = Self::read_super(pm)?;
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
    }

    fn fsync(&mut self, pm: &mut dyn Pm, ino: Ino, _fh: Fh, _datasync: bool) -> FsResult<()> {
        // A RAM disk: data is in the host's store as soon as a write returns.
        self.iget(pm, ino).map(drop)
    }

    fn flush(&mut self, _pm: &mut dyn Pm, _ino: Ino, _fh: Fh) -> FsResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
