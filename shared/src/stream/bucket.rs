//! Length-bucketed global batches for the expressed layout, where sequences differ in length by cell and
//! a batch is padded to its longest row.
//!
//! The epoch order is cut into *bucket windows* of `window_batches` consecutive global batches. Inside a
//! window the positions are sorted by their sample's sequence length (ties by position), cut into global
//! batches of `batch_size`, and those batches are put in an order drawn from
//! `SampleRng(seed, bucket_order, epoch, window)`. A rank's slice of a global batch is a contiguous part
//! of the sorted list, so every rank gets cells of similar length.
//!
//! **Invariant:** the positions of global batch `i` are a pure function of (seed, epoch, manifest,
//! sequence lengths, batch size, window batches): not of the world size, so the cursor rules of
//! [`crate::stream`] hold unchanged. Each window is a permutation of its positions, so an epoch still
//! reads every sample exactly once.

use std::ops::Range;

use crate::corpus::shard::{Block, BlockDecompressor};
use crate::corpus::Corpus;
use crate::error::Result;
use crate::philox::{Domain, SampleRng};
use crate::stream::batch::{expressed_count, SequenceLayout};
use crate::stream::{EpochPlan, Partitioner};

/// Per corpus cell (global index), the number of genes it expresses: the input of every layout's
/// sequence length. One pass over the corpus's blocks.
pub fn expressed_per_cell(corpus: &Corpus) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(corpus.total_cells() as usize);
    // One decompressor and one block buffer for the whole pass.
    let mut decompressor = BlockDecompressor::new()?;
    let mut block = Block::default();
    for shard in 0..corpus.manifest.shards.len() {
        let shard = corpus.fetch_shard(shard)?;
        for index in 0..shard.n_blocks() {
            shard.read_block_into(index, &mut block, &mut decompressor)?;
            for cell in 0..block.cells {
                out.push(expressed_count(block.bins_of(cell)) as u32);
            }
        }
    }
    Ok(out)
}

/// Sequence length of a cell that expresses `expressed` of `n_genes` genes, in `layout`.
pub fn sequence_len(layout: SequenceLayout, expressed: u32, n_genes: usize) -> u32 {
    match layout {
        SequenceLayout::Full => n_genes as u32 + 1,
        SequenceLayout::Expressed { unexpressed } => {
            1 + expressed + unexpressed.min(n_genes as u32 - expressed)
        }
    }
}

/// How bucketed batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct Bucketing<'a> {
    /// Sequence length per corpus cell (global index).
    pub lengths: &'a [u32],
    pub batch_size: u32,
    /// Global batches per bucket window.
    pub window_batches: u32,
}

impl Bucketing<'_> {
    /// The positions of the global batch that starts at epoch position `cursor` (a multiple of the
    /// batch size, below the epoch length), shortest sequences first.
    pub fn global_batch(&self, plan: &EpochPlan, cursor: u64) -> Vec<u64> {
        let batch = u64::from(self.batch_size);
        let span = batch * u64::from(self.window_batches.max(1));
        let window = cursor / span;
        let start = window * span;
        let window_positions: Range<u64> = start..(start + span).min(plan.len());
        let mut positions: Vec<(u32, u64)> = plan
            .range(window_positions.clone())
            .zip(window_positions)
            .map(|(location, position)| (self.lengths[location.sample.cell as usize], position))
            .collect();
        positions.sort_unstable();
        let batches = positions.len().div_ceil(batch as usize);
        // The order of the window's batches: a Philox shuffle, so long and short batches alternate
        // across steps instead of arriving sorted.
        // A short last batch (the epoch's end) stays last, so every step reads as many samples as
        // without bucketing.
        let full = positions.len() / batch as usize;
        let mut order: Vec<u32> = (0..batches as u32).collect();
        SampleRng::new(
            plan.config().seed,
            Domain::BucketOrder,
            plan.epoch(),
            window as u32,
        )
        .shuffle(&mut order[..full], &mut Vec::new());
        let index = ((cursor - start) / batch) as usize;
        let chosen = order[index] as usize;
        positions[chosen * batch as usize..((chosen + 1) * batch as usize).min(positions.len())]
            .iter()
            .map(|&(_, p)| p)
            .collect()
    }

    /// Rank `rank` of `world`'s part of a global batch's positions.
    pub fn rank_slice(global: &[u64], world: u32, rank: u32) -> Vec<u64> {
        let range = Partitioner::rank_slice(&(0..global.len() as u64), world, rank);
        global[range.start as usize..range.end as usize].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::manifest::{
        Manifest, ShardEntry, VocabularySource, FORMAT_VERSION, MANIFEST_FILE,
    };
    use crate::corpus::tokenize::BinRule;
    use crate::stream::OrderConfig;

    fn manifest(cells: u32) -> Manifest {
        let shard = |name: &str, cells: u32| ShardEntry {
            name: name.into(),
            cells,
            bytes: 0,
            blake3: String::new(),
        };
        let _ = MANIFEST_FILE;
        Manifest {
            format_version: FORMAT_VERSION,
            synthetic: true,
            genes: (0..100).map(|g| format!("G{g}")).collect(),
            vocabulary: VocabularySource::Fixed {
                file: "test".into(),
                missing_in_input: 0,
            },
            bins: BinRule::per_cell_quantile(10),
            label_columns: Vec::new(),
            block_cells: 16,
            shards: vec![shard("a", cells / 2), shard("b", cells - cells / 2)],
            sources: Vec::new(),
            total_cells: u64::from(cells),
            created_by: "test".into(),
        }
    }

    #[test]
    fn bucketed_batches_read_every_sample_once_and_pad_less() {
        let cells = 301u32;
        let manifest = manifest(cells);
        // Lengths spread like real cells: 30..=230 tokens, unrelated to the order.
        let lengths: Vec<u32> = (0..cells).map(|c| 30 + (c * 7919 % 201)).collect();
        let order = OrderConfig {
            seed: 4,
            augmentation: 3,
            window_units: 4,
        };
        for epoch in 0..2 {
            let plan = EpochPlan::new(&manifest, order, epoch).unwrap();
            let bucketing = Bucketing {
                lengths: &lengths,
                batch_size: 24,
                window_batches: 8,
            };
            let (mut seen, mut padded_bucketed, mut padded_plain) = (Vec::new(), 0u64, 0u64);
            let mut cursor = 0;
            while cursor < plan.len() {
                let global = bucketing.global_batch(&plan, cursor);
                // The same positions whatever the world size: slices tile the global batch.
                for world in [1u32, 2, 3] {
                    let tiled: Vec<u64> = (0..world)
                        .flat_map(|rank| Bucketing::rank_slice(&global, world, rank))
                        .collect();
                    assert_eq!(tiled, global);
                }
                let len_of = |p: &u64| lengths[plan.at(*p).sample.cell as usize];
                let padding = |positions: &[u64]| {
                    let longest = positions.iter().map(len_of).max().unwrap_or(0);
                    positions
                        .iter()
                        .map(|p| u64::from(longest - len_of(p)))
                        .sum::<u64>()
                };
                padded_bucketed += padding(&global);
                let plain: Vec<u64> = (cursor..(cursor + 24).min(plan.len())).collect();
                padded_plain += padding(&plain);
                assert_eq!(global.len(), plain.len(), "batches keep their size");
                seen.extend(global);
                cursor += 24;
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..plan.len()).collect::<Vec<_>>(), "epoch {epoch}");
            assert!(
                padded_bucketed * 4 < padded_plain,
                "bucketing pads {padded_bucketed} slots, plain batches {padded_plain}"
            );
        }
    }
}
