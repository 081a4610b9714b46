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
//! - [`room`]: one room as its worker runs it (the engine, its peers' channels, the recorder);
//! - [`worker`]: the worker threads and the missed-tick policy ([`worker::Pacer`]).

mod room;
pub mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use encore_systems::components::config::EngineConfig;
use encore_systems::components::ids::{Name, Role, UtteranceId};
use encore_systems::components::input::{FeedbackSignal, Input};
use encore_systems::components::output::SendPacket;
use encore_systems::{Engine, RoomView};

use super::recorder::Recorder;
use crate::metrics::{DropCause, RoomMetrics, WorkerMetrics};
use crate::protocol::{ErrorBody, ErrorCode, Notice, PeerInfo};
use room::Room;

/// Commands a room's channel holds; most rooms see a few thousand a second.
pub const ROOM_CHANNEL: usize = 8192;
/// Notifications queued per peer before the slowest are dropped.
pub const PEER_EVENTS: usize = 256;
/// Media packets queued per listener before they are dropped (about 2.5 s of audio).
pub const PEER_MEDIA: usize = 128;

/// What a publisher's transport is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherControl {
    /// Send a PLI: the engine wants a key frame.
    KeyframeRequest,
}

/// The room's answer to a join.
#[derive(Debug, Clone)]
pub struct JoinedRoom {
    /// The peer's name in the room: the display name asked for, made unique.
    pub peer: Name,
    /// The peers already there.
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("the room is full ({0} peers)")]
    Full(usize),
    #[error("the server has too many rooms ({0})")]
    TooManyRooms(usize),
    #[error("the room is closing")]
    Closed,
    #[error("the server is draining: it takes no new rooms; join another server")]
    Draining,
}

impl RoomError {
    /// The protocol's error code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::Full(_) | RoomError::TooManyRooms(_) => ErrorCode::Conflict,
            RoomError::Closed | RoomError::Draining => ErrorCode::Unavailable,
        }
    }
}

/// What a moderator does to another peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moderation {
    /// Its microphone stops being forwarded (its session pauses the send transport).
    Mute,
    /// It is told, and its session ends.
    Remove,
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
    /// The listener's receive transport is ready for packets.
    AttachMedia {
        peer: Name,
        media: mpsc::Sender<SendPacket>,
    },
    DetachMedia {
        peer: Name,
    },
    /// A published track's transport, for key-frame requests.
    AttachPublisher {
        peer: Name,
        track: Name,
        control: mpsc::Sender<PublisherControl>,
    },
    SetPublishing {
        peer: Name,
        publishing: bool,
    },
    /// A moderator's act on another peer: `not_found` when no such peer is in the room.
    Moderate {
        action: Moderation,
        peer: Name,
        by: Name,
        reply: Verdict,
    },
    View {
        reply: oneshot::Sender<RoomView>,
    },
    Close,
}

/// A network task's handle on its room.
#[derive(Clone)]
pub struct RoomLink {
    pub room: String,
    pub peer: Name,
    tx: mpsc::Sender<RoomCommand>,
    dropped: Arc<AtomicU64>,
    metrics: WorkerMetrics,
    /// When the peer asked to join, and whether it has been sent a packet since: the join
    /// latency is measured once, at its first packet.
    joined_at: Instant,
    first_media: Arc<AtomicBool>,
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

    /// A packet went out to this peer: the first one ends its join latency.
    pub fn media_sent(&self) {
        if !self.first_media.swap(true, Ordering::Relaxed) {
            crate::metrics::join_latency(self.joined_at.elapsed());
        }
    }

    /// Sends a command that the room answers, and waits for its verdict.
    pub async fn ask(&self, command: impl FnOnce(Verdict) -> RoomCommand) -> Result<(), ErrorBody> {
        let (reply, verdict) = oneshot::channel();
        let closed = || ErrorBody::new(ErrorCode::Unavailable, RoomError::Closed.to_string());
        if !self.command(command(reply)) {
            return Err(ErrorBody::new(ErrorCode::Unavailable, "the room is too busy to take it; try again"));
        }
        verdict.await.map_err(|_| closed())?
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
}

struct RoomEntry {
    tx: mpsc::Sender<RoomCommand>,
    peers: usize,
    worker: usize,
    created_unix_s: u64,
    dropped: Arc<AtomicU64>,
}

struct RoomsState {
    rooms: BTreeMap<String, RoomEntry>,
    next_worker: usize,
}

/// Every room of the server and the workers that run them.
pub struct Rooms {
    state: Mutex<RoomsState>,
    workers: Vec<std::sync::mpsc::Sender<Room>>,
    worker_metrics: Vec<WorkerMetrics>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    /// Draining: no new rooms, the rooms there are go on (new peers may join them).
    draining: AtomicBool,
    /// The number of rooms, for a drain to wait on.
    count: watch::Sender<usize>,
    engine: EngineConfig,
    record_dir: Option<PathBuf>,
    max_rooms: usize,
    max_peers: usize,
}

impl Rooms {
    /// Starts `workers` worker threads.
    pub fn start(
        workers: usize,
        engine: EngineConfig,
        record_dir: Option<PathBuf>,
        max_rooms: usize,
        max_peers: usize,
    ) -> Arc<Self> {
        let stopping = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        let mut worker_metrics = Vec::new();
        for index in 0..workers.max(1) {
            let (tx, rx) = std::sync::mpsc::channel::<Room>();
            let stopping = stopping.clone();
            let metrics = WorkerMetrics::new(index);
            worker_metrics.push(metrics.clone());
            let handle = std::thread::Builder::new()
                .name(format!("encore-worker-{index}"))
                .spawn(move || worker::run(index, rx, stopping, metrics))
                .expect("spawning a worker thread");
            senders.push(tx);
            handles.push(handle);
        }
        Arc::new(Rooms {
            state: Mutex::new(RoomsState { rooms: BTreeMap::new(), next_worker: 0 }),
            workers: senders,
            worker_metrics,
            handles: Mutex::new(handles),
            stopping,
            draining: AtomicBool::new(false),
            count: watch::channel(0).0,
            engine,
            record_dir,
            max_rooms,
            max_peers,
        })
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
        let joined_at = Instant::now();
        if self.stopping.load(Ordering::Relaxed) {
            return Err(RoomError::Closed);
        }
        let (tx, dropped, metrics) = {
            let mut state = self.state();
            let count = state.rooms.len();
            if !state.rooms.contains_key(room) {
                if self.draining.load(Ordering::Relaxed) {
                    return Err(RoomError::Draining);
                }
                if count >= self.max_rooms {
                    return Err(RoomError::TooManyRooms(self.max_rooms));
                }
                let worker = state.next_worker % self.workers.len();
                state.next_worker += 1;
                let (tx, rx) = mpsc::channel(ROOM_CHANNEL);
                let engine = Engine::new(self.engine.clone()).map_err(|_| RoomError::Closed)?;
                let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                let recorder = self.record_dir.as_ref().and_then(|dir| {
                    let stamp = format!("{}", created.as_millis());
                    match Recorder::create(dir, room, &stamp, &self.engine) {
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
                let metrics = RoomMetrics::new(&self.worker_metrics[worker], engine.buffer_cap());
                let room_state = Room::new(room.to_owned(), engine, rx, recorder, metrics);
                if self.workers[worker].send(room_state).is_err() {
                    return Err(RoomError::Closed);
                }
                state.rooms.insert(
                    room.to_owned(),
                    RoomEntry { tx, peers: 0, worker, created_unix_s: created.as_secs(), dropped },
                );
                self.count.send_replace(state.rooms.len());
                tracing::info!(room, worker, "room created");
            }
            let entry = state.rooms.get_mut(room).ok_or(RoomError::Closed)?;
            if entry.peers >= self.max_peers {
                return Err(RoomError::Full(self.max_peers));
            }
            entry.peers += 1;
            (entry.tx.clone(), entry.dropped.clone(), self.worker_metrics[entry.worker].clone())
        };
        let (reply, answer) = oneshot::channel();
        let command = RoomCommand::Join { at: Instant::now(), name: name.to_owned(), uid, roles, events, reply };
        if tx.send(command).await.is_err() {
            self.release(room);
            return Err(RoomError::Closed);
        }
        match answer.await {
            Ok(joined) => {
                let link = RoomLink {
                    room: room.to_owned(),
                    peer: joined.peer.clone(),
                    tx,
                    dropped,
                    metrics,
                    joined_at,
                    first_media: Arc::new(AtomicBool::new(false)),
                };
                Ok((link, joined))
            }
            Err(_) => {
                self.release(room);
                Err(RoomError::Closed)
            }
        }
    }

    /// The peer leaves; the room closes with its last peer.
    pub fn leave(&self, link: &RoomLink) {
        link.command(RoomCommand::Leave { at: Instant::now(), peer: link.peer.clone() });
        self.release(&link.room);
    }

    fn release(&self, room: &str) {
        let mut state = self.state();
        let empty = match state.rooms.get_mut(room) {
            Some(entry) => {
                entry.peers = entry.peers.saturating_sub(1);
                entry.peers == 0
            }
            None => false,
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

    pub fn list(&self) -> Vec<RoomSummary> {
        self.state()
            .rooms
            .iter()
            .map(|(id, entry)| RoomSummary {
                id: id.clone(),
                peers: entry.peers,
                worker: entry.worker,
                created_unix_s: entry.created_unix_s,
            })
            .collect()
    }

    pub async fn view(&self, room: &str) -> Option<RoomView> {
        let tx = self.state().rooms.get(room)?.tx.clone();
        let (reply, answer) = oneshot::channel();
        tx.send(RoomCommand::View { reply }).await.ok()?;
        answer.await.ok()
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
            let _ = handle.join();
        }
    }
}
