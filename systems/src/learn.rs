//! System 8, learn: the learning recommender's model, updated from what listeners do (the
//! `learn` policy; under the others it only empties its queue).
//!
//! Each verdict of the tick (route: every listener taken off an utterance, with how it ended;
//! ingest: likes, and skips of utterances not playing) is a reward for the listener's arm of
//! the speaker: a listen-through 700 thousandths and a trial, a like 300 more, a skip a trial
//! worth 50 a second of what was heard before it (at most 350), a mute a trial worth nothing;
//! an interruption by the engine (a switch, an eviction) teaches nothing. The same reward goes
//! to the speaker's sums in the listener's taste group and in the room, whose means (with a
//! prior: the room's from 500, a group's from the room's) are kept up to date, one division a
//! verdict; and the verdict itself is counted on the utterance with how long it was heard, for
//! the listeners who are offered it later (its skips per second heard against the room's).
//!
//! A listener's taste group is its favourite speaker (the best mean of those it judged at
//! least twice, if better than 500): listeners who like the same speaker best are taken to
//! like alike. Groups are looked at again for at most [`REGROUP_PER_TICK`] listeners a tick,
//! in key order, which moves their rewards from the old group's sums to the new one's.

use bevy_ecs::prelude::{Res, ResMut};

use encore_components::config::{EngineConfig, Policy};
use encore_components::ids::{PeerKey, UtteranceOrd};
use encore_components::learner::{
    Group, Learner, ListenerTaste, Rated, Reward, SpeakerSlot, UtteranceVerdicts, Verdicts,
};
use encore_components::resources::{Directory, EngineClock, ListenOutcome, ListenOutcomes, Verdict};

/// A listen-through's reward, in thousandths.
pub const FINISH: u64 = 700;
/// A like's.
pub const LIKE: u64 = 300;
/// A skip's, per second heard before it, and at most.
pub const SKIP_PER_S: u64 = 50;
pub const SKIP_MAX: u64 = 350;
/// The largest mean reward.
pub const REWARD_MAX: i64 = 1000;
/// The mean before anything is known.
pub const PRIOR_RATE: i64 = 500;
/// Pseudo-trials of the priors: the room's (at 500), a group's (at the room's mean) and a
/// listener's own (at its group's mean).
pub const ROOM_PRIOR_TRIALS: u64 = 2;
pub const GROUP_PRIOR_TRIALS: u64 = 4;
pub const PERSONAL_PRIOR_TRIALS: u64 = 3;
/// Judged utterances of a speaker before it can be a listener's favourite.
pub const FAVOURITE_TRIALS: u64 = 2;
/// Listeners whose group is looked at again per tick, at most.
pub const REGROUP_PER_TICK: usize = 8;
/// How often the verdicts of utterances no longer in the buffer are forgotten.
const PRUNE_INTERVAL_US: u64 = 1_000_000;

/// The mean reward with `prior_trials` pseudo-trials at `prior`, within 0..=1000.
pub fn mean(reward: Reward, prior: i64, prior_trials: u64) -> i64 {
    let sum = (reward.sum as i64).saturating_add(prior.saturating_mul(prior_trials as i64));
    let trials = reward.trials.saturating_add(prior_trials).max(1) as i64;
    (sum / trials).clamp(0, REWARD_MAX)
}

/// A listener's predicted reward from a speaker: its own rewards with its group's mean as
/// the prior.
pub fn estimate(own: Reward, prior: i64) -> i64 {
    if own == Reward::default() { prior } else { mean(own, prior, PERSONAL_PRIOR_TRIALS) }
}

/// The mean reward of a speaker in a group (the room's for group 0); the prior for a speaker
/// not heard of.
pub fn rate(learner: &Learner, group: Group, slot: SpeakerSlot) -> i64 {
    let rated = match group {
        0 => learner.room.get(slot as usize),
        g => learner.groups.get(g as usize).and_then(|g| g.get(slot as usize)),
    };
    rated.map_or(PRIOR_RATE, |r| r.rate)
}

/// The speaker's slot, given now if it has none.
pub fn slot_for(learner: &mut Learner, speaker: PeerKey) -> SpeakerSlot {
    if let Some(slot) = learner.slot(speaker) {
        return slot;
    }
    let slot = learner.speakers;
    learner.speakers += 1;
    let index = speaker.0 as usize;
    if learner.slots.len() <= index {
        learner.slots.resize(index + 1, None);
    }
    learner.slots[index] = Some(slot);
    let fresh = Rated { reward: Reward::default(), rate: PRIOR_RATE };
    learner.room.push(fresh);
    if learner.groups.is_empty() {
        // Group 0 keeps no sums.
        learner.groups.push(Vec::new());
    }
    for group in learner.groups.iter_mut().skip(1) {
        group.push(fresh);
    }
    // The group of the listeners whose favourite this speaker is.
    learner.groups.push(vec![fresh; learner.speakers as usize]);
    slot
}

fn taste_mut(learner: &mut Learner, key: PeerKey) -> &mut ListenerTaste {
    let index = key.0 as usize;
    if learner.listeners.len() <= index {
        learner.listeners.resize(index + 1, ListenerTaste::default());
    }
    &mut learner.listeners[index]
}

/// Adds (or with `remove`, takes away) a reward to a group's sums for a speaker.
fn group_reward(learner: &mut Learner, group: Group, slot: SpeakerSlot, reward: Reward, remove: bool) {
    if group == 0 {
        return;
    }
    let room_rate = rate(learner, 0, slot);
    let Some(rated) = learner.groups.get_mut(group as usize).and_then(|g| g.get_mut(slot as usize)) else { return };
    if remove {
        rated.reward.remove(reward);
    } else {
        rated.reward.add(reward);
    }
    rated.rate = mean(rated.reward, room_rate, GROUP_PRIOR_TRIALS);
}

/// What a verdict is worth.
pub fn reward(verdict: Verdict, heard_us: u64) -> Option<Reward> {
    Some(match verdict {
        Verdict::Finished => Reward { sum: FINISH, trials: 1 },
        Verdict::Skipped => Reward { sum: (heard_us * SKIP_PER_S / 1_000_000).min(SKIP_MAX), trials: 1 },
        Verdict::Liked => Reward { sum: LIKE, trials: 0 },
        Verdict::Muted => Reward { sum: 0, trials: 1 },
        Verdict::Interrupted | Verdict::Started => return None,
    })
}

fn verdicts_mut(learner: &mut Learner, utterance: UtteranceOrd, group: Group) -> [Option<&mut Verdicts>; 2] {
    let entry = learner.utterances.entry(utterance).or_default();
    let UtteranceVerdicts { all, by_group } = entry;
    let mine = (group != 0).then(|| {
        let i = match by_group.binary_search_by_key(&group, |(g, _)| *g) {
            Ok(i) => i,
            Err(i) => {
                by_group.insert(i, (group, Verdicts::default()));
                i
            }
        };
        &mut by_group[i].1
    });
    [Some(all), mine]
}

/// Exposure: a listener starts playing an utterance, or stops (heard for `heard_us`).
fn exposure(learner: &mut Learner, outcome: &ListenOutcome, now_ms: u64) {
    let taste = taste_mut(learner, outcome.listener);
    let previous = taste.playing.take();
    if outcome.verdict == Verdict::Started {
        taste.playing = Some((outcome.utterance, taste.group, now_ms));
        // One that ended without a word (its utterance evicted): nothing to take back but its
        // count, if its verdicts are still kept.
        if let Some((ord, group, since_ms)) = previous
            && learner.utterances.contains_key(&ord)
        {
            for v in verdicts_mut(learner, ord, group).into_iter().flatten() {
                v.playing = v.playing.saturating_sub(1);
                v.since_ms = v.since_ms.saturating_sub(since_ms);
                v.heard_ms += now_ms.saturating_sub(since_ms);
            }
        }
        let group = learner.listeners[outcome.listener.0 as usize].group;
        for v in verdicts_mut(learner, outcome.utterance, group).into_iter().flatten() {
            v.playing += 1;
            v.since_ms += now_ms;
        }
        return;
    }
    let heard_ms = outcome.heard_us / 1000;
    match previous {
        Some((ord, group, since_ms)) if ord == outcome.utterance => {
            for v in verdicts_mut(learner, ord, group).into_iter().flatten() {
                v.playing = v.playing.saturating_sub(1);
                v.since_ms = v.since_ms.saturating_sub(since_ms);
                v.heard_ms += heard_ms;
            }
        }
        // A verdict on another utterance (a like, a skip from the list): it still plays this.
        other => taste_mut(learner, outcome.listener).playing = other,
    }
    learner.heard_ms += heard_ms;
}

/// Takes one verdict into the model at `now_us`.
pub fn record(learner: &mut Learner, outcome: &ListenOutcome, now_us: u64) {
    if outcome.verdict != Verdict::Liked {
        exposure(learner, outcome, now_us / 1000);
    }
    let Some(delta) = reward(outcome.verdict, outcome.heard_us) else { return };
    let slot = slot_for(learner, outcome.speaker);
    let taste = taste_mut(learner, outcome.listener);
    if taste.by_speaker.len() <= slot as usize {
        taste.by_speaker.resize(slot as usize + 1, Reward::default());
    }
    taste.by_speaker[slot as usize].add(delta);
    let group = taste.group;
    let room = &mut learner.room[slot as usize];
    room.reward.add(delta);
    room.rate = mean(room.reward, PRIOR_RATE, ROOM_PRIOR_TRIALS);
    group_reward(learner, group, slot, delta, false);
    let skipped = matches!(outcome.verdict, Verdict::Skipped | Verdict::Muted);
    learner.skips += u64::from(skipped);
    for v in verdicts_mut(learner, outcome.utterance, group).into_iter().flatten() {
        match outcome.verdict {
            Verdict::Finished => v.finished += 1,
            Verdict::Liked => v.liked += 1,
            Verdict::Skipped | Verdict::Muted => v.skipped += 1,
            Verdict::Interrupted | Verdict::Started => {}
        }
    }
    if delta.trials > 0 {
        learner.regroup.insert(outcome.listener);
    }
}

/// The listener's favourite speaker: the best mean (from a prior of 500 over 2 pseudo-trials)
/// among those judged at least [`FAVOURITE_TRIALS`] times, if over 500; the smaller slot
/// among equals.
pub fn favourite(taste: &ListenerTaste) -> Option<SpeakerSlot> {
    let mut best: Option<(SpeakerSlot, u64, u64)> = None;
    for (slot, reward) in taste.by_speaker.iter().enumerate() {
        if reward.trials < FAVOURITE_TRIALS {
            continue;
        }
        let (num, den) = (reward.sum + PRIOR_RATE as u64 * 2, reward.trials + 2);
        if num <= PRIOR_RATE as u64 * den {
            continue;
        }
        if best.is_none_or(|(_, n, d)| num as u128 * d as u128 > n as u128 * den as u128) {
            best = Some((slot as SpeakerSlot, num, den));
        }
    }
    best.map(|(slot, _, _)| slot)
}

/// Puts a listener in the group of its favourite speaker, moving its rewards.
pub fn regroup(learner: &mut Learner, key: PeerKey) {
    let Some(taste) = learner.listeners.get(key.0 as usize) else { return };
    let old = taste.group;
    let new = favourite(taste).map_or(0, |slot| slot + 1);
    if new == old {
        return;
    }
    let rewards = std::mem::take(&mut learner.listeners[key.0 as usize].by_speaker);
    for (slot, reward) in rewards.iter().enumerate() {
        if *reward != Reward::default() {
            group_reward(learner, old, slot as SpeakerSlot, *reward, true);
            group_reward(learner, new, slot as SpeakerSlot, *reward, false);
        }
    }
    let taste = &mut learner.listeners[key.0 as usize];
    taste.by_speaker = rewards;
    taste.group = new;
}

pub fn learn(
    config: Res<EngineConfig>,
    clock: Res<EngineClock>,
    directory: Res<Directory>,
    mut learner: ResMut<Learner>,
    mut outcomes: ResMut<ListenOutcomes>,
) {
    if config.recommender.policy != Policy::Learn {
        outcomes.list.clear();
        return;
    }
    for outcome in outcomes.list.drain(..) {
        record(&mut learner, &outcome, clock.now_us);
    }
    if config.recommender.learn.groups {
        for _ in 0..REGROUP_PER_TICK {
            let Some(key) = learner.regroup.pop_first() else { break };
            regroup(&mut learner, key);
        }
    } else {
        learner.regroup.clear();
    }
    if clock.now_us >= learner.next_prune_us {
        learner.next_prune_us = (clock.now_us / PRUNE_INTERVAL_US + 1) * PRUNE_INTERVAL_US;
        learner.utterances.retain(|ord, _| directory.utterances.contains_key(ord));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(listener: u32, speaker: u32, utterance: u64, verdict: Verdict, heard_us: u64) -> ListenOutcome {
        ListenOutcome {
            listener: PeerKey(listener),
            speaker: PeerKey(speaker),
            utterance: UtteranceOrd(utterance),
            verdict,
            heard_us,
        }
    }

    #[test]
    fn verdicts_are_rewards_and_an_interruption_teaches_nothing() {
        assert_eq!(reward(Verdict::Finished, 9), Some(Reward { sum: 700, trials: 1 }));
        assert_eq!(reward(Verdict::Liked, 0), Some(Reward { sum: 300, trials: 0 }));
        assert_eq!(reward(Verdict::Skipped, 2_000_000), Some(Reward { sum: 100, trials: 1 }));
        assert_eq!(reward(Verdict::Skipped, 60_000_000), Some(Reward { sum: 350, trials: 1 }));
        assert_eq!(reward(Verdict::Muted, 5), Some(Reward { sum: 0, trials: 1 }));
        assert_eq!(reward(Verdict::Interrupted, 5), None);
    }

    #[test]
    fn a_listener_joins_the_group_of_its_favourite_and_its_rewards_move_with_it() {
        let mut learner = Learner::default();
        // Listener 10 finishes and likes speaker 1 twice, skips speaker 2 at once twice.
        for (i, (speaker, verdict)) in
            [(1, Verdict::Finished), (1, Verdict::Liked), (2, Verdict::Skipped)].iter().cycle().take(6).enumerate()
        {
            record(&mut learner, &outcome(10, *speaker, i as u64, *verdict, 0), 0);
        }
        let slot1 = learner.slot(PeerKey(1)).unwrap();
        let slot2 = learner.slot(PeerKey(2)).unwrap();
        assert_eq!((slot1, slot2), (0, 1), "slots in the order speakers were heard of");
        assert_eq!(learner.room[0].reward, Reward { sum: 2000, trials: 2 });
        assert_eq!(learner.room[0].rate, (2000 + 2 * 500) / 4);
        assert_eq!(learner.regroup.iter().copied().collect::<Vec<_>>(), vec![PeerKey(10)]);
        regroup(&mut learner, PeerKey(10));
        let taste = &learner.listeners[10];
        assert_eq!(taste.group, 1, "speaker 1's group");
        assert_eq!(learner.groups[1][0].reward, Reward { sum: 2000, trials: 2 });
        assert_eq!(learner.groups[1][1].reward, Reward { sum: 0, trials: 2 });
        // The group's mean of speaker 2 starts from the room's.
        assert_eq!(learner.groups[1][1].rate, (4 * learner.room[1].rate) / 6);
        // A later verdict goes to the group's sums at once.
        record(&mut learner, &outcome(10, 2, 9, Verdict::Finished, 0), 0);
        assert_eq!(learner.groups[1][1].reward, Reward { sum: 700, trials: 3 });
        let verdicts = &learner.utterances[&UtteranceOrd(9)];
        assert_eq!((verdicts.all.finished, verdicts.group(1).finished, verdicts.group(2).finished), (1, 1, 0));
        // Skips, for the utterances' skip rates.
        assert_eq!(learner.skips, 2);
    }

    #[test]
    fn exposure_counts_what_listeners_playing_it_have_heard_so_far() {
        let mut learner = Learner::default();
        let at = |learner: &mut Learner, listener: u32, verdict: Verdict, heard_us: u64, now_us: u64| {
            record(learner, &outcome(listener, 1, 7, verdict, heard_us), now_us);
        };
        at(&mut learner, 20, Verdict::Started, 0, 1_000_000);
        at(&mut learner, 21, Verdict::Started, 0, 2_000_000);
        let v = learner.utterances[&UtteranceOrd(7)].all;
        assert_eq!(v.exposure_ms(3_000), 2_000 + 1_000, "both still playing it");
        at(&mut learner, 20, Verdict::Skipped, 2_500_000, 3_500_000);
        let v = learner.utterances[&UtteranceOrd(7)].all;
        assert_eq!((v.playing, v.skipped), (1, 1));
        assert_eq!(v.exposure_ms(4_000), 2_500 + 2_000);
        // A like of another utterance leaves what 21 plays as it was.
        record(&mut learner, &outcome(21, 1, 3, Verdict::Liked, 0), 4_000_000);
        assert_eq!(learner.listeners[21].playing, Some((UtteranceOrd(7), 0, 2_000)));
        assert_eq!((learner.skips, learner.heard_ms), (1, 2_500));
    }

    #[test]
    fn estimates_shrink_own_means_towards_the_groups() {
        assert_eq!(estimate(Reward::default(), 420), 420);
        assert_eq!(estimate(Reward { sum: 3000, trials: 3 }, 400), (3000 + 1200) / 6);
        assert_eq!(estimate(Reward { sum: 90_000, trials: 3 }, 400), 1000, "likes cannot lift it over 1000");
    }

    #[test]
    fn nobody_better_than_neutral_is_a_favourite() {
        let taste = ListenerTaste {
            by_speaker: vec![Reward { sum: 0, trials: 5 }, Reward { sum: 350, trials: 1 }],
            ..Default::default()
        };
        assert_eq!(favourite(&taste), None);
        let taste = ListenerTaste {
            by_speaker: vec![Reward { sum: 1400, trials: 2 }, Reward { sum: 2100, trials: 3 }],
            ..Default::default()
        };
        assert_eq!(favourite(&taste), Some(1), "(2100 + 1000) / 5 = 620 beats (1400 + 1000) / 4 = 600");
    }
}
