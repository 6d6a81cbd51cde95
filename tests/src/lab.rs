//! A packet lab: the dataplane loaded inside its own namespace with a fixed routing table and
//! neighbour entries, so `BPF_PROG_TEST_RUN` results (FIB lookups included) are deterministic.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use fulgur_agent::{
    bpf_log::BpfLog,
    config::ServiceSet,
    dataplane::{self, Dataplane, Pins, Sizes},
    inspect::{self, Traffic},
    writer::{Layout, MapWriter},
};
use fulgur_common::{Counter, TrafficStats, map_names, program_names};

use crate::netns::{Entered, NetNs, unique_token};

/// MAC of the lab's client-facing interface.
pub const IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x00];
/// MAC of the lab's backend-facing interface.
pub const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x00];
/// The neighbour entry for [`BACKEND_WITH_NEIGHBOUR`].
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0xb2];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0xc2];

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Routed out of `out0` with a permanent neighbour entry: the redirect path.
pub const BACKEND_WITH_NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Routed out of `out0`, neighbour unknown: the kernel-fallback path.
pub const BACKEND_NO_NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);

pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
pub const BACKEND6_WITH_NEIGHBOUR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
pub const BACKEND6_NO_NEIGHBOUR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3);

/// A neighbour entry that never expires, so FIB lookups in the lab always find it.
fn permanent_neighbour(ns: &NetNs, addr: &str, lladdr: [u8; 6], dev: &str) -> anyhow::Result<()> {
    ns.ip(&[
        "neigh",
        "replace",
        addr,
        "lladdr",
        &mac(lladdr),
        "dev",
        dev,
        "nud",
        "permanent",
    ])
    .map(drop)
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub struct Lab {
    pub writer: MapWriter,
    pub dataplane: Dataplane,
    counters: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub in_ifindex: u32,
    pub out_ifindex: u32,
    conntrack_entries: u32,
    // Drop order: leave the namespace before deleting it.
    _entered: Entered,
    _ns: NetNs,
}

impl Lab {
    /// Moves the calling thread into a fresh lab namespace and loads the dataplane there.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_sizes(Sizes {
            layout: Layout {
                max_services: 16,
                max_backends: 256,
                table_size: 251,
            },
            conntrack_entries: 4096,
        })
    }

    /// A lab whose maps have these sizes (the benchmark uses the agent's defaults).
    pub fn with_sizes(sizes: Sizes) -> anyhow::Result<Self> {
        let ns = NetNs::new("fgpk")?;
        ns.ip(&[
            "link",
            "add",
            "name",
            "in0",
            "address",
            &mac(IN_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "in1",
        ])?;
        ns.ip(&[
            "link",
            "add",
            "name",
            "out0",
            "address",
            &mac(OUT_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "out1",
        ])?;
        for dev in ["in0", "in1", "out0", "out1"] {
            ns.ip(&["link", "set", "dev", dev, "up"])?;
        }
        ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "in0"])?;
        ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "out0"])?;
        permanent_neighbour(
            &ns,
            &BACKEND_WITH_NEIGHBOUR.to_string(),
            BACKEND_MAC,
            "out0",
        )?;
        permanent_neighbour(&ns, &CLIENT.to_string(), CLIENT_MAC, "in0")?;
        ns.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "in0", "nodad"])?;
        ns.ip(&["addr", "add", "2001:db8:2::1/64", "dev", "out0", "nodad"])?;
        permanent_neighbour(
            &ns,
            &BACKEND6_WITH_NEIGHBOUR.to_string(),
            BACKEND_MAC,
            "out0",
        )?;
        permanent_neighbour(&ns, &CLIENT6.to_string(), CLIENT_MAC, "in0")?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let entered = ns.enter()?;
        let in_ifindex = dataplane::if_index("in0")?;
        let out_ifindex = dataplane::if_index("out0")?;

        let pins = Pins::new(format!("/sys/fs/bpf/{}", unique_token("fgpk")));
        let mut dataplane = Dataplane::load(pins, &sizes).context("loading the dataplane")?;
        let mut writer = MapWriter::adopt(sizes.layout, |name| dataplane.take_map(name))?;
        // in0 is the client-facing device: it answers ARP / NDP for announced addresses.
        writer.register_announce_device(in_ifindex, IN_MAC)?;
        // Both lab devices take the fast path, so the corpus sees redirects and XDP_TX.
        let fast = |ifindex, name: &str| fulgur_agent::paths::Decision {
            ifindex,
            name: name.into(),
            fast: true,
            reason: fulgur_common::PathReason::Driver,
            xdp_transmit: true,
        };
        fulgur_agent::paths::PathMaps::adopt(|name| dataplane.take_map(name))?
            .sync(&[fast(in_ifindex, "in0"), fast(out_ifindex, "out0")])?;
        let mut take = |name| {
            dataplane
                .take_map(name)
                .with_context(|| format!("map {name}"))
        };
        let counters = PerCpuArray::try_from(take(map_names::COUNTERS)?)?;
        // The writer owns the stats maps (it zeroes reused ids); read them through their pins.
        let pinned = |name| -> anyhow::Result<PerCpuArray<MapData, TrafficStats>> {
            let map = aya::maps::Map::from_map_data(MapData::from_pin(dataplane.pins.map(name))?)?;
            Ok(PerCpuArray::try_from(map)?)
        };
        let service_stats = pinned(map_names::SERVICE_STATS)?;
        let backend_stats = pinned(map_names::BACKEND_STATS)?;
        Ok(Lab {
            writer,
            dataplane,
            counters,
            service_stats,
            backend_stats,
            in_ifindex,
            out_ifindex,
            conntrack_entries: sizes.conntrack_entries,
            _entered: entered,
            _ns: ns,
        })
    }

    pub fn apply_yaml(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.writer.apply(&ServiceSet::parse(
            yaml,
            "the test's services".into(),
            true,
        )?)?;
        Ok(())
    }

    /// Turns SNAT on with `settings`, as the agent does at start: the SNAT maps (opened through
    /// their pins), with the configuration written.
    pub fn snat(
        &self,
        settings: fulgur_agent::snat::SnatSettings,
    ) -> anyhow::Result<fulgur_agent::snat::SnatMaps> {
        let pins = &self.dataplane.pins;
        Ok(fulgur_agent::snat::SnatMaps::adopt(
            |name| {
                MapData::from_pin(pins.map(name))
                    .ok()
                    .and_then(|data| aya::maps::Map::from_map_data(data).ok())
            },
            settings,
        )?)
    }

    /// Runs the XDP ingress program on `packet` as if it arrived on `in0`.
    pub fn xdp(&self, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        self.run_xdp(program_names::XDP_INGRESS, packet, 1)
    }

    /// Runs the XDP ingress program on `packet` as if it arrived on device `ifindex`.
    pub fn xdp_from(&self, ifindex: u32, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self.test_run_xdp_at(
            &self.dataplane,
            program_names::XDP_INGRESS,
            ifindex,
            packet,
            Some(&mut out),
            1,
        )?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// As [`Lab::xdp`], with the programs of `dataplane` (loaded over this lab's pins).
    pub fn xdp_on(&self, dataplane: &Dataplane, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self.test_run_xdp_on(
            dataplane,
            program_names::XDP_INGRESS,
            packet,
            Some(&mut out),
            1,
        )?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    pub fn run_xdp(
        &self,
        name: &str,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self.test_run_xdp(name, packet, Some(&mut out), repeat)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs an XDP program once on `packet`: (verdict, kernel-measured run time in ns).
    pub fn run_xdp_timed(&self, name: &str, packet: &[u8]) -> anyhow::Result<(u32, u64)> {
        self.run_xdp_timed_on(&self.dataplane, name, packet)
    }

    /// As [`Lab::run_xdp_timed`], with the programs of `dataplane` (loaded over this lab's pins).
    pub fn run_xdp_timed_on(
        &self,
        dataplane: &Dataplane,
        name: &str,
        packet: &[u8],
    ) -> anyhow::Result<(u32, u64)> {
        let result = self.test_run_xdp_on(dataplane, name, packet, None, 1)?;
        Ok((result.return_value, result.duration.as_nanos() as u64))
    }

    /// The programs loaded again at another `--bpf-log` level, over this lab's maps.
    pub fn programs_with_log(&self, level: BpfLog) -> anyhow::Result<Dataplane> {
        let sizes = Sizes {
            layout: self.writer.layout(),
            conntrack_entries: self.conntrack_entries,
        };
        Dataplane::load_with_log(self.dataplane.pins.clone(), &sizes, level)
            .context("loading the programs again")
    }

    /// BPF_PROG_TEST_RUN of XDP program `name`, as if `packet` arrived on `in0`.
    fn test_run_xdp(
        &self,
        name: &str,
        packet: &[u8],
        data_out: Option<&mut [u8]>,
        repeat: u32,
    ) -> anyhow::Result<aya::programs::TestRunResult> {
        self.test_run_xdp_on(&self.dataplane, name, packet, data_out, repeat)
    }

    fn test_run_xdp_on(
        &self,
        dataplane: &Dataplane,
        name: &str,
        packet: &[u8],
        data_out: Option<&mut [u8]>,
        repeat: u32,
    ) -> anyhow::Result<aya::programs::TestRunResult> {
        self.test_run_xdp_at(dataplane, name, self.in_ifindex, packet, data_out, repeat)
    }

    fn test_run_xdp_at(
        &self,
        dataplane: &Dataplane,
        name: &str,
        ifindex: u32,
        packet: &[u8],
        data_out: Option<&mut [u8]>,
        repeat: u32,
    ) -> anyhow::Result<aya::programs::TestRunResult> {
        let program: &Xdp = dataplane
            .ebpf
            .program(name)
            .context("program")?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let md: [u32; 6] = [0, packet.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(program.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out,
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::new()
        })?)
    }

    /// Runs the TC egress program on `packet`.
    pub fn tc(&self, packet: &[u8]) -> anyhow::Result<(i32, Vec<u8>)> {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self.test_run_tc(packet, Some(&mut out))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// Runs the TC egress program once on `packet`: (verdict, kernel-measured run time in ns).
    pub fn run_tc_timed(&self, packet: &[u8]) -> anyhow::Result<(i32, u64)> {
        let result = self.test_run_tc(packet, None)?;
        Ok((
            result.return_value as i32,
            result.duration.as_nanos() as u64,
        ))
    }

    fn test_run_tc(
        &self,
        packet: &[u8],
        data_out: Option<&mut [u8]>,
    ) -> anyhow::Result<aya::programs::TestRunResult> {
        let program: &SchedClassifier = self
            .dataplane
            .ebpf
            .program(program_names::TC_EGRESS)
            .context("program")?
            .try_into()?;
        Ok(program.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out,
            ..TestRunOptions::new()
        })?)
    }

    /// A service's traffic counters summed over CPUs.
    pub fn service_stats(&self, service_id: u32) -> anyhow::Result<Traffic> {
        Ok(inspect::traffic(&self.service_stats, service_id)?)
    }

    /// A backend's traffic counters summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> anyhow::Result<Traffic> {
        Ok(inspect::traffic(&self.backend_stats, backend_id)?)
    }

    /// A global counter summed over CPUs.
    pub fn counter(&self, counter: Counter) -> anyhow::Result<u64> {
        Ok(self.counters.get(&(counter as u32), 0)?.iter().sum())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = dataplane::detach(&self.dataplane.pins);
    }
}
