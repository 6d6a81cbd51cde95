//! End to end through real namespaces: the agent binary, real TCP and UDP sockets, echo
//! servers on the backends. Each scenario runs with XDP in native and in generic mode.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{EchoServer, UdpFlow, tcp_exchange},
    netns::{in_netns, unique_token},
    topology::{CLIENT, Topology},
};

const BACKENDS: usize = 3;
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;

/// A services file in /tmp, removed on drop.
struct ServicesFile(PathBuf);

impl ServicesFile {
    fn new(topology: &Topology) -> Self {
        let path = std::env::temp_dir().join(format!("{}.yaml", unique_token("fulgur-services-")));
        let backends: Vec<String> = topology
            .backends
            .iter()
            .map(|b| format!("{{address: {}, port: {BACKEND_PORT}}}", b.addr))
            .collect();
        let backends = backends.join(", ");
        let yaml = format!(
            "services:\n- {{vip: 192.0.2.10, port: {SERVICE_PORT}, protocol: TCP, backends: [{backends}]}}\n\
             - {{vip: 192.0.2.10, port: {SERVICE_PORT}, protocol: UDP, backends: [{backends}]}}\n"
        );
        std::fs::write(&path, yaml).expect("writing services");
        ServicesFile(path)
    }
}

impl Drop for ServicesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start_backends(topology: &Topology) -> Vec<EchoServer> {
    topology
        .backends
        .iter()
        .map(|b| {
            EchoServer::start(&b.ns, &b.name, SocketAddr::from((b.addr, BACKEND_PORT)))
                .expect("echo server")
        })
        .collect()
}

fn tcp_and_udp_through_the_service(mode: XdpAttachMode) {
    let topology = Topology::new(BACKENDS, mode).expect("topology");
    let _servers = start_backends(&topology);
    let services = ServicesFile::new(&topology);
    let agent = topology.start_agent(&services.0).expect("agent");
    let vip = topology.vip(SERVICE_PORT);

    // 240 TCP connections: each is answered through the service address (the socket is
    // connected to it, so a reply from anywhere else would never complete the handshake).
    let tcp_counts = in_netns(&topology.client, move || {
        let mut counts = BTreeMap::<String, usize>::new();
        for i in 0..240 {
            let backend = tcp_exchange(vip, format!("hello {i}").as_bytes())?;
            *counts.entry(backend).or_default() += 1;
        }
        Ok(counts)
    })
    .unwrap_or_else(|e| {
        panic!(
            "TCP through the service failed: {e:#}\nagent log:\n{}",
            agent.log_text()
        )
    });
    assert_eq!(
        tcp_counts.len(),
        BACKENDS,
        "every backend gets connections: {tcp_counts:?}"
    );
    assert!(
        tcp_counts.values().all(|n| *n >= 30),
        "spread too uneven: {tcp_counts:?}"
    );

    // 60 UDP flows × 5 datagrams: replies come from the service address, and every datagram of
    // a flow reaches the same backend.
    let udp_counts = in_netns(&topology.client, move || {
        let mut counts = BTreeMap::<String, usize>::new();
        for flow in 0..60u16 {
            let socket = UdpFlow::new(SocketAddr::from((CLIENT, 30000 + flow)), vip)?;
            let first = socket.exchange(b"datagram 0")?;
            for n in 1..5 {
                let again = socket.exchange(format!("datagram {n}").as_bytes())?;
                anyhow::ensure!(again == first, "flow {flow} moved from {first} to {again}");
            }
            *counts.entry(first).or_default() += 1;
        }
        Ok(counts)
    })
    .unwrap_or_else(|e| {
        panic!(
            "UDP through the service failed: {e:#}\nagent log:\n{}",
            agent.log_text()
        )
    });
    assert_eq!(
        udp_counts.len(),
        BACKENDS,
        "every backend gets flows: {udp_counts:?}"
    );

    // The counters agree with what the client saw.
    let report: serde_json::Value = serde_json::from_str(&agent.inspect().unwrap()).unwrap();
    let counter = |name: &str| {
        report["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c[0] == name)
            .map(|c| c[1].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(
        counter("new_flow"),
        240 + 60,
        "one new flow per connection and per UDP flow"
    );
    assert!(
        counter("reply_translated") >= 240 * 2 + 60 * 5,
        "replies translated"
    );
    if mode == XdpAttachMode::Native {
        assert!(counter("redirect") > 0, "native mode redirects in XDP");
    }
}

#[test]
fn tcp_and_udp_through_the_service_native() {
    tcp_and_udp_through_the_service(XdpAttachMode::Native);
}

#[test]
fn tcp_and_udp_through_the_service_generic() {
    tcp_and_udp_through_the_service(XdpAttachMode::Generic);
}

/// Editing the services file moves new traffic; the agent needs no restart.
#[test]
fn services_file_changes_take_effect() {
    let topology = Topology::new(2, XdpAttachMode::Generic).expect("topology");
    let _servers = start_backends(&topology);
    let services = ServicesFile::new(&topology);
    let agent = topology.start_agent(&services.0).expect("agent");
    let vip = topology.vip(SERVICE_PORT);
    let only = topology.backends[1].addr;
    std::fs::write(
        &services.0,
        format!("services:\n- {{vip: 192.0.2.10, port: {SERVICE_PORT}, protocol: TCP, backends: [{{address: {only}, port: {BACKEND_PORT}}}]}}\n"),
    )
    .unwrap();
    agent
        .wait_for_log("services file changed, applied", Duration::from_secs(10))
        .unwrap();
    let served = in_netns(&topology.client, move || {
        (0..40)
            .map(|i| tcp_exchange(vip, format!("after {i}").as_bytes()))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .unwrap();
    assert!(served.iter().all(|b| b == "backend-1"), "{served:?}");

    // A broken edit is refused and the last good set keeps serving.
    std::fs::write(
        &services.0,
        "services:\n- {vip: 192.0.2.10, port: 0, protocol: TCP}\n",
    )
    .unwrap();
    agent
        .wait_for_log("keeping the last good services", Duration::from_secs(10))
        .unwrap();
    let served = in_netns(&topology.client, move || tcp_exchange(vip, b"still")).unwrap();
    assert_eq!(served, "backend-1");
}
