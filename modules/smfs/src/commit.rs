//! The commit check: an incremental `fsck` of what one request changed, run by the host when
//! the request ends and before the change becomes permanent ([`fsapi::Module::check_commit`]).
//!
//! Most faults of issue 6's campaign that do not crash leave a well-formed but wrong update (a
//! link count not changed, a block dropped but not freed, a size not set, an inode written into
//! its neighbour's slot). Per-record checks cannot see those; `fsck` can, but it reads the whole
//! store. This check sees what `fsck` would, for the part of the structure the request could
//! have changed: SMFS takes the lock of every inode whose slot, blocks or entries it changes
//! (see the crate documentation), and the host reports those locks. So the check compares the
//! store before and after the request over the locked inodes only, and requires everything
//! else to be unchanged:
//!
//! - the superblock changes only under its lock, keeps its geometry and checksum, and its free
//!   inode count moves by exactly the inodes freed minus those allocated;
//! - inode slots change only for locked inodes; a used inode is well formed, a free one holds
//!   nothing, and one with no link is still open;
//! - block trees, compared before and after (below a last-level pointer block the request did
//!   not write nothing changed, so a file costs its upper pointer blocks): every newly
//!   referenced block was allocated by this request,
//!   every block it allocated is referenced, every dropped block is freed and every freed block
//!   was dropped; `nblk` moves by the blocks added minus dropped; no data block is added at or
//!   beyond the size, none is dropped below it, a shrink drops everything past the new size; a
//!   directory has no holes;
//! - directory entries, compared slot by slot: a new entry is well formed, names a used inode of
//!   its kind, and its name is unique in the directory; a directory it names has it as parent;
//! - link counts move with the names: a file's by the entries added minus removed, a directory's
//!   by its subdirectories added minus removed (and 2 when it is made or removed), and a
//!   directory is named exactly while it is alive.
//!
//! Writes into data blocks whose mapping did not change are attributed to a locked inode by
//! walking the locked files' trees, up to [`ATTRIBUTION_LIMIT`] blocks (beyond that they go
//! unchecked: the cost would be the whole file's tree on every write).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use fsapi::{BlockNo, CommitView, FileKind};

use crate::{
    DIRENT_SIZE, Geometry, INODE_SIZE, Inode, MAGIC, NAME_MAX, NDIRECT, SUPER_LOCK, SYMLINK_MAX,
    Smfs, VERSION, get_u32, get_u64, kind_from_code,
};

/// Files whose trees hold more blocks than this together are not walked to attribute in-place
/// data writes.
pub const ATTRIBUTION_LIMIT: u64 = 16_384;

type Check<T> = Result<T, String>;

fn rd(c: &dyn CommitView, after: bool, b: u64, off: usize, buf: &mut [u8]) -> Check<()> {
    let r = if after {
        c.after(BlockNo(b), off, buf)
    } else {
        c.before(BlockNo(b), off, buf)
    };
    r.map_err(|e| format!("cannot read block {b}: {e:?}"))
}

/// One side (before or after) of a block tree walk.
#[derive(Default)]
struct Tree {
    /// Every block referenced (pointer and data).
    blocks: BTreeSet<u64>,
    /// Data blocks by logical index.
    data: BTreeMap<u64, u64>,
}

/// What changed in one inode's block tree.
#[derive(Default)]
struct TreeDiff {
    added: Tree,
    dropped: Tree,
    /// Pointer blocks present on both sides (walked because the request wrote them).
    kept_ptrs: BTreeSet<u64>,
}

/// One directory entry.
#[derive(Clone, PartialEq, Eq)]
struct Ent {
    ino: u64,
    kind: u8,
    name: Vec<u8>,
}

struct Checker<'c> {
    c: &'c dyn CommitView,
    g: Geometry,
    written: HashSet<u64>,
    /// Whole inode-table blocks read so far, `(after, block)` → bytes.
    itable: HashMap<(bool, u64), Vec<u8>>,
}

impl Checker<'_> {
    fn inode(&mut self, after: bool, ino: u64) -> Check<Inode> {
        let per = (self.g.bs / INODE_SIZE) as u64;
        let blk = 1 + (ino - 1) / per;
        let o = ((ino - 1) % per) as usize * INODE_SIZE;
        if !self.itable.contains_key(&(after, blk)) {
            let mut buf = vec![0u8; self.g.bs];
            rd(self.c, after, blk, 0, &mut buf)?;
            self.itable.insert((after, blk), buf);
        }
        let buf = &self.itable[&(after, blk)];
        let raw: &[u8; INODE_SIZE] = buf[o..o + INODE_SIZE].try_into().expect("slot");
        Ok(Inode::decode(raw))
    }

    fn roots(&self) -> [(u64, u32); NDIRECT + 3] {
        let per = (self.g.bs / 8) as u64;
        let nd = NDIRECT as u64;
        let mut r = [(0u64, 0u32); NDIRECT + 3];
        for (k, slot) in r.iter_mut().enumerate().take(NDIRECT) {
            *slot = (k as u64, 0);
        }
        r[NDIRECT] = (nd, 1);
        r[NDIRECT + 1] = (nd + per, 2);
        r[NDIRECT + 2] = (nd + per + per * per, 3);
        r
    }

    /// Every block of the subtree at `blk` (`level` 0: a data block for logical `base`),
    /// restricted to logical blocks in `[from, to)`.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        after: bool,
        ino: u64,
        blk: u64,
        level: u32,
        base: u64,
        range: (u64, u64),
        out: &mut Tree,
    ) -> Check<()> {
        let per = (self.g.bs / 8) as u64;
        let span = per.pow(level);
        if base >= range.1 || base.saturating_add(span) <= range.0 {
            return Ok(());
        }
        if !self.g.data_blk(blk) {
            return Err(format!(
                "ino {ino}: block pointer {blk} outside the data area"
            ));
        }
        if !out.blocks.insert(blk) {
            return Err(format!("ino {ino}: block {blk} referenced twice"));
        }
        if level == 0 {
            out.data.insert(base, blk);
            return Ok(());
        }
        let mut buf = vec![0u8; self.g.bs];
        rd(self.c, after, blk, 0, &mut buf)?;
        let child_span = per.pow(level - 1);
        for j in 0..per {
            let child = get_u64(&buf, j as usize * 8);
            if child != 0 {
                self.walk(
                    after,
                    ino,
                    child,
                    level - 1,
                    base + j * child_span,
                    range,
                    out,
                )?;
            }
        }
        Ok(())
    }

    /// The whole tree of `i` on one side, restricted to logical blocks in `range`.
    fn tree(&self, after: bool, ino: u64, i: &Inode, range: (u64, u64)) -> Check<Tree> {
        let mut t = Tree::default();
        for (k, (base, level)) in self.roots().into_iter().enumerate() {
            if i.ptr[k] != 0 {
                self.walk(after, ino, i.ptr[k], level, base, range, &mut t)?;
            }
        }
        Ok(t)
    }

    /// Before and after subtrees at one pointer position.
    fn diff_at(
        &self,
        ino: u64,
        b: u64,
        a: u64,
        level: u32,
        base: u64,
        d: &mut TreeDiff,
    ) -> Check<()> {
        let all = (0, u64::MAX);
        if b == a {
            // The same block. A data block's mapping is unchanged. A pointer block the
            // request wrote is compared child by child. One it did not write holds the same
            // children on both sides, but a pointer block below it may have been written:
            // only a last-level pointer block (whose children are data) that was not written
            // is certainly identical, so a file's tree costs its upper pointer blocks only.
            if a == 0 || level == 0 || (level == 1 && !self.written.contains(&a)) {
                return Ok(());
            }
            if !self.g.data_blk(a) {
                return Err(format!(
                    "ino {ino}: block pointer {a} outside the data area"
                ));
            }
            let per = (self.g.bs / 8) as u64;
            let child_span = per.pow(level - 1);
            let mut ab = vec![0u8; self.g.bs];
            rd(self.c, true, a, 0, &mut ab)?;
            let bb = if self.written.contains(&a) {
                d.kept_ptrs.insert(a);
                let mut bb = vec![0u8; self.g.bs];
                rd(self.c, false, a, 0, &mut bb)?;
                bb
            } else {
                ab.clone()
            };
            for j in 0..per as usize {
                let (cb, ca) = (get_u64(&bb, j * 8), get_u64(&ab, j * 8));
                if cb != 0 || ca != 0 {
                    self.diff_at(ino, cb, ca, level - 1, base + j as u64 * child_span, d)?;
                }
            }
            return Ok(());
        }
        if b != 0 {
            self.walk(false, ino, b, level, base, all, &mut d.dropped)?;
        }
        if a != 0 {
            self.walk(true, ino, a, level, base, all, &mut d.added)?;
        }
        Ok(())
    }

    fn diff(&self, ino: u64, ib: &Inode, ia: &Inode) -> Check<TreeDiff> {
        let mut d = TreeDiff::default();
        for (k, (base, level)) in self.roots().into_iter().enumerate() {
            self.diff_at(ino, ib.ptr[k], ia.ptr[k], level, base, &mut d)?;
        }
        Ok(d)
    }

    /// The entries of directory `i` on one side, by slot.
    fn entries(&self, after: bool, ino: u64, i: &Inode) -> Check<BTreeMap<u64, Ent>> {
        let spb = (self.g.bs / DIRENT_SIZE) as u64;
        let n = i.size / DIRENT_SIZE as u64;
        let t = self.tree(after, ino, i, (0, n.div_ceil(spb)))?;
        let mut out = BTreeMap::new();
        let mut buf = vec![0u8; self.g.bs];
        for lbn in 0..n.div_ceil(spb) {
            let Some(&b) = t.data.get(&lbn) else {
                return Err(format!("dir {ino}: hole at logical block {lbn}"));
            };
            rd(self.c, after, b, 0, &mut buf)?;
            for k in 0..spb.min(n - lbn * spb) {
                let o = k as usize * DIRENT_SIZE;
                let e = get_u64(&buf, o);
                if e == 0 {
                    continue;
                }
                let len = (buf[o + 9] as usize).min(NAME_MAX + 1);
                out.insert(
                    lbn * spb + k,
                    Ent {
                        ino: e,
                        kind: buf[o + 8],
                        name: buf[o + 10..(o + 10 + len).min(o + DIRENT_SIZE)].to_vec(),
                    },
                );
            }
        }
        Ok(out)
    }
}

fn used(i: &Inode) -> bool {
    i.mode != 0
}

fn alive(i: &Inode) -> i64 {
    i64::from(used(i) && i.nlink > 0)
}

impl Smfs {
    pub(crate) fn commit_check(&self, c: &dyn CommitView) -> Check<()> {
        let Some(g) = self.geo else {
            return Ok(());
        };
        let written: BTreeSet<u64> = c.written().into_iter().map(|b| b.0).collect();
        let allocated: BTreeSet<u64> = c.allocated().into_iter().map(|b| b.0).collect();
        let freed: BTreeSet<u64> = c.freed().into_iter().map(|b| b.0).collect();
        let locks = c.locks();
        let super_locked = locks.contains(&SUPER_LOCK);
        let locked: BTreeSet<u64> = locks
            .iter()
            .map(|l| l.0)
            .filter(|&l| (1..=g.ninodes).contains(&l))
            .collect();
        let mut k = Checker {
            c,
            g,
            written: written.iter().copied().collect(),
            itable: HashMap::new(),
        };

        // Inode slots: only locked ones may change.
        let per = (g.bs / INODE_SIZE) as u64;
        let mut inode_delta = 0i64; // inodes freed minus allocated
        for &blk in written.range(1..=g.itable_blocks) {
            for s in 0..per {
                let ino = (blk - 1) * per + s + 1;
                if ino > g.ninodes {
                    break;
                }
                let (ib, ia) = (k.inode(false, ino)?, k.inode(true, ino)?);
                if ib == ia {
                    continue;
                }
                if !locked.contains(&ino) {
                    return Err(format!("ino {ino} changed without its lock"));
                }
                inode_delta += i64::from(used(&ib)) - i64::from(used(&ia));
            }
        }

        // The superblock.
        let (mut sb, mut sa) = ([0u8; 64], [0u8; 64]);
        rd(c, false, 0, 0, &mut sb)?;
        rd(c, true, 0, 0, &mut sa)?;
        if sb != sa {
            if !super_locked {
                return Err("superblock changed without its lock".into());
            }
            if get_u64(&sa, 0) != MAGIC
                || get_u32(&sa, 8) != VERSION
                || sa[12..32] != sb[12..32]
                || crc32c::crc32c(&sa[..56]) != get_u32(&sa, 56)
            {
                return Err("superblock: magic, version, geometry or crc changed".into());
            }
        }
        let free_delta = get_u64(&sa, 32) as i64 - get_u64(&sb, 32) as i64;
        if free_delta != inode_delta {
            return Err(format!(
                "superblock: free inodes moved by {free_delta} but {inode_delta} inodes were \
                 freed (net)"
            ));
        }

        // Each locked inode: its record and its block tree.
        let mut added_all: BTreeMap<u64, u64> = BTreeMap::new(); // block -> ino
        let mut dropped_all: BTreeSet<u64> = BTreeSet::new();
        let mut attributed: BTreeSet<u64> = BTreeSet::new();
        let mut nlink_delta: HashMap<u64, i64> = HashMap::new();
        let mut files_nblk = 0u64;
        let mut dirs: Vec<(u64, Inode, Inode)> = Vec::new();
        for &ino in &locked {
            let (ib, ia) = (k.inode(false, ino)?, k.inode(true, ino)?);
            check_record(&g, ino, &ia)?;
            if used(&ia) && ia.nlink == 0 && c.refs(fsapi::Ino(ino)) == 0 {
                return Err(format!("ino {ino}: no link and not open, yet not freed"));
            }
            if ib.nlink != ia.nlink || used(&ib) != used(&ia) {
                nlink_delta.insert(ino, i64::from(ia.nlink) - i64::from(ib.nlink));
            }
            let d = k.diff(ino, &ib, &ia)?;
            let (na, nd) = (d.added.blocks.len() as i64, d.dropped.blocks.len() as i64);
            if i64::from(ia.nblk) - i64::from(ib.nblk) != na - nd {
                return Err(format!(
                    "ino {ino}: nblk {} -> {} but the request added {na} and dropped {nd} blocks",
                    ib.nblk, ia.nblk
                ));
            }
            let (size_b, size_a) = (g.size_blocks(&ib), g.size_blocks(&ia));
            if let Some((l, _)) = d.added.data.range(size_a..).next() {
                return Err(format!(
                    "ino {ino}: data block at logical {l} beyond size {}",
                    ia.size
                ));
            }
            if let Some((l, _)) = d.dropped.data.range(..size_a).next() {
                return Err(format!(
                    "ino {ino}: data block at logical {l} dropped inside size {}",
                    ia.size
                ));
            }
            if size_a < size_b && used(&ia) {
                // Everything past the new size must be gone.
                let kept = k.tree(true, ino, &ia, (size_a, size_b))?;
                if let Some((l, _)) = kept.data.iter().next() {
                    return Err(format!(
                        "ino {ino}: size {} -> {} but data block at logical {l} kept",
                        ib.size, ia.size
                    ));
                }
            }
            for &b in &d.added.blocks {
                if let Some(other) = added_all.insert(b, ino) {
                    return Err(format!("block {b}: added to ino {other} and ino {ino}"));
                }
            }
            dropped_all.extend(d.dropped.blocks.iter().copied());
            attributed.extend(d.added.blocks.iter().chain(&d.dropped.blocks).copied());
            attributed.extend(d.kept_ptrs.iter().copied());
            if used(&ia) && ia.is_dir() || used(&ib) && ib.is_dir() {
                dirs.push((ino, ib, ia));
            } else if used(&ia) {
                files_nblk += u64::from(ia.nblk);
            }
        }

        // Block accounting.
        for (&b, &ino) in &added_all {
            if !allocated.contains(&b) {
                return Err(format!(
                    "block {b}: newly referenced by ino {ino} but not allocated by this request"
                ));
            }
        }
        if let Some(b) = allocated.iter().find(|b| !added_all.contains_key(b)) {
            return Err(format!(
                "block {b}: allocated but referenced by no inode (leak)"
            ));
        }
        if let Some(b) = dropped_all.iter().find(|b| !freed.contains(b)) {
            return Err(format!(
                "block {b}: dropped from its inode but not freed (leak)"
            ));
        }
        if let Some(b) = freed.iter().find(|b| !dropped_all.contains(b)) {
            return Err(format!(
                "block {b}: freed but no locked inode dropped it (still referenced?)"
            ));
        }

        // Directories: entries compared slot by slot.
        let mut names_delta: HashMap<u64, i64> = HashMap::new();
        let mut parent_of: HashMap<u64, u64> = HashMap::new(); // dir named by an added entry
        for (d, ib, ia) in &dirs {
            let eb = if used(ib) && ib.is_dir() {
                k.entries(false, *d, ib)?
            } else {
                BTreeMap::new()
            };
            let ea = if used(ia) && ia.is_dir() {
                k.entries(true, *d, ia)?
            } else {
                BTreeMap::new()
            };
            if used(ia) && ia.is_dir() {
                let spb = (g.bs / DIRENT_SIZE) as u64;
                let t = k.tree(true, *d, ia, (0, u64::MAX))?;
                attributed.extend(t.blocks.iter().copied());
                let need = (ia.size / DIRENT_SIZE as u64).div_ceil(spb);
                if t.data.len() as u64 != need {
                    return Err(format!(
                        "dir {d}: {} data blocks for {need} blocks of entries",
                        t.data.len()
                    ));
                }
            }
            let mut subdirs = 0i64;
            let mut names: HashSet<&[u8]> = HashSet::new();
            for e in ea.values() {
                if !names.insert(&e.name) {
                    return Err(format!(
                        "dir {d}: name {:?} appears twice",
                        String::from_utf8_lossy(&e.name)
                    ));
                }
            }
            for (slot, e) in &eb {
                if ea.get(slot) != Some(e) {
                    *names_delta.entry(e.ino).or_default() -= 1;
                    if kind_from_code(e.kind) == Some(FileKind::Dir) {
                        subdirs -= 1;
                    }
                }
            }
            for (slot, e) in &ea {
                if eb.get(slot) == Some(e) {
                    continue;
                }
                if e.ino == 0 || e.ino > g.ninodes {
                    return Err(format!(
                        "dir {d}: slot {slot} names ino {} out of range",
                        e.ino
                    ));
                }
                if e.name.is_empty()
                    || e.name.len() > NAME_MAX
                    || e.name.contains(&b'/')
                    || e.name.contains(&0)
                {
                    return Err(format!("dir {d}: slot {slot} has a bad name"));
                }
                let t = k.inode(true, e.ino)?;
                if !used(&t) {
                    return Err(format!(
                        "dir {d}: entry {:?} names free inode {}",
                        String::from_utf8_lossy(&e.name),
                        e.ino
                    ));
                }
                let kind = kind_from_code(e.kind);
                if kind.is_none() || kind != FileKind::from_mode(t.mode) {
                    return Err(format!(
                        "dir {d}: entry {:?} kind {:?} but ino {} is {:?}",
                        String::from_utf8_lossy(&e.name),
                        kind,
                        e.ino,
                        FileKind::from_mode(t.mode)
                    ));
                }
                *names_delta.entry(e.ino).or_default() += 1;
                if t.is_dir() {
                    subdirs += 1;
                    if u64::from(t.rdev) != *d {
                        return Err(format!(
                            "dir {}: named in dir {d} but its parent (rdev) is {}",
                            e.ino, t.rdev
                        ));
                    }
                    parent_of.insert(e.ino, *d);
                }
            }
            let want = subdirs + 2 * (alive(ia) - alive(ib));
            let got = i64::from(ia.nlink) - i64::from(ib.nlink);
            if used(ia) && ia.is_dir() && got != want {
                return Err(format!(
                    "dir {d}: link count {} -> {} but {subdirs:+} subdirectories",
                    ib.nlink, ia.nlink
                ));
            }
        }

        // Link counts move with the names.
        let mut touched: BTreeSet<u64> = names_delta.keys().copied().collect();
        touched.extend(nlink_delta.keys().copied());
        for ino in touched {
            let (ib, ia) = (k.inode(false, ino)?, k.inode(true, ino)?);
            let names = names_delta.get(&ino).copied().unwrap_or(0);
            let is_dir = (used(&ia) && ia.is_dir()) || (used(&ib) && ib.is_dir());
            if is_dir {
                if names != alive(&ia) - alive(&ib) {
                    return Err(format!(
                        "dir {ino}: {names:+} entries name it but it went from {} to {} links",
                        ib.nlink, ia.nlink
                    ));
                }
                if used(&ia)
                    && ia.rdev != ib.rdev
                    && parent_of.get(&ino) != Some(&u64::from(ia.rdev))
                {
                    return Err(format!(
                        "dir {ino}: parent (rdev) {} -> {} but no new entry there names it",
                        ib.rdev, ia.rdev
                    ));
                }
            } else {
                let links = i64::from(ia.nlink) - i64::from(ib.nlink);
                if links != names {
                    return Err(format!(
                        "ino {ino}: link count {} -> {} but {names:+} entries name it",
                        ib.nlink, ia.nlink
                    ));
                }
            }
        }

        // Writes to data blocks whose mapping did not change belong to a locked inode.
        let stray: Vec<u64> = written
            .iter()
            .copied()
            .filter(|&b| g.data_blk(b) && !attributed.contains(&b))
            .collect();
        if !stray.is_empty() && files_nblk <= ATTRIBUTION_LIMIT {
            let mut owned = BTreeSet::new();
            for &ino in &locked {
                let ia = k.inode(true, ino)?;
                if used(&ia) && !ia.is_dir() {
                    owned.extend(k.tree(true, ino, &ia, (0, u64::MAX))?.blocks);
                }
            }
            if let Some(b) = stray.iter().find(|b| !owned.contains(b)) {
                return Err(format!("block {b} written but owned by no locked inode"));
            }
        }
        Ok(())
    }
}

/// A record as the request leaves it: a used inode well formed, a free one empty.
fn check_record(g: &Geometry, ino: u64, i: &Inode) -> Check<()> {
    if !used(i) {
        if i.ptr.iter().any(|p| *p != 0) || i.nblk != 0 || i.nlink != 0 || i.size != 0 {
            return Err(format!("ino {ino}: free but holds blocks, links or a size"));
        }
        return Ok(());
    }
    let Some(kind) = FileKind::from_mode(i.mode) else {
        return Err(format!("ino {ino}: invalid mode {:#o}", i.mode));
    };
    if i.size > g.max_bytes() {
        return Err(format!(
            "ino {ino}: size {} beyond the largest file",
            i.size
        ));
    }
    match kind {
        FileKind::Dir => {
            if !i.size.is_multiple_of(DIRENT_SIZE as u64) {
                return Err(format!("dir {ino}: size {} not whole entries", i.size));
            }
            if i.rdev == 0 || u64::from(i.rdev) > g.ninodes {
                return Err(format!("dir {ino}: parent (rdev) {} out of range", i.rdev));
            }
        }
        FileKind::Symlink if i.size == 0 || i.size >= SYMLINK_MAX => {
            return Err(format!("ino {ino}: symlink size {}", i.size));
        }
        _ => {}
    }
    Ok(())
}
