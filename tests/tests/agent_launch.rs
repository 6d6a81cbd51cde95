//! How the agent binary is started: under `ip netns exec` (a fresh /sys without bpffs), with a
//! --bpffs-dir off bpffs, without the right to mount one.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{UdpFlow, tcp_exchange},
    netns::{NetNs, in_netns, unique_token},
    topology::{AgentProcess, CLIENT, LB_IFACE, Launch, Source, Topology},
};

const SMALL: [&str; 6] = [
    "--max-services",
    "8",
    "--max-backends",
    "64",
    "--table-size",
    "251",
];

/// A services file in /tmp, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn services(topology: &Topology) -> Self {
        let path = std::env::temp_dir().join(format!("{}.yaml", unique_token("fulgur-services-")));
        let backends: Vec<String> = topology
            .backends
            .iter()
            .map(|b| format!("{{address: {}, port: 8080}}", b.addr))
            .collect();
        let mut yaml = String::from("services:\n");
        for protocol in ["TCP", "UDP"] {
            yaml += &format!(
                "- {{vip: 192.0.2.10, port: 80, protocol: {protocol}, backends: [{}]}}\n",
                backends.join(", ")
            );
        }
        std::fs::write(&path, yaml).unwrap();
        TempFile(path)
    }
}

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
    let services = TempFile::services(&topology);
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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
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
        std::thread::sleep(std::time::Duration::from_millis(100));
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
