//! The maps, pinned by name so a restarted agent adopts them. Sizes are set by the agent at load.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use fulgur_common::{
    AnnounceDevice, AnnounceKey, Backend, ConntrackValue, Counter, EgressPath, FlowKey,
    LookupEntry, NextHop, ReverseNatValue, ServiceKey, ServiceValue, SnatConfig, SnatFlow,
    SnatReply, TrafficStats, defaults,
};

/// `{VIP, port, proto}` → where the service's lookup table is.
#[map(name = "FULGUR_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(defaults::MAX_SERVICES, 0);

/// Backend id → backend address.
/// mmap-able: the agent writes it as plain memory.
#[map(name = "FULGUR_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(defaults::MAX_BACKENDS, BPF_F_MMAPABLE);

/// Every service's backend-selection table, back to back: slot → backend id.
/// mmap-able, two slots per element ([`LookupEntry`]).
#[map(name = "FULGUR_LOOKUP")]
pub static LOOKUP: Array<LookupEntry> =
    Array::pinned(defaults::LOOKUP_TABLE_ENTRIES, BPF_F_MMAPABLE);

/// Client flow → chosen backend.
#[map(name = "FULGUR_CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, ConntrackValue> =
    LruHashMap::pinned(defaults::CONNTRACK_ENTRIES, 0);

/// Backend→client flow → the service address to restore.
#[map(name = "FULGUR_REVNAT")]
pub static REVNAT: LruHashMap<FlowKey, ReverseNatValue> =
    LruHashMap::pinned(defaults::CONNTRACK_ENTRIES, 0);

/// Global pass/drop/verdict counters, indexed by [`Counter`].
#[map(name = "FULGUR_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Per-service traffic, indexed by service id.
#[map(name = "FULGUR_SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::pinned(defaults::MAX_SERVICES, 0);

/// Per-backend traffic, indexed by backend id.
#[map(name = "FULGUR_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::pinned(defaults::MAX_BACKENDS, 0);

/// Backend id → cached FIB result, per CPU (no torn reads, no contention).
#[map(name = "FULGUR_NEXT_HOPS")]
pub static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::pinned(defaults::MAX_BACKENDS, 0);

/// Entry 0: the epoch cached next hops must carry to be trusted; moved on by the agent.
#[map(name = "FULGUR_NEXT_HOP_EPOCH")]
pub static NEXT_HOP_EPOCH: Array<u32> = Array::pinned(1, 0);

/// Egress ifindex → the path its packets take (fast or kernel) and why; written by the agent.
#[map(name = "FULGUR_EGRESS_PATHS")]
pub static EGRESS_PATHS: HashMap<u32, EgressPath> = HashMap::pinned(defaults::EGRESS_DEVICES, 0);

/// The devices the fast path redirects into (ifindex → ifindex). A device that goes away leaves
/// it (the kernel removes it), so a redirect to it fails visibly instead of being dropped.
#[map(name = "FULGUR_REDIRECT_DEVICES")]
pub static REDIRECT_DEVICES: DevMapHash = DevMapHash::pinned(defaults::EGRESS_DEVICES, 0);

/// Addresses this node announces: ARP requests and neighbour solicitations for them are answered.
#[map(name = "FULGUR_ANNOUNCED")]
pub static ANNOUNCED: HashMap<AnnounceKey, u32> = HashMap::pinned(defaults::MAX_ANNOUNCED, 0);

/// Per-CPU room for the reply entry a new SNAT flow inserts, which does not fit the new-flow
/// path's stack next to the rest. Scratch: not pinned, nothing kept in it.
#[map]
pub static SNAT_SCRATCH: PerCpuArray<SnatReply> = PerCpuArray::with_max_entries(1, 0);

/// Entry 0: until when (`bpf_ktime_get_ns`) announced addresses are answered for; 0: no lease.
#[map(name = "FULGUR_ANNOUNCE_LEASE")]
pub static ANNOUNCE_LEASE: Array<u64> = Array::pinned(1, 0);

/// Client-facing ifindex → the MAC it answers with; written by the agent when it attaches.
#[map(name = "FULGUR_ANNOUNCE_DEVICES")]
pub static ANNOUNCE_DEVICES: HashMap<u32, AnnounceDevice> =
    HashMap::pinned(defaults::ANNOUNCE_DEVICES, 0);

/// Entry 0: the SNAT mode, port range, node addresses and the agent's clock.
#[map(name = "FULGUR_SNAT_CONFIG")]
pub static SNAT_CONFIG: Array<SnatConfig> = Array::pinned(1, 0);

/// SNATed client flow → its backend and SNAT port. Not LRU: entries leave by the agent's GC.
#[map(name = "FULGUR_SNAT_FLOWS")]
pub static SNAT_FLOWS: HashMap<FlowKey, SnatFlow> = HashMap::pinned(defaults::SNAT_ENTRIES, 0);

/// Backend → node:SNAT-port tuple → the client to give replies back to. Inserted with
/// BPF_NOEXIST: a live flow's port is never taken over.
#[map(name = "FULGUR_SNAT_REPLIES")]
pub static SNAT_REPLIES: HashMap<FlowKey, SnatReply> = HashMap::pinned(defaults::SNAT_ENTRIES, 0);
