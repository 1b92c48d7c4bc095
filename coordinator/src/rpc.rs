//! The gRPC face of a [`Coordinator`]: each method converts the protocol's request into the domain's
//! types (ids, reports, submissions), calls the coordinator, and converts the answer back, or the error
//! into a `Status` through [`CoordinatorError`]'s one mapping. No decision is taken here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use cellfleet_proto as pb;
use cellfleet_shared::ids::{Generation, JobId, Rank, ScreenId, WorkerId};

use crate::auth::{Access, Role};
use crate::coordinator::{Assignment, Coordinator};
use crate::error::CoordinatorError;
use crate::jobs::{
    CheckpointCommit, CommitAnswer, JobState, JobStatus, Reported, StepReport, TrainOrder,
};
use crate::screens::{
    Completion, DoneUnit, LeaseAnswer, Renewal, ScreenOrder, ScreenState, ScreenStatus,
    ScreenSubmission, UnitCompletion, UnitOutcome, UnitRenewal,
};
use crate::workers::{Registration, WorkerStatus};

/// The gRPC face of a [`Coordinator`], with its access rules.
#[derive(Clone)]
pub struct Service {
    coordinator: Arc<Coordinator>,
    access: Arc<Access>,
}

impl Service {
    /// Every call allowed: the embedded default and in-process tests.
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self::with_access(coordinator, Access::open())
    }

    /// The coordinator behind the service.
    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    pub fn with_access(coordinator: Arc<Coordinator>, access: Access) -> Self {
        Self {
            coordinator,
            access: Arc::new(access),
        }
    }
}

impl std::ops::Deref for Service {
    type Target = Coordinator;
    fn deref(&self) -> &Coordinator {
        &self.coordinator
    }
}

type Answer<T> = Result<Response<T>, Status>;

fn answer<T>(result: Result<T, CoordinatorError>) -> Answer<T> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Answer<pb::RegisterWorkerResponse> {
        self.access.check(&request, Role::Worker)?;
        let req = request.into_inner();
        let registration = Registration {
            previous: (!req.worker_id.is_empty())
                .then(|| id_field("worker_id", req.worker_id))
                .transpose()?
                .map(WorkerId::from),
            hostname: text_field("hostname", req.hostname, MAX_ID_BYTES)?,
            pid: req.pid,
            device: text_field("device", req.device, MAX_ID_BYTES)?,
        };
        let registered = self.register(registration).await?;
        let config = self.config();
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: registered.worker.into_string(),
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: config.lease_ttl.as_millis() as u64,
            resumed: registered.resumed,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Answer<pb::HeartbeatResponse> {
        self.access.check(&request, Role::Worker)?;
        let worker = WorkerId::from(id_field("worker_id", request.into_inner().worker_id)?);
        answer(
            self.coordinator
                .heartbeat(&worker)
                .await
                .map(|()| pb::HeartbeatResponse {}),
        )
    }

    type AssignmentsStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Assignment, Status>> + Send>>;

    async fn assignments(
        &self,
        request: Request<pb::AssignmentsRequest>,
    ) -> Answer<Self::AssignmentsStream> {
        self.access.check(&request, Role::Worker)?;
        let worker = WorkerId::from(id_field("worker_id", request.into_inner().worker_id)?);
        let assignments = self.coordinator.connect(worker).await?;
        let stream = ReceiverStream::new(assignments).map(|a| Ok(pb::Assignment::from(a)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Answer<pb::StepReportResponse> {
        self.access.check(&request, Role::Worker)?;
        let report = step_report(request.into_inner())?;
        answer(
            self.coordinator
                .report_step(report)
                .await
                .map(|current| pb::StepReportResponse { current }),
        )
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CheckpointCommit>,
    ) -> Answer<pb::CheckpointCommitResponse> {
        self.access.check(&request, Role::Worker)?;
        let commit = request.into_inner();
        let commit = CheckpointCommit {
            worker: id_field("worker_id", commit.worker_id)?.into(),
            job: id_field("job_id", commit.job_id)?.into(),
            generation: Generation(commit.generation),
            step: commit.step,
            url: text_field("url", commit.url, MAX_TEXT_BYTES)?,
            manifest_blake3: id_field("manifest_blake3", commit.manifest_blake3)?,
        };
        let (accepted, reason) = match self.coordinator.commit_checkpoint(commit).await? {
            CommitAnswer::Recorded => (true, String::new()),
            CommitAnswer::Refused(reason) => (false, reason),
        };
        Ok(Response::new(pb::CheckpointCommitResponse {
            accepted,
            reason,
        }))
    }

    async fn kv_set(&self, request: Request<pb::KvSetRequest>) -> Answer<pb::KvSetResponse> {
        self.access.check(&request, Role::Worker)?;
        let req = request.into_inner();
        let (job, generation) = (
            JobId::from(id_field("job_id", req.job_id)?),
            Generation(req.generation),
        );
        let key = id_field("key", req.key)?;
        answer(
            self.coordinator
                .kv_set(&job, generation, &key, &req.value)
                .await
                .map(|()| pb::KvSetResponse {}),
        )
    }

    async fn kv_get(&self, request: Request<pb::KvGetRequest>) -> Answer<pb::KvGetResponse> {
        self.access.check(&request, Role::Worker)?;
        let req = request.into_inner();
        let (job, generation) = (
            JobId::from(id_field("job_id", req.job_id)?),
            Generation(req.generation),
        );
        let key = id_field("key", req.key)?;
        let timeout = Duration::from_millis(req.timeout_ms);
        answer(
            self.coordinator
                .kv_get(&job, generation, &key, timeout)
                .await
                .map(|value| pb::KvGetResponse { value }),
        )
    }

    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Answer<pb::SubmitJobResponse> {
        self.access.check(&request, Role::Client)?;
        let id = self
            .coordinator
            .submit_job(&text_field(
                "spec_json",
                request.into_inner().spec_json,
                MAX_SPEC_BYTES,
            )?)
            .await?;
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.into_string(),
        }))
    }

    async fn job_status(
        &self,
        request: Request<pb::JobStatusRequest>,
    ) -> Answer<pb::JobStatusResponse> {
        self.access.check(&request, Role::Client)?;
        let id = JobId::from(id_field("job_id", request.into_inner().job_id)?);
        answer(
            self.coordinator
                .job_status(&id)
                .await
                .map(pb::JobStatusResponse::from),
        )
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Answer<pb::CancelJobResponse> {
        self.access.check(&request, Role::Client)?;
        let id = JobId::from(id_field("job_id", request.into_inner().job_id)?);
        answer(
            self.coordinator
                .cancel_job(&id)
                .await
                .map(|()| pb::CancelJobResponse {}),
        )
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Answer<pb::ListWorkersResponse> {
        self.access.check(&request, Role::Client)?;
        let workers = self.coordinator.list_workers().await?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.into_iter().map(pb::WorkerInfo::from).collect(),
        }))
    }

    async fn submit_screen(
        &self,
        request: Request<pb::SubmitScreenRequest>,
    ) -> Answer<pb::SubmitScreenResponse> {
        self.access.check(&request, Role::Client)?;
        let req = request.into_inner();
        let submission = ScreenSubmission {
            location: text_field("location", req.location, MAX_TEXT_BYTES)?,
            plan_blake3: id_field("plan_blake3", req.plan_blake3)?,
            units: req.units,
            pairs: req.pairs,
            lease_ms: req.lease_ms,
            threads: req.threads,
            s3_endpoint: text_field("s3_endpoint", req.s3_endpoint, MAX_TEXT_BYTES)?,
            s3_region: id_field("s3_region", req.s3_region)?,
            summary: text_field("summary", req.summary, MAX_TEXT_BYTES)?,
        };
        let id = self.coordinator.submit_screen(submission).await?;
        Ok(Response::new(pb::SubmitScreenResponse {
            screen_id: id.into_string(),
        }))
    }

    async fn screen_status(
        &self,
        request: Request<pb::ScreenStatusRequest>,
    ) -> Answer<pb::ScreenStatusResponse> {
        self.access.check(&request, Role::Client)?;
        let req = request.into_inner();
        let id = ScreenId::from(id_field("screen_id", req.screen_id)?);
        answer(
            self.coordinator
                .screen_status(&id, req.include_units)
                .await
                .map(pb::ScreenStatusResponse::from),
        )
    }

    async fn cancel_screen(
        &self,
        request: Request<pb::CancelScreenRequest>,
    ) -> Answer<pb::CancelScreenResponse> {
        self.access.check(&request, Role::Client)?;
        let id = ScreenId::from(id_field("screen_id", request.into_inner().screen_id)?);
        answer(
            self.coordinator
                .cancel_screen(&id)
                .await
                .map(|()| pb::CancelScreenResponse {}),
        )
    }

    async fn lease_unit(
        &self,
        request: Request<pb::LeaseUnitRequest>,
    ) -> Answer<pb::LeaseUnitResponse> {
        self.access.check(&request, Role::Worker)?;
        let req = request.into_inner();
        let (worker, screen) = (
            WorkerId::from(id_field("worker_id", req.worker_id)?),
            ScreenId::from(id_field("screen_id", req.screen_id)?),
        );
        answer(
            self.coordinator
                .lease_unit(&worker, &screen)
                .await
                .map(pb::LeaseUnitResponse::from),
        )
    }

    async fn renew_unit(
        &self,
        request: Request<pb::RenewUnitRequest>,
    ) -> Answer<pb::RenewUnitResponse> {
        self.access.check(&request, Role::Worker)?;
        let req = request.into_inner();
        let renewal = UnitRenewal {
            screen: id_field("screen_id", req.screen_id)?.into(),
            unit: req.unit,
            token: req.token,
        };
        let (held, reason) = match self.coordinator.renew_unit(renewal).await? {
            Renewal::Held => (true, String::new()),
            Renewal::Lost(reason) => (false, reason),
        };
        Ok(Response::new(pb::RenewUnitResponse { held, reason }))
    }

    async fn complete_unit(
        &self,
        request: Request<pb::CompleteUnitRequest>,
    ) -> Answer<pb::CompleteUnitResponse> {
        self.access.check(&request, Role::Worker)?;
        let req = request.into_inner();
        let outcome = if req.error.is_empty() {
            UnitOutcome::Done {
                key: text_field("key", req.key, MAX_TEXT_BYTES)?,
                blake3: id_field("blake3", req.blake3)?,
                bytes: req.bytes,
                pairs: req.pairs,
                seconds: req.seconds,
            }
        } else {
            UnitOutcome::Failed {
                error: clipped(req.error),
            }
        };
        let completion = UnitCompletion {
            worker: id_field("worker_id", req.worker_id)?.into(),
            screen: id_field("screen_id", req.screen_id)?.into(),
            unit: req.unit,
            token: req.token,
            outcome,
        };
        let (accepted, reason) = match self.coordinator.complete_unit(completion).await? {
            Completion::Recorded => (true, String::new()),
            Completion::Refused(reason) => (false, reason),
        };
        Ok(Response::new(pb::CompleteUnitResponse { accepted, reason }))
    }
}

/// A step report: an error with `checkpoint_unusable` is about the restored checkpoint, any other error
/// is the rank giving up, and no error is a completed step.
fn step_report(report: pb::StepReport) -> Result<StepReport, Status> {
    let kind = if report.error.is_empty() {
        Reported::Progress {
            loss: report.loss,
            finished: report.finished,
        }
    } else if report.checkpoint_unusable {
        Reported::CheckpointUnusable {
            error: clipped(report.error),
        }
    } else {
        Reported::Failed {
            error: clipped(report.error),
            fatal: report.fatal,
        }
    };
    Ok(StepReport {
        worker: id_field("worker_id", report.worker_id)?.into(),
        job: id_field("job_id", report.job_id)?.into(),
        generation: Generation(report.generation),
        rank: Rank(report.rank),
        step: report.step,
        kind,
    })
}

/// The longest id, key or hash a request may carry. The coordinator issues ids of a few dozen bytes; a
/// longer one names nothing, and would be echoed into the error and stored.
const MAX_ID_BYTES: usize = 256;
/// The longest job specification accepted (real ones are a few kilobytes).
const MAX_SPEC_BYTES: usize = 256 << 10;
/// The longest location, summary or object key a request may carry.
const MAX_TEXT_BYTES: usize = 16 << 10;
/// A worker's error message is kept up to this many bytes (it is a message; the rest is cut, not refused,
/// so the failure itself is never lost).
const MAX_ERROR_BYTES: usize = 16 << 10;

/// `value` of request field `field`, refused (INVALID_ARGUMENT, naming the field and the limit) when it
/// is longer than `max` bytes.
fn text_field(field: &str, value: String, max: usize) -> Result<String, Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {max} are accepted",
            value.len()
        )));
    }
    Ok(value)
}

fn id_field(field: &str, value: String) -> Result<String, Status> {
    text_field(field, value, MAX_ID_BYTES)
}

/// A worker's error message, cut at [`MAX_ERROR_BYTES`] (on a character boundary) with a note of the cut.
fn clipped(mut error: String) -> String {
    if error.len() > MAX_ERROR_BYTES {
        let total = error.len();
        let mut end = MAX_ERROR_BYTES;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push_str(&format!("... ({total} bytes in all)"));
    }
    error
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

impl From<ScreenState> for pb::ScreenState {
    fn from(state: ScreenState) -> Self {
        match state {
            ScreenState::Running => pb::ScreenState::Running,
            ScreenState::Completed => pb::ScreenState::Completed,
            ScreenState::Failed => pb::ScreenState::Failed,
            ScreenState::Cancelled => pb::ScreenState::Cancelled,
        }
    }
}

impl JobState {
    /// The domain state a protocol state names (`None` for UNSPECIFIED, which no coordinator sends).
    pub fn from_proto(state: pb::JobState) -> Option<Self> {
        match state {
            pb::JobState::Unspecified => None,
            pb::JobState::Pending => Some(JobState::Pending),
            pb::JobState::Running => Some(JobState::Running),
            pb::JobState::Completed => Some(JobState::Completed),
            pb::JobState::Failed => Some(JobState::Failed),
            pb::JobState::Cancelled => Some(JobState::Cancelled),
        }
    }
}

impl ScreenState {
    /// The domain state a protocol state names (`None` for UNSPECIFIED, which no coordinator sends).
    pub fn from_proto(state: pb::ScreenState) -> Option<Self> {
        match state {
            pb::ScreenState::Unspecified => None,
            pb::ScreenState::Running => Some(ScreenState::Running),
            pb::ScreenState::Completed => Some(ScreenState::Completed),
            pb::ScreenState::Failed => Some(ScreenState::Failed),
            pb::ScreenState::Cancelled => Some(ScreenState::Cancelled),
        }
    }
}

impl From<Assignment> for pb::Assignment {
    fn from(assignment: Assignment) -> Self {
        let kind = match assignment {
            Assignment::Train(order) => pb::assignment::Kind::Train((*order).into()),
            Assignment::Screen(order) => pb::assignment::Kind::Screen(order.into()),
            Assignment::Idle { reason } => pb::assignment::Kind::Idle(pb::Idle { reason }),
        };
        pb::Assignment { kind: Some(kind) }
    }
}

impl From<TrainOrder> for pb::TrainAssignment {
    fn from(order: TrainOrder) -> Self {
        let (restore_url, restore_manifest_blake3) = match order.restore {
            Some(r) => (r.url, r.manifest_blake3),
            None => (String::new(), String::new()),
        };
        pb::TrainAssignment {
            job_id: order.job.into_string(),
            generation: order.generation.get(),
            rank: order.rank.get(),
            world_size: order.world_size,
            spec_json: serde_json::to_string(&order.spec).unwrap_or_default(),
            start_step: order.start_step,
            start_epoch: order.start_epoch,
            start_position: order.start_position,
            epoch_len: order.epoch_len,
            n_genes: order.n_genes,
            restore_url,
            restore_manifest_blake3,
        }
    }
}

impl From<ScreenOrder> for pb::ScreenAssignment {
    fn from(order: ScreenOrder) -> Self {
        pb::ScreenAssignment {
            screen_id: order.screen.into_string(),
            location: order.location,
            plan_blake3: order.plan_blake3,
            s3_endpoint: order.s3_endpoint,
            s3_region: order.s3_region,
            threads: order.threads,
        }
    }
}

impl From<JobStatus> for pb::JobStatusResponse {
    fn from(s: JobStatus) -> Self {
        pb::JobStatusResponse {
            job_id: s.id.into_string(),
            state: pb::JobState::from(s.state).into(),
            generation: s.generation.get(),
            world_size: s.members.len() as u32,
            committed_step: s.committed_step,
            total_steps: s.total_steps,
            last_loss: s.last_loss,
            message: s.message,
            members: s.members.into_iter().map(WorkerId::into_string).collect(),
            reformations: s.reformations,
            epoch: s.epoch,
            position: s.position,
            samples_per_second: s.samples_per_second,
            has_checkpoint: s.checkpoint.is_some(),
            checkpoint_step: s.checkpoint.as_ref().map_or(0, |r| r.step),
            checkpoint_url: s.checkpoint.map(|r| r.url).unwrap_or_default(),
            end_step: s.end_step,
        }
    }
}

impl From<WorkerStatus> for pb::WorkerInfo {
    fn from(w: WorkerStatus) -> Self {
        use crate::workers::Serving;
        pb::WorkerInfo {
            job_id: match w.serving {
                Some(Serving::Job(job)) => job.into_string(),
                Some(Serving::Screen(screen)) => screen.into_string(),
                None => String::new(),
            },
            connected: w.connected,
            worker_id: w.record.id.into_string(),
            hostname: w.record.hostname,
            pid: w.record.pid,
            device: w.record.device,
        }
    }
}

impl From<ScreenStatus> for pb::ScreenStatusResponse {
    fn from(s: ScreenStatus) -> Self {
        pb::ScreenStatusResponse {
            screen_id: s.id.into_string(),
            state: pb::ScreenState::from(s.state).into(),
            message: s.message,
            location: s.location,
            plan_blake3: s.plan_blake3,
            summary: s.summary,
            units_total: s.units_total,
            units_done: s.units_done,
            units_leased: s.units_leased,
            pairs_total: s.pairs_total,
            pairs_done: s.pairs_done,
            pairs_per_second: s.pairs_per_second,
            eta_seconds: s.eta_seconds,
            releases: s.releases,
            units: s.units.into_iter().map(pb::CompletedUnit::from).collect(),
            workers: s.workers.into_iter().map(WorkerId::into_string).collect(),
        }
    }
}

impl From<DoneUnit> for pb::CompletedUnit {
    fn from(d: DoneUnit) -> Self {
        pb::CompletedUnit {
            unit: d.unit,
            key: d.key,
            blake3: d.blake3,
            bytes: d.bytes,
            pairs: d.pairs,
            worker_id: d.worker_id.into_string(),
            seconds: d.seconds,
        }
    }
}

impl From<LeaseAnswer> for pb::LeaseUnitResponse {
    fn from(answer: LeaseAnswer) -> Self {
        match answer {
            LeaseAnswer::Leased {
                unit,
                token,
                lease_ms,
            } => pb::LeaseUnitResponse {
                leased: true,
                unit,
                token,
                lease_ms,
                state: pb::ScreenState::Running.into(),
                retry_after_ms: 0,
            },
            LeaseAnswer::NoneFree { retry_after_ms } => pb::LeaseUnitResponse {
                leased: false,
                state: pb::ScreenState::Running.into(),
                retry_after_ms,
                ..Default::default()
            },
            LeaseAnswer::Stopped(state) => pb::LeaseUnitResponse {
                leased: false,
                state: pb::ScreenState::from(state).into(),
                retry_after_ms: 0,
                ..Default::default()
            },
        }
    }
}
