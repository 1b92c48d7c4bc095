//! The augmented sample stream: which sample sits at each position of an epoch, and which positions each
//! rank reads next.
//!
//! * An epoch of a corpus of N cells with augmentation factor A has A x N samples; sample (c, k) is clone
//!   k of cell c. Clones are never stored: the gene-token order of (c, k) is recomputed from
//!   (seed, c, k) by [`clone_order`].
//! * **Architecture invariant:** the epoch order is a pure function of (seed, epoch, manifest) and the
//!   only training-data state is one global cursor (samples consumed in the epoch).
//! * Order (see `docs/corpus.md`): cells are grouped in blocks (the shard's compression blocks); every
//!   (block, clone) pair is a *unit*; units are shuffled; consecutive runs of `window_units` units form a
//!   window whose samples are shuffled among themselves. Reads stay sequential within a block, a batch
//!   mixes cells from `window_units` places of the corpus, and the A clones of one cell sit in different
//!   units, so they share a window (and a batch) only when their units happen to land together.

pub mod batch;
pub mod bucket;

use std::ops::Range;

use crate::corpus::manifest::Manifest;
use crate::error::{Error, Result};
use crate::philox::{Domain, PhiloxStream, SampleRng};

/// Settings that, with the manifest and the epoch, fix the sample order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderConfig {
    pub seed: u64,
    /// Clones per cell (bootstrapped permutation); 1 turns augmentation off.
    pub augmentation: u32,
    /// Units per shuffle window.
    pub window_units: u32,
}

impl Default for OrderConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            augmentation: 4,
            window_units: 16,
        }
    }
}

impl OrderConfig {
    pub fn validate(&self) -> Result<()> {
        if self.augmentation == 0 || self.augmentation > 256 {
            return Err(Error::Config(format!(
                "augmentation must be 1..=256, got {}",
                self.augmentation
            )));
        }
        if self.window_units == 0 {
            return Err(Error::Config("window_units must be at least 1".into()));
        }
        Ok(())
    }
}

/// One sample: clone `clone` of global cell `cell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleId {
    pub cell: u64,
    pub clone: u32,
}

/// Which cells are held out for evaluation: cell c is held out when a Philox draw keyed by (seed, c) falls
/// below `eval_fraction`. A pure function of the cell index, so every command and every rank agrees on it
/// without storing a list.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CellSplit {
    pub seed: u64,
    pub eval_fraction: f64,
}

impl Default for CellSplit {
    fn default() -> Self {
        Self {
            seed: 0,
            eval_fraction: 0.1,
        }
    }
}

/// A side of a [`CellSplit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitPart {
    Train,
    Eval,
}

impl CellSplit {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(Error::Config(format!(
                "eval fraction must be in [0, 1), got {}",
                self.eval_fraction
            )));
        }
        Ok(())
    }

    pub fn part_of(&self, cell: u64) -> SplitPart {
        let draw = PhiloxStream::new(self.seed, Domain::Split, cell as u32, 0).unit_f64();
        if draw < self.eval_fraction {
            SplitPart::Eval
        } else {
            SplitPart::Train
        }
    }
}

#[derive(Debug, Clone)]
struct BlockRef {
    shard: u32,
    block: u32,
    first_cell: u64,
    /// Cells of the block in the plan.
    cells: u32,
    /// Rows of the block in the plan when a split leaves out some of them; `None` = all rows.
    rows: Option<Box<[u32]>>,
}

/// Where a sample's cell is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleLocation {
    pub sample: SampleId,
    pub shard: u32,
    pub block: u32,
    pub cell_in_block: u32,
}

/// The order of one epoch.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    config: OrderConfig,
    epoch: u32,
    blocks: Vec<BlockRef>,
    /// Shuffled units as (block index, clone).
    units: Vec<(u32, u32)>,
    /// Sample offset of each window's start, with the epoch length at the end.
    window_starts: Vec<u64>,
}

impl EpochPlan {
    pub fn new(manifest: &Manifest, config: OrderConfig, epoch: u32) -> Result<Self> {
        config.validate()?;
        let block_cells = manifest.block_cells.max(1);
        let mut blocks = Vec::new();
        let mut first_cell = 0u64;
        for (shard, entry) in manifest.shards.iter().enumerate() {
            for block in 0..entry.cells.div_ceil(block_cells) {
                let cells = (entry.cells - block * block_cells).min(block_cells);
                blocks.push(BlockRef {
                    shard: shard as u32,
                    block,
                    first_cell: first_cell + u64::from(block * block_cells),
                    cells,
                    rows: None,
                });
            }
            first_cell += u64::from(entry.cells);
        }
        Self::from_blocks(blocks, config, epoch)
    }

    /// The plan of one side of `split`: the same unit and window construction over only that side's
    /// cells (blocks left empty drop out).
    pub fn for_part(
        manifest: &Manifest,
        config: OrderConfig,
        epoch: u32,
        split: CellSplit,
        part: SplitPart,
    ) -> Result<Self> {
        split.validate()?;
        let full = Self::new(manifest, config, epoch)?;
        Self::from_blocks(restrict_blocks(full.blocks, split, part), config, epoch)
    }

    /// Positions in each epoch of one side of `split` (every epoch has the same length): the modulus of
    /// the global cursor.
    pub fn part_len(
        manifest: &Manifest,
        config: OrderConfig,
        split: CellSplit,
        part: SplitPart,
    ) -> Result<u64> {
        Ok(Self::for_part(manifest, config, 0, split, part)?.len())
    }

    fn from_blocks(blocks: Vec<BlockRef>, config: OrderConfig, epoch: u32) -> Result<Self> {
        if blocks
            .iter()
            .map(|b| b.first_cell + u64::from(b.cells))
            .max()
            .unwrap_or(0)
            > u64::from(u32::MAX)
        {
            return Err(Error::Config(
                "corpora above 2^32 cells are not supported by the clone key".into(),
            ));
        }
        let mut units: Vec<(u32, u32)> = (0..blocks.len() as u32)
            .flat_map(|b| (0..config.augmentation).map(move |k| (b, k)))
            .collect();
        PhiloxStream::new(config.seed, Domain::UnitOrder, epoch, 0).shuffle(&mut units);
        let mut window_starts = vec![0u64];
        for window in units.chunks(config.window_units as usize) {
            let len: u64 = window
                .iter()
                .map(|&(b, _)| u64::from(blocks[b as usize].cells))
                .sum();
            window_starts.push(window_starts.last().unwrap() + len);
        }
        Ok(Self {
            config,
            epoch,
            blocks,
            units,
            window_starts,
        })
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn config(&self) -> OrderConfig {
        self.config
    }

    /// Samples in the epoch: augmentation x cells.
    pub fn len(&self) -> u64 {
        *self.window_starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn windows(&self) -> usize {
        self.window_starts.len() - 1
    }

    /// The permutation of one window's samples (window-local offsets).
    fn window_order(&self, window: usize) -> Vec<u32> {
        let len = (self.window_starts[window + 1] - self.window_starts[window]) as u32;
        let mut order: Vec<u32> = (0..len).collect();
        PhiloxStream::new(
            self.config.seed,
            Domain::WindowOrder,
            self.epoch,
            window as u32,
        )
        .shuffle(&mut order);
        order
    }

    fn window_units(&self, window: usize) -> &[(u32, u32)] {
        let w = self.config.window_units as usize;
        &self.units[window * w..((window + 1) * w).min(self.units.len())]
    }

    fn locate_in_window(&self, window: usize, mut offset: u32) -> SampleLocation {
        for &(b, clone) in self.window_units(window) {
            let block = &self.blocks[b as usize];
            if offset < block.cells {
                let row = block
                    .rows
                    .as_ref()
                    .map_or(offset, |rows| rows[offset as usize]);
                return SampleLocation {
                    sample: SampleId {
                        cell: block.first_cell + u64::from(row),
                        clone,
                    },
                    shard: block.shard,
                    block: block.block,
                    cell_in_block: row,
                };
            }
            offset -= block.cells;
        }
        unreachable!("window offsets are below the window length")
    }

    /// The sample at `position` (random access; iterate with [`EpochPlan::range`] for speed).
    pub fn at(&self, position: u64) -> SampleLocation {
        self.range(position..position + 1)
            .next()
            .expect("position inside the epoch")
    }

    /// Iterates the samples at `positions`, in order.
    pub fn range(&self, positions: Range<u64>) -> PlanIter<'_> {
        assert!(
            positions.end <= self.len(),
            "range {positions:?} is past the epoch end {}",
            self.len()
        );
        PlanIter {
            plan: self,
            next: positions.start,
            end: positions.end,
            window: usize::MAX,
            order: Vec::new(),
        }
    }
}

/// Keeps only the rows of `blocks` on `part` of `split`.
fn restrict_blocks(blocks: Vec<BlockRef>, split: CellSplit, part: SplitPart) -> Vec<BlockRef> {
    blocks
        .into_iter()
        .filter_map(|mut b| {
            let rows: Vec<u32> = (0..b.cells)
                .filter(|&r| split.part_of(b.first_cell + u64::from(r)) == part)
                .collect();
            if rows.is_empty() {
                return None;
            }
            b.cells = rows.len() as u32;
            b.rows = Some(rows.into_boxed_slice());
            Some(b)
        })
        .collect()
}

/// Iterator over a range of epoch positions; caches the current window's permutation.
pub struct PlanIter<'a> {
    plan: &'a EpochPlan,
    next: u64,
    end: u64,
    window: usize,
    order: Vec<u32>,
}

impl Iterator for PlanIter<'_> {
    type Item = SampleLocation;

    fn next(&mut self) -> Option<SampleLocation> {
        if self.next >= self.end {
            return None;
        }
        let starts = &self.plan.window_starts;
        if self.window == usize::MAX
            || self.next >= starts[self.window + 1]
            || self.next < starts[self.window]
        {
            self.window = starts.partition_point(|&s| s <= self.next) - 1;
            debug_assert!(self.window < self.plan.windows());
            self.order = self.plan.window_order(self.window);
        }
        let offset = self.order[(self.next - starts[self.window]) as usize];
        self.next += 1;
        Some(self.plan.locate_in_window(self.window, offset))
    }
}

/// Splits global batches among ranks.
///
/// The global batch that starts at `cursor` holds `min(world x per_rank, epoch_len - cursor)` positions;
/// rank r reads the contiguous slice `[cursor + floor(r G / W), cursor + floor((r + 1) G / W))`. The
/// slices of one global batch tile it exactly, so however the world size changes between batches, every
/// position of the epoch is read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitioner {
    pub epoch_len: u64,
}

impl Partitioner {
    /// Positions of the global batch starting at `cursor` (empty at the epoch end).
    pub fn global_batch(&self, cursor: u64, world: u32, per_rank: u32) -> Range<u64> {
        let start = cursor.min(self.epoch_len);
        let len = (u64::from(world) * u64::from(per_rank)).min(self.epoch_len - start);
        start..start + len
    }

    /// Rank `rank`'s slice of `global`.
    pub fn rank_slice(global: &Range<u64>, world: u32, rank: u32) -> Range<u64> {
        assert!(rank < world, "rank {rank} outside world size {world}");
        let len = global.end - global.start;
        let at = |r: u64| global.start + r * len / u64::from(world);
        at(u64::from(rank))..at(u64::from(rank) + 1)
    }
}

/// The global data cursor (epoch, position in that epoch's order) at which optimizer step `step` (0-based)
/// starts, when every epoch of `epoch_len` positions is cut into global batches of `batch` positions from
/// its start (the last one of an epoch may be shorter). Any world size reads the same global batches.
pub fn cursor_at_step(epoch_len: u64, batch: u32, step: u64) -> (u32, u64) {
    assert!(
        epoch_len > 0 && batch > 0,
        "empty epoch or batch has no cursor"
    );
    let per_epoch = epoch_len.div_ceil(u64::from(batch));
    let epoch = u32::try_from(step / per_epoch).expect("fewer than 2^32 epochs");
    (epoch, (step % per_epoch) * u64::from(batch))
}

/// Gene-token order of clone `clone` of cell `cell`: a permutation of `0..n_genes` written into `out`.
/// Identity when augmentation is off; otherwise a Fisher-Yates shuffle drawn from the [`SampleRng`] keyed
/// by Philox(seed, [0, cell, clone, ClonePermutation]).
pub fn clone_order(
    seed: u64,
    augmentation: u32,
    sample: SampleId,
    n_genes: usize,
    out: &mut Vec<u16>,
) {
    out.clear();
    out.extend(0..n_genes as u16);
    if augmentation > 1 {
        clone_rng(seed, sample).shuffle(out, &mut Vec::new());
    }
}

/// The generator behind [`clone_order`]; the batch builder shuffles (gene, bin) pairs with it directly.
pub fn clone_rng(seed: u64, sample: SampleId) -> SampleRng {
    SampleRng::new(
        seed,
        Domain::ClonePermutation,
        sample.cell as u32,
        sample.clone,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cursor_at_step_cuts_each_epoch_from_its_start() {
        // 10 positions, batches of 4: steps read [0,4) [4,8) [8,10) then epoch 1 from 0.
        let cursors: Vec<_> = (0..5).map(|s| cursor_at_step(10, 4, s)).collect();
        assert_eq!(cursors, [(0, 0), (0, 4), (0, 8), (1, 0), (1, 4)]);
        assert_eq!(cursor_at_step(8, 4, 2), (1, 0));
    }

    fn blocks(sizes: &[u32]) -> Vec<BlockRef> {
        let mut first = 0;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &cells)| {
                let b = BlockRef {
                    shard: i as u32,
                    block: 0,
                    first_cell: first,
                    cells,
                    rows: None,
                };
                first += u64::from(cells);
                b
            })
            .collect()
    }

    #[test]
    fn split_parts_tile_the_corpus() {
        let sizes = [64, 64, 17, 64, 3];
        let split = CellSplit {
            seed: 9,
            eval_fraction: 0.25,
        };
        let config = OrderConfig {
            seed: 1,
            augmentation: 2,
            window_units: 3,
        };
        let mut seen = Vec::new();
        let mut eval_cells = 0;
        for part in [SplitPart::Train, SplitPart::Eval] {
            let plan =
                EpochPlan::from_blocks(restrict_blocks(blocks(&sizes), split, part), config, 0)
                    .unwrap();
            for loc in plan.range(0..plan.len()) {
                assert_eq!(split.part_of(loc.sample.cell), part);
                assert_eq!(
                    loc.sample.cell,
                    blocks(&sizes)[loc.shard as usize].first_cell + u64::from(loc.cell_in_block)
                );
                seen.push(loc.sample);
            }
            if part == SplitPart::Eval {
                eval_cells = plan.len() / 2;
            }
        }
        seen.sort();
        assert_eq!(seen, all_samples(&sizes, 2));
        let total: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
        let fraction = eval_cells as f64 / total as f64;
        assert!((0.12..0.38).contains(&fraction), "eval fraction {fraction}");
    }

    fn all_samples(sizes: &[u32], augmentation: u32) -> Vec<SampleId> {
        let cells: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
        let mut v: Vec<SampleId> = (0..cells)
            .flat_map(|cell| (0..augmentation).map(move |clone| SampleId { cell, clone }))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn clone_order_test_vectors() {
        // Pinned so that any change of generator or shuffle shows up as a failing test.
        let mut out = Vec::new();
        clone_order(42, 4, SampleId { cell: 7, clone: 2 }, 10, &mut out);
        assert_eq!(out, vec![7, 0, 3, 9, 2, 5, 8, 6, 4, 1]);
        clone_order(42, 1, SampleId { cell: 7, clone: 0 }, 5, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn random_access_equals_iteration() {
        let plan = EpochPlan::from_blocks(
            blocks(&[5, 3, 8, 1]),
            OrderConfig {
                seed: 3,
                augmentation: 3,
                window_units: 2,
            },
            1,
        )
        .unwrap();
        let iterated: Vec<_> = plan.range(0..plan.len()).collect();
        for (p, loc) in iterated.iter().enumerate() {
            assert_eq!(plan.at(p as u64), *loc);
        }
    }

    #[test]
    fn epochs_differ_and_are_reproducible() {
        let cfg = OrderConfig {
            seed: 9,
            augmentation: 4,
            window_units: 4,
        };
        let a = EpochPlan::from_blocks(blocks(&[64; 10]), cfg, 0).unwrap();
        let b = EpochPlan::from_blocks(blocks(&[64; 10]), cfg, 1).unwrap();
        let a2 = EpochPlan::from_blocks(blocks(&[64; 10]), cfg, 0).unwrap();
        let first = |p: &EpochPlan| p.range(0..100).map(|l| l.sample).collect::<Vec<_>>();
        assert_eq!(first(&a), first(&a2));
        assert_ne!(first(&a), first(&b));
    }

    proptest! {
        /// For random corpora and random sequences of world-size and batch-size changes at arbitrary
        /// cursors, the ranks together read every sample of the epoch exactly once.
        #[test]
        fn every_sample_exactly_once_across_world_size_changes(
            sizes in prop::collection::vec(1u32..40, 1..12),
            augmentation in 1u32..5,
            window_units in 1u32..6,
            seed in any::<u64>(),
            changes in prop::collection::vec((1u32..9, 1u32..17, 1usize..6), 1..30),
        ) {
            let plan = EpochPlan::from_blocks(blocks(&sizes), OrderConfig { seed, augmentation, window_units }, 0).unwrap();
            let partitioner = Partitioner { epoch_len: plan.len() };
            let mut cursor = 0u64;
            let mut seen = Vec::new();
            let mut change = 0;
            while cursor < plan.len() {
                // Each change holds for a few global batches, then the world re-forms.
                let (world, per_rank, steps) = changes[change % changes.len()];
                change += 1;
                for _ in 0..steps {
                    let global = partitioner.global_batch(cursor, world, per_rank);
                    if global.is_empty() { break; }
                    for rank in 0..world {
                        let slice = Partitioner::rank_slice(&global, world, rank);
                        seen.extend(plan.range(slice).map(|l| l.sample));
                    }
                    cursor = global.end;
                }
            }
            seen.sort();
            prop_assert_eq!(seen, all_samples(&sizes, augmentation));
        }
    }
}
