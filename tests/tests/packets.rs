//! Packet cases through BPF_PROG_TEST_RUN: exact output bytes, compared with packets that
//! etherparse builds (and checksums) from scratch.

use std::net::Ipv4Addr;

use fulgur_common::Counter;
use fulgur_tests::{
    lab::{
        BACKEND_MAC, BACKEND_NO_NEIGHBOUR, BACKEND_WITH_NEIGHBOUR, CLIENT, IN_MAC, Lab, OUT_MAC,
        VIP,
    },
    packets::{Kind, V4, diff},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: i32 = 0;
/// A second service address whose backend has no neighbour entry.
const VIP_NO_NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

const SERVICES: &str = r#"
services:
- {vip: 192.0.2.10, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080}]}
- {vip: 192.0.2.10, port: 53, protocol: UDP, backends: [{address: 203.0.113.2, port: 5353}]}
- {vip: 192.0.2.11, port: 80, protocol: TCP, backends: [{address: 203.0.113.3, port: 8080}]}
- {vip: 192.0.2.12, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080, weight: 0}]}
"#;

enum Expect {
    Unchanged,
    Exactly(Vec<u8>),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Expect,
}

fn lab() -> Lab {
    let mut lab = Lab::new().expect("lab");
    lab.apply_yaml(SERVICES).expect("services");
    lab
}

fn tcp(kind: Kind, client_port: u16) -> V4 {
    V4::new(kind, (CLIENT, client_port), (VIP, 80))
}

/// What the redirect path makes of `input`: DNAT to `to`, TTL - 1, MACs from the FIB.
fn redirected(input: &V4, to: (Ipv4Addr, u16)) -> V4 {
    V4 {
        dst: to.0,
        dst_port: to.1,
        ttl: input.ttl - 1,
        eth_src: OUT_MAC,
        eth_dst: BACKEND_MAC,
        ..input.clone()
    }
}

/// What the kernel-fallback path makes of `input`: DNAT only.
fn dnat_only(input: &V4, to: (Ipv4Addr, u16)) -> V4 {
    V4 {
        dst: to.0,
        dst_port: to.1,
        ..input.clone()
    }
}

fn run_cases(lab: &Lab, cases: Vec<Case>) {
    assert!(!cases.is_empty(), "no packet cases");
    let mut failures = Vec::new();
    for case in &cases {
        let (verdict, output) = lab.xdp(&case.input).expect("test run");
        let expected = match &case.output {
            Expect::Unchanged => &case.input,
            Expect::Exactly(bytes) => bytes,
        };
        if verdict != case.verdict || &output != expected {
            failures.push(format!(
                "case {:?}: verdict {verdict} (expected {})\n{}",
                case.name,
                case.verdict,
                diff(expected, &output)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn ingress_translates_service_traffic_exactly() {
    let lab = lab();
    let syn = tcp(Kind::TcpSyn, 40000);
    let data = tcp(Kind::TcpData, 40001);
    let udp = V4::new(Kind::Udp, (CLIENT, 40002), (VIP, 53));
    let udp_no_checksum = V4::new(Kind::Udp, (CLIENT, 40003), (VIP, 53));
    let with_options = V4 {
        // Record-route style options: 3 NOPs + EOL, then 4 bytes of a timestamp-ish option.
        options: vec![1, 1, 1, 0, 0x44, 4, 5, 0],
        ..tcp(Kind::TcpData, 40004)
    };
    let odd_payload = V4 {
        payload: b"odd".to_vec(),
        ..tcp(Kind::TcpData, 40005)
    };
    let no_neighbour = V4::new(Kind::TcpSyn, (CLIENT, 40006), (VIP_NO_NEIGHBOUR, 80));
    let tagged = V4 {
        vlan: Some(42),
        ..tcp(Kind::TcpSyn, 40007)
    };
    let expiring = V4 {
        ttl: 1,
        ..tcp(Kind::TcpSyn, 40008)
    };
    let backend = (BACKEND_WITH_NEIGHBOUR, 8080);

    let cases = vec![
        Case {
            name: "TCP SYN to the service is DNATed and redirected",
            input: syn.build(),
            verdict: XDP_REDIRECT,
            output: Expect::Exactly(redirected(&syn, backend).build()),
        },
        Case {
            name: "TCP data segment to the service",
            input: data.build(),
            verdict: XDP_REDIRECT,
            output: Expect::Exactly(redirected(&data, backend).build()),
        },
        Case {
            name: "UDP with a checksum",
            input: udp.build(),
            verdict: XDP_REDIRECT,
            output: Expect::Exactly(redirected(&udp, (BACKEND_WITH_NEIGHBOUR, 5353)).build()),
        },
        Case {
            name: "UDP checksum 0 stays 0",
            input: udp_no_checksum.build_without_udp_checksum(),
            verdict: XDP_REDIRECT,
            output: Expect::Exactly(
                redirected(&udp_no_checksum, (BACKEND_WITH_NEIGHBOUR, 5353))
                    .build_without_udp_checksum(),
            ),
        },
        Case {
            name: "IPv4 with options",
            input: with_options.build(),
            verdict: XDP_REDIRECT,
            output: Expect::Exactly(redirected(&with_options, backend).build()),
        },
        Case {
            name: "odd-length payload",
            input: odd_payload.build(),
            verdict: XDP_REDIRECT,
            output: Expect::Exactly(redirected(&odd_payload, backend).build()),
        },
        Case {
            name: "unknown neighbour: DNAT, then the kernel forwards",
            input: no_neighbour.build(),
            verdict: XDP_PASS,
            output: Expect::Exactly(dnat_only(&no_neighbour, (BACKEND_NO_NEIGHBOUR, 8080)).build()),
        },
        Case {
            name: "802.1Q-tagged: DNAT, then the kernel's VLAN device forwards",
            input: tagged.build(),
            verdict: XDP_PASS,
            output: Expect::Exactly(dnat_only(&tagged, backend).build()),
        },
        Case {
            name: "TTL 1: DNAT, then the kernel answers time-exceeded",
            input: expiring.build(),
            verdict: XDP_PASS,
            output: Expect::Exactly(dnat_only(&expiring, backend).build()),
        },
    ];
    run_cases(&lab, cases);
    assert_eq!(lab.counter(Counter::Redirect).unwrap(), 6);
    assert_eq!(lab.counter(Counter::PassToKernel).unwrap(), 3);
    assert_eq!(lab.counter(Counter::NewFlow).unwrap(), 9);
}

#[test]
fn everything_else_passes_untouched() {
    let lab = lab();
    let ipv4_tcp = |src: Ipv4Addr, dst: Ipv4Addr, port| {
        V4::new(Kind::TcpSyn, (src, 40000), (dst, port)).build()
    };
    let mut non_first_fragment = tcp(Kind::TcpData, 40010).build();
    non_first_fragment[14 + 6] = 0x00; // flags 0,
    non_first_fragment[14 + 7] = 0x10; // offset 16 (×8 bytes)
    fix_ip_checksum(&mut non_first_fragment, 14);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xc2, 0x08, 0x06]);
    arp.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 0xc2, 198, 51, 100, 2, 0, 0, 0, 0, 0, 0, 192, 0, 2,
        10,
    ]);
    let mut ipv6 = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xc2], IN_MAC)
        .ipv6(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
            ],
            64,
        )
        .tcp(40000, 80, 1, 1000)
        .syn()
        .write(&mut ipv6, b"v6")
        .unwrap();
    let icmp = {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xc2], IN_MAC)
            .ipv4(CLIENT.octets(), VIP.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut out, b"ping")
            .unwrap();
        out
    };

    let pass = |name, input| Case {
        name,
        input,
        verdict: XDP_PASS,
        output: Expect::Unchanged,
    };
    let cases = vec![
        pass(
            "TCP to another address",
            ipv4_tcp(CLIENT, Ipv4Addr::new(192, 0, 2, 99), 80),
        ),
        pass(
            "TCP to the service address, other port",
            ipv4_tcp(CLIENT, VIP, 81),
        ),
        pass(
            "UDP to a TCP-only port",
            V4::new(Kind::Udp, (CLIENT, 40000), (VIP, 80)).build(),
        ),
        pass(
            "a service whose only backend has weight 0",
            ipv4_tcp(CLIENT, Ipv4Addr::new(192, 0, 2, 12), 80),
        ),
        pass("non-first IPv4 fragment", non_first_fragment),
        pass("ARP", arp),
        pass("IPv6", ipv6),
        pass("ICMP echo to the service address", icmp),
    ];
    run_cases(&lab, cases);
    assert_eq!(lab.counter(Counter::PassNotService).unwrap(), 3);
    assert_eq!(lab.counter(Counter::PassNoBackend).unwrap(), 1);
    assert_eq!(lab.counter(Counter::PassFragment).unwrap(), 1);
    assert_eq!(lab.counter(Counter::PassNotIp).unwrap(), 2);
    assert_eq!(lab.counter(Counter::PassNotTcpUdp).unwrap(), 1);
}

fn fix_ip_checksum(packet: &mut [u8], l3: usize) {
    let header_len = ((packet[l3] & 0x0f) as usize) * 4;
    packet[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let header = etherparse::Ipv4HeaderSlice::from_slice(&packet[l3..l3 + header_len]).unwrap();
    let sum = header.to_header().calc_header_checksum();
    packet[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn truncated_and_malformed_packets_pass_untouched() {
    let lab = lab();
    let full_tcp = tcp(Kind::TcpData, 40020).build();
    let full_udp = V4::new(Kind::Udp, (CLIENT, 40021), (VIP, 53)).build();
    let tagged = V4 {
        vlan: Some(7),
        ..tcp(Kind::TcpSyn, 40022)
    }
    .build();
    let mut short_ihl = full_tcp.clone();
    short_ihl[14] = 0x44;
    let mut long_total_length = full_tcp.clone();
    long_total_length[14 + 2..14 + 4].copy_from_slice(&1400u16.to_be_bytes());
    let mut tiny_total_length = full_tcp.clone();
    tiny_total_length[14 + 2..14 + 4].copy_from_slice(&24u16.to_be_bytes());
    let mut wrong_version = full_tcp.clone();
    wrong_version[14] = 0x65;

    let malformed = |name, input: Vec<u8>| Case {
        name,
        input,
        verdict: XDP_PASS,
        output: Expect::Unchanged,
    };
    let cases = vec![
        // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header (EINVAL).
        malformed("Ethernet header and nothing else", full_tcp[..14].to_vec()),
        malformed("802.1Q tag cut short", tagged[..16].to_vec()),
        malformed("IPv4 header cut short", full_tcp[..14 + 12].to_vec()),
        malformed("TCP header cut short", full_tcp[..14 + 20 + 10].to_vec()),
        malformed("UDP header cut short", full_udp[..14 + 20 + 4].to_vec()),
        malformed("IHL below 5", short_ihl),
        malformed("total length beyond the frame", long_total_length),
        malformed("total length shorter than the headers", tiny_total_length),
        malformed("IP version 6 in an IPv4 ethertype", wrong_version),
    ];
    let count = cases.len() as u64;
    run_cases(&lab, cases);
    assert_eq!(lab.counter(Counter::PassMalformed).unwrap(), count);
    assert_eq!(
        lab.counter(Counter::NewFlow).unwrap(),
        0,
        "nothing malformed was tracked"
    );
}

#[test]
fn egress_restores_the_service_address_on_replies() {
    let lab = lab();
    // Track two flows first (TCP and UDP with and without checksum).
    for (kind, port, vip_port) in [
        (Kind::TcpSyn, 41000, 80),
        (Kind::Udp, 41001, 53),
        (Kind::Udp, 41002, 53),
    ] {
        let (verdict, _) = lab
            .xdp(&V4::new(kind, (CLIENT, port), (VIP, vip_port)).build())
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
    }
    let reply = |kind, backend_port, client_port| V4 {
        eth_src: OUT_MAC,
        eth_dst: [0x02, 0, 0, 0, 0, 0xc2],
        ..V4::new(
            kind,
            (BACKEND_WITH_NEIGHBOUR, backend_port),
            (CLIENT, client_port),
        )
    };
    let tcp_reply = reply(Kind::TcpData, 8080, 41000);
    let udp_reply = reply(Kind::Udp, 5353, 41001);
    let udp_reply_no_checksum = reply(Kind::Udp, 5353, 41002);
    let untracked = reply(Kind::TcpData, 8080, 41999);
    let from_vip = |v: &V4, port| V4 {
        src: VIP,
        src_port: port,
        ..v.clone()
    };

    let cases = [
        (
            "TCP reply",
            tcp_reply.build(),
            from_vip(&tcp_reply, 80).build(),
        ),
        (
            "UDP reply",
            udp_reply.build(),
            from_vip(&udp_reply, 53).build(),
        ),
        (
            "UDP reply without checksum",
            udp_reply_no_checksum.build_without_udp_checksum(),
            from_vip(&udp_reply_no_checksum, 53).build_without_udp_checksum(),
        ),
        (
            "reply of an untracked flow",
            untracked.build(),
            untracked.build(),
        ),
    ];
    for (name, input, expected) in cases {
        let (verdict, output) = lab.tc(&input).unwrap();
        assert_eq!(verdict, TC_ACT_OK, "{name}");
        assert!(output == expected, "{name}:\n{}", diff(&expected, &output));
    }
    assert_eq!(lab.counter(Counter::ReplyTranslated).unwrap(), 3);
}

#[test]
fn a_flow_keeps_its_backend_and_flows_spread() {
    let mut lab = lab();
    lab.apply_yaml(
        "services:\n- {vip: 192.0.2.10, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080}, {address: 203.0.113.2, port: 8081}]}\n",
    )
    .unwrap();
    let port_of = |output: &[u8]| u16::from_be_bytes([output[14 + 20 + 2], output[14 + 20 + 3]]);
    let mut seen = std::collections::BTreeMap::new();
    for client_port in 42000..42200 {
        let syn = tcp(Kind::TcpSyn, client_port).build();
        let (_, first) = lab.xdp(&syn).unwrap();
        let (_, again) = lab.xdp(&tcp(Kind::TcpData, client_port).build()).unwrap();
        assert_eq!(port_of(&first), port_of(&again), "flow {client_port} moved");
        *seen.entry(port_of(&first)).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [8080, 8081]);
    assert!(seen.values().all(|n| *n >= 60), "uneven spread {seen:?}");
}
