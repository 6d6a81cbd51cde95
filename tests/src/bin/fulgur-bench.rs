//! `cargo xtask bench dataplane`: nanoseconds per packet through the XDP ingress program,
//! measured with BPF_PROG_TEST_RUN next to a trivial XDP program measured the same way; then the
//! packet corpus replayed (every ingress case through XDP, every egress case through TC, each
//! checked for its verdict), and both programs' translated sizes.
//!
//! `cargo xtask bench apply`: one gRPC Apply of 10,000 services × 16 backends to the real agent
//! binary, timed from the client, and the agent's memory afterwards.
//!
//! `cargo xtask bench translate`: the controller's translate (and status documents) over a
//! cluster of 1,000 and of 10,000 routes, side by side; the ratio shows whether the cost grows
//! linearly with the cluster (10×) or worse.
//!
//! Method (dataplane): single-packet calls (repeat = 1), so every measured run sees the intended
//! packet (with `repeat > 1` the kernel reuses one buffer, and a DNAT program would meet its own
//! output from the second iteration on). The kernel's own per-run time is used; each figure is
//! the trimmed mean of many calls, interleaved round-robin across cases so drift hits all alike.
//!
//! `cargo xtask bench forward`: end to end through namespaces, fulgur next to plain routing,
//! nftables DNAT and HAProxy (see `fulgur_tests::forward_bench`).

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, ensure};
use fulgur_agent::{
    bpf_log::BpfLog,
    dataplane::Sizes,
    snat::{NodeAddresses, SnatMode, SnatSettings},
};
use fulgur_common::program_names;
use fulgur_tests::{
    corpus::{self, V4, V6, XDP_PASS, XDP_REDIRECT},
    lab::Lab,
    packets::{Kind, Pkt},
};

const ROUNDS: usize = 200;
const CALLS_PER_ROUND: usize = 100;
/// The corpus replay's rounds and calls per case per round: fewer, for a hundred-odd cases.
const CORPUS_ROUNDS: usize = 40;
const CORPUS_CALLS_PER_ROUND: usize = 5;

struct Bench {
    name: &'static str,
    program: &'static str,
    verdict: u32,
    /// Inputs used in turn; more than one when each call must be a new flow.
    inputs: Vec<Vec<u8>>,
    /// Run on the programs loaded at `--bpf-log debug` rather than the default `off`.
    at_debug: bool,
    samples: Vec<u64>,
}

/// The mean of the middle 90%: the kernel's clock ticks coarsely, so single samples are
/// quantised; averaging many recovers the fraction of a tick, trimming drops interrupts.
fn trimmed_mean(samples: &mut [u64]) -> f64 {
    samples.sort_unstable();
    let cut = samples.len() / 20;
    let kept = &samples[cut..samples.len() - cut];
    kept.iter().sum::<u64>() as f64 / kept.len() as f64
}

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("apply") => apply::run(),
        Some("translate") => translate::run(),
        Some("forward") => forward(),
        Some("dataplane") | None => dataplane(),
        Some(other) => {
            anyhow::bail!("unknown benchmark {other:?} (dataplane, apply, translate or forward)")
        }
    }
}

fn forward() -> anyhow::Result<()> {
    use fulgur_tests::forward_bench::{self, Config};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let report = forward_bench::run(&Config::full(dir.clone()))?;
    println!("{}", forward_bench::markdown(&report));
    println!(
        "{} rounds in {:.0} s; wrote {} and {}",
        report.rounds,
        report.duration_seconds,
        dir.join("forward.json").display(),
        dir.join("forward.svg").display()
    );
    Ok(())
}

fn dataplane() -> anyhow::Result<()> {
    // The agent's default sizes, so lookups and conntrack inserts cost what they cost in use.
    let mut lab = Lab::with_sizes(Sizes::default()).context("the packet lab needs root")?;
    // The corpus's services and one whose backend runs on another node (SNATed).
    lab.apply_yaml(&corpus::SERVICES.replace(
        "announce:",
        "- {vip: 192.0.2.20, port: 80, protocol: TCP, backends: [{address: 203.0.113.2, port: 8080, remote: true}]}\nannounce:",
    ))?;
    // The widest range, so the bench's new flows (one backend tuple) never exhaust it; the
    // ephemeral-range check is the agent's, not the lab's.
    let _snat = lab.snat(SnatSettings {
        mode: SnatMode::Remote,
        ports: "1024-65535".parse().map_err(anyhow::Error::msg)?,
        addresses: NodeAddresses {
            ipv4: Some(corpus::SNAT_NODE),
            ipv6: None,
        },
    })?;
    let snat_vip = corpus::SNAT_V4.vip;
    let established = |f, kind, port| corpus::to_service(f, kind, f.vip, port).build();
    // Prime the flows that are measured as established.
    for (f, kind, port) in [
        (&V4, Kind::TcpSyn, 50000),
        (&V4, Kind::Udp, 50001),
        (&V6, Kind::TcpSyn, 50002),
    ] {
        ensure!(lab.xdp(&established(f, kind, port))?.0 == XDP_REDIRECT);
    }
    let snat_syn = corpus::to_service(&V4, Kind::TcpSyn, snat_vip, 50010);
    let (verdict, snatted) = lab.xdp(&snat_syn.build())?;
    ensure!(verdict == XDP_REDIRECT, "the SNAT flow is forwarded");
    let snat_port = u16::from_be_bytes([snatted[34], snatted[35]]);
    let snat_established = corpus::to_service(&V4, Kind::TcpData, snat_vip, 50010).build();
    let snat_reply =
        corpus::snat_reply(Kind::TcpData, V4.backend, corpus::SNAT_V4.node, snat_port).build();
    // Every call of tcp_new and snat_tcp_new is a SYN from a client port (and address) not seen
    // before; the two draw clients from separate addresses.
    let fresh_syns = |first_client: u8, vip: IpAddr| -> Vec<Vec<u8>> {
        (0..ROUNDS * CALLS_PER_ROUND)
            .map(|i| {
                let client = IpAddr::from([198, 51, 100, first_client + (i / 60000) as u8]);
                Pkt::new(Kind::TcpSyn, (client, 1024 + (i % 60000) as u16), (vip, 80)).build()
            })
            .collect()
    };
    let snat_new_flows = fresh_syns(200, snat_vip);
    let new_flows = fresh_syns(100, V4.vip);
    // The same programs at `--bpf-log debug`, over the same maps: the established flow logs
    // nothing, so any difference is what the log code costs when it is compiled in and on.
    let debug_programs = lab.programs_with_log(BpfLog::Debug)?;
    let other = Pkt::new(Kind::TcpData, (V4.client, 50003), (V4.not_a_service, 80)).build();
    let mut benches = [
        Bench {
            name: "floor",
            program: program_names::XDP_PASS,
            verdict: XDP_PASS,
            inputs: vec![other.clone()],
            at_debug: false,
            samples: vec![],
        },
        Bench {
            name: "tcp_established",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![established(&V4, Kind::TcpData, 50000)],
            at_debug: false,
            samples: vec![],
        },
        Bench {
            name: "tcp_new",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: new_flows,
            at_debug: false,
            samples: vec![],
        },
        Bench {
            name: "udp",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![established(&V4, Kind::Udp, 50001)],
            at_debug: false,
            samples: vec![],
        },
        Bench {
            name: "tcp_established_bpf_log_debug",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![established(&V4, Kind::TcpData, 50000)],
            at_debug: true,
            samples: vec![],
        },
        Bench {
            name: "pass",
            program: program_names::XDP_INGRESS,
            verdict: XDP_PASS,
            inputs: vec![other],
            at_debug: false,
            samples: vec![],
        },
        Bench {
            name: "snat_tcp_new",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: snat_new_flows,
            at_debug: false,
            samples: vec![],
        },
        Bench {
            name: "snat_tcp_established",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![snat_established],
            at_debug: false,
            samples: vec![],
        },
        Bench {
            // Measured as arriving on the client side, so the translated reply leaves by TX.
            name: "snat_reply",
            program: program_names::XDP_INGRESS,
            verdict: corpus::XDP_TX,
            inputs: vec![snat_reply],
            at_debug: false,
            samples: vec![],
        },
        Bench {
            name: "ipv6_tcp",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![established(&V6, Kind::TcpData, 50002)],
            at_debug: false,
            samples: vec![],
        },
    ];
    let mut next_input = vec![0usize; benches.len()];
    for _ in 0..ROUNDS {
        for (b, bench) in benches.iter_mut().enumerate() {
            for _ in 0..CALLS_PER_ROUND {
                let input = &bench.inputs[next_input[b] % bench.inputs.len()];
                next_input[b] += 1;
                let programs = if bench.at_debug {
                    &debug_programs
                } else {
                    &lab.dataplane
                };
                let (verdict, nanos) = lab.run_xdp_timed_on(programs, bench.program, input)?;
                ensure!(
                    verdict == bench.verdict,
                    "{}: verdict {verdict}, expected {}",
                    bench.name,
                    bench.verdict
                );
                bench.samples.push(nanos);
            }
        }
    }
    let floor = trimmed_mean(&mut benches[0].samples);
    let mut cases = BTreeMap::new();
    let mut net = BTreeMap::new();
    println!(
        "method: single-packet BPF_PROG_TEST_RUN calls, kernel-reported time, trimmed mean (middle 90%) of {} per case",
        ROUNDS * CALLS_PER_ROUND
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10}",
        "case", "ns/packet", "net ns", "× floor"
    );
    println!(
        "{:<30} {:>10.0} {:>10} {:>10}",
        "floor (XDP_PASS)", floor, "-", "1.00"
    );
    for bench in benches.iter_mut().skip(1) {
        let gross = trimmed_mean(&mut bench.samples);
        println!(
            "{:<30} {:>10.0} {:>10.0} {:>10.2}",
            bench.name,
            gross,
            gross - floor,
            gross / floor
        );
        cases.insert(bench.name, gross);
        net.insert(bench.name, gross - floor);
    }
    let (ingress_corpus, egress_corpus) = corpus_replay(&lab)?;
    // Program size, so that growth shows: translated bytes (8 per instruction) at each level.
    let translated_bytes =
        |dataplane: &fulgur_agent::dataplane::Dataplane, name: &str| -> anyhow::Result<u32> {
            let program = dataplane.ebpf.program(name).context("program")?;
            program
                .info()?
                .size_translated()
                .context("the kernel reports no translated size")
        };
    let size_off = translated_bytes(&lab.dataplane, program_names::XDP_INGRESS)?;
    let size_debug = translated_bytes(&debug_programs, program_names::XDP_INGRESS)?;
    let egress_size = translated_bytes(&lab.dataplane, program_names::TC_EGRESS)?;
    println!(
        "ingress program: {} instructions translated at --bpf-log off, {} at debug",
        size_off / 8,
        size_debug / 8
    );
    println!(
        "egress program: {} instructions translated (it logs nothing)",
        egress_size / 8
    );
    let report = serde_json::json!({
        "ingress_translated_instructions": {"off": size_off / 8, "debug": size_debug / 8},
        "egress_translated_instructions": egress_size / 8,
        "corpus_cases": {"ingress": ingress_corpus, "egress": egress_corpus},
        "method": "single-packet BPF_PROG_TEST_RUN calls (repeat = 1), trimmed mean (middle 90%) of kernel-reported run time; net = case - floor",
        "floor_ns": floor,
        "cases": cases,
        "net_cases": net,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("dataplane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The packet corpus replayed: every ingress case through XDP, every egress case through TC (its
/// flow tracked first), interleaved round-robin, each call checked for the case's verdict.
/// Returns the trimmed mean ns per case name, ingress and egress.
fn corpus_replay(lab: &Lab) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    for f in [&V4, &V6] {
        let syn = corpus::to_service(f, Kind::TcpSyn, f.vip, corpus::EGRESS_TRACKED_PORT);
        ensure!(
            lab.xdp(&syn.build())?.0 == XDP_REDIRECT,
            "tracking the egress cases' flow ({})",
            f.name
        );
    }
    let ingress = corpus::ingress_cases();
    let egress: Vec<corpus::Case> = [V4, V6].iter().flat_map(corpus::egress_cases).collect();
    let mut samples = vec![Vec::new(); ingress.len() + egress.len()];
    for _ in 0..CORPUS_ROUNDS {
        for (i, case) in ingress.iter().chain(&egress).enumerate() {
            for _ in 0..CORPUS_CALLS_PER_ROUND {
                let (verdict, nanos) = if i < ingress.len() {
                    lab.run_xdp_timed(program_names::XDP_INGRESS, &case.input)?
                } else {
                    let (verdict, nanos) = lab.run_tc_timed(&case.input)?;
                    (verdict as u32, nanos)
                };
                ensure!(
                    verdict == case.verdict,
                    "corpus case {:?}: verdict {verdict}, expected {}",
                    case.name,
                    case.verdict
                );
                samples[i].push(nanos);
            }
        }
    }
    let mut means = samples.iter_mut().map(|s| trimmed_mean(s));
    let mut summarise = |hook: &str, cases: &[corpus::Case]| {
        let timed: BTreeMap<String, f64> = cases
            .iter()
            .map(|c| (c.name.clone(), means.next().unwrap_or_default()))
            .collect();
        ensure!(
            timed.len() == cases.len(),
            "{hook} corpus case names repeat"
        );
        let (slowest, worst) = timed
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(("-", 0.0), |(name, ns)| (name.as_str(), *ns));
        println!(
            "corpus {hook}: {} cases, mean {:.0} ns/packet, slowest {worst:.0} ({slowest})",
            timed.len(),
            timed.values().sum::<f64>() / timed.len().max(1) as f64,
        );
        Ok(timed)
    };
    println!(
        "corpus replay: trimmed mean of {} calls per case, gross (floor included)",
        CORPUS_ROUNDS * CORPUS_CALLS_PER_ROUND
    );
    let ingress_times = summarise("ingress (XDP)", &ingress)?;
    let egress_times = summarise("egress (TC)", &egress)?;
    Ok((ingress_times, egress_times))
}

mod apply {
    use std::time::Instant;

    use anyhow::Context as _;
    use fulgur_agent::dataplane::XdpAttachMode;
    use fulgur_proto::v1::{self, ApplyRequest, DesiredState, dataplane_client::DataplaneClient};
    use fulgur_tests::{
        netns::{NetNs, in_netns, unique_token},
        topology::{AgentProcess, Source},
    };

    const SERVICES: u32 = 10_000;
    const BACKENDS: u32 = 16;
    const LISTEN: &str = "127.0.0.1:50099";

    fn state(generation: u64, backend_port_base: u32) -> DesiredState {
        let services = (0..SERVICES)
            .map(|i| v1::Service {
                vip: format!("192.0.2.{}", 1 + i % 250),
                port: 1000 + i / 250,
                protocol: v1::Protocol::Tcp as i32,
                backends: (0..BACKENDS)
                    .map(|b| v1::Backend {
                        address: format!("203.0.113.{}", 1 + b),
                        port: backend_port_base + i % 1000,
                        weight: 1 + b % 3,
                        remote: false,
                    })
                    .collect(),
                reject_weight: 0,
            })
            .collect();
        DesiredState {
            generation,
            services,
            ..Default::default()
        }
    }

    pub fn run() -> anyhow::Result<()> {
        let ns = NetNs::new("fgbn")?;
        ns.ip(&[
            "link", "add", "name", "lb0", "type", "veth", "peer", "name", "lb1",
        ])?;
        ns.ip(&["link", "set", "dev", "lb0", "up"])?;
        ns.ip(&["link", "set", "dev", "lb1", "up"])?;
        let bpffs = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgbn")));
        let source = Source::Grpc {
            listen: LISTEN.parse()?,
            tls: None,
            metrics: None,
        };
        let sizes = [
            "--max-services",
            "10000",
            "--max-backends",
            "400000",
            "--table-size",
            "1021",
        ];
        let agent =
            AgentProcess::start_sized(&ns, "lb0", XdpAttachMode::Generic, source, bpffs, &sizes)?;
        let rss_idle = agent.rss_mib()?;
        let (first, second) = in_netns(&ns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut client = DataplaneClient::connect(format!("http://{LISTEN}")).await?;
                let request = ApplyRequest {
                    state: Some(state(1, 8000)),
                };
                let started = Instant::now();
                let response = client
                    .apply(request)
                    .await
                    .context("first apply")?
                    .into_inner();
                let first = started.elapsed().as_secs_f64();
                anyhow::ensure!(response.added == SERVICES, "{response:?}");
                // Every service's backends change port: every table and backend is rewritten.
                let request = ApplyRequest {
                    state: Some(state(2, 9000)),
                };
                let started = Instant::now();
                let response = client
                    .apply(request)
                    .await
                    .context("second apply")?
                    .into_inner();
                anyhow::ensure!(response.updated == SERVICES, "{response:?}");
                anyhow::Ok((first, started.elapsed().as_secs_f64()))
            })
        })?;
        let rss = agent.rss_mib()?;
        println!(
            "one Apply of {SERVICES} services × {BACKENDS} backends (gRPC, validated, written to the maps):"
        );
        println!("  first apply (all new)         {first:>7.3} s");
        println!("  second apply (all rewritten)  {second:>7.3} s");
        println!(
            "  agent RSS: {rss_idle:.0} MiB before, {rss:.0} MiB after (includes the mmap-ed lookup and backend maps)"
        );
        let report = serde_json::json!({
            "services": SERVICES,
            "backends_per_service": BACKENDS,
            "apply_seconds": first,
            "reapply_all_changed_seconds": second,
            "agent_rss_mb": rss,
        });
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("apply.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
        println!("wrote {}", path.display());
        Ok(())
    }
}

mod translate {
    use std::time::{Duration, Instant};

    use fulgur_controller::{
        model::{
            BackendRef, EndpointSlice, FromNamespaces, Gateway, GatewayAddress, GatewayClass,
            Listener, Meta, ObjectRef, ParentRef, Route, RouteKind, Service, ServicePort, Snapshot,
        },
        status,
        translate::{Config, translate},
    };

    const CONTROLLER: &str = "fulgur.dev/gateway-controller";
    /// Listeners per Gateway; every route gets a listener of its own.
    const LISTENERS: usize = 50;

    /// `routes` TCPRoutes, each to 2 Services of 4 endpoints, on Gateways of 50 listeners.
    fn cluster(routes: usize) -> Snapshot {
        let meta = |i: usize| Meta {
            generation: 1,
            creation_timestamp: format!("2026-01-01T00:{:02}:{:02}Z", i / 60 % 60, i % 60),
            ..Default::default()
        };
        let mut s = Snapshot {
            classes: vec![GatewayClass {
                name: "fulgur".into(),
                meta: meta(0),
                controller_name: CONTROLLER.into(),
            }],
            ..Default::default()
        };
        for g in 0..routes.div_ceil(LISTENERS) {
            s.gateways.push(Gateway {
                id: ObjectRef::new("infra", &format!("gw-{g}")),
                meta: meta(g),
                class_name: "fulgur".into(),
                listeners: (0..LISTENERS)
                    .map(|l| Listener {
                        name: format!("l{l}"),
                        port: 1000 + l as u16,
                        protocol: "TCP".into(),
                        from: FromNamespaces::All,
                        kinds: vec![],
                    })
                    .collect(),
                addresses: vec![GatewayAddress {
                    kind: "IPAddress".into(),
                    value: Some(format!("10.{}.{}.1", g / 256, g % 256)),
                }],
            });
        }
        for r in 0..routes {
            let namespace = format!("team-{}", r % 100);
            let backends: Vec<BackendRef> = (0..2)
                .map(|b| BackendRef {
                    group: String::new(),
                    kind: "Service".into(),
                    namespace: None,
                    name: format!("svc-{r}-{b}"),
                    port: Some(80),
                    weight: 1,
                })
                .collect();
            for b in &backends {
                s.services.push(Service {
                    id: ObjectRef::new(&namespace, &b.name),
                    ports: vec![ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        protocol: "TCP".into(),
                    }],
                });
                s.endpoint_slices.push(EndpointSlice {
                    namespace: namespace.clone(),
                    service_name: b.name.clone(),
                    ports: vec![(Some("http".into()), 8080)],
                    ready_addresses: (0..4)
                        .map(|e| format!("10.200.{}.{}", r % 250, e + 1).parse().unwrap())
                        .collect(),
                    nodes: Default::default(),
                });
            }
            s.routes.push(Route {
                kind: RouteKind::Tcp,
                id: ObjectRef::new(&namespace, &format!("route-{r}")),
                meta: meta(r),
                parent_refs: vec![ParentRef {
                    group: "gateway.networking.k8s.io".into(),
                    kind: "Gateway".into(),
                    namespace: Some("infra".into()),
                    name: format!("gw-{}", r / LISTENERS),
                    section_name: Some(format!("l{}", r % LISTENERS)),
                    port: None,
                }],
                backend_refs: backends,
            });
        }
        s
    }

    /// The median of `runs` timings of translate + status documents.
    fn time(snapshot: &Snapshot, runs: usize) -> (Duration, usize) {
        let config = Config {
            controller_name: CONTROLLER,
            address_pools: &[],
            now: "2026-06-01T00:00:00Z",
        };
        let mut times = Vec::new();
        let mut services = 0;
        for _ in 0..runs {
            let start = Instant::now();
            let out = translate(&config, snapshot);
            let docs = status::documents(&out);
            times.push(start.elapsed());
            services = out.services.len();
            assert_eq!(
                docs.len(),
                1 + snapshot.gateways.len() + snapshot.routes.len()
            );
        }
        times.sort();
        (times[runs / 2], services)
    }

    pub fn run() -> anyhow::Result<()> {
        let small = cluster(1_000);
        let large = cluster(10_000);
        let (small_time, small_services) = time(&small, 7);
        let (large_time, large_services) = time(&large, 3);
        anyhow::ensure!(small_services == 1_000 && large_services == 10_000);
        let ratio = large_time.as_secs_f64() / small_time.as_secs_f64();
        println!("translate + status documents (median):");
        println!(
            "  1,000 routes, 2,000 services, 8,000 endpoints: {:>8.1} ms",
            small_time.as_secs_f64() * 1e3
        );
        println!(
            "  10,000 routes, 20,000 services, 80,000 endpoints: {:>8.1} ms",
            large_time.as_secs_f64() * 1e3
        );
        println!("  10x the cluster costs {ratio:.1}x (10 = linear)");
        let json = serde_json::json!({
            "small_ms": small_time.as_secs_f64() * 1e3,
            "large_ms": large_time.as_secs_f64() * 1e3,
            "ratio": ratio,
        });
        let dir = std::path::Path::new("target/bench");
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("translate.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        Ok(())
    }
}
