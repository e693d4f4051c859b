//! Module logic against a real server on loopback and an in-memory protection manager.

use std::net::TcpListener;
use std::sync::Arc;

use fsapi::mem::MemPm;

use super::*;
use crate::server::Export;
use fsapi::RENAME_NOREPLACE;

struct Fixture {
    dir: tempfile::TempDir,
    addr: String,
}

fn server() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let ex = Arc::new(Export::new(dir.path()).expect("export"));
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().unwrap().to_string();
    // The thread ends with the test process; it only serves this test's temp dir.
    std::thread::spawn(move || server::serve(ex, l));
    Fixture { dir, addr }
}

fn ctx() -> Ctx {
    Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
    }
}

fn mounted(f: &Fixture) -> (Snfs, MemPm) {
    let mut pm = MemPm::new(4096, 64);
    let mut m = Snfs::new(&f.addr);
    m.mkfs(&mut pm).unwrap();
    m.attach(&mut pm).unwrap();
    (m, pm)
}

#[test]
fn operations_reach_the_export_and_the_cache_stays_consistent() {
    let f = server();
    let (mut m, mut pm) = mounted(&f);
    let d = m
        .mkdir(&mut pm, &ctx(), Ino::ROOT, b"d", 0o755, 0o022)
        .unwrap();
    assert_eq!(d.kind, FileKind::Dir);
    assert!(f.dir.path().join("d").is_dir());
    let (a, fh) = m.create(&mut pm, &ctx(), d.ino, b"f", 0o644, 0, 0).unwrap();
    assert_eq!(m.write(&mut pm, a.ino, fh, 0, b"hello").unwrap(), 5);
    assert_eq!(std::fs::read(f.dir.path().join("d/f")).unwrap(), b"hello");
    // Served from the cache: the size written is there without asking the server.
    assert_eq!(m.getattr(&mut pm, a.ino).unwrap().size, 5);
    assert_eq!(m.read(&mut pm, a.ino, fh, 1, 100).unwrap(), b"ello");
    m.rename(&mut pm, &ctx(), d.ino, b"f", Ino::ROOT, b"g", 0)
        .unwrap();
    assert_eq!(
        m.lookup(&mut pm, &ctx(), Ino::ROOT, b"g").unwrap().ino,
        a.ino
    );
    assert_eq!(
        m.rename(
            &mut pm,
            &ctx(),
            Ino::ROOT,
            b"g",
            Ino::ROOT,
            b"d",
            RENAME_NOREPLACE
        ),
        Err(Errno::EEXIST)
    );
    let names: Vec<Vec<u8>> = m
        .readdir(&mut pm, Ino::ROOT, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&b"g".to_vec()) && names.contains(&b"..".to_vec()));
    m.release(&mut pm, a.ino, fh).unwrap();
    m.unlink(&mut pm, &ctx(), Ino::ROOT, b"g").unwrap();
    assert_eq!(m.getattr(&mut pm, a.ino), Err(Errno(libc::ESTALE)));
    assert_eq!(m.fsck(&mut pm).unwrap(), Vec::<String>::new());
    assert_eq!(pm.held_locks(), 0);
}

#[test]
fn a_retried_call_with_the_same_xid_is_answered_not_redone() {
    let f = server();
    let ex = Export::new(f.dir.path()).unwrap();
    let call = Call {
        xid: Some(1),
        ctx: ctx(),
        op: Op::Mkdir {
            dir: Handle(1),
            name: b"once".to_vec(),
            mode: 0o755,
            umask: 0,
        },
    };
    assert!(matches!(ex.handle(9, &call), Reply::Attr(_)));
    assert!(matches!(ex.handle(9, &call), Reply::Attr(_)));
    // Another session, or a fresh xid, really runs again.
    assert!(matches!(ex.handle(10, &call), Reply::Err(libc::EEXIST)));
    // A failure is not remembered (it changed nothing), and the same xid with another
    // operation (the client's counter was rolled back with a failed request) really runs.
    let rm = Call {
        xid: Some(2),
        ctx: ctx(),
        op: Op::Rmdir {
            dir: Handle(1),
            name: b"nothere".to_vec(),
        },
    };
    assert!(matches!(ex.handle(9, &rm), Reply::Err(libc::ENOENT)));
    let mk = Call {
        xid: Some(2),
        ..call.clone()
    };
    let Op::Mkdir { .. } = mk.op else { panic!() };
    let mk2 = Call {
        op: Op::Mkdir {
            dir: Handle(1),
            name: b"twice".to_vec(),
            mode: 0o755,
            umask: 0,
        },
        ..mk
    };
    assert!(matches!(ex.handle(9, &mk2), Reply::Attr(_)));
    assert!(f.dir.path().join("twice").is_dir());
}

#[test]
fn a_bad_cache_record_is_named_by_fsck_and_healed_by_a_refetch() {
    let f = server();
    let (mut m, mut pm) = mounted(&f);
    let a = m.getattr(&mut pm, Ino::ROOT).unwrap();
    // The BadUpdate site's write: an invalid kind, with a valid checksum.
    let b = m.bucket_of(1).unwrap();
    let bad = Rec {
        attr: a,
        expiry: u64::MAX,
    }
    .encode(Some(0o644));
    let buf = m.read_bucket(&mut pm, b).unwrap();
    let slot = buf
        .chunks_exact(RECORD)
        .position(|c| get_u64(c, 0) == 1)
        .unwrap();
    pm.bwrite(BlockNo(1 + b), slot * RECORD, &bad).unwrap();
    let p = m.fsck(&mut pm).unwrap();
    assert!(p.len() == 1 && p[0].contains("no valid kind"), "{p:?}");
    // getattr refetches and overwrites it: the cache heals.
    assert_eq!(m.getattr(&mut pm, Ino::ROOT).unwrap().kind, FileKind::Dir);
    assert_eq!(m.fsck(&mut pm).unwrap(), Vec::<String>::new());
    // And the layout the protection manager checks at levels 1–3 rejects the same record.
    let l = m.layouts();
    let Check::OneOf { mask, values, .. } = &l[1].checks[0] else {
        panic!("mode kind check first")
    };
    assert!(!values.contains(&(u64::from(get_u32(&bad, 16)) & mask)));
    assert!(values.contains(&(u64::from(libc::S_IFDIR) & mask)));
}

#[test]
fn attach_rejects_a_foreign_store_and_options_are_checked() {
    let mut pm = MemPm::new(4096, 64);
    let mut m = Snfs::new("127.0.0.1:1");
    assert_eq!(m.attach(&mut pm), Err(Errno::EUCLEAN));
    assert!(
        Snfs::from_opts("")
            .unwrap_err()
            .contains("server=HOST:PORT")
    );
    assert!(
        Snfs::from_opts("serverx=1")
            .unwrap_err()
            .contains("unknown option")
    );
    assert_eq!(
        Snfs::from_opts("server=h:1").unwrap().client.server(),
        "h:1"
    );
}

#[test]
fn an_unlinked_open_file_lives_until_its_last_release() {
    let f = server();
    let (mut m, mut pm) = mounted(&f);
    let (a, fh) = m
        .create(&mut pm, &ctx(), Ino::ROOT, b"f", 0o644, 0, 0)
        .unwrap();
    m.write(&mut pm, a.ino, fh, 0, b"still here").unwrap();
    let fh2 = m.open(&mut pm, &ctx(), a.ino, 0).unwrap();
    m.unlink(&mut pm, &ctx(), Ino::ROOT, b"f").unwrap();
    assert!(!f.dir.path().join("f").exists());
    assert_eq!(m.read(&mut pm, a.ino, fh, 0, 100).unwrap(), b"still here");
    // Hidden from the client's view of the root.
    assert_eq!(
        m.lookup(&mut pm, &ctx(), Ino::ROOT, server::ORPHANS.as_bytes()),
        Err(Errno::ENOENT)
    );
    assert!(m.readdir(&mut pm, Ino::ROOT, 0, 100).unwrap().len() == 2);
    m.release(&mut pm, a.ino, fh).unwrap();
    assert_eq!(m.read(&mut pm, a.ino, fh2, 6, 100).unwrap(), b"here");
    m.release(&mut pm, a.ino, fh2).unwrap();
    let orphans = f.dir.path().join(server::ORPHANS);
    assert_eq!(std::fs::read_dir(&orphans).unwrap().count(), 0);
    assert_eq!(m.fsck(&mut pm).unwrap(), Vec::<String>::new());
    assert_eq!(pm.held_locks(), 0);
}
