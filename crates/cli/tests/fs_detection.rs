//! Issue 5's detection matrix (paper 001, Table 5) on real mounts, for both modules: for every
//! protection level and every error row, a fresh mount (SNFS: against a server of its own on
//! loopback), one faulty variant of the module switched on at run time (a fault site of the
//! row's kind, same binary), one request that reaches it. The test asserts the exact pattern of
//! the paper's table — detected where it says, *not* detected where it says not — and that
//! every detected error leaves the mount serving with the acknowledged data intact and the
//! store consistent. It prints the matrices.
//!
//! | error the module makes | detected at |
//! |---|---|
//! | illegal read of shared memory | L1 |
//! | illegal write of shared memory | L1, L2 |
//! | semantically invalid update of host data | L1–L3 |
//! | illegal access to host ("kernel") data | L1–L4 |
//!
//! Needs root and /dev/fuse.

mod fs_common;

use std::io::Write;

use fs_common::*;
use fsapi::{Module, SiteKind};

/// The counter in `fsctl status` that moves when the host detects the row's error.
fn counter(kind: SiteKind) -> &'static str {
    match kind {
        SiteKind::StrayRead | SiteKind::StrayWrite => "shm_violations",
        SiteKind::BadUpdate => "check_rejections",
        SiteKind::HostAccess => "host_violations",
        other => panic!("{other:?} is not a matrix row"),
    }
}

/// Table 5: the highest level that detects the row's error.
fn detected_up_to(kind: SiteKind) -> u8 {
    match kind {
        SiteKind::StrayRead => 1,
        SiteKind::StrayWrite => 2,
        SiteKind::BadUpdate => 3,
        SiteKind::HostAccess => 4,
        other => panic!("{other:?} is not a matrix row"),
    }
}

fn n(s: &serde_json::Value, k: &str) -> u64 {
    s[k].as_u64()
        .unwrap_or_else(|| panic!("status has no {k}: {s}"))
}

/// Opens `p` for direct I/O: each write is one FUSE request, answered before `write` returns,
/// so its result is the result of the request that reaches the armed site (nothing cached,
/// nothing merged, no later request mixed in).
fn open_direct(p: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// The request that reaches a site, and where the module under test keeps its sites.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// An `O_DIRECT` write to `probe` (SMFS: every row's site is on the write path; SNFS: the
    /// stray write).
    Write,
    /// `statx(probe, AT_STATX_FORCE_SYNC)`: FUSE sends GETATTR whatever the kernel cached; SNFS
    /// reads its attribute cache there (the stray read).
    Getattr,
    /// The same after SNFS's attribute cache (1 s) expired: the GETATTR goes to the server and
    /// stores what it gets (the invalid update).
    GetattrUncached,
    /// `stat` of a file the server's export gained behind the client's back: the kernel has no
    /// dentry for it, so FUSE sends LOOKUP (SNFS's host-data access).
    Lookup,
}

impl Probe {
    /// Readies the probe: opens `probe` (GETATTR by descriptor needs no LOOKUP, which would
    /// refill SNFS's attribute cache first), lets SNFS's cache expire, or makes a file on the
    /// server. The file stays open until the cell has read the status: where the error went
    /// undetected, the module's later RELEASE may trip over what it left behind — that is not
    /// the level's detection, and not what Table 5 is about.
    fn prepare(self, m: &Mount, export: &std::path::Path) -> Option<std::fs::File> {
        match self {
            Probe::Write => Some(open_direct(&m.path("probe"))),
            Probe::Getattr => Some(std::fs::File::open(m.path("probe")).unwrap()),
            Probe::GetattrUncached => {
                let f = std::fs::File::open(m.path("probe")).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1100));
                Some(f)
            }
            Probe::Lookup => {
                std::fs::write(export.join("fresh"), b"made on the server").unwrap();
                None
            }
        }
    }

    fn run(self, m: &Mount, f: Option<&std::fs::File>) -> std::io::Result<()> {
        match (self, f) {
            (Probe::Write, Some(mut f)) => f.write_all(b"rewritten by the probe"),
            (Probe::Getattr | Probe::GetattrUncached, Some(f)) => rustix::fs::statx(
                f,
                "",
                rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::STATX_FORCE_SYNC,
                rustix::fs::StatxFlags::BASIC_STATS,
            )
            .map(drop)
            .map_err(std::io::Error::from),
            (Probe::Lookup, _) => std::fs::metadata(m.path("fresh")).map(drop),
            (p, None) => panic!("{p:?} was not prepared"),
        }
    }
}

/// One module's side of the matrix.
struct Subject {
    name: &'static str,
    sites: &'static [fsapi::Site],
    probe: fn(SiteKind) -> Probe,
}

struct Cell {
    detected: bool,
    what: String,
}

fn one_cell(sub: &Subject, level: u8, kind: SiteKind, site: u32) -> Cell {
    let base = fresh_dir(&format!("detect-{}", sub.name));
    let export = base.join("export");
    let server = (sub.name == "snfs").then(|| {
        std::fs::create_dir(&export).unwrap();
        SnfsServer::start(&export, &base.join("server.log"))
    });
    let opt = server.as_ref().map(|s| format!("server={}", s.addr));
    let mut extra = vec!["--contexts", "2"];
    if let Some(o) = &opt {
        extra.extend(["-o", o.as_str()]);
    }
    let m = Mount::of_module(sub.name, level, &extra);
    let keep = pattern(u32::from(level) * 100 + site, 20_000);
    write_acked(&m.path("keep"), &keep);
    write_acked(&m.path("probe"), &pattern(7, 5000));
    let probe = (sub.probe)(kind);
    let file = probe.prepare(&m, &export);
    let before = m.status();
    let d = m.dir.to_str().unwrap();
    let out = run(&["fsctl", d, "arm-site", &site.to_string()]);
    assert!(
        out.status.success(),
        "arm-site: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res = probe.run(&m, file.as_ref());
    let out = run(&["fsctl", d, "arm-site", "0"]);
    assert!(out.status.success(), "disarm");
    let s = m.status();
    drop(file);
    let cell = format!("{} L{level} {kind:?}", sub.name);
    let hits = n(&s, "site_hits");
    assert!(hits >= 1, "{cell}: the site never fired: {s}");
    let detected = n(&s, counter(kind)) > n(&before, counter(kind));
    let failures = n(&s, "module_failures") - n(&before, "module_failures");
    if detected {
        // Detected: the request failed, nothing else did; the mount serves on with every
        // acknowledged byte, and the store is consistent (nothing of the error got in).
        assert!(res.is_err(), "{cell}: detected, yet the request succeeded");
        m.assert_alive();
        assert!(
            std::fs::read(m.path("keep")).unwrap() == keep,
            "{cell}: acknowledged data changed"
        );
        write_acked(&m.path("after"), b"still serving");
        assert_eq!(std::fs::read(m.path("after")).unwrap(), b"still serving");
        let f = run(&["fsck", d]);
        assert!(
            f.status.success(),
            "{cell}: fsck after a detected error: {}",
            String::from_utf8_lossy(&f.stdout)
        );
    } else {
        // Not detected: the module went on as if nothing happened.
        assert!(
            res.is_ok(),
            "{cell}: not detected, yet the request failed: {res:?} {s}"
        );
        assert_eq!(failures, 0, "{cell}: {s}");
    }
    drop(m);
    drop(server);
    let _ = std::fs::remove_dir_all(&base);
    Cell {
        detected,
        what: s["last_error"].as_str().unwrap_or_default().to_string(),
    }
}

/// Runs every row at every level; prints the matrix; fails on any cell that differs from
/// Table 5.
fn matrix(sub: &Subject) {
    let mut table = format!(
        "\nerror the module makes ({})          L1   L2   L3   L4   L5\n",
        sub.name
    );
    let mut wrong = Vec::new();
    for kind in SiteKind::MATRIX {
        let site = sub
            .sites
            .iter()
            .find(|s| s.kind == kind)
            .unwrap_or_else(|| panic!("{} has no {kind:?} site", sub.name))
            .id;
        table.push_str(&format!("{:<38}", kind.name()));
        for level in 1..=5u8 {
            let c = one_cell(sub, level, kind, site);
            let want = level <= detected_up_to(kind);
            table.push_str(if c.detected { " yes " } else { "  -  " });
            if c.detected != want {
                wrong.push(format!(
                    "L{level} {}: detected {} (Table 5 says {want}); last error: {}",
                    kind.name(),
                    c.detected,
                    c.what
                ));
            }
        }
        table.push('\n');
    }
    println!("{table}");
    assert!(wrong.is_empty(), "{table}\n{}", wrong.join("\n"));
}

#[test]
fn smfs_detection_matrix_matches_table_5() {
    matrix(&Subject {
        name: "smfs",
        sites: smfs::Smfs::new().sites(),
        probe: |_| Probe::Write,
    });
}

#[test]
fn snfs_detection_matrix_matches_table_5() {
    matrix(&Subject {
        name: "snfs",
        sites: snfs::SITES,
        probe: |kind| match kind {
            SiteKind::StrayRead => Probe::Getattr,
            SiteKind::StrayWrite => Probe::Write,
            SiteKind::BadUpdate => Probe::GetattrUncached,
            SiteKind::HostAccess => Probe::Lookup,
            other => panic!("{other:?} is not a matrix row"),
        },
    });
}
