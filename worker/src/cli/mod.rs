//! The `cellfleet` command line: the argument tree and one dispatch to the module of each command family
//! (`corpus` for ingest/synth/corpus, `model` for train/finetune/eval, `ckpt`, `job`, `screen`; benchmarks
//! in `crate::bench`). Nothing below this module imports it.

pub mod ckpt;
pub mod corpus;
pub mod job;
pub mod model;
pub mod screen;

use std::path::PathBuf;

use cellfleet_shared::storage::S3Options;
use clap::{Args, Parser, Subcommand};

use crate::bench;
use crate::corpus::ingest::LayerChoice;

#[derive(Parser)]
#[command(
    name = "cellfleet",
    version,
    about = "Pretrain single-cell foundation models on a cluster and run in-silico perturbation screens"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connect: crate::link::ConnectArgs,
}

#[derive(Args, Clone, Default)]
pub struct S3Args {
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
    pub fn options(&self) -> S3Options {
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
pub struct LayoutArgs {
    /// Number of highly variable genes in the vocabulary
    #[arg(long, default_value_t = 4096)]
    pub hvg: usize,
    /// Expression bins per cell, including bin 0 for zero
    #[arg(long, default_value_t = 50)]
    pub bins: u16,
    /// obs columns to keep as labels (repeatable)
    #[arg(long = "label-col")]
    pub label_cols: Vec<String>,
    /// Cells per shard
    #[arg(long, default_value_t = 8192)]
    pub shard_cells: usize,
    /// Cells per compressed block inside a shard (the unit of random access)
    #[arg(long, default_value_t = 64)]
    pub block_cells: usize,
    /// Binning/compression threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
}

impl LayoutArgs {
    pub fn threads(&self) -> usize {
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
    /// Internal: the child process that reads one .h5ad file for `ingest` and `synth`, so that HDF5
    /// failing on a damaged file ends only this process
    #[command(hide = true)]
    H5adReader { file: PathBuf },
    /// Inspect or verify a corpus
    Corpus {
        #[command(subcommand)]
        action: corpus::CorpusAction,
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
        cluster: model::ClusterFlags,
        #[command(flatten)]
        checkpoint: model::CheckpointFlags,
        /// Where model.safetensors, model.json, the step log and the sample logs go: a directory, or
        /// s3://BUCKET/PREFIX (file://PATH) when the workers share no disk
        #[arg(long, default_value = "runs/model")]
        out: String,
        /// Also write the step records and the held-out report as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        flags: model::TrainFlags,
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
        /// Weigh each class's cross-entropy: `none`, or `inverse-frequency` (1/n_k, for imbalanced labels)
        #[arg(long, value_enum, default_value = "none")]
        class_weights: crate::train::finetune::ClassWeighting,
        /// Where the fine-tuned model and its step log go: a directory or s3://BUCKET/PREFIX
        #[arg(long, default_value = "runs/finetune")]
        out: String,
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        flags: model::TrainFlags,
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
        /// Score only the first N held-out cells of the split's order (the same cells for every
        /// model of a run's seed); the marginal baseline still counts every training cell
        #[arg(long, value_name = "N")]
        max_cells: Option<u64>,
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        runtime: model::RuntimeFlags,
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
        action: job::JobAction,
    },
    /// Serve a coordinator as a training worker until killed
    Worker {
        #[command(flatten)]
        args: crate::cluster::daemon::WorkerArgs,
    },
    /// List, inspect, verify and export checkpoints
    Ckpt {
        #[command(subcommand)]
        action: ckpt::CkptAction,
        #[command(flatten)]
        s3: S3Args,
    },
    /// In-silico perturbation screens: plan, run on a fleet, follow, merge into Parquet
    Screen {
        #[command(subcommand)]
        action: screen::ScreenAction,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Benchmarks that print a table with their baseline measured in the same run
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::link::configure(&cli.connect);
    match cli.command {
        Command::Ingest {
            inputs,
            out,
            layer,
            genes,
            layout,
            s3,
        } => corpus::ingest_command(inputs, out, layer, genes, layout, &s3)?,
        Command::H5adReader { file } => crate::corpus::h5ad::serve(&file)?,
        Command::Corpus { action } => corpus::corpus_command(action)?,
        Command::Synth {
            cells,
            from,
            out,
            seed,
            layout,
            s3,
        } => corpus::synth_command(cells, from, out, seed, layout, &s3)?,
        Command::Train {
            corpus,
            local,
            cluster,
            checkpoint,
            out,
            json,
            flags,
            s3,
        } => model::train_command(
            &corpus,
            local,
            &cluster,
            &checkpoint,
            &out,
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
        } => job::job_command(&coordinator, action)?,
        Command::Worker { args } => crate::cluster::daemon::run_worker(args)?,
        Command::Finetune {
            corpus,
            weights,
            label_col,
            lora,
            class_weights,
            out,
            json,
            flags,
            s3,
        } => model::finetune_command(
            &corpus,
            &weights,
            &label_col,
            lora,
            class_weights,
            &out,
            &flags,
            json.as_deref(),
            &s3.options(),
        )?,
        Command::Eval {
            corpus,
            weights,
            batch_size,
            mask_ratio,
            max_cells,
            json,
            runtime,
            s3,
        } => model::eval_command(
            &corpus,
            &weights,
            batch_size,
            mask_ratio,
            max_cells,
            &runtime,
            json.as_deref(),
            &s3.options(),
        )?,
        Command::Ckpt { action, s3 } => ckpt::ckpt_command(action, &s3.options())?,
        Command::Screen { action, s3 } => screen::screen_command(action, &s3.options())?,
        Command::Bench { which } => bench::run(which)?,
    }
    Ok(())
}
