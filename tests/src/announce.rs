//! A node and a client on one link, for the announcement tests: a raw packet socket that sends
//! and captures whole frames in a namespace, the frames a neighbour expects (built by
//! etherparse, not by the agent's code), the client kernel's neighbour entries, and the agent's
//! gRPC service driven from inside the node's namespace.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::links::FdLink;
use etherparse::{ArpOperation, Icmpv6Type, PacketBuilder};
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_proto::v1::{self, dataplane_client::DataplaneClient};

use crate::{
    corpus,
    netns::{NetNs, in_netns},
};

pub const NODE_IFACE: &str = "nd0";
pub const CLIENT_IFACE: &str = "cl0";
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The Gateway addresses the node announces: on the client's link, owned by no kernel.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100);
/// On the link too, announced by nobody and owned by no kernel: never answered.
pub const NOBODY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 101);
pub const GRPC: &str = "127.0.0.1:50051";
pub const METRICS: &str = "127.0.0.1:9464";

/// `node` (where the agent runs, on `nd0`) and `client` (on `cl0`), one veth between them.
pub struct Link {
    pub node: NetNs,
    pub client: NetNs,
    pub node_mac: [u8; 6],
    pub client_mac: [u8; 6],
    pub mode: XdpAttachMode,
    /// Native XDP on veth delivers XDP_TX frames only to a peer running XDP.
    _peer_link: Option<FdLink>,
}

impl Link {
    pub fn new(mode: XdpAttachMode) -> anyhow::Result<Self> {
        let node = NetNs::new("fgan")?;
        let client = NetNs::new("fgac")?;
        node.ip(&[
            "link",
            "add",
            "name",
            NODE_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IFACE,
            "netns",
            client.name(),
        ])?;
        for (ns, iface, v4, v6) in [
            (&node, NODE_IFACE, NODE, NODE6),
            (&client, CLIENT_IFACE, CLIENT, CLIENT6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", iface])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
            ns.ip(&["link", "set", "dev", iface, "up"])?;
        }
        client.exec("ethtool", &["-K", CLIENT_IFACE, "tx", "off"])?;
        let peer_link = match mode {
            XdpAttachMode::Native => Some(crate::topology::attach_pass(&client, CLIENT_IFACE)?),
            XdpAttachMode::Generic => None,
        };
        let node_mac = in_netns(&node, || {
            Ok(fulgur_agent::announce::hardware_address(NODE_IFACE)?)
        })?;
        let client_mac = in_netns(&client, || {
            Ok(fulgur_agent::announce::hardware_address(CLIENT_IFACE)?)
        })?;
        Ok(Link {
            node,
            client,
            node_mac,
            client_mac,
            mode,
            _peer_link: peer_link,
        })
    }

    /// A raw socket on the client's interface.
    pub fn client_socket(&self) -> anyhow::Result<RawSocket> {
        RawSocket::open(&self.client, CLIENT_IFACE)
    }

    /// The client asks for `target` with an ARP request of its own; the reply, if one comes
    /// within `wait`.
    pub fn arp(&self, socket: &RawSocket, target: Ipv4Addr, wait: Duration) -> Option<Vec<u8>> {
        socket.send(&self.arp_request(target)).expect("sending");
        let deadline = Instant::now() + wait;
        socket
            .receive_until(deadline, |f| is_arp(f, ArpOperation::REPLY, target), 1)
            .pop()
    }

    /// As [`Link::arp`], with a neighbour solicitation.
    pub fn solicit(&self, socket: &RawSocket, target: Ipv6Addr, wait: Duration) -> Option<Vec<u8>> {
        socket.send(&self.solicitation(target)).expect("sending");
        let deadline = Instant::now() + wait;
        socket
            .receive_until(deadline, |f| is_advertisement(f, target), 1)
            .pop()
    }

    pub fn arp_request(&self, target: Ipv4Addr) -> Vec<u8> {
        corpus::arp_frame(
            ArpOperation::REQUEST,
            (self.client_mac, CLIENT),
            ([0; 6], target),
            (self.client_mac, [0xff; 6]),
            None,
        )
    }

    /// The reply a neighbour that owns `target` sends (RFC 826), from the node's MAC.
    pub fn expected_arp_reply(&self, target: Ipv4Addr) -> Vec<u8> {
        corpus::arp_frame(
            ArpOperation::REPLY,
            (self.node_mac, target),
            (self.client_mac, CLIENT),
            (self.node_mac, self.client_mac),
            None,
        )
    }

    /// A solicitation as Linux sends it: to the solicited-node group, with our link-layer
    /// address.
    pub fn solicitation(&self, target: Ipv6Addr) -> Vec<u8> {
        solicitation_frame(self.client_mac, CLIENT6, target)
    }

    /// The solicited advertisement for `target` from the node's MAC (RFC 4861 7.2.4).
    pub fn expected_advertisement(&self, target: Ipv6Addr) -> Vec<u8> {
        advertisement(self.node_mac, target, (CLIENT6, self.client_mac), true)
    }

    /// The gratuitous ARP the node sends when it starts announcing `address` (RFC 5227).
    pub fn expected_gratuitous_arp(&self, address: Ipv4Addr) -> Vec<u8> {
        corpus::arp_frame(
            ArpOperation::REQUEST,
            (self.node_mac, address),
            ([0; 6], address),
            (self.node_mac, [0xff; 6]),
            None,
        )
    }

    /// The unsolicited advertisement to all nodes, override flag set (RFC 4861 7.2.6).
    pub fn expected_unsolicited_advertisement(&self, address: Ipv6Addr) -> Vec<u8> {
        let all_nodes = (
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            [0x33, 0x33, 0, 0, 0, 1],
        );
        advertisement(self.node_mac, address, all_nodes, false)
    }

    /// The client kernel's neighbour entry for `address`: (lladdr, state), if it has one.
    pub fn client_neighbour(&self, address: IpAddr) -> Option<(String, String)> {
        let out = self
            .client
            .ip(&["neigh", "show", &address.to_string(), "dev", CLIENT_IFACE])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let words: Vec<&str> = text.split_whitespace().collect();
        let state = words.last()?.to_string();
        let lladdr = words
            .iter()
            .position(|w| *w == "lladdr")
            .and_then(|i| words.get(i + 1))
            .map_or(String::new(), |w| w.to_string());
        Some((lladdr, state))
    }

    /// Makes the client kernel resolve `address` (a UDP datagram to it) and waits up to `wait`
    /// for its neighbour entry to hold a link-layer address.
    pub fn client_resolves(&self, address: IpAddr, wait: Duration) -> Option<(String, String)> {
        let _ = in_netns(&self.client, move || {
            let bind: SocketAddr = if address.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let socket = std::net::UdpSocket::bind(bind)?;
            socket.send_to(b"resolve", SocketAddr::new(address, 9))?;
            Ok(())
        });
        let deadline = Instant::now() + wait;
        loop {
            let entry = self.client_neighbour(address);
            if let Some((lladdr, state)) = &entry
                && !lladdr.is_empty()
                && state != "FAILED"
                && state != "INCOMPLETE"
            {
                return entry;
            }
            if Instant::now() > deadline {
                return entry;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One RPC to the agent in the node's namespace.
    pub fn apply(
        &self,
        generation: u64,
        announce: &[IpAddr],
        lease_ms: u32,
    ) -> anyhow::Result<v1::ApplyResponse> {
        let state = v1::DesiredState {
            generation,
            services: Vec::new(),
            announce: announce.iter().map(ToString::to_string).collect(),
            announce_lease_ms: lease_ms,
        };
        self.rpc(move |mut client| async move {
            let request = v1::ApplyRequest { state: Some(state) };
            Ok(client.apply(request).await?.into_inner())
        })
    }

    pub fn get(&self) -> anyhow::Result<v1::GetResponse> {
        self.rpc(|mut client| async move { Ok(client.get(v1::GetRequest {}).await?.into_inner()) })
    }

    fn rpc<T, F>(
        &self,
        call: impl FnOnce(DataplaneClient<tonic::transport::Channel>) -> F + Send + 'static,
    ) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = anyhow::Result<T>>,
    {
        in_netns(&self.node, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let client = DataplaneClient::connect(format!("http://{GRPC}")).await?;
                    call(client).await
                })
        })
    }

    /// The agent's /metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        in_netns(&self.node, || {
            use std::io::{Read as _, Write as _};
            let mut stream =
                std::net::TcpStream::connect_timeout(&METRICS.parse()?, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            write!(
                stream,
                "GET /metrics HTTP/1.1\r\nHost: fulgur\r\nConnection: close\r\n\r\n"
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
    }
}

/// A neighbour solicitation for `target` as Linux sends it: to the solicited-node group, with
/// the sender's link-layer address.
pub fn solicitation_frame(mac: [u8; 6], source: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let o = target.octets();
    let group = [
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ];
    let mut payload = o.to_vec();
    payload.extend_from_slice(&[1, 1]);
    payload.extend_from_slice(&mac);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(mac, [0x33, 0x33, 0xff, o[13], o[14], o[15]])
        .ipv6(source.octets(), group, 255)
        .icmpv6(Icmpv6Type::NeighborSolicitation)
        .write(&mut out, &payload)
        .unwrap();
    out
}

fn advertisement(
    mac: [u8; 6],
    target: Ipv6Addr,
    to: (Ipv6Addr, [u8; 6]),
    solicited: bool,
) -> Vec<u8> {
    let mut payload = target.octets().to_vec();
    payload.extend_from_slice(&[2, 1]);
    payload.extend_from_slice(&mac);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(mac, to.1)
        .ipv6(target.octets(), to.0.octets(), 255)
        .icmpv6(Icmpv6Type::NeighborAdvertisement(
            etherparse::icmpv6::NeighborAdvertisementHeader {
                router: false,
                solicited,
                r#override: true,
            },
        ))
        .write(&mut out, &payload)
        .unwrap();
    out
}

/// An ARP message of `operation` whose sender address is `sender`.
pub fn is_arp(frame: &[u8], operation: ArpOperation, sender: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == operation.0.to_be_bytes()
        && frame[28..32] == sender.octets()
}

/// A neighbour advertisement for `target`.
pub fn is_advertisement(frame: &[u8], target: Ipv6Addr) -> bool {
    frame.len() >= 14 + 40 + 24
        && frame[12..14] == [0x86, 0xdd]
        && frame[20] == 58
        && frame[54] == 136
        && frame[62..78] == target.octets()
}

/// An AF_PACKET socket bound to one interface, receiving every frame that arrives on it.
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
}

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

impl RawSocket {
    /// Opens it inside `ns` (a socket stays in the namespace it was made in).
    pub fn open(ns: &NetNs, iface: &str) -> anyhow::Result<Self> {
        let iface = iface.to_owned();
        in_netns(ns, move || {
            let ifindex = fulgur_agent::dataplane::if_index(&iface)?;
            // SAFETY: plain socket(2); the descriptor is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    ETH_P_ALL.to_be() as i32,
                )
            };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let address = link_address(ifindex, ETH_P_ALL, [0; 6]);
            // SAFETY: a valid sockaddr_ll of the size given.
            let bound = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&address as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if bound != 0 {
                bail!("binding to {iface}: {}", io::Error::last_os_error());
            }
            // Kernel receive times: frames read late by a busy thread keep their real order.
            let on: libc::c_int = 1;
            // SAFETY: a valid descriptor and an int option of the size given.
            let set = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&on as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if set != 0 {
                bail!("SO_TIMESTAMPNS: {}", io::Error::last_os_error());
            }
            Ok(RawSocket { fd, ifindex })
        })
        .context("raw socket")
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let to = link_address(self.ifindex, ether_type, dst);
        // SAFETY: the buffer and the address outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Frames that arrived (not those this host sent) and that `keep` accepts, until
    /// `deadline` or until `max` of them came, with their arrival times.
    pub fn receive_until(
        &self,
        deadline: Instant,
        mut keep: impl FnMut(&[u8]) -> bool,
        max: usize,
    ) -> Vec<Vec<u8>> {
        self.receive_timed(deadline, &mut keep, max)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    pub fn receive_timed(
        &self,
        deadline: Instant,
        keep: &mut impl FnMut(&[u8]) -> bool,
        max: usize,
    ) -> Vec<(Instant, Vec<u8>)> {
        let mut frames = Vec::new();
        let mut buffer = vec![0u8; 2048];
        while frames.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().max(1) as i32) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: zeroed sockaddr_ll, msghdr and control buffer are valid; recvmsg fills
            // them and the buffer within the lengths given.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut control = [0u64; 16];
            let mut iov = libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            };
            let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
            message.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            message.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            message.msg_iov = &mut iov;
            message.msg_iovlen = 1;
            message.msg_control = control.as_mut_ptr().cast();
            message.msg_controllen = size_of_val(&control);
            let len =
                unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut message, libc::MSG_DONTWAIT) };
            if len <= 0 || from.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            let frame = &buffer[..len as usize];
            if keep(frame) {
                frames.push((received_at(&message), frame.to_vec()));
            }
        }
        frames
    }
}

/// The kernel's receive time of a message (SCM_TIMESTAMPNS, CLOCK_REALTIME) as an Instant;
/// now when it carries none.
fn received_at(message: &libc::msghdr) -> Instant {
    let now = Instant::now();
    let real_now = std::time::SystemTime::now();
    // SAFETY: the control messages recvmsg wrote, walked with the libc macros.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(message) };
    while !cmsg.is_null() {
        // SAFETY: a control message header inside the buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_TIMESTAMPNS {
            // SAFETY: SCM_TIMESTAMPNS carries a timespec, maybe unaligned.
            let stamp: libc::timespec = unsafe {
                libc::CMSG_DATA(cmsg)
                    .cast::<libc::timespec>()
                    .read_unaligned()
            };
            let at =
                std::time::UNIX_EPOCH + Duration::new(stamp.tv_sec as u64, stamp.tv_nsec as u32);
            let ago = real_now.duration_since(at).unwrap_or_default();
            return now.checked_sub(ago).unwrap_or(now);
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(message, cmsg) };
    }
    now
}

fn link_address(ifindex: u32, protocol: u16, mac: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: a zeroed sockaddr_ll is valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol.to_be();
    address.sll_ifindex = ifindex as i32;
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(&mac);
    address
}

/// `aa:bb:...` as `ip neigh` prints it.
pub fn mac_text(mac: [u8; 6]) -> String {
    fulgur_agent::announce::mac_text(mac)
}
