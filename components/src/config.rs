//! Engine configuration: every knob the systems read, with the defaults a production room uses.
//!
//! All durations are in milliseconds (as people write them); the systems convert to
//! microseconds once. A scenario header or a server configuration may override any key;
//! unknown keys are an error, so a typo never silently falls back to a default.

use bevy_ecs::prelude::Resource;
use serde::{Deserialize, Serialize};

/// The whole engine configuration. One per room.
#[derive(Resource, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Length of one tick.
    pub tick_ms: u64,
    /// Cap on the recorded buffer, in bytes (payload plus per-packet bookkeeping), held at
    /// the end of every tick.
    pub buffer_max_bytes: u64,
    /// Longest utterance; a longer talk continues as the speaker's next utterance.
    pub max_utterance_ms: u64,
    /// Audio kept from before the first voiced packet, so the first syllable is not clipped.
    pub preroll_ms: u64,
    /// Seed of the engine's random source (initial SSRCs, sequence numbers and timestamps
    /// of outgoing streams).
    pub seed: u64,
    pub vad: VadConfig,
    /// Dominant-speaker detection (written only when it differs from the defaults).
    #[serde(skip_serializing_if = "DominantSpeakerConfig::is_default")]
    pub dominant_speaker: DominantSpeakerConfig,
    pub recommender: RecommenderConfig,
    /// How a listener's stream moves through what it plays: pauses shortened when time-shifted,
    /// switches at pauses. Left out when it is [`PlayoutConfig::LEGACY`], the behaviour of
    /// scenarios and recordings written before it existed (see docs/scenario-format.md).
    #[serde(skip_serializing_if = "PlayoutConfig::is_legacy")]
    pub playout: PlayoutConfig,
    pub limits: LimitsConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            tick_ms: 10,
            buffer_max_bytes: 1_000_000_000,
            max_utterance_ms: 15_000,
            preroll_ms: 200,
            seed: 0,
            vad: VadConfig::default(),
            dominant_speaker: DominantSpeakerConfig::default(),
            recommender: RecommenderConfig::default(),
            playout: PlayoutConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

/// Play-out beyond pacing: what a time-shifted listener skips, and when a switch happens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlayoutConfig {
    /// A time-shifted route (one that plays behind live at the original pace) keeps at most
    /// this much of any pause in its utterance, and drops the rest of the pause's silent audio
    /// packets (timestamps stay continuous), so its lag shrinks without touching speech.
    /// 0 keeps pauses whole. Utterances with video keep theirs (video cannot skip frames).
    pub max_pause_ms: u64,
    /// A switch (a busy listener leaving its utterance for a much better new one) waits for a
    /// pause at least this long in what it plays, so it does not cut a word...
    pub switch_pause_ms: u64,
    /// ...but at most this long after it was decided. 0 switches at once.
    pub switch_wait_ms: u64,
    /// After a switch, the utterance it cut is played again from where it was cut once the
    /// listener is done with the new one (finished or skipped it), unless it is gone.
    pub resume_cut: bool,
}

impl PlayoutConfig {
    /// The behaviour before these settings existed: pauses kept, switches at once, nothing
    /// resumed. What a scenario or recording that does not name `playout` replays with.
    pub const LEGACY: PlayoutConfig =
        PlayoutConfig { max_pause_ms: 0, switch_pause_ms: 200, switch_wait_ms: 0, resume_cut: false };

    pub fn is_legacy(&self) -> bool {
        *self == PlayoutConfig::LEGACY
    }
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        PlayoutConfig { max_pause_ms: 250, switch_pause_ms: 200, switch_wait_ms: 2_000, resume_cut: true }
    }
}

/// Voice activity detection from the RFC 6464 audio level (0 is loudest, 127 silence).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VadConfig {
    /// Voiced packets needed, back to back, before an utterance opens.
    pub onset_ms: u64,
    /// Time without a voiced packet after which the utterance closes.
    pub hangover_ms: u64,
    /// A packet at this level or louder (a number at most this) is voiced.
    pub level_threshold: u8,
    /// With the V flag set by the sender, a packet at this level or louder is voiced.
    /// Senders that never set V (aiortc) are judged by `level_threshold` alone.
    pub voice_flag_level_threshold: u8,
    /// Without the audio-level extension: a payload larger than this is voiced (Opus DTX
    /// and comfort-noise packets are 1 to 3 bytes).
    pub dtx_max_bytes: usize,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            onset_ms: 40,
            hangover_ms: 400,
            level_threshold: 50,
            voice_flag_level_threshold: 70,
            dtx_max_bytes: 3,
        }
    }
}

/// Dominant-speaker identification (Volfin and Cohen, as in mediasoup's ActiveSpeakerObserver),
/// from the RFC 6464 levels of the audio tracks. It runs when the `loudest` policy needs it or
/// when `events` asks for `dominant_speaker` events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DominantSpeakerConfig {
    /// Emit a `dominant_speaker` event when the dominant speaker changes. Unset means no in
    /// the engine (so that replays of files that never asked for them stay as they were);
    /// `encore serve` sets it to yes unless its configuration says otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<bool>,
}

impl DominantSpeakerConfig {
    pub fn is_default(&self) -> bool {
        *self == DominantSpeakerConfig::default()
    }

    pub fn events(&self) -> bool {
        self.events.unwrap_or(false)
    }
}

/// Which recommender picks what each listener hears.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Oldest unheard utterance first: the room in the order it was said.
    Fifo,
    /// The dominant speaker's live utterance, as an SFU that follows the active speaker.
    Loudest,
    /// The hand-tuned integer rules (follow, affinity from likes and skips, live, lag,
    /// freshness, blips); the default until the learning recommender measured better.
    Rules,
    /// Learnt per listener from skips, likes and listen-through, with a room-level signal
    /// from listeners of similar taste (`recommender.learn`). The default.
    #[default]
    Learn,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::Fifo, Policy::Loudest, Policy::Rules, Policy::Learn];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::Loudest => "loudest",
            Policy::Rules => "rules",
            Policy::Learn => "learn",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| format!("unknown recommender policy {text:?} (expected fifo, loudest, rules or learn)"))
    }
}

/// The learning recommender (`policy = "learn"`). Scores are in thousandths of a predicted
/// reward (a listen-through is worth 700, a like 300 more), so the terms read as "how much
/// this listener is expected to get from this utterance".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnConfig {
    /// Added when the listener follows the speaker.
    pub follow: i64,
    /// Lost per second the listener would be behind live.
    pub lag_per_s: i64,
    /// Utterances that started longer ago than this are not candidates.
    pub max_lag_ms: u64,
    /// A decision scores at most this many candidates, the freshest the listener has not heard.
    pub candidates: usize,
    /// The largest exploration bonus, drawn from the engine's seeded source and shrinking
    /// as the listener tries the speaker: `explore / sqrt(1 + trials)` at most.
    pub explore: i64,
    /// The most that listeners' verdicts on this very utterance (finished, liked, skipped;
    /// those of similar taste count double) add or remove.
    pub utterance: i64,
    /// Lowest score an idle listener accepts.
    pub accept_min: i64,
    /// A busy listener switches mid-utterance only to a candidate scoring this much more.
    pub switch_margin: i64,
    /// Listeners are put in taste groups (by favourite speaker) whose rewards and verdicts
    /// they share; without, the whole room's stand for every listener's group.
    pub groups: bool,
}

impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig {
            follow: 300,
            lag_per_s: 100,
            max_lag_ms: 15_000,
            candidates: 16,
            explore: 150,
            utterance: 250,
            accept_min: 150,
            switch_margin: 500,
            groups: true,
        }
    }
}

/// The recommender: its policy, and for `rules` a score that is a sum of named integer terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecommenderConfig {
    /// Which recommender (`fifo`, `loudest`, `rules`, `learn`). A scenario or recording whose
    /// configuration does not name one predates the choice and is read as `rules` (see
    /// docs/scenario-format.md); everything else defaults to `learn`.
    pub policy: Policy,
    /// Every candidate starts here.
    pub base: i64,
    /// Added when the listener follows the speaker.
    pub follow: i64,
    /// Affinity gained per like of one of the speaker's utterances.
    pub like: i64,
    /// Affinity lost per skip (a positive number, subtracted).
    pub skip: i64,
    /// Affinity is clamped to plus or minus this.
    pub affinity_limit: i64,
    /// Added while the speaker is still talking (the utterance is open).
    pub live: i64,
    /// Lost per second the listener would be behind live when starting the utterance now.
    pub lag_per_s: i64,
    /// Lost per second since the utterance ended.
    pub freshness_per_s: i64,
    /// A finished utterance shorter than this is a blip.
    pub blip_ms: u64,
    /// Lost by a blip (a positive number, subtracted).
    pub blip: i64,
    /// Lowest score an idle listener accepts.
    pub accept_min: i64,
    /// A busy listener switches mid-utterance only to a candidate scoring at least this much
    /// more than what it plays.
    pub switch_margin: i64,
    /// Only utterances that started within this window are candidates.
    pub window_ms: u64,
    /// At most this many of the newest utterances are scored per decision.
    pub max_candidates: usize,
    /// The learning recommender's settings.
    pub learn: LearnConfig,
}

impl Default for RecommenderConfig {
    fn default() -> Self {
        RecommenderConfig {
            policy: Policy::Learn,
            base: 1000,
            follow: 1000,
            like: 300,
            skip: 400,
            affinity_limit: 1200,
            live: 300,
            lag_per_s: 40,
            freshness_per_s: 20,
            blip_ms: 600,
            blip: 500,
            accept_min: 0,
            switch_margin: 800,
            window_ms: 120_000,
            max_candidates: 256,
            learn: LearnConfig::default(),
        }
    }
}

/// Bounds that keep one misbehaving peer from hurting the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest RTP payload accepted.
    pub max_payload_bytes: usize,
    /// RTP packets accepted per track per tick; the rest are dropped as a flood.
    pub max_packets_per_track_per_tick: u32,
    /// How far behind the newest sequence number a packet may arrive and still be kept.
    pub reorder_window: u16,
    /// Sent packets remembered per outgoing stream for NACKs (256 is 5 s of audio; a NACK
    /// arrives within a round trip).
    pub nack_history: u16,
    /// Least time between two key-frame requests sent to one video track.
    pub keyframe_interval_ms: u64,
    /// Sequence numbers one NACK may name.
    pub max_nack_seqs: usize,
    /// A packet is sent again to a listener at most once in this interval (about a round
    /// trip: a retransmission still in flight is not worth sending twice).
    pub nack_resend_interval_ms: u64,
    /// Retransmissions a listener may have, as a share of what its stream sends: each packet
    /// sent earns this many hundredths of a retransmission. NACKs past it are refused (and
    /// counted), so a listener that NACKs everything costs at most this share more.
    pub retransmit_percent: u32,
    /// Retransmissions a listener may have at once (the bucket a burst of losses draws on).
    pub retransmit_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_payload_bytes: 1500,
            max_packets_per_track_per_tick: 64,
            reorder_window: 512,
            nack_history: 256,
            keyframe_interval_ms: 500,
            max_nack_seqs: 256,
            nack_resend_interval_ms: 100,
            retransmit_percent: 25,
            retransmit_burst: 32,
        }
    }
}

/// A configuration that cannot run, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid engine configuration: `{key}` {problem}")]
pub struct EngineConfigError {
    pub key: &'static str,
    pub problem: String,
}

impl EngineConfig {
    /// Checks the values that would make the engine misbehave rather than merely behave
    /// differently.
    pub fn validate(&self) -> Result<(), EngineConfigError> {
        fn fail(key: &'static str, problem: impl Into<String>) -> Result<(), EngineConfigError> {
            Err(EngineConfigError { key, problem: problem.into() })
        }
        if self.tick_ms == 0 || self.tick_ms > 1000 {
            return fail("tick_ms", format!("must be between 1 and 1000, got {}", self.tick_ms));
        }
        if self.max_utterance_ms < self.tick_ms.max(100) {
            return fail(
                "max_utterance_ms",
                format!("must be at least 100 and at least one tick, got {}", self.max_utterance_ms),
            );
        }
        if self.max_utterance_ms > 600_000 {
            return fail("max_utterance_ms", format!("must be at most 600000, got {}", self.max_utterance_ms));
        }
        if self.preroll_ms > 2_000 {
            return fail("preroll_ms", format!("must be at most 2000, got {}", self.preroll_ms));
        }
        if self.vad.hangover_ms == 0 || self.vad.hangover_ms > 10_000 {
            return fail("vad.hangover_ms", format!("must be between 1 and 10000, got {}", self.vad.hangover_ms));
        }
        if self.vad.onset_ms > 2_000 {
            return fail("vad.onset_ms", format!("must be at most 2000, got {}", self.vad.onset_ms));
        }
        if self.vad.level_threshold > 127 || self.vad.voice_flag_level_threshold > 127 {
            return fail("vad.level_threshold", "levels are 0 (loudest) to 127 (silence)");
        }
        let r = &self.recommender;
        if r.skip < 0 || r.blip < 0 || r.lag_per_s < 0 || r.freshness_per_s < 0 || r.affinity_limit < 0 {
            return fail(
                "recommender",
                "skip, blip, lag_per_s, freshness_per_s and affinity_limit are magnitudes and must not be negative",
            );
        }
        if r.switch_margin < 0 {
            return fail("recommender.switch_margin", "must not be negative");
        }
        if r.max_candidates == 0 {
            return fail("recommender.max_candidates", "must be at least 1");
        }
        let l = &r.learn;
        if l.lag_per_s < 0 || l.explore < 0 || l.utterance < 0 || l.switch_margin < 0 {
            return fail(
                "recommender.learn",
                "lag_per_s, explore, utterance and switch_margin are magnitudes and must not be negative",
            );
        }
        if l.candidates == 0 {
            return fail("recommender.learn.candidates", "must be at least 1");
        }
        if l.explore > 1_000_000 || l.utterance > 1_000_000 || l.follow.abs() > 1_000_000 {
            return fail("recommender.learn", "follow, explore and utterance must be within 1000000");
        }
        let p = &self.playout;
        if p.max_pause_ms > 10_000 {
            return fail("playout.max_pause_ms", format!("must be at most 10000, got {}", p.max_pause_ms));
        }
        if p.switch_pause_ms == 0 || p.switch_pause_ms > 5_000 {
            return fail("playout.switch_pause_ms", format!("must be between 1 and 5000, got {}", p.switch_pause_ms));
        }
        if p.switch_wait_ms > 60_000 {
            return fail("playout.switch_wait_ms", format!("must be at most 60000, got {}", p.switch_wait_ms));
        }
        if self.limits.max_payload_bytes == 0 || self.limits.max_payload_bytes > 65_535 {
            return fail("limits.max_payload_bytes", "must be between 1 and 65535");
        }
        if self.limits.max_packets_per_track_per_tick == 0 {
            return fail("limits.max_packets_per_track_per_tick", "must be at least 1");
        }
        if self.limits.reorder_window == 0 || self.limits.reorder_window > 4096 {
            return fail("limits.reorder_window", "must be between 1 and 4096");
        }
        if self.limits.nack_history == 0 || self.limits.nack_history > 8192 {
            return fail("limits.nack_history", "must be between 1 and 8192");
        }
        if self.limits.nack_resend_interval_ms > 10_000 {
            return fail("limits.nack_resend_interval_ms", "must be at most 10000");
        }
        if self.limits.retransmit_percent > 1_000 {
            return fail("limits.retransmit_percent", "must be at most 1000");
        }
        if self.limits.retransmit_burst > 10_000 {
            return fail("limits.retransmit_burst", "must be at most 10000");
        }
        Ok(())
    }

    pub fn tick_us(&self) -> u64 {
        self.tick_ms * 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documented_values() {
        let config = EngineConfig::default();
        config.validate().unwrap();
        assert_eq!(config.tick_us(), 10_000);
        assert_eq!(config.buffer_max_bytes, 1_000_000_000);
        assert_eq!(config.max_utterance_ms, 15_000);
        assert_eq!(config.preroll_ms, 200);
        assert_eq!((config.vad.onset_ms, config.vad.hangover_ms), (40, 400));
    }

    #[test]
    fn partial_json_overrides_only_what_it_names() {
        let config: EngineConfig =
            serde_json::from_str(r#"{"buffer_max_bytes": 5000, "vad": {"hangover_ms": 300}}"#).unwrap();
        assert_eq!(config.buffer_max_bytes, 5000);
        assert_eq!(config.vad.hangover_ms, 300);
        assert_eq!(config.vad.onset_ms, 40);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = serde_json::from_str::<EngineConfig>(r#"{"buffer_max_byte": 5}"#).unwrap_err();
        assert!(err.to_string().contains("buffer_max_byte"), "{err}");
    }

    #[test]
    fn the_policy_is_always_written_and_dominant_speaker_only_when_set() {
        let text = serde_json::to_string(&EngineConfig::default()).unwrap();
        assert!(!text.contains("dominant_speaker"), "{text}");
        assert!(text.contains(r#""policy":"learn""#) && text.contains(r#""learn":{"#), "{text}");
        let config: EngineConfig = serde_json::from_str(
            r#"{"recommender": {"policy": "learn", "learn": {"explore": 0}}, "dominant_speaker": {"events": true}}"#,
        )
        .unwrap();
        assert_eq!(config.recommender.policy, Policy::Learn);
        assert_eq!(config.recommender.learn.explore, 0);
        assert!(config.dominant_speaker.events());
        let text = serde_json::to_string(&config).unwrap();
        assert!(text.contains(r#""policy":"learn""#) && text.contains(r#""events":true"#), "{text}");
        let again: EngineConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(again, config);
        assert!(serde_json::from_str::<EngineConfig>(r#"{"recommender": {"policy": "random"}}"#).is_err());
        assert_eq!("loudest".parse::<Policy>(), Ok(Policy::Loudest));
    }

    #[test]
    fn invalid_values_name_their_key() {
        let config = EngineConfig { tick_ms: 0, ..EngineConfig::default() };
        assert_eq!(config.validate().unwrap_err().key, "tick_ms");
        let config = EngineConfig { max_utterance_ms: 5, ..EngineConfig::default() };
        assert_eq!(config.validate().unwrap_err().key, "max_utterance_ms");
    }
}
