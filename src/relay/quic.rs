//! The relay's connection: QUIC (quinn, rustls with the `ring` provider), one connection
//! from each edge to an origin and one stream per room on it (docs/scaling.md, "The relay
//! connection"). Replication needs every line in order; a stream per room keeps a loss on
//! one room's stream from holding up the others, as one TCP connection would.
//!
//! An edge opens a bidirectional stream per room and writes one request line, `{"room":
//! ..., "from": n, "secret": ...}`: the room, the first line of the room's relay log it
//! wants (0 for the room's start, or where it got to before a reconnection), and the
//! cluster's relay secret. The origin answers on the same stream with the log's lines from
//! there on, then each line as the room writes it. The origin's certificate is made at
//! start and pinned by the edges (they get its DER from the directory, not from a CA).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use super::{RelayError, RelayLine};
use crate::client::tls::ClientTls;

/// The ALPN protocol of the relay: versioned, so an origin and an edge of different
/// versions fail at the handshake, not mid-stream.
pub const ALPN: &[u8] = b"encore-relay/1";

/// Longest line the relay accepts (an `rtp` line of the largest payload, base64, and room).
pub const MAX_LINE_BYTES: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("relay TLS: {0}")]
    Tls(String),
    #[error("relay endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    #[error("relay connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("relay connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("relay stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("relay stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("relay request refused: {0}")]
    Refused(String),
    #[error("relay line over {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error(transparent)]
    Line(#[from] RelayError),
}

impl QuicError {
    pub fn code(&self) -> &'static str {
        match self {
            QuicError::Tls(_) => "relay-tls",
            QuicError::Endpoint(_) => "relay-endpoint",
            QuicError::Connection(_) | QuicError::Connect(_) => "relay-connection",
            QuicError::Write(_) | QuicError::Read(_) => "relay-stream",
            QuicError::Refused(_) => "relay-refused",
            QuicError::LineTooLong => "relay-line-too-long",
            QuicError::Line(error) => error.code(),
        }
    }
}

/// A relay connection's transport: both ends keep it alive every second, and a peer silent
/// for [`IDLE_TIMEOUT`] is gone (a killed origin's edges notice within that, not after
/// quinn's default 30 s: a UDP peer that dies sends nothing).
fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    // IDLE_TIMEOUT is a few seconds: always within QUIC's varint bound.
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    Arc::new(transport)
}

/// How long a relay connection may hear nothing before it counts as broken.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// What an edge asks of the origin on a room's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub room: String,
    pub from: usize,
    pub secret: String,
}

/// An origin's relay endpoint.
pub struct RelayOrigin {
    endpoint: quinn::Endpoint,
    cert_der: Vec<u8>,
}

impl RelayOrigin {
    /// Binds the relay's UDP address with a fresh self-signed certificate.
    pub fn bind(addr: SocketAddr) -> Result<Self, QuicError> {
        let certified = rcgen::generate_simple_self_signed(vec!["encore-relay".to_owned()])
            .map_err(|e| QuicError::Tls(e.to_string()))?;
        let cert_der = certified.cert.der().to_vec();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| QuicError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert_der.clone())], key)
            .map_err(|e| QuicError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport());
        let endpoint = quinn::Endpoint::server(config, addr)?;
        Ok(RelayOrigin { endpoint, cert_der })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The certificate edges pin (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The next edge's connection; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<EdgeLink, QuicError>> {
        let incoming = self.endpoint.accept().await?;
        Some(incoming.await.map(|connection| EdgeLink { connection }).map_err(QuicError::from))
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"origin closing");
    }
}

/// One edge's connection, at the origin.
pub struct EdgeLink {
    connection: quinn::Connection,
}

impl EdgeLink {
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// The edge's next room subscription: its request, and the stream to write the room's
    /// lines to. A request without the cluster's `secret` is refused on its stream.
    pub async fn next_subscription(&self, secret: &str) -> Result<RoomStream, QuicError> {
        loop {
            let (mut send, recv) = self.connection.accept_bi().await?;
            let mut reader = LineReader::new(recv);
            let Some(text) = reader.next_text().await? else { continue };
            let request: Subscribe = match serde_json::from_str(&text) {
                Ok(request) => request,
                Err(e) => {
                    let _ = send.write_all(format!("{{\"refused\":\"bad request: {e}\"}}\n").as_bytes()).await;
                    let _ = send.finish();
                    continue;
                }
            };
            if !same_secret(request.secret.as_bytes(), secret.as_bytes()) {
                tracing::warn!(edge = %self.remote_address(), room = %request.room, "relay subscription with a wrong secret");
                let _ = send.write_all(b"{\"refused\":\"wrong secret\"}\n").await;
                let _ = send.finish();
                continue;
            }
            return Ok(RoomStream { request, send, reader });
        }
    }
}

/// Compares secrets in a time that does not depend on where they differ (only on their
/// lengths), so a stranger cannot find the relay secret a byte at a time by timing refusals.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    given.len() == secret.len() && given.iter().zip(secret).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// A room's stream to one edge, at the origin.
pub struct RoomStream {
    pub request: Subscribe,
    send: quinn::SendStream,
    /// What the edge asks after its subscription ([`Upstream`] lines).
    reader: LineReader,
}

/// What an edge asks its origin on a room's stream after subscribing, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Upstream {
    /// A listener of the edge asked for a key frame of a track (the origin's engine asks its
    /// publisher; its key frame then reaches the edge as any packet does).
    Keyframe(String),
}

impl RoomStream {
    /// Writes lines of the room's relay log, in order.
    pub async fn write_lines(&mut self, lines: &[Arc<str>]) -> Result<(), QuicError> {
        let mut chunk = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            chunk.extend_from_slice(line.as_bytes());
            chunk.push(b'\n');
        }
        self.send.write_all(&chunk).await?;
        Ok(())
    }

    /// The edge's next request on the stream; none when it finished its side.
    pub async fn next_upstream(&mut self) -> Result<Option<Upstream>, QuicError> {
        let Some(text) = self.reader.next_text().await? else { return Ok(None) };
        serde_json::from_str(&text).map(Some).map_err(|e| QuicError::Line(RelayError::BadLine(e.to_string())))
    }

    /// Ends the stream: the room closed.
    pub fn finish(mut self) {
        let _ = self.send.finish();
    }

    /// Refuses the subscription (or ends it) with a reason the edge reads as `relay-refused`.
    pub async fn refuse(mut self, why: &str) {
        let line = serde_json::json!({ "refused": why }).to_string();
        let _ = self.send.write_all(format!("{line}\n").as_bytes()).await;
        let _ = self.send.finish();
    }
}

/// An edge's connection to an origin.
pub struct OriginLink {
    connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl OriginLink {
    /// Connects to an origin's relay address, trusting exactly its certificate.
    pub async fn connect(origin: SocketAddr, cert_der: Vec<u8>) -> Result<Self, QuicError> {
        let mut tls = Arc::unwrap_or_clone(ClientTls::pinned_der(cert_der).config);
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
        // Loopback to a loopback origin (tests stay off the network), any address otherwise.
        let ip: IpAddr = match (origin.ip().is_loopback(), origin.is_ipv4()) {
            (true, true) => Ipv4Addr::LOCALHOST.into(),
            (true, false) => Ipv6Addr::LOCALHOST.into(),
            (false, true) => Ipv4Addr::UNSPECIFIED.into(),
            (false, false) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(ip, 0))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport());
        endpoint.set_default_client_config(config);
        let connection = endpoint.connect(origin, "encore-relay")?.await?;
        Ok(OriginLink { connection, _endpoint: endpoint })
    }

    /// Subscribes to a room's lines from the `from`-th on.
    pub async fn subscribe(&self, room: &str, from: usize, secret: &str) -> Result<RoomLines, QuicError> {
        let (mut send, recv) = self.connection.open_bi().await?;
        let request = Subscribe { room: room.to_owned(), from, secret: secret.to_owned() };
        let mut text = serde_json::to_string(&request).map_err(|e| QuicError::Refused(e.to_string()))?;
        text.push('\n');
        send.write_all(text.as_bytes()).await?;
        Ok(RoomLines { reader: LineReader::new(recv), send, received: from })
    }
}

/// A room's lines as an edge receives them.
pub struct RoomLines {
    reader: LineReader,
    /// Kept open for [`Upstream`] requests; dropping it resets it.
    send: quinn::SendStream,
    received: usize,
}

impl RoomLines {
    /// Asks the origin something about the room ([`Upstream`]).
    pub async fn upstream(&mut self, request: &Upstream) -> Result<(), QuicError> {
        let mut text = serde_json::to_string(request).map_err(|e| QuicError::Refused(e.to_string()))?;
        text.push('\n');
        self.send.write_all(text.as_bytes()).await?;
        Ok(())
    }

    /// Bytes read off the stream since the last call (for the relay's metrics).
    pub fn take_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.reader.bytes)
    }

    /// The next line; `None` when the origin ended the room's stream.
    pub async fn next(&mut self) -> Result<Option<RelayLine>, QuicError> {
        let Some(text) = self.reader.next_text().await? else { return Ok(None) };
        if text.starts_with("{\"refused\"") {
            return Err(QuicError::Refused(text));
        }
        self.received += 1;
        Ok(Some(RelayLine::parse(&text)?))
    }

    /// The position in the room's log to ask for after a reconnection.
    pub fn position(&self) -> usize {
        self.received
    }
}

/// Newline-separated lines off a QUIC stream, bounded.
struct LineReader {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    start: usize,
    /// Bytes read, for the caller to take.
    bytes: u64,
}

impl LineReader {
    fn new(recv: quinn::RecvStream) -> Self {
        LineReader { recv, buf: Vec::new(), start: 0, bytes: 0 }
    }

    async fn next_text(&mut self) -> Result<Option<String>, QuicError> {
        loop {
            if let Some(end) = self.buf[self.start..].iter().position(|b| *b == b'\n') {
                let line = &self.buf[self.start..self.start + end];
                let text = String::from_utf8_lossy(line).into_owned();
                self.start += end + 1;
                return Ok(Some(text));
            }
            if self.buf.len() - self.start > MAX_LINE_BYTES {
                return Err(QuicError::LineTooLong);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.recv.read(&mut chunk).await? {
                Some(n) => {
                    self.bytes += n as u64;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                None => return Ok(None),
            }
        }
    }
}
