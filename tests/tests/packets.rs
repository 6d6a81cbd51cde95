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
