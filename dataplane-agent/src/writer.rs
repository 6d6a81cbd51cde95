//! The one place that writes the dataplane maps. The agent and the tests provision through it.
//!
//! Layout: service id `s` owns two lookup-table regions, `2s` and `2s + 1`, of `table_size`
//! slots each. A changed service gets its new table written into the idle region first; then its
//! single services-map entry is replaced, so the program sees the old table or the new one,
//! never a mix. Backend ids stay stable while a backend stays, so conntrack entries stay valid.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use fulgur_common::{
    ANNOUNCE_ACTIVE, Addr, AnnounceDevice, AnnounceKey, BACKEND_LIVE, BACKEND_REMOTE, Backend,
    LOOKUP_SLOTS_PER_ENTRY, LookupEntry, NextHop, REJECT, SERVICE_HAS_REMOTE, ServiceKey,
    ServiceValue, TrafficStats, decode_addr, encode_addr, lookup_position, map_names,
};

use crate::{
    config::{ServiceSpec, ValidServiceSet},
    maglev,
    mmap::{MmapArray, MmapError},
};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Mmap(#[from] MmapError),
    #[error("map {name} is missing from the loaded object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("{needed} {what} needed, capacity is {capacity} (raise --{flag})")]
    Capacity {
        what: &'static str,
        needed: usize,
        capacity: u32,
        flag: &'static str,
    },
    #[error(
        "pinned lookup table holds {actual} elements, but {expected} are needed for \
         --max-services {max_services} and --table-size {table_size}; \
         run `fulgur-agent detach` to start afresh"
    )]
    LayoutMismatch {
        actual: u32,
        expected: u64,
        max_services: u32,
        table_size: u32,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> WriteError {
    move |source| WriteError::Map { name, source }
}

/// Sizes fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub max_services: u32,
    pub max_backends: u32,
    /// Slots per service table; a prime.
    pub table_size: u32,
}

impl Layout {
    /// Table slots in all, two regions per service.
    pub fn lookup_slots(&self) -> u64 {
        self.max_services as u64 * 2 * self.table_size as u64
    }

    /// Elements of the lookup-table map ([`LOOKUP_SLOTS_PER_ENTRY`] slots each).
    pub fn lookup_entries(&self) -> u64 {
        self.lookup_slots().div_ceil(LOOKUP_SLOTS_PER_ENTRY as u64)
    }

    fn table_base(&self, service_id: u32, region: u32) -> u32 {
        (service_id * 2 + region) * self.table_size
    }
}

/// A backend's identity within a service.
type BackendAddr = (Addr, u16);

#[derive(Clone, Debug)]
struct Installed {
    id: u32,
    /// Which of the service's two regions holds the live table.
    region: u32,
    backends: BTreeMap<BackendAddr, u32>,
    /// Backends on other nodes ([`BACKEND_REMOTE`]).
    remote: BTreeSet<BackendAddr>,
    /// The live table (backend ids), empty when the service has none.
    table: Vec<u32>,
}

/// What an apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub removed: usize,
}

pub struct MapWriter {
    layout: Layout,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: MmapArray<Backend>,
    lookup: MmapArray<LookupEntry>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    next_hops: PerCpuArray<MapData, NextHop>,
    announced_map: HashMap<MapData, AnnounceKey, u32>,
    announce_devices: HashMap<MapData, u32, AnnounceDevice>,
    announce_lease: Array<MapData, u64>,
    /// What the announced-addresses map holds.
    announced: BTreeSet<IpAddr>,
    installed: BTreeMap<ServiceKey, Installed>,
    free_service_ids: BTreeSet<u32>,
    free_backend_ids: BTreeSet<u32>,
    /// Freed at the end of the apply, after a grace period.
    retiring_backends: Vec<u32>,
    retiring_services: Vec<u32>,
    /// A service's table moved to its other region during this apply.
    swapped_tables: bool,
}

/// How long old tables and backends stay intact after the swap: a program run takes well under
/// a microsecond.
const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_millis(2);

pub fn service_key(spec: &ServiceSpec) -> ServiceKey {
    let (addr, family) = encode_addr(spec.vip);
    ServiceKey {
        addr,
        port: spec.port.to_be(),
        proto: spec.protocol.number(),
        family,
    }
}

fn identity(addr: &BackendAddr) -> u64 {
    let mut bytes = [0u8; 18];
    for (i, w) in addr.0.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    bytes[16..].copy_from_slice(&addr.1.to_ne_bytes());
    maglev::identity_hash(&bytes)
}

fn take(
    maps: &mut impl FnMut(&'static str) -> Option<Map>,
    name: &'static str,
) -> Result<Map, WriteError> {
    maps(name).ok_or(WriteError::MissingMap { name })
}

impl MapWriter {
    /// Takes the maps through `take_map` (e.g. `|n| ebpf.take_map(n)`) and adopts whatever they
    /// already hold, so a restarted agent continues where the last one stopped.
    pub fn adopt(
        layout: Layout,
        mut take_map: impl FnMut(&'static str) -> Option<Map>,
    ) -> Result<Self, WriteError> {
        let services = HashMap::try_from(take(&mut take_map, map_names::SERVICES)?)
            .map_err(map_err(map_names::SERVICES))?;
        let backends = MmapArray::new(
            map_names::BACKENDS,
            take(&mut take_map, map_names::BACKENDS)?,
        )?;
        let lookup = MmapArray::new(
            map_names::LOOKUP_TABLE,
            take(&mut take_map, map_names::LOOKUP_TABLE)?,
        )?;
        let service_stats = PerCpuArray::try_from(take(&mut take_map, map_names::SERVICE_STATS)?)
            .map_err(map_err(map_names::SERVICE_STATS))?;
        let backend_stats = PerCpuArray::try_from(take(&mut take_map, map_names::BACKEND_STATS)?)
            .map_err(map_err(map_names::BACKEND_STATS))?;
        let next_hops = PerCpuArray::try_from(take(&mut take_map, map_names::NEXT_HOPS)?)
            .map_err(map_err(map_names::NEXT_HOPS))?;
        let announced_map = HashMap::try_from(take(&mut take_map, map_names::ANNOUNCED)?)
            .map_err(map_err(map_names::ANNOUNCED))?;
        let announce_devices = HashMap::try_from(take(&mut take_map, map_names::ANNOUNCE_DEVICES)?)
            .map_err(map_err(map_names::ANNOUNCE_DEVICES))?;
        let announce_lease = Array::try_from(take(&mut take_map, map_names::ANNOUNCE_LEASE)?)
            .map_err(map_err(map_names::ANNOUNCE_LEASE))?;
        if lookup.as_slice().len() as u64 != layout.lookup_entries() {
            return Err(WriteError::LayoutMismatch {
                actual: lookup.as_slice().len() as u32,
                expected: layout.lookup_entries(),
                max_services: layout.max_services,
                table_size: layout.table_size,
            });
        }
        let mut writer = MapWriter {
            layout,
            services,
            backends,
            lookup,
            service_stats,
            backend_stats,
            next_hops,
            announced_map,
            announce_devices,
            announce_lease,
            announced: BTreeSet::new(),
            installed: BTreeMap::new(),
            free_service_ids: (0..layout.max_services).collect(),
            free_backend_ids: (0..layout.max_backends).collect(),
            retiring_backends: Vec::new(),
            retiring_services: Vec::new(),
            swapped_tables: false,
        };
        writer.read_back()?;
        Ok(writer)
    }

    /// Rebuilds the in-memory view from the maps.
    fn read_back(&mut self) -> Result<(), WriteError> {
        let keys: Vec<AnnounceKey> = self
            .announced_map
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::ANNOUNCED))?;
        self.announced = keys
            .iter()
            .map(|k| decode_addr(&k.addr, k.family))
            .collect();
        let entries: Vec<(ServiceKey, ServiceValue)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::SERVICES))?;
        for (key, value) in entries {
            let mut table = Vec::with_capacity(value.table_size as usize);
            for slot in value.slots() {
                table.push(lookup_get(self.lookup.as_slice(), slot));
            }
            let mut backends = BTreeMap::new();
            let mut remote = BTreeSet::new();
            for id in table
                .iter()
                .copied()
                .filter(|id| *id != REJECT)
                .collect::<BTreeSet<_>>()
            {
                let backend = self.backends.as_slice()[id as usize];
                backends.insert((backend.addr, backend.port), id);
                if backend.flags & BACKEND_REMOTE != 0 {
                    remote.insert((backend.addr, backend.port));
                }
                self.free_backend_ids.remove(&id);
            }
            self.free_service_ids.remove(&value.id);
            let region = (value.table_base / self.layout.table_size.max(1)) % 2;
            self.installed.insert(
                key,
                Installed {
                    id: value.id,
                    region,
                    backends,
                    remote,
                    table,
                },
            );
        }
        Ok(())
    }

    /// The id (counter index) of an installed service.
    pub fn service_id(&self, spec: &ServiceSpec) -> Option<u32> {
        self.installed.get(&service_key(spec)).map(|s| s.id)
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The addresses the XDP program answers ARP / NDP for now.
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    /// Makes the announced-addresses map hold exactly `addresses`: new ones are answered for
    /// from the moment this returns, removed ones no longer.
    pub fn set_announced(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), WriteError> {
        let key = |ip: &IpAddr| {
            let (addr, family) = encode_addr(*ip);
            AnnounceKey {
                addr,
                family,
                pad: [0; 3],
            }
        };
        let gone: Vec<IpAddr> = self.announced.difference(addresses).copied().collect();
        for ip in gone {
            match self.announced_map.remove(&key(&ip)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::ANNOUNCED)(e)),
            }
            self.announced.remove(&ip);
        }
        for ip in addresses.difference(&self.announced.clone()) {
            self.announced_map
                .insert(key(ip), ANNOUNCE_ACTIVE, 0)
                .map_err(map_err(map_names::ANNOUNCED))?;
            self.announced.insert(*ip);
        }
        Ok(())
    }

    /// How long the announced addresses are answered for without another renewal: `None`
    /// forever (no lease). The program checks it on each request, so a dead agent's pinned
    /// program stops answering when the lease it was last given runs out.
    pub fn renew_announce_lease(
        &mut self,
        lease: Option<std::time::Duration>,
    ) -> Result<(), WriteError> {
        let until = lease.map_or(0, |lease| {
            (crate::clock::monotonic() + lease).as_nanos() as u64
        });
        self.announce_lease
            .set(0, until, 0)
            .map_err(map_err(map_names::ANNOUNCE_LEASE))
    }

    /// Registers a client-facing device: ARP / NDP for announced addresses arriving on it are
    /// answered with `mac`.
    pub fn register_announce_device(
        &mut self,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), WriteError> {
        let device = AnnounceDevice { mac, pad: [0; 2] };
        if self.announce_devices.get(&ifindex, 0).ok() == Some(device) {
            return Ok(());
        }
        self.announce_devices
            .insert(ifindex, device, 0)
            .map_err(map_err(map_names::ANNOUNCE_DEVICES))
    }

    /// Makes the maps hold exactly `desired` (validated by its type). Capacity is checked before
    /// the first write; services that did not change are not touched.
    pub fn apply(&mut self, desired: &ValidServiceSet) -> Result<ApplyReport, WriteError> {
        self.check_capacity(desired)?;
        let announce: BTreeSet<IpAddr> = desired.announce.iter().copied().collect();
        let mut report = ApplyReport::default();
        let wanted: BTreeMap<ServiceKey, &ServiceSpec> = desired
            .services
            .iter()
            .map(|s| (service_key(s), s))
            .collect();

        let gone: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_service(&key)?;
            report.removed += 1;
        }
        for (key, spec) in wanted {
            match self.upsert_service(key, spec)? {
                Change::Added => report.added += 1,
                Change::Updated => report.updated += 1,
                Change::Unchanged => report.unchanged += 1,
            }
        }
        self.retire()?;
        self.set_announced(&announce)?;
        Ok(report)
    }

    /// Frees what no service points at any more, once no program run can still be using it: a
    /// run that read a service entry just before its swap may go on to read the old table and
    /// backends, so they stay intact for a grace period far longer than any run.
    fn retire(&mut self) -> Result<(), WriteError> {
        let swapped = std::mem::take(&mut self.swapped_tables);
        if self.retiring_backends.is_empty() && self.retiring_services.is_empty() && !swapped {
            return Ok(());
        }
        // Also when only tables were swapped: the next apply writes into the regions they left.
        std::thread::sleep(RETIRE_GRACE);
        // Ids go back clean (counters, cached next hop), so allocating one costs no syscall.
        for id in std::mem::take(&mut self.retiring_backends) {
            reset(&mut self.backend_stats, id).map_err(map_err(map_names::BACKEND_STATS))?;
            reset(&mut self.next_hops, id).map_err(map_err(map_names::NEXT_HOPS))?;
            self.release_backend(id);
        }
        for id in std::mem::take(&mut self.retiring_services) {
            reset(&mut self.service_stats, id).map_err(map_err(map_names::SERVICE_STATS))?;
            self.free_service_ids.insert(id);
        }
        Ok(())
    }

    fn check_capacity(&self, desired: &ValidServiceSet) -> Result<(), WriteError> {
        if desired.services.len() > self.layout.max_services as usize {
            return Err(WriteError::Capacity {
                what: "services",
                needed: desired.services.len(),
                capacity: self.layout.max_services,
                flag: "max-services",
            });
        }
        // Services and backends that go away are freed only at the end of the apply (see
        // `retire`), so what is installed now and what is new must fit side by side.
        let mut new_services = 0;
        let mut new_backends = 0;
        for spec in &desired.services {
            let installed = self.installed.get(&service_key(spec));
            new_services += usize::from(installed.is_none());
            new_backends += spec
                .backends
                .iter()
                .filter(|b| {
                    let addr = (encode_addr(b.address).0, b.port.to_be());
                    installed.is_none_or(|s| !s.backends.contains_key(&addr))
                })
                .count();
        }
        let installed_services = self.installed.len();
        if installed_services + new_services > self.layout.max_services as usize {
            return Err(WriteError::Capacity {
                what: "service slots (installed and new side by side)",
                needed: installed_services + new_services,
                capacity: self.layout.max_services,
                flag: "max-services",
            });
        }
        let installed_backends: usize = self.installed.values().map(|s| s.backends.len()).sum();
        let needed = installed_backends + new_backends;
        if needed > self.layout.max_backends as usize {
            return Err(WriteError::Capacity {
                what: "backend slots",
                needed,
                capacity: self.layout.max_backends,
                flag: "max-backends",
            });
        }
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), WriteError> {
        let Some(old) = self.installed.remove(key) else {
            return Ok(());
        };
        self.services
            .remove(key)
            .map_err(map_err(map_names::SERVICES))?;
        self.retiring_backends.extend(old.backends.values());
        self.retiring_services.push(old.id);
        Ok(())
    }

    fn release_backend(&mut self, id: u32) {
        let empty = Backend {
            addr: [0; 4],
            port: 0,
            family: 0,
            flags: 0,
            service_id: 0,
        };
        self.backends.as_mut_slice()[id as usize] = empty;
        self.free_backend_ids.insert(id);
    }

    fn upsert_service(
        &mut self,
        key: ServiceKey,
        spec: &ServiceSpec,
    ) -> Result<Change, WriteError> {
        let previous = self.installed.get(&key).cloned();
        let service_id = match &previous {
            Some(p) => p.id,
            None => self.free_service_ids.pop_first().expect("capacity checked"),
        };

        // Stable ids for backends that stay; fresh ids for new ones.
        let mut backends = BTreeMap::new();
        let mut remote = BTreeSet::new();
        let mut entries = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let (addr, family) = encode_addr(b.address);
            let backend_addr = (addr, b.port.to_be());
            let flags = if b.remote {
                remote.insert(backend_addr);
                BACKEND_LIVE | BACKEND_REMOTE
            } else {
                BACKEND_LIVE
            };
            let id = match previous
                .as_ref()
                .and_then(|p| p.backends.get(&backend_addr))
            {
                Some(id) => {
                    // Moved to or from another node: new flows follow at once (one byte).
                    let backend = &mut self.backends.as_mut_slice()[*id as usize];
                    if backend.flags != flags {
                        backend.flags = flags;
                    }
                    *id
                }
                None => {
                    let id = self.free_backend_ids.pop_first().expect("capacity checked");
                    let backend = Backend {
                        addr,
                        port: b.port.to_be(),
                        family,
                        flags,
                        service_id,
                    };
                    self.backends.as_mut_slice()[id as usize] = backend;
                    id
                }
            };
            backends.insert(backend_addr, id);
            entries.push(maglev::Entry {
                value: id,
                identity: identity(&backend_addr),
                weight: b.weight,
            });
        }
        if spec.reject_weight > 0 {
            // The reject pseudo-backend, with its own stable identity within the service.
            let identity =
                maglev::identity_hash(b"fulgur-reject") ^ identity(&(key.addr, key.port));
            entries.push(maglev::Entry {
                value: REJECT,
                identity,
                weight: spec.reject_weight,
            });
        }
        let table = maglev::build(&entries, self.layout.table_size).unwrap_or_default();

        let flags = if remote.is_empty() {
            0
        } else {
            SERVICE_HAS_REMOTE
        };
        if let Some(p) = &previous
            && p.table == table
            && p.backends == backends
        {
            if p.remote == remote {
                return Ok(Change::Unchanged);
            }
            // Only where backends run changed: the same table, the service's flag rewritten.
            let value = ServiceValue {
                id: service_id,
                table_base: self.layout.table_base(service_id, p.region),
                table_size: table.len() as u32,
                flags,
            };
            self.services
                .insert(key, value, 0)
                .map_err(map_err(map_names::SERVICES))?;
            self.installed.get_mut(&key).expect("installed").remote = remote;
            return Ok(Change::Updated);
        }
        let region = previous.as_ref().map_or(0, |p| 1 - p.region);
        let table_base = self.layout.table_base(service_id, region);
        let lookup = self.lookup.as_mut_slice();
        for (i, id) in table.iter().enumerate() {
            lookup_set(lookup, table_base + i as u32, *id);
        }
        // The table and backends are plain memory writes: make them visible before the
        // services-map update publishes them.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let value = ServiceValue {
            id: service_id,
            table_base,
            table_size: table.len() as u32,
            flags,
        };
        self.services
            .insert(key, value, 0)
            .map_err(map_err(map_names::SERVICES))?;

        if let Some(p) = &previous {
            self.swapped_tables = true;
            for (addr, id) in &p.backends {
                if !backends.contains_key(addr) {
                    self.retiring_backends.push(*id);
                }
            }
        }
        self.installed.insert(
            key,
            Installed {
                id: service_id,
                region,
                backends,
                remote,
                table,
            },
        );
        Ok(if previous.is_some() {
            Change::Updated
        } else {
            Change::Added
        })
    }
}

/// Zeroes an id's per-CPU entry (counters, cached next hop) before it is reused.
fn reset<T: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, T>,
    id: u32,
) -> Result<(), MapError> {
    let syscall =
        |call, io_error| MapError::SyscallError(aya::sys::SyscallError { call, io_error });
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| syscall("nr_cpus", e))?;
    let zeros = PerCpuValues::try_from(vec![T::default(); cpus])
        .map_err(|e| syscall("per-cpu values", e))?;
    map.set(id, zeros, 0)
}

fn lookup_get(entries: &[LookupEntry], slot: u32) -> u32 {
    let (entry, half) = lookup_position(slot);
    entries[entry as usize][half]
}

fn lookup_set(entries: &mut [LookupEntry], slot: u32, id: u32) {
    let (entry, half) = lookup_position(slot);
    entries[entry as usize][half] = id;
}

enum Change {
    Added,
    Updated,
    Unchanged,
}
