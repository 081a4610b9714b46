//! One WebSocket session per client: authentication at the upgrade, then the protocol of
//! docs/protocol.md, in the types of [`crate::protocol`]. The session owns the peer's place in
//! its room and its two transports, and ends them all when the socket closes, the peer leaves,
//! its token expires without `reauth`, or the server shuts down.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;

use encore_systems::components::ids::{Name, UtteranceId};
use encore_systems::components::input::{FeedbackSignal, Input};

use super::AppState;
use super::rooms::{Moderation, PEER_EVENTS, RoomCommand, RoomLink, Stage};
use super::sessions::{SessionKey, Sessions};
use crate::auth::{AuthError, AuthUser};
use crate::cluster::{Cluster, RelayAddress, Route, TicketGrant};
use crate::metrics::{self, SessionMetric};
use crate::protocol::{
    Answer, BURST_MESSAGES, Done, ErrorBody, ErrorCode, FLOOD_MESSAGES, GoingAwayReason, Joined, MAX_MESSAGE_BYTES,
    MAX_MESSAGES_PER_S, MAX_PREFS_NAMES, Notice, Offered, PROTOCOL_VERSION, Published, Reauthed, Redirect, Request,
    RequestId, RoleChangeReason, Side, UpgradeError, UpgradeRefusal, close, parse_request,
};

/// The WebSocket read buffer (tungstenite's default is 128 KiB; see `ws_upgrade`).
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;
/// A session whose token is about to expire is warned this long before.
const EXPIRY_WARNING: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
pub struct UpgradeQuery {
    ticket: Option<String>,
}

/// `GET /ws`: authenticate (ticket or Authorization header), then hand the socket to a session.
pub async fn ws_upgrade(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<UpgradeQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let authenticated = match cluster_ticket(&app, query.ticket.as_deref()).await {
        Some(redeemed) => redeemed,
        None => app.auth.authenticate_upgrade(&headers, query.ticket.as_deref()).await.map(|user| (user, None)),
    };
    let (user, edge_room) = match authenticated {
        Ok(granted) => granted,
        Err(error) => return upgrade_refused(error),
    };
    let mut session = Session::new(app, user);
    session.edge_room = edge_room;
    // The session's place in the registry is taken now, under the user's quota, and given
    // back if the upgrade never completes.
    let limit = session.app.config.limits.sessions_per_user;
    let Some(registered) = Registered::try_new(&session.app.sessions, &session.user.uid, limit, &session.notices_tx)
    else {
        tracing::info!(uid = %session.user.uid, limit, "session refused: the user's sessions are at the limit");
        crate::metrics::quota_refused(crate::metrics::Quota::Sessions);
        let message = format!("user {} already has {limit} sessions open (limits.sessions_per_user)", session.user.uid);
        let body = UpgradeRefusal { error: UpgradeError { code: ErrorCode::RateLimited, auth_code: None, message } };
        return (axum::http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    };
    upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        // tungstenite zero-fills its read buffer up to this size on every read attempt, and a
        // session polls its socket each time it wakes (every notice it forwards): the default
        // 128 KiB made that memset ~10 % of the server's CPU under load (docs/performance.md).
        // Larger messages still arrive whole; the buffer grows to the frame's length.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| session.run(socket, registered))
}

/// A ticket another node of the cluster issued with a `redirect` (it starts with
/// [`crate::cluster::TICKET_PREFIX`]), redeemed once through Redis; none for any other
/// credential. Redis out means the ticket cannot be checked: HTTP 503
/// `ticket-store-unavailable`, try again.
async fn cluster_ticket(app: &AppState, ticket: Option<&str>) -> Option<Result<(AuthUser, Option<String>), AuthError>> {
    let ticket = ticket.filter(|t| t.starts_with(crate::cluster::TICKET_PREFIX))?;
    let Some(cluster) = &app.cluster else { return Some(Err(AuthError::InvalidTicket)) };
    let result = match cluster.redeem_ticket(ticket).await {
        Ok(Some(grant)) => Ok((grant.user, grant.edge_room)),
        Ok(None) => Err(AuthError::InvalidTicket),
        Err(error) => {
            tracing::warn!(node = %cluster.node_id, %error, code = error.code(), "a cluster ticket could not be redeemed");
            Err(AuthError::TicketStoreUnavailable)
        }
    };
    crate::metrics::auth_verification(crate::metrics::Credential::Ticket, result.as_ref().map(|_| ()));
    Some(result)
}

/// A refused upgrade: the auth layer's status and headers (`WWW-Authenticate`, `Retry-After`),
/// with the protocol's error code in the body beside the auth layer's own.
fn upgrade_refused(error: AuthError) -> Response {
    let code = match error.status().as_u16() {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        503 => ErrorCode::Unavailable,
        _ => ErrorCode::BadRequest,
    };
    let body = UpgradeRefusal {
        error: UpgradeError { code, auth_code: Some(error.code().to_owned()), message: error.to_string() },
    };
    let mut response = error.into_response();
    let json = serde_json::to_vec(&body).unwrap_or_default();
    *response.body_mut() = axum::body::Body::from(json);
    response
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

fn bad(message: impl Into<String>) -> ErrorBody {
    refuse(ErrorCode::BadRequest, message)
}

/// What a request that succeeded answers.
enum Reply {
    Done,
    Joined(Joined),
    Published(Published),
    Offered(Offered),
    Reauthed(Reauthed),
}

impl Reply {
    fn answer(self, id: RequestId) -> Answer {
        match self {
            Reply::Done => Answer::ok(id, &Done {}),
            Reply::Joined(data) => Answer::ok(id, &data),
            Reply::Published(data) => Answer::ok(id, &data),
            Reply::Offered(data) => Answer::ok(id, &data),
            Reply::Reauthed(data) => Answer::ok(id, &data),
        }
    }
}

/// The session's place in a room. Its transports live in the room, on the room's worker.
struct InRoom {
    link: RoomLink,
}

/// A token bucket: `MAX_MESSAGES_PER_S` sustained, `BURST_MESSAGES` at once. Every frame a
/// client sends takes a token, whatever its kind.
struct RateLimit {
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    fn new(now: Instant) -> Self {
        RateLimit { tokens: f64::from(BURST_MESSAGES), refilled: now }
    }

    /// Takes a token; false when there was none (the message is refused).
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.refilled).as_secs_f64() * f64::from(MAX_MESSAGES_PER_S);
        self.refilled = now;
        self.tokens = (self.tokens + refill).min(f64::from(BURST_MESSAGES));
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }

    /// The client kept sending long after it was refused: a flood.
    fn flooded(&self) -> bool {
        self.tokens < -f64::from(FLOOD_MESSAGES)
    }
}

struct Session {
    app: AppState,
    user: AuthUser,
    room: Option<InRoom>,
    notices_tx: mpsc::Sender<Notice>,
    notices: mpsc::Receiver<Notice>,
    rate: RateLimit,
    expiry_warned: bool,
    /// The room an origin sent this session here to hear, served here as its edge (from the
    /// cluster ticket it came with).
    edge_room: Option<String>,
}

/// How a session ended, for the close frame.
enum End {
    Closed,
    Expired,
    Removed,
    GoingAway(GoingAwayReason),
    Flooded,
    TooBig,
}

impl End {
    fn close_frame(&self) -> (u16, &'static str) {
        match self {
            End::Closed => (close::NORMAL, "bye"),
            End::Expired => (close::EXPIRED, "session expired: send reauth before the token expires"),
            End::Removed => (close::REMOVED, "removed by a moderator"),
            End::GoingAway(_) => (close::GOING_AWAY, "server shutting down"),
            End::Flooded => (close::POLICY, "too many messages"),
            End::TooBig => (close::TOO_BIG, "message over 64 KiB"),
        }
    }

    /// The `reason` of `encore_sessions_closed_total`.
    fn as_str(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Expired => "expired",
            End::Removed => "removed",
            End::GoingAway(GoingAwayReason::DrainTimeout) => "drain_timeout",
            End::GoingAway(GoingAwayReason::Shutdown) => "shutdown",
            End::Flooded => "flooded",
            End::TooBig => "too_big",
        }
    }
}

/// A read error that is the client's message being over the size limit.
fn too_big(error: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = error.source();
    while let Some(error) = source {
        if let Some(tungstenite::Error::Capacity(_)) = error.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

use tokio_tungstenite::tungstenite;

impl Session {
    fn new(app: AppState, mut user: AuthUser) -> Self {
        let (notices_tx, notices) = mpsc::channel(PEER_EVENTS);
        user.roles = app.sessions.account_roles(&user.uid, &user.roles, user.issued_at);
        Session {
            app,
            user,
            room: None,
            notices_tx,
            notices,
            rate: RateLimit::new(Instant::now()),
            expiry_warned: false,
            edge_room: None,
        }
    }

    fn deadline_s(&self) -> i64 {
        self.app.auth.session_deadline_s(&self.user)
    }

    /// Time until the session's deadline, by the auth clock.
    fn until_deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_s().saturating_sub(self.app.auth.now_s()).max(0) as u64)
    }

    async fn run(mut self, socket: WebSocket, registered: Registered) {
        let _registered = registered;
        let session_metric = SessionMetric::open();
        let (mut sink, mut stream) = socket.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Message>(512);
        let writer = tokio::spawn(async move {
            while let Some(message) = out_rx.recv().await {
                let closing = matches!(message, Message::Close(_));
                if sink.send(message).await.is_err() || closing {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let out = Outbox { tx: out_tx };
        out.notice(&Notice::Welcome {
            protocol: PROTOCOL_VERSION,
            uid: self.user.uid.clone(),
            roles: self.user.roles.clone(),
            session_expires_at: self.deadline_s(),
        });
        tracing::info!(uid = %self.user.uid, roles = ?self.user.roles, "session opened");
        let mut shutdown = self.app.shutdown.subscribe();
        // The deadline is by the auth clock, which a test may move: look at it every second.
        let mut recheck = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            let until = self.until_deadline();
            let warn_in = until.saturating_sub(EXPIRY_WARNING);
            tokio::select! {
                message = stream.next() => {
                    let message = match message {
                        Some(Ok(Message::Close(_))) | None => break End::Closed,
                        Some(Err(error)) if too_big(&error) => break End::TooBig,
                        Some(Err(_)) => break End::Closed,
                        Some(Ok(message)) => message,
                    };
                    // Every frame counts against the rate, pings and binary ones included.
                    if !self.rate.take(Instant::now()) {
                        metrics::signaling_request("unread", Some(ErrorCode::RateLimited));
                        out.answer(Answer::refused(None, refuse(ErrorCode::RateLimited, "more than 50 messages a second")));
                        if self.rate.flooded() {
                            break End::Flooded;
                        }
                        continue;
                    }
                    match message {
                        Message::Text(text) => {
                            if let Some(end) = self.handle_text(&text, &out).await {
                                break end;
                            }
                        }
                        Message::Binary(_) => {
                            metrics::signaling_request("binary", Some(ErrorCode::BadRequest));
                            out.answer(Answer::refused(None, bad("messages are JSON text")));
                        }
                        // Pings are answered by the WebSocket layer; pongs need nothing.
                        _ => {}
                    }
                }
                Some(notice) = self.notices.recv() => {
                    // An admin changed this account's role: the session's own view follows.
                    if let Notice::RoleChanged { peer, reason: RoleChangeReason::Account, .. } = &notice
                        && self.room.as_ref().is_some_and(|r| r.link.peer.as_str() == peer)
                    {
                        self.refresh_account_roles();
                    }
                    if let Notice::Error { code: ErrorCode::TransportFailed, transport, .. } = &notice {
                        tracing::warn!(uid = %self.user.uid, transport = ?transport, "transport failed");
                    }
                    let removed = matches!(notice, Notice::Removed { .. });
                    out.notice(&notice);
                    if removed {
                        break End::Removed;
                    }
                }
                _ = tokio::time::sleep(warn_in), if !self.expiry_warned && warn_in > Duration::ZERO => {
                    self.expiry_warned = true;
                    out.notice(&Notice::SessionExpiring { expires_at: self.deadline_s() });
                }
                _ = tokio::time::sleep(until) => {
                    if self.until_deadline().is_zero() {
                        break End::Expired;
                    }
                }
                _ = recheck.tick() => {
                    if self.until_deadline().is_zero() {
                        break End::Expired;
                    }
                    if !self.expiry_warned && self.until_deadline() <= EXPIRY_WARNING {
                        self.expiry_warned = true;
                        out.notice(&Notice::SessionExpiring { expires_at: self.deadline_s() });
                    }
                }
                reason = shutdown.recv() => break End::GoingAway(reason.unwrap_or(GoingAwayReason::Shutdown)),
            }
        };
        if let End::GoingAway(reason) = end {
            out.notice(&Notice::GoingAway { reason });
        }
        let (code, reason) = end.close_frame();
        session_metric.closed(end.as_str());
        tracing::info!(uid = %self.user.uid, code, reason, "session closing");
        self.leave().await;
        out.close(code, reason).await;
        drop(out);
        // The closing handshake: read on until the client's own Close (or a little while), so
        // that unread input does not make the socket reset before the client reads our Close.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    }

    async fn handle_text(&mut self, text: &str, out: &Outbox) -> Option<End> {
        let (id, request) = match parse_request(text) {
            Ok(parsed) => parsed,
            Err(unreadable) => {
                metrics::signaling_request("unreadable", Some(ErrorCode::BadRequest));
                out.answer(Answer::refused(unreadable.id, bad(unreadable.message)));
                return None;
            }
        };
        let leaving = matches!(request, Request::Leave);
        let kind = request.kind();
        let result = self.request(request).await;
        metrics::signaling_request(kind, result.as_ref().err().map(|error| error.code));
        let left = leaving && result.is_ok();
        out.answer(match result {
            Ok(reply) => reply.answer(id),
            Err(error) => Answer::refused(Some(id), error),
        });
        left.then_some(End::Closed)
    }

    fn in_room(&self) -> Result<&InRoom, ErrorBody> {
        self.room.as_ref().ok_or_else(|| refuse(ErrorCode::Conflict, "join a room first"))
    }

    async fn request(&mut self, request: Request) -> Result<Reply, ErrorBody> {
        match request {
            Request::Ping => Ok(Reply::Done),
            Request::Join { room, name } => self.join(room, name).await.map(Reply::Joined),
            // In a room, the room decides who may publish: its stage may have given or taken
            // the right. Outside one, the account's role answers.
            Request::Publish { offer } => {
                if self.room.is_none() && !self.user.may_publish() {
                    let roles = roles_text(&self.user.roles);
                    return Err(refuse(ErrorCode::Forbidden, format!("role {roles} may not publish")));
                }
                let link = &self.in_room()?.link;
                let peer = link.peer.clone();
                let answer = link.ask_for(|reply| RoomCommand::Publish { peer, offer, reply }).await?;
                Ok(Reply::Published(Published { answer }))
            }
            Request::Unpublish => self.close_transport(Side::Send).await,
            Request::Listen { video } => {
                let link = &self.in_room()?.link;
                let peer = link.peer.clone();
                let offer = link.ask_for(|reply| RoomCommand::Listen { peer, video, reply }).await?;
                Ok(Reply::Offered(Offered { offer }))
            }
            Request::Unlisten => self.close_transport(Side::Recv).await,
            Request::Answer { answer } => {
                let link = &self.in_room()?.link;
                let peer = link.peer.clone();
                link.ask(|reply| RoomCommand::Answer { peer, answer, reply }).await?;
                Ok(Reply::Done)
            }
            Request::Candidate { transport: side, candidate } => {
                // The server is ICE-lite: it learns the client's addresses from the client's
                // checks, so a trickled candidate is checked and needs nothing more.
                if candidate.as_ref().is_some_and(|c| c.candidate.len() > 1024) {
                    return Err(bad("a candidate is at most 1024 characters"));
                }
                let link = &self.in_room()?.link;
                let peer = link.peer.clone();
                link.ask(|reply| RoomCommand::HasTransport { peer, side, reply }).await?;
                Ok(Reply::Done)
            }
            Request::Pause { transport } => self.pause(transport, true).await,
            Request::Resume { transport } => self.pause(transport, false).await,
            Request::Prefs { follow, mute } => {
                if follow.len() > MAX_PREFS_NAMES || mute.len() > MAX_PREFS_NAMES {
                    return Err(bad(format!("`follow` and `mute` list at most {MAX_PREFS_NAMES} peer names")));
                }
                let names = |list: Vec<String>| list.into_iter().map(Name::from).collect();
                let link = &self.in_room()?.link;
                link.input(Input::Prefs { peer: link.peer.clone(), follow: names(follow), mute: names(mute) });
                Ok(Reply::Done)
            }
            Request::Feedback { signal, utterance } => self.feedback(signal, utterance).await,
            Request::Reauth { token } => {
                let user = self
                    .app
                    .auth
                    .reauthenticate(&self.user, &token)
                    .await
                    .map_err(|e| refuse(ErrorCode::Unauthorized, e.to_string()))?;
                self.user = user;
                self.refresh_account_roles();
                self.expiry_warned = false;
                Ok(Reply::Reauthed(Reauthed { session_expires_at: self.deadline_s() }))
            }
            Request::MutePeer { peer } => self.moderate(Moderation::Mute, peer).await,
            Request::UnmutePeer { peer } => self.moderate(Moderation::Unmute, peer).await,
            Request::RemovePeer { peer } => self.moderate(Moderation::Remove, peer).await,
            Request::RaiseHand => self.stage(Stage::RaiseHand).await,
            Request::LowerHand => self.stage(Stage::LowerHand).await,
            Request::AnswerInvite { accept } => self.stage(Stage::AnswerInvite { accept }).await,
            Request::InviteToSpeak { peer } => {
                self.may_moderate()?;
                self.stage(Stage::Invite { peer: Name::from(peer) }).await
            }
            Request::MoveToAudience { peer } => {
                self.may_moderate()?;
                self.stage(Stage::MoveToAudience { peer: Name::from(peer) }).await
            }
            Request::Leave => {
                self.in_room()?;
                Ok(Reply::Done)
            }
        }
    }

    async fn join(&mut self, room: String, name: Option<String>) -> Result<Joined, ErrorBody> {
        if self.room.is_some() {
            return Err(refuse(ErrorCode::Conflict, "already in a room"));
        }
        if room.is_empty() || room.len() > 64 || !room.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return Err(bad("`room` must be 1 to 64 characters of A-Z, a-z, 0-9, _ . -"));
        }
        let edge = match self.route(&room).await? {
            Some(origin) => {
                self.app.rooms.open_edge(&room, origin).await.map_err(|e| refuse(e.code(), e.to_string()))?
            }
            None => None,
        };
        let name = name.unwrap_or_else(|| self.user.uid.clone());
        let (link, joined) = self
            .app
            .rooms
            .join_from(
                &room,
                &name,
                Some(self.user.uid.clone()),
                self.user.roles.clone(),
                self.notices_tx.clone(),
                edge,
            )
            .await
            .map_err(|e| refuse(e.code(), e.to_string()))?;
        let peer = link.peer.to_string();
        self.room = Some(InRoom { link });
        tracing::info!(uid = %self.user.uid, room, peer, roles = ?self.user.roles, "peer joined");
        Ok(Joined {
            room,
            peer,
            roles: self.user.roles.clone(),
            ice_servers: self.app.config.media.ice_servers.clone(),
            peers: joined.peers,
            muted_by: joined.muted_by,
        })
    }

    /// In a cluster, a room that does not run here may live on another node: the join is then
    /// answered `redirect`, with that node's URL and a ticket valid there. When the directory
    /// cannot be reached, the room is made here (docs/scaling.md, "Failure modes").
    ///
    /// With relays (docs/scaling.md, "One room across nodes"): a listener's join of a room
    /// that runs here with `cluster.edge_after_peers` peers or more is sent to an edge node;
    /// a join that an origin sent here, or of a room served here as an edge, is served here:
    /// the origin's relay address is returned when the edge's copy is still to be made.
    async fn route(&self, room: &str) -> Result<Option<RelayAddress>, ErrorBody> {
        let Some(cluster) = &self.app.cluster else { return Ok(None) };
        let listener_only = !self.user.may_publish() && !self.user.may_moderate();
        match self.app.rooms.kind(room) {
            Some(false) => return self.to_edge(cluster, room, listener_only).await.map(|()| None),
            Some(true) if listener_only => return Ok(None),
            // A speaker or moderator reached an edge's copy: it goes to the origin below.
            Some(true) => {}
            None => {}
        }
        if listener_only && self.edge_room.as_deref() == Some(room) && self.app.rooms.relay().is_some() {
            match cluster.owner_entry(room).await {
                Ok(Some(origin)) if origin.id != cluster.node_id => {
                    if let Some(relay) = origin.relay {
                        return Ok(Some(relay));
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(room, node = %cluster.node_id, %error, code = error.code(),
                        "the room directory is unreachable: the edge cannot find the room's origin");
                    return Err(refuse(ErrorCode::Unavailable, "the room directory is unreachable; try again"));
                }
            }
        }
        let (_, load) = self.app.rooms.load();
        let node = match cluster.route(room, load).await {
            Ok(Route::Local) => return Ok(None),
            Ok(Route::Remote(node)) => node,
            Err(error) => {
                tracing::warn!(room, node = %cluster.node_id, %error, code = error.code(),
                    "the room directory is unreachable: the room is placed here");
                return Ok(None);
            }
        };
        let grant = TicketGrant { user: self.user.clone(), edge_room: None };
        let ticket = match cluster.issue_ticket(&grant, crate::auth::WS_TICKET_TTL).await {
            Ok(ticket) => ticket,
            Err(error) => {
                tracing::warn!(room, node = %cluster.node_id, %error, code = error.code(),
                    "no ticket for a redirect: the room is placed here");
                return Ok(None);
            }
        };
        tracing::info!(uid = %self.user.uid, room, to = %node.id, "join redirected");
        Err(ErrorBody::redirect(
            format!("room {room} lives on node {}; join it there", node.id),
            Redirect { url: node.url, node: node.id, ticket, expires_in: crate::auth::WS_TICKET_TTL.as_secs() },
        ))
    }

    /// A listener's join of a large room that runs here (its origin) goes to an edge node:
    /// answered `redirect` with a ticket naming the room, so the edge serves it there. Any
    /// failure keeps the listener here.
    async fn to_edge(&self, cluster: &Cluster, room: &str, listener_only: bool) -> Result<(), ErrorBody> {
        let Some(hub) = self.app.rooms.relay() else { return Ok(()) };
        let threshold = hub.edge_after_peers;
        if !listener_only || threshold == 0 || self.app.rooms.peers(room) < threshold {
            return Ok(());
        }
        let edge = match cluster.edge_node(&hub.sent_to(None)).await {
            Ok(Some(edge)) => edge,
            Ok(None) => return Ok(()),
            Err(error) => {
                tracing::warn!(room, %error, code = error.code(), "no edge for a listener (directory unreachable): it stays");
                return Ok(());
            }
        };
        let grant = TicketGrant { user: self.user.clone(), edge_room: Some(room.to_owned()) };
        let ticket = match cluster.issue_ticket(&grant, crate::auth::WS_TICKET_TTL).await {
            Ok(ticket) => ticket,
            Err(error) => {
                tracing::warn!(room, %error, code = error.code(), "no ticket for an edge: the listener stays");
                return Ok(());
            }
        };
        hub.sent_to(Some(&edge.id));
        crate::metrics::listener_sent_to_edge();
        tracing::info!(uid = %self.user.uid, room, to = %edge.id, "listener sent to an edge");
        Err(ErrorBody::redirect(
            format!("room {room} is large: node {} serves its listeners as an edge; join it there", edge.id),
            Redirect { url: edge.url, node: edge.id, ticket, expires_in: crate::auth::WS_TICKET_TTL.as_secs() },
        ))
    }

    async fn pause(&self, side: Side, paused: bool) -> Result<Reply, ErrorBody> {
        let link = &self.in_room()?.link;
        let peer = link.peer.clone();
        link.ask(|reply| RoomCommand::Pause { peer, side, paused, reply }).await?;
        Ok(Reply::Done)
    }

    async fn close_transport(&self, side: Side) -> Result<Reply, ErrorBody> {
        let link = &self.in_room()?.link;
        let peer = link.peer.clone();
        link.ask(|reply| RoomCommand::CloseTransport { peer, side, reply }).await?;
        Ok(Reply::Done)
    }

    async fn feedback(&self, signal: FeedbackSignal, utterance: Option<UtteranceId>) -> Result<Reply, ErrorBody> {
        let link = &self.in_room()?.link;
        let peer = link.peer.clone();
        link.ask(|reply| RoomCommand::Feedback { at: Instant::now(), peer, utterance, signal, reply }).await?;
        Ok(Reply::Done)
    }

    fn may_moderate(&self) -> Result<(), ErrorBody> {
        if self.user.may_moderate() {
            return Ok(());
        }
        let roles = roles_text(&self.user.roles);
        Err(refuse(ErrorCode::Forbidden, format!("role {roles} may not moderate")))
    }

    async fn stage(&self, action: Stage) -> Result<Reply, ErrorBody> {
        let link = &self.in_room()?.link;
        let peer = link.peer.clone();
        link.ask(|reply| RoomCommand::Stage { at: Instant::now(), peer, action, reply }).await?;
        Ok(Reply::Done)
    }

    /// The account's roles now: the token's, unless an admin changed them since it was issued.
    fn refresh_account_roles(&mut self) {
        let user = &self.user;
        self.user.roles = self.app.sessions.account_roles(&user.uid, &user.roles, user.issued_at);
    }

    async fn moderate(&self, action: Moderation, peer: String) -> Result<Reply, ErrorBody> {
        self.may_moderate()?;
        let link = &self.in_room()?.link;
        let by = link.peer.clone();
        link.ask(|reply| RoomCommand::Moderate { action, peer: Name::from(peer), by, reply }).await?;
        Ok(Reply::Done)
    }

    /// Leaves the room: the room closes the peer's transports with it.
    async fn leave(&mut self) {
        if let Some(in_room) = self.room.take() {
            self.app.rooms.leave(&in_room.link);
            tracing::info!(uid = %self.user.uid, room = %in_room.link.room, peer = %in_room.link.peer, "peer left");
        }
    }
}

/// A session's place in the registry, given back when the session ends, however it ends.
struct Registered {
    sessions: std::sync::Arc<Sessions>,
    key: SessionKey,
}

impl Registered {
    /// A place for a session of `uid`, unless it holds `limit` already (0: no limit).
    fn try_new(
        sessions: &std::sync::Arc<Sessions>,
        uid: &str,
        limit: usize,
        notices: &mpsc::Sender<Notice>,
    ) -> Option<Self> {
        let key = sessions.try_open(uid, limit, notices.clone())?;
        Some(Registered { sessions: sessions.clone(), key })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.sessions.close(self.key);
    }
}

fn roles_text(roles: &[encore_systems::components::ids::Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
}

/// The session's outgoing messages: queued, never awaited, so a slow client cannot stall it.
struct Outbox {
    tx: mpsc::Sender<Message>,
}

impl Outbox {
    fn text(&self, text: String) {
        let _ = self.tx.try_send(Message::Text(Utf8Bytes::from(text)));
    }

    fn notice(&self, notice: &Notice) {
        metrics::signaling_notice(notice.kind());
        match serde_json::to_string(notice) {
            Ok(text) => self.text(text),
            Err(error) => tracing::error!(%error, kind = notice.kind(), "a notice does not serialise"),
        }
    }

    fn answer(&self, answer: Answer) {
        match serde_json::to_string(&answer) {
            Ok(text) => self.text(text),
            Err(error) => tracing::error!(%error, "an answer does not serialise"),
        }
    }

    /// The Close frame always goes out, after what is queued (waiting for room if need be).
    async fn close(&self, code: u16, reason: &'static str) {
        let frame = Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }));
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tx.send(frame)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_sustained_rate_then_calls_it_a_flood() {
        let t0 = Instant::now();
        let mut rate = RateLimit::new(t0);
        let allowed = (0..BURST_MESSAGES + 10).filter(|_| rate.take(t0)).count();
        assert_eq!(allowed as u32, BURST_MESSAGES, "a burst of {BURST_MESSAGES} at once");
        // A second later, 50 more tokens.
        let t1 = t0 + Duration::from_secs(1);
        let refused_so_far = 10.0;
        let allowed = (0..100).filter(|_| rate.take(t1)).count();
        assert_eq!(allowed as f64, f64::from(MAX_MESSAGES_PER_S) - refused_so_far);
        assert!(rate.flooded(), "it kept sending after being refused");
    }
}
