//! `cellfleet bench`: throughput benchmarks that measure their baseline in the same run and print a ratio.
//!
//! * `ingest`: `cellfleet ingest` (as a child process, so its peak memory is its own) against the Python
//!   anndata + numpy baseline in `bench/ingest_baseline.py` doing the same HVG selection and binning.
//! * `stream`: augmented, masked batches per second from one loader thread, against the numpy per-sample
//!   baseline in `bench/stream_baseline.py`.
//! * `train`: training-step throughput and peak memory of the model, against the same architecture in
//!   plain eager PyTorch (`bench/train_baseline.py`), both as child processes on the same batch shape and
//!   thread count.
//! * `allreduce`: bus bandwidth of `GlooCollective::all_reduce_sum` on an f32 tensor against Gloo's own
//!   classic `AllreduceRing<float>` looping inside the C++ shim (no cellfleet code in its timed loop), each
//!   as `--ranks` child processes over loopback TCP, at every size, in the same run.
//! * `ckpt`: checkpoint save and restore of a model's weights and AdamW moments (zstd, blake3, manifest,
//!   multipart uploads and ranged reads) against raw PUTs and GETs of the same bytes in the same store,
//!   alternating which side goes first.

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
    /// Training tokens/s and peak memory vs the same model in eager PyTorch
    Train {
        #[arg(long, value_enum, default_value = "small")]
        preset: crate::model::Preset,
        /// Vocabulary genes (sequence length = genes + 1)
        #[arg(long, default_value_t = 1024)]
        genes: usize,
        #[arg(long, default_value_t = 50)]
        bins: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Measured steps (after the warm-up steps)
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup_steps: usize,
        /// CPU threads of both sides
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Skip the PyTorch baseline (e.g. to time only the large preset)
        #[arg(long)]
        no_baseline: bool,
    },
    /// (internal) the cellfleet side of `bench train`, given its spec file
    #[command(hide = true)]
    TrainChild { spec: PathBuf },
    /// Gloo all-reduce bus bandwidth: cellfleet's collective vs Gloo's own AllreduceRing<float>
    Allreduce {
        /// Message sizes in MiB (f32 tensors)
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
        sizes: Vec<f64>,
        /// Seconds to time each side at each size, over all rounds (after each group's warm-up)
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Rounds per size; each starts fresh groups of both sides, alternating which goes first
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Timed repetitions per group; the fastest repetition of all rounds counts
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Cap on the iterations of one repetition
        #[arg(long, default_value_t = 1000)]
        max_iters: usize,
        /// Ranks (child processes) per group
        #[arg(long, default_value_t = 2)]
        ranks: usize,
    },
    /// Cluster training throughput with 1 and 2 local workers, and recovery time after a worker's SIGKILL
    Cluster {
        /// Corpus location (e.g. one ingested from pbmc68k_reduced or Kang)
        #[arg(long)]
        corpus: String,
        #[arg(long, value_enum, default_value = "tiny")]
        preset: crate::model::Preset,
        /// Optimizer steps per measured job
        #[arg(long, default_value_t = 200)]
        steps: u64,
        /// Global batch (samples per step)
        #[arg(long, default_value_t = 32)]
        batch_size: u32,
    },
    /// Checkpoint save/restore throughput vs raw PUT/GET of the same bytes in the same store
    Ckpt {
        /// Store location to write to (e.g. s3://bucket/bench); a scratch prefix under it is removed after
        #[arg(long)]
        store: String,
        #[arg(long, value_enum, default_value = "cellxpert")]
        preset: crate::model::Preset,
        /// Vocabulary genes (sizes the gene and position tables)
        #[arg(long, default_value_t = 4096)]
        genes: usize,
        #[arg(long, default_value_t = 50)]
        bins: usize,
        /// Rounds; each times every side once, alternating which goes first
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// zstd level of the checkpoint side
        #[arg(long, default_value_t = 1)]
        level: i32,
        /// Part size of multipart uploads (both sides), MiB
        #[arg(long, default_value_t = 16)]
        part_mib: usize,
    },
    /// What checkpointing costs a training run, against the same run without checkpoints: the blocking
    /// snapshot per save, step time while an upload runs, and --resume to the first completed step
    CkptTraining {
        /// Corpus to train on (e.g. the main job's Kang corpus)
        #[arg(long)]
        corpus: String,
        /// Checkpoint location (e.g. s3://bucket/bench); each run writes under a fresh prefix
        #[arg(long)]
        store: String,
        #[arg(long, value_enum, default_value = "small")]
        preset: crate::model::Preset,
        #[arg(long, default_value_t = 16)]
        batch_size: u32,
        #[arg(long, default_value_t = 60)]
        steps: u64,
        /// Steps between checkpoints
        #[arg(long, default_value_t = 10)]
        every: u64,
        /// libtorch threads (the upload runs beside them)
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value = "runs/bench-ckpt-training")]
        out: PathBuf,
    },
    /// In-silico knockout screen pairs/s with 1..N local workers vs a Geneformer-style eager PyTorch
    /// loop on the same weights and cells, and a genome-wide H200 extrapolation (see screenbench.rs)
    Screen {
        /// The screen specification (a knockout screen)
        #[arg(long)]
        spec: PathBuf,
        /// Cap on the screened cells (overrides the spec's cells.max_cells)
        #[arg(long)]
        cells: Option<u64>,
        /// Measure 1, 2, 4, ... up to this many worker processes
        #[arg(long, default_value_t = 2)]
        workers_max: u32,
        /// Scratch directory (spec copies, screen locations, exported weights, cell bins)
        #[arg(long, default_value = "runs/bench-screen")]
        scratch: PathBuf,
        /// Time cap of the Python baseline's screening loop
        #[arg(long, default_value_t = 60.0)]
        baseline_seconds: f64,
        /// Assumed fraction of the H200's dense BF16 peak in the genome-wide extrapolation
        #[arg(long, default_value_t = 0.35)]
        utilization: f64,
    },
    /// (internal) one rank of one side of `bench allreduce`
    #[command(hide = true)]
    AllreduceChild {
        #[arg(long, value_enum)]
        side: AllreduceSide,
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        world: usize,
        #[arg(long)]
        bytes: usize,
        /// Rendezvous directory shared by the group
        #[arg(long)]
        dir: PathBuf,
        /// Seconds of one timed repetition
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        reps: usize,
        #[arg(long)]
        max_iters: usize,
    },
}

/// What one `bench allreduce` group runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllreduceSide {
    /// `GlooCollective::all_reduce_sum`
    Cellfleet,
    /// Gloo's `AllreduceRing<float>` in the shim
    GlooRing,
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
        BenchCommand::Train {
            preset,
            genes,
            bins,
            batch_size,
            steps,
            warmup_steps,
            threads,
            no_baseline,
        } => {
            let spec = TrainBenchSpec {
                model: preset.config(genes, bins),
                batch_size,
                steps,
                warmup_steps,
                threads,
                seed: 7,
                mask_ratio: 0.15,
            };
            bench_train(&spec, !no_baseline)
        }
        BenchCommand::TrainChild { spec } => {
            let spec: TrainBenchSpec = serde_json::from_slice(
                &std::fs::read(&spec).with_context(|| format!("cannot read {}", spec.display()))?,
            )?;
            println!("{}", serde_json::to_string(&train_child(&spec)?)?);
            Ok(())
        }
        BenchCommand::Allreduce {
            sizes,
            seconds,
            rounds,
            reps,
            max_iters,
            ranks,
        } => bench_allreduce(
            &sizes,
            &AllreduceRounds {
                seconds_per_rep: seconds / (rounds.max(1) * reps.max(1)) as f64,
                rounds: rounds.max(1),
                reps: reps.max(1),
                max_iters,
                ranks,
            },
        ),
        BenchCommand::Cluster {
            corpus,
            preset,
            steps,
            batch_size,
        } => {
            let config = crate::train::TrainConfig {
                preset,
                steps,
                batch_size,
                ..crate::train::TrainConfig::default()
            };
            let dir = std::env::temp_dir()
                .join(format!("cellfleet-bench-cluster-{}", std::process::id()));
            let result = crate::cluster::bench_cluster(&corpus, &config, &dir);
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        BenchCommand::CkptTraining {
            corpus,
            store,
            preset,
            batch_size,
            steps,
            every,
            threads,
            out,
        } => {
            if every == 0 || steps < every + 2 {
                anyhow::bail!("need --every >= 1 and --steps >= --every + 2");
            }
            crate::ckptbench::bench_training_saves(&crate::ckptbench::TrainingSaveBench {
                corpus,
                store,
                s3: cellfleet_shared::store::S3Options::default(),
                preset,
                batch_size,
                steps,
                every,
                threads: threads.max(1),
                out,
            })
        }
        BenchCommand::Ckpt {
            store,
            preset,
            genes,
            bins,
            rounds,
            level,
            part_mib,
        } => bench_ckpt(
            &store,
            preset.config(genes, bins),
            rounds.max(1),
            &cellfleet_shared::checkpoint::WriteOptions {
                level,
                part_bytes: part_mib.max(1) << 20,
                max_bytes_per_sec: None,
            },
        ),
        BenchCommand::Screen {
            spec,
            cells,
            workers_max,
            scratch,
            baseline_seconds,
            utilization,
        } => crate::screenbench::bench_screen(&crate::screenbench::ScreenBench {
            spec,
            cells,
            workers_max,
            scratch,
            baseline_seconds,
            utilization,
        }),
        BenchCommand::AllreduceChild {
            side,
            rank,
            world,
            bytes,
            dir,
            seconds,
            reps,
            max_iters,
        } => {
            let result = allreduce_child(side, rank, world, bytes, dir, seconds, reps, max_iters)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
    }
}

/// What both sides of `bench train` run.
#[derive(serde::Serialize, serde::Deserialize)]
struct TrainBenchSpec {
    model: crate::model::ModelConfig,
    batch_size: usize,
    steps: usize,
    warmup_steps: usize,
    threads: usize,
    seed: u64,
    mask_ratio: f64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TrainBenchResult {
    parameters: i64,
    step_seconds: f64,
    tokens_per_s: f64,
    final_loss: f64,
}

/// The cellfleet training step on one fixed random batch (the loop of `train::pretrain` without the
/// loader, so both sides time the same work).
fn train_child(spec: &TrainBenchSpec) -> anyhow::Result<TrainBenchResult> {
    use crate::model::{CellModel, Mode, Tokens};
    use crate::optim::{AdamW, AdamWConfig};
    use tch::{Device, Kind, Tensor};
    tch::set_num_threads(spec.threads as i32);
    tch::manual_seed(spec.seed as i64);
    let c = &spec.model;
    let model = CellModel::new(c.clone(), Device::Cpu)?;
    let mut optimizer = AdamW::new(model.trainable_parameters(), AdamWConfig::default());
    let (b, l) = (spec.batch_size as i64, c.n_genes as i64 + 1);
    let genes = Tensor::arange(l, (Kind::Int64, Device::Cpu)).repeat([b, 1]);
    let bins = Tensor::randint(c.n_bins as i64, [b, l], (Kind::Int64, Device::Cpu));
    let masked = Tensor::rand([b, l], (Kind::Float, Device::Cpu)).lt(spec.mask_ratio);
    let _ = masked.select(1, 0).fill_(0);
    let inputs = bins.masked_fill(&masked, c.n_bins as i64);
    let _ = inputs.select(1, 0).fill_(c.n_bins as i64 + 1);
    let tokens = Tokens {
        gene_ids: genes,
        bins: inputs,
        valid: None,
    };
    let mut times = Vec::new();
    let mut last = 0.0;
    for step in 0..spec.warmup_steps + spec.steps {
        let t0 = Instant::now();
        let forward = model.forward(
            &tokens,
            Mode {
                train: true,
                bf16: false,
            },
        );
        let rows = forward.hidden.index(&[Some(masked.shallow_clone())]);
        let loss = model
            .bin_logits(&rows, false)
            .cross_entropy_for_logits(&bins.masked_select(&masked))
            + &forward.aux_loss * 0.01;
        optimizer.zero_grad();
        loss.backward();
        optimizer.clip_grad_norm(1.0);
        optimizer.step(1e-4);
        last = loss.double_value(&[]);
        if step >= spec.warmup_steps {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let step_seconds = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(TrainBenchResult {
        parameters: model.parameter_count(),
        step_seconds,
        tokens_per_s: (b * l) as f64 / step_seconds,
        final_loss: last,
    })
}

fn bench_train(spec: &TrainBenchSpec, baseline: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cellfleet-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(spec)?)?;
    let c = &spec.model;
    println!(
        "training-step benchmark: d_model {}, {} layers, {} heads, ffn {:?}; batch {} x {} tokens; {} threads; {} measured steps after {} warm-up",
        c.d_model, c.n_layers, c.n_heads, c.ffn, spec.batch_size, c.n_genes + 1, spec.threads, spec.steps, spec.warmup_steps
    );
    let parse = |run: &ChildRun| -> anyhow::Result<TrainBenchResult> {
        let line = run.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .with_context(|| format!("benchmark child printed {:?}", run.stdout))
    };
    let exe = std::env::current_exe()?;
    let ours_run = run_measured(
        Command::new(&exe)
            .args(["bench", "train-child"])
            .arg(&spec_path),
    )?;
    let ours = parse(&ours_run)?;
    println!(
        "{:<28} {:>12} {:>12} {:>14} {:>10}",
        "", "parameters", "step (s)", "tokens/s", "peak MiB"
    );
    let row = |name: &str, r: &TrainBenchResult, run: &ChildRun| {
        println!(
            "{:<28} {:>12} {:>12.4} {:>14.0} {:>10.0}",
            name, r.parameters, r.step_seconds, r.tokens_per_s, run.peak_mib
        )
    };
    row("cellfleet (tch/libtorch)", &ours, &ours_run);
    if baseline {
        let script = bench_dir().join("train_baseline.py");
        let base_run = run_measured(Command::new(python()).arg(&script).arg(&spec_path))?;
        let base = parse(&base_run)?;
        row("PyTorch eager (Python)", &base, &base_run);
        if base.parameters != ours.parameters {
            bail!(
                "the baseline model has {} parameters, cellfleet's {}: the architectures differ",
                base.parameters,
                ours.parameters
            );
        }
        println!(
            "ratio (cellfleet / PyTorch): throughput {:.2}x, peak memory {:.2}x",
            ours.tokens_per_s / base.tokens_per_s,
            ours_run.peak_mib / base_run.peak_mib
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
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

#[derive(serde::Serialize, serde::Deserialize)]
struct AllreduceChildResult {
    iters: usize,
    /// Seconds of each timed repetition of `iters` all-reduces.
    rep_seconds: Vec<f64>,
}

/// One rank of one side: connects through a directory rendezvous, checks one sum, warms up, agrees with
/// its peers on an iteration count that fills `seconds`, and times `reps` repetitions of that many
/// all-reduces.
#[allow(clippy::too_many_arguments)]
fn allreduce_child(
    side: AllreduceSide,
    rank: usize,
    world: usize,
    bytes: usize,
    dir: PathBuf,
    seconds: f64,
    reps: usize,
    max_iters: usize,
) -> anyhow::Result<AllreduceChildResult> {
    use crate::collective::{
        Collective, DirRendezvous, GlooCollective, GlooOptions, RendezvousStore,
    };
    use tch::{Device, Kind, Tensor};
    tch::set_num_threads(1);
    let timeout = Duration::from_secs(120);
    let store: Arc<dyn RendezvousStore> = Arc::new(DirRendezvous::new(dir));
    let options = GlooOptions {
        timeout,
        ..GlooOptions::default()
    };
    let mut gloo = GlooCollective::connect(store.clone(), "bench", rank, world, &options)?;
    let count = (bytes / 4).max(1) as i64;
    let mut tensor = Tensor::full([count], (rank + 1) as f64, (Kind::Float, Device::Cpu));
    // Seconds of `iters` all-reduces; the cellfleet side times its own loop, the baseline's loop and
    // timer are inside the shim.
    let run =
        |gloo: &mut GlooCollective, tensor: &mut Tensor, iters: usize| -> anyhow::Result<f64> {
            Ok(match side {
                AllreduceSide::Cellfleet => {
                    gloo.barrier()?;
                    let started = Instant::now();
                    for _ in 0..iters {
                        gloo.all_reduce_sum(tensor)?;
                    }
                    started.elapsed().as_secs_f64()
                }
                AllreduceSide::GlooRing => gloo.baseline_allreduce_ring(tensor, iters)?,
            })
        };
    // One checked sum, so a fast wrong answer cannot pass for bandwidth.
    run(&mut gloo, &mut tensor, 1)?;
    let expected = (world * (world + 1) / 2) as f64;
    let (lo, hi) = (
        tensor.min().double_value(&[]),
        tensor.max().double_value(&[]),
    );
    if lo != expected || hi != expected {
        bail!("{side:?} rank {rank}: all-reduce gave values in [{lo}, {hi}], expected {expected}");
    }
    let _ = tensor.zero_();
    let warm_iters = 2;
    let warm = run(&mut gloo, &mut tensor, warm_iters)?;
    let iters_key = "bench/iters";
    let iters = if rank == 0 {
        let per_iter = (warm / warm_iters as f64).max(1e-6);
        let iters = ((seconds / per_iter) as usize).clamp(2, max_iters.max(2));
        store.set(iters_key, iters.to_string().as_bytes())?;
        iters
    } else {
        String::from_utf8(store.get(iters_key, timeout)?)?.parse()?
    };
    let rep_seconds = (0..reps)
        .map(|_| run(&mut gloo, &mut tensor, iters))
        .collect::<anyhow::Result<_>>()?;
    Ok(AllreduceChildResult { iters, rep_seconds })
}

/// How `bench allreduce` measures each size.
struct AllreduceRounds {
    seconds_per_rep: f64,
    rounds: usize,
    reps: usize,
    max_iters: usize,
    ranks: usize,
}

/// Runs one group of `ranks` children on one side and size; returns the seconds per all-reduce of its
/// fastest repetition (a repetition lasts as long as its slowest rank) and the iterations per repetition.
fn allreduce_group(
    exe: &Path,
    side: AllreduceSide,
    bytes: usize,
    plan: &AllreduceRounds,
) -> anyhow::Result<(f64, usize)> {
    let dir = scratch_dir(&format!("allreduce-{side:?}-{bytes}"))?;
    let children: Vec<_> = (0..plan.ranks)
        .map(|rank| {
            let mut cmd = Command::new(exe);
            cmd.args(["bench", "allreduce-child", "--side"])
                .arg(match side {
                    AllreduceSide::Cellfleet => "cellfleet",
                    AllreduceSide::GlooRing => "gloo-ring",
                })
                .args(["--rank", &rank.to_string()])
                .args(["--world", &plan.ranks.to_string()])
                .args(["--bytes", &bytes.to_string()])
                .args(["--seconds", &plan.seconds_per_rep.to_string()])
                .args(["--reps", &plan.reps.to_string()])
                .args(["--max-iters", &plan.max_iters.to_string()])
                .arg("--dir")
                .arg(&dir);
            std::thread::spawn(move || run_measured(&mut cmd))
        })
        .collect();
    let mut rep_seconds = vec![0.0f64; plan.reps];
    let mut iters = 0;
    for child in children {
        let run = child
            .join()
            .map_err(|_| anyhow::anyhow!("benchmark child thread panicked"))??;
        let line = run.stdout.lines().last().unwrap_or_default();
        let result: AllreduceChildResult = serde_json::from_str(line)
            .with_context(|| format!("benchmark child printed {:?}", run.stdout))?;
        for (slowest, s) in rep_seconds.iter_mut().zip(&result.rep_seconds) {
            *slowest = slowest.max(*s);
        }
        iters = result.iters;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let best = rep_seconds.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((best / iters.max(1) as f64, iters))
}

fn scratch_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cellfleet-bench-{}-{name}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn bench_allreduce(sizes_mib: &[f64], plan: &AllreduceRounds) -> anyhow::Result<()> {
    if plan.ranks < 2 {
        bail!("an all-reduce benchmark needs at least 2 ranks");
    }
    let exe = std::env::current_exe()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let n = plan.ranks as f64;
    let bus_factor = 2.0 * (n - 1.0) / n;
    println!(
        "all-reduce benchmark: {} ranks (processes) over loopback TCP on {cores} cores, f32 sum; bus \
         bandwidth = bytes / time x 2(n-1)/n (GB = 1e9 bytes); best of {} rounds x {} repetitions of \
         ~{:.2} s per side and size, after a warm-up",
        plan.ranks, plan.rounds, plan.reps, plan.seconds_per_rep
    );
    println!(
        "{:>10} {:>16} {:>8} {:>16} {:>8} {:>8}",
        "size", "cellfleet GB/s", "iters", "Gloo ring GB/s", "iters", "ratio"
    );
    let mut ratios = Vec::new();
    for &mib in sizes_mib {
        let bytes = ((mib * 1048576.0) as usize / 4).max(1) * 4;
        let busbw = |per_iter: f64| bytes as f64 / per_iter * bus_factor / 1e9;
        let (mut ours, mut ring) = ((f64::INFINITY, 0), (f64::INFINITY, 0));
        for round in 0..plan.rounds {
            // Alternate which side goes first, so neither always runs on a warmer (or busier) machine.
            let sides = if round % 2 == 0 {
                [AllreduceSide::Cellfleet, AllreduceSide::GlooRing]
            } else {
                [AllreduceSide::GlooRing, AllreduceSide::Cellfleet]
            };
            for side in sides {
                let measured = allreduce_group(&exe, side, bytes, plan)?;
                let best = if side == AllreduceSide::Cellfleet {
                    &mut ours
                } else {
                    &mut ring
                };
                if measured.0 < best.0 {
                    *best = measured;
                }
            }
        }
        let ratio = busbw(ours.0) / busbw(ring.0);
        ratios.push(ratio);
        println!(
            "{:>6} MiB {:>16.3} {:>8} {:>16.3} {:>8} {:>7.2}x",
            mib,
            busbw(ours.0),
            ours.1,
            busbw(ring.0),
            ring.1,
            ratio
        );
    }
    if !ratios.is_empty() {
        let geomean = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "ratio (cellfleet / Gloo AllreduceRing<float>) bus bandwidth: geometric mean {geomean:.2}x \
             (min {min:.2}x, max {max:.2}x over {} sizes)",
            ratios.len()
        );
    }
    Ok(())
}

/// A checkpoint's file images as training writes them: the model's parameters, and AdamW moments of the
/// same shapes (`exp_avg` small and random like a gradient average, `exp_avg_sq` its square).
fn checkpoint_images(config: crate::model::ModelConfig) -> anyhow::Result<(i64, Vec<u8>, Vec<u8>)> {
    use crate::checkpointing::safetensors_image;
    use tch::{Device, Tensor};
    tch::manual_seed(7);
    let model = crate::model::CellModel::new(config, Device::Cpu)?;
    let params = model.named_parameters();
    let mut moments = Vec::with_capacity(2 * params.len());
    for (name, param) in &params {
        let exp_avg = param.randn_like() * 1e-3;
        let exp_avg_sq = exp_avg.square();
        moments.push((format!("exp_avg.{name}"), exp_avg));
        moments.push((format!("exp_avg_sq.{name}"), exp_avg_sq));
    }
    fn refs(named: &[(String, Tensor)]) -> Vec<(String, &Tensor)> {
        named.iter().map(|(n, t)| (n.clone(), t)).collect()
    }
    Ok((
        model.parameter_count(),
        safetensors_image(&refs(&params))?,
        safetensors_image(&refs(&moments))?,
    ))
}

/// The four sides of `bench ckpt`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CkptSide {
    RawPut,
    Save,
    RawGet,
    Restore,
}

fn bench_ckpt(
    url: &str,
    config: crate::model::ModelConfig,
    rounds: usize,
    options: &cellfleet_shared::checkpoint::WriteOptions,
) -> anyhow::Result<()> {
    use bytes::Bytes;
    use cellfleet_shared::checkpoint::{
        Checkpoints, PARTS_IN_FLIGHT, RANGES_IN_FLIGHT, READ_RANGE_BYTES,
    };
    use cellfleet_shared::store::{RangedRead, Store};
    let (parameters, model, optimizer) = checkpoint_images(config)?;
    let objects: [(&str, &[u8]); 2] = [
        ("model.safetensors", &model),
        ("optimizer.safetensors", &optimizer),
    ];
    // The raw side sends the same bytes without copies: parts are slices of one buffer.
    let raw_objects: Vec<(&str, Bytes)> = objects
        .iter()
        .map(|(name, bytes)| (*name, Bytes::copy_from_slice(bytes)))
        .collect();
    let raw_bytes: usize = objects.iter().map(|(_, b)| b.len()).sum();
    let scratch = format!(
        "{}/cellfleet-bench-ckpt-{}",
        url.trim_end_matches('/'),
        std::process::id()
    );
    let s3 = S3Options::default();
    let raw_store = Store::open(&format!("{scratch}/raw"), &s3)?;
    let checkpoints = Checkpoints::new(Store::open(&format!("{scratch}/ckpt"), &s3)?);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "checkpoint benchmark: {parameters} parameters; model {:.1} MB + optimizer {:.1} MB raw; store {url}; \
         {cores} cores; zstd level {}; both sides upload in parts of up to {} MiB ({PARTS_IN_FLIGHT} in flight) \
         and read in ranges of {} MiB ({RANGES_IN_FLIGHT} in flight), parts sized per object alike; {rounds} \
         rounds alternating order; MB = 1e6 bytes of raw data",
        model.len() as f64 / 1e6,
        optimizer.len() as f64 / 1e6,
        options.level,
        options.part_bytes >> 20,
        READ_RANGE_BYTES >> 20,
    );

    let raw_put = |round: usize| -> anyhow::Result<()> {
        for (name, bytes) in &raw_objects {
            let name = format!("round-{round}/{name}");
            // The part size the checkpoint side would use for these bytes.
            let part_bytes = checkpoints.part_bytes(options, bytes.len());
            if bytes.len() <= part_bytes {
                raw_store.put(&name, bytes.clone())?;
                continue;
            }
            let mut upload = raw_store.upload_parts(&name, PARTS_IN_FLIGHT)?;
            for start in (0..bytes.len()).step_by(part_bytes) {
                upload.put_part(bytes.slice(start..(start + part_bytes).min(bytes.len())))?;
            }
            upload.finish()?;
        }
        Ok(())
    };
    let raw_get = |round: usize| -> anyhow::Result<()> {
        for (name, bytes) in &raw_objects {
            let name = format!("round-{round}/{name}");
            let mut read = Vec::with_capacity(bytes.len());
            let outcome = raw_store.get_ranges_in_order(
                &name,
                bytes.len() as u64,
                READ_RANGE_BYTES,
                RANGES_IN_FLIGHT,
                |range| read.extend_from_slice(range),
            )?;
            anyhow::ensure!(
                outcome == RangedRead::Complete && read.len() == bytes.len(),
                "raw {name}: {outcome:?} after {} bytes",
                read.len()
            );
        }
        Ok(())
    };
    let mut stored_bytes = 0;
    let mut restored: Vec<Vec<u8>> = Vec::new();
    let mut seconds: std::collections::HashMap<(usize, u8), f64> = Default::default();
    let sides = [
        CkptSide::RawPut,
        CkptSide::Save,
        CkptSide::RawGet,
        CkptSide::Restore,
    ];
    for round in 0..rounds {
        let step = round as u64 + 1;
        // Each write precedes its read; which of the pair goes first alternates by round.
        let order = if round % 2 == 0 {
            sides
        } else {
            [
                CkptSide::Save,
                CkptSide::RawPut,
                CkptSide::Restore,
                CkptSide::RawGet,
            ]
        };
        for side in order {
            let started = Instant::now();
            match side {
                CkptSide::RawPut => raw_put(round)?,
                CkptSide::Save => {
                    let manifest =
                        checkpoints.commit(step, &objects, serde_json::json!({}), options)?;
                    stored_bytes = manifest.stored_bytes();
                }
                CkptSide::RawGet => raw_get(round)?,
                CkptSide::Restore => {
                    let manifest = checkpoints
                        .manifest(step)?
                        .map_err(|p| anyhow::anyhow!("{p}"))?;
                    restored.clear();
                    for (name, _) in &objects {
                        restored.push(
                            checkpoints
                                .read(&manifest, name)?
                                .map_err(|p| anyhow::anyhow!("{p}"))?,
                        );
                    }
                }
            }
            seconds.insert((round, side as u8), started.elapsed().as_secs_f64());
        }
        for ((name, bytes), read) in objects.iter().zip(&restored) {
            anyhow::ensure!(read == bytes, "checkpoint {name} reads back different");
        }
        // Keep the store from filling up over the rounds.
        for (name, _) in &objects {
            raw_store.delete(&format!("round-{round}/{name}"))?;
        }
        checkpoints.retain(1, 0)?;
    }
    // The last checkpoint is what retention keeps; delete it by hand.
    let ckpt_store = Store::open(&format!("{scratch}/ckpt"), &s3)?;
    let folder = cellfleet_shared::checkpoint::step_folder(rounds as u64);
    for (name, _) in &objects {
        ckpt_store.delete(&format!("{folder}/{name}.zst"))?;
    }
    ckpt_store.delete(&format!(
        "{folder}/{}",
        cellfleet_shared::checkpoint::MANIFEST_FILE
    ))?;
    ckpt_store.delete(cellfleet_shared::checkpoint::LATEST_FILE)?;
    println!(
        "stored {:.1} MB of {:.1} MB ({:.3} of raw)",
        stored_bytes as f64 / 1e6,
        raw_bytes as f64 / 1e6,
        stored_bytes as f64 / raw_bytes as f64
    );

    let rate =
        |round: usize, side: CkptSide| raw_bytes as f64 / 1e6 / seconds[&(round, side as u8)];
    let best = |side: CkptSide| (0..rounds).map(|r| rate(r, side)).fold(0.0, f64::max);
    let median = |side: CkptSide| {
        let mut rates: Vec<f64> = (0..rounds).map(|r| rate(r, side)).collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    print!("{:<32}", "MB/s of raw bytes");
    for round in 0..rounds {
        print!(" {:>9}", format!("round {}", round + 1));
    }
    println!(" {:>9} {:>9}", "median", "best");
    let names = [
        (CkptSide::RawPut, "raw PUT (multipart)"),
        (CkptSide::Save, "checkpoint save (commit)"),
        (CkptSide::RawGet, "raw GET (ranged)"),
        (CkptSide::Restore, "checkpoint restore (read all)"),
    ];
    for (side, name) in names {
        print!("{name:<32}");
        for round in 0..rounds {
            print!(" {:>9.1}", rate(round, side));
        }
        println!(" {:>9.1} {:>9.1}", median(side), best(side));
    }
    for (what, ours, raw) in [
        ("save / raw PUT", CkptSide::Save, CkptSide::RawPut),
        ("restore / raw GET", CkptSide::Restore, CkptSide::RawGet),
    ] {
        println!(
            "ratio {what}: median {:.2}x, best {:.2}x (target >= 0.8x)",
            median(ours) / median(raw),
            best(ours) / best(raw)
        );
    }
    Ok(())
}
