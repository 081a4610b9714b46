//! One WebSocket session per client: authentication at the upgrade, then the JSON protocol of
//! docs/protocol.md. The session owns the peer's place in its room and its two transports, and
//! ends them all when the socket closes, the peer leaves, its token expires without `reauth`, or
//! the server shuts down.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use encore_systems::components::ids::{Name, UtteranceId};
use encore_systems::components::input::{FeedbackSignal, Input};

use super::AppState;
use super::rooms::{Notice, PEER_EVENTS, RoomCommand, RoomError, RoomLink};
use super::transport::{RecvTransport, SendTransport, Side, TransportEvent, parse_candidate};
use crate::auth::AuthUser;

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message a client may send.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The WebSocket read buffer (tungstenite's default is 128 KiB; see `ws_upgrade`).
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Messages a client may send per second (a burst of twice that is tolerated).
pub const MAX_MESSAGES_PER_S: u32 = 50;
/// A session whose token is about to expire is warned this long before.
const EXPIRY_WARNING: Duration = Duration::from_secs(60);
/// WebSocket close code for an expired session.
pub const CLOSE_EXPIRED: u16 = 4001;
pub const CLOSE_REMOVED: u16 = 4003;
pub const CLOSE_SHUTDOWN: u16 = 1001;

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
    let user = match app.auth.authenticate_upgrade(&headers, query.ticket.as_deref()).await {
        Ok(user) => user,
        Err(error) => return error.into_response(),
    };
    upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        // tungstenite zero-fills its read buffer up to this size on every read attempt, and a
        // session polls its socket each time it wakes (every notice it forwards): the default
        // 128 KiB made that memset ~10 % of the server's CPU under load (docs/performance.md).
        // Larger messages still arrive whole; the buffer grows to the frame's length.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| Session::new(app, user).run(socket))
}

/// A protocol-level failure answered to a request.
#[derive(Debug)]
struct Refusal {
    code: &'static str,
    message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

fn bad(message: impl Into<String>) -> Refusal {
    refuse("bad_request", message)
}

struct Joined {
    link: RoomLink,
    send: Option<SendTransport>,
    recv: Option<RecvTransport>,
}

struct Session {
    app: AppState,
    user: AuthUser,
    joined: Option<Joined>,
    notices_tx: mpsc::Sender<Notice>,
    notices: mpsc::Receiver<Notice>,
    transport_tx: mpsc::Sender<TransportEvent>,
    transport_events: mpsc::Receiver<TransportEvent>,
    /// Token bucket for the message rate.
    tokens: f64,
    refilled: Instant,
    expiry_warned: bool,
}

/// How a session ended, for the close frame.
enum End {
    Closed,
    Expired,
    Removed,
    Shutdown,
    Flooded,
}

impl Session {
    fn new(app: AppState, user: AuthUser) -> Self {
        let (notices_tx, notices) = mpsc::channel(PEER_EVENTS);
        let (transport_tx, transport_events) = mpsc::channel(256);
        Session {
            app,
            user,
            joined: None,
            notices_tx,
            notices,
            transport_tx,
            transport_events,
            tokens: f64::from(MAX_MESSAGES_PER_S * 2),
            refilled: Instant::now(),
            expiry_warned: false,
        }
    }

    fn deadline_s(&self) -> i64 {
        self.app.auth.session_deadline_s(&self.user)
    }

    /// Time until the session's deadline, by the auth clock.
    fn until_deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_s().saturating_sub(self.app.auth.now_s()).max(0) as u64)
    }

    async fn run(mut self, socket: WebSocket) {
        self.app.sessions.send_modify(|open| *open += 1);
        let _counted = SessionCount(self.app.sessions.clone());
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
        out.json(json!({
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "uid": self.user.uid,
            "roles": self.user.roles,
            "session_expires_at": self.deadline_s(),
        }));
        tracing::info!(uid = %self.user.uid, roles = ?self.user.roles, "session opened");
        let mut shutdown = self.app.shutdown.subscribe();
        // The deadline is by the auth clock, which a test may move: look at it every second.
        let mut recheck = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            let until = self.until_deadline();
            let warn_in = until.saturating_sub(EXPIRY_WARNING);
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        if !self.take_token() {
                            out.reply(&Value::Null, Err(refuse("rate_limited", "more than 50 messages a second")));
                            if self.tokens < -f64::from(MAX_MESSAGES_PER_S) {
                                break End::Flooded;
                            }
                            continue;
                        }
                        if let Some(end) = self.handle_text(&text, &out).await {
                            break end;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => out.reply(&Value::Null, Err(bad("messages are JSON text"))),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break End::Closed,
                    Some(Ok(_)) => {}
                },
                Some(notice) = self.notices.recv() => {
                    let removed = matches!(notice, Notice::Removed { .. });
                    if matches!(notice, Notice::Muted { .. })
                        && let Some(send) = self.joined.as_ref().and_then(|j| j.send.as_ref())
                    {
                        send.pause(true);
                    }
                    out.json(serde_json::to_value(&notice).unwrap_or(Value::Null));
                    if removed {
                        break End::Removed;
                    }
                }
                Some(event) = self.transport_events.recv() => self.transport_event(event, &out).await,
                _ = tokio::time::sleep(warn_in), if !self.expiry_warned && warn_in > Duration::ZERO => {
                    self.expiry_warned = true;
                    out.json(json!({"type": "session_expiring", "expires_at": self.deadline_s()}));
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
                        out.json(json!({"type": "session_expiring", "expires_at": self.deadline_s()}));
                    }
                }
                _ = shutdown.recv() => break End::Shutdown,
            }
        };
        let (code, reason) = match end {
            End::Closed => (1000, "bye"),
            End::Expired => (CLOSE_EXPIRED, "session expired: send reauth before the token expires"),
            End::Removed => (CLOSE_REMOVED, "removed by a moderator"),
            End::Shutdown => (CLOSE_SHUTDOWN, "server shutting down"),
            End::Flooded => (1008, "too many messages"),
        };
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

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * f64::from(MAX_MESSAGES_PER_S);
        self.refilled = now;
        self.tokens = (self.tokens + refill).min(f64::from(MAX_MESSAGES_PER_S * 2));
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }

    async fn handle_text(&mut self, text: &str, out: &Outbox) -> Option<End> {
        let message: Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(error) => {
                out.reply(&Value::Null, Err(bad(format!("not JSON: {error}"))));
                return None;
            }
        };
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let Some(kind) = message.get("type").and_then(Value::as_str) else {
            out.reply(&id, Err(bad("missing `type`")));
            return None;
        };
        if !(id.is_number() || id.is_string()) {
            out.reply(&Value::Null, Err(bad("a request needs an `id` (number or string)")));
            return None;
        }
        let kind = kind.to_owned();
        let result = self.request(&kind, &message, out).await;
        let leaving = kind == "leave" && result.is_ok();
        out.reply(&id, result);
        leaving.then_some(End::Closed)
    }

    fn joined(&self) -> Result<&Joined, Refusal> {
        self.joined.as_ref().ok_or_else(|| refuse("conflict", "join a room first"))
    }

    fn joined_mut(&mut self) -> Result<&mut Joined, Refusal> {
        self.joined.as_mut().ok_or_else(|| refuse("conflict", "join a room first"))
    }

    async fn request(&mut self, kind: &str, message: &Value, out: &Outbox) -> Result<Value, Refusal> {
        let field = |name: &str| message.get(name);
        let text = |name: &str| -> Result<String, Refusal> {
            field(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("missing string `{name}`")))
        };
        match kind {
            "ping" => Ok(json!({})),
            "join" => {
                if self.joined.is_some() {
                    return Err(refuse("conflict", "already in a room"));
                }
                let room = text("room")?;
                if room.is_empty()
                    || room.len() > 64
                    || !room.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                {
                    return Err(bad("`room` must be 1 to 64 characters of A-Z, a-z, 0-9, _ . -"));
                }
                let name = field("name").and_then(Value::as_str).unwrap_or(&self.user.uid).to_owned();
                let joined = self
                    .app
                    .rooms
                    .join(&room, &name, Some(self.user.uid.clone()), self.user.roles.clone(), self.notices_tx.clone())
                    .await;
                let (link, joined) = joined.map_err(|e| match e {
                    RoomError::Full(_) | RoomError::TooManyRooms(_) => refuse("conflict", e.to_string()),
                    RoomError::Closed => refuse("unavailable", e.to_string()),
                })?;
                let peer = link.peer.to_string();
                self.joined = Some(Joined { link, send: None, recv: None });
                tracing::info!(uid = %self.user.uid, room, peer, "joined");
                Ok(json!({
                    "room": room,
                    "peer": peer,
                    "roles": self.user.roles,
                    "ice_servers": self.app.config.media.ice_servers,
                    "peers": joined.peers,
                }))
            }
            "publish" => {
                if !self.user.may_publish() {
                    return Err(refuse("forbidden", format!("role {} may not publish", roles_text(&self.user.roles))));
                }
                let offer = text("offer")?;
                let joined = self.joined()?;
                if joined.send.is_some() {
                    return Err(refuse("conflict", "already publishing; unpublish first"));
                }
                let link = joined.link.clone();
                let (transport, answer) =
                    SendTransport::accept(&self.app.transport, &offer, link, self.transport_tx.clone())
                        .await
                        .map_err(|e| bad(e.to_string()))?;
                self.joined_mut()?.send = Some(transport);
                Ok(json!({"answer": answer}))
            }
            "unpublish" => {
                let transport = self.joined_mut()?.send.take().ok_or_else(|| refuse("conflict", "not publishing"))?;
                transport.close().await;
                Ok(json!({}))
            }
            "consume" => {
                let video = field("video").and_then(Value::as_bool).unwrap_or(false);
                let joined = self.joined()?;
                if joined.recv.is_some() {
                    return Err(refuse("conflict", "already consuming"));
                }
                let link = joined.link.clone();
                let (transport, offer) =
                    RecvTransport::offer(&self.app.transport, video, link, self.transport_tx.clone())
                        .await
                        .map_err(|e| refuse("internal", e.to_string()))?;
                self.joined_mut()?.recv = Some(transport);
                Ok(json!({"offer": offer}))
            }
            "unconsume" => {
                let transport = self.joined_mut()?.recv.take().ok_or_else(|| refuse("conflict", "not consuming"))?;
                transport.close().await;
                Ok(json!({}))
            }
            "answer" => {
                let answer = text("answer")?;
                let transport = self.joined_mut()?.recv.as_mut().ok_or_else(|| refuse("conflict", "consume first"))?;
                transport.accept_answer(&answer).await.map_err(|e| bad(e.to_string()))?;
                Ok(json!({}))
            }
            "candidate" => {
                let side: Side = serde_json::from_value(field("transport").cloned().unwrap_or(Value::Null))
                    .map_err(|_| bad("`transport` must be \"send\" or \"recv\""))?;
                let candidate =
                    parse_candidate(field("candidate").unwrap_or(&Value::Null)).map_err(|e| bad(e.to_string()))?;
                let joined = self.joined_mut()?;
                let result = match side {
                    Side::Send => match &joined.send {
                        Some(t) => t.add_candidate(candidate).await,
                        None => return Err(refuse("conflict", "no send transport")),
                    },
                    Side::Recv => match &mut joined.recv {
                        Some(t) => t.add_candidate(candidate).await,
                        None => return Err(refuse("conflict", "no receive transport")),
                    },
                };
                result.map_err(|e| bad(e.to_string()))?;
                Ok(json!({}))
            }
            "pause" | "resume" => {
                let paused = kind == "pause";
                let side: Side = serde_json::from_value(field("transport").cloned().unwrap_or(Value::Null))
                    .map_err(|_| bad("`transport` must be \"send\" or \"recv\""))?;
                let joined = self.joined()?;
                match side {
                    Side::Send => {
                        joined.send.as_ref().ok_or_else(|| refuse("conflict", "not publishing"))?.pause(paused)
                    }
                    Side::Recv => {
                        joined.recv.as_ref().ok_or_else(|| refuse("conflict", "not consuming"))?.pause(paused)
                    }
                }
                Ok(json!({}))
            }
            "prefs" => {
                let names = |name: &str| -> Result<Vec<Name>, Refusal> {
                    match field(name) {
                        None | Some(Value::Null) => Ok(Vec::new()),
                        Some(Value::Array(items)) if items.len() <= 1000 => items
                            .iter()
                            .map(|v| v.as_str().map(Name::new).ok_or_else(|| bad(format!("`{name}` lists peer names"))))
                            .collect(),
                        Some(_) => Err(bad(format!("`{name}` must be a list of at most 1000 peer names"))),
                    }
                };
                let (follow, mute) = (names("follow")?, names("mute")?);
                let link = &self.joined()?.link;
                link.input(Input::Prefs { peer: link.peer.clone(), follow, mute });
                Ok(json!({}))
            }
            "feedback" => {
                let signal: FeedbackSignal = serde_json::from_value(field("signal").cloned().unwrap_or(Value::Null))
                    .map_err(|_| bad("`signal` must be \"skip\" or \"like\""))?;
                let utterance = match field("utterance") {
                    None | Some(Value::Null) => None,
                    Some(value) => Some(
                        value
                            .as_str()
                            .and_then(|s| s.parse::<UtteranceId>().ok())
                            .ok_or_else(|| bad("`utterance` must look like alice#3"))?,
                    ),
                };
                let link = &self.joined()?.link;
                link.input(Input::Feedback { peer: link.peer.clone(), utterance, signal });
                Ok(json!({}))
            }
            "reauth" => {
                let token = text("token")?;
                let user = self
                    .app
                    .auth
                    .reauthenticate(&self.user, &token)
                    .await
                    .map_err(|e| refuse("unauthorized", e.to_string()))?;
                self.user = user;
                self.expiry_warned = false;
                Ok(json!({"session_expires_at": self.deadline_s()}))
            }
            "mute_peer" | "remove_peer" => {
                if !self.user.may_moderate() {
                    return Err(refuse("forbidden", format!("role {} may not moderate", roles_text(&self.user.roles))));
                }
                let peer = Name::from(text("peer")?);
                let link = &self.joined()?.link;
                let by = link.peer.clone();
                if kind == "mute_peer" {
                    link.command(RoomCommand::Mute { peer, by });
                } else {
                    link.command(RoomCommand::Remove { peer, by });
                }
                Ok(json!({}))
            }
            "leave" => {
                self.joined()?;
                Ok(json!({}))
            }
            other => {
                let _ = out;
                Err(bad(format!("unknown message type {other:?}")))
            }
        }
    }

    async fn transport_event(&mut self, event: TransportEvent, out: &Outbox) {
        match event {
            TransportEvent::Candidate { side, candidate } => {
                out.json(json!({"type": "candidate", "transport": side, "candidate": candidate}));
            }
            TransportEvent::Connected { side } => {
                tracing::debug!(uid = %self.user.uid, ?side, "transport connected");
            }
            TransportEvent::Failed { side } => {
                tracing::warn!(uid = %self.user.uid, ?side, "transport failed");
                if let Some(joined) = self.joined.as_mut() {
                    match side {
                        Side::Send => {
                            if let Some(t) = joined.send.take() {
                                t.close().await;
                            }
                        }
                        Side::Recv => {
                            if let Some(t) = joined.recv.take() {
                                t.close().await;
                            }
                        }
                    }
                }
                out.json(json!({
                    "type": "error",
                    "code": "transport_failed",
                    "transport": side,
                    "message": format!("the {side:?} transport failed; create it again"),
                }));
            }
        }
    }

    async fn leave(&mut self) {
        if let Some(joined) = self.joined.take() {
            if let Some(send) = joined.send {
                send.close().await;
            }
            if let Some(recv) = joined.recv {
                recv.close().await;
            }
            self.app.rooms.leave(&joined.link);
        }
    }
}

/// Counts a session out when it ends, however it ends.
struct SessionCount(std::sync::Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open = open.saturating_sub(1));
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
    fn json(&self, value: Value) {
        let _ = self.tx.try_send(Message::Text(Utf8Bytes::from(value.to_string())));
    }

    fn reply(&self, id: &Value, result: Result<Value, Refusal>) {
        let message = match result {
            Ok(data) => json!({"id": id, "ok": true, "data": data}),
            Err(Refusal { code, message }) => {
                json!({"id": id, "ok": false, "error": {"code": code, "message": message}})
            }
        };
        self.json(message);
    }

    /// The Close frame always goes out, after what is queued (waiting for room if need be).
    async fn close(&self, code: u16, reason: &'static str) {
        let frame = Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }));
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tx.send(frame)).await;
    }
}
