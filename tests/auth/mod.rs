//! Auth (issue 3): the verifier, the key cache, the axum pieces and the config, against real RSA
//! keys and real HTTP servers on loopback; and (issue 14) managing roles.

mod support;

mod admin;
mod config;
mod emulator;
mod http;
mod keys;
mod logs;
mod verify;
