//! What the engine consumes. Every input carries the time it arrived (`at_us`, given to
//! `Engine::push`); the engine applies a tick's inputs in the order of that time, then of
//! pushing, which is a total order.
//!
//! The serde form of [`Input`] is the scenario format's event line (docs/scenario-format.md)
//! without its `at_us` and `tick`: `{"kind":"join","peer":"alice","roles":["speaker"]}`. It is
//! derived here, once, and read and written by the scenario reader, the recorder and the tests.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{MediaKind, Name, Role, UtteranceId};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// A peer joins the room. `uid` is its Firebase user id when it signed in.
    Join {
        peer: Name,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<String>,
        #[serde(default)]
        roles: Vec<Role>,
    },
    /// A peer's roles change while it is in the room: a moderator's invitation to speak that
    /// it accepted, a move back to the audience, or its account's role. A peer that may no
    /// longer publish loses its tracks (their utterances close with reason `unpublished`).
    Roles {
        peer: Name,
        #[serde(default)]
        roles: Vec<Role>,
    },
    /// A peer leaves: its tracks end (their utterances close with reason `left`) and its
    /// listener session, if any, ends.
    Leave { peer: Name },
    /// A peer publishes a track.
    Publish { peer: Name, track: Name, media: MediaKind, codec: String, clock_rate: u32, ssrc: u32 },
    /// A track ends (its utterance closes with reason `unpublished`).
    Unpublish { track: Name },
    /// A peer starts listening: it gets a listener session and a personal stream. (Scenario
    /// files written before the word `listen` was settled on say `subscribe`.)
    #[serde(alias = "subscribe")]
    Listen { peer: Name },
    /// A peer stops listening.
    #[serde(alias = "unsubscribe")]
    Unlisten { peer: Name },
    /// A listener pauses its personal stream: nothing is sent and its position waits.
    Pause { peer: Name },
    /// A listener resumes: its stream continues from where it paused, from the buffer.
    Resume { peer: Name },
    /// One RTP packet of a published track.
    #[serde(serialize_with = "rtp_line::serialize", deserialize_with = "rtp_line::deserialize")]
    Rtp { track: Name, packet: RtpIn },
    /// The peer's follow and mute lists, replacing the previous ones.
    Prefs {
        #[serde(default)]
        peer: Name,
        #[serde(default)]
        follow: Vec<Name>,
        #[serde(default)]
        mute: Vec<Name>,
    },
    /// A listener's verdict on an utterance; `None` names the one it hears now.
    Feedback {
        peer: Name,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utterance: Option<UtteranceId>,
        signal: FeedbackSignal,
    },
    /// A listener lost packets of its personal stream; `seqs` are outgoing sequence numbers.
    Nack { peer: Name, media: MediaKind, seqs: Vec<u16> },
    /// A listener asks for a key frame of its video stream (a PLI).
    KeyframeRequest { peer: Name },
    /// The room's share of the server's buffer budget: the buffer's cap from this tick on
    /// (the configured `buffer_max_bytes` until the first). A smaller share evicts, in the
    /// documented order, in the tick that applies it.
    BufferShare { bytes: u64 },
}

impl Input {
    /// Whether a replica of the room (an edge node's engine) consumes this input too: what
    /// decides voice, utterances and the buffer's cap. Every peer's presence and roles go
    /// (a listener may be invited to speak and publish later, and an edge's own peers must
    /// never take an origin peer's name); tracks, their packets and the buffer share go.
    /// What a listener does (listening, pausing, preferences, feedback, NACKs, key frame
    /// requests) stays on the node that serves it: it moves routes and streams, never an
    /// utterance (eviction, which listeners do move, replicates as the origin's orders:
    /// `replica::EvictOrder`).
    pub fn is_speaker_side(&self) -> bool {
        match self {
            Input::Join { .. }
            | Input::Roles { .. }
            | Input::Leave { .. }
            | Input::Publish { .. }
            | Input::Unpublish { .. }
            | Input::Rtp { .. }
            | Input::BufferShare { .. } => true,
            Input::Listen { .. }
            | Input::Unlisten { .. }
            | Input::Pause { .. }
            | Input::Resume { .. }
            | Input::Prefs { .. }
            | Input::Feedback { .. }
            | Input::Nack { .. }
            | Input::KeyframeRequest { .. } => false,
        }
    }

    /// The name of the input's kind, as the scenario format spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Join { .. } => "join",
            Input::Roles { .. } => "roles",
            Input::Leave { .. } => "leave",
            Input::Publish { .. } => "publish",
            Input::Unpublish { .. } => "unpublish",
            Input::Listen { .. } => "listen",
            Input::Unlisten { .. } => "unlisten",
            Input::Pause { .. } => "pause",
            Input::Resume { .. } => "resume",
            Input::Rtp { .. } => "rtp",
            Input::Prefs { .. } => "prefs",
            Input::Feedback { .. } => "feedback",
            Input::Nack { .. } => "nack",
            Input::KeyframeRequest { .. } => "keyframe_request",
            Input::BufferShare { .. } => "buffer_share",
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

/// Largest payload an `rtp` line may carry or ask for.
pub const MAX_LINE_PAYLOAD: usize = 65_535;

/// The bytes that stand in for an `rtp` line's payload when only its `size` is given: what
/// the payload of a generated packet is, so a line need not carry it.
pub fn filler_payload(seq: u16, size: usize) -> Arc<[u8]> {
    (0..size).map(|i| (seq as usize * 31 + i * 7) as u8).collect()
}

/// The `rtp` line: the packet's fields flat beside `track`, the payload as `size` alone when
/// it is the filler of that size, in base64 otherwise.
mod rtp_line {
    use std::sync::Arc;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{MAX_LINE_PAYLOAD, RtpIn, filler_payload};
    use crate::ids::Name;

    #[derive(Serialize)]
    struct Out<'a> {
        track: &'a Name,
        seq: u16,
        ts: u32,
        marker: bool,
        size: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        audio_level: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        voice: Option<bool>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        keyframe: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct In {
        track: Name,
        seq: u16,
        ts: u32,
        #[serde(default)]
        marker: bool,
        #[serde(default)]
        size: Option<usize>,
        #[serde(default)]
        audio_level: Option<u8>,
        #[serde(default)]
        voice: Option<bool>,
        #[serde(default)]
        keyframe: bool,
        #[serde(default)]
        payload: Option<String>,
    }

    pub fn serialize<S: Serializer>(track: &Name, packet: &RtpIn, serializer: S) -> Result<S::Ok, S::Error> {
        let filler = *packet.payload == *filler_payload(packet.seq, packet.payload.len());
        Out {
            track,
            seq: packet.seq,
            ts: packet.ts,
            marker: packet.marker,
            size: packet.payload.len(),
            audio_level: packet.audio_level,
            voice: packet.voice,
            keyframe: packet.keyframe,
            payload: (!filler).then(|| BASE64.encode(&packet.payload)),
        }
        .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(Name, RtpIn), D::Error> {
        use serde::de::Error;
        let line = In::deserialize(deserializer)?;
        let payload: Arc<[u8]> = match (line.payload, line.size) {
            (Some(text), size) => {
                let bytes =
                    BASE64.decode(text.as_bytes()).map_err(|e| D::Error::custom(format!("bad base64 payload: {e}")))?;
                if let Some(size) = size.filter(|size| *size != bytes.len()) {
                    return Err(D::Error::custom(format!(
                        "size {size} does not match the payload's {} bytes",
                        bytes.len()
                    )));
                }
                Arc::from(bytes)
            }
            (None, Some(size)) if size <= MAX_LINE_PAYLOAD => filler_payload(line.seq, size),
            (None, Some(size)) => return Err(D::Error::custom(format!("size {size} is over {MAX_LINE_PAYLOAD}"))),
            (None, None) => return Err(D::Error::custom("an rtp event needs `size` or `payload`")),
        };
        let packet = RtpIn {
            seq: line.seq,
            ts: line.ts,
            marker: line.marker,
            payload,
            audio_level: line.audio_level,
            voice: line.voice,
            keyframe: line.keyframe,
        };
        Ok((line.track, packet))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_reads_and_writes_as_its_scenario_line() {
        let input: Input = serde_json::from_str(r#"{"kind":"join","peer":"a","roles":["speaker"]}"#).unwrap();
        assert_eq!(input, Input::Join { peer: Name::new("a"), uid: None, roles: vec![Role::Speaker] });
        assert_eq!(serde_json::to_string(&input).unwrap(), r#"{"kind":"join","peer":"a","roles":["speaker"]}"#);
        let rtp = Input::Rtp {
            track: Name::new("t"),
            packet: RtpIn {
                seq: 7,
                ts: 9,
                marker: true,
                payload: filler_payload(7, 3),
                audio_level: Some(30),
                voice: None,
                keyframe: false,
            },
        };
        let line = serde_json::to_string(&rtp).unwrap();
        assert_eq!(line, r#"{"kind":"rtp","track":"t","seq":7,"ts":9,"marker":true,"size":3,"audio_level":30}"#);
        assert_eq!(serde_json::from_str::<Input>(&line).unwrap(), rtp);
    }

    #[test]
    fn the_words_of_earlier_files_still_read() {
        let input: Input = serde_json::from_str(r#"{"kind":"subscribe","peer":"a"}"#).unwrap();
        assert_eq!(input, Input::Listen { peer: Name::new("a") });
        assert_eq!(serde_json::to_string(&input).unwrap(), r#"{"kind":"listen","peer":"a"}"#);
    }

    #[test]
    fn unknown_fields_are_refused_in_every_kind() {
        for line in [
            r#"{"kind":"leave","peer":"a","colour":"red"}"#,
            r#"{"kind":"rtp","track":"t","seq":1,"ts":1,"size":2,"x":1}"#,
        ] {
            let err = serde_json::from_str::<Input>(line).unwrap_err().to_string();
            assert!(err.contains("unknown field"), "{line}: {err}");
        }
    }
}
