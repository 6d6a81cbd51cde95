//! ARP replies and neighbour advertisements for the Gateway addresses this node announces, sent
//! back out of the ingress device with its MAC (XDP_TX), so clients on the node network reach
//! the addresses on-link. Only ARP frames and ICMPv6 reach this module: TCP and UDP never do.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use fulgur_common::{
    Addr, AnnounceKey, Counter, FAMILY_IPV4, FAMILY_IPV6, PROTO_ICMPV6, addr_v4, addr_v6, csum,
};

use crate::{
    maps::{ANNOUNCE_DEVICES, ANNOUNCE_LEASE, ANNOUNCED},
    parse::{Frame, ptr_at},
    reject::{pseudo_tail, resize},
    stats::count,
};

pub use fulgur_common::consts::ETH_P_ARP;
use fulgur_common::consts::{
    ALL_NODES, ALL_NODES_MAC, ARP_REPLY, ARP_REQUEST, NA_OVERRIDE, NA_SOLICITED, NDP_ADVERTISEMENT,
    NDP_HOP_LIMIT, NDP_OPTION_TARGET_LINK_LAYER, NDP_SOLICITATION,
};

/// An Ethernet/IPv4 ARP message (RFC 826).
const ARP_LEN: usize = 28;
const IPV6_LEN: usize = 40;
/// A neighbour solicitation without options: type, code, checksum, reserved, target.
const NS_LEN: usize = 24;
/// The advertisement we send: type, code, checksum, flags, target, target link-layer option.
const NA_LEN: usize = 32;

/// The MAC of the ingress device, if the agent registered it as client-facing.
#[inline(always)]
pub fn device_mac(ctx: &XdpContext) -> Option<[u8; 6]> {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: device values are replaced whole by the agent.
    unsafe { ANNOUNCE_DEVICES.get(ifindex) }.map(|d| d.mac)
}

/// Whether a request for `addr` is answered: it is announced, and the agent's lease on the
/// announcements has not run out (a dead agent's program must not outlive the move).
#[inline(always)]
fn announced(addr: Addr, family: u8) -> Result<(), Counter> {
    let key = AnnounceKey {
        addr,
        family,
        pad: [0; 3],
    };
    // SAFETY: a lookup only; the value is not read.
    if unsafe { ANNOUNCED.get(key) }.is_none() {
        return Err(Counter::AnnounceNotOurs);
    }
    let until = ANNOUNCE_LEASE.get(0).copied().unwrap_or(0);
    // SAFETY: the helper has no preconditions.
    if until != 0 && unsafe { bpf_ktime_get_ns() } > until {
        return Err(Counter::AnnounceLeaseExpired);
    }
    Ok(())
}

#[inline(always)]
fn verdict(result: Result<Counter, Counter>) -> Result<u32, Counter> {
    let answered = result?;
    count(answered);
    Ok(xdp_action::XDP_TX)
}

/// An ARP frame: answers a request for an announced address in place (RFC 826: the request's
/// sender becomes the target). Anything else goes to the kernel with its reason.
#[inline(always)]
pub fn arp(ctx: &XdpContext, frame: &Frame) -> Result<u32, Counter> {
    verdict(arp_reply(ctx, frame))
}

#[inline(always)]
fn arp_reply(ctx: &XdpContext, frame: &Frame) -> Result<Counter, Counter> {
    // Fields are read and written one by one: a copy of the whole message would not fit the
    // stack next to the rest of the ingress program.
    let message: *mut [u8; ARP_LEN] = ptr_at(ctx, frame.l3).ok_or(Counter::AnnounceMalformed)?;
    let message = message.cast::<u8>();
    // SAFETY: bounds checked by ptr_at.
    let (fixed, operation, wanted) = unsafe {
        (
            message.cast::<[u8; 6]>().read_unaligned(),
            u16::from_be_bytes(message.add(6).cast::<[u8; 2]>().read_unaligned()),
            message.add(24).cast::<[u8; 4]>().read_unaligned(),
        )
    };
    // Ethernet hardware (1), IPv4 protocol, 6-byte and 4-byte addresses.
    if u32::from_ne_bytes([fixed[0], fixed[1], fixed[2], fixed[3]])
        != u32::from_ne_bytes([0, 1, 0x08, 0x00])
        || fixed[4] != 6
        || fixed[5] != 4
    {
        return Err(Counter::AnnounceMalformed);
    }
    if operation != ARP_REQUEST || frame.tagged {
        return Err(Counter::AnnounceNotOurs);
    }
    announced(addr_v4(wanted), FAMILY_IPV4)?;
    let mac = device_mac(ctx).ok_or(Counter::AnnounceNoDevice)?;
    // SAFETY: every field lies inside the message, bounds checked above.
    unsafe {
        let sender_mac = message.add(8).cast::<[u8; 6]>().read_unaligned();
        let sender_ip = message.add(14).cast::<[u8; 4]>().read_unaligned();
        // RFC 826: the request's sender becomes the target; we are the sender.
        message
            .add(6)
            .cast::<[u8; 2]>()
            .write_unaligned(ARP_REPLY.to_be_bytes());
        message.add(8).cast::<[u8; 6]>().write_unaligned(mac);
        message.add(14).cast::<[u8; 4]>().write_unaligned(wanted);
        message
            .add(18)
            .cast::<[u8; 6]>()
            .write_unaligned(sender_mac);
        message.add(24).cast::<[u8; 4]>().write_unaligned(sender_ip);
        (*frame.eth).dst_addr = sender_mac;
        (*frame.eth).src_addr = mac;
    }
    Ok(Counter::ArpAnswered)
}

/// An IPv6 frame that is not TCP or UDP: `Some` with the outcome when it is a neighbour
/// solicitation, which is answered when its target is announced (RFC 4861 7.2.4); `None` for
/// any other ICMPv6 or IPv6, which goes on along the usual path.
#[inline(always)]
pub fn solicitation(ctx: &XdpContext, frame: &Frame) -> Option<Result<u32, Counter>> {
    let next_header: *const u8 = ptr_at(ctx, frame.l3 + 6)?;
    let icmp_type: *const u8 = ptr_at(ctx, frame.l3 + IPV6_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { *next_header } != PROTO_ICMPV6 || unsafe { *icmp_type } != NDP_SOLICITATION {
        return None;
    }
    Some(verdict(advertise(ctx, frame)))
}

#[inline(always)]
fn read_addr(at: *const u8) -> Addr {
    // SAFETY: the caller checked 16 bytes at `at`.
    unsafe { at.cast::<Addr>().read_unaligned() }
}

#[inline(always)]
fn word(a: u8, b: u8) -> u32 {
    u16::from_ne_bytes([a, b]) as u32
}

#[inline(always)]
fn advertise(ctx: &XdpContext, frame: &Frame) -> Result<Counter, Counter> {
    let l3 = frame.l3;
    let ns: *const [u8; IPV6_LEN + NS_LEN] = ptr_at(ctx, l3).ok_or(Counter::AnnounceMalformed)?;
    let ns = ns.cast::<u8>();
    // SAFETY: bounds checked by ptr_at.
    let (payload_len, hop_limit, code, source, target, to_solicited_node) = unsafe {
        // ff02::1:ffXX:XXXX, compared as words (array comparisons become calls).
        let group = read_addr(ns.add(24));
        (
            u16::from_be_bytes(ns.add(4).cast::<[u8; 2]>().read_unaligned()) as usize,
            *ns.add(7),
            *ns.add(IPV6_LEN + 1),
            read_addr(ns.add(8)),
            read_addr(ns.add(IPV6_LEN + 8)),
            group[0] == u32::from_ne_bytes([0xff, 2, 0, 0])
                && group[1] == 0
                && group[2] == u32::from_ne_bytes([0, 0, 0, 1])
                && group[3].to_ne_bytes()[0] == 0xff,
        )
    };
    let from_unspecified = source[0] | source[1] | source[2] | source[3] == 0;
    // RFC 4861 7.1.1 (options are not needed for the answer and are not read).
    if hop_limit != NDP_HOP_LIMIT
        || code != 0
        || payload_len < NS_LEN
        || ctx.data() + l3 + IPV6_LEN + payload_len > ctx.data_end()
        || target[0].to_ne_bytes()[0] == 0xff
        || (from_unspecified && !to_solicited_node)
    {
        return Err(Counter::AnnounceMalformed);
    }
    if frame.tagged {
        return Err(Counter::AnnounceNotOurs);
    }
    announced(target, FAMILY_IPV6)?;
    let mac = device_mac(ctx).ok_or(Counter::AnnounceNoDevice)?;
    // SAFETY: bounds checked by the parser.
    let client_mac = unsafe { (*frame.eth).src_addr };
    // A duplicate address detection probe (from ::) is answered to all nodes, unsolicited.
    let (destination, destination_mac, flags) = if from_unspecified {
        (addr_v6(ALL_NODES), ALL_NODES_MAC, NA_OVERRIDE)
    } else {
        (source, client_mac, NA_SOLICITED | NA_OVERRIDE)
    };
    // The checksum from the fields' words: the pseudo-header, then the message.
    let sum = csum::sum_addr(&target)
        + csum::sum_addr(&destination)
        + pseudo_tail(PROTO_ICMPV6, NA_LEN)
        + word(NDP_ADVERTISEMENT, 0)
        + word(flags, 0)
        + csum::sum_addr(&target)
        + word(NDP_OPTION_TARGET_LINK_LAYER, 1)
        + word(mac[0], mac[1])
        + word(mac[2], mac[3])
        + word(mac[4], mac[5]);
    let check = (!csum::fold(sum)).to_ne_bytes();

    // No tailroom to grow into (a solicitation without options): passed, counted.
    resize(ctx, l3 + IPV6_LEN + NA_LEN).map_err(|()| Counter::AnnounceNoRoom)?;
    // Everything below is re-derived from the new packet bounds.
    let out: *mut [u8; 14 + IPV6_LEN + NA_LEN] =
        ptr_at(ctx, 0).ok_or(Counter::AnnounceMalformed)?;
    let length = (NA_LEN as u16).to_be_bytes();
    // SAFETY: bounds checked by ptr_at; untagged, so the IPv6 header starts at 14.
    unsafe {
        let out = out.cast::<u8>();
        out.cast::<[u8; 6]>().write_unaligned(destination_mac);
        out.add(6).cast::<[u8; 6]>().write_unaligned(mac);
        let ip = out.add(14);
        ip.cast::<[u8; 8]>().write_unaligned([
            0x60,
            0,
            0,
            0,
            length[0],
            length[1],
            PROTO_ICMPV6,
            NDP_HOP_LIMIT,
        ]);
        ip.add(8).cast::<Addr>().write_unaligned(target);
        ip.add(24).cast::<Addr>().write_unaligned(destination);
        let icmp = ip.add(IPV6_LEN);
        icmp.cast::<[u8; 8]>().write_unaligned([
            NDP_ADVERTISEMENT,
            0,
            check[0],
            check[1],
            flags,
            0,
            0,
            0,
        ]);
        icmp.add(8).cast::<Addr>().write_unaligned(target);
        icmp.add(24)
            .cast::<[u8; 2]>()
            .write_unaligned([NDP_OPTION_TARGET_LINK_LAYER, 1]);
        icmp.add(26).cast::<[u8; 6]>().write_unaligned(mac);
    }
    Ok(Counter::NdpAnswered)
}
