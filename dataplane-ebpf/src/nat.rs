//! Destination NAT on ingress, with incremental IP and L4 checksum updates.

use fulgur_common::{PROTO_UDP, csum};

use crate::{parse::Ipv4L4, select::Target};

/// Rewrites the destination address and port to the backend's.
#[inline(always)]
pub fn dnat_v4(pkt: &Ipv4L4, to: &Target) {
    // SAFETY: every pointer in `pkt` was bounds checked by the parser.
    unsafe {
        let ip = pkt.ip;
        let old_addr = u32::from_ne_bytes((*ip).dst_addr);
        let new_addr = to.addr[0];
        let old_port = (*pkt.ports).dst;
        let new_port = to.port;

        let ip_check = u16::from_ne_bytes((*ip).check);
        (*ip).check = csum::replace32(ip_check, old_addr, new_addr).to_ne_bytes();
        (*ip).dst_addr = new_addr.to_ne_bytes();
        (*pkt.ports).dst = new_port;

        let l4_check = pkt.check.read_unaligned();
        if pkt.proto == PROTO_UDP && l4_check == 0 {
            return; // No UDP checksum: leave it absent.
        }
        let mut updated = csum::replace32(l4_check, old_addr, new_addr);
        updated = csum::replace16(updated, old_port, new_port);
        if pkt.proto == PROTO_UDP {
            updated = csum::udp_nonzero(updated);
        }
        pkt.check.write_unaligned(updated);
    }
}
