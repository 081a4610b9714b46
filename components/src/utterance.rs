//! The Utterance entity: one stretch of a speaker's talk, recorded packet by packet.

use std::sync::Arc;

use bevy_ecs::prelude::{Component, Entity};

use crate::ids::{Name, PeerKey, UtteranceId, UtteranceOrd};

#[derive(Component, Clone, Debug)]
pub struct Utterance {
    pub id: UtteranceId,
    pub ord: UtteranceOrd,
    pub speaker: PeerKey,
    pub speaker_name: Name,
    pub uid: Option<String>,
    pub track: Entity,
    /// Arrival time of its first packet (the pre-roll's first).
    pub started_us: u64,
    /// Engine time of the tick that opened it.
    pub opened_us: u64,
    /// Set when it closes.
    pub ended_us: Option<u64>,
}

impl Utterance {
    pub fn is_open(&self) -> bool {
        self.ended_us.is_none()
    }
}

/// A packet in the buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferedPacket {
    pub ext_seq: u64,
    pub ext_ts: u64,
    pub seq: u16,
    pub ts: u32,
    /// When the packet is due relative to others of the utterance: the media time on the
    /// engine's clock, from the RTP timestamp anchored at the media's first packet.
    pub media_us: u64,
    pub marker: bool,
    pub keyframe: bool,
    pub audio_level: Option<u8>,
    /// Voice detection judged it speech (audio; video packets are never voiced): time-shifted
    /// play-out shortens runs of unvoiced ones, and switches wait for them.
    pub voiced: bool,
    pub payload: Arc<[u8]>,
}

/// Maps one media's RTP timestamps to engine time: `arrival_us` of the packet with `ext_ts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaAnchor {
    pub ext_ts: u64,
    pub arrival_us: u64,
    pub clock_rate: u32,
}

/// One media of an utterance: its packets ordered by extended sequence number.
#[derive(Clone, Debug, Default)]
pub struct MediaBuffer {
    pub packets: Vec<BufferedPacket>,
    pub anchor: Option<MediaAnchor>,
    /// Bytes of the packets' payload allocations (the vector's own bytes are counted by the
    /// owner, from its capacity).
    pub payload_bytes: u64,
}

/// The recorded packets of an utterance: audio, and video of the same speaker from a key
/// frame on.
#[derive(Component, Clone, Debug, Default)]
pub struct PacketBuffer {
    pub audio: MediaBuffer,
    pub video: MediaBuffer,
    /// The speaker's video track feeding this utterance, once a key frame arrived.
    pub video_track: Option<Entity>,
    /// Accounted bytes: payload allocations, vector capacities and a fixed per-utterance cost.
    pub bytes: u64,
    /// Times packets moved: removed from the front, or a late one inserted before others.
    /// A cursor made under another count must search for its place again.
    pub reshapes: u32,
}

/// Who plays and who has heard an utterance; eviction and the trace read these.
#[derive(Component, Clone, Copy, Debug, Default)]
pub struct Audience {
    pub playing: u32,
    pub heard: u32,
}
