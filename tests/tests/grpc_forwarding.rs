//! The real agent binary serving gRPC over mutual TLS inside the load balancer's namespace, the
//! controller's agent client programming it: traffic follows an apply, moves with an update and
//! stops with a removal; health, readiness and metrics tell the truth.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::mpsc,
    time::Duration,
};

use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_controller::agents::Agents;
use fulgur_proto::v1;
use fulgur_tests::{
    echo::tcp_exchange,
    netns::{NetNs, in_netns, unique_token},
    pki::Pki,
    topology::{AgentProcess, LB_IFACE, Source, Topology},
};

const GRPC: &str = "127.0.0.1:50051";
const METRICS: &str = "127.0.0.1:9464";

/// A desired state for the controller thread, and where it answers once the agents run it.
type Command = (Vec<v1::Service>, mpsc::Sender<Result<u64, String>>);

/// The controller side, on a thread inside `ns` (so its sockets live there): each command is a
/// desired state, answered once every agent runs it.
fn controller_in(ns: &NetNs, url: String, pki: &Pki) -> mpsc::Sender<Command> {
    let (commands, inbox) =
        mpsc::channel::<(Vec<v1::Service>, mpsc::Sender<Result<u64, String>>)>();
    let tls = pki.client_tls(true);
    let path = ns.path();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).unwrap();
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) },
            0
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let agents = Agents::spawn(&[url], Some(tls)).unwrap();
            while let Ok((services, reply)) = inbox.recv() {
                let generation = agents.set_desired(services);
                let result = if agents
                    .wait_synced(generation, Duration::from_secs(20))
                    .await
                {
                    Ok(generation)
                } else {
                    Err(format!("{:?}", agents.states()))
                };
                let _ = reply.send(result);
            }
        });
    });
    commands
}

fn apply(controller: &mpsc::Sender<Command>, services: Vec<v1::Service>) -> u64 {
    let (reply, answer) = mpsc::channel();
    controller.send((services, reply)).unwrap();
    answer
        .recv()
        .unwrap()
        .unwrap_or_else(|states| panic!("agents not in sync: {states}"))
}

fn web(topology: &Topology, backends: &[usize]) -> Vec<v1::Service> {
    let backends: Vec<v1::Backend> = backends
        .iter()
        .map(|i| v1::Backend {
            address: topology.backends[*i].addr.to_string(),
            port: 8080,
            weight: 1,
            remote: false,
        })
        .collect();
    vec![v1::Service {
        vip: "192.0.2.10".into(),
        port: 80,
        protocol: v1::Protocol::Tcp as i32,
        backends,
        reject_weight: 0,
    }]
}

/// One plain HTTP/1.1 GET from inside `ns`: (status line, body).
fn http_get(ns: &NetNs, addr: &str, path: &str) -> (String, String) {
    let (addr, path) = (addr.parse::<SocketAddr>().unwrap(), path.to_owned());
    in_netns(ns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: fulgur\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        Ok((
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        ))
    })
    .unwrap()
}

#[test]
fn a_controller_programs_the_agent_over_mutual_tls() {
    let topology = Topology::new(2, XdpAttachMode::Generic).expect("topology");
    let _servers = topology
        .start_echo_servers(8080, false)
        .expect("echo servers");
    let pki = Pki::generate("fulgur test CA").unwrap();
    let dir = std::env::temp_dir().join(unique_token("fulgur-pki-"));
    let files = pki.write_to(&dir).unwrap();
    let source = Source::Grpc {
        listen: GRPC.parse().unwrap(),
        tls: Some(&files),
        metrics: Some(METRICS.parse().unwrap()),
    };
    let agent = AgentProcess::start(&topology.lb, LB_IFACE, topology.mode, source).expect("agent");
    let controller = controller_in(&topology.lb, format!("https://{GRPC}"), &pki);
    let vip = topology.vip(80);
    let served = |n: usize| {
        in_netns(&topology.client, move || {
            (0..n)
                .map(|i| tcp_exchange(vip, format!("hello {i}").as_bytes()))
                .collect::<anyhow::Result<Vec<_>>>()
        })
    };

    // Apply: traffic reaches both backends.
    let first = apply(&controller, web(&topology, &[0, 1]));
    let names = served(60).unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    assert!(
        names.iter().any(|n| n == "backend-0") && names.iter().any(|n| n == "backend-1"),
        "{names:?}"
    );
    let backend_1_before = names.iter().filter(|n| *n == "backend-1").count();

    // Update: new connections follow.
    let second = apply(&controller, web(&topology, &[1]));
    assert!(second > first);
    let names = served(30).unwrap();
    assert!(names.iter().all(|n| n == "backend-1"), "{names:?}");

    // Metrics and readiness, scraped inside the namespace.
    let (status, _) = http_get(&topology.lb, METRICS, "/ready");
    assert!(status.contains("200"), "{status}");
    let (status, body) = http_get(&topology.lb, METRICS, "/healthz");
    assert!(
        status.contains("200") && body == "ok\n",
        "{status} {body:?}"
    );
    let (status, metrics) = http_get(&topology.lb, METRICS, "/metrics");
    assert!(status.contains("200"), "{status}");
    for expected in [
        format!("fulgur_applied_generation {second}"),
        "fulgur_attached{iface=\"lb-cl\",mode=\"generic\"} 1".to_owned(),
        "fulgur_apply_total{result=\"ok\"} 2".to_owned(),
        "fulgur_service_packets_total{service=\"TCP 192.0.2.10:80\"}".to_owned(),
        format!(
            "fulgur_backend_new_flows_total{{service=\"TCP 192.0.2.10:80\",backend=\"203.0.113.6:8080\"}} {}",
            backend_1_before + 30
        ),
    ] {
        assert!(
            metrics.contains(&expected),
            "{expected:?} missing from:\n{metrics}"
        );
    }

    // grpc.health.v1 over the same mutual TLS.
    let tls = pki.client_tls(true);
    let status = in_netns(&topology.lb, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("https://{GRPC}"))?
                .tls_config(tls)?
                .connect()
                .await?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let request = tonic_health::pb::HealthCheckRequest {
                service: "fulgur.dataplane.v1.Dataplane".into(),
            };
            let status = health.check(request).await?.into_inner().status;
            // Server reflection lists the service in both versions, so generic clients (grpcurl
            // speaks v1, many others only v1alpha) can call it.
            let listed = (
                reflection_v1(channel.clone()).await?,
                reflection_v1alpha(channel).await?,
            );
            anyhow::Ok((status, listed))
        })
    })
    .unwrap();
    let (status, (listed_v1, listed_v1alpha)) = status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    for (version, listed) in [("v1", listed_v1), ("v1alpha", listed_v1alpha)] {
        assert!(
            listed.iter().any(|s| s == "fulgur.dataplane.v1.Dataplane"),
            "reflection {version} lists {listed:?}"
        );
    }

    // Removal: the service stops answering.
    apply(&controller, vec![]);
    let refused = in_netns(&topology.client, move || {
        Ok(std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(1)).is_err())
    })
    .unwrap();
    assert!(refused, "the removed service still answered");
    let _ = std::fs::remove_dir_all(dir);
}

/// The services grpc.reflection.v1 lists.
async fn reflection_v1(channel: tonic::transport::Channel) -> anyhow::Result<Vec<String>> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream_once(request))
        .await?
        .into_inner();
    match responses.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected reflection v1 answer {other:?}"),
    }
}

/// The services grpc.reflection.v1alpha lists.
async fn reflection_v1alpha(channel: tonic::transport::Channel) -> anyhow::Result<Vec<String>> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream_once(request))
        .await?
        .into_inner();
    match responses.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected reflection v1alpha answer {other:?}"),
    }
}

/// A request stream of one message.
fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> {
    tonic::codegen::tokio_stream::iter([item])
}
