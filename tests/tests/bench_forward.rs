//! One short round of `cargo xtask bench forward` (every topology, every peer), so the bench
//! cannot rot: every peer must report non-zero figures in the JSON, and the chart must exist.

use fulgur_tests::forward_bench::{self, Config};

#[test]
fn bench_forward_smoke_reports_every_peer() {
    let dir = std::env::temp_dir().join(fulgur_tests::netns::unique_token("fulgur-bench-forward-"));
    let report = forward_bench::run(&Config::smoke(dir.clone())).expect("bench forward");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("forward.json")).unwrap()).unwrap();
    let svg = std::fs::read_to_string(dir.join("forward.svg")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);

    let topologies = json["topologies"].as_array().unwrap();
    let names: Vec<&str> = topologies
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(&names[..2], ["veth", "bridge"]);
    // The kind-node bed runs when the agent has its kernel forwarding path, and says so if not.
    assert_eq!(
        names.len() + json["skipped"].as_array().unwrap().len(),
        3,
        "{names:?} {}",
        json["skipped"]
    );
    for topology in topologies {
        let peers: Vec<&str> = topology["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for expected in ["routing", "nftables", "haproxy", "fulgur"] {
            assert!(
                peers.iter().any(|p| p.starts_with(expected)),
                "{} lacks {expected}: {peers:?}",
                topology["name"]
            );
        }
        if topology["name"] != "kind-node" {
            assert!(
                peers.iter().any(|p| p.starts_with("fulgur generic")),
                "{peers:?}"
            );
        }
        if topology["name"] == "veth" {
            assert!(
                peers.iter().any(|p| p.starts_with("fulgur native")),
                "{peers:?}"
            );
        }
        // A failed peer has null figures and its errors in the report.
        let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|v| v > 0.0);
        for peer in topology["peers"].as_array().unwrap() {
            let name = peer["name"].as_str().unwrap();
            assert!(
                peer["errors"].as_array().unwrap().is_empty(),
                "{name}: {peer}"
            );
            assert!(positive(&peer["tcp_cps"]["median"]), "{name}: {peer}");
            if name == "haproxy" {
                assert!(peer["udp_pps"].is_null(), "HAProxy has no UDP: {peer}");
            } else {
                assert!(positive(&peer["udp_pps"]["median"]), "{name}: {peer}");
            }
            if name.starts_with("fulgur") {
                // The attached program ran on the measured traffic, and its cost was read.
                let ns = &peer["xdp_ns_per_packet_udp"];
                assert!(
                    positive(ns) && ns.as_f64() < Some(100_000.0),
                    "{name}: {peer}"
                );
                assert!(positive(&peer["tcp_cps"]["vs_routing"]), "{peer}");
                assert!(positive(&peer["udp_pps"]["vs_nftables"]), "{peer}");
            }
        }
    }
    assert_eq!(report.rounds, 1);
}
