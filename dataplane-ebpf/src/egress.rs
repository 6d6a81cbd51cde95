//! TC egress: a reply from a tracked backend gets the service address and port back.
//!
//! The skb helpers fix checksums, including CHECKSUM_PARTIAL packets from local offload.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use fulgur_common::{Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_TCP, PROTO_UDP};

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
