//! ICMP errors about tracked flows (fragmentation needed, packet too big, unreachable, ...), both
//! ways, through one quote reader ([`Quote::read`]) and one writer ([`Quote::rewrite`]) over
//! XDP and TC, so path MTU discovery and port unreachable work through the load balancer:
//! - XDP ingress ([`to_backend`]): an error about a reply we sent from a service address goes on
//!   to the flow's backend, its outer destination and its quote's source made the backend's;
//! - TC egress ([`to_client`]): an error a backend (or a router behind it) sends about a client's
//!   packet has its quote made to read client → service, and a source that is the backend itself
//!   becomes the service address, so the client's stack matches it to its socket;
//! - XDP ingress ([`to_snat_client`]): an error about an SNATed packet (quoting node:port →
//!   backend, sent to the node) goes back to the flow's client, quoting client → service, its
//!   source made the service address as in [`to_client`].

use aya_ebpf::programs::{TcContext, XdpContext};
use fulgur_common::{
    Addr, BACKEND_LIVE, Counter, FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, addr_bytes, addr_eq, addr_v4, addr_v6,
    icmp::{self, Checksums, Rewrite, layout},
};

use crate::{
    forward::{self, Route},
    ingress,
    maps::{BACKENDS, CONNTRACK, REVNAT, SNAT_REPLIES},
    parse::{self, ETH_P_IPV4, Frame, Ip, Packet, Store, ptr_at, read_at},
    snat,
    stats::count,
};

/// Bytes of the quoted TCP header needed to reach its checksum.
const TCP_CHECK_END: usize = 18;
const UDP_CHECK_END: usize = 8;

/// An end of the quoted packet: index 0 of [`Quote::addrs`] and [`Quote::ports`], or 1.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source = 0,
    Destination = 1,
}

/// An ICMP error about a TCP or UDP packet, both headers without IPv4 options or IPv6
/// extension headers (what routers and hosts send), quoting at least the ports.
struct Quote {
    l3: usize,
    v6: bool,
    /// The quoted packet's protocol, TCP or UDP.
    proto: u8,
    /// The error datagram's length, as its outer header says.
    len: usize,
    /// The quoted packet's (source, destination) addresses and ports (ports as in the packet).
    addrs: [Addr; 2],
    ports: [u16; 2],
}

impl Quote {
    /// Reads the error at `l3`, which the parser found valid, held by the packet and neither
    /// TCP nor UDP. Errors in ingress's words: not an error about TCP/UDP, or malformed.
    #[inline(always)]
    fn read(ctx: &impl Packet, l3: usize, v6: bool) -> Result<Quote, Counter> {
        let not_ours = Counter::PassNotTcpUdp;
        let malformed = Counter::PassMalformed;
        let (icmp_at, inner_ip, inner_l4) = offsets(v6);
        let outer_proto: u8 = read_at(ctx, l3 + if v6 { 6 } else { 9 }).ok_or(not_ours)?;
        let icmp_type: u8 = read_at(ctx, l3 + icmp_at).ok_or(not_ours)?;
        let is_error = if v6 {
            outer_proto == PROTO_ICMPV6 && icmp::is_icmpv6_error(icmp_type)
        } else {
            outer_proto == PROTO_ICMP && icmp::is_icmpv4_error(icmp_type)
        };
        // IPv4 without options (IPv6 without extension headers: ICMPv6 follows directly).
        let plain = v6 || read_at::<u8>(ctx, l3).ok_or(not_ours)? == 0x45;
        if !is_error || !plain {
            return Err(not_ours);
        }
        // The quoted addresses and protocol.
        let (addrs, proto, len) = if v6 {
            let payload_len: [u8; 2] = read_at(ctx, l3 + 4).ok_or(malformed)?;
            (
                [
                    addr_v6(read_at(ctx, l3 + inner_ip + 8).ok_or(malformed)?),
                    addr_v6(read_at(ctx, l3 + inner_ip + 24).ok_or(malformed)?),
                ],
                read_at::<u8>(ctx, l3 + inner_ip + 6).ok_or(malformed)?,
                40 + u16::from_be_bytes(payload_len) as usize,
            )
        } else {
            let total_len: [u8; 2] = read_at(ctx, l3 + 2).ok_or(malformed)?;
            let inner: [u8; 20] = read_at(ctx, l3 + inner_ip).ok_or(malformed)?;
            if inner[0] != 0x45 {
                return Err(not_ours);
            }
            (
                [
                    addr_v4([inner[12], inner[13], inner[14], inner[15]]),
                    addr_v4([inner[16], inner[17], inner[18], inner[19]]),
                ],
                inner[9],
                u16::from_be_bytes(total_len) as usize,
            )
        };
        if !(proto == PROTO_TCP || proto == PROTO_UDP) {
            return Err(not_ours);
        }
        // The datagram must quote at least the ports.
        if len < inner_l4 + 8 {
            return Err(malformed);
        }
        Ok(Quote {
            l3,
            v6,
            proto,
            len,
            addrs,
            ports: read_at(ctx, l3 + inner_l4).ok_or(malformed)?,
        })
    }

    /// Whether the outer header holds the quoted address at `end` at the other end: the error
    /// goes to the quote's source, or comes from the quote's destination.
    #[inline(always)]
    fn outer_holds(&self, ctx: &impl Packet, end: End) -> Result<bool, Counter> {
        let (src_at, dst_at) = addr_offsets(self.v6);
        let at = self.l3 + if end == End::Source { dst_at } else { src_at };
        let outer = if self.v6 {
            addr_v6(read_at(ctx, at).ok_or(Counter::PassMalformed)?)
        } else {
            addr_v4(read_at(ctx, at).ok_or(Counter::PassMalformed)?)
        };
        Ok(addr_eq(&outer, &self.addrs[end as usize]))
    }

    /// The flow the quoted packet answers (its addresses and ports swapped), as the flow maps
    /// key it: the client's flow for a quoted reply, the backend's reply for a quoted request.
    #[inline(always)]
    fn answered_flow(&self) -> FlowKey {
        FlowKey {
            src: self.addrs[1],
            dst: self.addrs[0],
            src_port: self.ports[1],
            dst_port: self.ports[0],
            proto: self.proto,
            family: if self.v6 { FAMILY_IPV6 } else { FAMILY_IPV4 },
            pad: [0; 2],
        }
    }

    /// Rewrites the quote's `end` to `addr` and `port`, and, if `outer` (see
    /// [`Quote::outer_holds`]), the outer address that held the same address, with every
    /// checksum the error carries.
    #[inline(always)]
    fn rewrite(
        &self,
        ctx: &impl Store,
        end: End,
        (addr, port): (&Addr, u16),
        outer: bool,
    ) -> Result<(), Counter> {
        let (l3, v6) = (self.l3, self.v6);
        let (icmp_at, inner_ip, inner_l4) = offsets(v6);
        let malformed = Counter::PassMalformed;
        let check_end = if self.proto == PROTO_TCP {
            TCP_CHECK_END
        } else {
            UDP_CHECK_END
        };
        let l4_check_at = l3 + inner_l4 + check_end - 2;
        let old = Checksums {
            outer_ip: if v6 {
                0
            } else {
                read_at(ctx, l3 + 10).ok_or(malformed)?
            },
            icmp: read_at(ctx, l3 + icmp_at + 2).ok_or(malformed)?,
            inner_ip: if v6 {
                0
            } else {
                read_at(ctx, l3 + inner_ip + 10).ok_or(malformed)?
            },
            inner_l4: if inner_l4 + check_end <= self.len {
                Some(read_at(ctx, l4_check_at).ok_or(malformed)?)
            } else {
                None // The quote stops before the checksum.
            },
        };
        let new = icmp::rewritten(
            &Rewrite {
                v6,
                addr: (&self.addrs[end as usize], addr),
                port: (self.ports[end as usize], port),
                udp: self.proto == PROTO_UDP,
                outer,
            },
            &old,
        );
        let (src_at, dst_at) = addr_offsets(v6);
        let (quoted_at, outer_at) = match end {
            End::Source => (l3 + inner_ip + src_at, l3 + dst_at),
            End::Destination => (l3 + inner_ip + dst_at, l3 + src_at),
        };
        if v6 {
            ctx.store_at(quoted_at, addr_bytes(addr))?;
            if outer {
                ctx.store_at(outer_at, addr_bytes(addr))?;
            }
        } else {
            ctx.store_at(quoted_at, addr[0])?;
            ctx.store_at(l3 + inner_ip + 10, new.inner_ip)?;
            if outer {
                ctx.store_at(outer_at, addr[0])?;
                ctx.store_at(l3 + 10, new.outer_ip)?;
            }
        }
        ctx.store_at(l3 + inner_l4 + 2 * end as usize, port)?;
        if let Some(check) = new.inner_l4 {
            ctx.store_at(l4_check_at, check)?;
        }
        ctx.store_at(l3 + icmp_at + 2, new.icmp)
    }
}

/// (source, destination) address offsets in an IPv4 or IPv6 header.
#[inline(always)]
fn addr_offsets(v6: bool) -> (usize, usize) {
    if v6 { (8, 24) } else { (12, 16) }
}

/// (ICMP header, quoted IP header, quoted TCP/UDP header) offsets from the outer IP header.
#[inline(always)]
fn offsets(v6: bool) -> (usize, usize, usize) {
    if v6 {
        (layout::V6_ICMP, layout::V6_INNER_IP, layout::V6_INNER_L4)
    } else {
        (layout::V4_ICMP, layout::V4_INNER_IP, layout::V4_INNER_L4)
    }
}

/// An error that arrives where the packet it quotes came from (a service address, or the
/// node's SNAT address), about a packet we sent.
#[inline(always)]
fn read_answer(ctx: &XdpContext, frame: &Frame) -> Result<Quote, Counter> {
    let quote = Quote::read(ctx, frame.l3, frame.ether_type != ETH_P_IPV4)?;
    if !quote.outer_holds(ctx, End::Source)? {
        return Err(Counter::PassNotTcpUdp);
    }
    Ok(quote)
}

/// What the FIB lookup needs of the error itself.
#[inline(always)]
fn route(ctx: &XdpContext, quote: &Quote) -> Result<Route, Counter> {
    let malformed = Counter::PassMalformed;
    Ok(if quote.v6 {
        Route {
            ip: Ip::V6(ptr_at(ctx, quote.l3).ok_or(malformed)?),
            proto: PROTO_ICMPV6,
            ports: (0, 0),
        }
    } else {
        Route {
            ip: Ip::V4(ptr_at(ctx, quote.l3).ok_or(malformed)?),
            proto: PROTO_ICMP,
            ports: (0, 0),
        }
    })
}

/// XDP ingress: an error about a reply of a tracked flow (quoting service → client, sent to the
/// service address) goes on to the flow's backend, quoting backend → client; one about a
/// packet from an SNAT port goes on as [`ingress::SNAT_ICMP`]. Anything else passes, counted as
/// "not TCP/UDP" (or malformed, not a service flow).
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, frame: &Frame) -> Result<u64, Counter> {
    let quote = read_answer(ctx, frame)?;
    let flow = quote.answered_flow();
    // SAFETY: LRU values are read once into locals.
    let Some(ct) = (unsafe { CONNTRACK.get(flow) }) else {
        return if snat::may_be_reply(&flow) {
            Ok(ingress::SNAT_ICMP)
        } else {
            Err(Counter::PassNotService)
        };
    };
    let (backend_id, backend_addr, backend_port) =
        (ct.backend_id, ct.backend_addr, ct.backend_port);
    let backend = BACKENDS.get(backend_id).ok_or(Counter::PassNotService)?;
    if backend.flags & BACKEND_LIVE == 0
        || backend.port != backend_port
        || !addr_eq(&backend.addr, &backend_addr)
    {
        return Err(Counter::PassNotService);
    }
    quote.rewrite(ctx, End::Source, (&backend_addr, backend_port), true)?;
    let route = route(ctx, &quote)?;
    count(Counter::IcmpToBackend);
    Ok(forward::forward(ctx, frame, &route, backend_id).into())
}

/// XDP ingress: an error about a packet an SNATed flow sent (quoting node:port → backend, sent
/// to the node) goes back to the flow's client, quoting client → service, the way its replies
/// leave ([`snat::to_client`]). A router between keeps its own source address.
#[inline(always)]
pub fn to_snat_client(ctx: &XdpContext) -> Result<u32, Counter> {
    let frame = parse::ethernet(ctx)?;
    let quote = read_answer(ctx, &frame)?;
    // An unknown port passes as an error about no service flow, as before SNAT.
    let entry = SNAT_REPLIES
        .get_ptr_mut(quote.answered_flow())
        .ok_or(Counter::PassNotService)?;
    // SAFETY: a map value pointer, valid for this run.
    let (client, client_port, vip, vip_port) = unsafe {
        (
            (*entry).client,
            (*entry).client_port,
            (*entry).vip,
            (*entry).vip_port,
        )
    };
    let from_backend = quote.outer_holds(ctx, End::Destination)?;
    quote.rewrite(ctx, End::Source, (&client, client_port), true)?;
    quote.rewrite(ctx, End::Destination, (&vip, vip_port), from_backend)?;
    let route = route(ctx, &quote)?;
    count(Counter::SnatIcmpToClient);
    Ok(snat::to_client(ctx, &frame, &route, entry))
}

/// TC egress: an error about a tracked flow's request (quoting client → backend) is made to
/// quote client → service; `Ok(IcmpToClient)`, or why it leaves untouched, in ingress's words
/// (`PassNotService`: no such flow) or `EgressRewriteFailed`.
#[inline(always)]
pub fn to_client(ctx: &TcContext, l3: usize, v6: bool) -> Result<Counter, Counter> {
    let quote = Quote::read(ctx, l3, v6)?;
    // SAFETY: read once into locals; LRU values are replaced whole.
    let restore = unsafe { REVNAT.get(quote.answered_flow()) }.ok_or(Counter::PassNotService)?;
    let (vip, vip_port) = (restore.vip, restore.vip_port);
    // A router behind the backend keeps its own source address.
    let from_backend = quote.outer_holds(ctx, End::Destination)?;
    quote.rewrite(ctx, End::Destination, (&vip, vip_port), from_backend)?;
    Ok(Counter::IcmpToClient)
}
