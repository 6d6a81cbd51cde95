//! Announcement with the real agent binary on a veth link, in both XDP modes: a client on the
//! link sees exact ARP replies and neighbour advertisements from the node's MAC for announced
//! addresses, and its kernel's neighbour entries fill; requests for the node's own addresses
//! are answered by the kernel as before, and nobody answers for others; starting to announce
//! sends gratuitous ARP and unsolicited advertisements the client captures (and its stale
//! entries move); removal and an expired lease stop the answers at once.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use etherparse::ArpOperation;
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    announce::{
        CLIENT_IFACE, GATEWAY, GATEWAY6, GRPC, Link, METRICS, NOBODY, NODE, NODE_IFACE, NODE6,
        is_advertisement, is_arp, mac_text,
    },
    packets::diff,
    topology::{AgentProcess, Source},
};

const ANSWER: Duration = Duration::from_millis(500);
/// Long enough that an answer that is going to come has come.
const SILENCE: Duration = Duration::from_millis(400);

fn gateways() -> [IpAddr; 2] {
    [IpAddr::V4(GATEWAY), IpAddr::V6(GATEWAY6)]
}

fn start_agent(link: &Link) -> AgentProcess {
    AgentProcess::start(
        &link.node,
        NODE_IFACE,
        link.mode,
        Source::Grpc {
            listen: GRPC.parse().unwrap(),
            tls: None,
            metrics: Some(METRICS.parse().unwrap()),
        },
    )
    .expect("agent")
}

fn assert_frame(what: &str, expected: &[u8], actual: Option<Vec<u8>>) {
    let actual = actual.unwrap_or_else(|| panic!("{what}: no answer within {ANSWER:?}"));
    assert!(
        actual == expected,
        "{what}: not the expected frame\n{}",
        diff(expected, &actual)
    );
}

fn counter(link: &Link, reason: &str) -> u64 {
    let metrics = link.metrics().expect("metrics");
    let prefix = format!("fulgur_dataplane_packets_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

fn announced_and_answered(mode: XdpAttachMode) {
    let link = Link::new(mode).expect("link");
    let agent = start_agent(&link);
    let socket = link.client_socket().expect("client socket");
    let node_mac = mac_text(link.node_mac);

    // Before: nobody answers for the Gateway addresses.
    assert_eq!(link.arp(&socket, GATEWAY, SILENCE), None, "answered before");
    assert_eq!(link.solicit(&socket, GATEWAY6, SILENCE), None);
    // The client's entries point elsewhere (an address that moved): the announcement fixes them.
    for address in gateways() {
        link.client
            .ip(&[
                "neigh",
                "replace",
                &address.to_string(),
                "lladdr",
                "02:00:00:00:00:99",
                "dev",
                CLIENT_IFACE,
                "nud",
                "stale",
            ])
            .expect("stale neighbour");
    }

    let started = Instant::now();
    link.apply(1, &gateways(), 0).expect("apply");
    // Gratuitous ARP and unsolicited advertisements: 3 of each, about 200 ms apart.
    let mut keep =
        |f: &[u8]| is_arp(f, ArpOperation::REQUEST, GATEWAY) || is_advertisement(f, GATEWAY6);
    let announced = socket.receive_timed(started + Duration::from_millis(1500), &mut keep, 6);
    let garp = link.expected_gratuitous_arp(GATEWAY);
    let na = link.expected_unsolicited_advertisement(GATEWAY6);
    for (what, expected) in [("gratuitous ARP", &garp), ("unsolicited NA", &na)] {
        let times: Vec<Instant> = announced
            .iter()
            .filter(|(_, f)| f == expected)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(
            times.len(),
            3,
            "{what}: {} of {} captured frames are exactly as expected:\n{}",
            times.len(),
            announced.len(),
            announced
                .iter()
                .map(|(_, f)| diff(expected, f))
                .collect::<Vec<_>>()
                .join("\n")
        );
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(150),
                "{what}: repeats {gap:?} apart"
            );
        }
    }
    for address in gateways() {
        let (lladdr, _) = link.client_neighbour(address).expect("neighbour entry");
        assert_eq!(lladdr, node_mac, "{address}: the announcement moved it");
    }

    // Requests are answered by XDP with the node's MAC, exactly as RFC 826 / 4861 say.
    let before = (
        counter(&link, "arp_answered"),
        counter(&link, "ndp_answered"),
    );
    assert_frame(
        "ARP reply",
        &link.expected_arp_reply(GATEWAY),
        link.arp(&socket, GATEWAY, ANSWER),
    );
    assert_frame(
        "neighbour advertisement",
        &link.expected_advertisement(GATEWAY6),
        link.solicit(&socket, GATEWAY6, ANSWER),
    );
    assert_eq!(
        (
            counter(&link, "arp_answered"),
            counter(&link, "ndp_answered")
        ),
        (before.0 + 1, before.1 + 1)
    );
    // The client kernel's own resolution fills its entries with the node's MAC.
    for address in gateways() {
        link.client
            .ip(&["neigh", "del", &address.to_string(), "dev", CLIENT_IFACE])
            .expect("neigh del");
        let entry = link.client_resolves(address, Duration::from_secs(3));
        let (lladdr, state) = entry.unwrap_or_else(|| panic!("{address}: no entry"));
        assert_eq!(lladdr, node_mac, "{address} resolved as {state}");
        assert_eq!(state, "REACHABLE", "{address}: a solicited answer");
    }

    // Not ours: the node's own address is answered by its kernel as before, others by nobody.
    let not_ours = counter(&link, "announce_not_ours");
    let own = link
        .arp(&socket, NODE, ANSWER)
        .expect("the kernel answers its own");
    assert_eq!(&own[6..12], &link.node_mac);
    let own6 = link
        .solicit(&socket, NODE6, ANSWER)
        .expect("the kernel answers its own IPv6 address");
    assert_eq!(&own6[6..12], &link.node_mac);
    assert_eq!(link.arp(&socket, NOBODY, SILENCE), None);
    assert!(counter(&link, "announce_not_ours") >= not_ours + 3);

    let metrics = link.metrics().unwrap();
    for address in gateways() {
        let line =
            format!("fulgur_announced_addresses{{address=\"{address}\",state=\"announcing\"}} 1");
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }
    let inspect = agent.inspect_text().expect("inspect");
    for expected in [
        "ANNOUNCED (ARP / NDP answered)".to_owned(),
        format!("  {GATEWAY}\n"),
        format!("  {GATEWAY6}\n"),
        format!("  {NODE_IFACE:<24}"),
        node_mac.clone(),
    ] {
        assert!(
            inspect.contains(&expected),
            "{expected:?} missing:\n{inspect}"
        );
    }

    // Removed: no longer answered, at once.
    link.apply(2, &[IpAddr::V6(GATEWAY6)], 0).expect("apply");
    assert_eq!(link.arp(&socket, GATEWAY, SILENCE), None, "removed IPv4");
    assert!(
        link.solicit(&socket, GATEWAY6, ANSWER).is_some(),
        "kept IPv6"
    );
    link.apply(3, &[], 0).expect("apply");
    assert_eq!(
        link.solicit(&socket, GATEWAY6, SILENCE),
        None,
        "removed IPv6"
    );
    drop(agent);
}

#[test]
fn announced_addresses_are_answered_and_announced_native() {
    announced_and_answered(XdpAttachMode::Native);
}

#[test]
fn announced_addresses_are_answered_and_announced_generic() {
    announced_and_answered(XdpAttachMode::Generic);
}

/// No RPC within announce_lease_ms: the node stops answering; a Get does not bring it back,
/// the next Apply does (with gratuitous ARP again). A killed agent's program stops answering
/// when its lease runs out; a restarted agent announces nothing until told again.
#[test]
fn an_expired_lease_stops_the_answers_until_the_next_apply() {
    let link = Link::new(XdpAttachMode::Generic).expect("link");
    let agent = start_agent(&link);
    let socket = link.client_socket().expect("client socket");
    link.apply(1, &gateways(), 600).expect("apply");
    assert!(link.arp(&socket, GATEWAY, ANSWER).is_some(), "announced");
    // Renewed in time by Get: still answered after twice the lease.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(200));
        link.get().expect("get");
    }
    assert!(link.arp(&socket, GATEWAY, ANSWER).is_some(), "renewed");
    assert!(link.solicit(&socket, GATEWAY6, ANSWER).is_some(), "renewed");

    // Silence beyond the lease (plus the 20 ms check period).
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(link.arp(&socket, GATEWAY, SILENCE), None, "lease expired");
    assert_eq!(
        link.solicit(&socket, GATEWAY6, SILENCE),
        None,
        "lease expired"
    );
    let got = link.get().expect("get");
    assert_eq!(got.features, ["announce", "remote-backends"]);
    assert!(
        got.state.unwrap().announce.is_empty(),
        "Get shows the lapse"
    );
    assert_eq!(
        link.arp(&socket, GATEWAY, SILENCE),
        None,
        "a Get does not revive"
    );
    let metrics = link.metrics().unwrap();
    let line =
        format!("fulgur_announced_addresses{{address=\"{GATEWAY}\",state=\"lease_expired\"}} 1");
    assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");

    // The next Apply announces again, gratuitous ARP included.
    let started = Instant::now();
    link.apply(2, &gateways(), 0).expect("apply");
    let garp = link.expected_gratuitous_arp(GATEWAY);
    let seen = socket.receive_until(started + Duration::from_secs(1), |f| f == garp, 1);
    assert_eq!(seen.len(), 1, "gratuitous ARP after the revival");
    assert!(link.arp(&socket, GATEWAY, ANSWER).is_some(), "revived");

    // A killed agent's pinned program answers only until the lease it was given runs out,
    // so an address the controller moves meanwhile is never answered by two nodes.
    link.apply(3, &gateways(), 300).expect("apply");
    let bpffs_dir = agent.kill_and_keep_pins();
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(
        link.arp(&socket, GATEWAY, SILENCE),
        None,
        "a dead agent's lease ran out"
    );
    assert_eq!(
        link.solicit(&socket, GATEWAY6, SILENCE),
        None,
        "a dead agent's lease ran out"
    );

    // A restarted agent does not answer for what the last one announced until told again.
    let restarted = AgentProcess::start_with(
        &link.node,
        NODE_IFACE,
        link.mode,
        Source::Grpc {
            listen: GRPC.parse().unwrap(),
            tls: None,
            metrics: Some(METRICS.parse().unwrap()),
        },
        bpffs_dir,
    )
    .expect("restarted agent");
    assert_eq!(link.arp(&socket, GATEWAY, SILENCE), None, "after a restart");
    assert!(
        counter(&link, "announce_lease_expired") >= 2,
        "the dead agent's program counted what it no longer answered"
    );
    link.apply(1, &gateways(), 0).expect("apply");
    assert!(link.arp(&socket, GATEWAY, ANSWER).is_some(), "told again");
    drop(restarted);
}
