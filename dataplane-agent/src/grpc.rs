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
    config::{
        BackendSpec, FieldError, MAX_BACKENDS_PER_SERVICE, MAX_WEIGHT, Protocol, ServiceSet,
        ServiceSpec,
    },
    inspect::{self, Traffic},
    metrics::Metrics,
    writer::{ApplyReport, WriteError},
};

/// What the service programs: the map writer in the agent, a fake in tests.
pub trait Programmer: Send + 'static {
    /// Makes the dataplane hold `set`, its announced addresses included.
    fn apply(&mut self, set: &ServiceSet) -> Result<ApplyReport, WriteError>;
    fn stats(&self) -> Result<inspect::Report, String>;
    /// Stops answering ARP / NDP for every announced address at once (the lease ran out).
    fn withdraw_announced(&mut self) -> Result<(), WriteError>;
}

/// What this agent understands beyond the first version of the contract (`GetResponse`).
/// Not "remote-backends": without SNAT, a flow to another node's backend would be answered
/// from that node's address, so such a state is refused (see [`to_service_set`]).
pub const FEATURES: [&str; 1] = [fulgur_proto::features::ANNOUNCE];

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
}

impl<P: Programmer> DataplaneService<P> {
    /// The service, with a thread that withdraws the announced addresses when the lease runs
    /// out (it ends with the service).
    pub fn new(programmer: P, metrics: Arc<Metrics>) -> Self {
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
        DataplaneService { inner, metrics }
    }

    /// Any RPC from the controller renews a live lease.
    fn renew(&self) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !guard.1.lapsed {
            guard.1.renewed = Instant::now();
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

/// Converts and validates a desired state, collecting every problem with its field path.
pub fn to_service_set(state: &v1::DesiredState) -> Result<ServiceSet, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut services = Vec::with_capacity(state.services.len());
    let port = |p: u32, path: String, errors: &mut Vec<FieldError>| match u16::try_from(p) {
        Ok(p) if p > 0 => p,
        _ => {
            errors.push(field(path, format!("{p} is not a port (1-65535)")));
            0
        }
    };
    let address =
        |text: &str, path: String, errors: &mut Vec<FieldError>| match text.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                errors.push(field(path, format!("{text:?} is not an IP address")));
                None
            }
        };
    for (i, s) in state.services.iter().enumerate() {
        let at = |f: &str| format!("services[{i}].{f}");
        let vip = address(&s.vip, at("vip"), &mut errors);
        let service_port = port(s.port, at("port"), &mut errors);
        let protocol = match v1::Protocol::try_from(s.protocol) {
            Ok(v1::Protocol::Tcp) => Some(Protocol::Tcp),
            Ok(v1::Protocol::Udp) => Some(Protocol::Udp),
            _ => {
                errors.push(field(
                    at("protocol"),
                    "must be PROTOCOL_TCP or PROTOCOL_UDP",
                ));
                None
            }
        };
        if s.backends.len() > MAX_BACKENDS_PER_SERVICE {
            errors.push(field(
                at("backends"),
                format!(
                    "{} backends, at most {MAX_BACKENDS_PER_SERVICE} are allowed",
                    s.backends.len()
                ),
            ));
        }
        if s.reject_weight > MAX_WEIGHT {
            errors.push(field(
                at("reject_weight"),
                format!("{} is above {MAX_WEIGHT}", s.reject_weight),
            ));
        }
        let mut backends = Vec::with_capacity(s.backends.len());
        for (j, b) in s.backends.iter().enumerate() {
            let at = |f: &str| format!("services[{i}].backends[{j}].{f}");
            let backend_address = address(&b.address, at("address"), &mut errors);
            let backend_port = port(b.port, at("port"), &mut errors);
            if b.weight > MAX_WEIGHT {
                errors.push(field(
                    at("weight"),
                    format!("{} is above {MAX_WEIGHT}", b.weight),
                ));
            }
            if b.remote {
                errors.push(field(
                    at("remote"),
                    "this agent has no SNAT (it does not list the \"remote-backends\" feature): \
                     a flow to another node's backend would be answered from that node's \
                     address, so the state is refused",
                ));
            }
            if let Some(address) = backend_address {
                backends.push(BackendSpec {
                    address,
                    port: backend_port,
                    weight: b.weight,
                });
            }
        }
        if let (Some(vip), Some(protocol)) = (vip, protocol) {
            services.push(ServiceSpec {
                vip,
                port: service_port,
                protocol,
                backends,
                reject_weight: s.reject_weight,
            });
        }
    }
    let mut announce = Vec::with_capacity(state.announce.len());
    for (i, text) in state.announce.iter().enumerate() {
        if let Some(ip) = address(text, format!("announce[{i}]"), &mut errors) {
            announce.push(ip);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let set = ServiceSet { services, announce };
    set.validate()?;
    Ok(set)
}

fn invalid(errors: &[FieldError]) -> Status {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
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
            let set = to_service_set(&state).map_err(|errors| ("invalid", invalid(&errors)))?;
            let report = programmer.apply(&set).map_err(|e| match e {
                WriteError::Capacity { .. } => {
                    ("capacity", Status::resource_exhausted(e.to_string()))
                }
                WriteError::Invalid(errors) => ("invalid", invalid(&errors)),
                other => ("error", Status::internal(other.to_string())),
            })?;
            applied.generation = state.generation;
            applied.lease = (state.announce_lease_ms > 0)
                .then(|| Duration::from_millis(state.announce_lease_ms.into()));
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
            features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
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
                protocol: if s.protocol == "TCP" {
                    v1::Protocol::Tcp
                } else {
                    v1::Protocol::Udp
                } as i32,
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
