//! Encore: the edges around the engine. Scenario and trace I/O, the synthetic room
//! generator, and (in later modules) the server, transport and auth.

pub mod scenario;
pub mod trace;
pub mod generate;

pub use encore_systems::{components, Engine};
