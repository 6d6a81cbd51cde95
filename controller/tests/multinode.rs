//! The standalone controller binary with two agents on two nodes (`--agent n1=URL --agent
//! n2=URL`), both fake agents over real gRPC: which agent gets which backends as remote, who
//! announces the pooled Gateway address, the lease renewal, failover when the announcer stops
//! answering, and what the status file says meanwhile.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fulgur_proto::v1;
use fulgur_testkit::{
    fake_agent::{Fake, serve_until},
    process::{ChildInDir, free_local_addr},
};

const LEASE: Duration = Duration::from_millis(300);
const FAILOVER: Duration = Duration::from_millis(900);
const ADDRESS: &str = "198.51.100.1";

const MANIFESTS: &str = r#"
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
  listeners: [{name: tcp, port: 80, protocol: TCP}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: web, namespace: apps}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec: {ports: [{port: 8080, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: apps
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- addresses: [203.0.113.1]
  nodeName: n1
- addresses: [203.0.113.2]
  nodeName: n2
- addresses: [203.0.113.3]
"#;

/// An agent on a fixed address that can be stopped and started again (a new agent process).
struct Node {
    addr: SocketAddr,
    fake: Fake,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Node {
    async fn start(addr: SocketAddr) -> Node {
        Node::start_like(addr, Fake::current()).await
    }

    /// An agent that lists the features `fake` lists.
    async fn start_like(addr: SocketAddr, fake: Fake) -> Node {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        serve_until(fake.clone(), addr, stopped).await;
        Node {
            addr,
            fake,
            stop: Some(stop),
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    fn last(&self) -> Option<v1::DesiredState> {
        self.fake.applied.lock().unwrap().last().cloned()
    }

    fn announces(&self) -> bool {
        self.last()
            .is_some_and(|s| s.announce.iter().any(|a| a == ADDRESS))
    }

    /// When it applied the first state since `since` that announces the address.
    fn first_announcing(&self, since: Instant) -> Option<Instant> {
        let applied = self.fake.applied.lock().unwrap();
        let at = self.fake.applied_at.lock().unwrap();
        applied
            .iter()
            .zip(at.iter())
            .find(|(s, t)| **t >= since && s.announce.iter().any(|a| a == ADDRESS))
            .map(|(_, t)| *t)
    }
}

fn programmed(status_file: &Path) -> Option<(String, String, String)> {
    let text = std::fs::read_to_string(status_file).ok()?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).ok()?;
        if value["kind"] != "Gateway" {
            continue;
        }
        let c = value["status"]["conditions"]
            .as_sequence()?
            .iter()
            .find(|c| c["type"] == "Programmed")?;
        let field = |f: &str| c[f].as_str().unwrap_or_default().to_owned();
        return Some((field("status"), field("reason"), field("message")));
    }
    None
}

/// The route's condition of `type_` in the status file: (status, reason, message).
fn route_condition(status_file: &Path, type_: &str) -> Option<(String, String, String)> {
    let text = std::fs::read_to_string(status_file).ok()?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).ok()?;
        if value["kind"] != "TCPRoute" {
            continue;
        }
        let c = value["status"]["parents"][0]["conditions"]
            .as_sequence()?
            .iter()
            .find(|c| c["type"] == type_)?;
        let field = |f: &str| c[f].as_str().unwrap_or_default().to_owned();
        return Some((field("status"), field("reason"), field("message")));
    }
    None
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn remote_marks(state: &v1::DesiredState) -> Vec<(String, bool)> {
    state.services[0]
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.remote))
        .collect()
}

/// The standalone controller on `nodes` (n1, n2, ...) with a manifest folder holding
/// `manifests`, under a folder of its own.
fn controller(name: &str, manifests: &str, nodes: &[Node]) -> (ChildInDir, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("fulgur-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/all.yaml"), manifests).unwrap();
    let status_file = dir.join("status.yaml");
    let mut command = Command::new(env!("CARGO_BIN_EXE_fulgur-controller"));
    command
        .args(["--provider", "file", "--insecure"])
        .arg("--manifests")
        .arg(dir.join("manifests"))
        .arg("--status-file")
        .arg(&status_file)
        .args(["--address-pool", "198.51.100.0/30"])
        .args(["--announce-lease", "300ms", "--announce-failover", "900ms"]);
    for (i, node) in nodes.iter().enumerate() {
        command.args(["--agent", &format!("n{}=http://{}", i + 1, node.addr)]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (ChildInDir { child, dir }, status_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_announcer_remote_backends_and_failover() {
    let mut nodes = [
        Node::start(free_local_addr()).await,
        Node::start(free_local_addr()).await,
    ];
    let (_controller, status_file) = controller("multinode", MANIFESTS, &nodes);

    // Each node: its own endpoint local, the other's remote, the one without nodeName local.
    eventually("both agents programmed", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|n| n.last().is_some_and(|s| !s.services.is_empty()))
    })
    .await;
    let n1 = nodes[0].last().unwrap();
    let n2 = nodes[1].last().unwrap();
    assert_eq!(
        remote_marks(&n1),
        [
            ("203.0.113.1".into(), false),
            ("203.0.113.2".into(), true),
            ("203.0.113.3".into(), false)
        ]
    );
    assert_eq!(
        remote_marks(&n2),
        [
            ("203.0.113.1".into(), true),
            ("203.0.113.2".into(), false),
            ("203.0.113.3".into(), false)
        ]
    );
    assert_eq!(n1.announce_lease_ms, 300);

    // Exactly one node announces the pooled address; the status says which. (At start the
    // first agent in contact may take it and hand it to the hash's winner once that one is in.)
    let announcers = |nodes: &[Node]| -> Vec<usize> {
        (0..nodes.len()).filter(|i| nodes[*i].announces()).collect()
    };
    eventually(
        "Programmed by the one announcer",
        Duration::from_secs(10),
        || {
            let now = announcers(&nodes);
            now.len() == 1
                && programmed(&status_file).is_some_and(|(s, r, m)| {
                    s == "True"
                        && r == "Programmed"
                        && m == format!("announced: {ADDRESS} by node n{}", now[0] + 1)
                })
        },
    )
    .await;
    let owner = announcers(&nodes)[0];
    let other = 1 - owner;
    // Rendezvous is deterministic: the same node wins whichever agent came first.
    let winner = 1; // n1 wins 198.51.100.1 (the hash of (address, node) is fixed)
    assert_eq!(owner + 1, winner);

    // The lease is renewed: no gap between RPCs reaches the lease.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in &nodes {
        let rpcs = node.fake.rpcs.lock().unwrap().clone();
        let recent: Vec<Instant> = rpcs
            .iter()
            .copied()
            .filter(|t| t.elapsed() < Duration::from_millis(900))
            .collect();
        let gap = recent
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(Duration::MAX);
        assert!(
            recent.len() >= 3 && gap < LEASE,
            "{} RPCs, gap {gap:?}",
            recent.len()
        );
    }

    // The announcer stops answering: the other takes over only after the failover bound
    // since the last RPC the lost one received, and within a bound.
    nodes[owner].stop();
    let stopped = Instant::now();
    let mut saw_failing_over = false;
    eventually("the other node announces", Duration::from_secs(5), || {
        saw_failing_over |= programmed(&status_file).is_some_and(|(_, r, _)| r == "FailingOver");
        nodes[other].announces()
    })
    .await;
    let took_over = nodes[other].first_announcing(stopped).unwrap();
    let last_rpc = *nodes[owner].fake.rpcs.lock().unwrap().last().unwrap();
    assert!(
        took_over >= last_rpc + FAILOVER,
        "taken over {:?} after the lost agent's last RPC",
        took_over - last_rpc
    );
    let failover_time = took_over - stopped;
    eprintln!("failover took {failover_time:?} after the agent stopped");
    assert!(
        failover_time < FAILOVER + Duration::from_millis(800),
        "{failover_time:?}"
    );
    assert!(
        saw_failing_over,
        "Programmed=False/FailingOver while failing over"
    );
    let other_name = format!("n{}", other + 1);
    eventually(
        "Programmed by the other node",
        Duration::from_secs(3),
        || programmed(&status_file).is_some_and(|(s, _, m)| s == "True" && m.contains(&other_name)),
    )
    .await;

    // The lost agent comes back (a new process, nothing applied): its first state does not
    // announce; it gets the address back (it wins the hash) only after the other gave it up.
    let addr = nodes[owner].addr;
    let restarted = Instant::now();
    nodes[owner] = Node::start(addr).await;
    eventually(
        "the returning node announces again",
        Duration::from_secs(5),
        || nodes[owner].announces(),
    )
    .await;
    let first = nodes[owner].fake.applied.lock().unwrap()[0].clone();
    assert!(first.announce.is_empty(), "{first:?}");
    let back = nodes[owner].first_announcing(restarted).unwrap();
    let given_up = {
        let applied = nodes[other].fake.applied.lock().unwrap();
        let at = nodes[other].fake.applied_at.lock().unwrap();
        applied
            .iter()
            .zip(at.iter())
            .rev()
            .find(|(s, _)| s.announce.is_empty())
            .map(|(_, t)| *t)
            .expect("the other node gave the address up")
    };
    assert!(given_up <= back, "never two announcers");
    assert!(!nodes[other].announces());
}

/// The announcer goes off the network while the controller pushes a change to it: the Apply
/// hangs (no answer, the connection open). The agent counts as lost after the lease, and its
/// address moves after the failover bound, not after the Apply's 30 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_apply_does_not_hold_the_address() {
    let nodes = [
        Node::start(free_local_addr()).await,
        Node::start(free_local_addr()).await,
    ];
    let (running, status_file) = controller("multinode-stall", MANIFESTS, &nodes);
    let dir = running.dir.clone();
    eventually("one announcer", Duration::from_secs(10), || {
        nodes.iter().filter(|n| n.announces()).count() == 1
            && programmed(&status_file).is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    let owner = (0..2).find(|i| nodes[*i].announces()).unwrap();
    let other = 1 - owner;

    nodes[owner]
        .fake
        .stall_apply
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let stalled = Instant::now();
    // A new endpoint: every agent's view changes, so an Apply goes to the stalled one.
    std::fs::write(
        dir.join("manifests/all.yaml"),
        format!("{MANIFESTS}- addresses: [203.0.113.4]\n  nodeName: n2\n"),
    )
    .unwrap();
    eventually("the other node announces", Duration::from_secs(5), || {
        nodes[other].announces()
    })
    .await;
    let moved = nodes[other].first_announcing(stalled).unwrap() - stalled;
    eprintln!("moved {moved:?} after the announcer stopped answering Apply");
    assert!(moved < FAILOVER + Duration::from_millis(800), "{moved:?}");
}

/// web's only pod runs on n2.
const ON_N2_ONLY: &str = "
- addresses: [203.0.113.2]
  nodeName: n2
  conditions: {ready: true, serving: true, terminating: false}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_remote_backends_is_named_where_it_rejects() {
    use fulgur_proto::features;
    let manifests =
        MANIFESTS.split("endpoints:").next().unwrap().to_owned() + "endpoints:" + ON_N2_ONLY;
    // n1's agent does not list "remote-backends" (an older agent, or --snat never).
    let mut nodes = [
        Node::start_like(
            free_local_addr(),
            Fake::with_features(&[features::ANNOUNCE]),
        )
        .await,
        Node::start(free_local_addr()).await,
    ];
    let (_controller, status_file) = controller("local-only", &manifests, &nodes);
    eventually("both agents programmed", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|n| n.last().is_some_and(|s| !s.services.is_empty()))
    })
    .await;
    // What the dataplane does: n1 has no backend and rejects; n2 forwards to its pod.
    let n1 = nodes[0].last().unwrap();
    assert!(n1.services[0].backends.is_empty(), "{n1:?}");
    assert!(n1.services[0].reject_weight > 0, "{n1:?}");
    assert_eq!(
        remote_marks(&nodes[1].last().unwrap()),
        [("203.0.113.2".into(), false)]
    );
    // What the status says: the route names n1, which also announces the address (it wins
    // 198.51.100.1), while the Gateway is Programmed and the refs resolve.
    eventually("the route names n1", Duration::from_secs(10), || {
        route_condition(&status_file, "EveryNodeReachesBackends").is_some_and(|(s, r, m)| {
            s == "False"
                && r == "NoLocalEndpoints"
                && m.starts_with(&format!(
                    "new flows are rejected on node n1 (announcing {ADDRESS}): no endpoint"
                ))
        })
    })
    .await;
    assert_eq!(
        route_condition(&status_file, "ResolvedRefs").map(|c| c.0),
        Some("True".into())
    );
    assert_eq!(programmed(&status_file).map(|c| c.0), Some("True".into()));

    // n1's agent is replaced by one with SNAT: it gets the pod as a remote backend, and the
    // condition goes.
    let addr = nodes[0].addr;
    nodes[0].stop();
    // The old server lets go of the port once the controller's connection is gone.
    eventually("the port is free", Duration::from_secs(10), || {
        std::net::TcpListener::bind(addr).is_ok()
    })
    .await;
    nodes[0] = Node::start(addr).await;
    eventually(
        "n1 carries the remote backend",
        Duration::from_secs(10),
        || {
            nodes[0]
                .last()
                .is_some_and(|s| remote_marks(&s) == [("203.0.113.2".into(), true)])
        },
    )
    .await;
    eventually("the condition goes", Duration::from_secs(10), || {
        std::fs::read_to_string(&status_file).is_ok_and(|t| t.contains("kind: TCPRoute"))
            && route_condition(&status_file, "EveryNodeReachesBackends").is_none()
    })
    .await;
}
