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
        if topology["name"] == "veth" {
            assert!(
                peers.iter().any(|p| p.starts_with("fulgur native")),
                "{peers:?}"
            );
        }
        for peer in topology["peers"].as_array().unwrap() {
            let name = peer["name"].as_str().unwrap();
            assert!(
                peer["tcp_cps"]["median"].as_f64().unwrap() > 0.0,
                "{name}: {peer}"
            );
            if name == "haproxy" {
                assert!(peer["udp_pps"].is_null(), "HAProxy has no UDP: {peer}");
            } else {
                assert!(
                    peer["udp_pps"]["median"].as_f64().unwrap() > 0.0,
                    "{name}: {peer}"
                );
            }
            if name.starts_with("fulgur") {
                // The attached program ran on the measured traffic, and its cost was read.
                let ns = peer["xdp_ns_per_packet_udp"].as_f64().unwrap();
                assert!(ns > 0.0 && ns < 100_000.0, "{name}: {peer}");
                assert!(
                    peer["tcp_cps"]["vs_routing"].as_f64().unwrap() > 0.0,
                    "{peer}"
                );
                assert!(
                    peer["udp_pps"]["vs_nftables"].as_f64().unwrap() > 0.0,
                    "{peer}"
                );
            }
        }
    }
    assert_eq!(report.rounds, 1);
}
