//! The batches a run reads: one side of the held-out split, epoch after epoch from a cursor, as device
//! tensors.

use std::sync::Arc;

use anyhow::{bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::stream::batch::{Batch, Loader, LoaderConfig, MaskConfig, SequenceLayout};
use cellfleet_shared::stream::bucket::{expressed_per_cell, sequence_len, Bucketing};
use cellfleet_shared::stream::{
    cursor_at_step, CellSplit, EpochPlan, OrderConfig, Partitioner, SplitPart,
};
use tch::{Device, Kind, Tensor};

use crate::model::Tokens;

/// Converts a batch into device tensors: (tokens, targets `[batch, seq]` int64); padded batches get a
/// validity mask.
pub fn batch_tensors(batch: &Batch, device: Device) -> (Tokens, Tensor) {
    let shape = [batch.samples as i64, batch.seq_len as i64];
    let genes: Vec<i32> = batch.gene_ids.iter().map(|&g| i32::from(g)).collect();
    let to = |t: Tensor| t.view(shape).to_kind(Kind::Int64).to_device(device);
    let valid = batch.is_padded().then(|| {
        let lengths: Vec<i64> = batch.lengths.iter().map(|&l| i64::from(l)).collect();
        let lengths = Tensor::from_slice(&lengths).to_device(device);
        Tensor::arange(batch.seq_len as i64, (Kind::Int64, device))
            .unsqueeze(0)
            .lt_tensor(&lengths.unsqueeze(1))
    });
    (
        Tokens {
            gene_ids: to(Tensor::from_slice(&genes)),
            bins: to(Tensor::from_slice(&batch.input_bins)),
            valid,
        },
        to(Tensor::from_slice(&batch.target_bins)),
    )
}

/// The batches of one side of the split, epoch after epoch, from a cursor.
pub(crate) struct BatchStream {
    pub(crate) corpus: Arc<Corpus>,
    pub(crate) order: OrderConfig,
    pub(crate) split: CellSplit,
    pub(crate) part: SplitPart,
    loader_config: LoaderConfig,
    /// The global batch; this stream yields rank `rank`'s slice of each.
    batch_size: u32,
    world: u32,
    rank: u32,
    epoch: u32,
    cursor: u64,
    loader: Option<Loader>,
    /// Batches the current loader was asked for but not yet handed out.
    pending: usize,
    /// Length bucketing: the sequence length of every corpus cell and the global batches per window.
    bucketing: Option<(Vec<u32>, u32)>,
}

impl BatchStream {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        corpus: Arc<Corpus>,
        order: OrderConfig,
        split: CellSplit,
        part: SplitPart,
        sequence: SequenceLayout,
        mask: MaskConfig,
        batch_size: u32,
        threads: usize,
    ) -> Self {
        Self {
            corpus,
            order,
            split,
            part,
            loader_config: LoaderConfig {
                sequence,
                mask,
                threads: threads.max(1),
                ..LoaderConfig::default()
            },
            batch_size,
            world: 1,
            rank: 0,
            epoch: 0,
            cursor: 0,
            loader: None,
            pending: 0,
            bucketing: None,
        }
    }

    /// Groups cells of similar length into batches (expressed layout; see `stream::bucket`). Reads every
    /// block of the corpus once to count each cell's expressed genes.
    pub(crate) fn with_bucketing(mut self, window_batches: u32) -> anyhow::Result<Self> {
        let layout = self.loader_config.sequence;
        if window_batches == 0 || layout == SequenceLayout::Full {
            return Ok(self);
        }
        let n_genes = self.corpus.manifest.genes.len();
        let lengths = expressed_per_cell(&self.corpus)?
            .into_iter()
            .map(|expressed| sequence_len(layout, expressed, n_genes))
            .collect();
        self.bucketing = Some((lengths, window_batches));
        Ok(self)
    }

    /// Yields rank `rank` of `world`'s slice of every global batch from now on.
    pub(crate) fn for_rank(mut self, world: u32, rank: u32) -> Self {
        self.world = world;
        self.rank = rank;
        self
    }

    /// Continues from the global cursor at which optimizer step `step` starts.
    pub(crate) fn seek_step(&mut self, step: u64) -> anyhow::Result<()> {
        let len = EpochPlan::part_len(&self.corpus.manifest, self.order, self.split, self.part)?;
        if len == 0 {
            bail!(
                "the {:?} split of {} is empty",
                self.part,
                self.corpus.store.url()
            );
        }
        let (epoch, position) = cursor_at_step(len, self.batch_size, step);
        self.epoch = epoch;
        self.cursor = position;
        self.loader = None;
        self.pending = 0;
        Ok(())
    }

    /// The next batch; `limit` caps how many batches a new epoch's loader prepares.
    pub(crate) fn next(&mut self, limit: usize) -> anyhow::Result<Batch> {
        loop {
            if self.pending > 0 {
                self.pending -= 1;
                let batch = self
                    .loader
                    .as_mut()
                    .and_then(|l| l.next())
                    .context("loader ended early")??;
                return Ok(batch);
            }
            let plan = Arc::new(EpochPlan::for_part(
                &self.corpus.manifest,
                self.order,
                self.epoch,
                self.split,
                self.part,
            )?);
            if plan.is_empty() {
                bail!(
                    "the {:?} split of {} is empty (eval fraction {})",
                    self.part,
                    self.corpus.store.url(),
                    self.split.eval_fraction
                );
            }
            let partitioner = Partitioner {
                epoch_len: plan.len(),
            };
            let mut ranges = Vec::new();
            let mut lists = Vec::new();
            while ranges.len() + lists.len() < limit.max(1) {
                let range = partitioner.global_batch(self.cursor, 1, self.batch_size);
                if range.is_empty() {
                    break;
                }
                self.cursor = range.end;
                match &self.bucketing {
                    Some((lengths, window_batches)) => {
                        let bucketing = Bucketing {
                            lengths,
                            batch_size: self.batch_size,
                            window_batches: *window_batches,
                        };
                        let global = bucketing.global_batch(&plan, range.start);
                        lists.push(Bucketing::rank_slice(&global, self.world, self.rank));
                    }
                    None => ranges.push(Partitioner::rank_slice(&range, self.world, self.rank)),
                }
            }
            if ranges.is_empty() && lists.is_empty() {
                self.epoch += 1;
                self.cursor = 0;
                continue;
            }
            self.pending = ranges.len() + lists.len();
            self.loader = None;
            self.loader = Some(if lists.is_empty() {
                Loader::spawn(self.corpus.clone(), plan, ranges, self.loader_config)?
            } else {
                Loader::spawn_lists(self.corpus.clone(), plan, lists, self.loader_config)?
            });
        }
    }
}
