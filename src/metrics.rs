//! Prometheus metrics: every family's name, type and help text, and the typed helpers that
//! record them.
//!
//! One module on purpose. The media path, the rooms, signaling and auth call helpers
//! (`metrics::rtp_in(media, bytes)`, `metrics::pli_out()`, a [`TransportMetric`] per
//! connection) and never spell a metric name, so names, labels and help stay in one table
//! ([`FAMILIES`]) and any media path records the same families.
//!
//! The recorder is `metrics-exporter-prometheus`'s, built once per process on first use and
//! kept here, not installed as the `metrics` crate's global recorder: nothing outside this
//! module can add a family behind the table's back, an embedder's own recorder is left alone,
//! and every helper is an atomic add on a handle registered in advance (the per-packet ones are
//! looked up in arrays, never by name). Recording goes on whether or not `metrics.listen`
//! exports it; it costs a few atomic adds per packet.
//!
//! Labels are bounded: media kind, direction, transport side and state, role, worker index,
//! reason and error codes of closed sets. There is no per-peer label, nor a per-room one (room
//! ids are chosen by clients; `max_rooms` of them would be a thousand series per family).
//!
//! Who records what:
//! - the room, on its worker: [`rtp_in`] per packet received from a publisher, [`rtp_out`] per
//!   packet written to a listener, and [`join_latency`] at a peer's first packet; the worker's
//!   media path (`MediaIo`): a [`TransportMetric`] per connection fed its state changes;
//! - RTCP is counted at the wire by `media::WireTap`, an interceptor that
//!   `media::server_engine_and_registry` puts in every server leg's chain: NACK, PLI and FIR in
//!   and out ([`nack_in`], [`pli_out`], ...) and [`receiver_report`]; a media path that uses
//!   that registry calls none of these itself;
//! - rooms: a [`RoomMetrics`] each, after every tick, from the tick's events and the engine's
//!   counters; workers: a [`WorkerMetrics`] each;
//! - signaling ([`signaling_request`], [`signaling_notice`], [`SessionMetric`]) and auth
//!   ([`auth_verification`], [`auth_key_fetch`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use encore_systems::Engine;
use encore_systems::components::ids::{MediaKind, Name, Role};
use encore_systems::components::output::{Counters, DropCounts, Event, RouteReason, TickOutput};

use crate::auth::AuthError;
use crate::protocol::{ErrorCode, Notice, Request, Side};

/// The type of a family, with a histogram's bucket bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

/// One metric family: what `/metrics` shows under `# HELP` and `# TYPE`.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn counter(name: &'static str, help: &'static str) -> Family {
    Family { name, kind: Kind::Counter, help }
}

const fn gauge(name: &'static str, help: &'static str) -> Family {
    Family { name, kind: Kind::Gauge, help }
}

const fn histogram(name: &'static str, buckets: &'static [f64], help: &'static str) -> Family {
    Family { name, kind: Kind::Histogram(buckets), help }
}

// Bucket bounds, in the families' base units (seconds, ratio, count).
const TICK_BUCKETS: &[f64] = &[0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1];
const JOIN_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0];
const LOSS_BUCKETS: &[f64] = &[0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];
const JITTER_BUCKETS: &[f64] = &[0.001, 0.002_5, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5];
const RTT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6];
const LAG_BUCKETS: &[f64] = &[0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];
const DECISION_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0];

// Names. Counters end in `_total`, units are base units (seconds, bytes), as promtool's lint
// wants them.
const ROOMS: &str = "encore_rooms";
const ROOMS_CREATED: &str = "encore_rooms_created_total";
const PEERS: &str = "encore_peers";
const SESSIONS: &str = "encore_sessions";
const SESSIONS_CLOSED: &str = "encore_sessions_closed_total";
const DRAINING: &str = "encore_draining";
const TRANSPORTS: &str = "encore_transports";
const TRANSPORT_STATE_CHANGES: &str = "encore_transport_state_changes_total";
const PUBLISHERS: &str = "encore_publishers";
const LISTENERS: &str = "encore_listeners";
const RTP_PACKETS: &str = "encore_rtp_packets_total";
const RTP_BYTES: &str = "encore_rtp_bytes_total";
const RTP_RETRANSMITTED_PACKETS: &str = "encore_rtp_retransmitted_packets_total";
const RTP_RETRANSMITTED_BYTES: &str = "encore_rtp_retransmitted_bytes_total";
const RTCP_NACKS: &str = "encore_rtcp_nacks_total";
const RTCP_NACKED_PACKETS: &str = "encore_rtcp_nacked_packets_total";
const RTCP_PLIS: &str = "encore_rtcp_plis_total";
const RTCP_FIRS: &str = "encore_rtcp_firs_total";
const RTCP_RECEIVER_REPORTS: &str = "encore_rtcp_receiver_reports_total";
const LISTENER_LOSS: &str = "encore_listener_loss_ratio";
const LISTENER_JITTER: &str = "encore_listener_jitter_seconds";
const LISTENER_RTT: &str = "encore_listener_rtt_seconds";
const JOIN_LATENCY: &str = "encore_join_latency_seconds";
const SIGNALING_REQUESTS: &str = "encore_signaling_requests_total";
const SIGNALING_NOTICES: &str = "encore_signaling_notices_total";
const AUTH_VERIFICATIONS: &str = "encore_auth_verifications_total";
const AUTH_KEY_FETCHES: &str = "encore_auth_key_fetches_total";
const WORKER_ROOMS: &str = "encore_worker_rooms";
const WORKER_TICK: &str = "encore_worker_tick_duration_seconds";
const WORKER_TICKS: &str = "encore_worker_ticks_total";
const WORKER_SKIPPED: &str = "encore_worker_skipped_ticks_total";
const WORKER_QUEUE_DEPTH: &str = "encore_worker_queue_depth";
const WORKER_COMMANDS_DROPPED: &str = "encore_worker_commands_dropped_total";
const WORKER_NOTICES_DROPPED: &str = "encore_worker_notices_dropped_total";
const WORKER_MEDIA_DROPPED: &str = "encore_worker_media_dropped_total";
const BUFFER_BYTES: &str = "encore_engine_buffer_bytes";
const BUFFER_CAP: &str = "encore_engine_buffer_cap_bytes";
const UTTERANCES_OPEN: &str = "encore_engine_utterances_open";
const UTTERANCES_BUFFERED: &str = "encore_engine_utterances_buffered";
const UTTERANCES_STARTED: &str = "encore_engine_utterances_started_total";
const UTTERANCES_EVICTED: &str = "encore_engine_utterances_evicted_total";
const EVICTED_BYTES: &str = "encore_engine_evicted_bytes_total";
const TRIMMED_PACKETS: &str = "encore_engine_trimmed_packets_total";
const ROUTE_CHANGES: &str = "encore_engine_route_changes_total";
const DECISIONS: &str = "encore_engine_decisions_total";
const DECISIONS_PER_TICK: &str = "encore_engine_decisions_per_tick";
const LISTENERS_PLAYING: &str = "encore_engine_listeners_playing";
const LISTENER_LAG: &str = "encore_engine_listener_lag_seconds";
const ENGINE_PACKETS: &str = "encore_engine_packets_total";
const NACK_UNSERVED: &str = "encore_engine_nack_unserved_total";
const INPUT_DROPS: &str = "encore_engine_input_drops_total";
const INTERNAL_ERRORS: &str = "encore_engine_internal_errors_total";
const NACK_REFUSED: &str = "encore_engine_nack_refused_total";
const BUFFER_BUDGET: &str = "encore_buffer_budget_bytes";
const MEDIA_DATAGRAMS_DROPPED: &str = "encore_media_datagrams_dropped_total";
const HTTP_CONNECTIONS_REFUSED: &str = "encore_http_connections_refused_total";
const QUOTA_REFUSALS: &str = "encore_quota_refusals_total";
const RELAY_STREAMS: &str = "encore_relay_streams";
const RELAY_BYTES: &str = "encore_relay_bytes_total";
const EDGE_ROOMS: &str = "encore_relay_edge_rooms";
const EDGE_REDIRECTS: &str = "encore_relay_listeners_sent_total";

/// Every family the recorder exports, with its help text. `/metrics` shows each of them from
/// the start (at zero), so a dashboard or an alert never meets a missing series.
pub const FAMILIES: &[Family] = &[
    gauge(ROOMS, "Rooms open now."),
    counter(ROOMS_CREATED, "Rooms made since the start."),
    gauge(PEERS, "Peers in rooms, by their highest role (admin, moderator, speaker, listener)."),
    gauge(SESSIONS, "Signaling WebSocket sessions open now."),
    counter(SESSIONS_CLOSED, "Signaling sessions ended, by reason."),
    gauge(DRAINING, "1 while the server drains (after SIGTERM): no new rooms, /readyz answers 503."),
    gauge(TRANSPORTS, "WebRTC transports by side (send: from a publisher, recv: to a listener) and connection state."),
    counter(TRANSPORT_STATE_CHANGES, "Connection state changes of WebRTC transports, by side and new state."),
    gauge(PUBLISHERS, "Peers publishing now."),
    gauge(LISTENERS, "Peers listening now (the engine's listener sessions)."),
    counter(
        RTP_PACKETS,
        "RTP packets received from publishers (in) and sent to listeners (out), retransmissions included.",
    ),
    counter(RTP_BYTES, "RTP bytes (header and payload, before SRTP) received (in) and sent (out)."),
    counter(RTP_RETRANSMITTED_PACKETS, "RTP packets sent to listeners again, answering their NACKs."),
    counter(RTP_RETRANSMITTED_BYTES, "RTP bytes sent to listeners again, answering their NACKs."),
    counter(RTCP_NACKS, "RTCP NACK packets: in from listeners, out to publishers."),
    counter(RTCP_NACKED_PACKETS, "Sequence numbers named by RTCP NACKs, in and out."),
    counter(RTCP_PLIS, "RTCP picture loss indications: in from listeners, out to publishers."),
    counter(RTCP_FIRS, "RTCP full intra requests: in from listeners, out to publishers."),
    counter(RTCP_RECEIVER_REPORTS, "Report blocks received in listeners' RTCP receiver reports."),
    histogram(LISTENER_LOSS, LOSS_BUCKETS, "Fraction of packets lost, from listeners' receiver reports."),
    histogram(LISTENER_JITTER, JITTER_BUCKETS, "Interarrival jitter, from listeners' receiver reports."),
    histogram(LISTENER_RTT, RTT_BUCKETS, "Round-trip time to listeners, from receiver reports (LSR/DLSR)."),
    histogram(
        JOIN_LATENCY,
        JOIN_BUCKETS,
        "From a join request to the first packet sent to that listener (waits for speech).",
    ),
    counter(SIGNALING_REQUESTS, "Signaling requests by type and result (ok or the error code)."),
    counter(SIGNALING_NOTICES, "Signaling notices sent, by type."),
    counter(AUTH_VERIFICATIONS, "Credential verifications by credential, result code and the check that failed."),
    counter(AUTH_KEY_FETCHES, "Fetches of the token signing keys, by result."),
    gauge(WORKER_ROOMS, "Rooms per worker thread."),
    histogram(WORKER_TICK, TICK_BUCKETS, "Time a worker spends on one room tick (commands, engine, delivery)."),
    counter(WORKER_TICKS, "Room ticks run, per worker."),
    counter(WORKER_SKIPPED, "Room ticks skipped by a worker that fell too far behind."),
    gauge(WORKER_QUEUE_DEPTH, "Commands waiting in the queues of a worker's rooms."),
    counter(WORKER_COMMANDS_DROPPED, "Commands for a worker's rooms dropped, by cause (full queue, room closed)."),
    counter(
        WORKER_NOTICES_DROPPED,
        "Notices for peers dropped, by cause (full: a slow client; closed: a session gone).",
    ),
    counter(WORKER_MEDIA_DROPPED, "Packets for listeners dropped before their transport, by cause."),
    gauge(BUFFER_BYTES, "Bytes in the rooms' utterance buffers."),
    gauge(BUFFER_CAP, "Sum of the rooms' buffer caps."),
    gauge(UTTERANCES_OPEN, "Utterances open (their speaker is talking)."),
    gauge(UTTERANCES_BUFFERED, "Utterances in the buffers, open or finished."),
    counter(UTTERANCES_STARTED, "Utterances opened."),
    counter(UTTERANCES_EVICTED, "Whole utterances evicted to keep a buffer under its cap."),
    counter(EVICTED_BYTES, "Bytes released by evictions and trims."),
    counter(TRIMMED_PACKETS, "Packets trimmed from the front of open utterances under buffer pressure."),
    counter(ROUTE_CHANGES, "Listener route changes, by reason."),
    counter(DECISIONS, "Recommender decisions (listeners scored)."),
    histogram(DECISIONS_PER_TICK, DECISION_BUCKETS, "Recommender decisions in ticks that made any."),
    gauge(
        LISTENERS_PLAYING,
        "Listeners playing an utterance: live (it was open when the route started) or time-shifted.",
    ),
    histogram(LISTENER_LAG, LAG_BUCKETS, "How far behind live a listener starts an utterance, at each route change."),
    counter(ENGINE_PACKETS, "Packets the engines produced for listeners: sent (first time) and retransmitted."),
    counter(NACK_UNSERVED, "NACKed packets the engines could not serve (no longer remembered or evicted)."),
    counter(INPUT_DROPS, "Engine inputs dropped, by cause."),
    counter(INTERNAL_ERRORS, "Engine lookups that cannot fail unless the engine has a bug. Always 0."),
    counter(NACK_REFUSED, "NACKed packets not sent again on purpose, by cause (duplicate, too_soon, over_budget)."),
    gauge(BUFFER_BUDGET, "The buffer budget every room's buffer shares (engine.buffer_max_bytes)."),
    counter(
        MEDIA_DATAGRAMS_DROPPED,
        "Datagrams and ICE-TCP frames at the media ports dropped before any connection took them, by cause.",
    ),
    counter(
        HTTP_CONNECTIONS_REFUSED,
        "HTTPS connections turned away before HTTP: over the per-address cap, failed accepts, failed or slow TLS handshakes.",
    ),
    counter(QUOTA_REFUSALS, "Requests refused for a user's quota (sessions, rooms made a minute, tickets)."),
    gauge(RELAY_STREAMS, "Room relay streams this node serves to edge nodes now (as the rooms' origin)."),
    counter(RELAY_BYTES, "Relay stream bytes written to edges (sent) and read from origins (received)."),
    gauge(EDGE_ROOMS, "Rooms this node serves as an edge of their origin node."),
    counter(EDGE_REDIRECTS, "Listeners this node, the room's origin, sent to an edge node."),
];

/// The process families `/metrics` appends (the names of Prometheus's client libraries, so
/// stock dashboards read them). Linux only.
pub const PROCESS_FAMILIES: &[Family] = &[
    counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds."),
    gauge("process_resident_memory_bytes", "Resident memory size in bytes."),
    gauge("process_virtual_memory_bytes", "Virtual memory size in bytes."),
    gauge("process_open_fds", "Number of open file descriptors."),
    gauge("process_max_fds", "Maximum number of open file descriptors."),
    gauge("process_threads", "Number of OS threads in the process."),
    gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
];

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

const MEDIA: [MediaKind; 2] = [MediaKind::Audio, MediaKind::Video];
const ROLES: [&str; 4] = ["admin", "moderator", "speaker", "listener"];

/// Which way a packet went, seen from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// Why a message for a room, a peer or a listener did not get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// The queue was full: the receiver is slow (or flooded).
    Full,
    /// The receiver is gone (a room closed, a session ended).
    Closed,
}

impl DropCause {
    fn as_str(self) -> &'static str {
        match self {
            DropCause::Full => "full",
            DropCause::Closed => "closed",
        }
    }

    /// The cause of a failed `try_send`.
    pub fn of<T>(error: &tokio::sync::mpsc::error::TrySendError<T>) -> Self {
        match error {
            tokio::sync::mpsc::error::TrySendError::Full(_) => DropCause::Full,
            tokio::sync::mpsc::error::TrySendError::Closed(_) => DropCause::Closed,
        }
    }
}

/// A WebRTC transport's connection state, as the gauge counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TransportState {
    New = 0,
    Connecting = 1,
    Connected = 2,
    Disconnected = 3,
    Failed = 4,
    /// Closed transports leave the gauge.
    Closed = 5,
}

impl TransportState {
    const GAUGED: [TransportState; 5] = [
        TransportState::New,
        TransportState::Connecting,
        TransportState::Connected,
        TransportState::Disconnected,
        TransportState::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            TransportState::New => "new",
            TransportState::Connecting => "connecting",
            TransportState::Connected => "connected",
            TransportState::Disconnected => "disconnected",
            TransportState::Failed => "failed",
            TransportState::Closed => "closed",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            0 => TransportState::New,
            1 => TransportState::Connecting,
            2 => TransportState::Connected,
            3 => TransportState::Disconnected,
            4 => TransportState::Failed,
            _ => TransportState::Closed,
        }
    }
}

/// Which credential a verification checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A Firebase ID token (Authorization header, `reauth`).
    IdToken,
    /// A single-use WebSocket ticket.
    Ticket,
}

impl Credential {
    fn as_str(self) -> &'static str {
        match self {
            Credential::IdToken => "id_token",
            Credential::Ticket => "ticket",
        }
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Send => 0,
        Side::Recv => 1,
    }
}

fn media_index(media: MediaKind) -> usize {
    match media {
        MediaKind::Audio => 0,
        MediaKind::Video => 1,
    }
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::In => 0,
        Direction::Out => 1,
    }
}

fn route_reason_index(reason: RouteReason) -> usize {
    RouteReason::ALL.iter().position(|r| *r == reason).unwrap_or(0)
}

/// A peer's highest role: the one its `encore_peers` series counts it under.
fn role_index(roles: &[Role]) -> usize {
    if roles.contains(&Role::Admin) {
        0
    } else if roles.contains(&Role::Moderator) {
        1
    } else if roles.contains(&Role::Speaker) {
        2
    } else {
        3
    }
}

/// The engine's drop causes, by the names of [`DropCounts`]'s fields.
fn drop_counts(drops: &DropCounts) -> [(&'static str, u64); 12] {
    [
        ("unknown_peer", drops.unknown_peer),
        ("unknown_track", drops.unknown_track),
        ("unknown_utterance", drops.unknown_utterance),
        ("duplicate_peer", drops.duplicate_peer),
        ("duplicate_track", drops.duplicate_track),
        ("forbidden", drops.forbidden),
        ("invalid", drops.invalid),
        ("oversize", drops.oversize),
        ("flood", drops.flood),
        ("duplicate_packet", drops.duplicate_packet),
        ("too_late", drops.too_late),
        ("not_listening", drops.not_listening),
    ]
}

/// A family's name and up to three label pairs (unused ones empty): a key made without
/// allocating.
type SeriesKey = (&'static str, [(&'static str, &'static str); 3]);

/// The recorder and the handles registered in advance.
struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    rooms: Gauge,
    rooms_created: Counter,
    peers: [Gauge; 4],
    sessions: Gauge,
    draining: Gauge,
    /// [side][state]
    transports: [[Gauge; 5]; 2],
    publishers: Gauge,
    listeners: Gauge,
    /// [direction][media]
    rtp_packets: [[Counter; 2]; 2],
    rtp_bytes: [[Counter; 2]; 2],
    retransmitted_packets: [Counter; 2],
    retransmitted_bytes: [Counter; 2],
    /// [direction]
    nacks: [Counter; 2],
    nacked_packets: [Counter; 2],
    plis: [Counter; 2],
    firs: [Counter; 2],
    receiver_reports: Counter,
    loss: Histogram,
    jitter: Histogram,
    rtt: Histogram,
    join_latency: Histogram,
    buffer_bytes: Gauge,
    buffer_cap: Gauge,
    utterances_open: Gauge,
    utterances_buffered: Gauge,
    utterances_started: Counter,
    utterances_evicted: Counter,
    evicted_bytes: Counter,
    trimmed_packets: Counter,
    route_changes: [Counter; RouteReason::ALL.len()],
    decisions: Counter,
    decisions_per_tick: Histogram,
    /// [live, time-shifted]
    playing: [Gauge; 2],
    lag: Histogram,
    engine_sent: Counter,
    engine_retransmitted: Counter,
    nack_unserved: Counter,
    input_drops: [Counter; 12],
    internal_errors: Counter,
    /// [duplicate, too_soon, over_budget]
    nack_refused: [Counter; 3],
    buffer_budget: Gauge,
    /// By [`MEDIA_DROP_CAUSES`].
    media_dropped: [Counter; 11],
    /// [per_ip_cap, accept_error, handshake]
    connections_refused: [Counter; 3],
    /// [sessions, rooms, tickets]
    quota_refusals: [Counter; 3],
    relay_streams: Gauge,
    /// [sent, received]
    relay_bytes: [Counter; 2],
    edge_rooms: Gauge,
    edge_redirects: Counter,
    /// Notices sent and requests answered `ok`, by type: registered in advance, read without
    /// a lock (every session sends them).
    notices: HashMap<&'static str, Counter>,
    requests_ok: HashMap<&'static str, Counter>,
    /// Counters whose label values are only known when they are recorded (refusals, auth
    /// codes, state changes): registered on first use, looked up by their labels after that.
    dynamic: Mutex<HashMap<SeriesKey, Counter>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);
    &REGISTRY
}

impl Registry {
    fn new() -> Self {
        let mut builder = PrometheusBuilder::new();
        for family in FAMILIES {
            if let Kind::Histogram(buckets) = family.kind {
                // The only error is an empty list; the bounds are this module's constants, and a
                // unit test checks that none is empty.
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(family.name.to_owned()), buckets)
                    .expect("histogram buckets are non-empty constants");
            }
        }
        let recorder = builder.build_recorder();
        for family in FAMILIES {
            let name = metrics::KeyName::from_const_str(family.name);
            let help = metrics::SharedString::const_str(family.help);
            match family.kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram(_) => recorder.describe_histogram(name, None, help),
            }
        }
        let handle = recorder.handle();
        // Histogram samples wait in the recorder until a scrape or an upkeep folds them into
        // buckets: without a scraper they would pile up, so fold them every few seconds.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new().name("encore-metrics".into()).spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        });
        let c = |name: &'static str, labels: &[(&'static str, &'static str)]| register_counter(&recorder, name, labels);
        let g = |name: &'static str, labels: &[(&'static str, &'static str)]| register_gauge(&recorder, name, labels);
        let h = |name: &'static str| recorder.register_histogram(&Key::from_static_name(name), &METADATA);
        let dirs = [Direction::In, Direction::Out];
        let per_direction = |name| dirs.map(|d| c(name, &[("direction", d.as_str())]));
        let per_direction_media =
            |name| dirs.map(|d| MEDIA.map(|m| c(name, &[("direction", d.as_str()), ("media", m.as_str())])));
        let registry = Registry {
            rooms: g(ROOMS, &[]),
            rooms_created: c(ROOMS_CREATED, &[]),
            peers: ROLES.map(|role| g(PEERS, &[("role", role)])),
            sessions: g(SESSIONS, &[]),
            draining: g(DRAINING, &[]),
            transports: [Side::Send, Side::Recv].map(|side| {
                TransportState::GAUGED
                    .map(|state| g(TRANSPORTS, &[("side", side_str(side)), ("state", state.as_str())]))
            }),
            publishers: g(PUBLISHERS, &[]),
            listeners: g(LISTENERS, &[]),
            rtp_packets: per_direction_media(RTP_PACKETS),
            rtp_bytes: per_direction_media(RTP_BYTES),
            retransmitted_packets: MEDIA.map(|m| c(RTP_RETRANSMITTED_PACKETS, &[("media", m.as_str())])),
            retransmitted_bytes: MEDIA.map(|m| c(RTP_RETRANSMITTED_BYTES, &[("media", m.as_str())])),
            nacks: per_direction(RTCP_NACKS),
            nacked_packets: per_direction(RTCP_NACKED_PACKETS),
            plis: per_direction(RTCP_PLIS),
            firs: per_direction(RTCP_FIRS),
            receiver_reports: c(RTCP_RECEIVER_REPORTS, &[]),
            loss: h(LISTENER_LOSS),
            jitter: h(LISTENER_JITTER),
            rtt: h(LISTENER_RTT),
            join_latency: h(JOIN_LATENCY),
            buffer_bytes: g(BUFFER_BYTES, &[]),
            buffer_cap: g(BUFFER_CAP, &[]),
            utterances_open: g(UTTERANCES_OPEN, &[]),
            utterances_buffered: g(UTTERANCES_BUFFERED, &[]),
            utterances_started: c(UTTERANCES_STARTED, &[]),
            utterances_evicted: c(UTTERANCES_EVICTED, &[]),
            evicted_bytes: c(EVICTED_BYTES, &[]),
            trimmed_packets: c(TRIMMED_PACKETS, &[]),
            route_changes: RouteReason::ALL.map(|r| c(ROUTE_CHANGES, &[("reason", r.as_str())])),
            decisions: c(DECISIONS, &[]),
            decisions_per_tick: h(DECISIONS_PER_TICK),
            playing: ["live", "time_shifted"].map(|mode| g(LISTENERS_PLAYING, &[("mode", mode)])),
            lag: h(LISTENER_LAG),
            engine_sent: c(ENGINE_PACKETS, &[("kind", "sent")]),
            engine_retransmitted: c(ENGINE_PACKETS, &[("kind", "retransmitted")]),
            nack_unserved: c(NACK_UNSERVED, &[]),
            input_drops: drop_counts(&DropCounts::default()).map(|(cause, _)| c(INPUT_DROPS, &[("cause", cause)])),
            internal_errors: c(INTERNAL_ERRORS, &[]),
            nack_refused: ["duplicate", "too_soon", "over_budget"].map(|cause| c(NACK_REFUSED, &[("cause", cause)])),
            buffer_budget: g(BUFFER_BUDGET, &[]),
            media_dropped: MEDIA_DROP_CAUSES.map(|cause| c(MEDIA_DATAGRAMS_DROPPED, &[("cause", cause)])),
            connections_refused: ["per_ip_cap", "accept_error", "handshake"]
                .map(|cause| c(HTTP_CONNECTIONS_REFUSED, &[("cause", cause)])),
            quota_refusals: ["sessions", "rooms", "tickets"].map(|quota| c(QUOTA_REFUSALS, &[("quota", quota)])),
            relay_streams: g(RELAY_STREAMS, &[]),
            relay_bytes: ["sent", "received"].map(|direction| c(RELAY_BYTES, &[("direction", direction)])),
            edge_rooms: g(EDGE_ROOMS, &[]),
            edge_redirects: c(EDGE_REDIRECTS, &[]),
            notices: Notice::KINDS.iter().map(|kind| (*kind, c(SIGNALING_NOTICES, &[("type", kind)]))).collect(),
            requests_ok: Request::KINDS
                .iter()
                .map(|kind| (*kind, c(SIGNALING_REQUESTS, &[("type", kind), ("result", "ok")])))
                .collect(),
            dynamic: Mutex::new(HashMap::new()),
            recorder,
            handle,
        };
        // Families whose label values come with the events still show from the start, at
        // zero, with the series a healthy server has first.
        let first: [(&'static str, &[(&'static str, &'static str)]); 5] = [
            (SESSIONS_CLOSED, &[("reason", "closed")]),
            (TRANSPORT_STATE_CHANGES, &[("side", "send"), ("state", "connected")]),
            (AUTH_VERIFICATIONS, &[("credential", "id_token"), ("result", "ok"), ("check", "ok")]),
            (AUTH_KEY_FETCHES, &[("result", "ok")]),
            (AUTH_KEY_FETCHES, &[("result", "error")]),
        ];
        for (name, labels) in first {
            let _ = registry.dynamic(name, labels);
        }
        registry
    }

    /// A counter with labels known only now; registered once, then found in the map.
    fn dynamic(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        let mut key = [("", ""); 3];
        for (slot, label) in key.iter_mut().zip(labels) {
            *slot = *label;
        }
        debug_assert!(labels.len() <= key.len(), "{name}: at most three labels");
        let mut map = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((name, key)).or_insert_with(|| register_counter(&self.recorder, name, labels)).clone()
    }
}

fn labels(labels: &[(&'static str, &'static str)]) -> Vec<Label> {
    labels.iter().map(|(k, v)| Label::from_static_parts(k, v)).collect()
}

fn register_counter(
    recorder: &PrometheusRecorder,
    name: &'static str,
    pairs: &[(&'static str, &'static str)],
) -> Counter {
    recorder.register_counter(&Key::from_parts(name, labels(pairs)), &METADATA)
}

fn register_gauge(recorder: &PrometheusRecorder, name: &'static str, pairs: &[(&'static str, &'static str)]) -> Gauge {
    recorder.register_gauge(&Key::from_parts(name, labels(pairs)), &METADATA)
}

fn side_str(side: Side) -> &'static str {
    match side {
        Side::Send => "send",
        Side::Recv => "recv",
    }
}

/// The causes of `encore_media_datagrams_dropped_total`, in the order of [`media_dropped`]'s
/// counts.
pub const MEDIA_DROP_CAUSES: [&str; 11] = [
    "unknown_source",
    "stun_no_username",
    "stun_unknown_ufrag",
    "stun_bad_integrity",
    "truncated",
    "refused_by_rtc",
    "tcp_unbound",
    "tcp_overflow",
    "dtls",
    "srtcp",
    "listener_rtp",
];

/// What a worker's media path dropped since its last report, by [`MEDIA_DROP_CAUSES`] (a
/// worker adds its counts once a turn, not once a datagram).
pub fn media_dropped(counts: [u64; 11]) {
    let r = registry();
    for (counter, count) in r.media_dropped.iter().zip(counts) {
        if count > 0 {
            counter.increment(count);
        }
    }
}

/// Why an HTTPS connection was turned away before HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    PerIpCap = 0,
    AcceptError = 1,
    Handshake = 2,
}

pub fn connection_refused(why: ConnectionRefusal) {
    registry().connections_refused[why as usize].increment(1);
}

/// A user's quota that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Sessions = 0,
    Rooms = 1,
    Tickets = 2,
}

pub fn quota_refused(quota: Quota) {
    registry().quota_refusals[quota as usize].increment(1);
}

/// A relay stream to an edge started (`true`) or ended.
pub fn relay_stream(open: bool) {
    let gauge = &registry().relay_streams;
    if open { gauge.increment(1.0) } else { gauge.decrement(1.0) }
}

/// Relay bytes written to an edge (`sent`) or read from an origin.
pub fn relay_bytes(sent: bool, bytes: u64) {
    registry().relay_bytes[usize::from(!sent)].increment(bytes);
}

/// A room served here as an edge opened (`true`) or closed.
pub fn edge_room(open: bool) {
    let gauge = &registry().edge_rooms;
    if open { gauge.increment(1.0) } else { gauge.decrement(1.0) }
}

/// A listener sent to an edge node.
pub fn listener_sent_to_edge() {
    registry().edge_redirects.increment(1);
}

/// The server's buffer budget.
pub fn buffer_budget(bytes: u64) {
    registry().buffer_budget.set(bytes as f64);
}

/// Builds the recorder now, so that `/metrics` lists every family before the first event.
pub fn init() {
    let _ = registry();
}

/// The whole scrape: the recorder's families, then the process's.
pub fn render() -> String {
    let mut text = registry().handle.render();
    render_process(&mut text);
    text
}

// ---- media ----

/// An RTP packet from a publisher, `bytes` its header and payload.
pub fn rtp_in(media: MediaKind, bytes: usize) {
    let r = registry();
    r.rtp_packets[0][media_index(media)].increment(1);
    r.rtp_bytes[0][media_index(media)].increment(bytes as u64);
}

/// An RTP packet written to a listener; `retransmission` when it answers a NACK.
pub fn rtp_out(media: MediaKind, bytes: usize, retransmission: bool) {
    let r = registry();
    let m = media_index(media);
    r.rtp_packets[1][m].increment(1);
    r.rtp_bytes[1][m].increment(bytes as u64);
    if retransmission {
        r.retransmitted_packets[m].increment(1);
        r.retransmitted_bytes[m].increment(bytes as u64);
    }
}

/// A NACK from a listener naming `seqs` sequence numbers.
pub fn nack_in(seqs: usize) {
    nack(Direction::In, seqs);
}

/// A NACK to a publisher naming `seqs` sequence numbers.
pub fn nack_out(seqs: usize) {
    nack(Direction::Out, seqs);
}

fn nack(direction: Direction, seqs: usize) {
    let r = registry();
    r.nacks[direction_index(direction)].increment(1);
    r.nacked_packets[direction_index(direction)].increment(seqs as u64);
}

/// A PLI from a listener.
pub fn pli_in() {
    registry().plis[0].increment(1);
}

/// A PLI to a publisher.
pub fn pli_out() {
    registry().plis[1].increment(1);
}

/// A FIR from a listener.
pub fn fir_in() {
    registry().firs[0].increment(1);
}

/// A FIR to a publisher.
pub fn fir_out() {
    registry().firs[1].increment(1);
}

/// One report block of a listener's receiver report about a stream we send: the fraction lost
/// (0 to 1), the interarrival jitter, and the round-trip time when the block allows it (it
/// names a sender report of ours).
pub fn receiver_report(fraction_lost: f64, jitter: Duration, rtt: Option<Duration>) {
    let r = registry();
    r.receiver_reports.increment(1);
    r.loss.record(fraction_lost.clamp(0.0, 1.0));
    r.jitter.record(jitter.as_secs_f64());
    if let Some(rtt) = rtt {
        r.rtt.record(rtt.as_secs_f64());
    }
}

/// A listener's first packet, this long after its join request.
pub fn join_latency(since_join: Duration) {
    registry().join_latency.record(since_join.as_secs_f64());
}

/// One WebRTC transport in the `encore_transports` gauge: it counts under its current state
/// until it closes or is dropped. State changes may come from any thread.
#[derive(Debug)]
pub struct TransportMetric {
    side: Side,
    state: AtomicU8,
}

impl TransportMetric {
    /// A new transport, in state `new`.
    pub fn new(side: Side) -> Self {
        registry().transports[side_index(side)][TransportState::New as usize].increment(1.0);
        TransportMetric { side, state: AtomicU8::new(TransportState::New as u8) }
    }

    /// The peer connection (`webrtc`'s or the sans-I/O `rtc` core's: the same type) changed
    /// state; states the gauge does not know are ignored.
    pub fn connection_state(&self, state: rtc::peer_connection::state::RTCPeerConnectionState) {
        use rtc::peer_connection::state::RTCPeerConnectionState as Pc;
        let state = match state {
            Pc::New => TransportState::New,
            Pc::Connecting => TransportState::Connecting,
            Pc::Connected => TransportState::Connected,
            Pc::Disconnected => TransportState::Disconnected,
            Pc::Failed => TransportState::Failed,
            Pc::Closed => TransportState::Closed,
            _ => return,
        };
        self.state(state);
    }

    /// The connection moved to `state`.
    pub fn state(&self, state: TransportState) {
        let previous = TransportState::from_u8(self.state.swap(state as u8, Ordering::AcqRel));
        if previous == state {
            return;
        }
        let r = registry();
        let gauges = &r.transports[side_index(self.side)];
        if previous != TransportState::Closed {
            gauges[previous as usize].decrement(1.0);
        }
        if state != TransportState::Closed {
            gauges[state as usize].increment(1.0);
        }
        r.dynamic(TRANSPORT_STATE_CHANGES, &[("side", side_str(self.side)), ("state", state.as_str())]).increment(1);
    }
}

impl Drop for TransportMetric {
    fn drop(&mut self) {
        let state = TransportState::from_u8(*self.state.get_mut());
        if state != TransportState::Closed {
            registry().transports[side_index(self.side)][state as usize].decrement(1.0);
        }
    }
}

// ---- signaling and auth ----

/// A signaling request answered: `kind` is its type (`Request::kind`, or `unreadable` for a
/// message that was not one), `error` its refusal.
pub fn signaling_request(kind: &'static str, error: Option<ErrorCode>) {
    let r = registry();
    match error {
        None => match r.requests_ok.get(kind) {
            Some(counter) => counter.increment(1),
            None => r.dynamic(SIGNALING_REQUESTS, &[("type", kind), ("result", "ok")]).increment(1),
        },
        Some(code) => r.dynamic(SIGNALING_REQUESTS, &[("type", kind), ("result", code.as_str())]).increment(1),
    }
}

/// A notice sent to a client (`Notice::kind`).
pub fn signaling_notice(kind: &'static str) {
    let r = registry();
    match r.notices.get(kind) {
        Some(counter) => counter.increment(1),
        None => r.dynamic(SIGNALING_NOTICES, &[("type", kind)]).increment(1),
    }
}

/// One open signaling session in `encore_sessions`, until dropped.
#[derive(Debug)]
pub struct SessionMetric(());

impl SessionMetric {
    pub fn open() -> Self {
        registry().sessions.increment(1.0);
        SessionMetric(())
    }

    /// How the session ended (`closed`, `expired`, `removed`, `shutdown`, ...).
    pub fn closed(self, reason: &'static str) {
        registry().dynamic(SESSIONS_CLOSED, &[("reason", reason)]).increment(1);
    }
}

impl Drop for SessionMetric {
    fn drop(&mut self) {
        registry().sessions.decrement(1.0);
    }
}

/// A credential checked: accepted, or refused with its code and the check that failed.
pub fn auth_verification(credential: Credential, result: Result<(), &AuthError>) {
    let (code, check) = match result {
        Ok(()) => ("ok", "ok"),
        Err(error) => (error.code(), error.check()),
    };
    registry()
        .dynamic(AUTH_VERIFICATIONS, &[("credential", credential.as_str()), ("result", code), ("check", check)])
        .increment(1);
}

/// A fetch of the signing keys finished.
pub fn auth_key_fetch(ok: bool) {
    registry().dynamic(AUTH_KEY_FETCHES, &[("result", if ok { "ok" } else { "error" })]).increment(1);
}

/// The server drains (`true`) or stopped draining (`false`).
pub fn draining(on: bool) {
    let gauge = &registry().draining;
    if on { gauge.increment(1.0) } else { gauge.decrement(1.0) }
}

// ---- workers and rooms ----

/// One worker thread's families, labelled with its index. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct WorkerMetrics {
    rooms: Gauge,
    tick: Histogram,
    ticks: Counter,
    skipped: Counter,
    queue_depth: Gauge,
    commands_dropped: [Counter; 2],
    notices_dropped: [Counter; 2],
    media_dropped: [Counter; 2],
}

impl WorkerMetrics {
    pub fn new(worker: usize) -> Self {
        let r = registry();
        let index = worker.to_string();
        let key = |name: &'static str, extra: Option<(&'static str, &'static str)>| {
            let mut labels = vec![Label::new("worker", index.clone())];
            if let Some((k, v)) = extra {
                labels.push(Label::from_static_parts(k, v));
            }
            Key::from_parts(name, labels)
        };
        let causes = |name: &'static str| {
            [DropCause::Full, DropCause::Closed]
                .map(|cause| r.recorder.register_counter(&key(name, Some(("cause", cause.as_str()))), &METADATA))
        };
        WorkerMetrics {
            rooms: r.recorder.register_gauge(&key(WORKER_ROOMS, None), &METADATA),
            tick: r.recorder.register_histogram(&key(WORKER_TICK, None), &METADATA),
            ticks: r.recorder.register_counter(&key(WORKER_TICKS, None), &METADATA),
            skipped: r.recorder.register_counter(&key(WORKER_SKIPPED, None), &METADATA),
            queue_depth: r.recorder.register_gauge(&key(WORKER_QUEUE_DEPTH, None), &METADATA),
            commands_dropped: causes(WORKER_COMMANDS_DROPPED),
            notices_dropped: causes(WORKER_NOTICES_DROPPED),
            media_dropped: causes(WORKER_MEDIA_DROPPED),
        }
    }

    /// The worker gave up `ticks` ticks of a room that fell too far behind.
    pub fn skipped_ticks(&self, ticks: u64) {
        self.skipped.increment(ticks);
    }

    /// Commands waiting in the worker's rooms' queues now.
    pub fn queue_depth(&self, commands: usize) {
        self.queue_depth.set(commands as f64);
    }

    /// A command for one of the worker's rooms could not be queued.
    pub fn command_dropped(&self, cause: DropCause) {
        self.commands_dropped[cause as usize].increment(1);
    }

    /// A notice for a peer could not be queued.
    pub fn notice_dropped(&self, cause: DropCause) {
        self.notices_dropped[cause as usize].increment(1);
    }

    /// A packet for a listener could not be queued.
    pub fn media_dropped(&self, cause: DropCause) {
        self.media_dropped[cause as usize].increment(1);
    }
}

/// A gauge this room adds to: it remembers its share, moves the gauge by the difference, and
/// takes its share back when dropped, so rooms on any worker (and servers in one process) sum.
struct Share {
    gauge: Gauge,
    value: f64,
}

impl Share {
    fn new(gauge: &Gauge) -> Self {
        Share { gauge: gauge.clone(), value: 0.0 }
    }

    fn set(&mut self, value: f64) {
        if value != self.value {
            self.gauge.increment(value - self.value);
            self.value = value;
        }
    }

    fn add(&mut self, delta: f64) {
        self.set(self.value + delta);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.gauge.decrement(self.value);
    }
}

/// One room's part in the families: its gauges' shares, and the engine counters it already
/// reported. The room calls [`RoomMetrics::after_tick`] after every tick; everything comes
/// from the tick's typed events and the engine's counters, the engine itself records nothing.
pub struct RoomMetrics {
    worker: WorkerMetrics,
    rooms: Share,
    worker_rooms: Share,
    peers: [Share; 4],
    publishers: Share,
    listeners: Share,
    buffer_bytes: Share,
    buffer_cap: Share,
    utterances_open: Share,
    utterances_buffered: Share,
    playing: [Share; 2],
    /// Listeners playing something: whether their route started live.
    live: HashMap<Name, bool>,
    counters: Counters,
}

impl RoomMetrics {
    pub fn new(worker: &WorkerMetrics, buffer_cap_bytes: u64) -> Self {
        let r = registry();
        r.rooms_created.increment(1);
        let mut room = RoomMetrics {
            worker: worker.clone(),
            rooms: Share::new(&r.rooms),
            worker_rooms: Share::new(&worker.rooms),
            peers: [0, 1, 2, 3].map(|i| Share::new(&r.peers[i])),
            publishers: Share::new(&r.publishers),
            listeners: Share::new(&r.listeners),
            buffer_bytes: Share::new(&r.buffer_bytes),
            buffer_cap: Share::new(&r.buffer_cap),
            utterances_open: Share::new(&r.utterances_open),
            utterances_buffered: Share::new(&r.utterances_buffered),
            playing: [0, 1].map(|i| Share::new(&r.playing[i])),
            live: HashMap::new(),
            counters: Counters::default(),
        };
        room.rooms.set(1.0);
        room.worker_rooms.set(1.0);
        room.buffer_cap.set(buffer_cap_bytes as f64);
        room
    }

    pub fn peer_joined(&mut self, roles: &[Role]) {
        self.peers[role_index(roles)].add(1.0);
    }

    pub fn peer_left(&mut self, roles: &[Role]) {
        self.peers[role_index(roles)].add(-1.0);
    }

    /// A peer started (`true`) or stopped publishing.
    pub fn publishing(&mut self, publishing: bool) {
        self.publishers.add(if publishing { 1.0 } else { -1.0 });
    }

    /// A notice for one of the room's peers could not be queued.
    pub fn notice_dropped(&self, cause: DropCause) {
        self.worker.notice_dropped(cause);
    }

    /// A packet for a listener could not be queued.
    pub fn media_dropped(&self, cause: DropCause) {
        self.worker.media_dropped(cause);
    }

    /// What one tick did, `took` the time the worker spent on it.
    pub fn after_tick(&mut self, output: &TickOutput, engine: &Engine, took: Duration) {
        let r = registry();
        self.worker.tick.record(took.as_secs_f64());
        self.worker.ticks.increment(1);
        for event in &output.events {
            match event {
                Event::Route { listener, to, reason, lag_us, live, .. } => {
                    r.route_changes[route_reason_index(*reason)].increment(1);
                    if to.is_some() {
                        r.lag.record(lag_us.unwrap_or(0) as f64 / 1e6);
                        self.play(listener, Some(*live));
                    } else {
                        self.play(listener, None);
                    }
                }
                Event::UtteranceStart { .. } => r.utterances_started.increment(1),
                Event::Stats(stats) => {
                    self.utterances_open.set(stats.open_utterances as f64);
                    self.utterances_buffered.set(stats.utterances as f64);
                    self.listeners.set(stats.listeners as f64);
                }
                _ => {}
            }
        }
        let decisions = engine.decisions_last_tick();
        if decisions > 0 {
            r.decisions.increment(decisions);
            r.decisions_per_tick.record(decisions as f64);
        }
        self.buffer_bytes.set(engine.buffer_bytes() as f64);
        // The room's share of the budget moves; the sum of the caps stays within it.
        self.buffer_cap.set(engine.buffer_cap() as f64);
        self.report_counters(engine.counters());
    }

    fn play(&mut self, listener: &Name, live: Option<bool>) {
        let before = match live {
            Some(live) => self.live.insert(listener.clone(), live),
            None => self.live.remove(listener),
        };
        if let Some(was) = before {
            self.playing[usize::from(!was)].add(-1.0);
        }
        if let Some(live) = live {
            self.playing[usize::from(!live)].add(1.0);
        }
    }

    /// Adds what the engine counted since the last report.
    fn report_counters(&mut self, now: Counters) {
        if now == self.counters {
            return;
        }
        let r = registry();
        let was = std::mem::replace(&mut self.counters, now);
        let add = |counter: &Counter, now: u64, was: u64| {
            if now > was {
                counter.increment(now - was);
            }
        };
        add(&r.engine_sent, now.sent, was.sent);
        add(&r.engine_retransmitted, now.retransmitted, was.retransmitted);
        add(&r.nack_unserved, now.nack_unserved, was.nack_unserved);
        add(&r.utterances_evicted, now.evicted_utterances, was.evicted_utterances);
        add(&r.evicted_bytes, now.evicted_bytes, was.evicted_bytes);
        add(&r.trimmed_packets, now.trimmed_packets, was.trimmed_packets);
        add(&r.internal_errors, now.internal_errors, was.internal_errors);
        add(&r.nack_refused[0], now.nack_refused.duplicate, was.nack_refused.duplicate);
        add(&r.nack_refused[1], now.nack_refused.too_soon, was.nack_refused.too_soon);
        add(&r.nack_refused[2], now.nack_refused.over_budget, was.nack_refused.over_budget);
        for (i, ((_, now), (_, was))) in drop_counts(&now.drops).into_iter().zip(drop_counts(&was.drops)).enumerate() {
            add(&r.input_drops[i], now, was);
        }
    }
}

// ---- process ----

/// Appends the process families, read from /proc (nothing on other systems).
fn render_process(out: &mut String) {
    let Some(process) = ProcessStats::read() else { return };
    let values = [
        process.cpu_seconds,
        process.resident_bytes,
        process.virtual_bytes,
        process.open_fds,
        process.max_fds,
        process.threads,
        process.start_time_seconds,
    ];
    for (family, value) in PROCESS_FAMILIES.iter().zip(values) {
        let Some(value) = value else { continue };
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        let _ = write!(out, "# HELP {0} {1}\n# TYPE {0} {2}\n{0} {3}\n\n", family.name, family.help, kind, value);
    }
}

/// The CPU time (user and system) this process has used, in seconds (Linux; `None` elsewhere).
pub fn process_cpu_seconds() -> Option<f64> {
    ProcessStats::read()?.cpu_seconds
}

/// The process's figures from /proc (Linux).
#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    threads: Option<f64>,
    start_time_seconds: Option<f64>,
}

/// Linux's USER_HZ, the unit of /proc's CPU times: 100 on every architecture Linux runs
/// userspace on (the kernel's own HZ differs, what /proc shows does not).
const USER_HZ: f64 = 100.0;
const PAGE_BYTES: f64 = 4096.0;

impl ProcessStats {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: read after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state): field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|text| {
            text.lines().find_map(|line| line.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok())
        });
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as f64);
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<f64>().ok()
        });
        Some(ProcessStats {
            cpu_seconds: field(14).zip(field(15)).map(|(user, system)| (user + system) / USER_HZ),
            resident_bytes: field(24).map(|pages| pages * PAGE_BYTES),
            virtual_bytes: field(23),
            open_fds,
            max_fds,
            threads: field(20),
            start_time_seconds: field(22).zip(boot_time).map(|(ticks, boot)| boot + ticks / USER_HZ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_named_as_promtool_wants() {
        let mut names: Vec<&str> = FAMILIES.iter().chain(PROCESS_FAMILIES).map(|f| f.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a family is listed twice");
        for family in FAMILIES {
            assert!(family.name.starts_with("encore_"), "{}", family.name);
            assert_eq!(family.name.ends_with("_total"), family.kind == Kind::Counter, "{}", family.name);
            assert!(family.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            assert!(!family.help.is_empty());
            if let Kind::Histogram(buckets) = family.kind {
                assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{}: buckets ascend", family.name);
            }
        }
    }

    /// A series' value in a scrape.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The unit tests are the only transports in their process, so the gauges are theirs.
    #[test]
    fn a_transport_counts_under_one_state_at_a_time_and_leaves_when_closed() {
        let series = |state: &str| format!("encore_transports{{side=\"send\",state=\"{state}\"}}");
        let value = |state: &str| sample(&render(), &series(state)).unwrap_or(f64::NAN);
        let first = TransportMetric::new(Side::Send);
        let second = TransportMetric::new(Side::Send);
        assert_eq!(value("new"), 2.0);
        first.state(TransportState::Connecting);
        first.state(TransportState::Connected);
        first.state(TransportState::Connected);
        assert_eq!((value("new"), value("connecting"), value("connected")), (1.0, 0.0, 1.0));
        first.state(TransportState::Closed);
        assert_eq!(value("connected"), 0.0, "closed transports leave the gauge");
        drop(first);
        assert_eq!(value("connected"), 0.0, "and are not taken away twice");
        second.state(TransportState::Failed);
        drop(second);
        assert_eq!((value("new"), value("failed")), (0.0, 0.0), "a dropped transport leaves the gauge");
        let text = render();
        let changes = sample(&text, "encore_transport_state_changes_total{side=\"send\",state=\"connected\"}");
        assert_eq!(changes, Some(1.0), "{text}");
    }

    #[test]
    fn every_family_is_in_the_scrape_with_help_and_type() {
        // Worker families have a worker label: they show once a worker runs.
        let _worker = WorkerMetrics::new(0);
        let text = render();
        for family in FAMILIES.iter().chain(PROCESS_FAMILIES) {
            assert!(text.contains(&format!("# HELP {} ", family.name)), "no HELP for {}", family.name);
            assert!(text.contains(&format!("# TYPE {} ", family.name)), "no TYPE for {}", family.name);
        }
    }

    #[test]
    fn the_process_block_reads_proc() {
        let stats = ProcessStats::read().expect("/proc on Linux");
        assert!(stats.cpu_seconds.is_some() && stats.resident_bytes.unwrap_or(0.0) > 0.0);
        assert!(stats.open_fds.unwrap_or(0.0) > 0.0 && stats.max_fds.is_some());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let started = stats.start_time_seconds.expect("a start time");
        assert!(started <= now + 1.0 && started > now - 86_400.0 * 365.0, "{started} vs {now}");
    }
}
