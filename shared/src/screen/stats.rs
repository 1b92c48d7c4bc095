//! Statistics for perturbation screens: the rank-sum test of a gene's per-cell effects against a null
//! built from random genes, Benjamini-Hochberg false-discovery control, and the AUROC a ranking achieves
//! at recovering a known gene set. Pure Rust, checked against SciPy
//! values in the tests.

/// Average ranks (1-based) of `values`, ties sharing the mean of their positions; also the tie-correction
/// term `sum(t^3 - t)` over groups of `t` tied values.
fn average_ranks(values: &[f64]) -> (Vec<f64>, f64) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut ties = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start+1 ..= end share their mean rank.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        let t = (end - start) as f64;
        ties += t * t * t - t;
        start = end;
    }
    (ranks, ties)
}

/// The Mann-Whitney U statistic of `x` against `y` and its two-sided p-value (normal approximation with
/// tie correction and continuity correction, as SciPy's `mannwhitneyu(method="asymptotic")`). `None`
/// when either side is empty or all values are tied.
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    if x.is_empty() || y.is_empty() {
        return None;
    }
    let all: Vec<f64> = x.iter().chain(y).copied().collect();
    let (ranks, ties) = average_ranks(&all);
    let rank_sum: f64 = ranks[..x.len()].iter().sum();
    let u = rank_sum - n1 * (n1 + 1.0) / 2.0;
    let n = n1 + n2;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return None;
    }
    let mean = n1 * n2 / 2.0;
    let z = ((u - mean).abs() - 0.5).max(0.0) / variance.sqrt();
    Some((u, erfc(z / std::f64::consts::SQRT_2).min(1.0)))
}

/// Benjamini-Hochberg adjusted p-values (q-values), in the input order: `q_i = min_{j: p_j >= p_i}
/// p_j * m / rank_j`, capped at 1.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let m = p.len() as f64;
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut q = vec![0.0; p.len()];
    let mut running = 1.0f64;
    for (position, &i) in order.iter().enumerate().rev() {
        running = running.min(p[i] * m / (position + 1) as f64);
        q[i] = running.min(1.0);
    }
    q
}

/// Area under the ROC curve of `scores` (higher: more likely positive) for the labels `positive`, ties
/// counting half. `None` without both classes.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return None;
    }
    let (ranks, _) = average_ranks(scores);
    let pos_rank_sum: f64 = ranks
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(r, _)| r)
        .sum();
    Some((pos_rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of one length");
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        dot / (aa.sqrt() * bb.sqrt())
    }
}

/// The complementary error function: the Taylor series of erf below 2.5, the classical continued
/// fraction of erfc above (where 1 - erf would lose the small result to cancellation).
pub fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    let sqrt_pi = std::f64::consts::PI.sqrt();
    if x < 2.5 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let (mut sum, mut power) = (0.0f64, x);
        for n in 0..200 {
            let term = power / (2 * n + 1) as f64;
            sum += term;
            if term.abs() < 1e-17 * sum.abs() {
                break;
            }
            power *= -x * x / (n + 1) as f64;
        }
        1.0 - 2.0 / sqrt_pi * sum
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), evaluated from the tail.
        let mut tail = 0.0f64;
        for k in (1..=80).rev() {
            tail = (k as f64 / 2.0) / (x + tail);
        }
        (-x * x).exp() / sqrt_pi / (x + tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-300)
    }

    #[test]
    fn erfc_matches_scipy() {
        for (x, expected) in [
            (0.5, 0.479_500_122_186_953_5),
            (1.7, 0.016_209_541_409_225_44),
            (-0.3, 1.328_626_759_459_127_4),
            (3.2, 6.025_761_151_762_082e-6),
            (2.4999, 4.071_699_003_334_512e-4),
            (2.5, 4.069_520_174_449_59e-4),
            (8.0, 1.122_429_717_298_292_7e-29),
        ] {
            assert!(close(erfc(x), expected, 1e-9), "erfc({x}) = {}", erfc(x));
        }
    }

    #[test]
    fn mann_whitney_with_ties_matches_scipy() {
        // scipy.stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic") -> 48.5, 0.020074...
        let x = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.55];
        let y = [0.05, 0.1, 0.2, 0.15, 0.3, 0.1, 0.25, 0.0];
        let (u, p) = mann_whitney(&x, &y).unwrap();
        assert_eq!(u, 48.5);
        assert!(close(p, 0.020_074_485_544_009_122, 1e-5), "p = {p}");
        assert!(mann_whitney(&[], &y).is_none());
        assert!(mann_whitney(&[1.0, 1.0], &[1.0]).is_none(), "all tied");
    }

    #[test]
    fn benjamini_hochberg_matches_scipy() {
        // scipy.stats.false_discovery_control([0.01, 0.04, 0.03, 0.2, 0.5])
        let q = benjamini_hochberg(&[0.01, 0.04, 0.03, 0.2, 0.5]);
        let expected = [0.05, 0.066_666_67, 0.066_666_67, 0.25, 0.5];
        for (a, b) in q.iter().zip(expected) {
            assert!(close(*a, b, 1e-6), "{q:?}");
        }
    }

    #[test]
    fn auroc_counts_ties_half_and_needs_both_classes() {
        let scores = [0.9, 0.8, 0.8, 0.3, 0.2, 0.7];
        let labels = [true, false, true, false, false, true];
        assert!(close(
            auroc(&scores, &labels).unwrap(),
            0.833_333_333_333,
            1e-9
        ));
        assert_eq!(auroc(&[1.0, 2.0], &[true, true]), None);
        assert_eq!(auroc(&[1.0, 2.0], &[false, true]), Some(1.0));
        assert!(close(
            cosine(&[1.0, 0.0], &[1.0, 1.0]),
            std::f64::consts::FRAC_1_SQRT_2,
            1e-12
        ));
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
