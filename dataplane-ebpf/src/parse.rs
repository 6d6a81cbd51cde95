//! Bounds-checked header parsing, one parser for XDP ingress and TC egress. Anything truncated
//! or invalid is reported, never read.

use aya_ebpf::programs::{TcContext, XdpContext};
pub use fulgur_common::consts::{ETH_P_IPV4, ETH_P_IPV6};
use fulgur_common::{
    Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP,
    consts::{
        ETH_P_8021Q, IPV4_FRAGMENT_BITS, IPV6_AUTH, IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP,
        IPV6_MAX_EXT_HEADERS, IPV6_ROUTING, VLAN_TAG_LEN,
    },
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// The packet as the parser sees it, in XDP or in TC: directly readable bytes from `data()` to
/// `data_end()`.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The packet holds `len` bytes from its start. In XDP that is the frame; a TC skb's
    /// datagram may go on past `data_end()` in paged data (GSO, GRO), which the headers never do.
    fn holds(&self, len: usize) -> bool;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.data() + len <= self.data_end()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        len <= self.len() as usize
    }
}

/// Returns a pointer to a `T` at `offset`, or `None` if it would cross the end of the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads the `T` at `offset` (packet data has no alignment), or `None` past the end.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &impl Packet, offset: usize) -> Option<T> {
    let p: *const T = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { p.read_unaligned() })
}

/// Writing packet bytes: in place in XDP; in TC through `bpf_skb_store_bytes`, because one
/// direct write anywhere in a TC program makes the verifier unclone every skb it sees, first.
pub trait Store: Packet {
    /// Writes `value` at `offset`; the error is the packet's outcome.
    fn store_at<T>(&self, offset: usize, value: T) -> Result<(), Counter>;
}

impl Store for XdpContext {
    #[inline(always)]
    fn store_at<T>(&self, offset: usize, value: T) -> Result<(), Counter> {
        let p: *mut T = ptr_at(self, offset).ok_or(Counter::PassMalformed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { p.write_unaligned(value) };
        Ok(())
    }
}

impl Store for TcContext {
    #[inline(always)]
    fn store_at<T>(&self, offset: usize, value: T) -> Result<(), Counter> {
        TcContext::store(self, offset, &value, 0).map_err(|_| Counter::EgressRewriteFailed)
    }
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
pub fn ethernet(ctx: &impl Packet) -> Result<Frame, Counter> {
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
    ctx: &impl Packet,
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
pub fn ipv4(ctx: &impl Packet, l3: usize) -> Result<L4Packet, Counter> {
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
    if !ctx.holds(l3 + tot_len) {
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
pub fn ipv6(ctx: &impl Packet, l3: usize) -> Result<L4Packet, Counter> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (version, payload_len, mut next) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
        )
    };
    if version != 6 || !ctx.holds(l3 + Ipv6Hdr::LEN + payload_len) {
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
