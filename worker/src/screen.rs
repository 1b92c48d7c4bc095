//! In-silico perturbation screens on the worker side: reading a screen specification, resolving it into
//! a plan against the checkpoint and the corpus (every check that can fail happens here, before any work
//! is submitted), computing one work unit with the model, and serving a screen's units as a fleet worker.
//!
//! A cell is the token sequence `[CLS]` + every vocabulary gene in vocabulary order with its expression
//! bin. Pretraining permutes every clone's gene order (bootstrapped-permutation augmentation), so the
//! model reads a cell as a set of (gene, bin) tokens and an order carries no expression meaning. Effects
//! are measured in the model's expected expression (default) or the mean final hidden state, see
//! `docs/screens.md`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use cellfleet_proto as pb;
use cellfleet_proto::coordinator_client::CoordinatorClient;
use cellfleet_shared::batch::TokenLayout;
use cellfleet_shared::checkpoint::{CheckpointManifest, Checkpoints};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::manifest::MISSING_LABEL;
use cellfleet_shared::screen::{
    unit_key, CellEmbedding, CheckpointId, GeneSelection, PerturbationKind, ScreenPlan, ScreenSpec,
    StateCells, UnitResult, PLAN_FILE, PLAN_FORMAT,
};
use cellfleet_shared::store::{S3Options, Store};
use tch::{Device, Kind, Tensor};
use tonic::transport::Channel;

use crate::checkpointing::{
    open_existing_run, read_state, resolve, tensors_from_image, ResumeTarget, MODEL_OBJECT,
};
use crate::model::{CellModel, Mode, Tokens};

/// Reads a screen specification: TOML, or JSON for a `.json` file.
pub fn read_spec(path: &Path) -> anyhow::Result<ScreenSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the screen specification {}", path.display()))?;
    let spec: ScreenSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not a valid screen specification: {e}", path.display()))?
    } else {
        toml::from_str(&text)
            .map_err(|e| anyhow!("{}: not a valid screen specification: {e}", path.display()))?
    };
    spec.validate()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(spec)
}

/// blake3 of a checkpoint manifest as the coordinator records it.
pub fn manifest_blake3(manifest: &CheckpointManifest) -> anyhow::Result<String> {
    Ok(blake3::hash(&serde_json::to_vec_pretty(manifest)?)
        .to_hex()
        .to_string())
}

/// A deterministic generator for sampling cells and genes (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64, domain: &str) -> Self {
        let salt = u64::from_le_bytes(
            blake3::hash(domain.as_bytes()).as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
        Self(seed ^ salt)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `k` of `items` (all when `k >= len`), returned in ascending order.
    fn sample<T: Copy + Ord>(&mut self, mut items: Vec<T>, k: usize) -> Vec<T> {
        let k = k.min(items.len());
        for i in 0..k {
            let j = i + (self.next() % (items.len() - i) as u64) as usize;
            items.swap(i, j);
        }
        items.truncate(k);
        items.sort_unstable();
        items
    }
}

/// Every cell's label codes and name.
struct CorpusIndex {
    labels: Vec<u32>,
    columns: usize,
    names: Vec<String>,
}

fn index_corpus(corpus: &Corpus) -> anyhow::Result<CorpusIndex> {
    let columns = corpus.manifest.label_columns.len();
    let mut index = CorpusIndex {
        labels: Vec::with_capacity(corpus.total_cells() as usize * columns),
        columns,
        names: Vec::with_capacity(corpus.total_cells() as usize),
    };
    for s in 0..corpus.manifest.shards.len() {
        let shard = corpus.fetch_shard(s)?;
        for b in 0..shard.n_blocks() {
            index.labels.extend(shard.read_block(b)?.labels);
        }
        index
            .names
            .extend(shard.origins()?.into_iter().map(|o| o.name));
    }
    Ok(index)
}

/// The bins of `cells` (corpus positions), read block by block.
pub fn read_cells(corpus: &Corpus, cells: &[u64]) -> anyhow::Result<HashMap<u64, Vec<u8>>> {
    let offsets = corpus.manifest.shard_offsets();
    let block_cells = corpus.manifest.block_cells as usize;
    let mut sorted = cells.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = HashMap::with_capacity(sorted.len());
    let mut i = 0;
    while i < sorted.len() {
        if sorted[i] >= corpus.total_cells() {
            bail!(
                "cell {} is beyond the corpus's {} cells",
                sorted[i],
                corpus.total_cells()
            );
        }
        let s = offsets.partition_point(|&o| o <= sorted[i]) - 1;
        let shard = corpus.fetch_shard(s)?;
        let mut block: Option<(usize, cellfleet_shared::shard::Block)> = None;
        while i < sorted.len() && sorted[i] < offsets[s + 1] {
            let local = (sorted[i] - offsets[s]) as usize;
            let b = local / block_cells;
            if block.as_ref().map(|(k, _)| *k) != Some(b) {
                block = Some((b, shard.read_block(b)?));
            }
            let (_, data) = block.as_ref().expect("just read");
            out.insert(sorted[i], data.bins_of(local % block_cells).to_vec());
            i += 1;
        }
    }
    Ok(out)
}

/// Resolves `spec` (read from a file in `spec_dir`) into a plan: opens and verifies the checkpoint, checks
/// the corpus uses its vocabulary, applies the cell filters, resolves genes, the null and the goal states.
/// Every error names the field, the value and what would be accepted.
pub fn resolve_plan(
    spec: &ScreenSpec,
    spec_dir: &Path,
    s3: &S3Options,
) -> anyhow::Result<ScreenPlan> {
    spec.validate()?;
    let (checkpoints, manifest) = resolve(&ResumeTarget::Url(spec.checkpoint.clone()), None, s3)
        .with_context(|| format!("checkpoint = {:?}", spec.checkpoint))?;
    let state = read_state(&checkpoints, &manifest)?;
    let corpus =
        Corpus::open(&spec.corpus, s3).with_context(|| format!("corpus = {:?}", spec.corpus))?;
    let vocabulary = state.genes.clone();
    if corpus.manifest.genes != vocabulary {
        let shared = corpus
            .manifest
            .genes
            .iter()
            .filter(|g| vocabulary.contains(g))
            .count();
        bail!(
            "corpus {} does not use the checkpoint's gene vocabulary ({} genes, {} of them shared with the checkpoint's {}); ingest the cells with `--genes {}/manifest.json` (the pretraining corpus) so they are tokenized like the model's",
            spec.corpus,
            corpus.manifest.genes.len(),
            shared,
            vocabulary.len(),
            state.corpus_url.trim_end_matches('/')
        );
    }
    if corpus.manifest.bins.n_bins != state.model.n_bins as u16 {
        bail!(
            "corpus {} has {} bins, the checkpoint's model {}",
            spec.corpus,
            corpus.manifest.bins.n_bins,
            state.model.n_bins
        );
    }
    let index = index_corpus(&corpus)?;
    let column = |field: &str, name: &str| -> anyhow::Result<(usize, Vec<String>)> {
        let columns = &corpus.manifest.label_columns;
        let Some(i) = columns.iter().position(|c| c.name == name) else {
            let known: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            bail!(
                "{field}: the corpus has no obs column {name:?} (its label columns: {}); ingest with `--label-col {name}` to filter on it",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        };
        Ok((i, columns[i].categories.clone()))
    };
    let code =
        |field: &str, col: &str, categories: &[String], value: &str| -> anyhow::Result<u32> {
            categories
                .iter()
                .position(|c| c == value)
                .map(|p| p as u32)
                .ok_or_else(|| {
                    anyhow!(
                        "{field}: no cell has {col} = {value:?} (values in the corpus: {})",
                        categories.join(", ")
                    )
                })
        };
    let cells_matching = |conditions: &[(usize, Vec<u32>)]| -> Vec<u64> {
        (0..index.names.len() as u64)
            .filter(|&c| {
                conditions.iter().all(|(col, codes)| {
                    let v = index.labels[c as usize * index.columns + col];
                    v != MISSING_LABEL && codes.contains(&v)
                })
            })
            .collect()
    };
    let mut conditions = Vec::new();
    for (name, values) in &spec.cells.filter {
        let field = format!("cells.filter.{name}");
        let (col, categories) = column(&field, name)?;
        let codes = values
            .values()
            .iter()
            .map(|v| code(&field, name, &categories, v))
            .collect::<anyhow::Result<Vec<u32>>>()?;
        conditions.push((col, codes));
    }
    let matching = cells_matching(&conditions);
    if matching.is_empty() {
        bail!("cells.filter: no cell matches every condition");
    }
    let cap = spec.cells.max_cells.unwrap_or(u64::MAX) as usize;
    let cells = SplitMix::new(spec.seed, "cells").sample(matching, cap);
    let cell_names = cells
        .iter()
        .map(|&c| index.names[c as usize].clone())
        .collect();

    let position: HashMap<&str, u32> = vocabulary
        .iter()
        .enumerate()
        .map(|(i, g)| (g.as_str(), i as u32))
        .collect();
    let named = |names: Vec<String>, field: &str| -> anyhow::Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let id = position.get(name.as_str()).ok_or_else(|| {
                anyhow!(
                    "{field}: gene {name:?} is not in the checkpoint's vocabulary of {} genes",
                    vocabulary.len()
                )
            })?;
            ids.push(*id);
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    };
    let genes = match &spec.genes {
        GeneSelection::Keyword(_) => (0..vocabulary.len() as u32).collect(),
        GeneSelection::List(list) => named(list.clone(), "genes")?,
        GeneSelection::File { file } => {
            let path = spec_dir.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("genes.file: cannot read {}", path.display()))?;
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            if names.is_empty() {
                bail!("genes.file: {} lists no genes", path.display());
            }
            named(names, &format!("genes.file {}", path.display()))?
        }
    };
    if spec.null.genes as usize > vocabulary.len() {
        bail!(
            "null.genes = {}: the vocabulary has only {} genes",
            spec.null.genes,
            vocabulary.len()
        );
    }
    let null_genes = SplitMix::new(spec.seed, "null genes").sample(
        (0..vocabulary.len() as u32).collect(),
        spec.null.genes as usize,
    );
    let mut work_genes: Vec<u32> = genes.iter().chain(&null_genes).copied().collect();
    work_genes.sort_unstable();
    work_genes.dedup();

    if spec.perturbation.kind == PerturbationKind::Delete && vocabulary.len() < 2 {
        bail!("perturbation.kind = \"delete\" needs a vocabulary of at least 2 genes (a cell without genes has no embedding)");
    }
    let mut states = Vec::new();
    let (mut strata, mut cell_strata) = (Vec::new(), Vec::new());
    let mut match_col = None;
    if let Some(name) = spec.goal.as_ref().and_then(|g| g.match_column.as_ref()) {
        let (col, categories) = column("goal.match_column", name)?;
        for &c in &cells {
            let code = index.labels[c as usize * index.columns + col];
            if code == MISSING_LABEL {
                bail!(
                    "goal.match_column: cell {:?} has no {name} value; filter such cells out (cells.filter) or drop match_column",
                    index.names[c as usize]
                );
            }
            cell_strata.push(code);
        }
        strata = categories;
        match_col = Some((col, name.clone()));
    }
    if let Some(goal) = &spec.goal {
        let (col, categories) = column("goal.column", &goal.column)?;
        for (i, value) in std::iter::once(&goal.value)
            .chain(&goal.alternatives)
            .enumerate()
        {
            let field = if i == 0 {
                "goal.value".to_string()
            } else {
                format!("goal.alternatives[{}]", i - 1)
            };
            let c = code(&field, &goal.column, &categories, value)?;
            let members = cells_matching(&[(col, vec![c])]);
            if members.is_empty() {
                bail!(
                    "{field}: no cell has {} = {value:?} (it is a category of the column, but no cell carries it)",
                    goal.column
                );
            }
            let mut rng = SplitMix::new(spec.seed, &format!("state {value}"));
            let state = match &match_col {
                None => StateCells {
                    name: value.clone(),
                    cells: rng.sample(members, goal.max_cells as usize),
                    strata: Vec::new(),
                },
                Some((match_idx, match_name)) => {
                    // Up to max_cells per stratum; every stratum with screened cells needs some.
                    let mut pairs = Vec::new();
                    for (stratum, stratum_name) in strata.iter().enumerate() {
                        let of_stratum: Vec<u64> = members
                            .iter()
                            .copied()
                            .filter(|&m| {
                                index.labels[m as usize * index.columns + match_idx]
                                    == stratum as u32
                            })
                            .collect();
                        let screened = cell_strata.iter().filter(|&&s| s == stratum as u32).count();
                        if screened > 0 && of_stratum.is_empty() {
                            bail!(
                                "{field}: no cell has {} = {value:?} and {match_name} = {stratum_name:?}, but {screened} screened cells are {stratum_name:?}; leave them out (cells.filter) or drop goal.match_column",
                                goal.column
                            );
                        }
                        for m in rng.sample(of_stratum, goal.max_cells as usize) {
                            pairs.push((m, stratum as u32));
                        }
                    }
                    pairs.sort_unstable();
                    StateCells {
                        name: value.clone(),
                        cells: pairs.iter().map(|p| p.0).collect(),
                        strata: pairs.iter().map(|p| p.1).collect(),
                    }
                }
            };
            states.push(state);
        }
    }
    let mut plan = ScreenPlan {
        format: PLAN_FORMAT.into(),
        spec: spec.clone(),
        checkpoint: CheckpointId {
            url: checkpoints.url().trim_end_matches('/').to_string(),
            step: manifest.step,
            manifest_blake3: manifest_blake3(&manifest)?,
        },
        corpus_url: spec.corpus.clone(),
        corpus_manifest_blake3: corpus.manifest.content_hash(),
        vocabulary,
        n_bins: corpus.manifest.bins.n_bins,
        genes,
        null_genes,
        work_genes,
        cells,
        cell_names,
        states,
        strata,
        cell_strata,
        unit_pairs: Vec::new(),
    };
    let bins = read_cells(&corpus, &plan.cells)?;
    plan.unit_pairs = (0..plan.unit_count())
        .map(|u| applicable_pairs(&plan, &bins, u).len() as u64)
        .collect();
    if plan.total_pairs() == 0 {
        bail!(
            "no gene of the screen is expressed in any selected cell: a {} changes nothing",
            spec.perturbation.kind.name()
        );
    }
    Ok(plan)
}

/// The (unit gene index, unit cell index) pairs of `unit` the perturbation applies to, gene-major.
fn applicable_pairs(
    plan: &ScreenPlan,
    bins: &HashMap<u64, Vec<u8>>,
    unit: usize,
) -> Vec<(usize, usize)> {
    let span = plan.unit(unit);
    let kind = plan.spec.perturbation.kind;
    let mut pairs = Vec::new();
    for (k, &g) in plan.work_genes[span.genes].iter().enumerate() {
        for (ci, cell) in plan.cells[span.cells.clone()].iter().enumerate() {
            if kind.applies(bins[cell][g as usize]) {
                pairs.push((k, ci));
            }
        }
    }
    pairs
}

/// Opens the store location of a screen.
pub fn open_location(location: &str, s3: &S3Options) -> anyhow::Result<Store> {
    Store::open(location, s3).with_context(|| format!("cannot open the screen location {location}"))
}

/// Writes the plan to the screen's location; returns its blake3.
pub fn store_plan(plan: &ScreenPlan, store: &Store) -> anyhow::Result<String> {
    let bytes = serde_json::to_vec_pretty(plan)?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    store.put(PLAN_FILE, bytes.into())?;
    Ok(hash)
}

/// Reads the plan at a screen's location and checks it is the one submitted.
pub fn load_plan(store: &Store, expected_blake3: &str) -> anyhow::Result<ScreenPlan> {
    let bytes = store.get(PLAN_FILE)?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    if !expected_blake3.is_empty() && hash != expected_blake3 {
        bail!(
            "{}/{PLAN_FILE} has blake3 {hash}, the screen was submitted with {expected_blake3} (replaced since)",
            store.url().trim_end_matches('/')
        );
    }
    let plan: ScreenPlan = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}/{PLAN_FILE} is not a screen plan", store.url()))?;
    if plan.format != PLAN_FORMAT {
        bail!(
            "{PLAN_FILE} is format {:?}, expected {PLAN_FORMAT:?}",
            plan.format
        );
    }
    Ok(plan)
}

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

/// Why a unit stopped before finishing.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unit interrupted")
    }
}

impl std::error::Error for Interrupted {}

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
    ) -> anyhow::Result<(Tensor, Vec<f32>, Option<Tensor>)> {
        let batch = self.plan.spec.execution.batch as usize;
        let cached = own_genes.is_none()
            && cells
                .iter()
                .all(|c| self.originals.borrow().contains_key(c));
        let mut own = Vec::new();
        if !cached {
            for chunk in cells.chunks(batch) {
                if stop.load(Ordering::Relaxed) {
                    return Err(Interrupted.into());
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
    pub fn compute_unit(&self, unit: usize, stop: &AtomicBool) -> anyhow::Result<UnitResult> {
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
                return Err(Interrupted.into());
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

/// How long to wait between lease attempts when no unit is free.
const IDLE_POLL: Duration = Duration::from_millis(300);

/// Serves a screen as a fleet worker: loads it once, then leases, computes, stores and completes units
/// until none is left or `stop` is set. A load failure is reported against a leased unit, so a screen
/// that no worker can load fails instead of waiting forever.
pub fn serve_screen(
    assignment: pb::ScreenAssignment,
    worker_id: &str,
    device: Device,
    client: CoordinatorClient<Channel>,
    handle: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let s3 = S3Options {
        endpoint: (!assignment.s3_endpoint.is_empty()).then(|| assignment.s3_endpoint.clone()),
        region: (!assignment.s3_region.is_empty()).then(|| assignment.s3_region.clone()),
        ..S3Options::default()
    };
    let id = assignment.screen_id.clone();
    let call = |what: &str| format!("screen {id}: {what}");
    let lease = || -> anyhow::Result<pb::LeaseUnitResponse> {
        let mut request = tonic::Request::new(pb::LeaseUnitRequest {
            worker_id: worker_id.to_string(),
            screen_id: id.clone(),
        });
        request.set_timeout(Duration::from_secs(10));
        Ok(handle
            .block_on(client.clone().lease_unit(request))
            .map_err(|s| anyhow!("{}", s.message()))
            .with_context(|| call("leasing a unit"))?
            .into_inner())
    };
    let complete = |request: pb::CompleteUnitRequest| -> anyhow::Result<pb::CompleteUnitResponse> {
        let started = Instant::now();
        loop {
            let mut r = tonic::Request::new(request.clone());
            r.set_timeout(Duration::from_secs(10));
            match handle.block_on(client.clone().complete_unit(r)) {
                Ok(answer) => return Ok(answer.into_inner()),
                // Retried through a coordinator restart: the result is stored; only the record is due.
                Err(status) if started.elapsed() < Duration::from_secs(120) => {
                    tracing::info!("completing unit {}: {}", request.unit, status.message());
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(status) => bail!(
                    "{}",
                    call(&format!(
                        "completing unit {}: {}",
                        request.unit,
                        status.message()
                    ))
                ),
            }
        }
    };
    let started = Instant::now();
    let load = || -> anyhow::Result<(Screener, Store)> {
        let store = open_location(&assignment.location, &s3)?;
        let plan = load_plan(&store, &assignment.plan_blake3)?;
        Ok((
            Screener::load(plan, &assignment.plan_blake3, &s3, device)?,
            store,
        ))
    };
    // A failed load is reported against a leased unit and tried again: three reports fail the screen,
    // so a screen no worker can load ends with the reason instead of waiting forever.
    let (screener, store) = loop {
        match load() {
            Ok(loaded) => break loaded,
            Err(e) => {
                let message = format!("{e:#}");
                eprintln!("{}", call(&format!("cannot load: {message}")));
                let answer = lease()?;
                if answer.leased {
                    complete(pb::CompleteUnitRequest {
                        worker_id: worker_id.to_string(),
                        screen_id: id.clone(),
                        unit: answer.unit,
                        token: answer.token,
                        error: format!("worker {worker_id} cannot load the screen: {message}"),
                        ..Default::default()
                    })?;
                } else if answer.state != "running" {
                    return Err(e);
                }
                if stop.load(Ordering::Relaxed) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    };
    eprintln!(
        "screen {id}: loaded {} (checkpoint step {}) in {:.2}s",
        screener.plan.summary(),
        screener.plan.checkpoint.step,
        started.elapsed().as_secs_f64()
    );
    let units = screener.plan.unit_count();
    while !stop.load(Ordering::Relaxed) {
        let answer = match lease() {
            Ok(a) => a,
            Err(e) => {
                tracing::info!("{e:#}");
                std::thread::sleep(IDLE_POLL);
                continue;
            }
        };
        if !answer.leased {
            if answer.state != "running" {
                eprintln!("screen {id} is {}; no more units here", answer.state);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(answer.retry_after_ms.clamp(50, 5000)));
            continue;
        }
        let unit = answer.unit as usize;
        if unit >= units {
            bail!(
                "{}",
                call(&format!(
                    "the coordinator leased unit {unit}, the plan has {units}"
                ))
            );
        }
        // The lease is renewed in the background; losing it (or being told to stop) interrupts the unit.
        let lost = Arc::new(AtomicBool::new(false));
        let done = Arc::new(tokio::sync::Notify::new());
        let renewer = {
            let (client, lost, done, stop) =
                (client.clone(), lost.clone(), done.clone(), stop.clone());
            let request = pb::RenewUnitRequest {
                worker_id: worker_id.to_string(),
                screen_id: id.clone(),
                unit: answer.unit,
                token: answer.token,
            };
            let every = Duration::from_millis((answer.lease_ms / 3).max(100));
            handle.spawn(async move {
                let mut renewed = Instant::now();
                loop {
                    // Checks the stop flag often, so an Idle order interrupts the unit within a batch.
                    tokio::select! {
                        _ = done.notified() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if stop.load(Ordering::Relaxed) {
                        lost.store(true, Ordering::Relaxed);
                        return;
                    }
                    if renewed.elapsed() < every {
                        continue;
                    }
                    renewed = Instant::now();
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(Duration::from_secs(10));
                    match client.clone().renew_unit(call).await {
                        Ok(r) if !r.get_ref().held => {
                            eprintln!("unit {} lease lost: {}", request.unit, r.get_ref().reason);
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                        Ok(_) => {}
                        Err(status) => {
                            tracing::info!("renewing unit {}: {}", request.unit, status.message())
                        }
                    }
                }
            })
        };
        let unit_started = Instant::now();
        let computed = screener.compute_unit(unit, &lost);
        // The lease stays renewed through the upload and the completion.
        let stop_renewing = || {
            done.notify_one();
            let _ = handle.block_on(renewer);
        };
        // A failed unit is reported with the reason (three failures of one unit fail the screen).
        let report_failure = |message: String| -> anyhow::Result<()> {
            eprintln!("{}", call(&format!("unit {unit} failed: {message}")));
            complete(pb::CompleteUnitRequest {
                worker_id: worker_id.to_string(),
                screen_id: id.clone(),
                unit: answer.unit,
                token: answer.token,
                error: message,
                ..Default::default()
            })?;
            Ok(())
        };
        let outcome = (|| -> anyhow::Result<()> {
            let result = match computed {
                Ok(result) => result,
                Err(e) if e.is::<Interrupted>() => return Ok(()),
                Err(e) => return report_failure(format!("{e:#}")),
            };
            let bytes = result.encode();
            let key = unit_key(unit);
            let blake3 = blake3::hash(&bytes).to_hex().to_string();
            let size = bytes.len() as u64;
            if let Err(e) = store.put(&key, bytes.into()) {
                return report_failure(format!("storing {key}: {e}"));
            }
            let seconds = unit_started.elapsed().as_secs_f64();
            let answer = complete(pb::CompleteUnitRequest {
                worker_id: worker_id.to_string(),
                screen_id: id.clone(),
                unit: answer.unit,
                token: answer.token,
                key,
                blake3,
                bytes: size,
                pairs: result.pairs() as u64,
                seconds,
                error: String::new(),
            })?;
            eprintln!(
                "screen {id} unit {unit}/{units}: {} pairs in {seconds:.2}s ({:.0} pairs/s){}",
                result.pairs(),
                result.pairs() as f64 / seconds.max(1e-9),
                if answer.accepted {
                    String::new()
                } else {
                    format!(" (not recorded: {})", answer.reason)
                }
            );

            Ok(())
        })();
        stop_renewing();
        outcome?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_screen_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configs/screen-kang.toml");
        let spec = read_spec(&path).unwrap();
        assert_eq!(spec.genes, GeneSelection::Keyword("all".into()));
        assert_eq!(spec.embedding, CellEmbedding::Expression);
        let goal = spec.goal.unwrap();
        assert_eq!(goal.match_column.as_deref(), Some("cell_type"));
        assert_eq!(spec.cells.filter["condition"].values(), vec!["stimulated"]);
    }

    #[test]
    fn spec_errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "checkpoint = \"c\"\ncorpus = \"k\"\nout = \"o\"\ngenes = \"some\"\n",
        )
        .unwrap();
        let err = read_spec(&path).unwrap_err().to_string();
        assert!(
            err.contains("s.toml") && err.contains("genes = \"some\""),
            "{err}"
        );
        std::fs::write(&path, "checkpoint = \"c\"\ncorpus = \"k\"\nout = \"o\"\ngenes = \"all\"\n[execution]\nbatch = 0\n").unwrap();
        let err = read_spec(&path).unwrap_err().to_string();
        assert!(err.contains("execution.batch = 0"), "{err}");
    }

    #[test]
    fn samples_are_seeded_sorted_and_capped() {
        let items: Vec<u64> = (0..1000).collect();
        let a = SplitMix::new(7, "cells").sample(items.clone(), 10);
        assert_eq!(a, SplitMix::new(7, "cells").sample(items.clone(), 10));
        assert_ne!(a, SplitMix::new(8, "cells").sample(items.clone(), 10));
        assert_ne!(a, SplitMix::new(7, "genes").sample(items.clone(), 10));
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.len() == 10);
        assert_eq!(SplitMix::new(7, "cells").sample(items.clone(), 5000), items);
    }
}
