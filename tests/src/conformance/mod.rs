//! `cargo xtask conformance`: the Gateway API v1.6.1 GATEWAY-TCP and GATEWAY-UDP conformance
//! tests, run standalone with real traffic by fulgur's own runner (not the upstream Go suite).
//!
//! One topology, one agent and one controller serve the whole suite: a client namespace, the
//! load balancer (agent on its client-facing interface, controller in `--provider file` mode over
//! mutual TLS) and one host per backend namespace (gateway-conformance-infra,
//! gateway-conformance-app-backend, gateway-conformance-web-backend) carrying the pods as
//! addresses of their own (203.0.113.64 and up). Each scenario replaces the contents of the
//! manifest folder, waits for the status file to show exactly its objects, then checks statuses
//! as upstream does and sends traffic as upstream does (see [`pods`]).

pub mod manifests;
pub mod pods;
pub mod report;
pub mod scenarios;
pub mod status;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use fulgur_agent::dataplane::XdpAttachMode;

use crate::{
    netns::{NetNs, in_netns, unique_token},
    pki::{Pki, PkiFiles},
    topology::{AgentProcess, LB_IFACE, Source, Topology, backend_addr},
};
use pods::{Answer, Pod, PodSpec};

pub const GATEWAY_API_VERSION: &str = "v1.6.1";
pub const INFRA_NS: &str = "gateway-conformance-infra";
pub const APP_BACKEND_NS: &str = "gateway-conformance-app-backend";
pub const WEB_BACKEND_NS: &str = "gateway-conformance-web-backend";
/// The backend namespaces, one host each, in host order.
pub const BACKEND_NAMESPACES: [&str; 3] = [INFRA_NS, APP_BACKEND_NS, WEB_BACKEND_NS];
pub const CONTROLLER_NAME: &str = "fulgur.dev/gateway-controller";
pub const GATEWAY_CLASS: &str = "fulgur-conformance";
const GRPC: &str = "127.0.0.1:50081";

/// How long a status or traffic expectation may take (upstream's defaults are minutes; ours are
/// local processes).
pub const EVENTUALLY: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Probe timeouts: a working path answers in well under a millisecond.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive good answers before a traffic expectation holds (upstream's
/// RequiredConsecutiveSuccesses).
pub const CONSECUTIVE: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Profile {
    Tcp,
    Udp,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Tcp => "GATEWAY-TCP",
            Profile::Udp => "GATEWAY-UDP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One upstream conformance test.
pub struct Scenario {
    /// The upstream ShortName.
    pub name: &'static str,
    pub profile: Profile,
    /// Marked provisional upstream (all but TCPRouteMultipleRoutesAttachment in v1.6.1).
    pub provisional: bool,
    /// Gateway API features the test needs (upstream `Features`).
    pub features: &'static [&'static str],
    /// What is checked, for the README table.
    pub checks: &'static str,
    pub run: fn(&Ctx) -> anyhow::Result<()>,
}

/// What the runner is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Upstream test names; empty: all.
    pub only: Vec<String>,
    pub mode: XdpAttachMode,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub profile: Profile,
    pub provisional: bool,
    pub error: Option<String>,
    pub duration: Duration,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.error.is_none()
    }
}

/// The whole run: outcomes in suite order, and the time the set-up took.
pub struct Run {
    pub outcomes: Vec<Outcome>,
    pub setup: Duration,
    pub total: Duration,
    pub mode: XdpAttachMode,
}

/// The scenarios `only` names (all when empty); an unknown name is an error.
pub fn select(only: &[String]) -> anyhow::Result<Vec<&'static Scenario>> {
    let all = scenarios::all();
    if only.is_empty() {
        return Ok(all.iter().collect());
    }
    for name in only {
        ensure!(
            all.iter().any(|s| s.name == name),
            "no conformance test named {name:?}; known: {}",
            all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(all
        .iter()
        .filter(|s| only.iter().any(|o| o == s.name))
        .collect())
}

/// Runs the selected scenarios on one topology. Set-up failures are errors; a scenario's failure
/// is its outcome.
pub fn run(options: &Options) -> anyhow::Result<Run> {
    let selected = select(&options.only)?;
    let started = Instant::now();
    let suite = Suite::start(options.mode).context("setting up the conformance topology")?;
    let setup = started.elapsed();
    let mut outcomes = Vec::new();
    for (index, scenario) in selected.iter().enumerate() {
        let ctx = Ctx {
            suite: &suite,
            vip: Ipv4Addr::new(192, 0, 2, 20 + index as u8),
        };
        let begun = Instant::now();
        let result = (scenario.run)(&ctx);
        let error = result.err().map(|e| {
            format!(
                "{e:#}\n--- status file ---\n{}\n--- controller log (tail) ---\n{}",
                status::read(&suite.status_file)
                    .iter()
                    .map(|d| status::describe(Some(d)))
                    .collect::<Vec<_>>()
                    .join("\n"),
                tail(&suite.controller_log(), 15)
            )
        });
        outcomes.push(Outcome {
            name: scenario.name,
            profile: scenario.profile,
            provisional: scenario.provisional,
            error,
            duration: begun.elapsed(),
        });
    }
    Ok(Run {
        outcomes,
        setup,
        total: started.elapsed(),
        mode: options.mode,
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The table the runner prints.
pub fn table(run: &Run) -> String {
    let mut out = format!(
        "{:<42} {:<12} {:<6} {:>8}\n",
        "test", "profile", "result", "time"
    );
    for o in &run.outcomes {
        out += &format!(
            "{:<42} {:<12} {:<6} {:>7.2}s\n",
            o.name,
            o.profile.name(),
            if o.passed() { "PASS" } else { "FAIL" },
            o.duration.as_secs_f64()
        );
    }
    let passed = run.outcomes.iter().filter(|o| o.passed()).count();
    out += &format!(
        "{passed}/{} passed, XDP {}, set-up {:.1}s, total {:.1}s\n",
        run.outcomes.len(),
        run.mode.name(),
        run.setup.as_secs_f64(),
        run.total.as_secs_f64()
    );
    out
}

/// The README's conformance table, from the scenario definitions.
pub fn markdown() -> String {
    let mut out =
        String::from("| test | profile | provisional | what is checked |\n|---|---|---|---|\n");
    for s in scenarios::all() {
        out += &format!(
            "| `{}` | {} | {} | {} |\n",
            s.name,
            s.profile.name(),
            if s.provisional { "yes" } else { "no" },
            s.checks
        );
    }
    out
}

struct ControllerProcess {
    child: Child,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The long-lived part: namespaces, pods, agent, controller, work folder.
pub struct Suite {
    // Drop order: the controller, then the agent, then pods, then namespaces.
    _controller: ControllerProcess,
    _agent: AgentProcess,
    pods: BTreeMap<String, Pod>,
    topology: Topology,
    pub work: WorkDir,
    pub manifests: PathBuf,
    pub status_file: PathBuf,
    controller_log: PathBuf,
    /// Serializes scenario writes (one scenario at a time).
    write_lock: Mutex<()>,
}

/// A temporary folder removed on drop.
pub struct WorkDir(pub PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Suite {
    pub fn start(mode: XdpAttachMode) -> anyhow::Result<Self> {
        let work = WorkDir(std::env::temp_dir().join(unique_token("fulgur-conformance-")));
        let manifests = work.0.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let topology = Topology::new(BACKEND_NAMESPACES.len(), mode)?;
        let pods = start_pods(&topology, scenarios::pods())?;
        std::fs::write(manifests.join("base.yaml"), manifests::base())?;
        let pki = Pki::generate("fulgur conformance CA")?.write_to(&work.0.join("pki"))?;
        let agent = AgentProcess::start(
            &topology.lb,
            LB_IFACE,
            mode,
            Source::Grpc {
                listen: GRPC.parse()?,
                tls: Some(&pki),
                metrics: None,
            },
        )?;
        let status_file = work.0.join("status.yaml");
        let controller_log = work.0.join("controller.log");
        let controller = start_controller(
            &topology.lb,
            &manifests,
            &status_file,
            &pki,
            &controller_log,
        )?;
        let suite = Suite {
            _controller: controller,
            _agent: agent,
            pods,
            topology,
            work,
            manifests,
            status_file,
            controller_log,
            write_lock: Mutex::new(()),
        };
        let deadline = Instant::now() + EVENTUALLY;
        while !suite.controller_log().contains("agent in sync") {
            if Instant::now() > deadline {
                bail!(
                    "the controller did not sync the agent; log:\n{}",
                    suite.controller_log()
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(suite)
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(&self.controller_log).unwrap_or_default()
    }

    pub fn client(&self) -> &NetNs {
        &self.topology.client
    }
}

fn start_pods(topology: &Topology, specs: Vec<PodSpec>) -> anyhow::Result<BTreeMap<String, Pod>> {
    let mut pods = BTreeMap::new();
    for (k, spec) in specs.into_iter().enumerate() {
        ensure!(k < 128, "too many pods for 203.0.113.64/26..");
        let host = BACKEND_NAMESPACES
            .iter()
            .position(|n| *n == spec.namespace)
            .with_context(|| {
                format!(
                    "pod {} in unknown namespace {}",
                    spec.deployment, spec.namespace
                )
            })?;
        let addr = Ipv4Addr::new(203, 0, 113, 64 + k as u8);
        let ns = &topology.backends[host].ns;
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        topology.lb.ip(&[
            "route",
            "add",
            &format!("{addr}/32"),
            "via",
            &backend_addr(host).to_string(),
        ])?;
        let deployment = spec.deployment.clone();
        let pod = Pod::start(ns, spec, addr)?;
        ensure!(
            pods.insert(deployment.clone(), pod).is_none(),
            "two pods named {deployment}"
        );
    }
    Ok(pods)
}

fn start_controller(
    lb: &NetNs,
    manifests: &Path,
    status_file: &Path,
    pki: &PkiFiles,
    log: &Path,
) -> anyhow::Result<ControllerProcess> {
    let child = lb
        .command(crate::controller_binary())
        .args(["--provider", "file", "--manifests"])
        .arg(manifests)
        .arg("--status-file")
        .arg(status_file)
        .args(["--agent", &format!("https://{GRPC}"), "--tls-cert"])
        .arg(&pki.client_cert)
        .arg("--tls-key")
        .arg(&pki.client_key)
        .arg("--ca")
        .arg(&pki.ca)
        .args(["--controller-name", CONTROLLER_NAME])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {}", crate::controller_binary().display()))?;
    Ok(ControllerProcess { child })
}

/// What a scenario works with.
pub struct Ctx<'a> {
    suite: &'a Suite,
    /// This scenario's Gateway address (each scenario its own, so no flow of an earlier one
    /// can be mistaken for this one's).
    pub vip: Ipv4Addr,
}

/// An object a scenario expects in the status file.
pub type Key<'a> = (&'a str, &'a str, &'a str);

impl Ctx<'_> {
    /// A pod's address by Deployment name.
    pub fn addr(&self, deployment: &str) -> Ipv4Addr {
        self.suite
            .pods
            .get(deployment)
            .unwrap_or_else(|| panic!("no pod {deployment} (add it to scenarios::pods)"))
            .addr
    }

    /// Replaces the scenario's manifests and waits until the status file holds exactly the
    /// GatewayClass and `expect` (kind, namespace, name).
    pub fn apply(&self, yaml: &str, expect: &[Key<'_>]) -> anyhow::Result<()> {
        let _guard = self.suite.write_lock.lock().expect("lock");
        let tmp = self.suite.work.0.join("scenario.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.suite.manifests.join("scenario.yaml"))?;
        let mut want: BTreeSet<(String, String, String)> = expect
            .iter()
            .map(|(k, n, m)| (k.to_string(), n.to_string(), m.to_string()))
            .collect();
        want.insert(("GatewayClass".into(), String::new(), GATEWAY_CLASS.into()));
        self.eventually("the status file shows the scenario's objects", || {
            let docs = status::read(&self.suite.status_file);
            let have: BTreeSet<(String, String, String)> = docs
                .iter()
                .map(|d| {
                    (
                        d.kind.clone(),
                        d.metadata.namespace.clone(),
                        d.metadata.name.clone(),
                    )
                })
                .collect();
            if have == want {
                Ok(())
            } else {
                bail!("want {want:?}, have {have:?}")
            }
        })
    }

    /// Retries `check` every 50 ms until it passes or [`EVENTUALLY`] runs out.
    pub fn eventually<T>(
        &self,
        what: &str,
        mut check: impl FnMut() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            match check() {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("timed out after {EVENTUALLY:?}: {what}")));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    fn docs(&self) -> Vec<fulgur_controller::status::ObjectStatus> {
        status::read(&self.suite.status_file)
    }

    /// upstream GatewayMustHaveLatestConditions + WaitForGatewayAddress: the Gateway is Accepted
    /// and Programmed, has an address, and `listener` exists; returns address:port.
    pub fn gateway_address(
        &self,
        gateway: &str,
        listener: &str,
        port: u16,
    ) -> anyhow::Result<SocketAddr> {
        self.eventually(
            &format!("Gateway {gateway} accepted and programmed"),
            || {
                let docs = self.docs();
                let gw = status::find(&docs, "Gateway", INFRA_NS, gateway);
                let ok = gw.is_some_and(|g| {
                    status::has_condition(&g.status.conditions, "Accepted", "True", None)
                        && status::has_condition(&g.status.conditions, "Programmed", "True", None)
                        && status::listener(g, listener).is_some()
                });
                ensure!(ok, "{}", status::describe(gw));
                let addr = gw
                    .and_then(|g| g.status.addresses.first())
                    .context("no status.addresses")?;
                Ok(SocketAddr::new(addr.value.parse()?, port))
            },
        )
    }

    /// upstream GatewayAndTCPRoutesMustBeAccepted / GatewayAndUDPRoutesMustBeAccepted.
    pub fn gateway_and_routes_accepted(
        &self,
        kind: &str,
        gateway: &str,
        listener: &str,
        port: u16,
        routes: &[&str],
    ) -> anyhow::Result<SocketAddr> {
        let addr = self.gateway_address(gateway, listener, port)?;
        for route in routes {
            self.route_condition(kind, route, gateway, "Accepted", "True", Some("Accepted"))?;
        }
        Ok(addr)
    }

    /// upstream TCPRouteMustHaveCondition: the route's entry for `gateway` carries the condition.
    pub fn route_condition(
        &self,
        kind: &str,
        route: &str,
        gateway: &str,
        type_: &str,
        status_: &str,
        reason: Option<&str>,
    ) -> anyhow::Result<()> {
        self.eventually(
            &format!("{kind} {route}: {type_}={status_} {reason:?} on {gateway}"),
            || {
                let docs = self.docs();
                let doc = status::find(&docs, kind, INFRA_NS, route);
                let ok = doc.is_some_and(|d| {
                    status::parents(d, CONTROLLER_NAME, INFRA_NS, gateway)
                        .any(|p| status::has_condition(&p.conditions, type_, status_, reason))
                });
                ensure!(ok, "{}", status::describe(doc));
                Ok(())
            },
        )
    }

    /// upstream TCPRouteMustHaveParents: exactly one parent entry for `gateway` from us, with the
    /// parentRef as the route wrote it (no sectionName or port unless `section`/`port`), Accepted.
    pub fn route_has_accepted_parent(
        &self,
        kind: &str,
        route: &str,
        gateway: &str,
        section: Option<&str>,
        port: Option<u16>,
    ) -> anyhow::Result<()> {
        self.eventually(
            &format!("{kind} {route} has the one parent {gateway}"),
            || {
                let docs = self.docs();
                let doc = status::find(&docs, kind, INFRA_NS, route);
                let parents: Vec<_> = doc
                    .map(|d| status::parents(d, CONTROLLER_NAME, INFRA_NS, gateway).collect())
                    .unwrap_or_default();
                let ok = parents.len() == 1
                    && parents[0].parent_ref.section_name.as_deref() == section
                    && parents[0].parent_ref.port == port
                    && parents[0].parent_ref.group.as_deref() == Some("gateway.networking.k8s.io")
                    && status::has_condition(
                        &parents[0].conditions,
                        "Accepted",
                        "True",
                        Some("Accepted"),
                    );
                ensure!(ok, "{}", status::describe(doc));
                Ok(())
            },
        )
    }

    /// Each listener's attachedRoutes, by listener name.
    pub fn attached_routes(&self, gateway: &str) -> BTreeMap<String, i32> {
        let docs = self.docs();
        status::find(&docs, "Gateway", INFRA_NS, gateway)
            .map(|g| {
                g.status
                    .listeners
                    .iter()
                    .map(|l| (l.name.clone(), l.attached_routes))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The listeners' attachedRoutes become exactly `want`.
    pub fn expect_attached_routes(
        &self,
        gateway: &str,
        want: &[(&str, i32)],
    ) -> anyhow::Result<()> {
        let want: BTreeMap<String, i32> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        self.eventually(
            &format!("Gateway {gateway} attachedRoutes {want:?}"),
            || {
                let have = self.attached_routes(gateway);
                ensure!(have == want, "attachedRoutes {have:?}");
                Ok(())
            },
        )
    }

    /// Runs `f` on a thread in the client namespace.
    pub fn in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        in_netns(self.suite.client(), f)
    }

    /// One probe from the client namespace.
    pub fn probe(&self, proto: Proto, to: SocketAddr) -> anyhow::Result<Answer> {
        self.in_client(move || probe(proto, to, PROBE_TIMEOUT))
    }

    /// upstream MakeTCPRequestAndExpectEventuallyValidResponse / ExpectEchoResponseFromBackend:
    /// [`CONSECUTIVE`] new connections in a row are answered by `backend` in `namespace`.
    pub fn expect_backend(
        &self,
        proto: Proto,
        to: SocketAddr,
        namespace: &str,
        backend: &str,
    ) -> anyhow::Result<()> {
        let mut streak = 0;
        self.eventually(&format!("{to} answered by {namespace}/{backend}"), || {
            let answer = self.probe(proto, to);
            match answer {
                Ok(a) if a.namespace == namespace && a.backend() == backend => {
                    streak += 1;
                }
                Ok(a) => {
                    streak = 0;
                    bail!("answered by {}/{}", a.namespace, a.pod);
                }
                Err(e) => {
                    streak = 0;
                    return Err(e);
                }
            }
            ensure!(streak >= CONSECUTIVE, "{streak} in a row so far");
            Ok(())
        })
    }

    /// New connections (TCP) or flows (UDP) to `to` get no answer: refused or dropped,
    /// [`CONSECUTIVE`] in a row.
    pub fn expect_rejected(&self, proto: Proto, to: SocketAddr) -> anyhow::Result<()> {
        let mut streak = 0;
        self.eventually(&format!("{to} rejects new {proto:?} flows"), || {
            match self.in_client(move || probe(proto, to, Duration::from_millis(500))) {
                Ok(a) => {
                    streak = 0;
                    bail!("still answered by {}/{}", a.namespace, a.pod)
                }
                Err(_) => streak += 1,
            }
            ensure!(streak >= CONSECUTIVE, "{streak} in a row so far");
            Ok(())
        })
    }

    /// `count` new flows, `concurrency` at a time; answers counted by backend. Any failed probe
    /// fails the batch (as upstream's errgroup does).
    pub fn spread(
        &self,
        proto: Proto,
        to: SocketAddr,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<BTreeMap<String, usize>> {
        self.in_client(move || {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let seen = Mutex::new(BTreeMap::<String, usize>::new());
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..concurrency)
                    .map(|_| {
                        scope.spawn(|| -> anyhow::Result<()> {
                            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                                let answer = probe(proto, to, PROBE_TIMEOUT)?;
                                *seen
                                    .lock()
                                    .expect("lock")
                                    .entry(format!("{}/{}", answer.namespace, answer.backend()))
                                    .or_default() += 1;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for worker in workers {
                    worker
                        .join()
                        .map_err(|_| anyhow::anyhow!("a probe thread panicked"))??;
                }
                anyhow::Ok(())
            })?;
            Ok(seen.into_inner().expect("lock"))
        })
    }

    /// upstream weighted tests: 500 requests, 10 at a time; every backend's share within
    /// ±`tolerance` of its weight (weight 0: nothing), up to 10 attempts.
    pub fn expect_weights(
        &self,
        proto: Proto,
        to: SocketAddr,
        namespace: &str,
        weights: &[(&str, f64)],
    ) -> anyhow::Result<()> {
        const TOTAL: usize = 500;
        const CONCURRENCY: usize = 10;
        const ATTEMPTS: usize = 10;
        const TOLERANCE: f64 = 0.05;
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let seen = match self.spread(proto, to, TOTAL, CONCURRENCY) {
                Ok(seen) => seen,
                Err(e) => {
                    last = format!("{e:#}");
                    continue;
                }
            };
            let mut problems = Vec::new();
            for key in seen.keys() {
                if !weights
                    .iter()
                    .any(|(b, _)| format!("{namespace}/{b}") == *key)
                {
                    problems.push(format!("answer from unexpected backend {key}"));
                }
            }
            for (backend, weight) in weights {
                let got = seen
                    .get(&format!("{namespace}/{backend}"))
                    .copied()
                    .unwrap_or(0);
                let share = got as f64 / TOTAL as f64;
                if (share - weight).abs() > TOLERANCE || (*weight == 0.0 && got > 0) {
                    problems.push(format!(
                        "{backend} got {:.1}% (want {:.1}% ± {:.0}%)",
                        share * 100.0,
                        weight * 100.0,
                        TOLERANCE * 100.0
                    ));
                }
            }
            if problems.is_empty() {
                return Ok(());
            }
            last = format!("{} (seen {seen:?})", problems.join("; "));
        }
        bail!("the weighted distribution did not converge in {ATTEMPTS} attempts: {last}")
    }
}

/// One probe in the calling thread's namespace.
pub fn probe(proto: Proto, to: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    match proto {
        Proto::Tcp => pods::tcp_probe(to, timeout),
        Proto::Udp => pods::udp_probe(to, timeout),
    }
}
