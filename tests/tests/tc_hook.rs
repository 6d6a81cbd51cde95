//! The TC egress hook without tcx: `--tc-attach netlink` forces the clsact fallback that kernels
//! before 6.6 get, on this kernel. Replies are translated by the egress program under that hook;
//! a restart adopts the filter in place (established flows go on); a restart with the other hook
//! replaces the attachment, never leaving two; `detach` deletes the filter. All under the
//! DaemonSet's capabilities.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{TcpSession, UdpFlow, tcp_exchange},
    netns::{NetNs, in_netns, unique_token},
    topology::{
        AgentProcess, CLIENT, LB_CLIENT_SIDE, LB_IFACE, Launch, ServicesFile, Source, Topology,
    },
};

/// Our filter as `tc filter show` prints it.
const OUR_FILTER: &str = "handle 0xf17c fulgur_tc_egress direct-action";
const METRICS_PORT: u16 = 9464;

/// What is attached to egress of `iface` in `ns`: tcx program names, and the cls_bpf filter
/// lines `tc` shows.
fn egress_hooks(ns: &NetNs, iface: &'static str) -> (Vec<String>, Vec<String>) {
    let tcx = in_netns(ns, move || {
        let (_, programs) = SchedClassifier::query_tcx(iface, TcAttachType::Egress)?;
        Ok(programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>())
    })
    .unwrap();
    let shown = ns
        .exec("tc", &["filter", "show", "dev", iface, "egress"])
        .unwrap();
    let filters = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .filter(|l| l.contains("handle"))
        .map(str::to_owned)
        .collect();
    (tcx, filters)
}

/// The program id in our filter line (`... id 185 name ...`).
fn filter_program_id(filters: &[String]) -> u32 {
    let words: Vec<&str> = filters[0].split_whitespace().collect();
    let at = words.iter().position(|w| *w == "id").expect("an id");
    words[at + 1].parse().unwrap()
}

fn assert_netlink_only(topology: &Topology, agent: &AgentProcess) -> u32 {
    let (tcx, filters) = egress_hooks(&topology.lb, LB_IFACE);
    assert!(tcx.is_empty(), "a tcx program beside the filter: {tcx:?}");
    assert_eq!(filters.len(), 1, "{filters:?}\n{}", agent.log_text());
    assert!(filters[0].contains(OUR_FILTER), "{filters:?}");
    filter_program_id(&filters)
}

fn assert_tcx_only(topology: &Topology, agent: &AgentProcess) {
    let (tcx, filters) = egress_hooks(&topology.lb, LB_IFACE);
    assert!(filters.is_empty(), "a filter beside tcx: {filters:?}");
    // The kernel keeps 15 characters of a program's name.
    assert_eq!(tcx, ["fulgur_tc_egres"], "{}", agent.log_text());
}

fn start(
    topology: &Topology,
    services: &ServicesFile,
    bpffs_dir: PathBuf,
    hook: &str,
) -> AgentProcess {
    let metrics = SocketAddr::from((LB_CLIENT_SIDE, METRICS_PORT)).to_string();
    let flags = [
        "--max-services",
        "8",
        "--max-backends",
        "64",
        "--table-size",
        "251",
        "--tc-attach",
        hook,
        "--metrics-listen",
        &metrics,
    ];
    AgentProcess::start_launched(
        &topology.lb,
        LB_IFACE,
        XdpAttachMode::Generic,
        Source::File(&services.0),
        bpffs_dir,
        &flags,
        &Launch::deployed(),
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// GET /metrics from the client's side, over the wire.
fn scrape(topology: &Topology) -> String {
    let addr = SocketAddr::from((LB_CLIENT_SIDE, METRICS_PORT));
    in_netns(&topology.client, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: fulgur\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
    .unwrap()
}

/// New connections and flows: every reply comes from the service address (UdpFlow checks the
/// source; a TCP SYN-ACK from a backend's address would not complete the handshake).
fn new_flows_are_served(topology: &Topology, agent: &AgentProcess) {
    let vip = topology.vip(80);
    let served = in_netns(&topology.client, move || {
        let mut names = Vec::new();
        for i in 0..10 {
            names.push(tcp_exchange(vip, format!("hello {i}").as_bytes())?);
        }
        for port in 0..5 {
            let flow = UdpFlow::new(SocketAddr::from((CLIENT, 34000 + port)), vip)?;
            names.push(flow.exchange(b"datagram")?);
        }
        Ok(names)
    })
    .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log_text()));
    assert_eq!(served.len(), 15);
    assert!(
        served.iter().any(|n| n == "backend-0") && served.iter().any(|n| n == "backend-1"),
        "{served:?}"
    );
}

/// A TCP connection and a UDP flow kept open across restarts; each exchange must reach the
/// backend it started on, with replies from the service address.
struct Established {
    tcp: TcpSession,
    udp: UdpFlow,
    tcp_backend: String,
    udp_backend: String,
    round: usize,
}

impl Established {
    fn open(topology: &Topology) -> Self {
        let vip = topology.vip(80);
        in_netns(&topology.client, move || {
            let mut tcp = TcpSession::connect(vip)?;
            let udp = UdpFlow::new(SocketAddr::from((CLIENT, 34100)), vip)?;
            let tcp_backend = tcp.exchange(b"round 0")?;
            let udp_backend = udp.exchange(b"round 0")?;
            Ok(Established {
                tcp,
                udp,
                tcp_backend,
                udp_backend,
                round: 0,
            })
        })
        .unwrap()
    }

    fn still_served(mut self, topology: &Topology, agent: &AgentProcess) -> Self {
        self.round += 1;
        let payload = format!("round {}", self.round);
        in_netns(&topology.client, move || {
            let tcp = self.tcp.exchange(payload.as_bytes())?;
            let udp = self.udp.exchange(payload.as_bytes())?;
            anyhow::ensure!(
                tcp == self.tcp_backend && udp == self.udp_backend,
                "moved: TCP {tcp} (was {}), UDP {udp} (was {})",
                self.tcp_backend,
                self.udp_backend
            );
            Ok(self)
        })
        .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log_text()))
    }
}

#[test]
fn the_netlink_hook_translates_replies_and_is_adopted_and_switched_on_restart() {
    let topology = Topology::new(2, XdpAttachMode::Generic).expect("topology");
    let _servers = topology.start_echo_servers(8080, false).unwrap();
    let services = ServicesFile::new(&topology);
    let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgtc")));

    let agent = start(&topology, &services, bpffs_dir, "netlink");
    let first_program = assert_netlink_only(&topology, &agent);
    new_flows_are_served(&topology, &agent);
    let inspect = agent.inspect_text().unwrap();
    assert!(
        inspect.contains(&format!("  {LB_IFACE:<24} netlink")),
        "{inspect}"
    );
    let json: serde_json::Value = serde_json::from_str(&agent.inspect().unwrap()).unwrap();
    assert_eq!(json["tc_hooks"][LB_IFACE], "netlink", "{json}");
    assert!(json["services"].is_array(), "{json}");
    let metrics = scrape(&topology);
    assert!(
        metrics.contains(&format!(
            "fulgur_tc_hook{{iface=\"{LB_IFACE}\",hook=\"netlink\"}} 1"
        )),
        "{metrics}"
    );
    let established = Established::open(&topology);

    // Killed: the filter is no fd the process held, so it stays and translates.
    let bpffs_dir = agent.kill_and_keep_pins();
    let (_, filters) = egress_hooks(&topology.lb, LB_IFACE);
    assert_eq!(filter_program_id(&filters), first_program);

    // The same hook again: the filter's program is replaced in place, no switch, no gap.
    let agent = start(&topology, &services, bpffs_dir, "netlink");
    let second_program = assert_netlink_only(&topology, &agent);
    assert_ne!(
        second_program, first_program,
        "the program was not replaced"
    );
    assert!(
        !agent.log_text().contains("TC hook changes"),
        "{}",
        agent.log_text()
    );
    let established = established.still_served(&topology, &agent);
    new_flows_are_served(&topology, &agent);

    // Auto keeps the hook in place rather than switching with a gap.
    let bpffs_dir = agent.kill_and_keep_pins();
    let agent = start(&topology, &services, bpffs_dir, "auto");
    assert_netlink_only(&topology, &agent);
    assert!(
        agent
            .log_text()
            .contains("keeping the netlink TC hook in place")
            && !agent.log_text().contains("TC hook changes"),
        "{}",
        agent.log_text()
    );
    let established = established.still_served(&topology, &agent);

    // To tcx: the filter is removed (the kernel would run both), the gap logged.
    let bpffs_dir = agent.kill_and_keep_pins();
    let agent = start(&topology, &services, bpffs_dir, "tcx");
    assert_tcx_only(&topology, &agent);
    let log = agent.log_text();
    assert!(
        log.contains("TC hook changes from netlink to tcx")
            && log.contains("gap_us=")
            && log.contains("TC hook switched to tcx"),
        "{log}"
    );
    assert!(scrape(&topology).contains(&format!(
        "fulgur_tc_hook{{iface=\"{LB_IFACE}\",hook=\"tcx\"}} 1"
    )));
    assert!(
        agent
            .inspect_text()
            .unwrap()
            .contains(&format!("  {LB_IFACE:<24} tcx"))
    );
    let established = established.still_served(&topology, &agent);
    new_flows_are_served(&topology, &agent);

    // And back: the tcx link is removed before the filter is added.
    let bpffs_dir = agent.kill_and_keep_pins();
    let agent = start(&topology, &services, bpffs_dir, "netlink");
    assert_netlink_only(&topology, &agent);
    assert!(
        agent
            .log_text()
            .contains("TC hook changes from tcx to netlink"),
        "{}",
        agent.log_text()
    );
    let _established = established.still_served(&topology, &agent);
    new_flows_are_served(&topology, &agent);

    // detach, run where the filter is, deletes it with the pins.
    let bpffs_dir = agent.kill_and_keep_pins();
    let detached = topology
        .lb
        .exec(
            fulgur_tests::agent_binary().to_str().unwrap(),
            &["detach", "--bpffs-dir", bpffs_dir.to_str().unwrap()],
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&detached.stderr).contains("removed the netlink TC filter"),
        "{detached:?}"
    );
    assert_eq!(egress_hooks(&topology.lb, LB_IFACE), (vec![], vec![]));
    assert!(!bpffs_dir.exists());
}

/// A foreign filter (classic BPF, as an older tool might add) in our slot (priority 1, handle 0xf17c) is not overwritten: the agent
/// refuses with the command that frees it.
#[test]
fn a_foreign_filter_in_our_slot_is_refused() {
    let ns = NetNs::new("fgtf").unwrap();
    ns.exec("tc", &["qdisc", "add", "dev", "lo", "clsact"])
        .unwrap();
    ns.exec(
        "tc",
        &[
            "filter",
            "add",
            "dev",
            "lo",
            "egress",
            "prio",
            "1",
            "handle",
            "0xf17c",
            "bpf",
            "bytecode",
            "1,6 0 0 4294967295,",
            "classid",
            "1:1",
        ],
    )
    .unwrap();
    let error = AgentProcess::start_launched(
        &ns,
        "lo",
        XdpAttachMode::Generic,
        Source::Args(&["--tc-attach", "netlink"]),
        PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgtf"))),
        &[
            "--max-services",
            "8",
            "--max-backends",
            "64",
            "--table-size",
            "251",
        ],
        &Launch::deployed(),
    )
    .err()
    .expect("the agent must not take over another filter");
    let error = format!("{error:#}");
    assert!(
        error.contains("holds another program (\"an unnamed bpf filter\")")
            && error.contains("tc filter del dev lo egress prio 1 handle 0xf17c"),
        "{error}"
    );
    let shown = ns
        .exec("tc", &["filter", "show", "dev", "lo", "egress"])
        .unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains("bytecode"));
}
