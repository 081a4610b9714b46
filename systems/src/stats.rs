//! System 9, stats: the bookkeeping at the end of a tick. Tracks the buffer's peak at tick
//! ends and, once per second of engine time, emits the `stats` line.

use bevy_ecs::prelude::{Query, Res, ResMut};

use encore_components::listener::Route;
use encore_components::output::{Event, Stats};
use encore_components::resources::{BufferLedger, Counters, Directory, EngineClock, Outputs};
use encore_components::utterance::Utterance;

pub const STATS_INTERVAL_US: u64 = 1_000_000;

pub fn stats(
    clock: Res<EngineClock>,
    directory: Res<Directory>,
    counters: Res<Counters>,
    mut ledger: ResMut<BufferLedger>,
    mut outputs: ResMut<Outputs>,
    routes: Query<&Route>,
    utterances: Query<&Utterance>,
) {
    ledger.peak_since_stats = ledger.peak_since_stats.max(ledger.bytes);
    if clock.now_us < ledger.next_stats_us {
        return;
    }
    while ledger.next_stats_us <= clock.now_us {
        ledger.next_stats_us += STATS_INTERVAL_US;
    }
    let open_utterances = utterances.iter().filter(|u| u.is_open()).count() as u64;
    let playing = routes.iter().filter(|r| r.playing.is_some()).count() as u64;
    outputs.out.events.push(Event::Stats(Stats {
        buffer_bytes: ledger.bytes,
        buffer_peak_bytes: ledger.peak_since_stats,
        buffer_cap_bytes: ledger.cap,
        utterances: directory.utterances.len() as u64,
        open_utterances,
        listeners: directory.listeners.len() as u64,
        playing,
        dropped: counters.drops.total(),
        counters: *counters,
    }));
    ledger.peak_since_stats = 0;
}

#[cfg(test)]
mod tests {
    use crate::testkit::Room;
    use encore_components::config::EngineConfig;
    use encore_components::output::{Event, Stats};

    #[test]
    fn one_stats_line_a_second_with_the_peak_since_the_last() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.talk("a1", 0, 1_500_000);
        let trace = room.run_until(3_000_000);
        let stats: Vec<(u64, &Stats)> = trace
            .iter()
            .filter_map(|(tick, e)| match e {
                Event::Stats(stats) => Some((*tick, stats)),
                _ => None,
            })
            .collect();
        let ticks: Vec<u64> = stats.iter().map(|(tick, _)| *tick).collect();
        assert_eq!(ticks, vec![100, 200, 300], "at 1 s, 2 s and 3 s");
        let peak = |i: usize| stats[i].1.buffer_peak_bytes;
        assert!(peak(1) > peak(0), "the buffer grew during the second second");
        assert_eq!(peak(2), room.engine.buffer_bytes(), "a quiet second peaks at what it holds");
    }
}
