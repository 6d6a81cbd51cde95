//! Destination NAT on ingress, with incremental IP and L4 checksum updates.

use fulgur_common::{Addr, PROTO_UDP, addr_bytes, csum};

use crate::{
    parse::{Ip, L4Packet},
    select::Target,
};

/// Rewrites the destination address and port to the backend's.
#[inline(always)]
pub fn dnat(pkt: &L4Packet, old_addr: &Addr, to: &Target) {
    // SAFETY: every pointer in `pkt` was bounds checked by the parser.
    unsafe {
        let old_port = (*pkt.ports).dst;
        let mut l4_check = pkt.check.read_unaligned();
        // A UDP checksum of 0 means none: it stays absent.
        let update_l4 = !(pkt.proto == PROTO_UDP && l4_check == 0);
        match pkt.ip {
            Ip::V4(ip) => {
                let ip_check = u16::from_ne_bytes((*ip).check);
                (*ip).check = csum::replace32(ip_check, old_addr[0], to.addr[0]).to_ne_bytes();
                (*ip).dst_addr = to.addr[0].to_ne_bytes();
                l4_check = csum::replace32(l4_check, old_addr[0], to.addr[0]);
            }
            Ip::V6(ip) => {
                (*ip).dst_addr = addr_bytes(&to.addr);
                l4_check = csum::replace128(l4_check, old_addr, &to.addr);
            }
        }
        (*pkt.ports).dst = to.port;
        if update_l4 {
            l4_check = csum::replace16(l4_check, old_port, to.port);
            if pkt.proto == PROTO_UDP {
                l4_check = csum::udp_nonzero(l4_check);
            }
            pkt.check.write_unaligned(l4_check);
        }
    }
}

/// Where an SNATed packet comes from and goes to, after the rewrite (ports network order).
pub struct Endpoints {
    pub src: Addr,
    pub src_port: u16,
    pub dst: Addr,
    pub dst_port: u16,
}

/// Rewrites both addresses and both ports (SNAT towards the backend, and its replies back to
/// the client). `old` is what the packet holds now.
#[inline(always)]
pub fn rewrite_both(pkt: &L4Packet, old: (&Addr, &Addr), to: &Endpoints) {
    // SAFETY: every pointer in `pkt` was bounds checked by the parser.
    unsafe {
        let (old_src_port, old_dst_port) = ((*pkt.ports).src, (*pkt.ports).dst);
        let mut l4_check = pkt.check.read_unaligned();
        // A UDP checksum of 0 means none: it stays absent.
        let update_l4 = !(pkt.proto == PROTO_UDP && l4_check == 0);
        match pkt.ip {
            Ip::V4(ip) => {
                let mut ip_check = u16::from_ne_bytes((*ip).check);
                ip_check = csum::replace32(ip_check, old.0[0], to.src[0]);
                ip_check = csum::replace32(ip_check, old.1[0], to.dst[0]);
                (*ip).check = ip_check.to_ne_bytes();
                (*ip).src_addr = to.src[0].to_ne_bytes();
                (*ip).dst_addr = to.dst[0].to_ne_bytes();
                l4_check = csum::replace32(l4_check, old.0[0], to.src[0]);
                l4_check = csum::replace32(l4_check, old.1[0], to.dst[0]);
            }
            Ip::V6(ip) => {
                (*ip).src_addr = addr_bytes(&to.src);
                (*ip).dst_addr = addr_bytes(&to.dst);
                l4_check = csum::replace128(l4_check, old.0, &to.src);
                l4_check = csum::replace128(l4_check, old.1, &to.dst);
            }
        }
        (*pkt.ports).src = to.src_port;
        (*pkt.ports).dst = to.dst_port;
        if update_l4 {
            l4_check = csum::replace16(l4_check, old_src_port, to.src_port);
            l4_check = csum::replace16(l4_check, old_dst_port, to.dst_port);
            if pkt.proto == PROTO_UDP {
                l4_check = csum::udp_nonzero(l4_check);
            }
            pkt.check.write_unaligned(l4_check);
        }
    }
}
