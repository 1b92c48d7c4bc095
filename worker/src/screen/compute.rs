//! Computing one work unit: the `Screener` holds a checkpoint's model, the screened cells and the goal
//! states' centroids, and turns a unit (genes x cells) into a `UnitResult`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context};
use cellfleet_shared::checkpoint::Checkpoints;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::screen::{
    CellEmbedding, PerturbationKind, ScreenPlan, ScreenSpec, UnitResult,
};
use cellfleet_shared::storage::S3Options;
use cellfleet_shared::stream::batch::TokenLayout;
use tch::{Device, Kind, Tensor};

use super::plan::{manifest_blake3, read_cells};
use crate::model::{CellModel, Mode, Tokens};
use crate::train::checkpoint_state::{
    open_existing_run, read_state, tensors_from_image, MODEL_OBJECT,
};

/// Loads the plan's checkpoint weights (only the model object) after checking its manifest's hash.
pub fn load_model(plan: &ScreenPlan, s3: &S3Options, device: Device) -> anyhow::Result<CellModel> {
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
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, param) in model.named_parameters() {
            let value = tensors
                .get(&name)
                .with_context(|| format!("checkpoint step {} has no tensor {name}", id.step))?;
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
    })?;
    Ok(model)
}

/// A loaded screen: the model, the plan, the perturbed cells' bins and the state centroids.
pub struct Screener {
    model: CellModel,
    pub plan: ScreenPlan,
    plan_blake3: String,
    bins: HashMap<u64, Vec<u8>>,
    /// `[strata * states, d_model]`: the centroid of each state within each stratum (one stratum without
    /// matching), unit length; row `stratum * states + state`.
    centroids: Option<Tensor>,
    /// `[strata * states, d_model]`: the axis from the perturbed cells' centroid to each state's centroid
    /// (per stratum), divided by its squared length, so its dot product with a move is the fraction of
    /// the axis the move covers.
    axes: Option<Tensor>,
    /// Each perturbed cell's unperturbed hidden-state sum and expected bins, once computed.
    originals: RefCell<HashMap<u64, (Tensor, Vec<f32>)>>,
    /// Per screened cell (by corpus position): its stratum.
    stratum_of: HashMap<u64, usize>,
    layout: TokenLayout,
}

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
        let mut wanted = plan.cells.clone();
        for state in &plan.states {
            wanted.extend(&state.cells);
        }
        let bins = read_cells(&corpus, &wanted)?;
        let layout = TokenLayout::new(plan.n_bins)?;
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
            stratum_of,
            layout,
        };
        if !screener.plan.states.is_empty() {
            let d = screener.model.config.d_model as i64;
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
                            let zero = Tensor::zeros([d], (Kind::Float, device));
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

    fn n_genes(&self) -> usize {
        self.plan.vocabulary.len()
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    /// Final hidden states of gene tokens, `[rows, seq - 1, d]`, for token rows of one length.
    fn gene_states(&self, gene_ids: &[i64], bins: &[i64], rows: usize) -> Tensor {
        let seq = (gene_ids.len() / rows) as i64;
        let to = |v: &[i64]| {
            Tensor::from_slice(v)
                .view([rows as i64, seq])
                .to_device(self.device())
        };
        let tokens = Tokens {
            gene_ids: to(gene_ids),
            bins: to(bins),
            valid: None,
        };
        let hidden = tch::no_grad(|| self.model.forward(&tokens, Mode::EVAL).hidden);
        hidden.narrow(1, 1, seq - 1)
    }

    /// The unperturbed tokens of `cell`.
    fn original_tokens(&self, cell: u64, gene_ids: &mut Vec<i64>, bins: &mut Vec<i64>) {
        gene_ids.push(0);
        bins.push(i64::from(self.layout.cls_bin()));
        gene_ids.extend(1..=self.n_genes() as i64);
        bins.extend(self.bins[&cell].iter().map(|&b| i64::from(b)));
    }

    /// The representation of each unperturbed cell in a chunk (`[rows, dim]`), from its gene states.
    fn representation(&self, states: &Tensor) -> Tensor {
        match self.plan.spec.embedding {
            CellEmbedding::Hidden => states.mean_dim(1, false, Kind::Float),
            CellEmbedding::Expression => self.expected_bins(states),
        }
    }

    /// Mean representation of `cells` (chunks of the plan's batch).
    fn centroid(&self, cells: &[u64]) -> Tensor {
        let batch = self.plan.spec.execution.batch as usize;
        let mut sum: Option<Tensor> = None;
        for chunk in cells.chunks(batch) {
            let (mut ids, mut bins) = (Vec::new(), Vec::new());
            for &c in chunk {
                self.original_tokens(c, &mut ids, &mut bins);
            }
            let reps = self
                .representation(&self.gene_states(&ids, &bins, chunk.len()))
                .sum_dim_intlist(0, false, Kind::Float);
            sum = Some(match sum {
                Some(s) => s + reps,
                None => reps,
            });
        }
        sum.expect("a state has cells") / cells.len() as f64
    }

    /// Expected bins `[rows, tokens]` of hidden states `[rows, tokens, d]`.
    fn expected_bins(&self, states: &Tensor) -> Tensor {
        let (r, t, d) = states.size3().expect("[rows, tokens, d]");
        let probs = self
            .model
            .bin_logits(&states.reshape([r * t, d]), false)
            .softmax(-1, Kind::Float);
        let bins = Tensor::arange(i64::from(self.plan.n_bins), (Kind::Float, self.device()));
        probs.matmul(&bins).view([r, t])
    }

    /// The unperturbed forward of every cell of a unit: hidden-state sums `[cells, d]`, expected bins
    /// (row-major `cells x genes`), and for deletions in the hidden embedding the unit genes' own states
    /// `[cells, unit genes, d]`. Whole cell blocks are cached, so a cell is embedded once per worker and
    /// its batches are the same whichever worker computes it.
    fn originals(
        &self,
        cells: &[u64],
        own_genes: Option<&Tensor>,
        stop: &AtomicBool,
    ) -> Result<(Tensor, Vec<f32>, Option<Tensor>), UnitError> {
        let batch = self.plan.spec.execution.batch as usize;
        let cached = own_genes.is_none()
            && cells
                .iter()
                .all(|c| self.originals.borrow().contains_key(c));
        let mut own = Vec::new();
        if !cached {
            for chunk in cells.chunks(batch) {
                if stop.load(Ordering::Relaxed) {
                    return Err(UnitError::Interrupted);
                }
                let (mut ids, mut bins) = (Vec::new(), Vec::new());
                for &c in chunk {
                    self.original_tokens(c, &mut ids, &mut bins);
                }
                let states = self.gene_states(&ids, &bins, chunk.len());
                let sums = states.sum_dim_intlist(1, false, Kind::Float);
                let expected = self.expected_bins(&states).to_device(Device::Cpu);
                if let Some(index) = own_genes {
                    own.push(states.index_select(1, index));
                }
                let mut cache = self.originals.borrow_mut();
                for (row, &c) in chunk.iter().enumerate() {
                    let profile = Vec::<f32>::try_from(expected.get(row as i64))?;
                    cache.insert(c, (sums.get(row as i64), profile));
                }
            }
        }
        let cache = self.originals.borrow();
        let sums = Tensor::stack(
            &cells
                .iter()
                .map(|c| cache[c].0.shallow_clone())
                .collect::<Vec<_>>(),
            0,
        );
        let expected = cells
            .iter()
            .flat_map(|c| cache[c].1.iter().copied())
            .collect();
        let own = own_genes.map(|_| Tensor::cat(&own, 0));
        Ok((sums, expected, own))
    }

    /// Computes unit `unit`; `stop` is checked between forward passes.
    pub fn compute_unit(&self, unit: usize, stop: &AtomicBool) -> Result<UnitResult, UnitError> {
        let plan = &self.plan;
        let span = plan.unit(unit);
        let unit_genes: Vec<u32> = plan.work_genes[span.genes.clone()].to_vec();
        let unit_cells: Vec<u64> = plan.cells[span.cells.clone()].to_vec();
        let n = self.n_genes();
        let n_states = plan.states.len();
        let batch = plan.spec.execution.batch as usize;
        let kind = plan.spec.perturbation.kind;
        let embedding = plan.spec.embedding;
        let d = self.model.config.d_model as i64;

        // A deletion in the hidden embedding leaves the deleted gene's own state out of the original
        // embedding too, so both sides average the same genes.
        let own_index = (kind == PerturbationKind::Delete && embedding == CellEmbedding::Hidden)
            .then(|| {
                Tensor::from_slice(&unit_genes.iter().map(|&g| i64::from(g)).collect::<Vec<_>>())
                    .to_device(self.device())
            });
        let (original_sum, original_expected, original_own) =
            self.originals(&unit_cells, own_index.as_ref(), stop)?;

        let mut pairs = Vec::new();
        for (k, &g) in unit_genes.iter().enumerate() {
            for (ci, cell) in unit_cells.iter().enumerate() {
                if kind.applies(self.bins[cell][g as usize]) {
                    pairs.push((k, ci));
                }
            }
        }
        let mut result = UnitResult {
            unit: unit as u32,
            plan_blake3: self.plan_blake3.clone(),
            genes: unit_genes.clone(),
            n_vocabulary: n as u32,
            n_states: n_states as u32,
            pair_gene: Vec::with_capacity(pairs.len()),
            pair_cell: Vec::with_capacity(pairs.len()),
            cosine_shift: Vec::with_capacity(pairs.len()),
            state_shift: Vec::with_capacity(pairs.len() * n_states),
            state_progress: Vec::with_capacity(pairs.len() * n_states),
            delta_bin_sum: Vec::new(),
        };
        let mut delta_sum = vec![0f64; unit_genes.len() * n];
        let top = i64::from(plan.n_bins) - 1;
        let cls = i64::from(self.layout.cls_bin());
        for chunk in pairs.chunks(batch) {
            if stop.load(Ordering::Relaxed) {
                return Err(UnitError::Interrupted);
            }
            let (mut ids, mut bins) = (Vec::new(), Vec::new());
            for &(k, ci) in chunk {
                let g = unit_genes[k] as usize;
                let cell_bins = &self.bins[&unit_cells[ci]];
                ids.push(0);
                bins.push(cls);
                let others = (0..n).filter(|&j| j != g);
                match kind {
                    PerturbationKind::Knockout => {
                        ids.extend(1..=n as i64);
                        bins.extend(cell_bins.iter().enumerate().map(|(j, &b)| {
                            if j == g {
                                0
                            } else {
                                i64::from(b)
                            }
                        }));
                    }
                    PerturbationKind::Delete => {
                        ids.extend(others.clone().map(|j| j as i64 + 1));
                        bins.extend(others.map(|j| i64::from(cell_bins[j])));
                    }
                    PerturbationKind::Overexpress => {
                        ids.push(g as i64 + 1);
                        bins.push(top);
                        ids.extend(others.clone().map(|j| j as i64 + 1));
                        bins.extend(others.map(|j| i64::from(cell_bins[j])));
                    }
                }
            }
            let states = self.gene_states(&ids, &bins, chunk.len());
            let tokens = states.size()[1] as usize;
            let expected: Vec<f32> = Vec::<f32>::try_from(
                self.expected_bins(&states)
                    .to_device(Device::Cpu)
                    .flatten(0, -1),
            )?;
            // Expected bins in vocabulary order, perturbed and original, per pair; a deleted gene is
            // left out of both (0).
            let mut perturbed_profile = Vec::with_capacity(chunk.len() * n);
            let mut original_profile = Vec::with_capacity(chunk.len() * n);
            for (row, &(k, ci)) in chunk.iter().enumerate() {
                let g = unit_genes[k] as usize;
                let before = &original_expected[ci * n..(ci + 1) * n];
                let after = &expected[row * tokens..(row + 1) * tokens];
                let sums = &mut delta_sum[k * n..(k + 1) * n];
                for j in 0..n {
                    // Where gene j sits among the perturbed sequence's gene tokens.
                    let at = match kind {
                        PerturbationKind::Knockout => Some(j),
                        PerturbationKind::Delete if j == g => None,
                        PerturbationKind::Delete => Some(j - usize::from(j > g)),
                        PerturbationKind::Overexpress if j == g => Some(0),
                        PerturbationKind::Overexpress => Some(j + usize::from(j < g)),
                    };
                    let value = at.map_or(0.0, |at| after[at]);
                    perturbed_profile.push(value);
                    original_profile.push(if at.is_some() { before[j] } else { 0.0 });
                    if j != g {
                        sums[j] += f64::from(value - before[j]);
                    }
                }
                result.pair_gene.push(unit_genes[k]);
                result.pair_cell.push(unit_cells[ci]);
            }
            let cell_rows =
                Tensor::from_slice(&chunk.iter().map(|&(_, ci)| ci as i64).collect::<Vec<_>>())
                    .to_device(self.device());
            let (perturbed, original) = match embedding {
                CellEmbedding::Expression => {
                    let as_tensor = |v: &[f32]| {
                        Tensor::from_slice(v)
                            .view([chunk.len() as i64, n as i64])
                            .to_device(self.device())
                    };
                    (as_tensor(&perturbed_profile), as_tensor(&original_profile))
                }
                CellEmbedding::Hidden => {
                    let sums = original_sum.index_select(0, &cell_rows);
                    let original = match &original_own {
                        Some(own) => {
                            let gene_rows = Tensor::from_slice(
                                &chunk.iter().map(|&(k, _)| k as i64).collect::<Vec<_>>(),
                            )
                            .to_device(self.device());
                            let own = own
                                .index_select(0, &cell_rows)
                                .gather(
                                    1,
                                    &gene_rows.view([-1, 1, 1]).expand([-1, 1, d], false),
                                    false,
                                )
                                .squeeze_dim(1);
                            (sums - own) / (n as f64 - 1.0)
                        }
                        None => sums / n as f64,
                    };
                    (states.mean_dim(1, false, Kind::Float), original)
                }
            };
            let dim = perturbed.size()[1];
            let cosine_shift =
                Tensor::cosine_similarity(&perturbed, &original, 1, 1e-12).neg() + 1.0;
            result
                .cosine_shift
                .extend(Vec::<f32>::try_from(cosine_shift.to_device(Device::Cpu))?);
            if let (Some(centroids), Some(axes)) = (&self.centroids, &self.axes) {
                // Each pair against its stratum's state centroids: [rows, states, dim].
                let states_n = n_states as i64;
                let rows = Tensor::from_slice(
                    &chunk
                        .iter()
                        .flat_map(|&(_, ci)| {
                            let base = (self.stratum_of[&unit_cells[ci]] * n_states) as i64;
                            (0..states_n).map(move |s| base + s)
                        })
                        .collect::<Vec<_>>(),
                )
                .to_device(self.device());
                let targets = centroids.index_select(0, &rows).view([-1, states_n, dim]);
                let toward = |x: &Tensor| {
                    (unit_rows(x).unsqueeze(1) * &targets).sum_dim_intlist(2, false, Kind::Float)
                };
                let shift = toward(&perturbed) - toward(&original);
                result.state_shift.extend(Vec::<f32>::try_from(
                    shift.to_device(Device::Cpu).flatten(0, -1),
                )?);
                let axes = axes.index_select(0, &rows).view([-1, states_n, dim]);
                let progress = ((&perturbed - &original).unsqueeze(1) * axes).sum_dim_intlist(
                    2,
                    false,
                    Kind::Float,
                );
                result.state_progress.extend(Vec::<f32>::try_from(
                    progress.to_device(Device::Cpu).flatten(0, -1),
                )?);
            }
        }
        result.delta_bin_sum = delta_sum.into_iter().map(|v| v as f32).collect();
        Ok(result)
    }
}

/// Whether `state` (a value of the goal column) is what the screened cells were selected by: progress
/// toward their own state is undefined (NaN), its shift is still reported.
fn screened_state(spec: &ScreenSpec, state: &str) -> bool {
    spec.goal.as_ref().is_some_and(|goal| {
        spec.cells
            .filter
            .get(&goal.column)
            .is_some_and(|values| values.values().iter().any(|v| v == state))
    })
}

/// Rows scaled to unit length.
fn unit_rows(x: &Tensor) -> Tensor {
    x / x
        .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)
        .clamp_min(1e-12)
}
