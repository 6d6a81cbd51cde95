//! Incremental Internet checksum updates (RFC 1624), on values exactly as they sit in the packet.
//!
//! The ones' complement sum does not depend on byte order as long as every operand is read the
//! same way, so callers pass raw words loaded from packet memory and store the result back raw.

/// Folds a 32-bit ones' complement sum to 16 bits (not inverted).
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Replaces a 16-bit word covered by `check`: HC' = ~(~HC + ~m + m').
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// Replaces a 32-bit field (an IPv4 address) covered by `check`.
#[inline(always)]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32 + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// Replaces a 128-bit field (an IPv6 address) covered by `check`.
#[inline(always)]
pub const fn replace128(mut check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    check = replace32(check, old[0], new[0]);
    check = replace32(check, old[1], new[1]);
    check = replace32(check, old[2], new[2]);
    replace32(check, old[3], new[3])
}

/// Sums 16-bit words, for building a checksum from scratch: `!fold(sum)`.
#[inline(always)]
pub const fn sum_words<const N: usize>(words: &[u16; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum += words[i] as u32;
        i += 1;
    }
    sum
}

/// Sums the 16-bit words of an address as they sit in the packet (IPv4 uses word 0 only and
/// leaves the others zero, so this serves both families).
#[inline(always)]
pub const fn sum_addr(addr: &[u32; 4]) -> u32 {
    (addr[0] & 0xffff)
        + (addr[0] >> 16)
        + (addr[1] & 0xffff)
        + (addr[1] >> 16)
        + (addr[2] & 0xffff)
        + (addr[2] >> 16)
        + (addr[3] & 0xffff)
        + (addr[3] >> 16)
}

/// A UDP checksum of 0 means "none"; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// Reference: the full RFC 1071 checksum over 16-bit words read natively.
    fn full(words: &[u16]) -> u16 {
        let sum: u32 = words.iter().map(|w| *w as u32).sum();
        !fold(sum)
    }

    /// A small deterministic generator (xorshift), so the test needs no crates.
    fn words(seed: u32, n: usize) -> Vec<u16> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u16
            })
            .collect()
    }

    #[test]
    fn incremental_updates_match_a_full_recomputation() {
        for seed in 1..2000 {
            let mut data = words(seed, 24);
            let check = full(&data);
            let old32 = (data[3] as u32) | ((data[4] as u32) << 16);
            let new_words = words(seed.wrapping_mul(7919), 3);
            let new32 = (new_words[0] as u32) | ((new_words[1] as u32) << 16);
            let old16 = data[9];
            data[3] = new_words[0];
            data[4] = new_words[1];
            data[9] = new_words[2];
            let updated = replace16(replace32(check, old32, new32), old16, new_words[2]);
            // Both encodings of zero (0x0000/0xffff) verify; compare what a receiver checks.
            let verify = |c: u16| fold(data.iter().map(|w| *w as u32).sum::<u32>() + c as u32);
            assert_eq!(verify(updated), 0xffff, "seed {seed}");
            assert_eq!(verify(full(&data)), 0xffff);
        }
    }

    #[test]
    fn udp_zero_becomes_all_ones() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
    }
}
