//! WebRTC building blocks shared by the server's media path (the sans-I/O `rtc` core) and the
//! Rust client (the `webrtc` crate, whose types are `rtc`'s, re-exported): codecs, the media
//! engine and interceptor chain of a leg, RTCP feedback, the RFC 6464 level, VP8 key frames and
//! the one RTP header builder.
//!
//! Traps this module exists to avoid (measured, see docs/dependencies.md): the audio-level header
//! extension is not registered by default; inbound RTCP (a listener's NACK and PLI) reaches the
//! application only through an interceptor that marks it, one packet per batch.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    Attribute, AttributedPacket, Interceptor, NackGeneratorBuilder, Packet, Registry, Slot, StreamInfo, TaggedPacket,
};
use rtc::peer_connection::configuration::interceptor_registry::{configure_rtcp_reports, configure_twcc_receiver_only};
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::RTCRtpTransceiverDirection;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;

pub use rtc::rtp::Packet as RtpPacket;
pub use rtc::rtp_transceiver::rtp_sender::RtpCodecKind as Kind;

pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
pub const OPUS_PAYLOAD_TYPE: u8 = 111;
pub const VP8_PAYLOAD_TYPE: u8 = 96;

pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

pub fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

/// The server's legs: [`media_engine_and_registry`] plus a [`WireTap`] that counts their RTCP
/// in the metrics. (The client, in tests and the load generator, shares the process with an
/// in-process server at times and must not add to the server's figures.)
pub fn server_engine_and_registry() -> Result<(MediaEngine, Registry), rtc::shared::error::Error> {
    let (engine, registry) = media_engine_and_registry()?;
    Ok((engine, registry.with(Slot::from(WIRE_TAP_SLOT), WireTap::default())))
}

/// Opus and VP8 with the audio-level extension, and the interceptors of an SFU leg: NACK
/// generation, RTCP reports, transport-wide congestion feedback, and inbound NACK/PLI/FIR handed
/// to the application. No NACK responder: the engine answers NACKs from its buffer.
pub fn media_engine_and_registry() -> Result<(MediaEngine, Registry), rtc::shared::error::Error> {
    let mut engine = MediaEngine::default();
    engine.register_codec(
        RTCRtpCodecParameters { rtp_codec: opus_codec(), payload_type: OPUS_PAYLOAD_TYPE },
        RtpCodecKind::Audio,
    )?;
    engine.register_codec(
        RTCRtpCodecParameters { rtp_codec: vp8_codec(), payload_type: VP8_PAYLOAD_TYPE },
        RtpCodecKind::Video,
    )?;
    // Feedback attaches to codecs already registered: after register_codec.
    for (typ, parameter) in [("nack", ""), ("nack", "pli"), ("ccm", "fir")] {
        engine.register_feedback(
            RTCPFeedback { typ: typ.to_owned(), parameter: parameter.to_owned() },
            RtpCodecKind::Video,
        );
    }
    engine.register_feedback(RTCPFeedback { typ: "nack".to_owned(), parameter: String::new() }, RtpCodecKind::Audio);
    engine.register_header_extension(
        RTCRtpHeaderExtensionCapability { uri: AUDIO_LEVEL_URI.to_owned() },
        RtpCodecKind::Audio,
        None::<RTCRtpTransceiverDirection>,
    )?;
    let registry = Registry::new().with(Slot::NackGenerator, NackGeneratorBuilder::new().build());
    let registry = configure_rtcp_reports(registry);
    let registry = configure_twcc_receiver_only(registry, &mut engine)?;
    let registry = registry.with(Slot::from(14_000), RtcpToApp::default());
    Ok((engine, registry))
}

/// The last interceptor: hands NACK, PLI and FIR to the application, one packet per message
/// (the core routes an inbound batch to a track by its first packet only), and drops the rest
/// of the inbound RTCP, which the interceptors before it have consumed.
#[derive(Default)]
pub struct RtcpToApp {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtcpToApp {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        match &message.message.packet {
            Packet::Rtcp(packets) => {
                for packet in packets {
                    let any = packet.as_any();
                    if any.is::<TransportLayerNack>()
                        || any.is::<PictureLossIndication>()
                        || any.is::<FullIntraRequest>()
                    {
                        self.read.push_back(TaggedPacket {
                            now: message.now,
                            transport: message.transport,
                            message: AttributedPacket::new(Packet::Rtcp(vec![packet.clone()]))
                                .with(Attribute::DeliverToApplication),
                        });
                    }
                }
            }
            _ => self.read.push_back(message),
        }
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(message);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for RtcpToApp {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// The tap's place: nearer the wire than every named slot (the lowest is 1 000), so it sees
/// every inbound packet first and every outbound one last, generated RTCP included.
const WIRE_TAP_SLOT: usize = 500;
/// Sender reports remembered for round-trip times (RFC 3550 §6.4.1): receivers answer the
/// latest within seconds, and we send a few a second at most.
const SENT_REPORTS: usize = 32;

/// Counts a server leg's RTCP at the wire: NACKs, PLIs and FIRs in and out (those the NACK
/// generator makes included), and each receiver report block about a stream we send (loss,
/// jitter, and the round-trip time from its LSR and DLSR against the sender reports this tap
/// saw leave). Passes every packet on unchanged.
#[derive(Default)]
pub struct WireTap {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    tally: RtcpTally,
}

/// What the metrics learn from a leg's RTCP, wherever it is read and written (`rtc`'s handler
/// chain through [`WireTap`], or the worker's own SRTCP on a listener leg): one definition.
#[derive(Default)]
pub struct RtcpTally {
    /// Our sender reports: the middle 32 bits of their NTP time (what a receiver echoes as
    /// LSR), and when they left.
    sent_reports: VecDeque<(u32, Instant)>,
    /// The clock rate of each stream we send, by SSRC: jitter comes in its units.
    clock_rates: HashMap<u32, u32>,
}

impl RtcpTally {
    /// A stream we send, and its clock rate.
    pub fn bind_stream(&mut self, ssrc: u32, clock_rate: u32) {
        self.clock_rates.insert(ssrc, clock_rate);
    }

    pub fn unbind_stream(&mut self, ssrc: u32) {
        self.clock_rates.remove(&ssrc);
    }

    /// One RTCP packet the peer sent us.
    pub fn inbound(&mut self, packet: &dyn rtc::rtcp::Packet, now: Instant) {
        let any = packet.as_any();
        if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
            crate::metrics::nack_in(nack.nacks.iter().map(|pair| pair.packet_list().len()).sum());
        } else if any.is::<PictureLossIndication>() {
            crate::metrics::pli_in();
        } else if any.is::<FullIntraRequest>() {
            crate::metrics::fir_in();
        } else if let Some(report) = any.downcast_ref::<ReceiverReport>() {
            report.reports.iter().for_each(|block| self.report_block(block, now));
        } else if let Some(report) = any.downcast_ref::<SenderReport>() {
            report.reports.iter().for_each(|block| self.report_block(block, now));
        }
    }

    /// One RTCP packet we send the peer.
    pub fn outbound(&mut self, packet: &dyn rtc::rtcp::Packet, now: Instant) {
        let any = packet.as_any();
        if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
            crate::metrics::nack_out(nack.nacks.iter().map(|pair| pair.packet_list().len()).sum());
        } else if any.is::<PictureLossIndication>() {
            crate::metrics::pli_out();
        } else if any.is::<FullIntraRequest>() {
            crate::metrics::fir_out();
        } else if let Some(report) = any.downcast_ref::<SenderReport>() {
            if self.sent_reports.len() == SENT_REPORTS {
                self.sent_reports.pop_front();
            }
            self.sent_reports.push_back(((report.ntp_time >> 16) as u32, now));
        }
    }

    fn report_block(&self, block: &ReceptionReport, now: Instant) {
        let Some(&clock_rate) = self.clock_rates.get(&block.ssrc).filter(|rate| **rate > 0) else { return };
        let jitter = Duration::from_secs_f64(f64::from(block.jitter) / f64::from(clock_rate));
        // No SR seen yet (LSR 0), or one we no longer remember: no round trip.
        let rtt = (block.last_sender_report != 0)
            .then(|| self.sent_reports.iter().find(|(lsr, _)| *lsr == block.last_sender_report))
            .flatten()
            .and_then(|(_, sent)| {
                let held = Duration::from_secs_f64(f64::from(block.delay) / 65_536.0);
                now.saturating_duration_since(*sent).checked_sub(held)
            });
        crate::metrics::receiver_report(f64::from(block.fraction_lost) / 256.0, jitter, rtt);
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for WireTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &message.message.packet {
            packets.iter().for_each(|packet| self.tally.inbound(packet.as_ref(), message.now));
        }
        self.read.push_back(message);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &message.message.packet {
            packets.iter().for_each(|packet| self.tally.outbound(packet.as_ref(), message.now));
        }
        self.write.push_back(message);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for WireTap {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.tally.bind_stream(info.ssrc, info.clock_rate);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.tally.unbind_stream(info.ssrc);
    }
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// What a listener's RTCP asks of us, and of which of its streams (the media SSRC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtcpFeedback {
    Nack { media_ssrc: u32, seqs: Vec<u16> },
    KeyframeRequest { media_ssrc: u32 },
}

/// Reads a NACK, PLI or FIR out of an inbound RTCP packet.
pub fn feedback(packet: &dyn rtc::rtcp::Packet) -> Option<RtcpFeedback> {
    let any = packet.as_any();
    if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
        let seqs = nack.nacks.iter().flat_map(|pair| pair.packet_list()).collect();
        return Some(RtcpFeedback::Nack { media_ssrc: nack.media_ssrc, seqs });
    }
    if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
        return Some(RtcpFeedback::KeyframeRequest { media_ssrc: pli.media_ssrc });
    }
    if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
        let media_ssrc = fir.fir.first().map_or(fir.media_ssrc, |entry| entry.ssrc);
        return Some(RtcpFeedback::KeyframeRequest { media_ssrc });
    }
    None
}

/// A NACK naming `seqs` of a stream.
pub fn negative_ack(media_ssrc: u32, seqs: &[u16]) -> Box<dyn rtc::rtcp::Packet> {
    Box::new(TransportLayerNack {
        sender_ssrc: 0,
        media_ssrc,
        nacks: rtc::rtcp::transport_feedbacks::transport_layer_nack::nack_pairs_from_sequence_numbers(seqs),
    })
}

/// A PLI for a publisher's stream.
pub fn picture_loss(media_ssrc: u32) -> Box<dyn rtc::rtcp::Packet> {
    Box::new(PictureLossIndication { sender_ssrc: 0, media_ssrc })
}

/// An RTP packet with the header fields Encore writes (version 2, no CSRC, no extension
/// yet): the one place headers are built, for the server's listener legs and the client.
pub fn rtp_packet(payload_type: u8, seq: u16, ts: u32, ssrc: u32, marker: bool) -> RtpPacket {
    let mut packet = RtpPacket::default();
    packet.header.version = 2;
    packet.header.payload_type = payload_type;
    packet.header.sequence_number = seq;
    packet.header.timestamp = ts;
    packet.header.ssrc = ssrc;
    packet.header.marker = marker;
    packet
}

/// The wire bytes of the packet [`rtp_packet`] describes, with the RFC 6464 level (one-byte
/// extension `id`, RFC 8285) when given, appended to `out`: what the worker protects and sends
/// on a listener leg without building a [`RtpPacket`]. A test holds it equal to `rtc`'s own
/// marshalling of the same packet.
#[allow(clippy::too_many_arguments)]
pub fn write_rtp(
    out: &mut Vec<u8>,
    payload_type: u8,
    seq: u16,
    ts: u32,
    ssrc: u32,
    marker: bool,
    level: Option<(u8, u8)>,
    payload: &[u8],
) {
    let extension = level.filter(|(id, _)| (1..=14).contains(id));
    out.push(0x80 | if extension.is_some() { 0x10 } else { 0 });
    out.push(if marker { 0x80 } else { 0 } | (payload_type & 0x7f));
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&ts.to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    if let Some((id, value)) = extension {
        // Profile 0xBEDE, one 32-bit word: the element (id, length 1) and two bytes of padding.
        out.extend_from_slice(&[0xBE, 0xDE, 0, 1, id << 4, value, 0, 0]);
    }
    out.extend_from_slice(payload);
}

/// RFC 6464: (level 0..=127 in -dBov, V flag) from the negotiated extension id.
pub fn audio_level(header: &rtc::rtp::header::Header, extension_id: u8) -> Option<(u8, bool)> {
    let value = *header.get_extension(extension_id)?.first()?;
    Some((value & 0x7f, value & 0x80 != 0))
}

/// The one-byte RFC 6464 value.
pub fn audio_level_byte(level: u8, voice: bool) -> u8 {
    (if voice { 0x80 } else { 0 }) | (level & 0x7f)
}

/// The first packet of a VP8 key frame (RFC 7741): S=1 and PID=0 in the payload descriptor,
/// and the P bit of the first VP8 payload header byte is 0.
pub fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else { return false };
    let extended = first & 0x80 != 0;
    if first & 0x10 == 0 || first & 0x07 != 0 {
        return false;
    }
    let mut index = 1;
    if extended {
        let Some(&x) = payload.get(index) else { return false };
        index += 1;
        if x & 0x80 != 0 {
            let Some(&picture_id) = payload.get(index) else { return false };
            index += if picture_id & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            index += 1;
        }
        if x & 0x30 != 0 {
            index += 1;
        }
    }
    payload.get(index).is_some_and(|header| header & 0x01 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_wire_bytes_are_rtcs_own_marshalling() {
        use rtc::shared::marshal::Marshal;
        for (level, marker) in [(None, false), (Some((1u8, 42u8)), true), (Some((14, 0x7f)), false)] {
            let mut packet = rtp_packet(111, 65_535, 0xdead_beef, 0x0102_0304, marker);
            if let Some((id, value)) = level {
                packet.header.set_extension(id, bytes::Bytes::copy_from_slice(&[value])).expect("extension");
            }
            packet.payload = bytes::Bytes::from_static(b"opus frame");
            let theirs = packet.marshal().expect("marshal");
            let mut ours = Vec::new();
            write_rtp(&mut ours, 111, 65_535, 0xdead_beef, 0x0102_0304, marker, level, b"opus frame");
            assert_eq!(ours, theirs.to_vec(), "level {level:?}");
        }
    }

    #[test]
    fn vp8_key_frames_are_told_from_delta_frames() {
        assert!(vp8_keyframe_start(&[0x10, 0x50, 0x02, 0x00, 0x9d, 0x01, 0x2a]));
        assert!(!vp8_keyframe_start(&[0x10, 0x51, 0x02]), "P bit set: delta frame");
        assert!(!vp8_keyframe_start(&[0x00, 0x50]), "not a partition start");
        // Extended descriptor with a 15-bit picture id, then a key frame header.
        assert!(vp8_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x50]));
        assert!(!vp8_keyframe_start(&[]));
    }

    #[test]
    fn audio_levels_round_trip_through_the_extension_byte() {
        let mut packet = RtpPacket::default();
        packet.header.set_extension(3, bytes::Bytes::from(vec![audio_level_byte(42, true)])).unwrap();
        assert_eq!(audio_level(&packet.header, 3), Some((42, true)));
        assert_eq!(audio_level(&packet.header, 4), None);
    }
}
