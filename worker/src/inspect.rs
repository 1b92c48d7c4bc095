//! `cellfleet corpus inspect` and `cellfleet corpus verify`.

use std::fmt::Write as _;

use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::manifest::VocabularySource;

use crate::progress;

/// A human summary of a corpus.
pub fn summary(corpus: &Corpus) -> String {
    let m = &corpus.manifest;
    let mut out = String::new();
    let stored: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let _ = writeln!(out, "corpus        {}", corpus.store.url());
    let _ = writeln!(out, "format        v{}{}", m.format_version, if m.synthetic { "  (SYNTHETIC: for scale tests and benchmarks only)" } else { "" });
    let _ = writeln!(out, "cells         {}", m.total_cells);
    let vocab = match &m.vocabulary {
        VocabularySource::HighlyVariable { requested, candidates } => format!("top {requested} highly variable of {candidates} genes"),
        VocabularySource::Fixed { file, missing_in_input } => format!("fixed list {file} ({missing_in_input} absent from input)"),
    };
    let _ = writeln!(out, "genes         {} ({vocab})", m.genes.len());
    let preview: Vec<&str> = m.genes.iter().take(8).map(String::as_str).collect();
    let _ = writeln!(out, "              {}{}", preview.join(", "), if m.genes.len() > 8 { ", ..." } else { "" });
    let _ = writeln!(out, "bins          {} ({})", m.bins.n_bins, m.bins.rule);
    let _ = writeln!(out, "shards        {} ({:.1} MiB stored, {} cells per block)", m.shards.len(), stored as f64 / (1 << 20) as f64, m.block_cells);
    for col in &m.label_columns {
        let preview: Vec<&str> = col.categories.iter().take(6).map(String::as_str).collect();
        let _ = writeln!(out, "label         {} ({} categories: {}{})", col.name, col.categories.len(), preview.join(", "), if col.categories.len() > 6 { ", ..." } else { "" });
    }
    for s in &m.sources {
        let _ = writeln!(out, "source        {} ({} cells x {} genes, {} via {}, {:?}; blake3 {}...)", s.path, s.cells, s.genes, s.matrix, s.matrix_reason, s.value_kind, &s.blake3[..12]);
    }
    let _ = write!(out, "manifest hash {}", m.content_hash());
    out
}

/// Re-hashes every shard; returns the names of the bad ones with the reason.
pub fn verify(corpus: &Corpus) -> Vec<(String, String)> {
    let bar = progress::bar(corpus.total_cells(), "verifying shards");
    let mut bad = Vec::new();
    for (i, entry) in corpus.manifest.shards.iter().enumerate() {
        if let Err(e) = corpus.fetch_shard(i) {
            bad.push((entry.name.clone(), e.to_string()));
        }
        bar.inc(u64::from(entry.cells));
    }
    bar.finish_and_clear();
    bad
}
