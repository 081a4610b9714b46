//! What can go wrong for a client, with the cause kept as a source and a stable code.

use crate::protocol::{ErrorBody, ErrorCode, UpgradeRefusal};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A file or socket the client needed (a certificate file, the TCP connection).
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// TLS set-up or handshake.
    #[error("TLS, {context}: {source}")]
    Tls { context: &'static str, source: BoxError },
    /// An HTTPS request failed on the way.
    #[error("HTTP {url}: {source}")]
    Http { url: String, source: BoxError },
    /// An HTTPS request was answered with an error status.
    #[error("HTTP {url}: status {status}: {body}")]
    HttpStatus { url: String, status: u16, body: String },
    #[error("WebSocket: {0}")]
    WebSocket(#[source] tokio_tungstenite::tungstenite::Error),
    /// The server refused the WebSocket upgrade (the credentials, or no keys to check them).
    #[error("the server refused the session: HTTP {status}: {}", refusal.as_ref().map_or("(no body)", |r| r.error.message.as_str()))]
    UpgradeRefused { status: u16, refusal: Option<UpgradeRefusal> },
    /// The server refused a request.
    #[error("the server refused `{kind}`: {source}")]
    Refused { kind: &'static str, source: ErrorBody },
    /// The server said something the protocol does not allow here.
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no answer to `{0}` in time")]
    Timeout(&'static str),
    #[error("the connection closed")]
    Closed,
    #[error("WebRTC, {during}: {source}")]
    WebRtc { during: &'static str, source: webrtc::error::Error },
    /// A WebRTC connection did not come up, or lacks what was asked of it.
    #[error("WebRTC: {0}")]
    Media(String),
}

impl ClientError {
    /// A stable code: the server's error code for a refusal, the kind of failure otherwise.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::Io { .. } => "io",
            ClientError::Tls { .. } => "tls",
            ClientError::Http { .. } | ClientError::HttpStatus { .. } => "http",
            ClientError::WebSocket(_) => "websocket",
            ClientError::UpgradeRefused { refusal: Some(refusal), .. } => refusal.error.code.as_str(),
            ClientError::UpgradeRefused { .. } => "unauthorized",
            ClientError::Refused { source, .. } => source.code.as_str(),
            ClientError::Protocol(_) => "protocol",
            ClientError::Timeout(_) => "timeout",
            ClientError::Closed => "closed",
            ClientError::WebRtc { .. } | ClientError::Media(_) => "webrtc",
        }
    }

    /// The server's error code, when the server refused.
    pub fn refusal(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { source, .. } => Some(source.code),
            ClientError::UpgradeRefused { refusal: Some(refusal), .. } => Some(refusal.error.code),
            _ => None,
        }
    }

    pub(crate) fn tls(context: &'static str, source: impl Into<BoxError>) -> Self {
        ClientError::Tls { context, source: source.into() }
    }

    pub(crate) fn webrtc(during: &'static str) -> impl FnOnce(webrtc::error::Error) -> Self {
        move |source| ClientError::WebRtc { during, source }
    }
}
