//! The standalone controller binary reads its manifest folder once at start and once per
//! edit: reading the files itself (open and access events) must not trigger the next read.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fulgur_testkit::process::{ChildInDir, free_local_addr};

const MANIFESTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: fulgur}
spec: {controllerName: fulgur.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: apps}
spec:
  gatewayClassName: fulgur
  addresses: [{type: IPAddress, value: 192.0.2.10}]
  listeners: [{name: tcp, port: 80, protocol: TCP}]
"#;

/// `fulgur_controller_manifest_reads_total`, or None while /metrics does not answer.
fn reads(metrics: SocketAddr) -> Option<u64> {
    let mut stream = TcpStream::connect_timeout(&metrics, Duration::from_secs(1)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("fulgur_controller_manifest_reads_total "))?
        .trim()
        .parse()
        .ok()
}

fn wait_for(metrics: SocketAddr, what: &str, check: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(n) = reads(metrics).filter(|n| check(*n)) {
            return n;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_idle_folder_is_read_once_and_an_edit_once_more() {
    let dir = std::env::temp_dir().join(format!("fulgur-reloads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/gateway.yaml"), MANIFESTS).unwrap();
    let metrics = free_local_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_fulgur-controller"))
        .args(["--provider", "file", "--insecure"])
        .arg("--manifests")
        .arg(dir.join("manifests"))
        .arg("--status-file")
        .arg(dir.join("status.yaml"))
        .args(["--metrics-listen", &metrics.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _controller = ChildInDir {
        child,
        dir: dir.clone(),
    };
    wait_for(metrics, "the first read", |n| n >= 1);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(reads(metrics), Some(1), "an idle folder is read once");

    // An edit (truncate and write: modify, then close-after-write) is one more read.
    std::fs::write(
        dir.join("manifests/gateway.yaml"),
        MANIFESTS.replace("port: 80", "port: 81"),
    )
    .unwrap();
    wait_for(metrics, "the read after the edit", |n| n >= 2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(reads(metrics), Some(2), "one edit, one read");
    let status = std::fs::read_to_string(dir.join("status.yaml")).unwrap();
    assert!(status.contains("kind: Gateway"), "{status}");
}
