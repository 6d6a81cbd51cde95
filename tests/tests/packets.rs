//! Packet cases through BPF_PROG_TEST_RUN: exact output bytes, compared with packets that
//! etherparse builds (and checksums) from scratch, and the counter each case must move.

use std::net::IpAddr;

use fulgur_common::Counter;
use fulgur_tests::{
    corpus::{self, Case, V4, V6, XDP_PASS, XDP_REDIRECT, XDP_TX, icmp_error, quoted},
    lab::{CLIENT6, Lab, OUT_MAC},
    packets::{CLIENT_MAC, Kind, Pkt, diff},
};

const TC_ACT_OK: i32 = 0;

fn lab() -> Lab {
    let mut lab = Lab::new().expect("lab");
    lab.apply_yaml(corpus::SERVICES).expect("services");
    lab
}

/// Runs each case through `hook` (the XDP or the TC program) and fails naming every case whose
/// verdict, exact bytes or counter (moved by one) is wrong.
fn run_cases(lab: &Lab, cases: &[Case], hook: impl Fn(&Lab, &[u8]) -> (u32, Vec<u8>)) {
    let mut failures = Vec::new();
    for case in cases {
        let before = lab.counter(case.counter).unwrap();
        let (verdict, output) = hook(lab, &case.input);
        let moved = lab.counter(case.counter).unwrap() - before;
        let expected = case.expected_output();
        if verdict != case.verdict || output != expected || moved != 1 {
            failures.push(format!(
                "case {:?}: verdict {verdict} (expected {}), {:?} moved by {moved}\n{}",
                case.name,
                case.verdict,
                case.counter,
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
fn ingress_corpus() {
    let lab = lab();
    let cases = corpus::ingress_cases();
    assert!(
        cases.len() >= 60,
        "the corpus shrank to {} cases",
        cases.len()
    );
    run_cases(&lab, &cases, |lab, input| lab.xdp(input).expect("test run"));
}

/// Announcement follows the map: an address withdrawn (removed, or its lease expired) is no
/// longer answered for, and a device the agent did not register does not answer.
#[test]
fn announcement_follows_the_announced_set_and_the_registered_devices() {
    let mut lab = lab();
    let request = corpus::arp_request(corpus::ANNOUNCED);
    let solicitation = corpus::solicitation(CLIENT6, corpus::ANNOUNCED6, 255, &[]);
    for (packet, answered) in [
        (&request, Counter::ArpAnswered),
        (&solicitation, Counter::NdpAnswered),
    ] {
        let before = lab.counter(Counter::AnnounceNoDevice).unwrap();
        let (verdict, output) = lab.xdp_from(lab.out_ifindex, packet).unwrap();
        assert_eq!(
            (verdict, &output),
            (XDP_PASS, packet),
            "{answered:?} on out0"
        );
        assert_eq!(lab.counter(Counter::AnnounceNoDevice).unwrap() - before, 1);
        assert_eq!(lab.xdp(packet).unwrap().0, XDP_TX, "{answered:?} on in0");
    }
    lab.writer
        .set_announced(&[IpAddr::V6(corpus::ANNOUNCED6)].into_iter().collect())
        .unwrap();
    let before = lab.counter(Counter::AnnounceNotOurs).unwrap();
    assert_eq!(
        lab.xdp(&request).unwrap(),
        (XDP_PASS, request.clone()),
        "a withdrawn IPv4 address is no longer answered"
    );
    assert_eq!(lab.counter(Counter::AnnounceNotOurs).unwrap() - before, 1);
    assert_eq!(lab.xdp(&solicitation).unwrap().0, XDP_TX);
    lab.writer.set_announced(&Default::default()).unwrap();
    assert_eq!(
        lab.xdp(&solicitation).unwrap(),
        (XDP_PASS, solicitation.clone()),
        "a withdrawn IPv6 address is no longer answered"
    );
}

/// The program itself honours the agent's lease: once it runs out (the agent died or was cut
/// off), announced addresses are passed to the kernel, counted, until the lease is renewed.
#[test]
fn announcement_stops_when_the_dataplane_lease_runs_out() {
    use std::time::Duration;
    let mut lab = lab();
    let request = corpus::arp_request(corpus::ANNOUNCED);
    let solicitation = corpus::solicitation(CLIENT6, corpus::ANNOUNCED6, 255, &[]);
    let answered =
        |lab: &Lab| [&request, &solicitation].map(|packet| lab.xdp(packet).unwrap().0 == XDP_TX);
    lab.writer
        .renew_announce_lease(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(answered(&lab), [true, true], "within the lease");
    lab.writer
        .renew_announce_lease(Some(Duration::ZERO))
        .unwrap();
    std::thread::sleep(Duration::from_millis(2));
    let before = lab.counter(Counter::AnnounceLeaseExpired).unwrap();
    for packet in [&request, &solicitation] {
        assert_eq!(
            lab.xdp(packet).unwrap(),
            (XDP_PASS, packet.clone()),
            "after the lease"
        );
    }
    assert_eq!(
        lab.counter(Counter::AnnounceLeaseExpired).unwrap() - before,
        2
    );
    lab.writer
        .renew_announce_lease(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(answered(&lab), [true, true], "renewed");
    lab.writer.renew_announce_lease(None).unwrap();
    assert_eq!(answered(&lab), [true, true], "no lease");
}

#[test]
fn egress_corpus() {
    let lab = lab();
    let mut cases = Vec::new();
    for f in [V4, V6] {
        let syn = corpus::to_service(&f, Kind::TcpSyn, f.vip, corpus::EGRESS_TRACKED_PORT);
        assert_eq!(lab.xdp(&syn.build()).unwrap().0, XDP_REDIRECT, "{}", f.name);
        cases.extend(corpus::egress_cases(&f));
    }
    // Every egress reason has a case, but a failed helper (BPF_PROG_TEST_RUN's skb is linear
    // and writable, so the helpers do not fail there).
    for counter in Counter::ALL {
        if counter.name().starts_with("egress_") && counter != Counter::EgressRewriteFailed {
            assert!(
                cases.iter().any(|c| c.counter == counter),
                "no egress case for {counter:?}"
            );
        }
    }
    run_cases(&lab, &cases, |lab, input| {
        let (verdict, output) = lab.tc(input).expect("test run");
        (verdict as u32, output)
    });
}

#[test]
fn egress_restores_the_service_address_on_replies() {
    let lab = lab();
    for f in [V4, V6] {
        // Track flows first: TCP, UDP with and without checksum.
        let flows = [
            (Kind::TcpSyn, 41000),
            (Kind::Udp, 41001),
            (Kind::Udp, 41002),
        ];
        for (kind, port) in flows {
            let (verdict, _) = lab
                .xdp(&corpus::to_service(&f, kind, f.vip, port).build())
                .unwrap();
            assert_eq!(verdict, XDP_REDIRECT, "{} {kind:?}", f.name);
        }
        let reply = |kind, backend_port, client_port| Pkt {
            eth_src: OUT_MAC,
            eth_dst: CLIENT_MAC,
            ..Pkt::new(kind, (f.backend, backend_port), (f.client, client_port))
        };
        let from_vip = |p: &Pkt, port| Pkt {
            src: f.vip,
            src_port: port,
            ..p.clone()
        };
        let tcp_reply = reply(Kind::TcpData, 8080, 41000);
        let udp_reply = reply(Kind::Udp, 5353, 41001);
        let udp_bare = reply(Kind::Udp, 5353, 41002);
        let untracked = reply(Kind::TcpData, 8080, 41999);
        let wrong_backend_port = reply(Kind::TcpData, 8081, 41000);
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
                udp_bare.build_without_udp_checksum(),
                from_vip(&udp_bare, 53).build_without_udp_checksum(),
            ),
            (
                "reply of an untracked flow",
                untracked.build(),
                untracked.build(),
            ),
            (
                "reply from another port",
                wrong_backend_port.build(),
                wrong_backend_port.build(),
            ),
        ];
        for (name, input, expected) in cases {
            let (verdict, output) = lab.tc(&input).unwrap();
            assert_eq!(verdict, TC_ACT_OK, "{} {name}", f.name);
            assert!(
                output == expected,
                "{} {name}:\n{}",
                f.name,
                diff(&expected, &output)
            );
        }
    }
    assert_eq!(lab.counter(Counter::ReplyTranslated).unwrap(), 6);
}

/// The backend port a translated packet was sent to.
fn backend_port(output: &[u8], v4: bool) -> u16 {
    let l4 = if v4 { 34 } else { 54 };
    u16::from_be_bytes([output[l4 + 2], output[l4 + 3]])
}

#[test]
fn a_flow_keeps_its_backend_and_flows_spread() {
    let mut lab = lab();
    lab.apply_yaml(
        r#"services:
- {vip: 192.0.2.10, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080}, {address: 203.0.113.2, port: 8081}]}
- {vip: "2001:db8:ffff::10", port: 80, protocol: TCP, backends: [{address: "2001:db8:2::2", port: 8080}, {address: "2001:db8:2::2", port: 8081}]}
"#,
    )
    .unwrap();
    for f in [V4, V6] {
        let v4 = matches!(f.vip, IpAddr::V4(_));
        let mut seen = std::collections::BTreeMap::new();
        for client_port in 42000..42200 {
            let (_, first) = lab
                .xdp(&corpus::to_service(&f, Kind::TcpSyn, f.vip, client_port).build())
                .unwrap();
            let (_, again) = lab
                .xdp(&corpus::to_service(&f, Kind::TcpData, f.vip, client_port).build())
                .unwrap();
            assert_eq!(
                backend_port(&first, v4),
                backend_port(&again, v4),
                "flow {client_port} moved"
            );
            *seen.entry(backend_port(&first, v4)).or_insert(0) += 1;
        }
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            [8080, 8081],
            "{}",
            f.name
        );
        assert!(
            seen.values().all(|n| *n >= 60),
            "{} uneven spread {seen:?}",
            f.name
        );
    }
}

#[test]
fn reject_weight_rejects_its_share_of_new_flows() {
    let mut lab = lab();
    // 80% of the weight is invalid: 80% of new connections must be reset.
    let yaml = "services:\n- {vip: 192.0.2.10, port: 80, protocol: TCP, rejectWeight: 4, backends: [{address: 203.0.113.2, port: 8080}]}\n";
    lab.apply_yaml(yaml).unwrap();
    let set: fulgur_agent::config::ServiceSet = serde_yaml::from_str(yaml).unwrap();
    let service_id = lab.writer.service_id(&set.services[0]).unwrap();
    let flows = 2000u16;
    let mut resets = 0;
    for client_port in 0..flows {
        let (verdict, _) = lab
            .xdp(&corpus::to_service(&V4, Kind::TcpSyn, V4.vip, 10000 + client_port).build())
            .unwrap();
        if verdict == corpus::XDP_TX {
            resets += 1;
        }
    }
    let share = resets as f64 / flows as f64;
    assert!(
        (share - 0.8).abs() < 0.04,
        "rejected {share:.3} of new flows, expected 0.8"
    );
    let service = lab.service_stats(service_id).unwrap();
    assert_eq!(service.rejects, resets as u64);
    assert_eq!(service.new_flows, (flows - resets) as u64);
}

#[test]
fn icmp_errors_about_tracked_flows_are_translated_both_ways() {
    let lab = lab();
    let routers: [IpAddr; 2] = [
        "198.51.100.254".parse().unwrap(),
        "2001:db8:1::fe".parse().unwrap(),
    ];
    for (f, router) in [(V4, routers[0]), (V6, routers[1])] {
        // Track a TCP flow and a UDP flow.
        for (kind, port) in [(Kind::TcpSyn, 43000), (Kind::Udp, 43001)] {
            let (verdict, _) = lab
                .xdp(&corpus::to_service(&f, kind, f.vip, port).build())
                .unwrap();
            assert_eq!(verdict, XDP_REDIRECT);
        }

        // A router on the client side says our reply (service → client) was too big: the error
        // goes on to the backend, quoting backend → client.
        let input = icmp_error(
            (CLIENT_MAC, fulgur_tests::lab::IN_MAC),
            router,
            f.vip,
            64,
            true,
            &quoted(Kind::TcpData, (f.vip, 80), (f.client, 43000)),
        );
        let expected = icmp_error(
            (OUT_MAC, fulgur_tests::lab::BACKEND_MAC),
            router,
            f.backend,
            63,
            true,
            &quoted(Kind::TcpData, (f.backend, 8080), (f.client, 43000)),
        );
        let (verdict, output) = lab.xdp(&input).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "{} error to the backend", f.name);
        assert!(
            output == expected,
            "{} error to the backend:\n{}",
            f.name,
            diff(&expected, &output)
        );

        // The same error about a flow nobody tracks passes untouched.
        let stray = icmp_error(
            (CLIENT_MAC, fulgur_tests::lab::IN_MAC),
            router,
            f.vip,
            64,
            true,
            &quoted(Kind::TcpData, (f.vip, 80), (f.client, 43999)),
        );
        assert_eq!(
            lab.xdp(&stray).unwrap(),
            (corpus::XDP_PASS, stray.clone()),
            "{} stray error",
            f.name
        );

        // The backend answers a datagram with port unreachable: the client sees it come from
        // the service, about a datagram to the service.
        let from_backend = icmp_error(
            (OUT_MAC, CLIENT_MAC),
            f.backend,
            f.client,
            64,
            false,
            &quoted(Kind::Udp, (f.client, 43001), (f.backend, 5353)),
        );
        let expected = icmp_error(
            (OUT_MAC, CLIENT_MAC),
            f.vip,
            f.client,
            64,
            false,
            &quoted(Kind::Udp, (f.client, 43001), (f.vip, 53)),
        );
        let (verdict, output) = lab.tc(&from_backend).unwrap();
        assert_eq!(verdict, TC_ACT_OK);
        assert!(
            output == expected,
            "{} error from the backend:\n{}",
            f.name,
            diff(&expected, &output)
        );

        // A router behind the backend keeps its own source address; the quote is translated.
        let behind: IpAddr = if f.name == "IPv4" {
            "203.0.113.99".parse().unwrap()
        } else {
            "2001:db8:2::99".parse().unwrap()
        };
        let from_router = icmp_error(
            (OUT_MAC, CLIENT_MAC),
            behind,
            f.client,
            64,
            true,
            &quoted(Kind::TcpData, (f.client, 43000), (f.backend, 8080)),
        );
        let expected = icmp_error(
            (OUT_MAC, CLIENT_MAC),
            behind,
            f.client,
            64,
            true,
            &quoted(Kind::TcpData, (f.client, 43000), (f.vip, 80)),
        );
        let (_, output) = lab.tc(&from_router).unwrap();
        assert!(
            output == expected,
            "{} error from behind the backend:\n{}",
            f.name,
            diff(&expected, &output)
        );
    }
    assert_eq!(lab.counter(Counter::IcmpToBackend).unwrap(), 2);
    assert_eq!(lab.counter(Counter::IcmpToClient).unwrap(), 4);
}

// SNAT for backends on other nodes.

use fulgur_agent::{
    paths::{Decision, PathMaps},
    snat::{NodeAddresses, SnatMaps, SnatMode, SnatSettings, Timeouts},
};
use fulgur_common::{FlowKey, PathReason, encode_addr, hash::flow_hash};
use fulgur_tests::corpus::{
    SNAT_NODE, SNAT_NODE6, SNAT_SERVICES, SNAT_V4, SNAT_V6, SnatFamily, expected_reset,
    expected_unreachable, redirected, snat_forwarded, snat_reply, snat_reply_translated,
};

fn snat_settings(ports: &str, ipv6: bool) -> SnatSettings {
    SnatSettings {
        mode: SnatMode::Remote,
        ports: ports.parse().unwrap(),
        addresses: NodeAddresses {
            ipv4: Some(SNAT_NODE),
            ipv6: ipv6.then_some(SNAT_NODE6),
        },
    }
}

/// `v4` or `v6`, whichever is of `sf`'s family.
fn of_family(sf: &SnatFamily, v4: &str, v6: &str) -> IpAddr {
    if sf.node.is_ipv4() { v4 } else { v6 }.parse().unwrap()
}

/// A lab with the SNAT services and SNAT on (`--snat remote`).
fn snat_lab(settings: SnatSettings) -> (Lab, SnatMaps) {
    let mut lab = Lab::new().expect("lab");
    lab.apply_yaml(SNAT_SERVICES).expect("services");
    let maps = lab.snat(settings).expect("snat maps");
    (lab, maps)
}

/// The port a new flow gets from its first probe (the range is free).
fn first_port(input: &Pkt, settings: &SnatSettings) -> u16 {
    let (src, family) = encode_addr(input.src);
    let flow = FlowKey {
        src,
        dst: encode_addr(input.dst).0,
        src_port: input.src_port.to_be(),
        dst_port: input.dst_port.to_be(),
        proto: if input.kind == Kind::Udp { 17 } else { 6 },
        family,
        pad: [0; 2],
    };
    settings.config(0).probe_port(flow_hash(&flow), 0)
}

/// Runs `input` through XDP (as arriving on `ifindex`) and checks verdict, exact bytes and that
/// `counter` moved by one.
fn expect(
    lab: &Lab,
    name: &str,
    ifindex: u32,
    input: &[u8],
    verdict: u32,
    expected: &[u8],
    counter: Counter,
) -> Vec<u8> {
    let before = lab.counter(counter).unwrap();
    let (got, output) = lab.xdp_from(ifindex, input).expect("test run");
    assert_eq!(got, verdict, "{name}: verdict");
    assert!(output == expected, "{name}:\n{}", diff(expected, &output));
    assert_eq!(
        lab.counter(counter).unwrap() - before,
        1,
        "{name}: {counter:?}"
    );
    output
}

fn build(pkt: &Pkt, checksum: bool) -> Vec<u8> {
    if checksum {
        pkt.build()
    } else {
        pkt.build_without_udp_checksum()
    }
}

#[test]
fn snat_rewrites_new_flows_established_packets_and_replies_exactly() {
    let settings = snat_settings("61000-65535", true);
    let (lab, _maps) = snat_lab(settings);
    for sf in [SNAT_V4, SNAT_V6] {
        let f = sf.family;
        let flows = [
            (Kind::TcpSyn, 44001, true),
            (Kind::Udp, 44002, true),
            (Kind::Udp, 44003, false),
        ];
        for (kind, client_port, checksum) in flows {
            let name = format!("{} {kind:?} checksum {checksum}", f.name);
            let input = corpus::to_service(&f, kind, sf.vip, client_port);
            let port = first_port(&input, &settings);
            let out = snat_forwarded(&input, sf.node, port, f.backend);
            expect(
                &lab,
                &format!("{name}: new flow"),
                lab.in_ifindex,
                &build(&input, checksum),
                XDP_REDIRECT,
                &build(&out, checksum),
                Counter::SnatNewFlow,
            );
            // The flow's next packet keeps its port.
            let next = Pkt {
                kind: if kind == Kind::TcpSyn {
                    Kind::TcpData
                } else {
                    kind
                },
                ..input.clone()
            };
            expect(
                &lab,
                &format!("{name}: established"),
                lab.in_ifindex,
                &build(&next, checksum),
                XDP_REDIRECT,
                &build(&snat_forwarded(&next, sf.node, port, f.backend), checksum),
                Counter::Redirect,
            );
            // The backend's reply goes back to the client from the service address.
            let reply_kind = if kind == Kind::TcpSyn {
                Kind::TcpData
            } else {
                kind
            };
            let reply = snat_reply(reply_kind, f.backend, sf.node, port);
            expect(
                &lab,
                &format!("{name}: reply"),
                lab.out_ifindex,
                &build(&reply, checksum),
                XDP_REDIRECT,
                &build(
                    &snat_reply_translated(&reply, sf.vip, f.client, client_port),
                    checksum,
                ),
                Counter::SnatReplyTranslated,
            );
        }
        // A local backend keeps the client's address: DNAT only, no SNAT.
        let local = corpus::to_service(&f, Kind::TcpSyn, f.vip, 44010);
        let before = lab.counter(Counter::SnatNewFlow).unwrap();
        expect(
            &lab,
            &format!("{} local backend", f.name),
            lab.in_ifindex,
            &local.build(),
            XDP_REDIRECT,
            &redirected(&local, f.backend).build(),
            Counter::NewFlow,
        );
        assert_eq!(lab.counter(Counter::SnatNewFlow).unwrap(), before);
    }
}

/// A client the node has no neighbour entry for (its kernel never sees what XDP answers): the
/// replies of its SNATed flows go back to the MAC and device its packets came from, in XDP
/// (handed to the kernel they would meet a conntrack that never saw the flow).
#[test]
fn snat_replies_reach_a_client_without_a_neighbour_entry_through_its_own_mac() {
    let settings = snat_settings("61000-65535", true);
    let (lab, _maps) = snat_lab(settings);
    let sender_mac = [0x02, 0, 0, 0, 0x00, 0x77];
    for sf in [SNAT_V4, SNAT_V6] {
        let f = sf.family;
        let client = of_family(&sf, "198.51.100.77", "2001:db8:1::77");
        for (kind, client_port) in [(Kind::TcpSyn, 45001), (Kind::Udp, 45002)] {
            let name = format!("{} {kind:?} from {client}", f.name);
            let input = Pkt {
                src: client,
                eth_src: sender_mac,
                ..corpus::to_service(&f, kind, sf.vip, client_port)
            };
            let port = first_port(&input, &settings);
            let out = snat_forwarded(&input, sf.node, port, f.backend);
            expect(
                &lab,
                &format!("{name}: new flow"),
                lab.in_ifindex,
                &input.build(),
                XDP_REDIRECT,
                &out.build(),
                Counter::SnatNewFlow,
            );
            let reply_kind = if kind == Kind::TcpSyn {
                Kind::TcpData
            } else {
                kind
            };
            let reply = snat_reply(reply_kind, f.backend, sf.node, port);
            let translated = Pkt {
                eth_dst: sender_mac,
                ..snat_reply_translated(&reply, sf.vip, client, client_port)
            };
            for round in ["first", "cached"] {
                expect(
                    &lab,
                    &format!("{name}: {round} reply"),
                    lab.out_ifindex,
                    &reply.build(),
                    XDP_REDIRECT,
                    &translated.build(),
                    Counter::SnatReplyTranslated,
                );
            }
        }
    }
}

#[test]
fn packets_to_the_node_address_that_are_no_snat_replies_pass_untouched() {
    let (lab, _maps) = snat_lab(snat_settings("61000-65535", true));
    for sf in [SNAT_V4, SNAT_V6] {
        let f = sf.family;
        let other = of_family(&sf, "203.0.113.9", "2001:db8:2::9");
        for (name, pkt, counter) in [
            (
                "below the range",
                snat_reply(Kind::TcpData, f.backend, sf.node, 22),
                Counter::PassNotService,
            ),
            (
                "in the range, no such flow",
                snat_reply(Kind::TcpData, f.backend, sf.node, 61999),
                Counter::SnatReplyUnknown,
            ),
            (
                "in the range, another address",
                snat_reply(Kind::Udp, f.backend, other, 61999),
                Counter::PassNotService,
            ),
        ] {
            let bytes = pkt.build();
            expect(
                &lab,
                &format!("{} {name}", f.name),
                lab.out_ifindex,
                &bytes,
                XDP_PASS,
                &bytes,
                counter,
            );
        }
    }
}

#[test]
fn icmp_errors_about_snated_flows_reach_their_clients_translated() {
    let (lab, _maps) = snat_lab(snat_settings("61000-65535", true));
    for sf in [SNAT_V4, SNAT_V6] {
        let f = sf.family;
        // A router between this node and the backend.
        let router = of_family(&sf, "203.0.113.99", "2001:db8:2::99");
        let flows = [
            (Kind::TcpSyn, 45001, true),
            (Kind::Udp, 45002, true),
            (Kind::Udp, 45003, false),
        ];
        for (kind, client_port, checksum) in flows {
            if !checksum && !sf.node.is_ipv4() {
                continue; // IPv6 UDP always has a checksum.
            }
            let input = corpus::to_service(&f, kind, sf.vip, client_port);
            let (verdict, sent) = lab
                .xdp_from(lab.in_ifindex, &build(&input, checksum))
                .unwrap();
            assert_eq!(verdict, XDP_REDIRECT, "{} {kind:?}: SNATed", f.name);
            let l4 = input.l4_offset();
            let snat_port = u16::from_be_bytes([sent[l4], sent[l4 + 1]]);
            assert!(snat_port >= 61000, "{} {kind:?}: port {snat_port}", f.name);
            // The client's stack must find its own packet quoted, as it left this node.
            let as_client_sent = build(
                &Pkt {
                    ttl: input.ttl - 1,
                    ..input.clone()
                },
                checksum,
            );
            // The whole packet; for IPv4 also the 28 bytes RFC 792 asks for (no TCP checksum).
            let mut quote_lens = vec![sent.len() - 14];
            if sf.node.is_ipv4() {
                quote_lens.push(28);
            }
            for quote_len in quote_lens {
                // The backend itself speaks as the service; a router keeps its address.
                for (from, source) in [(f.backend, sf.vip), (router, router)] {
                    let name = format!(
                        "{} {kind:?} checksum {checksum}, {quote_len}-byte quote, from {from}",
                        f.name
                    );
                    let error = icmp_error(
                        (fulgur_tests::lab::BACKEND_MAC, OUT_MAC),
                        from,
                        sf.node,
                        64,
                        true,
                        &sent[14..14 + quote_len],
                    );
                    let expected = icmp_error(
                        (fulgur_tests::lab::IN_MAC, CLIENT_MAC),
                        source,
                        f.client,
                        63,
                        true,
                        &as_client_sent[14..14 + quote_len],
                    );
                    let output = expect(
                        &lab,
                        &name,
                        lab.out_ifindex,
                        &error,
                        XDP_REDIRECT,
                        &expected,
                        Counter::SnatIcmpToClient,
                    );
                    corpus::icmp_error_checksums(&output).unwrap_or_else(|e| panic!("{name}: {e}"));
                    let mut damaged = output;
                    *damaged.last_mut().unwrap() ^= 1;
                    assert!(corpus::icmp_error_checksums(&damaged).is_err(), "{name}");
                }
            }
        }
        // An error quoting a port no SNAT flow has, or one outside the range, passes untouched
        // as before.
        for port in [61999, 22] {
            let stray = icmp_error(
                (fulgur_tests::lab::BACKEND_MAC, OUT_MAC),
                f.backend,
                sf.node,
                64,
                true,
                &quoted(Kind::TcpData, (sf.node, port), (f.backend, 8080)),
            );
            expect(
                &lab,
                &format!("{} error about port {port}", f.name),
                lab.out_ifindex,
                &stray,
                XDP_PASS,
                &stray,
                Counter::PassNotService,
            );
        }
    }
}

#[test]
fn an_exhausted_port_range_rejects_new_flows_and_keeps_the_live_ones() {
    let settings = snat_settings("61000-61001", true);
    let (lab, _maps) = snat_lab(settings);
    for sf in [SNAT_V4, SNAT_V6] {
        let f = sf.family;
        let mut ports = Vec::new();
        for client_port in [45001, 45002] {
            let input = corpus::to_service(&f, Kind::TcpSyn, sf.vip, client_port);
            let (verdict, output) = lab.xdp(&input.build()).unwrap();
            assert_eq!(verdict, XDP_REDIRECT, "{} flow {client_port}", f.name);
            let l4 = if sf.node.is_ipv4() { 34 } else { 54 };
            ports.push(u16::from_be_bytes([output[l4], output[l4 + 1]]));
        }
        ports.sort();
        assert_eq!(ports, [61000, 61001], "{}: both ports taken", f.name);
        // No port left: the new flow is reset, counted, and takes no live flow's port.
        let third = corpus::to_service(&f, Kind::TcpSyn, sf.vip, 45003);
        expect(
            &lab,
            &format!("{} third flow", f.name),
            lab.in_ifindex,
            &third.build(),
            XDP_TX,
            &expected_reset(&third),
            Counter::SnatExhausted,
        );
        let udp = corpus::to_service(&f, Kind::Udp, sf.vip, 45004);
        let raw = udp.build();
        assert_eq!(
            lab.xdp(&raw).unwrap().0,
            XDP_REDIRECT,
            "UDP has its own tuples"
        );
        // The live flows still translate, both ways.
        for client_port in [45001, 45002] {
            let data = corpus::to_service(&f, Kind::TcpData, sf.vip, client_port);
            let (verdict, output) = lab.xdp(&data.build()).unwrap();
            assert_eq!(verdict, XDP_REDIRECT);
            let l4 = if sf.node.is_ipv4() { 34 } else { 54 };
            let port = u16::from_be_bytes([output[l4], output[l4 + 1]]);
            assert_eq!(
                output,
                snat_forwarded(&data, sf.node, port, f.backend).build(),
                "{} live flow {client_port}",
                f.name
            );
            let reply = snat_reply(Kind::TcpData, f.backend, sf.node, port);
            expect(
                &lab,
                &format!("{} reply of live flow {client_port}", f.name),
                lab.out_ifindex,
                &reply.build(),
                XDP_REDIRECT,
                &snat_reply_translated(&reply, sf.vip, f.client, client_port).build(),
                Counter::SnatReplyTranslated,
            );
        }
    }
}

#[test]
fn snat_without_an_address_of_the_family_rejects_and_without_a_neighbour_drops() {
    let (lab, _maps) = snat_lab(snat_settings("61000-65535", false));
    let f = SNAT_V6.family;
    let syn = corpus::to_service(&f, Kind::TcpSyn, SNAT_V6.vip, 46001);
    expect(
        &lab,
        "IPv6 TCP, no IPv6 SNAT address",
        lab.in_ifindex,
        &syn.build(),
        XDP_TX,
        &expected_reset(&syn),
        Counter::SnatNoAddress,
    );
    let udp = corpus::to_service(&f, Kind::Udp, SNAT_V6.vip, 46002);
    let raw = udp.build();
    expect(
        &lab,
        "IPv6 UDP, no IPv6 SNAT address",
        lab.in_ifindex,
        &raw,
        XDP_TX,
        &expected_unreachable(&udp, &raw),
        Counter::SnatNoAddress,
    );
    // No neighbour for the remote backend's next hop: dropped and counted, not reset, so the
    // client's retransmission gets through once the kernel resolved it.
    let syn = corpus::to_service(
        &SNAT_V4.family,
        Kind::TcpSyn,
        SNAT_V4.vip_no_neighbour,
        46003,
    );
    let raw = syn.build();
    expect(
        &lab,
        "IPv4 TCP, no neighbour",
        lab.in_ifindex,
        &raw,
        corpus::XDP_DROP,
        &raw,
        Counter::SnatNoNeighbour,
    );
}

/// Writes `out0`'s path as the agent would (`in0` fast).
fn set_out_path(lab: &Lab, fast: bool, reason: PathReason, xdp_transmit: bool) {
    let pinned = |name: &str| {
        aya::maps::Map::from_map_data(
            aya::maps::MapData::from_pin(lab.dataplane.pins.map(name)).expect("pin"),
        )
        .ok()
    };
    let mut maps = PathMaps::adopt(pinned).expect("path maps");
    maps.sync(&[
        Decision {
            ifindex: lab.in_ifindex,
            name: "in0".into(),
            fast: true,
            reason: PathReason::Driver,
            xdp_transmit: true,
        },
        Decision {
            ifindex: lab.out_ifindex,
            name: "out0".into(),
            fast,
            reason,
            xdp_transmit,
        },
    ])
    .expect("sync");
}

#[test]
fn snat_flows_stay_in_xdp_on_the_netfilter_path_and_are_refused_where_xdp_cannot_transmit() {
    let settings = snat_settings("61000-65535", true);
    let (lab, _maps) = snat_lab(settings);
    // Netfilter on the node: local flows take the kernel path, SNATed ones stay in XDP.
    set_out_path(&lab, false, PathReason::Netfilter, true);
    let f = SNAT_V4.family;
    let input = corpus::to_service(&f, Kind::TcpSyn, SNAT_V4.vip, 47001);
    let port = first_port(&input, &settings);
    expect(
        &lab,
        "SNAT flow, netfilter",
        lab.in_ifindex,
        &input.build(),
        XDP_REDIRECT,
        &snat_forwarded(&input, SNAT_V4.node, port, f.backend).build(),
        Counter::SnatNewFlow,
    );
    let local = corpus::to_service(&f, Kind::TcpSyn, f.vip, 47002);
    expect(
        &lab,
        "local flow, netfilter",
        lab.in_ifindex,
        &local.build(),
        XDP_PASS,
        &corpus::dnat_only(&local, f.backend).build(),
        Counter::KernelPath,
    );
    // A device that cannot take XDP frames: the new SNAT flow is reset, counted.
    set_out_path(&lab, false, PathReason::VethPeerWithoutXdp, false);
    let refused = corpus::to_service(&f, Kind::TcpSyn, SNAT_V4.vip, 47003);
    expect(
        &lab,
        "SNAT flow, no XDP transmit",
        lab.in_ifindex,
        &refused.build(),
        XDP_TX,
        &expected_reset(&refused),
        Counter::SnatNoFastPath,
    );
}

#[test]
fn idle_snat_flows_are_collected_and_live_ones_kept() {
    let settings = snat_settings("61000-65535", true);
    let (lab, mut maps) = snat_lab(settings);
    let timeouts = Timeouts::default();
    // A clock well past the agent's start, so the restart grace does not apply.
    let start = fulgur_agent::snat::monotonic_seconds() + 1000;
    maps.write_config(start).unwrap();
    let f = SNAT_V4.family;
    let idle = corpus::to_service(&f, Kind::Udp, SNAT_V4.vip, 48001);
    let live = corpus::to_service(&f, Kind::Udp, SNAT_V4.vip, 48002);
    let tcp = corpus::to_service(&f, Kind::TcpSyn, SNAT_V4.vip, 48003);
    for pkt in [&idle, &live, &tcp] {
        assert_eq!(lab.xdp(&pkt.build()).unwrap().0, XDP_REDIRECT);
    }
    // Only `live` sends again later; the TCP flow is idle too, but within its timeout.
    let later = start + timeouts.udp.as_secs() as u32;
    maps.write_config(later).unwrap();
    assert_eq!(lab.xdp(&live.build()).unwrap().0, XDP_REDIRECT);
    let collected = maps.collect(later + 1, &timeouts).unwrap();
    assert_eq!(
        (collected.removed, collected.flows),
        (1, 2),
        "{collected:?}"
    );
    // The collected flow's port no longer translates; the live one's does.
    let port_of = |pkt: &Pkt| first_port(pkt, &settings);
    let gone = snat_reply(Kind::Udp, f.backend, SNAT_V4.node, port_of(&idle)).build();
    expect(
        &lab,
        "collected reply",
        lab.out_ifindex,
        &gone,
        XDP_PASS,
        &gone,
        Counter::SnatReplyUnknown,
    );
    let reply = snat_reply(Kind::Udp, f.backend, SNAT_V4.node, port_of(&live));
    expect(
        &lab,
        "live reply",
        lab.out_ifindex,
        &reply.build(),
        XDP_REDIRECT,
        &snat_reply_translated(&reply, SNAT_V4.vip, f.client, 48002).build(),
        Counter::SnatReplyTranslated,
    );
    // A RST marks the TCP flow closing: collected after the short timeout.
    let rst = corpus::to_service(&f, Kind::TcpRst, SNAT_V4.vip, 48003);
    assert_eq!(lab.xdp(&rst.build()).unwrap().0, XDP_REDIRECT);
    let collected = maps
        .collect(later + 2 + timeouts.tcp_closing.as_secs() as u32, &timeouts)
        .unwrap();
    assert_eq!(
        (collected.removed, collected.flows),
        (1, 1),
        "{collected:?}"
    );
    // An idle flow comes back as a new flow (a new port may be taken).
    assert_eq!(lab.xdp(&idle.build()).unwrap().0, XDP_REDIRECT);
}

#[test]
fn the_ingress_corpus_is_unchanged_with_snat_on() {
    let lab = lab();
    let _maps = lab.snat(snat_settings("61000-65535", true)).unwrap();
    run_cases(&lab, &corpus::ingress_cases(), |lab, input| {
        lab.xdp(input).expect("test run")
    });
}

#[test]
fn snat_state_survives_a_reload_and_follows_where_the_backend_runs() {
    let settings = snat_settings("61000-65535", true);
    let (mut lab, _maps) = snat_lab(settings);
    let f = SNAT_V4.family;
    let input = corpus::to_service(&f, Kind::TcpSyn, SNAT_V4.vip, 49001);
    let port = first_port(&input, &settings);
    assert_eq!(lab.xdp(&input.build()).unwrap().0, XDP_REDIRECT);
    // A restarted agent loads its programs over the pinned maps: the flow goes on, both ways.
    let reloaded = lab
        .programs_with_log(fulgur_agent::bpf_log::BpfLog::Off)
        .unwrap();
    let data = corpus::to_service(&f, Kind::TcpData, SNAT_V4.vip, 49001);
    assert_eq!(
        lab.xdp_on(&reloaded, &data.build()).unwrap(),
        (
            XDP_REDIRECT,
            snat_forwarded(&data, SNAT_V4.node, port, f.backend).build()
        ),
        "established after the reload"
    );
    drop(reloaded);
    let reply = snat_reply(Kind::TcpData, f.backend, SNAT_V4.node, port);
    expect(
        &lab,
        "reply after the reload",
        lab.out_ifindex,
        &reply.build(),
        XDP_REDIRECT,
        &snat_reply_translated(&reply, SNAT_V4.vip, f.client, 49001).build(),
        Counter::SnatReplyTranslated,
    );
    // The backend is now on this node: new flows keep the client's address.
    lab.apply_yaml(&SNAT_SERVICES.replace(
        "{address: 203.0.113.2, port: 8080, remote: true}",
        "{address: 203.0.113.2, port: 8080}",
    ))
    .unwrap();
    let local = corpus::to_service(&f, Kind::TcpSyn, SNAT_V4.vip, 49002);
    expect(
        &lab,
        "backend moved to this node",
        lab.in_ifindex,
        &local.build(),
        XDP_REDIRECT,
        &redirected(&local, f.backend).build(),
        Counter::NewFlow,
    );
}

/// The agent has the kernel resolve a remote backend's next hop (SNATed packets never pass
/// through the kernel, which would otherwise never ask): an entry appears and resolution starts.
#[test]
fn the_kernel_is_asked_to_resolve_remote_backends_next_hops() {
    let (lab, _maps) = snat_lab(snat_settings("61000-65535", true));
    for (backend, dev) in [
        (SNAT_V4.family.backend_no_neighbour, "out0"),
        (SNAT_V6.family.backend_no_neighbour, "out0"),
    ] {
        let show = || {
            let out = std::process::Command::new("ip")
                .args(["neigh", "show", &backend.to_string(), "dev", dev])
                .output()
                .expect("ip neigh");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        assert_eq!(show(), "", "{backend}: no entry before");
        fulgur_agent::snat::resolve_next_hop(backend).expect("resolve");
        let entry = show();
        assert!(
            [
                "INCOMPLETE",
                "FAILED",
                "REACHABLE",
                "STALE",
                "DELAY",
                "PROBE"
            ]
            .iter()
            .any(|state| entry.contains(state)),
            "{backend}: {entry:?}"
        );
    }
    drop(lab);
}

/// A frame for another host's MAC (a switch flooding a failed node's MAC to every node) starts
/// no flow here, on the plain and the SNAT path alike: passed untouched, counted. A tracked
/// flow's packets go on whatever their MAC.
#[test]
fn frames_for_another_hosts_mac_start_no_flow() {
    let other_host = [0x02, 0, 0, 0, 0x09, 0x09];
    let (lab, _maps) = snat_lab(snat_settings("61000-65535", true));
    for (f, vip) in [
        (V4, V4.vip),
        (V6, V6.vip),
        (V4, SNAT_V4.vip),
        (V6, SNAT_V6.vip),
    ] {
        let syn = corpus::to_service(&f, Kind::TcpSyn, vip, 46001);
        let flooded = Pkt {
            eth_dst: other_host,
            ..syn.clone()
        }
        .build();
        let before = lab.counter(Counter::PassOtherHost).unwrap();
        assert_eq!(
            lab.xdp(&flooded).unwrap(),
            (XDP_PASS, flooded.clone()),
            "{} to {vip}: a flooded SYN",
            f.name
        );
        assert_eq!(lab.counter(Counter::PassOtherHost).unwrap() - before, 1);
    }
    // Tracked: its next packet, flooded, still reaches the backend.
    let syn = corpus::to_service(&V4, Kind::TcpSyn, V4.vip, 46002);
    assert_eq!(
        lab.xdp(&syn.build()).unwrap().0,
        XDP_REDIRECT,
        "addressed here"
    );
    let data = Pkt {
        kind: Kind::TcpData,
        eth_dst: other_host,
        ..syn.clone()
    };
    let expected = redirected(&data, V4.backend).build();
    let (verdict, output) = lab.xdp(&data.build()).unwrap();
    assert_eq!(verdict, XDP_REDIRECT, "a tracked flow");
    assert!(output == expected, "{}", diff(&expected, &output));
    // An SNATed flow too, tracked in its own map.
    let settings = snat_settings("61000-65535", true);
    let syn = corpus::to_service(&V4, Kind::TcpSyn, SNAT_V4.vip, 46003);
    assert_eq!(lab.xdp(&syn.build()).unwrap().0, XDP_REDIRECT, "SNATed");
    let data = Pkt {
        kind: Kind::TcpData,
        eth_dst: other_host,
        ..syn.clone()
    };
    let expected =
        snat_forwarded(&data, SNAT_V4.node, first_port(&syn, &settings), V4.backend).build();
    let (verdict, output) = lab.xdp(&data.build()).unwrap();
    assert_eq!(verdict, XDP_REDIRECT, "a tracked SNATed flow");
    assert!(output == expected, "{}", diff(&expected, &output));
}
