//! The controller's Prometheus metrics, and its health endpoints: `/metrics`, `/healthz` (the
//! process serves) and `/readyz` (the inputs were read: caches synced, or the manifests loaded).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{error, info};

use crate::{agents::SyncState, translate::BackendRefState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// 1 while this replica holds the Lease (always 1 standalone).
    pub leader: Gauge,
    pub reconciles: Counter,
    pub status_writes: Family<ResultLabel, Counter>,
    pub desired_services: Gauge,
    pub events: Counter,
    /// Times the standalone provider read its manifest folder.
    pub manifest_reads: Counter,
    agents: Family<StateLabel, Gauge>,
    backend_refs: Family<StateLabel, Gauge>,
    /// Errors the providers went on after (retried or reported), by the error's `kind()`.
    errors: Family<KindLabel, Counter>,
    ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("fulgur_controller");
        let leader = Gauge::default();
        let reconciles = Counter::default();
        let status_writes = Family::<ResultLabel, Counter>::default();
        let desired_services = Gauge::default();
        let events = Counter::default();
        let agents = Family::<StateLabel, Gauge>::default();
        let backend_refs = Family::<StateLabel, Gauge>::default();
        let manifest_reads = Counter::default();
        let errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "leader",
            "1 while this replica holds the Lease",
            leader.clone(),
        );
        registry.register(
            "reconciles",
            "Translations of the inputs",
            reconciles.clone(),
        );
        registry.register(
            "status_writes",
            "Status patches (Kubernetes) or status file writes, by result",
            status_writes.clone(),
        );
        registry.register(
            "desired_services",
            "Services in the desired dataplane state",
            desired_services.clone(),
        );
        registry.register("events", "Events recorded", events.clone());
        registry.register("agents", "Agents by sync state", agents.clone());
        registry.register(
            "backend_refs",
            "BackendRefs of the routes that receive traffic, by what they resolve to \
             (ready, no_endpoints, invalid)",
            backend_refs.clone(),
        );
        registry.register(
            "manifest_reads",
            "Reads of the manifest folder (standalone)",
            manifest_reads.clone(),
        );
        registry.register(
            "errors",
            "Errors the controller retried or reported, by kind",
            errors.clone(),
        );
        Arc::new(Metrics {
            registry,
            leader,
            reconciles,
            status_writes,
            desired_services,
            events,
            manifest_reads,
            agents,
            backend_refs,
            errors,
            ready: AtomicBool::new(false),
        })
    }

    /// Counts an error by its `kind()`.
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn status_write(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.status_writes
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts the agents by state.
    pub fn set_agents<'a>(&self, states: impl IntoIterator<Item = &'a SyncState>) {
        let mut counts = [
            ("connecting", 0),
            ("synced", 0),
            ("failed", 0),
            ("refused", 0),
        ];
        for state in states {
            let i = match state {
                SyncState::Connecting => 0,
                SyncState::Synced { .. } => 1,
                SyncState::Failed { .. } => 2,
                SyncState::Refused { .. } => 3,
            };
            counts[i].1 += 1;
        }
        for (state, count) in counts {
            self.agents.get_or_create(&StateLabel { state }).set(count);
        }
    }

    /// Counts the backendRefs by state; every state is present, 0 included.
    pub fn set_backend_refs(&self, states: impl IntoIterator<Item = BackendRefState>) {
        let all = [
            BackendRefState::Ready,
            BackendRefState::NoEndpoints,
            BackendRefState::Invalid,
        ];
        let mut counts = [0i64; 3];
        for state in states {
            counts[all
                .iter()
                .position(|s| *s == state)
                .expect("every state listed")] += 1;
        }
        for (state, count) in all.into_iter().zip(counts) {
            self.backend_refs
                .get_or_create(&StateLabel {
                    state: state.label(),
                })
                .set(count);
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The OpenMetrics text that /metrics serves.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Serves the endpoints on `listen` until the process ends.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    info!(%listen, "metrics on /metrics, health on /healthz and /readyz");
    let scrape = {
        let metrics = metrics.clone();
        move || async move {
            (
                [(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                metrics.encode(),
            )
        }
    };
    let ready = move || async move {
        if metrics.ready.load(Ordering::Relaxed) {
            (StatusCode::OK, "ready\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!("metrics server stopped: {e}");
        }
    });
    Ok(())
}
