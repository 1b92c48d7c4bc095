//! Training jobs: the state machine (pending -> running -> completed | failed | cancelled), generations
//! and rank assignment, the global data cursor, step reports, checkpoint commits, the rendezvous
//! key-value exchange, and the reconciliation of each job's members with the live workers.
//!
//! A job's record (`jobs/<id>`) is the truth; what is only in memory (per-rank progress of the current
//! generation) is rebuilt from reports after a restart. Every operation here runs under the
//! coordinator's lock, so a report or a commit never lands on a generation formed after its check.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use cellfleet_shared::ids::{Generation, JobId, Rank, WorkerId};
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::{cursor_at_step, EpochPlan, OrderConfig, SplitPart};

use crate::error::{CoordinatorError, Result};
use crate::spec::{JobSpec, OrderFields, RestorePoint};
use crate::state::{now_ms, Store, JOBS, KV};

/// Earlier checkpoints a job remembers for falling back (retention usually keeps fewer).
const RESTORE_HISTORY: usize = 8;

/// A job whose generations keep failing before their first step is failed instead of retried forever.
const MAX_STALLED_GENERATIONS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, JobState::Pending | JobState::Running)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A job as stored under `jobs/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobRecord {
    id: JobId,
    spec: JobSpec,
    state: JobState,
    /// Samples in one epoch of the training split (the cursor's modulus).
    epoch_len: u64,
    total_steps: u64,
    batch_size: u32,
    generation: Generation,
    /// Worker ids in rank order.
    members: Vec<WorkerId>,
    /// The step the current generation started from.
    start_step: u64,
    committed_step: u64,
    /// NaN before rank 0's first step, which JSON stores as `null`.
    #[serde(deserialize_with = "loss_or_nan")]
    last_loss: f64,
    message: String,
    reformations: u32,
    /// Generations in a row that ended before completing a step; too many fail the job.
    #[serde(default)]
    stalled_generations: u32,
    /// Genes in the corpus vocabulary (workers check they read the same corpus).
    #[serde(default)]
    n_genes: u64,
    /// The newest committed checkpoint: where a new generation starts (step 0 without one).
    #[serde(default)]
    restore: Option<RestorePoint>,
    /// Checkpoints committed before `restore`, oldest first (a few): where to fall back when the newest
    /// turns out unusable.
    #[serde(default)]
    restore_history: Vec<RestorePoint>,
}

/// serde_json writes a NaN loss as `null` and refuses to read `null` as a float: reads it back as NaN, so
/// a job stored before its first step does not stop a restarted coordinator.
fn loss_or_nan<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

fn job_key(id: &JobId) -> String {
    format!("{JOBS}{id}")
}

/// Per-rank progress of a job's current generation (memory only: rebuilt from reports after a restart).
#[derive(Default)]
struct Progress {
    generation: Generation,
    steps: HashMap<Rank, u64>,
    started: Option<Instant>,
    started_step: u64,
    /// A rank reported that a peer failed it; if membership does not change on its own, the job is
    /// re-formed one lease TTL later (a hung peer that still renews its lease).
    peer_error_at: Option<Instant>,
    /// Re-form at the next tick, for this reason (the generation cannot go on as it is).
    reform: Option<String>,
}

impl Progress {
    /// Progress of `job`'s current generation, starting now.
    fn of(job: &JobRecord) -> Self {
        Self {
            generation: job.generation,
            started: Some(Instant::now()),
            started_step: job.start_step,
            ..Self::default()
        }
    }

    /// Samples per second since the generation started (0 before its first step).
    fn rate(&self, job: &JobRecord) -> f64 {
        let Some(started) = self.started else {
            return 0.0;
        };
        let elapsed = started.elapsed().as_secs_f64();
        let steps = job.committed_step.saturating_sub(self.started_step);
        if elapsed > 0.0 && steps > 0 {
            steps as f64 * f64::from(job.batch_size) / elapsed
        } else {
            0.0
        }
    }
}

/// A rank's report on its generation.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub worker: WorkerId,
    pub job: JobId,
    pub generation: Generation,
    pub rank: Rank,
    /// Steps completed (1 after the first optimizer step).
    pub step: u64,
    pub kind: Reported,
}

#[derive(Debug, Clone)]
pub enum Reported {
    /// A step done; `finished` on the last one, once rank 0 has written the model.
    Progress { loss: f64, finished: bool },
    /// The rank gives up on the generation; `fatal` when the error will recur whatever the membership.
    Failed { error: String, fatal: bool },
    /// The checkpoint the generation was told to restore is unusable.
    CheckpointUnusable { error: String },
}

/// Rank 0 stored a checkpoint's objects and manifest and asks for it to be recorded.
#[derive(Debug, Clone)]
pub struct CheckpointCommit {
    pub worker: WorkerId,
    pub job: JobId,
    pub generation: Generation,
    pub step: u64,
    pub url: String,
    pub manifest_blake3: String,
}

/// The answer to a [`CheckpointCommit`]: only a recorded checkpoint may become the run's `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitAnswer {
    Recorded,
    Refused(String),
}

/// One rank's part in one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOrder {
    pub job: JobId,
    pub generation: Generation,
    pub rank: Rank,
    pub world_size: u32,
    pub spec: JobSpec,
    /// Where the generation starts: the step and the global data cursor that goes with it.
    pub start_step: u64,
    pub start_epoch: u32,
    pub start_position: u64,
    pub epoch_len: u64,
    pub n_genes: u64,
    /// The checkpoint to restore (with `start_step` > 0).
    pub restore: Option<RestorePoint>,
}

/// A job as a client sees it.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub id: JobId,
    pub state: JobState,
    pub generation: Generation,
    pub members: Vec<WorkerId>,
    pub committed_step: u64,
    pub total_steps: u64,
    pub end_step: u64,
    pub last_loss: f64,
    pub message: String,
    pub reformations: u32,
    pub epoch: u32,
    pub position: u64,
    pub samples_per_second: f64,
    /// The newest committed checkpoint.
    pub checkpoint: Option<RestorePoint>,
}

/// A submitted specification, validated and sized against its corpus.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    spec: JobSpec,
    order: OrderFields,
    epoch_len: u64,
    n_genes: u64,
}

impl PreparedJob {
    /// Parses and checks a submitted specification and opens its corpus to size an epoch of the training
    /// split (a corpus that cannot be read is the request's fault).
    pub async fn prepare(spec_json: &str) -> Result<Self> {
        let (spec, order) = JobSpec::parse(spec_json).map_err(CoordinatorError::InvalidRequest)?;
        let (epoch_len, n_genes) = epoch_length(&spec, order).await?;
        let per_epoch = epoch_len.div_ceil(u64::from(order.batch_size));
        if order.steps / per_epoch >= u64::from(u32::MAX) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "job specification: config.steps {} is more than 2^32 epochs of this corpus",
                order.steps
            )));
        }
        Ok(Self {
            spec,
            order,
            epoch_len,
            n_genes,
        })
    }
}

/// Opens the job's corpus to size an epoch of its training split (rejecting a corpus that cannot be read).
async fn epoch_length(spec: &JobSpec, order: OrderFields) -> Result<(u64, u64)> {
    let url = spec.corpus.clone();
    let s3 = S3Options {
        endpoint: spec.s3_endpoint.clone(),
        region: spec.s3_region.clone(),
        ..S3Options::default()
    };
    let (len, genes) = tokio::task::spawn_blocking(move || -> Result<(u64, u64), String> {
        let corpus =
            cellfleet_shared::corpus::Corpus::open(&url, &s3).map_err(|e| e.to_string())?;
        let config = OrderConfig {
            seed: order.seed,
            augmentation: order.augmentation,
            window_units: order.window_units,
        };
        config.validate().map_err(|e| e.to_string())?;
        let len = EpochPlan::part_len(&corpus.manifest, config, order.split, SplitPart::Train)
            .map_err(|e| e.to_string())?;
        Ok((len, corpus.manifest.genes.len() as u64))
    })
    .await
    .map_err(|e| {
        CoordinatorError::Internal(format!(
            "reading the job's corpus {} failed: {e}",
            spec.corpus
        ))
    })?
    .map_err(|e| CoordinatorError::InvalidRequest(format!("job corpus {}: {e}", spec.corpus)))?;
    if len == 0 {
        return Err(CoordinatorError::InvalidRequest(format!(
            "job corpus {}: the training split is empty",
            spec.corpus
        )));
    }
    Ok((len, genes))
}

impl JobRecord {
    fn new(id: JobId, prepared: PreparedJob) -> Self {
        let PreparedJob {
            spec,
            order,
            epoch_len,
            n_genes,
        } = prepared;
        JobRecord {
            id,
            state: JobState::Pending,
            epoch_len,
            total_steps: order.steps,
            batch_size: order.batch_size,
            generation: Generation(0),
            members: Vec::new(),
            start_step: 0,
            committed_step: 0,
            last_loss: f64::NAN,
            message: format!("waiting for {} workers", spec.min_workers),
            reformations: 0,
            stalled_generations: 0,
            n_genes,
            restore: spec.resume.clone(),
            restore_history: Vec::new(),
            spec,
        }
    }

    fn cursor(&self, step: u64) -> (u32, u64) {
        cursor_at_step(self.epoch_len, self.batch_size, step)
    }

    /// The step the job ends at (`stop_after`, or the end of the schedule).
    fn end_step(&self) -> u64 {
        self.spec
            .stop_after
            .unwrap_or(self.total_steps)
            .min(self.total_steps)
    }

    fn rank_of(&self, worker: &WorkerId) -> Option<Rank> {
        let rank = self.members.iter().position(|m| m == worker)?;
        Some(Rank(rank as u32))
    }

    fn train_order(&self, rank: Rank) -> TrainOrder {
        let (start_epoch, start_position) = self.cursor(self.start_step);
        TrainOrder {
            job: self.id.clone(),
            generation: self.generation,
            rank,
            world_size: self.members.len() as u32,
            spec: self.spec.clone(),
            start_step: self.start_step,
            start_epoch,
            start_position,
            epoch_len: self.epoch_len,
            n_genes: self.n_genes,
            restore: self.restore.clone(),
        }
    }

    fn status(&self, progress: Option<&Progress>) -> JobStatus {
        let (epoch, position) = self.cursor(self.committed_step);
        JobStatus {
            id: self.id.clone(),
            state: self.state,
            generation: self.generation,
            members: self.members.clone(),
            committed_step: self.committed_step,
            total_steps: self.total_steps,
            end_step: self.end_step(),
            last_loss: self.last_loss,
            message: self.message.clone(),
            reformations: self.reformations,
            epoch,
            position,
            samples_per_second: progress.map_or(0.0, |p| p.rate(self)),
            checkpoint: self.restore.clone(),
        }
    }

    /// Counts a generation that ends now; true when too many in a row ended before completing a step.
    fn count_stall(&mut self) -> bool {
        if self.committed_step > self.start_step {
            self.stalled_generations = 0;
        } else {
            self.stalled_generations += 1;
        }
        self.stalled_generations >= MAX_STALLED_GENERATIONS
    }

    /// Starts the next generation with `members` (rank order), or parks the job when there are too few.
    fn next_generation(&mut self, members: Vec<WorkerId>, reason: &str) {
        let was_running = self.state == JobState::Running || self.generation > Generation(0);
        self.generation = self.generation.next();
        // A new generation restarts from the newest committed checkpoint (every rank restores it), or
        // without one from the initial state: re-initialized from the seed and broadcast from rank 0.
        self.start_step = self.restore.as_ref().map_or(0, |r| r.step);
        self.committed_step = self.start_step;
        if members.len() < self.spec.min_workers as usize {
            self.state = JobState::Pending;
            self.message = format!(
                "waiting for workers: {} available, at least {} needed ({reason})",
                members.len(),
                self.spec.min_workers
            );
            self.members = Vec::new();
        } else {
            if was_running && self.generation > Generation(1) {
                self.reformations += 1;
            }
            self.state = JobState::Running;
            self.message = format!(
                "generation {}: {} workers from step {} ({reason})",
                self.generation,
                members.len(),
                self.start_step
            );
            self.members = members;
        }
    }

    /// Why a commit cannot be recorded, if it cannot (checked before touching the store).
    fn commit_refusal(&self, commit: &CheckpointCommit) -> Option<String> {
        if self.members.first() != Some(&commit.worker) {
            return Some(format!(
                "worker {} is not rank 0 of generation {}",
                commit.worker, commit.generation
            ));
        }
        let Some(spec) = &self.spec.checkpoint else {
            return Some("the job has no checkpoint location".into());
        };
        if commit.url != spec.url {
            return Some(format!(
                "the job checkpoints to {}, not {}",
                spec.url, commit.url
            ));
        }
        if let Some(current) = &self.restore {
            if commit.step <= current.step && current.url == commit.url {
                return Some(format!(
                    "step {} is not newer than the recorded checkpoint step {}",
                    commit.step, current.step
                ));
            }
        }
        None
    }

    /// Makes the committed checkpoint the one new generations start from, remembering the one before.
    fn record_checkpoint(&mut self, commit: &CheckpointCommit) {
        if let Some(previous) = self.restore.take() {
            self.restore_history.push(previous);
            let excess = self.restore_history.len().saturating_sub(RESTORE_HISTORY);
            self.restore_history.drain(..excess);
        }
        self.restore = Some(RestorePoint {
            url: commit.url.clone(),
            step: commit.step,
            manifest_blake3: commit.manifest_blake3.clone(),
        });
    }

    /// The checkpoint this generation restored is unusable: falls back to the one recorded before it (the
    /// next tick re-forms the job), or fails the job without one. Every rank may report it; the first
    /// report falls back, later ones find it done. Returns whether the record changed.
    fn fall_back_from_checkpoint(&mut self, progress: &mut Progress, error: &str) -> bool {
        let restored_it = self
            .restore
            .as_ref()
            .is_some_and(|r| r.step == self.start_step);
        if !restored_it || progress.reform.is_some() {
            return false;
        }
        let bad = self.restore.take().expect("checked");
        match self.restore_history.pop() {
            Some(previous) => {
                self.message = format!(
                    "checkpoint step {} is unusable ({error}); falling back to step {}",
                    bad.step, previous.step
                );
                progress.reform = Some(format!(
                    "checkpoint step {} unusable, restoring step {}",
                    bad.step, previous.step
                ));
                self.restore = Some(previous);
                tracing::warn!("job {}: {}", self.id, self.message);
            }
            None => {
                self.state = JobState::Failed;
                self.message = format!(
                    "checkpoint step {} is unusable ({error}) and no earlier checkpoint is recorded; resume with `cellfleet train --resume latest`, which falls back past it",
                    bad.step
                );
                tracing::error!("job {}: {}", self.id, self.message);
            }
        }
        true
    }

    /// A rank gave up: a fatal error fails the job; any other is taken as a lost peer, and the job is
    /// re-formed if membership does not change on its own within a lease TTL.
    fn record_failure(
        &mut self,
        progress: &mut Progress,
        report: &StepReport,
        error: &str,
        fatal: bool,
    ) {
        if fatal {
            self.state = JobState::Failed;
            self.message = format!("rank {} ({}) failed: {error}", report.rank, report.worker);
            tracing::error!("job {}: {}", self.id, self.message);
        } else {
            tracing::warn!(
                "job {} generation {}: rank {} reports: {error}",
                self.id,
                self.generation,
                report.rank
            );
            progress.peer_error_at.get_or_insert_with(Instant::now);
        }
    }

    /// A rank completed a step: the committed step is the slowest rank's; rank 0's last step completes
    /// the job.
    fn record_progress(
        &mut self,
        progress: &mut Progress,
        rank: Rank,
        step: u64,
        loss: f64,
        finished: bool,
    ) {
        progress.steps.insert(rank, step);
        self.committed_step = (0..self.members.len() as u32)
            .map(|r| {
                progress
                    .steps
                    .get(&Rank(r))
                    .copied()
                    .unwrap_or(self.start_step)
            })
            .min()
            .unwrap_or(self.start_step);
        if rank == Rank(0) && !finished {
            self.last_loss = loss;
        }
        if finished && rank == Rank(0) {
            self.state = JobState::Completed;
            self.committed_step = self.end_step();
            self.message = self.completion_message();
            tracing::info!("job {}: {}", self.id, self.message);
        }
    }

    fn completion_message(&self) -> String {
        if self.end_step() < self.total_steps {
            format!(
                "stopped after step {} of {} in generation {} as asked; model written to {}{}",
                self.end_step(),
                self.total_steps,
                self.generation,
                self.spec.out,
                match &self.restore {
                    Some(r) => format!(", resume from checkpoint step {} in {}", r.step, r.url),
                    None => String::new(),
                }
            )
        } else {
            format!(
                "finished {} steps in generation {}; model written to {}",
                self.total_steps, self.generation, self.spec.out
            )
        }
    }
}

/// Every job the coordinator knows, and the progress of each one's current generation.
#[derive(Default)]
pub struct Jobs {
    records: BTreeMap<JobId, JobRecord>,
    progress: HashMap<JobId, Progress>,
}

impl Jobs {
    /// The jobs the store already holds (a restarted coordinator continues them).
    pub async fn load(store: &Store) -> Result<Self> {
        let mut jobs = Jobs::default();
        for (_, job) in store.read_all::<JobRecord>(JOBS).await? {
            jobs.records.insert(job.id.clone(), job);
        }
        Ok(jobs)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Jobs pending or running.
    pub fn active(&self) -> usize {
        self.records
            .values()
            .filter(|j| j.state.is_active())
            .count()
    }

    /// Records a new pending job; the reconciler starts it once enough workers are free.
    pub async fn submit(&mut self, store: &Store, prepared: PreparedJob) -> Result<JobId> {
        let mut id = format!("job-{}", now_ms());
        while self.records.contains_key(id.as_str()) {
            id.push('x');
        }
        let id = JobId::new(id);
        let job = JobRecord::new(id.clone(), prepared);
        store.write(&job_key(&id), &job).await?;
        tracing::info!(
            "job {id} submitted: {} steps of {} samples over {} ({} samples per epoch), {}-{} workers",
            job.total_steps,
            job.batch_size,
            job.spec.corpus,
            job.epoch_len,
            job.spec.min_workers,
            job.spec.max_workers
        );
        self.records.insert(id.clone(), job);
        Ok(id)
    }

    /// Every job's status, in id order.
    pub fn statuses(&self) -> Vec<JobStatus> {
        self.records
            .values()
            .map(|job| job.status(self.progress.get(&job.id)))
            .collect()
    }

    pub fn status(&self, id: &JobId) -> Result<JobStatus> {
        let job = self
            .records
            .get(id)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.clone()))?;
        Ok(job.status(self.progress.get(id)))
    }

    /// Cancels a pending or running job. The caller then tells its workers and clears its exchange.
    pub async fn cancel(&mut self, store: &Store, id: &JobId) -> Result<()> {
        let job = self
            .records
            .get_mut(id)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.clone()))?;
        if !job.state.is_active() {
            return Err(CoordinatorError::JobEnded {
                job: id.clone(),
                state: job.state.name(),
            });
        }
        job.state = JobState::Cancelled;
        job.message = format!("cancelled at step {}", job.committed_step);
        store.write(&job_key(id), job).await
    }

    /// The running job `id` at `generation`, or why a request for it is refused.
    fn current(&self, id: &JobId, generation: Generation) -> Result<&JobRecord> {
        let job = self
            .records
            .get(id)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.clone()))?;
        if generation < job.generation {
            return Err(CoordinatorError::SupersededGeneration {
                job: id.clone(),
                current: job.generation,
                asked: generation,
            });
        }
        if generation > job.generation {
            return Err(CoordinatorError::NoSuchGeneration {
                job: id.clone(),
                current: job.generation,
                asked: generation,
            });
        }
        if job.state != JobState::Running {
            return Err(CoordinatorError::JobNotRunning {
                job: id.clone(),
                state: job.state.name(),
            });
        }
        Ok(job)
    }

    /// Checks that (job, generation) is running and current.
    pub fn check_current(&self, id: &JobId, generation: Generation) -> Result<()> {
        self.current(id, generation).map(|_| ())
    }

    /// The job `worker` is a rank of, with its order.
    pub fn train_order(&self, worker: &WorkerId) -> Option<TrainOrder> {
        self.records
            .values()
            .filter(|j| j.state == JobState::Running)
            .find_map(|j| Some(j.train_order(j.rank_of(worker)?)))
    }

    /// The running job `worker` is a member of.
    pub fn serving(&self, worker: &WorkerId) -> Option<&JobId> {
        self.records
            .values()
            .find(|j| j.state == JobState::Running && j.members.contains(worker))
            .map(|j| &j.id)
    }

    /// Applies a rank's report and returns the job's state after it. A report from a superseded
    /// generation, a worker that is not that rank, or a step past the end is refused.
    pub async fn report_step(&mut self, store: &Store, report: StepReport) -> Result<JobState> {
        let mut job = self.current(&report.job, report.generation)?.clone();
        if job.members.get(report.rank.index()) != Some(&report.worker) {
            return Err(CoordinatorError::NotRank {
                worker: report.worker,
                rank: report.rank,
                job: report.job,
                generation: report.generation,
            });
        }
        if report.step > job.end_step() {
            return Err(CoordinatorError::InvalidRequest(format!(
                "step {} is past the job's last step {}",
                report.step,
                job.end_step()
            )));
        }
        let progress = self.progress.entry(job.id.clone()).or_default();
        if progress.generation != job.generation {
            *progress = Progress::of(&job);
        }
        match &report.kind {
            Reported::CheckpointUnusable { error } => {
                if job.fall_back_from_checkpoint(progress, error) {
                    store.write(&job_key(&job.id), &job).await?;
                }
            }
            Reported::Failed { error, fatal } => {
                job.record_failure(progress, &report, error, *fatal);
            }
            Reported::Progress { loss, finished } => {
                job.record_progress(progress, report.rank, report.step, *loss, *finished);
            }
        }
        let changed = self.records.get(&job.id).map(|j| {
            (j.committed_step, j.state, j.last_loss.to_bits())
                != (job.committed_step, job.state, job.last_loss.to_bits())
        });
        self.records.insert(job.id.clone(), job.clone());
        if changed == Some(true) {
            store.write(&job_key(&job.id), &job).await?;
        }
        Ok(job.state)
    }

    /// Records a checkpoint rank 0 committed, if its generation is current, with a compare-and-swap on the
    /// stored job record: if another coordinator process wrote the job since this one loaded it, nothing
    /// is recorded and the committer must not move `latest`.
    pub async fn commit_checkpoint(
        &mut self,
        store: &Store,
        commit: CheckpointCommit,
    ) -> Result<CommitAnswer> {
        let refuse = |reason: String| {
            tracing::info!(
                "job {}: checkpoint step {} not recorded: {reason}",
                commit.job,
                commit.step
            );
            Ok(CommitAnswer::Refused(reason))
        };
        let mut job = match self.current(&commit.job, commit.generation) {
            Ok(job) => job.clone(),
            Err(e) => return refuse(e.to_string()),
        };
        if let Some(reason) = job.commit_refusal(&commit) {
            return refuse(reason);
        }
        let key = job_key(&job.id);
        let same_generation = |e: &cellfleet_shared::meta::Entry| {
            serde_json::from_slice::<JobRecord>(&e.value).is_ok_and(|r| {
                r.generation == commit.generation
                    && r.restore.as_ref().is_none_or(|p| p.step < commit.step)
            })
        };
        let Some(entry) = store.get(&key).await?.filter(same_generation) else {
            return refuse(
                "the stored job record is of another generation (another coordinator?)".into(),
            );
        };
        job.record_checkpoint(&commit);
        if !store.replace(&key, entry.revision, &job).await? {
            return refuse("the stored job record changed underneath this coordinator".into());
        }
        tracing::info!(
            "job {}: checkpoint step {} committed in {} (manifest {})",
            job.id,
            commit.step,
            commit.url,
            &commit.manifest_blake3[..commit.manifest_blake3.len().min(12)]
        );
        self.records.insert(job.id.clone(), job);
        Ok(CommitAnswer::Recorded)
    }

    /// Compares each active job's members with the live workers and the connected idle ones, and forms a
    /// new generation where the current one cannot go on (a member lost, a rank asked for it, a peer
    /// failure that membership did not explain) or can grow, and starts pending jobs that have enough
    /// workers. `connected` is in id order, so joiners are chosen deterministically.
    pub async fn reconcile(
        &mut self,
        store: &Store,
        exchange: &Exchange,
        live: &HashSet<WorkerId>,
        connected: &[WorkerId],
        lease_ttl: Duration,
    ) -> Result<()> {
        let mut busy: HashSet<WorkerId> = self
            .records
            .values()
            .filter(|j| j.state == JobState::Running)
            .flat_map(|j| j.members.iter().cloned())
            .filter(|id| live.contains(id))
            .collect();
        let active: Vec<JobId> = self
            .records
            .values()
            .filter(|j| j.state.is_active())
            .map(|j| j.id.clone())
            .collect();
        for id in active {
            let job = &self.records[&id];
            let alive: Vec<WorkerId> = job
                .members
                .iter()
                .filter(|m| live.contains(*m))
                .cloned()
                .collect();
            let room = (job.spec.max_workers as usize).saturating_sub(alive.len());
            let joiners: Vec<WorkerId> = connected
                .iter()
                .filter(|w| !busy.contains(*w))
                .take(room)
                .cloned()
                .collect();
            let Some(reason) = self.reform_reason(job, &alive, &joiners, live, lease_ttl) else {
                continue;
            };
            let mut members = alive;
            members.extend(joiners);
            busy.extend(members.iter().cloned());
            self.form_generation(store, exchange, &id, members, &reason)
                .await?;
        }
        Ok(())
    }

    /// Why `job` needs a new generation now, if it does.
    fn reform_reason(
        &self,
        job: &JobRecord,
        alive: &[WorkerId],
        joiners: &[WorkerId],
        live: &HashSet<WorkerId>,
        lease_ttl: Duration,
    ) -> Option<String> {
        let progress = self.progress.get(&job.id);
        match job.state {
            JobState::Running if alive.len() < job.members.len() => {
                let lost: Vec<&WorkerId> =
                    job.members.iter().filter(|m| !live.contains(*m)).collect();
                Some(format!("lost {}", join(&lost)))
            }
            JobState::Running
                if progress
                    .is_some_and(|p| p.generation == job.generation && p.reform.is_some()) =>
            {
                progress.and_then(|p| p.reform.clone())
            }
            JobState::Running
                if progress
                    .is_some_and(|p| p.peer_error_at.is_some_and(|t| t.elapsed() >= lease_ttl)) =>
            {
                Some("a rank reported a failed peer".to_string())
            }
            JobState::Running if !joiners.is_empty() => {
                Some(format!("admitting {}", join(joiners)))
            }
            JobState::Pending if alive.len() + joiners.len() >= job.spec.min_workers as usize => {
                Some("enough workers".to_string())
            }
            _ => None,
        }
    }

    /// Starts a new generation of job `id` with `members` (rank order), parks it when there are too few,
    /// or fails it when too many generations in a row ended before completing a step.
    async fn form_generation(
        &mut self,
        store: &Store,
        exchange: &Exchange,
        id: &JobId,
        members: Vec<WorkerId>,
        reason: &str,
    ) -> Result<()> {
        let job = self.records.get_mut(id).expect("job exists");
        if job.state == JobState::Running && job.count_stall() {
            job.state = JobState::Failed;
            job.message = format!(
                "{} generations in a row ended before completing a step (last: {reason}); the workers' logs say why",
                job.stalled_generations
            );
            tracing::error!("job {id}: {}", job.message);
            store.write(&job_key(id), job).await?;
            return exchange.clear(id).await;
        }
        job.next_generation(members, reason);
        tracing::info!("job {id}: {}", job.message);
        self.progress.insert(id.clone(), Progress::of(job));
        store.write(&job_key(id), job).await?;
        exchange.clear(id).await
    }
}

fn join<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| s.as_ref())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The key-value exchange collectives bootstrap through (Gloo's rendezvous store, NCCL's unique id):
/// `kv/<job>/<generation>/<key>`, cleared whenever the job forms a generation or ends.
pub struct Exchange {
    store: Store,
    changed: Notify,
}

impl Exchange {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            changed: Notify::new(),
        }
    }

    fn key(job: &JobId, generation: Generation, key: &str) -> String {
        format!("{KV}{job}/{generation}/{key}")
    }

    pub async fn set(
        &self,
        job: &JobId,
        generation: Generation,
        key: &str,
        value: &[u8],
    ) -> Result<()> {
        self.store
            .put_bytes(&Self::key(job, generation, key), value)
            .await?;
        self.changed.notify_waiters();
        Ok(())
    }

    pub async fn get(
        &self,
        job: &JobId,
        generation: Generation,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        let entry = self.store.get(&Self::key(job, generation, key)).await?;
        Ok(entry.map(|e| e.value))
    }

    /// Resolves at the next set or clear in this process (enable it before checking, not to miss one).
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Deletes a job's keys (of every generation) and wakes anyone waiting on them.
    pub async fn clear(&self, job: &JobId) -> Result<()> {
        self.store.delete_prefix(&format!("{KV}{job}/")).await?;
        self.changed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JobRecord {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "corpus": "/data/c", "out": "/tmp/o", "min_workers": 1, "max_workers": 2,
            "config": {"seed": 1, "steps": 10, "batch_size": 8, "augmentation": 4, "window_units": 16,
                       "split": {"seed": 0, "eval_fraction": 0.1}}
        }))
        .unwrap();
        let order = spec.order().unwrap();
        JobRecord::new(
            JobId::from("job-1"),
            PreparedJob {
                spec,
                order,
                epoch_len: 100,
                n_genes: 50,
            },
        )
    }

    #[test]
    fn stored_records_keep_their_format() {
        let mut job = record();
        job.next_generation(vec!["w-a".into(), "w-b".into()], "enough workers");
        job.last_loss = 2.5;
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["id"], "job-1");
        assert_eq!(json["generation"], 1);
        assert_eq!(json["members"], serde_json::json!(["w-a", "w-b"]));
        assert_eq!(json["state"], "running");
        let back: JobRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.rank_of(&"w-b".into()), Some(Rank(1)));
    }

    #[test]
    fn a_job_stored_before_its_first_step_reads_back() {
        let job = record();
        assert!(job.last_loss.is_nan());
        let json = serde_json::to_vec(&job).unwrap();
        assert!(String::from_utf8_lossy(&json).contains("\"last_loss\":null"));
        let back: JobRecord = serde_json::from_slice(&json).unwrap();
        assert!(back.last_loss.is_nan());
    }

    #[test]
    fn the_slowest_rank_commits_and_rank_0_finishes() {
        let mut job = record();
        job.next_generation(vec!["a".into(), "b".into()], "enough workers");
        let mut progress = Progress::of(&job);
        job.record_progress(&mut progress, Rank(0), 3, 1.5, false);
        assert_eq!((job.committed_step, job.last_loss), (0, 1.5));
        job.record_progress(&mut progress, Rank(1), 2, 9.0, false);
        assert_eq!((job.committed_step, job.last_loss), (2, 1.5));
        job.record_progress(&mut progress, Rank(0), 10, 0.5, true);
        assert_eq!((job.state, job.committed_step), (JobState::Completed, 10));
        assert!(
            job.message.starts_with("finished 10 steps"),
            "{}",
            job.message
        );
    }
}
