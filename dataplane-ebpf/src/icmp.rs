//! XDP ingress: an ICMP error about a reply we sent from a service address (fragmentation
//! needed, packet too big, unreachable, ...) goes on to the flow's backend, translated in both
//! its outer and its quoted headers, so path MTU discovery works through the load balancer.

use aya_ebpf::programs::XdpContext;
use fulgur_common::{
    BACKEND_LIVE, Counter, FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, addr_bytes, addr_eq, addr_v4, addr_v6,
    consts::IPV4_FRAGMENT_BITS,
    icmp::{self, Checksums, Rewrite, layout},
};

use crate::{
    forward::{self, Route},
    maps::{BACKENDS, CONNTRACK},
    parse::{ETH_P_IPV4, Frame, Ip, ptr_at},
    stats::count,
};

/// Bytes of the quoted TCP header needed to reach its checksum.
const TCP_CHECK_END: usize = 18;
const UDP_CHECK_END: usize = 8;

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Counter> {
    let p: *const T = ptr_at(ctx, offset).ok_or(Counter::PassNotTcpUdp)?;
    // SAFETY: bounds checked by ptr_at.
    Ok(unsafe { p.read_unaligned() })
}

#[inline(always)]
fn write<T>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Counter> {
    let p: *mut T = ptr_at(ctx, offset).ok_or(Counter::PassNotTcpUdp)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { p.write_unaligned(value) };
    Ok(())
}

/// Handles an ICMP/ICMPv6 packet. Anything that is not an error about a tracked flow passes
/// (counted as "not TCP/UDP").
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, frame: &Frame) -> Result<u32, Counter> {
    let l3 = frame.l3;
    let v6 = frame.ether_type != ETH_P_IPV4;
    let (icmp_at, inner_ip, inner_l4) = if v6 {
        (layout::V6_ICMP, layout::V6_INNER_IP, layout::V6_INNER_L4)
    } else {
        (layout::V4_ICMP, layout::V4_INNER_IP, layout::V4_INNER_L4)
    };
    // The outer header: no options or extension headers, not a fragment, carrying ICMP.
    let (outer_dst, inner_proto, quoted_src, quoted_dst, family, ip_len) = if v6 {
        let next: u8 = read(ctx, l3 + 6)?;
        let payload_len = u16::from_be_bytes(read(ctx, l3 + 4)?) as usize;
        let icmp_type: u8 = read(ctx, l3 + icmp_at)?;
        let inner_next: u8 = read(ctx, l3 + inner_ip + 6)?;
        if next != PROTO_ICMPV6 || !icmp::is_icmpv6_error(icmp_type) {
            return Err(Counter::PassNotTcpUdp);
        }
        (
            addr_v6(read(ctx, l3 + 24)?),
            inner_next,
            addr_v6(read(ctx, l3 + inner_ip + 8)?),
            addr_v6(read(ctx, l3 + inner_ip + 24)?),
            FAMILY_IPV6,
            40 + payload_len,
        )
    } else {
        let outer: [u8; 20] = read(ctx, l3)?;
        let inner: [u8; 20] = read(ctx, l3 + inner_ip)?;
        let icmp_type: u8 = read(ctx, l3 + icmp_at)?;
        let frags = u16::from_be_bytes([outer[6], outer[7]]);
        if outer[0] != 0x45
            || outer[9] != PROTO_ICMP
            || frags & IPV4_FRAGMENT_BITS != 0
            || !icmp::is_icmpv4_error(icmp_type)
            || inner[0] != 0x45
        {
            return Err(Counter::PassNotTcpUdp);
        }
        (
            addr_v4([outer[16], outer[17], outer[18], outer[19]]),
            inner[9],
            addr_v4([inner[12], inner[13], inner[14], inner[15]]),
            addr_v4([inner[16], inner[17], inner[18], inner[19]]),
            FAMILY_IPV4,
            u16::from_be_bytes([outer[2], outer[3]]) as usize,
        )
    };
    // The datagram must quote at least the ports, and the frame must hold the datagram.
    // black_box: LLVM would otherwise use this to drop the bounds checks below, which the
    // verifier needs to see.
    if ip_len < inner_l4 + 8 || core::hint::black_box(ctx.data() + l3 + ip_len) > ctx.data_end() {
        return Err(Counter::PassMalformed);
    }
    // The quote is a reply we sent: from the service address (where this error arrives) to a
    // client.
    if !(inner_proto == PROTO_TCP || inner_proto == PROTO_UDP) || !addr_eq(&quoted_src, &outer_dst)
    {
        return Err(Counter::PassNotTcpUdp);
    }
    let quoted_ports: [u16; 2] = read(ctx, l3 + inner_l4)?;
    let flow = FlowKey {
        src: quoted_dst,
        dst: quoted_src,
        src_port: quoted_ports[1],
        dst_port: quoted_ports[0],
        proto: inner_proto,
        family,
        pad: [0; 2],
    };
    // SAFETY: LRU values are read once into locals.
    let ct = unsafe { CONNTRACK.get(flow) }.ok_or(Counter::PassNotService)?;
    let (backend_id, backend_addr, backend_port) =
        (ct.backend_id, ct.backend_addr, ct.backend_port);
    let backend = BACKENDS.get(backend_id).ok_or(Counter::PassNotService)?;
    if backend.flags & BACKEND_LIVE == 0
        || backend.port != backend_port
        || !addr_eq(&backend.addr, &backend_addr)
    {
        return Err(Counter::PassNotService);
    }

    let check_end = if inner_proto == PROTO_TCP {
        TCP_CHECK_END
    } else {
        UDP_CHECK_END
    };
    let inner_l4_check_at = l3 + inner_l4 + check_end - 2;
    let quoted_l4_check: Option<u16> = if inner_l4 + check_end <= ip_len {
        Some(read(ctx, inner_l4_check_at)?)
    } else {
        None // The quote stops before the checksum.
    };
    let old = Checksums {
        outer_ip: if v6 { 0 } else { read(ctx, l3 + 10)? },
        icmp: read(ctx, l3 + icmp_at + 2)?,
        inner_ip: if v6 {
            0
        } else {
            read(ctx, l3 + inner_ip + 10)?
        },
        inner_l4: quoted_l4_check,
    };
    let rewrite = Rewrite {
        v6,
        inner_addr: (quoted_src, backend_addr),
        inner_port: (quoted_ports[0], backend_port),
        udp: inner_proto == PROTO_UDP,
        outer_addr: Some((outer_dst, backend_addr)),
    };
    let new = icmp::rewritten(&rewrite, &old);
    if v6 {
        write(ctx, l3 + 24, addr_bytes(&backend_addr))?;
        write(ctx, l3 + inner_ip + 8, addr_bytes(&backend_addr))?;
    } else {
        write(ctx, l3 + 16, backend_addr[0])?;
        write(ctx, l3 + 10, new.outer_ip)?;
        write(ctx, l3 + inner_ip + 12, backend_addr[0])?;
        write(ctx, l3 + inner_ip + 10, new.inner_ip)?;
    }
    write(ctx, l3 + inner_l4, backend_port)?;
    write(ctx, l3 + icmp_at + 2, new.icmp)?;
    if let Some(check) = new.inner_l4 {
        write(ctx, inner_l4_check_at, check)?;
    }
    count(Counter::IcmpToBackend);
    let ip = if v6 {
        Ip::V6(ptr_at(ctx, l3).ok_or(Counter::PassNotTcpUdp)?)
    } else {
        Ip::V4(ptr_at(ctx, l3).ok_or(Counter::PassNotTcpUdp)?)
    };
    let proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    Ok(forward::forward(
        ctx,
        frame,
        &Route {
            ip,
            proto,
            ports: (0, 0),
        },
        backend_id,
    ))
}
