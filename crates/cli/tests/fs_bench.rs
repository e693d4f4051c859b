//! `kintsugi bench fs --json` prints exactly the issue's object: {"bench":"fs","results":[…]}
//! with one row per (file system, level, workload) and the fields the issue names. Tiny
//! repetition counts: this checks the shape and that every file system really ran (SMFS and SNFS
//! at levels 1–5, their restart-only level 4, tmpfs, and both plain-fuser baselines), not speed.
//! Needs root (tmpfs mount), /dev/fuse and cc.

mod fs_common;

use std::collections::BTreeSet;

use fs_common::*;

#[test]
fn json_has_exactly_the_issue_shape() {
    let out = run(&[
        "bench",
        "fs",
        "--json",
        "--copy-reps",
        "20",
        "--compile-reps",
        "1",
    ]);
    assert!(
        out.status.success(),
        "bench fs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let obj = v.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["bench", "results"]);
    assert_eq!(v["bench"], "fs");
    let rows = v["results"].as_array().unwrap();
    let mut seen = BTreeSet::new();
    for r in rows {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "fs",
                "level",
                "workload",
                "median_us",
                "p99_us",
                "ratio_to_level5"
            ])
        );
        let fs = r["fs"].as_str().unwrap();
        assert!(
            [
                "tmpfs",
                "fuser_plain",
                "smfs",
                "smfs_restart_only",
                "snfs_plain",
                "snfs",
                "snfs_restart_only"
            ]
            .contains(&fs),
            "{r}"
        );
        match fs {
            "smfs" | "snfs" => assert!((1..=5).contains(&r["level"].as_u64().unwrap()), "{r}"),
            "smfs_restart_only" | "snfs_restart_only" => {
                assert_eq!(r["level"].as_u64(), Some(4), "{r}")
            }
            _ => assert!(r["level"].is_null(), "{r}"),
        }
        let w = r["workload"].as_str().unwrap();
        assert!(["copy64k", "compile"].contains(&w), "{r}");
        let med = r["median_us"].as_f64().unwrap();
        assert!(med > 0.0 && r["p99_us"].as_f64().unwrap() >= med, "{r}");
        assert!(r["ratio_to_level5"].as_f64().unwrap() > 0.0, "{r}");
        if (fs == "smfs" || fs == "snfs") && r["level"] == 5 {
            assert_eq!(r["ratio_to_level5"].as_f64(), Some(1.0));
        }
        seen.insert((fs.to_string(), r["level"].as_u64(), w.to_string()));
    }
    assert_eq!(
        seen.len(),
        30,
        "one row per (fs, level, workload): {seen:?}"
    );
}
