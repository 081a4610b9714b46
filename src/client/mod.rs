//! A Rust client of Encore's signaling and media: the end-to-end tests and the load generator
//! use it, so they exercise the server exactly as a browser does (WSS with a token, trickle ICE,
//! real DTLS-SRTP over loopback).

pub mod http;
pub mod media;
pub mod signaling;

pub use http::{ClientTls, dev_token, get, put, ws_ticket};
pub use media::{Listener, Publisher, Received};
pub use signaling::{ClientError, Signaling};
