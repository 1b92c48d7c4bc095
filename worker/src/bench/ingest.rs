//! `cellfleet bench ingest`: `cellfleet ingest` (as a child process, so its peak memory is its own)
//! against the Python anndata + numpy baseline in `bench/ingest_baseline.py` doing the same HVG selection
//! and binning.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use cellfleet_shared::corpus::manifest::Manifest;

use super::child::{bench_dir, python, run_measured};

pub(crate) fn bench_ingest(
    inputs: &[PathBuf],
    hvg: usize,
    bins: u16,
    baseline_cells: Option<u64>,
    scratch: &Path,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "ingest benchmark ({cores} cores; cellfleet uses all of them, the Python baseline one)"
    );
    println!(
        "{:<28} {:>9} {:>12} {:>10} {:>14} {:>12} {:>10} {:>8} {:>10}",
        "input",
        "cells",
        "cellfleet/s",
        "peak MiB",
        "baseline/s",
        "peak MiB",
        "cells",
        "ratio",
        "same HVGs"
    );
    for input in inputs {
        let out = scratch.join(format!(
            "ingest-{}",
            input.file_stem().unwrap_or_default().to_string_lossy()
        ));
        if out.exists() {
            std::fs::remove_dir_all(&out)
                .with_context(|| format!("cannot clear {}", out.display()))?;
        }
        let ours = run_measured(
            Command::new(&exe)
                .args([
                    "ingest",
                    &input.display().to_string(),
                    "--out",
                    &out.display().to_string(),
                ])
                .args(["--hvg", &hvg.to_string(), "--bins", &bins.to_string()])
                .env("CELLFLEET_QUIET", "1"),
        )?;
        let manifest: Manifest =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json"))?)?;
        let cells = manifest.total_cells;
        let matrix = manifest.sources[0].matrix.clone();
        let mut baseline_cmd = Command::new(python());
        baseline_cmd
            .arg(bench_dir().join("ingest_baseline.py"))
            .arg(input)
            .args([&matrix, &hvg.to_string(), &bins.to_string()]);
        if let Some(cap) = baseline_cells {
            baseline_cmd.arg(cap.to_string());
        }
        let theirs = run_measured(&mut baseline_cmd)?;
        let report: serde_json::Value =
            serde_json::from_str(theirs.stdout.trim()).context("baseline output")?;
        let their_cells = report["cells"].as_u64().unwrap_or(0);
        let their_genes: Vec<&str> = report["genes"]
            .as_array()
            .map(|g| g.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let same_vocabulary = their_cells == cells
            && their_genes
                == manifest
                    .genes
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>();
        // Rate over the baseline's own processing time would flatter it; use its wall time like ours.
        let our_rate = cells as f64 / ours.seconds;
        let their_rate = their_cells as f64 / theirs.seconds;
        println!(
            "{:<28} {:>9} {:>12.0} {:>10.0} {:>14.0} {:>12.0} {:>10} {:>7.1}x {:>10}",
            input.file_name().unwrap_or_default().to_string_lossy(),
            cells,
            our_rate,
            ours.peak_mib,
            their_rate,
            theirs.peak_mib,
            their_cells,
            our_rate / their_rate,
            if same_vocabulary {
                "yes"
            } else if their_cells != cells {
                "(subset)"
            } else {
                "NO"
            }
        );
    }
    Ok(())
}
