//! `fsck`: the read-only whole-structure check (runs with no request in flight).
//!
//! What it checks: the superblock (magic, version, block size, geometry, crc, counts); every
//! inode (a free one holds nothing; a used one has a valid mode, a size within the largest
//! file, every block pointer inside the store and outside the superblock and inode table, no
//! block referenced twice in the whole store, no block beyond the size, `nblk` equal to the
//! blocks it holds, a directory has no holes); every directory entry (inode in range and used,
//! kind equal to the inode's, name 1..=255 bytes without `/` or NUL, names unique in their
//! directory); the namespace (every directory reachable from the root and named exactly once,
//! so no cycles, its `rdev` naming the directory that names it; the root named by nobody);
//! link counts (a file's = the entries naming it, a directory's = 2 + its subdirectories); an
//! unnamed inode with no link must be open (it is freed on the last release); the free-inode
//! count; and block accounting: the store's free blocks must equal all blocks minus the
//! metadata blocks and the blocks referenced (the difference is reported as a leak or as
//! blocks in use that the store counts free).

use std::collections::{HashMap, HashSet};

use fsapi::{BlockNo, FileKind, FsResult, FsckProblem, Ino, Pm};

use crate::{
    DIRENT_SIZE, Geometry, INODE_SIZE, Inode, MAGIC, NAME_MAX, NDIRECT, SYMLINK_MAX, Smfs, VERSION,
    get_u32, get_u64, kind_from_code,
};

/// More problems than this are summarized (a wrecked store would list every block).
const MAX_PROBLEMS: usize = 1000;

struct Report {
    problems: Vec<FsckProblem>,
    dropped: usize,
}

impl Report {
    fn add(&mut self, p: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        } else {
            self.dropped += 1;
        }
    }
}

/// One used directory entry.
struct Entry {
    ino: u64,
    kind: Option<FileKind>,
    name: Vec<u8>,
}

impl Smfs {
    pub(crate) fn check_all(&mut self, pm: &mut dyn Pm) -> FsResult<Vec<FsckProblem>> {
        let mut r = Report {
            problems: Vec::new(),
            dropped: 0,
        };
        let Some((g, free_inodes)) = self.fsck_super(pm, &mut r)? else {
            return Ok(r.problems);
        };
        // Check with the geometry the superblock declares.
        let saved = self.geo.replace(g);
        let res = self.fsck_body(pm, &mut r, g, free_inodes);
        self.geo = saved.or(Some(g));
        res?;
        if r.dropped > 0 {
            r.problems
                .push(format!("... and {} more problems", r.dropped));
        }
        Ok(r.problems)
    }

    /// The superblock's own checks; its geometry and free-inode count if usable.
    fn fsck_super(&self, pm: &mut dyn Pm, r: &mut Report) -> FsResult<Option<(Geometry, u64)>> {
        let mut b = [0u8; 64];
        pm.bread(BlockNo(0), 0, &mut b)?;
        let bs = pm.block_size();
        let nblocks = pm.nblocks();
        if get_u64(&b, 0) != MAGIC {
            r.add(format!("superblock: bad magic {:#x}", get_u64(&b, 0)));
        }
        if get_u32(&b, 8) != VERSION {
            r.add(format!("superblock: bad version {}", get_u32(&b, 8)));
        }
        if get_u32(&b, 12) as usize != bs {
            r.add(format!(
                "superblock: block size {} but the store's is {bs}",
                get_u32(&b, 12)
            ));
        }
        if crc32c::crc32c(&b[..56]) != get_u32(&b, 56) {
            r.add("superblock: crc mismatch".to_string());
        }
        let ninodes = get_u64(&b, 16);
        let itable_blocks = get_u64(&b, 24);
        let free_inodes = get_u64(&b, 32);
        let hint = get_u64(&b, 40);
        let per = (bs / INODE_SIZE) as u64;
        let geometry_ok = ninodes > 0
            && ninodes < u64::from(u32::MAX)
            && itable_blocks == ninodes.div_ceil(per)
            && itable_blocks < nblocks;
        if !geometry_ok {
            r.add(format!(
                "superblock: geometry unusable ({ninodes} inodes in {itable_blocks} blocks of \
                 {nblocks})"
            ));
            // Fall back on the geometry this module attached with, if any.
            return Ok(self.geo.map(|g| (g, u64::MAX)));
        }
        if free_inodes > ninodes {
            r.add(format!(
                "superblock: free inodes {free_inodes} > {ninodes} inodes"
            ));
        }
        if hint == 0 || hint > ninodes {
            r.add(format!("superblock: allocation hint {hint} out of range"));
        }
        Ok(Some((
            Geometry {
                bs,
                ninodes,
                itable_blocks,
                nblocks,
            },
            free_inodes,
        )))
    }

    fn fsck_body(
        &mut self,
        pm: &mut dyn Pm,
        r: &mut Report,
        g: Geometry,
        sb_free: u64,
    ) -> FsResult<()> {
        // Pass 1: every inode and its blocks.
        let mut inodes: Vec<Option<Inode>> = vec![None; g.ninodes as usize + 1];
        let mut owner: HashMap<u64, u64> = HashMap::new();
        let mut free = 0u64;
        // Each directory's data blocks, by logical index.
        let mut dir_data: HashMap<u64, HashMap<u64, u64>> = HashMap::new();
        let per = (g.bs / INODE_SIZE) as u64;
        let mut buf = vec![0u8; g.bs];
        for blk in 0..g.itable_blocks {
            pm.bread(BlockNo(1 + blk), 0, &mut buf)?;
            for k in 0..per {
                let ino = blk * per + k + 1;
                if ino > g.ninodes {
                    break;
                }
                let o = k as usize * INODE_SIZE;
                let raw: &[u8; INODE_SIZE] = buf[o..o + INODE_SIZE].try_into().expect("slot");
                let i = Inode::decode(raw);
                if i.mode == 0 {
                    free += 1;
                    if i.ptr.iter().any(|p| *p != 0) || i.nblk != 0 || i.nlink != 0 || i.size != 0 {
                        r.add(format!("ino {ino}: free but holds blocks, links or a size"));
                    }
                    continue;
                }
                let data = self.fsck_inode(pm, r, g, ino, &i, &mut owner)?;
                if i.is_dir() {
                    dir_data.insert(ino, data);
                }
                inodes[ino as usize] = Some(i);
            }
        }
        if sb_free != u64::MAX && free != sb_free {
            r.add(format!(
                "superblock: free inodes {sb_free} but {free} inodes are free"
            ));
        }

        // Pass 2: directories, names, reachability, link counts.
        let mut names: HashMap<u64, u32> = HashMap::new(); // entries naming each inode
        let mut named_by: HashMap<u64, u64> = HashMap::new(); // a directory's naming parent
        let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
        for ino in 1..=g.ninodes {
            let Some(d) = inodes[ino as usize] else {
                continue;
            };
            if !d.is_dir() {
                continue;
            }
            let blocks = dir_data.remove(&ino).unwrap_or_default();
            let entries = Self::fsck_entries(pm, r, g, ino, &d, &blocks)?;
            let mut seen: HashSet<Vec<u8>> = HashSet::new();
            let mut subdirs = 0u32;
            for e in entries {
                if !seen.insert(e.name.clone()) {
                    r.add(format!(
                        "dir {ino}: name {:?} appears twice",
                        String::from_utf8_lossy(&e.name)
                    ));
                }
                let Some(t) = inodes.get(e.ino as usize).copied().flatten() else {
                    r.add(format!(
                        "dir {ino}: entry {:?} names free inode {}",
                        String::from_utf8_lossy(&e.name),
                        e.ino
                    ));
                    continue;
                };
                if e.kind != FileKind::from_mode(t.mode) {
                    r.add(format!(
                        "dir {ino}: entry {:?} kind {:?} but ino {} is {:?}",
                        String::from_utf8_lossy(&e.name),
                        e.kind,
                        e.ino,
                        FileKind::from_mode(t.mode)
                    ));
                }
                *names.entry(e.ino).or_default() += 1;
                if t.is_dir() {
                    subdirs += 1;
                    children.entry(ino).or_default().push(e.ino);
                    if named_by.insert(e.ino, ino).is_some() {
                        r.add(format!("dir {}: named by more than one entry", e.ino));
                    }
                    if u64::from(t.rdev) != ino {
                        r.add(format!(
                            "dir {}: parent (rdev) {} but named in dir {ino}",
                            e.ino, t.rdev
                        ));
                    }
                }
            }
            if d.nlink != 0 && d.nlink != 2 + subdirs {
                r.add(format!(
                    "dir {ino}: link count {} but 2 + {subdirs} subdirectories",
                    d.nlink
                ));
            }
        }
        // Root: a directory, its own parent, named by nobody.
        match inodes.get(1).copied().flatten() {
            Some(root) if root.is_dir() => {
                if root.rdev != 1 {
                    r.add(format!("ino 1: root's parent (rdev) is {}", root.rdev));
                }
            }
            _ => r.add("ino 1: root is not a used directory".to_string()),
        }
        if names.contains_key(&1) {
            r.add("ino 1: root is named by a directory entry (cycle)".to_string());
        }
        // Reachability from the root (each directory is named once, so this also finds every
        // cycle: a cycle is either unreachable or makes some directory named twice).
        let mut reached: HashSet<u64> = HashSet::from([1]);
        let mut stack = vec![1u64];
        while let Some(d) = stack.pop() {
            for c in children.get(&d).into_iter().flatten() {
                if reached.insert(*c) {
                    stack.push(*c);
                }
            }
        }
        for ino in 1..=g.ninodes {
            let Some(i) = inodes[ino as usize] else {
                continue;
            };
            let n = names.get(&ino).copied().unwrap_or(0);
            if i.is_dir() {
                if i.nlink != 0 && !reached.contains(&ino) {
                    r.add(format!("dir {ino}: not reachable from the root"));
                }
                if ino != 1 && i.nlink != 0 && n == 0 {
                    r.add(format!(
                        "dir {ino}: link count {} but no entry names it",
                        i.nlink
                    ));
                }
                if i.nlink == 0 && n > 0 {
                    r.add(format!("dir {ino}: link count 0 but {n} entries name it"));
                }
            } else if i.nlink != n {
                r.add(format!(
                    "ino {ino}: link count {} but {n} entries name it",
                    i.nlink
                ));
            }
            if i.nlink == 0 && n == 0 && pm.refs(Ino(ino)) == 0 {
                r.add(format!("ino {ino}: orphan (no link, not open) never freed"));
            }
        }

        // Block accounting.
        let meta = 1 + g.itable_blocks;
        let referenced = owner.len() as u64;
        let expected_free = g.nblocks.saturating_sub(meta + referenced);
        let got = pm.free_blocks();
        if got < expected_free {
            r.add(format!(
                "blocks: {} allocated but referenced by no inode (leak)",
                expected_free - got
            ));
        } else if got > expected_free {
            r.add(format!(
                "blocks: {} referenced blocks are free in the store (use after free)",
                got - expected_free
            ));
        }
        Ok(())
    }

    /// One used inode: its fields and its block tree (recorded in `owner`).
    fn fsck_inode(
        &self,
        pm: &mut dyn Pm,
        r: &mut Report,
        g: Geometry,
        ino: u64,
        i: &Inode,
        owner: &mut HashMap<u64, u64>,
    ) -> FsResult<HashMap<u64, u64>> {
        let Some(kind) = FileKind::from_mode(i.mode) else {
            r.add(format!("ino {ino}: invalid mode {:#o}", i.mode));
            return Ok(HashMap::new());
        };
        if i.size > g.max_bytes() {
            r.add(format!(
                "ino {ino}: size {} beyond the largest file",
                i.size
            ));
        }
        match kind {
            FileKind::Dir => {
                if !i.size.is_multiple_of(DIRENT_SIZE as u64) {
                    r.add(format!("dir {ino}: size {} not whole entries", i.size));
                }
                if i.rdev == 0 || u64::from(i.rdev) > g.ninodes {
                    r.add(format!("dir {ino}: parent (rdev) {} out of range", i.rdev));
                }
            }
            FileKind::Symlink if i.size == 0 || i.size >= SYMLINK_MAX => {
                r.add(format!("ino {ino}: symlink size {}", i.size));
            }
            _ => {}
        }
        let per = (g.bs / 8) as u64;
        let nd = NDIRECT as u64;
        // The logical blocks each root covers: (first lbn, level).
        let roots = [(nd, 1u32), (nd + per, 2u32), (nd + per + per * per, 3u32)];
        let size_blocks = g.size_blocks(i);
        let mut count = 0u64;
        let mut data: Vec<(u64, u64)> = Vec::new();
        for (k, p) in i.ptr.iter().enumerate() {
            if *p == 0 {
                continue;
            }
            let (base, level) = if k < NDIRECT {
                (k as u64, 0)
            } else {
                roots[k - NDIRECT]
            };
            self.fsck_tree(pm, r, g, ino, *p, level, base, owner, &mut count, &mut data)?;
        }
        if let Some((l, _)) = data.iter().find(|(l, _)| *l >= size_blocks) {
            r.add(format!(
                "ino {ino}: block at logical {l} beyond size {}",
                i.size
            ));
        }
        if count != u64::from(i.nblk) {
            r.add(format!(
                "ino {ino}: nblk {} but {count} blocks referenced",
                i.nblk
            ));
        }
        if kind == FileKind::Dir {
            let have: HashSet<u64> = data.iter().map(|(l, _)| *l).collect();
            if (0..size_blocks).any(|l| !have.contains(&l)) {
                r.add(format!("dir {ino}: hole in its entries"));
            }
        }
        Ok(data.into_iter().collect())
    }

    /// Walks the subtree at `blk` (`level` 0: a data block for logical block `base`).
    #[allow(clippy::too_many_arguments)]
    fn fsck_tree(
        &self,
        pm: &mut dyn Pm,
        r: &mut Report,
        g: Geometry,
        ino: u64,
        blk: u64,
        level: u32,
        base: u64,
        owner: &mut HashMap<u64, u64>,
        count: &mut u64,
        data: &mut Vec<(u64, u64)>,
    ) -> FsResult<()> {
        if !g.data_blk(blk) {
            let what = if blk >= g.nblocks {
                "outside the store"
            } else {
                "into the superblock or inode table"
            };
            r.add(format!("ino {ino}: block pointer {blk} {what}"));
            return Ok(());
        }
        if let Some(prev) = owner.insert(blk, ino) {
            r.add(format!(
                "block {blk}: referenced twice (ino {prev} and ino {ino})"
            ));
            return Ok(());
        }
        *count += 1;
        if level == 0 {
            data.push((base, blk));
            return Ok(());
        }
        let per = (g.bs / 8) as u64;
        let span = per.pow(level - 1);
        let mut buf = vec![0u8; g.bs];
        pm.bread(BlockNo(blk), 0, &mut buf)?;
        for j in 0..per {
            let child = get_u64(&buf, j as usize * 8);
            if child != 0 {
                self.fsck_tree(
                    pm,
                    r,
                    g,
                    ino,
                    child,
                    level - 1,
                    base + j * span,
                    owner,
                    count,
                    data,
                )?;
            }
        }
        Ok(())
    }

    /// The used entries of directory `ino` (data blocks `blocks` by logical index), each
    /// checked for form.
    fn fsck_entries(
        pm: &mut dyn Pm,
        r: &mut Report,
        g: Geometry,
        ino: u64,
        d: &Inode,
        blocks: &HashMap<u64, u64>,
    ) -> FsResult<Vec<Entry>> {
        let spb = (g.bs / DIRENT_SIZE) as u64;
        let n = d.size / DIRENT_SIZE as u64;
        let mut out = Vec::new();
        let mut buf = vec![0u8; g.bs];
        for lbn in 0..n.div_ceil(spb) {
            // Holes and bad pointers were reported with the inode.
            let Some(&b) = blocks.get(&lbn) else {
                continue;
            };
            pm.bread(BlockNo(b), 0, &mut buf)?;
            for k in 0..spb.min(n - lbn * spb) {
                let o = k as usize * DIRENT_SIZE;
                let e = get_u64(&buf, o);
                if e == 0 {
                    continue;
                }
                let slot = lbn * spb + k;
                let len = buf[o + 9] as usize;
                let name = buf[o + 10..o + 10 + len].to_vec();
                let kind = kind_from_code(buf[o + 8]);
                if e > g.ninodes {
                    r.add(format!("dir {ino}: slot {slot} names ino {e} out of range"));
                    continue;
                }
                if len == 0 || len > NAME_MAX || name.contains(&b'/') || name.contains(&0) {
                    r.add(format!(
                        "dir {ino}: slot {slot} has a bad name (length {len})"
                    ));
                    continue;
                }
                if kind.is_none() {
                    r.add(format!(
                        "dir {ino}: slot {slot} has a bad kind code {}",
                        buf[o + 8]
                    ));
                }
                out.push(Entry { ino: e, kind, name });
            }
        }
        Ok(out)
    }
}
