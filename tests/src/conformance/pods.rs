//! The conformance backends ("pods") and the probes that talk to them.
//!
//! Each pod is one address on a backend namespace's host (203.0.113.64 and up, routed by the load
//! balancer to that host) running what the upstream echo image runs:
//! - TCP on [`TCP_PORT`]: the server speaks first with a greeting line, then answers `PING` with
//!   `PONG`, `IS_TLS` with `false` and `TEST` with a JSON line naming its namespace and pod;
//! - UDP on [`UDP_PORT`]: every datagram is answered with the JSON
//!   `{request, namespace, ingress, service, pod}`;
//! - or, for a DNS pod, a DNS server on [`DNS_PORT`] answering A queries (hickory-proto).
//!
//! Pod names look like a Deployment's (`NAME-RSHASH-PODHASH`); [`backend_of`] recovers `NAME` as
//! upstream's `extractTCPBackendName` does.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use serde::{Deserialize, Serialize};

use crate::netns::{NetNs, in_netns};

pub const TCP_PORT: u16 = 3000;
pub const UDP_PORT: u16 = 8080;
pub const DNS_PORT: u16 = 53;
/// The name the DNS pod answers, and its address.
pub const DNS_NAME: &str = "foo.bar.com.";
pub const DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 153);

const POLL: Duration = Duration::from_millis(20);
const SERVER_IDLE: Duration = Duration::from_secs(30);

/// What a pod serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    /// TCP echo on 3000 and UDP echo on 8080.
    Echo,
    /// DNS on 53 (UDP).
    Dns,
}

/// One backend pod: its Kubernetes namespace, Deployment name (the pod name's prefix), the
/// Service it stands behind (for the UDP answer's `service`), and what it serves.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub deployment: String,
    pub service: String,
    pub serves: Serves,
}

impl PodSpec {
    pub fn echo(namespace: &str, deployment: &str) -> Self {
        PodSpec {
            namespace: namespace.into(),
            deployment: deployment.into(),
            service: deployment.into(),
            serves: Serves::Echo,
        }
    }

    /// A pod name as a Deployment's ReplicaSet would make it: stable per deployment name.
    pub fn pod_name(&self) -> String {
        let mut hash: u32 = 2_166_136_261;
        for b in self.deployment.bytes() {
            hash = (hash ^ u32::from(b)).wrapping_mul(16_777_619);
        }
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut suffix = |len: usize| {
            (0..len)
                .map(|_| {
                    let c = ALPHABET[(hash % ALPHABET.len() as u32) as usize] as char;
                    hash = hash.rotate_left(5).wrapping_mul(31).wrapping_add(7);
                    c
                })
                .collect::<String>()
        };
        let rs = suffix(10);
        let pod = suffix(5);
        format!("{}-{rs}-{pod}", self.deployment)
    }
}

/// The Deployment name of a pod name: everything before the last two `-` parts.
pub fn backend_of(pod: &str) -> &str {
    let parts: Vec<&str> = pod.split('-').collect();
    if parts.len() < 3 {
        return pod;
    }
    let keep: usize = parts[..parts.len() - 2].iter().map(|p| p.len() + 1).sum();
    &pod[..keep - 1]
}

/// A running pod; its servers stop on drop.
pub struct Pod {
    pub spec: PodSpec,
    pub name: String,
    pub addr: Ipv4Addr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Pod {
    /// Starts the pod's servers on `addr` inside `ns` (the address must already be there).
    pub fn start(ns: &NetNs, spec: PodSpec, addr: Ipv4Addr) -> anyhow::Result<Self> {
        let name = spec.pod_name();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        match spec.serves {
            Serves::Echo => {
                let (listener, udp) = in_netns(ns, move || {
                    let tcp_addr = SocketAddr::from((addr, TCP_PORT));
                    let listener = TcpListener::bind(tcp_addr)
                        .with_context(|| format!("tcp bind {tcp_addr}"))?;
                    listener.set_nonblocking(true)?;
                    let udp_addr = SocketAddr::from((addr, UDP_PORT));
                    let udp = UdpSocket::bind(udp_addr)
                        .with_context(|| format!("udp bind {udp_addr}"))?;
                    udp.set_read_timeout(Some(POLL * 5))?;
                    Ok((listener, udp))
                })?;
                let identity = Identity {
                    namespace: spec.namespace.clone(),
                    pod: name.clone(),
                    service: spec.service.clone(),
                };
                {
                    let (stop, identity) = (stop.clone(), identity.clone());
                    threads.push(std::thread::spawn(move || {
                        serve_tcp(listener, &identity, &stop)
                    }));
                }
                {
                    let stop = stop.clone();
                    threads.push(std::thread::spawn(move || {
                        serve_udp_echo(udp, &identity, &stop)
                    }));
                }
            }
            Serves::Dns => {
                let udp = in_netns(ns, move || {
                    let dns_addr = SocketAddr::from((addr, DNS_PORT));
                    let udp = UdpSocket::bind(dns_addr)
                        .with_context(|| format!("udp bind {dns_addr}"))?;
                    udp.set_read_timeout(Some(POLL * 5))?;
                    Ok(udp)
                })?;
                let stop = stop.clone();
                threads.push(std::thread::spawn(move || serve_dns(udp, &stop)));
            }
        }
        Ok(Pod {
            spec,
            name,
            addr,
            stop,
            threads,
        })
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Debug)]
struct Identity {
    namespace: String,
    pod: String,
    service: String,
}

/// The JSON the TCP server answers `TEST` with.
#[derive(Debug, Serialize, Deserialize)]
pub struct TcpAssertions {
    pub namespace: String,
    pub pod: String,
    #[serde(default)]
    pub tls: bool,
}

/// The JSON the UDP server answers every datagram with.
#[derive(Debug, Serialize, Deserialize)]
pub struct UdpEchoResponse {
    pub request: String,
    pub namespace: String,
    #[serde(default)]
    pub ingress: String,
    pub service: String,
    pub pod: String,
}

/// Waits up to `POLL` for `listener` to have a connection (so a new connection is accepted at
/// once, and `stop` is still looked at every `POLL`).
fn wait_readable(listener: &TcpListener) {
    use std::os::fd::AsRawFd as _;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, POLL.as_millis() as libc::c_int) };
}

fn serve_tcp(listener: TcpListener, identity: &Identity, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        wait_readable(&listener);
        while let Ok((stream, _)) = listener.accept() {
            let identity = identity.clone();
            std::thread::spawn(move || {
                let _ = tcp_session(stream, &identity);
            });
        }
    }
}

fn tcp_session(stream: TcpStream, identity: &Identity) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SERVER_IDLE))?;
    let mut writer = stream.try_clone()?;
    // Each line in one write: no Nagle wait behind the peer's delayed ACK.
    writer.write_all(
        format!(
            "Welcome to the TCP echo server, pod {} in namespace {}\n",
            identity.pod, identity.namespace
        )
        .as_bytes(),
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let reply = match line.trim_end() {
            "PING" => "PONG".to_owned(),
            "IS_TLS" => "false".to_owned(),
            "TEST" => serde_json::to_string(&TcpAssertions {
                namespace: identity.namespace.clone(),
                pod: identity.pod.clone(),
                tls: false,
            })
            .expect("serializes"),
            other => other.to_owned(),
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
    }
}

fn serve_udp_echo(socket: UdpSocket, identity: &Identity, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let reply = UdpEchoResponse {
                request: String::from_utf8_lossy(&buf[..n]).into_owned(),
                namespace: identity.namespace.clone(),
                ingress: String::new(),
                service: identity.service.clone(),
                pod: identity.pod.clone(),
            };
            let _ = socket.send_to(
                serde_json::to_string(&reply)
                    .expect("serializes")
                    .as_bytes(),
                from,
            );
        }
    }
}

/// The DNS answer to `query`: `DNS_ANSWER` for an A query of `DNS_NAME`, NXDOMAIN otherwise.
fn dns_answer(query: &[u8]) -> anyhow::Result<Vec<u8>> {
    let request = Message::from_vec(query)?;
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.authoritative = true;
    let wanted = Name::from_str(DNS_NAME)?;
    let mut found = false;
    for q in &request.queries {
        response.add_query(q.clone());
        if q.query_type() == RecordType::A && q.name() == &wanted {
            response.add_answer(Record::from_rdata(
                wanted.clone(),
                30,
                RData::A(A(DNS_ANSWER)),
            ));
            found = true;
        }
    }
    if !found {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    Ok(response.to_vec()?)
}

fn serve_dns(socket: UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf)
            && let Ok(answer) = dns_answer(&buf[..n])
        {
            let _ = socket.send_to(&answer, from);
        }
    }
}

/// What answered a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub namespace: String,
    pub pod: String,
}

impl Answer {
    pub fn backend(&self) -> &str {
        backend_of(&self.pod)
    }
}

/// One new TCP connection as upstream's tcp utilities make it: read the greeting, `PING` must
/// give `PONG`, `TEST` names the pod.
pub fn tcp_probe(to: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    let stream =
        TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .with_context(|| format!("greeting from {to}"))?;
    ensure!(!line.is_empty(), "{to} closed before its greeting");
    writer.write_all(b"PING\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    ensure!(line.trim_end() == "PONG", "PING gave {line:?}");
    writer.write_all(b"TEST\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    let assertions: TcpAssertions =
        serde_json::from_str(line.trim_end()).with_context(|| format!("TEST gave {line:?}"))?;
    ensure!(!assertions.tls, "a plain TCP connection reported TLS");
    Ok(Answer {
        namespace: assertions.namespace,
        pod: assertions.pod,
    })
}

fn udp_socket(to: SocketAddr, timeout: Duration) -> anyhow::Result<UdpSocket> {
    let bind = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(to)?;
    Ok(socket)
}

/// One datagram from a new socket (a new flow); the JSON answer names the pod.
pub fn udp_probe(to: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    let socket = udp_socket(to, timeout)?;
    const REQUEST: &str = "gateway-api-conformance-udp\n";
    socket.send(REQUEST.as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no UDP answer from {to}"))?;
    let reply: UdpEchoResponse = serde_json::from_slice(&buf[..n])
        .with_context(|| format!("UDP answer {:?}", String::from_utf8_lossy(&buf[..n])))?;
    ensure!(
        reply.request == REQUEST,
        "the echo carried {:?}",
        reply.request
    );
    ensure!(!reply.pod.is_empty(), "UDP answer without a pod name");
    Ok(Answer {
        namespace: reply.namespace,
        pod: reply.pod,
    })
}

/// A DNS A query for `name` from a new socket; returns the addresses answered.
pub fn dns_query(to: SocketAddr, name: &str, timeout: Duration) -> anyhow::Result<Vec<Ipv4Addr>> {
    let socket = udp_socket(to, timeout)?;
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_str(name)?, RecordType::A));
    socket.send(&query.to_vec()?)?;
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no DNS answer from {to}"))?;
    let response = Message::from_vec(&buf[..n])?;
    ensure!(
        response.metadata.id == query.metadata.id,
        "answer to another query"
    );
    ensure!(
        response.metadata.message_type == MessageType::Response,
        "not a response"
    );
    if response.metadata.response_code != ResponseCode::NoError {
        bail!("DNS answered {}", response.metadata.response_code);
    }
    Ok(response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_look_like_a_deployments_and_give_the_deployment_back() {
        let spec = PodSpec::echo("gateway-conformance-infra", "tcp-backend-v1");
        let name = spec.pod_name();
        assert_eq!(name.split('-').count(), 5, "{name}");
        assert_eq!(backend_of(&name), "tcp-backend-v1");
        assert_eq!(spec.pod_name(), name, "stable");
        assert_eq!(backend_of("coredns"), "coredns");
    }

    #[test]
    fn dns_answers_the_name_and_refuses_others() {
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_str(DNS_NAME).unwrap(),
            RecordType::A,
        ));
        let answer = Message::from_vec(&dns_answer(&query.to_vec().unwrap()).unwrap()).unwrap();
        assert_eq!(answer.metadata.id, query.metadata.id);
        assert_eq!(answer.answers.len(), 1);
        let mut other = Message::query();
        other.add_query(Query::query(
            Name::from_str("x.example.").unwrap(),
            RecordType::A,
        ));
        let answer = Message::from_vec(&dns_answer(&other.to_vec().unwrap()).unwrap()).unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    }
}
