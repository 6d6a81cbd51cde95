//! fulgur on a kind node (namespaces, `fulgur_tests::kind_node`): the agent started as the
//! DaemonSet starts it (its capabilities) forwards the host's TCP and UDP, IPv4 and IPv6, to the
//! node's pods through a service address, next to kube-proxy's conntrack INVALID drop and
//! kindnet's masquerade, in native and generic XDP; replies come from the service address.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{self, TcpSession, UdpFlow},
    kind_node::{self, HOST, HOST6, KindCluster, KindSpec, NODE_IFACE, Netfilter, PodLink},
    netns::{in_netns, unique_token},
    topology::{AgentProcess, Launch, Source},
};

const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
/// New connections (and as many UDP flows) per family and check.
const FLOWS: usize = 12;
const SIZES: [&str; 6] = [
    "--max-services",
    "16",
    "--max-backends",
    "64",
    "--table-size",
    "251",
];

/// A cluster with its services file (removed on drop).
struct Bed {
    cluster: KindCluster,
    services: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.services);
    }
}

fn bed(netfilter: Netfilter, pod_link: PodLink) -> anyhow::Result<Bed> {
    let cluster = KindCluster::new(&KindSpec {
        nodes: 1,
        pods_per_node: 2,
        netfilter,
        pod_link,
    })?;
    cluster.route_service_via(0)?;
    let mut yaml = String::from("services:\n");
    for (vip, v6) in [
        (kind_node::SERVICE.to_string(), false),
        (kind_node::SERVICE6.to_string(), true),
    ] {
        for protocol in ["TCP", "UDP"] {
            yaml += &format!(
                "  - vip: {vip}\n    port: {SERVICE_PORT}\n    protocol: {protocol}\n    backends:\n"
            );
            for pod in &cluster.nodes[0].pods {
                let addr: IpAddr = if v6 {
                    pod.addr6.into()
                } else {
                    pod.addr.into()
                };
                yaml += &format!("      - {{address: \"{addr}\", port: {POD_PORT}}}\n");
            }
        }
    }
    let services = std::env::temp_dir().join(format!("{}.yaml", unique_token("fgkind-svc")));
    std::fs::write(&services, yaml)?;
    Ok(Bed { cluster, services })
}

fn start_agent(
    bed: &Bed,
    mode: XdpAttachMode,
    bpffs_dir: PathBuf,
    extra: &[&str],
) -> anyhow::Result<AgentProcess> {
    let services = bed.services.to_string_lossy().into_owned();
    let mut args = vec!["--services", services.as_str()];
    args.extend_from_slice(extra);
    AgentProcess::start_launched(
        &bed.cluster.nodes[0].ns,
        NODE_IFACE,
        mode,
        Source::Args(&args),
        bpffs_dir,
        &SIZES,
        &Launch::deployed(),
    )
}

fn fresh_bpffs() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgkind")))
}

/// From the host: FLOWS new TCP connections and FLOWS UDP flows per family through the service.
/// Every one is answered, by a pod of the node, from the service address.
fn traffic(bed: &Bed) -> anyhow::Result<()> {
    let pods: Vec<String> = bed.cluster.nodes[0]
        .pods
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let services = [
        (bed.cluster.service(SERVICE_PORT), IpAddr::from(HOST)),
        (bed.cluster.service6(SERVICE_PORT), IpAddr::from(HOST6)),
    ];
    let answered = in_netns(&bed.cluster.host, move || {
        let mut answered = Vec::new();
        for (service, host) in services {
            for i in 0..FLOWS {
                let mut session = TcpSession::connect(service)?;
                let name = session
                    .exchange(format!("tcp {i}").as_bytes())
                    .with_context(|| format!("TCP connection {i} to {service}"))?;
                answered.push(name);
                let udp = UdpFlow::new(SocketAddr::new(host, 0), service)?;
                // UdpFlow checks that the reply comes from the service address.
                answered.push(
                    udp.exchange(format!("udp {i}").as_bytes())
                        .with_context(|| format!("UDP flow {i} to {service}"))?,
                );
            }
        }
        anyhow::Ok(answered)
    })?;
    for pod in &pods {
        ensure!(answered.contains(pod), "{pod} never answered: {answered:?}");
    }
    ensure!(
        answered.iter().all(|a| pods.contains(a)),
        "answers from outside the node's pods: {answered:?}"
    );
    Ok(())
}

fn inspect(agent: &AgentProcess) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&agent.inspect()?)?)
}

fn counter(report: &serde_json::Value, name: &str) -> u64 {
    report["counters"][name].as_u64().unwrap_or(0)
}

/// Every backend (2 pods × 4 services) took the kernel path through one of `via` for `reason`,
/// and no packet took the fast path.
fn assert_kernel_path(
    report: &serde_json::Value,
    via: &[&str],
    reason: &str,
) -> anyhow::Result<()> {
    let backends = report["backend_paths"]
        .as_array()
        .context("backend_paths")?;
    ensure!(backends.len() == 8, "{backends:?}");
    for b in backends {
        ensure!(
            b["path"] == "kernel" && via.iter().any(|v| b["egress"] == *v) && b["reason"] == reason,
            "backend path {b}"
        );
    }
    ensure!(counter(report, "kernel_path") > 0);
    for fast in ["redirect", "transmit", "redirect_failed"] {
        ensure!(
            counter(report, fast) == 0,
            "{fast}: {}",
            counter(report, fast)
        );
    }
    Ok(())
}

fn kube_proxy_node(netfilter: Netfilter, mode: XdpAttachMode) -> anyhow::Result<()> {
    let bed = bed(netfilter, PodLink::Ptp)?;
    let _servers = bed.cluster.start_echo_servers(0, POD_PORT)?;
    let agent = start_agent(&bed, mode, fresh_bpffs(), &[])?;
    traffic(&bed)?;
    let report = inspect(&agent)?;
    // The two pods sit behind veth0 and veth1.
    assert_kernel_path(&report, &["veth0", "veth1"], "netfilter")?;
    ensure!(counter(&report, "reply_translated") > 0);
    let log = agent.log_text();
    ensure!(log.contains("netfilter on this node"), "{log}");
    Ok(())
}

#[test]
fn kube_proxy_iptables_native() -> anyhow::Result<()> {
    kube_proxy_node(Netfilter::Iptables, XdpAttachMode::Native)
}

#[test]
fn kube_proxy_iptables_generic() -> anyhow::Result<()> {
    kube_proxy_node(Netfilter::Iptables, XdpAttachMode::Generic)
}

#[test]
fn kube_proxy_nftables_native() -> anyhow::Result<()> {
    kube_proxy_node(Netfilter::Nftables, XdpAttachMode::Native)
}

#[test]
fn kube_proxy_nftables_generic() -> anyhow::Result<()> {
    kube_proxy_node(Netfilter::Nftables, XdpAttachMode::Generic)
}

/// Pods on a Linux bridge in the node, no netfilter. Native XDP: the bridge takes the kernel
/// path, and `--forwarding fast` is refused with that reason. Generic XDP: the fast path.
#[test]
fn bridge_toward_the_backends() -> anyhow::Result<()> {
    let bed = bed(Netfilter::None, PodLink::Bridge)?;
    let _servers = bed.cluster.start_echo_servers(0, POD_PORT)?;
    let refused = start_agent(
        &bed,
        XdpAttachMode::Native,
        fresh_bpffs(),
        &["--forwarding", "fast"],
    )
    .err()
    .context("--forwarding fast was accepted on a bridge")?;
    let text = format!("{refused:#}");
    ensure!(
        text.contains("cni0: native XDP cannot transmit into a bridge"),
        "{text}"
    );
    let metrics_at = SocketAddr::from((kind_node::node_addr(0), 9464));
    let listen = metrics_at.to_string();
    let agent = start_agent(
        &bed,
        XdpAttachMode::Native,
        fresh_bpffs(),
        &["--metrics-listen", &listen],
    )?;
    traffic(&bed)?;
    let report = inspect(&agent)?;
    assert_kernel_path(&report, &[kind_node::POD_BRIDGE], "bridge")?;
    // /metrics says the same, from the host.
    let metrics = in_netns(&bed.cluster.host, move || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect_timeout(&metrics_at, echo::IO_TIMEOUT)?;
        stream.set_read_timeout(Some(echo::IO_TIMEOUT))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        anyhow::Ok(text)
    })?;
    for expected in [
        "fulgur_egress_path{iface=\"cni0\",path=\"kernel\",reason=\"bridge\"} 1",
        "backend=\"203.0.113.2:8080\",egress=\"cni0\",path=\"kernel\",reason=\"bridge\"} 1",
        "fulgur_dataplane_packets_total{reason=\"redirect_failed\"} 0",
    ] {
        ensure!(metrics.contains(expected), "{expected} not in\n{metrics}");
    }
    ensure!(
        !metrics.contains("fulgur_dataplane_packets_total{reason=\"kernel_path\"} 0"),
        "{metrics}"
    );
    drop(agent);

    // Generic XDP hands the redirect to the bridge's own transmit: the fast path works there.
    let agent = start_agent(&bed, XdpAttachMode::Generic, fresh_bpffs(), &[])?;
    traffic(&bed)?;
    let report = inspect(&agent)?;
    for b in report["backend_paths"]
        .as_array()
        .context("backend_paths")?
    {
        ensure!(
            b["path"] == "fast" && b["egress"] == kind_node::POD_BRIDGE && b["reason"] == "generic",
            "backend path {b}"
        );
    }
    ensure!(counter(&report, "redirect") > 0);
    for other in ["kernel_path", "redirect_failed"] {
        ensure!(
            counter(&report, other) == 0,
            "{other}: {}",
            counter(&report, other)
        );
    }
    Ok(())
}

/// `--forwarding fast` on a node with kube-proxy's rules is refused, naming the tables.
#[test]
fn forced_fast_is_refused_next_to_kube_proxy() -> anyhow::Result<()> {
    let bed = bed(Netfilter::Nftables, PodLink::Ptp)?;
    let refused = start_agent(
        &bed,
        XdpAttachMode::Generic,
        fresh_bpffs(),
        &["--forwarding", "fast"],
    )
    .err()
    .context("--forwarding fast was accepted next to kube-proxy")?;
    let text = format!("{refused:#}");
    ensure!(
        text.contains("netfilter tables are loaded") && text.contains("ip kube-proxy"),
        "{text}"
    );
    Ok(())
}

/// kill -9 and a restart keep established TCP connections and UDP flows, on their pods.
#[test]
fn restart_keeps_connections_next_to_kube_proxy() -> anyhow::Result<()> {
    let bed = bed(Netfilter::Iptables, PodLink::Ptp)?;
    let _servers = bed.cluster.start_echo_servers(0, POD_PORT)?;
    let agent = start_agent(&bed, XdpAttachMode::Native, fresh_bpffs(), &[])?;
    let services = [
        (bed.cluster.service(SERVICE_PORT), IpAddr::from(HOST)),
        (bed.cluster.service6(SERVICE_PORT), IpAddr::from(HOST6)),
    ];
    // Sessions live on one thread inside the host namespace; the test drives it in rounds.
    let (to_host, rounds) = std::sync::mpsc::channel::<()>();
    let (to_test, results) = std::sync::mpsc::channel::<anyhow::Result<Vec<String>>>();
    let host = bed.cluster.host.path();
    let client = std::thread::spawn(move || {
        let run = || -> anyhow::Result<()> {
            let target = std::fs::File::open(&host)?;
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            ensure!(
                unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&target), libc::CLONE_NEWNET)
                } == 0
            );
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            for (service, host) in services {
                for _ in 0..4 {
                    tcp.push(TcpSession::connect(service)?);
                    udp.push(UdpFlow::new(SocketAddr::new(host, 0), service)?);
                }
            }
            for round in 0.. {
                if rounds.recv().is_err() {
                    return Ok(());
                }
                let mut names = Vec::new();
                let mut exchange = || -> anyhow::Result<()> {
                    for (i, s) in tcp.iter_mut().enumerate() {
                        names.push(s.exchange(format!("tcp {i} round {round}").as_bytes())?);
                    }
                    for (i, f) in udp.iter().enumerate() {
                        names.push(f.exchange(format!("udp {i} round {round}").as_bytes())?);
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
    let round = || -> anyhow::Result<Vec<String>> {
        to_host.send(()).context("client thread gone")?;
        results
            .recv_timeout(Duration::from_secs(30))
            .context("client thread silent")?
    };
    let before = round()?;
    let pins = agent.kill_and_keep_pins();
    let while_down = round().context("while the agent is down")?;
    ensure!(while_down == before, "{before:?} -> {while_down:?}");
    let agent = start_agent(&bed, XdpAttachMode::Native, pins, &[])?;
    let after = round().context("after the restart")?;
    ensure!(after == before, "{before:?} -> {after:?}");
    drop(to_host);
    let _ = client.join();
    let report = inspect(&agent)?;
    ensure!(counter(&report, "redirect") == 0 && counter(&report, "kernel_path") > 0);
    Ok(())
}

/// The bed itself, two nodes: a pod reaches a pod on the other node over the routes via the
/// nodes, in both netfilter flavours.
#[test]
fn bed_routes_pods_across_nodes() -> anyhow::Result<()> {
    for netfilter in [Netfilter::Iptables, Netfilter::Nftables] {
        let cluster = KindCluster::new(&KindSpec {
            nodes: 2,
            pods_per_node: 1,
            netfilter,
            pod_link: PodLink::Ptp,
        })?;
        let _servers = cluster.start_echo_servers(0, POD_PORT)?;
        let target = &cluster.nodes[0].pods[0];
        for addr in [IpAddr::from(target.addr), target.addr6.into()] {
            let to = SocketAddr::new(addr, POD_PORT);
            let name = in_netns(&cluster.nodes[1].pods[0].ns, move || {
                echo::tcp_exchange(to, b"hi")
            })?;
            ensure!(name == "node0-pod0", "{netfilter:?}: {name}");
        }
    }
    Ok(())
}
