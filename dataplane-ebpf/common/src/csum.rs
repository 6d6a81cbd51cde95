//! Incremental Internet checksum updates (RFC 1624), on values exactly as they sit in the packet.
//!
//! The ones' complement sum does not depend on byte order as long as every operand is read the
//! same way, so callers pass raw words loaded from packet memory and store the result back raw.

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
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

/// A UDP checksum of 0 means "none"; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}
