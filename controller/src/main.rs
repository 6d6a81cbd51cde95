//! `fulgur-controller`: reconciles Gateway API L4 routes into the agents' dataplanes.
//!
//! In a cluster (`--provider kubernetes`, the default) it watches the API and patches statuses;
//! standalone (`--provider file`) it reads a folder of manifests and writes a status file.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser;
use fulgur_controller::{
    agents::AnnounceSettings,
    kubernetes::{self, lease::LeaseSettings},
    metrics::{self, Metrics},
    standalone,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::warn;

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
    /// An agent: `NODE=URL`, its node as EndpointSlice `nodeName` names it, and its gRPC
    /// address `https://HOST:PORT` (or `http://` with --insecure); a bare URL's node is named
    /// after its host. Repeat.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// How long the agent announcing a Gateway address may be lost (no RPC answered) before
    /// the address moves to another in-sync agent. Must exceed --announce-lease.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    announce_failover: Duration,
    /// The agents stop announcing when no RPC reached them for this long; they are called at
    /// least every third of it.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    announce_lease: Duration,
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
    let announce = announce_settings(&cli)?;
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
            let settings = standalone::Settings {
                manifests,
                status_file,
                agents: cli.agents.clone(),
                tls,
                controller_name: cli.controller_name.clone(),
                address_pools: cli.address_pools.clone(),
                announce,
            };
            runtime.block_on(async {
                let metrics = serve_metrics(&cli).await?;
                metrics.leader.set(1); // No election standalone.
                Ok(standalone::run(settings, metrics).await?)
            })
        }
        "kubernetes" => {
            if cli.manifests.is_some() || cli.status_file.is_some() || !cli.agents.is_empty() {
                bail!(
                    "--manifests, --status-file and --agent are for --provider file; \
                     in a cluster agents are found through their pods (--agent-selector)"
                );
            }
            let settings = kubernetes_settings(&cli, tls, announce)?;
            runtime.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("no Kubernetes API (kubeconfig or in-cluster service account)")?;
                let metrics = serve_metrics(&cli).await?;
                Ok(kubernetes::run(client, settings, metrics).await?)
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

/// The lease must end before the failover bound, so a lost announcer has stopped before its
/// address moves.
fn announce_settings(cli: &Cli) -> anyhow::Result<AnnounceSettings> {
    let lease = cli.announce_lease;
    if lease < Duration::from_millis(30) || lease.as_millis() > u128::from(u32::MAX) {
        bail!("--announce-lease must be between 30ms and u32::MAX ms");
    }
    if lease >= cli.announce_failover {
        bail!("--announce-lease must be shorter than --announce-failover");
    }
    Ok(AnnounceSettings {
        lease,
        failover: cli.announce_failover,
    })
}

fn kubernetes_settings(
    cli: &Cli,
    tls: Option<ClientTlsConfig>,
    announce: AnnounceSettings,
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
        announce,
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
