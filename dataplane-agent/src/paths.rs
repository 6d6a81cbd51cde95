//! The forwarding path per egress device: fast (XDP redirect or TX) or kernel (DNAT in XDP, then
//! `XDP_PASS`, so the kernel routes the packet and netfilter sees both directions of the flow).
//!
//! The agent scans the node's devices and netfilter tables (netlink), decides, and writes the
//! decisions into `FULGUR_EGRESS_PATHS` and `FULGUR_REDIRECT_DEVICES`; the XDP program reads them
//! for the egress device its FIB lookup names. Rescanned every second, so new pod veths get a
//! decision quickly (until then their packets take the kernel path, counted `kernel_path`).

use std::{collections::BTreeMap, io};

use aya::maps::{Array, DevMapHash, HashMap, Map, MapData, PerCpuArray};
use fulgur_common::{
    EgressPath, NextHop, PATH_FAST, PATH_KERNEL, PathReason, map_names, next_epoch,
};
use serde::Serialize;

use crate::{
    dataplane::{Pins, XdpAttachMode},
    netlink::{HEADER, NLM_F_DUMP, attributes, request, u16_at},
};

/// `--forwarding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Forwarding {
    /// Per device: fast where the device takes XDP frames and no netfilter sits on the path.
    Auto,
    /// Every translated packet goes through the kernel's routing and netfilter.
    Kernel,
    /// The fast path everywhere; refused at start when the node cannot honour it.
    Fast,
}

/// One network device as netlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub ifindex: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...); empty for physical devices.
    pub kind: String,
    pub loopback: bool,
    pub up: bool,
    /// For a veth: whether its peer runs a native XDP program.
    pub peer_native_xdp: bool,
}

/// What the path decision looks at.
#[derive(Clone, Debug, Default)]
pub struct NodeScan {
    pub devices: Vec<Device>,
    /// Netfilter tables in this network namespace (`ip filter`, `inet kindnet-ipmasq`, ...).
    pub netfilter_tables: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub ifindex: u32,
    pub name: String,
    pub fast: bool,
    pub reason: PathReason,
    /// The device takes XDP frames (redirect / TX), netfilter or not: SNATed flows, which
    /// netfilter must never see, use it even where `fast` is false. False under
    /// `--forwarding kernel`.
    pub xdp_transmit: bool,
}

/// Scans this network namespace.
pub fn scan() -> io::Result<NodeScan> {
    let mut devices = links()?;
    for device in &mut devices {
        if device.kind == "veth" {
            device.peer_native_xdp = peer_native_xdp(device.ifindex).unwrap_or(false);
        }
    }
    let mut netfilter_tables = nft_tables().unwrap_or_default();
    for (file, family) in [
        ("/proc/thread-self/net/ip_tables_names", "legacy ip"),
        ("/proc/thread-self/net/ip6_tables_names", "legacy ip6"),
    ] {
        if let Ok(text) = std::fs::read_to_string(file) {
            netfilter_tables.extend(text.lines().map(|t| format!("{family} {t}")));
        }
    }
    Ok(NodeScan {
        devices,
        netfilter_tables,
    })
}

/// The path of every device (loopback aside) in the attached XDP mode.
pub fn decide(scan: &NodeScan, mode: XdpAttachMode, forwarding: Forwarding) -> Vec<Decision> {
    scan.devices
        .iter()
        .filter(|d| !d.loopback)
        .map(|d| {
            let device = if mode == XdpAttachMode::Generic {
                PathReason::Generic
            } else {
                match d.kind.as_str() {
                    "bridge" => PathReason::Bridge,
                    "veth" if d.peer_native_xdp => PathReason::VethPeerRunsXdp,
                    "veth" => PathReason::VethPeerWithoutXdp,
                    "" => PathReason::Driver,
                    _ => PathReason::NoXdpTransmit,
                }
            };
            let xdp_transmit = forwarding != Forwarding::Kernel
                && matches!(
                    device,
                    PathReason::Generic | PathReason::VethPeerRunsXdp | PathReason::Driver
                );
            let reason = if forwarding == Forwarding::Kernel {
                PathReason::Forced
            } else if !scan.netfilter_tables.is_empty() {
                PathReason::Netfilter
            } else {
                device
            };
            Decision {
                ifindex: d.ifindex,
                name: d.name.clone(),
                fast: xdp_transmit && reason == device,
                reason,
                xdp_transmit,
            }
        })
        .collect()
}

/// Why `--forwarding fast` cannot be honoured here, if it cannot: every up device that would
/// not take the fast path, with its reason.
pub fn fast_refusal(scan: &NodeScan, decisions: &[Decision]) -> Option<String> {
    let mut problems = Vec::new();
    if !scan.netfilter_tables.is_empty() {
        problems.push(format!(
            "netfilter tables are loaded ({}): redirected packets would bypass their connection \
             tracking (kube-proxy's INVALID drop, masquerade)",
            scan.netfilter_tables.join(", ")
        ));
    } else {
        for d in decisions.iter().filter(|d| !d.fast) {
            let up = scan
                .devices
                .iter()
                .any(|dev| dev.ifindex == d.ifindex && dev.up);
            if up {
                problems.push(format!("{}: {}", d.name, d.reason.describe()));
            }
        }
    }
    (!problems.is_empty()).then(|| {
        format!(
            "--forwarding fast cannot be honoured on this node: {}; use --forwarding auto (or kernel)",
            problems.join("; ")
        )
    })
}

/// The two maps the decisions live in, and the epoch that tells the XDP program's cached next
/// hops (which carry a device's path) when to look again.
pub struct PathMaps {
    egress: HashMap<MapData, u32, EgressPath>,
    redirect: DevMapHash<MapData>,
    epoch: Array<MapData, u32>,
    current: BTreeMap<u32, Decision>,
}

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name}: {source}")]
    Xdp {
        name: &'static str,
        source: aya::maps::xdp::XdpMapError,
    },
}

impl PathMaps {
    pub fn adopt(mut take: impl FnMut(&str) -> Option<Map>) -> Result<Self, PathError> {
        let map = |name| move |source| PathError::Map { name, source };
        let egress =
            take(map_names::EGRESS_PATHS).ok_or(PathError::Missing(map_names::EGRESS_PATHS))?;
        let redirect = take(map_names::REDIRECT_DEVICES)
            .ok_or(PathError::Missing(map_names::REDIRECT_DEVICES))?;
        let egress: HashMap<MapData, u32, EgressPath> =
            HashMap::try_from(egress).map_err(map(map_names::EGRESS_PATHS))?;
        let redirect = DevMapHash::try_from(redirect).map_err(map(map_names::REDIRECT_DEVICES))?;
        let epoch =
            take(map_names::NEXT_HOP_EPOCH).ok_or(PathError::Missing(map_names::NEXT_HOP_EPOCH))?;
        let epoch = Array::try_from(epoch).map_err(map(map_names::NEXT_HOP_EPOCH))?;
        Ok(PathMaps {
            egress,
            redirect,
            epoch,
            current: BTreeMap::new(),
        })
    }

    /// Moves the epoch on: every cached next hop is resolved again (FIB, neighbour and path) at
    /// its next packet. Called after each rescan, so a neighbour's new MAC is seen within one.
    pub fn refresh_next_hops(&mut self) -> Result<(), PathError> {
        let err = |source| PathError::Map {
            name: map_names::NEXT_HOP_EPOCH,
            source,
        };
        let epoch = self.epoch.get(&0, 0).map_err(err)?;
        self.epoch.set(0, next_epoch(epoch), 0).map_err(err)
    }

    /// Writes `decisions` (the whole set: devices not in it lose theirs) and returns the ones
    /// that changed.
    pub fn sync(&mut self, decisions: &[Decision]) -> Result<Vec<Decision>, PathError> {
        let egress_err = |source| PathError::Map {
            name: map_names::EGRESS_PATHS,
            source,
        };
        let mut changed = Vec::new();
        let wanted: BTreeMap<u32, &Decision> = decisions.iter().map(|d| (d.ifindex, d)).collect();
        // Stale entries first: pinned ones from a previous agent too.
        let pinned: Vec<u32> = self.egress.keys().filter_map(Result::ok).collect();
        let mut removed = false;
        for ifindex in pinned {
            if !wanted.contains_key(&ifindex) {
                removed = true;
                let _ = self.egress.remove(&ifindex);
                let _ = self.redirect.remove(ifindex);
                self.current.remove(&ifindex);
            }
        }
        for (ifindex, d) in wanted {
            if self.current.get(&ifindex) == Some(d) {
                continue;
            }
            // The redirect map first, so a fast entry never names a device it lacks. It holds
            // every device that takes XDP frames: SNATed flows use them on the kernel path too.
            if d.xdp_transmit {
                self.redirect
                    .insert(ifindex, ifindex, None, 0)
                    .map_err(|source| PathError::Xdp {
                        name: map_names::REDIRECT_DEVICES,
                        source,
                    })?;
            }
            let mut name = [0u8; 16];
            for (slot, byte) in name.iter_mut().zip(d.name.bytes().take(15)) {
                *slot = byte;
            }
            let value = EgressPath {
                path: if d.fast { PATH_FAST } else { PATH_KERNEL },
                reason: d.reason as u8,
                xdp_transmit: d.xdp_transmit.into(),
                pad: 0,
                ifindex,
                name,
            };
            self.egress.insert(ifindex, value, 0).map_err(egress_err)?;
            if !d.xdp_transmit {
                let _ = self.redirect.remove(ifindex);
            }
            self.current.insert(ifindex, d.clone());
            changed.push(d.clone());
        }
        // After the decisions are written: a next hop resolved from here on sees them.
        if removed || !changed.is_empty() {
            self.refresh_next_hops()?;
        }
        Ok(changed)
    }
}

/// A device's path as `inspect` and `/metrics` show it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct EgressView {
    pub iface: String,
    pub ifindex: u32,
    /// `fast` or `kernel`.
    pub path: &'static str,
    pub reason: &'static str,
    pub why: &'static str,
}

/// A backend's path: the device its packets leave by (from the cached FIB result) and that
/// device's path.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendPath {
    /// None until a packet was routed to the backend.
    pub egress: Option<String>,
    /// `fast`, `kernel`, or `unresolved` (no packet yet).
    pub path: &'static str,
    pub reason: &'static str,
}

/// Reads the pinned decisions (empty when the pins predate them).
pub fn read_egress(pins: &Pins) -> BTreeMap<u32, EgressView> {
    let Ok(data) = MapData::from_pin(pins.map(map_names::EGRESS_PATHS)) else {
        return BTreeMap::new();
    };
    let Ok(map) = Map::from_map_data(data)
        .map_err(|_| ())
        .and_then(|m| HashMap::<MapData, u32, EgressPath>::try_from(m).map_err(|_| ()))
    else {
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(Result::ok)
        .map(|(ifindex, e)| {
            let reason = PathReason::from_u8(e.reason);
            let len = e.name.iter().position(|b| *b == 0).unwrap_or(16);
            (
                ifindex,
                EgressView {
                    iface: String::from_utf8_lossy(&e.name[..len]).into_owned(),
                    ifindex,
                    path: if e.path == PATH_FAST {
                        "fast"
                    } else {
                        "kernel"
                    },
                    reason: reason.name(),
                    why: reason.describe(),
                },
            )
        })
        .collect()
}

/// The cached next hops, to learn each backend's egress device.
pub fn open_next_hops(pins: &Pins) -> Option<PerCpuArray<MapData, NextHop>> {
    let data = MapData::from_pin(pins.map(map_names::NEXT_HOPS)).ok()?;
    PerCpuArray::try_from(Map::from_map_data(data).ok()?).ok()
}

pub fn backend_path(
    next_hops: Option<&PerCpuArray<MapData, NextHop>>,
    egress: &BTreeMap<u32, EgressView>,
    backend_id: u32,
) -> BackendPath {
    let hop = next_hops
        .and_then(|m| m.get(&backend_id, 0).ok())
        .and_then(|per_cpu| {
            per_cpu
                .iter()
                .filter(|h| h.epoch != 0)
                .max_by_key(|h| h.epoch)
                .copied()
        });
    match hop {
        None => BackendPath {
            egress: None,
            path: "unresolved",
            reason: "no packet routed to it yet",
        },
        Some(hop) => match egress.get(&hop.ifindex) {
            Some(e) => BackendPath {
                egress: Some(e.iface.clone()),
                path: e.path,
                reason: e.reason,
            },
            None => BackendPath {
                egress: Some(format!("ifindex {}", hop.ifindex)),
                path: "kernel",
                reason: PathReason::Unknown.name(),
            },
        },
    }
}

// Netlink, just what the scan needs.

const IFINFO: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_XDP: u16 = 43;
const IFLA_TARGET_NETNSID: u16 = 46;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const ARPHRD_LOOPBACK: u16 = 772;

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn ifinfo(index: i32) -> [u8; IFINFO] {
    let mut body = [0u8; IFINFO];
    body[4..8].copy_from_slice(&index.to_ne_bytes());
    body
}

/// A parsed RTM_NEWLINK: the device, its veth peer (ifindex, netns id) and whether it runs
/// native XDP.
type Link = (Device, Option<u32>, Option<i32>, bool);

fn parse_link(message: &[u8]) -> Option<Link> {
    let info = message.get(HEADER..HEADER + IFINFO)?;
    let arp_type = u16_at(info, 2);
    let ifindex = i32::from_ne_bytes(info[4..8].try_into().ok()?) as u32;
    let flags = u32::from_ne_bytes(info[8..12].try_into().ok()?);
    let mut device = Device {
        ifindex,
        name: String::new(),
        kind: String::new(),
        loopback: arp_type == ARPHRD_LOOPBACK,
        up: flags & libc::IFF_UP as u32 != 0,
        peer_native_xdp: false,
    };
    let (mut peer, mut netns, mut native_xdp) = (None, None, false);
    for (kind, value) in attributes(&message[HEADER + IFINFO..]) {
        match kind {
            IFLA_IFNAME => device.name = text(value),
            IFLA_LINK if value.len() >= 4 => {
                peer = Some(u32::from_ne_bytes(value[..4].try_into().ok()?));
            }
            IFLA_LINK_NETNSID if value.len() >= 4 => {
                netns = Some(i32::from_ne_bytes(value[..4].try_into().ok()?));
            }
            IFLA_LINKINFO => {
                if let Some((_, kind)) = attributes(value).find(|(k, _)| *k == IFLA_INFO_KIND) {
                    device.kind = text(kind);
                }
            }
            IFLA_XDP => {
                for (kind, value) in attributes(value) {
                    match kind {
                        // XDP_ATTACHED_DRV
                        IFLA_XDP_ATTACHED if value.first() == Some(&1) => native_xdp = true,
                        IFLA_XDP_DRV_PROG_ID => native_xdp = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((device, peer, netns, native_xdp))
}

fn links() -> io::Result<Vec<Device>> {
    let messages = request(
        libc::NETLINK_ROUTE,
        libc::RTM_GETLINK,
        NLM_F_DUMP,
        &ifinfo(0),
    )?;
    Ok(messages
        .iter()
        .filter(|m| u16_at(m, 4) == libc::RTM_NEWLINK)
        .filter_map(|m| parse_link(m).map(|(device, ..)| device))
        .collect())
}

/// Whether the peer of veth `ifindex` runs a native XDP program (it may sit in another
/// namespace: asked for through its netns id).
fn peer_native_xdp(ifindex: u32) -> io::Result<bool> {
    let get = |index: u32, netns: Option<i32>| -> io::Result<Option<Link>> {
        let mut body = ifinfo(index as i32).to_vec();
        if let Some(netns) = netns {
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&IFLA_TARGET_NETNSID.to_ne_bytes());
            body.extend_from_slice(&netns.to_ne_bytes());
        }
        let messages = request(libc::NETLINK_ROUTE, libc::RTM_GETLINK, 0, &body)?;
        Ok(messages.first().and_then(|m| parse_link(m)))
    };
    let Some((_, Some(peer), netns, _)) = get(ifindex, None)? else {
        return Ok(false);
    };
    Ok(get(peer, netns)?.is_some_and(|(.., native_xdp)| native_xdp))
}

/// nf_tables tables in this namespace (iptables-nft's included), as `FAMILY NAME`.
fn nft_tables() -> io::Result<Vec<String>> {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFT_MSG_NEWTABLE: u16 = 0;
    const NFTA_TABLE_NAME: u16 = 1;
    const NFGENMSG: usize = 4;
    let messages = request(
        libc::NETLINK_NETFILTER,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        NLM_F_DUMP,
        &[0u8; NFGENMSG],
    )?;
    Ok(messages
        .iter()
        .filter(|m| u16_at(m, 4) == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE)
        .filter_map(|m| {
            let family = match m.get(HEADER)? {
                1 => "inet",
                2 => "ip",
                3 => "arp",
                5 => "netdev",
                7 => "bridge",
                10 => "ip6",
                _ => "?",
            };
            let (_, name) =
                attributes(m.get(HEADER + NFGENMSG..)?).find(|(k, _)| *k == NFTA_TABLE_NAME)?;
            Some(format!("{family} {}", text(name)))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, kind: &str, peer_native_xdp: bool) -> Device {
        Device {
            ifindex: name.len() as u32,
            name: name.into(),
            kind: kind.into(),
            loopback: false,
            up: true,
            peer_native_xdp,
        }
    }

    #[test]
    fn paths_by_device_mode_and_netfilter() {
        let scan = NodeScan {
            devices: vec![
                device("br", "bridge", false),
                device("vethx", "veth", false),
                device("vethxdp", "veth", true),
                device("enp1s0", "", false),
                device("vxlan.c", "vxlan", false),
            ],
            netfilter_tables: vec![],
        };
        let reasons = |mode, forwarding| -> Vec<(bool, PathReason)> {
            decide(&scan, mode, forwarding)
                .into_iter()
                .map(|d| (d.fast, d.reason))
                .collect()
        };
        use PathReason::*;
        assert_eq!(
            reasons(XdpAttachMode::Native, Forwarding::Auto),
            [
                (false, Bridge),
                (false, VethPeerWithoutXdp),
                (true, VethPeerRunsXdp),
                (true, Driver),
                (false, NoXdpTransmit)
            ]
        );
        assert!(
            reasons(XdpAttachMode::Generic, Forwarding::Auto)
                .iter()
                .all(|r| *r == (true, Generic))
        );
        assert!(
            reasons(XdpAttachMode::Generic, Forwarding::Kernel)
                .iter()
                .all(|r| *r == (false, Forced))
        );
        let refusal = fast_refusal(
            &scan,
            &decide(&scan, XdpAttachMode::Native, Forwarding::Fast),
        )
        .expect("refused");
        assert!(
            refusal.contains("br: native XDP cannot transmit into a bridge"),
            "{refusal}"
        );
        let generic = decide(&scan, XdpAttachMode::Generic, Forwarding::Fast);
        assert_eq!(fast_refusal(&scan, &generic), None);

        let kube = NodeScan {
            netfilter_tables: vec!["ip filter".into()],
            ..scan.clone()
        };
        assert!(
            decide(&kube, XdpAttachMode::Generic, Forwarding::Auto)
                .iter()
                .all(|d| !d.fast && d.reason == Netfilter)
        );
        // SNATed flows keep XDP where the device takes its frames, netfilter or not.
        let transmit = |scan: &NodeScan, mode, forwarding| -> Vec<bool> {
            decide(scan, mode, forwarding)
                .iter()
                .map(|d| d.xdp_transmit)
                .collect()
        };
        assert_eq!(
            transmit(&kube, XdpAttachMode::Native, Forwarding::Auto),
            [false, false, true, true, false]
        );
        assert!(
            transmit(&kube, XdpAttachMode::Generic, Forwarding::Auto)
                .iter()
                .all(|t| *t)
        );
        assert!(
            !transmit(&scan, XdpAttachMode::Generic, Forwarding::Kernel)
                .iter()
                .any(|t| *t)
        );
        let refusal = fast_refusal(&kube, &[]).expect("refused");
        assert!(refusal.contains("ip filter"), "{refusal}");
    }
}

/// One backend's path, for `inspect` and `/metrics`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendPathView {
    /// `TCP 192.0.2.10:80`.
    pub service: String,
    /// `203.0.113.2:8080`.
    pub backend: String,
    #[serde(flatten)]
    pub path: BackendPath,
}

/// Which path every device and every backend takes, and why.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PathReport {
    pub egress_paths: Vec<EgressView>,
    pub backend_paths: Vec<BackendPathView>,
}

/// The paths of the devices and of the backends in `report`, from the pinned maps.
pub fn read_report(pins: &Pins, report: &crate::inspect::Report) -> PathReport {
    let egress = read_egress(pins);
    let next_hops = open_next_hops(pins);
    let mut backend_paths = Vec::new();
    for s in &report.services {
        for b in &s.backends {
            backend_paths.push(BackendPathView {
                service: format!("{} {}:{}", s.protocol, s.vip, s.port),
                backend: b.endpoint(),
                path: backend_path(next_hops.as_ref(), &egress, b.id),
            });
        }
    }
    PathReport {
        egress_paths: egress.into_values().collect(),
        backend_paths,
    }
}

impl PathReport {
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from("FORWARDING PATHS (devices)\n");
        for e in &self.egress_paths {
            let _ = writeln!(
                out,
                "  {:<16} {:<6} {}: {}",
                e.iface, e.path, e.reason, e.why
            );
        }
        out.push_str("FORWARDING PATHS (backends)\n");
        for b in &self.backend_paths {
            let _ = writeln!(
                out,
                "  {} -> {:<28} {:<10} via {} ({})",
                b.service,
                b.backend,
                b.path.path,
                b.path.egress.as_deref().unwrap_or("-"),
                b.path.reason
            );
        }
        out
    }
}
