//! Project automation. `cargo xtask test` is the README's test command and what CI runs:
//! install missing system packages (apt-get, only when missing), then fmt check, clippy with
//! `-D warnings`, the whole test suite under nextest, and the doc tests.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)
        .with_context(|| format!("cannot enter workspace root {}", root.display()))?;
    match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("deps") => install_packages(&root),
        _ => {
            eprintln!(
                "usage: cargo xtask test [-- NEXTEST FILTERS…]   fmt, clippy, all tests\n       cargo xtask deps                          install system packages only"
            );
            std::process::exit(2)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

fn test(filters: &[String]) -> Result<()> {
    let root = workspace_root();
    let t0 = Instant::now();
    install_packages(&root)?;
    ensure_nextest()?;
    ensure_pjdfstest()?;
    step(
        "fmt",
        Command::new("cargo").args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "clippy",
        Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // Tests run in release-ish speed? No: debug keeps compile time low on two cores; benches
    // (not tests) measure speed.
    let mut nextest = Command::new("cargo");
    // The POSIX conformance tests must run here, not skip: xtask installed the suite above.
    nextest.env("KINTSUGI_REQUIRE_PJDFSTEST", "1");
    nextest.args(["nextest", "run", "--workspace", "--profile", "ci"]);
    let filters: Vec<&String> = filters.iter().filter(|f| f.as_str() != "--").collect();
    nextest.args(filters);
    step("nextest", &mut nextest)?;
    step(
        "doctests",
        Command::new("cargo").args([
            "test",
            "--workspace",
            "--doc",
            // Its lib is named `rfork` (librfork.so) and has no doc examples; rustdoc would see
            // two `rfork` crates.
            "--exclude",
            "rfork-capi",
        ]),
    )?;
    eprintln!("xtask: all checks passed in {:.0?}", t0.elapsed());
    Ok(())
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: == {name}: {cmd:?}");
    let t = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status}) after {:.1?}", t.elapsed());
    }
    eprintln!("xtask: == {name} ok in {:.1?}", t.elapsed());
    Ok(())
}

fn have(probe: &str) -> bool {
    if probe.starts_with('/') {
        return Path::new(probe).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(probe).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(probe).is_file())
}

/// Reads xtask/packages.txt and apt-get installs what is missing. Only root can install; a
/// non-root run with everything present is fine, with something missing is a clear error.
fn install_packages(root: &Path) -> Result<()> {
    let list = root.join("xtask/packages.txt");
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("cannot read {}", list.display()))?;
    let mut missing = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut it = line.split_whitespace();
        let (Some(probe), Some(pkg)) = (it.next(), it.next()) else {
            bail!(
                "{}: malformed line {line:?}: want '<command> <package>'",
                list.display()
            );
        };
        if !have(probe) && !missing.contains(&pkg.to_string()) {
            missing.push(pkg.to_string());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing missing packages: {}", missing.join(" "));
    if !rustix_is_root() {
        bail!("missing packages {missing:?} and not root: install them with apt-get and retry");
    }
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    step(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]).envs(env),
    )?;
    step(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .envs(env),
    )
}

fn rustix_is_root() -> bool {
    // `id -u` keeps xtask free of syscall crates.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn ensure_nextest() -> Result<()> {
    let ok = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success());
    if matches!(ok, Ok(true)) {
        return Ok(());
    }
    step(
        "install cargo-nextest",
        Command::new("cargo").args(["install", "--locked", "cargo-nextest"]),
    )
}

/// pjdfstest (the Rust rewrite, pinned) for the FUSE host's POSIX conformance tests.
fn ensure_pjdfstest() -> Result<()> {
    let home_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/pjdfstest"));
    if have("pjdfstest") || home_bin.is_some_and(|p| p.is_file()) {
        return Ok(());
    }
    step(
        "install pjdfstest",
        Command::new("cargo").args(["install", "--locked", "pjdfstest", "--version", "0.2.2"]),
    )
}
