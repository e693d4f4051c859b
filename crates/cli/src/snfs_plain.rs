//! The benchmark baseline for SNFS: the same server behind a bare `fuser` client, with no
//! host, no protection manager, no attribute cache in a block store and no module boundary:
//! the cost of FUSE plus the network protocol alone (what `fshost::plain` is for SMFS). It
//! lives in the CLI, not in the module crate: a module knows nothing of FUSE.
//!
//! [`serve`] mounts and serves in the calling thread until the file system is unmounted;
//! `kintsugi __snfs-plain --server HOST:PORT MOUNTPOINT` runs it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fsapi::{Ctx, FileKind, SetAttr};
use fuser::{
    FileHandle, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, TimeOrNow, WriteFlags,
};

use fshost::fuse_conv::{ctx, err, file_type, fuse_attr, system_to_ts, time_set};
use snfs::client::Client;
use snfs::proto::{Call, Handle, Op, Reply};

/// The kernel's attribute and entry TTL: the same second the host and the module cache use.
const TTL: Duration = Duration::from_secs(1);

/// The bare client.
#[derive(Debug)]
pub struct PlainSnfs {
    client: Mutex<Client>,
    /// Open counts and "unlinked while open" per node, so such a file stays alive on the
    /// server until its last close (the module keeps the same in the host's store).
    opens: Mutex<HashMap<u64, (u32, bool)>>,
}

impl PlainSnfs {
    pub fn new(server: &str) -> PlainSnfs {
        // A session id of its own, so its retries never match another client's.
        let session = u64::from(std::process::id()) << 32 | 0x504c;
        PlainSnfs {
            client: Mutex::new(Client::new(server, session)),
            opens: Mutex::new(HashMap::new()),
        }
    }

    fn call(&self, ctx: Ctx, op: Op) -> Result<Reply, fuser::Errno> {
        let xid = (!op.idempotent()).then(|| {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .call(&Call { xid, ctx, op })
            .map_err(err)
    }

    fn entry(&self, ctx: Ctx, op: Op, reply: ReplyEntry) {
        match self.call(ctx, op) {
            Ok(Reply::Attr(a)) => reply.entry(&TTL, &fuse_attr(&a), Generation(a.generation)),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn opened(&self, ino: u64) {
        self.opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ino)
            .or_default()
            .0 += 1;
    }

    /// Whether the file `name` in `dir` leads to is open (then marked orphaned).
    fn keep(&self, ctx: Ctx, dir: INodeNo, name: &OsStr) -> bool {
        if self
            .opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return false;
        }
        let op = Op::Lookup {
            dir: Handle(dir.0),
            name: name.as_bytes().to_vec(),
        };
        let Ok(Reply::Attr(a)) = self.call(ctx, op) else {
            return false;
        };
        match self
            .opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&a.ino.0)
        {
            Some(e) if a.kind != FileKind::Dir => {
                e.1 = true;
                true
            }
            _ => false,
        }
    }

    fn empty(&self, ctx: Ctx, op: Op, reply: ReplyEmpty) {
        match self.call(ctx, op) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for PlainSnfs {
    fn lookup(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let op = Op::Lookup {
            dir: Handle(parent.0),
            name: name.as_bytes().to_vec(),
        };
        self.entry(ctx(req), op, reply);
    }

    fn getattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        match self.call(ctx(req), Op::Getattr { h: Handle(ino.0) }) {
            Ok(Reply::Attr(a)) => reply.attr(&TTL, &fuse_attr(&a)),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(system_to_ts),
        };
        match self.call(
            ctx(req),
            Op::Setattr {
                h: Handle(ino.0),
                set,
            },
        ) {
            Ok(Reply::Attr(a)) => reply.attr(&TTL, &fuse_attr(&a)),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyData) {
        match self.call(ctx(req), Op::Readlink { h: Handle(ino.0) }) {
            Ok(Reply::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let op = Op::Mknod {
            dir: Handle(parent.0),
            name: name.as_bytes().to_vec(),
            mode,
            umask,
            rdev,
        };
        self.entry(ctx(req), op, reply);
    }

    fn mkdir(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let op = Op::Mkdir {
            dir: Handle(parent.0),
            name: name.as_bytes().to_vec(),
            mode,
            umask,
        };
        self.entry(ctx(req), op, reply);
    }

    fn unlink(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = Op::Unlink {
            dir: Handle(parent.0),
            name: name.as_bytes().to_vec(),
            keep: self.keep(ctx(req), parent, name),
        };
        self.empty(ctx(req), op, reply);
    }

    fn rmdir(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = Op::Rmdir {
            dir: Handle(parent.0),
            name: name.as_bytes().to_vec(),
        };
        self.empty(ctx(req), op, reply);
    }

    fn symlink(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let op = Op::Symlink {
            dir: Handle(parent.0),
            name: link_name.as_bytes().to_vec(),
            target: target.as_os_str().as_bytes().to_vec(),
        };
        self.entry(ctx(req), op, reply);
    }

    fn rename(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let op = Op::Rename {
            dir: Handle(parent.0),
            name: name.as_bytes().to_vec(),
            newdir: Handle(newparent.0),
            newname: newname.as_bytes().to_vec(),
            flags: flags.bits(),
            keep_target: flags.bits() & fsapi::RENAME_EXCHANGE == 0
                && self.keep(ctx(req), newparent, newname),
        };
        self.empty(ctx(req), op, reply);
    }

    fn link(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let op = Op::Link {
            h: Handle(ino.0),
            newdir: Handle(newparent.0),
            newname: newname.as_bytes().to_vec(),
        };
        self.entry(ctx(req), op, reply);
    }

    fn open(&self, _req: &fuser::Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.opened(ino.0);
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn release(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let drop_it = {
            let mut o = self.opens.lock().unwrap_or_else(|p| p.into_inner());
            match o.get_mut(&ino.0) {
                Some(e) if e.0 > 1 => {
                    e.0 -= 1;
                    false
                }
                Some(_) => o.remove(&ino.0).is_some_and(|e| e.1),
                None => false,
            }
        };
        if drop_it {
            let _ = self.call(ctx(req), Op::DropOrphan { h: Handle(ino.0) });
        }
        reply.ok();
    }

    fn read(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let op = Op::Read {
            h: Handle(ino.0),
            off: offset,
            len: size,
        };
        match self.call(ctx(req), op) {
            Ok(Reply::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let op = Op::Write {
            h: Handle(ino.0),
            off: offset,
            data: data.to_vec(),
        };
        match self.call(ctx(req), op) {
            Ok(Reply::Written { n, .. }) => reply.written(n),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let op = Op::Fsync {
            h: Handle(ino.0),
            datasync,
        };
        self.empty(ctx(req), op, reply);
    }

    fn readdir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let op = Op::Readdir {
            h: Handle(ino.0),
            cookie: offset,
            max: 256,
        };
        match self.call(ctx(req), op) {
            Ok(Reply::Entries(es)) => {
                for e in es {
                    if reply.add(
                        INodeNo(e.ino.0),
                        e.offset,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, req: &fuser::Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.call(ctx(req), Op::Statfs) {
            Ok(Reply::StatFs(s)) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let op = Op::Create {
            dir: Handle(parent.0),
            name: name.as_bytes().to_vec(),
            mode,
            umask,
        };
        match self.call(ctx(req), op) {
            Ok(Reply::Attr(a)) => {
                self.opened(a.ino.0);
                reply.created(
                    &TTL,
                    &fuse_attr(&a),
                    Generation(a.generation),
                    FileHandle(0),
                    FopenFlags::empty(),
                )
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS once and the kernel stops asking (security.capability before every write).
        reply.error(fuser::Errno::ENOSYS);
    }
}

/// Mounts the bare client at `mountpoint` and serves until it is unmounted.
pub fn serve(server: &str, mountpoint: &Path) -> std::io::Result<()> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("snfs-plain".into()),
        fuser::MountOption::Subtype("kintsugi".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    cfg.acl = if rustix::process::geteuid().is_root() {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    cfg.n_threads = Some(1);
    let session = fuser::Session::new(PlainSnfs::new(server), mountpoint, &cfg)?;
    session.run()
}
