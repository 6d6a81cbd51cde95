//! The packet corpus: each case is an input frame, the verdict and exact output the XDP ingress
//! program must produce, and the counter it must move. Expected outputs are built from scratch
//! by etherparse, never by transforming the input with our own code.
//!
//! The packet tests, the fuzz test (as seeds) and the benchmark all use these cases.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Type, Icmpv6Type, IpHeaders, IpNumber,
    Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, VlanId, icmpv4::DestUnreachableHeader,
    icmpv6::DestUnreachableCode,
};
use fulgur_common::Counter;

use crate::{
    lab::{
        BACKEND_MAC, BACKEND_NO_NEIGHBOUR, BACKEND_WITH_NEIGHBOUR, BACKEND6_NO_NEIGHBOUR,
        BACKEND6_WITH_NEIGHBOUR, CLIENT, CLIENT6, IN_MAC, OUT_MAC, VIP, VIP6,
    },
    packets::{CLIENT_MAC, Kind, Pkt},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Services the corpus expects (apply with `Lab::apply_yaml`).
pub const SERVICES: &str = r#"
services:
- {vip: 192.0.2.10, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080}]}
- {vip: 192.0.2.10, port: 53, protocol: UDP, backends: [{address: 203.0.113.2, port: 5353}]}
- {vip: 192.0.2.11, port: 80, protocol: TCP, backends: [{address: 203.0.113.3, port: 8080}]}
- {vip: 192.0.2.11, port: 53, protocol: UDP, backends: [{address: 203.0.113.3, port: 5353}]}
- {vip: 192.0.2.12, port: 80, protocol: TCP, backends: []}
- {vip: 192.0.2.12, port: 53, protocol: UDP, backends: [{address: 203.0.113.2, port: 5353, weight: 0}]}
- {vip: "2001:db8:ffff::10", port: 80, protocol: TCP, backends: [{address: "2001:db8:2::2", port: 8080}]}
- {vip: "2001:db8:ffff::10", port: 53, protocol: UDP, backends: [{address: "2001:db8:2::2", port: 5353}]}
- {vip: "2001:db8:ffff::11", port: 80, protocol: TCP, backends: [{address: "2001:db8:2::3", port: 8080}]}
- {vip: "2001:db8:ffff::11", port: 53, protocol: UDP, backends: [{address: "2001:db8:2::3", port: 5353}]}
- {vip: "2001:db8:ffff::12", port: 80, protocol: TCP, backends: []}
- {vip: "2001:db8:ffff::12", port: 53, protocol: UDP, backends: []}
announce: [192.0.2.10, "2001:db8:ffff::10"]
"#;

pub enum Expect {
    Unchanged,
    Exactly(Vec<u8>),
}

pub struct Case {
    pub name: String,
    pub input: Vec<u8>,
    pub verdict: u32,
    pub output: Expect,
    /// The counter this packet must move by exactly one.
    pub counter: Counter,
}

impl Case {
    pub fn expected_output(&self) -> &[u8] {
        match &self.output {
            Expect::Unchanged => &self.input,
            Expect::Exactly(bytes) => bytes,
        }
    }
}

/// One address family's cast.
#[derive(Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub client: IpAddr,
    pub vip: IpAddr,
    /// A service whose backend has no neighbour entry.
    pub vip_no_neighbour: IpAddr,
    /// A service that has no usable backend.
    pub vip_rejecting: IpAddr,
    pub backend: IpAddr,
    pub backend_no_neighbour: IpAddr,
    pub not_a_service: IpAddr,
}

pub const V4: Family = Family {
    name: "IPv4",
    client: IpAddr::V4(CLIENT),
    vip: IpAddr::V4(VIP),
    vip_no_neighbour: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11)),
    vip_rejecting: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 12)),
    backend: IpAddr::V4(BACKEND_WITH_NEIGHBOUR),
    backend_no_neighbour: IpAddr::V4(BACKEND_NO_NEIGHBOUR),
    not_a_service: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)),
};

pub const V6: Family = Family {
    name: "IPv6",
    client: IpAddr::V6(CLIENT6),
    vip: IpAddr::V6(VIP6),
    vip_no_neighbour: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x11)),
    vip_rejecting: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x12)),
    backend: IpAddr::V6(BACKEND6_WITH_NEIGHBOUR),
    backend_no_neighbour: IpAddr::V6(BACKEND6_NO_NEIGHBOUR),
    not_a_service: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x99)),
};

fn service_port(kind: Kind) -> (u16, u16) {
    // (service port, backend port)
    if kind == Kind::Udp {
        (53, 5353)
    } else {
        (80, 8080)
    }
}

/// A client packet of `kind` to `vip`, from a client port unique to the case.
pub fn to_service(f: &Family, kind: Kind, vip: IpAddr, client_port: u16) -> Pkt {
    Pkt::new(kind, (f.client, client_port), (vip, service_port(kind).0))
}

/// What the redirect path makes of `input`: DNAT, TTL - 1, MACs from the FIB.
pub fn redirected(input: &Pkt, backend: IpAddr) -> Pkt {
    Pkt {
        dst: backend,
        dst_port: service_port(input.kind).1,
        ttl: input.ttl - 1,
        eth_src: OUT_MAC,
        eth_dst: BACKEND_MAC,
        ..input.clone()
    }
}

/// What the kernel-fallback path makes of `input`: DNAT only.
pub fn dnat_only(input: &Pkt, backend: IpAddr) -> Pkt {
    Pkt {
        dst: backend,
        dst_port: service_port(input.kind).1,
        ..input.clone()
    }
}

fn reply_ip(input: &Pkt, protocol: IpNumber, tos: u8) -> IpHeaders {
    match (input.dst, input.src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let mut h = Ipv4Header::new(0, 64, protocol, from.octets(), to.octets()).unwrap();
            h.identification = 0;
            h.dont_fragment = false;
            h.dscp = (tos >> 2).try_into().unwrap();
            IpHeaders::Ipv4(h, Default::default())
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => IpHeaders::Ipv6(
            Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: 0,
                next_header: protocol,
                hop_limit: 64,
                source: from.octets(),
                destination: to.octets(),
            },
            Default::default(),
        ),
        _ => unreachable!(),
    }
}

/// The RST a closed port sends for `input` (RFC 9293): from the service, MACs swapped.
pub fn expected_reset(input: &Pkt) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(input.eth_dst, input.eth_src);
    let ip = reply_ip(input, IpNumber::TCP, 0);
    let mut out = Vec::new();
    macro_rules! finish {
        ($step:expr) => {
            match input.kind {
                // The segment carried an ACK: the reset takes its sequence number from it.
                Kind::TcpData => $step
                    .tcp(input.dst_port, input.src_port, 777, 0)
                    .rst()
                    .write(&mut out, &[]),
                // A SYN: acknowledge it (and any data) so the client accepts the reset.
                _ => $step
                    .tcp(input.dst_port, input.src_port, 0, 0)
                    .rst()
                    .ack(1000 + input.payload.len() as u32 + 1)
                    .write(&mut out, &[]),
            }
        };
    }
    match input.vlan {
        Some(id) => finish!(eth.single_vlan(VlanId::try_new(id).unwrap()).ip(ip)),
        None => finish!(eth.ip(ip)),
    }
    .unwrap();
    out
}

/// ICMP (type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable for `raw` (built from
/// `input`), quoting its IP headers and the first 8 bytes of UDP.
pub fn expected_unreachable(input: &Pkt, raw: &[u8]) -> Vec<u8> {
    let quote = &raw[input.l3_offset()..input.l4_offset() + 8];
    let eth = PacketBuilder::ethernet2(input.eth_dst, input.eth_src);
    let mut out = Vec::new();
    macro_rules! finish {
        ($step:expr) => {
            match input.src {
                IpAddr::V4(_) => $step
                    .ip(reply_ip(input, IpNumber::ICMP, 0xc0))
                    .icmpv4(Icmpv4Type::DestinationUnreachable(
                        DestUnreachableHeader::Port,
                    ))
                    .write(&mut out, quote),
                IpAddr::V6(_) => $step
                    .ip(reply_ip(input, IpNumber::IPV6_ICMP, 0))
                    .icmpv6(Icmpv6Type::DestinationUnreachable(
                        DestUnreachableCode::Port,
                    ))
                    .write(&mut out, quote),
            }
        };
    }
    match input.vlan {
        Some(id) => finish!(eth.single_vlan(VlanId::try_new(id).unwrap())),
        None => finish!(eth),
    }
    .unwrap();
    out
}

/// Every ingress case, for both address families.
pub fn ingress_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut next_port = 40000u16;
    let mut port = || {
        next_port += 1;
        next_port
    };
    for f in [V4, V6] {
        translated_cases(&f, &mut cases, &mut port);
        reject_cases(&f, &mut cases, &mut port);
        pass_cases(&f, &mut cases, &mut port);
        malformed_cases(&f, &mut cases, &mut port);
    }
    arp_cases(&mut cases);
    ndp_cases(&mut cases);
    cases
}

/// An ARP message (untagged unless `vlan`).
pub fn arp_frame(
    operation: ArpOperation,
    sender: ([u8; 6], Ipv4Addr),
    target: ([u8; 6], Ipv4Addr),
    eth: ([u8; 6], [u8; 6]),
    vlan: Option<u16>,
) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        operation,
        &sender.0,
        &sender.1.octets(),
        &target.0,
        &target.1.octets(),
    )
    .unwrap();
    let builder = PacketBuilder::ethernet2(eth.0, eth.1);
    let mut out = Vec::new();
    match vlan {
        Some(id) => builder
            .single_vlan(VlanId::try_new(id).unwrap())
            .arp(arp)
            .write(&mut out),
        None => builder.arp(arp).write(&mut out),
    }
    .unwrap();
    out
}

/// The announced IPv4 address (the lab's service address, as a Gateway's would be).
pub const ANNOUNCED: Ipv4Addr = VIP;
pub const ANNOUNCED6: Ipv6Addr = VIP6;
const NOT_ANNOUNCED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const NOT_ANNOUNCED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x99);

/// The ARP request a client on the lab's network sends for `target`.
pub fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        ArpOperation::REQUEST,
        (CLIENT_MAC, CLIENT),
        ([0; 6], target),
        (CLIENT_MAC, [0xff; 6]),
        None,
    )
}

/// The reply the announcing node sends to [`arp_request`] (RFC 826), from `in0`'s MAC.
pub fn arp_reply(target: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        ArpOperation::REPLY,
        (IN_MAC, target),
        (CLIENT_MAC, CLIENT),
        (IN_MAC, CLIENT_MAC),
        None,
    )
}

fn arp_cases(cases: &mut Vec<Case>) {
    let named = |name: &str, input, verdict, output, counter| Case {
        name: format!("ARP {name}"),
        input,
        verdict,
        output,
        counter,
    };
    cases.push(named(
        "request for an announced address: reply from the ingress device's MAC",
        arp_request(ANNOUNCED),
        XDP_TX,
        Expect::Exactly(arp_reply(ANNOUNCED)),
        Counter::ArpAnswered,
    ));
    // Off a real wire, a short frame is padded to 60 bytes: the padding stays.
    let mut padded = arp_request(ANNOUNCED);
    padded.resize(60, 0);
    let mut padded_reply = arp_reply(ANNOUNCED);
    padded_reply.resize(60, 0);
    cases.push(named(
        "request padded to 60 bytes: the reply keeps the length",
        padded,
        XDP_TX,
        Expect::Exactly(padded_reply),
        Counter::ArpAnswered,
    ));
    cases.push(named(
        "request for an address not announced: passed, the kernel answers its own",
        arp_request(NOT_ANNOUNCED),
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceNotOurs,
    ));
    cases.push(named(
        "request for the node's own address: passed",
        arp_request(Ipv4Addr::new(198, 51, 100, 1)),
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceNotOurs,
    ));
    cases.push(named(
        "reply about an announced address: not a request, passed",
        arp_frame(
            ArpOperation::REPLY,
            (CLIENT_MAC, ANNOUNCED),
            (IN_MAC, CLIENT),
            (CLIENT_MAC, IN_MAC),
            None,
        ),
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceNotOurs,
    ));
    cases.push(named(
        "802.1Q-tagged request: announced on the untagged network only, passed",
        arp_frame(
            ArpOperation::REQUEST,
            (CLIENT_MAC, CLIENT),
            ([0; 6], ANNOUNCED),
            (CLIENT_MAC, [0xff; 6]),
            Some(42),
        ),
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceNotOurs,
    ));
    let full = arp_request(ANNOUNCED);
    cases.push(named(
        "request cut short: passed",
        full[..14 + 20].to_vec(),
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceMalformed,
    ));
    let mut odd_hardware = full.clone();
    odd_hardware[14 + 4] = 8; // hardware address length
    cases.push(named(
        "request with an 8-byte hardware address length: passed",
        odd_hardware,
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceMalformed,
    ));
}

/// A neighbour solicitation for `target` from `source` (`::` for duplicate address detection,
/// then sent to the target's solicited-node group without a source link-layer option).
pub fn solicitation(source: Ipv6Addr, target: Ipv6Addr, hop_limit: u8, extra: &[u8]) -> Vec<u8> {
    let unspecified = source.is_unspecified();
    let o = target.octets();
    let group = Ipv6Addr::from([
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ]);
    let mut payload = target.octets().to_vec();
    if !unspecified {
        payload.extend_from_slice(&[1, 1]);
        payload.extend_from_slice(&CLIENT_MAC);
    }
    payload.extend_from_slice(extra);
    let group_mac = [0x33, 0x33, 0xff, o[13], o[14], o[15]];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, group_mac)
        .ipv6(source.octets(), group.octets(), hop_limit)
        .icmpv6(Icmpv6Type::NeighborSolicitation)
        .write(&mut out, &payload)
        .unwrap();
    out
}

/// The advertisement the announcing node answers with (RFC 4861 7.2.4), from `in0`'s MAC:
/// solicited to the client, or (for `::`) unsolicited to all nodes.
pub fn advertisement(to: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let (destination, mac, solicited) = if to.is_unspecified() {
        (
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            [0x33, 0x33, 0, 0, 0, 1],
            false,
        )
    } else {
        (to, CLIENT_MAC, true)
    };
    let mut payload = target.octets().to_vec();
    payload.extend_from_slice(&[2, 1]);
    payload.extend_from_slice(&IN_MAC);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(IN_MAC, mac)
        .ipv6(target.octets(), destination.octets(), 255)
        .icmpv6(Icmpv6Type::NeighborAdvertisement(
            etherparse::icmpv6::NeighborAdvertisementHeader {
                router: false,
                solicited,
                r#override: true,
            },
        ))
        .write(&mut out, &payload)
        .unwrap();
    out
}

fn ndp_cases(cases: &mut Vec<Case>) {
    let named = |name: &str, input, verdict, output, counter| Case {
        name: format!("NDP {name}"),
        input,
        verdict,
        output,
        counter,
    };
    cases.push(named(
        "solicitation for an announced address: solicited advertisement with our MAC",
        solicitation(CLIENT6, ANNOUNCED6, 255, &[]),
        XDP_TX,
        Expect::Exactly(advertisement(CLIENT6, ANNOUNCED6)),
        Counter::NdpAnswered,
    ));
    cases.push(named(
        "duplicate address detection probe (from ::): advertisement to all nodes",
        solicitation(Ipv6Addr::UNSPECIFIED, ANNOUNCED6, 255, &[]),
        XDP_TX,
        Expect::Exactly(advertisement(Ipv6Addr::UNSPECIFIED, ANNOUNCED6)),
        Counter::NdpAnswered,
    ));
    // A nonce option (RFC 3971) after the link-layer option: the answer is shorter.
    cases.push(named(
        "solicitation with more options: the advertisement is trimmed to its size",
        solicitation(CLIENT6, ANNOUNCED6, 255, &[14, 1, 1, 2, 3, 4, 5, 6]),
        XDP_TX,
        Expect::Exactly(advertisement(CLIENT6, ANNOUNCED6)),
        Counter::NdpAnswered,
    ));
    cases.push(named(
        "solicitation for an address not announced: passed",
        solicitation(CLIENT6, NOT_ANNOUNCED6, 255, &[]),
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceNotOurs,
    ));
    cases.push(named(
        "solicitation with hop limit 64 (not from the link): passed",
        solicitation(CLIENT6, ANNOUNCED6, 64, &[]),
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceMalformed,
    ));
    let mut to_multicast = solicitation(CLIENT6, ANNOUNCED6, 255, &[]);
    to_multicast[14 + 40 + 8] = 0xff; // the target becomes a multicast address
    cases.push(named(
        "solicitation for a multicast target: passed",
        to_multicast,
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceMalformed,
    ));
    let full = solicitation(CLIENT6, ANNOUNCED6, 255, &[]);
    let mut short = full[..14 + 40 + 16].to_vec();
    short[14 + 4..14 + 6].copy_from_slice(&16u16.to_be_bytes());
    cases.push(named(
        "solicitation cut short (no target): passed",
        short,
        XDP_PASS,
        Expect::Unchanged,
        Counter::AnnounceMalformed,
    ));
}

fn case(
    f: &Family,
    name: &str,
    input: Vec<u8>,
    verdict: u32,
    output: Expect,
    counter: Counter,
) -> Case {
    Case {
        name: format!("{} {name}", f.name),
        input,
        verdict,
        output,
        counter,
    }
}

fn translated_cases(f: &Family, cases: &mut Vec<Case>, port: &mut impl FnMut() -> u16) {
    for kind in [Kind::TcpSyn, Kind::TcpData, Kind::Udp] {
        let k = format!("{kind:?}");
        let plain = to_service(f, kind, f.vip, port());
        cases.push(case(
            f,
            &format!("{k} to the service: DNAT and redirect"),
            plain.build(),
            XDP_REDIRECT,
            Expect::Exactly(redirected(&plain, f.backend).build()),
            Counter::Redirect,
        ));
        let odd = Pkt {
            payload: b"odd".to_vec(),
            ..to_service(f, kind, f.vip, port())
        };
        cases.push(case(
            f,
            &format!("{k} with an odd-length payload"),
            odd.build(),
            XDP_REDIRECT,
            Expect::Exactly(redirected(&odd, f.backend).build()),
            Counter::Redirect,
        ));
        let empty = Pkt {
            payload: Vec::new(),
            ..to_service(f, kind, f.vip, port())
        };
        cases.push(case(
            f,
            &format!("{k} with no payload"),
            empty.build(),
            XDP_REDIRECT,
            Expect::Exactly(redirected(&empty, f.backend).build()),
            Counter::Redirect,
        ));
        let mut extended = to_service(f, kind, f.vip, port());
        match f.vip {
            IpAddr::V4(_) => extended.options = vec![1, 1, 1, 0, 0x44, 4, 5, 0],
            IpAddr::V6(_) => extended.destination_options = true,
        }
        cases.push(case(
            f,
            &format!("{k} with IPv4 options / IPv6 extension header"),
            extended.build(),
            XDP_REDIRECT,
            Expect::Exactly(redirected(&extended, f.backend).build()),
            Counter::Redirect,
        ));
        let no_neighbour = to_service(f, kind, f.vip_no_neighbour, port());
        cases.push(case(
            f,
            &format!("{k}, neighbour unknown: DNAT, then the kernel forwards"),
            no_neighbour.build(),
            XDP_PASS,
            Expect::Exactly(dnat_only(&no_neighbour, f.backend_no_neighbour).build()),
            Counter::PassToKernel,
        ));
        let tagged = Pkt {
            vlan: Some(42),
            ..to_service(f, kind, f.vip, port())
        };
        cases.push(case(
            f,
            &format!("{k}, 802.1Q-tagged: DNAT, then the VLAN device forwards"),
            tagged.build(),
            XDP_PASS,
            Expect::Exactly(dnat_only(&tagged, f.backend).build()),
            Counter::PassToKernel,
        ));
        let expiring = Pkt {
            ttl: 1,
            ..to_service(f, kind, f.vip, port())
        };
        cases.push(case(
            f,
            &format!("{k}, TTL 1: DNAT, then the kernel answers time-exceeded"),
            expiring.build(),
            XDP_PASS,
            Expect::Exactly(dnat_only(&expiring, f.backend).build()),
            Counter::PassToKernel,
        ));
    }
    let no_checksum = to_service(f, Kind::Udp, f.vip, port());
    cases.push(case(
        f,
        "UDP checksum 0 stays 0",
        no_checksum.build_without_udp_checksum(),
        XDP_REDIRECT,
        Expect::Exactly(redirected(&no_checksum, f.backend).build_without_udp_checksum()),
        Counter::Redirect,
    ));
}

fn reject_cases(f: &Family, cases: &mut Vec<Case>, port: &mut impl FnMut() -> u16) {
    let syn = to_service(f, Kind::TcpSyn, f.vip_rejecting, port());
    cases.push(case(
        f,
        "SYN to a service without backends: RST+ACK",
        syn.build(),
        XDP_TX,
        Expect::Exactly(expected_reset(&syn)),
        Counter::RejectTcpReset,
    ));
    let data = to_service(f, Kind::TcpData, f.vip_rejecting, port());
    cases.push(case(
        f,
        "data segment to a service without backends: RST",
        data.build(),
        XDP_TX,
        Expect::Exactly(expected_reset(&data)),
        Counter::RejectTcpReset,
    ));
    let tagged = Pkt {
        vlan: Some(7),
        ..to_service(f, Kind::TcpSyn, f.vip_rejecting, port())
    };
    cases.push(case(
        f,
        "tagged SYN: the RST keeps the tag",
        tagged.build(),
        XDP_TX,
        Expect::Exactly(expected_reset(&tagged)),
        Counter::RejectTcpReset,
    ));
    let reset = to_service(f, Kind::TcpRst, f.vip_rejecting, port());
    cases.push(case(
        f,
        "a RST is never answered: dropped",
        reset.build(),
        XDP_DROP,
        Expect::Unchanged,
        Counter::RejectDropped,
    ));
    let udp = to_service(f, Kind::Udp, f.vip_rejecting, port());
    let raw = udp.build();
    cases.push(case(
        f,
        "UDP to a service without backends: port unreachable",
        raw.clone(),
        XDP_TX,
        Expect::Exactly(expected_unreachable(&udp, &raw)),
        Counter::RejectIcmpUnreachable,
    ));
    let tagged_udp = Pkt {
        vlan: Some(7),
        ..to_service(f, Kind::Udp, f.vip_rejecting, port())
    };
    let raw = tagged_udp.build();
    cases.push(case(
        f,
        "tagged UDP: the ICMP error keeps the tag",
        raw.clone(),
        XDP_TX,
        Expect::Exactly(expected_unreachable(&tagged_udp, &raw)),
        Counter::RejectIcmpUnreachable,
    ));
    let mut extended = Pkt {
        payload: vec![0x5a; 200],
        ..to_service(f, Kind::Udp, f.vip_rejecting, port())
    };
    match f.vip {
        IpAddr::V4(_) => extended.options = vec![1, 1, 1, 0],
        IpAddr::V6(_) => extended.destination_options = true,
    }
    let raw = extended.build();
    cases.push(case(
        f,
        "UDP with options/extensions: the quote holds every header",
        raw.clone(),
        XDP_TX,
        Expect::Exactly(expected_unreachable(&extended, &raw)),
        Counter::RejectIcmpUnreachable,
    ));
}

fn pass_cases(f: &Family, cases: &mut Vec<Case>, port: &mut impl FnMut() -> u16) {
    let other_address = Pkt::new(Kind::TcpSyn, (f.client, port()), (f.not_a_service, 80));
    cases.push(case(
        f,
        "TCP to another address",
        other_address.build(),
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassNotService,
    ));
    let other_port = Pkt::new(Kind::TcpSyn, (f.client, port()), (f.vip, 81));
    cases.push(case(
        f,
        "TCP to the service address, other port",
        other_port.build(),
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassNotService,
    ));
    let wrong_protocol = Pkt::new(Kind::Udp, (f.client, port()), (f.vip, 80));
    cases.push(case(
        f,
        "UDP to a TCP-only port",
        wrong_protocol.build(),
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassNotService,
    ));
    cases.push(case(
        f,
        "ICMP echo to the service address",
        echo((CLIENT_MAC, IN_MAC), f.client, f.vip),
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassNotTcpUdp,
    ));
    // ICMP errors about replies from the service: none is tracked in the corpus.
    let reply = quoted(Kind::TcpData, (f.vip, 80), (f.client, port()));
    let router = match f.vip {
        IpAddr::V4(_) => "198.51.100.254".parse().unwrap(),
        IpAddr::V6(_) => "2001:db8:1::fe".parse().unwrap(),
    };
    let error = |quote: &[u8]| icmp_error((CLIENT_MAC, IN_MAC), router, f.vip, 64, true, quote);
    cases.push(case(
        f,
        "ICMP error about a reply of an untracked flow",
        error(&reply),
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassNotService,
    ));
    let cut = if matches!(f.vip, IpAddr::V4(_)) {
        24
    } else {
        44
    };
    cases.push(case(
        f,
        "ICMP error whose quote stops before the ports",
        error(&reply[..cut]),
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassMalformed,
    ));
    // (name, IPv4 flags/offset word, IPv6 fragment offset/flags word)
    let fragments = [
        ("first fragment", 0x2000u16, 0x0001u16),
        ("non-first fragment", 0x0010, 0x0080),
    ];
    for (name, v4_bits, v6_bits) in fragments {
        let mut fragment = to_service(f, Kind::TcpData, f.vip, port()).build();
        match f.vip {
            IpAddr::V4(_) => {
                fragment[14 + 6..14 + 8].copy_from_slice(&v4_bits.to_be_bytes());
                let header = etherparse::Ipv4HeaderSlice::from_slice(&fragment[14..34])
                    .unwrap()
                    .to_header();
                fragment[24..26].copy_from_slice(&header.calc_header_checksum().to_be_bytes());
            }
            IpAddr::V6(_) => {
                // A fragment header between the IPv6 header and TCP.
                fragment[14 + 6] = 44;
                let payload_len = u16::from_be_bytes([fragment[18], fragment[19]]) + 8;
                fragment[18..20].copy_from_slice(&payload_len.to_be_bytes());
                let [hi, lo] = v6_bits.to_be_bytes();
                fragment.splice(54..54, [6, 0, hi, lo, 0, 0, 0, 1]);
            }
        }
        cases.push(case(
            f,
            name,
            fragment,
            XDP_PASS,
            Expect::Unchanged,
            Counter::PassFragment,
        ));
    }
    if matches!(f.vip, IpAddr::V6(_)) {
        // An authentication header: rewriting would break its integrity check.
        let authenticated = with_extension_header(
            to_service(f, Kind::TcpData, f.vip, port()).build(),
            51,
            &[6, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        );
        cases.push(case(
            f,
            "IPv6 authentication header",
            authenticated,
            XDP_PASS,
            Expect::Unchanged,
            Counter::PassUnsupported,
        ));
        // A routing header with segments left: the destination is not the final one.
        let routed = with_extension_header(
            to_service(f, Kind::TcpData, f.vip, port()).build(),
            43,
            &[6, 0, 4, 1, 0, 0, 0, 0],
        );
        cases.push(case(
            f,
            "IPv6 routing header with segments left",
            routed,
            XDP_PASS,
            Expect::Unchanged,
            Counter::PassUnsupported,
        ));
    }
}

fn malformed_cases(f: &Family, cases: &mut Vec<Case>, port: &mut impl FnMut() -> u16) {
    let tcp = to_service(f, Kind::TcpData, f.vip, port());
    let full_tcp = tcp.build();
    let full_udp = to_service(f, Kind::Udp, f.vip, port()).build();
    let l4 = tcp.l4_offset();
    let truncated = [
        ("ethernet header and nothing else", full_tcp[..14].to_vec()),
        ("IP header cut short", full_tcp[..14 + 12].to_vec()),
        ("TCP header cut short", full_tcp[..l4 + 10].to_vec()),
        ("UDP header cut short", full_udp[..l4 + 4].to_vec()),
    ];
    for (name, input) in truncated {
        cases.push(case(
            f,
            name,
            input,
            XDP_PASS,
            Expect::Unchanged,
            Counter::PassMalformed,
        ));
    }
    let mut long_length = full_tcp.clone();
    let length_at = if matches!(f.vip, IpAddr::V4(_)) {
        14 + 2
    } else {
        14 + 4
    };
    long_length[length_at..length_at + 2].copy_from_slice(&1400u16.to_be_bytes());
    cases.push(case(
        f,
        "length beyond the frame",
        long_length,
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassMalformed,
    ));
    let mut short_length = full_tcp.clone();
    let short = if matches!(f.vip, IpAddr::V4(_)) {
        24u16
    } else {
        4
    };
    short_length[length_at..length_at + 2].copy_from_slice(&short.to_be_bytes());
    cases.push(case(
        f,
        "length shorter than the headers",
        short_length,
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassMalformed,
    ));
    let mut wrong_version = full_tcp.clone();
    wrong_version[14] = if matches!(f.vip, IpAddr::V4(_)) {
        0x65
    } else {
        0x45
    };
    cases.push(case(
        f,
        "wrong IP version for the ethertype",
        wrong_version,
        XDP_PASS,
        Expect::Unchanged,
        Counter::PassMalformed,
    ));
    if matches!(f.vip, IpAddr::V4(_)) {
        let mut short_ihl = full_tcp;
        short_ihl[14] = 0x44;
        cases.push(case(
            f,
            "IHL below 5",
            short_ihl,
            XDP_PASS,
            Expect::Unchanged,
            Counter::PassMalformed,
        ));
    }
}

/// An IPv4/IPv6 TCP or UDP packet with no payload, built (and checksummed) by etherparse: what
/// an ICMP error quotes.
pub fn quoted(kind: Kind, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Vec<u8> {
    let packet = Pkt {
        payload: Vec::new(),
        ..Pkt::new(kind, src, dst)
    }
    .build();
    packet[14..].to_vec()
}

/// An ICMP error from `from` to `to` quoting `quote`: fragmentation needed (IPv4) or packet too
/// big (IPv6) when `mtu` is set, else port unreachable.
pub fn icmp_error(
    eth: ([u8; 6], [u8; 6]),
    from: IpAddr,
    to: IpAddr,
    ttl: u8,
    mtu: bool,
    quote: &[u8],
) -> Vec<u8> {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4, icmpv6};
    let builder = etherparse::PacketBuilder::ethernet2(eth.0, eth.1);
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(f), IpAddr::V4(t)) => {
            let kind = if mtu {
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }
            } else {
                icmpv4::DestUnreachableHeader::Port
            };
            builder
                .ipv4(f.octets(), t.octets(), ttl)
                .icmpv4(Icmpv4Type::DestinationUnreachable(kind))
                .write(&mut out, quote)
        }
        (IpAddr::V6(f), IpAddr::V6(t)) => {
            let kind = if mtu {
                Icmpv6Type::PacketTooBig { mtu: 1280 }
            } else {
                Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
            };
            builder
                .ipv6(f.octets(), t.octets(), ttl)
                .icmpv6(kind)
                .write(&mut out, quote)
        }
        _ => unreachable!(),
    }
    .unwrap();
    out
}

/// Checks, with etherparse, every checksum an ICMP error frame (untagged) carries: the outer
/// IPv4 header, ICMP (ICMPv6 with its pseudo-header), the quoted IPv4 header and, when the quote
/// holds the whole packet, its TCP or UDP checksum. The error names the first wrong one.
pub fn icmp_error_checksums(frame: &[u8]) -> Result<(), String> {
    use etherparse::{
        Icmpv4Slice, Icmpv6Slice, IpNumber, IpSlice, Ipv4HeaderSlice, Ipv6HeaderSlice, TcpSlice,
        UdpSlice,
    };
    let wrong = |what: &str| Err(format!("{what} checksum wrong"));
    let quote = match IpSlice::from_slice(&frame[14..]).map_err(|e| e.to_string())? {
        IpSlice::Ipv4(ip) => {
            let header = ip.header();
            if header.to_header().calc_header_checksum() != header.header_checksum() {
                return wrong("outer IPv4 header");
            }
            let icmp = Icmpv4Slice::from_slice(ip.payload().payload).map_err(|e| e.to_string())?;
            if icmp.icmp_type().calc_checksum(icmp.payload()) != icmp.checksum() {
                return wrong("ICMP");
            }
            icmp.payload()
        }
        IpSlice::Ipv6(ip) => {
            let header = ip.header();
            let icmp = Icmpv6Slice::from_slice(ip.payload().payload).map_err(|e| e.to_string())?;
            if !icmp.is_checksum_valid(header.source(), header.destination()) {
                return wrong("ICMPv6");
            }
            icmp.payload()
        }
    };
    // (protocol, pseudo-header addresses, transport bytes) of the quote, if it is whole.
    let (proto, addrs, l4) = if quote[0] >> 4 == 4 {
        let header = Ipv4HeaderSlice::from_slice(quote).map_err(|e| e.to_string())?;
        if header.to_header().calc_header_checksum() != header.header_checksum() {
            return wrong("quoted IPv4 header");
        }
        if quote.len() < header.total_len() as usize {
            return Ok(());
        }
        let (src, dst) = (header.source().to_vec(), header.destination().to_vec());
        (
            header.protocol(),
            (src, dst),
            &quote[header.slice().len()..],
        )
    } else {
        let header = Ipv6HeaderSlice::from_slice(quote).map_err(|e| e.to_string())?;
        if quote.len() < 40 + header.payload_length() as usize {
            return Ok(());
        }
        let (src, dst) = (header.source().to_vec(), header.destination().to_vec());
        (header.next_header(), (src, dst), &quote[40..])
    };
    let v4 = |a: &[u8]| <[u8; 4]>::try_from(a).unwrap();
    let v6 = |a: &[u8]| <[u8; 16]>::try_from(a).unwrap();
    let (src, dst) = (&addrs.0[..], &addrs.1[..]);
    let (expected, found) = match proto {
        IpNumber::TCP => {
            let tcp = TcpSlice::from_slice(l4).map_err(|e| e.to_string())?;
            let expected = if src.len() == 4 {
                tcp.calc_checksum_ipv4(v4(src), v4(dst))
            } else {
                tcp.calc_checksum_ipv6(v6(src), v6(dst))
            };
            (expected.map_err(|e| e.to_string())?, tcp.checksum())
        }
        IpNumber::UDP => {
            let udp = UdpSlice::from_slice(l4).map_err(|e| e.to_string())?;
            if src.len() == 4 && udp.checksum() == 0 {
                return Ok(()); // A UDP datagram without checksum.
            }
            let header = udp.to_header();
            let expected = if src.len() == 4 {
                header.calc_checksum_ipv4_raw(v4(src), v4(dst), udp.payload())
            } else {
                header.calc_checksum_ipv6_raw(v6(src), v6(dst), udp.payload())
            };
            (expected.map_err(|e| e.to_string())?, udp.checksum())
        }
        other => return Err(format!("quoted protocol {other:?}")),
    };
    if expected != found {
        return wrong("quoted TCP/UDP");
    }
    Ok(())
}

/// An untagged IPv6 TCP or UDP frame with one extension header (`next`: its type; `header`
/// starts with the next-header byte) between the IPv6 header and the transport header.
fn with_extension_header(mut frame: Vec<u8>, next: u8, header: &[u8]) -> Vec<u8> {
    frame[14 + 6] = next;
    let payload_len = u16::from_be_bytes([frame[18], frame[19]]) + header.len() as u16;
    frame[18..20].copy_from_slice(&payload_len.to_be_bytes());
    frame.splice(54..54, header.iter().copied());
    frame
}

/// An ICMP or ICMPv6 echo request ("ping") from `from` to `to`.
fn echo(eth: ([u8; 6], [u8; 6]), from: IpAddr, to: IpAddr) -> Vec<u8> {
    let mut echo = Vec::new();
    let builder = PacketBuilder::ethernet2(eth.0, eth.1);
    match (from, to) {
        (IpAddr::V4(f), IpAddr::V4(t)) => builder
            .ipv4(f.octets(), t.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"ping"),
        (IpAddr::V6(f), IpAddr::V6(t)) => builder
            .ipv6(f.octets(), t.octets(), 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut echo, b"ping"),
        _ => unreachable!(),
    }
    .unwrap();
    echo
}

/// TC's verdict for every egress case: the packet always leaves.
pub const TC_ACT_OK: u32 = 0;

/// The client port of the flow the egress cases reply to; the caller tracks it first (a
/// `Kind::TcpSyn` from [`to_service`] through XDP).
pub const EGRESS_TRACKED_PORT: u16 = 44000;

/// A backend's TCP reply to the client's `port`, as it leaves towards the client.
pub fn backend_reply(f: &Family, backend_port: u16, client_port: u16) -> Pkt {
    Pkt {
        eth_src: OUT_MAC,
        eth_dst: CLIENT_MAC,
        ..Pkt::new(
            Kind::TcpData,
            (f.backend, backend_port),
            (f.client, client_port),
        )
    }
}

/// One case per TC egress outcome of this family: the translated reply and ICMP errors, and a
/// packet for every reason a packet leaves untouched (each with its exact bytes: unchanged), but
/// `EgressRewriteFailed`: BPF_PROG_TEST_RUN's skb is linear and writable, so the store and
/// checksum helpers never fail there.
pub fn egress_cases(f: &Family) -> Vec<Case> {
    let egress = |name: &str, input: Vec<u8>, output, counter| Case {
        name: format!("{} egress: {name}", f.name),
        input,
        verdict: TC_ACT_OK,
        output,
        counter,
    };
    let untouched =
        |name: &str, input: Vec<u8>, counter| egress(name, input, Expect::Unchanged, counter);
    let reply = backend_reply(f, 8080, EGRESS_TRACKED_PORT);
    let full = reply.build();
    let v4 = matches!(f.vip, IpAddr::V4(_));
    let mut cases = vec![
        egress(
            "reply of a tracked flow: from the service address",
            full.clone(),
            Expect::Exactly(
                Pkt {
                    src: f.vip,
                    src_port: 80,
                    ..reply.clone()
                }
                .build(),
            ),
            Counter::ReplyTranslated,
        ),
        untouched(
            "reply of an untracked flow",
            backend_reply(f, 8080, 44999).build(),
            Counter::EgressNotReply,
        ),
        untouched(
            "tracked reply with its TCP header cut short",
            full[..reply.l4_offset() + 10].to_vec(),
            Counter::EgressMalformed,
        ),
    ];
    let mut wrong_version = full.clone();
    wrong_version[14] = if v4 { 0x65 } else { 0x45 };
    cases.push(untouched(
        "tracked reply with the wrong IP version",
        wrong_version,
        Counter::EgressMalformed,
    ));
    let mut fragment = full.clone();
    if v4 {
        fragment[14 + 6..14 + 8].copy_from_slice(&0x2000u16.to_be_bytes());
        let header = etherparse::Ipv4HeaderSlice::from_slice(&fragment[14..34])
            .unwrap()
            .to_header();
        fragment[24..26].copy_from_slice(&header.calc_header_checksum().to_be_bytes());
    } else {
        fragment = with_extension_header(fragment, 44, &[6, 0, 0, 1, 0, 0, 0, 1]);
    }
    cases.push(untouched(
        "tracked reply, first fragment",
        fragment,
        Counter::EgressFragment,
    ));
    if !v4 {
        // (name, next header, extension header bytes)
        let extensions: [(&str, u8, &[u8]); 2] = [
            (
                "tracked reply with an authentication header",
                51,
                &[6, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0],
            ),
            (
                "tracked reply with a routing header, segments left",
                43,
                &[6, 0, 4, 1, 0, 0, 0, 0],
            ),
        ];
        for (name, next, header) in extensions {
            let extended = with_extension_header(full.clone(), next, header);
            cases.push(untouched(name, extended, Counter::EgressUnsupported));
        }
    }
    cases.push(untouched(
        "ICMP echo from the backend",
        echo((OUT_MAC, CLIENT_MAC), f.backend, f.client),
        Counter::EgressNotTcpUdp,
    ));
    cases.push(untouched(
        "ICMP error from the backend about an untracked flow",
        icmp_error(
            (OUT_MAC, CLIENT_MAC),
            f.backend,
            f.client,
            64,
            false,
            &quoted(Kind::Udp, (f.client, 44998), (f.backend, 5353)),
        ),
        Counter::EgressNotReply,
    ));
    // The quote stops before the ports (the lengths say so).
    let quote_cut = icmp_error(
        (OUT_MAC, CLIENT_MAC),
        f.backend,
        f.client,
        64,
        false,
        &quoted(Kind::Udp, (f.client, 44998), (f.backend, 5353))[..if v4 { 24 } else { 44 }],
    );
    cases.push(untouched(
        "ICMP error whose quote stops before the ports",
        quote_cut,
        Counter::EgressMalformed,
    ));
    // ICMP errors about the tracked flow (client → backend quoted) read client → service.
    let request =
        |to: IpAddr, port| quoted(Kind::TcpData, (f.client, EGRESS_TRACKED_PORT), (to, port));
    let behind_backend: IpAddr = if v4 {
        "203.0.113.99".parse().unwrap()
    } else {
        "2001:db8:2::99".parse().unwrap()
    };
    let error =
        |from, quote: &[u8]| icmp_error((OUT_MAC, CLIENT_MAC), from, f.client, 64, false, quote);
    cases.push(egress(
        "ICMP error from the backend about the tracked flow: from and about the service",
        error(f.backend, &request(f.backend, 8080)),
        Expect::Exactly(error(f.vip, &request(f.vip, 80))),
        Counter::IcmpToClient,
    ));
    cases.push(egress(
        "ICMP error from a router behind the backend: the quote translated, its source kept",
        error(behind_backend, &request(f.backend, 8080)),
        Expect::Exactly(error(behind_backend, &request(f.vip, 80))),
        Counter::IcmpToClient,
    ));
    // Routers may quote only 8 bytes of TCP (RFC 792): no TCP checksum to update.
    let eight = if v4 { 20 + 8 } else { 40 + 8 };
    cases.push(egress(
        "ICMP error quoting 8 bytes of TCP: translated",
        error(f.backend, &request(f.backend, 8080)[..eight]),
        Expect::Exactly(error(f.vip, &request(f.vip, 80)[..eight])),
        Counter::IcmpToClient,
    ));
    let quoted_echo = echo((CLIENT_MAC, OUT_MAC), f.client, f.backend)[14..].to_vec();
    cases.push(untouched(
        "ICMP error about an ICMP echo",
        error(f.backend, &quoted_echo),
        Counter::EgressNotTcpUdp,
    ));
    if v4 {
        let with_options = Pkt {
            options: vec![1, 1, 1, 0],
            payload: Vec::new(),
            ..Pkt::new(
                Kind::TcpData,
                (f.client, EGRESS_TRACKED_PORT),
                (f.backend, 8080),
            )
        }
        .build();
        cases.push(untouched(
            "ICMP error whose quoted IPv4 header has options",
            error(f.backend, &with_options[14..]),
            Counter::EgressNotTcpUdp,
        ));
    }
    if v4 {
        let mut arp = OUT_MAC.to_vec();
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&OUT_MAC);
        arp.extend_from_slice(&[203, 0, 113, 1]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[198, 51, 100, 1]);
        cases.push(untouched("an ARP request", arp, Counter::EgressNotIp));
    }
    cases
}

/// Services whose backends run on other nodes (`remote: true`): their flows are SNATed to
/// [`SNAT_NODE`] / [`SNAT_NODE6`]. 192.0.2.21's backend has no neighbour entry.
pub const SNAT_SERVICES: &str = r#"
services:
- {vip: 192.0.2.10, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080}]}
- {vip: 192.0.2.20, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080, remote: true}]}
- {vip: 192.0.2.20, port: 53, protocol: UDP, backends: [{address: 203.0.113.2, port: 5353, remote: true}]}
- {vip: 192.0.2.21, port: 80, protocol: TCP, backends: [{address: 203.0.113.3, port: 8080, remote: true}]}
- {vip: "2001:db8:ffff::10", port: 80, protocol: TCP, backends: [{address: "2001:db8:2::2", port: 8080}]}
- {vip: "2001:db8:ffff::20", port: 80, protocol: TCP, backends: [{address: "2001:db8:2::2", port: 8080, remote: true}]}
- {vip: "2001:db8:ffff::20", port: 53, protocol: UDP, backends: [{address: "2001:db8:2::2", port: 5353, remote: true}]}
- {vip: "2001:db8:ffff::21", port: 80, protocol: TCP, backends: [{address: "2001:db8:2::3", port: 8080, remote: true}]}
"#;

/// The lab node's SNAT addresses: `out0`'s, on the backends' network.
pub const SNAT_NODE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const SNAT_NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);

/// One family's SNAT cast.
#[derive(Clone, Copy)]
pub struct SnatFamily {
    pub family: Family,
    /// The service whose backend is remote (and has a neighbour entry).
    pub vip: IpAddr,
    /// The service whose remote backend has no neighbour entry.
    pub vip_no_neighbour: IpAddr,
    pub node: IpAddr,
}

pub const SNAT_V4: SnatFamily = SnatFamily {
    family: V4,
    vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20)),
    vip_no_neighbour: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 21)),
    node: IpAddr::V4(SNAT_NODE),
};

pub const SNAT_V6: SnatFamily = SnatFamily {
    family: V6,
    vip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x20)),
    vip_no_neighbour: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x21)),
    node: IpAddr::V6(SNAT_NODE6),
};

/// What SNAT makes of `input` towards `backend`: from the node's address and `node_port`, to
/// the backend, TTL − 1, MACs from the FIB.
pub fn snat_forwarded(input: &Pkt, node: IpAddr, node_port: u16, backend: IpAddr) -> Pkt {
    Pkt {
        src: node,
        src_port: node_port,
        ..redirected(input, backend)
    }
}

/// The backend's reply of `kind` to an SNATed flow, as it arrives on `out0`.
pub fn snat_reply(kind: Kind, backend: IpAddr, node: IpAddr, node_port: u16) -> Pkt {
    Pkt {
        eth_src: BACKEND_MAC,
        eth_dst: OUT_MAC,
        ..Pkt::new(kind, (backend, service_port(kind).1), (node, node_port))
    }
}

/// That reply translated back: from the service to the client, out of `in0`.
pub fn snat_reply_translated(reply: &Pkt, vip: IpAddr, client: IpAddr, client_port: u16) -> Pkt {
    Pkt {
        src: vip,
        src_port: if reply.kind == Kind::Udp { 53 } else { 80 },
        dst: client,
        dst_port: client_port,
        ttl: reply.ttl - 1,
        eth_src: IN_MAC,
        eth_dst: CLIENT_MAC,
        ..reply.clone()
    }
}
