//! `cellfleet bench steer`: MCMC steering throughput. Per core, the steered units of a screen computed
//! in this process on one thread (chain iterations per second: one proposal pass and `target_groups`
//! target passes per chain and iteration) against the same sampler in plain PyTorch
//! (`bench/steer_baseline.py`) on the same weights, start states and settings, in alternating rounds;
//! then whole screens (`screen run --local`) with 1 and 2 worker processes: predicted cells per second.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context};
use cellfleet_shared::screen::SteerMethod;
use cellfleet_shared::storage::S3Options;

use super::child::{bench_dir, median_range, python, round_ratios};
use super::screen::{absolute_spec, fresh_dir, load_average, planned_screener, with_stdout_to};
use crate::cluster::screen_client::run_local;
use crate::train::checkpoint_state::open_existing_run;
use crate::train::saved_model::export_checkpoint;

/// What `bench steer` runs.
pub struct SteerBench {
    /// A screen specification with `[steer]` (method `mcmc`).
    pub spec: PathBuf,
    /// Cap on the screened cells.
    pub cells: Option<u64>,
    pub scratch: PathBuf,
    /// Alternating rounds of the per-core comparison.
    pub rounds: usize,
    /// The largest worker count of the whole-screen runs (1 and this).
    pub workers_max: u32,
}

pub fn bench_steer(args: &SteerBench) -> anyhow::Result<()> {
    let s3 = S3Options::default();
    let spec = absolute_spec(&args.spec)?;
    let Some(steer) = spec.steer.clone() else {
        bail!(
            "{}: no [steer] section; `bench steer` measures steered screens",
            args.spec.display()
        );
    };
    if steer.method != SteerMethod::Mcmc {
        bail!(
            "{}: steer.method = \"edit\"; `bench steer` measures the MCMC sampler",
            args.spec.display()
        );
    }
    let (spec, scratch, plan, screener) = planned_screener(spec, args.cells, &args.scratch, &s3)?;
    let starts = screener.steer_chain_starts()?;
    let chain_iterations = (starts.len() * steer.iterations as usize) as f64;
    let records = plan.total_records();
    eprintln!(
        "bench steer: {} records x {} chains x {} iterations ({} genes, block {}, {} target passes, batch {}), {} rounds",
        records,
        steer.chains,
        steer.iterations,
        plan.vocabulary.len(),
        steer.block,
        steer.target_groups,
        plan.spec.execution.batch,
        args.rounds
    );

    // The baseline's inputs: the exported weights and every chain's start state and free genes.
    let dir = scratch.join("baseline");
    fresh_dir(&dir)?;
    let checkpoints = open_existing_run(&plan.checkpoint.url, &s3)?;
    let manifest = checkpoints
        .manifest(plan.checkpoint.step)?
        .map_err(|p| anyhow::anyhow!("{p}"))?;
    export_checkpoint(&checkpoints, &manifest, &dir.join("model.safetensors"))
        .context("exporting the checkpoint for the baseline")?;
    let n = plan.vocabulary.len();
    let mut states = Vec::with_capacity(starts.len() * n);
    let mut free = vec![0u8; starts.len() * n];
    for (row, (bins, genes)) in starts.iter().enumerate() {
        states.extend_from_slice(bins);
        for &g in genes {
            free[row * n + g as usize] = 1;
        }
    }
    std::fs::write(dir.join("states.u8"), &states)?;
    std::fs::write(dir.join("free.u8"), &free)?;
    let job = serde_json::json!({
        "model_dir": dir,
        "states_file": dir.join("states.u8"),
        "free_file": dir.join("free.u8"),
        "temperature": steer.temperature,
        "block": steer.block,
        "target_groups": steer.target_groups,
        "batch_rows": plan.spec.execution.batch,
        "iterations": steer.iterations,
        "threads": 1,
    });
    let job_path = dir.join("job.json");
    std::fs::write(&job_path, serde_json::to_vec_pretty(&job)?)?;
    let script = bench_dir().join("steer_baseline.py");

    let ours_round = || -> anyhow::Result<f64> {
        let never = AtomicBool::new(false);
        let started = Instant::now();
        for unit in 0..plan.unit_count() {
            screener
                .compute_unit(unit, &never)
                .map_err(|e| anyhow::anyhow!("unit {unit}: {e}"))?;
        }
        Ok(chain_iterations / started.elapsed().as_secs_f64())
    };
    let theirs_round = || -> anyhow::Result<(f64, f64)> {
        let out = Command::new(python())
            .arg(&script)
            .arg(&job_path)
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed:\n{}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{} printed no JSON", script.display()))?;
        Ok((
            report["chain_iterations_per_second"]
                .as_f64()
                .unwrap_or(f64::NAN),
            report["acceptance"].as_f64().unwrap_or(f64::NAN),
        ))
    };
    let (mut ours, mut theirs, mut acceptance) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let load = load_average();
        let (a, b) = if round % 2 == 0 {
            let a = ours_round()?;
            (a, theirs_round()?)
        } else {
            let b = theirs_round()?;
            (ours_round()?, b)
        };
        eprintln!(
            "round {}: cellfleet {:.1}, PyTorch {:.1} chain iterations/s (load average {load:.2})",
            round + 1,
            a,
            b.0
        );
        ours.push(a);
        theirs.push(b.0);
        acceptance.push(b.1);
    }
    let (ratio, low, high) = median_range(&round_ratios(&ours, &theirs));
    let (ours_median, _, _) = median_range(&ours);
    let (theirs_median, _, _) = median_range(&theirs);
    let per_iteration_passes = 1 + steer.target_groups as usize;
    println!(
        "MCMC steering, 1 process x 1 thread each ({} chains of {} iterations, {} forward passes of {} tokens per chain iteration):",
        starts.len(),
        steer.iterations,
        per_iteration_passes,
        n + 1
    );
    println!(
        "  cellfleet {ours_median:>10.1} chain iterations/s ({:.1} predicted cells/s)",
        ours_median / steer.iterations as f64 / steer.chains as f64
    );
    println!(
        "  PyTorch   {theirs_median:>10.1} chain iterations/s (acceptance {:.3})",
        acceptance.iter().sum::<f64>() / acceptance.len().max(1) as f64
    );
    println!(
        "  ratio {ratio:.2}x (median of {} rounds, range {low:.2}-{high:.2}x)",
        args.rounds
    );

    // Whole screens through the fleet machinery.
    let mut counts = vec![1];
    if args.workers_max > 1 {
        counts.push(args.workers_max);
    }
    for workers in counts {
        let dir = scratch.join(format!("workers-{workers}"));
        fresh_dir(&dir)?;
        let mut spec = spec.clone();
        spec.out = dir.join("screen").display().to_string();
        let spec_path = dir.join("spec.json");
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
        let started = Instant::now();
        let written = with_stdout_to(&dir.join("screen-report.txt"), || {
            run_local(
                &spec_path,
                workers,
                Some(dir.join("results").display().to_string()),
                false,
                &s3,
            )
        })?;
        let wall = started.elapsed().as_secs_f64();
        let cells = written.results.total_records as f64;
        println!(
            "  screen run --local, {workers} worker{}: {cells} predicted cells in {wall:.1} s = {:.2} cells/s, {:.0} chain iterations/s (wall, planning and start-up included)",
            if workers == 1 { "" } else { "s" },
            cells / wall,
            cells * f64::from(steer.chains) * f64::from(steer.iterations) / wall
        );
    }
    Ok(())
}
