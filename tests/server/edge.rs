//! One room across nodes (docs/scaling.md, "One room across nodes"): a real `redis-server` and
//! three real `encore serve` processes with relays on loopback. A speaker talks on the room's
//! origin; listeners who join it (on any node) are sent to the two other nodes, which serve
//! the room as its edges: each subscribes to the origin's relay over QUIC and runs the room's
//! engine on the replicated speaker inputs. Every listener hears every utterance with one
//! continuous stream, and the edges' recorded traces equal the origin's on utterance events.
//! Then the origin is killed: the edges' listeners are told the room ended.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use encore::client::{ClientTls, Listener, Publisher, Signaling};
use encore::components::ids::MediaKind;
use encore::protocol::{ErrorCode, Notice};

use super::cluster::{RedisServer, until};
use super::e2e::{assert_continuous, collect};
use super::support::{ServerProcess, free_port, temp_dir};

const SECRET: &str = "edge-test-relay-secret";

/// The room's utterance events as a trace file has them (`utterance_start`, `utterance_end`,
/// `evict` without its count of the node's own listeners), in order.
fn utterance_events(trace: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(trace).unwrap_or_else(|e| panic!("{}: {e}", trace.display()));
    text.lines()
        .skip(1)
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a trace line is JSON"))
        .filter(|event| {
            let kind = event["kind"].as_str().unwrap_or_default();
            kind.starts_with("utterance_") || kind == "evict"
        })
        .map(|mut event| {
            if let Some(fields) = event.as_object_mut() {
                fields.remove("listeners");
            }
            event
        })
        .collect()
}

/// A series' value in a scrape (its whole name, with its labels as written).
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
}

/// The one trace a node recorded of room `hall`.
fn trace_of(record_dir: &Path) -> std::path::PathBuf {
    let traces: Vec<_> = std::fs::read_dir(record_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", record_dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.to_string_lossy().ends_with(".trace.jsonl"))
        .collect();
    assert_eq!(traces.len(), 1, "one recording of the room in {}: {traces:?}", record_dir.display());
    traces[0].clone()
}

/// When an edge's listener asks for a key frame: inside the first utterance, after its onset's
/// own request.
const KEYFRAME_ASKED_AT: f64 = 1.2;

/// Talks in three bursts with pauses between (three utterances), with video (a frame every
/// 60 ms), then stays silent. Returns the key frame requests it had before the edge's
/// listener asked for one, and by the end of the first utterance.
async fn speak(mut publisher: Publisher, start: Instant) -> (Publisher, u32, u32) {
    let talks = [(0.5, 2.0), (3.0, 4.5), (5.5, 7.0)];
    let mut interval = tokio::time::interval(Duration::from_millis(20));
    let (mut before, mut after, mut n, mut answered) = (None, None, 0u32, 0);
    loop {
        interval.tick().await;
        let t = start.elapsed().as_secs_f64();
        if t >= 9.0 {
            return (publisher, before.expect("counted"), after.expect("counted"));
        }
        if t >= KEYFRAME_ASKED_AT - 0.1 && before.is_none() {
            before = Some(publisher.keyframe_requests());
        }
        if t >= 1.95 && after.is_none() {
            after = Some(publisher.keyframe_requests());
        }
        let voiced = talks.iter().any(|(from, to)| t >= *from && t < *to);
        let level = if voiced { 30 } else { 100 };
        let payload = Bytes::from(vec![0x5a; 60]);
        publisher.send_audio(start.elapsed(), payload, level, voiced).await.expect("sending audio");
        if n % 3 == 0 {
            // A key frame first and whenever asked (as an encoder does on a PLI).
            let asked = publisher.keyframe_requests();
            publisher.send_video(start.elapsed(), n == 0 || asked != answered, 300).await.expect("sending video");
            answered = asked;
        }
        n += 1;
    }
}

/// A listener's notices until `until`: the utterances it was told of, and any error.
async fn notices(client: &Signaling, until: Instant) -> (Vec<String>, Vec<String>, Vec<(ErrorCode, String)>) {
    let (mut started, mut ended, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(notice) = client.notification(until.saturating_duration_since(Instant::now())).await {
        match notice {
            Notice::UtteranceStarted { utterance, .. } => started.push(utterance.to_string()),
            Notice::UtteranceEnded { utterance, .. } => ended.push(utterance.to_string()),
            Notice::Error { code, message, .. } => errors.push((code, message)),
            _ => {}
        }
    }
    (started, ended, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_rooms_listeners_hear_it_from_two_edges_that_replicate_the_origin() {
    let dir = temp_dir("edge");
    let redis = RedisServer::start(free_port(), dir.clone()).await;
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let record = dir.join(format!("record-{id}"));
        let env = [
            ("ENCORE_REDIS_URL", url.as_str()),
            ("ENCORE_NODE_ID", id),
            ("ENCORE_RELAY_LISTEN", "127.0.0.1:0"),
            ("ENCORE_RELAY_SECRET", SECRET),
            // Any listener of a room with a peer in it goes to an edge.
            ("ENCORE_EDGE_AFTER_PEERS", "1"),
        ];
        let args = ["--record", record.to_str().expect("a UTF-8 path")];
        nodes.push(ServerProcess::start(&format!("edge-{id}"), &args, &env).await);
    }
    let mut pems = Vec::new();
    for node in &nodes {
        pems.extend(std::fs::read(node.data_dir.join("tls/cert.pem")).unwrap());
    }
    std::fs::write(dir.join("cluster.pem"), pems).unwrap();
    let tls = ClientTls::trusting(&dir.join("cluster.pem")).unwrap();
    for id in ["a", "b", "c"] {
        until(&format!("node {id}'s relay in the directory"), Duration::from_secs(10), || async {
            redis.node(id).await.is_some_and(|n| n["relay"]["addr"].is_string() && n["relay"]["cert"].is_string())
        })
        .await;
    }
    let which = |session: &Signaling| nodes.iter().position(|n| n.base == session.base).expect("a node");

    // The speaker's join places the room on node a, where it asked: the origin.
    let token = nodes[0].token("sam", "speaker").await;
    let sam = Signaling::connect(&tls, &nodes[0].base, Some(&token), None).await.unwrap();
    let (sam, _) = sam.join_anywhere("hall", "sam").await.expect("sam joins");
    assert_eq!(which(&sam), 0);
    let sam = Arc::new(sam);
    let publisher = Publisher::start(&sam, true, 7).await.expect("sam publishes");

    // Two listeners, asking node b and node a: both go to the origin, which sends each to an
    // edge, the least loaded: b, then c (it counts whom it sent where).
    let mut listeners = Vec::new();
    for (uid, asked) in [("lena", 1), ("luca", 0)] {
        let token = nodes[asked].token(uid, "listener").await;
        let session = Signaling::connect(&tls, &nodes[asked].base, Some(&token), None).await.unwrap();
        let started = Instant::now();
        let (session, joined) = session.join_anywhere("hall", uid).await.expect("a listener joins");
        let took = started.elapsed();
        let node = which(&session);
        eprintln!(
            "figures: {uid} asked node {asked}, served by node {node} after {took:?} (redirects, edge set-up, join)"
        );
        assert_eq!(joined.peer, format!("{uid}@{}", ["a", "b", "c"][node]), "an edge's own peer name");
        let session = Arc::new(session);
        let listener = Listener::start(&session, true).await.expect("the listener connects to its edge");
        listeners.push((uid, node, session, listener));
    }
    let served: BTreeSet<usize> = listeners.iter().map(|l| l.1).collect();
    assert_eq!(served, BTreeSet::from([1, 2]), "one listener on each edge");
    // What operators see: the origin streams the room to two edges, each serves one copy.
    let origin_scrape = nodes[0].scrape().await;
    assert_eq!(sample(&origin_scrape, "encore_relay_streams"), 2.0, "{origin_scrape}");
    assert_eq!(sample(&origin_scrape, "encore_relay_listeners_sent_total"), 2.0);
    for edge in &nodes[1..] {
        let scrape = edge.scrape().await;
        assert_eq!(sample(&scrape, "encore_relay_edge_rooms"), 1.0);
        assert!(sample(&scrape, "encore_relay_bytes_total{direction=\"received\"}") > 0.0);
    }

    let start = Instant::now();
    let talking = tokio::spawn(speak(publisher, start));
    let end = start + Duration::from_secs(11);
    let mut heard = Vec::new();
    for (uid, node, session, listener) in listeners {
        heard.push(tokio::spawn(async move {
            if uid == "lena" {
                tokio::time::sleep_until((start + Duration::from_secs_f64(KEYFRAME_ASKED_AT)).into()).await;
                listener.request_keyframe().await.expect("lena asks for a key frame");
            }
            let packets = tokio::spawn(collect(listener, end));
            let told = notices(&session, end).await;
            let (listener, packets) = packets.await.expect("collected");
            (uid, node, session, listener, packets, told)
        }));
    }
    let (publisher, keyframes_before, keyframes_after) = talking.await.expect("sam spoke");
    assert!(
        keyframes_after > keyframes_before,
        "the edge's listener's key frame request reached the publisher on the origin ({keyframes_before} -> {keyframes_after})"
    );
    let mut told_all = Vec::new();
    let mut sessions = Vec::new();
    for task in heard {
        let (uid, node, session, listener, packets, (started, ended, errors)) = task.await.expect("a listener");
        let video = packets.iter().filter(|p| p.media == MediaKind::Video).count();
        eprintln!(
            "figures: {uid} on node {node} heard {} packets ({video} video); utterances {started:?}",
            packets.len()
        );
        assert!(video > 0, "{uid} saw the speaker's video");
        assert!(errors.is_empty(), "{uid}: {errors:?}");
        assert_eq!(started.len(), 3, "{uid} was told of three utterances: {started:?}");
        assert_eq!(started, ended, "{uid}: each one ended");
        assert!(packets.len() > 100, "{uid} heard {} packets", packets.len());
        assert_continuous(uid, &packets);
        told_all.push(started);
        sessions.push((session, listener));
    }
    assert_eq!(told_all[0], told_all[1], "both edges made the same utterances");

    // Everyone leaves: the edges' copies close with their last listener, the origin with sam;
    // each node's recording is flushed.
    for (session, listener) in sessions {
        listener.close().await;
        drop(session);
    }
    publisher.close().await;
    drop(sam);
    let mut traces = Vec::new();
    for id in ["a", "b", "c"] {
        let record = dir.join(format!("record-{id}"));
        until(&format!("node {id}'s recording of the room closed"), Duration::from_secs(10), || async {
            std::fs::read_to_string(&nodes[0].log).is_ok()
                && std::fs::read_dir(&record).is_ok_and(|d| d.count() == 2)
                && nodes.iter().all(|n| !n.log_text().is_empty())
        })
        .await;
        traces.push(trace_of(&record));
    }
    // Closed rooms flush: wait for the three "room closed" lines.
    until("the three copies closed", Duration::from_secs(10), || async {
        nodes.iter().all(|n| n.log_text().contains("room closed"))
    })
    .await;
    let origin = utterance_events(&traces[0]);
    assert_eq!(origin.iter().filter(|e| e["kind"] == "utterance_end").count(), 3, "{origin:#?}");
    for (edge, trace) in ["b", "c"].iter().zip(&traces[1..]) {
        assert_eq!(utterance_events(trace), origin, "edge {edge}'s utterance events are the origin's");
    }

    // A new room, then its origin is killed: its edge's listener is told the room ended, and
    // joins it again once the directory has placed it anew.
    let token = nodes[0].token("sam", "speaker").await;
    let sam = Signaling::connect(&tls, &nodes[0].base, Some(&token), None).await.unwrap();
    let (sam, _) = sam.join_anywhere("stage", "sam").await.expect("sam joins");
    let origin = which(&sam);
    let asked = (origin + 1) % 3;
    let token = nodes[asked].token("lena", "listener").await;
    let lena = Signaling::connect(&tls, &nodes[asked].base, Some(&token), None).await.unwrap();
    let (lena, joined) = lena.join_anywhere("stage", "lena").await.expect("lena joins");
    assert_ne!(which(&lena), origin, "lena is on an edge");
    assert!(joined.peer.starts_with("lena@"), "{}", joined.peer);
    let killed = Instant::now();
    nodes[origin].signal("KILL");
    let mut told = None;
    while let Some(notice) = lena.notification(Duration::from_secs(30).saturating_sub(killed.elapsed())).await {
        if let Notice::Error { code, message, .. } = notice {
            told = Some((code, message));
            break;
        }
    }
    let told_after = killed.elapsed();
    let (code, message) = told.expect("the edge's listener is told the room ended");
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(message.contains("join the room again"), "{message}");
    lena.request::<serde_json::Value>(encore::protocol::Request::Leave).await.expect("lena leaves");
    let node = which(&lena);
    drop(lena);
    let rejoining = Instant::now();
    loop {
        assert!(rejoining.elapsed() < Duration::from_secs(30), "lena could not join the room again");
        let token = nodes[node].token("lena", "listener").await;
        let lena = Signaling::connect(&tls, &nodes[node].base, Some(&token), None).await.expect("a session");
        match lena.join_anywhere("stage", "lena").await {
            Ok((lena, _)) => {
                assert_ne!(which(&lena), origin, "the room is placed on a live node");
                break;
            }
            // The directory still names the dead node (its entries live 6 s), or it cannot
            // be reached: a clear error, and the client tries again.
            Err(error) => eprintln!("rejoin: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rejoined = rejoining.elapsed();
    eprintln!(
        "figures: origin killed: its edge's listener told after {told_after:?}; rejoined after a further {rejoined:?}"
    );
}
