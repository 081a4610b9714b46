//! The engine seen from outside: scenario snapshots, determinism, invariants over generated
//! rooms, the command line, the recommender's evaluation and its policies.

mod cli;
mod determinism;
mod eval;
mod invariants;
mod policies;
pub mod replication;
mod scenarios;
mod snapshots;
pub mod support;
