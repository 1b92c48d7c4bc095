//! MCMC steering (CellxPert): a perturbation clamps some genes' bins and a Metropolis-Hastings chain lets
//! the rest of the cell move to states the model finds likely. The exact rules (target, proposal,
//! acceptance, diagnostics) are in `docs/steering.md`; in short:
//!
//! * state: a cell's bins over the whole vocabulary (the full token layout); clamped genes never move;
//! * target: `log pi(x) = PL_M(x) - lambda * min_k D(x, a_k)`, where `PL_M` is the model's
//!   pseudo-log-likelihood computed in `M` forward passes (gene `j` is scored in pass `j mod M`, with the
//!   genes of its pass masked) and `D` the mean squared bin distance to the nearest anchor medoid;
//! * proposal: a uniformly chosen block of `k` unclamped genes is masked and redrawn from the tempered
//!   conditionals `softmax(logits / tau)` given the rest. The conditionals at a masked block do not depend
//!   on the block's own bins, so one forward pass gives both the forward and the reverse proposal
//!   probability, and the acceptance is
//!   `min(1, pi(x') q(x_b | x_-b) / (pi(x) q(x'_b | x_-b)))`.
//!
//! Every random draw comes from a Philox stream per (seed, target, cell, chain), consumed in iteration
//! order, and categorical draws are inverse-CDF on the CPU: a chain is the same bit for bit on the CPU
//! whichever worker runs it.

use cellfleet_shared::philox::{Domain, PhiloxStream};
use tch::{Device, Kind, Tensor};

use crate::model::{CellModel, Mode, Tokens};

/// The sampler's settings, resolved from a screen's `[steer]` section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSettings {
    /// Temperature of the proposal conditionals (the target is untempered: see `docs/steering.md`).
    pub temperature: f64,
    /// Unclamped genes redrawn per proposal.
    pub block: usize,
    /// Forward passes per pseudo-likelihood (`M`).
    pub target_groups: usize,
    /// Weight `lambda` of the anchor term (per squared bin of mean distance).
    pub anchor_weight: f64,
    /// Rows per forward pass.
    pub batch_rows: usize,
}

/// One chain to run: where it starts, what it may move, and where its randomness comes from.
#[derive(Debug, Clone)]
pub struct ChainStart {
    /// The start state (bins in vocabulary order), clamped genes already at their clamped bins.
    pub bins: Vec<u8>,
    /// The genes that may move (ascending vocabulary positions).
    pub free: Vec<u32>,
    /// Index into the anchor sets given to the sampler, if the chain is pulled toward anchors.
    pub anchors: Option<usize>,
    pub rng: PhiloxStream,
}

impl ChainStart {
    /// The chain's random stream: a function of (seed, target, cell, chain) alone.
    pub fn stream(seed: u64, target: u32, cell: u64, chain: u32) -> PhiloxStream {
        // Chain number and the cell's high bits go into the key, so every (target, cell, chain) has its
        // own stream and the counter's two free words stay the stream position.
        let key = seed
            ^ u64::from(chain).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (cell >> 32).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        PhiloxStream::new(key, Domain::Steer, target, cell as u32)
    }
}

/// A running chain.
struct Chain {
    bins: Vec<u8>,
    free: Vec<u32>,
    anchors: Option<usize>,
    rng: PhiloxStream,
    log_target: f64,
}

/// What one iteration did to one chain (for the brute-force test and the diagnostics).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub block: Vec<u32>,
    pub proposed: Vec<u8>,
    /// `log pi(x')`, `log pi(x)`, `log q(x | x')` (reverse), `log q(x' | x)` (forward).
    pub log_target_proposed: f64,
    pub log_target_current: f64,
    pub log_reverse: f64,
    pub log_forward: f64,
    pub accepted: bool,
}

impl Step {
    /// The log Metropolis-Hastings ratio.
    pub fn log_ratio(&self) -> f64 {
        self.log_target_proposed - self.log_target_current + self.log_reverse - self.log_forward
    }
}

/// Runs many chains in lockstep on one model: each iteration is one batched proposal pass and `M`
/// batched target passes over all chains.
pub struct Sampler<'a> {
    model: &'a CellModel,
    settings: SamplerSettings,
    /// Anchor sets: each a list of medoids (bins in vocabulary order, as f32).
    anchor_sets: Vec<Vec<Vec<f32>>>,
    chains: Vec<Chain>,
    n_genes: usize,
    n_bins: usize,
}

impl<'a> Sampler<'a> {
    pub fn new(
        model: &'a CellModel,
        settings: SamplerSettings,
        anchor_sets: Vec<Vec<Vec<f32>>>,
        starts: Vec<ChainStart>,
    ) -> anyhow::Result<Self> {
        let n_genes = model.config.n_genes;
        let n_bins = model.config.n_bins;
        for start in &starts {
            anyhow::ensure!(
                start.bins.len() == n_genes,
                "a chain's state has {} genes, the model {n_genes}",
                start.bins.len()
            );
            if let Some(a) = start.anchors {
                anyhow::ensure!(a < anchor_sets.len(), "anchor set {a} does not exist");
            }
        }
        let mut sampler = Self {
            model,
            settings,
            anchor_sets,
            chains: starts
                .into_iter()
                .map(|s| Chain {
                    bins: s.bins,
                    free: s.free,
                    anchors: s.anchors,
                    rng: s.rng,
                    log_target: 0.0,
                })
                .collect(),
            n_genes,
            n_bins,
        };
        let states: Vec<&[u8]> = sampler.chains.iter().map(|c| c.bins.as_slice()).collect();
        let log_targets = sampler.log_targets(&states)?;
        for (chain, value) in sampler.chains.iter_mut().zip(log_targets) {
            chain.log_target = value;
        }
        Ok(sampler)
    }

    pub fn chains(&self) -> usize {
        self.chains.len()
    }

    /// Chain `c`'s current state.
    pub fn state(&self, c: usize) -> &[u8] {
        &self.chains[c].bins
    }

    /// The full-layout token rows of `states` with the genes where `masked(row, gene)` holds masked.
    fn tokens(&self, states: &[&[u8]], masked: impl Fn(usize, usize) -> bool) -> Tokens {
        full_layout_tokens(self.model, states, masked)
    }

    /// Bin log-probabilities `[rows, genes, bins]` (on the CPU, row-major) of token rows, tempered by
    /// `temperature`.
    fn log_conditionals(&self, tokens: &Tokens, temperature: f64) -> anyhow::Result<Vec<f32>> {
        let log_probs = tch::no_grad(|| {
            let hidden = self.model.forward(tokens, Mode::EVAL).hidden;
            let genes = hidden.narrow(1, 1, self.n_genes as i64);
            (self.model.bin_logits(&genes, false) / temperature).log_softmax(-1, Kind::Float)
        });
        Ok(Vec::<f32>::try_from(
            log_probs.to_device(Device::Cpu).flatten(0, -1),
        )?)
    }

    /// `log pi` of each state: the pseudo-log-likelihood over every gene (clamped ones included: they
    /// score how well the rest of the cell fits them) in `M` masked passes, minus the anchor term of the
    /// chain's anchor set.
    fn log_targets(&self, states: &[&[u8]]) -> anyhow::Result<Vec<f64>> {
        let groups = self.settings.target_groups;
        let (g, b) = (self.n_genes, self.n_bins);
        let mut pseudo = vec![0f64; states.len()];
        // Rows (state, group) in chunks of the forward batch.
        let rows: Vec<(usize, usize)> = (0..states.len())
            .flat_map(|s| (0..groups).map(move |m| (s, m)))
            .collect();
        for chunk in rows.chunks(self.settings.batch_rows.max(1)) {
            let chunk_states: Vec<&[u8]> = chunk.iter().map(|&(s, _)| states[s]).collect();
            let tokens = self.tokens(&chunk_states, |r, j| j % groups == chunk[r].1);
            let log_probs = self.log_conditionals(&tokens, 1.0)?;
            for (r, &(s, m)) in chunk.iter().enumerate() {
                let mut sum = 0f64;
                for j in (m..g).step_by(groups) {
                    sum += f64::from(log_probs[(r * g + j) * b + states[s][j] as usize]);
                }
                pseudo[s] += sum;
            }
        }
        Ok(pseudo
            .into_iter()
            .zip(states)
            .enumerate()
            .map(|(c, (pl, state))| {
                pl - self.settings.anchor_weight * self.anchor_distance(c, state)
            })
            .collect())
    }

    /// The mean squared bin distance from `state` to the nearest medoid of chain `c`'s anchor set (0
    /// without anchors).
    fn anchor_distance(&self, c: usize, state: &[u8]) -> f64 {
        let Some(set) = self.chains[c].anchors else {
            return 0.0;
        };
        self.anchor_sets[set]
            .iter()
            .map(|medoid| {
                medoid
                    .iter()
                    .zip(state)
                    .map(|(&a, &x)| (f64::from(x) - f64::from(a)).powi(2))
                    .sum::<f64>()
                    / state.len() as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// One iteration of every chain; returns what happened to each.
    pub fn iterate(&mut self) -> anyhow::Result<Vec<Step>> {
        let tau = self.settings.temperature;
        let (g, b) = (self.n_genes, self.n_bins);
        // Blocks: a partial Fisher-Yates shuffle of each chain's free genes, from its own stream.
        let blocks: Vec<Vec<u32>> = self
            .chains
            .iter_mut()
            .map(|chain| {
                let k = self.settings.block.min(chain.free.len());
                let mut pool = chain.free.clone();
                for i in 0..k {
                    let j = i + chain.rng.below((pool.len() - i) as u32) as usize;
                    pool.swap(i, j);
                }
                pool.truncate(k);
                pool.sort_unstable();
                pool
            })
            .collect();
        // The proposal pass: each chain with its block masked.
        let mut proposals: Vec<Vec<u8>> = Vec::with_capacity(self.chains.len());
        let mut log_forward = vec![0f64; self.chains.len()];
        let mut log_reverse = vec![0f64; self.chains.len()];
        let indices: Vec<usize> = (0..self.chains.len()).collect();
        for chunk in indices.chunks(self.settings.batch_rows.max(1)) {
            let states: Vec<&[u8]> = chunk
                .iter()
                .map(|&c| self.chains[c].bins.as_slice())
                .collect();
            let tokens = self.tokens(&states, |r, j| {
                blocks[chunk[r]].binary_search(&(j as u32)).is_ok()
            });
            let log_q = self.log_conditionals(&tokens, tau)?;
            for (r, &c) in chunk.iter().enumerate() {
                let chain = &mut self.chains[c];
                let mut proposed = chain.bins.clone();
                for &j in &blocks[c] {
                    let row = &log_q[(r * g + j as usize) * b..(r * g + j as usize + 1) * b];
                    let drawn = draw(row, chain.rng.unit_f64());
                    proposed[j as usize] = drawn as u8;
                    log_forward[c] += f64::from(row[drawn]);
                    log_reverse[c] += f64::from(row[chain.bins[j as usize] as usize]);
                }
                proposals.push(proposed);
            }
        }
        let proposed_states: Vec<&[u8]> = proposals.iter().map(Vec::as_slice).collect();
        let log_targets = self.log_targets(&proposed_states)?;
        let mut steps = Vec::with_capacity(self.chains.len());
        for (c, (proposed, log_target)) in proposals.into_iter().zip(log_targets).enumerate() {
            let chain = &mut self.chains[c];
            let mut step = Step {
                block: blocks[c].clone(),
                proposed: blocks[c].iter().map(|&j| proposed[j as usize]).collect(),
                log_target_proposed: log_target,
                log_target_current: chain.log_target,
                log_reverse: log_reverse[c],
                log_forward: log_forward[c],
                accepted: false,
            };
            // Always draw, so the stream's position does not depend on the ratio.
            let u = chain.rng.unit_f64();
            step.accepted = u.ln() < step.log_ratio();
            if step.accepted {
                chain.bins = proposed;
                chain.log_target = log_target;
            }
            steps.push(step);
        }
        Ok(steps)
    }
}

/// Full-layout token rows of `states` (`[CLS]`, then gene `j` at position `j + 1`) on the model's
/// device, with the bin of gene `j` in row `r` masked where `masked(r, j)`.
pub(crate) fn full_layout_tokens(
    model: &CellModel,
    states: &[&[u8]],
    masked: impl Fn(usize, usize) -> bool,
) -> Tokens {
    let seq = model.config.n_genes + 1;
    let mut ids = Vec::with_capacity(states.len() * seq);
    let mut bins = Vec::with_capacity(states.len() * seq);
    let mask_bin = model.config.mask_bin();
    let cls_bin = mask_bin + 1;
    for (r, state) in states.iter().enumerate() {
        ids.push(0i64);
        bins.push(cls_bin);
        for (j, &b) in state.iter().enumerate() {
            ids.push(j as i64 + 1);
            bins.push(if masked(r, j) { mask_bin } else { i64::from(b) });
        }
    }
    let device = model.device();
    let shape = [states.len() as i64, seq as i64];
    Tokens {
        gene_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        bins: Tensor::from_slice(&bins).view(shape).to_device(device),
        valid: None,
    }
}

/// Inverse-CDF draw from log-probabilities `row` with a uniform `u` in [0, 1).
fn draw(row: &[f32], u: f64) -> usize {
    let mut cumulative = 0f64;
    for (i, &lp) in row.iter().enumerate() {
        cumulative += f64::from(lp).exp();
        if u < cumulative {
            return i;
        }
    }
    // Rounding left the sum a hair under 1: the last bin with any mass.
    row.iter()
        .rposition(|&lp| lp > f32::NEG_INFINITY)
        .unwrap_or(0)
}

/// Split R-hat (Gelman et al., BDA3 11.4) of `chains` (each a sequence of one statistic's retained
/// samples): every chain is cut into halves, and `sqrt(var+ / W)` is taken over the halves. NaN when the
/// halves have no within-sequence variance (nothing moved) or are shorter than 2 samples.
pub fn split_rhat(chains: &[Vec<f64>]) -> f64 {
    let halves = split_halves(chains);
    let Some((n, w, var_plus)) = variance_parts(&halves) else {
        return f64::NAN;
    };
    let _ = n;
    if w <= 0.0 {
        return f64::NAN;
    }
    (var_plus / w).sqrt()
}

fn split_halves(chains: &[Vec<f64>]) -> Vec<&[f64]> {
    let n = chains.iter().map(Vec::len).min().unwrap_or(0) / 2;
    chains
        .iter()
        .flat_map(|c| [&c[..n], &c[n..2 * n]])
        .collect()
}

/// (length, W, var+) of equally long sequences.
fn variance_parts(sequences: &[&[f64]]) -> Option<(usize, f64, f64)> {
    let m = sequences.len();
    let n = sequences.first()?.len();
    if m < 2 || n < 2 {
        return None;
    }
    let means: Vec<f64> = sequences
        .iter()
        .map(|s| s.iter().sum::<f64>() / n as f64)
        .collect();
    let w = sequences
        .iter()
        .zip(&means)
        .map(|(s, mean)| s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64)
        .sum::<f64>()
        / m as f64;
    let grand = means.iter().sum::<f64>() / m as f64;
    let b_over_n = means.iter().map(|v| (v - grand).powi(2)).sum::<f64>() / (m - 1) as f64;
    Some((n, w, (n - 1) as f64 / n as f64 * w + b_over_n))
}

/// Effective sample size of one statistic over split chains (Stan's estimator: the multi-chain
/// autocorrelation `rho_t = 1 - (W - mean autocovariance_t) / var+`, summed over Geyer's initial positive
/// sequence of pairs). NaN when nothing moved.
pub fn effective_sample_size(chains: &[Vec<f64>]) -> f64 {
    let halves = split_halves(chains);
    let Some((n, w, var_plus)) = variance_parts(&halves) else {
        return f64::NAN;
    };
    if w <= 0.0 || var_plus <= 0.0 {
        return f64::NAN;
    }
    let m = halves.len();
    let autocovariance = |t: usize| -> f64 {
        halves
            .iter()
            .map(|s| {
                let mean = s.iter().sum::<f64>() / n as f64;
                (0..n - t)
                    .map(|i| (s[i] - mean) * (s[i + t] - mean))
                    .sum::<f64>()
                    / n as f64
            })
            .sum::<f64>()
            / m as f64
    };
    let rho = |t: usize| 1.0 - (w - autocovariance(t)) / var_plus;
    let mut sum = 0.0;
    let mut t = 0;
    while t + 1 < n {
        let pair = rho(t) + rho(t + 1);
        if pair <= 0.0 {
            break;
        }
        sum += pair;
        t += 2;
    }
    let tau = (-1.0 + 2.0 * sum).max(1.0 / (m * n) as f64);
    (m * n) as f64 / tau
}

/// `k` medoids of `points` (bins in vocabulary order) by squared distance: the point with the least total
/// distance first, then each next the point farthest from those chosen, then rounds of assignment and
/// medoid update until nothing changes (at most 20). Deterministic; ties go to the lower index.
pub fn medoids(points: &[Vec<u8>], k: usize) -> Vec<Vec<f32>> {
    let n = points.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let distance = |a: &[u8], b: &[u8]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum()
    };
    let matrix: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| distance(&points[i], &points[j])).collect())
        .collect();
    let argmin = |values: &mut dyn Iterator<Item = (usize, f64)>| {
        values
            .fold((usize::MAX, f64::INFINITY), |best, (i, v)| {
                if v < best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0
    };
    let mut chosen = vec![argmin(&mut (0..n).map(|i| (i, matrix[i].iter().sum())))];
    while chosen.len() < k.min(n) {
        let far = argmin(&mut (0..n).filter(|i| !chosen.contains(i)).map(|i| {
            let nearest = chosen
                .iter()
                .map(|&c| matrix[i][c])
                .fold(f64::INFINITY, f64::min);
            (i, -nearest)
        }));
        chosen.push(far);
    }
    for _ in 0..20 {
        let assignment: Vec<usize> = (0..n)
            .map(|i| argmin(&mut chosen.iter().enumerate().map(|(c, &m)| (c, matrix[i][m]))))
            .collect();
        let updated: Vec<usize> = (0..chosen.len())
            .map(|c| {
                let members: Vec<usize> = (0..n).filter(|&i| assignment[i] == c).collect();
                argmin(
                    &mut members
                        .iter()
                        .map(|&i| (i, members.iter().map(|&j| matrix[i][j]).sum())),
                )
            })
            .collect();
        if updated == chosen {
            break;
        }
        chosen = updated;
    }
    chosen
        .into_iter()
        .map(|i| points[i].iter().map(|&b| f32::from(b)).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Preset;

    /// A random tiny model whose bin head is scaled by `sharpness`: a freshly initialised head gives
    /// nearly uniform conditionals, under which every sampler looks right.
    fn tiny_model(genes: usize, bins: usize, seed: i64, sharpness: f64) -> CellModel {
        tch::manual_seed(seed);
        let model = CellModel::new(Preset::Tiny.config(genes, bins), Device::Cpu).unwrap();
        tch::no_grad(|| {
            for (name, param) in model.named_parameters() {
                if name.starts_with("bin_head") {
                    let _ = param.shallow_clone().g_mul_scalar_(sharpness);
                }
            }
        });
        model
    }

    fn settings(block: usize, groups: usize) -> SamplerSettings {
        SamplerSettings {
            temperature: 2.0,
            block,
            target_groups: groups,
            anchor_weight: 0.0,
            batch_rows: 64,
        }
    }

    /// The exact log target of `state` computed one masked pass per gene group, with the model's own
    /// `masked_conditional` (an independent path from the sampler's batched passes).
    fn brute_log_target(model: &CellModel, state: &[u8], groups: usize) -> f64 {
        let g = state.len();
        let mut total = 0.0;
        for m in 0..groups {
            let tokens = single_tokens(model, state);
            let mut positions = vec![false; g + 1];
            for j in (m..g).step_by(groups) {
                positions[j + 1] = true;
            }
            let positions = Tensor::from_slice(&positions).view([1, g as i64 + 1]);
            let probs = model.masked_conditional(&tokens, &positions, 1.0).unwrap();
            for (row, j) in (m..g).step_by(groups).enumerate() {
                total += probs
                    .get(row as i64)
                    .get(state[j] as i64)
                    .double_value(&[])
                    .ln();
            }
        }
        total
    }

    fn single_tokens(model: &CellModel, state: &[u8]) -> Tokens {
        let g = state.len() as i64;
        let mut bins = vec![model.config.mask_bin() + 1];
        bins.extend(state.iter().map(|&b| i64::from(b)));
        Tokens {
            gene_ids: Tensor::arange(g + 1, (Kind::Int64, Device::Cpu)).view([1, g + 1]),
            bins: Tensor::from_slice(&bins).view([1, g + 1]),
            valid: None,
        }
    }

    /// The proposal probability of redrawing `block` of `state` as `values`, by the model's
    /// `masked_conditional` at temperature `tau`.
    fn brute_log_proposal(
        model: &CellModel,
        state: &[u8],
        block: &[u32],
        values: &[u8],
        tau: f64,
    ) -> f64 {
        let g = state.len();
        let mut positions = vec![false; g + 1];
        for &j in block {
            positions[j as usize + 1] = true;
        }
        let positions = Tensor::from_slice(&positions).view([1, g as i64 + 1]);
        let probs = model
            .masked_conditional(&single_tokens(model, state), &positions, tau)
            .unwrap();
        block
            .iter()
            .zip(values)
            .enumerate()
            .map(|(row, (_, &v))| probs.get(row as i64).get(v as i64).double_value(&[]).ln())
            .sum()
    }

    /// The sampler's acceptance ratio is the brute-force one: targets and proposal probabilities
    /// recomputed one sequence at a time through `masked_conditional`.
    #[test]
    fn acceptance_ratio_matches_brute_force() {
        let model = tiny_model(5, 4, 21, 4.0);
        let groups = 2;
        let starts: Vec<ChainStart> = (0..6)
            .map(|c| ChainStart {
                bins: vec![(c % 4) as u8, 1, 3, 0, 2],
                free: vec![1, 2, 3, 4],
                anchors: None,
                rng: ChainStart::stream(9, 0, c as u64, 0),
            })
            .collect();
        let mut sampler = Sampler::new(&model, settings(2, groups), Vec::new(), starts).unwrap();
        let mut checked = 0;
        for _ in 0..5 {
            let before: Vec<Vec<u8>> = (0..6).map(|c| sampler.state(c).to_vec()).collect();
            let steps = sampler.iterate().unwrap();
            for (c, step) in steps.iter().enumerate() {
                let x = &before[c];
                let mut proposed = x.clone();
                for (&j, &v) in step.block.iter().zip(&step.proposed) {
                    proposed[j as usize] = v;
                }
                let current: Vec<u8> = step.block.iter().map(|&j| x[j as usize]).collect();
                let brute = brute_log_target(&model, &proposed, groups)
                    - brute_log_target(&model, x, groups)
                    + brute_log_proposal(&model, x, &step.block, &current, 2.0)
                    - brute_log_proposal(&model, x, &step.block, &step.proposed, 2.0);
                assert!(
                    (brute - step.log_ratio()).abs() < 1e-4,
                    "chain {c}: sampler {} brute force {brute}",
                    step.log_ratio()
                );
                assert_eq!(step.block.len(), 2);
                assert!(!step.block.contains(&0), "a clamped gene was proposed");
                checked += 1;
                if step.accepted {
                    assert_eq!(sampler.state(c), proposed.as_slice());
                } else {
                    assert_eq!(sampler.state(c), x.as_slice());
                }
                assert_eq!(sampler.state(c)[0], x[0], "the clamped gene moved");
            }
        }
        assert_eq!(checked, 30);
    }

    /// On a 3-gene, 4-bin model with one gene clamped, the 16 free states can be enumerated: the
    /// states the chains visit follow the exact target (total variation under 0.03 over 48,000
    /// samples), and clearly not to the product of the proposal's marginals at the start state.
    #[test]
    fn chains_converge_to_the_enumerated_target() {
        let model = tiny_model(3, 4, 8, 12.0);
        let (groups, tau) = (3, 2.0);
        let states: Vec<Vec<u8>> = (0..16u8).map(|s| vec![2, s / 4, s % 4]).collect();
        let log_target: Vec<f64> = states
            .iter()
            .map(|s| brute_log_target(&model, s, groups))
            .collect();
        let max = log_target.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = log_target.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let exact: Vec<f64> = weights.iter().map(|w| w / total).collect();

        let chains = 400;
        let starts: Vec<ChainStart> = (0..chains)
            .map(|c| ChainStart {
                bins: vec![2, 0, 0],
                free: vec![1, 2],
                anchors: None,
                rng: ChainStart::stream(4, 1, 7, c),
            })
            .collect();
        let mut sampler = Sampler::new(
            &model,
            SamplerSettings {
                batch_rows: 1200,
                ..settings(1, groups)
            },
            Vec::new(),
            starts,
        )
        .unwrap();
        let mut counts = [0f64; 16];
        let mut accepted = 0usize;
        for iteration in 0..140 {
            let steps = sampler.iterate().unwrap();
            accepted += steps.iter().filter(|s| s.accepted).count();
            if iteration >= 20 {
                for c in 0..chains as usize {
                    let s = sampler.state(c);
                    assert_eq!(s[0], 2, "the clamped gene moved");
                    counts[(s[1] * 4 + s[2]) as usize] += 1.0;
                }
            }
        }
        let n: f64 = counts.iter().sum();
        let tv = |p: &[f64]| -> f64 {
            0.5 * p
                .iter()
                .zip(&counts)
                .map(|(p, c)| (p - c / n).abs())
                .sum::<f64>()
        };
        let visited = tv(&exact);
        // A wrong target the chain would follow without the MH correction: independent draws from the
        // tempered conditionals at the start state.
        let start = [2u8, 0, 0];
        let marginal = |j: u32| -> Vec<f64> {
            (0..4u8)
                .map(|v| brute_log_proposal(&model, &start, &[j], &[v], tau).exp())
                .collect()
        };
        let (m1, m2) = (marginal(1), marginal(2));
        let product: Vec<f64> = (0..16).map(|s| m1[s / 4] * m2[s % 4]).collect();
        let uniform = vec![1.0 / 16.0; 16];
        eprintln!(
            "TV to exact {visited:.4}, to the proposal product {:.4}, to uniform {:.4}; exact vs product {:.4}; acceptance {:.3}",
            tv(&product),
            tv(&uniform),
            0.5 * exact.iter().zip(&product).map(|(a, b)| (a - b).abs()).sum::<f64>(),
            accepted as f64 / (140.0 * chains as f64)
        );
        // Observed 0.006 (to the product 0.099, to uniform 0.35).
        assert!(visited < 0.02, "total variation {visited}");
        assert!(
            tv(&product) > 4.0 * visited.max(0.01) && tv(&uniform) > 4.0 * visited.max(0.01),
            "the target is too close to the wrong ones for the test to tell anything"
        );
        assert!(accepted > 0 && accepted < 140 * chains as usize);
    }

    #[test]
    fn rhat_and_ess_tell_mixed_from_stuck_chains() {
        let mut rng = PhiloxStream::new(1, Domain::Steer, 0, 0);
        let mixed: Vec<Vec<f64>> = (0..4)
            .map(|_| (0..400).map(|_| rng.unit_f64()).collect())
            .collect();
        let r = split_rhat(&mixed);
        assert!((r - 1.0).abs() < 0.02, "R-hat of iid chains {r}");
        let ess = effective_sample_size(&mixed);
        assert!(ess > 1200.0 && ess < 2400.0, "ESS of 1600 iid draws {ess}");
        // Chains stuck at different levels.
        let stuck: Vec<Vec<f64>> = mixed
            .iter()
            .enumerate()
            .map(|(c, v)| v.iter().map(|x| x * 0.1 + c as f64).collect())
            .collect();
        assert!(split_rhat(&stuck) > 3.0);
        // A drifting chain fails the split.
        let drifting: Vec<Vec<f64>> = mixed
            .iter()
            .map(|v| {
                v.iter()
                    .enumerate()
                    .map(|(i, x)| x + i as f64 / 100.0)
                    .collect()
            })
            .collect();
        assert!(split_rhat(&drifting) > 1.5);
        // A strongly autocorrelated chain has far fewer effective samples.
        let sticky: Vec<Vec<f64>> = mixed
            .iter()
            .map(|v| {
                let mut x = 0.0;
                v.iter()
                    .map(|e| {
                        x = 0.95 * x + (e - 0.5);
                        x
                    })
                    .collect()
            })
            .collect();
        assert!(effective_sample_size(&sticky) < 200.0);
        assert!(split_rhat(&[vec![1.0; 10], vec![1.0; 10]]).is_nan());
    }

    #[test]
    fn medoids_are_members_near_their_clusters() {
        let points: Vec<Vec<u8>> = (0..30u8)
            .map(|i| {
                if i < 20 {
                    vec![i % 3, 1]
                } else {
                    vec![40 + i % 2, 30]
                }
            })
            .collect();
        let m = medoids(&points, 2);
        assert_eq!(m.len(), 2);
        assert!(m.contains(&vec![1.0, 1.0]), "{m:?}");
        assert!(m.iter().any(|p| p[1] == 30.0), "{m:?}");
        // One medoid: a member of the larger cluster, pulled to its edge nearest the other.
        assert_eq!(medoids(&points, 1), vec![vec![2.0, 1.0]]);
    }
}
