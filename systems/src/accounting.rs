//! What the buffer really costs: the byte count the cap is held against.
//!
//! A packet's payload lives in its own `Arc<[u8]>` allocation: the allocator's chunk for
//! 16 bytes of reference counts plus the payload (glibc rounds a request plus its 8-byte
//! header up to 16, with a 32-byte minimum). Packet records live in vectors whose whole
//! capacity is counted. An utterance adds a fixed cost for its entity, components and
//! directory entries. The memory benchmark compares the sum with the process's resident
//! size.

use std::mem::size_of;

use encore_components::resources::BufferLedger;
use encore_components::track::{PreRoll, StagedPacket};
use encore_components::utterance::{Audience, BufferedPacket, PacketBuffer, Utterance};

/// The one place the ledger moves: something in the buffer (an utterance, a pre-roll ring)
/// that was accounted `before` bytes is now accounted `after` (0 when it is gone).
pub fn account(ledger: &mut BufferLedger, before: u64, after: u64) {
    assert!(ledger.bytes >= before, "the ledger ({}) holds less than an item in it ({before})", ledger.bytes);
    ledger.bytes = ledger.bytes - before + after;
    ledger.added += after.saturating_sub(before);
}

/// Bytes the allocator hands out for a request of `request` bytes.
pub fn allocation_bytes(request: usize) -> u64 {
    (((request + 8 + 15) & !15).max(32)) as u64
}

/// Bytes of one payload allocation.
pub fn payload_bytes(len: usize) -> u64 {
    allocation_bytes(16 + len)
}

/// Fixed cost of an utterance besides its packets: components in their tables, entity
/// metadata, directory entries, and the speaker name shared with the id.
pub const UTTERANCE_FIXED_BYTES: u64 =
    (size_of::<Utterance>() + size_of::<PacketBuffer>() + size_of::<Audience>() + 256) as u64;

/// The accounted bytes of an utterance's buffer, from scratch.
pub fn buffer_bytes(buffer: &PacketBuffer) -> u64 {
    UTTERANCE_FIXED_BYTES
        + buffer.audio.payload_bytes
        + buffer.video.payload_bytes
        + ((buffer.audio.packets.capacity() + buffer.video.packets.capacity()) * size_of::<BufferedPacket>()) as u64
}

/// The accounted bytes of a pre-roll ring, from scratch.
pub fn preroll_bytes(ring: &PreRoll) -> u64 {
    if ring.packets.capacity() == 0 {
        return 0;
    }
    let payloads: u64 = ring.packets.iter().map(|p| payload_bytes(p.payload.len())).sum();
    payloads + (ring.packets.capacity() * size_of::<StagedPacket>()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_round_like_glibc() {
        assert_eq!(allocation_bytes(0), 32);
        assert_eq!(allocation_bytes(24), 32);
        assert_eq!(allocation_bytes(25), 48);
        assert_eq!(payload_bytes(160), 192);
    }

    #[test]
    fn an_empty_buffer_costs_its_fixed_bytes() {
        assert_eq!(buffer_bytes(&PacketBuffer::default()), UTTERANCE_FIXED_BYTES);
        assert_eq!(preroll_bytes(&PreRoll::default()), 0);
    }
}
