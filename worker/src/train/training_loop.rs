//! The loop shared by pretraining and fine-tuning, and masked-bin pretraining on it. One loop serves a
//! single process and every rank of a data-parallel group ([`Participation`]): losses are normalised
//! globally, gradients all-reduced in buckets, and rank 0's parameters broadcast at the start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::ids::Rank;
use cellfleet_shared::stream::batch::{Batch, IGNORE_TARGET};
use cellfleet_shared::stream::{cursor_at_step, EpochPlan, SplitPart};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::collective::{all_reduce_buckets, broadcast_tensors, Collective, CollectiveError, Solo};
use crate::model::{CellModel, Mode};
use crate::train::batches::batch_tensors;
use crate::train::batches::BatchStream;
use crate::train::checkpoint_state::{
    unix_ms, CheckpointWriter, Restored, Snapshot, TrainState, RNG_SCHEME, STATE_FORMAT,
};
use crate::train::config::schedule_of;
use crate::train::config::step_seed;
use crate::train::config::RunOptions;
use crate::train::config::TrainConfig;
use crate::train::optim::AdamW;
use crate::train::saved_model::vocabulary_hash;
use crate::train::saved_model::write_model;
use crate::train::saved_model::ModelInfo;
use crate::train::saved_model::MODEL_INFO_FORMAT;

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
    /// Real tokens of the step's batch (this rank's slice).
    pub tokens: u64,
    /// Padding slots the batch's rows carried beyond their real tokens (expressed layout).
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub padding: u64,
    /// Model FLOPs of the step on this rank (`ModelConfig::training_flops` over its real tokens): with
    /// `seconds`, the achieved rate MFU is computed from.
    pub model_flops: f64,
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

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

pub(crate) fn setup_torch(config: &TrainConfig, run: &RunOptions) {
    tch::set_num_threads(run.threads.max(1) as i32);
    tch::manual_seed(config.seed as i64);
    if let Device::Cuda(_) = run.device {
        tch::Cuda::manual_seed_all(config.seed);
    }
}

pub(crate) fn bf16(run: &RunOptions) -> bool {
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
pub(crate) fn masked_bin_loss(
    model: &CellModel,
    hidden: &Tensor,
    targets: &Tensor,
    bf16: bool,
) -> LossParts {
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
pub struct Participation<'a> {
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

impl<'a> Participation<'a> {
    /// A single process from step 0, without checkpoints.
    pub fn single_process(solo: &'a mut Solo) -> Self {
        Self {
            collective: solo,
            start_step: 0,
            abort: None,
            on_step: None,
            checkpointing: Checkpointing::default(),
        }
    }

    fn rank(&self) -> Rank {
        Rank(self.collective.rank() as u32)
    }
}

/// How a training run failed, as its caller needs to tell: a cluster worker re-forms its group after a
/// collective failure, stops quietly when superseded, and fails the job for anything else.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The abort flag stopped the loop between steps (a newer generation replaced this one).
    #[error("stopped: the generation was superseded")]
    Aborted,
    /// A collective operation failed: a peer is gone or did not answer in time.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

macro_rules! failed_from {
    ($($error:ty),*) => {$(
        impl From<$error> for TrainError {
            fn from(e: $error) -> Self {
                TrainError::Failed(e.into())
            }
        }
    )*};
}
failed_from!(
    std::io::Error,
    serde_json::Error,
    tch::TchError,
    cellfleet_shared::Error,
    crate::model::ModelError
);

/// The loop shared by pretraining and fine-tuning: `loss_of` turns this rank's batch into loss parts.
pub(crate) fn train_loop(
    model: &CellModel,
    config: &TrainConfig,
    run: &RunOptions,
    stream: &mut BatchStream,
    what: &str,
    participation: &mut Participation<'_>,
    mut loss_of: impl FnMut(&Batch, &crate::model::Forward, &Tensor) -> LossParts,
) -> Result<Vec<StepRecord>, TrainError> {
    let mut optimizer = AdamW::new(model.trainable_parameters(), config.optimizer);
    let schedule = schedule_of(config);
    let start_step = resume_point(participation, model, &mut optimizer)?;
    let end_step = participation
        .checkpointing
        .stop_after
        .unwrap_or(config.steps)
        .min(config.steps);
    let identity = RunIdentity {
        epoch_len: EpochPlan::part_len(
            &stream.corpus.manifest,
            stream.order,
            stream.split,
            stream.part,
        )?,
        corpus_hash: stream.corpus.manifest.content_hash(),
        world: participation.collective.world(),
    };
    let lead = participation.rank() == Rank(0);
    // One step log per run, written by rank 0 (the numbers are global). A resumed run keeps the lines of
    // the steps up to its checkpoint (and drops any its predecessor logged past it), so the log is the
    // run's history.
    let mut log = if lead {
        Some(
            run.out
                .line_log(&format!("{what}_log.jsonl"), Some(start_step))?,
        )
    } else {
        None
    };
    let grads = if identity.world > 1 {
        preallocated_grads(model, run.device)
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
    let rank = participation.rank();
    for step in start_step..end_step {
        if participation
            .abort
            .is_some_and(|a| a.load(Ordering::Relaxed))
        {
            return Err(TrainError::Aborted);
        }
        let batch = stream.next((end_step - step) as usize)?;
        let t0 = Instant::now();
        // Every random draw of the step follows from (seed, step, rank): a resumed run draws the same.
        tch::manual_seed(step_seed(config.seed, step, rank));
        let upload_in_flight = participation
            .checkpointing
            .writer
            .as_mut()
            .is_some_and(|w| w.busy());
        optimizer.zero_grad();
        let totals = loss_and_backward(model, config, run, participation, &batch, &mut loss_of)?;
        let mut collective_seconds = 0.0;
        if identity.world > 1 {
            let t = Instant::now();
            all_reduce_buckets(&mut *participation.collective, &grads, BUCKET_BYTES)?;
            collective_seconds = t.elapsed().as_secs_f64();
        }
        let grad_norm = optimizer.clip_grad_norm(config.clip_norm);
        let lr = schedule.lr(step);
        optimizer.step(lr);
        let mut record = StepRecord {
            step: step + 1,
            loss: totals.loss_sum / totals.scored,
            aux_loss: totals.aux_loss,
            accuracy: totals.correct / totals.scored,
            lr,
            grad_norm,
            tokens: batch.real_tokens() as u64,
            padding: (batch.samples * batch.seq_len - batch.real_tokens()) as u64,
            model_flops: batch
                .lengths
                .iter()
                .map(|&l| model.config.training_flops(l as usize))
                .sum(),
            seconds: t0.elapsed().as_secs_f64(),
            checkpoint_stall: 0.0,
            upload_in_flight,
        };
        if !record.loss.is_finite() {
            return Err(anyhow::anyhow!(
                "{what}: loss became {} at step {} (try a lower lr than {})",
                record.loss,
                step + 1,
                config.lr
            )
            .into());
        }
        if let Some(writer) = participation.checkpointing.writer.as_mut() {
            let generation = participation.checkpointing.generation;
            let saving = Saving {
                model,
                optimizer: &optimizer,
                config,
                stream,
                identity: &identity,
                generation,
            };
            record.checkpoint_stall = saving.checkpoint_if_due(writer, step + 1, end_step)?;
        }
        tokens_total += record.tokens;
        let m = &crate::metrics::TRAIN;
        m.step.set(record.step as f64);
        m.step_seconds.observe(record.seconds);
        if identity.world > 1 {
            m.collective_seconds.observe(collective_seconds);
        }
        m.tokens.add(record.tokens as f64);
        m.tokens_per_second
            .set(record.tokens as f64 / record.seconds.max(1e-9));
        m.loss.set(record.loss);
        if let Some(log) = log.as_mut() {
            log.append(&serde_json::to_string(&record)?)?;
        }
        if let Some(hook) = participation.on_step.as_mut() {
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

/// The step a run starts from: the checkpoint's, when it resumes one (its weights and moments are copied
/// into `model` and `optimizer`); otherwise the participation's, which must then be 0.
fn resume_point(
    participation: &Participation<'_>,
    model: &CellModel,
    optimizer: &mut AdamW,
) -> Result<u64, TrainError> {
    let start_step = participation.start_step;
    let Some(restored) = &participation.checkpointing.resume else {
        if start_step > 0 {
            return Err(anyhow::anyhow!(
                "starting at step {start_step} needs a checkpoint of that step to restore"
            )
            .into());
        }
        return Ok(0);
    };
    if start_step != 0 && start_step != restored.state.step {
        return Err(anyhow::anyhow!(
            "asked to start at step {start_step} but the checkpoint to resume is of step {}",
            restored.state.step
        )
        .into());
    }
    restored.apply(model, optimizer)?;
    Ok(restored.state.step)
}

/// Every trainable parameter's gradient, allocated up front: every rank must all-reduce every gradient,
/// also one it did not touch this step (an empty slice, an expert no token reached).
fn preallocated_grads(model: &CellModel, device: Device) -> Vec<Tensor> {
    let params = model.trainable_parameters();
    let zero = params
        .iter()
        .map(|(_, p)| p.sum(Kind::Float) * 0.0)
        .fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
    zero.backward();
    params.iter().map(|(_, p)| p.grad()).collect()
}

/// What identifies a run's data in its checkpoints.
struct RunIdentity {
    epoch_len: u64,
    corpus_hash: String,
    world: usize,
}

/// A step's numbers summed over every rank (a data-parallel step reports the global batch's).
struct StepTotals {
    loss_sum: f64,
    correct: f64,
    /// Scored positions (at least 1, so a step without any divides to 0, not NaN).
    scored: f64,
    aux_loss: f64,
}

/// Runs this rank's forward pass, sums the loss parts over ranks, and back-propagates the globally
/// normalised loss (with the MoE balance loss over the global batch's routing); the gradients are left
/// for the caller to all-reduce.
fn loss_and_backward(
    model: &CellModel,
    config: &TrainConfig,
    run: &RunOptions,
    participation: &mut Participation<'_>,
    batch: &Batch,
    loss_of: &mut impl FnMut(&Batch, &crate::model::Forward, &Tensor) -> LossParts,
) -> Result<StepTotals, TrainError> {
    let world = participation.collective.world();
    let experts = model.config.experts();
    let moe_layers = if experts > 0 {
        model.config.n_layers
    } else {
        0
    };
    let local_samples = batch.samples as f64;
    let (parts, forward) = if batch.samples > 0 {
        let (tokens, targets) = batch_tensors(batch, run.device);
        let forward = model.forward(
            &tokens,
            Mode {
                train: true,
                bf16: bf16(run),
            },
        );
        (Some(loss_of(batch, &forward, &targets)), Some(forward))
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
    participation.collective.all_reduce_sum(&mut totals)?;
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
        participation.collective.all_reduce_sum(&mut total)?;
        aux_loss = total.double_value(&[0]);
    }
    Ok(StepTotals {
        loss_sum: totals[0],
        correct: totals[1],
        scored,
        aux_loss,
    })
}

/// What a checkpoint of the running loop is taken from.
struct Saving<'a> {
    model: &'a CellModel,
    optimizer: &'a AdamW,
    config: &'a TrainConfig,
    stream: &'a BatchStream,
    identity: &'a RunIdentity,
    generation: u64,
}

impl Saving<'_> {
    /// After step `done`: when a checkpoint is due (or `done` is the last step), snapshots the run on
    /// this thread and hands the upload to the writer's background thread; a due save while the previous
    /// upload still runs is skipped (never the last). Returns the seconds the snapshot stalled training.
    fn checkpoint_if_due(
        &self,
        writer: &mut CheckpointWriter,
        done: u64,
        end_step: u64,
    ) -> Result<f64, TrainError> {
        let last = done == end_step;
        if !last && !writer.due(done) {
            return Ok(0.0);
        }
        if last {
            // The final checkpoint is never skipped; a failed earlier save was already reported.
            let _ = writer.wait();
        }
        if writer.busy() {
            writer.skip(done);
            return Ok(0.0);
        }
        let t = Instant::now();
        let (config, identity) = (self.config, self.identity);
        let schedule = schedule_of(config);
        let (epoch, position) = cursor_at_step(identity.epoch_len, config.batch_size, done);
        let state = TrainState {
            format: STATE_FORMAT.into(),
            step: done,
            optimizer_step: self.optimizer.step,
            epoch,
            position,
            epoch_len: identity.epoch_len,
            schedule,
            next_lr: schedule.lr(done),
            rng_scheme: RNG_SCHEME.into(),
            config: config.clone(),
            model: self.model.config.clone(),
            genes: self.stream.corpus.manifest.genes.clone(),
            corpus_url: self.stream.corpus.store.url().to_string(),
            corpus_manifest_blake3: identity.corpus_hash.clone(),
            world_size: identity.world as u32,
            generation: self.generation,
            saved_unix_ms: unix_ms(),
        };
        let snapshot = Snapshot::take(self.model, self.optimizer, state)?;
        let stall = t.elapsed().as_secs_f64();
        // The final checkpoint is what a follow-up run resumes: retry an unreachable store.
        let attempts = if last { 3 } else { 1 };
        writer.start(snapshot, stall, attempts);
        Ok(stall)
    }
}

/// Masked-bin pretraining in one process. Writes `model.safetensors`, `model.json` and
/// `pretrain_log.jsonl` to `run.out`.
pub fn pretrain(
    corpus: Arc<Corpus>,
    config: &TrainConfig,
    run: &RunOptions,
) -> Result<(CellModel, Vec<StepRecord>), TrainError> {
    pretrain_with(
        corpus,
        config,
        run,
        &mut Participation::single_process(&mut Solo),
    )
}

/// Masked-bin pretraining as one rank of a data-parallel group: every rank starts from rank 0's
/// parameters, reads its slice of each global batch, and all-reduces gradients; rank 0 writes the model.
pub fn pretrain_with(
    corpus: Arc<Corpus>,
    config: &TrainConfig,
    run: &RunOptions,
    participation: &mut Participation<'_>,
) -> Result<(CellModel, Vec<StepRecord>), TrainError> {
    config.validate()?;
    if config.mask_ratio <= 0.0 {
        return Err(anyhow::anyhow!("pretraining needs mask_ratio > 0").into());
    }
    setup_torch(config, run);
    let manifest = &corpus.manifest;
    if let Some(restored) = &participation.checkpointing.resume {
        restored.check_run(config, &manifest.content_hash())?;
    }
    let model_config = config.model_config(manifest.genes.len(), usize::from(manifest.bins.n_bins));
    let model = CellModel::new(model_config, run.device)?;
    let (world, rank) = (
        participation.collective.world() as u32,
        participation.collective.rank() as u32,
    );
    if world > 1 {
        let params: Vec<Tensor> = model
            .named_parameters()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        broadcast_tensors(&mut *participation.collective, &params, 0)?;
    }
    let mut stream = BatchStream::new(
        corpus.clone(),
        config.order(config.augmentation),
        config.split,
        SplitPart::Train,
        model.config.layout,
        config.mask(),
        config.batch_size,
        config.loader_threads,
    )
    .for_rank(world, rank)
    .with_bucketing(config.bucket_batches)?;
    let bf16 = bf16(run);
    let records = train_loop(
        &model,
        config,
        run,
        &mut stream,
        "pretrain",
        participation,
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
    if let Some(writer) = participation.checkpointing.writer.as_mut() {
        writer.wait()?;
    }
    Ok((model, records))
}
