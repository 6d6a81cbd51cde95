//! Starting to announce a Gateway address: gratuitous ARP (IPv4) and unsolicited neighbour
//! advertisements (IPv6, to all nodes, override flag) on every attached interface, repeated, so
//! that neighbours whose entry points elsewhere (an address that moved) update it at once. The
//! answers to requests come from the XDP program (dataplane-ebpf/src/announce.rs).

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData};
use fulgur_common::{
    AnnounceDevice, AnnounceKey,
    consts::{
        self, ALL_NODES_MAC, ARP_REQUEST, ETH_P_ARP, ETH_P_IPV6, NA_OVERRIDE, NDP_ADVERTISEMENT,
        NDP_HOP_LIMIT, NDP_OPTION_TARGET_LINK_LAYER,
    },
    csum, decode_addr, map_names,
};
use serde::Serialize;

use crate::dataplane::Pins;

/// How many times an address is announced when it starts, and how far apart.
pub const REPEATS: usize = 3;
pub const INTERVAL: Duration = Duration::from_millis(200);

const BROADCAST: [u8; 6] = [0xff; 6];

/// A gratuitous ARP request (RFC 5227 "ARP Announcement"): sender and target address are both
/// `ip`, the target hardware address is zero, sent to broadcast.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&BROADCAST);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_ARP.to_ne_bytes());
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    frame.extend_from_slice(&ARP_REQUEST.to_be_bytes());
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    frame
}

/// An unsolicited neighbour advertisement (RFC 4861 7.2.6): from `ip` to all nodes, hop limit
/// 255, override flag set, with the target link-layer address option.
pub fn unsolicited_advertisement(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[NDP_ADVERTISEMENT, 0, 0, 0, NA_OVERRIDE, 0, 0, 0]);
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[NDP_OPTION_TARGET_LINK_LAYER, 1]);
    icmp.extend_from_slice(&mac);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&ip.octets());
    pseudo.extend_from_slice(&consts::ALL_NODES);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, fulgur_common::PROTO_ICMPV6]);
    pseudo.extend_from_slice(&icmp);
    let sum: u32 = pseudo
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32)
        .sum();
    icmp[2..4].copy_from_slice(&(!csum::fold(sum)).to_be_bytes());

    let mut frame = Vec::with_capacity(14 + 40 + icmp.len());
    frame.extend_from_slice(&ALL_NODES_MAC);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_IPV6.to_ne_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[consts::PROTO_ICMPV6, NDP_HOP_LIMIT]);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&consts::ALL_NODES);
    frame.extend_from_slice(&icmp);
    frame
}

/// The announcement frame for `ip` from `mac`.
pub fn announcement(mac: [u8; 6], ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => gratuitous_arp(mac, v4),
        IpAddr::V6(v6) => unsolicited_advertisement(mac, v6),
    }
}

/// The hardware address of `iface` in this network namespace (SIOCGIFHWADDR: /sys may show
/// another namespace's devices under `nsenter --net`).
pub fn hardware_address(iface: &str) -> io::Result<[u8; 6]> {
    let socket = datagram_socket()?;
    // SAFETY: a zeroed ifreq is valid; the name is copied in NUL-terminated.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= request.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(iface.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes ifr_hwaddr of the struct we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled ifr_hwaddr.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(std::array::from_fn(|i| data[i] as u8))
}

fn datagram_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A raw AF_PACKET socket that only sends (protocol 0: it receives nothing).
struct PacketSender {
    fd: OwnedFd,
}

impl PacketSender {
    fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(PacketSender {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends a whole Ethernet frame out of `ifindex`.
    fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_ll is valid; the fields we need are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and address outlive the call; lengths are theirs.
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
}

/// A client-facing interface that announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Sends the announcements when addresses start being announced. Repeats stop for an address
/// that is withdrawn meanwhile.
#[derive(Clone)]
pub struct Announcer {
    interfaces: Arc<Vec<Interface>>,
    active: Arc<Mutex<BTreeSet<IpAddr>>>,
}

impl Announcer {
    pub fn new(interfaces: Vec<Interface>) -> Self {
        Announcer {
            interfaces: Arc::new(interfaces),
            active: Arc::default(),
        }
    }

    /// The addresses announced now; those new since the last call are announced on every
    /// interface, [`REPEATS`] times, [`INTERVAL`] apart, from a thread of their own.
    pub fn update(&self, now: &BTreeSet<IpAddr>) {
        let started: Vec<IpAddr> = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            let started = now.difference(&active).copied().collect();
            *active = now.clone();
            started
        };
        if started.is_empty() || self.interfaces.is_empty() {
            return;
        }
        let announcer = self.clone();
        let spawned = std::thread::Builder::new()
            .name("fulgur-announce".into())
            .spawn(move || announcer.send_repeated(&started));
        if let Err(e) = spawned {
            tracing::error!("starting the announcement thread: {e}");
        }
    }

    fn send_repeated(&self, addresses: &[IpAddr]) {
        let sender = match PacketSender::new() {
            Ok(sender) => sender,
            Err(e) => {
                tracing::error!("opening a packet socket for gratuitous ARP / NDP: {e}");
                return;
            }
        };
        for round in 0..REPEATS {
            if round > 0 {
                std::thread::sleep(INTERVAL);
            }
            for address in addresses {
                if !self
                    .active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(address)
                {
                    continue;
                }
                for interface in self.interfaces.iter() {
                    let frame = announcement(interface.mac, *address);
                    match sender.send(interface.ifindex, &frame) {
                        Ok(()) if round == 0 => tracing::info!(
                            %address,
                            iface = interface.name,
                            "announcing (gratuitous ARP / unsolicited neighbour advertisement)"
                        ),
                        Ok(()) => {}
                        Err(e) => tracing::warn!(
                            %address,
                            iface = interface.name,
                            "sending the announcement: {e}"
                        ),
                    }
                }
            }
        }
    }
}

/// What the pinned maps announce, for `inspect`.
#[derive(Debug, Default, Serialize)]
pub struct AnnounceReport {
    /// Addresses ARP requests and neighbour solicitations are answered for.
    pub announced: Vec<IpAddr>,
    /// Devices that answer, with the MAC they answer with.
    pub announce_devices: Vec<DeviceView>,
    /// Milliseconds left of the agent's lease, negative once it ran out (nothing is answered
    /// then); `None`: no lease.
    pub lease_remaining_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub ifindex: u32,
    /// The device's name in this network namespace, if it has one here.
    pub name: Option<String>,
    pub mac: String,
}

/// Reads the announced addresses and devices from the pins (none when an older agent made them).
pub fn read_report(pins: &Pins) -> AnnounceReport {
    let open = |name: &str| {
        MapData::from_pin(pins.map(name))
            .ok()
            .and_then(|data| Map::from_map_data(data).ok())
    };
    let mut report = AnnounceReport::default();
    if let Some(map) = open(map_names::ANNOUNCED)
        && let Ok(map) = HashMap::<MapData, AnnounceKey, u32>::try_from(map)
    {
        report.announced = map
            .keys()
            .flatten()
            .map(|k| decode_addr(&k.addr, k.family))
            .collect();
        report.announced.sort();
    }
    if let Some(map) = open(map_names::ANNOUNCE_LEASE)
        && let Ok(map) = Array::<MapData, u64>::try_from(map)
        && let Ok(until) = map.get(&0, 0)
        && until != 0
    {
        let now = crate::clock::monotonic().as_nanos() as i128;
        report.lease_remaining_ms = Some(((until as i128 - now) / 1_000_000) as i64);
    }
    if let Some(map) = open(map_names::ANNOUNCE_DEVICES)
        && let Ok(map) = HashMap::<MapData, u32, AnnounceDevice>::try_from(map)
    {
        report.announce_devices = map
            .iter()
            .flatten()
            .map(|(ifindex, device)| DeviceView {
                ifindex,
                name: if_name(ifindex),
                mac: mac_text(device.mac),
            })
            .collect();
        report.announce_devices.sort_by_key(|d| d.ifindex);
    }
    report
}

impl AnnounceReport {
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from("ANNOUNCED (ARP / NDP answered)");
        match self.lease_remaining_ms {
            None => out.push_str(", no lease\n"),
            Some(ms) if ms >= 0 => {
                let _ = writeln!(out, ", lease {ms} ms left");
            }
            Some(ms) => {
                let _ = writeln!(out, ", lease ran out {} ms ago: none answered", -ms);
            }
        }
        if self.announced.is_empty() {
            out.push_str("  none\n");
        }
        for address in &self.announced {
            let _ = writeln!(out, "  {address}");
        }
        out.push_str("ANNOUNCE DEVICES\n");
        for d in &self.announce_devices {
            let name = d
                .name
                .as_deref()
                .unwrap_or("(not in this network namespace)");
            let _ = writeln!(out, "  {:<24} ifindex {:<6} {}", name, d.ifindex, d.mac);
        }
        out
    }
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn if_name(ifindex: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname needs.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_checksum_verifies() {
        let frame = unsolicited_advertisement(
            [2, 0, 0, 0, 1, 0],
            "2001:db8::10".parse::<Ipv6Addr>().unwrap(),
        );
        assert_eq!(frame.len(), 14 + 40 + 32);
        // Receivers check that pseudo-header plus message sum to all ones.
        let mut pseudo = frame[22..54].to_vec();
        pseudo.extend_from_slice(&32u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&frame[54..]);
        let sum: u32 = pseudo
            .chunks(2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
            .sum();
        assert_eq!(csum::fold(sum), 0xffff);
    }

    #[test]
    fn gratuitous_arp_names_the_address_twice() {
        let frame = gratuitous_arp([2, 0, 0, 0, 1, 0], Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(frame.len(), 42);
        assert_eq!(&frame[28..32], &[192, 0, 2, 10]);
        assert_eq!(&frame[38..42], &[192, 0, 2, 10]);
    }
}
