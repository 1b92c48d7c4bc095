//! The resolved screen stored as `plan.json` at the screen's location: everything a worker needs, the
//! geometry of its work units (genes x cells) and each unit's result key.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::spec::{ClampSource, PerturbationKind, ScreenSpec};

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

/// What one perturbation changes: a gene, a named set of genes, or an (anchor, gene) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Gene,
    Set,
    Pair,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Gene => "gene",
            TargetKind::Set => "set",
            TargetKind::Pair => "pair",
        }
    }
}

/// One perturbation of a screen: its genes are perturbed together in each cell it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The gene's name, the set's name, or `ANCHOR+GENE` for a pair.
    pub name: String,
    pub kind: TargetKind,
    /// Vocabulary positions: one gene; a set's genes ascending; `[anchor, gene]` for a pair.
    pub genes: Vec<u32>,
    /// Reported as a row of the results (a null gene that is not screened is only the null).
    pub screened: bool,
    /// Part of the random-gene null: a null gene alone, or the anchor paired with a null gene.
    pub null: bool,
}

impl Target {
    /// Whether the perturbation changes `bins` (a cell's bins in vocabulary order): a gene or a set when
    /// the perturbation applies to at least one of its genes, a pair only when it applies to both (so the
    /// pair can be compared with each gene alone).
    pub fn applies(&self, kind: PerturbationKind, bins: &[u8]) -> bool {
        let applies = |&g: &u32| kind.applies(bins[g as usize]);
        match self.kind {
            TargetKind::Gene | TargetKind::Set => self.genes.iter().any(applies),
            TargetKind::Pair => self.genes.iter().all(applies),
        }
    }

    /// The genes the perturbation changes in a cell with `bins` (knockouts and deletions touch only
    /// expressed genes).
    pub fn perturbed_in(&self, kind: PerturbationKind, bins: &[u8]) -> Vec<u32> {
        self.genes
            .iter()
            .copied()
            .filter(|&g| kind.applies(bins[g as usize]))
            .collect()
    }
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
    /// What the units cover, in this order: single genes (screened and null, ascending, each once), the
    /// gene sets, then the anchor's pairs.
    pub targets: Vec<Target>,
    /// The resolved readout layer (0 = token embeddings, the model's layer count = the last).
    pub readout_layer: u32,
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
    /// (target, cell) records per unit: the cells each target applies to.
    pub unit_records: Vec<u64>,
    /// With `steer.anchor`: the cells whose medoids anchor the chains (corpus positions, ascending).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anchor_cells: Vec<u64>,
    /// With `[transitions]`: the classifier the screen runs, and each perturbed cell's start state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier: Option<ClassifierId>,
    /// An attribution screen with a contrast reference: per perturbed cell, its reference cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<u64>,
    /// An attribution-guided screen: per perturbed cell, the genes it is perturbed in (ascending).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guided_genes: Vec<Vec<u32>>,
}

/// The state classifier of a transitions screen, identified so every worker runs exactly these weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierId {
    /// Where `model.json` and `model.safetensors` are.
    pub url: String,
    /// blake3 of `model.safetensors`.
    pub weights_blake3: String,
    /// The label column it was fine-tuned on; its classes are the states (logit order).
    pub label_column: String,
    pub classes: Vec<String>,
    /// The start states (indices into `classes`), the rows of the transition matrices.
    pub starts: Vec<u32>,
    /// Per perturbed cell (the plan's cell order): its start state (index into `starts`).
    pub cell_start: Vec<u32>,
}

impl ClassifierId {
    /// The start states' names, in row order.
    pub fn start_names(&self) -> Vec<String> {
        self.starts
            .iter()
            .map(|&c| self.classes[c as usize].clone())
            .collect()
    }
}

/// The targets and cells of one unit, as ranges of `targets` and `cells`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpan {
    pub targets: Range<usize>,
    pub cells: Range<usize>,
}

impl ScreenPlan {
    /// Checks what workers index by without looking: the spec is valid, every gene position is in the
    /// vocabulary, the per-cell arrays are as long as `cells`, and there is one record count per unit.
    /// A plan is hash-checked against its submission, so this guards against a bug or a rewritten store
    /// at submission time, which would otherwise panic every worker that leases a unit of it.
    pub fn check(&self) -> Result<(), String> {
        self.spec.validate().map_err(|e| format!("its spec: {e}"))?;
        let vocabulary = self.vocabulary.len();
        if vocabulary == 0 || vocabulary > crate::corpus::shard::MAX_GENES {
            return Err(format!(
                "vocabulary has {vocabulary} genes, expected 1..={}",
                crate::corpus::shard::MAX_GENES
            ));
        }
        if self.n_bins < 2 || self.n_bins > 256 {
            return Err(format!("n_bins is {}, expected 2..=256", self.n_bins));
        }
        let in_vocabulary =
            |what: &str, genes: &[u32]| match genes.iter().find(|&&g| g as usize >= vocabulary) {
                Some(g) => Err(format!(
                    "{what} holds gene position {g}, beyond the vocabulary of {vocabulary}"
                )),
                None => Ok(()),
            };
        in_vocabulary("genes", &self.genes)?;
        in_vocabulary("null_genes", &self.null_genes)?;
        for target in &self.targets {
            in_vocabulary(&format!("target {:?}", target.name), &target.genes)?;
            let expected = match target.kind {
                // An attribution screen's one target perturbs nothing: it stands for "every cell once".
                TargetKind::Gene if self.spec.attributes() => target.genes.is_empty(),
                TargetKind::Gene => target.genes.len() == 1,
                TargetKind::Set => !target.genes.is_empty(),
                TargetKind::Pair => target.genes.len() == 2,
            };
            if !expected {
                return Err(format!(
                    "target {:?} is a {} with {} genes",
                    target.name,
                    target.kind.name(),
                    target.genes.len()
                ));
            }
        }
        let cells = self.cells.len();
        let per_cell = [
            ("cell_names", self.cell_names.len(), false),
            ("cell_strata", self.cell_strata.len(), true),
            ("references", self.references.len(), true),
            ("guided_genes", self.guided_genes.len(), true),
        ];
        for (what, len, optional) in per_cell {
            if len != cells && !(optional && len == 0) {
                return Err(format!("{what} has {len} entries for {cells} cells"));
            }
        }
        if let Some(stratum) = self
            .cell_strata
            .iter()
            .chain(self.states.iter().flat_map(|s| &s.strata))
            .find(|&&s| s as usize >= self.strata.len())
        {
            return Err(format!(
                "a stratum index {stratum} is beyond the {} strata",
                self.strata.len()
            ));
        }
        for chosen in &self.guided_genes {
            in_vocabulary("guided_genes", chosen)?;
        }
        if let Some(classifier) = &self.classifier {
            if classifier.cell_start.len() != cells {
                return Err(format!(
                    "classifier.cell_start has {} entries for {cells} cells",
                    classifier.cell_start.len()
                ));
            }
            if let Some(c) = classifier
                .starts
                .iter()
                .find(|&&c| c as usize >= classifier.classes.len())
            {
                return Err(format!(
                    "classifier.starts holds class {c}, beyond its {} classes",
                    classifier.classes.len()
                ));
            }
            if let Some(s) = classifier
                .cell_start
                .iter()
                .find(|&&s| s as usize >= classifier.starts.len())
            {
                return Err(format!(
                    "classifier.cell_start holds start {s}, beyond its {} start states",
                    classifier.starts.len()
                ));
            }
        }
        if self.unit_records.len() != self.unit_count() {
            return Err(format!(
                "unit_records has {} entries for {} units",
                self.unit_records.len(),
                self.unit_count()
            ));
        }
        Ok(())
    }

    fn cell_blocks(&self) -> usize {
        self.cells
            .len()
            .div_ceil(self.spec.execution.cell_block as usize)
    }

    /// Units are numbered target block major: unit `u` is target block `u / cell_blocks`, cell block
    /// `u % cell_blocks` (`execution.gene_block` targets per block).
    pub fn unit_count(&self) -> usize {
        self.targets
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
            targets: gb * g..((gb + 1) * g).min(self.targets.len()),
            cells: cb * c..((cb + 1) * c).min(self.cells.len()),
        }
    }

    pub fn total_records(&self) -> u64 {
        self.unit_records.iter().sum()
    }

    /// Whether `target` makes a record in perturbed cell `cell` (index into `cells`) with `bins`: an
    /// attribution screen attributes every cell once; a steered screen whose clamps come from the goal or
    /// from given bins clamps every cell; an attribution-guided screen perturbs a cell only in its chosen
    /// genes (null genes in every cell: they are the null); otherwise the perturbation must apply (a
    /// knockout of a gene a cell does not express changes nothing).
    pub fn record_applies(&self, target: &Target, cell: usize, bins: &[u8]) -> bool {
        if self.spec.attributes() {
            return true;
        }
        if let Some(chosen) = self.guided_genes.get(cell) {
            if !target.null && !target.genes.iter().all(|g| chosen.binary_search(g).is_ok()) {
                return false;
            }
        }
        match &self.spec.steer {
            Some(steer) if steer.clamp != ClampSource::Perturbation => true,
            _ => target.applies(self.spec.perturbation.kind, bins),
        }
    }

    /// The anchor of the screen's pairs, when it has some.
    pub fn anchor(&self) -> Option<u32> {
        self.targets
            .iter()
            .find(|t| t.kind == TargetKind::Pair)
            .map(|t| t.genes[0])
    }

    /// The goal state's name, when there is one.
    pub fn goal(&self) -> Option<&str> {
        self.states.first().map(|s| s.name.as_str())
    }

    /// A one-line description for logs and status.
    pub fn summary(&self) -> String {
        if let Some(a) = &self.spec.attribution {
            return format!(
                "attribution of the {:?} logit in {} cells ({} reference{}, {} gradient{} per direction)",
                a.class,
                self.cells.len(),
                a.reference.name(),
                a.contrast
                    .as_ref()
                    .map(|c| format!(
                        ": {c} cells{}",
                        a.match_column
                            .as_ref()
                            .map(|m| format!(" of the same {m}"))
                            .unwrap_or_default()
                    ))
                    .unwrap_or_default(),
                a.steps,
                if a.steps == 1 { "" } else { "s" }
            );
        }
        let transitions = self
            .classifier
            .as_ref()
            .filter(|_| self.spec.transitions.is_some())
            .map(|c| {
                format!(
                    ", transitions between {} states of {}",
                    c.classes.len(),
                    c.label_column
                )
            })
            .unwrap_or_default();
        let count = |kind| {
            self.targets
                .iter()
                .filter(|t| t.kind == kind && t.screened)
                .count()
        };
        let (sets, pairs) = (count(TargetKind::Set), count(TargetKind::Pair));
        let mut extra = String::new();
        if sets > 0 {
            extra.push_str(&format!(", {sets} gene sets"));
        }
        if pairs > 0 {
            extra.push_str(&format!(", {pairs} anchored pairs"));
        }
        let kind = match &self.spec.steer {
            Some(steer) => format!(
                "steered ({}, clamp {}) {}",
                steer.method.name(),
                match steer.clamp {
                    ClampSource::Perturbation => "by perturbation",
                    ClampSource::Goal => "at the goal's levels",
                    ClampSource::Bins => "at given bins",
                },
                self.spec.perturbation.kind.name()
            ),
            None => self.spec.perturbation.kind.name().to_string(),
        };
        format!(
            "{kind} of {} genes{extra} in {} cells ({} readout), null of {} random genes{}",
            self.genes.len(),
            self.cells.len(),
            self.spec.readout.name(),
            self.null_genes.len(),
            self.goal()
                .map(|g| format!(", goal {g}"))
                .unwrap_or_default()
        ) + &transitions
    }
}

/// Object key of unit `unit`'s result, relative to the screen's location.
pub fn unit_key(unit: usize) -> String {
    format!("units/unit-{unit:06}.bin.zst")
}
