//! `cargo xtask demo`: a client, a load balancer running the agent, and three backends, each in
//! its own network namespace. Traffic goes through the service address; the table shows which
//! backend answered. Then the services file is edited live and the split follows.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{EchoServer, UdpFlow, tcp_exchange},
    netns::{in_netns, unique_token},
    topology::{CLIENT, Topology, VIP},
};

const CONNECTIONS: usize = 300;
const UDP_FLOWS: u16 = 150;

fn services_yaml(topology: &Topology, weights: &[u32]) -> String {
    let backends: Vec<String> = topology
        .backends
        .iter()
        .zip(weights)
        .map(|(b, w)| format!("{{address: {}, port: 8080, weight: {w}}}", b.addr))
        .collect();
    let backends = backends.join(", ");
    format!(
        "services:\n- {{vip: {VIP}, port: 80, protocol: TCP, backends: [{backends}]}}\n\
         - {{vip: {VIP}, port: 53, protocol: UDP, backends: [{backends}]}}\n"
    )
}

/// `first_port` sets the UDP client ports, so each round's flows are new flows.
fn measure(
    topology: &Topology,
    first_port: u16,
) -> anyhow::Result<(BTreeMap<String, usize>, BTreeMap<String, usize>)> {
    let tcp_vip = SocketAddr::from((VIP, 80));
    let udp_vip = SocketAddr::from((VIP, 53));
    in_netns(&topology.client, move || {
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
    })
}

fn print_table(
    title: &str,
    topology: &Topology,
    weights: &[u32],
    tcp: &BTreeMap<String, usize>,
    udp: &BTreeMap<String, usize>,
) {
    println!("\n{title}");
    println!(
        "  {:<10} {:<15} {:>6} {:>16} {:>10}",
        "backend", "address", "weight", "TCP connections", "UDP flows"
    );
    for (b, w) in topology.backends.iter().zip(weights) {
        println!(
            "  {:<10} {:<15} {:>6} {:>16} {:>10}",
            b.name,
            b.addr,
            w,
            tcp.get(&b.name).copied().unwrap_or(0),
            udp.get(&b.name).copied().unwrap_or(0)
        );
    }
    println!(
        "  {:<33} {:>16} {:>10}",
        "total",
        tcp.values().sum::<usize>(),
        udp.values().sum::<usize>()
    );
}

fn main() -> anyhow::Result<()> {
    println!("fulgur demo: client 198.51.100.2 -> service {VIP} (TCP 80, UDP 53) -> 3 backends");
    let topology = Topology::new(3, XdpAttachMode::Native).context("building the namespaces")?;
    let _servers = topology
        .backends
        .iter()
        .map(|b| EchoServer::start(&b.ns, &b.name, SocketAddr::from((b.addr, 8080))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let services = std::env::temp_dir().join(format!("{}.yaml", unique_token("fulgur-demo-")));
    let result = (|| {
        let weights = [1, 1, 1];
        std::fs::write(&services, services_yaml(&topology, &weights))?;
        let agent = topology.start_agent(&services)?;
        println!(
            "agent attached to {} in native XDP mode (pins under {})",
            fulgur_tests::topology::LB_IFACE,
            agent.bpffs_dir.display()
        );
        let (tcp, udp) = measure(&topology, 20000)?;
        print_table("equal weights:", &topology, &weights, &tcp, &udp);

        let weights = [3, 1, 0];
        std::fs::write(&services, services_yaml(&topology, &weights))?;
        agent.wait_for_log("services file changed, applied", Duration::from_secs(10))?;
        let (tcp, udp) = measure(&topology, 30000)?;
        print_table(
            "after editing the services file to weights 3:1:0 (no restart):",
            &topology,
            &weights,
            &tcp,
            &udp,
        );
        anyhow::ensure!(
            !tcp.contains_key("backend-2") && !udp.contains_key("backend-2"),
            "weight 0 got traffic"
        );

        println!("\n$ fulgur-agent inspect --flows 0");
        print!("{}", agent.inspect_text()?);
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_file(&services);
    result?;
    println!("\ncleaned up: namespaces, programs and pins removed");
    Ok(())
}
