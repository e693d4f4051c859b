//! One client connection to an SNFS server: context-local state, never host data.
//!
//! A connection belongs to the process that opened it. Module contexts are forked from one
//! image, so a connection found in memory may have been opened by an ancestor (or a previous
//! generation): [`Client::call`] checks the owner pid and reconnects rather than share a
//! socket with another process.

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use fsapi::{Ctx, Errno, FsResult};

use crate::proto::{self, Call, Op, Reply};

/// How long a call keeps trying to reach the server before answering `EIO`.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(2);
/// A server that does not answer a call within this is treated as gone.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug)]
struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    pid: u32,
    next_id: u64,
}

/// A lazily opened, self-healing connection to one server.
#[derive(Debug)]
pub struct Client {
    server: String,
    session: u64,
    conn: Option<Conn>,
}

impl Client {
    pub fn new(server: &str, session: u64) -> Client {
        Client {
            server: server.to_string(),
            session,
            conn: None,
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Forgets the connection (a new module generation must not trust it).
    pub fn reset(&mut self, session: u64) {
        self.session = session;
        self.conn = None;
    }

    fn connect(&self) -> std::io::Result<Conn> {
        let mut last = None;
        for a in self.server.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
                    let w = s.try_clone()?;
                    let mut c = Conn {
                        r: BufReader::with_capacity(256 << 10, s),
                        w: BufWriter::with_capacity(256 << 10, w),
                        pid: std::process::id(),
                        next_id: 1,
                    };
                    let hello = Call {
                        xid: None,
                        ctx: Ctx::default(),
                        op: Op::Hello {
                            session: self.session,
                        },
                    };
                    match roundtrip(&mut c, &hello) {
                        Ok(Reply::Ok) => return Ok(c),
                        Ok(r) => {
                            last = Some(std::io::Error::other(format!(
                                "server answered hello with {r:?}"
                            )))
                        }
                        Err(e) => last = Some(std::io::Error::other(e.to_string())),
                    }
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::other(format!("{}: no address to connect to", self.server))
        }))
    }

    /// Sends one call and returns the server's reply (an errno reply becomes `Err`). A broken
    /// connection is replaced and the call sent again, for up to 2 s; then
    /// `EIO`. Resending is safe: idempotent calls may run twice, the others carry an xid.
    pub fn call(&mut self, call: &Call) -> FsResult<Reply> {
        let start = Instant::now();
        let mut tries = 0u32;
        loop {
            if self
                .conn
                .as_ref()
                .is_some_and(|c| c.pid != std::process::id())
            {
                // Opened by another process (we were forked): not ours to use or to close
                // cleanly; dropping our copy of the fd leaves the owner's intact.
                self.conn = None;
            }
            if self.conn.is_none() {
                match self.connect() {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => {
                        if start.elapsed() > CONNECT_PATIENCE {
                            tracing::warn!(server = %self.server, "SNFS server unreachable: {e}");
                            return Err(Errno::EIO);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
            }
            let c = self.conn.as_mut().expect("connected above");
            match roundtrip(c, call) {
                Ok(Reply::Err(e)) => return Err(Errno(e)),
                Ok(r) => return Ok(r),
                Err(e) => {
                    tries += 1;
                    self.conn = None;
                    tracing::debug!(server = %self.server, "SNFS connection lost ({e}); reconnecting");
                    if tries > 1 && start.elapsed() > CONNECT_PATIENCE {
                        tracing::warn!(server = %self.server, "SNFS call failed: {e}");
                        return Err(Errno::EIO);
                    }
                }
            }
        }
    }
}

fn roundtrip(c: &mut Conn, call: &Call) -> Result<Reply, proto::ProtoError> {
    let id = c.next_id;
    c.next_id += 1;
    proto::write_request(&mut c.w, id, call)?;
    c.w.flush()?;
    let (got, r) = proto::read_reply(&mut c.r)?;
    if got != id {
        return Err(proto::ProtoError::WrongId { got, want: id });
    }
    Ok(r)
}
