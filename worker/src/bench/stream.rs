//! `cellfleet bench stream`: augmented, masked batches per second from one loader thread, against the
//! numpy per-sample baseline in `bench/stream_baseline.py`.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::batch::{Loader, LoaderConfig};
use cellfleet_shared::stream::{EpochPlan, OrderConfig, Partitioner};

use super::child::{bench_dir, python, run_measured};

pub(crate) fn bench_stream(
    url: &str,
    batch_size: u32,
    seconds: f64,
    augmentation: u32,
    sequence: cellfleet_shared::stream::batch::SequenceLayout,
) -> anyhow::Result<()> {
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
    println!("sample-stream benchmark: {} cells x {n_genes} genes, augmentation x{augmentation}, batch {batch_size}, {} token layout", corpus.total_cells(), sequence.name());
    let order = OrderConfig {
        seed: 1,
        augmentation,
        window_units: 16,
    };
    let measure =
        |threads: usize| loader_rate(&corpus, order, batch_size, seconds, threads, sequence);
    // The token work alone (clone permutation, masking, output arrays) on one in-memory cell: the floor
    // that decompression and batch bookkeeping add to.
    let writer_rate = {
        use cellfleet_shared::stream::batch::{MaskConfig, SampleWriter, TokenLayout};
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
                    sequence,
                    MaskConfig::masking_only(0.15),
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

/// Samples per second that the loader delivers with `threads` assembly threads over `seconds` (from the
/// second second on: the first batches fetch and verify shards), in batches of `batch_size`, epoch after
/// epoch of `order` over `corpus` until the time is up (a small corpus is read several times, with the
/// page cache warm).
pub(crate) fn loader_rate(
    corpus: &Arc<Corpus>,
    order: OrderConfig,
    batch_size: u32,
    seconds: f64,
    threads: usize,
    sequence: cellfleet_shared::stream::batch::SequenceLayout,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut samples = 0u64;
    let mut warm = None;
    for epoch in 0.. {
        let plan = Arc::new(EpochPlan::new(&corpus.manifest, order, epoch)?);
        let partitioner = Partitioner {
            epoch_len: plan.len(),
        };
        let ranges: Vec<_> = (0..)
            .map(|i| partitioner.global_batch(i * u64::from(batch_size), 1, batch_size))
            .take_while(|r| !r.is_empty())
            .collect();
        let loader = Loader::spawn(
            corpus.clone(),
            plan,
            ranges,
            LoaderConfig {
                threads,
                sequence,
                ..LoaderConfig::default()
            },
        )?;
        for batch in loader {
            let batch = batch?;
            if warm.is_none() && started.elapsed() > Duration::from_secs(1) {
                warm = Some((Instant::now(), samples));
            }
            samples += batch.samples as u64;
            if let Some((t0, s0)) = warm {
                if t0.elapsed().as_secs_f64() > seconds {
                    return Ok((samples - s0) as f64 / t0.elapsed().as_secs_f64());
                }
            }
        }
        if epoch > 0 && samples == 0 {
            bail!("the corpus delivers no samples");
        }
    }
    unreachable!("the epochs never end")
}
