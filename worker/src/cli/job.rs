//! `cellfleet job status|cancel|workers`: look at and steer jobs on a coordinator.

use cellfleet_proto as pb;

use crate::cluster::client::{follow, runtime};
use crate::state_words::StateWord;

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
    let mut client = crate::link::connect(coordinator)?;
    let refused =
        |s: tonic::Status| anyhow::anyhow!("{coordinator}: {}", crate::retry::explain(&s));
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
    println!("job {}: {}", s.job_id, s.state().word());
    println!("  {}", s.message);
    // Before rank 0 reports a step of this run the loss is NaN and the rate 0: unknown, not shown.
    let progress = if s.last_loss.is_nan() {
        "no step reported yet".to_string()
    } else {
        format!(
            "loss {:.4}, {:.0} samples/s",
            s.last_loss, s.samples_per_second
        )
    };
    println!(
        "  step {}/{} (epoch {}, position {}), {progress}",
        s.committed_step, s.total_steps, s.epoch, s.position
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
