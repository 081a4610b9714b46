//! The `encore` binary: replay and generate from the command line.

use std::process::Command;

fn encore() -> Command {
    Command::new(env!("CARGO_BIN_EXE_encore"))
}

#[test]
fn replay_prints_a_summary_and_writes_the_trace() {
    let dir = std::env::temp_dir().join(format!("encore-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    let scenario = super::support::scenarios_dir().join("01-one-speaker-one-listener.jsonl");
    let output = encore().arg("replay").arg(&scenario).arg("--trace").arg(&trace).arg("--packets").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    for field in
        ["utterances     1", "route changes  2", "evictions      0", "peak buffer", "sent packets", "replay speed"]
    {
        assert!(stdout.contains(field), "missing {field:?} in:\n{stdout}");
    }
    let trace = std::fs::read_to_string(&trace).unwrap();
    assert!(trace.starts_with(r#"{"encore_trace":1,"#), "{}", &trace[..80]);
    assert!(trace.contains(r#""kind":"send""#));
}

#[test]
fn a_broken_line_is_an_error_naming_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("encore-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("broken.jsonl");
    std::fs::write(
        &scenario,
        "{\"encore_scenario\":1}\n{\"at_us\":0,\"kind\":\"join\",\"peer\":\"a\",\"roles\":[\"speaker\"]}\n{\"at_us\":5,\"kind\":\"rtp\",\"track\":\"t\"}\n",
    )
    .unwrap();
    let output = encore().arg("replay").arg(&scenario).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("broken.jsonl:3: missing field `seq`"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let missing = encore().arg("replay").arg(dir.join("nope.jsonl")).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.jsonl"));
}

#[test]
fn generate_writes_a_scenario_that_replays() {
    let output = encore()
        .args(["scenario", "generate", "--speakers", "2", "--listeners", "3", "--seconds", "5", "--seed", "9"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.starts_with(r#"{"encore_scenario":1,"tick_ms":10,"name":"generated-s2-l3-5s-seed9""#),
        "{}",
        &text[..120]
    );
    let again = encore()
        .args(["scenario", "generate", "--speakers", "2", "--listeners", "3", "--seconds", "5", "--seed", "9"])
        .output()
        .unwrap();
    assert_eq!(text.as_bytes(), again.stdout.as_slice(), "the same seed gives the same file");
    let trace = super::support::replay_bytes("generated", text.as_bytes(), false);
    assert!(trace.contains("utterance_start"));
}
