//! The agent's real `DataplaneService` in front of a fake `Programmer` that records what it is
//! asked to apply, for the tests of the agent's gRPC service. (The controller's tests use
//! `fulgur_testkit::fake_agent`, which needs no eBPF build.)

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fulgur_agent::{
    config::{Protocol, ServiceSet, ValidServiceSet},
    grpc::{DataplaneService, Programmer},
    inspect::{self, BackendView, ServiceView, Traffic},
    metrics::Metrics,
    writer::{ApplyReport, WriteError},
};
use fulgur_proto::v1::dataplane_server::DataplaneServer;
use tonic::transport::ServerTlsConfig;

#[derive(Clone, Default)]
pub struct Fake {
    pub applied: Arc<Mutex<Vec<ServiceSet>>>,
    /// How many services fit (`None`: any number), as the real maps' `--max-services`.
    pub capacity: Arc<Mutex<Option<usize>>>,
    /// How many times the lease ran out (the announced addresses were withdrawn).
    pub withdrawals: Arc<Mutex<usize>>,
    /// Every lease handed to the dataplane, in order.
    pub leases: Arc<Mutex<Vec<Option<Duration>>>>,
}

impl Programmer for Fake {
    fn apply(&mut self, set: &ValidServiceSet) -> Result<ApplyReport, WriteError> {
        if let Some(capacity) = *self.capacity.lock().unwrap()
            && set.services.len() > capacity
        {
            return Err(WriteError::Capacity {
                what: "services",
                needed: set.services.len(),
                capacity: capacity as u32,
                flag: "max-services",
            });
        }
        self.applied.lock().unwrap().push(ServiceSet::clone(set));
        Ok(ApplyReport {
            added: set.services.len(),
            ..Default::default()
        })
    }

    fn withdraw_announced(&mut self) -> Result<(), WriteError> {
        *self.withdrawals.lock().unwrap() += 1;
        Ok(())
    }

    fn renew_announce_lease(&mut self, lease: Option<Duration>) -> Result<(), WriteError> {
        self.leases.lock().unwrap().push(lease);
        Ok(())
    }

    fn stats(&self) -> Result<inspect::Report, String> {
        let traffic = Traffic {
            packets: 10,
            bytes: 1000,
            new_flows: 2,
            rejects: 1,
        };
        Ok(inspect::Report {
            services: vec![ServiceView {
                vip: "192.0.2.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                id: 0,
                table_size: 13,
                reject_slots: 0,
                backends: vec![BackendView {
                    address: "203.0.113.2".parse().unwrap(),
                    port: 8080,
                    id: 0,
                    slots: 13,
                    traffic,
                }],
                traffic,
            }],
            counters: [("redirect", 10)].into_iter().collect(),
            flows: vec![],
        })
    }
}

/// Serves the agent's service with this fake behind it on a loopback port, as the agent runs by
/// default (`--snat remote`: backends on other nodes accepted).
pub async fn serve(fake: Fake, tls: Option<ServerTlsConfig>) -> SocketAddr {
    serve_with_snat(fake, tls, true).await
}

/// As [`serve`]; `snat` false is `--snat never` (remote backends refused).
pub async fn serve_with_snat(fake: Fake, tls: Option<ServerTlsConfig>, snat: bool) -> SocketAddr {
    let service = DataplaneServer::new(DataplaneService::new(fake, Metrics::new(), snat));
    fulgur_testkit::fake_agent::serve_dataplane(service, tls).await
}
