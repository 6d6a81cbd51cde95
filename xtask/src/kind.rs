//! `cargo xtask kind`: from a clone to fulgur serving traffic on a kind cluster.
//!
//! The run is a plan of named steps, each a list of commands (or xtask's own work), built before
//! anything runs, so that `--dry-run` prints exactly what a run would do. Values only known while
//! running (the kind network's subnets, a node's address, the Gateway's address) are captured
//! into `{VARIABLES}` that later commands name.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_yaml::Value;

use crate::{certs, image, kustomize, pool, target_dir, workspace_root};

/// Gateway API release whose standard channel (with TCPRoute and UDPRoute) fulgur is tested on.
pub const GATEWAY_API: &str = "v1.6.1";
pub const PLACEHOLDER_POOL: &str = "--address-pool=KIND_ADDRESS_POOL";
const NS: &str = "fulgur-system";
const DEMO_NS: &str = "fulgur-demo";

#[derive(Clone, Debug)]
pub struct Options {
    pub name: String,
    pub workers: u32,
    pub conformance: bool,
    pub delete: bool,
    /// How `cargo xtask image` builds the image.
    pub image_from: image::Source,
}

/// What the plan depends on in the machine it runs on.
#[derive(Clone, Debug)]
pub struct Env {
    /// `docker` or `podman` (kind's provider).
    pub runtime: String,
    pub cluster_exists: bool,
    pub root: bool,
    /// The project's URL for the conformance report (`git remote get-url origin`).
    pub repo_url: String,
}

#[derive(Debug)]
pub struct Step {
    pub name: String,
    pub actions: Vec<Action>,
    /// Where to look when the step fails.
    pub look_at: String,
    /// A failure is reported and the run goes on (cleanups).
    pub optional: bool,
}

#[derive(Debug)]
pub enum Action {
    Run(Cmd),
    /// Runs a command and keeps its trimmed standard output in a variable.
    Capture(&'static str, Cmd),
    /// xtask's own work.
    Xtask(Internal),
}

#[derive(Debug)]
pub enum Internal {
    ClusterConfig,
    Image(image::Source),
    Certs,
    CarvePools,
    Render,
    Traffic,
    Note(String),
}

#[derive(Debug, Default)]
pub struct Cmd {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dir: Option<PathBuf>,
    /// Skipped when this path exists (a clone already made).
    pub unless_exists: Option<PathBuf>,
    /// Skipped when this variable is empty (no IPv6 on the kind network).
    pub needs: Option<&'static str>,
    /// A failure is reported and the run goes on (cleanups).
    pub may_fail: bool,
}

fn cmd(args: &[&str]) -> Cmd {
    Cmd {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..Cmd::default()
    }
}

impl Cmd {
    fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
    fn needs(mut self, var: &'static str) -> Self {
        self.needs = Some(var);
        self
    }
    fn may_fail(mut self) -> Self {
        self.may_fail = true;
        self
    }
    fn shown(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.env {
            out.push_str(&format!("{k}={v} "));
        }
        out.push_str(
            &self
                .args
                .iter()
                .map(|a| {
                    if a.contains([' ', '\'', '"', '*', '$', '(']) {
                        format!("'{a}'")
                    } else {
                        a.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
        );
        if let Some(dir) = &self.dir {
            out.push_str(&format!("   (in {})", dir.display()));
        }
        out
    }
}

fn step(name: &str, look_at: &str, actions: Vec<Action>) -> Step {
    Step {
        name: name.to_owned(),
        actions,
        look_at: look_at.to_owned(),
        optional: false,
    }
}

pub fn kind_dir() -> PathBuf {
    target_dir().join("kind")
}

fn rel(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The tools a run needs, missing ones named together.
pub fn required_tools(options: &Options) -> Vec<&'static str> {
    let mut tools = vec!["kind", "kubectl"];
    if !options.delete && options.conformance {
        tools.extend(["go", "git"]);
    }
    tools
}

/// Every step of a run, in order.
pub fn plan(options: &Options, env: &Env) -> Vec<Step> {
    let name = options.name.as_str();
    let rt = env.runtime.as_str();
    let sudo = |c: Cmd| {
        if env.root {
            c
        } else {
            let mut args = vec!["sudo".to_owned()];
            args.extend(c.args);
            Cmd { args, ..c }
        }
    };
    let network_subnets = if rt == "podman" {
        "{{range .Subnets}}{{.Subnet}} {{end}}"
    } else {
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}"
    };
    let subnets = || {
        Action::Capture(
            "SUBNETS",
            cmd(&[
                rt,
                "network",
                "inspect",
                "kind",
                "--format",
                network_subnets,
            ]),
        )
    };
    let kind_env = |mut c: Cmd| {
        if rt == "podman" {
            c.env
                .push(("KIND_EXPERIMENTAL_PROVIDER".into(), "podman".into()));
        }
        c
    };
    if options.delete {
        return vec![
            // Optional: the network (and so the routes) may be gone already.
            Step {
                optional: true,
                ..step(
                    "host routes",
                    "`ip route` on this host",
                    vec![
                        subnets(),
                        Action::Xtask(Internal::CarvePools),
                        Action::Run(
                            sudo(cmd(&["ip", "route", "del", "{POOL4}"]))
                                .needs("POOL4")
                                .may_fail(),
                        ),
                        Action::Run(
                            sudo(cmd(&["ip", "-6", "route", "del", "{POOL6}"]))
                                .needs("POOL6")
                                .may_fail(),
                        ),
                    ],
                )
            },
            step(
                "delete cluster",
                "`kind get clusters`",
                vec![Action::Run(kind_env(cmd(&[
                    "kind", "delete", "cluster", "--name", name,
                ])))],
            ),
        ];
    }

    let node = format!("{name}-control-plane");
    let archive = image::archive_path();
    let rendered = kind_dir().join("fulgur.yaml");
    let certs_dir = kind_dir().join("certs");
    let logs = format!(
        "`kubectl -n {NS} get pods -o wide`, `kubectl -n {NS} logs ds/fulgur-agent`, \
         `kubectl -n {NS} logs deploy/fulgur-controller`, `kubectl -n {NS} get events`"
    );
    let mut steps = Vec::new();

    let mut cluster = Vec::new();
    if env.cluster_exists {
        cluster.push(Action::Xtask(Internal::Note(format!(
            "reusing the kind cluster `{name}`"
        ))));
    } else {
        cluster.push(Action::Xtask(Internal::ClusterConfig));
        cluster.push(Action::Run(kind_env(cmd(&[
            "kind",
            "create",
            "cluster",
            "--name",
            name,
            "--config",
            &rel(&kind_dir().join("cluster.yaml")),
            "--wait",
            "120s",
        ]))));
    }
    cluster.push(Action::Run(cmd(&[
        "kubectl",
        "config",
        "use-context",
        &format!("kind-{name}"),
    ])));
    steps.push(step(
        "cluster",
        &format!("`kind get clusters`, `{rt} ps`, `kind export logs --name {name}`"),
        cluster,
    ));

    steps.push(step(
        "image",
        "the build output above; `cargo xtask image` alone",
        vec![
            Action::Xtask(Internal::Image(options.image_from)),
            Action::Run(kind_env(cmd(&[
                "kind",
                "load",
                "image-archive",
                &rel(&archive),
                "--name",
                name,
            ]))),
        ],
    ));

    steps.push(step(
        "Gateway API CRDs",
        "`kubectl get crd | grep gateway.networking.k8s.io`",
        vec![
            Action::Run(cmd(&[
                "kubectl",
                "apply",
                "--server-side",
                "-f",
                &format!(
                    "https://github.com/kubernetes-sigs/gateway-api/releases/download/{GATEWAY_API}/standard-install.yaml"
                ),
            ])),
            Action::Run(cmd(&[
                "kubectl",
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/gatewayclasses.gateway.networking.k8s.io",
                "crd/gateways.gateway.networking.k8s.io",
                "crd/tcproutes.gateway.networking.k8s.io",
                "crd/udproutes.gateway.networking.k8s.io",
            ])),
        ],
    ));

    steps.push(step(
        "certificates",
        &format!("`kubectl -n {NS} get secrets`"),
        vec![
            Action::Xtask(Internal::Certs),
            Action::Run(cmd(&[
                "kubectl",
                "apply",
                "-f",
                "manifests/deploy/namespace.yaml",
            ])),
            Action::Run(cmd(&[
                "kubectl",
                "apply",
                "-f",
                &rel(&certs_dir.join("secrets.yaml")),
            ])),
        ],
    ));

    steps.push(step(
        "address pool",
        &format!("`{rt} network inspect kind`"),
        vec![subnets(), Action::Xtask(Internal::CarvePools)],
    ));

    let mut deploy = vec![
        Action::Xtask(Internal::Render),
        Action::Run(cmd(&[
            "kubectl",
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &rel(&rendered),
        ])),
    ];
    if env.cluster_exists {
        // Same tag, maybe a new image: restart so the pods run what was just loaded.
        deploy.push(Action::Run(cmd(&[
            "kubectl",
            "-n",
            NS,
            "rollout",
            "restart",
            "ds/fulgur-agent",
            "deploy/fulgur-controller",
        ])));
    }
    steps.push(step("deploy fulgur", &logs, deploy));

    steps.push(step(
        "rollout",
        &logs,
        vec![
            Action::Run(cmd(&[
                "kubectl",
                "-n",
                NS,
                "rollout",
                "status",
                "ds/fulgur-agent",
                "--timeout=180s",
            ])),
            Action::Run(cmd(&[
                "kubectl",
                "-n",
                NS,
                "rollout",
                "status",
                "deploy/fulgur-controller",
                "--timeout=180s",
            ])),
            Action::Run(cmd(&[
                "kubectl",
                "wait",
                "--for=condition=Accepted",
                "--timeout=60s",
                "gatewayclass/fulgur",
            ])),
        ],
    ));

    steps.push(step(
        "example",
        &format!(
            "`kubectl -n {DEMO_NS} get gateway,tcproute,udproute -o yaml`, `kubectl -n {DEMO_NS} get pods`, {logs}"
        ),
        vec![
            Action::Run(cmd(&["kubectl", "apply", "-f", "manifests/examples/kind/echo.yaml"])),
            Action::Run(cmd(&["kubectl", "-n", DEMO_NS, "rollout", "status", "deploy/echo", "--timeout=180s"])),
            Action::Run(cmd(&[
                "kubectl",
                "-n",
                DEMO_NS,
                "wait",
                "--for=condition=Programmed",
                "--timeout=120s",
                "gateway/demo",
            ])),
            Action::Capture(
                "GATEWAY",
                cmd(&[
                    "kubectl",
                    "-n",
                    DEMO_NS,
                    "get",
                    "gateway",
                    "demo",
                    "-o",
                    "jsonpath={.status.addresses[0].value}",
                ]),
            ),
        ],
    ));

    // Until the agents announce Gateway addresses (ARP/NDP), the host reaches a pool through a
    // route via a node.
    let node_ip = |var: &'static str, field: &str| {
        Action::Capture(
            var,
            cmd(&[
                rt,
                "inspect",
                "--format",
                &format!("{{{{(index .NetworkSettings.Networks \"kind\").{field}}}}}"),
                &node,
            ]),
        )
    };
    let mut routes = vec![
        node_ip("NODE_IP", "IPAddress"),
        node_ip("NODE_IP6", "GlobalIPv6Address"),
        Action::Run(
            sudo(cmd(&[
                "ip",
                "route",
                "replace",
                "{POOL4}",
                "via",
                "{NODE_IP}",
            ]))
            .needs("POOL4"),
        ),
        Action::Run(
            // Skipped as well when the node has no IPv6 address ({NODE_IP6} empty).
            sudo(cmd(&[
                "ip",
                "-6",
                "route",
                "replace",
                "{POOL6}",
                "via",
                "{NODE_IP6}",
            ]))
            .needs("POOL6"),
        ),
    ];
    if options.workers > 0 {
        routes.insert(
            0,
            Action::Xtask(Internal::Note(format!(
                "{} workers: the pool is routed via the control-plane node only (Gateway addresses \
                 are not announced yet; see README \"Running on kind\", limits)",
                options.workers
            ))),
        );
    }
    steps.push(step(
        "host route",
        "`ip route get {GATEWAY}` on this host",
        routes,
    ));

    steps.push(step(
        "traffic",
        &format!("`kubectl -n {DEMO_NS} get gateway demo -o yaml`, `kubectl -n {NS} exec ds/fulgur-agent -- fulgur-agent inspect`, {logs}"),
        vec![Action::Xtask(Internal::Traffic)],
    ));

    if options.conformance {
        let checkout = target_dir().join("conformance/gateway-api");
        let report =
            target_dir().join(format!("conformance/fulgur-{}-report.yaml", image::VERSION));
        steps.push(step(
            "conformance",
            &format!("the go test output above, {}, {logs}", rel(&report)),
            vec![
                Action::Run(Cmd {
                    unless_exists: Some(checkout.clone()),
                    ..cmd(&[
                        "git",
                        "clone",
                        "--depth=1",
                        "--branch",
                        GATEWAY_API,
                        "https://github.com/kubernetes-sigs/gateway-api",
                        &rel(&checkout),
                    ])
                }),
                Action::Capture(
                    "FEATURES",
                    cmd(&[
                        "kubectl",
                        "get",
                        "gatewayclass",
                        "fulgur",
                        "-o",
                        "jsonpath={.status.supportedFeatures[*].name}",
                    ]),
                ),
                Action::Run(Cmd {
                    dir: Some(checkout),
                    ..cmd(&[
                        "go",
                        "test",
                        "./conformance",
                        "-run",
                        "TestConformance",
                        "-timeout",
                        "60m",
                        "-args",
                        "--gateway-class=fulgur",
                        "--conformance-profiles=GATEWAY-TCP,GATEWAY-UDP",
                        "--supported-features={FEATURES,}",
                        "--organization=fulgur",
                        "--project=fulgur",
                        &format!("--version={}", image::VERSION),
                        "--contact=fulgur maintainers",
                    ])
                    .arg(format!("--url={}", env.repo_url))
                    .arg(format!("--report-output={}", report.display()))
                }),
            ],
        ));
    }
    steps
}

/// Prints the plan (for `--dry-run` and before a run).
pub fn describe(steps: &[Step]) -> String {
    let mut out = String::new();
    for (i, step) in steps.iter().enumerate() {
        out.push_str(&format!("{}. {}\n", i + 1, step.name));
        for action in &step.actions {
            out.push_str(&format!("   {}\n", describe_action(action)));
        }
    }
    out
}

fn describe_action(action: &Action) -> String {
    match action {
        Action::Run(c) => format!("$ {}", c.shown()),
        Action::Capture(var, c) => format!("$ {}   -> {{{var}}}", c.shown()),
        Action::Xtask(internal) => format!("xtask: {}", describe_internal(internal)),
    }
}

fn describe_internal(internal: &Internal) -> String {
    match internal {
        Internal::ClusterConfig => format!(
            "write {} (one control-plane node, --workers workers)",
            rel(&kind_dir().join("cluster.yaml"))
        ),
        Internal::Image(source) => format!(
            "cargo xtask image --from {} (writes {})",
            clap::ValueEnum::to_possible_value(source).map_or_else(String::new, |v| v.get_name().to_owned()),
            rel(&image::archive_path())
        ),
        Internal::Certs => format!(
            "cargo xtask certs --out {} (kept if already there, so running pods keep matching certificates)",
            rel(&kind_dir().join("certs"))
        ),
        Internal::CarvePools => {
            "carve {POOL4} (a /28) and {POOL6} (a /124) near the top of {SUBNETS}".to_owned()
        }
        Internal::Render => format!(
            "render manifests/overlays/kind with --address-pool={{POOL4}} [--address-pool={{POOL6}}] into {}",
            rel(&kind_dir().join("fulgur.yaml"))
        ),
        Internal::Traffic => "TCP to {GATEWAY}:80 (HTTP GET /hostname) and UDP to {GATEWAY}:5353 (`hostname`), from this host".to_owned(),
        Internal::Note(text) => text.clone(),
    }
}

/// The kind overlay rendered with `pools` in place of the placeholder.
pub fn render_overlay(pools: &[String]) -> anyhow::Result<Vec<Value>> {
    let mut objects = kustomize::render(&workspace_root().join("manifests/overlays/kind"))?;
    let mut replaced = false;
    for object in &mut objects {
        if object["kind"] != "Deployment" || object["metadata"]["name"] != "fulgur-controller" {
            continue;
        }
        let Some(containers) = object["spec"]["template"]["spec"]["containers"].as_sequence_mut()
        else {
            continue;
        };
        for container in containers {
            let Some(args) = container["args"].as_sequence_mut() else {
                continue;
            };
            let before = args.len();
            args.retain(|a| a.as_str() != Some(PLACEHOLDER_POOL));
            if args.len() != before {
                replaced = true;
                args.extend(
                    pools
                        .iter()
                        .map(|p| Value::from(format!("--address-pool={p}"))),
                );
            }
        }
    }
    if !replaced {
        bail!("manifests/overlays/kind: no `{PLACEHOLDER_POOL}` in the controller's args");
    }
    Ok(objects)
}

fn cluster_config(workers: u32) -> String {
    let mut text = String::from(
        "# Written by `cargo xtask kind`.\nkind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: control-plane\n",
    );
    for _ in 0..workers {
        text.push_str("- role: worker\n");
    }
    text
}

/// Replaces `{VAR}` (and `{VAR,}`: whitespace-separated words joined by commas) in `arg`.
pub fn substitute(arg: &str, vars: &BTreeMap<&'static str, String>) -> String {
    let mut out = arg.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("{{{name}}}"), value);
        out = out.replace(
            &format!("{{{name},}}"),
            &value.split_whitespace().collect::<Vec<_>>().join(","),
        );
    }
    out
}

/// Probes the machine for the plan.
pub fn detect(options: &Options) -> anyhow::Result<(Env, Vec<&'static str>)> {
    let mut missing: Vec<&'static str> = required_tools(options)
        .into_iter()
        .filter(|t| !crate::have(t))
        .collect();
    let runtime =
        if crate::have("docker") && crate::output(Command::new("docker").arg("info")).is_some() {
            "docker"
        } else if crate::have("podman") {
            "podman"
        } else {
            missing.push("docker or podman (a running container engine)");
            "docker"
        };
    if !options.delete && image::find_tool().is_none() {
        missing.push("podman, buildah or docker (to build the image)");
    }
    let clusters = crate::output(
        Command::new("kind")
            .args(["get", "clusters"])
            .env("KIND_EXPERIMENTAL_PROVIDER", runtime),
    )
    .unwrap_or_default();
    let env = Env {
        runtime: runtime.to_owned(),
        cluster_exists: clusters.lines().any(|l| l.trim() == options.name),
        root: crate::is_root(),
        repo_url: crate::output(
            Command::new("git")
                .args(["remote", "get-url", "origin"])
                .current_dir(workspace_root()),
        )
        .unwrap_or_else(|| "unknown".into()),
    };
    Ok((env, missing))
}

pub fn missing_message(missing: &[&str]) -> String {
    format!(
        "`cargo xtask kind` needs: {} (kind: https://kind.sigs.k8s.io, kubectl: https://kubernetes.io/docs/tasks/tools/{})",
        missing.join(", "),
        if missing.contains(&"go") {
            "; go for --conformance: https://go.dev/dl"
        } else {
            ""
        }
    )
}

/// Runs `steps`, stopping at the first failure with the step's name and where to look.
pub fn execute(options: &Options, steps: &[Step]) -> anyhow::Result<()> {
    let mut vars: BTreeMap<&'static str, String> = BTreeMap::new();
    let started = Instant::now();
    for (i, step) in steps.iter().enumerate() {
        eprintln!("[kind] step {}/{}: {}", i + 1, steps.len(), step.name);
        for action in &step.actions {
            if let Err(error) = act(options, action, &mut vars) {
                let look = substitute(&step.look_at, &vars);
                if step.optional {
                    eprintln!("    step `{}` failed ({error:#}); going on", step.name);
                    break;
                }
                bail!(
                    "step `{}` failed: {error:#}\n  look at: {look}\n  (re-run `cargo xtask kind` once fixed: it reuses the cluster)",
                    step.name
                );
            }
        }
    }
    eprintln!("[kind] done in {:.0?}", started.elapsed());
    Ok(())
}

fn act(
    options: &Options,
    action: &Action,
    vars: &mut BTreeMap<&'static str, String>,
) -> anyhow::Result<()> {
    match action {
        Action::Run(c) | Action::Capture(_, c) => {
            if let Some(var) = c.needs
                && vars.get(var).is_none_or(String::is_empty)
            {
                eprintln!("  (skipped, no {{{var}}}) {}", c.shown());
                return Ok(());
            }
            let args: Vec<String> = c.args.iter().map(|a| substitute(a, vars)).collect();
            if args.iter().any(String::is_empty) {
                eprintln!("  (skipped, an empty value) {}", c.shown());
                return Ok(());
            }
            if let Some(path) = &c.unless_exists
                && path.exists()
            {
                eprintln!("  (skipped, {} exists) {}", rel(path), c.shown());
                return Ok(());
            }
            let shown = Cmd {
                args: args.clone(),
                env: c.env.clone(),
                dir: c.dir.clone(),
                ..Cmd::default()
            }
            .shown();
            eprintln!("  $ {shown}");
            let mut command = Command::new(&args[0]);
            command
                .args(&args[1..])
                .current_dir(c.dir.clone().unwrap_or_else(workspace_root));
            for (k, v) in &c.env {
                command.env(k, v);
            }
            if let Action::Capture(var, _) = action {
                let out = command
                    .output()
                    .with_context(|| format!("starting {}", args[0]))?;
                if !out.status.success() {
                    bail!(
                        "`{shown}` failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                eprintln!("    {{{var}}} = {value}");
                vars.insert(var, value);
                return Ok(());
            }
            let status = command
                .status()
                .with_context(|| format!("starting {}", args[0]))?;
            if !status.success() {
                if c.may_fail {
                    eprintln!("    (failed, {status}; going on)");
                    return Ok(());
                }
                bail!("`{shown}` failed ({status})");
            }
            Ok(())
        }
        Action::Xtask(internal) => {
            eprintln!(
                "  xtask: {}",
                substitute(&describe_internal(internal), vars)
            );
            internal_work(options, internal, vars)
        }
    }
}

fn internal_work(
    options: &Options,
    internal: &Internal,
    vars: &mut BTreeMap<&'static str, String>,
) -> anyhow::Result<()> {
    match internal {
        Internal::ClusterConfig => {
            std::fs::create_dir_all(kind_dir())?;
            std::fs::write(
                kind_dir().join("cluster.yaml"),
                cluster_config(options.workers),
            )?;
        }
        Internal::Image(source) => {
            image::build(*source)?;
        }
        Internal::Certs => {
            let dir = kind_dir().join("certs");
            if dir.join("secrets.yaml").exists() {
                eprintln!("    kept {}", rel(&dir));
            } else {
                certs::write(&dir, &certs::Options::default())?;
            }
        }
        Internal::CarvePools => {
            let pools = pool::carve_all(vars.get("SUBNETS").map_or("", String::as_str))?;
            for p in &pools {
                let var = if p.contains(':') { "POOL6" } else { "POOL4" };
                eprintln!("    {{{var}}} = {p}");
                vars.insert(var, p.clone());
            }
        }
        Internal::Render => {
            let pools: Vec<String> = ["POOL4", "POOL6"]
                .iter()
                .filter_map(|v| vars.get(v).filter(|p| !p.is_empty()).cloned())
                .collect();
            let objects = render_overlay(&pools)?;
            std::fs::create_dir_all(kind_dir())?;
            std::fs::write(
                kind_dir().join("fulgur.yaml"),
                kustomize::to_yaml(&objects)?,
            )?;
        }
        Internal::Traffic => {
            let gateway: IpAddr = vars
                .get("GATEWAY")
                .context("no Gateway address")?
                .parse()
                .context("the Gateway's address")?;
            traffic(gateway)?;
        }
        Internal::Note(_) => {}
    }
    Ok(())
}

/// TCP and UDP from this host to the Gateway, retried for a minute (agents are programmed a
/// moment after the Gateway turns Programmed on the first of them).
fn traffic(gateway: IpAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let tcp = SocketAddr::new(gateway, 80);
    let udp = SocketAddr::new(gateway, 5353);
    loop {
        let last = match (http_hostname(tcp), udp_hostname(udp)) {
            (Ok(t), Ok(u)) => {
                eprintln!("    TCP {tcp} answered by {t}; UDP {udp} answered by {u}");
                return Ok(());
            }
            (t, u) => format!("TCP: {:?}; UDP: {:?}", t.err(), u.err()),
        };
        if Instant::now() > deadline {
            bail!("no answer through the Gateway in 60 s ({last})");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn http_hostname(to: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /hostname HTTP/1.0\r\nHost: fulgur\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .context("no HTTP response")?;
    anyhow::ensure!(
        text.starts_with("HTTP/1.") && text.contains(" 200 "),
        "HTTP: {text}"
    );
    Ok(body)
}

fn udp_hostname(to: SocketAddr) -> anyhow::Result<String> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"hostname", to)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(conformance: bool) -> Options {
        Options {
            name: "fulgur".into(),
            workers: 0,
            conformance,
            delete: false,
            image_from: image::Source::Auto,
        }
    }

    fn env(cluster_exists: bool) -> Env {
        Env {
            runtime: "docker".into(),
            cluster_exists,
            root: true,
            repo_url: "https://example.com/fulgur".into(),
        }
    }

    #[test]
    fn the_plan_names_every_step_and_command() {
        let text = describe(&plan(&options(true), &env(false)));
        for needle in [
            "cluster",
            "kind create cluster --name fulgur --config",
            "kind load image-archive",
            &format!("fulgur-{}.tar --name fulgur", image::VERSION),
            "kubectl apply --server-side -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.6.1/standard-install.yaml",
            "crd/tcproutes.gateway.networking.k8s.io",
            "cargo xtask certs --out",
            "kubectl apply -f manifests/deploy/namespace.yaml",
            "secrets.yaml",
            "docker network inspect kind --format",
            "carve {POOL4}",
            "render manifests/overlays/kind",
            "rollout status ds/fulgur-agent",
            "rollout status deploy/fulgur-controller",
            "kubectl apply -f manifests/examples/kind/echo.yaml",
            "--for=condition=Programmed",
            "ip route replace {POOL4} via {NODE_IP}",
            "ip -6 route replace {POOL6} via {NODE_IP6}",
            "TCP to {GATEWAY}:80",
            "UDP to {GATEWAY}:5353",
            "git clone --depth=1 --branch v1.6.1",
            "jsonpath={.status.supportedFeatures[*].name}",
            "go test ./conformance",
            "--gateway-class=fulgur",
            "--conformance-profiles=GATEWAY-TCP,GATEWAY-UDP",
            "--supported-features={FEATURES,}",
            "--report-output=",
        ] {
            assert!(
                text.contains(needle),
                "`{needle}` missing from the plan:\n{text}"
            );
        }
        let names: Vec<String> = plan(&options(true), &env(false))
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "cluster",
                "image",
                "Gateway API CRDs",
                "certificates",
                "address pool",
                "deploy fulgur",
                "rollout",
                "example",
                "host route",
                "traffic",
                "conformance"
            ]
        );
        // Every step says where to look when it fails.
        assert!(
            plan(&options(true), &env(false))
                .iter()
                .all(|s| !s.look_at.is_empty())
        );
    }

    #[test]
    fn an_existing_cluster_is_reused_and_the_pods_restarted() {
        let text = describe(&plan(&options(false), &env(true)));
        assert!(!text.contains("kind create cluster"), "{text}");
        assert!(text.contains("reusing the kind cluster `fulgur`"));
        assert!(text.contains("rollout restart ds/fulgur-agent deploy/fulgur-controller"));
        assert!(!text.contains("go test"), "no conformance unless asked");
    }

    #[test]
    fn without_root_the_route_goes_through_sudo_and_podman_is_kinds_provider() {
        let env = Env {
            runtime: "podman".into(),
            cluster_exists: false,
            root: false,
            repo_url: "unknown".into(),
        };
        let text = describe(&plan(&options(false), &env));
        assert!(
            text.contains("$ sudo ip route replace {POOL4} via {NODE_IP}"),
            "{text}"
        );
        assert!(text.contains("KIND_EXPERIMENTAL_PROVIDER=podman kind create cluster"));
        assert!(text.contains("podman network inspect kind --format '{{range .Subnets}}"));
    }

    #[test]
    fn delete_removes_the_routes_and_the_cluster() {
        let delete = Options {
            delete: true,
            ..options(false)
        };
        let text = describe(&plan(&delete, &env(true)));
        assert!(text.contains("ip route del {POOL4}"), "{text}");
        assert!(text.contains("kind delete cluster --name fulgur"));
        assert!(
            plan(&delete, &env(true))[0].optional,
            "a gone network does not stop the delete"
        );
        assert!(!text.contains("kind load"));
    }

    #[test]
    fn a_failed_step_is_named_with_where_to_look_unless_optional() {
        let steps = vec![
            Step {
                optional: true,
                ..step("cleanup", "nothing", vec![Action::Run(cmd(&["false"]))])
            },
            step(
                "capture",
                "{X}",
                vec![Action::Capture("X", cmd(&["echo", "captured"]))],
            ),
            step(
                "breaks",
                "look at `{X}` here",
                vec![Action::Run(cmd(&["false"]))],
            ),
            step(
                "never",
                "-",
                vec![Action::Run(cmd(&["/nonexistent/never-run"]))],
            ),
        ];
        let error = execute(&options(false), &steps).unwrap_err().to_string();
        assert!(error.contains("step `breaks` failed"), "{error}");
        assert!(
            error.contains("look at: look at `captured` here"),
            "{error}"
        );
        assert!(!error.contains("never"), "{error}");
        let steps = vec![
            Step {
                optional: true,
                ..step("cleanup", "nothing", vec![Action::Run(cmd(&["false"]))])
            },
            step("next", "-", vec![Action::Run(cmd(&["true"]))]),
        ];
        execute(&options(false), &steps).expect("an optional step's failure goes on");
    }

    #[test]
    fn workers_go_into_the_cluster_config_and_a_note() {
        assert_eq!(cluster_config(2).matches("- role: worker").count(), 2);
        let text = describe(&plan(
            &Options {
                workers: 2,
                ..options(false)
            },
            &env(false),
        ));
        assert!(text.contains("2 workers: the pool is routed via the control-plane node only"));
    }

    #[test]
    fn variables_are_substituted_and_lists_joined() {
        let vars = BTreeMap::from([
            ("POOL4", "198.51.100.224/28".to_owned()),
            ("FEATURES", "Gateway TCPRoute  UDPRoute".to_owned()),
        ]);
        assert_eq!(substitute("{POOL4}", &vars), "198.51.100.224/28");
        assert_eq!(
            substitute("--supported-features={FEATURES,}", &vars),
            "--supported-features=Gateway,TCPRoute,UDPRoute"
        );
    }

    #[test]
    fn missing_tools_are_named_in_one_message() {
        let text = missing_message(&["kind", "kubectl", "go"]);
        assert!(text.contains("needs: kind, kubectl, go"), "{text}");
        assert!(text.contains("--conformance"));
        assert_eq!(
            required_tools(&options(true)),
            ["kind", "kubectl", "go", "git"]
        );
    }
}
