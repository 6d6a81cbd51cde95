//! Table tests for Gateway API semantics: snapshots in, dataplane services and statuses out.
//! Each test names the rule (and the upstream conformance test, where there is one).

use std::{collections::BTreeMap, net::IpAddr};

use fulgur_controller::{
    model::*,
    translate::{Config, Output, node_services, translate},
};
use fulgur_proto::v1;

const CONTROLLER: &str = "fulgur.dev/gateway-controller";
const NOW: &str = "2026-11-27T12:00:00Z";

fn meta(created: &str) -> Meta {
    Meta {
        generation: 3,
        creation_timestamp: created.into(),
        labels: BTreeMap::new(),
    }
}

fn tcp(name: &str, port: u16) -> Listener {
    Listener {
        name: name.into(),
        port,
        protocol: "TCP".into(),
        from: FromNamespaces::Same,
        kinds: vec![],
    }
}

fn udp(name: &str, port: u16) -> Listener {
    Listener {
        protocol: "UDP".into(),
        ..tcp(name, port)
    }
}

fn gateway(name: &str, listeners: Vec<Listener>, address: &str) -> Gateway {
    Gateway {
        id: ObjectRef::new("gateway-conformance-infra", name),
        meta: meta("2026-01-01T00:00:00Z"),
        class_name: "fulgur".into(),
        listeners,
        addresses: vec![GatewayAddress {
            kind: "IPAddress".into(),
            value: Some(address.into()),
        }],
    }
}

fn parent(gateway: &str) -> ParentRef {
    ParentRef {
        group: "gateway.networking.k8s.io".into(),
        kind: "Gateway".into(),
        namespace: Some("gateway-conformance-infra".into()),
        name: gateway.into(),
        section_name: None,
        port: None,
    }
}

fn backend(name: &str, port: u16, weight: u32) -> BackendRef {
    BackendRef {
        group: String::new(),
        kind: "Service".into(),
        namespace: None,
        name: name.into(),
        port: Some(port),
        weight,
    }
}

fn route(
    kind: RouteKind,
    name: &str,
    created: &str,
    parents: Vec<ParentRef>,
    backends: Vec<BackendRef>,
) -> Route {
    Route {
        kind,
        id: ObjectRef::new("gateway-conformance-infra", name),
        meta: meta(created),
        parent_refs: parents,
        backend_refs: backends,
    }
}

/// A Service with port 8080 for TCP and for UDP (both → target 3000) and its ready endpoints.
fn service(namespace: &str, name: &str, endpoints: &[&str]) -> (Service, EndpointSlice) {
    (
        Service {
            id: ObjectRef::new(namespace, name),
            ports: vec![
                ServicePort {
                    name: Some("web".into()),
                    port: 8080,
                    protocol: "TCP".into(),
                },
                ServicePort {
                    name: Some("web-udp".into()),
                    port: 8080,
                    protocol: "UDP".into(),
                },
            ],
        },
        EndpointSlice {
            namespace: namespace.into(),
            service_name: name.into(),
            ports: vec![(Some("web".into()), 3000), (Some("web-udp".into()), 3000)],
            ready_addresses: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            nodes: Default::default(),
        },
    )
}

fn snapshot(
    gateways: Vec<Gateway>,
    routes: Vec<Route>,
    services: Vec<(Service, EndpointSlice)>,
) -> Snapshot {
    let (services, endpoint_slices) = services.into_iter().unzip();
    Snapshot {
        classes: vec![
            GatewayClass {
                name: "fulgur".into(),
                meta: meta(""),
                controller_name: CONTROLLER.into(),
            },
            GatewayClass {
                name: "other".into(),
                meta: meta(""),
                controller_name: "example.com/other".into(),
            },
        ],
        gateways,
        routes,
        services,
        endpoint_slices,
        ..Default::default()
    }
}

fn run(s: &Snapshot) -> Output {
    let pools: Vec<ipnet::IpNet> = vec!["192.0.2.128/30".parse().unwrap()];
    translate(
        &Config {
            controller_name: CONTROLLER,
            address_pools: &pools,
            now: NOW,
        },
        s,
    )
}

/// (type, status, reason) of a route's conditions for its first parent.
fn route_conditions(out: &Output, kind: RouteKind, name: &str) -> Vec<(String, bool, String)> {
    let status = &out.routes[&(kind, ObjectRef::new("gateway-conformance-infra", name))];
    status.parents[0]
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status, c.reason.clone()))
        .collect()
}

fn has(conditions: &[(String, bool, String)], type_: &str, status: bool, reason: &str) -> bool {
    conditions
        .iter()
        .any(|(t, s, r)| t == type_ && *s == status && r == reason)
}

fn listener_status<'a>(
    out: &'a Output,
    gateway: &str,
    listener: &str,
) -> &'a fulgur_controller::translate::ListenerStatus {
    out.gateways[&ObjectRef::new("gateway-conformance-infra", gateway)]
        .listeners
        .iter()
        .find(|l| l.name == listener)
        .unwrap()
}

fn backends(service: &v1::Service) -> Vec<(String, u32, u32)> {
    service
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.port, b.weight))
        .collect()
}

#[test]
fn gateway_class_is_accepted_with_sorted_features_and_others_are_ignored() {
    let out = run(&snapshot(vec![], vec![], vec![]));
    assert_eq!(out.classes.len(), 1);
    let class = &out.classes["fulgur"];
    assert!(
        class
            .conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && c.status)
    );
    let mut sorted = class.supported_features.clone();
    sorted.sort();
    assert_eq!(class.supported_features, sorted);
    assert!(class.supported_features.contains(&"TCPRoute".to_owned()));
}

#[test]
fn a_tcp_route_programs_the_service_through_the_endpoint_slice_target_port() {
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("svc", 8080, 1)],
        )],
        vec![service(
            "gateway-conformance-infra",
            "svc",
            &["203.0.113.2", "203.0.113.3", "2001:db8::9"],
        )],
    );
    let out = run(&s);
    assert_eq!(out.services.len(), 1);
    let svc = &out.services[0];
    assert_eq!(
        (svc.vip.as_str(), svc.port, svc.protocol),
        ("192.0.2.10", 80, v1::Protocol::Tcp as i32)
    );
    // Only the IPv4 endpoints, at the target port, equal weights.
    assert_eq!(
        backends(svc),
        vec![
            ("203.0.113.2".into(), 3000, 1_000_000),
            ("203.0.113.3".into(), 3000, 1_000_000)
        ]
    );
    assert_eq!(svc.reject_weight, 0);
    let c = route_conditions(&out, RouteKind::Tcp, "r");
    assert!(
        has(&c, "Accepted", true, "Accepted") && has(&c, "ResolvedRefs", true, "ResolvedRefs"),
        "{c:?}"
    );
    assert_eq!(listener_status(&out, "gw", "tcp").attached_routes, 1);
    let gw = &out.gateways[&ObjectRef::new("gateway-conformance-infra", "gw")];
    assert_eq!(gw.addresses, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
    assert!(
        gw.conditions
            .iter()
            .any(|c| c.type_ == "Programmed" && c.status)
    );
    // Every condition carries the object's generation.
    assert!(
        out.routes
            .values()
            .flat_map(|r| &r.parents)
            .flat_map(|p| &p.conditions)
            .all(|c| c.observed_generation == 3)
    );
}

#[test]
fn tcp_route_invalid_backend_ref_nonexistent() {
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("missing", 8080, 1)],
        )],
        vec![],
    );
    let out = run(&s);
    let c = route_conditions(&out, RouteKind::Tcp, "r");
    assert!(
        has(&c, "Accepted", true, "Accepted") && has(&c, "ResolvedRefs", false, "BackendNotFound"),
        "{c:?}"
    );
    // All of the weight is invalid: every connection is rejected.
    assert_eq!(out.services[0].backends.len(), 0);
    assert!(out.services[0].reject_weight > 0);
}

#[test]
fn cross_namespace_backends_need_a_reference_grant_and_lose_it_when_revoked() {
    let mut other = backend("svc", 8080, 1);
    other.namespace = Some("gateway-conformance-backend".into());
    let mut s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![other],
        )],
        vec![service(
            "gateway-conformance-backend",
            "svc",
            &["203.0.113.2"],
        )],
    );
    let out = run(&s);
    let c = route_conditions(&out, RouteKind::Tcp, "r");
    assert!(
        has(&c, "Accepted", true, "Accepted") && has(&c, "ResolvedRefs", false, "RefNotPermitted"),
        "{c:?}"
    );
    assert!(out.services[0].backends.is_empty());

    s.grants.push(ReferenceGrant {
        namespace: "gateway-conformance-backend".into(),
        from: vec![(
            "gateway.networking.k8s.io".into(),
            "TCPRoute".into(),
            "gateway-conformance-infra".into(),
        )],
        to: vec![(String::new(), "Service".into(), None)],
    });
    let out = run(&s);
    assert!(has(
        &route_conditions(&out, RouteKind::Tcp, "r"),
        "ResolvedRefs",
        true,
        "ResolvedRefs"
    ));
    assert_eq!(out.services[0].backends.len(), 1);

    s.grants.clear();
    let out = run(&s);
    assert!(has(
        &route_conditions(&out, RouteKind::Tcp, "r"),
        "ResolvedRefs",
        false,
        "RefNotPermitted"
    ));
    assert!(
        out.services[0].backends.is_empty(),
        "revoking the grant stops the traffic"
    );
}

#[test]
fn tcp_route_invalid_non_tcp_listener() {
    let http = Listener {
        protocol: "HTTP".into(),
        ..tcp("http", 8080)
    };
    let mut p = parent("gw");
    p.section_name = Some("http".into());
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80), http], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![p],
            vec![backend("svc", 8080, 1)],
        )],
        vec![service(
            "gateway-conformance-infra",
            "svc",
            &["203.0.113.2"],
        )],
    );
    let out = run(&s);
    assert!(has(
        &route_conditions(&out, RouteKind::Tcp, "r"),
        "Accepted",
        false,
        "NotAllowedByListeners"
    ));
    assert_eq!(listener_status(&out, "gw", "http").attached_routes, 0);
    assert_eq!(listener_status(&out, "gw", "tcp").attached_routes, 0);
    assert!(out.services.is_empty());
    let http_conditions = &listener_status(&out, "gw", "http").conditions;
    assert!(
        http_conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && !c.status && c.reason == "UnsupportedProtocol")
    );
}

#[test]
fn several_routes_on_a_listener_are_all_accepted_and_the_oldest_gets_the_traffic() {
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![
            route(
                RouteKind::Tcp,
                "newer",
                "2026-01-02T00:00:00Z",
                vec![parent("gw")],
                vec![backend("b", 8080, 1)],
            ),
            route(
                RouteKind::Tcp,
                "older",
                "2026-01-01T00:00:00Z",
                vec![parent("gw")],
                vec![backend("a", 8080, 1)],
            ),
        ],
        vec![
            service("gateway-conformance-infra", "a", &["203.0.113.2"]),
            service("gateway-conformance-infra", "b", &["203.0.113.3"]),
        ],
    );
    let out = run(&s);
    for name in ["newer", "older"] {
        assert!(has(
            &route_conditions(&out, RouteKind::Tcp, name),
            "Accepted",
            true,
            "Accepted"
        ));
    }
    assert_eq!(listener_status(&out, "gw", "tcp").attached_routes, 2);
    assert_eq!(backends(&out.services[0])[0].0, "203.0.113.2");

    // Equally old: namespace/name decides ("newer" < "older"), whatever the input order.
    let mut tie = s.clone();
    for r in &mut tie.routes {
        r.meta.creation_timestamp = "2026-01-01T00:00:00Z".into();
    }
    let out = run(&tie);
    assert_eq!(backends(&out.services[0])[0].0, "203.0.113.3");
    tie.routes.reverse();
    assert_eq!(backends(&run(&tie).services[0])[0].0, "203.0.113.3");
}

#[test]
fn parent_ref_attach_all_port_and_section_name() {
    let listeners = vec![
        tcp("one", 5001),
        tcp("two", 5002),
        tcp("three", 5003),
        tcp("four", 5004),
    ];
    let mut by_port = parent("gw");
    by_port.port = Some(5002);
    let mut by_section = parent("gw");
    by_section.section_name = Some("three".into());
    let mut by_both = parent("gw");
    by_both.section_name = Some("four".into());
    by_both.port = Some(5004);
    let mut wrong = parent("gw");
    wrong.port = Some(6000);
    let s = snapshot(
        vec![gateway("gw", listeners, "192.0.2.10")],
        vec![
            route(
                RouteKind::Tcp,
                "all",
                "2026-01-01T00:00:00Z",
                vec![parent("gw")],
                vec![backend("svc", 8080, 1)],
            ),
            route(
                RouteKind::Tcp,
                "picky",
                "2026-01-02T00:00:00Z",
                vec![by_port, by_section, by_both],
                vec![backend("svc", 8080, 1)],
            ),
            route(
                RouteKind::Tcp,
                "lost",
                "2026-01-03T00:00:00Z",
                vec![wrong],
                vec![backend("svc", 8080, 1)],
            ),
        ],
        vec![service(
            "gateway-conformance-infra",
            "svc",
            &["203.0.113.2"],
        )],
    );
    let out = run(&s);
    let ports: Vec<u32> = out.services.iter().map(|s| s.port).collect();
    assert_eq!(
        ports,
        [5001, 5002, 5003, 5004],
        "attach-all reaches every listener"
    );
    assert_eq!(listener_status(&out, "gw", "one").attached_routes, 1);
    for listener in ["two", "three", "four"] {
        assert_eq!(
            listener_status(&out, "gw", listener).attached_routes,
            2,
            "{listener}"
        );
    }
    let picky = &out.routes[&(
        RouteKind::Tcp,
        ObjectRef::new("gateway-conformance-infra", "picky"),
    )];
    assert!(picky.parents.iter().all(|p| {
        p.conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && c.status)
    }));
    assert!(has(
        &route_conditions(&out, RouteKind::Tcp, "lost"),
        "Accepted",
        false,
        "NoMatchingParent"
    ));
}

#[test]
fn weighted_routing_splits_by_weight_and_weight_zero_gets_nothing() {
    let s = snapshot(
        vec![gateway("gw", vec![udp("udp", 53)], "192.0.2.10")],
        vec![route(
            RouteKind::Udp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![
                backend("a", 8080, 70),
                backend("b", 8080, 30),
                backend("c", 8080, 0),
            ],
        )],
        vec![
            service(
                "gateway-conformance-infra",
                "a",
                &["203.0.113.2", "203.0.113.4"],
            ),
            service("gateway-conformance-infra", "b", &["203.0.113.3"]),
            service("gateway-conformance-infra", "c", &["203.0.113.5"]),
        ],
    );
    let out = run(&s);
    let svc = &out.services[0];
    assert_eq!(svc.protocol, v1::Protocol::Udp as i32);
    let weight = |a: &str| {
        svc.backends
            .iter()
            .find(|b| b.address == a)
            .map_or(0, |b| b.weight) as f64
    };
    let total = weight("203.0.113.2") + weight("203.0.113.4") + weight("203.0.113.3");
    assert!(((weight("203.0.113.2") + weight("203.0.113.4")) / total - 0.7).abs() < 1e-4);
    assert_eq!(weight("203.0.113.5"), 0.0, "weight 0 gets nothing");
    assert_eq!(svc.reject_weight, 0);
}

#[test]
fn invalid_weight_share_becomes_the_reject_weight() {
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("a", 8080, 20), backend("gone", 8080, 80)],
        )],
        vec![service("gateway-conformance-infra", "a", &["203.0.113.2"])],
    );
    let svc = &run(&s).services[0];
    let share = svc.reject_weight as f64 / (svc.reject_weight + svc.backends[0].weight) as f64;
    assert!((share - 0.8).abs() < 1e-4, "{share}");
}

#[test]
fn a_tcp_listener_sharing_a_port_with_http_is_conflicted() {
    let http = Listener {
        protocol: "HTTP".into(),
        ..tcp("http", 80)
    };
    let s = snapshot(
        vec![gateway(
            "gw",
            vec![tcp("tcp", 80), http, udp("udp", 80)],
            "192.0.2.10",
        )],
        vec![],
        vec![],
    );
    let out = run(&s);
    let tcp_conditions = &listener_status(&out, "gw", "tcp").conditions;
    assert!(
        tcp_conditions
            .iter()
            .any(|c| c.type_ == "Conflicted" && c.status && c.reason == "ProtocolConflict")
    );
    let udp_conditions = &listener_status(&out, "gw", "udp").conditions;
    assert!(
        udp_conditions
            .iter()
            .any(|c| c.type_ == "Conflicted" && !c.status),
        "TCP and UDP may share a port"
    );
    let gw = &out.gateways[&ObjectRef::new("gateway-conformance-infra", "gw")];
    assert!(
        gw.conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && c.reason == "ListenersNotValid")
    );
}

#[test]
fn allowed_routes_same_all_and_selector() {
    let mut all = tcp("all", 81);
    all.from = FromNamespaces::All;
    let mut selected = tcp("selected", 82);
    selected.from = FromNamespaces::Selector(LabelSelector {
        match_labels: [("team".to_owned(), "blue".to_owned())].into(),
        match_expressions: vec![],
    });
    let mut expressions = tcp("expressions", 83);
    expressions.from = FromNamespaces::Selector(LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![
            LabelRequirement::In("team".into(), ["blue".into(), "red".into()].into()),
            LabelRequirement::DoesNotExist("frozen".into()),
        ],
    });
    let mut elsewhere = route(
        RouteKind::Tcp,
        "r",
        "2026-01-01T00:00:00Z",
        vec![parent("gw")],
        vec![backend("svc", 8080, 1)],
    );
    elsewhere.id.namespace = "blue".into();
    let mut s = snapshot(
        vec![gateway(
            "gw",
            vec![tcp("same", 80), all, selected, expressions],
            "192.0.2.10",
        )],
        vec![elsewhere],
        vec![service("blue", "svc", &["203.0.113.2"])],
    );
    s.namespaces.insert(
        "blue".into(),
        [("team".to_owned(), "blue".to_owned())].into(),
    );
    let out = run(&s);
    assert_eq!(listener_status(&out, "gw", "same").attached_routes, 0);
    assert_eq!(listener_status(&out, "gw", "all").attached_routes, 1);
    assert_eq!(listener_status(&out, "gw", "selected").attached_routes, 1);
    assert_eq!(
        listener_status(&out, "gw", "expressions").attached_routes,
        1
    );
    s.namespaces
        .get_mut("blue")
        .unwrap()
        .insert("frozen".into(), "yes".into());
    let out = run(&s);
    assert_eq!(listener_status(&out, "gw", "selected").attached_routes, 1);
    assert_eq!(
        listener_status(&out, "gw", "expressions").attached_routes,
        0,
        "DoesNotExist fails"
    );
    s.namespaces.insert("blue".into(), BTreeMap::new());
    let out = run(&s);
    assert_eq!(
        listener_status(&out, "gw", "selected").attached_routes,
        0,
        "labels no longer match"
    );
}

#[test]
fn addresses_static_pooled_stable_and_unsupported() {
    let mut pooled = gateway("pooled", vec![tcp("tcp", 80)], "");
    pooled.addresses.clear();
    let mut named = gateway("named", vec![tcp("tcp", 80)], "");
    named.addresses = vec![GatewayAddress {
        kind: "Hostname".into(),
        value: Some("lb.example".into()),
    }];
    let mut s = snapshot(vec![pooled.clone(), named], vec![], vec![]);
    let out = run(&s);
    let first = out.gateways[&pooled.id].addresses.clone();
    assert_eq!(first.len(), 1);
    assert!(first[0].to_string().starts_with("192.0.2.12"), "{first:?}");
    let named_status = &out.gateways[&ObjectRef::new("gateway-conformance-infra", "named")];
    assert!(
        named_status
            .conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && !c.status && c.reason == "UnsupportedAddress")
    );

    // The assignment survives a restart (read back from status), even when another Gateway
    // that sorts first appears.
    s.previous_addresses
        .insert(pooled.id.clone(), first.clone());
    let mut early = pooled.clone();
    early.id.name = "aaa".into();
    s.gateways.push(early);
    let out = run(&s);
    assert_eq!(out.gateways[&pooled.id].addresses, first);

    // An exhausted pool: Programmed=False, AddressNotAssigned.
    for i in 0..3 {
        let mut more = pooled.clone();
        more.id.name = format!("more-{i}");
        s.gateways.push(more);
    }
    let out = run(&s);
    assert!(out.gateways.values().any(|g| {
        g.conditions
            .iter()
            .any(|c| c.reason == "AddressNotAssigned")
    }));
}

#[test]
fn last_transition_time_changes_only_with_the_condition() {
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("missing", 8080, 1)],
        )],
        vec![],
    );
    let pools: Vec<ipnet::IpNet> = vec![];
    let out = translate(
        &Config {
            controller_name: CONTROLLER,
            address_pools: &pools,
            now: "T1",
        },
        &s,
    );
    let key = fulgur_controller::translate::route_key(
        RouteKind::Tcp,
        &s.routes[0].id,
        &s.routes[0].parent_refs[0],
    );
    let mut again = s.clone();
    again.previous_conditions.insert(
        key.clone(),
        out.routes.values().next().unwrap().parents[0]
            .conditions
            .clone(),
    );
    let out = translate(
        &Config {
            controller_name: CONTROLLER,
            address_pools: &pools,
            now: "T2",
        },
        &again,
    );
    let times: BTreeMap<String, String> = out.routes.values().next().unwrap().parents[0]
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.last_transition_time.clone()))
        .collect();
    assert_eq!(times["Accepted"], "T1");
    assert_eq!(times["ResolvedRefs"], "T1");
    // The backend appears: ResolvedRefs changes, and only it gets the new time.
    let (svc, slice) = service("gateway-conformance-infra", "missing", &["203.0.113.2"]);
    again.services.push(svc);
    again.endpoint_slices.push(slice);
    let out = translate(
        &Config {
            controller_name: CONTROLLER,
            address_pools: &pools,
            now: "T3",
        },
        &again,
    );
    let times: BTreeMap<String, String> = out.routes.values().next().unwrap().parents[0]
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.last_transition_time.clone()))
        .collect();
    assert_eq!(
        (times["Accepted"].as_str(), times["ResolvedRefs"].as_str()),
        ("T1", "T3")
    );
}

#[test]
fn an_ipv6_gateway_address_gets_the_ipv6_endpoints() {
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "2001:db8:ffff::10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("svc", 8080, 1)],
        )],
        vec![service(
            "gateway-conformance-infra",
            "svc",
            &["203.0.113.2", "2001:db8::9"],
        )],
    );
    let out = run(&s);
    assert_eq!(
        backends(&out.services[0]),
        vec![("2001:db8::9".into(), 3000, 1_000_000)]
    );
}

#[test]
fn udp_routes_follow_the_same_rules() {
    // UDPRoute counterparts: nonexistent backend, cross-namespace without a grant, several routes
    // on one listener, and a UDPRoute never attaches to a TCP listener.
    let mut cross = backend("svc", 8080, 1);
    cross.namespace = Some("elsewhere".into());
    let s = snapshot(
        vec![gateway(
            "gw",
            vec![udp("udp", 53), tcp("tcp", 54)],
            "192.0.2.10",
        )],
        vec![
            route(
                RouteKind::Udp,
                "missing",
                "2026-01-01T00:00:00Z",
                vec![parent("gw")],
                vec![backend("gone", 8080, 1)],
            ),
            route(
                RouteKind::Udp,
                "cross",
                "2026-01-02T00:00:00Z",
                vec![parent("gw")],
                vec![cross],
            ),
        ],
        vec![service("elsewhere", "svc", &["203.0.113.2"])],
    );
    let out = run(&s);
    let missing = route_conditions(&out, RouteKind::Udp, "missing");
    assert!(
        has(&missing, "Accepted", true, "Accepted")
            && has(&missing, "ResolvedRefs", false, "BackendNotFound"),
        "{missing:?}"
    );
    let cross = route_conditions(&out, RouteKind::Udp, "cross");
    assert!(
        has(&cross, "ResolvedRefs", false, "RefNotPermitted"),
        "{cross:?}"
    );
    assert_eq!(listener_status(&out, "gw", "udp").attached_routes, 2);
    assert_eq!(
        listener_status(&out, "gw", "tcp").attached_routes,
        0,
        "a UDPRoute does not attach to TCP"
    );
    // Only the older route programs the listener: everything rejected (its backend is missing).
    assert_eq!(out.services.len(), 1);
    assert_eq!(out.services[0].protocol, v1::Protocol::Udp as i32);
    assert!(out.services[0].backends.is_empty() && out.services[0].reject_weight > 0);
}

#[test]
fn a_static_address_belongs_to_the_oldest_gateway_that_lists_it() {
    let older = gateway("older", vec![tcp("tcp", 80)], "192.0.2.10");
    let mut newer = gateway("newer", vec![tcp("tcp", 80)], "192.0.2.10");
    newer.meta.creation_timestamp = "2026-02-01T00:00:00Z".into();
    let mut to_newer = parent("newer");
    to_newer.name = "newer".into();
    let s = snapshot(
        vec![newer.clone(), older.clone()],
        vec![
            route(
                RouteKind::Tcp,
                "a",
                "2026-01-01T00:00:00Z",
                vec![parent("older")],
                vec![backend("svc", 8080, 1)],
            ),
            route(
                RouteKind::Tcp,
                "b",
                "2026-01-01T00:00:00Z",
                vec![to_newer],
                vec![backend("svc", 8080, 1)],
            ),
        ],
        vec![service(
            "gateway-conformance-infra",
            "svc",
            &["203.0.113.2"],
        )],
    );
    let out = run(&s);
    assert_eq!(
        out.services.len(),
        1,
        "one VIP:port programmed once: {:?}",
        out.services
    );
    let newer_status = &out.gateways[&newer.id];
    assert!(newer_status.addresses.is_empty());
    assert!(
        newer_status
            .conditions
            .iter()
            .any(|c| c.type_ == "Programmed" && !c.status && c.reason == "AddressNotUsable"),
        "{:?}",
        newer_status.conditions
    );
    let older_status = &out.gateways[&older.id];
    assert_eq!(
        older_status.addresses,
        vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn unsupported_route_kinds_on_a_listener_and_backend_kinds() {
    let mut kinds = tcp("kinds", 80);
    kinds.kinds = vec![RouteGroupKind {
        group: "gateway.networking.k8s.io".into(),
        kind: "HTTPRoute".into(),
    }];
    let mut not_a_service = backend("svc", 8080, 1);
    not_a_service.kind = "ConfigMap".into();
    let s = snapshot(
        vec![gateway("gw", vec![kinds, tcp("tcp", 81)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![not_a_service],
        )],
        vec![service(
            "gateway-conformance-infra",
            "svc",
            &["203.0.113.2"],
        )],
    );
    let out = run(&s);
    let listener = listener_status(&out, "gw", "kinds");
    assert!(
        listener
            .conditions
            .iter()
            .any(|c| c.type_ == "ResolvedRefs" && !c.status && c.reason == "InvalidRouteKinds"),
        "{:?}",
        listener.conditions
    );
    let conditions = route_conditions(&out, RouteKind::Tcp, "r");
    assert!(
        has(&conditions, "ResolvedRefs", false, "InvalidKind"),
        "{conditions:?}"
    );
    // Attached through the valid listener only; the whole weight is rejected.
    assert_eq!(listener_status(&out, "gw", "tcp").attached_routes, 1);
    let service = out.services.iter().find(|s| s.port == 81).unwrap();
    assert!(service.backends.is_empty() && service.reject_weight > 0);
}

/// Gateway `gw`'s Programmed condition after a translate: (status, reason, message).
fn programmed(s: &Snapshot) -> (bool, String, String) {
    let out = run(s);
    let c = out.gateways[&ObjectRef::new("gateway-conformance-infra", "gw")]
        .conditions
        .iter()
        .find(|c| c.type_ == "Programmed")
        .cloned()
        .unwrap();
    (c.status, c.reason, c.message)
}

#[test]
fn programmed_follows_what_the_agents_report() {
    let mut s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![],
        vec![],
    );
    assert_eq!(programmed(&s), (true, "Programmed".into(), String::new()));
    s.dataplane = Dataplane::Pending("no agents found".into());
    assert_eq!(
        programmed(&s),
        (false, "Pending".into(), "no agents found".into())
    );
    s.dataplane = Dataplane::NoResources("11 services needed, capacity is 10".into());
    assert_eq!(programmed(&s).1, "NoResources");
    s.dataplane = Dataplane::Invalid("services[0].port: 0".into());
    assert_eq!(programmed(&s).1, "Invalid");
}

#[test]
fn a_route_needs_a_service_port_of_its_protocol() {
    let (mut tcp_only, slice) = service("gateway-conformance-infra", "svc", &["203.0.113.2"]);
    tcp_only.ports.retain(|p| p.protocol == "TCP");
    let s = snapshot(
        vec![gateway("gw", vec![udp("udp", 53)], "192.0.2.10")],
        vec![route(
            RouteKind::Udp,
            "dns",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("svc", 8080, 1)],
        )],
        vec![(tcp_only, slice)],
    );
    let out = run(&s);
    let conditions = route_conditions(&out, RouteKind::Udp, "dns");
    assert!(
        has(&conditions, "Accepted", true, "Accepted"),
        "{conditions:?}"
    );
    assert!(
        has(&conditions, "ResolvedRefs", false, "UnsupportedProtocol"),
        "{conditions:?}"
    );
    assert!(out.services[0].backends.is_empty() && out.services[0].reject_weight > 0);
}

/// A Service and EndpointSlice as the API server returns them: an unnamed port, for which the
/// EndpointSlice controller writes `name: ""` (parsed, then converted as both providers do).
fn kubernetes_shaped(endpoints: &str) -> (Service, EndpointSlice) {
    kubernetes_service("web", endpoints)
}

/// As [`kubernetes_shaped`], for the Service `name`.
fn kubernetes_service(name: &str, endpoints: &str) -> (Service, EndpointSlice) {
    use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
    let service: core::Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "gateway-conformance-infra", "uid": "1"},
        "spec": {
            "clusterIP": "198.51.100.200", "type": "ClusterIP", "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [{"port": 8080, "protocol": "TCP", "targetPort": 3000}],
        },
        "status": {"loadBalancer": {}},
    }))
    .unwrap();
    let slice: discovery::EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-x7k2p"), "generateName": format!("{name}-"),
            "namespace": "gateway-conformance-infra",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": name,
            },
        },
        "addressType": "IPv4",
        "endpoints": serde_json::from_str::<serde_json::Value>(endpoints).unwrap(),
        "ports": [{"name": "", "port": 3000, "protocol": "TCP"}],
    }))
    .unwrap();
    (
        fulgur_controller::convert::service(&service),
        fulgur_controller::convert::endpoint_slice(&slice)
            .unwrap()
            .unwrap(),
    )
}

#[test]
fn an_unnamed_service_port_matches_the_slice_port_named_empty() {
    let endpoints = r#"[
        {"addresses": ["203.0.113.2"], "nodeName": "kind-worker", "zone": "a",
         "conditions": {"ready": true, "serving": true, "terminating": false},
         "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "gateway-conformance-infra"}},
        {"addresses": ["203.0.113.3"], "nodeName": "kind-worker2",
         "conditions": {"ready": false, "serving": true, "terminating": true}}
    ]"#;
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "web",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("web", 8080, 1)],
        )],
        vec![kubernetes_shaped(endpoints)],
    );
    let out = run(&s);
    assert_eq!(
        backends(&out.services[0]),
        [("203.0.113.2".to_owned(), 3000, 1_000_000)]
    );
    assert_eq!(out.services[0].reject_weight, 0);
    let conditions = route_conditions(&out, RouteKind::Tcp, "web");
    assert!(has(&conditions, "ResolvedRefs", true, "ResolvedRefs"));
}

#[test]
fn a_service_without_ready_endpoints_rejects_and_says_so() {
    // ResolvedRefs stays True (the reference is valid) while the dataplane rejects: the
    // backendRef state tells the two apart.
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "web",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("web", 8080, 1), backend("missing", 8080, 1)],
        )],
        vec![kubernetes_shaped("[]")],
    );
    let out = run(&s);
    assert!(out.services[0].backends.is_empty());
    let states: Vec<_> = out
        .backend_refs
        .iter()
        .map(|(k, s)| (k.service.name.as_str(), *s))
        .collect();
    use fulgur_controller::translate::BackendRefState;
    assert_eq!(
        states,
        [
            ("missing", BackendRefState::Invalid),
            ("web", BackendRefState::NoEndpoints)
        ]
    );
}

#[test]
fn an_ip_address_without_a_value_asks_the_pool() {
    // Gateway API v1.6: `{type: IPAddress}` with no value means "any address".
    let mut gw = gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10");
    gw.addresses.push(GatewayAddress {
        kind: "IPAddress".into(),
        value: None,
    });
    let s = snapshot(vec![gw.clone()], vec![], vec![]);
    let out = run(&s);
    let status = &out.gateways[&gw.id];
    let addresses: Vec<String> = status.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(addresses, ["192.0.2.10", "192.0.2.129"]);
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.status && c.reason != "UnsupportedAddress"),
        "{:?}",
        status.conditions
    );

    // Without pools it cannot be given one: AddressNotAssigned, saying why.
    let out = translate(
        &Config {
            controller_name: CONTROLLER,
            address_pools: &[],
            now: NOW,
        },
        &s,
    );
    let programmed = out.gateways[&gw.id]
        .conditions
        .iter()
        .find(|c| c.type_ == "Programmed")
        .unwrap();
    assert_eq!(
        (programmed.status, programmed.reason.as_str()),
        (false, "AddressNotAssigned")
    );
    assert!(programmed.message.contains("--address-pool"));
}

#[test]
fn programmed_needs_an_in_sync_announcer_for_each_address() {
    let mut s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![],
        vec![],
    );
    let address: IpAddr = "192.0.2.10".parse().unwrap();
    assert_eq!(
        run(&s).announce,
        [address].into(),
        "the served address is to be announced"
    );
    let with = |a: Announcement| Announcements::Checked([(address, a)].into());
    s.announcements = Announcements::Checked(BTreeMap::new());
    assert_eq!(
        programmed(&s),
        (
            false,
            "Pending".into(),
            "192.0.2.10 is not assigned to an agent yet".into()
        )
    );
    s.announcements = with(Announcement::NoAnnouncer(
        "no in-sync agent can announce it (n1: its agent does not list the \"announce\" feature)"
            .into(),
    ));
    let (status, reason, message) = programmed(&s);
    assert_eq!((status, reason.as_str()), (false, "NoAnnouncer"));
    assert!(
        message.starts_with("192.0.2.10: no in-sync agent"),
        "{message}"
    );
    s.announcements = with(Announcement::Assigned { node: "n1".into() });
    assert_eq!(
        programmed(&s),
        (
            false,
            "Pending".into(),
            "192.0.2.10 is given to the agent on node n1, not applied yet".into()
        )
    );
    s.announcements = with(Announcement::FailingOver { node: "n1".into() });
    let (status, reason, message) = programmed(&s);
    assert_eq!((status, reason.as_str()), (false, "FailingOver"));
    assert!(message.contains("node n1"), "{message}");
    s.announcements = with(Announcement::Announced { node: "n2".into() });
    assert_eq!(
        programmed(&s),
        (
            true,
            "Programmed".into(),
            "announced: 192.0.2.10 by node n2".into()
        )
    );
    // The agents' refusal still comes first.
    s.dataplane = Dataplane::Invalid("services[0].port: 0".into());
    assert_eq!(programmed(&s).1, "Invalid");
}

#[test]
fn each_node_gets_its_backends_marked_local_or_remote() {
    let (svc, mut slice) = service(
        "gateway-conformance-infra",
        "svc",
        &["203.0.113.1", "203.0.113.2", "203.0.113.3"],
    );
    slice.nodes = [
        ("203.0.113.1".parse().unwrap(), "n1".to_owned()),
        ("203.0.113.2".parse().unwrap(), "n2".to_owned()),
    ]
    .into();
    let s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route(
            RouteKind::Tcp,
            "r",
            "2026-01-01T00:00:00Z",
            vec![parent("gw")],
            vec![backend("svc", 8080, 1)],
        )],
        vec![(svc, slice)],
    );
    let out = run(&s);
    assert_eq!(out.endpoint_nodes.len(), 2);
    let marks = |services: &[v1::Service]| -> Vec<(String, bool)> {
        services[0]
            .backends
            .iter()
            .map(|b| (b.address.clone(), b.remote))
            .collect()
    };
    let on = |node: &str, remote_backends: bool| {
        node_services(
            &out.services,
            &out.endpoint_nodes,
            Some(node),
            remote_backends,
        )
    };
    // 203.0.113.3 has no nodeName: local everywhere.
    assert_eq!(
        marks(&on("n1", true)),
        [
            ("203.0.113.1".into(), false),
            ("203.0.113.2".into(), true),
            ("203.0.113.3".into(), false)
        ]
    );
    assert_eq!(
        marks(&on("n2", true)),
        [
            ("203.0.113.1".into(), true),
            ("203.0.113.2".into(), false),
            ("203.0.113.3".into(), false)
        ]
    );
    // An older agent (no "remote-backends") gets only what it can reach without SNAT.
    assert_eq!(
        marks(&on("n1", false)),
        [("203.0.113.1".into(), false), ("203.0.113.3".into(), false)]
    );
    assert_eq!(on("n1", false)[0].reject_weight, 0);
    // Everything remote: it rejects rather than forward without SNAT.
    let mut only_n2 = out.clone();
    only_n2.services[0]
        .backends
        .retain(|b| b.address == "203.0.113.2");
    let old = node_services(&only_n2.services, &out.endpoint_nodes, Some("n1"), false);
    assert!(old[0].backends.is_empty());
    assert!(old[0].reject_weight > 0, "{old:?}");
    // An agent of unknown node (a bare --agent URL): everything local, as before.
    let unknown = node_services(&out.services, &out.endpoint_nodes, None, true);
    assert!(unknown[0].backends.iter().all(|b| !b.remote), "{unknown:?}");
    assert_eq!(unknown[0].backends.len(), 3);
}

/// A ready endpoint as the EndpointSlice controller writes it, on `node`.
fn endpoint_on(address: &str, node: &str) -> String {
    format!(
        r#"{{"addresses": ["{address}"], "nodeName": "{node}", "zone": "a",
            "conditions": {{"ready": true, "serving": true, "terminating": false}},
            "targetRef": {{"kind": "Pod", "name": "pod-{address}", "namespace": "gateway-conformance-infra"}}}}"#
    )
}

/// The `EveryNodeReachesBackends` condition of a route's first parent: (reason, message).
fn every_node_reaches(out: &Output, name: &str) -> Option<(String, String)> {
    let status = &out.routes[&(
        RouteKind::Tcp,
        ObjectRef::new("gateway-conformance-infra", name),
    )];
    let conditions = &status.parents[0].conditions;
    let found: Vec<_> = conditions
        .iter()
        .filter(|c| c.type_ == "EveryNodeReachesBackends")
        .collect();
    assert!(found.len() <= 1, "{conditions:?}");
    found.first().map(|c| {
        assert!(!c.status, "only ever set False: {c:?}");
        assert_eq!(c.observed_generation, 3);
        (c.reason.clone(), c.message.clone())
    })
}

#[test]
fn nodes_that_leave_remote_backends_out_are_named_on_the_route() {
    // web-a's pod runs on n1, web-b's on n2; the route splits 3:1.
    let route_ab = route(
        RouteKind::Tcp,
        "split",
        "2026-01-01T00:00:00Z",
        vec![parent("gw")],
        vec![backend("web-a", 8080, 3), backend("web-b", 8080, 1)],
    );
    let mut s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![route_ab],
        vec![
            kubernetes_service("web-a", &format!("[{}]", endpoint_on("203.0.113.2", "n1"))),
            kubernetes_service("web-b", &format!("[{}]", endpoint_on("203.0.113.3", "n2"))),
        ],
    );
    // Agents that carry remote backends (or whose node is not known): nothing to say.
    assert_eq!(every_node_reaches(&run(&s), "split"), None);

    // n1's agent has no "remote-backends": it forwards only to web-a.
    s.local_only_nodes = ["n1".to_owned()].into();
    let out = run(&s);
    let (reason, message) = every_node_reaches(&out, "split").expect("n1 is named");
    assert_eq!(reason, "LocalEndpointsOnly");
    assert!(
        message.starts_with(
            "on node n1 only local endpoints get new flows, so the backendRefs' weights do not \
             hold there. Their agents leave backends on other nodes out"
        ),
        "{message}"
    );
    // The dataplane agrees: n1 would get web-a alone, n2 both.
    let n1 = node_services(&out.services, &out.endpoint_nodes, Some("n1"), false);
    assert_eq!(n1[0].backends.len(), 1);
    // Accepted and ResolvedRefs are untouched.
    let conditions = route_conditions(&out, RouteKind::Tcp, "split");
    assert!(has(&conditions, "Accepted", true, "Accepted"));
    assert!(has(&conditions, "ResolvedRefs", true, "ResolvedRefs"));

    // Both nodes without: each serves one Service only; named in order.
    s.local_only_nodes = ["n1".to_owned(), "n2".to_owned()].into();
    let (reason, message) = every_node_reaches(&run(&s), "split").unwrap();
    assert_eq!(reason, "LocalEndpointsOnly");
    assert!(
        message.starts_with("on nodes n1, n2 only local"),
        "{message}"
    );

    // A node that runs none of the endpoints rejects every new flow: the worse reason wins,
    // and the announcing node says so.
    s.local_only_nodes = ["n1".to_owned(), "n3".to_owned()].into();
    let address: IpAddr = "192.0.2.10".parse().unwrap();
    s.announcements =
        Announcements::Checked([(address, Announcement::Announced { node: "n3".into() })].into());
    let (reason, message) = every_node_reaches(&run(&s), "split").unwrap();
    assert_eq!(reason, "NoLocalEndpoints");
    assert!(
        message.starts_with(
            "new flows are rejected on node n3 (announcing 192.0.2.10): no endpoint of the \
             backendRefs runs there; on node n1 only local endpoints"
        ),
        "{message}"
    );
    assert!(
        message.ends_with(
            "they do not list the \"remote-backends\" feature (no SNAT: an older agent, or \
             --snat never)"
        ),
        "{message}"
    );
    // The Gateway stays Programmed (its address is announced); the route carries the news.
    assert!(programmed(&s).0);
}

#[test]
fn weights_that_hold_on_every_node_say_nothing() {
    // One Service with a pod on each node: each local-only node keeps half of its endpoints,
    // so there is no split to lose (only fewer pods).
    let endpoints = format!(
        "[{}, {}]",
        endpoint_on("203.0.113.2", "n1"),
        endpoint_on("203.0.113.3", "n2")
    );
    let one_ref = route(
        RouteKind::Tcp,
        "web",
        "2026-01-01T00:00:00Z",
        vec![parent("gw")],
        vec![backend("web", 8080, 1)],
    );
    let mut s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![one_ref.clone()],
        vec![kubernetes_shaped(&endpoints)],
    );
    s.local_only_nodes = ["n1".to_owned(), "n2".to_owned()].into();
    assert_eq!(every_node_reaches(&run(&s), "web"), None);

    // Two Services, each with a pod on both nodes: every ref keeps the same fraction.
    let two_refs = route(
        RouteKind::Tcp,
        "split",
        "2026-01-01T00:00:00Z",
        vec![parent("gw")],
        vec![backend("web", 8080, 3), backend("web-b", 8080, 1)],
    );
    let endpoints_b = format!(
        "[{}, {}]",
        endpoint_on("203.0.113.4", "n1"),
        endpoint_on("203.0.113.5", "n2")
    );
    s.routes = vec![two_refs];
    s.services.push(kubernetes_service("web-b", &endpoints_b).0);
    s.endpoint_slices
        .push(kubernetes_service("web-b", &endpoints_b).1);
    assert_eq!(every_node_reaches(&run(&s), "split"), None);

    // Next to a reject weight (a missing Service) losing endpoints changes the rejected share.
    s.routes[0].backend_refs.push(backend("missing", 8080, 1));
    let (reason, _) = every_node_reaches(&run(&s), "split").expect("the reject share grows");
    assert_eq!(reason, "LocalEndpointsOnly");

    // Endpoints without nodeName are local everywhere.
    let mut s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![one_ref],
        vec![service(
            "gateway-conformance-infra",
            "web",
            &["203.0.113.2"],
        )],
    );
    s.local_only_nodes = ["n1".to_owned()].into();
    assert_eq!(every_node_reaches(&run(&s), "web"), None);
}

#[test]
fn only_the_route_that_gets_the_traffic_is_named() {
    // Two routes on one listener: the older one carries the traffic, so only it can be
    // served otherwise than it says.
    let endpoints = format!("[{}]", endpoint_on("203.0.113.2", "n2"));
    let mut s = snapshot(
        vec![gateway("gw", vec![tcp("tcp", 80)], "192.0.2.10")],
        vec![
            route(
                RouteKind::Tcp,
                "older",
                "2026-01-01T00:00:00Z",
                vec![parent("gw")],
                vec![backend("web", 8080, 1)],
            ),
            route(
                RouteKind::Tcp,
                "newer",
                "2026-02-01T00:00:00Z",
                vec![parent("gw")],
                vec![backend("web", 8080, 1)],
            ),
        ],
        vec![kubernetes_shaped(&endpoints)],
    );
    s.local_only_nodes = ["n1".to_owned()].into();
    let out = run(&s);
    let (reason, message) = every_node_reaches(&out, "older").unwrap();
    assert_eq!(reason, "NoLocalEndpoints");
    assert!(
        message.starts_with("new flows are rejected on node n1:"),
        "{message}"
    );
    assert_eq!(every_node_reaches(&out, "newer"), None);
    // What the dataplane does on n1: no backend, every new flow rejected.
    let n1 = node_services(&out.services, &out.endpoint_nodes, Some("n1"), false);
    assert!(
        n1[0].backends.is_empty() && n1[0].reject_weight > 0,
        "{n1:?}"
    );
    // The condition keeps its lastTransitionTime while it holds.
    let previous = out.routes[&(
        RouteKind::Tcp,
        ObjectRef::new("gateway-conformance-infra", "older"),
    )]
        .parents[0]
        .conditions
        .clone();
    s.previous_conditions.insert(
        fulgur_controller::translate::route_key(
            RouteKind::Tcp,
            &ObjectRef::new("gateway-conformance-infra", "older"),
            &parent("gw"),
        ),
        previous
            .into_iter()
            .map(|c| Condition {
                last_transition_time: "2026-01-02T00:00:00Z".into(),
                ..c
            })
            .collect(),
    );
    let again = run(&s);
    let kept = again.routes[&(
        RouteKind::Tcp,
        ObjectRef::new("gateway-conformance-infra", "older"),
    )]
        .parents[0]
        .conditions
        .iter()
        .find(|c| c.type_ == "EveryNodeReachesBackends")
        .unwrap()
        .last_transition_time
        .clone();
    assert_eq!(kept, "2026-01-02T00:00:00Z");
}
