//! TC egress: a reply from a tracked backend gets the service address and port back; an ICMP
//! error about a tracked flow has its quote translated by [`crate::icmp`], which XDP ingress
//! shares.
//!
//! Parsed by the same parser as XDP ingress ([`crate::parse`]); rewritten through the skb
//! helpers, which fix checksums, CHECKSUM_PARTIAL packets from local offload included. Every
//! outcome moves one `Egress*` counter (or `ReplyTranslated` / `IcmpToClient`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use fulgur_common::{Counter, FAMILY_IPV4, FlowKey, PROTO_UDP};

use crate::{
    icmp,
    maps::REVNAT,
    parse::{self, ETH_P_IPV4, ETH_P_IPV6},
    stats::count,
};

/// Bytes made directly readable when the headers lie past the skb's linear part: enough for
/// Ethernet, a VLAN tag, IPv6 and TCP with options, or an ICMP error's quote up to its checksum.
const PULL_LEN: u32 = 128;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let outcome = match reverse_nat(ctx) {
        // Headers in paged data: pull them into the linear part and parse once more.
        Err(Counter::EgressMalformed) if ctx.data_end() - ctx.data() < ctx.len() as usize => {
            match ctx.pull_data(ctx.len().min(PULL_LEN)) {
                Ok(_) => reverse_nat(ctx),
                Err(_) => Err(Counter::EgressMalformed),
            }
        }
        other => other,
    };
    count(match outcome {
        Ok(counter) | Err(counter) => counter,
    });
    TC_ACT_OK
}

/// The egress reason for what the parser (or [`icmp::to_client`]) says, in ingress's words.
#[inline(always)]
fn on_egress(reason: Counter) -> Counter {
    match reason {
        Counter::PassNotIp => Counter::EgressNotIp,
        Counter::PassNotTcpUdp => Counter::EgressNotTcpUdp,
        Counter::PassFragment => Counter::EgressFragment,
        Counter::PassUnsupported => Counter::EgressUnsupported,
        Counter::PassNotService => Counter::EgressNotReply,
        Counter::EgressRewriteFailed => Counter::EgressRewriteFailed,
        _ => Counter::EgressMalformed,
    }
}

/// Translates a reply back to the service address: `Ok` with what was done, or `Err` with why
/// the packet leaves untouched.
#[inline(always)]
fn reverse_nat(ctx: &TcContext) -> Result<Counter, Counter> {
    let frame = parse::ethernet(ctx).map_err(on_egress)?;
    let parsed = match frame.ether_type {
        ETH_P_IPV4 => parse::ipv4(ctx, frame.l3),
        ETH_P_IPV6 => parse::ipv6(ctx, frame.l3),
        _ => return Err(Counter::EgressNotIp),
    };
    let pkt = match parsed {
        // Not TCP/UDP; an ICMP error about a tracked flow is translated.
        Err(Counter::PassNotTcpUdp) => {
            return icmp::to_client(ctx, frame.l3, frame.ether_type == ETH_P_IPV6)
                .map_err(on_egress);
        }
        other => other.map_err(on_egress)?,
    };
    let (src, dst) = pkt.addrs();
    // SAFETY: bounds checked by the parser; read before any helper call moves the packet.
    let (src_port, dst_port) = unsafe { ((*pkt.ports).src, (*pkt.ports).dst) };
    let (l3, l4, family) = (pkt.l3, pkt.l4, pkt.family());
    let reply = FlowKey {
        src,
        dst,
        src_port,
        dst_port,
        proto: pkt.proto,
        family,
        pad: [0; 2],
    };
    // SAFETY: read once into locals; LRU values are replaced whole.
    let restore = unsafe { REVNAT.get(reply) }.ok_or(Counter::EgressNotReply)?;
    let (vip, vip_port) = (restore.vip, restore.vip_port);

    // The parser returns TCP and UDP only.
    let (check_offset, mangled_0) = if pkt.proto == PROTO_UDP {
        (6, BPF_F_MARK_MANGLED_0 as u64)
    } else {
        (16, 0)
    };
    let failed = |_| Counter::EgressRewriteFailed;
    let l4_check = l4 + check_offset;
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4;
    if family == FAMILY_IPV4 {
        ctx.l4_csum_replace(l4_check, src[0] as u64, vip[0] as u64, pseudo)
            .map_err(failed)?;
        ctx.l3_csum_replace(l3 + 10, src[0] as u64, vip[0] as u64, 4)
            .map_err(failed)?;
        ctx.store(l3 + 12, &vip[0], 0).map_err(failed)?;
    } else {
        for (old, new) in src.iter().zip(vip.iter()) {
            ctx.l4_csum_replace(l4_check, *old as u64, *new as u64, pseudo)
                .map_err(failed)?;
        }
        ctx.store(l3 + 8, &vip, 0).map_err(failed)?;
    }
    ctx.l4_csum_replace(l4_check, src_port as u64, vip_port as u64, mangled_0 | 2)
        .map_err(failed)?;
    ctx.store(l4, &vip_port, 0).map_err(failed)?;
    Ok(Counter::ReplyTranslated)
}
