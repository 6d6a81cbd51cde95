//! End to end through real namespaces: the agent binary, real TCP and UDP sockets, echo
//! servers on the backends. Each scenario runs with XDP in native and in generic mode.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{EchoServer, IO_TIMEOUT, TcpSession, UdpFlow, tcp_exchange},
    netns::{in_netns, unique_token},
    topology::{AgentProcess, CLIENT, CLIENT6, LB_IFACE, Launch, Source, Topology},
};

const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
/// A service address in each family whose services have no backend: they must reject.
const REJECTING_V4: &str = "192.0.2.12";
const REJECTING_V6: &str = "2001:db8:ffff::12";

/// A services file in /tmp, removed on drop.
struct ServicesFile(PathBuf);

impl ServicesFile {
    /// TCP and UDP services on the IPv4 and IPv6 service addresses, over every backend, plus
    /// services without backends.
    fn new(topology: &Topology) -> Self {
        let path = std::env::temp_dir().join(format!("{}.yaml", unique_token("fulgur-services-")));
        let file = ServicesFile(path);
        file.write(topology, &vec![1; topology.backends.len()]);
        file
    }

    /// (Re)writes the file with these backend weights.
    fn write(&self, topology: &Topology, weights: &[u32]) {
        let mut yaml = String::from("services:\n");
        for (vip, v6) in [("192.0.2.10", false), ("\"2001:db8:ffff::10\"", true)] {
            let backends: Vec<String> = topology
                .backends
                .iter()
                .zip(weights)
                .map(|(b, weight)| {
                    let address = if v6 {
                        format!("\"{}\"", b.addr6)
                    } else {
                        b.addr.to_string()
                    };
                    format!("{{address: {address}, port: {BACKEND_PORT}, weight: {weight}}}")
                })
                .collect();
            for protocol in ["TCP", "UDP"] {
                yaml += &format!(
                    "- {{vip: {vip}, port: {SERVICE_PORT}, protocol: {protocol}, backends: [{}]}}\n",
                    backends.join(", ")
                );
            }
        }
        for vip in [REJECTING_V4.to_string(), format!("\"{REJECTING_V6}\"")] {
            for protocol in ["TCP", "UDP"] {
                yaml += &format!("- {{vip: {vip}, port: {SERVICE_PORT}, protocol: {protocol}}}\n");
            }
        }
        std::fs::write(&self.0, yaml).expect("writing services");
    }
}

impl Drop for ServicesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start_backends(topology: &Topology) -> Vec<EchoServer> {
    topology
        .start_echo_servers(BACKEND_PORT, true)
        .expect("echo servers")
}

fn client_addr(vip: SocketAddr, port: u16) -> SocketAddr {
    match vip.ip() {
        IpAddr::V4(_) => SocketAddr::from((CLIENT, port)),
        IpAddr::V6(_) => SocketAddr::from((CLIENT6, port)),
    }
}

fn counter(agent: &AgentProcess, name: &str) -> u64 {
    let report: serde_json::Value = serde_json::from_str(&agent.inspect().unwrap()).unwrap();
    report["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {report}"))
}

fn through_the_service(mode: XdpAttachMode) {
    let topology = Topology::new(3, mode).expect("topology");
    let _servers = start_backends(&topology);
    let services = ServicesFile::new(&topology);
    // With exactly the capabilities manifests/deploy/agent.yaml grants, as a pod would run it.
    let agent = topology
        .start_agent_launched(&services.0, &Launch::deployed())
        .unwrap_or_else(|e| panic!("agent: {e:#}"));

    for vip in [topology.vip(SERVICE_PORT), topology.vip6(SERVICE_PORT)] {
        // TCP connections: the socket is connected to the service address, so a reply from
        // anywhere else would never complete the handshake.
        let tcp_counts = in_netns(&topology.client, move || {
            let mut counts = BTreeMap::<String, usize>::new();
            for i in 0..150 {
                let backend = tcp_exchange(vip, format!("hello {i}").as_bytes())?;
                *counts.entry(backend).or_default() += 1;
            }
            Ok(counts)
        })
        .unwrap_or_else(|e| {
            panic!(
                "TCP to {vip} failed: {e:#}\nagent log:\n{}",
                agent.log_text()
            )
        });
        assert_eq!(
            tcp_counts.len(),
            3,
            "every backend gets connections to {vip}: {tcp_counts:?}"
        );
        assert!(
            tcp_counts.values().all(|n| *n >= 20),
            "spread too uneven: {tcp_counts:?}"
        );

        // UDP flows: replies come from the service address, and every datagram of a flow
        // reaches the same backend.
        let udp_counts = in_netns(&topology.client, move || {
            let mut counts = BTreeMap::<String, usize>::new();
            for flow in 0..45u16 {
                let socket = UdpFlow::new(client_addr(vip, 30000 + flow), vip)?;
                let first = socket.exchange(b"datagram 0")?;
                for n in 1..4 {
                    let again = socket.exchange(format!("datagram {n}").as_bytes())?;
                    ensure!(again == first, "flow {flow} moved from {first} to {again}");
                }
                *counts.entry(first).or_default() += 1;
            }
            Ok(counts)
        })
        .unwrap_or_else(|e| {
            panic!(
                "UDP to {vip} failed: {e:#}\nagent log:\n{}",
                agent.log_text()
            )
        });
        assert_eq!(
            udp_counts.len(),
            3,
            "every backend gets flows to {vip}: {udp_counts:?}"
        );
    }

    // A service without backends refuses: TCP gets a RST, UDP an ICMP port unreachable, which
    // the client's socket reports as "connection refused".
    for rejecting in [REJECTING_V4, REJECTING_V6] {
        let vip = SocketAddr::new(rejecting.parse().unwrap(), SERVICE_PORT);
        in_netns(&topology.client, move || {
            let error =
                TcpStream::connect_timeout(&vip, IO_TIMEOUT).expect_err("connect must fail");
            ensure!(
                error.kind() == ErrorKind::ConnectionRefused,
                "TCP to {vip}: {error}"
            );
            let socket = UdpSocket::bind(client_addr(vip, 0))?;
            socket.connect(vip)?;
            socket.set_read_timeout(Some(IO_TIMEOUT))?;
            socket.send(b"anyone?")?;
            let error = socket.recv(&mut [0u8; 64]).expect_err("no answer but ICMP");
            ensure!(
                error.kind() == ErrorKind::ConnectionRefused,
                "UDP to {vip}: {error}"
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    assert_eq!(
        counter(&agent, "new_flow"),
        2 * (150 + 45),
        "one new flow per connection and UDP flow"
    );
    assert!(
        counter(&agent, "reply_translated") >= 2 * (150 * 2 + 45 * 4),
        "replies translated"
    );
    assert_eq!(counter(&agent, "reject_tcp_reset"), 2);
    assert_eq!(counter(&agent, "reject_icmp_unreachable"), 2);
    if mode == XdpAttachMode::Native {
        assert!(
            counter(&agent, "redirect") > 0,
            "native mode redirects in XDP"
        );
    }
}

#[test]
fn dual_stack_through_the_service_native() {
    through_the_service(XdpAttachMode::Native);
}

#[test]
fn dual_stack_through_the_service_generic() {
    through_the_service(XdpAttachMode::Generic);
}

/// kill -9 the agent and start a new one while TCP connections and UDP flows keep talking: none
/// breaks, none moves, and the new agent adopts the pinned state without rewriting it.
fn restart_keeps_every_flow(mode: XdpAttachMode) {
    let topology = Topology::new(3, mode).expect("topology");
    let _servers = start_backends(&topology);
    let services = ServicesFile::new(&topology);
    // Restarts happen in a pod: with exactly the capabilities agent.yaml grants.
    let agent = topology
        .start_agent_launched(&services.0, &Launch::deployed())
        .unwrap_or_else(|e| panic!("agent: {e:#}"));
    let vips = [topology.vip(SERVICE_PORT), topology.vip6(SERVICE_PORT)];

    let stop = Arc::new(AtomicBool::new(false));
    let rounds_done = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let stop = stop.clone();
        let rounds_done = rounds_done.clone();
        let client = topology.client.path();
        std::thread::spawn(move || -> anyhow::Result<(usize, usize)> {
            let ns = std::fs::File::open(&client)?;
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            ensure!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) }
                    == 0
            );
            let mut sessions = Vec::new();
            let mut flows = Vec::new();
            for (i, vip) in vips.iter().cycle().take(24).enumerate() {
                let mut session = TcpSession::connect(*vip)?;
                let backend = session.exchange(b"first")?;
                sessions.push((session, backend));
                let flow = UdpFlow::new(client_addr(*vip, 31000 + i as u16), *vip)?;
                let backend = flow.exchange(b"first")?;
                flows.push((flow, backend));
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (i, (session, backend)) in sessions.iter_mut().enumerate() {
                    let now = session
                        .exchange(format!("round {rounds}").as_bytes())
                        .with_context(|| format!("TCP session {i}"))?;
                    ensure!(
                        &now == backend,
                        "TCP session {i} moved from {backend} to {now}"
                    );
                }
                for (i, (flow, backend)) in flows.iter().enumerate() {
                    let now = flow
                        .exchange(format!("round {rounds}").as_bytes())
                        .with_context(|| format!("UDP flow {i}"))?;
                    ensure!(
                        &now == backend,
                        "UDP flow {i} moved from {backend} to {now}"
                    );
                }
                rounds += 1;
                rounds_done.store(rounds, Ordering::Relaxed);
            }
            Ok((rounds, sessions.len() + flows.len()))
        })
    };

    // Each phase lasts until the traffic has made a few more full rounds (or the thread died).
    let wait_rounds = |more: usize| {
        let target = rounds_done.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while rounds_done.load(Ordering::Relaxed) < target
            && !traffic.is_finished()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_rounds(2);
    let bpffs_dir = agent.kill_and_keep_pins();
    wait_rounds(3); // Forwarding continues with no agent at all.
    // The successor gets new weights: most Maglev slots change, yet tracked flows must stay.
    services.write(&topology, &[5, 1, 1]);
    let successor = AgentProcess::start_launched(
        &topology.lb,
        LB_IFACE,
        mode,
        Source::File(&services.0),
        bpffs_dir,
        &[
            "--max-services",
            "64",
            "--max-backends",
            "1024",
            "--table-size",
            "1021",
        ],
        &Launch::deployed(),
    )
    .unwrap_or_else(|e| panic!("restarted agent: {e:#}"));
    wait_rounds(3);
    stop.store(true, Ordering::Relaxed);
    let (rounds, flows) = traffic.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "traffic broke across the restart: {e:#}\nagent log:\n{}",
            successor.log_text()
        )
    });
    assert!(rounds >= 8, "only {rounds} rounds of traffic ran");
    assert_eq!(flows, 48);
    let log = successor.log_text();
    assert!(
        log.contains("updated: 4") && log.contains("unchanged: 4"),
        "the new agent must adopt the pinned services, rewriting only the changed ones:\n{log}"
    );
}

#[test]
fn restart_keeps_every_flow_native() {
    restart_keeps_every_flow(XdpAttachMode::Native);
}

#[test]
fn restart_keeps_every_flow_generic() {
    restart_keeps_every_flow(XdpAttachMode::Generic);
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

    // A broken edit is refused and the last good set keeps serving. Written as editors save
    // (a new file renamed over the old): a truncate-then-write can be read half way, and an
    // empty services file is a valid, empty set.
    let saved = services.0.with_extension("new");
    std::fs::write(
        &saved,
        "services:\n- {vip: 192.0.2.10, port: 0, protocol: TCP}\n",
    )
    .unwrap();
    std::fs::rename(&saved, &services.0).unwrap();
    agent
        .wait_for_log("keeping the last good services", Duration::from_secs(10))
        .unwrap();
    let served = in_netns(&topology.client, move || tcp_exchange(vip, b"still")).unwrap();
    assert_eq!(served, "backend-1");
}
