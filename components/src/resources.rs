//! Engine-wide resources: the clock, the queues between systems, the directory of stable
//! ids, the buffer ledger and the counters.

use std::collections::{BTreeMap, HashMap};

use bevy_ecs::prelude::{Entity, Resource};

use crate::ids::{Name, PeerKey, UtteranceId, UtteranceOrd};
use crate::input::Input;
use crate::output::{EndReason, RouteReason, TickOutput};
use crate::rng::SplitMix64;

/// Engine time: the tick number times the tick length. Nothing else in the engine tells time.
#[derive(Resource, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineClock {
    pub tick: u64,
    pub now_us: u64,
    pub tick_us: u64,
}

/// An input with its arrival time and its place in the push order.
#[derive(Clone, Debug)]
pub struct TimedInput {
    pub at_us: u64,
    pub order: u64,
    pub input: Input,
}

/// Inputs pushed since the last tick.
#[derive(Resource, Debug, Default)]
pub struct PendingInputs {
    pub items: Vec<TimedInput>,
    pub next_order: u64,
}

/// Stable ids to entities. The `HashMap`s are for lookups only and are never iterated; what
/// is iterated is ordered by our own ids.
#[derive(Resource, Debug, Default)]
pub struct Directory {
    pub peers: HashMap<Name, Entity>,
    /// Every peer name ever seen, indexed by its key (keys are never reused).
    pub peer_names: Vec<Name>,
    /// Live tracks by name (ordered: segmentation walks them in name order).
    pub tracks: BTreeMap<Name, Entity>,
    /// Listening peers, in key order.
    pub listeners: BTreeMap<PeerKey, Entity>,
    /// Utterances in the buffer, in the order they opened.
    pub utterances: BTreeMap<UtteranceOrd, Entity>,
    pub utterance_ids: HashMap<UtteranceId, UtteranceOrd>,
    /// Utterances each speaker name has opened so far (the n of `<speaker>#<n>`).
    pub utterance_counts: BTreeMap<Name, u32>,
    pub next_utterance_ord: u64,
}

impl Directory {
    /// Whether an utterance with this id was ever opened (the speaker's count reached it),
    /// whether or not it is still in the buffer.
    pub fn utterance_existed(&self, id: &UtteranceId) -> bool {
        self.utterance_counts.get(id.speaker.as_str()).is_some_and(|n| id.n <= *n)
    }
}

/// The buffer's accounted bytes, held under `cap` at the end of every tick.
#[derive(Resource, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferLedger {
    pub bytes: u64,
    pub cap: u64,
    /// Bytes that ever came into the buffer (growth only): the room's demand on a budget.
    pub added: u64,
    /// Largest `bytes` at a tick's end since the last stats line.
    pub peak_since_stats: u64,
    pub next_stats_us: u64,
}

pub use crate::output::Counters;

/// Utterances opened this tick, in opening order.
#[derive(Resource, Debug, Default)]
pub struct NewUtterances {
    pub opened: Vec<(UtteranceOrd, Entity)>,
}

/// Utterances closed this tick: their listeners that already sent everything are done.
#[derive(Resource, Debug, Default)]
pub struct ClosedUtterances {
    pub closed: Vec<UtteranceOrd>,
}

/// Why a listener needs a full decision this tick, and what it played before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionNeed {
    pub reason: RouteReason,
    pub from: Option<UtteranceId>,
}

/// Listeners that need a full decision this tick, in key order.
#[derive(Resource, Debug, Default)]
pub struct DecisionQueue {
    pub needs: BTreeMap<PeerKey, DecisionNeed>,
}

/// Listeners with NACKs waiting, in key order (so the retransmit system visits only them).
#[derive(Resource, Debug, Default)]
pub struct NackQueue {
    pub listeners: std::collections::BTreeSet<PeerKey>,
}

/// Tracks whose utterance must close this tick for a reason other than silence.
#[derive(Resource, Debug, Default)]
pub struct Departures {
    pub tracks: Vec<(Name, Entity, EndReason)>,
}

/// What this tick produced so far.
#[derive(Resource, Debug)]
pub struct Outputs {
    pub out: TickOutput,
    /// Whether sent packets carry their payload (the server needs it; replay does not).
    pub payloads: bool,
}

impl Default for Outputs {
    fn default() -> Self {
        Outputs { out: TickOutput::default(), payloads: true }
    }
}

/// The engine's one source of randomness: SplitMix64 from the configured seed. `next_u64`
/// draws from one stream (the outgoing streams' SSRCs and starting numbers); `keyed` draws a
/// number named by a key (the learning recommender's exploration), without advancing that
/// stream, so a draw never depends on how many others were made before it.
#[derive(Resource, Clone, Debug, PartialEq, Eq)]
pub struct EngineRng {
    stream: SplitMix64,
    seed: u64,
}

impl EngineRng {
    pub fn new(seed: u64) -> Self {
        EngineRng { stream: SplitMix64::new(seed), seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.stream.next_u64()
    }

    /// A draw named by `key`: SplitMix64 seeded with the engine's seed, then re-seeded with each
    /// part of the key mixed in.
    pub fn keyed(&self, key: [u64; 3]) -> u64 {
        key.iter().fold(SplitMix64::new(self.seed ^ 0x6A09_E667_F3BC_C908).next_u64(), |state, part| {
            SplitMix64::new(state ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
        })
    }
}

/// What a decision is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionKind {
    /// All candidates were scored, for this reason.
    Full(RouteReason),
    /// Only the utterances that opened this tick were scored; a busy listener switches to
    /// the choice only past the hysteresis margin.
    NewUtterance,
}

/// The recommender's pick for a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub utterance: Entity,
    pub ord: UtteranceOrd,
    pub id: UtteranceId,
    pub score: i64,
    pub terms: crate::output::ScoreTerms,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub session: Entity,
    pub listener: PeerKey,
    pub kind: DecisionKind,
    /// What the listener played before, when something took it off already (eviction).
    pub from: Option<UtteranceId>,
    pub choice: Option<Choice>,
    /// For a busy listener offered a new utterance: the present score of what it plays, when
    /// the policy rescored it (`loudest`); otherwise the score it was chosen with counts.
    pub rescored: Option<i64>,
}

/// Waiting switches whose moment came during play-out (a pause in what the listener hears,
/// or the end of the wait), for the router to apply at the next tick, in listener key order:
/// the session and whether it was a pause.
#[derive(Resource, Debug, Default)]
pub struct SwitchesDue {
    pub list: Vec<(Entity, bool)>,
}

/// Decisions of this tick, from the recommender to the router, in listener key order.
#[derive(Resource, Debug, Default)]
pub struct Decisions {
    pub list: Vec<Decision>,
    /// How many the router was handed in the last tick (the list is drained), for metrics.
    pub last_tick: u64,
}

/// The dominant speaker, as the dominant-speaker system last decided.
#[derive(Resource, Clone, Debug, Default, PartialEq, Eq)]
pub struct Dominance {
    /// The dominant speaker and its audio track.
    pub speaker: Option<(PeerKey, Name)>,
    pub track: Option<Name>,
    /// The dominant speaker changed in this tick.
    pub changed: bool,
    /// When the next decision is due (every 300 ms of engine time).
    pub next_decision_us: u64,
    /// When silent tracks are next given a silent level (every 40 ms).
    pub next_idle_us: u64,
}

/// How a listener's time with an utterance ended, or what it said about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It heard the utterance to the end.
    Finished,
    /// It skipped it.
    Skipped,
    /// It liked it.
    Liked,
    /// It muted its speaker while hearing it.
    Muted,
    /// The engine took it off the utterance (a switch, an eviction, the end of listening):
    /// nothing learnt about the listener.
    Interrupted,
    /// It started playing the utterance.
    Started,
}

/// One verdict of a listener on an utterance: the learning recommender's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenOutcome {
    pub listener: PeerKey,
    pub speaker: PeerKey,
    pub utterance: UtteranceOrd,
    pub verdict: Verdict,
    /// How long it heard the utterance (for a skip: what it heard before skipping).
    pub heard_us: u64,
}

/// Verdicts of this tick, from ingest (likes, skips of other utterances) and route (every
/// listener taken off an utterance), for the learn system.
#[derive(Resource, Debug, Default)]
pub struct ListenOutcomes {
    pub list: Vec<ListenOutcome>,
}

/// What the recommender did since the start (not in the trace: `encore eval` reads it).
#[derive(Resource, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecommenderCounts {
    /// Decisions made: one per listener that needed one (full) or was offered an utterance
    /// that opened (new utterance).
    pub decisions: u64,
    /// Of which full decisions (every candidate considered).
    pub full: u64,
    /// Candidates scored for a listener.
    pub scored: u64,
}
