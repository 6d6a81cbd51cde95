//! TC egress: a reply from a tracked backend gets the service address and port back.
//!
//! The skb helpers fix checksums, including CHECKSUM_PARTIAL packets from local offload.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use fulgur_common::{Counter, FAMILY_IPV4, FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{maps::REVNAT, parse::ETH_P_IPV4, stats::count};

const ETH_HLEN: usize = 14;
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let _ = reverse_nat(ctx);
    TC_ACT_OK
}

/// Any error means "not a reply we track": the packet leaves untouched.
#[inline(always)]
fn reverse_nat(ctx: &TcContext) -> Result<(), i64> {
    let mut l3 = ETH_HLEN;
    let mut ether_type: u16 = ctx.load(12)?;
    if ether_type == ETH_P_8021Q {
        ether_type = ctx.load(16)?;
        l3 += 4;
    }
    if ether_type != ETH_P_IPV4 {
        return Ok(());
    }
    let vihl: u8 = ctx.load(l3)?;
    let frags: u16 = ctx.load(l3 + 6)?;
    let proto: u8 = ctx.load(l3 + 9)?;
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < 20 || u16::from_be(frags) & IPV4_FRAG_OFFSET_MASK != 0 {
        return Ok(());
    }
    let (check_offset, mangled_0) = match proto {
        PROTO_TCP => (16, 0),
        PROTO_UDP => (6, BPF_F_MARK_MANGLED_0 as u64),
        _ => return Ok(()),
    };
    let src: u32 = ctx.load(l3 + 12)?;
    let dst: u32 = ctx.load(l3 + 16)?;
    let l4 = l3 + header_len;
    let src_port: u16 = ctx.load(l4)?;
    let dst_port: u16 = ctx.load(l4 + 2)?;
    // The checksum must be inside the packet before anything is rewritten.
    let _: u16 = ctx.load(l4 + check_offset)?;

    let reply = FlowKey {
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        src_port,
        dst_port,
        proto,
        family: FAMILY_IPV4,
        pad: [0; 2],
    };
    // SAFETY: read once into locals; LRU values are replaced whole.
    let Some(restore) = (unsafe { REVNAT.get(reply) }) else {
        return Ok(());
    };
    let (vip, vip_port) = (restore.vip[0], restore.vip_port);

    let l4_check = l4 + check_offset;
    ctx.l4_csum_replace(
        l4_check,
        src as u64,
        vip as u64,
        BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4,
    )?;
    ctx.l4_csum_replace(l4_check, src_port as u64, vip_port as u64, mangled_0 | 2)?;
    ctx.l3_csum_replace(l3 + 10, src as u64, vip as u64, 4)?;
    ctx.store(l3 + 12, &vip, 0)?;
    ctx.store(l4, &vip_port, 0)?;
    count(Counter::ReplyTranslated);
    Ok(())
}
