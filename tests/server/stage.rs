//! Roles that change live, over a real server with real WebRTC peers: a listener raises a
//! hand, a moderator invites it, it accepts and publishes, the moderator moves it back to the
//! audience and its publishing ends and is refused; an admin's change of an account's role
//! reaches the user's room at once, and a token issued before the change cannot bring the old
//! role back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use encore::client::http::put;
use encore::client::media::Publisher;
use encore::client::signaling::Signaling;
use encore::components::ids::Role;
use encore::protocol::{Done, ErrorCode, Notice, Request, RoleChangeReason};

use super::support::start_server;

/// A client's notices: waiting for one keeps the others, so that a later wait finds a notice
/// that came before the one waited for.
struct Watch {
    client: Arc<Signaling>,
    seen: Vec<Notice>,
}

impl Watch {
    fn new(client: &Arc<Signaling>) -> Self {
        Watch { client: client.clone(), seen: Vec::new() }
    }

    /// The first notice, seen or to come, that `pick` accepts (taken out of what was seen).
    async fn until<T>(&mut self, what: &str, mut pick: impl FnMut(&Notice) -> Option<T>) -> T {
        if let Some((i, found)) = self.seen.iter().enumerate().find_map(|(i, n)| pick(n).map(|f| (i, f))) {
            self.seen.remove(i);
            return found;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(notice) = self.client.notification(left).await else {
                panic!("no {what} within 10 s; seen {:?}", self.seen);
            };
            match pick(&notice) {
                Some(found) => return found,
                None => self.seen.push(notice),
            }
        }
    }
}

async fn refused(client: &Signaling, request: Request) -> ErrorCode {
    let error = client.request::<Done>(request).await.expect_err("refused");
    error.refusal().unwrap_or_else(|| panic!("not a refusal: {error}"))
}

/// A publish offer goes as far as the room's answer: forbidden, or a transport.
async fn try_publish(client: &Arc<Signaling>) -> Result<Publisher, ErrorCode> {
    Publisher::start(client, false, 7).await.map_err(|e| e.refusal().unwrap_or_else(|| panic!("{e}")))
}

/// A few packets, so that the server opens the track (and says the peer publishes).
async fn talk(publisher: &mut Publisher) {
    for i in 0..10u64 {
        let at = Duration::from_millis(20 * i);
        publisher.send_audio(at, Bytes::from_static(&[0x55; 80]), 20, true).await.expect("sending audio");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raise_hand_invite_accept_publish_then_moved_to_the_audience_and_refused() {
    let server = start_server("stage", |_| {}, None).await;
    let mo = server.client("mo", "moderator").await;
    mo.join("stage", "mo").await.unwrap();
    let bob = server.client("bob", "listener").await;
    bob.join("stage", "bob").await.unwrap();
    let lea = server.client("lea", "listener").await;
    lea.join("stage", "lea").await.unwrap();
    let (mut mo_w, mut bob_w, mut lea_w) = (Watch::new(&mo), Watch::new(&bob), Watch::new(&lea));

    // A listener may not publish, nor invite; a hand goes up once, however often raised.
    assert_eq!(try_publish(&bob).await.err(), Some(ErrorCode::Forbidden));
    bob.request::<Done>(Request::RaiseHand).await.unwrap();
    bob.request::<Done>(Request::RaiseHand).await.unwrap();
    let hands = mo_w
        .until("hands", |n| match n {
            Notice::Hands { raised } => Some(raised.clone()),
            _ => None,
        })
        .await;
    assert_eq!(hands, ["bob"]);
    assert_eq!(refused(&lea, Request::InviteToSpeak { peer: "bob".into() }).await, ErrorCode::Forbidden);
    assert_eq!(refused(&mo, Request::InviteToSpeak { peer: "ghost".into() }).await, ErrorCode::NotFound);
    assert_eq!(refused(&bob, Request::AnswerInvite { accept: true }).await, ErrorCode::Conflict, "not invited");

    // Invited, bob accepts: he may speak in this room, his hand goes down, everyone hears of it.
    mo.request::<Done>(Request::InviteToSpeak { peer: "bob".into() }).await.unwrap();
    let by = bob_w
        .until("invited", |n| match n {
            Notice::Invited { by } => Some(by.clone()),
            _ => None,
        })
        .await;
    assert_eq!(by, "mo");
    bob.request::<Done>(Request::AnswerInvite { accept: true }).await.unwrap();
    let (roles, reason) = lea_w
        .until("role_changed", |n| match n {
            Notice::RoleChanged { peer, roles, reason } if peer == "bob" => Some((roles.clone(), *reason)),
            _ => None,
        })
        .await;
    assert_eq!((roles, reason), (vec![Role::Speaker, Role::Listener], RoleChangeReason::Invited));
    // Raised first, then down when he became a speaker.
    let hands = lea_w
        .until("hands", |n| match n {
            Notice::Hands { raised } => Some(raised.clone()),
            _ => None,
        })
        .await;
    assert_eq!(hands, ["bob"]);
    let hands = lea_w
        .until("hands lowered", |n| match n {
            Notice::Hands { raised } => Some(raised.clone()),
            _ => None,
        })
        .await;
    assert!(hands.is_empty(), "{hands:?}");
    assert_eq!(refused(&mo, Request::InviteToSpeak { peer: "bob".into() }).await, ErrorCode::Conflict);
    assert_eq!(refused(&bob, Request::RaiseHand).await, ErrorCode::Conflict);

    // He publishes, over a real connection.
    let mut publisher = try_publish(&bob).await.expect("an invited listener publishes");
    talk(&mut publisher).await;
    lea_w
        .until("publishing", |n| match n {
            Notice::Publishing { peer, publishing: true } if peer == "bob" => Some(()),
            _ => None,
        })
        .await;

    // Moved back to the audience: his transport closes now, and publishing again is refused.
    mo.request::<Done>(Request::MoveToAudience { peer: "bob".into() }).await.unwrap();
    lea_w
        .until("publishing stopped", |n| match n {
            Notice::Publishing { peer, publishing: false } if peer == "bob" => Some(()),
            _ => None,
        })
        .await;
    let (roles, reason) = bob_w
        .until("role_changed", |n| match n {
            Notice::RoleChanged { peer, roles, reason: RoleChangeReason::MovedToAudience } if peer == "bob" => {
                Some((roles.clone(), RoleChangeReason::MovedToAudience))
            }
            _ => None,
        })
        .await;
    assert_eq!(roles, vec![Role::Listener], "{reason:?}");
    publisher.close().await;
    assert_eq!(try_publish(&bob).await.err(), Some(ErrorCode::Forbidden));

    // A speaker moved to the audience is refused too; an admin may always speak.
    let sam = server.client("sam", "speaker").await;
    sam.join("stage", "sam").await.unwrap();
    mo.request::<Done>(Request::MoveToAudience { peer: "sam".into() }).await.unwrap();
    assert_eq!(try_publish(&sam).await.err(), Some(ErrorCode::Forbidden));
    let ada = server.client("ada", "admin").await;
    ada.join("stage", "ada").await.unwrap();
    assert_eq!(refused(&mo, Request::MoveToAudience { peer: "ada".into() }).await, ErrorCode::Forbidden);

    // Declining tells the moderator who invited.
    mo.request::<Done>(Request::InviteToSpeak { peer: "lea".into() }).await.unwrap();
    lea.request::<Done>(Request::AnswerInvite { accept: false }).await.unwrap();
    let declined = mo_w
        .until("invite_declined", |n| match n {
            Notice::InviteDeclined { peer } => Some(peer.clone()),
            _ => None,
        })
        .await;
    assert_eq!(declined, "lea");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admins_role_change_reaches_the_room_at_once_and_old_tokens_keep_it() {
    let server = start_server("stage-account", |_| {}, None).await;
    let old_token = server.token("dave", "speaker").await;
    let dave = Arc::new(
        Signaling::connect(&server.tls, &server.base, Some(&old_token), None).await.expect("a WebSocket session"),
    );
    dave.join("account", "dave").await.unwrap();
    let lea = server.client("lea", "listener").await;
    lea.join("account", "lea").await.unwrap();
    let (mut dave_w, mut lea_w) = (Watch::new(&dave), Watch::new(&lea));
    let mut publisher = try_publish(&dave).await.expect("a speaker publishes");
    talk(&mut publisher).await;
    lea_w
        .until("publishing", |n| match n {
            Notice::Publishing { peer, publishing: true } if peer == "dave" => Some(()),
            _ => None,
        })
        .await;

    // The admin demotes dave's account: the room applies it now, without waiting for a token.
    let admin = server.token("ada", "admin").await;
    let url = format!("{}/api/users/dave/role", server.base);
    let (status, body) = put(&server.tls, &url, Some(&admin), json!({"role": "listener"})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let roles = dave_w
        .until("role_changed", |n| match n {
            Notice::RoleChanged { peer, roles, reason: RoleChangeReason::Account } if peer == "dave" => {
                Some(roles.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(roles, vec![Role::Listener]);
    lea_w
        .until("publishing stopped", |n| match n {
            Notice::Publishing { peer, publishing: false } if peer == "dave" => Some(()),
            _ => None,
        })
        .await;
    publisher.close().await;
    assert_eq!(try_publish(&dave).await.err(), Some(ErrorCode::Forbidden));

    // His old token, presented again, does not bring the speaker role back, in this session or
    // a new one.
    dave.request::<encore::protocol::Reauthed>(Request::Reauth { token: old_token.clone() }).await.unwrap();
    assert_eq!(try_publish(&dave).await.err(), Some(ErrorCode::Forbidden));
    let again = Arc::new(
        Signaling::connect(&server.tls, &server.base, Some(&old_token), None).await.expect("a WebSocket session"),
    );
    let joined = again.join("account", "dave2").await.unwrap();
    assert_eq!(joined.roles, vec![Role::Listener]);

    // Promoted back, he may publish again.
    let (status, _) = put(&server.tls, &url, Some(&admin), json!({"role": "speaker"})).await.unwrap();
    assert_eq!(status, 200);
    dave_w
        .until("role_changed", |n| match n {
            Notice::RoleChanged { peer, roles, .. } if peer == "dave" && roles.contains(&Role::Speaker) => Some(()),
            _ => None,
        })
        .await;
    let publisher = try_publish(&dave).await.expect("promoted again, he publishes");
    publisher.close().await;
    server.server.shutdown().await;
}

/// A quiet room sleeps until its next stats tick; a join (a command, not yet an engine input)
/// must wake it at once, not wait for that tick (it once waited up to a second). The bound is
/// loose, for a loaded machine: a join takes a few milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_to_a_sleeping_room_is_answered_at_once() {
    let server = start_server("stage-wake", |_| {}, None).await;
    let first = server.client("ann", "listener").await;
    first.join("sleepy", "ann").await.unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        // Long enough for the room to fall asleep between joins.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let client = server.client(&format!("u{i}"), "listener").await;
        let started = Instant::now();
        client.join("sleepy", &format!("u{i}")).await.unwrap();
        slowest = slowest.max(started.elapsed());
    }
    println!("joins to a sleeping room: slowest answered in {slowest:?}");
    assert!(slowest < Duration::from_millis(400), "a join waited {slowest:?} for a sleeping room");
    server.server.shutdown().await;
}
