//! TCP and UDP echo servers that name themselves in every reply, and clients that check replies.
//!
//! A reply is `NAME|PAYLOAD`, so a client learns which backend served it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::netns::{NetNs, in_netns};

const POLL: Duration = Duration::from_millis(50);
/// How long a client waits for an answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server keeps an idle connection: far longer than any pause a busy 2-core machine
/// puts between two messages of one test session (the client closes it when the test ends).
const SERVER_IDLE: Duration = Duration::from_secs(60);

/// TCP and UDP echo on one address and port, inside a namespace. Stops on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &NetNs, name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let (listener, udp) = in_netns(ns, move || {
            let listener = TcpListener::bind(addr).with_context(|| format!("tcp bind {addr}"))?;
            listener.set_nonblocking(true)?;
            let udp = UdpSocket::bind(addr).with_context(|| format!("udp bind {addr}"))?;
            udp.set_read_timeout(Some(POLL))?;
            Ok((listener, udp))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_thread = {
            let (stop, name) = (stop.clone(), name.to_owned());
            std::thread::spawn(move || serve_tcp(listener, &name, &stop))
        };
        let udp_thread = {
            let (stop, name) = (stop.clone(), name.to_owned());
            std::thread::spawn(move || serve_udp(udp, &name, &stop))
        };
        Ok(EchoServer {
            stop,
            threads: vec![tcp_thread, udp_thread],
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_tcp(listener: TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let name = name.to_owned();
                std::thread::spawn(move || {
                    let _ = echo_stream(stream, &name);
                });
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn echo_stream(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SERVER_IDLE))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut reply = format!("{name}|").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        stream.write_all(&reply)?;
    }
}

fn serve_udp(socket: UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let mut reply = format!("{name}|").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from);
        }
    }
}

/// Splits `NAME|PAYLOAD`, checking the payload came back intact.
fn backend_of(reply: &[u8], sent: &[u8]) -> anyhow::Result<String> {
    let text = String::from_utf8_lossy(reply);
    let Some((name, echoed)) = text.split_once('|') else {
        bail!("malformed reply {text:?}");
    };
    ensure!(
        echoed.as_bytes() == sent,
        "echo mismatch: sent {sent:?}, got {echoed:?}"
    );
    Ok(name.to_owned())
}

/// A long-lived TCP connection that can exchange many messages.
pub struct TcpSession {
    stream: TcpStream,
    to: SocketAddr,
}

impl TcpSession {
    pub fn connect(to: SocketAddr) -> anyhow::Result<Self> {
        let stream =
            TcpStream::connect_timeout(&to, IO_TIMEOUT).with_context(|| format!("connect {to}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(TcpSession { stream, to })
    }

    /// Sends `payload`, reads the echo, returns the backend's name.
    pub fn exchange(&mut self, payload: &[u8]) -> anyhow::Result<String> {
        self.stream
            .write_all(payload)
            .with_context(|| format!("writing to {}", self.to))?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while reply.len() < payload.len() + 2 || !reply.ends_with(payload) {
            let n = self
                .stream
                .read(&mut buf)
                .with_context(|| format!("reading from {}", self.to))?;
            ensure!(n > 0, "connection to {} closed", self.to);
            reply.extend_from_slice(&buf[..n]);
        }
        backend_of(&reply, payload)
    }
}

/// One TCP connection: connect, send, read the echo; returns the backend's name.
pub fn tcp_exchange(to: SocketAddr, payload: &[u8]) -> anyhow::Result<String> {
    TcpSession::connect(to)?.exchange(payload)
}

/// A UDP client socket; every datagram it sends is one flow (same 5-tuple).
pub struct UdpFlow {
    socket: UdpSocket,
    to: SocketAddr,
}

impl UdpFlow {
    pub fn new(bind: SocketAddr, to: SocketAddr) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(UdpFlow { socket, to })
    }

    /// Sends one datagram and returns the backend that answered, checking the answer came from
    /// the service address (reverse NAT worked).
    pub fn exchange(&self, payload: &[u8]) -> anyhow::Result<String> {
        self.socket.send_to(payload, self.to)?;
        let mut buf = [0u8; 2048];
        let (n, from) = self
            .socket
            .recv_from(&mut buf)
            .with_context(|| format!("no UDP reply from {}", self.to))?;
        ensure!(
            from == self.to,
            "UDP reply came from {from}, expected the service {}",
            self.to
        );
        backend_of(&buf[..n], payload)
    }
}
