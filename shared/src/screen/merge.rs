//! Merging unit results into per-target effects (rank-sum p-values against the random-gene null, BH FDR,
//! top affected genes, pair interactions) and per-(target, cell) rows; each unit exactly once, in unit
//! order.

use std::collections::BTreeMap;

use serde::Serialize;

use super::plan::{ScreenPlan, TargetKind};
use super::unit::{measure_len, UnitResult};
use super::{Result, ScreenError};
use crate::ids::ScreenId;
use crate::screen::stats::{benjamini_hochberg, mann_whitney};
use crate::screen::transitions::{merge_transitions, TargetClassRecords, TransitionResults};

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

/// One row of the per-target table (`genes.parquet`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetEffect {
    /// The gene, the set's name, or `ANCHOR+GENE`.
    pub name: String,
    pub kind: TargetKind,
    /// The target's genes by name (`[anchor, gene]` for a pair).
    pub genes: Vec<String>,
    /// Position in the vocabulary, for a single gene.
    pub gene_id: Option<u32>,
    /// Cells the perturbation applied to (for knockouts: cells expressing the gene; for a pair: both).
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
    /// Benjamini-Hochberg q-value over the rows with a p-value.
    pub fdr: f64,
    /// 1 = strongest: by goal progress (toward the goal) with a goal, otherwise by cosine shift.
    pub rank: u32,
    /// A null gene alone, or the anchor paired with a null gene.
    pub null_gene: bool,
    /// The genes whose expected bin this perturbation changes most (mean over cells, signed).
    pub top_affected: Vec<(String, f64)>,
    /// For a pair: each gene alone and the interaction.
    pub pair: Option<PairSummary>,
    /// A steered screen: the cells whose chains did not converge by `steer.iterations`; they count in
    /// no mean or test above (their rows in the per-cell tables are NaN).
    pub unconverged_cells: u64,
}

/// A pair's comparison with its genes alone, on the pair's cells and coordinates (both genes left out).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairSummary {
    /// Mean per-cell effect of the anchor alone and of the other gene alone.
    pub anchor_alone: f64,
    pub gene_alone: f64,
    /// Mean per-cell interaction: the pair's effect minus both genes' effects alone.
    pub interaction: f64,
    /// Rank-sum p-value of the per-cell interactions against those of the anchor paired with null genes.
    pub p_value: f64,
    /// Benjamini-Hochberg q-value over the pairs.
    pub fdr: f64,
}

/// One row of the per-(target, cell) table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordEffect {
    /// Index into the plan's targets.
    pub target: u32,
    pub cell: u64,
    pub cosine_shift: f32,
    pub state_shift: Vec<f32>,
    pub state_progress: Vec<f32>,
    /// For a pair: the effect (goal progress, or cosine shift without a goal) of the anchor alone, of
    /// the other gene alone, and the interaction.
    pub pair: Option<RecordPair>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RecordPair {
    pub anchor_alone: f32,
    pub gene_alone: f32,
    pub interaction: f32,
}

/// The merged screen.
#[derive(Debug, Clone, PartialEq)]
pub struct ScreenResults {
    /// Screened targets, sorted by rank.
    pub targets: Vec<TargetEffect>,
    /// Every (target, cell) record in (target, cell) order, when kept.
    pub records: Option<Vec<RecordEffect>>,
    /// With `execution.anndata`: the expected expression of every kept record (`records x vocabulary`,
    /// in the order of `records`) and of every screened cell unperturbed (in the plan's cell order).
    pub expression: Option<MergedExpression>,
    /// A steered (MCMC) screen's diagnostics, one per record in the order of `records` (kept whether or
    /// not `records` is).
    pub steer: Option<Vec<RecordSteer>>,
    /// A transitions screen's matrices and per-(target, transition) effects.
    pub transitions: Option<TransitionResults>,
    /// An attribution screen's attributions, in the plan's cell order.
    pub attribution: Option<MergedAttribution>,
    pub total_records: u64,
}

/// One record's chain diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSteer {
    pub target: u32,
    pub cell: u64,
    pub converged: bool,
    /// Per statistic (total expression, then the goal projection with a goal).
    pub rhat: Vec<f32>,
    pub ess: Vec<f32>,
    /// Per iteration: the fraction of the record's chains that accepted.
    pub acceptance: Vec<f32>,
    /// `chains x iterations x statistics`.
    pub trace: Vec<f32>,
}

/// Every attributed cell's gene importances, in the plan's cell order.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedAttribution {
    /// `cells x vocabulary`.
    pub importance: Vec<f32>,
    pub logit_gap: Vec<f32>,
    pub attribution_sum: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergedExpression {
    pub perturbed: Vec<f32>,
    pub original: Vec<f32>,
}

/// Per target: the per-cell values in cell order and the summed expected-bin changes.
struct TargetAccumulator {
    cells: Vec<u64>,
    cosine: Vec<f32>,
    /// `states x cells`, state-major.
    states: Vec<Vec<f32>>,
    progress: Vec<Vec<f32>>,
    /// For a pair, per cell: (anchor alone, gene alone) of the primary measure.
    alone: Vec<(f32, f32)>,
    delta_bin: Vec<f64>,
    expression: Vec<f32>,
    steer: Vec<RecordSteer>,
    /// Records whose measures are NaN: a steered cell whose chains did not converge.
    unconverged: u64,
}

impl TargetAccumulator {
    /// The per-cell statistic tested against the null: goal progress with a goal, else cosine shift
    /// (cells without a value, unconverged chains, left out).
    fn primary(&self) -> Vec<f64> {
        let values = self.progress.first().unwrap_or(&self.cosine);
        values
            .iter()
            .map(|&v| f64::from(v))
            .zip(&self.cosine)
            .filter(|(_, c)| !c.is_nan())
            .map(|(v, _)| v)
            .collect()
    }

    fn interactions(&self) -> Vec<f64> {
        self.primary()
            .iter()
            .zip(&self.alone)
            .map(|(&pair, &(a, g))| pair - f64::from(a) - f64::from(g))
            .collect()
    }
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
        if !result
            .targets
            .iter()
            .map(|&t| t as usize)
            .eq(span.targets.clone())
        {
            return Err(bad(format!(
                "unit {unit} holds other targets than the plan says"
            )));
        }
        let (states, vocabulary) = (self.plan.states.len(), self.plan.vocabulary.len());
        if result.n_states as usize != states || result.n_vocabulary as usize != vocabulary {
            return Err(bad(format!(
                "unit {unit} has {} states and {} genes, the plan {states} and {vocabulary}",
                result.n_states, result.n_vocabulary
            )));
        }
        let records = result.records();
        let pair_records = result
            .record_target
            .iter()
            .filter(|&&t| {
                self.plan
                    .targets
                    .get(t as usize)
                    .is_some_and(|t| t.kind == TargetKind::Pair)
            })
            .count();
        let cells = &self.plan.cells[span.cells.clone()];
        let expression_ok = match (&result.expression, self.plan.spec.execution.anndata) {
            (Some(e), true) => {
                e.perturbed.len() == records * vocabulary
                    && e.original.len() == cells.len() * vocabulary
            }
            (None, false) => true,
            _ => false,
        };
        let attribution_ok = match (&result.attribution, self.plan.spec.attributes()) {
            (Some(a), true) => {
                a.importance.len() == records * vocabulary
                    && a.logit_gap.len() == records
                    && a.attribution_sum.len() == records
            }
            (None, false) => true,
            _ => false,
        };
        let classes_ok = match (&result.classes, &self.plan.classifier) {
            (Some(c), Some(classifier)) if self.plan.spec.transitions.is_some() => {
                c.n_classes as usize == classifier.classes.len()
                    && c.original.len() == cells.len() * classifier.classes.len()
                    && c.perturbed.len() == records * classifier.classes.len()
            }
            (None, _) => self.plan.spec.transitions.is_none(),
            _ => false,
        };
        if result.record_cell.len() != records
            || result.cosine_shift.len() != records
            || result.state_shift.len() != records * states
            || result.state_progress.len() != records * states
            || result.alone.len() != pair_records * 2 * measure_len(states)
            || result.delta_bin_sum.len() != result.targets.len() * vocabulary
            || !expression_ok
            || !classes_ok
            || !attribution_ok
        {
            return Err(bad(format!("unit {unit}: its arrays disagree in length")));
        }
        if records as u64 != self.plan.unit_records[unit] {
            return Err(bad(format!(
                "unit {unit} holds {records} records, the plan says {}",
                self.plan.unit_records[unit]
            )));
        }
        let in_unit = |t: u32, c: u64| {
            span.targets.contains(&(t as usize)) && cells.binary_search(&c).is_ok()
        };
        if let Some(i) =
            (0..records).find(|&i| !in_unit(result.record_target[i], result.record_cell[i]))
        {
            return Err(bad(format!(
                "record (target {}, cell {}) is outside unit {unit}",
                result.record_target[i], result.record_cell[i]
            )));
        }
        // Records come target-major in cell order: strictly increasing, so none repeats.
        let position = |i: usize| (result.record_target[i], result.record_cell[i]);
        if let Some(i) = (1..records).find(|&i| position(i - 1) >= position(i)) {
            return Err(bad(format!(
                "unit {unit}: record (target {}, cell {}) is out of order or repeated",
                result.record_target[i], result.record_cell[i]
            )));
        }
        self.seen[unit] = true;
        self.results.insert(result.unit, result);
        Ok(())
    }

    pub fn missing(&self) -> Vec<usize> {
        (0..self.seen.len()).filter(|&u| !self.seen[u]).collect()
    }

    /// Per-target effects and statistics; `keep_records` also returns every (target, cell) record.
    pub fn finish(self, keep_records: bool) -> Result<ScreenResults> {
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
        let measure = measure_len(n_states);
        // The primary measure's offset within one measure: goal progress, or the cosine shift.
        let primary_at = if n_states > 0 { 1 + n_states } else { 0 };
        let with_expression = plan.spec.execution.anndata;
        let mut acc: Vec<TargetAccumulator> = plan
            .targets
            .iter()
            .map(|_| TargetAccumulator {
                cells: Vec::new(),
                cosine: Vec::new(),
                states: vec![Vec::new(); n_states],
                progress: vec![Vec::new(); n_states],
                alone: Vec::new(),
                delta_bin: vec![0.0; n_vocab],
                expression: Vec::new(),
                steer: Vec::new(),
                unconverged: 0,
            })
            .collect();
        let mut original = with_expression.then(|| vec![0f32; plan.cells.len() * n_vocab]);
        let n_classes = plan.classifier.as_ref().map_or(0, |c| c.classes.len());
        let mut class_original = vec![0f32; plan.cells.len() * n_classes];
        let mut class_records = vec![TargetClassRecords::default(); plan.targets.len()];
        let mut total = 0u64;
        for result in self.results.values() {
            if let (Some(c), Some(classifier)) = (&result.classes, &plan.classifier) {
                let span = plan.unit(result.unit as usize);
                class_original[span.cells.start * n_classes..span.cells.end * n_classes]
                    .copy_from_slice(&c.original);
                for i in 0..result.records() {
                    let t = result.record_target[i] as usize;
                    let at = plan
                        .cells
                        .binary_search(&result.record_cell[i])
                        .expect("checked in add: a record's cell is the unit's");
                    class_records[t].start.push(classifier.cell_start[at]);
                    class_records[t].delta.extend(
                        c.perturbed[i * n_classes..(i + 1) * n_classes]
                            .iter()
                            .zip(
                                &c.original[(at - span.cells.start) * n_classes
                                    ..(at - span.cells.start + 1) * n_classes],
                            )
                            .map(|(p, o)| p - o),
                    );
                }
            }
            let mut pair_record = 0;
            for i in 0..result.records() {
                let t = result.record_target[i] as usize;
                let a = &mut acc[t];
                a.cells.push(result.record_cell[i]);
                if result.cosine_shift[i].is_nan() {
                    a.unconverged += 1;
                }
                if let Some(s) = &result.steer {
                    let (it, st) = (s.iterations as usize, s.statistics as usize);
                    let trace = s.trace_len();
                    a.steer.push(RecordSteer {
                        target: t as u32,
                        cell: result.record_cell[i],
                        converged: s.converged[i] != 0,
                        rhat: s.rhat[i * st..(i + 1) * st].to_vec(),
                        ess: s.ess[i * st..(i + 1) * st].to_vec(),
                        acceptance: s.acceptance[i * it..(i + 1) * it].to_vec(),
                        trace: s.trace[i * trace..(i + 1) * trace].to_vec(),
                    });
                }
                a.cosine.push(result.cosine_shift[i]);
                for (s, values) in a.states.iter_mut().enumerate() {
                    values.push(result.state_shift[i * n_states + s]);
                }
                for (s, values) in a.progress.iter_mut().enumerate() {
                    values.push(result.state_progress[i * n_states + s]);
                }
                if plan.targets[t].kind == TargetKind::Pair {
                    let at = pair_record * 2 * measure;
                    a.alone.push((
                        result.alone[at + primary_at],
                        result.alone[at + measure + primary_at],
                    ));
                    pair_record += 1;
                }
                if let Some(e) = &result.expression {
                    a.expression
                        .extend_from_slice(&e.perturbed[i * n_vocab..(i + 1) * n_vocab]);
                }
                total += 1;
            }
            for (k, &t) in result.targets.iter().enumerate() {
                let row = &result.delta_bin_sum[k * n_vocab..(k + 1) * n_vocab];
                for (sum, &d) in acc[t as usize].delta_bin.iter_mut().zip(row) {
                    *sum += f64::from(d);
                }
            }
            if let (Some(out), Some(e)) = (original.as_mut(), &result.expression) {
                let span = plan.unit(result.unit as usize);
                out[span.cells.start * n_vocab..span.cells.end * n_vocab]
                    .copy_from_slice(&e.original);
            }
        }
        if total != plan.total_records() {
            return Err(ScreenError::Merge(format!(
                "{total} records merged, the plan has {}",
                plan.total_records()
            )));
        }
        let mut records = keep_records.then(Vec::new);
        let mut perturbed_expression = (keep_records && with_expression).then(Vec::new);
        if let Some(out) = records.as_mut() {
            for (t, a) in acc.iter().enumerate() {
                let interactions = a.interactions();
                for (i, &cell) in a.cells.iter().enumerate() {
                    let pair = a
                        .alone
                        .get(i)
                        .map(|&(anchor_alone, gene_alone)| RecordPair {
                            anchor_alone,
                            gene_alone,
                            interaction: interactions[i] as f32,
                        });
                    out.push(RecordEffect {
                        target: t as u32,
                        cell,
                        cosine_shift: a.cosine[i],
                        state_shift: a.states.iter().map(|s| s[i]).collect(),
                        state_progress: a.progress.iter().map(|s| s[i]).collect(),
                        pair,
                    });
                }
                if let Some(e) = perturbed_expression.as_mut() {
                    e.extend_from_slice(&a.expression);
                }
            }
        }
        let null_singles: Vec<(u32, Vec<f64>)> = plan
            .targets
            .iter()
            .zip(&acc)
            .filter(|(t, _)| t.null && t.kind == TargetKind::Gene)
            .map(|(t, a)| (t.genes[0], a.primary()))
            .collect();
        // Per set size, the pooled per-cell values of the random sets of that size.
        let mut null_sets: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for (t, a) in plan.targets.iter().zip(&acc) {
            if t.null && t.kind == TargetKind::Set {
                null_sets
                    .entry(t.genes.len())
                    .or_default()
                    .extend(a.primary());
            }
        }
        let null_interactions: Vec<(u32, Vec<f64>)> = plan
            .targets
            .iter()
            .zip(&acc)
            .filter(|(t, _)| t.null && t.kind == TargetKind::Pair)
            .map(|(t, a)| (t.genes[1], a.interactions()))
            .collect();
        // A null gene is tested against the other null genes, not against itself.
        let pooled = |null: &[(u32, Vec<f64>)], leave_out: Option<u32>| -> Vec<f64> {
            null.iter()
                .filter(|(g, _)| Some(*g) != leave_out)
                .flat_map(|(_, v)| v.iter().copied())
                .collect()
        };
        let mean32 = |v: &[f32]| mean(v.iter().filter(|x| !x.is_nan()).map(|&x| f64::from(x)));
        let top_k = plan.spec.execution.top_affected as usize;
        let mut rows: Vec<(usize, TargetEffect)> = plan
            .targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.screened)
            .map(|(index, target)| {
                let a = &acc[index];
                let values = a.primary();
                let compared_gene = match target.kind {
                    TargetKind::Gene => Some(target.genes[0]),
                    TargetKind::Pair => Some(target.genes[1]),
                    TargetKind::Set => None,
                };
                let null = match (target.kind, null_sets.get(&target.genes.len())) {
                    (TargetKind::Set, Some(sets)) => sets.clone(),
                    _ => pooled(
                        &null_singles,
                        compared_gene.filter(|_| target.kind == TargetKind::Gene),
                    ),
                };
                let p_value = mann_whitney(&values, &null).map_or(f64::NAN, |(_, p)| p);
                let pair = (target.kind == TargetKind::Pair).then(|| {
                    let interactions = a.interactions();
                    let null = pooled(&null_interactions, compared_gene);
                    let alone = |pick: fn(&(f32, f32)) -> f32| {
                        mean(a.alone.iter().map(|x| f64::from(pick(x))))
                    };
                    PairSummary {
                        anchor_alone: alone(|x| x.0),
                        gene_alone: alone(|x| x.1),
                        interaction: mean(interactions.iter().copied()),
                        p_value: mann_whitney(&interactions, &null).map_or(f64::NAN, |(_, p)| p),
                        fdr: f64::NAN,
                    }
                });
                // Unconverged cells are not in the sums of changes either.
                let n = (a.cells.len() as u64 - a.unconverged) as f64;
                let mut affected: Vec<(usize, f64)> = a
                    .delta_bin
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| !target.genes.contains(&(j as u32)) && n > 0.0)
                    .map(|(j, &s)| (j, s / n))
                    .collect();
                affected.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()).then(x.0.cmp(&y.0)));
                let effect = TargetEffect {
                    name: target.name.clone(),
                    kind: target.kind,
                    genes: target
                        .genes
                        .iter()
                        .map(|&g| plan.vocabulary[g as usize].clone())
                        .collect(),
                    gene_id: (target.kind == TargetKind::Gene).then_some(target.genes[0]),
                    n_cells: a.cells.len() as u64 - a.unconverged,
                    cosine_shift: mean32(&a.cosine),
                    state_shift: a.states.iter().map(|s| mean32(s)).collect(),
                    state_progress: a.progress.iter().map(|s| mean32(s)).collect(),
                    p_value,
                    fdr: f64::NAN,
                    rank: 0,
                    null_gene: target.null,
                    top_affected: affected
                        .into_iter()
                        .take(top_k)
                        .map(|(j, d)| (plan.vocabulary[j].clone(), d))
                        .collect(),
                    pair,
                    unconverged_cells: a.unconverged,
                };
                (index, effect)
            })
            .collect();
        fill_fdr(&mut rows, |r| Some(r.p_value), |r, q| r.fdr = q);
        fill_fdr(
            &mut rows,
            |r| r.pair.as_ref().map(|p| p.p_value),
            |r, q| {
                if let Some(p) = r.pair.as_mut() {
                    p.fdr = q;
                }
            },
        );
        let score = |r: &TargetEffect| -> f64 {
            let s = r.state_progress.first().copied().unwrap_or(r.cosine_shift);
            if s.is_nan() {
                f64::NEG_INFINITY
            } else {
                s
            }
        };
        rows.sort_by(|(ia, a), (ib, b)| score(b).total_cmp(&score(a)).then(ia.cmp(ib)));
        let mut targets: Vec<TargetEffect> = rows.into_iter().map(|(_, r)| r).collect();
        for (i, r) in targets.iter_mut().enumerate() {
            r.rank = i as u32 + 1;
        }
        let transitions = plan
            .spec
            .transitions
            .is_some()
            .then(|| merge_transitions(plan, &class_original, &class_records))
            .transpose()?;
        // One record per cell, in unit order: the plan's cell order.
        let attribution = plan.spec.attributes().then(|| {
            let mut merged = MergedAttribution {
                importance: Vec::with_capacity(plan.cells.len() * n_vocab),
                logit_gap: Vec::with_capacity(plan.cells.len()),
                attribution_sum: Vec::with_capacity(plan.cells.len()),
            };
            for a in self.results.values().filter_map(|r| r.attribution.as_ref()) {
                merged.importance.extend_from_slice(&a.importance);
                merged.logit_gap.extend_from_slice(&a.logit_gap);
                merged.attribution_sum.extend_from_slice(&a.attribution_sum);
            }
            merged
        });
        Ok(ScreenResults {
            transitions,
            attribution,
            targets,
            records,
            expression: match (perturbed_expression, original) {
                (Some(perturbed), Some(original)) => Some(MergedExpression {
                    perturbed,
                    original,
                }),
                _ => None,
            },
            steer: self
                .results
                .values()
                .any(|r| r.steer.is_some())
                .then(|| acc.iter_mut().flat_map(|a| a.steer.drain(..)).collect()),
            total_records: total,
        })
    }
}

/// The mean of `values`, NaN when there are none.
fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// Benjamini-Hochberg q-values over the rows whose `p` is a number.
fn fill_fdr(
    rows: &mut [(usize, TargetEffect)],
    p: impl Fn(&TargetEffect) -> Option<f64>,
    mut set: impl FnMut(&mut TargetEffect, f64),
) {
    let p = |r: &TargetEffect| p(r).unwrap_or(f64::NAN);
    let tested: Vec<usize> = (0..rows.len())
        .filter(|&i| !p(&rows[i].1).is_nan())
        .collect();
    let q = benjamini_hochberg(&tested.iter().map(|&i| p(&rows[i].1)).collect::<Vec<_>>());
    for (&i, q) in tested.iter().zip(q) {
        set(&mut rows[i].1, q);
    }
}
