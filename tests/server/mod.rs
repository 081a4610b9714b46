//! The server seen from outside: real TLS, real WebSockets, real WebRTC peers on loopback, a
//! real browser.

mod browser;
mod e2e;
pub mod support;
