//! The step after the Snapshot, the same for both providers: translate, the metrics, the
//! agents' desired state when it changed, and the status documents. What the providers do with
//! the documents differs: the status file, or server-side-apply patches.

use std::sync::Arc;

use tracing::info;

use crate::{
    agents::{Agents, ClusterState},
    backends::EmptyBackends,
    metrics::Metrics,
    model::{Announcements, Snapshot},
    status::{self, ObjectStatus},
    translate::{self, BackendRefKey, Config},
};

/// What one reconcile produced for the provider to publish.
pub struct Reconciled {
    pub documents: Vec<ObjectStatus>,
    /// BackendRefs that just lost their last ready endpoint (the Kubernetes provider records
    /// an Event on each route).
    pub no_endpoints: Vec<BackendRefKey>,
}

/// Remembers what the agents were last given.
pub struct Reconciler {
    controller_name: String,
    address_pools: Vec<ipnet::IpNet>,
    last_state: Option<ClusterState>,
    empty_backends: EmptyBackends,
    metrics: Arc<Metrics>,
}

impl Reconciler {
    pub fn new(
        controller_name: String,
        address_pools: Vec<ipnet::IpNet>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reconciler {
            controller_name,
            address_pools,
            last_state: None,
            empty_backends: EmptyBackends::default(),
            metrics,
        }
    }

    /// Translates `snapshot` (its `dataplane` already set from the agents), hands a changed
    /// desired state to `agents`, and returns the statuses.
    pub fn reconcile(&mut self, snapshot: &Snapshot, agents: &Agents) -> Reconciled {
        let now = status::now();
        let config = Config {
            controller_name: &self.controller_name,
            address_pools: &self.address_pools,
            now: &now,
        };
        let mut out = translate::translate(&config, snapshot);
        self.metrics.reconciles.inc();
        self.metrics.desired_services.set(out.services.len() as i64);
        let no_endpoints = self.empty_backends.update(&out, &self.metrics);
        let state = ClusterState {
            services: out.services.clone(),
            endpoint_nodes: out.endpoint_nodes.clone(),
            announce: out.announce.clone(),
        };
        if self.last_state.as_ref() != Some(&state) {
            let generation = agents.set_cluster_state(state.clone());
            info!(
                services = out.services.len(),
                addresses = out.announce.len(),
                generation,
                "desired state changed"
            );
            self.last_state = Some(state);
            // New addresses were just planned: their first status says to whom they went,
            // not that they wait for a plan.
            if let Announcements::Checked(before) = &snapshot.announcements {
                let planned = agents.announcements();
                if out.announce.iter().any(|a| before.get(a) != planned.get(a)) {
                    let mut fresh = snapshot.clone();
                    fresh.announcements = Announcements::Checked(planned);
                    out = translate::translate(&config, &fresh);
                }
            }
        }
        Reconciled {
            documents: status::documents(&out),
            no_endpoints,
        }
    }
}
