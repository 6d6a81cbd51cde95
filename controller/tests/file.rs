//! The standalone provider: manifests in, Snapshot out; errors with file and line; statuses
//! rendered and read back so a restarted controller keeps lastTransitionTime and addresses.

use std::path::{Path, PathBuf};

use fulgur_controller::{
    file,
    model::{FromNamespaces, ObjectRef, RouteKind},
    status,
    translate::{Config, translate},
};

const MANIFESTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: fulgur
spec:
  controllerName: fulgur.dev/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
  namespace: infra
spec:
  gatewayClassName: fulgur
  addresses: [{type: IPAddress, value: 192.0.2.10}]
  listeners:
  - name: tcp
    port: 80
    protocol: TCP
    allowedRoutes:
      namespaces: {from: All}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: web
  namespace: apps
  creationTimestamp: "2026-01-01T00:00:00Z"
spec:
  parentRefs: [{name: gw, namespace: infra}]
  rules:
  - backendRefs: [{name: web, port: 8080, weight: 3}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec:
  type: ClusterIP
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 3000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: apps
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 3000, protocol: TCP}]
endpoints:
- addresses: [203.0.113.2]
  conditions: {ready: true}
  nodeName: node-1
- addresses: [203.0.113.3]
  conditions: {ready: false}
- addresses: [203.0.113.4]
  conditions: {ready: true, terminating: true}
- addresses: [203.0.113.5]
  nodeName: ""
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated}
data: {a: b}
"#;

struct Dir(PathBuf);

impl Dir {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "fulgur-manifests-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        Dir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SEEN: &str = "2026-06-01T00:00:00Z";

/// translate with this project's controller name, no address pools, and `now`.
fn translate_at(
    snapshot: &fulgur_controller::model::Snapshot,
    now: &str,
) -> fulgur_controller::translate::Output {
    translate(
        &Config {
            controller_name: "fulgur.dev/gateway-controller",
            address_pools: &[],
            now,
        },
        snapshot,
    )
}

#[test]
fn a_folder_of_manifests_becomes_a_snapshot() {
    let dir = Dir::new(&[("all.yaml", MANIFESTS), ("notes.txt", "not yaml: [")]);
    let loaded = file::load(dir.path(), &mut file::History::default(), SEEN).unwrap();
    let s = loaded.snapshot;
    assert_eq!(
        (
            s.classes.len(),
            s.gateways.len(),
            s.routes.len(),
            s.services.len()
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(s.gateways[0].listeners[0].from, FromNamespaces::All);
    assert_eq!(s.routes[0].kind, RouteKind::Tcp);
    assert_eq!(s.routes[0].backend_refs[0].weight, 3);
    assert_eq!(
        s.routes[0].meta.creation_timestamp, "2026-01-01T00:00:00Z",
        "a manifest's timestamp is honoured"
    );
    assert_eq!(
        s.gateways[0].meta.creation_timestamp, "2026-06-01T00:00:00Z",
        "else the first-seen time"
    );
    // Ready and not terminating (unset ready counts as ready).
    let ready: Vec<String> = s.endpoint_slices[0]
        .ready_addresses
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(ready, ["203.0.113.2", "203.0.113.5"]);
    // endpoints[].nodeName, where set (empty is unknown).
    assert_eq!(
        s.endpoint_slices[0].nodes,
        [("203.0.113.2".parse().unwrap(), "node-1".to_owned())].into()
    );
    assert_eq!(s.classes[0].name, "fulgur");
}

#[test]
fn an_unknown_field_is_reported_with_file_and_line() {
    let bad = MANIFESTS.replace(
        "  - backendRefs: [{name: web, port: 8080, weight: 3}]",
        "  - backendRef: [{name: web, port: 8080}]",
    );
    let dir = Dir::new(&[("a.yaml", &bad)]);
    let errors = file::load(dir.path(), &mut file::History::default(), SEEN).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let line = bad.lines().position(|l| l.contains("backendRef:")).unwrap() + 1;
    assert_eq!(errors[0].line, line, "{}", errors[0]);
    assert!(errors[0].file.ends_with("a.yaml"));
    assert!(errors[0].message.contains("backendRef"), "{}", errors[0]);

    // In flow style too.
    let bad = MANIFESTS.replace(
        "parentRefs: [{name: gw, namespace: infra}]",
        "parentRefs: [{name: gw, namespace: infra, sektionName: tcp}]",
    );
    assert_ne!(bad, MANIFESTS);
    let dir = Dir::new(&[("a.yaml", &bad)]);
    let errors = file::load(dir.path(), &mut file::History::default(), SEEN).unwrap_err();
    let line = bad
        .lines()
        .position(|l| l.contains("sektionName:"))
        .unwrap()
        + 1;
    assert_eq!(errors[0].line, line, "{}", errors[0]);
    assert!(errors[0].message.contains("sektionName"), "{}", errors[0]);
}

#[test]
fn broken_yaml_is_reported_and_nothing_is_returned() {
    let dir = Dir::new(&[
        ("good.yaml", MANIFESTS),
        (
            "broken.yml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x\n",
        ),
    ]);
    let errors = file::load(dir.path(), &mut file::History::default(), SEEN).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].file.ends_with("broken.yml"));
    assert!(errors[0].line >= 3, "{}", errors[0]);
}

#[test]
fn statuses_survive_a_controller_restart() {
    let dir = Dir::new(&[("all.yaml", MANIFESTS)]);
    let snapshot = file::load(dir.path(), &mut file::History::default(), SEEN)
        .unwrap()
        .snapshot;
    let out = translate_at(&snapshot, "T1");
    assert_eq!(out.services[0].backends.len(), 2);
    let text = status::render(&status::documents(&out));
    assert!(
        text.contains("kind: TCPRoute")
            && text.contains("lastTransitionTime: T1")
            && text.contains("status: 'True'"),
        "{text}"
    );
    let file = dir.path().join("status.out");
    status::write_atomically(&file, &text).unwrap();

    // A restarted controller reads it back: nothing changed, so the times stay.
    let previous = status::read_previous(&file);
    let mut again = snapshot.clone();
    again.previous_conditions = previous.conditions;
    again.previous_addresses = previous.addresses;
    let out = translate_at(&again, "T2");
    let route = &out.routes[&(RouteKind::Tcp, ObjectRef::new("apps", "web"))];
    assert!(
        route.parents[0]
            .conditions
            .iter()
            .all(|c| c.last_transition_time == "T1")
    );
    assert_eq!(status::render(&status::documents(&out)), text);
}

#[test]
fn the_standalone_example_manifests_are_valid_and_complete() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/standalone");
    let snapshot = file::load(&dir, &mut file::History::default(), SEEN)
        .unwrap()
        .snapshot;
    let out = translate_at(&snapshot, "T");
    let ports: Vec<u32> = out.services.iter().map(|s| s.port).collect();
    assert_eq!(ports, [53, 80]);
    assert!(
        out.routes
            .values()
            .all(|r| r.parents[0].conditions.iter().all(|c| c.status)),
        "{:?}",
        out.routes
    );
}

#[test]
fn generations_grow_when_an_object_changes() {
    let dir = Dir::new(&[("all.yaml", MANIFESTS)]);
    let mut history = file::History::default();
    let generation = |history: &mut file::History| {
        let s = file::load(dir.path(), history, SEEN).unwrap().snapshot;
        (s.routes[0].meta.generation, s.gateways[0].meta.generation)
    };
    assert_eq!(generation(&mut history), (1, 1));
    assert_eq!(
        generation(&mut history),
        (1, 1),
        "reading again changes nothing"
    );
    std::fs::write(
        dir.path().join("all.yaml"),
        MANIFESTS.replace("weight: 3", "weight: 4"),
    )
    .unwrap();
    assert_eq!(
        generation(&mut history),
        (2, 1),
        "only the edited route moves on"
    );
    // A broken folder leaves the history alone.
    std::fs::write(dir.path().join("bad.yaml"), "kind: [").unwrap();
    assert!(file::load(dir.path(), &mut history, SEEN).is_err());
    std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
    assert_eq!(generation(&mut history), (2, 1));
}

#[test]
fn what_the_api_server_would_refuse_is_refused() {
    let cases = [
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {name: r}\n\
             spec:\n  parentRefs: [{name: gw}]\n  rules:\n  - backendRefs: [{name: a, port: 1}]\n  \
             - backendRefs: [{name: b, port: 1}]\n",
            "exactly one rule",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
             spec:\n  gatewayClassName: fulgur\n  listeners:\n  \
             - {name: tcp, port: 80, protocol: TCP, hostname: a.example}\n",
            "hostname and tls are not allowed for TCP",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
             spec:\n  gatewayClassName: fulgur\n  listeners:\n  - name: tcp\n    port: 80\n    \
             protocol: TCP\n    allowedRoutes:\n      namespaces:\n        from: Selector\n        \
             selector: {matchExpressions: [{key: team, operator: Near}]}\n",
            "unknown label selector operator",
        ),
    ];
    for (manifest, expected) in cases {
        let dir = Dir::new(&[("bad.yaml", manifest)]);
        let errors = file::load(dir.path(), &mut file::History::default(), SEEN).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains(expected), "{}", errors[0]);
    }
    // The same rules as v1alpha2 allows several.
    let several = cases[0].0.replace("/v1\n", "/v1alpha2\n");
    let dir = Dir::new(&[("ok.yaml", several.as_str())]);
    let loaded = file::load(dir.path(), &mut file::History::default(), SEEN).unwrap();
    assert_eq!(loaded.snapshot.routes[0].backend_refs.len(), 2);
}

/// An unnamed Service port and its EndpointSlice exactly as the EndpointSlice controller writes
/// it: the slice port's name is an empty string, with protocol, nodeName, zone, targetRef and
/// all three conditions set.
const UNNAMED_PORT: &str = r#"
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
  addresses: [{type: IPAddress}]
  listeners: [{name: tcp, port: 80, protocol: TCP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: web, namespace: apps}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec:
  type: ClusterIP
  clusterIP: 198.51.100.200
  clusterIPs: [198.51.100.200]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  internalTrafficPolicy: Cluster
  sessionAffinity: None
  selector: {app: web}
  ports:
  - {port: 8080, protocol: TCP, targetPort: 3000}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x7k2p
  generateName: web-
  namespace: apps
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
  ownerReferences:
  - {apiVersion: v1, kind: Service, name: web, uid: 0b5d2c1e-5b7c-4c1f-9a57-2f1a3e6b7c01, controller: true, blockOwnerDeletion: true}
addressType: IPv4
endpoints:
- addresses: [203.0.113.2]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: kind-worker
  zone: zone-a
  targetRef: {kind: Pod, name: web-5d9c7b8f6-abcde, namespace: apps, uid: 6f1c2d3e-1111-2222-3333-444455556666}
ports:
- {name: "", port: 3000, protocol: TCP}
"#;

/// translate with a pool of two addresses.
fn translate_with_pool(
    snapshot: &fulgur_controller::model::Snapshot,
) -> fulgur_controller::translate::Output {
    translate(
        &Config {
            controller_name: "fulgur.dev/gateway-controller",
            address_pools: &["192.0.2.0/30".parse().unwrap()],
            now: "T",
        },
        snapshot,
    )
}

#[test]
fn an_unnamed_service_port_reaches_its_endpoints() {
    let dir = Dir::new(&[("all.yaml", UNNAMED_PORT)]);
    let snapshot = file::load(dir.path(), &mut file::History::default(), SEEN)
        .unwrap()
        .snapshot;
    let out = translate_with_pool(&snapshot);
    assert_eq!(out.services.len(), 1, "{out:?}");
    let service = &out.services[0];
    assert_eq!(
        service.vip, "192.0.2.1",
        "{{type: IPAddress}} asks the pool"
    );
    let backends: Vec<String> = service
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.address, b.port))
        .collect();
    assert_eq!(backends, ["203.0.113.2:3000"]);
    assert_eq!(service.reject_weight, 0, "nothing is rejected");
    assert!(
        out.backend_refs
            .values()
            .all(|s| *s == fulgur_controller::translate::BackendRefState::Ready),
        "{:?}",
        out.backend_refs
    );
}

#[test]
fn a_service_without_endpoints_is_reported() {
    // The Deployment scaled to zero: the EndpointSlice controller writes `endpoints: null`.
    let start = UNNAMED_PORT.find("endpoints:\n").unwrap();
    let end = UNNAMED_PORT.rfind("ports:\n").unwrap();
    let manifests = format!(
        "{}endpoints: null\n{}",
        &UNNAMED_PORT[..start],
        &UNNAMED_PORT[end..]
    );
    let dir = Dir::new(&[("all.yaml", &manifests)]);
    let snapshot = file::load(dir.path(), &mut file::History::default(), SEEN)
        .unwrap()
        .snapshot;
    let out = translate_with_pool(&snapshot);
    assert!(out.services[0].backends.is_empty());
    assert!(out.services[0].reject_weight > 0);
    let (key, state) = out.backend_refs.iter().next().unwrap();
    assert_eq!(
        *state,
        fulgur_controller::translate::BackendRefState::NoEndpoints
    );
    assert_eq!(key.service, ObjectRef::new("apps", "web"));
    let metrics = fulgur_controller::metrics::Metrics::new();
    let started = fulgur_controller::backends::EmptyBackends::default().update(&out, &metrics);
    assert_eq!(started, std::slice::from_ref(key));
    let text = metrics.encode();
    assert!(
        text.contains("fulgur_controller_backend_refs{state=\"no_endpoints\"} 1")
            && text.contains("fulgur_controller_backend_refs{state=\"ready\"} 0"),
        "{text}"
    );
}

#[test]
fn statuses_as_the_crds_and_other_controllers_write_them_are_read() {
    // The v1.6 CRDs default a Gateway's conditions without observedGeneration; another
    // controller wrote a parents entry with only the required fields.
    let text = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: apps}
status:
  conditions:
  - {type: Accepted, status: Unknown, reason: Pending, message: Waiting for controller, lastTransitionTime: "1970-01-01T00:00:00Z"}
  - {type: Programmed, status: Unknown, reason: Pending, message: Waiting for controller, lastTransitionTime: "1970-01-01T00:00:00Z"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: web, namespace: apps}
status:
  parents:
  - parentRef: {name: theirs}
    controllerName: example.com/other
    conditions:
    - {type: Accepted, status: "True", reason: Accepted, message: "", lastTransitionTime: "2026-01-01T00:00:00Z"}
  - parentRef: {group: gateway.networking.k8s.io, kind: Gateway, namespace: apps, name: gw}
    controllerName: fulgur.dev/gateway-controller
    conditions:
    - {type: Accepted, status: "True", reason: Accepted, message: "", observedGeneration: 1, lastTransitionTime: T1}
  - {controllerName: example.com/odd, parentRef: "not an object", extra: [1, 2]}
"#;
    let docs: Vec<status::ObjectStatus> = serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let gateway = &docs[0].status;
    assert_eq!(gateway.conditions.len(), 2);
    assert_eq!(gateway.conditions[0].observed_generation, None);
    let parents = &docs[1].status.parents;
    assert_eq!(parents.len(), 3, "every entry is kept");
    assert!(parents[0].doc.is_some() && parents[1].doc.is_some());
    assert!(parents[2].doc.is_none(), "unreadable, kept as it was");
    assert_eq!(parents[2].controller_name(), Some("example.com/odd"));
    // Written back, each entry is exactly what was read.
    let original: serde_json::Value =
        serde_yaml::from_str(text.split("---").nth(1).unwrap()).unwrap();
    let written = serde_json::to_value(&docs[1].status).unwrap();
    assert_eq!(written["parents"], original["status"]["parents"]);
    // Unknown conditions continue nothing; our route entry's time is kept.
    let previous = status::Previous::from_documents(&docs);
    let gateway_key = fulgur_controller::translate::gateway_key(&ObjectRef::new("apps", "gw"));
    assert!(previous.conditions[&gateway_key].is_empty());
    assert!(
        previous
            .conditions
            .values()
            .flatten()
            .any(|c| c.last_transition_time == "T1")
    );
}
