//! The Kubernetes provider against the in-process fake API server (`fulgur_testkit::fake_kube`),
//! through the real kube client over HTTP, programming in-process agents over real gRPC:
//! reconcile from watch events, server-side-apply status patches sent only on change, Events,
//! Lease-based leadership with failover, agent discovery through pods, and `v1alpha2` discovery.

use std::{future::Future, net::SocketAddr, time::Duration};

use fulgur_controller::{
    kubernetes::{self, AgentDiscovery, FIELD_MANAGER, Settings, lease::LeaseSettings},
    metrics::Metrics,
};
use fulgur_proto::v1::{self, GetRequest, dataplane_client::DataplaneClient};
use fulgur_testkit::{
    fake_agent::{Fake, serve},
    fake_kube::FakeKube,
};
use serde_json::{Value, json};

const GW: &str = "gateway.networking.k8s.io/v1";
const CONTROLLER: &str = "fulgur.dev/gateway-controller";
const WAIT: Duration = Duration::from_secs(20);

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {team: blue}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: fulgur}
spec: {controllerName: fulgur.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: apps}
spec:
  gatewayClassName: fulgur
  addresses: [{type: IPAddress, value: 192.0.2.10}]
  listeners:
  - {name: tcp, port: 80, protocol: TCP}
  - {name: udp, port: 53, protocol: UDP}
# What the v1.6 CRD defaults a new Gateway's status to: no observedGeneration.
status:
  conditions:
  - {type: Accepted, status: Unknown, reason: Pending, message: Waiting for controller, lastTransitionTime: "1970-01-01T00:00:00Z"}
  - {type: Programmed, status: Unknown, reason: Pending, message: Waiting for controller, lastTransitionTime: "1970-01-01T00:00:00Z"}
---
# An unnamed port, as most Services have, and its slice as the EndpointSlice controller writes
# it: `name: ""`, protocol, nodeName, zone, targetRef and all three conditions.
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec:
  type: ClusterIP
  clusterIP: 198.51.100.200
  selector: {app: web}
  ports: [{port: 8080, protocol: TCP, targetPort: 3000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  generateName: web-
  namespace: apps
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
addressType: IPv4
ports: [{name: "", port: 3000, protocol: TCP}]
endpoints:
- addresses: [203.0.113.2]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: zone-a
  targetRef: {kind: Pod, name: web-5d9c7b8f6-aaaaa, namespace: apps}
- addresses: [203.0.113.3]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-2
  zone: zone-b
  targetRef: {kind: Pod, name: web-5d9c7b8f6-bbbbb, namespace: apps}
"#;

fn tcp_route(version: &str, service: &str) -> Value {
    json!({
        "apiVersion": format!("gateway.networking.k8s.io/{version}"),
        "kind": "TCPRoute",
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": {
            "parentRefs": [{"name": "gw", "sectionName": "tcp"}],
            "rules": [{"backendRefs": [{"name": service, "port": 8080}]}],
        },
    })
}

fn agent_pod(name: &str, grpc: SocketAddr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "fulgur-system",
            "labels": {"app.kubernetes.io/name": "fulgur-agent"},
        },
        "spec": {
            "nodeName": name,
            "hostNetwork": true,
            "containers": [{"name": "agent", "ports": [{"name": "grpc", "containerPort": grpc.port()}]}],
        },
        "status": {"podIP": grpc.ip().to_string()},
    })
}

/// A fake cluster with `WORLD` in it, serving the routes and ReferenceGrants at these versions.
async fn cluster(route_version: &str, grant_version: &str) -> FakeKube {
    let fake = FakeKube::start().await;
    fake.serve_gateway_api(route_version, grant_version);
    fake.apply_yaml(WORLD);
    fake
}

/// An in-process agent, and its pod for the controller to find.
async fn start_agent(fake: &FakeKube, node: &str) -> SocketAddr {
    start_agent_like(fake, node, Fake::current()).await
}

/// As [`start_agent`], with this fake (an older agent: no features).
async fn start_agent_like(fake: &FakeKube, node: &str, agent: Fake) -> SocketAddr {
    let addr = serve(agent, None).await;
    fake.apply(agent_pod(node, addr));
    addr
}

fn settings(identity: &str, pool: &str) -> Settings {
    Settings {
        controller_name: CONTROLLER.into(),
        address_pools: vec![pool.parse().unwrap()],
        agents: AgentDiscovery {
            namespace: "fulgur-system".into(),
            selector: "app.kubernetes.io/name=fulgur-agent".into(),
            port: 1,
            tls: None,
        },
        announce: Default::default(),
        rediscover_every: Duration::from_millis(200),
        lease: LeaseSettings {
            namespace: "fulgur-system".into(),
            name: "fulgur-controller".into(),
            identity: identity.into(),
            duration: Duration::from_secs(2),
            renew_every: Duration::from_millis(300),
        },
    }
}

/// Runs a controller in this process until the handle is aborted.
fn controller(fake: &FakeKube, identity: &str, pool: &str) -> tokio::task::JoinHandle<()> {
    controller_with_metrics(fake, identity, pool, Metrics::new())
}

fn controller_with_metrics(
    fake: &FakeKube,
    identity: &str,
    pool: &str,
    metrics: std::sync::Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    let client = fake.client();
    let settings = settings(identity, pool);
    tokio::spawn(async move {
        if let Err(e) = kubernetes::run(client, settings, metrics).await {
            panic!("controller stopped: {e:#}");
        }
    })
}

async fn agent_services(addr: SocketAddr) -> Vec<v1::Service> {
    let Ok(mut client) = DataplaneClient::connect(format!("http://{addr}")).await else {
        return vec![];
    };
    match client.get(GetRequest {}).await {
        Ok(r) => r.into_inner().state.map(|s| s.services).unwrap_or_default(),
        Err(_) => vec![],
    }
}

/// (vip:port, sorted backends "ip:port*weight") of every service.
async fn agent_table(addr: SocketAddr) -> Vec<(String, Vec<String>)> {
    let mut table: Vec<_> = agent_services(addr)
        .await
        .into_iter()
        .map(|s| {
            let mut backends: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{}:{}*{}", b.address, b.port, b.weight))
                .collect();
            backends.sort();
            (format!("{}:{}", s.vip, s.port), backends)
        })
        .collect();
    table.sort();
    table
}

/// Waits until the agent runs exactly one service, `vip` (ip:port), with these backends.
async fn wait_for_service(agent: SocketAddr, what: &str, vip: &str, backends: &[&str]) {
    let expected = vec![(
        vip.to_owned(),
        backends.iter().map(|b| (*b).to_owned()).collect::<Vec<_>>(),
    )];
    eventually(what, || async {
        let table = agent_table(agent).await;
        if table != expected {
            eprintln!("agent: {table:?}");
        }
        table == expected
    })
    .await;
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition<'a>(conditions: &'a Value, type_: &str) -> &'a Value {
    conditions
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Status patches the server received for one object.
fn status_patches(fake: &FakeKube, path_end: &str) -> Vec<Value> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(path_end))
        .map(|r| {
            assert_eq!(
                r.content_type, "application/apply-patch+yaml",
                "server-side apply"
            );
            assert_eq!(
                r.query.get("fieldManager").map(String::as_str),
                Some(FIELD_MANAGER)
            );
            assert_eq!(r.query.get("force").map(String::as_str), Some("true"));
            r.body
        })
        .collect()
}

/// Every request the controller made is allowed by the RBAC of `manifests/deploy/rbac.yaml`.
fn assert_least_privilege_suffices(fake: &FakeKube) {
    let rbac = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/deploy/rbac.yaml"
    ))
    .unwrap();
    let forbidden = fake.forbidden_by(&rbac);
    assert!(
        forbidden.is_empty(),
        "not allowed by rbac.yaml: {forbidden:#?}"
    );
}

/// The controllers' Lease.
fn lease(fake: &FakeKube) -> Option<Value> {
    fake.get(
        "coordination.k8s.io/v1",
        "Lease",
        "fulgur-system",
        "fulgur-controller",
    )
}

fn events(fake: &FakeKube) -> Vec<Value> {
    fake.list("events.k8s.io/v1", "Event")
}

#[tokio::test]
async fn reconciles_watch_events_into_agents_and_status_patches() {
    let fake = cluster("v1", "v1").await;
    // Another implementation's class and Gateway: never touched.
    fake.apply_yaml(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: theirs}
spec: {controllerName: example.com/other}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: apps}
spec:
  gatewayClassName: theirs
  listeners: [{name: tcp, port: 80, protocol: TCP}]
"#,
    );
    let agent = start_agent(&fake, "node-1").await;
    let _controller = controller(&fake, "replica-a", "198.51.100.0/28");

    // The Gateway alone: listeners programmed, no backends yet (no route). Its CRD-defaulted
    // Unknown conditions are replaced, with a transition time of now, not 1970's.
    eventually("Gateway Programmed", || async {
        let gw = fake.get(GW, "Gateway", "apps", "gw").unwrap();
        condition(&gw["status"]["conditions"], "Programmed")["status"] == "True"
    })
    .await;
    let class = fake.get(GW, "GatewayClass", "", "fulgur").unwrap();
    assert_eq!(
        condition(&class["status"]["conditions"], "Accepted")["status"],
        "True"
    );
    let gw = fake.get(GW, "Gateway", "apps", "gw").unwrap();
    assert_eq!(
        gw["status"]["addresses"],
        json!([{"type": "IPAddress", "value": "192.0.2.10"}])
    );
    for c in gw["status"]["conditions"].as_array().unwrap() {
        assert_ne!(c["lastTransitionTime"], "1970-01-01T00:00:00Z", "{c}");
        assert_eq!(c["observedGeneration"], 1, "{c}");
    }

    // A route arrives through the watch: the agent gets its backends, the route its status.
    fake.apply(tcp_route("v1", "web"));
    wait_for_service(
        agent,
        "the route's backends on the agent",
        "192.0.2.10:80",
        &["203.0.113.2:3000*1000000", "203.0.113.3:3000*1000000"],
    )
    .await;
    eventually("route status", || async {
        let route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
        let parents = &route["status"]["parents"];
        parents.as_array().is_some_and(|p| p.len() == 1)
            && condition(&parents[0]["conditions"], "Accepted")["status"] == "True"
            && condition(&parents[0]["conditions"], "ResolvedRefs")["status"] == "True"
    })
    .await;
    let route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
    assert_eq!(route["status"]["parents"][0]["controllerName"], CONTROLLER);
    assert_eq!(
        route["status"]["parents"][0]["parentRef"],
        json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "apps", "name": "gw", "sectionName": "tcp"})
    );
    eventually("attachedRoutes 1", || async {
        let gw = fake.get(GW, "Gateway", "apps", "gw").unwrap();
        gw["status"]["listeners"][0]["attachedRoutes"] == 1
    })
    .await;

    // Scaling the EndpointSlice changes the agent's backends, and no status at all.
    let route_patches = status_patches(&fake, "/tcproutes/web/status").len();
    let gateway_patches = status_patches(&fake, "/gateways/gw/status").len();
    let mut slice = fake
        .get("discovery.k8s.io/v1", "EndpointSlice", "apps", "web-1")
        .unwrap();
    slice["endpoints"][1]["conditions"]["terminating"] = true.into();
    fake.apply(slice);
    wait_for_service(
        agent,
        "the terminating endpoint leaves",
        "192.0.2.10:80",
        &["203.0.113.2:3000*1000000"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // a few reconciles
    assert_eq!(
        status_patches(&fake, "/tcproutes/web/status").len(),
        route_patches
    );
    assert_eq!(
        status_patches(&fake, "/gateways/gw/status").len(),
        gateway_patches
    );

    // Another controller's entry on the route survives our patches.
    let mut route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
    // It has only the required fields (no namespace, group, kind or observedGeneration).
    let foreign = json!({
        "parentRef": {"name": "theirs"},
        "controllerName": "example.com/other",
        "conditions": [{
            "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }],
    });
    route["status"]["parents"]
        .as_array_mut()
        .unwrap()
        .push(foreign.clone());
    fake.apply(route);

    // A backend that does not exist: ResolvedRefs False, an Event, traffic rejected.
    fake.apply(tcp_route("v1", "missing"));
    eventually("BackendNotFound", || async {
        let route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
        let ours = route["status"]["parents"]
            .as_array()
            .and_then(|p| {
                p.iter()
                    .find(|p| p["controllerName"] == CONTROLLER)
                    .cloned()
            })
            .unwrap_or_default();
        condition(&ours["conditions"], "ResolvedRefs")["reason"] == "BackendNotFound"
    })
    .await;
    let route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
    assert!(
        route["status"]["parents"]
            .as_array()
            .unwrap()
            .contains(&foreign),
        "{}",
        route["status"]
    );
    eventually("a Warning event on the route", || async {
        events(&fake).iter().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "BackendNotFound"
                && e["regarding"]["kind"] == "TCPRoute"
                && e["regarding"]["name"] == "web"
                && e["reportingController"] == FIELD_MANAGER
        })
    })
    .await;
    eventually("all traffic rejected", || async {
        agent_services(agent)
            .await
            .iter()
            .any(|s| s.backends.is_empty() && s.reject_weight > 0)
    })
    .await;

    // Deleting the route withdraws the service.
    fake.delete(GW, "TCPRoute", "apps", "web");
    eventually("service withdrawn", || async {
        agent_services(agent).await.is_empty()
    })
    .await;
    assert!(status_patches(&fake, "/gatewayclasses/theirs/status").is_empty());
    assert!(status_patches(&fake, "/gateways/theirs/status").is_empty());
    assert_least_privilege_suffices(&fake);
}

#[tokio::test]
async fn a_service_without_endpoints_rejects_and_is_reported() {
    let fake = cluster("v1", "v1").await;
    // Scaled to zero: the EndpointSlice controller writes `endpoints: null`.
    fake.apply_yaml(
        r#"
apiVersion: v1
kind: Service
metadata: {name: idle, namespace: apps}
spec:
  ports: [{port: 8080, protocol: TCP, targetPort: 3000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: idle-1, namespace: apps, labels: {kubernetes.io/service-name: idle}}
addressType: IPv4
ports: [{name: "", port: 3000, protocol: TCP}]
endpoints: null
"#,
    );
    fake.apply(tcp_route("v1", "idle"));
    let agent = start_agent(&fake, "node-1").await;
    let metrics = Metrics::new();
    let _controller =
        controller_with_metrics(&fake, "replica-a", "198.51.100.0/28", metrics.clone());
    eventually("all traffic rejected", || async {
        agent_services(agent)
            .await
            .iter()
            .any(|s| s.backends.is_empty() && s.reject_weight > 0)
    })
    .await;
    eventually("a Warning event naming the Service", || async {
        events(&fake).iter().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "NoEndpoints"
                && e["regarding"]["kind"] == "TCPRoute"
                && e["regarding"]["name"] == "web"
                && e["note"].as_str().is_some_and(|n| n.contains("apps/idle"))
        })
    })
    .await;
    // The reference itself is valid: ResolvedRefs stays True; the metric tells. (The Event
    // and the status patch are separate requests: wait for the patch.)
    eventually("the route's status patched", || async {
        let route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
        route["status"]["parents"][0]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "ResolvedRefs"))
    })
    .await;
    let route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
    assert_eq!(
        condition(&route["status"]["parents"][0]["conditions"], "ResolvedRefs")["status"],
        "True"
    );
    let text = metrics.encode();
    assert!(
        text.contains("fulgur_controller_backend_refs{state=\"no_endpoints\"} 1"),
        "{text}"
    );

    // A pod becomes ready: traffic flows and the metric follows.
    let mut slice = fake
        .get("discovery.k8s.io/v1", "EndpointSlice", "apps", "idle-1")
        .unwrap();
    slice["endpoints"] = json!([{"addresses": ["203.0.113.9"], "conditions": {"ready": true}}]);
    fake.apply(slice);
    wait_for_service(
        agent,
        "the new endpoint",
        "192.0.2.10:80",
        &["203.0.113.9:3000*1000000"],
    )
    .await;
    assert!(
        metrics
            .encode()
            .contains("fulgur_controller_backend_refs{state=\"ready\"} 1")
    );
    let warnings = events(&fake)
        .iter()
        .filter(|e| e["reason"] == "NoEndpoints")
        .count();
    assert_eq!(warnings, 1, "reported once");
}

#[tokio::test]
async fn agents_come_and_go_with_their_pods() {
    let fake = cluster("v1", "v1").await;
    fake.apply(tcp_route("v1", "web"));
    let first = start_agent(&fake, "node-1").await;
    let _controller = controller(&fake, "replica-a", "198.51.100.0/28");
    eventually("node-1 programmed", || async {
        agent_table(first).await.len() == 1
    })
    .await;
    // A new node's agent gets the full state without any route change.
    let second = start_agent(&fake, "node-2").await;
    eventually("node-2 programmed", || async {
        agent_table(second).await == agent_table(first).await
    })
    .await;
    // A pod that is gone is no longer programmed.
    fake.delete("v1", "Pod", "fulgur-system", "node-1");
    fake.apply(tcp_route("v1", "missing"));
    eventually("node-2 follows the change", || async {
        agent_services(second)
            .await
            .iter()
            .any(|s| s.backends.is_empty())
    })
    .await;
    assert_eq!(
        agent_services(first).await[0].backends.len(),
        2,
        "node-1 left alone"
    );
}

#[tokio::test]
async fn only_the_lease_holder_acts_and_a_follower_takes_over() {
    let fake = cluster("v1", "v1").await;
    // An older agent (no "announce"): the pooled Gateway's Programmed stays False/NoAnnouncer,
    // so its status does not change once the address is in.
    let agent = start_agent_like(&fake, "node-1", Fake::default()).await;

    let a = controller(&fake, "replica-a", "198.51.100.0/28");
    eventually("replica-a holds the lease", || async {
        lease(&fake).is_some_and(|l| l["spec"]["holderIdentity"] == "replica-a")
    })
    .await;
    let b = controller(&fake, "replica-b", "203.0.113.64/28");
    // Synced first, so the Gateway below has its final Programmed condition in its first
    // patch (not Pending, then another): any second patch would be the follower's.
    eventually("the agent synced by replica-a", || async {
        let Ok(mut client) = DataplaneClient::connect(format!("http://{agent}")).await else {
            return false;
        };
        client
            .get(GetRequest {})
            .await
            .is_ok_and(|r| r.into_inner().state.is_some_and(|s| s.generation > 0))
    })
    .await;

    // A Gateway without addresses: only the leader's pool may be used, and only once.
    let pooled = json!({
        "apiVersion": GW, "kind": "Gateway",
        "metadata": {"name": "pooled", "namespace": "apps"},
        "spec": {"gatewayClassName": "fulgur", "listeners": [{"name": "tcp", "port": 81, "protocol": "TCP"}]},
    });
    fake.apply(pooled);
    eventually("pooled address", || async {
        let gw = fake.get(GW, "Gateway", "apps", "pooled").unwrap();
        !gw["status"]["addresses"].is_null()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gw = fake.get(GW, "Gateway", "apps", "pooled").unwrap();
    let address = gw["status"]["addresses"][0]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        address.starts_with("198.51.100."),
        "the leader's pool: {address}"
    );
    assert_eq!(
        status_patches(&fake, "/gateways/pooled/status").len(),
        1,
        "the follower never patches"
    );
    assert_eq!(lease(&fake).unwrap()["spec"]["holderIdentity"], "replica-a");

    // The leader dies without releasing the lease: the follower takes over after it expires,
    // keeps the assigned address and acts on new changes.
    a.abort();
    let died = tokio::time::Instant::now();
    eventually("replica-b holds the lease", || async {
        lease(&fake).is_some_and(|l| l["spec"]["holderIdentity"] == "replica-b")
    })
    .await;
    assert!(
        died.elapsed() >= Duration::from_millis(1500),
        "not before the lease expired"
    );
    assert_eq!(lease(&fake).unwrap()["spec"]["leaseTransitions"], 1);
    fake.apply(tcp_route("v1", "web"));
    eventually("replica-b programs the agent", || async {
        agent_table(agent)
            .await
            .iter()
            .any(|(vip, _)| vip == "192.0.2.10:80")
    })
    .await;
    assert!(!b.is_finished());
    assert_least_privilege_suffices(&fake);
}

#[tokio::test]
async fn older_clusters_serve_v1alpha2_routes_and_v1beta1_grants() {
    let fake = cluster("v1alpha2", "v1beta1").await;
    // The route's backend lives in another namespace: it needs a (v1beta1) ReferenceGrant.
    fake.apply_yaml(
        r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  ports: [{name: tcp, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: data, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: tcp, port: 5432}]
endpoints: [{addresses: [203.0.113.20]}]
"#,
    );
    let mut route = tcp_route("v1alpha2", "web");
    route["spec"]["rules"][0]["backendRefs"] =
        json!([{"name": "db", "namespace": "data", "port": 5432}]);
    fake.apply(route);
    let agent = start_agent(&fake, "node-1").await;
    let _controller = controller(&fake, "replica-a", "198.51.100.0/28");
    let resolved = || {
        fake.get(
            "gateway.networking.k8s.io/v1alpha2",
            "TCPRoute",
            "apps",
            "web",
        )
        .map(|r| condition(&r["status"]["parents"][0]["conditions"], "ResolvedRefs").clone())
        .unwrap_or_default()
    };
    eventually("RefNotPermitted without a grant", || async {
        resolved()["reason"] == "RefNotPermitted"
    })
    .await;
    fake.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "apps-to-db", "namespace": "data"},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "TCPRoute", "namespace": "apps"}],
            "to": [{"group": "", "kind": "Service", "name": "db"}],
        },
    }));
    wait_for_service(
        agent,
        "the granted backend on the agent",
        "192.0.2.10:80",
        &["203.0.113.20:5432*1000000"],
    )
    .await;
    eventually("ResolvedRefs", || async { resolved()["status"] == "True" }).await;
    let patches = status_patches(&fake, "/tcproutes/web/status");
    assert!(
        patches
            .iter()
            .all(|p| p["apiVersion"] == "gateway.networking.k8s.io/v1alpha2"),
        "patched at the served version"
    );
    assert!(fake.requests().iter().any(|r| {
        r.path
            .starts_with("/apis/gateway.networking.k8s.io/v1beta1/referencegrants")
    }));
}

#[tokio::test]
async fn the_binary_uses_the_kubeconfig_and_releases_the_lease_on_sigterm() {
    let fake = cluster("v1", "v1").await;
    let dir = std::env::temp_dir().join(format!("fulgur-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
            fake.url()
        ),
    )
    .unwrap();
    let metrics = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap()
    };
    // The API's first answer is an error: the controller tries again rather than exiting.
    fake.fail_next("GET", "/apis/gateway.networking.k8s.io/v1", 1);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulgur-controller"))
        .args([
            "--provider=kubernetes",
            "--insecure",
            "--identity=from-binary",
            "--lease-namespace=fulgur-system",
            "--agent-namespace=fulgur-system",
            "--lease-duration=5s",
            "--lease-renew=500ms",
            &format!("--metrics-listen={metrics}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("GatewayClass Accepted by the binary", || async {
        let class = fake.get(GW, "GatewayClass", "", "fulgur").unwrap();
        condition(&class["status"]["conditions"], "Accepted")["status"] == "True"
    })
    .await;
    let held = lease(&fake).unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "from-binary");
    let scrape = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(metrics).await.unwrap();
        let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
            .await
            .unwrap();
        response
    };
    assert!(scrape("/readyz").await.starts_with("HTTP/1.0 200"));
    let text = scrape("/metrics").await;
    for line in [
        "fulgur_controller_leader 1",
        "fulgur_controller_status_writes_total{result=\"ok\"}",
        "fulgur_controller_agents{state=\"synced\"} 0",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let held = lease(&fake).unwrap();
    assert!(
        held["spec"]["holderIdentity"].is_null(),
        "released: {}",
        held["spec"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn pool_addresses_survive_a_restart_and_failed_patches_are_retried() {
    let fake = cluster("v1", "v1").await;
    let pooled = |name: &str| {
        json!({
            "apiVersion": GW, "kind": "Gateway",
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {"gatewayClassName": "fulgur", "listeners": [{"name": "tcp", "port": 81, "protocol": "TCP"}]},
        })
    };
    let address = |name: &str| {
        fake.get(GW, "Gateway", "apps", name).and_then(|g| {
            g["status"]["addresses"][0]["value"]
                .as_str()
                .map(str::to_owned)
        })
    };
    fake.apply(pooled("pooled"));
    // The first two status patches of this Gateway fail: the controller retries.
    fake.fail_next("PATCH", "/gateways/pooled/status", 2);
    let first = controller(&fake, "replica-a", "198.51.100.0/28");
    eventually("pooled address", || async { address("pooled").is_some() }).await;
    let failed = status_patches(&fake, "/gateways/pooled/status").len();
    assert!(failed >= 3, "two failures and a success: {failed}");
    let assigned = address("pooled").unwrap();
    first.abort();
    let _ = first.await;

    // While no controller runs, a Gateway that sorts first appears; the restarted controller
    // keeps the assignment it reads back from the status.
    fake.apply(pooled("aaa"));
    let held = lease(&fake).unwrap();
    let mut released = held.clone();
    released["spec"]["holderIdentity"] = Value::Null; // as a clean shutdown leaves it
    fake.apply(released);
    let _second = controller(&fake, "replica-b", "198.51.100.0/28");
    eventually("aaa gets an address", || async { address("aaa").is_some() }).await;
    assert_eq!(
        address("pooled").unwrap(),
        assigned,
        "kept across the restart"
    );
    assert_ne!(address("aaa").unwrap(), assigned);
}

#[tokio::test]
async fn programmed_tells_whether_the_agents_run_the_state() {
    let fake = cluster("v1", "v1").await;
    fake.apply(tcp_route("v1", "web"));
    let programmed = || {
        let gw = fake.get(GW, "Gateway", "apps", "gw").unwrap();
        let c = condition(&gw["status"]["conditions"], "Programmed");
        (
            c["status"].as_str().map(str::to_owned),
            c["reason"].as_str().map(str::to_owned),
        )
    };
    let _controller = controller(&fake, "replica-a", "198.51.100.0/28");
    eventually("Pending without agents", || async {
        programmed() == (Some("False".into()), Some("Pending".into()))
    })
    .await;
    // An agent whose maps are too small refuses the state: NoResources, and an Event on its pod.
    let fake_agent = Fake::current();
    *fake_agent.capacity.lock().unwrap() = Some(0);
    let agent = serve(fake_agent.clone(), None).await;
    fake.apply(agent_pod("node-1", agent));
    eventually("NoResources", || async {
        programmed() == (Some("False".into()), Some("NoResources".into()))
    })
    .await;
    eventually("an event on the agent's pod", || async {
        events(&fake).iter().any(|e| {
            e["reason"] == "AgentRefusedState"
                && e["regarding"]["kind"] == "Pod"
                && e["regarding"]["name"] == "node-1"
        })
    })
    .await;
    // Room again (the agent restarted with larger maps): the next state goes through.
    *fake_agent.capacity.lock().unwrap() = None;
    let mut slice = fake
        .get("discovery.k8s.io/v1", "EndpointSlice", "apps", "web-1")
        .unwrap();
    slice["endpoints"][1]["conditions"]["ready"] = false.into();
    fake.apply(slice);
    eventually("Programmed", || async {
        programmed() == (Some("True".into()), Some("Programmed".into()))
    })
    .await;
    assert_eq!(agent_table(agent).await.len(), 1);
}

#[tokio::test]
async fn gateway_api_kinds_installed_after_the_controller_are_picked_up() {
    let fake = FakeKube::start().await;
    fake.apply_yaml(
        &WORLD
            .split("---")
            .filter(|d| !d.contains("gateway.networking.k8s.io"))
            .collect::<Vec<_>>()
            .join("---"),
    );
    let agent = start_agent(&fake, "node-1").await;
    let _controller = controller(&fake, "replica-a", "198.51.100.0/28");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The CRDs arrive, then the objects.
    fake.serve_gateway_api("v1", "v1");
    fake.apply_yaml(WORLD);
    fake.apply(tcp_route("v1", "web"));
    eventually("the route's backends on the agent", || async {
        agent_table(agent).await.len() == 1
    })
    .await;
}

/// Each agent's whole state as it answers Get.
async fn agent_state(addr: SocketAddr) -> v1::DesiredState {
    let Ok(mut client) = DataplaneClient::connect(format!("http://{addr}")).await else {
        return v1::DesiredState::default();
    };
    match client.get(GetRequest {}).await {
        Ok(r) => r.into_inner().state.unwrap_or_default(),
        Err(_) => v1::DesiredState::default(),
    }
}

#[tokio::test]
async fn agents_get_their_nodes_view_and_one_announces_each_address() {
    let fake = cluster("v1", "v1").await;
    fake.apply(tcp_route("v1", "web"));
    // WORLD's endpoints: 203.0.113.2 on node-1, 203.0.113.3 on node-2.
    let n1 = start_agent(&fake, "node-1").await;
    let n2 = start_agent(&fake, "node-2").await;
    // An older agent (no features) on a third node.
    let n3 = start_agent_like(&fake, "node-3", Fake::default()).await;
    let _controller = controller(&fake, "replica-a", "198.51.100.0/28");
    let marks = |state: &v1::DesiredState| -> Vec<(String, bool)> {
        let mut marks: Vec<(String, bool)> = state
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (b.address.clone(), b.remote)))
            .collect();
        marks.sort();
        marks
    };
    eventually("every node's view", || async {
        marks(&agent_state(n1).await)
            == [("203.0.113.2".into(), false), ("203.0.113.3".into(), true)]
            && marks(&agent_state(n2).await)
                == [("203.0.113.2".into(), true), ("203.0.113.3".into(), false)]
            && agent_state(n3).await.services.len() == 1
    })
    .await;
    // The older agent: neither endpoint is on node-3, so no backend (it rejects), and it is
    // never asked to announce.
    let old = agent_state(n3).await;
    assert!(old.services[0].backends.is_empty(), "{old:?}");
    assert!(old.services[0].reject_weight > 0, "{old:?}");
    let gateway_programmed = || {
        let gw = fake.get(GW, "Gateway", "apps", "gw").unwrap();
        let c = condition(&gw["status"]["conditions"], "Programmed").clone();
        (
            c["status"].as_str().map(str::to_owned),
            c["message"].as_str().map(str::to_owned).unwrap_or_default(),
        )
    };
    eventually("Programmed, announced by node-1 or node-2", || async {
        let (status, message) = gateway_programmed();
        status.as_deref() == Some("True")
            && (message.ends_with("by node node-1") || message.ends_with("by node node-2"))
    })
    .await;
    let announcing: Vec<bool> = [
        agent_state(n1).await,
        agent_state(n2).await,
        agent_state(n3).await,
    ]
    .iter()
    .map(|s| !s.announce.is_empty())
    .collect();
    assert_eq!(
        announcing.iter().filter(|a| **a).count(),
        1,
        "one announcer: {announcing:?}"
    );
    assert!(!announcing[2], "the older agent never announces");
    // The route says what node-3 does with it, and a Warning Event says it once.
    eventually("the route names node-3", || async {
        let route = fake.get(GW, "TCPRoute", "apps", "web").unwrap();
        let parent = &route["status"]["parents"][0]["conditions"];
        let c = condition(parent, "EveryNodeReachesBackends");
        c["status"] == "False"
            && c["reason"] == "NoLocalEndpoints"
            && c["message"].as_str().is_some_and(|m| {
                m.starts_with("new flows are rejected on node node-3: no endpoint of the")
            })
            && condition(parent, "ResolvedRefs")["status"] == "True"
    })
    .await;
    eventually("a NoLocalEndpoints event", || async {
        events(&fake)
            .iter()
            .any(|e| e["reason"] == "NoLocalEndpoints" && e["regarding"]["name"] == "web")
    })
    .await;
}
