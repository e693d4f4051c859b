//! The protection manager: the [`fsapi::Pm`] a module gets, and the undo log behind it.
//!
//! Level 5 uses it without a log (direct calls, no protection). Level 4 gives each request an
//! [`UndoLog`] in shared memory: before any host data changes, the old value is appended and
//! the log length published; only then is the change made. So whatever instant the module
//! process dies at, the host can walk the log backwards and restore the exact state from
//! before the request (including releasing the locks it took), without the module's help.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use fsapi::{BlockNo, BlockType, CommitView, Errno, FsResult, Ino, LockId, Pm, Timespec};
use sys::fs_ring::SharedRegion;

use crate::check::{Layouts, StoreView};
use crate::store::{BLOCK_SIZE, Owner, Store};

/// How the protection manager reaches the store's blocks from the module's process
/// (shared-memory protection, levels 1 and 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Levels 3–5: the block area is mapped read-write (or trapped, under containment).
    Mapped,
    /// Level 2: mapped read-only for the module; the manager writes through the memfd.
    ReadOnly,
    /// Level 1: inaccessible to the module (`PROT_NONE`); the manager reads and writes through
    /// the memfd, so the region never becomes accessible, not even for the span of a call.
    Unmapped,
}

/// Level 1–3 duplication: what a request wrote, kept in the manager's private copy until
/// write-back. Byte-exact (a mask per block), so write-back touches only the bytes the
/// request wrote: a concurrent context's committed change elsewhere in the block survives.
#[derive(Debug)]
struct Patch {
    data: Vec<u8>,
    mask: Vec<u64>,
}

impl Patch {
    fn new() -> Patch {
        Patch {
            data: vec![0; BLOCK_SIZE],
            mask: vec![0; BLOCK_SIZE / 64],
        }
    }

    /// Word at a time: SMFS writes whole 4 KiB data blocks through here, and a byte loop
    /// over the mask was a visible share of a level 1–3 request (`kintsugi bench fs`).
    fn put(&mut self, off: usize, bytes: &[u8]) {
        let end = off + bytes.len();
        self.data[off..end].copy_from_slice(bytes);
        let mut i = off;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let m = if n == 64 {
                !0
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.mask[i / 64] |= m;
            i += n;
        }
    }

    /// The written byte ranges inside `[lo, hi)`, merged, ascending, found by scanning the
    /// mask a word at a time.
    fn runs(&self, lo: usize, hi: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut i = lo;
        while i < hi {
            let bit = i % 64;
            let avail = (64 - bit).min(hi - i);
            let word = self.mask[i / 64] >> bit;
            let z = word.trailing_zeros() as usize;
            if z >= avail {
                i += avail;
                continue;
            }
            let s = i + z;
            let e = (s + (word >> z).trailing_ones() as usize).min(hi);
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
            i = e;
        }
        out
    }

    /// Overlays the written bytes of `[off, off + buf.len())` onto `buf`.
    fn overlay(&self, off: usize, buf: &mut [u8]) {
        for (s, e) in self.runs(off, off + buf.len()) {
            buf[s - off..e - off].copy_from_slice(&self.data[s..e]);
        }
    }

    /// The written byte ranges, merged, ascending.
    fn ranges(&self) -> Vec<(usize, usize)> {
        self.runs(0, BLOCK_SIZE)
    }
}

/// Why a level 1–3 write-back did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteBackError {
    /// A semantic check failed: the update is invalid and nothing of it was applied.
    Rejected(String),
    /// The undo log is full (or the store refused): the request fails like any refused one.
    Errno(Errno),
}

/// A fault to inject into the module, for tests, the demo and `kintsugi fsctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fault {
    /// `panic!` in module code.
    Panic,
    /// A real SIGSEGV (write through a null pointer).
    Segv,
    /// SIGKILL to the module process.
    Kill,
    /// Stop answering (the host's per-request deadline catches it).
    Hang,
    /// A wild write into the lock table (the one piece of global data every context may
    /// write, so it is never trapped), then SIGSEGV: containment's verification must catch it.
    Scribble,
}

impl Fault {
    pub fn parse(s: &str) -> Option<Fault> {
        Some(match s {
            "panic" => Fault::Panic,
            "segv" => Fault::Segv,
            "kill" => Fault::Kill,
            "hang" => Fault::Hang,
            "scribble" => Fault::Scribble,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Fault::Panic => "panic",
            Fault::Segv => "segv",
            Fault::Kill => "kill",
            Fault::Hang => "hang",
            Fault::Scribble => "scribble",
        }
    }
    pub(crate) fn code(self) -> u32 {
        match self {
            Fault::Panic => 1,
            Fault::Segv => 2,
            Fault::Kill => 3,
            Fault::Hang => 4,
            Fault::Scribble => 5,
        }
    }
    pub(crate) fn from_code(c: u32) -> Option<Fault> {
        Some(match c {
            1 => Fault::Panic,
            2 => Fault::Segv,
            3 => Fault::Kill,
            4 => Fault::Hang,
            5 => Fault::Scribble,
            _ => return None,
        })
    }
    /// Makes the fault happen, here and now.
    pub fn fire(self) {
        match self {
            Fault::Panic => panic!("injected fault: module panic"),
            Fault::Segv => sys::fault::segv(),
            Fault::Kill => {
                let _ = sys::process::kill(sys::Pid::this(), libc::SIGKILL);
                std::thread::sleep(Duration::from_secs(5));
            }
            Fault::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            // Without a store at hand (an idle fault) the scribble is just the crash.
            Fault::Scribble => sys::fault::segv(),
        }
    }
}

const K_BLOCK: u32 = 1;
const K_BIT: u32 = 2;
const K_REF: u32 = 3;
const K_LOCK: u32 = 4;
/// A block freed by the request: freed for real only when it commits.
const K_FREE: u32 = 5;
const ENTRY_HDR: usize = 24;
const LOG_HDR: usize = 64;

/// One request's undo log: a region of shared memory `[used: u64][entries…]`.
#[derive(Debug, Clone, Copy)]
pub struct UndoLog<'a> {
    region: &'a SharedRegion,
    base: usize,
    cap: usize,
}

impl<'a> UndoLog<'a> {
    /// The log occupying `cap` bytes at `base` of `region` (8-aligned).
    pub fn new(region: &'a SharedRegion, base: usize, cap: usize) -> UndoLog<'a> {
        UndoLog { region, base, cap }
    }

    fn used(&self) -> &std::sync::atomic::AtomicU64 {
        self.region.atomic_u64(self.base)
    }

    /// Bytes of entries recorded.
    pub fn len(&self) -> usize {
        self.used().load(Ordering::Acquire) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every entry (after a rollback, or a log that holds no deferred work).
    pub fn clear(&self) {
        self.used().store(0, Ordering::Release);
    }

    /// The request committed: carries out its deferred frees, forgets the log, releases the
    /// owner's locks. Returns the locks released.
    pub fn commit(&self, store: &Store, owner: Owner) -> usize {
        self.walk(|kind, a, _b, _at, _len| {
            if kind == K_FREE {
                store.set_allocated(a, false);
            }
            true
        });
        self.clear();
        store.release_all(owner)
    }

    /// Visits entries newest first with `(kind, a, b, data offset, data len)` until `f` says
    /// stop or an entry does not decode. Returns the number visited.
    fn walk(&self, mut f: impl FnMut(u32, u64, u64, usize, usize) -> bool) -> usize {
        let mut end = self.len().min(self.cap - LOG_HDR);
        let mut n = 0;
        while end >= 8 + ENTRY_HDR {
            let mut w = [0u8; 8];
            self.region.read(self.base + LOG_HDR + end - 8, &mut w);
            let size = u64::from_le_bytes(w) as usize;
            if size < ENTRY_HDR || size + 8 > end {
                tracing::warn!(
                    end,
                    size,
                    "undo log entry does not decode; stopping the walk here"
                );
                break;
            }
            let at = self.base + LOG_HDR + end - 8 - size;
            let mut hdr = [0u8; ENTRY_HDR];
            self.region.read(at, &mut hdr);
            let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
            let len = u32::from_le_bytes(hdr[4..8].try_into().expect("4")) as usize;
            let a = u64::from_le_bytes(hdr[8..16].try_into().expect("8"));
            let b = u64::from_le_bytes(hdr[16..24].try_into().expect("8"));
            if ENTRY_HDR + len > size || !f(kind, a, b, at + ENTRY_HDR, len) {
                break;
            }
            n += 1;
            end -= size + 8;
        }
        n
    }

    /// Appends an entry and publishes it. Must happen before the change it undoes.
    fn append(&self, kind: u32, a: u64, b: u64, data: &[u8]) -> FsResult<()> {
        let used = self.len();
        let size = (ENTRY_HDR + data.len()).next_multiple_of(8);
        // Entries are followed by their own size, so the log can be walked backwards.
        if LOG_HDR + used + size + 8 > self.cap {
            return Err(Errno::ENOSPC);
        }
        let at = self.base + LOG_HDR + used;
        let mut hdr = [0u8; ENTRY_HDR];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
        hdr[8..16].copy_from_slice(&a.to_le_bytes());
        hdr[16..24].copy_from_slice(&b.to_le_bytes());
        self.region.write(at, &hdr);
        self.region.write(at + ENTRY_HDR, data);
        self.region.write(at + size, &(size as u64).to_le_bytes());
        self.used()
            .store((used + size + 8) as u64, Ordering::Release);
        Ok(())
    }

    /// Undoes every entry, newest first, then clears the log. `owner`'s locks are released.
    /// Returns the number of entries undone. Entries that do not decode (a module that
    /// scribbled on its log) stop the walk: what precedes them is still undone in order.
    pub fn rollback(&self, store: &Store, owner: Owner) -> usize {
        let n = self.walk(|kind, a, b, at, len| {
            match kind {
                K_BLOCK if len <= BLOCK_SIZE => {
                    let mut old = vec![0u8; len];
                    self.region.read(at, &mut old);
                    store.write(a, b as usize, &old);
                }
                K_BIT => {
                    store.set_allocated(a, b != 0);
                }
                K_REF => {
                    store.add_refs(a, -(b as i64 as i32));
                }
                K_LOCK | K_FREE => {} // locks released wholesale below; frees never happened
                _ => {
                    tracing::warn!(kind, "unknown undo log entry kind; stopping rollback here");
                    return false;
                }
            }
            true
        });
        store.release_all(owner);
        self.clear();
        n
    }
}

/// The protection manager for one request.
#[derive(Debug)]
pub struct HostPm<'a> {
    store: &'a Store,
    log: Option<UndoLog<'a>>,
    owner: Owner,
    /// Blocks allocated during this request: their old contents need no logging (they were
    /// free, and rollback frees them again).
    fresh: HashSet<u64>,
    /// Blocks that held data at the start of this request and were freed during it.
    freed: HashSet<u64>,
    fault: Option<Fault>,
    mutated: bool,
    sites: Option<SiteCtx<'a>>,
    access: Access,
    /// Levels 1–3: the module's layouts and the request's private copies.
    dup: Option<(&'a Layouts, BTreeMap<u64, Patch>)>,
    /// The context's global-write flag (containment): set when write-back starts.
    gflag: Option<&'a AtomicU32>,
    /// Where `lock` publishes its waits and finds its victim flag: the ring and this context's
    /// slot (level 4). Without it a wait only ends with the lock or the last-resort timeout.
    waits: Option<(&'a crate::ring::Ring, usize)>,
    /// What the commit check sees ([`HostPm::check_commit`]): every block allocated during
    /// the request (freed again or not), every block written, every lock taken.
    born: HashSet<u64>,
    written: BTreeSet<u64>,
    locked: Vec<LockId>,
}

/// Where the armed fault site lives: the ring header at levels 1–4 (every context sees it),
/// plain host memory at level 5.
pub trait SiteWords: Sync + std::fmt::Debug {
    /// `(armed site, client pid or 0, seed, activation counter)`.
    fn site(&self) -> (u32, u32, u64, &AtomicU64);
}

/// The armed-site words of a level-5 host (no ring).
#[derive(Debug, Default)]
pub struct LocalSites {
    armed: AtomicU32,
    pid: AtomicU32,
    seed: AtomicU64,
    hits: AtomicU64,
}

impl LocalSites {
    pub fn arm(&self, site: u32, pid: u32, seed: u64) {
        self.armed.store(0, Ordering::SeqCst);
        self.pid.store(pid, Ordering::SeqCst);
        self.seed.store(seed, Ordering::SeqCst);
        // Disarming keeps the count, so it can be read afterwards (as the ring does).
        if site != 0 {
            self.hits.store(0, Ordering::SeqCst);
        }
        self.armed.store(site, Ordering::SeqCst);
    }
}

impl SiteWords for LocalSites {
    fn site(&self) -> (u32, u32, u64, &AtomicU64) {
        (
            self.armed.load(Ordering::SeqCst),
            self.pid.load(Ordering::SeqCst),
            self.seed.load(Ordering::SeqCst),
            &self.hits,
        )
    }
}

/// Targets of issue 5's stray-access probes: an address in the shared block area (the store's
/// block 0) and one in host-private data.
#[derive(Debug, Clone, Copy, Default)]
pub struct Probes {
    pub shared: usize,
    pub host: usize,
}

/// What `lock` answers a request that must give up its wait: the host's deadlock checker
/// chose it as the victim of a cycle (or, without a checker, the last-resort timeout passed).
/// The module propagates it like any error; the host tells the two cases apart by its own
/// victim flag, not by this value.
pub const DEADLOCK_VICTIM: Errno = Errno(libc::EDEADLK);

/// A lock wait longer than this gives up even if no checker broke it (detection off, or a
/// holder outside the contexts): generous, so that only a real stall reaches it.
pub const LOCK_LAST_RESORT: Duration = Duration::from_secs(30);

/// What the protection manager needs to answer [`Pm::site`]: the armed site lives in the
/// ring header (the host arms it; every context sees it), the kinds in the module's table.
#[derive(Debug, Clone, Copy)]
pub struct SiteCtx<'a> {
    pub words: &'a dyn SiteWords,
    pub sites: &'static [fsapi::Site],
    /// The client process the request runs for (the campaign fires a site for one client).
    pub client_pid: u32,
    pub probes: Probes,
}

impl<'a> HostPm<'a> {
    /// `log: None` is level 5 (no undo).
    pub fn new(
        store: &'a Store,
        log: Option<UndoLog<'a>>,
        owner: Owner,
        fault: Option<Fault>,
    ) -> HostPm<'a> {
        HostPm {
            store,
            log,
            owner,
            fresh: HashSet::new(),
            freed: HashSet::new(),
            fault,
            mutated: false,
            sites: None,
            access: Access::Mapped,
            dup: None,
            gflag: None,
            waits: None,
            born: HashSet::new(),
            written: BTreeSet::new(),
            locked: Vec::new(),
        }
    }

    /// Levels 1–2: how the block area may be reached from this process.
    pub fn with_access(mut self, access: Access) -> HostPm<'a> {
        self.access = access;
        self
    }

    /// Levels 1–3: writes go to private copies, checked against `layouts` and applied by
    /// [`HostPm::write_back`].
    pub fn with_duplication(mut self, layouts: &'a Layouts) -> HostPm<'a> {
        self.dup = Some((layouts, BTreeMap::new()));
        self
    }

    /// Containment: the flag to set when this request writes global data.
    pub fn with_global_flag(mut self, flag: &'a AtomicU32) -> HostPm<'a> {
        self.gflag = Some(flag);
        self
    }

    fn sread(&self, b: u64, off: usize, buf: &mut [u8]) -> bool {
        match self.access {
            Access::Unmapped => self.store.read_fd(b, off, buf),
            _ => self.store.read(b, off, buf),
        }
    }

    /// Block `b` as this request sees it: the store, with the request's own copies over it
    /// (levels 1–3). `false` if the store cannot be read there.
    fn read_seen(&self, b: u64, off: usize, buf: &mut [u8]) -> bool {
        if !self.sread(b, off, buf) {
            return false;
        }
        if let Some((_, patches)) = &self.dup
            && let Some(p) = patches.get(&b)
        {
            p.overlay(off, buf);
        }
        true
    }

    fn swrite(&self, b: u64, off: usize, data: &[u8]) -> bool {
        match self.access {
            Access::Mapped => self.store.write(b, off, data),
            _ => self.store.write_fd(b, off, data),
        }
    }

    fn szero(&self, b: u64) {
        match self.access {
            Access::Mapped => self.store.zero(b),
            _ => {
                self.store.write_fd(b, 0, &[0u8; BLOCK_SIZE]);
            }
        }
    }

    /// Writes `data` to the store now, logging the old bytes first (unless the block is fresh
    /// in this request).
    fn apply(&mut self, b: u64, off: usize, data: &[u8]) -> FsResult<()> {
        if self.log.is_some() && !self.fresh.contains(&b) {
            let mut old = vec![0u8; data.len()];
            self.sread(b, off, &mut old);
            return self.apply_over(b, off, &old, data);
        }
        self.apply_over(b, off, &[], data)
    }

    /// [`HostPm::apply`] with the old bytes already read (`old`, as long as `data`; only read
    /// when the change is logged).
    fn apply_over(&mut self, b: u64, off: usize, old: &[u8], data: &[u8]) -> FsResult<()> {
        if self.log.is_some() && !self.fresh.contains(&b) {
            self.log(K_BLOCK, b, off as u64, old)?;
        }
        if self.swrite(b, off, data) {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }

    /// Levels 1–3, end of a request the module answered successfully: checks every record the
    /// request changed, then writes the copies back (undo-logged, global-write flag set). A
    /// failed check applies nothing. Returns the blocks written.
    pub fn write_back(&mut self) -> Result<usize, WriteBackError> {
        let Some((layouts, patches)) = self.dup.take() else {
            return Ok(0);
        };
        if patches.is_empty() {
            return Ok(0);
        }
        // One read of each written block serves both the check (store plus copy) and the undo
        // records (the store's old bytes): at level 1 every read is a `pread`. The request
        // holds the locks of the bytes it writes (two-phase locking), so they cannot change
        // between this read and the write below.
        let mut bases = Vec::with_capacity(patches.len());
        {
            let view = View {
                pm: self,
                patches: &patches,
            };
            for (&b, p) in &patches {
                let mut base = vec![0u8; BLOCK_SIZE];
                if !self.sread(b, 0, &mut base) {
                    return Err(WriteBackError::Errno(Errno::EIO));
                }
                let ranges = p.ranges();
                let ty = self.store.block_type(b);
                if layouts.get(ty).is_some() {
                    let mut img = base.clone();
                    p.overlay(0, &mut img);
                    crate::check::check_block(layouts, &view, b, ty, &img, &ranges)
                        .map_err(WriteBackError::Rejected)?;
                }
                bases.push((b, base, ranges));
            }
        }
        if let Some(f) = self.gflag {
            f.store(1, Ordering::SeqCst);
        }
        for (b, base, ranges) in bases {
            let p = &patches[&b];
            for (s, e) in ranges {
                self.apply_over(b, s, &base[s..e], &p.data[s..e])
                    .map_err(WriteBackError::Errno)?;
            }
        }
        Ok(patches.len())
    }

    /// Levels 1–3, end of a request the module answered successfully, before write-back: the
    /// module's own incremental consistency check of what the request changed
    /// ([`fsapi::Module::check_commit`]). `Err` says what is wrong.
    pub fn check_commit(&self, module: &dyn fsapi::Module) -> Result<(), String> {
        if !self.mutated || self.dup.is_none() {
            return Ok(());
        }
        module.check_commit(self)
    }

    /// Lets the deadlock checker see this request's lock waits and interrupt them (level 4:
    /// context `slot` of `ring`).
    pub fn with_lock_waits(mut self, ring: &'a crate::ring::Ring, slot: usize) -> HostPm<'a> {
        // A new attempt waits for nothing yet: words left by an attempt that died while waiting
        // must not put this one into a cycle it is not in.
        ring.end_lock_wait(slot);
        self.waits = Some((ring, slot));
        self
    }

    /// Lets fault sites fire (issue 6's campaign).
    pub fn with_sites(mut self, sites: SiteCtx<'a>) -> HostPm<'a> {
        self.sites = Some(sites);
        self
    }

    /// Fires an armed fault once the request has changed host data, so rollback has real work.
    fn checkpoint(&mut self) {
        if self.mutated
            && let Some(f) = self.fault.take()
        {
            self.fire(f);
        }
    }

    /// Fires an armed fault that found no mid-request moment (read-only requests).
    pub fn finish(&mut self) {
        if let Some(f) = self.fault.take() {
            self.fire(f);
        }
    }

    fn fire(&self, f: Fault) {
        if f == Fault::Scribble {
            self.store.scribble_lock_table();
        }
        f.fire();
    }

    fn log(&self, kind: u32, a: u64, b: u64, data: &[u8]) -> FsResult<()> {
        match &self.log {
            Some(l) => l.append(kind, a, b, data),
            None => Ok(()),
        }
    }
}

impl Pm for HostPm<'_> {
    fn block_size(&self) -> usize {
        BLOCK_SIZE
    }
    fn nblocks(&self) -> u64 {
        self.store.nblocks()
    }
    fn free_blocks(&self) -> u64 {
        self.store.free_blocks()
    }
    fn bread(&mut self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        self.checkpoint();
        if self.read_seen(b.0, off, buf) {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }
    fn bwrite(&mut self, b: BlockNo, off: usize, data: &[u8]) -> FsResult<()> {
        self.checkpoint();
        if !self.store.is_allocated(b.0) || off + data.len() > BLOCK_SIZE {
            return Err(Errno::EIO);
        }
        self.mutated = true;
        self.written.insert(b.0);
        if let Some((_, patches)) = &mut self.dup {
            patches.entry(b.0).or_insert_with(Patch::new).put(off, data);
            return Ok(());
        }
        self.apply(b.0, off, data)
    }
    fn get_next_blk(&mut self) -> FsResult<BlockNo> {
        self.get_next_blk_typed(BlockType::DATA)
    }
    fn mark_global(&mut self) {
        if let Some(f) = self.gflag {
            f.store(1, Ordering::SeqCst);
        }
    }
    fn get_next_blk_typed(&mut self, ty: BlockType) -> FsResult<BlockNo> {
        self.checkpoint();
        // Take first (one atomic step, so a concurrent context cannot get the same block),
        // log second. A death in between leaks one allocated, unreferenced block, which fsck
        // reports; the other order could free a block another context had taken meanwhile.
        let b = self.store.take_free().ok_or(Errno::ENOSPC)?;
        if let Err(e) = self.log(K_BIT, b, 0, &[]) {
            self.store.set_allocated(b, false);
            return Err(e);
        }
        if self.freed.contains(&b) {
            // Freed earlier in this same request: its old content is live again if we roll
            // back, so save it before zero-filling.
            let mut old = vec![0u8; BLOCK_SIZE];
            self.sread(b, 0, &mut old);
            self.log(K_BLOCK, b, 0, &old)?;
        }
        self.szero(b);
        self.store.set_block_type(b, ty.0);
        if let Some((_, patches)) = &mut self.dup {
            patches.remove(&b);
        }
        self.fresh.insert(b);
        self.born.insert(b);
        self.mutated = true;
        Ok(BlockNo(b))
    }
    fn free_blk(&mut self, b: BlockNo) -> FsResult<()> {
        self.checkpoint();
        if !self.store.is_allocated(b.0) {
            return Err(Errno::EIO);
        }
        if self.log.is_some() {
            // Deferred to commit: a block freed now could be taken by a concurrent context
            // and then resurrected by our rollback. Freed twice in one request is the same
            // double free it would be if it were immediate.
            if !self.freed.insert(b.0) {
                return Err(Errno::EIO);
            }
            self.log(K_FREE, b.0, 0, &[])?;
        } else {
            self.store.set_allocated(b.0, false);
        }
        self.fresh.remove(&b.0);
        if let Some((_, patches)) = &mut self.dup {
            // Its copy is moot: the block goes back to the store when the request commits.
            patches.remove(&b.0);
        }
        self.mutated = true;
        Ok(())
    }
    fn vref(&mut self, ino: Ino) -> FsResult<()> {
        self.checkpoint();
        if ino.0 >= self.store.nblocks() {
            return Err(Errno::EINVAL);
        }
        self.log(K_REF, ino.0, 1, &[])?;
        self.store.add_refs(ino.0, 1).ok_or(Errno::EINVAL)?;
        self.mutated = true;
        Ok(())
    }
    fn vrele(&mut self, ino: Ino) -> FsResult<u32> {
        self.checkpoint();
        if self.store.refs(ino.0) == 0 {
            return Err(Errno::EINVAL);
        }
        self.log(K_REF, ino.0, (-1i64) as u64, &[])?;
        let left = self.store.add_refs(ino.0, -1).ok_or(Errno::EINVAL)?;
        self.mutated = true;
        Ok(left)
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.store.refs(ino.0)
    }
    fn lock(&mut self, l: LockId) -> FsResult<()> {
        self.checkpoint();
        let slot = Store::lock_slot(l.0);
        let mut started: Option<std::time::Instant> = None;
        let mut nap = Duration::from_micros(20);
        loop {
            if let Some(first) = self.store.try_lock(slot, self.owner) {
                if started.is_some()
                    && let Some((ring, i)) = self.waits
                {
                    ring.set_lock_wait(i, None);
                }
                if first {
                    // Recorded so the log shows what the request held; rollback releases
                    // all of the owner's locks.
                    self.log(K_LOCK, l.0, 0, &[])?;
                    self.locked.push(l);
                }
                return Ok(());
            }
            let since = *started.get_or_insert_with(|| {
                // Published once per wait: the host's deadlock checker (`deadlock.rs`) pairs
                // it with the lock table's holder to build the wait-for graph.
                if let Some((ring, i)) = self.waits {
                    ring.set_lock_wait(i, Some(slot));
                }
                std::time::Instant::now()
            });
            match self.waits {
                Some((ring, i)) => {
                    let victim = ring.victim_word(i);
                    if victim.load(Ordering::SeqCst) != 0 {
                        // The checker chose this request to break a cycle. Give up with the
                        // distinguished error; the host (which knows it chose us) rolls the
                        // request back, which takes our locks away, and runs it again.
                        ring.set_lock_wait(i, None);
                        return Err(DEADLOCK_VICTIM);
                    }
                    if since.elapsed() > LOCK_LAST_RESORT {
                        ring.set_lock_wait(i, None);
                        return Err(DEADLOCK_VICTIM);
                    }
                    // Sleep on the victim flag, so the checker's verdict wakes us at once;
                    // the lock's release has no wake-up, hence the short, growing naps.
                    let _ = sys::fs_ring::futex_wait(victim, 0, Some(nap));
                }
                None if since.elapsed() > LOCK_LAST_RESORT => return Err(DEADLOCK_VICTIM),
                None => std::thread::sleep(nap),
            }
            nap = (nap * 2).min(Duration::from_micros(200));
        }
    }
    fn unlock(&mut self, l: LockId) -> FsResult<()> {
        // Strict two-phase locking: the lock stays held until the request ends (the host
        // releases everything then), so rolling this request back can never overwrite a change
        // another request made under the same lock after an early release.
        if self.store.lock_holder(Store::lock_slot(l.0)) == Some(self.owner) {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }
    fn site(&mut self, id: u32) -> bool {
        let Some(sc) = self.sites else {
            return false;
        };
        let (armed, pid, seed, hits) = sc.words.site();
        if armed == 0 || armed != id || (pid != 0 && pid != sc.client_pid) {
            return false;
        }
        let n = hits.fetch_add(1, Ordering::SeqCst);
        match sc.sites.iter().find(|s| s.id == id).map(|s| s.kind) {
            Some(fsapi::SiteKind::BitFlip) => {
                let at = sys::fault::flip_heap_bit(seed.wrapping_add(n.wrapping_mul(0x9e37)));
                tracing::debug!(id, ?at, "fault site: heap bit flipped");
                false
            }
            Some(fsapi::SiteKind::PointerCorruption) => {
                let at = sys::fault::corrupt_heap_pointer(seed.wrapping_add(n));
                tracing::debug!(id, ?at, "fault site: heap pointer corrupted");
                false
            }
            // Issue 5's probes: the access a wild pointer in module code would make, executed
            // here with the module's protection state (no window of the manager's is open).
            Some(fsapi::SiteKind::StrayRead) if sc.probes.shared != 0 => {
                let v = sys::fault::stray_read(sc.probes.shared);
                tracing::debug!(
                    id,
                    v,
                    "fault site: stray read of shared memory went through"
                );
                false
            }
            Some(fsapi::SiteKind::StrayWrite) if sc.probes.shared != 0 => {
                sys::fault::stray_write_same(sc.probes.shared);
                tracing::debug!(id, "fault site: stray write to shared memory went through");
                false
            }
            Some(fsapi::SiteKind::HostAccess) if sc.probes.host != 0 => {
                sys::fault::stray_write_same(sc.probes.host);
                tracing::debug!(id, "fault site: host data access went through");
                false
            }
            Some(k) if k.is_memory() => false,
            Some(_) => true,
            None => false,
        }
    }
    fn now(&self) -> Timespec {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// The store as a request at levels 1–3 would leave it: the checker's view.
/// The request's change as [`fsapi::Module::check_commit`] sees it (levels 1–3): the store is
/// "before" and the private copies make "after". A block allocated in the request was
/// zero-filled then, and reads as zeros before it. (Blocks the request freed stay allocated
/// until it commits, so none of them can have been handed out again meanwhile.)
impl CommitView for HostPm<'_> {
    fn block_size(&self) -> usize {
        BLOCK_SIZE
    }
    fn nblocks(&self) -> u64 {
        self.store.nblocks()
    }
    fn before(&self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        if off + buf.len() > BLOCK_SIZE || b.0 >= self.store.nblocks() {
            return Err(Errno::EIO);
        }
        if self.born.contains(&b.0) {
            buf.fill(0);
            return Ok(());
        }
        if self.sread(b.0, off, buf) {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }
    fn after(&self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        if off + buf.len() <= BLOCK_SIZE && self.read_seen(b.0, off, buf) {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }
    fn written(&self) -> Vec<BlockNo> {
        // A block allocated and freed again within the request was never visible: not a
        // write of the request's outcome.
        self.written
            .iter()
            .filter(|b| !self.born.contains(b) || self.fresh.contains(b))
            .chain(self.fresh.iter())
            .copied()
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .map(BlockNo)
            .collect()
    }
    fn allocated(&self) -> Vec<BlockNo> {
        let mut v: Vec<u64> = self.fresh.iter().copied().collect();
        v.sort_unstable();
        v.into_iter().map(BlockNo).collect()
    }
    fn freed(&self) -> Vec<BlockNo> {
        let mut v: Vec<u64> = self
            .freed
            .iter()
            .filter(|b| !self.born.contains(b))
            .copied()
            .collect();
        v.sort_unstable();
        v.into_iter().map(BlockNo).collect()
    }
    fn locks(&self) -> Vec<LockId> {
        self.locked.clone()
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.store.refs(ino.0)
    }
}

struct View<'p, 'a> {
    pm: &'p HostPm<'a>,
    patches: &'p BTreeMap<u64, Patch>,
}

impl StoreView for View<'_, '_> {
    fn nblocks(&self) -> u64 {
        self.pm.store.nblocks()
    }
    fn allocated(&self, b: u64) -> bool {
        self.pm.store.is_allocated(b)
    }
    fn block_type(&self, b: u64) -> u8 {
        self.pm.store.block_type(b)
    }
    fn image(&self, b: u64) -> Option<Vec<u8>> {
        let mut img = vec![0u8; BLOCK_SIZE];
        if !self.pm.sread(b, 0, &mut img) {
            return None;
        }
        if let Some(p) = self.patches.get(&b) {
            p.overlay(0, &mut img);
        }
        Some(img)
    }
}

#[cfg(test)]
mod tests;
