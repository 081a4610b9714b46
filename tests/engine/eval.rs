//! `encore eval` on a small room and two seeds: the report's shape, and the same figures,
//! byte for byte, from two runs. Never a threshold on the figures: they belong in
//! docs/recommender.md.

use std::process::Command;

use serde_json::Value;

fn eval_json() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_encore"))
        .args(["eval", "--sizes", "3x8", "--seeds", "1,2", "--seconds", "20", "--json", "--quiet"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn eval_reports_every_policy_the_same_way_twice() {
    let first = eval_json();
    assert_eq!(first, eval_json(), "two runs, one report");
    let report: Value = serde_json::from_str(&first).unwrap();
    let keys: Vec<&str> = report.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["default_policy", "policies"]);
    let default = report["default_policy"].as_str().unwrap();
    let policies = report["policies"].as_object().unwrap();
    assert_eq!(policies.keys().map(String::as_str).collect::<Vec<_>>(), ["fifo", "loudest", "rules", "learn"]);
    assert!(policies.contains_key(default), "{default}");
    for (name, figures) in policies {
        let listen_through = figures["listen_through"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&listen_through), "{name}: {listen_through}");
        assert!(figures["mean_lag_ms"].as_f64().unwrap() >= 0.0, "{name}");
        for key in [
            "mean_affinity",
            "skips_per_listener_minute",
            "p95_lag_ms",
            "live_share",
            "coverage",
            "speaker_gini",
            "decisions_per_s",
        ] {
            assert!(figures[key].is_number(), "{name} has no {key}");
        }
        let runs = figures["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{name}: one run per seed");
        assert_eq!((runs[0]["speakers"].as_u64(), runs[0]["listeners"].as_u64()), (Some(3), Some(8)));
        assert_eq!((runs[0]["seed"].as_u64(), runs[1]["seed"].as_u64()), (Some(1), Some(2)));
    }
}

#[test]
fn eval_prints_a_table_by_default() {
    let output = Command::new(env!("CARGO_BIN_EXE_encore"))
        .args(["eval", "--sizes", "2x3", "--seeds", "4", "--seconds", "10", "--policies", "fifo,learn", "--quiet"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.starts_with("policy"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("fifo ")) && text.lines().any(|l| l.starts_with("learn")), "{text}");
    let bad = Command::new(env!("CARGO_BIN_EXE_encore")).args(["eval", "--sizes", "4"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("SPEAKERSxLISTENERS"));
}
