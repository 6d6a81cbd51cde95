//! XDP ingress: parse, look up the service, pick a backend (or reject), DNAT, forward.
//!
//! The program is a thin dispatcher over BPF-to-BPF calls: the service path, then, where it
//! says so, the SNAT path. The verifier's 512 bytes of stack hold a caller's frame and its
//! callees' together, and each path alone needs most of them.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use fulgur_common::{Counter, FlowKey, ServiceKey};

use crate::{
    announce, forward, icmp, log,
    maps::SERVICES,
    nat,
    parse::{self, ETH_P_IPV4, ETH_P_IPV6, Frame, L4Packet},
    reject,
    select::{self, Choice, Target},
    snat,
    stats::{self, count},
};

/// A path's result: an XDP verdict (below 2^32), or a mark naming the path that goes on with
/// the packet; [`SNAT_FLOW`], [`SNAT_NEW`] and [`REJECT`] carry the service id in the low 32
/// bits.
pub const SNAT_FLOW: u64 = 1 << 59;
pub const SNAT_NEW: u64 = 1 << 60;
pub const SNAT_REPLY: u64 = 1 << 61;
pub const REJECT: u64 = 1 << 62;
/// ARP, neighbour solicitations, ICMP errors.
pub const NOT_TCP_UDP: u64 = 1 << 63;
/// An ICMP error about a packet of an SNATed flow (from `not_tcp_udp`).
pub const SNAT_ICMP: u64 = 1 << 58;

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let mut outcome = service_path(ctx);
    if outcome & SNAT_FLOW != 0 {
        outcome = snat::flow(ctx, outcome as u32);
    }
    if outcome & SNAT_NEW != 0 {
        outcome = snat::new_flow(ctx, outcome as u32);
    }
    if outcome & SNAT_REPLY != 0 {
        outcome = snat::reply(ctx);
    }
    if outcome & REJECT != 0 {
        return reject_path(ctx, outcome as u32);
    }
    if outcome & NOT_TCP_UDP != 0 {
        outcome = not_tcp_udp(ctx);
    }
    if outcome & SNAT_ICMP != 0 {
        return snat::icmp_error(ctx);
    }
    outcome as u32
}

/// ARP, and IP that is neither TCP nor UDP: a neighbour solicitation for an announced address
/// is answered, an ICMP error about a tracked flow goes on to its backend, one about an SNATed
/// flow goes on as [`SNAT_ICMP`].
#[inline(never)]
fn not_tcp_udp(ctx: &XdpContext) -> u64 {
    let outcome = parse::ethernet(ctx).and_then(|frame| {
        if frame.ether_type == announce::ETH_P_ARP {
            return announce::arp(ctx, &frame).map(u64::from);
        }
        if frame.ether_type == ETH_P_IPV6
            && let Some(outcome) = announce::solicitation(ctx, &frame)
        {
            return outcome.map(u64::from);
        }
        icmp::to_backend(ctx, &frame)
    });
    outcome.unwrap_or_else(|reason| settle(ctx, reason).into())
}

/// A flow its service rejects (or SNAT cannot carry): a TCP RST or an ICMP port unreachable.
#[inline(never)]
fn reject_path(ctx: &XdpContext, service_id: u32) -> u32 {
    let outcome = parse::ethernet(ctx).and_then(|frame| {
        let pkt = transport(ctx, &frame)?;
        let flow = flow_of(&pkt);
        stats::rejected(service_id);
        log::rejected(&flow, service_id);
        Ok(reject::reject(ctx, &frame, &pkt))
    });
    outcome.unwrap_or_else(|reason| settle(ctx, reason))
}

#[inline(never)]
fn service_path(ctx: &XdpContext) -> u64 {
    match translate(ctx) {
        Ok(outcome) => outcome,
        Err(reason) => settle(ctx, reason) as u64,
    }
}

/// Counts why a packet is passed, and passes it.
#[inline(always)]
pub fn settle(ctx: &XdpContext, reason: Counter) -> u32 {
    if reason == Counter::PassMalformed {
        log::malformed(ctx);
    }
    count(reason);
    xdp_action::XDP_PASS
}

/// The TCP or UDP packet of `frame`, parsed.
#[inline(always)]
pub fn transport(ctx: &XdpContext, frame: &Frame) -> Result<L4Packet, Counter> {
    match frame.ether_type {
        ETH_P_IPV4 => parse::ipv4(ctx, frame.l3),
        ETH_P_IPV6 => parse::ipv6(ctx, frame.l3),
        _ => Err(Counter::PassNotIp),
    }
}

/// The packet's flow, as the client sent it.
#[inline(always)]
pub fn flow_of(pkt: &L4Packet) -> FlowKey {
    let (src, dst) = pkt.addrs();
    // SAFETY: bounds checked by the parser.
    let (src_port, dst_port) = unsafe { ((*pkt.ports).src, (*pkt.ports).dst) };
    FlowKey {
        src,
        dst,
        src_port,
        dst_port,
        proto: pkt.proto,
        family: pkt.family(),
        pad: [0; 2],
    }
}

/// The services-map key of a client flow.
#[inline(always)]
pub fn service_key(flow: &FlowKey) -> ServiceKey {
    ServiceKey {
        addr: flow.dst,
        port: flow.dst_port,
        proto: flow.proto,
        family: flow.family,
    }
}

#[inline(always)]
fn translate(ctx: &XdpContext) -> Result<u64, Counter> {
    let frame = parse::ethernet(ctx)?;
    if frame.ether_type == announce::ETH_P_ARP {
        return Ok(NOT_TCP_UDP);
    }
    let pkt = match transport(ctx, &frame) {
        Err(Counter::PassNotTcpUdp) => return Ok(NOT_TCP_UDP),
        other => other?,
    };
    let flow = flow_of(&pkt);
    // SAFETY: service values are replaced whole by the agent, never written in place.
    let Some(service) = (unsafe { SERVICES.get(service_key(&flow)) }) else {
        // Not ours, unless it is a reply to one of our SNAT ports.
        return if snat::may_be_reply(&flow) {
            Ok(SNAT_REPLY)
        } else {
            Err(Counter::PassNotService)
        };
    };
    match select::choose(&flow, service, || addressed_here(ctx, &frame)) {
        Choice::Forward(target) => Ok(translated(ctx, &frame, &pkt, service.id, &target).into()),
        Choice::Snat => Ok(SNAT_FLOW | service.id as u64),
        Choice::Reject => Ok(REJECT | service.id as u64),
        Choice::OtherHost => Err(Counter::PassOtherHost),
    }
}

/// The frame is for this device's MAC (or a group address, or a device the agent registered
/// no MAC for). A switch floods unicast for a MAC it has no port for (a failed node's) to every
/// node: only the one it is for may start flows from it, or each would.
#[inline(always)]
pub fn addressed_here(ctx: &XdpContext, frame: &Frame) -> bool {
    // SAFETY: the Ethernet header was bounds checked by the parser.
    let dst = unsafe { (*frame.eth).dst_addr };
    if dst[0] & 1 != 0 {
        return true;
    }
    let Some(mac) = announce::device_mac(ctx) else {
        return true;
    };
    // Compared as words: array comparisons become calls.
    u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]])
        == u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]])
        && u16::from_ne_bytes([dst[4], dst[5]]) == u16::from_ne_bytes([mac[4], mac[5]])
}

/// DNAT to a backend (client address kept), then forward.
#[inline(always)]
pub fn translated(
    ctx: &XdpContext,
    frame: &Frame,
    pkt: &L4Packet,
    service_id: u32,
    target: &Target,
) -> u32 {
    stats::forwarded(service_id, target.id, (ctx.data_end() - ctx.data()) as u64);
    let (_, dst) = pkt.addrs();
    nat::dnat(pkt, &dst, target);
    forward::forward(ctx, frame, &forward::Route::of(pkt), target.id)
}
