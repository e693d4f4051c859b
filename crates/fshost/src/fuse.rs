//! The FUSE front end: turns kernel requests into [`Request`]s for the backend, keeps the
//! host's inode table (lookup counts) and open-file table, and answers the control xattrs
//! behind `kintsugi fsctl`.
//!
//! Control channel, handled here and never passed to the module: the extended attribute
//! `user.kintsugi.fault` = `panic|segv|kill|hang[:write|rename|readdir|any]` on the mount's root
//! arms a fault (with a class: for the next such request; without: now, while idle), and the
//! hidden read-only file `.kintsugi-status` in the root (found by lookup, never listed) holds the
//! host's counters as JSON. Whoever can reach the mount can use them; nothing else (no socket, no
//! pid file) has to be found or cleaned up. getxattr answers ENOSYS once, so the kernel stops
//! asking: otherwise it asks for `security.capability` before every single write.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fsapi::{Attr, Ctx, Errno, Fh, Ino, SetAttr};
use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, TimeOrNow, WriteFlags,
};

use crate::backend::{Backend, Stats};
use crate::fuse_conv::{ctx, err, file_type, fuse_attr, system_to_ts, time_set};
use crate::gate::Gate;
use crate::pm::Fault;
use crate::wire::{Op, OpClass, Reply, Request};

/// Attribute/entry cache time given to the kernel.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends (also sizes ring slots).
pub const MAX_WRITE: u32 = 128 << 10;
/// Name of the fault-injection xattr.
pub const XATTR_FAULT: &str = "user.kintsugi.fault";
/// Name of the fault-site xattr (issue 6's campaign): `ID[:PID[:SEED]]`, `0` disarms.
pub const XATTR_SITE: &str = "user.kintsugi.site";
/// Name of the fsck xattr: setting it runs the module's and the host's checks with every
/// context quiesced; the result appears in the status file (`fsck`).
pub const XATTR_FSCK: &str = "user.kintsugi.fsck";
/// Name of the hidden status file in the mount's root.
pub const STATUS_FILE: &str = ".kintsugi-status";
/// Its node number (never a module's: those are small).
const STATUS_INO: u64 = u64::MAX - 1;
/// Its open-file handle.
const STATUS_FH: u64 = u64::MAX - 1;

/// One open file in the host's table.
#[derive(Debug, Clone, Copy)]
struct OpenFile {
    ino: Ino,
    module_fh: Fh,
}

/// The FUSE file system the host mounts.
#[derive(Debug)]
pub struct HostFs {
    backend: Backend,
    module: String,
    stats: Arc<Stats>,
    armed: Mutex<Option<(Fault, OpClass)>>,
    /// Inode table: kernel lookup counts per node.
    lookups: Mutex<HashMap<Ino, u64>>,
    /// Open-file table: host handle → module handle.
    files: Mutex<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
    /// The root's last attributes: served from here once the module supervisor has given up,
    /// so the status file (which the kernel reaches through the root) still answers.
    root_attr: Mutex<Option<Attr>>,
    /// Level 5 under rfork supervision: shared words recording the request in flight.
    inflight: Option<Arc<sys::shm::SharedAtomics>>,
    /// The rfork generation this host last served in (level 5 under supervision).
    generation_seen: std::sync::atomic::AtomicU32,
    /// The last fsck's problems (`None`: never run).
    last_fsck: Mutex<Option<Vec<String>>>,
    /// The status text produced by the last read at offset 0: a read of the rest is served
    /// from it, so a reader never splices two different versions (counters change between
    /// the reads and the text's length with them).
    status_snap: Mutex<Vec<u8>>,
    /// Keeps as many FUSE reader threads in `read` as CPUs (see `gate`); every callback enters it.
    gate: Arc<Gate>,
}

impl HostFs {
    pub fn new(backend: Backend, module: String, stats: Arc<Stats>) -> HostFs {
        let gate = backend.gate();
        HostFs {
            backend,
            module,
            stats,
            armed: Mutex::new(None),
            lookups: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            root_attr: Mutex::new(None),
            inflight: None,
            generation_seen: std::sync::atomic::AtomicU32::new(0),
            last_fsck: Mutex::new(None),
            status_snap: Mutex::new(Vec::new()),
            gate,
        }
    }

    /// How many FUSE reader threads to serve with: one per module context.
    pub fn reader_threads(&self) -> usize {
        self.gate.threads()
    }

    /// Level 5 under rfork supervision (see `l5`): requests are recorded in shared words so a
    /// restarted host can tell which request its predecessor died in.
    pub fn supervise_level5(&mut self, words: Arc<sys::shm::SharedAtomics>) {
        let me = u64::from(sys::Pid::this().as_raw() as u32);
        words.word(crate::l5::HOST_PID).store(me, Ordering::Relaxed);
        self.inflight = Some(words);
    }

    /// The context of a request; under level-5 supervision also records it as in flight.
    fn ctx(&self, req: &fuser::Request) -> Ctx {
        if let Some(w) = &self.inflight {
            w.word(crate::l5::INFLIGHT_SINCE)
                .store(sys::clock::monotonic_ns(), Ordering::Relaxed);
            w.word(crate::l5::INFLIGHT)
                .store(req.unique().0, Ordering::Release);
        }
        ctx(req)
    }

    /// Formats the store through the module (at level 4, in the module process).
    pub fn mkfs(&self) -> Result<(), Errno> {
        match self.call(Ctx::default(), Op::Mkfs) {
            Reply::Ok => Ok(()),
            Reply::Err(e) => Err(e),
            _ => Err(Errno::EIO),
        }
    }

    fn call(&self, ctx: Ctx, op: Op) -> Reply {
        let fault = {
            let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
            match *armed {
                Some((f, class)) if class.matches(&op) => {
                    *armed = None;
                    Some(f)
                }
                _ => None,
            }
        };
        if self.inflight.is_some() {
            let g = rfork::generation();
            if self.generation_seen.swap(g, Ordering::Relaxed) != g {
                // A new host generation: the module's memory is the rfork-time image's.
                let released = self.backend.reattach_after_restart();
                if released > 0 {
                    tracing::warn!(released, "released store locks held by the dead host");
                }
            }
        }
        let reply = self.backend.call(Request { ctx, op }, fault, &self.stats);
        if let Some(w) = &self.inflight {
            w.word(crate::l5::INFLIGHT).store(0, Ordering::Release);
        }
        reply
    }

    fn remember(&self, ino: Ino) {
        *self
            .lookups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ino)
            .or_default() += 1;
    }

    fn entry(&self, r: Reply, reply: ReplyEntry) {
        match r {
            Reply::Attr(a) => {
                self.remember(a.ino);
                reply.entry(&TTL, &fuse_attr(&a), Generation(a.generation));
            }
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn empty(r: Reply, reply: ReplyEmpty) {
        match r {
            Reply::Ok => reply.ok(),
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn open_file(&self, ino: Ino, module_fh: Fh) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, OpenFile { ino, module_fh });
        FileHandle(fh)
    }

    fn module_fh(&self, fh: FileHandle) -> Fh {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .map_or(Fh(0), |f| f.module_fh)
    }

    fn control(&self, value: &[u8]) -> Result<(), Errno> {
        let v = std::str::from_utf8(value)
            .map_err(|_| Errno::EINVAL)?
            .trim();
        let (kind, class) = v.split_once(':').unwrap_or((v, ""));
        let fault = Fault::parse(kind).ok_or(Errno::EINVAL)?;
        if class.is_empty() && self.inflight.is_some() {
            // Level 5 has no separate module process to fault "between requests": the host is
            // the module. An idle fault fires in the next request, whatever it is.
            *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some((fault, OpClass::Any));
        } else if class.is_empty() {
            self.backend.idle_fault(fault).map_err(|m| {
                tracing::warn!("{m}");
                Errno::EOPNOTSUPP
            })?;
        } else {
            let class = OpClass::parse(class).ok_or(Errno::EINVAL)?;
            if self.backend.level() == crate::backend::Level::L5
                && fault != Fault::Panic
                && self.inflight.is_none()
            {
                tracing::warn!(
                    "level 5 has no isolation: only 'panic' (caught in-process) can be injected; mount with --level 4"
                );
                return Err(Errno::EOPNOTSUPP);
            }
            *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some((fault, class));
        }
        tracing::info!(fault = fault.name(), class, "fault injection armed");
        Ok(())
    }

    fn arm_site(&self, value: &[u8]) -> Result<(), Errno> {
        let v = std::str::from_utf8(value)
            .map_err(|_| Errno::EINVAL)?
            .trim();
        let mut it = v.split(':');
        let site: u32 = it
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or(Errno::EINVAL)?;
        let pid: u32 = it
            .next()
            .map_or(Ok(0), |x| x.parse())
            .map_err(|_| Errno::EINVAL)?;
        let seed: u64 = it
            .next()
            .map_or(Ok(0), |x| x.parse())
            .map_err(|_| Errno::EINVAL)?;
        self.backend.arm_site(site, pid, seed).map_err(|m| {
            tracing::warn!("{m}");
            Errno::EOPNOTSUPP
        })?;
        tracing::info!(site, pid, seed, "fault site armed");
        Ok(())
    }

    fn status_attr(&self) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo(STATUS_INO),
            size: 4096,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn status(&self) -> Vec<u8> {
        let mut j = self.stats.json(self.backend.level(), &self.module);
        if let Some(w) = &self.inflight {
            // The process to signal is the original host (it unmounts on SIGTERM); requests
            // are served by its current rfork worker.
            j["host_pid"] = w.word(crate::l5::HOST_PID).load(Ordering::Relaxed).into();
            j["serving_pid"] = sys::Pid::this().as_raw().into();
            // Level 5: the host process itself restarts; its counters restart with it, so the
            // generation (from rfork) is the durable count.
            let restarts = u64::from(rfork::generation().saturating_sub(1));
            j["restarts"] = restarts.into();
            let panics = self.stats.module_failures.load(Ordering::Relaxed);
            j["module_failures"] = (panics + restarts).into();
        }
        j["store_free_blocks"] = self.backend.store().free_blocks().into();
        if let Some(c) = self.backend.context_opts() {
            j["contexts"] = c.contexts.into();
            j["recovery"] = c.recovery.name().into();
        }
        if let Some(d) = self.backend.deadlock_status() {
            j["deadlock"] = d;
        }
        j["site_hits"] = self.backend.site_hits().into();
        if let Some(p) = &*self.last_fsck.lock().unwrap_or_else(|p| p.into_inner()) {
            j["fsck"] = serde_json::json!({ "clean": p.is_empty(), "problems": p });
        }
        j["open_files"] = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            .into();
        j.to_string().into_bytes()
    }
}

impl Filesystem for HostFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        Ok(())
    }

    fn lookup(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _serving = self.gate.enter();
        if parent.0 == Ino::ROOT.0 && name == STATUS_FILE {
            return reply.entry(&Duration::ZERO, &self.status_attr(), Generation(0));
        }
        let r = self.call(
            self.ctx(req),
            Op::Lookup {
                parent: Ino(parent.0),
                name: name.as_bytes().to_vec(),
            },
        );
        self.entry(r, reply);
    }

    fn forget(&self, _req: &fuser::Request, ino: INodeNo, nlookup: u64) {
        let _serving = self.gate.enter();
        let mut t = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&Ino(ino.0)) {
            *n = n.saturating_sub(nlookup);
            if *n == 0 {
                t.remove(&Ino(ino.0));
            }
        }
    }

    fn getattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        let _serving = self.gate.enter();
        if ino.0 == STATUS_INO {
            return reply.attr(&Duration::ZERO, &self.status_attr());
        }
        let root = ino.0 == Ino::ROOT.0;
        match self.call(self.ctx(req), Op::Getattr { ino: Ino(ino.0) }) {
            Reply::Attr(a) => {
                if root {
                    *self.root_attr.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
                }
                reply.attr(&TTL, &fuse_attr(&a))
            }
            Reply::Err(e) => {
                let cached = *self.root_attr.lock().unwrap_or_else(|p| p.into_inner());
                match cached {
                    // The root's attributes are what the kernel needs to reach the control
                    // files (status, fsck): a module that cannot answer for the root (given up,
                    // or failing on it) must not lock the operator out.
                    Some(a) if root => reply.attr(&Duration::ZERO, &fuse_attr(&a)),
                    _ => reply.error(err(e)),
                }
            }
            _ => reply.error(fuser::Errno::EIO),
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
        let _serving = self.gate.enter();
        if ino.0 == STATUS_INO {
            return reply.error(fuser::Errno::EACCES);
        }
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
            self.ctx(req),
            Op::Setattr {
                ino: Ino(ino.0),
                set,
            },
        ) {
            Reply::Attr(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn readlink(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyData) {
        let _serving = self.gate.enter();
        match self.call(self.ctx(req), Op::Readlink { ino: Ino(ino.0) }) {
            Reply::Data(d) => reply.data(&d),
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
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
        let _serving = self.gate.enter();
        let op = Op::Mknod {
            parent: Ino(parent.0),
            name: name.as_bytes().to_vec(),
            mode,
            umask,
            rdev,
        };
        let r = self.call(self.ctx(req), op);
        self.entry(r, reply);
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
        let _serving = self.gate.enter();
        let r = self.call(
            self.ctx(req),
            Op::Mkdir {
                parent: Ino(parent.0),
                name: name.as_bytes().to_vec(),
                mode,
                umask,
            },
        );
        self.entry(r, reply);
    }

    fn unlink(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.gate.enter();
        Self::empty(
            self.call(
                self.ctx(req),
                Op::Unlink {
                    parent: Ino(parent.0),
                    name: name.as_bytes().to_vec(),
                },
            ),
            reply,
        );
    }

    fn rmdir(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.gate.enter();
        Self::empty(
            self.call(
                self.ctx(req),
                Op::Rmdir {
                    parent: Ino(parent.0),
                    name: name.as_bytes().to_vec(),
                },
            ),
            reply,
        );
    }

    fn symlink(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _serving = self.gate.enter();
        let op = Op::Symlink {
            parent: Ino(parent.0),
            name: link_name.as_bytes().to_vec(),
            target: target.as_os_str().as_bytes().to_vec(),
        };
        let r = self.call(self.ctx(req), op);
        self.entry(r, reply);
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
        let _serving = self.gate.enter();
        let op = Op::Rename {
            parent: Ino(parent.0),
            name: name.as_bytes().to_vec(),
            newparent: Ino(newparent.0),
            newname: newname.as_bytes().to_vec(),
            flags: flags.bits(),
        };
        Self::empty(self.call(self.ctx(req), op), reply);
    }

    fn link(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _serving = self.gate.enter();
        let op = Op::Link {
            ino: Ino(ino.0),
            newparent: Ino(newparent.0),
            newname: newname.as_bytes().to_vec(),
        };
        let r = self.call(self.ctx(req), op);
        self.entry(r, reply);
    }

    fn open(&self, req: &fuser::Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _serving = self.gate.enter();
        if ino.0 == STATUS_INO {
            if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                return reply.error(fuser::Errno::EACCES);
            }
            // Direct I/O: every read asks us, nothing stale from the page cache.
            return reply.opened(FileHandle(STATUS_FH), FopenFlags::FOPEN_DIRECT_IO);
        }
        match self.call(
            self.ctx(req),
            Op::Open {
                ino: Ino(ino.0),
                flags: flags.0,
            },
        ) {
            Reply::Opened(fh) => reply.opened(self.open_file(Ino(ino.0), fh), FopenFlags::empty()),
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn read(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _serving = self.gate.enter();
        if ino.0 == STATUS_INO {
            let mut snap = self.status_snap.lock().unwrap_or_else(|p| p.into_inner());
            if offset == 0 {
                *snap = self.status();
            }
            let v = &*snap;
            let start = (offset as usize).min(v.len());
            let end = (start + size as usize).min(v.len());
            return reply.data(&v[start..end]);
        }
        let op = Op::Read {
            ino: Ino(ino.0),
            fh: self.module_fh(fh),
            offset,
            size: size.min(1 << 20),
        };
        match self.call(self.ctx(req), op) {
            Reply::Data(d) => reply.data(&d),
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn write(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _serving = self.gate.enter();
        let op = Op::Write {
            ino: Ino(ino.0),
            fh: self.module_fh(fh),
            offset,
            data: data.to_vec(),
        };
        match self.call(self.ctx(req), op) {
            Reply::Written(n) => reply.written(n),
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn flush(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _serving = self.gate.enter();
        Self::empty(
            self.call(
                self.ctx(req),
                Op::Flush {
                    ino: Ino(ino.0),
                    fh: self.module_fh(fh),
                },
            ),
            reply,
        );
    }

    fn release(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _serving = self.gate.enter();
        if ino.0 == STATUS_INO {
            return reply.ok();
        }
        let of = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        let module_fh = of.map_or(Fh(0), |f| f.module_fh);
        let ino = of.map_or(Ino(ino.0), |f| f.ino);
        Self::empty(
            self.call(self.ctx(req), Op::Release { ino, fh: module_fh }),
            reply,
        );
    }

    fn fsync(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _serving = self.gate.enter();
        Self::empty(
            self.call(
                self.ctx(req),
                Op::Fsync {
                    ino: Ino(ino.0),
                    fh: self.module_fh(fh),
                    datasync,
                },
            ),
            reply,
        );
    }

    fn readdir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _serving = self.gate.enter();
        match self.call(
            self.ctx(req),
            Op::Readdir {
                ino: Ino(ino.0),
                offset,
                max: 256,
            },
        ) {
            Reply::Entries(es) => {
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
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn statfs(&self, req: &fuser::Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _serving = self.gate.enter();
        match self.call(self.ctx(req), Op::Statfs) {
            Reply::StatFs(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }

    fn setxattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _serving = self.gate.enter();
        if ino.0 == Ino::ROOT.0 && name == XATTR_SITE {
            match self.arm_site(value) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(err(e)),
            }
        } else if ino.0 == Ino::ROOT.0 && name == XATTR_FSCK {
            let problems = self.backend.fsck(&self.stats);
            if !problems.is_empty() {
                tracing::error!(?problems, "fsck found problems");
            }
            *self.last_fsck.lock().unwrap_or_else(|p| p.into_inner()) = Some(problems);
            reply.ok();
        } else if ino.0 == Ino::ROOT.0 && name == XATTR_FAULT {
            match self.control(value) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(err(e)),
            }
        } else {
            // Never ENOSYS: the kernel would stop sending setxattr, and with it our control channel.
            reply.error(fuser::Errno::EOPNOTSUPP);
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
        let _serving = self.gate.enter();
        // ENOSYS makes the kernel stop asking (it would otherwise look up security.capability
        // before every write: one more round trip each).
        reply.error(fuser::Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &fuser::Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        let _serving = self.gate.enter();
        reply.error(fuser::Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &fuser::Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.gate.enter();
        reply.error(fuser::Errno::EOPNOTSUPP);
    }

    fn create(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _serving = self.gate.enter();
        let op = Op::Create {
            parent: Ino(parent.0),
            name: name.as_bytes().to_vec(),
            mode,
            umask,
            flags,
        };
        match self.call(self.ctx(req), op) {
            Reply::Created(a, fh) => {
                self.remember(a.ino);
                let h = self.open_file(a.ino, fh);
                reply.created(
                    &TTL,
                    &fuse_attr(&a),
                    Generation(a.generation),
                    h,
                    FopenFlags::empty(),
                );
            }
            Reply::Err(e) => reply.error(err(e)),
            _ => reply.error(fuser::Errno::EIO),
        }
    }
}
