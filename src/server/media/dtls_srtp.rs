//! DTLS-SRTP of one connection, run by Encore itself: the `rtc` family's DTLS endpoint
//! (`rtc::dtls`) for the handshake and its SRTP contexts (`rtc::srtp`) keyed from the
//! handshake's exporter (RFC 5764), outside `rtc`'s `RTCPeerConnection`.
//!
//! Why: `RTCPeerConnection` keeps a connection's SRTP contexts and its DTLS exporter private,
//! so every outgoing packet has to walk its handler chain (docs/performance.md, "Where the new
//! path's time goes"). The next step of the media fast path is to keep `RTCPeerConnection` for
//! SDP and ICE and route a connection's DTLS records here instead (the router already tells
//! datagrams apart by their first byte, RFC 7983), so that the worker protects a tick's
//! packets with the connection's own context straight into its `sendmmsg` batch. This module
//! is that piece, tested on its own (a client and a server on loopback in memory, both
//! profiles, a wrong fingerprint, garbage, a lost flight); a listener leg uses it
//! (`listener_leg.rs`).
//!
//! The rules it keeps, those of RFC 8827/8842 as browsers apply them: each side presents a
//! self-signed certificate and checks the other's against the SHA-256 fingerprint its SDP
//! announced (no fingerprint match, no keys); the extended master secret is required; SRTP
//! profiles offered are AEAD_AES_128_GCM first, then AES_CM_128_HMAC_SHA1_80.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use rtc::crypto::{HashAlgorithm, RTCCryptoProvider};
use rtc::dtls::config::{ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, VerifyPeerCertificateFn};
use rtc::dtls::endpoint::{Endpoint, EndpointEvent};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::shared::TransportProtocol;
use rtc::srtp::config::{Config as SrtpConfig, LABEL_EXTRACTOR_DTLS_SRTP};
use rtc::srtp::context::Context;
use rtc::srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use rtc::srtp::protection_profile::ProtectionProfile;

/// Packets of the remote side remembered against replays, each way (as `rtc` does).
const REPLAY_WINDOW: usize = 64;

/// The label the DTLS endpoint files the one association under: the router, not the endpoint,
/// knows where the connection's datagrams come from (they may move: NAT rebinding, ICE-TCP).
const ASSOCIATION: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9));

#[derive(Debug, thiserror::Error)]
pub enum DtlsSrtpError {
    #[error("the DTLS configuration is not usable: {0}")]
    Config(String),
    #[error("the fingerprint {0:?} is not a SHA-256 fingerprint (`sha-256 AB:CD:...`)")]
    Fingerprint(String),
    #[error("DTLS failed: {0}")]
    Dtls(#[source] rtc::shared::error::Error),
    #[error("the DTLS handshake gave no SRTP keys: {0}")]
    Keys(String),
    #[error("the peer closed the DTLS association")]
    Closed,
}

impl DtlsSrtpError {
    /// A stable code for counting and logs.
    pub fn code(&self) -> &'static str {
        match self {
            DtlsSrtpError::Config(_) => "dtls-config",
            DtlsSrtpError::Fingerprint(_) => "dtls-fingerprint-format",
            DtlsSrtpError::Dtls(_) => "dtls-failed",
            DtlsSrtpError::Keys(_) => "srtp-keys",
            DtlsSrtpError::Closed => "dtls-closed",
        }
    }
}

/// The SHA-256 fingerprint of a certificate, as an SDP `a=fingerprint` announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Reads `sha-256 AB:CD:...` (the attribute's value; the algorithm's case does not matter).
    pub fn parse(value: &str) -> Result<Self, DtlsSrtpError> {
        let bad = || DtlsSrtpError::Fingerprint(value.chars().take(120).collect());
        let (algorithm, hex) = value.trim().split_once(' ').ok_or_else(bad)?;
        if !algorithm.eq_ignore_ascii_case("sha-256") {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        let mut parts = hex.trim().split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Fingerprint(bytes))
    }

    /// The fingerprint of a DER certificate.
    pub fn of(crypto: &Arc<dyn RTCCryptoProvider>, der: &[u8]) -> Result<Self, DtlsSrtpError> {
        let hash =
            crypto.crypto().hash(HashAlgorithm::Sha256, der).map_err(|e| DtlsSrtpError::Config(e.to_string()))?;
        let bytes: [u8; 32] =
            hash.as_slice().try_into().map_err(|_| DtlsSrtpError::Config("a SHA-256 of 32 bytes".into()))?;
        Ok(Fingerprint(bytes))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha-256 ")?;
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

/// Which end of the handshake this side is (`a=setup`: `active` is the DTLS client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtlsRole {
    Client,
    Server,
}

/// A connection's SRTP once DTLS is up: what it sends is protected with `outbound`, what it
/// receives is checked and opened with `inbound` (with replay protection).
pub struct SrtpPair {
    pub profile: ProtectionProfile,
    pub outbound: Context,
    pub inbound: Context,
}

/// One connection's DTLS association and, once it is up, its SRTP contexts.
pub struct DtlsSrtp {
    endpoint: Endpoint,
    crypto: Arc<dyn RTCCryptoProvider>,
    srtp: Option<SrtpPair>,
}

impl DtlsSrtp {
    /// An association presenting `certificate` and accepting only a peer whose certificate has
    /// the `remote` fingerprint. A client sends its first flight at once ([`Self::poll_datagram`]).
    pub fn new(
        crypto: Arc<dyn RTCCryptoProvider>,
        certificate: &RTCCertificate,
        role: DtlsRole,
        remote: Fingerprint,
        now: Instant,
    ) -> Result<Self, DtlsSrtpError> {
        Self::with_profiles(crypto, certificate, role, remote, now, &OFFERED_PROFILES)
    }

    fn with_profiles(
        crypto: Arc<dyn RTCCryptoProvider>,
        certificate: &RTCCertificate,
        role: DtlsRole,
        remote: Fingerprint,
        now: Instant,
        profiles: &[SrtpProtectionProfile],
    ) -> Result<Self, DtlsSrtpError> {
        let checker = crypto.clone();
        let verify: VerifyPeerCertificateFn = Arc::new(move |certs, _| {
            let presented = certs.first().ok_or(rtc::shared::error::Error::ErrNonCertificate)?;
            match Fingerprint::of(&checker, presented) {
                Ok(fingerprint) if fingerprint == remote => Ok(()),
                _ => Err(rtc::shared::error::Error::ErrNoMatchingCertificateFingerprint),
            }
        });
        let is_client = role == DtlsRole::Client;
        let config = ConfigBuilder::default()
            .with_crypto_provider(crypto.clone())
            .with_certificates(vec![certificate.dtls_certificate.clone()])
            .with_srtp_protection_profiles(profiles.to_vec())
            .with_client_auth(ClientAuthType::RequireAnyClientCert)
            // Self-signed certificates: the fingerprint check above is the verification.
            .with_insecure_skip_verify(true)
            .with_verify_peer_certificate(Some(verify))
            .with_extended_master_secret(ExtendedMasterSecretType::Require)
            .build(is_client, None)
            .map_err(|e| DtlsSrtpError::Config(e.to_string()))?;
        let config = Arc::new(config);
        let local = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        // A server answers the first flight that comes; a client sends its own at once.
        let endpoint = match role {
            DtlsRole::Server => Endpoint::new(local, TransportProtocol::UDP, Some(config)),
            DtlsRole::Client => {
                let mut endpoint = Endpoint::new(local, TransportProtocol::UDP, None);
                endpoint.connect(now, ASSOCIATION, config, None).map_err(DtlsSrtpError::Dtls)?;
                endpoint
            }
        };
        Ok(DtlsSrtp { endpoint, crypto, srtp: None })
    }

    /// One datagram of DTLS records from the peer (first byte 20..=63, RFC 7983). A datagram
    /// that fails (garbage, a wrong fingerprint, an alert) is an error: the caller counts it and,
    /// for a failed handshake, closes the connection.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) -> Result<(), DtlsSrtpError> {
        let events =
            self.endpoint.read(now, ASSOCIATION, None, BytesMut::from(datagram)).map_err(DtlsSrtpError::Dtls)?;
        for event in events {
            match event {
                EndpointEvent::HandshakeComplete => self.keys()?,
                EndpointEvent::PeerClosed => {
                    self.srtp = None;
                    return Err(DtlsSrtpError::Closed);
                }
                // WebRTC carries no application data over DTLS but SCTP, which Encore does not
                // negotiate: dropped.
                _ => {}
            }
        }
        Ok(())
    }

    /// Retransmits a flight whose answer did not come (a lost datagram).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsSrtpError> {
        if self.endpoint.poll_timeout(&ASSOCIATION).is_some_and(|at| at <= now) {
            self.endpoint.handle_timeout(ASSOCIATION, now).map_err(DtlsSrtpError::Dtls)?;
        }
        Ok(())
    }

    /// When [`Self::handle_timeout`] is due next, while the handshake runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.endpoint.poll_timeout(&ASSOCIATION)
    }

    /// The next datagram to send to the peer.
    pub fn poll_datagram(&mut self) -> Option<BytesMut> {
        self.endpoint.poll_transmit().map(|transmit| transmit.message)
    }

    /// Ends the association: a close_notify is queued ([`Self::poll_datagram`]) and the keys go.
    pub fn close(&mut self, now: Instant) {
        let _ = self.endpoint.close(now);
        self.srtp = None;
    }

    pub fn is_connected(&self) -> bool {
        self.srtp.is_some()
    }

    /// The connection's SRTP contexts, once the handshake completed.
    pub fn srtp(&mut self) -> Option<&mut SrtpPair> {
        self.srtp.as_mut()
    }

    /// Derives the SRTP contexts from the completed handshake (RFC 5764 section 4.2).
    fn keys(&mut self) -> Result<(), DtlsSrtpError> {
        let keys_error = |e: &dyn std::fmt::Display| DtlsSrtpError::Keys(e.to_string());
        let state = self.endpoint.get_connection_state(ASSOCIATION).ok_or_else(|| keys_error(&"no association"))?;
        let profile = match state.srtp_protection_profile() {
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            other => return Err(keys_error(&format!("{other:?} was not offered"))),
        };
        let mut config = SrtpConfig { profile, ..SrtpConfig::default() };
        let material = state
            .export_keying_material(LABEL_EXTRACTOR_DTLS_SRTP, &[], config.keying_material_len())
            .map_err(|e| keys_error(&e))?;
        config
            .set_session_keys_from_keying_material(material.as_ref(), state.is_client())
            .map_err(|e| keys_error(&e))?;
        let crypto = self.crypto.crypto();
        let keys = &config.keys;
        let outbound = Context::new(&keys.local_master_key, &keys.local_master_salt, profile, None, None, crypto)
            .map_err(|e| keys_error(&e))?;
        let inbound = Context::new(
            &keys.remote_master_key,
            &keys.remote_master_salt,
            profile,
            Some(srtp_replay_protection(REPLAY_WINDOW)),
            Some(srtcp_replay_protection(REPLAY_WINDOW)),
            crypto,
        )
        .map_err(|e| keys_error(&e))?;
        self.srtp = Some(SrtpPair { profile, outbound, inbound });
        Ok(())
    }
}

/// What a connection offers, best first: the AEAD profile (no separate MAC, a shorter tag),
/// then the one every WebRTC endpoint must support.
const OFFERED_PROFILES: [SrtpProtectionProfile; 2] =
    [SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm, SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80];

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rtc::crypto::SignatureScheme;
    use rtc::peer_connection::certificate::CertificateParams;

    use super::*;

    struct Side {
        crypto: Arc<dyn RTCCryptoProvider>,
        certificate: RTCCertificate,
    }

    impl Side {
        fn new() -> Self {
            let crypto = rtc::crypto::default_provider().expect("ring");
            let params = CertificateParams::new(vec!["encore".to_owned()]).expect("params");
            let certificate =
                RTCCertificate::generate(crypto.crypto(), SignatureScheme::EcdsaP256Sha256, params).expect("a cert");
            Side { crypto, certificate }
        }

        fn fingerprint(&self) -> Fingerprint {
            Fingerprint::of(&self.crypto, self.certificate.dtls_certificate.certificate[0].as_ref()).expect("hash")
        }
    }

    /// A client and a server that trust each other's fingerprints.
    fn pair(now: Instant, client_profiles: &[SrtpProtectionProfile]) -> (DtlsSrtp, DtlsSrtp) {
        let (a, b) = (Side::new(), Side::new());
        let client = DtlsSrtp::with_profiles(
            a.crypto.clone(),
            &a.certificate,
            DtlsRole::Client,
            b.fingerprint(),
            now,
            client_profiles,
        )
        .expect("client");
        let server =
            DtlsSrtp::new(b.crypto.clone(), &b.certificate, DtlsRole::Server, a.fingerprint(), now).expect("server");
        (client, server)
    }

    /// Carries datagrams both ways until neither side has more to say; `lose` drops the n-th
    /// datagram the server sends (counting from 0). Returns the datagrams carried.
    fn exchange(client: &mut DtlsSrtp, server: &mut DtlsSrtp, now: Instant, lose: Option<usize>) -> usize {
        let (mut carried, mut from_server) = (0, 0);
        loop {
            let mut moved = false;
            while let Some(datagram) = client.poll_datagram() {
                server.handle_datagram(now, &datagram).expect("the server takes the client's flight");
                (moved, carried) = (true, carried + 1);
            }
            while let Some(datagram) = server.poll_datagram() {
                from_server += 1;
                if lose == Some(from_server - 1) {
                    continue;
                }
                client.handle_datagram(now, &datagram).expect("the client takes the server's flight");
                (moved, carried) = (true, carried + 1);
            }
            if !moved {
                return carried;
            }
        }
    }

    fn rtp(seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x80, 111];
        packet.extend_from_slice(&seq.to_be_bytes());
        packet.extend_from_slice(&(u32::from(seq) * 960).to_be_bytes());
        packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        packet.extend_from_slice(payload);
        packet
    }

    /// A receiver report with one report block.
    fn rtcp() -> Vec<u8> {
        let mut packet = vec![0x81, 201, 0, 7];
        packet.extend_from_slice(&0x0BAD_CAFEu32.to_be_bytes());
        packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        packet.extend_from_slice(&[0u8; 20]);
        packet
    }

    fn both_ways(client: &mut DtlsSrtp, server: &mut DtlsSrtp) {
        for seq in [1u16, 2, 3, 65535, 0] {
            let packet = rtp(seq, b"an opus frame, or near enough");
            let protected = server.srtp().expect("keys").outbound.encrypt_rtp(&packet).expect("protect");
            assert_ne!(&protected[12..], &packet[12..], "the payload went out in clear");
            let opened = client.srtp().expect("keys").inbound.decrypt_rtp(&protected).expect("open");
            assert_eq!(&opened[..], &packet[..]);
            let protected = client.srtp().expect("keys").outbound.encrypt_rtp(&packet).expect("protect");
            let opened = server.srtp().expect("keys").inbound.decrypt_rtp(&protected).expect("open");
            assert_eq!(&opened[..], &packet[..]);
        }
        let report = rtcp();
        let protected = client.srtp().expect("keys").outbound.encrypt_rtcp(&report).expect("protect");
        let opened = server.srtp().expect("keys").inbound.decrypt_rtcp(&protected).expect("open");
        assert_eq!(&opened[..], &report[..]);
        // A replayed packet is refused.
        let packet = rtp(7, b"once");
        let protected = server.srtp().expect("keys").outbound.encrypt_rtp(&packet).expect("protect");
        client.srtp().expect("keys").inbound.decrypt_rtp(&protected).expect("the first time");
        assert!(client.srtp().expect("keys").inbound.decrypt_rtp(&protected).is_err(), "a replay was opened");
    }

    #[test]
    fn a_handshake_keys_srtp_both_ways_with_the_aead_profile_first() {
        let now = Instant::now();
        let (mut client, mut server) = pair(now, &OFFERED_PROFILES);
        assert!(!client.is_connected() && !server.is_connected());
        let carried = exchange(&mut client, &mut server, now, None);
        assert!(client.is_connected() && server.is_connected(), "not connected after {carried} datagrams");
        assert!(matches!(server.srtp().expect("keys").profile, ProtectionProfile::AeadAes128Gcm));
        both_ways(&mut client, &mut server);
    }

    #[test]
    fn a_peer_offering_only_the_hmac_profile_gets_it() {
        let now = Instant::now();
        let (mut client, mut server) = pair(now, &[SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80]);
        exchange(&mut client, &mut server, now, None);
        assert!(matches!(server.srtp().expect("keys").profile, ProtectionProfile::Aes128CmHmacSha1_80));
        assert!(matches!(client.srtp().expect("keys").profile, ProtectionProfile::Aes128CmHmacSha1_80));
        both_ways(&mut client, &mut server);
    }

    #[test]
    fn a_certificate_that_is_not_the_announced_one_gets_no_keys() {
        let now = Instant::now();
        let (a, b, stranger) = (Side::new(), Side::new(), Side::new());
        let mut client =
            DtlsSrtp::new(a.crypto.clone(), &a.certificate, DtlsRole::Client, b.fingerprint(), now).expect("client");
        // The server expects someone else's certificate.
        let mut server =
            DtlsSrtp::new(b.crypto.clone(), &b.certificate, DtlsRole::Server, stranger.fingerprint(), now).expect("s");
        let mut refused = None;
        for _ in 0..10 {
            while let Some(datagram) = client.poll_datagram() {
                if let Err(error) = server.handle_datagram(now, &datagram) {
                    refused = Some(error);
                }
            }
            while let Some(datagram) = server.poll_datagram() {
                let _ = client.handle_datagram(now, &datagram);
            }
        }
        let refused = refused.expect("the server refused the client's certificate");
        assert_eq!(refused.code(), "dtls-failed", "{refused}");
        assert!(!server.is_connected(), "keys for a certificate nobody announced");
    }

    #[test]
    fn garbage_is_an_error_and_the_handshake_still_completes_after_a_lost_flight() {
        let now = Instant::now();
        let (mut client, mut server) = pair(now, &OFFERED_PROFILES);
        for garbage in [&[][..], &[22u8][..], &[22u8, 0xfe, 0xfd, 0, 0][..], &[23u8; 200][..]] {
            // An error or nothing, never a panic, and never keys.
            let _ = server.handle_datagram(now, garbage);
            assert!(!server.is_connected());
        }
        // The server's first flight is lost: the client retransmits its own when its timer
        // fires, and the server answers again.
        exchange(&mut client, &mut server, now, Some(0));
        assert!(!client.is_connected());
        let due = client.poll_timeout().expect("a retransmission timer");
        let later = due.max(now) + Duration::from_millis(1);
        client.handle_timeout(later).expect("retransmit");
        exchange(&mut client, &mut server, later, None);
        assert!(client.is_connected() && server.is_connected());
        both_ways(&mut client, &mut server);
    }

    #[test]
    fn fingerprints_read_as_sdp_writes_them() {
        let side = Side::new();
        let fingerprint = side.fingerprint();
        let written = fingerprint.to_string();
        assert!(written.starts_with("sha-256 ") && written.len() == 8 + 32 * 3 - 1, "{written}");
        assert_eq!(Fingerprint::parse(&written).expect("parse"), fingerprint);
        assert_eq!(
            Fingerprint::parse(&written.to_lowercase().replace("sha-256", "SHA-256")).expect("case"),
            fingerprint
        );
        for bad in ["", "sha-1 AB:CD", "sha-256", "sha-256 AB:CD", &format!("{written}:00"), &written.replace(':', "-")]
        {
            let error = Fingerprint::parse(bad).expect_err(bad);
            assert_eq!(error.code(), "dtls-fingerprint-format");
        }
    }
}
