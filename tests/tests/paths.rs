//! The forwarding paths in the XDP program, through BPF_PROG_TEST_RUN with exact bytes: a device
//! on the kernel path gets the DNATed packet passed to the kernel untouched otherwise (MACs and
//! TTL as they came), a fast device that left the redirect map is counted `redirect_failed` and
//! passed the same way, and a fast device is redirected. Next hops cached by an older agent, in
//! another layout, are resolved again rather than trusted.

use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuValues, xdp::DevMapHash};
use fulgur_agent::{
    bpf_log::BpfLog,
    paths::{Decision, PathMaps},
};
use fulgur_common::{Counter, NextHop, PATH_FAST, PathReason, map_names, next_epoch};
use fulgur_tests::{
    corpus::{self, V4, V6, XDP_PASS, XDP_REDIRECT},
    lab::Lab,
    packets::{Kind, Pkt, diff},
};

fn pinned(lab: &Lab, name: &str) -> Map {
    Map::from_map_data(MapData::from_pin(lab.dataplane.pins.map(name)).expect("pin")).expect("map")
}

/// Writes the path of `out0` (and `in0`, fast) as the agent would.
fn set_out_path(lab: &Lab, fast: bool, reason: PathReason) {
    let mut maps = PathMaps::adopt(|name| Some(pinned(lab, name))).expect("path maps");
    let decision = |ifindex, name: &str, fast, reason| Decision {
        ifindex,
        name: name.into(),
        fast,
        reason,
        xdp_transmit: fast,
    };
    maps.sync(&[
        decision(lab.in_ifindex, "in0", true, PathReason::Driver),
        decision(lab.out_ifindex, "out0", fast, reason),
    ])
    .expect("sync");
}

#[test]
fn kernel_path_and_failed_redirects_pass_the_translated_packet() {
    let mut lab = Lab::new().expect("lab");
    lab.apply_yaml(corpus::SERVICES).expect("services");
    let mut port = 42000;
    for f in [V4, V6] {
        for (kind, backend_port) in [(Kind::TcpSyn, 8080), (Kind::Udp, 5353)] {
            let mut send = |expected_verdict, counter| {
                port += 1;
                let input = corpus::to_service(&f, kind, f.vip, port);
                // Only the destination changes: no MAC rewrite, no TTL decrement.
                let expected = Pkt {
                    dst: f.backend,
                    dst_port: backend_port,
                    ..input.clone()
                }
                .build();
                let before = lab.counter(counter).unwrap();
                let (verdict, output) = lab.xdp(&input.build()).expect("test run");
                assert_eq!(verdict, expected_verdict, "{} {kind:?} {counter:?}", f.name);
                assert_eq!(lab.counter(counter).unwrap() - before, 1, "{counter:?}");
                if verdict == XDP_PASS {
                    assert!(output == expected, "{}", diff(&expected, &output));
                }
            };
            set_out_path(&lab, false, PathReason::Netfilter);
            send(XDP_PASS, Counter::KernelPath);

            set_out_path(&lab, true, PathReason::Driver);
            let mut redirect =
                DevMapHash::try_from(pinned(&lab, map_names::REDIRECT_DEVICES)).expect("devmap");
            redirect.remove(lab.out_ifindex).expect("remove out0");
            send(XDP_PASS, Counter::RedirectFailed);

            set_out_path(&lab, true, PathReason::Driver);
            send(XDP_REDIRECT, Counter::Redirect);
        }
    }
}

/// An agent from before the next-hop epoch pinned its cache with an expiry time where the epoch
/// now sits, so an old entry can read as the epoch a new load starts with. A reload must replace
/// that cache, not trust it: packets leave with the FIB's MACs.
#[test]
fn next_hops_pinned_before_the_epoch_are_resolved_again() {
    let mut lab = Lab::new().expect("lab");
    lab.apply_yaml(corpus::SERVICES).expect("services");
    let first_epoch = next_epoch(0);
    let mut epoch = Array::<_, u32>::try_from(pinned(&lab, map_names::NEXT_HOP_EPOCH)).unwrap();
    epoch.set(0, first_epoch, 0).unwrap();
    let mut hops =
        PerCpuArray::<_, NextHop>::try_from(pinned(&lab, map_names::NEXT_HOPS)).expect("hops");
    let stale = NextHop {
        ifindex: lab.out_ifindex,
        macs: [0xee; 12],
        epoch: first_epoch,
        path: PATH_FAST,
        xdp_transmit: 1,
        pad: [0; 2],
    };
    let cpus = aya::util::nr_cpus().expect("cpus");
    for id in 0..256 {
        let values = PerCpuValues::try_from(vec![stale; cpus]).unwrap();
        hops.set(id, values, 0).unwrap();
    }
    let send = |lab: &Lab, dataplane, port| {
        let input = corpus::to_service(&V4, Kind::TcpSyn, V4.vip, port);
        let (verdict, output) = match dataplane {
            Some(dataplane) => lab.xdp_on(dataplane, &input.build()),
            None => lab.xdp(&input.build()),
        }
        .expect("test run");
        assert_eq!(verdict, XDP_REDIRECT);
        (output, corpus::redirected(&input, V4.backend).build())
    };
    // The running program trusts the cache while the epoch stays.
    let (output, _) = send(&lab, None, 43000);
    assert_eq!(&output[..12], &[0xee; 12]);

    // An older agent left no epoch pin.
    std::fs::remove_file(lab.dataplane.pins.map(map_names::NEXT_HOP_EPOCH)).expect("unpin");
    let reloaded = lab.programs_with_log(BpfLog::Off).expect("reload");
    let (output, expected) = send(&lab, Some(&reloaded), 43001);
    assert!(output == expected, "{}", diff(&expected, &output));
}
