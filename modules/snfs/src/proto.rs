//! The SNFS wire protocol: framed, checksummed bincode messages over one TCP connection.
//!
//! A frame is a 24-byte header followed by a bincode payload:
//!
//! | off | width | field |
//! |---|---|---|
//! | 0 | 4 | magic `SNFS` |
//! | 4 | 2 | version ([`VERSION`]) |
//! | 6 | 2 | kind: 1 request, 2 reply |
//! | 8 | 4 | payload length (at most [`MAX_PAYLOAD`]) |
//! | 12 | 4 | crc32c of bytes 0..12, 16..24 and the payload |
//! | 16 | 8 | request id (a reply carries its request's) |
//!
//! Integers are little-endian. A frame that fails any check is a [`ProtoError`]: the reader
//! drops that connection only (after a bad length it cannot find the next frame anyway).

use std::io::{Read, Write};

use fsapi::{Attr, Ctx, DirEntry, SetAttr, StatFs};
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"SNFS";
pub const VERSION: u16 = 1;
pub const HEADER: usize = 24;
/// Large enough for a FUSE write (128 KiB) or a readdir batch with long names, small enough
/// that a corrupt length cannot make a peer allocate much.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// The most a single read may ask for.
pub const MAX_READ: u32 = 1 << 20;

const KIND_REQUEST: u16 = 1;
const KIND_REPLY: u16 = 2;

/// What is wrong with a frame or the connection carrying it.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame magic {0:02x?}: the peer does not speak SNFS (wrong port?)")]
    Magic([u8; 4]),
    #[error(
        "frame version {0}, this side speaks {VERSION}: run the same kintsugi on client and server"
    )]
    Version(u16),
    #[error("frame of kind {0}, expected {1}: the peer is confused")]
    Kind(u16, u16),
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}: corrupt length")]
    TooLong(usize),
    #[error(
        "frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupted in transit"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("frame payload does not decode: {0}")]
    Decode(String),
    #[error("reply id {got} does not answer request {want}")]
    WrongId { got: u64, want: u64 },
}

/// A server-side node handle: the node's FUSE inode number (see the server's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Handle(pub u64);

/// One call. `xid` is set for non-idempotent operations: the server's duplicate-request cache
/// answers a repeated `(session, xid)` with the first reply instead of redoing the work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    pub xid: Option<u64>,
    pub ctx: Ctx,
    pub op: Op,
}

/// The operations, one per `fsapi::Module` upcall that needs the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// First message on a connection: names the client's session (a mount's cache store).
    Hello {
        session: u64,
    },
    Lookup {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Getattr {
        h: Handle,
    },
    Setattr {
        h: Handle,
        set: SetAttr,
    },
    Read {
        h: Handle,
        off: u64,
        len: u32,
    },
    Write {
        h: Handle,
        off: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Create {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    },
    Mknod {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    Mkdir {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    },
    /// `keep`: the client still has the file open; the server keeps the inode alive under
    /// the orphan directory until [`Op::DropOrphan`] (NFS's "silly rename", done server-side).
    Unlink {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        keep: bool,
    },
    Rmdir {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Rename {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        newdir: Handle,
        #[serde(with = "serde_bytes")]
        newname: Vec<u8>,
        flags: u32,
        /// The replaced target is open at the client: keep its inode alive (see `Unlink`).
        keep_target: bool,
    },
    Link {
        h: Handle,
        newdir: Handle,
        #[serde(with = "serde_bytes")]
        newname: Vec<u8>,
    },
    Symlink {
        dir: Handle,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    Readlink {
        h: Handle,
    },
    /// Entries after `cookie` (0: from the start, `.` and `..` included).
    Readdir {
        h: Handle,
        cookie: u64,
        max: u32,
    },
    Statfs,
    /// The last open of an unlinked file was closed: its inode may go. Idempotent.
    DropOrphan {
        h: Handle,
    },
    Fsync {
        h: Handle,
        datasync: bool,
    },
}

impl Op {
    /// Whether the server's files change when this runs (the request's effect is then global:
    /// see `fsapi::Pm::mark_global`).
    pub fn changes_state(&self) -> bool {
        !matches!(
            self,
            Op::Hello { .. }
                | Op::Lookup { .. }
                | Op::Getattr { .. }
                | Op::Read { .. }
                | Op::Readlink { .. }
                | Op::Readdir { .. }
                | Op::Statfs
        )
    }
}

impl Op {
    /// Whether repeating the operation could give a different answer (EEXIST, ENOENT) or a
    /// different result: those carry an xid for the duplicate-request cache.
    pub fn idempotent(&self) -> bool {
        !matches!(
            self,
            Op::Create { .. }
                | Op::Mknod { .. }
                | Op::Mkdir { .. }
                | Op::Unlink { .. }
                | Op::Rmdir { .. }
                | Op::Rename { .. }
                | Op::Link { .. }
                | Op::Symlink { .. }
        )
    }
}

/// A reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Attr(Attr),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Written {
        n: u32,
        attr: Attr,
    },
    /// Unlink/rmdir/rename: the new attributes of the parent directories, and the nodes whose
    /// cached attributes are now wrong (moved, unlinked or replaced).
    Changed(Vec<Attr>, Vec<u64>),
    Entries(Vec<DirEntry>),
    StatFs(StatFs),
    /// An errno (positive).
    Err(i32),
}

fn checksum(hdr: &[u8; HEADER], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&hdr[..12]);
    let c = crc32c::crc32c_append(c, &hdr[16..]);
    crc32c::crc32c_append(c, payload)
}

fn write_frame(w: &mut impl Write, kind: u16, id: u64, payload: &[u8]) -> Result<(), ProtoError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::TooLong(payload.len()));
    }
    let mut hdr = [0u8; HEADER];
    hdr[0..4].copy_from_slice(&MAGIC);
    hdr[4..6].copy_from_slice(&VERSION.to_le_bytes());
    hdr[6..8].copy_from_slice(&kind.to_le_bytes());
    hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    hdr[16..24].copy_from_slice(&id.to_le_bytes());
    let c = checksum(&hdr, payload);
    hdr[12..16].copy_from_slice(&c.to_le_bytes());
    // One buffer, one write: a frame never goes out in pieces Nagle could delay.
    let mut buf = Vec::with_capacity(HEADER + payload.len());
    buf.extend_from_slice(&hdr);
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    Ok(())
}

fn read_frame(r: &mut impl Read, kind: u16) -> Result<(u64, Vec<u8>), ProtoError> {
    let mut hdr = [0u8; HEADER];
    r.read_exact(&mut hdr)?;
    let magic: [u8; 4] = hdr[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(ProtoError::Magic(magic));
    }
    let u16_at = |o: usize| u16::from_le_bytes([hdr[o], hdr[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(hdr[o..o + 4].try_into().expect("4 bytes"));
    if u16_at(4) != VERSION {
        return Err(ProtoError::Version(u16_at(4)));
    }
    if u16_at(6) != kind {
        return Err(ProtoError::Kind(u16_at(6), kind));
    }
    let len = u32_at(8) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLong(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let stored = u32_at(12);
    let computed = checksum(&hdr, &payload);
    if stored != computed {
        return Err(ProtoError::Checksum { stored, computed });
    }
    let id = u64::from_le_bytes(hdr[16..24].try_into().expect("8 bytes"));
    Ok((id, payload))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ProtoError> {
    bincode::serialize(v).map_err(|e| ProtoError::Decode(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, ProtoError> {
    use bincode::Options;
    // Limits allocation by the frame size: a corrupt length prefix inside the payload cannot
    // ask for more than the payload holds.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(MAX_PAYLOAD as u64)
        .deserialize(b)
        .map_err(|e| ProtoError::Decode(e.to_string()))
}

pub fn write_request(w: &mut impl Write, id: u64, call: &Call) -> Result<(), ProtoError> {
    write_frame(w, KIND_REQUEST, id, &encode(call)?)
}

pub fn read_request(r: &mut impl Read) -> Result<(u64, Call), ProtoError> {
    let (id, p) = read_frame(r, KIND_REQUEST)?;
    Ok((id, decode(&p)?))
}

pub fn write_reply(w: &mut impl Write, id: u64, reply: &Reply) -> Result<(), ProtoError> {
    write_frame(w, KIND_REPLY, id, &encode(reply)?)
}

pub fn read_reply(r: &mut impl Read) -> Result<(u64, Reply), ProtoError> {
    let (id, p) = read_frame(r, KIND_REPLY)?;
    Ok((id, decode(&p)?))
}

/// A raw request frame with a wrong checksum, for tests of the server's error path.
pub fn corrupt_request_frame() -> Vec<u8> {
    let mut v = Vec::new();
    let call = Call {
        xid: None,
        ctx: Ctx::default(),
        op: Op::Statfs,
    };
    write_request(&mut v, 1, &call).expect("encode to a Vec");
    let last = v.len() - 1;
    v[last] ^= 0xff;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_an_error() {
        let call = Call {
            xid: Some(7),
            ctx: Ctx {
                uid: 1,
                gid: 2,
                pid: 3,
            },
            op: Op::Write {
                h: Handle(9),
                off: 4096,
                data: vec![1, 2, 3],
            },
        };
        let mut v = Vec::new();
        write_request(&mut v, 42, &call).unwrap();
        let (id, back) = read_request(&mut v.as_slice()).unwrap();
        assert_eq!(id, 42);
        assert!(matches!(back.op, Op::Write { off: 4096, ref data, .. } if data == &[1, 2, 3]));
        // Every single-byte corruption is caught (by a field check or the checksum).
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x40;
            assert!(read_request(&mut bad.as_slice()).is_err(), "byte {i}");
        }
        // A reply is not a request.
        let mut r = Vec::new();
        write_reply(&mut r, 1, &Reply::Ok).unwrap();
        assert!(matches!(
            read_request(&mut r.as_slice()),
            Err(ProtoError::Kind(2, 1))
        ));
        // An oversized length is refused before any allocation.
        let mut big = v.clone();
        big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_request(&mut big.as_slice()),
            Err(ProtoError::TooLong(_))
        ));
        assert!(matches!(
            read_request(&mut corrupt_request_frame().as_slice()),
            Err(ProtoError::Checksum { .. })
        ));
    }
}
