//! The load generator's media: every simulated client's `RTCPeerConnection` (the sans-I/O `rtc`
//! core, a full ICE agent each) driven by ONE thread, the way the server drives its own.
//!
//! Each client has its own UDP socket: the server tells clients apart by their address (that is
//! how ICE-lite servers route, and what a real client is), so many clients cannot share one
//! port. But there is no task, channel or wake-up per packet: one loop polls every socket,
//! feeds what arrives to its connection, fires timers, sends the publishers' frames on their
//! 20 ms clocks, and reads the listeners' packets into their statistics, all on one thread.
//!
//! The async side (signaling, one WebSocket per client) talks to the loop through commands.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::oneshot;

use encore_systems::components::ids::MediaKind;

use super::{ListenerStats, PayloadStamp, VIDEO_FRAME, VIDEO_KEYFRAME_EVERY, account};
use crate::media as m;
use crate::protocol::IceCandidate;
use crate::server::media::udp;
use crate::talk::{self, Frames, SeededRng};

/// A client of the fleet.
pub type ClientId = usize;

/// What a listener's notices say, read by the loop as packets arrive.
#[derive(Debug, Default)]
pub struct LiveFlag {
    pub live: AtomicBool,
    pub lag_us: AtomicU64,
    /// When the route's `now_playing` arrived (µs since the run's epoch).
    pub since_us: AtomicU64,
}

/// What the publishers sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub audio: u64,
    pub voiced: u64,
    pub video: u64,
    pub errors: u64,
}

/// The fleet's figures at the end.
#[derive(Debug, Default)]
pub struct Totals {
    pub sent: Sent,
    pub listeners: Vec<ListenerStats>,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Command {
    Publisher { index: u32, video: bool, reply: Reply<(ClientId, String, IceCandidate)> },
    Answer { id: ClientId, sdp: String, reply: Reply<()> },
    Listener { offer: String, live: Arc<LiveFlag>, reply: Reply<(ClientId, String, IceCandidate)> },
    RemoteCandidate { id: ClientId, candidate: String },
    Connected { id: ClientId, reply: oneshot::Sender<bool> },
    Talk { until: Instant, seed: u64 },
    Stop { at: Instant },
}

/// The fleet: its loop on a thread of its own, and the way to talk to it.
pub struct Fleet {
    /// The run's epoch: every time the fleet and its clients stamp is measured from it.
    pub epoch: Instant,
    commands: Sender<Command>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<Totals>>>,
}

impl Fleet {
    pub fn start(epoch: Instant) -> io::Result<Self> {
        let (commands, rx) = std::sync::mpsc::channel();
        let thread =
            std::thread::Builder::new().name("loadgen-fleet".into()).spawn(move || Loop::new(epoch, rx).run())?;
        Ok(Fleet { epoch, commands, thread: std::sync::Mutex::new(Some(thread)) })
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).map_err(|_| "the fleet stopped".to_owned())?;
        answer.await.map_err(|_| "the fleet stopped".to_owned())?
    }

    /// A publisher: its offer, and its one host candidate.
    pub async fn publisher(&self, index: u32, video: bool) -> Result<(ClientId, String, IceCandidate), String> {
        self.ask(|reply| Command::Publisher { index, video, reply }).await
    }

    pub async fn answer(&self, id: ClientId, sdp: String) -> Result<(), String> {
        self.ask(|reply| Command::Answer { id, sdp, reply }).await
    }

    /// A listener answering the server's offer: its answer, and its one host candidate.
    pub async fn listener(
        &self,
        offer: String,
        live: Arc<LiveFlag>,
    ) -> Result<(ClientId, String, IceCandidate), String> {
        self.ask(|reply| Command::Listener { offer, live, reply }).await
    }

    /// A server candidate trickled by a server that is not ICE-lite (before the media fast path).
    pub fn remote_candidate(&self, id: ClientId, candidate: String) {
        let _ = self.commands.send(Command::RemoteCandidate { id, candidate });
    }

    /// Waits until the client's connection is up (false: it failed, or 20 s passed).
    pub async fn connected(&self, id: ClientId) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Connected { id, reply }).is_err() {
            return false;
        }
        tokio::time::timeout(Duration::from_secs(20), answer).await.ok().and_then(Result::ok).unwrap_or(false)
    }

    /// Publishers talk until `until` (P.59 spurts, each on its own seeded generator).
    pub fn talk(&self, until: Instant, seed: u64) {
        let _ = self.commands.send(Command::Talk { until, seed });
    }

    /// Stops the loop at `at` and returns its figures.
    pub async fn finish(&self, at: Instant) -> Totals {
        let _ = self.commands.send(Command::Stop { at });
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        tokio::task::spawn_blocking(move || thread.and_then(|t| t.join().ok()).unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

struct Publishing {
    index: u32,
    spurts: Option<(Frames, SeededRng)>,
    seq: [u16; 2],
    ssrc: [u32; 2],
    level_id: Option<u8>,
    payload_type: [u8; 2],
    video: bool,
    frames: u64,
    /// When its next audio and video frames are due.
    next: [Instant; 2],
    start: Instant,
}

struct Client {
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    connected: bool,
    failed: bool,
    waiters: Vec<oneshot::Sender<bool>>,
    /// Server candidates trickled before the remote description was set (a server that is not
    /// ICE-lite), added once it is.
    early_candidates: Vec<String>,
    remote_set: bool,
    publishing: Option<Publishing>,
    listening: Option<(Arc<LiveFlag>, ListenerStats, HashMap<String, MediaKind>)>,
}

struct Loop {
    epoch: Instant,
    /// The earliest timer of any connection, as of the last drain.
    next_timer: Option<Instant>,
    commands: Receiver<Command>,
    clients: Vec<Client>,
    talk_until: Option<Instant>,
    stop_at: Option<Instant>,
    sent: Sent,
    buffer: Vec<u8>,
}

fn new_pc(now: Instant, socket: &UdpSocket) -> Result<(RTCPeerConnection, SocketAddr, IceCandidate), String> {
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let (engine, registry) = m::media_engine_and_registry().map_err(|e| e.to_string())?;
    let settings = SettingEngineBuilder::new().with_multicast_dns_mode(MulticastDnsMode::Disabled).build();
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .build(now)
        .map_err(|e| e.to_string())?;
    let host = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: local.ip().to_string(),
            port: local.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()
    .map_err(|e| e.to_string())?;
    let init = RTCIceCandidate::from(&host).to_json().map_err(|e| e.to_string())?;
    let candidate = IceCandidate {
        candidate: init.candidate.clone(),
        sdp_mid: Some("0".to_owned()),
        sdp_mline_index: Some(0),
        username_fragment: None,
    };
    pc.add_local_candidate(init).map_err(|e| e.to_string())?;
    pc.add_local_candidate(RTCIceCandidateInit::default()).map_err(|e| e.to_string())?;
    Ok((pc, local, candidate))
}

fn add_remote_candidate(client: &mut Client, candidate: String) {
    let init = RTCIceCandidateInit {
        candidate,
        sdp_mid: Some("0".to_owned()),
        sdp_mline_index: Some(0),
        ..Default::default()
    };
    let _ = client.pc.add_remote_candidate(init);
}

fn bind() -> Result<UdpSocket, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    udp::set_buffers(&socket, 1 << 20);
    Ok(socket)
}

fn sendonly_track(kind: RtpCodecKind, ssrc: u32) -> MediaStreamTrack {
    let codec = if kind == RtpCodecKind::Audio { m::opus_codec() } else { m::vp8_codec() };
    MediaStreamTrack::new(
        format!("lg-{ssrc}"),
        format!("lg-{ssrc}-{kind}"),
        format!("loadgen ({kind})"),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
            codec,
            ..Default::default()
        }],
    )
}

impl Loop {
    fn new(epoch: Instant, commands: Receiver<Command>) -> Self {
        Loop {
            epoch,
            next_timer: None,
            commands,
            clients: Vec::new(),
            talk_until: None,
            stop_at: None,
            sent: Sent::default(),
            buffer: vec![0u8; 2048],
        }
    }

    fn run(mut self) -> Totals {
        loop {
            let now = Instant::now();
            loop {
                match self.commands.try_recv() {
                    Ok(command) => self.apply(now, command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.stop_at.get_or_insert(now);
                        break;
                    }
                }
            }
            if self.stop_at.is_some_and(|at| now >= at) {
                return self.totals();
            }
            self.read(now);
            self.timers(now);
            self.frames(now);
            self.drain(now);
            let wait = self.next_wakeup(now).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                let fds: Vec<_> = self.clients.iter().map(|c| c.socket.as_raw_fd()).collect();
                let _ = udp::wait_any(&fds, wait.min(Duration::from_millis(5)));
            }
        }
    }

    fn totals(self) -> Totals {
        let listeners = self.clients.into_iter().filter_map(|c| c.listening.map(|(_, stats, _)| stats)).collect();
        Totals { sent: self.sent, listeners }
    }

    fn apply(&mut self, now: Instant, command: Command) {
        match command {
            Command::Publisher { index, video, reply } => {
                let _ = reply.send(self.add_publisher(now, index, video));
            }
            Command::Answer { id, sdp, reply } => {
                let _ = reply.send(self.set_answer(now, id, &sdp));
            }
            Command::Listener { offer, live, reply } => {
                let _ = reply.send(self.add_listener(now, &offer, live));
            }
            Command::RemoteCandidate { id, candidate } => {
                if let Some(client) = self.clients.get_mut(id) {
                    if client.remote_set {
                        add_remote_candidate(client, candidate);
                    } else {
                        client.early_candidates.push(candidate);
                    }
                }
            }
            Command::Connected { id, reply } => match self.clients.get_mut(id) {
                Some(client) if client.connected => {
                    let _ = reply.send(true);
                }
                Some(client) if !client.failed => client.waiters.push(reply),
                _ => {
                    let _ = reply.send(false);
                }
            },
            Command::Talk { until, seed } => {
                self.talk_until = Some(until);
                for client in &mut self.clients {
                    if let Some(publishing) = client.publishing.as_mut() {
                        let mut rng = SeededRng::new(seed.wrapping_add(u64::from(publishing.index)));
                        let frames = Frames::new(&mut rng);
                        publishing.spurts = Some((frames, rng));
                        // Spread the publishers over the 20 ms frame.
                        let phase = SeededRng::new(seed ^ u64::from(publishing.index)).range(0, 20_000);
                        publishing.start = now + Duration::from_micros(phase);
                        publishing.next = [publishing.start, publishing.start];
                    }
                }
            }
            Command::Stop { at } => self.stop_at = Some(at),
        }
    }

    fn add_publisher(
        &mut self,
        now: Instant,
        index: u32,
        video: bool,
    ) -> Result<(ClientId, String, IceCandidate), String> {
        let socket = bind()?;
        let (mut pc, local, candidate) = new_pc(now, &socket)?;
        let ssrc = [0x1000_0000 | (index + 1), 0x2000_0000 | (index + 1)];
        let kinds: &[RtpCodecKind] =
            if video { &[RtpCodecKind::Audio, RtpCodecKind::Video] } else { &[RtpCodecKind::Audio] };
        for (i, kind) in kinds.iter().enumerate() {
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, ..Default::default() };
            pc.add_transceiver_from_track(sendonly_track(*kind, ssrc[i]), Some(init)).map_err(|e| e.to_string())?;
        }
        let offer = pc.create_offer(None).map_err(|e| e.to_string())?;
        pc.set_local_description(now, offer.clone()).map_err(|e| e.to_string())?;
        let publishing = Publishing {
            index,
            spurts: None,
            seq: [1000, 5000],
            ssrc,
            level_id: None,
            payload_type: [m::OPUS_PAYLOAD_TYPE, m::VP8_PAYLOAD_TYPE],
            video,
            frames: 0,
            next: [now, now],
            start: now,
        };
        self.clients.push(Client {
            pc,
            socket,
            local,
            connected: false,
            failed: false,
            waiters: Vec::new(),
            early_candidates: Vec::new(),
            remote_set: false,
            publishing: Some(publishing),
            listening: None,
        });
        Ok((self.clients.len() - 1, offer.sdp, candidate))
    }

    fn set_answer(&mut self, now: Instant, id: ClientId, sdp: &str) -> Result<(), String> {
        let client = self.clients.get_mut(id).ok_or("no such client")?;
        let answer = RTCSessionDescription::answer(sdp.to_owned()).map_err(|e| e.to_string())?;
        client.pc.set_remote_description(now, answer).map_err(|e| e.to_string())?;
        client.remote_set = true;
        for candidate in std::mem::take(&mut client.early_candidates) {
            add_remote_candidate(client, candidate);
        }
        let transceivers: Vec<_> = client.pc.get_transceivers().collect();
        let senders: Vec<_> = transceivers.into_iter().filter_map(|t| client.pc.rtp_transceiver(t)?.sender()).collect();
        for sender in senders {
            let Some(mut sender) = client.pc.rtp_sender(sender) else { continue };
            let kind = sender.track().kind();
            let parameters = sender.get_parameters();
            let Some(publishing) = client.publishing.as_mut() else { continue };
            let slot = usize::from(kind == RtpCodecKind::Video);
            if let Some(codec) = parameters.rtp_parameters.codecs.first() {
                publishing.payload_type[slot] = codec.payload_type;
            }
            if kind == RtpCodecKind::Audio {
                publishing.level_id = parameters
                    .rtp_parameters
                    .header_extensions
                    .iter()
                    .find(|e| e.uri == m::AUDIO_LEVEL_URI)
                    .and_then(|e| u8::try_from(e.id).ok());
            }
        }
        Ok(())
    }

    fn add_listener(
        &mut self,
        now: Instant,
        offer: &str,
        live: Arc<LiveFlag>,
    ) -> Result<(ClientId, String, IceCandidate), String> {
        let socket = bind()?;
        let (mut pc, local, candidate) = new_pc(now, &socket)?;
        let offer = RTCSessionDescription::offer(offer.to_owned()).map_err(|e| e.to_string())?;
        pc.set_remote_description(now, offer).map_err(|e| e.to_string())?;
        let answer = pc.create_answer(None).map_err(|e| e.to_string())?;
        pc.set_local_description(now, answer.clone()).map_err(|e| e.to_string())?;
        self.clients.push(Client {
            pc,
            socket,
            local,
            connected: false,
            failed: false,
            waiters: Vec::new(),
            early_candidates: Vec::new(),
            remote_set: true,
            publishing: None,
            listening: Some((live, ListenerStats::default(), HashMap::new())),
        });
        Ok((self.clients.len() - 1, answer.sdp, candidate))
    }

    fn read(&mut self, now: Instant) {
        for client in &mut self.clients {
            for _ in 0..64 {
                match client.socket.recv_from(&mut self.buffer) {
                    Ok((n, from)) => {
                        let message = TaggedBytesMut {
                            now,
                            transport: TransportContext {
                                local_addr: client.local,
                                peer_addr: from,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: BytesMut::from(&self.buffer[..n]),
                        };
                        let _ = client.pc.handle_read(message);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(_) => break,
                }
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        if self.next_timer.is_some_and(|at| at > now) {
            return;
        }
        for client in &mut self.clients {
            if client.pc.poll_timeout().is_some_and(|at| at <= now) {
                let _ = client.pc.handle_timeout(now);
            }
        }
    }

    /// The publishers' frames whose time has come.
    fn frames(&mut self, now: Instant) {
        let Some(until) = self.talk_until else { return };
        let epoch = self.epoch;
        for client in &mut self.clients {
            if !client.connected {
                continue;
            }
            let Some(publishing) = client.publishing.as_mut() else { continue };
            let Some((spurts, rng)) = publishing.spurts.as_mut() else { continue };
            while publishing.next[0] <= now && publishing.next[0] < until {
                let at = publishing.next[0] - publishing.start;
                let (voiced, level, size) = spurts.next_frame(rng);
                let sent_us = epoch.elapsed().as_micros() as u64;
                let payload = PayloadStamp { publisher: publishing.index, sent_us }.write(size);
                publishing.seq[0] = publishing.seq[0].wrapping_add(1);
                let ts = (at.as_micros() as u64 * 48 / 1000) as u32;
                let mut packet =
                    m::rtp_packet(publishing.payload_type[0], publishing.seq[0], ts, publishing.ssrc[0], false);
                if let Some(id) = publishing.level_id {
                    let _ =
                        packet.header.set_extension(id, Bytes::copy_from_slice(&[m::audio_level_byte(level, voiced)]));
                }
                packet.payload = payload;
                let message = TaggedRTCMessage { now, message: RTCMessage::RtpPacket(String::new(), packet) };
                match client.pc.handle_write(message) {
                    Ok(()) => {
                        self.sent.audio += 1;
                        self.sent.voiced += u64::from(voiced);
                    }
                    Err(_) => self.sent.errors += 1,
                }
                publishing.next[0] += Duration::from_micros(talk::FRAME_US);
            }
            while publishing.video && publishing.next[1] <= now && publishing.next[1] < until {
                let at = publishing.next[1] - publishing.start;
                let keyframe = publishing.frames.is_multiple_of(VIDEO_KEYFRAME_EVERY);
                publishing.frames += 1;
                let size = if keyframe { 1100 } else { 400 + (publishing.frames % 5) as usize * 80 };
                let mut payload = vec![0u8; size];
                payload[0] = 0x10; // S=1, PID=0
                payload[1] = if keyframe { 0x00 } else { 0x01 }; // the P bit
                publishing.seq[1] = publishing.seq[1].wrapping_add(1);
                let ts = (at.as_micros() as u64 * 90 / 1000) as u32;
                let mut packet =
                    m::rtp_packet(publishing.payload_type[1], publishing.seq[1], ts, publishing.ssrc[1], true);
                packet.payload = Bytes::from(payload);
                let message = TaggedRTCMessage { now, message: RTCMessage::RtpPacket(String::new(), packet) };
                match client.pc.handle_write(message) {
                    Ok(()) => self.sent.video += 1,
                    Err(_) => self.sent.errors += 1,
                }
                publishing.next[1] += VIDEO_FRAME;
            }
        }
    }

    /// Every client's events, inbound packets and outbound datagrams.
    fn drain(&mut self, now: Instant) {
        let epoch = self.epoch;
        self.next_timer = None;
        for client in &mut self.clients {
            while let Some(event) = client.pc.poll_event() {
                match event {
                    RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                        RTCPeerConnectionState::Connected => {
                            client.connected = true;
                            for waiter in client.waiters.drain(..) {
                                let _ = waiter.send(true);
                            }
                        }
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                            client.failed = true;
                            client.connected = false;
                            for waiter in client.waiters.drain(..) {
                                let _ = waiter.send(false);
                            }
                        }
                        _ => {}
                    },
                    RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                        let kind = client.pc.rtp_receiver(init.receiver_id).map(|r| r.track().kind());
                        if let (Some((_, _, tracks)), Some(kind)) = (client.listening.as_mut(), kind) {
                            let media = if kind == RtpCodecKind::Video { MediaKind::Video } else { MediaKind::Audio };
                            tracks.insert(init.track_id, media);
                        }
                    }
                    _ => {}
                }
            }
            while let Some(message) = client.pc.poll_read() {
                let RTCMessage::RtpPacket(track_id, packet) = message.message else { continue };
                let Some((live, stats, tracks)) = client.listening.as_mut() else { continue };
                let media = tracks.get(&track_id).copied().unwrap_or(MediaKind::Audio);
                let lag = live
                    .live
                    .load(Ordering::Relaxed)
                    .then(|| (live.lag_us.load(Ordering::Relaxed), live.since_us.load(Ordering::Relaxed)));
                account(stats, media, packet.header.sequence_number, message.now, &packet.payload, epoch, lag);
            }
            while let Some(out) = client.pc.poll_write() {
                if out.transport.transport_protocol == TransportProtocol::UDP {
                    let _ = client.socket.send_to(&out.message, out.transport.peer_addr);
                }
            }
            if let Some(at) = client.pc.poll_timeout() {
                self.next_timer = Some(self.next_timer.map_or(at, |t| t.min(at)));
            }
        }
        let _ = now;
    }

    fn next_wakeup(&self, now: Instant) -> Instant {
        let mut next = now + Duration::from_millis(5);
        if let Some(at) = self.next_timer {
            next = next.min(at);
        }
        for client in &self.clients {
            if self.talk_until.is_some()
                && let Some(publishing) = &client.publishing
                && publishing.spurts.is_some()
            {
                next = next.min(publishing.next[0]);
                if publishing.video {
                    next = next.min(publishing.next[1]);
                }
            }
        }
        next
    }
}
