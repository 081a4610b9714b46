//! Encore's engine: a deterministic, fixed-tick ECS that turns timestamped inputs into
//! per-listener streams and a trace of its decisions.
//!
//! # Shape
//!
//! The engine is sans-I/O. It never reads a clock, a socket or an unseeded random source:
//! time is the tick number times the tick length ([`EngineClock`](encore_components::resources::EngineClock)),
//! randomness comes from a seeded resource, and everything the world does to a room enters
//! through [`Engine::push`] with the time it arrived. [`Engine::tick`] runs one tick and
//! returns its [`TickOutput`](encore_components::TickOutput): the decisions (the trace
//! events) and the packets to send. One code path serves the live server, headless replay
//! and snapshot tests, and the same inputs give the same outputs, byte for byte.
//!
//! # The contract of `push` and `tick`
//!
//! - Time is the caller's to give and the engine's to keep. `push(at_us, input)` says when an
//!   input arrived, on the engine's clock (microseconds since the room started). Arrival
//!   times never go back and an input never arrives after the tick that applies it: `push`
//!   holds `at_us` between the previous input's time and [`Engine::next_tick_us`], and
//!   returns the time it kept, which is what a recorder must write.
//! - `tick()` applies every input pushed since the previous tick, in (arrival time, push
//!   order), then runs the systems below once, at time `next_tick() * tick_us`. A caller that
//!   fell behind the wall clock calls `tick()` again at once; ticks are never skipped by the
//!   engine, and never run ahead of the inputs a caller meant for them.
//! - A caller may pass over ticks where nothing is due: while [`Engine::is_quiet`], no tick
//!   before [`Engine::next_due_tick`] does anything but move the clock, and
//!   [`Engine::skip_to`] moves it there at once (the same decisions as ticking through, which
//!   a test holds every scenario to). An idle room costs nothing between its stats lines.
//! - The output is owned by the caller; handing it back with [`Engine::recycle`] lets the
//!   next tick reuse its vectors (no allocation per tick in steady state).
//! - Nothing else changes the engine: a live room, a replay and a test that push the same
//!   inputs at the same times get the same outputs.
//!
//! # Panics, errors and unwraps
//!
//! - Input from the network is never trusted: an input naming an unknown peer, track or
//!   utterance, breaking a role, a size or a rate limit, is dropped and counted by cause
//!   ([`DropCounts`](encore_components::output::DropCounts)), never a panic and never an
//!   error that stops the room.
//! - A lookup that cannot fail unless the engine itself is wrong (an entity in the directory
//!   without its components) goes through [`shared::bug`]: a `debug_assert!` in tests and
//!   debug builds, a counted `internal_errors` and a skipped item in release.
//! - Bookkeeping whose error would silently break a promise (the buffer ledger against the
//!   cap) asserts in every build.
//! - [`Engine::new`] is the only fallible call: an invalid configuration or schedule.
//!
//! # The live loop
//!
//! ```
//! use encore_systems::Engine;
//! use encore_systems::components::{EngineConfig, Input, Name, Role};
//!
//! let mut engine = Engine::new(EngineConfig::default())?;
//! // What the network delivered, with its arrival on the engine clock (a real worker
//! // stamps each input when it arrives and ticks when the wall clock reaches the next tick).
//! let arrivals = vec![
//!     (1_200, Input::Join { peer: Name::new("alice"), uid: None, roles: vec![Role::Speaker] }),
//!     (3_400, Input::Join { peer: Name::new("lena"), uid: None, roles: vec![Role::Listener] }),
//!     (3_900, Input::Listen { peer: Name::new("lena") }),
//! ];
//! let mut arrivals = arrivals.into_iter().peekable();
//! for _ in 0..100 {
//!     while let Some((at_us, input)) = arrivals.next_if(|(at_us, _)| *at_us <= engine.next_tick_us()) {
//!         let kept_us = engine.push(at_us, input);
//!         assert_eq!(kept_us, at_us);
//!     }
//!     let output = engine.tick();
//!     for packet in &output.packets {
//!         // Encrypt and send `packet` to `packet.listener` here.
//!         let _ = packet;
//!     }
//!     engine.recycle(output);
//! }
//! assert_eq!(engine.view().peers.len(), 2);
//! # Ok::<(), encore_systems::EngineError>(())
//! ```
//!
//! # The tick
//!
//! One schedule ([`schedule::build_schedule`]), single-threaded, its systems chained in this
//! order, each in its own module with its tests:
//!
//! 1. [`ingest`]: apply the tick's inputs in (arrival time, push order); drop and count bad
//!    input.
//! 2. [`voice`]: voice activity per audio track from the RFC 6464 level, with hysteresis.
//! 3. [`dominant`]: the room's dominant speaker (Volfin-Cohen), when something uses it.
//! 4. [`segment`]: open utterances at onset with a pre-roll, close them at hang-over end, at
//!    the maximum length, or when the track ends; add the speaker's video from a key frame.
//! 5. [`evict`]: hold the buffer under its cap.
//! 6. [`recommend`]: score candidates for the listeners that need a decision, by the
//!    configured policy (`fifo`, `loudest`, `rules`, `learn`).
//! 7. [`route`]: apply decisions, with hysteresis for busy listeners.
//! 8. [`learn`]: the learning recommender's model, from how listeners' utterances ended.
//! 9. [`playout`]: send what is due, paced (a live route first catches up with the live edge,
//!    within a bound), with rewritten sequence numbers and timestamps.
//! 10. [`retransmit`]: answer NACKs from the buffer.
//! 11. [`stats`]: the buffer peak and the once-a-second stats line.
//!
//! Every loop that produces output runs in the order of our own ids (peer keys, utterance
//! ordinals, track names), never in `Entity` order or a hash map's.

pub mod accounting;
pub mod dominant;
pub mod engine;
pub mod evict;
pub mod ingest;
pub mod learn;
pub mod playout;
pub mod recommend;
pub mod retransmit;
pub mod route;
pub mod rtp;
pub mod schedule;
pub mod segment;
pub mod shared;
pub mod stats;
pub mod up_next;
pub mod voice;

#[cfg(test)]
mod testkit;

pub use encore_components as components;
pub use engine::{Engine, EngineError, PeerView, RoomView, TrackView, UtteranceView};
