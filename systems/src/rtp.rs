//! RTP arithmetic shared by the systems: unwrapping 16-bit sequence numbers and 32-bit
//! timestamps to 64 bits, and wrapping comparisons.

/// The first packet of a track is placed one full cycle up, so that packets reordered
/// before it still unwrap to a positive number.
pub const FIRST_SEQ_CYCLE: u64 = 1 << 16;
pub const FIRST_TS_CYCLE: u64 = 1 << 32;

/// Extends `seq` to 64 bits, choosing the value nearest to `reference` (RFC 3550 A.1).
/// `None` when it would fall below zero.
pub fn unwrap_seq(reference: u64, seq: u16) -> Option<u64> {
    let delta = seq.wrapping_sub(reference as u16) as i16 as i64;
    u64::try_from(reference as i64 + delta).ok()
}

/// Extends `ts` to 64 bits, choosing the value nearest to `reference`.
pub fn unwrap_ts(reference: u64, ts: u32) -> u64 {
    let delta = ts.wrapping_sub(reference as u32) as i32 as i64;
    (reference as i64 + delta).max(0) as u64
}

/// `a` is later than `b` in 32-bit timestamp space (less than half the space ahead).
pub fn ts_after(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000_0000
}

/// Converts a duration in clock-rate units to microseconds.
pub fn ticks_to_us(ticks: u64, clock_rate: u32) -> u64 {
    (ticks as u128 * 1_000_000 / clock_rate.max(1) as u128) as u64
}

/// Converts microseconds to clock-rate units.
pub fn us_to_ticks(us: u64, clock_rate: u32) -> u64 {
    (us as u128 * clock_rate as u128 / 1_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_unwrap_across_the_wrap_in_both_directions() {
        let start = FIRST_SEQ_CYCLE + 65_534;
        assert_eq!(unwrap_seq(start, 65_535), Some(start + 1));
        assert_eq!(unwrap_seq(start, 0), Some(start + 2));
        assert_eq!(unwrap_seq(start, 3), Some(start + 5));
        assert_eq!(unwrap_seq(start + 5, 65_533), Some(start - 1));
        assert_eq!(unwrap_seq(5, 65_000), None);
    }

    #[test]
    fn timestamps_unwrap_and_compare_with_wrapping() {
        let reference = FIRST_TS_CYCLE + u32::MAX as u64 - 100;
        assert_eq!(unwrap_ts(reference, 860), reference + 961);
        assert_eq!(unwrap_ts(reference, u32::MAX - 1060), reference - 960);
        assert!(ts_after(10, u32::MAX - 10));
        assert!(!ts_after(u32::MAX - 10, 10));
        assert!(!ts_after(7, 7));
    }

    #[test]
    fn clock_conversions_round_down() {
        assert_eq!(ticks_to_us(960, 48_000), 20_000);
        assert_eq!(us_to_ticks(20_000, 48_000), 960);
        assert_eq!(us_to_ticks(33_333, 90_000), 2_999);
        assert_eq!(ticks_to_us(1, 0), 1_000_000);
    }
}
