//! The server seen from outside: real TLS, real WebSockets, real WebRTC peers on loopback, a
//! real browser.

mod browser;
mod e2e;
mod feedback;
mod loadgen;
mod robustness;
mod auth_live;
pub mod support;
