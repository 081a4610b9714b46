//! What the engine consumes. Every input carries the time it arrived (`at_us`, given to
//! `Engine::push`); the engine applies a tick's inputs in the order of that time, then of
//! pushing, which is a total order.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{MediaKind, Name, Role, UtteranceId};

#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A peer joins the room. `uid` is its Firebase user id when it signed in.
    Join { peer: Name, uid: Option<String>, roles: Vec<Role> },
    /// A peer leaves: its tracks end (their utterances close with reason `left`) and its
    /// viewer session, if any, ends.
    Leave { peer: Name },
    /// A peer publishes a track.
    Publish { peer: Name, track: Name, media: MediaKind, codec: String, clock_rate: u32, ssrc: u32 },
    /// A track ends (its utterance closes with reason `unpublished`).
    Unpublish { track: Name },
    /// A peer starts listening: it gets a viewer session and a personal stream.
    Subscribe { peer: Name },
    /// A peer stops listening.
    Unsubscribe { peer: Name },
    /// One RTP packet of a published track.
    Rtp { track: Name, packet: RtpIn },
    /// The peer's follow and mute lists, replacing the previous ones.
    Prefs { peer: Name, follow: Vec<Name>, mute: Vec<Name> },
    /// A listener's verdict on an utterance; `None` names the one it hears now.
    Feedback { peer: Name, utterance: Option<UtteranceId>, signal: FeedbackSignal },
    /// A listener lost packets of its personal stream; `seqs` are outgoing sequence numbers.
    Nack { peer: Name, media: MediaKind, seqs: Vec<u16> },
    /// A listener asks for a key frame of its video stream (a PLI).
    KeyframeRequest { peer: Name },
}

impl Input {
    /// The name of the input's kind, as the scenario format spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Join { .. } => "join",
            Input::Leave { .. } => "leave",
            Input::Publish { .. } => "publish",
            Input::Unpublish { .. } => "unpublish",
            Input::Subscribe { .. } => "subscribe",
            Input::Unsubscribe { .. } => "unsubscribe",
            Input::Rtp { .. } => "rtp",
            Input::Prefs { .. } => "prefs",
            Input::Feedback { .. } => "feedback",
            Input::Nack { .. } => "nack",
            Input::KeyframeRequest { .. } => "keyframe_request",
        }
    }
}

/// The fields of an RTP packet the engine uses. The transport parses the wire format and
/// the header extensions; the engine never sees raw bytes other than the payload.
#[derive(Clone, Debug, PartialEq)]
pub struct RtpIn {
    pub seq: u16,
    pub ts: u32,
    pub marker: bool,
    pub payload: Arc<[u8]>,
    /// RFC 6464 level, 0 (loudest) to 127 (silence), when the extension is present.
    pub audio_level: Option<u8>,
    /// RFC 6464 V flag, when the extension is present.
    pub voice: Option<bool>,
    /// The first packet of a key frame (video).
    pub keyframe: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedbackSignal {
    Skip,
    Like,
}
