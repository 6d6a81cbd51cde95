//! Reads the pinned maps directly, so it works while the agent is down.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use fulgur_common::{
    BACKEND_LIVE, Backend, ConntrackValue, Counter, FlowKey, LookupEntry, REJECT, ServiceKey,
    ServiceValue, TrafficStats, decode_addr, lookup_position, map_names,
};
use serde::Serialize;

use crate::{config::Protocol, dataplane::Pins};

#[derive(Debug, thiserror::Error)]
#[error("map {name} at {path}: {source}")]
pub struct InspectError {
    name: &'static str,
    path: String,
    source: aya::maps::MapError,
}

/// Traffic counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rejects: u64,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub id: u32,
    /// Maglev table slots this backend holds.
    pub slots: usize,
    pub traffic: Traffic,
}

impl BackendView {
    /// `address:port`, with brackets for IPv6.
    pub fn endpoint(&self) -> String {
        std::net::SocketAddr::new(self.address, self.port).to_string()
    }
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub id: u32,
    pub table_size: u32,
    /// Table slots that reject (the reject weight).
    pub reject_slots: usize,
    pub backends: Vec<BackendView>,
    pub traffic: Traffic,
}

#[derive(Debug, Serialize)]
pub struct FlowView {
    pub protocol: Protocol,
    pub client: String,
    pub service: String,
    pub backend: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub services: Vec<ServiceView>,
    /// Global pass, drop and verdict counters by name.
    pub counters: BTreeMap<&'static str, u64>,
    pub flows: Vec<FlowView>,
}

/// What `inspect` prints: the report, and the TC egress hook on each interface named under the
/// pins (none: not attached in this network namespace).
#[derive(Debug, Serialize)]
pub struct NodeReport {
    #[serde(flatten)]
    pub report: Report,
    pub tc_hooks: BTreeMap<String, Option<crate::tc_hook::TcHook>>,
    /// Fast or kernel path per egress device and per backend, and why.
    #[serde(flatten)]
    pub forwarding: crate::paths::PathReport,
    /// Announced addresses and the devices that answer for them.
    #[serde(flatten)]
    pub announce: crate::announce::AnnounceReport,
    /// SNAT mode, ports, node addresses and flow count.
    pub snat: crate::snat::SnatView,
}

impl NodeReport {
    pub fn read(pins: &Pins, max_flows: usize) -> Result<Self, InspectError> {
        let tc_hooks = crate::tc_hook::attached_ifaces(pins)
            .into_iter()
            .map(|iface| {
                let hook = crate::tc_hook::in_use(pins, &iface);
                (iface, hook)
            })
            .collect();
        let report = read(pins, max_flows)?;
        Ok(NodeReport {
            forwarding: crate::paths::read_report(pins, &report),
            report,
            tc_hooks,
            announce: crate::announce::read_report(pins),
            snat: crate::snat::read_view(pins),
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = String::from("TC EGRESS HOOK\n");
        for (iface, hook) in &self.tc_hooks {
            let hook = hook.map_or("none in this network namespace", |h| h.name());
            let _ = writeln!(out, "  {iface:<24} {hook}");
        }
        let snat = &self.snat;
        let _ = writeln!(
            out,
            "SNAT\n  mode {}  ports {}  ipv4 {}  ipv6 {}  flows {}",
            snat.mode,
            snat.ports,
            snat.ipv4.map_or("-".into(), |a| a.to_string()),
            snat.ipv6.map_or("-".into(), |a| a.to_string()),
            snat.flows
        );
        out + &self.forwarding.to_text() + &self.announce.to_text() + &self.report.to_text()
    }
}

fn open(pins: &Pins, name: &'static str) -> Result<Map, InspectError> {
    let path = pins.map(name);
    let err = |source| InspectError {
        name,
        path: path.display().to_string(),
        source,
    };
    Map::from_map_data(MapData::from_pin(&path).map_err(err)?).map_err(err)
}

/// The maps hold only TCP and UDP services and flows.
fn protocol(proto: u8) -> Protocol {
    Protocol::from_number(proto).unwrap_or(Protocol::Udp)
}

fn endpoint(addr: &fulgur_common::Addr, family: u8, port_be: u16) -> String {
    match decode_addr(addr, family) {
        IpAddr::V4(a) => format!("{a}:{}", u16::from_be(port_be)),
        IpAddr::V6(a) => format!("[{a}]:{}", u16::from_be(port_be)),
    }
}

/// Sums one entry of a per-CPU traffic map.
pub fn traffic(
    map: &PerCpuArray<MapData, TrafficStats>,
    id: u32,
) -> Result<Traffic, aya::maps::MapError> {
    Ok(map
        .get(&id, 0)?
        .iter()
        .fold(Traffic::default(), |t, s| Traffic {
            packets: t.packets + s.packets,
            bytes: t.bytes + s.bytes,
            new_flows: t.new_flows + s.new_flows,
            rejects: t.rejects + s.rejects,
        }))
}

/// Reads services, backends, counters and up to `max_flows` conntrack entries.
pub fn read(pins: &Pins, max_flows: usize) -> Result<Report, InspectError> {
    let err = |name: &'static str| {
        move |source| InspectError {
            name,
            path: pins.map(name).display().to_string(),
            source,
        }
    };
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(open(pins, map_names::SERVICES)?).map_err(err(map_names::SERVICES))?;
    let backends: Array<MapData, Backend> =
        Array::try_from(open(pins, map_names::BACKENDS)?).map_err(err(map_names::BACKENDS))?;
    let lookup: Array<MapData, LookupEntry> = Array::try_from(open(pins, map_names::LOOKUP_TABLE)?)
        .map_err(err(map_names::LOOKUP_TABLE))?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open(pins, map_names::COUNTERS)?)
            .map_err(err(map_names::COUNTERS))?;
    let service_stats: PerCpuArray<MapData, TrafficStats> =
        PerCpuArray::try_from(open(pins, map_names::SERVICE_STATS)?)
            .map_err(err(map_names::SERVICE_STATS))?;
    let backend_stats: PerCpuArray<MapData, TrafficStats> =
        PerCpuArray::try_from(open(pins, map_names::BACKEND_STATS)?)
            .map_err(err(map_names::BACKEND_STATS))?;
    let conntrack: HashMap<MapData, FlowKey, ConntrackValue> =
        HashMap::try_from(open(pins, map_names::CONNTRACK)?).map_err(err(map_names::CONNTRACK))?;

    let mut service_views = Vec::new();
    for entry in services.iter() {
        let (key, value) = entry.map_err(err(map_names::SERVICES))?;
        let mut slots = BTreeMap::<u32, usize>::new();
        for slot in value.slots() {
            let (entry, half) = lookup_position(slot);
            let pair = lookup
                .get(&entry, 0)
                .map_err(err(map_names::LOOKUP_TABLE))?;
            let id = pair[half];
            *slots.entry(id).or_default() += 1;
        }
        let reject_slots = slots.remove(&REJECT).unwrap_or(0);
        let mut backend_views = Vec::new();
        for (id, count) in slots {
            let b = backends.get(&id, 0).map_err(err(map_names::BACKENDS))?;
            if b.flags & BACKEND_LIVE != 0 {
                backend_views.push(BackendView {
                    address: decode_addr(&b.addr, b.family),
                    port: u16::from_be(b.port),
                    id,
                    slots: count,
                    traffic: traffic(&backend_stats, id).map_err(err(map_names::BACKEND_STATS))?,
                });
            }
        }
        service_views.push(ServiceView {
            vip: decode_addr(&key.addr, key.family),
            port: u16::from_be(key.port),
            protocol: protocol(key.proto),
            id: value.id,
            table_size: value.table_size,
            reject_slots,
            backends: backend_views,
            traffic: traffic(&service_stats, value.id).map_err(err(map_names::SERVICE_STATS))?,
        });
    }
    service_views.sort_by_key(|s| (s.vip, s.port, s.protocol));

    let mut counter_values = BTreeMap::new();
    for counter in Counter::ALL {
        let per_cpu = counters
            .get(&(counter as u32), 0)
            .map_err(err(map_names::COUNTERS))?;
        counter_values.insert(counter.name(), per_cpu.iter().sum());
    }

    let mut flows = Vec::new();
    for entry in conntrack.iter().take(max_flows) {
        let (key, value) = entry.map_err(err(map_names::CONNTRACK))?;
        flows.push(FlowView {
            protocol: protocol(key.proto),
            client: endpoint(&key.src, key.family, key.src_port),
            service: endpoint(&key.dst, key.family, key.dst_port),
            backend: endpoint(&value.backend_addr, key.family, value.backend_port),
        });
    }
    Ok(Report {
        services: service_views,
        counters: counter_values,
        flows,
    })
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut out = String::from("SERVICES\n");
        for s in &self.services {
            let t = &s.traffic;
            let _ = writeln!(
                out,
                "  {} {}:{}  id {}  {} slots ({} reject)  packets {}  bytes {}  flows {}  rejects {}",
                s.protocol,
                s.vip,
                s.port,
                s.id,
                s.table_size,
                s.reject_slots,
                t.packets,
                t.bytes,
                t.new_flows,
                t.rejects
            );
            for b in &s.backends {
                let t = &b.traffic;
                let _ = writeln!(
                    out,
                    "    -> {:<28} {:>6} slots  packets {}  bytes {}  flows {}",
                    b.endpoint(),
                    b.slots,
                    t.packets,
                    t.bytes,
                    t.new_flows
                );
            }
        }
        out.push_str("COUNTERS\n");
        for (name, value) in &self.counters {
            let _ = writeln!(out, "  {name:<24} {value}");
        }
        let _ = writeln!(out, "FLOWS ({} shown)", self.flows.len());
        for f in &self.flows {
            let _ = writeln!(
                out,
                "  {} {} -> {} => {}",
                f.protocol, f.client, f.service, f.backend
            );
        }
        out
    }
}
