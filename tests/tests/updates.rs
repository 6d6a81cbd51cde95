//! Service updates against the running program (BPF_PROG_TEST_RUN): flows keep their backends
//! through unrelated changes, move only when their backend goes, and a service being rewritten
//! never fails a packet.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use fulgur_agent::{
    config::ServiceSet,
    dataplane::{Dataplane, Sizes},
    writer::{Layout, MapWriter},
};
use fulgur_common::{ServiceKey, ServiceValue, map_names};
use fulgur_tests::{
    corpus::{self, V4, XDP_REDIRECT},
    lab::Lab,
    packets::{Kind, Pkt},
};

fn services(backend_ports: &[u16], udp_ports: &[u16]) -> String {
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| format!("{{address: 203.0.113.2, port: {p}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "services:\n- {{vip: 192.0.2.10, port: 80, protocol: TCP, backends: [{}]}}\n- {{vip: 192.0.2.10, port: 53, protocol: UDP, backends: [{}]}}\n",
        list(backend_ports),
        list(udp_ports)
    )
}

/// The backend port a new or tracked TCP flow from `client_port` is sent to.
fn backend_port(lab: &Lab, kind: Kind, client_port: u16) -> u16 {
    let (verdict, output) = lab
        .xdp(&corpus::to_service(&V4, kind, V4.vip, client_port).build())
        .unwrap();
    assert_eq!(verdict, XDP_REDIRECT, "flow {client_port}");
    u16::from_be_bytes([output[36], output[37]])
}

fn service_entries(lab: &Lab) -> BTreeMap<(u16, u8), ServiceValue> {
    let pin = lab.dataplane.pins.map(map_names::SERVICES);
    let map: HashMap<MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(Map::from_map_data(MapData::from_pin(pin).unwrap()).unwrap()).unwrap();
    map.iter()
        .map(|e| e.unwrap())
        .map(|(k, v)| ((u16::from_be(k.port), k.proto), v))
        .collect()
}

#[test]
fn updating_one_service_leaves_the_others_untouched() {
    let mut lab = Lab::new().unwrap();
    lab.apply_yaml(&services(&[8080, 8081], &[5353])).unwrap();
    let tcp_before = service_entries(&lab)[&(80, 6)];
    let chosen: Vec<u16> = (45000..45100)
        .map(|p| backend_port(&lab, Kind::TcpSyn, p))
        .collect();
    for udp_ports in [&[5353, 5354][..], &[5355], &[5356, 5357, 5358], &[5353]] {
        lab.apply_yaml(&services(&[8080, 8081], udp_ports)).unwrap();
        assert_eq!(
            service_entries(&lab)[&(80, 6)],
            tcp_before,
            "the TCP service entry was rewritten"
        );
    }
    // New flows are spread exactly as before, and tracked ones stay.
    let again: Vec<u16> = (45000..45100)
        .map(|p| backend_port(&lab, Kind::TcpData, p))
        .collect();
    assert_eq!(chosen, again);
    let fresh: Vec<u16> = (45100..45200)
        .map(|p| backend_port(&lab, Kind::TcpSyn, p))
        .collect();
    let mut lab2 = Lab::new().unwrap();
    lab2.apply_yaml(&services(&[8080, 8081], &[5353])).unwrap();
    let reference: Vec<u16> = (45100..45200)
        .map(|p| backend_port(&lab2, Kind::TcpSyn, p))
        .collect();
    assert_eq!(fresh, reference, "the TCP table changed");
}

#[test]
fn only_the_flows_of_a_removed_backend_move() {
    let mut lab = Lab::new().unwrap();
    lab.apply_yaml(&services(&[8080, 8081, 8082], &[5353]))
        .unwrap();
    let before: Vec<(u16, u16)> = (46000..46300)
        .map(|p| (p, backend_port(&lab, Kind::TcpSyn, p)))
        .collect();
    assert!(before.iter().any(|(_, b)| *b == 8081));
    lab.apply_yaml(&services(&[8080, 8082], &[5353])).unwrap();
    // A backend added at the same time must not attract tracked flows either.
    lab.apply_yaml(&services(&[8080, 8082, 8083], &[5353]))
        .unwrap();
    for (client_port, backend) in before {
        let now = backend_port(&lab, Kind::TcpData, client_port);
        if backend == 8081 {
            assert_ne!(
                now, 8081,
                "flow {client_port} still goes to the removed backend"
            );
        } else {
            assert_eq!(
                now, backend,
                "flow {client_port} moved although its backend stayed"
            );
        }
    }
}

/// While one thread keeps flipping a service between two backend sets, new flows keep being
/// sent through it: every one reaches a backend of one set or the other, none is rejected or
/// passed for lack of a backend (which a half-written table or a backend freed under a running
/// program would cause).
#[test]
fn a_service_being_rewritten_never_fails_a_packet() {
    let mut lab = Lab::new().unwrap();
    let sets = [
        services(&[8080, 8081], &[5353]),
        services(&[8082, 8083], &[5353]),
    ];
    lab.apply_yaml(&sets[0]).unwrap();

    // A second writer on the same pinned maps, as a restarted agent would have.
    let pins = lab.dataplane.pins.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicUsize::new(0));
    let flipper = {
        let (stop, flips) = (stop.clone(), flips.clone());
        let sets: Vec<_> = sets
            .iter()
            .map(|s| ServiceSet::parse(s, "a test set".into(), true).unwrap())
            .collect();
        std::thread::spawn(move || {
            let sizes = Sizes {
                layout: Layout {
                    max_services: 16,
                    max_backends: 256,
                    table_size: 251,
                },
                conntrack_entries: 4096,
            };
            let mut dataplane = Dataplane::load(pins, &sizes).unwrap();
            let mut writer =
                MapWriter::adopt(sizes.layout, |name| dataplane.take_map(name)).unwrap();
            let mut done = 0;
            while !stop.load(Ordering::Relaxed) && done < 100_000 {
                writer.apply(&sets[(done + 1) % 2]).unwrap();
                done += 1;
                flips.store(done, Ordering::Relaxed);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while flips.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    // At least 20 000 new flows, and on until the service has flipped 50 times.
    let mut seen = BTreeMap::<u16, usize>::new();
    let mut i = 0u32;
    while (i < 20_000 || flips.load(Ordering::Relaxed) < 50) && Instant::now() < deadline {
        let client = std::net::IpAddr::from([198, 51, 100, 100 + (i / 60_000) as u8]);
        let packet = Pkt::new(
            Kind::TcpSyn,
            (client, 1024 + (i % 60_000) as u16),
            (V4.vip, 80),
        )
        .build();
        let (verdict, output) = lab.xdp(&packet).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "packet {i} was not forwarded");
        *seen
            .entry(u16::from_be_bytes([output[36], output[37]]))
            .or_default() += 1;
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    let flips = flips.load(Ordering::Relaxed);
    assert!(
        flips >= 50,
        "only {flips} flips happened during the traffic"
    );
    assert!(seen.keys().all(|p| (8080..=8083).contains(p)), "{seen:?}");
    assert_eq!(seen.len(), 4, "both sets served while flipping: {seen:?}");
}

#[test]
fn pinned_maps_of_another_size_are_refused_not_silently_reused() {
    let lab = Lab::new().unwrap();
    let sizes = Sizes {
        layout: Layout {
            max_services: 16,
            max_backends: 256,
            table_size: 251,
        },
        conntrack_entries: 8192, // the lab's maps were made with 4096
    };
    let error = Dataplane::load(lab.dataplane.pins.clone(), &sizes)
        .err()
        .expect("a size mismatch");
    let message = error.to_string();
    assert!(
        message.contains("FULGUR_CONNTRACK")
            && message.contains("4096")
            && message.contains("8192"),
        "{message}"
    );
}
