//! How the agent binary is started: under `ip netns exec` (a fresh /sys without bpffs), with a
//! --bpffs-dir off bpffs, without the right to mount one; on a bare IPv6 listen address; with
//! another --xdp-mode than the pinned attachment's; over a counters pin an older agent left.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{UdpFlow, tcp_exchange},
    netns::{NetNs, in_netns, unique_token},
    topology::{
        AgentProcess, CLIENT, LB_CLIENT_SIDE6, LB_IFACE, Launch, ServicesFile, Source, Topology,
    },
};

const SMALL: [&str; 6] = [
    "--max-services",
    "8",
    "--max-backends",
    "64",
    "--table-size",
    "251",
];

/// A temporary path, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start(
    ns: &NetNs,
    iface: &str,
    bpffs_dir: PathBuf,
    args: &[&str],
    launch: &Launch,
) -> anyhow::Result<AgentProcess> {
    AgentProcess::start_launched(
        ns,
        iface,
        XdpAttachMode::Generic,
        Source::Args(args),
        bpffs_dir,
        &SMALL,
        launch,
    )
}

fn fresh_bpffs_dir() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgag")))
}

/// `ip netns exec` remounts /sys, hiding the host's bpffs: the agent mounts its own and serves.
#[test]
fn the_agent_runs_under_ip_netns_exec() {
    let topology = Topology::new(2, XdpAttachMode::Generic).expect("topology");
    let _servers = topology.start_echo_servers(8080, false).unwrap();
    let services = ServicesFile::new(&topology);
    let services_path = services.0.to_str().unwrap();
    let launch = Launch {
        ip_netns_exec: true,
        ..Launch::default()
    };
    let bpffs_dir = fresh_bpffs_dir();
    let mut agent = start(
        &topology.lb,
        LB_IFACE,
        bpffs_dir.clone(),
        &["--services", services_path],
        &launch,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        agent.log_text().contains("mounted bpffs at /sys/fs/bpf"),
        "{}",
        agent.log_text()
    );
    // Not the host's bpffs: its own, which nothing else sees.
    assert!(!bpffs_dir.exists(), "pins leaked to the host's bpffs");

    let vip = topology.vip(80);
    let served = in_netns(&topology.client, move || {
        let mut names = Vec::new();
        for i in 0..20 {
            names.push(tcp_exchange(vip, format!("hello {i}").as_bytes())?);
        }
        for port in 0..10 {
            let flow = UdpFlow::new(SocketAddr::from((CLIENT, 32000 + port)), vip)?;
            names.push(flow.exchange(b"datagram")?);
        }
        Ok(names)
    })
    .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log_text()));
    assert!(
        served.iter().any(|n| n == "backend-0") && served.iter().any(|n| n == "backend-1"),
        "{served:?}"
    );

    // Readers started the same way cannot see those pins, and say so.
    let inspect = std::process::Command::new("ip")
        .args(["netns", "exec", topology.lb.name()])
        .arg(fulgur_tests::agent_binary())
        .args(["inspect", "--bpffs-dir"])
        .arg(&bpffs_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&inspect.stderr);
    assert!(!inspect.status.success());
    assert!(
        stderr.contains("is this 'ip netns exec'?") && stderr.contains("nsenter --net"),
        "{stderr}"
    );

    // That bpffs dies with the agent's mount namespace, and the dataplane with it (the log
    // warned): nothing stays attached behind the test's back.
    agent.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let link = topology
            .lb
            .ip(&["-d", "link", "show", "dev", LB_IFACE])
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        if !link.contains("xdp") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still attached: {link}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A --bpffs-dir on another file system is refused before anything is created there.
#[test]
fn a_bpffs_dir_off_bpffs_is_refused_with_advice() {
    let ns = NetNs::new("fgbf").unwrap();
    let dir = TempFile(std::env::temp_dir().join(unique_token("fulgur-not-bpffs-")));
    std::fs::create_dir(&dir.0).unwrap();
    let error = start(&ns, "lo", dir.0.clone(), &[], &Launch::default())
        .err()
        .expect("the agent must refuse a folder that is not on bpffs");
    let error = format!("{error:#}");
    assert!(
        error.contains(&format!("{} is on ", dir.0.display()))
            && error.contains("not on a bpffs mount")
            && error.contains("mount -t bpf bpf"),
        "{error}"
    );
    assert!(
        !Path::new(&dir.0).join("maps").exists(),
        "the agent created folders off bpffs"
    );
}

/// Under `ip netns exec` without CAP_SYS_ADMIN the agent cannot mount bpffs: it says why and
/// what to do instead of a bare "No such file or directory".
#[test]
fn ip_netns_exec_without_mount_rights_says_what_to_do() {
    let ns = NetNs::new("fgbf").unwrap();
    let launch = Launch {
        ip_netns_exec: true,
        capabilities: Some(vec!["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()]),
    };
    let error = start(&ns, "lo", fresh_bpffs_dir(), &[], &launch)
        .err()
        .expect("the agent cannot mount bpffs without CAP_SYS_ADMIN");
    let error = format!("{error:#}");
    assert!(
        error.contains("/sys/fs/bpf is not a bpffs mount (is this 'ip netns exec'?)")
            && error.contains("mount -t bpf bpf /sys/fs/bpf")
            && error.contains("nsenter --net"),
        "{error}"
    );
}

/// `--grpc-listen=$(POD_IP):50051` with an IPv6 pod IP: a bare IPv6 address, then the port.
#[test]
fn listens_on_a_bare_ipv6_address_and_port() {
    let topology = Topology::new(1, XdpAttachMode::Generic).expect("topology");
    let grpc = format!("{LB_CLIENT_SIDE6}:50051");
    let metrics = format!("{LB_CLIENT_SIDE6}:9464");
    let args = [
        "--grpc-listen",
        &grpc,
        "--insecure",
        "--metrics-listen",
        &metrics,
    ];
    let agent = start(
        &topology.lb,
        LB_IFACE,
        fresh_bpffs_dir(),
        &args,
        &Launch::default(),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // From the client's namespace, over the wire, to the address in brackets.
    let grpc_url = format!("http://[{LB_CLIENT_SIDE6}]:50051");
    let metrics_addr = SocketAddr::from((LB_CLIENT_SIDE6, 9464));
    let (status, healthz) = in_netns(&topology.client, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let status = runtime.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(grpc_url)?
                .connect()
                .await?;
            let request = tonic_health::pb::HealthCheckRequest {
                service: "fulgur.dataplane.v1.Dataplane".into(),
            };
            let status = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(request)
                .await?
                .into_inner()
                .status;
            anyhow::Ok(status)
        })?;
        let mut stream = TcpStream::connect_timeout(&metrics_addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            stream,
            "GET /healthz HTTP/1.1\r\nHost: fulgur\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok((status, response))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log_text()));
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
}

/// The XDP mode the kernel shows for the load balancer's interface: `xdp` (native) or
/// `xdpgeneric`, from `ip -d link`.
fn shown_xdp_mode(topology: &Topology) -> Option<&'static str> {
    let out = topology
        .lb
        .ip(&["-d", "link", "show", "dev", LB_IFACE])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.contains(&"xdpgeneric") {
        Some("generic")
    } else if words.contains(&"xdp") {
        Some("native")
    } else {
        None
    }
}

fn traffic_flows(topology: &Topology, agent: &AgentProcess) {
    let vip = topology.vip(80);
    let served = in_netns(&topology.client, move || {
        let mut names = Vec::new();
        for i in 0..10 {
            names.push(tcp_exchange(vip, format!("hello {i}").as_bytes())?);
        }
        for port in 0..5 {
            let flow = UdpFlow::new(SocketAddr::from((CLIENT, 33000 + port)), vip)?;
            names.push(flow.exchange(b"datagram")?);
        }
        Ok(names)
    })
    .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log_text()));
    assert_eq!(served.len(), 15);
}

/// A restart with another --xdp-mode replaces the pinned attachment instead of keeping the old
/// mode, both ways, and forwarding goes on.
#[test]
fn a_restart_with_another_xdp_mode_switches_the_attachment() {
    // Native topology: the peers carry XDP programs, so native redirects are delivered.
    let topology = Topology::new(2, XdpAttachMode::Native).expect("topology");
    let _servers = topology.start_echo_servers(8080, false).unwrap();
    let services = ServicesFile::new(&topology);
    let launch = Launch::deployed();
    let start_in = |mode: XdpAttachMode, bpffs_dir: PathBuf| {
        AgentProcess::start_launched(
            &topology.lb,
            LB_IFACE,
            mode,
            Source::File(&services.0),
            bpffs_dir,
            &SMALL,
            &launch,
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    };
    let agent = start_in(XdpAttachMode::Native, fresh_bpffs_dir());
    assert_eq!(shown_xdp_mode(&topology), Some("native"));
    traffic_flows(&topology, &agent);

    let bpffs_dir = agent.kill_and_keep_pins();
    let agent = start_in(XdpAttachMode::Generic, bpffs_dir);
    assert_eq!(
        shown_xdp_mode(&topology),
        Some("generic"),
        "{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("XDP mode changes from native to generic"),
        "{}",
        agent.log_text()
    );
    traffic_flows(&topology, &agent);

    let bpffs_dir = agent.kill_and_keep_pins();
    let agent = start_in(XdpAttachMode::Native, bpffs_dir);
    assert_eq!(
        shown_xdp_mode(&topology),
        Some("native"),
        "{}",
        agent.log_text()
    );
    traffic_flows(&topology, &agent);

    // The same mode again is the usual seamless in-place replacement: no switch.
    let bpffs_dir = agent.kill_and_keep_pins();
    let agent = start_in(XdpAttachMode::Native, bpffs_dir);
    assert!(
        !agent.log_text().contains("XDP mode changes"),
        "{}",
        agent.log_text()
    );
    assert_eq!(shown_xdp_mode(&topology), Some("native"));
}

/// A mode the interface cannot take (native XDP on loopback) fails the restart loudly and puts
/// the old attachment back, rather than leaving the interface without a dataplane.
#[test]
fn a_mode_switch_that_fails_keeps_the_old_attachment() {
    let ns = NetNs::new("fgmd").unwrap();
    let shown = || {
        let out = ns.ip(&["-d", "link", "show", "dev", "lo"]).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(|w| w == "xdpgeneric")
    };
    let agent = AgentProcess::start_launched(
        &ns,
        "lo",
        XdpAttachMode::Generic,
        Source::Args(&[]),
        fresh_bpffs_dir(),
        &SMALL,
        &Launch::default(),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(shown());
    let bpffs_dir = agent.kill_and_keep_pins();
    // Not through AgentProcess: its handle would detach the pins when the start fails.
    // `timeout`: an agent that wrongly succeeds would serve forever.
    let failed = std::process::Command::new("timeout")
        .args(["20", "nsenter", &format!("--net={}", ns.path())])
        .arg(fulgur_tests::agent_binary())
        .args(["--iface", "lo", "--xdp-mode", "native", "--bpffs-dir"])
        .arg(&bpffs_dir)
        .args(SMALL)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success(),
        "loopback has no native XDP:\n{log}"
    );
    assert!(
        log.contains("XDP mode changes from generic to native")
            && log.contains("; put back the generic attachment"),
        "{log}"
    );
    assert!(shown(), "the generic attachment was not put back:\n{log}");
    // The pins still name it: the next agent in generic mode adopts it in place.
    let agent = AgentProcess::start_launched(
        &ns,
        "lo",
        XdpAttachMode::Generic,
        Source::Args(&[]),
        bpffs_dir,
        &SMALL,
        &Launch::default(),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!agent.log_text().contains("XDP mode changes"));
    assert!(shown());
}

/// Pins a per-CPU array of `entries` u64 counters at `path`, as an agent with a shorter
/// `Counter` list left it.
fn pin_counters_map(path: &Path, entries: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, entries]);
    // SAFETY: a zeroed bpf_attr with the map-create fields set, and its true size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, create.as_ptr(), 128) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u64; 16];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: bpf_attr's obj-pin fields (pathname, bpf_fd), the path outliving the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), 128) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// An agent upgrade over pins whose counters map predates new `Counter` reasons replaces that
/// map, so the new reasons are counted, and forwarding state is kept as it is.
#[test]
fn an_outgrown_counters_pin_is_replaced_on_start() {
    let topology = Topology::new(2, XdpAttachMode::Native).expect("topology");
    let _servers = topology.start_echo_servers(8080, false).unwrap();
    let services = ServicesFile::new(&topology);
    let bpffs_dir = fresh_bpffs_dir();
    let pins = fulgur_agent::dataplane::Pins::new(&bpffs_dir);
    std::fs::create_dir_all(pins.maps()).unwrap();
    let counters = pins.map(fulgur_common::map_names::COUNTERS);
    let older_list = fulgur_common::Counter::COUNT - 2;
    pin_counters_map(&counters, older_list);

    let agent = AgentProcess::start_launched(
        &topology.lb,
        LB_IFACE,
        XdpAttachMode::Native,
        Source::File(&services.0),
        bpffs_dir,
        &SMALL,
        &Launch::deployed(),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let info = aya::maps::MapInfo::from_pin(&counters).unwrap();
    assert_eq!(
        info.max_entries(),
        fulgur_common::Counter::COUNT,
        "{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("predates"),
        "{}",
        agent.log_text()
    );
    traffic_flows(&topology, &agent);
}

/// SNAT flags that cannot work are refused at start, saying why: a port range inside the
/// namespace's ephemeral ports (the node's own connections would collide), an empty range, two
/// addresses of one family.
#[test]
fn snat_flags_that_cannot_work_are_refused() {
    let ns = NetNs::new("fgsn").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--snat-ports", "60000-61000"],
            "--snat-ports 60000-61000 overlaps this node's ephemeral ports 32768-60999",
        ),
        (
            &["--snat-ports", "62000-61000"],
            "is empty: 62000 is above 61000",
        ),
        (
            &["--snat-address", "192.0.2.1", "--snat-address", "192.0.2.2"],
            "--snat-address is given twice for IPv4",
        ),
    ];
    for (args, expected) in cases {
        let error = start(&ns, "lo", fresh_bpffs_dir(), args, &Launch::default())
            .err()
            .unwrap_or_else(|| panic!("{args:?} must be refused"));
        let error = format!("{error:#}");
        assert!(error.contains(expected), "{args:?}: {error}");
    }
}
