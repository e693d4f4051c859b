//! Semantic checks of host data on write-back (duplication + checks, protection levels 1–3).
//!
//! At levels 1–3 the module works on copies: what it writes through [`fsapi::Pm::bwrite`]
//! stays in the protection manager's private copy until the request ends. Before anything is
//! written back, every record the request changed is checked against the module's
//! [`Layout`] for the block's type (declared when the block was allocated): integers in
//! range, kinds and magics known, block references inside the store, allocated, of the
//! right type, not to the record's own block, not duplicated, and not looping back through
//! blocks that hold references themselves; names well formed. One bad record rejects the
//! whole write-back, so nothing of a semantically invalid update reaches the store.
//!
//! The rules are data the module hands over once per generation, interpreted here, in the
//! protection manager: the paper's manager knows the kernel's vnode and buf layouts the same
//! way. (Like the paper's, it runs in the module's address space, so it protects against
//! mistakes, not malice.)

use std::collections::HashSet;

use fsapi::{BlockType, Check, Layout};

/// The module's layouts, by block type.
#[derive(Debug, Default, Clone)]
pub struct Layouts {
    by_type: Vec<Option<Layout>>,
}

impl Layouts {
    pub fn new(v: Vec<Layout>) -> Layouts {
        let mut by_type: Vec<Option<Layout>> = vec![None; 256];
        for l in v {
            let t = usize::from(l.ty.0);
            if l.ty != BlockType::DATA && l.record > 0 {
                by_type[t] = Some(l);
            }
        }
        Layouts { by_type }
    }

    pub fn get(&self, ty: u8) -> Option<&Layout> {
        self.by_type.get(usize::from(ty)).and_then(Option::as_ref)
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.iter().all(Option::is_none)
    }

    /// Whether blocks of type `ty` hold block references (so a loop can run through them).
    fn holds_refs(&self, ty: u8) -> bool {
        self.get(ty).is_some_and(|l| {
            l.checks
                .iter()
                .any(|c| matches!(c, Check::BlockRefs { .. }))
        })
    }
}

/// What the checker needs to know about the store, seen through the request's own copies.
pub trait StoreView {
    fn nblocks(&self) -> u64;
    fn allocated(&self, b: u64) -> bool;
    fn block_type(&self, b: u64) -> u8;
    /// Block `b` as the request would leave it (store content plus the request's copies).
    fn image(&self, b: u64) -> Option<Vec<u8>>;
}

fn int(rec: &[u8], off: usize, width: usize) -> Option<u64> {
    let b = rec.get(off..off.checked_add(width)?)?;
    let mut w = [0u8; 8];
    w.get_mut(..width)?.copy_from_slice(b);
    Some(u64::from_le_bytes(w))
}

/// Visits blocks reachable from `start` through reference-holding blocks; `Err` if `target`
/// is among them. Bounded (a huge tree is not walked to the end: no loop is reported).
fn reaches(layouts: &Layouts, view: &dyn StoreView, start: u64, target: u64) -> Result<(), String> {
    const MAX_VISITS: usize = 4096;
    let mut seen = HashSet::new();
    let mut stack = vec![start];
    while let Some(b) = stack.pop() {
        if !seen.insert(b) || seen.len() > MAX_VISITS {
            continue;
        }
        let ty = view.block_type(b);
        let (Some(l), Some(img)) = (layouts.get(ty), view.image(b)) else {
            continue;
        };
        for rec in img.chunks_exact(l.record) {
            if let Some((o, w)) = l.live
                && int(rec, o, w) == Some(0)
            {
                continue;
            }
            for c in &l.checks {
                if let Check::BlockRefs { off, n, .. } = c {
                    for k in 0..*n {
                        let r = int(rec, off + 8 * k, 8).unwrap_or(0);
                        if r == target {
                            return Err(format!(
                                "block {target} is reachable from itself through block {b}: a pointer loop"
                            ));
                        }
                        if r != 0 && r < view.nblocks() && layouts.holds_refs(view.block_type(r)) {
                            stack.push(r);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Checks one record (`rec`, index `idx` in block `block`) against its layout. `Ok` for a
/// free record.
pub fn check_record(
    layouts: &Layouts,
    l: &Layout,
    view: &dyn StoreView,
    block: u64,
    idx: usize,
    rec: &[u8],
) -> Result<(), String> {
    let at = || format!("{} {idx} of block {block}", l.name);
    if let Some((o, w)) = l.live
        && int(rec, o, w) == Some(0)
    {
        return Ok(());
    }
    for c in &l.checks {
        match c {
            Check::Range {
                field,
                off,
                width,
                min,
                max,
            } => {
                let v = int(rec, *off, *width)
                    .ok_or_else(|| format!("{}: field {field} lies outside the record", at()))?;
                if v < *min || v > *max {
                    return Err(format!("{}: {field} = {v} is outside {min}..={max}", at()));
                }
            }
            Check::OneOf {
                field,
                off,
                width,
                mask,
                values,
            } => {
                let v = int(rec, *off, *width)
                    .ok_or_else(|| format!("{}: field {field} lies outside the record", at()))?
                    & mask;
                if !values.contains(&v) {
                    return Err(format!("{}: {field} = {v:#x} is not a known value", at()));
                }
            }
            Check::BlockRefs {
                field,
                off,
                n,
                types,
            } => {
                let mut seen = HashSet::new();
                for k in 0..*n {
                    let r = int(rec, off + 8 * k, 8).ok_or_else(|| {
                        format!("{}: field {field}[{k}] lies outside the record", at())
                    })?;
                    if r == 0 {
                        continue;
                    }
                    if r >= view.nblocks() {
                        return Err(format!(
                            "{}: {field}[{k}] = block {r} is outside the store ({} blocks)",
                            at(),
                            view.nblocks()
                        ));
                    }
                    if r == block {
                        return Err(format!("{}: {field}[{k}] points at its own block", at()));
                    }
                    if !view.allocated(r) {
                        return Err(format!(
                            "{}: {field}[{k}] = block {r} is not allocated",
                            at()
                        ));
                    }
                    let t = view.block_type(r);
                    if !types.iter().any(|ty| ty.0 == t) {
                        return Err(format!(
                            "{}: {field}[{k}] = block {r} holds type {t}, not one of {:?}",
                            at(),
                            types.iter().map(|t| t.0).collect::<Vec<_>>()
                        ));
                    }
                    if !seen.insert(r) {
                        return Err(format!("{}: {field} names block {r} twice", at()));
                    }
                    if layouts.holds_refs(t) {
                        reaches(layouts, view, r, block).map_err(|e| format!("{}: {e}", at()))?;
                    }
                }
            }
            Check::RecordRef {
                field,
                off,
                width,
                first_block,
                per_block,
                record,
                live,
            } => {
                let k = int(rec, *off, *width)
                    .ok_or_else(|| format!("{}: field {field} lies outside the record", at()))?;
                if k == 0 || *per_block == 0 {
                    continue;
                }
                let b = first_block + (k - 1) / per_block;
                let o = ((k - 1) % per_block) as usize * record;
                let img = view
                    .image(b)
                    .ok_or_else(|| format!("{}: {field} = {k} lies outside the store", at()))?;
                let l = img.get(o..o + record).and_then(|r| int(r, live.0, live.1));
                if l.unwrap_or(0) == 0 {
                    return Err(format!(
                        "{}: {field} = {k} names a record that is not in use",
                        at()
                    ));
                }
            }
            Check::Name {
                field,
                len_off,
                len_width,
                name_off,
                max,
            } => {
                let n = int(rec, *len_off, *len_width)
                    .ok_or_else(|| format!("{}: {field} length lies outside the record", at()))?
                    as usize;
                if n == 0 || n > *max {
                    return Err(format!("{}: {field} length {n} is outside 1..={max}", at()));
                }
                let name = rec
                    .get(*name_off..name_off + n)
                    .ok_or_else(|| format!("{}: {field} runs past the record", at()))?;
                if name.contains(&0) || name.contains(&b'/') || name == b"." || name == b".." {
                    return Err(format!(
                        "{}: {field} {:?} is not a valid name",
                        at(),
                        String::from_utf8_lossy(name)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks every record of block `block` (type `ty`, new content `img`) that overlaps one of
/// the `dirty` byte ranges.
pub fn check_block(
    layouts: &Layouts,
    view: &dyn StoreView,
    block: u64,
    ty: u8,
    img: &[u8],
    dirty: &[(usize, usize)],
) -> Result<(), String> {
    let Some(l) = layouts.get(ty) else {
        return Ok(());
    };
    let nrec = img.len() / l.record;
    let mut done = HashSet::new();
    for &(s, e) in dirty {
        let first = s / l.record;
        let last = (e.saturating_sub(1) / l.record).min(nrec.saturating_sub(1));
        for idx in first..=last {
            if idx < nrec && done.insert(idx) {
                let rec = &img[idx * l.record..(idx + 1) * l.record];
                check_record(layouts, l, view, block, idx, rec)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const PTR: BlockType = BlockType(4);
    const INODE: BlockType = BlockType(2);
    const DIR: BlockType = BlockType(3);

    struct View {
        types: HashMap<u64, u8>,
        imgs: HashMap<u64, Vec<u8>>,
    }

    impl StoreView for View {
        fn nblocks(&self) -> u64 {
            100
        }
        fn allocated(&self, b: u64) -> bool {
            self.types.contains_key(&b)
        }
        fn block_type(&self, b: u64) -> u8 {
            self.types.get(&b).copied().unwrap_or(0)
        }
        fn image(&self, b: u64) -> Option<Vec<u8>> {
            self.imgs.get(&b).cloned()
        }
    }

    fn layouts() -> Layouts {
        Layouts::new(vec![
            Layout {
                ty: INODE,
                name: "inode",
                record: 32,
                live: Some((0, 4)),
                checks: vec![
                    Check::OneOf {
                        field: "kind",
                        off: 0,
                        width: 4,
                        mask: 0xf000,
                        values: vec![0x8000, 0x4000],
                    },
                    Check::Range {
                        field: "nlink",
                        off: 4,
                        width: 4,
                        min: 0,
                        max: 10,
                    },
                    Check::BlockRefs {
                        field: "ptr",
                        off: 8,
                        n: 3,
                        types: vec![PTR, BlockType::DATA],
                    },
                ],
            },
            Layout {
                ty: PTR,
                name: "pointer block",
                record: 64,
                live: None,
                checks: vec![Check::BlockRefs {
                    field: "ptr",
                    off: 0,
                    n: 8,
                    types: vec![PTR, BlockType::DATA],
                }],
            },
            Layout {
                ty: DIR,
                name: "entry",
                record: 16,
                live: Some((0, 4)),
                checks: vec![Check::Name {
                    field: "name",
                    len_off: 4,
                    len_width: 1,
                    name_off: 5,
                    max: 11,
                }],
            },
        ])
    }

    fn inode(kind: u32, nlink: u32, ptrs: [u64; 3]) -> Vec<u8> {
        let mut r = vec![0u8; 32];
        r[0..4].copy_from_slice(&kind.to_le_bytes());
        r[4..8].copy_from_slice(&nlink.to_le_bytes());
        for (k, p) in ptrs.iter().enumerate() {
            r[8 + 8 * k..16 + 8 * k].copy_from_slice(&p.to_le_bytes());
        }
        r
    }

    fn view() -> View {
        let mut types = HashMap::new();
        types.insert(1, INODE.0);
        types.insert(5, 0);
        types.insert(6, 0);
        types.insert(7, PTR.0);
        types.insert(8, PTR.0);
        let mut imgs = HashMap::new();
        imgs.insert(7, {
            let mut b = vec![0u8; 64];
            b[0..8].copy_from_slice(&8u64.to_le_bytes());
            b
        });
        imgs.insert(8, vec![0u8; 64]);
        View { types, imgs }
    }

    fn check(rec: &[u8]) -> Result<(), String> {
        let l = layouts();
        check_block(&l, &view(), 1, INODE.0, rec, &[(0, rec.len())])
    }

    #[test]
    fn good_and_free_records_pass() {
        assert_eq!(check(&inode(0x81a4, 1, [5, 6, 7])), Ok(()));
        // mode 0: a free record, whatever else it holds.
        assert_eq!(check(&inode(0, 99, [500, 500, 1])), Ok(()));
    }

    #[test]
    fn each_rule_rejects_what_it_names() {
        let bad = [
            (inode(0x11a4, 1, [5, 0, 0]), "not a known value"),
            (inode(0x81a4, 11, [5, 0, 0]), "outside 0..=10"),
            (inode(0x81a4, 1, [500, 0, 0]), "outside the store"),
            (inode(0x81a4, 1, [1, 0, 0]), "its own block"),
            (inode(0x81a4, 1, [9, 0, 0]), "not allocated"),
            (inode(0x81a4, 1, [5, 5, 0]), "twice"),
        ];
        for (rec, want) in bad {
            let e = check(&rec).expect_err(want);
            assert!(e.contains(want), "{e} should say {want}");
        }
    }

    #[test]
    fn a_pointer_loop_is_found_through_other_blocks() {
        let l = layouts();
        let mut v = view();
        // 7 -> 8 -> 7: writing 8 so it points back at 7 closes the loop.
        let mut b8 = vec![0u8; 64];
        b8[0..8].copy_from_slice(&7u64.to_le_bytes());
        v.imgs.insert(8, b8.clone());
        let e = check_block(&l, &v, 8, PTR.0, &b8, &[(0, 8)]).unwrap_err();
        assert!(e.contains("loop"), "{e}");
    }

    #[test]
    fn names_are_well_formed() {
        let l = layouts();
        let entry = |name: &[u8]| {
            let mut r = vec![0u8; 16];
            r[0] = 3;
            r[4] = name.len() as u8;
            r[5..5 + name.len()].copy_from_slice(name);
            r
        };
        let v = view();
        let ok = check_block(&l, &v, 2, DIR.0, &entry(b"hello"), &[(0, 16)]);
        assert_eq!(ok, Ok(()));
        for bad in [&b"a/b"[..], b"..", b"x\0y", b""] {
            assert!(check_block(&l, &v, 2, DIR.0, &entry(bad), &[(0, 16)]).is_err());
        }
    }

    #[test]
    fn a_record_reference_must_name_a_live_record() {
        let mut l = layouts();
        let mut v = view();
        // Block 1 holds inode records of 32 bytes; #1 live, #2 free.
        let mut itable = inode(0x81a4, 1, [0, 0, 0]);
        itable.extend(inode(0, 0, [0, 0, 0]));
        v.imgs.insert(1, itable);
        l.by_type[usize::from(DIR.0)] = Some(Layout {
            ty: DIR,
            name: "entry",
            record: 16,
            live: Some((0, 4)),
            checks: vec![Check::RecordRef {
                field: "ino",
                off: 0,
                width: 4,
                first_block: 1,
                per_block: 2,
                record: 32,
                live: (0, 4),
            }],
        });
        let entry = |ino: u32| {
            let mut r = vec![0u8; 16];
            r[0..4].copy_from_slice(&ino.to_le_bytes());
            r
        };
        assert_eq!(check_block(&l, &v, 2, DIR.0, &entry(1), &[(0, 4)]), Ok(()));
        let e = check_block(&l, &v, 2, DIR.0, &entry(2), &[(0, 4)]).unwrap_err();
        assert!(e.contains("not in use"), "{e}");
    }

    #[test]
    fn only_records_overlapping_the_dirty_ranges_are_checked() {
        let l = layouts();
        let mut img = inode(0x81a4, 1, [5, 0, 0]);
        img.extend(inode(0x11a4, 1, [0, 0, 0])); // record 1 is bad but untouched
        assert_eq!(
            check_block(&l, &view(), 1, INODE.0, &img, &[(4, 8)]),
            Ok(())
        );
        assert!(check_block(&l, &view(), 1, INODE.0, &img, &[(40, 44)]).is_err());
    }
}
