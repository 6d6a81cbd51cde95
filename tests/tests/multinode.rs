//! Gateway addresses on a kind cluster of two (and three) nodes in namespaces
//! (`fulgur_tests::multinode`): the real agent on every node, the real controller in the host
//! namespace (standalone with `--agent NODE=URL`, or the Kubernetes provider against the fake
//! API server with agent pods carrying `spec.nodeName`), Gateways without addresses given one
//! from `--address-pool` on the node network, pods on every node. What the host sees:
//! - it reaches each address on-link: exactly one node answers its ARP / NDP, the host's
//!   neighbour entry holds that node's MAC, and TCP and UDP, IPv4 and IPv6, are answered from
//!   the Gateway address by the pods of every node (SNAT for those on other nodes);
//! - an agent restarted (kill -9) on the announcing node keeps established flows, local and
//!   SNATed, and the address stays where it was;
//! - the announcing node fails (cable out, agent killed) and its pods leave the EndpointSlices:
//!   traffic comes back through another node within 5 s (measured and printed), the host's
//!   neighbour entry moves; when the node returns, the address goes back without overlap;
//! - at no time do two nodes speak for one address (every ARP reply, gratuitous ARP and
//!   advertisement is captured on the nodes' bridge ports during the whole test).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use fulgur_agent::{announce::mac_text, dataplane::XdpAttachMode};
use fulgur_tests::multinode::{
    Assigned, Bed, Controller, GATEWAYS, NODE_NAMES, Sessions, TCP_PORT, UDP_PORT, Watch,
    eventually, exchanges, manifests, try_once,
};

/// New connections (and as many UDP flows) per address in a reachability check: enough that
/// each of 4 pods is hit (a miss has a chance of 4 × (3/4)^64).
const FLOWS: usize = 32;
/// Established TCP connections (and as many UDP flows) per address across the restart.
const SESSIONS: usize = 16;
/// The bound of issue 12: traffic back within this long after the announcer fails.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);
/// Nodes forward to pods on other nodes (the agents' SNAT, on by default). Without it the
/// controller gives each agent its local pods only.
const REMOTE_PODS: bool = true;
/// How long one try during the failover waits for its answer (the measurement's resolution).
const TRY_WAIT: Duration = Duration::from_millis(150);

/// The controller reached a steady state: both Gateways Programmed, and the announcer of each
/// address is the node the watch hears answering.
struct Steady {
    assigned: Vec<Assigned>,
    owners: Vec<usize>,
}

impl Steady {
    fn addresses(&self) -> Vec<IpAddr> {
        self.assigned.iter().map(|a| a.address).collect()
    }
}

fn all(bed: &Bed) -> Vec<usize> {
    (0..bed.nodes()).collect()
}

fn targets(address: IpAddr) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(address, TCP_PORT),
        SocketAddr::new(address, UDP_PORT),
    )
}

fn programmed(bed: &Bed, controller: &Controller) -> anyhow::Result<Steady> {
    let assigned = controller.wait_programmed(Duration::from_secs(20))?;
    let owners = assigned
        .iter()
        .map(|a| bed.node_named(a.announcer.as_deref().expect("programmed")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Steady { assigned, owners })
}

/// Each address: answered on-link by its announcer, the host's entry holds its MAC, and TCP
/// and UDP reach the pods of the `serving` nodes that its announcer can forward to.
fn reach(bed: &Bed, watch: &Watch, steady: &Steady, serving: &[usize]) -> anyhow::Result<()> {
    let since = Instant::now();
    for (address, owner) in steady.addresses().into_iter().zip(&steady.owners) {
        watch.wait_answer(address, *owner, since, Duration::from_secs(3))?;
        let (tcp, udp) = targets(address);
        let answered = exchanges(&bed.cluster.host, tcp, udp, FLOWS)?;
        let reachable: Vec<usize> = serving
            .iter()
            .copied()
            .filter(|n| REMOTE_PODS || n == owner)
            .collect();
        let expected = bed.pods_of(&reachable);
        for pod in &expected {
            ensure!(
                answered.contains(pod),
                "{address}: {pod} never answered: {answered:?}"
            );
        }
        ensure!(
            answered.iter().all(|a| expected.contains(a)),
            "{address}: answers from outside {expected:?}: {answered:?}"
        );
        let (lladdr, state) = bed
            .host_neighbour(address)
            .with_context(|| format!("no neighbour entry for {address}"))?;
        ensure!(
            lladdr == mac_text(bed.macs[*owner]),
            "{address}: the host's entry is {lladdr} ({state}), not node {owner}'s {}",
            mac_text(bed.macs[*owner])
        );
    }
    Ok(())
}

/// Which nodes spoke for each address so far, in turn: the owners the steps went through.
struct History(Vec<Vec<usize>>);

impl History {
    fn new(steady: &Steady) -> Self {
        History(steady.owners.iter().map(|o| vec![*o]).collect())
    }

    fn note(&mut self, steady: &Steady) {
        for (owners, now) in self.0.iter_mut().zip(&steady.owners) {
            if owners.last() != Some(now) {
                owners.push(*now);
            }
        }
    }

    /// What the watch heard matches: never two nodes in turn where one owner was expected.
    fn check(&self, watch: &Watch, steady: &Steady) -> anyhow::Result<()> {
        for (address, expected) in steady.addresses().iter().zip(&self.0) {
            let speakers = watch.speakers(*address);
            ensure!(
                &speakers == expected,
                "{address}: spoken for by nodes {speakers:?} in turn, expected {expected:?}"
            );
        }
        Ok(())
    }
}

/// Which order a failed node comes back in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Return {
    /// Its agent restarts, then its cable goes back in.
    AgentFirst,
    /// The cable first: its dead agent's pinned dataplane is on the network again.
    CableFirst,
}

fn scenario(bed: &mut Bed, controller: &Controller, back: Return) -> anyhow::Result<()> {
    let steady = programmed(bed, controller)?;
    let addresses = steady.addresses();
    ensure!(
        addresses[0].is_ipv4() && addresses[1].is_ipv6(),
        "{addresses:?}"
    );
    eprintln!(
        "{} nodes, {} XDP: {:?}",
        bed.nodes(),
        bed.mode.name(),
        addresses
            .iter()
            .zip(&steady.owners)
            .map(|(a, o)| format!("{a} announced by {}", NODE_NAMES[*o]))
            .collect::<Vec<_>>()
    );
    let watch = Watch::start(bed, &addresses)?;
    let mut history = History::new(&steady);
    reach(bed, &watch, &steady, &all(bed))?;
    let owner = steady.owners[0];
    restart_keeps_flows(bed, controller, &watch, &steady, owner)?;
    history.check(&watch, &steady)?;

    let (moved, pins) = failover(bed, controller, &watch, &steady, owner)?;
    history.note(&moved);
    history.check(&watch, &moved)?;

    // The node returns with its pods: it wins its addresses back once the others gave them up.
    match back {
        Return::AgentFirst => {
            bed.restart_agent(owner, pins)?;
            bed.set_link(owner, true)?;
            // Back on the network, it talks to the other nodes again (its entries for them
            // failed meanwhile), as its kernel would after each apply.
            bed.warm_neighbours()?;
        }
        Return::CableFirst => {
            bed.set_link(owner, true)?;
            std::thread::sleep(Duration::from_secs(1));
            history
                .check(&watch, &moved)
                .context("the failed node's cable back, its agent still dead")?;
            bed.restart_agent(owner, pins)?;
            bed.warm_neighbours()?;
        }
    }
    controller.update(&manifests(&bed.cluster, &all(bed)))?;
    eventually(
        "the returning node announces again",
        Duration::from_secs(10),
        || programmed(bed, controller).is_ok_and(|s| s.owners == steady.owners),
    )?;
    let home = programmed(bed, controller)?;
    reach(bed, &watch, &home, &all(bed))?;
    history.note(&home);
    history.check(&watch, &home)
}

/// kill -9 and a restart of `owner`'s agent: established TCP connections and UDP flows to both
/// addresses go on, on their pods, while it is down and after; the address stays on `owner`.
fn restart_keeps_flows(
    bed: &mut Bed,
    controller: &Controller,
    watch: &Watch,
    steady: &Steady,
    owner: usize,
) -> anyhow::Result<()> {
    let addresses = steady.addresses();
    // Per address, so each one's sessions can be told apart.
    let sessions = addresses
        .iter()
        .map(|a| Sessions::open(&bed.cluster.host, &[targets(*a)], SESSIONS))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let round = |when: &str| -> anyhow::Result<Vec<Vec<String>>> {
        sessions
            .iter()
            .map(|s| s.round().with_context(|| when.to_owned()))
            .collect()
    };
    let before = round("before")?;
    if REMOTE_PODS {
        // Sessions through the restarted node reach its own pods and, SNATed, the others'.
        let local = bed.pods_of(&[owner]);
        let (tcp, udp) = before[0].split_at(SESSIONS);
        for (what, names) in [("TCP", tcp), ("UDP", udp)] {
            ensure!(
                names.iter().any(|n| local.contains(n)) && names.iter().any(|n| !local.contains(n)),
                "{what} sessions through node {owner}: not both local and remote pods: {names:?}"
            );
        }
    }
    let pins = bed.kill_agent(owner)?;
    let while_down = round("while the agent is down")?;
    ensure!(while_down == before, "{before:?} -> {while_down:?}");
    bed.restart_agent(owner, pins)?;
    // Ready: it cleared what the killed agent announced; what it answers now, it was told again.
    let restarted = Instant::now();
    let after = round("after the restart")?;
    ensure!(after == before, "{before:?} -> {after:?}");
    let answered = watch.wait_answer(addresses[0], owner, restarted, Duration::from_secs(5))?;
    eprintln!(
        "{} XDP: {} restarted, answering for {} again after {:.2?}",
        bed.mode.name(),
        NODE_NAMES[owner],
        addresses[0],
        answered - restarted
    );
    let again = programmed(bed, controller)?;
    ensure!(again.owners == steady.owners, "moved: {:?}", again.owners);
    ensure!(round("once announced again")? == before);
    Ok(())
}

/// `failed` (announcing the IPv4 address) loses its cable and its agent; its pods leave the
/// EndpointSlices. Every address answers through another node within [`FAILOVER_BOUND`] of the
/// failure, the Gateways say `FailingOver` meanwhile, and the host's entries move. The new
/// owners and the dead agent's pins.
fn failover(
    bed: &mut Bed,
    controller: &Controller,
    watch: &Watch,
    steady: &Steady,
    failed: usize,
) -> anyhow::Result<(Steady, std::path::PathBuf)> {
    let addresses = steady.addresses();
    let failure = Instant::now();
    bed.set_link(failed, false)?;
    let pins = bed.kill_agent(failed)?;
    let rest: Vec<usize> = (0..bed.nodes()).filter(|n| *n != failed).collect();
    controller.update(&manifests(&bed.cluster, &rest))?;
    let remaining_pods = bed.pods_of(&rest);
    // Every address tried in turn, each until it answers through another node: the host's
    // entry no longer holds the failed node's MAC. (Before that, frames to the dead MAC are
    // flooded by the bridge, and the other nodes start no flow from them.)
    let dead_mac = mac_text(bed.macs[failed]);
    let mut back: Vec<Option<Duration>> = vec![None; addresses.len()];
    let mut failing_over = false;
    let deadline = failure + Duration::from_secs(15);
    while back.iter().any(Option::is_none) {
        for (address, back) in addresses.iter().zip(back.iter_mut()) {
            let (tcp, udp) = targets(*address);
            if back.is_none()
                && let Ok((t, u)) = try_once(&bed.cluster.host, tcp, udp, TRY_WAIT)
                && bed
                    .host_neighbour(*address)
                    .is_some_and(|(mac, _)| !mac.is_empty() && mac != dead_mac)
                && remaining_pods.contains(&t)
                && remaining_pods.contains(&u)
            {
                *back = Some(failure.elapsed());
            }
        }
        failing_over |= controller
            .programmed_reason(GATEWAYS[0])
            .is_some_and(|(status, reason)| status == "False" && reason == "FailingOver");
        if Instant::now() > deadline {
            let heard: Vec<_> = watch
                .heard()
                .iter()
                .filter(|h| h.at >= failure)
                .map(|h| (h.node, h.address, h.said, h.at - failure))
                .collect();
            bail!(
                "no traffic 15 s after the failure: {back:?}; host entries {:?}; heard since \
                 {heard:?}",
                addresses
                    .iter()
                    .map(|a| bed.host_neighbour(*a))
                    .collect::<Vec<_>>(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The status follows the agents' answers: it may name the new announcer a moment later.
    eventually(
        "the Gateways name their new announcers",
        Duration::from_secs(5),
        || programmed(bed, controller).is_ok_and(|s| !s.owners.contains(&failed)),
    )?;
    let moved = programmed(bed, controller)?;
    for (((address, before), now), at) in addresses
        .iter()
        .zip(&steady.owners)
        .zip(&moved.owners)
        .zip(&back)
    {
        let at = at.expect("every address answered");
        let spoke = watch
            .heard_since(*address, *now, failure)
            .map(|h| h.at - failure);
        eprintln!(
            "{} nodes, {} XDP: {address} (announced by {} before) answered through {} {at:.2?} \
             after the failure; {} spoke for it after {spoke:.2?}",
            bed.nodes(),
            bed.mode.name(),
            NODE_NAMES[*before],
            NODE_NAMES[*now],
            NODE_NAMES[*now],
        );
        ensure!(*now != failed, "{address} still on the failed node");
        ensure!(
            *before == failed || now == before,
            "{address} moved from a node that did not fail"
        );
        ensure!(at < FAILOVER_BOUND, "{address}: back after {at:?}");
        let (lladdr, state) = bed.host_neighbour(*address).context("neighbour entry")?;
        ensure!(
            lladdr == mac_text(bed.macs[*now]),
            "{address}: the host's entry is {lladdr} ({state}), not node {now}'s"
        );
    }
    ensure!(failing_over, "{} never said FailingOver", GATEWAYS[0]);
    reach(bed, watch, &moved, &rest)?;
    Ok((moved, pins))
}

/// After a failure: the controller's log, and each running agent's counters and log.
fn report(bed: &Bed, controller: &Controller) {
    eprintln!("controller log:\n{}", controller.log_text());
    for (i, agent) in bed.agents.iter().enumerate() {
        let Some(agent) = agent else { continue };
        let counters = agent
            .inspect()
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|r| {
                let counters = r["counters"].as_object()?.clone();
                Some(
                    counters
                        .into_iter()
                        .filter(|(_, v)| v.as_u64() != Some(0))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            });
        eprintln!(
            "node {i} counters: {counters:?}\nnode {i} log:\n{}",
            agent.log_text()
        );
    }
}

#[derive(Clone, Copy)]
enum Provider {
    Standalone,
    Kubernetes,
}

fn run(provider: Provider, nodes: usize, mode: XdpAttachMode, back: Return) -> anyhow::Result<()> {
    let mut bed = Bed::new(nodes, mode, true)?;
    let manifests = manifests(&bed.cluster, &all(&bed));
    let controller = match provider {
        Provider::Standalone => bed.start_file_controller(&manifests)?,
        Provider::Kubernetes => bed.start_kube_controller(&manifests)?,
    };
    let outcome = scenario(&mut bed, &controller, back);
    if outcome.is_err() {
        report(&bed, &controller);
    }
    outcome
}

fn standalone(nodes: usize, mode: XdpAttachMode, back: Return) -> anyhow::Result<()> {
    run(Provider::Standalone, nodes, mode, back)
}

fn kubernetes(mode: XdpAttachMode) -> anyhow::Result<()> {
    run(Provider::Kubernetes, 2, mode, Return::AgentFirst)
}

#[test]
fn standalone_two_nodes_native() -> anyhow::Result<()> {
    standalone(2, XdpAttachMode::Native, Return::AgentFirst)
}

#[test]
fn standalone_two_nodes_generic() -> anyhow::Result<()> {
    standalone(2, XdpAttachMode::Generic, Return::AgentFirst)
}

/// Three nodes: the failed node's address moves to one of the two others, the rest stays put.
#[test]
fn standalone_three_nodes_generic() -> anyhow::Result<()> {
    standalone(3, XdpAttachMode::Generic, Return::AgentFirst)
}

/// The Kubernetes provider finds the agents through their DaemonSet pods (pod IP, the port
/// named `grpc`, `spec.nodeName`) as the API server shows them.
#[test]
fn kubernetes_two_nodes_generic() -> anyhow::Result<()> {
    kubernetes(XdpAttachMode::Generic)
}

#[test]
fn kubernetes_two_nodes_native() -> anyhow::Result<()> {
    kubernetes(XdpAttachMode::Native)
}

/// A node whose agent was killed gets its cable back before its agent: its pinned program's
/// lease ran out, so it does not answer for the address that moved.
#[test]
fn a_dead_agents_node_does_not_answer_for_a_moved_address() -> anyhow::Result<()> {
    standalone(2, XdpAttachMode::Generic, Return::CableFirst)
}

/// Nodes that never talked to each other: the announcer's first flow to a pod on the other node
/// needs the kernel to resolve that node's address first.
#[test]
fn a_remote_pod_behind_an_unresolved_next_hop_is_reached() -> anyhow::Result<()> {
    let bed = Bed::new(2, XdpAttachMode::Generic, false)?;
    let controller = bed.start_file_controller(&manifests(&bed.cluster, &all(&bed)))?;
    let steady = programmed(&bed, &controller)?;
    let watch = Watch::start(&bed, &steady.addresses())?;
    let outcome = reach(&bed, &watch, &steady, &all(&bed));
    if outcome.is_err() {
        report(&bed, &controller);
    }
    outcome
}
