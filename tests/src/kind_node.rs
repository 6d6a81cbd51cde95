//! A kind cluster's network in namespaces: the test bed for fulgur on a Kubernetes node.
//!
//! Build it in one call, and everything goes when the value drops (even after a failed step):
//!
//! ```no_run
//! use fulgur_tests::kind_node::{KindCluster, KindSpec, Netfilter};
//! let cluster = KindCluster::new(&KindSpec {
//!     nodes: 1,
//!     pods_per_node: 2,
//!     netfilter: Netfilter::Iptables,
//!     ..KindSpec::default()
//! })?;
//! cluster.route_service_via(0)?; // the host routes the service addresses via node 0
//! # anyhow::Ok(())
//! ```
//!
//! ```text
//! host = "docker network" namespace: bridge kind0 198.51.100.1/24, 2001:db8:d0c::1/64
//!   ├─ nI-eth ═ eth0 of node I 198.51.100.(10+I), 2001:db8:d0c::(10+I)   [agent attaches here]
//!   │            node I: pod range 203.0.113.(32I)/27, 2001:db8:100:I::/64
//!   │            ├─ vethJ (node side 203.0.113.(32I+1)/32) ═ eth0 of pod J 203.0.113.(32I+2+J)/32
//!   │            └─ other nodes' pod ranges via those nodes' addresses
//! ```
//!
//! Pods are wired as kindnet's ptp plugin wires them: a /32 (/128) route per pod on the node,
//! a default route via the node in the pod. The node carries kube-proxy's
//! `FORWARD -m conntrack --ctstate INVALID -j DROP` and kindnet's masquerade of pod traffic that
//! leaves the pod range, in iptables or nftables flavour ([`Netfilter`]). With
//! [`PodLink::Bridge`] the pods sit on a Linux bridge in the node instead (bare metal, libvirt,
//! Docker hosts). Multi-node beds (`nodes: 2..=3`) route every node's pod range via its node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context as _;

use crate::netns::{NetNs, run};

/// The host's address on the "docker network" (the CI runner sending the traffic).
pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xd0c, 0, 0, 0, 0, 1);
/// Service addresses: on no host; the host routes them via a node.
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const SERVICE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
/// Every node's pod range together (kind's `podSubnet`).
pub const CLUSTER_POD_CIDR: &str = "203.0.113.0/24";
pub const CLUSTER_POD_CIDR6: &str = "2001:db8:100::/48";
/// The bridge in the host namespace.
pub const NETWORK_BRIDGE: &str = "kind0";
/// The node's interface on the docker network, where the agent attaches.
pub const NODE_IFACE: &str = "eth0";
/// The node's bridge toward its pods with [`PodLink::Bridge`].
pub const POD_BRIDGE: &str = "cni0";

/// Which netfilter rules a node carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Netfilter {
    /// None: a node without kube-proxy or masquerade.
    #[default]
    None,
    /// kube-proxy's iptables mode and kindnet's iptables masquerade (`iptables`, `ip6tables`).
    Iptables,
    /// kube-proxy's nftables mode and kindnet's nftables masquerade (`nft`).
    Nftables,
}

/// How pods are linked to their node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodLink {
    /// One veth per pod, kindnet's ptp style.
    #[default]
    Ptp,
    /// All pods of a node on one Linux bridge ([`POD_BRIDGE`]), the node's gateway address on it.
    Bridge,
}

#[derive(Clone, Debug)]
pub struct KindSpec {
    /// 1 to 3 nodes.
    pub nodes: usize,
    /// 1 to 8 pods on every node.
    pub pods_per_node: usize,
    pub netfilter: Netfilter,
    pub pod_link: PodLink,
}

impl Default for KindSpec {
    fn default() -> Self {
        KindSpec {
            nodes: 1,
            pods_per_node: 2,
            netfilter: Netfilter::None,
            pod_link: PodLink::Ptp,
        }
    }
}

pub struct Pod {
    pub name: String,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub ns: NetNs,
}

impl Pod {
    /// The pod's address in the family of `like`.
    pub fn addr_like(&self, like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            self.addr.into()
        } else {
            self.addr6.into()
        }
    }
}

pub struct KindNode {
    pub index: usize,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub ns: NetNs,
    pub pods: Vec<Pod>,
}

impl KindNode {
    /// The node's pod range, e.g. `203.0.113.32/27`.
    pub fn pod_cidr(&self) -> String {
        pod_cidr(self.index)
    }

    pub fn pod_cidr6(&self) -> String {
        pod_cidr6(self.index)
    }
}

/// The host namespace (bridge and client), the nodes and their pods. Dropping it removes them
/// all: every namespace is a [`NetNs`], and the veths go with their namespaces.
pub struct KindCluster {
    pub spec: KindSpec,
    /// Nodes and pods drop before the network (field order).
    pub nodes: Vec<KindNode>,
    pub host: NetNs,
}

pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 10 + i as u8)
}

pub fn node_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xd0c, 0, 0, 0, 0, 0x10 + i as u16)
}

fn pod_cidr(i: usize) -> String {
    format!("203.0.113.{}/27", 32 * i)
}

fn pod_cidr6(i: usize) -> String {
    format!("2001:db8:100:{i:x}::/64")
}

/// The node's own address in its pod range (kindnet's gateway).
fn pod_gateway(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, (32 * i + 1) as u8)
}

fn pod_gateway6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, i as u16, 0, 0, 0, 1)
}

pub fn pod_addr(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, (32 * node + 2 + pod) as u8)
}

pub fn pod_addr6(node: usize, pod: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, node as u16, 0, 0, 0, 2 + pod as u16)
}

impl KindCluster {
    pub fn new(spec: &KindSpec) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=3).contains(&spec.nodes), "1 to 3 nodes");
        anyhow::ensure!(
            (1..=8).contains(&spec.pods_per_node),
            "1 to 8 pods per node"
        );
        let host = NetNs::new("fgkh")?;
        host.ip(&[
            "link",
            "add",
            NETWORK_BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        host.ip(&["addr", "add", &format!("{HOST}/24"), "dev", NETWORK_BRIDGE])?;
        host.ip(&[
            "addr",
            "add",
            &format!("{HOST6}/64"),
            "dev",
            NETWORK_BRIDGE,
            "nodad",
        ])?;
        host.ip(&["link", "set", NETWORK_BRIDGE, "up"])?;
        // Frames fulgur rewrites in XDP must carry full checksums, as they do off a real wire.
        host.exec("ethtool", &["-K", NETWORK_BRIDGE, "tx", "off"])?;
        let mut cluster = KindCluster {
            spec: spec.clone(),
            nodes: Vec::new(),
            host,
        };
        for i in 0..spec.nodes {
            let node = cluster.add_node(i)?;
            cluster.nodes.push(node);
        }
        // Other nodes' pod ranges via those nodes, as kindnet routes them.
        for node in &cluster.nodes {
            for other in cluster.nodes.iter().filter(|o| o.index != node.index) {
                node.ns.ip(&[
                    "route",
                    "add",
                    &other.pod_cidr(),
                    "via",
                    &other.addr.to_string(),
                ])?;
                node.ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &other.pod_cidr6(),
                    "via",
                    &other.addr6.to_string(),
                ])?;
            }
        }
        for node in &cluster.nodes {
            apply_netfilter(&node.ns, spec.netfilter)
                .with_context(|| format!("netfilter rules on node {}", node.index))?;
        }
        Ok(cluster)
    }

    fn add_node(&self, i: usize) -> anyhow::Result<KindNode> {
        let ns = NetNs::new("fgkn")?;
        let port = format!("n{i}-eth");
        self.host.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            NODE_IFACE,
            "netns",
            ns.name(),
        ])?;
        self.host
            .ip(&["link", "set", &port, "master", NETWORK_BRIDGE, "up"])?;
        let (addr, addr6) = (node_addr(i), node_addr6(i));
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", NODE_IFACE])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{addr6}/64"),
            "dev",
            NODE_IFACE,
            "nodad",
        ])?;
        ns.ip(&["link", "set", NODE_IFACE, "up"])?;
        ns.ip(&["route", "add", "default", "via", &HOST.to_string()])?;
        ns.ip(&["-6", "route", "add", "default", "via", &HOST6.to_string()])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let mut node = KindNode {
            index: i,
            addr,
            addr6,
            ns,
            pods: Vec::new(),
        };
        if self.spec.pod_link == PodLink::Bridge {
            let ns = &node.ns;
            ns.ip(&[
                "link",
                "add",
                POD_BRIDGE,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ])?;
            let prefix = pod_cidr(i);
            let len = prefix.rsplit_once('/').map(|(_, l)| l).unwrap_or("27");
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/{len}", pod_gateway(i)),
                "dev",
                POD_BRIDGE,
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", pod_gateway6(i)),
                "dev",
                POD_BRIDGE,
                "nodad",
            ])?;
            ns.ip(&["link", "set", POD_BRIDGE, "up"])?;
        }
        for j in 0..self.spec.pods_per_node {
            let pod = self.add_pod(&node, j)?;
            node.pods.push(pod);
        }
        Ok(node)
    }

    fn add_pod(&self, node: &KindNode, j: usize) -> anyhow::Result<Pod> {
        let i = node.index;
        let ns = NetNs::new("fgkp")?;
        let veth = format!("veth{j}");
        node.ns.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        let (addr, addr6) = (pod_addr(i, j), pod_addr6(i, j));
        let (gateway, gateway6) = (pod_gateway(i), pod_gateway6(i));
        match self.spec.pod_link {
            PodLink::Ptp => {
                // The node side holds the gateway address; the pod's /32 is routed through it.
                node.ns
                    .ip(&["addr", "add", &format!("{gateway}/32"), "dev", &veth])?;
                node.ns.ip(&[
                    "addr",
                    "add",
                    &format!("{gateway6}/128"),
                    "dev",
                    &veth,
                    "nodad",
                ])?;
                node.ns.ip(&["link", "set", &veth, "up"])?;
                node.ns
                    .ip(&["route", "add", &format!("{addr}/32"), "dev", &veth])?;
                node.ns
                    .ip(&["-6", "route", "add", &format!("{addr6}/128"), "dev", &veth])?;
                ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
                ns.ip(&[
                    "addr",
                    "add",
                    &format!("{addr6}/128"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                ns.ip(&["link", "set", "eth0", "up"])?;
                ns.ip(&["route", "add", &gateway.to_string(), "dev", "eth0"])?;
                ns.ip(&["-6", "route", "add", &gateway6.to_string(), "dev", "eth0"])?;
            }
            PodLink::Bridge => {
                node.ns
                    .ip(&["link", "set", &veth, "master", POD_BRIDGE, "up"])?;
                ns.ip(&["addr", "add", &format!("{addr}/27"), "dev", "eth0"])?;
                ns.ip(&[
                    "addr",
                    "add",
                    &format!("{addr6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                ns.ip(&["link", "set", "eth0", "up"])?;
            }
        }
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway6.to_string(),
        ])?;
        Ok(Pod {
            name: format!("node{i}-pod{j}"),
            addr,
            addr6,
            ns,
        })
    }

    /// The host routes [`SERVICE`] and [`SERVICE6`] via node `i` (what `cargo xtask kind` does
    /// with `ip route replace POOL via NODE_IP`).
    pub fn route_service_via(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        self.host.ip(&[
            "route",
            "replace",
            &format!("{SERVICE}/32"),
            "via",
            &node.addr.to_string(),
        ])?;
        self.host.ip(&[
            "-6",
            "route",
            "replace",
            &format!("{SERVICE6}/128"),
            "via",
            &node.addr6.to_string(),
        ])?;
        Ok(())
    }

    pub fn service(&self, port: u16) -> SocketAddr {
        SocketAddr::from((SERVICE, port))
    }

    pub fn service6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((SERVICE6, port))
    }

    /// TCP and UDP echo servers on every pod of node `i`, IPv4 and IPv6, named after the pod.
    pub fn start_echo_servers(
        &self,
        i: usize,
        port: u16,
    ) -> anyhow::Result<Vec<crate::echo::EchoServer>> {
        let mut servers = Vec::new();
        for pod in &self.nodes[i].pods {
            for addr in [IpAddr::from(pod.addr), IpAddr::from(pod.addr6)] {
                servers.push(crate::echo::EchoServer::start(
                    &pod.ns,
                    &pod.name,
                    SocketAddr::new(addr, port),
                )?);
            }
        }
        Ok(servers)
    }
}

/// kube-proxy's conntrack INVALID drop in FORWARD and kindnet's masquerade, both families.
fn apply_netfilter(ns: &NetNs, netfilter: Netfilter) -> anyhow::Result<()> {
    match netfilter {
        Netfilter::None => Ok(()),
        Netfilter::Iptables => {
            for (tool, pods) in [
                ("iptables", CLUSTER_POD_CIDR),
                ("ip6tables", CLUSTER_POD_CIDR6),
            ] {
                let rules: [&[&str]; 7] = [
                    &["-N", "KUBE-FORWARD"],
                    &["-A", "FORWARD", "-j", "KUBE-FORWARD"],
                    &[
                        "-A",
                        "KUBE-FORWARD",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "INVALID",
                        "-j",
                        "DROP",
                    ],
                    &["-t", "nat", "-N", "KIND-MASQ-AGENT"],
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        pods,
                        "-m",
                        "addrtype",
                        "!",
                        "--dst-type",
                        "LOCAL",
                        "-j",
                        "KIND-MASQ-AGENT",
                    ],
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "KIND-MASQ-AGENT",
                        "-d",
                        pods,
                        "-j",
                        "RETURN",
                    ],
                    &["-t", "nat", "-A", "KIND-MASQ-AGENT", "-j", "MASQUERADE"],
                ];
                for rule in rules {
                    ns.exec(tool, rule)?;
                }
            }
            Ok(())
        }
        Netfilter::Nftables => {
            let ruleset = format!(
                "table ip kube-proxy {{
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state invalid drop
  }}
}}
table ip6 kube-proxy {{
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state invalid drop
  }}
}}
table inet kindnet-ipmasq {{
  chain postrouting {{
    type nat hook postrouting priority srcnat - 10; policy accept;
    ip saddr {CLUSTER_POD_CIDR} ip daddr != {CLUSTER_POD_CIDR} fib daddr type != local masquerade
    ip6 saddr {CLUSTER_POD_CIDR6} ip6 daddr != {CLUSTER_POD_CIDR6} fib daddr type != local masquerade
  }}
}}
"
            );
            let file = std::env::temp_dir().join(format!(
                "{}.nft",
                crate::netns::unique_token("fgkind-rules")
            ));
            std::fs::write(&file, ruleset)?;
            let applied = ns.exec("nft", &["-f", &file.to_string_lossy()]);
            let _ = std::fs::remove_file(&file);
            applied.map(drop)
        }
    }
}

/// Whether the netfilter tools the beds need are installed (`cargo xtask setup` installs them).
pub fn netfilter_tools_present() -> bool {
    ["iptables", "ip6tables", "nft"]
        .iter()
        .all(|tool| run("sh", &["-c", &format!("command -v {tool}")]).is_ok())
}
