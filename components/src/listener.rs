//! The listener session entity: a listening peer's personal stream.

use std::collections::BTreeSet;

use bevy_ecs::prelude::{Component, Entity};

use crate::ids::{MediaKind, Name, PeerKey, UtteranceId, UtteranceOrd};
use crate::output::ScoreTerms;
use crate::resources::Choice;

#[derive(Component, Clone, Debug)]
pub struct ListenerSession {
    pub key: PeerKey,
    pub name: Name,
    pub peer: Entity,
}

/// Where a media stands in the utterance being played: the next packet to consider.
/// `last_ext_seq` is authoritative (packets can be inserted before `next` when a late one
/// arrives, or removed from the front by eviction); `next` is a hint checked against it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub next: usize,
    pub last_ext_seq: Option<u64>,
    /// When the packet at `next` is due, if play-out stopped at it for being early: until
    /// then the listener costs nothing.
    pub next_due_us: Option<u64>,
    /// The buffer's reshape count when the cursor was last moved; while it holds, `next` is
    /// exact and play-out need not look at the packets before it.
    pub reshapes: u32,
    /// How far this media runs ahead of the route's pace: its packets are due this much
    /// earlier than `Playing::start_us` and the origin say. Only ever grows within a route:
    /// by a live route's catch-up (up to `Playing::catchup_us`), and by the silence a
    /// time-shifted route dropped from long pauses.
    pub ahead_us: u64,
    /// Audio: the media time of the first packet of the unvoiced run the cursor is in (none
    /// after a voiced packet): how long the pause being played has lasted.
    pub silent_since_us: Option<u64>,
}

/// The utterance a listener plays, and how.
#[derive(Clone, Debug)]
pub struct Playing {
    pub utterance: Entity,
    pub id: UtteranceId,
    pub ord: UtteranceOrd,
    pub speaker: PeerKey,
    pub speaker_name: Name,
    /// Engine time at which the packet with media time `origin_media_us` is due.
    pub start_us: u64,
    pub origin_media_us: u64,
    /// The most this route may run ahead of its pace (the catch-up of a live route that
    /// started at the live edge, behind it only by the pre-roll); 0 for a paced route.
    pub catchup_us: u64,
    pub score: i64,
    pub terms: ScoreTerms,
    pub audio: Cursor,
    pub video: Cursor,
    /// The video stream waits for a key frame (after a cut-over inside the utterance).
    pub video_needs_keyframe: bool,
}

#[derive(Component, Clone, Debug, Default)]
pub struct Route {
    pub playing: Option<Playing>,
    /// Since when the listener has paused its stream (engine time): play-out sends it
    /// nothing and its position waits, and it takes no new utterance until it resumes.
    pub paused_since_us: Option<u64>,
    /// A switch decided and waiting for a pause in what plays (`playout.switch_wait_ms`).
    pub pending_switch: Option<PendingSwitch>,
    /// Where the last switch cut the listener's utterance: played on from there once the
    /// listener is done with the one it switched to (`playout.resume_cut`).
    pub cut: Option<CutPlace>,
}

/// A switch waiting for its moment: the new utterance and when it was decided.
#[derive(Clone, Debug)]
pub struct PendingSwitch {
    pub choice: Choice,
    pub decided_us: u64,
}

/// An utterance a switch cut, and where: its cursors as they stood.
#[derive(Clone, Debug)]
pub struct CutPlace {
    pub utterance: Entity,
    pub id: UtteranceId,
    pub ord: UtteranceOrd,
    pub speaker: PeerKey,
    pub speaker_name: Name,
    pub score: i64,
    pub terms: ScoreTerms,
    pub audio: Cursor,
    pub video: Cursor,
}

/// A sent packet, remembered to answer NACKs with the same header. Kept small: every
/// listener has a ring of them, written once per packet sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentRecord {
    pub ord: UtteranceOrd,
    pub ext_seq: u64,
    pub ts: u32,
    pub seq: u16,
    pub marker: bool,
    /// When it was last sent again, to send it at most once per resend interval.
    pub resent_us: Option<u64>,
}

/// One outgoing stream (per listener and media): a stable SSRC and the rewriting state that
/// makes every source look like one continuous stream.
#[derive(Clone, Debug)]
pub struct OutStream {
    pub media: MediaKind,
    pub ssrc: u32,
    pub clock_rate: u32,
    /// Sequence number and timestamp of the last packet sent (or the random start, minus
    /// one sequence number, before the first).
    pub last_seq: u16,
    pub last_ts: u32,
    pub last_send_us: Option<u64>,
    /// Added to a source timestamp (wrapping) to get the outgoing one.
    pub ts_offset: u32,
    /// The utterance the offset was computed for; another source means a switch.
    pub source: Option<UtteranceOrd>,
    /// The next packet starts a new segment (switch or cut-over): new offset, marker bit.
    pub rebase: bool,
    /// Ring of recent sent packets, indexed by `seq % len` (a record whose `seq` differs is
    /// an older one, or none).
    pub history: Vec<SentRecord>,
    /// Retransmissions this stream may still send, in hundredths: each packet sent earns
    /// `limits.retransmit_percent`, up to `limits.retransmit_burst` whole ones; each
    /// retransmission spends 100.
    pub retransmit_credit: u32,
}

#[derive(Component, Clone, Debug)]
pub struct OutStreams {
    pub audio: OutStream,
    pub video: OutStream,
}

impl OutStreams {
    pub fn get_mut(&mut self, media: MediaKind) -> &mut OutStream {
        match media {
            MediaKind::Audio => &mut self.audio,
            MediaKind::Video => &mut self.video,
        }
    }

    pub fn get(&self, media: MediaKind) -> &OutStream {
        match media {
            MediaKind::Audio => &self.audio,
            MediaKind::Video => &self.video,
        }
    }
}

/// Utterances the listener has been routed to (or skipped): never offered again.
#[derive(Component, Clone, Debug, Default)]
pub struct History {
    pub heard: BTreeSet<UtteranceOrd>,
}

/// NACKed outgoing sequence numbers waiting for the retransmit system.
#[derive(Component, Clone, Debug, Default)]
pub struct PendingNacks {
    pub seqs: Vec<(MediaKind, u16)>,
}
