//! Checkpointed pretraining: what a checkpoint holds, taking it on the training thread, saving it in the
//! background, and restoring it. The storage protocol (objects, manifest, `latest`) is
//! `cellfleet_shared::checkpoint`; this module decides the contents.
//!
//! A checkpoint of step `s` (optimizer steps completed) has three objects:
//! - `model.safetensors`: every parameter, under the names of `model.safetensors` in a model directory;
//! - `optimizer.safetensors`: AdamW's moments as `exp_avg.<param>` and `exp_avg_sq.<param>`;
//! - `state.json` ([`TrainState`]): AdamW's step, the schedule, the data cursor and epoch, the RNG scheme,
//!   the run config, model config and vocabulary, the corpus manifest's hash, world size and generation.
//!
//! Randomness needs no saved generator state: torch's generator is reseeded from (seed, step, rank) at
//! every step ([`step_seed`]) and the loader's masks and permutations are Philox streams keyed by sample,
//! so the seed recorded in the state determines every random draw after the checkpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use cellfleet_shared::checkpoint::safetensors::{self, TensorSpec};
use cellfleet_shared::checkpoint::{
    step_folder, CheckpointManifest, Checkpoints, Problem, WriteOptions,
};
use cellfleet_shared::storage::{S3Options, Store};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::{CellModel, ModelConfig};
use crate::train::config::TrainConfig;
use crate::train::optim::{AdamW, Schedule};
use cellfleet_coordinator::spec::CheckpointSpec;

pub const MODEL_OBJECT: &str = "model.safetensors";
pub const OPTIMIZER_OBJECT: &str = "optimizer.safetensors";
pub const STATE_OBJECT: &str = "state.json";
pub const STATE_FORMAT: &str = "cellfleet-train-state/1";
/// How randomness is derived (see the module docs); a future scheme would not resume exactly.
pub const RNG_SCHEME: &str = "torch reseeded per step from (seed, step, rank); Philox per sample";

/// Everything besides tensors that a resumed run needs, and what identifies the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub format: String,
    /// Optimizer steps completed; training continues with step `step + 1`.
    pub step: u64,
    /// AdamW's update count (its bias correction).
    pub optimizer_step: u64,
    /// The global data cursor where step `step + 1` starts: epoch and position in its sample order.
    pub epoch: u32,
    pub position: u64,
    /// Training samples per epoch (the cursor's modulus).
    pub epoch_len: u64,
    pub schedule: Schedule,
    /// The learning rate of the next step.
    pub next_lr: f64,
    pub rng_scheme: String,
    pub config: TrainConfig,
    pub model: ModelConfig,
    pub genes: Vec<String>,
    pub corpus_url: String,
    /// blake3 of the corpus manifest (a resumed run must read the same corpus).
    pub corpus_manifest_blake3: String,
    pub world_size: u32,
    pub generation: u64,
    pub saved_unix_ms: u64,
}

fn safetensors_dtype(kind: Kind) -> anyhow::Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::Double => "F64",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        other => bail!("tensors of kind {other:?} cannot be checkpointed"),
    })
}

fn tch_kind(dtype: &str) -> anyhow::Result<Kind> {
    Ok(match dtype {
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        other => bail!("safetensors dtype {other} is not supported"),
    })
}

/// Serializes named tensors into a safetensors file image: one copy from tensor memory (after a device
/// transfer for GPU tensors) straight into the image.
pub fn safetensors_image(tensors: &[(String, &Tensor)]) -> anyhow::Result<Vec<u8>> {
    let shapes: Vec<Vec<usize>> = tensors
        .iter()
        .map(|(_, t)| t.size().iter().map(|&d| d as usize).collect())
        .collect();
    let dtypes = tensors
        .iter()
        .map(|(_, t)| safetensors_dtype(t.kind()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let specs: Vec<TensorSpec<'_>> = tensors
        .iter()
        .zip(&shapes)
        .zip(&dtypes)
        .map(|(((name, _), shape), dtype)| TensorSpec { name, dtype, shape })
        .collect();
    let (mut image, ranges) = safetensors::layout(&specs, &BTreeMap::new())?;
    for ((_, tensor), range) in tensors.iter().zip(ranges) {
        let host = tensor.to_device(Device::Cpu).contiguous();
        let numel = host.numel();
        host.f_copy_data_u8(&mut image[range], numel)?;
    }
    Ok(image)
}

/// Tensors (on the CPU) from a safetensors file image; `what` names it in errors.
pub fn tensors_from_image(image: &[u8], what: &str) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let (infos, _) = safetensors::parse(image, what)?;
    let mut tensors = BTreeMap::new();
    for info in infos {
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let kind = tch_kind(&info.dtype).with_context(|| format!("{what}: {}", info.name))?;
        tensors.insert(
            info.name,
            Tensor::f_from_data_size(&image[info.data], &shape, kind)?,
        );
    }
    Ok(tensors)
}

/// A checkpoint taken on the training thread: file images that no longer share memory with the model.
pub struct Snapshot {
    pub state: TrainState,
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
}

impl Snapshot {
    /// Copies the parameters and moments (the only blocking part of a save).
    pub fn take(model: &CellModel, optimizer: &AdamW, state: TrainState) -> anyhow::Result<Self> {
        let params = model.named_parameters();
        let named: Vec<(String, &Tensor)> = params.iter().map(|(n, t)| (n.clone(), t)).collect();
        let mut moments = Vec::with_capacity(2 * optimizer.moments.len());
        for m in &optimizer.moments {
            moments.push((format!("exp_avg.{}", m.name), &m.exp_avg));
            moments.push((format!("exp_avg_sq.{}", m.name), &m.exp_avg_sq));
        }
        Ok(Self {
            state,
            model: safetensors_image(&named)?,
            optimizer: safetensors_image(&moments)?,
        })
    }

    pub fn bytes(&self) -> usize {
        self.model.len() + self.optimizer.len()
    }
}

/// Why a checkpoint could not be restored. Callers decide by the variant: an unusable checkpoint can be
/// replaced by an older one, any other failure cannot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// An object fails its manifest's size or hash check, or is missing (`context` says where it was
    /// being read for).
    #[error("{context}{problem}")]
    Unusable { problem: Problem, context: String },
    /// Displays the whole chain itself, so it names no source (a reporter printing sources too would
    /// print every cause twice).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for RestoreError {
    fn from(e: anyhow::Error) -> Self {
        RestoreError::Failed(e)
    }
}

impl From<cellfleet_shared::Error> for RestoreError {
    fn from(e: cellfleet_shared::Error) -> Self {
        RestoreError::Failed(e.into())
    }
}

impl RestoreError {
    pub fn unusable(problem: Problem) -> Self {
        RestoreError::Unusable {
            problem,
            context: String::new(),
        }
    }

    /// Prefixes the message with `context` (as `anyhow`'s context would), keeping the variant.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        match self {
            RestoreError::Unusable {
                problem,
                context: c,
            } => RestoreError::Unusable {
                problem,
                context: format!("{context}: {c}"),
            },
            RestoreError::Failed(e) => RestoreError::Failed(e.context(context.to_string())),
        }
    }
}

/// Reads object `name`, size- and hash-checked.
fn read_object(
    checkpoints: &Checkpoints,
    manifest: &CheckpointManifest,
    name: &str,
) -> Result<Vec<u8>, RestoreError> {
    checkpoints
        .read(manifest, name)?
        .map_err(RestoreError::unusable)
}

/// Reads (and verifies) only the state object of a checkpoint: its settings and position.
pub fn read_state(
    checkpoints: &Checkpoints,
    manifest: &CheckpointManifest,
) -> Result<TrainState, RestoreError> {
    let bytes = read_object(checkpoints, manifest, STATE_OBJECT)?;
    let state: TrainState = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}/{}/{STATE_OBJECT} is unreadable",
            checkpoints.url().trim_end_matches('/'),
            step_folder(manifest.step)
        )
    })?;
    if state.format != STATE_FORMAT || state.step != manifest.step {
        return Err(anyhow::anyhow!(
            "{}/{}/{STATE_OBJECT} is format {:?} of step {}, expected {STATE_FORMAT:?} of step {}",
            checkpoints.url().trim_end_matches('/'),
            step_folder(manifest.step),
            state.format,
            state.step,
            manifest.step
        )
        .into());
    }
    Ok(state)
}

/// A checkpoint read back and verified.
pub struct Restored {
    /// The run location it came from.
    pub url: String,
    pub state: TrainState,
    pub params: BTreeMap<String, Tensor>,
    pub moments: BTreeMap<String, Tensor>,
}

impl Restored {
    /// Reads checkpoint `manifest.step` of `checkpoints`: every object's size and hash is checked first.
    pub fn read(
        checkpoints: &Checkpoints,
        manifest: &CheckpointManifest,
    ) -> Result<Self, RestoreError> {
        let object = |name: &str| read_object(checkpoints, manifest, name);
        let what = |name: &str| {
            format!(
                "{}/{}/{name}",
                checkpoints.url().trim_end_matches('/'),
                step_folder(manifest.step)
            )
        };
        let state = read_state(checkpoints, manifest)?;
        Ok(Self {
            url: checkpoints.url().to_string(),
            params: tensors_from_image(&object(MODEL_OBJECT)?, &what(MODEL_OBJECT))?,
            moments: tensors_from_image(&object(OPTIMIZER_OBJECT)?, &what(OPTIMIZER_OBJECT))?,
            state,
        })
    }

    /// Checks that this checkpoint continues the run `config` describes on `corpus_hash`.
    pub fn check_run(&self, config: &TrainConfig, corpus_hash: &str) -> anyhow::Result<()> {
        if self.state.corpus_manifest_blake3 != corpus_hash {
            bail!(
                "checkpoint step {} was trained on corpus {} (manifest {}), but this corpus's manifest is {}: resume on the same corpus",
                self.state.step,
                self.state.corpus_url,
                short(&self.state.corpus_manifest_blake3),
                short(corpus_hash)
            );
        }
        let differences = config_differences(&self.state.config, config);
        if !differences.is_empty() {
            bail!(
                "checkpoint step {} was trained with a different configuration ({}); resume with the checkpoint's settings (drop the flags) or start a new run",
                self.state.step,
                differences.join(", ")
            );
        }
        Ok(())
    }

    /// Copies the parameters into `model` and the moments and step into `optimizer`; every tensor must be
    /// present with the same shape.
    pub fn apply(&self, model: &CellModel, optimizer: &mut AdamW) -> anyhow::Result<()> {
        let copy = |what: &str, into: &Tensor, from: Option<&Tensor>| -> anyhow::Result<()> {
            let from = from.with_context(|| {
                format!("checkpoint step {} has no tensor {what}", self.state.step)
            })?;
            if from.size() != into.size() {
                bail!(
                    "checkpoint tensor {what} has shape {:?}, the model expects {:?}",
                    from.size(),
                    into.size()
                );
            }
            tch::no_grad(|| into.shallow_clone().copy_(from));
            Ok(())
        };
        let params = model.named_parameters();
        if params.len() != self.params.len() {
            bail!(
                "checkpoint step {} has {} parameter tensors, the model {}",
                self.state.step,
                self.params.len(),
                params.len()
            );
        }
        for (name, param) in &params {
            copy(name, param, self.params.get(name))?;
        }
        for m in &optimizer.moments {
            let avg = format!("exp_avg.{}", m.name);
            copy(&avg, &m.exp_avg, self.moments.get(&avg))?;
            let sq = format!("exp_avg_sq.{}", m.name);
            copy(&sq, &m.exp_avg_sq, self.moments.get(&sq))?;
        }
        optimizer.step = self.state.optimizer_step;
        Ok(())
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Top-level keys (dotted for nested ones) whose values differ, as `key: old -> new`, ignoring settings
/// that do not change the trajectory (loader threads).
pub fn config_differences(saved: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for key in keys {
                    let null = serde_json::Value::Null;
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(
                        &path,
                        x.get(key).unwrap_or(&null),
                        y.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{prefix}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut saved = serde_json::to_value(saved).expect("plain");
    let mut now = serde_json::to_value(now).expect("plain");
    for v in [&mut saved, &mut now] {
        if let Some(map) = v.as_object_mut() {
            map.remove("loader_threads");
        }
    }
    let mut out = Vec::new();
    walk("", &saved, &now, &mut out);
    out
}

/// What `--resume` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeTarget {
    /// The newest valid checkpoint of the run's checkpoint location.
    Latest,
    /// That step of the run's checkpoint location.
    Step(u64),
    /// A run location (its newest valid checkpoint) or one checkpoint (`.../step-000000000100`).
    Url(String),
}

impl std::str::FromStr for ResumeTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "latest" {
            return Ok(Self::Latest);
        }
        if let Ok(step) = s.parse::<u64>() {
            return Ok(Self::Step(step));
        }
        if s.is_empty() {
            return Err("expected latest, a step number, or a checkpoint URL".into());
        }
        Ok(Self::Url(s.to_string()))
    }
}

impl ResumeTarget {
    /// The run location and (for a step) the step it names; `run` is `--checkpoint`, needed for `latest`
    /// and a bare step.
    pub fn location(&self, run: Option<&str>) -> anyhow::Result<(String, Option<u64>)> {
        let step = match self {
            ResumeTarget::Url(url) => return Ok(split_step_url(url)),
            ResumeTarget::Step(step) => Some(*step),
            ResumeTarget::Latest => None,
        };
        let Some(run) = run else {
            bail!("--resume latest or STEP needs --checkpoint URL (where the run's checkpoints are); or pass the checkpoint URL to --resume");
        };
        Ok((run.trim_end_matches('/').to_string(), step))
    }
}

/// Splits `RUN/step-000000000100` into the run location and the step; any other URL is a run location.
pub fn split_step_url(url: &str) -> (String, Option<u64>) {
    let trimmed = url.trim_end_matches('/');
    if let Some((run, last)) = trimmed.rsplit_once('/') {
        if let Some(step) = last
            .strip_prefix("step-")
            .filter(|d| d.len() == 12)
            .and_then(|d| d.parse().ok())
        {
            return (run.to_string(), Some(step));
        }
    }
    (trimmed.to_string(), None)
}

/// Opens the checkpoints of an existing run for reading: a local location that does not exist is an
/// error (opening it for writing would create it).
pub fn open_existing_run(url: &str, s3: &S3Options) -> anyhow::Result<Checkpoints> {
    if !url.contains("://") || url.starts_with("file://") {
        let path = url.strip_prefix("file://").unwrap_or(url);
        if !std::path::Path::new(path).is_dir() {
            bail!("no checkpoints at {url}: the directory does not exist");
        }
    }
    open_run(url, s3)
}

/// Opens the checkpoints of the run at `url` (a local directory is created when missing).
pub fn open_run(url: &str, s3: &S3Options) -> anyhow::Result<Checkpoints> {
    Ok(Checkpoints::new(Store::open(url, s3).with_context(
        || format!("cannot open checkpoint location {url}"),
    )?))
}

/// Finds the checkpoint `target` names (the run location `run` for `latest` and a step) and verifies it.
/// A broken newest checkpoint is reported on stderr and the previous valid one used; a named step that
/// does not verify is an error naming the object at fault.
pub fn resolve(
    target: &ResumeTarget,
    run: Option<&str>,
    s3: &S3Options,
) -> anyhow::Result<(Checkpoints, CheckpointManifest)> {
    let (url, step) = target.location(run)?;
    let checkpoints = open_existing_run(&url, s3)?;
    match step {
        Some(step) => {
            let manifest = named_step(&checkpoints, &url, step)?;
            let problems = checkpoints.verify(step)?;
            if let Some(first) = problems.first() {
                bail!(
                    "cannot resume from {url}: {first}{}",
                    if problems.len() > 1 {
                        format!(" (and {} more problems)", problems.len() - 1)
                    } else {
                        String::new()
                    }
                );
            }
            Ok((checkpoints, manifest))
        }
        None => {
            let (newest, skipped) = checkpoints.newest_valid()?;
            report_skipped(&skipped);
            match newest {
                Some(manifest) => Ok((checkpoints, manifest)),
                None if skipped.is_empty() => bail!("no checkpoint in {url}"),
                None => bail!("no valid checkpoint in {url} (every one has a problem, see above)"),
            }
        }
    }
}

/// Reads the checkpoint `target` names, downloading each object once: every object is size- and
/// hash-checked before use. For `latest` (or a run URL) a broken newest checkpoint is reported on stderr
/// and the previous one tried; a named step that does not verify is an error naming the object at fault.
pub fn restore(
    target: &ResumeTarget,
    run: Option<&str>,
    s3: &S3Options,
) -> Result<Restored, RestoreError> {
    let (url, step) = target.location(run)?;
    let checkpoints = open_existing_run(&url, s3)?;
    if let Some(step) = step {
        let manifest = named_step(&checkpoints, &url, step)?;
        return Restored::read(&checkpoints, &manifest)
            .map_err(|e| e.context(format!("cannot resume from {url}")));
    }
    let mut skipped = 0;
    for step in checkpoints.committed_steps()? {
        let problem = match checkpoints.manifest(step)? {
            Ok(manifest) => match Restored::read(&checkpoints, &manifest) {
                Ok(restored) => return Ok(restored),
                Err(RestoreError::Unusable { problem, .. }) => problem,
                Err(failed) => return Err(failed),
            },
            Err(problem) => problem,
        };
        skipped += 1;
        report_skipped(std::slice::from_ref(&problem));
    }
    if skipped == 0 {
        return Err(anyhow::anyhow!("no checkpoint in {url}").into());
    }
    Err(anyhow::anyhow!("no valid checkpoint in {url} (every one has a problem, see above)").into())
}

/// The manifest of a step named explicitly; a step that does not exist is named with the ones that do.
fn named_step(
    checkpoints: &Checkpoints,
    url: &str,
    step: u64,
) -> Result<CheckpointManifest, RestoreError> {
    match checkpoints.manifest(step)? {
        Ok(manifest) => Ok(manifest),
        Err(problem) => {
            let steps = checkpoints.steps()?;
            if steps.contains(&step) {
                return Err(
                    RestoreError::unusable(problem).context(format!("cannot resume from {url}"))
                );
            }
            let listed: Vec<String> = checkpoints
                .committed_steps()?
                .iter()
                .rev()
                .map(u64::to_string)
                .collect();
            Err(anyhow::anyhow!(
                "there is no checkpoint of step {step} in {url} (committed steps: {})",
                if listed.is_empty() {
                    "none".to_string()
                } else {
                    listed.join(", ")
                }
            )
            .into())
        }
    }
}

fn report_skipped(skipped: &[Problem]) {
    for problem in skipped {
        eprintln!("warning: skipping {problem}");
    }
}

/// The run's checkpointing settings as the training loop uses them.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// Steps between saves (0: only at the end).
    pub every: u64,
    pub keep_last: usize,
    pub keep_every: u64,
    pub write: WriteOptions,
}

impl CheckpointPolicy {
    /// The policy of a job's checkpoint settings.
    pub fn of(spec: &CheckpointSpec) -> Self {
        Self {
            every: spec.every,
            keep_last: spec.keep_last as usize,
            keep_every: spec.keep_every,
            write: WriteOptions {
                max_bytes_per_sec: spec.max_upload_bytes_per_sec,
                ..WriteOptions::default()
            },
        }
    }
}

/// Asked after a checkpoint's manifest is stored: may this writer move `latest`? (Cluster mode: the
/// coordinator records the checkpoint with a compare-and-swap if the generation is still current.)
pub type CommitGate = Arc<dyn Fn(&CheckpointManifest) -> anyhow::Result<bool> + Send + Sync>;

/// The outcome of one background save.
#[derive(Debug, Clone)]
pub struct SaveReport {
    pub step: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub seconds: f64,
    /// False: the manifest was written but the commit gate refused to move `latest` (superseded).
    pub committed: bool,
    pub retired: Vec<u64>,
}

/// Counters a run reports at the end (and the checkpoint benchmark reads).
#[derive(Debug, Clone, Default)]
pub struct SaveStats {
    pub saved: u64,
    pub failed: u64,
    /// Saves due while the previous one was still uploading (skipped to bound memory).
    pub skipped: u64,
    /// Seconds the training thread spent taking snapshots, and the longest one.
    pub stall_seconds: f64,
    pub max_stall_seconds: f64,
}

/// Saves checkpoints in the background: at most one save in flight, so memory holds at most one snapshot.
/// Dropping the writer waits for the save in flight: a superseded generation's save must end before its
/// worker starts the next generation (it stops before writing its manifest).
pub struct CheckpointWriter {
    checkpoints: Arc<Checkpoints>,
    pub policy: CheckpointPolicy,
    gate: Option<CommitGate>,
    /// Set when this writer's generation is superseded: a save in flight then stops before its manifest.
    abort: Option<Arc<AtomicBool>>,
    in_flight: Option<(u64, JoinHandle<anyhow::Result<SaveReport>>)>,
    pub stats: SaveStats,
}

impl CheckpointWriter {
    pub fn new(
        checkpoints: Checkpoints,
        policy: CheckpointPolicy,
        gate: Option<CommitGate>,
        abort: Option<Arc<AtomicBool>>,
    ) -> Self {
        Self {
            checkpoints: Arc::new(checkpoints),
            policy,
            gate,
            abort,
            in_flight: None,
            stats: SaveStats::default(),
        }
    }

    pub fn url(&self) -> &str {
        self.checkpoints.url()
    }

    /// Whether a periodic save is due after `step` steps.
    pub fn due(&self, step: u64) -> bool {
        self.policy.every > 0 && step.is_multiple_of(self.policy.every)
    }

    /// True while a save is uploading; a finished one is collected (and logged) first.
    pub fn busy(&mut self) -> bool {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|(_, handle)| handle.is_finished())
        {
            let _ = self.collect();
        }
        self.in_flight.is_some()
    }

    /// Waits for the save in flight, if any; returns its error.
    pub fn wait(&mut self) -> anyhow::Result<()> {
        self.collect()
    }

    fn collect(&mut self) -> anyhow::Result<()> {
        let Some((step, handle)) = self.in_flight.take() else {
            return Ok(());
        };
        let outcome = handle
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the save thread panicked")));
        match outcome {
            Ok(report) => {
                self.stats.saved += u64::from(report.committed);
                let rate = report.raw_bytes as f64 / 1e6 / report.seconds.max(1e-9);
                if report.committed {
                    let m = &crate::metrics::CHECKPOINT;
                    m.save_seconds.observe(report.seconds);
                    m.stored_bytes.add(report.stored_bytes as f64);
                    m.raw_bytes.add(report.raw_bytes as f64);
                    eprintln!(
                        "checkpoint step {} saved to {} ({:.1} MB, {:.1} MB stored, {:.2} s, {rate:.0} MB/s){}",
                        report.step,
                        self.url(),
                        report.raw_bytes as f64 / 1e6,
                        report.stored_bytes as f64 / 1e6,
                        report.seconds,
                        if report.retired.is_empty() {
                            String::new()
                        } else {
                            format!("; retired {:?}", report.retired)
                        }
                    );
                } else {
                    eprintln!(
                        "checkpoint step {} stored but not committed (this generation was superseded)",
                        report.step
                    );
                }
                Ok(())
            }
            Err(e) => {
                self.stats.failed += 1;
                eprintln!(
                    "warning: checkpoint step {step} failed: {e:#}; the next save tries again"
                );
                Err(e.context(format!("checkpoint step {step}")))
            }
        }
    }

    /// Starts saving `snapshot` in the background (the caller checked `busy()`).
    /// Starts saving `snapshot` in the background (the caller checked `busy()`), trying up to `attempts`
    /// times: periodic saves try once (the next one comes soon), the final one retries an unreachable
    /// store with a growing pause.
    pub fn start(&mut self, snapshot: Snapshot, stall_seconds: f64, attempts: u32) {
        self.stats.stall_seconds += stall_seconds;
        self.stats.max_stall_seconds = self.stats.max_stall_seconds.max(stall_seconds);
        let step = snapshot.state.step;
        let checkpoints = self.checkpoints.clone();
        let policy = self.policy.clone();
        let gate = self.gate.clone();
        let abort = self.abort.clone();
        let handle = std::thread::Builder::new()
            .name(format!("checkpoint-{step}"))
            .spawn(move || {
                let mut attempt = 1;
                loop {
                    match save(&checkpoints, &snapshot, &policy, gate.clone(), abort.clone()) {
                        Err(e)
                            if attempt < attempts
                                && !abort.as_ref().is_some_and(|a| a.load(Ordering::Relaxed)) =>
                        {
                            let pause = Duration::from_secs(2u64 << attempt.min(5));
                            eprintln!(
                                "warning: checkpoint step {step} attempt {attempt} of {attempts} failed: {e:#}; retrying in {}s",
                                pause.as_secs()
                            );
                            std::thread::sleep(pause);
                            attempt += 1;
                        }
                        outcome => return outcome,
                    }
                }
            })
            .expect("cannot spawn a thread");
        self.in_flight = Some((step, handle));
    }

    /// Notes a due save that was skipped because the previous one is still uploading.
    pub fn skip(&mut self, step: u64) {
        self.stats.skipped += 1;
        let uploading = self.in_flight.as_ref().map_or(0, |(s, _)| *s);
        eprintln!(
            "checkpoint step {step} skipped: step {uploading} is still uploading (save less often with --checkpoint-every, or raise --upload-limit)"
        );
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        let _ = self.collect();
    }
}

fn save(
    checkpoints: &Checkpoints,
    snapshot: &Snapshot,
    policy: &CheckpointPolicy,
    gate: Option<CommitGate>,
    abort: Option<Arc<AtomicBool>>,
) -> anyhow::Result<SaveReport> {
    let started = Instant::now();
    let step = snapshot.state.step;
    let state = serde_json::to_vec_pretty(&snapshot.state)?;
    let objects: [(&str, &[u8]); 3] = [
        (MODEL_OBJECT, &snapshot.model),
        (OPTIMIZER_OBJECT, &snapshot.optimizer),
        (STATE_OBJECT, &state),
    ];
    let entries = checkpoints.write_objects(step, &objects, &policy.write)?;
    if abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
        bail!("the generation was superseded before the manifest was written");
    }
    let meta = serde_json::json!({
        "step": step,
        "epoch": snapshot.state.epoch,
        "position": snapshot.state.position,
        "world_size": snapshot.state.world_size,
        "generation": snapshot.state.generation,
        "corpus": snapshot.state.corpus_url,
        "corpus_manifest_blake3": snapshot.state.corpus_manifest_blake3,
        "preset": snapshot.state.config.preset,
        "steps": snapshot.state.config.steps,
        "seed": snapshot.state.config.seed,
        "saved_unix_ms": snapshot.state.saved_unix_ms,
    });
    let manifest = checkpoints.write_manifest(step, entries, meta)?;
    let committed = match &gate {
        Some(gate) => gate(&manifest)?,
        None => true,
    };
    let mut retired = Vec::new();
    if committed {
        checkpoints.move_latest(step)?;
        retired = checkpoints.retain(policy.keep_last, policy.keep_every)?;
    }
    Ok(SaveReport {
        step,
        raw_bytes: manifest.objects.iter().map(|o| o.raw_bytes).sum(),
        stored_bytes: manifest.stored_bytes(),
        seconds: started.elapsed().as_secs_f64(),
        committed,
        retired,
    })
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::step_seed;
    use cellfleet_shared::ids::Rank;

    #[test]
    fn images_round_trip_tensors_bit_for_bit() {
        let a = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::arange(7, (Kind::Int64, Device::Cpu));
        let image = safetensors_image(&[("a".into(), &a), ("b.c".into(), &b)]).unwrap();
        let back = tensors_from_image(&image, "test").unwrap();
        assert!(back["a"].equal(&a));
        assert!(back["b.c"].equal(&b));
    }

    #[test]
    fn step_urls_split_and_resume_targets_parse() {
        assert_eq!(
            split_step_url("s3://b/run/step-000000000100/"),
            ("s3://b/run".to_string(), Some(100))
        );
        assert_eq!(split_step_url("/tmp/run"), ("/tmp/run".to_string(), None));
        assert_eq!("latest".parse(), Ok(ResumeTarget::Latest));
        assert_eq!("40".parse(), Ok(ResumeTarget::Step(40)));
        assert_eq!("s3://b/r".parse(), Ok(ResumeTarget::Url("s3://b/r".into())));
    }

    #[test]
    fn config_differences_name_the_keys_and_ignore_loader_threads() {
        let a = TrainConfig::default();
        let mut b = a.clone();
        b.loader_threads = 4;
        assert!(config_differences(&a, &b).is_empty());
        b.steps = 7;
        b.optimizer.beta2 = 0.5;
        let diff = config_differences(&a, &b);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff.iter().any(|d| d.starts_with("steps: 1000 -> 7")));
        assert!(diff.iter().any(|d| d.starts_with("optimizer.beta2")));
        assert_ne!(step_seed(1, 2, Rank(0)), step_seed(1, 3, Rank(0)));
        assert!(step_seed(u64::MAX, 9, Rank(1)) >= 0);
    }
}
