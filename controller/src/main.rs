//! `fulgur-controller`: reconciles Gateway API L4 routes into per-node dataplane state.
//!
//! The providers and the translation from Gateway API objects arrive with their own issue; the
//! agent client (`fulgur_controller::agents`) is in place.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "fulgur controller: Gateway API TCPRoute/UDPRoute to eBPF load balancing"
)]
struct Cli {
    /// Where objects come from: `kubernetes` or `file`.
    #[arg(long, default_value = "kubernetes")]
    provider: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "provider {:?}: the Gateway API providers are not implemented yet; program agents with \
         `fulgur-agent --services FILE` or through fulgur.dataplane.v1",
        cli.provider
    )
}
