//! `cargo xtask certs` makes certificates the real binaries accept: the agent (in a network
//! namespace of the test topology, documentation addresses only) serves mutual TLS with the
//! written agent certificate, the controller (standalone, `--provider file`) dials it with the
//! written controller certificate, and traffic follows the route it programs. A controller whose
//! certificate comes from another CA run is refused. Needs root and the built binaries
//! (`cargo xtask test` provides both).

use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::{
    echo::tcp_exchange,
    netns::{in_netns, unique_token},
    pki::PkiFiles,
    topology::{AgentProcess, LB_IFACE, Source, Topology},
};
use xtask::certs;

const GRPC: &str = "127.0.0.1:50071";

fn manifests(backend: &str) -> String {
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
  listeners: [{{name: tcp, port: 80, protocol: TCP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {{name: web, namespace: demo}}
spec:
  parentRefs: [{{name: gw}}]
  rules: [{{backendRefs: [{{name: echo, port: 8080}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec: {{ports: [{{name: echo, port: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo, namespace: demo, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports: [{{name: echo, port: 8080}}]
endpoints: [{{addresses: [{backend}], conditions: {{ready: true}}}}]
"#
    )
}

/// Whether the status file shows the Gateway `Programmed=True` (the agent took the state).
fn programmed(status_file: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(status_file) else {
        return false;
    };
    serde_yaml::Deserializer::from_str(&text).any(|doc| {
        let Ok(value) = <serde_yaml::Value as serde::Deserialize>::deserialize(doc) else {
            return false;
        };
        value["kind"] == "Gateway"
            && value["status"]["conditions"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Programmed" && c["status"] == "True")
    })
}

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_controller(
    topology: &Topology,
    manifest_dir: &Path,
    status_file: &Path,
    tls: &certs::Written,
    log: &Path,
) -> Controller {
    let _ = std::fs::remove_file(status_file);
    Controller(
        topology
            .lb
            .command(fulgur_tests::controller_binary())
            .args(["--provider", "file", "--manifests"])
            .arg(manifest_dir)
            .arg("--status-file")
            .arg(status_file)
            .args(["--agent", &format!("https://{GRPC}"), "--tls-cert"])
            .arg(&tls.controller_cert)
            .arg("--tls-key")
            .arg(&tls.controller_key)
            .arg("--ca")
            .arg(&tls.ca)
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the controller"),
    )
}

#[test]
fn xtask_certs_secure_the_real_agent_and_controller() {
    let topology = Topology::new(1, XdpAttachMode::Generic).expect("topology");
    let _servers = topology.start_echo_servers(8080, false).expect("echo");
    let work = std::env::temp_dir().join(unique_token("fulgur-certs-"));
    let manifest_dir = work.join("manifests");
    std::fs::create_dir_all(&manifest_dir).unwrap();
    std::fs::write(
        manifest_dir.join("demo.yaml"),
        manifests(&topology.backends[0].addr.to_string()),
    )
    .unwrap();
    let status_file = work.join("status.yaml");

    let good = certs::write(&work.join("certs"), &certs::Options::default()).unwrap();
    let other = certs::write(&work.join("other-ca"), &certs::Options::default()).unwrap();
    let agent_files = PkiFiles {
        ca: good.ca.clone(),
        server_cert: good.agent_cert.clone(),
        server_key: good.agent_key.clone(),
        client_cert: good.controller_cert.clone(),
        client_key: good.controller_key.clone(),
    };
    let source = Source::Grpc {
        listen: GRPC.parse().unwrap(),
        tls: Some(&agent_files),
        metrics: None,
    };
    let agent = AgentProcess::start(&topology.lb, LB_IFACE, topology.mode, source).expect("agent");

    // A controller holding another CA's certificate (and trusting that CA) gets nowhere.
    let log = work.join("controller-other.log");
    let stranger = start_controller(&topology, &manifest_dir, &status_file, &other, &log);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !programmed(&status_file),
        "a controller from another CA programmed the agent; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(stranger);

    // The certificates xtask wrote: the agent is programmed and traffic flows.
    let log = work.join("controller.log");
    let _controller = start_controller(&topology, &manifest_dir, &status_file, &good, &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !programmed(&status_file) {
        assert!(
            Instant::now() < deadline,
            "the Gateway was not Programmed in 20 s; controller log:\n{}\nagent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let vip = topology.vip(80);
    let answer = in_netns(&topology.client, move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tcp_exchange(vip, b"hello") {
                Ok(answer) => return Ok(answer),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .expect("traffic through the Gateway");
    assert_eq!(answer, "backend-0");
    let _ = std::fs::remove_dir_all(&work);
}
