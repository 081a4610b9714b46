//! Every recommender policy on the same hand-made room (scenarios/policies/): one reviewed
//! snapshot of the trace per policy, so that a change to what a policy decides shows up as a
//! diff to read. The figures that say which policy is better come from `encore eval`
//! (docs/recommender.md), not from here.

use encore::components::Policy;
use encore::replay::{DEFAULT_DRAIN_US, replay};
use encore::scenario::ScenarioReader;
use encore::trace::TraceWriter;

use super::support::scenarios_dir;

fn trace(policy: Policy) -> String {
    let path = scenarios_dir().join("policies/four-speakers-three-listeners.jsonl");
    let (mut header, mut reader) = ScenarioReader::open(&path).unwrap_or_else(|e| panic!("{e}"));
    header.config.recommender.policy = policy;
    let mut trace = TraceWriter::new(Vec::new(), &header, false).expect("writing to memory");
    replay(&header, &mut reader, Some(&mut trace), DEFAULT_DRAIN_US).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8(trace.into_inner()).expect("traces are UTF-8")
}

#[test]
fn each_policy_on_the_same_room_matches_its_reviewed_snapshot() {
    for policy in Policy::ALL {
        let trace = trace(policy);
        assert_eq!(trace, self::trace(policy), "{policy} replays the same");
        insta::assert_snapshot!(format!("policy_{policy}"), trace);
    }
}
