//! Synthetic speech, one model for every producer of it (the scenario generator, the load
//! generator): seeded randomness, and talk-spurts on the on-off model of ITU-T P.59.
//!
//! P.59 conversational speech alternates talk-spurts (mean about 1.0 s) and pauses (mean about
//! 1.6 s), both roughly exponential, each speaker independent (so speakers overlap now and
//! then). One spurt in fifty is a long turn (mean 8 s), so some run past the engine's 15 s
//! maximum. Spurts last at least 240 ms and pauses 100 ms (shorter ones are not heard as such);
//! every length is a whole number of 20 ms frames. Voiced frames carry RFC 6464 levels 18-45
//! and Opus-sized payloads (60-140 bytes); pauses carry comfort noise at dither levels (90-100)
//! in small frames, or DTX.

use encore_systems::components::rng::SplitMix64;

/// One audio frame: 20 ms.
pub const FRAME_US: u64 = 20_000;
/// Mean talk-spurt and pause of P.59 conversational speech.
pub const TALK_MEAN_US: f64 = 1_000_000.0;
pub const PAUSE_MEAN_US: f64 = 1_600_000.0;
/// A long turn: its chance per spurt and its mean.
pub const LONG_TURN_CHANCE: f64 = 0.02;
pub const LONG_TURN_MEAN_US: f64 = 8_000_000.0;
const SPURT_US: (u64, u64) = (240_000, 25_000_000);
const PAUSE_US: (u64, u64) = (100_000, 30_000_000);

/// Seeded randomness with the draws synthetic speech needs.
pub struct SeededRng(SplitMix64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng(SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in [low, high).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low).max(1)
    }

    /// Exponential with the given mean, in microseconds.
    pub fn exp_us(&mut self, mean_us: f64) -> u64 {
        (-mean_us * (1.0 - self.unit()).ln()) as u64
    }
}

/// A talk-spurt or a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    pub talking: bool,
    /// A whole number of frames.
    pub length_us: u64,
}

/// One speaker's alternation of talk-spurts and pauses. It starts in a pause, so that speakers
/// do not all begin together.
#[derive(Debug, Clone)]
pub struct TalkSpurts {
    talking: bool,
}

impl Default for TalkSpurts {
    fn default() -> Self {
        Self::new()
    }
}

impl TalkSpurts {
    pub fn new() -> Self {
        // The first phase drawn is a pause.
        TalkSpurts { talking: true }
    }

    /// The next phase.
    pub fn next_phase(&mut self, rng: &mut SeededRng) -> Phase {
        self.talking = !self.talking;
        let length_us = if self.talking {
            let mean = if rng.chance(LONG_TURN_CHANCE) { LONG_TURN_MEAN_US } else { TALK_MEAN_US };
            rng.exp_us(mean).clamp(SPURT_US.0, SPURT_US.1)
        } else {
            rng.exp_us(PAUSE_MEAN_US).clamp(PAUSE_US.0, PAUSE_US.1)
        };
        Phase { talking: self.talking, length_us: length_us.div_ceil(FRAME_US) * FRAME_US }
    }
}

/// A voiced frame's RFC 6464 level and payload size.
pub fn voiced_frame(rng: &mut SeededRng) -> (u8, usize) {
    (rng.range(18, 46) as u8, rng.range(60, 141) as usize)
}

/// A comfort-noise frame's level (dither, never voice) and payload size.
pub fn comfort_noise_frame(rng: &mut SeededRng) -> (u8, usize) {
    (rng.range(90, 101) as u8, rng.range(8, 20) as usize)
}

/// The same model frame by frame, for a sender on a 20 ms clock (the load generator).
#[derive(Debug, Clone)]
pub struct Frames {
    spurts: TalkSpurts,
    phase: Phase,
    left_us: u64,
}

impl Frames {
    pub fn new(rng: &mut SeededRng) -> Self {
        let mut spurts = TalkSpurts::new();
        let phase = spurts.next_phase(rng);
        Frames { spurts, phase, left_us: phase.length_us }
    }

    /// The next frame: (voiced, level, payload size).
    pub fn next_frame(&mut self, rng: &mut SeededRng) -> (bool, u8, usize) {
        if self.left_us == 0 {
            self.phase = self.spurts.next_phase(rng);
            self.left_us = self.phase.length_us;
        }
        self.left_us -= FRAME_US;
        let (level, size) = if self.phase.talking { voiced_frame(rng) } else { comfort_noise_frame(rng) };
        (self.phase.talking, level, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn talk_averages_close_to_p59_with_its_long_turns() {
        let mut rng = SeededRng::new(3);
        let mut frames = Frames::new(&mut rng);
        let count = 1_000_000;
        let voiced = (0..count).filter(|_| frames.next_frame(&mut rng).0).count();
        let activity = voiced as f64 / count as f64;
        // Spurts: 0.98 x 1.0 s + 0.02 x 8 s = 1.14 s, a little more for the 240 ms floor and the
        // rounding to frames (~1.18 s); pauses ~1.62 s: 1.18 / 2.80 = 0.42.
        assert!((0.39..0.45).contains(&activity), "{activity}");
        for _ in 0..1000 {
            let (voiced, level, size) = frames.next_frame(&mut rng);
            if voiced {
                assert!((18..=45).contains(&level) && (60..=140).contains(&size));
            } else {
                assert!((90..=100).contains(&level) && (8..20).contains(&size));
            }
        }
    }

    #[test]
    fn phases_alternate_from_a_pause_in_whole_frames_within_their_bounds() {
        let mut rng = SeededRng::new(9);
        let mut spurts = TalkSpurts::new();
        for i in 0..2000 {
            let phase = spurts.next_phase(&mut rng);
            assert_eq!(phase.talking, i % 2 == 1);
            assert_eq!(phase.length_us % FRAME_US, 0);
            let (low, high) = if phase.talking { SPURT_US } else { PAUSE_US };
            assert!((low..=high.div_ceil(FRAME_US) * FRAME_US).contains(&phase.length_us), "{phase:?}");
        }
    }
}
