//! `cargo xtask bench forward`: fulgur end to end next to plain routing, nftables DNAT (as
//! kube-proxy's nftables mode programs it) and HAProxy, on the namespace topologies of the tests.
//!
//! Method: one client, one load-balancer node and one backend, each in its own namespace. Every
//! round runs every peer once (the order rotates each round), so drift hits all alike; figures
//! are medians over rounds, with ratios to routing and to nftables.
//! - UDP: datagrams per second that the backend's socket received, from `sendmmsg` batches over
//!   several flows (one source port each); the sender is the limit, so compare ratios.
//! - TCP: completed short connections per second (connect, request, reply, client closes).
//! - For fulgur, the kernel's own per-run time of the attached XDP (and TC) programs over the
//!   measured window, with BPF run-time statistics on (BPF_ENABLE_STATS, the counter that
//!   `kernel.bpf_stats_enabled` turns on; it turns off again when the bench ends).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::programs::ProgramInfo;
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_common::program_names;
use serde::Serialize;

use crate::{
    loadgen::{self, TcpServer, UdpSink},
    netns::{self, NetNs, in_netns, unique_token},
    topology::{AgentProcess, LB_IFACE, Source, Topology, VIP},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const UDP_FLOWS: usize = 8;
const TCP_CLIENTS: usize = 2;
const TCP_SERVER_THREADS: usize = 2;
/// The backend's address in both topologies.
const BACKEND: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub rounds: usize,
    pub warmup: Duration,
    pub udp: Duration,
    pub tcp: Duration,
    pub topologies: Vec<TopologyKind>,
    /// Where forward.json and forward.svg go.
    pub out_dir: PathBuf,
}

impl Config {
    /// The full bench: about 3 minutes on 2 cores.
    pub fn full(out_dir: PathBuf) -> Self {
        Config {
            rounds: 5,
            warmup: Duration::from_millis(200),
            udp: Duration::from_secs(1),
            tcp: Duration::from_secs(1),
            topologies: vec![
                TopologyKind::Veth,
                TopologyKind::Bridge,
                TopologyKind::KindNode,
            ],
            out_dir,
        }
    }

    /// One short round of everything, to keep the bench from rotting.
    pub fn smoke(out_dir: PathBuf) -> Self {
        Config {
            rounds: 1,
            warmup: Duration::from_millis(50),
            udp: Duration::from_millis(100),
            tcp: Duration::from_millis(100),
            ..Config::full(out_dir)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyKind {
    /// Backends on their own veths, XDP programs on the peers (as [`Topology`]).
    Veth,
    /// Backends on veths enslaved to a bridge on the load-balancer node.
    Bridge,
    /// The kind-node test bed ([`crate::kind_node`]): the client on the "docker network"
    /// bridge, the agent on the node's eth0, the backend a ptp pod; kube-proxy's and kindnet's
    /// nftables rules on the node.
    KindNode,
}

impl TopologyKind {
    fn name(self) -> &'static str {
        match self {
            TopologyKind::Veth => "veth",
            TopologyKind::Bridge => "bridge",
            TopologyKind::KindNode => "kind-node",
        }
    }

    fn description(self) -> &'static str {
        match self {
            TopologyKind::Veth => {
                "backend on its own veth, XDP programs on the veth peers (native XDP can redirect)"
            }
            TopologyKind::Bridge => {
                "backend on a veth enslaved to a bridge on the load-balancer node (native XDP cannot redirect into a bridge)"
            }
            TopologyKind::KindNode => {
                "kind-node test bed: client on the docker-network bridge, agent on the node's eth0, backend a ptp pod, kube-proxy's and kindnet's nftables rules on the node"
            }
        }
    }

    /// The peers this topology allows: fulgur in every XDP mode that can deliver there, and,
    /// when the agent has `--forwarding`, its automatic choice and the kernel path in each.
    fn peers(self, forwarding_flag: bool) -> Vec<Peer> {
        let mut peers = vec![Peer::Routing, Peer::Nftables, Peer::Haproxy];
        let fulgur = |mode, forwarding| Peer::Fulgur { mode, forwarding };
        use XdpAttachMode::{Generic, Native};
        if !forwarding_flag {
            match self {
                TopologyKind::Veth => peers.extend([fulgur(Native, None), fulgur(Generic, None)]),
                TopologyKind::Bridge => peers.push(fulgur(Generic, None)),
                TopologyKind::KindNode => {}
            }
            return peers;
        }
        let both = |mode| [fulgur(mode, Some("auto")), fulgur(mode, Some("kernel"))];
        match self {
            TopologyKind::Veth => peers.extend(both(Native).into_iter().chain(both(Generic))),
            TopologyKind::Bridge | TopologyKind::KindNode => {
                peers.extend(both(Generic));
                peers.extend(both(Native));
            }
        }
        peers
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// Plain kernel routing to the backend's own address: no load balancer.
    Routing,
    /// nftables DNAT with kube-proxy's nftables-mode chains.
    Nftables,
    /// HAProxy in TCP mode (userspace; no UDP).
    Haproxy,
    Fulgur {
        mode: XdpAttachMode,
        /// `--forwarding` when the agent has that flag.
        forwarding: Option<&'static str>,
    },
}

impl Peer {
    fn name(self) -> String {
        match self {
            Peer::Routing => "routing".into(),
            Peer::Nftables => "nftables".into(),
            Peer::Haproxy => "haproxy".into(),
            Peer::Fulgur {
                mode,
                forwarding: None,
            } => format!("fulgur {}", mode.name()),
            Peer::Fulgur {
                mode,
                forwarding: Some(path),
            } => format!("fulgur {} {path}", mode.name()),
        }
    }

    fn udp(self) -> bool {
        self != Peer::Haproxy
    }

    fn target(self) -> SocketAddr {
        match self {
            Peer::Routing => SocketAddr::from((BACKEND, BACKEND_PORT)),
            _ => SocketAddr::from((VIP, SERVICE_PORT)),
        }
    }
}

/// The namespaces of one topology, with the backend's sink and server running.
struct Bed {
    kind: TopologyKind,
    sink: UdpSink,
    _server: TcpServer,
    // Last: the sink and server stop before their namespaces go.
    nets: Nets,
}

enum Nets {
    Veth(Box<Topology>),
    Bridge {
        client: NetNs,
        lb: NetNs,
        backend: NetNs,
    },
    Kind(Box<crate::kind_node::KindCluster>),
}

impl Nets {
    fn client(&self) -> &NetNs {
        match self {
            Nets::Veth(t) => &t.client,
            Nets::Bridge { client, .. } => client,
            Nets::Kind(k) => &k.host,
        }
    }

    fn lb(&self) -> &NetNs {
        match self {
            Nets::Veth(t) => &t.lb,
            Nets::Bridge { lb, .. } => lb,
            Nets::Kind(k) => &k.nodes[0].ns,
        }
    }

    fn backend(&self) -> &NetNs {
        match self {
            Nets::Veth(t) => &t.backends[0].ns,
            Nets::Bridge { backend, .. } => backend,
            Nets::Kind(k) => &k.nodes[0].pods[0].ns,
        }
    }

    /// Where the agent attaches.
    fn lb_iface(&self) -> &'static str {
        match self {
            Nets::Kind(_) => crate::kind_node::NODE_IFACE,
            _ => LB_IFACE,
        }
    }
}

impl Bed {
    fn new(kind: TopologyKind) -> anyhow::Result<Self> {
        let nets = match kind {
            TopologyKind::Veth => {
                let topology = Topology::new(1, XdpAttachMode::Native)?;
                ensure!(topology.backends[0].addr == BACKEND);
                Nets::Veth(Box::new(topology))
            }
            TopologyKind::Bridge => bridged()?,
            TopologyKind::KindNode => kind_node()?,
        };
        let backend_addr = SocketAddr::from((BACKEND, BACKEND_PORT));
        let sink = UdpSink::start(nets.backend(), backend_addr)?;
        let server = TcpServer::start(nets.backend(), backend_addr, TCP_SERVER_THREADS)?;
        // Connection churn leaves TIME_WAIT entries in nftables' conntrack; let them go quickly
        // (per-namespace; the kernel may refuse it on older versions).
        let _ = nets
            .lb()
            .sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1");
        nets.client()
            .sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
        // The client closes first and keeps the TIME_WAIT; it may reuse those ports after 1 s.
        nets.client().sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(Bed {
            kind,
            sink,
            _server: server,
            nets,
        })
    }

    fn client(&self) -> &NetNs {
        self.nets.client()
    }

    fn lb(&self) -> &NetNs {
        self.nets.lb()
    }
}

/// One kind node with one pod, kube-proxy's nftables flavour; the host routes the service and
/// the pod range via the node (the routing peer sends to the pod itself).
fn kind_node() -> anyhow::Result<Nets> {
    use crate::kind_node::{KindCluster, KindSpec, Netfilter, PodLink};
    let cluster = KindCluster::new(&KindSpec {
        nodes: 1,
        pods_per_node: 1,
        netfilter: Netfilter::Nftables,
        pod_link: PodLink::Ptp,
    })?;
    ensure!(cluster.nodes[0].pods[0].addr == BACKEND);
    cluster.route_service_via(0)?;
    cluster.host.ip(&[
        "route",
        "replace",
        &cluster.nodes[0].pod_cidr(),
        "via",
        &cluster.nodes[0].addr.to_string(),
    ])?;
    Ok(Nets::Kind(Box::new(cluster)))
}

/// Client and load balancer as in [`Topology`]; the backend behind a bridge on the load
/// balancer (`br0` 203.0.113.1/24, port `lb-b0`).
fn bridged() -> anyhow::Result<Nets> {
    let lb = NetNs::new("fgbl")?;
    let client = NetNs::new("fgbc")?;
    let backend = NetNs::new("fgbb")?;
    lb.ip(&[
        "link",
        "add",
        "name",
        LB_IFACE,
        "type",
        "veth",
        "peer",
        "name",
        "cl0",
        "netns",
        client.name(),
    ])?;
    lb.ip(&["addr", "add", "198.51.100.1/24", "dev", LB_IFACE])?;
    lb.ip(&["link", "set", "dev", LB_IFACE, "up"])?;
    client.ip(&["addr", "add", "198.51.100.2/24", "dev", "cl0"])?;
    client.ip(&["link", "set", "dev", "cl0", "up"])?;
    client.ip(&["route", "add", "default", "via", "198.51.100.1"])?;
    client.exec("ethtool", &["-K", "cl0", "tx", "off"])?;
    lb.ip(&["link", "add", "name", "br0", "type", "bridge"])?;
    lb.ip(&["addr", "add", "203.0.113.1/24", "dev", "br0"])?;
    lb.ip(&["link", "set", "dev", "br0", "up"])?;
    lb.ip(&[
        "link",
        "add",
        "name",
        "lb-b0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        backend.name(),
    ])?;
    lb.ip(&["link", "set", "dev", "lb-b0", "master", "br0"])?;
    lb.ip(&["link", "set", "dev", "lb-b0", "up"])?;
    backend.ip(&["addr", "add", &format!("{BACKEND}/24"), "dev", "eth0"])?;
    backend.ip(&["link", "set", "dev", "eth0", "up"])?;
    backend.ip(&["route", "add", "default", "via", "203.0.113.1"])?;
    lb.sysctl("net.ipv4.ip_forward", "1")?;
    lb.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    Ok(Nets::Bridge {
        client,
        lb,
        backend,
    })
}

/// A peer set up on a bed; torn down on drop.
enum Running {
    Nothing,
    Nftables(String),
    Haproxy {
        child: Child,
        config: PathBuf,
    },
    Fulgur {
        agent: AgentProcess,
        services: PathBuf,
    },
}

impl Running {
    fn start(bed: &Bed, peer: Peer) -> anyhow::Result<Running> {
        let running = match peer {
            Peer::Routing => Running::Nothing,
            Peer::Nftables => {
                let table = unique_token("fgbench");
                let rules = kube_proxy_ruleset(&table);
                nft(bed.lb(), &rules)?;
                Running::Nftables(table)
            }
            Peer::Haproxy => {
                bed.lb()
                    .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
                let config =
                    std::env::temp_dir().join(format!("{}.cfg", unique_token("fulgur-haproxy-")));
                std::fs::write(&config, haproxy_config())?;
                let log = config.with_extension("log");
                let child = bed
                    .lb()
                    .command("haproxy")
                    .args(["-db", "-f"])
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting haproxy (`cargo xtask setup` installs it)")?;
                let running = Running::Haproxy { child, config };
                wait_listening(bed.client(), peer.target()).with_context(|| {
                    format!(
                        "haproxy's log: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                })?;
                running
            }
            Peer::Fulgur { mode, forwarding } => {
                let services = std::env::temp_dir()
                    .join(format!("{}.yaml", unique_token("fulgur-bench-services-")));
                std::fs::write(&services, services_yaml())?;
                let path = services.to_str().context("temp path")?.to_owned();
                let mut args = vec!["--services", path.as_str()];
                if let Some(forwarding) = forwarding {
                    args.extend(["--forwarding", forwarding]);
                }
                let agent =
                    AgentProcess::start(bed.lb(), bed.nets.lb_iface(), mode, Source::Args(&args))?;
                Running::Fulgur { agent, services }
            }
        };
        Ok(running)
    }

    fn stop(&mut self, bed: &Bed) {
        match self {
            Running::Nothing | Running::Fulgur { .. } => {}
            Running::Nftables(table) => {
                let _ = bed.lb().exec("nft", &["delete", "table", "ip", table]);
            }
            Running::Haproxy { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = bed
                    .lb()
                    .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
            }
        }
    }

    /// The attached programs' (XDP, TC) run-time totals, for fulgur.
    fn program_stats(&self) -> Option<(RunStats, RunStats)> {
        let Running::Fulgur { agent, .. } = self else {
            return None;
        };
        let read = |name: &str| {
            ProgramInfo::from_pin(agent.bpffs_dir.join("progs").join(name))
                .map(|info| RunStats {
                    ns: info.run_time().as_nanos() as u64,
                    runs: info.run_count(),
                })
                .ok()
        };
        Some((
            read(program_names::XDP_INGRESS)?,
            read(program_names::TC_EGRESS)?,
        ))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            Running::Haproxy { config, .. } => {
                let _ = std::fs::remove_file(config.with_extension("log"));
                let _ = std::fs::remove_file(config);
            }
            Running::Fulgur { services, .. } => {
                let _ = std::fs::remove_file(services);
            }
            _ => {}
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct RunStats {
    ns: u64,
    runs: u64,
}

impl RunStats {
    fn per_run_since(self, before: RunStats) -> Option<f64> {
        let runs = self.runs.checked_sub(before.runs)?;
        (runs > 0).then(|| (self.ns - before.ns) as f64 / runs as f64)
    }
}

/// kube-proxy's nftables mode for one Service with one endpoint, TCP and UDP: the service-ips
/// verdict map, a per-service chain with the numgen endpoint choice, an endpoint chain with the
/// hairpin mark and the DNAT, the no-endpoints filter and the masquerade step in postrouting.
fn kube_proxy_ruleset(table: &str) -> String {
    let mut services = String::new();
    for proto in ["tcp", "udp"] {
        services += &format!(
            "  chain service-{proto} {{\n    ip daddr {VIP} {proto} dport {SERVICE_PORT} ip saddr != 10.0.0.0/8 jump mark-for-masquerade\n    numgen random mod 1 vmap {{ 0 : goto endpoint-{proto} }}\n  }}\n  chain endpoint-{proto} {{\n    ip saddr {BACKEND} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {BACKEND}:{BACKEND_PORT}\n  }}\n"
        );
    }
    // ip saddr != 10.0.0.0/8: the client is outside the cluster CIDR, and kube-proxy would
    // masquerade it; fulgur does not, so neither does this peer (the mark is cleared below).
    format!(
        "table ip {table} {{
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ {VIP} . tcp . {SERVICE_PORT} : goto service-tcp, {VIP} . udp . {SERVICE_PORT} : goto service-udp }}
  }}
  map no-endpoint-services {{
    type ipv4_addr . inet_proto . inet_service : verdict
  }}
  chain mark-for-masquerade {{
    meta mark set meta mark or 0x4000
  }}
  chain masquerading {{
    meta mark & 0x4000 == 0 return
    meta mark set meta mark xor 0x4000
    ip saddr {BACKEND} masquerade fully-random
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }}
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state new jump service-endpoints-check
  }}
  chain service-endpoints-check {{
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
{services}}}
"
    )
}

fn nft(ns: &NetNs, rules: &str) -> anyhow::Result<()> {
    let file = std::env::temp_dir().join(format!("{}.nft", unique_token("fulgur-nft-")));
    std::fs::write(&file, rules)?;
    let result = ns.exec("nft", &["-f", file.to_str().context("temp path")?]);
    let _ = std::fs::remove_file(&file);
    result
        .map(drop)
        .context("loading the nftables ruleset (`cargo xtask setup` installs nft)")
}

fn haproxy_config() -> String {
    format!(
        "global
  # Within the default fd limit; the clients hold at most a few connections at once.
  maxconn 4000
  nbthread 2
defaults
  mode tcp
  timeout connect 2s
  timeout client 5s
  timeout server 5s
frontend bench
  bind {VIP}:{SERVICE_PORT}
  default_backend backends
backend backends
  server backend-0 {BACKEND}:{BACKEND_PORT}
"
    )
}

fn services_yaml() -> String {
    let mut yaml = String::from("services:\n");
    for protocol in ["TCP", "UDP"] {
        yaml += &format!(
            "- {{vip: {VIP}, port: {SERVICE_PORT}, protocol: {protocol}, backends: [{{address: {BACKEND}, port: {BACKEND_PORT}}}]}}\n"
        );
    }
    yaml
}

fn wait_listening(client: &NetNs, target: SocketAddr) -> anyhow::Result<()> {
    in_netns(client, move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!("nothing listens on {target} after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
}

/// Whether the agent has `--forwarding auto|kernel|fast`.
fn agent_has_forwarding_flag() -> bool {
    Command::new(crate::agent_binary())
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--forwarding"))
}

/// One peer's figures in one round.
#[derive(Clone, Debug, Default)]
struct Sample {
    udp_pps: Option<f64>,
    udp_sent_pps: Option<f64>,
    tcp_cps: f64,
    tcp_failed: u64,
    xdp_ns_udp: Option<f64>,
    xdp_ns_tcp: Option<f64>,
    tc_ns_tcp: Option<f64>,
    /// The agent's "forwarding path" log lines: which path each interface got.
    paths: Vec<String>,
}

fn measure(bed: &Bed, peer: Peer, config: &Config) -> anyhow::Result<Sample> {
    let mut running = Running::start(bed, peer)?;
    let result = (|| {
        let mut sample = Sample::default();
        if peer.udp() {
            let before = running.program_stats();
            let counter = bed.sink.counter();
            let (warmup, duration, target) = (config.warmup, config.udp, peer.target());
            let udp = in_netns(bed.client(), move || {
                loadgen::udp_blast(target, UDP_FLOWS, warmup, duration, || {
                    counter.load(std::sync::atomic::Ordering::Relaxed)
                })
            })
            .with_context(|| format!("{} UDP", peer.name()))?;
            sample.udp_pps = Some(udp.pps());
            sample.udp_sent_pps = Some(udp.sent as f64 / udp.seconds);
            if let (Some((xdp0, _)), Some((xdp1, _))) = (before, running.program_stats()) {
                sample.xdp_ns_udp = xdp1.per_run_since(xdp0);
            }
        }
        let before = running.program_stats();
        let tcp = loadgen::tcp_short_connections(
            bed.client(),
            peer.target(),
            TCP_CLIENTS,
            config.warmup,
            config.tcp,
        )
        .with_context(|| format!("{} TCP", peer.name()))?;
        sample.tcp_cps = tcp.cps();
        sample.tcp_failed = tcp.failed;
        if let (Some((xdp0, tc0)), Some((xdp1, tc1))) = (before, running.program_stats()) {
            sample.xdp_ns_tcp = xdp1.per_run_since(xdp0);
            sample.tc_ns_tcp = tc1.per_run_since(tc0);
        }
        if let Running::Fulgur { agent, .. } = &running {
            sample.paths = agent
                .log_text()
                .lines()
                .filter(|l| l.contains("forwarding path"))
                .map(|l| {
                    l.split_once("INFO")
                        .map_or(l, |(_, rest)| rest)
                        .trim()
                        .to_owned()
                })
                .collect();
        }
        anyhow::Ok(sample)
    })();
    running.stop(bed);
    result
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[derive(Serialize, Debug, Clone)]
pub struct Figure {
    pub rounds: Vec<f64>,
    pub median: f64,
    pub vs_routing: Option<f64>,
    pub vs_nftables: Option<f64>,
}

#[derive(Serialize, Debug, Clone)]
pub struct PeerReport {
    pub name: String,
    /// Datagrams per second the backend received.
    pub udp_pps: Option<Figure>,
    /// Datagrams per second the client handed to the kernel (median).
    pub udp_sent_pps: Option<f64>,
    /// Completed short connections per second (none when every round failed).
    pub tcp_cps: Option<Figure>,
    pub tcp_failed_connections: u64,
    /// Median over rounds of the attached XDP program's run_time_ns / run_cnt during UDP.
    pub xdp_ns_per_packet_udp: Option<f64>,
    pub xdp_ns_per_packet_tcp: Option<f64>,
    pub tc_ns_per_packet_tcp: Option<f64>,
    /// For fulgur: the forwarding path the agent chose per interface (its log, first round).
    pub forwarding_paths: Vec<String>,
    /// Rounds in which this peer failed, and how.
    pub errors: Vec<String>,
}

#[derive(Serialize, Debug, Clone)]
pub struct TopologyReport {
    pub name: String,
    pub description: String,
    pub peers: Vec<PeerReport>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub method: String,
    pub rounds: usize,
    pub udp_seconds: f64,
    pub tcp_seconds: f64,
    pub udp_flows: usize,
    pub tcp_clients: usize,
    pub duration_seconds: f64,
    pub topologies: Vec<TopologyReport>,
    /// Topologies left out, and why.
    pub skipped: Vec<String>,
}

/// Runs the bench and writes `forward.json` and `forward.svg` into `config.out_dir`.
pub fn run(config: &Config) -> anyhow::Result<Report> {
    let started = Instant::now();
    let forwarding_flag = agent_has_forwarding_flag();
    // Run-time statistics stay on while this fd is open (also if the bench fails).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (needs root)")?;
    let mut skipped = Vec::new();
    let mut beds = Vec::new();
    for &kind in &config.topologies {
        // fulgur reaches the kind node's pods through the kernel path, which needs the flag.
        if kind == TopologyKind::KindNode && !forwarding_flag {
            skipped.push(format!(
                "{}: the agent has no --forwarding flag (kernel path)",
                kind.name()
            ));
            continue;
        }
        beds.push(Bed::new(kind).with_context(|| format!("topology {}", kind.name()))?);
    }
    let peers: Vec<Vec<Peer>> = beds.iter().map(|b| b.kind.peers(forwarding_flag)).collect();
    let mut samples: Vec<BTreeMap<usize, Vec<Sample>>> = vec![BTreeMap::new(); beds.len()];
    let mut errors: Vec<BTreeMap<usize, Vec<String>>> = vec![BTreeMap::new(); beds.len()];
    for round in 0..config.rounds {
        for (b, bed) in beds.iter().enumerate() {
            let n = peers[b].len();
            for k in 0..n {
                let p = (k + round) % n;
                let peer = peers[b][p];
                let sample = match measure(bed, peer, config) {
                    Ok(sample) => sample,
                    // One failing peer must not cost the others' figures; the report names it.
                    Err(e) => {
                        let error = format!("round {}: {e:#}", round + 1);
                        eprintln!(
                            "[bench forward] {} on {}: {error}",
                            peer.name(),
                            bed.kind.name()
                        );
                        errors[b].entry(p).or_default().push(error);
                        continue;
                    }
                };
                eprintln!(
                    "[bench forward] round {} {:<7} {:<22} udp {:>9} pps  tcp {:>7.0} conn/s ({} failed)",
                    round + 1,
                    bed.kind.name(),
                    peer.name(),
                    sample.udp_pps.map_or("-".to_owned(), |v| format!("{v:.0}")),
                    sample.tcp_cps,
                    sample.tcp_failed,
                );
                samples[b].entry(p).or_default().push(sample);
            }
        }
    }
    let topologies = beds
        .iter()
        .enumerate()
        .map(|(b, bed)| topology_report(bed.kind, &peers[b], &samples[b], &errors[b]))
        .collect();
    let report = Report {
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        kernel: command_line("uname", &["-r"]),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        method: METHOD.into(),
        rounds: config.rounds,
        udp_seconds: config.udp.as_secs_f64(),
        tcp_seconds: config.tcp.as_secs_f64(),
        udp_flows: UDP_FLOWS,
        tcp_clients: TCP_CLIENTS,
        duration_seconds: started.elapsed().as_secs_f64(),
        topologies,
        skipped,
    };
    drop(beds);
    std::fs::create_dir_all(&config.out_dir)?;
    let json = config.out_dir.join("forward.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    chart(&report, &config.out_dir.join("forward.svg"))?;
    Ok(report)
}

const METHOD: &str = "one client, load-balancer node and backend in network namespaces; every round runs every peer once (rotating order); medians over rounds. UDP: datagrams/s received by the backend's socket (recvmmsg), sent with sendmmsg (64 per call) over 8 flows by one thread. TCP: completed short connections/s (connect, 5-byte request, 2-byte reply, client closes first), 2 client threads. Per-packet: run_time_ns/run_cnt of the attached programs over the measured window (BPF_ENABLE_STATS).";

fn command_line(program: &str, args: &[&str]) -> String {
    netns::run(program, args)
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn topology_report(
    kind: TopologyKind,
    peers: &[Peer],
    samples: &BTreeMap<usize, Vec<Sample>>,
    errors: &BTreeMap<usize, Vec<String>>,
) -> TopologyReport {
    let none = Vec::new();
    let samples_of = |p: usize| samples.get(&p).unwrap_or(&none);
    let udp = |p: usize| -> Vec<f64> { samples_of(p).iter().filter_map(|s| s.udp_pps).collect() };
    let tcp = |p: usize| -> Vec<f64> { samples_of(p).iter().map(|s| s.tcp_cps).collect() };
    let index = |peer: Peer| peers.iter().position(|&p| p == peer);
    let routing = index(Peer::Routing).expect("routing is always a peer");
    let nftables = index(Peer::Nftables).expect("nftables is always a peer");
    let (udp_routing, udp_nft) = (median(&udp(routing)), median(&udp(nftables)));
    let (tcp_routing, tcp_nft) = (median(&tcp(routing)), median(&tcp(nftables)));
    let figure = |rounds: Vec<f64>, routing: Option<f64>, nft: Option<f64>| {
        let median = median(&rounds)?;
        Some(Figure {
            vs_routing: routing.map(|r| median / r),
            vs_nftables: nft.map(|n| median / n),
            rounds,
            median,
        })
    };
    let peers = peers
        .iter()
        .enumerate()
        .map(|(p, peer)| {
            let ss = samples_of(p);
            let field = |f: fn(&Sample) -> Option<f64>| {
                median(&ss.iter().filter_map(f).collect::<Vec<_>>())
            };
            PeerReport {
                name: peer.name(),
                udp_pps: figure(udp(p), udp_routing, udp_nft),
                udp_sent_pps: field(|s| s.udp_sent_pps),
                tcp_cps: figure(tcp(p), tcp_routing, tcp_nft),
                tcp_failed_connections: ss.iter().map(|s| s.tcp_failed).sum(),
                xdp_ns_per_packet_udp: field(|s| s.xdp_ns_udp),
                xdp_ns_per_packet_tcp: field(|s| s.xdp_ns_tcp),
                tc_ns_per_packet_tcp: field(|s| s.tc_ns_tcp),
                forwarding_paths: ss.first().map(|s| s.paths.clone()).unwrap_or_default(),
                errors: errors.get(&p).cloned().unwrap_or_default(),
            }
        })
        .collect();
    TopologyReport {
        name: kind.name().into(),
        description: kind.description().into(),
        peers,
    }
}

/// The report as a Markdown table: one row per topology, protocol and peer.
pub fn markdown(report: &Report) -> String {
    let mut out = String::from(
        "| topology | peer | UDP pps | × routing | × nft | TCP conn/s | × routing | × nft | XDP ns/pkt (UDP) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let ratio = |r: Option<f64>| r.map_or("–".to_owned(), |r| format!("{r:.2}"));
    for t in &report.topologies {
        for p in &t.peers {
            let udp = p.udp_pps.as_ref();
            let tcp = p.tcp_cps.as_ref();
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                t.name,
                p.name,
                udp.map_or("–".to_owned(), |f| format!("{:.0}k", f.median / 1e3)),
                ratio(udp.and_then(|f| f.vs_routing)),
                ratio(udp.and_then(|f| f.vs_nftables)),
                tcp.map_or("failed".to_owned(), |f| format!("{:.1}k", f.median / 1e3)),
                ratio(tcp.and_then(|f| f.vs_routing)),
                ratio(tcp.and_then(|f| f.vs_nftables)),
                p.xdp_ns_per_packet_udp
                    .map_or("–".to_owned(), |n| format!("{n:.0}")),
            );
        }
    }
    out
}

/// Grouped bars of every peer's median as a ratio to plain routing, per topology and protocol.
fn chart(report: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let mut groups: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for t in &report.topologies {
        let udp = t
            .peers
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.udp_pps.as_ref()?.vs_routing?)))
            .collect();
        let tcp = t
            .peers
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.tcp_cps.as_ref()?.vs_routing?)))
            .collect();
        groups.push((format!("{}: UDP pps", t.name), udp));
        groups.push((format!("{}: TCP conn/s", t.name), tcp));
    }
    let mut names: Vec<String> = Vec::new();
    for (_, bars) in &groups {
        for (name, _) in bars {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    let top = groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().map(|b| b.1))
        .fold(1.0f64, f64::max)
        * 1.25;
    let color = |i: usize| Palette99::pick(i).to_rgba();

    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "fulgur bench forward, {} (median of {} rounds; ratio to plain routing)",
                report.date, report.rounds
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("× routing")
        .draw()
        .map_err(plot_error)?;
    let width = 0.8 / names.len().max(1) as f64;
    for (i, name) in names.iter().enumerate() {
        let mut bars = Vec::new();
        for (g, (_, values)) in groups.iter().enumerate() {
            if let Some((_, v)) = values.iter().find(|(n, _)| n == name) {
                let x0 = g as f64 + 0.1 + i as f64 * width;
                bars.push((x0, *v));
            }
        }
        let c = color(i);
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x0, v)| Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], c.filled())),
            )
            .map_err(plot_error)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
        chart
            .draw_series(bars.iter().map(|&(x0, v)| {
                Text::new(
                    format!("{v:.2}"),
                    (x0, v + top * 0.01),
                    ("sans-serif", 10).into_font(),
                )
            }))
            .map_err(plot_error)?;
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (groups.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(plot_error)?;
    for (g, (label, _)) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.25, 0.0));
        root.draw(&Text::new(
            label.clone(),
            (x, y + 10),
            ("sans-serif", 13).into_font(),
        ))
        .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}
