//! The media fast path seen from outside: every connection of a worker on one UDP port, ICE over
//! the one TCP port for a client whose UDP is blocked, the worker's DTLS in either role, the
//! public IP announced, a transport that never connects closed and its client told, and garbage
//! (at the shared port from strangers, and on a listener leg's own validated path) dropped and
//! counted by cause while a listener keeps hearing a speaker.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use encore::client::{ClientNetwork, Listener, Publisher, Signaling};
use encore::components::ids::MediaKind;
use encore::protocol::{ErrorCode, Notice, Offered, Request, Side};

use super::support::{TestServer, start_server};

/// A speaker talking for `seconds` from now (voiced, 50 packets a second).
pub(super) fn talk(mut publisher: Publisher, seconds: u64) -> tokio::task::JoinHandle<Publisher> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut interval = tokio::time::interval(Duration::from_millis(20));
        while start.elapsed() < Duration::from_secs(seconds) {
            interval.tick().await;
            if publisher.send_audio(start.elapsed(), Bytes::from(vec![7u8; 80]), 30, true).await.is_err() {
                break;
            }
        }
        publisher
    })
}

/// Counts a listener's audio packets as they come.
fn count(mut listener: Listener) -> (Arc<std::sync::Mutex<Vec<Instant>>>, tokio::task::JoinHandle<Listener>) {
    let received = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let sink = received.clone();
    let task = tokio::spawn(async move {
        while let Some(packet) = listener.packets.recv().await {
            if packet.media == MediaKind::Audio {
                sink.lock().unwrap().push(packet.at);
            }
        }
        listener
    });
    (received, task)
}

fn recent(received: &std::sync::Mutex<Vec<Instant>>, window: Duration) -> usize {
    let now = Instant::now();
    received.lock().unwrap().iter().filter(|at| now.duration_since(**at) < window).count()
}

async fn speaker_and_listener(
    server: &TestServer,
    room: &str,
    network: ClientNetwork,
) -> (Arc<Signaling>, Arc<Signaling>, Publisher, Listener) {
    let sam = server.client("sam", "speaker").await;
    sam.join(room, "sam").await.unwrap();
    let lea = server.client("lea", "listener").await;
    lea.join(room, "lea").await.unwrap();
    let publisher = Publisher::start_on(&sam, false, 1, network).await.expect("the speaker connects");
    let listener = Listener::start_on(&lea, false, network).await.expect("the listener connects");
    (sam, lea, publisher, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_udp_is_blocked_talks_and_listens_over_ice_tcp() {
    let server = start_server("media-tcp", |c| c.server.workers = 2, None).await;
    let ports = server.server.rooms().media_ports.clone();
    assert_eq!(ports.udp.len(), 2, "one UDP port per worker");
    assert!(ports.tcp.is_some(), "one TCP port for the server");
    let (_sam, _lea, publisher, listener) = speaker_and_listener(&server, "tcp", ClientNetwork::TcpOnly).await;
    let talking = talk(publisher, 3);
    let (received, counting) = count(listener);
    let publisher = talking.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heard = received.lock().unwrap().len();
    assert!(heard > 100, "the TCP-only listener heard {heard} of ~150 packets");
    let stats = server.server.rooms().media_stats();
    assert_eq!(stats.connections, 2, "two connections, on TCP");
    publisher.close().await;
    counting.abort();
    server.server.shutdown().await;
}

/// The worker's DTLS takes either role on a receive transport: the `webrtc` crate answers an
/// ICE-lite offer `a=setup:passive` (the worker is the DTLS client: every other test here), a
/// browser answers `active` (the worker is the server: this test, and the browser tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_answering_as_the_dtls_client_hears_the_speaker() {
    let server = start_server("media-passive", |c| c.server.workers = 1, None).await;
    let sam = server.client("sam", "speaker").await;
    sam.join("passive", "sam").await.unwrap();
    let lea = server.client("lea", "listener").await;
    lea.join("passive", "lea").await.unwrap();
    let publisher = Publisher::start_on(&sam, false, 1, ClientNetwork::Udp).await.expect("the speaker connects");
    let listener =
        Listener::start_on(&lea, false, ClientNetwork::UdpDtlsClient).await.expect("the active listener connects");
    let talking = talk(publisher, 3);
    let (received, counting) = count(listener);
    let publisher = talking.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heard = received.lock().unwrap().len();
    assert!(heard > 100, "the active listener heard {heard} of ~150 packets");
    publisher.close().await;
    counting.abort();
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_ip_is_what_the_candidates_announce() {
    let server = start_server(
        "media-public-ip",
        |c| {
            c.media.public_ip = Some("203.0.113.7".parse().unwrap());
        },
        None,
    )
    .await;
    let lea = server.client("lea", "listener").await;
    lea.join("nat", "lea").await.unwrap();
    let Offered { offer } = lea.request(Request::Listen { video: false }).await.unwrap();
    let candidates: Vec<&str> = offer.lines().filter(|l| l.starts_with("a=candidate:")).collect();
    assert!(!candidates.is_empty(), "the offer carries its candidates: {offer}");
    assert!(candidates.iter().all(|c| c.contains(" 203.0.113.7 ")), "{candidates:?}");
    assert!(candidates.iter().any(|c| c.contains(" udp ")) && candidates.iter().any(|c| c.contains(" tcp ")));
    assert!(offer.contains("a=ice-lite") && offer.contains("a=end-of-candidates"), "{offer}");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_that_never_connects_is_closed_and_its_client_told() {
    let server = start_server("media-timeout", |c| c.media.connect_timeout_s = 1, None).await;
    let lea = server.client("lea", "listener").await;
    lea.join("late", "lea").await.unwrap();
    let _offer: Offered = lea.request(Request::Listen { video: false }).await.unwrap();
    // No answer, no checks: in about a second the server gives up on it.
    let started = Instant::now();
    let failed = loop {
        match lea.notification(Duration::from_secs(5)).await.expect("a notice") {
            Notice::Error { code: ErrorCode::TransportFailed, transport, .. } => break transport,
            _ => continue,
        }
    };
    assert_eq!(failed, Some(Side::Recv));
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(server.server.rooms().media_stats().media.connect_timeouts, 1);
    // The transport is gone: listening again works.
    let _again: Offered = lea.request(Request::Listen { video: false }).await.expect("listen again");
    server.server.shutdown().await;
}

/// A STUN binding request with USERNAME `user` and no integrity (a forgery).
fn stun_request(user: &str) -> Vec<u8> {
    let mut attr = Vec::new();
    attr.extend_from_slice(&0x0006u16.to_be_bytes());
    attr.extend_from_slice(&(user.len() as u16).to_be_bytes());
    attr.extend_from_slice(user.as_bytes());
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    let mut message = vec![0x00, 0x01];
    message.extend_from_slice(&(attr.len() as u16).to_be_bytes());
    message.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    message.extend_from_slice(&[9u8; 12]);
    message.extend_from_slice(&attr);
    message
}

/// A DTLS record header followed by junk.
fn dtls_garbage() -> Vec<u8> {
    [&[0x16u8, 0xfe, 0xfd, 0, 0][..], &[0x42; 60][..]].concat()
}

/// An RTP header (Opus's payload type) and zeros.
fn rtp_looking() -> Vec<u8> {
    [&[0x80u8, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1][..], &[0; 100][..]].concat()
}

/// An RTCP receiver-report-sized packet of zeros, with `trailer` more bytes (an SRTCP tag's room).
fn rtcp_looking(trailer: usize) -> Vec<u8> {
    [&[0x81u8, 205, 0, 3][..], &vec![0; 12 + trailer][..]].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_at_the_shared_port_is_dropped_and_counted_while_a_listener_keeps_hearing() {
    let server = start_server("media-garbage", |c| c.server.workers = 1, None).await;
    let (_sam, _lea, publisher, listener) = speaker_and_listener(&server, "garbage", ClientNetwork::Udp).await;
    let talking = talk(publisher, 10);
    let (received, counting) = count(listener);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.server.rooms().media_stats().media;

    // Everything an attacker can aim at the port, from one address, then a flood.
    let port = server.server.rooms().media_ports.udp[0];
    let target = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), port.port());
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut truncated_stun = stun_request("abcd:efgh");
    truncated_stun[3] = 200; // claims 200 bytes of attributes
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\xde\xad\xbe\xef not a protocol at all".to_vec()),
        ("truncated STUN", truncated_stun),
        ("STUN from an unknown ufrag", stun_request("zz000000:client")),
        ("STUN for a known worker but no such ufrag", stun_request("00aaaaaaaa:client")),
        ("STUN without USERNAME", stun_request("")[..20].to_vec()),
        ("DTLS garbage", dtls_garbage()),
        ("RTP-looking", rtp_looking()),
        ("RTCP-looking", rtcp_looking(0)),
        ("oversized", vec![0x80; 4000]),
    ];
    for (_, datagram) in &cases {
        for _ in 0..20 {
            attacker.send_to(datagram, target).unwrap();
        }
    }
    for i in 0..20_000u32 {
        let _ = attacker.send_to(&i.to_be_bytes(), target);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.server.rooms().media_stats().media;

    // Every kind of junk was dropped before any connection saw it, by its cause.
    let unknown = after.drop_unknown_source - before.drop_unknown_source;
    assert!(unknown >= 20 * 4 + 10_000, "garbage, DTLS, RTP, RTCP and the flood from a stranger: {unknown}");
    assert!(after.drop_truncated - before.drop_truncated >= 20, "oversized datagrams: {after:?}");
    assert!(after.drop_stun_unknown_ufrag - before.drop_stun_unknown_ufrag >= 40, "{after:?}");
    assert!(after.drop_stun_no_username > before.drop_stun_no_username, "{after:?}");
    assert_eq!(after.drop_rtc_error, before.drop_rtc_error, "nothing reached a connection");
    let flood = after.rx_datagrams - before.rx_datagrams;
    assert!(flood > 10_000, "the flood was read and dropped ({flood} datagrams)");
    assert_eq!(after.connect_timeouts, 0);
    // And lea heard sam all along: about 50 packets a second.
    let heard = recent(&received, Duration::from_secs(2));
    assert!(heard > 70, "lea heard {heard} packets in the last 2 s (~100 sent)");

    let publisher = talking.await.unwrap();
    publisher.close().await;
    counting.abort();
    server.server.shutdown().await;
}

/// An answer to `offer` as a real client would make it (the `rtc` core's), never run.
fn answer_to(offer: &str) -> String {
    use rtc::peer_connection::RTCPeerConnectionBuilder;
    use rtc::peer_connection::configuration::RTCConfigurationBuilder;
    use rtc::peer_connection::sdp::RTCSessionDescription;
    let now = Instant::now();
    let (engine, registry) = encore::media::media_engine_and_registry().unwrap();
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .build(now)
        .unwrap();
    pc.set_remote_description(now, RTCSessionDescription::offer(offer.to_owned()).unwrap()).unwrap();
    let answer = pc.create_answer(None).unwrap();
    pc.set_local_description(now, answer.clone()).unwrap();
    answer.sdp
}

/// One RFC 4571 frame.
fn framed(datagram: &[u8]) -> Vec<u8> {
    [&(datagram.len() as u16).to_be_bytes()[..], datagram].concat()
}

/// Junk that comes on a listener leg's own validated path (an ICE-TCP stream bound by a check
/// with the leg's credentials) reaches the leg's DTLS and SRTCP, which the worker runs itself:
/// dropped and counted by cause (`dtls`, `srtcp`, `listener_rtp`), while another listener keeps
/// hearing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn junk_on_a_listener_legs_validated_path_is_dropped_by_cause_while_others_keep_hearing() {
    use rtc::stun::attributes::ATTR_USERNAME;
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{BINDING_REQUEST, Message, TransactionId};
    use rtc::stun::textattrs::Username;
    use std::io::Write;

    let server = start_server("media-leg-junk", |c| c.server.workers = 1, None).await;
    let (_sam, _lea, publisher, listener) = speaker_and_listener(&server, "leg-junk", ClientNetwork::Udp).await;
    let talking = talk(publisher, 8);
    let (received, counting) = count(listener);

    // eve listens with credentials she holds, and answers like a client; her DTLS never starts.
    let eve = server.client("eve", "listener").await;
    eve.join("leg-junk", "eve").await.unwrap();
    let Offered { offer } = eve.request(Request::Listen { video: false }).await.unwrap();
    let attribute = |name: &str| {
        offer.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).expect("in the offer")
    };
    let (ufrag, pwd) = (attribute("a=ice-ufrag:"), attribute("a=ice-pwd:"));
    let _: encore::protocol::Done = eve.request(Request::Answer { answer: answer_to(&offer) }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.server.rooms().media_stats().media;

    // A check with her leg's credentials binds an ICE-TCP stream to it; then the junk.
    let provider = rtc::crypto::default_provider().unwrap();
    let mut check = Message::new();
    check
        .build(&[
            Box::new(BINDING_REQUEST),
            Box::new(TransactionId::new()),
            Box::new(Username::new(ATTR_USERNAME, format!("{ufrag}:eve"))),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(pwd, provider.crypto())),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
    let tcp = server.server.rooms().media_ports.tcp.expect("ICE-TCP is on");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", tcp.port())).unwrap();
    stream.write_all(&framed(&check.raw)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let junk: Vec<Vec<u8>> = vec![dtls_garbage(), rtcp_looking(14), rtp_looking()];
    for _ in 0..10 {
        for datagram in &junk {
            stream.write_all(&framed(datagram)).unwrap();
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.server.rooms().media_stats().media;
    assert_eq!(after.drop_tcp_unbound, before.drop_tcp_unbound, "the check bound the stream: {after:?}");
    assert!(after.drop_dtls - before.drop_dtls >= 10, "DTLS garbage: {after:?}");
    assert!(after.drop_srtcp - before.drop_srtcp >= 10, "SRTCP before the keys: {after:?}");
    assert!(after.drop_listener_rtp - before.drop_listener_rtp >= 10, "RTP on a receive-only leg: {after:?}");
    let heard = recent(&received, Duration::from_secs(2));
    assert!(heard > 70, "lea heard {heard} packets in the last 2 s (~100 sent)");

    let publisher = talking.await.unwrap();
    publisher.close().await;
    counting.abort();
    server.server.shutdown().await;
}
