//! Interop with an independent WebRTC stack: a listener on aiortc (Python), written from
//! docs/protocol.md alone (tests/interop/aiortc_listener.py), hears a speaker. The browser tests
//! cover Chromium and Firefox, every other server test the `webrtc` crate; this one covers a third
//! DTLS and SRTP implementation (OpenSSL's, through aiortc) against the worker's own on a listener
//! leg. `scripts/aiortc-deps.sh` installs aiortc into a virtual environment when it is missing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use encore::client::{ClientNetwork, Publisher};

use super::media::talk;
use super::support::start_server;

/// Runs scripts/aiortc-deps.sh and returns the interpreter it prints.
fn aiortc_python(root: &Path) -> String {
    let output =
        Command::new("bash").arg(root.join("scripts/aiortc-deps.sh")).output().expect("run scripts/aiortc-deps.sh");
    assert!(
        output.status.success(),
        "scripts/aiortc-deps.sh failed ({}); it installs aiortc from PyPI into a virtual environment:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().find_map(|l| l.strip_prefix("PYTHON=")).expect("PYTHON= from aiortc-deps.sh").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aiortc_listener_written_from_the_protocol_document_hears_a_speaker() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = tokio::task::spawn_blocking({
        let root = root.to_owned();
        move || aiortc_python(&root)
    })
    .await
    .unwrap();
    let server = start_server("interop-aiortc", |c| c.server.workers = 1, None).await;
    let sam = server.client("sam", "speaker").await;
    sam.join("aiortc", "sam").await.unwrap();
    let publisher = Publisher::start_on(&sam, false, 1, ClientNetwork::Udp).await.expect("the speaker connects");
    let talking = talk(publisher, 14);

    let mut listener = tokio::process::Command::new(&python);
    listener.arg(root.join("tests/interop/aiortc_listener.py")).args([&server.base, "aiortc", "8"]);
    let output = tokio::time::timeout(Duration::from_secs(90), listener.output())
        .await
        .expect("the aiortc listener ends within 90 s")
        .expect("run the aiortc listener");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no report from the aiortc listener; stdout:\n{stdout}\nstderr:\n{stderr}"));
    eprintln!("aiortc listener: {report}");
    assert_eq!(report["connection"], "connected", "{report}\n{stderr}");
    // The test speaker's payloads are not Opus (aiortc's decoder makes nothing of them): what
    // counts is what arrived through aiortc's SRTP.
    let packets = report["packets"].as_u64().unwrap_or(0);
    assert!(packets > 100, "aiortc received {packets} RTP packets in 8 s (~50 a second while sam talks): {report}");
    assert!(output.status.success(), "{report}\n{stderr}");
    // aiortc answers `active`: the worker's own DTLS is the server here.
    assert_eq!(report["setup"], serde_json::json!(["a=setup:active"]), "{report}");
    assert!(report["now_playing"].as_array().is_some_and(|u| !u.is_empty()), "told what it hears: {report}");

    let publisher = talking.await.unwrap();
    publisher.close().await;
    server.server.shutdown().await;
}
