//! Encore's engine: a deterministic, fixed-tick ECS that turns timestamped inputs into
//! per-listener streams and a trace of its decisions.
//!
//! # Shape
//!
//! The engine is sans-I/O. It never reads a clock, a socket or an unseeded random source:
//! time is the tick number times the tick length ([`Clock`](encore_components::resources::Clock)),
//! randomness comes from a seeded resource, and everything the world does to a room enters
//! through [`Engine::push`] with the time it arrived. [`Engine::tick`] runs one tick and
//! returns its [`TickOutput`](encore_components::TickOutput): the decisions (the trace
//! events) and the packets to send. One code path serves the live server, headless replay
//! and snapshot tests, and the same inputs give the same outputs, byte for byte.
//!
//! # The tick
//!
//! One schedule ([`schedule::build_schedule`]), single-threaded, its systems chained in this
//! order, each in its own module with its tests:
//!
//! 1. [`ingest`]: apply the tick's inputs in (arrival time, push order); drop and count bad
//!    input.
//! 2. [`voice`]: voice activity per audio track from the RFC 6464 level, with hysteresis.
//! 3. [`segment`]: open utterances at onset with a pre-roll, close them at hang-over end, at
//!    the maximum length, or when the track ends; add the speaker's video from a key frame.
//! 4. [`evict`]: hold the buffer under its cap.
//! 5. [`recommend`]: score candidates for the listeners that need a decision.
//! 6. [`route`]: apply decisions, with hysteresis for busy listeners.
//! 7. [`playout`]: send what is due, paced, with rewritten sequence numbers and timestamps.
//! 8. [`retransmit`]: answer NACKs from the buffer.
//! 9. [`stats`]: the buffer peak and the once-a-second stats line.
//!
//! Every loop that produces output runs in the order of our own ids (peer keys, utterance
//! ordinals, track names), never in `Entity` order or a hash map's.

pub mod accounting;
pub mod engine;
pub mod evict;
pub mod ingest;
pub mod playout;
pub mod recommend;
pub mod retransmit;
pub mod route;
pub mod rtp;
pub mod schedule;
pub mod segment;
pub mod shared;
pub mod stats;
pub mod voice;

#[cfg(test)]
mod testkit;

pub use encore_components as components;
pub use engine::{Engine, EngineError, PeerView, RoomView, TrackView, UtteranceView};
