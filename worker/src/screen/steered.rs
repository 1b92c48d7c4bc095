//! A steered screen's units: each (perturbation, cell) record clamps the perturbation's genes and runs
//! `steer.chains` Metropolis-Hastings chains (`steer.rs`), or with `steer.method = "edit"` one token
//! edit at the same clamps. Shifts compare the predicted state (the posterior mean of the retained
//! states) with the cell's observed bins, in bin space, the perturbation's own genes left out of both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use cellfleet_shared::screen::{
    measure_len, ClampSource, PerturbationKind, ScreenPlan, SteerMethod, SteerSpec, Target,
    UnitExpression, UnitResult, UnitSteer,
};
use tch::{Device, Tensor};

use super::compute::{measures, screened_state, unit_rows, Screener, UnitError};
use super::plan::applicable_records;
use super::steer::{
    effective_sample_size, full_layout_tokens, medoids, split_rhat, ChainStart, Sampler,
    SamplerSettings,
};
use crate::model::Mode;

/// What a steered screen computes once per worker: the clamp levels, the states in bin space, the
/// anchors.
pub struct Steering {
    spec: SteerSpec,
    /// With `clamp = "goal"`: per stratum, every gene's goal level (its rounded mean bin among the goal
    /// cells of the stratum).
    goal_levels: Vec<Vec<u8>>,
    /// With `clamp = "bins"`: the given bins; a null gene gets their median.
    given: HashMap<u32, u8>,
    median_given: u8,
    /// `[strata * states, genes]`: unit-length mean bins of each state's cells per stratum.
    centroids: Option<Tensor>,
    /// `[strata * states, genes]`: (state centroid - screened centroid) / its squared length.
    axes: Option<Tensor>,
    /// Per stratum: the screened cells' mean bins and the goal axis, for the goal-projection statistic.
    goal_axis: Vec<(Vec<f32>, Vec<f32>)>,
    anchors: Vec<Vec<f32>>,
}

fn mean_bins(bins: &HashMap<u64, Vec<u8>>, cells: &[u64], genes: usize) -> Vec<f32> {
    let mut sum = vec![0f64; genes];
    for c in cells {
        for (s, &b) in sum.iter_mut().zip(&bins[c]) {
            *s += f64::from(b);
        }
    }
    sum.iter()
        .map(|s| (s / cells.len().max(1) as f64) as f32)
        .collect()
}

impl Steering {
    pub fn load(
        plan: &ScreenPlan,
        bins: &HashMap<u64, Vec<u8>>,
        stratum_of: &HashMap<u64, usize>,
        device: Device,
    ) -> Self {
        let spec = plan.spec.steer.clone().expect("a steered plan");
        let genes = plan.vocabulary.len();
        let strata = plan.strata.len().max(1);
        let members = |state: usize, stratum: usize| -> Vec<u64> {
            let s = &plan.states[state];
            s.cells
                .iter()
                .zip(
                    s.strata
                        .iter()
                        .map(|&x| x as usize)
                        .chain(std::iter::repeat(0)),
                )
                .filter(|&(_, x)| x == stratum)
                .map(|(&c, _)| c)
                .collect()
        };
        let screened_in = |stratum: usize| -> Vec<u64> {
            plan.cells
                .iter()
                .copied()
                .filter(|c| stratum_of[c] == stratum)
                .collect()
        };
        let goal_levels = if spec.clamp == ClampSource::Goal {
            (0..strata)
                .map(|x| {
                    mean_bins(bins, &members(0, x), genes)
                        .iter()
                        .map(|m| m.round() as u8)
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let given: HashMap<u32, u8> = spec
            .bins
            .iter()
            .filter_map(|(name, &b)| {
                let g = plan.vocabulary.iter().position(|v| v == name)?;
                Some((g as u32, b as u8))
            })
            .collect();
        let mut sorted: Vec<u8> = given.values().copied().collect();
        sorted.sort_unstable();
        let median_given = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
        let (mut centroids, mut axes, mut goal_axis) = (Vec::new(), Vec::new(), Vec::new());
        for x in 0..strata {
            let start = mean_bins(bins, &screened_in(x), genes);
            for (s, state) in plan.states.iter().enumerate() {
                let centroid = mean_bins(bins, &members(s, x), genes);
                let axis: Vec<f32> = if screened_state(&plan.spec, &state.name) {
                    vec![f32::NAN; genes]
                } else {
                    let d: Vec<f32> = centroid.iter().zip(&start).map(|(c, a)| c - a).collect();
                    let length2 = d.iter().map(|v| v * v).sum::<f32>().max(1e-12);
                    d.iter().map(|v| v / length2).collect()
                };
                if s == 0 {
                    goal_axis.push((start.clone(), axis.clone()));
                }
                centroids.push(Tensor::from_slice(&centroid));
                axes.push(Tensor::from_slice(&axis));
            }
        }
        // The goal-projection statistic needs an axis: none when the goal is the screened cells' own
        // state (every stratum's axis is then NaN).
        if goal_axis
            .iter()
            .any(|(_, axis)| axis.iter().any(|v| !v.is_finite()))
        {
            goal_axis.clear();
        }
        let stack = |rows: Vec<Tensor>| {
            (!rows.is_empty()).then(|| Tensor::stack(&rows, 0).to_device(device))
        };
        let anchor_points: Vec<Vec<u8>> =
            plan.anchor_cells.iter().map(|c| bins[c].clone()).collect();
        let anchors = spec
            .anchor
            .as_ref()
            .map_or_else(Vec::new, |a| medoids(&anchor_points, a.medoids as usize));
        Self {
            spec,
            goal_levels,
            given,
            median_given,
            centroids: stack(centroids).map(|c| unit_rows(&c)),
            axes: stack(axes),
            goal_axis,
            anchors,
        }
    }

    /// The clamped (gene, bin) pairs of `target` in a cell of `stratum`.
    fn clamps(&self, plan: &ScreenPlan, target: &Target, stratum: usize) -> Vec<(u32, u8)> {
        let top = (plan.n_bins - 1) as u8;
        target
            .genes
            .iter()
            .map(|&g| {
                let bin = match self.spec.clamp {
                    ClampSource::Perturbation => match plan.spec.perturbation.kind {
                        PerturbationKind::Overexpress => top,
                        PerturbationKind::Knockout | PerturbationKind::Delete => 0,
                    },
                    ClampSource::Goal => self.goal_levels[stratum][g as usize],
                    ClampSource::Bins => *self.given.get(&g).unwrap_or(&self.median_given),
                };
                (g, bin)
            })
            .collect()
    }

    /// The summary statistics of a state: total expression, then (with a goal) its projection on the
    /// goal axis of its stratum.
    fn statistics(&self, state: &[u8], stratum: usize, out: &mut Vec<f32>) {
        out.push(state.iter().map(|&b| f32::from(b)).sum());
        if let Some((start, axis)) = self.goal_axis.get(stratum) {
            out.push(
                state
                    .iter()
                    .zip(start.iter().zip(axis))
                    .map(|(&x, (s, a))| (f32::from(x) - s) * a)
                    .sum(),
            );
        }
    }

    fn n_statistics(&self) -> usize {
        1 + usize::from(!self.goal_axis.is_empty())
    }
}

/// One record's prediction and, for MCMC, its diagnostics.
struct Prediction {
    expression: Vec<f32>,
    converged: bool,
    acceptance: Vec<f32>,
    rhat: Vec<f32>,
    ess: Vec<f32>,
    trace: Vec<f32>,
}

impl Screener {
    /// Computes unit `unit` of a steered screen; `stop` is checked every iteration.
    pub fn compute_steered_unit(
        &self,
        steering: &Steering,
        unit: usize,
        stop: &AtomicBool,
    ) -> Result<UnitResult, UnitError> {
        let plan = &self.plan;
        let span = plan.unit(unit);
        let unit_cells: Vec<u64> = plan.cells[span.cells.clone()].to_vec();
        let n = plan.vocabulary.len();
        let n_states = plan.states.len();
        let records = applicable_records(plan, &self.bins, unit);
        let predictions = match steering.spec.method {
            SteerMethod::Mcmc => self.run_chains(steering, &span, &unit_cells, &records, stop)?,
            SteerMethod::Edit => self.token_edits(steering, &span, &unit_cells, &records, stop)?,
        };
        let mcmc = steering.spec.method == SteerMethod::Mcmc;
        let iterations = steering.spec.iterations as usize;
        let statistics = steering.n_statistics();
        let mut result = UnitResult {
            unit: unit as u32,
            plan_blake3: self.plan_blake3.clone(),
            targets: span.targets.clone().map(|t| t as u32).collect(),
            n_vocabulary: n as u32,
            n_states: n_states as u32,
            record_target: Vec::with_capacity(records.len()),
            record_cell: Vec::with_capacity(records.len()),
            cosine_shift: Vec::with_capacity(records.len()),
            state_shift: Vec::with_capacity(records.len() * n_states),
            state_progress: Vec::with_capacity(records.len() * n_states),
            alone: Vec::new(),
            delta_bin_sum: vec![0.0; span.targets.len() * n],
            expression: plan.spec.execution.anndata.then(|| UnitExpression {
                perturbed: Vec::with_capacity(records.len() * n),
                original: unit_cells
                    .iter()
                    .flat_map(|c| self.bins[c].iter().map(|&b| f32::from(b)))
                    .collect(),
            }),
            classes: None,
            attribution: None,
            steer: mcmc.then(|| UnitSteer {
                iterations: iterations as u32,
                chains: steering.spec.chains,
                statistics: statistics as u32,
                converged: Vec::with_capacity(records.len()),
                acceptance: Vec::with_capacity(records.len() * iterations),
                rhat: Vec::with_capacity(records.len() * statistics),
                ess: Vec::with_capacity(records.len() * statistics),
                trace: Vec::new(),
            }),
        };
        // Measures in batches: the prediction and the observed cell, each target's own genes at 0.
        let measure = measure_len(n_states);
        let mut values = Vec::with_capacity(records.len() * measure);
        for chunk in (0..records.len()).collect::<Vec<_>>().chunks(256) {
            let (mut after, mut before, mut rows) = (Vec::new(), Vec::new(), Vec::new());
            for &r in chunk {
                let (k, ci) = records[r];
                let target = &plan.targets[span.targets.start + k];
                let cell = unit_cells[ci];
                for j in 0..n {
                    let own = target.genes.contains(&(j as u32));
                    after.push(if own {
                        0.0
                    } else {
                        predictions[r].expression[j]
                    });
                    before.push(if own {
                        0.0
                    } else {
                        f32::from(self.bins[&cell][j])
                    });
                }
                let base = (self.stratum_of[&cell] * n_states) as i64;
                rows.extend((0..n_states as i64).map(|s| base + s));
            }
            let shape = [chunk.len() as i64, n as i64];
            let device = self.device();
            let as_tensor = |v: &[f32]| Tensor::from_slice(v).view(shape).to_device(device);
            let rows = Tensor::from_slice(&rows).to_device(device);
            let states = match (&steering.centroids, &steering.axes) {
                (Some(c), Some(a)) => Some((
                    c.index_select(0, &rows)
                        .view([-1, n_states as i64, n as i64]),
                    a.index_select(0, &rows)
                        .view([-1, n_states as i64, n as i64]),
                )),
                _ => None,
            };
            values.extend(measures(
                &as_tensor(&after),
                &as_tensor(&before),
                states.as_ref().map(|(t, a)| (t, a)),
            )?);
        }
        for (r, (&(k, ci), prediction)) in records.iter().zip(&predictions).enumerate() {
            let cell = unit_cells[ci];
            let target = &plan.targets[span.targets.start + k];
            result.record_target.push((span.targets.start + k) as u32);
            result.record_cell.push(cell);
            let mut m = values[r * measure..(r + 1) * measure].to_vec();
            if !prediction.converged {
                // Reported in the diagnostics, never averaged into the effects.
                m.iter_mut().for_each(|v| *v = f32::NAN);
            } else {
                let sums = &mut result.delta_bin_sum[k * n..(k + 1) * n];
                let observed = &self.bins[&cell];
                for (j, (sum, predicted)) in sums.iter_mut().zip(&prediction.expression).enumerate()
                {
                    if !target.genes.contains(&(j as u32)) {
                        *sum += predicted - f32::from(observed[j]);
                    }
                }
            }
            result.cosine_shift.push(m[0]);
            result.state_shift.extend_from_slice(&m[1..1 + n_states]);
            result.state_progress.extend_from_slice(&m[1 + n_states..]);
            if let Some(e) = result.expression.as_mut() {
                e.perturbed.extend_from_slice(&prediction.expression);
            }
            if let Some(s) = result.steer.as_mut() {
                s.converged.push(u8::from(prediction.converged));
                s.acceptance.extend_from_slice(&prediction.acceptance);
                s.rhat.extend_from_slice(&prediction.rhat);
                s.ess.extend_from_slice(&prediction.ess);
                s.trace.extend_from_slice(&prediction.trace);
            }
        }
        Ok(result)
    }

    /// Where the chains of target `target_index` in `cell` start (the cell's bins with the clamps
    /// applied) and the genes they may move.
    fn chain_start(
        &self,
        steering: &Steering,
        target_index: usize,
        cell: u64,
    ) -> (Vec<u8>, Vec<u32>) {
        let target = &self.plan.targets[target_index];
        let mut bins = self.bins[&cell].clone();
        for (g, b) in steering.clamps(&self.plan, target, self.stratum_of[&cell]) {
            bins[g as usize] = b;
        }
        let free = (0..bins.len() as u32)
            .filter(|g| !target.genes.contains(g))
            .collect();
        (bins, free)
    }

    /// Every chain's start state and free genes over the whole plan, in unit and record order (what
    /// `bench steer` gives its PyTorch baseline).
    pub fn steer_chain_starts(&self) -> anyhow::Result<Vec<(Vec<u8>, Vec<u32>)>> {
        let steering = self
            .steering
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the screen has no [steer] section"))?;
        let plan = &self.plan;
        let mut starts = Vec::new();
        for unit in 0..plan.unit_count() {
            let span = plan.unit(unit);
            for (k, ci) in applicable_records(plan, &self.bins, unit) {
                let start = self.chain_start(
                    steering,
                    span.targets.start + k,
                    plan.cells[span.cells.start + ci],
                );
                starts.extend(std::iter::repeat_n(start, steering.spec.chains as usize));
            }
        }
        Ok(starts)
    }

    /// Runs every record's chains, a group of records at a time (`execution.batch` chains per group).
    fn run_chains(
        &self,
        steering: &Steering,
        span: &cellfleet_shared::screen::UnitSpan,
        unit_cells: &[u64],
        records: &[(usize, usize)],
        stop: &AtomicBool,
    ) -> Result<Vec<Prediction>, UnitError> {
        let plan = &self.plan;
        let spec = &steering.spec;
        let chains = spec.chains as usize;
        let iterations = spec.iterations as usize;
        let n = plan.vocabulary.len();
        let statistics = steering.n_statistics();
        let group = (plan.spec.execution.batch as usize / chains).max(1);
        let settings = SamplerSettings {
            temperature: spec.temperature,
            block: spec.block as usize,
            target_groups: spec.target_groups as usize,
            anchor_weight: spec.anchor.as_ref().map_or(0.0, |a| a.weight),
            batch_rows: plan.spec.execution.batch as usize,
        };
        let anchor_sets = if steering.anchors.is_empty() {
            Vec::new()
        } else {
            vec![steering.anchors.clone()]
        };
        let mut predictions = Vec::with_capacity(records.len());
        for members in records.chunks(group) {
            let mut starts = Vec::with_capacity(members.len() * chains);
            let mut strata = Vec::with_capacity(members.len());
            for &(k, ci) in members {
                let target_index = span.targets.start + k;
                let cell = unit_cells[ci];
                strata.push(self.stratum_of[&cell]);
                let (bins, free) = self.chain_start(steering, target_index, cell);
                for chain in 0..chains {
                    starts.push(ChainStart {
                        bins: bins.clone(),
                        free: free.clone(),
                        anchors: (!anchor_sets.is_empty()).then_some(0),
                        rng: ChainStart::stream(
                            plan.spec.seed,
                            target_index as u32,
                            cell,
                            chain as u32,
                        ),
                    });
                }
            }
            let mut sampler = Sampler::new(&self.model, settings, anchor_sets.clone(), starts)?;
            let rows = members.len() * chains;
            let mut accepted = vec![0f32; members.len() * iterations];
            // trace[row][iteration][statistic]
            let mut trace = vec![Vec::with_capacity(iterations * statistics); rows];
            let mut sums = vec![vec![0f64; n]; members.len()];
            let mut kept = 0usize;
            let mut scratch = Vec::with_capacity(statistics);
            for iteration in 0..iterations {
                if stop.load(Ordering::Relaxed) {
                    return Err(UnitError::Interrupted);
                }
                let steps = sampler.iterate()?;
                let keep = iteration >= spec.burn_in as usize
                    && (iteration - spec.burn_in as usize).is_multiple_of(spec.thin as usize);
                for (row, step) in steps.iter().enumerate() {
                    let record = row / chains;
                    if step.accepted {
                        accepted[record * iterations + iteration] += 1.0 / chains as f32;
                    }
                    let state = sampler.state(row);
                    scratch.clear();
                    steering.statistics(state, strata[record], &mut scratch);
                    trace[row].extend_from_slice(&scratch);
                    if keep {
                        for (s, &b) in sums[record].iter_mut().zip(state) {
                            *s += f64::from(b);
                        }
                    }
                }
                if keep {
                    kept += 1;
                }
            }
            for (record, sum) in sums.into_iter().enumerate() {
                let mut rhat = Vec::with_capacity(statistics);
                let mut ess = Vec::with_capacity(statistics);
                for s in 0..statistics {
                    let retained: Vec<Vec<f64>> = (0..chains)
                        .map(|c| {
                            let row = &trace[record * chains + c];
                            (spec.burn_in as usize..iterations)
                                .step_by(spec.thin as usize)
                                .map(|it| f64::from(row[it * statistics + s]))
                                .collect()
                        })
                        .collect();
                    rhat.push(split_rhat(&retained) as f32);
                    ess.push(effective_sample_size(&retained) as f32);
                }
                let converged = rhat
                    .iter()
                    .all(|r| r.is_finite() && f64::from(*r) <= spec.rhat_max);
                predictions.push(Prediction {
                    expression: sum
                        .iter()
                        .map(|s| (s / (kept * chains) as f64) as f32)
                        .collect(),
                    converged,
                    acceptance: accepted[record * iterations..(record + 1) * iterations].to_vec(),
                    rhat,
                    ess,
                    trace: (0..chains)
                        .flat_map(|c| trace[record * chains + c].iter().copied())
                        .collect(),
                });
            }
        }
        Ok(predictions)
    }

    /// The token edit at the same clamps: one forward of the edited cell and one of the cell as it is;
    /// the prediction is the observed cell plus the change of the model's expected bins (the clamped
    /// genes at their clamped bins).
    fn token_edits(
        &self,
        steering: &Steering,
        span: &cellfleet_shared::screen::UnitSpan,
        unit_cells: &[u64],
        records: &[(usize, usize)],
        stop: &AtomicBool,
    ) -> Result<Vec<Prediction>, UnitError> {
        let plan = &self.plan;
        let n = plan.vocabulary.len();
        let batch = (plan.spec.execution.batch as usize / 2).max(1);
        let top = f32::from(plan.n_bins - 1);
        let mut predictions = Vec::with_capacity(records.len());
        for members in records.chunks(batch) {
            if stop.load(Ordering::Relaxed) {
                return Err(UnitError::Interrupted);
            }
            let mut states: Vec<Vec<u8>> = Vec::with_capacity(members.len() * 2);
            for &(k, ci) in members {
                let target = &plan.targets[span.targets.start + k];
                let cell = unit_cells[ci];
                let mut edited = self.bins[&cell].clone();
                for (g, b) in steering.clamps(plan, target, self.stratum_of[&cell]) {
                    edited[g as usize] = b;
                }
                states.push(edited);
                states.push(self.bins[&cell].clone());
            }
            let expected = self.full_layout_expected(&states)?;
            for (i, (edited, observed)) in states.chunks(2).map(|p| (&p[0], &p[1])).enumerate() {
                let (after, before) = (
                    &expected[2 * i * n..(2 * i + 1) * n],
                    &expected[(2 * i + 1) * n..(2 * i + 2) * n],
                );
                let target = &plan.targets[span.targets.start + members[i].0];
                predictions.push(Prediction {
                    expression: (0..n)
                        .map(|j| {
                            if target.genes.contains(&(j as u32)) {
                                f32::from(edited[j])
                            } else {
                                // Within the bins: the edit's change can take an unexpressed
                                // gene below 0.
                                (f32::from(observed[j]) + after[j] - before[j]).clamp(0.0, top)
                            }
                        })
                        .collect(),
                    converged: true,
                    acceptance: Vec::new(),
                    rhat: Vec::new(),
                    ess: Vec::new(),
                    trace: Vec::new(),
                });
            }
        }
        Ok(predictions)
    }

    /// The model's expected bin of every gene of full-layout cells `states` (`rows x genes`).
    fn full_layout_expected(&self, states: &[Vec<u8>]) -> Result<Vec<f32>, UnitError> {
        let n = self.plan.vocabulary.len();
        let rows: Vec<&[u8]> = states.iter().map(Vec::as_slice).collect();
        let tokens = full_layout_tokens(&self.model, &rows, |_, _| false);
        let expected = tch::no_grad(|| {
            let hidden = self.model.forward(&tokens, Mode::EVAL).hidden;
            self.expected_bins(&hidden.narrow(1, 1, n as i64))
        });
        Ok(Vec::<f32>::try_from(
            expected.to_device(Device::Cpu).flatten(0, -1),
        )?)
    }
}
