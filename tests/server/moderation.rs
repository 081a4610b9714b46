//! Moderation that holds, with real clients: a moderator mutes a speaker, the speaker cannot
//! unmute itself (not by `resume`, not by joining again), no packet it sends meanwhile reaches
//! a listener, and once a moderator unmutes it the listener hears it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use encore::client::{Listener, Publisher, Signaling};
use encore::components::ids::MediaKind;
use encore::protocol::{Done, ErrorCode, Notice, Request, Side};

use super::support::start_server;

/// A speaker talking (voiced, 50 packets a second) until `stop`; each payload carries its
/// number, and `sent` is the number of the last packet sent.
fn talk(mut publisher: Publisher, sent: Arc<AtomicU32>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Publisher> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut interval = tokio::time::interval(Duration::from_millis(20));
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            interval.tick().await;
            n += 1;
            let mut payload = vec![0x55u8; 80];
            payload[..4].copy_from_slice(&n.to_be_bytes());
            if publisher.send_audio(start.elapsed(), Bytes::from(payload), 30, true).await.is_err() {
                break;
            }
            sent.store(n, Ordering::Relaxed);
        }
        publisher
    })
}

/// The numbers of the speaker's packets a listener received, as they come.
fn heard(mut listener: Listener) -> (Arc<std::sync::Mutex<Vec<u32>>>, tokio::task::JoinHandle<Listener>) {
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let task = tokio::spawn(async move {
        while let Some(packet) = listener.packets.recv().await {
            if packet.media == MediaKind::Audio && packet.payload.len() >= 4 {
                let n =
                    u32::from_be_bytes([packet.payload[0], packet.payload[1], packet.payload[2], packet.payload[3]]);
                sink.lock().unwrap().push(n);
            }
        }
        listener
    });
    (received, task)
}

/// Waits until a packet numbered above `after` arrives; false after `limit`.
async fn hears_after(received: &std::sync::Mutex<Vec<u32>>, after: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if received.lock().unwrap().iter().any(|n| *n > after) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn notice(client: &Signaling, what: &str, wanted: impl Fn(&Notice) -> bool) -> Notice {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match client.notification(wait).await {
            Some(notice) if wanted(&notice) => return notice,
            Some(_) => continue,
            None => panic!("no {what} notice within 5 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moderators_mute_holds_until_a_moderator_lifts_it() {
    let server = start_server("moderation", |_| {}, None).await;
    let mo = server.client("mo", "moderator").await;
    mo.join("hold", "mo").await.unwrap();
    let sam = server.client("sam", "speaker").await;
    sam.join("hold", "sam").await.unwrap();
    let lea = server.client("lea", "listener").await;
    lea.join("hold", "lea").await.unwrap();

    let publisher = Publisher::start(&sam, false, 1).await.expect("sam publishes");
    let listener = Listener::start(&lea, false).await.expect("lea listens");
    let sent = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let talking = talk(publisher, sent.clone(), stop.clone());
    let (received, counting) = heard(listener);
    assert!(hears_after(&received, 0, Duration::from_secs(5)).await, "lea hears sam before any mute");

    // The moderator mutes sam: sam is told, and so is the room.
    mo.request::<Done>(Request::MutePeer { peer: "sam".into() }).await.expect("mute_peer");
    // The room applied the mute before it answered: what sam sends from now on is dropped (one
    // packet of slack: the one being written while the answer came may have been on its way).
    let muted_at = sent.load(Ordering::Relaxed) + 1;
    let by = notice(&sam, "muted", |n| matches!(n, Notice::Muted { .. })).await;
    assert_eq!(by, Notice::Muted { by: "mo".into() });
    let seen = notice(&lea, "peer_muted", |n| matches!(n, Notice::PeerMuted { .. })).await;
    assert_eq!(seen, Notice::PeerMuted { peer: "sam".into(), muted: true, by: "mo".into() });

    // Mute then Unmute, as the page's button would: the pause is taken, the resume refused.
    sam.request::<Done>(Request::Pause { transport: Side::Send }).await.expect("a muted peer may pause");
    let refused = sam.request::<Done>(Request::Resume { transport: Side::Send }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Forbidden), "{refused}");
    assert!(refused.to_string().contains("mo"), "the refusal names the moderator: {refused}");
    // Neither may a non-moderator lift it, nor anyone lift a peer that is not there.
    let refused = lea.request::<Done>(Request::UnmutePeer { peer: "sam".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Forbidden), "{refused}");
    let refused = mo.request::<Done>(Request::UnmutePeer { peer: "ghost".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::NotFound), "{refused}");

    // A second session of sam's (another tab, a reconnect) joins muted too, and stays.
    let sam_again = server.client("sam", "speaker").await;
    let joined = sam_again.join("hold", "sam").await.unwrap();
    assert_eq!(joined.muted_by.as_deref(), Some("mo"), "{joined:?}");
    let listed = joined.peers.iter().find(|p| p.peer == "sam").expect("sam is listed");
    assert_eq!(listed.muted_by.as_deref(), Some("mo"));

    // Two seconds of sam talking while muted: lea gets none of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = sent.load(Ordering::Relaxed);
    assert!(during > muted_at + 50, "sam kept talking while muted ({muted_at}..{during})");
    let leaked: Vec<u32> = received.lock().unwrap().iter().copied().filter(|n| *n > muted_at).collect();
    assert!(leaked.is_empty(), "lea heard {} packets sam sent after the mute: {leaked:?}", leaked.len());

    // The moderator lifts it: sam is told, and lea hears sam again.
    mo.request::<Done>(Request::UnmutePeer { peer: "sam".into() }).await.expect("unmute_peer");
    let unmuted_at = sent.load(Ordering::Relaxed);
    let by = notice(&sam, "unmuted", |n| matches!(n, Notice::Unmuted { .. })).await;
    assert_eq!(by, Notice::Unmuted { by: "mo".into() });
    // The mute was the user's: its other session is unmuted with it.
    let by = notice(&sam_again, "unmuted", |n| matches!(n, Notice::Unmuted { .. })).await;
    assert_eq!(by, Notice::Unmuted { by: "mo".into() });
    sam_again.request::<Done>(Request::Leave).await.unwrap();
    assert!(hears_after(&received, unmuted_at, Duration::from_secs(5)).await, "lea hears sam again after the unmute");
    // sam's own pause and resume work again.
    sam.request::<Done>(Request::Pause { transport: Side::Send }).await.unwrap();
    sam.request::<Done>(Request::Resume { transport: Side::Send }).await.expect("the mute was lifted");

    stop.store(true, Ordering::Relaxed);
    talking.await.unwrap().close().await;
    counting.abort();
    server.server.shutdown().await;
}
