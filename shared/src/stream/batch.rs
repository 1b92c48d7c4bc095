//! Batches for masked-bin pretraining, and a prefetching loader that builds them on background threads.
//!
//! A sample is `[CLS]` followed by gene tokens in its clone's order: one per vocabulary gene in the full
//! layout, or one per expressed gene plus a sample of unexpressed ones in the expressed layout (see
//! [`SequenceLayout`]). Token arrays are compact (`u16` gene ids, `u8` bins) so a batch stays small on
//! its way to the device; rows of different lengths are padded to the batch's longest.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};

use crate::corpus::shard::{Block, BlockDecompressor, Shard};
use crate::corpus::Corpus;
use crate::error::{Error, Result};
use crate::philox::{Domain, SampleRng};
use crate::stream::clone_rng;
use crate::stream::{EpochPlan, SampleId, SampleLocation};

/// Gene id of the `[CLS]` token; vocabulary gene g has gene id g + 1.
pub const CLS_GENE_ID: u16 = 0;
/// Target value of positions that are not predicted (not masked, or `[CLS]`).
pub const IGNORE_TARGET: u8 = u8::MAX;

/// Special bin values, placed after the expression bins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLayout {
    pub n_bins: u8,
}

impl TokenLayout {
    pub fn new(n_bins: u16) -> Result<Self> {
        if !(2..=250).contains(&n_bins) {
            return Err(Error::Config(format!("bins must be 2..=250, got {n_bins}")));
        }
        Ok(Self {
            n_bins: n_bins as u8,
        })
    }
    /// Input bin of a masked token.
    pub fn mask_bin(&self) -> u8 {
        self.n_bins
    }
    /// Input bin of the `[CLS]` token.
    pub fn cls_bin(&self) -> u8 {
        self.n_bins + 1
    }
    /// Size of the bin-embedding table.
    pub fn bin_vocab(&self) -> usize {
        usize::from(self.n_bins) + 2
    }
}

/// Which gene tokens a sample's sequence holds: chosen in the training config, recorded with the model,
/// and honoured by everything that feeds the model cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SequenceLayout {
    /// `[CLS]` + every vocabulary gene: a cell costs the vocabulary's length whatever it expresses.
    #[default]
    Full,
    /// `[CLS]` + the genes the cell expresses (bin > 0) + up to `unexpressed` of its unexpressed genes,
    /// drawn afresh per sample and epoch, so the model still learns what absence looks like. A 10x cell
    /// expresses a few hundred of 4,096 genes, so this pays for those, as Geneformer and scGPT do.
    Expressed { unexpressed: u32 },
}

impl SequenceLayout {
    /// The layout's name as configs and errors spell it.
    pub fn name(&self) -> &'static str {
        match self {
            SequenceLayout::Full => "full",
            SequenceLayout::Expressed { .. } => "expressed",
        }
    }

    /// Tokens (with `[CLS]`) of the sequence of a cell with `bins`.
    pub fn sample_len(&self, bins: &[u8]) -> usize {
        match *self {
            SequenceLayout::Full => bins.len() + 1,
            SequenceLayout::Expressed { unexpressed } => {
                let expressed = expressed_count(bins);
                1 + expressed + (unexpressed as usize).min(bins.len() - expressed)
            }
        }
    }
}

impl SequenceLayout {
    /// The genes (vocabulary positions, ascending) of cell `cell`'s sequence outside training, where
    /// nothing is permuted or masked (screens): every gene in the full layout; in the expressed layout
    /// its expressed genes and an unexpressed sample drawn with a key of the cell alone, so every worker
    /// reads a cell the same way.
    pub fn inference_genes(&self, cell: u64, bins: &[u8]) -> Vec<u32> {
        let SequenceLayout::Expressed { unexpressed } = *self else {
            return (0..bins.len() as u32).collect();
        };
        let mut absent: Vec<u32> = (0..bins.len() as u32)
            .filter(|&g| bins[g as usize] == 0)
            .collect();
        let draw = (unexpressed as usize).min(absent.len());
        let mut rng = SampleRng::new(0, Domain::UnexpressedSample, cell as u32, u32::MAX);
        for i in 0..draw {
            let j = i + rng.below((absent.len() - i) as u32) as usize;
            absent.swap(i, j);
        }
        let mut genes: Vec<u32> = (0..bins.len() as u32)
            .filter(|&g| bins[g as usize] != 0)
            .chain(absent[..draw].iter().copied())
            .collect();
        genes.sort_unstable();
        genes
    }
}

/// Unexpressed genes per expressed-layout sequence unless configured otherwise: enough that absence is
/// seen in every sample, few next to the few hundred expressed genes of a typical cell.
pub const DEFAULT_UNEXPRESSED: u32 = 32;

/// Genes with a non-zero bin (bin 0 is zero expression).
pub fn expressed_count(bins: &[u8]) -> usize {
    // Counting into a byte per lane, 255 bins at a time, lets the compiler compare and add 16 bins
    // per instruction; a plain `filter().count()` widened every byte to 64 bits, and counting a
    // batch's lengths took a sixth of the expressed-layout loader's time.
    bins.chunks(255)
        .map(|chunk| chunk.iter().fold(0u8, |count, &b| count + u8::from(b != 0)) as usize)
        .sum()
}

/// Masked-bin pretraining batch of `samples` sequences padded to `seq_len` tokens, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub samples: usize,
    pub seq_len: usize,
    /// Real tokens of each sample (with `[CLS]`); the rest of its row is padding (gene id 0, the mask
    /// bin as input, no target), which the model never attends to.
    pub lengths: Vec<u32>,
    pub gene_ids: Vec<u16>,
    pub input_bins: Vec<u8>,
    /// True bin at masked positions, `IGNORE_TARGET` elsewhere.
    pub target_bins: Vec<u8>,
    /// `samples x label_columns` codes (`manifest::MISSING_LABEL` when absent).
    pub labels: Vec<u32>,
    pub sample_ids: Vec<SampleId>,
    /// The epoch positions this batch covers.
    pub positions: Range<u64>,
}

impl Batch {
    /// Whether some row is padded (the model then needs a validity mask).
    pub fn is_padded(&self) -> bool {
        self.lengths.iter().any(|&l| l as usize != self.seq_len)
    }
    /// Real tokens in the batch.
    pub fn real_tokens(&self) -> usize {
        self.lengths.iter().map(|&l| l as usize).sum()
    }
}

/// Which gene tokens a batch asks the model to predict, and what their inputs become.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskConfig {
    /// Probability that a gene token is selected for prediction, quantized to 1/65536.
    pub ratio: f32,
    /// Of the selected tokens, the share whose input bin is replaced by a random bin, and the share
    /// left unchanged (the rest get the mask bin). BERT's 10% and 10% make the bin head a trained
    /// readout at unmasked tokens too: a selected token that looks unmasked is indistinguishable from
    /// any other, so the head learns each gene's expression given its input and its context, which is
    /// what a screen reads at every token.
    pub random_share: f32,
    pub keep_share: f32,
}

impl MaskConfig {
    /// Every selected token masked: what evaluation measures.
    pub fn masking_only(ratio: f32) -> Self {
        Self {
            ratio,
            random_share: 0.0,
            keep_share: 0.0,
        }
    }

    /// Draw thresholds (of 65536): below the first a token is masked, below the second it gets a random
    /// bin, below the third it is kept but still predicted.
    fn thresholds(&self) -> (u32, u32, u32) {
        let quantize = |p: f32| (p.clamp(0.0, 1.0) * 65536.0).round() as u32;
        let selected = self.ratio.clamp(0.0, 1.0);
        let keep = self.keep_share.clamp(0.0, 1.0);
        let random = self.random_share.clamp(0.0, 1.0 - keep);
        (
            quantize(selected * (1.0 - keep - random)),
            quantize(selected * (1.0 - keep)),
            quantize(selected),
        )
    }
}

/// Builds one sample's tokens into the batch buffers: the loader's hot path.
#[derive(Debug, Default)]
pub struct SampleWriter {
    tokens: Vec<u32>,
    draws: Vec<u16>,
    partners: Vec<u16>,
    mask_words: Vec<u64>,
    unexpressed_genes: Vec<u32>,
    /// Expressed layout: (key << 32 | gene << 16 | bin) of the kept tokens, sorted into the clone's order.
    keyed: Vec<u64>,
    /// `sort_uniform_keys`'s bucket counts and output.
    bucket_starts: Vec<u32>,
    sorted: Vec<u64>,
}

/// Sorts distinct `keys` whose top bits are uniform (hash values) ascending, as `sort_unstable` would,
/// in linear expected time: one counting pass on the top bits puts each key in one of 1-2x as many
/// buckets as there are keys, and insertion sort then swaps the few neighbours that share a bucket.
/// For the 250-350 keys of a sample it is several times faster than the comparison sort it replaces,
/// which took a quarter of the expressed-layout loader's time.
fn sort_uniform_keys(keys: &mut Vec<u64>, sorted: &mut Vec<u64>, bucket_starts: &mut Vec<u32>) {
    let n = keys.len();
    if n < 2 {
        return;
    }
    // n + 1 to 2n buckets, indexed by the top `bits` bits.
    let bits = (usize::BITS - n.leading_zeros()).min(20);
    let bucket = |k: u64| (k >> (64 - bits)) as usize;
    bucket_starts.clear();
    bucket_starts.resize((1usize << bits) + 1, 0);
    for &k in keys.iter() {
        bucket_starts[bucket(k) + 1] += 1;
    }
    for b in 1..bucket_starts.len() {
        bucket_starts[b] += bucket_starts[b - 1];
    }
    sorted.clear();
    sorted.resize(n, 0);
    for &k in keys.iter() {
        let slot = &mut bucket_starts[bucket(k)];
        sorted[*slot as usize] = k;
        *slot += 1;
    }
    for i in 1..n {
        let k = sorted[i];
        let mut j = i;
        while j > 0 && sorted[j - 1] > k {
            sorted[j] = sorted[j - 1];
            j -= 1;
        }
        sorted[j] = k;
    }
    std::mem::swap(keys, sorted);
}

impl SampleWriter {
    /// Puts the kept tokens in their clone's order: every vocabulary gene has a key drawn from the clone's
    /// seed (`clone_key`, fixed across epochs) and the tokens are sorted by it. A clone is therefore one
    /// fixed uniform permutation of the vocabulary, of which each epoch's sequence (its expressed genes
    /// and that epoch's unexpressed draw) is a subsequence, as in the full layout; but the kept tokens
    /// cost a key each instead of a shuffle of the whole vocabulary. Expressed and unexpressed tokens are
    /// interleaved, so a position says nothing about expression. Two genes whose 32-bit keys collide
    /// (about once in 10^5 samples of 300 tokens) keep vocabulary order.
    fn clone_order(&mut self, clone_key: u64) {
        self.keyed.clear();
        self.keyed.extend(self.tokens.iter().map(|&t| {
            u64::from(gene_key(clone_key, t & 0xFFFF)) << 32
                | u64::from(t & 0xFFFF) << 16
                | u64::from(t >> 16)
        }));
        sort_uniform_keys(&mut self.keyed, &mut self.sorted, &mut self.bucket_starts);
        self.tokens.clear();
        self.tokens.extend(
            self.keyed
                .iter()
                .map(|&k| (k as u32 & 0xFF) << 16 | (k as u32) >> 16),
        );
    }

    /// Appends up to `wanted` of the unexpressed genes of a cell with `bins` (bin 0) to `tokens`, a
    /// uniform sample without replacement from `rng`. Most of a 10x cell's vocabulary is unexpressed, so
    /// drawing vocabulary positions and rejecting expressed or repeated ones takes about `wanted` draws;
    /// a cell expressing most genes gets a partial Fisher-Yates shuffle of its unexpressed genes instead.
    fn draw_unexpressed(&mut self, mut rng: SampleRng, bins: &[u8], wanted: usize) {
        let absent = bins.len() - self.tokens.len();
        let draw = wanted.min(absent);
        if draw == absent {
            self.tokens
                .extend((0..bins.len() as u32).filter(|&g| bins[g as usize] == 0));
        } else if absent >= bins.len() / 2 {
            let first = self.tokens.len();
            while self.tokens.len() - first < draw {
                let g = rng.below(bins.len() as u32);
                if bins[g as usize] == 0 && !self.tokens[first..].contains(&g) {
                    self.tokens.push(g);
                }
            }
        } else {
            self.unexpressed_genes.clear();
            self.unexpressed_genes
                .extend((0..bins.len() as u32).filter(|&g| bins[g as usize] == 0));
            for i in 0..draw {
                let j = i + rng.below((absent - i) as u32) as usize;
                self.unexpressed_genes.swap(i, j);
            }
            self.tokens
                .extend_from_slice(&self.unexpressed_genes[..draw]);
        }
    }

    /// Writes sample `sample` (whose cell has `bins`) as `[CLS]` + tokens in `sequence`'s layout into the
    /// three row slices, and pads the rest of the rows; returns the real tokens written (with `[CLS]`),
    /// `sequence.sample_len(bins)`.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        plan: &EpochPlan,
        layout: TokenLayout,
        sequence: SequenceLayout,
        mask: MaskConfig,
        sample: SampleId,
        bins: &[u8],
        genes: &mut [u16],
        inputs: &mut [u8],
        targets: &mut [u8],
    ) -> usize {
        let config = plan.config();
        // (bin << 16 | gene) pairs: the permutation moves gene and bin together, so no pass has to
        // gather bins in permuted order.
        self.tokens.clear();
        match sequence {
            SequenceLayout::Full => self.tokens.extend(
                bins.iter()
                    .enumerate()
                    .map(|(g, &b)| u32::from(b) << 16 | g as u32),
            ),
            SequenceLayout::Expressed { unexpressed } => {
                push_expressed(bins, &mut self.tokens);
                let rng = SampleRng::new(
                    config.seed,
                    Domain::UnexpressedSample,
                    sample.cell as u32,
                    plan.epoch() << 8 | sample.clone,
                );
                self.draw_unexpressed(rng, bins, unexpressed as usize);
                if config.augmentation > 1 {
                    self.clone_order(clone_rng(config.seed, sample).next_u64());
                } else {
                    // Without augmentation tokens stay in vocabulary order, whatever their kind.
                    self.tokens.sort_unstable_by_key(|&t| t & 0xFFFF);
                }
            }
        }
        // The full layout's clone permutation: a Fisher-Yates shuffle of the whole vocabulary.
        if config.augmentation > 1 && sequence == SequenceLayout::Full {
            clone_rng(config.seed, sample).shuffle(&mut self.tokens, &mut self.partners);
        }
        let n = self.tokens.len();
        // Masking draws 16 bits per token, four per 64-bit word, from its own per-(sample, epoch) stream.
        self.mask_words.resize(n.div_ceil(4), 0);
        SampleRng::new(
            config.seed,
            Domain::Mask,
            sample.cell as u32,
            plan.epoch() << 8 | sample.clone,
        )
        .fill_u64(&mut self.mask_words);
        let (masked_below, random_below, selected_below) = mask.thresholds();
        let n_bins = u32::from(layout.n_bins);
        genes[0] = CLS_GENE_ID;
        inputs[0] = layout.cls_bin();
        targets[0] = IGNORE_TARGET;
        let mask_bin = layout.mask_bin();
        let (genes_row, inputs_row, targets_row) = (genes, inputs, targets);
        let (genes, inputs, targets) = (
            &mut genes_row[1..=n],
            &mut inputs_row[1..=n],
            &mut targets_row[1..=n],
        );
        // Simple passes that the compiler vectorizes, plus one gather; faster than one fused loop.
        self.draws.clear();
        self.draws.extend(self.mask_words.iter().flat_map(|w| {
            [
                *w as u16,
                (w >> 16) as u16,
                (w >> 32) as u16,
                (w >> 48) as u16,
            ]
        }));
        for (out, &token) in genes.iter_mut().zip(&self.tokens) {
            *out = token as u16 + 1;
        }
        for (((input, target), &token), &draw) in inputs
            .iter_mut()
            .zip(targets.iter_mut())
            .zip(&self.tokens)
            .zip(&self.draws)
        {
            let bin = (token >> 16) as u8;
            let draw = u32::from(draw);
            // All-ones when true: branch-free selects, since the mask is unpredictable by design.
            let masked = u8::from(draw < masked_below).wrapping_neg();
            let randomized = u8::from(draw >= masked_below && draw < random_below).wrapping_neg();
            let selected = u8::from(draw < selected_below).wrapping_neg();
            // A bin from the draw's hash (multiply-shift into 0..n_bins): the draws that pick a random
            // bin are a narrow range, the hash spreads them over the bins.
            let random_bin = (((draw.wrapping_mul(0x9E37_79B1) >> 16) * n_bins) >> 16) as u8;
            *input =
                (bin & !(masked | randomized)) | (mask_bin & masked) | (random_bin & randomized);
            *target = (bin & selected) | (IGNORE_TARGET & !selected);
        }
        pad_row(layout, n + 1, genes_row, inputs_row, targets_row);
        n + 1
    }
}

/// Appends `bin << 16 | gene` for every expressed gene (bin > 0) of `bins`, in gene order. A 10x cell
/// expresses a few percent of the vocabulary at random places: a byte-by-byte filter mispredicts a branch
/// on every expressed gene, so 64 bins at a time become a bit mask whose set bits are then visited.
fn push_expressed(bins: &[u8], tokens: &mut Vec<u32>) {
    let mut chunks = bins.chunks_exact(64);
    let mut base = 0u32;
    for chunk in &mut chunks {
        let mut mask = 0u64;
        for (w, word) in chunk.chunks_exact(8).enumerate() {
            mask |= nonzero_bytes(u64::from_le_bytes(word.try_into().expect("8 bytes"))) << (8 * w);
        }
        while mask != 0 {
            let g = base + mask.trailing_zeros();
            tokens.push(u32::from(bins[g as usize]) << 16 | g);
            mask &= mask - 1;
        }
        base += 64;
    }
    for (i, &b) in chunks.remainder().iter().enumerate() {
        if b != 0 {
            tokens.push(u32::from(b) << 16 | (base + i as u32));
        }
    }
}

/// A gene's 32-bit key in the clone with seed `clone_key`: the splitmix64 finalizer of the two mixed,
/// so the keys of a clone's genes are independent uniform draws.
fn gene_key(clone_key: u64, gene: u32) -> u32 {
    let mut z = clone_key ^ u64::from(gene).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// Bit i set where byte i of `x` (little-endian) is non-zero. Adding 0x7f to a byte's low seven bits
/// carries into its high bit exactly when they are non-zero (never into the next byte); or-ing in the
/// byte itself covers a set high bit. The multiply then gathers the eight high bits (bit 8i + 7) into the
/// top byte: each lands on bit 56 + i through the factor's term 2^(7 (7 - i)), every other term falls
/// below bit 56 at a distinct position or overflows out of the word, so nothing carries into the result.
fn nonzero_bytes(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let high = (((x & LOW7) + LOW7) | x) & !LOW7;
    high.wrapping_mul(0x0002_0408_1020_4081) >> 56
}

/// Fills a row's tokens from `from` on with padding.
fn pad_row(
    layout: TokenLayout,
    from: usize,
    genes: &mut [u16],
    inputs: &mut [u8],
    targets: &mut [u8],
) {
    genes[from..].fill(CLS_GENE_ID);
    inputs[from..].fill(layout.mask_bin());
    targets[from..].fill(IGNORE_TARGET);
}

/// Caches compressed, verified shards (shared by loader threads), least recently used out first.
struct ShardCache {
    corpus: Arc<Corpus>,
    capacity_bytes: usize,
    entries: Mutex<CachedShards>,
}

#[derive(Default)]
struct CachedShards {
    clock: u64,
    bytes: usize,
    map: HashMap<u32, (u64, Arc<Shard>)>,
}

impl ShardCache {
    fn get(&self, shard: u32) -> Result<Arc<Shard>> {
        {
            let mut cache = self.entries.lock().unwrap();
            cache.clock += 1;
            let now = cache.clock;
            if let Some(entry) = cache.map.get_mut(&shard) {
                entry.0 = now;
                return Ok(entry.1.clone());
            }
        }
        // Fetch and verify outside the lock so other threads keep assembling.
        let fetched = Arc::new(self.corpus.fetch_shard(shard as usize)?);
        let mut cache = self.entries.lock().unwrap();
        if cache.map.contains_key(&shard) {
            return Ok(fetched);
        }
        while cache.bytes + fetched.stored_len() > self.capacity_bytes && !cache.map.is_empty() {
            let oldest = cache
                .map
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| *k)
                .unwrap();
            let (_, removed) = cache.map.remove(&oldest).unwrap();
            cache.bytes -= removed.stored_len();
        }
        cache.bytes += fetched.stored_len();
        let now = cache.clock;
        cache.map.insert(shard, (now, fetched.clone()));
        Ok(fetched)
    }
}

/// Per-thread cache of decompressed blocks.
struct BlockCache {
    decompressor: BlockDecompressor,
    capacity: usize,
    clock: u64,
    entries: Vec<((u32, u32), u64, Block)>,
}

impl BlockCache {
    fn get(&mut self, shards: &ShardCache, loc: &SampleLocation) -> Result<&Block> {
        self.clock += 1;
        let key = (loc.shard, loc.block);
        if let Some(i) = self.entries.iter().position(|(k, _, _)| *k == key) {
            self.entries[i].1 = self.clock;
            return Ok(&self.entries[i].2);
        }
        let shard = shards.get(loc.shard)?;
        let slot = if self.entries.len() < self.capacity {
            self.entries.push((key, self.clock, Block::default()));
            self.entries.len() - 1
        } else {
            let (i, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, t, _))| *t)
                .unwrap();
            i
        };
        self.entries[slot].0 = key;
        self.entries[slot].1 = self.clock;
        shard.read_block_into(
            loc.block as usize,
            &mut self.entries[slot].2,
            &mut self.decompressor,
        )?;
        Ok(&self.entries[slot].2)
    }
}

/// Loader settings.
#[derive(Debug, Clone, Copy)]
pub struct LoaderConfig {
    pub sequence: SequenceLayout,
    pub mask: MaskConfig,
    /// Assembly threads.
    pub threads: usize,
    /// Batches each thread may have ready ahead of the consumer.
    pub prefetch: usize,
    /// Bytes of compressed shards kept in memory.
    pub shard_cache_bytes: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            sequence: SequenceLayout::Full,
            mask: MaskConfig::masking_only(0.15),
            threads: 1,
            prefetch: 4,
            shard_cache_bytes: 512 << 20,
        }
    }
}

/// Builds the batches for a list of position ranges on background threads and hands them back in order.
///
/// Memory is bounded by `threads x (prefetch batches + block cache)` plus `shard_cache_bytes`.
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch>>>,
    next: usize,
    total: usize,
    handles: Vec<JoinHandle<()>>,
}

/// The epoch positions of one batch: a contiguous range, or a list (length-bucketed batches).
#[derive(Debug, Clone)]
enum BatchPositions {
    Range(Range<u64>),
    List(Vec<u64>),
}

impl Loader {
    /// Batches of contiguous epoch positions.
    pub fn spawn(
        corpus: Arc<Corpus>,
        plan: Arc<EpochPlan>,
        batches: Vec<Range<u64>>,
        config: LoaderConfig,
    ) -> Result<Self> {
        let batches = batches.into_iter().map(BatchPositions::Range).collect();
        Self::spawn_batches(corpus, plan, batches, config)
    }

    /// Batches of listed epoch positions, each delivered in its list's order
    /// (see [`crate::stream::bucket`]).
    pub fn spawn_lists(
        corpus: Arc<Corpus>,
        plan: Arc<EpochPlan>,
        batches: Vec<Vec<u64>>,
        config: LoaderConfig,
    ) -> Result<Self> {
        let batches = batches.into_iter().map(BatchPositions::List).collect();
        Self::spawn_batches(corpus, plan, batches, config)
    }

    fn spawn_batches(
        corpus: Arc<Corpus>,
        plan: Arc<EpochPlan>,
        batches: Vec<BatchPositions>,
        config: LoaderConfig,
    ) -> Result<Self> {
        let layout = TokenLayout::new(corpus.manifest.bins.n_bins)?;
        let threads = config.threads.max(1);
        let shards = Arc::new(ShardCache {
            corpus: corpus.clone(),
            capacity_bytes: config.shard_cache_bytes,
            entries: Mutex::new(CachedShards::default()),
        });
        let total = batches.len();
        let batches = Arc::new(batches);
        let mut receivers = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let (tx, rx) = bounded(config.prefetch.max(1));
            receivers.push(rx);
            let (plan, shards, batches, corpus) = (
                plan.clone(),
                shards.clone(),
                batches.clone(),
                corpus.clone(),
            );
            let block_capacity = 2 * plan.config().window_units as usize + 2;
            let decompressor = BlockDecompressor::new()?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("cellfleet-loader-{t}"))
                    .spawn(move || {
                        let mut assembler = Assembler {
                            plan: &plan,
                            layout,
                            sequence: config.sequence,
                            mask: config.mask,
                            n_genes: corpus.manifest.genes.len(),
                            n_labels: corpus.manifest.label_columns.len(),
                            shards: &shards,
                            blocks: BlockCache {
                                decompressor,
                                capacity: block_capacity,
                                clock: 0,
                                entries: Vec::new(),
                            },
                            writer: SampleWriter::default(),
                        };
                        for range in batches.iter().skip(t).step_by(threads) {
                            let result = assembler.assemble(range.clone());
                            let failed = result.is_err();
                            if tx.send(result).is_err() || failed {
                                return;
                            }
                        }
                    })
                    .map_err(|e| Error::Loader(format!("cannot start loader thread: {e}")))?,
            );
        }
        Ok(Self {
            receivers,
            next: 0,
            total,
            handles,
        })
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(
            rx.recv()
                .unwrap_or_else(|_| Err(Error::Loader("a loader thread exited early".into()))),
        )
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Dropping the receivers unblocks the threads' sends; then they end.
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

struct Assembler<'a> {
    plan: &'a EpochPlan,
    layout: TokenLayout,
    sequence: SequenceLayout,
    mask: MaskConfig,
    n_genes: usize,
    n_labels: usize,
    shards: &'a ShardCache,
    blocks: BlockCache,
    writer: SampleWriter,
}

impl Assembler<'_> {
    fn assemble(&mut self, positions: BatchPositions) -> Result<Batch> {
        let (locations, positions): (Vec<SampleLocation>, Range<u64>) = match positions {
            BatchPositions::Range(range) => (self.plan.range(range.clone()).collect(), range),
            BatchPositions::List(list) => {
                let span = list.iter().min().copied().unwrap_or(0)
                    ..list.iter().max().map_or(0, |&p| p + 1);
                (list.iter().map(|&p| self.plan.at(p)).collect(), span)
            }
        };
        let samples = locations.len();
        // Rows are as long as the batch's longest sequence: the whole vocabulary in the full layout.
        let seq_len = match self.sequence {
            SequenceLayout::Full => self.n_genes + 1,
            SequenceLayout::Expressed { .. } => {
                let mut longest = 1;
                for loc in &locations {
                    let block = self.blocks.get(self.shards, loc)?;
                    longest = longest.max(
                        self.sequence
                            .sample_len(block.bins_of(loc.cell_in_block as usize)),
                    );
                }
                longest
            }
        };
        let mut batch = Batch {
            samples,
            seq_len,
            lengths: Vec::with_capacity(samples),
            gene_ids: vec![0; samples * seq_len],
            input_bins: vec![0; samples * seq_len],
            target_bins: vec![0; samples * seq_len],
            labels: Vec::with_capacity(samples * self.n_labels),
            sample_ids: Vec::with_capacity(samples),
            positions: positions.clone(),
        };
        for (i, loc) in locations.into_iter().enumerate() {
            let block = self.blocks.get(self.shards, &loc)?;
            let row = loc.cell_in_block as usize;
            let span = i * seq_len..(i + 1) * seq_len;
            let length = self.writer.write(
                self.plan,
                self.layout,
                self.sequence,
                self.mask,
                loc.sample,
                block.bins_of(row),
                &mut batch.gene_ids[span.clone()],
                &mut batch.input_bins[span.clone()],
                &mut batch.target_bins[span],
            );
            batch.lengths.push(length as u32);
            batch.labels.extend_from_slice(block.labels_of(row));
            batch.sample_ids.push(loc.sample);
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::manifest::{
        LabelColumn, Manifest, ShardEntry, VocabularySource, FORMAT_VERSION, MANIFEST_FILE,
    };
    use crate::corpus::shard::{CellOrigin, ShardBuilder};
    use crate::corpus::tokenize::BinRule;
    use crate::storage::{S3Options, Store};
    use crate::stream::{clone_order, OrderConfig, Partitioner};

    const GENES: usize = 37;
    const BINS: u16 = 10;

    fn stored_bins(cell: u64) -> Vec<u8> {
        (0..GENES as u64)
            .map(|g| ((cell * 7 + g * 3) % u64::from(BINS)) as u8)
            .collect()
    }

    /// A small corpus of two shards written through the real store and shard format.
    fn corpus(dir: &std::path::Path) -> Corpus {
        let store = Store::open(dir.to_str().unwrap(), &S3Options::default()).unwrap();
        let mut shards = Vec::new();
        let mut cell = 0u64;
        for (i, cells) in [90u64, 61].into_iter().enumerate() {
            let mut builder = ShardBuilder::new(GENES, 1);
            for _ in 0..cells {
                builder.push_dense(
                    CellOrigin {
                        source: 0,
                        row: cell,
                        name: format!("c{cell}"),
                    },
                    &[(cell % 3) as u32],
                    &stored_bins(cell),
                );
                cell += 1;
            }
            let bytes = builder.encode(16).unwrap();
            let name = format!("shards/{i}.cfs");
            shards.push(ShardEntry {
                name: name.clone(),
                cells: cells as u32,
                bytes: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            });
            store.put(&name, bytes.into()).unwrap();
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            synthetic: true,
            genes: (0..GENES).map(|g| format!("G{g}")).collect(),
            vocabulary: VocabularySource::Fixed {
                file: "test".into(),
                missing_in_input: 0,
            },
            bins: BinRule::per_cell_quantile(BINS),
            label_columns: vec![LabelColumn {
                name: "kind".into(),
                categories: vec!["a".into(), "b".into(), "c".into()],
            }],
            block_cells: 16,
            shards,
            sources: Vec::new(),
            total_cells: cell,
            created_by: "test".into(),
        };
        store
            .put(MANIFEST_FILE, serde_json::to_vec(&manifest).unwrap().into())
            .unwrap();
        Corpus::from_store(store).unwrap()
    }

    #[test]
    fn selected_tokens_are_masked_randomized_or_kept_in_the_configured_shares() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = Arc::new(corpus(dir.path()));
        let order = OrderConfig {
            seed: 5,
            augmentation: 2,
            window_units: 3,
        };
        let plan = Arc::new(EpochPlan::new(&corpus.manifest, order, 1).unwrap());
        let partitioner = Partitioner {
            epoch_len: plan.len(),
        };
        let ranges: Vec<_> = (0..)
            .map(|i| partitioner.global_batch(i * 20, 1, 20))
            .take_while(|r| !r.is_empty())
            .collect();
        let config = LoaderConfig {
            mask: MaskConfig {
                ratio: 0.5,
                random_share: 0.1,
                keep_share: 0.1,
            },
            ..LoaderConfig::default()
        };
        let layout = TokenLayout::new(BINS).unwrap();
        let (mut tokens, mut selected, mut masked, mut changed) = (0usize, 0usize, 0usize, 0usize);
        let mut random_bins = std::collections::BTreeSet::new();
        for batch in Loader::spawn(corpus.clone(), plan.clone(), ranges, config).unwrap() {
            let batch = batch.unwrap();
            for (s, id) in batch.sample_ids.iter().enumerate() {
                let row = s * batch.seq_len + 1..(s + 1) * batch.seq_len;
                let bins = stored_bins(id.cell);
                for k in row {
                    let (gene, input, target) = (
                        batch.gene_ids[k] as usize - 1,
                        batch.input_bins[k],
                        batch.target_bins[k],
                    );
                    tokens += 1;
                    if target == IGNORE_TARGET {
                        assert_eq!(input, bins[gene], "an unselected token keeps its bin");
                        continue;
                    }
                    // Every selected token is scored against its true bin.
                    assert_eq!(target, bins[gene]);
                    selected += 1;
                    if input == layout.mask_bin() {
                        masked += 1;
                    } else if input != bins[gene] {
                        assert!(input < layout.n_bins, "a random bin is an expression bin");
                        random_bins.insert(input);
                        changed += 1;
                    }
                }
            }
        }
        let share = |n: usize| n as f64 / selected as f64;
        assert!((0.45..0.55).contains(&(selected as f64 / tokens as f64)));
        assert!((0.77..0.83).contains(&share(masked)), "{}", share(masked));
        // A random bin equals the true one 1 time in BINS, so slightly fewer than 10% change.
        assert!((0.07..0.11).contains(&share(changed)), "{}", share(changed));
        assert!(random_bins.len() as u16 >= BINS - 1, "{random_bins:?}");
    }

    #[test]
    fn nonzero_bytes_marks_exactly_the_nonzero_bytes() {
        let mut rng = crate::philox::SampleRng::new(3, crate::philox::Domain::Mask, 0, 0);
        for _ in 0..20_000 {
            // Mostly zero bytes, some 0x80 and 0x7f edges, some random.
            let mut bytes = [0u8; 8];
            for b in &mut bytes {
                *b = match rng.below(6) {
                    0 => 0x80,
                    1 => 0x7f,
                    2 => 1 + rng.below(255) as u8,
                    _ => 0,
                };
            }
            let expected = bytes
                .iter()
                .enumerate()
                .fold(0u64, |m, (i, &b)| m | u64::from(b != 0) << i);
            assert_eq!(
                nonzero_bytes(u64::from_le_bytes(bytes)),
                expected,
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn uniform_key_sort_orders_like_the_comparison_sort() {
        let mut rng = crate::philox::SampleRng::new(5, crate::philox::Domain::Mask, 0, 0);
        let (mut sorted, mut starts) = (Vec::new(), Vec::new());
        for n in [0usize, 1, 2, 3, 7, 64, 300, 301, 5_000] {
            // Hash-like keys; keys sharing their top 40 bits (one bucket, many swaps); keys in
            // descending order (every neighbour out of place within a bucket).
            let uniform: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
            let clustered: Vec<u64> = (0..n as u64)
                .map(|i| (0xABCD << 40) | ((i * 7919) % 100_003))
                .collect();
            let descending: Vec<u64> = (0..n as u64).rev().map(|i| i << 40 | i).collect();
            for keys in [uniform, clustered, descending] {
                let mut expected = keys.clone();
                expected.sort_unstable();
                let mut got = keys.clone();
                sort_uniform_keys(&mut got, &mut sorted, &mut starts);
                assert_eq!(got, expected, "n = {n}");
            }
        }
    }

    #[test]
    fn expressed_genes_are_found_at_every_offset_of_a_64_bin_word() {
        for len in [0, 1, 63, 64, 65, 127, 128, 200, 4096] {
            let bins: Vec<u8> = (0..len)
                .map(|g: usize| {
                    if (g * 7919) % 5 < 2 {
                        (g % 50) as u8
                    } else {
                        0
                    }
                })
                .collect();
            let mut tokens = Vec::new();
            push_expressed(&bins, &mut tokens);
            let expected: Vec<u32> = (0..len as u32)
                .filter(|&g| bins[g as usize] != 0)
                .map(|g| u32::from(bins[g as usize]) << 16 | g)
                .collect();
            assert_eq!(tokens, expected, "{len} bins");
        }
    }

    #[test]
    fn expressed_count_counts_every_nonzero_bin_across_its_255_bin_chunks() {
        // All-expressed stretches longer than a chunk would overflow a byte counter carried across
        // chunks; mixed ones check the count itself.
        for len in [0usize, 1, 254, 255, 256, 510, 511, 4096, 5000] {
            let all: Vec<u8> = vec![7; len];
            assert_eq!(expressed_count(&all), len, "{len} expressed bins");
            let mixed: Vec<u8> = (0..len).map(|g| ((g * 7919) % 3) as u8).collect();
            let expected = mixed.iter().filter(|&&b| b != 0).count();
            assert_eq!(expressed_count(&mixed), expected, "{len} mixed bins");
        }
    }

    /// One delivered sample: (epoch, sample, its row's genes, its row's input bins, padded row length).
    type Row = (u32, SampleId, Vec<u16>, Vec<u8>, usize);

    /// Every sample of epochs 0 and 1 read by `world` ranks in the expressed layout (no masking).
    fn expressed_rows(
        corpus: &Arc<Corpus>,
        order: OrderConfig,
        unexpressed: u32,
        world: u32,
    ) -> Vec<Row> {
        let mut rows = Vec::new();
        for epoch in 0..2 {
            let plan = Arc::new(EpochPlan::new(&corpus.manifest, order, epoch).unwrap());
            let partitioner = Partitioner {
                epoch_len: plan.len(),
            };
            for rank in 0..world {
                let ranges: Vec<_> = (0..)
                    .map(|i| partitioner.global_batch(i * 24, 1, 24))
                    .take_while(|r| !r.is_empty())
                    .map(|r| Partitioner::rank_slice(&r, world, rank))
                    .collect();
                let config = LoaderConfig {
                    sequence: SequenceLayout::Expressed { unexpressed },
                    mask: MaskConfig::masking_only(0.0),
                    ..LoaderConfig::default()
                };
                for batch in Loader::spawn(corpus.clone(), plan.clone(), ranges, config).unwrap() {
                    let batch = batch.unwrap();
                    for (s, id) in batch.sample_ids.iter().enumerate() {
                        let row = s * batch.seq_len..(s + 1) * batch.seq_len;
                        let length = batch.lengths[s] as usize;
                        // Padding is never a target and carries the mask bin.
                        assert!(batch.target_bins[row.clone()]
                            .iter()
                            .all(|&t| t == IGNORE_TARGET));
                        assert!(batch.gene_ids[row.start + length..row.end]
                            .iter()
                            .all(|&g| g == CLS_GENE_ID));
                        rows.push((
                            epoch,
                            *id,
                            batch.gene_ids[row.start..row.start + length].to_vec(),
                            batch.input_bins[row.start..row.start + length].to_vec(),
                            batch.seq_len,
                        ));
                    }
                }
            }
        }
        rows
    }

    #[test]
    fn expressed_layout_sequences_decode_to_the_full_layouts_bins_exactly_once_at_any_world_size() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = Arc::new(corpus(dir.path()));
        let order = OrderConfig {
            seed: 9,
            augmentation: 3,
            window_units: 2,
        };
        let layout = TokenLayout::new(BINS).unwrap();
        let unexpressed = 2;
        let one = expressed_rows(&corpus, order, unexpressed, 1);
        let mut draws_changed_between_epochs = false;
        let mut by_sample = std::collections::BTreeMap::new();
        let mut unexpressed_positions = Vec::new();
        let mut clone_orders = std::collections::BTreeMap::new();
        let mut expressed_orders = std::collections::BTreeMap::new();
        for (epoch, id, genes, inputs, _) in &one {
            let bins = stored_bins(id.cell);
            assert_eq!((genes[0], inputs[0]), (CLS_GENE_ID, layout.cls_bin()));
            let expressed = expressed_count(&bins);
            let zeros = GENES - expressed;
            assert!(zeros > 0 && expressed > 0, "the fixture has both kinds");
            assert_eq!(
                genes.len(),
                1 + expressed + zeros.min(unexpressed as usize),
                "{id:?}"
            );
            // Each token carries its gene's stored bin: the same bins the full layout gives.
            for (&gene, &input) in genes[1..].iter().zip(&inputs[1..]) {
                assert_eq!(input, bins[gene as usize - 1]);
            }
            // Every gene appears once; every expressed gene is there.
            let mut distinct = genes[1..].to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), genes.len() - 1, "{id:?} repeats a gene");
            let expressed_tokens = inputs[1..].iter().filter(|&&b| b != 0).count();
            assert_eq!(expressed_tokens, expressed);
            // Unexpressed tokens sit anywhere in the permuted order, not after the expressed ones.
            let last = (genes.len() - 2).max(1) as f64;
            for (position, _) in inputs[1..].iter().enumerate().filter(|&(_, &b)| b == 0) {
                unexpressed_positions.push(position as f64 / last);
            }
            // Each clone of a cell is permuted independently.
            clone_orders
                .entry((*epoch, id.cell))
                .or_insert_with(Vec::new)
                .push(genes.clone());
            // A clone is one fixed permutation: its expressed genes keep their order across epochs.
            let expressed_order: Vec<u16> = genes[1..]
                .iter()
                .zip(&inputs[1..])
                .filter(|&(_, &b)| b != 0)
                .map(|(&g, _)| g)
                .collect();
            if let Some(previous) = expressed_orders.insert(*id, expressed_order.clone()) {
                assert_eq!(
                    previous, expressed_order,
                    "{id:?}: its clone order changed between epochs"
                );
            }
            if let Some(previous) = by_sample.insert(*id, genes.clone()) {
                draws_changed_between_epochs |= previous != *genes;
            }
            assert!(*epoch < 2);
        }
        assert!(
            draws_changed_between_epochs,
            "the unexpressed sample is drawn afresh each epoch"
        );
        let mean_position =
            unexpressed_positions.iter().sum::<f64>() / unexpressed_positions.len() as f64;
        assert!(
            (0.4..0.6).contains(&mean_position),
            "unexpressed tokens sit at {mean_position:.3} of the sequence on average, expected about 0.5 \
             ({} tokens)",
            unexpressed_positions.len()
        );
        for ((epoch, cell), orders) in &clone_orders {
            assert_eq!(orders.len(), order.augmentation as usize);
            assert!(
                orders[1..].iter().any(|o| o != &orders[0]),
                "epoch {epoch} cell {cell}: its clones share one token order"
            );
        }
        // Rows are padded to the batch's longest sequence, not the vocabulary (every fixture cell has at
        // least 3 unexpressed genes and only 2 are drawn).
        assert!(one.iter().all(|r| r.4 < GENES + 1));
        // Two and three ranks deliver the same samples with the same tokens, each once per epoch.
        let key = |rows: Vec<Row>| {
            let mut keyed: Vec<_> = rows
                .into_iter()
                .map(|(e, id, g, b, _)| (e, id, g, b))
                .collect();
            keyed.sort();
            keyed
        };
        let reference = key(one);
        assert_eq!(reference.len(), 2 * 151 * 3);
        for world in [2, 3] {
            assert_eq!(
                key(expressed_rows(&corpus, order, unexpressed, world)),
                reference,
                "world {world}"
            );
        }
    }

    #[test]
    fn loader_batches_hold_the_clone_order_the_stored_bins_and_the_mask() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = Arc::new(corpus(dir.path()));
        let order = OrderConfig {
            seed: 5,
            augmentation: 2,
            window_units: 3,
        };
        let plan = Arc::new(EpochPlan::new(&corpus.manifest, order, 1).unwrap());
        let partitioner = Partitioner {
            epoch_len: plan.len(),
        };
        let ranges: Vec<_> = (0..)
            .map(|i| partitioner.global_batch(i * 20, 1, 20))
            .take_while(|r| !r.is_empty())
            .collect();
        let config = LoaderConfig {
            threads: 2,
            ..LoaderConfig::default()
        };
        let layout = TokenLayout::new(BINS).unwrap();
        let (mut seen, mut masked, mut tokens) = (Vec::new(), 0usize, 0usize);
        let mut expected_order = Vec::new();
        for batch in Loader::spawn(corpus.clone(), plan.clone(), ranges, config).unwrap() {
            let batch = batch.unwrap();
            for (s, id) in batch.sample_ids.iter().enumerate() {
                let row = s * batch.seq_len..(s + 1) * batch.seq_len;
                let (genes, inputs, targets) = (
                    &batch.gene_ids[row.clone()],
                    &batch.input_bins[row.clone()],
                    &batch.target_bins[row],
                );
                assert_eq!(
                    (genes[0], inputs[0], targets[0]),
                    (CLS_GENE_ID, layout.cls_bin(), IGNORE_TARGET)
                );
                clone_order(
                    order.seed,
                    order.augmentation,
                    *id,
                    GENES,
                    &mut expected_order,
                );
                let bins = stored_bins(id.cell);
                for k in 0..GENES {
                    let gene = expected_order[k];
                    assert_eq!(genes[k + 1], gene + 1);
                    if inputs[k + 1] == layout.mask_bin() {
                        assert_eq!(targets[k + 1], bins[gene as usize]);
                        masked += 1;
                    } else {
                        assert_eq!(
                            (inputs[k + 1], targets[k + 1]),
                            (bins[gene as usize], IGNORE_TARGET)
                        );
                    }
                    tokens += 1;
                }
                assert_eq!(batch.labels[s], (id.cell % 3) as u32);
                seen.push(*id);
            }
        }
        seen.sort();
        let all: Vec<SampleId> = (0..151)
            .flat_map(|cell| (0..2).map(move |clone| SampleId { cell, clone }))
            .collect();
        assert_eq!(seen, all, "one epoch delivers every (cell, clone) once");
        let ratio = masked as f64 / tokens as f64;
        assert!(
            (0.12..0.18).contains(&ratio),
            "mask ratio {ratio} is far from 0.15"
        );
    }
}
