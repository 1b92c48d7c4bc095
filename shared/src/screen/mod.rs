//! In-silico perturbation screens without tensors: the screen specification, the resolved plan that
//! every worker reads (which genes and cells, cut into work units), the binary result of one unit, and
//! the merge of unit results into per-gene effects with statistics against a random-gene null.
//!
//! A unit is a block of genes x a block of cells. Its result lives under a deterministic key
//! ([`unit_key`]), so a unit computed twice (after a lost lease) overwrites its own object, and the merge
//! takes each unit exactly once, in unit order, whatever order the units completed in.

pub mod stats;

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::screen::stats::{benjamini_hochberg, mann_whitney};

pub const PLAN_FORMAT: &str = "cellfleet-screen-plan/1";
pub const PLAN_FILE: &str = "plan.json";
const UNIT_MAGIC: &[u8] = b"cellfleet-screen-unit/1\n";

#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("{0}")]
    Spec(String),
    #[error("{key}: {why}")]
    UnitResult { key: String, why: String },
    #[error("screen results: {0}")]
    Merge(String),
}

pub type Result<T, E = ScreenError> = std::result::Result<T, E>;

/// What a user writes (TOML or JSON): which checkpoint, which cells, which genes, which perturbation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenSpec {
    /// A checkpoint run location (its newest valid checkpoint) or one checkpoint (`RUN/step-000000000300`).
    pub checkpoint: String,
    /// The cells to perturb: a corpus ingested with the checkpoint's vocabulary (`ingest --genes`).
    pub corpus: String,
    /// Where the plan and the unit results are stored (a path, `file://` or `s3://`).
    pub out: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub cells: CellSelection,
    /// `"all"` (the whole vocabulary), a list of gene names, or `{ file = "genes.txt" }` (one per line).
    pub genes: GeneSelection,
    #[serde(default)]
    pub perturbation: Perturbation,
    /// Which representation of a cell the shifts compare.
    #[serde(default)]
    pub embedding: CellEmbedding,
    #[serde(default)]
    pub goal: Option<GoalSpec>,
    #[serde(default)]
    pub null: NullSpec,
    #[serde(default)]
    pub execution: Execution,
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_region: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSelection {
    /// Label column -> accepted value(s), e.g. `{ condition = "stimulated" }`; all must hold.
    #[serde(default)]
    pub filter: BTreeMap<String, OneOrMany>,
    /// At most this many cells (a seeded random sample of the matching ones).
    #[serde(default)]
    pub max_cells: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn values(&self) -> Vec<String> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GeneSelection {
    /// `"all"`.
    Keyword(String),
    List(Vec<String>),
    File {
        file: String,
    },
}

/// How a gene is perturbed in a cell's token sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Perturbation {
    #[serde(default)]
    pub kind: PerturbationKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PerturbationKind {
    /// The gene's bin becomes 0; its token stays where it is.
    #[default]
    Knockout,
    /// The gene's token is removed from the sequence.
    Delete,
    /// The gene's bin becomes the top bin and its token moves to the front (right after `[CLS]`).
    Overexpress,
}

impl PerturbationKind {
    pub fn name(self) -> &'static str {
        match self {
            PerturbationKind::Knockout => "knockout",
            PerturbationKind::Delete => "delete",
            PerturbationKind::Overexpress => "overexpress",
        }
    }

    /// Whether perturbing a gene whose bin is `bin` changes anything: removing a gene a cell does not
    /// express is no perturbation, so knockouts and deletions only touch expressed genes.
    pub fn applies(self, bin: u8) -> bool {
        match self {
            PerturbationKind::Knockout | PerturbationKind::Delete => bin > 0,
            PerturbationKind::Overexpress => true,
        }
    }
}

/// The representation of a cell that effects are measured in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellEmbedding {
    /// The expression the model reads out for every vocabulary gene: its expected bin at each gene token
    /// (the bin head's softmax times the bin values). Shifts then read in the units of the data, and the
    /// model's context effects appear as changed expectations of the other genes.
    #[default]
    Expression,
    /// The mean of the final hidden states over gene tokens (Geneformer's cell embedding).
    Hidden,
}

impl CellEmbedding {
    pub fn name(self) -> &'static str {
        match self {
            CellEmbedding::Expression => "expression",
            CellEmbedding::Hidden => "hidden",
        }
    }
}

/// The phenotype the screen looks for moves toward: the embedding centroid of these cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoalSpec {
    pub column: String,
    pub value: String,
    /// Other states of the same column, each reported like the goal.
    #[serde(default)]
    pub alternatives: Vec<String>,
    /// Cells per centroid at most (a seeded sample).
    #[serde(default = "default_centroid_cells")]
    pub max_cells: u64,
    /// Compare each cell with the states' centroids among cells of its own kind (e.g. `cell_type`): a
    /// stimulated B cell moves toward control B cells, not toward the average control cell, so knocking
    /// out a cell-type marker does not pass for a move toward the goal.
    #[serde(default)]
    pub match_column: Option<String>,
}

fn default_centroid_cells() -> u64 {
    500
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullSpec {
    /// Random vocabulary genes perturbed like the screened ones; their per-cell effects are the null.
    #[serde(default = "default_null_genes")]
    pub genes: u32,
}

fn default_null_genes() -> u32 {
    20
}

impl Default for NullSpec {
    fn default() -> Self {
        Self {
            genes: default_null_genes(),
        }
    }
}

/// How the work is cut and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Execution {
    /// Genes per work unit.
    #[serde(default = "default_gene_block")]
    pub gene_block: u32,
    /// Cells per work unit.
    #[serde(default = "default_cell_block")]
    pub cell_block: u32,
    /// Perturbed sequences per forward pass.
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// A unit's lease lasts this long without renewal (its holder renews it three times as often).
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u32,
    /// libtorch intra-op threads per worker.
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// Also write the per-(gene, cell) table.
    #[serde(default)]
    pub per_cell: bool,
    /// Affected genes reported per screened gene.
    #[serde(default = "default_top_affected")]
    pub top_affected: u32,
}

fn default_gene_block() -> u32 {
    32
}
fn default_cell_block() -> u32 {
    64
}
fn default_batch() -> u32 {
    32
}
fn default_lease_seconds() -> u32 {
    60
}
fn default_threads() -> u32 {
    1
}
fn default_top_affected() -> u32 {
    5
}

impl Default for Execution {
    fn default() -> Self {
        Self {
            gene_block: default_gene_block(),
            cell_block: default_cell_block(),
            batch: default_batch(),
            lease_seconds: default_lease_seconds(),
            threads: default_threads(),
            per_cell: false,
            top_affected: default_top_affected(),
        }
    }
}

impl ScreenSpec {
    /// Checks what can be checked without opening the corpus or the checkpoint.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ScreenError::Spec(why));
        for (field, value) in [
            ("checkpoint", &self.checkpoint),
            ("corpus", &self.corpus),
            ("out", &self.out),
        ] {
            if value.trim().is_empty() {
                return bad(format!("`{field}` is empty: it must name a location"));
            }
        }
        match &self.genes {
            GeneSelection::Keyword(k) if k != "all" => {
                return bad(format!(
                    "genes = {k:?}: expected \"all\", a list of gene names, or {{ file = \"genes.txt\" }}"
                ))
            }
            GeneSelection::List(list) if list.is_empty() => {
                return bad("genes = []: the gene list is empty; name at least one gene, or use \"all\"".into())
            }
            _ => {}
        }
        if self.cells.max_cells == Some(0) {
            return bad("cells.max_cells = 0: at least one cell is needed".into());
        }
        for (column, values) in &self.cells.filter {
            if values.values().is_empty() {
                return bad(format!("cells.filter.{column} lists no values"));
            }
        }
        if let Some(goal) = &self.goal {
            let mut suffixes = std::collections::BTreeSet::new();
            for alternative in &goal.alternatives {
                if !suffixes.insert(column_suffix(alternative)) {
                    return bad(format!(
                        "goal.alternatives: {alternative:?} repeats another alternative or gives the same column name (shift_to_{})",
                        column_suffix(alternative)
                    ));
                }
            }
            if goal.alternatives.contains(&goal.value) {
                return bad(format!(
                    "goal.alternatives repeats the goal value {:?}",
                    goal.value
                ));
            }
            if goal.max_cells == 0 {
                return bad("goal.max_cells = 0: a centroid needs at least one cell".into());
            }
        }
        let e = &self.execution;
        for (field, value) in [
            ("execution.gene_block", e.gene_block),
            ("execution.cell_block", e.cell_block),
            ("execution.batch", e.batch),
            ("execution.lease_seconds", e.lease_seconds),
            ("execution.threads", e.threads),
        ] {
            if value == 0 {
                return bad(format!("{field} = 0: must be at least 1"));
            }
        }
        Ok(())
    }
}

/// A state's value as it appears in column names (`shift_to_<suffix>`): lower-case ASCII letters and
/// digits, anything else `_`.
pub fn column_suffix(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The checkpoint a screen reads, identified so results can be traced to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointId {
    /// The run location.
    pub url: String,
    pub step: u64,
    /// blake3 of the checkpoint's manifest.json: every worker checks it reads this exact checkpoint.
    pub manifest_blake3: String,
}

/// A named set of cells whose embedding centroid is a phenotype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateCells {
    pub name: String,
    pub cells: Vec<u64>,
    /// Per cell, its stratum (index into [`ScreenPlan::strata`]); empty without matching.
    #[serde(default)]
    pub strata: Vec<u32>,
}

/// The resolved screen, stored as `plan.json` at the screen's location: everything a worker needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenPlan {
    pub format: String,
    pub spec: ScreenSpec,
    pub checkpoint: CheckpointId,
    pub corpus_url: String,
    pub corpus_manifest_blake3: String,
    /// The vocabulary (token order), shared by checkpoint and corpus.
    pub vocabulary: Vec<String>,
    pub n_bins: u16,
    /// Screened genes (vocabulary positions, ascending).
    pub genes: Vec<u32>,
    /// The random-gene null (vocabulary positions, ascending).
    pub null_genes: Vec<u32>,
    /// What the units cover: screened and null genes, ascending, each once.
    pub work_genes: Vec<u32>,
    /// Perturbed cells (corpus positions, ascending) and their names.
    pub cells: Vec<u64>,
    pub cell_names: Vec<String>,
    /// The goal state first, then the alternatives (empty without a goal).
    pub states: Vec<StateCells>,
    /// With `goal.match_column`: its categories, and each perturbed cell's (index here).
    #[serde(default)]
    pub strata: Vec<String>,
    #[serde(default)]
    pub cell_strata: Vec<u32>,
    /// (gene, cell) pairs the perturbation applies to, per unit.
    pub unit_pairs: Vec<u64>,
}

/// The genes and cells of one unit, as ranges of `work_genes` and `cells`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpan {
    pub genes: Range<usize>,
    pub cells: Range<usize>,
}

impl ScreenPlan {
    fn cell_blocks(&self) -> usize {
        self.cells
            .len()
            .div_ceil(self.spec.execution.cell_block as usize)
    }

    /// Units are numbered gene block major: unit `u` is gene block `u / cell_blocks`, cell block
    /// `u % cell_blocks`.
    pub fn unit_count(&self) -> usize {
        self.work_genes
            .len()
            .div_ceil(self.spec.execution.gene_block as usize)
            * self.cell_blocks()
    }

    pub fn unit(&self, unit: usize) -> UnitSpan {
        let (gb, cb) = (unit / self.cell_blocks(), unit % self.cell_blocks());
        let (g, c) = (
            self.spec.execution.gene_block as usize,
            self.spec.execution.cell_block as usize,
        );
        UnitSpan {
            genes: gb * g..((gb + 1) * g).min(self.work_genes.len()),
            cells: cb * c..((cb + 1) * c).min(self.cells.len()),
        }
    }

    pub fn total_pairs(&self) -> u64 {
        self.unit_pairs.iter().sum()
    }

    /// The goal state's name, when there is one.
    pub fn goal(&self) -> Option<&str> {
        self.states.first().map(|s| s.name.as_str())
    }

    /// A one-line description for logs and status.
    pub fn summary(&self) -> String {
        format!(
            "{} of {} genes in {} cells, null of {} random genes{}",
            self.spec.perturbation.kind.name(),
            self.genes.len(),
            self.cells.len(),
            self.null_genes.len(),
            self.goal()
                .map(|g| format!(", goal {g}"))
                .unwrap_or_default()
        )
    }
}

/// Object key of unit `unit`'s result, relative to the screen's location.
pub fn unit_key(unit: usize) -> String {
    format!("units/unit-{unit:06}.bin.zst")
}

/// The result of one unit: one record per (gene, cell) pair the perturbation applies to, in gene-major
/// order, and per gene the summed change of every vocabulary gene's expected bin.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitResult {
    pub unit: u32,
    /// blake3 of the plan it was computed for.
    pub plan_blake3: String,
    pub genes: Vec<u32>,
    pub n_vocabulary: u32,
    pub n_states: u32,
    pub pair_gene: Vec<u32>,
    pub pair_cell: Vec<u64>,
    /// 1 - cos(perturbed, original) per pair.
    pub cosine_shift: Vec<f32>,
    /// Per pair, per state: cos(perturbed, state) - cos(original, state) (`pairs x n_states`).
    pub state_shift: Vec<f32>,
    /// Per pair, per state: how far the perturbation moves the cell along the axis from the perturbed
    /// population's centroid to the state's, as a fraction of that axis (`pairs x n_states`).
    pub state_progress: Vec<f32>,
    /// Per unit gene, per vocabulary gene: the sum over this unit's cells of (perturbed - original)
    /// expected bin (`genes x n_vocabulary`; the perturbed gene's own entry is 0).
    pub delta_bin_sum: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct UnitHeader {
    unit: u32,
    plan_blake3: String,
    genes: Vec<u32>,
    n_vocabulary: u32,
    n_states: u32,
    pairs: u64,
}

fn put_le<T: Copy>(out: &mut Vec<u8>, values: &[T], to_le: impl Fn(T) -> Vec<u8>) {
    for &v in values {
        out.extend(to_le(v));
    }
}

impl UnitResult {
    pub fn pairs(&self) -> usize {
        self.pair_gene.len()
    }

    /// The stored form: a magic line, a JSON header, little-endian arrays, all zstd-compressed.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&UnitHeader {
            unit: self.unit,
            plan_blake3: self.plan_blake3.clone(),
            genes: self.genes.clone(),
            n_vocabulary: self.n_vocabulary,
            n_states: self.n_states,
            pairs: self.pairs() as u64,
        })
        .expect("a header always serializes");
        let mut raw = Vec::with_capacity(
            64 + header.len()
                + self.pairs() * (16 + 4 * self.n_states as usize)
                + self.delta_bin_sum.len() * 4,
        );
        raw.extend_from_slice(UNIT_MAGIC);
        raw.extend((header.len() as u32).to_le_bytes());
        raw.extend(header);
        put_le(&mut raw, &self.pair_gene, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.pair_cell, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.cosine_shift, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.state_shift, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.state_progress, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.delta_bin_sum, |v| v.to_le_bytes().to_vec());
        zstd::bulk::compress(&raw, 3).expect("compressing to memory cannot fail")
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| ScreenError::UnitResult {
            key: key.to_string(),
            why,
        };
        let raw = zstd::stream::decode_all(bytes).map_err(|e| bad(format!("not zstd: {e}")))?;
        let rest = raw
            .strip_prefix(UNIT_MAGIC)
            .ok_or_else(|| bad("not a cellfleet screen unit result".into()))?;
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let slice = rest
                .get(at..at + n)
                .ok_or_else(|| bad(format!("truncated at byte {at} (needs {n} more)")))?;
            at += n;
            Ok(slice)
        };
        let header_len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let header: UnitHeader = serde_json::from_slice(take(header_len)?)
            .map_err(|e| bad(format!("unreadable header: {e}")))?;
        let pairs = header.pairs as usize;
        let states = header.n_states as usize;
        let pair_gene = take(pairs * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let pair_cell = take(pairs * 8)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let cosine_shift = floats(take(pairs * 4)?);
        let state_shift = floats(take(pairs * states * 4)?);
        let state_progress = floats(take(pairs * states * 4)?);
        let delta_bin_sum = floats(take(header.genes.len() * header.n_vocabulary as usize * 4)?);
        if at != rest.len() {
            return Err(bad(format!(
                "{} unexpected bytes at the end",
                rest.len() - at
            )));
        }
        Ok(Self {
            unit: header.unit,
            plan_blake3: header.plan_blake3,
            genes: header.genes,
            n_vocabulary: header.n_vocabulary,
            n_states: header.n_states,
            pair_gene,
            pair_cell,
            cosine_shift,
            state_shift,
            state_progress,
            delta_bin_sum,
        })
    }
}

/// One row of the per-gene table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GeneEffect {
    pub gene: String,
    /// Position in the vocabulary.
    pub gene_id: u32,
    /// Cells the perturbation applied to (for knockouts: cells expressing the gene).
    pub n_cells: u64,
    /// Mean over those cells of 1 - cos(perturbed, original).
    pub cosine_shift: f64,
    /// Mean shift toward each state (goal first, then alternatives): cos(perturbed, state) -
    /// cos(original, state).
    pub state_shift: Vec<f64>,
    /// Mean progress toward each state: the move along the axis from the perturbed cells' centroid to the
    /// state's centroid (within the cell's stratum), as a fraction of the axis.
    pub state_progress: Vec<f64>,
    /// Two-sided rank-sum p-value of the per-cell effect (the goal progress with a goal, otherwise the
    /// cosine shift) against the random-gene null; NaN when untestable.
    pub p_value: f64,
    /// Benjamini-Hochberg q-value over the screened genes with a p-value.
    pub fdr: f64,
    /// 1 = strongest: by goal progress (toward the goal) with a goal, otherwise by cosine shift.
    pub rank: u32,
    /// Also one of the null's random genes.
    pub null_gene: bool,
    /// The genes whose expected bin this perturbation changes most (mean over cells, signed).
    pub top_affected: Vec<(String, f64)>,
}

/// One row of the per-(gene, cell) table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairEffect {
    pub gene_id: u32,
    pub cell: u64,
    pub cosine_shift: f32,
    pub state_shift: Vec<f32>,
    pub state_progress: Vec<f32>,
}

/// The merged screen.
#[derive(Debug, Clone, PartialEq)]
pub struct ScreenResults {
    /// Sorted by rank.
    pub genes: Vec<GeneEffect>,
    /// Every (gene, cell) pair in (gene, cell) order, when kept.
    pub pairs: Option<Vec<PairEffect>>,
    pub total_pairs: u64,
}

/// Per work gene: the per-cell values in cell order and the summed expected-bin changes.
struct GeneAccumulator {
    cells: Vec<u64>,
    cosine: Vec<f32>,
    /// `states x cells`, state-major.
    states: Vec<Vec<f32>>,
    progress: Vec<Vec<f32>>,
    delta_bin: Vec<f64>,
}

/// Merges unit results: each unit exactly once, in unit order.
pub struct Merger<'a> {
    plan: &'a ScreenPlan,
    plan_blake3: String,
    seen: Vec<bool>,
    results: BTreeMap<u32, UnitResult>,
}

impl<'a> Merger<'a> {
    pub fn new(plan: &'a ScreenPlan, plan_blake3: &str) -> Self {
        Self {
            plan,
            plan_blake3: plan_blake3.to_string(),
            seen: vec![false; plan.unit_count()],
            results: BTreeMap::new(),
        }
    }

    /// Takes one unit's result after checking it is the unit the plan describes.
    pub fn add(&mut self, key: &str, result: UnitResult) -> Result<()> {
        let bad = |why: String| ScreenError::UnitResult {
            key: key.to_string(),
            why,
        };
        let unit = result.unit as usize;
        if unit >= self.seen.len() {
            return Err(bad(format!(
                "unit {unit} does not exist (the plan has {})",
                self.seen.len()
            )));
        }
        if self.seen[unit] {
            return Err(bad(format!("unit {unit} given twice")));
        }
        if result.plan_blake3 != self.plan_blake3 {
            return Err(bad(format!(
                "computed for plan {}, this screen's plan is {}",
                result.plan_blake3, self.plan_blake3
            )));
        }
        let span = self.plan.unit(unit);
        if result.genes[..] != self.plan.work_genes[span.genes.clone()] {
            return Err(bad(format!(
                "unit {unit} holds other genes than the plan says"
            )));
        }
        let (states, vocabulary) = (self.plan.states.len(), self.plan.vocabulary.len());
        if result.n_states as usize != states || result.n_vocabulary as usize != vocabulary {
            return Err(bad(format!(
                "unit {unit} has {} states and {} genes, the plan {states} and {vocabulary}",
                result.n_states, result.n_vocabulary
            )));
        }
        let pairs = result.pairs();
        if result.pair_cell.len() != pairs
            || result.cosine_shift.len() != pairs
            || result.state_shift.len() != pairs * states
            || result.state_progress.len() != pairs * states
            || result.delta_bin_sum.len() != result.genes.len() * vocabulary
        {
            return Err(bad(format!("unit {unit}: its arrays disagree in length")));
        }
        if result.pairs() as u64 != self.plan.unit_pairs[unit] {
            return Err(bad(format!(
                "unit {unit} holds {} pairs, the plan says {}",
                result.pairs(),
                self.plan.unit_pairs[unit]
            )));
        }
        let cells = &self.plan.cells[span.cells];
        let in_unit = |g: u32, c: u64| result.genes.contains(&g) && cells.binary_search(&c).is_ok();
        if let Some(i) =
            (0..result.pairs()).find(|&i| !in_unit(result.pair_gene[i], result.pair_cell[i]))
        {
            return Err(bad(format!(
                "pair (gene {}, cell {}) is outside unit {unit}",
                result.pair_gene[i], result.pair_cell[i]
            )));
        }
        // Pairs come gene-major in cell order: strictly increasing, so none repeats.
        let position = |i: usize| {
            let gene = result.genes.iter().position(|&g| g == result.pair_gene[i]);
            (gene, result.pair_cell[i])
        };
        if let Some(i) = (1..pairs).find(|&i| position(i - 1) >= position(i)) {
            return Err(bad(format!(
                "unit {unit}: pair (gene {}, cell {}) is out of order or repeated",
                result.pair_gene[i], result.pair_cell[i]
            )));
        }
        self.seen[unit] = true;
        self.results.insert(result.unit, result);
        Ok(())
    }

    pub fn missing(&self) -> Vec<usize> {
        (0..self.seen.len()).filter(|&u| !self.seen[u]).collect()
    }

    /// Per-gene effects and statistics; `keep_pairs` also returns every pair.
    pub fn finish(self, keep_pairs: bool) -> Result<ScreenResults> {
        let missing = self.missing();
        if !missing.is_empty() {
            return Err(ScreenError::Merge(format!(
                "{} of {} units have no result (first: unit {})",
                missing.len(),
                self.seen.len(),
                missing[0]
            )));
        }
        let plan = self.plan;
        let n_states = plan.states.len();
        let n_vocab = plan.vocabulary.len();
        let mut acc: BTreeMap<u32, GeneAccumulator> = plan
            .work_genes
            .iter()
            .map(|&g| {
                (
                    g,
                    GeneAccumulator {
                        cells: Vec::new(),
                        cosine: Vec::new(),
                        states: vec![Vec::new(); n_states],
                        progress: vec![Vec::new(); n_states],
                        delta_bin: vec![0.0; n_vocab],
                    },
                )
            })
            .collect();
        let mut pairs = keep_pairs.then(Vec::new);
        let mut total = 0u64;
        for result in self.results.values() {
            for i in 0..result.pairs() {
                let a = acc.get_mut(&result.pair_gene[i]).expect("checked in add");
                a.cells.push(result.pair_cell[i]);
                a.cosine.push(result.cosine_shift[i]);
                for (s, values) in a.states.iter_mut().enumerate() {
                    values.push(result.state_shift[i * n_states + s]);
                }
                for (s, values) in a.progress.iter_mut().enumerate() {
                    values.push(result.state_progress[i * n_states + s]);
                }
                total += 1;
            }
            for (k, g) in result.genes.iter().enumerate() {
                let a = acc.get_mut(g).expect("checked in add");
                let row = &result.delta_bin_sum[k * n_vocab..(k + 1) * n_vocab];
                for (sum, &d) in a.delta_bin.iter_mut().zip(row) {
                    *sum += f64::from(d);
                }
            }
        }
        if total != plan.total_pairs() {
            return Err(ScreenError::Merge(format!(
                "{total} pairs merged, the plan has {}",
                plan.total_pairs()
            )));
        }
        if let Some(out) = pairs.as_mut() {
            for (&g, a) in &acc {
                for (i, &cell) in a.cells.iter().enumerate() {
                    out.push(PairEffect {
                        gene_id: g,
                        cell,
                        cosine_shift: a.cosine[i],
                        state_shift: a.states.iter().map(|s| s[i]).collect(),
                        state_progress: a.progress.iter().map(|s| s[i]).collect(),
                    });
                }
            }
        }
        // The per-cell statistic tested against the null.
        let primary = |a: &GeneAccumulator| -> Vec<f64> {
            match a.progress.first() {
                Some(goal) => goal.iter().map(|&v| f64::from(v)).collect(),
                None => a.cosine.iter().map(|&v| f64::from(v)).collect(),
            }
        };
        let null_values: Vec<(u32, Vec<f64>)> = plan
            .null_genes
            .iter()
            .map(|g| (*g, primary(&acc[g])))
            .collect();
        let mean = |v: &[f32]| -> f64 {
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
            }
        };
        let top_k = plan.spec.execution.top_affected as usize;
        let mut rows: Vec<GeneEffect> = plan
            .genes
            .iter()
            .map(|&g| {
                let a = &acc[&g];
                let values = primary(a);
                // A null gene is tested against the others, not against itself.
                let null: Vec<f64> = null_values
                    .iter()
                    .filter(|(n, _)| *n != g)
                    .flat_map(|(_, v)| v.iter().copied())
                    .collect();
                let p_value = mann_whitney(&values, &null).map_or(f64::NAN, |(_, p)| p);
                let n = a.cells.len() as f64;
                let mut affected: Vec<(usize, f64)> = a
                    .delta_bin
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != g as usize && n > 0.0)
                    .map(|(j, &s)| (j, s / n))
                    .collect();
                affected.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()).then(x.0.cmp(&y.0)));
                GeneEffect {
                    gene: plan.vocabulary[g as usize].clone(),
                    gene_id: g,
                    n_cells: a.cells.len() as u64,
                    cosine_shift: mean(&a.cosine),
                    state_shift: a.states.iter().map(|s| mean(s)).collect(),
                    state_progress: a.progress.iter().map(|s| mean(s)).collect(),
                    p_value,
                    fdr: f64::NAN,
                    rank: 0,
                    null_gene: plan.null_genes.binary_search(&g).is_ok(),
                    top_affected: affected
                        .into_iter()
                        .take(top_k)
                        .map(|(j, d)| (plan.vocabulary[j].clone(), d))
                        .collect(),
                }
            })
            .collect();
        let tested: Vec<usize> = (0..rows.len())
            .filter(|&i| !rows[i].p_value.is_nan())
            .collect();
        let q = benjamini_hochberg(&tested.iter().map(|&i| rows[i].p_value).collect::<Vec<_>>());
        for (&i, q) in tested.iter().zip(q) {
            rows[i].fdr = q;
        }
        let score = |r: &GeneEffect| -> f64 {
            let s = r.state_progress.first().copied().unwrap_or(r.cosine_shift);
            if s.is_nan() {
                f64::NEG_INFINITY
            } else {
                s
            }
        };
        rows.sort_by(|a, b| {
            score(b)
                .total_cmp(&score(a))
                .then(a.gene_id.cmp(&b.gene_id))
        });
        for (i, r) in rows.iter_mut().enumerate() {
            r.rank = i as u32 + 1;
        }
        Ok(ScreenResults {
            genes: rows,
            pairs,
            total_pairs: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        genes: Vec<u32>,
        null_genes: Vec<u32>,
        cells: Vec<u64>,
        gene_block: u32,
        cell_block: u32,
    ) -> ScreenPlan {
        let mut work: Vec<u32> = genes.iter().chain(&null_genes).copied().collect();
        work.sort_unstable();
        work.dedup();
        let mut plan = ScreenPlan {
            format: PLAN_FORMAT.into(),
            spec: ScreenSpec {
                checkpoint: "ck".into(),
                corpus: "co".into(),
                out: "out".into(),
                seed: 0,
                cells: CellSelection::default(),
                genes: GeneSelection::Keyword("all".into()),
                perturbation: Perturbation::default(),
                embedding: CellEmbedding::default(),
                goal: None,
                null: NullSpec::default(),
                execution: Execution {
                    gene_block,
                    cell_block,
                    ..Execution::default()
                },
                s3_endpoint: None,
                s3_region: None,
            },
            checkpoint: CheckpointId {
                url: "ck".into(),
                step: 1,
                manifest_blake3: "m".into(),
            },
            corpus_url: "co".into(),
            corpus_manifest_blake3: "c".into(),
            vocabulary: (0..6).map(|g| format!("G{g}")).collect(),
            n_bins: 10,
            genes,
            null_genes,
            work_genes: work,
            cell_names: cells.iter().map(|c| format!("cell{c}")).collect(),
            cells,
            states: vec![StateCells {
                name: "goal".into(),
                cells: vec![0],
                strata: Vec::new(),
            }],
            strata: Vec::new(),
            cell_strata: Vec::new(),
            unit_pairs: Vec::new(),
        };
        plan.unit_pairs = (0..plan.unit_count())
            .map(|u| {
                let s = plan.unit(u);
                (s.genes.len() * s.cells.len()) as u64
            })
            .collect();
        plan
    }

    /// Every pair of `unit`, with a goal shift that grows with the gene id.
    fn result(plan: &ScreenPlan, unit: usize) -> UnitResult {
        let span = plan.unit(unit);
        let genes = plan.work_genes[span.genes.clone()].to_vec();
        let mut r = UnitResult {
            unit: unit as u32,
            plan_blake3: "p".into(),
            genes: genes.clone(),
            n_vocabulary: plan.vocabulary.len() as u32,
            n_states: 1,
            pair_gene: Vec::new(),
            pair_cell: Vec::new(),
            cosine_shift: Vec::new(),
            state_shift: Vec::new(),
            state_progress: Vec::new(),
            delta_bin_sum: vec![0.0; genes.len() * plan.vocabulary.len()],
        };
        for (k, &g) in genes.iter().enumerate() {
            for &c in &plan.cells[span.cells.clone()] {
                r.pair_gene.push(g);
                r.pair_cell.push(c);
                r.cosine_shift.push(0.01 * g as f32);
                r.state_shift.push(g as f32 + (c % 7) as f32 * 0.1);
                r.state_progress.push(g as f32 + (c % 5) as f32 * 0.1);
                r.delta_bin_sum[k * plan.vocabulary.len() + (g as usize + 1) % 6] += 0.5;
            }
        }
        r
    }

    #[test]
    fn alternatives_must_give_distinct_columns() {
        let mut spec = plan(vec![0], vec![], vec![0], 1, 1).spec;
        spec.goal = Some(GoalSpec {
            column: "cell_type".into(),
            value: "T".into(),
            alternatives: vec!["B cell".into(), "B-cell".into()],
            max_cells: 10,
            match_column: None,
        });
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("shift_to_b_cell"), "{err}");
        assert_eq!(column_suffix("CD14+ Mono"), "cd14__mono");
    }

    #[test]
    fn units_cover_every_pair_once() {
        let p = plan(vec![0, 1, 2, 3, 4], vec![1, 5], (0..10).collect(), 2, 4);
        assert_eq!(p.work_genes, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p.unit_count(), 3 * 3);
        let mut seen = std::collections::HashSet::new();
        for u in 0..p.unit_count() {
            let s = p.unit(u);
            for g in s.genes.clone() {
                for c in s.cells.clone() {
                    assert!(seen.insert((g, c)));
                }
            }
        }
        assert_eq!(seen.len(), 6 * 10);
    }

    #[test]
    fn unit_results_round_trip_and_reject_damage() {
        let p = plan(vec![0, 1, 2], vec![3], (0..5).collect(), 2, 3);
        let r = result(&p, 1);
        let bytes = r.encode();
        assert_eq!(UnitResult::decode("k", &bytes).unwrap(), r);
        let mut raw = zstd::stream::decode_all(&bytes[..]).unwrap();
        raw.truncate(raw.len() - 3);
        let damaged = zstd::bulk::compress(&raw, 1).unwrap();
        let err = UnitResult::decode("units/x", &damaged)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("units/x") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn merge_is_order_independent_and_counts_each_unit_once() {
        let p = plan(vec![0, 1, 2, 3, 4], vec![0, 1], (0..9).collect(), 2, 4);
        let mut forward = Merger::new(&p, "p");
        for u in 0..p.unit_count() {
            forward.add(&unit_key(u), result(&p, u)).unwrap();
        }
        let mut backward = Merger::new(&p, "p");
        for u in (0..p.unit_count()).rev() {
            backward.add(&unit_key(u), result(&p, u)).unwrap();
        }
        let err = backward
            .add("again", result(&p, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("given twice"), "{err}");
        let a = forward.finish(true).unwrap();
        assert_eq!(a, backward.finish(true).unwrap());
        assert_eq!(a.total_pairs, 5 * 9);
        assert_eq!(a.pairs.as_ref().unwrap().len(), 5 * 9);
        // Ranked by goal shift, which grows with the gene id; gene 4 lies above the null (genes 0, 1).
        let order: Vec<u32> = a.genes.iter().map(|g| g.gene_id).collect();
        assert_eq!(order, vec![4, 3, 2, 1, 0]);
        assert!(a.genes[0].p_value < 0.05 && a.genes[0].fdr >= a.genes[0].p_value);
        assert_eq!(a.genes[0].top_affected[0], ("G5".to_string(), 0.5));
        assert!(a.genes.iter().all(|g| g.n_cells == 9));
        assert!(a.genes.iter().any(|g| g.gene_id == 0 && g.null_gene));
    }

    #[test]
    fn incomplete_or_foreign_results_are_refused() {
        let p = plan(vec![0, 1], vec![], (0..4).collect(), 1, 2);
        let mut m = Merger::new(&p, "p");
        m.add(&unit_key(0), result(&p, 0)).unwrap();
        let mut foreign = result(&p, 1);
        foreign.plan_blake3 = "other".into();
        assert!(m
            .add("u1", foreign)
            .unwrap_err()
            .to_string()
            .contains("plan other"));
        let mut moved = result(&p, 2);
        moved.pair_cell[0] = 3;
        assert!(m
            .add("u2", moved)
            .unwrap_err()
            .to_string()
            .contains("outside unit 2"));
        let mut repeated = result(&p, 3);
        repeated.pair_cell[1] = repeated.pair_cell[0];
        let err = m.add("u3", repeated).unwrap_err().to_string();
        assert!(err.contains("out of order or repeated"), "{err}");
        let err = m.finish(false).unwrap_err().to_string();
        assert!(err.contains("3 of 4 units have no result"), "{err}");
    }
}
