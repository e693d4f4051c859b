//! A small fault-injection campaign (issue 6) on the real binary: 100 runs with containment,
//! each mounting SMFS at level 3 (the default), a three-client workload, one fault site fired for one client,
//! then probe, data check and fsck. Checks the JSON is exactly the object, that the runs
//! add up, that faults really fire, and that no run hangs (no deadlock after a contained fault).
//! The rates themselves are measured by `kintsugi bench inject` (BENCHMARKS.md), not asserted.
//! Needs root and /dev/fuse.

mod fs_common;

use fs_common::*;

#[test]
fn a_hundred_run_campaign_adds_up_and_never_hangs() {
    let out = run(&[
        "bench", "inject", "--runs", "100", "--modes", "contain", "--json",
    ]);
    assert!(
        out.status.success(),
        "bench inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["bench", "modes", "runs"]);
    assert_eq!(v["bench"], "inject");
    assert_eq!(v["runs"], 100);
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 1);
    let m = &modes[0];
    let mk: Vec<&String> = m.as_object().unwrap().keys().collect();
    assert_eq!(
        mk,
        [
            "activated",
            "contained",
            "hang",
            "mode",
            "not_recovered",
            "recovered",
            "silent_corruption"
        ]
    );
    assert_eq!(m["mode"], "containment");
    let n = |k: &str| m[k].as_u64().unwrap();
    assert!(n("activated") >= 50, "too few faults fired: {m}");
    assert_eq!(
        n("contained") + n("recovered") + n("not_recovered") + n("silent_corruption") + n("hang"),
        n("activated"),
        "every activated run has exactly one outcome: {m}"
    );
    assert_eq!(n("hang"), 0, "a run hung: {m}");
}
