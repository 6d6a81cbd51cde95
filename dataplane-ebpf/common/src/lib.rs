//! The ABI between the fulgur eBPF programs and userspace: map names, `#[repr(C)]` keys and
//! values, counter indices and the flow hash. Declared once, here, and nowhere else.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod csum;
pub mod hash;
pub mod icmp;

/// Pinned map names. The eBPF side declares maps with exactly these identifiers.
pub mod map_names {
    pub const SERVICES: &str = "FULGUR_SERVICES";
    pub const BACKENDS: &str = "FULGUR_BACKENDS";
    pub const LOOKUP_TABLE: &str = "FULGUR_LOOKUP";
    pub const CONNTRACK: &str = "FULGUR_CONNTRACK";
    pub const REVERSE_NAT: &str = "FULGUR_REVNAT";
    pub const COUNTERS: &str = "FULGUR_COUNTERS";
    pub const SERVICE_STATS: &str = "FULGUR_SERVICE_STATS";
    pub const BACKEND_STATS: &str = "FULGUR_BACKEND_STATS";
    pub const NEXT_HOPS: &str = "FULGUR_NEXT_HOPS";
    pub const EGRESS_PATHS: &str = "FULGUR_EGRESS_PATHS";
    pub const REDIRECT_DEVICES: &str = "FULGUR_REDIRECT_DEVICES";
    pub const ANNOUNCED: &str = "FULGUR_ANNOUNCED";
    pub const ANNOUNCE_DEVICES: &str = "FULGUR_ANNOUNCE_DEVICES";
    /// One `u32`: the agent moves it on when egress paths change and every path rescan (so a
    /// neighbour's new MAC is seen within a rescan); cached next hops of another epoch are stale.
    pub const NEXT_HOP_EPOCH: &str = "FULGUR_NEXT_HOP_EPOCH";
    /// One [`SnatConfig`](crate::SnatConfig): mode, port range, node addresses, the clock.
    pub const SNAT_CONFIG: &str = "FULGUR_SNAT_CONFIG";
    /// Client flow ([`FlowKey`](crate::FlowKey)) → [`SnatFlow`](crate::SnatFlow); not LRU.
    pub const SNAT_FLOWS: &str = "FULGUR_SNAT_FLOWS";
    /// Backend→node reply tuple ([`FlowKey`](crate::FlowKey)) → [`SnatReply`](crate::SnatReply);
    /// not LRU: a live flow's port is never evicted.
    pub const SNAT_REPLIES: &str = "FULGUR_SNAT_REPLIES";
    /// Entry 0: until when (CLOCK_MONOTONIC ns, `bpf_ktime_get_ns`) the announced addresses
    /// are answered for; 0: no lease. Renewed by the agent on every RPC of the controller, so a
    /// dead agent's pinned program stops answering once the lease runs out.
    pub const ANNOUNCE_LEASE: &str = "FULGUR_ANNOUNCE_LEASE";
}

/// Program names as compiled into the object.
pub mod program_names {
    pub const XDP_INGRESS: &str = "fulgur_xdp_ingress";
    pub const TC_EGRESS: &str = "fulgur_tc_egress";
    pub const XDP_PASS: &str = "fulgur_xdp_pass";
}

/// Default map sizes; the agent may override them by flag before loading.
pub mod defaults {
    pub const MAX_SERVICES: u32 = 1024;
    pub const MAX_BACKENDS: u32 = 65536;
    pub const CONNTRACK_ENTRIES: u32 = 262_144;
    /// Lookup-table elements (two slots each), shared by all services' tables.
    pub const LOOKUP_TABLE_ENTRIES: u32 = 4 * 1024 * 1024;
    /// Devices with a forwarding-path decision (a node with many pods has a veth per pod).
    pub const EGRESS_DEVICES: u32 = 8192;
    /// Gateway addresses this node can announce (ARP / NDP) at once.
    pub const MAX_ANNOUNCED: u32 = 1024;
    /// Client-facing devices that answer ARP / NDP for announced addresses.
    pub const ANNOUNCE_DEVICES: u32 = 64;
    /// SNATed flows at once (each holds one entry in the flow map and one in the reply map).
    pub const SNAT_ENTRIES: u32 = 65536;
    /// The SNAT port range: above Linux's default ephemeral range (32768-60999).
    pub const SNAT_PORT_MIN: u16 = 61000;
    pub const SNAT_PORT_MAX: u16 = 65535;
    /// Ports tried for a new SNAT flow, from its hash on; none free = exhausted.
    pub const SNAT_PROBES: u32 = 16;
}

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;
// The ABI's protocol numbers (service keys, flows) are the wire's.
pub use consts::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Protocol numbers as packets carry them, for the XDP and the TC programs alike.
pub mod consts {
    pub const PROTO_ICMP: u8 = 1;
    pub const PROTO_TCP: u8 = 6;
    pub const PROTO_UDP: u8 = 17;
    pub const PROTO_ICMPV6: u8 = 58;

    /// Ethertypes as they sit in the packet (big endian read natively).
    pub const ETH_P_IPV4: u16 = 0x0800u16.to_be();
    pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
    pub const ETH_P_ARP: u16 = 0x0806u16.to_be();
    pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
    pub const ETH_HLEN: usize = 14;
    pub const VLAN_TAG_LEN: usize = 4;

    /// The more-fragments flag and fragment offset of the IPv4 flags/offset word: any
    /// fragment. Fragments are never translated: without reassembly only the first carries the
    /// ports.
    pub const IPV4_FRAGMENT_BITS: u16 = 0x3fff;

    /// IPv6 extension headers (next-header values) the parser walks over or refuses.
    pub const IPV6_HOP_BY_HOP: u8 = 0;
    pub const IPV6_ROUTING: u8 = 43;
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const IPV6_AUTH: u8 = 51;
    pub const IPV6_DEST_OPTS: u8 = 60;
    /// How many extension headers the parser follows before giving up (and passing the packet).
    pub const IPV6_MAX_EXT_HEADERS: usize = 6;

    /// ARP operations (RFC 826), host order.
    pub const ARP_REQUEST: u16 = 1;
    pub const ARP_REPLY: u16 = 2;
    /// Neighbour discovery (RFC 4861): ICMPv6 types, the hop limit every NDP message carries,
    /// the advertisement flags and the target link-layer address option.
    pub const NDP_SOLICITATION: u8 = 135;
    pub const NDP_ADVERTISEMENT: u8 = 136;
    pub const NDP_HOP_LIMIT: u8 = 255;
    pub const NA_SOLICITED: u8 = 0x40;
    pub const NA_OVERRIDE: u8 = 0x20;
    pub const NDP_OPTION_TARGET_LINK_LAYER: u8 = 2;
    /// All-nodes multicast (ff02::1) and its Ethernet group address (RFC 2464).
    pub const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
}

/// Limits of the controller↔agent contract: the agent refuses a service set beyond them and the
/// controller scales what it sends to fit (see `dataplane.proto`).
pub mod limits {
    /// Highest backend (and reject) weight; the Gateway API's weight range.
    pub const MAX_WEIGHT: u32 = 1_000_000;
    /// Backends per service (the Gateway API allows 16 backendRefs, each a Service with possibly
    /// many endpoints).
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 1024;
}

/// An address as four 32-bit words in network byte order. IPv4 uses word 0 only.
pub type Addr = [u32; 4];

/// Compared word by word: a slice compare would become a memcmp call BPF cannot make.
#[inline(always)]
pub fn addr_eq(a: &Addr, b: &Addr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// The 16 bytes of an IPv6 [`Addr`], as the packet holds them.
#[inline(always)]
pub fn addr_bytes(addr: &Addr) -> [u8; 16] {
    let [a, b, c, d] = [
        addr[0].to_ne_bytes(),
        addr[1].to_ne_bytes(),
        addr[2].to_ne_bytes(),
        addr[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// An IP address as the maps hold it: the [`Addr`] and its family.
pub const fn encode_addr(ip: core::net::IpAddr) -> (Addr, u8) {
    match ip {
        core::net::IpAddr::V4(v4) => (addr_v4(v4.octets()), FAMILY_IPV4),
        core::net::IpAddr::V6(v6) => (addr_v6(v6.octets()), FAMILY_IPV6),
    }
}

/// The IP address an [`Addr`] of `family` holds.
pub fn decode_addr(addr: &Addr, family: u8) -> core::net::IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    if family == FAMILY_IPV4 {
        core::net::IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
    } else {
        core::net::IpAddr::from(octets)
    }
}

/// Builds an [`Addr`] from IPv4 octets.
#[inline(always)]
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// Builds an [`Addr`] from IPv6 octets.
#[inline(always)]
pub const fn addr_v6(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// `{VIP, port, protocol}`: the key of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Where a service's backend-selection table lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable index of the service, used for its counters.
    pub id: u32,
    /// First slot of this service's table in the lookup-table map.
    pub table_base: u32,
    /// Slots in the table (a prime). 0 means the service has no table.
    pub table_size: u32,
    /// [`SERVICE_HAS_REMOTE`].
    pub flags: u32,
}

/// A backend of the service runs on another node ([`BACKEND_REMOTE`]): with `--snat remote`,
/// only such services' new flows take the SNAT path.
pub const SERVICE_HAS_REMOTE: u32 = 1;

/// One backend, indexed by a backend id that the agent keeps stable while the backend stays.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    /// [`BACKEND_LIVE`] when the slot holds a backend.
    pub flags: u8,
    /// The service this backend belongs to.
    pub service_id: u32,
}

pub const BACKEND_LIVE: u8 = 1;
/// The backend runs on another node: with `--snat remote` its flows are SNATed to this node's
/// address, so its replies come back here.
pub const BACKEND_REMOTE: u8 = 2;

/// The lookup-table map packs two table slots per element: the map is mmap-able, and the
/// kernel aligns mmap-able elements to 8 bytes.
pub type LookupEntry = [u32; 2];
pub const LOOKUP_SLOTS_PER_ENTRY: u32 = 2;

/// Where table slot `slot` sits in the lookup-table map: the element, and the slot within it.
#[inline(always)]
pub const fn lookup_position(slot: u32) -> (u32, usize) {
    (
        slot / LOOKUP_SLOTS_PER_ENTRY,
        (slot % LOOKUP_SLOTS_PER_ENTRY) as usize,
    )
}

impl ServiceValue {
    /// The table slot a flow with hash `hash` falls on; the table must not be empty.
    #[inline(always)]
    pub const fn slot(&self, hash: u32) -> u32 {
        self.table_base.wrapping_add(hash % self.table_size)
    }

    /// Every slot of this service's table.
    pub const fn slots(&self) -> core::ops::Range<u32> {
        self.table_base..self.table_base + self.table_size
    }
}

/// A lookup-table entry that rejects the flow (the weight of invalid backendRefs).
pub const REJECT: u32 = u32::MAX;

/// A cached FIB result for one backend, per CPU: where to send its packets, and by which path,
/// without a FIB and neighbour lookup (and a path lookup) on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    /// The Ethernet destination then source address, as they go into the frame: 4-byte aligned
    /// here and at the frame's start, so they are copied as three words.
    pub macs: [u8; 12],
    /// The [`NEXT_HOP_EPOCH`](map_names::NEXT_HOP_EPOCH) the entry was resolved in; it is
    /// trusted while the epoch stays. 0 = empty (the epoch is never 0).
    pub epoch: u32,
    /// [`PATH_FAST`] or [`PATH_KERNEL`]: the egress device's path at that epoch.
    pub path: u8,
    /// 1 when the device takes XDP frames (redirect / TX) whatever its path: SNATed flows take
    /// the fast path even where local ones take the kernel's for netfilter's sake.
    pub xdp_transmit: u8,
    pub pad: [u8; 2],
}

/// The next epoch after `epoch`: cached next hops of older epochs are resolved again. Skips 0,
/// the mark of an empty entry.
pub const fn next_epoch(epoch: u32) -> u32 {
    match epoch.wrapping_add(1) {
        0 => 1,
        next => next,
    }
}

/// How a translated packet leaves, decided per egress device by the agent.
pub const PATH_FAST: u8 = 1;
/// DNAT in XDP, then `XDP_PASS`: the kernel routes it and netfilter sees both directions.
pub const PATH_KERNEL: u8 = 2;

/// Why a device got its path. Stable numbers: they sit in a pinned map.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathReason {
    /// The device appeared after the agent's last scan.
    Unknown = 0,
    /// `--forwarding kernel`.
    Forced = 1,
    /// Netfilter tables in this namespace (kube-proxy, a CNI's masquerade): their connection
    /// tracking must see both directions of a flow.
    Netfilter = 2,
    /// Native XDP cannot transmit into a bridge.
    Bridge = 3,
    /// Native XDP frames sent into a veth are dropped unless its peer runs a native XDP program.
    VethPeerWithoutXdp = 4,
    /// A virtual device type that cannot take XDP frames (tunnels, dummy, bond...).
    NoXdpTransmit = 5,
    /// A veth whose peer runs native XDP: it takes redirected frames.
    VethPeerRunsXdp = 6,
    /// A physical device, driven natively: its driver takes redirected frames.
    Driver = 7,
    /// Generic XDP hands redirected packets to the device's normal transmit, any device.
    Generic = 8,
}

impl PathReason {
    pub const ALL: [PathReason; 9] = [
        PathReason::Unknown,
        PathReason::Forced,
        PathReason::Netfilter,
        PathReason::Bridge,
        PathReason::VethPeerWithoutXdp,
        PathReason::NoXdpTransmit,
        PathReason::VethPeerRunsXdp,
        PathReason::Driver,
        PathReason::Generic,
    ];

    pub fn from_u8(value: u8) -> PathReason {
        Self::ALL
            .get(value as usize)
            .copied()
            .unwrap_or(PathReason::Unknown)
    }

    /// A stable snake_case name (metrics labels, `inspect --json`).
    pub const fn name(self) -> &'static str {
        match self {
            PathReason::Unknown => "unknown_device",
            PathReason::Forced => "forced",
            PathReason::Netfilter => "netfilter",
            PathReason::Bridge => "bridge",
            PathReason::VethPeerWithoutXdp => "veth_peer_without_xdp",
            PathReason::NoXdpTransmit => "no_xdp_transmit",
            PathReason::VethPeerRunsXdp => "veth_peer_runs_xdp",
            PathReason::Driver => "driver",
            PathReason::Generic => "generic",
        }
    }

    /// One line for people.
    pub const fn describe(self) -> &'static str {
        match self {
            PathReason::Unknown => "device appeared after the last scan",
            PathReason::Forced => "--forwarding kernel",
            PathReason::Netfilter => {
                "netfilter tables in this namespace (kube-proxy, masquerade): conntrack must see both directions"
            }
            PathReason::Bridge => "native XDP cannot transmit into a bridge",
            PathReason::VethPeerWithoutXdp => {
                "veth whose peer runs no native XDP program drops XDP frames"
            }
            PathReason::NoXdpTransmit => "device type cannot take XDP frames",
            PathReason::VethPeerRunsXdp => "veth whose peer runs native XDP takes XDP frames",
            PathReason::Driver => "physical device in native mode: its driver takes XDP frames",
            PathReason::Generic => "generic XDP transmits through the device's normal path",
        }
    }
}

/// The path packets take out of one device (key: ifindex in the agent's namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressPath {
    /// [`PATH_FAST`] or [`PATH_KERNEL`].
    pub path: u8,
    /// A [`PathReason`].
    pub reason: u8,
    /// 1 when the device takes XDP frames (SNATed flows use them even on the kernel path).
    pub xdp_transmit: u8,
    pub pad: u8,
    pub ifindex: u32,
    /// The device's name, NUL padded, for `inspect`.
    pub name: [u8; 16],
}

/// An address this node announces (answers ARP requests or neighbour solicitations for): the key
/// of the announced-addresses map, whose value is [`ANNOUNCE_ACTIVE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AnnounceKey {
    pub addr: Addr,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`]: `::a.b.c.d` and `a.b.c.d` are different keys.
    pub family: u8,
    pub pad: [u8; 3],
}

/// The value of an announced address (the map is a set; 0 is reserved for "withdrawn").
pub const ANNOUNCE_ACTIVE: u32 = 1;

/// A client-facing device that answers for announced addresses (key: its ifindex, as the XDP
/// program sees it in `ingress_ifindex`): the MAC it answers with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnnounceDevice {
    pub mac: [u8; 6],
    pub pad: [u8; 2],
}

/// Per-service and per-backend traffic, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Packets translated towards backends.
    pub packets: u64,
    pub bytes: u64,
    /// Flows that were given a backend.
    pub new_flows: u64,
    /// Flows rejected (TCP RST or ICMP unreachable sent).
    pub rejects: u64,
}

/// A flow as seen on the wire, in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// Conntrack value for a client flow: the backend it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackValue {
    pub backend_id: u32,
    pub service_id: u32,
    /// The backend's address and port when chosen; a reused id is detected by comparing them.
    pub backend_addr: Addr,
    pub backend_port: u16,
    pub pad: [u8; 6],
}

/// Reverse-NAT value for a backend→client flow: the service address the client used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseNatValue {
    pub vip: Addr,
    /// Network byte order.
    pub vip_port: u16,
    pub pad: [u8; 2],
    pub service_id: u32,
}

/// `--snat` modes ([`SnatConfig::mode`]). 0, what a fresh map holds, is `never`.
pub const SNAT_NEVER: u8 = 0;
/// Flows to backends marked [`BACKEND_REMOTE`] are SNATed; local ones keep the client address.
pub const SNAT_REMOTE: u8 = 1;
/// Every flow is SNATed.
pub const SNAT_ALWAYS: u8 = 2;
/// [`SnatConfig::families`] bits: a node address of that family is configured.
pub const SNAT_HAS_IPV4: u8 = 1;
pub const SNAT_HAS_IPV6: u8 = 2;
/// [`SnatFlow::state`] / [`SnatReply::state`]: TCP saw a FIN or RST (a shorter idle timeout).
pub const SNAT_OPEN: u8 = 0;
pub const SNAT_CLOSING: u8 = 1;

/// The SNAT configuration, entry 0 of [`map_names::SNAT_CONFIG`], written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatConfig {
    /// The node's IPv4 address (word 0) and IPv6 address, as [`Addr`]s.
    pub addr_v4: Addr,
    pub addr_v6: Addr,
    /// The agent's clock (CLOCK_MONOTONIC seconds), moved on every second: the programs stamp
    /// SNAT entries with it, at most once per second per entry, and read no clock themselves.
    pub now: u32,
    /// The port range, inclusive, host byte order.
    pub port_min: u16,
    pub port_max: u16,
    /// [`SNAT_NEVER`], [`SNAT_REMOTE`] or [`SNAT_ALWAYS`].
    pub mode: u8,
    /// [`SNAT_HAS_IPV4`] | [`SNAT_HAS_IPV6`].
    pub families: u8,
    pub pad: [u8; 2],
}

impl SnatConfig {
    /// Ports in the range.
    #[inline(always)]
    pub const fn ports(&self) -> u32 {
        if self.port_max < self.port_min {
            0
        } else {
            (self.port_max - self.port_min) as u32 + 1
        }
    }

    /// Whether `port` (host byte order) is an SNAT port.
    #[inline(always)]
    pub const fn in_range(&self, port: u16) -> bool {
        port >= self.port_min && port <= self.port_max
    }

    /// The port (host byte order) that probe `probe` tries for a flow of hash `hash`: linear
    /// from the hash, so a range no larger than the probes is searched whole.
    #[inline(always)]
    pub const fn probe_port(&self, hash: u32, probe: u32) -> u16 {
        let ports = self.ports();
        if ports == 0 {
            return self.port_min;
        }
        // Reduced first: a wrapping sum would skip ports near the hash's top.
        self.port_min + ((hash % ports + probe % ports) % ports) as u16
    }

    /// The node address of `family`, if one is configured.
    #[inline(always)]
    pub const fn node_addr(&self, family: u8) -> Option<&Addr> {
        if family == FAMILY_IPV4 && self.families & SNAT_HAS_IPV4 != 0 {
            Some(&self.addr_v4)
        } else if family == FAMILY_IPV6 && self.families & SNAT_HAS_IPV6 != 0 {
            Some(&self.addr_v6)
        } else {
            None
        }
    }

    /// Whether a service's new flows may need SNAT (else they take the local path at once).
    #[inline(always)]
    pub const fn may_apply_to(&self, service_flags: u32) -> bool {
        self.mode == SNAT_ALWAYS
            || (self.mode == SNAT_REMOTE && service_flags & SERVICE_HAS_REMOTE != 0)
    }

    /// Whether a new flow to a backend with `backend_flags` is SNATed.
    #[inline(always)]
    pub const fn applies_to(&self, backend_flags: u8) -> bool {
        self.mode == SNAT_ALWAYS
            || (self.mode == SNAT_REMOTE && backend_flags & BACKEND_REMOTE != 0)
    }
}

/// An SNATed client flow (key: the client's [`FlowKey`]): where it goes and from which port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatFlow {
    pub backend_addr: Addr,
    /// The node address the flow leaves from (kept per flow: a changed `--snat-address` does
    /// not move established flows).
    pub node_addr: Addr,
    pub backend_id: u32,
    pub service_id: u32,
    /// Network byte order.
    pub backend_port: u16,
    /// The allocated SNAT port, network byte order.
    pub node_port: u16,
    /// [`SnatConfig::now`] when a packet last went this way.
    pub last_seen: u32,
    /// [`SNAT_OPEN`] or [`SNAT_CLOSING`].
    pub state: u8,
    pub pad: [u8; 3],
}

/// The reply side of an SNATed flow (key: backend → node address and SNAT port): who to give
/// the reply back to, and the cached route towards that client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatReply {
    pub client: Addr,
    pub vip: Addr,
    /// Network byte order.
    pub client_port: u16,
    pub vip_port: u16,
    pub service_id: u32,
    pub last_seen: u32,
    pub state: u8,
    pub pad: [u8; 3],
    /// The FIB result towards the client, trusted while its epoch is current.
    pub hop: NextHop,
}

impl SnatReply {
    /// The client flow this reply belongs to: the key of its [`SnatFlow`].
    pub const fn client_flow(&self, proto: u8, family: u8) -> FlowKey {
        FlowKey {
            src: self.client,
            dst: self.vip,
            src_port: self.client_port,
            dst_port: self.vip_port,
            proto,
            family,
            pad: [0; 2],
        }
    }
}

/// Global per-CPU counters, one slot each. The index is the counter's discriminant.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    PassNotIp = 0,
    /// IP but neither TCP nor UDP.
    PassNotTcpUdp = 1,
    /// Headers truncated or invalid.
    PassMalformed = 2,
    /// A non-first IPv4 fragment.
    PassFragment = 3,
    /// TCP/UDP not addressed to a service.
    PassNotService = 4,
    /// The service has no usable backend.
    PassNoBackend = 5,
    /// Translated, but the kernel forwards it (neighbour unknown, VLAN, TTL...).
    PassToKernel = 6,
    /// Translated and redirected out of another interface.
    Redirect = 7,
    /// Translated and sent back out of the ingress interface.
    Transmit = 8,
    /// New flows entered into conntrack.
    NewFlow = 9,
    /// Replies translated back to the service address on egress.
    ReplyTranslated = 10,
    /// Conntrack insert failed.
    ConntrackFull = 11,
    /// TCP RST sent for a rejected flow.
    RejectTcpReset = 12,
    /// ICMP or ICMPv6 port unreachable sent for a rejected flow.
    RejectIcmpUnreachable = 13,
    /// A rejected packet that gets no answer (a RST, or no room to build the answer): dropped.
    RejectDropped = 14,
    /// IPv6 with a routing header still in use, or other headers we do not rewrite.
    PassUnsupported = 15,
    /// An ICMP error about a tracked flow, translated and sent on to its backend.
    IcmpToBackend = 16,
    /// An ICMP error from a backend about a tracked flow, translated on its way to the client.
    IcmpToClient = 17,
    /// Translated and handed to the kernel by path choice (its egress device takes the kernel
    /// path: netfilter, a bridge, a veth without XDP on its peer), so the kernel routes it.
    KernelPath = 18,
    /// The fast path was chosen but the device could not take the redirect (it left the
    /// redirect map): handed to the kernel instead of being dropped.
    RedirectFailed = 19,
    /// An ARP request for an announced address, answered with XDP_TX.
    ArpAnswered = 20,
    /// A neighbour solicitation for an announced address, answered (advertisement, XDP_TX).
    NdpAnswered = 21,
    /// ARP (or a neighbour solicitation) not for an announced address, or not a request: passed
    /// to the kernel, which answers its own addresses as before.
    AnnounceNotOurs = 22,
    /// ARP or a neighbour solicitation that is truncated or invalid (RFC 826 / RFC 4861 7.1.1):
    /// passed untouched.
    AnnounceMalformed = 23,
    /// A request for an announced address on a device the agent did not register for
    /// announcing (no MAC known for it): passed.
    AnnounceNoDevice = 24,
    /// A neighbour solicitation for an announced address whose frame had no room for the
    /// advertisement (no tailroom to grow into): passed.
    AnnounceNoRoom = 25,
    /// TC egress: not IPv4/IPv6; left untouched.
    EgressNotIp = 26,
    /// TC egress: IP, but neither TCP/UDP nor an ICMP error about a tracked flow; untouched.
    EgressNotTcpUdp = 27,
    /// TC egress: TCP or UDP (or an ICMP error's quote) not from a tracked backend; untouched.
    EgressNotReply = 28,
    /// TC egress: headers truncated or invalid; untouched.
    EgressMalformed = 29,
    /// TC egress: an IPv4 or IPv6 fragment; untouched.
    EgressFragment = 30,
    /// TC egress: IPv6 with a routing header still in use, or AH; untouched.
    EgressUnsupported = 31,
    /// TC egress: a kernel helper failed while a reply was rewritten (the packet leaves as the
    /// helper left it).
    EgressRewriteFailed = 32,
    /// A new flow to a backend that needs SNAT got a port and was forwarded in XDP.
    SnatNewFlow = 33,
    /// A reply to an SNAT port, translated back (service → client) and forwarded.
    SnatReplyTranslated = 34,
    /// A new flow that needs SNAT found no free port (or the SNAT maps are full): rejected.
    SnatExhausted = 35,
    /// A new flow that needs SNAT, but no node address of its family is configured: rejected.
    SnatNoAddress = 36,
    /// An SNATed flow whose egress device cannot take XDP frames (or no route, `--forwarding
    /// kernel`): new flows are rejected, established packets dropped. The kernel cannot forward
    /// it: its source is this node's own address.
    SnatNoFastPath = 37,
    /// An SNATed flow whose next hop has no neighbour entry yet: dropped (the agent has the
    /// kernel resolve remote backends' next hops, so a retransmission gets through).
    SnatNoNeighbour = 38,
    /// To the node's SNAT address and a port in the SNAT range, but no SNAT flow has it: passed.
    SnatReplyUnknown = 39,
    /// A translated reply whose route to the client cannot be finished in XDP: handed to the
    /// kernel.
    SnatReplyToKernel = 40,
    /// A request for an announced address after the agent's lease ran out (no RPC from the
    /// controller renewed it: the agent is dead or cut off): passed, not answered, so an
    /// address that moved is answered by one node only.
    AnnounceLeaseExpired = 41,
    /// An ICMP error about a packet of an SNATed flow (from its backend or a router between),
    /// translated for its client.
    SnatIcmpToClient = 42,
    /// A packet for a service that would start a flow, in a frame for another host's MAC (a
    /// switch flooding a failed node's MAC): passed, so only the node it is addressed to
    /// serves it. Tracked flows go on whatever the MAC.
    PassOtherHost = 43,
}

impl Counter {
    pub const COUNT: u32 = 44;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::PassNotIp,
        Counter::PassNotTcpUdp,
        Counter::PassMalformed,
        Counter::PassFragment,
        Counter::PassNotService,
        Counter::PassNoBackend,
        Counter::PassToKernel,
        Counter::Redirect,
        Counter::Transmit,
        Counter::NewFlow,
        Counter::ReplyTranslated,
        Counter::ConntrackFull,
        Counter::RejectTcpReset,
        Counter::RejectIcmpUnreachable,
        Counter::RejectDropped,
        Counter::PassUnsupported,
        Counter::IcmpToBackend,
        Counter::IcmpToClient,
        Counter::KernelPath,
        Counter::RedirectFailed,
        Counter::ArpAnswered,
        Counter::NdpAnswered,
        Counter::AnnounceNotOurs,
        Counter::AnnounceMalformed,
        Counter::AnnounceNoDevice,
        Counter::AnnounceNoRoom,
        Counter::EgressNotIp,
        Counter::EgressNotTcpUdp,
        Counter::EgressNotReply,
        Counter::EgressMalformed,
        Counter::EgressFragment,
        Counter::EgressUnsupported,
        Counter::EgressRewriteFailed,
        Counter::SnatNewFlow,
        Counter::SnatReplyTranslated,
        Counter::SnatExhausted,
        Counter::SnatNoAddress,
        Counter::SnatNoFastPath,
        Counter::SnatNoNeighbour,
        Counter::SnatReplyUnknown,
        Counter::SnatReplyToKernel,
        Counter::AnnounceLeaseExpired,
        Counter::SnatIcmpToClient,
        Counter::PassOtherHost,
    ];

    /// A stable snake_case name, used for metrics labels and `inspect`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotTcpUdp => "pass_not_tcp_udp",
            Counter::PassMalformed => "pass_malformed",
            Counter::PassFragment => "pass_fragment",
            Counter::PassNotService => "pass_not_service",
            Counter::PassNoBackend => "pass_no_backend",
            Counter::PassToKernel => "pass_to_kernel",
            Counter::Redirect => "redirect",
            Counter::Transmit => "transmit",
            Counter::NewFlow => "new_flow",
            Counter::ReplyTranslated => "reply_translated",
            Counter::ConntrackFull => "conntrack_full",
            Counter::RejectTcpReset => "reject_tcp_reset",
            Counter::RejectIcmpUnreachable => "reject_icmp_unreachable",
            Counter::RejectDropped => "reject_dropped",
            Counter::PassUnsupported => "pass_unsupported",
            Counter::IcmpToBackend => "icmp_to_backend",
            Counter::IcmpToClient => "icmp_to_client",
            Counter::KernelPath => "kernel_path",
            Counter::RedirectFailed => "redirect_failed",
            Counter::ArpAnswered => "arp_answered",
            Counter::NdpAnswered => "ndp_answered",
            Counter::AnnounceNotOurs => "announce_not_ours",
            Counter::AnnounceMalformed => "announce_malformed",
            Counter::AnnounceNoDevice => "announce_no_device",
            Counter::AnnounceNoRoom => "announce_no_room",
            Counter::EgressNotIp => "egress_not_ip",
            Counter::EgressNotTcpUdp => "egress_not_tcp_udp",
            Counter::EgressNotReply => "egress_not_reply",
            Counter::EgressMalformed => "egress_malformed",
            Counter::EgressFragment => "egress_fragment",
            Counter::EgressUnsupported => "egress_unsupported",
            Counter::EgressRewriteFailed => "egress_rewrite_failed",
            Counter::SnatNewFlow => "snat_new_flow",
            Counter::SnatReplyTranslated => "snat_reply_translated",
            Counter::SnatExhausted => "snat_exhausted",
            Counter::SnatNoAddress => "snat_no_address",
            Counter::SnatNoFastPath => "snat_no_fast_path",
            Counter::SnatNoNeighbour => "snat_no_neighbour",
            Counter::SnatReplyUnknown => "snat_reply_unknown",
            Counter::SnatReplyToKernel => "snat_reply_to_kernel",
            Counter::AnnounceLeaseExpired => "announce_lease_expired",
            Counter::SnatIcmpToClient => "snat_icmp_to_client",
            Counter::PassOtherHost => "pass_other_host",
        }
    }
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<Backend>() == 24);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<ConntrackValue>() == 32);
const _: () = assert!(core::mem::size_of::<ReverseNatValue>() == 24);
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 32);
const _: () = assert!(core::mem::size_of::<NextHop>() == 24);
const _: () = assert!(core::mem::size_of::<EgressPath>() == 24);
const _: () = assert!(core::mem::size_of::<AnnounceKey>() == 20);
const _: () = assert!(core::mem::size_of::<AnnounceDevice>() == 8);
const _: () = assert!(core::mem::size_of::<SnatConfig>() == 44);
const _: () = assert!(core::mem::size_of::<SnatFlow>() == 52);
const _: () = assert!(core::mem::size_of::<SnatReply>() == 72);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding bytes left undeclared.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ConntrackValue {}
    unsafe impl aya::Pod for super::ReverseNatValue {}
    unsafe impl aya::Pod for super::TrafficStats {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::EgressPath {}
    unsafe impl aya::Pod for super::AnnounceKey {}
    unsafe impl aya::Pod for super::AnnounceDevice {}
    unsafe impl aya::Pod for super::SnatConfig {}
    unsafe impl aya::Pod for super::SnatFlow {}
    unsafe impl aya::Pod for super::SnatReply {}
}

/// One kernel-side diagnostic (`--bpf-log`), written to the `FULGUR_LOG` ring buffer at the rare
/// outcomes only. Logging is gated on the `.rodata` global [`LOG_LEVEL_GLOBAL`], set at load:
/// the verifier removes the calls a level disables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogRecord {
    /// The [`Counter`] discriminant of the outcome.
    pub reason: u32,
    /// [`log_levels`]: WARN or DEBUG.
    pub level: u8,
    /// [`FAMILY_IPV4`], [`FAMILY_IPV6`], or 0 when the IP header was unreadable.
    pub family: u8,
    pub proto: u8,
    pub pad: u8,
    /// Network byte order, as in the packet; 0 when unknown.
    pub src_port: u16,
    pub dst_port: u16,
    pub src: Addr,
    pub dst: Addr,
    /// Redirect failed: the egress ifindex; rejected: the service id; malformed: frame length.
    pub value: u32,
}

/// The ring buffer the programs write [`LogRecord`]s to.
pub const LOG_MAP: &str = "FULGUR_LOG";
/// The `.rodata` global holding the log level (0 = off).
pub const LOG_LEVEL_GLOBAL: &str = "FULGUR_LOG_LEVEL";

/// Values of [`LOG_LEVEL_GLOBAL`] and [`LogRecord::level`]: a record is written when its level
/// is at most the global.
pub mod log_levels {
    pub const OFF: u8 = 0;
    pub const WARN: u8 = 2;
    pub const DEBUG: u8 = 4;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::IpAddr;

    #[test]
    fn addresses_round_trip_through_the_map_encoding() {
        for text in ["192.0.2.10", "2001:db8::1", "::ffff:192.0.2.1"] {
            let ip: IpAddr = text.parse().unwrap();
            let (addr, family) = encode_addr(ip);
            assert_eq!(decode_addr(&addr, family), ip, "{text}");
        }
        let (addr, family) = encode_addr("192.0.2.10".parse().unwrap());
        assert_eq!((&addr[1..], family), (&[0; 3][..], FAMILY_IPV4));
        assert_eq!(addr[0].to_ne_bytes(), [192, 0, 2, 10], "network byte order");
    }

    #[test]
    fn table_slots_pack_two_per_lookup_element() {
        let service = ServiceValue {
            id: 3,
            table_base: 7 * 13,
            table_size: 13,
            flags: 0,
        };
        assert_eq!(service.slot(0), 91);
        assert_eq!(service.slot(13 + 4), 95);
        assert_eq!(service.slots(), 91..104);
        assert_eq!(lookup_position(91), (45, 1));
        assert_eq!(lookup_position(92), (46, 0));
    }

    #[test]
    fn snat_probes_cover_a_small_range_and_stay_inside_it() {
        let config = SnatConfig {
            port_min: 61000,
            port_max: 61002,
            mode: SNAT_REMOTE,
            ..SnatConfig::default()
        };
        let ports: std::collections::BTreeSet<u16> = (0..3)
            .map(|probe| config.probe_port(u32::MAX - 1, probe))
            .collect();
        assert_eq!(
            ports.into_iter().collect::<std::vec::Vec<_>>(),
            [61000, 61001, 61002]
        );
        let full = SnatConfig {
            port_min: 61000,
            port_max: 65535,
            ..config
        };
        assert_eq!(full.ports(), 4536);
        assert!((0..1000).all(|h| full.in_range(full.probe_port(h * 7919, 15))));
        assert!(config.applies_to(BACKEND_LIVE | BACKEND_REMOTE));
        assert!(!config.applies_to(BACKEND_LIVE));
        assert!(
            SnatConfig {
                mode: SNAT_ALWAYS,
                ..config
            }
            .applies_to(BACKEND_LIVE)
        );
        assert!(
            !SnatConfig {
                mode: SNAT_NEVER,
                ..config
            }
            .applies_to(BACKEND_REMOTE)
        );
        assert_eq!(config.node_addr(FAMILY_IPV4), None);
    }

    #[test]
    fn the_next_hop_epoch_never_becomes_the_empty_mark() {
        assert_eq!(next_epoch(0), 1);
        assert_eq!(next_epoch(1), 2);
        assert_eq!(next_epoch(u32::MAX), 1);
    }
}
