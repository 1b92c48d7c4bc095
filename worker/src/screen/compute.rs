//! Computing one work unit: the `Screener` holds a checkpoint's model, the screened cells and the goal
//! states' centroids, and turns a unit (targets x cells) into a `UnitResult`.
//!
//! A target's own genes count on neither side of any shift: in the expected-expression readout their
//! coordinates are left out of the perturbed and the original profile alike, in the mean readout their
//! token states are left out of both means. Otherwise a knocked-out gene that is high in the screened
//! cells and low in the goal cells would move every cell toward the goal by construction, through its
//! own coordinate falling to zero, whatever the model learned. The `[CLS]` state has no coordinate of its
//! own to leave out: it reads the whole cell, perturbed genes included.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context};
use cellfleet_shared::checkpoint::Checkpoints;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::screen::{
    measure_len, ClassifierId, PerturbationKind, Readout, ScreenPlan, ScreenSpec, Target,
    TargetKind, UnitClasses, UnitExpression, UnitResult,
};
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::batch::{SequenceLayout, TokenLayout};
use tch::{Device, Kind, Tensor};

use super::plan::{manifest_blake3, read_cells};
use crate::model::{CellModel, Mode, Tokens};
use crate::train::checkpoint_state::{
    open_existing_run, read_state, tensors_from_image, MODEL_OBJECT,
};
use crate::train::saved_model::{ModelInfo, INFO_FILE, WEIGHTS_FILE};

/// Loads the plan's checkpoint weights (only the model object) after checking its manifest's hash.
pub fn load_model(plan: &ScreenPlan, s3: &S3Options, device: Device) -> anyhow::Result<CellModel> {
    if let Some(classifier) = &plan.classifier {
        return load_classifier(classifier, s3, device);
    }
    let id = &plan.checkpoint;
    let checkpoints: Checkpoints = open_existing_run(&id.url, s3)?;
    let manifest = checkpoints.manifest(id.step)?.map_err(|p| anyhow!("{p}"))?;
    let hash = manifest_blake3(&manifest)?;
    if hash != id.manifest_blake3 {
        bail!(
            "checkpoint {} step {}: manifest blake3 {hash}, the screen was planned with {} (overwritten since)",
            id.url,
            id.step,
            id.manifest_blake3
        );
    }
    let state = read_state(&checkpoints, &manifest)?;
    let image = checkpoints
        .read(&manifest, MODEL_OBJECT)?
        .map_err(|p| anyhow!("{p}"))?;
    let tensors = tensors_from_image(&image, &format!("{}/{MODEL_OBJECT}", id.url))?;
    let model = CellModel::new(state.model.clone(), device)?;
    copy_parameters(&model, &tensors, &format!("checkpoint step {}", id.step))?;
    Ok(model)
}

/// Loads a transitions screen's classifier (the whole fine-tuned network) after checking its weights'
/// hash against the plan's.
fn load_classifier(id: &ClassifierId, s3: &S3Options, device: Device) -> anyhow::Result<CellModel> {
    Ok(load_classifier_at(&id.url, Some(&id.weights_blake3), s3, device)?.0)
}

/// Loads the fine-tuned model at `location` (`model.json` and `model.safetensors`), checking the
/// weights' blake3 against `expected` when given.
pub fn load_classifier_at(
    location: &str,
    expected: Option<&str>,
    s3: &S3Options,
    device: Device,
) -> anyhow::Result<(CellModel, ModelInfo)> {
    let store = cellfleet_shared::storage::Store::open(location, s3)
        .with_context(|| format!("cannot open the classifier at {location}"))?;
    let info: ModelInfo = serde_json::from_slice(&store.get(INFO_FILE)?)
        .with_context(|| format!("{location}/{INFO_FILE} is not a cellfleet model description"))?;
    let weights = store.get(WEIGHTS_FILE)?;
    let hash = blake3::hash(&weights).to_hex().to_string();
    if let Some(expected) = expected.filter(|e| **e != hash) {
        bail!(
            "classifier {location}: {WEIGHTS_FILE} has blake3 {hash}, the screen was planned with {expected} (overwritten since)"
        );
    }
    let tensors = tensors_from_image(&weights, &format!("{location}/{WEIGHTS_FILE}"))?;
    let model = CellModel::new(info.config.clone(), device)?;
    copy_parameters(&model, &tensors, &format!("classifier {location}"))?;
    Ok((model, info))
}

/// Copies every parameter of `model` from `tensors` (what `source` names), checking names and shapes.
fn copy_parameters(
    model: &CellModel,
    tensors: &std::collections::BTreeMap<String, Tensor>,
    source: &str,
) -> anyhow::Result<()> {
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, param) in model.named_parameters() {
            let value = tensors
                .get(&name)
                .with_context(|| format!("{source} has no tensor {name}"))?;
            if value.size() != param.size() {
                bail!(
                    "checkpoint tensor {name} has shape {:?}, the model expects {:?}",
                    value.size(),
                    param.size()
                );
            }
            param.shallow_clone().copy_(value);
        }
        Ok(())
    })
}

/// A loaded screen: the model, the plan, the perturbed cells' bins and the state centroids.
pub struct Screener {
    pub(super) model: CellModel,
    pub plan: ScreenPlan,
    pub(super) plan_blake3: String,
    pub(super) bins: HashMap<u64, Vec<u8>>,
    /// `[strata * states, dim]`: the centroid of each state within each stratum (one stratum without
    /// matching), unit length; row `stratum * states + state`.
    centroids: Option<Tensor>,
    /// `[strata * states, dim]`: the axis from the perturbed cells' centroid to each state's centroid
    /// (per stratum), divided by its squared length, so its dot product with a move is the fraction of
    /// the axis the move covers.
    axes: Option<Tensor>,
    /// Each perturbed cell unperturbed, once computed.
    originals: RefCell<HashMap<u64, Original>>,
    /// Bytes of readout-layer states the cells in `originals` keep (at most `STATE_CACHE_BYTES`).
    cached_state_bytes: Cell<usize>,
    /// Per screened cell (by corpus position): its stratum.
    pub(super) stratum_of: HashMap<u64, usize>,
    /// A steered screen's clamp levels, bin-space states and anchors.
    pub(super) steering: Option<super::steered::Steering>,
    layout: TokenLayout,
    /// The checkpoint's token layout, which decides the genes of each cell's sequence.
    sequence: SequenceLayout,
    /// Expressed layout with a goal: the goal genes every cell's sequence holds in place of the
    /// layout's random unexpressed sample (`query_genes`), ascending; empty otherwise.
    goal_genes: Vec<u32>,
}

/// A cell's unperturbed forward: its readout-layer `[CLS]` state or gene-state sum (`[d]`), its
/// expected bins in vocabulary order (0 for genes its sequence does not hold), and how many gene
/// tokens its sequence has.
struct Original {
    read: Tensor,
    expected: Vec<f32>,
    gene_tokens: usize,
    /// The genes of its sequence, ascending (expressed layout; empty in the full layout, which holds
    /// every gene).
    genes: Vec<u32>,
    /// Mean readout: its readout-layer gene-token states `[gene_tokens, d]`, kept while the cache is
    /// under `STATE_CACHE_BYTES` (a cell without them has its original recomputed per unit).
    states: Option<Tensor>,
    /// A transitions screen: the classifier's state probabilities (empty otherwise).
    classes: Vec<f32>,
}

/// How many bytes of unperturbed readout-layer states a worker keeps for the mean readout, which leaves
/// each target's own token state out of the original mean. With them cached, a cell's original forward
/// runs once per worker instead of once per target block. In the expressed layout a cell is a few hundred
/// tokens (about 0.8 MB at d 512), so a 1,500-cell screen fits; a full-layout cell at 4,096 genes is
/// about 8 MB, and cells past the budget fall back to recomputing.
const STATE_CACHE_BYTES: usize = 2 << 30;

/// Why a unit did not finish: stopped on purpose (its lease was lost, or the worker was told to stop;
/// nothing to report), or failed (reported against the unit).
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("unit interrupted")]
    Interrupted,
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl From<tch::TchError> for UnitError {
    fn from(e: tch::TchError) -> Self {
        UnitError::Failed(e.into())
    }
}

/// One perturbed sequence of a record: the genes it perturbs and where every vocabulary gene sits.
struct Variant {
    /// Index of its record in the batch.
    record: usize,
    ids: Vec<i64>,
    bins: Vec<i64>,
    /// Per vocabulary gene, its position among the sequence's gene tokens (`None`: deleted).
    at: Vec<Option<usize>>,
}

/// The perturbed token sequence of a cell with `bins` whose sequence holds the genes `sequence`
/// (ascending; every gene in the full layout) in which `perturbed` genes (ascending) are perturbed by
/// `kind`. In the expressed layout a knockout removes the gene's token, as a deletion does: a token at
/// bin 0 of an expressed gene is what the full layout shows, not something the expressed layout ever
/// holds.
fn perturbed_sequence(
    kind: PerturbationKind,
    layout: SequenceLayout,
    bins: &[u8],
    sequence: &[u32],
    perturbed: &[u32],
    cls_bin: i64,
    top_bin: i64,
) -> (Vec<i64>, Vec<i64>, Vec<Option<usize>>) {
    let n = bins.len();
    let is_perturbed = |j: usize| perturbed.binary_search(&(j as u32)).is_ok();
    let mut ids = vec![0i64];
    let mut input = vec![cls_bin];
    let mut at = vec![None; n];
    let kind = match (kind, layout) {
        (PerturbationKind::Knockout, SequenceLayout::Expressed { .. }) => PerturbationKind::Delete,
        (kind, _) => kind,
    };
    match kind {
        PerturbationKind::Knockout => {
            for &j in sequence {
                let j = j as usize;
                at[j] = Some(ids.len() - 1);
                ids.push(j as i64 + 1);
                input.push(if is_perturbed(j) {
                    0
                } else {
                    i64::from(bins[j])
                });
            }
        }
        PerturbationKind::Delete => {
            for &j in sequence {
                let j = j as usize;
                if !is_perturbed(j) {
                    at[j] = Some(ids.len() - 1);
                    ids.push(j as i64 + 1);
                    input.push(i64::from(bins[j]));
                }
            }
        }
        PerturbationKind::Overexpress => {
            for &g in perturbed {
                at[g as usize] = Some(ids.len() - 1);
                ids.push(i64::from(g) + 1);
                input.push(top_bin);
            }
            for &j in sequence {
                let j = j as usize;
                if !is_perturbed(j) {
                    at[j] = Some(ids.len() - 1);
                    ids.push(j as i64 + 1);
                    input.push(i64::from(bins[j]));
                }
            }
        }
    }
    (ids, input, at)
}

/// The expected-expression profiles a shift compares, in vocabulary order: `after` (the perturbed
/// sequence's expected bin per gene token, placed by `at`) and `before` (the original), with the
/// target's own genes `excluded` set to 0 on both sides.
fn expected_profiles(
    after: &[f32],
    before: &[f32],
    at: &[Option<usize>],
    excluded: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let mut perturbed = Vec::with_capacity(before.len());
    let mut original = Vec::with_capacity(before.len());
    for (j, &b) in before.iter().enumerate() {
        match at[j] {
            Some(position) if !excluded.contains(&(j as u32)) => {
                perturbed.push(after[position]);
                original.push(b);
            }
            _ => {
                perturbed.push(0.0);
                original.push(0.0);
            }
        }
    }
    (perturbed, original)
}

/// The mean of the gene-token states `[tokens, d]` without the tokens at `excluded` positions.
fn mean_without(states: &Tensor, excluded: &[usize]) -> Tensor {
    let tokens = states.size()[0];
    let mut sum = states.sum_dim_intlist(0, false, Kind::Float);
    for &position in excluded {
        sum -= states.get(position as i64);
    }
    sum / (tokens - excluded.len() as i64) as f64
}

/// Per row of `perturbed` and `original` (`[rows, dim]`): 1 - cos, and against the rows' states
/// (`targets`, unit-length centroids `[rows, states, dim]`, and `axes` `[rows, states, dim]`) the cosine
/// shift toward each and the progress along each axis; laid out like one `measure_len` block per row.
pub(super) fn measures(
    perturbed: &Tensor,
    original: &Tensor,
    states: Option<(&Tensor, &Tensor)>,
) -> Result<Vec<f32>, UnitError> {
    let rows = perturbed.size()[0] as usize;
    let cosine = Vec::<f32>::try_from(
        (Tensor::cosine_similarity(perturbed, original, 1, 1e-12).neg() + 1.0)
            .to_device(Device::Cpu),
    )?;
    let Some((targets, axes)) = states else {
        return Ok(cosine);
    };
    let n_states = targets.size()[1] as usize;
    let toward =
        |x: &Tensor| (unit_rows(x).unsqueeze(1) * targets).sum_dim_intlist(2, false, Kind::Float);
    let shift = Vec::<f32>::try_from(
        (toward(perturbed) - toward(original))
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )?;
    let progress = Vec::<f32>::try_from(
        ((perturbed - original).unsqueeze(1) * axes)
            .sum_dim_intlist(2, false, Kind::Float)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )?;
    let mut out = Vec::with_capacity(rows * measure_len(n_states));
    for r in 0..rows {
        out.push(cosine[r]);
        out.extend_from_slice(&shift[r * n_states..(r + 1) * n_states]);
        out.extend_from_slice(&progress[r * n_states..(r + 1) * n_states]);
    }
    Ok(out)
}

impl Screener {
    /// Loads everything a unit needs: once per worker and screen.
    pub fn load(
        plan: ScreenPlan,
        plan_blake3: &str,
        s3: &S3Options,
        device: Device,
    ) -> anyhow::Result<Self> {
        let model = load_model(&plan, s3, device)?;
        let corpus = Corpus::open(&plan.corpus_url, s3)?;
        if corpus.manifest.content_hash() != plan.corpus_manifest_blake3 {
            bail!(
                "corpus {} changed since the screen was planned (manifest hash differs)",
                plan.corpus_url
            );
        }
        if plan.readout_layer as usize > model.config.n_layers {
            bail!(
                "the plan reads layer {}, the checkpoint's model has {} layers",
                plan.readout_layer,
                model.config.n_layers
            );
        }
        let mut wanted = plan.cells.clone();
        for state in &plan.states {
            wanted.extend(&state.cells);
        }
        wanted.extend(&plan.anchor_cells);
        wanted.extend(&plan.references);
        let bins = read_cells(&corpus, &wanted)?;
        let layout = TokenLayout::new(plan.n_bins)?;
        let sequence = model.config.layout;
        let strata = plan.strata.len().max(1);
        let stratum_of = plan
            .cells
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, plan.cell_strata.get(i).map_or(0, |&s| s as usize)))
            .collect();
        let mut screener = Self {
            model,
            plan,
            plan_blake3: plan_blake3.to_string(),
            bins,
            centroids: None,
            axes: None,
            originals: RefCell::new(HashMap::new()),
            cached_state_bytes: Cell::new(0),
            stratum_of,
            layout,
            sequence,
            goal_genes: Vec::new(),
            steering: None,
        };
        if screener.plan.spec.steer.is_some() {
            // Steered cells are compared in bin space: no readout forwards to make.
            screener.steering = Some(super::steered::Steering::load(
                &screener.plan,
                &screener.bins,
                &screener.stratum_of,
                device,
            ));
            return Ok(screener);
        }
        if screener.plan.spec.attributes() {
            // Attribution reads each cell's bins and the classifier; no readout states to prepare.
            return Ok(screener);
        }
        if matches!(sequence, SequenceLayout::Expressed { .. }) {
            let wanted = screener.plan.spec.query_genes.unwrap_or(0) as usize;
            let states: Vec<&[u64]> = screener
                .plan
                .states
                .iter()
                .filter(|state| !screened_state(&screener.plan.spec, &state.name))
                .map(|state| state.cells.as_slice())
                .collect();
            screener.goal_genes = goal_genes(&screener.bins, &screener.plan.cells, &states, wanted);
        }
        if !screener.plan.states.is_empty() {
            let mut rows = Vec::with_capacity(strata * screener.plan.states.len());
            let mut axes = Vec::with_capacity(rows.capacity());
            for stratum in 0..strata {
                let screened: Vec<u64> = screener
                    .plan
                    .cells
                    .iter()
                    .copied()
                    .filter(|c| screener.stratum_of[c] == stratum)
                    .collect();
                let start = (!screened.is_empty()).then(|| screener.centroid(&screened));
                for state in &screener.plan.states {
                    let members: Vec<u64> = state
                        .cells
                        .iter()
                        .zip(
                            state
                                .strata
                                .iter()
                                .map(|&s| s as usize)
                                .chain(std::iter::repeat(0)),
                        )
                        .filter(|&(_, s)| s == stratum)
                        .map(|(&c, _)| c)
                        .collect();
                    // A stratum without screened cells needs no centroid (planning refuses a stratum
                    // that has screened cells but no cells of a state).
                    let (row, axis) = match (&start, members.is_empty()) {
                        (Some(start), false) => {
                            let row = screener.centroid(&members);
                            let axis = if screened_state(&screener.plan.spec, &state.name) {
                                // The screened cells' own state: no axis to progress along.
                                Tensor::full([row.size()[0]], f64::NAN, (Kind::Float, device))
                            } else {
                                let axis = &row - start;
                                let length2 = axis.dot(&axis).clamp_min(1e-12);
                                axis / length2
                            };
                            (row, axis)
                        }
                        _ => {
                            let zero = Tensor::zeros([screener.dim()], (Kind::Float, device));
                            (zero.shallow_clone(), zero)
                        }
                    };
                    rows.push(row);
                    axes.push(axis);
                }
            }
            screener.centroids = Some(unit_rows(&Tensor::stack(&rows, 0)));
            screener.axes = Some(Tensor::stack(&axes, 0));
        }
        Ok(screener)
    }

    /// The genes of `cell`'s sequence (ascending): in the expressed layout with goal genes, its
    /// expressed genes and the goal genes; otherwise the layout's own (every gene, or the expressed
    /// genes and the random unexpressed sample).
    fn cell_genes(&self, cell: u64) -> Vec<u32> {
        let bins = &self.bins[&cell];
        // Goal genes exist in the expressed layout alone.
        if self.goal_genes.is_empty() {
            return self.sequence.inference_genes(cell, bins);
        }
        let mut genes: Vec<u32> = (0..bins.len() as u32)
            .filter(|&g| bins[g as usize] != 0)
            .chain(self.goal_genes.iter().copied())
            .collect();
        genes.sort_unstable();
        genes.dedup();
        genes
    }

    /// The checkpoint's token layout.
    pub fn layout(&self) -> SequenceLayout {
        self.sequence
    }

    /// Drops every cached unperturbed forward (benchmarks time a screen from a cold cache).
    pub fn forget_originals(&self) {
        self.originals.borrow_mut().clear();
        self.cached_state_bytes.set(0);
    }

    fn n_genes(&self) -> usize {
        self.plan.vocabulary.len()
    }

    pub(super) fn device(&self) -> Device {
        self.model.device()
    }

    /// The size of a cell's representation.
    fn dim(&self) -> i64 {
        match self.plan.spec.readout {
            Readout::Expected => self.n_genes() as i64,
            Readout::Mean | Readout::Cls => self.model.config.d_model as i64,
        }
    }

    /// One forward of token rows `(gene ids, bins)`, padded to the longest: the expected bins of the
    /// gene tokens (row-major `[rows, longest - 1]`, on the CPU; row r's first `len_r - 1` are real)
    /// and the readout layer's states `[rows, longest, d]` (`[CLS]` included); for a transitions screen
    /// also the classifier's state probabilities (row-major `[rows, classes]`; empty otherwise).
    fn run(&self, rows: &[(&[i64], &[i64])]) -> Result<(Vec<f32>, Tensor, Vec<f32>), UnitError> {
        let longest = rows.iter().map(|r| r.0.len()).max().unwrap_or(1);
        let (mut ids, mut bins, mut valid) = (
            Vec::with_capacity(rows.len() * longest),
            Vec::with_capacity(rows.len() * longest),
            Vec::with_capacity(rows.len() * longest),
        );
        for (row_ids, row_bins) in rows {
            let pad = longest - row_ids.len();
            ids.extend_from_slice(row_ids);
            ids.extend(std::iter::repeat_n(0, pad));
            bins.extend_from_slice(row_bins);
            bins.extend(std::iter::repeat_n(i64::from(self.layout.mask_bin()), pad));
            valid.extend(std::iter::repeat_n(true, row_ids.len()));
            valid.extend(std::iter::repeat_n(false, pad));
        }
        let seq = longest as i64;
        let shape = [rows.len() as i64, seq];
        let to = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(self.device());
        let padded = valid.iter().any(|v| !v);
        let tokens = Tokens {
            gene_ids: to(&ids),
            bins: to(&bins),
            valid: padded.then(|| {
                Tensor::from_slice(&valid)
                    .view(shape)
                    .to_device(self.device())
            }),
        };
        let (forward, read) = tch::no_grad(|| {
            self.model
                .forward_reading(&tokens, Mode::EVAL, Some(self.plan.readout_layer as usize))
        });
        let expected = self.expected_bins(&forward.hidden.narrow(1, 1, seq - 1));
        let expected = Vec::<f32>::try_from(expected.to_device(Device::Cpu).flatten(0, -1))?;
        let classes = if self.plan.spec.transitions.is_some() {
            let logits = tch::no_grad(|| self.model.class_logits(&forward.hidden, false))
                .map_err(|e| UnitError::Failed(e.into()))?;
            Vec::<f32>::try_from(
                logits
                    .softmax(-1, Kind::Float)
                    .to_device(Device::Cpu)
                    .flatten(0, -1),
            )?
        } else {
            Vec::new()
        };
        Ok((
            expected,
            read.expect("the readout layer exists (checked at load)"),
            classes,
        ))
    }

    /// The unperturbed sequence of `cell`: (gene ids, bins, where each vocabulary gene sits).
    fn original_sequence(&self, cell: u64) -> (Vec<i64>, Vec<i64>, Vec<Option<usize>>) {
        let bins = &self.bins[&cell];
        perturbed_sequence(
            PerturbationKind::Delete,
            self.sequence,
            bins,
            &self.cell_genes(cell),
            &[],
            i64::from(self.layout.cls_bin()),
            0,
        )
    }

    /// Unperturbed forwards of `cells` (at most a batch): per cell its expected bins in vocabulary
    /// order (0 for genes its sequence lacks), its gene-token count and its state probabilities (a
    /// transitions screen; empty otherwise), and the readout states `[cells, longest, d]` with the
    /// gene-token validity `[cells, longest - 1]` (f32).
    #[allow(clippy::type_complexity)]
    fn original_forward(
        &self,
        cells: &[u64],
    ) -> Result<(Vec<(Vec<f32>, usize, Vec<f32>)>, Tensor, Tensor), UnitError> {
        let n = self.n_genes();
        let sequences: Vec<_> = cells.iter().map(|&c| self.original_sequence(c)).collect();
        let rows: Vec<(&[i64], &[i64])> = sequences
            .iter()
            .map(|(ids, bins, _)| (ids.as_slice(), bins.as_slice()))
            .collect();
        let (expected, read, classes) = self.run(&rows)?;
        let n_classes = classes.len() / cells.len().max(1);
        let stride = read.size()[1] as usize - 1;
        let mut profiles = Vec::with_capacity(cells.len());
        let mut valid = Vec::with_capacity(cells.len() * stride);
        for (r, (ids, _, at)) in sequences.iter().enumerate() {
            let row = &expected[r * stride..(r + 1) * stride];
            let profile: Vec<f32> = (0..n).map(|j| at[j].map_or(0.0, |p| row[p])).collect();
            let probabilities = classes[r * n_classes..(r + 1) * n_classes].to_vec();
            profiles.push((profile, ids.len() - 1, probabilities));
            valid.extend((0..stride).map(|t| if t < ids.len() - 1 { 1f32 } else { 0.0 }));
        }
        let valid = Tensor::from_slice(&valid)
            .view([cells.len() as i64, stride as i64])
            .to_device(self.device());
        Ok((profiles, read, valid))
    }

    /// Mean representation of unperturbed `cells` (chunks of the plan's batch), every coordinate kept.
    fn centroid(&self, cells: &[u64]) -> Tensor {
        let batch = self.plan.spec.execution.batch as usize;
        let n = self.n_genes() as i64;
        let mut sum = Tensor::zeros([self.dim()], (Kind::Float, self.device()));
        for chunk in cells.chunks(batch) {
            let (profiles, read, valid) = self
                .original_forward(chunk)
                .expect("an unperturbed forward of stored cells succeeds");
            let reps = match self.plan.spec.readout {
                Readout::Expected => Tensor::from_slice(
                    &profiles
                        .iter()
                        .flat_map(|(p, _, _)| p.iter().copied())
                        .collect::<Vec<_>>(),
                )
                .view([chunk.len() as i64, n])
                .to_device(self.device()),
                Readout::Mean => {
                    let genes = read.narrow(1, 1, read.size()[1] - 1);
                    (genes * valid.unsqueeze(2)).sum_dim_intlist(1, false, Kind::Float)
                        / valid.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0)
                }
                Readout::Cls => read.select(1, 0),
            };
            sum += reps.sum_dim_intlist(0, false, Kind::Float);
        }
        sum / cells.len() as f64
    }

    /// Expected bins `[rows, tokens]` of final hidden states `[rows, tokens, d]`.
    pub(super) fn expected_bins(&self, states: &Tensor) -> Tensor {
        let (r, t, d) = states.size3().expect("[rows, tokens, d]");
        let probs = self
            .model
            .bin_logits(&states.reshape([r * t, d]), false)
            .softmax(-1, Kind::Float);
        let bins = Tensor::arange(i64::from(self.plan.n_bins), (Kind::Float, self.device()));
        probs.matmul(&bins).view([r, t])
    }

    /// The unperturbed forward of a unit's cells, cached per cell (whole cell blocks, so a cell's batches
    /// are the same whichever worker computes a unit). For the mean readout it also returns the
    /// readout-layer states of `own_genes` (`[cells, own genes, d]`, zeros for a gene a cell's sequence
    /// does not hold), from the cached states where the cell has them (see `STATE_CACHE_BYTES`), else
    /// from a fresh forward.
    fn originals(
        &self,
        cells: &[u64],
        own_genes: Option<&[u32]>,
        stop: &AtomicBool,
    ) -> Result<Option<Tensor>, UnitError> {
        let batch = self.plan.spec.execution.batch as usize;
        // All of the unit's cells or none: a forward's batch is always a whole cell block's chunk, so a
        // cell's original is bitwise the same whichever worker computes it and whatever it had cached.
        let ready = {
            let cache = self.originals.borrow();
            cells.iter().all(|c| {
                cache
                    .get(c)
                    .is_some_and(|o| own_genes.is_none() || o.states.is_some())
            })
        };
        let missing: &[u64] = if ready { &[] } else { cells };
        let keep_states = self.plan.spec.readout == Readout::Mean;
        // The states of cells past the cache's budget, for this unit only.
        let mut uncached: HashMap<u64, Tensor> = HashMap::new();
        for chunk in missing.chunks(batch) {
            if stop.load(Ordering::Relaxed) {
                return Err(UnitError::Interrupted);
            }
            let (profiles, read, valid) = self.original_forward(chunk)?;
            let reads = match self.plan.spec.readout {
                Readout::Cls => read.select(1, 0),
                Readout::Expected | Readout::Mean => (read.narrow(1, 1, read.size()[1] - 1)
                    * valid.unsqueeze(2))
                .sum_dim_intlist(1, false, Kind::Float),
            };
            let mut cache = self.originals.borrow_mut();
            for (row, (&c, (expected, gene_tokens, classes))) in
                chunk.iter().zip(profiles).enumerate()
            {
                let states = read.get(row as i64).narrow(0, 1, gene_tokens as i64);
                let bytes = gene_tokens * self.model.config.d_model * std::mem::size_of::<f32>();
                if cache.get(&c).is_some_and(|o| o.states.is_some()) {
                    // Replaced below: its bytes are counted again.
                    self.cached_state_bytes
                        .set(self.cached_state_bytes.get() - bytes);
                }
                let states =
                    if keep_states && self.cached_state_bytes.get() + bytes <= STATE_CACHE_BYTES {
                        self.cached_state_bytes
                            .set(self.cached_state_bytes.get() + bytes);
                        Some(states)
                    } else {
                        if own_genes.is_some() {
                            uncached.insert(c, states);
                        }
                        None
                    };
                cache.insert(
                    c,
                    Original {
                        read: reads.get(row as i64),
                        expected,
                        gene_tokens,
                        genes: match self.sequence {
                            SequenceLayout::Full => Vec::new(),
                            SequenceLayout::Expressed { .. } => self.cell_genes(c),
                        },
                        states,
                        classes,
                    },
                );
            }
        }
        let Some(genes) = own_genes else {
            return Ok(None);
        };
        let cache = self.originals.borrow();
        let own: Vec<Tensor> = cells
            .iter()
            .map(|c| {
                let original = &cache[c];
                let states = original.states.as_ref().unwrap_or_else(|| &uncached[c]);
                // Each own gene's state where the cell's sequence holds it, zeros where it does not
                // (so subtracting it from the sum is a no-op).
                let at: Vec<Option<usize>> = genes
                    .iter()
                    .map(|&g| original.position(self.sequence, g))
                    .collect();
                let positions: Vec<i64> = at.iter().map(|p| p.map_or(0, |p| p as i64)).collect();
                let present: Vec<f32> = at
                    .iter()
                    .map(|p| if p.is_some() { 1.0 } else { 0.0 })
                    .collect();
                let index = Tensor::from_slice(&positions).to_device(self.device());
                let present = Tensor::from_slice(&present).to_device(self.device());
                (states.index_select(0, &index) * present.unsqueeze(1)).unsqueeze(0)
            })
            .collect();
        Ok(Some(Tensor::cat(&own, 0)))
    }

    /// The perturbed sequences of one record: the target itself, and for a pair each gene alone.
    fn variants(&self, record: usize, target: &Target, cell: u64) -> Vec<Variant> {
        let kind = self.plan.spec.perturbation.kind;
        let bins = &self.bins[&cell];
        let mut perturbed = vec![target.perturbed_in(kind, bins)];
        if target.kind == TargetKind::Pair {
            perturbed.extend(target.genes.iter().map(|&g| vec![g]));
        }
        let top = i64::from(self.plan.n_bins) - 1;
        let cls = i64::from(self.layout.cls_bin());
        // The expressed layout's draw was made once, with the cell's unperturbed forward.
        let sequence = match self.sequence {
            SequenceLayout::Full => self.sequence.inference_genes(cell, bins),
            SequenceLayout::Expressed { .. } => self.originals.borrow()[&cell].genes.clone(),
        };
        perturbed
            .into_iter()
            .map(|genes| {
                let (ids, bins, at) =
                    perturbed_sequence(kind, self.sequence, bins, &sequence, &genes, cls, top);
                Variant {
                    record,
                    ids,
                    bins,
                    at,
                }
            })
            .collect()
    }

    /// Computes unit `unit`; `stop` is checked between forward passes.
    pub fn compute_unit(&self, unit: usize, stop: &AtomicBool) -> Result<UnitResult, UnitError> {
        if let Some(steering) = &self.steering {
            return self.compute_steered_unit(steering, unit, stop);
        }
        if self.plan.spec.attributes() {
            return self.compute_attribution_unit(unit, stop);
        }
        let plan = &self.plan;
        let span = plan.unit(unit);
        let unit_targets: Vec<&Target> = plan.targets[span.targets.clone()].iter().collect();
        let unit_cells: Vec<u64> = plan.cells[span.cells.clone()].to_vec();
        let n = self.n_genes();
        let n_states = plan.states.len();
        let measure = measure_len(n_states);
        let batch = plan.spec.execution.batch as usize;
        let readout = plan.spec.readout;

        // The mean readout leaves the targets' own token states out of the original mean too.
        let mut own_genes: Vec<u32> = unit_targets
            .iter()
            .flat_map(|t| t.genes.iter().copied())
            .collect();
        own_genes.sort_unstable();
        own_genes.dedup();
        let own_states = self.originals(
            &unit_cells,
            (readout == Readout::Mean).then_some(own_genes.as_slice()),
            stop,
        )?;

        let records = super::plan::applicable_records(plan, &self.bins, unit);
        let with_expression = plan.spec.execution.anndata;
        let mut result = UnitResult {
            unit: unit as u32,
            plan_blake3: self.plan_blake3.clone(),
            targets: span.targets.clone().map(|t| t as u32).collect(),
            n_vocabulary: n as u32,
            n_states: n_states as u32,
            record_target: Vec::with_capacity(records.len()),
            record_cell: Vec::with_capacity(records.len()),
            cosine_shift: Vec::with_capacity(records.len()),
            state_shift: Vec::with_capacity(records.len() * n_states),
            state_progress: Vec::with_capacity(records.len() * n_states),
            alone: Vec::new(),
            delta_bin_sum: Vec::new(),
            expression: with_expression.then(|| UnitExpression {
                perturbed: Vec::with_capacity(records.len() * n),
                original: Vec::with_capacity(unit_cells.len() * n),
            }),
            steer: None,
            classes: plan
                .classifier
                .as_ref()
                .filter(|_| plan.spec.transitions.is_some())
                .map(|c| UnitClasses {
                    n_classes: c.classes.len() as u32,
                    original: Vec::with_capacity(unit_cells.len() * c.classes.len()),
                    perturbed: Vec::with_capacity(records.len() * c.classes.len()),
                }),
            attribution: None,
        };
        {
            let cache = self.originals.borrow();
            for c in &unit_cells {
                if let Some(e) = result.expression.as_mut() {
                    e.original.extend_from_slice(&cache[c].expected);
                }
                if let Some(classes) = result.classes.as_mut() {
                    classes.original.extend_from_slice(&cache[c].classes);
                }
            }
        }
        let mut delta_sum = vec![0f64; unit_targets.len() * n];
        // In the expressed layout sequences differ in length by cell: computing a cell's records together
        // keeps a forward's rows nearly equal in length (little padding). Results still go out in record
        // order (target-major), which the merge checks.
        let mut order: Vec<usize> = (0..records.len()).collect();
        if self.sequence != SequenceLayout::Full {
            order.sort_by_key(|&i| (records[i].1, records[i].0));
        }
        let mut outputs: Vec<Option<RecordOutput>> = (0..records.len()).map(|_| None).collect();
        // In the expressed layout a forward takes one cell's records only: their sequences are equally
        // long (a knockout drops one token), so no row is padded and attention runs its unmasked kernel.
        let mut chunks: Vec<&[usize]> = Vec::new();
        let mut rest = order.as_slice();
        while !rest.is_empty() {
            let mut end = rest.len().min(batch);
            if self.sequence != SequenceLayout::Full {
                let cell = records[rest[0]].1;
                end = rest[..end]
                    .iter()
                    .position(|&i| records[i].1 != cell)
                    .unwrap_or(end);
            }
            chunks.push(&rest[..end]);
            rest = &rest[end..];
        }
        for indices in chunks {
            if stop.load(Ordering::Relaxed) {
                return Err(UnitError::Interrupted);
            }
            let chunk: Vec<(usize, usize)> = indices.iter().map(|&i| records[i]).collect();
            let variants: Vec<Variant> = chunk
                .iter()
                .enumerate()
                .flat_map(|(r, &(k, ci))| self.variants(r, unit_targets[k], unit_cells[ci]))
                .collect();
            // Per variant: its representation with the record's own genes left out, and the original's.
            let mut perturbed_rows: Vec<Tensor> = Vec::with_capacity(variants.len());
            let mut original_rows: Vec<Tensor> = Vec::with_capacity(variants.len());
            // One padded forward for all of them (their lengths differ by cell in the expressed layout,
            // and by deletion in any).
            let mut computed: Vec<Option<(Tensor, Tensor)>> =
                (0..variants.len()).map(|_| None).collect();
            let mut expected_of: Vec<Vec<f32>> = vec![Vec::new(); variants.len()];
            let classes_of = {
                let rows: Vec<(&[i64], &[i64])> = variants
                    .iter()
                    .map(|v| (v.ids.as_slice(), v.bins.as_slice()))
                    .collect();
                let (expected, read, classes) = self.run(&rows)?;
                let stride = read.size()[1] as usize - 1;
                for (v, variant) in variants.iter().enumerate() {
                    let row = v;
                    let tokens = variant.ids.len() - 1;
                    let (k, ci) = chunk[variant.record];
                    let target = unit_targets[k];
                    let cell = unit_cells[ci];
                    let after = &expected[row * stride..row * stride + tokens];
                    expected_of[v] = after.to_vec();
                    // Left out of both sides (kept only to measure the self-effect itself).
                    let excluded: &[u32] = if plan.spec.count_own_genes {
                        &[]
                    } else {
                        &target.genes
                    };
                    let pair = match readout {
                        Readout::Expected => {
                            let cache = self.originals.borrow();
                            let (p, o) = expected_profiles(
                                after,
                                &cache[&cell].expected,
                                &variant.at,
                                excluded,
                            );
                            let as_tensor =
                                |v: &[f32]| Tensor::from_slice(v).to_device(self.device());
                            (as_tensor(&p), as_tensor(&o))
                        }
                        Readout::Cls => {
                            let cache = self.originals.borrow();
                            (
                                read.get(row as i64).get(0),
                                cache[&cell].read.shallow_clone(),
                            )
                        }
                        Readout::Mean => {
                            let states = read.get(row as i64).narrow(0, 1, tokens as i64);
                            let positions: Vec<usize> = excluded
                                .iter()
                                .filter_map(|&g| variant.at[g as usize])
                                .collect();
                            let perturbed = mean_without(&states, &positions);
                            let own = own_states.as_ref().expect("computed for the mean readout");
                            let cache = self.originals.borrow();
                            let original_cell = &cache[&cell];
                            // A copy: subtracting in place would change the cached original.
                            let mut sum = original_cell.read.copy();
                            let mut left_out = 0;
                            for &g in excluded {
                                let slot =
                                    own_genes.binary_search(&g).expect("a unit target's gene");
                                // Zeros for a gene the cell's sequence does not hold.
                                sum -= own.get(ci as i64).get(slot as i64);
                                left_out += usize::from(original_cell.holds(self.sequence, g));
                            }
                            let original =
                                sum / (original_cell.gene_tokens - left_out).max(1) as f64;
                            (perturbed, original)
                        }
                    };
                    computed[v] = Some(pair);
                }
                classes
            };
            let n_classes = classes_of.len() / variants.len().max(1);
            for slot in computed {
                let (p, o) = slot.expect("every variant was computed");
                perturbed_rows.push(p);
                original_rows.push(o);
            }
            let states = match (&self.centroids, &self.axes) {
                (Some(centroids), Some(axes)) => {
                    let rows = Tensor::from_slice(
                        &variants
                            .iter()
                            .flat_map(|v| {
                                let cell = unit_cells[chunk[v.record].1];
                                let base = (self.stratum_of[&cell] * n_states) as i64;
                                (0..n_states as i64).map(move |s| base + s)
                            })
                            .collect::<Vec<_>>(),
                    )
                    .to_device(self.device());
                    let dim = self.dim();
                    Some((
                        centroids
                            .index_select(0, &rows)
                            .view([-1, n_states as i64, dim]),
                        axes.index_select(0, &rows).view([-1, n_states as i64, dim]),
                    ))
                }
                _ => None,
            };
            let values = measures(
                &Tensor::stack(&perturbed_rows, 0),
                &Tensor::stack(&original_rows, 0),
                states.as_ref().map(|(t, a)| (t, a)),
            )?;
            let mut v = 0;
            for (r, &(k, ci)) in chunk.iter().enumerate() {
                let target = unit_targets[k];
                let cell = unit_cells[ci];
                let main = &values[v * measure..(v + 1) * measure];
                let mut output = RecordOutput {
                    measures: main.to_vec(),
                    alone: Vec::new(),
                    perturbed_expression: None,
                    classes: classes_of[v * n_classes..(v + 1) * n_classes].to_vec(),
                };
                // The change of every other gene's expected bin, and the expression AnnData shows.
                let variant = &variants[v];
                debug_assert_eq!(variant.record, r);
                let cache = self.originals.borrow();
                let before = &cache[&cell].expected;
                let sums = &mut delta_sum[k * n..(k + 1) * n];
                for j in 0..n {
                    if let Some(at) = variant.at[j] {
                        if !target.genes.contains(&(j as u32)) {
                            sums[j] += f64::from(expected_of[v][at] - before[j]);
                        }
                    }
                }
                if with_expression {
                    output.perturbed_expression = Some(
                        (0..n)
                            .map(|j| variant.at[j].map_or(0.0, |at| expected_of[v][at]))
                            .collect(),
                    );
                }
                v += 1;
                if target.kind == TargetKind::Pair {
                    output.alone = values[v * measure..(v + 2) * measure].to_vec();
                    v += 2;
                }
                outputs[indices[r]] = Some(output);
            }
        }
        for (&(k, ci), output) in records.iter().zip(outputs) {
            let output = output.expect("every record was computed");
            result
                .record_target
                .push(span.targets.start as u32 + k as u32);
            result.record_cell.push(unit_cells[ci]);
            result.cosine_shift.push(output.measures[0]);
            result
                .state_shift
                .extend_from_slice(&output.measures[1..1 + n_states]);
            result
                .state_progress
                .extend_from_slice(&output.measures[1 + n_states..]);
            result.alone.extend_from_slice(&output.alone);
            if let Some(classes) = result.classes.as_mut() {
                classes.perturbed.extend_from_slice(&output.classes);
            }
            if let (Some(e), Some(perturbed)) =
                (result.expression.as_mut(), output.perturbed_expression)
            {
                e.perturbed.extend(perturbed);
            }
        }
        result.delta_bin_sum = delta_sum.into_iter().map(|v| v as f32).collect();
        Ok(result)
    }
}

impl Original {
    /// Whether the cell's unperturbed sequence holds gene `gene`.
    fn holds(&self, layout: SequenceLayout, gene: u32) -> bool {
        self.position(layout, gene).is_some()
    }

    /// Where gene `gene` sits among the unperturbed sequence's gene tokens (vocabulary order in the
    /// full layout; the ascending genes of the sequence in the expressed one).
    fn position(&self, layout: SequenceLayout, gene: u32) -> Option<usize> {
        match layout {
            SequenceLayout::Full => Some(gene as usize),
            SequenceLayout::Expressed { .. } => self.genes.binary_search(&gene).ok(),
        }
    }
}

/// What one record's forwards produced, kept until records go out in order.
struct RecordOutput {
    /// The record's `measure_len` values: cosine shift, then per state the shift and the progress.
    measures: Vec<f32>,
    /// For a pair, the anchor alone's and the gene alone's measures.
    alone: Vec<f32>,
    perturbed_expression: Option<Vec<f32>>,
    /// A transitions screen: the perturbed cell's state probabilities.
    classes: Vec<f32>,
}

/// Whether `state` (a value of the goal column) is what the screened cells were selected by: progress
/// toward their own state is undefined (NaN), its shift is still reported.
/// The `wanted` genes whose mean bin differs most between the `screened` cells and the cells of any one
/// goal state (the largest absolute difference over the states), ascending; ties keep vocabulary
/// order. Empty without states or cells. A goal readout compares cells along these genes, so each
/// sequence holds them whether the cell expresses them or not; a gene a sequence lacks counts 0 on both
/// sides of the expected readout and moves nothing.
fn goal_genes(
    bins: &HashMap<u64, Vec<u8>>,
    screened: &[u64],
    states: &[&[u64]],
    wanted: usize,
) -> Vec<u32> {
    let Some(first) = screened.first() else {
        return Vec::new();
    };
    if wanted == 0 || states.iter().all(|cells| cells.is_empty()) {
        return Vec::new();
    }
    let n = bins[first].len();
    let mean = |cells: &[u64]| -> Vec<f64> {
        let mut sum = vec![0.0; n];
        for cell in cells {
            for (s, &b) in sum.iter_mut().zip(&bins[cell]) {
                *s += f64::from(b);
            }
        }
        sum.iter().map(|s| s / cells.len() as f64).collect()
    };
    let start = mean(screened);
    let mut separation = vec![0.0f64; n];
    for cells in states.iter().filter(|cells| !cells.is_empty()) {
        for ((sep, m), s) in separation.iter_mut().zip(mean(cells)).zip(&start) {
            *sep = sep.max((m - s).abs());
        }
    }
    let mut genes: Vec<u32> = (0..n as u32).collect();
    // Stable: ties keep vocabulary order.
    genes.sort_by(|a, b| separation[*b as usize].total_cmp(&separation[*a as usize]));
    genes.truncate(wanted);
    genes.sort_unstable();
    genes
}

pub(super) fn screened_state(spec: &ScreenSpec, state: &str) -> bool {
    spec.goal.as_ref().is_some_and(|goal| {
        spec.cells
            .filter
            .get(&goal.column)
            .is_some_and(|values| values.values().iter().any(|v| v == state))
    })
}

/// Rows scaled to unit length.
pub(super) fn unit_rows(x: &Tensor) -> Tensor {
    x / x
        .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)
        .clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever a knockout does to gene g's own readout, no shift changes: its coordinate is left out of
    /// both sides. (The regression this guards: a knocked-out gene high in the screened cells moved
    /// every cell toward the goal through its own coordinate falling to 0.)
    #[test]
    fn a_knocked_out_genes_own_expected_expression_counts_on_neither_side() {
        let bins = [3u8, 0, 5, 1, 2, 4];
        const ALL: [u32; 6] = [0, 1, 2, 3, 4, 5];
        let before = [2.9f32, 0.4, 4.6, 1.2, 2.1, 3.8];
        let (_, _, at) = perturbed_sequence(
            PerturbationKind::Knockout,
            SequenceLayout::Full,
            &bins,
            &ALL,
            &[2],
            9,
            7,
        );
        let state = Tensor::from_slice(&[0.0f32, 0.3, 0.1, 1.5, 0.2, 0.9]).view([1, 1, 6]);
        let unit_state = unit_rows(&state);
        let axis = &state / 3.0;
        let shifts = |own_readout: f32| {
            let after = [2.7f32, 0.5, own_readout, 1.0, 2.4, 3.5];
            let (p, o) = expected_profiles(&after, &before, &at, &[2]);
            assert_eq!((p[2], o[2]), (0.0, 0.0));
            measures(
                &Tensor::from_slice(&p).view([1, 6]),
                &Tensor::from_slice(&o).view([1, 6]),
                Some((&unit_state, &axis)),
            )
            .unwrap()
        };
        let reference = shifts(0.0);
        for own in [4.6f32, 42.0, -3.0] {
            assert_eq!(shifts(own), reference, "gene 2's own readout {own}");
        }
        // The other genes' changes do count.
        assert!(
            reference.iter().all(|v| v.is_finite() && *v != 0.0),
            "{reference:?}"
        );
    }

    #[test]
    fn a_perturbed_genes_own_token_state_is_left_out_of_the_mean() {
        let states = Tensor::arange(5 * 3, (Kind::Float, Device::Cpu)).view([5, 3]);
        let base = mean_without(&states, &[1, 3]);
        let changed = states.copy();
        let _ = changed.get(1).fill_(100.0);
        let _ = changed.get(3).fill_(-7.0);
        assert_eq!(
            Vec::<f32>::try_from(mean_without(&changed, &[1, 3])).unwrap(),
            Vec::<f32>::try_from(&base).unwrap()
        );
        let kept = Vec::<f32>::try_from(&base).unwrap();
        assert_eq!(kept, vec![6.0, 7.0, 8.0]);
    }

    #[test]
    fn in_the_expressed_layout_a_knockout_removes_the_token_and_absent_genes_have_no_place() {
        let bins = [3u8, 0, 5, 0, 2];
        let layout = SequenceLayout::Expressed { unexpressed: 1 };
        // Expressed genes 0, 2, 4 and the drawn unexpressed gene 3.
        let sequence = [0u32, 2, 3, 4];
        let (ids, input, at) = perturbed_sequence(
            PerturbationKind::Knockout,
            layout,
            &bins,
            &sequence,
            &[2],
            9,
            7,
        );
        assert_eq!((ids, input), (vec![0, 1, 4, 5], vec![9, 3, 0, 2]));
        assert_eq!(at, vec![Some(0), None, None, Some(1), Some(2)]);
        // The layout's own draw is a pure function of the cell: every worker reads a cell alike.
        let drawn = layout.inference_genes(17, &bins);
        assert_eq!(drawn, layout.inference_genes(17, &bins));
        assert_eq!(drawn.len(), 4);
        assert!([0, 2, 4].iter().all(|g| drawn.contains(g)));
    }

    #[test]
    fn goal_genes_are_those_separating_screened_cells_from_a_goal_state() {
        // 6 genes. Screened cells 0-1; state A (cells 2-3) differs from them at gene 4 by 3 bins and
        // at gene 1 by 1; state B (cell 4) at gene 0 by 2 (down). Genes 2, 3 and 5 never differ.
        let bins: HashMap<u64, Vec<u8>> = [
            (0, vec![2, 1, 0, 5, 0, 1]),
            (1, vec![2, 1, 0, 5, 0, 1]),
            (2, vec![2, 2, 0, 5, 3, 1]),
            (3, vec![2, 2, 0, 5, 3, 1]),
            (4, vec![0, 1, 0, 5, 0, 1]),
        ]
        .into_iter()
        .collect();
        let states: [&[u64]; 2] = [&[2, 3], &[4]];
        assert_eq!(goal_genes(&bins, &[0, 1], &states, 2), vec![0, 4]);
        assert_eq!(goal_genes(&bins, &[0, 1], &states, 3), vec![0, 1, 4]);
        // Ties (genes 2, 3 and 5 at 0) keep vocabulary order; more than the vocabulary is all of it.
        assert_eq!(goal_genes(&bins, &[0, 1], &states, 4), vec![0, 1, 2, 4]);
        assert_eq!(goal_genes(&bins, &[0, 1], &states, 9).len(), 6);
        // Nothing to separate from, or nothing wanted: no goal genes.
        assert!(goal_genes(&bins, &[0, 1], &[], 4).is_empty());
        assert!(goal_genes(&bins, &[0, 1], &states, 0).is_empty());
        assert!(goal_genes(&bins, &[], &states, 4).is_empty());
    }

    #[test]
    fn perturbed_sequences_place_every_gene() {
        let bins = [3u8, 0, 5, 1];
        const ALL: [u32; 4] = [0, 1, 2, 3];
        let (ids, input, at) = perturbed_sequence(
            PerturbationKind::Delete,
            SequenceLayout::Full,
            &bins,
            &ALL,
            &[0, 2],
            9,
            7,
        );
        assert_eq!((ids, input), (vec![0, 2, 4], vec![9, 0, 1]));
        assert_eq!(at, vec![None, Some(0), None, Some(1)]);
        let (ids, input, at) = perturbed_sequence(
            PerturbationKind::Overexpress,
            SequenceLayout::Full,
            &bins,
            &ALL,
            &[1, 3],
            9,
            7,
        );
        assert_eq!((ids, input), (vec![0, 2, 4, 1, 3], vec![9, 7, 7, 3, 5]));
        assert_eq!(at, vec![Some(2), Some(0), Some(3), Some(1)]);
        let (_, input, at) = perturbed_sequence(
            PerturbationKind::Knockout,
            SequenceLayout::Full,
            &bins,
            &ALL,
            &[2],
            9,
            7,
        );
        assert_eq!(input, vec![9, 3, 0, 0, 1]);
        assert_eq!(at, vec![Some(0), Some(1), Some(2), Some(3)]);
    }
}
