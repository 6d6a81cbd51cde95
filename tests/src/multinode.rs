//! A multi-node kind cluster in namespaces ([`crate::kind_node`]) with the real agent on every
//! node's eth0 (gRPC, plaintext) and the real controller in the host namespace programming them
//! all: standalone (`--agent NODE=URL`, a manifests folder) or the Kubernetes provider against the
//! in-process fake API server (agent pods with `spec.nodeName`). Gateways without addresses get
//! theirs from `--address-pool` inside the node network, so the host reaches them on-link.
//!
//! ```text
//! host (kind0 198.51.100.1) ── n0-eth ═ node 0 eth0 [agent]  pods 203.0.113.2, .3
//!   controller (host ns)    └─ n1-eth ═ node 1 eth0 [agent]  pods 203.0.113.34, .35
//! Gateway gw4 ← 198.51.100.200 (pool), gw6 ← 2001:db8:d0c::200 (pool): TCP 80, UDP 53 → pods :8080
//! ```
//!
//! [`Watch`] records every ARP reply, gratuitous ARP and neighbour advertisement each node sends
//! for the Gateway addresses (captured on the node's bridge port, so the sender is known) while
//! an observer on the bridge asks for them every [`PROBE_EVERY`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::programs::links::FdLink;
use etherparse::ArpOperation;
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_testkit::fake_kube::FakeKube;
use serde_json::Value;

use crate::{
    announce::{RawSocket, is_advertisement, is_arp, solicitation_frame},
    corpus,
    echo::EchoServer,
    kind_node::{self, KindCluster, KindSpec, NETWORK_BRIDGE, NODE_IFACE, Netfilter},
    netns::{NetNs, in_netns, unique_token},
    topology::{AgentProcess, Launch, Source, attach_pass},
};

/// Node names as kind names them (what `spec.nodeName` and EndpointSlice `nodeName` carry).
pub const NODE_NAMES: [&str; 3] = ["fulgur-control-plane", "fulgur-worker", "fulgur-worker2"];
pub const GRPC_PORT: u16 = 50051;
pub const METRICS_PORT: u16 = 9464;
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const POD_PORT: u16 = 8080;
/// One IPv4 and one IPv6 address for the two Gateways (the IPv4 pool has one address, so the
/// second Gateway gets the IPv6 one).
pub const POOLS: [&str; 2] = ["198.51.100.200/32", "2001:db8:d0c::200/128"];
/// The Gateways, one per family; both list no address.
pub const GATEWAYS: [&str; 2] = ["gw4", "gw6"];
pub const NAMESPACE: &str = "apps";
/// A neighbour on the node network that only asks for the Gateway addresses: its questions
/// leave the host kernel's own neighbour entries alone.
pub const OBSERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
pub const OBSERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xd0c, 0, 0, 0, 0, 3);
pub const OBSERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
const SIZES: [&str; 6] = [
    "--max-services",
    "16",
    "--max-backends",
    "64",
    "--table-size",
    "251",
];

/// The cluster, an agent per node and the echo servers on every pod. Everything goes on drop.
pub struct Bed {
    /// `None` while a node's agent is down.
    pub agents: Vec<Option<AgentProcess>>,
    /// Each node's eth0 MAC.
    pub macs: Vec<[u8; 6]>,
    pub mode: XdpAttachMode,
    _servers: Vec<EchoServer>,
    /// Native XDP on veth delivers XDP_TX frames only to a peer running XDP.
    _peer_links: Vec<FdLink>,
    pub cluster: KindCluster,
    /// Manifests, status file, logs, kubeconfig.
    pub work: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

impl Bed {
    /// `nodes` kind nodes with kube-proxy's and kindnet's iptables rules, two pods each, echo
    /// servers on every pod, an agent on every node. With `warm_neighbours` the nodes have
    /// talked to each other and to their gateway (their neighbour entries are filled), as nodes
    /// of a running cluster have.
    pub fn new(nodes: usize, mode: XdpAttachMode, warm_neighbours: bool) -> anyhow::Result<Self> {
        let cluster = KindCluster::new(&KindSpec {
            nodes,
            pods_per_node: 2,
            netfilter: Netfilter::Iptables,
            ..KindSpec::default()
        })?;
        // What one node sends another crosses the docker network with full checksums, as off a
        // real wire: the other node's XDP rewrites SNATed replies in place.
        for node in &cluster.nodes {
            node.ns.exec("ethtool", &["-K", NODE_IFACE, "tx", "off"])?;
        }
        let mut servers = Vec::new();
        for i in 0..nodes {
            servers.extend(cluster.start_echo_servers(i, POD_PORT)?);
        }
        let mut peer_links = Vec::new();
        if mode == XdpAttachMode::Native {
            for i in 0..nodes {
                peer_links.push(attach_pass(&cluster.host, &bridge_port(i))?);
            }
        }
        let macs = cluster
            .nodes
            .iter()
            .map(|n| {
                in_netns(&n.ns, || {
                    Ok(fulgur_agent::announce::hardware_address(NODE_IFACE)?)
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let work = std::env::temp_dir().join(unique_token("fulgur-multinode-"));
        if warm_neighbours {
            warm(&cluster)?;
        }
        std::fs::create_dir_all(work.join("manifests"))?;
        let mut bed = Bed {
            agents: Vec::new(),
            macs,
            mode,
            _servers: servers,
            _peer_links: peer_links,
            cluster,
            work,
        };
        for i in 0..nodes {
            let agent = bed.start_agent(i, None)?;
            bed.agents.push(Some(agent));
        }
        Ok(bed)
    }

    /// Every node talks to every other and to its gateway once, so their neighbour entries
    /// hold a MAC (what cluster traffic does on running nodes).
    pub fn warm_neighbours(&self) -> anyhow::Result<()> {
        warm(&self.cluster)
    }

    pub fn nodes(&self) -> usize {
        self.cluster.nodes.len()
    }

    /// Node `i`'s agent as the DaemonSet runs it (its capabilities), on a fresh bpffs folder or
    /// on the pins of a killed one.
    pub fn start_agent(&self, i: usize, pins: Option<PathBuf>) -> anyhow::Result<AgentProcess> {
        let addr = IpAddr::from(kind_node::node_addr(i));
        let pins =
            pins.unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgmn"))));
        AgentProcess::start_launched(
            &self.cluster.nodes[i].ns,
            NODE_IFACE,
            self.mode,
            Source::Grpc {
                listen: SocketAddr::new(addr, GRPC_PORT),
                tls: None,
                metrics: Some(SocketAddr::new(addr, METRICS_PORT)),
            },
            pins,
            &SIZES,
            &Launch::deployed(),
        )
        .with_context(|| format!("agent on node {i}"))
    }

    /// Restarts node `i`'s agent on the pins of the one that was killed.
    pub fn restart_agent(&mut self, i: usize, pins: PathBuf) -> anyhow::Result<()> {
        let agent = self.start_agent(i, Some(pins))?;
        self.agents[i] = Some(agent);
        Ok(())
    }

    /// SIGKILLs node `i`'s agent; its pinned dataplane stays (as after a crash). The pins.
    pub fn kill_agent(&mut self, i: usize) -> anyhow::Result<PathBuf> {
        let agent = self.agents[i].take().context("the agent is not running")?;
        Ok(agent.kill_and_keep_pins())
    }

    pub fn agent(&self, i: usize) -> anyhow::Result<&AgentProcess> {
        self.agents[i].as_ref().context("the agent is not running")
    }

    /// Node `i`'s cable: its port on the docker network's bridge goes down or up.
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        self.cluster
            .host
            .ip(&["link", "set", &bridge_port(i), state])
            .map(drop)
    }

    pub fn agent_url(i: usize) -> String {
        format!("http://{}:{GRPC_PORT}", kind_node::node_addr(i))
    }

    /// The node that runs `name`.
    pub fn node_named(&self, name: &str) -> anyhow::Result<usize> {
        NODE_NAMES[..self.nodes()]
            .iter()
            .position(|n| *n == name)
            .with_context(|| format!("no node {name}"))
    }

    /// The pod names of these nodes.
    pub fn pods_of(&self, nodes: &[usize]) -> Vec<String> {
        nodes
            .iter()
            .flat_map(|i| self.cluster.nodes[*i].pods.iter().map(|p| p.name.clone()))
            .collect()
    }

    /// The host kernel's neighbour entry for `address` on the bridge: (lladdr, state).
    pub fn host_neighbour(&self, address: IpAddr) -> Option<(String, String)> {
        let out = self
            .cluster
            .host
            .ip(&["neigh", "show", &address.to_string(), "dev", NETWORK_BRIDGE])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let words: Vec<&str> = text.split_whitespace().collect();
        let state = words.last()?.to_string();
        let lladdr = words
            .iter()
            .position(|w| *w == "lladdr")
            .and_then(|i| words.get(i + 1))
            .map_or(String::new(), |w| w.to_string());
        Some((lladdr, state))
    }

    /// Starts the standalone controller in the host namespace on `manifests` (written to the
    /// manifests folder), with an `--agent NODE=URL` per node and the pools.
    pub fn start_file_controller(&self, manifests: &str) -> anyhow::Result<Controller> {
        let dir = self.work.join("manifests");
        std::fs::write(dir.join("cluster.yaml"), manifests)?;
        let status_file = self.work.join("status.yaml");
        let mut command = self.cluster.host.command(crate::controller_binary());
        command
            .args(["--provider", "file", "--insecure", "--manifests"])
            .arg(&dir)
            .arg("--status-file")
            .arg(&status_file);
        for (i, name) in NODE_NAMES.iter().enumerate().take(self.nodes()) {
            command
                .arg("--agent")
                .arg(format!("{name}={}", Bed::agent_url(i)));
        }
        let child = self.spawn_controller(command)?;
        Ok(Controller {
            child,
            log: self.work.join("controller.log"),
            provider: Provider::File {
                manifests: dir,
                status_file,
            },
        })
    }

    /// Starts the fake API server (listening in the host namespace) holding `manifests` and an
    /// agent pod per node, and the controller binary with `--provider kubernetes` on it.
    pub fn start_kube_controller(&self, manifests: &str) -> anyhow::Result<Controller> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let fake = {
            // The listener is bound in the host namespace, where the controller runs.
            let _inside = self.cluster.host.enter()?;
            runtime.block_on(FakeKube::start())
        };
        // The routes at v1alpha2, as the manifests write them (Gateway API before 1.5).
        fake.serve_gateway_api("v1alpha2", "v1beta1");
        fake.apply_yaml(manifests);
        for i in 0..self.nodes() {
            fake.apply(agent_pod(i));
        }
        let kubeconfig = self.work.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
                 users: [{{name: fake, user: {{}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
                fake.url()
            ),
        )?;
        let mut command = self.cluster.host.command(crate::controller_binary());
        command
            .args([
                "--provider=kubernetes",
                "--insecure",
                "--identity=multinode",
                "--lease-namespace=fulgur-system",
                "--agent-namespace=fulgur-system",
                "--agent-selector=app.kubernetes.io/name=fulgur-agent",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME");
        let child = self.spawn_controller(command)?;
        Ok(Controller {
            child,
            log: self.work.join("controller.log"),
            provider: Provider::Kube {
                fake,
                _runtime: runtime,
            },
        })
    }

    fn spawn_controller(&self, mut command: std::process::Command) -> anyhow::Result<Child> {
        for pool in POOLS {
            command.args(["--address-pool", pool]);
        }
        command
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.work.join("controller.log"))?)
            .spawn()
            .context("starting the controller")
    }
}

/// Every node sends a datagram to every other node's addresses and to its gateway (the host),
/// and waits until its kernel has a neighbour entry for them.
fn warm(cluster: &KindCluster) -> anyhow::Result<()> {
    for node in &cluster.nodes {
        let others: Vec<IpAddr> = cluster
            .nodes
            .iter()
            .filter(|o| o.index != node.index)
            .flat_map(|o| [IpAddr::from(o.addr), o.addr6.into()])
            .chain([IpAddr::from(kind_node::HOST), kind_node::HOST6.into()])
            .collect();
        for other in &others {
            let other = *other;
            in_netns(&node.ns, move || {
                let socket = UdpSocket::bind(SocketAddr::new(unspecified(other), 0))?;
                socket.send_to(b"hello", SocketAddr::new(other, 9))?;
                Ok(())
            })?;
        }
        for other in others {
            eventually(
                &format!("node {} resolves {other}", node.index),
                Duration::from_secs(5),
                || {
                    node.ns
                        .ip(&["neigh", "show", &other.to_string(), "dev", NODE_IFACE])
                        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("lladdr"))
                },
            )?;
        }
    }
    Ok(())
}

/// The host's end of node `i`'s veth, a port of the docker network's bridge.
pub fn bridge_port(i: usize) -> String {
    format!("n{i}-eth")
}

/// An agent DaemonSet pod as the API server shows it for node `i`: host network, so its pod IPs
/// are the node's; the gRPC port found by its name.
pub fn agent_pod(i: usize) -> Value {
    let (v4, v6) = (kind_node::node_addr(i), kind_node::node_addr6(i));
    let name = format!("fulgur-agent-{}", ["x7k2p", "m4q9t", "b8w3z"][i]);
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": "fulgur-agent-",
            "namespace": "fulgur-system",
            "labels": {
                "app.kubernetes.io/name": "fulgur-agent",
                "controller-revision-hash": "6f9d8c7b5d",
                "pod-template-generation": "1",
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "fulgur-agent",
                "uid": "6b1f0a51-6f1e-4c1b-9a59-2d5c3e3c0a11",
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "nodeName": NODE_NAMES[i],
            "hostNetwork": true,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "serviceAccountName": "fulgur-agent",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "agent",
                "image": "fulgur:0.1.0",
                // With hostNetwork the API server defaults hostPort to containerPort.
                "ports": [
                    {"name": "grpc", "containerPort": GRPC_PORT, "hostPort": GRPC_PORT, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": METRICS_PORT, "hostPort": METRICS_PORT, "protocol": "TCP"},
                ],
            }],
            "tolerations": [{"operator": "Exists"}],
        },
        "status": {
            "phase": "Running",
            "hostIP": v4.to_string(),
            "hostIPs": [{"ip": v4.to_string()}, {"ip": v6.to_string()}],
            "podIP": v4.to_string(),
            "podIPs": [{"ip": v4.to_string()}, {"ip": v6.to_string()}],
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-12-03T18:00:00Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-03T18:00:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-12-03T18:00:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-03T18:00:00Z"},
            ],
        },
    })
}

/// The Gateway API objects: a GatewayClass, two Gateways without addresses (TCP 80, UDP 53), a
/// TCPRoute and a UDPRoute on both to the Service `echo`, and its EndpointSlices (IPv4, IPv6) as
/// the EndpointSlice controller writes them, with the pods of the `serving` nodes.
pub fn manifests(cluster: &KindCluster, serving: &[usize]) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: fulgur}}
spec: {{controllerName: fulgur.dev/gateway-controller}}
"#
    );
    for gateway in GATEWAYS {
        yaml += &format!(
            r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {gateway}, namespace: {NAMESPACE}}}
spec:
  gatewayClassName: fulgur
  listeners:
  - {{name: tcp, port: {TCP_PORT}, protocol: TCP}}
  - {{name: udp, port: {UDP_PORT}, protocol: UDP}}
"#
        );
    }
    let parents = |section: &str| {
        GATEWAYS
            .iter()
            .map(|g| format!("{{name: {g}, sectionName: {section}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    yaml += &format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: echo, namespace: {NAMESPACE}}}
spec:
  parentRefs: [{tcp}]
  rules: [{{backendRefs: [{{name: echo, port: {POD_PORT}}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: UDPRoute
metadata: {{name: echo, namespace: {NAMESPACE}}}
spec:
  parentRefs: [{udp}]
  rules: [{{backendRefs: [{{name: echo, port: {POD_PORT}}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NAMESPACE}}}
spec:
  type: ClusterIP
  clusterIP: 10.96.12.34
  clusterIPs: [10.96.12.34, "fd00:10:96::1234"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {{app: echo}}
  ports:
  - {{name: tcp, port: {POD_PORT}, protocol: TCP, targetPort: {POD_PORT}}}
  - {{name: udp, port: {POD_PORT}, protocol: UDP, targetPort: {POD_PORT}}}
"#,
        tcp = parents("tcp"),
        udp = parents("udp"),
    );
    for (family, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
        yaml += &format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-{suffix}
  generateName: echo-
  namespace: {NAMESPACE}
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: echo
addressType: {family}
ports:
- {{name: tcp, port: {POD_PORT}, protocol: TCP}}
- {{name: udp, port: {POD_PORT}, protocol: UDP}}
"#
        );
        let endpoints: Vec<String> = serving
            .iter()
            .flat_map(|i| {
                let node = &cluster.nodes[*i];
                node.pods.iter().map(move |pod| {
                    let addr = if family == "IPv4" {
                        IpAddr::from(pod.addr)
                    } else {
                        pod.addr6.into()
                    };
                    format!(
                        "- addresses: [\"{addr}\"]\n  \
                         conditions: {{ready: true, serving: true, terminating: false}}\n  \
                         nodeName: {}\n  \
                         targetRef: {{kind: Pod, name: {}, namespace: {NAMESPACE}}}\n",
                        NODE_NAMES[*i], pod.name
                    )
                })
            })
            .collect();
        if endpoints.is_empty() {
            yaml += "endpoints: null\n";
        } else {
            yaml += "endpoints:\n";
            yaml += &endpoints.concat();
        }
    }
    yaml
}

/// Where the controller reads its objects and writes statuses.
pub enum Provider {
    File {
        manifests: PathBuf,
        status_file: PathBuf,
    },
    Kube {
        fake: FakeKube,
        _runtime: tokio::runtime::Runtime,
    },
}

/// The controller process, killed on drop.
pub struct Controller {
    child: Child,
    pub log: PathBuf,
    pub provider: Provider,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Who has a Gateway address, by its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    pub address: IpAddr,
    /// Programmed=True, "announced: ADDRESS by node NODE".
    pub announcer: Option<String>,
}

impl Controller {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Changes the objects as a user would: rewrites the manifests file, or applies them to the
    /// API server (as `kubectl apply`).
    pub fn update(&self, manifests: &str) -> anyhow::Result<()> {
        match &self.provider {
            Provider::File { manifests: dir, .. } => {
                // Written aside and renamed, as editors and `kubectl`-like tools do.
                let temporary = dir.join(".cluster.yaml.tmp");
                std::fs::write(&temporary, manifests)?;
                std::fs::rename(&temporary, dir.join("cluster.yaml"))?;
            }
            Provider::Kube { fake, .. } => fake.apply_yaml(manifests),
        }
        Ok(())
    }

    /// A Gateway's status as the controller last wrote it.
    pub fn gateway_status(&self, name: &str) -> Option<Value> {
        match &self.provider {
            Provider::File { status_file, .. } => {
                let text = std::fs::read_to_string(status_file).ok()?;
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let value: Value = serde::Deserialize::deserialize(doc).ok()?;
                    if value["kind"] == "Gateway" && value["metadata"]["name"] == name {
                        return Some(value["status"].clone());
                    }
                }
                None
            }
            Provider::Kube { fake, .. } => fake
                .get("gateway.networking.k8s.io/v1", "Gateway", NAMESPACE, name)
                .map(|g| g["status"].clone()),
        }
    }

    /// The Gateway's `Programmed` condition: (status, reason).
    pub fn programmed_reason(&self, gateway: &str) -> Option<(String, String)> {
        let status = self.gateway_status(gateway)?;
        let programmed = status["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Programmed")?;
        Some((
            programmed["status"].as_str()?.to_owned(),
            programmed["reason"].as_str()?.to_owned(),
        ))
    }

    /// The Gateway's address and, while it is Programmed, the node announcing it.
    pub fn assigned(&self, gateway: &str) -> Option<Assigned> {
        let status = self.gateway_status(gateway)?;
        let address: IpAddr = status["addresses"][0]["value"].as_str()?.parse().ok()?;
        let programmed = status["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Programmed")?;
        let prefix = format!("announced: {address} by node ");
        let announcer = (programmed["status"] == "True")
            .then(|| programmed["message"].as_str()?.strip_prefix(&prefix))
            .flatten()
            .map(str::to_owned);
        Some(Assigned { address, announcer })
    }

    /// Waits until every Gateway is Programmed; their assignments, in [`GATEWAYS`] order.
    pub fn wait_programmed(&self, timeout: Duration) -> anyhow::Result<Vec<Assigned>> {
        let deadline = Instant::now() + timeout;
        loop {
            let all: Vec<Option<Assigned>> = GATEWAYS.iter().map(|g| self.assigned(g)).collect();
            if all
                .iter()
                .all(|a| a.as_ref().is_some_and(|a| a.announcer.is_some()))
            {
                return Ok(all.into_iter().flatten().collect());
            }
            if Instant::now() > deadline {
                bail!(
                    "Gateways not Programmed in {timeout:?}: {all:?}\n{:?}\n{:?}\ncontroller log:\n{}",
                    self.gateway_status(GATEWAYS[0]),
                    self.gateway_status(GATEWAYS[1]),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How a node spoke for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Said {
    /// An ARP reply or a solicited neighbour advertisement.
    Answer,
    /// A gratuitous ARP or an unsolicited advertisement.
    Announcement,
}

#[derive(Clone, Debug)]
pub struct Heard {
    pub at: Instant,
    pub node: usize,
    pub address: IpAddr,
    pub said: Said,
    /// The frame's source MAC.
    pub mac: [u8; 6],
}

/// Captures what every node says about the Gateway addresses, while an observer on the bridge
/// asks for them every [`PROBE_EVERY`]. Stops on drop.
pub struct Watch {
    stop: Arc<AtomicBool>,
    heard: Arc<Mutex<Vec<Heard>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Watch {
    pub fn start(bed: &Bed, addresses: &[IpAddr]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let heard = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for node in 0..bed.nodes() {
            let socket = RawSocket::open(&bed.cluster.host, &bridge_port(node))?;
            let (stop, heard, addresses) = (stop.clone(), heard.clone(), addresses.to_vec());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let deadline = Instant::now() + Duration::from_millis(50);
                    let mut keep = |f: &[u8]| classify(f, &addresses).is_some();
                    for (at, frame) in socket.receive_timed(deadline, &mut keep, 64) {
                        let (address, said) = classify(&frame, &addresses).expect("kept");
                        let mut mac = [0; 6];
                        mac.copy_from_slice(&frame[6..12]);
                        heard.lock().unwrap().push(Heard {
                            at,
                            node,
                            address,
                            said,
                            mac,
                        });
                    }
                }
            }));
        }
        let prober = RawSocket::open(&bed.cluster.host, NETWORK_BRIDGE)?;
        let questions: Vec<Vec<u8>> = addresses
            .iter()
            .map(|a| match a {
                IpAddr::V4(a) => corpus::arp_frame(
                    ArpOperation::REQUEST,
                    (OBSERVER_MAC, OBSERVER),
                    ([0; 6], *a),
                    (OBSERVER_MAC, [0xff; 6]),
                    None,
                ),
                IpAddr::V6(a) => solicitation_frame(OBSERVER_MAC, OBSERVER6, *a),
            })
            .collect();
        let stop_prober = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop_prober.load(Ordering::Relaxed) {
                for question in &questions {
                    let _ = prober.send(question);
                }
                std::thread::sleep(PROBE_EVERY);
            }
        }));
        Ok(Watch {
            stop,
            heard,
            threads,
        })
    }

    pub fn heard(&self) -> Vec<Heard> {
        let mut heard = self.heard.lock().unwrap().clone();
        heard.sort_by_key(|h| h.at);
        heard
    }

    /// The nodes that spoke for `address`, in order, repeats folded: `[0, 1]` is node 0, then
    /// node 1, never both in turn. Two announcers at once show as alternation (`[0, 1, 0, 1]`).
    pub fn speakers(&self, address: IpAddr) -> Vec<usize> {
        let mut speakers = Vec::new();
        for h in self.heard().iter().filter(|h| h.address == address) {
            if speakers.last() != Some(&h.node) {
                speakers.push(h.node);
            }
        }
        speakers
    }

    /// The first time `node` spoke for `address` at or after `since`.
    pub fn heard_since(&self, address: IpAddr, node: usize, since: Instant) -> Option<Heard> {
        self.heard()
            .into_iter()
            .find(|h| h.address == address && h.node == node && h.at >= since)
    }

    /// Waits until `node` answered a question for `address` after `since`.
    pub fn wait_answer(
        &self,
        address: IpAddr,
        node: usize,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(h) = self.heard().into_iter().find(|h| {
                h.address == address && h.node == node && h.at >= since && h.said == Said::Answer
            }) {
                return Ok(h.at);
            }
            if Instant::now() > deadline {
                bail!("node {node} did not answer for {address} in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An ARP reply, gratuitous ARP or advertisement for one of `addresses`.
fn classify(frame: &[u8], addresses: &[IpAddr]) -> Option<(IpAddr, Said)> {
    addresses.iter().find_map(|address| match address {
        IpAddr::V4(a) => {
            if is_arp(frame, ArpOperation::REPLY, *a) {
                Some((*address, Said::Answer))
            } else if is_arp(frame, ArpOperation::REQUEST, *a) {
                // The sender claims the address: only an announcer sends that.
                Some((*address, Said::Announcement))
            } else {
                None
            }
        }
        IpAddr::V6(a) => is_advertisement(frame, *a).then(|| {
            // Solicited flag (RFC 4861 4.4): set in answers, clear in unsolicited ones.
            let solicited = frame[58] & 0x40 != 0;
            let said = if solicited {
                Said::Answer
            } else {
                Said::Announcement
            };
            (*address, said)
        }),
    })
}

/// From the host: `flows` new TCP connections to `tcp` and as many UDP flows to `udp`, each one
/// exchange. The pods that answered, in order. UDP replies must come from `udp` itself (a TCP
/// reply from another address would not belong to the connection).
pub fn exchanges(
    host: &NetNs,
    tcp: SocketAddr,
    udp: SocketAddr,
    flows: usize,
) -> anyhow::Result<Vec<String>> {
    in_netns(host, move || {
        let mut answered = Vec::new();
        for i in 0..flows {
            let name = crate::echo::tcp_exchange(tcp, format!("tcp {i}").as_bytes())
                .with_context(|| format!("TCP connection {i} to {tcp}"))?;
            answered.push(name);
            let bind = SocketAddr::new(unspecified(udp.ip()), 0);
            let flow = crate::echo::UdpFlow::new(bind, udp)?;
            answered.push(
                flow.exchange(format!("udp {i}").as_bytes())
                    .with_context(|| format!("UDP flow {i} to {udp}"))?,
            );
        }
        Ok(answered)
    })
}

fn unspecified(like: IpAddr) -> IpAddr {
    if like.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    }
}

/// One quick try from the host: a new TCP connection and a UDP flow, each answered within
/// `wait`. The pods that answered (TCP, UDP).
pub fn try_once(
    host: &NetNs,
    tcp: SocketAddr,
    udp: SocketAddr,
    wait: Duration,
) -> anyhow::Result<(String, String)> {
    in_netns(host, move || {
        let tcp_name = {
            use std::io::{Read as _, Write as _};
            let mut stream = TcpStream::connect_timeout(&tcp, wait)?;
            stream.set_read_timeout(Some(wait))?;
            stream.write_all(b"probe")?;
            let mut reply = [0u8; 256];
            let n = stream.read(&mut reply)?;
            let text = String::from_utf8_lossy(&reply[..n]).to_string();
            let (name, echoed) = text.split_once('|').context("malformed reply")?;
            ensure!(echoed == "probe", "echo mismatch: {text:?}");
            name.to_owned()
        };
        let udp_name = {
            let socket = UdpSocket::bind(SocketAddr::new(unspecified(udp.ip()), 0))?;
            socket.set_read_timeout(Some(wait))?;
            socket.send_to(b"probe", udp)?;
            let mut reply = [0u8; 256];
            let (n, from) = socket.recv_from(&mut reply)?;
            ensure!(from == udp, "UDP reply from {from}, not {udp}");
            let text = String::from_utf8_lossy(&reply[..n]).to_string();
            let (name, echoed) = text.split_once('|').context("malformed reply")?;
            ensure!(echoed == "probe", "echo mismatch: {text:?}");
            name.to_owned()
        };
        Ok((tcp_name, udp_name))
    })
}

/// Long-lived TCP connections and UDP flows from the host, held on one thread inside the host
/// namespace and driven in rounds: each round, every one exchanges a message. Stops on drop.
pub struct Sessions {
    rounds: Option<std::sync::mpsc::Sender<()>>,
    results: std::sync::mpsc::Receiver<anyhow::Result<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Sessions {
    fn drop(&mut self) {
        self.rounds.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Sessions {
    /// `per_target` TCP connections and UDP flows to each (tcp, udp) target.
    pub fn open(
        host: &NetNs,
        targets: &[(SocketAddr, SocketAddr)],
        per_target: usize,
    ) -> anyhow::Result<Self> {
        let (to_client, rounds) = std::sync::mpsc::channel::<()>();
        let (to_test, results) = std::sync::mpsc::channel();
        let (path, targets) = (host.path(), targets.to_vec());
        let thread = std::thread::spawn(move || {
            let run = || -> anyhow::Result<()> {
                NetNsPath(path).enter()?;
                let mut tcp = Vec::new();
                let mut udp = Vec::new();
                for (tcp_to, udp_to) in &targets {
                    for _ in 0..per_target {
                        tcp.push(crate::echo::TcpSession::connect(*tcp_to)?);
                        let bind = SocketAddr::new(unspecified(udp_to.ip()), 0);
                        udp.push(crate::echo::UdpFlow::new(bind, *udp_to)?);
                    }
                }
                to_test.send(Ok(Vec::new())).ok();
                for round in 0.. {
                    if rounds.recv().is_err() {
                        return Ok(());
                    }
                    let mut names = Vec::new();
                    let mut exchange = || -> anyhow::Result<()> {
                        for (i, s) in tcp.iter_mut().enumerate() {
                            names.push(
                                s.exchange(format!("tcp {i} round {round}").as_bytes())
                                    .with_context(|| format!("TCP session {i}"))?,
                            );
                        }
                        for (i, f) in udp.iter().enumerate() {
                            names.push(
                                f.exchange(format!("udp {i} round {round}").as_bytes())
                                    .with_context(|| format!("UDP flow {i}"))?,
                            );
                        }
                        Ok(())
                    };
                    let outcome = exchange().map(|()| names);
                    to_test.send(outcome).ok();
                }
                Ok(())
            };
            if let Err(e) = run() {
                let _ = to_test.send(Err(e));
            }
        });
        let sessions = Sessions {
            rounds: Some(to_client),
            results,
            thread: Some(thread),
        };
        sessions
            .results
            .recv_timeout(Duration::from_secs(30))
            .context("client thread silent")??;
        Ok(sessions)
    }

    /// One round: which pod answered each session, in order.
    pub fn round(&self) -> anyhow::Result<Vec<String>> {
        self.rounds
            .as_ref()
            .context("closed")?
            .send(())
            .context("client thread gone")?;
        self.results
            .recv_timeout(Duration::from_secs(30))
            .context("client thread silent")?
    }
}

/// A namespace by path, for threads that live in it.
struct NetNsPath(String);

impl NetNsPath {
    fn enter(&self) -> anyhow::Result<()> {
        let target = std::fs::File::open(&self.0)?;
        // SAFETY: a valid namespace fd; only this thread changes namespace, for good.
        ensure!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&target), libc::CLONE_NEWNET) }
                == 0,
            "setns {}: {}",
            self.0,
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

/// Waits for `check` to hold, every 20 ms, at most `timeout`.
pub fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
