//! The 17 tests of the v1.6.1 GATEWAY-TCP and GATEWAY-UDP profiles, each with our own manifests
//! under the upstream object names, status checks as upstream makes them, and real traffic.
//! This list is the one source of the runner, the report and the README's table.

use super::{
    Ctx, INFRA_NS, Profile, Proto, Scenario, WEB_BACKEND_NS,
    manifests::{Listener, backend, gateway, listener, parent, reference_grant, route, service},
    pods::{DNS_ANSWER, DNS_NAME, DNS_PORT, PodSpec, Serves, TCP_PORT, UDP_PORT},
};

const TCP: &[&str] = &["Gateway", "TCPRoute"];
const TCP_GRANT: &[&str] = &["Gateway", "TCPRoute", "ReferenceGrant"];
const UDP: &[&str] = &["Gateway", "UDPRoute"];
const UDP_GRANT: &[&str] = &["Gateway", "UDPRoute", "ReferenceGrant"];

/// The pods every scenario may use, by namespace and Deployment name.
pub fn pods() -> Vec<PodSpec> {
    let mut pods = Vec::new();
    for proto in ["tcp", "udp"] {
        for name in [
            "backend-v1",
            "backend-v2",
            "backend-v3",
            "echo-one",
            "echo-two",
            "echo-three",
            "echo-attach-all",
            "backend-older",
            "backend-newer",
        ] {
            pods.push(PodSpec::echo(INFRA_NS, &format!("{proto}-{name}")));
        }
        pods.push(PodSpec::echo(
            WEB_BACKEND_NS,
            &format!("{proto}-reference-grant-backend"),
        ));
    }
    pods.push(PodSpec::echo(WEB_BACKEND_NS, "web-backend"));
    pods.push(PodSpec::echo(super::APP_BACKEND_NS, "app-backend-v1"));
    pods.push(PodSpec {
        namespace: INFRA_NS.into(),
        deployment: "coredns".into(),
        service: "coredns".into(),
        serves: Serves::Dns,
    });
    pods
}

pub fn all() -> &'static [Scenario] {
    &SCENARIOS
}

static SCENARIOS: [Scenario; 17] = [
    Scenario {
        name: "TCPRouteInvalidBackendRefNonexistent",
        profile: Profile::Tcp,
        provisional: true,
        features: TCP,
        checks: "ResolvedRefs=False/BackendNotFound; new connections refused",
        run: |ctx| invalid_backend_nonexistent(ctx, L4::TCP),
    },
    Scenario {
        name: "TCPRouteInvalidCrossNamespaceBackendRef",
        profile: Profile::Tcp,
        provisional: true,
        features: TCP_GRANT,
        checks: "Gateway and route Accepted, ResolvedRefs=False/RefNotPermitted; new connections refused",
        run: |ctx| invalid_cross_namespace(ctx, L4::TCP),
    },
    Scenario {
        name: "TCPRouteInvalidNonTCPListener",
        profile: Profile::Tcp,
        provisional: true,
        features: TCP,
        checks: "sectionName of an HTTP listener: Accepted=False/NotAllowedByListeners; 0 attachedRoutes on every listener",
        run: invalid_non_tcp_listener,
    },
    Scenario {
        name: "TCPRouteMultipleRoutesAttachment",
        profile: Profile::Tcp,
        provisional: false,
        features: TCP,
        checks: "two routes on one listener: both Accepted, attachedRoutes 2; 100 connections all reach the older route's backend",
        run: |ctx| multiple_routes(ctx, L4::TCP),
    },
    Scenario {
        name: "TCPRouteParentRefAttachAll",
        profile: Profile::Tcp,
        provisional: true,
        features: TCP,
        checks: "no sectionName or port: one Accepted parent, attachedRoutes 1 on all 4 listeners, traffic through each",
        run: |ctx| attach_all(ctx, L4::TCP),
    },
    Scenario {
        name: "TCPRouteParentRefPortAndSectionName",
        profile: Profile::Tcp,
        provisional: true,
        features: TCP,
        checks: "routes attached by port, by sectionName and by both: each Accepted, each listener reaches its own backend",
        run: |ctx| port_and_section(ctx, L4::TCP),
    },
    Scenario {
        name: "TCPRouteReferenceGrant",
        profile: Profile::Tcp,
        provisional: true,
        features: TCP_GRANT,
        checks: "traffic reaches the backend in gateway-conformance-web-backend; grant deleted: ResolvedRefs=False/RefNotPermitted and connections refused",
        run: |ctx| reference_grant_revoked(ctx, L4::TCP),
    },
    Scenario {
        name: "TCPRouteWeightedRouting",
        profile: Profile::Tcp,
        provisional: true,
        features: TCP,
        checks: "500 connections, 10 at a time: 0.7 / 0.3 / 0 within ±0.05, up to 10 attempts",
        run: |ctx| weighted(ctx, L4::TCP),
    },
    Scenario {
        name: "UDPRoute",
        profile: Profile::Udp,
        provisional: true,
        features: UDP,
        checks: "Gateway and route Accepted; a DNS A query for foo.bar.com. on port 5300 answered by the DNS server on 53",
        run: udp_dns,
    },
    Scenario {
        name: "UDPRouteInvalidBackendRefNonexistent",
        profile: Profile::Udp,
        provisional: true,
        features: UDP,
        checks: "ResolvedRefs=False/BackendNotFound; datagrams get no answer",
        run: |ctx| invalid_backend_nonexistent(ctx, L4::UDP),
    },
    Scenario {
        name: "UDPRouteInvalidCrossNamespaceBackendRef",
        profile: Profile::Udp,
        provisional: true,
        features: UDP_GRANT,
        checks: "Gateway and route Accepted, ResolvedRefs=False/RefNotPermitted; datagrams get no answer",
        run: |ctx| invalid_cross_namespace(ctx, L4::UDP),
    },
    Scenario {
        name: "UDPRouteMultipleRoutesAttachment",
        profile: Profile::Udp,
        provisional: true,
        features: UDP,
        checks: "two routes on one listener: both Accepted, attachedRoutes 2; 100 flows all reach the older route's backend",
        run: |ctx| multiple_routes(ctx, L4::UDP),
    },
    Scenario {
        name: "UDPRouteParentRefAttachAllListeners",
        profile: Profile::Udp,
        provisional: true,
        features: UDP,
        checks: "no sectionName or port: one Accepted parent, attachedRoutes 1 on all 4 listeners, traffic through each",
        run: |ctx| attach_all(ctx, L4::UDP),
    },
    Scenario {
        name: "UDPRouteParentRefPortAndSectionName",
        profile: Profile::Udp,
        provisional: true,
        features: UDP,
        checks: "routes attached by port, by sectionName and by both: each Accepted, each listener reaches its own backend",
        run: |ctx| port_and_section(ctx, L4::UDP),
    },
    Scenario {
        name: "UDPRouteReferenceGrant",
        profile: Profile::Udp,
        provisional: true,
        features: UDP_GRANT,
        checks: "traffic reaches the backend in gateway-conformance-web-backend; grant deleted: ResolvedRefs=False/RefNotPermitted and no answer",
        run: |ctx| reference_grant_revoked(ctx, L4::UDP),
    },
    Scenario {
        name: "UDPRouteWeightedRouting",
        profile: Profile::Udp,
        provisional: true,
        features: UDP,
        checks: "500 flows, 10 at a time: 0.7 / 0.3 / 0 within ±0.05, up to 10 attempts",
        run: |ctx| weighted(ctx, L4::UDP),
    },
    Scenario {
        name: "UDPRouteNotAllowedByListeners",
        profile: Profile::Udp,
        provisional: true,
        features: UDP,
        checks: "upstream returns at once without TLSRoute; we also check a UDPRoute on a TLS-only listener: Accepted=False/NotAllowedByListeners, 0 attachedRoutes, no answer",
        run: udp_not_allowed_by_listeners,
    },
];

/// The per-protocol names of one test shape.
#[derive(Clone, Copy)]
struct L4 {
    proto: Proto,
    /// `tcp` or `udp`: the prefix of upstream's object names.
    p: &'static str,
    kind: &'static str,
    protocol: &'static str,
    /// The Services' port (and the pods' target port).
    port: u16,
}

impl L4 {
    const TCP: L4 = L4 {
        proto: Proto::Tcp,
        p: "tcp",
        kind: "TCPRoute",
        protocol: "TCP",
        port: TCP_PORT,
    };
    const UDP: L4 = L4 {
        proto: Proto::Udp,
        p: "udp",
        kind: "UDPRoute",
        protocol: "UDP",
        port: UDP_PORT,
    };

    /// A Service named after the pod's Deployment, in `namespace`.
    fn service(&self, ctx: &Ctx, namespace: &str, deployment: &str) -> String {
        service(
            namespace,
            deployment,
            self.proto,
            self.port,
            self.port,
            &[ctx.addr(deployment)],
        )
    }

    fn listener(&self, name: &'static str, port: u16) -> Listener<'static> {
        listener(name, port, self.protocol)
    }
}

const LISTENER_PORT: u16 = 80;

fn invalid_backend_nonexistent(ctx: &Ctx, l4: L4) -> anyhow::Result<()> {
    let (gw, rt) = match l4.proto {
        Proto::Tcp => (
            "tcp-gateway-invalid-backend",
            "tcp-route-invalid-backend-ref-nonexistent",
        ),
        Proto::Udp => (
            "udp-gateway-invalid-backend",
            "udp-route-invalid-backend-ref-nonexistent",
        ),
    };
    let yaml = gateway(gw, ctx.vip, &[l4.listener("main", LISTENER_PORT)])
        + &route(
            l4.kind,
            rt,
            &[parent(gw)],
            &[backend("nonexistent-backend", l4.port)],
            None,
        );
    ctx.apply(&yaml, &[("Gateway", INFRA_NS, gw), (l4.kind, INFRA_NS, rt)])?;
    ctx.route_condition(
        l4.kind,
        rt,
        gw,
        "ResolvedRefs",
        "False",
        Some("BackendNotFound"),
    )?;
    let addr = ctx.gateway_address(gw, "main", LISTENER_PORT)?;
    ctx.expect_rejected(l4.proto, addr)
}

fn invalid_cross_namespace(ctx: &Ctx, l4: L4) -> anyhow::Result<()> {
    let gw = format!("{}-invalid-cross-namespace-backend-ref-gateway", l4.p);
    let rt = format!("{}-invalid-cross-namespace-backend-ref", l4.p);
    let yaml = gateway(&gw, ctx.vip, &[l4.listener("main", LISTENER_PORT)])
        + &route(
            l4.kind,
            &rt,
            &[parent(&gw)],
            &[backend("web-backend", l4.port).namespace(WEB_BACKEND_NS)],
            None,
        )
        + &l4.service(ctx, WEB_BACKEND_NS, "web-backend");
    ctx.apply(
        &yaml,
        &[("Gateway", INFRA_NS, &gw), (l4.kind, INFRA_NS, &rt)],
    )?;
    let addr = ctx.gateway_and_routes_accepted(l4.kind, &gw, "main", LISTENER_PORT, &[&rt])?;
    ctx.route_condition(
        l4.kind,
        &rt,
        &gw,
        "ResolvedRefs",
        "False",
        Some("RefNotPermitted"),
    )?;
    ctx.expect_rejected(l4.proto, addr)
}

fn invalid_non_tcp_listener(ctx: &Ctx) -> anyhow::Result<()> {
    let (gw, rt) = ("tcp-mixed-protocol-gateway", "tcp-route");
    let yaml = gateway(
        gw,
        ctx.vip,
        &[listener("http", 80, "HTTP"), listener("tcp", 9000, "TCP")],
    ) + &route(
        "TCPRoute",
        rt,
        &[parent(gw).section("http")],
        &[backend("tcp-backend-v1", TCP_PORT)],
        None,
    ) + &L4::TCP.service(ctx, INFRA_NS, "tcp-backend-v1");
    ctx.apply(
        &yaml,
        &[("Gateway", INFRA_NS, gw), ("TCPRoute", INFRA_NS, rt)],
    )?;
    ctx.route_condition(
        "TCPRoute",
        rt,
        gw,
        "Accepted",
        "False",
        Some("NotAllowedByListeners"),
    )?;
    ctx.expect_attached_routes(gw, &[("http", 0), ("tcp", 0)])
}

fn multiple_routes(ctx: &Ctx, l4: L4) -> anyhow::Result<()> {
    let gw = format!("{}-multi-route-attach-gateway", l4.p);
    let older = format!("{}route-attach-older", l4.p);
    let newer = format!("{}route-attach-newer", l4.p);
    let older_backend = format!("{}-backend-older", l4.p);
    let newer_backend = format!("{}-backend-newer", l4.p);
    // The older route was created first, as upstream applies it first.
    let yaml = gateway(&gw, ctx.vip, &[l4.listener("main", LISTENER_PORT)])
        + &route(
            l4.kind,
            &older,
            &[parent(&gw).section("main")],
            &[backend(&older_backend, l4.port)],
            Some("2026-01-01T00:00:00Z"),
        )
        + &route(
            l4.kind,
            &newer,
            &[parent(&gw).section("main")],
            &[backend(&newer_backend, l4.port)],
            Some("2026-01-01T00:00:10Z"),
        )
        + &l4.service(ctx, INFRA_NS, &older_backend)
        + &l4.service(ctx, INFRA_NS, &newer_backend);
    ctx.apply(
        &yaml,
        &[
            ("Gateway", INFRA_NS, &gw),
            (l4.kind, INFRA_NS, &older),
            (l4.kind, INFRA_NS, &newer),
        ],
    )?;
    let addr =
        ctx.gateway_and_routes_accepted(l4.kind, &gw, "main", LISTENER_PORT, &[&older, &newer])?;
    ctx.expect_attached_routes(&gw, &[("main", 2)])?;
    ctx.expect_backend(l4.proto, addr, INFRA_NS, &older_backend)?;
    let seen = ctx.spread(l4.proto, addr, 100, 10)?;
    let want = format!("{INFRA_NS}/{older_backend}");
    anyhow::ensure!(
        seen.len() == 1 && seen.get(&want) == Some(&100),
        "100 new flows must all reach {want}: {seen:?}"
    );
    Ok(())
}

const FOUR: [(&str, u16); 4] = [
    ("one", 9001),
    ("two", 9002),
    ("three", 9003),
    ("four", 9004),
];

fn attach_all(ctx: &Ctx, l4: L4) -> anyhow::Result<()> {
    let (gw, rt) = match l4.proto {
        Proto::Tcp => ("tcp-attach-all-gateway", "tcp-route-attach-all"),
        Proto::Udp => ("udp-attach-all-listeners-gateway", "udp-route-attach-all"),
    };
    let pod = format!("{}-echo-attach-all", l4.p);
    let listeners: Vec<Listener> = FOUR.iter().map(|(n, p)| l4.listener(n, *p)).collect();
    let yaml = gateway(gw, ctx.vip, &listeners)
        + &route(l4.kind, rt, &[parent(gw)], &[backend(&pod, l4.port)], None)
        + &l4.service(ctx, INFRA_NS, &pod);
    ctx.apply(&yaml, &[("Gateway", INFRA_NS, gw), (l4.kind, INFRA_NS, rt)])?;
    ctx.route_has_accepted_parent(l4.kind, rt, gw, None, None)?;
    ctx.expect_attached_routes(gw, &FOUR.map(|(n, _)| (n, 1)))?;
    for (name, port) in FOUR {
        let addr = ctx.gateway_address(gw, name, port)?;
        ctx.expect_backend(l4.proto, addr, INFRA_NS, &pod)?;
    }
    Ok(())
}

fn port_and_section(ctx: &Ctx, l4: L4) -> anyhow::Result<()> {
    let gw = format!("{}-multi-listener-gateway", l4.p);
    let three = &FOUR[..3];
    let listeners: Vec<Listener> = three.iter().map(|(n, p)| l4.listener(n, *p)).collect();
    let by_port = format!("{}-route-by-port", l4.p);
    let by_section = format!("{}-route-by-section", l4.p);
    let by_both = format!("{}-route-by-section-and-port", l4.p);
    let pod = |n: &str| format!("{}-echo-{n}", l4.p);
    let yaml = gateway(&gw, ctx.vip, &listeners)
        + &route(
            l4.kind,
            &by_port,
            &[parent(&gw).port(9001)],
            &[backend(&pod("one"), l4.port)],
            None,
        )
        + &route(
            l4.kind,
            &by_section,
            &[parent(&gw).section("two")],
            &[backend(&pod("two"), l4.port)],
            None,
        )
        + &route(
            l4.kind,
            &by_both,
            &[parent(&gw).section("three").port(9003)],
            &[backend(&pod("three"), l4.port)],
            None,
        )
        + &l4.service(ctx, INFRA_NS, &pod("one"))
        + &l4.service(ctx, INFRA_NS, &pod("two"))
        + &l4.service(ctx, INFRA_NS, &pod("three"));
    ctx.apply(
        &yaml,
        &[
            ("Gateway", INFRA_NS, &gw),
            (l4.kind, INFRA_NS, &by_port),
            (l4.kind, INFRA_NS, &by_section),
            (l4.kind, INFRA_NS, &by_both),
        ],
    )?;
    ctx.route_has_accepted_parent(l4.kind, &by_port, &gw, None, Some(9001))?;
    ctx.route_has_accepted_parent(l4.kind, &by_section, &gw, Some("two"), None)?;
    ctx.route_has_accepted_parent(l4.kind, &by_both, &gw, Some("three"), Some(9003))?;
    ctx.expect_attached_routes(&gw, &[("one", 1), ("two", 1), ("three", 1)])?;
    for (name, port) in three {
        let addr = ctx.gateway_address(&gw, name, *port)?;
        ctx.expect_backend(l4.proto, addr, INFRA_NS, &pod(name))?;
    }
    Ok(())
}

fn reference_grant_revoked(ctx: &Ctx, l4: L4) -> anyhow::Result<()> {
    let gw = format!("{}-reference-grant-gateway", l4.p);
    let rt = format!("{}-reference-grant", l4.p);
    let pod = format!("{}-reference-grant-backend", l4.p);
    let without_grant = gateway(&gw, ctx.vip, &[l4.listener("main", LISTENER_PORT)])
        + &route(
            l4.kind,
            &rt,
            &[parent(&gw)],
            &[backend(&pod, l4.port).namespace(WEB_BACKEND_NS)],
            None,
        )
        + &l4.service(ctx, WEB_BACKEND_NS, &pod);
    let with_grant = without_grant.clone() + &reference_grant(&rt, WEB_BACKEND_NS, l4.kind);
    let expect = [("Gateway", INFRA_NS, gw.as_str()), (l4.kind, INFRA_NS, &rt)];
    ctx.apply(&with_grant, &expect)?;
    let addr = ctx.gateway_and_routes_accepted(l4.kind, &gw, "main", LISTENER_PORT, &[&rt])?;
    ctx.route_condition(l4.kind, &rt, &gw, "ResolvedRefs", "True", None)?;
    ctx.expect_backend(l4.proto, addr, WEB_BACKEND_NS, &pod)?;
    // Delete the ReferenceGrant: access is revoked.
    ctx.apply(&without_grant, &expect)?;
    ctx.route_condition(
        l4.kind,
        &rt,
        &gw,
        "ResolvedRefs",
        "False",
        Some("RefNotPermitted"),
    )?;
    ctx.expect_rejected(l4.proto, addr)
}

fn weighted(ctx: &Ctx, l4: L4) -> anyhow::Result<()> {
    let gw = format!("{}-weighted-gateway", l4.p);
    let rt = format!("{}-weighted-route", l4.p);
    let v = |n: u8| format!("{}-backend-v{n}", l4.p);
    let yaml = gateway(&gw, ctx.vip, &[l4.listener(l4.p, LISTENER_PORT)])
        + &route(
            l4.kind,
            &rt,
            &[parent(&gw).section(l4.p)],
            &[
                backend(&v(1), l4.port).weight(70),
                backend(&v(2), l4.port).weight(30),
                backend(&v(3), l4.port).weight(0),
            ],
            None,
        )
        + &l4.service(ctx, INFRA_NS, &v(1))
        + &l4.service(ctx, INFRA_NS, &v(2))
        + &l4.service(ctx, INFRA_NS, &v(3));
    ctx.apply(
        &yaml,
        &[("Gateway", INFRA_NS, &gw), (l4.kind, INFRA_NS, &rt)],
    )?;
    let addr = ctx.gateway_and_routes_accepted(l4.kind, &gw, l4.p, LISTENER_PORT, &[&rt])?;
    ctx.route_condition(l4.kind, &rt, &gw, "ResolvedRefs", "True", None)?;
    // Programmed: one answer from either weighted backend.
    ctx.eventually("the weighted route answers", || {
        ctx.probe(l4.proto, addr).map(drop)
    })?;
    ctx.expect_weights(
        l4.proto,
        addr,
        INFRA_NS,
        &[(&v(1), 0.7), (&v(2), 0.3), (&v(3), 0.0)],
    )
}

fn udp_dns(ctx: &Ctx) -> anyhow::Result<()> {
    let (gw, rt) = ("udp-gateway", "udp-coredns");
    let yaml = gateway(gw, ctx.vip, &[listener("coredns", 5300, "UDP")])
        + &route(
            "UDPRoute",
            rt,
            &[parent(gw)],
            &[backend("coredns", DNS_PORT)],
            None,
        )
        + &service(
            INFRA_NS,
            "coredns",
            Proto::Udp,
            DNS_PORT,
            DNS_PORT,
            &[ctx.addr("coredns")],
        );
    ctx.apply(
        &yaml,
        &[("Gateway", INFRA_NS, gw), ("UDPRoute", INFRA_NS, rt)],
    )?;
    let addr = ctx.gateway_and_routes_accepted("UDPRoute", gw, "coredns", 5300, &[rt])?;
    let mut streak = 0;
    ctx.eventually("the DNS query through the Gateway is answered", || {
        let answer =
            ctx.in_client(move || super::pods::dns_query(addr, DNS_NAME, super::PROBE_TIMEOUT));
        match answer {
            Ok(addrs) if addrs == [DNS_ANSWER] => streak += 1,
            Ok(addrs) => {
                streak = 0;
                anyhow::bail!("{DNS_NAME} answered {addrs:?}")
            }
            Err(e) => {
                streak = 0;
                return Err(e);
            }
        }
        anyhow::ensure!(streak >= super::CONSECUTIVE, "{streak} in a row");
        Ok(())
    })
}

fn udp_not_allowed_by_listeners(ctx: &Ctx) -> anyhow::Result<()> {
    let (gw, rt) = ("udp-tls-listener-gateway", "udp-route-not-allowed");
    let yaml = gateway(gw, ctx.vip, &[listener("tls", 443, "TLS")])
        + &route(
            "UDPRoute",
            rt,
            &[parent(gw).section("tls")],
            &[backend("udp-backend-v1", UDP_PORT)],
            None,
        )
        + &L4::UDP.service(ctx, INFRA_NS, "udp-backend-v1");
    ctx.apply(
        &yaml,
        &[("Gateway", INFRA_NS, gw), ("UDPRoute", INFRA_NS, rt)],
    )?;
    ctx.route_condition(
        "UDPRoute",
        rt,
        gw,
        "Accepted",
        "False",
        Some("NotAllowedByListeners"),
    )?;
    ctx.expect_attached_routes(gw, &[("tls", 0)])?;
    ctx.expect_rejected(Proto::Udp, std::net::SocketAddr::from((ctx.vip, 443)))
}
