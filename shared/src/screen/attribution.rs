//! Gene attribution without tensors: normalising each cell's importances, aggregating them per gene,
//! and the per-cell ranking file an attribution screen writes for attribution-guided screens.

use serde::{Deserialize, Serialize};

/// Where an attribution screen's results keep the per-cell rankings.
pub const RANKING_FILE: &str = "attribution_ranking.json";
pub const RANKING_FORMAT: &str = "cellfleet-attribution-ranking/1";

/// `attribution_ranking.json`: per attributed cell its genes by importance, and the overall order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankingFile {
    pub format: String,
    /// The attributed corpus (cells are its positions).
    pub corpus_manifest_blake3: String,
    pub class: String,
    pub reference: String,
    /// Genes kept per cell.
    pub ranked_genes: u32,
    pub cells: Vec<RankedCell>,
    /// Every gene by mean normalised importance, most important first.
    pub overall: Vec<String>,
    /// Per vocabulary gene (vocabulary order): the mean normalised importance, signed and absolute.
    pub importance: Vec<f64>,
    pub abs_importance: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedCell {
    pub cell: u64,
    pub name: String,
    /// The most important genes first (positive importance toward the attributed state leads).
    pub genes: Vec<String>,
}

/// Per gene over cells: the mean of each cell's importances divided by the sum of their absolute
/// values (each cell weighs the same, as the gene-selection paper normalised per cell), and the mean
/// of the absolute normalised importances. `importance` is `cells x genes`; a cell whose importances
/// are all zero adds zeros.
pub fn normalised_means(importance: &[f32], genes: usize) -> (Vec<f64>, Vec<f64>) {
    let mut signed = vec![0f64; genes];
    let mut absolute = vec![0f64; genes];
    let rows = importance.chunks_exact(genes.max(1));
    let n = rows.len().max(1) as f64;
    for row in rows {
        let total: f64 = row.iter().map(|&v| f64::from(v).abs()).sum();
        if total == 0.0 {
            continue;
        }
        for (g, &v) in row.iter().enumerate() {
            signed[g] += f64::from(v) / total;
            absolute[g] += f64::from(v).abs() / total;
        }
    }
    (
        signed.into_iter().map(|v| v / n).collect(),
        absolute.into_iter().map(|v| v / n).collect(),
    )
}

/// The order of `scores`, highest first; ties keep index order.
pub fn descending(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cell_weighs_the_same_after_normalising() {
        // Cell 0 has importances 10x cell 1's; normalised they count alike.
        let importance = [6.0f32, -2.0, 2.0, 0.6, -0.2, 0.2, 0.0, 0.0, 0.0];
        let (signed, absolute) = normalised_means(&importance, 3);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(signed[0], 2.0 * 0.6 / 3.0), "{signed:?}");
        assert!(close(signed[1], 2.0 * -0.2 / 3.0));
        assert!(close(absolute[1], 2.0 * 0.2 / 3.0));
        assert_eq!(descending(&signed), vec![0, 2, 1]);
    }
}
