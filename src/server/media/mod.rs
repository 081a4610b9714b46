//! The media fast path: a worker's WebRTC connections on the sans-I/O `rtc` core, behind one
//! UDP socket (and the server's one ICE-TCP port), driven by the worker's own loop.
//!
//! This is the shape of mediasoup's `WebRtcServer` and str0m's `chat` example: the worker owns
//! its socket; a datagram is routed to its connection (STUN by the USERNAME's local ufrag, once
//! its MESSAGE-INTEGRITY checks with that connection's password; everything else by the source
//! address such a check taught us) and fed to that connection's `RTCPeerConnection` (a listener
//! leg's DTLS and SRTCP to the worker's own instead: `listener_leg.rs`); what the connections want
//! to send after a tick goes out in one `sendmmsg`. Unknown sources are dropped and counted, and
//! no state is allocated before a valid check. There is no task, channel or
//! wake-up per packet: inbound RTP becomes an engine input on the same thread, and the engine's
//! packets become SRTP datagrams on the same thread.
//!
//! Every connection is ICE-lite with fixed credentials (the ufrag starts with the worker's
//! index, so the TCP acceptor knows where a stream belongs), presents the worker's one DTLS
//! certificate, and carries its host candidates (UDP, and TCP passive) inside its SDP: a client
//! needs no trickle from the server.
//!
//! Three traps of the `rtc` 0.21 core are handled here (docs/dependencies.md): its lite agent
//! never re-selects a pair, so after a NAT rebinding it would keep sending to the dead address
//! (the router shows rtc one stable peer address and sends to the address the client checks
//! from); it drops RTP written before DTLS is up and says Ok (writes wait for `Connected`); and a
//! DTLS handshake that loses a datagram can stall forever (a connection not connected within
//! `connect_timeout` is closed, and its client is told).

pub mod dtls_srtp;
pub mod listener_leg;
pub mod stun;
pub mod tcp;
pub mod udp;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::crypto::{RTCCryptoProvider, SignatureScheme};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::tcp_type::TcpType;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCIceConnectionState;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::tcp_framing::{TcpFrameDecoder, frame_packet};
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use slotmap::{SlotMap, new_key_type};

use encore_systems::components::ids::MediaKind;

use crate::media::{self as m, RtcpFeedback};
use crate::protocol::ErrorCode;
use listener_leg::{LegDrop, ListenerLeg};

new_key_type! {
    /// A connection of a worker: a generational handle, so a key kept past its connection's end
    /// never reaches a newer connection in the same slot.
    pub struct ConnKey;
}

/// Datagrams read per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// Largest datagram read (media never comes close; a larger one is truncated and dropped).
const RECV_BUFFER: usize = 2048;
/// Socket buffers asked of the kernel, each way.
const SOCKET_BUFFER: usize = 4 << 20;
/// A client silent on its nominated address this long is taken to have moved (NAT rebinding):
/// media goes to the validated address heard from last.
const REBIND_SILENCE: Duration = Duration::from_millis(2500);
/// Checks whose responses we route back to their source, per connection.
const PENDING_CHECKS: usize = 16;
/// ICE-TCP streams a worker keeps, and bytes queued per stream before media is dropped.
const MAX_TCP_STREAMS: usize = 4096;
const MAX_TCP_QUEUE: usize = 256 * 1024;
/// DTLS datagrams of a listener leg kept while its answer is on its way (a browser may finish
/// ICE and send its ClientHello before the answer reaches us over the WebSocket).
const EARLY_DTLS: usize = 4;

/// Why a connection could not be made or take what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("bad SDP: {0}")]
    BadSdp(#[source] rtc::shared::error::Error),
    #[error("the offer has {audio} audio and {video} video m-lines; one audio and at most one video are allowed")]
    TooManyTracks { audio: usize, video: usize },
    #[error("this transport has its answer already")]
    AnsweredTwice,
    #[error("no such transport")]
    Gone,
    #[error("the answer cannot key DTLS: {0}")]
    Answer(#[from] listener_leg::AnswerError),
    #[error("DTLS for a listener leg: {0}")]
    Dtls(#[source] dtls_srtp::DtlsSrtpError),
    #[error("WebRTC, {during}: {source}")]
    Rtc { during: &'static str, source: rtc::shared::error::Error },
}

impl MediaError {
    /// The protocol's error code: the client's fault, a state conflict, or ours.
    pub fn code(&self) -> ErrorCode {
        match self {
            MediaError::BadSdp(_) | MediaError::TooManyTracks { .. } | MediaError::Answer(_) => ErrorCode::BadRequest,
            MediaError::AnsweredTwice | MediaError::Gone => ErrorCode::Conflict,
            MediaError::Rtc { .. } | MediaError::Dtls(_) => ErrorCode::Internal,
        }
    }
}

fn rtc_error(during: &'static str) -> impl FnOnce(rtc::shared::error::Error) -> MediaError {
    move |source| MediaError::Rtc { during, source }
}

/// How a worker's media path binds and announces itself.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    pub worker: usize,
    /// The worker's UDP socket (port 0: any free port).
    pub udp_bind: SocketAddr,
    /// The addresses written into host candidates (the machine's, or the public IP behind 1:1
    /// NAT). The first one also tags every datagram fed to a connection.
    pub announced: Vec<IpAddr>,
    /// The server's ICE-TCP port, announced as a passive candidate (none: UDP only).
    pub tcp_port: Option<u16>,
    /// A connection not connected (ICE and DTLS) this long after it was made is closed.
    pub connect_timeout: Duration,
    /// ICE disconnected and failed timeouts (without checks from the client), and keepalive.
    pub ice_disconnected: Duration,
    pub ice_failed: Duration,
    pub ice_keepalive: Duration,
}

/// Who a connection belongs to, as its owner chose to say it (the worker: a room's serial).
pub type Owner = u64;

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// A publisher's send transport: the client offers, we receive.
    Publish,
    /// A listener's receive transport: we offer one audio track (and video), we send.
    Listen { video: bool },
}

/// What the connections tell their owners.
#[derive(Debug, Clone)]
pub enum MediaEvent {
    Connected {
        conn: ConnKey,
        owner: Owner,
    },
    /// Gone: closed by us or the client, or failed (ICE, DTLS, the connect timeout).
    Closed {
        conn: ConnKey,
        owner: Owner,
        failed: bool,
    },
    /// A publisher's track started.
    TrackOpen {
        conn: ConnKey,
        owner: Owner,
        media: MediaKind,
        codec: String,
        clock_rate: u32,
        ssrc: u32,
    },
    /// One RTP packet of a publisher's track, with its RFC 6464 level and V flag.
    Rtp {
        conn: ConnKey,
        owner: Owner,
        media: MediaKind,
        ssrc: u32,
        at: Instant,
        packet: rtc::rtp::Packet,
        level: Option<(u8, bool)>,
    },
    /// A listener's RTCP about one of its streams.
    Feedback {
        conn: ConnKey,
        owner: Owner,
        media: MediaKind,
        feedback: RtcpFeedback,
    },
}

/// Drops and work, counted by cause: nothing is dropped silently.
#[derive(Debug, Default, Clone, Copy)]
pub struct MediaStats {
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    pub drop_unknown_source: u64,
    pub drop_stun_no_username: u64,
    pub drop_stun_unknown_ufrag: u64,
    pub drop_stun_bad_integrity: u64,
    pub drop_truncated: u64,
    pub drop_rtc_error: u64,
    pub drop_tcp_unbound: u64,
    pub drop_tcp_overflow: u64,
    /// Listener legs (their DTLS and SRTCP are the worker's): records that fail, SRTCP that
    /// fails or comes before the keys, RTP on a receive-only leg.
    pub drop_dtls: u64,
    pub drop_srtcp: u64,
    pub drop_listener_rtp: u64,
    pub tx_datagrams: u64,
    pub tx_bytes: u64,
    pub tx_syscalls: u64,
    pub tx_errors: u64,
    pub tx_redirected: u64,
    pub rtp_in: u64,
    pub rtp_out: u64,
    /// RTP for a listener that is not connected yet, or has no such leg.
    pub rtp_out_refused: u64,
    pub connect_timeouts: u64,
}

impl MediaStats {
    /// Adds another worker's figures to these.
    pub fn add(&mut self, other: &MediaStats) {
        let MediaStats {
            rx_datagrams,
            rx_bytes,
            drop_unknown_source,
            drop_stun_no_username,
            drop_stun_unknown_ufrag,
            drop_stun_bad_integrity,
            drop_truncated,
            drop_rtc_error,
            drop_tcp_unbound,
            drop_tcp_overflow,
            drop_dtls,
            drop_srtcp,
            drop_listener_rtp,
            tx_datagrams,
            tx_bytes,
            tx_syscalls,
            tx_errors,
            tx_redirected,
            rtp_in,
            rtp_out,
            rtp_out_refused,
            connect_timeouts,
        } = *other;
        self.rx_datagrams += rx_datagrams;
        self.rx_bytes += rx_bytes;
        self.drop_unknown_source += drop_unknown_source;
        self.drop_stun_no_username += drop_stun_no_username;
        self.drop_stun_unknown_ufrag += drop_stun_unknown_ufrag;
        self.drop_stun_bad_integrity += drop_stun_bad_integrity;
        self.drop_truncated += drop_truncated;
        self.drop_rtc_error += drop_rtc_error;
        self.drop_tcp_unbound += drop_tcp_unbound;
        self.drop_tcp_overflow += drop_tcp_overflow;
        self.drop_dtls += drop_dtls;
        self.drop_srtcp += drop_srtcp;
        self.drop_listener_rtp += drop_listener_rtp;
        self.tx_datagrams += tx_datagrams;
        self.tx_bytes += tx_bytes;
        self.tx_syscalls += tx_syscalls;
        self.tx_errors += tx_errors;
        self.tx_redirected += tx_redirected;
        self.rtp_in += rtp_in;
        self.rtp_out += rtp_out;
        self.rtp_out_refused += rtp_out_refused;
        self.connect_timeouts += connect_timeouts;
    }
}

/// A listener leg's sending side, fixed by the answer.
#[derive(Debug, Clone, Copy)]
struct OutLeg {
    ssrc: u32,
    payload_type: u8,
    clock_rate: u32,
    level_id: Option<u8>,
}

#[derive(Debug, Clone)]
struct InTrack {
    receiver: RTCRtpReceiverId,
    media: MediaKind,
    ssrc: u32,
    level_id: Option<u8>,
}

struct Conn {
    pc: RTCPeerConnection,
    owner: Owner,
    leg: Leg,
    /// A listener leg's DTLS-SRTP and RTCP, run by the worker (`listener_leg.rs`), from its
    /// answer on; DTLS records that came before it wait in `early_dtls`.
    listener: Option<ListenerLeg>,
    early_dtls: Vec<(Vec<u8>, Option<SocketAddr>)>,
    /// The ICE-TCP stream (by its peer) the connection's own datagrams go on: set by a
    /// nominating check or a DTLS record over TCP, cleared by one over UDP.
    tcp_peer: Option<SocketAddr>,
    ufrag: String,
    pwd: String,
    created: Instant,
    /// What rtc last asked for (`poll_timeout`).
    deadline: Option<Instant>,
    /// Touched since the last collect: its queues need draining.
    dirty: bool,
    connected: bool,
    dead: bool,
    failed: bool,
    answered: bool,
    /// Its place in `encore_transports` (by side and state), until it is dropped.
    metric: crate::metrics::TransportMetric,
    /// Listener legs: (audio, video) SSRCs we offered; the negotiated legs once answered.
    offered: [Option<u32>; 2],
    out: [Option<OutLeg>; 2],
    /// Publisher tracks by rtc's track id.
    tracks: HashMap<String, InTrack>,
    /// Validated remote UDP addresses (for forgetting the routes).
    addrs: Vec<SocketAddr>,
    /// The address of the last check with USE-CANDIDATE, and when each validated address was
    /// last heard from (checks, DTLS, SRTP).
    nominated: Option<SocketAddr>,
    latest: Option<SocketAddr>,
    seen: Vec<(SocketAddr, Instant)>,
    /// The remote address of rtc's selected pair, from its first DTLS/SRTP datagram: every
    /// datagram is shown to rtc as from here, so its liveness check follows a rebound client.
    rtc_peer: Option<SocketAddr>,
    /// Checks let through, by transaction id: their responses go back to their source.
    pending_checks: VecDeque<([u8; 12], SocketAddr)>,
}

impl Conn {
    /// Where DTLS and SRTP go: the nominated address while anything arrives from it; after
    /// [`REBIND_SILENCE`], the validated address heard from last.
    fn destination(&self, now: Instant) -> Option<SocketAddr> {
        let fresh = |addr: SocketAddr| {
            self.seen.iter().any(|(a, t)| *a == addr && now.saturating_duration_since(*t) < REBIND_SILENCE)
        };
        match self.nominated {
            Some(addr) if fresh(addr) => Some(addr),
            Some(_) => self.seen.iter().max_by_key(|(_, t)| *t).map(|(a, _)| *a),
            None => self.latest,
        }
    }

    /// Where the connection's own datagrams go now, if it has been heard from.
    fn path(&self, now: Instant) -> Option<Path> {
        match self.tcp_peer {
            Some(peer) => Some(Path::Tcp(peer)),
            None => self.destination(now).map(Path::Udp),
        }
    }

    fn heard(&mut self, from: SocketAddr, now: Instant) {
        match self.seen.iter_mut().find(|(a, _)| *a == from) {
            Some(entry) => entry.1 = now,
            None => self.seen.push((from, now)),
        }
    }

    fn leg_of(&self, media: MediaKind) -> Option<OutLeg> {
        self.out[media as usize]
    }
}

/// A connection's path out: its ICE-TCP stream (by peer) or a UDP address.
#[derive(Debug, Clone, Copy)]
enum Path {
    Tcp(SocketAddr),
    Udp(SocketAddr),
}

/// An ICE-TCP stream handed over by the acceptor, with the first frame it read.
pub struct TcpArrival {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub first_frame: Vec<u8>,
}

struct TcpConn {
    stream: TcpStream,
    peer: SocketAddr,
    decoder: TcpFrameDecoder,
    conn: ConnKey,
    out: Vec<u8>,
}

/// A worker's media I/O: its socket, its connections, their routes and timers.
pub struct MediaIo {
    settings: MediaSettings,
    socket: UdpSocket,
    local_udp: SocketAddr,
    /// The address every datagram is tagged with (the first announced candidate).
    tag_udp: SocketAddr,
    tag_tcp: Option<SocketAddr>,
    crypto: Arc<dyn RTCCryptoProvider>,
    certificate: RTCCertificate,
    conns: SlotMap<ConnKey, Conn>,
    by_ufrag: HashMap<String, ConnKey>,
    by_addr: HashMap<SocketAddr, ConnKey>,
    timers: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    dirty: Vec<ConnKey>,
    tcp_arrivals: Option<Receiver<TcpArrival>>,
    tcp: Vec<TcpConn>,
    events: VecDeque<MediaEvent>,
    tx: Vec<(SocketAddr, BytesMut)>,
    buffers: Vec<Vec<u8>>,
    received: Vec<udp::Received>,
    stats: MediaStats,
}

fn random_string(provider: &dyn RTCCryptoProvider, len: usize) -> Result<String, MediaError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut bytes = vec![0u8; len];
    provider.random().fill(&mut bytes).map_err(|e| MediaError::Rtc {
        during: "randomness",
        source: rtc::shared::error::Error::Other(e.to_string()),
    })?;
    Ok(bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect())
}

/// The worker a ufrag belongs to: its first two characters, in hex.
pub fn worker_of_ufrag(ufrag: &str) -> Option<usize> {
    usize::from_str_radix(ufrag.get(..2)?, 16).ok()
}

impl MediaIo {
    /// Binds the worker's UDP socket and makes the one DTLS certificate every connection of the
    /// worker presents.
    pub fn bind(settings: MediaSettings, tcp_arrivals: Option<Receiver<TcpArrival>>) -> io::Result<Self> {
        let socket = UdpSocket::bind(settings.udp_bind)?;
        socket.set_nonblocking(true)?;
        udp::set_buffers(&socket, SOCKET_BUFFER);
        let local_udp = socket.local_addr()?;
        let ip = settings.announced.first().copied().unwrap_or(local_udp.ip());
        let tag_udp = SocketAddr::new(ip, local_udp.port());
        let tag_tcp = settings.tcp_port.map(|port| SocketAddr::new(ip, port));
        let crypto = rtc::crypto::default_provider().map_err(|e| io::Error::other(e.to_string()))?;
        let params = CertificateParams::new(vec!["encore".to_owned()]).map_err(|e| io::Error::other(e.to_string()))?;
        let certificate = RTCCertificate::generate(crypto.crypto(), SignatureScheme::EcdsaP256Sha256, params)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(MediaIo {
            settings,
            socket,
            local_udp,
            tag_udp,
            tag_tcp,
            crypto,
            certificate,
            conns: SlotMap::with_key(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            tcp_arrivals,
            tcp: Vec::new(),
            events: VecDeque::new(),
            tx: Vec::with_capacity(1024),
            buffers: (0..RECV_BATCH).map(|_| vec![0u8; RECV_BUFFER]).collect(),
            received: Vec::with_capacity(RECV_BATCH),
            stats: MediaStats::default(),
        })
    }

    /// The worker's UDP port.
    pub fn udp_addr(&self) -> SocketAddr {
        self.local_udp
    }

    pub fn stats(&self) -> MediaStats {
        self.stats
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// ICE-lite, fixed credentials, the worker's certificate, host candidates.
    fn new_pc(&mut self, now: Instant, leg: Leg) -> Result<(RTCPeerConnection, String, String), MediaError> {
        let ufrag = format!("{:02x}{}", self.settings.worker % 256, random_string(&*self.crypto, 8)?);
        let pwd = random_string(&*self.crypto, 24)?;
        let setting_engine = SettingEngineBuilder::new()
            .with_lite(true)
            .with_ice_credentials(ufrag.clone(), pwd.clone())
            // The lite server needs no client candidates (it learns them from checks); mDNS
            // queries for `.local` ones would go out of this socket.
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_ice_timeouts(
                Some(self.settings.ice_disconnected),
                Some(self.settings.ice_failed),
                Some(self.settings.ice_keepalive),
            )
            .with_crypto_provider(self.crypto.clone())
            .build();
        let (media_engine, registry) = m::server_engine_and_registry().map_err(rtc_error("media engine"))?;
        // A listener leg's packets never pass rtc's handler chain (listener_leg.rs): the same
        // engine, so the same SDP, and no interceptors.
        let registry = match leg {
            Leg::Publish => registry,
            Leg::Listen { .. } => rtc::interceptor::Registry::new(),
        };
        let configuration = RTCConfigurationBuilder::new().with_certificates(vec![self.certificate.clone()]).build();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_media_engine(media_engine)
            .with_setting_engine(setting_engine)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(rtc_error("peer connection"))?;
        // Candidates before the SDP is made, so the SDP carries them: no trickle from us.
        for ip in self.settings.announced.clone() {
            let udp = host_candidate("udp", SocketAddr::new(ip, self.local_udp.port()), None)?;
            pc.add_local_candidate(udp).map_err(rtc_error("a UDP candidate"))?;
            if let Some(port) = self.settings.tcp_port {
                let tcp = host_candidate("tcp", SocketAddr::new(ip, port), Some(TcpType::Passive))?;
                pc.add_local_candidate(tcp).map_err(rtc_error("a TCP candidate"))?;
            }
        }
        // The end of gathering: the SDP says a=end-of-candidates.
        pc.add_local_candidate(RTCIceCandidateInit::default()).map_err(rtc_error("the end of candidates"))?;
        Ok((pc, ufrag, pwd))
    }

    fn insert(
        &mut self,
        pc: RTCPeerConnection,
        ufrag: String,
        pwd: String,
        owner: Owner,
        leg: Leg,
        now: Instant,
    ) -> ConnKey {
        let key = self.conns.insert(Conn {
            pc,
            owner,
            leg,
            listener: None,
            early_dtls: Vec::new(),
            tcp_peer: None,
            ufrag: ufrag.clone(),
            pwd,
            created: now,
            deadline: None,
            dirty: false,
            connected: false,
            dead: false,
            failed: false,
            answered: matches!(leg, Leg::Publish),
            metric: crate::metrics::TransportMetric::new(match leg {
                Leg::Publish => crate::protocol::Side::Send,
                Leg::Listen { .. } => crate::protocol::Side::Recv,
            }),
            offered: [None, None],
            out: [None, None],
            tracks: HashMap::new(),
            addrs: Vec::new(),
            nominated: None,
            latest: None,
            seen: Vec::new(),
            rtc_peer: None,
            pending_checks: VecDeque::new(),
        });
        self.by_ufrag.insert(ufrag, key);
        self.touch(key);
        // The connect deadline, whatever rtc asks for.
        self.timers.push(Reverse((now + self.settings.connect_timeout, key)));
        key
    }

    /// A publisher's send transport: answers its offer (one audio m-line, at most one video).
    pub fn accept_offer(&mut self, now: Instant, owner: Owner, offer: &str) -> Result<(ConnKey, String), MediaError> {
        let description = RTCSessionDescription::offer(offer.to_owned()).map_err(MediaError::BadSdp)?;
        let (mut pc, ufrag, pwd) = self.new_pc(now, Leg::Publish)?;
        pc.set_remote_description(now, description).map_err(MediaError::BadSdp)?;
        // The protocol allows one audio m-line and at most one video: more would register
        // tracks nobody asked for.
        let lines = |kind: &str| offer.lines().filter(|l| l.starts_with(&format!("m={kind} "))).count();
        let (audio, video) = (lines("audio"), lines("video"));
        if audio > 1 || video > 1 {
            let _ = pc.close();
            return Err(MediaError::TooManyTracks { audio, video });
        }
        let answer = pc.create_answer(None).map_err(rtc_error("creating the answer"))?;
        pc.set_local_description(now, answer.clone()).map_err(rtc_error("setting the answer"))?;
        let key = self.insert(pc, ufrag, pwd, owner, Leg::Publish, now);
        Ok((key, answer.sdp))
    }

    /// A listener's receive transport: offers one sendonly Opus track (and one VP8 track) with
    /// the SSRCs given.
    pub fn offer_listener(
        &mut self,
        now: Instant,
        owner: Owner,
        audio_ssrc: u32,
        video_ssrc: Option<u32>,
    ) -> Result<(ConnKey, String), MediaError> {
        let leg = Leg::Listen { video: video_ssrc.is_some() };
        let (mut pc, ufrag, pwd) = self.new_pc(now, leg)?;
        for (kind, ssrc) in [(RtpCodecKind::Audio, Some(audio_ssrc)), (RtpCodecKind::Video, video_ssrc)] {
            let Some(ssrc) = ssrc else { continue };
            let codec = if kind == RtpCodecKind::Audio { m::opus_codec() } else { m::vp8_codec() };
            let track = MediaStreamTrack::new(
                "encore".to_owned(),
                format!("encore-{kind}"),
                format!("encore personal stream ({kind})"),
                kind,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
                    codec,
                    ..Default::default()
                }],
            );
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, ..Default::default() };
            pc.add_transceiver_from_track(track, Some(init)).map_err(rtc_error("adding a track"))?;
        }
        let offer = pc.create_offer(None).map_err(rtc_error("creating the offer"))?;
        pc.set_local_description(now, offer.clone()).map_err(rtc_error("setting the offer"))?;
        let key = self.insert(pc, ufrag, pwd, owner, leg, now);
        if let Some(conn) = self.conns.get_mut(key) {
            conn.offered = [Some(audio_ssrc), video_ssrc];
        }
        Ok((key, offer.sdp))
    }

    /// The listener's answer: the legs' payload types and extension ids are fixed from here on.
    pub fn accept_answer(&mut self, now: Instant, key: ConnKey, answer: &str) -> Result<(), MediaError> {
        let conn = self.conns.get_mut(key).ok_or(MediaError::Gone)?;
        if conn.answered {
            return Err(MediaError::AnsweredTwice);
        }
        let dtls = listener_leg::answer_dtls(answer)?;
        tracing::debug!(conn = ?key, role = ?dtls.role, "a listener's answer");
        let description = RTCSessionDescription::answer(dtls.answer_for_rtc.clone()).map_err(MediaError::BadSdp)?;
        conn.pc.set_remote_description(now, description).map_err(MediaError::BadSdp)?;
        conn.answered = true;
        let listener =
            ListenerLeg::new(self.crypto.clone(), &self.certificate, &dtls, now).map_err(MediaError::Dtls)?;
        conn.listener = Some(listener);
        let transceivers: Vec<_> = conn.pc.get_transceivers().collect();
        let senders: Vec<_> = transceivers.into_iter().filter_map(|id| conn.pc.rtp_transceiver(id)?.sender()).collect();
        for sender in senders {
            let Some(mut sender) = conn.pc.rtp_sender(sender) else { continue };
            let media = kind_of(sender.track().kind());
            let parameters = sender.get_parameters();
            let Some(ssrc) = conn.offered[media as usize] else { continue };
            let Some((payload_type, clock_rate)) =
                parameters.rtp_parameters.codecs.first().map(|c| (c.payload_type, c.rtp_codec.clock_rate))
            else {
                continue;
            };
            let level_id = parameters
                .rtp_parameters
                .header_extensions
                .iter()
                .find(|e| e.uri == m::AUDIO_LEVEL_URI)
                .and_then(|e| u8::try_from(e.id).ok());
            conn.out[media as usize] = Some(OutLeg { ssrc, payload_type, clock_rate, level_id });
        }
        // DTLS that came before the answer.
        for (datagram, tcp_peer) in std::mem::take(&mut conn.early_dtls) {
            let protocol = if tcp_peer.is_some() { TransportProtocol::TCP } else { TransportProtocol::UDP };
            listener_input(key, conn, now, &datagram, protocol, tcp_peer, &mut self.events, &mut self.stats);
        }
        self.touch(key);
        Ok(())
    }

    /// Queues one RTP packet to a listener; it goes out at the next flush, with the others of
    /// the tick. False (and counted) when the leg cannot take it yet.
    #[allow(clippy::too_many_arguments)]
    pub fn write_rtp(
        &mut self,
        now: Instant,
        key: ConnKey,
        media: MediaKind,
        seq: u16,
        ts: u32,
        marker: bool,
        level: Option<u8>,
        payload: Bytes,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            self.stats.rtp_out_refused += 1;
            return false;
        };
        // rtc drops RTP written before DTLS is up, and says Ok: never write it then.
        let Some(leg) = conn.leg_of(media).filter(|_| conn.connected && !conn.dead) else {
            self.stats.rtp_out_refused += 1;
            return false;
        };
        let path = conn.path(now);
        let Some(listener) = conn.listener.as_mut() else {
            self.stats.rtp_out_refused += 1;
            return false;
        };
        let level = leg.level_id.zip(level).map(|(id, level)| (id, m::audio_level_byte(level, false)));
        let index = media as usize;
        let Some(datagram) =
            listener.rtp(now, index, leg.clock_rate, leg.payload_type, leg.ssrc, seq, ts, marker, level, &payload)
        else {
            self.stats.rtp_out_refused += 1;
            return false;
        };
        transmit(key, path, datagram, &mut self.tx, &mut self.tcp, &mut self.stats);
        self.stats.rtp_out += 1;
        // Nothing to drain after a packet: the connection is touched only when its first packet
        // set a sender report due before anything else it waits for.
        let report = listener.report_due();
        if report.is_some_and(|at| conn.deadline.is_none_or(|deadline| at < deadline)) {
            self.touch(key);
        }
        true
    }

    /// A PLI to a publisher's track.
    pub fn request_keyframe(&mut self, now: Instant, key: ConnKey, media_ssrc: u32) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let Some(receiver) = conn.tracks.values().find(|t| t.ssrc == media_ssrc).map(|t| t.receiver) else { return };
        let pli =
            rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication { sender_ssrc: 0, media_ssrc };
        if let Some(mut receiver) = conn.pc.rtp_receiver(receiver) {
            let _ = receiver.write_rtcp(now, vec![Box::new(pli)]);
        }
        self.touch(key);
    }

    /// Closes a connection: DTLS close_notify goes out at the next flush, then its routes go.
    pub fn close(&mut self, now: Instant, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(key)
            && !conn.dead
        {
            if let Some(listener) = conn.listener.as_mut() {
                listener.close(now);
            }
            let _ = conn.pc.close();
            conn.dead = true;
            self.touch(key);
        }
    }

    pub fn poll_event(&mut self) -> Option<MediaEvent> {
        self.events.pop_front()
    }

    /// The earliest time a connection needs its timeout handled.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            match self.conns.get(key) {
                // A stale entry (the connection is gone): forget it.
                None => {
                    self.timers.pop();
                }
                Some(_) => return Some(at),
            }
        }
        None
    }

    /// Waits until a datagram or a TCP frame may be read, or `timeout` passes.
    pub fn wait(&self, timeout: Duration, wake: std::os::fd::RawFd) -> io::Result<()> {
        let mut fds = Vec::with_capacity(2 + self.tcp.len());
        fds.push(self.socket.as_raw_fd());
        fds.push(wake);
        fds.extend(self.tcp.iter().map(|t| t.stream.as_raw_fd()));
        udp::wait_any(&fds, timeout)
    }

    /// Reads everything waiting (UDP and TCP) and feeds it to its connections, then fires the
    /// connections' due timeouts. Events are ready after [`MediaIo::collect`].
    pub fn poll_input(&mut self, now: Instant) -> io::Result<()> {
        self.read_udp(now)?;
        self.read_tcp(now);
        self.handle_timeouts(now);
        Ok(())
    }

    /// Marks a connection for draining at the next collect.
    fn touch(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(key)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(key);
        }
    }

    fn read_udp(&mut self, now: Instant) -> io::Result<()> {
        // A few batches per turn at most, so a flood cannot starve the ticks.
        for _ in 0..16 {
            let mut buffers = std::mem::take(&mut self.buffers);
            let mut received = std::mem::take(&mut self.received);
            let result = udp::recv_batch(&self.socket, &mut buffers, &mut received);
            for datagram in &received {
                if datagram.truncated {
                    self.stats.drop_truncated += 1;
                    continue;
                }
                let data = &buffers[datagram.index][..datagram.len];
                self.handle_datagram(now, datagram.from, data, TransportProtocol::UDP, None);
            }
            let full = received.len() == buffers.len();
            self.buffers = buffers;
            self.received = received;
            result?;
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// Routes one datagram (or one RFC 4571 frame of a bound stream) and feeds it in.
    fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        protocol: TransportProtocol,
        bound: Option<ConnKey>,
    ) -> Option<ConnKey> {
        self.stats.rx_datagrams += 1;
        self.stats.rx_bytes += data.len() as u64;
        let key = match bound {
            Some(key) => key,
            None => self.route(now, from, data, protocol)?,
        };
        let local = match protocol {
            TransportProtocol::TCP => self.tag_tcp?,
            _ => self.tag_udp,
        };
        let conn = self.conns.get_mut(key)?;
        let tcp_from = (protocol == TransportProtocol::TCP).then_some(from);
        if stun::is_stun(data) && stun::class(data) == 0 && stun::has_use_candidate(data) {
            conn.tcp_peer = tcp_from;
        }
        if matches!(conn.leg, Leg::Listen { .. }) && !stun::is_stun(data) {
            // Not rtc's: the worker runs this leg's DTLS and SRTCP.
            listener_input(key, conn, now, data, protocol, tcp_from, &mut self.events, &mut self.stats);
            self.touch(key);
            return Some(key);
        }
        let peer = match protocol {
            TransportProtocol::UDP => conn.rtc_peer.unwrap_or(from),
            _ => from,
        };
        let message = TaggedBytesMut {
            now,
            transport: TransportContext { local_addr: local, peer_addr: peer, ecn: None, transport_protocol: protocol },
            message: BytesMut::from(data),
        };
        if conn.pc.handle_read(message).is_err() {
            // rtc refused it (a malformed DTLS record, an SRTP packet that fails its tag): its
            // own counters know why; ours, that it happened.
            self.stats.drop_rtc_error += 1;
        }
        self.touch(key);
        Some(key)
    }

    /// Which connection a datagram belongs to, if any.
    fn route(&mut self, now: Instant, from: SocketAddr, data: &[u8], protocol: TransportProtocol) -> Option<ConnKey> {
        if stun::is_stun(data) && stun::class(data) == 0 {
            // A check: by its USERNAME, and only when it proves it knows the password.
            let Some(ufrag) = stun::local_ufrag(data) else {
                self.stats.drop_stun_no_username += 1;
                return None;
            };
            let Some(&key) = self.by_ufrag.get(ufrag) else {
                self.stats.drop_stun_unknown_ufrag += 1;
                return None;
            };
            let conn = self.conns.get_mut(key)?;
            if conn.dead || !stun::integrity_ok(data, &conn.pwd, self.crypto.crypto()) {
                self.stats.drop_stun_bad_integrity += 1;
                return None;
            }
            if protocol == TransportProtocol::UDP {
                conn.latest = Some(from);
                if stun::has_use_candidate(data) {
                    conn.nominated = Some(from);
                }
                conn.heard(from, now);
                if conn.pending_checks.len() >= PENDING_CHECKS {
                    conn.pending_checks.pop_front();
                }
                conn.pending_checks.push_back((stun::transaction_id(data), from));
                if !conn.addrs.contains(&from) {
                    conn.addrs.push(from);
                }
                if let Some(old) = self.by_addr.insert(from, key)
                    && old != key
                    && let Some(other) = self.conns.get_mut(old)
                {
                    other.addrs.retain(|a| *a != from);
                }
            }
            return Some(key);
        }
        if protocol == TransportProtocol::TCP {
            // A TCP stream is bound by its first check (see bind_tcp): never here.
            return None;
        }
        match self.by_addr.get(&from).copied() {
            Some(key) => {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.heard(from, now);
                }
                Some(key)
            }
            None => {
                self.stats.drop_unknown_source += 1;
                None
            }
        }
    }

    fn handle_timeouts(&mut self, now: Instant) {
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(key) else { continue };
            if !conn.connected && !conn.dead && now >= conn.created + self.settings.connect_timeout {
                // ICE and DTLS did not come up in time (a lost handshake datagram can stall
                // rtc's DTLS for ever): give up, and let the client make the transport again.
                self.stats.connect_timeouts += 1;
                let _ = conn.pc.close();
                conn.dead = true;
                conn.failed = true;
            } else if conn.deadline.is_some_and(|d| d <= now) {
                // rtc stops at the first handler that fails; the others' timers still run at the
                // next deadline.
                if conn.pc.poll_timeout().is_some_and(|d| d <= now) {
                    let _ = conn.pc.handle_timeout(now);
                }
                if let Some(listener) = conn.listener.as_mut()
                    && listener.handle_timeout(now).is_err()
                {
                    self.stats.drop_dtls += 1;
                }
            }
            self.touch(key);
        }
    }

    /// Drains every connection touched since the last collect: its events, inbound media and
    /// RTCP (as [`MediaEvent`]s), and outbound datagrams (queued for [`MediaIo::flush`]); then
    /// refreshes its timer and forgets the dead.
    pub fn collect(&mut self, now: Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.iter().copied() {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            conn.dirty = false;
            drain(key, conn, now, &mut self.events, &mut self.tx, &mut self.tcp, &mut self.stats);
            let listener = conn.listener.as_ref().and_then(ListenerLeg::poll_timeout);
            let deadline = [conn.pc.poll_timeout(), listener].into_iter().flatten().min();
            if deadline != conn.deadline
                && let Some(at) = deadline
            {
                self.timers.push(Reverse((at, key)));
            }
            conn.deadline = deadline;
            if conn.dead {
                self.remove(key);
            }
        }
        dirty.clear();
        // Draining may have touched others (none today); keep what came in meanwhile.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(key) else { return };
        self.by_ufrag.remove(&conn.ufrag);
        for addr in &conn.addrs {
            if self.by_addr.get(addr) == Some(&key) {
                self.by_addr.remove(addr);
            }
        }
        self.tcp.retain(|t| t.conn != key);
        self.events.push_back(MediaEvent::Closed { conn: key, owner: conn.owner, failed: conn.failed });
    }

    /// Sends what [`MediaIo::collect`] queued: one `sendmmsg` for the UDP datagrams (a full send
    /// buffer drops the datagram it stopped at, counted; the worker never blocks on it).
    pub fn flush(&mut self) {
        let mut at = 0;
        while at < self.tx.len() {
            self.stats.tx_syscalls += 1;
            match udp::send_batch(&self.socket, &self.tx[at..]) {
                Ok(0) | Err(_) => {
                    self.stats.tx_errors += 1;
                    at += 1;
                }
                Ok(n) => {
                    for (_, bytes) in &self.tx[at..at + n] {
                        self.stats.tx_bytes += bytes.len() as u64;
                    }
                    self.stats.tx_datagrams += n as u64;
                    at += n;
                }
            }
        }
        self.tx.clear();
        for stream in &mut self.tcp {
            flush_tcp(stream);
        }
    }

    /// Takes the streams the acceptor handed over, and reads every bound stream's frames in.
    fn read_tcp(&mut self, now: Instant) {
        if let Some(arrivals) = &self.tcp_arrivals {
            let arrived: Vec<TcpArrival> = arrivals.try_iter().collect();
            for arrival in arrived {
                self.bind_tcp(now, arrival);
            }
        }
        if self.tcp.is_empty() {
            return;
        }
        let mut frames: Vec<(ConnKey, SocketAddr, Vec<u8>)> = Vec::new();
        let mut buffer = std::mem::take(&mut self.buffers[0]);
        self.tcp.retain_mut(|tcp| {
            loop {
                match tcp.stream.read(&mut buffer) {
                    Ok(0) => break false,
                    Ok(n) => {
                        tcp.decoder.extend_from_slice(&buffer[..n]);
                        while let Some(frame) = tcp.decoder.next_packet() {
                            frames.push((tcp.conn, tcp.peer, frame));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break false,
                }
            }
        });
        self.buffers[0] = buffer;
        for (key, peer, frame) in frames {
            self.handle_datagram(now, peer, &frame, TransportProtocol::TCP, Some(key));
        }
    }

    /// Binds a new ICE-TCP stream to the connection its first check names, or drops it.
    fn bind_tcp(&mut self, now: Instant, arrival: TcpArrival) {
        let TcpArrival { stream, peer, first_frame } = arrival;
        if self.tcp.len() >= MAX_TCP_STREAMS || stream.set_nonblocking(true).is_err() {
            self.stats.drop_tcp_unbound += 1;
            return;
        }
        let _ = stream.set_nodelay(true);
        let Some(key) = self.route(now, peer, &first_frame, TransportProtocol::TCP) else {
            self.stats.drop_tcp_unbound += 1;
            return;
        };
        self.tcp.push(TcpConn { stream, peer, decoder: TcpFrameDecoder::new(), conn: key, out: Vec::new() });
        self.handle_datagram(now, peer, &first_frame, TransportProtocol::TCP, Some(key));
    }
}

/// Writes what a stream can take now; never blocks.
fn flush_tcp(tcp: &mut TcpConn) {
    while !tcp.out.is_empty() {
        match tcp.stream.write(&tcp.out) {
            Ok(0) => break,
            Ok(n) => {
                tcp.out.drain(..n);
            }
            Err(_) => break,
        }
    }
}

fn kind_of(kind: RtpCodecKind) -> MediaKind {
    if kind == RtpCodecKind::Video { MediaKind::Video } else { MediaKind::Audio }
}

/// One connection's queues: events and inbound messages become [`MediaEvent`]s, outbound
/// datagrams go to `tx` (UDP) or their stream (TCP).
fn drain(
    key: ConnKey,
    conn: &mut Conn,
    now: Instant,
    events: &mut VecDeque<MediaEvent>,
    tx: &mut Vec<(SocketAddr, BytesMut)>,
    tcp: &mut [TcpConn],
    stats: &mut MediaStats,
) {
    let owner = conn.owner;
    // Twice: draining reads and writes can raise events (a state change after a handshake).
    for _ in 0..2 {
        while let Some(event) = conn.pc.poll_event() {
            match event {
                RTCPeerConnectionEvent::OnIceConnectionStateChangeEvent(state) => {
                    if let Some(listener) = conn.listener.as_mut() {
                        listener.ice_connected =
                            matches!(state, RTCIceConnectionState::Connected | RTCIceConnectionState::Completed)
                                || (listener.ice_connected && state == RTCIceConnectionState::Disconnected);
                    }
                    if state == RTCIceConnectionState::Failed {
                        conn.dead = true;
                        conn.failed = true;
                    }
                }
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                    // A listener leg is connected when its own DTLS is (below); rtc, which never
                    // sees that DTLS, says `connecting` until ICE fails or the leg closes.
                    let own_dtls = matches!(conn.leg, Leg::Listen { .. });
                    if !own_dtls || matches!(state, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) {
                        conn.metric.connection_state(state);
                    }
                    match state {
                        RTCPeerConnectionState::Connected if !conn.connected => {
                            conn.connected = true;
                            events.push_back(MediaEvent::Connected { conn: key, owner });
                        }
                        // Disconnected is transient (no check for a while): keep going.
                        RTCPeerConnectionState::Failed => {
                            conn.dead = true;
                            conn.failed = true;
                        }
                        RTCPeerConnectionState::Closed => conn.dead = true,
                        _ => {}
                    }
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let Some(mut receiver) = conn.pc.rtp_receiver(init.receiver_id) else { continue };
                    let media = kind_of(receiver.track().kind());
                    let parameters = receiver.get_parameters();
                    let level_id = parameters
                        .rtp_parameters
                        .header_extensions
                        .iter()
                        .find(|e| e.uri == m::AUDIO_LEVEL_URI)
                        .and_then(|e| u8::try_from(e.id).ok());
                    let (codec, clock_rate) = match parameters.rtp_parameters.codecs.first() {
                        Some(c) => (
                            c.rtp_codec.mime_type.rsplit('/').next().unwrap_or("").to_ascii_lowercase(),
                            c.rtp_codec.clock_rate,
                        ),
                        None => (String::new(), if media == MediaKind::Audio { 48_000 } else { 90_000 }),
                    };
                    conn.tracks.insert(
                        init.track_id.clone(),
                        InTrack { receiver: init.receiver_id, media, ssrc: init.ssrc, level_id },
                    );
                    events.push_back(MediaEvent::TrackOpen {
                        conn: key,
                        owner,
                        media,
                        codec,
                        clock_rate,
                        ssrc: init.ssrc,
                    });
                }
                _ => {}
            }
        }
        // A publisher's RTCP (its sender reports) is rtc's own business; a listener's is read by
        // `listener_input`, never here: only RTP is taken.
        while let Some(message) = conn.pc.poll_read() {
            if let RTCMessage::RtpPacket(track_id, packet) = message.message {
                let Some(track) = conn.tracks.get(&track_id) else { continue };
                stats.rtp_in += 1;
                let level = track.level_id.and_then(|id| m::audio_level(&packet.header, id));
                events.push_back(MediaEvent::Rtp {
                    conn: key,
                    owner,
                    media: track.media,
                    ssrc: packet.header.ssrc,
                    at: message.now,
                    packet,
                    level,
                });
            }
        }
        while let Some(out) = conn.pc.poll_write() {
            if conn.listener.is_some() && !stun::is_stun(&out.message) {
                // rtc's own DTLS on a listener leg (it waits as a server, so never more than a
                // close_notify): the listener talks to ours.
                continue;
            }
            match out.transport.transport_protocol {
                TransportProtocol::UDP => {
                    let mut to = out.transport.peer_addr;
                    if stun::is_stun(&out.message) {
                        if stun::class(&out.message) >= 2 {
                            // A response: back to the source of its request.
                            let id = stun::transaction_id(&out.message);
                            if let Some(at) = conn.pending_checks.iter().position(|(t, _)| *t == id)
                                && let Some((_, from)) = conn.pending_checks.remove(at)
                            {
                                to = from;
                            }
                        } else if let Some(destination) = conn.destination(now) {
                            to = destination;
                        }
                    } else {
                        conn.rtc_peer.get_or_insert(out.transport.peer_addr);
                        if let Some(destination) = conn.destination(now)
                            && destination != to
                        {
                            stats.tx_redirected += 1;
                            to = destination;
                        }
                    }
                    tx.push((to, out.message));
                }
                TransportProtocol::TCP => {
                    match tcp.iter_mut().find(|t| t.conn == key && t.peer == out.transport.peer_addr) {
                        Some(stream) if stream.out.len() < MAX_TCP_QUEUE => {
                            stream.out.extend_from_slice(&frame_packet(&out.message));
                        }
                        // A stream that cannot keep up loses media, never blocks the worker.
                        Some(_) => stats.drop_tcp_overflow += 1,
                        None => stats.tx_errors += 1,
                    }
                }
                _ => stats.tx_errors += 1,
            }
        }
        listener_output(key, conn, now, events, tx, tcp, stats);
    }
}

/// What a listener leg's own DTLS and reports have to say: its handshake's datagrams (once the
/// leg has somewhere to send them), `Connected` when ICE and DTLS both are, its sender reports.
#[allow(clippy::too_many_arguments)]
fn listener_output(
    key: ConnKey,
    conn: &mut Conn,
    now: Instant,
    events: &mut VecDeque<MediaEvent>,
    tx: &mut Vec<(SocketAddr, BytesMut)>,
    tcp: &mut [TcpConn],
    stats: &mut MediaStats,
) {
    let path = conn.path(now);
    let Some(listener) = conn.listener.as_mut() else { return };
    if path.is_some() {
        let mut datagrams = Vec::new();
        while let Some(datagram) = listener.poll_dtls() {
            datagrams.push(datagram);
        }
        if let Some(reports) = listener.reports(now) {
            datagrams.push(reports);
        }
        let connected = listener.is_connected();
        for datagram in datagrams {
            transmit(key, path, datagram, tx, tcp, stats);
        }
        if connected && !conn.connected && !conn.dead {
            conn.connected = true;
            conn.metric.connection_state(RTCPeerConnectionState::Connected);
            events.push_back(MediaEvent::Connected { conn: key, owner: conn.owner });
        }
    }
}

/// A datagram (or ICE-TCP frame) of a listener leg that is not STUN: DTLS to the leg's own
/// association (kept for later if the answer has not come), SRTCP read into feedback events.
#[allow(clippy::too_many_arguments)]
fn listener_input(
    key: ConnKey,
    conn: &mut Conn,
    now: Instant,
    data: &[u8],
    protocol: TransportProtocol,
    tcp_from: Option<SocketAddr>,
    events: &mut VecDeque<MediaEvent>,
    stats: &mut MediaStats,
) {
    let Some(&first) = data.first() else {
        stats.drop_truncated += 1;
        return;
    };
    match first {
        // RFC 7983: DTLS.
        20..=63 => {
            // The path DTLS takes is the selected one: our datagrams follow it.
            conn.tcp_peer = if protocol == TransportProtocol::TCP { tcp_from } else { None };
            let Some(listener) = conn.listener.as_mut() else {
                if conn.early_dtls.len() < EARLY_DTLS {
                    conn.early_dtls.push((data.to_vec(), tcp_from));
                } else {
                    stats.drop_dtls += 1;
                }
                return;
            };
            match listener.handle_dtls(now, data) {
                Ok(()) => {}
                Err(dtls_srtp::DtlsSrtpError::Closed) => conn.dead = true,
                // A bad record or a failed handshake: counted; a handshake that never completes
                // ends at the connect timeout, and the client is told.
                Err(_) => stats.drop_dtls += 1,
            }
        }
        // RFC 7983: RTP and RTCP.
        128..=191 => {
            let Some(listener) = conn.listener.as_mut() else {
                stats.drop_srtcp += 1;
                return;
            };
            match listener.read_rtcp(now, data) {
                Ok(packets) => {
                    for packet in &packets {
                        let Some(feedback) = m::feedback(packet.as_ref()) else { continue };
                        let ssrc = match &feedback {
                            RtcpFeedback::Nack { media_ssrc, .. } | RtcpFeedback::KeyframeRequest { media_ssrc } => {
                                *media_ssrc
                            }
                        };
                        // Which of our streams it is about.
                        let media = [MediaKind::Audio, MediaKind::Video]
                            .into_iter()
                            .find(|media| conn.out[*media as usize].is_some_and(|leg| leg.ssrc == ssrc));
                        if let Some(media) = media {
                            events.push_back(MediaEvent::Feedback { conn: key, owner: conn.owner, media, feedback });
                        }
                    }
                }
                Err(LegDrop::Srtcp) => stats.drop_srtcp += 1,
                Err(LegDrop::Rtp) => stats.drop_listener_rtp += 1,
            }
        }
        _ => stats.drop_rtc_error += 1,
    }
}

/// One datagram of a connection's own (a listener leg's DTLS, SRTP, SRTCP): on its ICE-TCP
/// stream when that is its path, else to its UDP destination, in the tick's batch.
fn transmit(
    key: ConnKey,
    path: Option<Path>,
    datagram: BytesMut,
    tx: &mut Vec<(SocketAddr, BytesMut)>,
    tcp: &mut [TcpConn],
    stats: &mut MediaStats,
) {
    match path {
        Some(Path::Tcp(peer)) => match tcp.iter_mut().find(|t| t.conn == key && t.peer == peer) {
            Some(stream) if stream.out.len() < MAX_TCP_QUEUE => stream.out.extend_from_slice(&frame_packet(&datagram)),
            // A stream that cannot keep up loses media, never blocks the worker.
            Some(_) => stats.drop_tcp_overflow += 1,
            None => stats.tx_errors += 1,
        },
        Some(Path::Udp(to)) => tx.push((to, datagram)),
        None => stats.tx_errors += 1,
    }
}

fn host_candidate(
    network: &str,
    addr: SocketAddr,
    tcp_type: Option<TcpType>,
) -> Result<RTCIceCandidateInit, MediaError> {
    let config = CandidateHostConfig {
        base_config: CandidateConfig {
            network: network.to_owned(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        tcp_type: tcp_type.unwrap_or_default(),
    };
    let candidate = config.new_candidate_host().map_err(rtc_error("a host candidate"))?;
    RTCIceCandidate::from(&candidate).to_json().map_err(rtc_error("a host candidate"))
}
