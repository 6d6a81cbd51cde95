//! The gRPC service in process, over loopback: every RPC and error, mutual TLS and its refusals.
//! The kernel is replaced by a fake `Programmer` that records what it was asked to apply.

use std::net::SocketAddr;

use fulgur_proto::v1::{
    self, ApplyRequest, DesiredState, GetRequest, StatsRequest, dataplane_client::DataplaneClient,
};
use fulgur_tests::{
    fake_programmer::{Fake, serve, serve_with_snat},
    pki::Pki,
};
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};

async fn plain_client(addr: SocketAddr) -> DataplaneClient<Channel> {
    DataplaneClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn service(
    vip: &str,
    port: u32,
    protocol: v1::Protocol,
    backends: &[(&str, u32, u32)],
) -> v1::Service {
    v1::Service {
        vip: vip.into(),
        port,
        protocol: protocol as i32,
        backends: backends
            .iter()
            .map(|(address, port, weight)| v1::Backend {
                address: (*address).into(),
                port: *port,
                weight: *weight,
                remote: false,
            })
            .collect(),
        reject_weight: 0,
    }
}

fn state(generation: u64, services: Vec<v1::Service>) -> ApplyRequest {
    ApplyRequest {
        state: Some(DesiredState {
            generation,
            services,
            ..Default::default()
        }),
    }
}

fn web(generation: u64) -> ApplyRequest {
    state(
        generation,
        vec![service(
            "192.0.2.10",
            80,
            v1::Protocol::Tcp,
            &[("203.0.113.2", 8080, 1)],
        )],
    )
}

#[tokio::test]
async fn apply_get_and_stats() {
    let fake = Fake::default();
    let mut client = plain_client(serve(fake.clone(), None).await).await;

    let response = client.apply(web(5)).await.unwrap().into_inner();
    assert_eq!((response.applied_generation, response.added), (5, 1));
    assert_eq!(fake.applied.lock().unwrap().len(), 1);
    let set = fake.applied.lock().unwrap()[0].clone();
    assert_eq!(set.services[0].vip.to_string(), "192.0.2.10");
    assert_eq!(set.services[0].backends[0].weight, 1);

    // The same generation and state again: idempotent, nothing written.
    let again = client.apply(web(5)).await.unwrap().into_inner();
    assert_eq!(
        (again.applied_generation, again.unchanged, again.added),
        (5, 1, 0)
    );
    assert_eq!(fake.applied.lock().unwrap().len(), 1);

    let got = client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(got, web(5).state.unwrap());

    let stats = client.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.counters["redirect"], 10);
    assert_eq!(stats.services[0].backends[0].address, "203.0.113.2");
    assert_eq!(stats.services[0].traffic.unwrap().rejects, 1);
}

#[tokio::test]
async fn an_older_generation_is_refused() {
    let fake = Fake::default();
    let mut client = plain_client(serve(fake.clone(), None).await).await;
    client.apply(web(7)).await.unwrap();
    let status = client.apply(web(6)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("older than the applied generation 7"),
        "{}",
        status.message()
    );
    // The same generation with different content is refused too.
    let status = client.apply(state(7, vec![])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        fake.applied.lock().unwrap().len(),
        1,
        "refused states are not applied"
    );
}

#[tokio::test]
async fn every_invalid_field_is_reported_and_nothing_applied() {
    let fake = Fake::default();
    let mut client = plain_client(serve(fake.clone(), None).await).await;
    let too_many: Vec<(&str, u32, u32)> = vec![("203.0.113.2", 8080, 1); 1025];
    let request = state(
        1,
        vec![
            service(
                "192.0.2.10",
                0,
                v1::Protocol::Tcp,
                &[("2001:db8::1", 8080, 1)],
            ),
            service(
                "not-an-ip",
                80,
                v1::Protocol::Unspecified,
                &[("203.0.113.2", 70000, 2_000_000)],
            ),
            service("192.0.2.11", 80, v1::Protocol::Udp, &too_many),
        ],
    );
    let status = client.apply(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for path in [
        "services[0].port",
        "services[1].vip",
        "services[1].protocol",
        "services[1].backends[0].port",
        "services[1].backends[0].weight",
        "services[2].backends",
    ] {
        assert!(
            status.message().contains(path),
            "{path} missing from:\n{}",
            status.message()
        );
    }
    // Family mismatch and duplicates are checked once every field parses.
    let request = state(
        1,
        vec![
            service(
                "192.0.2.10",
                80,
                v1::Protocol::Tcp,
                &[("2001:db8::1", 8080, 1)],
            ),
            service(
                "192.0.2.10",
                80,
                v1::Protocol::Tcp,
                &[("203.0.113.2", 8080, 1)],
            ),
        ],
    );
    let status = client.apply(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("services[0].backends[0].address"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("duplicate service"),
        "{}",
        status.message()
    );
    let status = client
        .apply(ApplyRequest { state: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(fake.applied.lock().unwrap().is_empty(), "nothing applied");
}

fn announcing(generation: u64, announce: &[&str], lease_ms: u32) -> ApplyRequest {
    let mut request = web(generation);
    let state = request.state.as_mut().unwrap();
    state.announce = announce.iter().map(|a| (*a).to_owned()).collect();
    state.announce_lease_ms = lease_ms;
    request
}

#[tokio::test]
async fn remote_backends_are_accepted_and_listed_with_snat_on_by_default() {
    let fake = Fake::default();
    let mut client = plain_client(serve(fake.clone(), None).await).await;
    let features = client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .features;
    assert_eq!(features, ["announce", "remote-backends"]);
    let mut remote = web(1);
    remote.state.as_mut().unwrap().services[0].backends[0].remote = true;
    client.apply(remote).await.unwrap();
    let applied = fake.applied.lock().unwrap();
    assert!(
        applied[0].services[0].backends[0].remote,
        "applied as remote"
    );
}

#[tokio::test]
async fn announced_addresses_are_validated_applied_and_listed_with_the_feature() {
    let fake = Fake::default();
    // `--snat never`: no SNAT, so no remote backends.
    let mut client = plain_client(serve_with_snat(fake.clone(), None, false).await).await;
    let features = client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .features;
    assert_eq!(features, ["announce"], "no SNAT here: not remote-backends");

    let unparsable = announcing(1, &["192.0.2.10", "not-an-ip"], 0);
    let status = client.apply(unparsable).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .lines()
            .any(|l| l == "announce[1]: \"not-an-ip\" is not an IP address"),
        "{}",
        status.message()
    );
    // What parses is checked once everything parses.
    let bad = announcing(1, &["192.0.2.10", "ff02::1", "192.0.2.10"], 0);
    let status = client.apply(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for line in [
        "announce[1]: ff02::1 cannot be announced (not a unicast address)",
        "announce[2]: duplicate address 192.0.2.10",
    ] {
        assert!(
            status.message().lines().any(|l| l == line),
            "{line} missing from:\n{}",
            status.message()
        );
    }
    // A backend on another node needs SNAT, which this agent lacks: refused, not forwarded.
    let mut remote = web(1);
    remote.state.as_mut().unwrap().services[0].backends[0].remote = true;
    let status = client.apply(remote).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("services[0].backends[0].remote: this agent has no SNAT"),
        "{}",
        status.message()
    );
    assert!(fake.applied.lock().unwrap().is_empty(), "nothing applied");

    client
        .apply(announcing(2, &["192.0.2.10", "2001:db8::10"], 0))
        .await
        .unwrap();
    let applied = fake
        .applied
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .announce
        .clone();
    assert_eq!(
        applied,
        [
            "192.0.2.10".parse::<std::net::IpAddr>().unwrap(),
            "2001:db8::10".parse().unwrap()
        ]
    );
    let got = client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(got.announce, ["192.0.2.10", "2001:db8::10"]);
}

/// No RPC within the lease: the addresses are withdrawn at once and Get shows none; Get and
/// Stats renew a live lease but do not revive a lapsed one; the next Apply does.
#[tokio::test]
async fn the_announce_lease_withdraws_and_only_an_apply_revives() {
    use std::time::Duration;
    let fake = Fake::default();
    let mut client = plain_client(serve(fake.clone(), None).await).await;
    client
        .apply(announcing(1, &["192.0.2.10"], 300))
        .await
        .unwrap();
    // Renewed by Get and Stats every 100 ms: never withdrawn.
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if i % 2 == 0 {
            client.get(GetRequest {}).await.unwrap();
        } else {
            client.stats(StatsRequest {}).await.unwrap();
        }
    }
    assert_eq!(*fake.withdrawals.lock().unwrap(), 0, "renewed in time");
    let lease = Some(Duration::from_millis(300));
    assert_eq!(
        *fake.leases.lock().unwrap(),
        vec![lease; 9],
        "the Apply and each RPC after it renew the dataplane's lease"
    );
    // Silence for longer than the lease.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(*fake.withdrawals.lock().unwrap(), 1, "the lease ran out");
    let got = client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(got.generation, 1);
    assert!(got.announce.is_empty(), "lapsed: nothing announced {got:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert!(got.announce.is_empty(), "a Get does not revive it");
    assert_eq!(*fake.withdrawals.lock().unwrap(), 1, "withdrawn once");
    assert_eq!(
        fake.leases.lock().unwrap().len(),
        9,
        "a lapsed lease is not renewed in the dataplane"
    );

    // The same state again revives it (applied once more, not a no-op).
    let applies = fake.applied.lock().unwrap().len();
    client
        .apply(announcing(1, &["192.0.2.10"], 300))
        .await
        .unwrap();
    assert_eq!(fake.applied.lock().unwrap().len(), applies + 1);
    let got = client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(got.announce, ["192.0.2.10"]);

    // Lease 0: announced until told otherwise.
    client
        .apply(announcing(2, &["192.0.2.10"], 0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*fake.withdrawals.lock().unwrap(), 1, "no lease, no expiry");
    assert_eq!(
        fake.leases.lock().unwrap().last(),
        Some(&None),
        "the dataplane holds no lease either"
    );
}

async fn tls_client(
    addr: SocketAddr,
    pki: &Pki,
    identify: bool,
) -> Result<DataplaneClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(pki.client_tls(identify))?
        .connect()
        .await?;
    Ok(DataplaneClient::new(channel))
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_of_our_ca() {
    let pki = Pki::generate("fulgur test CA").unwrap();
    let addr = serve(Fake::default(), Some(pki.server_tls())).await;

    // A client certificate from our CA: served.
    let mut client = tls_client(addr, &pki, true).await.unwrap();
    client.apply(web(1)).await.unwrap();

    // No client certificate: the handshake or the first call fails.
    let refused = match tls_client(addr, &pki, false).await {
        Err(_) => true,
        Ok(mut c) => c.get(GetRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA (that trusts our server, so only the client side differs).
    let other = Pki::generate("another CA").unwrap();
    let mixed = Pki {
        ca_pem: pki.ca_pem.clone(),
        server_cert_pem: String::new(),
        server_key_pem: String::new(),
        client_cert_pem: other.client_cert_pem.clone(),
        client_key_pem: other.client_key_pem.clone(),
    };
    let refused = match tls_client(addr, &mixed, true).await {
        Err(_) => true,
        Ok(mut c) => c.get(GetRequest {}).await.is_err(),
    };
    assert!(refused, "a client certificate from another CA was served");

    // Plaintext against the TLS port fails too.
    let refused = match DataplaneClient::connect(format!("http://{addr}")).await {
        Err(_) => true,
        Ok(mut c) => c.get(GetRequest {}).await.is_err(),
    };
    assert!(refused, "a plaintext client was served");
}
