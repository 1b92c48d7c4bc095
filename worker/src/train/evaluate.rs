//! Held-out evaluation with the baselines results are read against: masked bins next to a per-gene
//! marginal-frequency predictor; cell states next to the majority class and multinomial logistic
//! regression.

use std::sync::Arc;

use anyhow::{bail, Context};
use cellfleet_shared::corpus::manifest::MISSING_LABEL;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::stream::batch::{
    Batch, Loader, LoaderConfig, MaskConfig, SequenceLayout, IGNORE_TARGET,
};
use cellfleet_shared::stream::{CellSplit, EpochPlan, OrderConfig, Partitioner, SplitPart};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::model::{CellModel, Mode};
use crate::train::batches::batch_tensors;
use crate::train::classification_metrics::{classification_report, ClassificationReport};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::saved_model::ModelInfo;

/// Masked-bin quality on the held-out cells next to the per-gene marginal-frequency predictor.
#[derive(Debug, Clone, Serialize)]
pub struct MaskedBinReport {
    pub eval_cells: u64,
    pub masked_tokens: u64,
    pub model_cross_entropy: f64,
    pub model_accuracy: f64,
    /// Per-gene bin frequencies of the training cells (add-one smoothed).
    pub marginal_cross_entropy: f64,
    pub marginal_accuracy: f64,
    /// The model's sequence layout; its masked tokens are the tokens of that layout, and the marginal
    /// is counted over the same tokens.
    pub layout: String,
    /// Masked tokens of expressed genes (true bin > 0), and the cross-entropies on them alone: the same
    /// set of tokens in either layout, so models of both layouts compare on it.
    pub expressed_tokens: u64,
    pub model_cross_entropy_expressed: f64,
    pub marginal_cross_entropy_expressed: f64,
}

/// Evaluates masked-bin prediction on the held-out split: every held-out cell (or the first
/// `max_cells` of the split's order, the same cells for any model of the run's seed) in vocabulary
/// order, masked at `mask_ratio` in `ceil(1 / mask_ratio)` passes with independent masks.
pub fn evaluate_masked_bins(
    model: &CellModel,
    corpus: Arc<Corpus>,
    split: CellSplit,
    seed: u64,
    mask_ratio: f32,
    batch_size: u32,
    max_cells: Option<u64>,
) -> anyhow::Result<MaskedBinReport> {
    let n_genes = corpus.manifest.genes.len();
    let n_bins = usize::from(corpus.manifest.bins.n_bins);
    let layout = model.config.layout;
    // Marginal frequencies from every training cell, over the tokens the layout holds.
    let mut counts = vec![1.0f64; n_genes * n_bins];
    for batch in split_pass(
        &corpus,
        seed,
        split,
        SplitPart::Train,
        layout,
        0.0,
        batch_size,
        0,
        None,
    )? {
        let batch = batch?;
        for (g, b) in batch.gene_ids.iter().zip(&batch.input_bins) {
            // Gene id 0 is [CLS] and padding.
            if *g > 0 {
                counts[(usize::from(*g) - 1) * n_bins + usize::from(*b)] += 1.0;
            }
        }
    }
    let mut log_marginal = vec![0.0f64; counts.len()];
    let mut marginal_argmax = vec![0usize; n_genes];
    for g in 0..n_genes {
        let row = &counts[g * n_bins..(g + 1) * n_bins];
        let total: f64 = row.iter().sum();
        for (b, c) in row.iter().enumerate() {
            log_marginal[g * n_bins + b] = (c / total).ln();
        }
        marginal_argmax[g] = (0..n_bins)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
    }
    let mut report = MaskedBinReport {
        eval_cells: 0,
        masked_tokens: 0,
        model_cross_entropy: 0.0,
        model_accuracy: 0.0,
        marginal_cross_entropy: 0.0,
        marginal_accuracy: 0.0,
        layout: layout.name().to_string(),
        expressed_tokens: 0,
        model_cross_entropy_expressed: 0.0,
        marginal_cross_entropy_expressed: 0.0,
    };
    let device = model.device();
    // Each pass masks other positions (the mask is keyed by the epoch), so that every position is
    // scored about once and the figure does not hang on one draw of 15% of the tokens.
    let passes = (1.0 / f64::from(mask_ratio.max(0.01))).ceil() as u32;
    for (pass, batch) in (0..passes).flat_map(|pass| {
        let loader = split_pass(
            &corpus,
            seed,
            split,
            SplitPart::Eval,
            layout,
            mask_ratio,
            batch_size,
            pass,
            max_cells,
        );
        let (loader, failed) = match loader {
            Ok(l) => (Some(l), None),
            Err(e) => (None, Some(Err(e))),
        };
        failed
            .into_iter()
            .chain(
                loader
                    .into_iter()
                    .flatten()
                    .map(|b| b.map_err(anyhow::Error::from)),
            )
            .map(move |b| (pass, b))
    }) {
        let batch = batch?;
        if pass == 0 {
            report.eval_cells += batch.samples as u64;
        }
        let (tokens, targets) = batch_tensors(&batch, device);
        let (nll, nll_expressed, hits, count) = tch::no_grad(|| {
            let hidden = model.forward(&tokens, Mode::EVAL).hidden;
            let masked = targets.ne(i64::from(IGNORE_TARGET));
            let logits = model.bin_logits(&hidden.index(&[Some(masked.shallow_clone())]), false);
            let truth = targets.masked_select(&masked);
            let token_nll = logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &truth.unsqueeze(1), false)
                .squeeze_dim(1)
                .neg();
            let nll = token_nll.sum(Kind::Double).double_value(&[]);
            let nll_expressed = token_nll
                .masked_select(&truth.gt(0))
                .sum(Kind::Double)
                .double_value(&[]);
            let hits = logits
                .argmax(-1, false)
                .eq_tensor(&truth)
                .sum(Kind::Int64)
                .int64_value(&[]);
            (nll, nll_expressed, hits, truth.size()[0])
        });
        report.model_cross_entropy += nll;
        report.model_cross_entropy_expressed += nll_expressed;
        report.model_accuracy += hits as f64;
        report.masked_tokens += count as u64;
        for (g, t) in batch.gene_ids.iter().zip(&batch.target_bins) {
            if *t != IGNORE_TARGET {
                let g = usize::from(*g) - 1;
                let log_p = log_marginal[g * n_bins + usize::from(*t)];
                if *t > 0 {
                    report.expressed_tokens += 1;
                    report.marginal_cross_entropy_expressed -= log_p;
                }
                report.marginal_cross_entropy -= log_p;
                report.marginal_accuracy +=
                    f64::from(u8::from(marginal_argmax[g] == usize::from(*t)));
            }
        }
    }
    if report.masked_tokens == 0 {
        bail!("no masked tokens in the held-out split; raise the eval fraction or the mask ratio");
    }
    let n = report.masked_tokens as f64;
    report.model_cross_entropy /= n;
    report.model_accuracy /= n;
    report.marginal_cross_entropy /= n;
    report.marginal_accuracy /= n;
    let expressed = report.expressed_tokens.max(1) as f64;
    report.model_cross_entropy_expressed /= expressed;
    report.marginal_cross_entropy_expressed /= expressed;
    Ok(report)
}

/// Every cell of one side of the split once, in vocabulary order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn split_pass(
    corpus: &Arc<Corpus>,
    seed: u64,
    split: CellSplit,
    part: SplitPart,
    sequence: SequenceLayout,
    mask_ratio: f32,
    batch_size: u32,
    epoch: u32,
    max_cells: Option<u64>,
) -> anyhow::Result<Loader> {
    // No clones: evaluation reads every cell once, in vocabulary order.
    let order = OrderConfig {
        seed,
        augmentation: 1,
        window_units: 16,
    };
    let plan = Arc::new(EpochPlan::for_part(
        &corpus.manifest,
        order,
        epoch,
        split,
        part,
    )?);
    let partitioner = Partitioner {
        epoch_len: plan.len(),
    };
    let mut ranges = Vec::new();
    let mut cursor = 0;
    let end = max_cells.unwrap_or(u64::MAX);
    loop {
        let batch = u64::from(batch_size).min(end.saturating_sub(cursor)) as u32;
        let range = partitioner.global_batch(cursor, 1, batch);
        if range.is_empty() {
            break;
        }
        cursor = range.end;
        ranges.push(range);
    }
    let config = LoaderConfig {
        sequence,
        mask: MaskConfig::masking_only(mask_ratio),
        ..LoaderConfig::default()
    };
    Ok(Loader::spawn(corpus.clone(), plan, ranges, config)?)
}

pub(crate) fn label_index(corpus: &Corpus, column: &str) -> anyhow::Result<(usize, Vec<String>)> {
    let columns = &corpus.manifest.label_columns;
    let index = columns
        .iter()
        .position(|c| c.name == column)
        .with_context(|| {
            format!(
                "corpus {} has no label column `{column}` (it has: {})",
                corpus.store.url(),
                columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    Ok((index, columns[index].categories.clone()))
}

pub(crate) fn batch_labels(batch: &Batch, index: usize, columns: usize) -> Vec<i64> {
    (0..batch.samples)
        .map(|i| match batch.labels[i * columns + index] {
            MISSING_LABEL => -100,
            code => i64::from(code),
        })
        .collect()
}

/// Cell-state classification on the held-out split, with its baselines.
#[derive(Debug, Clone, Serialize)]
pub struct ClassificationEval {
    pub label_column: String,
    pub classes: Vec<String>,
    pub model: ClassificationReport,
    /// Accuracy of always predicting the most frequent training class.
    pub majority_accuracy: f64,
    /// Multinomial logistic regression on the same binned inputs (bin / n_bins per gene, standardised).
    pub logistic_regression: ClassificationReport,
}

/// Dense `[cells, genes]` features (bin / n_bins in vocabulary order) and labels of one split side.
pub(crate) struct LabelledCells {
    features: Vec<f32>,
    labels: Vec<usize>,
}

/// Evaluates a fine-tuned model's classifier on the held-out cells of its split.
pub fn evaluate_classifier(
    model: &CellModel,
    corpus: Arc<Corpus>,
    info: &ModelInfo,
    batch_size: u32,
    seed: u64,
) -> anyhow::Result<ClassificationEval> {
    let column = info.label_column.as_deref().context(
        "this model has no classifier; fine-tune it with `cellfleet finetune --label-col`",
    )?;
    let (label_idx, classes) = label_index(&corpus, column)?;
    if classes != info.classes {
        bail!(
            "label column `{column}` of {} has other categories than the model was fine-tuned on",
            corpus.store.url()
        );
    }
    let n_classes = classes.len();
    let n_genes = corpus.manifest.genes.len();
    let n_bins = f32::from(corpus.manifest.bins.n_bins);
    let columns = corpus.manifest.label_columns.len();
    let gather = |part: SplitPart, probs: Option<&mut Vec<f32>>| -> anyhow::Result<LabelledCells> {
        let mut cells = LabelledCells {
            features: Vec::new(),
            labels: Vec::new(),
        };
        let mut probs = probs;
        let layout = model.config.layout;
        for batch in split_pass(
            &corpus, seed, info.split, part, layout, 0.0, batch_size, 0, None,
        )? {
            // The logistic-regression baseline holds its training cells densely: cap them.
            if probs.is_none() && cells.labels.len() >= LOGREG_MAX_CELLS {
                break;
            }
            let batch = batch?;
            let labels = batch_labels(&batch, label_idx, columns);
            let keep: Vec<usize> = (0..batch.samples).filter(|&i| labels[i] >= 0).collect();
            if let Some(out) = probs.as_deref_mut() {
                let (tokens, _) = batch_tensors(&batch, model.device());
                let p = tch::no_grad(|| {
                    let hidden = model.forward(&tokens, Mode::EVAL).hidden;
                    model
                        .class_logits(&hidden, false)
                        .map(|l| l.softmax(-1, Kind::Float))
                })?;
                let p = Vec::<f32>::try_from(p.to_device(Device::Cpu).flatten(0, -1))?;
                for &i in &keep {
                    out.extend_from_slice(&p[i * n_classes..(i + 1) * n_classes]);
                }
            }
            for &i in &keep {
                let row = i * batch.seq_len;
                // Genes a row leaves out (expressed layout) are unexpressed: feature 0.
                let mut features = vec![0.0f32; n_genes];
                for t in 1..batch.lengths[i] as usize {
                    let gene = usize::from(batch.gene_ids[row + t]) - 1;
                    features[gene] = f32::from(batch.input_bins[row + t]) / n_bins;
                }
                cells.features.extend(features);
                cells.labels.push(labels[i] as usize);
            }
        }
        Ok(cells)
    };
    let train = gather(SplitPart::Train, None)?;
    let mut probs = Vec::new();
    let held_out = gather(SplitPart::Eval, Some(&mut probs))?;
    if held_out.labels.is_empty() || train.labels.is_empty() {
        bail!("the split leaves no labelled cells on one side; change split.eval_fraction");
    }
    let report = classification_report(&probs, n_classes, &held_out.labels);
    let mut frequency = vec![0usize; n_classes];
    for &l in &train.labels {
        frequency[l] += 1;
    }
    let majority = (0..n_classes).max_by_key(|&c| frequency[c]).unwrap_or(0);
    let majority_accuracy = held_out.labels.iter().filter(|&&l| l == majority).count() as f64
        / held_out.labels.len() as f64;
    let lr_probs = logistic_regression(&train, &held_out, n_genes, n_classes, seed);
    Ok(ClassificationEval {
        label_column: column.to_string(),
        classes,
        model: report,
        majority_accuracy,
        logistic_regression: classification_report(&lr_probs, n_classes, &held_out.labels),
    })
}

/// Training cells of the logistic-regression baseline at most (a random sample: the plan order is
/// shuffled), so its dense feature matrix stays bounded on large corpora.
const LOGREG_MAX_CELLS: usize = 20_000;

/// Full-batch multinomial logistic regression (standardised features, L2 penalty 1e-3 on the weights,
/// 300 Adam steps at lr 0.05) fitted on `train`; returns class probabilities of `test`.
fn logistic_regression(
    train: &LabelledCells,
    test: &LabelledCells,
    n_genes: usize,
    n_classes: usize,
    seed: u64,
) -> Vec<f32> {
    tch::manual_seed(seed as i64);
    let as_matrix = |c: &LabelledCells| {
        Tensor::from_slice(&c.features).view([c.labels.len() as i64, n_genes as i64])
    };
    let x = as_matrix(train);
    let mean = x.mean_dim(0, true, Kind::Float);
    let std = x.std_dim(0, false, true).clamp_min(1e-6);
    let x = (x - &mean) / &std;
    let y = Tensor::from_slice(&train.labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
    let w = Tensor::zeros(
        [n_genes as i64, n_classes as i64],
        (Kind::Float, Device::Cpu),
    )
    .set_requires_grad(true);
    let b = Tensor::zeros([n_classes as i64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut optimizer = AdamW::new(
        vec![
            ("w".into(), w.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    );
    for _ in 0..300 {
        let logits = x.matmul(&w) + &b;
        let loss = logits.cross_entropy_for_logits(&y) + w.square().sum(Kind::Float) * 1e-3;
        optimizer.zero_grad();
        loss.backward();
        optimizer.step(0.05);
    }
    let xt = (as_matrix(test) - &mean) / &std;
    let probs = tch::no_grad(|| (xt.matmul(&w) + &b).softmax(-1, Kind::Float));
    Vec::<f32>::try_from(probs.flatten(0, -1)).expect("f32 probabilities")
}
