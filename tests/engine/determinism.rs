//! Same scenario, same binary: the same trace, byte for byte, run after run and whatever
//! thread runs it.

use std::thread;

use encore::generate::GenerateOptions;

use super::support::{generated, replay_bytes, replay_file, scenario_files};

#[test]
fn every_scenario_replays_to_byte_identical_traces_with_packets() {
    for path in scenario_files() {
        let (first, _) = replay_file(&path, true);
        let (second, _) = replay_file(&path, true);
        assert!(first == second, "{} replayed differently", path.display());
        assert!(first.contains(r#""kind":"send""#), "{} sent nothing", path.display());
    }
}

#[test]
fn replays_on_other_threads_at_once_match_the_one_on_this_thread() {
    let options =
        GenerateOptions { speakers: 4, listeners: 12, seconds: 30, seed: 7, video: true, ..Default::default() };
    let scenario = generated(&options);
    let here = replay_bytes("generated", &scenario, true);
    let others: Vec<String> = thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| replay_bytes("generated", &scenario, true))).collect();
        handles.into_iter().map(|h| h.join().expect("replay thread")).collect()
    });
    for other in others {
        assert!(other == here, "a replay on another thread differed");
    }
}
