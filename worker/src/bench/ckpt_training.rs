//! `cellfleet bench ckpt-training`: what checkpointing costs a training run, measured against the same
//! run without checkpoints in the same process: the blocking snapshot per save (as a share of a step),
//! step time while an upload runs in the background, and the time from `--resume` to the first completed
//! step next to a fresh start's time to its first step.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::storage::S3Options;
use tch::Device;

use crate::collective::Solo;
use crate::model::Preset;
use crate::train::checkpoint_state::{
    open_run, restore, CheckpointPolicy, CheckpointWriter, ResumeTarget,
};

use crate::train::config::RunOptions;
use crate::train::config::TrainConfig;
use crate::train::training_loop::pretrain_with;
use crate::train::training_loop::Checkpointing;
use crate::train::training_loop::Participation;
use crate::train::training_loop::StepRecord;

/// What to run.
pub struct TrainingSaveBench {
    pub corpus: String,
    pub store: String,
    pub s3: S3Options,
    pub preset: Preset,
    pub batch_size: u32,
    pub steps: u64,
    pub every: u64,
    pub threads: usize,
    /// Where the runs write their models and step logs.
    pub out: std::path::PathBuf,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One run: its step records and, with checkpointing, the writer's counters; plus the seconds from the
/// call to the first completed step.
fn run(
    bench: &TrainingSaveBench,
    corpus: &Arc<Corpus>,
    config: &TrainConfig,
    out: &std::path::Path,
    checkpointing: Checkpointing,
) -> anyhow::Result<(
    Vec<StepRecord>,
    Option<crate::train::checkpoint_state::SaveStats>,
    f64,
)> {
    let options = RunOptions {
        device: Device::Cpu,
        threads: bench.threads,
        out: crate::train::outputs::OutputDir::local(out)?,
        progress: false,
        log_every: u64::MAX,
    };
    let started = Instant::now();
    let mut first_step = None;
    let mut on_step = |_: &StepRecord, _: &cellfleet_shared::stream::batch::Batch| {
        first_step.get_or_insert_with(|| started.elapsed().as_secs_f64());
        Ok(())
    };
    let mut participation = Participation {
        collective: &mut Solo,
        start_step: checkpointing.resume.as_ref().map_or(0, |r| r.state.step),
        abort: None,
        on_step: Some(&mut on_step),
        checkpointing,
    };
    let (_, records) = pretrain_with(corpus.clone(), config, &options, &mut participation)?;
    let stats = participation
        .checkpointing
        .writer
        .as_ref()
        .map(|w| w.stats.clone());
    drop(participation);
    Ok((records, stats, first_step.unwrap_or(f64::NAN)))
}

pub fn bench_training_saves(bench: &TrainingSaveBench) -> anyhow::Result<()> {
    let corpus = Arc::new(
        Corpus::open(&bench.corpus, &bench.s3)
            .with_context(|| format!("cannot open corpus {}", bench.corpus))?,
    );
    let config = TrainConfig {
        preset: bench.preset,
        steps: bench.steps,
        batch_size: bench.batch_size,
        warmup_steps: 5,
        ..TrainConfig::default()
    };
    let run_url = format!(
        "{}/bench-{}",
        bench.store.trim_end_matches('/'),
        crate::train::checkpoint_state::unix_ms()
    );
    eprintln!(
        "{:?} preset, batch {}, {} steps, {} threads; checkpoints every {} steps to {run_url}",
        bench.preset, bench.batch_size, bench.steps, bench.threads, bench.every
    );

    // The baseline: the same run without checkpoints.
    let (plain, _, fresh_first_step) = run(
        bench,
        &corpus,
        &config,
        &bench.out.join("plain"),
        Checkpointing::default(),
    )?;
    let policy = CheckpointPolicy {
        every: bench.every,
        keep_last: 2,
        keep_every: 0,
        write: Default::default(),
    };
    let writer = CheckpointWriter::new(open_run(&run_url, &bench.s3)?, policy, None, None);
    let (saved, stats, _) = run(
        bench,
        &corpus,
        &config,
        &bench.out.join("saved"),
        Checkpointing {
            writer: Some(writer),
            stop_after: Some(bench.steps - 1),
            ..Checkpointing::default()
        },
    )?;
    let stats = stats.expect("a writer");

    // Resume the last checkpoint and run one step; the clock starts before the checkpoint is read.
    let started = Instant::now();
    let restored = restore(&ResumeTarget::Latest, Some(&run_url), &bench.s3)?;
    let read_seconds = started.elapsed().as_secs_f64();
    let bytes = restored
        .params
        .values()
        .chain(restored.moments.values())
        .map(|t| t.numel() * 4)
        .sum::<usize>();
    let (_, _, resumed_first_step) = run(
        bench,
        &corpus,
        &config,
        &bench.out.join("resumed"),
        Checkpointing {
            resume: Some(restored),
            ..Checkpointing::default()
        },
    )?;
    let resume_to_first_step = read_seconds + resumed_first_step;

    // Skip the first steps (allocator warm-up) on both sides.
    let skip = 3;
    let base = median(plain.iter().skip(skip).map(|r| r.seconds).collect());
    let in_flight = median(
        saved
            .iter()
            .skip(skip)
            .filter(|r| r.upload_in_flight)
            .map(|r| r.seconds)
            .collect(),
    );
    let idle = median(
        saved
            .iter()
            .skip(skip)
            .filter(|r| !r.upload_in_flight)
            .map(|r| r.seconds)
            .collect(),
    );
    let stalls: Vec<f64> = saved
        .iter()
        .filter(|r| r.checkpoint_stall > 0.0)
        .map(|r| r.checkpoint_stall)
        .collect();
    let mean_stall = stalls.iter().sum::<f64>() / stalls.len().max(1) as f64;
    let uploading_steps = saved.iter().filter(|r| r.upload_in_flight).count();

    println!(
        "checkpoint of {:.1} MB (weights + AdamW moments) every {} steps; {} saves committed, {} skipped, {} failed",
        bytes as f64 / 1e6,
        bench.every,
        stats.saved,
        stats.skipped,
        stats.failed
    );
    println!("| measure | value | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| blocking snapshot per save (mean / max) | {:.1} / {:.1} ms | one step: {:.1} ms | {:.2}% of a step |",
        mean_stall * 1e3,
        stats.max_stall_seconds * 1e3,
        base * 1e3,
        100.0 * mean_stall / base
    );
    println!(
        "| step time while an upload runs ({uploading_steps} steps, median) | {:.1} ms | without checkpoints: {:.1} ms | {:.2}x |",
        in_flight * 1e3,
        base * 1e3,
        in_flight / base
    );
    println!(
        "| step time between uploads (median) | {:.1} ms | without checkpoints: {:.1} ms | {:.2}x |",
        idle * 1e3,
        base * 1e3,
        idle / base
    );
    println!(
        "| --resume to first completed step | {:.2} s (read + verify {:.2} s) | fresh start to first step: {:.2} s | {:.2}x |",
        resume_to_first_step,
        read_seconds,
        fresh_first_step,
        resume_to_first_step / fresh_first_step
    );
    Ok(())
}
