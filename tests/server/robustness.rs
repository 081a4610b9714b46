//! Bad input over the wire: malformed JSON, unknown messages, SDP garbage, a flood, oversize
//! messages, a client that vanishes mid-handshake, raw garbage on the TLS port. Each gets an error
//! or a closed connection, and another peer's media keeps flowing all along.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use encore::components::input::FeedbackSignal;
use encore::protocol::{Answer, Done, ErrorCode, Offered, Published, Request, RequestId};

use encore::client::{ClientError, Listener, Publisher, Signaling};

use super::support::start_server;

/// The answer to a raw message (no request of the client waits for it).
async fn answer(client: &Signaling, raw: &str) -> Answer {
    client.send_raw(raw).await.expect("sent");
    client.stray_answer(Duration::from_secs(5)).await.expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_errors_and_other_peers_media_keeps_flowing() {
    let server = start_server("robust", |_| {}, None).await;
    let sam = server.client("sam", "speaker").await;
    sam.join("robust", "sam").await.unwrap();
    let lea = server.client("lea", "listener").await;
    lea.join("robust", "lea").await.unwrap();
    let mut publisher = Publisher::start(&sam, false, 1).await.unwrap();
    let mut listener = Listener::start(&lea, false).await.unwrap();

    // Sam talks for the whole test.
    let start = Instant::now();
    let talking = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(20));
        while start.elapsed() < Duration::from_secs(12) {
            interval.tick().await;
            let payload = Bytes::from(vec![1u8; 80]);
            if publisher.send_audio(start.elapsed(), payload, 30, true).await.is_err() {
                break;
            }
        }
        publisher
    });
    let received = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let sink = received.clone();
    let counting = tokio::spawn(async move {
        while let Some(packet) = listener.packets.recv().await {
            sink.lock().unwrap().push(packet.at);
        }
        listener
    });

    // Eve, a listener, misbehaves in every way the protocol allows.
    let eve = server.client("eve", "listener").await;
    let cases: [(&str, Option<RequestId>, ErrorCode); 7] = [
        ("{not json", None, ErrorCode::BadRequest),
        (r#"{"id":1,"type":"dance"}"#, Some(RequestId::from(1)), ErrorCode::BadRequest),
        (r#"{"id":2}"#, Some(RequestId::from(2)), ErrorCode::BadRequest),
        (r#"{"id":3,"type":"publish","offer":"v=0"}"#, Some(RequestId::from(3)), ErrorCode::Forbidden),
        (r#"{"id":4,"type":"prefs","follow":"everyone"}"#, Some(RequestId::from(4)), ErrorCode::BadRequest),
        (r#"{"id":5,"type":"prefs","follow":[]}"#, Some(RequestId::from(5)), ErrorCode::Conflict),
        (r#"[1,2,3]"#, None, ErrorCode::BadRequest),
    ];
    for (raw, id, code) in cases {
        let reply = answer(&eve, raw).await;
        assert!(!reply.ok, "{raw}: {reply:?}");
        assert_eq!(reply.id, id, "{raw}: the id is echoed when there is one, null otherwise");
        assert_eq!(reply.error.map(|e| e.code), Some(code), "{raw}");
    }
    eve.join("robust", "eve").await.unwrap();
    let code = |result: Result<serde_json::Value, ClientError>| result.unwrap_err().refusal();
    assert_eq!(code(eve.request_raw("prefs", json!({"follow": "everyone"})).await), Some(ErrorCode::BadRequest));
    assert_eq!(code(eve.request_raw("feedback", json!({"signal": "boo"})).await), Some(ErrorCode::BadRequest));
    let candidate = json!({"transport": "recv", "candidate": {"candidate": "garbage"}});
    assert_eq!(code(eve.request_raw("candidate", candidate).await), Some(ErrorCode::Conflict));
    // Names that do not exist: the docs promise not_found, not a silent success.
    let ghost_utterance =
        Request::Feedback { signal: FeedbackSignal::Like, utterance: Some("nobody#3".parse().unwrap()) };
    let refused = eve.request::<Done>(ghost_utterance).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Conflict), "feedback before listening: {refused}");

    // Mal, a speaker, sends SDP garbage and a bogus candidate.
    let mal = server.client("mal", "speaker").await;
    mal.join("robust", "mal").await.unwrap();
    let refused = mal.request::<Published>(Request::Publish { offer: "this is not SDP".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::BadRequest), "{refused}");
    assert!(refused.to_string().contains("SDP"), "{refused}");
    let refused = mal.request::<Done>(Request::Answer { answer: "v=0".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Conflict), "{refused}");

    // A flood: far over 50 messages a second gets rate-limited, then the socket closed.
    let flood = server.client("flo", "listener").await;
    for i in 0..2000 {
        if flood.send_raw(&format!(r#"{{"id":{i},"type":"ping"}}"#)).await.is_err() {
            break;
        }
    }
    let mut limited = false;
    while let Some(answer) = flood.stray_answer(Duration::from_secs(3)).await {
        limited |= answer.error.is_some_and(|e| e.code == ErrorCode::RateLimited);
    }
    assert!(limited, "the flood was not rate-limited");
    assert_eq!(flood.close_code().map(|(code, _)| code), Some(1008), "the flooding socket is closed");
    // Binary frames count against the rate like any other.
    let binary = server.client("bin", "listener").await;
    for _ in 0..2000 {
        if binary.send_binary(vec![0u8; 16]).await.is_err() {
            break;
        }
    }
    let mut limited = false;
    while let Some(answer) = binary.stray_answer(Duration::from_secs(3)).await {
        limited |= answer.error.is_some_and(|e| e.code == ErrorCode::RateLimited);
    }
    assert!(limited, "binary frames were not rate-limited");
    assert_eq!(binary.close_code().map(|(code, _)| code), Some(1008), "the binary flood is closed");

    // An oversize message closes the socket with 1009 (message too big), Close frame and all.
    let big = server.client("big", "listener").await;
    let _ = big.send_raw(&format!(r#"{{"id":1,"type":"ping","pad":"{}"}}"#, "x".repeat(100_000))).await;
    let mut closed = None;
    for _ in 0..30 {
        closed = big.close_code();
        if closed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(closed.map(|(code, _)| code), Some(1009), "an oversize message closes with 1009");

    // A client that vanishes mid-handshake: listen, then drop the socket before answering.
    {
        let ghost = server.client("gho", "listener").await;
        ghost.join("robust", "gho").await.unwrap();
        let Offered { offer } = ghost.request(Request::Listen { video: false }).await.unwrap();
        assert!(offer.starts_with("v=0"));
    }
    // Raw garbage on the TLS port, and a TLS handshake that never speaks HTTP.
    let addr = server.server.addr;
    tokio::task::spawn_blocking(move || {
        let mut raw = std::net::TcpStream::connect(addr).unwrap();
        let _ = raw.write_all(b"\x16\x03\x01garbage that is not a TLS hello\r\n\r\n");
        drop(raw);
    })
    .await
    .unwrap();

    // Meanwhile lea kept hearing sam, and keeps hearing him now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = Instant::now();
    let recent = received.lock().unwrap().iter().filter(|at| now.duration_since(**at) < Duration::from_secs(2)).count();
    assert!(recent > 25, "lea got only {recent} packets in the last 2 s (50 were sent)");
    // The server still serves newcomers.
    let late = server.client("lat", "listener").await;
    late.join("robust", "lat").await.unwrap();

    let publisher = talking.await.unwrap();
    publisher.close().await;
    drop(lea);
    counting.abort();
    server.server.shutdown().await;
}
