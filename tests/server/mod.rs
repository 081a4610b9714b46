//! The server seen from outside: real TLS, real WebSockets, real WebRTC peers on loopback, a
//! real browser.

mod auth_live;
mod browser;
mod cluster;
mod deploy;
mod drain;
mod e2e;
mod edge;
mod feedback;
mod interop;
mod limits;
mod loadgen;
mod media;
mod metrics;
mod moderation;
mod protocol;
mod relay;
mod robustness;
mod stage;
pub mod support;
