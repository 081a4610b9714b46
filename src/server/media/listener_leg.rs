//! A listener leg's media on the worker itself: its DTLS-SRTP ([`DtlsSrtp`]), every RTP packet
//! written and protected straight into the tick's batch, its sender reports, and the listener's
//! SRTCP read (NACK, PLI, FIR, receiver reports).
//!
//! Why: a listener leg is where an SFU's packets fan out (one packet in, one out per listener),
//! and `rtc`'s `RTCPeerConnection` makes each of them walk its handler chain (interceptors, SRTP,
//! DTLS, ICE, a queue each, several copies): that was most of what a forwarded packet cost
//! (docs/performance.md). The leg's `RTCPeerConnection` still makes its SDP and runs its
//! ICE-lite agent (checks, consent, its timeouts) but never sees the leg's DTLS, SRTP or SRTCP:
//! the answer it is given always says `a=setup:active`, so it waits as a DTLS server for records
//! that never reach it, whichever role the listener took. A publisher leg stays whole on `rtc`
//! (its NACK generator, receiver reports and transport-wide feedback serve the publisher's
//! congestion control).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use rtc::crypto::RTCCryptoProvider;
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::rtcp::sender_report::SenderReport;

use super::dtls_srtp::{DtlsRole, DtlsSrtp, DtlsSrtpError, Fingerprint};
use crate::media::{self as m, RtcpTally};

/// Sender reports go out this often per leg (RFC 3550 allows more for a stream this small; a
/// browser needs them only for its round-trip time and `remote-outbound-rtp` figures).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// The first report, this long after the first packet.
const FIRST_REPORT: Duration = Duration::from_millis(500);
/// Seconds from 1900 (NTP's epoch) to 1970 (Unix's).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
/// Every byte value, so that a header's audio-level extension borrows its one byte instead of
/// allocating it.
static BYTE_VALUES: [u8; 256] = {
    let mut values = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        values[i] = i as u8;
        i += 1;
    }
    values
};

/// What the leg's answer says of its DTLS, and the answer as `rtc`'s agent is to see it.
#[derive(Debug)]
pub struct AnswerDtls {
    pub role: DtlsRole,
    pub fingerprint: Fingerprint,
    pub answer_for_rtc: String,
}

/// Why an answer cannot key a listener leg.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("the answer has no a=fingerprint with sha-256")]
    NoFingerprint,
    #[error(transparent)]
    Fingerprint(#[from] DtlsSrtpError),
}

/// Reads the role (`a=setup:active` makes the listener the DTLS client, `passive` makes us the
/// client) and the listener's SHA-256 fingerprint (session or media level: one transport,
/// BUNDLE) out of its answer.
pub fn answer_dtls(answer: &str) -> Result<AnswerDtls, AnswerError> {
    let attribute = |line: &str, name: &str| line.trim_end().strip_prefix(name).map(str::to_owned);
    let fingerprint = answer
        .lines()
        .filter_map(|line| attribute(line, "a=fingerprint:"))
        .find(|value| value.trim_start().get(..8).is_some_and(|a| a.eq_ignore_ascii_case("sha-256 ")))
        .ok_or(AnswerError::NoFingerprint)?;
    let fingerprint = Fingerprint::parse(&fingerprint)?;
    let passive = answer.lines().any(|line| attribute(line, "a=setup:").is_some_and(|v| v.trim() == "passive"));
    let role = if passive { DtlsRole::Client } else { DtlsRole::Server };
    let answer_for_rtc = if passive { answer.replace("a=setup:passive", "a=setup:active") } else { answer.to_owned() };
    Ok(AnswerDtls { role, fingerprint, answer_for_rtc })
}

/// Why a datagram of a listener leg was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegDrop {
    /// SRTCP before the keys, or one that fails its tag, replays or does not parse.
    Srtcp,
    /// RTP from a listener: its leg is receive-only.
    Rtp,
}

/// What the leg sent of one stream, for its sender reports.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    ssrc: u32,
    clock_rate: u32,
    packets: u32,
    octets: u32,
    /// The last packet's RTP timestamp and when it left.
    last: Option<(u32, Instant)>,
}

/// One listener leg's DTLS-SRTP and RTCP.
pub struct ListenerLeg {
    dtls: DtlsSrtp,
    /// `rtc`'s ICE agent said the leg is connected (and has not said failed since).
    pub ice_connected: bool,
    /// The ICE-TCP stream (by its peer) the leg's datagrams go on, when its path is TCP.
    pub tcp_peer: Option<SocketAddr>,
    tally: RtcpTally,
    sent: [Sent; 2],
    next_report: Option<Instant>,
    scratch: Vec<u8>,
    /// The header `scratch` starts with, handed to SRTP so that it need not parse (and allocate)
    /// it again; reused, its extension list keeps its one slot.
    header: rtc::rtp::header::Header,
}

impl ListenerLeg {
    pub fn new(
        crypto: Arc<dyn RTCCryptoProvider>,
        certificate: &RTCCertificate,
        answer: &AnswerDtls,
        now: Instant,
    ) -> Result<Self, DtlsSrtpError> {
        let dtls = DtlsSrtp::new(crypto, certificate, answer.role, answer.fingerprint, now)?;
        Ok(ListenerLeg {
            dtls,
            ice_connected: false,
            tcp_peer: None,
            tally: RtcpTally::default(),
            sent: [Sent::default(); 2],
            next_report: None,
            scratch: Vec::with_capacity(1500),
            header: rtc::rtp::header::Header::default(),
        })
    }

    /// ICE is up and the DTLS handshake is done: media may flow.
    pub fn is_connected(&self) -> bool {
        self.ice_connected && self.dtls.is_connected()
    }

    /// A datagram of DTLS records from the listener.
    pub fn handle_dtls(&mut self, now: Instant, datagram: &[u8]) -> Result<(), DtlsSrtpError> {
        self.dtls.handle_datagram(now, datagram)
    }

    /// The next DTLS datagram for the listener.
    pub fn poll_dtls(&mut self) -> Option<BytesMut> {
        self.dtls.poll_datagram()
    }

    /// The leg's next deadline: a DTLS retransmission or a sender report.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.dtls.poll_timeout(), self.next_report].into_iter().flatten().min()
    }

    /// When the next sender report is due (cheap: read on every packet sent).
    pub fn report_due(&self) -> Option<Instant> {
        self.next_report
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsSrtpError> {
        self.dtls.handle_timeout(now)
    }

    /// Ends the leg's DTLS (a close_notify to send).
    pub fn close(&mut self, now: Instant) {
        self.dtls.close(now);
    }

    /// One RTP packet of stream `index` (0 audio, 1 video), written and protected: the datagram
    /// to send. None before the keys (the caller checks [`Self::is_connected`] first).
    #[allow(clippy::too_many_arguments)]
    pub fn rtp(
        &mut self,
        now: Instant,
        index: usize,
        clock_rate: u32,
        payload_type: u8,
        ssrc: u32,
        seq: u16,
        ts: u32,
        marker: bool,
        level: Option<(u8, u8)>,
        payload: &[u8],
    ) -> Option<BytesMut> {
        let srtp = self.dtls.srtp()?;
        self.scratch.clear();
        m::write_rtp(&mut self.scratch, payload_type, seq, ts, ssrc, marker, level, payload);
        // The same header as a struct (what `write_rtp` wrote; a test decrypts and compares).
        let header = &mut self.header;
        header.version = 2;
        header.marker = marker;
        header.payload_type = payload_type & 0x7f;
        header.sequence_number = seq;
        header.timestamp = ts;
        header.ssrc = ssrc;
        header.extensions.clear();
        header.extension = false;
        if let Some((id, value)) = level.filter(|(id, _)| (1..=14).contains(id)) {
            header.extension = true;
            header.extension_profile = rtc::rtp::header::EXTENSION_PROFILE_ONE_BYTE;
            let byte = Bytes::from_static(&BYTE_VALUES[value as usize..value as usize + 1]);
            header.extensions.push(rtc::rtp::header::Extension { id, payload: byte });
        }
        let protected = srtp.outbound.encrypt_rtp_with_header(&self.scratch, header).ok()?;
        let sent = &mut self.sent[index];
        if sent.ssrc != ssrc || sent.last.is_none() {
            *sent = Sent { ssrc, clock_rate, ..Sent::default() };
            self.tally.bind_stream(ssrc, clock_rate);
        }
        sent.packets = sent.packets.wrapping_add(1);
        sent.octets = sent.octets.wrapping_add(payload.len() as u32);
        sent.last = Some((ts, now));
        self.next_report.get_or_insert(now + FIRST_REPORT);
        Some(protected)
    }

    /// The leg's sender reports when they are due (one compound SRTCP packet for its streams).
    pub fn reports(&mut self, now: Instant) -> Option<BytesMut> {
        if self.next_report.is_none_or(|at| at > now) {
            return None;
        }
        self.next_report = Some(now + REPORT_INTERVAL);
        let ntp_time = ntp_now();
        let reports: Vec<Box<dyn rtc::rtcp::Packet>> = self
            .sent
            .iter()
            .filter_map(|sent| {
                let (ts, at) = sent.last?;
                // The RTP time of this instant on the stream's clock, from its last packet.
                let elapsed = now.saturating_duration_since(at).as_secs_f64() * f64::from(sent.clock_rate);
                let report = SenderReport {
                    ssrc: sent.ssrc,
                    ntp_time,
                    rtp_time: ts.wrapping_add(elapsed as u32),
                    packet_count: sent.packets,
                    octet_count: sent.octets,
                    reports: Vec::new(),
                    profile_extensions: Bytes::new(),
                };
                Some(Box::new(report) as Box<dyn rtc::rtcp::Packet>)
            })
            .collect();
        if reports.is_empty() {
            return None;
        }
        reports.iter().for_each(|report| self.tally.outbound(report.as_ref(), now));
        let raw = rtc::rtcp::packet::marshal(&reports).ok()?;
        self.dtls.srtp()?.outbound.encrypt_rtcp(&raw).ok()
    }

    /// A datagram of RTP or RTCP (first byte 128..=191) from the listener: its RTCP packets, read
    /// and counted in the metrics.
    pub fn read_rtcp(&mut self, now: Instant, datagram: &[u8]) -> Result<Vec<Box<dyn rtc::rtcp::Packet>>, LegDrop> {
        // RFC 5761: payload types 64..=95 (with the marker bit, 192..=223) are RTCP.
        if !datagram.get(1).is_some_and(|b| (192..=223).contains(b)) {
            return Err(LegDrop::Rtp);
        }
        let srtp = self.dtls.srtp().ok_or(LegDrop::Srtcp)?;
        let plain = srtp.inbound.decrypt_rtcp(datagram).map_err(|_| LegDrop::Srtcp)?;
        let mut plain = plain.freeze();
        let packets = rtc::rtcp::packet::unmarshal(&mut plain).map_err(|_| LegDrop::Srtcp)?;
        debug_assert!(!plain.has_remaining());
        packets.iter().for_each(|packet| self.tally.inbound(packet.as_ref(), now));
        Ok(packets)
    }
}

/// The wall clock as a 64-bit NTP timestamp (what a sender report carries).
fn ntp_now() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs() + NTP_UNIX_OFFSET;
    let fraction = (u64::from(since.subsec_nanos()) << 32) / 1_000_000_000;
    (seconds << 32) | fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    const FINGERPRINT: &str = "sha-256 \
        AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    #[test]
    fn an_active_listener_makes_us_the_dtls_server_and_its_answer_goes_to_rtc_unchanged() {
        let answer =
            format!("v=0\r\na=fingerprint:{FINGERPRINT}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=setup:active\r\n");
        let dtls = answer_dtls(&answer).expect("keys");
        assert_eq!(dtls.role, DtlsRole::Server);
        assert_eq!(dtls.answer_for_rtc, answer);
        assert_eq!(dtls.fingerprint, Fingerprint::parse(FINGERPRINT).expect("parse"));
    }

    #[test]
    fn a_passive_listener_makes_us_the_client_and_rtc_is_told_active() {
        let answer = format!(
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fingerprint:sha-1 AB:CD\r\na=fingerprint:{FINGERPRINT}\r\na=setup:passive\r\n"
        );
        let dtls = answer_dtls(&answer).expect("keys");
        assert_eq!(dtls.role, DtlsRole::Client);
        assert!(dtls.answer_for_rtc.contains("a=setup:active") && !dtls.answer_for_rtc.contains("passive"));
    }

    #[test]
    fn an_answer_without_a_sha256_fingerprint_is_refused() {
        let answer = "v=0\r\na=fingerprint:sha-1 AB:CD\r\na=setup:active\r\n";
        assert!(matches!(answer_dtls(answer), Err(AnswerError::NoFingerprint)));
        let answer = "v=0\r\na=fingerprint:sha-256 AB:CD\r\na=setup:active\r\n";
        assert!(matches!(answer_dtls(answer), Err(AnswerError::Fingerprint(_))));
    }

    fn certificate(crypto: &Arc<dyn RTCCryptoProvider>) -> (RTCCertificate, Fingerprint) {
        use rtc::crypto::SignatureScheme;
        use rtc::peer_connection::certificate::CertificateParams;
        let params = CertificateParams::new(vec!["encore".to_owned()]).expect("params");
        let certificate =
            RTCCertificate::generate(crypto.crypto(), SignatureScheme::EcdsaP256Sha256, params).expect("a cert");
        let fingerprint = Fingerprint::of(crypto, certificate.dtls_certificate.certificate[0].as_ref()).expect("hash");
        (certificate, fingerprint)
    }

    /// A listener (a DTLS client, as browsers answer) and our leg, handshaken in memory.
    fn connected() -> (ListenerLeg, DtlsSrtp, Instant) {
        let crypto = rtc::crypto::default_provider().expect("ring");
        let (ours, our_fingerprint) = certificate(&crypto);
        let (theirs, their_fingerprint) = certificate(&crypto);
        let now = Instant::now();
        let answer = format!("v=0\r\na=fingerprint:{their_fingerprint}\r\na=setup:active\r\n");
        let mut leg =
            ListenerLeg::new(crypto.clone(), &ours, &answer_dtls(&answer).expect("answer"), now).expect("leg");
        let mut listener = DtlsSrtp::new(crypto, &theirs, DtlsRole::Client, our_fingerprint, now).expect("client");
        for _ in 0..10 {
            while let Some(datagram) = listener.poll_datagram() {
                leg.handle_dtls(now, &datagram).expect("record");
            }
            while let Some(datagram) = leg.poll_dtls() {
                listener.handle_datagram(now, &datagram).expect("record");
            }
        }
        leg.ice_connected = true;
        assert!(leg.is_connected() && listener.is_connected());
        (leg, listener, now)
    }

    #[test]
    fn the_listener_opens_our_packets_and_reports_and_we_read_its_rtcp() {
        let (mut leg, mut listener, now) = connected();
        for (seq, level) in [(0u16, None), (1, Some((1, m::audio_level_byte(30, false)))), (2, Some((14, 0x7f)))] {
            let wire = leg.rtp(now, 0, 48_000, 111, 7, seq, 960 * u32::from(seq), false, level, b"frame").expect("rtp");
            let opened = listener.srtp().expect("keys").inbound.decrypt_rtp(&wire).expect("opens");
            let mut expected = Vec::new();
            m::write_rtp(&mut expected, 111, seq, 960 * u32::from(seq), 7, false, level, b"frame");
            assert_eq!(opened.to_vec(), expected);
        }
        assert!(leg.reports(now).is_none(), "not due yet");
        let later = now + FIRST_REPORT;
        let wire = leg.reports(later).expect("a sender report");
        let opened = listener.srtp().expect("keys").inbound.decrypt_rtcp(&wire).expect("opens");
        let packets = rtc::rtcp::packet::unmarshal(&mut opened.freeze()).expect("parses");
        let report = packets[0].as_any().downcast_ref::<SenderReport>().expect("an SR");
        assert_eq!((report.ssrc, report.packet_count, report.octet_count), (7, 3, 15));
        // 500 ms after the packet of timestamp 1920, on a 48 kHz clock.
        assert_eq!(report.rtp_time, 1920 + 24_000);
        assert_eq!(leg.poll_timeout(), Some(later + REPORT_INTERVAL));

        let nack = m::negative_ack(7, &[1, 2]);
        let raw = rtc::rtcp::packet::marshal(&[nack]).expect("marshal");
        let wire = listener.srtp().expect("keys").outbound.encrypt_rtcp(&raw).expect("protect");
        let packets = leg.read_rtcp(now, &wire).expect("read");
        assert_eq!(m::feedback(packets[0].as_ref()), Some(m::RtcpFeedback::Nack { media_ssrc: 7, seqs: vec![1, 2] }));
        assert_eq!(leg.read_rtcp(now, &wire).err(), Some(LegDrop::Srtcp), "a replay");
        let rtp = listener.srtp().expect("keys").outbound.encrypt_rtp(&[0x80, 111, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(leg.read_rtcp(now, &rtp.expect("protect")).err(), Some(LegDrop::Rtp));
        assert_eq!(leg.read_rtcp(now, &[0x80, 200, 0, 1]).err(), Some(LegDrop::Srtcp), "garbage");
    }

    #[test]
    fn ntp_time_is_after_1900_by_the_unix_offset() {
        let ntp = ntp_now();
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        assert!((ntp >> 32).abs_diff(unix + NTP_UNIX_OFFSET) <= 1);
    }
}
