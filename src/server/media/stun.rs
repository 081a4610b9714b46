//! Just enough STUN to route a datagram before any per-connection work: is it STUN, which
//! class, and the USERNAME's local ufrag (the part before ':'), read straight from the bytes
//! without allocating. The full check (MESSAGE-INTEGRITY with the connection's password) is
//! done with `rtc::stun` only once the ufrag names a connection we know.

use rtc::crypto::RTCCrypto;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::Message;

const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;
const ATTR_USERNAME: u16 = 0x0006;

/// The first byte of a STUN message is 0..=3 (RFC 7983), and the cookie is at 4..8.
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER && b[0] < 4 && u32::from_be_bytes([b[4], b[5], b[6], b[7]]) == MAGIC_COOKIE
}

/// STUN message class: 0 request, 1 indication, 2 success response, 3 error response.
pub fn class(b: &[u8]) -> u8 {
    let t = u16::from_be_bytes([b[0], b[1]]);
    (((t >> 4) & 1) | ((t >> 7) & 2)) as u8
}

/// The 96-bit transaction id (bytes 8..20).
pub fn transaction_id(b: &[u8]) -> [u8; 12] {
    let mut id = [0u8; 12];
    id.copy_from_slice(&b[8..20]);
    id
}

/// Whether the message carries USE-CANDIDATE (0x0025): the controlling side's nomination.
pub fn has_use_candidate(b: &[u8]) -> bool {
    attribute(b, 0x0025).is_some()
}

/// The USERNAME attribute's value, if present and well formed.
pub fn username(b: &[u8]) -> Option<&[u8]> {
    attribute(b, ATTR_USERNAME)
}

fn attribute(b: &[u8], wanted: u16) -> Option<&[u8]> {
    let length = u16::from_be_bytes([b[2], b[3]]) as usize;
    let end = HEADER.checked_add(length)?;
    if end > b.len() {
        return None;
    }
    let mut at = HEADER;
    while at + 4 <= end {
        let typ = u16::from_be_bytes([b[at], b[at + 1]]);
        let len = u16::from_be_bytes([b[at + 2], b[at + 3]]) as usize;
        let value = at + 4;
        if value + len > end {
            return None;
        }
        if typ == wanted {
            return Some(&b[value..value + len]);
        }
        at = value + ((len + 3) & !3);
    }
    None
}

/// The local (our) ufrag of a check sent to us: USERNAME is "<our ufrag>:<their ufrag>".
pub fn local_ufrag(b: &[u8]) -> Option<&str> {
    let user = username(b)?;
    let colon = user.iter().position(|&c| c == b':')?;
    std::str::from_utf8(&user[..colon]).ok()
}

/// Full decode and MESSAGE-INTEGRITY check with the short-term key (our ICE password).
pub fn integrity_ok(b: &[u8], pwd: &str, crypto: &dyn RTCCrypto) -> bool {
    let mut m = Message { raw: b.to_vec(), ..Message::default() };
    if m.decode().is_err() {
        return false;
    }
    MessageIntegrity::check(&mut m, pwd.as_bytes(), crypto).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::stun::attributes::ATTR_USERNAME as USERNAME;
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::message::{BINDING_REQUEST, TransactionId};
    use rtc::stun::textattrs::Username;

    #[test]
    fn reads_the_local_ufrag_and_checks_integrity() {
        let provider = rtc::crypto::default_provider().unwrap();
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(TransactionId::new()),
            Box::new(Username::new(USERNAME, "srv1:cli".to_owned())),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                "0123456789abcdef0123".to_owned(),
                provider.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
        assert!(is_stun(&m.raw));
        assert_eq!(class(&m.raw), 0);
        assert_eq!(local_ufrag(&m.raw), Some("srv1"));
        assert!(integrity_ok(&m.raw, "0123456789abcdef0123", provider.crypto()));
        assert!(!integrity_ok(&m.raw, "wrong-password-000000", provider.crypto()));
        assert!(!is_stun(&[0x80, 0, 0, 0]));
    }
}
