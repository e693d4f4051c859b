//! The benchmark baseline: a minimal RAM file system written directly on `fuser`, with no
//! protection manager, no block store and no module boundary: the cost of FUSE alone.
//! Enough of POSIX for the benchmark workloads (copy, compile): files, directories, rename.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Node {
    attr: FileAttr,
    data: Vec<u8>,
    children: BTreeMap<OsString, u64>,
}

/// The plain RAM file system.
#[derive(Debug)]
pub struct PlainFs {
    nodes: Mutex<(HashMap<u64, Node>, u64)>,
}

fn new_attr(ino: u64, kind: FileType, perm: u16, uid: u32, gid: u32) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Default for PlainFs {
    fn default() -> Self {
        Self::new()
    }
}

impl PlainFs {
    pub fn new() -> PlainFs {
        let mut m = HashMap::new();
        m.insert(
            1,
            Node {
                attr: new_attr(1, FileType::Directory, 0o755, 0, 0),
                data: Vec::new(),
                children: BTreeMap::new(),
            },
        );
        PlainFs {
            nodes: Mutex::new((m, 2)),
        }
    }

    fn make(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        kind: FileType,
        mode: u32,
    ) -> Result<FileAttr, fuser::Errno> {
        let mut g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let (nodes, next) = &mut *g;
        let p = nodes.get(&parent.0).ok_or(fuser::Errno::ENOENT)?;
        if p.children.contains_key(name) {
            return Err(fuser::Errno::EEXIST);
        }
        let ino = *next;
        *next += 1;
        let attr = new_attr(ino, kind, (mode & 0o7777) as u16, req.uid(), req.gid());
        nodes.insert(
            ino,
            Node {
                attr,
                data: Vec::new(),
                children: BTreeMap::new(),
            },
        );
        let p = nodes.get_mut(&parent.0).ok_or(fuser::Errno::ENOENT)?;
        p.children.insert(name.to_owned(), ino);
        Ok(attr)
    }
}

impl Filesystem for PlainFs {
    fn lookup(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        match g
            .0
            .get(&parent.0)
            .and_then(|p| p.children.get(name))
            .and_then(|i| g.0.get(i))
        {
            Some(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        match self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(&ino.0)
        {
            Some(n) => reply.attr(&TTL, &n.attr),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = g.0.get_mut(&ino.0) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let t = |t: TimeOrNow| match t {
            TimeOrNow::Now => SystemTime::now(),
            TimeOrNow::SpecificTime(s) => s,
        };
        if let Some(m) = mode {
            n.attr.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            n.attr.uid = u;
        }
        if let Some(g) = gid {
            n.attr.gid = g;
        }
        if let Some(s) = size {
            n.data.resize(s as usize, 0);
            n.attr.size = s;
            n.attr.mtime = SystemTime::now();
        }
        if let Some(a) = atime {
            n.attr.atime = t(a);
        }
        if let Some(m) = mtime {
            n.attr.mtime = t(m);
        }
        n.attr.ctime = SystemTime::now();
        reply.attr(&TTL, &n.attr);
    }

    fn mkdir(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.make(req, parent, name, FileType::Directory, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.make(req, parent, name, FileType::RegularFile, mode) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &fuser::Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = g.0.get(&ino.0) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let s = (offset as usize).min(n.data.len());
        let e = (s + size as usize).min(n.data.len());
        reply.data(&n.data[s..e]);
    }

    fn write(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = g.0.get_mut(&ino.0) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let end = offset as usize + data.len();
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        n.attr.size = n.data.len() as u64;
        n.attr.blocks = n.attr.size.div_ceil(512);
        n.attr.mtime = SystemTime::now();
        reply.written(data.len() as u32);
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

    fn unlink(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        match g.0.get_mut(&parent.0).and_then(|p| p.children.remove(name)) {
            Some(ino) => {
                g.0.remove(&ino);
                reply.ok();
            }
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn rmdir(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink(req, parent, name, reply);
    }

    fn rename(
        &self,
        _req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ino) = g.0.get_mut(&parent.0).and_then(|p| p.children.remove(name)) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let old =
            g.0.get_mut(&newparent.0)
                .and_then(|p| p.children.insert(newname.to_owned(), ino));
        if let Some(o) = old {
            g.0.remove(&o);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let g = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = g.0.get(&ino.0) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (1, FileType::Directory, OsString::from("..")),
        ];
        all.extend(n.children.iter().map(|(name, i)| {
            (
                *i,
                g.0.get(i).map_or(FileType::RegularFile, |c| c.attr.kind),
                name.clone(),
            )
        }));
        for (k, (i, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
