//! Cluster training from the worker's side: `cellfleet worker` (register, heartbeat, follow assignments,
//! train one generation at a time), `cellfleet train --coordinator` (submit a job and follow it), and the
//! embedded default `cellfleet train --local --workers N` (an in-process coordinator with in-memory
//! metadata and N worker processes of this binary).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cellfleet_coordinator::spec::{CheckpointSpec, RestorePoint};
use cellfleet_coordinator::{CoordinatorConfig, JobSpec};
use cellfleet_proto as pb;
use cellfleet_proto::coordinator_client::CoordinatorClient;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::meta::MemoryStore;
use cellfleet_shared::store::S3Options;
use cellfleet_shared::stream::{cursor_at_step, EpochPlan, SplitPart};
use clap::Args;
use serde::Serialize;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::Code;

use crate::checkpointing::{
    open_run, restore, CheckpointPolicy, CheckpointWriter, CommitGate, ResumeTarget, Unusable,
};
use crate::collective::{self, CollectiveError, RendezvousStore};
use crate::model::parse_device;
use crate::screen::serve_screen;
use crate::train::{
    pretrain_parallel, Aborted, Checkpointing, Parallel, RunOptions, StepRecord, TrainConfig,
};
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
    /// Address other workers reach this one at (the collectives' TCP transport)
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// Give up when the coordinator cannot be reached for this many seconds
    #[arg(long, default_value_t = 120.0)]
    pub reconnect_timeout: f64,
}

pub(crate) fn channel(url: &str) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("{url} is not a coordinator URL (expected http://HOST:PORT)"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // A coordinator host that vanishes without a reset is noticed within seconds, not at the TCP
        // timeout.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    // Lazy: the channel reconnects by itself after the coordinator restarts.
    Ok(endpoint.connect_lazy())
}

pub(crate) fn runtime() -> anyhow::Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Gloo's rendezvous store (and NCCL's unique id) over the coordinator's key-value exchange, scoped to one
/// generation of one job.
struct CoordinatorRendezvous {
    client: CoordinatorClient<Channel>,
    handle: tokio::runtime::Handle,
    job: String,
    generation: u64,
}

impl RendezvousStore for CoordinatorRendezvous {
    fn set(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let request = pb::KvSetRequest {
            job_id: self.job.clone(),
            generation: self.generation,
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
            job_id: self.job.clone(),
            generation: self.generation,
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
    generation: u64,
    rank: u32,
    /// (cell, clone) pairs.
    samples: &'a [(u64, u32)],
}

struct Assigned {
    train: pb::TrainAssignment,
    worker_id: String,
}

/// A generation running on its own thread.
struct RunningGeneration {
    job: String,
    generation: u64,
    abort: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl RunningGeneration {
    fn stop(self) {
        self.abort.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
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
        client: CoordinatorClient<Channel>,
        abort: Arc<AtomicBool>,
        give_up_after: Duration,
    ) -> Self {
        let (tx, mut rx) =
            mpsc::unbounded_channel::<(pb::StepReport, Option<oneshot::Sender<()>>)>();
        handle.spawn(async move {
            while let Some((report, done)) = rx.recv().await {
                let started = Instant::now();
                loop {
                    let mut request = tonic::Request::new(report.clone());
                    request.set_timeout(Duration::from_secs(10));
                    match client.clone().report_step(request).await {
                        Ok(response) => {
                            if !response.into_inner().current {
                                abort.store(true, Ordering::Relaxed);
                            }
                            break;
                        }
                        Err(status)
                            if matches!(
                                status.code(),
                                Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument
                            ) =>
                        {
                            tracing::info!("step report refused: {}", status.message());
                            abort.store(true, Ordering::Relaxed);
                            break;
                        }
                        Err(status) => {
                            if started.elapsed() > give_up_after {
                                tracing::warn!("step report dropped: {}", status.message());
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
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

/// Runs one generation of a training job as one rank; reports every step and the outcome.
fn run_generation(
    assigned: Assigned,
    args: &WorkerArgs,
    client: CoordinatorClient<Channel>,
    handle: tokio::runtime::Handle,
    abort: Arc<AtomicBool>,
) {
    let train = &assigned.train;
    let give_up = Duration::from_secs_f64(args.reconnect_timeout);
    let reporter = Reporter::spawn(&handle, client.clone(), abort.clone(), give_up);
    let base = pb::StepReport {
        worker_id: assigned.worker_id.clone(),
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
        Err(anyhow::anyhow!("training panicked: {what}"))
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
        Err(e) if e.downcast_ref::<Aborted>().is_some() || abort.load(Ordering::Relaxed) => {
            eprintln!(
                "job {} generation {} rank {}: stopped (superseded)",
                train.job_id, train.generation, train.rank
            );
        }
        Err(e) if e.chain().any(|c| c.downcast_ref::<Unusable>().is_some()) => {
            eprintln!(
                "job {} generation {} rank {}: the checkpoint to restore is unusable: {e:#}",
                train.job_id, train.generation, train.rank
            );
            reporter.send_and_wait(
                &handle,
                pb::StepReport {
                    error: format!("{e:#}"),
                    checkpoint_unusable: true,
                    ..base
                },
            );
        }
        Err(e) => {
            let peer = e.downcast_ref::<CollectiveError>().is_some()
                || e.chain()
                    .any(|c| c.downcast_ref::<tonic::Status>().is_some());
            eprintln!(
                "job {} generation {} rank {}: {}{e:#}",
                train.job_id,
                train.generation,
                train.rank,
                if peer { "group failed: " } else { "failed: " }
            );
            reporter.send_and_wait(
                &handle,
                pb::StepReport {
                    error: format!("{e:#}"),
                    fatal: !peer,
                    ..base
                },
            );
        }
    }
}

fn train_generation(
    train: &pb::TrainAssignment,
    args: &WorkerArgs,
    client: CoordinatorClient<Channel>,
    handle: &tokio::runtime::Handle,
    abort: &Arc<AtomicBool>,
    reporter: &Reporter,
    base: &pb::StepReport,
) -> anyhow::Result<u64> {
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
        bail!(
            "corpus {} differs from the coordinator's: here {epoch_len} training samples per epoch and {genes} genes, there {} and {}",
            spec.corpus,
            train.epoch_len,
            train.n_genes
        );
    }
    let threads = if spec.threads > 0 {
        spec.threads as usize
    } else {
        args.threads.max(1)
    };
    let run = RunOptions {
        device: parse_device(&args.device)?,
        threads,
        out: PathBuf::from(&spec.out),
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
        job: train.job_id.clone(),
        generation: train.generation,
    });
    if world > 1 && train.start_step > 0 {
        store.set(&format!("restored/{rank}"), b"1")?;
        for peer in 0..world {
            store.get(&format!("restored/{peer}"), RESTORE_BARRIER_TIMEOUT)?;
        }
    }
    let mut group = collective::connect(
        store,
        "",
        rank,
        world,
        run.device,
        &args.advertise_host,
        timeout,
    )?;
    eprintln!(
        "job {} generation {}: rank {rank} of {world} ({} group ready in {:.2}s), from step {}",
        train.job_id,
        train.generation,
        group.backend(),
        started.elapsed().as_secs_f64(),
        train.start_step
    );
    let mut sample_log = if spec.sample_log {
        let dir = Path::new(&spec.out).join("samples");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("g{}-r{rank}.jsonl", train.generation));
        Some(fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?)
    } else {
        None
    };
    let mut on_step = |record: &StepRecord, batch: &cellfleet_shared::batch::Batch| {
        if let Some(log) = sample_log.as_mut() {
            let samples: Vec<(u64, u32)> =
                batch.sample_ids.iter().map(|s| (s.cell, s.clone)).collect();
            let line = SampleLogLine {
                step: record.step,
                generation: train.generation,
                rank: train.rank,
                samples: &samples,
            };
            writeln!(log, "{}", serde_json::to_string(&line)?)?;
            log.flush()?;
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
    pretrain_parallel(
        corpus,
        &config,
        &run,
        &mut Parallel {
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
    client: &CoordinatorClient<Channel>,
    worker_id: &str,
    handle: &tokio::runtime::Handle,
    abort: &Arc<AtomicBool>,
) -> anyhow::Result<Checkpointing> {
    let resume = if train.start_step > 0 {
        if train.restore_url.is_empty() {
            bail!(
                "the coordinator asked to start at step {} without naming a checkpoint",
                train.start_step
            );
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
                return Err(Unusable(Problem {
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
                let started = Instant::now();
                let answer = loop {
                    let mut request = tonic::Request::new(commit.clone());
                    request.set_timeout(Duration::from_secs(10));
                    match handle.block_on(client.clone().commit_checkpoint(request)) {
                        Ok(answer) => break answer.into_inner(),
                        Err(status) if started.elapsed() < COMMIT_RETRY_FOR => {
                            tracing::info!("checkpoint commit retried: {}", status.message());
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        Err(status) => bail!(
                            "the coordinator did not record the checkpoint: {}",
                            status.message()
                        ),
                    }
                };
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
    parse_device(&args.device)?;
    let rt = runtime()?;
    let handle = rt.handle().clone();
    let _entered = rt.enter();
    let client = CoordinatorClient::new(channel(&args.coordinator)?);
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    let give_up = Duration::from_secs_f64(args.reconnect_timeout);
    let mut worker_id = String::new();
    let mut current: Option<RunningGeneration> = None;
    loop {
        // (Re)register: keeps the id (and membership) when the lease is still alive.
        let started = Instant::now();
        let registered = loop {
            let request = pb::RegisterWorkerRequest {
                worker_id: worker_id.clone(),
                hostname: hostname.clone(),
                pid: std::process::id(),
                device: args.device.clone(),
            };
            match rt.block_on(client.clone().register_worker(request)) {
                Ok(response) => break response.into_inner(),
                Err(status) => {
                    if started.elapsed() > give_up {
                        bail!(
                            "cannot reach the coordinator at {} for {:.0}s: {}",
                            args.coordinator,
                            give_up.as_secs_f64(),
                            status.message()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        };
        if !registered.resumed {
            if let Some(run) = current.take() {
                eprintln!("membership lapsed; abandoning job {}", run.job);
                run.stop();
            }
            eprintln!(
                "registered with {} as {}",
                args.coordinator, registered.worker_id
            );
        }
        worker_id = registered.worker_id.clone();
        // A heartbeat refused because the lease lapsed (this process was stalled, or partitioned) ends the
        // stream below, so the worker registers again as a new member.
        let lapsed = Arc::new(tokio::sync::Notify::new());
        let heartbeat = {
            let (client, id, lapsed) = (client.clone(), worker_id.clone(), lapsed.clone());
            let every = Duration::from_millis(registered.heartbeat_interval_ms.max(100));
            handle.spawn(async move {
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
        };
        let stream = rt.block_on(client.clone().assignments(pb::AssignmentsRequest {
            worker_id: worker_id.clone(),
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
        loop {
            let next = rt.block_on(async {
                tokio::select! {
                    message = stream.message() => message.ok().flatten(),
                    _ = lapsed.notified() => None,
                }
            });
            let Some(message) = next else { break };
            match message.kind {
                Some(pb::assignment::Kind::Train(train)) => {
                    // The same assignment again (the coordinator restarted and re-sent it): the generation
                    // runs or already ran here; never start it twice.
                    if current
                        .as_ref()
                        .is_some_and(|r| r.job == train.job_id && r.generation == train.generation)
                    {
                        continue;
                    }
                    if let Some(run) = current.take() {
                        run.stop();
                    }
                    let abort = Arc::new(AtomicBool::new(false));
                    let assigned = Assigned {
                        train: train.clone(),
                        worker_id: worker_id.clone(),
                    };
                    let (args, client, handle, flag) =
                        (args.clone(), client.clone(), handle.clone(), abort.clone());
                    let thread = std::thread::Builder::new()
                        .name(format!("cellfleet-train-g{}", train.generation))
                        .spawn(move || run_generation(assigned, &args, client, handle, flag))?;
                    current = Some(RunningGeneration {
                        job: train.job_id,
                        generation: train.generation,
                        abort,
                        thread,
                    });
                }
                Some(pb::assignment::Kind::Screen(screen)) => {
                    // Generation 0 marks screen work; the same screen again (re-sent after a coordinator
                    // restart) goes on where it is.
                    if current.as_ref().is_some_and(|r| {
                        r.job == screen.screen_id && r.generation == 0 && !r.thread.is_finished()
                    }) {
                        continue;
                    }
                    if let Some(run) = current.take() {
                        run.stop();
                    }
                    let stop = Arc::new(AtomicBool::new(false));
                    let device = parse_device(&args.device)?;
                    let (worker, client, handle, flag) = (
                        worker_id.clone(),
                        client.clone(),
                        handle.clone(),
                        stop.clone(),
                    );
                    let id = screen.screen_id.clone();
                    let thread = std::thread::Builder::new()
                        .name("cellfleet-screen".into())
                        .spawn(move || {
                            if screen.threads > 0 {
                                tch::set_num_threads(screen.threads as i32);
                            }
                            if let Err(e) =
                                serve_screen(screen, &worker, device, client, handle, flag)
                            {
                                eprintln!("screen work stopped: {e:#}");
                            }
                        })?;
                    current = Some(RunningGeneration {
                        job: id,
                        generation: 0,
                        abort: stop,
                        thread,
                    });
                }
                Some(pb::assignment::Kind::Idle(idle)) => {
                    if let Some(run) = current.take() {
                        eprintln!("idle ({}); stopping job {}", idle.reason, run.job);
                        run.stop();
                    }
                }
                None => {}
            }
        }
        heartbeat.abort();
        eprintln!("lost the coordinator's assignment stream; reconnecting");
    }
}

/// Where and how `cellfleet train` runs a cluster job.
pub struct ClusterJob {
    pub corpus: String,
    pub s3: S3Options,
    pub config: TrainConfig,
    pub out: PathBuf,
    pub min_workers: u32,
    pub max_workers: u32,
    pub threads: u32,
    pub collective_timeout: Duration,
    pub sample_log: bool,
    pub checkpoint: Option<CheckpointSpec>,
    pub resume: Option<RestorePoint>,
    pub stop_after: Option<u64>,
}

impl ClusterJob {
    fn spec(&self) -> anyhow::Result<JobSpec> {
        fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        // Workers may run elsewhere (another directory, another node on a shared filesystem).
        let out = fs::canonicalize(&self.out)?;
        let corpus = if Path::new(&self.corpus).exists() {
            fs::canonicalize(&self.corpus)?.display().to_string()
        } else {
            self.corpus.clone()
        };
        Ok(JobSpec {
            corpus,
            s3_endpoint: self.s3.endpoint.clone(),
            s3_region: self.s3.region.clone(),
            config: serde_json::to_value(&self.config)?,
            out: out.display().to_string(),
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            threads: self.threads,
            collective_timeout_ms: self.collective_timeout.as_millis() as u64,
            sample_log: self.sample_log,
            checkpoint: self.checkpoint.clone().map(|c| CheckpointSpec {
                url: absolute_location(&c.url),
                ..c
            }),
            resume: self.resume.clone().map(|r| RestorePoint {
                url: absolute_location(&r.url),
                ..r
            }),
            stop_after: self.stop_after,
        })
    }
}

/// A store location as workers elsewhere see it: relative paths are made absolute.
fn absolute_location(url: &str) -> String {
    if url.contains("://") {
        return url.to_string();
    }
    std::path::absolute(url).map_or_else(|_| url.to_string(), |p| p.display().to_string())
}

/// Submits `job`; the error carries the coordinator's reason for refusing it.
fn submit(
    rt: &Runtime,
    client: &mut CoordinatorClient<Channel>,
    url: &str,
    job: &ClusterJob,
) -> anyhow::Result<String> {
    let spec = serde_json::to_string(&job.spec()?)?;
    Ok(rt
        .block_on(client.submit_job(pb::SubmitJobRequest { spec_json: spec }))
        .map_err(|s| anyhow::anyhow!("the coordinator at {url} refused the job: {}", s.message()))?
        .into_inner()
        .job_id)
}

/// Submits `job` to the coordinator at `url` and follows it to the end; returns the final status.
pub fn submit_and_follow(
    url: &str,
    job: &ClusterJob,
    progress: bool,
) -> anyhow::Result<pb::JobStatusResponse> {
    let rt = runtime()?;
    let _entered = rt.enter();
    let mut client = CoordinatorClient::new(channel(url)?);
    let id = submit(&rt, &mut client, url, job)?;
    eprintln!(
        "submitted job {id} to {url} (Ctrl-C stops following, not the job; `cellfleet job cancel {id} --coordinator {url}` stops it)"
    );
    follow(&rt, &mut client, &id, job.config.steps, progress)
}

fn follow(
    rt: &Runtime,
    client: &mut CoordinatorClient<Channel>,
    id: &str,
    steps: u64,
    progress: bool,
) -> anyhow::Result<pb::JobStatusResponse> {
    let bar = crate::progress::step_bar(steps, "train", progress);
    let mut last_message = String::new();
    let mut logged_step = 0u64;
    loop {
        let status = ask_coordinator(|| {
            rt.block_on(client.job_status(pb::JobStatusRequest {
                job_id: id.to_string(),
            }))
            .map(tonic::Response::into_inner)
        })?;
        if status.message != last_message {
            bar.suspend(|| eprintln!("job {id}: {}", status.message));
            last_message = status.message.clone();
        }
        bar.set_position(status.committed_step);
        let summary = format!(
            "loss {:.4} | {} workers, generation {} | {:.0} samples/s",
            status.last_loss, status.world_size, status.generation, status.samples_per_second
        );
        // Without a terminal (no bar), a line every tenth of the job.
        let tenth = (steps / 10).max(1);
        if !progress && status.committed_step / tenth > logged_step / tenth {
            eprintln!("job {id} step {}/{steps}: {summary}", status.committed_step);
            logged_step = status.committed_step;
        }
        bar.set_message(summary);
        match status.state.as_str() {
            "completed" => {
                bar.finish_and_clear();
                return Ok(status);
            }
            "failed" | "cancelled" => {
                bar.finish_and_clear();
                bail!("job {id} {}: {}", status.state, status.message);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Makes `request` until the coordinator answers, for clients following a job or a screen: an unknown id
/// is an error at once; any other failure (a coordinator restarting) is retried every half second for up
/// to 2 minutes.
pub(crate) fn ask_coordinator<T>(
    mut request: impl FnMut() -> Result<T, tonic::Status>,
) -> anyhow::Result<T> {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match request() {
            Ok(answer) => return Ok(answer),
            Err(s) if s.code() == Code::NotFound => bail!("{}", s.message()),
            Err(s) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(120) {
                    bail!("lost the coordinator for 2 minutes: {}", s.message());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// An in-process coordinator (memory metadata) and worker processes of this binary.
pub struct EmbeddedCluster {
    rt: Runtime,
    pub url: String,
    children: Vec<std::process::Child>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl EmbeddedCluster {
    /// Starts the coordinator and `workers` workers of `threads` threads each, logging to `logs/`.
    pub fn start(workers: u32, threads: u32, logs: &Path) -> anyhow::Result<Self> {
        let rt = runtime()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let address = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = rt.spawn(cellfleet_coordinator::serve(
            listener,
            Arc::new(MemoryStore::new()),
            CoordinatorConfig::with_lease_ttl(Duration::from_secs(3)),
            async {
                let _ = stopped.await;
            },
        ));
        let url = format!("http://{address}");
        let exe = std::env::current_exe().context("cannot find the cellfleet binary")?;
        let threads = threads.max(1).to_string();
        fs::create_dir_all(logs).with_context(|| format!("cannot create {}", logs.display()))?;
        let mut children = Vec::new();
        for i in 0..workers {
            let log_path = logs.join(format!("worker-{i}.log"));
            let log = fs::File::create(&log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?;
            children.push(
                std::process::Command::new(&exe)
                    .args(["worker", "--coordinator", &url, "--threads", &threads])
                    .env("CELLFLEET_QUIET", "1")
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .context("cannot start a worker process")?,
            );
        }
        Ok(Self {
            rt,
            url,
            children,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// SIGKILLs worker `index`.
    pub fn kill_worker(&mut self, index: usize) {
        let _ = self.children[index].kill();
        let _ = self.children[index].wait();
    }

    pub fn status(&self, job: &str) -> anyhow::Result<pb::JobStatusResponse> {
        let _entered = self.rt.enter();
        let mut client = CoordinatorClient::new(channel(&self.url)?);
        Ok(self
            .rt
            .block_on(client.job_status(pb::JobStatusRequest {
                job_id: job.to_string(),
            }))?
            .into_inner())
    }

    pub fn submit(&self, job: &ClusterJob) -> anyhow::Result<String> {
        let _entered = self.rt.enter();
        let mut client = CoordinatorClient::new(channel(&self.url)?);
        submit(&self.rt, &mut client, &self.url, job)
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = self.rt.block_on(server);
        }
    }
}

/// The embedded default: an in-process coordinator (memory metadata) and `workers` worker processes.
pub fn run_local(
    job: &ClusterJob,
    workers: u32,
    progress: bool,
) -> anyhow::Result<pb::JobStatusResponse> {
    let logs = job.out.join("workers");
    let cluster = EmbeddedCluster::start(workers, job.threads, &logs)?;
    eprintln!(
        "embedded coordinator on {} with {workers} worker processes (logs in {})",
        cluster.url,
        logs.display()
    );
    submit_and_follow(&cluster.url, job, progress)
}

/// `cellfleet bench cluster`: training throughput with 1 and 2 workers on this machine, and the time from
/// a worker's SIGKILL to the next completed step.
pub fn bench_cluster(corpus: &str, config: &TrainConfig, out: &Path) -> anyhow::Result<()> {
    let job = |workers: u32, threads: u32, steps: u64, name: &str| ClusterJob {
        corpus: corpus.to_string(),
        s3: S3Options::default(),
        config: TrainConfig {
            steps,
            ..config.clone()
        },
        out: out.join(name),
        min_workers: 1,
        max_workers: workers,
        threads,
        collective_timeout: Duration::from_secs(10),
        sample_log: false,
        checkpoint: None,
        resume: None,
        stop_after: None,
    };
    let wait_done =
        |cluster: &EmbeddedCluster, id: &str| -> anyhow::Result<pb::JobStatusResponse> {
            loop {
                let status = cluster.status(id)?;
                match status.state.as_str() {
                    "completed" => return Ok(status),
                    "failed" | "cancelled" => bail!("bench job {id}: {}", status.message),
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        };
    println!(
        "cluster training throughput ({:?} preset, global batch {}, {} steps, corpus {corpus})",
        config.preset, config.batch_size, config.steps
    );
    println!("{:<28} {:>12} {:>8}", "", "samples/s", "ratio");
    let mut baseline = None;
    for (workers, threads) in [(1u32, 1u32), (1, 2), (2, 1)] {
        let name = format!("w{workers}t{threads}");
        let cluster = EmbeddedCluster::start(workers, threads, &out.join(&name).join("workers"))?;
        let id = cluster.submit(&job(workers, threads, config.steps, &name))?;
        let status = wait_done(&cluster, &id)?;
        let rate = status.samples_per_second;
        let base = *baseline.get_or_insert(rate);
        println!(
            "{:<28} {:>12.0} {:>7.2}x",
            format!("{workers} worker(s) x {threads} thread(s)"),
            rate,
            rate / base
        );
    }
    // Recovery: 2 workers, kill one after a few steps, time until the re-formed job completes a step.
    let mut cluster = EmbeddedCluster::start(2, 1, &out.join("recovery").join("workers"))?;
    let id = cluster.submit(&job(2, 1, config.steps.max(1000), "recovery"))?;
    loop {
        let status = cluster.status(&id)?;
        if status.world_size == 2 && status.committed_step >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let generation = cluster.status(&id)?.generation;
    let killed = Instant::now();
    cluster.kill_worker(1);
    let step = loop {
        let status = cluster.status(&id)?;
        if status.generation > generation && status.committed_step >= 1 {
            break killed.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    println!(
        "SIGKILL of 1 of 2 workers -> next completed step (re-formed with 1 worker, from step 0): {:.2}s",
        step.as_secs_f64()
    );
    Ok(())
}

/// `cellfleet job ...`: look at and steer jobs on a coordinator.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum JobAction {
    /// A job's state, generation, members and progress
    Status {
        job: String,
        /// Keep printing until the job ends
        #[arg(long)]
        follow: bool,
    },
    /// Stop a pending or running job (its workers go idle)
    Cancel { job: String },
    /// The registered workers and what they serve
    Workers,
}

pub fn job_command(coordinator: &str, action: JobAction) -> anyhow::Result<()> {
    let rt = runtime()?;
    let _entered = rt.enter();
    let mut client = CoordinatorClient::new(channel(coordinator)?);
    let refused = |s: tonic::Status| anyhow::anyhow!("{coordinator}: {}", s.message());
    match action {
        JobAction::Status { job, follow: true } => {
            let status = rt
                .block_on(client.job_status(pb::JobStatusRequest {
                    job_id: job.clone(),
                }))
                .map_err(refused)?
                .into_inner();
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            print_status(&follow(
                &rt,
                &mut client,
                &job,
                status.total_steps,
                progress,
            )?);
        }
        JobAction::Status { job, follow: false } => {
            let status = rt
                .block_on(client.job_status(pb::JobStatusRequest { job_id: job }))
                .map_err(refused)?
                .into_inner();
            print_status(&status);
        }
        JobAction::Cancel { job } => {
            rt.block_on(client.cancel_job(pb::CancelJobRequest {
                job_id: job.clone(),
            }))
            .map_err(refused)?;
            println!("job {job} cancelled");
        }
        JobAction::Workers => {
            let workers = rt
                .block_on(client.list_workers(pb::ListWorkersRequest {}))
                .map_err(refused)?
                .into_inner()
                .workers;
            println!(
                "{:<32} {:<8} {:<8} {:<10} job",
                "worker", "pid", "device", "connected"
            );
            for w in workers {
                println!(
                    "{:<32} {:<8} {:<8} {:<10} {}",
                    w.worker_id,
                    w.pid,
                    w.device,
                    if w.connected { "yes" } else { "no" },
                    if w.job_id.is_empty() { "-" } else { &w.job_id }
                );
            }
        }
    }
    Ok(())
}

fn print_status(s: &pb::JobStatusResponse) {
    println!("job {}: {}", s.job_id, s.state);
    println!("  {}", s.message);
    println!(
        "  step {}/{} (epoch {}, position {}), loss {:.4}, {:.0} samples/s",
        s.committed_step, s.total_steps, s.epoch, s.position, s.last_loss, s.samples_per_second
    );
    println!(
        "  generation {} ({} re-formations), {} workers: {}",
        s.generation,
        s.reformations,
        s.world_size,
        s.members.join(", ")
    );
    if s.has_checkpoint {
        println!(
            "  newest checkpoint: step {} in {}",
            s.checkpoint_step, s.checkpoint_url
        );
    }
}
