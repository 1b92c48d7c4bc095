//! `cellfleet bench screen`: in-silico knockout screen throughput, perturbed (gene, cell) pairs per
//! second, of `screen run --local` with 1, 2, ... worker processes against a Geneformer-style loop in
//! eager PyTorch (`bench/screen_baseline.py`) on the same weights, cells, genes and batch size, one
//! thread per process on both sides; a numerical check of both sides on the first pairs; and an analytic
//! forward-FLOP model, validated on this machine's CPU, that extrapolates a genome-wide screen (1,500
//! cells x 4,096 genes, `cellxpert` preset) to one H200.

use cellfleet_shared::stream::batch::SequenceLayout;
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::screen::{GeneSelection, PerturbationKind, ScreenPlan, ScreenSpec};
use cellfleet_shared::storage::S3Options;
use tch::{Device, Kind, Tensor};

use crate::model::{CellModel, FfnConfig, Mode, ModelConfig, Preset, Tokens};
use crate::train::checkpoint_state::open_existing_run;
use crate::train::saved_model::export_checkpoint;

use super::child::{median_range, round_ratios};
use crate::cluster::screen_client::run_local;
use crate::screen::compute::{load_model, Screener};
use crate::screen::plan::read_cells;
use crate::screen::plan::read_spec;
use crate::screen::plan::resolve_plan;

/// What `bench screen` runs.
pub struct ScreenBench {
    /// The screen specification (a knockout screen).
    pub spec: PathBuf,
    /// Cap on the screened cells (overrides the spec's `cells.max_cells`).
    pub cells: Option<u64>,
    /// The largest worker count measured (1, 2, 4, ... up to it, and it).
    pub workers_max: u32,
    /// Where specification copies, screen locations, results, exported weights and cell bins go.
    pub scratch: PathBuf,
    /// Time cap of the Python baseline's screening loop.
    pub baseline_seconds: f64,
    /// Assumed fraction of the H200's dense bf16 peak in the genome-wide extrapolation.
    pub utilization: f64,
    /// A checkpoint of the other token layout (same corpus and vocabulary): also compare the two
    /// layouts' pairs/s on the same cell and genes.
    pub versus_checkpoint: Option<String>,
    /// Rounds of the per-core headline (1 worker vs 1 Python process), alternating which goes first.
    pub rounds: usize,
}

/// (gene, cell) results the Python baseline records for the numerical check.
const SAMPLE_PAIRS: usize = 512;
/// NVIDIA's H200 SXM dense BF16 tensor-core peak (the 1,979 TFLOP/s datasheet figure is with sparsity).
const H200_BF16_DENSE_FLOPS: f64 = 989e12;
/// The genome-wide screen extrapolated.
const GENOME_CELLS: f64 = 1500.0;
const GENOME_GENES: usize = 4096;
/// Geneformer's reported in-silico perturbation time for 1,500 cells on one GPU.
const GENEFORMER_HOURS: f64 = 60.0;

/// One side's measurement.
struct Side {
    name: String,
    processes: u32,
    pairs: u64,
    /// Wall seconds: `run_local` (plan, start workers, compute, merge) or the baseline's loop.
    wall: f64,
    /// Aggregate steady compute rate (sum over processes of pairs / busy seconds).
    compute_rate: f64,
    /// Per-process compute rate.
    per_process_rate: f64,
    load_before: f64,
}

/// Cosine shift per (vocabulary position, corpus cell).
type PairShifts = HashMap<(u32, u64), f32>;

/// Pairs and busy seconds one worker logged.
#[derive(Default, Debug, Clone, Copy)]
struct WorkerLog {
    units: u64,
    pairs: u64,
    seconds: f64,
}

/// Forward FLOPs of one sequence, by part (multiply-add = 2 FLOPs; element-wise work is left out).
#[derive(Debug, Clone, Copy, Default)]
struct Flops {
    projections: f64,
    attention: f64,
    router: f64,
    experts: f64,
    bin_head: f64,
}

impl Flops {
    fn total(&self) -> f64 {
        self.projections + self.attention + self.router + self.experts + self.bin_head
    }
}

/// Forward FLOPs of one sequence of `seq` tokens through `c`: per layer the q, k, v and output
/// projections (4 x 2·L·d²), attention scores and weighted values (2 x 2·L²·d over all heads), the router
/// (2·L·d·E) and the `top_k` experts each token is routed to (top_k x 2 x 2·L·d·H) or the dense MLP; and,
/// with `bin_head`, the bin head over the L - 1 gene tokens (2·(L-1)·d·n_bins), which cellfleet's screen
/// computes for the expected-bin changes.
fn forward_flops(c: &ModelConfig, seq: usize, bin_head: bool) -> Flops {
    let (l, d, layers) = (seq as f64, c.d_model as f64, c.n_layers as f64);
    let (router, experts) = match c.ffn {
        FfnConfig::Dense { hidden } => (0.0, 4.0 * l * d * hidden as f64),
        FfnConfig::Moe {
            experts,
            hidden,
            top_k,
            ..
        } => (
            2.0 * l * d * experts as f64,
            top_k as f64 * 4.0 * l * d * hidden as f64,
        ),
    };
    Flops {
        projections: layers * 8.0 * l * d * d,
        attention: layers * 4.0 * l * l * d,
        router: layers * router,
        experts: layers * experts,
        bin_head: if bin_head {
            2.0 * (l - 1.0) * d * c.n_bins as f64
        } else {
            0.0
        },
    }
}

fn ffn_words(c: &ModelConfig) -> String {
    match c.ffn {
        FfnConfig::Dense { hidden } => format!("dense FFN of {hidden}"),
        FfnConfig::Moe {
            experts,
            hidden,
            top_k,
            ..
        } => format!("{experts} experts of {hidden} hidden, top-{top_k} routing"),
    }
}

fn model_words(c: &ModelConfig) -> String {
    format!(
        "d_model {}, {} layers, {} heads, {}, {} bins",
        c.d_model,
        c.n_layers,
        c.n_heads,
        ffn_words(c),
        c.n_bins
    )
}

/// The 1-minute load average (another build on the machine shows here).
pub(super) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` with this process's stdout (file descriptor 1) sent to `log`, so the screen's own report and
/// the export's message stay out of the benchmark table.
pub(super) fn with_stdout_to<T>(
    log: &Path,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    std::io::stdout().flush()?;
    // SAFETY: dup/dup2 on file descriptors this process owns; the saved descriptor is restored and closed.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        bail!(
            "cannot redirect stdout to {}: {}",
            log.display(),
            std::io::Error::last_os_error()
        );
    }
    let result = f();
    let _ = std::io::stdout().flush();
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    result
}

/// Reads `path` as a screen specification and makes every local location absolute (against the
/// specification's directory), so a copy written elsewhere means the same screen.
pub(super) fn absolute_spec(path: &Path) -> anyhow::Result<ScreenSpec> {
    let mut spec = read_spec(path)?;
    if spec.perturbation.kind != PerturbationKind::Knockout {
        bail!(
            "{}: perturbation.kind = {:?}; `bench screen` measures knockout screens (its Geneformer-style baseline knocks genes out)",
            path.display(),
            spec.perturbation.kind.name()
        );
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let absolute = |location: &str| -> String {
        if location.contains("://") || Path::new(location).is_absolute() {
            return location.to_string();
        }
        let joined = dir.join(location);
        std::path::absolute(&joined)
            .unwrap_or(joined)
            .display()
            .to_string()
    };
    spec.checkpoint = absolute(&spec.checkpoint);
    spec.corpus = absolute(&spec.corpus);
    spec.out = absolute(&spec.out);
    if let GeneSelection::File(file) = &spec.genes {
        spec.genes = GeneSelection::File(cellfleet_shared::screen::GeneFile {
            file: absolute(&file.file),
        });
    }
    if let Some(t) = spec.transitions.as_mut() {
        t.classifier = absolute(&t.classifier);
    }
    if let Some(a) = spec.attribution.as_mut() {
        a.classifier = absolute(&a.classifier);
    }
    Ok(spec)
}

/// A bench's screen: `spec` with its cells capped at `cells`, planned into `scratch/plan` (`scratch`
/// cleared first and returned absolute), and a one-thread `Screener` of the plan on the CPU.
pub(super) fn planned_screener(
    mut spec: ScreenSpec,
    cells: Option<u64>,
    scratch: &Path,
    s3: &S3Options,
) -> anyhow::Result<(ScreenSpec, PathBuf, ScreenPlan, Screener)> {
    if let Some(cells) = cells {
        spec.cells.max_cells = Some(cells);
    }
    fresh_dir(scratch)?;
    let scratch = std::path::absolute(scratch)?;
    spec.out = scratch.join("plan").display().to_string();
    let plan = resolve_plan(&spec, &scratch, s3)?;
    let store = crate::screen::plan::open_location(&spec.out, s3)?;
    let plan_blake3 = crate::screen::plan::store_plan(&plan, &store)?;
    tch::set_num_threads(1);
    let screener = Screener::load(plan.clone(), &plan_blake3, s3, Device::Cpu)?;
    Ok((spec, scratch, plan, screener))
}

/// Sums the `unit U/N: P pairs in Ss (...)` lines of every `worker-*.log` in `dir`, per worker.
fn worker_logs(dir: &Path) -> anyhow::Result<Vec<WorkerLog>> {
    let mut logs = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list the worker logs in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("worker-") && n.ends_with(".log"))
        })
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut log = WorkerLog::default();
        for line in text.lines() {
            if let Some((pairs, seconds)) = unit_line(line) {
                log.units += 1;
                log.pairs += pairs;
                log.seconds += seconds;
            }
        }
        logs.push(log);
    }
    Ok(logs)
}

/// `(pairs, seconds)` of a worker's `screen ID unit U/N: P pairs in Ss (R pairs/s)` line.
fn unit_line(line: &str) -> Option<(u64, f64)> {
    let (_, after_unit) = line.split_once(" unit ")?;
    let (_, rest) = after_unit.split_once(": ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        [pairs, "pairs", "in", seconds, ..] => Some((
            pairs.parse().ok()?,
            seconds.strip_suffix('s')?.parse().ok()?,
        )),
        _ => None,
    }
}

/// 1, 2, 4, ... below `max`, and `max`.
fn worker_counts(max: u32) -> Vec<u32> {
    let mut counts: Vec<u32> = std::iter::successors(Some(1u32), |w| w.checked_mul(2))
        .take_while(|&w| w < max)
        .collect();
    counts.push(max);
    counts
}

pub(super) fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn baseline_script() -> anyhow::Result<PathBuf> {
    [
        PathBuf::from("bench/screen_baseline.py"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/screen_baseline.py"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| {
        anyhow!("cannot find bench/screen_baseline.py (run from the source tree's root)")
    })
}

/// What the Python baseline printed.
#[derive(serde::Deserialize)]
struct BaselineReport {
    pairs: u64,
    seconds: f64,
    pairs_per_second: f64,
    forwards: u64,
    cells_started: u64,
    cells_done: u64,
    stopped_by_time: bool,
}

/// What the Python baseline wrote for the numerical check.
#[derive(serde::Deserialize)]
struct BaselineSample {
    /// `(vocabulary position, corpus cell, cosine similarity)`.
    sample: Vec<(u32, u64, f64)>,
    /// `(corpus cell, knocked-out genes)` of every cell it finished.
    cells_done: Vec<(u64, u64)>,
    /// The first screened cell's unperturbed embedding.
    first: Option<FirstEmbedding>,
}

#[derive(serde::Deserialize)]
struct FirstEmbedding {
    cell: u64,
    embedding: Vec<f32>,
}

/// One side of the screen with `workers` worker processes; returns its measurement and the merged
/// per-pair cosine shifts.
fn run_cellfleet(
    spec: &ScreenSpec,
    workers: u32,
    scratch: &Path,
    s3: &S3Options,
) -> anyhow::Result<(Side, PairShifts)> {
    let dir = scratch.join(format!("workers-{workers}"));
    fresh_dir(&dir)?;
    let mut spec = spec.clone();
    spec.out = std::path::absolute(dir.join("screen"))?
        .display()
        .to_string();
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("cannot write {}", spec_path.display()))?;
    let results = dir.join("results");
    let load_before = load_average();
    eprintln!(
        "bench screen: cellfleet with {workers} worker process(es) (load average {load_before:.2})"
    );
    let started = Instant::now();
    let written = with_stdout_to(&dir.join("screen-report.txt"), || {
        run_local(
            &spec_path,
            workers,
            Some(results.display().to_string()),
            true,
            s3,
        )
    })
    .with_context(|| format!("the screen with {workers} worker(s) failed"))?;
    let wall = started.elapsed().as_secs_f64();
    let logs = worker_logs(&results.join("workers"))?;
    let logged: u64 = logs.iter().map(|l| l.pairs).sum();
    let pairs = written.results.total_records;
    if logged != pairs {
        eprintln!(
            "warning: the worker logs of the {workers}-worker run count {logged} pairs, the merged results {pairs} (units re-run after a lost lease count twice)"
        );
    }
    let busy: Vec<&WorkerLog> = logs.iter().filter(|l| l.seconds > 0.0).collect();
    let compute_rate: f64 = busy.iter().map(|l| l.pairs as f64 / l.seconds).sum();
    let shifts = written
        .results
        .records
        .as_ref()
        .map(|records| {
            records
                .iter()
                .map(|r| {
                    let gene = written.plan.targets[r.target as usize].genes[0];
                    ((gene, r.cell), r.cosine_shift)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((
        Side {
            name: format!(
                "cellfleet {workers} worker{}",
                if workers == 1 { "" } else { "s" }
            ),
            processes: workers,
            pairs,
            wall,
            compute_rate,
            per_process_rate: compute_rate / busy.len().max(1) as f64,
            load_before,
        },
        shifts,
    ))
}

/// The Python side: exports the plan's checkpoint, writes the cells' bins and runs the baseline as one
/// process, then as two processes on alternate cells at once (what the machine gives two independent
/// single-thread processes, the reference for the workers' scaling).
fn run_baseline(
    plan: &ScreenPlan,
    scratch: &Path,
    max_seconds: f64,
    s3: &S3Options,
) -> anyhow::Result<(Side, Side, BaselineReport, BaselineSample, PathBuf)> {
    let dir = scratch.join("baseline");
    fresh_dir(&dir)?;
    let dir = std::path::absolute(&dir)?;
    let export = || -> anyhow::Result<()> {
        let checkpoints = open_existing_run(&plan.checkpoint.url, s3)?;
        let manifest = checkpoints
            .manifest(plan.checkpoint.step)?
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        export_checkpoint(&checkpoints, &manifest, &dir.join("model.safetensors"))?;
        Ok(())
    };
    export().context("exporting the screen's checkpoint for the baseline")?;
    let corpus = Corpus::open(&plan.corpus_url, s3)?;
    let bins = read_cells(&corpus, &plan.cells)?;
    let mut bytes = Vec::with_capacity(plan.cells.len() * plan.vocabulary.len());
    for cell in &plan.cells {
        bytes.extend_from_slice(&bins[cell]);
    }
    let cells_file = dir.join("cells.u8");
    std::fs::write(&cells_file, &bytes)?;
    // The checkpoint's layout (from the exported model.json): in the expressed layout each cell's
    // sequence is its expressed genes and its drawn unexpressed ones, the genes cellfleet reads.
    let layout = load_model(plan, s3, Device::Cpu)?.config.layout;
    let sequences: Vec<Vec<u32>> = plan
        .cells
        .iter()
        .map(|c| layout.inference_genes(*c, &bins[c]))
        .collect();
    let job = serde_json::json!({
        "layout": layout.name(),
        "sequences": if layout == SequenceLayout::Full { serde_json::Value::Null } else { serde_json::json!(sequences) },
        "model_dir": dir,
        "cells_file": cells_file,
        "cell_ids": plan.cells,
        "work_genes": single_genes(plan),
        "batch": plan.spec.execution.batch,
        "threads": 1,
        "max_seconds": max_seconds,
        "keep": SAMPLE_PAIRS,
        "sample_out": dir.join("sample.json"),
    });
    let job_path = dir.join("job.json");
    std::fs::write(&job_path, serde_json::to_vec_pretty(&job)?)?;
    let script = baseline_script()?;
    let spawn = |shard: usize, shards: usize| -> anyhow::Result<std::process::Child> {
        Command::new(python())
            .arg(&script)
            .arg(&job_path)
            .args(["--max-seconds", &max_seconds.to_string()])
            .args(["--shard", &format!("{shard}/{shards}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (set PYTHON to choose the interpreter)",
                    python()
                )
            })
    };
    let finish = |child: std::process::Child| baseline_report(child.wait_with_output()?);

    let load_before = load_average();
    eprintln!(
        "bench screen: Python baseline {} (load average {load_before:.2}, at most {max_seconds:.0} s)",
        script.display()
    );
    let report = finish(spawn(0, 1)?)?;
    let sample: BaselineSample = serde_json::from_slice(&std::fs::read(dir.join("sample.json"))?)
        .context("the Python baseline's sample.json")?;
    let one = Side {
        name: "Python eager (Geneformer-style)".into(),
        processes: 1,
        pairs: report.pairs,
        wall: report.seconds,
        compute_rate: report.pairs_per_second,
        per_process_rate: report.pairs_per_second,
        load_before,
    };

    let load_before = load_average();
    eprintln!("bench screen: Python baseline, 2 processes on alternate cells (load average {load_before:.2})");
    let children = [spawn(0, 2)?, spawn(1, 2)?];
    let reports = children
        .into_iter()
        .map(finish)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let compute_rate: f64 = reports.iter().map(|r| r.pairs_per_second).sum();
    let two = Side {
        name: "Python eager, 2 processes".into(),
        processes: 2,
        pairs: reports.iter().map(|r| r.pairs).sum(),
        wall: reports.iter().map(|r| r.seconds).fold(0.0, f64::max),
        compute_rate,
        per_process_rate: compute_rate / 2.0,
        load_before,
    };
    Ok((one, two, report, sample, job_path))
}

/// The Python baseline once more, one process, on the job `run_baseline` wrote.
fn rerun_baseline(job_path: &Path, max_seconds: f64) -> anyhow::Result<BaselineReport> {
    baseline_report(
        Command::new(python())
            .arg(baseline_script()?)
            .arg(job_path)
            .args(["--max-seconds", &max_seconds.to_string()])
            .output()
            .with_context(|| format!("cannot start {}", python()))?,
    )
}

/// The report a finished Python baseline printed as its last line.
fn baseline_report(output: std::process::Output) -> anyhow::Result<BaselineReport> {
    if !output.status.success() {
        bail!(
            "the Python baseline failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("the Python baseline printed {stdout:?}"))
}

/// Seconds per forward pass of `tokens` (the mean of repetitions after a warm-up), with the expected-bin
/// head over the gene tokens when `bin_head`.
fn time_forward(model: &CellModel, tokens: &Tokens, bin_head: bool) -> f64 {
    let run = || {
        tch::no_grad(|| {
            let hidden = model.forward(tokens, Mode::EVAL).hidden;
            let (b, l, d) = hidden.size3().expect("[batch, seq, d]");
            let genes = hidden.narrow(1, 1, l - 1);
            let embedding = genes.mean_dim(1, false, Kind::Float);
            let _ = embedding.sum(Kind::Float).double_value(&[]);
            if bin_head {
                let probs = model
                    .bin_logits(&genes.reshape([b * (l - 1), d]), false)
                    .softmax(-1, Kind::Float);
                let bins = Tensor::arange(model.config.n_bins as i64, (Kind::Float, Device::Cpu));
                let _ = probs.matmul(&bins).sum(Kind::Float).double_value(&[]);
            }
        })
    };
    run();
    let started = Instant::now();
    let mut reps = 0;
    while reps < 3 || (started.elapsed().as_secs_f64() < 2.0 && reps < 20) {
        run();
        reps += 1;
    }
    started.elapsed().as_secs_f64() / reps as f64
}

/// Token rows of the first `rows` of `cells` (repeated when fewer), unperturbed, in the screen's layout.
fn plan_tokens(
    plan: &ScreenPlan,
    layout: SequenceLayout,
    cells: &[u64],
    bins: &HashMap<u64, Vec<u8>>,
    rows: usize,
) -> Tokens {
    let cls = i64::from(plan.n_bins) + 1;
    let cells: Vec<u64> = cells.iter().copied().cycle().take(rows).collect();
    let sequences: Vec<Vec<u32>> = cells
        .iter()
        .map(|c| layout.inference_genes(*c, &bins[c]))
        .collect();
    let longest = sequences.iter().map(|s| s.len()).max().unwrap_or(0) + 1;
    let mut ids = Vec::with_capacity(rows * longest);
    let mut token_bins = Vec::with_capacity(ids.capacity());
    let mut valid = Vec::with_capacity(ids.capacity());
    for (cell, genes) in cells.iter().zip(&sequences) {
        ids.push(0);
        token_bins.push(cls);
        ids.extend(genes.iter().map(|&g| i64::from(g) + 1));
        token_bins.extend(genes.iter().map(|&g| i64::from(bins[cell][g as usize])));
        let pad = longest - 1 - genes.len();
        ids.extend(std::iter::repeat_n(0, pad));
        token_bins.extend(std::iter::repeat_n(cls - 1, pad));
        valid.extend(std::iter::repeat_n(true, genes.len() + 1));
        valid.extend(std::iter::repeat_n(false, pad));
    }
    let shape = [rows as i64, longest as i64];
    let padded = valid.iter().any(|v| !v);
    Tokens {
        gene_ids: Tensor::from_slice(&ids).view(shape),
        bins: Tensor::from_slice(&token_bins).view(shape),
        valid: padded.then(|| Tensor::from_slice(&valid).view(shape)),
    }
}

/// Mean tokens per sequence of the plan's cells in `layout` (`[CLS]` included): the `L` of the FLOP
/// model.
fn mean_sequence_len(layout: SequenceLayout, bins: &HashMap<u64, Vec<u8>>) -> usize {
    let total: usize = bins.values().map(|b| layout.sample_len(b)).sum();
    (total as f64 / bins.len().max(1) as f64).round() as usize
}

/// A CPU forward measurement of one model at the screen's sequence length.
struct CpuForward {
    what: String,
    config: ModelConfig,
    seconds_per_sequence: f64,
    flops_per_sequence: f64,
}

fn cpu_forwards(
    plan: &ScreenPlan,
    screened: &CellModel,
    bins: &HashMap<u64, Vec<u8>>,
) -> anyhow::Result<Vec<CpuForward>> {
    tch::set_num_threads(1);
    let batch = plan.spec.execution.batch as usize;
    let layout = screened.config.layout;
    let seq = mean_sequence_len(layout, bins);
    let mut out = Vec::new();
    let small = {
        tch::manual_seed(7);
        CellModel::new(
            Preset::Small.config(plan.vocabulary.len(), usize::from(plan.n_bins)),
            Device::Cpu,
        )?
    };
    // The small preset is several times the tiny one's work: fewer rows keep its measurement short.
    for (what, model, rows) in [
        ("the screen's checkpoint", screened, batch),
        ("small preset (random weights)", &small, batch.min(8)),
    ] {
        let tokens = plan_tokens(plan, layout, &plan.cells, bins, rows);
        let seconds = time_forward(model, &tokens, true) / rows as f64;
        out.push(CpuForward {
            what: what.to_string(),
            config: model.config.clone(),
            seconds_per_sequence: seconds,
            flops_per_sequence: forward_flops(&model.config, seq, true).total(),
        });
    }
    Ok(out)
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.round());
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn duration_words(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else if seconds < 7200.0 {
        format!("{:.1} min", seconds / 60.0)
    } else if seconds < 3.0 * 86400.0 {
        format!("{:.2} h", seconds / 3600.0)
    } else if seconds < 2.0 * 365.25 * 86400.0 {
        format!("{:.0} days", seconds / 86400.0)
    } else {
        format!("{:.1} years", seconds / (365.25 * 86400.0))
    }
}

/// `bench screen`: see the module documentation.
pub fn bench_screen(args: &ScreenBench) -> anyhow::Result<()> {
    if args.workers_max == 0 {
        bail!("--workers-max must be at least 1");
    }
    if args.baseline_seconds.is_nan() || args.baseline_seconds <= 0.0 {
        bail!("--baseline-seconds must be positive");
    }
    if !((0.0..=1.0).contains(&args.utilization) && args.utilization > 0.0) {
        bail!(
            "--utilization {} must be in (0, 1]: a fraction of the H200's peak",
            args.utilization
        );
    }
    if let Some(0) = args.cells {
        bail!("--cells 0: at least one cell is needed");
    }
    let s3 = S3Options::default();
    let mut spec = absolute_spec(&args.spec)?;
    if let Some(cells) = args.cells {
        spec.cells.max_cells = Some(cells);
    }
    spec.execution.threads = 1;
    spec.execution.per_cell = false;
    // The Geneformer-style loop embeds cells as the mean hidden state; compare like with like (cellfleet
    // computes the expected bins for top affected genes either way).
    spec.readout = cellfleet_shared::screen::Readout::Mean;
    spec.layer = -1;
    if !matches!(
        spec.genes,
        GeneSelection::Keyword(_) | GeneSelection::List(_) | GeneSelection::File(_)
    ) || spec.combinations.is_some()
    {
        bail!("bench screen compares single-gene screens: the spec's gene sets or combinations have no baseline");
    }
    std::fs::create_dir_all(&args.scratch)
        .with_context(|| format!("cannot create --scratch {}", args.scratch.display()))?;

    // The plan both sides screen (run_local plans the same spec again, identically, for every run).
    let planned = Instant::now();
    let plan = resolve_plan(&spec, Path::new("."), &s3)
        .with_context(|| format!("{}: the screen cannot run", args.spec.display()))?;
    let plan_seconds = planned.elapsed().as_secs_f64();
    let layout = load_model(&plan, &s3, Device::Cpu)?.config.layout;
    let expressed = plan.total_records() as f64 / (plan.targets.len() * plan.cells.len()) as f64;
    let cores = cores();

    println!(
        "screen benchmark: {}; {} work genes x {} cells, {} perturbed (gene, cell) pairs ({:.1}% expressed); \
         {} units of {} genes x {} cells; batch {}; {} token layout; 1 libtorch thread per process; {cores} cores",
        plan.summary(),
        plan.targets.len(),
        plan.cells.len(),
        thousands(plan.total_records() as f64),
        100.0 * expressed,
        plan.unit_count(),
        plan.spec.execution.gene_block,
        plan.spec.execution.cell_block,
        plan.spec.execution.batch,
        layout.name(),
    );
    println!(
        "checkpoint {} step {}; corpus {}; scratch {}",
        plan.checkpoint.url,
        plan.checkpoint.step,
        plan.corpus_url,
        args.scratch.display()
    );
    if args.workers_max as usize > cores {
        println!(
            "note: {} worker processes on {cores} cores: the largest runs are oversubscribed",
            args.workers_max
        );
    }

    let mut sides = Vec::new();
    let mut first_shifts = HashMap::new();
    for workers in worker_counts(args.workers_max) {
        let (side, shifts) = run_cellfleet(&spec, workers, &args.scratch, &s3)?;
        if workers == 1 {
            first_shifts = shifts;
        }
        sides.push(side);
    }
    let (baseline, baseline_two, report, sample, job_path) =
        run_baseline(&plan, &args.scratch, args.baseline_seconds, &s3)?;
    // Further rounds of the per-core headline (1 worker vs 1 Python process), alternating who goes first.
    let mut round_ratios = Vec::new();
    if let Some(one) = sides.iter().find(|s| s.processes == 1) {
        round_ratios.push(one.per_process_rate / baseline.per_process_rate);
    }
    for round in 1..args.rounds {
        eprintln!("bench screen: round {}/{}", round + 1, args.rounds);
        let (ours, theirs) = if round % 2 == 1 {
            let theirs = rerun_baseline(&job_path, args.baseline_seconds)?;
            (run_cellfleet(&spec, 1, &args.scratch, &s3)?.0, theirs)
        } else {
            let ours = run_cellfleet(&spec, 1, &args.scratch, &s3)?.0;
            (ours, rerun_baseline(&job_path, args.baseline_seconds)?)
        };
        round_ratios.push(ours.per_process_rate / theirs.pairs_per_second);
    }

    print_table(
        &plan,
        &sides,
        [&baseline, &baseline_two],
        &report,
        plan_seconds,
        cores,
    );
    if round_ratios.len() > 1 {
        let (median, low, high) = median_range(&round_ratios);
        println!(
            "per core over {} alternating rounds, 1 worker / 1 Python process: {} -> median {:.2}x (range {:.2}-{:.2}x)",
            round_ratios.len(),
            round_ratios
                .iter()
                .map(|r| format!("{r:.2}x"))
                .collect::<Vec<_>>()
                .join(", "),
            median,
            low,
            high
        );
    }
    print_agreement(&sample, &first_shifts);
    let cpu = print_flop_model(&plan, &s3, &sample, &sides, &report)?;
    print_genome_extrapolation(&plan, args.utilization, expressed, &cpu);
    if let Some(other) = &args.versus_checkpoint {
        compare_layouts(&spec, other, &s3)?;
    }
    Ok(())
}

/// `--versus-checkpoint`: the same knockouts (the plan's first cell, its first `batch` expressed screen
/// genes, no null genes) screened by this worker process, in process and on one thread, with the spec's
/// checkpoint and with `other`, in alternating rounds: pairs/s of the two token layouts on identical
/// work. One cell and one batch keep the full layout's side (a 4,097-token forward per pair at 4,096
/// genes) to a couple of minutes.
fn compare_layouts(spec: &ScreenSpec, other: &str, s3: &S3Options) -> anyhow::Result<()> {
    const ROUNDS: usize = 3;
    let mut spec = spec.clone();
    spec.cells.max_cells = Some(1);
    spec.null.genes = 0;
    let plan = resolve_plan(&spec, Path::new("."), s3)?;
    let cell = *plan
        .cells
        .first()
        .ok_or_else(|| anyhow!("the spec selects no cells"))?;
    let bins = read_cells(&Corpus::open(&plan.corpus_url, s3)?, &[cell])?;
    let batch = plan.spec.execution.batch as usize;
    let genes: Vec<String> = single_genes(&plan)
        .into_iter()
        .filter(|&g| bins[&cell][g as usize] > 0)
        .take(batch)
        .map(|g| plan.vocabulary[g as usize].clone())
        .collect();
    if genes.is_empty() {
        bail!("--versus-checkpoint: cell {cell} expresses none of the screened genes");
    }
    spec.genes = GeneSelection::List(genes);
    spec.goal = None;
    spec.execution.gene_block = batch as u32;
    spec.execution.cell_block = 1;
    let mut sides = Vec::new();
    for checkpoint in [spec.checkpoint.clone(), other.to_string()] {
        let mut side = spec.clone();
        side.checkpoint = checkpoint;
        let plan = resolve_plan(&side, Path::new("."), s3)?;
        let screener = Screener::load(plan, "bench", s3, Device::Cpu)?;
        sides.push(screener);
    }
    let layouts: Vec<SequenceLayout> = sides.iter().map(|s| s.layout()).collect();
    if layouts[0] == layouts[1] {
        bail!(
            "--versus-checkpoint {other}: both checkpoints use the {} layout; give one of the other layout",
            layouts[0].name()
        );
    }
    println!();
    println!(
        "layouts on identical work: cell {cell}, {} expressed genes knocked out, {} token layout ({}) vs {} ({}); 1 thread, in process, {ROUNDS} alternating rounds",
        sides[0].plan.total_records(),
        layouts[0].name(),
        spec.checkpoint,
        layouts[1].name(),
        other,
    );
    tch::set_num_threads(1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for (side, screener) in sides.iter().enumerate() {
            // Fresh originals every round: each round times the cell's original forward too.
            screener.forget_originals();
            let started = Instant::now();
            let mut pairs = 0usize;
            for unit in 0..screener.plan.unit_count() {
                pairs += screener
                    .compute_unit(unit, &stop)
                    .map_err(|e| anyhow!("{e}"))?
                    .record_cell
                    .len();
            }
            let rate = pairs as f64 / started.elapsed().as_secs_f64();
            println!(
                "  round {}: {:<9} {:>10.2} pairs/s ({pairs} pairs + 1 original)",
                round + 1,
                layouts[side].name(),
                rate
            );
            rates[side].push(rate);
        }
    }
    let (expressed, full) = if layouts[0] == SequenceLayout::Full {
        (1, 0)
    } else {
        (0, 1)
    };
    let (median, low, high) = median_range(&round_ratios(&rates[expressed], &rates[full]));
    println!(
        "  expressed / full layout: {median:.1}x median pairs/s ({low:.1}-{high:.1}x over {ROUNDS} rounds; target >= 5x)"
    );
    Ok(())
}

/// The throughput table: every cellfleet side and the Python baseline with 1 and 2 processes.
fn print_table(
    plan: &ScreenPlan,
    sides: &[Side],
    [baseline, baseline_two]: [&Side; 2],
    report: &BaselineReport,
    plan_seconds: f64,
    cores: usize,
) {
    let base_rate = baseline.compute_rate;
    println!();
    println!(
        "{:<32} {:>5} {:>9} {:>9} {:>12} {:>14} {:>13} {:>10} {:>6}",
        "side",
        "procs",
        "pairs",
        "wall s",
        "e2e pairs/s",
        "compute pairs/s",
        "per process",
        "vs Python",
        "load"
    );
    for side in sides {
        let e2e = side.pairs as f64 / side.wall;
        println!(
            "{:<32} {:>5} {:>9} {:>9.2} {:>12.1} {:>14.1} {:>13.1} {:>10} {:>6.2}",
            side.name,
            side.processes,
            side.pairs,
            side.wall,
            e2e,
            side.compute_rate,
            side.per_process_rate,
            format!(
                "{:.2}x/{:.2}x",
                e2e / base_rate,
                side.compute_rate / base_rate
            ),
            side.load_before
        );
    }
    for side in [&baseline, &baseline_two] {
        println!(
            "{:<32} {:>5} {:>9} {:>9.2} {:>12} {:>14.1} {:>13.1} {:>10} {:>6.2}",
            side.name,
            side.processes,
            side.pairs,
            side.wall,
            "-",
            side.compute_rate,
            side.per_process_rate,
            format!("{:.2}x", side.compute_rate / base_rate),
            side.load_before
        );
    }
    println!(
        "e2e = merged pairs / wall time of `screen run --local` (planning {plan_seconds:.2} s, starting the workers, \
         loading the checkpoint, computing, merging and writing the tables); compute = what the workers log per unit \
         (pairs / busy seconds, summed over workers) and, for Python, pairs / seconds of its screening loop (summed over \
         processes); vs Python = e2e/compute over the 1-process baseline's rate; load = 1-minute load average before \
         the side ran"
    );
    println!(
        "Python baseline (1 process): {} pairs in {:.1} s; {} of {} cells done ({} with expressed screen genes{}), {} forward \
         passes (1 original per cell + knockouts in batches of up to {}), timed from the first forward (model load excluded)",
        report.pairs,
        report.seconds,
        report.cells_done,
        plan.cells.len(),
        report.cells_started,
        if report.stopped_by_time {
            ", stopped by --baseline-seconds"
        } else {
            ""
        },
        report.forwards,
        plan.spec.execution.batch
    );
    // The headline compares like with like: N single-thread worker processes against N single-thread
    // Python processes, per process (per core while N <= cores).
    let per_core: Vec<String> = [(1, baseline), (2, baseline_two)]
        .iter()
        .filter_map(|(n, python)| {
            let ours = sides.iter().find(|s| s.processes == *n)?;
            Some(format!(
                "{n} worker{} vs {n} Python process{}: {:.2}x ({:.1} vs {:.1} pairs/s per process)",
                if *n == 1 { "" } else { "s" },
                if *n == 1 { "" } else { "es" },
                ours.per_process_rate / python.per_process_rate,
                ours.per_process_rate,
                python.per_process_rate
            ))
        })
        .collect();
    println!("headline, per core: {}", per_core.join("; "));
    if let (Some(one), Some(two)) = (
        sides.iter().find(|s| s.processes == 1),
        sides.iter().find(|s| s.processes == 2),
    ) {
        println!(
            "scaling 1 -> 2 workers: e2e {:.2}x, compute {:.2}x; the machine itself, 1 -> 2 Python processes: {:.2}x \
             (ideal 2.00x on {cores} cores{})",
            (two.pairs as f64 / two.wall) / (one.pairs as f64 / one.wall),
            two.compute_rate / one.compute_rate,
            baseline_two.compute_rate / baseline.compute_rate,
            if cores < 3 {
                "; the coordinator, merge and any other load share those cores"
            } else {
                ""
            }
        );
    }
}

/// Numerical agreement on the pairs the baseline recorded (both sides compute in f32, so the shifts are
/// compared as f32 values).
fn print_agreement(sample: &BaselineSample, first_shifts: &PairShifts) {
    let mut diffs = Vec::new();
    let mut magnitude = 0f64;
    for &(gene, cell, cosine) in &sample.sample {
        if let Some(&ours) = first_shifts.get(&(gene, cell)) {
            let theirs = 1.0f32 - cosine as f32;
            diffs.push(f64::from((ours - theirs).abs()));
            magnitude = magnitude.max(f64::from(theirs.abs()));
        }
    }
    let mut per_cell: HashMap<u64, u64> = HashMap::new();
    for (_, cell) in first_shifts.keys() {
        *per_cell.entry(*cell).or_default() += 1;
    }
    let same_pairs = sample
        .cells_done
        .iter()
        .filter(|(cell, n)| per_cell.get(cell).copied().unwrap_or(0) == *n)
        .count();
    if diffs.is_empty() {
        println!(
            "agreement: no pair of the baseline's sample is in the 1-worker results (nothing to compare)"
        );
    } else {
        let max = diffs.iter().copied().fold(0.0, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let identical = diffs.iter().filter(|&&d| d == 0.0).count();
        println!(
            "agreement (cosine shift = 1 - cosine, cellfleet 1 worker vs Python) on {} pairs: {identical} identical f32 values, \
             max |diff| {max:.2e}, mean {mean:.2e} (largest shift {magnitude:.2e}); the same knocked-out genes in \
             {same_pairs} of {} cells the baseline finished",
            diffs.len(),
            sample.cells_done.len()
        );
        if magnitude < 1e-5 {
            println!(
                "  (this checkpoint barely moves its embeddings: shifts this small sit at the f32 resolution of a cosine \
                 near 1, ~6e-8, so the embedding check below is the stronger one)"
            );
        }
    }
}

/// The FLOP model, validated on this CPU; returns the measured forwards the extrapolation uses.
fn print_flop_model(
    plan: &ScreenPlan,
    s3: &S3Options,
    sample: &BaselineSample,
    sides: &[Side],
    report: &BaselineReport,
) -> anyhow::Result<Vec<CpuForward>> {
    let model = load_model(plan, s3, Device::Cpu)?;
    let layout = model.config.layout;
    let batch = plan.spec.execution.batch as usize;
    let mut wanted: Vec<u64> = plan.cells[..plan.cells.len().min(batch)].to_vec();
    wanted.extend(sample.first.as_ref().map(|f| f.cell));
    let bins = read_cells(&Corpus::open(&plan.corpus_url, s3)?, &wanted)?;
    let seq = mean_sequence_len(layout, &bins);
    if let Some(first) = &sample.first {
        let ours = model.embed(
            &plan_tokens(plan, layout, &[first.cell], &bins, 1),
            crate::model::Pooling::Mean,
        );
        let theirs = Tensor::from_slice(&first.embedding).view([1, -1]);
        let diff = (&ours - &theirs).abs().max().double_value(&[]);
        let scale = theirs.abs().max().double_value(&[]);
        println!(
            "agreement of the unperturbed embedding of cell {} (cellfleet's model in this process vs Python): max |diff| {diff:.2e} \
             of values up to {scale:.2e}",
            first.cell
        );
    }
    let cpu = cpu_forwards(plan, &model, &bins)?;
    let screened = forward_flops(&cpu[0].config, seq, true);
    println!();
    println!(
        "FLOP model (forward, per sequence of L tokens; multiply-add = 2 FLOPs; embeddings, LayerNorm, GELU, softmax \
         and other element-wise work left out): per layer 8·L·d² (q, k, v, out) + 4·L²·d (scores and values) + \
         2·L·d·E (router) + top_k·4·L·d·H (experts); + 2·(L-1)·d·n_bins (bin head, computed by cellfleet for expected bins)"
    );
    println!(
        "validation on this CPU (1 thread, L = {seq}, batch of plan cells, forward + bin head):"
    );
    for f in &cpu {
        println!(
            "  {:<32} {}: {:.3} GFLOP/seq, {:.2} ms/seq, {:.2} GFLOP/s",
            f.what,
            model_words(&f.config),
            f.flops_per_sequence / 1e9,
            f.seconds_per_sequence * 1e3,
            f.flops_per_sequence / f.seconds_per_sequence / 1e9
        );
    }
    if let [a, b] = cpu.as_slice() {
        println!(
            "  time ratio {:.2}x vs predicted FLOP ratio {:.2}x ({} / {})",
            b.seconds_per_sequence / a.seconds_per_sequence,
            b.flops_per_sequence / a.flops_per_sequence,
            b.what,
            a.what
        );
    }
    if let Some(one) = sides.iter().find(|s| s.processes == 1) {
        // One worker: perturbed sequences plus one original per cell (the mean readout's own-gene
        // states are cached with it; a screen too large for that cache recomputes them per target block,
        // which this count leaves out).
        let forwards = plan.total_records() as f64 + plan.cells.len() as f64;
        let per_pair = forwards / plan.total_records() as f64;
        println!(
            "  cellfleet worker (compute rate x {:.3} forwards per pair x {:.3} GFLOP): {:.2} GFLOP/s",
            per_pair,
            screened.total() / 1e9,
            one.per_process_rate * per_pair * screened.total() / 1e9
        );
    }
    let python_flops = forward_flops(&cpu[0].config, seq, false).total();
    println!(
        "  Python baseline ({} forwards x {:.3} GFLOP without the bin head in {:.1} s): {:.2} GFLOP/s",
        report.forwards,
        python_flops / 1e9,
        report.seconds,
        report.forwards as f64 * python_flops / report.seconds / 1e9
    );

    Ok(cpu)
}

/// The genome-wide screen on one H200, extrapolated from the FLOP model at `utilization` of its peak.
fn print_genome_extrapolation(
    plan: &ScreenPlan,
    utilization: f64,
    expressed: f64,
    cpu: &[CpuForward],
) {
    let big = Preset::Cellxpert.config(GENOME_GENES, usize::from(plan.n_bins));
    let big_seq = GENOME_GENES + 1;
    let f = forward_flops(&big, big_seq, true);
    let sustained = H200_BF16_DENSE_FLOPS * utilization;
    let originals = GENOME_CELLS;
    println!();
    println!(
        "genome-wide screen on one H200: {} cells x {} genes, cellxpert preset ({}), L = {} tokens",
        thousands(GENOME_CELLS),
        thousands(GENOME_GENES as f64),
        model_words(&big),
        thousands(big_seq as f64)
    );
    println!(
        "  FLOPs per sequence: projections {:.2} G + attention {:.2} G + router {:.3} G + experts {:.2} G + bin head {:.3} G \
         = {:.1} GFLOP (attention {:.0}%)",
        f.projections / 1e9,
        f.attention / 1e9,
        f.router / 1e9,
        f.experts / 1e9,
        f.bin_head / 1e9,
        f.total() / 1e9,
        100.0 * f.attention / f.total()
    );
    println!(
        "  assumed: H200 dense BF16 peak {:.0} TFLOP/s at {:.0}% utilization = {:.0} TFLOP/s sustained; {} originals \
         (1 per cell: a worker caches its cells' unperturbed forward across units)",
        H200_BF16_DENSE_FLOPS / 1e12,
        100.0 * utilization,
        sustained / 1e12,
        thousands(originals),
    );
    for (label, fraction) in [
        ("every gene perturbed", 1.0),
        (
            "expressed genes only (measured fraction of this plan)",
            expressed,
        ),
    ] {
        let perturbed = GENOME_CELLS * GENOME_GENES as f64 * fraction;
        let total = (perturbed + originals) * f.total();
        let seconds = total / sustained;
        println!(
            "  {label} ({:.1}%): {} perturbed + {} originals = {:.3e} FLOP -> {} ({:.0}x under Geneformer's ~{GENEFORMER_HOURS:.0} h \
             for {} cells on one GPU); at this CPU's {:.2} GFLOP/s per core: {}",
            100.0 * fraction,
            thousands(perturbed),
            thousands(originals),
            total,
            duration_words(seconds),
            GENEFORMER_HOURS * 3600.0 / seconds,
            thousands(GENOME_CELLS),
            cpu[0].flops_per_sequence / cpu[0].seconds_per_sequence / 1e9,
            duration_words(total / (cpu[0].flops_per_sequence / cpu[0].seconds_per_sequence)),
        );
    }
    println!(
        "  caveats: the expressed fraction is measured on this plan's {} genes of {} cells (a 4,096-gene vocabulary has \
         its own); Geneformer's figure is another model (its own size and rank-value sequences of up to 2,048 \
         expressed genes) on an older GPU, so the ratio compares screens, not kernels; the utilization is an \
         assumption, not a measurement (no GPU in this run)",
        thousands(plan.targets.len() as f64),
        thousands(plan.cells.len() as f64)
    );
}

/// The plan's single genes (a benchmarked plan has nothing else).
fn single_genes(plan: &ScreenPlan) -> Vec<u32> {
    plan.targets.iter().map(|t| t.genes[0]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_lines_parse_and_others_do_not() {
        assert_eq!(
            unit_line("screen screen-17 unit 3/36: 256 pairs in 1.10s (233 pairs/s)"),
            Some((256, 1.10))
        );
        assert_eq!(
            unit_line("screen s unit 0/8: 73 pairs in 1.40s (52 pairs/s) (not recorded: late)"),
            Some((73, 1.40))
        );
        assert_eq!(
            unit_line("screen s: loaded knockout of 256 genes in 0.02s"),
            None
        );
        assert_eq!(unit_line("unit 4 lease lost: expired"), None);
    }

    #[test]
    fn worker_counts_double_up_to_the_maximum() {
        assert_eq!(worker_counts(1), vec![1]);
        assert_eq!(worker_counts(2), vec![1, 2]);
        assert_eq!(worker_counts(6), vec![1, 2, 4, 6]);
    }

    #[test]
    fn cellxpert_flops_match_the_hand_count() {
        let c = Preset::Cellxpert.config(4096, 50);
        let f = forward_flops(&c, 4097, true);
        let (l, d) = (4097.0, 512.0);
        assert_eq!(f.projections, 4.0 * 8.0 * l * d * d);
        assert_eq!(f.attention, 4.0 * 4.0 * l * l * d);
        assert_eq!(f.experts, 4.0 * 2.0 * 4.0 * l * d * 1024.0);
        assert_eq!(f.bin_head, 2.0 * 4096.0 * d * 50.0);
        assert!((f.total() / 1e9 - 241.0).abs() < 1.0, "{}", f.total());
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(1500.0), "1,500");
        assert_eq!(thousands(6_144_000.0), "6,144,000");
        assert_eq!(thousands(-12345.0), "-12,345");
    }
}
