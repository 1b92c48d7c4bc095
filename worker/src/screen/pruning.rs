//! Pruning curves, as the gene-selection paper evaluated its attributions: genes are dropped from the
//! classifier's input in an order (by attribution, least important first and reversed; by how variable
//! they are, the HVG rank, both ways; a seeded random order), and the classifier's accuracy and macro-F1
//! on held-out cells are traced against the fraction dropped. A dropped gene's token is masked out of
//! attention (the padding mask), so the kept genes keep their positions.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::screen::{RankingFile, ScreenSpec, RANKING_FILE};
use cellfleet_shared::storage::{S3Options, Store};
use cellfleet_shared::stream::batch::SequenceLayout;
use cellfleet_shared::stream::SplitPart;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::compute::load_classifier_at;
use super::plan::{cell_names_and_labels, read_cells};
use crate::model::Mode;
use crate::train::classification_metrics::classification_report;

/// One pruning order's curve.
#[derive(Debug, Clone)]
pub struct PruningCurve {
    /// What is dropped first: `attribution_least_first` (the least important genes by mean absolute
    /// attribution), `attribution_most_first`, `hvg_least_first` (the least variable genes), `hvg_most_first`
    /// or `random`.
    pub order: &'static str,
    pub fractions: Vec<f64>,
    pub genes_dropped: Vec<usize>,
    pub accuracy: Vec<f64>,
    pub macro_f1: Vec<f64>,
}

impl PruningCurve {
    /// The trapezoid area under a curve over the fractions, divided by their span (the mean height).
    pub fn area(values: &[f64], fractions: &[f64]) -> f64 {
        let span = fractions.last().unwrap_or(&0.0) - fractions.first().unwrap_or(&0.0);
        if span <= 0.0 {
            return values.first().copied().unwrap_or(f64::NAN);
        }
        fractions
            .windows(2)
            .zip(values.windows(2))
            .map(|(f, v)| (f[1] - f[0]) * (v[0] + v[1]) / 2.0)
            .sum::<f64>()
            / span
    }
}

/// The fields of `screen.json` a pruning run reads.
#[derive(Deserialize)]
struct ScreenRecordFile {
    spec: ScreenSpec,
}

/// What the curves were computed on.
pub struct PruningRun {
    pub curves: Vec<PruningCurve>,
    pub cells: usize,
    pub classes: Vec<String>,
    pub label_column: String,
}

/// Computes the pruning curves of an attribution screen's results at `results` (a directory or an
/// object-store location holding `screen.json` and `attribution_ranking.json`), on up to `max_cells`
/// held-out cells of the classifier's split.
pub fn pruning_curves(
    results: &str,
    fractions: &[f64],
    max_cells: usize,
    seed: u64,
    s3: &S3Options,
) -> anyhow::Result<PruningRun> {
    if fractions.is_empty() || fractions.iter().any(|f| !(0.0..1.0).contains(f)) {
        bail!("--fractions: each must be in [0, 1) (1 would drop every gene), got {fractions:?}");
    }
    let store = Store::open(results, s3).with_context(|| format!("cannot open {results}"))?;
    let record: ScreenRecordFile = serde_json::from_slice(
        &store
            .get("screen.json")
            .with_context(|| format!("{results}: no screen.json (the results of a screen)"))?,
    )
    .with_context(|| format!("{results}/screen.json is not a screen's record"))?;
    let Some(attribution) = record.spec.attribution.clone() else {
        bail!("{results} holds the results of a screen without [attribution]: pruning curves need an attribution screen's");
    };
    let ranking: RankingFile = serde_json::from_slice(
        &store
            .get(RANKING_FILE)
            .with_context(|| format!("{results}: no {RANKING_FILE}"))?,
    )
    .with_context(|| format!("{results}/{RANKING_FILE} is not an attribution ranking"))?;
    let (model, info) = load_classifier_at(&attribution.classifier, None, s3, Device::Cpu)?;
    if model.config.layout != SequenceLayout::Full {
        bail!("the classifier reads the expressed-gene layout; pruning curves drop genes of the full layout");
    }
    let column = info
        .label_column
        .clone()
        .context("the attribution screen's classifier has no label column")?;
    let corpus = Corpus::open(&record.spec.corpus, s3)
        .with_context(|| format!("corpus = {:?}", record.spec.corpus))?;
    if corpus.manifest.content_hash() != ranking.corpus_manifest_blake3 {
        bail!(
            "corpus {} changed since the attribution screen ran",
            record.spec.corpus
        );
    }
    let n_genes = model.config.n_genes;
    if ranking.abs_importance.len() != n_genes {
        bail!(
            "{RANKING_FILE} ranks {} genes, the classifier reads {n_genes}",
            ranking.abs_importance.len()
        );
    }

    // Held-out cells of the classifier's split with a label it knows: a seeded sample.
    let held_out: Vec<u64> = (0..corpus.total_cells())
        .filter(|&c| info.split.part_of(c) == SplitPart::Eval)
        .collect();
    let (_, labels) = cell_names_and_labels(&corpus, &held_out)?;
    let values = &labels
        .iter()
        .find(|(name, _)| *name == column)
        .with_context(|| {
            format!(
                "corpus {} has no label column {column:?}",
                record.spec.corpus
            )
        })?
        .1;
    let mut labelled: Vec<(u64, usize)> = held_out
        .iter()
        .zip(values)
        .filter_map(|(&c, v)| info.classes.iter().position(|k| k == v).map(|k| (c, k)))
        .collect();
    if labelled.is_empty() {
        bail!(
            "no held-out cell of corpus {} has a {column} the classifier knows",
            record.spec.corpus
        );
    }
    shuffle(&mut labelled, seed);
    labelled.truncate(max_cells.max(1));
    labelled.sort_unstable();
    let cells: Vec<u64> = labelled.iter().map(|&(c, _)| c).collect();
    let truth: Vec<usize> = labelled.iter().map(|&(_, k)| k).collect();
    let bins = read_cells(&corpus, &cells)?;
    let states: Vec<&[u8]> = cells.iter().map(|c| bins[c].as_slice()).collect();

    // The orders, least important (or least variable) first.
    let by = |scores: &[f64]| -> Vec<usize> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        order
    };
    let attribution_order = by(&ranking.abs_importance);
    let dispersion: Vec<f64> = (0..n_genes)
        .map(|g| {
            let values: Vec<f64> = states.iter().map(|s| f64::from(s[g])).collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
            if mean > 0.0 {
                var / mean
            } else {
                0.0
            }
        })
        .collect();
    let hvg_order = by(&dispersion);
    let mut random_order: Vec<usize> = (0..n_genes).collect();
    shuffle(&mut random_order, seed ^ 0x9e37_79b9);
    let reversed = |o: &[usize]| o.iter().rev().copied().collect::<Vec<_>>();
    let orders: Vec<(&'static str, Vec<usize>)> = vec![
        ("attribution_least_first", attribution_order.clone()),
        ("attribution_most_first", reversed(&attribution_order)),
        ("hvg_least_first", hvg_order.clone()),
        ("hvg_most_first", reversed(&hvg_order)),
        ("random", random_order),
    ];
    let n_classes = info.classes.len();
    let batch = 64;
    let mut curves = Vec::with_capacity(orders.len());
    for (name, order) in orders {
        let started = std::time::Instant::now();
        let mut curve = PruningCurve {
            order: name,
            fractions: fractions.to_vec(),
            genes_dropped: Vec::new(),
            accuracy: Vec::new(),
            macro_f1: Vec::new(),
        };
        for &fraction in fractions {
            let dropped = ((fraction * n_genes as f64).round() as usize).min(n_genes - 1);
            let mut keep = vec![true; n_genes + 1];
            for &g in &order[..dropped] {
                keep[g + 1] = false;
            }
            let mut probabilities = Vec::with_capacity(cells.len() * n_classes);
            for chunk in states.chunks(batch) {
                let mut tokens = super::steer::full_layout_tokens(&model, chunk, |_, _| false);
                let valid: Vec<bool> = (0..chunk.len())
                    .flat_map(|_| keep.iter().copied())
                    .collect();
                tokens.valid = Some(
                    Tensor::from_slice(&valid)
                        .view([chunk.len() as i64, (n_genes + 1) as i64])
                        .to_device(model.device()),
                );
                let p = tch::no_grad(|| -> anyhow::Result<Tensor> {
                    let hidden = model.forward(&tokens, Mode::EVAL).hidden;
                    Ok(model.class_logits(&hidden, false)?.softmax(-1, Kind::Float))
                })?;
                probabilities.extend(Vec::<f32>::try_from(p.flatten(0, -1))?);
            }
            let report = classification_report(&probabilities, n_classes, &truth);
            curve.genes_dropped.push(dropped);
            curve.accuracy.push(report.accuracy);
            curve.macro_f1.push(report.macro_f1);
        }
        eprintln!(
            "pruning by {name}: accuracy {} (area {:.3}) in {:.1}s",
            curve
                .accuracy
                .iter()
                .map(|a| format!("{a:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            PruningCurve::area(&curve.accuracy, &curve.fractions),
            started.elapsed().as_secs_f64()
        );
        curves.push(curve);
    }
    Ok(PruningRun {
        curves,
        cells: cells.len(),
        classes: info.classes.clone(),
        label_column: column,
    })
}

/// A seeded Fisher-Yates shuffle (splitmix64 draws).
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Writes `pruning.parquet` (one row per order and fraction) and `pruning.svg` (accuracy and macro-F1
/// against the fraction dropped, one line per order) to `out`.
pub fn write_pruning(run: &PruningRun, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    super::tables::write_pruning_outputs(run, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_are_mean_heights_and_shuffles_are_seeded_permutations() {
        let fractions = [0.0, 0.5, 1.0];
        assert!((PruningCurve::area(&[1.0, 1.0, 1.0], &fractions) - 1.0).abs() < 1e-12);
        assert!((PruningCurve::area(&[1.0, 0.5, 0.0], &fractions) - 0.5).abs() < 1e-12);
        let mut a: Vec<u32> = (0..20).collect();
        let mut b = a.clone();
        shuffle(&mut a, 7);
        shuffle(&mut b, 7);
        assert_eq!(a, b);
        assert_ne!(a, (0..20).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
    }
}
