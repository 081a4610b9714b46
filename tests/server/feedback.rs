//! RTCP over the wire: a listener's NACK reaches the engine and is answered from the buffer (the
//! engine's tests check the copy has the same header), a listener's PLI reaches the publisher of
//! the live utterance, and the engine asks the publisher for a key frame when its utterance
//! starts.

use std::time::{Duration, Instant};

use bytes::Bytes;

use encore::client::{Listener, Publisher, Received};
use encore::components::ids::MediaKind;
use encore::components::input::FeedbackSignal;
use encore::protocol::{Done, ErrorCode, Request};

use super::support::start_server;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nacks_are_answered_from_the_buffer_and_keyframe_requests_reach_the_publisher() {
    let record = super::support::temp_dir("feedback-record");
    let record_dir = record.clone();
    let server = start_server("feedback", move |c| c.server.record_dir = Some(record_dir), None).await;
    let vic = server.client("vic", "speaker").await;
    vic.join("fb", "vic").await.unwrap();
    let lia = server.client("lia", "listener").await;
    lia.join("fb", "lia").await.unwrap();
    let mut publisher = Publisher::start(&vic, true, 5).await.unwrap();
    let mut listener = Listener::start(&lia, true).await.unwrap();

    // vic talks from 0.3 s to 5 s, with a camera (a key frame every second).
    let start = Instant::now();
    let talking = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(20));
        let mut n = 0u32;
        while start.elapsed() < Duration::from_secs(5) {
            interval.tick().await;
            let t = start.elapsed();
            let voiced = t > Duration::from_millis(300);
            n += 1;
            let mut payload = vec![0x66u8; 80];
            payload[..4].copy_from_slice(&n.to_be_bytes());
            let level = if voiced { 30 } else { 100 };
            if publisher.send_audio(t, Bytes::from(payload), level, voiced).await.is_err() {
                break;
            }
            if n.is_multiple_of(2) {
                let _ = publisher.send_video(t, n % 50 == 2, 600).await;
            }
        }
        publisher
    });

    // Wait until lia hears vic, remember a packet, then NACK it.
    let mut heard: Vec<Received> = Vec::new();
    while heard.iter().filter(|p| p.media == MediaKind::Audio).count() < 20 {
        let packet = tokio::time::timeout(Duration::from_secs(10), listener.packets.recv()).await.unwrap().unwrap();
        heard.push(packet);
    }
    // Feedback names what exists: vic#1 plays now; vic#99 never existed.
    let like = |utterance: Option<&str>| Request::Feedback {
        signal: FeedbackSignal::Like,
        utterance: utterance.map(|id| id.parse().unwrap()),
    };
    lia.request::<Done>(like(None)).await.expect("a like for what plays now");
    lia.request::<Done>(like(Some("vic#1"))).await.expect("a like by name");
    let refused = lia.request::<Done>(like(Some("vic#99"))).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::NotFound), "{refused}");
    let lost = heard.iter().filter(|p| p.media == MediaKind::Audio).nth(5).unwrap().clone();
    listener.nack(MediaKind::Audio, &[lost.seq]).await.unwrap();
    // And a PLI, past the half-second throttle of the onset's own request.
    tokio::time::sleep(Duration::from_millis(700)).await;
    listener.request_keyframe().await.unwrap();
    let until = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(packet)) =
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), listener.packets.recv()).await
    {
        heard.push(packet);
    }
    let publisher = talking.await.unwrap();

    server.server.shutdown().await;
    assert!(heard.iter().any(|p| p.media == MediaKind::Video), "lia got vic's video");
    assert!(
        publisher.keyframe_requests() >= 2,
        "vic got {} key-frame requests (one at the onset, one for lia's PLI)",
        publisher.keyframe_requests()
    );

    // What the room saw: lia's NACK and PLI as engine inputs, the packet sent again, nothing
    // unserved. (lia's own connection discards the copy: SRTP replay protection rejects a packet
    // it already decrypted, as a browser's does; a packet really lost is no replay.)
    let mut scenario = String::new();
    let mut trace = String::new();
    for entry in std::fs::read_dir(&record).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if path.to_string_lossy().ends_with(".scenario.jsonl") {
            scenario = text;
        } else {
            trace = text;
        }
    }
    let nack = format!(r#""kind":"nack","peer":"lia","media":"audio","seqs":[{}]"#, lost.seq);
    assert!(scenario.contains(&nack), "the NACK reached the room");
    assert!(scenario.contains(r#""kind":"keyframe_request","peer":"lia""#), "the PLI reached the room");
    assert!(trace.contains(r#""kind":"keyframe_request","track":"vic:video","reason":"onset""#));
    assert!(trace.contains(r#""kind":"keyframe_request","track":"vic:video","reason":"listener""#));
    let stats: serde_json::Value =
        serde_json::from_str(trace.lines().rev().find(|l| l.contains(r#""kind":"stats""#)).unwrap()).unwrap();
    assert!(stats["retransmitted"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["nack_unserved"], 0, "{stats}");
    publisher.close().await;
    listener.close().await;
}
