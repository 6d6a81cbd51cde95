//! Bounds-checked header parsing for XDP. Anything truncated or invalid is reported, never read.

use aya_ebpf::programs::XdpContext;
use fulgur_common::{Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// Ethertypes as they sit in the packet (big endian read natively).
pub const ETH_P_IPV4: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const VLAN_TAG_LEN: usize = 4;
/// The more-fragments flag and fragment offset of the IPv4 flags/offset word: any fragment.
/// Fragments are never translated: without reassembly only the first carries the ports.
pub const IPV4_FRAGMENT_BITS: u16 = 0x3fff;

/// IPv6 extension headers we walk over.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// How many extension headers we follow before giving up (and passing the packet).
pub const IPV6_MAX_EXT_HEADERS: usize = 6;

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

/// The network header of a parsed packet.
#[derive(Clone, Copy)]
pub enum Ip {
    V4(*mut Ipv4Hdr),
    V6(*mut Ipv6Hdr),
}

/// A TCP or UDP packet whose headers are all inside the packet.
pub struct L4Packet {
    pub ip: Ip,
    pub l3: usize,
    pub l4: usize,
    pub proto: u8,
    pub ports: *mut Ports,
    /// The L4 checksum field.
    pub check: *mut u16,
    /// L4 header plus payload, as the IP header says.
    pub l4_len: usize,
}

impl L4Packet {
    #[inline(always)]
    pub fn family(&self) -> u8 {
        match self.ip {
            Ip::V4(_) => FAMILY_IPV4,
            Ip::V6(_) => FAMILY_IPV6,
        }
    }

    /// (source, destination) addresses.
    #[inline(always)]
    pub fn addrs(&self) -> (Addr, Addr) {
        // SAFETY: the header was bounds checked by the parser.
        unsafe {
            match self.ip {
                Ip::V4(ip) => (
                    fulgur_common::addr_v4((*ip).src_addr),
                    fulgur_common::addr_v4((*ip).dst_addr),
                ),
                Ip::V6(ip) => (
                    fulgur_common::addr_v6((*ip).src_addr),
                    fulgur_common::addr_v6((*ip).dst_addr),
                ),
            }
        }
    }
}

/// Checks the TCP or UDP header at `l4`, which the IP header says spans `l4_len` bytes.
#[inline(always)]
fn transport(
    ctx: &XdpContext,
    ip: Ip,
    l3: usize,
    l4: usize,
    proto: u8,
    l4_len: usize,
) -> Result<L4Packet, Counter> {
    let check_offset = match proto {
        PROTO_TCP => {
            let data_offset: *const u8 = ptr_at(ctx, l4 + 12).ok_or(Counter::PassMalformed)?;
            // SAFETY: bounds checked by ptr_at.
            let header_len = ((unsafe { *data_offset } >> 4) as usize) * 4;
            if header_len < 20 || header_len > l4_len {
                return Err(Counter::PassMalformed);
            }
            16
        }
        PROTO_UDP => {
            let length: *const [u8; 2] = ptr_at(ctx, l4 + 4).ok_or(Counter::PassMalformed)?;
            // SAFETY: bounds checked by ptr_at.
            let length = u16::from_be_bytes(unsafe { length.read_unaligned() }) as usize;
            if length < 8 || length > l4_len {
                return Err(Counter::PassMalformed);
            }
            6
        }
        _ => return Err(Counter::PassNotTcpUdp),
    };
    let ports: *mut Ports = ptr_at(ctx, l4).ok_or(Counter::PassMalformed)?;
    let check: *mut u16 = ptr_at(ctx, l4 + check_offset).ok_or(Counter::PassMalformed)?;
    Ok(L4Packet {
        ip,
        l3,
        l4,
        proto,
        ports,
        check,
        l4_len,
    })
}

#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l3: usize) -> Result<L4Packet, Counter> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, tot_len, frags, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len) as usize,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || tot_len < header_len {
        return Err(Counter::PassMalformed);
    }
    if frags & IPV4_FRAGMENT_BITS != 0 {
        return Err(Counter::PassFragment);
    }
    // The frame must hold the datagram.
    if ctx.data() + l3 + tot_len > ctx.data_end() {
        return Err(Counter::PassMalformed);
    }
    transport(
        ctx,
        Ip::V4(ip),
        l3,
        l3 + header_len,
        proto,
        tot_len - header_len,
    )
}

#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l3: usize) -> Result<L4Packet, Counter> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (version, payload_len, mut next) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
        )
    };
    if version != 6 || ctx.data() + l3 + Ipv6Hdr::LEN + payload_len > ctx.data_end() {
        return Err(Counter::PassMalformed);
    }
    let mut offset = l3 + Ipv6Hdr::LEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        let len = match next {
            // Rewriting an authenticated packet would break its integrity check.
            IPV6_AUTH => return Err(Counter::PassUnsupported),
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTS | IPV6_ROUTING | IPV6_FRAGMENT => {
                let ext: *const [u8; 4] = ptr_at(ctx, offset).ok_or(Counter::PassMalformed)?;
                // SAFETY: bounds checked by ptr_at.
                let ext = unsafe { ext.read_unaligned() };
                if next == IPV6_ROUTING && ext[3] != 0 {
                    // Segments left: the destination is not final, so it is not ours to rewrite.
                    return Err(Counter::PassUnsupported);
                }
                if next == IPV6_FRAGMENT {
                    return Err(Counter::PassFragment);
                }
                (ext[1] as usize + 1) * 8
            }
            _ => break,
        };
        // SAFETY: bounds checked by ptr_at (the first byte of every extension is its next header).
        next = unsafe { *ptr_at::<u8>(ctx, offset).ok_or(Counter::PassMalformed)? };
        offset += len;
    }
    let headers = offset - l3 - Ipv6Hdr::LEN;
    if payload_len < headers {
        return Err(Counter::PassMalformed);
    }
    transport(ctx, Ip::V6(ip), l3, offset, next, payload_len - headers)
}
