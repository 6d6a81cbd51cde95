//! A client, a load-balancer node and N backends, each in its own namespace, linked by veths:
//!
//! ```text
//! client 198.51.100.2 ── cl0 ═ lb-cl 198.51.100.1 [XDP+TC] ── lb ── lb-bI 203.0.113.(4I+1)/30 ═ eth0 203.0.113.(4I+2) backend I
//! ```
//!
//! The service address 192.0.2.10 belongs to no host: the client routes it to the load balancer.
//! IPv6 runs beside it: client 2001:db8:1::2, load balancer 2001:db8:1::1, backend I
//! 2001:db8:2:I::2, service 2001:db8:ffff::10.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::{Xdp, links::FdLink};
use fulgur_agent::dataplane::{self, Dataplane, Pins, Sizes, XdpAttachMode};
use fulgur_common::program_names;

use crate::netns::{NetNs, in_netns, unique_token};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The load balancer's client-facing interface, where the agent attaches.
pub const LB_IFACE: &str = "lb-cl";

pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const LB_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);

pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, (4 * i + 2) as u8)
}

pub fn backend_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 2, i as u16, 0, 0, 0, 2)
}

pub struct BackendHost {
    pub name: String,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub ns: NetNs,
}

impl BackendHost {
    /// The backend's address in the family of `like`.
    pub fn addr_like(&self, like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            self.addr.into()
        } else {
            self.addr6.into()
        }
    }
}

/// A services file in /tmp: TCP and UDP on 192.0.2.10:80 to every backend of a topology on port
/// 8080. Removed on drop.
pub struct ServicesFile(pub PathBuf);

impl ServicesFile {
    pub fn new(topology: &Topology) -> Self {
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
        std::fs::write(&path, yaml).expect("writing the services file");
        ServicesFile(path)
    }
}

impl Drop for ServicesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct Topology {
    pub client: NetNs,
    pub lb: NetNs,
    pub backends: Vec<BackendHost>,
    pub mode: XdpAttachMode,
    /// Native XDP on veth delivers redirected frames only to peers running XDP.
    _peer_links: Vec<FdLink>,
}

impl Topology {
    pub fn new(backends: usize, mode: XdpAttachMode) -> anyhow::Result<Self> {
        assert!(backends <= 16, "one /30 per backend in 203.0.113.0/24");
        let lb = NetNs::new("fglb")?;
        let client = NetNs::new("fgcl")?;
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
        lb.ip(&[
            "addr",
            "add",
            &format!("{LB_CLIENT_SIDE}/24"),
            "dev",
            LB_IFACE,
        ])?;
        lb.ip(&["link", "set", "dev", LB_IFACE, "up"])?;
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "cl0"])?;
        client.ip(&["link", "set", "dev", "cl0", "up"])?;
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &LB_CLIENT_SIDE.to_string(),
        ])?;
        lb.ip(&[
            "addr",
            "add",
            &format!("{LB_CLIENT_SIDE6}/64"),
            "dev",
            LB_IFACE,
            "nodad",
        ])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT6}/64"),
            "dev",
            "cl0",
            "nodad",
        ])?;
        client.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &LB_CLIENT_SIDE6.to_string(),
        ])?;
        // Frames we rewrite in XDP must carry full checksums, as they do off a real wire.
        client.exec("ethtool", &["-K", "cl0", "tx", "off"])?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        let mut hosts = Vec::new();
        for i in 0..backends {
            let ns = NetNs::new("fgbe")?;
            let lb_side = format!("lb-b{i}");
            let gateway = Ipv4Addr::new(203, 0, 113, (4 * i + 1) as u8);
            lb.ip(&[
                "link",
                "add",
                "name",
                &lb_side,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            lb.ip(&["addr", "add", &format!("{gateway}/30"), "dev", &lb_side])?;
            lb.ip(&["link", "set", "dev", &lb_side, "up"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/30", backend_addr(i)),
                "dev",
                "eth0",
            ])?;
            ns.ip(&["link", "set", "dev", "eth0", "up"])?;
            ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
            let gateway6 = Ipv6Addr::new(0x2001, 0xdb8, 2, i as u16, 0, 0, 0, 1);
            lb.ip(&[
                "addr",
                "add",
                &format!("{gateway6}/64"),
                "dev",
                &lb_side,
                "nodad",
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", backend_addr6(i)),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway6.to_string(),
            ])?;
            hosts.push(BackendHost {
                name: format!("backend-{i}"),
                addr: backend_addr(i),
                addr6: backend_addr6(i),
                ns,
            });
        }

        let mut peer_links = Vec::new();
        if mode == XdpAttachMode::Native {
            peer_links.push(attach_pass(&client, "cl0")?);
            for host in &hosts {
                peer_links.push(attach_pass(&host.ns, "eth0")?);
            }
        }
        Ok(Topology {
            client,
            lb,
            backends: hosts,
            mode,
            _peer_links: peer_links,
        })
    }

    pub fn vip(&self, port: u16) -> SocketAddr {
        SocketAddr::from((VIP, port))
    }

    pub fn vip6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((VIP6, port))
    }

    /// TCP and UDP echo servers on every backend's IPv4 (and, with `ipv6`, IPv6) address.
    pub fn start_echo_servers(
        &self,
        port: u16,
        ipv6: bool,
    ) -> anyhow::Result<Vec<crate::echo::EchoServer>> {
        let mut servers = Vec::new();
        for b in &self.backends {
            servers.push(crate::echo::EchoServer::start(
                &b.ns,
                &b.name,
                SocketAddr::from((b.addr, port)),
            )?);
            if ipv6 {
                servers.push(crate::echo::EchoServer::start(
                    &b.ns,
                    &b.name,
                    SocketAddr::from((b.addr6, port)),
                )?);
            }
        }
        Ok(servers)
    }

    /// Starts the real agent binary on the load balancer's client-facing interface, programmed
    /// from a services file.
    pub fn start_agent(&self, services_file: &Path) -> anyhow::Result<AgentProcess> {
        AgentProcess::start(&self.lb, LB_IFACE, self.mode, Source::File(services_file))
    }

    /// As [`Topology::start_agent`], started the way `launch` says.
    pub fn start_agent_launched(
        &self,
        services_file: &Path,
        launch: &Launch,
    ) -> anyhow::Result<AgentProcess> {
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgag")));
        AgentProcess::start_launched(
            &self.lb,
            LB_IFACE,
            self.mode,
            Source::File(services_file),
            bpffs_dir,
            &SMALL_MAPS,
            launch,
        )
    }
}

/// Attaches the trivial pass program to `iface` inside `ns`; the link lives as long as the
/// returned handle.
pub fn attach_pass(ns: &NetNs, iface: &str) -> anyhow::Result<FdLink> {
    let iface = iface.to_owned();
    in_netns(ns, move || {
        let pins = Pins::new(format!("/sys/fs/bpf/{}", unique_token("fgps")));
        let sizes = Sizes {
            layout: fulgur_agent::writer::Layout {
                max_services: 1,
                max_backends: 1,
                table_size: 2,
            },
            conntrack_entries: 1,
        };
        let loaded = (|| {
            let mut dataplane = Dataplane::load(pins.clone(), &sizes)?;
            let program: &mut Xdp = dataplane
                .ebpf
                .program_mut(program_names::XDP_PASS)
                .context("pass program")?
                .try_into()?;
            let id = program.attach(&iface, aya::programs::XdpMode::Driver)?;
            let link: FdLink = program.take_link(id)?.try_into()?;
            anyhow::Ok(link)
        })();
        // The link holds the program; the maps and pins are not needed.
        let _ = dataplane::detach(&pins);
        loaded
    })
}

/// Map sizes for test agents: small, so that loading is quick.
const SMALL_MAPS: [&str; 6] = [
    "--max-services",
    "64",
    "--max-backends",
    "1024",
    "--table-size",
    "1021",
];

/// A running `fulgur-agent`, killed and detached on drop.
pub struct AgentProcess {
    child: Child,
    pub bpffs_dir: PathBuf,
    pub log: PathBuf,
    ns_path: String,
    /// Whether dropping this handle removes the pinned dataplane.
    owns_pins: bool,
}

/// Where an agent takes its services from.
pub enum Source<'a> {
    /// `--services FILE`
    File(&'a Path),
    /// `--grpc-listen ADDR` with mutual TLS from these files (or `--insecure` without), and
    /// `--metrics-listen` when given.
    Grpc {
        listen: SocketAddr,
        tls: Option<&'a crate::pki::PkiFiles>,
        metrics: Option<SocketAddr>,
    },
    /// These arguments as they are (after `--iface`, `--xdp-mode`, `--bpffs-dir` and sizes).
    Args(&'a [&'a str]),
}

/// How a test starts the agent process inside its namespace.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// `ip netns exec NAME` instead of `nsenter --net`: the agent gets its own mount namespace
    /// and a fresh /sys, without bpffs.
    pub ip_netns_exec: bool,
    /// Exactly these capabilities (pod-spec names: `BPF`, `NET_ADMIN`), as uid 0 with
    /// no_new_privs: what a container runtime gives a container with `drop: [ALL]`.
    pub capabilities: Option<Vec<String>>,
}

impl Launch {
    /// The agent as `manifests/deploy/agent.yaml` runs it: its capability set.
    pub fn deployed() -> Self {
        Launch {
            ip_netns_exec: false,
            capabilities: Some(deployed_capabilities().expect("manifests/deploy/agent.yaml")),
        }
    }

    fn command(&self, ns: &NetNs) -> std::process::Command {
        let mut command = if self.ip_netns_exec {
            let mut command = std::process::Command::new("ip");
            command.args(["netns", "exec", ns.name()]);
            command
        } else {
            let mut command = std::process::Command::new("nsenter");
            command.arg(format!("--net={}", ns.path()));
            command
        };
        if let Some(capabilities) = &self.capabilities {
            // setpriv execs the agent, so the child's pid stays the agent's.
            let mut bounding = String::from("-all");
            for capability in capabilities {
                bounding += &format!(",+{}", capability.to_lowercase());
            }
            command.args([
                "setpriv",
                "--no-new-privs",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                &format!("--bounding-set={bounding}"),
                "--",
            ]);
        }
        command.arg(crate::agent_binary());
        command
    }
}

/// The capabilities the agent container gets in `manifests/deploy/agent.yaml`, read from the
/// file so the tests and the manifest cannot drift apart. Also checks what makes them effective:
/// `drop: [ALL]` and uid 0 (capabilities in a pod are effective for uid 0 only).
pub fn deployed_capabilities() -> anyhow::Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/deploy/agent.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let daemonset: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
        .context("no container named agent")?;
    let context = &container["securityContext"];
    let run_as = context["runAsUser"]
        .as_u64()
        .or(pod["securityContext"]["runAsUser"].as_u64());
    anyhow::ensure!(
        run_as == Some(0),
        "the agent must run as uid 0 for its capabilities to be effective, not {run_as:?}"
    );
    let capabilities = &context["capabilities"];
    anyhow::ensure!(
        capabilities["drop"] == serde_yaml::Value::from(vec!["ALL"]),
        "capabilities.drop must be [ALL]"
    );
    capabilities["add"]
        .as_sequence()
        .context("capabilities.add")?
        .iter()
        .map(|c| c.as_str().map(str::to_owned).context("a capability name"))
        .collect()
}

impl AgentProcess {
    pub fn start(
        ns: &NetNs,
        iface: &str,
        mode: XdpAttachMode,
        source: Source<'_>,
    ) -> anyhow::Result<Self> {
        let token = unique_token("fgag");
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{token}"));
        Self::start_with(ns, iface, mode, source, bpffs_dir)
    }

    /// Starts an agent on an existing bpffs folder (to test restarts).
    pub fn start_with(
        ns: &NetNs,
        iface: &str,
        mode: XdpAttachMode,
        source: Source<'_>,
        bpffs_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start_sized(ns, iface, mode, source, bpffs_dir, &SMALL_MAPS)
    }

    /// Starts an agent with these map-size flags.
    pub fn start_sized(
        ns: &NetNs,
        iface: &str,
        mode: XdpAttachMode,
        source: Source<'_>,
        bpffs_dir: PathBuf,
        size_flags: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_launched(
            ns,
            iface,
            mode,
            source,
            bpffs_dir,
            size_flags,
            &Launch::default(),
        )
    }

    /// Starts an agent the way `launch` says (another namespace tool, fewer capabilities).
    pub fn start_launched(
        ns: &NetNs,
        iface: &str,
        mode: XdpAttachMode,
        source: Source<'_>,
        bpffs_dir: PathBuf,
        size_flags: &[&str],
        launch: &Launch,
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", unique_token("fulgur-agent-")));
        let mut command = launch.command(ns);
        command
            .args(["--iface", iface, "--xdp-mode", mode.name(), "--bpffs-dir"])
            .arg(&bpffs_dir)
            .args(size_flags);
        match source {
            Source::File(path) => {
                command.arg("--services").arg(path);
            }
            Source::Grpc {
                listen,
                tls,
                metrics,
            } => {
                command.arg("--grpc-listen").arg(listen.to_string());
                match tls {
                    Some(files) => {
                        command
                            .arg("--tls-cert")
                            .arg(&files.server_cert)
                            .arg("--tls-key")
                            .arg(&files.server_key)
                            .arg("--client-ca")
                            .arg(&files.ca);
                    }
                    None => {
                        command.arg("--insecure");
                    }
                }
                if let Some(metrics) = metrics {
                    command.arg("--metrics-listen").arg(metrics.to_string());
                }
            }
            Source::Args(args) => {
                command.args(args);
            }
        }
        let child = command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", crate::agent_binary().display()))?;
        let agent = AgentProcess {
            child,
            bpffs_dir,
            log,
            ns_path: ns.path(),
            owns_pins: true,
        };
        let mut agent = agent;
        let deadline = Instant::now() + Duration::from_secs(20);
        // The agent's "ready" line (it carries bpffs_dir), not "readiness on /ready", which is
        // logged before the gRPC listener is bound.
        let is_ready = |log: &str| {
            log.lines()
                .any(|line| line.contains(" ready") && line.contains("bpffs_dir"))
        };
        while !is_ready(&agent.log_text()) {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited ({status}) before it was ready; log:\n{}",
                    agent.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent was not ready in 20 s; log:\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    /// The agent's resident memory, in MiB (nsenter execs the agent, so the child is the agent).
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("VmRSS")?
            .parse()?;
        Ok(kib / 1024.0)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent's log contains `needle` at least `count` times... once.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    pub fn wait_for_log_count(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if text.matches(needle).count() >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent did not log {needle:?} in {timeout:?}; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process the hard way (SIGKILL); the pinned dataplane stays.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILLs the agent and hands its pins over, for a successor started with `start_with`.
    pub fn kill_and_keep_pins(mut self) -> PathBuf {
        self.kill();
        self.owns_pins = false;
        self.bpffs_dir.clone()
    }

    /// `fulgur-agent inspect --json` against this agent's pins.
    pub fn inspect(&self) -> anyhow::Result<String> {
        self.run_inspect(&["--json"])
    }

    /// `fulgur-agent inspect --flows 0`, as a person would read it.
    pub fn inspect_text(&self) -> anyhow::Result<String> {
        self.run_inspect(&["--flows", "0"])
    }

    fn run_inspect(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path))
            .arg(crate::agent_binary())
            .arg("inspect")
            .args(args)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .output()?;
        if !out.status.success() {
            bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        if self.owns_pins {
            let _ = std::process::Command::new(crate::agent_binary())
                .args(["detach", "--bpffs-dir"])
                .arg(&self.bpffs_dir)
                .output();
        }
        let _ = fs::remove_file(&self.log);
    }
}
