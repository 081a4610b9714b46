//! What the engine produces each tick: decisions (the trace events) and packets to send.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{MediaKind, Name, PeerKey, UtteranceId, UtteranceOrd};

/// Everything one tick produced. The engine reuses the vectors from tick to tick.
#[derive(Clone, Debug, Default)]
pub struct TickOutput {
    pub tick: u64,
    pub now_us: u64,
    /// Decisions, in the order they were made.
    pub events: Vec<Event>,
    /// Packets for listeners, in play-out order (by listener key, then media, then time).
    pub packets: Vec<SendPacket>,
}

/// One packet for one listener's personal stream, its header already rewritten.
#[derive(Clone, Debug, PartialEq)]
pub struct SendPacket {
    pub listener: PeerKey,
    pub media: MediaKind,
    /// The utterance it belongs to (`Engine::utterance_id` names it); an ordinal, so that
    /// building a packet touches no shared reference count.
    pub utterance: UtteranceOrd,
    /// Sequence number the publisher gave it.
    pub src_seq: u16,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    pub marker: bool,
    /// A retransmission answering a NACK (same header as the first time).
    pub retransmit: bool,
    pub keyframe: bool,
    pub audio_level: Option<u8>,
    /// The payload, shared with the buffer; `None` when the engine was told payloads are not
    /// wanted (headless replay), which spares a reference count per packet.
    pub payload: Option<Arc<[u8]>>,
}

/// Why an utterance closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The speaker fell silent for the hang-over time.
    Silence,
    /// It reached the maximum length; the talk continues as the speaker's next utterance.
    MaxDuration,
    /// Its track was unpublished.
    Unpublished,
    /// Its speaker left the room.
    Left,
}

/// Why a listener's route changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteReason {
    /// An idle listener starts an utterance in the tick it opens.
    NewUtterance,
    /// A busy listener leaves its utterance for a much better new one at once (no pause came
    /// within `playout.switch_wait_ms`, or the wait is 0).
    Switch,
    /// The same, at a pause in what the listener heard.
    SwitchAtPause,
    /// Back to the utterance a switch cut, from where it was cut, once the listener is done
    /// with the one it switched to.
    ResumeCut,
    /// The listener just started listening.
    StartedListening,
    /// The listener finished its utterance.
    Finished,
    /// The listener skipped its utterance.
    Skip,
    /// The listener's utterance was evicted from the buffer.
    Evicted,
    /// The listener muted the speaker it was hearing.
    Muted,
    /// The listener changed its preferences while idle.
    Prefs,
    /// The listener gave feedback while idle.
    Feedback,
    /// The listener stopped listening or left.
    StoppedListening,
    /// The listener resumed after a pause with nothing to continue: it was idle, or its
    /// pause outlasted the time a pause holds a position.
    Resumed,
}

impl RouteReason {
    /// Every reason, in declaration order (metrics label one series per reason).
    pub const ALL: [RouteReason; 13] = [
        RouteReason::NewUtterance,
        RouteReason::Switch,
        RouteReason::SwitchAtPause,
        RouteReason::ResumeCut,
        RouteReason::StartedListening,
        RouteReason::Finished,
        RouteReason::Skip,
        RouteReason::Evicted,
        RouteReason::Muted,
        RouteReason::Prefs,
        RouteReason::Feedback,
        RouteReason::StoppedListening,
        RouteReason::Resumed,
    ];

    /// The reason as the trace, the protocol and metrics write it (serde's name).
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::NewUtterance => "new_utterance",
            RouteReason::Switch => "switch",
            RouteReason::SwitchAtPause => "switch_at_pause",
            RouteReason::ResumeCut => "resume_cut",
            RouteReason::StartedListening => "started_listening",
            RouteReason::Finished => "finished",
            RouteReason::Skip => "skip",
            RouteReason::Evicted => "evicted",
            RouteReason::Muted => "muted",
            RouteReason::Prefs => "prefs",
            RouteReason::Feedback => "feedback",
            RouteReason::StoppedListening => "stopped_listening",
            RouteReason::Resumed => "resumed",
        }
    }
}

/// Why an utterance is in a listener's queue of what plays next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpNextReason {
    /// A switch to it is decided and waits for a pause in what plays.
    Switch,
    /// A switch cut it: it plays on from the cut after what the listener switched to.
    ResumeCut,
    /// The recommender ranks it here for this listener now.
    Recommended,
}

/// One utterance of a listener's queue of what plays next, best first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpNext {
    pub id: UtteranceId,
    /// Its speaker is still talking.
    pub live: bool,
    /// How long ago it started, engine time.
    pub age_us: u64,
    pub reason: UpNextReason,
    pub score: i64,
}

/// The named terms of a score; the score is their sum. The first seven are every policy's
/// (the `rules` policy uses only them); the others belong to one policy each and are written
/// only when not zero: `age` (`fifo`), `dominant` (`loudest`), `taste`, `room` and `explore`
/// (`learn`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScoreTerms {
    pub base: i64,
    pub follow: i64,
    pub affinity: i64,
    pub live: i64,
    pub lag: i64,
    pub freshness: i64,
    pub blip: i64,
    /// `fifo`: milliseconds since the utterance started (the oldest wins).
    #[serde(skip_serializing_if = "is_zero")]
    pub age: i64,
    /// `loudest`: the bonus of the dominant speaker's utterance.
    #[serde(skip_serializing_if = "is_zero")]
    pub dominant: i64,
    /// `learn`: how this listener's own history with the speaker moves the prediction from
    /// what listeners of its taste get.
    #[serde(skip_serializing_if = "is_zero")]
    pub taste: i64,
    /// `learn`: what listeners of similar taste got from the speaker, and their verdicts on this
    /// very utterance.
    #[serde(skip_serializing_if = "is_zero")]
    pub room: i64,
    /// `learn`: the seeded exploration bonus, larger for speakers the listener has tried less.
    #[serde(skip_serializing_if = "is_zero")]
    pub explore: i64,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

impl ScoreTerms {
    pub fn total(&self) -> i64 {
        self.base
            + self.follow
            + self.affinity
            + self.live
            + self.lag
            + self.freshness
            + self.blip
            + self.age
            + self.dominant
            + self.taste
            + self.room
            + self.explore
    }
}

/// Why a key frame was asked of a publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyframeReason {
    /// The speaker's utterance opened; its video joins from a key frame.
    Onset,
    /// A listener of the live utterance asked (PLI).
    Listener,
}

/// Inputs dropped, by cause. `dropped` in the stats is their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DropCounts {
    pub unknown_peer: u64,
    pub unknown_track: u64,
    pub unknown_utterance: u64,
    pub duplicate_peer: u64,
    pub duplicate_track: u64,
    pub forbidden: u64,
    pub invalid: u64,
    pub oversize: u64,
    pub flood: u64,
    pub duplicate_packet: u64,
    pub too_late: u64,
    pub not_listening: u64,
}

impl DropCounts {
    pub fn total(&self) -> u64 {
        self.unknown_peer
            + self.unknown_track
            + self.unknown_utterance
            + self.duplicate_peer
            + self.duplicate_track
            + self.forbidden
            + self.invalid
            + self.oversize
            + self.flood
            + self.duplicate_packet
            + self.too_late
            + self.not_listening
    }
}

/// The periodic stats line, once per second of engine time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub buffer_bytes: u64,
    /// Largest `buffer_bytes` at the end of a tick since the previous stats.
    pub buffer_peak_bytes: u64,
    pub buffer_cap_bytes: u64,
    /// Utterances in the buffer, open or finished.
    pub utterances: u64,
    pub open_utterances: u64,
    pub listeners: u64,
    /// Listeners playing an utterance right now.
    pub playing: u64,
    /// Inputs dropped since the start (sum of `drops`).
    pub dropped: u64,
    #[serde(flatten)]
    pub counters: Counters,
}

/// What the engine counted since the start. The `stats` line carries them all.
#[derive(bevy_ecs::prelude::Resource, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub drops: DropCounts,
    /// Packets sent to listeners (retransmissions excluded).
    pub sent: u64,
    pub retransmitted: u64,
    /// NACKed packets that could not be served (no longer remembered or evicted).
    pub nack_unserved: u64,
    /// NACKed packets not sent again on purpose (absent from the line while all are zero).
    #[serde(skip_serializing_if = "NackRefusals::is_zero")]
    pub nack_refused: NackRefusals,
    /// Video packets of a speaker that no utterance took (before a key frame, or in silence).
    pub video_unbuffered: u64,
    pub evicted_utterances: u64,
    pub evicted_bytes: u64,
    /// Packets removed from the front of utterances (and pre-roll rings) under buffer pressure.
    pub trimmed_packets: u64,
    /// Silent audio packets time-shifted play-out left out of long pauses
    /// (`playout.max_pause_ms`; absent from the line while zero).
    #[serde(skip_serializing_if = "is_no_count")]
    pub pause_dropped: u64,
    /// Lookups that failed although they cannot unless the engine has a bug (an entity in the
    /// directory without its components, say). Debug builds assert instead; release builds
    /// count and skip the item, so one broken entity never takes a room down. Always 0.
    pub internal_errors: u64,
}

fn is_no_count(count: &u64) -> bool {
    *count == 0
}

/// NACKed sequence numbers the retransmit system refused, by cause: what bounds a listener
/// that NACKs more than it lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NackRefusals {
    /// Already waiting to be sent again (named twice before the retransmit system ran).
    pub duplicate: u64,
    /// Sent again less than `limits.nack_resend_interval_ms` ago.
    pub too_soon: u64,
    /// Past the listener's retransmission share (`limits.retransmit_percent`, `_burst`).
    pub over_budget: u64,
}

impl NackRefusals {
    pub fn is_zero(&self) -> bool {
        *self == NackRefusals::default()
    }

    pub fn total(&self) -> u64 {
        self.duplicate + self.too_soon + self.over_budget
    }
}

/// A decision of the engine: the trace records these.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    UtteranceStart {
        utterance: UtteranceId,
        speaker: Name,
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<String>,
        track: Name,
        /// Arrival time of its first (pre-roll) packet.
        started_us: u64,
        /// The utterance this one continues, when the previous reached the maximum length.
        #[serde(skip_serializing_if = "Option::is_none")]
        continues: Option<UtteranceId>,
    },
    UtteranceEnd {
        utterance: UtteranceId,
        duration_us: u64,
        bytes: u64,
        packets: u64,
        reason: EndReason,
    },
    Evict {
        utterance: UtteranceId,
        /// Bytes released.
        bytes: u64,
        /// Buffer bytes after the eviction.
        buffer_bytes: u64,
        /// Whole utterance (`true`) or its oldest packets (`false`, an open utterance).
        whole: bool,
        packets: u64,
        /// Listeners that were playing it.
        listeners: u64,
    },
    Route {
        listener: Name,
        from: Option<UtteranceId>,
        to: Option<UtteranceId>,
        reason: RouteReason,
        /// The chosen candidate's score (absent when the listener goes idle).
        score: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        terms: Option<ScoreTerms>,
        /// How far behind live the listener hears `to`: its start time minus the
        /// utterance's start time.
        #[serde(skip_serializing_if = "Option::is_none")]
        lag_us: Option<u64>,
        /// `to` is still open (its speaker still talks) when the route starts.
        live: bool,
    },
    Stats(Stats),
    KeyframeRequest {
        track: Name,
        reason: KeyframeReason,
    },
    /// The dominant speaker changed (with `dominant_speaker.events`): its name and audio track,
    /// or null when the dominant speaker's track ended and nobody else has spoken since.
    DominantSpeaker {
        speaker: Option<Name>,
        track: Option<Name>,
    },
}

#[cfg(test)]
mod tests {
    use super::RouteReason;

    #[test]
    fn every_route_reason_is_listed_once_under_its_serde_name() {
        for (i, reason) in RouteReason::ALL.iter().enumerate() {
            assert_eq!(serde_json::to_value(reason).unwrap(), reason.as_str());
            assert_eq!(RouteReason::ALL.iter().position(|r| r == reason), Some(i));
        }
    }
}
