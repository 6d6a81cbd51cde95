//! The flow hash that picks a lookup-table slot. Shared so userspace can predict selection.

use crate::FlowKey;

const SEED: u32 = 0x6a09_e667;

#[inline(always)]
const fn absorb(state: u32, word: u32) -> u32 {
    let mixed = (state ^ word).wrapping_mul(0x9e37_79b1);
    mixed.rotate_left(15).wrapping_mul(0x85eb_ca77)
}

/// murmur3's 32-bit finaliser: every input bit affects every output bit.
#[inline(always)]
const fn finalize(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hashes a client flow (both addresses, both ports, protocol).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = absorb(h, key.src[0]);
    h = absorb(h, key.src[1]);
    h = absorb(h, key.src[2]);
    h = absorb(h, key.src[3]);
    h = absorb(h, key.dst[0]);
    h = absorb(h, key.dst[1]);
    h = absorb(h, key.dst[2]);
    h = absorb(h, key.dst[3]);
    h = absorb(h, ((key.src_port as u32) << 16) | key.dst_port as u32);
    h = absorb(h, key.proto as u32);
    finalize(h)
}
