use fsapi::mem::MemPm;

use super::*;
use fsapi::SiteKind;

fn fresh() -> (Smfs, MemPm) {
    let mut pm = MemPm::new(4096, 2048);
    let mut fs = Smfs::new();
    fs.mkfs(&mut pm).unwrap();
    (fs, pm)
}

const C: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 1,
};

#[test]
fn create_write_read_back_across_reattach() {
    let (mut fs, mut pm) = fresh();
    let (a, fh) = fs
        .create(&mut pm, &C, Ino::ROOT, b"f", 0o644, 0o022, 0)
        .unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    assert_eq!(fs.write(&mut pm, a.ino, fh, 0, &data).unwrap(), 100_000);
    // A new module generation sees the same bytes: nothing lives in the module.
    let mut fs2 = Smfs::new();
    fs2.attach(&mut pm).unwrap();
    let got = fs2.read(&mut pm, a.ino, fh, 0, 200_000).unwrap();
    assert_eq!(got, data);
    assert_eq!(
        fs2.lookup(&mut pm, &C, Ino::ROOT, b"f").unwrap().size,
        100_000
    );
    assert_eq!(pm.held_locks(), 0);
}

#[test]
fn sparse_file_reads_zeros_and_truncate_frees() {
    let (mut fs, mut pm) = fresh();
    let (a, fh) = fs
        .create(&mut pm, &C, Ino::ROOT, b"s", 0o644, 0, 0)
        .unwrap();
    let before = pm.free_blocks();
    fs.write(&mut pm, a.ino, fh, 50 << 20, b"end").unwrap();
    let used = before - pm.free_blocks();
    assert!(used <= 4, "sparse write used {used} blocks");
    let mid = fs.read(&mut pm, a.ino, fh, 1 << 20, 10).unwrap();
    assert_eq!(mid, vec![0; 10]);
    fs.setattr(
        &mut pm,
        &C,
        a.ino,
        &SetAttr {
            size: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(pm.free_blocks(), before);
    fs.write(&mut pm, a.ino, fh, 0, b"abcdef").unwrap();
    fs.setattr(
        &mut pm,
        &C,
        a.ino,
        &SetAttr {
            size: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        &mut pm,
        &C,
        a.ino,
        &SetAttr {
            size: Some(6),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(fs.read(&mut pm, a.ino, fh, 0, 10).unwrap(), b"ab\0\0\0\0");
}

#[test]
fn directories_links_symlinks_rename() {
    let (mut fs, mut pm) = fresh();
    let d = fs.mkdir(&mut pm, &C, Ino::ROOT, b"d", 0o755, 0).unwrap();
    assert_eq!(fs.getattr(&mut pm, Ino::ROOT).unwrap().nlink, 3);
    let (f, _) = fs.create(&mut pm, &C, d.ino, b"f", 0o600, 0, 0).unwrap();
    fs.release(&mut pm, f.ino, Fh(0)).unwrap();
    let l = fs.link(&mut pm, &C, f.ino, Ino::ROOT, b"hard").unwrap();
    assert_eq!(l.nlink, 2);
    let s = fs.symlink(&mut pm, &C, Ino::ROOT, b"sym", b"d/f").unwrap();
    assert_eq!(fs.readlink(&mut pm, s.ino).unwrap(), b"d/f");
    assert_eq!(
        fs.rmdir(&mut pm, &C, Ino::ROOT, b"d"),
        Err(Errno::ENOTEMPTY)
    );
    fs.rename(&mut pm, &C, d.ino, b"f", Ino::ROOT, b"moved", 0)
        .unwrap();
    assert_eq!(fs.lookup(&mut pm, &C, d.ino, b"f"), Err(Errno::ENOENT));
    assert_eq!(
        fs.lookup(&mut pm, &C, Ino::ROOT, b"moved").unwrap().ino,
        f.ino
    );
    // Renaming one hard link onto another of the same node does nothing (POSIX).
    fs.rename(&mut pm, &C, Ino::ROOT, b"moved", Ino::ROOT, b"hard", 0)
        .unwrap();
    assert_eq!(fs.getattr(&mut pm, f.ino).unwrap().nlink, 2);
    // Rename over another node replaces it and drops its link.
    fs.rename(&mut pm, &C, Ino::ROOT, b"moved", Ino::ROOT, b"sym", 0)
        .unwrap();
    assert_eq!(fs.getattr(&mut pm, s.ino), Err(Errno::ENOENT));
    fs.symlink(&mut pm, &C, Ino::ROOT, b"sym2", b"x").unwrap();
    fs.rmdir(&mut pm, &C, Ino::ROOT, b"d").unwrap();
    assert_eq!(fs.getattr(&mut pm, Ino::ROOT).unwrap().nlink, 2);
    let names: Vec<Vec<u8>> = fs
        .readdir(&mut pm, Ino::ROOT, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        vec![
            b".".to_vec(),
            b"..".to_vec(),
            b"hard".to_vec(),
            b"sym".to_vec(),
            b"sym2".to_vec()
        ]
    );
    assert_eq!(
        fs.mkdir(&mut pm, &C, Ino::ROOT, &[b'x'; 256], 0o755, 0),
        Err(Errno::ENAMETOOLONG)
    );
    assert_eq!(pm.held_locks(), 0);
}

#[test]
fn unlinked_open_file_lives_until_release() {
    let (mut fs, mut pm) = fresh();
    let (f, fh) = fs
        .create(&mut pm, &C, Ino::ROOT, b"f", 0o600, 0, 0)
        .unwrap();
    fs.write(&mut pm, f.ino, fh, 0, b"still here").unwrap();
    let free_inodes = fs.statfs(&mut pm).unwrap().ffree;
    fs.unlink(&mut pm, &C, Ino::ROOT, b"f").unwrap();
    assert_eq!(fs.read(&mut pm, f.ino, fh, 0, 100).unwrap(), b"still here");
    fs.release(&mut pm, f.ino, fh).unwrap();
    assert_eq!(fs.getattr(&mut pm, f.ino), Err(Errno::ENOENT));
    assert_eq!(fs.statfs(&mut pm).unwrap().ffree, free_inodes + 1);
}

#[test]
fn many_entries_span_directory_blocks() {
    let (mut fs, mut pm) = fresh();
    for i in 0..100 {
        fs.mknod(
            &mut pm,
            &C,
            Ino::ROOT,
            format!("n{i}").as_bytes(),
            libc::S_IFIFO | 0o644,
            0,
            0,
        )
        .unwrap();
    }
    for i in (0..100).step_by(2) {
        fs.unlink(&mut pm, &C, Ino::ROOT, format!("n{i}").as_bytes())
            .unwrap();
    }
    let mut seen = 0;
    let mut off = 0;
    loop {
        let batch = fs.readdir(&mut pm, Ino::ROOT, off, 7).unwrap();
        let Some(last) = batch.last() else { break };
        off = last.offset;
        seen += batch.len();
    }
    assert_eq!(seen, 52);
}

#[test]
fn files_beyond_2gib_use_the_triple_indirect_block() {
    let (mut fs, mut pm) = fresh();
    let (a, fh) = fs
        .create(&mut pm, &C, Ino::ROOT, b"big", 0o644, 0, 0)
        .unwrap();
    let before = pm.free_blocks();
    fs.write(&mut pm, a.ino, fh, 3 << 30, b"far").unwrap();
    assert_eq!(fs.read(&mut pm, a.ino, fh, 3 << 30, 10).unwrap(), b"far");
    assert_eq!(fs.getattr(&mut pm, a.ino).unwrap().size, (3 << 30) + 3);
    fs.setattr(
        &mut pm,
        &C,
        a.ino,
        &SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        pm.free_blocks(),
        before,
        "truncate freed every pointer block"
    );
}

// ---- Recording protection manager, random workloads ----

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;

/// A `MemPm` that checks, on every call, what the locking contract demands: within one
/// request, each new lock ranks above every lock taken before it (unlock is deferred, so
/// "before" means anywhere earlier in the request); writes to the superblock and inode table
/// are exactly one field set / one inode slot. It also records the fault sites asked about and
/// can arm one. And it records each request's change the way the host does for the commit
/// check (`fsapi::CommitView`): old bytes of every block written, blocks allocated, frees
/// deferred to the end of the request.
struct Rec {
    pm: MemPm,
    /// Locks taken in the current request, in order.
    taken: Vec<LockId>,
    itable_blocks: u64,
    sites: BTreeSet<u32>,
    armed: Option<u32>,
    /// How often the armed site fired.
    hits: u32,
    pre: HashMap<u64, Vec<u8>>,
    born: BTreeSet<u64>,
    fresh: BTreeSet<u64>,
    freed: BTreeSet<u64>,
    written: BTreeSet<u64>,
}

impl Rec {
    fn new(pm: MemPm, itable_blocks: u64) -> Rec {
        Rec {
            pm,
            taken: Vec::new(),
            itable_blocks,
            sites: BTreeSet::new(),
            armed: None,
            hits: 0,
            pre: HashMap::new(),
            born: BTreeSet::new(),
            fresh: BTreeSet::new(),
            freed: BTreeSet::new(),
            written: BTreeSet::new(),
        }
    }
    /// A new request begins.
    fn begin(&mut self) {
        self.end();
        self.taken.clear();
        self.pre.clear();
        self.born.clear();
        self.fresh.clear();
        self.written.clear();
    }
    /// The request ends: its deferred frees happen.
    fn end(&mut self) {
        for b in std::mem::take(&mut self.freed) {
            self.pm.free_blk(BlockNo(b)).unwrap();
        }
    }
}

impl fsapi::CommitView for Rec {
    fn block_size(&self) -> usize {
        self.pm.block_size()
    }
    fn nblocks(&self) -> u64 {
        self.pm.nblocks()
    }
    fn before(&self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        if self.born.contains(&b.0) {
            buf.fill(0);
        } else if let Some(p) = self.pre.get(&b.0) {
            buf.copy_from_slice(&p[off..off + buf.len()]);
        } else {
            self.pm.peek(b, off, buf)?;
        }
        Ok(())
    }
    fn after(&self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        self.pm.peek(b, off, buf)
    }
    fn written(&self) -> Vec<BlockNo> {
        self.written
            .iter()
            .filter(|b| !self.born.contains(b) || self.fresh.contains(b))
            .chain(&self.fresh)
            .copied()
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .map(BlockNo)
            .collect()
    }
    fn allocated(&self) -> Vec<BlockNo> {
        self.fresh.iter().copied().map(BlockNo).collect()
    }
    fn freed(&self) -> Vec<BlockNo> {
        self.freed.iter().copied().map(BlockNo).collect()
    }
    fn locks(&self) -> Vec<LockId> {
        self.taken.clone()
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.pm.refs(ino)
    }
}

impl Pm for Rec {
    fn block_size(&self) -> usize {
        self.pm.block_size()
    }
    fn nblocks(&self) -> u64 {
        self.pm.nblocks()
    }
    fn free_blocks(&self) -> u64 {
        self.pm.free_blocks()
    }
    fn bread(&mut self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        self.pm.bread(b, off, buf)
    }
    fn bwrite(&mut self, b: BlockNo, off: usize, data: &[u8]) -> FsResult<()> {
        if b.0 == 0 {
            assert_eq!(
                (off, data.len()),
                (0, 64),
                "superblock write is its 64 bytes"
            );
        } else if b.0 <= self.itable_blocks {
            assert!(
                off.is_multiple_of(INODE_SIZE) && data.len() == INODE_SIZE,
                "inode-table write at {off} of {} bytes is not one slot",
                data.len()
            );
        }
        if !self.born.contains(&b.0) && !self.pre.contains_key(&b.0) {
            let mut old = vec![0u8; self.pm.block_size()];
            self.pm.peek(b, 0, &mut old)?;
            self.pre.insert(b.0, old);
        }
        self.written.insert(b.0);
        self.pm.bwrite(b, off, data)
    }
    fn get_next_blk(&mut self) -> FsResult<BlockNo> {
        let b = self.pm.get_next_blk()?;
        self.born.insert(b.0);
        self.fresh.insert(b.0);
        Ok(b)
    }
    fn free_blk(&mut self, b: BlockNo) -> FsResult<()> {
        if self.fresh.remove(&b.0) {
            return self.pm.free_blk(b);
        }
        // Deferred, as the host defers it: a block freed now is not handed out again
        // within the same request.
        if self.freed.contains(&b.0) {
            return Err(Errno::EINVAL);
        }
        let mut probe = [0u8; 1];
        self.pm.peek(b, 0, &mut probe)?;
        self.freed.insert(b.0);
        Ok(())
    }
    fn vref(&mut self, ino: Ino) -> FsResult<()> {
        self.pm.vref(ino)
    }
    fn vrele(&mut self, ino: Ino) -> FsResult<u32> {
        self.pm.vrele(ino)
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.pm.refs(ino)
    }
    fn lock(&mut self, l: LockId) -> FsResult<()> {
        assert!(
            !self.taken.contains(&l),
            "lock {l:?} taken twice in one request: {:?}",
            self.taken
        );
        if let Some(last) = self.taken.last() {
            assert!(
                lock_rank(l) > lock_rank(*last),
                "lock order: {l:?} after {:?}",
                self.taken
            );
        }
        self.taken.push(l);
        self.pm.lock(l)
    }
    fn unlock(&mut self, l: LockId) -> FsResult<()> {
        self.pm.unlock(l)
    }
    fn now(&self) -> Timespec {
        self.pm.now()
    }
    fn site(&mut self, id: u32) -> bool {
        self.sites.insert(id);
        let fire = self.armed == Some(id);
        self.hits += u32::from(fire);
        fire
    }
}

fn fresh_rec(nblocks: u64) -> (Smfs, Rec) {
    let mut pm = MemPm::new(4096, nblocks);
    let mut fs = Smfs::new();
    fs.mkfs(&mut pm).unwrap();
    let it = fs.geo.unwrap().itable_blocks;
    (fs, Rec::new(pm, it))
}

/// One step of a random workload. Indices pick among the nodes seen so far.
#[derive(Debug, Clone)]
enum Op {
    Create(usize, u8),
    Mkdir(usize, u8),
    Mknod(usize, u8),
    Symlink(usize, u8, u8),
    Write(usize, u32, u16),
    Read(usize, u32, u16),
    Truncate(usize, u32),
    Chmod(usize, u16),
    Unlink(usize, u8),
    Rmdir(usize, u8),
    Rename(usize, u8, usize, u8, bool),
    Link(usize, usize, u8),
    Lookup(usize, u8),
    LookupDots(usize, bool),
    Getattr(usize),
    Readdir(usize, u8),
    Readlink(usize),
    Open(usize),
    Release(usize),
    Fsync(usize),
    Statfs,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let i = 0usize..64;
    let n = 0u8..6;
    prop_oneof![
        4 => (i.clone(), n.clone()).prop_map(|(a, b)| Op::Create(a, b)),
        3 => (i.clone(), n.clone()).prop_map(|(a, b)| Op::Mkdir(a, b)),
        1 => (i.clone(), n.clone()).prop_map(|(a, b)| Op::Mknod(a, b)),
        1 => (i.clone(), n.clone(), 1u8..40).prop_map(|(a, b, c)| Op::Symlink(a, b, c)),
        4 => (i.clone(), 0u32..200_000, 1u16..9000).prop_map(|(a, b, c)| Op::Write(a, b, c)),
        2 => (i.clone(), 0u32..200_000, 1u16..9000).prop_map(|(a, b, c)| Op::Read(a, b, c)),
        2 => (i.clone(), 0u32..100_000).prop_map(|(a, b)| Op::Truncate(a, b)),
        1 => (i.clone(), 0u16..0o7777).prop_map(|(a, b)| Op::Chmod(a, b)),
        3 => (i.clone(), n.clone()).prop_map(|(a, b)| Op::Unlink(a, b)),
        2 => (i.clone(), n.clone()).prop_map(|(a, b)| Op::Rmdir(a, b)),
        3 => (i.clone(), n.clone(), i.clone(), n.clone(), any::<bool>())
            .prop_map(|(a, b, c, d, e)| Op::Rename(a, b, c, d, e)),
        2 => (i.clone(), i.clone(), n.clone()).prop_map(|(a, b, c)| Op::Link(a, b, c)),
        2 => (i.clone(), n.clone()).prop_map(|(a, b)| Op::Lookup(a, b)),
        1 => (i.clone(), any::<bool>()).prop_map(|(a, b)| Op::LookupDots(a, b)),
        1 => i.clone().prop_map(Op::Getattr),
        1 => (i.clone(), 0u8..20).prop_map(|(a, b)| Op::Readdir(a, b)),
        1 => i.clone().prop_map(Op::Readlink),
        1 => i.clone().prop_map(Op::Open),
        2 => i.clone().prop_map(Op::Release),
        1 => i.clone().prop_map(Op::Fsync),
        1 => Just(Op::Statfs),
    ]
}

/// Drives a workload, keeping what a client would know: nodes seen, open references.
struct Driver {
    fs: Smfs,
    pm: Rec,
    nodes: Vec<Ino>,
    dirs: Vec<Ino>,
    opens: HashMap<Ino, u32>,
}

fn name(n: u8) -> Vec<u8> {
    vec![b'a' + n]
}

impl Driver {
    fn new(nblocks: u64) -> Driver {
        let (fs, pm) = fresh_rec(nblocks);
        Driver {
            fs,
            pm,
            nodes: vec![Ino::ROOT],
            dirs: vec![Ino::ROOT],
            opens: HashMap::new(),
        }
    }
    fn node(&self, i: usize) -> Ino {
        self.nodes[i % self.nodes.len()]
    }
    fn dir(&self, i: usize) -> Ino {
        self.dirs[i % self.dirs.len()]
    }
    fn saw(&mut self, a: &Attr) {
        if !self.nodes.contains(&a.ino) {
            self.nodes.push(a.ino);
        }
        if a.kind == FileKind::Dir && !self.dirs.contains(&a.ino) {
            self.dirs.push(a.ino);
        }
    }
    /// Is `anc` `d` or one of its ancestors? (Walks `..`; the kernel refuses such renames.)
    fn is_ancestor(&mut self, anc: Ino, mut d: Ino) -> bool {
        for _ in 0..1000 {
            if d == anc {
                return true;
            }
            if d == Ino::ROOT {
                return false;
            }
            self.pm.begin();
            match self.fs.lookup(&mut self.pm, &C, d, b"..") {
                Ok(a) => d = a.ino,
                Err(_) => return false,
            }
        }
        panic!("directory cycle above {d}");
    }

    /// Runs one op; the error it returned, if any (never EUCLEAN or ESTALE when alone). A
    /// successful op must pass its commit check.
    fn run(&mut self, op: &Op) -> Option<Errno> {
        self.pm.begin();
        let r = self.step(op);
        assert_eq!(self.pm.pm.held_locks(), 0, "{op:?} left locks held");
        if r.is_ok()
            && let Err(why) = self.fs.check_commit(&self.pm)
        {
            panic!("{op:?}: the commit check rejected a correct operation: {why}");
        }
        self.pm.end();
        if let Err(e) = r {
            assert_ne!(
                e,
                Errno::EUCLEAN,
                "{op:?}: self-check failed on a clean store"
            );
            assert_ne!(e, ESTALE, "{op:?}: ESTALE with no concurrent request");
            return Some(e);
        }
        None
    }

    fn step(&mut self, op: &Op) -> FsResult<()> {
        let (fs, pm) = (&mut self.fs, &mut self.pm);
        match *op {
            Op::Create(d, n) => {
                let (a, _) = fs.create(
                    pm,
                    &C,
                    self.dirs[d % self.dirs.len()],
                    &name(n),
                    0o644,
                    0,
                    0,
                )?;
                *self.opens.entry(a.ino).or_default() += 1;
                self.saw(&a);
            }
            Op::Mkdir(d, n) => {
                let a = fs.mkdir(pm, &C, self.dirs[d % self.dirs.len()], &name(n), 0o755, 0)?;
                self.saw(&a);
            }
            Op::Mknod(d, n) => {
                let dir = self.dir(d);
                let a =
                    self.fs
                        .mknod(&mut self.pm, &C, dir, &name(n), libc::S_IFIFO | 0o600, 0, 0)?;
                self.saw(&a);
            }
            Op::Symlink(d, n, len) => {
                let dir = self.dir(d);
                let a =
                    self.fs
                        .symlink(&mut self.pm, &C, dir, &name(n), &vec![b't'; len as usize])?;
                self.saw(&a);
            }
            Op::Write(i, off, len) => {
                let ino = self.node(i);
                let data: Vec<u8> = (0..len).map(|k| k as u8 ^ off as u8).collect();
                self.fs
                    .write(&mut self.pm, ino, Fh(0), u64::from(off), &data)?;
            }
            Op::Read(i, off, len) => {
                let ino = self.node(i);
                self.fs
                    .read(&mut self.pm, ino, Fh(0), u64::from(off), u32::from(len))?;
            }
            Op::Truncate(i, size) => {
                let ino = self.node(i);
                let set = SetAttr {
                    size: Some(u64::from(size)),
                    ..Default::default()
                };
                self.fs.setattr(&mut self.pm, &C, ino, &set)?;
            }
            Op::Chmod(i, m) => {
                let ino = self.node(i);
                let set = SetAttr {
                    mode: Some(u32::from(m)),
                    ..Default::default()
                };
                self.fs.setattr(&mut self.pm, &C, ino, &set)?;
            }
            Op::Unlink(d, n) => {
                let dir = self.dir(d);
                self.fs.unlink(&mut self.pm, &C, dir, &name(n))?;
            }
            Op::Rmdir(d, n) => {
                let dir = self.dir(d);
                self.fs.rmdir(&mut self.pm, &C, dir, &name(n))?;
            }
            Op::Rename(d1, n1, d2, n2, noreplace) => {
                let (p1, p2) = (self.dir(d1), self.dir(d2));
                self.pm.begin();
                if let Ok(s) = self.fs.lookup(&mut self.pm, &C, p1, &name(n1))
                    && s.kind == FileKind::Dir
                    && self.is_ancestor(s.ino, p2)
                {
                    return Err(Errno::EINVAL);
                }
                self.pm.begin();
                let flags = if noreplace { RENAME_NOREPLACE } else { 0 };
                self.fs
                    .rename(&mut self.pm, &C, p1, &name(n1), p2, &name(n2), flags)?;
            }
            Op::Link(i, d, n) => {
                let (ino, dir) = (self.node(i), self.dir(d));
                self.fs.link(&mut self.pm, &C, ino, dir, &name(n))?;
            }
            Op::Lookup(d, n) => {
                let dir = self.dir(d);
                let a = self.fs.lookup(&mut self.pm, &C, dir, &name(n))?;
                self.saw(&a);
            }
            Op::LookupDots(d, up) => {
                let dir = self.dir(d);
                let nm: &[u8] = if up { b".." } else { b"." };
                self.fs.lookup(&mut self.pm, &C, dir, nm)?;
            }
            Op::Getattr(i) => {
                let ino = self.node(i);
                self.fs.getattr(&mut self.pm, ino)?;
            }
            Op::Readdir(d, off) => {
                let dir = self.dir(d);
                self.fs.readdir(&mut self.pm, dir, u64::from(off), 8)?;
            }
            Op::Readlink(i) => {
                let ino = self.node(i);
                self.fs.readlink(&mut self.pm, ino)?;
            }
            Op::Open(i) => {
                let ino = self.node(i);
                self.fs.open(&mut self.pm, &C, ino, 0)?;
                *self.opens.entry(ino).or_default() += 1;
            }
            Op::Release(i) => {
                let ino = self.node(i);
                let n = self.opens.get(&ino).copied().unwrap_or(0);
                if n == 0 {
                    return Err(Errno::EBADF);
                }
                self.opens.insert(ino, n - 1);
                self.fs.release(&mut self.pm, ino, Fh(0))?;
            }
            Op::Fsync(i) => {
                let ino = self.node(i);
                self.fs.fsync(&mut self.pm, ino, Fh(0), false)?;
            }
            Op::Statfs => {
                self.fs.statfs(&mut self.pm)?;
            }
        }
        Ok(())
    }

    /// Releases every open reference (the end of every client).
    fn close_all(&mut self) {
        let opens: Vec<(Ino, u32)> = self.opens.drain().collect();
        for (ino, n) in opens {
            for _ in 0..n {
                self.pm.begin();
                self.fs.release(&mut self.pm, ino, Fh(0)).unwrap();
                if let Err(why) = self.fs.check_commit(&self.pm) {
                    panic!("release of {ino}: the commit check rejected it: {why}");
                }
                self.pm.end();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every request takes its locks in the declared order (asserted by `Rec` on each lock
    /// call), holds none when it returns, writes metadata narrowly, and never fails a
    /// self-check on a store only SMFS itself wrote.
    #[test]
    fn random_workloads_keep_lock_order_and_pass_self_checks(
        ops in proptest::collection::vec(op_strategy(), 1..120)
    ) {
        let mut d = Driver::new(2048);
        for op in &ops {
            d.run(op);
            let problems = d.fs.fsck(&mut d.pm).unwrap();
            prop_assert!(problems.is_empty(), "after {:?}: {:?}", op, problems);
        }
        d.close_all();
        d.pm.sites.clear();
        let problems = d.fs.fsck(&mut d.pm).unwrap();
        prop_assert!(problems.is_empty(), "after closing: {:?}", problems);
        // fsck has no fault sites of its own (the campaign runs it to judge a run).
        prop_assert!(d.pm.sites.is_empty());
    }
}

// ---- A concurrent change between the unlocked peek and the locks ----

/// Runs `other` (a concurrent request that commits) on the store just before the first lock
/// of the request under test.
struct Interleave<F: FnMut(&mut MemPm)> {
    pm: MemPm,
    other: Option<F>,
}

impl<F: FnMut(&mut MemPm)> Pm for Interleave<F> {
    fn block_size(&self) -> usize {
        self.pm.block_size()
    }
    fn nblocks(&self) -> u64 {
        self.pm.nblocks()
    }
    fn free_blocks(&self) -> u64 {
        self.pm.free_blocks()
    }
    fn bread(&mut self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        self.pm.bread(b, off, buf)
    }
    fn bwrite(&mut self, b: BlockNo, off: usize, data: &[u8]) -> FsResult<()> {
        self.pm.bwrite(b, off, data)
    }
    fn get_next_blk(&mut self) -> FsResult<BlockNo> {
        self.pm.get_next_blk()
    }
    fn free_blk(&mut self, b: BlockNo) -> FsResult<()> {
        self.pm.free_blk(b)
    }
    fn vref(&mut self, ino: Ino) -> FsResult<()> {
        self.pm.vref(ino)
    }
    fn vrele(&mut self, ino: Ino) -> FsResult<u32> {
        self.pm.vrele(ino)
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.pm.refs(ino)
    }
    fn lock(&mut self, l: LockId) -> FsResult<()> {
        if let Some(mut f) = self.other.take() {
            f(&mut self.pm);
        }
        self.pm.lock(l)
    }
    fn unlock(&mut self, l: LockId) -> FsResult<()> {
        self.pm.unlock(l)
    }
    fn now(&self) -> Timespec {
        self.pm.now()
    }
}

#[test]
fn a_name_changed_between_peek_and_lock_is_reread_under_the_locks() {
    let (mut fs, mut pm) = fresh();
    // "lo" gets inode 2, the directory 3, d/x 4; d/y is a second name of inode 2.
    let (lo, _) = fs
        .create(&mut pm, &C, Ino::ROOT, b"lo", 0o644, 0, 0)
        .unwrap();
    fs.release(&mut pm, lo.ino, Fh(0)).unwrap();
    let d = fs.mkdir(&mut pm, &C, Ino::ROOT, b"d", 0o755, 0).unwrap();
    let (x, _) = fs.create(&mut pm, &C, d.ino, b"x", 0o644, 0, 0).unwrap();
    fs.release(&mut pm, x.ino, Fh(0)).unwrap();
    fs.link(&mut pm, &C, lo.ino, d.ino, b"y").unwrap();
    assert!(lo.ino < d.ino && d.ino < x.ino);

    // unlink(d, "x") peeks x = 4, locks {3, 4}; meanwhile d/y is renamed over d/x, so under
    // the locks x names inode 2, below the directory's lock: refused, nothing changed.
    let dino = d.ino;
    let mut ipm = Interleave {
        pm,
        other: Some(move |pm: &mut MemPm| {
            let mut other = Smfs::new();
            other.attach(pm).unwrap();
            other.rename(pm, &C, dino, b"y", dino, b"x", 0).unwrap();
        }),
    };
    assert_eq!(fs.unlink(&mut ipm, &C, d.ino, b"x"), Err(ESTALE));
    assert_eq!(ipm.pm.held_locks(), 0);
    let mut pm = ipm.pm;
    assert_eq!(fs.getattr(&mut pm, lo.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(&mut pm, x.ino), Err(Errno::ENOENT));
    assert!(fs.fsck(&mut pm).unwrap().is_empty());
    // The kernel's retry peeks again and succeeds.
    fs.unlink(&mut pm, &C, d.ino, b"x").unwrap();
    assert_eq!(fs.getattr(&mut pm, lo.ino).unwrap().nlink, 1);

    // lookup(d, "n") peeks nothing, locks {3}; meanwhile "n" is created (inode 4, above 3):
    // the lookup takes its lock too and sees it.
    let mut ipm = Interleave {
        pm,
        other: Some(move |pm: &mut MemPm| {
            let mut other = Smfs::new();
            other.attach(pm).unwrap();
            other
                .mknod(pm, &C, dino, b"n", libc::S_IFIFO | 0o600, 0, 0)
                .unwrap();
        }),
    };
    let n = fs.lookup(&mut ipm, &C, d.ino, b"n").unwrap();
    assert_eq!(n.kind, FileKind::Fifo);
    assert_eq!(ipm.pm.held_locks(), 0);
}

// ---- Self-checks: corrupted structures answer EUCLEAN ----

fn poke(pm: &mut MemPm, b: u64, off: usize, bytes: &[u8]) {
    pm.bwrite(BlockNo(b), off, bytes).unwrap();
}

/// Block and offset of inode `ino`'s slot (4 KiB blocks: 32 per block).
fn islot(ino: Ino) -> (u64, usize) {
    (
        1 + (ino.0 - 1) / 32,
        ((ino.0 - 1) % 32) as usize * INODE_SIZE,
    )
}

fn raw_inode(fs: &Smfs, pm: &mut MemPm, ino: Ino) -> Inode {
    let (b, off) = islot(ino);
    let mut buf = [0u8; INODE_SIZE];
    pm.bread(BlockNo(b), off, &mut buf).unwrap();
    let _ = fs;
    Inode::decode(&buf)
}

/// A store with root/f (a 100 KB file, so it has an indirect block) and root/d.
fn populated() -> (Smfs, MemPm, Ino, Ino) {
    let (mut fs, mut pm) = fresh();
    let (f, fh) = fs
        .create(&mut pm, &C, Ino::ROOT, b"f", 0o644, 0, 0)
        .unwrap();
    fs.write(&mut pm, f.ino, fh, 0, &vec![7u8; 100_000])
        .unwrap();
    fs.release(&mut pm, f.ino, fh).unwrap();
    let d = fs.mkdir(&mut pm, &C, Ino::ROOT, b"d", 0o755, 0).unwrap();
    (fs, pm, f.ino, d.ino)
}

#[test]
fn corrupted_inodes_fail_the_self_check() {
    let (mut fs, mut pm, f, _) = populated();
    let (b, off) = islot(f);
    let orig = raw_inode(&fs, &mut pm, f).encode();
    let restore = |pm: &mut MemPm| poke(pm, b, off, &orig);
    // Mode with no valid file type.
    poke(&mut pm, b, off, &0o030644u32.to_le_bytes());
    assert_eq!(fs.getattr(&mut pm, f), Err(Errno::EUCLEAN));
    restore(&mut pm);
    // Size beyond the largest file.
    poke(&mut pm, b, off + 16, &u64::MAX.to_le_bytes());
    assert_eq!(fs.read(&mut pm, f, Fh(0), 0, 10), Err(Errno::EUCLEAN));
    restore(&mut pm);
    // A direct pointer into the inode table, then one beyond the store.
    poke(&mut pm, b, off + 72, &1u64.to_le_bytes());
    assert_eq!(fs.getattr(&mut pm, f), Err(Errno::EUCLEAN));
    poke(&mut pm, b, off + 72, &1_000_000u64.to_le_bytes());
    assert_eq!(fs.lookup(&mut pm, &C, Ino::ROOT, b"f"), Err(Errno::EUCLEAN));
    restore(&mut pm);
    // Link count 0 on an inode a name leads to.
    poke(&mut pm, b, off + 4, &0u32.to_le_bytes());
    assert_eq!(fs.lookup(&mut pm, &C, Ino::ROOT, b"f"), Err(Errno::EUCLEAN));
    assert_eq!(fs.unlink(&mut pm, &C, Ino::ROOT, b"f"), Err(Errno::EUCLEAN));
    restore(&mut pm);
    // A pointer inside the indirect block pointing at the superblock.
    let ind = raw_inode(&fs, &mut pm, f).ptr[NDIRECT];
    let mut buf = [0u8; 8];
    pm.bread(BlockNo(ind), 24, &mut buf).unwrap();
    poke(&mut pm, ind, 24, &5u64.to_le_bytes()); // an inode-table block
    assert_eq!(
        fs.read(&mut pm, f, Fh(0), 7 * 4096, 10),
        Err(Errno::EUCLEAN)
    );
    poke(&mut pm, ind, 24, &buf);
    assert_eq!(fs.read(&mut pm, f, Fh(0), 7 * 4096, 3).unwrap(), vec![7; 3]);
    assert_eq!(pm.held_locks(), 0);
}

#[test]
fn corrupted_directory_entries_and_superblock_fail_the_self_check() {
    let (mut fs, mut pm, f, d) = populated();
    let root_blk = raw_inode(&fs, &mut pm, Ino::ROOT).ptr[0];
    // Slot 0 is "f", slot 1 is "d".
    let mut e = [0u8; DIRENT_SIZE];
    pm.bread(BlockNo(root_blk), 0, &mut e).unwrap();
    assert_eq!(get_u64(&e, 0), f.0);
    // Zero-length name.
    poke(&mut pm, root_blk, 9, &[0]);
    assert_eq!(fs.lookup(&mut pm, &C, Ino::ROOT, b"d"), Err(Errno::EUCLEAN));
    assert_eq!(fs.readdir(&mut pm, Ino::ROOT, 0, 10), Err(Errno::EUCLEAN));
    poke(&mut pm, root_blk, 0, &e);
    // Inode number beyond the table.
    poke(&mut pm, root_blk, 0, &1_000_000u64.to_le_bytes());
    assert_eq!(fs.readdir(&mut pm, Ino::ROOT, 0, 10), Err(Errno::EUCLEAN));
    poke(&mut pm, root_blk, 0, &e);
    // Kind byte disagreeing with the inode.
    poke(&mut pm, root_blk, 8, &[kind_code(FileKind::Dir)]);
    assert_eq!(fs.lookup(&mut pm, &C, Ino::ROOT, b"f"), Err(Errno::EUCLEAN));
    poke(&mut pm, root_blk, 0, &e);
    assert_eq!(fs.lookup(&mut pm, &C, Ino::ROOT, b"d").unwrap().ino, d);
    // Superblock: one flipped bit fails the crc.
    let mut sb = [0u8; 64];
    pm.bread(BlockNo(0), 0, &mut sb).unwrap();
    poke(&mut pm, 0, 32, &[sb[32] ^ 1]);
    assert_eq!(fs.statfs(&mut pm), Err(Errno::EUCLEAN));
    assert_eq!(
        fs.mknod(&mut pm, &C, Ino::ROOT, b"p", libc::S_IFIFO, 0, 0),
        Err(Errno::EUCLEAN)
    );
    assert_eq!(Smfs::new().attach(&mut pm), Err(Errno::EUCLEAN));
    poke(&mut pm, 0, 0, &sb);
    assert!(fs.statfs(&mut pm).is_ok());
    assert_eq!(pm.held_locks(), 0);
}

// ---- fsck ----

fn fsck_has(fs: &mut Smfs, pm: &mut MemPm, what: &str) {
    let problems = fs.fsck(pm).unwrap();
    assert!(
        problems.iter().any(|p| p.contains(what)),
        "fsck did not report {what:?}: {problems:?}"
    );
}

#[test]
fn fsck_is_clean_after_mkfs_and_a_mixed_workload() {
    let (mut fs, mut pm) = fresh();
    assert_eq!(fs.fsck(&mut pm).unwrap(), Vec::<String>::new());
    let (mut fs2, mut pm2, f, d) = populated();
    fs2.link(&mut pm2, &C, f, d, b"h").unwrap();
    fs2.symlink(&mut pm2, &C, d, b"s", b"../f").unwrap();
    fs2.mkdir(&mut pm2, &C, d, b"sub", 0o755, 0).unwrap();
    let (o, fh) = fs2.create(&mut pm2, &C, d, b"open", 0o600, 0, 0).unwrap();
    fs2.write(&mut pm2, o.ino, fh, 3 << 30, b"x").unwrap();
    fs2.unlink(&mut pm2, &C, d, b"open").unwrap();
    // Unlinked but open: not an orphan.
    assert_eq!(fs2.fsck(&mut pm2).unwrap(), Vec::<String>::new());
    fs2.release(&mut pm2, o.ino, fh).unwrap();
    assert_eq!(fs2.fsck(&mut pm2).unwrap(), Vec::<String>::new());
    let _ = fs.statfs(&mut pm).unwrap();
}

#[test]
fn fsck_reports_each_corruption() {
    // Superblock crc.
    let (mut fs, mut pm, f, d) = populated();
    let mut sb = [0u8; 64];
    pm.bread(BlockNo(0), 0, &mut sb).unwrap();
    poke(&mut pm, 0, 40, &[sb[40] ^ 4]);
    fsck_has(&mut fs, &mut pm, "crc mismatch");
    poke(&mut pm, 0, 0, &sb);
    // A wrong free-inode count under a valid crc.
    let mut s = fs.read_super(&mut pm).unwrap();
    s.free_inodes -= 1;
    Smfs::write_super(&mut pm, &s).unwrap();
    fsck_has(&mut fs, &mut pm, "free inodes");
    poke(&mut pm, 0, 0, &sb);
    assert_eq!(fs.fsck(&mut pm).unwrap(), Vec::<String>::new());

    // Inode fields.
    let (b, off) = islot(f);
    let orig = raw_inode(&fs, &mut pm, f).encode();
    poke(&mut pm, b, off, &0o030644u32.to_le_bytes());
    fsck_has(&mut fs, &mut pm, "invalid mode");
    poke(&mut pm, b, off, &orig);
    poke(&mut pm, b, off + 72 + 8, &3u64.to_le_bytes());
    fsck_has(&mut fs, &mut pm, "into the superblock or inode table");
    poke(&mut pm, b, off + 72 + 8, &99_999u64.to_le_bytes());
    fsck_has(&mut fs, &mut pm, "outside the store");
    poke(&mut pm, b, off, &orig);
    poke(&mut pm, b, off + 4, &2u32.to_le_bytes());
    fsck_has(&mut fs, &mut pm, "link count 2 but 1 entries");
    poke(&mut pm, b, off, &orig);
    poke(&mut pm, b, off + 16, &10u64.to_le_bytes());
    fsck_has(&mut fs, &mut pm, "beyond size");
    poke(&mut pm, b, off, &orig);
    assert_eq!(fs.fsck(&mut pm).unwrap(), Vec::<String>::new());

    // One block referenced by two inodes (and so one block too few allocated).
    let (g, _) = fs
        .create(&mut pm, &C, Ino::ROOT, b"g", 0o644, 0, 0)
        .unwrap();
    fs.release(&mut pm, g.ino, Fh(0)).unwrap();
    let fblk = raw_inode(&fs, &mut pm, f).ptr[0];
    let mut gi = raw_inode(&fs, &mut pm, g.ino);
    gi.ptr[0] = fblk;
    gi.nblk = 1;
    gi.size = 10;
    let (gb, goff) = islot(g.ino);
    poke(&mut pm, gb, goff, &gi.encode());
    fsck_has(&mut fs, &mut pm, "referenced twice");
    // A referenced block freed in the store.
    let (mut fs, mut pm, f, _) = populated();
    let fblk = raw_inode(&fs, &mut pm, f).ptr[1];
    pm.free_blk(BlockNo(fblk)).unwrap();
    fsck_has(&mut fs, &mut pm, "free in the store");

    // A leaked block.
    let (mut fs, mut pm, _, d2) = populated();
    pm.get_next_blk().unwrap();
    fsck_has(&mut fs, &mut pm, "(leak)");

    // Directory entries: bad name, entry naming a free inode, unreachable directory.
    let (mut fs, mut pm, _, _) = populated();
    let root_blk = raw_inode(&fs, &mut pm, Ino::ROOT).ptr[0];
    let mut e = [0u8; DIRENT_SIZE];
    pm.bread(BlockNo(root_blk), DIRENT_SIZE, &mut e).unwrap();
    poke(&mut pm, root_blk, DIRENT_SIZE + 9, &[0]);
    fsck_has(&mut fs, &mut pm, "bad name");
    poke(&mut pm, root_blk, DIRENT_SIZE, &e);
    poke(&mut pm, root_blk, DIRENT_SIZE, &200u64.to_le_bytes());
    fsck_has(&mut fs, &mut pm, "names free inode 200");
    // The directory loses its only name: unreachable, the root's link count is off.
    poke(&mut pm, root_blk, DIRENT_SIZE, &0u64.to_le_bytes());
    fsck_has(&mut fs, &mut pm, &format!("dir {}: not reachable", d2.0));
    fsck_has(&mut fs, &mut pm, "dir 1: link count 3 but 2 + 0");
    poke(&mut pm, root_blk, DIRENT_SIZE, &e);
    assert_eq!(fs.fsck(&mut pm).unwrap(), Vec::<String>::new());

    // A cycle: d gets an entry naming the root.
    let sub = fs.mkdir(&mut pm, &C, d, b"sub", 0o755, 0).unwrap();
    let mut si = raw_inode(&fs, &mut pm, sub.ino);
    si.rdev = sub.ino.0 as u32;
    let (sb2, soff) = islot(sub.ino);
    poke(&mut pm, sb2, soff, &si.encode());
    fsck_has(&mut fs, &mut pm, "parent (rdev)");
    let dblk = raw_inode(&fs, &mut pm, d).ptr[0];
    poke(&mut pm, dblk, 0, &1u64.to_le_bytes());
    fsck_has(&mut fs, &mut pm, "root is named");
}

// ---- Fault sites ----

#[test]
fn site_table_is_dense_unique_and_covers_every_kind() {
    let sites = Smfs::new().sites();
    for (k, s) in sites.iter().enumerate() {
        assert_eq!(s.id as usize, k + 1, "ids are dense from 1");
        assert!(s.what.contains(':'), "{}: `what` names the upcall", s.id);
    }
    for kind in SiteKind::ALL {
        let n = sites.iter().filter(|s| s.kind == kind).count();
        assert!(n >= 4, "{kind:?}: only {n} sites");
    }
    // Every id is tested exactly once in the code.
    let src = include_str!("lib.rs");
    for s in sites {
        let n = src.matches(&format!("pm.site({})", s.id)).count();
        assert_eq!(n, 1, "site {} appears {n} times in lib.rs", s.id);
    }
    assert_eq!(src.matches("pm.site(").count(), sites.len());
}

#[test]
fn every_site_is_reached_by_a_random_workload() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let all: BTreeSet<u32> = Smfs::new().sites().iter().map(|s| s.id).collect();
    let mut seen = BTreeSet::new();
    let mut runner = TestRunner::deterministic();
    for _ in 0..40 {
        let ops = proptest::collection::vec(op_strategy(), 150)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut d = Driver::new(2048);
        for op in &ops {
            d.run(op);
        }
        d.close_all();
        seen.extend(d.pm.sites.iter().copied());
        if seen == all {
            return;
        }
    }
    let missing: Vec<u32> = all.difference(&seen).copied().collect();
    panic!("sites never reached: {missing:?}");
}

// ---- Real concurrency: threads as contexts over one store, strict 2PL ----

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One store shared by several threads, with a lock table that keeps every lock until the
/// request ends (as the host does).
struct SharedStore {
    pm: Mutex<MemPm>,
    locks: Mutex<HashMap<LockId, usize>>,
    freed: Condvar,
    /// Times a context waited for another's lock.
    waits: std::sync::atomic::AtomicUsize,
}

/// One thread's protection manager: a context running one request at a time.
struct ThreadPm {
    sh: Arc<SharedStore>,
    owner: usize,
    held: Vec<LockId>,
}

impl ThreadPm {
    /// The request ends: every lock it took is released now.
    fn end(&mut self) {
        let mut t = self.sh.locks.lock().unwrap();
        for l in self.held.drain(..) {
            t.remove(&l);
        }
        self.sh.freed.notify_all();
    }
}

impl Pm for ThreadPm {
    fn block_size(&self) -> usize {
        self.sh.pm.lock().unwrap().block_size()
    }
    fn nblocks(&self) -> u64 {
        self.sh.pm.lock().unwrap().nblocks()
    }
    fn free_blocks(&self) -> u64 {
        self.sh.pm.lock().unwrap().free_blocks()
    }
    fn bread(&mut self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        // Give the other contexts a chance between any two steps of a request.
        std::thread::yield_now();
        self.sh.pm.lock().unwrap().bread(b, off, buf)
    }
    fn bwrite(&mut self, b: BlockNo, off: usize, data: &[u8]) -> FsResult<()> {
        std::thread::yield_now();
        self.sh.pm.lock().unwrap().bwrite(b, off, data)
    }
    fn get_next_blk(&mut self) -> FsResult<BlockNo> {
        self.sh.pm.lock().unwrap().get_next_blk()
    }
    fn free_blk(&mut self, b: BlockNo) -> FsResult<()> {
        self.sh.pm.lock().unwrap().free_blk(b)
    }
    fn vref(&mut self, ino: Ino) -> FsResult<()> {
        self.sh.pm.lock().unwrap().vref(ino)
    }
    fn vrele(&mut self, ino: Ino) -> FsResult<u32> {
        self.sh.pm.lock().unwrap().vrele(ino)
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.sh.pm.lock().unwrap().refs(ino)
    }
    fn lock(&mut self, l: LockId) -> FsResult<()> {
        let mut t = self.sh.locks.lock().unwrap();
        loop {
            match t.get(&l) {
                None => {
                    t.insert(l, self.owner);
                    self.held.push(l);
                    return Ok(());
                }
                Some(o) if *o == self.owner => return Ok(()),
                Some(_) => {
                    self.sh
                        .waits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (g, to) = self
                        .sh
                        .freed
                        .wait_timeout(t, Duration::from_secs(10))
                        .unwrap();
                    if to.timed_out() {
                        return Err(Errno(libc::EDEADLK));
                    }
                    t = g;
                }
            }
        }
    }
    fn unlock(&mut self, l: LockId) -> FsResult<()> {
        // Deferred to the end of the request (strict two-phase locking).
        if self.held.contains(&l) {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }
    fn now(&self) -> Timespec {
        Timespec {
            sec: 1_000_000,
            nsec: 0,
        }
    }
}

/// A small deterministic generator (each thread its own stream).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One client thread: namespace churn over shared directories (files named `f*`, leaf
/// directories named `s*`, so no rename can make a cycle), plus a private file whose
/// contents it checks after every write.
fn client(sh: Arc<SharedStore>, owner: usize, dirs: Vec<Ino>, ops: usize) -> (u32, u32) {
    let mut fs = Smfs::new();
    let mut pm = ThreadPm {
        sh,
        owner,
        held: Vec::new(),
    };
    fs.attach(&mut pm).unwrap();
    pm.end();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((owner as u64 + 1) * 0x1234_5678));
    let own = format!("p{owner}").into_bytes();
    let (mine, _) = fs
        .create(&mut pm, &C, Ino::ROOT, &own, 0o644, 0, 0)
        .unwrap();
    pm.end();
    let mut expect: Vec<u8> = Vec::new();
    let mut opened: Vec<Ino> = Vec::new();
    let (mut ok, mut stale) = (0, 0);
    for _ in 0..ops {
        let d = dirs[rng.next(dirs.len() as u64) as usize];
        let d2 = dirs[rng.next(dirs.len() as u64) as usize];
        let f = format!("f{}", rng.next(4)).into_bytes();
        let f2 = format!("f{}", rng.next(4)).into_bytes();
        let s = format!("s{}", rng.next(3)).into_bytes();
        let s2 = format!("s{}", rng.next(3)).into_bytes();
        let r: FsResult<()> = match rng.next(15) {
            0 => fs
                .create(&mut pm, &C, d, &f, 0o644, 0, 0)
                .map(|(a, _)| opened.push(a.ino)),
            1 => fs.mkdir(&mut pm, &C, d, &s, 0o755, 0).map(drop),
            2 => fs.unlink(&mut pm, &C, d, &f),
            3 => fs.rmdir(&mut pm, &C, d, &s),
            4 => fs.rename(&mut pm, &C, d, &f, d2, &f2, 0),
            5 => fs.rename(&mut pm, &C, d, &s, d2, &s2, 0),
            6 => fs.lookup(&mut pm, &C, d, &f).and_then(|a| {
                pm.end();
                fs.link(&mut pm, &C, a.ino, d2, &f2).map(drop)
            }),
            7 => fs.lookup(&mut pm, &C, d, &s).map(drop),
            8 => fs.readdir(&mut pm, d, 0, 100).map(drop),
            9 => fs.statfs(&mut pm).map(drop),
            10 => fs.symlink(&mut pm, &C, d, &f, b"target").map(drop),
            11 => fs.lookup(&mut pm, &C, d, &f).and_then(|a| {
                pm.end();
                fs.write(&mut pm, a.ino, Fh(0), rng.next(20_000), &[owner as u8; 700])
                    .map(drop)
            }),
            12 => match opened.pop() {
                Some(ino) => fs.release(&mut pm, ino, Fh(0)),
                None => Ok(()),
            },
            13 => fs.lookup(&mut pm, &C, d, b"..").map(drop),
            _ => {
                let off = rng.next(30_000) as usize;
                let data: Vec<u8> = (0..rng.next(9000) as usize + 1)
                    .map(|_| rng.next(256) as u8)
                    .collect();
                fs.write(&mut pm, mine.ino, Fh(0), off as u64, &data)
                    .map(|_| {
                        if expect.len() < off + data.len() {
                            expect.resize(off + data.len(), 0);
                        }
                        expect[off..off + data.len()].copy_from_slice(&data);
                    })
            }
        };
        pm.end();
        match r {
            Ok(()) => ok += 1,
            Err(e) if e == ESTALE => stale += 1,
            Err(e) => {
                assert_ne!(e, Errno::EUCLEAN, "context {owner}: a self-check failed");
                assert_ne!(e, Errno(libc::EDEADLK), "context {owner}: deadlock");
            }
        }
        let got = fs.read(&mut pm, mine.ino, Fh(0), 0, 1 << 20).unwrap();
        pm.end();
        assert_eq!(got, expect, "context {owner}: its own file changed");
    }
    for ino in opened.into_iter().chain([mine.ino]) {
        fs.release(&mut pm, ino, Fh(0)).unwrap();
        pm.end();
    }
    (ok, stale)
}

#[test]
fn concurrent_contexts_neither_deadlock_nor_corrupt() {
    let (mut fs, mut pm) = fresh();
    let mut dirs = vec![Ino::ROOT];
    for n in [b"d0", b"d1", b"d2"] {
        dirs.push(fs.mkdir(&mut pm, &C, Ino::ROOT, n, 0o755, 0).unwrap().ino);
    }
    let sh = Arc::new(SharedStore {
        pm: Mutex::new(pm),
        locks: Mutex::new(HashMap::new()),
        freed: Condvar::new(),
        waits: Default::default(),
    });
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (sh, dirs) = (sh.clone(), dirs.clone());
            std::thread::spawn(move || client(sh, t + 1, dirs, 1000))
        })
        .collect();
    let mut total_ok = 0;
    for t in threads {
        let (ok, stale) = t.join().unwrap();
        eprintln!("context: {ok} ops succeeded, {stale} ESTALE");
        total_ok += ok;
    }
    assert!(
        total_ok > 1000,
        "the workload mostly failed: {total_ok} ops succeeded"
    );
    let waits = sh.waits.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("lock waits: {waits}");
    let mut pm = Arc::try_unwrap(sh).ok().unwrap().pm.into_inner().unwrap();
    assert_eq!(fs.fsck(&mut pm).unwrap(), Vec::<String>::new());
}

/// Issue 6: what the injected logic faults leave behind, the commit check sees before it is
/// committed. For every software fault site (memory-fault sites need the host), random
/// workloads run with the site armed; each request that succeeds must pass its commit check,
/// or the run stops there (the host would undo it); a request that fails after changing
/// something stops the run too (the host would roll it back; `MemPm` cannot). A run that goes
/// on must leave a store `fsck` finds clean: corruption that got past the commit check is the
/// "silent corruption" of the campaign, and there must be none.
#[test]
fn commit_check_catches_what_fsck_would() {
    // Quiet: faulty variants panic on purpose.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(commit_check_runs);
    std::panic::set_hook(hook);
    let (fired, caught, escaped) = r.expect("the test itself panicked");
    assert!(fired > 100 && caught > 20, "fired {fired}, caught {caught}");
    assert!(
        escaped.is_empty(),
        "{} runs got past the commit check:\n{}",
        escaped.len(),
        escaped.join("\n")
    );
}

fn commit_check_runs() -> (usize, usize, Vec<String>) {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strat = proptest::collection::vec(op_strategy(), 30..90);
    let mut escaped = Vec::new();
    let (mut fired, mut caught) = (0, 0);
    // Hangs are the host's deadline's to catch; this test runs requests inline.
    let software = SITES.iter().filter(|s| {
        !s.kind.is_matrix_row()
            && !matches!(s.kind, SiteKind::BitFlip | SiteKind::PointerCorruption)
            && !s.what.contains("a hang")
    });
    for site in software {
        for _ in 0..6 {
            let ops = strat.new_tree(&mut runner).unwrap().current();
            let mut d = Driver::new(2048);
            d.pm.armed = Some(site.id);
            for op in &ops {
                d.pm.begin();
                let hits = d.pm.hits;
                // A panic is a crash the host sees (and undoes): the run ends there.
                let Ok(r) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.step(op)))
                else {
                    break;
                };
                let changed =
                    !d.pm.written.is_empty() || !d.pm.fresh.is_empty() || !d.pm.freed.is_empty();
                if d.pm.hits > hits {
                    fired += 1;
                }
                let stop = match r {
                    Err(_) => changed,
                    Ok(()) => d.fs.check_commit(&d.pm).is_err(),
                };
                if stop {
                    caught += usize::from(r.is_ok());
                    break;
                }
                d.pm.end();
                let problems = d.fs.fsck(&mut d.pm).unwrap();
                if !problems.is_empty() {
                    escaped.push(format!(
                        "site {} ({}) after {op:?}: {problems:?}",
                        site.id, site.what
                    ));
                    break;
                }
            }
        }
    }
    (fired, caught, escaped)
}

// ---- Big directories ----

/// Every name `readdir` lists in `dir` (beyond `.` and `..`), paging in odd-sized batches so
/// the resume offsets cross block boundaries; checks each offset is strictly increasing.
fn list(fs: &mut Smfs, pm: &mut MemPm, dir: Ino) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut off = 0;
    loop {
        let batch = fs.readdir(pm, dir, off, 13).unwrap();
        let Some(last) = batch.last() else { break };
        for e in &batch {
            assert!(e.offset > off, "readdir offset went backwards");
            off = e.offset;
            if e.name != b"." && e.name != b".." {
                let n = String::from_utf8(e.name.clone()).unwrap();
                assert!(out.insert(n.clone()), "readdir listed {n} twice");
            }
        }
        off = last.offset;
    }
    out
}

/// `dir` lists exactly `live`, each live name looks up to its kind, each of `gone` is absent,
/// and the whole store passes fsck.
fn check_big_dir(
    fs: &mut Smfs,
    pm: &mut MemPm,
    dir: Ino,
    live: &BTreeSet<String>,
    gone: &BTreeSet<String>,
    step: &str,
) {
    assert_eq!(&list(fs, pm, dir), live, "{step}: readdir");
    for n in live {
        let a = fs.lookup(pm, &C, dir, n.as_bytes()).unwrap();
        let want = if n.starts_with('d') {
            FileKind::Dir
        } else {
            FileKind::Fifo
        };
        assert_eq!(a.kind, want, "{step}: lookup {n}");
    }
    for n in gone {
        assert_eq!(
            fs.lookup(pm, &C, dir, n.as_bytes()).map(|a| a.ino),
            Err(Errno::ENOENT),
            "{step}: lookup of removed {n}"
        );
    }
    assert_eq!(fs.fsck(pm).unwrap(), Vec::<String>::new(), "{step}: fsck");
    assert_eq!(pm.held_locks(), 0);
}

/// Every tenth entry is a directory (so link counts and `rdev` move too), the rest fifos.
fn big_name(i: usize) -> String {
    if i.is_multiple_of(10) {
        format!("d{i:04}")
    } else {
        format!("n{i:04}-{}", "x".repeat(i % 40))
    }
}

fn add_big(fs: &mut Smfs, pm: &mut MemPm, dir: Ino, name: &str) {
    if name.starts_with('d') {
        fs.mkdir(pm, &C, dir, name.as_bytes(), 0o755, 0).unwrap();
    } else {
        fs.mknod(pm, &C, dir, name.as_bytes(), libc::S_IFIFO | 0o644, 0, 0)
            .unwrap();
    }
}

fn remove_big(fs: &mut Smfs, pm: &mut MemPm, dir: Ino, name: &str) {
    if name.starts_with('d') {
        fs.rmdir(pm, &C, dir, name.as_bytes()).unwrap();
    } else {
        fs.unlink(pm, &C, dir, name.as_bytes()).unwrap();
    }
}

#[test]
fn a_directory_of_a_thousand_entries_survives_adds_removes_and_renames() {
    // 32 MiB: 2048 inodes, room for two directories of 1000 entries.
    let mut pm = MemPm::new(4096, 8192);
    let mut fs = Smfs::new();
    fs.mkfs(&mut pm).unwrap();
    let a = fs
        .mkdir(&mut pm, &C, Ino::ROOT, b"a", 0o755, 0)
        .unwrap()
        .ino;
    let b = fs
        .mkdir(&mut pm, &C, Ino::ROOT, b"b", 0o755, 0)
        .unwrap()
        .ino;
    const N: usize = 1000;
    let mut live = BTreeSet::new();
    let mut gone = BTreeSet::new();
    for i in 0..N {
        let n = big_name(i);
        add_big(&mut fs, &mut pm, a, &n);
        live.insert(n);
        // Each count of whole blocks and one past it, to beyond 256 (the first count whose
        // blocks `size / bs` undercounts); the full count is checked below.
        if i < 300 && (i % 15 == 0 || i % 15 == 14) {
            assert_eq!(
                fs.fsck(&mut pm).unwrap(),
                Vec::<String>::new(),
                "fsck after {} entries",
                i + 1
            );
        }
    }
    check_big_dir(&mut fs, &mut pm, a, &live, &gone, "created");
    // fsck stays strict: one entry fewer than the last block starts with leaves that block
    // beyond the size.
    let (ab, aoff) = islot(a);
    let orig = raw_inode(&fs, &mut pm, a).encode();
    let short = ((N as u64 - 1) / 15 * 15 * DIRENT_SIZE as u64).to_le_bytes();
    poke(&mut pm, ab, aoff + 16, &short);
    fsck_has(&mut fs, &mut pm, "beyond size");
    poke(&mut pm, ab, aoff, &orig);
    assert_eq!(fs.getattr(&mut pm, a).unwrap().nlink, 2 + N as u32 / 10);

    // Every other one: a hole in every block.
    for i in (0..N).step_by(2) {
        let n = big_name(i);
        remove_big(&mut fs, &mut pm, a, &n);
        live.remove(&n);
        gone.insert(n);
    }
    check_big_dir(&mut fs, &mut pm, a, &live, &gone, "every other removed");

    // The last 300 created: the tail blocks hold nothing live.
    for i in N - 300..N {
        let n = big_name(i);
        if live.remove(&n) {
            remove_big(&mut fs, &mut pm, a, &n);
            gone.insert(n);
        }
    }
    check_big_dir(&mut fs, &mut pm, a, &live, &gone, "tail removed");

    // New names fill the holes, then go on past the old end.
    for i in N..N + 600 {
        let n = big_name(i);
        add_big(&mut fs, &mut pm, a, &n);
        live.insert(n);
    }
    check_big_dir(&mut fs, &mut pm, a, &live, &gone, "refilled");

    // Fill b, then rename within a, from a to b, from b to a, and onto existing names.
    for i in 0..400 {
        let n = format!("b{i:04}");
        fs.mknod(&mut pm, &C, b, n.as_bytes(), libc::S_IFIFO | 0o644, 0, 0)
            .unwrap();
    }
    let names: Vec<String> = live.iter().cloned().collect();
    for (k, n) in names.iter().enumerate() {
        match k % 4 {
            // Within a, to a fresh name (same kind prefix).
            0 => {
                let to = format!("{}-r", n);
                fs.rename(&mut pm, &C, a, n.as_bytes(), a, to.as_bytes(), 0)
                    .unwrap();
                live.remove(n);
                gone.insert(n.clone());
                live.insert(to);
            }
            // Across to b and back under a new name.
            1 => {
                let mid = format!("{}-b", n);
                fs.rename(&mut pm, &C, a, n.as_bytes(), b, mid.as_bytes(), 0)
                    .unwrap();
                let back = format!("{}-ab", n);
                fs.rename(&mut pm, &C, b, mid.as_bytes(), a, back.as_bytes(), 0)
                    .unwrap();
                live.remove(n);
                gone.insert(n.clone());
                live.insert(back);
            }
            // Across to b for good.
            2 => {
                fs.rename(&mut pm, &C, a, n.as_bytes(), b, n.as_bytes(), 0)
                    .unwrap();
                live.remove(n);
                gone.insert(n.clone());
            }
            _ => {}
        }
    }
    // Over existing fifos of b (replacing them).
    for i in 0..100 {
        let from = format!("b{i:04}");
        let onto = format!("b{:04}", 399 - i);
        fs.rename(&mut pm, &C, b, from.as_bytes(), b, onto.as_bytes(), 0)
            .unwrap();
    }
    check_big_dir(&mut fs, &mut pm, a, &live, &gone, "renamed");

    // Everything goes; the empty directories can be removed.
    for n in std::mem::take(&mut live) {
        remove_big(&mut fs, &mut pm, a, &n);
        gone.insert(n);
    }
    check_big_dir(&mut fs, &mut pm, a, &live, &gone, "all removed");
    let rest: Vec<String> = list(&mut fs, &mut pm, b).into_iter().collect();
    for n in rest {
        remove_big(&mut fs, &mut pm, b, &n);
    }
    fs.rmdir(&mut pm, &C, Ino::ROOT, b"a").unwrap();
    fs.rmdir(&mut pm, &C, Ino::ROOT, b"b").unwrap();
    assert_eq!(fs.fsck(&mut pm).unwrap(), Vec::<String>::new());
    // Every block of a and b came back: only the metadata and the root's one entry block
    // stay in use.
    assert_eq!(
        pm.free_blocks(),
        pm.nblocks() - 1 - fs.geo.unwrap().itable_blocks - 1,
    );
}
