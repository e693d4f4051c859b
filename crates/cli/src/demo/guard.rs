//! Demo rung "restore": a counter program runs under `kintsugi guard` (trapped state-changing
//! syscalls, a checkpoint every 50 ms), is SIGKILLed, and the guard rebuilds it by syscall
//! replay from its last checkpoint; the counter carries on, and its append-only log file shows
//! every number exactly once (the file is cut back to its checkpointed size on restore).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub fn run(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("kintsugi-demo-guard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("counter.log");
    let images = dir.join("images");
    let n = 80u64;
    let opts = guard::guard::Options {
        epoch: Duration::from_millis(50),
        images: images.clone(),
        merge_every: 16,
        max_restores: 3,
        net: false,
        forward_signals: false,
    };
    let argv = vec![
        exe.to_string_lossy().into_owned(),
        "__guard-bench-child".into(),
        "counter".into(),
        n.to_string(),
        log.to_string_lossy().into_owned(),
    ];
    let g =
        guard::guard::Guard::launch(opts, argv).context("starting the counter under the guard")?;
    let pid = g.app_pid();
    say(&format!(
        "counter runs under the guard as pid {pid} (pid 1 of its own pid namespace); a checkpoint every 50 ms"
    ));
    let runner = std::thread::spawn(move || g.run());
    let t0 = Instant::now();
    while count_lines(&log) < 30 {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("the counter did not reach 30");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = count_lines(&log);
    sys::process::kill(pid, libc::SIGKILL).context("SIGKILL the counter")?;
    say(&format!(
        "SIGKILL the counter at {before}; the guard restores it from its last checkpoint by replaying its syscalls"
    ));
    let code = runner
        .join()
        .map_err(|_| anyhow::anyhow!("guard thread panicked"))??;
    let st = guard::guard::read_status(&images)?;
    let text = std::fs::read_to_string(&log)?;
    let nums: Vec<u64> = text.lines().filter_map(|l| l.parse().ok()).collect();
    let want: Vec<u64> = (0..n).collect();
    let _ = std::fs::remove_dir_all(&dir);
    if code != 0 || st.restores != 1 || nums != want {
        bail!(
            "after restore: exit {code}, {} restores, log holds {} lines (want 0..{n} once each)",
            st.restores,
            nums.len()
        );
    }
    say(&format!(
        "restored as pid {}; the counter went on to {} and exited 0; its log holds 0..{} exactly once",
        st.app_pid,
        n - 1,
        n - 1
    ));
    Ok(())
}

fn count_lines(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}
