//! One room as its worker runs it: the engine, its peers' channels and transports, its
//! recorder.
//!
//! The room's transports live on its worker's [`MediaIo`]: a publisher's RTP becomes an engine
//! input here, on the worker's thread, and the engine's packets for a listener go from here to
//! its connection, without a channel or a task in between.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use encore_systems::components::ids::{MediaKind, Name, PeerKey, Role};
use encore_systems::components::input::{Input, RtpIn};
use encore_systems::components::output::{Event, KeyframeReason, SendPacket};
use encore_systems::playout::catchup_bound_us;
use encore_systems::{Engine, RoomView};

use super::budget::RoomShare;
use super::worker::{MAX_CATCH_UP_TICKS, Pacer};
use super::{JoinedRoom, Moderation, RoomCommand, Stage};
use crate::media::{self as m, RtcpFeedback};
use crate::metrics::{DropCause, RoomMetrics};
use crate::protocol::{ErrorBody, ErrorCode, Notice, PeerInfo, QueuedUtterance, RoleChangeReason, Side, UP_NEXT_LEN};
use crate::relay::quic::Upstream;
use crate::server::media::{ConnKey, MediaEvent, MediaIo};
use crate::server::recorder::Recorder;
use crate::server::relay::{EdgeFeed, RoomFeed, THROUGH_EVERY_TICKS};

/// An RTP header with the audio-level extension, as the listener's packets carry it (the
/// `encore_rtp_bytes_total` count: header and payload, before SRTP).
const RTP_HEADER_BYTES: usize = 20;

/// How often the room tells its peers its publishers' levels.
const LEVELS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// How often the room looks at every listener's queue of what comes next (and, at once,
/// at those whose route changed).
const UP_NEXT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The largest room whose peers get `levels` and `up_next`: a stage with a large audience
/// does without, rather than send thousands of notices a second.
const CHATTER_MAX_PEERS: usize = 200;

/// Commands applied per room per tick at most (the rest wait for the next tick).
const MAX_COMMANDS_PER_TICK: usize = 20_000;

/// Edge ticks a room runs in one wake-up at most (an edge catching up on its origin's log
/// runs its ticks back to back; the worker's other rooms wait no longer than this).
const MAX_EDGE_TICKS_PER_WAKE: usize = 2000;

/// A room's part in the origin → edge relay (docs/scaling.md, "One room across nodes").
pub enum RoomRelay {
    /// The node has no relay.
    None,
    /// The room runs here, its origin: it writes its relay log for edges.
    Origin(Arc<RoomFeed>),
    /// The room's copy on an edge: its engine is a replica, run on its origin's lines.
    Edge(Box<EdgeFeed>),
}

/// A listener's receive transport.
struct RecvLeg {
    conn: ConnKey,
    connected: bool,
    /// Paused by its client: the engine holds the listener's position (told at once when
    /// connected, or with the `listen` input when it connects).
    paused: bool,
}

/// A peer's channels and transports, as the room keeps them.
struct PeerSlot {
    uid: Option<String>,
    /// Its roles in this room: its account's, with the room's grant applied.
    roles: Vec<Role>,
    /// Its account's roles (from its token, or an admin's change since).
    account_roles: Vec<Role>,
    grant: Option<Grant>,
    events: mpsc::Sender<Notice>,
    send: Option<ConnKey>,
    /// Its microphone is not forwarded: paused by the peer, or muted by a moderator.
    send_paused: bool,
    /// The moderator whose mute holds the microphone paused: the peer cannot resume it.
    muted_by: Option<String>,
    recv: Option<RecvLeg>,
    publishing: bool,
    /// When it asked to join, until its first packet (the join latency's end).
    waiting_since: Option<Instant>,
}

/// What the room's stage gave a peer, until it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// It accepted an invitation to speak.
    Speaker,
    /// A moderator moved it back to the audience.
    Audience,
}

/// A peer's roles in the room: its account's, with the room's grant applied; sorted.
fn room_roles(account: &[Role], grant: Option<Grant>) -> Vec<Role> {
    let mut roles: Vec<Role> = account.to_vec();
    match grant {
        None => {}
        Some(Grant::Speaker) => roles.push(Role::Speaker),
        Some(Grant::Audience) => roles.retain(|r| *r != Role::Speaker),
    }
    if roles.is_empty() {
        roles.push(Role::Listener);
    }
    roles.sort_unstable();
    roles.dedup();
    roles
}

fn may_publish(roles: &[Role]) -> bool {
    roles.iter().any(|r| r.may_publish())
}

/// A published track, as the engine names it.
#[derive(Clone)]
struct PublishedTrack {
    name: Name,
    peer: Name,
    conn: ConnKey,
    ssrc: u32,
}

/// One room on its worker.
pub struct Room {
    id: String,
    serial: u64,
    engine: Engine,
    rx: mpsc::Receiver<RoomCommand>,
    pacer: Pacer,
    peers: BTreeMap<Name, PeerSlot>,
    /// Raised hands, in the order they were raised.
    hands: Vec<Name>,
    /// Invitations to speak not yet answered: the invited peer, and who invited it.
    invites: BTreeMap<Name, Name>,
    /// Whom each listener hears now, and whether live (as its route said), for the speakers'
    /// `audience` notices; the speakers whose audience changed this tick.
    hearing: BTreeMap<Name, (Name, bool)>,
    audience_changed: BTreeSet<Name>,
    /// The loudest audio level (0 silence, 127 loudest) each publisher sent since the last
    /// `levels` notice, and when the next may go.
    levels: BTreeMap<Name, u8>,
    levels_at: Option<Instant>,
    /// The `up_next` queue each listener was last told (not kept while empty), the listeners
    /// whose route changed this tick, and when every listener's queue is looked at next.
    up_next_sent: BTreeMap<Name, Vec<QueuedUtterance>>,
    up_next_due: BTreeSet<Name>,
    up_next_at: Option<Instant>,
    /// An utterance opened or closed this tick: every listener's queue may have moved (a
    /// switch waiting for a pause is decided at an onset).
    up_next_all: bool,
    /// Whose each connection is, and which side.
    conns: HashMap<ConnKey, (Name, Side)>,
    /// Published tracks by their connection and SSRC, and by engine name.
    tracks: HashMap<(ConnKey, u32), PublishedTrack>,
    track_names: BTreeMap<Name, PublishedTrack>,
    /// A listener's receive connection by engine key, filled on its first packet.
    recv_by_key: HashMap<PeerKey, Option<(ConnKey, Name)>>,
    /// Moderators' mutes, by [`hold_key`], with who muted: a mute outlives the peer's session,
    /// so a muted user who leaves and joins again (or whose page reconnects) is still muted.
    holds: BTreeMap<String, String>,
    recorder: Option<Recorder>,
    /// The room's place in the server's buffer budget, and the cap its engine holds now.
    share: Arc<RoomShare>,
    cap: u64,
    /// When the engine has something due next, as last computed; forgotten whenever the
    /// engine changes (an input, a tick).
    due_at: Option<Instant>,
    metrics: RoomMetrics,
    relay: RoomRelay,
    closed: bool,
    skipped_ticks: u64,
    dropped_media: u64,
    dropped_events: u64,
}

/// What a room is made of besides its engine: where its commands come from, what it writes,
/// and its place in the server's budget and metrics.
pub struct RoomParts {
    pub rx: mpsc::Receiver<RoomCommand>,
    pub recorder: Option<Recorder>,
    pub share: Arc<RoomShare>,
    pub metrics: RoomMetrics,
    pub relay: RoomRelay,
}

impl Room {
    pub fn new(id: String, serial: u64, engine: Engine, parts: RoomParts) -> Self {
        let RoomParts { rx, recorder, share, metrics, relay } = parts;
        let pacer = Pacer::new(Instant::now(), engine.tick_us());
        let cap = engine.buffer_cap();
        let mut room = Room {
            id,
            serial,
            engine,
            rx,
            pacer,
            peers: BTreeMap::new(),
            hands: Vec::new(),
            invites: BTreeMap::new(),
            hearing: BTreeMap::new(),
            audience_changed: BTreeSet::new(),
            levels: BTreeMap::new(),
            levels_at: None,
            up_next_sent: BTreeMap::new(),
            up_next_due: BTreeSet::new(),
            up_next_at: None,
            up_next_all: false,
            conns: HashMap::new(),
            tracks: HashMap::new(),
            track_names: BTreeMap::new(),
            recv_by_key: HashMap::new(),
            holds: BTreeMap::new(),
            recorder,
            share,
            cap,
            due_at: None,
            metrics,
            relay,
            closed: false,
            skipped_ticks: 0,
            dropped_media: 0,
            dropped_events: 0,
        };
        if room.is_edge() {
            crate::metrics::edge_room(true);
        }
        // The room's first input: its share of the budget, before anything can fill it.
        room.apply_share(Instant::now());
        room
    }

    /// Gives the engine the share the budget grants now, if it changed (an engine input: the
    /// recording has it).
    fn apply_share(&mut self, at: Instant) {
        if self.is_edge() {
            // An edge's cap is its origin's (its `buffer_share` inputs are replicated): a
            // share of its own would make it evict otherwise.
            return;
        }
        let granted = self.share.granted();
        if granted != self.cap {
            self.cap = granted;
            self.push(at, Input::BufferShare { bytes: granted });
        }
    }

    pub fn serial(&self) -> u64 {
        self.serial
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Every sender of commands is gone.
    pub fn channel_closed(&self) -> bool {
        self.rx.is_closed()
    }

    /// When the room next needs its worker: the next tick while it is busy or has commands
    /// waiting; for a quiet room, the next tick anything is due at (its next stats line), or
    /// an input, whichever comes first. An idle room costs nothing between.
    pub fn next_deadline(&mut self) -> Instant {
        if let RoomRelay::Edge(feed) = &self.relay {
            // An edge runs when its origin's lines come (they raise the worker's flag).
            let ready = feed.pending() || feed.queue.ready(self.engine.next_tick()) || feed.ended.is_some();
            return if ready { Instant::now() } else { Instant::now() + std::time::Duration::from_secs(1) };
        }
        if self.waiting() {
            return self.pacer.deadline(self.engine.next_tick());
        }
        if let Some(due) = self.due_at {
            return due;
        }
        let mut due = self.pacer.deadline(self.engine.next_due_tick());
        if let RoomRelay::Origin(feed) = &self.relay
            && feed.has_edges()
        {
            // Its edges run only as far as its `through`: a sleeping room still says how far
            // it got, every few ticks.
            due = due.min(self.pacer.deadline(self.engine.next_tick() + THROUGH_EVERY_TICKS));
        }
        self.due_at = Some(due);
        due
    }

    /// A command or a new buffer share waits: the room runs its next tick.
    fn waiting(&self) -> bool {
        !self.rx.is_empty() || (!self.is_edge() && self.share.granted() != self.cap)
    }

    fn is_edge(&self) -> bool {
        matches!(self.relay, RoomRelay::Edge(_))
    }

    /// Passes over the ticks up to now where a quiet engine has nothing due (the decisions
    /// are those of running them: the engine's replay test holds it to that).
    fn skip_quiet(&mut self, now: Instant) {
        if !self.engine.is_quiet() {
            return;
        }
        let current = self.pacer.engine_us(now) / self.engine.tick_us();
        // Commands wait in the queue, not in the engine, so the engine stays quiet until a
        // tick applies them: that tick is the one due now. Otherwise the clock passes to the
        // next tick, where an input pushed now arrives at its real time.
        let next = if self.waiting() { current } else { current + 1 };
        let to = self.engine.next_due_tick().min(next);
        self.engine.skip_to(to);
    }

    /// Commands waiting in the room's queue.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Runs the ticks whose time has come; a quiet room passes over those with nothing due.
    /// Returns the ticks skipped for being too far behind.
    pub fn run_due(&mut self, now: Instant, media: &mut MediaIo) -> u64 {
        if self.is_edge() {
            self.run_edge(media);
            return 0;
        }
        if let RoomRelay::Origin(feed) = &self.relay {
            // Key frames an edge's listeners asked for: the publisher is here.
            for track in feed.take_keyframes() {
                if let Some(track) = self.track_names.get(track.as_str()) {
                    media.request_keyframe(now, track.conn, track.ssrc);
                }
            }
        }
        // A worker visits every room at every wake-up: a room with nothing due before its
        // known deadline costs two atomic loads, not a look into its engine (1 000 idle
        // rooms cost 64 % of a core without this).
        if self.due_at.is_some_and(|due| now < due) && !self.waiting() {
            return 0;
        }
        let mut skipped = 0;
        for _ in 0..MAX_CATCH_UP_TICKS {
            if self.closed {
                break;
            }
            self.skip_quiet(now);
            let due = self.pacer.due(self.engine.next_tick(), now);
            if due.skipped > 0 {
                skipped += due.skipped;
                self.skipped_ticks += due.skipped;
                tracing::warn!(room = %self.id, skipped = due.skipped, "the worker fell behind; skipping ticks");
            }
            if due.run == 0 {
                break;
            }
            self.tick_once(media);
        }
        if let RoomRelay::Origin(feed) = &self.relay
            && let Some(passed) = self.engine.next_tick().checked_sub(1)
        {
            feed.passed(passed);
        }
        skipped
    }

    /// An edge's turn: takes its origin's lines, and runs every tick the origin is past (up
    /// to [`MAX_EDGE_TICKS_PER_WAKE`]). When the origin's stream ended for good, its peers are
    /// told and the room closes.
    fn run_edge(&mut self, media: &mut MediaIo) {
        for _ in 0..MAX_EDGE_TICKS_PER_WAKE {
            let RoomRelay::Edge(feed) = &mut self.relay else { return };
            feed.take_lines(&self.engine);
            if self.closed || !feed.queue.ready(self.engine.next_tick()) {
                break;
            }
            self.tick_once(media);
        }
        let RoomRelay::Edge(feed) = &self.relay else { return };
        if let Some(why) = feed.ended.clone()
            && !feed.pending()
            && !feed.queue.ready(self.engine.next_tick())
            && !self.closed
        {
            tracing::info!(room = %self.id, why, "the edge's copy of the room ends");
            self.broadcast(Notice::Error {
                code: ErrorCode::Unavailable,
                message: format!("{why}: leave, then join the room again"),
                transport: None,
            });
            self.close(media);
        }
    }
    fn push(&mut self, at: Instant, input: Input) {
        self.due_at = None;
        // The engine keeps arrival times monotonic and within the tick that applies them;
        // the recording gets the time the engine keeps.
        let at_us = self.engine.arrival_us(self.pacer.engine_us(at));
        if self.is_edge()
            && let Err(error) = crate::relay::check_local(&input)
        {
            // Refused before it gets here (publish, stage and moderation are the origin's);
            // what is left is a role change of an account, which the origin's copy applies.
            tracing::debug!(room = %self.id, %error, code = error.code(), "an input the edge leaves to its origin");
            return;
        }
        self.record(at_us, &input);
        if let RoomRelay::Origin(feed) = &self.relay {
            feed.input(at_us, self.engine.next_tick(), &input);
        }
        self.engine.push(at_us, input);
    }

    fn record(&mut self, at_us: u64, input: &Input) {
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.input(at_us, self.engine.next_tick(), input)
        {
            tracing::error!(room = %self.id, %error, "recording failed; recording stops");
            self.recorder = None;
        }
    }

    fn tick_once(&mut self, media: &mut MediaIo) {
        self.due_at = None;
        let started = Instant::now();
        self.apply_share(started);
        let tick = self.engine.next_tick();
        // An edge's tick: its origin's inputs first, at the origin's arrival times; its own
        // peers' commands only once it has caught up with the origin (an edge that starts
        // late replays the room's log first, and its first peer joins the room as it is now);
        // then the origin's eviction orders.
        let mut orders = Vec::new();
        let mut commands = true;
        if let RoomRelay::Edge(feed) = &mut self.relay {
            let inputs = feed.queue.take_inputs(tick);
            orders = feed.queue.take_orders(tick);
            commands = feed.queue.through() == Some(tick) && !feed.pending();
            for (at_us, input) in inputs {
                self.record(at_us, &input);
                self.engine.push_replicated(at_us, input);
            }
        }
        for _ in 0..if commands { MAX_COMMANDS_PER_TICK } else { 0 } {
            match self.rx.try_recv() {
                Ok(command) => self.apply(command, media),
                Err(_) => break,
            }
            if self.closed {
                return;
            }
        }
        self.engine.push_evict_orders(tick, &orders);
        let mut output = self.engine.tick();
        match &self.relay {
            RoomRelay::Origin(feed) => feed.ticked(tick, self.engine.evict_orders()),
            // The cap is the origin's (replicated): the budget hears of the one the room holds.
            RoomRelay::Edge(_) => self.cap = self.engine.buffer_cap(),
            RoomRelay::None => {}
        }
        self.share.report(self.cap, self.engine.buffer_bytes(), self.engine.buffer_added_bytes());
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.tick(&self.engine, &output)
        {
            tracing::error!(room = %self.id, %error, "recording failed; recording stops");
            self.recorder = None;
        }
        for event in &output.events {
            self.notify(event, media);
        }
        self.tell_audiences();
        let now = Instant::now();
        self.send_levels(now);
        self.send_up_next(now);
        for packet in output.packets.drain(..) {
            self.deliver(now, packet, media);
        }
        self.metrics.after_tick(&output, &self.engine, started.elapsed());
        self.engine.recycle(output);
    }

    fn unique_name(&self, wanted: &str) -> Name {
        let base: String =
            wanted.chars().filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.')).take(32).collect();
        let base = if base.is_empty() { "peer".to_owned() } else { base };
        // An edge's own peers are `<name>@<node>`: no origin peer can take such a name.
        let suffix = match &self.relay {
            RoomRelay::Edge(feed) => format!("@{}", feed.node),
            _ => String::new(),
        };
        let free = |name: &str| !self.peers.contains_key(name) && self.engine.peer_key(name).is_none();
        std::iter::once(format!("{base}{suffix}"))
            .chain((2..).map(|n| format!("{base}-{n}{suffix}")))
            .find(|name| free(name))
            .map(Name::from)
            .unwrap_or_else(|| Name::new("peer"))
    }

    /// Counts a notice that did not reach its session: its queue was full (a slow client loses
    /// notices), not closed (a session that ended and is leaving loses nothing).
    fn count_undelivered(&mut self, error: mpsc::error::TrySendError<Notice>) {
        let cause = DropCause::of(&error);
        if cause == DropCause::Full {
            self.dropped_events += 1;
        }
        self.metrics.notice_dropped(cause);
    }

    fn broadcast(&mut self, notice: Notice) {
        let mut undelivered = Vec::new();
        for slot in self.peers.values() {
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

    fn apply(&mut self, command: RoomCommand, media: &mut MediaIo) {
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
                        muted_by: slot.muted_by.clone(),
                    })
                    .collect();
                let muted_by = self.holds.get(&hold_key(uid.as_deref(), &peer)).cloned();
                self.push(at, Input::Join { peer: peer.clone(), uid: uid.clone(), roles: roles.clone() });
                self.metrics.peer_joined(&roles);
                self.broadcast(Notice::PeerJoined { peer: peer.to_string(), uid: uid.clone(), roles: roles.clone() });
                let slot = PeerSlot {
                    uid,
                    roles: roles.clone(),
                    account_roles: roles,
                    grant: None,
                    events,
                    send: None,
                    send_paused: muted_by.is_some(),
                    muted_by: muted_by.clone(),
                    recv: None,
                    publishing: false,
                    waiting_since: Some(at),
                };
                self.peers.insert(peer.clone(), slot);
                let _ = reply.send(JoinedRoom { peer, peers, muted_by });
            }
            RoomCommand::Leave { at, peer } => {
                if let Some(slot) = self.peers.get(&peer) {
                    let conns: Vec<ConnKey> = slot.send.into_iter().chain(slot.recv.as_ref().map(|r| r.conn)).collect();
                    for conn in conns {
                        self.forget_conn(conn, media);
                    }
                }
                self.invites.retain(|invited, by| *invited != peer && *by != peer);
                if let Some((speaker, _)) = self.hearing.remove(&peer) {
                    self.audience_changed.insert(speaker);
                }
                self.up_next_sent.remove(&peer);
                if let Some(i) = self.hands.iter().position(|p| *p == peer) {
                    self.hands.remove(i);
                    self.broadcast_hands();
                }
                if let Some(slot) = self.peers.remove(&peer) {
                    self.push(at, Input::Leave { peer: peer.clone() });
                    self.metrics.peer_left(&slot.roles);
                    self.recv_by_key.clear();
                    self.broadcast(Notice::PeerLeft { peer: peer.to_string(), uid: slot.uid, roles: slot.roles });
                }
            }
            RoomCommand::Input { at, input } => self.push(at, input),
            RoomCommand::Feedback { at, peer, utterance, signal, reply } => {
                let verdict = self.check_feedback(&peer, utterance.as_ref());
                if verdict.is_ok() {
                    self.push(at, Input::Feedback { peer, utterance, signal });
                }
                let _ = reply.send(verdict);
            }
            RoomCommand::Publish { peer, offer, reply } => {
                let _ = reply.send(match self.is_edge() {
                    true => Err(edge_refusal("publish")),
                    false => self.publish(&peer, &offer, media),
                });
            }
            RoomCommand::Listen { peer, video, reply } => {
                let _ = reply.send(self.listen(&peer, video, media));
            }
            RoomCommand::Answer { peer, answer, reply } => {
                let result = match self.peers.get(&peer).and_then(|s| s.recv.as_ref()) {
                    None => Err(ErrorBody::new(ErrorCode::Conflict, "listen first")),
                    Some(leg) => media
                        .accept_answer(Instant::now(), leg.conn, &answer)
                        .map_err(|e| ErrorBody::new(e.code(), e.to_string())),
                };
                let _ = reply.send(result);
            }
            RoomCommand::HasTransport { peer, side, reply } => {
                let slot = self.peers.get(&peer);
                let has = match side {
                    Side::Send => slot.is_some_and(|s| s.send.is_some()),
                    Side::Recv => slot.is_some_and(|s| s.recv.is_some()),
                };
                let _ = reply.send(if has {
                    Ok(())
                } else {
                    let which = if side == Side::Send { "send" } else { "receive" };
                    Err(ErrorBody::new(ErrorCode::Conflict, format!("no {which} transport")))
                });
            }
            RoomCommand::Pause { peer, side, paused, reply } => {
                let result = match (self.peers.get_mut(&peer), side) {
                    (Some(slot), Side::Send) if slot.send.is_some() => match &slot.muted_by {
                        // A moderator's mute holds until a moderator lifts it.
                        Some(by) if !paused => Err(ErrorBody::new(
                            ErrorCode::Forbidden,
                            format!("{by} (a moderator) muted your microphone; only a moderator can unmute it"),
                        )),
                        _ => {
                            slot.send_paused = paused;
                            Ok(())
                        }
                    },
                    (Some(slot), Side::Recv) if slot.recv.is_some() => {
                        // The engine pauses the listener's stream: its position waits and
                        // nothing is sent, so no sequence number goes missing on the wire.
                        let mut tell = false;
                        if let Some(leg) = slot.recv.as_mut() {
                            tell = leg.connected && leg.paused != paused;
                            leg.paused = paused;
                        }
                        if tell {
                            let input = if paused { Input::Pause { peer } } else { Input::Resume { peer } };
                            self.push(Instant::now(), input);
                        }
                        Ok(())
                    }
                    (_, Side::Send) => Err(ErrorBody::new(ErrorCode::Conflict, "not publishing")),
                    (_, Side::Recv) => Err(ErrorBody::new(ErrorCode::Conflict, "not listening")),
                };
                let _ = reply.send(result);
            }
            RoomCommand::CloseTransport { peer, side, reply } => {
                let conn = self.peers.get(&peer).and_then(|slot| match side {
                    Side::Send => slot.send,
                    Side::Recv => slot.recv.as_ref().map(|r| r.conn),
                });
                let result = match conn {
                    Some(conn) => {
                        self.forget_conn(conn, media);
                        Ok(())
                    }
                    None if side == Side::Send => Err(ErrorBody::new(ErrorCode::Conflict, "not publishing")),
                    None => Err(ErrorBody::new(ErrorCode::Conflict, "not listening")),
                };
                let _ = reply.send(result);
            }
            RoomCommand::Moderate { action, peer, by, reply } => {
                let _ = reply.send(match self.is_edge() {
                    true => Err(edge_refusal("moderate")),
                    false => self.moderate(action, &peer, &by),
                });
            }
            RoomCommand::Stage { at, peer, action, reply } => {
                let _ = reply.send(match self.is_edge() {
                    true => Err(edge_refusal("use the stage")),
                    false => self.stage(at, &peer, action, media),
                });
            }
            RoomCommand::AccountRoles { at, uid, roles } => {
                let peers: Vec<Name> = self
                    .peers
                    .iter()
                    .filter(|(_, slot)| slot.uid.as_deref() == Some(uid.as_str()))
                    .map(|(name, _)| name.clone())
                    .collect();
                for peer in peers {
                    if let Some(slot) = self.peers.get_mut(&peer) {
                        slot.account_roles = roles.clone();
                    }
                    self.apply_roles(at, &peer, RoleChangeReason::Account, media);
                }
            }
            RoomCommand::View { reply } => {
                let _ = reply.send(self.view());
            }
            RoomCommand::Close => {
                self.close(media);
            }
        }
    }

    fn publish(&mut self, peer: &Name, offer: &str, media: &mut MediaIo) -> Result<String, ErrorBody> {
        let slot = self.peers.get(peer).ok_or_else(|| ErrorBody::new(ErrorCode::Conflict, "join a room first"))?;
        if !may_publish(&slot.roles) {
            let roles: Vec<&str> = slot.roles.iter().map(|r| r.as_str()).collect();
            let message = format!("role {} may not publish in this room", roles.join(", "));
            return Err(ErrorBody::new(ErrorCode::Forbidden, message));
        }
        if slot.send.is_some() {
            return Err(ErrorBody::new(ErrorCode::Conflict, "already publishing; unpublish first"));
        }
        let (conn, answer) = media
            .accept_offer(Instant::now(), self.serial, offer)
            .map_err(|e| ErrorBody::new(e.code(), e.to_string()))?;
        if let Some(slot) = self.peers.get_mut(peer) {
            slot.send = Some(conn);
            // Publishing anew does not lift a moderator's mute.
            slot.send_paused = slot.muted_by.is_some();
        }
        self.conns.insert(conn, (peer.clone(), Side::Send));
        Ok(answer)
    }

    fn listen(&mut self, peer: &Name, video: bool, media: &mut MediaIo) -> Result<String, ErrorBody> {
        let slot = self.peers.get(peer).ok_or_else(|| ErrorBody::new(ErrorCode::Conflict, "join a room first"))?;
        if slot.recv.is_some() {
            return Err(ErrorBody::new(ErrorCode::Conflict, "already listening"));
        }
        // The wire SSRCs are the connection's own (they are in its SDP); the engine writes its
        // stream's sequence numbers and timestamps under them.
        let audio_ssrc = random_ssrc();
        let video_ssrc = video.then(random_ssrc);
        let (conn, offer) = media
            .offer_listener(Instant::now(), self.serial, audio_ssrc, video_ssrc)
            .map_err(|e| ErrorBody::new(e.code(), e.to_string()))?;
        if let Some(slot) = self.peers.get_mut(peer) {
            slot.recv = Some(RecvLeg { conn, connected: false, paused: false });
        }
        self.conns.insert(conn, (peer.clone(), Side::Recv));
        Ok(offer)
    }

    /// Closes a connection and takes what it carried out of the engine.
    fn forget_conn(&mut self, conn: ConnKey, media: &mut MediaIo) {
        let now = Instant::now();
        media.close(now, conn);
        self.conn_gone(now, conn, false);
    }

    /// A connection is gone (closed by us or the client, or failed): its tracks end, its
    /// listener stops, and its client hears of a failure.
    fn conn_gone(&mut self, at: Instant, conn: ConnKey, failed: bool) {
        let Some((peer, side)) = self.conns.remove(&conn) else { return };
        match side {
            Side::Send => {
                let gone: Vec<PublishedTrack> = self.tracks.values().filter(|t| t.conn == conn).cloned().collect();
                for track in gone {
                    tracing::info!(room = %self.id, %peer, track = %track.name, "track unpublished");
                    self.tracks.remove(&(conn, track.ssrc));
                    self.track_names.remove(&track.name);
                    self.push(at, Input::Unpublish { track: track.name });
                }
                if let Some(slot) = self.peers.get_mut(&peer)
                    && slot.send == Some(conn)
                {
                    slot.send = None;
                    if slot.publishing {
                        slot.publishing = false;
                        self.metrics.publishing(false);
                        self.broadcast(Notice::Publishing { peer: peer.to_string(), publishing: false });
                    }
                }
            }
            Side::Recv => {
                let was_listening = self
                    .peers
                    .get_mut(&peer)
                    .and_then(|slot| slot.recv.take_if(|leg| leg.conn == conn))
                    .is_some_and(|leg| leg.connected);
                self.recv_by_key.clear();
                if was_listening {
                    tracing::info!(room = %self.id, %peer, "listening stopped");
                    self.push(at, Input::Unlisten { peer: peer.clone() });
                }
            }
        }
        if failed {
            tracing::info!(room = %self.id, %peer, %side, "transport failed");
            self.tell(
                &peer,
                Notice::Error {
                    code: ErrorCode::TransportFailed,
                    message: format!("the {side} transport failed; create it again"),
                    transport: Some(side),
                },
            );
        }
    }

    /// What the room's connections tell it, from the worker's media path.
    pub fn media_event(&mut self, event: MediaEvent, media: &mut MediaIo) {
        // A sleeping room wakes: its clock passes the quiet ticks first, so the input arrives
        // in the next tick to run, at its real time.
        self.skip_quiet(Instant::now());
        match event {
            MediaEvent::Connected { conn, .. } => {
                let Some((peer, side)) = self.conns.get(&conn).cloned() else { return };
                tracing::info!(room = %self.id, %peer, %side, "transport connected");
                if side == Side::Recv
                    && let Some(leg) = self.peers.get_mut(&peer).and_then(|s| s.recv.as_mut())
                    && leg.conn == conn
                {
                    leg.connected = true;
                    let paused = leg.paused;
                    self.recv_by_key.clear();
                    self.push(Instant::now(), Input::Listen { peer: peer.clone() });
                    if paused {
                        self.push(Instant::now(), Input::Pause { peer: peer.clone() });
                    }
                    tracing::info!(room = %self.id, %peer, "listening started");
                }
            }
            MediaEvent::Closed { conn, failed, .. } => self.conn_gone(Instant::now(), conn, failed),
            MediaEvent::TrackOpen { conn, media: kind, codec, clock_rate, ssrc, .. } => {
                let Some((peer, Side::Send)) = self.conns.get(&conn).cloned() else { return };
                let name = Name::from(format!("{peer}:{}", kind.as_str()));
                if self.track_names.contains_key(&name) {
                    return;
                }
                let track = PublishedTrack { name: name.clone(), peer: peer.clone(), conn, ssrc };
                self.tracks.insert((conn, ssrc), track.clone());
                self.track_names.insert(name.clone(), track);
                self.push(
                    Instant::now(),
                    Input::Publish {
                        peer: peer.clone(),
                        track: name.clone(),
                        media: kind,
                        codec: codec.clone(),
                        clock_rate,
                        ssrc,
                    },
                );
                tracing::info!(room = %self.id, %peer, track = %name, %codec, "track published");
                if let Some(slot) = self.peers.get_mut(&peer)
                    && !slot.publishing
                {
                    slot.publishing = true;
                    self.metrics.publishing(true);
                    self.broadcast(Notice::Publishing { peer: peer.to_string(), publishing: true });
                }
            }
            MediaEvent::Rtp { conn, media: kind, ssrc, at, packet, level, .. } => {
                let Some(track) = self.tracks.get(&(conn, ssrc)) else { return };
                let paused = self.peers.get(&track.peer).is_none_or(|slot| slot.send_paused);
                if paused {
                    return;
                }
                let name = track.name.clone();
                if let Some(level) = level {
                    // RFC 6464: 0 is the loudest, 127 silence; the meter wants loudness.
                    let volume = 127 - level.0.min(127);
                    let loudest = self.levels.entry(track.peer.clone()).or_insert(0);
                    *loudest = (*loudest).max(volume);
                }
                crate::metrics::rtp_in(
                    kind,
                    rtc::shared::marshal::MarshalSize::marshal_size(&packet.header) + packet.payload.len(),
                );
                let rtp = RtpIn {
                    seq: packet.header.sequence_number,
                    ts: packet.header.timestamp,
                    marker: packet.header.marker,
                    keyframe: kind == MediaKind::Video && m::vp8_keyframe_start(&packet.payload),
                    payload: Arc::from(&packet.payload[..]),
                    audio_level: level.map(|(level, _)| level),
                    voice: level.map(|(_, voice)| voice),
                };
                self.push(at, Input::Rtp { track: name, packet: rtp });
            }
            MediaEvent::Feedback { conn, media: kind, feedback, .. } => {
                let Some((peer, Side::Recv)) = self.conns.get(&conn).cloned() else { return };
                match feedback {
                    RtcpFeedback::Nack { seqs, .. } if !seqs.is_empty() => {
                        self.push(Instant::now(), Input::Nack { peer, media: kind, seqs });
                    }
                    RtcpFeedback::KeyframeRequest { .. } if kind == MediaKind::Video => {
                        self.push(Instant::now(), Input::KeyframeRequest { peer });
                    }
                    _ => {}
                }
            }
        }
        let _ = media;
    }

    /// Feedback must name an utterance this room had, or, without one, come from a listener
    /// that hears something now (as of the last tick).
    fn check_feedback(
        &self,
        peer: &str,
        utterance: Option<&encore_systems::components::UtteranceId>,
    ) -> Result<(), ErrorBody> {
        let Some(playing) = self.engine.listening(peer) else {
            return Err(ErrorBody::new(ErrorCode::Conflict, "feedback is for listeners: listen first"));
        };
        match (utterance, playing) {
            (Some(id), _) if !self.engine.utterance_existed(id) => {
                Err(ErrorBody::new(ErrorCode::NotFound, format!("no utterance {id} in this room")))
            }
            (None, None) => Err(ErrorBody::new(ErrorCode::NotFound, "nothing is playing; name the utterance")),
            _ => Ok(()),
        }
    }

    /// A moderator's act. Mutes live here, in the room worker, not in the engine: a muted
    /// speaker's packets are dropped before they become engine inputs, so the engine, the
    /// recording (the inputs the engine consumed) and its replay never see them, and replay
    /// reaches the live decisions without knowing of moderation (docs/protocol.md, Moderation).
    fn moderate(&mut self, action: Moderation, peer: &str, by: &str) -> Result<(), ErrorBody> {
        let Some(slot) = self.peers.get(peer) else {
            return Err(ErrorBody::new(ErrorCode::NotFound, format!("no peer {peer:?} in this room")));
        };
        let key = hold_key(slot.uid.as_deref(), peer);
        let by = by.to_owned();
        let muting = match action {
            Moderation::Mute => true,
            Moderation::Unmute => false,
            Moderation::Remove => {
                self.tell(peer, Notice::Removed { by });
                return Ok(());
            }
        };
        if muting {
            self.holds.insert(key.clone(), by.clone());
        } else {
            self.holds.remove(&key);
        }
        // The mute is the user's: every peer of it in the room (another tab, a session of a
        // page that reconnected before its old one was gone) is muted or unmuted with it.
        let peers: Vec<Name> = self
            .peers
            .iter()
            .filter(|(name, slot)| hold_key(slot.uid.as_deref(), name) == key)
            .map(|(name, _)| name.clone())
            .collect();
        for name in peers {
            let Some(slot) = self.peers.get_mut(&name) else { continue };
            if muting {
                // The microphone stops being forwarded here, and the peer cannot resume it.
                slot.send_paused = true;
                slot.muted_by = Some(by.clone());
                tracing::info!(room = %self.id, peer = %name, %by, "peer muted by a moderator");
                self.tell(&name, Notice::Muted { by: by.clone() });
                self.broadcast(Notice::PeerMuted { peer: name.to_string(), muted: true, by: by.clone() });
            } else if slot.muted_by.take().is_some() {
                // (A peer no moderator muted keeps its own pause: there is nothing to lift.)
                slot.send_paused = false;
                tracing::info!(room = %self.id, peer = %name, %by, "peer unmuted by a moderator");
                self.tell(&name, Notice::Unmuted { by: by.clone() });
                self.broadcast(Notice::PeerMuted { peer: name.to_string(), muted: false, by: by.clone() });
            }
        }
        Ok(())
    }

    /// Every [`LEVELS_EVERY`], the loudest level each publisher sent since, to everyone in the
    /// room (the page's meters), while the room has at most [`CHATTER_MAX_PEERS`] peers: a
    /// stage with a large audience does without, rather than send thousands of notices a second.
    fn send_levels(&mut self, now: Instant) {
        if self.levels.is_empty() || self.levels_at.is_some_and(|at| now < at) {
            return;
        }
        self.levels_at = Some(now + LEVELS_EVERY);
        let levels: BTreeMap<String, u8> =
            std::mem::take(&mut self.levels).into_iter().map(|(peer, level)| (peer.to_string(), level)).collect();
        if self.peers.len() <= CHATTER_MAX_PEERS {
            self.broadcast(Notice::Levels { levels });
        }
    }

    /// Tells listeners what they will hear next when it changed: those whose route changed
    /// this tick; every listener when an utterance opened or closed, and every
    /// [`UP_NEXT_EVERY`] (a like or a skip elsewhere moves the ranking too), in rooms of at most
    /// [`CHATTER_MAX_PEERS`]. A queue that differs only in how old its utterances are is not
    /// sent again. A listener that stops listening is told an empty queue.
    fn send_up_next(&mut self, now: Instant) {
        let every = self.up_next_at.is_none_or(|at| now >= at);
        let due = std::mem::take(&mut self.up_next_due);
        let all = std::mem::take(&mut self.up_next_all) || every;
        if self.peers.len() > CHATTER_MAX_PEERS {
            return;
        }
        if every {
            self.up_next_at = Some(now + UP_NEXT_EVERY);
        }
        let names: Vec<Name> = if all { self.peers.keys().cloned().collect() } else { due.into_iter().collect() };
        if names.is_empty() {
            return;
        }
        let asked: Vec<&str> = names.iter().map(|name| name.as_str()).collect();
        let queues = self.engine.up_next_of(&asked, UP_NEXT_LEN);
        for (name, queue) in names.into_iter().zip(queues) {
            let queue: Vec<QueuedUtterance> = queue
                .unwrap_or_default()
                .into_iter()
                .map(|item| QueuedUtterance {
                    uid: self.peers.get(item.id.speaker.as_str()).and_then(|slot| slot.uid.clone()),
                    speaker: item.id.speaker.to_string(),
                    utterance: item.id,
                    live: item.live,
                    age_ms: item.age_us / 1000,
                    reason: item.reason,
                })
                .collect();
            let same = |sent: &[QueuedUtterance]| {
                sent.len() == queue.len()
                    && sent.iter().zip(&queue).all(|(a, b)| {
                        (&a.utterance, a.live, a.reason, &a.uid) == (&b.utterance, b.live, b.reason, &b.uid)
                    })
            };
            let unchanged = match self.up_next_sent.get(&name) {
                Some(sent) => same(sent),
                None => queue.is_empty(),
            };
            if unchanged {
                continue;
            }
            if queue.is_empty() {
                self.up_next_sent.remove(&name);
            } else {
                self.up_next_sent.insert(name.clone(), queue.clone());
            }
            self.tell(&name, Notice::UpNext { queue });
        }
    }

    /// Tells each speaker whose audience changed this tick how many listeners hear it now,
    /// live and behind: one notice per speaker per tick, however many routes changed.
    fn tell_audiences(&mut self) {
        if self.audience_changed.is_empty() {
            return;
        }
        let changed = std::mem::take(&mut self.audience_changed);
        for speaker in changed {
            let (mut live, mut behind) = (0u32, 0u32);
            for (heard, is_live) in self.hearing.values() {
                if *heard == speaker {
                    if *is_live { live += 1 } else { behind += 1 }
                }
            }
            self.tell(&speaker, Notice::Audience { live, behind });
        }
    }

    fn broadcast_hands(&mut self) {
        let raised = self.hands.iter().map(|p| p.to_string()).collect();
        self.broadcast(Notice::Hands { raised });
    }

    fn stage(&mut self, at: Instant, peer: &Name, action: Stage, media: &mut MediaIo) -> Result<(), ErrorBody> {
        let not_found = |peer: &Name| ErrorBody::new(ErrorCode::NotFound, format!("no peer {peer:?} in this room"));
        let speaker = |peer: &Name| ErrorBody::new(ErrorCode::Conflict, format!("{peer} may speak already"));
        let slot = self.peers.get(peer).ok_or_else(|| ErrorBody::new(ErrorCode::Conflict, "join a room first"))?;
        match action {
            Stage::RaiseHand => {
                if may_publish(&slot.roles) {
                    return Err(speaker(peer));
                }
                if !self.hands.contains(peer) {
                    self.hands.push(peer.clone());
                    self.broadcast_hands();
                }
            }
            Stage::LowerHand => {
                if let Some(i) = self.hands.iter().position(|p| p == peer) {
                    self.hands.remove(i);
                    self.broadcast_hands();
                }
            }
            Stage::Invite { peer: invited } => {
                let target = self.peers.get(&invited).ok_or_else(|| not_found(&invited))?;
                if may_publish(&target.roles) {
                    return Err(speaker(&invited));
                }
                tracing::info!(room = %self.id, by = %peer, peer = %invited, "invited to speak");
                self.invites.insert(invited.clone(), peer.clone());
                self.tell(&invited, Notice::Invited { by: peer.to_string() });
            }
            Stage::AnswerInvite { accept } => {
                let Some(by) = self.invites.remove(peer) else {
                    return Err(ErrorBody::new(ErrorCode::Conflict, "no invitation to answer"));
                };
                tracing::info!(room = %self.id, %peer, accept, "invitation answered");
                if accept {
                    if let Some(slot) = self.peers.get_mut(peer) {
                        slot.grant = Some(Grant::Speaker);
                    }
                    self.apply_roles(at, peer, RoleChangeReason::Invited, media);
                } else {
                    self.tell(&by, Notice::InviteDeclined { peer: peer.to_string() });
                }
            }
            Stage::MoveToAudience { peer: moved } => {
                let target = self.peers.get_mut(&moved).ok_or_else(|| not_found(&moved))?;
                if target.account_roles.contains(&Role::Admin) {
                    return Err(ErrorBody::new(ErrorCode::Forbidden, "an admin may always speak"));
                }
                target.grant = Some(Grant::Audience);
                tracing::info!(room = %self.id, by = %peer, peer = %moved, "moved to the audience");
                self.apply_roles(at, &moved, RoleChangeReason::MovedToAudience, media);
            }
        }
        Ok(())
    }

    /// Gives a peer its roles in the room after its account or grant changed: the engine gets
    /// them (an input: recordings replay them), a peer that may no longer publish stops now,
    /// and the room hears of it.
    fn apply_roles(&mut self, at: Instant, peer: &Name, reason: RoleChangeReason, media: &mut MediaIo) {
        let Some(slot) = self.peers.get_mut(peer) else { return };
        let roles = room_roles(&slot.account_roles, slot.grant);
        if roles == slot.roles {
            return;
        }
        let old = std::mem::replace(&mut slot.roles, roles.clone());
        let send = slot.send.filter(|_| !may_publish(&roles));
        self.metrics.peer_left(&old);
        self.metrics.peer_joined(&roles);
        if let Some(conn) = send {
            self.forget_conn(conn, media);
        }
        self.push(at, Input::Roles { peer: peer.clone(), roles: roles.clone() });
        tracing::info!(room = %self.id, %peer, roles = ?roles, reason = ?reason, "roles changed");
        let speaks = may_publish(&roles);
        self.broadcast(Notice::RoleChanged { peer: peer.to_string(), roles, reason });
        if speaks && let Some(i) = self.hands.iter().position(|p| p == peer) {
            self.hands.remove(i);
            self.broadcast_hands();
        }
    }

    fn view(&mut self) -> RoomView {
        self.engine.view()
    }

    fn notify(&mut self, event: &Event, media: &mut MediaIo) {
        match event {
            Event::UtteranceStart { utterance, speaker, uid, .. } => {
                let notice = Notice::UtteranceStarted {
                    utterance: utterance.clone(),
                    speaker: speaker.to_string(),
                    uid: uid.clone(),
                };
                self.broadcast(notice);
                self.up_next_all = true;
            }
            Event::UtteranceEnd { utterance, duration_us, reason, .. } => {
                let notice = Notice::UtteranceEnded {
                    utterance: utterance.clone(),
                    speaker: utterance.speaker.to_string(),
                    duration_ms: duration_us / 1000,
                    reason: *reason,
                };
                self.broadcast(notice);
                self.up_next_all = true;
            }
            Event::Route { listener, from, to, reason, lag_us, live, .. } => {
                tracing::debug!(
                    room = %self.id,
                    listener = %listener,
                    from = ?from.as_ref().map(|u| u.to_string()),
                    to = ?to.as_ref().map(|u| u.to_string()),
                    reason = ?reason,
                    live,
                    lag_ms = lag_us.unwrap_or(0) / 1000,
                    "route changed"
                );
                // The speaker's uid while the speaker is in the room.
                let uid = to.as_ref().and_then(|id| self.peers.get(id.speaker.as_str())?.uid.clone());
                // A live route that starts within the catch-up bound is at the live edge a tick
                // later (play-out sends what it is behind by ahead of its time): that is the
                // lag the listener hears, not the pre-roll the route started behind by.
                let lag_us = match lag_us {
                    Some(lag) if *live && *lag <= catchup_bound_us(self.engine.config()) => Some(0),
                    other => *other,
                };
                let notice = Notice::NowPlaying {
                    utterance: to.clone(),
                    speaker: to.as_ref().map(|id| id.speaker.to_string()),
                    uid,
                    live: *live,
                    lag_ms: lag_us.unwrap_or(0) / 1000,
                    reason: *reason,
                };
                self.tell(listener, notice);
                self.up_next_due.insert(listener.clone());
                // Live: the listener is within a second of the speaker (as the page says it).
                let now = to.as_ref().map(|id| (id.speaker.clone(), *live && lag_us.unwrap_or(0) < 1_000_000));
                let before = match now {
                    Some(hears) => self.hearing.insert(listener.clone(), hears),
                    None => self.hearing.remove(listener),
                };
                self.audience_changed.extend(before.map(|(speaker, _)| speaker));
                self.audience_changed.extend(to.as_ref().map(|id| id.speaker.clone()));
            }
            Event::KeyframeRequest { track, reason } => {
                if let Some(track) = self.track_names.get(track) {
                    media.request_keyframe(Instant::now(), track.conn, track.ssrc);
                } else if let RoomRelay::Edge(feed) = &self.relay
                    && *reason == KeyframeReason::Listener
                {
                    // The publisher is on the origin. Its own engine asks at an onset.
                    let _ = feed.upstream.try_send(Upstream::Keyframe(track.to_string()));
                }
            }
            Event::DominantSpeaker { speaker, .. } => {
                self.broadcast(Notice::DominantSpeaker { speaker: speaker.as_ref().map(|s| s.to_string()) });
            }
            Event::Evict { .. } | Event::Stats(_) => {}
        }
    }

    /// One packet of the engine's to its listener's connection.
    fn deliver(&mut self, now: Instant, packet: SendPacket, media: &mut MediaIo) {
        let key = packet.listener;
        if !self.recv_by_key.contains_key(&key) {
            let found = self.engine.peer_name(key).and_then(|name| {
                let leg = self.peers.get(name.as_str())?.recv.as_ref()?;
                leg.connected.then(|| (leg.conn, name.clone()))
            });
            self.recv_by_key.insert(key, found);
        }
        let Some(Some((conn, peer))) = self.recv_by_key.get(&key) else { return };
        let Some(payload) = packet.payload else { return };
        if let Some(slot) = self.peers.get_mut(peer.as_str())
            && let Some(since) = slot.waiting_since.take()
        {
            crate::metrics::join_latency(since.elapsed());
        }
        let bytes = RTP_HEADER_BYTES + payload.len();
        let payload = Bytes::from_owner(payload);
        let sent = media.write_rtp(
            now,
            *conn,
            packet.media,
            packet.seq,
            packet.ts,
            packet.marker,
            packet.audio_level,
            payload,
        );
        if sent {
            crate::metrics::rtp_out(packet.media, bytes, packet.retransmit);
        } else {
            self.dropped_media += 1;
            self.metrics.media_dropped(DropCause::Closed);
        }
    }

    /// Closes the room: its transports close, its recording is flushed.
    pub fn close(&mut self, media: &mut MediaIo) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.share.close();
        if self.is_edge() {
            crate::metrics::edge_room(false);
        }
        if let RoomRelay::Origin(feed) = &self.relay {
            feed.close();
        }
        let now = Instant::now();
        for conn in self.conns.keys().copied().collect::<Vec<_>>() {
            media.close(now, conn);
        }
        self.conns.clear();
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

/// What an edge's peer cannot do there: the room's speakers and its stage are its origin's.
fn edge_refusal(what: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Conflict,
        format!(
            "this node serves the room to listeners as an edge of its origin: to {what}, leave and join the room with a speaker's role (the origin node takes it)"
        ),
    )
}

/// Whom a moderator's mute holds: the user (its uid) when it has one, else the peer's name.
fn hold_key(uid: Option<&str>, peer: &str) -> String {
    match uid {
        Some(uid) => format!("uid:{uid}"),
        None => format!("peer:{peer}"),
    }
}

fn random_ssrc() -> u32 {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).unwrap_or_default();
    u32::from_le_bytes(bytes).max(1)
}
