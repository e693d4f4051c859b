//! SNFS: the paper's simple network file system, as a kintsugi module.
//!
//! The files live on a server (`kintsugi snfs-server --export DIR`, [`server`]) that exports a
//! real directory over TCP ([`proto`]); the module ([`Snfs`]) forwards each upcall to it. The
//! same module source runs at every protection level.
//!
//! # Data split
//!
//! - **Global (host data, in the block store, reached only through [`Pm`])**: a superblock in
//!   block 0 (magic, version, geometry, the mount's session id, the xid counter, crc32c) and
//!   the **attribute cache**: a hash table of 128-byte records {ino, generation, mode, nlink,
//!   uid, gid, size, blocks, times, rdev, expiry, crc32c}, one bucket per block, found by
//!   `hash(ino) % nbuckets`. `getattr` answers from it while a record is fresh ([`ATTR_TTL`]);
//!   every reply that carries attributes refreshes it and every change invalidates what it
//!   makes stale. Because it is host data, a crashed context's half-done cache update is
//!   rolled back by the host's undo log, and a restarted module finds the cache intact.
//! - **Context-local (each module process)**: the TCP connection ([`client::Client`], opened
//!   lazily, owned by the process that opened it, dropped by `attach` in every generation) and
//!   the request buffers.
//!
//! # Exactly once across a context crash
//!
//! A non-idempotent call (create, mkdir, unlink, rename, link, symlink, mknod, rmdir) first
//! takes the next xid from the superblock's counter (under [`XID_LOCK`]), then calls the
//! server with it. If the context dies after the server did the work, the host rolls the
//! request back, *including the counter*, and retries it: the retry sends the same xid, and
//! the server's duplicate-request cache answers with the first reply instead of `EEXIST`.
//! (At level 5 there is no undo log: the retry gets a fresh xid, like NFS without a DRC.)
//!
//! # Lock order
//!
//! Strict two-phase locking (the host holds every lock until the request ends), one global
//! order: [`XID_LOCK`] first (non-idempotent calls only), then bucket locks in ascending
//! bucket number. A request computes every bucket it will touch and locks them together.
//! Superblock fields other than the counter are written only by `mkfs`.
//!
//! # Node numbers
//!
//! The FUSE inode number of a node is the server's node number: the backing file system's
//! inode number, with the export root swapped to 1 (see [`server`]). It is unique because one
//! export is one backing file system (crossing a mount point answers `EXDEV`), and stable
//! because backing inode numbers are, even across a server restart.
//!
//! # Self-checks and fault sites
//!
//! The superblock and the open-file records carry a crc32c and are checked on every read
//! (magic, version, geometry, count): an inconsistency answers `EUCLEAN`, a module fault for
//! the host. A cache record that fails its checks (crc32c, kind, an expiry more than one TTL
//! ahead) is treated as a miss and overwritten by the refetched attributes: the cache is
//! rebuildable, whereas answering `EUCLEAN` would fail every later request for that node,
//! since the bad record is committed host data. [`Module::fsck`] checks the whole structure
//! (and so still reports bad records until they are refetched). [`SITES`] lists the fault
//! sites.
#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;

use fsapi::{
    Attr, BlockNo, BlockType, Check, Ctx, DirEntry, Errno, Fh, FileKind, FsResult, FsckProblem,
    Ino, Layout, LockId, Module, Pm, SetAttr, Site, SiteKind, StatFs, Timespec,
};

use crate::client::Client;
use crate::proto::{Call, Handle, Op, Reply};

/// How long a cached attribute record answers `getattr` without asking the server.
pub const ATTR_TTL_NS: u64 = 1_000_000_000;
/// The same, for documentation.
pub const ATTR_TTL: std::time::Duration = std::time::Duration::from_nanos(ATTR_TTL_NS);

pub const SUPER_MAGIC: u64 = u64::from_le_bytes(*b"SNFSCACH");
pub const SUPER_VERSION: u32 = 1;
pub const SUPER_TYPE: BlockType = BlockType(1);
pub const CACHE_TYPE: BlockType = BlockType(2);
pub const OPEN_TYPE: BlockType = BlockType(3);
/// Bytes per open-file record.
pub const OPEN_RECORD: usize = 32;
/// Blocks of the open-file table.
const OPEN_BLOCKS: u64 = 4;
/// Open-file record flag: the file's last name is gone, the server keeps it as an orphan.
const ORPHANED: u32 = 1;
const SUPER_SIZE: usize = 64;
pub const RECORD: usize = 128;
const MAX_BUCKETS: u64 = 256;

/// Ranked first: the xid counter in the superblock.
pub const XID_LOCK: LockId = LockId(0x534e_4653_0000_0000);
/// Then the open-file table's blocks, ascending.
const OPEN_LOCK_BASE: u64 = 0x534e_4653_1000_0000;
/// Then the attribute cache's buckets, ascending.
const BUCKET_LOCK_BASE: u64 = 0x534e_4653_2000_0000;

/// The kinds a cache record's mode may have.
const KINDS: [u32; 7] = [
    libc::S_IFREG,
    libc::S_IFDIR,
    libc::S_IFLNK,
    libc::S_IFIFO,
    libc::S_IFCHR,
    libc::S_IFBLK,
    libc::S_IFSOCK,
];

use SiteKind::*;
const fn site(id: u32, kind: SiteKind, what: &'static str) -> Site {
    Site { id, kind, what }
}

/// Every fault site compiled into SNFS, by id.
pub static SITES: &[Site] = &[
    site(
        1,
        MissingCall,
        "write/setattr: the cached attributes are not updated after the change (MissingCall)",
    ),
    site(
        2,
        WrongValue,
        "lookup: the record's expiry is set 1000 TTLs ahead (WrongValue)",
    ),
    site(
        3,
        MissingIf,
        "getattr: the expiry test is left out, stale records are served (MissingIf)",
    ),
    site(
        4,
        WrongArith,
        "cache store: the record goes to the next bucket, outside its lock (WrongArith)",
    ),
    site(
        5,
        MissingAssign,
        "create/mkdir/mknod/symlink: the cached uid is not assigned (0) (MissingAssign)",
    ),
    site(
        6,
        BadUpdate,
        "getattr: the stored record gets an invalid mode kind (0) (BadUpdate)",
    ),
    site(
        7,
        StrayRead,
        "getattr: after reading the bucket, a stray read of shared host memory (StrayRead)",
    ),
    site(
        8,
        StrayWrite,
        "write: after the server's reply, a stray write to shared host memory (StrayWrite)",
    ),
    site(
        9,
        HostAccess,
        "lookup: after reading the bucket, an access to unshared host data (HostAccess)",
    ),
    site(
        10,
        MissingCall,
        "unlink/rmdir/rename: the stale records are not invalidated (MissingCall)",
    ),
];

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

/// The superblock (block 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Super {
    bs: u32,
    nbuckets: u64,
    first: u64,
    session: u64,
    xid: u64,
    /// The open-file table: OPEN_BLOCKS blocks right after the buckets.
    nopen: u64,
}

impl Super {
    fn open_first(&self) -> u64 {
        self.first + self.nbuckets
    }
    fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put_u64(&mut b, 0, SUPER_MAGIC);
        put_u32(&mut b, 8, SUPER_VERSION);
        put_u32(&mut b, 12, self.bs);
        put_u64(&mut b, 16, self.nbuckets);
        put_u64(&mut b, 24, self.first);
        put_u64(&mut b, 32, self.session);
        put_u64(&mut b, 40, self.xid);
        put_u64(&mut b, 48, self.nopen);
        let c = crc32c::crc32c(&b[..56]);
        put_u32(&mut b, 56, c);
        b
    }
    fn decode(b: &[u8; SUPER_SIZE]) -> Result<Super, String> {
        if get_u64(b, 0) != SUPER_MAGIC {
            return Err(format!(
                "superblock magic {:#x} is not SNFS's",
                get_u64(b, 0)
            ));
        }
        if get_u32(b, 8) != SUPER_VERSION {
            return Err(format!("superblock version {}", get_u32(b, 8)));
        }
        if crc32c::crc32c(&b[..56]) != get_u32(b, 56) {
            return Err("superblock checksum mismatch".into());
        }
        let s = Super {
            bs: get_u32(b, 12),
            nbuckets: get_u64(b, 16),
            first: get_u64(b, 24),
            session: get_u64(b, 32),
            xid: get_u64(b, 40),
            nopen: get_u64(b, 48),
        };
        if s.nbuckets == 0 || s.nbuckets > MAX_BUCKETS || s.first == 0 || s.nopen == 0 {
            return Err(format!(
                "superblock geometry: {} buckets from block {}",
                s.nbuckets, s.first
            ));
        }
        Ok(s)
    }
}

/// One attribute-cache record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    attr: Attr,
    expiry: u64,
}

fn ns(t: Timespec) -> u64 {
    (t.sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(t.nsec))
}

impl Rec {
    /// `mode_override`: the BadUpdate site's invalid mode.
    fn encode(&self, mode_override: Option<u32>) -> [u8; RECORD] {
        let a = &self.attr;
        let mut b = [0u8; RECORD];
        put_u64(&mut b, 0, a.ino.0);
        put_u64(&mut b, 8, a.generation);
        let mode = mode_override.unwrap_or(a.kind.mode_bits() | u32::from(a.perm));
        put_u32(&mut b, 16, mode);
        put_u32(&mut b, 20, a.nlink);
        put_u32(&mut b, 24, a.uid);
        put_u32(&mut b, 28, a.gid);
        put_u64(&mut b, 32, a.size);
        put_u64(&mut b, 40, a.blocks);
        put_u64(&mut b, 48, a.atime.sec as u64);
        put_u32(&mut b, 56, a.atime.nsec);
        put_u32(&mut b, 60, a.mtime.nsec);
        put_u64(&mut b, 64, a.mtime.sec as u64);
        put_u64(&mut b, 72, a.ctime.sec as u64);
        put_u32(&mut b, 80, a.ctime.nsec);
        put_u32(&mut b, 84, a.rdev);
        put_u64(&mut b, 88, self.expiry);
        let c = crc32c::crc32c(&b[..124]);
        put_u32(&mut b, 124, c);
        b
    }
    /// `None` for a free slot; `Err` for a record that fails its checks.
    fn decode(b: &[u8]) -> Result<Option<Rec>, String> {
        let ino = get_u64(b, 0);
        if ino == 0 {
            return Ok(None);
        }
        if crc32c::crc32c(&b[..124]) != get_u32(b, 124) {
            return Err(format!("record of ino {ino}: checksum mismatch"));
        }
        let mode = get_u32(b, 16);
        let kind = FileKind::from_mode(mode)
            .ok_or_else(|| format!("record of ino {ino}: mode {mode:#o} has no valid kind"))?;
        let t = |s: usize, n: usize| Timespec {
            sec: get_u64(b, s) as i64,
            nsec: get_u32(b, n),
        };
        Ok(Some(Rec {
            attr: Attr {
                ino: Ino(ino),
                generation: get_u64(b, 8),
                size: get_u64(b, 32),
                blocks: get_u64(b, 40),
                atime: t(48, 56),
                mtime: t(64, 60),
                ctime: t(72, 80),
                kind,
                perm: (mode & 0o7777) as u16,
                nlink: get_u32(b, 20),
                uid: get_u32(b, 24),
                gid: get_u32(b, 28),
                rdev: get_u32(b, 84),
            },
            expiry: get_u64(b, 88),
        }))
    }
}

fn hash(ino: u64) -> u64 {
    // Backing inode numbers are often dense: mix them so neighbours spread over buckets.
    let mut x = ino.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x
}

/// The locks one request holds, taken in the one global order (XID, then buckets ascending).
#[derive(Debug, Default)]
struct Locks {
    held: Vec<LockId>,
}

/// The lock's place in the one global order: XID, open-table blocks, cache buckets.
fn rank(l: LockId) -> u64 {
    l.0 - XID_LOCK.0
}

impl Locks {
    fn lock_all(&mut self, pm: &mut dyn Pm, mut ls: Vec<LockId>) -> FsResult<()> {
        ls.sort_by_key(|l| rank(*l));
        ls.dedup();
        for l in ls {
            if self.held.contains(&l) {
                continue;
            }
            // Never below a held lock: that could deadlock against a request going up.
            if self.held.iter().any(|h| rank(*h) > rank(l)) {
                return Err(Errno(libc::ESTALE));
            }
            pm.lock(l)?;
            self.held.push(l);
        }
        Ok(())
    }
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

/// The SNFS client module.
#[derive(Debug)]
pub struct Snfs {
    client: Client,
    sb: Option<Super>,
}

/// The geometry SNFS would give a store of `nblocks` blocks: (buckets).
fn buckets_for(nblocks: u64) -> u64 {
    (nblocks.saturating_sub(1) / 8).clamp(1, MAX_BUCKETS)
}

impl Snfs {
    /// A module talking to `server` (`HOST:PORT`).
    pub fn new(server: &str) -> Snfs {
        Snfs {
            client: Client::new(server, 0),
            sb: None,
        }
    }

    /// Parses mount options (`server=HOST:PORT`, comma-separated like mount(8) -o).
    pub fn from_opts(opts: &str) -> Result<Snfs, String> {
        let mut server = None;
        for o in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match o.split_once('=') {
                Some(("server", v)) if !v.is_empty() => server = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "snfs: unknown option {o:?}: the only option is server=HOST:PORT"
                    ));
                }
            }
        }
        let server = server.ok_or_else(|| {
            "snfs needs its server: kintsugi mount --module snfs -o server=HOST:PORT MOUNTPOINT \
             (start one with kintsugi snfs-server --listen HOST:PORT --export DIR)"
                .to_string()
        })?;
        Ok(Snfs::new(&server))
    }

    fn sb(&self) -> FsResult<Super> {
        self.sb.ok_or(Errno::EIO)
    }

    fn read_super(pm: &mut dyn Pm) -> FsResult<Super> {
        let mut b = [0u8; SUPER_SIZE];
        pm.bread(BlockNo(0), 0, &mut b)?;
        Super::decode(&b).map_err(|e| {
            tracing::warn!("snfs: {e}");
            Errno::EUCLEAN
        })
    }

    fn bucket_of(&self, ino: u64) -> FsResult<u64> {
        Ok(hash(ino) % self.sb()?.nbuckets)
    }

    fn bucket_lock(b: u64) -> LockId {
        LockId(BUCKET_LOCK_BASE + b)
    }

    fn locks_for(&self, inos: &[u64]) -> FsResult<Vec<LockId>> {
        inos.iter()
            .map(|i| self.bucket_of(*i).map(Self::bucket_lock))
            .collect()
    }

    fn bucket_block(&self, b: u64) -> FsResult<BlockNo> {
        Ok(BlockNo(self.sb()?.first + b))
    }

    fn read_bucket(&self, pm: &mut dyn Pm, b: u64) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; pm.block_size()];
        pm.bread(self.bucket_block(b)?, 0, &mut buf)?;
        Ok(buf)
    }

    /// The fresh cached attributes of `ino` (caller holds its bucket lock). A record that
    /// fails its checks (checksum, kind, an expiry further out than one TTL) is a miss: the
    /// cache can always be refilled from the server, and the caller's store overwrites the
    /// bad record in place. Failing the request instead (`EUCLEAN`) would fail every later
    /// request for that node too, since the bad record is committed host data. `fsck` still
    /// reports such records.
    fn cached(&self, pm: &mut dyn Pm, ino: u64) -> FsResult<Option<Attr>> {
        let b = self.bucket_of(ino)?;
        let buf = self.read_bucket(pm, b)?;
        pm.site(7);
        let now = ns(pm.now());
        for chunk in buf.chunks_exact(RECORD) {
            if get_u64(chunk, 0) != ino {
                continue;
            }
            let r = match Rec::decode(chunk) {
                Ok(Some(r)) if r.expiry <= now.saturating_add(ATTR_TTL_NS) => r,
                Ok(Some(_)) => {
                    tracing::warn!("snfs cache: record of ino {ino} expires too late; refetching");
                    return Ok(None);
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    tracing::warn!("snfs cache: {e}; refetching");
                    return Ok(None);
                }
            };
            if r.expiry > now || pm.site(3) {
                return Ok(Some(r.attr));
            }
            return Ok(None);
        }
        Ok(None)
    }

    /// Stores `attr` in its bucket (caller holds the bucket lock): the slot already holding
    /// that ino, else a free or expired one, else the one expiring first.
    fn store(&self, pm: &mut dyn Pm, attr: &Attr, ttl_mul: u64, bad: bool) -> FsResult<()> {
        let ino = attr.ino.0;
        let mut b = self.bucket_of(ino)?;
        if pm.site(4) {
            b = (b + 1) % self.sb()?.nbuckets;
        }
        let buf = self.read_bucket(pm, b)?;
        let now = ns(pm.now());
        let mut best: Option<(usize, u64)> = None;
        for (i, chunk) in buf.chunks_exact(RECORD).enumerate() {
            let rino = get_u64(chunk, 0);
            let exp = get_u64(chunk, 88);
            let score = if rino == ino {
                0
            } else if rino == 0 || exp <= now {
                1
            } else {
                2 + exp
            };
            if best.is_none_or(|(_, s)| score < s) {
                best = Some((i, score));
            }
            if score == 0 {
                break;
            }
        }
        let (slot, _) = best.ok_or(Errno::EUCLEAN)?;
        let rec = Rec {
            attr: *attr,
            expiry: now.saturating_add(ATTR_TTL_NS.saturating_mul(ttl_mul)),
        };
        let bytes = rec.encode(bad.then_some(0o644));
        pm.bwrite(self.bucket_block(b)?, slot * RECORD, &bytes)
    }

    /// Drops the record of `ino`, if cached (caller holds the bucket lock).
    fn invalidate(&self, pm: &mut dyn Pm, ino: u64) -> FsResult<()> {
        let b = self.bucket_of(ino)?;
        let buf = self.read_bucket(pm, b)?;
        for (i, chunk) in buf.chunks_exact(RECORD).enumerate() {
            if get_u64(chunk, 0) == ino {
                // Zeroing the ino frees the slot; the rest is dead until overwritten.
                pm.bwrite(self.bucket_block(b)?, i * RECORD, &0u64.to_le_bytes())?;
            }
        }
        Ok(())
    }

    fn open_block_of(&self, ino: u64) -> FsResult<u64> {
        Ok(hash(ino.rotate_left(17)) % self.sb()?.nopen)
    }

    fn open_lock(&self, ino: u64) -> FsResult<LockId> {
        Ok(LockId(OPEN_LOCK_BASE + self.open_block_of(ino)?))
    }

    /// `ino`'s open-file record: (block, slot, open count, flags); slot of a free record and
    /// count 0 if it has none. `ENFILE` if it has none and the block is full. Caller holds
    /// the block's lock.
    fn open_rec(&self, pm: &mut dyn Pm, ino: u64) -> FsResult<(BlockNo, usize, u32, u32)> {
        let blk = BlockNo(self.sb()?.open_first() + self.open_block_of(ino)?);
        let mut buf = vec![0u8; pm.block_size()];
        pm.bread(blk, 0, &mut buf)?;
        let mut free = None;
        for (i, r) in buf.chunks_exact(OPEN_RECORD).enumerate() {
            match get_u64(r, 0) {
                0 => {
                    free.get_or_insert(i);
                }
                x if x == ino => {
                    if crc32c::crc32c(&r[..28]) != get_u32(r, 28) || get_u32(r, 8) == 0 {
                        tracing::warn!("snfs open table: record of ino {ino} is corrupt");
                        return Err(Errno::EUCLEAN);
                    }
                    return Ok((blk, i, get_u32(r, 8), get_u32(r, 12)));
                }
                _ => {}
            }
        }
        Ok((blk, free.ok_or(Errno(libc::ENFILE))?, 0, 0))
    }

    fn put_open_rec(
        pm: &mut dyn Pm,
        blk: BlockNo,
        slot: usize,
        ino: u64,
        count: u32,
        flags: u32,
    ) -> FsResult<()> {
        let mut r = [0u8; OPEN_RECORD];
        if count > 0 {
            put_u64(&mut r, 0, ino);
            put_u32(&mut r, 8, count);
            put_u32(&mut r, 12, flags);
            let c = crc32c::crc32c(&r[..28]);
            put_u32(&mut r, 28, c);
        }
        pm.bwrite(blk, slot * OPEN_RECORD, &r)
    }

    /// One more open of `ino` (caller holds its open-table lock).
    fn opened(&self, pm: &mut dyn Pm, ino: u64) -> FsResult<()> {
        let (blk, slot, n, flags) = self.open_rec(pm, ino)?;
        Self::put_open_rec(
            pm,
            blk,
            slot,
            ino,
            n.checked_add(1).ok_or(Errno(libc::ENFILE))?,
            flags,
        )
    }

    /// Marks open files that are losing their last name (caller holds their locks); returns
    /// whether `ino` is open.
    fn mark_orphan(&self, pm: &mut dyn Pm, ino: u64) -> FsResult<bool> {
        let (blk, slot, n, flags) = match self.open_rec(pm, ino) {
            // Not in a full block: not open.
            Err(Errno(libc::ENFILE)) => return Ok(false),
            r => r?,
        };
        if n == 0 {
            return Ok(false);
        }
        Self::put_open_rec(pm, blk, slot, ino, n, flags | ORPHANED)?;
        Ok(true)
    }

    /// Runs `f` with a lock set; releases it at the end.
    fn request<T>(
        &mut self,
        pm: &mut dyn Pm,
        f: impl FnOnce(&mut Self, &mut dyn Pm, &mut Locks) -> FsResult<T>,
    ) -> FsResult<T> {
        self.sb()?;
        let mut l = Locks::default();
        let r = f(self, pm, &mut l);
        let u = l.release(pm);
        match r {
            Ok(v) => u.map(|()| v),
            Err(e) => Err(e),
        }
    }

    /// Takes the next xid (under [`XID_LOCK`]; rolled back with the request if it fails).
    fn next_xid(&mut self, pm: &mut dyn Pm, l: &mut Locks) -> FsResult<u64> {
        l.lock_all(pm, vec![XID_LOCK])?;
        let mut s = Self::read_super(pm)?;
        if Some(s) != self.sb.map(|m| Super { xid: s.xid, ..m }) {
            return Err(Errno::EUCLEAN);
        }
        s.xid += 1;
        pm.bwrite(BlockNo(0), 0, &s.encode())?;
        Ok(s.xid)
    }

    /// Calls the server. A call that changes the server's files is global data: the request is
    /// marked so a later failure escalates (rolled back and retried with the same xid) instead
    /// of being contained with an EIO for a change that did happen.
    fn rpc(&mut self, pm: &mut dyn Pm, ctx: Ctx, xid: Option<u64>, op: Op) -> FsResult<Reply> {
        if op.changes_state() {
            pm.mark_global();
        }
        self.client.call(&Call { xid, ctx, op })
    }

    /// Calls the server for a non-idempotent operation that answers with the new node's
    /// attributes; caches them and invalidates the parent's.
    fn make(&mut self, pm: &mut dyn Pm, ctx: &Ctx, parent: Ino, op: Op) -> FsResult<Attr> {
        let opens = matches!(op, Op::Create { .. });
        self.request(pm, |s, pm, l| {
            let xid = s.next_xid(pm, l)?;
            let mut a = match s.rpc(pm, *ctx, Some(xid), op)? {
                Reply::Attr(a) => a,
                _ => return Err(Errno::EIO),
            };
            let mut ls = s.locks_for(&[a.ino.0, parent.0])?;
            if opens {
                ls.push(s.open_lock(a.ino.0)?);
            }
            l.lock_all(pm, ls)?;
            if opens {
                s.opened(pm, a.ino.0)?;
            }
            if pm.site(5) {
                a.uid = 0;
            }
            s.invalidate(pm, parent.0)?;
            s.store(pm, &a, 1, false)?;
            Ok(a)
        })
    }

    /// Unlink, rmdir, rename: refresh the parents, invalidate what went stale. `victim`: the
    /// (directory, name) whose file loses a name; if that file is open here, the server is
    /// asked to keep it alive (`keep`/`keep_target`) and its open record is marked orphaned.
    fn change(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        mut op: Op,
        victim: Option<(Ino, &[u8])>,
    ) -> FsResult<()> {
        self.request(pm, |s, pm, l| {
            let xid = s.next_xid(pm, l)?;
            if let Some((dir, name)) = victim {
                // Which file the name leads to right now (a miss: nothing to keep).
                let lk = Op::Lookup {
                    dir: Handle(dir.0),
                    name: name.to_vec(),
                };
                if let Ok(Reply::Attr(v)) = s.rpc(pm, *ctx, None, lk)
                    && v.kind != FileKind::Dir
                {
                    l.lock_all(pm, vec![s.open_lock(v.ino.0)?])?;
                    if s.mark_orphan(pm, v.ino.0)? {
                        match &mut op {
                            Op::Unlink { keep, .. } => *keep = true,
                            Op::Rename { keep_target, .. } => *keep_target = true,
                            _ => {}
                        }
                    }
                }
            }
            let (attrs, stale) = match s.rpc(pm, *ctx, Some(xid), op)? {
                Reply::Changed(a, st) => (a, st),
                _ => return Err(Errno::EIO),
            };
            let mut inos: Vec<u64> = attrs.iter().map(|a| a.ino.0).collect();
            inos.extend(&stale);
            l.lock_all(pm, s.locks_for(&inos)?)?;
            if !pm.site(10) {
                for i in &stale {
                    s.invalidate(pm, *i)?;
                }
            }
            for a in &attrs {
                s.store(pm, a, 1, false)?;
            }
            Ok(())
        })
    }

    /// An idempotent call answering attributes, cached afterwards.
    fn attr_call(&mut self, pm: &mut dyn Pm, ctx: &Ctx, ino: Ino, op: Op) -> FsResult<Attr> {
        self.request(pm, |s, pm, l| {
            let a = match s.rpc(pm, *ctx, None, op)? {
                Reply::Attr(a) => a,
                _ => return Err(Errno::EIO),
            };
            l.lock_all(pm, s.locks_for(&[ino.0, a.ino.0])?)?;
            if !pm.site(1) {
                s.store(pm, &a, 1, false)?;
            }
            Ok(a)
        })
    }
}

impl Module for Snfs {
    fn name(&self) -> &'static str {
        "snfs"
    }

    fn mkfs(&mut self, pm: &mut dyn Pm) -> FsResult<()> {
        let bs = pm.block_size();
        if bs < 1024 || !bs.is_multiple_of(RECORD) {
            return Err(Errno::EINVAL);
        }
        let nbuckets = buckets_for(pm.nblocks());
        if nbuckets + OPEN_BLOCKS + 1 > pm.nblocks() {
            return Err(Errno::ENOSPC);
        }
        // The superblock must be block 0 (attach finds it there): a fresh store hands out
        // blocks lowest-first, and the buckets follow contiguously.
        if pm.get_next_blk_typed(SUPER_TYPE)?.0 != 0 {
            return Err(Errno::EINVAL);
        }
        for want in 1..=nbuckets {
            if pm.get_next_blk_typed(CACHE_TYPE)?.0 != want {
                return Err(Errno::EINVAL);
            }
        }
        for want in nbuckets + 1..=nbuckets + OPEN_BLOCKS {
            if pm.get_next_blk_typed(OPEN_TYPE)?.0 != want {
                return Err(Errno::EINVAL);
            }
        }
        // Distinguishes this mount's retries from another mount's at the server.
        let t = pm.now();
        let session = hash(ns(t) ^ (u64::from(std::process::id()) << 40)) | 1;
        let s = Super {
            bs: bs as u32,
            nbuckets,
            first: 1,
            session,
            xid: 0,
            nopen: OPEN_BLOCKS,
        };
        pm.bwrite(BlockNo(0), 0, &s.encode())?;
        self.sb = Some(s);
        self.client.reset(session);
        Ok(())
    }

    fn attach(&mut self, pm: &mut dyn Pm) -> FsResult<()> {
        // Nothing from before this generation is trusted: re-read the geometry, drop the
        // connection (a new one is opened by the first call in this process).
        self.sb = None;
        let s = Self::read_super(pm)?;
        if s.bs as usize != pm.block_size() || s.open_first() + s.nopen > pm.nblocks() {
            return Err(Errno::EUCLEAN);
        }
        self.client.reset(s.session);
        self.sb = Some(s);
        Ok(())
    }

    fn lookup(&mut self, pm: &mut dyn Pm, ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        let op = Op::Lookup {
            dir: Handle(parent.0),
            name: name.to_vec(),
        };
        self.request(pm, |s, pm, l| {
            let a = match s.rpc(pm, *ctx, None, op)? {
                Reply::Attr(a) => a,
                _ => return Err(Errno::EIO),
            };
            l.lock_all(pm, s.locks_for(&[a.ino.0])?)?;
            s.read_bucket(pm, s.bucket_of(a.ino.0)?)?;
            pm.site(9);
            let ttl = if pm.site(2) { 1000 } else { 1 };
            s.store(pm, &a, ttl, false)?;
            Ok(a)
        })
    }

    fn getattr(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Attr> {
        self.request(pm, |s, pm, l| {
            l.lock_all(pm, s.locks_for(&[ino.0])?)?;
            if let Some(a) = s.cached(pm, ino.0)? {
                return Ok(a);
            }
            let a = match s.rpc(pm, Ctx::default(), None, Op::Getattr { h: Handle(ino.0) })? {
                Reply::Attr(a) => a,
                _ => return Err(Errno::EIO),
            };
            if a.ino != ino {
                return Err(Errno::EIO);
            }
            let bad = pm.site(6);
            s.store(pm, &a, 1, bad)?;
            Ok(a)
        })
    }

    fn setattr(&mut self, pm: &mut dyn Pm, ctx: &Ctx, ino: Ino, set: &SetAttr) -> FsResult<Attr> {
        let op = Op::Setattr {
            h: Handle(ino.0),
            set: *set,
        };
        self.attr_call(pm, ctx, ino, op)
    }

    fn read(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        _fh: Fh,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        match self.rpc(
            pm,
            Ctx::default(),
            None,
            Op::Read {
                h: Handle(ino.0),
                off: offset,
                len: size,
            },
        )? {
            Reply::Data(d) => Ok(d),
            _ => Err(Errno::EIO),
        }
    }

    fn write(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        _fh: Fh,
        offset: u64,
        data: &[u8],
    ) -> FsResult<u32> {
        let op = Op::Write {
            h: Handle(ino.0),
            off: offset,
            data: data.to_vec(),
        };
        self.request(pm, |s, pm, l| {
            let (n, a) = match s.rpc(pm, Ctx::default(), None, op)? {
                Reply::Written { n, attr } => (n, attr),
                _ => return Err(Errno::EIO),
            };
            l.lock_all(pm, s.locks_for(&[ino.0])?)?;
            pm.site(8);
            if !pm.site(1) {
                s.store(pm, &a, 1, false)?;
            }
            Ok(n)
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
        let op = Op::Create {
            dir: Handle(parent.0),
            name: name.to_vec(),
            mode,
            umask,
        };
        Ok((self.make(pm, ctx, parent, op)?, Fh(0)))
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
        let op = Op::Mknod {
            dir: Handle(parent.0),
            name: name.to_vec(),
            mode,
            umask,
            rdev,
        };
        self.make(pm, ctx, parent, op)
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
        let op = Op::Mkdir {
            dir: Handle(parent.0),
            name: name.to_vec(),
            mode,
            umask,
        };
        self.make(pm, ctx, parent, op)
    }

    fn unlink(&mut self, pm: &mut dyn Pm, ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<()> {
        let op = Op::Unlink {
            dir: Handle(parent.0),
            name: name.to_vec(),
            keep: false,
        };
        self.change(pm, ctx, op, Some((parent, name)))
    }

    fn rmdir(&mut self, pm: &mut dyn Pm, ctx: &Ctx, parent: Ino, name: &[u8]) -> FsResult<()> {
        let op = Op::Rmdir {
            dir: Handle(parent.0),
            name: name.to_vec(),
        };
        self.change(pm, ctx, op, None)
    }

    fn rename(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let op = Op::Rename {
            dir: Handle(parent.0),
            name: name.to_vec(),
            newdir: Handle(newparent.0),
            newname: newname.to_vec(),
            flags,
            keep_target: false,
        };
        let victim = (flags & fsapi::RENAME_EXCHANGE == 0).then_some((newparent, newname));
        self.change(pm, ctx, op, victim)
    }

    fn link(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        ino: Ino,
        newparent: Ino,
        newname: &[u8],
    ) -> FsResult<Attr> {
        let op = Op::Link {
            h: Handle(ino.0),
            newdir: Handle(newparent.0),
            newname: newname.to_vec(),
        };
        self.make(pm, ctx, newparent, op)
    }

    fn symlink(
        &mut self,
        pm: &mut dyn Pm,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Attr> {
        let op = Op::Symlink {
            dir: Handle(parent.0),
            name: name.to_vec(),
            target: target.to_vec(),
        };
        self.make(pm, ctx, parent, op)
    }

    fn readlink(&mut self, pm: &mut dyn Pm, ino: Ino) -> FsResult<Vec<u8>> {
        match self.rpc(pm, Ctx::default(), None, Op::Readlink { h: Handle(ino.0) })? {
            Reply::Data(d) => Ok(d),
            _ => Err(Errno::EIO),
        }
    }

    fn open(&mut self, pm: &mut dyn Pm, _ctx: &Ctx, ino: Ino, _flags: i32) -> FsResult<Fh> {
        // Handles are stateless, like NFSv3 (every read and write names the node); the open
        // count exists only so an unlinked open file stays alive on the server.
        self.request(pm, |s, pm, l| {
            l.lock_all(pm, vec![s.open_lock(ino.0)?])?;
            s.opened(pm, ino.0)?;
            Ok(Fh(0))
        })
    }

    fn release(&mut self, pm: &mut dyn Pm, ino: Ino, _fh: Fh) -> FsResult<()> {
        self.request(pm, |s, pm, l| {
            l.lock_all(pm, vec![s.open_lock(ino.0)?])?;
            let (blk, slot, n, flags) = match s.open_rec(pm, ino.0) {
                Err(Errno(libc::ENFILE)) => return Ok(()),
                r => r?,
            };
            if n == 0 {
                // Opened before a remount or by a request that was rolled back: nothing held.
                return Ok(());
            }
            if n == 1 && flags & ORPHANED != 0 {
                // Idempotent on the server, so a retry after a crash here is harmless.
                s.rpc(
                    pm,
                    Ctx::default(),
                    None,
                    Op::DropOrphan { h: Handle(ino.0) },
                )?;
            }
            Self::put_open_rec(pm, blk, slot, ino.0, n - 1, flags)
        })
    }

    fn readdir(
        &mut self,
        pm: &mut dyn Pm,
        ino: Ino,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<DirEntry>> {
        match self.rpc(
            pm,
            Ctx::default(),
            None,
            Op::Readdir {
                h: Handle(ino.0),
                cookie: offset,
                max: max.min(4096) as u32,
            },
        )? {
            Reply::Entries(e) => Ok(e),
            _ => Err(Errno::EIO),
        }
    }

    fn statfs(&mut self, pm: &mut dyn Pm) -> FsResult<StatFs> {
        match self.rpc(pm, Ctx::default(), None, Op::Statfs)? {
            Reply::StatFs(s) => Ok(s),
            _ => Err(Errno::EIO),
        }
    }

    fn fsync(&mut self, pm: &mut dyn Pm, ino: Ino, _fh: Fh, datasync: bool) -> FsResult<()> {
        match self.rpc(
            pm,
            Ctx::default(),
            None,
            Op::Fsync {
                h: Handle(ino.0),
                datasync,
            },
        )? {
            Reply::Ok => Ok(()),
            _ => Err(Errno::EIO),
        }
    }

    fn flush(&mut self, _pm: &mut dyn Pm, _ino: Ino, _fh: Fh) -> FsResult<()> {
        Ok(())
    }

    fn sites(&self) -> &'static [Site] {
        SITES
    }

    fn fsck(&mut self, pm: &mut dyn Pm) -> FsResult<Vec<FsckProblem>> {
        let mut out = Vec::new();
        let s = match Self::read_super(pm) {
            Ok(s) => s,
            Err(_) => {
                let mut b = [0u8; SUPER_SIZE];
                pm.bread(BlockNo(0), 0, &mut b)?;
                out.push(Super::decode(&b).err().unwrap_or_default());
                return Ok(out);
            }
        };
        if s.bs as usize != pm.block_size() || s.open_first() + s.nopen > pm.nblocks() {
            out.push(format!(
                "superblock geometry ({} buckets from block {}, block size {}) does not fit the store",
                s.nbuckets, s.first, s.bs
            ));
            return Ok(out);
        }
        let mut seen = std::collections::HashMap::new();
        let mut buf = vec![0u8; pm.block_size()];
        for b in 0..s.nbuckets {
            pm.bread(BlockNo(s.first + b), 0, &mut buf)?;
            for (i, chunk) in buf.chunks_exact(RECORD).enumerate() {
                match Rec::decode(chunk) {
                    Ok(None) => {}
                    Ok(Some(r)) => {
                        let ino = r.attr.ino.0;
                        if hash(ino) % s.nbuckets != b {
                            out.push(format!(
                                "bucket {b} slot {i}: record of ino {ino} belongs in bucket {}",
                                hash(ino) % s.nbuckets
                            ));
                        }
                        if let Some((pb, pi)) = seen.insert(ino, (b, i)) {
                            out.push(format!(
                                "ino {ino} cached twice: bucket {pb} slot {pi} and bucket {b} slot {i}"
                            ));
                        }
                    }
                    Err(e) => out.push(format!("bucket {b} slot {i}: {e}")),
                }
            }
        }
        for b in 0..s.nopen {
            pm.bread(BlockNo(s.open_first() + b), 0, &mut buf)?;
            for (i, r) in buf.chunks_exact(OPEN_RECORD).enumerate() {
                let ino = get_u64(r, 0);
                if ino == 0 {
                    continue;
                }
                if crc32c::crc32c(&r[..28]) != get_u32(r, 28) {
                    out.push(format!("open table block {b} slot {i}: checksum mismatch"));
                } else if get_u32(r, 8) == 0 || get_u32(r, 12) & !ORPHANED != 0 {
                    out.push(format!(
                        "open table block {b} slot {i}: ino {ino} has count {} flags {:#x}",
                        get_u32(r, 8),
                        get_u32(r, 12)
                    ));
                }
                if hash(ino.rotate_left(17)) % s.nopen != b {
                    out.push(format!(
                        "open table block {b} slot {i}: ino {ino} in the wrong block"
                    ));
                }
            }
        }
        Ok(out)
    }

    fn layouts(&self) -> Vec<Layout> {
        let kinds: Vec<u64> = KINDS.iter().map(|k| u64::from(*k)).collect();
        vec![
            Layout {
                ty: SUPER_TYPE,
                name: "snfs superblock",
                record: SUPER_SIZE,
                live: Some((0, 8)),
                checks: vec![
                    Check::OneOf {
                        field: "magic",
                        off: 0,
                        width: 8,
                        mask: u64::MAX,
                        values: vec![SUPER_MAGIC],
                    },
                    Check::OneOf {
                        field: "version",
                        off: 8,
                        width: 4,
                        mask: u64::from(u32::MAX),
                        values: vec![u64::from(SUPER_VERSION)],
                    },
                    Check::Range {
                        field: "nbuckets",
                        off: 16,
                        width: 8,
                        min: 1,
                        max: MAX_BUCKETS,
                    },
                    Check::Range {
                        field: "first bucket block",
                        off: 24,
                        width: 8,
                        min: 1,
                        max: 1,
                    },
                ],
            },
            Layout {
                ty: CACHE_TYPE,
                name: "snfs attribute-cache record",
                record: RECORD,
                live: Some((0, 8)),
                checks: vec![
                    Check::OneOf {
                        field: "mode kind",
                        off: 16,
                        width: 4,
                        mask: u64::from(libc::S_IFMT),
                        values: kinds,
                    },
                    Check::Range {
                        field: "nlink",
                        off: 20,
                        width: 4,
                        min: 0,
                        max: u64::from(u32::MAX >> 1),
                    },
                    Check::Range {
                        field: "size",
                        off: 32,
                        width: 8,
                        min: 0,
                        max: i64::MAX as u64,
                    },
                ],
            },
            Layout {
                ty: OPEN_TYPE,
                name: "snfs open-file record",
                record: OPEN_RECORD,
                live: Some((0, 8)),
                checks: vec![
                    Check::Range {
                        field: "open count",
                        off: 8,
                        width: 4,
                        min: 1,
                        max: u64::from(u32::MAX),
                    },
                    Check::OneOf {
                        field: "flags",
                        off: 12,
                        width: 4,
                        mask: u64::from(u32::MAX),
                        values: vec![0, u64::from(ORPHANED)],
                    },
                ],
            },
        ]
    }
}

#[cfg(test)]
mod tests;
