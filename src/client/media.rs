//! The client's media: a publisher (it offers, sends Opus with the audio level, and VP8 if
//! asked) and a listener (the server offers; every packet received is handed over with its
//! arrival time).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodingParameters, RTCRtpEncodingParameters};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngine, SettingEngineBuilder, Slot,
    register_default_interceptors,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit, RtpTransceiver};

use encore_systems::components::ids::MediaKind;

use super::error::ClientError;
use super::signaling::Signaling;
use crate::media as m;
use crate::protocol::{Done, Offered, Published, Request};

/// How a client reaches the server's media.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientNetwork {
    /// UDP, as almost every client.
    #[default]
    Udp,
    /// TCP only (ICE-TCP active to the server's passive candidate): a client whose UDP is
    /// blocked.
    TcpOnly,
    /// UDP, answering the server's offers as the DTLS client (`a=setup:active`), as browsers do.
    /// (The `webrtc` crate otherwise answers an ICE-lite offer as the DTLS server, `passive`.)
    UdpDtlsClient,
}

struct Handler {
    state: watch::Sender<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedSender<Arc<dyn TrackRemote>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.tracks.send(track);
    }
}

struct Connection {
    pc: Arc<dyn PeerConnection>,
    state: watch::Receiver<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
}

/// A client peer connection like a browser's: default interceptors (with a NACK responder),
/// plus the audio-level extension. The server is ICE-lite: its candidates come in its SDP, and
/// it learns ours from our checks, so nothing is trickled.
async fn connection(network: ClientNetwork) -> Result<Connection, ClientError> {
    let (mut engine, _) = m::media_engine_and_registry().map_err(ClientError::webrtc("media engine"))?;
    let registry =
        register_default_interceptors(Registry::new(), &mut engine).map_err(ClientError::webrtc("interceptors"))?;
    let registry = registry.with(Slot::from(14_000), m::RtcpToApp::default());
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (tracks_tx, tracks) = mpsc::unbounded_channel();
    let handler = Handler { state: state_tx, tracks: tracks_tx };
    let builder = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_setting_engine(setting_engine(network))
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(handler));
    let builder = match network {
        ClientNetwork::Udp | ClientNetwork::UdpDtlsClient => builder.with_udp_addrs(vec!["127.0.0.1:0".to_owned()]),
        ClientNetwork::TcpOnly => builder.with_tcp_addrs(vec!["127.0.0.1:0".to_owned()]),
    };
    let pc = builder.build().await.map_err(ClientError::webrtc("peer connection"))?;
    Ok(Connection { pc: Arc::new(pc), state, tracks })
}

/// The webrtc crate dials a TCP passive candidate only when it is added by hand, not when it
/// comes in the remote SDP (docs/dependencies.md): add the SDP's TCP candidates.
async fn dial_tcp_candidates(pc: &Arc<dyn PeerConnection>, sdp: &str) -> Result<(), ClientError> {
    for line in sdp.lines().filter_map(|l| l.strip_prefix("a=")) {
        if line.starts_with("candidate:") && line.contains(" tcp ") {
            let init = RTCIceCandidateInit {
                candidate: line.to_owned(),
                sdp_mid: Some("0".to_owned()),
                sdp_mline_index: Some(0),
                ..Default::default()
            };
            pc.add_ice_candidate(init).await.map_err(ClientError::webrtc("adding a TCP candidate"))?;
        }
    }
    Ok(())
}

/// mDNS off: the client is on loopback with the server, and each connection would otherwise
/// bind one more multicast socket.
fn setting_engine(network: ClientNetwork) -> SettingEngine {
    let builder = SettingEngineBuilder::new().with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled);
    match network {
        ClientNetwork::UdpDtlsClient => {
            builder.with_answering_dtls_role(rtc::peer_connection::transport::RTCDtlsRole::Client).build()
        }
        _ => builder.build(),
    }
}

/// A track we send on: Opus or VP8, with the SSRC we choose (the stream id groups tracks in the
/// remote's `a=msid`).
fn local_track(kind: RtpCodecKind, ssrc: u32, stream_id: &str, label: &str) -> Arc<TrackLocalStaticRTP> {
    let codec = if kind == RtpCodecKind::Audio { m::opus_codec() } else { m::vp8_codec() };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        stream_id.to_owned(),
        format!("{stream_id}-{kind}"),
        format!("{label} ({kind})"),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
            codec,
            ..Default::default()
        }],
    )))
}

/// The negotiated id of the audio-level extension on a sending transceiver.
async fn negotiated_audio_level(transceiver: &Arc<dyn RtpTransceiver>) -> Option<u8> {
    let parameters = transceiver.sender().await.ok()??.get_parameters().await.ok()?;
    let extensions = parameters.rtp_parameters.header_extensions;
    extensions.iter().find(|e| e.uri == m::AUDIO_LEVEL_URI).and_then(|e| u8::try_from(e.id).ok())
}

async fn connected(state: &mut watch::Receiver<RTCPeerConnectionState>) -> Result<(), ClientError> {
    let wait = state.wait_for(|s| matches!(s, RTCPeerConnectionState::Connected | RTCPeerConnectionState::Failed));
    match tokio::time::timeout(Duration::from_secs(20), wait).await {
        Ok(Ok(state)) if *state == RTCPeerConnectionState::Connected => Ok(()),
        Ok(_) => Err(ClientError::Media("the connection failed".into())),
        Err(_) => Err(ClientError::Timeout("ICE and DTLS")),
    }
}

fn track(kind: RtpCodecKind, ssrc: u32) -> Arc<TrackLocalStaticRTP> {
    local_track(kind, ssrc, &format!("client-{ssrc}"), "client")
}

/// An RTP timestamp: `at` on a `clock_rate` clock.
fn timestamp(at: Duration, clock_rate: u64) -> u32 {
    (at.as_micros() as u64 * clock_rate / 1_000_000) as u32
}

/// A publishing client: its send transport, ready to send.
pub struct Publisher {
    pc: Arc<dyn PeerConnection>,
    audio: Arc<TrackLocalStaticRTP>,
    video: Option<Arc<TrackLocalStaticRTP>>,
    audio_ssrc: u32,
    video_ssrc: u32,
    level_id: Option<u8>,
    seq: [u16; 2],
    keyframe_requests: Arc<AtomicU32>,
}

impl Publisher {
    /// Offers, publishes, and waits until the connection is up.
    pub async fn start(signaling: &Arc<Signaling>, video: bool, ssrc_seed: u32) -> Result<Self, ClientError> {
        Self::start_on(signaling, video, ssrc_seed, ClientNetwork::Udp).await
    }

    /// [`Publisher::start`] over the given network.
    pub async fn start_on(
        signaling: &Arc<Signaling>,
        video: bool,
        ssrc_seed: u32,
        network: ClientNetwork,
    ) -> Result<Self, ClientError> {
        let Connection { pc, mut state, .. } = connection(network).await?;
        let audio_ssrc = 0x1000_0000 | ssrc_seed;
        let video_ssrc = 0x2000_0000 | ssrc_seed;
        let audio = track(RtpCodecKind::Audio, audio_ssrc);
        let video = video.then(|| track(RtpCodecKind::Video, video_ssrc));
        let mut transceivers = Vec::new();
        for t in std::iter::once(&audio).chain(video.iter()) {
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, ..Default::default() };
            transceivers.push(
                pc.add_transceiver_from_track(t.clone() as Arc<dyn TrackLocal>, Some(init))
                    .await
                    .map_err(ClientError::webrtc("adding a track"))?,
            );
        }
        let offer = pc.create_offer(None).await.map_err(ClientError::webrtc("creating the offer"))?;
        pc.set_local_description(offer.clone()).await.map_err(ClientError::webrtc("setting the offer"))?;
        let Published { answer } = signaling.request(Request::Publish { offer: offer.sdp }).await?;
        let sdp = answer.clone();
        let answer = RTCSessionDescription::answer(answer).map_err(ClientError::webrtc("reading the answer"))?;
        pc.set_remote_description(answer).await.map_err(ClientError::webrtc("setting the answer"))?;
        if network == ClientNetwork::TcpOnly {
            dial_tcp_candidates(&pc, &sdp).await?;
        }
        connected(&mut state).await?;
        let level_id = negotiated_audio_level(&transceivers[0]).await;
        let keyframe_requests = Arc::new(AtomicU32::new(0));
        if let Some(video) = &video {
            let (video, count) = (video.clone(), keyframe_requests.clone());
            tokio::spawn(async move {
                while let Some(event) = video.poll().await {
                    let TrackLocalEvent::OnRtcpPacket(packets) = event else { continue };
                    for packet in packets {
                        if matches!(m::feedback(packet.as_ref()), Some(m::RtcpFeedback::KeyframeRequest { .. })) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        Ok(Publisher { pc, audio, video, audio_ssrc, video_ssrc, level_id, seq: [1000, 5000], keyframe_requests })
    }

    /// Sends one 20 ms audio packet (its RTP timestamp from `at`, a 48 kHz clock).
    pub async fn send_audio(
        &mut self,
        at: Duration,
        payload: Bytes,
        level: u8,
        voice: bool,
    ) -> Result<(), ClientError> {
        self.seq[0] = self.seq[0].wrapping_add(1);
        let mut packet =
            m::rtp_packet(m::OPUS_PAYLOAD_TYPE, self.seq[0], timestamp(at, 48_000), self.audio_ssrc, false);
        if let Some(id) = self.level_id {
            packet
                .header
                .set_extension(id, Bytes::from(vec![m::audio_level_byte(level, voice)]))
                .map_err(ClientError::webrtc("the audio-level extension"))?;
        }
        packet.payload = payload;
        self.audio.write_rtp(packet).await.map_err(ClientError::webrtc("sending audio"))
    }

    /// Sends one video packet (a whole frame), a VP8 key frame or not.
    pub async fn send_video(&mut self, at: Duration, keyframe: bool, size: usize) -> Result<(), ClientError> {
        let Some(video) = &self.video else { return Ok(()) };
        self.seq[1] = self.seq[1].wrapping_add(1);
        let mut payload = vec![0u8; size.max(4)];
        payload[0] = 0x10; // S=1, PID=0
        payload[1] = if keyframe { 0x00 } else { 0x01 }; // P bit
        let mut packet = m::rtp_packet(m::VP8_PAYLOAD_TYPE, self.seq[1], timestamp(at, 90_000), self.video_ssrc, true);
        packet.payload = Bytes::from(payload);
        video.write_rtp(packet).await.map_err(ClientError::webrtc("sending video"))
    }

    /// PLIs (and FIRs) the server sent for the video track so far.
    pub fn keyframe_requests(&self) -> u32 {
        self.keyframe_requests.load(Ordering::Relaxed)
    }

    pub async fn close(self) {
        let _ = self.pc.close().await;
    }
}

/// A packet a listener received.
#[derive(Debug, Clone)]
pub struct Received {
    pub media: MediaKind,
    pub at: Instant,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    pub marker: bool,
    pub payload: Bytes,
}

/// The tracks a listener's connection received, by media.
type RemoteTracks = Arc<std::sync::Mutex<Vec<(MediaKind, Arc<dyn TrackRemote>)>>>;

/// A listening client: its receive transport and the packets it gets.
pub struct Listener {
    pc: Arc<dyn PeerConnection>,
    pub packets: mpsc::UnboundedReceiver<Received>,
    tracks: RemoteTracks,
}

impl Listener {
    /// Listens (the server offers), answers, and waits until the connection is up.
    pub async fn start(signaling: &Arc<Signaling>, video: bool) -> Result<Self, ClientError> {
        Self::start_on(signaling, video, ClientNetwork::Udp).await
    }

    /// [`Listener::start`] over the given network.
    pub async fn start_on(
        signaling: &Arc<Signaling>,
        video: bool,
        network: ClientNetwork,
    ) -> Result<Self, ClientError> {
        let Connection { pc, mut state, mut tracks } = connection(network).await?;
        let Offered { offer } = signaling.request(Request::Listen { video }).await?;
        let sdp = offer.clone();
        let offer = RTCSessionDescription::offer(offer).map_err(ClientError::webrtc("reading the offer"))?;
        pc.set_remote_description(offer).await.map_err(ClientError::webrtc("setting the offer"))?;
        let answer = pc.create_answer(None).await.map_err(ClientError::webrtc("creating the answer"))?;
        pc.set_local_description(answer.clone()).await.map_err(ClientError::webrtc("setting the answer"))?;
        signaling.request::<Done>(Request::Answer { answer: answer.sdp }).await?;
        if network == ClientNetwork::TcpOnly {
            dial_tcp_candidates(&pc, &sdp).await?;
        }
        let (tx, packets) = mpsc::unbounded_channel();
        let remote: RemoteTracks = Arc::default();
        let known = remote.clone();
        tokio::spawn(async move {
            while let Some(track) = tracks.recv().await {
                let tx = tx.clone();
                let known = known.clone();
                tokio::spawn(async move {
                    let media =
                        if track.kind().await == RtpCodecKind::Video { MediaKind::Video } else { MediaKind::Audio };
                    known.lock().unwrap_or_else(|p| p.into_inner()).push((media, track.clone()));
                    while let Some(event) = track.poll().await {
                        if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                            let received = Received {
                                media,
                                at: Instant::now(),
                                seq: packet.header.sequence_number,
                                ts: packet.header.timestamp,
                                ssrc: packet.header.ssrc,
                                marker: packet.header.marker,
                                payload: packet.payload,
                            };
                            if tx.send(received).is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        connected(&mut state).await?;
        Ok(Listener { pc, packets, tracks: remote })
    }

    fn track(&self, media: MediaKind) -> Option<Arc<dyn TrackRemote>> {
        let tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
        tracks.iter().find(|(m, _)| *m == media).map(|(_, t)| t.clone())
    }

    /// Sends a NACK for `seqs` of the personal stream (once a packet of that media came).
    pub async fn nack(&self, media: MediaKind, seqs: &[u16]) -> Result<(), ClientError> {
        let track = self.track(media).ok_or_else(|| ClientError::Media(format!("no {} track yet", media.as_str())))?;
        let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
        track.write_rtcp(vec![m::negative_ack(ssrc, seqs)]).await.map_err(ClientError::webrtc("sending a NACK"))
    }

    /// Sends a PLI for the personal video stream.
    pub async fn request_keyframe(&self) -> Result<(), ClientError> {
        let track = self.track(MediaKind::Video).ok_or_else(|| ClientError::Media("no video track yet".into()))?;
        let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
        track.write_rtcp(vec![m::picture_loss(ssrc)]).await.map_err(ClientError::webrtc("sending a PLI"))
    }

    pub async fn close(self) {
        let _ = self.pc.close().await;
    }
}
