//! `fulgur-controller`: reconciles Gateway API L4 routes into the agents' dataplanes.
//!
//! In a cluster (`--provider kubernetes`, the default) it watches the API and patches statuses;
//! standalone (`--provider file`) it reads a folder of manifests and writes a status file.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use fulgur_controller::{
    agents::Agents,
    backends::EmptyBackends,
    file, kubernetes,
    lease::LeaseSettings,
    metrics::{self, Metrics},
    model::Dataplane,
    shutdown, status,
    translate::{self, Config},
};
use notify::Watcher as _;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "fulgur controller: Gateway API TCPRoute/UDPRoute to eBPF load balancing"
)]
struct Cli {
    /// Where objects come from: `kubernetes` (the API server of the kubeconfig or the pod's
    /// service account) or `file` (a folder of manifests).
    #[arg(long, default_value = "kubernetes")]
    provider: String,
    /// With `--provider file`: the folder of YAML manifests, watched.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// With `--provider file`: where statuses are written (multi-document YAML).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// An agent's gRPC address, `https://HOST:PORT` (or `http://` with --insecure). Repeat.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// Plaintext gRPC to the agents.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "ca"])]
    insecure: bool,
    /// PEM client certificate presented to the agents.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA the agents' certificates must chain to.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The DNS name expected in the agents' certificates.
    #[arg(long, default_value = "fulgur-agent")]
    agent_tls_name: String,
    /// Addresses for Gateways without spec.addresses. Repeat.
    #[arg(long = "address-pool")]
    address_pools: Vec<ipnet::IpNet>,
    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz (both providers).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// GatewayClasses with this spec.controllerName are handled.
    #[arg(long, default_value = "fulgur.dev/gateway-controller")]
    controller_name: String,
    /// Kubernetes: the namespace of the agent DaemonSet's pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fulgur-system")]
    agent_namespace: String,
    /// Kubernetes: the label selector of the agent pods.
    #[arg(long, default_value = "app.kubernetes.io/name=fulgur-agent")]
    agent_selector: String,
    /// Kubernetes: the agents' gRPC port when a pod has no container port named `grpc`.
    #[arg(long, default_value_t = 50051)]
    agent_port: u16,
    /// Kubernetes: the Lease for leader election (in --lease-namespace).
    #[arg(long, default_value = "fulgur-controller")]
    lease_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "fulgur-system")]
    lease_namespace: String,
    /// Kubernetes: this replica's name in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Kubernetes: how long the Lease stays taken without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Kubernetes: how often the Lease is renewed (or, by followers, tried).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease_renew: Duration,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let tls = if cli.insecure { None } else { Some(tls(&cli)?) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.provider.as_str() {
        "file" => {
            let (Some(manifests), Some(status_file)) =
                (cli.manifests.clone(), cli.status_file.clone())
            else {
                bail!("--provider file needs --manifests DIR and --status-file FILE");
            };
            if cli.agents.is_empty() {
                warn!("no --agent: statuses are written, no dataplane is programmed");
            }
            runtime.block_on(async {
                let metrics = serve_metrics(&cli).await?;
                metrics.leader.set(1); // No election standalone.
                standalone(cli, manifests, status_file, tls, metrics).await
            })
        }
        "kubernetes" => {
            if cli.manifests.is_some() || cli.status_file.is_some() || !cli.agents.is_empty() {
                bail!(
                    "--manifests, --status-file and --agent are for --provider file; \
                     in a cluster agents are found through their pods (--agent-selector)"
                );
            }
            let settings = kubernetes_settings(&cli, tls)?;
            runtime.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("no Kubernetes API (kubeconfig or in-cluster service account)")?;
                let metrics = serve_metrics(&cli).await?;
                kubernetes::run(client, settings, metrics).await
            })
        }
        other => bail!("unknown provider {other:?} (file or kubernetes)"),
    }
}

/// The controller's metrics, served on `--metrics-listen` when given.
async fn serve_metrics(cli: &Cli) -> anyhow::Result<Arc<Metrics>> {
    let metrics = Metrics::new();
    if let Some(listen) = cli.metrics_listen {
        metrics::serve(listen, metrics.clone())
            .await
            .with_context(|| format!("--metrics-listen {listen}"))?;
    }
    Ok(metrics)
}

fn kubernetes_settings(
    cli: &Cli,
    tls: Option<ClientTlsConfig>,
) -> anyhow::Result<kubernetes::Settings> {
    let identity = match &cli.identity {
        Some(identity) => identity.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .context("no --identity and no host name")?,
    };
    if cli.lease_renew >= cli.lease_duration {
        bail!("--lease-renew must be shorter than --lease-duration");
    }
    Ok(kubernetes::Settings {
        controller_name: cli.controller_name.clone(),
        address_pools: cli.address_pools.clone(),
        agents: kubernetes::AgentDiscovery {
            namespace: cli.agent_namespace.clone(),
            selector: cli.agent_selector.clone(),
            port: cli.agent_port,
            tls,
        },
        rediscover_every: Duration::from_secs(10),
        lease: LeaseSettings {
            namespace: cli.lease_namespace.clone(),
            name: cli.lease_name.clone(),
            identity,
            duration: cli.lease_duration,
            renew_every: cli.lease_renew,
        },
    })
}

fn tls(cli: &Cli) -> anyhow::Result<ClientTlsConfig> {
    let (Some(cert), Some(key), Some(ca)) = (&cli.tls_cert, &cli.tls_key, &cli.ca) else {
        bail!("mutual TLS needs --tls-cert, --tls-key and --ca (or --insecure for plaintext)");
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    Ok(ClientTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .domain_name(cli.agent_tls_name.clone()))
}

/// Whether a file event can change what the folder holds: a create, a write, a rename or a
/// delete; not an open, a read or an attribute change.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(modify) => !matches!(modify, ModifyKind::Metadata(_)),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Any | EventKind::Other => true,
    }
}

/// What changes when the folder changes: names, sizes and modification times.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.metadata()
                .ok()
                .map(|m| (e.path(), m.len(), m.modified().ok()))
        })
        .collect();
    entries.sort();
    entries
}

async fn standalone(
    cli: Cli,
    manifests: PathBuf,
    status_file: PathBuf,
    tls: Option<ClientTlsConfig>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let agents = Agents::spawn(&cli.agents, tls)?;
    let previous = status::read_previous(&status_file);
    let mut previous_conditions = previous.conditions;
    let mut previous_addresses = previous.addresses;
    let mut history = file::History::default();
    let mut last_fingerprint = None;
    let mut last_services = None;
    let mut last_status = None;
    // inotify tells about changes at once; the slow poll catches what it cannot see (some
    // network file systems).
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the folder makes open and access events: reacting to them would reload for
        // ever. Errors are passed on, so a lost watch is answered with a read.
        let relevant = match &event {
            Ok(event) => changes_content(&event.kind),
            Err(_) => true,
        };
        if relevant {
            let _ = changed.send(());
        }
    })
    .context("watching the manifests folder")?;
    watcher
        .watch(&manifests, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", manifests.display()))?;
    let mut poll = tokio::time::interval(Duration::from_secs(5));
    // Agents' answers change the Gateways' Programmed condition.
    let mut agents_tick = tokio::time::interval(Duration::from_millis(200));
    let dataplane = || {
        if cli.agents.is_empty() {
            Dataplane::Programmed
        } else {
            agents.dataplane()
        }
    };
    let mut last_dataplane = None;
    let mut write_failed = false;
    let mut good: Option<file::Loaded> = None;
    let mut empty_backends = EmptyBackends::default();
    info!(manifests = %manifests.display(), status_file = %status_file.display(), "watching");
    // One listener for the whole run: a signal while reading the folder is not lost.
    let mut shutdown = std::pin::pin!(shutdown::shutdown_signal());
    loop {
        let (notified, polled) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = changes.recv() => (true, false),
            _ = poll.tick() => (false, true),
            _ = agents_tick.tick() => (false, false),
        };
        if notified {
            // An editor's save is several events: read once they settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while changes.try_recv().is_ok() {}
        }
        let print = fingerprint(&manifests);
        let reload = notified || (polled && last_fingerprint.as_ref() != Some(&print));
        metrics.set_agents(agents.states().values());
        let dataplane_now = dataplane();
        if !reload && !write_failed && last_dataplane.as_ref() == Some(&dataplane_now) {
            continue;
        }
        last_dataplane = Some(dataplane_now.clone());
        if reload || good.is_none() {
            last_fingerprint = Some(print);
            // On any error the last good state stays: agents and statuses are left as they are.
            metrics.manifest_reads.inc();
            match file::load(&manifests, &mut history, &status::now()) {
                Ok(loaded) => {
                    info!(objects = loaded.keys.len(), "manifests read");
                    good = Some(loaded);
                    metrics.set_ready();
                }
                Err(errors) => {
                    for e in &errors {
                        error!("{e}");
                    }
                    warn!(errors = errors.len(), "keeping the last good manifests");
                    if good.is_none() {
                        continue;
                    }
                }
            }
        }
        let Some(loaded) = good.as_mut() else {
            continue;
        };
        let snapshot = &mut loaded.snapshot;
        snapshot.dataplane = dataplane_now;
        snapshot.previous_conditions = previous_conditions.clone();
        snapshot.previous_addresses = previous_addresses.clone();
        let time = status::now();
        let config = Config {
            controller_name: &cli.controller_name,
            address_pools: &cli.address_pools,
            now: &time,
        };
        let out = translate::translate(&config, snapshot);
        metrics.reconciles.inc();
        metrics.desired_services.set(out.services.len() as i64);
        empty_backends.update(&out, &metrics);
        if last_services.as_ref() != Some(&out.services) {
            let generation = agents.set_desired(out.services.clone());
            info!(
                services = out.services.len(),
                generation, "desired state changed"
            );
            last_services = Some(out.services.clone());
        }
        let docs = status::documents(&out);
        let text = status::render(&docs);
        if last_status.as_ref() != Some(&text) {
            let written = status::write_atomically(&status_file, &text);
            metrics.status_write(written.is_ok());
            write_failed = match written {
                Err(e) => {
                    error!("writing {}: {e}", status_file.display());
                    true // Tried again on the next tick.
                }
                Ok(()) => {
                    info!(objects = docs.len(), "status file written");
                    last_status = Some(text);
                    false
                }
            };
        }
        let now_previous = status::Previous::from_documents(&docs);
        previous_conditions = now_previous.conditions;
        previous_addresses = now_previous.addresses;
    }
}
