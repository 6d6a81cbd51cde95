//! XDP ingress: parse, look up the service, pick a backend (or reject), DNAT, forward.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use fulgur_common::{Counter, FlowKey, ServiceKey};

use crate::{
    announce, forward, icmp, log,
    maps::SERVICES,
    nat,
    parse::{self, ETH_P_IPV4, ETH_P_IPV6},
    reject,
    select::{self, Choice},
    stats::{self, count},
};

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    match translate(ctx) {
        Ok(action) => action,
        Err(reason) => {
            if reason == Counter::PassMalformed {
                log::malformed(ctx);
            }
            count(reason);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn translate(ctx: &XdpContext) -> Result<u32, Counter> {
    let frame = parse::ethernet(ctx)?;
    let parsed = match frame.ether_type {
        ETH_P_IPV4 => parse::ipv4(ctx, frame.l3),
        ETH_P_IPV6 => parse::ipv6(ctx, frame.l3),
        announce::ETH_P_ARP => return announce::arp(ctx, &frame),
        _ => return Err(Counter::PassNotIp),
    };
    let pkt = match parsed {
        // Off the TCP/UDP path: a neighbour solicitation for an announced address is answered.
        Err(Counter::PassNotTcpUdp) => {
            if frame.ether_type == ETH_P_IPV6
                && let Some(outcome) = announce::solicitation(ctx, &frame)
            {
                return outcome;
            }
            return icmp::to_backend(ctx, &frame);
        }
        other => other?,
    };
    let (src, dst) = pkt.addrs();
    // SAFETY: bounds checked by the parser.
    let (src_port, dst_port) = unsafe { ((*pkt.ports).src, (*pkt.ports).dst) };
    let family = pkt.family();
    let service_key = ServiceKey {
        addr: dst,
        port: dst_port,
        proto: pkt.proto,
        family,
    };
    // SAFETY: service values are replaced whole by the agent, never written in place.
    let service = unsafe { SERVICES.get(service_key) }.ok_or(Counter::PassNotService)?;
    let flow = FlowKey {
        src,
        dst,
        src_port,
        dst_port,
        proto: pkt.proto,
        family,
        pad: [0; 2],
    };
    match select::choose(&flow, service) {
        Choice::Forward(target) => {
            stats::forwarded(service.id, target.id, (ctx.data_end() - ctx.data()) as u64);
            nat::dnat(&pkt, &dst, &target);
            Ok(forward::forward(
                ctx,
                &frame,
                &forward::Route::of(&pkt),
                target.id,
            ))
        }
        Choice::Reject => {
            stats::rejected(service.id);
            log::rejected(&flow, service.id);
            Ok(reject::reject(ctx, &frame, &pkt))
        }
    }
}
