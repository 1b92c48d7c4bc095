//! The model commands of the `cellfleet` CLI: `train`, `finetune` and `eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::storage::S3Options;
use clap::Args;

use crate::cluster::client::submit_and_follow;
use crate::cluster::client::ClusterJob;
use crate::cluster::embedded::run_local;
use crate::model::{parse_device, CellModel, Preset};
use crate::train::checkpoint_state::{
    open_run, read_state, resolve, restore, CheckpointPolicy, CheckpointWriter, Restored,
    ResumeTarget,
};
use crate::train::classification_metrics::ClassificationReport;
use crate::train::config::RunOptions;
use crate::train::config::TrainConfig;
use crate::train::evaluate::evaluate_classifier;
use crate::train::evaluate::evaluate_masked_bins;
use crate::train::evaluate::ClassificationEval;
use crate::train::evaluate::MaskedBinReport;
use crate::train::finetune::finetune;
use crate::train::outputs::OutputDir;
use crate::train::saved_model::SavedModel;
use crate::train::saved_model::INFO_FILE;
use crate::train::saved_model::WEIGHTS_FILE;
use crate::train::training_loop::pretrain;
use crate::train::training_loop::pretrain_with;
use crate::train::training_loop::Checkpointing;
use crate::train::training_loop::Participation;
use crate::train::training_loop::StepRecord;
use cellfleet_coordinator::spec::{CheckpointSpec, RestorePoint};
use cellfleet_shared::stream::batch::SequenceLayout;

/// Flags shared by `train` and `finetune`; each overrides the config file.
#[derive(Args, Clone, Debug)]
pub struct TrainFlags {
    /// TOML or JSON file of training settings (see docs/model.md); flags override it
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model size preset (pretraining)
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Optimizer steps
    #[arg(long)]
    pub steps: Option<u64>,
    /// Samples per step
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Peak learning rate
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of initialisation, sample order, masking and router noise
    #[arg(long)]
    pub seed: Option<u64>,
    /// Token layout (pretraining): every vocabulary gene, or a cell's expressed genes plus a sample of
    /// its unexpressed ones (much faster at large vocabularies)
    #[arg(long, value_enum)]
    pub layout: Option<LayoutChoice>,
    /// Unexpressed genes drawn into each expressed-layout sequence
    #[arg(long, default_value_t = cellfleet_shared::stream::batch::DEFAULT_UNEXPRESSED)]
    pub unexpressed: u32,
    #[command(flatten)]
    pub runtime: RuntimeFlags,
}

/// `--layout` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutChoice {
    Full,
    Expressed,
}

/// How `train` spreads over workers.
#[derive(Args, Clone, Debug)]
pub struct ClusterFlags {
    /// Submit the job to this coordinator (http://HOST:PORT) and follow it
    #[arg(long)]
    pub coordinator: Option<String>,
    /// With --local: start this many worker processes under an embedded coordinator
    #[arg(long)]
    pub workers: Option<u32>,
    /// Fewest workers the job runs with (default: all of --workers, or 1)
    #[arg(long)]
    pub min_workers: Option<u32>,
    /// Most workers the job uses (default: --workers, or --min-workers)
    #[arg(long)]
    pub max_workers: Option<u32>,
    /// Seconds a collective waits for a peer before the group is re-formed
    #[arg(long, default_value_t = 10.0)]
    pub collective_timeout: f64,
    /// Each rank logs the samples it trained on to OUT/samples/ (for auditing the data order)
    #[arg(long)]
    pub sample_log: bool,
}

/// Checkpoints of a pretraining run.
#[derive(Args, Clone, Debug)]
pub struct CheckpointFlags {
    /// Save checkpoints here: a directory, file://PATH or s3://BUCKET/PREFIX (one location per run)
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Steps between checkpoints [default: 0, only at the end; a checkpoint is always saved at the end]
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Keep the newest K checkpoints ... [default: 3]
    #[arg(long)]
    pub keep_last: Option<u32>,
    /// ... and every one whose step is a multiple of M [default: 0, none]
    #[arg(long)]
    pub keep_every: Option<u64>,
    /// Continue a run: `latest` or a STEP of --checkpoint, or a checkpoint URL (a run location or one
    /// step-NNNNNNNNNNNN folder). Settings come from the checkpoint; flags that change them are refused
    #[arg(long, value_name = "latest|STEP|URL")]
    pub resume: Option<ResumeTarget>,
    /// Stop after this step with a checkpoint (the learning-rate schedule still spans --steps); resume
    /// later with --resume latest
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<u64>,
    /// Cap checkpoint uploads at this many MB/s (leave bandwidth to training traffic)
    #[arg(long, value_name = "MB/s")]
    pub upload_limit: Option<f64>,
    /// Seconds an object-store request retries before a save fails (the next save tries again)
    /// [default: 60]
    #[arg(long)]
    pub store_retry: Option<f64>,
}

impl CheckpointFlags {
    /// Settings that only mean something with a checkpoint location.
    fn given(&self) -> Option<&'static str> {
        [
            (self.checkpoint_every.is_some(), "--checkpoint-every"),
            (self.keep_last.is_some(), "--keep-last"),
            (self.keep_every.is_some(), "--keep-every"),
            (self.upload_limit.is_some(), "--upload-limit"),
            (self.store_retry.is_some(), "--store-retry"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    fn spec(&self, url: String) -> anyhow::Result<CheckpointSpec> {
        let keep_last = self.keep_last.unwrap_or(3);
        if keep_last == 0 {
            bail!("--keep-last must be at least 1 (the newest checkpoint is what a resume uses)");
        }
        let store_retry = self.store_retry.unwrap_or(60.0);
        if store_retry.is_nan() || store_retry <= 0.0 {
            bail!("--store-retry must be positive, got {store_retry}");
        }
        let max_upload_bytes_per_sec = match self.upload_limit {
            Some(mbps) if mbps.is_nan() || mbps <= 0.0 => {
                bail!("--upload-limit must be positive, got {mbps}")
            }
            Some(mbps) => Some((mbps * 1e6) as u64),
            None => None,
        };
        Ok(CheckpointSpec {
            url,
            every: self.checkpoint_every.unwrap_or(0),
            keep_last,
            keep_every: self.keep_every.unwrap_or(0),
            max_upload_bytes_per_sec,
            store_retry_ms: (store_retry * 1000.0) as u64,
        })
    }
}

/// Where the tensors live.
#[derive(Args, Clone, Debug)]
pub struct RuntimeFlags {
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// libtorch CPU threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
}

impl RuntimeFlags {
    fn run_options(&self, out: OutputDir) -> anyhow::Result<RunOptions> {
        let threads = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        Ok(RunOptions {
            device: parse_device(&self.device)?,
            threads,
            out,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            log_every: 50,
        })
    }
}

impl TrainFlags {
    fn config(&self, defaults: TrainConfig) -> anyhow::Result<TrainConfig> {
        let mut config = match &self.config {
            Some(path) => TrainConfig::from_file(path, &defaults)?,
            None => defaults,
        };
        if let Some(p) = self.preset {
            config.preset = p;
        }
        if let Some(s) = self.steps {
            config.steps = s;
        }
        if let Some(b) = self.batch_size {
            config.batch_size = b;
        }
        if let Some(lr) = self.lr {
            config.lr = lr;
        }
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        match self.layout {
            Some(LayoutChoice::Full) => config.layout = SequenceLayout::Full,
            Some(LayoutChoice::Expressed) => {
                config.layout = SequenceLayout::Expressed {
                    unexpressed: self.unexpressed,
                }
            }
            None => {}
        }
        config.validate()?;
        Ok(config)
    }
}

fn open_corpus(url: &str, s3: &S3Options) -> anyhow::Result<Arc<Corpus>> {
    Ok(Arc::new(
        Corpus::open(url, s3).with_context(|| format!("cannot open corpus {url}"))?,
    ))
}

/// The steps' model FLOP rate against this device's measured dense matrix-product rate (f32 with the
/// run's threads on the CPU, bf16 on CUDA); one process's view (rank 0's steps in a group).
fn print_mfu(records: &[StepRecord], device: tch::Device, threads: usize) {
    let seconds: f64 = records.iter().map(|r| r.seconds).sum();
    let flops: f64 = records.iter().map(|r| r.model_flops).sum();
    if seconds <= 0.0 || flops <= 0.0 {
        return;
    }
    let name = match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    if let Ok(peak) = crate::model::measured_peak_tflops(&name, threads) {
        let achieved = flops / seconds / 1e12;
        println!(
            "MFU {:.1}%: {achieved:.3} model TFLOP/s against {peak:.3} TFLOP/s, the measured dense GEMM rate of {name} (FLOP model in docs/model.md)",
            100.0 * achieved / peak
        );
    }
}

fn summarize_steps(what: &str, records: &[StepRecord]) {
    let Some(last) = records.last() else { return };
    let tokens: u64 = records.iter().map(|r| r.tokens).sum();
    let padding: u64 = records.iter().map(|r| r.padding).sum();
    let seconds: f64 = records.iter().map(|r| r.seconds).sum();
    let first = &records[0];
    let padded = if padding > 0 {
        format!(
            " ({:.1}% of row slots were padding)",
            100.0 * padding as f64 / (tokens + padding) as f64
        )
    } else {
        String::new()
    };
    let flops: f64 = records.iter().map(|r| r.model_flops).sum();
    println!(
        "{what}: {} steps, loss {:.4} -> {:.4}, batch accuracy {:.3} -> {:.3}, {:.0} tokens/s{padded}, {:.3} model TFLOP/s",
        records.len(),
        first.loss,
        last.loss,
        first.accuracy,
        last.accuracy,
        tokens as f64 / seconds.max(1e-9),
        flops / seconds.max(1e-9) / 1e12
    );
}

fn print_masked(report: &MaskedBinReport) {
    println!(
        "held-out masked bins ({} cells, {} masked tokens in the {} layout, {} of expressed genes):",
        report.eval_cells, report.masked_tokens, report.layout, report.expressed_tokens
    );
    println!(
        "  {:<22} {:>13} {:>9} {:>20}",
        "", "cross-entropy", "accuracy", "CE, expressed genes"
    );
    println!(
        "  {:<22} {:>13.4} {:>9.4} {:>20.4}",
        "model",
        report.model_cross_entropy,
        report.model_accuracy,
        report.model_cross_entropy_expressed
    );
    println!(
        "  {:<22} {:>13.4} {:>9.4} {:>20.4}",
        "per-gene marginal",
        report.marginal_cross_entropy,
        report.marginal_accuracy,
        report.marginal_cross_entropy_expressed
    );
}

fn print_classification(eval: &ClassificationEval) {
    println!(
        "held-out `{}` classification ({} cells, {} classes):",
        eval.label_column,
        eval.model.cells,
        eval.classes.len()
    );
    println!(
        "  {:<22} {:>8} {:>8} {:>8} {:>10} {:>11} {:>7}",
        "", "accuracy", "macro-F1", "kappa", "confidence", "uncertainty", "ECE"
    );
    let row = |name: &str, r: &ClassificationReport| {
        println!(
            "  {:<22} {:>8.4} {:>8.4} {:>8.4} {:>10.4} {:>11.4} {:>7.4}",
            name, r.accuracy, r.macro_f1, r.cohen_kappa, r.mean_confidence, r.mean_entropy, r.ece
        )
    };
    row("model", &eval.model);
    println!(
        "  top-k confidence (k = 1, 2, 3): {}",
        eval.model
            .top_k_confidence
            .iter()
            .map(|c| format!("{c:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    row("logistic regression", &eval.logistic_regression);
    println!("  {:<22} {:>8.4}", "majority class", eval.majority_accuracy);
}

fn write_json(path: Option<&Path>, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The checkpoint a `train --resume` continues: where it is, its state, and (for a local run, which
/// reads it once) its tensors.
struct ResumeFrom {
    url: String,
    state: crate::train::checkpoint_state::TrainState,
    restored: Option<crate::train::checkpoint_state::Restored>,
}

#[allow(clippy::too_many_arguments)]
pub fn train_command(
    corpus: &str,
    local: bool,
    cluster: &ClusterFlags,
    ckpt: &CheckpointFlags,
    out: &str,
    flags: &TrainFlags,
    json: Option<&Path>,
    s3: &S3Options,
) -> anyhow::Result<()> {
    if !local && cluster.coordinator.is_none() {
        bail!("say where to train: --local (this machine; add --workers N for N worker processes) or --coordinator http://HOST:PORT");
    }
    let cluster_run = cluster.coordinator.is_some() || cluster.workers.is_some();
    let resume = read_resume_point(ckpt, cluster_run, s3)?;
    let config = resumed_config(flags, resume.as_ref())?;
    let checkpoint_url = ckpt.checkpoint.clone().or_else(|| {
        // Resuming from a location without --checkpoint keeps saving there.
        resume.as_ref().map(|from| from.url.clone())
    });
    check_checkpoint_flags(ckpt, checkpoint_url.as_deref(), resume.as_ref(), &config)?;
    let spec = checkpoint_url.map(|url| ckpt.spec(url)).transpose()?;
    let run = flags.runtime.run_options(OutputDir::open(out, s3)?)?;
    if cluster_run {
        let resume = resume.map(|from| RestorePoint {
            url: from.url,
            step: from.state.step,
            manifest_blake3: String::new(),
        });
        return cluster_train(
            corpus,
            cluster,
            &config,
            &run,
            s3,
            spec,
            resume,
            ckpt.stop_after,
        );
    }
    let corpus = open_corpus(corpus, s3)?;
    let (model, records) = match (spec, resume) {
        (None, None) => pretrain(corpus.clone(), &config, &run)?,
        (spec, resume) => pretrain_checkpointed(
            corpus.clone(),
            &config,
            &run,
            spec,
            resume.and_then(|from| from.restored),
            ckpt.stop_after,
            s3,
        )?,
    };
    println!(
        "model: {} parameters ({:?} preset, {} layout, {} genes, {} bins, {} experts)",
        model.parameter_count(),
        config.preset,
        model.config.layout.name(),
        model.config.n_genes,
        model.config.n_bins,
        model.config.experts()
    );
    summarize_steps("pretrain", &records);
    print_mfu(&records, run.device, run.threads);
    let report = evaluate_masked_bins(
        &model,
        corpus,
        config.split,
        config.seed,
        config.mask_ratio,
        config.batch_size,
        None,
    )?;
    print_masked(&report);
    println!(
        "weights: {}  (config: {})",
        run.out.describe(WEIGHTS_FILE),
        run.out.describe(INFO_FILE)
    );
    write_json(
        json,
        &serde_json::json!({"config": config, "steps": records, "masked_bins": report}),
    )
}

/// The checkpoint `--resume` names, read and verified: a local run reads it whole (once); a cluster
/// client only verifies it and reads its state (the workers read the tensors).
fn read_resume_point(
    ckpt: &CheckpointFlags,
    cluster_run: bool,
    s3: &S3Options,
) -> anyhow::Result<Option<ResumeFrom>> {
    let Some(target) = &ckpt.resume else {
        return Ok(None);
    };
    let started = std::time::Instant::now();
    let from = if cluster_run {
        let (checkpoints, manifest) = resolve(target, ckpt.checkpoint.as_deref(), s3)?;
        ResumeFrom {
            url: checkpoints.url().to_string(),
            state: read_state(&checkpoints, &manifest)?,
            restored: None,
        }
    } else {
        let restored = restore(target, ckpt.checkpoint.as_deref(), s3)?;
        ResumeFrom {
            url: restored.url.clone(),
            state: restored.state.clone(),
            restored: Some(restored),
        }
    };
    eprintln!(
        "resuming from checkpoint step {} of {} in {} (read and verified in {:.2}s)",
        from.state.step,
        from.state.config.steps,
        from.url,
        started.elapsed().as_secs_f64()
    );
    Ok(Some(from))
}

/// The run's settings: a resumed run takes the checkpoint's, with flags and --config layered over them;
/// any change is refused before training starts.
fn resumed_config(flags: &TrainFlags, resume: Option<&ResumeFrom>) -> anyhow::Result<TrainConfig> {
    let Some(ResumeFrom { state, .. }) = resume else {
        return flags.config(TrainConfig::default());
    };
    let config = flags.config(state.config.clone())?;
    let differences = crate::train::checkpoint_state::config_differences(&state.config, &config);
    if !differences.is_empty() {
        bail!(
            "checkpoint step {} was trained with other settings ({}); drop those flags to resume, or start a new run",
            state.step,
            differences.join(", ")
        );
    }
    Ok(config)
}

/// Refuses checkpoint flags that cannot work together, before anything runs.
fn check_checkpoint_flags(
    ckpt: &CheckpointFlags,
    checkpoint_url: Option<&str>,
    resume: Option<&ResumeFrom>,
    config: &TrainConfig,
) -> anyhow::Result<()> {
    if let (None, Some(flag)) = (checkpoint_url, ckpt.given()) {
        bail!("{flag} needs --checkpoint URL (where to save the checkpoints)");
    }
    if let Some(stop) = ckpt.stop_after {
        let from = resume.map_or(0, |from| from.state.step);
        if stop <= from || stop > config.steps {
            bail!(
                "--stop-after {stop} must be after the start step {from} and at most --steps {}",
                config.steps
            );
        }
        if checkpoint_url.is_none() {
            bail!("--stop-after needs --checkpoint (where to save the run to resume it)");
        }
    }
    if resume.is_some_and(|from| from.state.step >= config.steps) {
        bail!(
            "the checkpoint is of step {}, the end of the run: nothing left to train",
            config.steps
        );
    }
    Ok(())
}

/// Pretraining in this process that saves checkpoints (`spec`) and/or resumes one (`resume`).
fn pretrain_checkpointed(
    corpus: Arc<Corpus>,
    config: &TrainConfig,
    run: &RunOptions,
    spec: Option<CheckpointSpec>,
    resume: Option<Restored>,
    stop_after: Option<u64>,
    s3: &S3Options,
) -> anyhow::Result<(CellModel, Vec<StepRecord>)> {
    let writer = spec
        .map(|spec| -> anyhow::Result<CheckpointWriter> {
            let store_options = S3Options {
                retry_timeout: Some(std::time::Duration::from_millis(spec.store_retry_ms)),
                ..s3.clone()
            };
            Ok(CheckpointWriter::new(
                open_run(&spec.url, &store_options)?,
                CheckpointPolicy::of(&spec),
                None,
                None,
            ))
        })
        .transpose()?;
    let start_step = resume.as_ref().map_or(0, |r| r.state.step);
    Ok(pretrain_with(
        corpus,
        config,
        run,
        &mut Participation {
            collective: &mut crate::collective::Solo,
            start_step,
            abort: None,
            on_step: None,
            checkpointing: Checkpointing {
                resume,
                writer,
                stop_after,
                generation: 0,
            },
        },
    )?)
}

#[allow(clippy::too_many_arguments)]
fn cluster_train(
    corpus: &str,
    cluster: &ClusterFlags,
    config: &TrainConfig,
    run: &RunOptions,
    s3: &S3Options,
    checkpoint: Option<CheckpointSpec>,
    resume: Option<RestorePoint>,
    stop_after: Option<u64>,
) -> anyhow::Result<()> {
    if cluster.workers == Some(0) {
        bail!("--workers must be at least 1");
    }
    if cluster.collective_timeout.is_nan() || cluster.collective_timeout <= 0.0 {
        bail!("--collective-timeout must be positive");
    }
    let default_max = cluster.workers.or(cluster.min_workers).unwrap_or(1);
    let max_workers = cluster.max_workers.unwrap_or(default_max);
    let min_workers = cluster
        .min_workers
        .unwrap_or(cluster.workers.unwrap_or(1))
        .min(max_workers);
    let job = ClusterJob {
        corpus: corpus.to_string(),
        s3: s3.clone(),
        config: config.clone(),
        out: run.out.location().to_string(),
        min_workers,
        max_workers,
        threads: run.threads as u32,
        collective_timeout: std::time::Duration::from_secs_f64(cluster.collective_timeout),
        sample_log: cluster.sample_log,
        checkpoint,
        resume,
        stop_after,
    };
    let status = match (&cluster.coordinator, cluster.workers) {
        (Some(url), _) => submit_and_follow(url, &job, run.progress)?,
        (None, Some(workers)) => run_local(&job, workers, run.progress)?,
        (None, None) => unreachable!("checked by the caller"),
    };
    println!(
        "job {}: {} of {} steps, final loss {:.4}, {} workers in generation {} ({} re-formations)",
        status.job_id,
        status.end_step,
        status.total_steps,
        status.last_loss,
        status.world_size,
        status.generation,
        status.reformations
    );
    if status.has_checkpoint {
        println!(
            "checkpoint: step {} in {}{}",
            status.checkpoint_step,
            status.checkpoint_url,
            if status.end_step < status.total_steps {
                "  (continue with --resume latest)"
            } else {
                ""
            }
        );
    }
    println!(
        "weights: {}  (evaluate with `cellfleet eval --weights {}`)",
        run.out.describe(WEIGHTS_FILE),
        run.out.location()
    );
    Ok(())
}

/// Defaults of fine-tuning: no masking, a shorter schedule.
pub fn finetune_defaults() -> TrainConfig {
    TrainConfig {
        steps: 600,
        lr: 2e-3,
        warmup_steps: 20,
        mask_ratio: 0.0,
        ..TrainConfig::default()
    }
}

#[allow(clippy::too_many_arguments)]
pub fn finetune_command(
    corpus: &str,
    weights: &Path,
    label_col: &str,
    lora: Option<usize>,
    class_weights: crate::train::finetune::ClassWeighting,
    out: &str,
    flags: &TrainFlags,
    json: Option<&Path>,
    s3: &S3Options,
) -> anyhow::Result<()> {
    let config = flags.config(finetune_defaults())?;
    let run = flags.runtime.run_options(OutputDir::open(out, s3)?)?;
    let base = SavedModel::open(weights)?;
    let corpus = open_corpus(corpus, s3)?;
    let (model, records, eval) =
        finetune(corpus, &base, label_col, lora, class_weights, &config, &run)?;
    println!(
        "model: {} parameters, {} trained ({})",
        model.parameter_count(),
        model
            .trainable_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum::<i64>(),
        match lora {
            Some(r) => format!("LoRA rank {r}, base frozen"),
            None => "all parameters".into(),
        }
    );
    summarize_steps("finetune", &records);
    print_classification(&eval);
    println!("weights: {}", run.out.describe(WEIGHTS_FILE));
    write_json(
        json,
        &serde_json::json!({"config": config, "steps": records, "classification": eval}),
    )
}

#[allow(clippy::too_many_arguments)]
pub fn eval_command(
    corpus: &str,
    weights: &Path,
    batch_size: u32,
    mask_ratio: f32,
    max_cells: Option<u64>,
    runtime: &RuntimeFlags,
    json: Option<&Path>,
    s3: &S3Options,
) -> anyhow::Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(mask_ratio > 0.0 && mask_ratio < 1.0) {
        bail!("--mask-ratio must be in (0, 1), got {mask_ratio}");
    }
    if max_cells == Some(0) {
        bail!("--max-cells 0: at least one held-out cell is needed");
    }
    // Evaluation writes nothing there.
    let run = runtime.run_options(OutputDir::local(Path::new("."))?)?;
    tch::set_num_threads(run.threads as i32);
    let saved = SavedModel::open(weights)?;
    let corpus = open_corpus(corpus, s3)?;
    saved.check_corpus(&corpus)?;
    let model = saved.load(saved.info.config.clone(), run.device)?;
    let masked = evaluate_masked_bins(
        &model,
        corpus.clone(),
        saved.info.split,
        saved.info.seed,
        mask_ratio,
        batch_size,
        max_cells,
    )?;
    print_masked(&masked);
    let classification = if saved.info.label_column.is_some() {
        let eval = evaluate_classifier(&model, corpus, &saved.info, batch_size, saved.info.seed)?;
        print_classification(&eval);
        Some(eval)
    } else {
        None
    };
    write_json(
        json,
        &serde_json::json!({"masked_bins": masked, "classification": classification}),
    )
}
