//! `encore loadgen`: a load generator for `encore serve`, built on the Rust client
//! ([`crate::client`]), so every peer does what a browser does: a dev token, WSS signaling,
//! trickle ICE, real DTLS-SRTP.
//!
//! Speakers publish talk-spurts on the P.59 model of [`crate::talk`] (talk about 1.0 s, pause about
//! 1.6 s, both exponential, each speaker on its own seeded generator): a 20 ms Opus-sized packet
//! every 20 ms with its RFC 6464 level (voiced 20-45 with the V flag, silence around 95 without).
//! Each audio payload carries a header of its own ([`PayloadStamp`]): the publisher's index and
//! the send time in microseconds since one `Instant` shared by the whole process, so a listener
//! in the same process reads the publish-to-receive delay off every packet it gets.
//!
//! Listeners consume their personal stream and count, per stream: packets, duplicates and
//! sequence-number gaps (the server rewrites sequence numbers so that a listener sees one
//! continuous stream across switches, so a gap is a packet lost on the way, or dropped by the
//! server). Delays are kept for every audio packet received, and separately for those received
//! while the listener's last `now_playing` said `live` (in a time-shifting SFU only those measure
//! the live path; the rest include the time a packet waited in the buffer).
//!
//! Cheap by construction: one tokio task per publisher (a 20 ms interval), one per listener
//! (draining its packets), one per signaling session for notifications; no thread per peer.
//! With `server_pid`, the server's CPU time is read from `/proc/PID/stat` before and after the
//! media phase, and the load generator's own likewise from `/proc/self/stat`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{ClientError, ClientTls, Signaling, dev_token};
use crate::components::ids::MediaKind;
use crate::protocol::{Done, Notice, Offered, Published, Request, Side};
use fleet::{Fleet, LiveFlag};

mod fleet;
use encore_systems::rtp::{FIRST_SEQ_CYCLE, unwrap_seq};

/// Video: 15 frames a second, one RTP packet a frame, a key frame every 2 s.
const VIDEO_FRAME: Duration = Duration::from_micros(66_667);
const VIDEO_KEYFRAME_EVERY: u64 = 30;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadgenOptions {
    /// The server's base URL, `https://HOST:PORT`.
    pub url: String,
    pub speakers: usize,
    pub listeners: usize,
    /// Length of the media phase (publishers talk this long).
    pub seconds: f64,
    pub room: String,
    /// Speakers also publish VP8 (15 frames/s) and listeners consume video.
    pub video: bool,
    /// The server's process, for its CPU time (Linux `/proc`).
    pub server_pid: Option<u32>,
    /// Connections being set up at once.
    pub setup_concurrency: usize,
    /// After the publishers stop, listeners keep receiving this long (time-shifted tails).
    pub drain: Duration,
    /// Seed of the talk-spurt generators (speaker i uses seed + i).
    pub seed: u64,
    /// Rooms with one silent peer each (its own uid), held open through the media phase: what
    /// idle rooms cost the server shows in its CPU.
    pub idle_rooms: usize,
}

impl LoadgenOptions {
    pub fn new(url: impl Into<String>, speakers: usize, listeners: usize, seconds: f64) -> Self {
        LoadgenOptions {
            url: url.into().trim_end_matches('/').to_owned(),
            speakers,
            listeners,
            seconds,
            room: "loadgen".to_owned(),
            video: false,
            server_pid: None,
            setup_concurrency: 64,
            drain: Duration::from_millis(1500),
            seed: 1,
            idle_rooms: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error(
        "no client could connect ({failures} setup failures); the first error: {first} (is the server up, and its \
         certificate trusted? --cert <data-dir>/tls/cert.pem for a self-signed one, --insecure on a test machine)"
    )]
    NoClients { failures: usize, first: String },
    #[error("nothing to do: at least one speaker and one listener are needed")]
    Empty,
    #[error("the media loop: {0}")]
    Fleet(String),
}

/// The header of every audio payload the load generator sends: a magic byte, the publisher's
/// index and the send time (µs since the run's shared `Instant`), big-endian; filler follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadStamp {
    pub publisher: u32,
    pub sent_us: u64,
}

impl PayloadStamp {
    pub const MAGIC: u8 = 0xEC;
    pub const LEN: usize = 13;

    pub fn write(&self, size: usize) -> Bytes {
        let mut bytes = vec![0x55u8; size.max(Self::LEN)];
        bytes[0] = Self::MAGIC;
        bytes[1..5].copy_from_slice(&self.publisher.to_be_bytes());
        bytes[5..13].copy_from_slice(&self.sent_us.to_be_bytes());
        Bytes::from(bytes)
    }

    pub fn read(payload: &[u8]) -> Option<Self> {
        if payload.len() < Self::LEN || payload[0] != Self::MAGIC {
            return None;
        }
        Some(PayloadStamp {
            publisher: u32::from_be_bytes(payload[1..5].try_into().ok()?),
            sent_us: u64::from_be_bytes(payload[5..13].try_into().ok()?),
        })
    }
}

/// Sequence-number accounting of one received stream: distinct packets, duplicates, and the
/// holes left in the range seen (packets that never came; a late retransmission fills its hole).
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    first: u64,
    highest: u64,
    started: bool,
    seen: Vec<u64>,
    /// Expected and distinct counts of earlier runs (before a restart of the numbering).
    carried_expected: u64,
    carried_distinct: u64,
    pub packets: u64,
    pub duplicates: u64,
    /// Packets older than the first one of the run (reordered before it): not counted.
    pub before_first: u64,
}

/// A stream whose numbers jump further than this is treated as restarted.
const MAX_SEQ_SPAN: u64 = 1 << 20;

impl SeqTracker {
    pub fn push(&mut self, seq: u16) {
        self.packets += 1;
        // The engine's unwrapping (RFC 3550 A.1), the first packet a cycle up.
        let ext = if self.started { unwrap_seq(self.highest, seq) } else { Some(FIRST_SEQ_CYCLE + u64::from(seq)) };
        let Some(ext) = ext.filter(|ext| *ext >= self.first || !self.started) else {
            self.before_first += 1;
            return;
        };
        if !self.started || ext - self.first >= MAX_SEQ_SPAN {
            self.carried_expected += self.run_expected();
            self.carried_distinct += self.run_distinct();
            self.started = true;
            self.first = ext;
            self.highest = ext;
            self.seen = vec![1];
            return;
        }
        let index = (ext - self.first) as usize;
        if index / 64 >= self.seen.len() {
            self.seen.resize(index / 64 + 1, 0);
        }
        let bit = 1u64 << (index % 64);
        if self.seen[index / 64] & bit != 0 {
            self.duplicates += 1;
        } else {
            self.seen[index / 64] |= bit;
        }
        self.highest = self.highest.max(ext);
    }

    fn run_distinct(&self) -> u64 {
        self.seen.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn run_expected(&self) -> u64 {
        if self.started { self.highest - self.first + 1 } else { 0 }
    }

    /// Distinct sequence numbers received.
    pub fn distinct(&self) -> u64 {
        self.carried_distinct + self.run_distinct()
    }

    /// The sequence numbers from the first to the highest received.
    pub fn expected(&self) -> u64 {
        self.carried_expected + self.run_expected()
    }

    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.distinct())
    }
}

/// What one listener saw.
#[derive(Debug, Default)]
struct ListenerStats {
    audio: SeqTracker,
    video: SeqTracker,
    /// Publish-to-receive delay of every stamped audio packet, in µs.
    delays_us: Vec<u32>,
    /// The same, for packets received while the listener's now_playing said live.
    live_delays_us: Vec<u32>,
    /// Those live delays less the route's `lag_ms` (the engine's deliberate pacing offset),
    /// of packets published after the route began.
    path_delays_us: Vec<u32>,
    unstamped: u64,
}

/// Percentiles of a set of delays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Delays {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Delays {
    fn of(mut us: Vec<u32>) -> Self {
        if us.is_empty() {
            return Delays::default();
        }
        us.sort_unstable();
        let at = |q: f64| f64::from(us[((us.len() - 1) as f64 * q).round() as usize]) / 1000.0;
        Delays { count: us.len() as u64, p50_ms: at(0.50), p90_ms: at(0.90), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

/// CPU time of a process, from `/proc/PID/stat` (utime + stime, in USER_HZ = 100 ticks a second,
/// which is what Linux reports there on every architecture).
pub fn process_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: read after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The sockets a process holds: UDP ones (bound), and TCP ones listening (not the connected
/// ones: those are signaling sessions), from /proc.
pub fn process_sockets(pid: u32) -> Option<(usize, usize)> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else { continue };
        let link = link.to_string_lossy();
        if let Some(inode) = link.strip_prefix("socket:[").and_then(|rest| rest.strip_suffix(']')) {
            inodes.insert(inode.to_owned());
        }
    }
    let count = |files: &[&str], listening_only: bool| -> usize {
        files
            .iter()
            .filter_map(|file| std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).ok())
            .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let listening = fields.get(3) == Some(&"0A");
                fields.get(9).is_some_and(|inode| inodes.contains(*inode)) && (!listening_only || listening)
            })
            .count()
    };
    Some((count(&["udp", "udp6"], false), count(&["tcp", "tcp6"], true)))
}

/// A process's resident memory, from /proc.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The run's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub url: String,
    pub room: String,
    pub speakers: usize,
    pub listeners: usize,
    pub video: bool,
    pub speakers_connected: usize,
    pub listeners_connected: usize,
    pub setup_failures: usize,
    pub setup_errors: Vec<String>,
    /// Idle rooms held open through the media phase (each one silent peer).
    pub idle_rooms: usize,
    /// Wall time to set every client up.
    pub setup_s: f64,
    /// Media phase: publishers talking plus the drain, in wall seconds.
    pub window_s: f64,
    pub sent_audio: u64,
    pub sent_voiced: u64,
    pub sent_video: u64,
    pub send_errors: u64,
    pub received_audio: u64,
    pub received_video: u64,
    /// Sequence-number holes over every listener's streams, and their share of what the
    /// streams' ranges say was sent.
    pub lost: u64,
    pub duplicates: u64,
    pub loss_percent: f64,
    /// Audio packets without the load generator's stamp (should be none).
    pub unstamped: u64,
    pub now_playing_notices: u64,
    /// Publish-to-receive delay of every stamped audio packet received.
    pub delay_all: Delays,
    /// The same, only while the listener's now_playing said live.
    pub delay_live: Delays,
    /// Live delays less the `lag_ms` of their route (0 for a live route that catches up with
    /// the live edge), of packets published after the route began (its pre-roll, sent ahead
    /// at once, is old by design): what is left is the transport path (network, ticks,
    /// channels, SRTP).
    pub delay_live_less_lag: Delays,
    /// Packets received per wall second over the window (what the server forwarded, less
    /// what was lost).
    pub forwarded_per_s: f64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_forwarded: Option<f64>,
    /// Forwarded packets per second of server CPU: what one core busy with nothing else forwards.
    pub forwarded_per_server_core_s: Option<f64>,
    pub loadgen_cpu_s: Option<f64>,
    pub loadgen_cpu_us_per_packet: Option<f64>,
    /// With every client connected: the server's UDP sockets and listening TCP sockets.
    pub server_udp_sockets: Option<usize>,
    pub server_tcp_listening: Option<usize>,
    /// The server's resident memory before the clients came, with them all connected, and the
    /// difference per connected client.
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_connected_bytes: Option<u64>,
    pub server_rss_per_client_bytes: Option<f64>,
}

fn opt(value: Option<f64>, digits: usize, unit: &str) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}{unit}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: &Delays| {
            format!(
                "p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} packets)",
                d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms, d.count
            )
        };
        writeln!(
            f,
            "encore loadgen: {} room {} ({} speakers x {} listeners{})",
            self.url,
            self.room,
            self.speakers,
            self.listeners,
            if self.video { ", video" } else { "" }
        )?;
        writeln!(
            f,
            "setup            {} speakers and {} listeners connected in {:.1} s; {} setup failures",
            self.speakers_connected, self.listeners_connected, self.setup_s, self.setup_failures
        )?;
        for error in &self.setup_errors {
            writeln!(f, "  setup error    {error}")?;
        }
        if self.idle_rooms > 0 {
            writeln!(f, "idle rooms       {} (one silent peer each, open through the window)", self.idle_rooms)?;
        }
        writeln!(f, "window           {:.1} s (talking, then the drain)", self.window_s)?;
        writeln!(
            f,
            "sent             {} audio ({} voiced), {} video; {} send errors",
            self.sent_audio, self.sent_voiced, self.sent_video, self.send_errors
        )?;
        writeln!(
            f,
            "received         {} audio, {} video ({} unstamped)",
            self.received_audio, self.received_video, self.unstamped
        )?;
        writeln!(
            f,
            "loss             {} lost ({:.3} %), {} duplicates (sequence-number gaps per listener stream)",
            self.lost, self.loss_percent, self.duplicates
        )?;
        writeln!(f, "delay all        {}", d(&self.delay_all))?;
        writeln!(f, "delay live       {}", d(&self.delay_live))?;
        writeln!(f, "  less lag_ms    {}", d(&self.delay_live_less_lag))?;
        writeln!(f, "now_playing      {} notices", self.now_playing_notices)?;
        writeln!(f, "forwarded        {:.0} packets/s", self.forwarded_per_s)?;
        writeln!(
            f,
            "server cpu       {} ; {} per forwarded packet; {} forwarded packets/s per server core",
            opt(self.server_cpu_s, 2, " s"),
            opt(self.server_cpu_us_per_forwarded, 1, " µs"),
            opt(self.forwarded_per_server_core_s, 0, ""),
        )?;
        writeln!(
            f,
            "loadgen cpu      {} ; {} per packet sent or received",
            opt(self.loadgen_cpu_s, 2, " s"),
            opt(self.loadgen_cpu_us_per_packet, 1, " µs"),
        )?;
        let count = |n: Option<usize>| n.map_or_else(|| "n/a".to_owned(), |n| n.to_string());
        writeln!(
            f,
            "server sockets   {} UDP, {} TCP listening (every client connected)",
            count(self.server_udp_sockets),
            count(self.server_tcp_listening)
        )?;
        write!(
            f,
            "server memory    {} resident before, {} connected; {} per client",
            opt(self.server_rss_before_bytes.map(|b| b as f64 / 1048576.0), 1, " MiB"),
            opt(self.server_rss_connected_bytes.map(|b| b as f64 / 1048576.0), 1, " MiB"),
            opt(self.server_rss_per_client_bytes.map(|b| b / 1024.0), 1, " KiB"),
        )
    }
}

/// A client's signaling session and its place in the fleet.
struct Client {
    signaling: Arc<Signaling>,
    fleet_id: fleet::ClientId,
    /// What its notices say (listeners).
    live: Option<Arc<LiveFlag>>,
}

async fn connect(
    tls: &ClientTls,
    base: &str,
    uid: &str,
    role: &str,
    room: &str,
) -> Result<Arc<Signaling>, ClientError> {
    let token = dev_token(tls, base, uid, role).await?;
    let signaling = Signaling::connect(tls, base, Some(&token), None).await?;
    // In a cluster the room (or, for a listener of a large room, an edge) may be another
    // node's: the client follows the redirects, as the page does.
    let (signaling, _) = signaling.join_anywhere(room, uid).await?;
    Ok(Arc::new(signaling))
}

/// Reads a client's notices until `until`: a listener's now_playing sets its live flag; a
/// server that trickles its candidates (one from before the ICE-lite media path) has them
/// handed to the fleet; the rest is read so that no queue grows.
fn follow_notices(
    signaling: Arc<Signaling>,
    fleet: Arc<Fleet>,
    id: fleet::ClientId,
    live: Option<Arc<LiveFlag>>,
    notices: Arc<AtomicU64>,
    until: Instant,
) -> tokio::task::JoinHandle<()> {
    let epoch = fleet.epoch;
    tokio::spawn(async move {
        loop {
            let wait = until.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break;
            }
            tokio::select! {
                note = signaling.notification(wait) => match note {
                    Some(Notice::NowPlaying { utterance, live: is_live, lag_ms, .. }) => {
                        notices.fetch_add(1, Ordering::Relaxed);
                        if let Some(live) = &live {
                            live.lag_us.store(lag_ms * 1000, Ordering::Relaxed);
                            live.since_us.store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                            live.live.store(is_live && utterance.is_some(), Ordering::Relaxed);
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                other = signaling.other_message(wait) => match other {
                    Some(value) if value["type"] == "candidate" => {
                        if let Some(candidate) = value["candidate"]["candidate"].as_str() {
                            fleet.remote_candidate(id, candidate.to_owned());
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
            }
        }
    })
}

async fn set_up(
    tls: ClientTls,
    options: Arc<LoadgenOptions>,
    fleet: Arc<Fleet>,
    speaker: bool,
    index: u32,
    notices: Arc<AtomicU64>,
    until: Instant,
) -> Result<(bool, Client, tokio::task::JoinHandle<()>), String> {
    let (uid, role) = if speaker {
        (format!("lg-s{:03}", index + 1), "speaker")
    } else {
        (format!("lg-l{:04}", index + 1), "listener")
    };
    let failed = |e: String| format!("{uid}: {e}");
    let signaling = connect(&tls, &options.url, &uid, role, &options.room).await.map_err(|e| failed(e.to_string()))?;
    let (client, follower) = if speaker {
        let (id, offer, candidate) = fleet.publisher(index, options.video).await.map_err(failed)?;
        let follower = follow_notices(signaling.clone(), fleet.clone(), id, None, notices, until);
        let Published { answer } =
            signaling.request(Request::Publish { offer }).await.map_err(|e| failed(e.to_string()))?;
        fleet.answer(id, answer).await.map_err(failed)?;
        let candidate = Request::Candidate { transport: Side::Send, candidate: Some(candidate) };
        let _ = signaling.request::<Done>(candidate).await;
        (Client { signaling, fleet_id: id, live: None }, follower)
    } else {
        let Offered { offer } =
            signaling.request(Request::Listen { video: options.video }).await.map_err(|e| failed(e.to_string()))?;
        let live = Arc::new(LiveFlag::default());
        let (id, answer, candidate) = fleet.listener(offer, live.clone()).await.map_err(failed)?;
        let follower = follow_notices(signaling.clone(), fleet.clone(), id, Some(live.clone()), notices, until);
        signaling.request::<Done>(Request::Answer { answer }).await.map_err(|e| failed(e.to_string()))?;
        let candidate = Request::Candidate { transport: Side::Recv, candidate: Some(candidate) };
        let _ = signaling.request::<Done>(candidate).await;
        (Client { signaling, fleet_id: id, live: Some(live) }, follower)
    };
    if !fleet.connected(client.fleet_id).await {
        follower.abort();
        return Err(failed("the connection did not come up".into()));
    }
    Ok((speaker, client, follower))
}

/// Accounts one packet a listener received. `live`: the listener's route is live, with this
/// lag (µs) at its start.
/// How much sooner than its `now_playing` notice a route's first live packet may have been
/// published: the notice leaves the room in the tick of the route, like the packets.
const NOTICE_SLACK_US: u64 = 20_000;

fn account(
    stats: &mut ListenerStats,
    media: MediaKind,
    seq: u16,
    at: Instant,
    payload: &[u8],
    epoch: Instant,
    live: Option<(u64, u64)>,
) {
    match media {
        MediaKind::Video => stats.video.push(seq),
        MediaKind::Audio => {
            stats.audio.push(seq);
            match PayloadStamp::read(payload) {
                Some(stamp) => {
                    let received_us = at.saturating_duration_since(epoch).as_micros() as u64;
                    let delay = received_us.saturating_sub(stamp.sent_us).min(u64::from(u32::MAX)) as u32;
                    stats.delays_us.push(delay);
                    if let Some((lag_us, since_us)) = live {
                        stats.live_delays_us.push(delay);
                        // The notice comes over WSS a little after the route's first packets.
                        if stamp.sent_us + NOTICE_SLACK_US >= since_us {
                            stats.path_delays_us.push((u64::from(delay)).saturating_sub(lag_us) as u32);
                        }
                    }
                }
                None => stats.unstamped += 1,
            }
        }
    }
}

/// Runs the load: sets every client up, talks and listens for `options.seconds`, then reports.
pub async fn run(options: LoadgenOptions, tls: ClientTls) -> Result<Report, LoadgenError> {
    if options.speakers == 0 || options.listeners == 0 {
        return Err(LoadgenError::Empty);
    }
    let options = Arc::new(options);
    let epoch = Instant::now();
    let fleet = Arc::new(Fleet::start(epoch).map_err(|e| LoadgenError::Fleet(e.to_string()))?);
    let notices = Arc::new(AtomicU64::new(0));
    // Notices are followed until the end of the run; its length is known only after set-up, so
    // the followers get a generous bound and are stopped at the end.
    let follow_until = Instant::now() + Duration::from_secs(3600);

    // Set up: listeners first (so they hear the first utterances), bounded concurrency.
    let rss_before = options.server_pid.and_then(resident_bytes);
    let setup_start = Instant::now();
    let permits = Arc::new(Semaphore::new(options.setup_concurrency.max(1)));
    let mut setups = JoinSet::new();
    let plan = (0..options.listeners).map(|i| (false, i)).chain((0..options.speakers).map(|i| (true, i)));
    for (speaker, index) in plan {
        let permits = permits.clone();
        let tls = tls.clone();
        let options = options.clone();
        let fleet = fleet.clone();
        let notices = notices.clone();
        setups.spawn(async move {
            let _permit = permits.acquire_owned().await;
            set_up(tls, options, fleet, speaker, index as u32, notices, follow_until).await
        });
    }
    let mut clients = Vec::new();
    let mut followers = Vec::new();
    let (mut speakers_connected, mut listeners_connected) = (0, 0);
    let mut errors = Vec::new();
    while let Some(result) = setups.join_next().await {
        match result {
            Ok(Ok((speaker, client, follower))) => {
                if speaker {
                    speakers_connected += 1;
                } else {
                    listeners_connected += 1;
                }
                clients.push(client);
                followers.push(follower);
            }
            Ok(Err(error)) => errors.push(error),
            Err(error) => errors.push(format!("a setup task failed: {error}")),
        }
    }
    // Idle rooms: a silent peer each, joined with the same bounded concurrency.
    let mut idle = JoinSet::new();
    for index in 0..options.idle_rooms {
        let permits = permits.clone();
        let tls = tls.clone();
        let options = options.clone();
        idle.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let uid = format!("idle-{index}");
            connect(&tls, &options.url, &uid, "listener", &format!("{}-idle-{index}", options.room)).await
        });
    }
    let mut idle_sessions = Vec::new();
    while let Some(result) = idle.join_next().await {
        match result {
            Ok(Ok(signaling)) => idle_sessions.push(signaling),
            Ok(Err(error)) => errors.push(format!("an idle room: {error}")),
            Err(error) => errors.push(format!("an idle room's task failed: {error}")),
        }
    }
    let idle_rooms = idle_sessions.len();
    let setup_s = setup_start.elapsed().as_secs_f64();
    if speakers_connected == 0 || listeners_connected == 0 {
        return Err(LoadgenError::NoClients {
            failures: errors.len(),
            first: errors.first().cloned().unwrap_or_else(|| "no speaker or no listener connected".into()),
        });
    }

    let sockets = options.server_pid.and_then(process_sockets);
    let rss_connected = options.server_pid.and_then(resident_bytes);
    let clients_connected = (speakers_connected + listeners_connected) as f64;

    // Media: talk for `seconds`, listen until the drain is over.
    let server_before = options.server_pid.and_then(|pid| process_cpu_seconds(Some(pid)));
    let self_before = process_cpu_seconds(None);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(options.seconds.max(0.0));
    let until = end + options.drain;
    fleet.talk(end, options.seed);
    tokio::time::sleep_until(until.into()).await;
    let window_s = start.elapsed().as_secs_f64();
    let server_after = options.server_pid.and_then(|pid| process_cpu_seconds(Some(pid)));
    let self_after = process_cpu_seconds(None);
    for follower in followers {
        follower.abort();
    }
    let totals = fleet.finish(Instant::now()).await;

    // Leave, in parallel.
    let mut closing = JoinSet::new();
    for client in clients {
        let _ = (client.fleet_id, client.live);
        closing.spawn(async move {
            let _ = client.signaling.request::<Done>(Request::Leave).await;
        });
    }
    for signaling in idle_sessions {
        closing.spawn(async move {
            let _ = signaling.request::<Done>(Request::Leave).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), async { while closing.join_next().await.is_some() {} }).await;

    let mut all = ListenerStats::default();
    let (mut lost, mut expected, mut duplicates) = (0u64, 0u64, 0u64);
    for stats in totals.listeners {
        for tracker in [&stats.audio, &stats.video] {
            lost += tracker.lost();
            expected += tracker.expected();
            duplicates += tracker.duplicates;
        }
        all.audio.packets += stats.audio.packets;
        all.video.packets += stats.video.packets;
        all.unstamped += stats.unstamped;
        all.delays_us.extend(stats.delays_us);
        all.live_delays_us.extend(stats.live_delays_us);
        all.path_delays_us.extend(stats.path_delays_us);
    }
    let forwarded = all.audio.packets + all.video.packets;
    let sent = totals.sent.audio + totals.sent.video;
    let server_cpu_s = server_before.zip(server_after).map(|(b, a)| a - b);
    let loadgen_cpu_s = self_before.zip(self_after).map(|(b, a)| a - b);
    let per = |cpu: Option<f64>, packets: u64| cpu.filter(|_| packets > 0).map(|cpu| cpu * 1e6 / packets as f64);
    let mut setup_errors = errors.clone();
    setup_errors.truncate(5);
    Ok(Report {
        url: options.url.clone(),
        room: options.room.clone(),
        speakers: options.speakers,
        listeners: options.listeners,
        video: options.video,
        speakers_connected,
        listeners_connected,
        setup_failures: errors.len(),
        setup_errors,
        idle_rooms,
        setup_s,
        window_s,
        sent_audio: totals.sent.audio,
        sent_voiced: totals.sent.voiced,
        sent_video: totals.sent.video,
        send_errors: totals.sent.errors,
        received_audio: all.audio.packets,
        received_video: all.video.packets,
        lost,
        duplicates,
        loss_percent: if expected > 0 { lost as f64 * 100.0 / expected as f64 } else { 0.0 },
        unstamped: all.unstamped,
        now_playing_notices: notices.load(Ordering::Relaxed),
        delay_all: Delays::of(all.delays_us),
        delay_live: Delays::of(all.live_delays_us),
        delay_live_less_lag: Delays::of(all.path_delays_us),
        forwarded_per_s: if window_s > 0.0 { forwarded as f64 / window_s } else { 0.0 },
        server_cpu_s,
        server_cpu_us_per_forwarded: per(server_cpu_s, forwarded),
        forwarded_per_server_core_s: server_cpu_s.filter(|cpu| *cpu > 0.0).map(|cpu| forwarded as f64 / cpu),
        loadgen_cpu_s,
        loadgen_cpu_us_per_packet: per(loadgen_cpu_s, sent + forwarded),
        server_udp_sockets: sockets.map(|(udp, _)| udp),
        server_tcp_listening: sockets.map(|(_, tcp)| tcp),
        server_rss_before_bytes: rss_before,
        server_rss_connected_bytes: rss_connected,
        server_rss_per_client_bytes: rss_before
            .zip(rss_connected)
            .map(|(before, after)| (after as f64 - before as f64) / clients_connected),
    })
}

pub fn report_json(report: &Report) -> Value {
    serde_json::to_value(report).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_foreign_payloads_are_refused() {
        let stamp = PayloadStamp { publisher: 7, sent_us: 123_456_789 };
        let bytes = stamp.write(80);
        assert_eq!(bytes.len(), 80);
        assert_eq!(PayloadStamp::read(&bytes), Some(stamp));
        assert_eq!(PayloadStamp::read(&[0x55; 80]), None);
        assert_eq!(PayloadStamp::read(&bytes[..10]), None);
    }

    #[test]
    fn sequence_gaps_duplicates_and_wrap_around_are_counted() {
        let mut t = SeqTracker::default();
        for seq in [65_530u16, 65_531, 65_533, 65_533, 65_535, 0, 1, 3] {
            t.push(seq);
        }
        // 65530..=3 is 10 numbers; received 65530, 65531, 65533, 65535, 0, 1, 3: 7 distinct.
        assert_eq!(t.expected(), 10);
        assert_eq!(t.distinct(), 7);
        assert_eq!(t.lost(), 3);
        assert_eq!(t.duplicates, 1);
        // A late packet fills its hole.
        t.push(65_532);
        assert_eq!(t.lost(), 2);
        assert_eq!(t.packets, 9);
    }

    #[test]
    fn delay_percentiles() {
        let d = Delays::of((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(d.count, 100);
        assert_eq!(d.p50_ms, 51.0);
        assert_eq!(d.p99_ms, 99.0);
        assert_eq!(d.max_ms, 100.0);
        assert_eq!(Delays::of(Vec::new()), Delays::default());
    }

    #[test]
    fn cpu_time_of_this_process_is_readable() {
        assert!(process_cpu_seconds(None).is_some());
    }
}
