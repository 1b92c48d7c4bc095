//! The resolved screen stored as `plan.json` at the screen's location: everything a worker needs, the
//! geometry of its work units (genes x cells) and each unit's result key.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::spec::ScreenSpec;

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
