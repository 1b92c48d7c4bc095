//! `cellfleet-coordinator`: the control plane alone, without libtorch (for the node that runs only it).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cellfleet-coordinator",
    version,
    about = "cellfleet control plane: membership, jobs, rendezvous"
)]
struct Cli {
    #[command(flatten)]
    args: cellfleet_coordinator::CoordinatorArgs,
}

fn main() -> anyhow::Result<()> {
    // The same variables as `cellfleet coordinator`: CELLFLEET_LOG and CELLFLEET_LOG_FORMAT.
    cellfleet_shared::telemetry::init_logging().map_err(anyhow::Error::msg)?;
    let cli = Cli::parse();
    tokio::runtime::Runtime::new()?.block_on(cellfleet_coordinator::run(cli.args))
}
