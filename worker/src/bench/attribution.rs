//! `cellfleet bench attribution`: gradient attribution throughput. Per core, an attribution screen's
//! units computed in this process on one thread (attributed cells per second: per cell `2 * steps`
//! forward and backward passes and one forward for the logit gap) against the same computation in plain PyTorch
//! (`bench/attribution_baseline.py`) on the same weights, cells and references, in alternating rounds; the
//! two sides' importances are compared value by value.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context};
use cellfleet_shared::screen::AttributionReference;
use cellfleet_shared::storage::S3Options;

use super::child::{bench_dir, median_range, python, round_ratios};
use super::screen::{absolute_spec, fresh_dir, load_average, planned_screener};
use crate::screen::plan::read_cells;

/// What `bench attribution` runs.
pub struct AttributionBench {
    /// A screen specification with `[attribution]` (contrast reference).
    pub spec: PathBuf,
    pub cells: Option<u64>,
    pub scratch: PathBuf,
    pub rounds: usize,
}

pub fn bench_attribution(args: &AttributionBench) -> anyhow::Result<()> {
    let s3 = S3Options::default();
    let spec = absolute_spec(&args.spec)?;
    let Some(attribution) = spec.attribution.clone() else {
        bail!(
            "{}: no [attribution] section; `bench attribution` measures attribution screens",
            args.spec.display()
        );
    };
    if attribution.reference != AttributionReference::Contrast {
        bail!(
            "{}: attribution.reference = \"padding\"; `bench attribution` measures the contrast reference (both directions)",
            args.spec.display()
        );
    }
    let (_, scratch, plan, screener) = planned_screener(spec, args.cells, &args.scratch, &s3)?;
    let n = plan.vocabulary.len();
    let cells = plan.cells.len();
    eprintln!(
        "bench attribution: {cells} cells x {n} genes (batch {}), {} rounds",
        plan.spec.execution.batch, args.rounds
    );

    // The baseline's inputs: the classifier's files, the cells' and the references' bins.
    let dir = scratch.join("baseline");
    fresh_dir(&dir)?;
    let classifier = plan.classifier.as_ref().expect("an attribution plan");
    let source = cellfleet_shared::storage::Store::open(&classifier.url, &s3)?;
    for file in [
        crate::train::saved_model::WEIGHTS_FILE,
        crate::train::saved_model::INFO_FILE,
    ] {
        std::fs::write(dir.join(file), source.get(file)?)?;
    }
    let corpus = cellfleet_shared::corpus::Corpus::open(&plan.corpus_url, &s3)?;
    let bins = read_cells(
        &corpus,
        &[plan.cells.clone(), plan.references.clone()].concat(),
    )?;
    let flat = |cells: &[u64]| -> Vec<u8> { cells.iter().flat_map(|c| bins[c].clone()).collect() };
    std::fs::write(dir.join("cells.u8"), flat(&plan.cells))?;
    std::fs::write(dir.join("references.u8"), flat(&plan.references))?;
    let job = serde_json::json!({
        "model_dir": dir,
        "cells_file": dir.join("cells.u8"),
        "references_file": dir.join("references.u8"),
        "class": classifier.starts[0],
        "reference_class": classifier.starts[1],
        "steps": attribution.steps,
        "batch_rows": plan.spec.execution.batch,
        "threads": 1,
        "importance_out": dir.join("importance.f32"),
    });
    let job_path = dir.join("job.json");
    std::fs::write(&job_path, serde_json::to_vec_pretty(&job)?)?;
    let script = bench_dir().join("attribution_baseline.py");

    let mut importance = Vec::new();
    let mut ours_round = || -> anyhow::Result<f64> {
        let never = AtomicBool::new(false);
        let started = Instant::now();
        let mut values = Vec::with_capacity(cells * n);
        for unit in 0..plan.unit_count() {
            let result = screener
                .compute_unit(unit, &never)
                .map_err(|e| anyhow::anyhow!("unit {unit}: {e}"))?;
            values.extend(result.attribution.expect("an attribution unit").importance);
        }
        let rate = cells as f64 / started.elapsed().as_secs_f64();
        importance = values;
        Ok(rate)
    };
    let theirs_round = || -> anyhow::Result<f64> {
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
        Ok(report["cells_per_second"].as_f64().unwrap_or(f64::NAN))
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
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
            "round {}: cellfleet {a:.1}, PyTorch {b:.1} attributed cells/s (load average {load:.2})",
            round + 1
        );
        ours.push(a);
        theirs.push(b);
    }
    // The same numbers on both sides (float32 libtorch kernels either way).
    let baseline: Vec<f32> = std::fs::read(dir.join("importance.f32"))?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    if baseline.len() != importance.len() {
        bail!(
            "the baseline attributed {} values, cellfleet {}",
            baseline.len(),
            importance.len()
        );
    }
    let scale = importance.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let worst = importance
        .iter()
        .zip(&baseline)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let (ratio, low, high) = median_range(&round_ratios(&ours, &theirs));
    let (ours_median, _, _) = median_range(&ours);
    let (theirs_median, _, _) = median_range(&theirs);
    println!(
        "gradient attribution (contrast reference, both directions, {} path points each), 1 process x 1 thread each, {cells} cells of {} tokens:",
        attribution.steps,
        n + 1
    );
    println!("  cellfleet {ours_median:>8.2} attributed cells/s");
    println!("  PyTorch   {theirs_median:>8.2} attributed cells/s");
    println!(
        "  ratio {ratio:.2}x (median of {} rounds, range {low:.2}-{high:.2}x); importances agree to {worst:.2e} (largest |value| {scale:.2e})",
        args.rounds
    );
    if worst > 1e-3 * scale.max(1e-6) {
        bail!("cellfleet and PyTorch attributions differ by {worst} (largest value {scale})");
    }
    Ok(())
}
