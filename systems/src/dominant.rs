//! System 3, dominant speaker: which speaker dominates the room now, from the RFC 6464
//! levels of the audio tracks, by the dominant-speaker identification of Volfin and Cohen
//! ("Dominant Speaker Identification for Multipoint Videoconferencing", 2013) as Jitsi's
//! `DominantSpeakerIdentification` and mediasoup's `ActiveSpeakerObserver` implement it, in
//! integers.
//!
//! It runs only when something uses it: the `loudest` policy, or `dominant_speaker.events`
//! (then each change is a `dominant_speaker` event, which the server sends to the room).
//!
//! Per track, every packet's level becomes a volume (`127 - level`: 0 is silence) pushed into a
//! history of the last 50; a track without a level for 40 ms gets a silent one every 40 ms.
//! Every 300 ms of engine time the history gives three speech-activity scores per track:
//! *immediate* (the newest volume in 13 sub-bands, volumes under the track's noise floor
//! counting as silence), *medium* (how many of the newest 5 were loud, over 7 sub-bands) and
//! *long* (how many of the last 10 blocks of 5 were mostly loud). A speaker takes over when
//! its scores beat the dominant speaker's by the paper's thresholds in all three, the
//! immediate by `e^3`, the medium by `e^2`, the long at all; among several, the largest
//! medium score wins. A cough is one loud immediate and at most one loud block, not enough
//! against someone who keeps talking.
//!
//! The scores are `ln C(n, v) + n ln 1/2 - ln λ + λ v` (at least 1e-10) for the three
//! intervals' `(n, λ)`: `(13, 0.78)`, `(5, 24)`, `(10, 47)`. Each `v` takes a few values, so
//! the scores are tables of integers in units of 1e-10 (a test recomputes them), and the
//! comparisons of their logarithms are integer comparisons.
//!
//! Two departures from mediasoup, both about rooms where nobody has spoken: nobody is dominant
//! until somebody has spoken (mediasoup names the first producer, even a silent one), and when
//! the dominant speaker's track ends the most active remaining speaker is nominated, or nobody.
//! Tracks are walked in name order, so ties go to the first name.

use bevy_ecs::prelude::{Query, Res, ResMut};

use encore_components::config::{EngineConfig, Policy};
use encore_components::ids::MediaKind;
use encore_components::output::Event;
use encore_components::resources::{Directory, Dominance, EngineClock, Outputs};
use encore_components::track::{Incoming, SPEECH_LEVELS, SpeechLevels, Track};

/// A decision every 300 ms (Jitsi's `DECISION_INTERVAL`, mediasoup's default interval).
pub const DECISION_INTERVAL_US: u64 = 300_000;
/// A track without a level for this long gets a silent one (`LEVEL_IDLE_TIMEOUT`).
pub const LEVEL_IDLE_US: u64 = 40_000;
/// Volumes received before the noise floor may rise: 15 s of 20 ms packets.
const MIN_LEVEL_WINDOW: u16 = 15 * 1000 / 20;
/// The width of one of the 13 sub-bands of the volume range: `(127 + 13 - 1) / 13`.
const SUBUNIT: u8 = 10;
/// An immediate above this is loud (`MEDIUM_THRESHOLD`).
const MEDIUM_THRESHOLD: u8 = 7;
/// A block of 5 immediates with more loud ones than this is loud (`LONG_THRESHOLD`).
const LONG_THRESHOLD: u8 = 4;
/// Immediates per medium block.
const N2: usize = 5;

/// Speech-activity scores in units of 1e-10 for each value of the newest immediate (0-12,
/// `n` 13, `λ` 0.78), medium (0-5, `n` 5, `λ` 24) and long (0-10, `n` 10, `λ` 47).
pub const IMMEDIATE_SCORES: [u64; 13] = [
    1,
    1,
    1,
    1,
    9_298_305_547,
    22_976_172_196,
    33_652_992_921,
    41_452_992_921,
    46_376_172_196,
    48_298_305_547,
    46_935_398_228,
    41_742_568_387,
    31_624_973_695,
];
pub const MEDIUM_SCORES: [u64; 6] =
    [1, 189_656_481_793, 436_587_953_598, 676_587_953_598, 909_656_481_793, 1_133_562_102_669];
pub const LONG_SCORES: [u64; 11] = [
    1,
    385_209_656_857,
    870_250_430_825,
    1_350_058_723_355,
    1_825_654_881_234,
    2_297_478_096_802,
    2_765_654_881_234,
    3_230_058_723_355,
    3_690_250_430_825,
    4_145_209_656_857,
    4_592_183_805_927,
];
/// `e^3` and `e^2` in thousandths, rounded up: the immediate and medium thresholds.
const E3_MILLI: u128 = 20_086;
const E2_MILLI: u128 = 7_390;

/// A track's three scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Activity {
    pub medium: u64,
    pub long: u64,
    pub immediate: u64,
}

impl Activity {
    /// Nothing above the floor in any interval.
    pub fn silent(&self) -> bool {
        *self == Activity { medium: 1, long: 1, immediate: 1 }
    }

    /// Whether `self` takes over from `dominant`: all three relative activities over the
    /// thresholds (`ln(a / d) > c` is `a > d e^c`).
    pub fn beats(&self, dominant: &Activity) -> bool {
        self.immediate as u128 * 1000 > dominant.immediate as u128 * E3_MILLI
            && self.medium as u128 * 1000 > dominant.medium as u128 * E2_MILLI
            && self.long > dominant.long
    }
}

/// Records one volume (0 silence, 127 loudest) received at `at_us`; a late one is ignored.
pub fn level_changed(levels: &mut SpeechLevels, volume: u8, at_us: u64) {
    if at_us < levels.last_level_us {
        return;
    }
    levels.last_level_us = at_us;
    push_level(levels, volume.min(127));
}

fn push_level(levels: &mut SpeechLevels, volume: u8) {
    levels.head = ((levels.head as usize + 1) % SPEECH_LEVELS) as u8;
    levels.levels[levels.head as usize] = volume;
    update_min_level(levels, volume);
}

/// The noise floor: the lowest non-silent volume, raised slowly (to the geometric mean with
/// the lowest of the last 15 s) when the room got louder.
fn update_min_level(levels: &mut SpeechLevels, volume: u8) {
    if volume == 0 {
        return;
    }
    if levels.min_level == 0 || levels.min_level > volume {
        levels.min_level = volume;
        levels.next_min_level = 0;
        levels.next_min_len = 0;
    } else if levels.next_min_level == 0 {
        levels.next_min_level = volume;
        levels.next_min_len = 1;
    } else {
        levels.next_min_level = levels.next_min_level.min(volume);
        levels.next_min_len += 1;
        if levels.next_min_len >= MIN_LEVEL_WINDOW {
            levels.min_level = (levels.min_level as u32 * levels.next_min_level as u32).isqrt().min(127) as u8;
            levels.next_min_level = 0;
            levels.next_min_len = 0;
        }
    }
}

/// The three scores of a track's history.
pub fn activity(levels: &SpeechLevels) -> Activity {
    let floor = levels.min_level.saturating_add(SUBUNIT);
    let immediate = |i: usize| {
        let volume = levels.levels[(levels.head as usize + SPEECH_LEVELS - i) % SPEECH_LEVELS];
        if volume < floor { 0 } else { volume / SUBUNIT }
    };
    let loud_in_block =
        |block: usize| (block * N2..(block + 1) * N2).filter(|i| immediate(*i) > MEDIUM_THRESHOLD).count();
    let mediums: [usize; SPEECH_LEVELS / N2] = std::array::from_fn(loud_in_block);
    let longs = mediums.iter().filter(|m| **m > LONG_THRESHOLD as usize).count();
    Activity {
        immediate: IMMEDIATE_SCORES[immediate(0) as usize],
        medium: MEDIUM_SCORES[mediums[0]],
        long: LONG_SCORES[longs],
    }
}

#[allow(clippy::type_complexity)]
pub fn dominant_speaker(
    config: Res<EngineConfig>,
    clock: Res<EngineClock>,
    directory: Res<Directory>,
    mut dominance: ResMut<Dominance>,
    mut outputs: ResMut<Outputs>,
    mut tracks: Query<(&Track, &Incoming, &mut SpeechLevels)>,
) {
    dominance.changed = false;
    let events = config.dominant_speaker.events();
    if !events && config.recommender.policy != Policy::Loudest {
        return;
    }
    let now = clock.now_us;
    let idle = now >= dominance.next_idle_us;
    if idle {
        // On the 40 ms grid, as decisions are on the 300 ms one: the same ticks whether or
        // not quiet ticks in between were skipped.
        dominance.next_idle_us = (now / LEVEL_IDLE_US + 1) * LEVEL_IDLE_US;
    }
    for entity in directory.tracks.values() {
        let Ok((track, incoming, mut levels)) = tracks.get_mut(*entity) else { continue };
        if track.media != MediaKind::Audio {
            continue;
        }
        for packet in &incoming.packets {
            if let Some(level) = packet.audio_level {
                level_changed(&mut levels, 127 - level.min(127), packet.arrival_us);
            }
        }
        if idle && now.saturating_sub(levels.last_level_us) > LEVEL_IDLE_US {
            // Silence, without moving the time of the last real level.
            push_level(&mut levels, 0);
        }
    }
    // The dominant speaker's track ended: decide again now.
    let gone = dominance.track.as_ref().is_some_and(|name| !directory.tracks.contains_key(name.as_str()));
    if gone {
        dominance.speaker = None;
        dominance.track = None;
    } else if now < dominance.next_decision_us {
        return;
    }
    dominance.next_decision_us = (now / DECISION_INTERVAL_US + 1) * DECISION_INTERVAL_US;

    let mut candidates = Vec::new();
    for entity in directory.tracks.values() {
        let Ok((track, _, levels)) = tracks.get(*entity) else { continue };
        if track.media == MediaKind::Audio {
            candidates.push((track, activity(levels)));
        }
    }
    let current = dominance.track.as_ref().and_then(|name| candidates.iter().position(|(t, _)| t.name == *name));
    // Nobody dominant: the most active speaker is nominated (the first name among equals),
    // unless nobody has spoken.
    let nominee = current.or_else(|| {
        let mut best: Option<usize> = None;
        for (i, (_, activity)) in candidates.iter().enumerate() {
            if !activity.silent() && best.is_none_or(|b| *activity > candidates[b].1) {
                best = Some(i);
            }
        }
        best
    });
    let mut winner = nominee;
    if let Some(nominee) = nominee {
        let dominant = candidates[nominee].1;
        let mut best_medium = None;
        for (i, (_, activity)) in candidates.iter().enumerate() {
            if i != nominee && activity.beats(&dominant) && best_medium.is_none_or(|m| activity.medium > m) {
                best_medium = Some(activity.medium);
                winner = Some(i);
            }
        }
    }
    let chosen = winner.map(|i| candidates[i].0);
    let new_track = chosen.map(|t| t.name.clone());
    // A change, or the dominant speaker's track ended (with nobody to follow it, a change to
    // nobody).
    if !gone && new_track == dominance.track {
        return;
    }
    dominance.changed = true;
    dominance.speaker = chosen.map(|t| (t.peer_key, t.speaker.clone()));
    dominance.track = new_track;
    if events {
        outputs.out.events.push(Event::DominantSpeaker {
            speaker: dominance.speaker.as_ref().map(|(_, name)| name.clone()),
            track: dominance.track.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Room;

    /// The tables are the formula's values.
    #[test]
    fn the_score_tables_are_the_papers_formula_in_units_of_1e_10() {
        fn score(v: u64, n: u64, lambda: f64) -> u64 {
            let binomial = (0..v).fold(1.0, |c, i| c * (n - i) as f64 / (i + 1) as f64);
            let s = binomial.ln() + n as f64 * 0.5f64.ln() - lambda.ln() + lambda * v as f64;
            (s.max(1e-10) * 1e10).round() as u64
        }
        for (table, n, lambda) in
            [(&IMMEDIATE_SCORES[..], 13, 0.78), (&MEDIUM_SCORES[..], 5, 24.0), (&LONG_SCORES[..], 10, 47.0)]
        {
            for (v, expected) in table.iter().enumerate() {
                let got = score(v as u64, n, lambda);
                assert!(got.abs_diff(*expected) <= 2, "n {n}, v {v}: {got} against {expected}");
            }
        }
        assert_eq!(E3_MILLI, (3f64.exp() * 1000.0).ceil() as u128);
        assert_eq!(E2_MILLI, (2f64.exp() * 1000.0).ceil() as u128);
    }

    fn room() -> Room {
        let mut config = EngineConfig::default();
        config.dominant_speaker.events = Some(true);
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room
    }

    /// The dominant-speaker changes: (tick, speaker).
    fn changes(room: &mut Room, until_us: u64) -> Vec<(u64, Option<String>)> {
        room.run_until(until_us)
            .into_iter()
            .filter_map(|(tick, event)| match event {
                Event::DominantSpeaker { speaker, .. } => Some((tick, speaker.map(|s| s.to_string()))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn silence_makes_nobody_dominant() {
        let mut room = room();
        // Comfort noise (level 95) on one track, DTX-like silence (127) on the other.
        room.sound("a1", 0, 5_000_000, 95);
        room.sound("b1", 0, 5_000_000, 127);
        assert_eq!(changes(&mut room, 5_000_000), vec![]);
    }

    // Every track starts with comfort noise (level 95): the detector learns a track's silence
    // from its quietest levels, so a track heard only talking would count its talk as silence.

    #[test]
    fn a_speaker_taking_over_becomes_dominant_within_a_second_and_silence_keeps_it() {
        let mut room = room();
        room.sound("a1", 0, 200_000, 95);
        room.sound("a1", 200_000, 3_000_000, 30);
        room.sound("b1", 0, 3_000_000, 95);
        room.sound("a1", 3_000_000, 8_000_000, 95);
        room.sound("b1", 3_000_000, 6_000_000, 28);
        // Then both fall silent: bob stays dominant.
        room.sound("b1", 6_000_000, 8_000_000, 95);
        let changes = changes(&mut room, 8_000_000);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].1.as_deref(), Some("alice"));
        assert!(changes[0].0 <= 60, "alice dominant within 600 ms: {changes:?}");
        assert_eq!(changes[1].1.as_deref(), Some("bob"));
        assert!((300..=420).contains(&changes[1].0), "bob takes over within 1.2 s: {changes:?}");
    }

    #[test]
    fn a_cough_does_not_take_over_from_someone_who_keeps_talking() {
        let mut room = room();
        room.sound("a1", 0, 200_000, 95);
        room.sound("a1", 200_000, 6_000_000, 30);
        room.sound("b1", 0, 3_000_000, 95);
        // A loud 100 ms cough, then silence again.
        room.sound("b1", 3_000_000, 3_100_000, 10);
        room.sound("b1", 3_100_000, 6_000_000, 95);
        let changes = changes(&mut room, 6_000_000);
        assert_eq!(changes.iter().map(|(_, s)| s.as_deref()).collect::<Vec<_>>(), vec![Some("alice")]);
    }

    #[test]
    fn when_the_dominant_speaker_leaves_the_next_one_is_nominated_or_nobody() {
        let mut room = room();
        room.sound("a1", 0, 200_000, 95);
        room.sound("a1", 200_000, 2_000_000, 30);
        room.sound("b1", 0, 4_000_000, 95);
        room.push(2_500_000, encore_components::input::Input::Leave { peer: "alice".into() });
        let changes = changes(&mut room, 4_000_000);
        let speakers: Vec<_> = changes.iter().map(|(_, s)| s.as_deref()).collect();
        assert_eq!(speakers, vec![Some("alice"), None], "{changes:?}");
        assert_eq!(changes[1].0, 250, "in the tick alice's track ended");
    }

    #[test]
    fn nothing_runs_and_nothing_is_emitted_unless_asked() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.sound("a1", 0, 2_000_000, 30);
        assert_eq!(changes(&mut room, 2_000_000), vec![]);
    }
}
