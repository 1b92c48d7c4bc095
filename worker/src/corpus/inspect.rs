//! `cellfleet corpus inspect` and `cellfleet corpus verify`.

use std::fmt::Write as _;

use cellfleet_shared::corpus::manifest::{VocabularySource, MISSING_LABEL};
use cellfleet_shared::corpus::Corpus;

use crate::progress;

/// A human summary of a corpus.
pub fn summary(corpus: &Corpus) -> String {
    let m = &corpus.manifest;
    let mut out = String::new();
    let stored: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let _ = writeln!(out, "corpus        {}", corpus.store.url());
    let _ = writeln!(
        out,
        "format        v{}{}",
        m.format_version,
        if m.synthetic {
            "  (SYNTHETIC: for scale tests and benchmarks only)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "cells         {}", m.total_cells);
    let vocab = match &m.vocabulary {
        VocabularySource::HighlyVariable {
            requested,
            candidates,
        } => format!("top {requested} highly variable of {candidates} genes"),
        VocabularySource::Fixed {
            file,
            missing_in_input,
        } => format!("fixed list {file} ({missing_in_input} absent from input)"),
    };
    let _ = writeln!(out, "genes         {} ({vocab})", m.genes.len());
    let preview: Vec<&str> = m.genes.iter().take(8).map(String::as_str).collect();
    let _ = writeln!(
        out,
        "              {}{}",
        preview.join(", "),
        if m.genes.len() > 8 { ", ..." } else { "" }
    );
    let _ = writeln!(out, "bins          {} ({})", m.bins.n_bins, m.bins.rule);
    let _ = writeln!(
        out,
        "shards        {} ({:.1} MiB stored, {} cells per block)",
        m.shards.len(),
        stored as f64 / (1 << 20) as f64,
        m.block_cells
    );
    for col in &m.label_columns {
        let preview: Vec<&str> = col.categories.iter().take(6).map(String::as_str).collect();
        let _ = writeln!(
            out,
            "label         {} ({} categories: {}{})",
            col.name,
            col.categories.len(),
            preview.join(", "),
            if col.categories.len() > 6 {
                ", ..."
            } else {
                ""
            }
        );
    }
    for s in &m.sources {
        let _ = writeln!(
            out,
            "source        {} ({} cells x {} genes, blake3 {}...)\n              read {} as {:?} ({})",
            s.path,
            s.cells,
            s.genes,
            &s.blake3[..12],
            s.matrix,
            s.value_kind,
            s.matrix_reason
        );
    }
    let _ = write!(out, "manifest hash {}", m.content_hash());
    out
}

/// Re-hashes every shard; returns the names of the bad ones with the reason.
pub fn verify(corpus: &Corpus) -> Vec<(String, String)> {
    let bar = progress::bar(corpus.total_cells(), "verifying shards");
    let mut bad = Vec::new();
    for (i, entry) in corpus.manifest.shards.iter().enumerate() {
        if let Err(why) = decode_shard(corpus, i) {
            bad.push((entry.name.clone(), why));
        }
        bar.inc(u64::from(entry.cells));
    }
    bar.finish_and_clear();
    bad
}

/// Fetches shard `index` (size and hash against the manifest) and decodes all of it: every block, every
/// label code against its column's categories, every cell's origin against the source files. A store
/// that rewrote a shard and its manifest entry together passes the hash check; this is what catches it.
fn decode_shard(corpus: &Corpus, index: usize) -> Result<(), String> {
    let manifest = &corpus.manifest;
    let shard = corpus.fetch_shard(index).map_err(|e| e.to_string())?;
    let mut block = cellfleet_shared::corpus::shard::Block::default();
    let mut zstd =
        cellfleet_shared::corpus::shard::BlockDecompressor::new().map_err(|e| e.to_string())?;
    for b in 0..shard.n_blocks() {
        shard
            .read_block_into(b, &mut block, &mut zstd)
            .map_err(|e| e.to_string())?;
        for cell in 0..block.cells {
            if let Some(bin) = block
                .bins_of(cell)
                .iter()
                .find(|&&bin| u16::from(bin) >= manifest.bins.n_bins)
            {
                return Err(format!(
                    "block {b} cell {cell} holds bin {bin}, beyond the corpus's {} bins",
                    manifest.bins.n_bins
                ));
            }
            for (column, &code) in manifest.label_columns.iter().zip(block.labels_of(cell)) {
                if code != MISSING_LABEL && code as usize >= column.categories.len() {
                    return Err(format!(
                        "block {b} cell {cell} has label code {code} for '{}', which has {} categories",
                        column.name,
                        column.categories.len()
                    ));
                }
            }
        }
    }
    let origins = shard.origins().map_err(|e| e.to_string())?;
    if let Some(origin) = origins
        .iter()
        .find(|o| o.source as usize >= manifest.sources.len())
    {
        return Err(format!(
            "cell {} names source file {}, but the corpus has {}",
            origin.name,
            origin.source,
            manifest.sources.len()
        ));
    }
    Ok(())
}

/// Settings of `cellfleet corpus stream`.
#[derive(Debug, Clone)]
pub struct StreamPreview {
    pub order: cellfleet_shared::stream::OrderConfig,
    pub epoch: u32,
    pub mask_ratio: f32,
    pub world: u32,
    pub rank: u32,
    pub batch_size: u32,
    pub batches: usize,
    pub cursor: u64,
}

/// One line per batch: what a rank reads from the cursor on, with a digest of every token array, so two
/// processes (or two machines) can be compared byte for byte.
pub fn stream_lines(corpus: Corpus, preview: &StreamPreview) -> anyhow::Result<Vec<String>> {
    use cellfleet_shared::stream::batch::{Loader, LoaderConfig, MaskConfig, IGNORE_TARGET};
    use cellfleet_shared::stream::{EpochPlan, Partitioner};
    use std::sync::Arc;

    let plan = Arc::new(EpochPlan::new(
        &corpus.manifest,
        preview.order,
        preview.epoch,
    )?);
    let partitioner = Partitioner {
        epoch_len: plan.len(),
    };
    let mut ranges = Vec::new();
    let mut cursor = preview.cursor;
    for _ in 0..preview.batches {
        let global = partitioner.global_batch(cursor, preview.world, preview.batch_size);
        if global.is_empty() {
            break;
        }
        ranges.push(Partitioner::rank_slice(
            &global,
            preview.world,
            preview.rank,
        ));
        cursor = global.end;
    }
    let config = LoaderConfig {
        mask: MaskConfig::masking_only(preview.mask_ratio),
        ..LoaderConfig::default()
    };
    let loader = Loader::spawn(Arc::new(corpus), plan.clone(), ranges, config)?;
    let mut lines = vec![format!(
        "epoch {} has {} samples (augmentation x{}); rank {}/{} from cursor {}",
        preview.epoch,
        plan.len(),
        preview.order.augmentation,
        preview.rank,
        preview.world,
        preview.cursor
    )];
    for batch in loader {
        let batch = batch?;
        let mut digest = blake3::Hasher::new();
        for v in &batch.gene_ids {
            digest.update(&v.to_le_bytes());
        }
        digest.update(&batch.input_bins);
        digest.update(&batch.target_bins);
        let masked = batch
            .target_bins
            .iter()
            .filter(|&&t| t != IGNORE_TARGET)
            .count();
        let ids: Vec<String> = batch
            .sample_ids
            .iter()
            .map(|s| format!("{}.{}", s.cell, s.clone))
            .collect();
        lines.push(format!(
            "positions {}..{} masked {masked}/{} tokens digest {} samples(cell.clone) {}",
            batch.positions.start,
            batch.positions.end,
            batch.samples * (batch.seq_len - 1),
            &digest.finalize().to_hex()[..16],
            ids.join(" ")
        ));
    }
    Ok(lines)
}
