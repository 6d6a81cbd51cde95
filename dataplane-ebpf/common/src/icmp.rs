//! ICMP errors about translated flows: the checksum arithmetic for rewriting one address and
//! one port inside the packet an ICMP error quotes (and, optionally, the outer address).
//!
//! Pure, so that XDP (ingress) and TC (egress) share it and plain tests cover it.

use crate::{Addr, csum};

/// Offsets from the outer network header, for outer and quoted headers without options or
/// extension headers (what routers and hosts send).
pub mod layout {
    pub const V4_ICMP: usize = 20;
    pub const V4_INNER_IP: usize = 28;
    pub const V4_INNER_L4: usize = 48;
    pub const V6_ICMP: usize = 40;
    pub const V6_INNER_IP: usize = 48;
    pub const V6_INNER_L4: usize = 88;
}

/// ICMP error types whose quote we translate.
pub const fn is_icmpv4_error(icmp_type: u8) -> bool {
    // Destination unreachable (incl. fragmentation needed), time exceeded, parameter problem.
    matches!(icmp_type, 3 | 11 | 12)
}

pub const fn is_icmpv6_error(icmp_type: u8) -> bool {
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    matches!(icmp_type, 1..=4)
}

/// The checksums an ICMP error carries, as they sit in the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksums {
    /// IPv4 only: the outer header's.
    pub outer_ip: u16,
    pub icmp: u16,
    /// IPv4 only: the quoted header's.
    pub inner_ip: u16,
    /// The quoted TCP/UDP checksum, when the quote reaches it; a UDP 0 stays 0.
    pub inner_l4: Option<u16>,
}

/// One rewrite: a quoted address and port (old, new), and optionally the outer address that
/// holds the same old address (the error's destination is the quote's source, or its source the
/// quote's destination), which changes to the same new one.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite<'a> {
    pub v6: bool,
    pub addr: (&'a Addr, &'a Addr),
    pub port: (u16, u16),
    /// The quoted packet is UDP (a computed 0 is sent as 0xffff).
    pub udp: bool,
    /// The outer address changes too.
    pub outer: bool,
}

#[inline(always)]
fn replace_addr(check: u16, v6: bool, old: &Addr, new: &Addr) -> u16 {
    if v6 {
        csum::replace128(check, old, new)
    } else {
        csum::replace32(check, old[0], new[0])
    }
}

/// The checksums after `rewrite`.
#[inline(always)]
pub fn rewritten(rewrite: &Rewrite, old: &Checksums) -> Checksums {
    let (old_addr, new_addr) = rewrite.addr;
    let (old_port, new_port) = rewrite.port;
    let mut icmp = replace_addr(old.icmp, rewrite.v6, old_addr, new_addr);
    icmp = csum::replace16(icmp, old_port, new_port);

    let mut inner_ip = old.inner_ip;
    if !rewrite.v6 {
        inner_ip = csum::replace32(old.inner_ip, old_addr[0], new_addr[0]);
        icmp = csum::replace16(icmp, old.inner_ip, inner_ip);
    }
    let inner_l4 = match old.inner_l4 {
        Some(0) if !rewrite.v6 => Some(0), // A quoted UDP datagram without checksum.
        Some(check) => {
            let mut updated = csum::replace16(
                replace_addr(check, rewrite.v6, old_addr, new_addr),
                old_port,
                new_port,
            );
            if rewrite.udp {
                updated = csum::udp_nonzero(updated);
            }
            icmp = csum::replace16(icmp, check, updated);
            Some(updated)
        }
        None => None,
    };
    let mut outer_ip = old.outer_ip;
    if rewrite.outer {
        if rewrite.v6 {
            // ICMPv6's checksum covers the pseudo-header.
            icmp = csum::replace128(icmp, old_addr, new_addr);
        } else {
            outer_ip = csum::replace32(old.outer_ip, old_addr[0], new_addr[0]);
        }
    }
    Checksums {
        outer_ip,
        icmp,
        inner_ip,
        inner_l4,
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    /// The ones' complement sum of `parts` as native 16-bit words (0xffff over a valid checksum).
    fn sum(parts: &[&[u8]]) -> u16 {
        let words = parts.iter().flat_map(|p| p.chunks(2));
        csum::fold(words.map(|w| u16::from_ne_bytes([w[0], w[1]]) as u32).sum())
    }

    /// (ICMP, quoted IP, quoted UDP) offsets and the (source, destination) address offsets.
    fn offsets(v6: bool) -> (usize, usize, usize, usize, usize) {
        if v6 {
            let l = (layout::V6_ICMP, layout::V6_INNER_IP, layout::V6_INNER_L4);
            (l.0, l.1, l.2, 8, 24)
        } else {
            let l = (layout::V4_ICMP, layout::V4_INNER_IP, layout::V4_INNER_L4);
            (l.0, l.1, l.2, 12, 16)
        }
    }

    /// The sums a receiver checks: (outer IP, ICMP, quoted IP, quoted UDP); IPv6 has no IP ones.
    fn sums(p: &[u8], v6: bool) -> [u16; 4] {
        let (icmp, inner_ip, inner_l4, src, _) = offsets(v6);
        let addrs = &p[inner_ip + src..inner_ip + src + if v6 { 32 } else { 8 }];
        let udp = sum(&[addrs, &[0, 17, 0, 8], &p[inner_l4..inner_l4 + 8]]);
        if v6 {
            let pseudo = &[0, 0, 0, (p.len() - icmp) as u8, 0, 0, 0, 58];
            [0xffff, sum(&[&p[8..40], pseudo, &p[icmp..]]), 0xffff, udp]
        } else {
            let inner = sum(&[&p[inner_ip..inner_ip + 20]]);
            [sum(&[&p[..20]]), sum(&[&p[icmp..]]), inner, udp]
        }
    }

    fn put(p: &mut [u8], at: usize, bytes: &[u8]) {
        p[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// An error quoting UDP whose outer destination is the quote's source, checksums computed
    /// from scratch (the quoted UDP checksum 0 unless `udp_check`).
    fn error(v6: bool, udp_check: bool) -> Vec<u8> {
        let (icmp, inner_ip, inner_l4, src, dst) = offsets(v6);
        let mut p: Vec<u8> = (0..inner_l4 + 8).map(|i| (i * 7 + 3) as u8).collect();
        put(&mut p, inner_l4 + 4, &[0, 8]);
        let quoted_src = p[inner_ip + src..inner_ip + src + if v6 { 16 } else { 4 }].to_vec();
        put(&mut p, dst, &quoted_src);
        // Zeroed, then set to the complement of the sum: checksums in the order they cover.
        let fields = [
            (10, 0),
            (inner_ip + 10, 2),
            (inner_l4 + 6, 3),
            (icmp + 2, 1),
        ];
        for (at, which) in fields {
            if v6 && (which == 0 || which == 2) {
                continue; // IPv6 has no header checksum: those bytes are address bytes.
            }
            put(&mut p, at, &[0, 0]);
            if which == 3 && !udp_check {
                continue;
            }
            let check = !sums(&p, v6)[which];
            put(&mut p, at, &check.to_ne_bytes());
        }
        p
    }

    fn word(p: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([p[at], p[at + 1]])
    }

    fn addr(p: &[u8], at: usize, v6: bool) -> Addr {
        let w = |i: usize| u32::from_ne_bytes(p[at + i..at + i + 4].try_into().unwrap());
        if v6 {
            [w(0), w(4), w(8), w(12)]
        } else {
            [w(0), 0, 0, 0]
        }
    }

    #[test]
    fn a_rewritten_error_carries_valid_checksums() {
        let cases = [
            (false, true, true),
            (false, true, false),
            (false, false, true),
            (true, true, true),
            (true, true, false),
        ];
        for case @ (v6, udp_check, outer) in cases {
            let mut p = error(v6, udp_check);
            let checked = if udp_check { 4 } else { 3 };
            assert_eq!(
                sums(&p, v6)[..checked],
                [0xffff; 4][..checked],
                "built {case:?}"
            );
            let (icmp, inner_ip, inner_l4, src, dst) = offsets(v6);
            let old_addr = addr(&p, inner_ip + src, v6);
            let new_addr = if v6 {
                [0x0302_0100, 0x0706_0504, 0x0b0a_0908, 0x0f0e_0d0c]
            } else {
                [0x0302_0100, 0, 0, 0]
            };
            let old = Checksums {
                outer_ip: if v6 { 0 } else { word(&p, 10) },
                icmp: word(&p, icmp + 2),
                inner_ip: if v6 { 0 } else { word(&p, inner_ip + 10) },
                inner_l4: Some(word(&p, inner_l4 + 6)),
            };
            let rewrite = Rewrite {
                v6,
                addr: (&old_addr, &new_addr),
                port: (word(&p, inner_l4), 0x1234),
                udp: true,
                outer,
            };
            let new = rewritten(&rewrite, &old);
            let new_bytes: Vec<u8> = new_addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let new_bytes = &new_bytes[..if v6 { 16 } else { 4 }];
            put(&mut p, inner_ip + src, new_bytes);
            put(&mut p, inner_l4, &0x1234u16.to_ne_bytes());
            if outer {
                put(&mut p, dst, new_bytes);
            }
            if !v6 {
                put(&mut p, 10, &new.outer_ip.to_ne_bytes());
                put(&mut p, inner_ip + 10, &new.inner_ip.to_ne_bytes());
            }
            put(&mut p, icmp + 2, &new.icmp.to_ne_bytes());
            put(&mut p, inner_l4 + 6, &new.inner_l4.unwrap().to_ne_bytes());
            assert_eq!(sums(&p, v6)[..checked], [0xffff; 4][..checked], "{case:?}");
            if !udp_check {
                assert_eq!(new.inner_l4, Some(0), "a quoted UDP checksum of 0 stays 0");
            }
        }
    }
}
