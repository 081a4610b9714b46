use std::sync::Arc;

use encore_systems::components::ids::{MediaKind, Role};
use encore_systems::components::input::{FeedbackSignal, Input, RtpIn};

use super::generators::track_counter;
use super::*;

fn read(text: &str) -> Result<Vec<ScenarioEvent>, ScenarioError> {
    let (_, mut reader) = ScenarioReader::new("test.jsonl".into(), text.as_bytes())?;
    let mut events = Vec::new();
    while let Some(event) = reader.next_event() {
        events.push(event?);
    }
    Ok(events)
}

#[test]
fn every_kind_round_trips_through_its_line() {
    let inputs = vec![
        Input::Join { peer: "a".into(), uid: Some("u1".into()), roles: vec![Role::Speaker] },
        Input::Publish {
            peer: "a".into(),
            track: "a.mic".into(),
            media: MediaKind::Audio,
            codec: "opus".into(),
            clock_rate: 48_000,
            ssrc: 7,
        },
        Input::Rtp {
            track: "a.mic".into(),
            packet: RtpIn {
                seq: 65_535,
                ts: 4_000_000_000,
                marker: true,
                payload: filler_payload(65_535, 3),
                audio_level: Some(30),
                voice: Some(true),
                keyframe: false,
            },
        },
        Input::Rtp {
            track: "a.mic".into(),
            packet: RtpIn {
                seq: 1,
                ts: 2,
                marker: false,
                payload: Arc::from(vec![1u8, 2, 3]),
                audio_level: None,
                voice: None,
                keyframe: true,
            },
        },
        Input::Listen { peer: "a".into() },
        Input::Prefs { peer: "a".into(), follow: vec!["b".into()], mute: vec!["c".into()] },
        Input::Feedback { peer: "a".into(), utterance: Some("b#2".parse().unwrap()), signal: FeedbackSignal::Skip },
        Input::Feedback { peer: "a".into(), utterance: None, signal: FeedbackSignal::Like },
        Input::Nack { peer: "a".into(), media: MediaKind::Audio, seqs: vec![1, 2] },
        Input::KeyframeRequest { peer: "a".into() },
        Input::Pause { peer: "a".into() },
        Input::Resume { peer: "a".into() },
        Input::BufferShare { bytes: 5_000_000 },
        Input::Unlisten { peer: "a".into() },
        Input::Unpublish { track: "a.mic".into() },
        Input::Leave { peer: "a".into() },
    ];
    for (i, input) in inputs.iter().enumerate() {
        let line = event_line(i as u64 * 10, (i % 2 == 0).then_some(i as u64), input);
        let event = parse_event(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(&event.input, input, "{line}");
    }
}

#[test]
fn format_errors_name_the_file_and_line() {
    let header = r#"{"encore_scenario":1,"tick_ms":10}"#;
    let cases = [
        ("{not json", "not JSON"),
        (r#"{"at_us":5,"kind":"dance","peer":"a"}"#, "unknown variant `dance`"),
        (r#"{"at_us":5,"kind":"join"}"#, "missing field `peer`"),
        (r#"{"at_us":5,"kind":"join","peer":"a","colour":"red"}"#, "unknown field `colour`"),
        (r#"{"kind":"join","peer":"a"}"#, "missing `at_us`"),
        (r#"{"at_us":-1,"kind":"join","peer":"a"}"#, "non-negative"),
        (r#"{"at_us":5,"kind":"rtp","track":"t","seq":70000,"ts":1,"size":3}"#, "70000"),
        (r#"{"at_us":5,"kind":"rtp","track":"t","seq":1,"ts":1}"#, "needs `size` or `payload`"),
        (r#"{"at_us":5,"kind":"rtp","track":"t","seq":1,"ts":1,"payload":"!!"}"#, "base64"),
        (r#"[1,2]"#, "must be a JSON object"),
    ];
    for (line, expected) in cases {
        let text = format!("{header}\n{{\"at_us\":1,\"kind\":\"leave\",\"peer\":\"x\"}}\n{line}\n");
        let err = read(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.jsonl:3: "), "{line}: {err}");
        assert!(err.contains(expected), "{line}: {err}");
    }
}

#[test]
fn time_may_not_go_backwards() {
    let text = "{\"encore_scenario\":1}\n{\"at_us\":50,\"kind\":\"leave\",\"peer\":\"x\"}\n\n{\"at_us\":40,\"kind\":\"leave\",\"peer\":\"x\"}\n";
    let err = read(text).unwrap_err().to_string();
    assert!(err.starts_with("test.jsonl:4: `at_us` goes backwards"), "{err}");
}

#[test]
fn the_header_is_checked() {
    for (header, expected) in [
        (r#"{"encore_scenario":2}"#, "unsupported scenario version 2"),
        (r#"{"encore_scenario":1,"config":{"buffer_max":1}}"#, "unknown field `buffer_max`"),
        (r#"{"encore_scenario":1,"tick_ms":0}"#, "tick_ms"),
        (r#"{"scenario":1}"#, "bad header"),
    ] {
        let err = read(&format!("{header}\n")).unwrap_err().to_string();
        assert!(err.starts_with("test.jsonl:1: ") && err.contains(expected), "{header}: {err}");
    }
    assert!(matches!(read(""), Err(ScenarioError::Empty { .. })));
}

#[test]
fn generator_lines_expand_in_time_order_with_continuing_numbers() {
    let text = r#"{"encore_scenario":1}
{"at_us":0,"kind":"talk","track":"a","duration_ms":100,"lose":[1],"duplicate":[2],"late":[[0,50]]}
{"at_us":30000,"kind":"leave","peer":"x"}
{"at_us":100000,"kind":"silence","track":"a","duration_ms":800,"dtx":true}
"#;
    let first_seq = track_counter("a").next_seq;
    let summary: Vec<(u64, String)> = read(text)
        .unwrap()
        .iter()
        .map(|e| match &e.input {
            Input::Rtp { packet, .. } => {
                let n = packet.seq.wrapping_sub(first_seq);
                (e.at_us, format!("rtp {n} level {} size {}", packet.audio_level.unwrap_or(0), packet.payload.len()))
            }
            other => (e.at_us, other.kind().to_string()),
        })
        .collect();
    let expected = [
        (30_000, "leave"),
        (40_000, "rtp 2 level 30 size 120"),
        (41_000, "rtp 2 level 30 size 120"),
        (50_000, "rtp 0 level 30 size 120"),
        (60_000, "rtp 3 level 30 size 120"),
        (80_000, "rtp 4 level 30 size 120"),
        (100_000, "rtp 5 level 127 size 3"),
        (500_000, "rtp 6 level 127 size 3"),
    ];
    let expected: Vec<(u64, String)> = expected.iter().map(|(t, s)| (*t, s.to_string())).collect();
    assert_eq!(summary, expected);
}

#[test]
fn generator_lines_are_checked_like_any_other() {
    let header = r#"{"encore_scenario":1}"#;
    for (line, expected) in [
        (r#"{"at_us":0,"kind":"talk","track":"a"}"#, "missing field `duration_ms`"),
        (r#"{"at_us":0,"kind":"talk","track":"a","duration_ms":10,"level":200}"#, "level at most 127"),
        (r#"{"at_us":0,"kind":"video","track":"v","duration_ms":10,"fps":0}"#, "fps"),
        (r#"{"at_us":0,"tick":3,"kind":"silence","track":"a","duration_ms":10}"#, "recorded `tick`"),
    ] {
        let err = read(&format!("{header}\n{line}\n")).unwrap_err().to_string();
        assert!(err.starts_with("test.jsonl:2: ") && err.contains(expected), "{line}: {err}");
    }
}

#[test]
fn events_go_to_the_first_tick_at_or_after_their_arrival_unless_recorded() {
    let event = |at_us, tick| ScenarioEvent { at_us, tick, input: Input::Leave { peer: "x".into() } };
    assert_eq!(event(0, None).tick_for(10_000), 0);
    assert_eq!(event(1, None).tick_for(10_000), 1);
    assert_eq!(event(10_000, None).tick_for(10_000), 1);
    assert_eq!(event(10_001, Some(7)).tick_for(10_000), 7);
}

#[test]
fn a_file_that_does_not_name_the_policy_replays_with_rules_and_one_that_does_with_it() {
    let policy = |header: &str| ScenarioHeader::parse(header).unwrap().config.recommender.policy;
    assert_eq!(policy(r#"{"encore_scenario":1}"#), Policy::Rules);
    assert_eq!(policy(r#"{"encore_scenario":1,"config":{}}"#), Policy::Rules);
    assert_eq!(policy(r#"{"encore_scenario":1,"config":{"recommender":{"follow":5}}}"#), Policy::Rules);
    assert_eq!(policy(r#"{"encore_scenario":1,"config":{"recommender":{"policy":"learn"}}}"#), Policy::Learn);
    // What this build writes names it, and reads back the same.
    let header = ScenarioHeader::new(EngineConfig::default());
    assert_eq!(ScenarioHeader::parse(&header.to_line()).unwrap().config, EngineConfig::default());
    assert_eq!(EngineConfig::default().recommender.policy, Policy::Learn);
}
