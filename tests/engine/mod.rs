//! The engine seen from outside: scenario snapshots, determinism, invariants over generated
//! rooms, the command line.

mod cli;
mod determinism;
mod invariants;
mod scenarios;
mod snapshots;
pub mod support;
