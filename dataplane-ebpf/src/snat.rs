//! SNAT for backends on other nodes: a new flow to such a backend gets a port of the node's
//! SNAT range and leaves with the node's address; the backend's replies to that port are
//! translated back here. Both directions stay in XDP, so netfilter never sees an SNATed flow
//! (and the kernel never meets a packet whose source is one of its own addresses).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, xdp_action},
    programs::XdpContext,
};
use fulgur_common::{
    Addr, BACKEND_LIVE, Counter, FlowKey, NextHop, PATH_FAST, PROTO_TCP, SNAT_CLOSING, SNAT_NEVER,
    SNAT_OPEN, SnatConfig, SnatFlow, SnatReply, addr_eq, defaults::SNAT_PROBES, hash::flow_hash,
};

use crate::{
    forward::{self, Route, Unresolved},
    icmp, ingress,
    maps::{BACKENDS, EGRESS_PATHS, SERVICES, SNAT_CONFIG, SNAT_FLOWS, SNAT_REPLIES, SNAT_SCRATCH},
    nat::{self, Endpoints},
    parse::{self, Frame, L4Packet, ptr_at},
    select::{self, Target},
    stats::{self, count},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The SNAT path of a service flow that conntrack does not know: an SNATed flow seen before
/// goes on; anything else is a new flow ([`ingress::SNAT_NEW`]). Each path parses the packet
/// again (a call of its own: see `ingress`).
#[inline(never)]
pub fn flow(ctx: &XdpContext, service_id: u32) -> u64 {
    match established(ctx, service_id) {
        Ok(Some(verdict)) => verdict.into(),
        Ok(None) => ingress::SNAT_NEW | service_id as u64,
        Err(reason) => ingress::settle(ctx, reason).into(),
    }
}

#[inline(always)]
fn established(ctx: &XdpContext, service_id: u32) -> Result<Option<u32>, Counter> {
    let frame = parse::ethernet(ctx)?;
    let pkt = ingress::transport(ctx, &frame)?;
    let flow = ingress::flow_of(&pkt);
    let config = config().ok_or(Counter::PassNotService)?;
    let Some(entry) = SNAT_FLOWS.get_ptr_mut(flow) else {
        return Ok(None);
    };
    if !still_valid(entry, service_id) {
        return Ok(None);
    }
    Ok(Some(forward_established(
        ctx, &frame, &pkt, &flow, service_id, entry, config,
    )))
}

/// A new flow with SNAT on: SNATed if its backend needs it, else as a local flow (conntrack,
/// client address kept). A rejection goes on as [`ingress::REJECT`].
#[inline(never)]
pub fn new_flow(ctx: &XdpContext, service_id: u32) -> u64 {
    match select_new(ctx, service_id) {
        Ok(outcome) => outcome,
        Err(reason) => ingress::settle(ctx, reason).into(),
    }
}

#[inline(always)]
fn select_new(ctx: &XdpContext, service_id: u32) -> Result<u64, Counter> {
    let frame = parse::ethernet(ctx)?;
    if !ingress::addressed_here(ctx, &frame) {
        return Err(Counter::PassOtherHost);
    }
    let pkt = ingress::transport(ctx, &frame)?;
    let flow = ingress::flow_of(&pkt);
    let config = config().ok_or(Counter::PassNotService)?;
    // SAFETY: service values are replaced whole by the agent, never written in place.
    let service =
        unsafe { SERVICES.get(ingress::service_key(&flow)) }.ok_or(Counter::PassNotService)?;
    Ok(match select::pick(&flow, service) {
        Some((target, backend)) if config.applies_to(backend.flags) => {
            forward_new(ctx, &frame, &pkt, &flow, service.id, &target, config)
        }
        Some((target, backend)) => {
            select::remember(&flow, service, target.id, backend);
            ingress::translated(ctx, &frame, &pkt, service.id, &target).into()
        }
        None => ingress::REJECT | service_id as u64,
    })
}

/// The SNAT configuration, unless SNAT is off.
#[inline(always)]
pub fn config() -> Option<&'static SnatConfig> {
    SNAT_CONFIG.get(0).filter(|c| c.mode != SNAT_NEVER)
}

/// An SNATed flow whose backend is still the one it was given.
#[inline(always)]
pub fn still_valid(entry: *const SnatFlow, service_id: u32) -> bool {
    // SAFETY: a map value pointer, valid for this run.
    let entry = unsafe { &*entry };
    BACKENDS.get(entry.backend_id).is_some_and(|backend| {
        backend.flags & BACKEND_LIVE != 0
            && backend.service_id == service_id
            && backend.port == entry.backend_port
            && addr_eq(&backend.addr, &entry.backend_addr)
    })
}

/// The segment's TCP flags; 0 for UDP.
#[inline(always)]
fn tcp_flags(ctx: &XdpContext, pkt: &L4Packet) -> u8 {
    if pkt.proto != PROTO_TCP {
        return 0;
    }
    // SAFETY: bounds checked by ptr_at.
    ptr_at::<u8>(ctx, pkt.l4 + 13).map_or(0, |flags| unsafe { *flags })
}

/// Stamps an entry with the agent's clock (a write at most once per second) and follows TCP's
/// close: a FIN or RST marks it closing, a fresh SYN of a reused client port opens it again.
#[inline(always)]
fn touch(last_seen: *mut u32, state: *mut u8, now: u32, flags: u8) {
    // SAFETY: pointers into a map value, valid for this run.
    unsafe {
        if *last_seen != now {
            *last_seen = now;
        }
        if flags & (TCP_FIN | TCP_RST) != 0 {
            if *state != SNAT_CLOSING {
                *state = SNAT_CLOSING;
            }
        } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN && *state != SNAT_OPEN {
            *state = SNAT_OPEN;
        }
    }
}

/// A new SNAT flow that cannot be carried: the client gets a RST or port unreachable (on the
/// reject path).
#[inline(always)]
fn refuse(service_id: u32, reason: Counter) -> u64 {
    count(reason);
    ingress::REJECT | service_id as u64
}

#[inline(always)]
fn dropped(reason: Counter) -> u32 {
    count(reason);
    xdp_action::XDP_DROP
}

/// A packet of an SNATed flow seen before: the same port, the same backend.
#[inline(always)]
fn forward_established(
    ctx: &XdpContext,
    frame: &Frame,
    pkt: &L4Packet,
    flow: &FlowKey,
    service_id: u32,
    entry: *mut SnatFlow,
    config: &SnatConfig,
) -> u32 {
    let flags = tcp_flags(ctx, pkt);
    // SAFETY: a map value pointer, valid for this run.
    let (to, backend_id) = unsafe {
        touch(
            &raw mut (*entry).last_seen,
            &raw mut (*entry).state,
            config.now,
            flags,
        );
        (
            Endpoints {
                src: (*entry).node_addr,
                src_port: (*entry).node_port,
                dst: (*entry).backend_addr,
                dst_port: (*entry).backend_port,
            },
            (*entry).backend_id,
        )
    };
    stats::forwarded(service_id, backend_id, (ctx.data_end() - ctx.data()) as u64);
    nat::rewrite_both(pkt, (&flow.src, &flow.dst), &to);
    let route = Route::of(pkt);
    match forward::backend_hop(ctx, frame, &route, None, backend_id) {
        // SAFETY: a map value pointer, valid for this run.
        Ok(hop) if unsafe { (*hop).xdp_transmit } != 0 => forward::send(ctx, frame, &route, hop),
        // Rewritten to leave from this node's address, the kernel would drop it as martian.
        Ok(_) | Err(Unresolved::Kernel) => dropped(Counter::SnatNoFastPath),
        Err(Unresolved::NoNeighbour) => dropped(Counter::SnatNoNeighbour),
    }
}

/// A new flow to a backend that needs SNAT: route it, take a port, remember both directions,
/// rewrite and send. Anything missing on the way rejects it before the packet is touched.
#[inline(always)]
fn forward_new(
    ctx: &XdpContext,
    frame: &Frame,
    pkt: &L4Packet,
    flow: &FlowKey,
    service_id: u32,
    target: &Target,
    config: &SnatConfig,
) -> u64 {
    let Some(node) = config.node_addr(flow.family) else {
        return refuse(service_id, Counter::SnatNoAddress);
    };
    let route = Route::of(pkt);
    let to = Endpoints {
        src: *node,
        src_port: flow.src_port,
        dst: target.addr,
        dst_port: target.port,
    };
    let hop = match forward::backend_hop(ctx, frame, &route, Some(&to), target.id) {
        // SAFETY: a map value pointer, valid for this run.
        Ok(hop) if unsafe { (*hop).xdp_transmit } != 0 => hop,
        Ok(_) | Err(Unresolved::Kernel) => {
            return refuse(service_id, Counter::SnatNoFastPath);
        }
        // Not rejected: the agent has the kernel resolve it, and the client's retransmission
        // finds it.
        Err(Unresolved::NoNeighbour) => return dropped(Counter::SnatNoNeighbour).into(),
    };
    // 0 is never an SNAT port: the range starts above it (the agent refuses 0).
    let node_port = claim(ctx, frame, flow, node, service_id, target, config);
    if node_port == 0 {
        return refuse(service_id, Counter::SnatExhausted);
    }
    count(Counter::SnatNewFlow);
    stats::new_flow(service_id, target.id);
    stats::forwarded(service_id, target.id, (ctx.data_end() - ctx.data()) as u64);
    let to = Endpoints {
        src_port: node_port,
        ..to
    };
    nat::rewrite_both(pkt, (&flow.src, &flow.dst), &to);
    forward::send(ctx, frame, &route, hop).into()
}

/// Where the client's packets come from: the ingress device, with the frame's MACs reversed.
/// Kept (epoch 0: the FIB is asked first) as the replies' way back for when the kernel has no
/// neighbour entry for the client, which it may never learn: XDP answers all the client sends.
#[inline(always)]
fn remember_sender(ctx: &XdpContext, frame: &Frame, hop: *mut NextHop) {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `hop` points into a map value; path values are replaced whole by the agent; the
    // Ethernet header was bounds checked by the parser (MACs copied as 16-bit words, as the
    // fast path does).
    unsafe {
        (*hop).ifindex = ifindex;
        (*hop).epoch = 0;
        (*hop).path = PATH_FAST;
        (*hop).xdp_transmit = EGRESS_PATHS.get(ifindex).map_or(0, |p| p.xdp_transmit);
        (*hop).pad = [0; 2];
        let from = frame.eth.cast::<u16>();
        let macs = (&raw mut (*hop).macs).cast::<u16>();
        // The reply's destination is the request's source (bytes 6..12), its source the
        // request's destination (bytes 0..6).
        for word in 0..3 {
            macs.add(word)
                .write_unaligned(from.add(3 + word).read_unaligned());
            macs.add(3 + word)
                .write_unaligned(from.add(word).read_unaligned());
        }
    }
}

/// The key the backend's replies will carry: backend → node address and SNAT port.
#[inline(always)]
fn reply_key(flow: &FlowKey, node: &Addr, target: &Target, node_port: u16) -> FlowKey {
    FlowKey {
        src: target.addr,
        dst: *node,
        src_port: target.port,
        dst_port: node_port,
        proto: flow.proto,
        family: flow.family,
        pad: [0; 2],
    }
}

/// Takes a port for a new flow and remembers both directions; the port (network byte order),
/// or 0 when none is free or the flow map is full.
#[inline(always)]
fn claim(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &FlowKey,
    node: &Addr,
    service_id: u32,
    target: &Target,
    config: &SnatConfig,
) -> u16 {
    let Some(node_port) = allocate(ctx, frame, flow, node, target, service_id, config) else {
        return 0;
    };
    let tracked = SnatFlow {
        backend_addr: target.addr,
        node_addr: *node,
        backend_id: target.id,
        service_id,
        backend_port: target.port,
        node_port,
        last_seen: config.now,
        state: SNAT_OPEN,
        pad: [0; 3],
    };
    if SNAT_FLOWS.insert(flow, tracked, BPF_ANY as u64).is_err() {
        let _ = SNAT_REPLIES.remove(reply_key(flow, node, target, node_port));
        return 0;
    }
    node_port
}

/// Takes a free SNAT port for `flow` (network byte order): bounded probes from the flow's
/// hash, each an insert that fails if the reply tuple is taken, so no live flow is overwritten.
#[inline(always)]
fn allocate(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &FlowKey,
    node: &Addr,
    target: &Target,
    service_id: u32,
    config: &SnatConfig,
) -> Option<u16> {
    let reply = SNAT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry, filled field by field (a whole value would be built on
    // the stack first).
    let reply = unsafe {
        (*reply).client = flow.src;
        (*reply).vip = flow.dst;
        (*reply).client_port = flow.src_port;
        (*reply).vip_port = flow.dst_port;
        (*reply).service_id = service_id;
        (*reply).last_seen = config.now;
        (*reply).state = SNAT_OPEN;
        (*reply).pad = [0; 3];
        remember_sender(ctx, frame, &raw mut (*reply).hop);
        &*reply
    };
    let mut key = reply_key(flow, node, target, 0);
    let hash = flow_hash(flow);
    let ports = config.ports();
    for probe in 0..SNAT_PROBES {
        if probe >= ports {
            break;
        }
        key.dst_port = config.probe_port(hash, probe).to_be();
        if SNAT_REPLIES.insert(key, reply, BPF_NOEXIST as u64).is_ok() {
            return Some(key.dst_port);
        }
    }
    None
}

/// Whether a packet for no service may be a reply to one of our SNAT ports: the port range and
/// the node address are checked before any map lookup, so other traffic to the node pays a few
/// compares.
#[inline(always)]
pub fn may_be_reply(flow: &FlowKey) -> bool {
    let Some(config) = config() else {
        return false;
    };
    config.in_range(u16::from_be(flow.dst_port))
        && config
            .node_addr(flow.family)
            .is_some_and(|node| addr_eq(node, &flow.dst))
}

/// A packet to the node's SNAT address and a port in the range: if the reply map knows it,
/// translate it back (service → client) and send it on in XDP. Parses the packet again (a
/// call of its own: see `ingress`).
#[inline(never)]
pub fn reply(ctx: &XdpContext) -> u64 {
    match find_reply(ctx) {
        Ok(verdict) => verdict.into(),
        Err(reason) => ingress::settle(ctx, reason).into(),
    }
}

#[inline(always)]
fn find_reply(ctx: &XdpContext) -> Result<u32, Counter> {
    let frame = parse::ethernet(ctx)?;
    let pkt = ingress::transport(ctx, &frame)?;
    let flow = ingress::flow_of(&pkt);
    let entry = SNAT_REPLIES
        .get_ptr_mut(flow)
        .ok_or(Counter::SnatReplyUnknown)?;
    Ok(translate_reply(ctx, &frame, &pkt, &flow, entry))
}

#[inline(always)]
fn translate_reply(
    ctx: &XdpContext,
    frame: &Frame,
    pkt: &L4Packet,
    flow: &FlowKey,
    entry: *mut SnatReply,
) -> u32 {
    let now = SNAT_CONFIG.get(0).map_or(0, |config| config.now);
    let flags = tcp_flags(ctx, pkt);
    // SAFETY: a map value pointer, valid for this run.
    let to = unsafe {
        touch(
            &raw mut (*entry).last_seen,
            &raw mut (*entry).state,
            now,
            flags,
        );
        Endpoints {
            src: (*entry).vip,
            src_port: (*entry).vip_port,
            dst: (*entry).client,
            dst_port: (*entry).client_port,
        }
    };
    nat::rewrite_both(pkt, (&flow.src, &flow.dst), &to);
    count(Counter::SnatReplyTranslated);
    to_client(ctx, frame, &Route::of(pkt), entry)
}

/// An ICMP error about a packet of an SNATed flow, translated for its client
/// ([`icmp::to_snat_client`]). Parses the packet again (a call of its own: see `ingress`).
#[inline(never)]
pub fn icmp_error(ctx: &XdpContext) -> u32 {
    icmp::to_snat_client(ctx).unwrap_or_else(|reason| ingress::settle(ctx, reason))
}

/// Sends a packet translated for an SNATed flow's client (a reply, or an ICMP error about the
/// flow) by the fast path, on the route cached in the flow's reply entry.
#[inline(always)]
pub fn to_client(ctx: &XdpContext, frame: &Frame, route: &Route, entry: *mut SnatReply) -> u32 {
    // SAFETY: the network header was bounds checked by the parser; `hop` points into a map
    // value (shared by CPUs: a racing refresh writes the same route).
    unsafe {
        let ttl = match route.ip {
            crate::parse::Ip::V4(ip) => (*ip).ttl,
            crate::parse::Ip::V6(ip) => (*ip).hop_limit,
        };
        let hop = &raw mut (*entry).hop;
        let Some(epoch) = forward::current_epoch() else {
            return to_kernel();
        };
        if frame.tagged || ttl <= 1 {
            return to_kernel();
        }
        if (*hop).epoch != epoch {
            match forward::resolve(ctx, route, None, hop, epoch) {
                Ok(()) => {}
                // The kernel has no neighbour entry for the client: back to where its packets
                // come from (the kernel would drop a reply whose flow its conntrack never saw).
                Err(Unresolved::NoNeighbour) if (*hop).ifindex != 0 => (*hop).epoch = epoch,
                Err(_) => return to_kernel(),
            }
        }
        if (*hop).xdp_transmit == 0 {
            return to_kernel();
        }
        forward::send(ctx, frame, route, hop)
    }
}

/// A translated packet the kernel must route (its source is not ours: the service address, or a
/// router's).
#[inline(always)]
fn to_kernel() -> u32 {
    count(Counter::SnatReplyToKernel);
    xdp_action::XDP_PASS
}
