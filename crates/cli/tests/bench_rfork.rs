//! `kintsugi bench rfork --json` prints exactly the object issue 3 specifies (other tools parse
//! it). A tiny run: the numbers are not judged here, only their presence, shape and sanity.

use std::process::Command;

#[test]
fn json_has_the_specified_shape() {
    let out = Command::new(env!("CARGO_BIN_EXE_kintsugi"))
        .args([
            "bench",
            "rfork",
            "--restarts",
            "5",
            "--sizes",
            "1",
            "--json",
        ])
        .output()
        .expect("run bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON object, nothing else: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let obj = v.as_object().expect("object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["bench", "restarts", "results"]);
    assert_eq!(v["bench"], "rfork");
    assert_eq!(v["restarts"], 5);
    let names: Vec<&str> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["monitor", "kept_image", "bare_fork", "fork_exec"]);
    for r in v["results"].as_array().expect("results") {
        let mut k: Vec<&str> = r
            .as_object()
            .expect("row")
            .keys()
            .map(String::as_str)
            .collect();
        k.sort_unstable();
        assert_eq!(
            k,
            [
                "max_us", "mean_us", "min_us", "name", "p50_us", "p99_us", "rss_mb", "sd_us"
            ]
        );
        assert_eq!(r["rss_mb"], 1);
        let (min, p50, max) = (
            r["min_us"].as_f64().unwrap(),
            r["p50_us"].as_f64().unwrap(),
            r["max_us"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= p50 && p50 <= max, "{r}");
    }
}
