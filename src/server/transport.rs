//! WebRTC transports on the `webrtc` crate: per client a send transport (the client offers,
//! the server answers and receives its tracks) and a receive transport (the server offers one
//! audio track, and one video track when asked, carrying the listener's personal stream).
//!
//! Received RTP becomes engine inputs (with the RFC 6464 level and VP8 key-frame starts read
//! here); the engine's packets for a listener are written as they come, each with the header the
//! engine rewrote. A listener's NACKs and PLIs go to the engine (it answers NACKs from its buffer;
//! there is no NACK responder in the interceptor chain), and the engine's key-frame requests go
//! to publishers as PLIs. Every connection is closed explicitly: a dropped one leaks its sockets.

use std::net::{IpAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::shared::marshal::MarshalSize;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit,
    RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

use encore_systems::components::ids::{MediaKind, Name};
use encore_systems::components::input::{Input, RtpIn};
use encore_systems::components::output::SendPacket;

use super::rooms::{PEER_MEDIA, PublisherControl, RoomCommand, RoomLink};
use crate::config::MediaSection;
use crate::media::{self, RtcpFeedback};
use crate::metrics::{self, TransportMetric};
use crate::protocol::{ErrorCode, IceCandidate, Side};

/// Why a transport could not be made or take what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bad SDP: {0}")]
    BadSdp(#[source] webrtc::error::Error),
    #[error("bad ICE candidate: {0}")]
    BadCandidate(#[source] webrtc::error::Error),
    #[error("bad ICE candidate: {0}")]
    CandidateRefused(&'static str),
    #[error("this transport has its answer already")]
    AnsweredTwice,
    #[error("WebRTC, {during}: {source}")]
    WebRtc { during: &'static str, source: webrtc::error::Error },
    #[error("no media port free in the configured range")]
    NoPort,
}

impl TransportError {
    /// The protocol's error code for it: the client's fault, a state conflict, the server
    /// out of ports, or a failure of ours.
    pub fn code(&self) -> ErrorCode {
        match self {
            TransportError::BadSdp(_) | TransportError::BadCandidate(_) | TransportError::CandidateRefused(_) => {
                ErrorCode::BadRequest
            }
            TransportError::AnsweredTwice => ErrorCode::Conflict,
            TransportError::NoPort => ErrorCode::Unavailable,
            TransportError::WebRtc { .. } => ErrorCode::Internal,
        }
    }
}

fn webrtc_error(during: &'static str) -> impl FnOnce(webrtc::error::Error) -> TransportError {
    move |source| TransportError::WebRtc { during, source }
}

/// What a transport tells its signaling session.
#[derive(Debug, Clone)]
pub enum TransportEvent {
    /// A local ICE candidate to trickle to the client (`None`: gathering is complete).
    Candidate {
        side: Side,
        candidate: Option<IceCandidate>,
    },
    Connected {
        side: Side,
    },
    Failed {
        side: Side,
    },
}

/// How transports bind and announce their media sockets.
#[derive(Debug)]
pub struct TransportSettings {
    ips: Vec<IpAddr>,
    ports: Option<(u16, u16)>,
    next_port: AtomicU16,
    public_ip: Option<IpAddr>,
}

impl TransportSettings {
    pub fn new(media: &MediaSection) -> Self {
        let ports = (media.udp_port_min != 0).then_some((media.udp_port_min, media.udp_port_max));
        TransportSettings {
            ips: media.bind_ips.clone(),
            ports,
            next_port: AtomicU16::new(media.udp_port_min),
            public_ip: media.public_ip,
        }
    }

    /// Addresses for one connection's sockets: each configured address (a wildcard expands to
    /// the machine's interfaces) plus loopback, on a port of the range when one is set.
    fn addrs(&self) -> Result<Vec<String>, TransportError> {
        let mut ips = self.ips.clone();
        let loopback: IpAddr = "127.0.0.1".parse().expect("an address");
        if !ips.iter().any(|ip| ip.is_loopback()) {
            ips.push(loopback);
        }
        ips.into_iter()
            .map(|ip| {
                let port = match self.ports {
                    None => 0,
                    Some(range) => self.free_port(ip, range)?,
                };
                Ok(std::net::SocketAddr::new(ip, port).to_string())
            })
            .collect()
    }

    fn free_port(&self, ip: IpAddr, (min, max): (u16, u16)) -> Result<u16, TransportError> {
        let span = u32::from(max - min) + 1;
        for _ in 0..span {
            let port = self.next_port.fetch_add(1, Ordering::Relaxed);
            let port = if port < min || port > max { min } else { port };
            if port == max {
                self.next_port.store(min, Ordering::Relaxed);
            }
            // Probe, then release for the connection to bind: a small race, but the crate
            // offers no port-range setting of its own (0.21).
            if UdpSocket::bind((ip, port)).is_ok() {
                return Ok(port);
            }
        }
        Err(TransportError::NoPort)
    }
}

struct Handler {
    side: Side,
    events: mpsc::Sender<TransportEvent>,
    tracks: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
    state: watch::Sender<RTCPeerConnectionState>,
    public_ip: Option<IpAddr>,
    metric: TransportMetric,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let Ok(init) = event.candidate.to_json() else { return };
        let candidate = IceCandidate {
            candidate: media::announce_public_ip(&init.candidate, self.public_ip),
            sdp_mid: init.sdp_mid,
            sdp_mline_index: init.sdp_mline_index,
            username_fragment: init.username_fragment,
        };
        let _ = self.events.try_send(TransportEvent::Candidate { side: self.side, candidate: Some(candidate) });
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.events.try_send(TransportEvent::Candidate { side: self.side, candidate: None });
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
        self.metric.connection_state(state);
        let event = match state {
            RTCPeerConnectionState::Connected => TransportEvent::Connected { side: self.side },
            RTCPeerConnectionState::Failed => TransportEvent::Failed { side: self.side },
            _ => return,
        };
        let _ = self.events.try_send(event);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        // Runs on the connection's driver: hand over, never block here.
        if let Some(tracks) = &self.tracks {
            let _ = tracks.send(track);
        }
    }
}

struct Built {
    pc: Arc<dyn PeerConnection>,
    state: watch::Receiver<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
}

async fn build(
    settings: &TransportSettings,
    side: Side,
    events: mpsc::Sender<TransportEvent>,
) -> Result<Built, TransportError> {
    let (engine, registry) = media::server_engine_and_registry().map_err(webrtc_error("media engine"))?;
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (tracks_tx, tracks) = mpsc::unbounded_channel();
    let handler = Handler {
        side,
        events,
        tracks: (side == Side::Send).then_some(tracks_tx),
        state: state_tx,
        public_ip: settings.public_ip,
        metric: TransportMetric::new(side),
    };
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_setting_engine(media::setting_engine())
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(handler))
        .with_udp_addrs(settings.addrs()?)
        .build()
        .await
        .map_err(webrtc_error("peer connection"))?;
    Ok(Built { pc: Arc::new(pc), state, tracks })
}

/// A connection whose negotiation failed is closed before the error is returned: a dropped one
/// would leak its sockets.
async fn closed_on_error<T>(
    pc: &Arc<dyn PeerConnection>,
    result: Result<T, TransportError>,
) -> Result<T, TransportError> {
    if result.is_err() {
        let _ = pc.close().await;
    }
    result
}

/// A client's candidate for the connection: `None` at the end of gathering (or an empty
/// one, which browsers send to say the same).
fn candidate_init(candidate: Option<IceCandidate>) -> Result<Option<RTCIceCandidateInit>, TransportError> {
    let Some(candidate) = candidate.filter(|c| !c.candidate.is_empty()) else { return Ok(None) };
    if candidate.candidate.len() > 1024 {
        return Err(TransportError::CandidateRefused("longer than 1024 characters"));
    }
    Ok(Some(RTCIceCandidateInit {
        candidate: candidate.candidate,
        sdp_mid: candidate.sdp_mid,
        sdp_mline_index: candidate.sdp_mline_index,
        username_fragment: candidate.username_fragment,
        ..Default::default()
    }))
}

/// The client-to-server transport of a publisher.
pub struct SendTransport {
    pc: Arc<dyn PeerConnection>,
    paused: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    link: RoomLink,
}

impl SendTransport {
    /// Answers the client's offer and starts receiving its tracks into the room.
    pub async fn accept(
        settings: &TransportSettings,
        offer: &str,
        link: RoomLink,
        events: mpsc::Sender<TransportEvent>,
    ) -> Result<(Self, String), TransportError> {
        let offer = RTCSessionDescription::offer(offer.to_owned()).map_err(TransportError::BadSdp)?;
        let Built { pc, tracks, .. } = build(settings, Side::Send, events).await?;
        let answer = async {
            pc.set_remote_description(offer).await.map_err(TransportError::BadSdp)?;
            let answer = pc.create_answer(None).await.map_err(webrtc_error("creating the answer"))?;
            pc.set_local_description(answer.clone()).await.map_err(webrtc_error("setting the answer"))?;
            Ok::<_, TransportError>(answer.sdp)
        }
        .await;
        let answer = closed_on_error(&pc, answer).await?;
        let paused = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(receive_tracks(pc.clone(), tracks, link.clone(), paused.clone()));
        Ok((SendTransport { pc, paused, tasks: vec![task], link }, answer))
    }

    pub async fn add_candidate(&self, candidate: Option<IceCandidate>) -> Result<(), TransportError> {
        match candidate_init(candidate)? {
            Some(candidate) => self.pc.add_ice_candidate(candidate).await.map_err(TransportError::BadCandidate),
            None => Ok(()),
        }
    }

    /// Paused, the publisher's packets are not forwarded (the engine hears silence).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub async fn close(self) {
        self.link.command(RoomCommand::SetPublishing { peer: self.link.peer.clone(), publishing: false });
        // Closing ends every track's poll, so each track task unpublishes its track and ends;
        // the task waiting for new tracks never would (the connection's handler keeps its
        // channel open), so it is aborted.
        let _ = self.pc.close().await;
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

async fn receive_tracks(
    pc: Arc<dyn PeerConnection>,
    mut tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
    link: RoomLink,
    paused: Arc<AtomicBool>,
) {
    let mut count = [0u32; 2];
    let mut tasks = Vec::new();
    while let Some(track) = tracks.recv().await {
        let kind = track.kind().await;
        let media = if kind == RtpCodecKind::Video { MediaKind::Video } else { MediaKind::Audio };
        let n = &mut count[media as usize];
        *n += 1;
        let name = match *n {
            1 => format!("{}:{}", link.peer, media.as_str()),
            n => format!("{}:{}{n}", link.peer, media.as_str()),
        };
        tasks.push(tokio::spawn(receive_track(
            pc.clone(),
            track,
            media,
            Name::from(name),
            link.clone(),
            paused.clone(),
        )));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn receive_track(
    pc: Arc<dyn PeerConnection>,
    track: Arc<dyn TrackRemote>,
    media: MediaKind,
    name: Name,
    link: RoomLink,
    paused: Arc<AtomicBool>,
) {
    let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
    let codec = track.codec(ssrc).await;
    let (codec_name, clock_rate) = match &codec {
        Some(codec) => (codec.mime_type.rsplit('/').next().unwrap_or("").to_ascii_lowercase(), codec.clock_rate),
        None => (String::new(), if media == MediaKind::Audio { 48_000 } else { 90_000 }),
    };
    let mut level_id = None;
    let mut published = false;
    let (control_tx, mut control) = mpsc::channel(8);
    let pli_track = track.clone();
    let pli = tokio::spawn(async move {
        while let Some(PublisherControl::KeyframeRequest) = control.recv().await {
            if pli_track.write_rtcp(vec![media::picture_loss(ssrc)]).await.is_err() {
                break;
            }
        }
    });
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnOpen(init) => {
                for transceiver in pc.get_transceivers().await {
                    if let Ok(Some(receiver)) = transceiver.receiver().await
                        && receiver.id() == init.receiver_id
                    {
                        level_id = media::negotiated_audio_level(&transceiver, true).await;
                    }
                }
                link.input(Input::Publish {
                    peer: link.peer.clone(),
                    track: name.clone(),
                    media,
                    codec: codec_name.clone(),
                    clock_rate,
                    ssrc,
                });
                link.command(RoomCommand::AttachPublisher {
                    peer: link.peer.clone(),
                    track: name.clone(),
                    control: control_tx.clone(),
                });
                link.command(RoomCommand::SetPublishing { peer: link.peer.clone(), publishing: true });
                published = true;
                tracing::info!(room = %link.room, peer = %link.peer, track = %name, codec = %codec_name, ?level_id, "track published");
            }
            TrackRemoteEvent::OnRtpPacket(packet) => {
                metrics::rtp_in(media, packet.marshal_size());
                if paused.load(Ordering::Relaxed) || !published {
                    continue;
                }
                let (audio_level, voice) = match level_id.and_then(|id| media::audio_level(&packet, id)) {
                    Some((level, voice)) => (Some(level), Some(voice)),
                    None => (None, None),
                };
                let keyframe = media == MediaKind::Video && media::vp8_keyframe_start(&packet.payload);
                let rtp = RtpIn {
                    seq: packet.header.sequence_number,
                    ts: packet.header.timestamp,
                    marker: packet.header.marker,
                    payload: Arc::from(&packet.payload[..]),
                    audio_level,
                    voice,
                    keyframe,
                };
                link.input(Input::Rtp { track: name.clone(), packet: rtp });
            }
            _ => {}
        }
    }
    pli.abort();
    if published {
        tracing::info!(room = %link.room, peer = %link.peer, track = %name, "track unpublished");
        link.input(Input::Unpublish { track: name });
    }
}

/// The server-to-client transport carrying a listener's personal stream.
pub struct RecvTransport {
    pc: Arc<dyn PeerConnection>,
    state: watch::Receiver<RTCPeerConnectionState>,
    audio: Arc<TrackLocalStaticRTP>,
    video: Option<Arc<TrackLocalStaticRTP>>,
    paused: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    link: RoomLink,
    answered: bool,
    /// The client's candidates that came before its answer (a connection takes candidates
    /// only once it has the remote description).
    early_candidates: Vec<RTCIceCandidateInit>,
}

fn local_track(kind: RtpCodecKind, ssrc: u32, peer: &str) -> Arc<TrackLocalStaticRTP> {
    media::local_track(kind, ssrc, &format!("encore-{peer}"), "encore personal stream")
}

fn random_ssrc() -> u32 {
    // Any value works; the engine's own SSRC is written into each packet's trace, the wire uses
    // the one negotiated here.
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).unwrap_or_default();
    u32::from_le_bytes(bytes).max(1)
}

impl RecvTransport {
    /// Makes the server's offer: one audio track, plus video when asked.
    pub async fn offer(
        settings: &TransportSettings,
        video: bool,
        link: RoomLink,
        events: mpsc::Sender<TransportEvent>,
    ) -> Result<(Self, String), TransportError> {
        let Built { pc, state, .. } = build(settings, Side::Recv, events).await?;
        let audio = local_track(RtpCodecKind::Audio, random_ssrc(), &link.peer);
        let video = video.then(|| local_track(RtpCodecKind::Video, random_ssrc(), &link.peer));
        let offer = async {
            for track in std::iter::once(&audio).chain(video.iter()) {
                pc.add_transceiver_from_track(
                    track.clone() as Arc<dyn TrackLocal>,
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Sendonly,
                        ..Default::default()
                    }),
                )
                .await
                .map_err(webrtc_error("adding a track"))?;
            }
            let offer = pc.create_offer(None).await.map_err(webrtc_error("creating the offer"))?;
            pc.set_local_description(offer.clone()).await.map_err(webrtc_error("setting the offer"))?;
            Ok::<_, TransportError>(offer.sdp)
        }
        .await;
        let offer = closed_on_error(&pc, offer).await?;
        let paused = Arc::new(AtomicBool::new(false));
        let transport = RecvTransport {
            pc,
            state,
            audio,
            video,
            paused,
            tasks: Vec::new(),
            link,
            answered: false,
            early_candidates: Vec::new(),
        };
        Ok((transport, offer))
    }

    /// Takes the client's answer; the stream starts once the connection is up.
    pub async fn accept_answer(&mut self, answer: &str) -> Result<(), TransportError> {
        if self.answered {
            return Err(TransportError::AnsweredTwice);
        }
        let answer = RTCSessionDescription::answer(answer.to_owned()).map_err(TransportError::BadSdp)?;
        self.pc.set_remote_description(answer).await.map_err(TransportError::BadSdp)?;
        self.answered = true;
        for candidate in std::mem::take(&mut self.early_candidates) {
            if let Err(error) = self.pc.add_ice_candidate(candidate).await {
                tracing::debug!(peer = %self.link.peer, %error, "an early candidate was refused");
            }
        }
        self.tasks.push(tokio::spawn(forward(
            self.pc.clone(),
            self.state.clone(),
            self.audio.clone(),
            self.video.clone(),
            self.link.clone(),
            self.paused.clone(),
        )));
        for (track, media) in std::iter::once((self.audio.clone(), MediaKind::Audio))
            .chain(self.video.clone().map(|v| (v, MediaKind::Video)))
        {
            self.tasks.push(tokio::spawn(read_feedback(track, media, self.link.clone())));
        }
        Ok(())
    }

    pub async fn add_candidate(&mut self, candidate: Option<IceCandidate>) -> Result<(), TransportError> {
        match candidate_init(candidate)? {
            Some(candidate) if !self.answered => {
                if self.early_candidates.len() >= 64 {
                    return Err(TransportError::CandidateRefused("too many candidates before the answer"));
                }
                self.early_candidates.push(candidate);
                Ok(())
            }
            Some(candidate) => self.pc.add_ice_candidate(candidate).await.map_err(TransportError::BadCandidate),
            None => Ok(()),
        }
    }

    /// Paused, the personal stream is not sent (the engine goes on routing).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub async fn close(self) {
        self.link.command(RoomCommand::DetachMedia { peer: self.link.peer.clone() });
        self.link.input(Input::Unlisten { peer: self.link.peer.clone() });
        tracing::info!(room = %self.link.room, peer = %self.link.peer, "listening stopped");
        let _ = self.pc.close().await;
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Writes the engine's packets for this listener, once the connection is up.
async fn forward(
    pc: Arc<dyn PeerConnection>,
    mut state: watch::Receiver<RTCPeerConnectionState>,
    audio: Arc<TrackLocalStaticRTP>,
    video: Option<Arc<TrackLocalStaticRTP>>,
    link: RoomLink,
    paused: Arc<AtomicBool>,
) {
    // Packets written before DTLS is up are dropped by the connection (silently).
    if state.wait_for(|s| *s == RTCPeerConnectionState::Connected).await.is_err() {
        return;
    }
    let mut legs = [(None, None, 0u32), (None, None, 0u32)];
    for transceiver in pc.get_transceivers().await {
        let Ok(Some(sender)) = transceiver.sender().await else { continue };
        let track = sender.track();
        let kind = track.kind().await;
        let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
        let payload_type = media::negotiated_payload_type(&transceiver).await;
        let level_id = media::negotiated_audio_level(&transceiver, false).await;
        legs[usize::from(kind == RtpCodecKind::Video)] = (payload_type, level_id, ssrc);
    }
    let (tx, mut rx) = mpsc::channel::<SendPacket>(PEER_MEDIA);
    link.command(RoomCommand::AttachMedia { peer: link.peer.clone(), media: tx });
    link.input(Input::Listen { peer: link.peer.clone() });
    tracing::info!(room = %link.room, peer = %link.peer, video = video.is_some(), "listening started");
    while let Some(packet) = rx.recv().await {
        if paused.load(Ordering::Relaxed) {
            continue;
        }
        let (track, (payload_type, level_id, ssrc)) = match packet.media {
            MediaKind::Audio => (&audio, legs[0]),
            MediaKind::Video => match &video {
                Some(video) => (video, legs[1]),
                None => continue,
            },
        };
        let Some(payload_type) = payload_type else { continue };
        let mut rtp = media::rtp_packet(payload_type, packet.seq, packet.ts, ssrc, packet.marker);
        if let (Some(id), Some(level)) = (level_id, packet.audio_level) {
            let _ = rtp.header.set_extension(id, Bytes::from(vec![media::audio_level_byte(level, false)]));
        }
        rtp.payload = match packet.payload {
            Some(payload) => Bytes::from_owner(payload),
            None => continue,
        };
        let bytes = rtp.marshal_size();
        if track.write_rtp(rtp).await.is_err() {
            break;
        }
        metrics::rtp_out(packet.media, bytes, packet.retransmit);
        link.media_sent();
    }
}

/// A listener's NACKs and PLIs, to the engine.
async fn read_feedback(track: Arc<TrackLocalStaticRTP>, media: MediaKind, link: RoomLink) {
    while let Some(event) = track.poll().await {
        let TrackLocalEvent::OnRtcpPacket(packets) = event else { continue };
        for packet in packets {
            match media::feedback(packet.as_ref()) {
                Some(RtcpFeedback::Nack(seqs)) if !seqs.is_empty() => {
                    link.input(Input::Nack { peer: link.peer.clone(), media, seqs });
                }
                Some(RtcpFeedback::KeyframeRequest) if media == MediaKind::Video => {
                    link.input(Input::KeyframeRequest { peer: link.peer.clone() });
                }
                _ => {}
            }
        }
    }
}
