//! Training: masked-bin pretraining, `[CLS]` fine-tuning (full or LoRA) and evaluation on the held-out
//! split, with the baselines the results are read against (a per-gene marginal-frequency predictor for
//! masked bins; majority class and multinomial logistic regression for cell states). One loop serves a
//! single process and every rank of a data-parallel group ([`Parallel`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use cellfleet_shared::batch::{Batch, Loader, LoaderConfig, MaskConfig, IGNORE_TARGET};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::manifest::MISSING_LABEL;
use cellfleet_shared::stream::{
    cursor_at_step, CellSplit, EpochPlan, OrderConfig, Partitioner, SplitPart,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpointing::{
    schedule_of, step_seed, unix_ms, CheckpointWriter, Restored, Snapshot, TrainState, RNG_SCHEME,
    STATE_FORMAT,
};
use crate::collective::{all_reduce_buckets, broadcast_tensors, Collective, Solo};
use crate::metrics::{classification_report, ClassificationReport};
use crate::model::{CellModel, FfnConfig, LoraConfig, Mode, ModelConfig, Preset, Tokens};
use crate::optim::{AdamW, AdamWConfig};

/// Everything that shapes a training run; read from a TOML or JSON file over the defaults, then
/// overridden by command-line flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub preset: Preset,
    /// Overrides of the preset's shape.
    pub d_model: Option<usize>,
    pub n_layers: Option<usize>,
    pub n_heads: Option<usize>,
    pub ffn: Option<FfnConfig>,
    pub seed: u64,
    pub steps: u64,
    /// Samples per optimizer step.
    pub batch_size: u32,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The cosine schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub optimizer: AdamWConfig,
    /// Global gradient-norm clip; 0 disables it.
    pub clip_norm: f64,
    /// Weight of the MoE load-balancing loss.
    pub aux_loss_weight: f64,
    /// Fraction of gene tokens masked (pretraining); fine-tuning uses 0 unless set.
    pub mask_ratio: f32,
    /// Clones per cell (bootstrapped permutation).
    pub augmentation: u32,
    pub window_units: u32,
    pub split: CellSplit,
    /// Batch-assembly threads.
    pub loader_threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            preset: Preset::Small,
            d_model: None,
            n_layers: None,
            n_heads: None,
            ffn: None,
            seed: 0,
            steps: 1000,
            batch_size: 32,
            lr: 1e-3,
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            optimizer: AdamWConfig::default(),
            clip_norm: 1.0,
            aux_loss_weight: 0.01,
            mask_ratio: 0.15,
            augmentation: 4,
            window_units: 16,
            split: CellSplit::default(),
            loader_threads: 1,
        }
    }
}

impl TrainConfig {
    /// Reads a `.toml` or `.json` config file over `defaults` (keys the file leaves out keep the
    /// defaults' values, nested tables included); unknown keys are errors.
    pub fn from_file(path: &Path, defaults: &TrainConfig) -> anyhow::Result<Self> {
        let context = || format!("config {}", path.display());
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let file: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).with_context(context)?
        } else {
            toml::from_str(&text).with_context(context)?
        };
        let mut merged = serde_json::to_value(defaults)?;
        merge_json(&mut merged, file);
        serde_json::from_value(merged).with_context(context)
    }

    pub fn model_config(&self, n_genes: usize, n_bins: usize) -> ModelConfig {
        let mut config = self.preset.config(n_genes, n_bins);
        config.d_model = self.d_model.unwrap_or(config.d_model);
        config.n_layers = self.n_layers.unwrap_or(config.n_layers);
        config.n_heads = self.n_heads.unwrap_or(config.n_heads);
        if let Some(ffn) = &self.ffn {
            config.ffn = ffn.clone();
        }
        config
    }

    pub fn order(&self, augmentation: u32) -> OrderConfig {
        OrderConfig {
            seed: self.seed,
            augmentation,
            window_units: self.window_units,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.steps == 0 || self.batch_size == 0 {
            bail!("steps and batch_size must be positive");
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            bail!("lr must be positive, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.mask_ratio) {
            bail!("mask_ratio must be in [0, 1), got {}", self.mask_ratio);
        }
        self.split.validate()?;
        Ok(())
    }
}

/// Overlays `top` on `base`: objects merge key by key, anything else replaces.
fn merge_json(base: &mut serde_json::Value, top: serde_json::Value) {
    match (base, top) {
        (serde_json::Value::Object(base), serde_json::Value::Object(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(slot) if slot.is_object() && value.is_object() => merge_json(slot, value),
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

/// Where and how a run executes (not part of the reproducible config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: Device,
    /// Intra-op CPU threads of libtorch.
    pub threads: usize,
    pub out: PathBuf,
    /// Print a progress bar (otherwise a log line every `log_every` steps).
    pub progress: bool,
    pub log_every: u64,
}

/// What `model.json` beside the weights records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub format: String,
    pub config: ModelConfig,
    /// blake3 of the vocabulary (gene names joined by newlines): a corpus must match it.
    pub vocabulary_hash: String,
    pub genes: Vec<String>,
    pub split: CellSplit,
    pub seed: u64,
    #[serde(default)]
    pub label_column: Option<String>,
    #[serde(default)]
    pub classes: Vec<String>,
}

pub const MODEL_INFO_FORMAT: &str = "cellfleet-model/1";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INFO_FILE: &str = "model.json";

pub fn vocabulary_hash(genes: &[String]) -> String {
    blake3::hash(genes.join("\n").as_bytes())
        .to_hex()
        .to_string()
}

/// A saved model: `DIR/model.safetensors` + `DIR/model.json`, or the path of the weights file itself.
pub struct SavedModel {
    pub weights: PathBuf,
    pub info: ModelInfo,
}

impl SavedModel {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (weights, info_path) = if path.is_dir() {
            (path.join(WEIGHTS_FILE), path.join(INFO_FILE))
        } else {
            (path.to_path_buf(), path.with_file_name(INFO_FILE))
        };
        if !weights.exists() {
            bail!(
                "{}: no weights file here (expected {WEIGHTS_FILE} written by `cellfleet train`)",
                weights.display()
            );
        }
        let text = fs::read_to_string(&info_path).with_context(|| {
            format!(
                "{}: the model description that belongs beside the weights is missing",
                info_path.display()
            )
        })?;
        let info: ModelInfo = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a cellfleet model description", info_path.display())
        })?;
        if info.format != MODEL_INFO_FORMAT {
            bail!(
                "{}: format {:?}, expected {MODEL_INFO_FORMAT:?}",
                info_path.display(),
                info.format
            );
        }
        Ok(Self { weights, info })
    }

    /// Checks that `corpus` uses this model's vocabulary.
    pub fn check_corpus(&self, corpus: &Corpus) -> anyhow::Result<()> {
        if vocabulary_hash(&corpus.manifest.genes) != self.info.vocabulary_hash {
            bail!(
                "corpus {} has a different gene vocabulary ({} genes) from the model ({} genes); ingest it with `--genes {}` so it uses the model's genes",
                corpus.store.url(),
                corpus.manifest.genes.len(),
                self.info.genes.len(),
                self.weights.with_file_name(INFO_FILE).display()
            );
        }
        Ok(())
    }

    pub fn load(&self, config: ModelConfig, device: Device) -> anyhow::Result<CellModel> {
        let mut model = CellModel::new(config, device)?;
        let missing = model.load(&self.weights, true)?;
        if let Some(bad) = missing
            .iter()
            .find(|n| !(n.contains("lora_") || n.starts_with("classifier.")))
        {
            bail!("{}: parameter {bad} is missing", self.weights.display());
        }
        Ok(model)
    }
}

fn write_model(model: &CellModel, info: &ModelInfo, out: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    model.save(&out.join(WEIGHTS_FILE))?;
    fs::write(out.join(INFO_FILE), serde_json::to_string_pretty(info)?)
        .with_context(|| format!("cannot write {}", out.join(INFO_FILE).display()))?;
    Ok(())
}

/// Converts a batch into device tensors: (tokens, targets `[batch, seq]` int64).
pub fn batch_tensors(batch: &Batch, device: Device) -> (Tokens, Tensor) {
    let shape = [batch.samples as i64, batch.seq_len as i64];
    let genes: Vec<i32> = batch.gene_ids.iter().map(|&g| i32::from(g)).collect();
    let to = |t: Tensor| t.view(shape).to_kind(Kind::Int64).to_device(device);
    (
        Tokens {
            gene_ids: to(Tensor::from_slice(&genes)),
            bins: to(Tensor::from_slice(&batch.input_bins)),
            valid: None,
        },
        to(Tensor::from_slice(&batch.target_bins)),
    )
}

/// The batches of one side of the split, epoch after epoch, from a cursor.
struct BatchStream {
    corpus: Arc<Corpus>,
    order: OrderConfig,
    split: CellSplit,
    part: SplitPart,
    loader_config: LoaderConfig,
    /// The global batch; this stream yields rank `rank`'s slice of each.
    batch_size: u32,
    world: u32,
    rank: u32,
    epoch: u32,
    cursor: u64,
    loader: Option<Loader>,
    /// Batches the current loader was asked for but not yet handed out.
    pending: usize,
}

impl BatchStream {
    fn new(
        corpus: Arc<Corpus>,
        order: OrderConfig,
        split: CellSplit,
        part: SplitPart,
        mask_ratio: f32,
        batch_size: u32,
        threads: usize,
    ) -> Self {
        Self {
            corpus,
            order,
            split,
            part,
            loader_config: LoaderConfig {
                mask: MaskConfig { ratio: mask_ratio },
                threads: threads.max(1),
                ..LoaderConfig::default()
            },
            batch_size,
            world: 1,
            rank: 0,
            epoch: 0,
            cursor: 0,
            loader: None,
            pending: 0,
        }
    }

    /// Yields rank `rank` of `world`'s slice of every global batch from now on.
    fn for_rank(mut self, world: u32, rank: u32) -> Self {
        self.world = world;
        self.rank = rank;
        self
    }

    /// Continues from the global cursor at which optimizer step `step` starts.
    fn seek_step(&mut self, step: u64) -> anyhow::Result<()> {
        let len = EpochPlan::part_len(&self.corpus.manifest, self.order, self.split, self.part)?;
        if len == 0 {
            bail!(
                "the {:?} split of {} is empty",
                self.part,
                self.corpus.store.url()
            );
        }
        let (epoch, position) = cursor_at_step(len, self.batch_size, step);
        self.epoch = epoch;
        self.cursor = position;
        self.loader = None;
        self.pending = 0;
        Ok(())
    }

    /// The next batch; `limit` caps how many batches a new epoch's loader prepares.
    fn next(&mut self, limit: usize) -> anyhow::Result<Batch> {
        loop {
            if self.pending > 0 {
                self.pending -= 1;
                let batch = self
                    .loader
                    .as_mut()
                    .and_then(|l| l.next())
                    .context("loader ended early")??;
                return Ok(batch);
            }
            let plan = Arc::new(EpochPlan::for_part(
                &self.corpus.manifest,
                self.order,
                self.epoch,
                self.split,
                self.part,
            )?);
            if plan.is_empty() {
                bail!(
                    "the {:?} split of {} is empty (eval fraction {})",
                    self.part,
                    self.corpus.store.url(),
                    self.split.eval_fraction
                );
            }
            let partitioner = Partitioner {
                epoch_len: plan.len(),
            };
            let mut ranges = Vec::new();
            while ranges.len() < limit.max(1) {
                let range = partitioner.global_batch(self.cursor, 1, self.batch_size);
                if range.is_empty() {
                    break;
                }
                self.cursor = range.end;
                ranges.push(Partitioner::rank_slice(&range, self.world, self.rank));
            }
            if ranges.is_empty() {
                self.epoch += 1;
                self.cursor = 0;
                continue;
            }
            self.pending = ranges.len();
            self.loader = None;
            self.loader = Some(Loader::spawn(
                self.corpus.clone(),
                plan,
                ranges,
                self.loader_config,
            )?);
        }
    }
}

/// One optimizer step's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub aux_loss: f64,
    /// Masked-bin accuracy (pretraining) or class accuracy (fine-tuning) on the step's batch.
    pub accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub seconds: f64,
    /// Seconds this step's end spent taking a checkpoint snapshot (the blocking part of a save).
    #[serde(skip_serializing_if = "is_zero")]
    pub checkpoint_stall: f64,
    /// A checkpoint upload ran in the background during this step.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub upload_in_flight: bool,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn setup_torch(config: &TrainConfig, run: &RunOptions) {
    tch::set_num_threads(run.threads.max(1) as i32);
    tch::manual_seed(config.seed as i64);
    if let Device::Cuda(_) = run.device {
        tch::Cuda::manual_seed_all(config.seed);
    }
}

fn bf16(run: &RunOptions) -> bool {
    matches!(run.device, Device::Cuda(_))
}

/// A step's task loss before normalization: the summed loss (with grad), the number of correct predictions
/// and the number of scored positions (masked tokens or labelled cells). Summed over ranks before dividing,
/// so a data-parallel step equals the single-process step on the whole global batch.
pub struct LossParts {
    pub sum: Tensor,
    pub correct: Tensor,
    pub count: f64,
}

/// The masked-bin loss parts of a forward pass.
fn masked_bin_loss(model: &CellModel, hidden: &Tensor, targets: &Tensor, bf16: bool) -> LossParts {
    let masked = targets.ne(i64::from(IGNORE_TARGET));
    let rows = hidden.index(&[Some(masked.shallow_clone())]);
    let logits = model.bin_logits(&rows, bf16);
    let truth = targets.masked_select(&masked);
    LossParts {
        sum: logits.cross_entropy_loss::<Tensor>(&truth, None, tch::Reduction::Sum, -100, 0.0),
        correct: logits.argmax(-1, false).eq_tensor(&truth).sum(Kind::Float),
        count: truth.size()[0] as f64,
    }
}

/// Gradient buckets for the all-reduce (the size PyTorch DDP uses).
const BUCKET_BYTES: usize = 25 << 20;

/// How this process takes part in training: its collective group (`Solo` alone), where the generation
/// starts, a flag that stops it between steps, a hook called after every step, and checkpointing.
pub struct Parallel<'a> {
    pub collective: &'a mut dyn Collective,
    /// The optimizer step to start from; the data cursor is derived from it. With a checkpoint to
    /// resume, it must be the checkpoint's step.
    pub start_step: u64,
    pub abort: Option<&'a AtomicBool>,
    #[allow(clippy::type_complexity)]
    pub on_step: Option<&'a mut dyn FnMut(&StepRecord, &Batch) -> anyhow::Result<()>>,
    pub checkpointing: Checkpointing,
}

/// Resuming and saving checkpoints (pretraining only).
#[derive(Default)]
pub struct Checkpointing {
    /// A verified checkpoint to continue from.
    pub resume: Option<Restored>,
    /// Saves checkpoints (rank 0 only; `None` elsewhere and when the run does not checkpoint).
    pub writer: Option<CheckpointWriter>,
    /// Stop after this step (saving a checkpoint there) although the schedule spans `config.steps`.
    pub stop_after: Option<u64>,
    /// Recorded in the checkpoints (the cluster generation; 0 outside a cluster).
    pub generation: u64,
}

impl<'a> Parallel<'a> {
    /// A single process from step 0, without checkpoints.
    pub fn alone(solo: &'a mut Solo) -> Self {
        Self {
            collective: solo,
            start_step: 0,
            abort: None,
            on_step: None,
            checkpointing: Checkpointing::default(),
        }
    }

    fn rank(&self) -> usize {
        self.collective.rank()
    }
}

/// Returned (inside `anyhow::Error`) when the abort flag stopped the loop.
#[derive(Debug, thiserror::Error)]
#[error("stopped: the generation was superseded")]
pub struct Aborted;

/// Opens the step log for a run starting after `start_step`: a resumed run keeps the lines of the steps
/// up to its checkpoint (and drops any its predecessor logged past it), so the log is the run's history.
fn open_step_log(path: &Path, start_step: u64) -> anyhow::Result<fs::File> {
    let kept: String = if start_step > 0 {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|step| step <= start_step)
            })
            .map(|line| format!("{line}\n"))
            .collect()
    } else {
        String::new()
    };
    fs::write(path, kept).with_context(|| format!("cannot write {}", path.display()))?;
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// The loop shared by pretraining and fine-tuning: `loss_of` turns this rank's batch into loss parts.
fn train_loop(
    model: &CellModel,
    config: &TrainConfig,
    run: &RunOptions,
    stream: &mut BatchStream,
    what: &str,
    parallel: &mut Parallel<'_>,
    mut loss_of: impl FnMut(&Batch, &crate::model::Forward, &Tensor) -> LossParts,
) -> anyhow::Result<Vec<StepRecord>> {
    let mut optimizer = AdamW::new(model.trainable_parameters(), config.optimizer);
    let schedule = schedule_of(config);
    let mut start_step = parallel.start_step;
    if let Some(restored) = &parallel.checkpointing.resume {
        if start_step != 0 && start_step != restored.state.step {
            bail!(
                "asked to start at step {start_step} but the checkpoint to resume is of step {}",
                restored.state.step
            );
        }
        start_step = restored.state.step;
        restored.apply(model, &mut optimizer)?;
    } else if start_step > 0 {
        bail!("starting at step {start_step} needs a checkpoint of that step to restore");
    }
    let end_step = parallel
        .checkpointing
        .stop_after
        .unwrap_or(config.steps)
        .min(config.steps);
    let epoch_len = EpochPlan::part_len(
        &stream.corpus.manifest,
        stream.order,
        stream.split,
        stream.part,
    )?;
    let corpus_hash = stream.corpus.manifest.content_hash();
    let world = parallel.collective.world();
    let lead = parallel.rank() == 0;
    let experts = model.config.experts();
    let moe_layers = if experts > 0 {
        model.config.n_layers
    } else {
        0
    };
    fs::create_dir_all(&run.out).with_context(|| format!("cannot create {}", run.out.display()))?;
    // One step log per run, written by rank 0 (the numbers are global).
    let log_path = run.out.join(format!("{what}_log.jsonl"));
    let mut log = if lead {
        Some(open_step_log(&log_path, start_step)?)
    } else {
        None
    };
    let grads: Vec<Tensor> = if world > 1 {
        // Every rank must all-reduce every gradient, also one it did not touch this step (an empty
        // slice, an expert no token reached): give all of them storage up front.
        let params = model.trainable_parameters();
        let zero = params
            .iter()
            .map(|(_, p)| p.sum(Kind::Float) * 0.0)
            .fold(Tensor::zeros([], (Kind::Float, run.device)), |a, b| a + b);
        zero.backward();
        params.iter().map(|(_, p)| p.grad()).collect()
    } else {
        Vec::new()
    };
    if start_step > 0 {
        // Same cursor arithmetic as the coordinator's: step s starts at cursor_at_step(s).
        stream.seek_step(start_step)?;
    }
    let bar = crate::progress::step_bar(end_step, what, run.progress);
    bar.set_position(start_step);
    let mut records = Vec::with_capacity(end_step.saturating_sub(start_step) as usize);
    let started = Instant::now();
    let mut tokens_total = 0u64;
    let rank = parallel.rank();
    for step in start_step..end_step {
        if parallel.abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
            return Err(Aborted.into());
        }
        let batch = stream.next((end_step - step) as usize)?;
        let t0 = Instant::now();
        // Every random draw of the step follows from (seed, step, rank): a resumed run draws the same.
        tch::manual_seed(step_seed(config.seed, step, rank));
        let upload_in_flight = parallel
            .checkpointing
            .writer
            .as_mut()
            .is_some_and(|w| w.busy());
        optimizer.zero_grad();
        let local_samples = batch.samples as f64;
        let (parts, forward) = if batch.samples > 0 {
            let (tokens, targets) = batch_tensors(&batch, run.device);
            let forward = model.forward(
                &tokens,
                Mode {
                    train: true,
                    bf16: bf16(run),
                },
            );
            (Some(loss_of(&batch, &forward, &targets)), Some(forward))
        } else {
            (None, None)
        };
        let aux_value = forward
            .as_ref()
            .map_or(0.0, |f| f.aux_loss.double_value(&[]));
        // [loss sum, correct, scored positions, samples, sample-weighted aux loss], then (data-parallel MoE)
        // every layer's per-expert routed-slot counts: all summed over ranks in one all-reduce.
        let mut stats = vec![
            parts.as_ref().map_or(0.0, |p| p.sum.double_value(&[])) as f32,
            parts.as_ref().map_or(0.0, |p| p.correct.double_value(&[])) as f32,
            parts.as_ref().map_or(0.0, |p| p.count) as f32,
            local_samples as f32,
            (aux_value * local_samples) as f32,
        ];
        let global_routing = world > 1 && moe_layers > 0;
        if global_routing {
            match &forward {
                Some(f) => {
                    for load in &f.expert_load {
                        stats.extend(Vec::<i64>::try_from(load)?.iter().map(|&c| c as f32));
                    }
                }
                None => stats.extend(std::iter::repeat_n(0.0, moe_layers * experts)),
            }
        }
        let mut totals = Tensor::from_slice(&stats).to_device(run.device);
        parallel.collective.all_reduce_sum(&mut totals)?;
        let totals = Vec::<f64>::try_from(totals.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let (scored, samples) = (totals[2].max(1.0), totals[3].max(1.0));
        let share = local_samples / samples;
        let mut aux_loss = totals[4] / samples;
        if let (Some(parts), Some(forward)) = (&parts, &forward) {
            // The MoE balance loss E * sum_e f_e * P_e with f the routing fractions of the whole global
            // batch: summed over ranks (weighted by their share) it equals the single-process loss.
            let aux = if global_routing {
                let mut aux = Tensor::zeros([], (Kind::Float, run.device));
                for (layer, probs) in forward.router_probs.iter().enumerate() {
                    let counts = &totals[5 + layer * experts..5 + (layer + 1) * experts];
                    let slots: f64 = counts.iter().sum::<f64>().max(1.0);
                    let fractions: Vec<f32> = counts.iter().map(|&c| (c / slots) as f32).collect();
                    let fractions = Tensor::from_slice(&fractions).to_device(run.device);
                    aux += (fractions * probs).sum(Kind::Float) * experts as f64;
                }
                aux
            } else {
                forward.aux_loss.shallow_clone()
            };
            if global_routing {
                aux_loss = aux.double_value(&[]) * share;
            }
            // Sum / max(count, 1): a step without scored positions adds nothing instead of a NaN mean.
            let loss = &parts.sum / scored + aux * (config.aux_loss_weight * share);
            loss.backward();
        } else if global_routing {
            aux_loss = 0.0;
        }
        if global_routing {
            // The reported balance loss is the global one: sum of the ranks' shares.
            let mut total = Tensor::from_slice(&[aux_loss as f32]).to_device(run.device);
            parallel.collective.all_reduce_sum(&mut total)?;
            aux_loss = total.double_value(&[0]);
        }
        if world > 1 {
            all_reduce_buckets(&mut *parallel.collective, &grads, BUCKET_BYTES)?;
        }
        let grad_norm = optimizer.clip_grad_norm(config.clip_norm);
        let lr = schedule.lr(step);
        optimizer.step(lr);
        let mut record = StepRecord {
            step: step + 1,
            loss: totals[0] / scored,
            aux_loss,
            accuracy: totals[1] / scored,
            lr,
            grad_norm,
            tokens: (batch.samples * batch.seq_len) as u64,
            seconds: t0.elapsed().as_secs_f64(),
            checkpoint_stall: 0.0,
            upload_in_flight,
        };
        if !record.loss.is_finite() {
            bail!(
                "{what}: loss became {} at step {} (try a lower lr than {})",
                record.loss,
                step + 1,
                config.lr
            );
        }
        if let Some(writer) = parallel.checkpointing.writer.as_mut() {
            let done = step + 1;
            let last = done == end_step;
            if last || writer.due(done) {
                if last {
                    // The final checkpoint is never skipped; a failed earlier save was already reported.
                    let _ = writer.wait();
                }
                if writer.busy() {
                    writer.skip(done);
                } else {
                    let t = Instant::now();
                    let (epoch, position) = cursor_at_step(epoch_len, config.batch_size, done);
                    let state = TrainState {
                        format: STATE_FORMAT.into(),
                        step: done,
                        optimizer_step: optimizer.step,
                        epoch,
                        position,
                        epoch_len,
                        schedule,
                        next_lr: schedule.lr(done),
                        rng_scheme: RNG_SCHEME.into(),
                        config: config.clone(),
                        model: model.config.clone(),
                        genes: stream.corpus.manifest.genes.clone(),
                        corpus_url: stream.corpus.store.url().to_string(),
                        corpus_manifest_blake3: corpus_hash.clone(),
                        world_size: world as u32,
                        generation: parallel.checkpointing.generation,
                        saved_unix_ms: unix_ms(),
                    };
                    let snapshot = Snapshot::take(model, &optimizer, state)?;
                    record.checkpoint_stall = t.elapsed().as_secs_f64();
                    // The final checkpoint is what a follow-up run resumes: retry an unreachable store.
                    let attempts = if last { 3 } else { 1 };
                    writer.start(snapshot, record.checkpoint_stall, attempts);
                }
            }
        }
        tokens_total += record.tokens;
        if let Some(log) = log.as_mut() {
            writeln!(log, "{}", serde_json::to_string(&record)?)?;
        }
        if let Some(hook) = parallel.on_step.as_mut() {
            hook(&record, &batch)?;
        }
        let rate = tokens_total as f64 / started.elapsed().as_secs_f64();
        let message = format!(
            "loss {:.4} acc {:.3} {:.0} tok/s",
            record.loss, record.accuracy, rate
        );
        bar.set_message(message.clone());
        bar.inc(1);
        if !run.progress && (step + 1) % run.log_every.max(1) == 0 {
            eprintln!("{what} step {}/{}: {message}", step + 1, end_step);
        }
        records.push(record);
    }
    bar.finish_and_clear();
    Ok(records)
}

/// Masked-bin pretraining in one process. Writes `model.safetensors`, `model.json` and
/// `pretrain_log.jsonl` to `run.out`.
pub fn pretrain(
    corpus: Arc<Corpus>,
    config: &TrainConfig,
    run: &RunOptions,
) -> anyhow::Result<(CellModel, Vec<StepRecord>)> {
    pretrain_parallel(corpus, config, run, &mut Parallel::alone(&mut Solo))
}

/// Masked-bin pretraining as one rank of a data-parallel group: every rank starts from rank 0's
/// parameters, reads its slice of each global batch, and all-reduces gradients; rank 0 writes the model.
pub fn pretrain_parallel(
    corpus: Arc<Corpus>,
    config: &TrainConfig,
    run: &RunOptions,
    parallel: &mut Parallel<'_>,
) -> anyhow::Result<(CellModel, Vec<StepRecord>)> {
    config.validate()?;
    if config.mask_ratio <= 0.0 {
        bail!("pretraining needs mask_ratio > 0");
    }
    setup_torch(config, run);
    let manifest = &corpus.manifest;
    if let Some(restored) = &parallel.checkpointing.resume {
        restored.check_run(config, &manifest.content_hash())?;
    }
    let model_config = config.model_config(manifest.genes.len(), usize::from(manifest.bins.n_bins));
    let model = CellModel::new(model_config, run.device)?;
    let (world, rank) = (
        parallel.collective.world() as u32,
        parallel.collective.rank() as u32,
    );
    if world > 1 {
        let params: Vec<Tensor> = model
            .named_parameters()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        broadcast_tensors(&mut *parallel.collective, &params, 0)?;
    }
    let mut stream = BatchStream::new(
        corpus.clone(),
        config.order(config.augmentation),
        config.split,
        SplitPart::Train,
        config.mask_ratio,
        config.batch_size,
        config.loader_threads,
    )
    .for_rank(world, rank);
    let bf16 = bf16(run);
    let records = train_loop(
        &model,
        config,
        run,
        &mut stream,
        "pretrain",
        parallel,
        |_, forward, targets| masked_bin_loss(&model, &forward.hidden, targets, bf16),
    )?;
    if rank == 0 {
        let info = ModelInfo {
            format: MODEL_INFO_FORMAT.into(),
            config: model.config.clone(),
            vocabulary_hash: vocabulary_hash(&manifest.genes),
            genes: manifest.genes.clone(),
            split: config.split,
            seed: config.seed,
            label_column: None,
            classes: Vec::new(),
        };
        write_model(&model, &info, &run.out)?;
    }
    // The final checkpoint uploads while the model file is written; the run is done when it is stored.
    if let Some(writer) = parallel.checkpointing.writer.as_mut() {
        writer.wait()?;
    }
    Ok((model, records))
}

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
}

/// Evaluates masked-bin prediction on the held-out split: every held-out cell in vocabulary order,
/// masked at `mask_ratio` in `ceil(1 / mask_ratio)` passes with independent masks.
pub fn evaluate_masked_bins(
    model: &CellModel,
    corpus: Arc<Corpus>,
    split: CellSplit,
    seed: u64,
    mask_ratio: f32,
    batch_size: u32,
) -> anyhow::Result<MaskedBinReport> {
    let n_genes = corpus.manifest.genes.len();
    let n_bins = usize::from(corpus.manifest.bins.n_bins);
    // Marginal frequencies from every training cell.
    let mut counts = vec![1.0f64; n_genes * n_bins];
    for batch in split_pass(&corpus, seed, split, SplitPart::Train, 0.0, batch_size, 0)? {
        let batch = batch?;
        for (g, b) in batch.gene_ids.iter().zip(&batch.input_bins) {
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
            mask_ratio,
            batch_size,
            pass,
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
        let (nll, hits, count) = tch::no_grad(|| {
            let hidden = model.forward(&tokens, Mode::EVAL).hidden;
            let masked = targets.ne(i64::from(IGNORE_TARGET));
            let logits = model.bin_logits(&hidden.index(&[Some(masked.shallow_clone())]), false);
            let truth = targets.masked_select(&masked);
            let nll = logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &truth.unsqueeze(1), false)
                .sum(Kind::Double)
                .double_value(&[]);
            let hits = logits
                .argmax(-1, false)
                .eq_tensor(&truth)
                .sum(Kind::Int64)
                .int64_value(&[]);
            (-nll, hits, truth.size()[0])
        });
        report.model_cross_entropy += nll;
        report.model_accuracy += hits as f64;
        report.masked_tokens += count as u64;
        for (g, t) in batch.gene_ids.iter().zip(&batch.target_bins) {
            if *t != IGNORE_TARGET {
                let g = usize::from(*g) - 1;
                report.marginal_cross_entropy -= log_marginal[g * n_bins + usize::from(*t)];
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
    Ok(report)
}

/// Every cell of one side of the split once, in vocabulary order.
fn split_pass(
    corpus: &Arc<Corpus>,
    seed: u64,
    split: CellSplit,
    part: SplitPart,
    mask_ratio: f32,
    batch_size: u32,
    epoch: u32,
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
    loop {
        let range = partitioner.global_batch(cursor, 1, batch_size);
        if range.is_empty() {
            break;
        }
        cursor = range.end;
        ranges.push(range);
    }
    let config = LoaderConfig {
        mask: MaskConfig { ratio: mask_ratio },
        ..LoaderConfig::default()
    };
    Ok(Loader::spawn(corpus.clone(), plan, ranges, config)?)
}

fn label_index(corpus: &Corpus, column: &str) -> anyhow::Result<(usize, Vec<String>)> {
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

fn batch_labels(batch: &Batch, index: usize, columns: usize) -> Vec<i64> {
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

/// Fine-tunes a pretrained model's `[CLS]` classifier on `label_column` (LoRA adapters of `lora_rank`
/// with the base frozen, or the whole network), then evaluates it on the held-out split.
pub fn finetune(
    corpus: Arc<Corpus>,
    base: &SavedModel,
    label_column: &str,
    lora_rank: Option<usize>,
    config: &TrainConfig,
    run: &RunOptions,
) -> anyhow::Result<(CellModel, Vec<StepRecord>, ClassificationEval)> {
    config.validate()?;
    base.check_corpus(&corpus)?;
    let (label_idx, classes) = label_index(&corpus, label_column)?;
    if classes.len() < 2 {
        bail!(
            "label column `{label_column}` has {} class(es); fine-tuning needs at least 2",
            classes.len()
        );
    }
    setup_torch(config, run);
    let mut model_config = base.info.config.clone();
    model_config.n_classes = classes.len();
    model_config.lora = lora_rank.map(|rank| LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
    });
    let model = base.load(model_config, run.device)?;
    if lora_rank.is_some() {
        model.freeze_base();
    }
    // The held-out cells are the base model's, so pretraining never saw the cells evaluated here.
    let split = base.info.split;
    let mut stream = BatchStream::new(
        corpus.clone(),
        config.order(config.augmentation),
        split,
        SplitPart::Train,
        config.mask_ratio,
        config.batch_size,
        config.loader_threads,
    );
    let columns = corpus.manifest.label_columns.len();
    let bf16 = bf16(run);
    let device = run.device;
    let records = train_loop(
        &model,
        config,
        run,
        &mut stream,
        "finetune",
        &mut Parallel::alone(&mut Solo),
        |batch, forward, _| {
            let labels =
                Tensor::from_slice(&batch_labels(batch, label_idx, columns)).to_device(device);
            let logits = model
                .class_logits(&forward.hidden, bf16)
                .expect("classifier present");
            let known = labels.ne(-100);
            let hits = logits
                .argmax(-1, false)
                .eq_tensor(&labels)
                .logical_and(&known);
            LossParts {
                sum: logits.cross_entropy_loss::<Tensor>(
                    &labels,
                    None,
                    tch::Reduction::Sum,
                    -100,
                    0.0,
                ),
                correct: hits.sum(Kind::Float),
                count: known.sum(Kind::Float).double_value(&[]),
            }
        },
    )?;
    let info = ModelInfo {
        format: MODEL_INFO_FORMAT.into(),
        config: model.config.clone(),
        vocabulary_hash: base.info.vocabulary_hash.clone(),
        genes: base.info.genes.clone(),
        split,
        seed: config.seed,
        label_column: Some(label_column.to_string()),
        classes: classes.clone(),
    };
    write_model(&model, &info, &run.out)?;
    let eval = evaluate_classifier(&model, corpus, &info, config.batch_size, config.seed)?;
    Ok((model, records, eval))
}

/// Dense `[cells, genes]` features (bin / n_bins in vocabulary order) and labels of one split side.
struct LabelledCells {
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
        for batch in split_pass(&corpus, seed, info.split, part, 0.0, batch_size, 0)? {
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
                let mut features = vec![0.0f32; n_genes];
                for t in 1..batch.seq_len {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configs/pretrain.toml");
        let parsed = TrainConfig::from_file(&path, &TrainConfig::default()).unwrap();
        assert_eq!(parsed, TrainConfig::default());
    }

    #[test]
    fn a_partial_config_keeps_the_callers_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ft.toml");
        fs::write(
            &path,
            "steps = 7\n[optimizer]\nweight_decay = 0.5\n[ffn]\nkind = \"dense\"\nhidden = 32\n",
        )
        .unwrap();
        let defaults = TrainConfig {
            mask_ratio: 0.0,
            lr: 2e-3,
            ..TrainConfig::default()
        };
        let parsed = TrainConfig::from_file(&path, &defaults).unwrap();
        assert_eq!(parsed.steps, 7);
        assert_eq!((parsed.mask_ratio, parsed.lr), (0.0, 2e-3));
        assert_eq!(parsed.optimizer.weight_decay, 0.5);
        assert_eq!(parsed.optimizer.beta1, 0.9);
        assert_eq!(parsed.ffn, Some(FfnConfig::Dense { hidden: 32 }));
        fs::write(&path, "stepz = 7\n").unwrap();
        let err = format!(
            "{:#}",
            TrainConfig::from_file(&path, &defaults).unwrap_err()
        );
        assert!(err.contains("stepz") && err.contains("ft.toml"), "{err}");
    }
}
