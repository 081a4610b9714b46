//! What the snapshots cannot show: the packets. Each test replays one hand-made scenario
//! with `send` lines and checks what its description promises.

use serde_json::Value;

use super::support::{lines, replay_file, scenarios_dir};

fn trace_of(name: &str) -> Vec<Value> {
    let (trace, _) = replay_file(&scenarios_dir().join(format!("{name}.jsonl")), true);
    lines(&trace)
}

fn sends<'a>(trace: &'a [Value], listener: &str, media: &str) -> Vec<&'a Value> {
    trace
        .iter()
        .filter(|l| l["kind"] == "send" && l["listener"] == listener && l["media"] == media && l["retransmit"] == false)
        .collect()
}

fn last_stats(trace: &[Value]) -> &Value {
    trace.iter().rev().find(|l| l["kind"] == "stats").expect("a stats line")
}

#[test]
fn an_idle_listener_gets_the_first_preroll_packet_in_the_onset_tick() {
    let trace = trace_of("01-one-speaker-one-listener");
    let start = trace.iter().find(|l| l["kind"] == "utterance_start").unwrap();
    let route = trace.iter().find(|l| l["kind"] == "route").unwrap();
    assert_eq!(route["tick"], start["tick"]);
    let audio = sends(&trace, "lena", "audio");
    assert_eq!(audio[0]["tick"], start["tick"]);
    assert_eq!(audio[0]["marker"], true);
    // The pre-roll: packets from 200 ms before the first voiced one (at 1.0 s) come first, all
    // of them, ahead of pace (the live route catches up, a bounded number a tick); then each
    // packet goes out in the tick it arrives, one per 20 ms.
    assert_eq!(start["started_us"], 800_000);
    let onset = start["tick"].as_u64().unwrap();
    let ticks: Vec<u64> = audio.iter().map(|l| l["tick"].as_u64().unwrap()).collect();
    let mut per_tick = std::collections::BTreeMap::new();
    for tick in &ticks {
        *per_tick.entry(*tick).or_insert(0usize) += 1;
    }
    let bound = encore_systems::playout::CATCHUP_PACKETS_PER_TICK + 1;
    assert!(per_tick.values().all(|n| *n <= bound), "{per_tick:?}");
    // The 10 pre-roll and 3 voiced packets (1.00-1.04 s) there are at the onset all go out in
    // the onset tick.
    assert_eq!(onset, 104);
    assert_eq!(per_tick[&onset], 13, "{per_tick:?}");
    let live: Vec<u64> = ticks[13..].to_vec();
    assert_eq!(live[0], 106, "the packet of 1.06 s in its own tick");
    assert!(live.windows(2).all(|w| w[1] == w[0] + 2), "{live:?}");
    // Continuous: one 20 ms frame and one sequence number per packet, catch-up or not.
    for pair in audio.windows(2) {
        let at = |l: &Value, field: &str| l[field].as_u64().unwrap() as u32;
        assert_eq!(at(pair[1], "seq") as u16, (at(pair[0], "seq") as u16).wrapping_add(1));
        assert_eq!(at(pair[1], "ts").wrapping_sub(at(pair[0], "ts")), 960);
    }
}

#[test]
fn a_time_shifted_utterance_keeps_its_pace_and_the_stream_stays_continuous() {
    let trace = trace_of("02-overlap-live-and-time-shifted");
    let audio = sends(&trace, "lena", "audio");
    let bob: Vec<&&Value> = audio.iter().filter(|l| l["utterance"] == "bob#1").collect();
    assert!(bob.len() > 40);
    let ticks: Vec<u64> = bob.iter().map(|l| l["tick"].as_u64().unwrap()).collect();
    assert!(ticks.windows(2).all(|w| w[1] >= w[0] + 2), "a burst: {ticks:?}");
    // Across the switch from alice#1 to bob#1: seq + 1, and a timestamp gap of the time passed.
    let switch = audio.windows(2).find(|w| w[0]["utterance"] != w[1]["utterance"]).unwrap();
    let seq = |l: &Value| l["seq"].as_u64().unwrap() as u16;
    assert_eq!(seq(switch[1]), seq(switch[0]).wrapping_add(1));
    let elapsed_us = switch[1]["at_us"].as_u64().unwrap() - switch[0]["at_us"].as_u64().unwrap();
    let ts_gap = (switch[1]["ts"].as_u64().unwrap() as u32).wrapping_sub(switch[0]["ts"].as_u64().unwrap() as u32);
    assert_eq!(ts_gap as u64, elapsed_us * 48_000 / 1_000_000);
    assert_eq!(switch[1]["marker"], true);
}

#[test]
fn a_paused_listener_resumes_where_it_paused_on_one_continuous_stream() {
    let trace = trace_of("16-pause-and-resume");
    let audio = sends(&trace, "lena", "audio");
    let tick = |l: &Value| l["tick"].as_u64().unwrap();
    // Nothing from the pause (2.0 s) to the resume (3.5 s).
    assert!(audio.iter().all(|l| tick(l) < 200 || tick(l) >= 350));
    // Every packet of alice#1, once and in order: the position waited.
    let alice: Vec<u64> =
        audio.iter().filter(|l| l["utterance"] == "alice#1").map(|l| l["src_seq"].as_u64().unwrap()).collect();
    assert!(alice.windows(2).all(|w| w[1] == w[0] + 1), "{alice:?}");
    let max_alice = sends(&trace, "max", "audio").iter().filter(|l| l["utterance"] == "alice#1").count();
    assert_eq!(alice.len(), max_alice, "lena got as much of alice#1 as max");
    // One stream: the next sequence number at the resume, marked, the time passed in its timestamp.
    let seq = |l: &Value| l["seq"].as_u64().unwrap() as u16;
    assert!(audio.windows(2).all(|w| seq(w[1]) == seq(w[0]).wrapping_add(1)));
    let resumed = audio.iter().position(|l| tick(l) >= 350).unwrap();
    let (before, after) = (audio[resumed - 1], audio[resumed]);
    assert_eq!((tick(after), &after["marker"]), (350, &Value::Bool(true)));
    let ts = |l: &Value| l["ts"].as_u64().unwrap() as u32;
    let elapsed_us = after["at_us"].as_u64().unwrap() - before["at_us"].as_u64().unwrap();
    assert_eq!(u64::from(ts(after).wrapping_sub(ts(before))), elapsed_us * 48 / 1000);
    // Bob came after Alice, for both.
    for listener in ["lena", "max"] {
        let utterances: Vec<&Value> = sends(&trace, listener, "audio").iter().map(|l| &l["utterance"]).collect();
        let first_bob = utterances.iter().position(|u| *u == "bob#1").expect("bob#1 heard");
        assert!(utterances[first_bob..].iter().all(|u| *u == "bob#1"), "{listener}");
    }
}

#[test]
fn late_packets_reach_the_time_shifted_listener_in_order_and_duplicates_nobody() {
    let trace = trace_of("10-lost-reordered-duplicated-input");
    let src = |listener: &str| -> Vec<u64> {
        sends(&trace, listener, "audio")
            .iter()
            .filter(|l| l["utterance"] == "alice#1")
            .map(|l| l["src_seq"].as_u64().unwrap())
            .collect()
    };
    let max = src("max");
    let lena = src("lena");
    let increasing = |seqs: &[u64]| seqs.windows(2).all(|w| w[1] > w[0]);
    assert!(increasing(&max), "max: {max:?}");
    assert!(increasing(&lena), "lena: {lena:?}");
    // Max, from the buffer, gets every packet that arrived: 100 sent, 2 lost.
    let first = max[0];
    let expected: Vec<u64> = (first..first + 100).filter(|s| *s != first + 5 && *s != first + 6).collect();
    assert_eq!(max, expected);
    // Lena, live, had moved past the two late ones when they came.
    assert!(!lena.contains(&(first + 15)) && !lena.contains(&(first + 40)), "{lena:?}");
    assert_eq!(lena.len(), expected.len() - 2);
    assert_eq!(last_stats(&trace)["drops"]["duplicate_packet"], 2);
}

#[test]
fn video_goes_out_from_a_key_frame_with_its_own_continuous_stream() {
    let trace = trace_of("11-video-from-a-key-frame");
    assert!(trace.iter().any(|l| l["kind"] == "keyframe_request" && l["track"] == "alice.cam"));
    let video = sends(&trace, "lena", "video");
    assert!(video.len() > 30, "{} video packets", video.len());
    assert_eq!(video[0]["keyframe"], true);
    let seqs: Vec<u16> = video.iter().map(|l| l["seq"].as_u64().unwrap() as u16).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
    let audio_ssrc = sends(&trace, "lena", "audio")[0]["ssrc"].clone();
    assert_ne!(video[0]["ssrc"], audio_ssrc);
    assert!(last_stats(&trace)["video_unbuffered"].as_u64().unwrap() > 0);
}

#[test]
fn nacks_are_answered_from_the_buffer_with_the_original_header() {
    let trace = trace_of("09-nacks-served-from-the-buffer");
    let resent: Vec<&Value> = trace.iter().filter(|l| l["kind"] == "send" && l["retransmit"] == true).collect();
    assert_eq!(resent.len(), 4);
    for again in resent {
        let original =
            trace.iter().find(|l| l["kind"] == "send" && l["retransmit"] == false && l["seq"] == again["seq"]).unwrap();
        for field in ["ts", "ssrc", "marker", "src_seq", "utterance"] {
            assert_eq!(original[field], again[field], "{field}");
        }
    }
    let stats = last_stats(&trace);
    assert_eq!((stats["retransmitted"].as_u64(), stats["nack_unserved"].as_u64()), (Some(4), Some(2)));
}

#[test]
fn bad_input_is_dropped_by_cause_and_the_good_flows() {
    let trace = trace_of("12-bad-input-is-counted-not-fatal");
    let drops = &last_stats(&trace)["drops"];
    let expected = serde_json::json!({
        "unknown_peer": 3, "unknown_track": 2, "unknown_utterance": 1, "duplicate_peer": 1,
        "duplicate_track": 1, "forbidden": 1, "invalid": 4, "oversize": 1, "flood": 36,
        "duplicate_packet": 0, "too_late": 1, "not_listening": 2
    });
    assert_eq!(drops, &expected);
    // Every packet of both of Alice's utterances reached Lena.
    let audio = sends(&trace, "lena", "audio");
    assert_eq!(audio.iter().filter(|l| l["utterance"] == "alice#1").count(), 75);
    assert_eq!(audio.iter().filter(|l| l["utterance"] == "alice#2").count(), 50);
}

#[test]
fn under_pressure_the_cap_holds_and_listeners_are_cut_over_cleanly() {
    let (text, summary) = replay_file(&scenarios_dir().join("14-eviction-under-pressure.jsonl"), true);
    assert!(summary.peak_buffer_bytes <= 40_000, "{}", summary.peak_buffer_bytes);
    let trace = lines(&text);
    assert!(trace.iter().any(|l| l["kind"] == "evict" && l["whole"] == false));
    assert!(trace.iter().any(|l| l["kind"] == "evict" && l["whole"] == true));
    for listener in ["lena", "max"] {
        let audio = sends(&trace, listener, "audio");
        let seqs: Vec<u16> = audio.iter().map(|l| l["seq"].as_u64().unwrap() as u16).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)), "{listener}");
    }
}
