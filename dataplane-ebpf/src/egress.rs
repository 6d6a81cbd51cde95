//! TC egress: a reply from a tracked backend gets the service address and port back.
//!
//! The skb helpers fix checksums, including CHECKSUM_PARTIAL packets from local offload.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use fulgur_common::{
    Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
    icmp::{self, Checksums, Rewrite, layout},
};

use crate::{
    maps::REVNAT,
    parse::{
        ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, IPV4_FRAGMENT_BITS, IPV6_MAX_EXT_HEADERS, VLAN_TAG_LEN,
    },
    stats::count,
};

const ETH_HLEN: usize = 14;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let _ = reverse_nat(ctx);
    TC_ACT_OK
}

/// Where the addresses and L4 header of an outgoing packet are.
struct Headers {
    family: u8,
    l3: usize,
    l4: usize,
    proto: u8,
    src: Addr,
    dst: Addr,
}

#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize) -> Result<Headers, i64> {
    let vihl: u8 = ctx.load(l3)?;
    let frags: u16 = ctx.load(l3 + 6)?;
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < 20 || u16::from_be(frags) & IPV4_FRAGMENT_BITS != 0 {
        return Err(0);
    }
    Ok(Headers {
        family: FAMILY_IPV4,
        l3,
        l4: l3 + header_len,
        proto: ctx.load(l3 + 9)?,
        src: [ctx.load(l3 + 12)?, 0, 0, 0],
        dst: [ctx.load(l3 + 16)?, 0, 0, 0],
    })
}

#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize) -> Result<Headers, i64> {
    let mut next: u8 = ctx.load(l3 + 6)?;
    let mut offset = l3 + 40;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        let len = match next {
            0 | 43 | 60 => (ctx.load::<u8>(offset + 1)? as usize + 1) * 8,
            44 => return Err(0), // A fragment: see IPV4_FRAGMENT_BITS.
            _ => break,
        };
        next = ctx.load(offset)?;
        offset += len;
    }
    Ok(Headers {
        family: FAMILY_IPV6,
        l3,
        l4: offset,
        proto: next,
        src: ctx.load(l3 + 8)?,
        dst: ctx.load(l3 + 24)?,
    })
}

/// Any error means "not a reply we track": the packet leaves untouched.
#[inline(always)]
fn reverse_nat(ctx: &TcContext) -> Result<(), i64> {
    let mut l3 = ETH_HLEN;
    let mut ether_type: u16 = ctx.load(12)?;
    if ether_type == ETH_P_8021Q {
        ether_type = ctx.load(16)?;
        l3 += VLAN_TAG_LEN;
    }
    let h = match ether_type {
        ETH_P_IPV4 => ipv4(ctx, l3)?,
        ETH_P_IPV6 => ipv6(ctx, l3)?,
        _ => return Ok(()),
    };
    let (check_offset, mangled_0) = match h.proto {
        PROTO_TCP => (16, 0),
        PROTO_UDP => (6, BPF_F_MARK_MANGLED_0 as u64),
        PROTO_ICMP | PROTO_ICMPV6 => return icmp_to_client(ctx, &h),
        _ => return Ok(()),
    };
    let src_port: u16 = ctx.load(h.l4)?;
    let dst_port: u16 = ctx.load(h.l4 + 2)?;
    // The checksum must be inside the packet before anything is rewritten.
    let _: u16 = ctx.load(h.l4 + check_offset)?;

    let reply = FlowKey {
        src: h.src,
        dst: h.dst,
        src_port,
        dst_port,
        proto: h.proto,
        family: h.family,
        pad: [0; 2],
    };
    // SAFETY: read once into locals; LRU values are replaced whole.
    let Some(restore) = (unsafe { REVNAT.get(reply) }) else {
        return Ok(());
    };
    let (vip, vip_port) = (restore.vip, restore.vip_port);

    let l4_check = h.l4 + check_offset;
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4;
    if h.family == FAMILY_IPV4 {
        ctx.l4_csum_replace(l4_check, h.src[0] as u64, vip[0] as u64, pseudo)?;
        ctx.l3_csum_replace(h.l3 + 10, h.src[0] as u64, vip[0] as u64, 4)?;
        ctx.store(h.l3 + 12, &vip[0], 0)?;
    } else {
        for (old, new) in h.src.iter().zip(vip.iter()) {
            ctx.l4_csum_replace(l4_check, *old as u64, *new as u64, pseudo)?;
        }
        ctx.store(h.l3 + 8, &vip, 0)?;
    }
    ctx.l4_csum_replace(l4_check, src_port as u64, vip_port as u64, mangled_0 | 2)?;
    ctx.store(h.l4, &vip_port, 0)?;
    count(Counter::ReplyTranslated);
    Ok(())
}

/// An ICMP error a backend (or a router behind it) sends about a tracked flow: the quoted packet
/// (client → backend) is made to read client → service, and a source that is the backend
/// itself becomes the service address, so the client's stack matches it to its socket.
#[inline(always)]
fn icmp_to_client(ctx: &TcContext, h: &Headers) -> Result<(), i64> {
    let v6 = h.family == FAMILY_IPV6;
    let (icmp_at, inner_ip, inner_l4) = if v6 {
        (layout::V6_ICMP, layout::V6_INNER_IP, layout::V6_INNER_L4)
    } else {
        (layout::V4_ICMP, layout::V4_INNER_IP, layout::V4_INNER_L4)
    };
    let l3 = h.l3;
    // Outer header without options or extension headers.
    if h.l4 != l3 + icmp_at {
        return Ok(());
    }
    let icmp_type: u8 = ctx.load(l3 + icmp_at)?;
    let (is_error, proto, quoted_src, quoted_dst, ip_len) = if v6 {
        let payload_len: u16 = ctx.load(l3 + 4)?;
        (
            icmp::is_icmpv6_error(icmp_type),
            ctx.load::<u8>(l3 + inner_ip + 6)?,
            ctx.load::<Addr>(l3 + inner_ip + 8)?,
            ctx.load::<Addr>(l3 + inner_ip + 24)?,
            40 + u16::from_be(payload_len) as usize,
        )
    } else {
        let total_len: u16 = ctx.load(l3 + 2)?;
        let inner_vihl: u8 = ctx.load(l3 + inner_ip)?;
        (
            icmp::is_icmpv4_error(icmp_type) && inner_vihl == 0x45,
            ctx.load::<u8>(l3 + inner_ip + 9)?,
            [ctx.load(l3 + inner_ip + 12)?, 0, 0, 0],
            [ctx.load(l3 + inner_ip + 16)?, 0, 0, 0],
            u16::from_be(total_len) as usize,
        )
    };
    if !is_error || !(proto == PROTO_TCP || proto == PROTO_UDP) || ip_len < inner_l4 + 8 {
        return Ok(());
    }
    let quoted_src_port: u16 = ctx.load(l3 + inner_l4)?;
    let quoted_dst_port: u16 = ctx.load(l3 + inner_l4 + 2)?;
    let reply = FlowKey {
        src: quoted_dst,
        dst: quoted_src,
        src_port: quoted_dst_port,
        dst_port: quoted_src_port,
        proto,
        family: h.family,
        pad: [0; 2],
    };
    // SAFETY: read once into locals; LRU values are replaced whole.
    let Some(restore) = (unsafe { REVNAT.get(reply) }) else {
        return Ok(());
    };
    let (vip, vip_port) = (restore.vip, restore.vip_port);

    let check_end = if proto == PROTO_TCP { 18 } else { 8 };
    let inner_l4_check_at = l3 + inner_l4 + check_end - 2;
    let outer_from_backend = h.src[0] == quoted_dst[0]
        && h.src[1] == quoted_dst[1]
        && h.src[2] == quoted_dst[2]
        && h.src[3] == quoted_dst[3];
    let old = Checksums {
        outer_ip: if v6 { 0 } else { ctx.load(l3 + 10)? },
        icmp: ctx.load(l3 + icmp_at + 2)?,
        inner_ip: if v6 { 0 } else { ctx.load(l3 + inner_ip + 10)? },
        inner_l4: if inner_l4 + check_end <= ip_len {
            Some(ctx.load(inner_l4_check_at)?)
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
            Some((h.src, vip))
        } else {
            None
        },
    };
    let new = icmp::rewritten(&rewrite, &old);
    if v6 {
        ctx.store(l3 + inner_ip + 24, &vip, 0)?;
        if outer_from_backend {
            ctx.store(l3 + 8, &vip, 0)?;
        }
    } else {
        ctx.store(l3 + inner_ip + 16, &vip[0], 0)?;
        ctx.store(l3 + inner_ip + 10, &new.inner_ip, 0)?;
        if outer_from_backend {
            ctx.store(l3 + 12, &vip[0], 0)?;
            ctx.store(l3 + 10, &new.outer_ip, 0)?;
        }
    }
    ctx.store(l3 + inner_l4 + 2, &vip_port, 0)?;
    if let Some(check) = new.inner_l4 {
        ctx.store(inner_l4_check_at, &check, 0)?;
    }
    ctx.store(l3 + icmp_at + 2, &new.icmp, 0)?;
    count(Counter::IcmpToClient);
    Ok(())
}
