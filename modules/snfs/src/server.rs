//! The SNFS server: exports one real directory over TCP, one thread per connection.
//!
//! **Node numbers.** A node is named by its FUSE inode number, which is the backing file
//! system's inode number with two swaps: the export root is 1 (FUSE's root), and a backing
//! inode that really is number 1 gets the export root's backing number (which no other node
//! can have). That is a bijection on one file system, and stable across server restarts
//! because backing inode numbers are. The export must be a single file system: a lookup that
//! crosses a mount point answers `EXDEV`.
//!
//! **The handle table** maps a node number to one of its names (parent node, name) and a
//! generation (its birth time, where the backing file system records one). Every use of a
//! handle rebuilds the path, checks with `lstat` that it still names that inode (and the same
//! generation), and if not — renamed behind the server's back, or a server restarted with an
//! empty table — rescans the export breadth-first to find the inode again. A handle whose
//! inode is nowhere (deleted) answers `ESTALE`.
//!
//! **Duplicate requests.** Calls that are not idempotent carry an xid; the last
//! [`DRC_PER_SESSION`] successful replies per client session are kept, and a repeat of the
//! same operation with the same xid gets the first reply back instead of running again (a
//! client context that died after the server did the work retries with the same xid: see the
//! crate docs).
//!
//! Requests are executed one at a time under one mutex: the table, the duplicate cache and
//! the file-system operation change together, so a rename and a path resolution never race.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::Metadata;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fsapi::{Attr, DirEntry, Errno, FileKind, Ino, SetAttr, StatFs, TimeSet, Timespec};

use crate::proto::{self, Call, Handle, Op, ProtoError, Reply};

/// Replies remembered per client session for duplicate detection.
pub const DRC_PER_SESSION: usize = 128;
/// A rescan looks at no more entries than this before giving up (`ESTALE`).
const RESCAN_LIMIT: usize = 1_000_000;
const NAME_MAX: usize = 255;
/// Where unlinked-but-open files live on (in the export root, hidden from clients).
pub const ORPHANS: &str = ".snfs-orphans";

/// What can stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("export directory {0}: {1} (give an existing directory with --export)")]
    Export(String, std::io::Error),
    #[error("export {0} is not a directory: give a directory with --export")]
    NotDir(String),
}

#[derive(Debug, Clone)]
struct Node {
    parent: u64,
    name: Vec<u8>,
    /// 0: not known yet (found by readdir or a rescan; filled in on the next use).
    birth: u64,
}

/// (xid, operation fingerprint).
type DrcKey = (u64, u32);

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<u64, Node>,
    /// Per session: ((xid, operation fingerprint), reply) of recent successful calls.
    drc: HashMap<u64, VecDeque<(DrcKey, Reply)>>,
}

/// One exported directory.
#[derive(Debug)]
pub struct Export {
    root: PathBuf,
    root_ino: u64,
    dev: u64,
    state: Mutex<State>,
}

fn errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

fn rerr(e: rustix::io::Errno) -> Errno {
    Errno(e.raw_os_error())
}

/// The node's generation: its birth time in ns, or 0 where the file system keeps none.
fn gen_of(md: &Metadata) -> u64 {
    md.created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

/// A checksum of the operation, so an xid reused for a different call is not a duplicate.
fn fingerprint(op: &Op) -> u32 {
    crc32c::crc32c(&bincode::serialize(op).unwrap_or_default())
}

fn check_name(name: &[u8]) -> Result<&OsStr, Errno> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Errno::EINVAL);
    }
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(OsStr::from_bytes(name))
}

/// The readdir cookie of a name: stable while the directory changes, above 2 (`.`, `..`).
fn cookie(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 2) + 3
}

impl Export {
    pub fn new(root: &Path) -> Result<Export, ServerError> {
        let md = std::fs::metadata(root)
            .map_err(|e| ServerError::Export(root.display().to_string(), e))?;
        if !md.is_dir() {
            return Err(ServerError::NotDir(root.display().to_string()));
        }
        let root = std::fs::canonicalize(root)
            .map_err(|e| ServerError::Export(root.display().to_string(), e))?;
        Ok(Export {
            root,
            root_ino: md.ino(),
            dev: md.dev(),
            state: Mutex::new(State::default()),
        })
    }

    /// Backing inode number → node number (an involution: see the module docs).
    fn node_no(&self, backing: u64) -> u64 {
        if backing == self.root_ino {
            1
        } else if backing == 1 {
            self.root_ino
        } else {
            backing
        }
    }

    fn attr(&self, md: &Metadata) -> Attr {
        let kind = FileKind::from_mode(md.mode()).unwrap_or(FileKind::File);
        Attr {
            ino: Ino(self.node_no(md.ino())),
            generation: gen_of(md),
            size: md.size(),
            blocks: md.blocks(),
            atime: ts(md.atime(), md.atime_nsec()),
            mtime: ts(md.mtime(), md.mtime_nsec()),
            ctime: ts(md.ctime(), md.ctime_nsec()),
            kind,
            perm: (md.mode() & 0o7777) as u16,
            nlink: md.nlink() as u32,
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev() as u32,
        }
    }

    /// Attributes as the client should see them: a file kept alive only by its orphan-directory
    /// name has no link left (`fstat` after `unlink` says 0).
    fn attr_at(&self, p: &Path, md: &Metadata) -> Attr {
        let mut a = self.attr(md);
        if p.parent() == Some(&self.root.join(ORPHANS)) {
            a.nlink = a.nlink.saturating_sub(1);
        }
        a
    }

    /// Makes the export the working directory and names every path relative to it: the
    /// server's paths are then no longer than the client's (an absolute export prefix would
    /// push a path near PATH_MAX over it). Process-wide, so only for a dedicated server.
    pub fn enter(&mut self) -> std::io::Result<()> {
        std::env::set_current_dir(&self.root)?;
        self.root = PathBuf::from(".");
        Ok(())
    }

    fn lstat(&self, p: &Path) -> Result<Metadata, Errno> {
        let md = std::fs::symlink_metadata(p).map_err(|e| errno(&e))?;
        if md.dev() != self.dev {
            return Err(Errno::EXDEV);
        }
        Ok(md)
    }

    /// The path a node's recorded name gives, without checking it.
    fn recorded_path(&self, st: &State, ino: u64) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut cur = ino;
        while cur != 1 {
            let n = st.nodes.get(&cur)?;
            names.push(n.name.clone());
            cur = n.parent;
            if names.len() > 4096 {
                return None;
            }
        }
        let mut p = self.root.clone();
        for n in names.iter().rev() {
            p.push(OsStr::from_bytes(n));
        }
        Some(p)
    }

    /// The current path of node `ino`, checked by lstat; rescans the export if the table is
    /// stale or empty.
    fn path(&self, st: &mut State, h: Handle) -> Result<(PathBuf, Metadata), Errno> {
        let ino = h.0;
        if ino == 1 {
            let md = self.lstat(&self.root)?;
            return Ok((self.root.clone(), md));
        }
        for attempt in 0..2 {
            if let Some(p) = self.recorded_path(st, ino)
                && let Ok(md) = self.lstat(&p)
                && self.node_no(md.ino()) == ino
            {
                let g = gen_of(&md);
                let n = st.nodes.get_mut(&ino).expect("recorded above");
                if n.birth == 0 {
                    n.birth = g;
                }
                if n.birth == g {
                    return Ok((p, md));
                }
                // Same number, another birth: the inode was reused, the handle is stale.
                st.nodes.remove(&ino);
                return Err(Errno(libc::ESTALE));
            }
            if attempt == 0 && !self.rescan(st, ino) {
                break;
            }
        }
        Err(Errno(libc::ESTALE))
    }

    /// Breadth-first walk of the export recording names, until `want` is found.
    fn rescan(&self, st: &mut State, want: u64) -> bool {
        tracing::debug!(
            node = want,
            "handle not at its recorded name: rescanning the export"
        );
        let mut queue = VecDeque::from([(1u64, self.root.clone())]);
        let mut seen = 0usize;
        while let Some((dino, dpath)) = queue.pop_front() {
            let Ok(rd) = std::fs::read_dir(&dpath) else {
                continue;
            };
            for e in rd.flatten() {
                seen += 1;
                if seen > RESCAN_LIMIT {
                    return false;
                }
                let ino = self.node_no(std::os::unix::fs::DirEntryExt::ino(&e));
                let name = e.file_name().as_bytes().to_vec();
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                if is_dir || ino == want {
                    st.nodes.insert(
                        ino,
                        Node {
                            parent: dino,
                            name,
                            birth: 0,
                        },
                    );
                }
                if ino == want {
                    return true;
                }
                if is_dir {
                    queue.push_back((ino, e.path()));
                }
            }
        }
        false
    }

    fn remember(&self, st: &mut State, md: &Metadata, parent: u64, name: &[u8]) {
        let ino = self.node_no(md.ino());
        if ino == 1 {
            return;
        }
        st.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_vec(),
                birth: gen_of(md),
            },
        );
    }

    /// Gives a node the caller's ownership (it was created by the server's own uid). The
    /// group follows a set-group-ID parent, as the kernel would have done.
    fn own(&self, p: &Path, parent: &Metadata, ctx: &fsapi::Ctx) -> Result<(), Errno> {
        let gid = if parent.mode() & libc::S_ISGID != 0 {
            parent.gid()
        } else {
            ctx.gid
        };
        match std::os::unix::fs::lchown(p, Some(ctx.uid), Some(gid)) {
            Ok(()) => Ok(()),
            // An unprivileged server can only create files it owns itself.
            Err(_) if !rustix::process::geteuid().is_root() => Ok(()),
            Err(e) => Err(errno(&e)),
        }
    }

    /// Runs one call (with duplicate detection for non-idempotent ones).
    pub fn handle(&self, session: u64, call: &Call) -> Reply {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // A duplicate is the same xid *and* the same operation: the client's xid counter is
        // host data, rolled back with a failed request, so a later different call can reuse
        // an xid.
        let key = call.xid.map(|x| (x, fingerprint(&call.op)));
        if let Some(k) = key
            && let Some((_, r)) = st
                .drc
                .get(&session)
                .and_then(|q| q.iter().find(|(id, _)| *id == k))
        {
            tracing::debug!(
                session,
                xid = k.0,
                "duplicate request: answering the saved reply"
            );
            return r.clone();
        }
        let r = self.exec(&mut st, call).unwrap_or_else(|e| Reply::Err(e.0));
        // Only successes: a failed call changed nothing, so running it again is safe, and a
        // saved error could wrongly answer a later identical call that would now succeed.
        if let Some(k) = key
            && !matches!(r, Reply::Err(_))
        {
            let q = st.drc.entry(session).or_default();
            if q.len() >= DRC_PER_SESSION {
                q.pop_front();
            }
            q.push_back((k, r.clone()));
        }
        r
    }

    fn child(
        &self,
        st: &mut State,
        dir: Handle,
        name: &[u8],
    ) -> Result<(PathBuf, Metadata), Errno> {
        let n = check_name(name)?;
        if dir.0 == 1 && name == ORPHANS.as_bytes() {
            // Not a client's name: lookups miss it, creating it is refused.
            return Err(Errno::EACCES);
        }
        let (dp, dmd) = self.path(st, dir)?;
        if !dmd.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok((dp.join(n), dmd))
    }

    fn exec(&self, st: &mut State, call: &Call) -> Result<Reply, Errno> {
        let ctx = &call.ctx;
        Ok(match &call.op {
            Op::Hello { .. } => Reply::Ok,
            Op::Lookup { dir, name } => {
                if dir.0 == 1 && name == ORPHANS.as_bytes() {
                    return Err(Errno::ENOENT);
                }
                let (p, _) = self.child(st, *dir, name)?;
                let md = self.lstat(&p)?;
                self.remember(st, &md, dir.0, name);
                Reply::Attr(self.attr(&md))
            }
            Op::Getattr { h } => {
                let (p, md) = self.path(st, *h)?;
                Reply::Attr(self.attr_at(&p, &md))
            }
            Op::Setattr { h, set } => {
                let (p, md) = self.path(st, *h)?;
                self.setattr(&p, &md, set)?;
                Reply::Attr(self.attr_at(&p, &self.lstat(&p)?))
            }
            Op::Read { h, off, len } => {
                let (p, _) = self.path(st, *h)?;
                let f = std::fs::File::open(&p).map_err(|e| errno(&e))?;
                let mut buf = vec![0u8; (*len).min(proto::MAX_READ) as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], off + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(errno(&e)),
                    }
                }
                buf.truncate(got);
                Reply::Data(buf)
            }
            Op::Write { h, off, data } => {
                let (p, _) = self.path(st, *h)?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| errno(&e))?;
                f.write_all_at(data, *off).map_err(|e| errno(&e))?;
                let md = f.metadata().map_err(|e| errno(&e))?;
                Reply::Written {
                    n: data.len() as u32,
                    attr: self.attr_at(&p, &md),
                }
            }
            Op::Create {
                dir,
                name,
                mode,
                umask,
            } => {
                let (p, dmd) = self.child(st, *dir, name)?;
                let perm = mode & 0o7777 & !umask;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(perm)
                    .open(&p)
                    .map_err(|e| errno(&e))?;
                self.finish_create(st, &p, &dmd, dir.0, name, ctx, Some(perm))?
            }
            Op::Mknod {
                dir,
                name,
                mode,
                umask,
                rdev,
            } => {
                let (p, dmd) = self.child(st, *dir, name)?;
                let perm = mode & 0o7777 & !umask;
                let ft = rustix::fs::FileType::from_raw_mode(*mode);
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    ft,
                    rustix::fs::Mode::from_raw_mode(perm),
                    u64::from(*rdev),
                )
                .map_err(rerr)?;
                self.finish_create(st, &p, &dmd, dir.0, name, ctx, Some(perm))?
            }
            Op::Mkdir {
                dir,
                name,
                mode,
                umask,
            } => {
                let (p, dmd) = self.child(st, *dir, name)?;
                let perm = mode & 0o7777 & !umask;
                std::fs::DirBuilder::new()
                    .mode(perm)
                    .create(&p)
                    .map_err(|e| errno(&e))?;
                self.finish_create(st, &p, &dmd, dir.0, name, ctx, None)?
            }
            Op::Symlink { dir, name, target } => {
                let (p, dmd) = self.child(st, *dir, name)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &p).map_err(|e| errno(&e))?;
                self.finish_create(st, &p, &dmd, dir.0, name, ctx, None)?
            }
            Op::Unlink { dir, name, .. } | Op::Rmdir { dir, name } => {
                let (p, _) = self.child(st, *dir, name)?;
                let md = self.lstat(&p)?;
                let r = if matches!(call.op, Op::Rmdir { .. }) {
                    std::fs::remove_dir(&p)
                } else if md.is_dir() {
                    return Err(Errno::EISDIR);
                } else {
                    if matches!(call.op, Op::Unlink { keep: true, .. }) {
                        self.keep_alive(st, &p, &md)?;
                    }
                    std::fs::remove_file(&p)
                };
                r.map_err(|e| errno(&e))?;
                let ino = self.node_no(md.ino());
                if st
                    .nodes
                    .get(&ino)
                    .is_some_and(|n| n.parent == dir.0 && n.name == *name)
                {
                    st.nodes.remove(&ino);
                }
                let dattr = self.attr(&self.path(st, *dir)?.1);
                Reply::Changed(vec![dattr], vec![ino])
            }
            Op::Rename {
                dir,
                name,
                newdir,
                newname,
                flags,
                keep_target,
            } => {
                let (from, _) = self.child(st, *dir, name)?;
                let (to, _) = self.child(st, *newdir, newname)?;
                let moved = self.lstat(&from)?;
                let target = self.lstat(&to).ok();
                if *keep_target
                    && *flags & fsapi::RENAME_EXCHANGE == 0
                    && let Some(t) = &target
                    && moved.ino() != t.ino()
                {
                    self.keep_alive(st, &to, t)?;
                }
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &from,
                    rustix::fs::CWD,
                    &to,
                    rustix::fs::RenameFlags::from_bits_retain(*flags),
                )
                .map_err(rerr)?;
                self.remember(st, &moved, newdir.0, newname);
                let mut stale = vec![self.node_no(moved.ino())];
                if let Some(t) = &target {
                    stale.push(self.node_no(t.ino()));
                    if *flags & fsapi::RENAME_EXCHANGE != 0 {
                        self.remember(st, t, dir.0, name);
                    } else if st
                        .nodes
                        .get(&self.node_no(t.ino()))
                        .is_some_and(|n| n.parent == newdir.0 && n.name == *newname)
                    {
                        st.nodes.remove(&self.node_no(t.ino()));
                    }
                }
                let mut attrs = vec![self.attr(&self.path(st, *dir)?.1)];
                if newdir != dir {
                    attrs.push(self.attr(&self.path(st, *newdir)?.1));
                }
                Reply::Changed(attrs, stale)
            }
            Op::Link { h, newdir, newname } => {
                let (p, md) = self.path(st, *h)?;
                if md.is_dir() {
                    return Err(Errno::EPERM);
                }
                let (to, _) = self.child(st, *newdir, newname)?;
                std::fs::hard_link(&p, &to).map_err(|e| errno(&e))?;
                Reply::Attr(self.attr(&self.lstat(&to)?))
            }
            Op::Readlink { h } => {
                let (p, _) = self.path(st, *h)?;
                let t = std::fs::read_link(&p).map_err(|e| errno(&e))?;
                Reply::Data(t.into_os_string().into_encoded_bytes())
            }
            Op::Readdir {
                h,
                cookie: from,
                max,
            } => self.readdir(st, *h, *from, *max)?,
            Op::Statfs => {
                let s = rustix::fs::statvfs(&self.root).map_err(rerr)?;
                Reply::StatFs(StatFs {
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: s.f_namemax as u32,
                })
            }
            Op::DropOrphan { h } => {
                let p = self.root.join(ORPHANS).join(h.0.to_string());
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        if st
                            .nodes
                            .get(&h.0)
                            .is_some_and(|n| n.parent != 1 && n.name == h.0.to_string().as_bytes())
                        {
                            st.nodes.remove(&h.0);
                        }
                    }
                    // Already gone (a retried call): done.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(errno(&e)),
                }
                Reply::Ok
            }
            Op::Fsync { h, datasync } => {
                let (p, _) = self.path(st, *h)?;
                let f = std::fs::File::open(&p).map_err(|e| errno(&e))?;
                if *datasync {
                    f.sync_data()
                } else {
                    f.sync_all()
                }
                .map_err(|e| errno(&e))?;
                Reply::Ok
            }
        })
    }

    /// Gives a file about to lose its last name one more, in the orphan directory, so the
    /// client's open file keeps working; [`Op::DropOrphan`] removes it.
    fn keep_alive(&self, st: &mut State, p: &Path, md: &Metadata) -> Result<(), Errno> {
        if md.is_dir() || md.nlink() > 1 {
            return Ok(());
        }
        let dir = self.root.join(ORPHANS);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(errno(&e)),
        }
        let ino = self.node_no(md.ino());
        let to = dir.join(ino.to_string());
        match std::fs::hard_link(p, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(errno(&e)),
        }
        let dino = self.node_no(self.lstat(&dir)?.ino());
        st.nodes.insert(
            dino,
            Node {
                parent: 1,
                name: ORPHANS.as_bytes().to_vec(),
                birth: 0,
            },
        );
        st.nodes.insert(
            ino,
            Node {
                parent: dino,
                name: ino.to_string().into_bytes(),
                birth: gen_of(md),
            },
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_create(
        &self,
        st: &mut State,
        p: &Path,
        dmd: &Metadata,
        dir: u64,
        name: &[u8],
        ctx: &fsapi::Ctx,
        perm: Option<u32>,
    ) -> Result<Reply, Errno> {
        self.own(p, dmd, ctx)?;
        // chown clears set-ID bits of a non-directory: put back what was asked for.
        if let Some(perm) = perm
            && perm & (libc::S_ISUID | libc::S_ISGID) != 0
        {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(perm))
                .map_err(|e| errno(&e))?;
        }
        let md = self.lstat(p)?;
        self.remember(st, &md, dir, name);
        Ok(Reply::Attr(self.attr(&md)))
    }

    fn setattr(&self, p: &Path, md: &Metadata, set: &SetAttr) -> Result<(), Errno> {
        if let Some(size) = set.size {
            if md.is_dir() {
                return Err(Errno::EISDIR);
            }
            if !md.is_file() {
                return Err(Errno::EINVAL);
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .map_err(|e| errno(&e))?;
            f.set_len(size).map_err(|e| errno(&e))?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            std::os::unix::fs::lchown(p, set.uid, set.gid).map_err(|e| errno(&e))?;
        }
        if let Some(mode) = set.mode {
            if md.file_type().is_symlink() {
                return Err(Errno::EOPNOTSUPP);
            }
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| errno(&e))?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let conv = |t: Option<TimeSet>| match t {
                None => rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                Some(TimeSet::Now) => rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_NOW,
                },
                Some(TimeSet::At(t)) => rustix::fs::Timespec {
                    tv_sec: t.sec,
                    tv_nsec: i64::from(t.nsec),
                },
            };
            let times = rustix::fs::Timestamps {
                last_access: conv(set.atime),
                last_modification: conv(set.mtime),
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                p,
                &times,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(rerr)?;
        }
        Ok(())
    }

    fn readdir(&self, st: &mut State, h: Handle, from: u64, max: u32) -> Result<Reply, Errno> {
        let (p, md) = self.path(st, h)?;
        if !md.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let parent = if h.0 == 1 {
            1
        } else {
            st.nodes.get(&h.0).map_or(1, |n| n.parent)
        };
        let mut all = vec![
            DirEntry {
                ino: Ino(h.0),
                offset: 1,
                kind: FileKind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: Ino(parent),
                offset: 2,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
            },
        ];
        for e in std::fs::read_dir(&p).map_err(|e| errno(&e))?.flatten() {
            let name = e.file_name().as_bytes().to_vec();
            if h.0 == 1 && name == ORPHANS.as_bytes() {
                continue;
            }
            let ino = self.node_no(std::os::unix::fs::DirEntryExt::ino(&e));
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileKind::Dir,
                Ok(t) if t.is_symlink() => FileKind::Symlink,
                Ok(t) if t.is_file() => FileKind::File,
                Ok(t) => {
                    use std::os::unix::fs::FileTypeExt;
                    if t.is_fifo() {
                        FileKind::Fifo
                    } else if t.is_char_device() {
                        FileKind::CharDev
                    } else if t.is_block_device() {
                        FileKind::BlockDev
                    } else {
                        FileKind::Socket
                    }
                }
                Err(_) => FileKind::File,
            };
            if kind == FileKind::Dir {
                st.nodes.entry(ino).or_insert(Node {
                    parent: h.0,
                    name: name.clone(),
                    birth: 0,
                });
            }
            all.push(DirEntry {
                ino: Ino(ino),
                offset: cookie(&name),
                kind,
                name,
            });
        }
        all.sort_by_key(|e| e.offset);
        let mut out: Vec<DirEntry> = Vec::new();
        for e in all.into_iter().filter(|e| e.offset > from) {
            // Names with the same cookie travel together: a resume point must not split them.
            if out.len() >= max as usize && out.last().is_some_and(|l| l.offset != e.offset) {
                break;
            }
            out.push(e);
        }
        Ok(Reply::Entries(out))
    }
}

/// Serves one connection until it closes or sends a bad frame.
pub fn serve_conn(export: &Export, stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let Ok(wstream) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let mut w = BufWriter::with_capacity(256 << 10, wstream);
    let mut session = 0u64;
    loop {
        let (id, call) = match proto::read_request(&mut r) {
            Ok(x) => x,
            Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::debug!(%peer, "connection closed");
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, "dropping connection: {e}");
                return;
            }
        };
        if let Op::Hello { session: s } = call.op {
            session = s;
        }
        let reply = export.handle(session, &call);
        if let Err(e) = proto::write_reply(&mut w, id, &reply).and_then(|()| Ok(w.flush()?)) {
            tracing::warn!(%peer, "dropping connection: cannot reply: {e}");
            return;
        }
    }
}

/// Accepts connections forever, one thread each.
pub fn serve(export: Arc<Export>, listener: TcpListener) -> std::io::Result<()> {
    // Created nodes get exactly the mode the client asked for (its umask already applied).
    rustix::process::umask(rustix::fs::Mode::empty());
    loop {
        let (s, peer) = listener.accept()?;
        tracing::debug!(%peer, "connection");
        let ex = export.clone();
        std::thread::Builder::new()
            .name("snfs-conn".into())
            .spawn(move || serve_conn(&ex, s))?;
    }
}
