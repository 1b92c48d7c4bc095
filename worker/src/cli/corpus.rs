//! `cellfleet ingest`, `cellfleet synth` and `cellfleet corpus inspect|verify|stream`.

use std::path::PathBuf;

use anyhow::Context;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::stream::OrderConfig;
use clap::Subcommand;

use super::{LayoutArgs, S3Args};
use crate::corpus::ingest::{ingest, IngestOptions, LayerChoice};
use crate::corpus::{inspect, synth};

#[derive(Subcommand)]
pub enum CorpusAction {
    /// Print a summary of a corpus
    Inspect {
        url: String,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Re-hash every shard against the manifest and decode all of it (blocks, labels, cell names)
    Verify {
        url: String,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Write the corpus's cells as AnnData: X the bins (vocabulary order), obs the labels; for tools
    /// that compare predicted cells with real ones in bins (cell-eval)
    Export {
        url: String,
        /// The .h5ad file to write
        #[arg(long)]
        out: PathBuf,
        /// Only cells with COLUMN=VALUE (repeat: all must hold)
        #[arg(long = "filter", value_name = "COLUMN=VALUE")]
        filters: Vec<String>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Print the augmented, masked batches one rank would read (with a digest of their tokens)
    Stream {
        url: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        epoch: u32,
        /// Clones per cell (bootstrapped permutation); 1 turns augmentation off
        #[arg(long, default_value_t = 4)]
        augmentation: u32,
        /// (block, clone) units per shuffle window
        #[arg(long, default_value_t = 16)]
        window_units: u32,
        #[arg(long, default_value_t = 0.15)]
        mask_ratio: f32,
        #[arg(long, default_value_t = 1)]
        world: u32,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Per-rank batch size
        #[arg(long, default_value_t = 32)]
        batch_size: u32,
        #[arg(long, default_value_t = 4)]
        batches: usize,
        /// Global cursor (samples of the epoch already consumed)
        #[arg(long, default_value_t = 0)]
        cursor: u64,
        #[command(flatten)]
        s3: S3Args,
    },
}

/// `cellfleet ingest`: tokenizes h5ad files into a corpus and prints what it wrote.
pub fn ingest_command(
    inputs: Vec<PathBuf>,
    out: String,
    layer: LayerChoice,
    genes: Option<PathBuf>,
    layout: LayoutArgs,
    s3: &S3Args,
) -> anyhow::Result<()> {
    let opts = IngestOptions {
        inputs,
        out,
        s3: s3.options(),
        hvg: layout.hvg,
        bins: layout.bins,
        layer,
        genes_file: genes,
        threads: layout.threads(),
        label_cols: layout.label_cols,
        shard_cells: layout.shard_cells,
        block_cells: layout.block_cells,
    };
    let started = std::time::Instant::now();
    let report = ingest(&opts)?;
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "ingested {} cells x {} genes into {} shards at {} in {secs:.1}s ({:.0} cells/s)",
        report.manifest.total_cells,
        report.manifest.genes.len(),
        report.manifest.shards.len(),
        opts.out,
        report.manifest.total_cells as f64 / secs
    );
    Ok(())
}

/// `cellfleet corpus inspect|verify|stream`.
pub fn corpus_command(action: CorpusAction) -> anyhow::Result<()> {
    match action {
        CorpusAction::Inspect { url, s3 } => {
            let corpus = Corpus::open(&url, &s3.options())?;
            println!("{}", inspect::summary(&corpus));
        }
        CorpusAction::Export {
            url,
            out,
            filters,
            s3,
        } => export(&url, &out, &filters, &s3.options())?,
        CorpusAction::Verify { url, s3 } => {
            let corpus = Corpus::open(&url, &s3.options())?;
            let bad = inspect::verify(&corpus);
            if !bad.is_empty() {
                for (name, why) in &bad {
                    eprintln!("BAD {name}: {why}");
                }
                let names: Vec<&str> = bad.iter().map(|(name, _)| name.as_str()).collect();
                anyhow::bail!(
                    "{} of {} shards failed verification: {}",
                    bad.len(),
                    corpus.manifest.shards.len(),
                    names.join(", ")
                );
            }
            println!(
                "ok: {} shards, {} cells verified",
                corpus.manifest.shards.len(),
                corpus.total_cells()
            );
        }
        CorpusAction::Stream {
            url,
            seed,
            epoch,
            augmentation,
            window_units,
            mask_ratio,
            world,
            rank,
            batch_size,
            batches,
            cursor,
            s3,
        } => {
            if world == 0 || rank >= world {
                anyhow::bail!("--rank {rank} must be below --world {world}");
            }
            let corpus = Corpus::open(&url, &s3.options())?;
            let preview = inspect::StreamPreview {
                order: OrderConfig {
                    seed,
                    augmentation,
                    window_units,
                },
                epoch,
                mask_ratio,
                world,
                rank,
                batch_size,
                batches,
                cursor,
            };
            for line in inspect::stream_lines(corpus, &preview)? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// `cellfleet synth`: a synthetic corpus (or h5ad file) resampled from real cells.
pub fn synth_command(
    cells: u64,
    sources: Vec<PathBuf>,
    out: String,
    seed: u64,
    layout: LayoutArgs,
    s3: &S3Args,
) -> anyhow::Result<()> {
    let opts = synth::SynthOptions {
        cells,
        sources,
        out,
        s3: s3.options(),
        hvg: layout.hvg,
        bins: layout.bins,
        seed,
        threads: layout.threads(),
        label_cols: layout.label_cols,
        shard_cells: layout.shard_cells,
        block_cells: layout.block_cells,
    };
    synth::run(&opts).context("synth failed")
}

/// `cellfleet corpus export`: the cells matching every `COLUMN=VALUE` filter, as AnnData in bins.
fn export(
    url: &str,
    out: &std::path::Path,
    filters: &[String],
    s3: &cellfleet_shared::storage::S3Options,
) -> anyhow::Result<()> {
    use crate::screen::anndata::{H5adWriter, ObsColumn};
    use crate::screen::plan::{cell_names_and_labels, read_cells};
    let corpus = Corpus::open(url, s3)?;
    let all: Vec<u64> = (0..corpus.total_cells()).collect();
    let (names, labels) = cell_names_and_labels(&corpus, &all)?;
    let mut keep = vec![true; all.len()];
    for filter in filters {
        let (column, value) = filter.split_once('=').with_context(|| {
            format!("--filter {filter:?}: expected COLUMN=VALUE, e.g. condition=control")
        })?;
        let (_, values) =
            labels
                .iter()
                .find(|(name, _)| name == column)
                .with_context(|| {
                    format!(
                "--filter {filter:?}: the corpus has no label column {column:?} (it has: {})",
                labels.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            )
                })?;
        if !values.iter().any(|v| v == value) {
            anyhow::bail!("--filter {filter:?}: no cell has {column} = {value:?}");
        }
        for (k, v) in keep.iter_mut().zip(values) {
            *k &= v == value;
        }
    }
    let cells: Vec<u64> = all.iter().copied().filter(|&c| keep[c as usize]).collect();
    let bins = read_cells(&corpus, &cells)?;
    let mut writer = H5adWriter::create(out, cells.len(), &corpus.manifest.genes)?;
    for (chunk_index, chunk) in cells.chunks(4096).enumerate() {
        let rows: Vec<f32> = chunk
            .iter()
            .flat_map(|c| bins[c].iter().map(|&b| f32::from(b)))
            .collect();
        writer.write_rows(chunk_index * 4096, &rows)?;
    }
    let mut columns = vec![(
        "cell".to_string(),
        ObsColumn::I64(cells.iter().map(|&c| c as i64).collect()),
    )];
    for (name, values) in labels {
        columns.push((
            name,
            ObsColumn::Categorical(cells.iter().map(|&c| values[c as usize].clone()).collect()),
        ));
    }
    let obs_names: Vec<String> = cells.iter().map(|&c| names[c as usize].clone()).collect();
    writer.finish(
        &obs_names,
        &columns,
        &[
            (
                "X".to_string(),
                "expression bins per vocabulary gene".to_string(),
            ),
            ("corpus".to_string(), url.to_string()),
        ],
    )?;
    println!(
        "wrote {} ({} cells x {} genes, bins)",
        out.display(),
        cells.len(),
        corpus.manifest.genes.len()
    );
    Ok(())
}
