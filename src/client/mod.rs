//! A Rust client of Encore's signaling and media: the end-to-end tests and the load generator
//! use it, so they exercise the server exactly as a browser does (WSS with a token, trickle ICE,
//! real DTLS-SRTP over loopback).

pub mod error;
pub mod http;
pub mod media;
pub mod signaling;
pub mod tls;

pub use error::ClientError;
pub use http::{dev_token, get, put, ws_ticket};
pub use media::{ClientNetwork, Listener, Publisher, Received};
pub use signaling::{Signaling, Welcome};
pub use tls::{ClientTls, TlsTrust, insecure_tls};
