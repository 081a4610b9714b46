//! Encore's integration tests: one test binary, one module per area.

mod auth;
mod engine;
mod server;
