//! Big SMFS directories through a real mount: a thousand entries created, removed in holes,
//! from the tail and all at once, and renamed within and across big directories, with the
//! listing, lookups and fsck checked after every step. Level 5 runs the module plain; level 3
//! also runs the semantic checks on every write-back, which must accept each of these valid
//! updates. Needs root and /dev/fuse.
//!
//! Regression: fsck used to count a directory's blocks by its byte size (272 bytes an entry)
//! although 15 entries fill a 4 KiB block, so from 256 entries on it reported the last block
//! as lying beyond the size.

mod fs_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fs_common::*;

/// Far more than the workload needs (a few seconds); a hung mount fails the test instead of
/// blocking it.
const LIMIT: Duration = Duration::from_secs(240);
const N: usize = 1000;

/// Every tenth entry is a directory (link counts and parents move too), the rest files.
fn name(i: usize) -> String {
    if i.is_multiple_of(10) {
        format!("d{i:04}")
    } else {
        format!("f{i:04}-{}", "x".repeat(i % 40))
    }
}

fn add(dir: &Path, n: &str) {
    let p = dir.join(n);
    if n.starts_with('d') {
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    } else {
        std::fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    }
}

fn remove(dir: &Path, n: &str) {
    let p = dir.join(n);
    let r = if n.starts_with('d') {
        std::fs::remove_dir(&p)
    } else {
        std::fs::remove_file(&p)
    };
    r.unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
}

fn listing(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(out.insert(n.clone()), "readdir listed {n} twice");
    }
    out
}

fn fsck_clean(mnt: &Path, step: &str) {
    let out = run(&["fsck", "--json", mnt.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fsck --json");
    assert!(
        out.status.success() && j["clean"] == true,
        "{step}: fsck found problems: {j}"
    );
}

/// `dir` lists exactly `live`, each looks up as its kind, none of `gone` exists, and fsck is
/// clean.
fn check(mnt: &Path, dir: &Path, live: &BTreeSet<String>, gone: &BTreeSet<String>, step: &str) {
    assert_eq!(&listing(dir), live, "{step}: readdir of {}", dir.display());
    for n in live {
        let md = std::fs::symlink_metadata(dir.join(n))
            .unwrap_or_else(|e| panic!("{step}: lookup {n}: {e}"));
        assert_eq!(md.is_dir(), n.starts_with('d'), "{step}: kind of {n}");
    }
    for n in gone {
        let e = std::fs::symlink_metadata(dir.join(n)).expect_err(n);
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::NotFound,
            "{step}: lookup of removed {n}"
        );
    }
    fsck_clean(mnt, step);
}

fn workload(mnt: PathBuf) {
    let a = mnt.join("a");
    let b = mnt.join("b");
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let mut live = BTreeSet::new();
    let mut gone = BTreeSet::new();
    for i in 0..N {
        let n = name(i);
        add(&a, &n);
        live.insert(n);
        // Right at the first count that used to fail (256 = 17 blocks + 1 entry).
        if i + 1 == 256 {
            fsck_clean(&mnt, "256 entries");
        }
    }
    check(&mnt, &a, &live, &gone, "created");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&a).unwrap().nlink(),
        2 + (N / 10) as u64,
        "a's link count"
    );

    for i in (0..N).step_by(2) {
        let n = name(i);
        remove(&a, &n);
        live.remove(&n);
        gone.insert(n);
    }
    check(&mnt, &a, &live, &gone, "every other removed");

    for i in N - 300..N {
        let n = name(i);
        if live.remove(&n) {
            remove(&a, &n);
            gone.insert(n);
        }
    }
    check(&mnt, &a, &live, &gone, "tail removed");

    for i in N..N + 600 {
        let n = name(i);
        add(&a, &n);
        live.insert(n);
    }
    check(&mnt, &a, &live, &gone, "refilled");

    // b gets big too; then renames within a, a → b, b → a, and onto existing names of b.
    let mut blive = BTreeSet::new();
    for i in 0..400 {
        let n = format!("g{i:04}");
        add(&b, &n);
        blive.insert(n);
    }
    let names: Vec<String> = live.iter().cloned().collect();
    for (k, n) in names.iter().enumerate() {
        match k % 4 {
            0 => {
                let to = format!("{n}-r");
                std::fs::rename(a.join(n), a.join(&to)).unwrap();
                live.remove(n);
                gone.insert(n.clone());
                live.insert(to);
            }
            1 => {
                let mid = format!("{n}-b");
                std::fs::rename(a.join(n), b.join(&mid)).unwrap();
                let back = format!("{n}-ab");
                std::fs::rename(b.join(&mid), a.join(&back)).unwrap();
                live.remove(n);
                gone.insert(n.clone());
                live.insert(back);
            }
            2 => {
                std::fs::rename(a.join(n), b.join(n)).unwrap();
                live.remove(n);
                gone.insert(n.clone());
                blive.insert(n.clone());
            }
            _ => {}
        }
    }
    for i in 0..100 {
        let from = format!("g{i:04}");
        let onto = format!("g{:04}", 399 - i);
        std::fs::rename(b.join(&from), b.join(&onto)).unwrap();
        blive.remove(&from);
    }
    check(&mnt, &a, &live, &gone, "renamed (a)");
    check(&mnt, &b, &blive, &BTreeSet::new(), "renamed (b)");

    for n in std::mem::take(&mut live) {
        remove(&a, &n);
        gone.insert(n);
    }
    check(&mnt, &a, &live, &gone, "all removed");
    for n in std::mem::take(&mut blive) {
        remove(&b, &n);
    }
    std::fs::remove_dir(&a).unwrap();
    std::fs::remove_dir(&b).unwrap();
    assert!(listing(&mnt).is_empty());
    fsck_clean(&mnt, "a and b removed");
}

fn big_directory_at(level: u8) {
    let m = Mount::new(level, &[]);
    let dir = m.dir.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| workload(dir));
        let _ = tx.send(());
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    });
    if rx.recv_timeout(LIMIT).is_err() && !worker.is_finished() {
        // Dropping the mount unmounts it (lazily if busy), which unblocks the worker.
        panic!("level {level}: the big-directory workload did not finish in {LIMIT:?}");
    }
    if let Err(p) = worker.join() {
        std::panic::resume_unwind(p);
    }
    let s = m.status();
    for k in ["module_failures", "check_rejections", "eio"] {
        assert_eq!(s[k].as_u64(), Some(0), "level {level}: {k}: {s}");
    }
}

#[test]
fn big_directories_stay_consistent_at_level_5() {
    big_directory_at(5);
}

/// Level 3 checks every write-back against the layouts SMFS declares.
#[test]
fn big_directories_pass_the_semantic_checks_at_level_3() {
    big_directory_at(3);
}
