//! The screen specification a user writes (TOML or JSON): which checkpoint, which cells, which genes,
//! which perturbation, the goal state, the null, and how the work is cut; with its validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Result, ScreenError};

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
    /// Which representation of a cell the shifts compare (`embedding` is its old name).
    #[serde(default, alias = "embedding")]
    pub readout: Readout,
    /// Which layer `mean` and `cls` read: -1 the last (after the final norm), 0 the token embeddings,
    /// `k` the output of block `k`; negative values count from the end.
    #[serde(default = "default_layer")]
    pub layer: i32,
    /// Each screened gene perturbed together with an anchor gene, next to each alone.
    #[serde(default)]
    pub combinations: Option<Combinations>,
    /// Count the perturbed genes' own coordinates in the shifts, as screens did before they were left
    /// out. For measuring how much of a ranking that self-effect makes (a knocked-out gene's own readout
    /// falling to 0 moves a cell by construction); rankings computed with it are not findings.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub count_own_genes: bool,
    /// Expressed token layout: how many goal genes every cell's sequence holds, expressed or not, so
    /// that readouts see them (the issue's "readouts that need genes a cell does not express query
    /// them"): the genes whose mean bin differs most between the screened cells and a goal state's
    /// cells, in place of the layout's random sample of unexpressed genes. 0 keeps the sample. No
    /// effect in the full layout (every gene is there) or without a goal. Unset: `DEFAULT_QUERY_GENES`,
    /// written into the plan when it is made (a plan from before this field reads as 0, as it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_genes: Option<u32>,
    #[serde(default)]
    pub goal: Option<GoalSpec>,
    #[serde(default)]
    pub null: NullSpec,
    #[serde(default)]
    pub execution: Execution,
    /// MCMC steering (CellxPert): each perturbation clamps its genes and a Metropolis-Hastings chain
    /// moves the rest of the cell (see `docs/steering.md`); without it, perturbations are token edits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steer: Option<SteerSpec>,
    /// Phenotype transitions (KD-CPT): a fine-tuned state classifier's probabilities before and after
    /// each perturbation, as transition matrices between the classifier's states (see
    /// `docs/transitions.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transitions: Option<TransitionsSpec>,
    /// Gradient gene attribution: per cell, how much each gene's input contributes to a classifier's
    /// state logit against a reference (see `docs/attribution.md`). An attribution screen perturbs
    /// nothing; its units attribute cells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<AttributionSpec>,
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

/// Goal genes each expressed-layout sequence holds unless a spec says otherwise. On Kang (a 256-gene
/// model, 200 stimulated cells toward control) 48-64 ranked the interferon response best (AUROC 0.80-0.81
/// against 0.71 with the random sample alone); 128 fell back to 0.75, its sequences far from the
/// few dozen unexpressed genes pretraining showed.
pub const DEFAULT_QUERY_GENES: u32 = 64;

fn default_layer() -> i32 {
    -1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GeneSelection {
    /// `"all"`.
    Keyword(String),
    List(Vec<String>),
    File(GeneFile),
    /// Named gene sets, each perturbed as one, with optional single genes beside them.
    Sets(GeneSets),
    /// Genes chosen per cell by an attribution screen's ranking.
    Guided(GuidedGenes),
}

/// `{ attribution = "RESULTS", top_k = 10 }`: each cell is perturbed only in its `top_k` expressed
/// genes by attribution (`attribution_ranking.json` of an attribution screen's results at `RESULTS`);
/// with `overall = true`, every cell in the `top_k` genes of the mean attribution instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuidedGenes {
    pub attribution: String,
    pub top_k: u32,
    #[serde(default)]
    pub overall: bool,
}

/// `{ file = "genes.txt" }`: one gene name per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneFile {
    pub file: String,
}

/// `{ singles = [...], sets = { ifn_core = ["STAT1", "IRF9"] } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneSets {
    /// Genes perturbed one at a time besides the sets: `"all"`, a list, or `{ file = ... }`.
    #[serde(default)]
    pub singles: Option<Box<GeneSelection>>,
    /// Set name -> its genes, all perturbed together in each cell.
    pub sets: BTreeMap<String, Vec<String>>,
}

/// `[combinations] anchor = "STAT1"`: for every screened gene g, the pair (anchor, g) perturbed together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Combinations {
    pub anchor: String,
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

/// The representation of a cell that effects are measured in. In each, the perturbed genes' own
/// coordinates (their expected expression, their own token states) count on neither side of a shift:
/// a screen measures what a perturbation does to the rest of the cell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// The expression the model reads out for every vocabulary gene: its expected bin at each gene token
    /// (the bin head's softmax times the bin values), which pretraining trains at unmasked tokens too.
    /// Shifts read in the units of the data; the model's context effects appear as changed expectations
    /// of the other genes.
    #[default]
    #[serde(alias = "expression")]
    Expected,
    /// The mean of a layer's gene-token states (Geneformer's cell embedding).
    #[serde(alias = "hidden")]
    Mean,
    /// The `[CLS]` token's state at a layer.
    Cls,
}

impl Readout {
    pub fn name(self) -> &'static str {
        match self {
            Readout::Expected => "expected",
            Readout::Mean => "mean",
            Readout::Cls => "cls",
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
    /// With gene sets: per set size, this many sets of random vocabulary genes, perturbed like the
    /// screened sets; a set is tested against the random sets of its size, not against single genes.
    #[serde(default = "default_null_sets")]
    pub sets: u32,
}

fn default_null_genes() -> u32 {
    20
}

fn default_null_sets() -> u32 {
    10
}

impl Default for NullSpec {
    fn default() -> Self {
        Self {
            genes: default_null_genes(),
            sets: default_null_sets(),
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
    /// Also write `cells.h5ad`: the per-cell perturbed expected expression as AnnData.
    #[serde(default)]
    pub anndata: bool,
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
            anndata: false,
        }
    }
}

/// `[steer]`: how each perturbation's chains run. Every field names its meaning in `docs/steering.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
    /// `mcmc` (the sampler) or `edit` (the same clamps as one token edit: one forward pass, the
    /// model's expected change added to the cell), for comparing the two on the same screen.
    #[serde(default)]
    pub method: SteerMethod,
    /// Temperature tau of the proposal conditionals and of the pseudo-likelihood target.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Unclamped genes redrawn per proposal.
    #[serde(default = "default_steer_block")]
    pub block: u32,
    /// Forward passes per pseudo-likelihood evaluation (gene j is scored in pass j mod M).
    #[serde(default = "default_target_groups")]
    pub target_groups: u32,
    /// Iterations per chain, burn-in included (the configured limit: a chain not converged by then is
    /// reported as such).
    #[serde(default = "default_iterations")]
    pub iterations: u32,
    #[serde(default = "default_burn_in")]
    pub burn_in: u32,
    /// Keep every `thin`-th state after burn-in.
    #[serde(default = "one")]
    pub thin: u32,
    /// Chains per (perturbation, cell); split R-hat needs at least 2.
    #[serde(default = "default_chains")]
    pub chains: u32,
    /// A record converged when every summary statistic's split R-hat is at most this.
    #[serde(default = "default_rhat_max")]
    pub rhat_max: f64,
    /// Where the clamped bins come from.
    #[serde(default)]
    pub clamp: ClampSource,
    /// With `clamp = "bins"`: gene name -> its clamped bin.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bins: BTreeMap<String, u16>,
    /// A pull toward the medoids of a class of cells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<AnchorSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SteerMethod {
    #[default]
    Mcmc,
    Edit,
}

impl SteerMethod {
    pub fn name(self) -> &'static str {
        match self {
            SteerMethod::Mcmc => "mcmc",
            SteerMethod::Edit => "edit",
        }
    }
}

/// The bins a steered perturbation clamps its genes at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClampSource {
    /// From `perturbation.kind`: knockout 0, overexpress the top bin.
    #[default]
    Perturbation,
    /// The goal state's mean bin (rounded) among the goal cells of the cell's stratum
    /// (`goal.match_column`), e.g. stimulated levels of the same cell type.
    Goal,
    /// `steer.bins`, one bin per gene.
    Bins,
}

/// `[steer.anchor]`: `log pi` gains `-weight * min_k D(x, medoid_k)` over `medoids` medoids of the cells
/// where `column == value` (D: mean squared bin difference over the vocabulary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorSpec {
    pub column: String,
    pub value: String,
    #[serde(default = "default_medoids")]
    pub medoids: u32,
    #[serde(default = "one_f64")]
    pub weight: f64,
    /// Cells the medoids are chosen from at most (a seeded sample).
    #[serde(default = "default_centroid_cells")]
    pub max_cells: u64,
}

fn default_temperature() -> f64 {
    2.0
}
fn default_steer_block() -> u32 {
    16
}
fn default_target_groups() -> u32 {
    4
}
fn default_iterations() -> u32 {
    200
}
fn default_burn_in() -> u32 {
    100
}
fn one() -> u32 {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn default_chains() -> u32 {
    4
}
fn default_rhat_max() -> f64 {
    1.1
}
fn default_medoids() -> u32 {
    4
}

impl SteerSpec {
    /// States each chain keeps after burn-in and thinning.
    pub fn retained(&self) -> u32 {
        self.iterations
            .saturating_sub(self.burn_in)
            .div_ceil(self.thin.max(1))
    }

    fn validate(&self, spec: &ScreenSpec) -> Result<()> {
        let bad = |why: String| Err(ScreenError::Spec(why));
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "steer.temperature = {}: must be a positive number (2 is the default; 0.1-2 is the useful range)",
                self.temperature
            ));
        }
        for (field, value) in [
            ("steer.block", self.block),
            ("steer.target_groups", self.target_groups),
            ("steer.iterations", self.iterations),
            ("steer.thin", self.thin),
        ] {
            if value == 0 {
                return bad(format!("{field} = 0: must be at least 1"));
            }
        }
        if self.method == SteerMethod::Mcmc {
            if self.burn_in >= self.iterations {
                return bad(format!(
                    "steer.burn_in = {} is not below steer.iterations = {}: no state would be kept",
                    self.burn_in, self.iterations
                ));
            }
            if self.chains < 2 {
                return bad(format!(
                    "steer.chains = {}: convergence is judged across chains (split R-hat); use at least 2",
                    self.chains
                ));
            }
            if self.retained() < 4 {
                return bad(format!(
                    "steer: {} iterations, burn-in {} and thin {} keep {} states per chain; split R-hat needs at least 4",
                    self.iterations,
                    self.burn_in,
                    self.thin,
                    self.retained()
                ));
            }
            if !(self.rhat_max.is_finite() && self.rhat_max > 1.0) {
                return bad(format!(
                    "steer.rhat_max = {}: must be above 1 (1.1 is usual, 1.01 strict)",
                    self.rhat_max
                ));
            }
        }
        match self.clamp {
            ClampSource::Goal if spec.goal.is_none() => {
                return bad("steer.clamp = \"goal\" clamps genes at the goal state's levels: add a [goal] section".into())
            }
            ClampSource::Bins if self.bins.is_empty() => {
                return bad("steer.clamp = \"bins\" with no steer.bins: no gene would be clamped; give `bins = { GENE = BIN }`".into())
            }
            ClampSource::Perturbation | ClampSource::Goal if !self.bins.is_empty() => {
                return bad("steer.bins is only read with steer.clamp = \"bins\"".into())
            }
            _ => {}
        }
        if spec.perturbation.kind == PerturbationKind::Delete {
            return bad("perturbation.kind = \"delete\" removes a token; a steered perturbation clamps bins: use \"knockout\" (bin 0) or \"overexpress\"".into());
        }
        if spec.combinations.is_some() {
            return bad("[combinations] with [steer] is not supported: steer gene sets instead (genes.sets)".into());
        }
        if spec.readout != Readout::Expected {
            return bad(format!(
                "readout = {:?} with [steer]: a steered cell is a state of bins, so shifts are measured on expression (readout = \"expected\")",
                spec.readout.name()
            ));
        }
        if let Some(anchor) = &self.anchor {
            if self.method == SteerMethod::Edit {
                return bad(
                    "steer.anchor with steer.method = \"edit\": a token edit has no target to pull"
                        .into(),
                );
            }
            if anchor.column.trim().is_empty() || anchor.value.trim().is_empty() {
                return bad("steer.anchor needs a column and a value (the anchor class)".into());
            }
            if anchor.medoids == 0 {
                return bad("steer.anchor.medoids = 0: at least one medoid".into());
            }
            if !(anchor.weight.is_finite() && anchor.weight >= 0.0) {
                return bad(format!(
                    "steer.anchor.weight = {}: must be a non-negative number",
                    anchor.weight
                ));
            }
            if anchor.max_cells == 0 {
                return bad("steer.anchor.max_cells = 0: medoids need at least one cell".into());
            }
        }
        Ok(())
    }
}

/// `[transitions]`: the classifier whose states the transition matrices run between, the start states
/// whose cells are screened, and the threshold below which a transition counts as terminated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionsSpec {
    /// A model `cellfleet finetune --out` wrote (a directory, `file://` or `s3://` location holding
    /// `model.json` and `model.safetensors`), fine-tuned from this screen's checkpoint's model on a
    /// label column of the corpus: its classes are the states. The screen runs this network.
    pub classifier: String,
    /// The start states (rows) whose cells are screened; unset: every class of the classifier. Acts as
    /// a filter on the classifier's label column beside `cells.filter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Vec<String>>,
    /// A transition a perturbation takes from at least this probability to below it is terminated.
    #[serde(default = "default_terminate_below")]
    pub terminate_below: f64,
}

fn default_terminate_below() -> f64 {
    0.05
}

impl TransitionsSpec {
    fn validate(&self, spec: &ScreenSpec) -> Result<()> {
        let bad = |why: String| Err(ScreenError::Spec(why));
        if self.classifier.trim().is_empty() {
            return bad(
                "transitions.classifier is empty: name a model `cellfleet finetune --out` wrote"
                    .into(),
            );
        }
        if !(self.terminate_below > 0.0 && self.terminate_below < 1.0) {
            return bad(format!(
                "transitions.terminate_below = {}: a probability strictly between 0 and 1",
                self.terminate_below
            ));
        }
        if let Some(start) = &self.start {
            if start.is_empty() {
                return bad("transitions.start = []: name at least one start state, or leave it out for every class".into());
            }
        }
        if spec.steer.is_some() {
            return bad("[transitions] with [steer] is not supported: a steered cell is a state of bins, not a sequence the classifier reads".into());
        }
        if spec.combinations.is_some() {
            return bad("[transitions] with [combinations] is not supported: screen single genes or gene sets (genes.sets)".into());
        }
        Ok(())
    }
}

/// `[attribution]`: which classifier, which state's logit, and against which reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributionSpec {
    /// A model `cellfleet finetune --out` wrote, fine-tuned from this screen's checkpoint's model.
    pub classifier: String,
    /// The state whose logit is attributed; the attributed cells are the selected cells in this state.
    pub class: String,
    #[serde(default)]
    pub reference: AttributionReference,
    /// With `reference = "contrast"`: the state of the reference cells (for Kang: `control` against
    /// `stimulated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contrast: Option<String>,
    /// With `reference = "contrast"`: each reference cell shares this column's value with its cell
    /// (for Kang: `cell_type`), the phenotypes held fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_column: Option<String>,
    /// Genes per cell kept in `attribution_ranking.json` (what attribution-guided screens read).
    #[serde(default = "default_ranked_genes")]
    pub ranked_genes: u32,
    /// Gradients per direction: 1 takes the gradient at the input (the gradient formulation as the
    /// paper used it); `m` averages it over `m` points of the straight path from the reference, which
    /// brings the attributions' sum toward the logit difference (see `docs/transitions.md`).
    #[serde(default = "default_attribution_steps")]
    pub steps: u32,
}

/// On Kang (the test model, 80 stimulated cells against control cells of their cell type) the gradient at
/// the input alone distributed -0.28 of a mean logit gap of 6.94 over the genes (correlation over cells
/// 0.61); 16 points of the path distributed 6.31 (correlation 0.98) and ranked the stimulated-up genes at
/// AUROC 0.85 instead of 0.61.
fn default_attribution_steps() -> u32 {
    16
}

fn default_ranked_genes() -> u32 {
    256
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributionReference {
    /// A cell of the contrast state matched on `match_column`; both directions averaged.
    #[default]
    Contrast,
    /// Every gene token's total input embedding zero (`[CLS]` kept).
    Padding,
}

impl AttributionReference {
    pub fn name(self) -> &'static str {
        match self {
            AttributionReference::Contrast => "contrast",
            AttributionReference::Padding => "padding",
        }
    }
}

impl AttributionSpec {
    fn validate(&self, spec: &ScreenSpec) -> Result<()> {
        let bad = |why: String| Err(ScreenError::Spec(why));
        if self.classifier.trim().is_empty() {
            return bad(
                "attribution.classifier is empty: name a model `cellfleet finetune --out` wrote"
                    .into(),
            );
        }
        if self.class.trim().is_empty() {
            return bad(
                "attribution.class is empty: name the state whose logit is attributed".into(),
            );
        }
        match (self.reference, &self.contrast) {
            (AttributionReference::Contrast, None) => {
                return bad("attribution.reference = \"contrast\" needs attribution.contrast: the state of the reference cells".into())
            }
            (AttributionReference::Contrast, Some(c)) if *c == self.class => {
                return bad(format!("attribution.contrast = {c:?} is the attributed class itself: a reference of the same state has nothing to contrast"))
            }
            (AttributionReference::Padding, Some(_)) => {
                return bad("attribution.contrast is only read with reference = \"contrast\"".into())
            }
            _ => {}
        }
        if self.reference == AttributionReference::Padding && self.match_column.is_some() {
            return bad(
                "attribution.match_column is only read with reference = \"contrast\"".into(),
            );
        }
        if spec.execution.anndata {
            return bad(
                "execution.anndata with [attribution]: an attribution screen predicts no cells"
                    .into(),
            );
        }
        if self.steps == 0 || self.steps > 256 {
            return bad(format!(
                "attribution.steps = {}: between 1 and 256 gradients per direction",
                self.steps
            ));
        }
        if self.ranked_genes == 0 {
            return bad("attribution.ranked_genes = 0: keep at least one gene per cell".into());
        }
        if spec.genes != GeneSelection::Keyword("all".into()) {
            return bad(
                "[attribution] attributes every vocabulary gene: write genes = \"all\"".into(),
            );
        }
        if spec.steer.is_some()
            || spec.transitions.is_some()
            || spec.combinations.is_some()
            || spec.goal.is_some()
        {
            return bad("[attribution] perturbs nothing: it cannot go with [steer], [transitions], [combinations] or [goal]".into());
        }
        Ok(())
    }
}

impl ScreenSpec {
    /// Whether this is an attribution screen (its units attribute cells instead of perturbing them).
    pub fn attributes(&self) -> bool {
        self.attribution.is_some()
    }

    /// Checks what can be checked without opening the corpus or the checkpoint.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ScreenError::Spec(why));
        if let Some(steer) = &self.steer {
            steer.validate(self)?;
        }
        if let Some(transitions) = &self.transitions {
            transitions.validate(self)?;
        }
        if let Some(attribution) = &self.attribution {
            attribution.validate(self)?;
        }
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
            GeneSelection::Guided(guided) if guided.top_k == 0 => {
                return bad("genes.top_k = 0: perturb at least one gene per cell".into())
            }
            GeneSelection::Guided(_) if self.perturbation.kind == PerturbationKind::Overexpress => {
                return bad("genes.attribution with perturbation.kind = \"overexpress\": attribution ranks the genes a cell expresses, which only knockouts and deletions remove".into())
            }
            GeneSelection::List(list) if list.is_empty() => {
                return bad("genes = []: the gene list is empty; name at least one gene, or use \"all\"".into())
            }
            GeneSelection::Sets(sets) => {
                if sets.sets.is_empty() {
                    return bad("genes.sets is empty: name at least one set".into());
                }
                for (name, genes) in &sets.sets {
                    if genes.len() < 2 {
                        return bad(format!(
                            "genes.sets.{name} has {} gene(s): a set needs at least 2 (list single genes under genes.singles)",
                            genes.len()
                        ));
                    }
                    if name.contains('+') || name.trim().is_empty() {
                        return bad(format!(
                            "genes.sets: the name {name:?} is empty or holds '+', which names gene pairs"
                        ));
                    }
                }
                if let Some(singles) = &sets.singles {
                    if matches!(**singles, GeneSelection::Sets(_)) {
                        return bad("genes.singles cannot hold sets".into());
                    }
                }
            }
            _ => {}
        }
        if self.layer != -1 && self.readout == Readout::Expected {
            return bad(format!(
                "layer = {}: the expected-expression readout is the bin head on the last layer; choose readout = \"mean\" or \"cls\" to read another layer",
                self.layer
            ));
        }
        if let Some(c) = &self.combinations {
            if c.anchor.trim().is_empty() {
                return bad("combinations.anchor is empty: name the anchor gene".into());
            }
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
