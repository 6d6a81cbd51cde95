//! XDP ingress: parse, look up the service, pick a backend, DNAT, forward.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use fulgur_common::{Counter, FAMILY_IPV4, FlowKey, ServiceKey, addr_v4};

use crate::{
    forward,
    maps::SERVICES,
    nat,
    parse::{self, ETH_P_IPV4},
    select,
    stats::count,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    match translate(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn translate(ctx: &XdpContext) -> Result<u32, Counter> {
    let frame = parse::ethernet(ctx)?;
    if frame.ether_type != ETH_P_IPV4 {
        return Err(Counter::PassNotIp);
    }
    let pkt = parse::ipv4_l4(ctx, frame.l3)?;
    // SAFETY: bounds checked by the parser.
    let (src, dst, src_port, dst_port) = unsafe {
        (
            (*pkt.ip).src_addr,
            (*pkt.ip).dst_addr,
            (*pkt.ports).src,
            (*pkt.ports).dst,
        )
    };
    let service_key = ServiceKey {
        addr: addr_v4(dst),
        port: dst_port,
        proto: pkt.proto,
        family: FAMILY_IPV4,
    };
    // SAFETY: service values are replaced whole by the agent, never written in place.
    let service = unsafe { SERVICES.get(service_key) }.ok_or(Counter::PassNotService)?;
    let flow = FlowKey {
        src: addr_v4(src),
        dst: service_key.addr,
        src_port,
        dst_port,
        proto: pkt.proto,
        family: FAMILY_IPV4,
        pad: [0; 2],
    };
    let target = select::backend_for(&flow, service)?;
    nat::dnat_v4(&pkt, &target);
    Ok(forward::ipv4(ctx, &frame, &pkt))
}
