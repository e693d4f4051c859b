//! `kintsugi bench inject`: the fault-injection campaign of issue 6.
//!
//! Each run mounts a fresh SMFS at `--level` (default 3: see `Args::level`), starts several
//! client processes (each in its own
//! process group, each working in its own directory: whole-file writes, appends, overwrites,
//! truncates, renames, unlinks, subdirectories, read-backs, every write acknowledged by a
//! successful `fsync`), arms **one** compiled-in fault site for the first client only, lets the
//! workload run, then checks: did the site fire (activated), does the file system still serve
//! (a probe client), is every acknowledged byte of every client intact, does `fsck` find the
//! structure clean, and did the host contain the fault or restart the module. The same fault
//! list runs under each recovery rung: `contain`, `restart` (the previous rung: every fault
//! restarts the module) and `none` (the stock baseline: no recovery at all).
//!
//! Classification of a run (in this order):
//! - `hang`: the workload did not finish within the time limit;
//! - `not activated`: the site never fired;
//! - `not recovered`: the file system stopped serving (the probe failed);
//! - `silent corruption`: acknowledged data damaged or missing, or fsck found problems;
//! - `contained`: recovered with no module restart (the fault was contained in its context,
//!   or had no visible effect: the table counts those separately as "masked");
//! - `recovered`: recovered by escalating to a module restart.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fsapi::Module;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs per recovery mode (each run: one fault site, round-robin over the module's sites).
    #[arg(long, default_value_t = 2000)]
    pub runs: usize,
    /// Recovery modes to run, comma-separated: contain, restart, none.
    #[arg(long, default_value = "contain,restart,none")]
    pub modes: String,
    /// Client processes per run (the first one is the faulty client).
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// File operations per client.
    #[arg(long, default_value_t = 24)]
    pub ops: usize,
    /// Level-4 per-request deadline (ms): a context that takes longer is killed (a hang).
    #[arg(long, default_value_t = 300)]
    pub deadline_ms: u64,
    /// Module contexts (concurrent requests).
    #[arg(long, default_value_t = 4)]
    pub contexts: u8,
    /// Protection level the module runs at (1–4: contexts are separate processes). At 1–3 the
    /// module works on checked copies until write-back, so a fault before write-back has
    /// written no global data, and the module's commit check sees a wrong update before it is
    /// applied: the default, 3, is the cheapest level with both. Level 4 is the paper's setup
    /// (the global-write flag from a write trap, no checks).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub level: u8,
    /// Campaign seed (workloads and memory-fault targets derive from it).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the JSON object only.
    #[arg(long)]
    pub json: bool,
}

/// One client process of the workload.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub seed: u64,
    #[arg(long)]
    pub ops: usize,
}

/// What a run came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    NotActivated,
    Contained,
    Recovered,
    NotRecovered,
    SilentCorruption,
    Hang,
}

/// Per-mode totals.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Totals {
    pub mode: &'static str,
    pub activated: u64,
    pub contained: u64,
    pub recovered: u64,
    pub not_recovered: u64,
    pub silent_corruption: u64,
    pub hang: u64,
    #[serde(skip)]
    pub not_activated: u64,
    /// Activated runs where no module failure was ever detected (the fault had no visible
    /// effect on the host); part of `contained`.
    #[serde(skip)]
    pub masked: u64,
    /// Runs where a client other than the faulty one had acknowledged data damaged.
    #[serde(skip)]
    pub other_client_damage: u64,
    /// Hangs after the host had contained a fault (the paper's deadlock case).
    #[serde(skip)]
    pub hang_after_contained: u64,
    #[serde(skip)]
    pub per_kind: BTreeMap<&'static str, [u64; 6]>,
}

impl Totals {
    fn add(&mut self, o: Outcome, r: &RunReport, kind: &'static str) {
        let slot = match o {
            Outcome::NotActivated => {
                self.not_activated += 1;
                return;
            }
            Outcome::Contained => {
                self.contained += 1;
                if r.module_failures == 0 {
                    self.masked += 1;
                }
                0
            }
            Outcome::Recovered => {
                self.recovered += 1;
                1
            }
            Outcome::NotRecovered => {
                self.not_recovered += 1;
                2
            }
            Outcome::SilentCorruption => {
                self.silent_corruption += 1;
                3
            }
            Outcome::Hang => {
                self.hang += 1;
                if r.contained > 0 {
                    self.hang_after_contained += 1;
                }
                4
            }
        };
        self.activated += 1;
        if r.other_damage {
            self.other_client_damage += 1;
        }
        let e = self.per_kind.entry(kind).or_default();
        e[slot] += 1;
        e[5] += 1;
    }
}

/// What one run observed.
#[derive(Debug, Default)]
pub struct RunReport {
    pub hits: u64,
    pub module_failures: u64,
    pub contained: u64,
    pub escalations: u64,
    pub restarts: u64,
    pub serving: bool,
    pub hang: bool,
    pub damaged: usize,
    pub other_damage: bool,
    pub fsck_problems: Vec<String>,
}

pub fn classify(r: &RunReport) -> Outcome {
    if r.hang {
        Outcome::Hang
    } else if r.hits == 0 {
        Outcome::NotActivated
    } else if !r.serving {
        Outcome::NotRecovered
    } else if r.damaged > 0 || !r.fsck_problems.is_empty() {
        Outcome::SilentCorruption
    } else if r.escalations == 0 && r.restarts == r.contained {
        // Each contained fault replaces one context (its own); anything more is a restart.
        Outcome::Contained
    } else {
        Outcome::Recovered
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let modes: Vec<fshost::Recovery> = a
        .modes
        .split(',')
        .map(|m| {
            fshost::Recovery::parse(m.trim())
                .with_context(|| format!("unknown mode {m:?}: use contain, restart, none"))
        })
        .collect::<anyhow::Result<_>>()?;
    if a.clients < 2 {
        bail!("--clients must be at least 2: one faulty client and others whose data is checked");
    }
    if !rustix::process::geteuid().is_root() && !Path::new("/dev/fuse").exists() {
        bail!("bench inject mounts FUSE file systems: run as root with /dev/fuse present");
    }
    // Issue 5's detection-matrix probes are not software faults of the campaign's kinds.
    let sites: Vec<fsapi::Site> = smfs::Smfs::new()
        .sites()
        .iter()
        .filter(|s| !s.kind.is_matrix_row())
        .copied()
        .collect();
    if sites.is_empty() {
        bail!("the smfs module has no fault sites compiled in");
    }
    let exe = std::env::current_exe().context("cannot find the kintsugi binary")?;
    let base = std::env::temp_dir().join(format!("kintsugi-inject-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let mut all = Vec::new();
    let started = Instant::now();
    for mode in &modes {
        let mut t = Totals {
            mode: match mode {
                fshost::Recovery::Contain => "containment",
                fshost::Recovery::Restart => "restart_only",
                fshost::Recovery::None => "none",
            },
            ..Totals::default()
        };
        for r in 0..a.runs {
            let site = sites[r % sites.len()];
            let seed = a.seed.wrapping_mul(1_000_003).wrapping_add(r as u64);
            let report = one_run(&exe, &base, *mode, site.id, seed, &a)
                .with_context(|| format!("run {r} (site {} {})", site.id, site.kind.name()))?;
            let o = classify(&report);
            if o == Outcome::SilentCorruption || (o == Outcome::Hang && report.contained > 0) {
                tracing::warn!(run = r, site = site.id, kind = site.kind.name(), what = site.what, ?o, damaged = report.damaged, fsck = ?report.fsck_problems, "campaign run");
            }
            t.add(o, &report, site.kind.name());
            if !a.json && (r + 1) % 50 == 0 {
                eprintln!(
                    "bench inject: {} {}/{} runs ({:.0} s)",
                    t.mode,
                    r + 1,
                    a.runs,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        all.push(t);
    }
    let _ = std::fs::remove_dir_all(&base);
    let json = serde_json::json!({ "bench": "inject", "runs": a.runs, "modes": all });
    if a.json {
        println!("{json}");
        return Ok(ExitCode::SUCCESS);
    }
    print_table(&all, a.runs);
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}

fn pct(n: u64, d: u64) -> String {
    if d == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / d as f64)
    }
}

fn print_table(all: &[Totals], runs: usize) {
    println!(
        "{runs} runs per mode; percentages of activated faults\n{:<13} {:>9} {:>15} {:>15} {:>13} {:>13} {:>9} {:>13} {:>8}",
        "mode",
        "activated",
        "contained",
        "recovered",
        "not_recov",
        "silent_corr",
        "hang",
        "recov_total",
        "masked"
    );
    for t in all {
        let d = t.activated;
        println!(
            "{:<13} {:>9} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>4} {:>4} {:>13} {:>8}",
            t.mode,
            d,
            t.contained,
            pct(t.contained, d),
            t.recovered,
            pct(t.recovered, d),
            t.not_recovered,
            pct(t.not_recovered, d),
            t.silent_corruption,
            pct(t.silent_corruption, d),
            t.hang,
            pct(t.hang, d),
            pct(t.contained + t.recovered, d),
            t.masked
        );
    }
    for t in all {
        println!(
            "{}: not activated {}, other clients' data damaged in {} runs, hangs after a contained fault {}",
            t.mode, t.not_activated, t.other_client_damage, t.hang_after_contained
        );
    }
    println!("\nper fault kind (contained/recovered/not_recovered/silent/hang of activated):");
    for t in all {
        for (k, v) in &t.per_kind {
            println!(
                "  {:<13} {:<20} {:>4}/{:>4}/{:>4}/{:>4}/{:>4} of {:>4}",
                t.mode, k, v[0], v[1], v[2], v[3], v[4], v[5]
            );
        }
    }
}

/// Kills the clients and unmounts, whatever happened.
struct RunGuard {
    mp: PathBuf,
    clients: Vec<Child>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        for c in &mut self.clients {
            let _ = c.kill();
            let _ = c.wait();
        }
        if fshost::mount::umount(&self.mp).is_err() && fshost::mount::is_mounted(&self.mp) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mp)
                .status();
        }
    }
}

fn one_run(
    exe: &Path,
    base: &Path,
    mode: fshost::Recovery,
    site: u32,
    seed: u64,
    a: &Args,
) -> anyhow::Result<RunReport> {
    let mp = base.join("mnt");
    std::fs::create_dir_all(&mp)?;
    let opts = fshost::MountOpts {
        module: "smfs".into(),
        module_opts: String::new(),
        level: fshost::Level::from_number(a.level).map_err(anyhow::Error::msg)?,
        size: 64 << 20,
        mountpoint: mp.clone(),
        foreground: false,
        deadline: Duration::from_millis(a.deadline_ms.max(10)),
        on_crash: fshost::OnCrash::Retry,
        contexts: fshost::ContextOpts {
            contexts: usize::from(a.contexts),
            recovery: mode,
            ..fshost::ContextOpts::default()
        },
        log: None,
    };
    fshost::mount::mount(&opts, crate::cmd::mount::modules).context("mounting smfs")?;
    let mut g = RunGuard {
        mp: mp.clone(),
        clients: Vec::new(),
    };
    for c in 0..a.clients {
        let dir = mp.join(format!("c{c}"));
        let child = Command::new(exe)
            .arg("__inject-client")
            .arg("--dir")
            .arg(&dir)
            .arg("--seed")
            .arg(seed.wrapping_mul(31).wrapping_add(c as u64).to_string())
            .arg("--ops")
            .arg(a.ops.to_string())
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a workload client")?;
        g.clients.push(child);
    }
    let faulty = g.clients[0].id();
    fshost::mount::arm_site(&mp, site, faulty, seed).context("arming the fault site")?;
    for c in &mut g.clients {
        if let Some(mut i) = c.stdin.take() {
            let _ = i.write_all(b"go\n");
        }
    }
    let limit = Instant::now() + Duration::from_secs(30);
    let mut report = RunReport::default();
    let mut states: Vec<Option<ClientState>> = Vec::new();
    for c in &mut g.clients {
        loop {
            match c.try_wait()? {
                Some(_) => break,
                None if Instant::now() > limit => {
                    report.hang = true;
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        let mut out = String::new();
        if let Some(mut o) = c.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        states.push(serde_json::from_str(&out).ok());
    }
    let _ = fshost::mount::arm_site(&mp, 0, 0, 0);
    let Ok(st) = fshost::mount::status(&mp) else {
        // The control channel itself is gone: the file system broke in a run whose only
        // change was the armed site, so the fault was activated and nothing recovered it.
        report.hits = 1;
        report.serving = false;
        drop(g);
        return Ok(report);
    };
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    report.hits = n("site_hits");
    tracing::debug!(site, faulty, status = %st, "run status");
    report.module_failures = n("module_failures");
    report.contained = n("contained");
    report.escalations = n("escalations");
    report.restarts = n("restarts");
    report.serving = probe(&mp);
    if report.serving {
        for (c, s) in states.iter().enumerate() {
            let bad = match s {
                Some(s) => s.damaged(),
                // A client that printed nothing was killed or crashed: its data is unknown.
                None => 0,
            };
            report.damaged += bad;
            if c > 0 && bad > 0 {
                report.other_damage = true;
            }
        }
        report.fsck_problems = match fshost::mount::fsck(&mp) {
            Ok(p) => p,
            Err(e) => {
                report.serving = false;
                vec![format!("fsck could not run: {e}")]
            }
        };
    }
    drop(g);
    Ok(report)
}

/// A fresh client's create/write/fsync/read/unlink on the mount.
fn probe(mp: &Path) -> bool {
    let p = mp.join("probe");
    let data = b"kintsugi probe";
    let r = (|| -> std::io::Result<bool> {
        let mut f = std::fs::File::create(&p)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        let back = std::fs::read(&p)?;
        std::fs::remove_file(&p)?;
        Ok(back == data)
    })();
    matches!(r, Ok(true))
}

/// What a client believes each of its paths holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Expect {
    /// Acknowledged content: length and crc32c.
    Content {
        len: u64,
        crc: u32,
    },
    Gone,
    /// An operation on it failed: no claim.
    Unknown,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ClientState {
    files: BTreeMap<String, Expect>,
    errors: u32,
}

impl ClientState {
    /// Acknowledged paths whose content is not what was acknowledged.
    fn damaged(&self) -> usize {
        self.files
            .iter()
            .filter(|(p, e)| match e {
                Expect::Content { len, crc } => match std::fs::read(p) {
                    Ok(d) => d.len() as u64 != *len || crc32c::crc32c(&d) != *crc,
                    Err(_) => true,
                },
                Expect::Gone => Path::new(p).exists(),
                Expect::Unknown => false,
            })
            .count()
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, good enough to pick operations.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// The workload of one client: waits for "go" on stdin, works in `dir`, prints its
/// [`ClientState`] as JSON. Errors are part of the experiment, never a reason to stop early
/// (except after many: a client that keeps failing gives up, as an application would).
pub fn client(a: ClientArgs) -> anyhow::Result<ExitCode> {
    let mut go = String::new();
    let _ = std::io::stdin().read_line(&mut go);
    let mut rng = Rng(a.seed | 1);
    let mut content: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut st = ClientState::default();
    let dir = a.dir.to_string_lossy().to_string();
    let sub = format!("{dir}/sub");
    let fail = |st: &mut ClientState, paths: &[&str], e: &std::io::Error| {
        for p in paths {
            st.files.insert((*p).to_string(), Expect::Unknown);
        }
        if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EEXIST)) {
            st.errors += 1;
        }
    };
    if let Err(e) = std::fs::create_dir(&dir) {
        fail(&mut st, &[], &e);
    }
    let name = |rng: &mut Rng, d: &str| format!("{d}/f{}", rng.below(6));
    for _ in 0..a.ops {
        if st.errors >= 8 {
            break;
        }
        let op = rng.below(10);
        match op {
            0..=2 | 7 => {
                let d = if op == 7 {
                    if !Path::new(&sub).exists()
                        && let Err(e) = std::fs::create_dir(&sub)
                    {
                        fail(&mut st, &[], &e);
                        continue;
                    }
                    sub.clone()
                } else {
                    dir.clone()
                };
                let p = name(&mut rng, &d);
                let len = 1 + rng.below(70_000) as usize;
                let data = rng.bytes(len);
                match write_whole(&p, &data) {
                    Ok(()) => {
                        st.files.insert(p.clone(), expect(&data));
                        content.insert(p, data);
                    }
                    Err(e) => {
                        content.remove(&p);
                        fail(&mut st, &[&p], &e);
                    }
                }
            }
            3 | 8 => {
                // Append (3) or overwrite in the middle (8) of a file we know.
                let Some(p) = pick(&mut rng, &content) else {
                    continue;
                };
                let mut data = content[&p].clone();
                let n = 1 + rng.below(5000) as usize;
                let add = rng.bytes(n);
                let at = if op == 3 {
                    data.len()
                } else {
                    rng.below(data.len() as u64 + 1) as usize
                };
                let r = (|| -> std::io::Result<()> {
                    let mut f = std::fs::OpenOptions::new().write(true).open(&p)?;
                    f.seek(SeekFrom::Start(at as u64))?;
                    f.write_all(&add)?;
                    f.sync_all()
                })();
                match r {
                    Ok(()) => {
                        if data.len() < at + add.len() {
                            data.resize(at + add.len(), 0);
                        }
                        data[at..at + add.len()].copy_from_slice(&add);
                        st.files.insert(p.clone(), expect(&data));
                        content.insert(p, data);
                    }
                    Err(e) => {
                        content.remove(&p);
                        fail(&mut st, &[&p], &e);
                    }
                }
            }
            4 => {
                let Some(from) = pick(&mut rng, &content) else {
                    continue;
                };
                let to = name(&mut rng, &dir);
                if to == from {
                    continue;
                }
                match std::fs::rename(&from, &to) {
                    Ok(()) => {
                        let data = content.remove(&from).unwrap_or_default();
                        st.files.insert(from, Expect::Gone);
                        st.files.insert(to.clone(), expect(&data));
                        content.insert(to, data);
                    }
                    Err(e) => {
                        content.remove(&from);
                        content.remove(&to);
                        fail(&mut st, &[&from, &to], &e);
                    }
                }
            }
            5 => {
                let Some(p) = pick(&mut rng, &content) else {
                    continue;
                };
                content.remove(&p);
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        st.files.insert(p, Expect::Gone);
                    }
                    Err(e) => fail(&mut st, &[&p], &e),
                }
            }
            6 => {
                let Some(p) = pick(&mut rng, &content) else {
                    continue;
                };
                let mut data = content[&p].clone();
                let len = rng.below(data.len() as u64 + 1) as usize;
                let r = (|| -> std::io::Result<()> {
                    let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                    f.set_len(len as u64)?;
                    f.sync_all()
                })();
                match r {
                    Ok(()) => {
                        data.truncate(len);
                        st.files.insert(p.clone(), expect(&data));
                        content.insert(p, data);
                    }
                    Err(e) => {
                        content.remove(&p);
                        fail(&mut st, &[&p], &e);
                    }
                }
            }
            _ => {
                // Read back something we wrote, and list the directory.
                if let Some(p) = pick(&mut rng, &content) {
                    match std::fs::read(&p) {
                        Ok(d) if d == content[&p] => {}
                        Ok(_) => st.errors += 1,
                        Err(e) => fail(&mut st, &[], &e),
                    }
                }
                if let Err(e) =
                    std::fs::read_dir(&dir).and_then(|r| r.collect::<Result<Vec<_>, _>>())
                {
                    fail(&mut st, &[], &e);
                }
            }
        }
    }
    println!("{}", serde_json::to_string(&st)?);
    Ok(ExitCode::SUCCESS)
}

fn expect(data: &[u8]) -> Expect {
    Expect::Content {
        len: data.len() as u64,
        crc: crc32c::crc32c(data),
    }
}

fn pick(rng: &mut Rng, content: &BTreeMap<String, Vec<u8>>) -> Option<String> {
    if content.is_empty() {
        return None;
    }
    let i = rng.below(content.len() as u64) as usize;
    content.keys().nth(i).cloned()
}

fn write_whole(p: &str, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(p)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_documented_order() {
        let base = RunReport {
            hits: 1,
            serving: true,
            ..RunReport::default()
        };
        assert_eq!(classify(&base), Outcome::Contained);
        let r = RunReport {
            hang: true,
            ..RunReport::default()
        };
        assert_eq!(classify(&r), Outcome::Hang);
        let r = RunReport {
            hits: 0,
            serving: true,
            ..RunReport::default()
        };
        assert_eq!(classify(&r), Outcome::NotActivated);
        let r = RunReport {
            serving: false,
            ..base
        };
        assert_eq!(classify(&r), Outcome::NotRecovered);
        let r = RunReport {
            damaged: 1,
            hits: 1,
            serving: true,
            ..RunReport::default()
        };
        assert_eq!(classify(&r), Outcome::SilentCorruption);
        let r = RunReport {
            hits: 1,
            serving: true,
            contained: 1,
            restarts: 1,
            ..RunReport::default()
        };
        assert_eq!(classify(&r), Outcome::Contained);
        let r = RunReport {
            hits: 1,
            serving: true,
            escalations: 1,
            restarts: 4,
            ..RunReport::default()
        };
        assert_eq!(classify(&r), Outcome::Recovered);
    }
}
