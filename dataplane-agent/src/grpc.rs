//! The `fulgur.dataplane.v1.Dataplane` service: full desired state in, map writes out.
//!
//! The kernel sits behind [`Programmer`], so the service is tested against an in-memory fake.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use fulgur_proto::v1::{
    self, ApplyRequest, ApplyResponse, GetRequest, GetResponse, StatsRequest, StatsResponse,
    dataplane_server::Dataplane,
};
use tonic::{Request, Response, Status};

use crate::{
    config::{Draft, DraftBackend, DraftService, FieldError, Parsed, Protocol, ValidServiceSet},
    inspect::{self, Traffic},
    metrics::Metrics,
    writer::{ApplyReport, WriteError},
};

/// What the service programs: the map writer in the agent, a fake in tests.
pub trait Programmer: Send + 'static {
    /// Makes the dataplane hold `set`, its announced addresses included.
    fn apply(&mut self, set: &ValidServiceSet) -> Result<ApplyReport, WriteError>;
    fn stats(&self) -> Result<inspect::Report, String>;
    /// Stops answering ARP / NDP for every announced address at once (the lease ran out).
    fn withdraw_announced(&mut self) -> Result<(), WriteError>;
    /// Has the dataplane itself stop answering `lease` from now unless renewed again (`None`:
    /// no lease), so announcements do not outlive a dead agent.
    fn renew_announce_lease(&mut self, lease: Option<Duration>) -> Result<(), WriteError>;
}

/// What this agent understands beyond the first version of the contract (`GetResponse`).
/// "remote-backends" only with SNAT on: without it, a flow to another node's backend would be
/// answered from that node's address, so such a state is refused (see [`to_service_set`]).
pub fn features(remote_backends: bool) -> Vec<String> {
    let mut features = vec![fulgur_proto::features::ANNOUNCE.to_owned()];
    if remote_backends {
        features.push(fulgur_proto::features::REMOTE_BACKENDS.to_owned());
    }
    features
}

/// How often the lease is checked: the bound on how late an expired lease withdraws.
const LEASE_TICK: Duration = Duration::from_millis(20);

struct Applied {
    generation: u64,
    state: v1::DesiredState,
    /// `announce_lease_ms` of the applied state; `None`: announce until told otherwise.
    lease: Option<Duration>,
    /// The last RPC that renewed the lease.
    renewed: Instant,
    /// The lease ran out: nothing is announced until the next successful Apply. Get and Stats
    /// do not revive it, because a controller that reconnects after moving an address calls
    /// Get before its Apply, and a revival there would make two announcers.
    lapsed: bool,
}

impl Applied {
    fn announced(&self) -> Vec<String> {
        if self.lapsed {
            Vec::new()
        } else {
            self.state.announce.clone()
        }
    }
}

pub struct DataplaneService<P> {
    inner: Arc<Mutex<(P, Applied)>>,
    metrics: Arc<Metrics>,
    /// SNAT is on: backends marked remote are accepted and "remote-backends" is listed.
    remote_backends: bool,
}

impl<P: Programmer> DataplaneService<P> {
    /// The service, with a thread that withdraws the announced addresses when the lease runs
    /// out (it ends with the service). `remote_backends`: SNAT is on (`--snat` not `never`).
    pub fn new(programmer: P, metrics: Arc<Metrics>, remote_backends: bool) -> Self {
        let applied = Applied {
            generation: 0,
            state: v1::DesiredState::default(),
            lease: None,
            renewed: Instant::now(),
            lapsed: false,
        };
        let inner = Arc::new(Mutex::new((programmer, applied)));
        let weak = Arc::downgrade(&inner);
        let watched = metrics.clone();
        std::thread::Builder::new()
            .name("fulgur-lease".into())
            .spawn(move || watch_lease(weak, watched))
            .expect("spawning the lease thread");
        DataplaneService {
            inner,
            metrics,
            remote_backends,
        }
    }

    /// Any RPC from the controller renews a live lease, in the dataplane too.
    fn renew(&self) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (programmer, applied) = &mut *guard;
        if applied.lapsed {
            return;
        }
        applied.renewed = Instant::now();
        if let Some(lease) = applied.lease
            && let Err(e) = programmer.renew_announce_lease(Some(lease))
        {
            tracing::error!("renewing the announce lease in the dataplane: {e}");
        }
    }
}

fn watch_lease<P: Programmer>(inner: Weak<Mutex<(P, Applied)>>, metrics: Arc<Metrics>) {
    loop {
        std::thread::sleep(LEASE_TICK);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
        let (programmer, applied) = &mut *guard;
        let Some(lease) = applied.lease else {
            continue;
        };
        if applied.lapsed || applied.state.announce.is_empty() || applied.renewed.elapsed() < lease
        {
            continue;
        }
        match programmer.withdraw_announced() {
            Ok(()) => {
                applied.lapsed = true;
                metrics.announced(&applied.state.announce, "lease_expired");
                tracing::warn!(
                    lease_ms = lease.as_millis() as u64,
                    addresses = applied.state.announce.join(", "),
                    "no RPC from the controller within the announce lease: stopped announcing \
                     until its next Apply"
                );
            }
            Err(e) => tracing::error!("withdrawing the announced addresses: {e}"),
        }
    }
}

fn field(path: String, message: impl Into<String>) -> FieldError {
    FieldError {
        path,
        message: message.into(),
    }
}

impl From<Protocol> for v1::Protocol {
    fn from(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Udp => v1::Protocol::Udp,
        }
    }
}

fn address(text: &str) -> Parsed<IpAddr> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IP address"))
}

/// Reads a desired state into the one validation of a service set ([`Draft::validate`]),
/// which reports every problem with its proto field path.
pub fn to_service_set(
    state: &v1::DesiredState,
    remote_backends: bool,
) -> Result<ValidServiceSet, Vec<FieldError>> {
    let services = state
        .services
        .iter()
        .map(|s| DraftService {
            vip: address(&s.vip),
            port: s.port,
            protocol: match v1::Protocol::try_from(s.protocol) {
                Ok(v1::Protocol::Tcp) => Ok(Protocol::Tcp),
                Ok(v1::Protocol::Udp) => Ok(Protocol::Udp),
                _ => Err("must be PROTOCOL_TCP or PROTOCOL_UDP".into()),
            },
            backends: s
                .backends
                .iter()
                .map(|b| DraftBackend {
                    address: address(&b.address),
                    port: b.port,
                    weight: b.weight,
                    remote: b.remote,
                })
                .collect(),
            reject_weight: s.reject_weight,
        })
        .collect();
    Draft {
        services,
        announce: state.announce.iter().map(|a| address(a)).collect(),
        reject_weight_field: "reject_weight",
        remote_backends,
    }
    .validate()
}

/// Problems listed in one refusal: a status message travels in an HTTP/2 header, whose size
/// the client limits (1025 copies of one backend are 1024 duplicates).
const LISTED_PROBLEMS: usize = 100;

fn invalid(errors: &[FieldError]) -> Status {
    let mut lines: Vec<String> = errors
        .iter()
        .take(LISTED_PROBLEMS)
        .map(ToString::to_string)
        .collect();
    if errors.len() > LISTED_PROBLEMS {
        lines.push(format!("... and {} more", errors.len() - LISTED_PROBLEMS));
    }
    Status::invalid_argument(format!(
        "{} invalid field(s), nothing applied:\n{}",
        errors.len(),
        lines.join("\n")
    ))
}

fn traffic(t: &Traffic) -> v1::Traffic {
    v1::Traffic {
        packets: t.packets,
        bytes: t.bytes,
        new_flows: t.new_flows,
        rejects: t.rejects,
    }
}

#[tonic::async_trait]
impl<P: Programmer> Dataplane for DataplaneService<P> {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let started = Instant::now();
        self.renew();
        let state = request
            .into_inner()
            .state
            .ok_or_else(|| invalid(&[field("state".into(), "required")]))?;
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        let announced_metrics = self.metrics.clone();
        let remote_backends = self.remote_backends;
        // Map writes are blocking syscalls and memory writes: off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            let (programmer, applied) = &mut *guard;
            if state.generation < applied.generation {
                return Err((
                    "stale",
                    Status::failed_precondition(format!(
                        "generation {} is older than the applied generation {}",
                        state.generation, applied.generation
                    )),
                ));
            }
            // The same state again is a no-op, except after a lapsed lease: then it is applied
            // again, which announces its addresses again.
            if state.generation == applied.generation
                && applied.generation != 0
                && !(state == applied.state && applied.lapsed)
            {
                if state == applied.state {
                    let unchanged = applied.state.services.len() as u32;
                    return Ok(ApplyResponse {
                        applied_generation: applied.generation,
                        unchanged,
                        ..Default::default()
                    });
                }
                return Err((
                    "stale",
                    Status::failed_precondition(format!(
                        "generation {} was already applied with a different state",
                        state.generation
                    )),
                ));
            }
            let set = to_service_set(&state, remote_backends)
                .map_err(|errors| ("invalid", invalid(&errors)))?;
            let lease = (state.announce_lease_ms > 0)
                .then(|| Duration::from_millis(state.announce_lease_ms.into()));
            // The lease first: addresses this apply announces are answered from the start.
            let written = programmer
                .renew_announce_lease(lease)
                .and_then(|()| programmer.apply(&set));
            let report = written.map_err(|e| {
                // A refused state leaves the last one announced, under its lease.
                if let Err(e) = programmer.renew_announce_lease(applied.lease) {
                    tracing::error!("restoring the announce lease in the dataplane: {e}");
                }
                match e {
                    WriteError::Capacity { .. } => {
                        ("capacity", Status::resource_exhausted(e.to_string()))
                    }
                    other => ("error", Status::internal(other.to_string())),
                }
            })?;
            applied.generation = state.generation;
            applied.lease = lease;
            applied.renewed = Instant::now();
            applied.lapsed = false;
            applied.state = state;
            announced_metrics.announced(&applied.state.announce, "announcing");
            Ok(ApplyResponse {
                applied_generation: applied.generation,
                added: report.added as u32,
                updated: report.updated as u32,
                unchanged: report.unchanged as u32,
                removed: report.removed as u32,
            })
        })
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?;
        match result {
            Ok(response) => {
                metrics.applied(started.elapsed(), "ok", response.applied_generation);
                tracing::info!(
                    generation = response.applied_generation,
                    added = response.added,
                    updated = response.updated,
                    unchanged = response.unchanged,
                    removed = response.removed,
                    "applied"
                );
                Ok(Response::new(response))
            }
            Err((result, status)) => {
                metrics.applied(started.elapsed(), result, 0);
                tracing::warn!(result, "apply refused: {}", status.message());
                Err(status)
            }
        }
    }

    async fn get(&self, _request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.renew();
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = guard.1.state.clone();
        state.generation = guard.1.generation;
        // What is announced now: nothing while the lease has lapsed, so a controller sees it.
        state.announce = guard.1.announced();
        Ok(Response::new(GetResponse {
            state: Some(state),
            features: features(self.remote_backends),
        }))
    }

    async fn stats(
        &self,
        _request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        self.renew();
        let report = {
            let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            guard.0.stats().map_err(Status::internal)?
        };
        let services = report
            .services
            .iter()
            .map(|s| v1::ServiceStats {
                vip: s.vip.to_string(),
                port: s.port.into(),
                protocol: v1::Protocol::from(s.protocol) as i32,
                traffic: Some(traffic(&s.traffic)),
                backends: s
                    .backends
                    .iter()
                    .map(|b| v1::BackendStats {
                        address: b.address.to_string(),
                        port: b.port.into(),
                        traffic: Some(traffic(&b.traffic)),
                    })
                    .collect(),
            })
            .collect();
        let counters = report
            .counters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        Ok(Response::new(StatsResponse { counters, services }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_desired_state_is_checked_by_the_one_validation_with_proto_field_paths() {
        let state = v1::DesiredState {
            generation: 1,
            services: vec![v1::Service {
                vip: "not-an-ip".into(),
                port: 70000,
                protocol: v1::Protocol::Unspecified as i32,
                backends: vec![v1::Backend {
                    address: "203.0.113.2".into(),
                    port: 0,
                    weight: 2_000_000,
                    ..Default::default()
                }],
                reject_weight: 1_000_001,
            }],
            ..Default::default()
        };
        let lines: Vec<String> = to_service_set(&state, true)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "services[0].port: 70000 is not a port (1-65535)",
                "services[0].vip: \"not-an-ip\" is not an IP address",
                "services[0].protocol: must be PROTOCOL_TCP or PROTOCOL_UDP",
                "services[0].reject_weight: 1000001 is above 1000000",
                "services[0].backends[0].port: 0 is not a port (1-65535)",
                "services[0].backends[0].weight: 2000000 is above 1000000",
            ]
        );
    }
}
