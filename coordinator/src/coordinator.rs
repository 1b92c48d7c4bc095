//! The coordinator as one object: membership (`workers`), training jobs (`jobs`) and screens (`screens`)
//! behind one lock, the assignment each connected worker is sent, and the reconciler that runs every
//! tick. Each operation holds the lock from its checks to its last write, so a report never lands on a
//! generation formed after its check and two workers never take the same unit. The rules live in the
//! domain modules; this one sequences them, and `rpc` speaks the protocol.
//!
//! What is only in memory here (open assignment streams, per-rank progress, screen rates) is rebuilt as
//! workers reconnect and report; everything else is in the metadata store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex, Notify};

use cellfleet_shared::ids::{Generation, JobId, ScreenId, WorkerId};
use cellfleet_shared::meta::MetaStore;

use crate::error::{CoordinatorError, Result};
use crate::jobs::{
    CheckpointCommit, CommitAnswer, Exchange, JobState, JobStatus, Jobs, PreparedJob, StepReport,
    TrainOrder,
};
use crate::screens::{
    Completion, LeaseAnswer, Renewal, ScreenOrder, ScreenStatus, ScreenSubmission, Screens,
    UnitCompletion, UnitRenewal,
};
use crate::state::{CoordinatorConfig, Store};
use crate::workers::{Membership, Registered, Registration, Serving, WorkerStatus};

/// What a worker should be doing now; sent on its assignment stream whenever it changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    Train(Box<TrainOrder>),
    Screen(ScreenOrder),
    Idle { reason: String },
}

struct Connection {
    tx: mpsc::Sender<Assignment>,
    id: u64,
    sent: Option<Assignment>,
}

/// The open assignment streams, one per connected worker.
#[derive(Default)]
struct Connections {
    open: HashMap<WorkerId, Connection>,
    next: u64,
}

struct Runtime {
    jobs: Jobs,
    screens: Screens,
    connections: Connections,
}

pub struct Coordinator {
    store: Store,
    config: CoordinatorConfig,
    members: Membership,
    exchange: Exchange,
    runtime: Mutex<Runtime>,
    /// Wakes the reconciler before its next tick.
    wake: Notify,
}

impl Coordinator {
    /// Loads the jobs, screens and worker leases the store already holds (a restarted coordinator continues
    /// them).
    pub async fn start(store: Arc<dyn MetaStore>, config: CoordinatorConfig) -> Result<Arc<Self>> {
        let store = Store::new(store);
        let jobs = Jobs::load(&store).await?;
        let members = Membership::load(store.clone(), config.lease_ttl).await?;
        let screens = Screens::load(&store).await?;
        if !jobs.is_empty() {
            tracing::info!(
                "{}: {} jobs ({} active), {} workers with live leases",
                store.describe(),
                jobs.len(),
                jobs.active(),
                members.known()
            );
        }
        Ok(Arc::new(Self {
            exchange: Exchange::new(store.clone()),
            store,
            config,
            members,
            runtime: Mutex::new(Runtime {
                jobs,
                screens,
                connections: Connections::default(),
            }),
            wake: Notify::new(),
        }))
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
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

    async fn reconcile(&self) -> Result<()> {
        let live = self.members.live().await?;
        let mut rt = self.runtime.lock().await;
        let rt = &mut *rt;
        rt.connections.open.retain(|id, _| live.contains(id));
        self.members.retain(&live);
        let mut connected: Vec<WorkerId> = rt.connections.open.keys().cloned().collect();
        connected.sort();
        rt.jobs
            .reconcile(
                &self.store,
                &self.exchange,
                &live,
                &connected,
                self.config.lease_ttl,
            )
            .await?;
        Self::send_assignments(rt);
        Ok(())
    }

    /// What `worker` should be doing now. Training takes precedence: a worker on a screen is not busy for
    /// a job that needs it.
    fn desired(rt: &Runtime, worker: &WorkerId) -> Assignment {
        if let Some(order) = rt.jobs.train_order(worker) {
            return Assignment::Train(Box::new(order));
        }
        if let Some(screen) = rt.screens.assigned() {
            return Assignment::Screen(screen.order());
        }
        Assignment::Idle {
            reason: "no job needs this worker".into(),
        }
    }

    /// Sends every connected worker its assignment if it changed.
    fn send_assignments(rt: &mut Runtime) {
        let ids: Vec<WorkerId> = rt.connections.open.keys().cloned().collect();
        for id in ids {
            let desired = Self::desired(rt, &id);
            let connection = rt.connections.open.get_mut(&id).expect("listed");
            if connection.sent.as_ref() == Some(&desired) {
                continue;
            }
            match connection.tx.try_send(desired.clone()) {
                Ok(()) => connection.sent = Some(desired),
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    rt.connections.open.remove(&id);
                }
            }
        }
    }

    // Workers.

    pub async fn register(&self, registration: Registration) -> Result<Registered> {
        let registered = self.members.register(registration).await?;
        self.wake.notify_one();
        Ok(registered)
    }

    pub async fn heartbeat(&self, worker: &WorkerId) -> Result<()> {
        self.members.heartbeat(worker).await
    }

    /// Opens `worker`'s assignment stream. When the receiver is dropped (the worker process is gone: a
    /// killed process closes its connection at once), its membership ends at once instead of when the
    /// lease lapses.
    pub async fn connect(self: &Arc<Self>, worker: WorkerId) -> Result<mpsc::Receiver<Assignment>> {
        let lease = self.members.lease_of(&worker).await?;
        let (tx, rx) = mpsc::channel(16);
        let connection = {
            let mut rt = self.runtime.lock().await;
            rt.connections.next += 1;
            let id = rt.connections.next;
            rt.connections.open.insert(
                worker.clone(),
                Connection {
                    tx: tx.clone(),
                    id,
                    sent: None,
                },
            );
            id
        };
        let this = self.clone();
        tokio::spawn(async move {
            tx.closed().await;
            let mut rt = this.runtime.lock().await;
            if rt
                .connections
                .open
                .get(&worker)
                .is_some_and(|c| c.id == connection)
            {
                rt.connections.open.remove(&worker);
                this.members.forget(&worker);
                drop(rt);
                tracing::info!("worker {worker} disconnected; ending its membership");
                if let Err(e) = this.members.revoke(lease).await {
                    tracing::warn!("revoking the lease of {worker}: {e}");
                }
                this.wake.notify_one();
            }
        });
        self.wake.notify_one();
        Ok(rx)
    }

    /// Every member, with the job or screen it serves.
    pub async fn list_workers(&self) -> Result<Vec<WorkerStatus>> {
        let records = self.members.records().await?;
        let rt = self.runtime.lock().await;
        Ok(records
            .into_iter()
            .map(|record| {
                let connected = rt.connections.open.contains_key(&record.id);
                let serving = match rt.jobs.serving(&record.id) {
                    Some(job) => Some(Serving::Job(job.clone())),
                    None => rt
                        .screens
                        .assigned()
                        .filter(|_| connected)
                        .map(|s| Serving::Screen(s.record.id.clone())),
                };
                WorkerStatus {
                    record,
                    connected,
                    serving,
                }
            })
            .collect())
    }

    /// The coordinator's metrics in the Prometheus text format: membership, and per job and per screen
    /// what their status reports.
    pub async fn metrics_text(&self) -> String {
        use cellfleet_shared::telemetry::{Kind, MetricsText};
        let mut text = MetricsText::new();
        let workers = self.list_workers().await.unwrap_or_default();
        let members = self.members.live().await.unwrap_or_default();
        let rt = self.runtime.lock().await;
        let jobs = rt.jobs.statuses();
        let screens = rt.screens.statuses(&members);
        drop(rt);
        text.family(
            "cellfleet_workers",
            Kind::Gauge,
            "Registered workers, by whether their assignment stream is open",
        );
        for connected in [true, false] {
            let n = workers.iter().filter(|w| w.connected == connected).count();
            text.sample(
                "cellfleet_workers",
                &[("connected", if connected { "yes" } else { "no" })],
                n as f64,
            );
        }
        text.single(
            "cellfleet_members",
            Kind::Gauge,
            "Workers holding a live lease",
            members.len() as f64,
        );
        text.family("cellfleet_jobs", Kind::Gauge, "Jobs, by state");
        for state in [
            JobState::Pending,
            JobState::Running,
            JobState::Completed,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            let n = jobs.iter().filter(|j| j.state == state).count();
            text.sample("cellfleet_jobs", &[("state", state.name())], n as f64);
        }
        type JobField = fn(&JobStatus) -> f64;
        let per_job: [(&str, Kind, &str, JobField); 8] = [
            (
                "cellfleet_job_generation",
                Kind::Gauge,
                "The job's current generation",
                |j| j.generation.get() as f64,
            ),
            (
                "cellfleet_job_members",
                Kind::Gauge,
                "Ranks of the job's current generation",
                |j| j.members.len() as f64,
            ),
            (
                "cellfleet_job_step",
                Kind::Gauge,
                "Steps the job has completed",
                |j| j.committed_step as f64,
            ),
            (
                "cellfleet_job_total_steps",
                Kind::Gauge,
                "Steps the job will run",
                |j| j.total_steps as f64,
            ),
            (
                "cellfleet_job_loss",
                Kind::Gauge,
                "The job's most recent training loss",
                |j| j.last_loss,
            ),
            (
                "cellfleet_job_samples_per_second",
                Kind::Gauge,
                "Samples per second of the job's current generation",
                |j| j.samples_per_second,
            ),
            (
                "cellfleet_job_reformations_total",
                Kind::Counter,
                "Times the job's ranks were re-formed (membership changes, failures)",
                |j| f64::from(j.reformations),
            ),
            (
                "cellfleet_job_checkpoint_step",
                Kind::Gauge,
                "Step of the job's newest committed checkpoint",
                |j| j.checkpoint.as_ref().map_or(f64::NAN, |c| c.step as f64),
            ),
        ];
        for (name, kind, help, field) in per_job {
            text.family(name, kind, help);
            for job in &jobs {
                text.sample(name, &[("job", job.id.as_str())], field(job));
            }
        }
        type ScreenField = fn(&ScreenStatus) -> f64;
        let per_screen: [(&str, Kind, &str, ScreenField); 7] = [
            (
                "cellfleet_screen_units_total",
                Kind::Gauge,
                "Work units of the screen",
                |s| f64::from(s.units_total),
            ),
            (
                "cellfleet_screen_units_done",
                Kind::Gauge,
                "Work units completed",
                |s| f64::from(s.units_done),
            ),
            (
                "cellfleet_screen_units_leased",
                Kind::Gauge,
                "Work units leased now",
                |s| f64::from(s.units_leased),
            ),
            (
                "cellfleet_screen_pairs_done",
                Kind::Gauge,
                "(gene, cell) pairs computed",
                |s| s.pairs_done as f64,
            ),
            (
                "cellfleet_screen_pairs_per_second",
                Kind::Gauge,
                "Pairs per second since the first lease",
                |s| s.pairs_per_second,
            ),
            (
                "cellfleet_screen_lease_reissues_total",
                Kind::Counter,
                "Units leased again after their holder lost them",
                |s| f64::from(s.releases),
            ),
            (
                "cellfleet_screen_running",
                Kind::Gauge,
                "1 while the screen runs",
                |s| f64::from(u8::from(s.state == crate::screens::ScreenState::Running)),
            ),
        ];
        for (name, kind, help, field) in per_screen {
            text.family(name, kind, help);
            for screen in &screens {
                text.sample(name, &[("screen", screen.id.as_str())], field(screen));
            }
        }
        text.finish()
    }

    // Jobs.

    pub async fn submit_job(&self, spec_json: &str) -> Result<JobId> {
        let prepared = PreparedJob::prepare(spec_json).await?;
        let id = {
            let mut rt = self.runtime.lock().await;
            rt.jobs.submit(&self.store, prepared).await?
        };
        self.wake.notify_one();
        Ok(id)
    }

    pub async fn job_status(&self, id: &JobId) -> Result<JobStatus> {
        self.runtime.lock().await.jobs.status(id)
    }

    pub async fn cancel_job(&self, id: &JobId) -> Result<()> {
        let mut rt = self.runtime.lock().await;
        rt.jobs.cancel(&self.store, id).await?;
        Self::send_assignments(&mut rt);
        self.exchange.clear(id).await
    }

    /// Applies a rank's report; returns whether its generation is still the job's current one.
    pub async fn report_step(&self, report: StepReport) -> Result<bool> {
        let job = report.job.clone();
        // Checked and applied under one lock: a report must never land on a generation formed after the
        // check.
        let mut rt = self.runtime.lock().await;
        let state = rt.jobs.report_step(&self.store, report).await?;
        if !state.is_active() {
            Self::send_assignments(&mut rt);
            self.exchange.clear(&job).await?;
        }
        Ok(state == JobState::Running)
    }

    pub async fn commit_checkpoint(&self, commit: CheckpointCommit) -> Result<CommitAnswer> {
        // Under the job lock: a generation formed after this check cannot also commit.
        let mut rt = self.runtime.lock().await;
        rt.jobs.commit_checkpoint(&self.store, commit).await
    }

    pub async fn kv_set(
        &self,
        job: &JobId,
        generation: Generation,
        key: &str,
        value: &[u8],
    ) -> Result<()> {
        self.runtime
            .lock()
            .await
            .jobs
            .check_current(job, generation)?;
        self.exchange.set(job, generation, key, value).await
    }

    /// Waits up to `timeout` for a rendezvous key, as long as the generation stays current.
    pub async fn kv_get(
        &self,
        job: &JobId,
        generation: Generation,
        key: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.exchange.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.runtime
                .lock()
                .await
                .jobs
                .check_current(job, generation)?;
            if let Some(value) = self.exchange.get(job, generation, key).await? {
                return Ok(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CoordinatorError::KeyNotSet {
                    key: key.to_string(),
                    job: job.clone(),
                    generation,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            // Also re-check now and then: another coordinator process cannot notify us.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), changed).await;
        }
    }

    // Screens.

    pub async fn submit_screen(&self, submission: ScreenSubmission) -> Result<ScreenId> {
        let mut rt = self.runtime.lock().await;
        let id = rt.screens.submit(&self.store, submission).await?;
        Self::send_assignments(&mut rt);
        drop(rt);
        self.wake.notify_one();
        Ok(id)
    }

    pub async fn screen_status(&self, id: &ScreenId, include_units: bool) -> Result<ScreenStatus> {
        let members = self.members.live().await?;
        let rt = self.runtime.lock().await;
        rt.screens.status(id, include_units, &members)
    }

    pub async fn cancel_screen(&self, id: &ScreenId) -> Result<()> {
        let mut rt = self.runtime.lock().await;
        rt.screens.cancel(&self.store, id).await?;
        Self::send_assignments(&mut rt);
        Ok(())
    }

    pub async fn lease_unit(&self, worker: &WorkerId, screen: &ScreenId) -> Result<LeaseAnswer> {
        // Membership from the store, not the lease table: a lapsed holder must free its units now.
        let members = self.members.live().await?;
        if !members.contains(worker) {
            return Err(self.members.not_a_member(worker));
        }
        let mut rt = self.runtime.lock().await;
        rt.screens
            .lease_unit(&self.store, screen, worker, &members)
            .await
    }

    pub async fn renew_unit(&self, renewal: UnitRenewal) -> Result<Renewal> {
        let mut rt = self.runtime.lock().await;
        rt.screens.renew_unit(&self.store, renewal).await
    }

    pub async fn complete_unit(&self, completion: UnitCompletion) -> Result<Completion> {
        let screen = completion.screen.clone();
        let mut rt = self.runtime.lock().await;
        let was_running = rt.screens.is_running(&screen);
        let answer = rt.screens.complete_unit(&self.store, completion).await?;
        // The screen's last unit, or a unit that failed too often, ends it: its workers go idle (or to the
        // next screen).
        if was_running && !rt.screens.is_running(&screen) {
            Self::send_assignments(&mut rt);
            drop(rt);
            if answer == Completion::Recorded {
                self.wake.notify_one();
            }
        }
        Ok(answer)
    }
}
