//! `encore serve`: HTTPS and WSS signaling (axum over rustls), WebRTC transports, rooms on
//! worker threads, and Prometheus metrics on an address of their own. [`start`] brings it all
//! up on the configured addresses (port 0 picks a free one) and returns a handle that drains it
//! (no new rooms, the others go on until they empty) and stops it: tell every session to go
//! away and close it (closing its peer's transports), stop accepting, close the rooms
//! (flushing recordings), stop the workers.

pub mod accept;
pub mod http;
pub mod media;
pub mod recorder;
pub mod relay;
pub mod rooms;
pub mod sessions;
pub mod signaling;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use tokio::sync::broadcast;

use crate::auth::{AuthOptions, AuthSetupError, AuthState, DevIssuer, SharedClock};
use crate::cluster::Cluster;
use crate::config::ServerConfig;
use crate::protocol::GoingAwayReason;
use accept::{ConnectionLimits, LimitedAcceptor};
use relay::RelayHub;
use rooms::{MediaPlan, RoomLimits, Rooms};
use sessions::Sessions;
use tls::{TlsError, TlsMaterial};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the relay: {0}")]
    Relay(#[from] crate::relay::quic::QuicError),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("auth: {0}")]
    Auth(#[from] AuthSetupError),
    #[error("starting: {0}")]
    Start(String),
    #[error("binding the media ports: {source}")]
    Media { source: std::io::Error },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// The workers' media path from the configuration: what to bind, what to announce.
fn media_plan(media: &crate::config::MediaSection) -> MediaPlan {
    let announced = match media.public_ip {
        Some(ip) => vec![ip],
        None if media.bind_ip.is_unspecified() => media::udp::interface_ips(),
        None => vec![media.bind_ip],
    };
    MediaPlan {
        bind_ip: media.bind_ip,
        udp_port: media.udp_port,
        tcp_port: media.ice_tcp.then_some(media.tcp_port),
        announced,
        connect_timeout: Duration::from_secs(media.connect_timeout_s),
    }
}

/// What every handler and session shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    pub auth: AuthState,
    pub rooms: Arc<Rooms>,
    /// Tells every session to go away (and why).
    pub shutdown: broadcast::Sender<GoingAwayReason>,
    /// Draining or stopping: `/readyz` answers 503.
    pub stopping: Arc<AtomicBool>,
    /// Open signaling sessions: shutdown waits for them to leave their rooms.
    pub sessions: Arc<Sessions>,
    /// Connections per source address, and what the listener turned away.
    pub connections: Arc<ConnectionLimits>,
    /// The room directory shared with the other nodes; none when the server runs alone.
    pub cluster: Option<Arc<Cluster>>,
}

/// Test and embedding hooks that the configuration file cannot express.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// The auth clock (tests move it to expire sessions).
    pub clock: Option<SharedClock>,
    /// A dev issuer made in advance (RSA key generation takes time).
    pub dev_issuer: Option<Arc<DevIssuer>>,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` (or the listen address when it is not a wildcard).
    pub url: String,
    pub self_signed_cert: Option<std::path::PathBuf>,
    /// Where `GET /metrics` answers (plain HTTP), unless `metrics.listen` is off.
    pub metrics_addr: Option<SocketAddr>,
    app: AppState,
    handle: axum_server::Handle<SocketAddr>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    /// Keeps this node's entry and its rooms' in the directory (cluster only).
    heartbeat: Option<Heartbeat>,
    draining: bool,
}

/// The task that refreshes this node's directory entries, and a way to make it write at once.
struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    now: Arc<tokio::sync::Notify>,
}

impl Server {
    pub fn auth(&self) -> &AuthState {
        &self.app.auth
    }

    pub fn rooms(&self) -> &Arc<Rooms> {
        &self.app.rooms
    }

    /// Starts draining, then waits until no room is left or `timeout` passed; true when the
    /// rooms emptied. Draining, `/readyz` answers 503 at once (a load balancer stops sending
    /// new clients) and a join that would make a room is refused (`unavailable`); the rooms
    /// there are keep serving, new peers may join them, and the server keeps accepting
    /// connections for them. Call again to wait again; [`Server::stop`] ends it.
    pub async fn drain(&mut self, timeout: Duration) -> bool {
        if !self.draining {
            self.draining = true;
            self.app.stopping.store(true, Ordering::Relaxed);
            self.app.rooms.drain();
            crate::metrics::draining(true);
            // The directory learns it at once: this node gets no new rooms from the others.
            if let Some(heartbeat) = &self.heartbeat {
                heartbeat.now.notify_one();
            }
            tracing::info!(rooms = self.app.rooms.count(), timeout_s = timeout.as_secs(), "draining");
        }
        let emptied = tokio::time::timeout(timeout, self.app.rooms.empty()).await.is_ok();
        tracing::info!(emptied, rooms = self.app.rooms.count(), "drain over");
        emptied
    }

    /// Stops: every session is told to go away (`going_away` with `reason`) and closed, which
    /// closes its transports and takes it out of its room; then the server stops accepting,
    /// closes the rooms (recordings flushed) and stops the workers. Sessions and connections
    /// are waited for up to `patience` each: zero stops at once (a second signal), and the
    /// rooms are still closed and their recordings flushed. Safe to call again, say with less
    /// patience when a first call takes too long.
    pub async fn stop(&mut self, reason: GoingAwayReason, patience: Duration) {
        self.app.stopping.store(true, Ordering::Relaxed);
        let _ = self.app.shutdown.send(reason);
        // Upgraded WebSockets are not the HTTP server's connections any more: they are waited
        // for here, and they close their transports and leave their rooms as they end.
        self.app.sessions.closed(patience).await;
        self.handle.graceful_shutdown(Some(patience.min(Duration::from_secs(5))));
        if let Some(task) = self.task.as_mut()
            && tokio::time::timeout(patience, task).await.is_ok()
        {
            self.task = None;
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.task.abort();
            if let Some(cluster) = &self.app.cluster {
                // Out of the directory now rather than at the entries' expiry: the rooms here
                // can be placed again at once.
                let (rooms, _) = self.app.rooms.load();
                match cluster.leave(&rooms).await {
                    Ok(()) => tracing::info!(node = %cluster.node_id, "left the cluster's directory"),
                    Err(error) => tracing::warn!(node = %cluster.node_id, %error, code = error.code(),
                        "could not leave the directory; the entries expire by themselves"),
                }
            }
        }
        let rooms = self.app.rooms.clone();
        let _ = tokio::task::spawn_blocking(move || rooms.shutdown()).await;
        if let Some(relay) = self.app.rooms.relay() {
            relay.close();
        }
        if let Some(metrics) = self.metrics_task.take() {
            metrics.abort();
        }
        if std::mem::take(&mut self.draining) {
            crate::metrics::draining(false);
        }
    }

    /// Stops without a drain, waiting up to 10 s for sessions to close.
    pub async fn shutdown(mut self) {
        self.stop(GoingAwayReason::Shutdown, Duration::from_secs(10)).await;
    }

    /// Runs until the server stops by itself (it does not, unless the listener fails).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        let Some(task) = self.task.as_mut() else { return Ok(()) };
        let result = match task.await {
            Ok(result) => result,
            Err(error) => Err(std::io::Error::other(error)),
        };
        self.task = None;
        result
    }
}

pub async fn start(config: ServerConfig, options: StartOptions) -> Result<Server, ServerError> {
    // rustls has no default provider here (ring is chosen explicitly; see docs/dependencies.md).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Arc::new(config);
    let tls = TlsMaterial::load_or_create(
        config.server.tls_cert.as_deref(),
        config.server.tls_key.as_deref(),
        &config.server.data_dir,
    )?;
    let listen = config.server.listen;
    let listener = std::net::TcpListener::bind(listen).map_err(|source| ServerError::Bind { addr: listen, source })?;
    listener.set_nonblocking(true).map_err(|source| ServerError::Bind { addr: listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: listen, source })?;
    let own_ip = if addr.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { addr.ip() };
    let url = format!("https://{}", SocketAddr::new(own_ip, addr.port()));
    // Bound now, so that an address in use stops the start instead of a scrape finding nothing.
    let metrics_listener = match config.metrics.listen {
        Some(metrics) => {
            let bind = |source| ServerError::Bind { addr: metrics, source };
            let listener = std::net::TcpListener::bind(metrics).map_err(bind)?;
            listener.set_nonblocking(true).map_err(bind)?;
            Some(listener)
        }
        None => None,
    };
    // Every family from the first scrape on, at zero.
    crate::metrics::init();

    let auth_options = AuthOptions {
        clock: options.clock.unwrap_or_else(|| Arc::new(crate::auth::SystemClock)),
        self_base_url: Some(url.clone()),
        extra_root_certs: if tls.self_signed { tls.chain.clone() } else { Vec::new() },
        dev_issuer: options.dev_issuer,
        // Kept with the certificate, where `encore admin` (another process) finds it too.
        dev_roles_file: Some(config.server.data_dir.join(crate::auth::DEV_ROLES_FILE)),
        dev_key_file: Some(config.server.data_dir.join(crate::auth::DEV_KEY_FILE)),
        tickets_per_user: config.limits.tickets_per_user,
    };
    let auth_config = config.auth.clone();
    // Dev mode makes an RSA key: CPU work, off the async threads.
    let auth = tokio::task::spawn_blocking(move || AuthState::new(auth_config, auth_options))
        .await
        .map_err(|e| ServerError::Start(e.to_string()))??;

    let room_limits = RoomLimits {
        max_rooms: config.server.max_rooms,
        max_peers_per_room: config.server.max_peers_per_room,
        rooms_per_user_per_min: config.limits.rooms_per_user_per_min,
    };
    let rooms = Rooms::start(
        config.worker_count(),
        config.engine.clone(),
        config.server.record_dir.clone(),
        room_limits,
        &media_plan(&config.media),
    )
    .map_err(|source| ServerError::Media { source })?;
    tracing::info!(udp = ?rooms.media_ports.udp, tcp = ?rooms.media_ports.tcp, "media ports");
    let cluster = match &config.cluster.redis_url {
        Some(redis_url) => {
            let media = rooms.media_ports.udp.iter().map(|a| a.to_string()).collect();
            let announced = media_plan(&config.media).announced.first().copied();
            let relay = RelayHub::bind(&config.cluster, announced)?;
            let address = relay.as_ref().map(|hub| hub.address.clone());
            let cluster = Arc::new(Cluster::new(&config.cluster, redis_url, &url, media, address)?);
            tracing::info!(node = %cluster.node_id, url = %cluster.public_url, "in a cluster (room directory in Redis)");
            if let Some(hub) = relay {
                hub.serve();
                rooms.set_relay(hub, cluster.node_id.clone());
            }
            Some(cluster)
        }
        None => None,
    };
    let (shutdown, _) = broadcast::channel(1);
    let app = AppState {
        config: config.clone(),
        auth,
        rooms,
        shutdown,
        stopping: Arc::new(AtomicBool::new(false)),
        sessions: Arc::new(Sessions::default()),
        connections: ConnectionLimits::new(config.limits.connections_per_ip),
        cluster: cluster.clone(),
    };
    let heartbeat = cluster.map(|cluster| {
        let now = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(heartbeat(cluster, app.rooms.clone(), now.clone()));
        Heartbeat { task, now }
    });
    let router = http::router(app.clone());
    let rustls = RustlsConfig::from_config(tls.server_config()?);
    let handle = axum_server::Handle::new();
    let limits = &config.limits;
    let header_timeout = Duration::from_secs(limits.header_timeout_s);
    // The per-address cap runs on the TCP stream, before the handshake it bounds in time.
    let acceptor = RustlsAcceptor::new(rustls)
        .handshake_timeout(Duration::from_secs(limits.tls_handshake_timeout_s))
        .acceptor(LimitedAcceptor::new(app.connections.clone()));
    let connections = app.connections.clone();
    let mut server = axum_server::from_tcp(listener)
        .map_err(|e| ServerError::Start(e.to_string()))?
        .acceptor(acceptor)
        // Until the first request is read (hyper's protocol detection is not timed otherwise).
        .first_request_timeout(header_timeout)
        .accept_error_handler(move |addr, error| connections.on_accept_error(addr, error))
        .handle(handle.clone());
    // Every later request's header, and an idle keep-alive connection's wait for one.
    server.http_builder().http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
    let task = tokio::spawn(async move { server.serve(router.into_make_service()).await });
    let (metrics_addr, metrics_task) = match metrics_listener {
        Some(listener) => {
            let listener =
                tokio::net::TcpListener::from_std(listener).map_err(|e| ServerError::Start(e.to_string()))?;
            let addr = listener.local_addr().map_err(|e| ServerError::Start(e.to_string()))?;
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            let task = tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, http::metrics_router()).await {
                    tracing::error!(%error, "the metrics endpoint stopped");
                }
            });
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    Ok(Server {
        addr,
        url,
        self_signed_cert: tls.self_signed.then(|| tls.cert_path.clone()),
        metrics_addr,
        app,
        handle,
        task: Some(task),
        metrics_task,
        heartbeat,
        draining: false,
    })
}

/// Media datagrams received and sent by every worker so far.
fn datagrams(rooms: &Rooms) -> u64 {
    let media = rooms.media_stats().media;
    media.rx_datagrams + media.tx_datagrams
}

/// Every [`crate::cluster::HEARTBEAT_EVERY`] (and at once when told): this node's entry with its
/// load, its rooms' keys, and the keys of the rooms that closed since. A failing Redis is logged
/// when it starts failing and when it is back, not at every beat.
async fn heartbeat(cluster: Arc<Cluster>, rooms: Arc<Rooms>, now: Arc<tokio::sync::Notify>) {
    let mut owned: Vec<String> = Vec::new();
    let mut failing = false;
    // CPU seconds and media datagrams at the last beat, for the rates in the entry.
    let mut last = (Instant::now(), crate::metrics::process_cpu_seconds(), datagrams(&rooms));
    loop {
        let (running, mut load) = rooms.load();
        let at = (Instant::now(), crate::metrics::process_cpu_seconds(), datagrams(&rooms));
        let seconds = at.0.duration_since(last.0).as_secs_f64();
        if seconds > 0.0 {
            if let (Some(before), Some(now)) = (last.1, at.1) {
                load.cpu_percent = ((now - before).max(0.0) / seconds * 100.0).round() as u32;
            }
            load.datagrams_per_s = (at.2.saturating_sub(last.2) as f64 / seconds).round() as u64;
        }
        last = at;
        let closed: Vec<String> = owned.iter().filter(|room| !running.contains(room)).cloned().collect();
        match cluster.heartbeat(load, &running, &closed).await {
            Ok(()) => {
                if failing {
                    tracing::info!(node = %cluster.node_id, rooms = running.len(), "the room directory is back");
                }
                failing = false;
                owned = running;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(node = %cluster.node_id, %error, code = error.code(),
                        "the room directory (Redis) is unreachable: rooms here go on, new rooms are made where they are asked for");
                }
                failing = true;
                // The closed rooms' keys are tried again next time.
                owned = running.into_iter().chain(closed).collect();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(crate::cluster::HEARTBEAT_EVERY) => {}
            _ = now.notified() => {}
        }
    }
}
