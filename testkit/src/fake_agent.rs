//! An in-process agent for the controller's tests: its own implementation of the
//! `fulgur.dataplane.v1.Dataplane` service over real gRPC (and TLS when given), keeping the
//! contract the controller relies on (see `dataplane.proto`):
//! - generations: a lower one is `FAILED_PRECONDITION`, the same one with the same state is a
//!   no-op, the same one with another state is `FAILED_PRECONDITION`;
//! - a state with a malformed field is `INVALID_ARGUMENT`, listing field paths, nothing applied;
//! - a state beyond [`Fake::capacity`] is `RESOURCE_EXHAUSTED`, naming `--max-services`;
//! - `Get` returns the applied state with its generation, and [`Fake::features`].
//!
//! The agent's own rules (every check of a service set, its map writes) are tested against the
//! real service in `tests/tests/grpc.rs`; this fake only has to answer as the contract says.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};

use fulgur_proto::v1::{
    self, ApplyRequest, ApplyResponse, GetRequest, GetResponse, StatsRequest, StatsResponse,
    dataplane_server::{Dataplane, DataplaneServer},
};
use tonic::{
    Request, Response, Status,
    transport::{Server, ServerTlsConfig, server::TcpIncoming},
};

#[derive(Clone, Default)]
pub struct Fake {
    /// Every state applied, in order (refused ones are not recorded).
    pub applied: Arc<Mutex<Vec<v1::DesiredState>>>,
    /// How many services fit (`None`: any number), as the real maps' `--max-services`.
    pub capacity: Arc<Mutex<Option<usize>>>,
    /// What `Get` lists in `features` (none, as an older agent, unless a test sets them).
    pub features: Arc<Mutex<Vec<String>>>,
    /// When each RPC (Apply, Get, Stats) arrived: each renews an agent's announce lease.
    pub rpcs: Arc<Mutex<Vec<Instant>>>,
    /// When each state in `applied` was applied.
    pub applied_at: Arc<Mutex<Vec<Instant>>>,
    /// Set: Apply never answers (a node gone off the network while the connection stays open).
    pub stall_apply: Arc<std::sync::atomic::AtomicBool>,
}

impl Fake {
    /// A fake that lists these features in `Get` (`fulgur_proto::features`).
    pub fn with_features(features: &[&str]) -> Fake {
        let fake = Fake::default();
        *fake.features.lock().unwrap() = features.iter().map(|f| (*f).to_owned()).collect();
        fake
    }

    /// A fake of a current agent: remote backends and announcement.
    pub fn current() -> Fake {
        use fulgur_proto::features;
        Fake::with_features(&[features::REMOTE_BACKENDS, features::ANNOUNCE])
    }
}

/// One served agent: what it applied last (a new agent starts at generation 0).
struct FakeService {
    fake: Fake,
    current: Mutex<v1::DesiredState>,
}

impl FakeService {
    fn new(fake: Fake) -> DataplaneServer<Self> {
        DataplaneServer::new(FakeService {
            fake,
            current: Mutex::new(v1::DesiredState::default()),
        })
    }
}

/// Field paths of values the contract says are malformed (ports, addresses, protocol).
fn malformed_fields(state: &v1::DesiredState) -> Vec<String> {
    let mut errors = Vec::new();
    let port = |port: u32| (1..=u32::from(u16::MAX)).contains(&port);
    let address = |text: &str| text.parse::<IpAddr>().is_ok();
    for (i, service) in state.services.iter().enumerate() {
        if !address(&service.vip) {
            errors.push(format!(
                "services[{i}].vip: {:?} is not an IP address",
                service.vip
            ));
        }
        if !port(service.port) {
            errors.push(format!(
                "services[{i}].port: {} is not a port (1-65535)",
                service.port
            ));
        }
        if !matches!(
            v1::Protocol::try_from(service.protocol),
            Ok(v1::Protocol::Tcp | v1::Protocol::Udp)
        ) {
            errors.push(format!(
                "services[{i}].protocol: must be PROTOCOL_TCP or PROTOCOL_UDP"
            ));
        }
        for (j, backend) in service.backends.iter().enumerate() {
            if !address(&backend.address) {
                errors.push(format!(
                    "services[{i}].backends[{j}].address: {:?} is not an IP address",
                    backend.address
                ));
            }
            if !port(backend.port) {
                errors.push(format!(
                    "services[{i}].backends[{j}].port: {} is not a port (1-65535)",
                    backend.port
                ));
            }
        }
    }
    errors
}

#[tonic::async_trait]
impl Dataplane for FakeService {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        if self
            .fake
            .stall_apply
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Never received: no lease renewed, nothing applied.
            std::future::pending::<()>().await;
        }
        self.fake.rpcs.lock().unwrap().push(Instant::now());
        let state = request
            .into_inner()
            .state
            .ok_or_else(|| Status::invalid_argument("state: required"))?;
        let mut current = self.current.lock().unwrap();
        if state.generation < current.generation {
            return Err(Status::failed_precondition(format!(
                "generation {} is older than the applied generation {}",
                state.generation, current.generation
            )));
        }
        if state.generation == current.generation && current.generation != 0 {
            if state == *current {
                return Ok(Response::new(ApplyResponse {
                    applied_generation: current.generation,
                    unchanged: current.services.len() as u32,
                    ..Default::default()
                }));
            }
            return Err(Status::failed_precondition(format!(
                "generation {} was already applied with a different state",
                state.generation
            )));
        }
        let errors = malformed_fields(&state);
        if !errors.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{} invalid field(s), nothing applied:\n{}",
                errors.len(),
                errors.join("\n")
            )));
        }
        if let Some(capacity) = *self.fake.capacity.lock().unwrap()
            && state.services.len() > capacity
        {
            return Err(Status::resource_exhausted(format!(
                "{} services needed, capacity is {capacity} (raise --max-services)",
                state.services.len()
            )));
        }
        let response = ApplyResponse {
            applied_generation: state.generation,
            added: state.services.len() as u32,
            ..Default::default()
        };
        self.fake.applied.lock().unwrap().push(state.clone());
        self.fake.applied_at.lock().unwrap().push(Instant::now());
        *current = state;
        Ok(Response::new(response))
    }

    async fn get(&self, _request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.fake.rpcs.lock().unwrap().push(Instant::now());
        let state = self.current.lock().unwrap().clone();
        let features = self.fake.features.lock().unwrap().clone();
        Ok(Response::new(GetResponse {
            state: Some(state),
            features,
        }))
    }

    /// The applied services with no traffic: a fake has no packets to count.
    async fn stats(
        &self,
        _request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        self.fake.rpcs.lock().unwrap().push(Instant::now());
        let current = self.current.lock().unwrap();
        let services = current
            .services
            .iter()
            .map(|service| v1::ServiceStats {
                vip: service.vip.clone(),
                port: service.port,
                protocol: service.protocol,
                traffic: Some(v1::Traffic::default()),
                backends: service
                    .backends
                    .iter()
                    .map(|backend| v1::BackendStats {
                        address: backend.address.clone(),
                        port: backend.port,
                        traffic: Some(v1::Traffic::default()),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(StatsResponse {
            counters: Default::default(),
            services,
        }))
    }
}

/// Serves the fake on a loopback port; the server runs until the test ends.
pub async fn serve(fake: Fake, tls: Option<ServerTlsConfig>) -> SocketAddr {
    serve_dataplane(FakeService::new(fake), tls).await
}

/// Serves any implementation of the Dataplane service on a loopback port, with TLS when given
/// (the agent's own service in its tests, the fake here); the server runs until the test ends.
pub async fn serve_dataplane<S: Dataplane>(
    service: DataplaneServer<S>,
    tls: Option<ServerTlsConfig>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).unwrap();
    }
    let router = server.add_service(service);
    tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
    addr
}

/// Serves on `addr` until `stop` resolves (to restart an agent on the same address).
pub async fn serve_until(fake: Fake, addr: SocketAddr, stop: tokio::sync::oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let router = Server::builder().add_service(FakeService::new(fake));
    tokio::spawn(async move {
        let _ = router
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stop.await;
            })
            .await;
    });
}
