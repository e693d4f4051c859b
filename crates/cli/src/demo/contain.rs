//! Demo rung for process-local containment (issue 6): SMFS at level 4 with four contexts. One
//! client's read crashes its context, which wrote no global data: that request alone fails,
//! one context is replaced and another client works on untouched. Then a crash after a global
//! write escalates: rollback, module restart, the request retried. `kintsugi fsck` is clean.
//! Last, at protection level 1 an invalid update and a stray write into shared memory, both
//! invisible at level 4, are detected and contained (issue 5), and so is a logic fault that
//! crashes nothing but leaves a wrong link count: the commit check rejects it before
//! write-back (issue 6).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};

use super::fs::{kintsugi, mount_smfs, status, write_synced};

fn n(s: &serde_json::Value, k: &str) -> u64 {
    s[k].as_u64().unwrap_or(0)
}

/// Runs the rung (well under a second) and narrates through `say`.
pub fn run(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    say("== contain: a fault stays in the request context it happened in ==");
    let (dir, mp, m) = mount_smfs("contain", 4, &["--contexts", "4"])?;
    let s = status(&mp)?;
    say(&format!(
        "mounted SMFS at level 4 on {mp}: {} module contexts, recovery '{}'",
        s["contexts"],
        s["recovery"].as_str().unwrap_or("?")
    ));
    write_synced(&dir.join("shared"), b"everyone's data")?;
    let before = status(&mp)?;
    // Client A: a separate process (its own process group) whose read crashes its context.
    kintsugi(&["fsctl", &mp, "inject-fault", "segv", "--during", "read"])?;
    let out = Command::new("dd")
        .arg(format!("if={}", dir.join("shared").display()))
        .args(["iflag=direct", "of=/dev/null", "status=none"])
        .process_group(0)
        .stderr(Stdio::piped())
        .output()
        .context("running dd as client A")?;
    ensure!(!out.status.success(), "client A's read should have failed");
    let s = status(&mp)?;
    ensure!(
        n(&s, "contained") == 1 && n(&s, "escalations") == 0,
        "the fault was not contained: {s}"
    );
    say(&format!(
        "client A (dd): its context SIGSEGVed with the global-write flag clear → contained: A's read got \"{}\", {} context replaced, no module restart",
        String::from_utf8_lossy(&out.stderr)
            .trim()
            .rsplit(": ")
            .next()
            .unwrap_or("EIO"),
        n(&s, "restarts") - n(&before, "restarts")
    ));
    // Client B (this process) is served as if nothing happened.
    let mut got = Vec::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join("shared"))?
        .read_to_end(&mut got)?;
    ensure!(got == b"everyone's data", "client B saw damaged data");
    write_synced(&dir.join("b"), b"client B keeps working")?;
    say("client B: reads the same file and writes its own, untouched");
    // A fault after the context wrote global data cannot be contained: escalate.
    kintsugi(&["fsctl", &mp, "inject-fault", "segv", "--during", "write"])?;
    write_synced(&dir.join("c"), b"written across an escalation")?;
    let s2 = status(&mp)?;
    ensure!(n(&s2, "escalations") == 1, "no escalation: {s2}");
    say(&format!(
        "a SIGSEGV after a global write (flag set) → escalated: {} undo entries rolled back, the module restarted (idle contexts are replaced before their next request), the write retried and acknowledged",
        n(&s2, "rolled_back_entries") - n(&s, "rolled_back_entries")
    ));
    let fsck = kintsugi(&["fsck", &mp])?;
    say(&format!("kintsugi fsck: {}", fsck.trim()));
    drop(m);
    say("unmounted");
    protection_level_1(say)
}

/// Issue 5: at level 1 the protection manager catches errors level 4 lets through — an
/// invalid update of host data (rejected by the semantic checks, nothing applied) and a stray
/// write into the shared block store (unmapped outside the manager) — and each is contained.
fn protection_level_1(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    use fsapi::{Module, SiteKind};
    use std::io::Write;
    let (dir, mp, m) = mount_smfs("protect", 1, &["--contexts", "2"])?;
    say(&format!(
        "mounted SMFS at level 1 on {mp}: shared memory unmapped outside the protection manager, duplication + semantic checks"
    ));
    write_synced(&dir.join("keep"), b"acknowledged before the errors")?;
    write_synced(&dir.join("probe"), b"probe")?;
    let sites = smfs::Smfs::new().sites();
    for kind in [SiteKind::BadUpdate, SiteKind::StrayWrite] {
        let site = sites
            .iter()
            .find(|s| s.kind == kind)
            .context("smfs lacks a detection-matrix site")?;
        kintsugi(&["fsctl", &mp, "arm-site", &site.id.to_string()])?;
        let r = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join("probe"))
            .and_then(|mut f| f.write_all(b"faulty write"));
        kintsugi(&["fsctl", &mp, "arm-site", "0"])?;
        ensure!(r.is_err(), "level 1 should have caught: {}", site.what);
        let s = status(&mp)?;
        say(&format!(
            "module fault \"{}\" → detected: {} → that request got EIO, contained",
            site.what,
            s["last_error"].as_str().unwrap_or("?")
        ));
    }
    // Issue 6: a logic fault that crashes nothing and writes a well-formed but wrong update
    // (unlink forgets the link count). Level 4 would commit it and only fsck would notice;
    // the commit check sees it before write-back.
    write_synced(&dir.join("victim"), b"to be unlinked")?;
    let site = sites
        .iter()
        .find(|s| s.id == 17)
        .context("smfs lacks site 17")?;
    kintsugi(&["fsctl", &mp, "arm-site", "17"])?;
    let r = std::fs::remove_file(dir.join("victim"));
    kintsugi(&["fsctl", &mp, "arm-site", "0"])?;
    ensure!(
        r.is_err(),
        "the commit check should have caught: {}",
        site.what
    );
    ensure!(
        dir.join("victim").exists(),
        "a rejected unlink must leave nothing of itself"
    );
    let s = status(&mp)?;
    say(&format!(
        "module fault \"{}\" (no crash, a wrong update) → detected: {} → nothing applied, that request got EIO, contained",
        site.what,
        s["last_error"].as_str().unwrap_or("?")
    ));
    let keep = std::fs::read(dir.join("keep"))?;
    ensure!(
        keep == b"acknowledged before the errors",
        "acknowledged data changed"
    );
    let fsck = kintsugi(&["fsck", &mp])?;
    say(&format!(
        "acknowledged data intact; kintsugi fsck: {}",
        fsck.trim()
    ));
    drop(m);
    Ok(())
}
