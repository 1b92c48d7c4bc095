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
    /// Re-hash every shard against the manifest
    Verify {
        url: String,
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
        CorpusAction::Verify { url, s3 } => {
            let corpus = Corpus::open(&url, &s3.options())?;
            let bad = inspect::verify(&corpus);
            if !bad.is_empty() {
                for (name, why) in &bad {
                    eprintln!("BAD {name}: {why}");
                }
                anyhow::bail!(
                    "{} of {} shards failed verification",
                    bad.len(),
                    corpus.manifest.shards.len()
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
