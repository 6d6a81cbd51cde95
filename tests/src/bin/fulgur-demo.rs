//! `cargo xtask demo`: the whole path in network namespaces. A client, a load balancer running
//! `fulgur-agent` (native XDP) and `fulgur-controller` (standalone mode, over mutual TLS), and
//! three backends. The controller reads the example manifests (manifests/examples/standalone);
//! traffic goes through the Gateway's address and the table shows the split by route weights.
//! Then a manifest is edited live and the split follows.
//!
//! The load balancer is node `lb`; echo-b's EndpointSlice puts it on node `node-b`, so it plays
//! a pod on another node: its flows are SNATed to the node's address, while echo-a's keep the
//! client's. The client reaches the Gateway address on-link, through the agent's ARP answer.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{TcpSession, UdpFlow, tcp_exchange},
    netns::{in_netns, unique_token},
    pki::Pki,
    topology::{AgentProcess, CLIENT, LB_CLIENT_SIDE, LB_IFACE, Source, Topology, VIP},
};

const CONNECTIONS: usize = 400;
const UDP_FLOWS: u16 = 100;
const GRPC: &str = "127.0.0.1:50051";
/// The load balancer's node, and the node echo-b's EndpointSlice names.
const NODE: &str = "lb";
const OTHER_NODE: &str = "node-b";
/// Where echo-b's replies come back into the load balancer (backend-1's link).
const REMOTE_LINK: &str = "lb-b1";
/// Long-lived TCP connections whose far ends the backends are asked about.
const SESSIONS: usize = 24;

struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&self, needle: &str, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches(needle).count() < count {
            if Instant::now() > deadline {
                bail!("the controller did not log {needle:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Answers counted by backend name: (TCP connections, UDP flows).
type Split = (BTreeMap<String, usize>, BTreeMap<String, usize>);

fn measure(first_port: u16) -> impl FnOnce() -> anyhow::Result<Split> + Send + 'static {
    move || {
        let tcp_vip = SocketAddr::from((VIP, 80));
        let udp_vip = SocketAddr::from((VIP, 53));
        let mut tcp = BTreeMap::new();
        for i in 0..CONNECTIONS {
            *tcp.entry(tcp_exchange(tcp_vip, format!("conn {i}").as_bytes())?)
                .or_default() += 1;
        }
        let mut udp = BTreeMap::new();
        for flow in 0..UDP_FLOWS {
            let socket = UdpFlow::new(SocketAddr::from((CLIENT, first_port + flow)), udp_vip)?;
            *udp.entry(socket.exchange(b"query")?).or_default() += 1;
        }
        Ok((tcp, udp))
    }
}

/// The traffic of [`measure`]; on a failure, what the agent saw comes with the error.
fn traffic(topology: &Topology, agent: &AgentProcess, first_port: u16) -> anyhow::Result<Split> {
    in_netns(&topology.client, measure(first_port)).map_err(|e| {
        e.context(format!(
            "the agent's maps:\n{}\nits log:\n{}",
            agent.inspect_text().unwrap_or_default(),
            agent.log_text()
        ))
    })
}

fn print_table(
    title: &str,
    topology: &Topology,
    tcp: &BTreeMap<String, usize>,
    udp: &BTreeMap<String, usize>,
) {
    println!("\n{title}");
    println!(
        "  {:<10} {:<15} {:>16} {:>10}",
        "backend", "address", "TCP connections", "UDP flows"
    );
    for b in &topology.backends {
        let count = |m: &BTreeMap<String, usize>| m.get(&b.name).copied().unwrap_or(0);
        println!(
            "  {:<10} {:<15} {:>16} {:>10}",
            b.name,
            b.addr,
            count(tcp),
            count(udp)
        );
    }
    println!(
        "  {:<26} {:>16} {:>10}",
        "total",
        tcp.values().sum::<usize>(),
        udp.values().sum::<usize>()
    );
}

fn copy_examples(to: &Path) -> anyhow::Result<()> {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/standalone");
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        std::fs::copy(&path, to.join(path.file_name().context("file name")?))?;
    }
    Ok(())
}

/// Gives each endpoint a `nodeName`, as the EndpointSlice controller writes it: echo-a's and
/// echo-c's pods on the load balancer's node, echo-b's on another one.
fn place_endpoints(manifests: &Path) -> anyhow::Result<()> {
    let path = manifests.join("services.yaml");
    let mut text = std::fs::read_to_string(&path)?;
    for (address, node) in [
        ("203.0.113.2", NODE),
        ("203.0.113.6", OTHER_NODE),
        ("203.0.113.10", NODE),
    ] {
        let endpoint = format!("  - addresses: [{address}]\n");
        anyhow::ensure!(
            text.contains(&endpoint),
            "no endpoint {address} in services.yaml"
        );
        text = text.replace(&endpoint, &format!("{endpoint}    nodeName: {node}\n"));
    }
    std::fs::write(&path, text)?;
    Ok(())
}

/// Opens `SESSIONS` TCP connections through the Gateway and asks each TCP backend's kernel
/// (`ss`) whom its connections come from.
fn far_ends(topology: &Topology) -> anyhow::Result<()> {
    let tcp_vip = SocketAddr::from((VIP, 80));
    let sessions = in_netns(&topology.client, move || {
        (0..SESSIONS)
            .map(|i| {
                let mut session = TcpSession::connect(tcp_vip)?;
                session.exchange(format!("session {i}").as_bytes())?;
                Ok(session)
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    println!(
        "\nwho the backends see ({SESSIONS} open TCP connections from the client; `ss` in each backend):"
    );
    for (backend, service, node) in [(0, "echo-a", NODE), (1, "echo-b", OTHER_NODE)] {
        let b = &topology.backends[backend];
        let out =
            b.ns.exec("ss", &["-tnH", "state", "established", "( sport = :8080 )"])?;
        let mut peers: BTreeMap<String, Vec<u16>> = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(peer) = line.split_whitespace().last() else {
                continue;
            };
            let peer: SocketAddr = peer.parse().with_context(|| format!("ss: {line}"))?;
            peers
                .entry(peer.ip().to_string())
                .or_default()
                .push(peer.port());
        }
        let placed = if node == NODE { "local" } else { "remote" };
        let seen: Vec<String> = peers
            .iter()
            .map(|(ip, ports)| {
                let (low, high) = (ports.iter().min(), ports.iter().max());
                let what = if *ip == CLIENT.to_string() {
                    "the client: its address kept".to_owned()
                } else {
                    format!(
                        "this node's address, SNAT ports {}-{}",
                        low.unwrap_or(&0),
                        high.unwrap_or(&0)
                    )
                };
                format!("{ip} ({what}) x{}", ports.len())
            })
            .collect();
        println!(
            "  {:<10} {service} on node {node} ({placed}): {}",
            b.name,
            if seen.is_empty() {
                "no connection this time".to_owned()
            } else {
                seen.join(", ")
            }
        );
    }
    drop(sessions);
    Ok(())
}

/// The client's neighbour entry for the Gateway address and the MAC of the interface the
/// agent answers ARP on.
fn print_neighbour(topology: &Topology) -> anyhow::Result<()> {
    let entry = topology
        .client
        .ip(&["neigh", "show", &VIP.to_string(), "dev", "cl0"])?;
    let link = topology.lb.ip(&["-br", "link", "show", "dev", LB_IFACE])?;
    println!(
        "\nthe client's neighbour entry for {VIP} (on-link, answered by the agent's XDP ARP reply):\n  {}\n  the load balancer's {LB_IFACE}: {}",
        String::from_utf8_lossy(&entry.stdout).trim(),
        String::from_utf8_lossy(&link.stdout).trim()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!(
        "fulgur demo: client 198.51.100.2 -> Gateway 192.0.2.10 (TCP 80, UDP 53) -> 3 backends, \
         one of them on another node"
    );
    let topology = Topology::new(3, XdpAttachMode::Native).context("building the namespaces")?;
    let _servers = topology.start_echo_servers(8080, false)?;
    let work = std::env::temp_dir().join(unique_token("fulgur-demo-"));
    let result = run(&topology, &work);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    println!("\ncleaned up: namespaces, programs, pins and files removed");
    Ok(())
}

fn run(topology: &Topology, work: &Path) -> anyhow::Result<()> {
    let manifests = work.join("manifests");
    copy_examples(&manifests)?;
    place_endpoints(&manifests)?;
    let pki = Pki::generate("fulgur demo CA")?.write_to(&work.join("pki"))?;
    let path = |p: &Path| p.to_str().map(str::to_owned).context("a UTF-8 path");
    let (cert, key, ca) = (
        path(&pki.server_cert)?,
        path(&pki.server_key)?,
        path(&pki.ca)?,
    );
    // Also on echo-b's link: its replies to the SNAT ports are translated back in XDP there.
    let args = [
        "--iface",
        REMOTE_LINK,
        "--grpc-listen",
        GRPC,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--client-ca",
        &ca,
    ];
    let agent = AgentProcess::start(&topology.lb, LB_IFACE, topology.mode, Source::Args(&args))?;
    println!(
        "agent: native XDP on {LB_IFACE} (and {REMOTE_LINK}), SNAT for remote backends (--snat remote, \
         the default) from {LB_CLIENT_SIDE}, gRPC with mutual TLS on {GRPC} (pins under {})",
        agent.bpffs_dir.display()
    );
    // echo-b's replies are translated in XDP, where a veth's checksum offload is not done
    // yet: have them leave with full checksums, as they would arrive from another node.
    topology.backends[1]
        .ns
        .exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    // On-link: the client asks ARP for the Gateway address instead of using its gateway.
    topology
        .client
        .ip(&["route", "add", &format!("{VIP}/32"), "dev", "cl0"])?;
    let status_file = work.join("status.yaml");
    let log = work.join("controller.log");
    let controller = Controller {
        child: topology
            .lb
            .command(fulgur_tests::controller_binary())
            .args(["--provider", "file", "--manifests"])
            .arg(&manifests)
            .arg("--status-file")
            .arg(&status_file)
            .args(["--agent", &format!("{NODE}=https://{GRPC}"), "--tls-cert"])
            .arg(&pki.client_cert)
            .arg("--tls-key")
            .arg(&pki.client_key)
            .arg("--ca")
            .arg(&pki.ca)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting fulgur-controller")?,
        log,
    };
    controller.wait_for("agent in sync", 1)?;
    println!(
        "controller: standalone, reading {} (the example manifests; echo-b's endpoint on node \
         {OTHER_NODE}, the others on {NODE}), --agent {NODE}=https://{GRPC}",
        manifests.display()
    );

    let (tcp, udp) = traffic(topology, &agent, 20000)?;
    print_table(
        "TCPRoute web: echo-a weight 3, echo-b weight 1 (on node-b: SNAT); UDPRoute dns: echo-c",
        topology,
        &tcp,
        &udp,
    );
    print_neighbour(topology)?;
    far_ends(topology)?;

    let routes = manifests.join("routes.yaml");
    let edited = std::fs::read_to_string(&routes)?.replace("weight: 3", "weight: 1");
    std::fs::write(&routes, edited)?;
    controller.wait_for("agent in sync", 2)?;
    let (tcp, udp) = traffic(topology, &agent, 30000)?;
    print_table(
        "after editing routes.yaml live to weights 1:1 (no restart)",
        topology,
        &tcp,
        &udp,
    );

    println!("\nstatus file ({}):", status_file.display());
    print_statuses(&std::fs::read_to_string(&status_file)?)?;
    println!("\n$ fulgur-agent inspect --flows 0");
    print!("{}", agent.inspect_text()?);
    Ok(())
}

/// One line per condition of every object in the status file.
fn print_statuses(text: &str) -> anyhow::Result<()> {
    use serde::Deserialize as _;
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        let object = format!(
            "{} {}",
            value["kind"].as_str().unwrap_or("?"),
            value["metadata"]["name"].as_str().unwrap_or("?")
        );
        let status = &value["status"];
        let mut groups = vec![(String::new(), &status["conditions"])];
        for l in status["listeners"].as_sequence().into_iter().flatten() {
            let attached = l["attachedRoutes"].as_i64().unwrap_or(0);
            groups.push((
                format!(
                    "listener {} ({attached} routes)",
                    l["name"].as_str().unwrap_or("?")
                ),
                &l["conditions"],
            ));
        }
        for p in status["parents"].as_sequence().into_iter().flatten() {
            groups.push((
                format!("parent {}", p["parentRef"]["name"].as_str().unwrap_or("?")),
                &p["conditions"],
            ));
        }
        for (scope, conditions) in groups {
            let conditions: Vec<&serde_yaml::Value> =
                conditions.as_sequence().into_iter().flatten().collect();
            let list: Vec<String> = conditions
                .iter()
                .map(|c| {
                    format!(
                        "{}={}",
                        c["type"].as_str().unwrap_or("?"),
                        c["status"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            if !list.is_empty() {
                println!("  {object:<22} {scope:<26} {}", list.join(" "));
            }
            // Messages say who announces the address, and why a condition is False.
            for c in &conditions {
                let message = c["message"].as_str().unwrap_or("");
                if !message.is_empty() && c["type"] != "Accepted" {
                    println!(
                        "  {:<49} {}: {message}",
                        "",
                        c["type"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(())
}
