//! `fulgur-controller`: reconciles Gateway API L4 routes into per-node dataplane state.
//!
//! A skeleton: the providers, translate and the agent client arrive with their own issues.
//! It does not compile aya; it will speak to agents only through `fulgur.dataplane.v1`.

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
        "provider {:?}: the controller is not implemented yet; program agents with `fulgur-agent --services FILE`",
        cli.provider
    )
}
