//! End to end in standalone mode: the controller binary reads a folder of Gateway API manifests
//! and programs the agent binary over mutual TLS. Traffic follows the YAML: routes, weights,
//! EndpointSlice changes, deletion; the status file tells the truth at every step; a typo keeps
//! the last good state.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::{TcpSession, UdpFlow, tcp_exchange},
    netns::{in_netns, unique_token},
    pki::Pki,
    topology::{AgentProcess, CLIENT, LB_IFACE, Source, Topology},
};

const GRPC: &str = "127.0.0.1:50061";
const CONTROLLER_METRICS: &str = "127.0.0.1:9191";

/// The demo namespace's objects; echo-a's EndpointSlice holds `slice_a`, echo-b's `backend_1`.
/// echo-a's port is unnamed, so its slice port is named `""`, as the EndpointSlice controller
/// writes it.
fn manifests(backend_1: &str, weights: (u32, u32), slice_a: &[&str]) -> String {
    let endpoints = |addresses: &[&str]| {
        addresses
            .iter()
            .map(|a| {
                format!(
                    "- addresses: [{a}]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                     nodeName: lb\n  zone: zone-a\n"
                )
            })
            .collect::<String>()
    };
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: fulgur}}
spec: {{controllerName: fulgur.dev/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: demo}}
spec:
  gatewayClassName: fulgur
  addresses: [{{type: IPAddress, value: 192.0.2.10}}]
  listeners:
  - {{name: tcp, port: 80, protocol: TCP}}
  - {{name: udp, port: 53, protocol: UDP}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: UDPRoute
metadata: {{name: dns, namespace: demo}}
spec:
  parentRefs: [{{name: gw, sectionName: udp}}]
  rules: [{{backendRefs: [{{name: echo-b, port: 8080}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-a, namespace: demo}}
spec: {{ports: [{{port: 8080, protocol: TCP, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-b, namespace: demo}}
spec: {{ports: [{{name: echo, port: 8080}}, {{name: echo-udp, port: 8080, protocol: UDP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-a, namespace: demo, labels: {{kubernetes.io/service-name: echo-a}}}}
addressType: IPv4
ports: [{{name: "", port: 8080, protocol: TCP}}]
endpoints:
{}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-b, namespace: demo, labels: {{kubernetes.io/service-name: echo-b}}}}
addressType: IPv4
ports: [{{name: echo, port: 8080}}, {{name: echo-udp, port: 8080, protocol: UDP}}]
endpoints:
{}"#,
        endpoints(slice_a),
        endpoints(&[backend_1]),
    ) + &route(weights)
}

fn route(weights: (u32, u32)) -> String {
    format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {{name: web, namespace: demo}}
spec:
  parentRefs: [{{name: gw, sectionName: tcp}}]
  rules: [{{backendRefs: [{{name: echo-a, port: 8080, weight: {}}}, {{name: echo-b, port: 8080, weight: {}}}]}}]
"#,
        weights.0, weights.1
    )
}

/// Conditions of `kind`/`name` in the status file, as "Type=Status/Reason".
fn conditions(status_file: &Path, kind: &str, name: &str) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(status_file) else {
        return vec![];
    };
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let Ok(value) = <serde_yaml::Value as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        if value["kind"] != kind || value["metadata"]["name"] != name {
            continue;
        }
        let lists = [
            &value["status"]["conditions"],
            &value["status"]["parents"][0]["conditions"],
        ];
        for list in lists {
            for c in list.as_sequence().into_iter().flatten() {
                out.push(format!(
                    "{}={}/{}",
                    c["type"].as_str().unwrap_or(""),
                    c["status"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                ));
            }
        }
    }
    out
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn standalone_controller_and_agent_follow_the_manifests() {
    let topology = Topology::new(2, XdpAttachMode::Generic).expect("topology");
    let _servers = topology
        .start_echo_servers(8080, false)
        .expect("echo servers");
    let (b0, b1) = (
        topology.backends[0].addr.to_string(),
        topology.backends[1].addr.to_string(),
    );
    let work = std::env::temp_dir().join(unique_token("fulgur-standalone-"));
    let manifest_dir = work.join("manifests");
    std::fs::create_dir_all(&manifest_dir).unwrap();
    let status_file: PathBuf = work.join("status.yaml");
    let pki = Pki::generate("fulgur test CA").unwrap();
    let files = pki.write_to(&work.join("pki")).unwrap();
    let write = |text: String| std::fs::write(manifest_dir.join("demo.yaml"), text).unwrap();
    write(manifests(&b1, (1, 1), &[&b0]));

    let source = Source::Grpc {
        listen: GRPC.parse().unwrap(),
        tls: Some(&files),
        metrics: None,
    };
    let agent = AgentProcess::start(&topology.lb, LB_IFACE, topology.mode, source).expect("agent");
    let log = work.join("controller.log");
    let _controller = Controller(
        topology
            .lb
            .command(fulgur_tests::controller_binary())
            .args(["--provider", "file", "--manifests"])
            .arg(&manifest_dir)
            .arg("--status-file")
            .arg(&status_file)
            .args(["--agent", &format!("https://{GRPC}"), "--tls-cert"])
            .arg(&files.client_cert)
            .arg("--tls-key")
            .arg(&files.client_key)
            .arg("--ca")
            .arg(&files.ca)
            .args(["--metrics-listen", CONTROLLER_METRICS])
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .expect("controller"),
    );
    let controller_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let vip = topology.vip(80);
    let backends_seen = |n: usize| {
        in_netns(&topology.client, move || {
            let mut seen = std::collections::BTreeMap::<String, usize>::new();
            for i in 0..n {
                *seen
                    .entry(tcp_exchange(vip, format!("m{i}").as_bytes())?)
                    .or_default() += 1;
            }
            Ok(seen)
        })
    };

    // 1. YAML in: TCP and UDP flow; the status file shows everything accepted.
    eventually("the TCPRoute is accepted", || {
        conditions(&status_file, "TCPRoute", "web").contains(&"Accepted=True/Accepted".to_owned())
    });
    eventually("traffic reaches both backends", || {
        backends_seen(40).is_ok_and(|s| s.len() == 2)
    });
    let udp = SocketAddr::new(vip.ip(), 53);
    let answer = in_netns(&topology.client, move || {
        UdpFlow::new(SocketAddr::from((CLIENT, 35000)), udp)?.exchange(b"query")
    })
    .unwrap();
    assert_eq!(answer, "backend-1", "the UDPRoute sends to echo-b");
    let route = conditions(&status_file, "TCPRoute", "web");
    assert!(
        route.contains(&"ResolvedRefs=True/ResolvedRefs".to_owned()),
        "{route:?}"
    );
    assert!(
        conditions(&status_file, "Gateway", "gw")
            .contains(&"Programmed=True/Programmed".to_owned())
    );
    // The controller's metrics agree: one agent in sync, two services desired.
    let metrics = in_netns(&topology.lb, || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(CONTROLLER_METRICS)?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .unwrap();
    for line in [
        "fulgur_controller_agents{state=\"synced\"} 1",
        "fulgur_controller_desired_services 2",
        "fulgur_controller_leader 1",
        // web's two backendRefs and dns's one reach ready endpoints.
        "fulgur_controller_backend_refs{state=\"ready\"} 3",
        "fulgur_controller_backend_refs{state=\"no_endpoints\"} 0",
        // Read once at start; reading made no event that read again.
        "fulgur_controller_manifest_reads_total 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // A long-lived session to backend-1, which must survive the next steps.
    let mut session = in_netns(&topology.client, move || {
        for _ in 0..50 {
            let mut s = TcpSession::connect(vip)?;
            if s.exchange(b"hi")? == "backend-1" {
                return Ok(s);
            }
        }
        anyhow::bail!("no session landed on backend-1")
    })
    .unwrap();

    // 2. Weights: echo-b gets weight 0; new connections all go to echo-a.
    write(manifests(&b1, (1, 0), &[&b0]));
    eventually("weight 0 takes effect", || {
        backends_seen(20).is_ok_and(|s| s.keys().all(|b| b == "backend-0"))
    });

    // 3. Scale echo-a's EndpointSlice from backend-0 to backend-1: traffic leaves the removed
    // endpoint, and the session on backend-1 carries on.
    write(manifests(&b1, (1, 0), &[&b1]));
    eventually("the removed endpoint gets no traffic", || {
        backends_seen(20).is_ok_and(|s| s.keys().all(|b| b == "backend-1"))
    });
    assert_eq!(session.exchange(b"still there").unwrap(), "backend-1");

    // A typo: reported with file and line, and the last good state keeps serving.
    std::fs::write(manifest_dir.join("typo.yaml"), "apiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {name: x}\nspec: {parentRef: []}\n").unwrap();
    eventually("the typo is reported", || {
        controller_log().contains("typo.yaml:4")
    });
    assert!(backends_seen(5).is_ok(), "a typo withdrew the service");
    std::fs::remove_file(manifest_dir.join("typo.yaml")).unwrap();

    // 4. Delete the route: new connections are no longer forwarded; its status goes away.
    let text = manifests(&b1, (1, 0), &[&b1]);
    write(
        text[..text
            .find("---\napiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute")
            .unwrap()]
            .to_owned(),
    );
    eventually("the TCPRoute leaves the status file", || {
        conditions(&status_file, "TCPRoute", "web").is_empty()
    });
    eventually("the service stops answering", || {
        in_netns(&topology.client, move || {
            Ok(std::net::TcpStream::connect_timeout(&vip, Duration::from_millis(500)).is_err())
        })
        .unwrap()
    });
    assert!(!agent.log_text().is_empty());
    let _ = std::fs::remove_dir_all(&work);
}
