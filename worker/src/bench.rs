//! `cellfleet bench`: throughput benchmarks that measure their baseline in the same run and print a ratio.
//!
//! * `ingest`: `cellfleet ingest` (as a child process, so its peak memory is its own) against the Python
//!   anndata + numpy baseline in `bench/ingest_baseline.py` doing the same HVG selection and binning.
//! * `stream`: augmented, masked batches per second from one loader thread, against the numpy per-sample
//!   baseline in `bench/stream_baseline.py`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cellfleet_shared::batch::{Loader, LoaderConfig};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::manifest::Manifest;
use cellfleet_shared::store::S3Options;
use cellfleet_shared::stream::{EpochPlan, OrderConfig, Partitioner};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and peak memory vs a Python anndata + numpy baseline
    Ingest {
        /// h5ad files to ingest (e.g. a 600k-cell `cellfleet synth` file and kang_ifnb_pbmc.h5ad)
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long, default_value_t = 4096)]
        hvg: usize,
        #[arg(long, default_value_t = 50)]
        bins: u16,
        /// Cap on the cells the (slow) Python baseline processes; its rate is per cell either way
        #[arg(long)]
        baseline_cells: Option<u64>,
        /// Scratch directory for the corpora written
        #[arg(long, default_value = "runs/bench")]
        scratch: PathBuf,
    },
    /// Sample-stream throughput per core vs a numpy per-sample baseline
    Stream {
        /// Corpus to read (e.g. a 600k-cell synthetic corpus with 4,096 genes)
        url: String,
        #[arg(long, default_value_t = 256)]
        batch_size: u32,
        /// Seconds to measure each side
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        augmentation: u32,
    },
}

/// Peak resident memory (MiB) and wall time of a child process.
struct ChildRun {
    seconds: f64,
    peak_mib: f64,
    stdout: String,
}

fn run_measured(cmd: &mut Command) -> anyhow::Result<ChildRun> {
    use std::io::Read;
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot start benchmark child")?;
    let pid = child.id() as libc::pid_t;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    // wait4 (not Child::wait) because it also returns the child's own peak memory.
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    if reaped != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("benchmark child {cmd:?} failed:\n{stderr}");
    }
    Ok(ChildRun {
        seconds,
        peak_mib: usage.ru_maxrss as f64 / 1024.0,
        stdout,
    })
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn bench_dir() -> PathBuf {
    // The scripts live in the source tree's bench/ folder.
    let candidates = [
        PathBuf::from("bench"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench"),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("ingest_baseline.py").is_file())
        .unwrap_or_else(|| PathBuf::from("bench"))
}

pub fn run(which: BenchCommand) -> anyhow::Result<()> {
    match which {
        BenchCommand::Ingest {
            inputs,
            hvg,
            bins,
            baseline_cells,
            scratch,
        } => bench_ingest(&inputs, hvg, bins, baseline_cells, &scratch),
        BenchCommand::Stream {
            url,
            batch_size,
            seconds,
            augmentation,
        } => bench_stream(&url, batch_size, seconds, augmentation),
    }
}

fn bench_ingest(
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

fn bench_stream(url: &str, batch_size: u32, seconds: f64, augmentation: u32) -> anyhow::Result<()> {
    let corpus = Arc::new(Corpus::open(url, &S3Options::default())?);
    let n_genes = corpus.manifest.genes.len();
    let plan = Arc::new(EpochPlan::new(
        &corpus.manifest,
        OrderConfig {
            seed: 1,
            augmentation,
            window_units: 16,
        },
        0,
    )?);
    let partitioner = Partitioner {
        epoch_len: plan.len(),
    };
    println!("sample-stream benchmark: {} cells x {n_genes} genes, augmentation x{augmentation}, batch {batch_size}", corpus.total_cells());
    let measure = |threads: usize| -> anyhow::Result<f64> {
        let ranges: Vec<_> = (0..)
            .map(|i| partitioner.global_batch(i * u64::from(batch_size), 1, batch_size))
            .take_while(|r| !r.is_empty())
            .collect();
        let loader = Loader::spawn(
            corpus.clone(),
            plan.clone(),
            ranges,
            LoaderConfig {
                threads,
                ..LoaderConfig::default()
            },
        )?;
        let started = Instant::now();
        let mut samples = 0u64;
        let mut warm = None;
        for batch in loader {
            let batch = batch?;
            // The first batches fetch and verify shards; measure from the second second on.
            if warm.is_none() && started.elapsed() > Duration::from_secs(1) {
                warm = Some((Instant::now(), samples));
            }
            samples += batch.samples as u64;
            if let Some((t0, _)) = warm {
                if t0.elapsed().as_secs_f64() > seconds {
                    break;
                }
            }
        }
        let (t0, s0) = warm.context("the corpus is too small to measure; use a larger one")?;
        Ok((samples - s0) as f64 / t0.elapsed().as_secs_f64())
    };
    // The token work alone (clone permutation, masking, output arrays) on one in-memory cell: the floor
    // that decompression and batch bookkeeping add to.
    let writer_rate = {
        use cellfleet_shared::batch::{MaskConfig, SampleWriter, TokenLayout};
        use cellfleet_shared::stream::SampleId;
        let layout = TokenLayout::new(corpus.manifest.bins.n_bins)?;
        let cell = corpus.fetch_shard(0)?.read_block(0)?.bins_of(0).to_vec();
        let mut writer = SampleWriter::default();
        let (mut genes, mut inputs, mut targets) = (
            vec![0u16; n_genes + 1],
            vec![0u8; n_genes + 1],
            vec![0u8; n_genes + 1],
        );
        let started = Instant::now();
        let mut samples = 0u64;
        while started.elapsed().as_secs_f64() < seconds.min(3.0) {
            for clone in 0..64 {
                let sample = SampleId {
                    cell: samples,
                    clone,
                };
                writer.write(
                    &plan,
                    layout,
                    MaskConfig { ratio: 0.15 },
                    sample,
                    &cell,
                    &mut genes,
                    &mut inputs,
                    &mut targets,
                );
            }
            samples += 64;
        }
        samples as f64 / started.elapsed().as_secs_f64()
    };
    let one = measure(1)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let all = measure(cores)?;
    let baseline = run_measured(
        Command::new(python())
            .arg(bench_dir().join("stream_baseline.py"))
            .args([
                n_genes.to_string(),
                corpus.manifest.bins.n_bins.to_string(),
                seconds.to_string(),
            ]),
    )?;
    let report: serde_json::Value =
        serde_json::from_str(baseline.stdout.trim()).context("baseline output")?;
    let base_rate =
        report["samples"].as_f64().unwrap_or(0.0) / report["seconds"].as_f64().unwrap_or(1.0);
    println!("{:<44} {:>14}", "", "samples/s");
    println!(
        "{:<44} {:>14.0}",
        "token assembly only, in memory, 1 core", writer_rate
    );
    println!(
        "{:<44} {:>14.0}",
        "cellfleet loader, 1 thread (per core)", one
    );
    println!(
        "{:<44} {:>14.0}",
        format!("cellfleet loader, {cores} threads"),
        all
    );
    println!(
        "{:<44} {:>14.0}",
        "numpy per-sample baseline, 1 core", base_rate
    );
    println!(
        "per-core ratio vs baseline: {:.1}x; target 50,000 samples/s per core: {}",
        one / base_rate,
        if one >= 50_000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
