//! The client side of the signaling protocol (docs/protocol.md), in the types of
//! [`crate::protocol`]: requests with ids and their typed answers, and notices.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::error::ClientError;
use super::tls::ClientTls;
use crate::protocol::{Answer, ErrorBody, ErrorCode, Joined, Notice, Request, RequestId, ServerMessage};

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// What the server said when the session opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    pub protocol: u32,
    pub uid: String,
    pub roles: Vec<encore_systems::components::Role>,
    pub session_expires_at: i64,
}

/// A signaling connection.
pub struct Signaling {
    out: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    notices: Mutex<mpsc::UnboundedReceiver<Notice>>,
    strays: Mutex<mpsc::UnboundedReceiver<Answer>>,
    others: Mutex<mpsc::UnboundedReceiver<Value>>,
    pub welcome: Welcome,
    /// The close code and reason, once the server closed the socket.
    pub closed: Arc<std::sync::Mutex<Option<(u16, String)>>>,
    /// The server's base URL (`https://…`), and the trust to reach another node with.
    pub base: String,
    tls: ClientTls,
}

/// A join follows at most this many redirects (one is enough: the directory names the node).
pub const MAX_REDIRECTS: usize = 3;

impl Signaling {
    /// Connects to `wss://…/ws` with the token in the Authorization header (`ticket` instead, as
    /// a browser does, when given).
    pub async fn connect(
        tls: &ClientTls,
        base: &str,
        token: Option<&str>,
        ticket: Option<&str>,
    ) -> Result<Self, ClientError> {
        let url = format!(
            "{}/ws{}",
            base.replacen("https://", "wss://", 1),
            ticket.map(|t| format!("?ticket={t}")).unwrap_or_default()
        );
        let mut request = url.as_str().into_client_request().map_err(ClientError::WebSocket)?;
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::Protocol("the token cannot go in a header".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let host = request.uri().host().unwrap_or("localhost").trim_matches(['[', ']']).to_owned();
        let port = request.uri().port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| ClientError::Io { context: format!("connecting to {host}:{port}"), source })?;
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| ClientError::tls("server name", e))?;
        let tls_stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::tls("handshake", e))?;
        // A small read buffer: tungstenite zero-fills it up to this size on every read (the
        // default 128 KiB costs the load generator, with hundreds of sessions, real CPU).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4 * 1024);
        let (socket, _) = tokio_tungstenite::client_async_with_config(request, tls_stream, Some(config))
            .await
            .map_err(|error| match error {
                tokio_tungstenite::tungstenite::Error::Http(response) => ClientError::UpgradeRefused {
                    status: response.status().as_u16(),
                    refusal: response.body().as_deref().and_then(|body| serde_json::from_slice(body).ok()),
                },
                other => ClientError::WebSocket(other),
            })?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut out_rx) = mpsc::channel::<Message>(256);
        tokio::spawn(async move {
            while let Some(message) = out_rx.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let pending: Pending = Arc::default();
        let closed: Arc<std::sync::Mutex<Option<(u16, String)>>> = Arc::default();
        let (notice_tx, notices) = mpsc::unbounded_channel();
        let (stray_tx, strays) = mpsc::unbounded_channel();
        let (other_tx, others) = mpsc::unbounded_channel();
        let (welcome_tx, welcome_rx) = oneshot::channel();
        {
            let pending = pending.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut welcome_tx = Some(welcome_tx);
                while let Some(Ok(message)) = stream.next().await {
                    let text = match message {
                        Message::Text(text) => text,
                        Message::Close(frame) => {
                            if let Some(frame) = frame {
                                *closed.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some((frame.code.into(), frame.reason.to_string()));
                            }
                            break;
                        }
                        _ => continue,
                    };
                    let message = match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(message) => message,
                        // A notice of another server version: not ours to understand; handed
                        // over as it is.
                        Err(error) => {
                            tracing::debug!(%error, "a server message this client does not know");
                            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                                let _ = other_tx.send(value);
                            }
                            continue;
                        }
                    };
                    match message {
                        ServerMessage::Answer(answer) => {
                            let waiter = match &answer.id {
                                Some(RequestId::Number(n)) => n
                                    .as_u64()
                                    .and_then(|id| pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id)),
                                _ => None,
                            };
                            match waiter {
                                Some(waiter) => {
                                    let _ = waiter.send(answer);
                                }
                                // An answer to something sent raw, or to a message without a
                                // usable id.
                                None => {
                                    let _ = stray_tx.send(answer);
                                }
                            }
                        }
                        ServerMessage::Notice(Notice::Welcome { protocol, uid, roles, session_expires_at }) => {
                            if let Some(tx) = welcome_tx.take() {
                                let _ = tx.send(Welcome { protocol, uid, roles, session_expires_at });
                            }
                        }
                        ServerMessage::Notice(notice) => {
                            let _ = notice_tx.send(notice);
                        }
                    }
                }
                pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            });
        }
        let welcome = tokio::time::timeout(Duration::from_secs(10), welcome_rx)
            .await
            .map_err(|_| ClientError::Timeout("welcome"))?
            .map_err(|_| ClientError::Closed)?;
        Ok(Signaling {
            out,
            pending,
            next_id: AtomicU64::new(1),
            notices: Mutex::new(notices),
            strays: Mutex::new(strays),
            others: Mutex::new(others),
            welcome,
            closed,
            base: base.trim_end_matches('/').to_owned(),
            tls: tls.clone(),
        })
    }

    /// Sends a message with a fresh id and waits for its answer.
    async fn call(
        &self,
        kind: &'static str,
        mut message: serde_json::Map<String, Value>,
    ) -> Result<Answer, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        message.insert("id".into(), id.into());
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let text = Value::Object(message).to_string();
        self.out.send(Message::Text(text.into())).await.map_err(|_| ClientError::Closed)?;
        tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .map_err(|_| ClientError::Timeout(kind))?
            .map_err(|_| ClientError::Closed)
    }

    /// Sends a request and waits for its answer, as the type the request promises
    /// ([`crate::protocol::Done`], [`Joined`], ...).
    pub async fn request<T: DeserializeOwned>(&self, request: Request) -> Result<T, ClientError> {
        let kind = request.kind();
        let message = match serde_json::to_value(&request) {
            Ok(Value::Object(map)) => map,
            _ => return Err(ClientError::Protocol(format!("`{kind}` does not serialise as an object"))),
        };
        let answer = self.call(kind, message).await?;
        answer.into_result().map_err(|source| ClientError::Refused { kind, source })
    }

    /// Sends any `type` with any fields, as a misbehaving client would; the answer's `data`.
    pub async fn request_raw(&self, kind: &str, fields: Value) -> Result<Value, ClientError> {
        let mut message = match fields {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        message.insert("type".into(), kind.into());
        let answer = self.call("raw request", message).await?;
        answer.into_result().map_err(|source| ClientError::Refused { kind: "raw request", source })
    }

    /// Sends raw text (for tests of malformed input); its answer comes as a stray.
    pub async fn send_raw(&self, text: &str) -> Result<(), ClientError> {
        self.out.send(Message::Text(text.to_owned().into())).await.map_err(|_| ClientError::Closed)
    }

    /// Sends a binary frame (which the protocol refuses).
    pub async fn send_binary(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.out.send(Message::Binary(bytes.into())).await.map_err(|_| ClientError::Closed)
    }

    /// The next notice (not an answer, not a candidate).
    pub async fn notification(&self, wait: Duration) -> Option<Notice> {
        tokio::time::timeout(wait, self.notices.lock().await.recv()).await.ok().flatten()
    }

    /// The next answer no request waits for (to raw text, or to a message without an id).
    pub async fn stray_answer(&self, wait: Duration) -> Option<Answer> {
        tokio::time::timeout(wait, self.strays.lock().await.recv()).await.ok().flatten()
    }

    /// The next server message this client's protocol types do not know (from another server
    /// version), as JSON.
    pub async fn other_message(&self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.others.lock().await.recv()).await.ok().flatten()
    }

    pub async fn join(&self, room: &str, name: &str) -> Result<Joined, ClientError> {
        self.request(Request::Join { room: room.to_owned(), name: Some(name.to_owned()) }).await
    }

    /// Joins `room` wherever it lives: a `redirect` answer (the room is on another node of the
    /// cluster) is followed by connecting there with its ticket and joining again; this session
    /// is then closed. The session in the room comes back with the answer.
    pub async fn join_anywhere(self, room: &str, name: &str) -> Result<(Signaling, Joined), ClientError> {
        let mut session = self;
        for _ in 0..=MAX_REDIRECTS {
            let redirect = match session.join(room, name).await {
                Ok(joined) => return Ok((session, joined)),
                Err(ClientError::Refused { source: ErrorBody { code: ErrorCode::Redirect, redirect, .. }, .. }) => {
                    redirect.ok_or_else(|| ClientError::Protocol("a `redirect` without its `redirect` field".into()))?
                }
                Err(other) => return Err(other),
            };
            tracing::debug!(room, node = %redirect.node, url = %redirect.url, "join redirected");
            let next = Signaling::connect(&session.tls, &redirect.url, None, Some(&redirect.ticket)).await?;
            // Dropping the old session closes its socket (its writer sends a Close).
            session = next;
        }
        Err(ClientError::Protocol(format!("more than {MAX_REDIRECTS} redirects for room {room}")))
    }

    pub fn close_code(&self) -> Option<(u16, String)> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
