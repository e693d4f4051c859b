use fsapi::mem::MemPm;

use super::*;

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
