//! The Kubernetes provider: reflectors on every input build the Snapshot; the leader (see
//! `lease`) pushes the desired state to the agents found through the agent DaemonSet's pods,
//! patches statuses that changed with server-side apply, and records Events for errors.
//!
//! Gateway API objects are read as `DynamicObject`s at the version the cluster serves (`v1`, or
//! `v1alpha2` routes / `v1beta1` ReferenceGrants on older installs) and parsed into the
//! `resources` types, so one code path covers every version.
//!
//! `stores`: discovery and reflectors, and the Snapshot built from them; `leader`: what the
//! Lease holder does with it.

mod leader;
pub mod lease;
mod stores;

use std::{fmt::Debug, sync::Arc, time::Duration};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::Notify;
use tonic::transport::ClientTlsConfig;
use tracing::{info, warn};

use self::{leader::Leader, lease::LeaseSettings, stores::Stores};
use crate::{agents::AgentsError, metrics::Metrics, shutdown::shutdown_signal};

/// What stops or delays the Kubernetes provider.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("discovering {api_version}: {source}")]
    Discovery {
        api_version: String,
        source: kube::Error,
    },
    #[error("waiting for the caches: {0}")]
    Cache(#[from] kube::runtime::reflector::store::WriterDropped),
    #[error(transparent)]
    Agents(#[from] AgentsError),
    #[error("leader election stopped")]
    LeaderElectionStopped,
    /// The process should restart as a fresh follower, so no two replicas ever act at once.
    #[error("lost the lease {0}")]
    LostLease(String),
}

impl Error {
    /// The metric label of this error (`fulgur_controller_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Discovery { .. } => "discovery",
            Error::Cache(_) => "cache",
            Error::Agents(e) => e.kind(),
            Error::LeaderElectionStopped | Error::LostLease(_) => "lease",
        }
    }
}

/// The field manager of every status patch.
pub const FIELD_MANAGER: &str = "fulgur-controller";

/// How agents are found: the agent DaemonSet's pods.
#[derive(Clone, Debug)]
pub struct AgentDiscovery {
    pub namespace: String,
    /// A label selector, as `kubectl -l` takes it.
    pub selector: String,
    /// Used when a pod has no container port named `grpc`.
    pub port: u16,
    /// `None`: plaintext (`--insecure`).
    pub tls: Option<ClientTlsConfig>,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub controller_name: String,
    pub address_pools: Vec<ipnet::IpNet>,
    pub agents: AgentDiscovery,
    /// Announcement lease and failover bound.
    pub announce: crate::agents::AnnounceSettings,
    pub lease: LeaseSettings,
    /// How often kinds the cluster did not serve are looked for again.
    pub rediscover_every: Duration,
}

/// Runs the provider until SIGINT/SIGTERM, or until leadership is lost (an error: the process should
/// restart, as a fresh follower, so no two replicas ever act at once).
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Result<(), Error> {
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let changed = Arc::new(Notify::new());
    // The API may not answer yet (a control plane starting with the cluster): keep trying.
    let mut stores = loop {
        match Stores::start(&client, &settings, &changed).await {
            Ok(stores) => break stores,
            Err(e) => {
                metrics.error(e.kind());
                warn!("{e}; trying again in 2 s")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = &mut shutdown => return Ok(()),
        }
    };
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &settings.lease.namespace);
    let mut leader = lease::spawn(lease_api.clone(), settings.lease.clone());
    tokio::select! {
        ready = stores.ready() => ready?,
        _ = &mut shutdown => return Ok(()),
    }
    info!("caches synced");
    metrics.set_ready();
    let mut state = Leader::new(client.clone(), settings.clone(), metrics.clone())?;
    let mut leading = false;
    // Set by watch events and by work that must be retried (a failed status patch).
    let mut dirty = true;
    let mut rediscover = tokio::time::interval(settings.rediscover_every);
    rediscover.tick().await; // The first tick is immediate: discovery just ran.
    // Agents' answers are checked this often (statuses and events follow them).
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                if leading {
                    lease::release(&lease_api, &settings.lease).await;
                }
                return Ok(());
            }
            _ = changed.notified() => dirty = true,
            _ = rediscover.tick(), if !stores.gateway_api.complete() => {
                match stores.gateway_api.discover_missing(&client, &changed).await {
                    Ok(started) => dirty |= started,
                    Err(e) => {
                        metrics.error(e.kind());
                        warn!("discovery: {e}")
                    }
                }
            }
            result = leader.changed() => result.map_err(|_| Error::LeaderElectionStopped)?,
            _ = tick.tick() => {}
        }
        let leads = *leader.borrow_and_update();
        if leading && !leads {
            return Err(Error::LostLease(settings.lease.name.clone()));
        }
        if !leads {
            continue;
        }
        if !leading {
            info!(identity = %settings.lease.identity, "leading");
            metrics.leader.set(1);
            leading = true;
            dirty = true;
        }
        if dirty {
            // Let a burst of watch events settle into one reconcile.
            tokio::time::sleep(Duration::from_millis(50)).await;
            dirty = !state.reconcile(&stores).await;
        }
        dirty |= state.check_agents().await;
    }
}
