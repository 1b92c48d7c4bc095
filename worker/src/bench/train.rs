//! `cellfleet bench train`: training-step throughput and peak memory of the model against the same
//! architecture in plain eager PyTorch (`bench/train_baseline.py`), both as child processes on the same
//! batch shape and thread count.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

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
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TrainBenchResult {
    pub(crate) parameters: i64,
    pub(crate) step_seconds: f64,
    pub(crate) tokens_per_s: f64,
    pub(crate) final_loss: f64,
}

/// The cellfleet training step on one fixed random batch (the loop of `train::pretrain` without the
/// loader, so both sides time the same work).
pub(crate) fn train_child(spec: &TrainBenchSpec) -> anyhow::Result<TrainBenchResult> {
    use crate::model::{CellModel, Mode, Tokens};
    use crate::train::optim::{AdamW, AdamWConfig};
    use tch::{Device, Kind, Tensor};
    tch::set_num_threads(spec.threads as i32);
    tch::manual_seed(spec.seed as i64);
    let c = &spec.model;
    let model = CellModel::new(c.clone(), Device::Cpu)?;
    let mut optimizer = AdamW::new(model.trainable_parameters(), AdamWConfig::default());
    let (b, l) = (spec.batch_size as i64, c.n_genes as i64 + 1);
    let genes = Tensor::arange(l, (Kind::Int64, Device::Cpu)).repeat([b, 1]);
    let bins = Tensor::randint(c.n_bins as i64, [b, l], (Kind::Int64, Device::Cpu));
    let masked = Tensor::rand([b, l], (Kind::Float, Device::Cpu)).lt(spec.mask_ratio);
    let _ = masked.select(1, 0).fill_(0);
    let inputs = bins.masked_fill(&masked, c.n_bins as i64);
    let _ = inputs.select(1, 0).fill_(c.n_bins as i64 + 1);
    let tokens = Tokens {
        gene_ids: genes,
        bins: inputs,
        valid: None,
    };
    let mut times = Vec::new();
    let mut last = 0.0;
    for step in 0..spec.warmup_steps + spec.steps {
        let t0 = Instant::now();
        let forward = model.forward(
            &tokens,
            Mode {
                train: true,
                bf16: false,
            },
        );
        let rows = forward.hidden.index(&[Some(masked.shallow_clone())]);
        let loss = model
            .bin_logits(&rows, false)
            .cross_entropy_for_logits(&bins.masked_select(&masked))
            + &forward.aux_loss * 0.01;
        optimizer.zero_grad();
        loss.backward();
        optimizer.clip_grad_norm(1.0);
        optimizer.step(1e-4);
        last = loss.double_value(&[]);
        if step >= spec.warmup_steps {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let step_seconds = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(TrainBenchResult {
        parameters: model.parameter_count(),
        step_seconds,
        tokens_per_s: (b * l) as f64 / step_seconds,
        final_loss: last,
    })
}

pub(crate) fn bench_train(spec: &TrainBenchSpec, baseline: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cellfleet-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(spec)?)?;
    let c = &spec.model;
    println!(
        "training-step benchmark: d_model {}, {} layers, {} heads, ffn {:?}; batch {} x {} tokens; {} threads; {} measured steps after {} warm-up",
        c.d_model, c.n_layers, c.n_heads, c.ffn, spec.batch_size, c.n_genes + 1, spec.threads, spec.steps, spec.warmup_steps
    );
    let parse = |run: &ChildRun| -> anyhow::Result<TrainBenchResult> {
        let line = run.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .with_context(|| format!("benchmark child printed {:?}", run.stdout))
    };
    let exe = std::env::current_exe()?;
    let ours_run = run_measured(
        Command::new(&exe)
            .args(["bench", "train-child"])
            .arg(&spec_path),
    )?;
    let ours = parse(&ours_run)?;
    println!(
        "{:<28} {:>12} {:>12} {:>14} {:>10}",
        "", "parameters", "step (s)", "tokens/s", "peak MiB"
    );
    let row = |name: &str, r: &TrainBenchResult, run: &ChildRun| {
        println!(
            "{:<28} {:>12} {:>12.4} {:>14.0} {:>10.0}",
            name, r.parameters, r.step_seconds, r.tokens_per_s, run.peak_mib
        )
    };
    row("cellfleet (tch/libtorch)", &ours, &ours_run);
    if baseline {
        let script = bench_dir().join("train_baseline.py");
        let base_run = run_measured(Command::new(python()).arg(&script).arg(&spec_path))?;
        let base = parse(&base_run)?;
        row("PyTorch eager (Python)", &base, &base_run);
        if base.parameters != ours.parameters {
            bail!(
                "the baseline model has {} parameters, cellfleet's {}: the architectures differ",
                base.parameters,
                ours.parameters
            );
        }
        println!(
            "ratio (cellfleet / PyTorch): throughput {:.2}x, peak memory {:.2}x",
            ours.tokens_per_s / base.tokens_per_s,
            ours_run.peak_mib / base_run.peak_mib
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
