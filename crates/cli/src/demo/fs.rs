//! Demo rung for the file-system host: mount SMFS at level 4, write, crash the module three
//! ways (SIGSEGV mid-write, SIGKILL while idle, a hang), and read everything back intact.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, ensure};

pub(crate) fn kintsugi(args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the kintsugi binary")?;
    let out = Command::new(exe)
        .args(args)
        .output()
        .context("running kintsugi")?;
    ensure!(
        out.status.success(),
        "kintsugi {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn status(mp: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&kintsugi(&["fsctl", mp, "status"])?)?)
}

pub(crate) struct Mounted(pub(crate) PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = kintsugi(&["umount", &self.0.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.0);
    }
}

pub(crate) fn write_synced(p: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Mounts SMFS at `level` (64 MiB) on a fresh temp directory with `extra` flags; the
/// returned guard unmounts it. Returns (directory, its path as a string, guard).
pub(crate) fn mount_smfs(
    tag: &str,
    level: u8,
    extra: &[&str],
) -> anyhow::Result<(PathBuf, String, Mounted)> {
    let dir = std::env::temp_dir().join(format!("kintsugi-demo-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mp = dir.to_string_lossy().into_owned();
    let lv = level.to_string();
    let mut args = vec!["mount", "--module", "smfs", "--level", &lv, "--size", "64M"];
    args.extend_from_slice(extra);
    args.push(&mp);
    kintsugi(&args)?;
    Ok((dir.clone(), mp, Mounted(dir)))
}

/// Runs the rung (about 1 s) and narrates through `say`.
pub fn run(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    say(
        "== fs: a file-system module crashes; the host rolls back and restarts it (recovery rung 'restart') ==",
    );
    let (dir, mp, m) = mount_smfs("fs", 4, &["--deadline-ms", "300", "--recovery", "restart"])?;
    let s = status(&mp)?;
    say(&format!(
        "mounted SMFS at level 4 on {mp}: host pid {}, module pid {}",
        s["host_pid"], s["module_pid"]
    ));
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write_synced(&dir.join("precious"), &data)?;
    say("wrote and fsynced 1 MiB to precious");
    for (fault, during, what) in [
        ("segv", Some("write"), "SIGSEGV in the middle of a write"),
        ("kill", None, "SIGKILL while idle"),
        ("hang", Some("rename"), "a hang during a rename"),
    ] {
        let before = status(&mp)?;
        let mut args = vec!["fsctl", &mp, "inject-fault", fault];
        if let Some(d) = during {
            args.extend(["--during", d]);
        }
        kintsugi(&args)?;
        if during.is_none() {
            // Let the idle module die first: the time below is then the next request's.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let t = Instant::now();
        match during {
            Some("write") => write_synced(&dir.join("next"), b"written across a module crash")?,
            Some(_) => std::fs::rename(dir.join("next"), dir.join("renamed"))?,
            None => {
                std::fs::metadata(dir.join("precious"))?;
            }
        }
        let took = t.elapsed();
        let after = status(&mp)?;
        ensure!(
            after["restarts"].as_u64() > before["restarts"].as_u64(),
            "the module was not restarted after {what}"
        );
        say(&format!(
            "{what}: module pid {} → {}, {} undo entries rolled back, request answered after {:.1} ms",
            before["module_pid"],
            after["module_pid"],
            after["rolled_back_entries"].as_u64().unwrap_or(0)
                - before["rolled_back_entries"].as_u64().unwrap_or(0),
            took.as_secs_f64() * 1e3
        ));
    }
    ensure!(
        std::fs::read(dir.join("precious"))? == data,
        "acknowledged data changed"
    );
    ensure!(
        std::fs::read(dir.join("renamed"))? == b"written across a module crash",
        "the retried write/rename is wrong"
    );
    say(
        "read back: precious is intact (1 MiB), the write and rename done across crashes are there exactly once",
    );
    drop(m);
    say("unmounted");
    Ok(())
}
