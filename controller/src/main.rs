//! `fulgur-controller`: reconciles Gateway API L4 routes into the agents' dataplanes.
//!
//! Standalone mode (`--provider file`) reads a folder of manifests and writes a status file.
//! The Kubernetes provider is not built yet.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use fulgur_controller::{
    agents::Agents,
    file, status,
    translate::{self, Config},
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "fulgur controller: Gateway API TCPRoute/UDPRoute to eBPF load balancing"
)]
struct Cli {
    /// Where objects come from: `file` (a folder of manifests) or `kubernetes` (not built yet).
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
    /// GatewayClasses with this spec.controllerName are handled.
    #[arg(long, default_value = "fulgur.dev/gateway-controller")]
    controller_name: String,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.provider.as_str() {
        "file" => {}
        "kubernetes" => {
            bail!("the kubernetes provider is not implemented yet; use --provider file")
        }
        other => bail!("unknown provider {other:?} (file or kubernetes)"),
    }
    let (Some(manifests), Some(status_file)) = (cli.manifests.clone(), cli.status_file.clone())
    else {
        bail!("--provider file needs --manifests DIR and --status-file FILE");
    };
    if cli.agents.is_empty() {
        warn!("no --agent: statuses are written, no dataplane is programmed");
    }
    let tls = if cli.insecure { None } else { Some(tls(&cli)?) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(standalone(cli, manifests, status_file, tls))
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

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
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
) -> anyhow::Result<()> {
    let agents = Agents::spawn(&cli.agents, tls)?;
    let previous = status::read_previous(&status_file);
    let mut previous_conditions = previous.conditions;
    let mut previous_addresses = previous.addresses;
    let mut history = file::History::default();
    let mut last_fingerprint = None;
    let mut last_services = None;
    let mut last_status = None;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    info!(manifests = %manifests.display(), status_file = %status_file.display(), "watching");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = poll.tick() => {}
        }
        let print = fingerprint(&manifests);
        if last_fingerprint.as_ref() == Some(&print) {
            continue;
        }
        last_fingerprint = Some(print);
        // On any error the last good state stays: agents and statuses are left as they are.
        let mut snapshot = match file::load(&manifests, &mut history, &now()) {
            Ok(loaded) => {
                info!(objects = loaded.keys.len(), "manifests read");
                loaded.snapshot
            }
            Err(errors) => {
                for e in &errors {
                    error!("{e}");
                }
                warn!(errors = errors.len(), "keeping the last good manifests");
                continue;
            }
        };
        snapshot.previous_conditions = previous_conditions.clone();
        snapshot.previous_addresses = previous_addresses.clone();
        let time = now();
        let config = Config {
            controller_name: &cli.controller_name,
            address_pools: &cli.address_pools,
            now: &time,
        };
        let out = translate::translate(&config, &snapshot);
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
            if let Err(e) = status::write_atomically(&status_file, &text) {
                error!("writing {}: {e}", status_file.display());
                last_fingerprint = None; // Try again on the next tick.
            } else {
                info!(objects = docs.len(), "status file written");
                last_status = Some(text);
            }
        }
        let now_previous = status::Previous::from_documents(&docs);
        previous_conditions = now_previous.conditions;
        previous_addresses = now_previous.addresses;
    }
}
