//! `cellfleet bench cluster`: training throughput with 1 and 2 local workers, and recovery after a SIGKILL.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use cellfleet_proto as pb;
use cellfleet_shared::storage::S3Options;

use crate::cluster::client::ClusterJob;
use crate::cluster::embedded::EmbeddedCluster;
use crate::train::config::TrainConfig;

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
        out: out.join(name).display().to_string(),
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
                match status.state() {
                    pb::JobState::Completed => return Ok(status),
                    pb::JobState::Failed | pb::JobState::Cancelled => {
                        bail!("bench job {id}: {}", status.message)
                    }
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
