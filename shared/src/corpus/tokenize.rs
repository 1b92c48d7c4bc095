//! From expression values to tokens: highly-variable-gene selection and per-cell quantile binning.
//!
//! Both rules are written out in `docs/corpus.md`; the Python baseline (`bench/ingest_baseline.py`) and the
//! reference binning in the end-to-end tests implement them independently from that text.

use serde::{Deserialize, Serialize};

/// The union of the gene names of several inputs: each input's genes map to union positions, new names
/// appended in order of first appearance.
#[derive(Debug, Clone, Default)]
pub struct GeneUnion {
    pub names: Vec<String>,
    index: std::collections::HashMap<String, u32>,
}

impl GeneUnion {
    /// Union positions of `genes`, adding the names not seen before.
    pub fn add(&mut self, genes: &[String]) -> Vec<u32> {
        genes
            .iter()
            .map(|g| {
                *self.index.entry(g.clone()).or_insert_with(|| {
                    self.names.push(g.clone());
                    (self.names.len() - 1) as u32
                })
            })
            .collect()
    }

    pub fn position(&self, gene: &str) -> Option<u32> {
        self.index.get(gene).copied()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// What the numbers of the chosen matrix are; decides how HVG statistics normalize a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// Raw integer counts: each cell is scaled to 10,000 total before statistics.
    Counts,
    /// log1p of normalized expression: `expm1` brings it back to the linear scale before statistics.
    LogNormalized,
}

/// Target library size that counts are normalized to before HVG statistics (scanpy's default).
pub const NORMALIZE_TARGET: f64 = 1e4;
/// Number of equal-width mean bins in which dispersions are z-scored (Seurat / scanpy default).
pub const HVG_MEAN_BINS: usize = 20;

/// Streaming per-gene moments for Seurat-flavour highly-variable-gene selection.
///
/// Memory is two `f64` per gene, whatever the number of cells.
#[derive(Debug, Clone)]
pub struct HvgAccumulator {
    kind: ValueKind,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    cells: u64,
}

impl HvgAccumulator {
    pub fn new(n_genes: usize, kind: ValueKind) -> Self {
        Self {
            kind,
            sum: vec![0.0; n_genes],
            sum_sq: vec![0.0; n_genes],
            cells: 0,
        }
    }

    pub fn kind(&self) -> ValueKind {
        self.kind
    }

    /// Adds one cell given as (gene, value) pairs of its non-zero entries; `library_size` is the sum of
    /// all of the cell's values over every gene of its file (used for counts only).
    pub fn add_cell(&mut self, genes: &[u32], values: &[f32], library_size: f64) {
        self.cells += 1;
        match self.kind {
            ValueKind::Counts => {
                if library_size <= 0.0 {
                    return;
                }
                let scale = NORMALIZE_TARGET / library_size;
                for (&g, &v) in genes.iter().zip(values) {
                    let x = f64::from(v) * scale;
                    self.sum[g as usize] += x;
                    self.sum_sq[g as usize] += x * x;
                }
            }
            ValueKind::LogNormalized => {
                for (&g, &v) in genes.iter().zip(values) {
                    let x = f64::from(v).exp_m1();
                    self.sum[g as usize] += x;
                    self.sum_sq[g as usize] += x * x;
                }
            }
        }
    }

    /// Merges another accumulator (cells from another file or thread). Gene sets may have grown in
    /// between: genes an accumulator has not seen count as zeros for its cells.
    pub fn merge(&mut self, other: &HvgAccumulator) {
        if other.sum.len() > self.sum.len() {
            self.sum.resize(other.sum.len(), 0.0);
            self.sum_sq.resize(other.sum.len(), 0.0);
        }
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.sum_sq.iter_mut().zip(&other.sum_sq) {
            *a += b;
        }
        self.cells += other.cells;
    }

    pub fn cells(&self) -> u64 {
        self.cells
    }

    /// Normalized dispersion of every gene; `NaN` for genes that never vary.
    pub fn normalized_dispersions(&self) -> Vec<f64> {
        let n = self.cells as f64;
        let n_genes = self.sum.len();
        let mut log_mean = vec![f64::NAN; n_genes];
        let mut log_disp = vec![f64::NAN; n_genes];
        for g in 0..n_genes {
            let mean = self.sum[g] / n;
            // Sample variance (ddof = 1), as numpy/scanpy compute it.
            let var = if n > 1.0 {
                (self.sum_sq[g] - n * mean * mean).max(0.0) / (n - 1.0)
            } else {
                0.0
            };
            log_mean[g] = mean.ln_1p();
            if mean > 0.0 && var > 0.0 {
                log_disp[g] = (var / mean).ln();
            }
        }
        let (lo, hi) = log_mean
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &m| {
                (lo.min(m), hi.max(m))
            });
        let width = (hi - lo) / HVG_MEAN_BINS as f64;
        let bin_of = |m: f64| -> usize {
            if width <= 0.0 {
                0
            } else {
                (((m - lo) / width) as usize).min(HVG_MEAN_BINS - 1)
            }
        };
        let mut bin_sum = [0.0f64; HVG_MEAN_BINS];
        let mut bin_sum_sq = [0.0f64; HVG_MEAN_BINS];
        let mut bin_count = [0usize; HVG_MEAN_BINS];
        for g in 0..n_genes {
            if log_disp[g].is_finite() {
                let b = bin_of(log_mean[g]);
                bin_sum[b] += log_disp[g];
                bin_sum_sq[b] += log_disp[g] * log_disp[g];
                bin_count[b] += 1;
            }
        }
        (0..n_genes)
            .map(|g| {
                if !log_disp[g].is_finite() {
                    return f64::NAN;
                }
                let b = bin_of(log_mean[g]);
                let count = bin_count[b] as f64;
                if bin_count[b] == 1 {
                    // A gene alone in its bin has no spread to compare with; scanpy scores it 1.
                    return 1.0;
                }
                let mean = bin_sum[b] / count;
                let std = ((bin_sum_sq[b] - count * mean * mean).max(0.0) / (count - 1.0)).sqrt();
                if std > 0.0 {
                    (log_disp[g] - mean) / std
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Indices (ascending) of the `n_top` most variable genes; every gene when there are no more than
    /// `n_top`. Ranking: normalized dispersion descending, genes that never vary last, ties by index.
    pub fn select(&self, n_top: usize) -> Vec<usize> {
        let n_genes = self.sum.len();
        if n_genes <= n_top {
            return (0..n_genes).collect();
        }
        let scores = self.normalized_dispersions();
        let mut order: Vec<usize> = (0..n_genes).collect();
        order.sort_by(|&a, &b| {
            let (sa, sb) = (scores[a], scores[b]);
            match (sa.is_nan(), sb.is_nan()) {
                (true, true) => a.cmp(&b),
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                (false, false) => sb.total_cmp(&sa).then(a.cmp(&b)),
            }
        });
        let mut chosen = order[..n_top].to_vec();
        chosen.sort_unstable();
        chosen
    }
}

/// The binning rule, stored in the manifest so that readers know how bins were made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinRule {
    /// Total number of expression bins including bin 0 (zero expression).
    pub n_bins: u16,
    /// Human-readable statement of the rule.
    pub rule: String,
}

impl BinRule {
    pub fn per_cell_quantile(n_bins: u16) -> Self {
        Self {
            n_bins,
            rule: "bin 0 for zero; a non-zero value x of a cell with m non-zero values over the vocabulary \
                   gets 1 + floor(r * (n_bins - 1) / m), r = number of the cell's non-zero values strictly \
                   below x (ties share the bin of their lowest rank)"
                .to_string(),
        }
    }
}

/// Sort key of one non-zero value of a cell at vocabulary position `pos`. Positive floats order like
/// their bit patterns, so (value bits, position) packs into one `u64` and an integer sort replaces a
/// float comparison sort.
#[inline]
pub fn bin_key(value: f32, pos: u32) -> u64 {
    debug_assert!(value > 0.0);
    u64::from(value.to_bits()) << 32 | u64::from(pos)
}

/// Bins one cell. `keys` holds [`bin_key`]s of the cell's non-zero values (which must be positive);
/// `emit(position, bin)` receives every non-zero bin, in value order.
pub fn bin_cell(keys: &mut [u64], n_bins: u16, emit: impl FnMut(u32, u8)) {
    Binner::default().bin(keys, n_bins, emit);
}

/// [`bin_cell`] with scratch buffers kept between cells.
#[derive(Debug, Default)]
pub struct Binner {
    below: Vec<u32>,
    next: Vec<u32>,
    ordered: Vec<u64>,
}

/// Integer values up to this bound are ranked by counting instead of sorting.
const COUNTING_LIMIT: u32 = 4096;

impl Binner {
    pub fn bin(&mut self, keys: &mut [u64], n_bins: u16, mut emit: impl FnMut(u32, u8)) {
        let m = keys.len();
        if m == 0 {
            return;
        }
        let upper = u64::from(n_bins) - 1;
        let bin_of = |rank: u64| (1 + rank * upper / m as u64) as u8;
        let value = |key: u64| f32::from_bits((key >> 32) as u32);
        // Raw counts are mostly small integers: a counting sort then orders them in linear time.
        let mut largest = 0u32;
        let mut small_integers = true;
        for &key in keys.iter() {
            let v = value(key);
            let as_int = v as u32;
            small_integers &= as_int as f32 == v && as_int < COUNTING_LIMIT;
            largest = largest.max(as_int);
        }
        if small_integers {
            let (below, next, ordered) = (&mut self.below, &mut self.next, &mut self.ordered);
            below.clear();
            below.resize(largest as usize + 2, 0);
            for &key in keys.iter() {
                below[value(key) as usize + 1] += 1;
            }
            for v in 1..below.len() {
                below[v] += below[v - 1];
            }
            next.clear();
            next.extend_from_slice(below);
            ordered.clear();
            ordered.resize(m, 0);
            for &key in keys.iter() {
                let slot = &mut next[value(key) as usize];
                ordered[*slot as usize] = key;
                *slot += 1;
            }
            for &key in ordered.iter() {
                emit(
                    (key & 0xFFFF_FFFF) as u32,
                    bin_of(u64::from(below[value(key) as usize])),
                );
            }
            return;
        }
        keys.sort_unstable();
        let mut group_start = 0;
        for i in 0..m {
            if keys[i] >> 32 != keys[group_start] >> 32 {
                group_start = i;
            }
            emit((keys[i] & 0xFFFF_FFFF) as u32, bin_of(group_start as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_follow_the_written_rule_with_ties() {
        // values: 0, 5, 1, 1, 3 -> non-zero sorted 1,1,3,5 (m = 4), 5 bins -> 1 + floor(r * 4 / 4)
        let mut keys = vec![
            bin_key(5.0, 1),
            bin_key(1.0, 2),
            bin_key(1.0, 3),
            bin_key(3.0, 4),
        ];
        let mut out = vec![0u8; 5];
        bin_cell(&mut keys, 5, |p, b| out[p as usize] = b);
        assert_eq!(out, vec![0, 4, 1, 1, 3]);
    }

    #[test]
    fn counting_and_sorting_paths_agree() {
        // Integer counts are ranked by counting; the same values plus 0.5 (same ranks) by sorting.
        let values: Vec<f32> = (0..300u32).map(|i| ((i * 7919) % 37 + 1) as f32).collect();
        let bin_all = |vals: &[f32]| {
            let mut keys: Vec<u64> = vals
                .iter()
                .enumerate()
                .map(|(p, &v)| bin_key(v, p as u32))
                .collect();
            let mut out = vec![0u8; vals.len()];
            let mut order = Vec::new();
            bin_cell(&mut keys, 50, |p, b| {
                out[p as usize] = b;
                order.push(p);
            });
            (out, order)
        };
        let shifted: Vec<f32> = values.iter().map(|v| v + 0.5).collect();
        assert_eq!(
            bin_all(&values),
            bin_all(&shifted),
            "same bins, emitted in the same order"
        );
    }

    #[test]
    fn bins_never_reach_n_bins() {
        let mut keys: Vec<u64> = (0..1000).map(|i| bin_key(i as f32 + 1.0, i)).collect();
        let mut out = vec![0u8; 1000];
        bin_cell(&mut keys, 51, |p, b| out[p as usize] = b);
        assert_eq!(*out.iter().max().unwrap(), 50);
        assert_eq!(*out.iter().min().unwrap(), 1);
    }

    #[test]
    fn hvg_prefers_the_gene_that_varies_more_than_its_peers() {
        let mut acc = HvgAccumulator::new(3, ValueKind::LogNormalized);
        for i in 0..100 {
            let spike = if i % 10 == 0 { 5.0 } else { 0.1 };
            acc.add_cell(&[0, 1, 2], &[1.0, spike, 1.0 + (i % 2) as f32 * 0.01], 0.0);
        }
        assert_eq!(acc.select(1), vec![1]);
        assert_eq!(acc.select(5), vec![0, 1, 2]);
    }
}
