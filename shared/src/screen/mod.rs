//! In-silico perturbation screens without tensors: the screen specification, the resolved plan that
//! every worker reads (which genes and cells, cut into work units), the binary result of one unit, and
//! the merge of unit results into per-gene effects with statistics against a random-gene null.
//!
//! A unit is a block of genes x a block of cells. Its result lives under a deterministic key
//! ([`unit_key`]), so a unit computed twice (after a lost lease) overwrites its own object, and the merge
//! takes each unit exactly once, in unit order, whatever order the units completed in.
//!
//! `spec` (what a user writes) -> `plan` (what every worker reads) -> `unit` (what a worker stores per
//! unit) -> `merge` (per-gene and per-pair rows, with `stats`).

pub mod attribution;
pub mod merge;
pub mod plan;
pub mod spec;
pub mod stats;
pub mod transitions;
pub mod unit;

pub use attribution::{RankedCell, RankingFile, RANKING_FILE, RANKING_FORMAT};
pub use merge::*;
pub use plan::*;
pub use spec::*;
pub use unit::*;

pub const PLAN_FORMAT: &str = "cellfleet-screen-plan/2";
pub const PLAN_FILE: &str = "plan.json";
pub const UNIT_MAGIC: &[u8] = b"cellfleet-screen-unit/2\n";

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
        let targets = work
            .iter()
            .map(|&g| Target {
                name: format!("G{g}"),
                kind: TargetKind::Gene,
                genes: vec![g],
                screened: genes.contains(&g),
                null: null_genes.contains(&g),
            })
            .collect();
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
                readout: Readout::default(),
                layer: -1,
                combinations: None,
                count_own_genes: false,
                query_genes: None,
                goal: None,
                null: NullSpec::default(),
                execution: Execution {
                    gene_block,
                    cell_block,
                    ..Execution::default()
                },
                steer: None,
                transitions: None,
                attribution: None,
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
            targets,
            readout_layer: 2,
            cell_names: cells.iter().map(|c| format!("cell{c}")).collect(),
            cells,
            states: vec![StateCells {
                name: "goal".into(),
                cells: vec![0],
                strata: Vec::new(),
            }],
            strata: Vec::new(),
            cell_strata: Vec::new(),
            unit_records: Vec::new(),
            anchor_cells: Vec::new(),
            classifier: None,
            references: Vec::new(),
            guided_genes: Vec::new(),
        };
        plan.unit_records = (0..plan.unit_count())
            .map(|u| {
                let s = plan.unit(u);
                (s.targets.len() * s.cells.len()) as u64
            })
            .collect();
        plan
    }

    /// Every record of `unit`, with a goal shift that grows with the gene id.
    fn result(plan: &ScreenPlan, unit: usize) -> UnitResult {
        let span = plan.unit(unit);
        let targets: Vec<u32> = span.targets.clone().map(|t| t as u32).collect();
        let mut r = UnitResult {
            unit: unit as u32,
            plan_blake3: "p".into(),
            targets: targets.clone(),
            n_vocabulary: plan.vocabulary.len() as u32,
            n_states: 1,
            record_target: Vec::new(),
            record_cell: Vec::new(),
            cosine_shift: Vec::new(),
            state_shift: Vec::new(),
            state_progress: Vec::new(),
            alone: Vec::new(),
            delta_bin_sum: vec![0.0; targets.len() * plan.vocabulary.len()],
            expression: None,
            steer: None,
            classes: None,
            attribution: None,
        };
        for (k, &t) in targets.iter().enumerate() {
            let g = plan.targets[t as usize].genes[0];
            for &c in &plan.cells[span.cells.clone()] {
                r.record_target.push(t);
                r.record_cell.push(c);
                r.cosine_shift.push(0.01 * g as f32);
                r.state_shift.push(g as f32 + (c % 7) as f32 * 0.1);
                r.state_progress.push(g as f32 + (c % 5) as f32 * 0.1);
                r.delta_bin_sum[k * plan.vocabulary.len() + (g as usize + 1) % 6] += 0.5;
            }
        }
        r
    }

    /// A transitions screen of 8 cells (4 start in `a`, 4 in `b`): gene 0 moves the `a` cells to `b` by
    /// 0.6, gene 1 and the null genes 2-5 move every cell by at most 0.02.
    #[test]
    fn transitions_merge_into_perturbed_matrices_tested_against_the_null_genes() {
        let mut plan = plan(vec![0, 1], vec![2, 3, 4, 5], (0..8).collect(), 2, 4);
        plan.spec.transitions = Some(TransitionsSpec {
            classifier: "clf".into(),
            start: None,
            terminate_below: 0.5,
        });
        plan.classifier = Some(ClassifierId {
            url: "clf".into(),
            weights_blake3: "w".into(),
            label_column: "state".into(),
            classes: vec!["a".into(), "b".into()],
            starts: vec![0, 1],
            cell_start: vec![0, 0, 0, 0, 1, 1, 1, 1],
        });
        let original = |c: u64| if c < 4 { [0.9f32, 0.1] } else { [0.2, 0.8] };
        let mut merger = Merger::new(&plan, "p");
        for u in 0..plan.unit_count() {
            let mut r = result(&plan, u);
            let span = plan.unit(u);
            let mut classes = UnitClasses {
                n_classes: 2,
                original: plan.cells[span.cells.clone()]
                    .iter()
                    .flat_map(|&c| original(c))
                    .collect(),
                perturbed: Vec::new(),
            };
            for (&t, &c) in r.record_target.iter().zip(&r.record_cell) {
                let g = plan.targets[t as usize].genes[0];
                let shift = if g == 0 && c < 4 {
                    0.6
                } else {
                    0.005 * ((c + u64::from(g)) % 5) as f32
                };
                let [a, b] = original(c);
                classes.perturbed.extend([a - shift, b + shift]);
            }
            r.classes = Some(classes);
            let decoded = UnitResult::decode("k", &r.encode()).unwrap();
            assert_eq!(decoded, r, "the state probabilities survive encoding");
            merger.add(&format!("u{u}"), decoded).unwrap();
        }
        let results = merger.finish(false).unwrap();
        let t = results.transitions.expect("a transitions screen");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(t.baseline.rows[0][0], 0.9) && close(t.baseline.rows[1][1], 0.8));
        assert_eq!(t.baseline.cells, vec![4, 4]);
        // Two screened genes x 2 starts x 2 states.
        assert_eq!(t.effects.len(), 8);
        let row = |name: &str, start: &str, state: &str| {
            t.effects
                .iter()
                .find(|e| e.name == name && e.start == start && e.state == state)
                .unwrap()
        };
        let aa = row("G0", "a", "a");
        assert!(close(aa.perturbed, 0.3) && close(aa.change, -0.6), "{aa:?}");
        assert!(close(aa.mean_cell_change, -0.6) && aa.n_cells == 4);
        assert!(aa.terminated, "0.9 -> 0.3 crosses 0.5");
        assert!(aa.p_value < 0.01, "{aa:?}");
        assert!(aa.entropy_after > aa.entropy_before);
        // Each perturbed row still sums to 1.
        assert!(close(aa.perturbed + row("G0", "a", "b").perturbed, 1.0));
        // Gene 0 changes nothing in the `b` cells beyond the null's size; gene 1 is like the null.
        let g1 = row("G1", "a", "a");
        assert!(!g1.terminated && g1.p_value > 0.05, "{g1:?}");
        assert!(!row("G0", "b", "b").terminated);
        assert!(t
            .effects
            .iter()
            .all(|e| close(e.overall_entropy_before, t.baseline.overall_entropy())));
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
        let genes: Vec<u32> = p.targets.iter().map(|t| t.genes[0]).collect();
        assert_eq!(genes, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p.unit_count(), 3 * 3);
        let mut seen = std::collections::HashSet::new();
        for u in 0..p.unit_count() {
            let s = p.unit(u);
            for g in s.targets.clone() {
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

    /// Steered units carry their chain diagnostics through encoding; an unconverged record (NaN
    /// measures) is counted in `unconverged_cells` and left out of every mean, test and change sum, yet
    /// its diagnostics stay, in record order.
    #[test]
    fn steered_diagnostics_round_trip_and_unconverged_records_are_not_averaged() {
        let p = plan(vec![0, 1, 2], vec![3], (0..4).collect(), 4, 4);
        let mut r = result(&p, 0);
        let records = r.records();
        let (iterations, chains, statistics) = (3usize, 2usize, 2usize);
        r.steer = Some(UnitSteer {
            iterations: iterations as u32,
            chains: chains as u32,
            statistics: statistics as u32,
            converged: (0..records).map(|i| u8::from(i != 1)).collect(),
            acceptance: (0..records * iterations)
                .map(|i| i as f32 / 100.0)
                .collect(),
            rhat: (0..records * statistics)
                .map(|i| 1.0 + i as f32 / 1000.0)
                .collect(),
            ess: (0..records * statistics).map(|i| i as f32).collect(),
            trace: (0..records * chains * iterations * statistics)
                .map(|i| i as f32)
                .collect(),
        });
        // Record 1 (target 0, cell 1) did not converge: its measures are NaN, as a worker writes them.
        r.cosine_shift[1] = f32::NAN;
        r.state_shift[1] = f32::NAN;
        r.state_progress[1] = f32::NAN;
        let bytes = r.encode();
        let decoded = UnitResult::decode("k", &bytes).unwrap();
        assert_eq!(decoded.steer, r.steer);
        // A steer block cut short is refused, not read past.
        let mut raw = zstd::stream::decode_all(&bytes[..]).unwrap();
        raw.truncate(raw.len() - 4);
        let damaged = zstd::bulk::compress(&raw, 1).unwrap();
        assert!(UnitResult::decode("k", &damaged)
            .unwrap_err()
            .to_string()
            .contains("truncated"));

        let mut merger = Merger::new(&p, "p");
        merger.add(&unit_key(0), decoded).unwrap();
        let merged = merger.finish(true).unwrap();
        let gene0 = merged
            .targets
            .iter()
            .find(|t| t.gene_id == Some(0))
            .unwrap();
        assert_eq!(gene0.unconverged_cells, 1);
        assert_eq!(gene0.n_cells, 3);
        assert!(gene0.state_progress[0].is_finite() && gene0.cosine_shift.is_finite());
        let steer = merged.steer.unwrap();
        assert_eq!(steer.len(), records);
        assert!(!steer[1].converged && steer[0].converged);
        assert_eq!(steer[1].trace.len(), chains * iterations * statistics);
        assert_eq!(steer[2].acceptance, vec![0.06, 0.07, 0.08]);
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
        assert_eq!(a.total_records, 5 * 9);
        assert_eq!(a.records.as_ref().unwrap().len(), 5 * 9);
        // Ranked by goal shift, which grows with the gene id; gene 4 lies above the null (genes 0, 1).
        let order: Vec<u32> = a.targets.iter().map(|g| g.gene_id.unwrap()).collect();
        assert_eq!(order, vec![4, 3, 2, 1, 0]);
        assert!(a.targets[0].p_value < 0.05 && a.targets[0].fdr >= a.targets[0].p_value);
        assert_eq!(a.targets[0].top_affected[0], ("G5".to_string(), 0.5));
        assert!(a.targets.iter().all(|g| g.n_cells == 9));
        assert!(a
            .targets
            .iter()
            .any(|g| g.gene_id == Some(0) && g.null_gene));
    }

    /// Pairs of anchor 0 with every other gene: a screened gene's pairs interact (pair 2.0 against 1.0
    /// and 0.5 alone), the null genes' pairs are additive.
    #[test]
    fn pair_interactions_are_the_pair_minus_both_genes_alone_tested_against_null_pairs() {
        let mut p = plan(vec![0, 1, 2], vec![3, 4], (0..12).collect(), 3, 12);
        for g in 1..5u32 {
            p.targets.push(Target {
                name: format!("G0+G{g}"),
                kind: TargetKind::Pair,
                genes: vec![0, g],
                screened: g < 3,
                null: g >= 3,
            });
        }
        p.unit_records = (0..p.unit_count())
            .map(|u| {
                let s = p.unit(u);
                (s.targets.len() * s.cells.len()) as u64
            })
            .collect();
        let mut merger = Merger::new(&p, "p");
        for u in 0..p.unit_count() {
            let span = p.unit(u);
            let mut r = result(&p, 0);
            r.unit = u as u32;
            r.targets = span.targets.clone().map(|t| t as u32).collect();
            r.delta_bin_sum = vec![0.0; r.targets.len() * 6];
            (r.record_target, r.record_cell) = (Vec::new(), Vec::new());
            (r.cosine_shift, r.state_shift, r.state_progress) =
                (Vec::new(), Vec::new(), Vec::new());
            for t in span.targets.clone() {
                let target = &p.targets[t];
                for c in span.cells.clone() {
                    let jitter = (c % 4) as f32 * 0.01;
                    let progress = match (target.kind, target.null) {
                        (TargetKind::Pair, false) => 2.0 + jitter,
                        (TargetKind::Pair, true) => 1.5 + jitter,
                        _ => 0.1 * target.genes[0] as f32,
                    };
                    r.record_target.push(t as u32);
                    r.record_cell.push(c as u64);
                    r.cosine_shift.push(0.1);
                    r.state_shift.push(0.0);
                    r.state_progress.push(progress);
                    if target.kind == TargetKind::Pair {
                        // [cosine, shift, progress] for the anchor alone, then the gene alone.
                        r.alone.extend([0.1, 0.0, 1.0, 0.1, 0.0, 0.5]);
                    }
                }
            }
            merger.add(&unit_key(u), r).unwrap();
        }
        let results = merger.finish(true).unwrap();
        let row = |name: &str| results.targets.iter().find(|t| t.name == name).unwrap();
        let pair = row("G0+G1").pair.clone().unwrap();
        assert_eq!((pair.anchor_alone, pair.gene_alone), (1.0, 0.5));
        assert!((pair.interaction - 0.515).abs() < 1e-5, "{pair:?}");
        assert!(pair.p_value < 1e-3 && pair.fdr >= pair.p_value, "{pair:?}");
        assert!(row("G1").pair.is_none());
        // Null pairs are the interaction's null, not rows.
        assert!(results.targets.iter().all(|t| t.name != "G0+G3"));
        let record = results
            .records
            .unwrap()
            .into_iter()
            .find(|r| p.targets[r.target as usize].name == "G0+G2" && r.cell == 1)
            .unwrap();
        let expected = 2.01 - 1.0 - 0.5;
        assert!((record.pair.unwrap().interaction - expected).abs() < 1e-6);
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
        moved.record_cell[0] = 3;
        assert!(m
            .add("u2", moved)
            .unwrap_err()
            .to_string()
            .contains("outside unit 2"));
        let mut repeated = result(&p, 3);
        repeated.record_cell[1] = repeated.record_cell[0];
        let err = m.add("u3", repeated).unwrap_err().to_string();
        assert!(err.contains("out of order or repeated"), "{err}");
        let err = m.finish(false).unwrap_err().to_string();
        assert!(err.contains("3 of 4 units have no result"), "{err}");
    }
}
