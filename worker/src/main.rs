//! `cellfleet`: the command-line tool of the cellfleet system.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::store::S3Options;
use cellfleet_shared::stream::OrderConfig;
use cellfleet_worker::ingest::{ingest, IngestOptions, LayerChoice};
use cellfleet_worker::{bench, inspect, modelcli, synth};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cellfleet",
    version,
    about = "Pretrain single-cell foundation models on a cluster and run in-silico perturbation screens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct S3Args {
    /// S3 endpoint URL for s3:// locations (default: AWS_ENDPOINT_URL / AWS_ENDPOINT)
    #[arg(long, global = true)]
    s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)
    #[arg(long, global = true)]
    s3_region: Option<String>,
    /// S3 access key id (default: AWS_ACCESS_KEY_ID); needs --s3-secret-access-key
    #[arg(long, global = true, requires = "s3_secret_access_key")]
    s3_access_key_id: Option<String>,
    /// S3 secret access key (default: AWS_SECRET_ACCESS_KEY; the variable keeps it out of `ps`)
    #[arg(long, global = true, requires = "s3_access_key_id")]
    s3_secret_access_key: Option<String>,
}

impl S3Args {
    fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            credentials: self
                .s3_access_key_id
                .clone()
                .zip(self.s3_secret_access_key.clone()),
            ..S3Options::default()
        }
    }
}

/// How a corpus is laid out; shared by `ingest` and `synth`.
#[derive(Args, Clone, Debug)]
struct LayoutArgs {
    /// Number of highly variable genes in the vocabulary
    #[arg(long, default_value_t = 4096)]
    hvg: usize,
    /// Expression bins per cell, including bin 0 for zero
    #[arg(long, default_value_t = 50)]
    bins: u16,
    /// obs columns to keep as labels (repeatable)
    #[arg(long = "label-col")]
    label_cols: Vec<String>,
    /// Cells per shard
    #[arg(long, default_value_t = 8192)]
    shard_cells: usize,
    /// Cells per compressed block inside a shard (the unit of random access)
    #[arg(long, default_value_t = 64)]
    block_cells: usize,
    /// Binning/compression threads (default: all cores)
    #[arg(long)]
    threads: Option<usize>,
}

impl LayoutArgs {
    fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize AnnData .h5ad files into a sharded, compressed corpus
    Ingest {
        /// Input .h5ad files
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output location: a directory, file://PATH or s3://BUCKET/PREFIX
        #[arg(long)]
        out: String,
        /// Matrix to read: auto, X, raw, or a layer name
        #[arg(long, default_value = "auto")]
        layer: LayerChoice,
        /// Fixed vocabulary instead of HVG selection: one gene per line, or a corpus manifest.json
        #[arg(long)]
        genes: Option<PathBuf>,
        #[command(flatten)]
        layout: LayoutArgs,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Inspect or verify a corpus
    Corpus {
        #[command(subcommand)]
        action: CorpusAction,
    },
    /// Build a SYNTHETIC corpus (or h5ad) of any size by resampling real cells; for scale tests only
    Synth {
        /// Number of synthetic cells
        #[arg(long)]
        cells: u64,
        /// Real .h5ad files whose cells are resampled
        #[arg(long = "from", required = true)]
        from: Vec<PathBuf>,
        /// Output: a corpus location, or a path ending in .h5ad to write an AnnData file instead
        #[arg(long)]
        out: String,
        /// Seed of the resampling
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        layout: LayoutArgs,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Pretrain the masked-bin model on a corpus (in this process, on local workers, or on a cluster)
    Train {
        /// Corpus location (directory, file://PATH or s3://BUCKET/PREFIX)
        #[arg(long)]
        corpus: String,
        /// Train on this machine: in this process, or with --workers N through an embedded coordinator
        #[arg(long, conflicts_with = "coordinator")]
        local: bool,
        #[command(flatten)]
        cluster: modelcli::ClusterFlags,
        #[command(flatten)]
        checkpoint: modelcli::CheckpointFlags,
        /// Output directory for model.safetensors, model.json and the step log
        #[arg(long, default_value = "runs/model")]
        out: PathBuf,
        /// Also write the step records and the held-out report as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        flags: modelcli::TrainFlags,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Fine-tune a pretrained model's [CLS] classifier on a label column and report held-out metrics
    Finetune {
        #[arg(long)]
        corpus: String,
        /// Pretrained model: its directory or its model.safetensors
        #[arg(long)]
        weights: PathBuf,
        /// Label column to classify (e.g. cell_type)
        #[arg(long = "label-col")]
        label_col: String,
        /// Train LoRA adapters of this rank with the base frozen (default: train everything)
        #[arg(long)]
        lora: Option<usize>,
        #[arg(long, default_value = "runs/finetune")]
        out: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        flags: modelcli::TrainFlags,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Evaluate a model on the held-out split of a corpus (masked bins; classes if fine-tuned)
    Eval {
        #[arg(long)]
        corpus: String,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long, default_value_t = 64)]
        batch_size: u32,
        /// Fraction of gene tokens masked for the masked-bin report
        #[arg(long, default_value_t = 0.15)]
        mask_ratio: f32,
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        runtime: modelcli::RuntimeFlags,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Run the control plane: membership, jobs and rendezvous over gRPC (also `cellfleet-coordinator`)
    Coordinator {
        #[command(flatten)]
        args: cellfleet_coordinator::CoordinatorArgs,
    },
    /// Look at and steer jobs on a coordinator
    Job {
        /// Coordinator address
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        coordinator: String,
        #[command(subcommand)]
        action: cellfleet_worker::cluster::JobAction,
    },
    /// Serve a coordinator as a training worker until killed
    Worker {
        #[command(flatten)]
        args: cellfleet_worker::cluster::WorkerArgs,
    },
    /// List, inspect, verify and export checkpoints
    Ckpt {
        #[command(subcommand)]
        action: cellfleet_worker::ckptcli::CkptAction,
        #[command(flatten)]
        s3: S3Args,
    },
    /// In-silico perturbation screens: plan, run on a fleet, follow, merge into Parquet
    Screen {
        #[command(subcommand)]
        action: cellfleet_worker::screencli::ScreenAction,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Benchmarks that print a table with their baseline measured in the same run
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum CorpusAction {
    /// Print a summary of a corpus
    Inspect {
        url: String,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Re-hash every shard against the manifest
    Verify {
        url: String,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Print the augmented, masked batches one rank would read (with a digest of their tokens)
    Stream {
        url: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        epoch: u32,
        /// Clones per cell (bootstrapped permutation); 1 turns augmentation off
        #[arg(long, default_value_t = 4)]
        augmentation: u32,
        /// (block, clone) units per shuffle window
        #[arg(long, default_value_t = 16)]
        window_units: u32,
        #[arg(long, default_value_t = 0.15)]
        mask_ratio: f32,
        #[arg(long, default_value_t = 1)]
        world: u32,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Per-rank batch size
        #[arg(long, default_value_t = 32)]
        batch_size: u32,
        #[arg(long, default_value_t = 4)]
        batches: usize,
        /// Global cursor (samples of the epoch already consumed)
        #[arg(long, default_value_t = 0)]
        cursor: u64,
        #[command(flatten)]
        s3: S3Args,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ingest {
            inputs,
            out,
            layer,
            genes,
            layout,
            s3,
        } => {
            let opts = IngestOptions {
                inputs,
                out,
                s3: s3.options(),
                hvg: layout.hvg,
                bins: layout.bins,
                layer,
                genes_file: genes,
                threads: layout.threads(),
                label_cols: layout.label_cols,
                shard_cells: layout.shard_cells,
                block_cells: layout.block_cells,
            };
            let started = std::time::Instant::now();
            let report = ingest(&opts)?;
            for note in &report.notes {
                eprintln!("note: {note}");
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "ingested {} cells x {} genes into {} shards at {} in {secs:.1}s ({:.0} cells/s)",
                report.manifest.total_cells,
                report.manifest.genes.len(),
                report.manifest.shards.len(),
                opts.out,
                report.manifest.total_cells as f64 / secs
            );
        }
        Command::Corpus {
            action: CorpusAction::Inspect { url, s3 },
        } => {
            let corpus = Corpus::open(&url, &s3.options())?;
            println!("{}", inspect::summary(&corpus));
        }
        Command::Corpus {
            action: CorpusAction::Verify { url, s3 },
        } => {
            let corpus = Corpus::open(&url, &s3.options())?;
            let bad = inspect::verify(&corpus);
            if !bad.is_empty() {
                for (name, why) in &bad {
                    eprintln!("BAD {name}: {why}");
                }
                anyhow::bail!(
                    "{} of {} shards failed verification",
                    bad.len(),
                    corpus.manifest.shards.len()
                );
            }
            println!(
                "ok: {} shards, {} cells verified",
                corpus.manifest.shards.len(),
                corpus.total_cells()
            );
        }
        Command::Corpus {
            action:
                CorpusAction::Stream {
                    url,
                    seed,
                    epoch,
                    augmentation,
                    window_units,
                    mask_ratio,
                    world,
                    rank,
                    batch_size,
                    batches,
                    cursor,
                    s3,
                },
        } => {
            if world == 0 || rank >= world {
                anyhow::bail!("--rank {rank} must be below --world {world}");
            }
            let corpus = Corpus::open(&url, &s3.options())?;
            let preview = inspect::StreamPreview {
                order: OrderConfig {
                    seed,
                    augmentation,
                    window_units,
                },
                epoch,
                mask_ratio,
                world,
                rank,
                batch_size,
                batches,
                cursor,
            };
            for line in inspect::stream_lines(corpus, &preview)? {
                println!("{line}");
            }
        }
        Command::Synth {
            cells,
            from,
            out,
            seed,
            layout,
            s3,
        } => {
            let opts = synth::SynthOptions {
                cells,
                sources: from,
                out,
                s3: s3.options(),
                hvg: layout.hvg,
                bins: layout.bins,
                seed,
                threads: layout.threads(),
                label_cols: layout.label_cols,
                shard_cells: layout.shard_cells,
                block_cells: layout.block_cells,
            };
            synth::run(&opts).context("synth failed")?;
        }
        Command::Train {
            corpus,
            local,
            cluster,
            checkpoint,
            out,
            json,
            flags,
            s3,
        } => modelcli::train_command(
            &corpus,
            local,
            &cluster,
            &checkpoint,
            out,
            &flags,
            json.as_deref(),
            &s3.options(),
        )?,
        Command::Coordinator { args } => {
            tokio::runtime::Runtime::new()?.block_on(cellfleet_coordinator::run(args))?
        }
        Command::Job {
            coordinator,
            action,
        } => cellfleet_worker::cluster::job_command(&coordinator, action)?,
        Command::Worker { args } => cellfleet_worker::cluster::run_worker(args)?,
        Command::Finetune {
            corpus,
            weights,
            label_col,
            lora,
            out,
            json,
            flags,
            s3,
        } => modelcli::finetune_command(
            &corpus,
            &weights,
            &label_col,
            lora,
            out,
            &flags,
            json.as_deref(),
            &s3.options(),
        )?,
        Command::Eval {
            corpus,
            weights,
            batch_size,
            mask_ratio,
            json,
            runtime,
            s3,
        } => modelcli::eval_command(
            &corpus,
            &weights,
            batch_size,
            mask_ratio,
            &runtime,
            json.as_deref(),
            &s3.options(),
        )?,
        Command::Ckpt { action, s3 } => {
            cellfleet_worker::ckptcli::ckpt_command(action, &s3.options())?
        }
        Command::Screen { action, s3 } => {
            cellfleet_worker::screencli::screen_command(action, &s3.options())?
        }
        Command::Bench { which } => bench::run(which)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELLFLEET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
