//! Merging unit results into per-gene effects (rank-sum p-values against the random-gene null, BH FDR,
//! top affected genes) and per-pair rows; each unit exactly once, in unit order.

use std::collections::BTreeMap;

use serde::Serialize;

use super::plan::ScreenPlan;
use super::unit::UnitResult;
use super::{Result, ScreenError};
use crate::ids::ScreenId;
use crate::screen::stats::{benjamini_hochberg, mann_whitney};

/// A finished screen as the coordinator recorded it: where its plan and unit results are, and each unit's
/// completion record, which the merge checks the stored results against.
#[derive(Debug, Clone)]
pub struct CompletedScreen {
    pub screen_id: ScreenId,
    pub location: String,
    pub plan_blake3: String,
    pub units: Vec<CompletedUnit>,
    /// Units leased again after their holder was lost or its lease expired.
    pub units_released: u32,
    pub pairs_per_second: f64,
    pub message: String,
}

/// One unit's completion record: the object key and the blake3 of the bytes its worker stored.
#[derive(Debug, Clone)]
pub struct CompletedUnit {
    pub unit: u32,
    pub key: String,
    pub blake3: String,
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
