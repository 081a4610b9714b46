//! The origin → edge relay in the server (docs/scaling.md, "One room across nodes").
//!
//! - **Origin.** Every room of a node with a relay writes its [`RoomFeed`]: the room's relay
//!   log ([`OriginLog`]), fed by the room's worker as it pushes inputs and runs ticks. The
//!   [`RelayHub`]'s accept loop takes the edges' QUIC connections and serves each room
//!   subscription from the feed: the log from the line the edge asks for, then each line as
//!   the room writes it, until the room closes.
//! - **Edge.** A node asked to serve a room as an edge (a listener sent by the origin, with a
//!   ticket naming the room) subscribes to the origin's relay ([`RelayHub::open_edge`]), builds
//!   the room's engine from the stream's header, and runs it on its worker as a replica
//!   ([`EdgeFeed`], fed by a task that reads the stream and reconnects where it left off).
//!
//! The worker threads never wait on the network: the origin's feed is a mutex held for one
//! line, the edge's lines come through a bounded channel (a slow worker slows the stream
//! down, never the other way round).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use encore_systems::Engine;
use encore_systems::components::config::EngineConfig;
use encore_systems::components::input::Input;
use encore_systems::components::replica::EvictOrder;

use crate::cluster::RelayAddress;
use crate::config::ClusterSection;
use crate::relay::quic::{EdgeLink, OriginLink, QuicError, RelayOrigin, RoomLines, RoomStream, Upstream};
use crate::relay::{OriginLog, RelayError, RelayLine, ReplicaQueue, engine_from_header};
use crate::server::rooms::worker::Wake;

/// Lines an edge room's channel holds: a worker busy catching up slows the stream (QUIC's
/// flow control then slows the origin's writes to it), nothing is dropped.
const EDGE_CHANNEL: usize = 4096;
/// How long an edge tries to get its stream back after losing it.
const RECONNECT_FOR: Duration = Duration::from_secs(6);
/// An origin room with edges writes `through` at least this often while it sleeps, so its
/// edges' own listeners' requests wait at most that long (ticks).
pub const THROUGH_EVERY_TICKS: u64 = 5;
/// How long an origin remembers the listeners it sent to each edge (added to the edges'
/// directory entries, which are up to one heartbeat old).
const SENT_WINDOW: Duration = Duration::from_secs(4);

/// One origin room's relay log and the edges streaming it.
pub struct RoomFeed {
    state: Mutex<FeedState>,
    /// The log's length in lines: a serving task waits for it to change.
    len: watch::Sender<usize>,
    /// Tracks whose key frame an edge asked for, for the room's worker to pass on.
    keyframes: Mutex<Vec<String>>,
    asked: AtomicBool,
    /// The room's worker's wake-up call.
    wake: Arc<Wake>,
}

struct FeedState {
    log: OriginLog,
    /// Each streaming edge's position in the log, by subscription.
    positions: BTreeMap<u64, usize>,
    next_subscription: u64,
    /// Lines written since the last `through`.
    dirty: bool,
    /// The last tick a `through` said the engine is past.
    through: Option<u64>,
    closed: bool,
}

impl RoomFeed {
    pub fn new(config: &EngineConfig, max_bytes: u64, wake: Arc<Wake>) -> Arc<Self> {
        let log = OriginLog::new(config, max_bytes);
        let len = watch::channel(log.len()).0;
        let state = FeedState {
            log,
            positions: BTreeMap::new(),
            next_subscription: 0,
            dirty: false,
            through: None,
            closed: false,
        };
        Arc::new(RoomFeed {
            state: Mutex::new(state),
            len,
            keyframes: Mutex::new(Vec::new()),
            asked: AtomicBool::new(false),
            wake,
        })
    }

    /// An edge's listener asked for a key frame of `track`: the room's worker passes it on.
    fn keyframe(&self, track: String) {
        self.keyframes.lock().unwrap_or_else(|p| p.into_inner()).push(track);
        self.asked.store(true, Ordering::Release);
        self.wake.raise();
    }

    /// The tracks edges asked key frames of since the last call.
    pub fn take_keyframes(&self) -> Vec<String> {
        if !self.asked.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.keyframes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An input the room's engine took, with the arrival time it kept and its tick; the
    /// listener side is not relayed.
    pub fn input(&self, at_us: u64, tick: u64, input: &Input) {
        if !input.is_speaker_side() {
            return;
        }
        let mut state = self.state();
        state.log.input(at_us, tick, input);
        state.dirty = true;
        self.written(&mut state);
    }

    /// The room's engine ran tick `tick` and evicted `orders`. `through` goes into the log
    /// when the tick wrote anything or an edge streams (a later `through` covers the ticks
    /// before it, so a quiet room without edges writes nothing).
    pub fn ticked(&self, tick: u64, orders: &[EvictOrder]) {
        let mut state = self.state();
        if orders.is_empty() && !state.dirty && state.positions.is_empty() {
            return;
        }
        state.log.ticked(tick, orders);
        state.dirty = false;
        state.through = Some(tick);
        self.written(&mut state);
    }

    /// A sleeping room's engine passed over the ticks up to `tick` (quiet): its edges may run
    /// them. Only while edges stream.
    pub fn passed(&self, tick: u64) {
        let mut state = self.state();
        if state.positions.is_empty() || state.through.is_some_and(|t| t >= tick) {
            return;
        }
        state.log.ticked(tick, &[]);
        state.dirty = false;
        state.through = Some(tick);
        self.written(&mut state);
    }

    /// Whether an edge streams the room now.
    pub fn has_edges(&self) -> bool {
        !self.state().positions.is_empty()
    }

    /// The room closed: each edge gets what is left, then the end of its stream.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        self.written(&mut state);
    }

    /// After a write: past its bound the log keeps only what a streaming edge still needs.
    fn written(&self, state: &mut FeedState) {
        if state.log.truncated() {
            let upto = state.positions.values().copied().min().unwrap_or(state.log.len());
            state.log.release(upto);
        }
        self.len.send_replace(state.log.len());
    }

    fn subscribe(&self, from: usize) -> Result<u64, RelayError> {
        let mut state = self.state();
        state.log.since(from)?;
        let id = state.next_subscription;
        state.next_subscription += 1;
        state.positions.insert(id, from);
        Ok(id)
    }

    /// The lines from `from` on, copied out (cheap: they are shared), and whether the room
    /// closed.
    fn since(&self, id: u64, from: usize) -> Result<(Vec<Arc<str>>, bool), RelayError> {
        let mut state = self.state();
        state.positions.insert(id, from);
        let lines = state.log.since(from)?.to_vec();
        Ok((lines, state.closed))
    }

    fn unsubscribe(&self, id: u64) {
        let mut state = self.state();
        state.positions.remove(&id);
        self.written(&mut state);
    }
}

/// An edge room's side of the stream, on its worker.
pub struct EdgeFeed {
    /// The lines, as the stream's reader task hands them over; closed when the origin ended
    /// the room or could not be reached again.
    pub lines: mpsc::Receiver<RelayLine>,
    pub queue: ReplicaQueue,
    /// This node's id: the edge's own peers are named `<name>@<node>`.
    pub node: String,
    /// Requests for the origin (a listener's key frame request), sent up the room's stream.
    pub upstream: mpsc::Sender<Upstream>,
    /// Why the room cannot go on (the origin's stream ended or broke for good).
    pub ended: Option<String>,
}

impl EdgeFeed {
    /// Takes the lines that arrived (at most a channel's worth) into the queue.
    pub fn take_lines(&mut self, engine: &Engine) {
        for _ in 0..EDGE_CHANNEL {
            match self.lines.try_recv() {
                Ok(line) => {
                    if let Err(error) = self.queue.line(engine, line) {
                        // The stream is not the room's any more: the copy cannot go on.
                        tracing::error!(%error, code = error.code(), "a relay line the edge cannot take");
                        self.ended = Some(format!("the room's relay stream broke ({})", error.code()));
                        return;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if self.ended.is_none() {
                        self.ended = Some("the room ended on its origin node".to_owned());
                    }
                    return;
                }
            }
        }
    }

    /// Lines wait in the channel.
    pub fn pending(&self) -> bool {
        !self.lines.is_empty()
    }
}

/// A node's relay: its endpoint for edges, its rooms' feeds, and its links to origins.
pub struct RelayHub {
    origin: RelayOrigin,
    secret: String,
    /// What the directory tells edges.
    pub address: RelayAddress,
    log_bytes: u64,
    pub edge_after_peers: usize,
    feeds: Mutex<HashMap<String, Weak<RoomFeed>>>,
    /// One connection per origin, shared by the rooms this node serves as its edge.
    links: tokio::sync::Mutex<HashMap<SocketAddr, Arc<OriginLink>>>,
    /// The listeners this node sent to each edge lately.
    sent: Mutex<BTreeMap<String, VecDeque<Instant>>>,
}

impl std::fmt::Debug for RelayHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("RelayHub").field("address", &self.address.addr).finish()
    }
}

impl RelayHub {
    /// Binds the relay's address (`cluster.relay_listen`); `announced` is the media's
    /// announced IP, for a relay bound to a wildcard address without `relay_public`.
    pub fn bind(section: &ClusterSection, announced: Option<IpAddr>) -> Result<Option<Arc<Self>>, QuicError> {
        let (Some(listen), Some(secret)) = (section.relay_listen, section.relay_secret.clone()) else {
            return Ok(None);
        };
        let origin = RelayOrigin::bind(listen)?;
        let bound = origin.local_addr()?;
        let public = section.relay_public.unwrap_or_else(|| match (bound.ip().is_unspecified(), announced) {
            (true, Some(ip)) => SocketAddr::new(ip, bound.port()),
            _ => bound,
        });
        let address = RelayAddress::new(public, origin.cert_der());
        tracing::info!(relay = %bound, public = %public, "relay listening (QUIC)");
        Ok(Some(Arc::new(RelayHub {
            origin,
            secret,
            address,
            log_bytes: section.relay_log_bytes,
            edge_after_peers: section.edge_after_peers,
            feeds: Mutex::new(HashMap::new()),
            links: tokio::sync::Mutex::new(HashMap::new()),
            sent: Mutex::new(BTreeMap::new()),
        })))
    }

    /// A new origin room's feed; `wake` is its worker's flag.
    pub fn feed(&self, room: &str, config: &EngineConfig, wake: Arc<Wake>) -> Arc<RoomFeed> {
        let feed = RoomFeed::new(config, self.log_bytes, wake);
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds.retain(|_, feed| feed.strong_count() > 0);
        feeds.insert(room.to_owned(), Arc::downgrade(&feed));
        feed
    }

    fn feed_of(&self, room: &str) -> Option<Arc<RoomFeed>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner()).get(room).and_then(Weak::upgrade)
    }

    /// Takes edges' connections until the endpoint closes.
    pub fn serve(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            while let Some(link) = hub.origin.accept().await {
                match link {
                    Ok(link) => {
                        tracing::info!(edge = %link.remote_address(), "an edge connected to the relay");
                        tokio::spawn(hub.clone().serve_edge(link));
                    }
                    Err(error) => tracing::warn!(%error, code = error.code(), "an edge's relay connection failed"),
                }
            }
        })
    }

    async fn serve_edge(self: Arc<Self>, link: EdgeLink) {
        let edge = link.remote_address();
        loop {
            match link.next_subscription(&self.secret).await {
                Ok(stream) => {
                    tokio::spawn(self.clone().serve_room(edge, stream));
                }
                Err(error) => {
                    tracing::info!(%edge, %error, code = error.code(), "an edge's relay connection ended");
                    return;
                }
            }
        }
    }

    async fn serve_room(self: Arc<Self>, edge: SocketAddr, mut stream: RoomStream) {
        let room = stream.request.room.clone();
        let mut position = stream.request.from;
        let Some(feed) = self.feed_of(&room) else {
            stream.refuse(&format!("room {room} does not run here")).await;
            return;
        };
        let id = match feed.subscribe(position) {
            Ok(id) => id,
            Err(error) => {
                stream.refuse(&error.to_string()).await;
                return;
            }
        };
        tracing::info!(%edge, room, from = position, "an edge streams the room");
        crate::metrics::relay_stream(true);
        let mut changed = feed.len.subscribe();
        let ended = loop {
            changed.mark_unchanged();
            let (lines, closed) = match feed.since(id, position) {
                Ok(taken) => taken,
                Err(error) => break Some(error.to_string()),
            };
            if lines.is_empty() {
                if closed {
                    break None;
                }
                tokio::select! {
                    changed = changed.changed() => if changed.is_err() { break None },
                    upstream = stream.next_upstream() => match upstream {
                        Ok(Some(Upstream::Keyframe(track))) => feed.keyframe(track),
                        // The edge finished its side: it goes on reading.
                        Ok(None) => {}
                        Err(error) => {
                            tracing::info!(%edge, room, %error, code = error.code(), "an edge's request was not understood");
                            break Some(error.to_string());
                        }
                    },
                }
                continue;
            }
            // Up to a few hundred lines at a time: an edge catching up gets them in chunks.
            for chunk in lines.chunks(512) {
                if let Err(error) = stream.write_lines(chunk).await {
                    tracing::info!(%edge, room, %error, "an edge's room stream ended");
                    feed.unsubscribe(id);
                    crate::metrics::relay_stream(false);
                    return;
                }
                position += chunk.len();
                crate::metrics::relay_bytes(true, chunk.iter().map(|line| line.len() as u64 + 1).sum());
            }
        };
        feed.unsubscribe(id);
        crate::metrics::relay_stream(false);
        match ended {
            None => stream.finish(),
            Some(why) => stream.refuse(&why).await,
        }
        tracing::info!(%edge, room, lines = position, "a room's relay stream to an edge ended");
    }

    /// The link to an origin, made once and shared; `fresh` drops a broken one first.
    async fn link(&self, origin: &RelayAddress, fresh: bool) -> Result<Arc<OriginLink>, QuicError> {
        let mut links = self.links.lock().await;
        if fresh {
            links.remove(&origin.addr);
        }
        if let Some(link) = links.get(&origin.addr) {
            return Ok(link.clone());
        }
        let cert =
            origin.cert_der().ok_or_else(|| QuicError::Tls("the origin's certificate is not base64url".into()))?;
        let link = Arc::new(OriginLink::connect(origin.addr, cert).await?);
        links.insert(origin.addr, link.clone());
        Ok(link)
    }

    /// Subscribes to `room` on its origin from the start: the engine its header describes
    /// (a replica), and the stream of its lines after the header.
    pub async fn open_edge(&self, room: &str, origin: &RelayAddress) -> Result<(Engine, RoomLines), QuicError> {
        let mut lines = match self.link(origin, false).await?.subscribe(room, 0, &self.secret).await {
            Ok(lines) => lines,
            // A cached link may have died since: once more on a new one.
            Err(_) => self.link(origin, true).await?.subscribe(room, 0, &self.secret).await?,
        };
        let header = lines.next().await?.ok_or_else(|| QuicError::Refused("the origin ended the stream".into()))?;
        let engine = engine_from_header(&header)?;
        Ok((engine, lines))
    }

    /// Reads an edge room's stream into its channel until the origin ends it, the room goes
    /// (its channel closes), or the origin cannot be reached again within
    /// [`RECONNECT_FOR`]; a broken stream is resumed from the line it got to.
    pub fn pump(
        self: &Arc<Self>,
        room: String,
        origin: RelayAddress,
        mut lines: RoomLines,
        tx: mpsc::Sender<RelayLine>,
        mut upstream: mpsc::Receiver<Upstream>,
        wake: Arc<Wake>,
    ) {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = lines.next() => next,
                    Some(request) = upstream.recv() => {
                        // Lost with a broken stream: a listener asks again.
                        let _ = lines.upstream(&request).await;
                        continue;
                    }
                };
                match next {
                    Ok(Some(line)) => {
                        crate::metrics::relay_bytes(false, lines.take_bytes());
                        if tx.send(line).await.is_err() {
                            return;
                        }
                        wake.raise();
                    }
                    Ok(None) => {
                        tracing::info!(room, "the origin ended the room's relay stream");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(room, %error, code = error.code(), "the room's relay stream broke; resuming");
                        match hub.resume(&room, &origin, lines.position()).await {
                            Some(resumed) => lines = resumed,
                            None => break,
                        }
                    }
                }
            }
            wake.raise();
        });
    }

    async fn resume(&self, room: &str, origin: &RelayAddress, from: usize) -> Option<RoomLines> {
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut wait = Duration::from_millis(100);
        while Instant::now() < deadline {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
            match self.link(origin, true).await {
                Ok(link) => match link.subscribe(room, from, &self.secret).await {
                    Ok(lines) => {
                        tracing::info!(room, from, "the room's relay stream resumed");
                        return Some(lines);
                    }
                    Err(error) => tracing::warn!(room, %error, code = error.code(), "resuming the relay stream"),
                },
                Err(error) => tracing::warn!(room, %error, code = error.code(), "reconnecting to the origin's relay"),
            }
        }
        tracing::warn!(room, "the origin's relay could not be reached again: the edge's copy ends");
        None
    }

    /// A new edge room's channel.
    pub fn edge_channel() -> (mpsc::Sender<RelayLine>, mpsc::Receiver<RelayLine>) {
        mpsc::channel(EDGE_CHANNEL)
    }

    /// A new edge room's channel of requests for its origin (a few a second at most; more are
    /// dropped: a listener asks again).
    pub fn upstream_channel() -> (mpsc::Sender<Upstream>, mpsc::Receiver<Upstream>) {
        mpsc::channel(64)
    }

    /// Counts a listener sent to `edge`; the listeners sent to each edge lately.
    pub fn sent_to(&self, edge: Option<&str>) -> BTreeMap<String, usize> {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(edge) = edge {
            sent.entry(edge.to_owned()).or_default().push_back(now);
        }
        sent.retain(|_, times| {
            while times.front().is_some_and(|t| now.duration_since(*t) > SENT_WINDOW) {
                times.pop_front();
            }
            !times.is_empty()
        });
        sent.iter().map(|(edge, times)| (edge.clone(), times.len())).collect()
    }

    pub fn close(&self) {
        self.origin.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_systems::components::ids::{Name, Role};

    fn join(peer: &str) -> Input {
        Input::Join { peer: Name::new(peer), uid: None, roles: vec![Role::Speaker] }
    }

    fn lines(feed: &RoomFeed) -> Vec<String> {
        feed.state().log.since(0).unwrap().iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn a_quiet_room_without_edges_writes_no_through_and_one_with_edges_says_how_far_it_got() {
        let feed = RoomFeed::new(&EngineConfig::default(), DEFAULT_LOG, Arc::new(Wake::new().unwrap()));
        feed.ticked(0, &[]);
        feed.passed(5);
        assert_eq!(lines(&feed).len(), 1, "the header alone: {:?}", lines(&feed));
        feed.input(15_000, 1, &join("s01"));
        feed.input(15_000, 1, &Input::Listen { peer: Name::new("s01") });
        feed.ticked(1, &[]);
        feed.ticked(2, &[]);
        let written = lines(&feed);
        assert_eq!(written.len(), 3, "{written:?}");
        assert!(written[1].contains(r#""kind":"join""#) && written[2] == r#"{"kind":"through","tick":1}"#);
        // An edge streams: every tick and every quiet stretch says how far the room got.
        let id = feed.subscribe(3).unwrap();
        assert!(feed.has_edges());
        feed.ticked(3, &[]);
        feed.passed(9);
        feed.passed(9);
        assert_eq!(
            feed.since(id, 3).unwrap().0.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
            [r#"{"kind":"through","tick":3}"#, r#"{"kind":"through","tick":9}"#]
        );
        feed.unsubscribe(id);
        assert!(!feed.has_edges());
        feed.close();
        assert!(feed.since(id, 5).unwrap().1, "closed");
    }

    #[test]
    fn past_its_bound_the_log_keeps_only_what_streaming_edges_still_need() {
        let config = EngineConfig::default();
        let header = crate::scenario::ScenarioHeader::new(config.clone()).to_line().len() as u64;
        let feed = RoomFeed::new(&config, header + 300, Arc::new(Wake::new().unwrap()));
        let id = feed.subscribe(1).unwrap();
        for tick in 1..40 {
            feed.input(tick * 10_000, tick, &join(&format!("s{tick}")));
            feed.ticked(tick, &[]);
        }
        assert_eq!(feed.subscribe(0).unwrap_err().code(), "relay-log-truncated", "no new edge from the start");
        let (kept, _) = feed.since(id, 1).unwrap();
        assert_eq!(kept.len(), 78, "the streaming edge still gets all it has not had");
        // Once the edge has them, and when it goes, nothing is kept.
        let (_, _) = feed.since(id, 79).unwrap();
        feed.unsubscribe(id);
        feed.input(400_000, 40, &join("late"));
        assert!(feed.state().log.bytes() < 300, "{} bytes kept", feed.state().log.bytes());
    }

    const DEFAULT_LOG: u64 = crate::config::DEFAULT_RELAY_LOG_BYTES;
}
