//! Forwarding after DNAT: a FIB lookup, then either the fast path (MAC rewrite and redirect or
//! TX) or the kernel path (`XDP_PASS`: the kernel routes the translated packet, and netfilter sees
//! both directions of the flow). The agent decides per egress device ([`EGRESS_PATHS`]); the
//! kernel also takes what the lookup cannot finish (unknown neighbour, VLAN, expiring TTL, ...).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use fulgur_common::{Counter, NextHop, PATH_FAST, PATH_KERNEL, csum};

use crate::{
    maps::{EGRESS_PATHS, NEXT_HOP_EPOCH, NEXT_HOPS, REDIRECT_DEVICES},
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

/// Sends a translated packet towards backend `backend_id`. The FIB result and the egress
/// device's path are cached per backend and CPU until the agent moves the epoch on: a FIB and
/// neighbour lookup costs more than everything else on the path together.
#[inline(always)]
pub fn forward(ctx: &XdpContext, frame: &Frame, route: &Route, backend_id: u32) -> u32 {
    // SAFETY: every pointer in `frame` and `route` was bounds checked by the parser.
    unsafe {
        let ttl = match route.ip {
            Ip::V4(ip) => (*ip).ttl,
            Ip::V6(ip) => (*ip).hop_limit,
        };
        if frame.tagged || ttl <= 1 {
            return to_kernel();
        }
        let Some(hop) = NEXT_HOPS.get_ptr_mut(backend_id) else {
            return to_kernel();
        };
        let Some(&epoch) = NEXT_HOP_EPOCH.get(0) else {
            return to_kernel();
        };
        if (*hop).epoch != epoch {
            let mut params = fib_params(ctx, route);
            let rc = bpf_fib_lookup(ctx.as_ptr(), &mut params, size_of::<FibParams>() as i32, 0);
            if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
                return to_kernel();
            }
            // A device without a decision (new since the agent's last scan) takes the kernel
            // path; its decision moves the epoch on.
            let fast = EGRESS_PATHS
                .get(params.ifindex)
                .is_some_and(|egress| egress.path == PATH_FAST);
            let (d, s) = (params.dmac, params.smac);
            *hop = NextHop {
                ifindex: params.ifindex,
                macs: [
                    d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5],
                ],
                epoch,
                path: if fast { PATH_FAST } else { PATH_KERNEL },
                pad: [0; 3],
            };
        }
        if (*hop).path != PATH_FAST {
            count(Counter::KernelPath);
            return xdp_action::XDP_PASS;
        }
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
