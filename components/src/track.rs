//! The Track entity: one per published audio or video track.

use std::collections::VecDeque;
use std::sync::Arc;

use bevy_ecs::prelude::{Component, Entity};

use crate::ids::{MediaKind, Name, PeerKey};

#[derive(Component, Clone, Debug)]
pub struct Track {
    pub name: Name,
    pub peer: Entity,
    pub peer_key: PeerKey,
    pub speaker: Name,
    /// The speaker's Firebase uid, copied here so it outlives the peer's entity.
    pub uid: Option<String>,
    pub media: MediaKind,
    pub codec: String,
    pub clock_rate: u32,
    pub ssrc: u32,
}

/// Where the track's sequence numbers and timestamps stand, for unwrapping them to 64 bits
/// and for telling duplicates and late packets from new ones.
#[derive(Component, Clone, Debug, Default)]
pub struct RtpState {
    pub highest_ext_seq: Option<u64>,
    /// Extended timestamp of the packet with the highest sequence number.
    pub highest_ext_ts: u64,
    /// A ring of bits over the reorder window: the bit of extended sequence number `n` (bit
    /// `n % (64 * len)`) is set when `n` was received, and cleared as the window moves past it.
    pub received: Vec<u64>,
    /// Packets accepted in the current tick (flood limit).
    pub packets_this_tick: u32,
    pub counted_tick: u64,
}

/// A packet accepted from the network and not yet placed in an utterance.
#[derive(Clone, Debug, PartialEq)]
pub struct StagedPacket {
    pub ext_seq: u64,
    pub ext_ts: u64,
    pub seq: u16,
    pub ts: u32,
    pub arrival_us: u64,
    pub marker: bool,
    pub keyframe: bool,
    pub audio_level: Option<u8>,
    pub voice: Option<bool>,
    /// Voice detection's verdict on this packet (audio only; set by the voice system).
    pub voiced: bool,
    pub payload: Arc<[u8]>,
}

/// A change of voice activity, placed between the packets of a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoiceChange {
    /// Speech started: an utterance opens after packet `after` (an index into
    /// `Incoming::packets`), its pre-roll counted back from `run_start_us`.
    Onset { after: usize, run_start_us: u64 },
    /// Speech ended at `at_us`: the utterance closes before packet `before` (the packet
    /// count when it ended after this tick's packets).
    Offset { before: usize, at_us: u64 },
}

/// Packets of this tick, in arrival order, waiting for voice detection and segmentation,
/// and the voice changes the voice system found among them.
#[derive(Component, Clone, Debug, Default)]
pub struct Incoming {
    pub packets: Vec<StagedPacket>,
    pub changes: Vec<VoiceChange>,
}

/// Voice activity of an audio track.
#[derive(Component, Clone, Debug, Default, PartialEq, Eq)]
pub struct Voice {
    pub speaking: bool,
    /// Arrival time of the first packet of the current run of voiced packets (while silent).
    pub run_start_us: Option<u64>,
    /// Arrival time of the newest voiced packet.
    pub last_voiced_us: Option<u64>,
}

/// The most recent packets of an audio track while no utterance is open: the pre-roll an
/// utterance starts with.
#[derive(Component, Clone, Debug, Default)]
pub struct PreRoll {
    pub packets: VecDeque<StagedPacket>,
    /// Accounted bytes of `packets` (part of the buffer's byte count).
    pub bytes: u64,
}

/// The utterance an audio track is recording into, if any.
#[derive(Component, Clone, Debug, Default)]
pub struct Recording {
    pub utterance: Option<Entity>,
    /// The previous utterance reached the maximum length while the speaker still talks: the
    /// next packet opens its continuation without waiting for a new onset.
    pub continues: Option<(crate::ids::UtteranceId, u64)>,
}

/// Throttle of key-frame requests to a video track.
#[derive(Component, Clone, Debug, Default)]
pub struct KeyframeThrottle {
    pub last_request_us: Option<u64>,
}

/// Levels a dominant-speaker detector keeps per audio track (Volfin and Cohen, as in Jitsi's
/// `DominantSpeakerIdentification` and mediasoup's `ActiveSpeakerObserver`): the last 50
/// levels (about a second of 20 ms packets), as volumes (0 silence, 127 loudest), and the
/// track's estimated noise floor.
#[derive(Component, Clone, Debug, PartialEq, Eq)]
pub struct SpeechLevels {
    /// A ring of volumes; `levels[head]` is the most recent.
    pub levels: [u8; SPEECH_LEVELS],
    pub head: u8,
    /// The lowest non-silent volume seen (the track's silence), 0 before any.
    pub min_level: u8,
    /// The lowest volume of the window that may raise `min_level`, and the window's length.
    pub next_min_level: u8,
    pub next_min_len: u16,
    /// Arrival time of the last level (a packet's, or a silence the detector added).
    pub last_level_us: u64,
}

/// Levels kept per track by the dominant-speaker detector.
pub const SPEECH_LEVELS: usize = 50;

impl Default for SpeechLevels {
    fn default() -> Self {
        SpeechLevels {
            levels: [0; SPEECH_LEVELS],
            head: 0,
            min_level: 0,
            next_min_level: 0,
            next_min_len: 0,
            last_level_us: 0,
        }
    }
}
