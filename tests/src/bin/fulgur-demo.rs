//! `cargo xtask demo`: the whole path in network namespaces. A client, a load balancer running
//! `fulgur-agent` (native XDP) and `fulgur-controller` (standalone mode, over mutual TLS), and
//! three backends. The controller reads the example manifests (manifests/examples/standalone);
//! traffic goes through the Gateway's address and the table shows the split by route weights.
//! Then a manifest is edited live and the split follows.

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
    echo::{UdpFlow, tcp_exchange},
    netns::{in_netns, unique_token},
    pki::Pki,
    topology::{AgentProcess, CLIENT, LB_IFACE, Source, Topology, VIP},
};

const CONNECTIONS: usize = 400;
const UDP_FLOWS: u16 = 100;
const GRPC: &str = "127.0.0.1:50051";

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

fn main() -> anyhow::Result<()> {
    println!(
        "fulgur demo: client 198.51.100.2 -> Gateway 192.0.2.10 (TCP 80, UDP 53) -> 3 backends"
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
    let pki = Pki::generate("fulgur demo CA")?.write_to(&work.join("pki"))?;
    let source = Source::Grpc {
        listen: GRPC.parse()?,
        tls: Some(&pki),
        metrics: None,
    };
    let agent = AgentProcess::start(&topology.lb, LB_IFACE, topology.mode, source)?;
    println!(
        "agent: native XDP on {LB_IFACE}, gRPC with mutual TLS on {GRPC} (pins under {})",
        agent.bpffs_dir.display()
    );
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
            .args(["--agent", &format!("https://{GRPC}"), "--tls-cert"])
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
        "controller: standalone, reading {} (the example manifests)",
        manifests.display()
    );

    let (tcp, udp) = in_netns(&topology.client, measure(20000))?;
    print_table(
        "TCPRoute web: echo-a weight 3, echo-b weight 1; UDPRoute dns: echo-c",
        topology,
        &tcp,
        &udp,
    );

    let routes = manifests.join("routes.yaml");
    let edited = std::fs::read_to_string(&routes)?.replace("weight: 3", "weight: 1");
    std::fs::write(&routes, edited)?;
    controller.wait_for("agent in sync", 2)?;
    let (tcp, udp) = in_netns(&topology.client, measure(30000))?;
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
            let list: Vec<String> = conditions
                .as_sequence()
                .into_iter()
                .flatten()
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
        }
    }
    Ok(())
}
