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
