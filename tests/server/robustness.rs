//! Bad input over the wire: malformed JSON, unknown messages, SDP garbage, a flood, oversize
//! messages, a client that vanishes mid-handshake, raw garbage on the TLS port. Each gets an error
//! or a closed connection, and another peer's media keeps flowing all along.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use encore::client::{Listener, Publisher, Signaling};

use super::support::start_server;

/// Answers to raw messages: the first reply (an `ok:false` answer) to each.
async fn answer(client: &Signaling, raw: &str) -> Value {
    client.send_raw(raw).await.expect("sent");
    // An answer to a message without a usable id carries `id: null`: the client hands those
    // over with the notifications.
    loop {
        let value = client.notification(Duration::from_secs(5)).await.expect("an answer");
        if value.get("ok").is_some() {
            return value;
        }
    }
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
    let cases: [(&str, &str); 7] = [
        ("{not json", "bad_request"),
        (r#"{"id":1,"type":"dance"}"#, "bad_request"),
        (r#"{"id":2}"#, "bad_request"),
        (r#"{"id":3,"type":"publish","offer":"v=0"}"#, "forbidden"),
        (r#"{"id":4,"type":"prefs","follow":"everyone"}"#, "bad_request"),
        (r#"{"id":5,"type":"prefs","follow":[]}"#, "conflict"),
        (r#"[1,2,3]"#, "bad_request"),
    ];
    for (raw, code) in cases {
        let reply = answer(&eve, raw).await;
        assert_eq!(reply["ok"], false, "{raw}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{raw}: {reply}");
    }
    eve.join("robust", "eve").await.unwrap();
    let refused = eve.request("prefs", json!({"follow": "everyone"})).await.unwrap_err().to_string();
    assert!(refused.contains("bad_request"), "{refused}");
    let refused = eve.request("feedback", json!({"signal": "boo"})).await.unwrap_err().to_string();
    assert!(refused.contains("bad_request"), "{refused}");
    let refused = eve.request("candidate", json!({"transport": "recv", "candidate": {"candidate": "garbage"}})).await;
    assert!(refused.unwrap_err().to_string().contains("conflict"));

    // Mal, a speaker, sends SDP garbage and a bogus candidate.
    let mal = server.client("mal", "speaker").await;
    mal.join("robust", "mal").await.unwrap();
    let refused = mal.request("publish", json!({"offer": "this is not SDP"})).await.unwrap_err().to_string();
    assert!(refused.contains("bad_request") && refused.contains("SDP"), "{refused}");
    let refused = mal.request("answer", json!({"answer": "v=0"})).await.unwrap_err().to_string();
    assert!(refused.contains("conflict"), "{refused}");

    // A flood: far over 50 messages a second gets rate-limited, then the socket closed.
    let flood = server.client("flo", "listener").await;
    for i in 0..2000 {
        if flood.send_raw(&format!(r#"{{"id":{i},"type":"ping"}}"#)).await.is_err() {
            break;
        }
    }
    let mut limited = false;
    while let Some(value) = flood.notification(Duration::from_secs(3)).await {
        limited |= value["error"]["code"] == "rate_limited";
    }
    assert!(limited, "the flood was not rate-limited");
    assert_eq!(flood.close_code().map(|(code, _)| code), Some(1008), "the flooding socket is closed");

    // An oversize message closes the socket (1009: message too big).
    let big = server.client("big", "listener").await;
    let _ = big.send_raw(&format!(r#"{{"id":1,"type":"ping","pad":"{}"}}"#, "x".repeat(100_000))).await;
    let _ = big.notification(Duration::from_secs(3)).await;
    assert!(big.close_code().is_some() || big.request("ping", json!({})).await.is_err(), "oversize message accepted");

    // A client that vanishes mid-handshake: consume, then drop the socket before answering.
    {
        let ghost = server.client("gho", "listener").await;
        ghost.join("robust", "gho").await.unwrap();
        let offer = ghost.request("consume", json!({})).await.unwrap();
        assert!(offer["offer"].as_str().unwrap().starts_with("v=0"));
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
