//! `cargo xtask bench dataplane`: nanoseconds per packet through the XDP ingress program,
//! measured with BPF_PROG_TEST_RUN next to a trivial XDP program measured the same way.
//!
//! Method: single-packet calls (repeat = 1), so every measured run sees the intended packet
//! (with `repeat > 1` the kernel reuses one buffer, and a DNAT program would meet its own
//! output from the second iteration on). The kernel's own per-run time is used; each figure is
//! the trimmed mean of many calls, interleaved round-robin across cases so drift hits all alike.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, ensure};
use fulgur_agent::dataplane::Sizes;
use fulgur_common::program_names;
use fulgur_tests::{
    corpus::{self, V4, V6, XDP_PASS, XDP_REDIRECT},
    lab::Lab,
    packets::{Kind, Pkt},
};

const ROUNDS: usize = 200;
const CALLS_PER_ROUND: usize = 100;

struct Bench {
    name: &'static str,
    program: &'static str,
    verdict: u32,
    /// Inputs used in turn; more than one when each call must be a new flow.
    inputs: Vec<Vec<u8>>,
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
    // The agent's default sizes, so lookups and conntrack inserts cost what they cost in use.
    let mut lab = Lab::with_sizes(Sizes::default()).context("the packet lab needs root")?;
    lab.apply_yaml(corpus::SERVICES)?;
    let established = |f, kind, port| corpus::to_service(f, kind, f.vip, port).build();
    // Prime the flows that are measured as established.
    for (f, kind, port) in [
        (&V4, Kind::TcpSyn, 50000),
        (&V4, Kind::Udp, 50001),
        (&V6, Kind::TcpSyn, 50002),
    ] {
        ensure!(lab.xdp(&established(f, kind, port))?.0 == XDP_REDIRECT);
    }
    // Every call of tcp_new is a SYN from a client port (and address) not seen before.
    let new_flows: Vec<Vec<u8>> = (0..ROUNDS * CALLS_PER_ROUND)
        .map(|i| {
            let client = IpAddr::from([198, 51, 100, 100 + (i / 60000) as u8]);
            Pkt::new(
                Kind::TcpSyn,
                (client, 1024 + (i % 60000) as u16),
                (V4.vip, 80),
            )
            .build()
        })
        .collect();
    let other = Pkt::new(Kind::TcpData, (V4.client, 50003), (V4.not_a_service, 80)).build();
    let mut benches = [
        Bench {
            name: "floor",
            program: program_names::XDP_PASS,
            verdict: XDP_PASS,
            inputs: vec![other.clone()],
            samples: vec![],
        },
        Bench {
            name: "tcp_established",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![established(&V4, Kind::TcpData, 50000)],
            samples: vec![],
        },
        Bench {
            name: "tcp_new",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: new_flows,
            samples: vec![],
        },
        Bench {
            name: "udp",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![established(&V4, Kind::Udp, 50001)],
            samples: vec![],
        },
        Bench {
            name: "pass",
            program: program_names::XDP_INGRESS,
            verdict: XDP_PASS,
            inputs: vec![other],
            samples: vec![],
        },
        Bench {
            name: "ipv6_tcp",
            program: program_names::XDP_INGRESS,
            verdict: XDP_REDIRECT,
            inputs: vec![established(&V6, Kind::TcpData, 50002)],
            samples: vec![],
        },
    ];
    let mut next_input = vec![0usize; benches.len()];
    for _ in 0..ROUNDS {
        for (b, bench) in benches.iter_mut().enumerate() {
            for _ in 0..CALLS_PER_ROUND {
                let input = &bench.inputs[next_input[b] % bench.inputs.len()];
                next_input[b] += 1;
                let (verdict, nanos) = lab.run_xdp_timed(bench.program, input)?;
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
        "{:<16} {:>10} {:>10} {:>10}",
        "case", "ns/packet", "net ns", "× floor"
    );
    println!(
        "{:<16} {:>10.0} {:>10} {:>10}",
        "floor (XDP_PASS)", floor, "-", "1.00"
    );
    for bench in benches.iter_mut().skip(1) {
        let gross = trimmed_mean(&mut bench.samples);
        println!(
            "{:<16} {:>10.0} {:>10.0} {:>10.2}",
            bench.name,
            gross,
            gross - floor,
            gross / floor
        );
        cases.insert(bench.name, gross);
        net.insert(bench.name, gross - floor);
    }
    let report = serde_json::json!({
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
