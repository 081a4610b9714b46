//! The signaling protocol, version 1 (docs/protocol.md): every message a client and the
//! server exchange over the WebSocket, as types. The server's sessions, the rooms' notices
//! and the Rust client all speak through these; a test parses every JSON example of
//! docs/protocol.md with them, so the document and the code cannot drift apart.
//!
//! A client sends requests (`{"id":7,"type":"join",...}`); the server answers each exactly
//! once (`{"id":7,"ok":true,"data":{...}}` or `{"id":7,"ok":false,"error":{...}}`) and sends
//! notices of its own (`{"type":"now_playing",...}`, no `id`). Unknown fields are ignored
//! both ways, so either side may add one without breaking the other.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use encore_systems::components::ids::{Role, UtteranceId};
use encore_systems::components::input::FeedbackSignal;
use encore_systems::components::output::{EndReason, RouteReason, UpNextReason};

use crate::config::IceServer;

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message a client may send; a larger one closes the session with 1009.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Messages (of any kind: text, binary, ping) a client may send per second, sustained.
pub const MAX_MESSAGES_PER_S: u32 = 50;
/// Messages a client may send in a burst above the sustained rate (the bucket's size).
pub const BURST_MESSAGES: u32 = 2 * MAX_MESSAGES_PER_S;
/// A client this far over its allowance (refused messages it kept sending) is closed, 1008.
pub const FLOOD_MESSAGES: u32 = MAX_MESSAGES_PER_S;
/// Most names in one `prefs` list.
pub const MAX_PREFS_NAMES: usize = 1000;

/// WebSocket close codes the server uses.
pub mod close {
    /// The client left, or closed its side.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Too many messages, after `rate_limited` answers.
    pub const POLICY: u16 = 1008;
    /// A message over 64 KiB.
    pub const TOO_BIG: u16 = 1009;
    /// The ID token expired without a `reauth`.
    pub const EXPIRED: u16 = 4001;
    /// A moderator removed the peer.
    pub const REMOVED: u16 = 4003;
}

/// A request id: any JSON number or string, echoed back in the answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Number(serde_json::Number),
    Text(String),
}

impl From<u64> for RequestId {
    fn from(n: u64) -> Self {
        RequestId::Number(n.into())
    }
}

/// Which of a client's two WebRTC transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Client to server: the microphone (and camera) it publishes.
    Send,
    /// Server to client: the listener's personal stream.
    Recv,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Send => "send",
            Side::Recv => "recv",
        })
    }
}

/// An ICE candidate as browsers give it (`RTCIceCandidate.toJSON()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mline_index: Option<u16>,
    #[serde(rename = "usernameFragment", default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// What a client asks. The `type` field names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Join a room (made on first join) under a display name.
    Join {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Publish: the client's SDP offer for its send transport.
    Publish {
        offer: String,
    },
    Unpublish,
    /// Start listening: the server offers the receive transport. (`consume` is the name this
    /// request had before `listen` was settled on; it is still accepted.)
    #[serde(alias = "consume")]
    Listen {
        #[serde(default)]
        video: bool,
    },
    /// The client's SDP answer to `listen`'s offer.
    Answer {
        answer: String,
    },
    /// Stop listening (formerly `unconsume`, still accepted).
    #[serde(alias = "unconsume")]
    Unlisten,
    /// A trickled ICE candidate of the client's; `null` at the end of gathering.
    Candidate {
        transport: Side,
        candidate: Option<IceCandidate>,
    },
    Pause {
        transport: Side,
    },
    Resume {
        transport: Side,
    },
    /// Replace the follow and mute lists (`null` or absent: empty).
    Prefs {
        #[serde(default, deserialize_with = "null_as_empty")]
        follow: Vec<String>,
        #[serde(default, deserialize_with = "null_as_empty")]
        mute: Vec<String>,
    },
    /// Like or skip an utterance; absent `utterance` names the one playing now.
    Feedback {
        signal: FeedbackSignal,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utterance: Option<UtteranceId>,
    },
    Reauth {
        token: String,
    },
    /// A moderator stops forwarding a peer's microphone, and holds it so until a moderator lifts
    /// it: the peer's own `resume` of its send transport is refused meanwhile.
    MutePeer {
        peer: String,
    },
    /// A moderator lifts a `mute_peer`: the peer's microphone is forwarded again.
    UnmutePeer {
        peer: String,
    },
    RemovePeer {
        peer: String,
    },
    /// A listener asks to speak in this room (moderators see the `hands` queue).
    RaiseHand,
    LowerHand,
    /// A moderator invites a peer of the audience to speak in this room.
    InviteToSpeak {
        peer: String,
    },
    /// The invited peer's answer: `accept` makes it a speaker in this room until it leaves.
    AnswerInvite {
        accept: bool,
    },
    /// A moderator moves a speaker back to the audience in this room: its publishing ends.
    MoveToAudience {
        peer: String,
    },
    Leave,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(deserializer)?.unwrap_or_default())
}

impl Request {
    /// The request's `type`, as the wire spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Join { .. } => "join",
            Request::Publish { .. } => "publish",
            Request::Unpublish => "unpublish",
            Request::Listen { .. } => "listen",
            Request::Answer { .. } => "answer",
            Request::Unlisten => "unlisten",
            Request::Candidate { .. } => "candidate",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Prefs { .. } => "prefs",
            Request::Feedback { .. } => "feedback",
            Request::Reauth { .. } => "reauth",
            Request::MutePeer { .. } => "mute_peer",
            Request::UnmutePeer { .. } => "unmute_peer",
            Request::RemovePeer { .. } => "remove_peer",
            Request::RaiseHand => "raise_hand",
            Request::LowerHand => "lower_hand",
            Request::InviteToSpeak { .. } => "invite_to_speak",
            Request::AnswerInvite { .. } => "answer_invite",
            Request::MoveToAudience { .. } => "move_to_audience",
            Request::Leave => "leave",
        }
    }

    /// Every request type, for documentation checks.
    pub const KINDS: [&'static str; 22] = [
        "ping",
        "join",
        "publish",
        "unpublish",
        "listen",
        "answer",
        "unlisten",
        "candidate",
        "pause",
        "resume",
        "prefs",
        "feedback",
        "reauth",
        "mute_peer",
        "unmute_peer",
        "remove_peer",
        "raise_hand",
        "lower_hand",
        "invite_to_speak",
        "answer_invite",
        "move_to_audience",
        "leave",
    ];
}

/// A client's message that could not be taken as a request, and what to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// The message's `id` when it had a usable one (the answer echoes it), else `None`
    /// (the answer's `id` is `null`).
    pub id: Option<RequestId>,
    pub message: String,
}

/// Reads one client message: its id and its request.
pub fn parse_request(text: &str) -> Result<(RequestId, Request), Unreadable> {
    let unreadable = |id: Option<RequestId>, message: String| Unreadable { id, message };
    let value: Value = serde_json::from_str(text).map_err(|e| unreadable(None, format!("not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(unreadable(None, "a message must be a JSON object".into()));
    };
    let id = match map.remove("id") {
        Some(Value::Number(n)) => Some(RequestId::Number(n)),
        Some(Value::String(s)) => Some(RequestId::Text(s)),
        _ => None,
    };
    if !map.get("type").is_some_and(Value::is_string) {
        return Err(unreadable(id, "missing `type`".into()));
    }
    let Some(id) = id else {
        return Err(unreadable(None, "a request needs an `id` (number or string)".into()));
    };
    match serde_json::from_value::<Request>(Value::Object(map)) {
        Ok(request) => Ok((id, request)),
        Err(error) => {
            let text = error.to_string();
            let message = if text.starts_with("unknown variant") {
                let kind = text.split('`').nth(1).unwrap_or("?").to_owned();
                format!("unknown message type {kind:?}")
            } else {
                text
            };
            Err(unreadable(Some(id), message))
        }
    }
}

/// The stable error codes of answers and `error` notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No or bad credentials, or the session expired.
    Unauthorized,
    /// The role does not allow it.
    Forbidden,
    /// Malformed, unknown type, missing or invalid field, bad SDP.
    BadRequest,
    /// No such room, peer or utterance.
    NotFound,
    /// Not possible in this state: already joined or publishing, not in a room, room full.
    Conflict,
    /// Too many messages.
    RateLimited,
    /// Auth keys unavailable, no media port free, the room or server shutting down.
    Unavailable,
    /// A bug or an unexpected failure on the server.
    Internal,
    /// A transport failed outside any request (`error` notices only).
    TransportFailed,
    /// `join` only: the room lives on another node of the cluster; the error's `redirect` says
    /// where, with a ticket valid there (docs/scaling.md).
    Redirect,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::TransportFailed => "transport_failed",
            ErrorCode::Redirect => "redirect",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// With `redirect` only: where the room lives (boxed: every other error is without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Box<Redirect>>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { code, message: message.into(), redirect: None }
    }

    /// A `join` answered with the node where the room lives.
    pub fn redirect(message: impl Into<String>, redirect: Redirect) -> Self {
        ErrorBody { code: ErrorCode::Redirect, message: message.into(), redirect: Some(Box::new(redirect)) }
    }
}

/// Where a room lives, in a `redirect` error: connect to `url` (`https://` base: the WebSocket
/// is `wss://…/ws?ticket=TICKET`) with `ticket`, once, within `expires_in` seconds, and send the
/// same `join` again there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// The node's public base URL (`cluster.public_url` of that node).
    pub url: String,
    /// That node's id (`cluster.node_id`).
    pub node: String,
    /// A single-use WebSocket ticket for this user, redeemable at that node.
    pub ticket: String,
    pub expires_in: u64,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The request's id; `null` when the message had none (it was not JSON, say).
    pub id: Option<RequestId>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Answer {
    pub fn ok(id: RequestId, data: &impl Serialize) -> Self {
        let data = serde_json::to_value(data).unwrap_or(Value::Null);
        Answer { id: Some(id), ok: true, data: Some(data), error: None }
    }

    pub fn refused(id: Option<RequestId>, error: ErrorBody) -> Self {
        Answer { id, ok: false, data: None, error: Some(error) }
    }

    /// The answer's `data` as the type its request promises, or the refusal.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ErrorBody> {
        match (self.ok, self.error) {
            (true, _) => serde_json::from_value(self.data.unwrap_or(Value::Null))
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("an answer of an unexpected shape: {e}"))),
            (false, Some(error)) => Err(error),
            (false, None) => Err(ErrorBody::new(ErrorCode::Internal, "a refusal without an error")),
        }
    }
}

/// `data` of the answer to a request that returns nothing: `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// A peer as a room lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer: String,
    pub uid: Option<String>,
    pub roles: Vec<Role>,
    pub publishing: bool,
    /// The moderator whose mute holds this peer's microphone, while one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muted_by: Option<String>,
}

/// `data` of the answer to `join`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    pub room: String,
    /// This peer's name in the room (unique; the display name, made unique).
    pub peer: String,
    pub roles: Vec<Role>,
    pub ice_servers: Vec<IceServer>,
    /// The peers already in the room.
    pub peers: Vec<PeerInfo>,
    /// The moderator whose mute holds this peer's microphone: a mute holds for the user (its
    /// uid) as long as the room lives, so leaving and joining again does not lift it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muted_by: Option<String>,
}

/// `data` of the answer to `publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub answer: String,
}

/// `data` of the answer to `listen`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offered {
    pub offer: String,
}

/// `data` of the answer to `reauth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reauthed {
    pub session_expires_at: i64,
}

/// How many utterances an `up_next` notice names at most.
pub const UP_NEXT_LEN: usize = 5;

/// One utterance of an `up_next` queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedUtterance {
    pub utterance: UtteranceId,
    pub speaker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The speaker is still talking.
    pub live: bool,
    /// How long ago it started.
    pub age_ms: u64,
    pub reason: UpNextReason,
}

/// What the server tells a client unasked. The `type` field names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    /// The first message of every session.
    Welcome {
        protocol: u32,
        uid: String,
        roles: Vec<Role>,
        session_expires_at: i64,
    },
    /// What this listener hears now; to a listener only, when its route changes.
    NowPlaying {
        utterance: Option<UtteranceId>,
        speaker: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<String>,
        /// The speaker is still talking.
        live: bool,
        /// How far behind live the listener hears it.
        lag_ms: u64,
        reason: RouteReason,
    },
    /// To every peer in the room.
    UtteranceStarted {
        utterance: UtteranceId,
        speaker: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<String>,
    },
    /// To every peer in the room: the speaker who dominates the room now (null when the
    /// dominant speaker stopped publishing and nobody else has spoken since).
    DominantSpeaker {
        speaker: Option<String>,
    },
    /// To every peer in the room.
    UtteranceEnded {
        utterance: UtteranceId,
        speaker: String,
        duration_ms: u64,
        reason: EndReason,
    },
    PeerJoined {
        peer: String,
        uid: Option<String>,
        roles: Vec<Role>,
    },
    PeerLeft {
        peer: String,
        uid: Option<String>,
        roles: Vec<Role>,
    },
    Publishing {
        peer: String,
        publishing: bool,
    },
    /// The session's token expires soon: send `reauth` before `expires_at`.
    SessionExpiring {
        expires_at: i64,
    },
    /// A moderator removed this peer; the server closes the socket (4003).
    Removed {
        by: String,
    },
    /// A moderator muted this peer's microphone: its send transport is paused, and stays so
    /// (its `resume` is refused `forbidden`) until a moderator sends `unmute_peer`.
    Muted {
        by: String,
    },
    /// To every peer in a room of at most 200: each publisher's loudest audio level (0
    /// silence, 127 loudest) over the last quarter second, while someone publishes.
    Levels {
        levels: std::collections::BTreeMap<String, u8>,
    },
    /// To a listener in a room of at most 200 peers: what it will hear after what it hears
    /// now, best first (at most [`UP_NEXT_LEN`]); sent when it changes, looked at when the
    /// listener's route changes, when an utterance opens or closes, and once a second.
    UpNext {
        queue: Vec<QueuedUtterance>,
    },
    /// To a speaker: how many listeners hear its utterances now, live (within a second) and
    /// behind (time-shifted); sent when it changes, at most once a tick.
    Audience {
        live: u32,
        behind: u32,
    },
    /// To every peer in the room: the peers whose hands are raised, in the order they raised
    /// them (sent whenever it changes).
    Hands {
        raised: Vec<String>,
    },
    /// To the invited peer: a moderator invites it to speak (answer with `answer_invite`).
    Invited {
        by: String,
    },
    /// To the moderator who invited: the peer declined.
    InviteDeclined {
        peer: String,
    },
    /// To every peer in the room: a peer's roles in this room changed. `account`: its
    /// account's role was changed by an admin (that peer refreshes its token and sends
    /// `reauth`); `invited`: it accepted an invitation to speak; `moved_to_audience`: a
    /// moderator ended its speaking.
    RoleChanged {
        peer: String,
        roles: Vec<Role>,
        reason: RoleChangeReason,
    },
    /// A moderator lifted the mute: this peer's microphone is forwarded again.
    Unmuted {
        by: String,
    },
    /// To every peer in the room: a moderator muted (`muted`: true) or unmuted a peer.
    PeerMuted {
        peer: String,
        muted: bool,
        by: String,
    },
    /// The server is stopping: the session closes next (1001). A client reconnects, to
    /// another server if it has one.
    GoingAway {
        reason: GoingAwayReason,
    },
    /// A failure outside any request: `transport_failed` with the `transport`.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport: Option<Side>,
    },
}

impl Notice {
    /// The notice's `type`, as the wire spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::Welcome { .. } => "welcome",
            Notice::NowPlaying { .. } => "now_playing",
            Notice::UtteranceStarted { .. } => "utterance_started",
            Notice::UtteranceEnded { .. } => "utterance_ended",
            Notice::DominantSpeaker { .. } => "dominant_speaker",
            Notice::PeerJoined { .. } => "peer_joined",
            Notice::PeerLeft { .. } => "peer_left",
            Notice::Publishing { .. } => "publishing",
            Notice::SessionExpiring { .. } => "session_expiring",
            Notice::Removed { .. } => "removed",
            Notice::Muted { .. } => "muted",
            Notice::Levels { .. } => "levels",
            Notice::UpNext { .. } => "up_next",
            Notice::Audience { .. } => "audience",
            Notice::Hands { .. } => "hands",
            Notice::Invited { .. } => "invited",
            Notice::InviteDeclined { .. } => "invite_declined",
            Notice::RoleChanged { .. } => "role_changed",
            Notice::Unmuted { .. } => "unmuted",
            Notice::PeerMuted { .. } => "peer_muted",
            Notice::GoingAway { .. } => "going_away",
            Notice::Error { .. } => "error",
        }
    }

    /// Every notice type, for documentation checks.
    pub const KINDS: [&'static str; 22] = [
        "welcome",
        "now_playing",
        "utterance_started",
        "utterance_ended",
        "dominant_speaker",
        "peer_joined",
        "peer_left",
        "publishing",
        "session_expiring",
        "removed",
        "muted",
        "levels",
        "up_next",
        "audience",
        "hands",
        "invited",
        "invite_declined",
        "role_changed",
        "unmuted",
        "peer_muted",
        "going_away",
        "error",
    ];
}

/// The JSON body of a refused WebSocket upgrade (HTTP 401; 503 when the auth keys cannot be
/// had; 429 when the user holds its most sessions): the protocol's code, and for an auth
/// refusal the auth layer's own (`id-token-expired`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRefusal {
    pub error: UpgradeError,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeError {
    pub code: ErrorCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_code: Option<String>,
    pub message: String,
}

/// Why a peer's roles changed (`role_changed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleChangeReason {
    Account,
    Invited,
    MovedToAudience,
}

/// Why the server sends a session away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoingAwayReason {
    /// The server drained (after SIGTERM) for `server.drain_timeout_s` and rooms were left.
    DrainTimeout,
    /// The server stops now (a second signal, or a stop without a drain).
    Shutdown,
}

impl GoingAwayReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GoingAwayReason::DrainTimeout => "drain_timeout",
            GoingAwayReason::Shutdown => "shutdown",
        }
    }
}

/// Anything the server sends: an answer (it has `id` and `ok`) or a notice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerMessage {
    Answer(Answer),
    Notice(Notice),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_their_id_and_refusals_keep_it_when_they_can() {
        let (id, request) = parse_request(r#"{"id":7,"type":"join","room":"r1","extra":true}"#).unwrap();
        assert_eq!(id, RequestId::from(7));
        assert_eq!(request, Request::Join { room: "r1".into(), name: None });
        let (id, request) = parse_request(r#"{"id":"a","type":"consume"}"#).unwrap();
        assert_eq!((id, request), (RequestId::Text("a".into()), Request::Listen { video: false }));
        let refused = |text: &str| parse_request(text).unwrap_err();
        assert_eq!(refused("{nope").id, None);
        assert!(refused("{nope").message.starts_with("not JSON"));
        assert_eq!(refused(r#"{"type":"ping"}"#).id, None);
        let unknown = refused(r#"{"id":3,"type":"dance"}"#);
        assert_eq!(
            (unknown.id, unknown.message.as_str()),
            (Some(RequestId::from(3)), "unknown message type \"dance\"")
        );
        let missing = refused(r#"{"id":4,"type":"publish"}"#);
        assert!(missing.message.contains("missing field `offer`"), "{}", missing.message);
        assert_eq!(refused(r#"{"id":5}"#).message, "missing `type`");
    }

    #[test]
    fn every_kind_is_listed_once() {
        let mut requests = Request::KINDS.to_vec();
        requests.sort_unstable();
        requests.dedup();
        assert_eq!(requests.len(), Request::KINDS.len());
        let mut notices = Notice::KINDS.to_vec();
        notices.sort_unstable();
        notices.dedup();
        assert_eq!(notices.len(), Notice::KINDS.len());
    }

    #[test]
    fn answers_and_notices_are_told_apart() {
        let answer: ServerMessage = serde_json::from_str(r#"{"id":1,"ok":true,"data":{}}"#).unwrap();
        assert!(matches!(answer, ServerMessage::Answer(Answer { ok: true, .. })));
        let notice: ServerMessage = serde_json::from_str(r#"{"type":"removed","by":"mo"}"#).unwrap();
        assert_eq!(notice, ServerMessage::Notice(Notice::Removed { by: "mo".into() }));
        let refusal = Answer::refused(None, ErrorBody::new(ErrorCode::BadRequest, "not JSON"));
        assert_eq!(
            serde_json::to_string(&refusal).unwrap(),
            r#"{"id":null,"ok":false,"error":{"code":"bad_request","message":"not JSON"}}"#
        );
    }
}
