//! The client side of a cluster: the gRPC channel and runtime every client uses, one rule for asking a
//! coordinator that may be restarting, and `cellfleet train --coordinator` (submit a job and follow it).

use crate::link::Rpc;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use cellfleet_coordinator::spec::{CheckpointSpec, RestorePoint};
use cellfleet_coordinator::JobSpec;
use cellfleet_proto as pb;
use cellfleet_shared::storage::S3Options;
use tokio::runtime::Runtime;

use crate::retry::RetryPolicy;
use crate::state_words::StateWord;
use crate::train::config::TrainConfig;
use crate::train::outputs::OutputDir;

pub(crate) fn runtime() -> anyhow::Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Where and how `cellfleet train` runs a cluster job.
pub struct ClusterJob {
    pub corpus: String,
    pub s3: S3Options,
    pub config: TrainConfig,
    /// A directory, or an object-store location when the workers share no disk.
    pub out: String,
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
        let out = if OutputDir::is_store(&self.out) {
            // Checked here, so that a location no worker could write fails at submission.
            OutputDir::open(&self.out, &self.s3)?;
            self.out.clone()
        } else {
            fs::create_dir_all(&self.out).with_context(|| format!("cannot create {}", self.out))?;
            // Workers may run elsewhere (another directory, another node on a shared filesystem).
            fs::canonicalize(&self.out)?.display().to_string()
        };
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
            out,
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
pub(crate) fn submit(
    rt: &Runtime,
    client: &mut Rpc,
    url: &str,
    job: &ClusterJob,
) -> anyhow::Result<String> {
    let spec = serde_json::to_string(&job.spec()?)?;
    Ok(rt
        .block_on(client.submit_job(pb::SubmitJobRequest { spec_json: spec }))
        .map_err(|s| {
            anyhow::anyhow!(
                "the coordinator at {url} refused the job: {}",
                crate::retry::explain(&s)
            )
        })?
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
    let mut client = crate::link::connect(url)?;
    let id = submit(&rt, &mut client, url, job)?;
    eprintln!(
        "submitted job {id} to {url} (Ctrl-C stops following, not the job; `cellfleet job --coordinator {url} cancel {id}` stops it)"
    );
    follow(&rt, &mut client, &id, job.config.steps, progress)
}

/// Loss, workers and throughput for the bar and the periodic line. Loss and rate only once known: until
/// rank 0 reports a step of this run (a resumed one too), the coordinator's loss is NaN and its rate 0.
fn progress_summary(status: &pb::JobStatusResponse) -> String {
    let workers = format!(
        "{} workers, generation {}",
        status.world_size, status.generation
    );
    if status.last_loss.is_nan() {
        let resumed = if status.committed_step > 0 {
            format!("resumed at step {}, ", status.committed_step)
        } else {
            String::new()
        };
        return format!("{resumed}waiting for the first step | {workers}");
    }
    let rate = if status.samples_per_second > 0.0 {
        format!(" | {:.0} samples/s", status.samples_per_second)
    } else {
        String::new()
    };
    format!("loss {:.4} | {workers}{rate}", status.last_loss)
}

pub(crate) fn follow(
    rt: &Runtime,
    client: &mut Rpc,
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
        let summary = progress_summary(&status);
        // Without a terminal (no bar), a line every tenth of the job.
        let tenth = (steps / 10).max(1);
        if !progress && status.committed_step / tenth > logged_step / tenth {
            eprintln!("job {id} step {}/{steps}: {summary}", status.committed_step);
            logged_step = status.committed_step;
        }
        bar.set_message(summary);
        match status.state() {
            pb::JobState::Completed => {
                bar.finish_and_clear();
                return Ok(status);
            }
            pb::JobState::Failed | pb::JobState::Cancelled => {
                bar.finish_and_clear();
                bail!("job {id} {}: {}", status.state().word(), status.message);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Makes `request` until the coordinator answers, for clients following a job or a screen: a final
/// answer (an unknown id) is an error at once; a coordinator restarting or unreachable is retried for up
/// to 2 minutes ([`RetryPolicy`]).
pub(crate) fn ask_coordinator<T>(
    request: impl FnMut() -> Result<T, tonic::Status>,
) -> anyhow::Result<T> {
    Ok(RetryPolicy::through_restarts(FOLLOW_GIVE_UP).run(request)?)
}

/// How long a client following a job or a screen waits for a lost coordinator.
const FOLLOW_GIVE_UP: Duration = Duration::from_secs(120);
