//! BackendRefs that reach no ready endpoint. Such a route is legal (its Service may just have no
//! ready pods yet) and keeps ResolvedRefs True, but its traffic is rejected: so every one is
//! logged once when it starts (an Event too, in a cluster) and counted in the metrics, and the
//! status never hides what the dataplane does.

use std::collections::BTreeSet;

use tracing::{info, warn};

use crate::{
    metrics::Metrics,
    model::RouteKind,
    translate::{BackendRefKey, BackendRefState, Output},
};

/// Remembers which backendRefs had no endpoints at the last reconcile.
#[derive(Debug, Default)]
pub struct EmptyBackends {
    known: BTreeSet<BackendRefKey>,
}

impl EmptyBackends {
    /// Updates the metrics and logs the changes; returns the backendRefs that just lost their
    /// last endpoint (or appeared without one).
    pub fn update(&mut self, out: &Output, metrics: &Metrics) -> Vec<BackendRefKey> {
        metrics.set_backend_refs(out.backend_refs.values().copied());
        let now: BTreeSet<BackendRefKey> = out
            .backend_refs
            .iter()
            .filter(|(_, state)| **state == BackendRefState::NoEndpoints)
            .map(|(key, _)| key.clone())
            .collect();
        let started: Vec<BackendRefKey> = now.difference(&self.known).cloned().collect();
        for key in &started {
            warn!(
                route = %format_args!("{}/{}", key.route_kind.kind(), key.route),
                service = %key.service,
                "{}", no_endpoints_message(key)
            );
        }
        for key in self.known.difference(&now) {
            info!(
                route = %format_args!("{}/{}", key.route_kind.kind(), key.route),
                service = %key.service,
                "backendRef has endpoints again, or is no longer used"
            );
        }
        self.known = now;
        started
    }
}

/// What the log line and the Event say.
pub fn no_endpoints_message(key: &BackendRefKey) -> String {
    let port = key.port.map(|p| format!(" port {p}")).unwrap_or_default();
    format!(
        "Service {}{port} has no ready endpoints: its share of the {} {}'s new {} is rejected",
        key.service,
        key.route_kind.kind(),
        key.route,
        match key.route_kind {
            RouteKind::Tcp => "connections",
            RouteKind::Udp => "flows",
        }
    )
}
