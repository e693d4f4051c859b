use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Step {
    Write {
        blk: u8,
        off: u16,
        len: u16,
        byte: u8,
    },
    Alloc,
    Free {
        blk: u8,
    },
    Vref {
        ino: u8,
    },
    Vrele {
        ino: u8,
    },
    Lock {
        id: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<u8>(), 0u16..4096, 1u16..600, any::<u8>())
            .prop_map(|(blk, off, len, byte)| Step::Write { blk, off, len, byte }),
        2 => Just(Step::Alloc),
        1 => any::<u8>().prop_map(|blk| Step::Free { blk }),
        1 => (0u8..16).prop_map(|ino| Step::Vref { ino }),
        1 => (0u8..16).prop_map(|ino| Step::Vrele { ino }),
        1 => (0u8..8).prop_map(|id| Step::Lock { id }),
    ]
}

fn apply(pm: &mut HostPm<'_>, s: &Step) {
    // Errors (writes to free blocks, frees of free blocks, vrele at 0) are part of the test:
    // a refused call must change nothing either.
    let _ = match *s {
        Step::Write {
            blk,
            off,
            len,
            byte,
        } => {
            let len = (len as usize).min(4096 - off as usize);
            pm.bwrite(BlockNo(u64::from(blk)), off as usize, &vec![byte; len])
        }
        Step::Alloc => pm.get_next_blk().map(drop),
        Step::Free { blk } => pm.free_blk(BlockNo(u64::from(blk))),
        Step::Vref { ino } => pm.vref(Ino(u64::from(ino))),
        Step::Vrele { ino } => pm.vrele(Ino(u64::from(ino))).map(drop),
        Step::Lock { id } => pm.lock(LockId(u64::from(id))),
    };
}

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    digest: u32,
    free: u64,
    refs: Vec<u32>,
    locks: Vec<bool>,
}

fn snapshot(s: &Store) -> Snapshot {
    Snapshot {
        digest: s.digest(),
        free: s.free_blocks(),
        refs: (0..16).map(|i| s.refs(i)).collect(),
        locks: (0..8)
            .map(|i| s.lock_holder(Store::lock_slot(i)).is_some())
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random committed history, then a request that dies after a random number of steps:
    /// rollback restores exactly the state before that request.
    #[test]
    fn rollback_restores_state_before_failed_request(
        history in proptest::collection::vec(step(), 0..60),
        failed in proptest::collection::vec(step(), 1..80),
        crash_at in any::<prop::sample::Index>(),
    ) {
        let store = Store::create(1 << 20).unwrap();
        let logmem = SharedRegion::create("undo-test", 4 << 20).unwrap();
        let log = UndoLog::new(&logmem, 0, 4 << 20);
        // Committed requests: each one's log is cleared, as the host does on success.
        for chunk in history.chunks(7) {
            let owner = Owner(1);
            let mut pm = HostPm::new(&store, Some(log), owner, None);
            for s in chunk {
                apply(&mut pm, s);
            }
            store.release_all(owner);
            log.clear();
        }
        let before = snapshot(&store);
        let owner = Owner(2);
        let mut pm = HostPm::new(&store, Some(log), owner, None);
        let n = crash_at.index(failed.len() + 1);
        for s in &failed[..n] {
            apply(&mut pm, s);
        }
        drop(pm); // the module "dies" here
        log.rollback(&store, owner);
        prop_assert_eq!(snapshot(&store), before);
        prop_assert!(log.is_empty());
    }
}

#[test]
fn full_log_refuses_the_change_instead_of_losing_undo() {
    let store = Store::create(1 << 20).unwrap();
    let logmem = SharedRegion::create("undo-test", 4096).unwrap();
    let log = UndoLog::new(&logmem, 0, 4096);
    let b = store.alloc().unwrap();
    let before = store.digest();
    let mut pm = HostPm::new(&store, Some(log), Owner(1), None);
    let mut refused = false;
    for i in 0..100 {
        if pm.bwrite(BlockNo(b), 0, &[i as u8; 400]) == Err(Errno::ENOSPC) {
            refused = true;
            break;
        }
    }
    assert!(refused);
    log.rollback(&store, Owner(1));
    assert_eq!(store.digest(), before);
}

proptest! {
    /// The word-at-a-time patch agrees with a byte-by-byte model: what `overlay` shows, which
    /// ranges write-back applies.
    #[test]
    fn patch_matches_a_byte_model(
        puts in proptest::collection::vec((0usize..BLOCK_SIZE, 1usize..300, any::<u8>()), 0..12),
        window in (0usize..BLOCK_SIZE, 0usize..BLOCK_SIZE),
    ) {
        let mut p = Patch::new();
        let mut model: Vec<Option<u8>> = vec![None; BLOCK_SIZE];
        for (off, len, byte) in puts {
            let len = len.min(BLOCK_SIZE - off);
            p.put(off, &vec![byte; len]);
            for m in &mut model[off..off + len] {
                *m = Some(byte);
            }
        }
        let mut want = Vec::new();
        let mut i = 0;
        while i < BLOCK_SIZE {
            if model[i].is_some() {
                let s = i;
                while i < BLOCK_SIZE && model[i].is_some() {
                    i += 1;
                }
                want.push((s, i));
            } else {
                i += 1;
            }
        }
        prop_assert_eq!(p.ranges(), want);
        let (lo, hi) = (window.0.min(window.1), window.0.max(window.1));
        let mut buf = vec![0xEEu8; hi - lo];
        p.overlay(lo, &mut buf);
        for (k, b) in buf.iter().enumerate() {
            prop_assert_eq!(*b, model[lo + k].unwrap_or(0xEE));
        }
    }
}
