//! `cargo xtask conformance`: the Gateway API v1.6.1 GATEWAY-TCP and GATEWAY-UDP conformance
//! tests, standalone with real traffic, and the ConformanceReport.
//!
//! ```text
//! fulgur-conformance [--only NAME[,NAME]] [--xdp-mode native|generic] [--report PATH] [--markdown]
//! ```

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::conformance::{self, Options, report};

fn main() -> anyhow::Result<()> {
    let mut only = Vec::new();
    let mut mode = XdpAttachMode::Native;
    let mut report_path: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().with_context(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--only" => only.extend(
                value("--only")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            "--xdp-mode" => {
                mode = match value("--xdp-mode")?.as_str() {
                    "native" => XdpAttachMode::Native,
                    "generic" => XdpAttachMode::Generic,
                    other => bail!("--xdp-mode native|generic, not {other:?}"),
                }
            }
            "--report" => report_path = Some(value("--report")?.into()),
            "--markdown" => {
                print!("{}", conformance::markdown());
                return Ok(());
            }
            "--list" => {
                for s in conformance::scenarios::all() {
                    println!("{}", s.name);
                }
                return Ok(());
            }
            "-h" | "--help" => {
                println!(
                    "fulgur-conformance [--only NAME[,NAME]] [--xdp-mode native|generic] [--report PATH] [--markdown] [--list]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let report_path = report_path.unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace")
            .join("target/conformance")
            .join(report::file_name())
    });
    conformance::select(&only)?;
    println!(
        "Gateway API {} conformance (GATEWAY-TCP, GATEWAY-UDP), standalone, XDP {}",
        conformance::GATEWAY_API_VERSION,
        mode.name()
    );
    let run = conformance::run(&Options { only, mode })?;
    for o in &run.outcomes {
        if let Some(error) = &o.error {
            println!("\n{} FAILED:\n{error}\n", o.name);
        }
    }
    print!("{}", conformance::table(&run));
    let report = report::build(&run);
    report::write(&report, &report_path)?;
    report::validate(&std::fs::read_to_string(&report_path)?)?;
    println!("report: {}", report_path.display());
    if run.outcomes.iter().any(|o| !o.passed()) {
        bail!("conformance tests failed");
    }
    Ok(())
}
