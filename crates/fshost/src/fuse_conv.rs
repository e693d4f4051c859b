//! Conversions between fsapi's types and fuser's, shared by the host's FUSE front end and
//! the bare-fuser baselines (`fuser_plain`'s SMFS stand-in, SNFS's plain client).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fsapi::{Attr, Ctx, Errno, FileKind, TimeSet, Timespec};
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

/// An fsapi time as the `SystemTime` fuser wants (times before the epoch included).
pub fn ts_to_system(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nsec))
    }
}

/// A `SystemTime` from fuser as an fsapi time (times before the epoch included).
pub fn system_to_ts(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

/// An fsapi file kind as fuser's.
pub fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Socket => FileType::Socket,
    }
}

/// An fsapi node's attributes as fuser's reply attributes.
pub fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.blocks,
        atime: ts_to_system(a.atime),
        mtime: ts_to_system(a.mtime),
        ctime: ts_to_system(a.ctime),
        crtime: ts_to_system(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// An fsapi errno as fuser's.
pub fn err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

/// Who is asking, from a fuser request.
pub fn ctx(req: &fuser::Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// A `setattr` time from fuser as fsapi's.
pub fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(system_to_ts(s)),
    }
}
