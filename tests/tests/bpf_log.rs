//! `--bpf-log`: the agent, under the DaemonSet's capabilities, logs a rejected flow and a malformed
//! packet once each at `debug`, naming the reason and the flow, and nothing at `off`; at `off` the
//! verifier has removed every log call from the loaded program.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    time::Duration,
};

use aya::{
    maps::MapInfo,
    programs::{ProgramInfo, Xdp},
};
use fulgur_agent::{
    bpf_log::BpfLog,
    dataplane::{Dataplane, Pins, Sizes, XdpAttachMode},
};
use fulgur_common::program_names;
use fulgur_tests::{
    echo::TcpSession,
    netns::{in_netns, unique_token},
    topology::{AgentProcess, CLIENT, LB_CLIENT_SIDE, LB_IFACE, Launch, Source, Topology, VIP},
};

const SMALL: [&str; 6] = [
    "--max-services",
    "8",
    "--max-backends",
    "64",
    "--table-size",
    "251",
];
/// A service without backends: its flows are rejected (TCP reset).
const REJECTING_PORT: u16 = 81;
/// The malformed datagram's source port, to find it in the log.
const MALFORMED_SPORT: u16 = 40_123;

/// One IPv4/UDP frame to the VIP whose UDP length (200) exceeds the datagram (12 bytes).
fn malformed_udp_frame() -> Vec<u8> {
    let mut frame = vec![0xff; 6]; // broadcast: XDP sees it whatever the MAC
    frame.extend([0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let total_len: u16 = 20 + 12;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip.extend(CLIENT.octets());
    ip.extend(VIP.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame.extend(ip);
    frame.extend(MALFORMED_SPORT.to_be_bytes());
    frame.extend(80u16.to_be_bytes());
    frame.extend(200u16.to_be_bytes()); // the lie
    frame.extend([0, 0, b'h', b'i', b'!', b'!']);
    frame
}

/// Sends `frame` once out of the client's `cl0` through an AF_PACKET socket.
fn send_raw(frame: &[u8]) -> anyhow::Result<()> {
    let ifindex = fulgur_agent::dataplane::if_index("cl0")?;
    // SAFETY: plain socket calls on a socket this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        );
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(sent == frame.len() as isize, "sendto: {error}");
    }
    Ok(())
}

/// Runs an agent at `level`, rejects one TCP connection and sends one malformed datagram; returns
/// the agent's log and a /metrics scrape.
fn agent_log_after_rare_events(level: &str) -> (String, String) {
    let topology = Topology::new(1, XdpAttachMode::Generic).expect("topology");
    let services = std::env::temp_dir().join(format!("{}.yaml", unique_token("fulgur-bpflog-")));
    std::fs::write(
        &services,
        format!(
            "services:\n- {{vip: {VIP}, port: {REJECTING_PORT}, protocol: TCP, backends: []}}\n"
        ),
    )
    .unwrap();
    let services_path = services.to_str().unwrap().to_owned();
    let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgag")));
    let metrics_addr = SocketAddr::from((LB_CLIENT_SIDE, 9464));
    let agent = AgentProcess::start_launched(
        &topology.lb,
        LB_IFACE,
        XdpAttachMode::Generic,
        Source::Args(&[
            "--services",
            &services_path,
            "--bpf-log",
            level,
            "--metrics-listen",
            &metrics_addr.to_string(),
        ]),
        bpffs_dir,
        &SMALL,
        &Launch::deployed(),
    );
    let _ = std::fs::remove_file(&services);
    let agent = agent.unwrap_or_else(|e| panic!("{e:#}"));
    let vip = SocketAddr::from((VIP, REJECTING_PORT));
    let refused = in_netns(&topology.client, move || {
        let refused = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
            .err()
            .map(|e| e.kind());
        send_raw(&malformed_udp_frame())?;
        Ok(refused)
    })
    .unwrap();
    assert_eq!(refused, Some(std::io::ErrorKind::ConnectionRefused));
    if level != "off" {
        agent
            .wait_for_log("reason=malformed", Duration::from_secs(10))
            .unwrap();
    }
    // Time for a record to arrive that should not.
    std::thread::sleep(Duration::from_millis(500));
    let metrics = in_netns(&topology.client, move || {
        let mut stream = TcpStream::connect_timeout(&metrics_addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: fulgur\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
    .unwrap();
    (agent.log_text(), metrics)
}

#[test]
fn debug_logs_a_rejection_and_a_malformed_packet_once_each() {
    let (log, metrics) = agent_log_after_rare_events("debug");
    assert!(
        metrics.contains("fulgur_bpf_log_records_total{outcome=\"emitted\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("outcome=\"dropped\""), "{metrics}");
    let rejected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reason=rejected_tcp_reset"))
        .collect();
    assert_eq!(rejected.len(), 1, "{log}");
    let flow = format!("src={CLIENT} dst={VIP} proto=6 sport=");
    assert!(rejected[0].contains(&flow), "{log}");
    assert!(
        rejected[0].contains(&format!(" dport={REJECTING_PORT} value=")),
        "{log}"
    );
    assert!(rejected[0].contains("fulgur::bpf"), "{log}");
    let malformed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reason=malformed"))
        .collect();
    assert_eq!(malformed.len(), 1, "{log}");
    assert!(
        malformed[0].contains(&format!("src={CLIENT} dst={VIP} proto=17 len=46")),
        "{log}"
    );
}

#[test]
fn off_logs_nothing() {
    let (log, metrics) = agent_log_after_rare_events("off");
    assert!(
        !metrics.contains("fulgur_bpf_log_records_total{"),
        "{metrics}"
    );
    assert!(!log.contains("fulgur::bpf"), "{log}");
    assert!(!log.contains("eBPF log on"), "{log}");
}

/// The translated (post-verifier) instructions of a loaded program.
fn xlated_instructions(program: &Xdp) -> Vec<[u8; 8]> {
    // The head of struct bpf_prog_info, up to xlated_prog_insns.
    #[repr(C)]
    #[derive(Default)]
    struct ProgInfoHead {
        prog_type: u32,
        id: u32,
        tag: [u8; 8],
        jited_prog_len: u32,
        xlated_prog_len: u32,
        jited_prog_insns: u64,
        xlated_prog_insns: u64,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let fd = program.fd().unwrap().as_fd().as_raw_fd() as u32;
    let get = |info: &mut ProgInfoHead| {
        let attr = InfoAttr {
            bpf_fd: fd,
            info_len: size_of::<ProgInfoHead>() as u32,
            info: std::ptr::from_mut(info) as u64,
        };
        // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &raw const attr,
                size_of::<InfoAttr>(),
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    };
    let mut head = ProgInfoHead::default();
    get(&mut head);
    let mut insns = vec![[0u8; 8]; head.xlated_prog_len as usize / 8];
    let mut head = ProgInfoHead {
        xlated_prog_len: (insns.len() * 8) as u32,
        xlated_prog_insns: insns.as_mut_ptr() as u64,
        ..ProgInfoHead::default()
    };
    get(&mut head);
    insns
}

/// Loads the programs at `level`; returns (translated bytes, verified instructions, whether the
/// translated ingress program still references the log ring).
fn loaded_at(level: BpfLog) -> (u32, u32, bool) {
    let pins = Pins::new(format!("/sys/fs/bpf/{}", unique_token("fglg")));
    let root = pins.root().to_owned();
    let loaded = Dataplane::load_with_log(pins, &Sizes::default(), level);
    let mut dataplane = loaded.unwrap_or_else(|e| {
        let _ = std::fs::remove_dir_all(&root);
        panic!("{e:#}")
    });
    let program: &Xdp = dataplane
        .ebpf
        .program(program_names::XDP_INGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    let info: ProgramInfo = program.info().unwrap();
    let ring_id = info
        .map_ids()
        .unwrap()
        .unwrap()
        .into_iter()
        .find(|id| {
            MapInfo::from_id(*id).is_ok_and(|m| m.name_as_str() == Some(fulgur_common::LOG_MAP))
        })
        .expect("the object declares the log ring");
    // A map reference is `ld_imm64` (opcode 0x18) with src_reg 1 and the map's id as imm.
    let references_ring = xlated_instructions(program).iter().any(|insn| {
        insn[0] == 0x18
            && insn[1] >> 4 == 1
            && u32::from_le_bytes(insn[4..8].try_into().unwrap()) == ring_id
    });
    let sizes = (
        info.size_translated().unwrap_or(0),
        info.verified_instruction_count().unwrap_or(0),
        references_ring,
    );
    let _ = dataplane.ebpf.take_map(fulgur_common::LOG_MAP);
    drop(dataplane);
    let _ = std::fs::remove_dir_all(&root);
    sizes
}

#[test]
fn off_leaves_no_log_call_in_the_translated_program() {
    let off = loaded_at(BpfLog::Off);
    let warn = loaded_at(BpfLog::Warn);
    let debug = loaded_at(BpfLog::Debug);
    println!(
        "xlated bytes / verified insns: off {}/{}, warn {}/{}, debug {}/{}",
        off.0, off.1, warn.0, warn.1, debug.0, debug.1
    );
    assert!(
        !off.2,
        "at off the ingress program still references the log ring"
    );
    assert!(
        warn.2 && debug.2,
        "the log calls are gone at warn or debug too"
    );
    assert!(
        off.0 < warn.0 && warn.0 < debug.0,
        "{off:?} {warn:?} {debug:?}"
    );
}

/// Changing the level reloads the programs: a restart on the same pins, which keeps an open TCP
/// connection going (the pinned conntrack and links are adopted).
#[test]
fn a_level_change_keeps_an_open_connection() {
    let topology = Topology::new(1, XdpAttachMode::Generic).expect("topology");
    let _servers = topology.start_echo_servers(8080, false).unwrap();
    let services = std::env::temp_dir().join(format!("{}.yaml", unique_token("fulgur-bpflog-")));
    std::fs::write(
        &services,
        format!(
            "services:\n- {{vip: {VIP}, port: 80, protocol: TCP, backends: [{{address: {}, port: 8080}}]}}\n",
            topology.backends[0].addr
        ),
    )
    .unwrap();
    let services_path = services.to_str().unwrap().to_owned();
    let start = |level: &str, bpffs_dir: PathBuf| {
        AgentProcess::start_launched(
            &topology.lb,
            LB_IFACE,
            XdpAttachMode::Generic,
            Source::Args(&["--services", &services_path, "--bpf-log", level]),
            bpffs_dir,
            &SMALL,
            &Launch::deployed(),
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    };
    let agent = start(
        "off",
        PathBuf::from(format!("/sys/fs/bpf/{}", unique_token("fgag"))),
    );
    let vip = topology.vip(80);
    let mut session = in_netns(&topology.client, move || TcpSession::connect(vip)).unwrap();
    let backend = session.exchange(b"before").unwrap();
    let agent = start("debug", agent.kill_and_keep_pins());
    assert!(
        agent.log_text().contains("eBPF log on"),
        "{}",
        agent.log_text()
    );
    assert_eq!(session.exchange(b"at debug").unwrap(), backend);
    let agent = start("off", agent.kill_and_keep_pins());
    assert_eq!(session.exchange(b"off again").unwrap(), backend);
    drop(agent);
    let _ = std::fs::remove_file(&services);
}
