//! Classification metrics of the KD-CPT tables: accuracy, macro-F1, Cohen's kappa, mean confidence, mean
//! predictive entropy and expected calibration error.

use serde::Serialize;

/// Metrics of a set of predicted class distributions against true classes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationReport {
    pub cells: usize,
    pub accuracy: f64,
    /// Unweighted mean of per-class F1 over the classes present in the truth or the predictions.
    pub macro_f1: f64,
    pub cohen_kappa: f64,
    /// Mean of the max probability.
    pub mean_confidence: f64,
    /// Mean of the summed `k` largest probabilities, for `k` = 1, 2, 3 (up to the class count).
    pub top_k_confidence: Vec<f64>,
    /// Mean entropy (nats) of the predicted distributions.
    pub mean_entropy: f64,
    /// Expected calibration error over 15 equal-width confidence bins.
    pub ece: f64,
}

pub const ECE_BINS: usize = 15;

/// `probs` holds one row of `n_classes` probabilities per cell.
pub fn classification_report(
    probs: &[f32],
    n_classes: usize,
    truth: &[usize],
) -> ClassificationReport {
    assert_eq!(
        probs.len(),
        truth.len() * n_classes,
        "one probability row per cell"
    );
    let n = truth.len();
    let mut confusion = vec![vec![0u64; n_classes]; n_classes];
    let (mut confidence, mut entropy) = (0.0, 0.0);
    let mut bins = vec![(0u64, 0.0f64, 0.0f64); ECE_BINS];
    for (row, &t) in probs.chunks(n_classes).zip(truth) {
        let (pred, &top) = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one class");
        confusion[t][pred] += 1;
        let top = f64::from(top);
        confidence += top;
        entropy -= row
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| f64::from(p) * f64::from(p).ln())
            .sum::<f64>();
        let bin = ((top * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        bins[bin].0 += 1;
        bins[bin].1 += top;
        bins[bin].2 += f64::from(u8::from(pred == t));
    }
    let total = n.max(1) as f64;
    let correct: u64 = (0..n_classes).map(|c| confusion[c][c]).sum();
    let accuracy = correct as f64 / total;
    let row_sum = |c: usize| confusion[c].iter().sum::<u64>();
    let col_sum = |c: usize| confusion.iter().map(|r| r[c]).sum::<u64>();
    let mut f1s = Vec::new();
    let mut chance = 0.0;
    for (c, row) in confusion.iter().enumerate() {
        let (actual, predicted) = (row_sum(c), col_sum(c));
        chance += actual as f64 * predicted as f64 / (total * total);
        if actual + predicted == 0 {
            continue;
        }
        f1s.push(2.0 * row[c] as f64 / (actual + predicted) as f64);
    }
    let macro_f1 = f1s.iter().sum::<f64>() / f1s.len().max(1) as f64;
    let cohen_kappa = if chance < 1.0 {
        (accuracy - chance) / (1.0 - chance)
    } else {
        0.0
    };
    let ece = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(_, conf, hits)| (conf - hits).abs() / total)
        .sum();
    ClassificationReport {
        cells: n,
        accuracy,
        macro_f1,
        cohen_kappa,
        mean_confidence: confidence / total,
        top_k_confidence: (1..=n_classes.min(3))
            .map(|k| cellfleet_shared::screen::transitions::top_k_confidence(probs, n_classes, k))
            .collect(),
        mean_entropy: entropy / total,
        ece,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example() {
        // Truth 0,0,1,2; predictions 0,1,1,2 with confidences 0.9, 0.6, 0.8, 0.5.
        let probs = [
            0.9, 0.05, 0.05, //
            0.3, 0.6, 0.1, //
            0.1, 0.8, 0.1, //
            0.25, 0.25, 0.5f32,
        ];
        let r = classification_report(&probs, 3, &[0, 0, 1, 2]);
        assert!((r.accuracy - 0.75).abs() < 1e-12);
        // F1: class 0 = 2*1/(2+1), class 1 = 2*1/(1+2), class 2 = 1.
        assert!((r.macro_f1 - (2.0 / 3.0 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
        // Chance agreement: (2*1 + 1*2 + 1*1) / 16.
        let pe = 5.0 / 16.0;
        assert!((r.cohen_kappa - (0.75 - pe) / (1.0 - pe)).abs() < 1e-12);
        assert!((r.mean_confidence - 0.7).abs() < 1e-6);
        // Bins: 0.9 (hit), 0.6 (miss), 0.8 (hit), 0.5 (hit), each alone in its bin.
        let ece = (0.1 + 0.6 + 0.2 + 0.5) / 4.0;
        assert!((r.ece - ece).abs() < 1e-6, "{}", r.ece);
        let h = |p: &[f64]| -p.iter().map(|x| x * x.ln()).sum::<f64>();
        let entropy = (h(&[0.9, 0.05, 0.05])
            + h(&[0.3, 0.6, 0.1])
            + h(&[0.1, 0.8, 0.1])
            + h(&[0.25, 0.25, 0.5]))
            / 4.0;
        assert!((r.mean_entropy - entropy).abs() < 1e-6);
        // Top-2: (0.95 + 0.9 + 0.9 + 0.75) / 4; top-3 sums every row.
        assert_eq!(r.top_k_confidence.len(), 3);
        assert!((r.top_k_confidence[0] - 0.7).abs() < 1e-6);
        assert!((r.top_k_confidence[1] - 3.5 / 4.0).abs() < 1e-6);
        assert!((r.top_k_confidence[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn perfect_and_constant_predictors() {
        let probs = [1.0, 0.0, 0.0, 1.0f32];
        let r = classification_report(&probs, 2, &[0, 1]);
        assert_eq!((r.accuracy, r.macro_f1, r.cohen_kappa), (1.0, 1.0, 1.0));
        assert!(r.ece.abs() < 1e-12);
        let r = classification_report(&[0.7, 0.3, 0.7, 0.3], 2, &[0, 1]);
        assert_eq!(r.cohen_kappa, 0.0);
    }
}
