//! The parts of the media fast path's next step, per forwarded packet, printed as figures
//! (`cargo bench --bench media`). Machines are shared and noisy: read orders of magnitude, and
//! compare ratios within one run.
//!
//! 1. `protect`: rewriting a forwarded packet's header (sequence number, timestamp, SSRC) and
//!    protecting it with the connection's SRTP context (`rtc::srtp`, as
//!    src/server/media/dtls_srtp.rs keys it), for each profile the server offers, with SRTP
//!    parsing the header out of the packet or given it (as a listener leg gives it);
//! 2. `send`: the same, then a tick's packets out with one `sendmmsg` per batch of 64
//!    (src/server/media/udp.rs) to a loopback socket another thread drains.
//!
//! Against these, docs/performance.md gives the whole server's cost per forwarded packet
//! through `rtc`'s `RTCPeerConnection` (24.6 µs at 20 x 300, of which about half is its
//! handler chain and the allocations in it).

use std::hint::black_box;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

use encore::server::media::udp;

/// A typical Opus packet at 20 ms: the RTP header with the audio-level extension, ~80 bytes.
fn packet() -> Vec<u8> {
    let mut packet = vec![0x90, 111, 0, 1, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0xBE, 0xDE, 0, 1, 0x10, 0x2A, 0, 0];
    packet.extend(std::iter::repeat_n(0x5Au8, 80));
    packet
}

fn context(profile: ProtectionProfile) -> Context {
    let crypto = rtc::crypto::default_provider().expect("ring");
    let key = vec![7u8; profile.key_len()];
    let salt = vec![9u8; profile.salt_len()];
    Context::new(&key, &salt, profile, None, None, crypto.crypto()).expect("an SRTP context")
}

/// Rewrites the header as play-out does for a listener's stream.
fn rewrite(packet: &mut [u8], n: u32) {
    packet[2..4].copy_from_slice(&(n as u16).to_be_bytes());
    packet[4..8].copy_from_slice(&n.wrapping_mul(960).to_be_bytes());
    packet[8..12].copy_from_slice(&0xCAFE_F00Du32.to_be_bytes());
}

/// `given`: the header is handed to SRTP as a reused struct (as a listener leg does,
/// src/server/media/listener_leg.rs), instead of SRTP parsing it out of the packet again.
fn protect(name: &str, profile: ProtectionProfile, packets: u32, given: bool) {
    let mut context = context(profile);
    let mut plain = packet();
    let mut header = rtc::rtp::header::Header {
        version: 2,
        extension: true,
        payload_type: 111,
        ssrc: 0xCAFE_F00D,
        extension_profile: rtc::rtp::header::EXTENSION_PROFILE_ONE_BYTE,
        extensions: vec![rtc::rtp::header::Extension { id: 1, payload: bytes::Bytes::from_static(&[0x2A]) }],
        ..Default::default()
    };
    let started = Instant::now();
    let mut bytes = 0;
    for n in 0..packets {
        rewrite(&mut plain, n);
        let protected = if given {
            header.sequence_number = n as u16;
            header.timestamp = n.wrapping_mul(960);
            context.encrypt_rtp_with_header(&plain, &header)
        } else {
            context.encrypt_rtp(&plain)
        };
        bytes += black_box(protected.expect("protect")).len();
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(packets);
    let how = if given { "header given" } else { "header parsed" };
    println!(
        "protect  {name:<28} {how:<14} {ns:>8.0} ns per packet ({} bytes each on the wire)",
        bytes / packets as usize
    );
}

fn send(name: &str, profile: ProtectionProfile, packets: u32, batch: usize) {
    let sink = UdpSocket::bind("127.0.0.1:0").expect("a sink");
    sink.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let to = sink.local_addr().expect("address");
    let done = Arc::new(AtomicBool::new(false));
    let drain = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            let mut got = 0u64;
            while !done.load(Ordering::Relaxed) {
                if sink.recv(&mut buffer).is_ok() {
                    got += 1;
                }
            }
            got
        })
    };
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    udp::set_buffers(&socket, 4 << 20);
    let mut context = context(profile);
    let mut plain = packet();
    let mut out = Vec::with_capacity(batch);
    let started = Instant::now();
    let mut sent = 0;
    for n in 0..packets {
        rewrite(&mut plain, n);
        out.push((to, context.encrypt_rtp(&plain).expect("protect")));
        if out.len() == batch {
            // A full send buffer drops the rest of the batch, as a real worker counts it.
            sent += udp::send_batch(&socket, &out).unwrap_or(0);
            out.clear();
        }
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let received = drain.join().expect("drain");
    let us = elapsed.as_secs_f64() * 1e6 / f64::from(packets);
    println!(
        "send     {name:<28} {us:>8.2} µs per packet, batches of {batch} ({sent} sent, {received} received by the sink)"
    );
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let profiles = [
        ("AEAD_AES_128_GCM", ProtectionProfile::AeadAes128Gcm),
        ("AES_CM_128_HMAC_SHA1_80", ProtectionProfile::Aes128CmHmacSha1_80),
    ];
    if wanted("protect") {
        for (name, profile) in profiles {
            for given in [false, true] {
                protect(name, profile, 1_000_000, given);
            }
        }
    }
    if wanted("send") {
        for (name, profile) in profiles {
            send(name, profile, 400_000, 64);
        }
    }
}
