//! Project tasks: `cargo xtask setup | test | demo | lint | bench | fuzz | certs | image | kind`.
//!
//! This crate must build on a fresh machine before setup has run, so it depends on nothing that
//! needs the eBPF toolchain.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use xtask::{cargo, certs, have, image, is_root, kind, output, run, target_dir, workspace_root};

#[derive(Parser)]
#[command(about = "fulgur project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent).
    Setup {
        /// Only what a build needs (rust-src, bpf-linker): no apt packages, no bpffs mount, no
        /// Python tools. For container builds (the Containerfile's builder stage).
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Setup, lint, build, then run every test, the privileged ones included (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run the demo: a client, a load balancer and 3 backends in namespaces.
    Demo,
    /// Setup, build, then the Gateway API v1.6.1 GATEWAY-TCP/GATEWAY-UDP tests standalone with
    /// real traffic (needs root); writes target/conformance/standard-v1.6.1-standalone-report.yaml.
    /// Arguments: [--only NAME[,NAME]] [--xdp-mode native|generic] [--report PATH] [--markdown].
    Conformance {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// `cargo fmt --check` and `cargo clippy -D warnings`.
    Lint,
    /// Benchmarks (needs root, as setup does): `dataplane` (ns per packet), `apply` (10k services
    /// over gRPC), `translate` (the controller at 1k and 10k routes) or `forward` (end to end
    /// against routing, nftables and HAProxy).
    Bench {
        #[arg(value_enum, default_value = "dataplane")]
        target: BenchTarget,
    },
    /// The packet fuzz test with more iterations than `test` runs (needs root).
    Fuzz {
        #[arg(long, default_value_t = 5_000_000)]
        iterations: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Write a CA, the agent's (serverAuth, DNS fulgur-agent) and the controller's (clientAuth)
    /// certificates and keys, and the two Secrets (secrets.yaml) the manifests mount.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// Validity of the certificates.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// More DNS names for the agent's certificate (repeat).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
    },
    /// Build the image fulgur:VERSION with podman, buildah or docker, and write
    /// target/image/fulgur-VERSION.tar (docker-archive, for `kind load image-archive`).
    Image {
        /// `containerfile` builds ./Containerfile (pulls base images); `host` packages the
        /// host's release binaries and their libraries FROM scratch (no registry needed);
        /// `auto` uses the Containerfile when its base image can be pulled.
        #[arg(long, value_enum, default_value = "auto")]
        from: image::Source,
    },
    /// A kind cluster running fulgur, an example Gateway and traffic through it (needs docker or
    /// podman, kind and kubectl; --conformance needs go and git).
    Kind {
        /// kind cluster name.
        #[arg(long, default_value = "fulgur")]
        name: String,
        /// Worker nodes beside the control plane.
        #[arg(long, default_value_t = 0)]
        workers: u32,
        /// Then run the Gateway API conformance suite (GATEWAY-TCP, GATEWAY-UDP); report in
        /// target/conformance/.
        #[arg(long)]
        conformance: bool,
        /// Delete the cluster (and the host routes to its address pool).
        #[arg(long)]
        delete: bool,
        /// Print the steps and their commands without running anything.
        #[arg(long)]
        dry_run: bool,
        /// As `cargo xtask image --from`.
        #[arg(long, value_enum, default_value = "auto")]
        image_from: image::Source,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchTarget {
    /// ns per packet through BPF_PROG_TEST_RUN; writes target/bench/dataplane.json
    Dataplane,
    /// One gRPC Apply of 10,000 services × 16 backends; writes target/bench/apply.json
    Apply,
    /// translate + status documents at 1,000 and 10,000 routes; writes target/bench/translate.json
    Translate,
    /// End to end through namespaces: fulgur next to routing, nftables DNAT and HAProxy (about
    /// 3 minutes); writes target/bench/forward.json and forward.svg
    Forward,
}

const APT_PACKAGES: &[(&str, &str)] = &[
    // (command that must exist, Debian package that provides it)
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    // kube-proxy's iptables rules on the kind-node test bed (tests/src/kind_node.rs).
    ("iptables", "iptables"),
    // The peers of `bench forward`.
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Pinned so that the schemas the tests validate against do not change under them.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { toolchain_only } => {
            if toolchain_only {
                setup_toolchain()
            } else {
                setup()
            }
        }
        Task::Certs {
            out,
            days,
            dns_names,
        } => {
            let written = certs::write(&out, &certs::Options { days, dns_names })?;
            for path in [
                &written.ca,
                &written.ca_key,
                &written.agent_cert,
                &written.agent_key,
                &written.controller_cert,
                &written.controller_key,
                &written.secrets,
            ] {
                println!("{}", path.display());
            }
            eprintln!(
                "[certs] apply the Secrets with `kubectl apply -f {}` (after manifests/deploy/namespace.yaml)",
                written.secrets.display()
            );
            Ok(())
        }
        Task::Image { from } => image::build(from).map(drop),
        Task::Kind {
            name,
            workers,
            conformance,
            delete,
            dry_run,
            image_from,
        } => {
            let options = kind::Options {
                name,
                workers,
                conformance,
                delete,
                image_from,
            };
            let (env, missing) = kind::detect(&options)?;
            let steps = kind::plan(&options, &env);
            if dry_run {
                print!("{}", kind::describe(&steps));
                if !missing.is_empty() {
                    eprintln!("[kind] note: {}", kind::missing_message(&missing));
                }
                return Ok(());
            }
            if !missing.is_empty() {
                bail!("{}", kind::missing_message(&missing));
            }
            kind::execute(&options, &steps)
        }
        Task::Test { args } => {
            setup()?;
            lint()?;
            test(&args)
        }
        Task::Demo => {
            setup()?;
            demo()
        }
        Task::Conformance { args } => {
            setup()?;
            require_root("conformance")?;
            run(cargo().args(["build", "--bins"]))?;
            // Where `cargo build` put the binaries (CARGO_TARGET_DIR, else the workspace's).
            let bin = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| workspace_root().join("target"), PathBuf::from)
                .join("debug");
            run(Command::new(bin.join("fulgur-conformance"))
                .args(&args)
                .env("FULGUR_AGENT_BIN", bin.join("fulgur-agent"))
                .env("FULGUR_CONTROLLER_BIN", bin.join("fulgur-controller")))
        }
        Task::Lint => lint(),
        Task::Bench { target } => {
            setup()?;
            let name = match target {
                BenchTarget::Dataplane => "dataplane",
                BenchTarget::Apply => "apply",
                BenchTarget::Translate => "translate",
                BenchTarget::Forward => "forward",
            };
            require_root("bench")?;
            run(cargo().args(["build", "--release", "--bins"]))?;
            // Where `cargo build` put the binaries (CARGO_TARGET_DIR, else the workspace's).
            let bin = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| workspace_root().join("target"), PathBuf::from)
                .join("release");
            run(Command::new(bin.join("fulgur-bench"))
                .arg(name)
                .env("FULGUR_AGENT_BIN", bin.join("fulgur-agent")))
        }
        Task::Fuzz { iterations, seed } => {
            setup()?;
            run(cargo()
                .args([
                    "test",
                    "--release",
                    "-p",
                    "fulgur-tests",
                    "--test",
                    "fuzz",
                    "--",
                    "--nocapture",
                ])
                .env("FULGUR_FUZZ_ITERATIONS", iterations.to_string())
                .env("FULGUR_FUZZ_SEED", seed.to_string()))
        }
    }
}

fn step(message: &str) {
    eprintln!("[setup] {message}");
}

fn require_root(task: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {task}` needs root: it loads eBPF programs and creates network namespaces (run it with sudo)"
        );
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    require_root("setup")?;
    setup_apt()?;
    let sysroot = setup_nightly()?;
    setup_rust_src(&sysroot)?;
    setup_bpf_linker(&sysroot)?;
    setup_bpffs()?;
    setup_kubernetes_validate()?;
    step("done");
    Ok(())
}

/// What a build alone needs (the Containerfile's builder stage).
fn setup_toolchain() -> anyhow::Result<()> {
    let sysroot = setup_nightly()?;
    setup_rust_src(&sysroot)?;
    setup_bpf_linker(&sysroot)?;
    step("done (toolchain only)");
    Ok(())
}

/// kubernetes-validate (PyPI) ships the Kubernetes schemas: the manifest tests validate every
/// rendered object offline with it.
fn setup_kubernetes_validate() -> anyhow::Result<()> {
    if let Some(version) = output(Command::new("kubernetes-validate").arg("--version")) {
        step(&format!("kubernetes-validate: {version}"));
        return Ok(());
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| have(p))
        .context("kubernetes-validate needs Python 3 (`apt-get install python3-pip`)")?;
    step(&format!(
        "kubernetes-validate: installing {KUBERNETES_VALIDATE} with {python} -m pip"
    ));
    run(Command::new(python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]))
    .context(
        "installing kubernetes-validate failed (Debian's system Python may need python3-pip, or --break-system-packages)",
    )
}

fn setup_apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        step(
            "system packages: present (iproute2, ethtool, util-linux, procps, iptables, nftables, haproxy)",
        );
        return Ok(());
    }
    step(&format!(
        "system packages: installing {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed; install the packages by hand")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {} failed", missing.join(" ")))
}

fn setup_nightly() -> anyhow::Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the `nightly` toolchain is missing: it builds the eBPF programs (`rustup toolchain install nightly`)",
    )?;
    step(&format!("nightly toolchain: {sysroot}"));
    Ok(PathBuf::from(sysroot))
}

fn setup_rust_src(sysroot: &Path) -> anyhow::Result<()> {
    let library = sysroot.join("lib/rustlib/src/rust/library/core");
    if library.exists() {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("rust-src for nightly: adding with rustup");
    if run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .is_ok()
        && library.exists()
    {
        return Ok(());
    }
    let shared = workspace_root().join("../shared/toolchain");
    let archive = std::fs::read_dir(&shared)
        .ok()
        .and_then(|entries| {
            entries.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("rust-src-nightly"))
            })
        })
        .with_context(|| {
            format!(
                "rustup could not add rust-src and no rust-src archive is in {}",
                shared.display()
            )
        })?;
    step(&format!(
        "rust-src for nightly: unpacking {}",
        archive.display()
    ));
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&archive)
        .arg("-C")
        .arg(sysroot.join("lib/rustlib")))?;
    if !library.exists() {
        bail!(
            "{} did not provide {}",
            archive.display(),
            library.display()
        );
    }
    Ok(())
}

fn setup_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    if let Some(version) = output(Command::new("bpf-linker").arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
    {
        step(&format!("bpf-linker: {version}"));
        return Ok(());
    }
    // bpf-linker links -lLLVM from $LLVM_PREFIX/lib: point it at nightly's own libLLVM.
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let llvm_major = llvm
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .context("libLLVM version")?
        .to_owned();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".cache/fulgur/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for link in ["libLLVM.so".to_owned(), llvm.clone()] {
        let path = prefix.join("lib").join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib.join(&llvm), &path)?;
    }
    step(&format!(
        "bpf-linker: building {BPF_LINKER_VERSION} against nightly's {llvm} (1-2 minutes)"
    ));
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{llvm_major}")])
        .env("LLVM_PREFIX", &prefix))
    .context("building bpf-linker failed")
}

fn setup_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf "))
    {
        step("bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    step("bpffs: mounting at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn lint() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    require_root("test")?;
    let started = Instant::now();
    run(cargo().args(["build", "--bins"]))?;
    let agent = workspace_root().join("target/debug/fulgur-agent");
    let mut command = cargo();
    command
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .env("FULGUR_AGENT_BIN", &agent)
        .env(
            "FULGUR_CONTROLLER_BIN",
            workspace_root().join("target/debug/fulgur-controller"),
        )
        .stdout(Stdio::piped());
    let mut child = command.spawn().context("starting cargo test")?;
    let mut totals = Totals::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    // One plain closing line for the whole run, whatever the last suite was.
    println!("[test] finished in {:.0?}", started.elapsed());
    println!(
        "fulgur: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() || totals.failed > 0 {
        bail!("tests failed");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Sums cargo test's `test result: ok. N passed; N failed; N ignored; ...` lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(counts) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in counts.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn demo() -> anyhow::Result<()> {
    require_root("demo")?;
    run(cargo().args(["build", "--bins"]))?;
    let debug = target_dir().join("debug");
    run(Command::new(debug.join("fulgur-demo"))
        .env("FULGUR_AGENT_BIN", debug.join("fulgur-agent"))
        .env("FULGUR_CONTROLLER_BIN", debug.join("fulgur-controller")))
}
