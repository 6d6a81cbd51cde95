//! SNAT for backends on other nodes: the `--snat*` flags, the configuration the XDP program
//! reads (`FULGUR_SNAT_CONFIG`), the agent's clock the program stamps entries with, and the
//! garbage collection of idle SNAT flows (their flow and reply entries together).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use fulgur_common::{
    FAMILY_IPV4, FlowKey, PROTO_TCP, SNAT_ALWAYS, SNAT_CLOSING, SNAT_HAS_IPV4, SNAT_HAS_IPV6,
    SNAT_NEVER, SNAT_REMOTE, SnatConfig, SnatFlow, SnatReply, defaults, encode_addr, map_names,
};
use serde::Serialize;

use crate::{dataplane::Pins, netlink};

/// `--snat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnatMode {
    /// Flows to backends on other nodes leave with this node's address; local backends keep
    /// the client's address.
    Remote,
    /// Every flow is SNATed (the client address is lost everywhere).
    Always,
    /// No SNAT: backends on other nodes are refused.
    Never,
}

impl SnatMode {
    /// Backends marked remote are accepted (and "remote-backends" is listed).
    pub fn remote_backends(self) -> bool {
        self != SnatMode::Never
    }

    fn code(self) -> u8 {
        match self {
            SnatMode::Remote => SNAT_REMOTE,
            SnatMode::Always => SNAT_ALWAYS,
            SnatMode::Never => SNAT_NEVER,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SnatMode::Remote => "remote",
            SnatMode::Always => "always",
            SnatMode::Never => "never",
        }
    }
}

/// `--snat-ports MIN-MAX`, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            min: defaults::SNAT_PORT_MIN,
            max: defaults::SNAT_PORT_MAX,
        }
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a port range MIN-MAX (e.g. 61000-65535)");
        let (min, max) = text.split_once('-').ok_or_else(bad)?;
        let (min, max): (u16, u16) = (
            min.trim().parse().map_err(|_| bad())?,
            max.trim().parse().map_err(|_| bad())?,
        );
        if min == 0 {
            return Err(format!("{text:?}: port 0 cannot be an SNAT port"));
        }
        if min > max {
            return Err(format!("{text:?} is empty: {min} is above {max}"));
        }
        Ok(PortRange { min, max })
    }
}

impl PortRange {
    pub fn len(&self) -> u32 {
        u32::from(self.max - self.min) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Refuses a range that overlaps the node's ephemeral ports
    /// (`net.ipv4.ip_local_port_range`, which IPv6 shares): the node's own connections would
    /// collide with translated flows.
    pub fn check_against(&self, ephemeral: PortRange) -> Result<(), String> {
        if self.min <= ephemeral.max && ephemeral.min <= self.max {
            return Err(format!(
                "--snat-ports {self} overlaps this node's ephemeral ports {ephemeral} \
                 (/proc/sys/net/ipv4/ip_local_port_range): the node's own connections would \
                 collide with translated flows; pick a range outside it (the default is \
                 {}) or narrow ip_local_port_range",
                PortRange::default()
            ));
        }
        Ok(())
    }
}

/// This network namespace's ephemeral port range.
pub fn ephemeral_ports() -> std::io::Result<PortRange> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next()) {
        (Some(Ok(min)), Some(Ok(max))) => Ok(PortRange { min, max }),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("ip_local_port_range reads {text:?}"),
        )),
    }
}

/// The node addresses SNATed flows leave from, at most one per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeAddresses {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl NodeAddresses {
    /// From `--snat-address` values: one per family at most.
    pub fn from_flags(addresses: &[IpAddr]) -> Result<Self, String> {
        let mut out = NodeAddresses::default();
        for address in addresses {
            if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
                return Err(format!(
                    "--snat-address {address}: not a unicast address other nodes can answer"
                ));
            }
            match address {
                IpAddr::V4(v4) if out.ipv4.replace(*v4).is_some() => {
                    return Err("--snat-address is given twice for IPv4 (one per family)".into());
                }
                IpAddr::V6(v6) if out.ipv6.replace(*v6).is_some() => {
                    return Err("--snat-address is given twice for IPv6 (one per family)".into());
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The first global IPv4 and IPv6 address of interface `iface`.
    pub fn of_interface(iface: &str) -> std::io::Result<Self> {
        let mut out = NodeAddresses::default();
        for (name, address) in interface_addresses()? {
            if name != iface {
                continue;
            }
            match address {
                IpAddr::V4(v4)
                    if out.ipv4.is_none() && !v4.is_loopback() && !v4.is_link_local() =>
                {
                    out.ipv4 = Some(v4);
                }
                IpAddr::V6(v6)
                    if out.ipv6.is_none()
                        && !v6.is_loopback()
                        && !v6.is_unicast_link_local()
                        && !v6.is_multicast() =>
                {
                    out.ipv6 = Some(v6);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.ipv4.is_none() && self.ipv6.is_none()
    }
}

/// Every (interface, address) pair, in the kernel's order (getifaddrs).
fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = list;
    // SAFETY: a linked list the kernel's answer built; each node is valid until freeifaddrs.
    unsafe {
        while !cursor.is_null() {
            let entry = &*cursor;
            cursor = entry.ifa_next;
            if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(entry.ifa_name)
                .to_string_lossy()
                .into_owned();
            match (*entry.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    out.push((name, IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    out.push((name, IpAddr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        libc::freeifaddrs(list);
    }
    Ok(out)
}

/// The SNAT settings of this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SnatSettings {
    pub mode: SnatMode,
    pub ports: PortRange,
    pub addresses: NodeAddresses,
}

impl SnatSettings {
    /// The configuration map's value at `now` (agent clock seconds).
    pub fn config(&self, now: u32) -> SnatConfig {
        let mut config = SnatConfig {
            now,
            port_min: self.ports.min,
            port_max: self.ports.max,
            mode: self.mode.code(),
            ..SnatConfig::default()
        };
        if let Some(v4) = self.addresses.ipv4 {
            config.addr_v4 = encode_addr(IpAddr::V4(v4)).0;
            config.families |= SNAT_HAS_IPV4;
        }
        if let Some(v6) = self.addresses.ipv6 {
            config.addr_v6 = encode_addr(IpAddr::V6(v6)).0;
            config.families |= SNAT_HAS_IPV6;
        }
        config
    }
}

/// Idle timeouts of SNAT entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// TCP without a FIN or RST seen.
    pub tcp: Duration,
    /// TCP after a FIN or RST.
    pub tcp_closing: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    /// As long-lived as Linux keeps an idle established TCP flow's port worth holding (2 h),
    /// a few seconds after a close, and a minute for UDP (Cilium's and conntrack's order).
    fn default() -> Self {
        Timeouts {
            tcp: Duration::from_secs(7200),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

/// CLOCK_MONOTONIC in whole seconds: the clock the programs stamp entries with.
pub fn monotonic_seconds() -> u32 {
    crate::clock::monotonic().as_secs() as u32
}

#[derive(Debug, thiserror::Error)]
pub enum SnatError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> SnatError {
    move |source| SnatError::Map { name, source }
}

/// What one garbage collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// SNAT flows left (reply entries).
    pub flows: usize,
    /// Flows removed (both entries).
    pub removed: usize,
}

/// The SNAT maps, as the agent holds them.
pub struct SnatMaps {
    config: Array<MapData, SnatConfig>,
    flows: HashMap<MapData, FlowKey, SnatFlow>,
    replies: HashMap<MapData, FlowKey, SnatReply>,
    settings: SnatSettings,
    /// Entries are not collected before this clock value: a restarted agent does not know how
    /// long it was away, so every adopted flow gets a full timeout.
    collect_after: u32,
}

impl SnatMaps {
    pub fn adopt(
        mut take: impl FnMut(&'static str) -> Option<Map>,
        settings: SnatSettings,
    ) -> Result<Self, SnatError> {
        let mut get = |name| take(name).ok_or(SnatError::Missing(name));
        let config = Array::try_from(get(map_names::SNAT_CONFIG)?)
            .map_err(map_err(map_names::SNAT_CONFIG))?;
        let flows = HashMap::try_from(get(map_names::SNAT_FLOWS)?)
            .map_err(map_err(map_names::SNAT_FLOWS))?;
        let replies = HashMap::try_from(get(map_names::SNAT_REPLIES)?)
            .map_err(map_err(map_names::SNAT_REPLIES))?;
        let mut maps = SnatMaps {
            config,
            flows,
            replies,
            settings,
            collect_after: 0,
        };
        let now = monotonic_seconds();
        maps.collect_after = now;
        maps.write_config(now)?;
        Ok(maps)
    }

    pub fn settings(&self) -> SnatSettings {
        self.settings
    }

    /// Writes the configuration with the clock at `now`; called every second.
    pub fn write_config(&mut self, now: u32) -> Result<(), SnatError> {
        self.config
            .set(0, self.settings.config(now), 0)
            .map_err(map_err(map_names::SNAT_CONFIG))
    }

    /// Removes SNAT flows idle for longer than their timeout at `now` (both entries), and flow
    /// entries whose reply entry is gone or belongs to another flow.
    pub fn collect(&mut self, now: u32, timeouts: &Timeouts) -> Result<Collected, SnatError> {
        let replies: Vec<(FlowKey, SnatReply)> =
            self.replies.iter().filter_map(Result::ok).collect();
        let mut kept = BTreeSet::new();
        let mut collected = Collected::default();
        for (reply_key, reply) in replies {
            let flow_key = reply.client_flow(reply_key.proto, reply_key.family);
            let flow = self.flows.get(&flow_key, 0).ok();
            // The flow entry may point at another port (a reselected flow): then only this
            // reply entry is garbage, once idle.
            let owns = flow.is_some_and(|f| {
                f.node_port == reply_key.dst_port
                    && f.backend_port == reply_key.src_port
                    && f.backend_addr == reply_key.src
            });
            let last_seen = reply
                .last_seen
                .max(flow.filter(|_| owns).map_or(0, |f| f.last_seen))
                .max(self.collect_after);
            let closing = reply.state == SNAT_CLOSING
                || flow.is_some_and(|f| owns && f.state == SNAT_CLOSING);
            let timeout = if reply_key.proto != PROTO_TCP {
                timeouts.udp
            } else if closing {
                timeouts.tcp_closing
            } else {
                timeouts.tcp
            };
            if u64::from(now.saturating_sub(last_seen)) < timeout.as_secs() {
                if owns {
                    kept.insert(key_bytes(&flow_key));
                }
                collected.flows += 1;
                continue;
            }
            if owns {
                let _ = self.flows.remove(&flow_key);
            }
            match self.replies.remove(&reply_key) {
                Ok(()) | Err(MapError::KeyNotFound) => collected.removed += 1,
                Err(e) => return Err(map_err(map_names::SNAT_REPLIES)(e)),
            }
        }
        // Flow entries no reply entry owns: a failed insert's leftover, or a race.
        let orphans: Vec<FlowKey> = self
            .flows
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !kept.contains(&key_bytes(k)))
            .collect();
        for key in orphans {
            let _ = self.flows.remove(&key);
        }
        Ok(collected)
    }
}

fn key_bytes(key: &FlowKey) -> [u32; 10] {
    [
        key.src[0],
        key.src[1],
        key.src[2],
        key.src[3],
        key.dst[0],
        key.dst[1],
        key.dst[2],
        key.dst[3],
        (u32::from(key.src_port) << 16) | u32::from(key.dst_port),
        u32::from(key.proto) | (u32::from(key.family) << 8),
    ]
}

/// Has the kernel resolve the neighbour a packet to `backend` leaves through (its route's
/// gateway, or the backend itself on-link): RTM_GETROUTE, then RTM_NEWNEIGH with NTF_USE, which
/// creates the entry if needed and starts (or refreshes) its resolution. SNATed packets never
/// pass through the kernel, so nothing else would: a FIB lookup without a neighbour drops them
/// (`snat_no_neighbour`), and an entry only XDP uses would go stale and be collected.
pub fn resolve_next_hop(backend: IpAddr) -> std::io::Result<()> {
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    const NDA_DST: u16 = 1;
    const NTF_USE: u8 = 0x01;
    const NLM_F_ACK: u16 = 0x04;
    const NLM_F_CREATE: u16 = 0x400;
    const RTMSG: usize = 12;

    let (family, bytes): (u8, Vec<u8>) = match backend {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let attribute = |kind: u16, value: &[u8]| {
        let mut out = Vec::with_capacity(4 + value.len());
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    };
    let mut route = vec![0u8; RTMSG];
    route[0] = family;
    route[1] = (bytes.len() * 8) as u8;
    route.extend(attribute(RTA_DST, &bytes));
    let answer = netlink::request(libc::NETLINK_ROUTE, libc::RTM_GETROUTE, 0, &route)?;
    let message = answer
        .iter()
        .find(|m| netlink::u16_at(m, 4) == libc::RTM_NEWROUTE)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no route"))?;
    let (mut oif, mut next_hop) = (None, bytes.clone());
    for (kind, value) in netlink::attributes(message.get(netlink::HEADER + RTMSG..).unwrap_or(&[]))
    {
        match kind {
            RTA_OIF if value.len() >= 4 => {
                oif = Some(i32::from_ne_bytes(value[..4].try_into().expect("4 bytes")));
            }
            RTA_GATEWAY if value.len() == bytes.len() => next_hop = value.to_vec(),
            _ => {}
        }
    }
    let oif = oif.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the route names no device")
    })?;
    let mut neighbour = vec![0u8; 12];
    neighbour[0] = family;
    neighbour[4..8].copy_from_slice(&oif.to_ne_bytes());
    neighbour[10] = NTF_USE;
    neighbour.extend(attribute(NDA_DST, &next_hop));
    netlink::request(
        libc::NETLINK_ROUTE,
        libc::RTM_NEWNEIGH,
        NLM_F_CREATE | NLM_F_ACK,
        &neighbour,
    )
    .map(drop)
}

/// The backends on other nodes whose next hops the kernel is kept resolving: after each apply
/// (new ones at once) and every few seconds (so entries only XDP uses stay fresh).
#[derive(Clone, Default)]
pub struct RemoteNextHops {
    backends: std::sync::Arc<std::sync::Mutex<BTreeSet<IpAddr>>>,
}

impl RemoteNextHops {
    /// Takes the remote backends of `set`; resolves the ones not seen before.
    pub fn update(&self, set: &crate::config::ValidServiceSet) {
        let wanted: BTreeSet<IpAddr> = set
            .services
            .iter()
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.remote)
            .map(|b| b.address)
            .collect();
        let new: Vec<IpAddr> = {
            let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
            let new = wanted.difference(&backends).copied().collect();
            *backends = wanted;
            new
        };
        resolve_all(&new);
    }

    /// Refreshes every remote backend's next hop.
    pub fn refresh(&self) {
        let all: Vec<IpAddr> = self
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        resolve_all(&all);
    }
}

fn resolve_all(backends: &[IpAddr]) {
    for backend in backends {
        if let Err(e) = resolve_next_hop(*backend) {
            tracing::debug!(%backend, "resolving the next hop of a remote backend: {e}");
        }
    }
}

/// SNAT as `inspect` and `/metrics` show it, read from the pins.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SnatView {
    /// `remote`, `always`, `never`, or `absent` (pins without SNAT maps).
    pub mode: String,
    pub ports: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// SNATed flows (reply entries).
    pub flows: usize,
}

/// Reads the pinned SNAT state.
pub fn read_view(pins: &Pins) -> SnatView {
    let open = |name: &str| {
        MapData::from_pin(pins.map(name))
            .ok()
            .and_then(|d| Map::from_map_data(d).ok())
    };
    let Some(config) = open(map_names::SNAT_CONFIG)
        .and_then(|m| Array::<MapData, SnatConfig>::try_from(m).ok())
        .and_then(|a| a.get(&0, 0).ok())
    else {
        return SnatView {
            mode: "absent".into(),
            ..SnatView::default()
        };
    };
    let flows = open(map_names::SNAT_REPLIES)
        .and_then(|m| HashMap::<MapData, FlowKey, SnatReply>::try_from(m).ok())
        .map_or(0, |m| m.keys().filter_map(Result::ok).count());
    let mode = match config.mode {
        SNAT_REMOTE => "remote",
        SNAT_ALWAYS => "always",
        _ => "never",
    };
    let decode = |addr: &fulgur_common::Addr, family| fulgur_common::decode_addr(addr, family);
    SnatView {
        mode: mode.into(),
        ports: format!("{}-{}", config.port_min, config.port_max),
        ipv4: (config.families & SNAT_HAS_IPV4 != 0).then(|| {
            match decode(&config.addr_v4, FAMILY_IPV4) {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(_) => unreachable!("an IPv4 family decodes to IPv4"),
            }
        }),
        ipv6: (config.families & SNAT_HAS_IPV6 != 0).then(|| {
            match decode(&config.addr_v6, fulgur_common::FAMILY_IPV6) {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(_) => unreachable!("an IPv6 family decodes to IPv6"),
            }
        }),
        flows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_the_ephemeral_range() {
        let range: PortRange = "61000-65535".parse().unwrap();
        assert_eq!((range.min, range.max, range.len()), (61000, 65535, 4536));
        for bad in ["", "61000", "65535-61000", "0-10", "61000-70000", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let linux_default = PortRange {
            min: 32768,
            max: 60999,
        };
        assert_eq!(range.check_against(linux_default), Ok(()));
        let overlap: PortRange = "60000-61000".parse().unwrap();
        let refusal = overlap.check_against(linux_default).unwrap_err();
        assert!(
            refusal.contains("overlaps this node's ephemeral ports 32768-60999"),
            "{refusal}"
        );
    }

    #[test]
    fn one_snat_address_per_family() {
        let ok = NodeAddresses::from_flags(&[
            "192.0.2.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ])
        .unwrap();
        assert_eq!(ok.ipv4, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(
            NodeAddresses::from_flags(&[
                "192.0.2.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap()
            ])
            .is_err()
        );
        assert!(NodeAddresses::from_flags(&["0.0.0.0".parse().unwrap()]).is_err());
    }
}
