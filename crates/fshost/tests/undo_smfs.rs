//! The undo log against the real module: random SMFS operation histories, then one more
//! operation whose module "dies" after a random number of protection-manager calls. Rolling
//! the log back must restore the store exactly (blocks, allocation, node references, locks),
//! and a fresh module generation must then carry on as if the failed request never happened.

use std::panic::{AssertUnwindSafe, catch_unwind};

use fsapi::{BlockNo, Ctx, Errno, FsResult, Ino, LockId, Module, Pm, SetAttr, Timespec};
use fshost::pm::{HostPm, UndoLog};
use fshost::store::{Owner, Store};
use proptest::prelude::*;
use sys::fs_ring::SharedRegion;

/// A protection manager that "crashes" (panics, as a dying module would stop) after `left`
/// more calls.
struct CrashAfter<'a> {
    pm: HostPm<'a>,
    left: usize,
}

impl CrashAfter<'_> {
    fn tick(&mut self) {
        if self.left == 0 {
            std::panic::panic_any(Crash);
        }
        self.left -= 1;
    }
}

struct Crash;

impl Pm for CrashAfter<'_> {
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
        self.tick();
        self.pm.bread(b, off, buf)
    }
    fn bwrite(&mut self, b: BlockNo, off: usize, data: &[u8]) -> FsResult<()> {
        self.tick();
        self.pm.bwrite(b, off, data)
    }
    fn get_next_blk(&mut self) -> FsResult<BlockNo> {
        self.tick();
        self.pm.get_next_blk()
    }
    fn free_blk(&mut self, b: BlockNo) -> FsResult<()> {
        self.tick();
        self.pm.free_blk(b)
    }
    fn vref(&mut self, ino: Ino) -> FsResult<()> {
        self.tick();
        self.pm.vref(ino)
    }
    fn vrele(&mut self, ino: Ino) -> FsResult<u32> {
        self.tick();
        self.pm.vrele(ino)
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.pm.refs(ino)
    }
    fn lock(&mut self, l: LockId) -> FsResult<()> {
        self.tick();
        self.pm.lock(l)
    }
    fn unlock(&mut self, l: LockId) -> FsResult<()> {
        self.tick();
        self.pm.unlock(l)
    }
    fn now(&self) -> Timespec {
        Timespec {
            sec: 1_700_000_000,
            nsec: 0,
        }
    }
}

#[derive(Debug, Clone)]
enum FsOp {
    Create(u8),
    Write { f: u8, off: u32, len: u16, byte: u8 },
    Truncate { f: u8, size: u32 },
    Mkdir(u8),
    Rename(u8, u8),
    Unlink(u8),
    Rmdir(u8),
    Link(u8, u8),
    Symlink(u8),
    Release(u8),
}

fn name(n: u8) -> Vec<u8> {
    format!("n{}", n % 6).into_bytes()
}

fn op() -> impl Strategy<Value = FsOp> {
    prop_oneof![
        3 => any::<u8>().prop_map(FsOp::Create),
        4 => (any::<u8>(), 0u32..200_000, 1u16..20_000, any::<u8>())
            .prop_map(|(f, off, len, byte)| FsOp::Write { f, off, len, byte }),
        2 => (any::<u8>(), 0u32..100_000).prop_map(|(f, size)| FsOp::Truncate { f, size }),
        1 => any::<u8>().prop_map(FsOp::Mkdir),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| FsOp::Rename(a, b)),
        2 => any::<u8>().prop_map(FsOp::Unlink),
        1 => any::<u8>().prop_map(FsOp::Rmdir),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| FsOp::Link(a, b)),
        1 => any::<u8>().prop_map(FsOp::Symlink),
        1 => any::<u8>().prop_map(FsOp::Release),
    ]
}

const C: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 1,
};

/// Applies one operation; errors (ENOENT, EEXIST, …) are normal outcomes.
fn apply(m: &mut dyn Module, pm: &mut dyn Pm, o: &FsOp) -> FsResult<()> {
    let root = Ino::ROOT;
    let ino = |m: &mut dyn Module, pm: &mut dyn Pm, f: u8| {
        m.lookup(pm, &C, root, &name(f)).map(|a| a.ino)
    };
    match *o {
        FsOp::Create(f) => m.create(pm, &C, root, &name(f), 0o644, 0, 0).map(drop),
        FsOp::Write { f, off, len, byte } => {
            let i = ino(m, pm, f)?;
            m.write(
                pm,
                i,
                fsapi::Fh(0),
                u64::from(off),
                &vec![byte; len as usize],
            )
            .map(drop)
        }
        FsOp::Truncate { f, size } => {
            let i = ino(m, pm, f)?;
            m.setattr(
                pm,
                &C,
                i,
                &SetAttr {
                    size: Some(u64::from(size)),
                    ..SetAttr::default()
                },
            )
            .map(drop)
        }
        FsOp::Mkdir(f) => m.mkdir(pm, &C, root, &name(f), 0o755, 0).map(drop),
        FsOp::Rename(a, b) => m.rename(pm, &C, root, &name(a), root, &name(b), 0),
        FsOp::Unlink(f) => m.unlink(pm, &C, root, &name(f)),
        FsOp::Rmdir(f) => m.rmdir(pm, &C, root, &name(f)),
        FsOp::Link(a, b) => {
            let i = ino(m, pm, a)?;
            m.link(pm, &C, i, root, &name(b)).map(drop)
        }
        FsOp::Symlink(f) => m.symlink(pm, &C, root, &name(f), b"target").map(drop),
        FsOp::Release(f) => {
            // Release only what is open (create took a reference).
            let i = ino(m, pm, f)?;
            if pm.refs(i) == 0 {
                return Err(Errno::EBADF);
            }
            m.release(pm, i, fsapi::Fh(0))
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Snap {
    digest: u32,
    free: u64,
    refs: Vec<u32>,
}

fn snap(s: &Store) -> Snap {
    Snap {
        digest: s.digest(),
        free: s.free_blocks(),
        refs: (0..64).map(|i| s.refs(i)).collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_global_rejects: 4096, ..ProptestConfig::default() })]

    #[test]
    fn smfs_request_dying_anywhere_is_rolled_back_exactly(
        history in proptest::collection::vec(op(), 0..25),
        last in op(),
        crash_after in 0usize..120,
    ) {
        let store = Store::create(4 << 20).unwrap();
        let mem = SharedRegion::create("undo", 8 << 20).unwrap();
        let log = UndoLog::new(&mem, 0, 8 << 20);
        let owner = Owner(1);
        let mut m = smfs::Smfs::new();
        {
            let mut pm = HostPm::new(&store, Some(log), owner, None);
            m.mkfs(&mut pm).unwrap();
            log.clear();
        }
        for o in &history {
            let mut pm = HostPm::new(&store, Some(log), owner, None);
            // Refused requests are rolled back by the host too, as at level 4.
            if apply(&mut m, &mut pm, o).is_err() {
                log.rollback(&store, owner);
            } else {
                // Commit: deferred frees happen, and (strict 2PL) every lock goes now.
                log.commit(&store, owner);
            }
            prop_assert_eq!(store.release_all(owner), 0, "a lock survived the end of its request");
        }
        let before = snap(&store);
        let crashed = {
            let mut pm = CrashAfter { pm: HostPm::new(&store, Some(log), owner, None), left: crash_after };
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let r = catch_unwind(AssertUnwindSafe(|| apply(&mut m, &mut pm, &last)));
            std::panic::set_hook(prev);
            r.is_err()
        };
        // Only runs where the module really died mid-request count.
        prop_assume!(crashed);
        log.rollback(&store, owner);
        {
            prop_assert_eq!(snap(&store), before);
            // A new module generation attaches and works on the restored store.
            let mut m2 = smfs::Smfs::new();
            let mut pm = HostPm::new(&store, Some(log), owner, None);
            m2.attach(&mut pm).unwrap();
            let entries = m2.readdir(&mut pm, Ino::ROOT, 0, 100).unwrap();
            for e in entries.iter().filter(|e| e.name != b"." && e.name != b"..") {
                m2.getattr(&mut pm, e.ino).unwrap();
            }
            apply(&mut m2, &mut pm, &FsOp::Create(99)).unwrap_or(());
        }
    }
}
