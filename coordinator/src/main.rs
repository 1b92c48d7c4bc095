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
    // The same filter as `cellfleet coordinator`: CELLFLEET_LOG, warnings by default.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELLFLEET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    tokio::runtime::Runtime::new()?.block_on(cellfleet_coordinator::run(cli.args))
}
