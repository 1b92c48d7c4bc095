//! The coordinator: membership (worker leases in the metadata store), the training-job state machine,
//! generations and rank assignment, the global data cursor, and the key-value exchange of rendezvous.
//!
//! All state that must survive a restart lives in the [`MetaStore`] (`workers/<id>` under each worker's
//! lease, `jobs/<id>` records, `kv/<job>/<generation>/<key>`, and the screens' keys of [`crate::screens`]);
//! what is only in memory (open assignment streams, per-rank progress of the running generation, screen
//! rates) is rebuilt as workers reconnect and report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use cellfleet_proto as pb;
use cellfleet_shared::ids::{Generation, JobId, WorkerId};
use cellfleet_shared::meta::{LeaseId, MetaStore};
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::{cursor_at_step, EpochPlan, OrderConfig, SplitPart};

use crate::error::CoordinatorError;
use crate::screens::Screens;
use crate::spec::{JobSpec, OrderFields, RestorePoint};

/// Timing of membership.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A worker whose lease is not renewed for this long stops being a member.
    pub lease_ttl: Duration,
    /// How often workers renew (a third of the TTL by default).
    pub heartbeat_interval: Duration,
    /// How often membership is reconciled with the jobs' needs.
    pub tick: Duration,
}

impl CoordinatorConfig {
    pub fn with_lease_ttl(lease_ttl: Duration) -> Self {
        Self {
            lease_ttl,
            heartbeat_interval: lease_ttl / 3,
            tick: Duration::from_millis(200),
        }
    }
}

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
    pub(crate) fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub(crate) fn is_active(self) -> bool {
        matches!(self, JobState::Pending | JobState::Running)
    }
}

impl From<JobState> for pb::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Completed => pb::JobState::Completed,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
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

/// Earlier checkpoints a job remembers for falling back (retention usually keeps fewer).
const RESTORE_HISTORY: usize = 8;

/// A job whose generations keep failing before their first step is failed instead of retried forever.
const MAX_STALLED_GENERATIONS: u32 = 5;

impl JobRecord {
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
}

/// A worker as stored under `workers/<id>` (attached to its lease).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerRecord {
    id: WorkerId,
    hostname: String,
    pid: u32,
    device: String,
    lease: LeaseId,
}

type AssignmentSender = mpsc::Sender<Result<pb::Assignment, Status>>;

struct Connection {
    tx: AssignmentSender,
    id: u64,
    sent: Option<pb::Assignment>,
}

/// Per-rank progress of a job's current generation (memory only: rebuilt from reports after a restart).
#[derive(Default)]
struct Progress {
    generation: Generation,
    steps: HashMap<u32, u64>,
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
}

#[derive(Default)]
pub(crate) struct Runtime {
    jobs: BTreeMap<JobId, JobRecord>,
    connections: HashMap<WorkerId, Connection>,
    progress: HashMap<JobId, Progress>,
    next_connection: u64,
    pub(crate) screens: Screens,
}

pub struct Coordinator {
    pub(crate) store: Arc<dyn MetaStore>,
    config: CoordinatorConfig,
    pub(crate) runtime: Mutex<Runtime>,
    /// Worker leases, under their own (never awaited) lock so heartbeats never wait behind job updates.
    leases: std::sync::Mutex<HashMap<WorkerId, LeaseId>>,
    kv_changed: Notify,
    pub(crate) wake: Notify,
}

const JOBS: &str = "jobs/";
const WORKERS: &str = "workers/";
const KV: &str = "kv/";

/// A record as JSON for the store; a record that cannot be encoded is a bug.
pub(crate) fn encode(key: &str, record: &impl Serialize) -> Result<Vec<u8>, CoordinatorError> {
    serde_json::to_vec(record)
        .map_err(|e| CoordinatorError::Internal(format!("cannot encode {key}: {e}")))
}

/// A stored record read back; one that does not parse is data loss, named by its key.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    store: &dyn MetaStore,
    key: &str,
    bytes: &[u8],
) -> Result<T, CoordinatorError> {
    serde_json::from_slice(bytes).map_err(|e| CoordinatorError::Corrupt {
        store: store.describe(),
        key: key.to_string(),
        why: e.to_string(),
    })
}

pub(crate) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

impl Coordinator {
    /// Loads the jobs, screens and worker leases the store already holds (a restarted coordinator continues
    /// them).
    pub async fn start(
        store: Arc<dyn MetaStore>,
        config: CoordinatorConfig,
    ) -> Result<Arc<Self>, CoordinatorError> {
        let mut runtime = Runtime::default();
        let mut leases = HashMap::new();
        for (key, entry) in store.list(JOBS).await.map_err(CoordinatorError::store)? {
            let job: JobRecord = decode(&*store, &key, &entry.value)?;
            runtime.jobs.insert(job.id.clone(), job);
        }
        for (key, entry) in store.list(WORKERS).await.map_err(CoordinatorError::store)? {
            let worker: WorkerRecord = decode(&*store, &key, &entry.value)?;
            leases.insert(worker.id, worker.lease);
        }
        runtime.screens = Screens::load(&*store).await?;
        let active = runtime
            .jobs
            .values()
            .filter(|j| j.state.is_active())
            .count();
        if !runtime.jobs.is_empty() {
            tracing::info!(
                "{}: {} jobs ({active} active), {} workers with live leases",
                store.describe(),
                runtime.jobs.len(),
                leases.len()
            );
        }
        Ok(Arc::new(Self {
            store,
            config,
            runtime: Mutex::new(runtime),
            leases: std::sync::Mutex::new(leases),
            kv_changed: Notify::new(),
            wake: Notify::new(),
        }))
    }

    /// Reconciles membership with the jobs every tick (and whenever something changes) until dropped.
    pub async fn run_reconciler(self: Arc<Self>) {
        loop {
            if let Err(e) = self.reconcile().await {
                tracing::warn!("reconcile: {e}");
            }
            let _ = tokio::time::timeout(self.config.tick, self.wake.notified()).await;
        }
    }

    fn lease_table(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, LeaseId>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `record` as JSON under `key`.
    pub(crate) async fn put_record(
        &self,
        key: &str,
        record: &impl Serialize,
    ) -> Result<(), CoordinatorError> {
        self.store
            .put(key, &encode(key, record)?, None)
            .await
            .map_err(CoordinatorError::store)?;
        Ok(())
    }

    async fn save_job(&self, job: &JobRecord) -> Result<(), CoordinatorError> {
        self.put_record(&format!("{JOBS}{}", job.id), job).await
    }

    pub(crate) async fn live_workers(&self) -> Result<HashSet<WorkerId>, CoordinatorError> {
        Ok(self
            .store
            .list(WORKERS)
            .await
            .map_err(CoordinatorError::store)?
            .into_iter()
            .map(|(k, _)| WorkerId::from(&k[WORKERS.len()..]))
            .collect())
    }

    async fn reconcile(&self) -> Result<(), CoordinatorError> {
        let live = self.live_workers().await?;
        let mut rt = self.runtime.lock().await;
        rt.connections.retain(|id, _| live.contains(id));
        self.lease_table().retain(|id, _| live.contains(id));
        let connected: Vec<WorkerId> = {
            let mut ids: Vec<WorkerId> = rt.connections.keys().cloned().collect();
            ids.sort();
            ids
        };
        let mut busy: HashSet<WorkerId> = rt
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .flat_map(|j| j.members.iter().cloned())
            .filter(|id| live.contains(id))
            .collect();
        let active: Vec<JobId> = rt
            .jobs
            .values()
            .filter(|j| j.state.is_active())
            .map(|j| j.id.clone())
            .collect();
        for id in active {
            let job = rt.jobs[&id].clone();
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
            let reason = match job.state {
                JobState::Running if alive.len() < job.members.len() => {
                    let lost: Vec<&WorkerId> =
                        job.members.iter().filter(|m| !live.contains(*m)).collect();
                    Some(format!("lost {}", join(&lost)))
                }
                JobState::Running
                    if rt
                        .progress
                        .get(&id)
                        .is_some_and(|p| p.generation == job.generation && p.reform.is_some()) =>
                {
                    rt.progress.get(&id).and_then(|p| p.reform.clone())
                }
                JobState::Running
                    if rt.progress.get(&id).is_some_and(|p| {
                        p.peer_error_at
                            .is_some_and(|t| t.elapsed() >= self.config.lease_ttl)
                    }) =>
                {
                    Some("a rank reported a failed peer".to_string())
                }
                JobState::Running if !joiners.is_empty() => {
                    Some(format!("admitting {}", join(&joiners)))
                }
                JobState::Pending
                    if alive.len() + joiners.len() >= job.spec.min_workers as usize =>
                {
                    Some("enough workers".to_string())
                }
                _ => None,
            };
            let Some(reason) = reason else { continue };
            let mut members = alive;
            members.extend(joiners);
            busy.extend(members.iter().cloned());
            self.form_generation(&mut rt, &id, members, &reason).await?;
        }
        self.send_assignments(&mut rt);
        Ok(())
    }

    /// Starts a new generation of job `id` with `members` (rank order), or parks it when there are too few.
    async fn form_generation(
        &self,
        rt: &mut Runtime,
        id: &JobId,
        members: Vec<WorkerId>,
        reason: &str,
    ) -> Result<(), CoordinatorError> {
        let job = rt.jobs.get_mut(id).expect("job exists");
        let was_running = job.state == JobState::Running || job.generation > Generation(0);
        if job.state == JobState::Running {
            if job.committed_step > job.start_step {
                job.stalled_generations = 0;
            } else {
                job.stalled_generations += 1;
            }
            if job.stalled_generations >= MAX_STALLED_GENERATIONS {
                job.state = JobState::Failed;
                job.message = format!(
                    "{} generations in a row ended before completing a step (last: {reason}); the workers' logs say why",
                    job.stalled_generations
                );
                tracing::error!("job {id}: {}", job.message);
                let job = job.clone();
                self.save_job(&job).await?;
                return self.clear_exchange(id).await;
            }
        }
        job.generation = job.generation.next();
        // A new generation restarts from the newest committed checkpoint (every rank restores it), or
        // without one from the initial state: re-initialized from the seed and broadcast from rank 0.
        job.start_step = job.restore.as_ref().map_or(0, |r| r.step);
        job.committed_step = job.start_step;
        if members.len() < job.spec.min_workers as usize {
            job.state = JobState::Pending;
            job.message = format!(
                "waiting for workers: {} available, at least {} needed ({reason})",
                members.len(),
                job.spec.min_workers
            );
            job.members = Vec::new();
        } else {
            if was_running && job.generation > Generation(1) {
                job.reformations += 1;
            }
            job.state = JobState::Running;
            job.message = format!(
                "generation {}: {} workers from step {} ({reason})",
                job.generation,
                members.len(),
                job.start_step
            );
            job.members = members;
        }
        tracing::info!("job {id}: {}", job.message);
        let job = job.clone();
        rt.progress.insert(id.clone(), Progress::of(&job));
        self.save_job(&job).await?;
        self.clear_exchange(id).await
    }

    /// Deletes a job's rendezvous keys (of every generation) and wakes anyone waiting on them.
    async fn clear_exchange(&self, id: &JobId) -> Result<(), CoordinatorError> {
        self.store
            .delete_prefix(&format!("{KV}{id}/"))
            .await
            .map_err(CoordinatorError::store)?;
        self.kv_changed.notify_waiters();
        Ok(())
    }

    /// What `worker` should be doing now.
    fn desired(rt: &Runtime, worker: &WorkerId) -> pb::Assignment {
        for job in rt.jobs.values() {
            if job.state != JobState::Running {
                continue;
            }
            if let Some(rank) = job.members.iter().position(|m| m == worker) {
                let (epoch, position) = job.cursor(job.start_step);
                return pb::Assignment {
                    kind: Some(pb::assignment::Kind::Train(pb::TrainAssignment {
                        job_id: job.id.to_string(),
                        generation: job.generation.get(),
                        rank: rank as u32,
                        world_size: job.members.len() as u32,
                        spec_json: serde_json::to_string(&job.spec).unwrap_or_default(),
                        start_step: job.start_step,
                        start_epoch: epoch,
                        start_position: position,
                        epoch_len: job.epoch_len,
                        n_genes: job.n_genes,
                        restore_url: job
                            .restore
                            .as_ref()
                            .map(|r| r.url.clone())
                            .unwrap_or_default(),
                        restore_manifest_blake3: job
                            .restore
                            .as_ref()
                            .map(|r| r.manifest_blake3.clone())
                            .unwrap_or_default(),
                    })),
                };
            }
        }
        // Training takes precedence: a worker on a screen is not busy for a job that needs it.
        if let Some(screen) = rt.screens.assigned() {
            return pb::Assignment {
                kind: Some(pb::assignment::Kind::Screen(screen.assignment())),
            };
        }
        pb::Assignment {
            kind: Some(pb::assignment::Kind::Idle(pb::Idle {
                reason: "no job needs this worker".into(),
            })),
        }
    }

    pub(crate) fn send_assignments(&self, rt: &mut Runtime) {
        let ids: Vec<WorkerId> = rt.connections.keys().cloned().collect();
        for id in ids {
            let desired = Self::desired(rt, &id);
            let connection = rt.connections.get_mut(&id).expect("listed");
            if connection.sent.as_ref() == Some(&desired) {
                continue;
            }
            match connection.tx.try_send(Ok(desired.clone())) {
                Ok(()) => connection.sent = Some(desired),
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    rt.connections.remove(&id);
                }
            }
        }
    }

    async fn lease_of(&self, worker: &WorkerId) -> Result<Option<LeaseId>, CoordinatorError> {
        if let Some(lease) = self.lease_table().get(worker) {
            return Ok(Some(*lease));
        }
        let key = format!("{WORKERS}{worker}");
        let Some(entry) = self
            .store
            .get(&key)
            .await
            .map_err(CoordinatorError::store)?
        else {
            return Ok(None);
        };
        let record: WorkerRecord = decode(&*self.store, &key, &entry.value)?;
        Ok(Some(record.lease))
    }

    pub(crate) fn lapsed(&self, worker: &WorkerId) -> CoordinatorError {
        CoordinatorError::NotAMember {
            worker: worker.clone(),
            lease_ttl: self.config.lease_ttl,
        }
    }

    /// Checks that (job, generation) is current and returns the job.
    async fn current_job(
        &self,
        job_id: &JobId,
        generation: Generation,
    ) -> Result<JobRecord, CoordinatorError> {
        Self::check_current(&*self.runtime.lock().await, job_id, generation)
    }

    fn check_current(
        rt: &Runtime,
        job_id: &JobId,
        generation: Generation,
    ) -> Result<JobRecord, CoordinatorError> {
        let job = rt
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.clone()))?;
        if generation < job.generation {
            return Err(CoordinatorError::SupersededGeneration {
                job: job_id.clone(),
                current: job.generation,
                asked: generation,
            });
        }
        if generation > job.generation {
            return Err(CoordinatorError::NoSuchGeneration {
                job: job_id.clone(),
                current: job.generation,
                asked: generation,
            });
        }
        if job.state != JobState::Running {
            return Err(CoordinatorError::JobNotRunning {
                job: job_id.clone(),
                state: job.state.name(),
            });
        }
        Ok(job.clone())
    }

    fn kv_key(job: &JobId, generation: Generation, key: &str) -> String {
        format!("{KV}{job}/{generation}/{key}")
    }

    fn status_of(job: &JobRecord, progress: Option<&Progress>) -> pb::JobStatusResponse {
        let (epoch, position) = job.cursor(job.committed_step);
        let rate = progress
            .and_then(|p| {
                let elapsed = p.started?.elapsed().as_secs_f64();
                let steps = job.committed_step.saturating_sub(p.started_step);
                (elapsed > 0.0 && steps > 0)
                    .then(|| steps as f64 * f64::from(job.batch_size) / elapsed)
            })
            .unwrap_or(0.0);
        pb::JobStatusResponse {
            job_id: job.id.to_string(),
            state: pb::JobState::from(job.state).into(),
            generation: job.generation.get(),
            world_size: job.members.len() as u32,
            committed_step: job.committed_step,
            total_steps: job.total_steps,
            last_loss: job.last_loss,
            message: job.message.clone(),
            members: job.members.iter().map(WorkerId::to_string).collect(),
            reformations: job.reformations,
            epoch,
            position,
            samples_per_second: rate,
            has_checkpoint: job.restore.is_some(),
            checkpoint_step: job.restore.as_ref().map_or(0, |r| r.step),
            checkpoint_url: job
                .restore
                .as_ref()
                .map(|r| r.url.clone())
                .unwrap_or_default(),
            end_step: job.end_step(),
        }
    }
}

fn join<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| s.as_ref())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The gRPC face of a [`Coordinator`].
#[derive(Clone)]
pub struct Service(pub Arc<Coordinator>);

impl std::ops::Deref for Service {
    type Target = Coordinator;
    fn deref(&self) -> &Coordinator {
        &self.0
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let req = request.into_inner();
        let mut resumed = None;
        if !req.worker_id.is_empty() {
            let previous = WorkerId::from(req.worker_id.as_str());
            if let Some(lease) = self.lease_of(&previous).await? {
                if self
                    .store
                    .keep_alive(lease)
                    .await
                    .map_err(CoordinatorError::store)?
                {
                    resumed = Some((previous, lease));
                }
            }
        }
        let was_resumed = resumed.is_some();
        let (id, lease) = match resumed {
            Some(found) => found,
            None => {
                let host = if req.hostname.is_empty() {
                    "worker"
                } else {
                    &req.hostname
                };
                let lease = self
                    .store
                    .grant_lease(self.config.lease_ttl)
                    .await
                    .map_err(CoordinatorError::store)?;
                // Unique even for containers that share a hostname and pid: the lease id is unique in the
                // store, and the key is created only if absent.
                let nonce = blake3::hash(format!("{}-{lease}-{}", now_ms(), req.pid).as_bytes());
                let id = WorkerId::new(format!("{host}-{}-{}", req.pid, &nonce.to_hex()[..8]));
                let record = WorkerRecord {
                    id: id.clone(),
                    hostname: req.hostname.clone(),
                    pid: req.pid,
                    device: req.device.clone(),
                    lease,
                };
                let key = format!("{WORKERS}{id}");
                let created = self
                    .store
                    .compare_and_put(&key, None, &encode(&key, &record)?, Some(lease))
                    .await
                    .map_err(CoordinatorError::store)?;
                if created.is_none() {
                    let _ = self.store.revoke(lease).await;
                    return Err(CoordinatorError::Conflict(format!(
                        "worker id {id} is taken; register again"
                    ))
                    .into());
                }
                tracing::info!(
                    "worker {id} registered ({} pid {}, {})",
                    req.hostname,
                    req.pid,
                    req.device
                );
                (id, lease)
            }
        };
        self.lease_table().insert(id.clone(), lease);
        self.wake.notify_one();
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: id.into_string(),
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: self.config.lease_ttl.as_millis() as u64,
            resumed: was_resumed,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker = WorkerId::from(request.into_inner().worker_id);
        let lease = self
            .lease_of(&worker)
            .await?
            .ok_or_else(|| self.lapsed(&worker))?;
        if !self
            .store
            .keep_alive(lease)
            .await
            .map_err(CoordinatorError::store)?
        {
            return Err(self.lapsed(&worker).into());
        }
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    type AssignmentsStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Assignment, Status>> + Send>>;

    async fn assignments(
        &self,
        request: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let worker = WorkerId::from(request.into_inner().worker_id);
        let lease = self
            .lease_of(&worker)
            .await?
            .ok_or_else(|| self.lapsed(&worker))?;
        let (tx, rx) = mpsc::channel(16);
        let connection = {
            let mut rt = self.runtime.lock().await;
            rt.next_connection += 1;
            let id = rt.next_connection;
            rt.connections.insert(
                worker.clone(),
                Connection {
                    tx: tx.clone(),
                    id,
                    sent: None,
                },
            );
            id
        };
        // A closed stream means the worker process is gone (a killed process closes its connection at
        // once): end its membership now instead of waiting for the lease to lapse.
        let this = self.0.clone();
        tokio::spawn(async move {
            tx.closed().await;
            let mut rt = this.runtime.lock().await;
            if rt
                .connections
                .get(&worker)
                .is_some_and(|c| c.id == connection)
            {
                rt.connections.remove(&worker);
                this.lease_table().remove(&worker);
                drop(rt);
                tracing::info!("worker {worker} disconnected; ending its membership");
                if let Err(e) = this.store.revoke(lease).await {
                    tracing::warn!("revoking the lease of {worker}: {e}");
                }
                this.wake.notify_one();
            }
        });
        self.wake.notify_one();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CheckpointCommit>,
    ) -> Result<Response<pb::CheckpointCommitResponse>, Status> {
        let commit = request.into_inner();
        let (job_id, generation) = (
            JobId::from(commit.job_id.as_str()),
            Generation(commit.generation),
        );
        let worker = WorkerId::from(commit.worker_id.as_str());
        let refuse = |reason: String| {
            tracing::info!(
                "job {}: checkpoint step {} not recorded: {reason}",
                commit.job_id,
                commit.step
            );
            Ok(Response::new(pb::CheckpointCommitResponse {
                accepted: false,
                reason,
            }))
        };
        // Under the job lock: a generation formed after this check cannot also commit.
        let mut rt = self.runtime.lock().await;
        let mut job = match Coordinator::check_current(&rt, &job_id, generation) {
            Ok(job) => job,
            Err(e) => return refuse(e.to_string()),
        };
        if job.members.first() != Some(&worker) {
            return refuse(format!(
                "worker {} is not rank 0 of generation {}",
                commit.worker_id, commit.generation
            ));
        }
        let Some(spec) = &job.spec.checkpoint else {
            return refuse("the job has no checkpoint location".into());
        };
        if commit.url != spec.url {
            return refuse(format!(
                "the job checkpoints to {}, not {}",
                spec.url, commit.url
            ));
        }
        if let Some(current) = &job.restore {
            if commit.step <= current.step && current.url == commit.url {
                return refuse(format!(
                    "step {} is not newer than the recorded checkpoint step {}",
                    commit.step, current.step
                ));
            }
        }
        // Compare-and-swap on the stored job record: if another coordinator process wrote the job since
        // this one loaded it, nothing is recorded and the committer must not move `latest`.
        let key = format!("{JOBS}{}", job.id);
        let stored = self
            .store
            .get(&key)
            .await
            .map_err(CoordinatorError::store)?;
        let same_generation = |e: &cellfleet_shared::meta::Entry| {
            serde_json::from_slice::<JobRecord>(&e.value).is_ok_and(|r| {
                r.generation == generation
                    && r.restore.as_ref().is_none_or(|p| p.step < commit.step)
            })
        };
        let Some(entry) = stored.filter(same_generation) else {
            return refuse(
                "the stored job record is of another generation (another coordinator?)".into(),
            );
        };
        if let Some(previous) = job.restore.take() {
            job.restore_history.push(previous);
            let excess = job.restore_history.len().saturating_sub(RESTORE_HISTORY);
            job.restore_history.drain(..excess);
        }
        job.restore = Some(RestorePoint {
            url: commit.url.clone(),
            step: commit.step,
            manifest_blake3: commit.manifest_blake3.clone(),
        });
        let bytes = encode(&key, &job)?;
        if self
            .store
            .compare_and_put(&key, Some(entry.revision), &bytes, None)
            .await
            .map_err(CoordinatorError::store)?
            .is_none()
        {
            return refuse("the stored job record changed underneath this coordinator".into());
        }
        tracing::info!(
            "job {}: checkpoint step {} committed in {} (manifest {})",
            job.id,
            commit.step,
            commit.url,
            &commit.manifest_blake3[..commit.manifest_blake3.len().min(12)]
        );
        rt.jobs.insert(job.id.clone(), job);
        Ok(Response::new(pb::CheckpointCommitResponse {
            accepted: true,
            reason: String::new(),
        }))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::StepReportResponse>, Status> {
        let report = request.into_inner();
        let (job_id, generation) = (
            JobId::from(report.job_id.as_str()),
            Generation(report.generation),
        );
        let worker = WorkerId::from(report.worker_id.as_str());
        // Checked and applied under one lock: a report must never land on a generation formed after the
        // check.
        let mut rt = self.runtime.lock().await;
        let mut job = Coordinator::check_current(&rt, &job_id, generation)?;
        if job.members.get(report.rank as usize) != Some(&worker) {
            return Err(CoordinatorError::NotRank {
                worker,
                rank: report.rank,
                job: job_id,
                generation,
            }
            .into());
        }
        if report.step > job.end_step() {
            return Err(CoordinatorError::InvalidRequest(format!(
                "step {} is past the job's last step {}",
                report.step,
                job.end_step()
            ))
            .into());
        }
        let progress = rt.progress.entry(job.id.clone()).or_default();
        if progress.generation != job.generation {
            *progress = Progress::of(&job);
        }
        if !report.error.is_empty() && report.checkpoint_unusable {
            // Every rank may report it; the first report falls back, later ones find it done.
            if job
                .restore
                .as_ref()
                .is_some_and(|r| r.step == job.start_step)
                && progress.reform.is_none()
            {
                let bad = job.restore.take().expect("checked");
                match job.restore_history.pop() {
                    Some(previous) => {
                        job.message = format!(
                            "checkpoint step {} is unusable ({}); falling back to step {}",
                            bad.step, report.error, previous.step
                        );
                        progress.reform = Some(format!(
                            "checkpoint step {} unusable, restoring step {}",
                            bad.step, previous.step
                        ));
                        job.restore = Some(previous);
                        tracing::warn!("job {}: {}", job.id, job.message);
                    }
                    None => {
                        job.state = JobState::Failed;
                        job.message = format!(
                            "checkpoint step {} is unusable ({}) and no earlier checkpoint is recorded; resume with `cellfleet train --resume latest`, which falls back past it",
                            bad.step, report.error
                        );
                        tracing::error!("job {}: {}", job.id, job.message);
                    }
                }
                self.save_job(&job).await?;
            }
        } else if !report.error.is_empty() {
            if report.fatal {
                job.state = JobState::Failed;
                job.message = format!(
                    "rank {} ({}) failed: {}",
                    report.rank, report.worker_id, report.error
                );
                tracing::error!("job {}: {}", job.id, job.message);
            } else {
                tracing::warn!(
                    "job {} generation {}: rank {} reports: {}",
                    job.id,
                    job.generation,
                    report.rank,
                    report.error
                );
                progress.peer_error_at.get_or_insert_with(Instant::now);
            }
        } else {
            progress.steps.insert(report.rank, report.step);
            let committed = (0..job.members.len() as u32)
                .map(|r| progress.steps.get(&r).copied().unwrap_or(job.start_step))
                .min()
                .unwrap_or(job.start_step);
            job.committed_step = committed;
            if report.rank == 0 && !report.finished {
                job.last_loss = report.loss;
            }
            if report.finished && report.rank == 0 {
                job.state = JobState::Completed;
                job.committed_step = job.end_step();
                job.message = if job.end_step() < job.total_steps {
                    format!(
                        "stopped after step {} of {} in generation {} as asked; model written to {}{}",
                        job.end_step(),
                        job.total_steps,
                        job.generation,
                        job.spec.out,
                        match &job.restore {
                            Some(r) => format!(", resume from checkpoint step {} in {}", r.step, r.url),
                            None => String::new(),
                        }
                    )
                } else {
                    format!(
                        "finished {} steps in generation {}; model written to {}",
                        job.total_steps, job.generation, job.spec.out
                    )
                };
                tracing::info!("job {}: {}", job.id, job.message);
            }
        }
        let changed = rt.jobs.get(&job.id).map(|j| {
            (j.committed_step, j.state, j.last_loss.to_bits())
                != (job.committed_step, job.state, job.last_loss.to_bits())
        });
        rt.jobs.insert(job.id.clone(), job.clone());
        if changed == Some(true) {
            self.save_job(&job).await?;
        }
        if !job.state.is_active() {
            self.send_assignments(&mut rt);
            self.clear_exchange(&job.id).await?;
        }
        Ok(Response::new(pb::StepReportResponse {
            current: job.state == JobState::Running,
        }))
    }

    async fn kv_set(
        &self,
        request: Request<pb::KvSetRequest>,
    ) -> Result<Response<pb::KvSetResponse>, Status> {
        let req = request.into_inner();
        let (job_id, generation) = (JobId::from(req.job_id), Generation(req.generation));
        self.current_job(&job_id, generation).await?;
        self.store
            .put(
                &Coordinator::kv_key(&job_id, generation, &req.key),
                &req.value,
                None,
            )
            .await
            .map_err(CoordinatorError::store)?;
        self.kv_changed.notify_waiters();
        Ok(Response::new(pb::KvSetResponse {}))
    }

    async fn kv_get(
        &self,
        request: Request<pb::KvGetRequest>,
    ) -> Result<Response<pb::KvGetResponse>, Status> {
        let req = request.into_inner();
        let (job_id, generation) = (JobId::from(req.job_id), Generation(req.generation));
        let deadline = Instant::now() + Duration::from_millis(req.timeout_ms);
        let key = Coordinator::kv_key(&job_id, generation, &req.key);
        loop {
            let changed = self.kv_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.current_job(&job_id, generation).await?;
            if let Some(entry) = self
                .store
                .get(&key)
                .await
                .map_err(CoordinatorError::store)?
            {
                return Ok(Response::new(pb::KvGetResponse { value: entry.value }));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CoordinatorError::KeyNotSet {
                    key: req.key,
                    job: job_id,
                    generation,
                    timeout_ms: req.timeout_ms,
                }
                .into());
            }
            // Also re-check now and then: another coordinator process cannot notify us.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), changed).await;
        }
    }

    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let (spec, order) = JobSpec::parse(&request.into_inner().spec_json)
            .map_err(CoordinatorError::InvalidRequest)?;
        let (epoch_len, n_genes) = epoch_length(&spec, order).await?;
        let per_epoch = epoch_len.div_ceil(u64::from(order.batch_size));
        if order.steps / per_epoch >= u64::from(u32::MAX) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "job specification: config.steps {} is more than 2^32 epochs of this corpus",
                order.steps
            ))
            .into());
        }
        let mut rt = self.runtime.lock().await;
        let mut id = format!("job-{}", now_ms());
        while rt.jobs.contains_key(id.as_str()) {
            id.push('x');
        }
        let id = JobId::new(id);
        let job = JobRecord {
            id: id.clone(),
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
        };
        self.save_job(&job).await?;
        tracing::info!(
            "job {id} submitted: {} steps of {} samples over {} ({} samples per epoch), {}-{} workers",
            job.total_steps,
            job.batch_size,
            job.spec.corpus,
            epoch_len,
            job.spec.min_workers,
            job.spec.max_workers
        );
        rt.jobs.insert(id.clone(), job);
        drop(rt);
        self.wake.notify_one();
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.into_string(),
        }))
    }

    async fn job_status(
        &self,
        request: Request<pb::JobStatusRequest>,
    ) -> Result<Response<pb::JobStatusResponse>, Status> {
        let id = JobId::from(request.into_inner().job_id);
        let rt = self.runtime.lock().await;
        let job = rt
            .jobs
            .get(&id)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.clone()))?;
        Ok(Response::new(Coordinator::status_of(
            job,
            rt.progress.get(&id),
        )))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = JobId::from(request.into_inner().job_id);
        let mut rt = self.runtime.lock().await;
        let job = rt
            .jobs
            .get_mut(&id)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.clone()))?;
        if !job.state.is_active() {
            return Err(CoordinatorError::JobEnded {
                job: id.clone(),
                state: job.state.name(),
            }
            .into());
        }
        job.state = JobState::Cancelled;
        job.message = format!("cancelled at step {}", job.committed_step);
        let job = job.clone();
        self.save_job(&job).await?;
        self.send_assignments(&mut rt);
        self.clear_exchange(&id).await?;
        Ok(Response::new(pb::CancelJobResponse {}))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let entries = self
            .store
            .list(WORKERS)
            .await
            .map_err(CoordinatorError::store)?;
        let rt = self.runtime.lock().await;
        let workers = entries
            .into_iter()
            .filter_map(|(_, e)| serde_json::from_slice::<WorkerRecord>(&e.value).ok())
            .map(|w| pb::WorkerInfo {
                job_id: rt
                    .jobs
                    .values()
                    .find(|j| j.state == JobState::Running && j.members.contains(&w.id))
                    .map(|j| j.id.to_string())
                    .or_else(|| {
                        let screen = rt.screens.assigned()?;
                        rt.connections
                            .contains_key(&w.id)
                            .then(|| screen.record.id.to_string())
                    })
                    .unwrap_or_default(),
                connected: rt.connections.contains_key(&w.id),
                worker_id: w.id.into_string(),
                hostname: w.hostname,
                pid: w.pid,
                device: w.device,
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn submit_screen(
        &self,
        request: Request<pb::SubmitScreenRequest>,
    ) -> Result<Response<pb::SubmitScreenResponse>, Status> {
        self.0
            .submit_screen(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn screen_status(
        &self,
        request: Request<pb::ScreenStatusRequest>,
    ) -> Result<Response<pb::ScreenStatusResponse>, Status> {
        self.0
            .screen_status(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn cancel_screen(
        &self,
        request: Request<pb::CancelScreenRequest>,
    ) -> Result<Response<pb::CancelScreenResponse>, Status> {
        self.0
            .cancel_screen(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn lease_unit(
        &self,
        request: Request<pb::LeaseUnitRequest>,
    ) -> Result<Response<pb::LeaseUnitResponse>, Status> {
        self.0
            .lease_unit(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn renew_unit(
        &self,
        request: Request<pb::RenewUnitRequest>,
    ) -> Result<Response<pb::RenewUnitResponse>, Status> {
        self.0
            .renew_unit(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn complete_unit(
        &self,
        request: Request<pb::CompleteUnitRequest>,
    ) -> Result<Response<pb::CompleteUnitResponse>, Status> {
        self.0
            .complete_unit(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// Opens the job's corpus to size an epoch of its training split (rejecting a corpus that cannot be read).
async fn epoch_length(spec: &JobSpec, order: OrderFields) -> Result<(u64, u64), CoordinatorError> {
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
