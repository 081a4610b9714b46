//! The bounds of docs/operations.md ("Limits"), each against a real server: the attack is
//! refused or bounded, and a bystander's `/healthz` or media is not hurt.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use encore::client::{ClientError, ClientTls, Listener, Publisher, Signaling, get, ws_ticket};
use encore::components::ids::MediaKind;
use encore::protocol::ErrorCode;

use super::support::{ServerProcess, start_server};

/// A TCP connection to the server from `source` (any 127/8 address is this machine).
async fn connect_from(source: &str, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(server).await
}

/// Waits until the peer closes the connection (or `limit` passes); true when it closed.
async fn closed_within(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// What an attacking connection achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Turned away at once (over the cap: closed before the TLS handshake finished).
    Refused,
    /// Let in, then closed by the server within the time limit.
    CutOff,
    /// Still open after the time limit: the bound failed.
    StillOpen,
}

/// A connection from `source` that does `what` after the TLS handshake and holds on.
async fn attacker(
    source: &'static str,
    server: SocketAddr,
    tls: ClientTls,
    what: &'static str,
    limit: Duration,
) -> Fate {
    let Ok(tcp) = connect_from(source, server).await else { return Fate::Refused };
    if what == "no-tls" {
        let mut tcp = tcp;
        return if closed_within(&mut tcp, limit).await { Fate::CutOff } else { Fate::StillOpen };
    }
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await else {
        return Fate::Refused;
    };
    let started = Instant::now();
    if what == "slowloris" {
        // A header byte a second, never the end of it.
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if stream.write_all(&[*byte]).await.is_err() || stream.flush().await.is_err() {
                return Fate::CutOff;
            }
            if closed_within(&mut stream, Duration::from_secs(1)).await {
                return Fate::CutOff;
            }
            if started.elapsed() > limit {
                return Fate::StillOpen;
            }
        }
        return Fate::StillOpen;
    }
    if what == "keepalive" {
        // One request, then an idle keep-alive connection.
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        if stream.write_all(request).await.is_err() {
            return Fate::CutOff;
        }
    }
    // "idle" (or after the keep-alive request): nothing more.
    if closed_within(&mut stream, limit).await { Fate::CutOff } else { Fate::StillOpen }
}

/// `/healthz` from 127.0.0.1 every 100 ms while `attack` runs; the failures.
async fn bystander_healthz_during<T>(
    base: &str,
    tls: &ClientTls,
    attack: impl std::future::Future<Output = T>,
) -> (T, usize, usize) {
    let url = format!("{base}/healthz");
    tokio::pin!(attack);
    let mut tries = 0;
    let mut failures = 0;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            result = &mut attack => return (result, tries, failures),
            _ = every.tick() => {
                tries += 1;
                let ok = tokio::time::timeout(Duration::from_secs(2), get(tls, &url, None))
                    .await
                    .is_ok_and(|r| r.is_ok_and(|(status, _)| status == 200));
                if !ok {
                    failures += 1;
                }
            }
        }
    }
}

/// Slow clients: header bytes a second apart, TLS connections that never send a request, raw
/// TCP that never starts TLS, an idle keep-alive, 350 of them from one address against a server
/// with 256 descriptors. The address's cap turns most away, the time limits cut the rest off,
/// and `/healthz` from another address answers all along. Then the same from 12 addresses,
/// past the descriptors: accepting fails, is logged once a second with a count, and the
/// server answers again once the time limits have cut the attackers off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_capped_per_address_and_cut_off_and_healthz_keeps_answering() {
    let config = "[limits]\nconnections_per_ip = 64\nheader_timeout_s = 2\ntls_handshake_timeout_s = 2\n";
    let server = ServerProcess::start_with("slow-clients", &[], &[], Some(config), Some(256)).await;
    let addr: SocketAddr = server.base.trim_start_matches("https://").parse().unwrap();
    let limit = Duration::from_secs(6);

    let mut attackers = Vec::new();
    for i in 0..350 {
        let what = match i % 7 {
            0..=2 => "slowloris",
            3 | 4 => "idle",
            5 => "no-tls",
            _ => "keepalive",
        };
        attackers.push(tokio::spawn(attacker("127.0.0.2", addr, server.tls.clone(), what, limit)));
    }
    let attack = async {
        let mut fates = Vec::new();
        for attacker in attackers {
            fates.push(attacker.await.unwrap());
        }
        fates
    };
    let (fates, tries, failures) = bystander_healthz_during(&server.base, &server.tls, attack).await;
    let count = |fate: Fate| fates.iter().filter(|f| **f == fate).count();
    println!(
        "one address: {} refused, {} cut off, {} still open; healthz {failures} failures in {tries}",
        count(Fate::Refused),
        count(Fate::CutOff),
        count(Fate::StillOpen)
    );
    assert_eq!(count(Fate::StillOpen), 0, "every connection let in is cut off within the limits: {fates:?}");
    assert!(count(Fate::CutOff) <= 64 * 3, "at most the cap at once, a few rounds of it: {}", count(Fate::CutOff));
    assert!(count(Fate::Refused) >= 350 - 64 * 3, "most were turned away: {}", count(Fate::Refused));
    assert!(tries >= 20, "the bystander tried all along ({tries})");
    assert_eq!(failures, 0, "healthz failed {failures} of {tries} times during the attack");

    // From 12 addresses at once, 64 each: 768 connections for 256 descriptors.
    let sources = [
        "127.0.1.1",
        "127.0.1.2",
        "127.0.1.3",
        "127.0.1.4",
        "127.0.1.5",
        "127.0.1.6",
        "127.0.1.7",
        "127.0.1.8",
        "127.0.1.9",
        "127.0.1.10",
        "127.0.1.11",
        "127.0.1.12",
    ];
    let started = Instant::now();
    let mut attackers = Vec::new();
    for source in sources {
        for _ in 0..64 {
            attackers.push(tokio::spawn(attacker(source, addr, server.tls.clone(), "idle", limit)));
        }
    }
    let mut fates = Vec::new();
    for attacker in attackers {
        fates.push(attacker.await.unwrap());
    }
    let took = started.elapsed();
    let refused = fates.iter().filter(|f| **f == Fate::Refused).count();
    println!("12 addresses: {refused} of {} refused, the rest cut off, in {took:?}", fates.len());
    assert!(!fates.contains(&Fate::StillOpen), "every attacker was cut off");
    let (status, _) = get(&server.tls, &format!("{}/healthz", server.base), None).await.expect("healthz answers again");
    assert_eq!(status, 200);
    let log = server.log_text();
    let lines = log.lines().filter(|l| l.contains("accepting HTTPS connections fails")).count();
    println!("{lines} log lines for the failed accepts");
    assert!(lines >= 1, "running out of descriptors is logged");
    assert!(lines as u64 <= took.as_secs() + 2, "at most once a second: {lines} lines in {took:?}");
    assert!(log.contains("connections over the per-address cap refused"), "refusals are logged");
}

/// Per-user quotas: sessions at once, rooms made a minute, tickets held. Past each, a clear
/// `rate_limited` (a 429 for the HTTP ones); other users are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_gets_its_quota_of_sessions_rooms_and_tickets_and_no_more() {
    let server = start_server(
        "quotas",
        |config| {
            config.limits.sessions_per_user = 3;
            config.limits.rooms_per_user_per_min = 3;
            config.limits.tickets_per_user = 3;
        },
        None,
    )
    .await;
    let token = server.token("mal", "listener").await;

    // Sessions.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions
            .push(Signaling::connect(&server.tls, &server.base, Some(&token), None).await.expect("under the quota"));
    }
    match Signaling::connect(&server.tls, &server.base, Some(&token), None).await {
        Err(ClientError::UpgradeRefused { status: 429, refusal: Some(refusal) }) => {
            assert_eq!(refusal.error.code, ErrorCode::RateLimited);
            assert!(refusal.error.message.contains("limits.sessions_per_user"), "{}", refusal.error.message);
            assert!(refusal.error.auth_code.is_none());
        }
        Err(other) => panic!("expected a 429 rate_limited, got {other:?}"),
        Ok(_) => panic!("a fourth session was let in"),
    }
    let other = server.client("ann", "speaker").await;
    other.join("shared", "ann").await.expect("another user is not limited by mal's sessions");
    sessions.clear();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rooms made in a minute: each join of a new room makes it; a session that leaves ends.
    for room in ["r1", "r2", "r3"] {
        let session = Arc::new(Signaling::connect(&server.tls, &server.base, Some(&token), None).await.unwrap());
        session.join(room, "mal").await.expect("under the room quota");
        drop(session);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let session = Arc::new(Signaling::connect(&server.tls, &server.base, Some(&token), None).await.unwrap());
    let refused = session.join("r4", "mal").await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::RateLimited), "{refused}");
    assert!(refused.to_string().contains("rooms_per_user_per_min"), "{refused}");
    session.join("shared", "mal").await.expect("joining a room someone else made is not making one");
    drop(session);
    drop(other);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Tickets held unredeemed.
    for _ in 0..3 {
        ws_ticket(&server.tls, &server.base, &token).await.expect("under the ticket quota");
    }
    match ws_ticket(&server.tls, &server.base, &token).await {
        Err(ClientError::HttpStatus { status: 429, body, .. }) => {
            assert!(body.contains("too-many-tickets"), "{body}");
        }
        other => panic!("expected a 429, got {other:?}"),
    }
    let bob = server.token("bob", "listener").await;
    ws_ticket(&server.tls, &server.base, &bob).await.expect("another user's tickets are their own");
    server.server.shutdown().await;
}

/// A listener that NACKs every packet it got, again and again, gets at most its share more
/// than its stream (25 % and a burst of 32), and another listener's stream does not suffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nacking_everything_gets_a_listener_its_share_not_the_buffer_again() {
    let server = start_server("nack-flood", |_| {}, None).await;
    let sam = server.client("sam", "speaker").await;
    sam.join("nacks", "sam").await.unwrap();
    let lea = server.client("lea", "listener").await;
    lea.join("nacks", "lea").await.unwrap();
    let eve = server.client("eve", "listener").await;
    eve.join("nacks", "eve").await.unwrap();
    let mut publisher = Publisher::start(&sam, false, 1).await.unwrap();
    let mut lea_listener = Listener::start(&lea, false).await.unwrap();
    let mut eve_listener = Listener::start(&eve, false).await.unwrap();

    let seconds = 8;
    let start = Instant::now();
    let talking = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(20));
        while start.elapsed() < Duration::from_secs(seconds) {
            interval.tick().await;
            if publisher.send_audio(start.elapsed(), Bytes::from(vec![7u8; 100]), 30, true).await.is_err() {
                break;
            }
        }
        publisher
    });
    let lea_count = tokio::spawn(async move {
        let mut count = 0u64;
        let until = start + Duration::from_secs(seconds);
        while let Ok(Some(_)) =
            tokio::time::timeout(until.saturating_duration_since(Instant::now()), lea_listener.packets.recv()).await
        {
            count += 1;
        }
        (count, lea_listener)
    });
    let before = server.server.rooms().media_stats().media.rtp_out;
    // Eve NACKs the last 64 sequence numbers she received, every 20 ms.
    let mut seen: Vec<u16> = Vec::new();
    let mut nacks = 0u64;
    let mut every = tokio::time::interval(Duration::from_millis(20));
    while start.elapsed() < Duration::from_secs(seconds) {
        every.tick().await;
        while let Ok(packet) = eve_listener.packets.try_recv() {
            if packet.media == MediaKind::Audio {
                seen.push(packet.seq);
            }
        }
        let last: Vec<u16> = seen.iter().rev().take(64).copied().collect();
        if !last.is_empty() && eve_listener.nack(MediaKind::Audio, &last).await.is_ok() {
            nacks += 1;
        }
    }
    let sent = server.server.rooms().media_stats().media.rtp_out - before;
    let (lea_packets, lea_listener) = lea_count.await.unwrap();
    let publisher = talking.await.unwrap();
    let stream = seconds * 50;
    // Two listeners' streams, eve's share (25 %) and burst (32) on top; without the bounds
    // her NACKs alone asked for 64 packets every 20 ms.
    let bound = 2 * stream + stream / 4 + 32 + 40;
    println!("{nacks} NACKs of 64; {sent} RTP packets sent (bound {bound}); lea heard {lea_packets} of {stream}");
    assert!(nacks > 300, "eve kept NACKing ({nacks})");
    assert!(sent <= bound, "{sent} RTP packets sent for two listeners of {stream}-packet streams (bound {bound})");
    assert!(sent >= 2 * stream * 8 / 10, "both streams flowed ({sent})");
    assert!(lea_packets >= stream * 85 / 100, "lea heard {lea_packets} of {stream}");
    lea_listener.close().await;
    eve_listener.close().await;
    publisher.close().await;
    server.server.shutdown().await;
}

/// One buffer budget for the whole server: three rooms flooded at once hold, together, no more
/// than `engine.buffer_max_bytes` at any sample of `/api/rooms`, which shows the budget and each
/// room's share; the shares follow the demand (each flooded room gets past its floor). After
/// the rooms close, the server's resident memory is measured (reported, docs/operations.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flooded_rooms_share_one_buffer_budget_and_never_hold_more_together() {
    let budget: u64 = 3_000_000;
    let config = format!("[server]\nmax_rooms = 10\n[engine]\nbuffer_max_bytes = {budget}\n");
    let server = ServerProcess::start_with("budget", &[], &[], Some(&config), None).await;
    let rss_start = server.rss_kib();
    let watcher = server.token("olga", "listener").await;

    let mut floods = Vec::new();
    for room in ["flood-a", "flood-b", "flood-c"] {
        let speaker = server.client(&format!("{room}-speaker"), "speaker").await;
        speaker.join(room, "speaker").await.unwrap();
        let mut publisher = Publisher::start(&speaker, false, 9).await.unwrap();
        floods.push(tokio::spawn(async move {
            // 1000-byte voiced packets every 2 ms: about 500 KB/s into the room's buffer.
            let start = Instant::now();
            let mut interval = tokio::time::interval(Duration::from_millis(2));
            while start.elapsed() < Duration::from_secs(8) {
                interval.tick().await;
                if publisher.send_audio(start.elapsed(), Bytes::from(vec![3u8; 1000]), 20, true).await.is_err() {
                    break;
                }
            }
            publisher.close().await;
            speaker
        }));
    }

    let url = format!("{}/api/rooms", server.base);
    let mut samples = 0;
    let mut best_share = std::collections::BTreeMap::<String, u64>::new();
    let mut peak_sum = 0;
    let mut rss_peak = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        let (status, body) = get(&server.tls, &url, Some(&watcher)).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["buffer"]["budget_bytes"].as_u64(), Some(budget), "{body}");
        let rooms = body["rooms"].as_array().unwrap();
        let held: u64 = rooms.iter().map(|r| r["buffer_bytes"].as_u64().unwrap()).sum();
        let granted: u64 = rooms.iter().map(|r| r["share_bytes"].as_u64().unwrap()).sum();
        assert!(held <= budget, "sample {samples}: the rooms hold {held} bytes together, over the {budget} budget");
        assert!(granted <= budget, "sample {samples}: shares of {granted} bytes, over the {budget} budget");
        for room in rooms {
            let share = room["share_bytes"].as_u64().unwrap();
            let best = best_share.entry(room["id"].as_str().unwrap().to_owned()).or_default();
            *best = (*best).max(share);
        }
        peak_sum = peak_sum.max(held);
        rss_peak = rss_peak.max(server.rss_kib());
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples >= 40, "sampled all along ({samples})");
    assert!(peak_sum >= budget / 2, "the floods filled the budget ({peak_sum} of {budget})");
    let floor = budget / 40;
    for room in ["flood-a", "flood-b", "flood-c"] {
        let best = best_share.get(room).copied().unwrap_or(0);
        assert!(best >= 4 * floor, "{room}'s share followed its demand past its floor {floor}: {best}");
    }
    for flood in floods {
        drop(flood.await.unwrap());
    }
    // The rooms close with their last peer; the worker trims the heap.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, body) = get(&server.tls, &url, Some(&watcher)).await.unwrap();
    assert_eq!(body["rooms"].as_array().map(Vec::len), Some(0), "{body}");
    let rss_after = server.rss_kib();
    println!(
        "resident memory: {rss_start} KiB at start, {rss_peak} KiB at the peak, {rss_after} KiB after the rooms closed"
    );
    assert!(rss_after <= rss_peak, "nothing grew after the rooms closed");
}

/// An offer with one m-line per track asked for: `n` audio m-lines, bundled.
fn offer_with_audio_lines(n: usize) -> String {
    let mids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let mut sdp = format!(
        "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE {}\r\na=msid-semantic: WMS\r\n",
        mids.join(" ")
    );
    for mid in &mids {
        sdp.push_str(&format!(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
             a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=ice-options:trickle\r\n\
             a=fingerprint:sha-256 {}\r\na=setup:actpass\r\na=mid:{mid}\r\na=sendonly\r\na=rtcp-mux\r\n\
             a=rtpmap:111 opus/48000/2\r\na=ssrc:{} cname:x\r\n",
            ["AB"; 32].join(":"),
            1000 + mid.parse::<u32>().unwrap()
        ));
    }
    sdp
}

/// A publish offer may carry one audio track (and one video): 30 audio m-lines are refused
/// with `bad_request`, and the speaker's proper offer is answered after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_with_thirty_audio_tracks_is_refused() {
    let server = start_server("offers", |_| {}, None).await;
    let sam = server.client("sam", "speaker").await;
    sam.join("offers", "sam").await.unwrap();
    let refused =
        sam.request_raw("publish", serde_json::json!({"offer": offer_with_audio_lines(30)})).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::BadRequest), "{refused}");
    assert!(refused.to_string().contains("30 audio"), "{refused}");
    let publisher = Publisher::start(&sam, false, 5).await.expect("a proper offer is answered");
    publisher.close().await;
    server.server.shutdown().await;
}
