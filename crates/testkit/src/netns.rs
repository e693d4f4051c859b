//! A private two-host network for tests: two network namespaces joined by a veth pair.
//!
//! The addresses ([`NetPair::CLIENT_ADDR`], [`NetPair::SERVER_ADDR`]) exist only inside the
//! two namespaces this value created, so a test never touches the machine's real network.
//! Names carry the test process's pid and a counter, so parallel tests never collide; both
//! namespaces (and with them the veth pair) are deleted on drop, also when the test fails.
//! Needs root and `ip` (iproute2).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Two namespaces, "client" and "server", with a veth link between them.
#[derive(Debug)]
pub struct NetPair {
    pub client: String,
    pub server: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetPair {
    pub const CLIENT_ADDR: &'static str = "10.77.0.1";
    pub const SERVER_ADDR: &'static str = "10.77.0.2";

    /// Creates both namespaces, the veth pair, addresses, and brings every link (and `lo`) up.
    pub fn new() -> Result<NetPair, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("kt{}x{n}", std::process::id());
        let pair = NetPair {
            client: format!("{tag}c"),
            server: format!("{tag}s"),
        };
        // From here on, Drop deletes whatever exists of the two namespaces.
        ip(&["netns", "add", &pair.client])?;
        ip(&["netns", "add", &pair.server])?;
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        // Created inside the client namespace, so the pair never appears in ours.
        ip(&[
            "-n",
            &pair.client,
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &pair.server,
        ])?;
        for (ns, dev, addr) in [
            (&pair.client, &a, Self::CLIENT_ADDR),
            (&pair.server, &b, Self::SERVER_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// The namespace's bind-mount, for `nsenter --net=PATH`.
    pub fn path(ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(ns)
    }

    /// A command that runs `program` in namespace `ns`. Only the network namespace changes
    /// (`nsenter --net`): the mount namespace stays ours, so a FUSE mount made inside is
    /// visible to the test (`ip netns exec` would give it a private mount namespace).
    pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::path(ns).display()))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
