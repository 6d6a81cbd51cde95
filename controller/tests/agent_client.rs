//! The controller's agent client against in-process agents: full state on connect and on
//! change, re-sync after an agent restart, generations that only grow, unreachable agents
//! reported and retried.

use std::{net::SocketAddr, time::Duration};

use fulgur_controller::{
    agents::{Agents, SyncState},
    model::Dataplane,
};
use fulgur_proto::v1::{self, GetRequest, dataplane_client::DataplaneClient};
use fulgur_testkit::fake_agent::{Fake, serve, serve_until};

const WAIT: Duration = Duration::from_secs(10);

fn services(backend_port: u32) -> Vec<v1::Service> {
    vec![v1::Service {
        vip: "192.0.2.10".into(),
        port: 80,
        protocol: v1::Protocol::Tcp as i32,
        backends: vec![v1::Backend {
            address: "203.0.113.2".into(),
            port: backend_port,
            weight: 1,
            remote: false,
        }],
        reject_weight: 0,
    }]
}

async fn agent_state(addr: SocketAddr) -> v1::DesiredState {
    let mut client = DataplaneClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .get(GetRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap()
}

/// A loopback address nobody listens on (yet).
async fn free_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn pushes_on_connect_and_on_every_change() {
    let fakes = [Fake::default(), Fake::default()];
    let addrs = [
        serve(fakes[0].clone(), None).await,
        serve(fakes[1].clone(), None).await,
    ];
    let agents = Agents::spawn(&addrs.map(|a| format!("http://{a}")), None).unwrap();
    let first = agents.set_desired(services(8080));
    assert!(
        agents.wait_synced(first, WAIT).await,
        "{:?}",
        agents.states()
    );
    let second = agents.set_desired(services(8081));
    assert!(second > first);
    assert!(
        agents.wait_synced(second, WAIT).await,
        "{:?}",
        agents.states()
    );
    for (fake, addr) in fakes.iter().zip(addrs) {
        let applied = fake.applied.lock().unwrap().clone();
        assert_eq!(applied.last().unwrap().services[0].backends[0].port, 8081);
        assert_eq!(agent_state(addr).await.generation, second);
    }
}

#[tokio::test]
async fn a_restarted_agent_gets_the_full_state_again() {
    let addr = free_addr().await;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    serve_until(Fake::default(), addr, stopped).await;
    let agents = Agents::spawn(&[format!("http://{addr}")], None).unwrap();
    let generation = agents.set_desired(services(8080));
    assert!(
        agents.wait_synced(generation, WAIT).await,
        "{:?}",
        agents.states()
    );

    // The agent goes away and comes back empty on the same address.
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reborn = Fake::default();
    let (_keep, stopped) = tokio::sync::oneshot::channel::<()>();
    serve_until(reborn.clone(), addr, stopped).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while reborn.applied.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let applied = reborn.applied.lock().unwrap().clone();
    assert_eq!(
        applied.len(),
        1,
        "the restarted agent was not re-synced: {:?}",
        agents.states()
    );
    assert_eq!(applied[0].services[0].backends[0].port, 8080);
    assert!(agent_state(addr).await.generation >= generation);
}

#[tokio::test]
async fn generations_go_above_what_the_agent_already_runs() {
    let addr = serve(Fake::default(), None).await;
    // Someone (a controller with a clock far ahead) applied a huge generation.
    let far_future = u64::MAX / 2;
    let mut client = DataplaneClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .apply(v1::ApplyRequest {
            state: Some(v1::DesiredState {
                generation: far_future,
                services: vec![],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let agents = Agents::spawn(&[format!("http://{addr}")], None).unwrap();
    agents.set_desired(services(8080));
    assert!(
        agents.wait_synced(far_future + 1, WAIT).await,
        "{:?}",
        agents.states()
    );
    let state = agent_state(addr).await;
    assert_eq!(state.services, services(8080));
}

#[tokio::test]
async fn an_unreachable_agent_is_reported_then_synced_when_it_appears() {
    let addr = free_addr().await;
    let url = format!("http://{addr}");
    let agents = Agents::spawn(std::slice::from_ref(&url), None).unwrap();
    let generation = agents.set_desired(services(8080));
    tokio::time::sleep(Duration::from_millis(500)).await;
    match &agents.states()[&url] {
        SyncState::Failed { error } => assert!(error.contains("connect"), "{error}"),
        other => panic!("expected a connect failure, got {other:?}"),
    }
    let (_keep, stopped) = tokio::sync::oneshot::channel::<()>();
    serve_until(Fake::default(), addr, stopped).await;
    assert!(
        agents.wait_synced(generation, WAIT).await,
        "{:?}",
        agents.states()
    );
}

#[tokio::test]
async fn an_invalid_state_is_reported_not_retried_in_a_loop() {
    let fake = Fake::default();
    let addr = serve(fake.clone(), None).await;
    let url = format!("http://{addr}");
    let agents = Agents::spawn(std::slice::from_ref(&url), None).unwrap();
    let mut bad = services(8080);
    bad[0].port = 0;
    agents.set_desired(bad);
    tokio::time::sleep(Duration::from_millis(500)).await;
    match &agents.states()[&url] {
        SyncState::Refused {
            error,
            no_resources: false,
        } => assert!(error.contains("services[0].port"), "{error}"),
        other => panic!("expected the agent's refusal, got {other:?}"),
    }
    assert!(fake.applied.lock().unwrap().is_empty());
    assert!(matches!(agents.dataplane(), Dataplane::Invalid(e) if e.contains("services[0].port")));
    let good = agents.set_desired(services(8080));
    assert!(
        agents.wait_synced(good, WAIT).await,
        "{:?}",
        agents.states()
    );
}

#[tokio::test]
async fn nothing_is_pushed_before_a_state_is_set() {
    let fake = Fake::default();
    let addr = serve(fake.clone(), None).await;
    let url = format!("http://{addr}");
    let agents = Agents::spawn(std::slice::from_ref(&url), None).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fake.applied.lock().unwrap().is_empty(),
        "a default (empty) state was pushed"
    );
    let generation = agents.set_desired(services(8080));
    assert!(
        agents.wait_synced(generation, WAIT).await,
        "{:?}",
        agents.states()
    );
    assert_eq!(fake.applied.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_state_beyond_the_agents_maps_is_reported_as_no_resources() {
    let fake = Fake::default();
    *fake.capacity.lock().unwrap() = Some(0);
    let addr = serve(fake.clone(), None).await;
    let url = format!("http://{addr}");
    let agents = Agents::spawn(std::slice::from_ref(&url), None).unwrap();
    assert!(matches!(agents.dataplane(), Dataplane::Pending(_)));
    agents.set_desired(services(8080));
    tokio::time::sleep(Duration::from_millis(500)).await;
    match agents.dataplane() {
        Dataplane::NoResources(e) => assert!(e.contains("max-services"), "{e}"),
        other => panic!("expected NoResources, got {other:?}"),
    }
    *fake.capacity.lock().unwrap() = None;
    let good = agents.set_desired(services(8081));
    assert!(
        agents.wait_synced(good, WAIT).await,
        "{:?}",
        agents.states()
    );
    assert_eq!(agents.dataplane(), Dataplane::Programmed);
}

#[tokio::test]
async fn an_address_that_does_not_match_the_tls_setting_is_refused() {
    for url in ["https://127.0.0.1:50051", "127.0.0.1:50051"] {
        let error = Agents::spawn(&[url.to_owned()], None).err().expect(url);
        assert!(error.to_string().contains("http://"), "{error}");
    }
    let tls = tonic::transport::ClientTlsConfig::new();
    let error = Agents::spawn(&["http://127.0.0.1:50051".to_owned()], Some(tls))
        .err()
        .expect("plaintext address with TLS");
    assert!(error.to_string().contains("https://"), "{error}");
}
