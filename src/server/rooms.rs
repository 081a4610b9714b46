//! Rooms on worker threads, as mediasoup's routers on its workers.
//!
//! Each room is one [`Engine`] owned by one worker thread (a plain OS thread: ticking is CPU
//! work and must not wait on the async runtime). Network tasks talk to a room through a bounded
//! channel of [`RoomCommand`]s stamped with their arrival time; the worker drains it at each tick,
//! ticks, and hands the outputs to per-peer channels with `try_send`, so a slow or dead client
//! never stalls a tick (what does not fit is dropped and counted).
//!
//! Missed-tick policy: a worker that wakes late runs the missed ticks back to back (a burst of
//! packets, as after network jitter), at most [`MAX_CATCH_UP_TICKS`] per wake-up; a room further
//! behind than that skips the rest (its clock is moved forward, the stall is not replayed) and the
//! skip is counted and logged. Inputs are recorded with the tick that consumed them, so a
//! recording replays exactly whatever the worker's timing was.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use encore_systems::components::config::EngineConfig;
use encore_systems::components::ids::{Name, PeerKey, Role, UtteranceId};
use encore_systems::components::input::Input;
use encore_systems::components::output::{EndReason, Event, RouteReason, SendPacket};
use encore_systems::{Engine, RoomView};

use super::recorder::Recorder;

/// Commands a room's channel holds; most rooms see a few thousand a second.
pub const ROOM_CHANNEL: usize = 8192;
/// Notifications queued per peer before the slowest are dropped.
pub const PEER_EVENTS: usize = 256;
/// Media packets queued per listener before they are dropped (about 2.5 s of audio).
pub const PEER_MEDIA: usize = 128;
/// Missed ticks a room runs back to back in one wake-up before it skips the rest.
pub const MAX_CATCH_UP_TICKS: u64 = 100;
/// Commands applied per room per tick at most (the rest wait for the next tick).
const MAX_COMMANDS_PER_TICK: usize = 20_000;

/// Something a peer's signaling session tells its client.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    NowPlaying {
        utterance: Option<String>,
        speaker: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<String>,
        live: bool,
        lag_ms: u64,
        reason: RouteReason,
    },
    UtteranceStarted {
        utterance: String,
        speaker: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<String>,
    },
    UtteranceEnded {
        utterance: String,
        speaker: String,
        duration_ms: u64,
        reason: EndReason,
    },
    PeerJoined {
        peer: String,
        uid: Option<String>,
        roles: Vec<Role>,
    },
    PeerLeft {
        peer: String,
        uid: Option<String>,
        roles: Vec<Role>,
    },
    Publishing {
        peer: String,
        publishing: bool,
    },
    Removed {
        by: String,
    },
    /// A moderator muted this peer's microphone (its send transport is paused; `resume` undoes).
    Muted {
        by: String,
    },
}

/// What a publisher's transport is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherControl {
    /// Send a PLI: the engine wants a key frame.
    KeyframeRequest,
}

/// A peer as the room knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerInfo {
    pub peer: String,
    pub uid: Option<String>,
    pub roles: Vec<Role>,
    pub publishing: bool,
}

/// The answer to a join.
#[derive(Debug, Clone)]
pub struct Joined {
    pub peer: Name,
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
}

pub enum RoomCommand {
    Join {
        at: Instant,
        name: String,
        uid: Option<String>,
        roles: Vec<Role>,
        events: mpsc::Sender<Notice>,
        reply: oneshot::Sender<Joined>,
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
    /// A moderator's removal: the peer is told, then its session ends it.
    Remove {
        peer: Name,
        by: Name,
    },
    /// A moderator's mute: the peer's session pauses its microphone.
    Mute {
        peer: Name,
        by: Name,
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
}

impl RoomLink {
    /// Sends an engine input stamped now; false (and counted) when the room's queue is full.
    pub fn input(&self, input: Input) -> bool {
        self.command(RoomCommand::Input { at: Instant::now(), input })
    }

    pub fn command(&self, command: RoomCommand) -> bool {
        let sent = self.tx.try_send(command).is_ok();
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
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
    handles: Mutex<Vec<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
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
        for index in 0..workers.max(1) {
            let (tx, rx) = std::sync::mpsc::channel::<Room>();
            let stopping = stopping.clone();
            let handle = std::thread::Builder::new()
                .name(format!("encore-worker-{index}"))
                .spawn(move || run_worker(index, rx, stopping))
                .expect("spawning a worker thread");
            senders.push(tx);
            handles.push(handle);
        }
        Arc::new(Rooms {
            state: Mutex::new(RoomsState { rooms: BTreeMap::new(), next_worker: 0 }),
            workers: senders,
            handles: Mutex::new(handles),
            stopping,
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
    ) -> Result<(RoomLink, Joined), RoomError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(RoomError::Closed);
        }
        let (tx, dropped) = {
            let mut state = self.state();
            let count = state.rooms.len();
            if !state.rooms.contains_key(room) {
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
                let room_state = Room::new(room.to_owned(), engine, rx, recorder);
                if self.workers[worker].send(room_state).is_err() {
                    return Err(RoomError::Closed);
                }
                state.rooms.insert(
                    room.to_owned(),
                    RoomEntry { tx, peers: 0, worker, created_unix_s: created.as_secs(), dropped },
                );
            }
            let entry = state.rooms.get_mut(room).ok_or(RoomError::Closed)?;
            if entry.peers >= self.max_peers {
                return Err(RoomError::Full(self.max_peers));
            }
            entry.peers += 1;
            (entry.tx.clone(), entry.dropped.clone())
        };
        let (reply, answer) = oneshot::channel();
        let command = RoomCommand::Join { at: Instant::now(), name: name.to_owned(), uid, roles, events, reply };
        if tx.send(command).await.is_err() {
            self.release(room);
            return Err(RoomError::Closed);
        }
        match answer.await {
            Ok(joined) => {
                let link = RoomLink { room: room.to_owned(), peer: joined.peer.clone(), tx, dropped };
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
        let _ = link.tx.try_send(RoomCommand::Leave { at: Instant::now(), peer: link.peer.clone() });
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
            // Sent after the peer's Leave on the same channel: the room applies it first.
            if entry.tx.try_send(RoomCommand::Close).is_err() {
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

    /// Closes every room (recordings are flushed) and stops the workers.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let rooms = std::mem::take(&mut self.state().rooms);
        for (_, entry) in rooms {
            let _ = entry.tx.try_send(RoomCommand::Close);
        }
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        for handle in handles {
            let _ = handle.join();
        }
    }
}

/// A peer's channels, as the room keeps them.
struct PeerSlot {
    uid: Option<String>,
    roles: Vec<Role>,
    events: mpsc::Sender<Notice>,
    media: Option<mpsc::Sender<SendPacket>>,
    publishing: bool,
}

/// One room on its worker.
struct Room {
    id: String,
    engine: Engine,
    rx: mpsc::Receiver<RoomCommand>,
    start: Instant,
    peers: BTreeMap<Name, PeerSlot>,
    /// Media channel per listener key, filled on its first packet.
    media_by_key: HashMap<PeerKey, Option<mpsc::Sender<SendPacket>>>,
    /// Published tracks: their peer and their transport's control channel.
    publishers: BTreeMap<Name, (Name, mpsc::Sender<PublisherControl>)>,
    open: BTreeMap<UtteranceId, Option<String>>,
    recorder: Option<Recorder>,
    last_at_us: u64,
    closed: bool,
    skipped_ticks: u64,
    dropped_media: u64,
    dropped_events: u64,
}

impl Room {
    fn new(id: String, engine: Engine, rx: mpsc::Receiver<RoomCommand>, recorder: Option<Recorder>) -> Self {
        Room {
            id,
            engine,
            rx,
            start: Instant::now(),
            peers: BTreeMap::new(),
            media_by_key: HashMap::new(),
            publishers: BTreeMap::new(),
            open: BTreeMap::new(),
            recorder,
            last_at_us: 0,
            closed: false,
            skipped_ticks: 0,
            dropped_media: 0,
            dropped_events: 0,
        }
    }

    fn tick_us(&self) -> u64 {
        self.engine.tick_us()
    }

    /// When the next tick is due.
    fn next_deadline(&self) -> Instant {
        self.start + Duration::from_micros(self.engine.next_tick_us())
    }

    /// Runs the ticks whose time has come.
    fn run_due(&mut self, now: Instant) {
        let elapsed_us = now.saturating_duration_since(self.start).as_micros() as u64;
        let due = elapsed_us / self.tick_us();
        let mut ran = 0;
        while !self.closed && self.engine.next_tick() <= due {
            if ran == MAX_CATCH_UP_TICKS {
                let skipped = due + 1 - self.engine.next_tick();
                self.start += Duration::from_micros(skipped * self.tick_us());
                self.skipped_ticks += skipped;
                tracing::warn!(room = %self.id, skipped, "the worker fell behind; skipping ticks");
                break;
            }
            self.tick_once();
            ran += 1;
        }
    }

    fn at_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    fn push(&mut self, at: Instant, input: Input) {
        // Network tasks stamp and queue concurrently, so stamps can come out of order by a hair:
        // keep them monotonic (the engine and a recording's reader want time that never goes
        // back), and never later than the tick that applies them.
        let at_us = self.at_us(at).max(self.last_at_us).min(self.engine.next_tick_us());
        self.last_at_us = at_us;
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.input(at_us, self.engine.next_tick(), &input)
        {
            tracing::error!(room = %self.id, %error, "recording failed; recording stops");
            self.recorder = None;
        }
        self.engine.push(at_us, input);
    }

    fn tick_once(&mut self) {
        for _ in 0..MAX_COMMANDS_PER_TICK {
            match self.rx.try_recv() {
                Ok(command) => self.apply(command),
                Err(_) => break,
            }
            if self.closed {
                return;
            }
        }
        let mut output = std::mem::take(self.engine.tick());
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.tick(&self.engine, &output)
        {
            tracing::error!(room = %self.id, %error, "recording failed; recording stops");
            self.recorder = None;
        }
        for event in &output.events {
            self.notify(event);
        }
        for packet in output.packets.drain(..) {
            self.deliver(packet);
        }
        *self.engine.last_output() = output;
    }

    fn unique_name(&self, wanted: &str) -> Name {
        let base: String =
            wanted.chars().filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.')).take(32).collect();
        let base = if base.is_empty() { "peer".to_owned() } else { base };
        if !self.peers.contains_key(base.as_str()) && self.engine.peer_key(&base).is_none() {
            return Name::from(base);
        }
        (2..)
            .map(|n| format!("{base}-{n}"))
            .find(|name| !self.peers.contains_key(name.as_str()) && self.engine.peer_key(name).is_none())
            .map(Name::from)
            .unwrap_or_else(|| Name::new("peer"))
    }

    /// Counts a notice that did not reach its session: its queue was full (a slow client loses
    /// notices), not closed (a session that ended and is leaving loses nothing).
    fn count_undelivered(&mut self, error: mpsc::error::TrySendError<Notice>) {
        if let mpsc::error::TrySendError::Full(_) = error {
            self.dropped_events += 1;
        }
    }

    fn broadcast(&mut self, notice: Notice, except: Option<&Name>) {
        let mut undelivered = Vec::new();
        for (name, slot) in &self.peers {
            if Some(name) == except {
                continue;
            }
            if let Err(error) = slot.events.try_send(notice.clone()) {
                undelivered.push(error);
            }
        }
        for error in undelivered {
            self.count_undelivered(error);
        }
    }

    fn tell(&mut self, peer: &str, notice: Notice) {
        if let Some(slot) = self.peers.get(peer)
            && let Err(error) = slot.events.try_send(notice)
        {
            self.count_undelivered(error);
        }
    }

    fn apply(&mut self, command: RoomCommand) {
        match command {
            RoomCommand::Join { at, name, uid, roles, events, reply } => {
                let peer = self.unique_name(&name);
                let peers = self
                    .peers
                    .iter()
                    .map(|(name, slot)| PeerInfo {
                        peer: name.to_string(),
                        uid: slot.uid.clone(),
                        roles: slot.roles.clone(),
                        publishing: slot.publishing,
                    })
                    .collect();
                self.push(at, Input::Join { peer: peer.clone(), uid: uid.clone(), roles: roles.clone() });
                let joined = Notice::PeerJoined { peer: peer.to_string(), uid: uid.clone(), roles: roles.clone() };
                self.broadcast(joined, None);
                self.peers.insert(peer.clone(), PeerSlot { uid, roles, events, media: None, publishing: false });
                let _ = reply.send(Joined { peer, peers });
            }
            RoomCommand::Leave { at, peer } => {
                if let Some(slot) = self.peers.remove(&peer) {
                    self.push(at, Input::Leave { peer: peer.clone() });
                    self.media_by_key.clear();
                    self.publishers.retain(|_, (owner, _)| *owner != peer);
                    let left = Notice::PeerLeft { peer: peer.to_string(), uid: slot.uid, roles: slot.roles };
                    self.broadcast(left, None);
                }
            }
            RoomCommand::Input { at, input } => self.push(at, input),
            RoomCommand::AttachMedia { peer, media } => {
                if let Some(slot) = self.peers.get_mut(&peer) {
                    slot.media = Some(media);
                    self.media_by_key.clear();
                }
            }
            RoomCommand::DetachMedia { peer } => {
                if let Some(slot) = self.peers.get_mut(&peer) {
                    slot.media = None;
                    self.media_by_key.clear();
                }
            }
            RoomCommand::AttachPublisher { peer, track, control } => {
                self.publishers.insert(track, (peer, control));
            }
            RoomCommand::SetPublishing { peer, publishing } => {
                if let Some(slot) = self.peers.get_mut(&peer)
                    && slot.publishing != publishing
                {
                    slot.publishing = publishing;
                    self.broadcast(Notice::Publishing { peer: peer.to_string(), publishing }, None);
                }
            }
            RoomCommand::Remove { peer, by } => self.tell(&peer, Notice::Removed { by: by.to_string() }),
            RoomCommand::Mute { peer, by } => self.tell(&peer, Notice::Muted { by: by.to_string() }),
            RoomCommand::View { reply } => {
                let _ = reply.send(self.engine.view());
            }
            RoomCommand::Close => {
                self.close();
            }
        }
    }

    fn notify(&mut self, event: &Event) {
        match event {
            Event::UtteranceStart { utterance, speaker, uid, .. } => {
                self.open.insert(utterance.clone(), uid.clone());
                let notice = Notice::UtteranceStarted {
                    utterance: utterance.to_string(),
                    speaker: speaker.to_string(),
                    uid: uid.clone(),
                };
                self.broadcast(notice, None);
            }
            Event::UtteranceEnd { utterance, duration_us, reason, .. } => {
                self.open.remove(utterance);
                let notice = Notice::UtteranceEnded {
                    utterance: utterance.to_string(),
                    speaker: utterance.speaker.to_string(),
                    duration_ms: duration_us / 1000,
                    reason: *reason,
                };
                self.broadcast(notice, None);
            }
            Event::Route { listener, to, reason, lag_us, .. } => {
                let live = to.as_ref().is_some_and(|id| self.open.contains_key(id));
                let uid = to.as_ref().and_then(|id| self.open.get(id).cloned().flatten());
                let notice = Notice::NowPlaying {
                    utterance: to.as_ref().map(|id| id.to_string()),
                    speaker: to.as_ref().map(|id| id.speaker.to_string()),
                    uid,
                    live,
                    lag_ms: lag_us.unwrap_or(0) / 1000,
                    reason: *reason,
                };
                self.tell(listener, notice);
            }
            Event::KeyframeRequest { track, .. } => {
                if let Some((_, control)) = self.publishers.get(track) {
                    let _ = control.try_send(PublisherControl::KeyframeRequest);
                }
            }
            Event::Evict { .. } | Event::Stats(_) => {}
        }
    }

    fn deliver(&mut self, packet: SendPacket) {
        let key = packet.listener;
        if !self.media_by_key.contains_key(&key) {
            let sender = self
                .engine
                .peer_name(key)
                .and_then(|name| self.peers.get(name.as_str()))
                .and_then(|slot| slot.media.clone());
            self.media_by_key.insert(key, sender);
        }
        if let Some(Some(media)) = self.media_by_key.get(&key)
            && media.try_send(packet).is_err()
        {
            self.dropped_media += 1;
        }
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.flush()
        {
            tracing::error!(room = %self.id, %error, "flushing the recording failed");
        }
        tracing::info!(
            room = %self.id,
            ticks = self.engine.next_tick(),
            skipped_ticks = self.skipped_ticks,
            dropped_media = self.dropped_media,
            dropped_events = self.dropped_events,
            "room closed"
        );
    }
}

fn run_worker(index: usize, control: std::sync::mpsc::Receiver<Room>, stopping: Arc<AtomicBool>) {
    let mut rooms: Vec<Room> = Vec::new();
    loop {
        let now = Instant::now();
        for room in rooms.iter_mut() {
            room.run_due(now);
            if !room.closed && stopping.load(Ordering::Relaxed) && room.rx.is_closed() {
                room.close();
            }
        }
        rooms.retain(|room| !room.closed);
        if stopping.load(Ordering::Relaxed) && rooms.is_empty() {
            // Drain rooms still arriving, then stop.
            while let Ok(mut room) = control.try_recv() {
                room.close();
            }
            tracing::debug!(worker = index, "worker stopped");
            return;
        }
        let wait = rooms
            .iter()
            .map(Room::next_deadline)
            .min()
            .map_or(Duration::from_millis(100), |deadline| deadline.saturating_duration_since(Instant::now()));
        match control.recv_timeout(wait) {
            Ok(room) => rooms.push(room),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if rooms.is_empty() {
                    return;
                }
                std::thread::sleep(wait);
            }
        }
    }
}
