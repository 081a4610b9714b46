//! The drain on SIGTERM, on a real `encore serve` process: `/readyz` turns 503 at once, new rooms
//! are refused `unavailable`, the rooms there are go on (and take new peers) until they empty or
//! the drain times out, then sessions are told `going_away` and closed (1001) and recordings are
//! flushed. A second signal stops at once, recordings still flushed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use encore::client::{Signaling, get};
use encore::protocol::{ErrorCode, GoingAwayReason, Notice};
use encore::scenario::ScenarioReader;

use super::support::{ServerProcess, http_get};

async fn ready_status(server: &ServerProcess) -> (u16, serde_json::Value) {
    get(&server.tls, &format!("{}/readyz", server.base), None).await.expect("/readyz answers")
}

/// Waits until `/readyz` answers `status`, at most `within`; returns how long it took.
async fn ready_becomes(server: &ServerProcess, status: u16, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (now, body) = ready_status(server).await;
        if now == status {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "/readyz still {now} {body} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The session's `going_away` notice and close code, waiting at most `within`.
async fn sent_away(session: &Signaling, within: Duration) -> (Option<GoingAwayReason>, Option<u16>) {
    let deadline = Instant::now() + within;
    let mut reason = None;
    while Instant::now() < deadline {
        if let Some(Notice::GoingAway { reason: r }) = session.notification(Duration::from_millis(100)).await {
            reason = Some(r);
        }
        if let Some((code, _)) = session.close_code() {
            return (reason, Some(code));
        }
    }
    (reason, None)
}

/// Every recording of the folder reads back whole, with the inputs of its room.
fn recordings_flushed(dir: &std::path::Path, rooms: &[&str]) {
    for room in rooms {
        let scenario = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(&format!("{room}-")) && name.ends_with(".scenario.jsonl")
            })
            .unwrap_or_else(|| panic!("no recording of {room}"));
        let (_, mut reader) = ScenarioReader::open(&scenario).unwrap();
        let mut events = 0;
        while let Some(event) = reader.next_event() {
            event.expect("every recorded line reads back");
            events += 1;
        }
        assert!(events >= 1, "{room}: the recording was flushed ({events} inputs)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_when_the_rooms_empty() {
    let record = super::support::temp_dir("drain-record");
    let record_arg = record.to_string_lossy().into_owned();
    let mut server =
        ServerProcess::start("drain", &["--record", &record_arg], &[("ENCORE_DRAIN_TIMEOUT_S", "60")]).await;
    let alice: Arc<Signaling> = server.client("alice", "speaker").await;
    alice.join("stays", "alice").await.unwrap();
    assert_eq!(ready_status(&server).await.0, 200);

    server.signal("TERM");
    let took = ready_becomes(&server, 503, Duration::from_secs(2)).await;
    let (_, body) = ready_status(&server).await;
    assert_eq!((body["status"].as_str(), body["rooms"].as_u64()), (Some("draining"), Some(1)), "{body}");
    println!("/readyz answered 503 {took:?} after SIGTERM");
    let (status, _) = get(&server.tls, &format!("{}/healthz", server.base), None).await.unwrap();
    assert_eq!(status, 200, "alive while draining");
    let (_, metrics) = http_get(server.metrics, "/metrics").await.unwrap();
    assert!(metrics.lines().any(|l| l == "encore_draining 1"), "the drain shows in the metrics");

    // No new room; the room there is takes a new peer, which talks to it as usual.
    let carol = server.client("carol", "listener").await;
    let refused = carol.join("brand-new", "carol").await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Unavailable), "{refused}");
    let bob = server.client("bob", "listener").await;
    let joined = bob.join("stays", "bob").await.expect("an existing room takes new peers while draining");
    assert_eq!(joined.peers.len(), 1);
    bob.request::<encore::protocol::Done>(encore::protocol::Request::Prefs {
        follow: vec!["alice".into()],
        mute: vec![],
    })
    .await
    .expect("the room serves");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.exited(Duration::ZERO).await.is_none(), "still serving the room");

    // The room empties: the server stops by itself, with the recording flushed.
    drop(carol);
    drop(alice);
    drop(bob);
    let status = server.exited(Duration::from_secs(20)).await.expect("the server exits once the rooms are empty");
    assert!(status.success(), "{status:?}\n{}", server.log_text());
    let log = server.log_text();
    assert!(log.contains("draining") && log.contains("drain over"), "{log}");
    recordings_flushed(&record, &["stays"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_times_out_sends_the_peers_away_and_flushes() {
    let record = super::support::temp_dir("drain-timeout-record");
    let record_arg = record.to_string_lossy().into_owned();
    let mut server =
        ServerProcess::start("drain-timeout", &["--record", &record_arg, "--drain-timeout-s", "2"], &[]).await;
    let dora = server.client("dora", "listener").await;
    dora.join("lingers", "dora").await.unwrap();
    let started = Instant::now();
    server.signal("TERM");
    let (reason, code) = sent_away(&dora, Duration::from_secs(15)).await;
    let waited = started.elapsed();
    assert_eq!((reason, code), (Some(GoingAwayReason::DrainTimeout), Some(1001)));
    assert!(waited >= Duration::from_millis(1900), "the room was served for the drain's length, not {waited:?}");
    let status = server.exited(Duration::from_secs(15)).await.expect("the server exits after the drain");
    assert!(status.success(), "{status:?}");
    recordings_flushed(&record, &["lingers"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once_and_still_flushes() {
    let record = super::support::temp_dir("drain-twice-record");
    let record_arg = record.to_string_lossy().into_owned();
    let mut server = ServerProcess::start("drain-twice", &["--record", &record_arg], &[]).await;
    let ed = server.client("ed", "listener").await;
    ed.join("stuck", "ed").await.unwrap();
    server.signal("TERM");
    ready_becomes(&server, 503, Duration::from_secs(2)).await;
    let started = Instant::now();
    server.signal("INT");
    let status = server.exited(Duration::from_secs(10)).await.expect("the second signal stops the server");
    let took = started.elapsed();
    assert!(status.success(), "{status:?}\n{}", server.log_text());
    assert!(took < Duration::from_secs(5), "stopped at once, not after {took:?} (the drain is 300 s)");
    println!("stopped {took:?} after the second signal");
    let (reason, _) = sent_away(&ed, Duration::from_secs(2)).await;
    assert_eq!(reason, Some(GoingAwayReason::Shutdown));
    recordings_flushed(&record, &["stuck"]);
}
