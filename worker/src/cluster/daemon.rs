//! `cellfleet worker`: registers with the coordinator, heartbeats, follows the assignment stream and runs
//! one thread at a time: a training generation (collectives bootstrapped through the coordinator's
//! key-value exchange, checkpoints committed through it) or a screen's work units.

use crate::link::Rpc;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellfleet_coordinator::JobSpec;
use cellfleet_proto as pb;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::ids::{Generation, JobId, Rank, ScreenId, WorkerId};
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::{cursor_at_step, EpochPlan, SplitPart};
use clap::Args;
use serde::Serialize;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tonic::Code;

use crate::collective::{self, RendezvousStore};
use crate::model::parse_device;
use crate::screen::serve::serve_screen;
use crate::train::checkpoint_state::{
    open_run, restore, CheckpointPolicy, CheckpointWriter, CommitGate, RestoreError, ResumeTarget,
};

use super::client::runtime;
use crate::retry::{CallError, RetryPolicy};
use crate::train::config::RunOptions;
use crate::train::config::TrainConfig;
use crate::train::outputs::OutputDir;
use crate::train::training_loop::pretrain_with;
use crate::train::training_loop::Checkpointing;
use crate::train::training_loop::Participation;
use crate::train::training_loop::StepRecord;
use crate::train::training_loop::TrainError;
use cellfleet_shared::checkpoint::{CheckpointManifest, Problem, MANIFEST_FILE};

/// `cellfleet worker` flags.
#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Coordinator address, e.g. http://10.0.0.2:7070
    #[arg(long)]
    pub coordinator: String,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// libtorch CPU threads (a job's `threads` setting overrides it)
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Address other workers reach this one at (the collectives' TCP transport); `auto`: the address this
    /// host uses to reach the coordinator (127.0.0.1 for a coordinator on loopback)
    #[arg(long, default_value = "auto")]
    pub advertise_host: String,
    /// Give up when the coordinator cannot be reached for this many seconds
    #[arg(long, default_value_t = 120.0)]
    pub reconnect_timeout: f64,
    /// Serve Prometheus metrics (GET /metrics) and health (GET /healthz) over plain HTTP on this address,
    /// e.g. 0.0.0.0:9465 (with --gpus, worker i uses the port plus i)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Start one worker process per local GPU (`all`) or on the first N GPUs, each with --device cuda:I
    /// (torchrun's --nproc-per-node); this process supervises them
    #[arg(long, value_name = "all|N", conflicts_with = "device")]
    pub gpus: Option<String>,
}

/// Gloo's rendezvous store (and NCCL's unique id) over the coordinator's key-value exchange, scoped to one
/// generation of one job.
struct CoordinatorRendezvous {
    client: Rpc,
    handle: tokio::runtime::Handle,
    job: JobId,
    generation: Generation,
}

impl RendezvousStore for CoordinatorRendezvous {
    fn set(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let request = pb::KvSetRequest {
            job_id: self.job.to_string(),
            generation: self.generation.get(),
            key: key.to_string(),
            value: value.to_vec(),
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(Duration::from_secs(10));
        self.handle
            .block_on(self.client.clone().kv_set(request))
            .with_context(|| format!("rendezvous: setting {key}"))?;
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let request = pb::KvGetRequest {
            job_id: self.job.to_string(),
            generation: self.generation.get(),
            key: key.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout + Duration::from_secs(5));
        let response = self
            .handle
            .block_on(self.client.clone().kv_get(request))
            .with_context(|| format!("rendezvous: waiting for {key}"))?;
        Ok(response.into_inner().value)
    }
}

/// One sample-log line: the samples a rank trained on in one step.
#[derive(Serialize)]
struct SampleLogLine<'a> {
    step: u64,
    generation: Generation,
    rank: Rank,
    /// (cell, clone) pairs.
    samples: &'a [(u64, u32)],
}

struct Assigned {
    train: pb::TrainAssignment,
    worker_id: WorkerId,
}

/// What a worker runs at a time: one generation of a training job, or a screen's units. (A screen is not a
/// job: it has no generation, and its thread may end while the screen goes on elsewhere.)
enum Running {
    Generation {
        job: JobId,
        generation: Generation,
        abort: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    },
    Screen {
        screen: ScreenId,
        stop: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    },
}

impl Running {
    /// What it is, for log lines.
    fn describe(&self) -> String {
        match self {
            Running::Generation {
                job, generation, ..
            } => format!("job {job} (generation {generation})"),
            Running::Screen { screen, .. } => format!("screen {screen}"),
        }
    }

    /// Sets its stop flag and waits for its thread.
    fn stop(self) {
        let (flag, thread) = match self {
            Running::Generation { abort, thread, .. } => (abort, thread),
            Running::Screen { stop, thread, .. } => (stop, thread),
        };
        flag.store(true, Ordering::Relaxed);
        let _ = thread.join();
    }

    /// Whether `train` is what runs (or ran) here: a re-sent assignment must not start twice.
    fn is_generation(&self, train: &pb::TrainAssignment) -> bool {
        matches!(self, Running::Generation { job, generation, .. }
            if job.as_str() == train.job_id && *generation == Generation(train.generation))
    }

    /// Whether `screen` is being served here now (a finished screen thread may be started again).
    fn is_serving(&self, screen: &pb::ScreenAssignment) -> bool {
        matches!(self, Running::Screen { screen: id, thread, .. }
            if id.as_str() == screen.screen_id && !thread.is_finished())
    }
}

/// Sends step reports in order, retrying through coordinator outages; a superseded generation sets the
/// abort flag.
#[derive(Clone)]
struct Reporter {
    tx: mpsc::UnboundedSender<(pb::StepReport, Option<oneshot::Sender<()>>)>,
}

impl Reporter {
    fn spawn(
        handle: &tokio::runtime::Handle,
        client: Rpc,
        abort: Arc<AtomicBool>,
        give_up_after: Duration,
    ) -> Self {
        let (tx, mut rx) =
            mpsc::unbounded_channel::<(pb::StepReport, Option<oneshot::Sender<()>>)>();
        handle.spawn(async move {
            let policy = RetryPolicy::through_restarts(give_up_after);
            while let Some((report, done)) = rx.recv().await {
                let answer = policy
                    .run_async(|| {
                        let mut request = tonic::Request::new(report.clone());
                        request.set_timeout(Duration::from_secs(10));
                        let mut client = client.clone();
                        async move { client.report_step(request).await }
                    })
                    .await;
                match answer {
                    Ok(response) => {
                        if !response.into_inner().current {
                            abort.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(CallError::Refused(status)) => {
                        tracing::info!("step report refused: {}", status.message());
                        abort.store(true, Ordering::Relaxed);
                    }
                    Err(gave_up) => tracing::warn!("step report dropped: {gave_up}"),
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        });
        Self { tx }
    }

    fn send(&self, report: pb::StepReport) {
        let _ = self.tx.send((report, None));
    }

    /// Sends and waits until the coordinator took it (or the reporter gave up).
    fn send_and_wait(&self, handle: &tokio::runtime::Handle, report: pb::StepReport) {
        let (done, wait) = oneshot::channel();
        if self.tx.send((report, Some(done))).is_ok() {
            let _ = handle.block_on(wait);
        }
    }
}

/// How a generation ended badly, decided where the failure happened (never by searching an error chain),
/// because each outcome is reported differently.
#[derive(Debug, thiserror::Error)]
enum GenerationError {
    /// A newer generation replaced this one: stop quietly.
    #[error("stopped: the generation was superseded")]
    Superseded,
    /// The checkpoint the coordinator named cannot be restored: it falls back to the one before.
    #[error("the checkpoint to restore is unusable: {0}")]
    CheckpointUnusable(RestoreError),
    /// A peer or the coordinator's exchange failed: the group re-forms, the job goes on.
    #[error("group failed: {0:#}")]
    GroupFailed(anyhow::Error),
    /// Anything else fails the job.
    #[error("failed: {0:#}")]
    Fatal(#[from] anyhow::Error),
}

impl From<TrainError> for GenerationError {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Aborted => GenerationError::Superseded,
            TrainError::Collective(e) => GenerationError::GroupFailed(e.into()),
            TrainError::Failed(e) => GenerationError::Fatal(e),
        }
    }
}

macro_rules! fatal_from {
    ($($error:ty),*) => {$(
        impl From<$error> for GenerationError {
            fn from(e: $error) -> Self {
                GenerationError::Fatal(e.into())
            }
        }
    )*};
}
fatal_from!(
    std::io::Error,
    serde_json::Error,
    cellfleet_shared::Error,
    crate::model::ModelError
);

impl From<RestoreError> for GenerationError {
    fn from(e: RestoreError) -> Self {
        match e {
            RestoreError::Unusable { .. } => GenerationError::CheckpointUnusable(e),
            RestoreError::Failed(e) => GenerationError::Fatal(e),
        }
    }
}

/// Runs one generation of a training job as one rank; reports every step and the outcome.
fn run_generation(
    assigned: Assigned,
    args: &WorkerArgs,
    client: Rpc,
    handle: tokio::runtime::Handle,
    abort: Arc<AtomicBool>,
) {
    let train = &assigned.train;
    let give_up = Duration::from_secs_f64(args.reconnect_timeout);
    let reporter = Reporter::spawn(&handle, client.clone(), abort.clone(), give_up);
    let base = pb::StepReport {
        worker_id: assigned.worker_id.to_string(),
        job_id: train.job_id.clone(),
        generation: train.generation,
        rank: train.rank,
        ..pb::StepReport::default()
    };
    // A panic inside libtorch calls (shape errors, out of memory) must still reach the coordinator, or a
    // one-worker job would wait for this rank forever.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_generation(train, args, client, &handle, &abort, &reporter, &base)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(GenerationError::Fatal(anyhow::anyhow!(
            "training panicked: {what}"
        )))
    });
    match outcome {
        Ok(last_step) => {
            eprintln!(
                "job {} generation {} rank {}: done at step {last_step}",
                train.job_id, train.generation, train.rank
            );
            reporter.send_and_wait(
                &handle,
                pb::StepReport {
                    step: last_step,
                    finished: true,
                    ..base
                },
            );
        }
        Err(e) if matches!(e, GenerationError::Superseded) || abort.load(Ordering::Relaxed) => {
            eprintln!(
                "job {} generation {} rank {}: stopped (superseded)",
                train.job_id, train.generation, train.rank
            );
        }
        Err(e) => {
            eprintln!(
                "job {} generation {} rank {}: {e}",
                train.job_id, train.generation, train.rank
            );
            let unusable = matches!(e, GenerationError::CheckpointUnusable(_));
            let fatal = matches!(e, GenerationError::Fatal(_));
            let message = match e {
                GenerationError::Superseded => e.to_string(),
                GenerationError::CheckpointUnusable(e) => e.to_string(),
                GenerationError::GroupFailed(e) | GenerationError::Fatal(e) => format!("{e:#}"),
            };
            reporter.send_and_wait(
                &handle,
                pb::StepReport {
                    error: message,
                    checkpoint_unusable: unusable,
                    fatal,
                    ..base
                },
            );
        }
    }
}

fn train_generation(
    train: &pb::TrainAssignment,
    args: &WorkerArgs,
    client: Rpc,
    handle: &tokio::runtime::Handle,
    abort: &Arc<AtomicBool>,
    reporter: &Reporter,
    base: &pb::StepReport,
) -> Result<u64, GenerationError> {
    let spec: JobSpec =
        serde_json::from_str(&train.spec_json).context("the job specification is unreadable")?;
    let config: TrainConfig = serde_json::from_value(spec.config.clone())
        .context("the job's training configuration is not one this worker understands")?;
    let s3 = S3Options {
        endpoint: spec.s3_endpoint.clone(),
        region: spec.s3_region.clone(),
        ..S3Options::default()
    };
    let corpus = Arc::new(
        Corpus::open(&spec.corpus, &s3)
            .with_context(|| format!("cannot open corpus {}", spec.corpus))?,
    );
    // The coordinator planned the cursor from its own reading of the manifest; a worker that sees another
    // corpus must not train on it.
    let epoch_len = EpochPlan::part_len(
        &corpus.manifest,
        config.order(config.augmentation),
        config.split,
        SplitPart::Train,
    )?;
    let cursor = cursor_at_step(epoch_len.max(1), config.batch_size, train.start_step);
    let genes = corpus.manifest.genes.len() as u64;
    if (epoch_len, genes) != (train.epoch_len, train.n_genes)
        || cursor != (train.start_epoch, train.start_position)
    {
        return Err(anyhow::anyhow!(
            "corpus {} differs from the coordinator's: here {epoch_len} training samples per epoch and {genes} genes, there {} and {}",
            spec.corpus,
            train.epoch_len,
            train.n_genes
        ).into());
    }
    let threads = if spec.threads > 0 {
        spec.threads as usize
    } else {
        args.threads.max(1)
    };
    let run = RunOptions {
        device: parse_device(&args.device)?,
        threads,
        out: OutputDir::open(&spec.out, &s3)?,
        progress: false,
        log_every: 25,
    };
    let (rank, world) = (train.rank as usize, train.world_size as usize);
    let timeout = Duration::from_millis(spec.collective_timeout_ms);
    // Restoring a checkpoint can take long (and longer on some ranks than others): it happens before the
    // group forms, and the ranks wait for each other at a barrier whose wait is not the collective
    // timeout. A rank that dies meanwhile re-forms the generation, which ends the wait with an error.
    let checkpointing =
        generation_checkpointing(train, &spec, &s3, &client, &base.worker_id, handle, abort)?;
    let started = Instant::now();
    let store = Arc::new(CoordinatorRendezvous {
        client,
        handle: handle.clone(),
        job: JobId::new(train.job_id.clone()),
        generation: Generation(train.generation),
    });
    if world > 1 && train.start_step > 0 {
        let barrier = || -> anyhow::Result<()> {
            store.set(&format!("restored/{rank}"), b"1")?;
            for peer in 0..world {
                store.get(&format!("restored/{peer}"), RESTORE_BARRIER_TIMEOUT)?;
            }
            Ok(())
        };
        barrier().map_err(GenerationError::GroupFailed)?;
    }
    let mut group = collective::connect(
        store,
        "",
        rank,
        world,
        run.device,
        &args.advertise_host,
        timeout,
    )
    .map_err(|e| GenerationError::GroupFailed(e.into()))?;
    let m = &crate::metrics::TRAIN;
    m.generation.set(train.generation as f64);
    m.rank.set(rank as f64);
    m.world.set(world as f64);
    m.generations_joined.add(1.0);
    eprintln!(
        "job {} generation {}: rank {rank} of {world} ({} group ready in {:.2}s), from step {}",
        train.job_id,
        train.generation,
        group.backend(),
        started.elapsed().as_secs_f64(),
        train.start_step
    );
    // Each rank logs its own samples, through the output location (a directory, or the object store
    // when the workers share no disk).
    let mut sample_log = if spec.sample_log {
        let name = format!("samples/g{}-r{rank}.jsonl", train.generation);
        Some(run.out.line_log(&name, None)?)
    } else {
        None
    };
    let mut on_step = |record: &StepRecord, batch: &cellfleet_shared::stream::batch::Batch| {
        if let Some(log) = sample_log.as_mut() {
            let samples: Vec<(u64, u32)> =
                batch.sample_ids.iter().map(|s| (s.cell, s.clone)).collect();
            let line = SampleLogLine {
                step: record.step,
                generation: Generation(train.generation),
                rank: Rank(train.rank),
                samples: &samples,
            };
            log.append(&serde_json::to_string(&line)?)?;
        }
        reporter.send(pb::StepReport {
            step: record.step,
            loss: record.loss,
            accuracy: record.accuracy,
            grad_norm: record.grad_norm,
            lr: record.lr,
            samples: batch.samples as u64,
            tokens: record.tokens,
            seconds: record.seconds,
            ..base.clone()
        });
        Ok(())
    };
    let end_step = checkpointing
        .stop_after
        .unwrap_or(config.steps)
        .min(config.steps);
    pretrain_with(
        corpus,
        &config,
        &run,
        &mut Participation {
            collective: group.as_mut(),
            start_step: train.start_step,
            abort: Some(abort),
            on_step: Some(&mut on_step),
            checkpointing,
        },
    )?;
    Ok(end_step)
}

/// How long rank 0 keeps asking an unreachable coordinator to record a checkpoint.
const COMMIT_RETRY_FOR: Duration = Duration::from_secs(60);

/// How long ranks wait for each other to finish restoring a checkpoint (a rank lost meanwhile ends the
/// wait sooner: the generation is re-formed).
const RESTORE_BARRIER_TIMEOUT: Duration = Duration::from_secs(600);

/// What a generation restores (every rank reads the checkpoint the coordinator names) and saves (rank 0,
/// committing each checkpoint through the coordinator before moving `latest`).
fn generation_checkpointing(
    train: &pb::TrainAssignment,
    spec: &JobSpec,
    s3: &S3Options,
    client: &Rpc,
    worker_id: &str,
    handle: &tokio::runtime::Handle,
    abort: &Arc<AtomicBool>,
) -> Result<Checkpointing, GenerationError> {
    let resume = if train.start_step > 0 {
        if train.restore_url.is_empty() {
            return Err(anyhow::anyhow!(
                "the coordinator asked to start at step {} without naming a checkpoint",
                train.start_step
            )
            .into());
        }
        let started = Instant::now();
        if !train.restore_manifest_blake3.is_empty() {
            let manifest = open_run(&train.restore_url, s3)?
                .manifest(train.start_step)?
                .map_err(|p| anyhow::anyhow!("{p}"))?;
            let hash = blake3::hash(&serde_json::to_vec_pretty(&manifest)?)
                .to_hex()
                .to_string();
            if hash != train.restore_manifest_blake3 {
                return Err(RestoreError::unusable(Problem {
                    step: train.start_step,
                    object: MANIFEST_FILE.into(),
                    what: format!(
                        "blake3 {hash}, but the coordinator recorded {} (overwritten since)",
                        train.restore_manifest_blake3
                    ),
                })
                .into());
            }
        }
        let restored = restore(
            &ResumeTarget::Step(train.start_step),
            Some(&train.restore_url),
            s3,
        )?;
        eprintln!(
            "job {} generation {}: restored checkpoint step {} from {} in {:.2}s",
            train.job_id,
            train.generation,
            train.start_step,
            train.restore_url,
            started.elapsed().as_secs_f64()
        );
        Some(restored)
    } else {
        None
    };
    let writer = match &spec.checkpoint {
        Some(ckpt) if train.rank == 0 => {
            let store_options = S3Options {
                retry_timeout: Some(Duration::from_millis(ckpt.store_retry_ms.max(1))),
                ..s3.clone()
            };
            let checkpoints = open_run(&ckpt.url, &store_options)?;
            let (client, handle) = (client.clone(), handle.clone());
            let (job_id, generation, worker_id, url) = (
                train.job_id.clone(),
                train.generation,
                worker_id.to_string(),
                ckpt.url.clone(),
            );
            let gate: CommitGate = Arc::new(move |manifest: &CheckpointManifest| {
                let bytes = serde_json::to_vec_pretty(manifest)?;
                let commit = pb::CheckpointCommit {
                    worker_id: worker_id.clone(),
                    job_id: job_id.clone(),
                    generation,
                    step: manifest.step,
                    url: url.clone(),
                    manifest_blake3: blake3::hash(&bytes).to_hex().to_string(),
                };
                // Retried through a coordinator restart, like step reports; a refusal is an answer.
                let answer = RetryPolicy::through_restarts(COMMIT_RETRY_FOR)
                    .run(|| {
                        let mut request = tonic::Request::new(commit.clone());
                        request.set_timeout(Duration::from_secs(10));
                        handle
                            .block_on(client.clone().commit_checkpoint(request))
                            .map(tonic::Response::into_inner)
                    })
                    .map_err(|e| {
                        anyhow::anyhow!("the coordinator did not record the checkpoint: {e}")
                    })?;
                if !answer.accepted {
                    eprintln!(
                        "checkpoint step {} not committed: {}",
                        manifest.step, answer.reason
                    );
                }
                Ok(answer.accepted)
            });
            Some(CheckpointWriter::new(
                checkpoints,
                CheckpointPolicy::of(ckpt),
                Some(gate),
                Some(abort.clone()),
            ))
        }
        _ => None,
    };
    Ok(Checkpointing {
        resume,
        writer,
        stop_after: spec.stop_after,
        generation: train.generation,
    })
}

/// `cellfleet worker`: serves the coordinator until killed.
pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    if let Some(gpus) = &args.gpus {
        return super::gpus::supervise(&args, gpus);
    }
    parse_device(&args.device)?;
    let mut args = args;
    if args.advertise_host == "auto" {
        args.advertise_host = route_to(&args.coordinator)?;
    }
    let rt = runtime()?;
    let _entered = rt.enter();
    let client = crate::link::connect(&args.coordinator)?;
    let metrics_label = Arc::new(std::sync::Mutex::new(String::new()));
    if let Some(address) = &args.metrics_listen {
        let listener = rt
            .block_on(cellfleet_shared::telemetry::bind_metrics(address))
            .map_err(anyhow::Error::msg)?;
        eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
        let (label, device) = (metrics_label.clone(), args.device.clone());
        let render = cellfleet_shared::telemetry::render_with(move || {
            let worker = label.lock().map(|l| l.clone()).unwrap_or_default();
            crate::metrics::render(&worker, &device)
        });
        rt.spawn(cellfleet_shared::telemetry::serve_metrics(listener, render));
    }
    crate::metrics::CONNECTED.set(0.0);
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    let mut worker_id = WorkerId::default();
    let mut current: Option<Running> = None;
    loop {
        let registered = register(&rt, &client, &args, &hostname, worker_id.as_str())?;
        if !registered.resumed {
            if let Some(run) = current.take() {
                eprintln!("membership lapsed; abandoning {}", run.describe());
                run.stop();
            }
            eprintln!(
                "registered with {} as {}",
                args.coordinator, registered.worker_id
            );
        }
        worker_id = WorkerId::new(registered.worker_id.clone());
        if let Ok(mut label) = metrics_label.lock() {
            label.clone_from(&registered.worker_id);
        }
        // A heartbeat refused because the lease lapsed (this process was stalled, or partitioned) ends the
        // stream below, so the worker registers again as a new member.
        let lapsed = Arc::new(tokio::sync::Notify::new());
        let heartbeat = spawn_heartbeat(&rt, &client, &registered, lapsed.clone());
        let stream = rt.block_on(client.clone().assignments(pb::AssignmentsRequest {
            worker_id: worker_id.to_string(),
        }));
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(status) => {
                heartbeat.abort();
                tracing::debug!("assignments: {}", status.message());
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
        };
        crate::metrics::CONNECTED.set(1.0);
        loop {
            let next = rt.block_on(async {
                tokio::select! {
                    message = stream.message() => message.ok().flatten(),
                    _ = lapsed.notified() => None,
                }
            });
            let Some(message) = next else { break };
            let worker = WorkerContext {
                args: &args,
                worker_id: &worker_id,
                client: &client,
                handle: rt.handle(),
            };
            follow_assignment(message, &worker, &mut current)?;
        }
        heartbeat.abort();
        crate::metrics::CONNECTED.set(0.0);
        eprintln!("lost the coordinator's assignment stream; reconnecting");
    }
}

/// The local address of the route to the coordinator at `url`: what a peer on the coordinator's network
/// reaches this host at. A UDP `connect` only picks the route; nothing is sent.
fn route_to(url: &str) -> anyhow::Result<String> {
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let target = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .with_context(|| {
            format!("cannot resolve the coordinator address {authority} (from {url})")
        })?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))?;
    let local: std::net::SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(target).with_context(|| {
        format!("no route to the coordinator at {target}: pass --advertise-host")
    })?;
    let address = socket.local_addr()?.ip().to_string();
    eprintln!("advertising {address} to other workers (the address of the route to {authority})");
    Ok(address)
}

/// Registers (again): keeps the id (and membership) when the lease is still alive; retried through a
/// coordinator restart for up to `--reconnect-timeout`.
fn register(
    rt: &Runtime,
    client: &Rpc,
    args: &WorkerArgs,
    hostname: &str,
    worker_id: &str,
) -> anyhow::Result<pb::RegisterWorkerResponse> {
    RetryPolicy::through_restarts(Duration::from_secs_f64(args.reconnect_timeout))
        .run(|| {
            let request = pb::RegisterWorkerRequest {
                worker_id: worker_id.to_string(),
                hostname: hostname.to_string(),
                pid: std::process::id(),
                device: args.device.clone(),
            };
            rt.block_on(client.clone().register_worker(request))
                .map(tonic::Response::into_inner)
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "registering with the coordinator at {}: {e}",
                args.coordinator
            )
        })
}

/// Heartbeats every interval the coordinator asked for; notifies `lapsed` when the coordinator no longer
/// knows this worker.
fn spawn_heartbeat(
    rt: &Runtime,
    client: &Rpc,
    registered: &pb::RegisterWorkerResponse,
    lapsed: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    let (client, id) = (client.clone(), registered.worker_id.clone());
    let every = Duration::from_millis(registered.heartbeat_interval_ms.max(100));
    rt.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let request = pb::HeartbeatRequest {
                worker_id: id.clone(),
            };
            match client.clone().heartbeat(request).await {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => {
                    eprintln!("{}", status.message());
                    lapsed.notify_one();
                    return;
                }
                Err(status) => tracing::debug!("heartbeat: {}", status.message()),
            }
        }
    })
}

/// What a worker's assignment threads need of it.
struct WorkerContext<'a> {
    args: &'a WorkerArgs,
    worker_id: &'a WorkerId,
    client: &'a Rpc,
    handle: &'a tokio::runtime::Handle,
}

/// Acts on one assignment: starts a generation or a screen (stopping what ran before), or goes idle.
fn follow_assignment(
    message: pb::Assignment,
    worker: &WorkerContext<'_>,
    current: &mut Option<Running>,
) -> anyhow::Result<()> {
    match message.kind {
        Some(pb::assignment::Kind::Train(train)) => {
            // The same assignment again (the coordinator restarted and re-sent it): the generation runs or
            // already ran here; never start it twice.
            if current.as_ref().is_some_and(|r| r.is_generation(&train)) {
                return Ok(());
            }
            if let Some(run) = current.take() {
                run.stop();
            }
            *current = Some(start_generation(train, worker)?);
        }
        Some(pb::assignment::Kind::Screen(screen)) => {
            // The same screen again (re-sent after a coordinator restart) goes on where it is.
            if current.as_ref().is_some_and(|r| r.is_serving(&screen)) {
                return Ok(());
            }
            if let Some(run) = current.take() {
                run.stop();
            }
            *current = Some(start_screen(screen, worker)?);
        }
        Some(pb::assignment::Kind::Idle(idle)) => {
            if let Some(run) = current.take() {
                eprintln!("idle ({}); stopping {}", idle.reason, run.describe());
                run.stop();
            }
        }
        None => {}
    }
    Ok(())
}

/// Starts one generation of a training job on its own thread.
fn start_generation(
    train: pb::TrainAssignment,
    worker: &WorkerContext<'_>,
) -> anyhow::Result<Running> {
    let abort = Arc::new(AtomicBool::new(false));
    let (job, generation) = (
        JobId::new(train.job_id.clone()),
        Generation(train.generation),
    );
    let assigned = Assigned {
        train,
        worker_id: worker.worker_id.clone(),
    };
    let (args, client, handle, flag) = (
        worker.args.clone(),
        worker.client.clone(),
        worker.handle.clone(),
        abort.clone(),
    );
    let thread = std::thread::Builder::new()
        .name(format!("cellfleet-train-g{generation}"))
        .spawn(move || run_generation(assigned, &args, client, handle, flag))?;
    Ok(Running::Generation {
        job,
        generation,
        abort,
        thread,
    })
}

/// Starts serving a screen's units on their own thread.
fn start_screen(
    screen: pb::ScreenAssignment,
    worker: &WorkerContext<'_>,
) -> anyhow::Result<Running> {
    let stop = Arc::new(AtomicBool::new(false));
    let device = parse_device(&worker.args.device)?;
    let (worker_id, client, handle, flag) = (
        worker.worker_id.to_string(),
        worker.client.clone(),
        worker.handle.clone(),
        stop.clone(),
    );
    let id = ScreenId::new(screen.screen_id.clone());
    let thread = std::thread::Builder::new()
        .name("cellfleet-screen".into())
        .spawn(move || {
            if screen.threads > 0 {
                tch::set_num_threads(screen.threads as i32);
            }
            if let Err(e) = serve_screen(screen, &worker_id, device, client, handle, flag) {
                eprintln!("screen work stopped: {e:#}");
            }
        })?;
    Ok(Running::Screen {
        screen: id,
        stop,
        thread,
    })
}

#[cfg(test)]
mod tests {
    use super::route_to;

    #[test]
    fn the_advertised_address_is_the_route_to_the_coordinator() {
        assert_eq!(route_to("http://127.0.0.1:7070").unwrap(), "127.0.0.1");
        assert_eq!(route_to("https://127.0.0.1:7070/").unwrap(), "127.0.0.1");
        let unknown = route_to("http://no-such-host.invalid:7070").unwrap_err();
        assert!(format!("{unknown:#}").contains("cannot resolve the coordinator address"));
    }
}
