//! `kintsugi bench fs`: the paper's two workloads on tmpfs, on the plain-`fuser` baseline, on
//! SMFS at every level, and on SNFS at every level beside its own baseline (the same server
//! behind a bare `fuser` client, `kintsugi __snfs-plain`), all in one run so the ratios are fair:
//! every file system is mounted for the whole run and the timed work is interleaved in rounds
//! (see [`run_with_recovery`]), so a drift in the machine's speed lands on every row alike.
//! The SNFS server runs on loopback, one per mount with a fresh export, so no mount sees
//! another's files or server-side caches.
//!
//! `ratio_to_level5` compares a row with level 5 of its own module: SNFS rows (and the SNFS
//! baseline) with SNFS at level 5, every other row with SMFS at level 5. A network file system's
//! round trips dwarf what the levels add, so dividing by SMFS would say nothing about SNFS.
//!
//! - `copy64k`: copy a 64 KiB file in 8 KiB blocks (open, create/truncate, 8 reads + 8 writes,
//!   close), many repetitions; one sample per copy.
//! - `compile`: build a generated C program of 5 sources + 2 headers (~2,000 lines) with `cc`
//!   (5 compiles + 1 link) on the file system; one sample per full build.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::HostError;

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Copies per file system.
    pub copy_reps: usize,
    /// Builds per file system.
    pub compile_reps: usize,
    /// The `kintsugi` binary used to mount.
    pub exe: PathBuf,
    /// Pin the benchmark and every file-system process it starts to this CPU. On this 2-vCPU
    /// VM, unpinned FUSE round trips are bimodal (3× apart from one mount to the next,
    /// depending on where the scheduler puts the daemon); same-core is the stable configuration.
    pub cpu: Option<usize>,
    /// Only these file systems (`fs` names of [`Row`]); empty: all. Rows whose module's level 5
    /// did not run get no ratio.
    pub only: Vec<String>,
}

/// One line of the result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub fs: &'static str,
    pub level: Option<u8>,
    pub workload: &'static str,
    pub median_us: f64,
    pub p99_us: f64,
    pub ratio_to_level5: Option<f64>,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn io(what: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> HostError {
    let path = p.display().to_string();
    move |source| HostError::Io { what, path, source }
}

/// One 64 KiB copy in 8 KiB blocks; returns µs.
fn copy_once(src: &Path, dst: &Path) -> Result<f64, HostError> {
    let t = Instant::now();
    let mut s = std::fs::File::open(src).map_err(io("open", src))?;
    let mut d = std::fs::File::create(dst).map_err(io("create", dst))?;
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).map_err(io("read", src))?;
        if n == 0 {
            break;
        }
        d.write_all(&buf[..n]).map_err(io("write", dst))?;
    }
    drop((s, d));
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// Writes the copy source on `dir` and warms the file system up with `warm` copies.
fn copy64k_prepare(dir: &Path, warm: usize) -> Result<(), HostError> {
    let src = dir.join("copy-src");
    let mut data = vec![0u8; 64 << 10];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    std::fs::write(&src, &data).map_err(io("write", &src))?;
    let dst = dir.join("copy-dst");
    for _ in 0..warm {
        copy_once(&src, &dst)?;
    }
    Ok(())
}

/// `reps` timed copies on a prepared `dir`.
fn copy64k(dir: &Path, reps: usize) -> Result<Vec<f64>, HostError> {
    let (src, dst) = (dir.join("copy-src"), dir.join("copy-dst"));
    (0..reps).map(|_| copy_once(&src, &dst)).collect()
}

/// Writes the compile workload's sources: 2 headers, 5 C files, about 2,000 lines.
pub fn generate_sources(dir: &Path) -> Result<(), HostError> {
    let mut types = String::from("#ifndef TYPES_H\n#define TYPES_H\n#include <stddef.h>\n");
    for i in 0..30 {
        types += &format!(
            "struct rec{i} {{\n    int id;\n    long value;\n    double weight;\n    char tag[16];\n}};\n"
        );
    }
    types += "#endif\n";
    let mut protos = String::from("#ifndef PROTO_H\n#define PROTO_H\n#include \"types.h\"\n");
    for f in 0..5 {
        for k in 0..12 {
            protos += &format!("long f{f}_{k}(struct rec{} *r, int n);\n", k % 30);
        }
    }
    protos += "#endif\n";
    std::fs::write(dir.join("types.h"), types).map_err(io("write", dir))?;
    std::fs::write(dir.join("proto.h"), protos).map_err(io("write", dir))?;
    for f in 0..5 {
        let mut c = String::from("#include \"proto.h\"\n#include <string.h>\n\n");
        for k in 0..12 {
            c += &format!(
                "long f{f}_{k}(struct rec{r} *r, int n)\n{{\n    long acc = {k};\n    for (int i = 0; i < n; i++) {{\n        \
                 r[i].id = i * {f} + {k};\n        r[i].value += (long)r[i].id * 3;\n        if (r[i].value % 7 == 0)\n            \
                 acc += r[i].value;\n        else\n            acc -= r[i].id;\n        r[i].weight = (double)acc / (i + 1);\n        \
                 memset(r[i].tag, 'a' + (i % 26), sizeof r[i].tag - 1);\n        r[i].tag[15] = 0;\n    }}\n    \
                 switch (n % 4) {{\n    case 0: acc += 1; break;\n    case 1: acc += 2; break;\n    case 2: acc *= 3; break;\n    \
                 default: acc ^= 5; break;\n    }}\n    return acc;\n}}\n\n",
                r = k % 30
            );
        }
        if f == 0 {
            c += "#include <stdio.h>\nint main(void)\n{\n    static struct rec0 r0[64];\n    long t = 0;\n";
            for g in 0..5 {
                c += &format!("    t += f{g}_0((struct rec0 *)r0, 64);\n");
            }
            c += "    printf(\"%ld\\n\", t);\n    return 0;\n}\n";
        }
        std::fs::write(dir.join(format!("m{f}.c")), c).map_err(io("write", dir))?;
    }
    Ok(())
}

fn compile_once(dir: &Path) -> Result<f64, HostError> {
    let t = Instant::now();
    for f in 0..5 {
        let st = Command::new("cc")
            .current_dir(dir)
            .args(["-O0", "-c", &format!("m{f}.c"), "-o", &format!("m{f}.o")])
            .status()
            .map_err(io("running cc (install gcc)", dir))?;
        if !st.success() {
            return Err(HostError::Io {
                what: "cc",
                path: dir.display().to_string(),
                source: std::io::Error::other("compile failed"),
            });
        }
    }
    let st = Command::new("cc")
        .current_dir(dir)
        .args(["-o", "prog", "m0.o", "m1.o", "m2.o", "m3.o", "m4.o"])
        .status()
        .map_err(io("running cc", dir))?;
    if !st.success() {
        return Err(HostError::Io {
            what: "link",
            path: dir.display().to_string(),
            source: std::io::Error::other("link failed"),
        });
    }
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// `reps` requests that do nothing: `close(dup(fd))` on a file of `dir` sends one FLUSH, which
/// both modules answer without touching host data or the server. What is left is the module
/// boundary: FUSE plus, at levels 1–4, the ring round trip to the module's process. µs each.
fn null_requests(dir: &Path, reps: usize) -> Result<Vec<f64>, HostError> {
    let src = dir.join("copy-src");
    let f = std::fs::File::open(&src).map_err(io("open", &src))?;
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            let d = f.try_clone().map_err(io("dup", &src))?;
            drop(d);
            Ok(t.elapsed().as_secs_f64() * 1e6)
        })
        .collect()
}

/// Writes the compile workload's sources on `dir` and builds them once (warm-up, and proof
/// that they build).
fn compile_prepare(dir: &Path) -> Result<(), HostError> {
    let d = dir.join("build");
    std::fs::create_dir_all(&d).map_err(io("mkdir", &d))?;
    generate_sources(&d)?;
    compile_once(&d).map(drop)
}

/// A mounted target; unmounted on drop, then its helper processes (an SNFS baseline client,
/// an SNFS server) are killed and its export removed.
struct Target {
    dir: PathBuf,
    /// `kintsugi umount` with this binary (a kintsugi mount), or `None`: a plain kernel
    /// unmount (tmpfs; the SNFS baseline, whose serving loop ends with the connection).
    umount_with: Option<PathBuf>,
    /// Killed and reaped on drop, in order, after the unmount.
    procs: Vec<std::process::Child>,
    /// Removed on drop, after the processes are gone (an SNFS export, logs).
    scratch: Vec<PathBuf>,
}

/// A running `kintsugi snfs-server` on loopback with a fresh export under `base`; killed (and
/// its export removed) on drop unless handed to a [`Target`].
struct SnfsServer {
    child: Option<std::process::Child>,
    addr: String,
    /// The export and the log.
    scratch: Vec<PathBuf>,
}

impl Drop for SnfsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_all(&mut self.scratch);
    }
}

impl SnfsServer {
    fn start(base: &Path, exe: &Path, name: &str) -> Result<SnfsServer, HostError> {
        use std::io::BufRead;
        let export = base.join(format!("export-{name}"));
        std::fs::create_dir_all(&export).map_err(io("mkdir", &export))?;
        let log = base.join(format!("snfs-server-{name}.log"));
        let logf = std::fs::File::create(&log).map_err(io("creating", &log))?;
        let mut child = Command::new(exe)
            .args(["snfs-server", "--listen", "127.0.0.1:0", "--export"])
            .arg(&export)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(logf)
            .spawn()
            .map_err(io("starting kintsugi snfs-server", &export))?;
        // The server prints its address once bound, or exits (closing stdout) on failure.
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        match line.trim().strip_prefix("snfs-server listening on ") {
            Some(a) => Ok(SnfsServer {
                addr: a.to_string(),
                child: Some(child),
                scratch: vec![export, log],
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                let why = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&export);
                let _ = std::fs::remove_file(&log);
                Err(HostError::Daemon(format!(
                    "kintsugi snfs-server did not start: {}",
                    why.trim()
                )))
            }
        }
    }

    /// Hands the server's lifetime (and its export) to the target that uses it.
    fn attach(mut self, mut t: Target) -> Target {
        t.procs.extend(self.child.take());
        t.scratch.append(&mut self.scratch);
        t
    }
}

impl Target {
    fn tmpfs(base: &Path) -> Result<Target, HostError> {
        let dir = base.join("tmpfs");
        std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        rustix::mount::mount(
            "kintsugi-bench",
            &dir,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            Some(c"size=512m"),
        )
        .map_err(|e| io("mount tmpfs", &dir)(e.into()))?;
        Ok(Target {
            dir,
            umount_with: None,
            procs: Vec::new(),
            scratch: Vec::new(),
        })
    }

    fn kintsugi(
        base: &Path,
        exe: &Path,
        module: &str,
        level: u8,
        extra: &[&str],
    ) -> Result<Target, HostError> {
        // Every target is mounted at once: the restart-only level 4 needs a name of its own.
        let dir = base.join(format!(
            "{module}-l{level}{}",
            if extra.contains(&"restart") {
                "-restart-only"
            } else {
                ""
            }
        ));
        std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        let out = Command::new(exe)
            .args([
                "mount",
                "--module",
                module,
                "--level",
                &level.to_string(),
                "--size",
                "512M",
            ])
            .args(extra)
            .arg(&dir)
            .output()
            .map_err(io("running kintsugi mount", &dir))?;
        if !out.status.success() {
            return Err(HostError::Daemon(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(Target {
            dir,
            umount_with: Some(exe.to_path_buf()),
            procs: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// SNFS at `level`, against a server of its own.
    fn snfs(base: &Path, exe: &Path, level: u8, extra: &[&str]) -> Result<Target, HostError> {
        let server = SnfsServer::start(base, exe, &format!("l{level}-{}", extra.len()))?;
        let opt = format!("server={}", server.addr);
        let args: Vec<&str> = ["-o", opt.as_str()]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let t = Target::kintsugi(base, exe, "snfs", level, &args)?;
        Ok(server.attach(t))
    }

    /// The SNFS baseline: the same server behind a bare `fuser` client (`__snfs-plain`), which
    /// serves in the foreground; ready once the mount point is a FUSE mount.
    fn snfs_plain(base: &Path, exe: &Path) -> Result<Target, HostError> {
        let server = SnfsServer::start(base, exe, "plain")?;
        let dir = base.join("snfs-plain");
        std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        let log = base.join("snfs-plain.log");
        let logf = std::fs::File::create(&log).map_err(io("creating", &log))?;
        let client = Command::new(exe)
            .args(["__snfs-plain", "--server", &server.addr])
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(io("starting kintsugi __snfs-plain", &dir))?;
        // The client first: on drop it is unmounted, then killed, then the server.
        let mut t = server.attach(Target {
            dir: dir.clone(),
            umount_with: None,
            procs: vec![client],
            scratch: vec![log.clone()],
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_fuse(&dir) {
            let exited = t.procs[0].try_wait().ok().flatten().is_some();
            if exited || Instant::now() > deadline {
                let why = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(HostError::Daemon(format!(
                    "the SNFS baseline client did not mount {}: {}",
                    dir.display(),
                    why.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(t)
    }
}

/// Removes scratch files and directories (never a mount point: those are only `Target::dir`).
fn remove_all(paths: &mut Vec<PathBuf>) {
    for p in paths.drain(..) {
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// Whether `dir` is (now) the root of a FUSE mount.
fn is_fuse(dir: &Path) -> bool {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    rustix::fs::statfs(dir).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC)
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(exe) = &self.umount_with {
            let ok = Command::new(exe)
                .arg("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
            }
        } else {
            let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
        }
        for mut c in self.procs.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_all(&mut self.scratch);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Level-4 crash recovery: module SIGKILLed during a write → rollback → restart → the retried
/// write answered, as the host measured it (`last_recovery_us`), over `n` crashes.
fn recovery(dir: &Path, n: usize) -> Result<Vec<f64>, HostError> {
    let p = dir.join("recovery");
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        crate::mount::inject(
            dir,
            crate::pm::Fault::Kill,
            Some(crate::wire::OpClass::Write),
        )?;
        std::fs::write(&p, [i as u8; 8192]).map_err(io("write across a module crash", &p))?;
        let s = crate::mount::status(dir)?;
        v.push(s["last_recovery_us"].as_f64().unwrap_or(0.0));
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

/// Median and p99 (µs) of level-4 crash recovery, beside the benchmark rows.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Recovery {
    pub median_us: f64,
    pub p99_us: f64,
    pub crashes: usize,
}

/// What each protection technique costs, from the medians of one run (µs, per module and
/// workload): each level differs from the next by one technique (paper 001, Table 4).
/// `(module, technique, workload, extra µs over the level below it, extra as a fraction of the
/// module's level 5)`.
pub fn technique_costs(rows: &[Row]) -> Vec<TechniqueCost> {
    let med = |fs: &str, l: u8, w: &str| {
        rows.iter()
            .find(|r| r.fs == fs && r.level == Some(l) && r.workload == w)
            .map(|r| r.median_us)
    };
    let mut out = Vec::new();
    for m in MODULES {
        let restart_only = if m == "smfs" {
            "smfs_restart_only"
        } else {
            "snfs_restart_only"
        };
        for w in ["copy64k", "compile"] {
            let Some(l5) = med(m, 5, w).filter(|x| *x > 0.0) else {
                continue;
            };
            let steps = [
                (
                    "separate address space + undo log + deadlock detection (L4 restart-only - L5)",
                    med(restart_only, 4, w),
                    Some(l5),
                ),
                (
                    "containment write trap (L4 - L4 restart-only)",
                    med(m, 4, w),
                    med(restart_only, 4, w),
                ),
                (
                    "duplication + semantic checks (L3 - L4 restart-only)",
                    med(m, 3, w),
                    med(restart_only, 4, w),
                ),
                (
                    "shared memory read-only (L2 - L3)",
                    med(m, 2, w),
                    med(m, 3, w),
                ),
                (
                    "shared memory unmapped, not read-only (L1 - L2)",
                    med(m, 1, w),
                    med(m, 2, w),
                ),
            ];
            for (technique, hi, lo) in steps {
                if let (Some(h), Some(l)) = (hi, lo) {
                    out.push(TechniqueCost {
                        module: m,
                        technique,
                        workload: w,
                        extra_us: round1(h - l),
                        of_level5: ((h - l) / l5 * 1000.0).round() / 1000.0,
                    });
                }
            }
        }
    }
    out
}

/// One row of [`technique_costs`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TechniqueCost {
    pub module: &'static str,
    pub technique: &'static str,
    pub workload: &'static str,
    /// Median µs over the level below it.
    pub extra_us: f64,
    /// `extra_us` as a fraction of the module's level-5 median.
    pub of_level5: f64,
}

/// Every (file system, level) the benchmark runs, in order. Level 4 runs with containment (the
/// default: write-protected globals, the flag) and, beside it, as the restart-only rung without
/// the write trap: the difference is containment's cost. Levels 1–3 run with containment too
/// (there the flag is set by write-back, no trap).
pub const SYSTEMS: [(&str, Option<u8>); 15] = [
    ("tmpfs", None),
    ("fuser_plain", None),
    ("smfs", Some(5)),
    ("smfs", Some(4)),
    ("smfs_restart_only", Some(4)),
    ("smfs", Some(3)),
    ("smfs", Some(2)),
    ("smfs", Some(1)),
    ("snfs_plain", None),
    ("snfs", Some(5)),
    ("snfs", Some(4)),
    ("snfs_restart_only", Some(4)),
    ("snfs", Some(3)),
    ("snfs", Some(2)),
    ("snfs", Some(1)),
];

/// Rounds the copies are interleaved in (fewer if there are fewer copies).
const ROUNDS: usize = 10;
/// Null requests per file system ([`null_requests`]), in [`ROUNDS`] rounds.
const NULL_REPS: usize = 5000;

/// The modules benchmarked at every level.
pub const MODULES: [&str; 2] = ["smfs", "snfs"];

/// The module whose level 5 a row is compared with: SNFS rows with SNFS, the rest with SMFS.
pub fn module_of(fs: &str) -> &'static str {
    if fs.starts_with("snfs") {
        "snfs"
    } else {
        "smfs"
    }
}

/// Runs every workload on every file system. Progress goes to `progress`.
pub fn run(opts: &Opts, progress: impl FnMut(&str)) -> Result<Vec<Row>, HostError> {
    run_with_recovery(opts, 0, progress).map(|(rows, _)| rows)
}

/// What the human output shows beside the rows.
#[derive(Debug, Clone)]
pub struct Extras {
    /// `crashes` measured level-4 recoveries, if asked for.
    pub recovery: Option<Recovery>,
    /// Median µs of a request that does nothing ([`null_requests`]), per file system and
    /// level, in row order: the price of the module boundary alone.
    pub null_request: Vec<(&'static str, Option<u8>, f64)>,
}

/// [`run`], plus `crashes` measured level-4 recoveries (0: none) and the null-request costs.
pub fn run_with_recovery(
    opts: &Opts,
    crashes: usize,
    mut progress: impl FnMut(&str),
) -> Result<(Vec<Row>, Extras), HostError> {
    let mut rec = None;
    if let Some(c) = opts.cpu {
        let mut set = rustix::thread::CpuSet::new();
        set.set(c);
        // Inherited by every mount daemon (and module process) spawned below.
        rustix::thread::sched_setaffinity(None, &set)
            .map_err(|e| io("pinning to a CPU (--cpu)", Path::new("/proc/self"))(e.into()))?;
    }
    let base = std::env::temp_dir().join(format!("kintsugi-bench-fs-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(io("mkdir", &base))?;
    // Every file system is mounted for the whole run and the timed work is interleaved:
    // `ROUNDS` rounds, each giving every file system an equal share of the copies (in an order
    // rotated per round), then one build each per compile repetition. This VM's speed drifts
    // over seconds (a neighbour, the host's own load): measured one file system after the
    // other, a drift lands on whichever level runs then (SNFS level 5 varied 540–770 µs from
    // run to run that way); interleaved, it lands on every level alike, so the ratios hold.
    let mut targets = Vec::new();
    for (fs, level) in SYSTEMS {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == fs) {
            continue;
        }
        let name = format!(
            "{fs}{}",
            level.map(|l| format!(" level {l}")).unwrap_or_default()
        );
        progress(&format!("mounting {name}"));
        let t = match (fs, level) {
            ("tmpfs", _) => Target::tmpfs(&base)?,
            ("fuser_plain", _) => Target::kintsugi(&base, &opts.exe, crate::mount::PLAIN, 5, &[])?,
            ("smfs_restart_only", _) => {
                Target::kintsugi(&base, &opts.exe, "smfs", 4, &["--recovery", "restart"])?
            }
            ("snfs_plain", _) => Target::snfs_plain(&base, &opts.exe)?,
            ("snfs_restart_only", _) => {
                Target::snfs(&base, &opts.exe, 4, &["--recovery", "restart"])?
            }
            ("snfs", l) => Target::snfs(&base, &opts.exe, l.unwrap_or(5), &[])?,
            (_, l) => Target::kintsugi(&base, &opts.exe, "smfs", l.unwrap_or(5), &[])?,
        };
        copy64k_prepare(&t.dir, opts.copy_reps / 20 + 1)?;
        compile_prepare(&t.dir)?;
        targets.push((fs, level, name, t));
    }
    let n = targets.len();
    let rounds = ROUNDS.min(opts.copy_reps.max(1));
    let mut copies: Vec<Vec<f64>> = vec![Vec::with_capacity(opts.copy_reps); n];
    for r in 0..rounds {
        progress(&format!("copy64k, round {} of {rounds}", r + 1));
        // This round's share: the repetitions split as evenly as they go.
        let share = opts.copy_reps * (r + 1) / rounds - opts.copy_reps * r / rounds;
        for k in 0..n {
            let i = (k + r) % n;
            copies[i].extend(copy64k(&targets[i].3.dir, share)?);
        }
    }
    let mut nulls: Vec<Vec<f64>> = vec![Vec::with_capacity(NULL_REPS); n];
    progress("null requests");
    for r in 0..ROUNDS {
        for k in 0..n {
            let i = (k + r) % n;
            nulls[i].extend(null_requests(&targets[i].3.dir, NULL_REPS / ROUNDS)?);
        }
    }
    let mut builds: Vec<Vec<f64>> = vec![Vec::with_capacity(opts.compile_reps); n];
    for r in 0..opts.compile_reps {
        progress(&format!(
            "compile, build {} of {}",
            r + 1,
            opts.compile_reps
        ));
        for k in 0..n {
            let i = (k + r) % n;
            builds[i].push(compile_once(&targets[i].3.dir.join("build"))?);
        }
    }
    let mut rows = Vec::new();
    for (i, (fs, level, _, _)) in targets.iter().enumerate() {
        for (workload, samples) in [("copy64k", &mut copies[i]), ("compile", &mut builds[i])] {
            samples.sort_by(f64::total_cmp);
            rows.push(Row {
                fs,
                level: *level,
                workload,
                median_us: round1(pct(samples, 0.5)),
                p99_us: round1(pct(samples, 0.99)),
                ratio_to_level5: None,
            });
        }
    }
    let null_request = targets
        .iter()
        .zip(&mut nulls)
        .map(|((fs, level, ..), v)| {
            v.sort_by(f64::total_cmp);
            (*fs, *level, round1(pct(v, 0.5)))
        })
        .collect();
    // Crash recovery last, so the timed rounds ran on modules that never crashed.
    if crashes > 0
        && let Some((.., name, t)) = targets
            .iter()
            .find(|(fs, level, ..)| *fs == "smfs" && *level == Some(4))
    {
        progress(&format!("{name}: {crashes} module crashes"));
        let v = recovery(&t.dir, crashes)?;
        rec = Some(Recovery {
            median_us: pct(&v, 0.5),
            p99_us: pct(&v, 0.99),
            crashes,
        });
    }
    // Unmounted (and their servers stopped) in reverse order of mounting.
    while let Some(t) = targets.pop() {
        drop(t);
    }
    let _ = std::fs::remove_dir(&base);
    for w in ["copy64k", "compile"] {
        for module in MODULES {
            let l5 = rows
                .iter()
                .find(|r| r.fs == module && r.level == Some(5) && r.workload == w)
                .map(|r| r.median_us);
            for r in rows
                .iter_mut()
                .filter(|r| r.workload == w && module_of(r.fs) == module)
            {
                r.ratio_to_level5 = l5
                    .filter(|m| *m > 0.0)
                    .map(|m| (r.median_us / m * 1000.0).round() / 1000.0);
            }
        }
    }
    Ok((
        rows,
        Extras {
            recovery: rec,
            null_request,
        },
    ))
}
