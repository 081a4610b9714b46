//! The client side of the signaling protocol (docs/protocol.md): requests with ids, their
//! answers, notifications, and candidates routed to the transport they belong to.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::http::ClientTls;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("WebSocket: {0}")]
    WebSocket(String),
    #[error("the server refused `{kind}`: {code}: {message}")]
    Refused { kind: String, code: String, message: String },
    #[error("no answer to `{0}` in time")]
    Timeout(String),
    #[error("the connection closed")]
    Closed,
    #[error("WebRTC: {0}")]
    WebRtc(String),
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A signaling connection.
pub struct Signaling {
    out: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    notifications: Mutex<mpsc::UnboundedReceiver<Value>>,
    candidates: Arc<std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>>,
    pub welcome: Value,
    /// The close code and reason, once the server closed the socket.
    pub closed: Arc<std::sync::Mutex<Option<(u16, String)>>>,
}

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
        let mut request = url.as_str().into_client_request().map_err(|e| ClientError::WebSocket(e.to_string()))?;
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().map_err(|_| ClientError::WebSocket("bad token".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let host = request.uri().host().unwrap_or("localhost").trim_matches(['[', ']']).to_owned();
        let port = request.uri().port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| ClientError::WebSocket(e.to_string()))?;
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| ClientError::Tls(e.to_string()))?;
        let tls_stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        // A small read buffer: tungstenite zero-fills it up to this size on every read (the
        // default 128 KiB costs the load generator, with hundreds of sessions, real CPU).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4 * 1024);
        let (socket, _) = tokio_tungstenite::client_async_with_config(request, tls_stream, Some(config))
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
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
        let candidates: Arc<std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>> = Arc::default();
        let closed: Arc<std::sync::Mutex<Option<(u16, String)>>> = Arc::default();
        let (notify_tx, notifications) = mpsc::unbounded_channel();
        let (welcome_tx, welcome_rx) = oneshot::channel();
        {
            let pending = pending.clone();
            let candidates = candidates.clone();
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
                    let Ok(value) = serde_json::from_str::<Value>(&text) else { continue };
                    if let Some(id) = value.get("id").and_then(Value::as_u64) {
                        let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        match waiter {
                            Some(waiter) => {
                                let _ = waiter.send(value);
                            }
                            // An answer to something sent raw: hand it over with the notifications.
                            None => {
                                let _ = notify_tx.send(value);
                            }
                        }
                        continue;
                    }
                    match value.get("type").and_then(Value::as_str) {
                        Some("welcome") => {
                            if let Some(tx) = welcome_tx.take() {
                                let _ = tx.send(value);
                            }
                        }
                        Some("candidate") => {
                            let side = value["transport"].as_str().unwrap_or("").to_owned();
                            if let Some(tx) = candidates.lock().unwrap_or_else(|p| p.into_inner()).get(&side) {
                                let _ = tx.send(value["candidate"].clone());
                            }
                        }
                        _ => {
                            let _ = notify_tx.send(value);
                        }
                    }
                }
                pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            });
        }
        let welcome = tokio::time::timeout(Duration::from_secs(10), welcome_rx)
            .await
            .map_err(|_| ClientError::Timeout("welcome".into()))?
            .map_err(|_| ClientError::Closed)?;
        Ok(Signaling {
            out,
            pending,
            next_id: AtomicU64::new(1),
            notifications: Mutex::new(notifications),
            candidates,
            welcome,
            closed,
        })
    }

    /// Sends a request and waits for its answer's `data`.
    pub async fn request(&self, kind: &str, fields: Value) -> Result<Value, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = match fields {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        message.insert("id".into(), id.into());
        message.insert("type".into(), kind.into());
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        self.out
            .send(Message::Text(Value::Object(message).to_string().into()))
            .await
            .map_err(|_| ClientError::Closed)?;
        let answer = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .map_err(|_| ClientError::Timeout(kind.into()))?
            .map_err(|_| ClientError::Closed)?;
        if answer["ok"] == true {
            Ok(answer["data"].clone())
        } else {
            Err(ClientError::Refused {
                kind: kind.into(),
                code: answer["error"]["code"].as_str().unwrap_or("").into(),
                message: answer["error"]["message"].as_str().unwrap_or("").into(),
            })
        }
    }

    /// Sends raw text (for tests of malformed input).
    pub async fn send_raw(&self, text: &str) -> Result<(), ClientError> {
        self.out.send(Message::Text(text.to_owned().into())).await.map_err(|_| ClientError::Closed)
    }

    /// The next notification (not an answer, not a candidate).
    pub async fn notification(&self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.notifications.lock().await.recv()).await.ok().flatten()
    }

    /// Candidates the server sends for one transport.
    pub fn candidates(&self, side: &str) -> mpsc::UnboundedReceiver<Value> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.candidates.lock().unwrap_or_else(|p| p.into_inner()).insert(side.to_owned(), tx);
        rx
    }

    pub async fn join(&self, room: &str, name: &str) -> Result<Value, ClientError> {
        self.request("join", json!({"room": room, "name": name})).await
    }

    pub fn close_code(&self) -> Option<(u16, String)> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
