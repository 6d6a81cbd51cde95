//! Forwarding after DNAT: a FIB lookup, then either the fast path (MAC rewrite and redirect or
//! TX) or the kernel path (`XDP_PASS`: the kernel routes the translated packet, and netfilter sees
//! both directions of the flow). The agent decides per egress device ([`EGRESS_PATHS`]); the
//! kernel also takes what the lookup cannot finish (unknown neighbour, VLAN, expiring TTL, ...).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use fulgur_common::{Counter, NextHop, PATH_FAST, PATH_KERNEL, csum};

use crate::{
    maps::{EGRESS_PATHS, NEXT_HOP_EPOCH, NEXT_HOPS, REDIRECT_DEVICES},
    nat::Endpoints,
    parse::{Frame, Ip, L4Packet},
    stats::count,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What the FIB lookup needs of a translated packet.
pub struct Route {
    pub ip: Ip,
    pub proto: u8,
    /// (source, destination) ports as they sit in the packet; 0 for ICMP.
    pub ports: (u16, u16),
}

impl Route {
    #[inline(always)]
    pub fn of(pkt: &L4Packet) -> Self {
        // SAFETY: bounds checked by the parser.
        let ports = unsafe { ((*pkt.ports).src, (*pkt.ports).dst) };
        Route {
            ip: pkt.ip,
            proto: pkt.proto,
            ports,
        }
    }
}

/// Why a next hop was not found in XDP.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unresolved {
    /// VLAN tag, expiring TTL, no route, forwarding off, ...: the kernel must do it.
    Kernel,
    /// A route, but no neighbour entry for its next hop yet.
    NoNeighbour,
}

/// Sends a translated packet towards backend `backend_id`. The FIB result and the egress
/// device's path are cached per backend and CPU until the agent moves the epoch on: a FIB and
/// neighbour lookup costs more than everything else on the path together.
#[inline(always)]
pub fn forward(ctx: &XdpContext, frame: &Frame, route: &Route, backend_id: u32) -> u32 {
    let Ok(hop) = backend_hop(ctx, frame, route, None, backend_id) else {
        return to_kernel();
    };
    // SAFETY: a map value pointer, valid for this run.
    if unsafe { (*hop).path } != PATH_FAST {
        count(Counter::KernelPath);
        return xdp_action::XDP_PASS;
    }
    send(ctx, frame, route, hop)
}

/// Backend `backend_id`'s cached next hop, resolved again when its epoch is stale; for a packet
/// not yet rewritten, `translated` says what it will carry (an SNAT flow that cannot leave in
/// XDP is rejected untouched).
#[inline(always)]
pub fn backend_hop(
    ctx: &XdpContext,
    frame: &Frame,
    route: &Route,
    translated: Option<&Endpoints>,
    backend_id: u32,
) -> Result<*mut NextHop, Unresolved> {
    // SAFETY: the network header was bounds checked by the parser.
    let ttl = unsafe {
        match route.ip {
            Ip::V4(ip) => (*ip).ttl,
            Ip::V6(ip) => (*ip).hop_limit,
        }
    };
    if frame.tagged || ttl <= 1 {
        return Err(Unresolved::Kernel);
    }
    let hop = NEXT_HOPS
        .get_ptr_mut(backend_id)
        .ok_or(Unresolved::Kernel)?;
    let epoch = current_epoch().ok_or(Unresolved::Kernel)?;
    // SAFETY: a per-CPU map value, only this CPU writes it while the program runs.
    if unsafe { (*hop).epoch } != epoch {
        resolve(ctx, route, translated, hop, epoch)?;
    }
    Ok(hop)
}

/// The epoch cached next hops must carry to be trusted.
#[inline(always)]
pub fn current_epoch() -> Option<u32> {
    NEXT_HOP_EPOCH.get(0).copied()
}

/// Looks the packet's route up (FIB and neighbour) and caches it in `hop` with `epoch` and the
/// egress device's path.
#[inline(always)]
pub fn resolve(
    ctx: &XdpContext,
    route: &Route,
    translated: Option<&Endpoints>,
    hop: *mut NextHop,
    epoch: u32,
) -> Result<(), Unresolved> {
    // SAFETY: the caller's network header was bounds checked; `hop` is a map value pointer.
    unsafe {
        let mut params = fib_params(ctx, route);
        if let Some(t) = translated {
            params.sport = t.src_port;
            params.dport = t.dst_port;
            match route.ip {
                Ip::V4(_) => {
                    params.__bindgen_anon_3.ipv4_src = t.src[0];
                    params.__bindgen_anon_4.ipv4_dst = t.dst[0];
                }
                Ip::V6(_) => {
                    params.__bindgen_anon_3.ipv6_src = t.src;
                    params.__bindgen_anon_4.ipv6_dst = t.dst;
                }
            }
        }
        let rc = bpf_fib_lookup(ctx.as_ptr(), &mut params, size_of::<FibParams>() as i32, 0);
        if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            return Err(Unresolved::NoNeighbour);
        }
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
            return Err(Unresolved::Kernel);
        }
        // A device without a decision (new since the agent's last scan) takes the kernel
        // path; its decision moves the epoch on.
        let egress = EGRESS_PATHS.get(params.ifindex);
        let fast = egress.is_some_and(|egress| egress.path == PATH_FAST);
        let xdp_transmit = egress.map_or(0, |egress| egress.xdp_transmit);
        let (d, s) = (params.dmac, params.smac);
        *hop = NextHop {
            ifindex: params.ifindex,
            macs: [
                d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5],
            ],
            epoch,
            path: if fast { PATH_FAST } else { PATH_KERNEL },
            xdp_transmit,
            pad: [0; 2],
        };
    }
    Ok(())
}

/// The fast path: TTL − 1, the next hop's MACs, then XDP_TX out of the ingress device or
/// XDP_REDIRECT into another. A device that left the redirect map gets the packet through the
/// kernel instead.
#[inline(always)]
pub fn send(ctx: &XdpContext, frame: &Frame, route: &Route, hop: *const NextHop) -> u32 {
    // SAFETY: every pointer in `frame` and `route` was bounds checked by the parser; `hop` is
    // a map value pointer.
    unsafe {
        let out = (*hop).ifindex;
        let transmit = out == ctx.ingress_ifindex() as u32;
        // Before any rewrite: a packet the device cannot take goes to the kernel as it is.
        if !transmit
            && REDIRECT_DEVICES
                .redirect(out, xdp_action::XDP_PASS as u64)
                .is_err()
        {
            count(Counter::RedirectFailed);
            crate::log::redirect_failed(route, out);
            return xdp_action::XDP_PASS;
        }
        // We route the packet ourselves, so we age it like a router does.
        match route.ip {
            Ip::V4(ip) => {
                let ttl_word = ip.cast::<u8>().add(8).cast::<u16>();
                // 2-byte aligned, as the frame is.
                let old_word = ttl_word.read();
                (*ip).ttl -= 1;
                let new_word = ttl_word.read();
                let ip_check = u16::from_ne_bytes((*ip).check);
                (*ip).check = csum::replace16(ip_check, old_word, new_word).to_ne_bytes();
            }
            Ip::V6(ip) => (*ip).hop_limit -= 1,
        }
        // Copied as six 16-bit words, one by one: an array copy from a map value into the packet
        // compiles to a byte-by-byte memmove. Frames start at least 2-byte aligned (NET_IP_ALIGN
        // is 0 or 2), as do the cached MACs.
        let from = core::ptr::addr_of!((*hop).macs).cast::<u16>();
        let to = frame.eth.cast::<u16>();
        let words = [
            from.read(),
            from.add(1).read(),
            from.add(2).read(),
            from.add(3).read(),
            from.add(4).read(),
            from.add(5).read(),
        ];
        for (i, word) in words.into_iter().enumerate() {
            to.add(i).write(word);
        }
        if transmit {
            count(Counter::Transmit);
            return xdp_action::XDP_TX;
        }
        count(Counter::Redirect);
        xdp_action::XDP_REDIRECT
    }
}

/// The FIB lookup for the (already translated) packet, as if routed from the ingress interface.
#[inline(always)]
unsafe fn fib_params(ctx: &XdpContext, route: &Route) -> FibParams {
    // SAFETY: the caller's network header was bounds checked.
    unsafe {
        let mut params: FibParams = core::mem::zeroed();
        params.l4_protocol = route.proto;
        params.sport = route.ports.0;
        params.dport = route.ports.1;
        params.ifindex = ctx.ingress_ifindex() as u32;
        match route.ip {
            Ip::V4(ip) => {
                params.family = AF_INET;
                params.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
                params.__bindgen_anon_2.tos = (*ip).tos;
                params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
                params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
            }
            Ip::V6(ip) => {
                params.family = AF_INET6;
                params.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).payload_len) + 40;
                params.__bindgen_anon_2.flowinfo =
                    u32::from_ne_bytes((*ip).vcf) & 0xffff_ff0fu32.to_be();
                params.__bindgen_anon_3.ipv6_src = fulgur_common::addr_v6((*ip).src_addr);
                params.__bindgen_anon_4.ipv6_dst = fulgur_common::addr_v6((*ip).dst_addr);
            }
        }
        params
    }
}

#[inline(always)]
fn to_kernel() -> u32 {
    count(Counter::PassToKernel);
    xdp_action::XDP_PASS
}
