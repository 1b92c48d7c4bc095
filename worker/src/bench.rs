//! placeholder
#[derive(clap::Subcommand)]
pub enum BenchCommand { Ingest }
pub fn run(_w: BenchCommand) -> anyhow::Result<()> { anyhow::bail!("todo") }
