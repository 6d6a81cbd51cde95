//! Prometheus metrics: apply count and latency, applied generation, attach mode, and the
//! dataplane's per-CPU counters summed at scrape time. Labels are bounded: reasons come from one
//! fixed list, services and backends from the (capped) maps.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::inspect;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabel {
    iface: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcHookLabel {
    iface: String,
    hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendPathLabel {
    service: String,
    backend: String,
    egress: String,
    path: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressPathLabel {
    iface: String,
    path: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    service: String,
    backend: String,
}

pub struct Metrics {
    applies: Family<ResultLabel, Counter>,
    apply_seconds: Histogram,
    generation: Gauge,
    attached: Family<AttachLabel, Gauge>,
    tc_hook: Family<TcHookLabel, Gauge>,
    ready: AtomicBool,
    egress_path: Family<EgressPathLabel, Gauge>,
    backend_path: Family<BackendPathLabel, Gauge>,
    bpf_log: Family<BpfLogLabel, Counter>,
    announced: Family<AnnouncedLabel, Gauge>,
    snat_flows: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnnouncedLabel {
    address: String,
    /// `announcing` (ARP / NDP answered), or `lease_expired` (withdrawn until the next Apply).
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BpfLogLabel {
    outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            applies: Family::default(),
            apply_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            generation: Gauge::default(),
            attached: Family::default(),
            tc_hook: Family::default(),
            ready: AtomicBool::new(false),
            egress_path: Family::default(),
            backend_path: Family::default(),
            bpf_log: Family::default(),
            announced: Family::default(),
            snat_flows: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// One Apply: `result` is ok, invalid, stale or error.
    pub fn applied(&self, elapsed: Duration, result: &'static str, generation: u64) {
        self.applies.get_or_create(&ResultLabel { result }).inc();
        self.apply_seconds.observe(elapsed.as_secs_f64());
        if result == "ok" {
            self.generation.set(generation as i64);
        }
    }

    pub fn attached(&self, iface: &str, mode: &'static str) {
        self.attached
            .get_or_create(&AttachLabel {
                iface: iface.to_owned(),
                mode,
            })
            .set(1);
    }

    /// The applied announced addresses and their state (replaces the previous set; bounded by
    /// the announced-addresses map).
    pub fn announced(&self, addresses: &[impl ToString], state: &'static str) {
        self.announced.clear();
        for address in addresses {
            self.announced
                .get_or_create(&AnnouncedLabel {
                    address: address.to_string(),
                    state,
                })
                .set(1);
        }
    }

    /// The TC egress hook on `iface`: `tcx` or `netlink`.
    pub fn tc_hook(&self, iface: &str, hook: &'static str) {
        self.tc_hook
            .get_or_create(&TcHookLabel {
                iface: iface.to_owned(),
                hook,
            })
            .set(1);
    }

    /// The forwarding paths as the pinned maps say now (replaces the previous set).
    pub fn paths(&self, report: &crate::paths::PathReport) {
        self.egress_path.clear();
        for e in &report.egress_paths {
            self.egress_path
                .get_or_create(&EgressPathLabel {
                    iface: e.iface.clone(),
                    path: e.path,
                    reason: e.reason,
                })
                .set(1);
        }
        self.backend_path.clear();
        for b in &report.backend_paths {
            self.backend_path
                .get_or_create(&BackendPathLabel {
                    service: b.service.clone(),
                    backend: b.backend.clone(),
                    egress: b.path.egress.clone().unwrap_or_default(),
                    path: b.path.path,
                    reason: b.path.reason,
                })
                .set(1);
        }
    }

    /// Readiness: the programs are attached and the agent serves.
    /// One record read from the eBPF log ring: `emitted`, or `dropped` by the rate limit.
    pub fn bpf_log_record(&self, outcome: &'static str) {
        self.bpf_log.get_or_create(&BpfLogLabel { outcome }).inc();
    }

    /// SNATed flows in the maps, as the last garbage collection counted them.
    pub fn snat_flows(&self, flows: usize) {
        self.snat_flows.set(flows as i64);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text, with the dataplane counters of `report` when there is one.
    pub fn encode(&self, report: Option<&inspect::Report>) -> String {
        let mut registry = Registry::with_prefix("fulgur");
        registry.register("apply", "Apply calls by result", self.applies.clone());
        registry.register(
            "apply_duration_seconds",
            "Apply latency",
            self.apply_seconds.clone(),
        );
        registry.register(
            "applied_generation",
            "Generation of the applied state",
            self.generation.clone(),
        );
        registry.register(
            "attached",
            "Interfaces with the dataplane attached, by XDP mode",
            self.attached.clone(),
        );
        registry.register(
            "tc_hook",
            "Interfaces with the TC egress program attached, by hook (tcx or netlink)",
            self.tc_hook.clone(),
        );
        registry.register(
            "egress_path",
            "Forwarding path of each egress device (fast: XDP redirect or TX; kernel: XDP_PASS after DNAT), and why",
            self.egress_path.clone(),
        );
        registry.register(
            "backend_path",
            "Forwarding path each backend takes (fast, kernel, or unresolved before its first packet), its egress device, and why",
            self.backend_path.clone(),
        );
        registry.register(
            "snat_flows",
            "SNATed flows (to backends on other nodes) in the SNAT maps, as of the last garbage collection (every 10 s)",
            self.snat_flows.clone(),
        );
        registry.register(
            "announced_addresses",
            "Gateway addresses this node was told to announce, by state (announcing: ARP and NDP answered; lease_expired: no RPC from the controller within announce_lease_ms, withdrawn until its next Apply)",
            self.announced.clone(),
        );
        registry.register(
            "bpf_log_records",
            "Records read from the eBPF programs' log (--bpf-log), by outcome (emitted, or dropped by the rate limit)",
            self.bpf_log.clone(),
        );
        if let Some(report) = report {
            let reasons = Family::<ReasonLabel, Counter>::default();
            for (reason, value) in &report.counters {
                reasons
                    .get_or_create(&ReasonLabel { reason })
                    .inc_by(*value);
            }
            registry.register(
                "dataplane_packets",
                "Packets by verdict or pass/drop reason",
                reasons,
            );
            let families: [(&str, &str, Family<ServiceLabel, Counter>); 4] = [
                (
                    "service_packets",
                    "Packets translated towards a service's backends",
                    Family::default(),
                ),
                (
                    "service_bytes",
                    "Bytes translated towards a service's backends",
                    Family::default(),
                ),
                (
                    "service_new_flows",
                    "Flows given a backend",
                    Family::default(),
                ),
                ("service_rejects", "Flows rejected", Family::default()),
            ];
            let backend_families: [(&str, &str, Family<BackendLabel, Counter>); 3] = [
                (
                    "backend_packets",
                    "Packets translated towards a backend",
                    Family::default(),
                ),
                (
                    "backend_bytes",
                    "Bytes translated towards a backend",
                    Family::default(),
                ),
                (
                    "backend_new_flows",
                    "Flows given to a backend",
                    Family::default(),
                ),
            ];
            for s in &report.services {
                let service = ServiceLabel {
                    service: format!("{} {}:{}", s.protocol, s.vip, s.port),
                };
                let t = &s.traffic;
                for ((_, _, family), value) in
                    families
                        .iter()
                        .zip([t.packets, t.bytes, t.new_flows, t.rejects])
                {
                    family.get_or_create(&service).inc_by(value);
                }
                for b in &s.backends {
                    let label = BackendLabel {
                        service: service.service.clone(),
                        backend: b.endpoint(),
                    };
                    let t = &b.traffic;
                    for ((_, _, family), value) in
                        backend_families
                            .iter()
                            .zip([t.packets, t.bytes, t.new_flows])
                    {
                        family.get_or_create(&label).inc_by(value);
                    }
                }
            }
            for (name, help, family) in families {
                registry.register(name, help, family);
            }
            for (name, help, family) in backend_families {
                registry.register(name, help, family);
            }
        }
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}
