//! `cellfleet bench train`: training-step throughput of the model against the same architecture in
//! plain eager PyTorch (`bench/train_baseline.py`), both as child processes on the same batches, thread
//! count and device, in alternating rounds; and, on a corpus, the expressed token layout against the full
//! one. Throughput is reported in cells/s and real tokens/s, with model FLOP/s and MFU (FLOP model in
//! `ModelConfig::forward_flops`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::batch::{
    Batch, Loader, LoaderConfig, MaskConfig, SequenceLayout, IGNORE_TARGET,
};
use cellfleet_shared::stream::{EpochPlan, OrderConfig, Partitioner};

use super::child::ChildRun;
use super::child::{bench_dir, python, run_measured};

/// What both sides of `bench train` run.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TrainBenchSpec {
    pub(crate) model: crate::model::ModelConfig,
    pub(crate) batch_size: usize,
    pub(crate) steps: usize,
    pub(crate) warmup_steps: usize,
    pub(crate) threads: usize,
    pub(crate) seed: u64,
    pub(crate) mask_ratio: f64,
    /// `cpu` or `cuda[:N]`; on CUDA both sides run bf16 matrix products.
    #[serde(default = "cpu")]
    pub(crate) device: String,
    /// Fixed batches read from a corpus (`BenchBatches` JSON), cycled; `None`: one random full-layout
    /// batch.
    #[serde(default)]
    pub(crate) batches: Option<PathBuf>,
}

fn cpu() -> String {
    "cpu".into()
}

/// Batches as both sides read them.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct BenchBatches {
    pub(crate) batches: Vec<BenchBatch>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct BenchBatch {
    samples: usize,
    seq_len: usize,
    gene_ids: Vec<u16>,
    input_bins: Vec<u8>,
    target_bins: Vec<u8>,
    lengths: Vec<u32>,
}

impl BenchBatch {
    fn from_batch(b: &Batch) -> Self {
        Self {
            samples: b.samples,
            seq_len: b.seq_len,
            gene_ids: b.gene_ids.clone(),
            input_bins: b.input_bins.clone(),
            target_bins: b.target_bins.clone(),
            lengths: b.lengths.clone(),
        }
    }
    fn to_batch(&self) -> Batch {
        Batch {
            samples: self.samples,
            seq_len: self.seq_len,
            lengths: self.lengths.clone(),
            gene_ids: self.gene_ids.clone(),
            input_bins: self.input_bins.clone(),
            target_bins: self.target_bins.clone(),
            ..Batch::default()
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TrainBenchResult {
    pub(crate) parameters: i64,
    pub(crate) step_seconds: f64,
    pub(crate) cells_per_s: f64,
    /// Real (unpadded) tokens per second.
    pub(crate) tokens_per_s: f64,
    pub(crate) final_loss: f64,
}

/// The cellfleet training step on fixed batches (the loop of `train::pretrain` without the loader, so
/// both sides time the same work).
pub(crate) fn train_child(spec: &TrainBenchSpec) -> anyhow::Result<TrainBenchResult> {
    use crate::model::{parse_device, CellModel, Mode, Tokens};
    use crate::train::batches::batch_tensors;
    use crate::train::optim::{AdamW, AdamWConfig};
    use tch::{Device, Kind, Tensor};
    tch::set_num_threads(spec.threads as i32);
    tch::manual_seed(spec.seed as i64);
    let device = parse_device(&spec.device)?;
    let bf16 = device != Device::Cpu;
    let c = &spec.model;
    let model = CellModel::new(c.clone(), device)?;
    let mut optimizer = AdamW::new(model.trainable_parameters(), AdamWConfig::default());
    let batches: Vec<(Tokens, Tensor, usize, usize)> = match &spec.batches {
        Some(path) => {
            let file: BenchBatches = serde_json::from_slice(&std::fs::read(path)?)?;
            file.batches
                .iter()
                .map(|b| {
                    let batch = b.to_batch();
                    let (tokens, targets) = batch_tensors(&batch, device);
                    (tokens, targets, batch.samples, batch.real_tokens())
                })
                .collect()
        }
        None => {
            let (b, l) = (spec.batch_size as i64, c.n_genes as i64 + 1);
            let genes = Tensor::arange(l, (Kind::Int64, device)).repeat([b, 1]);
            let bins = Tensor::randint(c.n_bins as i64, [b, l], (Kind::Int64, device));
            let masked = Tensor::rand([b, l], (Kind::Float, device)).lt(spec.mask_ratio);
            let _ = masked.select(1, 0).fill_(0);
            let inputs = bins.masked_fill(&masked, c.n_bins as i64);
            let _ = inputs.select(1, 0).fill_(c.n_bins as i64 + 1);
            let targets = bins.masked_fill(&masked.logical_not(), i64::from(IGNORE_TARGET));
            let tokens = Tokens {
                gene_ids: genes,
                bins: inputs,
                valid: None,
            };
            vec![(tokens, targets, b as usize, (b * l) as usize)]
        }
    };
    let mut times = Vec::new();
    let (mut cells, mut tokens_done) = (0usize, 0usize);
    let mut last = 0.0;
    for step in 0..spec.warmup_steps + spec.steps {
        let (tokens, targets, samples, real) = &batches[step % batches.len()];
        let t0 = Instant::now();
        let forward = model.forward(tokens, Mode { train: true, bf16 });
        let masked = targets.ne(i64::from(IGNORE_TARGET));
        let rows = forward.hidden.index(&[Some(masked.shallow_clone())]);
        let loss = model
            .bin_logits(&rows, bf16)
            .cross_entropy_for_logits(&targets.masked_select(&masked))
            + &forward.aux_loss * 0.01;
        optimizer.zero_grad();
        loss.backward();
        optimizer.clip_grad_norm(1.0);
        optimizer.step(1e-4);
        // Reading the loss waits for the device.
        last = loss.double_value(&[]);
        if step >= spec.warmup_steps {
            times.push(t0.elapsed().as_secs_f64());
            cells += samples;
            tokens_done += real;
        }
    }
    let total: f64 = times.iter().sum();
    Ok(TrainBenchResult {
        parameters: model.parameter_count(),
        step_seconds: total / times.len().max(1) as f64,
        cells_per_s: cells as f64 / total,
        tokens_per_s: tokens_done as f64 / total,
        final_loss: last,
    })
}

/// `bench train` settings beyond the child spec.
pub(crate) struct TrainBench {
    pub(crate) spec: TrainBenchSpec,
    pub(crate) baseline: bool,
    /// Read batches from this corpus and compare the layouts.
    pub(crate) corpus: Option<String>,
    pub(crate) unexpressed: u32,
    /// Alternating rounds (a fresh child per side per round).
    pub(crate) rounds: usize,
    /// Skip the full layout (its steps are slow at large vocabularies).
    pub(crate) no_full: bool,
}

/// Distinct batches each side cycles through.
const BENCH_BATCHES: usize = 4;

/// `BENCH_BATCHES` masked pretraining batches of `corpus` in `layout` (the loader's own output).
fn corpus_batches(
    corpus: &Arc<Corpus>,
    layout: SequenceLayout,
    batch_size: u32,
    seed: u64,
) -> anyhow::Result<Vec<Batch>> {
    let plan = Arc::new(EpochPlan::new(
        &corpus.manifest,
        OrderConfig {
            seed,
            ..OrderConfig::default()
        },
        0,
    )?);
    let partitioner = Partitioner {
        epoch_len: plan.len(),
    };
    let ranges: Vec<_> = (0..BENCH_BATCHES as u64)
        .map(|i| partitioner.global_batch(i * u64::from(batch_size), 1, batch_size))
        .collect();
    let config = LoaderConfig {
        sequence: layout,
        mask: MaskConfig {
            ratio: 0.15,
            random_share: 0.1,
            keep_share: 0.1,
        },
        ..LoaderConfig::default()
    };
    Loader::spawn(corpus.clone(), plan, ranges, config)?
        .map(|b| b.map_err(anyhow::Error::from))
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    format!("{min:.2}-{max:.2}")
}

pub(crate) fn bench_train(bench: TrainBench) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cellfleet-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_bench(&bench, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// One configuration both sides run: its label, spec file and FLOPs per step.
struct Arm {
    label: String,
    spec_path: PathBuf,
    flops_per_step: f64,
    cells_per_step: f64,
}

fn run_bench(bench: &TrainBench, dir: &std::path::Path) -> anyhow::Result<()> {
    let spec = &bench.spec;
    let mut arms = Vec::new();
    let write_arm = |name: &str,
                     model: crate::model::ModelConfig,
                     batches: Option<Vec<Batch>>|
     -> anyhow::Result<Arm> {
        let (flops_per_step, cells, batches_path) = match &batches {
            Some(list) => {
                let flops: f64 = list
                    .iter()
                    .map(|b| {
                        b.lengths
                            .iter()
                            .map(|&l| model.training_flops(l as usize))
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    / list.len() as f64;
                let real: usize = list.iter().map(|b| b.real_tokens()).sum();
                let slots: usize = list.iter().map(|b| b.samples * b.seq_len).sum();
                let path = dir.join(format!("{name}-batches.json"));
                let file = BenchBatches {
                    batches: list.iter().map(BenchBatch::from_batch).collect(),
                };
                std::fs::write(&path, serde_json::to_vec(&file)?)?;
                let mean_len = real as f64 / list.iter().map(|b| b.samples).sum::<usize>() as f64;
                println!(
                    "  {name}: mean {mean_len:.0} tokens per cell, {:.1}% of row slots padding",
                    100.0 * (slots - real) as f64 / slots as f64
                );
                (flops, list[0].samples as f64, Some(path))
            }
            None => (
                spec.batch_size as f64 * model.training_flops(model.n_genes + 1),
                spec.batch_size as f64,
                None,
            ),
        };
        let arm_spec = TrainBenchSpec {
            model,
            batch_size: spec.batch_size,
            steps: spec.steps,
            warmup_steps: spec.warmup_steps,
            threads: spec.threads,
            seed: spec.seed,
            mask_ratio: spec.mask_ratio,
            device: spec.device.clone(),
            batches: batches_path,
        };
        let spec_path = dir.join(format!("{name}-spec.json"));
        std::fs::write(&spec_path, serde_json::to_vec(&arm_spec)?)?;
        Ok(Arm {
            label: name.to_string(),
            spec_path,
            flops_per_step,
            cells_per_step: cells,
        })
    };
    let c = &spec.model;
    println!(
        "training-step benchmark: d_model {}, {} layers, {} heads, ffn {:?}; {} genes; batch {}; {} threads on {}; {} measured steps after {} warm-up, {} alternating rounds",
        c.d_model, c.n_layers, c.n_heads, c.ffn, c.n_genes, spec.batch_size, spec.threads, spec.device, spec.steps, spec.warmup_steps, bench.rounds
    );
    match &bench.corpus {
        Some(url) => {
            let corpus = Arc::new(Corpus::open(url, &S3Options::default())?);
            if corpus.manifest.genes.len() != c.n_genes
                || usize::from(corpus.manifest.bins.n_bins) != c.n_bins
            {
                bail!(
                    "corpus {url} has {} genes and {} bins; pass --genes {} --bins {}",
                    corpus.manifest.genes.len(),
                    corpus.manifest.bins.n_bins,
                    corpus.manifest.genes.len(),
                    corpus.manifest.bins.n_bins
                );
            }
            println!(
                "batches: {BENCH_BATCHES} masked pretraining batches of {url} ({} cells) per layout, from the loader",
                corpus.total_cells()
            );
            let expressed = SequenceLayout::Expressed {
                unexpressed: bench.unexpressed,
            };
            let mut model = c.clone();
            model.layout = expressed;
            let batches = corpus_batches(&corpus, expressed, spec.batch_size as u32, spec.seed)?;
            arms.push(write_arm("expressed", model, Some(batches))?);
            if !bench.no_full {
                let batches = corpus_batches(
                    &corpus,
                    SequenceLayout::Full,
                    spec.batch_size as u32,
                    spec.seed,
                )?;
                arms.push(write_arm("full", c.clone(), Some(batches))?);
            }
        }
        None => arms.push(write_arm("random", c.clone(), None)?),
    }
    let parse = |run: &ChildRun| -> anyhow::Result<TrainBenchResult> {
        let line = run.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .with_context(|| format!("benchmark child printed {:?}", run.stdout))
    };
    let exe = std::env::current_exe()?;
    let script = bench_dir().join("train_baseline.py");
    // Per arm: cellfleet's and PyTorch's cells/s per round, and their last runs.
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    let mut last: Vec<Option<(TrainBenchResult, ChildRun)>> = arms.iter().map(|_| None).collect();
    let mut last_base: Vec<Option<(TrainBenchResult, ChildRun)>> =
        arms.iter().map(|_| None).collect();
    let mut parameters = None;
    for round in 0..bench.rounds {
        for (a, arm) in arms.iter().enumerate() {
            // The baseline of the full layout at a large vocabulary is minutes per round: the issue's
            // comparison with PyTorch is on the layout that trains.
            let with_baseline = bench.baseline && (a == 0 || bench.corpus.is_none());
            let sides: Vec<bool> = if round % 2 == 0 {
                vec![true, false]
            } else {
                vec![false, true]
            };
            for cellfleet_side in sides {
                if !cellfleet_side && !with_baseline {
                    continue;
                }
                let run = if cellfleet_side {
                    run_measured(
                        Command::new(&exe)
                            .args(["bench", "train-child"])
                            .arg(&arm.spec_path),
                    )?
                } else {
                    run_measured(Command::new(python()).arg(&script).arg(&arm.spec_path))?
                };
                let result = parse(&run)?;
                match parameters {
                    None => parameters = Some(result.parameters),
                    Some(p) if p != result.parameters => {
                        bail!(
                        "the {} side has {} parameters, the other {p}: the architectures differ",
                        if cellfleet_side { "cellfleet" } else { "PyTorch" },
                        result.parameters
                    )
                    }
                    _ => {}
                }
                if cellfleet_side {
                    ours[a].push(result.cells_per_s);
                    last[a] = Some((result, run));
                } else {
                    theirs[a].push(result.cells_per_s);
                    last_base[a] = Some((result, run));
                }
            }
        }
        eprintln!("round {}/{} done", round + 1, bench.rounds);
    }
    let peak = crate::model::measured_peak_tflops(&spec.device, spec.threads)?;
    println!(
        "parameters: {}; FLOP model: 3 x forward, forward per cell of L real tokens = layers x (L x (8 d^2 + ffn) + 4 L^2 d) + 2 L d bins, ffn = top_k x 4 d h (+ 2 d E router) or 4 d h; padding not counted",
        parameters.unwrap_or(0)
    );
    println!(
        "MFU against this device's measured dense GEMM rate: {peak:.3} TFLOP/s ({})",
        if spec.device == "cpu" {
            "f32, same threads"
        } else {
            "bf16"
        }
    );
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>8} {:>9} {:>10}",
        "", "cells/s", "spread", "tokens/s", "TFLOP/s", "MFU", "peak MiB"
    );
    let row =
        |name: String, rates: &Vec<f64>, last: &Option<(TrainBenchResult, ChildRun)>, arm: &Arm| {
            let Some((result, run)) = last else {
                return 0.0;
            };
            let med = median(rates);
            let tflops = med / arm.cells_per_step * arm.flops_per_step / 1e12;
            println!(
                "{:<34} {:>10.2} {:>12} {:>10.0} {:>8.3} {:>8.1}% {:>10.0}",
                name,
                med,
                spread(rates),
                result.tokens_per_s,
                tflops,
                100.0 * tflops / peak,
                run.peak_mib
            );
            med
        };
    let mut medians = Vec::new();
    for (a, arm) in arms.iter().enumerate() {
        let ours_med = row(
            format!("cellfleet, {} layout", arm.label),
            &ours[a],
            &last[a],
            arm,
        );
        let base_med = row(
            format!("PyTorch eager, {} layout", arm.label),
            &theirs[a],
            &last_base[a],
            arm,
        );
        medians.push((ours_med, base_med));
        if base_med > 0.0 {
            let ratios: Vec<f64> = ours[a].iter().zip(&theirs[a]).map(|(o, t)| o / t).collect();
            println!(
                "  cellfleet / PyTorch ({} layout), per round: median {:.2}x (range {})",
                arm.label,
                median(&ratios),
                spread(&ratios)
            );
        }
    }
    if arms.len() == 2 && medians[1].0 > 0.0 {
        let ratios: Vec<f64> = ours[0].iter().zip(&ours[1]).map(|(e, f)| e / f).collect();
        println!(
            "  expressed / full layout (cellfleet cells/s), per round: median {:.2}x (range {})",
            median(&ratios),
            spread(&ratios)
        );
    }
    Ok(())
}
