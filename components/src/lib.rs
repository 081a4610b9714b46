//! Encore's engine data: everything the systems read and write, and nothing that acts.
//!
//! This crate holds the ECS components (on the four kinds of entity: [`peer::Peer`],
//! [`track::Track`], [`utterance::Utterance`] and [`listener::ListenerSession`]), the resources
//! (the clock, the input queue, the directory of stable ids, the buffer ledger, counters),
//! the engine configuration, and the engine's inputs and outputs. The logic lives in the
//! `encore-systems` crate; the I/O lives in the `encore` crate. Neither this crate nor the
//! systems depend on an async runtime, a socket or a clock.
//!
//! Ids that leave the engine are stable and readable: peers and tracks by the names the
//! input gave them, utterances as `<speaker>#<n>`. Internally, peers and utterances also
//! carry ordinals ([`ids::PeerKey`], [`ids::UtteranceOrd`]) assigned in input order, which
//! is what every output-producing loop sorts by (never an ECS `Entity`).

pub mod config;
pub mod ids;
pub mod input;
pub mod learner;
pub mod listener;
pub mod output;
pub mod peer;
pub mod replica;
pub mod resources;
pub mod rng;
pub mod track;
pub mod utterance;

pub use config::{EngineConfig, EngineConfigError, Policy};
pub use ids::{MediaKind, Name, PeerKey, Role, UtteranceId, UtteranceOrd};
pub use input::{FeedbackSignal, Input, RtpIn, filler_payload};
pub use output::{Event, SendPacket, TickOutput};
