//! Rejection inside the kernel, as the Gateway API asks for invalid backendRefs: a TCP RST, or an
//! ICMP/ICMPv6 port unreachable for UDP, sent back out of the ingress interface with XDP_TX.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use fulgur_common::{Addr, Counter, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, addr_bytes, csum};

use crate::{
    parse::{Frame, Ip, L4Packet, ptr_at},
    stats::count,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const DEFAULT_TTL: u8 = 64;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const ICMP_LEN: usize = 8;
/// Most of the offending packet an ICMPv6 error quotes (its headers and 8 bytes of UDP fit).
const ICMPV6_MAX_QUOTE: usize = 128;
/// Words summed at most when checksumming an ICMP message in the packet.
const ICMP_MAX_WORDS: usize = (ICMP_LEN + ICMPV6_MAX_QUOTE) / 2;

#[inline(always)]
pub fn reject(ctx: &XdpContext, frame: &Frame, pkt: &L4Packet) -> u32 {
    let verdict = if pkt.proto == PROTO_TCP {
        tcp_reset(ctx, frame, pkt)
    } else {
        port_unreachable(ctx, frame, pkt)
    };
    match verdict {
        Ok(counter) => {
            count(counter);
            xdp_action::XDP_TX
        }
        Err(()) => {
            count(Counter::RejectDropped);
            xdp_action::XDP_DROP
        }
    }
}

/// Sums a byte array as 16-bit words read natively.
#[inline(always)]
fn sum_bytes<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// The pseudo-header's protocol and length words.
#[inline(always)]
pub(crate) fn pseudo_tail(proto: u8, len: usize) -> u32 {
    (proto as u16).to_be() as u32 + (len as u16).to_be() as u32
}

#[inline(always)]
fn swap_macs(frame: &Frame) {
    // SAFETY: the Ethernet header was bounds checked by the parser.
    unsafe {
        let eth = frame.eth;
        core::mem::swap(&mut (*eth).dst_addr, &mut (*eth).src_addr);
    }
}

#[inline(always)]
fn ipv4_header(proto: u8, tos: u8, total_len: usize, src: &Addr, dst: &Addr) -> [u8; IPV4_LEN] {
    let len = (total_len as u16).to_be_bytes();
    let (s, d) = (src[0].to_ne_bytes(), dst[0].to_ne_bytes());
    let mut h = [
        0x45,
        tos,
        len[0],
        len[1],
        0,
        0,
        0,
        0,
        DEFAULT_TTL,
        proto,
        0,
        0,
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
    ];
    let check = (!csum::fold(sum_bytes(&h))).to_ne_bytes();
    h[10] = check[0];
    h[11] = check[1];
    h
}

#[inline(always)]
fn ipv6_header(next: u8, payload_len: usize, src: &Addr, dst: &Addr) -> [u8; IPV6_LEN] {
    let len = (payload_len as u16).to_be_bytes();
    let (s, d) = (addr_bytes(src), addr_bytes(dst));
    let mut h = [0u8; IPV6_LEN];
    h[0] = 0x60;
    h[4] = len[0];
    h[5] = len[1];
    h[6] = next;
    h[7] = DEFAULT_TTL;
    h[8..24].copy_from_slice(&s);
    h[24..40].copy_from_slice(&d);
    h
}

/// Grows or trims the frame to `len` bytes.
#[inline(always)]
pub fn resize(ctx: &XdpContext, len: usize) -> Result<(), ()> {
    // black_box keeps LLVM from folding this into `len - data_end + data`: the verifier allows
    // `data_end - data`, but no arithmetic on data_end itself.
    let current = core::hint::black_box(ctx.data_end() - ctx.data());
    // SAFETY: the helper validates the new length itself.
    match unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - current as i32) } {
        0 => Ok(()),
        _ => Err(()),
    }
}

/// Answers a TCP segment with a RST, as a closed port would (RFC 9293 3.10.7.1).
#[inline(always)]
fn tcp_reset(ctx: &XdpContext, frame: &Frame, pkt: &L4Packet) -> Result<Counter, ()> {
    let tcp: *const [u8; TCP_LEN] = ptr_at(ctx, pkt.l4).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let tcp = unsafe { tcp.read_unaligned() };
    let flags = tcp[13];
    if flags & TCP_RST != 0 {
        return Err(()); // Never answer a RST.
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let data_offset = ((tcp[12] >> 4) as usize) * 4;
    let payload = pkt.l4_len.saturating_sub(data_offset) as u32;
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_ACK != 0 {
        ([tcp[8], tcp[9], tcp[10], tcp[11]], [0; 4], TCP_RST)
    } else {
        let consumed = payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (
            [0; 4],
            seq.wrapping_add(consumed).to_be_bytes(),
            TCP_RST | TCP_ACK,
        )
    };
    let (client, service) = pkt.addrs();
    let mut reset = [
        tcp[2], tcp[3], tcp[0], tcp[1], rst_seq[0], rst_seq[1], rst_seq[2], rst_seq[3], rst_ack[0],
        rst_ack[1], rst_ack[2], rst_ack[3], 0x50, rst_flags, 0, 0, 0, 0, 0, 0,
    ];
    let pseudo =
        csum::sum_addr(&service) + csum::sum_addr(&client) + pseudo_tail(PROTO_TCP, TCP_LEN);
    let check = (!csum::fold(pseudo + sum_bytes(&reset))).to_ne_bytes();
    reset[16] = check[0];
    reset[17] = check[1];

    swap_macs(frame);
    let l3 = pkt.l3;
    // SAFETY: the original packet holds at least an IP header and a 20-byte TCP header, so the
    // reply (no options, no extension headers) fits in it; ptr_at checks it anyway.
    unsafe {
        match pkt.ip {
            Ip::V4(_) => {
                let out: *mut [u8; IPV4_LEN + TCP_LEN] = ptr_at(ctx, l3).ok_or(())?;
                let ip = ipv4_header(PROTO_TCP, 0, IPV4_LEN + TCP_LEN, &service, &client);
                out.cast::<[u8; IPV4_LEN]>().write_unaligned(ip);
                out.cast::<u8>()
                    .add(IPV4_LEN)
                    .cast::<[u8; TCP_LEN]>()
                    .write_unaligned(reset);
                resize(ctx, l3 + IPV4_LEN + TCP_LEN)?;
            }
            Ip::V6(_) => {
                let out: *mut [u8; IPV6_LEN + TCP_LEN] = ptr_at(ctx, l3).ok_or(())?;
                let ip = ipv6_header(PROTO_TCP, TCP_LEN, &service, &client);
                out.cast::<[u8; IPV6_LEN]>().write_unaligned(ip);
                out.cast::<u8>()
                    .add(IPV6_LEN)
                    .cast::<[u8; TCP_LEN]>()
                    .write_unaligned(reset);
                resize(ctx, l3 + IPV6_LEN + TCP_LEN)?;
            }
        }
    }
    Ok(Counter::RejectTcpReset)
}

/// Answers a UDP datagram with ICMP (type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable,
/// quoting the offending packet's headers. New headers are prepended, so the quote is the
/// original packet left where it is.
#[inline(always)]
fn port_unreachable(ctx: &XdpContext, frame: &Frame, pkt: &L4Packet) -> Result<Counter, ()> {
    let (client, service) = pkt.addrs();
    let l3 = pkt.l3;
    let v4 = matches!(pkt.ip, Ip::V4(_));
    let (ip_len, quote) = if v4 {
        (IPV4_LEN, pkt.l4 - l3 + 8)
    } else {
        let quote = pkt.l4 - l3 + 8;
        (
            IPV6_LEN,
            if quote > ICMPV6_MAX_QUOTE {
                ICMPV6_MAX_QUOTE
            } else {
                quote
            },
        )
    };
    let grow = ip_len + ICMP_LEN;
    // SAFETY: read before the buffer moves; the Ethernet header was bounds checked.
    let (client_mac, our_mac) = unsafe { ((*frame.eth).src_addr, (*frame.eth).dst_addr) };
    // SAFETY: the helper validates the adjustment itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Err(());
    }
    resize(ctx, grow + l3 + quote)?;
    // Everything below is re-derived from the new packet bounds.
    // SAFETY: every pointer comes from ptr_at, which checks the new bounds.
    unsafe {
        // The link header: MACs swapped, then the original ethertype (or VLAN tag and inner
        // ethertype) copied forward from the original frame, which now starts at `grow`.
        let tail: *const [u8; 6] = ptr_at(ctx, grow + 12).ok_or(())?;
        let tail = tail.read_unaligned();
        let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(())?;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&client_mac);
        macs[6..].copy_from_slice(&our_mac);
        eth.write_unaligned(macs);
        if l3 == 14 {
            let ether_type: *mut [u8; 2] = ptr_at(ctx, 12).ok_or(())?;
            ether_type.write_unaligned([tail[0], tail[1]]);
        } else {
            let tag: *mut [u8; 6] = ptr_at(ctx, 12).ok_or(())?;
            tag.write_unaligned(tail);
        }

        let message_len = ICMP_LEN + quote;
        let (icmp_type, icmp_code, pseudo) = if v4 {
            let ip: *mut [u8; IPV4_LEN] = ptr_at(ctx, l3).ok_or(())?;
            ip.write_unaligned(ipv4_header(
                PROTO_ICMP,
                0xc0,
                IPV4_LEN + message_len,
                &service,
                &client,
            ));
            (3u8, 3u8, 0u32)
        } else {
            let ip: *mut [u8; IPV6_LEN] = ptr_at(ctx, l3).ok_or(())?;
            ip.write_unaligned(ipv6_header(PROTO_ICMPV6, message_len, &service, &client));
            let pseudo = csum::sum_addr(&service)
                + csum::sum_addr(&client)
                + pseudo_tail(PROTO_ICMPV6, message_len);
            (1u8, 4u8, pseudo)
        };
        let icmp: *mut [u8; ICMP_LEN] = ptr_at(ctx, l3 + ip_len).ok_or(())?;
        icmp.write_unaligned([icmp_type, icmp_code, 0, 0, 0, 0, 0, 0]);

        let mut sum = pseudo;
        let start = l3 + ip_len;
        for i in 0..ICMP_MAX_WORDS {
            if i * 2 >= message_len {
                break;
            }
            let word: *const u16 = ptr_at(ctx, start + i * 2).ok_or(())?;
            sum += word.read_unaligned() as u32;
        }
        let check: *mut u16 = ptr_at(ctx, start + 2).ok_or(())?;
        check.write_unaligned(!csum::fold(sum));
    }
    Ok(Counter::RejectIcmpUnreachable)
}
