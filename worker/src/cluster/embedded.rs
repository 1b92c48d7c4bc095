//! The embedded default: an in-process coordinator with in-memory metadata and worker processes of this
//! binary (`cellfleet train --local --workers N`, `cellfleet screen run` without a coordinator).

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cellfleet_coordinator::CoordinatorConfig;
use cellfleet_proto as pb;
use cellfleet_shared::meta::MemoryStore;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

use crate::train::outputs::OutputDir;

use super::client::{runtime, submit, submit_and_follow, ClusterJob};

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
            // Loopback, this user's own processes: no TLS, no tokens.
            cellfleet_coordinator::Exposure::default(),
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
        let mut client = crate::link::connect(&self.url)?;
        Ok(self
            .rt
            .block_on(client.job_status(pb::JobStatusRequest {
                job_id: job.to_string(),
            }))?
            .into_inner())
    }

    pub fn submit(&self, job: &ClusterJob) -> anyhow::Result<String> {
        let _entered = self.rt.enter();
        let mut client = crate::link::connect(&self.url)?;
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
    // Worker logs stay on this machine, beside the outputs when those are local.
    let logs = if OutputDir::is_store(&job.out) {
        std::path::PathBuf::from("cellfleet-workers")
    } else {
        Path::new(&job.out).join("workers")
    };
    let cluster = EmbeddedCluster::start(workers, job.threads, &logs)?;
    eprintln!(
        "embedded coordinator on {} with {workers} worker processes (logs in {})",
        cluster.url,
        logs.display()
    );
    submit_and_follow(&cluster.url, job, progress)
}
