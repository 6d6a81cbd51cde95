//! `fulgur-agent`: runs the dataplane on this node, or inspects and detaches it.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use fulgur_agent::{
    config::ServiceSet,
    dataplane::{self, Dataplane, Pins, Sizes, XdpAttachMode},
    inspect, maglev,
    writer::{Layout, MapWriter},
};
use fulgur_common::defaults;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "fulgur node agent: eBPF L4 load balancing for the Gateway API"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print services, backends, counters and flows from the pinned maps (works while the
    /// agent is down).
    Inspect {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Conntrack entries to list.
        #[arg(long, default_value_t = 20)]
        flows: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs from every interface and remove the pinned state.
    Detach {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/fulgur";

#[derive(Args)]
struct RunArgs {
    /// Client-facing interface to attach to (repeat for several).
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// bpffs folder for pinned maps, programs and links.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    #[arg(long, value_enum, default_value = "native")]
    xdp_mode: XdpAttachMode,
    /// YAML/JSON file with the services to program; re-read when it changes.
    #[arg(long)]
    services: Option<PathBuf>,
    /// Capacity of the services map.
    #[arg(long, default_value_t = defaults::MAX_SERVICES)]
    max_services: u32,
    /// Capacity of the backends map (all services together).
    #[arg(long, default_value_t = defaults::MAX_BACKENDS)]
    max_backends: u32,
    /// Slots in each service's Maglev table; a prime.
    #[arg(long, default_value_t = Sizes::default().layout.table_size)]
    table_size: u32,
    /// Flows tracked (LRU); replies need their flow tracked.
    #[arg(long, default_value_t = defaults::CONNTRACK_ENTRIES)]
    conntrack_size: u32,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Inspect {
            bpffs_dir,
            flows,
            json,
        }) => {
            let report = inspect::read(&Pins::new(bpffs_dir), flows)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Some(Command::Detach { bpffs_dir }) => {
            let removed = dataplane::detach(&Pins::new(&bpffs_dir))?;
            println!(
                "detached: removed {} pins under {}",
                removed.len(),
                bpffs_dir.display()
            );
            Ok(())
        }
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.ifaces.is_empty() {
        bail!("at least one --iface is required");
    }
    if !maglev::is_prime(args.table_size) {
        bail!(
            "--table-size {} is not a prime (try 4099, 16381 or 65537)",
            args.table_size
        );
    }
    let sizes = Sizes {
        layout: Layout {
            max_services: args.max_services,
            max_backends: args.max_backends,
            table_size: args.table_size,
        },
        conntrack_entries: args.conntrack_size,
    };
    if sizes.layout.lookup_entries() > u32::MAX as u64 / 4 {
        bail!("--max-services × --table-size × 2 is too large for one lookup map");
    }
    // Validate the input before touching the kernel.
    let initial = match &args.services {
        Some(path) => ServiceSet::from_file(path)?,
        None => ServiceSet::default(),
    };

    let pins = Pins::new(&args.bpffs_dir);
    let mut dataplane = Dataplane::load(pins, &sizes)?;
    let mut writer = MapWriter::adopt(sizes.layout, |name| dataplane.take_map(name))
        .context("adopting the pinned maps")?;
    let report = writer.apply(&initial)?;
    info!(
        ?report,
        services = initial.services.len(),
        "services applied"
    );
    for iface in &args.ifaces {
        dataplane
            .attach(iface, args.xdp_mode)
            .with_context(|| format!("attaching to {iface}"))?;
        info!(iface, mode = ?args.xdp_mode, "attached");
    }
    info!(bpffs_dir = %args.bpffs_dir.display(), "ready");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut last = initial;
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = terminate.recv() => break,
                _ = poll.tick() => {
                    let Some(path) = &args.services else { continue };
                    match ServiceSet::from_file(path) {
                        Ok(next) if next != last => match writer.apply(&next) {
                            Ok(report) => {
                                info!(?report, "services file changed, applied");
                                last = next;
                            }
                            Err(e) => error!("services file changed, not applied: {e}"),
                        },
                        Ok(_) => {}
                        Err(e) => warn!("keeping the last good services: {e}"),
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    // The programs stay attached through their pinned links; `detach` removes them.
    info!("exiting; the dataplane stays attached (use `fulgur-agent detach` to remove it)");
    Ok(())
}
