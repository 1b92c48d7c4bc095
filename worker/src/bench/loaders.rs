//! `cellfleet bench loaders`: cellfleet's data path against the single-cell loaders users pick today,
//! installed from the package registries (`scripts/setup.sh --loaders`) and run on the same .h5ad file in
//! the same run:
//!
//! * NVIDIA bionemo-scdl (`bench/scdl_baseline.py`): conversion to its memory-mapped format; shuffled
//!   single-row reads (`get_row`, its fastest path) and shuffled batches the way its docs load them
//!   (torch `DataLoader` with `collate_sparse_matrix_batch`);
//! * scverse annbatch with the zarrs codec pipeline (`bench/annbatch_baseline.py`): conversion to its
//!   preshuffled, sharded zarr collection and shuffled batches from its `Loader`.
//!
//! Conversion: cells per CPU-second of one process (per core: `cellfleet ingest --threads 1` against
//! each library's conversion call, whose imports are not counted), peak memory, and separately the
//! whole machine (`cellfleet ingest` on every core against each library, which converts on one).
//! Streaming: rows per second of one process on one core, page cache warm, in alternating rounds
//! (median and range). cellfleet delivers augmented (bootstrapped-permutation clones), masked,
//! model-ready token rows in the expressed layout at the ingested vocabulary; the libraries deliver
//! raw expression rows of every gene in the file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::batch::SequenceLayout;
use cellfleet_shared::stream::OrderConfig;

use super::child::{
    bench_dir, median_range, round_ratios, run_measured, run_measured_with_writeback, ChildRun,
};
use super::stream::loader_rate;

/// What `bench loaders` runs.
pub struct LoadersBench {
    pub h5ad: PathBuf,
    /// Vocabulary genes of cellfleet's corpus (highly variable genes of the file).
    pub hvg: usize,
    pub bins: u16,
    /// Seconds each stream side runs per round.
    pub seconds: f64,
    pub rounds: usize,
    pub batch: u32,
    pub unexpressed: u32,
    pub scratch: PathBuf,
}

/// The Python interpreters of the loaders' environments.
struct Environments {
    scdl: PathBuf,
    annbatch: PathBuf,
}

impl Environments {
    fn find() -> anyhow::Result<Self> {
        let root = std::env::var_os("CELLFLEET_LOADERS")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cellfleet/loaders"))
            })
            .context("neither CELLFLEET_LOADERS nor HOME is set")?;
        let found = Self {
            scdl: root.join("scdl/bin/python"),
            annbatch: root.join("annbatch/bin/python"),
        };
        for (name, python) in [("bionemo-scdl", &found.scdl), ("annbatch", &found.annbatch)] {
            if !python.is_file() {
                bail!(
                    "{name} is not installed ({} is missing): run `bash scripts/setup.sh --loaders` first",
                    python.display()
                );
            }
        }
        Ok(found)
    }
}

fn json_of(run: &ChildRun, what: &str) -> anyhow::Result<serde_json::Value> {
    let line = run
        .stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{what} printed no JSON line: {}", run.stdout))?;
    serde_json::from_str(line).with_context(|| format!("{what}: cannot parse {line}"))
}

fn number(report: &serde_json::Value, key: &str, what: &str) -> anyhow::Result<f64> {
    report[key]
        .as_f64()
        .with_context(|| format!("{what}: no number `{key}` in {report}"))
}

fn fresh(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    Ok(())
}

/// `bench loaders`: see the module documentation.
pub fn bench_loaders(args: &LoadersBench) -> anyhow::Result<()> {
    if args.rounds == 0 || args.seconds <= 0.0 || args.batch == 0 {
        bail!("--rounds, --seconds and --batch must be positive");
    }
    let environments = Environments::find()?;
    let scdl_script = bench_dir().join("scdl_baseline.py");
    let annbatch_script = bench_dir().join("annbatch_baseline.py");
    std::fs::create_dir_all(&args.scratch)
        .with_context(|| format!("cannot create --scratch {}", args.scratch.display()))?;
    let exe = std::env::current_exe()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let h5ad = std::path::absolute(&args.h5ad)?;
    let (corpus_dir, scdl_dir, annbatch_dir) = (
        args.scratch.join("cellfleet"),
        args.scratch.join("scdl"),
        args.scratch.join("annbatch"),
    );
    println!(
        "loader benchmark on {}: {} rounds, alternating; {cores} cores",
        h5ad.display(),
        args.rounds
    );

    // Conversion. Each side writes a fresh output every round.
    // The child's measurement, the machine's busy CPU seconds over it and a final sync, and the cells.
    let ingest = |threads: usize| -> anyhow::Result<(ChildRun, f64, u64)> {
        fresh(&corpus_dir)?;
        let (run, machine) = run_measured_with_writeback(
            Command::new(&exe)
                .arg("ingest")
                .arg(&h5ad)
                .arg("--out")
                .arg(&corpus_dir)
                .args(["--hvg", &args.hvg.to_string()])
                .args(["--bins", &args.bins.to_string()])
                .args(["--threads", &threads.to_string()])
                .env("CELLFLEET_QUIET", "1"),
        )?;
        let cells =
            Corpus::open(&corpus_dir.display().to_string(), &S3Options::default())?.total_cells();
        Ok((run, machine, cells))
    };
    // A library's conversion: the child's own measurement and the report it printed.
    let convert = |python: &Path,
                   script: &Path,
                   out: &Path,
                   what: &str|
     -> anyhow::Result<(ChildRun, serde_json::Value)> {
        fresh(out)?;
        let run = run_measured(
            Command::new(python)
                .arg(script)
                .arg("convert")
                .arg(&h5ad)
                .arg(out),
        )?;
        let report = json_of(&run, what)?;
        Ok((run, report))
    };
    // Starting a process is not converting: the libraries' conversion calls are timed after their imports,
    // so cellfleet's ingest is timed less the CPU of starting the same binary (`cellfleet --version`
    // loads the same libraries, libtorch's operator registry among them). Whole processes, startup
    // included on both sides, are reported too.
    let startup = {
        let mut cpu: Vec<f64> = (0..3)
            .map(|_| run_measured(Command::new(&exe).arg("--version")).map(|r| r.cpu_seconds))
            .collect::<anyhow::Result<_>>()?;
        cpu.sort_by(f64::total_cmp);
        cpu[1]
    };
    let mut conversion: [Vec<f64>; 3] = Default::default();
    let mut whole_process: [Vec<f64>; 2] = Default::default();
    let mut conversion_peak = [0f64; 3];
    let mut whole_machine = Vec::new();
    let mut scdl_wall = Vec::new();
    // Cells per busy CPU-second of the whole machine, writeback included: [cellfleet, bionemo-scdl].
    let mut with_writeback: [Vec<f64>; 2] = Default::default();
    for round in 0..args.rounds {
        let (ours, ours_machine, cells) = ingest(1)?;
        with_writeback[0].push(cells as f64 / (ours_machine - startup).max(1e-3));
        conversion[0].push(cells as f64 / (ours.cpu_seconds - startup).max(1e-3));
        whole_process[0].push(cells as f64 / ours.cpu_seconds);
        conversion_peak[0] = conversion_peak[0].max(ours.peak_mib);
        let (scdl_run, scdl) = convert(
            &environments.scdl,
            &scdl_script,
            &scdl_dir,
            "bionemo-scdl convert",
        )?;
        let scdl_cells = number(&scdl, "cells", "bionemo-scdl convert")?;
        if scdl_cells as u64 != cells {
            bail!("bionemo-scdl converted {scdl_cells} cells, cellfleet ingested {cells}: not the same file?");
        }
        conversion[1].push(scdl_cells / number(&scdl, "cpu_seconds", "bionemo-scdl convert")?);
        with_writeback[1]
            .push(scdl_cells / number(&scdl, "machine_cpu_seconds", "bionemo-scdl convert")?);
        whole_process[1].push(scdl_cells / scdl_run.cpu_seconds);
        scdl_wall.push(scdl_cells / number(&scdl, "seconds", "bionemo-scdl convert")?);
        conversion_peak[1] = conversion_peak[1].max(scdl_run.peak_mib);
        let what = "annbatch convert";
        let (annbatch_run, annbatch) = convert(
            &environments.annbatch,
            &annbatch_script,
            &annbatch_dir,
            what,
        )?;
        conversion[2]
            .push(number(&annbatch, "cells", what)? / number(&annbatch, "cpu_seconds", what)?);
        conversion_peak[2] = conversion_peak[2].max(annbatch_run.peak_mib);
        let (all, _, _) = ingest(cores)?;
        whole_machine.push(cells as f64 / all.seconds);
        eprintln!(
            "bench loaders: conversion round {}/{} done",
            round + 1,
            args.rounds
        );
    }
    let cells = Corpus::open(&corpus_dir.display().to_string(), &S3Options::default())?;
    println!();
    println!(
        "conversion of {} cells (per core: cells per CPU-second of one process)",
        cells.total_cells()
    );
    println!(
        "{:<58} {:>16} {:>16} {:>9}",
        "side", "cells/CPU-s", "range", "peak MiB"
    );
    let names = [
        "cellfleet ingest --threads 1 (less process startup)",
        "bionemo-scdl 0.1.3 conversion call (imports excluded)",
        "annbatch 0.3.1 add_adatas, zarrs (imports excluded)",
    ];
    for (i, name) in names.iter().enumerate() {
        let (median, low, high) = median_range(&conversion[i]);
        println!(
            "{name:<58} {median:>16.0} {:>16} {:>9.0}",
            format!("{low:.0}-{high:.0}"),
            conversion_peak[i]
        );
    }
    let (vs_scdl, low, high) = median_range(&round_ratios(&conversion[0], &conversion[1]));
    println!(
        "  per core, cellfleet / bionemo-scdl: {vs_scdl:.2}x ({low:.2}-{high:.2}x; target >= 2x) at {:.1}x less peak memory",
        conversion_peak[1] / conversion_peak[0]
    );
    let (vs_annbatch, low, high) = median_range(&round_ratios(&conversion[0], &conversion[2]));
    println!("  per core, cellfleet / annbatch: {vs_annbatch:.2}x ({low:.2}-{high:.2}x)");
    let (whole_ratio, low, high) =
        median_range(&round_ratios(&whole_process[0], &whole_process[1]));
    println!(
        "  per core, whole processes (startup and imports included; cellfleet's startup is {startup:.2} CPU-s): cellfleet {:.0} vs bionemo-scdl {:.0} cells/CPU-s, {whole_ratio:.2}x ({low:.2}-{high:.2}x)",
        median_range(&whole_process[0]).0,
        median_range(&whole_process[1]).0
    );
    let (ratio, low, high) = median_range(&round_ratios(&with_writeback[0], &with_writeback[1]));
    println!(
        "  per core, whole machine (busy CPU of every process and the kernel over the conversion call and a sync of what it wrote, /proc/stat): cellfleet {:.0} vs bionemo-scdl {:.0} cells/CPU-s, {ratio:.2}x ({low:.2}-{high:.2}x)",
        median_range(&with_writeback[0]).0,
        median_range(&with_writeback[1]).0
    );
    let (whole_ratio, low, high) = median_range(&round_ratios(&whole_machine, &scdl_wall));
    println!(
        "  whole machine, cells per wall second: cellfleet ingest on {cores} threads {:.0} (whole process) vs bionemo-scdl {:.0} (one core, its conversion call): {whole_ratio:.2}x ({low:.2}-{high:.2}x)",
        median_range(&whole_machine).0,
        median_range(&scdl_wall).0
    );
    println!(
        "  what each does: cellfleet selects {} highly variable genes, bins every cell, compresses and hashes shards; bionemo-scdl copies the sparse matrix into memory-mapped arrays; annbatch shuffles the cells and writes a sharded zarr",
        args.hvg
    );

    // Streaming.
    let corpus = Arc::new(cells);
    let order = OrderConfig {
        seed: 1,
        augmentation: 4,
        window_units: 16,
    };
    let sequence = SequenceLayout::Expressed {
        unexpressed: args.unexpressed,
    };
    let script_rate =
        |python: &Path, script: &Path, mode: &str, dir: &Path, what: &str| -> anyhow::Result<f64> {
            let run = run_measured(
                Command::new(python)
                    .arg(script)
                    .arg(mode)
                    .arg(dir)
                    .arg(args.seconds.to_string())
                    .arg(args.batch.to_string()),
            )?;
            let report = json_of(&run, what)?;
            Ok(number(&report, "rows", what)? / number(&report, "seconds", what)?)
        };
    let sides = [
        "cellfleet loader, 1 thread: augmented, masked expressed-layout tokens",
        "bionemo-scdl get_row, shuffled: raw sparse rows",
        "bionemo-scdl DataLoader + collate (its docs): sparse CSR batches",
        "annbatch Loader, zarrs: scipy CSR batches",
    ];
    let mut rates: [Vec<f64>; 4] = Default::default();
    for round in 0..args.rounds {
        // Rotate who goes first, so no side always runs on a machine just warmed or just loaded.
        for k in 0..sides.len() {
            let side = (k + round) % sides.len();
            let rate = match side {
                0 => loader_rate(&corpus, order, args.batch, args.seconds, 1, sequence)?,
                1 => script_rate(
                    &environments.scdl,
                    &scdl_script,
                    "stream",
                    &scdl_dir,
                    "bionemo-scdl stream",
                )?,
                2 => script_rate(
                    &environments.scdl,
                    &scdl_script,
                    "loader",
                    &scdl_dir,
                    "bionemo-scdl loader",
                )?,
                _ => script_rate(
                    &environments.annbatch,
                    &annbatch_script,
                    "stream",
                    &annbatch_dir,
                    "annbatch stream",
                )?,
            };
            rates[side].push(rate);
        }
        eprintln!(
            "bench loaders: stream round {}/{} done",
            round + 1,
            args.rounds
        );
    }
    println!();
    println!(
        "sample stream, one core, batch {}, {} s per side per round, page cache warm (cellfleet: {} genes, x4 augmentation, 15% masking, {} unexpressed genes per sample)",
        args.batch,
        args.seconds,
        corpus.manifest.genes.len(),
        args.unexpressed
    );
    println!(
        "{:<72} {:>12} {:>18}",
        "side: what it delivers", "rows/s", "range"
    );
    for (side, name) in sides.iter().enumerate() {
        let (median, low, high) = median_range(&rates[side]);
        println!(
            "{name:<72} {median:>12.0} {:>18}",
            format!("{low:.0}-{high:.0}")
        );
    }
    for (side, target) in [
        (1, "target >= 2x"),
        (2, "target >= 2x"),
        (3, "target >= 1x"),
    ] {
        let (median, low, high) = median_range(&round_ratios(&rates[0], &rates[side]));
        println!(
            "  cellfleet / {}: {median:.2}x ({low:.2}-{high:.2}x per round; {target})",
            sides[side].split(':').next().unwrap_or_default()
        );
    }
    Ok(())
}
