//! Mutation fuzzing through BPF_PROG_TEST_RUN: truncations and bit flips of the corpus packets,
//! the ingress cases through XDP and the egress cases through TC. Whatever comes in, a packet the
//! programs send out (XDP_TX, XDP_REDIRECT) or change is well formed, and its checksums are valid
//! whenever the input's were; TC always lets the packet leave.
//!
//! `FULGUR_FUZZ_ITERATIONS` sets the count (default 100 000; `cargo xtask fuzz` runs millions)
//! and `FULGUR_FUZZ_SEED` the seed, which every failure message repeats.

use etherparse::{NetSlice, SlicedPacket};
use fulgur_tests::{
    corpus::{self, TC_ACT_OK, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    lab::{self, Lab},
    packets::{CLIENT_MAC, Kind, diff},
};

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut packet = seed.to_vec();
    match rng.below(4) {
        0 => packet.truncate(14 + rng.below(packet.len() - 13)),
        1 => {
            for _ in 0..1 + rng.below(4) {
                let bit = rng.below(packet.len() * 8);
                packet[bit / 8] ^= 1 << (bit % 8);
            }
        }
        2 => {
            // Header fields are where parsers break: hit the first 80 bytes harder.
            let at = 12 + rng.below(packet.len().min(80) - 12);
            packet[at] = rng.next() as u8;
        }
        _ => {
            let bit = rng.below(packet.len() * 8);
            packet[bit / 8] ^= 1 << (bit % 8);
            packet.truncate(14 + rng.below(packet.len() - 13));
        }
    }
    packet
}

/// The Internet checksum over `chunks`: 0xffff when the data carries a valid checksum.
fn ones_complement_sum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u64;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u64;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Parses a frame strictly; `Ok(checksums_valid)` if it is a well-formed TCP, UDP or ICMP packet,
/// or an Ethernet/IPv4 ARP reply (no checksum: valid when it comes from the lab device's MAC).
fn inspect(frame: &[u8]) -> Result<bool, String> {
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| format!("does not parse: {e}"))?;
    let (ip_ok, pseudo, proto, l4): (bool, Vec<u8>, u8, &[u8]) = match &sliced.net {
        Some(NetSlice::Arp(arp)) => {
            let arp = arp.to_packet();
            let eth_ipv4 = arp.try_eth_ipv4().map_err(|e| format!("ARP: {e}"))?;
            return if arp.operation == etherparse::ArpOperation::REPLY {
                Ok(eth_ipv4.sender_mac == lab::IN_MAC)
            } else {
                Err(format!("ARP operation {:?}", arp.operation))
            };
        }
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header();
            let payload = ip.payload();
            if payload.fragmented {
                return Err("fragment".into());
            }
            let mut pseudo = header.source().to_vec();
            pseudo.extend_from_slice(&header.destination());
            pseudo.extend_from_slice(&[0, header.protocol().0]);
            pseudo.extend_from_slice(&(payload.payload.len() as u16).to_be_bytes());
            let ip_ok = ones_complement_sum(&[header.slice()]) == 0xffff;
            (ip_ok, pseudo, header.protocol().0, payload.payload)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header();
            let payload = ip.payload();
            let mut pseudo = header.source().to_vec();
            pseudo.extend_from_slice(&header.destination());
            pseudo.extend_from_slice(&(payload.payload.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, payload.ip_number.0]);
            (true, pseudo, payload.ip_number.0, payload.payload)
        }
        _ => return Err("not IP".into()),
    };
    let l4_ok = match proto {
        // ICMPv4's checksum covers the message only.
        1 => ones_complement_sum(&[l4]) == 0xffff,
        17 if pseudo.len() == 12 && l4.len() >= 8 && l4[6..8] == [0, 0] => true,
        6 | 17 | 58 => ones_complement_sum(&[&pseudo, l4]) == 0xffff,
        other => return Err(format!("protocol {other}")),
    };
    Ok(ip_ok && l4_ok)
}

/// An IP frame cut inside its IP header: BPF_PROG_TEST_RUN builds no skb from it (EINVAL), and
/// the kernel never hands TC one.
fn too_short_for_an_skb(frame: &[u8]) -> bool {
    match [frame[12], frame[13]] {
        [0x08, 0x00] => frame.len() < 14 + 20,
        [0x86, 0xdd] => frame.len() < 14 + 40,
        _ => false,
    }
}

#[test]
fn mutated_packets_never_leave_malformed() {
    let iterations: usize = std::env::var("FULGUR_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("FULGUR_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f00d);
    let mut lab = Lab::new().expect("lab");
    lab.apply_yaml(corpus::SERVICES).unwrap();
    // (through TC egress, packet): the ingress cases go through XDP.
    let mut seeds: Vec<(bool, Vec<u8>)> = corpus::ingress_cases()
        .into_iter()
        .map(|c| (false, c.input))
        .collect();
    // ICMP errors about tracked flows, so mutations reach the ICMP translation too.
    for (f, router) in [
        (&corpus::V4, "198.51.100.254"),
        (&corpus::V6, "2001:db8:1::fe"),
    ] {
        for (kind, port, service_port) in [(Kind::TcpSyn, 44000, 80), (Kind::Udp, 44001, 53)] {
            lab.xdp(&corpus::to_service(f, kind, f.vip, port).build())
                .unwrap();
            let quote = corpus::quoted(kind, (f.vip, service_port), (f.client, port));
            let eth = (CLIENT_MAC, lab::IN_MAC);
            seeds.push((
                false,
                corpus::icmp_error(eth, router.parse().unwrap(), f.vip, 64, true, &quote),
            ));
        }
        // The egress cases answer a tracked flow (replies, ICMP errors about it).
        let syn = corpus::to_service(f, Kind::TcpSyn, f.vip, corpus::EGRESS_TRACKED_PORT);
        lab.xdp(&syn.build()).unwrap();
        seeds.extend(corpus::egress_cases(f).into_iter().map(|c| (true, c.input)));
    }
    let mut rng = Rng(seed);
    let mut verdicts = [0usize; 5];
    let (mut egress_runs, mut egress_rewritten) = (0usize, 0usize);
    for i in 0..iterations {
        let (egress, seed_packet) = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed_packet);
        let (verdict, output) = if *egress {
            if too_short_for_an_skb(&input) {
                continue;
            }
            let (verdict, output) = lab.tc(&input).expect("test run");
            assert_eq!(
                verdict as u32, TC_ACT_OK,
                "seed {seed} iteration {i}: TC verdict {verdict}"
            );
            egress_runs += 1;
            if output == input {
                continue;
            }
            egress_rewritten += 1;
            (XDP_PASS, output)
        } else {
            let (verdict, output) = lab.xdp(&input).expect("test run");
            assert!(
                [XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT].contains(&verdict),
                "seed {seed} iteration {i}: verdict {verdict}"
            );
            verdicts[verdict as usize] += 1;
            (verdict, output)
        };
        if verdict == XDP_DROP || (verdict == XDP_PASS && output == input) {
            continue;
        }
        // Sent out, or rewritten for the kernel: it must be a real packet...
        let valid_after = inspect(&output).unwrap_or_else(|e| {
            panic!(
                "seed {seed} iteration {i}: verdict {verdict} with a malformed packet ({e})\n{}",
                diff(&input, &output)
            )
        });
        // ...whose checksums are right whenever the input's were (a rewrite keeps a bad
        // checksum bad, so the receiver still drops it; a reject builds fresh ones).
        let valid_before = inspect(&input).unwrap_or(false);
        assert!(
            valid_after || (!valid_before && verdict != XDP_TX),
            "seed {seed} iteration {i}: verdict {verdict}, checksums broken\n{}",
            diff(&input, &output)
        );
    }
    eprintln!(
        "fuzz: {iterations} packets, seed {seed}: XDP {} dropped, {} passed, {} sent back, {} redirected; TC {egress_runs}, {egress_rewritten} rewritten",
        verdicts[1], verdicts[2], verdicts[3], verdicts[4]
    );
    assert!(
        verdicts[XDP_REDIRECT as usize] > 0 && verdicts[XDP_TX as usize] > 0,
        "mutations never reached the translate paths"
    );
    assert!(
        egress_rewritten > 0,
        "mutations never reached the egress rewrite"
    );
}
