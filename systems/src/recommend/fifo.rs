//! The `fifo` policy, a baseline: every listener hears the room in the order it was said,
//! the oldest unheard utterance first (among the candidates: the newest `max_candidates`
//! within `window_ms`), and a busy listener never switches. Its one term is `age`, the
//! milliseconds since the utterance started; it accepts everything.

use encore_components::output::ScoreTerms;
use encore_components::utterance::Utterance;

use super::{Candidate, Listener, Scorer};

/// The oldest first.
pub fn terms(utterance: &Utterance, now_us: u64) -> ScoreTerms {
    ScoreTerms { age: (now_us.saturating_sub(utterance.started_us) / 1000) as i64, ..ScoreTerms::default() }
}

/// No term of the listener's own.
pub struct Fifo;

impl Scorer for Fifo {
    fn bound(&self, _: &Listener) -> i64 {
        0
    }

    fn personal(&self, _: &Listener, _: usize, _: &Candidate, _: &mut ScoreTerms) {}

    fn accept_min(&self) -> i64 {
        i64::MIN
    }
}

#[cfg(test)]
mod tests {
    use encore_components::config::{EngineConfig, Policy};
    use encore_components::output::RouteReason;

    use crate::testkit::{Room, routes};

    #[test]
    fn the_oldest_unheard_goes_first_and_nobody_is_interrupted() {
        let mut config = EngineConfig::default();
        config.recommender.policy = Policy::Fifo;
        config.recommender.follow = 5000;
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.speaker("carol", "c1");
        room.listener("lena");
        room.push(
            0,
            encore_components::input::Input::Prefs { peer: "lena".into(), follow: vec!["carol".into()], mute: vec![] },
        );
        room.talk("a1", 0, 2_000_000);
        room.talk("b1", 500_000, 1_000_000);
        // Carol is followed, and talks last: fifo ignores follows.
        room.talk("c1", 1_000_000, 1_500_000);
        let trace = room.run_until(8_000_000);
        let lena: Vec<_> = routes(&trace, "lena").into_iter().map(|(_, _, to, reason)| (to, reason)).collect();
        let some = |id: &str| Some(id.to_owned());
        assert_eq!(
            lena,
            vec![
                (some("alice#1"), RouteReason::NewUtterance),
                (some("bob#1"), RouteReason::Finished),
                (some("carol#1"), RouteReason::Finished),
                (None, RouteReason::Finished),
            ]
        );
    }
}
