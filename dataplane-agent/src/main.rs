//! `fulgur-agent`: runs the dataplane on this node, or inspects and detaches it.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use fulgur_agent::{
    announce::{self, Announcer},
    bpf_log::{self, BpfLog},
    config::{ServiceSet, ValidServiceSet},
    dataplane::{self, Dataplane, Pins, Sizes, XdpAttachMode},
    grpc::{DataplaneService, Programmer},
    inspect, maglev,
    metrics::Metrics,
    paths::{self, Forwarding, PathMaps},
    snat::{
        self, NodeAddresses, PortRange, RemoteNextHops, SnatMaps, SnatMode, SnatSettings, Timeouts,
    },
    tc_hook::TcAttach,
    writer::{ApplyReport, Layout, MapWriter, WriteError},
};
use fulgur_common::defaults;
use fulgur_proto::v1::dataplane_server::DataplaneServer;
use tonic::transport::{Certificate, Identity, ServerTlsConfig, server::TcpIncoming};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "fulgur node agent: eBPF L4 load balancing for the Gateway API"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print services, backends, counters and flows from the pinned maps (works while the
    /// agent is down).
    Inspect {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Conntrack entries to list.
        #[arg(long, default_value_t = 20)]
        flows: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs from every interface and remove the pinned state.
    Detach {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/fulgur";
/// The largest desired state accepted (10,000 services × 16 backends is about 4 MiB).
const MAX_STATE_BYTES: usize = 256 << 20;

#[derive(Args)]
struct RunArgs {
    /// Client-facing interface to attach to (repeat for several).
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// bpffs folder for pinned maps, programs and links.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// `native` (driver) or `generic` (skb). On veths whose peer runs no XDP program (kind's
    /// eth0) native XDP drops what it sends back out (ARP answers, SNATed flows): use generic.
    #[arg(long, value_enum, default_value = "native", env = "FULGUR_XDP_MODE")]
    xdp_mode: XdpAttachMode,
    /// How the TC egress program (reply translation) is attached: tcx needs Linux 6.6; netlink
    /// (clsact and a cls_bpf filter) works on older kernels; auto takes tcx where it works and
    /// keeps the hook a previous agent left.
    #[arg(long, value_enum, default_value = "auto", env = "FULGUR_TC_ATTACH")]
    tc_attach: TcAttach,
    /// Where translated packets go: `fast` (XDP redirect/TX), `kernel` (XDP_PASS after DNAT: the
    /// kernel routes them and netfilter sees both directions), or `auto`, per egress device.
    #[arg(long, value_enum, default_value = "auto")]
    forwarding: Forwarding,
    /// Kernel-side diagnostics, logged as target fulgur::bpf: `warn` logs failed redirects and
    /// a full conntrack, `debug` also rejections and malformed packets (rate limited). `off`
    /// costs nothing: the verifier removes the log calls. A change reloads the programs.
    #[arg(long, value_enum, default_value = "off", env = "FULGUR_BPF_LOG")]
    bpf_log: BpfLog,
    /// YAML/JSON file with the services to program; re-read when it changes. For debugging and
    /// for running without a controller; not together with --grpc-listen.
    #[arg(long, conflicts_with = "grpc_listen")]
    services: Option<PathBuf>,
    /// Serve fulgur.dataplane.v1 (plus grpc.health.v1 and reflection) for the controller.
    /// ADDR:PORT; IPv6 as [ADDR]:PORT or ADDR:PORT (the last field is the port).
    #[arg(long, value_parser = parse_listen)]
    grpc_listen: Option<SocketAddr>,
    /// Plaintext gRPC. Without it, mutual TLS is required.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "client_ca"])]
    insecure: bool,
    /// PEM server certificate (chain) for gRPC.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA that client (controller) certificates must chain to.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on /metrics, readiness on /ready and liveness on /healthz.
    /// Same address forms as --grpc-listen.
    #[arg(long, value_parser = parse_listen)]
    metrics_listen: Option<SocketAddr>,
    /// Capacity of the services map.
    #[arg(long, default_value_t = defaults::MAX_SERVICES)]
    max_services: u32,
    /// Capacity of the backends map (all services together).
    #[arg(long, default_value_t = defaults::MAX_BACKENDS)]
    max_backends: u32,
    /// Slots in each service's Maglev table; a prime.
    #[arg(long, default_value_t = Sizes::default().layout.table_size)]
    table_size: u32,
    /// Flows tracked (LRU); replies need their flow tracked.
    #[arg(long, default_value_t = defaults::CONNTRACK_ENTRIES)]
    conntrack_size: u32,
    /// SNAT of new flows: `remote` (to backends on other nodes; local backends keep the
    /// client's address), `always` (every flow: the client address is lost), `never` (backends
    /// on other nodes are refused, and the "remote-backends" feature is not listed).
    #[arg(long, value_enum, default_value = "remote")]
    snat: SnatMode,
    /// Source ports of SNATed flows, MIN-MAX; must not overlap the node's ephemeral range
    /// (/proc/sys/net/ipv4/ip_local_port_range).
    #[arg(long, default_value_t = PortRange::default())]
    snat_ports: PortRange,
    /// The address SNATed flows leave from (repeat: at most one IPv4 and one IPv6); default:
    /// the first global IPv4 and IPv6 address of the first --iface.
    #[arg(long = "snat-address")]
    snat_addresses: Vec<std::net::IpAddr>,
    /// Idle SNAT flows are removed after this many seconds: TCP.
    #[arg(long, default_value_t = Timeouts::default().tcp.as_secs())]
    snat_tcp_timeout: u64,
    /// ... TCP after a FIN or RST.
    #[arg(long, default_value_t = Timeouts::default().tcp_closing.as_secs())]
    snat_tcp_closing_timeout: u64,
    /// ... UDP.
    #[arg(long, default_value_t = Timeouts::default().udp.as_secs())]
    snat_udp_timeout: u64,
}

/// The SNAT settings from the flags, checked against this node.
fn snat_settings(args: &RunArgs) -> anyhow::Result<SnatSettings> {
    let mut addresses =
        NodeAddresses::from_flags(&args.snat_addresses).map_err(anyhow::Error::msg)?;
    if args.snat != SnatMode::Never {
        match snat::ephemeral_ports() {
            Ok(ephemeral) => args
                .snat_ports
                .check_against(ephemeral)
                .map_err(anyhow::Error::msg)?,
            Err(e) => warn!("cannot read the ephemeral port range ({e}): --snat-ports not checked"),
        }
        if args.snat_addresses.is_empty() {
            addresses = NodeAddresses::of_interface(&args.ifaces[0])
                .with_context(|| format!("reading the addresses of {}", args.ifaces[0]))?;
        }
        if addresses.is_empty() {
            warn!(
                iface = args.ifaces[0],
                "no SNAT address (none given, none global on the first --iface): new flows to \
                 backends on other nodes are rejected (counter snat_no_address)"
            );
        }
    }
    Ok(SnatSettings {
        mode: args.snat,
        ports: args.snat_ports,
        addresses,
    })
}

/// A listen address: `ADDR:PORT`, `[V6]:PORT`, or a bare IPv6 address and `:PORT`, which is what
/// `$(POD_IP):50051` gives in a pod whose IP is IPv6. A listen address always has a port, so the
/// last field is the port even where the whole text would also read as an IPv6 address.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some((ip, port)) = text.rsplit_once(':')
        && let (Ok(ip), Ok(port)) = (ip.parse::<std::net::Ipv6Addr>(), port.parse::<u16>())
    {
        return Ok(SocketAddr::from((ip, port)));
    }
    Err(format!(
        "{text:?} is not ADDR:PORT (IPv6: [ADDR]:PORT or ADDR:PORT, e.g. [2001:db8::5]:50051)"
    ))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Inspect {
            bpffs_dir,
            flows,
            json,
        }) => {
            let pins = Pins::new(bpffs_dir);
            pins.check()?;
            let report = inspect::NodeReport::read(&pins, flows)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Some(Command::Detach { bpffs_dir }) => {
            let pins = Pins::new(&bpffs_dir);
            pins.check()?;
            let removed = dataplane::detach(&pins)?;
            println!(
                "detached: removed {} pins under {}",
                removed.len(),
                bpffs_dir.display()
            );
            Ok(())
        }
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.ifaces.is_empty() {
        bail!("at least one --iface is required");
    }
    if !maglev::is_prime(args.table_size) {
        bail!(
            "--table-size {} is not a prime (try 1021, 4099, 16381 or 65537)",
            args.table_size
        );
    }
    let sizes = Sizes {
        layout: Layout {
            max_services: args.max_services,
            max_backends: args.max_backends,
            table_size: args.table_size,
        },
        conntrack_entries: args.conntrack_size,
    };
    if sizes.layout.lookup_entries() > u32::MAX as u64 / 8 {
        bail!("--max-services × --table-size × 2 is too large for one lookup map");
    }
    // Check the input and the TLS material before touching the kernel.
    let snat_settings = snat_settings(&args)?;
    let remote_backends = args.snat.remote_backends();
    let initial = args
        .services
        .as_deref()
        .map(|path| ServiceSet::from_file(path, remote_backends))
        .transpose()?;
    let tls = match (&args.grpc_listen, args.insecure) {
        (Some(_), true) => None,
        (Some(_), false) => Some(tls_config(&args)?),
        (None, _) => None,
    };
    if args.grpc_listen.is_none() && initial.is_none() {
        warn!("neither --grpc-listen nor --services: the pinned services stay as they are");
    }

    // The path decision comes before the kernel is touched: a forced `fast` the node cannot
    // honour stops here.
    let node = paths::scan().context("scanning the node's devices (netlink)")?;
    let decisions = paths::decide(&node, args.xdp_mode, args.forwarding);
    if args.forwarding == Forwarding::Fast
        && let Some(reason) = paths::fast_refusal(&node, &decisions)
    {
        bail!(reason);
    }

    let pins = Pins::new(&args.bpffs_dir);
    let mut dataplane = Dataplane::load_with_log(pins.clone(), &sizes, args.bpf_log)?;
    let mut writer = MapWriter::adopt(sizes.layout, |name| dataplane.take_map(name))
        .context("adopting the pinned maps")?;
    let mut path_maps = PathMaps::adopt(|name| dataplane.take_map(name))?;
    let snat_maps = SnatMaps::adopt(|name| dataplane.take_map(name), snat_settings)?;
    info!(
        mode = args.snat.name(),
        ports = %args.snat_ports,
        ipv4 = ?snat_settings.addresses.ipv4,
        ipv6 = ?snat_settings.addresses.ipv6,
        "SNAT"
    );
    let timeouts = Timeouts {
        tcp: Duration::from_secs(args.snat_tcp_timeout),
        tcp_closing: Duration::from_secs(args.snat_tcp_closing_timeout),
        udp: Duration::from_secs(args.snat_udp_timeout),
    };
    log_paths(&path_maps.sync(&decisions)?, &node);
    // Announced addresses are not kept across a restart (services are): the last agent's
    // lease is unknown, and the address may have moved meanwhile. The controller's Apply on
    // reconnect announces them again.
    if !writer.announced().is_empty() {
        let dropped: Vec<String> = writer.announced().iter().map(ToString::to_string).collect();
        info!(
            addresses = dropped.join(", "),
            "not announcing the pinned addresses of the last run until told again"
        );
        writer.set_announced(&BTreeSet::new())?;
    }
    // The services file announces with no lease; the controller's Apply sets its own.
    writer.renew_announce_lease(None)?;
    // A restarted agent keeps what is pinned until it is told otherwise.
    let next_hops = RemoteNextHops::default();
    if let Some(set) = &initial {
        let report = writer.apply(set)?;
        next_hops.update(set);
        info!(?report, services = set.services.len(), "services applied");
    }
    let metrics = Metrics::new();
    let bpf_reader = bpf_log::reader(&mut dataplane.ebpf, args.bpf_log, metrics.clone())
        .context("opening the eBPF log ring")?;
    let mut interfaces = Vec::new();
    for iface in &args.ifaces {
        let tc_hook = dataplane
            .attach(iface, args.xdp_mode, args.tc_attach)
            .with_context(|| format!("attaching to {iface}"))?;
        let interface = announce::Interface {
            name: iface.clone(),
            ifindex: dataplane::if_index(iface)?,
            mac: announce::hardware_address(iface)
                .with_context(|| format!("reading the MAC of {iface}"))?,
        };
        writer.register_announce_device(interface.ifindex, interface.mac)?;
        interfaces.push(interface);
        metrics.attached(iface, args.xdp_mode.name());
        metrics.tc_hook(iface, tc_hook.name());
        info!(iface, mode = ?args.xdp_mode, tc_hook = tc_hook.name(), "attached");
    }
    let announcer = Announcer::new(interfaces);
    announcer.update(writer.announced());
    if let Some(set) = &initial {
        metrics.announced(&set.announce, "announcing");
    }
    metrics.set_ready();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        tokio::spawn(rescan_paths(path_maps, args.xdp_mode, args.forwarding));
        tokio::spawn(snat_clock(
            snat_maps,
            timeouts,
            metrics.clone(),
            next_hops.clone(),
        ));
        if let Some(reader) = bpf_reader {
            tokio::spawn(async move {
                if let Err(e) = bpf_log::run(reader).await {
                    error!("reading the eBPF log ring: {e}");
                }
            });
            info!(level = ?args.bpf_log, "eBPF log on");
        }
        if let Some(listen) = args.metrics_listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding --metrics-listen {listen}"))?;
            tokio::spawn(serve_metrics(listener, metrics.clone(), pins.clone()));
            info!(%listen, "metrics on /metrics, readiness on /ready");
        }
        match (args.grpc_listen, initial) {
            (Some(listen), _) => {
                let programmer = MapProgrammer {
                    writer,
                    announcer,
                    pins: pins.clone(),
                    next_hops: next_hops.clone(),
                };
                // Bound before "ready" is logged, so a client that waits for it is never refused.
                let incoming = TcpIncoming::bind(listen)
                    .with_context(|| format!("binding --grpc-listen {listen}"))?
                    .with_nodelay(Some(true));
                info!(%listen, tls = tls.is_some(), bpffs_dir = %args.bpffs_dir.display(), "ready");
                serve_grpc(
                    incoming,
                    listen,
                    tls,
                    programmer,
                    metrics,
                    remote_backends,
                    shutdown(),
                )
                .await?;
            }
            (None, initial) => {
                info!(bpffs_dir = %args.bpffs_dir.display(), "ready");
                let programmer = MapProgrammer {
                    writer,
                    announcer,
                    pins: pins.clone(),
                    next_hops: next_hops.clone(),
                };
                watch_services_file(
                    args.services,
                    initial.unwrap_or_default(),
                    programmer,
                    metrics,
                    remote_backends,
                )
                .await?;
            }
        }
        anyhow::Ok(())
    })?;
    // The programs stay attached through their pinned links; `detach` removes them.
    info!("exiting; the dataplane stays attached (use `fulgur-agent detach` to remove it)");
    Ok(())
}

fn log_paths(changed: &[paths::Decision], node: &paths::NodeScan) {
    if !node.netfilter_tables.is_empty() && changed.iter().any(|d| !d.fast) {
        info!(
            tables = node.netfilter_tables.join(", "),
            "netfilter on this node: translated packets take the kernel path"
        );
    }
    for d in changed {
        let path = if d.fast { "fast" } else { "kernel" };
        info!(
            iface = d.name,
            path,
            reason = d.reason.describe(),
            "forwarding path"
        );
    }
}

/// Devices come and go (a veth per pod): decisions follow within a second. Cached next hops
/// are resolved again every second too, so a neighbour's new MAC is seen within one.
async fn rescan_paths(mut maps: PathMaps, mode: dataplane::XdpAttachMode, forwarding: Forwarding) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Err(e) = maps.refresh_next_hops() {
            error!("moving the next-hop epoch on: {e}");
        }
        let node = match paths::scan() {
            Ok(node) => node,
            Err(e) => {
                warn!("scanning the node's devices: {e}");
                continue;
            }
        };
        let decisions = paths::decide(&node, mode, forwarding);
        match maps.sync(&decisions) {
            Ok(changed) => {
                if forwarding == Forwarding::Fast && changed.iter().any(|d| !d.fast) {
                    warn!(
                        "--forwarding fast: a new device cannot take it; it gets the kernel path"
                    );
                }
                log_paths(&changed, &node);
            }
            Err(e) => error!("writing the forwarding paths: {e}"),
        }
    }
}

/// How often idle SNAT flows are looked for.
const SNAT_COLLECT_EVERY: u32 = 10;
/// How often remote backends' next hops are refreshed in the kernel's neighbour table.
const NEXT_HOP_REFRESH_EVERY: u32 = 5;

/// The clock SNAT entries are stamped with moves on every second; idle flows are collected
/// every [`SNAT_COLLECT_EVERY`] seconds, remote next hops refreshed every
/// [`NEXT_HOP_REFRESH_EVERY`].
async fn snat_clock(
    mut maps: SnatMaps,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    next_hops: RemoteNextHops,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        let now = snat::monotonic_seconds();
        if let Err(e) = maps.write_config(now) {
            error!("writing the SNAT clock: {e}");
        }
        ticks = ticks.wrapping_add(1);
        if maps.settings().mode == SnatMode::Never {
            continue;
        }
        if ticks.is_multiple_of(NEXT_HOP_REFRESH_EVERY) {
            let next_hops = next_hops.clone();
            // Netlink round trips: off the async workers.
            let _ = tokio::task::spawn_blocking(move || next_hops.refresh()).await;
        }
        if !ticks.is_multiple_of(SNAT_COLLECT_EVERY) {
            continue;
        }
        match maps.collect(now, &timeouts) {
            Ok(collected) => {
                metrics.snat_flows(collected.flows);
                if collected.removed > 0 {
                    tracing::debug!(
                        removed = collected.removed,
                        left = collected.flows,
                        "idle SNAT flows removed"
                    );
                }
            }
            Err(e) => error!("collecting idle SNAT flows: {e}"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown() {
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

async fn watch_services_file(
    path: Option<PathBuf>,
    mut last: ValidServiceSet,
    mut programmer: MapProgrammer,
    metrics: Arc<Metrics>,
    remote_backends: bool,
) -> anyhow::Result<()> {
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = poll.tick() => {
                let Some(path) = &path else { continue };
                match ServiceSet::from_file(path, remote_backends) {
                    Ok(next) if next != last => match programmer.apply(&next) {
                        Ok(report) => {
                            info!(?report, "services file changed, applied");
                            metrics.announced(&next.announce, "announcing");
                            last = next;
                        }
                        Err(e) => error!("services file changed, not applied: {e}"),
                    },
                    Ok(_) => {}
                    Err(e) => warn!("keeping the last good services: {e}"),
                }
            }
        }
    }
}

/// The map writer behind the gRPC service (and the services file); stats come from the pinned
/// maps.
struct MapProgrammer {
    writer: MapWriter,
    announcer: Announcer,
    pins: Pins,
    next_hops: RemoteNextHops,
}

impl Programmer for MapProgrammer {
    fn apply(&mut self, set: &ValidServiceSet) -> Result<ApplyReport, WriteError> {
        let report = self.writer.apply(set);
        if report.is_ok() {
            self.next_hops.update(set);
        }
        // Also after a failed write: announce what the map holds.
        self.announcer.update(self.writer.announced());
        report
    }

    fn withdraw_announced(&mut self) -> Result<(), WriteError> {
        let withdrawn = self.writer.set_announced(&BTreeSet::new());
        self.announcer.update(self.writer.announced());
        withdrawn
    }

    fn renew_announce_lease(&mut self, lease: Option<Duration>) -> Result<(), WriteError> {
        self.writer.renew_announce_lease(lease)
    }

    fn stats(&self) -> Result<inspect::Report, String> {
        inspect::read(&self.pins, 0).map_err(|e| e.to_string())
    }
}

fn tls_config(args: &RunArgs) -> anyhow::Result<ServerTlsConfig> {
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.client_ca) else {
        bail!(
            "--grpc-listen needs --tls-cert, --tls-key and --client-ca (mutual TLS), or --insecure for plaintext"
        );
    };
    let read =
        |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .client_ca_root(Certificate::from_pem(read(ca)?)))
}

async fn serve_grpc(
    incoming: TcpIncoming,
    listen: SocketAddr,
    tls: Option<ServerTlsConfig>,
    programmer: MapProgrammer,
    metrics: Arc<Metrics>,
    remote_backends: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<DataplaneServer<DataplaneService<MapProgrammer>>>()
        .await;
    // Both reflection versions: grpcurl speaks v1, many other generic clients only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fulgur_proto::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            DataplaneServer::new(DataplaneService::new(programmer, metrics, remote_backends))
                .max_decoding_message_size(MAX_STATE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .with_context(|| format!("serving gRPC on {listen}"))
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, pins: Pins) {
    use axum::{http::StatusCode, routing::get};
    let scrape = {
        let metrics = metrics.clone();
        move || async move {
            let report = inspect::read(&pins, 0).ok();
            if let Some(report) = &report {
                metrics.paths(&paths::read_report(&pins, report));
            }
            (
                [(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                metrics.encode(report.as_ref()),
            )
        }
    };
    let ready = move || async move {
        if metrics.is_ready() {
            (StatusCode::OK, "ready\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
    };
    // Liveness: the process answers (its runtime is not wedged), attached or not.
    let alive = || async { "ok\n" };
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/ready", get(ready))
        .route("/healthz", get(alive));
    if let Err(e) = axum::serve(listener, app).await {
        error!("metrics server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_listen;

    #[test]
    fn listen_addresses() {
        for (text, expected) in [
            ("192.0.2.5:50051", "192.0.2.5:50051"),
            ("[2001:db8::5]:50051", "[2001:db8::5]:50051"),
            // What $(POD_IP):50051 gives for an IPv6 pod.
            ("2001:db8::5:50051", "[2001:db8::5]:50051"),
            // The last field is the port even where it could be an address group.
            ("2001:db8::5:8080", "[2001:db8::5]:8080"),
            ("::1:9464", "[::1]:9464"),
            ("::", ""),
        ] {
            let parsed = parse_listen(text).map(|a| a.to_string());
            if expected.is_empty() {
                assert!(parsed.is_err(), "{text}: {parsed:?}");
            } else {
                assert_eq!(parsed.as_deref(), Ok(expected), "{text}");
            }
        }
        for bad in [
            "192.0.2.5",
            "2001:db8::5",
            "[2001:db8::5]",
            "host:80",
            "192.0.2.5:70000",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }
}
