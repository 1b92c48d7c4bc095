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
//!   current `gloo::allreduce` (ring algorithm) looping inside the C++ shim (no cellfleet code in its timed loop), each
//!   as `--ranks` child processes over loopback TCP, at every size, in the same run.
//! * `ckpt`: checkpoint save and restore of a model's weights and AdamW moments (zstd, blake3, manifest,
//!   multipart uploads and ranged reads) against raw PUTs and GETs of the same bytes in the same store,
//!   alternating which side goes first.

pub mod allreduce;
pub mod attribution;
pub mod child;
pub mod ckpt;
pub mod ckpt_training;
pub mod cluster;
pub mod ingest;
pub mod loaders;
pub mod nccl_check;
pub mod screen;
pub mod steer;
pub mod stream;
pub mod train;
use std::path::PathBuf;

use crate::bench::allreduce::allreduce_child;
use crate::bench::allreduce::{AllreduceRounds, AllreduceSide};
use crate::bench::train::train_child;
use crate::bench::train::TrainBenchSpec;
use anyhow::Context;

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
        /// Token layout of the batches: every vocabulary gene, or expressed genes plus
        /// --unexpressed of the unexpressed ones
        #[arg(long, value_enum, default_value = "full")]
        layout: crate::cli::model::LayoutChoice,
        #[arg(long, default_value_t = cellfleet_shared::stream::batch::DEFAULT_UNEXPRESSED)]
        unexpressed: u32,
    },
    /// Conversion and shuffled streaming vs bionemo-scdl and annbatch on the same .h5ad (install them
    /// with `bash scripts/setup.sh --loaders`)
    Loaders {
        /// The .h5ad file every side converts and streams (e.g. `cellfleet synth --h5ad` output)
        #[arg(long)]
        h5ad: PathBuf,
        /// cellfleet's vocabulary: this many highly variable genes of the file
        #[arg(long, default_value_t = 4096)]
        hvg: usize,
        #[arg(long, default_value_t = 50)]
        bins: u16,
        /// Seconds each stream side runs per round
        #[arg(long, default_value_t = 8.0)]
        seconds: f64,
        /// Alternating rounds (medians and ranges are reported)
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Rows per batch on every side
        #[arg(long, default_value_t = 256)]
        batch: u32,
        /// Unexpressed genes per cellfleet sample (expressed layout)
        #[arg(long, default_value_t = cellfleet_shared::stream::batch::DEFAULT_UNEXPRESSED)]
        unexpressed: u32,
        /// Where the converted outputs go
        #[arg(long, default_value = "runs/bench-loaders")]
        scratch: PathBuf,
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
        /// Train on batches of this corpus (its genes and bins) and compare the expressed token
        /// layout with the full one; without it, one random full-layout batch
        #[arg(long)]
        corpus: Option<String>,
        /// Unexpressed genes per expressed-layout sequence
        #[arg(long, default_value_t = cellfleet_shared::stream::batch::DEFAULT_UNEXPRESSED)]
        unexpressed: u32,
        /// Alternating rounds (a fresh child process per side per round); the median is reported
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// With --corpus: skip the full layout
        #[arg(long)]
        no_full: bool,
        /// Device of both sides: cpu, cuda or cuda:N (bf16 matrix products on CUDA)
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The NCCL path on one GPU: a 1-rank all-reduce (values checked, timed) and a 2-rank init whose
    /// peer never comes, which must abort within the timeout (needs the `cuda` feature)
    NcclCheck {
        /// CUDA device index
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// All-reduce size in MiB
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Seconds a communicator waits for its peers
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// (internal) the cellfleet side of `bench train`, given its spec file
    #[command(hide = true)]
    TrainChild { spec: PathBuf },
    /// Gloo all-reduce bus bandwidth: cellfleet's collective vs Gloo's own gloo::allreduce (ring)
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
        /// A checkpoint of the other token layout (same corpus): also compare the two layouts'
        /// pairs/s on the same cell and genes
        #[arg(long, value_name = "CKPT")]
        versus_checkpoint: Option<String>,
        /// Rounds of the per-core headline (1 worker vs 1 Python process), alternating which goes
        /// first; the median and range are reported
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// MCMC steering per core against the same sampler in plain PyTorch, then whole steered screens
    /// with 1 and 2 workers
    Steer {
        /// A screen specification with a [steer] section (method "mcmc")
        #[arg(long)]
        spec: PathBuf,
        /// Cap on the screened cells (overrides the spec's cells.max_cells)
        #[arg(long)]
        cells: Option<u64>,
        #[arg(long, default_value = "runs/bench-steer")]
        scratch: PathBuf,
        /// Alternating rounds of the per-core comparison (median and range reported)
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Worker processes of the second whole-screen run
        #[arg(long, default_value_t = 2)]
        workers_max: u32,
    },
    /// Gradient attribution per core against the same computation in plain PyTorch, same weights
    Attribution {
        /// A screen specification with an [attribution] section (contrast reference)
        #[arg(long)]
        spec: PathBuf,
        /// Cap on the attributed cells (overrides the spec's cells.max_cells)
        #[arg(long)]
        cells: Option<u64>,
        #[arg(long, default_value = "runs/bench-attribution")]
        scratch: PathBuf,
        /// Alternating rounds (median and range reported)
        #[arg(long, default_value_t = 3)]
        rounds: usize,
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

pub fn run(which: BenchCommand) -> anyhow::Result<()> {
    match which {
        BenchCommand::Ingest {
            inputs,
            hvg,
            bins,
            baseline_cells,
            scratch,
        } => ingest::bench_ingest(&inputs, hvg, bins, baseline_cells, &scratch),
        BenchCommand::Loaders {
            h5ad,
            hvg,
            bins,
            seconds,
            rounds,
            batch,
            unexpressed,
            scratch,
        } => loaders::bench_loaders(&loaders::LoadersBench {
            h5ad,
            hvg,
            bins,
            seconds,
            rounds,
            batch,
            unexpressed,
            scratch,
        }),
        BenchCommand::Stream {
            url,
            batch_size,
            seconds,
            augmentation,
            layout,
            unexpressed,
        } => {
            let sequence = match layout {
                crate::cli::model::LayoutChoice::Full => {
                    cellfleet_shared::stream::batch::SequenceLayout::Full
                }
                crate::cli::model::LayoutChoice::Expressed => {
                    cellfleet_shared::stream::batch::SequenceLayout::Expressed { unexpressed }
                }
            };
            stream::bench_stream(&url, batch_size, seconds, augmentation, sequence)
        }
        BenchCommand::Train {
            preset,
            genes,
            bins,
            batch_size,
            steps,
            warmup_steps,
            threads,
            no_baseline,
            corpus,
            unexpressed,
            rounds,
            no_full,
            device,
        } => train::bench_train(train::TrainBench {
            spec: TrainBenchSpec {
                model: preset.config(genes, bins),
                batch_size,
                steps,
                warmup_steps,
                threads,
                seed: 7,
                mask_ratio: 0.15,
                device,
                batches: None,
            },
            baseline: !no_baseline,
            corpus,
            unexpressed,
            rounds: rounds.max(1),
            no_full,
        }),
        BenchCommand::NcclCheck {
            device,
            mib,
            timeout,
        } => nccl_check::nccl_check(device, mib, timeout),
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
        } => allreduce::bench_allreduce(
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
            let config = crate::train::config::TrainConfig {
                preset,
                steps,
                batch_size,
                ..crate::train::config::TrainConfig::default()
            };
            let dir = std::env::temp_dir()
                .join(format!("cellfleet-bench-cluster-{}", std::process::id()));
            let result = cluster::bench_cluster(&corpus, &config, &dir);
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
            ckpt_training::bench_training_saves(&ckpt_training::TrainingSaveBench {
                corpus,
                store,
                s3: cellfleet_shared::storage::S3Options::default(),
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
        } => ckpt::bench_ckpt(
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
            versus_checkpoint,
            rounds,
        } => screen::bench_screen(&screen::ScreenBench {
            spec,
            cells,
            workers_max,
            scratch,
            baseline_seconds,
            utilization,
            versus_checkpoint,
            rounds: rounds.max(1),
        }),
        BenchCommand::Steer {
            spec,
            cells,
            scratch,
            rounds,
            workers_max,
        } => steer::bench_steer(&steer::SteerBench {
            spec,
            cells,
            scratch,
            rounds: rounds.max(1),
            workers_max,
        }),
        BenchCommand::Attribution {
            spec,
            cells,
            scratch,
            rounds,
        } => attribution::bench_attribution(&attribution::AttributionBench {
            spec,
            cells,
            scratch,
            rounds: rounds.max(1),
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
