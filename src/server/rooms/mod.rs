//! Rooms on worker threads, as mediasoup's routers on its workers.
//!
//! Each room is one [`Engine`](encore_systems::Engine) owned by one worker thread (a plain OS
//! thread: ticking is CPU work and must not wait on the async runtime). Network tasks talk to a
//! room through a bounded channel of [`RoomCommand`]s stamped with their arrival time; the
//! worker drains it at each tick, ticks, and hands the outputs to per-peer channels with
//! `try_send`, so a slow or dead client never stalls a tick (what does not fit is dropped and
//! counted).
//!
//! - this module: the registry of rooms ([`Rooms`]), the commands, and a session's handle on
//!   its room ([`RoomLink`]);
//! - [`room`]: one room as its worker runs it (the engine, its peers' channels and transports,
//!   the recorder);
//! - [`worker`]: the worker threads, each owning its media socket ([`MediaIo`]) and its rooms,
//!   and the missed-tick policy ([`worker::Pacer`]);
//! - [`budget`]: the server's one buffer budget, shared by the rooms.

pub mod budget;
mod room;
pub mod worker;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use encore_systems::components::config::EngineConfig;
use encore_systems::components::ids::{Name, Role, UtteranceId};
use encore_systems::components::input::{FeedbackSignal, Input};
use encore_systems::{Engine, RoomView};

use super::media::{MediaIo, MediaSettings, MediaStats, tcp};
use super::recorder::Recorder;
use super::relay::{EdgeFeed, RelayHub};
use crate::cluster::RelayAddress;
use crate::metrics::{DropCause, RoomMetrics, WorkerMetrics};
use crate::protocol::{ErrorBody, ErrorCode, Notice, PeerInfo, Side};
use crate::relay::ReplicaQueue;
use crate::relay::quic::RoomLines;
pub use room::RoomRelay;
use room::{Room, RoomParts};

/// Commands a room's channel holds; most rooms see a few thousand a second.
pub const ROOM_CHANNEL: usize = 8192;
/// Notifications queued per peer before the slowest are dropped.
pub const PEER_EVENTS: usize = 256;

/// The room's answer to a join.
#[derive(Debug, Clone)]
pub struct JoinedRoom {
    /// The peer's name in the room: the display name asked for, made unique.
    pub peer: Name,
    /// The peers already there.
    pub peers: Vec<PeerInfo>,
    /// The moderator whose mute holds this user's microphone in this room, if one does.
    pub muted_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("the room is full ({0} peers)")]
    Full(usize),
    #[error("the server has too many rooms ({0})")]
    TooManyRooms(usize),
    #[error("this user made {0} rooms in the last minute (limits.rooms_per_user_per_min); join one, or wait")]
    TooManyCreated(usize),
    #[error("the room is closing")]
    Closed,
    #[error("the server is draining: it takes no new rooms; join another server")]
    Draining,
    #[error("the room's origin node cannot be reached to serve it here: {0}")]
    Origin(String),
}

impl RoomError {
    /// The protocol's error code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::Full(_) | RoomError::TooManyRooms(_) => ErrorCode::Conflict,
            RoomError::TooManyCreated(_) => ErrorCode::RateLimited,
            RoomError::Closed | RoomError::Draining | RoomError::Origin(_) => ErrorCode::Unavailable,
        }
    }
}

/// What a moderator does to another peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moderation {
    /// Its microphone stops being forwarded, and stays so until a moderator unmutes it.
    Mute,
    /// A moderator's mute is lifted: its microphone is forwarded again.
    Unmute,
    /// It is told, and its session ends.
    Remove,
}

/// Who asks to speak and who may, in one room. Roles given here are the room's own: they end
/// when the peer leaves, and the engine knows them as `roles` inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    RaiseHand,
    LowerHand,
    /// A moderator (the session checked) invites `peer` to speak.
    Invite {
        peer: Name,
    },
    AnswerInvite {
        accept: bool,
    },
    /// A moderator (the session checked) moves `peer` back to the audience.
    MoveToAudience {
        peer: Name,
    },
}

/// A reply a room gives to a request it can refuse.
pub type Verdict = oneshot::Sender<Result<(), ErrorBody>>;

pub enum RoomCommand {
    Join {
        at: Instant,
        name: String,
        uid: Option<String>,
        roles: Vec<Role>,
        events: mpsc::Sender<Notice>,
        reply: oneshot::Sender<JoinedRoom>,
    },
    Leave {
        at: Instant,
        peer: Name,
    },
    /// An engine input from a session or a transport.
    Input {
        at: Instant,
        input: Input,
    },
    /// A listener's like or skip: refused when it names no utterance the room ever had, or
    /// the peer does not listen.
    Feedback {
        at: Instant,
        peer: Name,
        utterance: Option<UtteranceId>,
        signal: FeedbackSignal,
        reply: Verdict,
    },
    /// A publisher's offer: its send transport is made on the room's worker; the answer SDP.
    Publish {
        peer: Name,
        offer: String,
        reply: oneshot::Sender<Result<String, ErrorBody>>,
    },
    /// A listener's receive transport is made on the room's worker; the offer SDP.
    Listen {
        peer: Name,
        video: bool,
        reply: oneshot::Sender<Result<String, ErrorBody>>,
    },
    /// The listener's answer to that offer.
    Answer {
        peer: Name,
        answer: String,
        reply: Verdict,
    },
    /// Whether the peer has that transport (a client's trickled candidate needs one).
    HasTransport {
        peer: Name,
        side: Side,
        reply: Verdict,
    },
    Pause {
        peer: Name,
        side: Side,
        paused: bool,
        reply: Verdict,
    },
    CloseTransport {
        peer: Name,
        side: Side,
        reply: Verdict,
    },
    /// A moderator's act on another peer: `not_found` when no such peer is in the room.
    Moderate {
        action: Moderation,
        peer: Name,
        by: Name,
        reply: Verdict,
    },
    /// A peer's act on the room's stage; `peer` is the one acting.
    Stage {
        at: Instant,
        peer: Name,
        action: Stage,
        reply: Verdict,
    },
    /// An admin changed the account role of `uid`: its peers in the room take it now.
    AccountRoles {
        at: Instant,
        uid: String,
        roles: Vec<Role>,
    },
    View {
        reply: oneshot::Sender<RoomView>,
    },
    Close,
}

/// The sending end of a room's command queue. Every command also raises its worker's flag:
/// a worker with many sleeping rooms looks at them all only when a command came, a deadline
/// passed or a datagram arrived, not at every wake-up.
#[derive(Clone)]
struct RoomSender {
    tx: mpsc::Sender<RoomCommand>,
    wake: Arc<worker::Wake>,
}

impl RoomSender {
    fn try_send(&self, command: RoomCommand) -> Result<(), mpsc::error::TrySendError<RoomCommand>> {
        self.tx.try_send(command)?;
        self.wake.raise();
        Ok(())
    }

    async fn send(&self, command: RoomCommand) -> Result<(), mpsc::error::SendError<RoomCommand>> {
        self.tx.send(command).await?;
        self.wake.raise();
        Ok(())
    }
}

/// A network task's handle on its room.
#[derive(Clone)]
pub struct RoomLink {
    pub room: String,
    /// Which room of that name (a name may be made again after its room closed).
    serial: u64,
    pub peer: Name,
    tx: RoomSender,
    dropped: Arc<AtomicU64>,
    metrics: WorkerMetrics,
}

impl RoomLink {
    /// Sends an engine input stamped now; false (and counted) when the room's queue is full.
    pub fn input(&self, input: Input) -> bool {
        self.command(RoomCommand::Input { at: Instant::now(), input })
    }

    pub fn command(&self, command: RoomCommand) -> bool {
        match self.tx.try_send(command) {
            Ok(()) => true,
            Err(error) => {
                let cause = DropCause::of(&error);
                if cause == DropCause::Full {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.metrics.command_dropped(cause);
                false
            }
        }
    }

    /// Sends a command that the room answers, and waits for its verdict.
    pub async fn ask(&self, command: impl FnOnce(Verdict) -> RoomCommand) -> Result<(), ErrorBody> {
        self.ask_for(command).await
    }

    /// Sends a command that the room answers with a value, and waits for it.
    pub async fn ask_for<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, ErrorBody>>) -> RoomCommand,
    ) -> Result<T, ErrorBody> {
        let (reply, answer) = oneshot::channel();
        if !self.command(command(reply)) {
            return Err(ErrorBody::new(ErrorCode::Unavailable, "the room is too busy to take it; try again"));
        }
        answer.await.map_err(|_| ErrorBody::new(ErrorCode::Unavailable, RoomError::Closed.to_string()))?
    }

    /// Inputs this room could not queue since it started.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A room in the list of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomSummary {
    pub id: String,
    pub peers: usize,
    pub worker: usize,
    pub created_unix_s: u64,
    /// Its buffer, and its share of the server's budget (the cap its engine holds it to).
    pub buffer_bytes: u64,
    pub share_bytes: u64,
}

/// `GET /api/rooms`: the rooms and the buffer budget they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomList {
    pub buffer: budget::BudgetView,
    pub rooms: Vec<RoomSummary>,
}

struct RoomEntry {
    tx: RoomSender,
    peers: usize,
    worker: usize,
    serial: u64,
    created_unix_s: u64,
    dropped: Arc<AtomicU64>,
    /// Served here as an edge of its origin node (the directory names the origin, not us).
    edge: bool,
}

struct RoomsState {
    rooms: BTreeMap<String, RoomEntry>,
    next_worker: usize,
    next_serial: u64,
    /// When each user made its rooms of the last minute.
    created_by: HashMap<String, VecDeque<Instant>>,
}

/// How many rooms and peers the server takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomLimits {
    pub max_rooms: usize,
    pub max_peers_per_room: usize,
    /// Rooms one user may make in any minute (0: no limit).
    pub rooms_per_user_per_min: usize,
}

/// The window of [`RoomLimits::rooms_per_user_per_min`].
const CREATION_WINDOW: Duration = Duration::from_secs(60);

/// Where the workers' media listens, as it was bound.
#[derive(Debug, Clone)]
pub struct MediaPorts {
    /// Each worker's UDP port, by worker index.
    pub udp: Vec<SocketAddr>,
    /// The server's ICE-TCP port, when on.
    pub tcp: Option<SocketAddr>,
}

/// Every room of the server and the workers that run them.
pub struct Rooms {
    state: Mutex<RoomsState>,
    workers: Vec<std::sync::mpsc::Sender<Room>>,
    /// Each worker's flag: a command was queued for one of its rooms.
    wakes: Vec<Arc<worker::Wake>>,
    worker_metrics: Vec<WorkerMetrics>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    /// Draining: no new rooms, the rooms there are go on (new peers may join them).
    draining: AtomicBool,
    /// The number of rooms, for a drain to wait on.
    count: watch::Sender<usize>,
    engine: EngineConfig,
    record_dir: Option<PathBuf>,
    limits: RoomLimits,
    budget: Arc<budget::Budget>,
    pub media_ports: MediaPorts,
    /// Each worker's media figures, as of its last turn.
    worker_stats: Arc<Vec<Mutex<WorkerStats>>>,
    /// The node's relay (cluster only) and its node id.
    relay: std::sync::OnceLock<(Arc<RelayHub>, String)>,
}

/// A room this node is to serve as an edge: its origin's relay, and the stream of the room
/// opened there.
pub struct EdgeSource {
    pub origin: RelayAddress,
    engine: Engine,
    lines: RoomLines,
}

/// What a worker's media path did, as of its last turn.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerStats {
    pub media: MediaStats,
    pub connections: usize,
}

/// How to start the workers' media path.
#[derive(Debug, Clone)]
pub struct MediaPlan {
    pub bind_ip: IpAddr,
    /// Worker `i` binds `udp_port + i`; 0: any free port.
    pub udp_port: u16,
    /// The ICE-TCP port (0: any free one); none: no ICE over TCP.
    pub tcp_port: Option<u16>,
    /// Announced in host candidates.
    pub announced: Vec<IpAddr>,
    pub connect_timeout: Duration,
}

impl Rooms {
    /// Binds each worker's media socket (and the ICE-TCP port), then starts `workers` worker
    /// threads, each owning its socket and the rooms given to it, and the thread that keeps
    /// the rooms' buffers within `engine.buffer_max_bytes` together.
    pub fn start(
        workers: usize,
        engine: EngineConfig,
        record_dir: Option<PathBuf>,
        limits: RoomLimits,
        media: &MediaPlan,
    ) -> std::io::Result<Arc<Self>> {
        let workers = workers.clamp(1, 256);
        let stopping = Arc::new(AtomicBool::new(false));
        let tcp_listener = match media.tcp_port {
            Some(port) => Some(std::net::TcpListener::bind(SocketAddr::new(media.bind_ip, port))?),
            None => None,
        };
        let tcp_addr = tcp_listener.as_ref().map(std::net::TcpListener::local_addr).transpose()?;
        let mut ios = Vec::new();
        let mut tcp_senders = Vec::new();
        for index in 0..workers {
            let port = if media.udp_port == 0 { 0 } else { media.udp_port + index as u16 };
            let settings = MediaSettings {
                worker: index,
                udp_bind: SocketAddr::new(media.bind_ip, port),
                announced: media.announced.clone(),
                tcp_port: tcp_addr.map(|a| a.port()),
                connect_timeout: media.connect_timeout,
                ice_disconnected: Duration::from_secs(5),
                ice_failed: Duration::from_secs(25),
                ice_keepalive: Duration::from_secs(2),
            };
            let (tcp_tx, tcp_rx) = std::sync::mpsc::channel();
            ios.push(MediaIo::bind(settings, tcp_listener.is_some().then_some(tcp_rx))?);
            tcp_senders.push(tcp_tx);
        }
        let media_ports = MediaPorts { udp: ios.iter().map(MediaIo::udp_addr).collect(), tcp: tcp_addr };
        let worker_stats: Arc<Vec<Mutex<WorkerStats>>> =
            Arc::new((0..workers).map(|_| Mutex::new(WorkerStats::default())).collect());
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        if let Some(listener) = tcp_listener {
            let stopping = stopping.clone();
            let stats = Arc::new(tcp::TcpAcceptStats::default());
            handles.push(
                std::thread::Builder::new()
                    .name("encore-ice-tcp".into())
                    .spawn(move || tcp::run(listener, tcp_senders, stopping, stats))?,
            );
        }
        let mut worker_metrics = Vec::new();
        let mut wakes = Vec::new();
        for (index, io) in ios.into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel::<Room>();
            let wake = Arc::new(worker::Wake::new()?);
            wakes.push(wake.clone());
            let stopping = stopping.clone();
            let stats = worker_stats.clone();
            let metrics = WorkerMetrics::new(index);
            worker_metrics.push(metrics.clone());
            let handle = std::thread::Builder::new()
                .name(format!("encore-worker-{index}"))
                .spawn(move || worker::run(index, rx, stopping, wake, io, stats, metrics))?;
            senders.push(tx);
            handles.push(handle);
        }
        let budget = budget::Budget::new(engine.buffer_max_bytes, limits.max_rooms);
        crate::metrics::buffer_budget(engine.buffer_max_bytes);
        {
            let budget = budget.clone();
            let stopping = stopping.clone();
            handles.push(std::thread::Builder::new().name("encore-budget".into()).spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::park_timeout(budget::REBALANCE_EVERY);
                    budget.rebalance();
                }
            })?);
        }
        Ok(Arc::new(Rooms {
            state: Mutex::new(RoomsState {
                rooms: BTreeMap::new(),
                next_worker: 0,
                next_serial: 1,
                created_by: HashMap::new(),
            }),
            workers: senders,
            wakes,
            worker_metrics,
            handles: Mutex::new(handles),
            stopping,
            draining: AtomicBool::new(false),
            count: watch::channel(0).0,
            engine,
            record_dir,
            limits,
            budget,
            media_ports,
            worker_stats,
            relay: std::sync::OnceLock::new(),
        }))
    }

    /// The node's relay: its rooms write their relay logs from now on, and it may serve rooms
    /// as an edge. `node` is its id in the directory.
    pub fn set_relay(&self, hub: Arc<RelayHub>, node: String) {
        let _ = self.relay.set((hub, node));
    }

    pub fn relay(&self) -> Option<&Arc<RelayHub>> {
        self.relay.get().map(|(hub, _)| hub)
    }

    /// Whether `room` runs here, and if so whether as an edge.
    pub fn kind(&self, room: &str) -> Option<bool> {
        self.state().rooms.get(room).map(|entry| entry.edge)
    }

    /// Peers in `room` here.
    pub fn peers(&self, room: &str) -> usize {
        self.state().rooms.get(room).map_or(0, |entry| entry.peers)
    }

    /// Opens `room`'s stream at its origin, for [`Rooms::join_edge`]; none needed when the
    /// room runs here already.
    pub async fn open_edge(&self, room: &str, origin: RelayAddress) -> Result<Option<EdgeSource>, RoomError> {
        if self.contains(room) {
            return Ok(None);
        }
        let Some((hub, _)) = self.relay.get() else {
            return Err(RoomError::Origin("this node has no relay (cluster.relay_listen)".into()));
        };
        let (engine, lines) = hub.open_edge(room, &origin).await.map_err(|e| {
            tracing::warn!(room, origin = %origin.addr, error = %e, code = e.code(), "cannot open the room's relay stream");
            RoomError::Origin(e.to_string())
        })?;
        Ok(Some(EdgeSource { origin, engine, lines }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RoomsState> {
        // A panic while holding the lock leaves plain data behind: keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Joins `room` (making it on first join) and returns the peer's link and the room's peers.
    pub async fn join(
        &self,
        room: &str,
        name: &str,
        uid: Option<String>,
        roles: Vec<Role>,
        events: mpsc::Sender<Notice>,
    ) -> Result<(RoomLink, JoinedRoom), RoomError> {
        self.join_from(room, name, uid, roles, events, None).await
    }

    /// Joins `room` as [`Rooms::join`] does, making it, when it does not run here yet, as an
    /// edge of its origin from `edge` ([`Rooms::open_edge`]).
    pub async fn join_from(
        &self,
        room: &str,
        name: &str,
        uid: Option<String>,
        roles: Vec<Role>,
        events: mpsc::Sender<Notice>,
        edge: Option<EdgeSource>,
    ) -> Result<(RoomLink, JoinedRoom), RoomError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(RoomError::Closed);
        }
        let (tx, dropped, metrics, serial) = {
            let mut state = self.state();
            // An edge's copy that ended by itself (its origin ended the room) while peers are
            // still in it: a new join makes a new copy; the old peers' leaves find it gone.
            if state.rooms.get(room).is_some_and(|entry| entry.edge && entry.tx.tx.is_closed()) {
                state.rooms.remove(room);
                self.count.send_replace(state.rooms.len());
            }
            let count = state.rooms.len();
            if !state.rooms.contains_key(room) {
                if self.draining.load(Ordering::Relaxed) {
                    return Err(RoomError::Draining);
                }
                if count >= self.limits.max_rooms {
                    return Err(RoomError::TooManyRooms(self.limits.max_rooms));
                }
                if let Some(uid) = &uid {
                    self.count_creation(&mut state, uid)?;
                }
                let worker = state.next_worker % self.workers.len();
                state.next_worker += 1;
                let (tx, rx) = mpsc::channel(ROOM_CHANNEL);
                let tx = RoomSender { tx, wake: self.wakes[worker].clone() };
                let is_edge = edge.is_some();
                let (engine, relay) = match (edge, self.relay.get()) {
                    (Some(source), Some((hub, node))) => {
                        let (lines_tx, lines) = RelayHub::edge_channel();
                        let (upstream, upstream_rx) = RelayHub::upstream_channel();
                        hub.pump(room.to_owned(), source.origin, source.lines, lines_tx, upstream_rx, tx.wake.clone());
                        let queue = ReplicaQueue::default();
                        let feed = EdgeFeed { lines, queue, node: node.clone(), upstream, ended: None };
                        tracing::info!(room, "serving the room as an edge of its origin");
                        (source.engine, RoomRelay::Edge(Box::new(feed)))
                    }
                    (_, Some((hub, _))) => {
                        let engine = Engine::new(self.engine.clone()).map_err(|_| RoomError::Closed)?;
                        (engine, RoomRelay::Origin(hub.feed(room, &self.engine, tx.wake.clone())))
                    }
                    (_, None) => (Engine::new(self.engine.clone()).map_err(|_| RoomError::Closed)?, RoomRelay::None),
                };
                let config = engine.config().clone();
                let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                let recorder = self.record_dir.as_ref().and_then(|dir| {
                    let stamp = format!("{}", created.as_millis());
                    match Recorder::create(dir, room, &stamp, &config) {
                        Ok(recorder) => {
                            tracing::info!(room, scenario = %recorder.scenario_path.display(), "recording the room");
                            Some(recorder)
                        }
                        Err(error) => {
                            tracing::error!(room, %error, "cannot record the room");
                            None
                        }
                    }
                });
                let dropped = Arc::new(AtomicU64::new(0));
                let serial = state.next_serial;
                state.next_serial += 1;
                let share = self.budget.admit(serial);
                let metrics = RoomMetrics::new(&self.worker_metrics[worker], share.granted());
                let parts = RoomParts { rx, recorder, share: share.clone(), metrics, relay };
                let room_state = Room::new(room.to_owned(), serial, engine, parts);
                if self.workers[worker].send(room_state).is_err() {
                    share.close();
                    return Err(RoomError::Closed);
                }
                state.rooms.insert(
                    room.to_owned(),
                    RoomEntry {
                        tx,
                        peers: 0,
                        worker,
                        serial,
                        created_unix_s: created.as_secs(),
                        dropped,
                        edge: is_edge,
                    },
                );
                self.count.send_replace(state.rooms.len());
                tracing::info!(room, worker, "room created");
            }
            let entry = state.rooms.get_mut(room).ok_or(RoomError::Closed)?;
            if entry.peers >= self.limits.max_peers_per_room {
                return Err(RoomError::Full(self.limits.max_peers_per_room));
            }
            entry.peers += 1;
            (entry.tx.clone(), entry.dropped.clone(), self.worker_metrics[entry.worker].clone(), entry.serial)
        };
        let (reply, answer) = oneshot::channel();
        let command = RoomCommand::Join { at: Instant::now(), name: name.to_owned(), uid, roles, events, reply };
        if tx.send(command).await.is_err() {
            self.release(room, serial);
            return Err(RoomError::Closed);
        }
        match answer.await {
            Ok(joined) => {
                let link = RoomLink { room: room.to_owned(), serial, peer: joined.peer.clone(), tx, dropped, metrics };
                Ok((link, joined))
            }
            Err(_) => {
                self.release(room, serial);
                Err(RoomError::Closed)
            }
        }
    }

    /// Counts a room made by `uid`, or refuses it when the user made its most this minute.
    fn count_creation(&self, state: &mut RoomsState, uid: &str) -> Result<(), RoomError> {
        let limit = self.limits.rooms_per_user_per_min;
        if limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        // Forget the users whose rooms are all older than the window (the map stays small).
        if state.created_by.len() > 1024 {
            state.created_by.retain(|_, times| times.back().is_some_and(|t| now.duration_since(*t) < CREATION_WINDOW));
        }
        let times = state.created_by.entry(uid.to_owned()).or_default();
        while times.front().is_some_and(|t| now.duration_since(*t) >= CREATION_WINDOW) {
            times.pop_front();
        }
        if times.len() >= limit {
            crate::metrics::quota_refused(crate::metrics::Quota::Rooms);
            return Err(RoomError::TooManyCreated(limit));
        }
        times.push_back(now);
        Ok(())
    }

    /// The peer leaves; the room closes with its last peer.
    pub fn leave(&self, link: &RoomLink) {
        link.command(RoomCommand::Leave { at: Instant::now(), peer: link.peer.clone() });
        self.release(&link.room, link.serial);
    }

    /// One peer fewer in `room` (the copy numbered `serial`: not a newer one of the same name).
    fn release(&self, room: &str, serial: u64) {
        let mut state = self.state();
        let empty = match state.rooms.get_mut(room) {
            Some(entry) if entry.serial == serial => {
                entry.peers = entry.peers.saturating_sub(1);
                entry.peers == 0
            }
            _ => false,
        };
        if empty && let Some(entry) = state.rooms.remove(room) {
            self.count.send_replace(state.rooms.len());
            // Sent after the peer's Leave on the same channel: the room applies it first.
            if let Err(error) = entry.tx.try_send(RoomCommand::Close) {
                self.worker_metrics[entry.worker].command_dropped(DropCause::of(&error));
                tracing::warn!(room, "room queue full at close; the worker closes it when it drains");
            }
        }
    }

    /// Every worker's media figures, summed.
    pub fn media_stats(&self) -> WorkerStats {
        let mut total = WorkerStats::default();
        for slot in self.worker_stats.iter() {
            let stats = *slot.lock().unwrap_or_else(|p| p.into_inner());
            total.connections += stats.connections;
            total.media.add(&stats.media);
        }
        total
    }

    /// The rooms, and the buffer budget with each room's place in it.
    pub fn list(&self) -> RoomList {
        let buffer = self.budget.view();
        let rooms = self
            .state()
            .rooms
            .iter()
            .map(|(id, entry)| {
                let (buffer_bytes, share_bytes) = buffer.rooms.get(&entry.serial).copied().unwrap_or_default();
                RoomSummary {
                    id: id.clone(),
                    peers: entry.peers,
                    worker: entry.worker,
                    created_unix_s: entry.created_unix_s,
                    buffer_bytes,
                    share_bytes,
                }
            })
            .collect();
        RoomList { buffer, rooms }
    }

    /// The buffer budget, and every room's buffer and share summed.
    pub fn budget(&self) -> budget::BudgetView {
        self.budget.view()
    }

    /// Tells every room that `uid`'s account now has `roles` (an admin changed its claim):
    /// the rooms it is in apply them at once. Best effort: a room whose queue is full misses
    /// it, and the peer's next join or `reauth` carries the new role anyway.
    pub fn account_roles(&self, uid: &str, roles: &[Role]) {
        let at = Instant::now();
        for entry in self.state().rooms.values() {
            let command = RoomCommand::AccountRoles { at, uid: uid.to_owned(), roles: roles.to_vec() };
            if entry.tx.try_send(command).is_err() {
                tracing::warn!(uid, "a room missed an account's role change (its queue is full or closed)");
            }
        }
    }

    pub async fn view(&self, room: &str) -> Option<RoomView> {
        let tx = self.state().rooms.get(room)?.tx.clone();
        let (reply, answer) = oneshot::channel();
        tx.send(RoomCommand::View { reply }).await.ok()?;
        answer.await.ok()
    }

    /// Whether `room` runs here now.
    pub fn contains(&self, room: &str) -> bool {
        self.state().rooms.contains_key(room)
    }

    /// The rooms running here (their origin), the peers in all, and whether the server drains: what the
    /// cluster's directory knows of this node.
    pub fn load(&self) -> (Vec<String>, crate::cluster::Load) {
        let state = self.state();
        let load = crate::cluster::Load {
            rooms: state.rooms.len(),
            peers: state.rooms.values().map(|entry| entry.peers).sum(),
            draining: self.draining(),
            ..Default::default()
        };
        // The rooms served here as edges are their origins' in the directory: not claimed.
        (state.rooms.iter().filter(|(_, entry)| !entry.edge).map(|(id, _)| id.clone()).collect(), load)
    }

    /// Rooms open now.
    pub fn count(&self) -> usize {
        self.state().rooms.len()
    }

    /// Stops making rooms: a join that would make one gets [`RoomError::Draining`]; the rooms
    /// there are keep serving, and new peers may join them.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Waits until no room is left.
    pub async fn empty(&self) {
        let mut count = self.count.subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Closes every room (recordings are flushed) and stops the workers.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let rooms = std::mem::take(&mut self.state().rooms);
        self.count.send_replace(0);
        for (_, entry) in rooms {
            let _ = entry.tx.try_send(RoomCommand::Close);
        }
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        for handle in handles {
            // The budget's thread sleeps in `park_timeout`: wake it to see `stopping`.
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}
