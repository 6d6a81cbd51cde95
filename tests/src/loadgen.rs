//! A load generator for the forwarding bench: UDP with `sendmmsg` over several flows, counted by
//! a sink on the backend (datagrams the backend's socket received), and TCP short connections
//! (connect, one request, the server's reply, the client closes), counted by the client.
//!
//! Every loop stops at a deadline and at a count, whichever comes first.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::netns::{NetNs, in_netns};

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 64;
/// UDP payload: small, so that per-packet work dominates.
const PAYLOAD: &[u8; 32] = b"fulgur-bench-forward-udp-payload";
/// The reply a TCP server sends before it closes.
const REPLY: &[u8] = b"ok";
/// Upper bound on what one run may send or connect, whatever its duration.
const MAX_DATAGRAMS: u64 = 200_000_000;
const MAX_CONNECTIONS: u64 = 10_000_000;
/// How long a sink or server lives at most, so a forgotten one cannot spin forever.
const SERVER_LIFETIME: Duration = Duration::from_secs(900);
const POLL_MS: i32 = 50;

/// A UDP socket on a backend that counts the datagrams it receives (`recvmmsg`). Stops on drop.
pub struct UdpSink {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let socket = in_netns(ns, move || {
            UdpSocket::bind(addr).with_context(|| format!("udp bind {addr}"))
        })?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || drain_udp(&socket, &received, &stop))
        };
        Ok(UdpSink {
            received,
            stop,
            thread: Some(thread),
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The running count, for a sender on another thread.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn drain_udp(socket: &UdpSocket, received: &AtomicU64, stop: &AtomicBool) {
    let started = Instant::now();
    let mut buffers = vec![[0u8; 256]; BATCH];
    let mut iovecs: Vec<libc::iovec> = buffers
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; zero is a valid empty header.
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let fd = socket.as_raw_fd();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
        if !readable(fd) {
            continue;
        }
        // SAFETY: the headers point at buffers that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Waits up to [`POLL_MS`] for `fd` to become readable.
fn readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, POLL_MS) > 0 }
}

/// What a UDP blast sent, and what the sink counted during the measured window.
#[derive(Clone, Copy, Debug)]
pub struct UdpResult {
    pub sent: u64,
    pub received: u64,
    pub seconds: f64,
}

impl UdpResult {
    /// Datagrams per second the backend received.
    pub fn pps(&self) -> f64 {
        self.received as f64 / self.seconds
    }
}

/// Sends to `target` from `flows` sockets (one source port each, so one flow each), in
/// `sendmmsg` batches, for `warmup` and then `duration`; `received` reads the sink's count.
/// Runs on the calling thread, which must be in the client's namespace.
pub fn udp_blast(
    target: SocketAddr,
    flows: usize,
    warmup: Duration,
    duration: Duration,
    received: impl Fn() -> u64,
) -> anyhow::Result<UdpResult> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sockets = (0..flows)
        .map(|_| {
            let s = UdpSocket::bind(bind)?;
            s.connect(target)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut payloads = vec![*PAYLOAD; BATCH];
    let mut iovecs: Vec<libc::iovec> = payloads
        .iter_mut()
        .map(|p| libc::iovec {
            iov_base: p.as_mut_ptr().cast(),
            iov_len: p.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; zero is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let mut sent = 0u64;
    let mut send_round = |sent: &mut u64| {
        for socket in &sockets {
            // SAFETY: the headers point at payloads that outlive the call; connected sockets
            // need no address.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    headers.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                *sent += n as u64;
            }
        }
    };
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until && sent < MAX_DATAGRAMS {
        send_round(&mut sent);
    }
    ensure!(
        received() > 0,
        "no datagram reached the backend during the warm-up"
    );
    let (sent_before, received_before) = (sent, received());
    let started = Instant::now();
    let until = started + duration;
    while Instant::now() < until && sent < MAX_DATAGRAMS {
        send_round(&mut sent);
    }
    // Read the sink at once: datagrams still in flight are few next to a second's worth.
    let received_after = received();
    Ok(UdpResult {
        sent: sent - sent_before,
        received: received_after - received_before,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A TCP server on a backend: reads one request, replies, closes. `threads` accept loops share
/// the listener. Stops on drop.
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpServer {
    pub fn start(ns: &NetNs, addr: SocketAddr, threads: usize) -> anyhow::Result<Self> {
        let listener = in_netns(ns, move || {
            let listener = TcpListener::bind(addr).with_context(|| format!("tcp bind {addr}"))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let (listener, stop) = (listener.clone(), stop.clone());
                std::thread::spawn(move || serve(&listener, &stop))
            })
            .collect();
        Ok(TcpServer { stop, threads })
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
        if !readable(listener.as_raw_fd()) {
            continue;
        }
        // Accept what is queued; another thread may have taken it.
        while let Ok((stream, _)) = listener.accept() {
            let _ = answer(stream);
        }
    }
}

fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_nodelay(true)?;
    let mut request = [0u8; 64];
    let _ = stream.read(&mut request)?;
    stream.write_all(REPLY)?;
    // The client closes first: TIME_WAIT stays with the client, which may reuse it
    // (tcp_tw_reuse), rather than on the backend, where a SYN from a reused port meets it.
    while stream.read(&mut request)? > 0 {}
    Ok(())
}

/// What a run of short connections did.
#[derive(Clone, Copy, Debug)]
pub struct TcpResult {
    pub completed: u64,
    pub failed: u64,
    pub seconds: f64,
}

impl TcpResult {
    /// Completed connections per second.
    pub fn cps(&self) -> f64 {
        self.completed as f64 / self.seconds
    }
}

/// `clients` threads in `ns`, each opening connections to `target` one after another (connect,
/// request, reply, close), for `warmup` and then `duration`. Only connections that got the full
/// reply count.
pub fn tcp_short_connections(
    ns: &NetNs,
    target: SocketAddr,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<TcpResult> {
    let warm = run_clients(ns, target, clients, warmup)?;
    ensure!(
        warm.completed > 0,
        "no TCP connection to {target} completed during the warm-up ({} failed)",
        warm.failed
    );
    run_clients(ns, target, clients, duration)
}

fn run_clients(
    ns: &NetNs,
    target: SocketAddr,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<TcpResult> {
    let path = ns.path();
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
                enter_for_good(&path)?;
                let until = Instant::now() + duration;
                let (mut completed, mut failed) = (0u64, 0u64);
                while Instant::now() < until && completed + failed < MAX_CONNECTIONS {
                    match one_connection(target) {
                        Ok(()) => completed += 1,
                        Err(_) => failed += 1,
                    }
                }
                Ok((completed, failed))
            })
        })
        .collect();
    let (mut completed, mut failed) = (0, 0);
    for thread in threads {
        let (c, f) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        completed += c;
        failed += f;
    }
    Ok(TcpResult {
        completed,
        failed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Moves this (short-lived, own) thread into the namespace at `path` for the rest of its life.
fn enter_for_good(path: &str) -> anyhow::Result<()> {
    let target = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn one_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"hello")?;
    let mut reply = [0u8; REPLY.len()];
    stream.read_exact(&mut reply)?;
    if reply != REPLY {
        return Err(std::io::Error::other("unexpected reply"));
    }
    Ok(())
}
