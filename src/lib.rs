//! Encore: a WebRTC SFU that records every utterance and lets a recommender choose what each
//! listener hears next.
//!
//! The engine (crates `encore-components` and `encore-systems`) is deterministic and
//! sans-I/O; this crate is its edges: scenario and trace files, headless replay, the
//! synthetic room generator, the recommender's evaluation, and the command line.

pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod eval;
pub mod generate;
pub mod loadgen;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod protocol;
pub mod relay;
pub mod replay;
pub mod scenario;
pub mod server;
pub mod talk;
pub mod trace;

pub use encore_systems::{Engine, EngineError, components};
