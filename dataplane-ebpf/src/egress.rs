//! TC egress: a reply from a tracked backend gets the service address and port back.
//!
//! Parsed by the same parser as XDP ingress ([`crate::parse`]); rewritten through the skb
//! helpers, which fix checksums, CHECKSUM_PARTIAL packets from local offload included. Every
//! outcome moves one `Egress*` counter (or `ReplyTranslated` / `IcmpToClient`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use fulgur_common::{
    Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, addr_eq,
    icmp::{self, Checksums, Rewrite, layout},
};

use crate::{
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

/// The egress reason for what the parser (or the ICMP reader) says, in ingress's words.
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
        Err(Counter::PassNotTcpUdp) => {
            // Not TCP/UDP; an ICMP error about a tracked flow is translated.
            let translated = icmp_to_client(ctx, frame.l3, frame.ether_type == ETH_P_IPV6);
            return match translated {
                Ok(Counter::IcmpToClient) => Ok(Counter::IcmpToClient),
                Ok(reason) | Err(reason) => Err(reason),
            };
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

/// An ICMP error a backend (or a router behind it) sends about a tracked flow: the quoted packet
/// (client → backend) is made to read client → service, and a source that is the backend
/// itself becomes the service address, so the client's stack matches it to its socket.
#[inline(always)]
fn icmp_to_client(ctx: &TcContext, l3: usize, v6: bool) -> Result<Counter, Counter> {
    let malformed = |_| Counter::EgressMalformed;
    let failed = |_| Counter::EgressRewriteFailed;
    let family = if v6 { FAMILY_IPV6 } else { FAMILY_IPV4 };
    let (icmp_at, inner_ip, inner_l4) = if v6 {
        (layout::V6_ICMP, layout::V6_INNER_IP, layout::V6_INNER_L4)
    } else {
        (layout::V4_ICMP, layout::V4_INNER_IP, layout::V4_INNER_L4)
    };
    // Outer header without options or extension headers, carrying ICMP.
    let (outer_proto, outer_src): (u8, Addr) = if v6 {
        (
            ctx.load(l3 + 6).map_err(malformed)?,
            ctx.load(l3 + 8).map_err(malformed)?,
        )
    } else {
        let vihl: u8 = ctx.load(l3).map_err(malformed)?;
        if vihl != 0x45 {
            return Ok(Counter::EgressNotTcpUdp);
        }
        (
            ctx.load(l3 + 9).map_err(malformed)?,
            [ctx.load(l3 + 12).map_err(malformed)?, 0, 0, 0],
        )
    };
    if outer_proto != if v6 { PROTO_ICMPV6 } else { PROTO_ICMP } {
        return Ok(Counter::EgressNotTcpUdp);
    }
    let icmp_type: u8 = ctx.load(l3 + icmp_at).map_err(malformed)?;
    let is_error = if v6 {
        icmp::is_icmpv6_error(icmp_type)
    } else {
        icmp::is_icmpv4_error(icmp_type)
    };
    if !is_error {
        return Ok(Counter::EgressNotTcpUdp);
    }
    let (quote_ok, proto, quoted_src, quoted_dst, ip_len) = if v6 {
        let payload_len: u16 = ctx.load(l3 + 4).map_err(malformed)?;
        (
            true,
            ctx.load::<u8>(l3 + inner_ip + 6).map_err(malformed)?,
            ctx.load::<Addr>(l3 + inner_ip + 8).map_err(malformed)?,
            ctx.load::<Addr>(l3 + inner_ip + 24).map_err(malformed)?,
            40 + u16::from_be(payload_len) as usize,
        )
    } else {
        let total_len: u16 = ctx.load(l3 + 2).map_err(malformed)?;
        let inner_vihl: u8 = ctx.load(l3 + inner_ip).map_err(malformed)?;
        (
            inner_vihl == 0x45,
            ctx.load::<u8>(l3 + inner_ip + 9).map_err(malformed)?,
            [ctx.load(l3 + inner_ip + 12).map_err(malformed)?, 0, 0, 0],
            [ctx.load(l3 + inner_ip + 16).map_err(malformed)?, 0, 0, 0],
            u16::from_be(total_len) as usize,
        )
    };
    if !quote_ok || !(proto == PROTO_TCP || proto == PROTO_UDP) {
        return Ok(Counter::EgressNotTcpUdp);
    }
    if ip_len < inner_l4 + 8 {
        return Ok(Counter::EgressMalformed);
    }
    let quoted_src_port: u16 = ctx.load(l3 + inner_l4).map_err(malformed)?;
    let quoted_dst_port: u16 = ctx.load(l3 + inner_l4 + 2).map_err(malformed)?;
    let reply = FlowKey {
        src: quoted_dst,
        dst: quoted_src,
        src_port: quoted_dst_port,
        dst_port: quoted_src_port,
        proto,
        family,
        pad: [0; 2],
    };
    // SAFETY: read once into locals; LRU values are replaced whole.
    let Some(restore) = (unsafe { REVNAT.get(reply) }) else {
        return Ok(Counter::EgressNotReply);
    };
    let (vip, vip_port) = (restore.vip, restore.vip_port);

    let check_end = if proto == PROTO_TCP { 18 } else { 8 };
    let inner_l4_check_at = l3 + inner_l4 + check_end - 2;
    let outer_from_backend = addr_eq(&outer_src, &quoted_dst);
    let old = Checksums {
        outer_ip: if v6 {
            0
        } else {
            ctx.load(l3 + 10).map_err(malformed)?
        },
        icmp: ctx.load(l3 + icmp_at + 2).map_err(malformed)?,
        inner_ip: if v6 {
            0
        } else {
            ctx.load(l3 + inner_ip + 10).map_err(malformed)?
        },
        inner_l4: if inner_l4 + check_end <= ip_len {
            Some(ctx.load(inner_l4_check_at).map_err(malformed)?)
        } else {
            None
        },
    };
    let rewrite = Rewrite {
        v6,
        inner_addr: (quoted_dst, vip),
        inner_port: (quoted_dst_port, vip_port),
        udp: proto == PROTO_UDP,
        outer_addr: if outer_from_backend {
            Some((outer_src, vip))
        } else {
            None
        },
    };
    let new = icmp::rewritten(&rewrite, &old);
    if v6 {
        ctx.store(l3 + inner_ip + 24, &vip, 0).map_err(failed)?;
        if outer_from_backend {
            ctx.store(l3 + 8, &vip, 0).map_err(failed)?;
        }
    } else {
        ctx.store(l3 + inner_ip + 16, &vip[0], 0).map_err(failed)?;
        ctx.store(l3 + inner_ip + 10, &new.inner_ip, 0)
            .map_err(failed)?;
        if outer_from_backend {
            ctx.store(l3 + 12, &vip[0], 0).map_err(failed)?;
            ctx.store(l3 + 10, &new.outer_ip, 0).map_err(failed)?;
        }
    }
    ctx.store(l3 + inner_l4 + 2, &vip_port, 0).map_err(failed)?;
    if let Some(check) = new.inner_l4 {
        ctx.store(inner_l4_check_at, &check, 0).map_err(failed)?;
    }
    ctx.store(l3 + icmp_at + 2, &new.icmp, 0).map_err(failed)?;
    Ok(Counter::IcmpToClient)
}
