//! placeholder
use std::path::PathBuf;
use cellfleet_shared::store::S3Options;
pub struct SynthOptions { pub cells: u64, pub sources: Vec<PathBuf>, pub out: String, pub s3: S3Options, pub hvg: usize, pub bins: u16, pub label_cols: Vec<String>, pub seed: u64, pub shard_cells: usize, pub block_cells: usize, pub threads: usize }
pub fn run(_o: &SynthOptions) -> anyhow::Result<()> { anyhow::bail!("todo") }
