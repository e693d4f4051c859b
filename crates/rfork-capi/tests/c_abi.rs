//! Builds the C example against librfork.so and rfork.h with `cc`, runs it for both designs,
//! and checks what the C program saw through the ABI.

use std::path::PathBuf;
use std::process::Command;

fn lib_dir() -> PathBuf {
    // target/<profile>/deps/c_abi-… → target/<profile>
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf()
}

fn build_example() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = lib_dir();
    // `cargo test` builds only the rlib of a library target; the C program needs the cdylib.
    // Build it into this same target dir (a no-op when it is up to date).
    let target = dir.parent().expect("profile dir has a parent");
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "-p", "rfork-capi", "--lib"])
        .env("CARGO_TARGET_DIR", target);
    if profile == "release" {
        cargo.arg("--release");
    }
    assert!(
        cargo.status().expect("cargo").success(),
        "building librfork.so failed"
    );
    assert!(
        dir.join("librfork.so").exists(),
        "librfork.so not built in {}",
        dir.display()
    );
    let out = std::env::temp_dir().join(format!("rfork-c-example-{}", std::process::id()));
    let st = Command::new("cc")
        .arg(manifest.join("tests/c/restart_example.c"))
        .arg("-I")
        .arg(manifest.join("include"))
        .arg("-L")
        .arg(&dir)
        .arg("-lrfork")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("cc (install gcc)");
    assert!(st.success(), "cc failed");
    out
}

#[test]
fn c_program_restarts_from_rfork_time_state_in_both_designs() {
    let exe = build_example();
    for design in ["0", "1"] {
        let out = Command::new(&exe)
            .arg(design)
            .output()
            .expect("run example");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "design {design}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines,
            [
                "event kind=1 reason=0 value=0 gen=1",
                "event kind=2 reason=2 value=11 gen=2",
                "event kind=2 reason=3 value=0 gen=3",
                "event kind=3 reason=1 value=0 gen=3",
                "final=0",
            ],
            "design {design}"
        );
    }
    let _ = std::fs::remove_file(exe);
}
