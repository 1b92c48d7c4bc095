//! Phenotype transitions (KD-CPT) without tensors: from each cell's state probabilities `P(state | cell)`
//! (a fine-tuned classifier's softmax), the transition matrix of start states (row `i`: the mean of
//! `P(. | cell)` over the cells that start in state `i`), each start state's entropy, the overall entropy
//! weighted by the start states' priors, transitions a perturbation terminates, and the calibration
//! summaries and class weights fine-tuning uses; and the merge of a transitions screen's records into
//! perturbed matrices and per-(target, transition) tests against the random-gene null.
//!
//! The paper's equation 7 writes the overall entropy with an extra minus sign in front of the weighted sum
//! of per-class entropies, which would make it negative; what is computed here is the entropy,
//! `H = sum_i prior_i * H(C_i)` with `H(C_i) = -sum_j P_ij ln P_ij` (nats, `0 ln 0 = 0`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::plan::{ScreenPlan, TargetKind};
use super::{Result, ScreenError};
use crate::screen::stats::{benjamini_hochberg, mann_whitney};

/// The transition matrix of start states to states.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionMatrix {
    /// `starts x states`, each row a distribution (sums to 1 up to rounding).
    pub rows: Vec<Vec<f64>>,
    /// Cells per start state.
    pub cells: Vec<u64>,
}

/// The transition matrix of `probabilities` (`cells x states`, row-major, each row a distribution) for
/// cells whose start states are `start` (indices below `starts`). A start state without cells has no
/// row to estimate: refused, naming it.
pub fn transition_matrix(
    probabilities: &[f32],
    n_states: usize,
    start: &[u32],
    start_names: &[String],
) -> Result<TransitionMatrix> {
    let bad = |why: String| Err(ScreenError::Spec(why));
    if n_states == 0 || probabilities.len() != start.len() * n_states {
        return bad(format!(
            "transitions: {} probabilities for {} cells and {n_states} states",
            probabilities.len(),
            start.len()
        ));
    }
    let starts = start_names.len();
    let mut rows = vec![vec![0f64; n_states]; starts];
    let mut cells = vec![0u64; starts];
    for (cell, &s) in start.iter().enumerate() {
        let s = s as usize;
        if s >= starts {
            return bad(format!(
                "transitions: cell {cell} starts in state {s}, there are {starts}"
            ));
        }
        cells[s] += 1;
        for (sum, &p) in rows[s]
            .iter_mut()
            .zip(&probabilities[cell * n_states..(cell + 1) * n_states])
        {
            *sum += f64::from(p);
        }
    }
    for (i, row) in rows.iter_mut().enumerate() {
        if cells[i] == 0 {
            return bad(format!(
                "transitions: no cell starts in state {:?}; a transition row needs cells",
                start_names[i]
            ));
        }
        row.iter_mut().for_each(|v| *v /= cells[i] as f64);
    }
    Ok(TransitionMatrix { rows, cells })
}

/// `-sum_j p_j ln p_j` in nats, with `0 ln 0 = 0`.
pub fn entropy(distribution: &[f64]) -> f64 {
    -distribution
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| p * p.ln())
        .sum::<f64>()
}

impl TransitionMatrix {
    /// Each start state's entropy `H(C_i)`.
    pub fn class_entropies(&self) -> Vec<f64> {
        self.rows.iter().map(|r| entropy(r)).collect()
    }

    /// The start states' priors: their share of the cells.
    pub fn priors(&self) -> Vec<f64> {
        let total = self.cells.iter().sum::<u64>().max(1) as f64;
        self.cells.iter().map(|&n| n as f64 / total).collect()
    }

    /// `sum_i prior_i * H(C_i)` (see the module's note on the paper's sign).
    pub fn overall_entropy(&self) -> f64 {
        self.priors()
            .iter()
            .zip(self.class_entropies())
            .map(|(p, h)| p * h)
            .sum()
    }

    /// The transitions `(start, state)` with probability at least `threshold` here and below it in
    /// `after`: the transitions a perturbation terminates.
    pub fn terminated(&self, after: &TransitionMatrix, threshold: f64) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (i, (before, after)) in self.rows.iter().zip(&after.rows).enumerate() {
            for (j, (&b, &a)) in before.iter().zip(after).enumerate() {
                if b >= threshold && a < threshold {
                    out.push((i, j));
                }
            }
        }
        out
    }
}

/// The mean over cells of the summed `k` largest probabilities (top-k confidence; `k = 1` is the
/// usual confidence).
pub fn top_k_confidence(probabilities: &[f32], n_states: usize, k: usize) -> f64 {
    let rows = probabilities.chunks_exact(n_states.max(1));
    let n = rows.len().max(1) as f64;
    rows.map(|row| {
        let mut sorted: Vec<f64> = row.iter().map(|&p| f64::from(p)).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        sorted.iter().take(k).sum::<f64>()
    })
    .sum::<f64>()
        / n
}

/// The mean predictive entropy over cells (nats).
pub fn mean_predictive_entropy(probabilities: &[f32], n_states: usize) -> f64 {
    let rows = probabilities.chunks_exact(n_states.max(1));
    let n = rows.len().max(1) as f64;
    rows.map(|row| entropy(&row.iter().map(|&p| f64::from(p)).collect::<Vec<_>>()))
        .sum::<f64>()
        / n
}

/// Class weights for a class-weighted cross-entropy, proportional to `1 / n_k` and scaled so that the
/// weighted count equals the number of examples (`sum_k n_k w_k = N`: the loss keeps its scale). A class
/// without examples gets weight 0 (it contributes no term).
pub fn inverse_frequency_weights(counts: &[u64]) -> Vec<f64> {
    let present = counts.iter().filter(|&&n| n > 0).count();
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&n| {
            if n == 0 {
                0.0
            } else {
                total as f64 / (present as f64 * n as f64)
            }
        })
        .collect()
}

/// One target's records of a transitions screen: per record its cell's start state (index into the
/// plan's start states) and its change of every state probability (`records x classes`).
#[derive(Debug, Clone, Default)]
pub struct TargetClassRecords {
    pub start: Vec<u32>,
    pub delta: Vec<f32>,
}

/// A merged transitions screen.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionResults {
    /// The classifier's states (columns) and the start states (rows).
    pub classes: Vec<String>,
    pub starts: Vec<String>,
    /// The screened cells unperturbed.
    pub baseline: TransitionMatrix,
    /// One row per screened target, start state and state, in target rank order of the gene table.
    pub effects: Vec<TransitionEffect>,
}

/// One row of `transitions.parquet`: what a perturbation does to one transition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransitionEffect {
    /// Index into the plan's targets.
    pub target: u32,
    pub name: String,
    pub kind: TargetKind,
    pub start: String,
    pub state: String,
    /// Cells of the start state the perturbation applied to, and all the start state's cells.
    pub n_cells: u64,
    pub start_cells: u64,
    /// `P_ij` of the unperturbed cells, and with the perturbation applied to every cell of the start
    /// state it applies to (the others unchanged).
    pub baseline: f64,
    pub perturbed: f64,
    /// `perturbed - baseline`.
    pub change: f64,
    /// The mean change of `P(state | cell)` over the cells it applied to.
    pub mean_cell_change: f64,
    /// Two-sided rank-sum p-value of the per-cell changes against those of the random null genes (or
    /// random sets of the same size) on the same transition; NaN when untestable.
    pub p_value: f64,
    /// Benjamini-Hochberg q-value over the screened targets, per transition.
    pub fdr: f64,
    /// `baseline >= transitions.terminate_below > perturbed`.
    pub terminated: bool,
    /// The start state's entropy `H(C_i)` before and after.
    pub entropy_before: f64,
    pub entropy_after: f64,
    /// The prior-weighted entropy of the whole matrix before and after.
    pub overall_entropy_before: f64,
    pub overall_entropy_after: f64,
}

/// Merges a transitions screen: `original` holds the plan's cells unperturbed (`cells x classes`, plan
/// order), `per_target` each target's records.
pub fn merge_transitions(
    plan: &ScreenPlan,
    original: &[f32],
    per_target: &[TargetClassRecords],
) -> Result<TransitionResults> {
    let classifier = plan
        .classifier
        .as_ref()
        .ok_or_else(|| ScreenError::Merge("a transitions merge of a plan without one".into()))?;
    let n_classes = classifier.classes.len();
    let starts = classifier.start_names();
    let baseline = transition_matrix(original, n_classes, &classifier.cell_start, &starts)?;
    let threshold = plan
        .spec
        .transitions
        .as_ref()
        .map_or(0.05, |t| t.terminate_below);
    // Per target, per (start, state): the per-cell changes.
    let per_cell = |records: &TargetClassRecords, i: usize, j: usize| -> Vec<f64> {
        records
            .start
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s as usize == i)
            .map(|(r, _)| f64::from(records.delta[r * n_classes + j]))
            .collect()
    };
    let null_singles: Vec<usize> = (0..plan.targets.len())
        .filter(|&t| plan.targets[t].null && plan.targets[t].kind == TargetKind::Gene)
        .collect();
    let mut null_sets: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (t, target) in plan.targets.iter().enumerate() {
        if target.null && target.kind == TargetKind::Set {
            null_sets.entry(target.genes.len()).or_default().push(t);
        }
    }
    let overall_before = baseline.overall_entropy();
    let entropies_before = baseline.class_entropies();
    let mut effects = Vec::new();
    let mut tested: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (t, target) in plan.targets.iter().enumerate() {
        if !target.screened {
            continue;
        }
        let records = &per_target[t];
        let mut after = baseline.clone();
        for (r, &i) in records.start.iter().enumerate() {
            let i = i as usize;
            for j in 0..n_classes {
                after.rows[i][j] +=
                    f64::from(records.delta[r * n_classes + j]) / baseline.cells[i] as f64;
            }
        }
        let entropies_after = after.class_entropies();
        let overall_after = after.overall_entropy();
        let null: &[usize] = match (target.kind, null_sets.get(&target.genes.len())) {
            (TargetKind::Set, Some(sets)) => sets,
            _ => &null_singles,
        };
        for (i, start) in starts.iter().enumerate() {
            let n_cells = records.start.iter().filter(|&&s| s as usize == i).count() as u64;
            for (j, state) in classifier.classes.iter().enumerate() {
                let values = per_cell(records, i, j);
                // A null gene is tested against the other null genes, not against itself.
                let pooled: Vec<f64> = null
                    .iter()
                    .filter(|&&n| n != t)
                    .flat_map(|&n| per_cell(&per_target[n], i, j))
                    .collect();
                let p_value = mann_whitney(&values, &pooled).map_or(f64::NAN, |(_, p)| p);
                let (before, perturbed) = (baseline.rows[i][j], after.rows[i][j]);
                tested.entry((i, j)).or_default().push(effects.len());
                effects.push(TransitionEffect {
                    target: t as u32,
                    name: target.name.clone(),
                    kind: target.kind,
                    start: start.clone(),
                    state: state.clone(),
                    n_cells,
                    start_cells: baseline.cells[i],
                    baseline: before,
                    perturbed,
                    change: perturbed - before,
                    mean_cell_change: mean(&values),
                    p_value,
                    fdr: f64::NAN,
                    terminated: before >= threshold && perturbed < threshold,
                    entropy_before: entropies_before[i],
                    entropy_after: entropies_after[i],
                    overall_entropy_before: overall_before,
                    overall_entropy_after: overall_after,
                });
            }
        }
    }
    for rows in tested.values() {
        let with_p: Vec<usize> = rows
            .iter()
            .copied()
            .filter(|&r| !effects[r].p_value.is_nan())
            .collect();
        let q = benjamini_hochberg(
            &with_p
                .iter()
                .map(|&r| effects[r].p_value)
                .collect::<Vec<_>>(),
        );
        for (&r, q) in with_p.iter().zip(q) {
            effects[r].fdr = q;
        }
    }
    Ok(TransitionResults {
        classes: classifier.classes.clone(),
        starts,
        baseline,
        effects,
    })
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    /// A hand-computed example: two start states, three cells, two states.
    #[test]
    fn transitions_and_entropies_match_a_hand_computation() {
        // Cells 0 and 1 start in state 0, cell 2 in state 1.
        let p = [0.9f32, 0.1, 0.7, 0.3, 0.2, 0.8];
        let m = transition_matrix(&p, 2, &[0, 0, 1], &names(2)).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(m.rows[0][0], 0.8) && close(m.rows[0][1], 0.2));
        assert!(close(m.rows[1][0], 0.2) && close(m.rows[1][1], 0.8));
        for row in &m.rows {
            assert!(close(row.iter().sum(), 1.0));
        }
        // H(0.8, 0.2) = -(0.8 ln 0.8 + 0.2 ln 0.2) = 0.500402.
        let h = m.class_entropies();
        assert!(close(h[0], 0.500402) && close(h[1], 0.500402), "{h:?}");
        // Priors 2/3 and 1/3.
        assert!(close(m.overall_entropy(), 0.500402));
        assert!(m.overall_entropy() > 0.0, "an entropy, not its negative");
        // A perturbation that moves start 0 to (0.4, 0.6) terminates 0 -> 0 at threshold 0.5.
        let after = transition_matrix(&[0.4f32, 0.6, 0.4, 0.6, 0.2, 0.8], 2, &[0, 0, 1], &names(2))
            .unwrap();
        assert_eq!(m.terminated(&after, 0.5), vec![(0, 0)]);
        assert_eq!(entropy(&[1.0, 0.0]), 0.0);
        assert!(close(entropy(&[0.5, 0.5]), std::f64::consts::LN_2));
    }

    #[test]
    fn a_start_state_without_cells_is_refused_by_name() {
        let err = transition_matrix(
            &[0.5f32, 0.5],
            2,
            &[0],
            &["control".into(), "stimulated".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"stimulated\""), "{err}");
        assert!(transition_matrix(&[0.5f32], 2, &[0], &names(1)).is_err());
    }

    #[test]
    fn calibration_summaries_and_class_weights() {
        let p = [0.6f32, 0.3, 0.1, 0.2, 0.2, 0.6];
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(top_k_confidence(&p, 3, 1), 0.6));
        assert!(close(top_k_confidence(&p, 3, 2), 0.85));
        assert!(close(top_k_confidence(&p, 3, 3), 1.0));
        let uniform = [1.0f32 / 3.0; 3];
        assert!(close(mean_predictive_entropy(&uniform, 3), 3f64.ln()));
        // 90 and 10 examples: weights 100/(2*90) and 100/(2*10); the weighted count stays 100.
        let w = inverse_frequency_weights(&[90, 10, 0]);
        assert!(close(w[0], 100.0 / 180.0) && close(w[1], 5.0) && w[2] == 0.0);
        assert!(close(90.0 * w[0] + 10.0 * w[1], 100.0));
    }
}
