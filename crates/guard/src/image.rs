//! The on-disk image: a directory of layers `layer-NNNNNNNN.img`, each one file.
//!
//! Layer file = header, records, end record:
//! - header: magic `KGUARDIM`, version (u32 LE), sequence number (u64), flags (u32, bit 0 =
//!   full), crc32c of the preceding 24 bytes (u32).
//! - record: tag (u8), payload length (u64 LE), payload, crc32c of tag+length+payload (u32).
//!   Tag 1 = state (JSON [`ProcState`] + log delta), tag 2 = pages of pid 1 (u64 address +
//!   bytes), tag 3 = pages of another process of the tree (u64 pid inside the namespace, u64
//!   address, bytes; version 2).
//! - end record: tag 0xFF whose payload is the number of preceding records (u64); a file
//!   without it is truncated.
//!
//! Files are written to a temporary name, fsynced, renamed, and the directory fsynced: a
//! layer either exists complete or not at all. A full layer has every page; an incremental
//! one only the pages written since the previous layer. Restore applies the newest full layer
//! and the incrementals after it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{LogEntry, ProcState};

const MAGIC: &[u8; 8] = b"KGUARDIM";
/// Current format version (2 added the process tree: tag 3; version 1 files are still read).
pub const VERSION: u32 = 2;
const TAG_STATE: u8 = 1;
const TAG_PAGES: u8 = 2;
const TAG_TREE_PAGES: u8 = 3;
const TAG_END: u8 = 0xFF;
const HEADER_LEN: usize = 28;
/// Largest payload a reader accepts (a pages record is split below this).
const MAX_RECORD: u64 = 1 << 30;
/// Pages records are cut at this size so an error names a small region.
const PAGES_RECORD: usize = 4 << 20;

/// What can be wrong with an image. Every variant names the file and, where there is one,
/// the record, so the operator knows what is damaged.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a guard image layer (bad magic); point --images at a directory written by `kintsugi guard`"
    )]
    BadMagic { path: PathBuf },
    #[error(
        "{path}: image format version {found} is not supported (this build reads versions 1 to {VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "{path}: header checksum mismatch: the file is corrupt; restore from an older copy of the directory"
    )]
    HeaderCrc { path: PathBuf },
    #[error(
        "{path}: record {index} ({what}) is truncated: the file was cut short; it cannot be restored"
    )]
    Truncated {
        path: PathBuf,
        index: usize,
        what: &'static str,
    },
    #[error(
        "{path}: record {index} ({what}) fails its checksum: the file is corrupt; it cannot be restored"
    )]
    RecordCrc {
        path: PathBuf,
        index: usize,
        what: &'static str,
    },
    #[error("{path}: record {index} ({what}) is malformed: {why}")]
    Malformed {
        path: PathBuf,
        index: usize,
        what: &'static str,
        why: String,
    },
    #[error("{path}: no end record: the layer is incomplete; it cannot be restored")]
    NoEnd { path: PathBuf },
    #[error(
        "image directory {dir} holds no complete layer: nothing to restore (was the guard ever run with --images {dir}?)"
    )]
    Empty { dir: PathBuf },
    #[error(
        "image directory {dir} holds no restorable layer yet: the first checkpoint completes with the next epoch"
    )]
    NotYet { dir: PathBuf },
    #[error(
        "image directory {dir}: layer {seq} needs the full layer it builds on, but none exists at or before it"
    )]
    NoBase { dir: PathBuf, seq: u64 },
    #[error(
        "image directory {dir}: layer {missing} is missing between full layer {base} and layer {top}"
    )]
    Gap {
        dir: PathBuf,
        base: u64,
        top: u64,
        missing: u64,
    },
}

fn tag_name(tag: u8) -> &'static str {
    match tag {
        TAG_STATE => "state",
        TAG_PAGES => "pages",
        TAG_TREE_PAGES => "pages of a child process",
        TAG_END => "end",
        _ => "unknown",
    }
}

/// The state record's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: ProcState,
    /// Log entries committed during this epoch.
    pub log: Vec<LogEntry>,
    /// Entries left out of `log` because an epoch had too many.
    pub log_dropped: u64,
}

/// Page runs `(address, bytes)` of one process.
pub type PageRuns = Vec<(u64, Vec<u8>)>;

/// One layer, in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub seq: u64,
    pub full: bool,
    pub state: StateRecord,
    /// Page runs `(address, bytes)`, page-aligned, in address order within the layer. A run
    /// longer than 4 MiB comes back from disk as several runs.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// Page runs of the other processes of the tree, by pid inside the namespace.
    pub tree_pages: Vec<(i32, PageRuns)>,
}

impl Layer {
    /// Adds page runs of process `pid` (inside the namespace; 1 is the program itself).
    pub fn add_pages(&mut self, pid: i32, pages: PageRuns) {
        if pages.is_empty() {
            return;
        }
        if pid == 1 {
            self.pages.extend(pages);
        } else if let Some(t) = self.tree_pages.iter_mut().find(|t| t.0 == pid) {
            t.1.extend(pages);
        } else {
            self.tree_pages.push((pid, pages));
        }
    }
    /// Bytes of page data (every process).
    pub fn page_bytes(&self) -> u64 {
        self.pages.iter().map(|p| p.1.len() as u64).sum::<u64>()
            + self
                .tree_pages
                .iter()
                .flat_map(|t| t.1.iter())
                .map(|p| p.1.len() as u64)
                .sum::<u64>()
    }
}

/// File name of layer `seq`.
pub fn layer_name(seq: u64) -> String {
    format!("layer-{seq:08}.img")
}

fn parse_name(name: &str) -> Option<u64> {
    name.strip_prefix("layer-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}

fn record(out: &mut Vec<u8>, tag: u8, payload: &[&[u8]]) {
    let len: u64 = payload.iter().map(|p| p.len() as u64).sum();
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(&len.to_le_bytes());
    for p in payload {
        out.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Serializes a layer.
pub fn encode(layer: &Layer) -> Vec<u8> {
    let mut out = Vec::with_capacity(layer.page_bytes() as usize + 4096);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&layer.seq.to_le_bytes());
    out.extend_from_slice(&u32::from(layer.full).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let state = serde_json::to_vec(&layer.state).expect("state serializes");
    record(&mut out, TAG_STATE, &[&state]);
    let mut n = 1u64;
    for (addr, bytes) in &layer.pages {
        for (i, chunk) in bytes.chunks(PAGES_RECORD).enumerate() {
            let a = addr + (i * PAGES_RECORD) as u64;
            record(&mut out, TAG_PAGES, &[&a.to_le_bytes(), chunk]);
            n += 1;
        }
    }
    for (pid, runs) in &layer.tree_pages {
        let p = (*pid as u64).to_le_bytes();
        for (addr, bytes) in runs {
            for (i, chunk) in bytes.chunks(PAGES_RECORD).enumerate() {
                let a = addr + (i * PAGES_RECORD) as u64;
                record(&mut out, TAG_TREE_PAGES, &[&p, &a.to_le_bytes(), chunk]);
                n += 1;
            }
        }
    }
    record(&mut out, TAG_END, &[&n.to_le_bytes()]);
    out
}

/// Parses a layer; `path` only names the file in errors.
pub fn decode(path: &Path, buf: &[u8]) -> Result<Layer, ImageError> {
    let l = parse(path, buf)?;
    let mut pages = Vec::new();
    let mut tree_pages: Vec<(i32, PageRuns)> = Vec::new();
    for (pid, a, r) in &l.runs {
        let run = (*a, buf[r.clone()].to_vec());
        if *pid == 1 {
            pages.push(run);
        } else {
            match tree_pages.iter_mut().find(|t| t.0 == *pid) {
                Some(t) => t.1.push(run),
                None => tree_pages.push((*pid, vec![run])),
            }
        }
    }
    Ok(Layer {
        seq: l.seq,
        full: l.full,
        state: l.state,
        pages,
        tree_pages,
    })
}

/// A validated layer whose page runs stay in the file buffer (`runs` are byte ranges of it).
#[derive(Debug)]
struct Parsed {
    seq: u64,
    full: bool,
    state: StateRecord,
    /// `(pid inside the namespace, address, byte range of the file)`.
    runs: Vec<(i32, u64, std::ops::Range<usize>)>,
}

/// A layer file's bytes: mapped from the page cache (restore), or read.
#[derive(Debug)]
enum Bytes {
    Mapped(sys::guard_map::MappedFile),
    Read(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Read(v) => v,
        }
    }
}

/// Maps a layer file (its pages are copied once, straight from the page cache, into the
/// restored process); reads it where it cannot be mapped.
fn load_bytes(path: &Path) -> Result<Bytes, ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    match sys::guard_map::MappedFile::map(&f) {
        Ok(m) => Ok(Bytes::Mapped(m)),
        Err(_) => {
            let mut buf = Vec::new();
            let mut f = f;
            f.read_to_end(&mut buf).map_err(io)?;
            Ok(Bytes::Read(buf))
        }
    }
}

/// A layer loaded for restore: the file bytes and where its pages are in them.
#[derive(Debug)]
struct Loaded {
    buf: Bytes,
    runs: Vec<(i32, u64, std::ops::Range<usize>)>,
}

/// Checksums of this many bytes or more are computed by two threads.
const PARALLEL_CRC_MIN: usize = 16 << 20;

/// Whether each record `(start, end)` of `buf` matches the crc32c stored after it. Big layers
/// are checked by two threads (restore time is mostly checksums and copies).
fn check_crcs(buf: &[u8], recs: &[(usize, usize)]) -> Vec<bool> {
    let ok = |&(a, e): &(usize, usize)| {
        let want = u32::from_le_bytes(buf[e..e + 4].try_into().expect("4 bytes"));
        crc32c::crc32c(&buf[a..e]) == want
    };
    let total: usize = recs.iter().map(|r| r.1 - r.0).sum();
    if total < PARALLEL_CRC_MIN || recs.len() < 2 {
        return recs.iter().map(ok).collect();
    }
    // Split at the record where half the bytes are behind us.
    let mut acc = 0;
    let mid = recs
        .iter()
        .position(|r| {
            acc += r.1 - r.0;
            acc >= total / 2
        })
        .unwrap_or(0)
        .clamp(1, recs.len() - 1);
    let (first, second) = recs.split_at(mid);
    std::thread::scope(|s| {
        let h = s.spawn(|| second.iter().map(ok).collect::<Vec<bool>>());
        let mut v: Vec<bool> = first.iter().map(ok).collect();
        match h.join() {
            Ok(w) => v.extend(w),
            Err(_) => v.extend(second.iter().map(ok)),
        }
        v
    })
}

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed, ImageError> {
    let p = || path.to_path_buf();
    if buf.len() < 8 || &buf[..8] != MAGIC {
        return Err(ImageError::BadMagic { path: p() });
    }
    if buf.len() < HEADER_LEN {
        return Err(ImageError::Truncated {
            path: p(),
            index: 0,
            what: "header",
        });
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[..24]) != crc {
        return Err(ImageError::HeaderCrc { path: p() });
    }
    if !(1..=VERSION).contains(&version) {
        return Err(ImageError::Version {
            path: p(),
            found: version,
        });
    }
    let seq = u64::from_le_bytes(buf[12..20].try_into().expect("8 bytes"));
    let full = u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes")) & 1 == 1;
    // Pass 1: the records' bounds, up to the first one whose framing is broken (that error
    // is reported only if every record before it is intact, as a sequential reader would).
    let mut recs: Vec<(usize, usize)> = Vec::new();
    let mut framing: Option<ImageError> = None;
    let mut at = HEADER_LEN;
    loop {
        let index = recs.len() + 1;
        if at == buf.len() {
            framing = Some(ImageError::NoEnd { path: p() });
            break;
        }
        let tag = buf[at];
        let what = tag_name(tag);
        if buf.len() - at < 9 {
            framing = Some(ImageError::Truncated {
                path: p(),
                index,
                what,
            });
            break;
        }
        let len = u64::from_le_bytes(buf[at + 1..at + 9].try_into().expect("8 bytes"));
        if len > MAX_RECORD || ((buf.len() - at - 9) as u64) < len + 4 {
            framing = Some(ImageError::Truncated {
                path: p(),
                index,
                what,
            });
            break;
        }
        let end = at + 9 + len as usize;
        recs.push((at, end));
        at = end + 4;
        if tag == TAG_END {
            break;
        }
    }
    // Pass 2: checksums (in parallel for big layers).
    let crc_ok = check_crcs(buf, &recs);
    // Pass 3: meaning, record by record.
    let mut state = None;
    let mut pages: Vec<(i32, u64, std::ops::Range<usize>)> = Vec::new();
    for (i, &(start, end)) in recs.iter().enumerate() {
        let index = i + 1;
        let tag = buf[start];
        let what = tag_name(tag);
        if !crc_ok[i] {
            return Err(ImageError::RecordCrc {
                path: p(),
                index,
                what,
            });
        }
        let payload = &buf[start + 9..end];
        let next = end + 4;
        let bad = |why: String| ImageError::Malformed {
            path: p(),
            index,
            what,
            why,
        };
        match tag {
            TAG_STATE => {
                let s: StateRecord =
                    serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
                state = Some(s);
            }
            TAG_PAGES | TAG_TREE_PAGES => {
                let head = if tag == TAG_PAGES { 8 } else { 16 };
                if payload.len() < head || !(payload.len() - head).is_multiple_of(4096) {
                    return Err(bad(format!(
                        "{} bytes is not a header of {head} bytes plus whole pages",
                        payload.len()
                    )));
                }
                let word = |i: usize| {
                    u64::from_le_bytes(payload[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                };
                let (pid, addr) = if tag == TAG_PAGES {
                    (1, word(0))
                } else {
                    let pid = word(0);
                    if pid < 2 || pid > i32::MAX as u64 {
                        return Err(bad(format!("pid {pid} is not a child's pid")));
                    }
                    (pid as i32, word(1))
                };
                if addr % 4096 != 0 {
                    return Err(bad(format!("address {addr:#x} is not page-aligned")));
                }
                // One run per record, left in place in the file buffer.
                pages.push((pid, addr, start + 9 + head..end));
            }
            TAG_END => {
                if payload.len() != 8 {
                    return Err(bad("end record must hold 8 bytes".into()));
                }
                let n = u64::from_le_bytes(payload.try_into().expect("8 bytes"));
                if n != (index - 1) as u64 {
                    return Err(bad(format!(
                        "end record counts {n} records, file has {}",
                        index - 1
                    )));
                }
                if next != buf.len() {
                    return Err(bad("bytes after the end record".into()));
                }
                let state = state.ok_or_else(|| bad("no state record".into()))?;
                return Ok(Parsed {
                    seq,
                    full,
                    state,
                    runs: pages,
                });
            }
            _ => return Err(bad(format!("unknown record tag {tag}"))),
        }
    }
    Err(framing.unwrap_or(ImageError::NoEnd { path: p() }))
}

/// Writes `bytes` to `dir/name` durably: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Writes a layer into `dir`.
pub fn write_layer(dir: &Path, layer: &Layer) -> io::Result<u64> {
    let bytes = encode(layer);
    write_atomic(dir, &layer_name(layer.seq), &bytes)?;
    Ok(bytes.len() as u64)
}

/// Reads one layer file.
pub fn read_layer(path: &Path) -> Result<Layer, ImageError> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    decode(path, &buf)
}

/// Sequence numbers of the layer files in `dir`, ascending. Leftover temporaries are ignored.
pub fn list_layers(dir: &Path) -> Result<Vec<u64>, ImageError> {
    let rd = fs::read_dir(dir).map_err(|source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut v: Vec<u64> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(parse_name))
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The restorable image: the newest layer's state and the page contents that the newest
/// full layer plus the incrementals after it add up to (indexed, not copied).
#[derive(Debug)]
pub struct Chain {
    pub top: u64,
    pub base: u64,
    pub state: ProcState,
    layers: Vec<Loaded>,
    /// (pid inside the namespace, page address) → (layer, run, page within the run) of its
    /// newest copy; only pages inside that process's mappings in the top state, from layers at
    /// or after each mapping's `base_seq`.
    index: BTreeMap<(i32, u64), (u32, u32, u32)>,
}

impl Chain {
    /// Bytes of page data (every process).
    pub fn page_bytes(&self) -> u64 {
        self.index.len() as u64 * 4096
    }
    /// Addresses of pid 1's pages, ascending.
    pub fn addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.range((1, 0)..(2, 0)).map(|(k, _)| k.1)
    }
    /// The contents of pid 1's page at `addr`.
    pub fn page(&self, addr: u64) -> Option<&[u8]> {
        self.page_of(1, addr)
    }
    /// The contents of the page at `addr` of process `pid` (inside the namespace).
    pub fn page_of(&self, pid: i32, addr: u64) -> Option<&[u8]> {
        let &(l, r, i) = self.index.get(&(pid, addr))?;
        let ll = &self.layers[l as usize];
        let data = &ll.buf[ll.runs[r as usize].2.clone()];
        Some(&data[i as usize * 4096..(i as usize + 1) * 4096])
    }
    /// Pid 1's maximal contiguous runs `(address, bytes)`, borrowed from the layers.
    pub fn runs(&self) -> Vec<(u64, &[u8])> {
        self.runs_of(1)
    }
    /// Maximal contiguous runs `(address, bytes)` of process `pid`, borrowed from the layers.
    pub fn runs_of(&self, pid: i32) -> Vec<(u64, &[u8])> {
        // (address, layer, run, first page, page count)
        type Cur = (u64, u32, u32, u32, u32);
        fn slice(layers: &[Loaded], c: Cur) -> (u64, &[u8]) {
            let l = &layers[c.1 as usize];
            let data: &[u8] = &l.buf[l.runs[c.2 as usize].2.clone()];
            (c.0, &data[c.3 as usize * 4096..(c.3 + c.4) as usize * 4096])
        }
        let mut out: Vec<(u64, &[u8])> = Vec::new();
        let mut cur: Option<Cur> = None;
        for (&(_, a), &(l, r, i)) in self.index.range((pid, 0)..(pid, u64::MAX)) {
            match cur {
                Some(ref mut c)
                    if c.0 + u64::from(c.4) * 4096 == a
                        && c.1 == l
                        && c.2 == r
                        && c.3 + c.4 == i =>
                {
                    c.4 += 1
                }
                _ => {
                    if let Some(c) = cur.take() {
                        out.push(slice(&self.layers, c));
                    }
                    cur = Some((a, l, r, i, 1));
                }
            }
        }
        if let Some(c) = cur {
            out.push(slice(&self.layers, c));
        }
        out
    }
}

/// Loads the newest restorable chain from `dir`. Every layer of the chain must parse: a
/// damaged one fails the whole load (never a half-restore).
pub fn load_chain(dir: &Path) -> Result<Chain, ImageError> {
    let seqs = list_layers(dir)?;
    let Some(&newest) = seqs.last() else {
        return Err(ImageError::Empty {
            dir: dir.to_path_buf(),
        });
    };
    let mut layers: Vec<(Parsed, Bytes)> = Vec::new();
    let (mut t_map, mut t_parse) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut top = newest;
    let mut want = top;
    loop {
        if !seqs.contains(&want) {
            let base = seqs
                .iter()
                .copied()
                .filter(|&s| s < want)
                .max()
                .unwrap_or(0);
            return Err(if layers.iter().any(|l| l.0.full) || base == 0 {
                ImageError::NoBase {
                    dir: dir.to_path_buf(),
                    seq: top,
                }
            } else {
                ImageError::Gap {
                    dir: dir.to_path_buf(),
                    base,
                    top,
                    missing: want,
                }
            });
        }
        let path = dir.join(layer_name(want));
        let t = std::time::Instant::now();
        let buf = load_bytes(&path)?;
        t_map += t.elapsed();
        let t = std::time::Instant::now();
        let l = parse(&path, &buf)?;
        t_parse += t.elapsed();
        if layers.is_empty() && l.state.state.incomplete {
            // Copied partly while the program ran: only restorable under its successor.
            if want == 0 || !seqs.contains(&(want - 1)) {
                return Err(ImageError::NotYet {
                    dir: dir.to_path_buf(),
                });
            }
            want -= 1;
            top = want;
            continue;
        }
        let full = l.full;
        layers.push((l, buf));
        if full {
            break;
        }
        if want == 0 {
            return Err(ImageError::NoBase {
                dir: dir.to_path_buf(),
                seq: top,
            });
        }
        want -= 1;
    }
    layers.reverse();
    let t = std::time::Instant::now();
    let chain = fold(layers);
    tracing::debug!(target: "guard", "chain {}..{}: mapped in {t_map:?}, checked in {t_parse:?}, indexed in {:?}", chain.base, chain.top, t.elapsed());
    Ok(chain)
}

/// Folds layers (oldest first, the first one full) into a chain.
fn fold(layers: Vec<(Parsed, Bytes)>) -> Chain {
    let base = layers.first().map(|l| l.0.seq).unwrap_or(0);
    let top_layer = &layers.last().expect("at least one layer").0;
    let top = top_layer.seq;
    let state = top_layer.state.state.clone();
    let mut index: BTreeMap<(i32, u64), (u32, u32, u32)> = BTreeMap::new();
    // Each process's mappings with pages, by pid inside the namespace.
    let mut vmas: BTreeMap<i32, Vec<&crate::model::Vma>> = BTreeMap::new();
    for p in std::iter::once(&state).chain(state.procs.iter()) {
        let mut v: Vec<&crate::model::Vma> = p.vmas.iter().filter(|v| v.has_pages()).collect();
        v.sort_by_key(|v| v.start);
        vmas.insert(p.ns_pid(), v);
    }
    let find = |pid: i32, a: u64| {
        let vmas = vmas.get(&pid)?;
        let i = vmas.partition_point(|v| v.end <= a);
        vmas.get(i).filter(|v| v.contains(a)).copied()
    };
    for (li, (l, _)) in layers.iter().enumerate() {
        for (ri, (pid, addr, range)) in l.runs.iter().enumerate() {
            for i in 0..range.len() / 4096 {
                let a = addr + (i as u64) * 4096;
                match find(*pid, a) {
                    Some(v) if l.seq >= v.base_seq => {
                        index.insert((*pid, a), (li as u32, ri as u32, i as u32));
                    }
                    _ => {
                        index.remove(&(*pid, a));
                    }
                }
            }
        }
    }
    let layers = layers
        .into_iter()
        .map(|(p, buf)| Loaded { buf, runs: p.runs })
        .collect();
    Chain {
        top,
        base,
        state,
        layers,
        index,
    }
}

/// Merges the chain ending at the newest layer into one full layer with the same sequence
/// number (atomically replacing it), then deletes the layers it absorbed. Run in the
/// background; a crash in between leaves either the old chain or the merged layer.
pub fn merge(dir: &Path) -> Result<u64, ImageError> {
    let chain = load_chain(dir)?;
    if chain.base == chain.top {
        return Ok(chain.top);
    }
    let top_layer = read_layer(&dir.join(layer_name(chain.top)))?;
    let runs_of = |pid: i32| {
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (a, p) in chain.runs_of(pid) {
            match runs.last_mut() {
                Some((ra, rd)) if *ra + rd.len() as u64 == a => rd.extend_from_slice(p),
                _ => runs.push((a, p.to_vec())),
            }
        }
        runs
    };
    let tree_pages = chain
        .state
        .procs
        .iter()
        .map(|p| (p.ns_pid(), runs_of(p.ns_pid())))
        .filter(|t| !t.1.is_empty())
        .collect();
    let merged = Layer {
        seq: chain.top,
        full: true,
        state: top_layer.state,
        pages: runs_of(1),
        tree_pages,
    };
    write_layer(dir, &merged).map_err(|source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for s in list_layers(dir)? {
        if s < chain.top {
            let _ = fs::remove_file(dir.join(layer_name(s)));
        }
    }
    Ok(chain.top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Vma, VmaKind};
    use proptest::prelude::*;

    fn state_with(vmas: Vec<Vma>) -> StateRecord {
        StateRecord {
            state: ProcState {
                vmas,
                ..Default::default()
            },
            log: vec![],
            log_dropped: 0,
        }
    }

    fn anon(start: u64, end: u64, base_seq: u64) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            kind: VmaKind::Anon,
            label: String::new(),
            base_seq,
        }
    }

    #[test]
    fn round_trip_and_corruption_names_the_record() {
        let l = Layer {
            seq: 3,
            full: true,
            state: state_with(vec![anon(0x10000, 0x20000, 1)]),
            pages: vec![(0x10000, vec![7u8; 8192]), (0x1f000, vec![9u8; 4096])],
            tree_pages: vec![],
        };
        let bytes = encode(&l);
        let p = Path::new("t.img");
        assert_eq!(decode(p, &bytes).unwrap(), l);
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 21 - 100] ^= 1; // inside the second pages record (the end record is 21 bytes)
        let e = decode(p, &bad).unwrap_err().to_string();
        assert!(
            e.contains("record 3 (pages)") && e.contains("checksum"),
            "{e}"
        );
        let e = decode(p, &bytes[..bytes.len() - 3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = decode(p, &bytes[..HEADER_LEN]).unwrap_err().to_string();
        assert!(e.contains("no end record"), "{e}");
        let mut v = bytes.clone();
        v[8] = 9;
        assert!(matches!(decode(p, &v), Err(ImageError::HeaderCrc { .. })));
    }

    #[test]
    fn chain_folds_incrementals_and_respects_rebaselined_mappings() {
        let dir = std::env::temp_dir().join(format!("guard-image-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let l1 = Layer {
            seq: 1,
            full: true,
            state: state_with(vec![anon(0x10000, 0x13000, 1)]),
            pages: vec![(0x10000, vec![1u8; 3 * 4096])],
            tree_pages: vec![],
        };
        let l2 = Layer {
            seq: 2,
            full: false,
            state: state_with(vec![anon(0x10000, 0x13000, 1)]),
            pages: vec![(0x11000, vec![2u8; 4096])],
            tree_pages: vec![],
        };
        // Layer 3: the mapping was replaced (base_seq 3) and only page 0x12000 holds data.
        let l3 = Layer {
            seq: 3,
            full: false,
            state: state_with(vec![anon(0x10000, 0x13000, 3)]),
            pages: vec![(0x12000, vec![3u8; 4096])],
            tree_pages: vec![],
        };
        for l in [&l1, &l2] {
            write_layer(&dir, l).unwrap();
        }
        let c = load_chain(&dir).unwrap();
        assert_eq!((c.base, c.top), (1, 2));
        assert_eq!(c.page(0x10000).unwrap()[0], 1);
        assert_eq!(c.page(0x11000).unwrap()[0], 2);
        write_layer(&dir, &l3).unwrap();
        let c = load_chain(&dir).unwrap();
        assert_eq!(c.addrs().collect::<Vec<_>>(), vec![0x12000]);
        assert_eq!(merge(&dir).unwrap(), 3);
        assert_eq!(list_layers(&dir).unwrap(), vec![3]);
        let c = load_chain(&dir).unwrap();
        assert_eq!((c.base, c.top, c.page_bytes()), (3, 3, 4096));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn big_layers_are_checked_in_parallel_and_errors_still_name_the_first_bad_record() {
        // 5 pages records of 4 MiB: above PARALLEL_CRC_MIN.
        let l = Layer {
            seq: 1,
            full: true,
            state: state_with(vec![anon(0x1000_0000, 0x1000_0000 + (20 << 20), 1)]),
            pages: vec![(0x1000_0000, vec![3u8; 20 << 20])],
            tree_pages: vec![],
        };
        let bytes = encode(&l);
        let p = Path::new("big.img");
        let back = decode(p, &bytes).unwrap();
        assert_eq!(back.pages.len(), 5, "cut into 4 MiB records");
        assert!(
            back.page_bytes() == 20 << 20 && back.pages.iter().all(|r| r.1.iter().all(|&b| b == 3))
        );
        // Damage record 6 (the last pages record, checked by the second thread) and record 3
        // (the first thread's): the lower index is reported.
        let mut starts = Vec::new();
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            starts.push(at);
            let len = u64::from_le_bytes(bytes[at + 1..at + 9].try_into().unwrap()) as usize;
            at += 9 + len + 4;
        }
        assert_eq!(starts.len(), 7, "state, 5 pages, end");
        let mut bad = bytes.clone();
        bad[starts[5] + 100] ^= 1;
        let e = decode(p, &bad).unwrap_err().to_string();
        assert!(e.contains("record 6 (pages) fails its checksum"), "{e}");
        bad[starts[2] + 100] ^= 1;
        let e = decode(p, &bad).unwrap_err().to_string();
        assert!(e.contains("record 3 (pages) fails its checksum"), "{e}");
        // A record cut short after a damaged one: the damage is reported, not the cut.
        let e = decode(p, &bad[..starts[4] + 50]).unwrap_err().to_string();
        assert!(e.contains("record 3 (pages) fails its checksum"), "{e}");
        let e = decode(p, &bytes[..starts[4] + 50]).unwrap_err().to_string();
        assert!(e.contains("record 5 (pages) is truncated"), "{e}");
    }

    #[test]
    fn tree_pages_are_kept_per_process() {
        let dir = std::env::temp_dir().join(format!("guard-image-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let child = |base: u64| ProcState {
            nspid: 2,
            ppid: 1,
            vmas: vec![anon(0x10000, 0x12000, base)],
            ..Default::default()
        };
        let mut st = state_with(vec![anon(0x10000, 0x12000, 1)]);
        st.state.procs = vec![child(1)];
        // Same addresses in pid 1 and pid 2: different contents.
        let l1 = Layer {
            seq: 1,
            full: true,
            state: st.clone(),
            pages: vec![(0x10000, vec![1u8; 8192])],
            tree_pages: vec![(2, vec![(0x10000, vec![21u8; 8192])])],
        };
        let bytes = encode(&l1);
        assert_eq!(decode(Path::new("t.img"), &bytes).unwrap(), l1);
        write_layer(&dir, &l1).unwrap();
        let mut st2 = st.clone();
        st2.state.procs = vec![child(1)];
        let l2 = Layer {
            seq: 2,
            full: false,
            state: st2,
            pages: vec![],
            tree_pages: vec![(2, vec![(0x11000, vec![22u8; 4096])])],
        };
        write_layer(&dir, &l2).unwrap();
        let c = load_chain(&dir).unwrap();
        assert_eq!(c.page(0x11000).unwrap()[0], 1, "pid 1 keeps its own page");
        assert_eq!(c.page_of(2, 0x10000).unwrap()[0], 21);
        assert_eq!(c.page_of(2, 0x11000).unwrap()[0], 22);
        assert!(c.page_of(3, 0x10000).is_none());
        assert_eq!(c.runs_of(2).len(), 2);
        assert_eq!(merge(&dir).unwrap(), 2);
        let m = read_layer(&dir.join(layer_name(2))).unwrap();
        assert!(m.full);
        assert_eq!(m.tree_pages.len(), 1);
        let c = load_chain(&dir).unwrap();
        assert_eq!(c.page_of(2, 0x11000).unwrap()[0], 22);
        assert_eq!(c.page_bytes(), 4 * 4096);
        // A pid 1 or 0 in a child's pages record is malformed.
        let bad = Layer {
            tree_pages: vec![(1, vec![(0x10000, vec![0u8; 4096])])],
            ..l1
        };
        let e = decode(Path::new("t.img"), &encode(&bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a child's pid"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn incomplete_top_layer_is_restorable_only_under_its_successor() {
        let dir = std::env::temp_dir().join(format!("guard-image-inc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut st = state_with(vec![anon(0x10000, 0x12000, 1)]);
        st.state.incomplete = true;
        let l1 = Layer {
            seq: 1,
            full: true,
            state: st.clone(),
            pages: vec![(0x10000, vec![1u8; 8192])],
            tree_pages: vec![],
        };
        write_layer(&dir, &l1).unwrap();
        assert!(matches!(load_chain(&dir), Err(ImageError::NotYet { .. })));
        let l2 = Layer {
            seq: 2,
            full: false,
            state: state_with(vec![anon(0x10000, 0x12000, 1)]),
            pages: vec![(0x11000, vec![2u8; 4096])],
            tree_pages: vec![],
        };
        write_layer(&dir, &l2).unwrap();
        let l3 = Layer {
            seq: 3,
            full: false,
            state: st,
            pages: vec![(0x10000, vec![3u8; 4096])],
            tree_pages: vec![],
        };
        write_layer(&dir, &l3).unwrap();
        let c = load_chain(&dir).unwrap();
        assert_eq!(
            (c.base, c.top),
            (1, 2),
            "layer 3 is skipped until layer 4 exists"
        );
        assert_eq!(
            (c.page(0x10000).unwrap()[0], c.page(0x11000).unwrap()[0]),
            (1, 2)
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(Path::new("x"), &bytes);
        }

        #[test]
        fn decode_rejects_any_single_bit_flip(seed in 0usize..10_000, bit in 0u8..8) {
            let l = Layer { seq: 1, full: false, state: state_with(vec![]), pages: vec![(0x4000, vec![5u8; 4096])], tree_pages: vec![] };
            let mut bytes = encode(&l);
            let i = seed % bytes.len();
            bytes[i] ^= 1 << bit;
            prop_assert!(decode(Path::new("x"), &bytes).is_err());
        }

        #[test]
        fn round_trip(seq in 0u64..1000, full: bool, npages in 0usize..4, fill: u8) {
            let pages = (0..npages).map(|i| ((i as u64 + 1) * 0x10000, vec![fill; 4096 * (i + 1)])).collect();
            let l = Layer { seq, full, state: state_with(vec![anon(0x10000, 0x90000, 0)]), pages, tree_pages: vec![] };
            prop_assert_eq!(decode(Path::new("x"), &encode(&l)).unwrap(), l);
        }
    }
}
