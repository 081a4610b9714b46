//! One insta snapshot per scenario file: the trace without `send` lines. A change to the
//! engine's decisions shows up here as a diff to review (`cargo insta review`); never
//! accept one without reading it.

use super::support::replay_file;

#[test]
fn every_scenario_trace_matches_its_reviewed_snapshot() {
    insta::glob!("../../scenarios", "*.jsonl", |path| {
        let (trace, _) = replay_file(path, false);
        insta::assert_snapshot!(trace);
    });
}
