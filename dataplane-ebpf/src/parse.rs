//! Bounds-checked header parsing for XDP. Anything truncated or invalid is reported, never read.

use aya_ebpf::programs::XdpContext;
use fulgur_common::{Counter, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// Ethertypes as they sit in the packet (big endian read natively).
pub const ETH_P_IPV4: u16 = 0x0800u16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const VLAN_TAG_LEN: usize = 4;
/// The fragment-offset bits of the IPv4 flags/offset word.
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

/// Returns a pointer to a `T` at `offset`, or `None` if it would cross the end of the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The link layer: where the network header starts and what it is.
pub struct Frame {
    pub eth: *mut EthHdr,
    pub l3: usize,
    pub ether_type: u16,
    /// An 802.1Q tag was present: the kernel's VLAN device must forward it.
    pub tagged: bool,
}

#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Result<Frame, Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != ETH_P_8021Q {
        return Ok(Frame {
            eth,
            l3: EthHdr::LEN,
            ether_type,
            tagged: false,
        });
    }
    let inner: *const u16 =
        ptr_at(ctx, EthHdr::LEN + VLAN_TAG_LEN - 2).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { inner.read_unaligned() };
    Ok(Frame {
        eth,
        l3: EthHdr::LEN + VLAN_TAG_LEN,
        ether_type,
        tagged: true,
    })
}

/// The first two words of TCP and UDP headers (packed: packet data has no alignment).
#[repr(C, packed)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// An IPv4 TCP or UDP packet whose headers are all inside the packet.
pub struct Ipv4L4 {
    pub ip: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    /// The L4 checksum field.
    pub check: *mut u16,
    pub proto: u8,
}

#[inline(always)]
pub fn ipv4_l4(ctx: &XdpContext, l3: usize) -> Result<Ipv4L4, Counter> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, tot_len, frags, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || (tot_len as usize) < header_len {
        return Err(Counter::PassMalformed);
    }
    if frags & IPV4_FRAG_OFFSET_MASK != 0 {
        return Err(Counter::PassFragment);
    }
    let l4 = l3 + header_len;
    let (check_offset, l4_min) = match proto {
        PROTO_TCP => (16, 20),
        PROTO_UDP => (6, 8),
        _ => return Err(Counter::PassNotTcpUdp),
    };
    // The datagram must hold the L4 header, and the frame must hold the datagram.
    if (tot_len as usize) < header_len + l4_min
        || ctx.data() + l3 + tot_len as usize > ctx.data_end()
    {
        return Err(Counter::PassMalformed);
    }
    let ports: *mut Ports = ptr_at(ctx, l4).ok_or(Counter::PassMalformed)?;
    let check: *mut u16 = ptr_at(ctx, l4 + check_offset).ok_or(Counter::PassMalformed)?;
    Ok(Ipv4L4 {
        ip,
        ports,
        check,
        proto,
    })
}
